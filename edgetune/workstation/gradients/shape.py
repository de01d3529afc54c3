"""Gradient rules of shape ops: reshapes, Expand, Transpose, Concat, Slice, Gather."""
from __future__ import annotations

from typing import Any

import numpy as np

from edgetune.formats.errors import ModelError

from .core import Builder, attr, const_value, rule
from .prepare import static_reshape


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b: Builder, n: Any, gy: list, want: list) -> list:
    # back to the input's shape: a constant target where the probes pin it down, else Shape(x)
    spec = static_reshape(b.shape(n.output[0]), b.shape(n.input[0]))
    back = b.op("Reshape", [gy[0], b.const(spec, np.int64)]) if spec is not None else b.like(gy[0], n.input[0])
    return [back] + [None] * (len(n.input) - 1)


@rule("Expand")
def _expand(b: Builder, n: Any, gy: list, want: list) -> list:
    return [b.unbroadcast(gy[0], n.input[0], n.output[0]), None]


@rule("Transpose")
def _transpose(b: Builder, n: Any, gy: list, want: list) -> list:
    perm = attr(n, "perm") or list(reversed(range(b.rank(n.input[0]))))
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return [b.op("Transpose", [gy[0]], perm=inv)]


@rule("Concat")
def _concat(b: Builder, n: Any, gy: list, want: list) -> list:
    axis = attr(n, "axis") % b.rank(n.output[0])
    sizes = [b.static_dim(i, axis) for i in n.input]
    if all(s is not None for s in sizes):
        split = b.const(sizes, np.int64)
    else:
        split = b.op("Concat", [b.op("Gather", [b.op("Shape", [i]), b.const([axis], np.int64)], axis=0)
                                for i in n.input], axis=0)
    parts = b.op("Split", [gy[0], split], n_out=len(n.input), axis=axis)
    parts = parts if isinstance(parts, list) else [parts]
    return [p if w else None for p, w in zip(parts, want)]


@rule("Slice")
def _slice(b: Builder, n: Any, gy: list, want: list) -> list:
    x = n.input[0]
    r = b.rank(x)
    vals = [const_value(b, i) if len(n.input) > k and n.input[k] else None for k, i in
            enumerate(list(n.input[1:]) + [""] * (4 - len(n.input[1:])), start=1)]
    starts, ends, axes, steps = vals
    if starts is None or ends is None:
        raise ModelError(f"autodiff: Slice needs constant starts and ends (node {n.name})")
    # Axes or steps that are given but not constant would silently read as the defaults.
    for k, what in ((3, "axes"), (4, "steps")):
        if len(n.input) > k and n.input[k] and vals[k - 1] is None:
            raise ModelError(f"autodiff: Slice needs constant {what} (node {n.name}, {what} from {n.input[k]})")
    axes = list(range(len(starts))) if axes is None else [a % r for a in axes.tolist()]
    if steps is not None and any(s != 1 for s in steps.tolist()):
        raise ModelError(f"autodiff: Slice with steps other than 1 is not supported (node {n.name})")
    pads = [0] * (2 * r)
    for a, s, e in zip(axes, starts.tolist(), ends.tolist()):
        dim = b.static_dim(x, a)
        if dim is None:
            raise ModelError(f"autodiff: Slice along a dynamic axis of {x} is not supported")
        s = min(max(s + dim if s < 0 else s, 0), dim)
        e = max(min(max(e + dim if e < 0 else e, 0), dim), s)  # an empty slice (end <= start) pads to dim
        pads[a], pads[r + a] = s, dim - e
    return [b.op("Pad", [gy[0], b.const(pads, np.int64)], mode="constant")] + [None] * (len(n.input) - 1)


@rule("Gather")
def _gather(b: Builder, n: Any, gy: list, want: list) -> list:
    """Rows gathered along axis 0 scatter back through a one-hot GEMM: repeated indices add
    up, and every provider runs it (OpenVINO refuses ScatterND with reduction='add')."""
    if attr(n, "axis", 0) != 0:
        raise ModelError("autodiff: Gather of a differentiable tensor is supported along axis 0 only")
    x, idx = n.input[0], n.input[1]
    shape = b.op("Shape", [x])
    rows = b.op("Gather", [shape, b.const([0], np.int64)], axis=0)
    flat_idx = b.op("Reshape", [idx, b.const([-1], np.int64)])
    onehot = b.op("OneHot", [flat_idx, rows, b.const([0.0, 1.0])], axis=-1)
    width = b.op("ReduceProd", [b.op("Slice", [shape, b.const([1], np.int64), b.const([2**62], np.int64)])], keepdims=1) \
        if b.rank(x) > 1 else b.const([1], np.int64)
    g2 = b.op("Reshape", [gy[0], b.op("Concat", [b.const([-1], np.int64), width], axis=0)])
    return [b.like(b.op("Gemm", [onehot, g2], transA=1), x), None]
