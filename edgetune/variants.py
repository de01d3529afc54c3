"""Adapter variants as small strategy objects (PEFT's ``LoraVariant`` idea).

Each variant knows how to configure PEFT at export and how to fold itself into a base
weight (numpy reference; the C++ kernels in ``edgetune._ext`` mirror these).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .errors import ConfigError


class LoraVariant:
    """Plain LoRA: ``W' = W + scale * B @ A``."""

    name = "lora"

    def peft_config(self, cfg: Any) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.targets), bias="none", use_dora=False)

    def delta(self, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
        return scale * (b.astype(np.float32) @ a.astype(np.float32))

    def merge(self, w: np.ndarray, tensors: Mapping[str, np.ndarray], scale: float) -> np.ndarray:
        """Return the merged float32 weight (reference implementation)."""
        return w.astype(np.float32) + self.delta(tensors["lora_A"], tensors["lora_B"], scale)

    def tensor_kinds(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B")


class DoraVariant(LoraVariant):
    """DoRA: ``W' = m * (W + scale * B @ A) / ||W + scale * B @ A||_col`` (norm over each output row)."""

    name = "dora"

    def peft_config(self, cfg: Any) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.targets), bias="none", use_dora=True)

    def merge(self, w: np.ndarray, tensors: Mapping[str, np.ndarray], scale: float) -> np.ndarray:
        merged = super().merge(w, tensors, scale)
        norm = np.linalg.norm(merged, axis=1)
        mag = tensors["lora_magnitude_vector"].astype(np.float32).reshape(-1)
        return merged * (mag / norm)[:, None]

    def tensor_kinds(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B", "lora_magnitude_vector")


_VARIANTS: dict[str, LoraVariant] = {"lora": LoraVariant(), "dora": DoraVariant()}


def get(name: str) -> LoraVariant:
    try:
        return _VARIANTS[name]
    except KeyError:
        raise ConfigError(f"unknown adapter method {name!r}; known: {', '.join(_VARIANTS)}") from None
