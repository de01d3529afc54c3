"""Gradient rule of the loss: SoftmaxCrossEntropyLoss over labelled rows."""
from __future__ import annotations

from typing import Any

import numpy as np

from edgetune.formats.errors import ModelError

from .core import Builder, attr, rule


@rule("SoftmaxCrossEntropyLoss")
def _sce(b: Builder, n: Any, gy: list, want: list) -> list:
    scores, labels = n.input[0], n.input[1]
    if len(n.input) > 2 and n.input[2]:
        raise ModelError("autodiff: SoftmaxCrossEntropyLoss with class weights is not supported")
    if b.rank(scores) != 2:
        raise ModelError("autodiff: SoftmaxCrossEntropyLoss is supported on [N, C] scores only")
    if len(n.output) < 2:
        n.output.append(n.output[0] + "/log_prob")
    # softmax - onehot(labels): 1 is taken off each row's label entry in place (ScatterElements on
    # the softmax, whose buffer is dead after it), not by a [N, vocab] one-hot and a subtraction.
    ignore = attr(n, "ignore_index")
    idx = labels
    if ignore is not None:  # an ignored row's factor below is 0: any valid index will do
        idx = b.op("Where", [b.op("Equal", [labels, b.const(ignore, np.int64)]), b.const(0, np.int64), labels])
    idx = b.op("Unsqueeze", [idx, b.const([-1], np.int64)])
    p = b.op("Exp", [n.output[1]])
    d = b.op("ScatterElements", [p, idx, b.op("Sub", [b.op("GatherElements", [p, idx], axis=1), b.const(1.0)])],
             axis=1)
    # Everything that scales a row (the incoming gradient, the ignore mask, a mean's count)
    # is gathered into one [N, 1] factor: a single sweep over the [N, vocab] tensor.
    valid = None
    if ignore is not None:
        valid = b.op("Cast", [b.op("Not", [b.op("Equal", [labels, b.const(ignore, np.int64)])])], to=1)
    reduction = attr(n, "reduction", b"mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    g = gy[0]
    if reduction == "mean":
        count = b.op("ReduceSum", [valid], keepdims=0) if valid else b.op(
            "Cast", [b.op("Gather", [b.op("Shape", [scores]), b.const(0, np.int64)], axis=0)], to=1)
        # A batch whose every label is ignored contributes nothing: a zero gradient, not 0 / 0 = NaN.
        g = b.op("Div", [g, b.op("Max", [count, b.const(1.0)])])
    if valid is not None:
        g = b.op("Mul", [valid, g])
    if reduction == "none" or valid is not None:
        g = b.op("Unsqueeze", [g, b.const([-1], np.int64)])
    return [b.op("Mul", [d, g]), None]
