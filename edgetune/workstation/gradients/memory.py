"""Passes over the joint graph that trade arithmetic for memory: shape hoisting and recomputation."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

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

# Forward ops cheap enough to run again in the backward pass instead of keeping their output (the
# last three are the fused kernels' one-pass ops, see fused.py).
_CHEAP = {"Softmax", "QuickGelu", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Add", "Sub", "Mul", "Div",
          "Where", "Neg", "Cast", "MatMul", "FusedMatMul", "RMSNorm", "SwiGLU", "Rotary"}


def recompute_cheap(proto: Any, n_forward: int, types: dict[str, int], shapes: dict[str, list[tuple]]) -> int:
    """Selective recomputation: attention probabilities, SiLU outputs, grouped-query
    attention's repeated keys and values and the RMSNorms' outputs are computed again in the
    backward pass from tensors it keeps anyway, instead of being saved from the forward pass.

    A saved tensor produced by Softmax, QuickGelu, Expand (or a reshape of an Expand), Div, Mul,
    or the fused RMSNorm and SwiGLU is a candidate. Walking back from it through cheap ops
    (:data:`_CHEAP`), the walk stops at tensors the backward pass keeps anyway, at tensors of another layer, and at tensors less than
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
        if n.op_type in ("Softmax", "QuickGelu", "Expand", "Div", "Mul", "RMSNorm", "SwiGLU"):
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


# Fused ops whose last, optional input is only waited for (cpp_ext/ort_ops: "after").
_WAITS = {("edgetune", "RMSNorm"), ("edgetune", "SwiGLU")}


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
            if root and (n.domain, n.op_type) in _WAITS:
                # A fused op that takes the zero as an input it only waits for: no gating pass.
                c = helper.make_node(n.op_type, [*n.input, dep], [o + suffix if o else o for o in n.output],
                                     name=n.name + suffix, domain=n.domain)
                c.attribute.extend(n.attribute)
                new.append(c)
                continue
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
