"""Reverse-mode differentiation of exported ONNX graphs into standard ONNX ops (workstation side).

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

from .errors import ModelError

FLOATS = {1, 10, 11, 16}  # float, float16, double, bfloat16
MS = "com.microsoft"


@dataclass
class TrainingGraph:
    """The joint forward-backward graph and the names the runtime feeds and fetches."""

    model: Any                   # onnx.ModelProto
    params: list[str]            # trainable tensors, graph inputs in this order
    grads: list[str]             # their gradient outputs, same order
    initial: dict[str, np.ndarray]


def grad_name(param: str) -> str:
    return param + "_grad"


# -- graph preparation ------------------------------------------------------------------

def _swaps_last_two(perm: list[int], rank: int | None) -> bool:
    if not perm:
        return rank == 2
    r = len(perm)
    return perm == list(range(r - 2)) + [r - 1, r - 2]


def _external(init: Any) -> bool:
    """Weights in an external data file are never small constants: not read while building."""
    return init.data_location == 1  # TensorProto.EXTERNAL


def _scalar(g: Any, name: str) -> float | None:
    from onnx import numpy_helper

    for i in g.initializer:
        if i.name == name:
            if _external(i):
                return None
            v = numpy_helper.to_array(i)
            return float(v.reshape(())) if v.size == 1 and v.dtype.kind == "f" else None
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name:
            v = numpy_helper.to_array(_attr(n, "value"))
            return float(v.reshape(())) if v.size == 1 and v.dtype.kind == "f" else None
    return None


def fuse_matmuls(proto: Any) -> int:
    """Fold what feeds and follows a MatMul into one ``FusedMatMul`` before differentiating:
    ``MatMul(X, Transpose(W))`` (last two axes swapped) becomes ``transB=1`` and a following
    ``Mul`` by a constant scalar (attention's 1/sqrt(d), LoRA's scale) becomes ``alpha``. No
    transposed copy of a weight is built, and neither pass costs an elementwise sweep forward
    or backward."""
    from onnx import helper

    g = proto.graph
    ranks = {i.name: len(i.dims) for i in g.initializer}
    ranks.update({i.name: len(i.type.tensor_type.shape.dim) for i in g.input})
    producers = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    drop: set[int] = set()
    count = 0
    for idx, node in enumerate(g.node):
        if node.op_type != "MatMul":
            continue
        t = producers.get(node.input[1])
        perm = list(_attr(t, "perm") or []) if t is not None and t.op_type == "Transpose" else None
        name = node.name or f"fused_{idx}"
        if perm is not None and uses.get(t.output[0], 0) == 1 and _swaps_last_two(perm, ranks.get(t.input[0])):
            g.node[idx].CopyFrom(helper.make_node("FusedMatMul", [node.input[0], t.input[0]], list(node.output),
                                                  name=name, domain=MS, transA=0, transB=1, alpha=1.0))
            drop.add(id(t))
            count += 1
        elif _scaled_after(g, node, uses):
            g.node[idx].CopyFrom(helper.make_node("FusedMatMul", list(node.input), list(node.output), name=name,
                                                  domain=MS, transA=0, transB=0, alpha=1.0))
            count += 1
    for node in g.node:
        if node.op_type != "Mul" or id(node) in drop:
            continue
        for k in (0, 1):
            mm, c = producers.get(node.input[k]), _scalar(g, node.input[1 - k])
            if mm is None or c is None or mm.op_type != "FusedMatMul" or uses.get(node.input[k], 0) != 1:
                continue
            alpha = next(a for a in mm.attribute if a.name == "alpha")
            alpha.f = alpha.f * c
            mm.output[0] = node.output[0]
            drop.add(id(node))
            break
    count += _fuse_silu(g, producers, uses, drop)
    keep = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(keep)
    if count and not any(o.domain == MS for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS, 1))
    return count


def drop_noop_casts(proto: Any, types: dict[str, int]) -> int:
    """Remove ``Cast`` nodes to the type their input already has (transformers casts attention
    probabilities and LoRA inputs to the dtype they have): each one is a copy forward and a second
    saved copy of the same activation for the backward pass. Readers take the input instead."""
    g = proto.graph
    outputs = {o.name for o in g.output}
    alias: dict[str, str] = {}
    keep = []
    for n in g.node:
        n.input[:] = [alias.get(i, i) for i in n.input]
        if (n.op_type == "Cast" and n.output[0] not in outputs and types.get(n.input[0]) is not None
                and int(_attr(n, "to", -1)) == types.get(n.input[0])):
            alias[n.output[0]] = n.input[0]
            continue
        keep.append(n)
    if alias:
        del g.node[:]
        g.node.extend(keep)
    return len(alias)


def _scaled_after(g: Any, node: Any, uses: dict[str, int]) -> bool:
    """Whether the only reader of ``node``'s output multiplies it by a constant scalar."""
    if uses.get(node.output[0], 0) != 1:
        return False
    for n in g.node:
        if n.op_type == "Mul" and node.output[0] in n.input:
            other = n.input[1] if n.input[0] == node.output[0] else n.input[0]
            return _scalar(g, other) is not None
    return False


