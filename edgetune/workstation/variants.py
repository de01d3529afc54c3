"""Adapter variants as small strategy objects (PEFT's ``LoraVariant`` idea).

Each variant knows how to configure PEFT at export and which tensors it trains; the merges
themselves are in ``edgetune.device.kernels`` (C++ and its numpy reference).
"""
from __future__ import annotations

from typing import Any

from edgetune.formats.errors import ConfigError


class LoraVariant:
    """Plain LoRA: ``W' = W + scale * B @ A``."""

    name = "lora"

    def peft_config(self, cfg: Any) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.targets), bias="none", use_dora=False)

    def tensor_kinds(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B")


class DoraVariant(LoraVariant):
    """DoRA: ``W' = m * (W + scale * B @ A) / ||W + scale * B @ A||_col`` (norm over each output row)."""

    name = "dora"

    def peft_config(self, cfg: Any) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.targets), bias="none", use_dora=True)

    def tensor_kinds(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B", "lora_magnitude_vector")


_VARIANTS: dict[str, LoraVariant] = {"lora": LoraVariant(), "dora": DoraVariant()}


def get(name: str) -> LoraVariant:
    try:
        return _VARIANTS[name]
    except KeyError:
        raise ConfigError(f"unknown adapter method {name!r}; known: {', '.join(_VARIANTS)}") from None
