"""The driver: which nodes lie on a path to the loss, the backward pass in reverse order, and ``build``."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from edgetune.formats import quantized
from edgetune.formats.errors import ModelError

from .core import FLOATS, RULES, Builder, TrainingGraph, grad_name
from .fused import fold_head_transposes, fold_residual_grads, fuse_residual
from .fused import fuse as fuse_ops
from .memory import hoist_shapes, recompute_cheap, recompute_layers
from .prepare import drop_noop_casts, elem_types, fold_reshape_shapes, fuse_matmuls, probe_shapes

_OTHER_FLOATS = {10: "float16", 11: "float64", 16: "bfloat16"}


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
    # The rules write float32 constants and casts: a gradient through another float type would be
    # silently wrong or fail at load, so it is refused here with the tensor named.
    for name in sorted(needed):
        if types.get(name) in _OTHER_FLOATS:
            raise ModelError(f"autodiff: {name} is {_OTHER_FLOATS[types[name]]}; gradients are built in float32 only "
                             "(export the model in float32: its weights are converted on load)")
    b = Builder(proto, shapes, types, fixed or {})
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


def drop_unused_initializers(proto: Any, keep_transposed: bool = True) -> None:
    """Constants that fusion left without a reader (ORT warns about each at load). With
    ``keep_transposed``, a quantized weight's transposed copy (``W.qT``, ...) stays while ``W.q``
    is read: the backward pass, not built yet, reads it."""
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    if keep_transposed:
        copies = {w for w in map(quantized.weight_name, used) if w}
        used |= {t for w in copies for t in quantized.tensor_names(w, copy=True)}
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
          base_dir: Any = None, recompute: bool = False, fused: bool = False) -> TrainingGraph:
    """The training graph of ``proto``: ``loss`` and the gradient of each of ``params``.
    ``base_dir`` is where the external data of ``proto``'s weights lies, if it has any. With
    ``recompute``, each decoder layer's activations are recomputed in the backward pass
    (:func:`recompute_layers`). With ``fused``, the forward graph is first rewritten into the
    ``edgetune`` domain's fused ops (:func:`edgetune.workstation.gradients.fused.fuse`), whose
    library must load here."""
    import onnx

    # The caller's graph is left as it was: the prepared forward graph is returned as ``forward``.
    given, proto = proto, onnx.ModelProto()
    proto.CopyFrom(given)
    types = elem_types(proto)
    drop_noop_casts(proto, types)
    fuse_matmuls(proto)
    drop_unused_initializers(proto)
    if fused:
        fuse_ops(proto)
        types = elem_types(proto)
    shapes, fixed = probe_shapes(proto, feeds, types, base_dir)
    fold_reshape_shapes(proto, shapes)
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
    if fused:  # the residual adds into the norms, forward and backward (after recomputation chose)
        fuse_residual(train, shapes, n_forward)
        fold_residual_grads(train)
        fuse_residual(proto, shapes)
        fold_head_transposes(train)
        fold_head_transposes(proto)
    # The forward graph reads no transposed copy, and the first layer's input gradient is not built.
    drop_unused_initializers(proto, keep_transposed=False)
    drop_unused_initializers(train, keep_transposed=False)
    return TrainingGraph(train, list(params), grads, initial, proto)