def _fuse_silu(g: Any, producers: dict[str, Any], uses: dict[str, int], drop: set[int]) -> int:
    """``Mul(x, Sigmoid(x))`` (SiLU) becomes ``QuickGelu(x, alpha=1)``: one kernel forward, and
    the backward recomputes the sigmoid from x instead of keeping a copy per MLP layer."""
    from onnx import helper

    count = 0
    for idx, node in enumerate(g.node):
        if node.op_type != "Mul" or id(node) in drop:
            continue
        for k in (0, 1):
            sig = producers.get(node.input[k])
            if (sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == node.input[1 - k]
                    and uses.get(sig.output[0], 0) == 1):
                g.node[idx].CopyFrom(helper.make_node("QuickGelu", [sig.input[0]], list(node.output),
                                                      name=node.name or f"silu_{idx}", domain=MS, alpha=1.0))
                drop.add(id(sig))
                count += 1
                break
    return count


def elem_types(proto: Any) -> dict[str, int]:
    """Element type of every tensor, by ONNX shape inference; ONNX cannot infer contrib ops,
    so their outputs take their first input's type (true of FusedMatMul) and inference reruns."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    # A quantized MatMul stands in as a standard MatMul on a float [K, N] input, so inference
    # carries types through the chain of them (one or more per layer) in one pass.
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == MS:
            k, n = (int(_attr(node, key)) for key in ("K", "N"))
            stub = f"{node.output[0]}/stub"
            model.graph.input.append(helper.make_tensor_value_info(stub, onnx.TensorProto.FLOAT, [k, n]))
            node.CopyFrom(helper.make_node("MatMul", [node.input[0], stub], list(node.output), name=node.name))
    for _ in range(8):  # each pass types the contrib ops whose inputs the previous one reached
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type
                 for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
        types.update({i.name: i.data_type for i in proto.graph.initializer})
        missing = [(o, types[n.input[0]]) for n in proto.graph.node if n.domain == MS and n.input
                   and n.input[0] in types for o in n.output if not types.get(o)]
        if not missing:
            break
        model.graph.value_info.extend(helper.make_tensor_value_info(o, t, None) for o, t in missing)
    return types


def probe_shapes(proto: Any, feeds: Sequence[dict[str, np.ndarray]], types: dict[str, int],
                 base_dir: Any = None) -> tuple[dict[str, list[tuple]], dict[str, np.ndarray]]:
    """Run the forward graph on each feed with every intermediate exposed; return the
    concrete shapes of each tensor (one per feed) and the small integer tensors whose value
    is the same for every feed (slice bounds computed from static dimensions). A graph with
    external weights is run from a file in ``base_dir``, where its data file lies."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    have = {o.name for o in probe.graph.output}
    names = []
    for node in probe.graph.node:
        for o in node.output:
            if o and o not in have and types.get(o, 0):
                probe.graph.output.append(helper.make_tensor_value_info(o, types[o], None))
                names.append(o)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.disable_prepacking", "1")  # weights stay memory-mapped
    if base_dir is None:
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    else:
        from pathlib import Path

        path = Path(base_dir) / "_probe.onnx"
        onnx.save(probe, str(path))
        try:
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        finally:
            path.unlink()
    outs = [o.name for o in sess.get_outputs()]
    shapes: dict[str, list[tuple]] = {}
    seen: dict[str, list[np.ndarray]] = {}
    for feed in feeds:
        for name, val in zip(outs, sess.run(outs, feed)):
            shapes.setdefault(name, []).append(tuple(np.shape(val)))
            if val.dtype.kind == "i" and val.size <= 16:
                seen.setdefault(name, []).append(val)
        for name, val in feed.items():
            shapes.setdefault(name, []).append(tuple(np.shape(val)))
    for init in proto.graph.initializer:
        shapes[init.name] = [tuple(init.dims)] * len(feeds)
    fixed = {k: v[0] for k, v in seen.items()
             if len(v) == len(feeds) and all(x.shape == v[0].shape and (x == v[0]).all() for x in v)}
    return shapes, fixed


# -- the builder -------------------------------------------------------------------------

