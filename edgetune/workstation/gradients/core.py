"""The builder every gradient rule writes with, and the registry of rules by op type.

The exporter emits a small op set (MatMul, elementwise arithmetic, Softmax, reshapes,
slices, one Gather of labelled rows, SoftmaxCrossEntropyLoss). For each op the rules below
write its backward pass in ops that every current ONNX Runtime build runs (plus
``com.microsoft.FusedMatMul``, which the standard CPU build registers), so training needs
no onnxruntime-training package. Only nodes on a path from a trainable tensor to the loss
are differentiated; frozen weights get no gradient.

Broadcast axes are found by running the forward graph on two probe batches of different
shapes (a dimension that is 1 in both, where the output's is not, was broadcast): ONNX's
symbolic shape inference cannot tell that two unknown dimensions are the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from edgetune.formats.errors import ModelError

FLOATS = {1, 10, 11, 16}  # float, float16, double, bfloat16
MS = "com.microsoft"


@dataclass
class TrainingGraph:
    """The joint forward-backward graph and the names the runtime feeds and fetches."""

    model: Any                   # onnx.ModelProto
    params: list[str]            # trainable tensors, graph inputs in this order
    grads: list[str]             # their gradient outputs, same order
    initial: dict[str, np.ndarray]
    forward: Any = None          # the prepared forward graph (loss only), the params as inputs


def grad_name(param: str) -> str:
    return param + "_grad"


# -- the builder -------------------------------------------------------------------------

class Builder:
    """Emits backward nodes; ``shapes`` holds each tensor's probed shapes."""

    def __init__(self, proto: Any, shapes: dict[str, list[tuple]], types: dict[str, int],
                 fixed: dict[str, np.ndarray]) -> None:
        self.proto = proto
        self.fixed = fixed
        self.shapes = shapes
        self.types = types
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}
        self._init_names: set[str] | None = None

    def initializer_names(self) -> set[str]:
        if self._init_names is None:
            self._init_names = {i.name for i in self.proto.graph.initializer}
        return self._init_names

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"grad/{hint}_{self._n}"

    def op(self, op_type: str, inputs: Sequence[str], hint: str = "", domain: str = "", n_out: int = 1,
           **attrs: Any) -> Any:
        from onnx import helper

        outs = [self.fresh(hint or op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0] + "/node", domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.inits.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def rank(self, name: str) -> int:
        return len(self.shape(name)[0])

    def shape(self, name: str) -> list[tuple]:
        if name not in self.shapes:
            raise ModelError(f"autodiff: no probed shape for {name}")
        return self.shapes[name]

    def static_dim(self, name: str, axis: int) -> Optional[int]:
        dims = {s[axis] for s in self.shape(name)}
        return dims.pop() if len(dims) == 1 else None

    def unbroadcast(self, g: str, x: str, y: str) -> str:
        """Sum ``g`` (shaped like ``y``) over the axes that ``x`` was broadcast along."""
        xs, ys = self.shape(x), self.shape(y)
        rx, ry = len(xs[0]), len(ys[0])
        axes = list(range(ry - rx))
        for i in range(rx):
            j = i + ry - rx
            if all(sx[i] == 1 for sx in xs) and not all(sy[j] == 1 for sy in ys):
                axes.append(j)
            elif any(sx[i] != sy[j] for sx, sy in zip(xs, ys)):
                raise ModelError(f"autodiff: cannot tell how {x} broadcasts into {y} ({xs} -> {ys})")
        if not axes:
            return g
        keep = self.op("ReduceSum", [g, self.const(axes, np.int64)], keepdims=1)
        if ry == rx:
            return keep
        return self.op("Reshape", [keep, self.op("Shape", [x])])

    def like(self, g: str, x: str) -> str:
        return self.op("Reshape", [g, self.op("Shape", [x])])


def drop_dead(proto: Any) -> None:
    """Remove nodes none of whose outputs is read (repeated until none is left)."""
    g = proto.graph
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        keep = [n for n in g.node if any(o in used for o in n.output if o)]
        if len(keep) == len(g.node):
            return
        del g.node[:]
        g.node.extend(keep)


def attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def const_value(b: "Builder", name: str) -> Optional[np.ndarray]:
    """A tensor's value if it is a constant, or an integer tensor the same in every probe."""
    from onnx import numpy_helper

    if name in b.fixed:
        return b.fixed[name]
    proto = b.proto
    for i in proto.graph.initializer:
        if i.name == name:
            return None if is_external(i) else numpy_helper.to_array(i)
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(attr(n, "value"))
    return None


# -- gradient rules: (builder, node, output grads, wanted inputs) -> input grads ----------------

Rule = Callable[[Builder, Any, list, list], list]
RULES: dict[str, Rule] = {}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn
    return deco


def is_external(init: Any) -> bool:
    """Weights in an external data file are never small constants: not read while building."""
    return init.data_location == 1  # TensorProto.EXTERNAL
