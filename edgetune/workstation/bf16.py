"""bfloat16 frozen weights in the training graphs (``--compute bf16``).

The plain graphs keep each frozen linear weight ``W``, and the vocabulary projection's weight (the
embedding, where the head is tied to it), as a bfloat16 initializer ``W.bf16`` and a standard
``Cast`` to float32 in front of its readers: any ONNX Runtime build and provider runs them (ONNX
Runtime folds the cast at load, so the products are float32 ones of the rounded weights). The
fused graphs replace every product of an activation with such a weight, forward ``x @ W^T`` and
input gradient ``dY @ W``, by the kernel library's ``MatMulBF16``, which rounds the activation to
bfloat16 and multiplies on AMX's tiles or with AVX512-BF16, with float32 sums; the vocabulary
loss by ``CrossEntropyHeadBF16`` on the bfloat16 weight, and the embedding lookup by a ``Gather``
of its bfloat16 rows and a ``Cast`` of those rows only. The gate and up projections that feed only a
``SwiGLU`` come out of ``MatMulBF16Round`` in bfloat16, which ``SwiGLUBF16`` and its gradient read:
the backward pass keeps them in half the bytes. The fused attention (``AttentionT``) becomes
``AttentionTBF16``, whose seven products take bfloat16 operands with float32 sums, the softmax and
its outputs float32."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from edgetune.device.kernels import bf16_to_f32, f32_to_bf16

SUFFIX = ".bf16"
# The fused attention and its gradient, and their forms with bfloat16 products
ATTENTION = {"AttentionT": "AttentionTBF16", "AttentionTGrad": "AttentionTBF16Grad"}


def bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    return f32_to_bf16(np.asarray(x, np.float32))


def to_float(b: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32."""
    return bf16_to_f32(np.asarray(b, np.uint16))


def vocab_weights(g: Any, skip: set[str]) -> list[str]:
    """The frozen float32 weights ``W [V, D]`` of vocabulary projections ``h @ W^T`` (``MatMul`` of
    a ``Transpose``, or ``FusedMatMul`` with ``transB``) whose scores a ``SoftmaxCrossEntropyLoss``
    reads (a head tied to the embedding, or its own), but for those in ``skip``."""
    from onnx import TensorProto

    inits = {i.name: i for i in g.initializer}
    made = {o: n for n in g.node for o in n.output}
    out: list[str] = []
    for n in g.node:
        if n.op_type != "SoftmaxCrossEntropyLoss":
            continue
        mm = made.get(n.input[0])
        if mm is None or len(mm.input) != 2:
            continue
        w = None
        if mm.op_type == "FusedMatMul" and _attrs(mm).get("transB", 0):
            w = mm.input[1]
        t = made.get(mm.input[1])
        if mm.op_type == "MatMul" and t is not None and t.op_type == "Transpose" \
                and list(_attrs(t).get("perm", [1, 0])) == [1, 0]:
            w = t.input[0]
        init = inits.get(w) if w else None
        if init is not None and init.data_type == TensorProto.FLOAT and len(init.dims) == 2 \
                and init.name not in skip and init.name not in out:
            out.append(init.name)
    return out