class _Builder:
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


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _const_value(b: "_Builder", name: str) -> Optional[np.ndarray]:
    """A tensor's value if it is a constant, or an integer tensor the same in every probe."""
    from onnx import numpy_helper

    if name in b.fixed:
        return b.fixed[name]
    proto = b.proto
    for i in proto.graph.initializer:
        if i.name == name:
            return None if _external(i) else numpy_helper.to_array(i)
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(_attr(n, "value"))
    return None


# -- gradient rules: (builder, node, output grads, wanted inputs) -> input grads ----------------

Rule = Callable[[_Builder, Any, list, list], list]
RULES: dict[str, Rule] = {}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn
    return deco


@rule("Identity", "Cast")
def _identity(b: _Builder, n: Any, gy: list, want: list) -> list:
    if n.op_type == "Cast" and b.types.get(n.input[0]) != b.types.get(n.output[0]):
        return [b.op("Cast", [gy[0]], to=b.types[n.input[0]])]
    return [gy[0]]


@rule("Add", "Sub")
def _add(b: _Builder, n: Any, gy: list, want: list) -> list:
    y = n.output[0]
    ga = b.unbroadcast(gy[0], n.input[0], y) if want[0] else None
    gb = None
    if want[1]:
        g = gy[0] if n.op_type == "Add" else b.op("Neg", [gy[0]])
        gb = b.unbroadcast(g, n.input[1], y)
    return [ga, gb]


@rule("Mul")
def _mul(b: _Builder, n: Any, gy: list, want: list) -> list:
    x0, x1, y = n.input[0], n.input[1], n.output[0]
    ga = b.unbroadcast(b.op("Mul", [gy[0], x1]), x0, y) if want[0] else None
    gb = b.unbroadcast(b.op("Mul", [gy[0], x0]), x1, y) if want[1] else None
    return [ga, gb]


@rule("Div")
def _div(b: _Builder, n: Any, gy: list, want: list) -> list:
    x0, x1, y = n.input[0], n.input[1], n.output[0]
    ga = b.unbroadcast(b.op("Div", [gy[0], x1]), x0, y) if want[0] else None
    gb = None
    if want[1]:  # d(a/b)/db = -y/b
        gb = b.unbroadcast(b.op("Neg", [b.op("Div", [b.op("Mul", [gy[0], y]), x1])]), x1, y)
    return [ga, gb]


@rule("Neg")
def _neg(b: _Builder, n: Any, gy: list, want: list) -> list:
    return [b.op("Neg", [gy[0]])]


@rule("Pow")
def _pow(b: _Builder, n: Any, gy: list, want: list) -> list:
    if want[1]:
        raise ModelError("autodiff: gradient of Pow with respect to its exponent is not supported")
    e = _const_value(b, n.input[1])
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
def _sqrt(b: _Builder, n: Any, gy: list, want: list) -> list:
    return [b.op("Div", [b.op("Mul", [gy[0], b.const(0.5)]), n.output[0]])]


@rule("Reciprocal")
def _reciprocal(b: _Builder, n: Any, gy: list, want: list) -> list:
    y = n.output[0]
    return [b.op("Neg", [b.op("Mul", [gy[0], b.op("Mul", [y, y])])])]


@rule("Exp")
def _exp(b: _Builder, n: Any, gy: list, want: list) -> list:
    return [b.op("Mul", [gy[0], n.output[0]])]


@rule("Log")
def _log(b: _Builder, n: Any, gy: list, want: list) -> list:
    return [b.op("Div", [gy[0], n.input[0]])]


@rule("Tanh")
def _tanh(b: _Builder, n: Any, gy: list, want: list) -> list:
    y = n.output[0]
    return [b.op("Mul", [gy[0], b.op("Sub", [b.const(1.0), b.op("Mul", [y, y])])])]


@rule("Sigmoid")
def _sigmoid(b: _Builder, n: Any, gy: list, want: list) -> list:
    y = n.output[0]
    return [b.op("Mul", [gy[0], b.op("Mul", [y, b.op("Sub", [b.const(1.0), y])])])]


@rule("QuickGelu")
def _quick_gelu(b: _Builder, n: Any, gy: list, want: list) -> list:
    """y = x * sigmoid(a x): dy/dx = s (1 + a x (1 - s)), with s recomputed from x."""
    x, alpha = n.input[0], float(_attr(n, "alpha", 1.702))
    ax = x if alpha == 1.0 else b.op("Mul", [x, b.const(alpha)])
    sig = b.op("Sigmoid", [ax])
    d = b.op("Mul", [sig, b.op("Add", [b.const(1.0), b.op("Mul", [ax, b.op("Sub", [b.const(1.0), sig])])])])
    return [b.op("Mul", [gy[0], d])]


