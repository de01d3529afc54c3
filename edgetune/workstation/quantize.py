"""Graph rewriting for a quantized frozen base: ``MatMulNBits`` forward, a dequantizing
backward, and re-quantizing a merged model (the block codec is :mod:`edgetune.formats.quantized`)."""
from __future__ import annotations

from typing import Any

import numpy as np

from edgetune.formats.errors import ConfigError
from edgetune.formats.quantized import BITS, PARTS, RUNTIME_SHIFT, check, read_at, tensor_names, transposed


def _consumers(g: Any) -> dict[str, list[tuple[Any, int]]]:
    out: dict[str, list[tuple[Any, int]]] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            out.setdefault(name, []).append((node, i))
    return out


def linear_weights(g: Any, adapter_names: set[str]) -> list[str]:
    """Frozen 2-D float weights used only as the right-hand side of linear layers (MatMul,
    FusedMatMul, or Transpose feeding MatMul); never an embedding (Gather) or an adapter."""
    from onnx import TensorProto

    cons = _consumers(g)
    out = []
    for init in g.initializer:
        if init.name in adapter_names or len(init.dims) != 2 or init.data_type != TensorProto.FLOAT:
            continue
        uses = cons.get(init.name, [])
        ok = bool(uses)
        for node, i in uses:
            if node.op_type in ("MatMul", "FusedMatMul") and i == 1:
                continue
            if node.op_type == "Transpose" and all(n2.op_type == "MatMul" and j == 1
                                                   for n2, j in cons.get(node.output[0], [])):
                continue
            ok = False
        if ok:
            out.append(init.name)
    return out