def rewrite(model: Any, names: list[str], lazy: dict[str, Callable[[], Any]]) -> None:
    """Store each weight in ``names`` as ``<name>.bf16`` (bfloat16) with a ``Cast`` back to float32
    named as the weight was, so every reader is unchanged. ``lazy`` maps weight names to loaders;
    each moved weight's loader now yields its bfloat16 bits. A weight held inline is converted here."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    want = set(names)
    keep, casts = [], []
    for init in g.initializer:
        if init.name not in want:
            keep.append(init)
            continue
        new = TensorProto(name=init.name + SUFFIX, data_type=TensorProto.BFLOAT16)
        new.dims.extend(init.dims)
        loader = lazy.pop(init.name, None)
        if loader is None:
            value = numpy_helper.to_array(init)
            new.raw_data = bits(value).tobytes()
        else:
            lazy[new.name] = (lambda f=loader: bits(np.asarray(f(), np.float32)))
        keep.append(new)
        casts.append(helper.make_node("Cast", [new.name], [init.name], name=f"{init.name}/to_float",
                                      to=TensorProto.FLOAT))
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(casts + nodes)


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fuse(model: Any, domain: str) -> int:
    """Replace each product of an activation with a ``Cast`` bfloat16 weight (directly, or through
    a ``Transpose``) by ``MatMulBF16``, each ``CrossEntropyHead`` of such a weight by
    ``CrossEntropyHeadBF16``, and each ``Gather`` of its rows by a ``Gather`` of the bfloat16 rows
    and a ``Cast`` of them; fold the ``Add`` after a product into it where a LoRA branch is added
    (``_fold_adds``), and a gradient ``Sum`` of products into a chain of them (``_fold_sums``);
    round a ``SwiGLU``'s two products to bfloat16 where nothing else reads them
    (``_round_swiglu_inputs``); run the fused attention with bfloat16 products (``AttentionTBF16``)
    where any product was replaced; drop the casts and transposes no one reads any more. Returns how
    many products were replaced."""
    from onnx import TensorProto, helper

    g = model.graph
    bf = {i.name for i in g.initializer if i.data_type == TensorProto.BFLOAT16 and i.name.endswith(SUFFIX)
          and len(i.dims) == 2}
    cast = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Cast" and n.input[0] in bf}
    flip = {n.output[0]: cast[n.input[0]] for n in g.node
            if n.op_type == "Transpose" and n.input[0] in cast and list(_attrs(n).get("perm", [1, 0])) == [1, 0]}
    nodes, count = [], 0
    for n in g.node:
        if n.op_type in ("MatMul", "FusedMatMul") and len(n.input) == 2 and n.domain in ("", "com.microsoft"):
            at = _attrs(n)
            plain = (n.op_type == "MatMul" or (at.get("transA", 0) == 0 and at.get("transBatchA", 0) == 0
                                               and at.get("transBatchB", 0) == 0 and at.get("alpha", 1.0) == 1.0))
            b = n.input[1]
            if plain and (b in cast or b in flip):
                trans_b = (b in flip) != bool(at.get("transB", 0))
                w = cast[b] if b in cast else flip[b]
                nodes.append(helper.make_node("MatMulBF16", [n.input[0], w], list(n.output), name=n.name,
                                              domain=domain, trans_b=int(trans_b)))
                count += 1
                continue
        if n.op_type == "CrossEntropyHead" and n.domain == domain and n.input[1] in cast:
            nodes.append(helper.make_node("CrossEntropyHeadBF16", [n.input[0], cast[n.input[1]], n.input[2]],
                                          list(n.output), name=n.name, domain=domain, **_attrs(n)))
            count += 1
            continue
        if n.op_type == "Gather" and n.domain == "" and n.input[0] in cast:
            rows = n.output[0] + SUFFIX
            nodes.append(helper.make_node("Gather", [cast[n.input[0]], n.input[1]], [rows], name=n.name, **_attrs(n)))
            nodes.append(helper.make_node("Cast", [rows], [n.output[0]], name=n.name + "/to_float",
                                          to=TensorProto.FLOAT))
            continue
        nodes.append(n)
    nodes = _fold_adds(nodes, g, domain)
    nodes = _fold_sums(nodes, g, domain)
    nodes = _round_swiglu_inputs(nodes, g, domain)
    if count:  # the attention's products in bfloat16 too, as a bfloat16 model's are
        for n in nodes:
            if n.domain == domain and n.op_type in ATTENTION:
                n.op_type = ATTENTION[n.op_type]
    # Drop what no one reads now (the graph's outputs count as readers).
    while True:
        read = {i for n in nodes for i in n.input} | {o.name for o in g.output}
        kept = [n for n in nodes if not (n.op_type in ("Cast", "Transpose") and n.output[0] not in read
                                         and (n.input[0] in bf or n.input[0] in cast))]
        if len(kept) == len(nodes):
            break
        nodes = kept
    del g.node[:]
    g.node.extend(nodes)
    if count and not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return count


def _made_by_lone(nodes: list[Any], g: Any) -> tuple[dict[str, Any], Callable[[str], Any]]:
    """The node making each tensor, and ``made_by(t)``: that node where exactly one node reads ``t``
    and it is not a graph output; else None."""
    made = {o: n for n in nodes for o in n.output}
    reads: dict[str, int] = {}
    for n in nodes:
        for t in n.input:
            reads[t] = reads.get(t, 0) + 1
    outputs = {o.name for o in g.output}
    return made, lambda t: made.get(t) if reads.get(t) == 1 and t not in outputs else None


def _lone_products(nodes: list[Any], g: Any, domain: str) -> tuple[dict[str, Any], Callable[[str], Any]]:
    """The node making each tensor, and ``lone(t)``: the ``MatMulBF16`` whose output ``t`` is, where
    exactly one node reads ``t`` and it is not a graph output; else None."""
    made, made_by = _made_by_lone(nodes, g)

    def lone(t: str) -> Any:
        m = made_by(t)
        return m if m is not None and m.op_type == "MatMulBF16" and m.domain == domain else None

    return made, lone


def _lora_terms(nodes: list[Any], g: Any, domain: str) -> Callable[[str], Any]:
    """``term(t)``: where ``t`` is a LoRA branch's output (``LoRA``'s ``u``) or input gradient
    (``LoRAGrad``'s ``dx``) that exactly one node reads and no graph output is, a function that
    turns that node into ``LoRADown`` or ``LoRAGradH`` (which no longer make ``t``) and returns the
    low-rank factors for ``MatMulBF16LoRA`` to add instead: ``(p, q, trans_q, scale)``; else None."""
    from onnx import helper

    _, made_by = _made_by_lone(nodes, g)

    def term(t: str) -> Any:
        n = made_by(t)
        if n is None or n.domain != domain:
            return None
        if n.op_type == "LoRA" and len(n.output) == 2 and t == n.output[0]:
            def down() -> tuple[str, str, int, float]:
                scale = float(_attrs(n)["scale"])
                x, a, b = n.input
                h = n.output[1]
                n.CopyFrom(helper.make_node("LoRADown", [x, a], [h], name=n.name, domain=domain))
                return h, b, 1, scale
            return down
        if n.op_type == "LoRAGrad" and len(n.output) == 3 and t == n.output[2]:
            def grad_h() -> tuple[str, str, int, float]:
                dh = t + "/dh"
                a = n.input[3]
                n.CopyFrom(helper.make_node("LoRAGradH", list(n.input), [n.output[0], n.output[1], dh], name=n.name,
                                            domain=domain, scale=float(_attrs(n)["scale"])))
                return dh, a, 0, 1.0
            return grad_h
        return None

    return term


def _lora_product(m: Any, low: tuple[str, str, int, float], acc: str | None, out: list[str], domain: str) -> Any:
    """``MatMulBF16LoRA`` in place of the product ``m``, adding ``low``'s term (and ``acc``)."""
    from onnx import helper

    p, q, trans_q, scale = low
    return helper.make_node("MatMulBF16LoRA", [m.input[0], m.input[1], p, q] + ([acc] if acc else []), out,
                            name=m.name, domain=domain, trans_q=trans_q, scale=scale, **_attrs(m))


def _fold_adds(nodes: list[Any], g: Any, domain: str) -> list[Any]:
    """``Add(MatMulBF16(a, w), b)`` where ``b`` is another product's output (a LoRA layer: the base
    product plus the adapter's branch) and nothing else reads the ``MatMulBF16``: one
    ``MatMulBF16Add(a, w, b)``, which adds ``b`` as it stores each sum (the same float32 add, no
    pass of its own). Where ``b`` is a ``LoRA`` op's branch, the branch's second product moves into
    the base product too: ``LoRADown`` and ``MatMulBF16LoRA``, so the branch is never stored."""
    from onnx import helper

    made, lone = _lone_products(nodes, g, domain)
    term = _lora_terms(nodes, g, domain)
    fold: dict[int, Any] = {}  # id(Add) -> the MatMulBF16Add that takes its place
    gone: set[int] = set()
    for n in nodes:
        if n.op_type != "Add" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            continue
        for k in (0, 1):
            mm, other = lone(n.input[k]), made.get(n.input[1 - k])
            if mm is None or id(mm) in gone:
                continue
            if other is None or other.op_type not in ("MatMul", "FusedMatMul", "MatMulBF16", "LoRA"):
                continue
            lora = term(n.input[1 - k])
            if lora is not None:
                fold[id(n)] = _lora_product(mm, lora(), None, list(n.output), domain)
                gone.add(id(mm))
                break
            fold[id(n)] = helper.make_node("MatMulBF16Add", [mm.input[0], mm.input[1], n.input[1 - k]],
                                           list(n.output), name=mm.name, domain=domain, **_attrs(mm))
            gone.add(id(mm))
            break
    return [fold.get(id(n), n) for n in nodes if id(n) not in gone]


def _fold_sums(nodes: list[Any], g: Any, domain: str) -> list[Any]:
    """A ``Sum`` of input gradients, some of them ``MatMulBF16`` products that nothing else reads
    (q, k and v's, gate and up's, a LoRA layer's base and branch): the products become a chain of
    ``MatMulBF16Add``, each adding the sum so far as it stores its own; the other inputs (a LoRA
    branch's gradient) start the chain. No pass of the ``Sum``'s own over the layer's input. A LoRA
    branch's input gradient from ``LoRAGrad`` is not stored either: the branch's ``dh`` and ``A``
    go into one of the products (``MatMulBF16LoRA``), one branch per product."""
    from onnx import helper

    made, lone = _lone_products(nodes, g, domain)
    term = _lora_terms(nodes, g, domain)
    out: list[Any] = []
    gone: set[int] = set()
    chains: dict[int, list[Any]] = {}
    for n in nodes:
        if n.op_type != "Sum" or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        prods = [m for m in map(lone, n.input) if m is not None and id(m) not in gone]
        if not prods or len({id(m) for m in prods}) != len(prods):
            continue
        rest = [t for t in n.input if id(made.get(t)) not in {id(m) for m in prods}]
        lows: list[Any] = []
        for t in list(rest):
            lora = term(t)
            if lora is not None and len(lows) < len(prods):
                lows.append(lora())
                rest.remove(t)
        chain: list[Any] = []
        acc = None
        if len(rest) == 1:
            acc = rest[0]
        elif len(rest) > 1:
            acc = n.output[0] + "/rest"
            chain.append(helper.make_node("Sum", rest, [acc], name=n.name + "/rest"))
        for k, m in enumerate(prods):
            last = k == len(prods) - 1
            y = n.output[0] if last else f"{n.output[0]}/part{k}"
            if k < len(lows):
                chain.append(_lora_product(m, lows[k], acc, [y], domain))
            elif acc is None:
                chain.append(helper.make_node("MatMulBF16", list(m.input), [y], name=m.name, domain=domain,
                                              **_attrs(m)))
            else:
                chain.append(helper.make_node("MatMulBF16Add", [m.input[0], m.input[1], acc], [y], name=m.name,
                                              domain=domain, **_attrs(m)))
            acc = y
        chains[id(n)] = chain
        gone |= {id(m) for m in prods}
    for n in nodes:
        if id(n) in gone:
            continue
        out.extend(chains.get(id(n), [n]))
    return out


def _round_swiglu_inputs(nodes: list[Any], g: Any, domain: str) -> list[Any]:
    """Where both inputs of a ``SwiGLU`` are ``MatMulBF16`` products read by nothing but that
    ``SwiGLU`` and its ``SwiGLUGrad``: the products become ``MatMulBF16Round`` (bfloat16 outputs)
    and the readers ``SwiGLUBF16`` and ``SwiGLUBF16Grad``, so the backward pass keeps the gate and
    up projections in half the bytes (as a bfloat16 model's own activations are)."""
    made = {n.output[0]: n for n in nodes if n.op_type == "MatMulBF16" and n.domain == domain}
    readers: dict[str, list[tuple[Any, int]]] = {}
    for n in nodes:
        for i, t in enumerate(n.input):
            readers.setdefault(t, []).append((n, i))
    outputs = {o.name for o in g.output}

    def only_swiglu(gate: str, up: str) -> bool:
        for t in (gate, up):
            for n, i in readers.get(t, []):
                pair = list(n.input[:2]) if n.op_type == "SwiGLU" else list(n.input[1:3]) \
                    if n.op_type == "SwiGLUGrad" else None
                if n.domain != domain or pair != [gate, up]:
                    return False
        return True

    chosen: set[str] = set()
    for n in nodes:
        if n.op_type == "SwiGLU" and n.domain == domain and len(n.input) >= 2:
            gate, up = n.input[0], n.input[1]
            if gate in made and up in made and gate != up and not {gate, up} & outputs and only_swiglu(gate, up):
                chosen |= {gate, up}
    if not chosen:
        return nodes
    for n in nodes:
        if n.op_type == "MatMulBF16" and n.output[0] in chosen:
            n.op_type = "MatMulBF16Round"
        elif n.op_type == "SwiGLU" and n.input[0] in chosen:
            n.op_type = "SwiGLUBF16"
        elif n.op_type == "SwiGLUGrad" and n.input[1] in chosen:
            n.op_type = "SwiGLUBF16Grad"
    keep = [v for v in g.value_info if v.name not in chosen]  # their type is bfloat16 now
    del g.value_info[:]
    g.value_info.extend(keep)
    return nodes