@rule("Softmax")
def _softmax(b: _Builder, n: Any, gy: list, want: list) -> list:
    y = n.output[0]
    axis = _attr(n, "axis", -1)
    gyy = b.op("Mul", [gy[0], y])
    s = b.op("ReduceSum", [gyy, b.const([axis], np.int64)], keepdims=1)
    return [b.op("Sub", [gyy, b.op("Mul", [y, s])])]


@rule("ReduceMean", "ReduceSum")
def _reduce(b: _Builder, n: Any, gy: list, want: list) -> list:
    x = n.input[0]
    axes = _attr(n, "axes")
    if axes is None and len(n.input) > 1 and n.input[1]:
        v = _const_value(b, n.input[1])
        if v is None:
            raise ModelError(f"autodiff: {n.op_type} needs constant axes")
        axes = v.tolist()
    r = b.rank(x)
    axes = sorted(a % r for a in (axes if axes is not None else range(r)))
    g = gy[0]
    if not _attr(n, "keepdims", 1):
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


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b: _Builder, n: Any, gy: list, want: list) -> list:
    return [b.like(gy[0], n.input[0])] + [None] * (len(n.input) - 1)


@rule("Expand")
def _expand(b: _Builder, n: Any, gy: list, want: list) -> list:
    return [b.unbroadcast(gy[0], n.input[0], n.output[0]), None]


@rule("Transpose")
def _transpose(b: _Builder, n: Any, gy: list, want: list) -> list:
    perm = _attr(n, "perm") or list(reversed(range(b.rank(n.input[0]))))
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return [b.op("Transpose", [gy[0]], perm=inv)]


@rule("Concat")
def _concat(b: _Builder, n: Any, gy: list, want: list) -> list:
    axis = _attr(n, "axis") % b.rank(n.output[0])
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
def _slice(b: _Builder, n: Any, gy: list, want: list) -> list:
    x = n.input[0]
    r = b.rank(x)
    vals = [_const_value(b, i) if len(n.input) > k and n.input[k] else None for k, i in
            enumerate(list(n.input[1:]) + [""] * (4 - len(n.input[1:])), start=1)]
    starts, ends, axes, steps = vals
    if starts is None or ends is None:
        raise ModelError("autodiff: Slice needs constant starts and ends")
    axes = list(range(len(starts))) if axes is None else [a % r for a in axes.tolist()]
    if steps is not None and any(s != 1 for s in steps.tolist()):
        raise ModelError("autodiff: Slice with steps other than 1 is not supported")
    pads = [0] * (2 * r)
    for a, s, e in zip(axes, starts.tolist(), ends.tolist()):
        dim = b.static_dim(x, a)
        if dim is None:
            raise ModelError(f"autodiff: Slice along a dynamic axis of {x} is not supported")
        s = min(max(s + dim if s < 0 else s, 0), dim)
        e = min(max(e + dim if e < 0 else e, 0), dim)
        pads[a], pads[r + a] = s, dim - e
    return [b.op("Pad", [gy[0], b.const(pads, np.int64)], mode="constant")] + [None] * (len(n.input) - 1)


@rule("Gather")
def _gather(b: _Builder, n: Any, gy: list, want: list) -> list:
    """Rows gathered along axis 0 scatter back through a one-hot GEMM: repeated indices add
    up, and every provider runs it (OpenVINO refuses ScatterND with reduction='add')."""
    if _attr(n, "axis", 0) != 0:
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


@rule("Where")
def _where(b: _Builder, n: Any, gy: list, want: list) -> list:
    c, x0, x1, y = n.input[0], n.input[1], n.input[2], n.output[0]
    zero = b.const(0.0)
    ga = b.unbroadcast(b.op("Where", [c, gy[0], zero]), x0, y) if want[1] else None
    gb = b.unbroadcast(b.op("Where", [c, zero, gy[0]]), x1, y) if want[2] else None
    return [None, ga, gb]


@rule("Dropout")
def _dropout(b: _Builder, n: Any, gy: list, want: list) -> list:
    ratio = _const_value(b, n.input[1]) if len(n.input) > 1 and n.input[1] else np.array(0.5)
    training = _const_value(b, n.input[2]) if len(n.input) > 2 and n.input[2] else np.array(False)
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


def _mm(b: _Builder, x: str, y: str, ta: bool, tb: bool, alpha: float) -> str:
    if not ta and not tb and alpha == 1.0:  # ORT's plain MatMul kernel, where nothing is folded
        return b.op("MatMul", [x, y])
    return b.op("FusedMatMul", [x, y], domain=MS, transA=int(ta), transB=int(tb), alpha=float(alpha))


