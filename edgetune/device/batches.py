"""Batch files: the exact inputs of every training step, tokenized ahead, for a trainer with no
tokenizer (an app that trains through any ONNX Runtime binding; ``examples/cpp``).

``write`` runs the Python trainer's own data path (truncation, masking, bucketing, shuffling by
seed, gradient accumulation, token-budget chunks) and stores, per optimizer step ``i`` and
chunk ``j``, the training graph's inputs as safetensors tensors ``step{i}/chunk{j}/input_ids``,
``.../attention_mask``, ``.../labels`` (int64 [rows, tokens]) and ``.../label_norm`` (float32
scalar: the step's labelled-token count, by which each chunk's summed loss is divided); with
``--packing on`` a row holds several records and ``attention_mask`` numbers them 1, 2, ... (0 is
padding; the bundle's graphs read it as segment ids). The
header's metadata says which bundle the file is for and the optimizer graph's schedule inputs, so
an app that runs ``optimizer.onnx`` after each step takes the same steps as ``edgetune train``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgetune.formats import atomic as _io
from edgetune.formats.errors import DataError

KIND = "edgetune-batches"
VERSION = 1
SCHEDULES = {"constant": 0, "linear": 1, "cosine": 2}  # optimizer.onnx's ``schedule`` input


def name(step: int, chunk: int, what: str) -> str:
    return f"step{step}/chunk{chunk}/{what}"


def write(trainer: Any, data: str | Path, out: str | Path, steps: int | None = None) -> dict[str, Any]:
    """Tokenize ``data`` as ``trainer`` (an ``edgetune.device.trainer.Trainer``) would train on it and
    write steps 1..``steps`` (default: the run's total) to ``out``; returns the file's metadata."""
    from safetensors.numpy import save

    train, _ = trainer.load_data(data)
    total, _ = trainer.total_steps(train)
    steps = total if steps is None else steps
    if steps < 1:
        raise DataError(f"--steps must be at least 1, got {steps}")
    cfg = trainer.cfg
    tensors: dict[str, np.ndarray] = {}
    chunks: list[int] = []
    tokens = labelled = 0
    states: list[dict[str, int]] = []
    for i, (feeds, state) in enumerate(trainer.planned_steps(train, steps), start=1):
        chunks.append(len(feeds))
        states.append(state)
        for j, feed in enumerate(feeds):
            for key in ("input_ids", "attention_mask", "labels", "label_norm"):
                tensors[name(i, j, key)] = np.array(feed[key], order="C")  # (ascontiguousarray makes 0-d 1-d)
            tokens += int((feed["attention_mask"] > 0).sum())
        labelled += int(feeds[0]["label_norm"])
    meta = {"kind": KIND, "version": VERSION, "bundle_id": trainer.bundle.base_id, "steps": steps, "chunks": chunks,
            "states": states, "vocab_size": int((trainer.bundle.manifest.get("model_config") or {}).get("vocab_size") or 0),
            "max_seq_len": cfg.max_seq_len, "adapter": trainer.bundle.manifest["adapter"],
            "tokens": tokens, "labelled": labelled, "data": str(data), "packed": trainer.packing,
            "schedule": {"base_lr": cfg.lr, "warmup_steps": cfg.warmup, "total_steps": total,
                         "schedule": SCHEDULES[cfg.schedule], "weight_decay": cfg.weight_decay},
            "config": cfg.to_dict()}
    _io.write_bytes(Path(out), save(tensors, metadata={"edgetune": json.dumps(meta, sort_keys=True)}))
    return meta


def read(path: str | Path, bundle_id: str | None = None) -> tuple[dict[str, Any], Mapping[str, np.ndarray]]:
    """A batch file's metadata and tensors, checked to be one and (with ``bundle_id``) for that bundle."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise DataError(f"batch file not found: {path} (write one with: edgetune tokenize DATA --bundle BUNDLE "
                        f"--out {path})")
    from edgetune.formats import safety
    from edgetune.formats.errors import BundleError

    try:
        safety.check_safetensors(path, "write it again with edgetune tokenize")
    except BundleError as e:
        fix = "write it again with edgetune tokenize"
        detail = str(e).removeprefix(f"{path}: ").removesuffix(f"; {fix}")
        raise DataError(f"{path} is not a readable batch file ({detail}); {fix}") from None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = json.loads((f.metadata() or {}).get("edgetune", "{}"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable batch file ({e}); write it again with edgetune tokenize") from None
    if meta.get("kind") != KIND or meta.get("version") != VERSION:
        raise DataError(f"{path} is not an edgetune batch file of version {VERSION}; write it again with edgetune tokenize")
    if bundle_id is not None and meta.get("bundle_id") != bundle_id:
        raise DataError(f"{path} was tokenized for another bundle (id {str(meta.get('bundle_id'))[:12]}…, this bundle's "
                        f"is {bundle_id[:12]}…); tokenize the data again with --bundle set to this bundle")
    return meta, tensors
