"""The fused form of a forward graph, and the gradient rules of its ops.

:func:`fuse` rewrites the patterns the exporter emits into ops of the ``edgetune`` domain, which
the custom-op library (``cpp_ext/ort_ops``, loaded by :mod:`edgetune.device.fused`) implements:

- ``RMSNorm(x, w)``: ``w * (x / sqrt(mean(x^2) + eps))`` (Pow, ReduceMean, Add, Sqrt, Div, Mul, Mul);
  after differentiation, a residual ``Add`` into it becomes ``AddRMSNorm(a, b, w)`` (:func:`fuse_residual`)
  and the sum of its input gradient with the residual's one ``AddRMSNormGrad`` (:func:`fold_residual_grads`);
- ``SwiGLU(g, u)``: ``silu(g) * u`` (QuickGelu with alpha 1, Mul);
- ``Rotary(x, cos, sin)``: ``x * cos + rotate_half(x) * sin`` (Slice, Slice, Neg, Concat, Mul, Mul, Add);
  after differentiation, with the heads' ``Transpose`` before it ``RotaryT`` and its gradient with
  the ``Transpose`` after it ``RotaryTGrad`` (:func:`fold_head_transposes`);
- ``Attention(q, k, v, mask)``: ``softmax(q k^T scale + mask) v`` (FusedMatMul, Add, Softmax, MatMul, and
  grouped-query attention's repeat of k and v), computed row by row forward and backward, so
  neither the S x S scores nor the repeated keys and values are ever held; after differentiation,
  with the heads' ``Transpose`` after it ``AttentionT`` and its gradient ``AttentionTGrad``;
- ``LoRA(x, A, B)``: a LoRA branch ``scale (x A^T) B^T`` (two FusedMatMuls with transB, rank up to 64),
  with ``h = x A^T`` as a second output; its gradient ``LoRAGrad`` gives dA, dB and dx in one pass
  over the rows;
- ``CrossEntropyHead(h, w, labels)``: the summed cross-entropy of the vocabulary projection ``h w^T``
  (FusedMatMul with transB, SoftmaxCrossEntropyLoss with reduction sum), the vocabulary in tiles, so
  the rows x V logits are never held; its gradient with respect to ``h`` comes from the same pass.

Each becomes one pass over memory forward and one backward, where the plain graph runs several
elementwise ops each way and keeps their intermediates. A pattern that does not match exactly is
left as it is, so the fused graph is always correct and at worst as slow as the plain one.
"""
from __future__ import annotations

from typing import Any, Optional

from edgetune.formats.errors import ModelError

from .core import MS, Builder, attr, drop_dead, rule

DOMAIN = "edgetune"


class _Graph:
    """Producers and consumers of a graph's tensors, for matching."""

    def __init__(self, proto: Any) -> None:
        self.g = proto.graph
        self.producer = {o: n for n in self.g.node for o in n.output if o}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.g.output}
        self.drop: set[int] = set()

    def only_use(self, t: str) -> Optional[Any]:
        """The single node reading ``t`` (and ``t`` no graph output), else None."""
        c = self.consumers.get(t, [])
        return c[0] if len(c) == 1 and t not in self.outputs else None

    def made_by(self, t: str, op: str, domain: str = "") -> Optional[Any]:
        n = self.producer.get(t)
        ok = n is not None and n.op_type == op and (n.domain or "") in ((domain,) if domain else ("", "ai.onnx"))
        return n if ok and id(n) not in self.drop else None

    def scalar(self, t: str) -> Optional[float]:
        from onnx import numpy_helper

        n = self.producer.get(t)
        if n is not None and n.op_type == "Constant":
            v = numpy_helper.to_array(attr(n, "value"))
        else:
            init = next((i for i in self.g.initializer if i.name == t and i.data_location != 1), None)
            if init is None:
                return None
            v = numpy_helper.to_array(init)
        return float(v.reshape(())) if v.size == 1 and v.dtype.kind == "f" else None


    def scalar_int(self, t: str) -> Optional[int]:
        from onnx import numpy_helper

        n = self.producer.get(t)
        if n is None or n.op_type != "Constant":
            init = next((i for i in self.g.initializer if i.name == t and i.data_location != 1), None)
            v = numpy_helper.to_array(init) if init is not None else None
        else:
            v = numpy_helper.to_array(attr(n, "value"))
        return int(v.reshape(())) if v is not None and v.size == 1 and v.dtype.kind in "iu" else None


