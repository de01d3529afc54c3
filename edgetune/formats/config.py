"""Frozen, validated configuration objects. Checked once, at the edge.

Precedence is command line > config file > defaults; :func:`resolve` applies it and
rejects unknown keys by name.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgetune.formats.errors import ConfigError

METHODS = ("lora", "dora")
TRUNCATE = ("auto", "prompt", "end", "error")  # see edgetune.device.data.truncation_for
SCHEDULES = ("linear", "cosine", "constant")
PACKING = ("auto", "on", "off")  # see edgetune.device.data.pack


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class AdapterConfig:
    """What the exporter injects into the model: the adapter method and its shape."""

    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_seq_len: int | None = None  # the bundle's context: generate, eval and train stay within it
    seed: int = 0
    quantize: str | None = None  # "int4" | "int8": a block-quantized frozen base (QLoRA)
    block_size: int = 32         # quantization block along the input dimension
    compute: str = "float32"     # "int8": the frozen products quantize their activations too (quantized base);
    #                              "bf16": the frozen weights of the training graphs in bfloat16 (AMX or AVX512-BF16)
    gradient_checkpointing: bool = False  # the training graph recomputes each layer in the backward pass

    def __post_init__(self) -> None:
        from edgetune.formats.quantized import check

        check(self.quantize, self.block_size)
        _check(self.compute in ("float32", "int8", "bf16"), f"compute must be float32, int8 or bf16, got {self.compute!r}")
        _check(self.compute != "int8" or self.quantize in ("int8", "int4"),
               "compute int8 multiplies quantized frozen weights by int8 activations: export with "
               "--quantize int8 or --quantize int4 as well")
        _check(self.compute != "bf16" or self.quantize is None,
               "compute bf16 keeps the frozen weights in bfloat16; a quantized base (--quantize) has its own "
               "products: drop one of the two")
        _check(self.compute != "bf16" or self.method == "lora",
               "compute bf16 is for LoRA adapters; DoRA's weight norms read the frozen weights in float32: "
               "export DoRA with --compute float32")
        _check(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        _check(isinstance(self.rank, int) and self.rank >= 1, f"rank must be a positive integer, got {self.rank!r}")
        _check(self.alpha > 0, f"alpha must be positive, got {self.alpha!r}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        _check(len(self.targets) > 0, "targets must name at least one module")
        _check(self.max_seq_len is None or self.max_seq_len >= 8,
               f"max_seq_len must be at least 8, got {self.max_seq_len!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d


@dataclass(frozen=True)
class TrainConfig:
    """How to train: steps or epochs, batches, optimizer schedule, checkpoints."""

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: int = 0
    schedule: str = "linear"
    max_seq_len: int = 512
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    mask_prompt: bool = True
    threads: int = 0
    max_batch_tokens: int = 1024
    packing: str = "auto"  # several records per row: "auto" (where the fused attention runs), "on", "off"
    device: str = "cpu"
    provider_options: tuple[str, ...] = ()
    valid_batches: int = 0
    weight_decay: float = 0.01
    truncate: str = "auto"
    task: str | None = None  # report this task's metric on the validation set (edgetune.device.tasks)

    def __post_init__(self) -> None:
        _check(self.steps is None or self.steps >= 1, f"steps must be at least 1, got {self.steps!r}")
        _check(self.epochs is None or self.epochs > 0, f"epochs must be positive, got {self.epochs!r}")
        _check(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size!r}")
        _check(self.grad_accum >= 1, f"grad_accum must be at least 1, got {self.grad_accum!r}")
        _check(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr!r}")
        _check(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup!r}")
        _check(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _check(self.max_seq_len >= 8, f"max_seq_len must be at least 8, got {self.max_seq_len!r}")
        _check(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every!r}")
        _check(self.save_every >= 0, f"save_every must be >= 0, got {self.save_every!r}")
        _check(self.keep_checkpoints >= 1, f"keep_checkpoints must be at least 1, got {self.keep_checkpoints!r}")
        _check(self.threads >= 0, f"threads must be >= 0, got {self.threads!r}")
        _check(self.max_batch_tokens >= 0, f"max_batch_tokens must be >= 0, got {self.max_batch_tokens!r}")
        _check(self.packing in PACKING, f"packing must be one of {', '.join(PACKING)}, got {self.packing!r}")
        _check(self.truncate in TRUNCATE, f"truncate must be one of {', '.join(TRUNCATE)}, got {self.truncate!r}")
        from edgetune.formats.config import TASKS

        _check(self.task is None or self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
               f"weight_decay must be a number >= 0, got {self.weight_decay!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(cls: type, key: str, value: Any) -> Any:
    field_ = {f.name: f for f in fields(cls)}[key]
    ftype = str(field_.type)
    if value is None:
        if field_.default is None:
            return None
        raise ConfigError(f"{key}: null is not allowed; give a value or leave the key out")
    bad = ConfigError(f"{key}: cannot use {value!r} as {ftype}")
    try:
        if "tuple" in ftype:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise bad
            return tuple(value)
        if "bool" in ftype:
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            if not isinstance(value, (bool, int)):
                raise bad
            return bool(value)
        if isinstance(value, (dict, list, tuple, bool)):
            raise bad
        if "int" in ftype and "float" not in ftype:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if "float" in ftype:
            return float(value)
        if "str" in ftype and not isinstance(value, str):
            raise bad
        return value
    except (TypeError, ValueError, OverflowError):
        raise bad from None


def resolve(cls: type, file: str | Path | None = None, **overrides: Any) -> Any:
    """Build ``cls`` from defaults, then a JSON config file, then non-None overrides."""
    names = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    if file is not None:
        from edgetune.formats.atomic import read_json

        if not Path(file).is_file():
            raise ConfigError(f"config file not found: {file}")
        loaded = read_json(file, "config file", "fix it (a JSON object of settings)", error=ConfigError)
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ConfigError(f"{file}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        values.update(loaded)
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}")
    given = {k for k, v in overrides.items() if v is not None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    coerced = {}
    for k, v in values.items():
        try:
            coerced[k] = _coerce(cls, k, v)
        except ConfigError as e:  # a bad value from the file names the file
            raise ConfigError(f"{file}: {e}" if file is not None and k not in given else str(e)) from None
    return cls(**coerced)

TASKS = ("classification", "qa", "translation", "ner", "chat", "creative")
