"""Gradient rules of the ops normalizations are made of: Softmax and the mean/sum reductions (RMSNorm)."""
from __future__ import annotations

from typing import Any

import numpy as np

from edgetune.formats.errors import ModelError

from .core import Builder, attr, const_value, rule


@rule("Softmax")
def _softmax(b: Builder, n: Any, gy: list, want: list) -> list:
    y = n.output[0]
    axis = attr(n, "axis", -1)
    gyy = b.op("Mul", [gy[0], y])
    s = b.op("ReduceSum", [gyy, b.const([axis], np.int64)], keepdims=1)
    return [b.op("Sub", [gyy, b.op("Mul", [y, s])])]


@rule("ReduceMean", "ReduceSum")
def _reduce(b: Builder, n: Any, gy: list, want: list) -> list:
    x = n.input[0]
    axes = attr(n, "axes")
    if axes is None and len(n.input) > 1 and n.input[1]:
        v = const_value(b, n.input[1])
        if v is None:
            raise ModelError(f"autodiff: {n.op_type} needs constant axes")
        axes = v.tolist()
    r = b.rank(x)
    axes = sorted(a % r for a in (axes if axes is not None else range(r)))
    g = gy[0]
    if not attr(n, "keepdims", 1):
        g = b.op("Unsqueeze", [g, b.const(axes, np.int64)])
    g = b.op("Expand", [g, b.op("Shape", [x])])
    if n.op_type == "ReduceMean":
        counts = {int(np.prod([s[a] for a in axes])) for s in b.shape(x)}
        if len(counts) == 1:
            g = b.op("Mul", [g, b.const(1.0 / counts.pop())])
        else:
            dims = b.op("Gather", [b.op("Shape", [x]), b.const(axes, np.int64)], axis=0)
            count = b.op("Cast", [b.op("ReduceProd", [dims], keepdims=0)], to=1)
            g = b.op("Div", [g, count])
    return [g] + [None] * (len(n.input) - 1)
