"""Access to ONNX Runtime's on-device training API without importing torch.

``import onnxruntime.training`` pulls in torch through ``training/optim``. The ``api``
classes only wrap ``onnxruntime.capi._pybind_state``, so a bare package object for
``onnxruntime.training`` lets them import on a device that has no torch.
"""
from __future__ import annotations

import os
import sys
import types
from typing import Any

from .errors import EdgetuneError


def prepare() -> None:
    """Make ``import onnxruntime`` torch-free; call before onnxruntime is first imported.

    ``onnxruntime`` probes ``onnxruntime.training.ortmodule`` at import (which imports
    torch when present: 300 MB of RSS for nothing on the training path).
    """
    import importlib.util

    if "onnxruntime" in sys.modules or "onnxruntime.training" in sys.modules:
        return
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return
    root = list(spec.submodule_search_locations)[0]
    if not os.path.isdir(os.path.join(root, "training")):
        return
    pkg = types.ModuleType("onnxruntime.training")
    pkg.__path__ = [os.path.join(root, "training")]
    sys.modules["onnxruntime.training"] = pkg
    sys.modules["onnxruntime.training.ortmodule"] = None  # type: ignore[assignment]


def training_api() -> Any:
    """Return ``onnxruntime.training.api`` (Module, Optimizer, CheckpointState)."""
    try:
        import onnxruntime
        from onnxruntime.capi import _pybind_state as C
    except ImportError as e:
        raise EdgetuneError(f"onnxruntime is not installed ({e}); pip install onnxruntime-training-cpu==1.19.2") from None
    if not hasattr(C, "CheckpointState"):
        raise EdgetuneError(
            f"this onnxruntime ({onnxruntime.__version__}) has no training runtime; "
            "on-device training needs onnxruntime-training-cpu==1.19.2 (not onnxruntime)"
        )
    if "onnxruntime.training" not in sys.modules:
        pkg = types.ModuleType("onnxruntime.training")
        pkg.__path__ = [os.path.join(os.path.dirname(onnxruntime.__file__), "training")]
        sys.modules["onnxruntime.training"] = pkg
    from onnxruntime.training import api

    return api


def set_seed(seed: int) -> None:
    """Seed ONNX Runtime's random generator (dropout)."""
    from onnxruntime.capi import _pybind_state as C

    C.set_seed(int(seed) % (2**31 - 1))
