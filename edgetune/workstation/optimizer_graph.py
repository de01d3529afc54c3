"""``optimizer.onnx``: the learning-rate schedule and the AdamW update of every adapter tensor as one
ONNX graph, so that any ONNX Runtime binding (C, C++, C#, Java, JavaScript, Python) takes an
optimizer step without edgetune's Python. The Python trainer runs the same graph.

Inputs: float32 scalars ``step`` (the 1-based number of the step being taken), ``base_lr``,
``warmup_steps``, ``total_steps``, ``weight_decay``; an int64 scalar ``schedule`` (0 constant,
1 linear, 2 cosine); per adapter tensor ``P``: ``P``, ``P_grad``, ``exp_avg/P``, ``exp_avg_sq/P``.
Outputs: ``lr`` and, per tensor, ``P/updated``, ``exp_avg/P/updated``, ``exp_avg_sq/P/updated``.

With ``fused=True`` the per-tensor updates are one ``AdamW`` node of the ``edgetune`` domain
(the fused-kernel library's op, ``cpp_ext/ort_ops``), which computes every element with the same
float32 operations in the same order, so both forms give the same bits; the schedule stays plain.

The rule is PyTorch's ``torch.optim.AdamW`` (decoupled weight decay, bias correction), as
``edgetune.device.optim.AdamW`` computes it in numpy; the schedule is
``edgetune.device.trainer.lr_at``'s (linear warmup, then constant, linear or cosine decay).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

SCHEDULES = {"constant": 0, "linear": 1, "cosine": 2}
BETAS = (0.9, 0.999)
EPS = 1e-8


def updated(name: str) -> str:
    return name + "/updated"


class _G:
    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def op(self, op: str, inputs: Sequence[str], **attrs: Any) -> str:
        from onnx import helper

        self._n += 1
        out = f"opt/{op}_{self._n}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value: float, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        self._n += 1
        name = f"opt/c_{self._n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name


def _lr(g: _G) -> str:
    """lr_at(step - 1): linear warmup, then constant, linear or cosine decay."""
    one, zero = g.const(1.0), g.const(0.0)
    s0 = g.op("Sub", ["step", one])  # the 0-based step
    warm = g.op("Div", [g.op("Mul", ["base_lr", "step"]), g.op("Max", ["warmup_steps", one])])
    in_warmup = g.op("And", [g.op("Greater", ["warmup_steps", zero]), g.op("Less", [s0, "warmup_steps"])])
    span = g.op("Max", [one, g.op("Sub", ["total_steps", "warmup_steps"])])
    frac = g.op("Min", [one, g.op("Div", [g.op("Sub", [s0, "warmup_steps"]), span])])
    linear = g.op("Mul", ["base_lr", g.op("Sub", [one, frac])])
    cosine = g.op("Mul", ["base_lr", g.op("Mul", [g.const(0.5), g.op("Add", [
        one, g.op("Cos", [g.op("Mul", [g.const(math.pi), frac])])])])])
    kind = g.op("Cast", ["schedule"], to=1)
    decayed = g.op("Where", [g.op("Equal", [kind, g.const(2.0)]), cosine, linear])
    constant = g.op("Or", [g.op("Equal", [kind, zero]), g.op("LessOrEqual", ["total_steps", "warmup_steps"])])
    after = g.op("Where", [constant, "base_lr", decayed])
    return g.op("Where", [in_warmup, warm, after])


def _one_minus_pow(g: _G, beta: float, step: str) -> str:
    """1 - beta^step in float32 to float32's precision. Computed plainly, 1 - 0.999^t at small t
    loses five digits (0.999 is not exact in float32), biasing every update alike; with
    x = t ln(beta) it is -expm1(x): a Taylor series where |x| < 0.5, 1 - exp(x) beyond."""
    x = g.op("Mul", [step, g.const(math.log(beta))])
    series = g.const(1.0 / math.factorial(9))
    for k in range(8, 0, -1):  # x (1 + x/2 (1 + x/3 (...))) as Horner: sum of x^k / k!
        series = g.op("Add", [g.const(1.0 / math.factorial(k)), g.op("Mul", [x, series])])
    expm1 = g.op("Mul", [x, series])
    plain = g.op("Sub", [g.op("Exp", [x]), g.const(1.0)])
    small = g.op("Less", [g.op("Abs", [x]), g.const(0.5)])
    return g.op("Neg", [g.op("Where", [small, expm1, plain])])


def build(params: Sequence[str], shapes: dict[str, list[int]], fused: bool = False) -> Any:
    """The optimizer graph for the adapter tensors ``params`` of the given shapes; ``fused``: the
    updates as one ``edgetune.AdamW`` node (needs the kernel library)."""
    from onnx import TensorProto, helper

    from edgetune.workstation.gradients.fused import DOMAIN

    g = _G()
    b1, b2 = BETAS
    # Float32 throughout (every ONNX Runtime build has these kernels, down to mobile ones).
    lr = _lr(g)
    g.nodes.append(helper.make_node("Identity", [lr], ["lr"], name="opt/lr"))
    one = g.const(1.0)
    bc1 = _one_minus_pow(g, b1, "step")
    bc2_sqrt = g.op("Sqrt", [_one_minus_pow(g, b2, "step")])
    decay = g.op("Sub", [one, g.op("Mul", [lr, "weight_decay"])])
    step_size = g.op("Div", [lr, bc1])
    if not fused:
        c_b1, c_1b1, c_b2, c_1b2, c_eps = (g.const(x) for x in (b1, 1.0 - b1, b2, 1.0 - b2, EPS))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in
              ("step", "base_lr", "warmup_steps", "total_steps", "weight_decay")]
    inputs.append(helper.make_tensor_value_info("schedule", TensorProto.INT64, []))
    outputs = [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [])]
    fused_in: list[str] = []
    fused_out: list[str] = []
    for p in params:
        grad, m, v = p + "_grad", "exp_avg/" + p, "exp_avg_sq/" + p
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[p]) for n in (p, grad, m, v)]
        if fused:
            fused_in += [p, grad, m, v]
            fused_out += [updated(p), updated(m), updated(v)]
            outputs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes[p]) for o in fused_out[-3:]]
            continue
        m1 = g.op("Add", [g.op("Mul", [m, c_b1]), g.op("Mul", [grad, c_1b1])])
        v1 = g.op("Add", [g.op("Mul", [v, c_b2]), g.op("Mul", [g.op("Mul", [grad, grad]), c_1b2])])
        denom = g.op("Add", [g.op("Div", [g.op("Sqrt", [v1]), bc2_sqrt]), c_eps])
        p1 = g.op("Sub", [g.op("Mul", [p, decay]), g.op("Mul", [step_size, g.op("Div", [m1, denom])])])
        for src, out in ((p1, updated(p)), (m1, updated(m)), (v1, updated(v))):
            g.nodes.append(helper.make_node("Identity", [src], [out], name=out))
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, shapes[p]))
    opsets = [helper.make_opsetid("", 17)]
    if fused:
        # The constants as the plain graph rounds them (1 - beta from float64, then float32).
        g.nodes.append(helper.make_node("AdamW", [step_size, decay, bc2_sqrt] + fused_in, fused_out, name="opt/AdamW",
                                        domain=DOMAIN, beta1=b1, one_minus_beta1=1.0 - b1, beta2=b2,
                                        one_minus_beta2=1.0 - b2, epsilon=EPS))
        opsets.append(helper.make_opsetid(DOMAIN, 1))
    graph = helper.make_graph(g.nodes, "edgetune_adamw", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgetune")
    model.ir_version = 8
    return model
