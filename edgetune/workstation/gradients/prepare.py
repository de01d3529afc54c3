"""Forward-graph preparation before differentiation: matmul folding, no-op casts, SiLU fusion, and the
element types and probed shapes the rules need."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edgetune.formats.errors import DeviceError, ModelError

from .core import MS, attr, drop_dead, is_external


def _swaps_last_two(perm: list[int], rank: int | None) -> bool:
    if not perm:
        return rank == 2
    r = len(perm)
    return perm == list(range(r - 2)) + [r - 1, r - 2]


def _scalar(g: Any, name: str) -> float | None:
    from onnx import numpy_helper

    for i in g.initializer:
        if i.name == name:
            if is_external(i):
                return None
            v = numpy_helper.to_array(i)
            return float(v.reshape(())) if v.size == 1 and v.dtype.kind == "f" else None
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name:
            v = numpy_helper.to_array(attr(n, "value"))
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
        perm = list(attr(t, "perm") or []) if t is not None and t.op_type == "Transpose" else None
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
                and int(attr(n, "to", -1)) == types.get(n.input[0])):
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
            k, n = (int(attr(node, key)) for key in ("K", "N"))
            stub = f"{node.output[0]}/stub"
            model.graph.input.append(helper.make_tensor_value_info(stub, onnx.TensorProto.FLOAT, [k, n]))
            node.CopyFrom(helper.make_node("MatMul", [node.input[0], stub], list(node.output), name=node.name))
    for _ in range(8):  # each pass types the contrib ops whose inputs the previous one reached
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type
                 for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
        types.update({i.name: i.data_type for i in proto.graph.initializer})
        missing = [(o, types[n.input[0]]) for n in proto.graph.node if n.domain in (MS, "edgetune") and n.input
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
    external weights reads them from ``base_dir``, where its data file lies."""
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
    if any(n.domain == "edgetune" for n in proto.graph.node):
        from edgetune.device import fused as kernels

        try:
            kernels.register(so)
        except DeviceError as e:
            raise ModelError(f"cannot build the fused training graph: {e}") from None
    if base_dir is not None:  # external weights are read from there; nothing is written anywhere
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
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


def static_reshape(ins: Sequence[tuple], outs: Sequence[tuple]) -> list[int] | None:
    """The target shape a Reshape from ``ins`` to ``outs`` (the probed shapes, one pair per probe
    batch) can read as a constant, valid for every batch size and length: each dimension the same
    in every probe as itself, one equal to the input's on the same axis in every probe as 0 (copy
    it), and at most one other as -1. None where that does not pin the shape down. The probes
    differ in both batch size and length, so a dimension that is the same in every probe depends on
    neither."""
    if len(ins) < 2 or len(ins) != len(outs) or len({len(s) for s in outs}) != 1 \
            or any(v <= 0 for s in list(ins) + list(outs) for v in s):
        return None
    spec: list[int] = []
    for k in range(len(outs[0])):
        vals = {s[k] for s in outs}
        if len(vals) == 1:
            spec.append(vals.pop())
        elif all(k < len(i) and i[k] == o[k] for i, o in zip(ins, outs)):
            spec.append(0)
        elif -1 not in spec:
            spec.append(-1)
        else:
            return None
    return spec


def fold_reshape_shapes(proto: Any, shapes: dict[str, list[tuple]]) -> int:
    """Reshapes whose target shape the graph computes from other tensors' shapes (``Shape``,
    ``Gather``, ``Unsqueeze``, ``Concat`` per reshape, as exporters write them) read a constant
    instead (:func:`static_reshape`), and the nodes that only computed it are dropped: hundreds of
    tiny nodes fewer per step. Returns the number of reshapes folded."""
    from onnx import numpy_helper

    g = proto.graph
    names = {i.name for i in g.initializer}
    constant = names | {n.output[0] for n in g.node if n.op_type == "Constant"}
    made: dict[tuple, str] = {}
    folded = 0
    for n in g.node:
        if n.op_type != "Reshape" or n.domain not in ("", "ai.onnx") or len(n.input) < 2 or n.input[1] in constant \
                or attr(n, "allowzero", 0):
            continue
        spec = static_reshape(shapes.get(n.input[0], []), shapes.get(n.output[0], []))
        if spec is None:
            continue
        key = tuple(spec)
        if key not in made:
            made[key] = next(f"reshape/shape_{i}" for i in range(len(names) + 1) if f"reshape/shape_{i}" not in names)
            names.add(made[key])
            g.initializer.append(numpy_helper.from_array(np.array(spec, np.int64), made[key]))
        n.input[1] = made[key]
        folded += 1
    if folded:
        drop_dead(proto)  # the shape computations no node reads any more
    return folded