def _other(node: Any, t: str) -> str:
    return node.input[1] if node.input[0] == t else node.input[0]


def _swiglu(G: _Graph, mul: Any) -> Optional[tuple[list[str], list[str], dict, list[Any]]]:
    for t in mul.input:
        act = G.made_by(t, "QuickGelu", MS)
        if act is not None and float(attr(act, "alpha", 1.702)) == 1.0 and G.only_use(t) is mul:
            return [act.input[0], _other(mul, t)], list(mul.output), {}, [act]
    return None


def _rmsnorm(G: _Graph, mul_w: Any) -> Optional[tuple[list[str], list[str], dict, list[Any]]]:
    for t in mul_w.input:
        mul_x = G.made_by(t, "Mul")
        if mul_x is None or G.only_use(t) is not mul_w:
            continue
        for r in mul_x.input:
            div = G.made_by(r, "Div")
            if div is None or G.only_use(r) is not mul_x or G.scalar(div.input[0]) != 1.0:
                continue
            x = _other(mul_x, r)
            sqrt = G.made_by(div.input[1], "Sqrt")
            add = sqrt and G.only_use(div.input[1]) is div and G.made_by(sqrt.input[0], "Add")
            if not add or G.only_use(sqrt.input[0]) is not sqrt:
                continue
            mean_t = next((i for i in add.input if G.made_by(i, "ReduceMean")), None)
            eps = G.scalar(_other(add, mean_t)) if mean_t else None
            mean = G.made_by(mean_t, "ReduceMean") if mean_t else None
            if mean is None or eps is None or G.only_use(mean_t) is not add or attr(mean, "keepdims", 1) != 1:
                continue
            axes = list(attr(mean, "axes") or [])
            if len(mean.input) > 1 or axes != [-1]:
                continue
            pow_ = G.made_by(mean.input[0], "Pow")
            if pow_ is None or pow_.input[0] != x or G.scalar(pow_.input[1]) != 2.0 \
                    or G.only_use(mean.input[0]) is not mean:
                continue
            return ([x, _other(mul_w, t)], [mul_w.output[0], mul_w.output[0] + "/inv_rms"], {"epsilon": eps},
                    [mul_x, div, sqrt, add, mean, pow_])
    return None


def _rotary(G: _Graph, add: Any) -> Optional[tuple[list[str], list[str], dict, list[Any]]]:
    muls = [G.made_by(t, "Mul") for t in add.input]
    if None in muls or any(G.only_use(t) is not add for t in add.input):
        return None
    for m_cos, m_sin in (muls, muls[::-1]):
        for cat_t in m_sin.input:
            cat = G.made_by(cat_t, "Concat")
            if cat is None or len(cat.input) != 2 or attr(cat, "axis") != -1 or G.only_use(cat_t) is not m_sin:
                continue
            neg = G.made_by(cat.input[0], "Neg")
            first = G.made_by(cat.input[1], "Slice")
            second = neg and G.made_by(neg.input[0], "Slice")
            if not (first and second) or first.input[0] != second.input[0] or \
                    any(G.only_use(t) is None for t in (cat.input[0], cat.input[1], neg.input[0])):
                continue
            x = first.input[0]
            if x not in m_cos.input:
                continue
            return ([x, _other(m_cos, x), _other(m_sin, cat_t)], list(add.output), {},
                    [m_cos, m_sin, cat, neg, first, second])
    return None


