"""Reverse-mode differentiation of exported ONNX graphs into standard ONNX ops (workstation side).

The exporter emits a small op set (MatMul, elementwise arithmetic, Softmax, reshapes,
slices, one Gather of labelled rows, SoftmaxCrossEntropyLoss). For each op a rule writes its
backward pass in ops that every current ONNX Runtime build runs (plus
``com.microsoft.FusedMatMul``, which the standard CPU build registers), so training needs no
onnxruntime-training package. Only nodes on a path from a trainable tensor to the loss are
differentiated; frozen weights get no gradient.

One module per op family (``elementwise``, ``normalization``, ``shape``, ``matmul``,
``loss``, and ``fused``: the ``edgetune`` domain's fused ops and the rewrite that makes them); ``core`` holds the builder and the registry the rules add themselves to; the one
public entry is :func:`build`.

Broadcast axes are found by running the forward graph on two probe batches of different
shapes (a dimension that is 1 in both, where the output's is not, was broadcast): ONNX's
symbolic shape inference cannot tell that two unknown dimensions are the same.
"""
from __future__ import annotations

# Each rule module registers its rules in core.RULES when imported.
from . import elementwise, fused, loss, matmul, normalization, shape  # noqa: F401
from .core import RULES, TrainingGraph, grad_name
from .driver import build

__all__ = ["RULES", "TrainingGraph", "build", "grad_name"]