def placeholders(name: str, n: int, k: int, bits: int, block: int) -> list[Any]:
    """The quantized tensors of ``W [n, k]`` with type and shape only (their data is written
    later, one weight at a time, by :func:`edgetune.workstation.extdata.write_external`)."""
    from onnx import TensorProto

    nb = k // block
    out = []
    for suffix, dims, dtype in zip(PARTS, ([n, nb, block * bits // 8], [n * nb], [n * nb]),
                                   (TensorProto.UINT8, TensorProto.FLOAT,
                                    TensorProto.FLOAT if bits == 4 else TensorProto.UINT8)):
        t = TensorProto(name=name + suffix, data_type=dtype)
        t.dims.extend(dims)
        out.append(t)
    return out


def rewrite(model: Any, names: list[str], quantized: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None,
            bits: int, block: int, inference: bool = False, compute: str = "float32") -> None:
    """Replace each weight in ``names`` by its quantized tensors: ``x @ W^T`` becomes
    ``MatMulNBits``, any other use (the backward ``dY @ W``) a run-time dequantization.
    With ``quantized`` None, the new tensors are placeholders to be written lazily. With
    ``inference``, int4 layers take ONNX Runtime's packed kernels (see :func:`_nbits`).

    ``compute="int8"`` sets ``accuracy_level`` 4 on every ``MatMulNBits`` (ONNX Runtime
    quantizes the activations to int8 per block of ``block`` and multiplies in integers where the
    CPU has the kernels) and adds a transposed int8 copy of each weight, ``W.qT`` ``[K, N/bs, bs]``
    with its scales and zero points, quantized in blocks along ``N`` from the weight the forward
    ``MatMulNBits`` computes: the gradient rule of ``MatMulNBits`` then computes the input
    gradient ``dY @ W`` as a ``MatMulNBits`` on that copy (an int8 product) instead of
    dequantizing ``W`` (see :func:`edgetune.workstation.gradients.matmul`). An int4 weight's
    float zero points keep ONNX Runtime off its int8 kernels, so its product takes the split
    form of :func:`_nbits` (a ``MatMulNBits`` without zero points plus a correction 1/``block``
    the size, whose gradient the graph computes in standard ops); its copy is of the
    symmetric part."""
    from onnx import TensorProto, helper, numpy_helper

    int8 = compute == "int8"

    g = model.graph
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    cons = _consumers(g)
    inits = {i.name: i for i in g.initializer}
    new_nodes: dict[int, list[Any]] = {}  # index of the node to insert before -> nodes
    index = {id(n): k for k, n in enumerate(g.node)}
    drop: set[int] = set()
    need_shift = False
    for name in names:
        n, k = list(inits[name].dims)
        if k % block:
            raise ConfigError(f"a weight with {k} inputs cannot be split into blocks of {block}; use --block-size 16 or 32")
        qn, sn, zn = tensor_names(name)
        if quantized is None:
            g.initializer.extend(placeholders(name, n, k, bits, block))
        else:
            codes, scale, zero = quantized[name]
            g.initializer.extend([numpy_helper.from_array(codes, qn), numpy_helper.from_array(scale, sn),
                                  numpy_helper.from_array(zero, zn)])
        nbits = dict(K=k, N=n, bits=bits, block_size=block)
        split = inference or int8
        if int8:
            if n % block:
                raise ConfigError(f"{name} has {n} outputs, which cannot be split into blocks of {block} for "
                                  "its transposed int8 copy; use --block-size 16 or 32, or --compute float32")
            nbits["accuracy_level"] = 4
            if quantized is None:
                for t, copy in zip(placeholders(name, k, n, 8, block), tensor_names(name, copy=True)):
                    t.name = copy
                    g.initializer.append(t)
            else:
                g.initializer.extend(numpy_helper.from_array(a, copy) for a, copy in
                                     zip(transposed(*quantized[name], bits, block, k), tensor_names(name, copy=True)))
        dq_count = 0
        for node, i in cons.get(name, []):
            at = index[id(node)]
            if node.op_type == "FusedMatMul" and _attr(node, "transB", 0) == 1 and _attr(node, "transA", 0) == 0:
                out = node.output[0]
                alpha = float(_attr(node, "alpha", 1.0))
                mm_out = out if alpha == 1.0 else f"{out}.unscaled"
                nodes = _nbits(g, node.input[0], mm_out, qn, sn, zn, f"{node.name or out}.nbits", nbits, split)
                if alpha != 1.0:
                    c = f"{out}.alpha"
                    g.initializer.append(numpy_helper.from_array(np.array(alpha, np.float32), c))
                    nodes.append(helper.make_node("Mul", [mm_out, c], [out]))
                new_nodes.setdefault(at, []).extend(nodes)
                drop.add(at)
            elif node.op_type == "Transpose":
                for mm, j in cons.get(node.output[0], []):
                    new_nodes.setdefault(index[id(mm)], []).extend(
                        _nbits(g, mm.input[0], mm.output[0], qn, sn, zn, f"{mm.name or mm.output[0]}.nbits", nbits,
                               split))
                    drop.add(index[id(mm)])
                drop.add(at)
            else:
                # Dequantize right before this use, once per use: freed after it, never shared.
                dq_count += 1
                w = f"{name}.dq{dq_count}"
                other = node.input[1 - i] if len(node.input) == 2 else None
                new_nodes.setdefault(at, []).extend(_dequant_nodes(qn, sn, zn, w, n, k, bits, block, helper,
                                                                   numpy_helper, g, after=other))
                node.input[i] = w
                need_shift = True
        g.initializer.remove(inits[name])
    kept = []
    for k_, node in enumerate(g.node):
        kept.extend(new_nodes.get(k_, []))
        if k_ not in drop:
            kept.append(node)
    del g.node[:]
    g.node.extend(kept)
    if need_shift and not any(i.name == RUNTIME_SHIFT for i in g.input):
        g.input.append(helper.make_tensor_value_info(RUNTIME_SHIFT, TensorProto.UINT8, []))


def _nbits(g: Any, x: str, out: str, qn: str, sn: str, zn: str, name: str, attrs: dict[str, int],
           split: bool) -> list[Any]:
    """``out = x @ W^T`` on the quantized tensors.

    ONNX Runtime packs a ``MatMulNBits`` weight for its fast kernels only when the zero points
    are integers; with float zero points (ours for int4, so that a GGUF's Q4_1 blocks stay
    exact) every call dequantizes the whole weight first, about 35 times slower for one token.
    With ``split`` (inference graphs, and training graphs whose products run in int8), an int4
    layer is therefore split exactly, with ``w = (c - z) s =
    (c - 8) s + (8 - z) s``: a ``MatMulNBits`` without zero points (8 by default, packed, fast)
    plus the block sums of ``x`` times ``C = ((8 - z) s)^T`` ``[K/bs, N]``, a GEMM 1/``bs`` the
    size, whose constant ONNX Runtime folds when it loads the graph. Training graphs with float32
    products keep the plain form: their sessions do not pre-pack (each weight would be held
    twice), and the split form measured slower there (63 against 52 s per step on the
    Phi-3-mini-shaped model)."""
    from onnx import helper, numpy_helper

    if not split or attrs["bits"] != 4:
        return [helper.make_node("MatMulNBits", [x, qn, sn, zn], [out], domain="com.microsoft", name=name, **attrs)]
    n, k, bs = attrs["N"], attrs["K"], attrs["block_size"]
    p = f"{out}.nbits"
    consts = {f"{p}.eight": np.array(8.0, np.float32), f"{p}.nk": np.array([n, k // bs], np.int64),
              f"{p}.blocks": np.array([-1, k // bs, bs], np.int64), f"{p}.axes": np.array([-1], np.int64)}
    # Constant nodes, not initializers: shapes must stay inside the graph (the data file holds weights).
    return [helper.make_node("Constant", [], [c], value=numpy_helper.from_array(v, c), name=c) for c, v in consts.items()] + [
        helper.make_node("MatMulNBits", [x, qn, sn], [f"{p}.sym"], domain="com.microsoft", name=name, **attrs),
        helper.make_node("Sub", [f"{p}.eight", zn], [f"{p}.c0"], name=f"{p}.c0"),
        helper.make_node("Mul", [f"{p}.c0", sn], [f"{p}.c1"], name=f"{p}.c1"),
        helper.make_node("Reshape", [f"{p}.c1", f"{p}.nk"], [f"{p}.c2"], name=f"{p}.c2"),
        helper.make_node("Transpose", [f"{p}.c2"], [f"{p}.corr"], perm=[1, 0], name=f"{p}.corr"),
        helper.make_node("Reshape", [x, f"{p}.blocks"], [f"{p}.xb"], name=f"{p}.xb"),
        helper.make_node("ReduceSum", [f"{p}.xb", f"{p}.axes"], [f"{p}.xs"], keepdims=0, name=f"{p}.xs"),
        helper.make_node("MatMul", [f"{p}.xs", f"{p}.corr"], [f"{p}.fix2"], name=f"{p}.fix2"),
        helper.make_node("Shape", [f"{p}.sym"], [f"{p}.shape"], name=f"{p}.shape"),
        helper.make_node("Reshape", [f"{p}.fix2", f"{p}.shape"], [f"{p}.fix"], name=f"{p}.fix"),
        helper.make_node("Add", [f"{p}.sym", f"{p}.fix"], [out], name=f"{p}.add"),
    ]


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _dequant_nodes(qn: str, sn: str, zn: str, out: str, n: int, k: int, bits: int, block: int, helper: Any,
                   numpy_helper: Any, g: Any, after: str | None = None) -> list[Any]:
    nodes, consts = dequant_ops(qn, sn, zn, out, n, k, bits, block, after)
    g.initializer.extend(numpy_helper.from_array(v, name) for name, v in consts.items())
    return nodes


def dequant_ops(qn: str, sn: str, zn: str | None, out: str, n: int, k: int, bits: int, block: int,
                after: str | None = None) -> tuple[list[Any], dict[str, np.ndarray]]:
    """``(code - zero) * scale`` in standard ops; the int4 unpack runs on bytes. With ``after``
    (the MatMul's other operand, the incoming gradient), the dequant cannot start before that
    tensor exists: ONNX Runtime would otherwise be free to run every layer's dequant early and
    hold all the float32 weights at once. Without ``zn``, the zero point is MatMulNBits'
    default, ``2^(bits-1)``. Returns the nodes and the constants they read."""
    from onnx import helper

    nb = k // block
    p = out
    consts = {f"{p}.shape3": np.array([n, nb, 1], np.int64), f"{p}.shapeK": np.array([n, k], np.int64)}
    nodes = []
    sh = RUNTIME_SHIFT
    if after is not None:
        consts[f"{p}.zero64"] = np.array([0], np.int64)
        nodes += [
            helper.make_node("Shape", [after], [f"{p}.dep_shape"], start=0, end=1),
            helper.make_node("Mul", [f"{p}.dep_shape", f"{p}.zero64"], [f"{p}.dep0"]),
            helper.make_node("Cast", [f"{p}.dep0"], [f"{p}.dep8"], to=2),  # uint8 0, once the gradient exists
            helper.make_node("Max", [RUNTIME_SHIFT, f"{p}.dep8"], [f"{p}.shift"]),
        ]
        sh = f"{p}.shift"
    if bits == 4:
        consts.update({f"{p}.axes": np.array([-1], np.int64), f"{p}.shapeB": np.array([n, nb, block], np.int64)})
        nodes += [
            helper.make_node("BitShift", [qn, sh], [f"{p}.hi"], direction="RIGHT"),
            helper.make_node("BitShift", [qn, sh], [f"{p}.up"], direction="LEFT"),  # uint8: drops the high nibble
            helper.make_node("BitShift", [f"{p}.up", sh], [f"{p}.lo"], direction="RIGHT"),
            helper.make_node("Unsqueeze", [f"{p}.lo", f"{p}.axes"], [f"{p}.lo1"]),
            helper.make_node("Unsqueeze", [f"{p}.hi", f"{p}.axes"], [f"{p}.hi1"]),
            helper.make_node("Concat", [f"{p}.lo1", f"{p}.hi1"], [f"{p}.pairs"], axis=-1),
            helper.make_node("Reshape", [f"{p}.pairs", f"{p}.shapeB"], [f"{p}.codes"]),
        ]
    else:
        nodes.append(helper.make_node("BitShift", [qn, sh], [f"{p}.codes"], direction="RIGHT"))  # shift 0
    nodes += [
        helper.make_node("Cast", [f"{p}.codes"], [f"{p}.f"], to=1),
        helper.make_node("Reshape", [sn, f"{p}.shape3"], [f"{p}.s"]),
    ]
    if zn:
        nodes += [helper.make_node("Cast", [zn], [f"{p}.zf"], to=1),
                  helper.make_node("Reshape", [f"{p}.zf", f"{p}.shape3"], [f"{p}.z"])]
    else:
        consts[f"{p}.z"] = np.array(float(1 << (bits - 1)), np.float32)
    nodes += [
        helper.make_node("Sub", [f"{p}.f", f"{p}.z"], [f"{p}.c"]),
        helper.make_node("Mul", [f"{p}.c", f"{p}.s"], [f"{p}.w3"]),
        helper.make_node("Reshape", [f"{p}.w3", f"{p}.shapeK"], [out]),
    ]
    return nodes, consts


def quantize_model(onnx_path: Any, data_name: str, method: str, block: int,
                   log: Any = lambda s: None) -> dict[str, Any]:
    """Re-quantize an inference model in place (a merged model): every linear weight becomes
    block-quantized ``MatMulNBits``; the embedding and the norms stay float. Streams one weight
    at a time from the float data file into a new one. Returns what the merged manifest records."""
    try:
        import onnx
    except ImportError:
        raise ConfigError("merge --quantize rewrites the graph and needs the onnx package: "
                          "pip install onnx (or merge without --quantize)") from None
    from pathlib import Path

    from edgetune.workstation import extdata

    check(method, block)
    bits = BITS[method]
    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    names = linear_weights(model.graph, set())
    data = open(onnx_path.parent / data_name, "rb")  # read, not mapped (see write_float_data)
    dtypes = {1: np.float32, 2: np.uint8, 7: np.int64, 6: np.int32, 10: np.float16, 9: np.bool_}

    def reader(init: Any) -> Any:
        ext = {e.key: e.value for e in init.external_data}
        off, length = int(ext.get("offset", 0)), int(ext["length"])
        dims = list(init.dims)
        return lambda: read_at(data, off, length, dtypes[init.data_type]).reshape(dims)

    lazy = {i.name: reader(i) for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
    qz = extdata.Quantized(lambda name: np.array(lazy[name](), np.float32), bits, block)
    rewrite(model, names, None, bits, block, inference=True)
    for name in names:
        lazy.update(qz.loaders(name))
    tmp_name = data_name + ".quantized"
    extdata.write_external(model, onnx_path.with_name(onnx_path.name + ".tmp"), tmp_name, lazy, threshold=0)
    data.close()
    (onnx_path.parent / tmp_name).replace(onnx_path.parent / data_name)
    model = onnx.load(str(onnx_path.with_name(onnx_path.name + ".tmp")), load_external_data=False)
    for init in model.graph.initializer:
        for e in init.external_data:
            if e.key == "location":
                e.value = data_name
    onnx.save(model, str(onnx_path))
    onnx_path.with_name(onnx_path.name + ".tmp").unlink()
    log(f"quantized {len(names)} linear weights to {method} (blocks of {block}): "
        f"{qz.float_bytes / 2**20:.0f} MB -> {qz.quantized_bytes / 2**20:.0f} MB")
    return {"method": method, "bits": bits, "block_size": block, "weights": len(names),
            "float_bytes": qz.float_bytes, "quantized_bytes": qz.quantized_bytes,
            "max_relative_error": qz.max_relative_error}