def _unrepeated(G: _Graph, t: str) -> str:
    """The grouped key/value tensor under grouped-query attention's repeat (Unsqueeze, Expand,
    Reshape to H heads), or ``t`` itself; the kernel reads the groups without the copy."""
    rs = G.made_by(t, "Reshape")
    ex = rs and G.made_by(rs.input[0], "Expand")
    un = ex and G.made_by(ex.input[0], "Unsqueeze")
    if un and len(un.input) > 1 and G.scalar_int(un.input[1]) == 2:
        return un.input[0]
    return t


def _attention(G: _Graph, mm: Any) -> Optional[tuple[list[str], list[str], dict, list[Any]]]:
    probs, v = mm.input
    sm = G.made_by(probs, "Softmax")
    if sm is None or attr(sm, "axis", -1) != -1 or G.only_use(probs) is not mm:
        return None
    add = G.made_by(sm.input[0], "Add")
    if add is None or G.only_use(sm.input[0]) is not sm:
        return None
    for scores in add.input:
        qk = G.made_by(scores, "FusedMatMul", MS)
        if qk is None or G.only_use(scores) is not add or attr(qk, "transB", 0) != 1 or attr(qk, "transA", 0) != 0 \
                or attr(qk, "transBatchA", 0) or attr(qk, "transBatchB", 0):
            continue
        q, k = qk.input[0], _unrepeated(G, qk.input[1])
        return ([q, k, _unrepeated(G, v), _other(add, scores)], [mm.output[0]],
                {"scale": float(attr(qk, "alpha", 1.0))}, [qk, add, sm])
    return None


def _cross_entropy(G: _Graph, sce: Any) -> Optional[tuple[list[str], list[str], dict, list[Any]]]:
    if len(sce.input) != 2 or len([o for o in sce.output if o]) != 1 or attr(sce, "reduction") not in (b"sum", "sum"):
        return None
    mm = G.made_by(sce.input[0], "FusedMatMul", MS)
    if mm is None or G.only_use(sce.input[0]) is not sce or attr(mm, "transB", 0) != 1 or attr(mm, "transA", 0) \
            or attr(mm, "transBatchA", 0) or attr(mm, "transBatchB", 0) or float(attr(mm, "alpha", 1.0)) != 1.0:
        return None
    from onnx import TensorProto

    w = mm.input[1]
    cast = G.made_by(w, "Cast")  # a bfloat16 weight's cast (--compute bf16), fused into the loss later
    stored = cast.input[0] if cast is not None and attr(cast, "to") == TensorProto.FLOAT else w
    if not any(i.name == stored and (stored == w or i.data_type == TensorProto.BFLOAT16)
               for i in G.g.initializer):  # a frozen projection only
        return None
    ignore = attr(sce, "ignore_index")
    return ([mm.input[0], mm.input[1], sce.input[1]], [sce.output[0]],
            {"ignore_index": int(ignore) if ignore is not None else -(2 ** 63)}, [mm])


def _lora(G: _Graph, mm: Any) -> Optional[tuple[list[str], list[str], dict, list[Any]]]:
    """``u = alpha (x A^T) B^T``: two FusedMatMuls with transB on 2-D float initializers A [r, K] and
    B [N, r] of a small rank (a LoRA branch), the first read by the second only."""
    from onnx import TensorProto

    def plain(n: Any) -> bool:
        return attr(n, "transB", 0) == 1 and not attr(n, "transA", 0) and not attr(n, "transBatchA", 0) \
            and not attr(n, "transBatchB", 0)

    if not plain(mm):
        return None
    t, b = mm.input
    first = G.made_by(t, "FusedMatMul", MS)
    if first is None or G.only_use(t) is not mm or not plain(first) or float(attr(first, "alpha", 1.0)) != 1.0:
        return None
    x, a = first.input
    dims = {i.name: list(i.dims) for i in G.g.initializer if i.name in (a, b) and i.data_type == TensorProto.FLOAT}
    if len(dims.get(a, [])) != 2 or len(dims.get(b, [])) != 2:
        return None
    (r, k), (n, rb) = dims[a], dims[b]
    if rb != r or not 1 <= r <= 64 or r >= k or r >= n:
        return None
    return [x, a, b], [mm.output[0], t], {"scale": float(attr(mm, "alpha", 1.0))}, [first]


