"""A run directory's checkpoints: the files, the state beside them, and which is the newest intact one.

    RUN/checkpoints/
      latest                  the name of the newest complete checkpoint
      step-000100/
        adapter.safetensors     the adapter tensors (graph names)
        optimizer.safetensors   AdamW moments (exp_avg/NAME, exp_avg_sq/NAME)
        trainer_state.json      step, data position, optimizer step count, ...
        checksums.json          sha256 of the tensor files, written with them
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgetune.formats import atomic as _io
from edgetune.formats.errors import BundleError

ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file as float32 arrays; damage is an error naming the file."""
    from safetensors.numpy import load_file

    from edgetune.formats import safety

    if Path(path).is_file():
        safety.check_safetensors(Path(path), "restore it or export/train again")
    try:
        return {k: np.array(v, np.float32) for k, v in load_file(str(path)).items()}
    except FileNotFoundError:
        raise BundleError(f"{path} is missing") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise BundleError(f"{path} is damaged ({e}); restore it or export/train again") from None


def write_checkpoint(ck: Path, params: Mapping[str, np.ndarray], optimizer: Any | None) -> None:
    """Write the tensor files of a checkpoint into the (temporary) folder ``ck``; ``optimizer``
    has ``step_count`` and ``state()`` (edgetune.device.optim.AdamW)."""
    from safetensors.numpy import save

    (ck / ADAPTER_FILE).write_bytes(save({k: np.ascontiguousarray(v) for k, v in params.items()}))
    if optimizer is not None and optimizer.step_count:
        (ck / OPTIMIZER_FILE).write_bytes(save({k: np.ascontiguousarray(v) for k, v in optimizer.state().items()}))

CHECKSUMS = "checksums.json"  # sha256 of a checkpoint's tensor files, written with them


@dataclass
class TrainerState:
    """What a checkpoint needs besides the adapter and optimizer tensors."""

    step: int = 0                 # optimizer steps done
    epoch: int = 0
    batch_index: int = 0          # micro-batches consumed in ``epoch``
    tokens: int = 0
    labelled: int = 0
    elapsed: float = 0.0
    last_loss: float | None = None
    last_valid_loss: float | None = None
    bundle_id: str = ""
    adapter: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def latest_checkpoint(run: Path, skipped: list[str] | None = None) -> Path | None:
    """The newest intact checkpoint: the ``latest`` pointer's, else the newest folder whose files
    are all there and match the checksums written with them. A damaged one is passed over (and
    named in ``skipped``), so a resume falls back to the previous checkpoint instead of failing."""
    ck = run / "checkpoints"
    ptr = ck / "latest"
    cands = []
    if ptr.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            name = ptr.read_text().strip()
            if _is_step_name(name):  # a pointer elsewhere ("../..") is not followed
                cands.append(ck / name)
    cands += [d for d in sorted(ck.glob("step-*"), reverse=True) if d not in cands]
    for d in cands:
        problem = _checkpoint_problem(d)
        if problem is None:
            return d
        if skipped is not None and d.is_dir():
            skipped.append(f"{d.name}: {problem}")
    return None


def _checkpoint_problem(d: Path) -> str | None:
    if not d.is_dir():
        return "missing"
    for f in (ADAPTER_FILE, "trainer_state.json"):
        if not (d / f).is_file():
            return f"{f} is missing"
    try:
        state = _io.read_json(d / "trainer_state.json", "checkpoint state")
        sums = _io.read_json(d / CHECKSUMS, "checksums") if (d / CHECKSUMS).is_file() else {}
    except BundleError as e:
        return str(e)
    # After the first step AdamW has moments: without them a resume would restart it from zero.
    if isinstance(state, dict) and int(state.get("step") or 0) > 0 and not (d / OPTIMIZER_FILE).is_file():
        return f"{OPTIMIZER_FILE} is missing (the optimizer's state after step {state.get('step')})"
    if not isinstance(sums, dict):
        return f"{CHECKSUMS} is not an object"
    for f, digest in sums.items():
        if not _is_file_name(f):
            return f"{CHECKSUMS} names {f!r}, which is not a file of the checkpoint"
        if not (d / f).is_file():
            return f"{f} is missing"
        if _io.sha256_file(d / f) != digest:
            return f"{f} does not match its checksum (damaged)"
    return None


def _is_step_name(name: str) -> bool:
    return name.startswith("step-") and _is_file_name(name)


def _is_file_name(name: object) -> bool:
    """A plain name inside its folder: no separator, no ``..``, not hidden."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def _complete(d: Path) -> bool:
    return _checkpoint_problem(d) is None