def _matmul_grads(b: _Builder, a: str, w: str, y: str, g: str, ta: bool, tb: bool, alpha: float,
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
        if rb == 2 and ra > 2 and not ta:  # a weight applied to every row: one GEMM over the flattened rows
            k, m = b.static_dim(a, -1), b.static_dim(y, -1)
            a2 = b.op("Reshape", [a, b.const([-1, k], np.int64)])
            g2 = b.op("Reshape", [g, b.const([-1, m], np.int64)])
            gb = b.op("Gemm", [g2, a2] if tb else [a2, g2], transA=1, alpha=float(alpha))
        else:
            gb = _mm(b, g, a, True, ta, alpha) if tb else _mm(b, a, g, not ta, False, alpha)
            gb = _unbroadcast_batch(b, gb, w, y)
    return [ga, gb]


def _unbroadcast_batch(b: _Builder, g: str, x: str, y: str) -> str:
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
def _matmul(b: _Builder, n: Any, gy: list, want: list) -> list:
    return _matmul_grads(b, n.input[0], n.input[1], n.output[0], gy[0], False, False, 1.0, want)


@rule("FusedMatMul")
def _fused_matmul(b: _Builder, n: Any, gy: list, want: list) -> list:
    if _attr(n, "transBatchA", 0) or _attr(n, "transBatchB", 0):
        raise ModelError("autodiff: FusedMatMul with batch transposes is not supported")
    return _matmul_grads(b, n.input[0], n.input[1], n.output[0], gy[0], bool(_attr(n, "transA", 0)),
                         bool(_attr(n, "transB", 0)), float(_attr(n, "alpha", 1.0)), want)


@rule("MatMulNBits")
def _matmul_nbits(b: _Builder, n: Any, gy: list, want: list) -> list:
    """``y = x @ dequant(W)^T`` on a block-quantized frozen ``W [N, K]``: the input gradient
    ``dy @ W`` dequantizes ``W`` again right before its MatMul (and only once ``dy`` exists), so
    no float32 copy of the weight lives from the forward pass to the backward."""
    from onnx import helper, numpy_helper

    from . import quant

    if any(want[1:]):
        raise ModelError("autodiff: a quantized weight cannot be trained")
    if not want[0]:
        return [None] * len(n.input)
    if len(n.input) > 4 and any(n.input[4:]):
        raise ModelError("autodiff: MatMulNBits with g_idx or bias is not supported")
    k, nn = int(_attr(n, "K")), int(_attr(n, "N"))
    bits, block = int(_attr(n, "bits", 4)), int(_attr(n, "block_size"))
    w = b.fresh("dequant")
    zero = n.input[3] if len(n.input) > 3 and n.input[3] else None  # none: the default, 2^(bits-1)
    nodes, consts = quant.dequant_ops(n.input[1], n.input[2], zero, w, nn, k, bits, block, after=gy[0])
    b.nodes.extend(nodes)
    b.inits.extend(numpy_helper.from_array(v, name) for name, v in consts.items())
    if not any(i.name == quant.RUNTIME_SHIFT for i in b.proto.graph.input):
        b.proto.graph.input.append(helper.make_tensor_value_info(quant.RUNTIME_SHIFT, 2, []))  # uint8 scalar
    return [b.op("MatMul", [gy[0], w]), None, None, None]


@rule("SoftmaxCrossEntropyLoss")
def _sce(b: _Builder, n: Any, gy: list, want: list) -> list:
    scores, labels = n.input[0], n.input[1]
    if len(n.input) > 2 and n.input[2]:
        raise ModelError("autodiff: SoftmaxCrossEntropyLoss with class weights is not supported")
    if b.rank(scores) != 2:
        raise ModelError("autodiff: SoftmaxCrossEntropyLoss is supported on [N, C] scores only")
    if len(n.output) < 2:
        n.output.append(n.output[0] + "/log_prob")
    # softmax - onehot(labels): 1 is taken off each row's label entry in place (ScatterElements on
    # the softmax, whose buffer is dead after it), not by a [N, vocab] one-hot and a subtraction.
    ignore = _attr(n, "ignore_index")
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
    reduction = _attr(n, "reduction", b"mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    g = gy[0]
    if reduction == "mean":
        count = b.op("ReduceSum", [valid], keepdims=0) if valid else b.op(
            "Cast", [b.op("Gather", [b.op("Shape", [scores]), b.const(0, np.int64)], axis=0)], to=1)
        g = b.op("Div", [g, count])
    if valid is not None:
        g = b.op("Mul", [valid, g])
    if reduction == "none" or valid is not None:
        g = b.op("Unsqueeze", [g, b.const([-1], np.int64)])
    return [b.op("Mul", [d, g]), None]


# -- driver ------------------------------------------------------------------------------

def _path(proto: Any, params: list[str], loss: str, types: dict[str, int]) -> tuple[list[Any], set[str]]:
    """Nodes on a path from ``params`` to ``loss`` and the tensors that need a gradient."""
    live = set(params)
    active = []
    for node in proto.graph.node:
        if any(i in live for i in node.input):
            outs = [o for o in node.output if o and types.get(o) in FLOATS]
            if outs:
                live.update(outs)
                active.append(node)
    needed = {loss}
    path = []
    for node in reversed(active):
        if any(o in needed for o in node.output):
            path.append(node)
            needed.update(i for i in node.input if i in live)
    return path, needed


def differentiate(proto: Any, params: list[str], loss: str, shapes: dict[str, list[tuple]],
                  types: dict[str, int], fixed: Optional[dict[str, np.ndarray]] = None) -> list[str]:
    """Append the backward pass of ``loss`` to ``proto``; returns the gradient output names."""
    from onnx import helper

    path, needed = _path(proto, params, loss, types)
    b = _Builder(proto, shapes, types, fixed or {})
    grads: dict[str, list[str]] = {loss: [b.const(1.0)]}

    def total(name: str) -> Optional[str]:
        parts = grads.get(name)
        if not parts:
            return None
        if len(parts) > 1:
            grads[name] = [b.op("Sum", parts)]
        return grads[name][0]

    for node in path:
        fn = RULES.get(node.op_type)
        if fn is None:
            raise ModelError(f"autodiff: no gradient rule for {node.op_type} (node {node.name}); "
                             f"supported: {', '.join(sorted(RULES))}")
        gy = [total(o) for o in node.output]
        if gy[0] is None:
            gy[0] = b.op("ConstantOfShape", [b.op("Shape", [node.output[0]])])
        want = [i in needed and i != "" for i in node.input]
        for i, gi in zip(node.input, fn(b, node, gy, want)):
            if gi is not None and i in needed:
                grads.setdefault(i, []).append(gi)
    outs = []
    for p in params:
        g = total(p)
        if g is None:
            raise ModelError(f"autodiff: {p} does not reach the loss")
        b.nodes.append(helper.make_node("Identity", [g], [grad_name(p)], name=grad_name(p) + "/node"))
        outs.append(grad_name(p))
    proto.graph.node.extend(b.nodes)
    proto.graph.initializer.extend(b.inits)
    for p in params:
        proto.graph.output.append(helper.make_tensor_value_info(grad_name(p), types.get(p, 1), list(shapes[p][0])))
    return outs


def drop_unused_initializers(proto: Any) -> None:
    """Constants that fusion left without a reader (ORT warns about each at load)."""
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    nodes = [n for n in proto.graph.node if n.op_type != "Constant" or n.output[0] in used]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    keep = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def params_to_inputs(proto: Any, params: list[str], base_dir: Any = None) -> dict[str, np.ndarray]:
    """Move the trainable initializers to graph inputs; return their initial values."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    missing = [p for p in params if p not in inits]
    if missing:
        raise ModelError(f"trainable weights not found in the exported graph: {missing[:3]}")
    where = {} if base_dir is None else {"base_dir": str(base_dir)}
    values = {p: numpy_helper.to_array(inits[p], **where).copy() for p in params}
    keep = [i for i in proto.graph.initializer if i.name not in set(params)]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    for p in params:
        proto.graph.input.append(helper.make_tensor_value_info(p, inits[p].data_type, list(inits[p].dims)))
    return values


def build(proto: Any, params: list[str], loss: str, feeds: Sequence[dict[str, np.ndarray]],
          base_dir: Any = None, recompute: bool = False) -> TrainingGraph:
    """The training graph of ``proto``: ``loss`` and the gradient of each of ``params``.
    ``base_dir`` is where the external data of ``proto``'s weights lies, if it has any. With
    ``recompute``, each decoder layer's activations are recomputed in the backward pass
    (:func:`recompute_layers`)."""
    import onnx

    types = elem_types(proto)
    drop_noop_casts(proto, types)
    fuse_matmuls(proto)
    drop_unused_initializers(proto)
    shapes, fixed = probe_shapes(proto, feeds, types, base_dir)
    initial = params_to_inputs(proto, params, base_dir)
    train = onnx.ModelProto()
    train.CopyFrom(proto)
    n_forward = len(train.graph.node)
    grads = differentiate(train, params, loss, shapes, types, fixed)
    n_forward = hoist_shapes(train, n_forward)
    if recompute:
        recompute_layers(train, n_forward, types)
    else:
        recompute_cheap(train, n_forward, types, shapes)
    return TrainingGraph(train, list(params), grads, initial)


_LAYER = __import__("re").compile(r"layers\.(\d+)[/.]")


def _layer(node: Any) -> Optional[int]:
    m = _LAYER.search(node.name)
    return int(m.group(1)) if m else None


def hoist_shapes(proto: Any, n_forward: int) -> int:
    """Move the backward pass's ``Shape`` nodes of forward tensors to the end of the forward
    pass: a ``Shape`` read is no reason to keep a whole activation alive until the backward pass
    reaches it (with ONNX Runtime's priority-based order, shape nodes run as soon as they can).
    Returns the new number of forward nodes."""
    g = proto.graph
    nodes = list(g.node)
    fwd, bwd = nodes[:n_forward], nodes[n_forward:]
    known = {o for n in fwd for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
    moved = [n for n in bwd if n.op_type == "Shape" and n.input[0] in known]
    if moved:
        ids = {id(n) for n in moved}
        del g.node[:]
        g.node.extend(fwd + moved + [n for n in bwd if id(n) not in ids])
    return n_forward + len(moved)


# Forward ops cheap enough to run again in the backward pass instead of keeping their output.
_CHEAP = {"Softmax", "QuickGelu", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Add", "Sub", "Mul", "Div",
          "Where", "Neg", "Cast", "MatMul", "FusedMatMul"}


def recompute_cheap(proto: Any, n_forward: int, types: dict[str, int], shapes: dict[str, list[tuple]]) -> int:
    """Selective recomputation: attention probabilities, SiLU outputs, grouped-query
    attention's repeated keys and values and the RMSNorms' outputs are computed again in the
    backward pass from tensors it keeps anyway, instead of being saved from the forward pass.

    A saved tensor produced by Softmax, QuickGelu, Expand (or a reshape of an Expand), Div or
    Mul is a candidate. Walking back from it through cheap ops (:data:`_CHEAP`), the walk stops at
    tensors the backward pass keeps anyway, at tensors of another layer, and at tensors less than
    half the candidate's size, which are then kept instead; a candidate is recomputed when what it
    newly keeps is under half of what it frees. The attention scores' matmul is the only one
    that runs twice (about 2 % more compute at 256 tokens). Returns the nodes added."""
    g = proto.graph
    nodes = list(g.node)
    fwd, bwd = nodes[:n_forward], nodes[n_forward:]
    producer = {o: n for n in fwd for o in n.output if o}
    graph_out = {o.name for o in g.output}
    saved = {i for n in bwd for i in n.input if i in producer and producer[i].op_type != "Constant"}

    def size(t: str) -> int:
        sh = shapes.get(t)
        return max(int(np.prod(x)) for x in sh) if sh else 0

    def candidate(t: str) -> bool:
        n = producer[t]
        if n.op_type in ("Softmax", "QuickGelu", "Expand", "Div", "Mul"):
            return True
        src = producer.get(n.input[0]) if n.op_type == "Reshape" else None
        return src is not None and src.op_type == "Expand"

    cands = {t for t in saved if candidate(t) and _layer(producer[t]) is not None and t not in graph_out
             and types.get(t) == 1}
    chosen: dict[int, set[str]] = {}
    kept: set[str] = set()
    for t in sorted(cands):
        lyr = _layer(producer[t])
        leaves, stack, seen, ok = set(), [t], set(), True
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            n = producer.get(x)
            if x != t and (n is None or n.op_type == "Constant" or _layer(n) != lyr or x in graph_out
                           or (x in saved and x not in cands) or size(x) * 2 < size(t)):
                if n is not None and n.op_type != "Constant" and x not in saved and _layer(n) == lyr:
                    leaves.add(x)
                continue
            if n.op_type not in _CHEAP:
                ok = False
                break
            if x != t and x in cands:
                continue  # recomputed itself
            stack.extend(i for i in n.input if i)
        if ok and 2 * sum(size(x) for x in leaves) < size(t):
            chosen.setdefault(lyr, set()).add(t)
            kept |= leaves
    if not chosen:
        return 0
    stop = (saved - {t for ts in chosen.values() for t in ts}) | graph_out | kept
    return _recompute(proto, n_forward, types, chosen, stop)


def recompute_layers(proto: Any, n_forward: int, types: dict[str, int]) -> int:
    """Gradient checkpointing: the backward pass recomputes each decoder layer's forward from
    the layer's inputs instead of reading activations saved since the forward pass.

    Tensors that cross layers (the residual stream, rotary tables, the mask) stay as they are;
    every other forward tensor of layer ``L`` that a backward node reads is computed again by a
    copy of the layer's nodes, placed right before the first backward node that needs it. The
    copy's float inputs pass through an ``Add`` of a zero derived from the incoming gradient, so
    ONNX Runtime cannot run it before the backward pass reaches the layer; the originals are then
    freed as soon as the forward pass is done with them. Live activations fall from every layer's
    to one layer's, for about one more forward pass of compute. Returns the nodes added."""
    g = proto.graph
    nodes = list(g.node)
    fwd, bwd = nodes[:n_forward], nodes[n_forward:]
    producer = {o: n for n in fwd for o in n.output if o}
    layer = {o: _layer(n) for o, n in producer.items()}
    crossing = set()
    for n in fwd:
        if n.op_type == "Shape":  # reads no values (and hoist_shapes moved the backward's here)
            continue
        for i in n.input:
            if i in layer and layer[i] is not None and layer[i] != _layer(n):
                crossing.add(i)
    graph_out = {o.name for o in g.output}
    keep = crossing | graph_out | {o for n in fwd if n.op_type == "Dropout" for o in n.output}
    targets: dict[int, set[str]] = {}
    for n in bwd:
        for i in n.input:
            if i in layer and layer[i] is not None and i not in keep and producer[i].op_type != "Constant":
                targets.setdefault(layer[i], set()).add(i)
    return _recompute(proto, n_forward, types, targets, keep)


def _recompute(proto: Any, n_forward: int, types: dict[str, int], targets: dict[int, set[str]],
               stop: set[str]) -> int:
    """Replace the backward pass's reads of ``targets`` (grouped by layer) with copies of the
    forward nodes that compute them, walking back until a tensor in ``stop``, a tensor of
    another layer, or a constant. Each group's copies go right before its first reader, gated
    on the gradient that reaches it (see :func:`recompute_layers`). Returns the nodes added."""
    from onnx import helper

    g = proto.graph
    nodes = list(g.node)
    fwd, bwd = nodes[:n_forward], nodes[n_forward:]
    producer = {o: n for n in fwd for o in n.output if o}
    layer = {o: _layer(n) for o, n in producer.items()}
    inserts: dict[int, list[Any]] = {}
    added = 0
    for lyr, want in targets.items():
        ks = [k for k, n in enumerate(bwd) if any(i in want for i in n.input)]
        if not ks or min(ks) == 0:  # no reader, or nothing of the backward pass precedes it to wait for
            continue
        first = min(ks)
        # The forward nodes of this layer the targets depend on (within the layer), in order.
        need, stack = set(), list(want)
        while stack:
            t = stack.pop()
            n = producer.get(t)
            if n is None or layer.get(t) != lyr or (t in stop and t not in want) or id(n) in need \
                    or n.op_type == "Constant":
                continue
            need.add(id(n))
            stack.extend(n.input)
        chosen = [n for n in fwd if id(n) in need]
        grad_in = bwd[first - 1].output[0]  # the backward pass has reached this layer once it exists
        suffix = f"/re{lyr}"
        dep = f"recompute{suffix}/zero"
        new = [helper.make_node("Shape", [grad_in], [dep + "_shape"], start=0, end=0, name=dep + "_shape"),
               helper.make_node("ConstantOfShape", [dep + "_shape"], [dep], name=dep + "_fill")]  # a float 0.0 scalar
        local = {o for n in chosen for o in n.output}
        gated: dict[str, str] = {}
        for n in chosen:
            ins = []
            root = not any(i in local for i in n.input)  # a node that waits for nothing recomputed
            for i in n.input:
                if i in local:
                    ins.append(i + suffix)
                elif (root and i and i in producer and producer[i].op_type != "Constant" and types.get(i) == 1
                      and not any(x in gated.values() for x in ins)):
                    if i not in gated:
                        gated[i] = f"{i}{suffix}/gated"
                        new.append(helper.make_node("Add", [i, dep], [gated[i]], name=gated[i]))
                    ins.append(gated[i])
                else:
                    ins.append(i)
            c = helper.make_node(n.op_type, ins, [o + suffix if o else o for o in n.output], name=n.name + suffix,
                                 domain=n.domain)
            c.attribute.extend(n.attribute)
            new.append(c)
        inserts.setdefault(first, []).extend(new)
        added += len(new)
        for k in ks:
            node = bwd[k]
            node.input[:] = [i + suffix if i in want and i in local else i for i in node.input]
    out = list(fwd)
    for k, n in enumerate(bwd):
        out.extend(inserts.get(k, []))
        out.append(n)
    del g.node[:]
    g.node.extend(out)
    return added