_PATTERNS = (("Mul", "SwiGLU", _swiglu), ("Mul", "RMSNorm", _rmsnorm), ("Add", "Rotary", _rotary),
             ("MatMul", "Attention", _attention), ("FusedMatMul", "LoRA", _lora))
# The vocabulary loss: it never holds the rows x V logits, at the speed of MLAS's sgemm and ONNX
# Runtime's loss on the same products (docs/benchmarks.md). EDGETUNE_FUSED_LOSS=0 at export leaves
# the projection and its loss to ONNX Runtime.
_LOSS_PATTERN = ("SoftmaxCrossEntropyLoss", "CrossEntropyHead", _cross_entropy)


def _patterns() -> tuple:
    import os

    return _PATTERNS + ((_LOSS_PATTERN,) if os.environ.get("EDGETUNE_FUSED_LOSS", "1") != "0" else ())


def fuse(proto: Any) -> dict[str, int]:
    """Rewrite ``proto``'s forward graph into its fused form in place; returns how many of each
    fused op it made. Nodes that only fed a fused pattern (slice bounds, say) are removed."""
    from onnx import helper

    counts: dict[str, int] = {}
    for anchor, op, match in _patterns():
        G = _Graph(proto)
        replace: dict[int, Any] = {}
        for node in G.g.node:
            if node.op_type != anchor or node.domain not in ((MS,) if anchor == "FusedMatMul" else ("", "ai.onnx")) \
                    or id(node) in G.drop:
                continue
            found = match(G, node)
            if found is None:
                continue
            ins, outs, attrs, gone = found
            replace[id(node)] = helper.make_node(op, ins, outs, name=(node.name or outs[0]) + "/fused",
                                                 domain=DOMAIN, **attrs)
            G.drop.update(id(n) for n in gone)
            counts[op] = counts.get(op, 0) + 1
        nodes = [replace.get(id(n), n) for n in G.g.node if id(n) not in G.drop]
        del G.g.node[:]
        G.g.node.extend(nodes)
    if counts:
        drop_dead(proto)
        if not any(o.domain == DOMAIN for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return counts


def fuse_residual(proto: Any, shapes: dict[str, list[tuple]], n_forward: Optional[int] = None) -> int:
    """The residual add before each norm, ``s = a + b; y = RMSNorm(s)``, as one ``AddRMSNorm(a, b, w)
    -> (y, inv_rms, s)`` where ``a`` and ``b`` had the same probed shapes (no broadcast). Only the
    first ``n_forward`` nodes are looked at (the forward pass of a training graph, whose backward
    pass may hold recomputed norms). Run after differentiation: ``s`` keeps its name and every
    reader. Returns the number of adds fused."""
    from onnx import helper

    g = proto.graph
    nodes = list(g.node)
    fwd = nodes[:n_forward] if n_forward is not None else nodes
    producer = {o: (i, n) for i, n in enumerate(fwd) for o in n.output if o}
    put: dict[int, Any] = {}
    gone: set[int] = set()
    for i, n in enumerate(fwd):
        if n.op_type != "RMSNorm" or n.domain != DOMAIN or len(n.output) != 2:
            continue
        j, add = producer.get(n.input[0], (None, None))
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or j in gone:
            continue
        sa, sb = shapes.get(add.input[0]), shapes.get(add.input[1])
        if not sa or sa != sb or any(len(x) == 0 for x in sa):
            continue
        put[j] = helper.make_node("AddRMSNorm", [add.input[0], add.input[1], n.input[1]],
                                  [n.output[0], n.output[1], add.output[0]], name=n.name + "/add",
                                  domain=DOMAIN, epsilon=float(attr(n, "epsilon", 1e-6)))
        gone.update((i, j))
    return _replace(g, nodes, put, gone)


def fold_residual_grads(proto: Any) -> int:
    """``Sum(r, RMSNormGrad(dy, s, w, inv).dx)``, the gradient of a norm's input that also feeds
    the next residual add, as one ``AddRMSNormGrad(dy, s, w, inv, r)`` (when the norm's weight
    gradient is not wanted, as for frozen norms). Returns the number of sums folded."""
    from onnx import helper

    g = proto.graph
    nodes = list(g.node)
    readers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    for o in g.output:
        readers[o.name] = readers.get(o.name, 0) + 1
    producer = {o: (i, n) for i, n in enumerate(nodes) for o in n.output if o}
    put: dict[int, Any] = {}
    gone: set[int] = set()
    for k, n in enumerate(nodes):
        if n.op_type != "Sum" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            continue
        for t, r in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
            j, gr = producer.get(t, (None, None))
            if gr is None or gr.op_type != "RMSNormGrad" or gr.domain != DOMAIN or j in gone or t != gr.output[0] \
                    or readers.get(t) != 1 or (len(gr.output) > 1 and readers.get(gr.output[1], 0)) or t == r:
                continue
            put[k] = helper.make_node("AddRMSNormGrad", [*gr.input[:4], r], [n.output[0]], name=gr.name + "/add",
                                      domain=DOMAIN)
            gone.update((k, j))
            break
    return _replace(g, nodes, put, gone)


# Ops that fold the heads' Transpose (perm 0, 2, 1, 3) beside them: (op, its form with the transpose,
# whether the transpose is before its first input, else after its first output).
_HEAD_TRANSPOSES = (("Rotary", "RotaryT", True), ("RotaryGrad", "RotaryTGrad", False),
                    ("Attention", "AttentionT", False), ("AttentionGrad", "AttentionTGrad", True))


def fold_head_transposes(proto: Any) -> int:
    """The heads' transposes between the projections' [B, S, H, D] rows and the attention heads'
    [B, H, S, D] ones, folded into the ops beside them: ``Rotary(Transpose(x))`` as ``RotaryT(x)``
    and ``Transpose(RotaryGrad(dy))`` as ``RotaryTGrad(dy)`` (q and k); ``Transpose(Attention(...))``
    as ``AttentionT(...)`` and ``AttentionGrad(Transpose(dout), ...)`` as ``AttentionTGrad(dout, ...)``
    (the attention output). Only where the transposed tensor has no other reader. Returns the number
    of transposes folded."""
    from onnx import helper

    g = proto.graph
    nodes = list(g.node)
    readers: dict[str, list[int]] = {}
    for k, n in enumerate(nodes):
        for i in n.input:
            readers.setdefault(i, []).append(k)
    outputs = {o.name for o in g.output}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    forms = {op: (folded, before) for op, folded, before in _HEAD_TRANSPOSES}

    def heads_transpose(j: Optional[int]) -> bool:
        n = nodes[j] if j is not None else None
        return n is not None and n.op_type == "Transpose" and n.domain in ("", "ai.onnx") \
            and list(attr(n, "perm", [])) == [0, 2, 1, 3]

    put: dict[int, Any] = {}
    gone: set[int] = set()
    for k, n in enumerate(nodes):
        if n.domain != DOMAIN or n.op_type not in forms or k in gone:
            continue
        folded, before = forms[n.op_type]
        if before:
            j = producer.get(n.input[0])
            if not heads_transpose(j) or j in gone or readers.get(nodes[j].output[0]) != [k] \
                    or nodes[j].output[0] in outputs:
                continue
            ins, outs, at = [nodes[j].input[0], *n.input[1:]], list(n.output), k
        else:
            r = readers.get(n.output[0], [])
            j = r[0] if len(r) == 1 else None
            if not heads_transpose(j) or j in gone or n.output[0] in outputs:
                continue
            ins, outs, at = list(n.input), [nodes[j].output[0], *n.output[1:]], j
        m = helper.make_node(folded, ins, outs, name=n.name + "/t", domain=DOMAIN)
        m.attribute.extend(n.attribute)
        put[at] = m
        gone.update((k, j))
    return _replace(g, nodes, put, gone)


def _replace(g: Any, nodes: list, put: dict[int, Any], gone: set[int]) -> int:
    """``g``'s nodes with ``put[k]`` at position ``k`` and the other positions in ``gone`` removed;
    returns how many were put."""
    if put:
        out = [put[k] if k in put else n for k, n in enumerate(nodes) if k in put or k not in gone]
        del g.node[:]
        g.node.extend(out)
    return len(put)


def has_fused_ops(proto: Any) -> bool:
    return any(n.domain == DOMAIN for n in proto.graph.node)


# -- gradient rules -------------------------------------------------------------------------

@rule("SwiGLU")
def _swiglu_grad(b: Builder, n: Any, gy: list, want: list) -> list:
    dg, du = b.op("SwiGLUGrad", [gy[0], n.input[0], n.input[1]], domain=DOMAIN, n_out=2)
    return [dg if want[0] else None, du if want[1] else None]


@rule("RMSNorm")
def _rmsnorm_grad(b: Builder, n: Any, gy: list, want: list) -> list:
    if gy[1] is not None:
        raise ModelError(f"autodiff: {n.name}'s inv_rms output reaches the loss; only its normalized output may")
    dx, dw = b.op("RMSNormGrad", [gy[0], n.input[0], n.input[1], n.output[1]], domain=DOMAIN, n_out=2)
    return [dx if want[0] else None, dw if want[1] else None]


@rule("Attention")
def _attention_grad(b: Builder, n: Any, gy: list, want: list) -> list:
    if want[3]:
        raise ModelError(f"autodiff: {n.name}: gradients of the attention mask are not supported")
    dq, dk, dv = b.op("AttentionGrad", [gy[0], *n.input[:4]], domain=DOMAIN, n_out=3,
                      scale=float(attr(n, "scale", 1.0)))
    return [dq if want[0] else None, dk if want[1] else None, dv if want[2] else None]


@rule("Rotary")
def _rotary_grad(b: Builder, n: Any, gy: list, want: list) -> list:
    if want[1] or want[2]:
        raise ModelError(f"autodiff: {n.name}: gradients of the rotary cos/sin tables are not supported")
    return [b.op("RotaryGrad", [gy[0], n.input[1], n.input[2]], domain=DOMAIN), None, None]


@rule("LoRA")
def _lora_grad(b: Builder, n: Any, gy: list, want: list) -> list:
    if len(gy) > 1 and gy[1] is not None:
        raise ModelError(f"autodiff: {n.name}'s h output reaches the loss; only its output u may")
    outs = b.op("LoRAGrad", [gy[0], n.input[0], n.output[1], n.input[1], n.input[2]], domain=DOMAIN,
                n_out=3 if want[0] else 2, scale=float(attr(n, "scale", 1.0)))
    return [outs[2] if want[0] else None, outs[0] if want[1] else None, outs[1] if want[2] else None]


@rule("CrossEntropyHead")
def _cross_entropy_grad(b: Builder, n: Any, gy: list, want: list) -> list:
    if want[1]:
        raise ModelError(f"autodiff: {n.name}: the vocabulary projection's weight must be frozen")
    if len(n.output) < 2:  # the kernel computes d loss / d h in its forward pass when asked for it
        n.output.append(n.output[0] + "/dh")
    return [b.op("Mul", [n.output[1], gy[0]]) if want[0] else None, None, None]
