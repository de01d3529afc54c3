"""Gradient rules of elementwise ops: arithmetic, activations, Where, Dropout."""
from __future__ import annotations

from typing import Any

import numpy as np

from edgetune.formats.errors import ModelError

from .core import Builder, attr, const_value, rule


@rule("Identity", "Cast")
def _identity(b: Builder, n: Any, gy: list, want: list) -> list:
    if n.op_type == "Cast" and b.types.get(n.input[0]) != b.types.get(n.output[0]):
        return [b.op("Cast", [gy[0]], to=b.types[n.input[0]])]
    return [gy[0]]


@rule("Add", "Sub")
def _add(b: Builder, n: Any, gy: list, want: list) -> list:
    y = n.output[0]
    ga = b.unbroadcast(gy[0], n.input[0], y) if want[0] else None
    gb = None
    if want[1]:
        g = gy[0] if n.op_type == "Add" else b.op("Neg", [gy[0]])
        gb = b.unbroadcast(g, n.input[1], y)
    return [ga, gb]


@rule("Mul")
def _mul(b: Builder, n: Any, gy: list, want: list) -> list:
    x0, x1, y = n.input[0], n.input[1], n.output[0]
    ga = b.unbroadcast(b.op("Mul", [gy[0], x1]), x0, y) if want[0] else None
    gb = b.unbroadcast(b.op("Mul", [gy[0], x0]), x1, y) if want[1] else None
    return [ga, gb]


@rule("Div")
def _div(b: Builder, n: Any, gy: list, want: list) -> list:
    x0, x1, y = n.input[0], n.input[1], n.output[0]
    ga = b.unbroadcast(b.op("Div", [gy[0], x1]), x0, y) if want[0] else None
    gb = None
    if want[1]:  # d(a/b)/db = -y/b
        gb = b.unbroadcast(b.op("Neg", [b.op("Div", [b.op("Mul", [gy[0], y]), x1])]), x1, y)
    return [ga, gb]


@rule("Neg")
def _neg(b: Builder, n: Any, gy: list, want: list) -> list:
    return [b.op("Neg", [gy[0]])]


@rule("Pow")
def _pow(b: Builder, n: Any, gy: list, want: list) -> list:
    if want[1]:
        raise ModelError("autodiff: gradient of Pow with respect to its exponent is not supported")
    e = const_value(b, n.input[1])
    if e is None or e.size != 1:
        raise ModelError("autodiff: Pow needs a constant scalar exponent")
    p = float(e.reshape(()))
    x = n.input[0]
    if p == 2.0:
        d = b.op("Mul", [x, b.const(2.0)])
    else:
        d = b.op("Mul", [b.op("Pow", [x, b.const(p - 1.0)]), b.const(p)])
    return [b.op("Mul", [gy[0], d]), None]


@rule("Sqrt")
def _sqrt(b: Builder, n: Any, gy: list, want: list) -> list:
    return [b.op("Div", [b.op("Mul", [gy[0], b.const(0.5)]), n.output[0]])]


@rule("Reciprocal")
def _reciprocal(b: Builder, n: Any, gy: list, want: list) -> list:
    y = n.output[0]
    return [b.op("Neg", [b.op("Mul", [gy[0], b.op("Mul", [y, y])])])]


@rule("Exp")
def _exp(b: Builder, n: Any, gy: list, want: list) -> list:
    return [b.op("Mul", [gy[0], n.output[0]])]


@rule("Log")
def _log(b: Builder, n: Any, gy: list, want: list) -> list:
    return [b.op("Div", [gy[0], n.input[0]])]


@rule("Tanh")
def _tanh(b: Builder, n: Any, gy: list, want: list) -> list:
    y = n.output[0]
    return [b.op("Mul", [gy[0], b.op("Sub", [b.const(1.0), b.op("Mul", [y, y])])])]


@rule("Sigmoid")
def _sigmoid(b: Builder, n: Any, gy: list, want: list) -> list:
    y = n.output[0]
    return [b.op("Mul", [gy[0], b.op("Mul", [y, b.op("Sub", [b.const(1.0), y])])])]


@rule("QuickGelu")
def _quick_gelu(b: Builder, n: Any, gy: list, want: list) -> list:
    """y = x * sigmoid(a x): dy/dx = s (1 + a x (1 - s)), with s recomputed from x."""
    x, alpha = n.input[0], float(attr(n, "alpha", 1.702))
    ax = x if alpha == 1.0 else b.op("Mul", [x, b.const(alpha)])
    sig = b.op("Sigmoid", [ax])
    d = b.op("Mul", [sig, b.op("Add", [b.const(1.0), b.op("Mul", [ax, b.op("Sub", [b.const(1.0), sig])])])])
    return [b.op("Mul", [gy[0], d])]


@rule("Where")
def _where(b: Builder, n: Any, gy: list, want: list) -> list:
    c, x0, x1, y = n.input[0], n.input[1], n.input[2], n.output[0]
    zero = b.const(0.0)
    ga = b.unbroadcast(b.op("Where", [c, gy[0], zero]), x0, y) if want[1] else None
    gb = b.unbroadcast(b.op("Where", [c, zero, gy[0]]), x1, y) if want[2] else None
    return [None, ga, gb]


@rule("Dropout")
def _dropout(b: Builder, n: Any, gy: list, want: list) -> list:
    ratio = const_value(b, n.input[1]) if len(n.input) > 1 and n.input[1] else np.array(0.5)
    training = const_value(b, n.input[2]) if len(n.input) > 2 and n.input[2] else np.array(False)
    if training is None or ratio is None:
        raise ModelError("autodiff: Dropout needs a constant ratio and training mode")
    if not bool(training) or float(ratio) == 0.0:
        return [gy[0], None, None]
    if len(n.output) < 2 or not n.output[1]:
        while len(n.output) < 2:
            n.output.append("")
        n.output[1] = n.output[0] + "/mask"
    scale = b.const(1.0 / (1.0 - float(ratio)))
    mask = b.op("Cast", [n.output[1]], to=1)
    return [b.op("Mul", [b.op("Mul", [gy[0], mask]), scale]), None, None]
