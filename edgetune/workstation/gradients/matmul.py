"""Gradient rules of matrix products: MatMul, Gemm, com.microsoft FusedMatMul and MatMulNBits (a quantized frozen weight)."""
from __future__ import annotations

from typing import Any

import numpy as np

from edgetune.formats.errors import ModelError
from edgetune.formats.quantized import tensor_names, weight_name

from .core import MS, Builder, attr, rule


def _mm(b: Builder, x: str, y: str, ta: bool, tb: bool, alpha: float) -> str:
    if not ta and not tb and alpha == 1.0:  # ORT's plain MatMul kernel, where nothing is folded
        return b.op("MatMul", [x, y])
    return b.op("FusedMatMul", [x, y], domain=MS, transA=int(ta), transB=int(tb), alpha=float(alpha))


def _matmul_grads(b: Builder, a: str, w: str, y: str, g: str, ta: bool, tb: bool, alpha: float,
                  want: list) -> list:
    """Gradients of ``y = alpha * op(a) @ op(w)`` (op: optional swap of the last two axes),
    as FusedMatMuls that read the saved operands in place: no transpose is materialized."""
    ra, rb = b.rank(a), b.rank(w)
    if ra < 2 or rb < 2:
        raise ModelError("autodiff: MatMul with a 1-D operand is not supported")
    ga = gb = None
    if want[0]:
        ga = _mm(b, w, g, tb, True, alpha) if ta else _mm(b, g, w, False, not tb, alpha)
        ga = _unbroadcast_batch(b, ga, a, y)
    if want[1]:
        k, m = (b.static_dim(a, -1), b.static_dim(y, -1)) if rb == 2 and ra > 2 and not ta else (None, None)
        if k is not None and m is not None:  # a weight applied to every row: one GEMM over the flattened rows
            a2 = b.op("Reshape", [a, b.const([-1, k], np.int64)])
            g2 = b.op("Reshape", [g, b.const([-1, m], np.int64)])
            gb = b.op("Gemm", [g2, a2] if tb else [a2, g2], transA=1, alpha=float(alpha))
        else:
            gb = _mm(b, g, a, True, ta, alpha) if tb else _mm(b, a, g, not ta, False, alpha)
            gb = _unbroadcast_batch(b, gb, w, y)
    return [ga, gb]


def _unbroadcast_batch(b: Builder, g: str, x: str, y: str) -> str:
    """Sum a matmul operand's gradient over the batch axes along which ``x`` was broadcast."""
    xs, ys = [s[:-2] for s in b.shape(x)], [s[:-2] for s in b.shape(y)]
    if xs == ys:
        return g
    rx, ry = len(xs[0]), len(ys[0])
    axes = list(range(ry - rx)) + [i + ry - rx for i in range(rx) if all(s[i] == 1 for s in xs)
                                   and not all(s[i + ry - rx] == 1 for s in ys)]
    if not axes:
        return g
    g = b.op("ReduceSum", [g, b.const(axes, np.int64)], keepdims=1)
    return b.like(g, x) if rx != ry else g


@rule("MatMul")
def _matmul(b: Builder, n: Any, gy: list, want: list) -> list:
    return _matmul_grads(b, n.input[0], n.input[1], n.output[0], gy[0], False, False, 1.0, want)


@rule("FusedMatMul")
def _fused_matmul(b: Builder, n: Any, gy: list, want: list) -> list:
    if attr(n, "transBatchA", 0) or attr(n, "transBatchB", 0):
        raise ModelError("autodiff: FusedMatMul with batch transposes is not supported")
    return _matmul_grads(b, n.input[0], n.input[1], n.output[0], gy[0], bool(attr(n, "transA", 0)),
                         bool(attr(n, "transB", 0)), float(attr(n, "alpha", 1.0)), want)


@rule("MatMulNBits")
def _matmul_nbits(b: Builder, n: Any, gy: list, want: list) -> list:
    """``y = x @ dequant(W)^T`` on a block-quantized frozen ``W [N, K]``: the input gradient
    ``dy @ W`` dequantizes ``W`` again right before its MatMul (and only once ``dy`` exists), so
    no float32 copy of the weight lives from the forward pass to the backward. A ``compute
    int8`` graph (``accuracy_level`` 4, with the transposed copy ``W.qT``) runs it as an int8
    ``MatMulNBits`` on that copy instead."""
    from onnx import helper, numpy_helper

    from edgetune.workstation import quantize as quant

    if any(want[1:]):
        raise ModelError("autodiff: a quantized weight cannot be trained")
    if not want[0]:
        return [None] * len(n.input)
    if len(n.input) > 4 and any(n.input[4:]):
        raise ModelError("autodiff: MatMulNBits with g_idx or bias is not supported")
    k, nn = int(attr(n, "K")), int(attr(n, "N"))
    bits, block = int(attr(n, "bits", 4)), int(attr(n, "block_size"))
    level = int(attr(n, "accuracy_level", 0))
    # The copy is named after the weight's own tensors (W.q -> W.qT, ...): the symmetric half of a
    # split int4 product has no zero-point input of its own, its copy still has one.
    copy = list(tensor_names(weight_name(n.input[1]) or n.input[1], copy=True))
    if level == 4 and copy[0] in b.initializer_names():
        # compute int8: the input gradient as an int8 product on the transposed copy of W.
        return [b.op("MatMulNBits", [gy[0], *copy], domain="com.microsoft", K=nn, N=k, bits=8, block_size=block,
                     accuracy_level=4)] + [None] * (len(n.input) - 1)
    w = b.fresh("dequant")
    zero = n.input[3] if len(n.input) > 3 and n.input[3] else None  # none: the default, 2^(bits-1)
    nodes, consts = quant.dequant_ops(n.input[1], n.input[2], zero, w, nn, k, bits, block, after=gy[0])
    b.nodes.extend(nodes)
    b.inits.extend(numpy_helper.from_array(v, name) for name, v in consts.items())
    if not any(i.name == quant.RUNTIME_SHIFT for i in b.proto.graph.input):
        b.proto.graph.input.append(helper.make_tensor_value_info(quant.RUNTIME_SHIFT, 2, []))  # uint8 scalar
    return [b.op("MatMul", [gy[0], w])] + [None] * (len(n.input) - 1)
