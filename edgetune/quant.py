"""A quantized frozen base, as QLoRA trains it: block-wise int4 or int8 weights, float32 adapters.

Storage is ONNX Runtime's ``MatMulNBits`` layout, one set of tensors per linear weight
``W [N, K]`` (``N`` outputs, ``K`` inputs), in blocks of ``block_size`` along ``K``:

- ``<W>.q``      uint8 ``[N, K/bs, bs*bits/8]``: codes 0..2^bits-1, two int4 codes per byte
                 (low nibble first);
- ``<W>.scale``  float32 ``[N * K/bs]``;
- ``<W>.zero``   ``[N * K/bs]``, float32 for int4, uint8 for int8 (what MatMulNBits accepts):
                 ``w = (code - zero) * scale``.

Codes, scales and zero points are asymmetric min/max per block (as GGUF's Q4_1 and Q8_1 store
them: the block minimum is code 0, the maximum the top code). For a model read from a Q4_1 GGUF
file with blocks of 32, this recovers the file's own codes: the float32 weights edgetune
dequantized from it lie on each block's 16-level grid, and re-quantizing them finds that grid
again (``tests/test_quant.py`` and the real-model test measure how exactly).

In the graphs:

- forward (training, evaluation and inference): ``MatMulNBits`` on the quantized tensors; export
  quantizes the forward graph before the gradient builder sees it, so float32 weights are
  never written;
- backward (the input gradient ``dY @ W``, which the adapters of earlier layers need): the
  gradient rule of ``MatMulNBits`` (``edgetune.autodiff``) dequantizes the weight again in
  standard ONNX ops right before its one MatMul, freed after it, so no float32 copy of the
  weights stays alive between forward and backward. The dequant starts from a graph input
  (``RUNTIME_SHIFT``), so ONNX Runtime cannot fold it into a float32 constant when it loads
  the graph.

Embeddings (and a tied ``lm_head``) stay float32. An untied ``lm_head`` is quantized too
(bitsandbytes' QLoRA keeps it in 16 bits): on a Phi-3-mini-shaped model its float32 copy
measured 0.3 GB more at the training peak, which is what a device runs out of.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigError

BITS = {"int4": 4, "int8": 8}
# A uint8 graph input, fed 4 for int4 and 0 for int8: the nibble shift of the backward dequant.
# Because the dequant starts from a run-time value, ONNX Runtime cannot fold it into a float32
# constant when it loads the graph.
RUNTIME_SHIFT = "edgetune.dequant_shift"


def runtime_feeds(bits: int) -> dict[str, np.ndarray]:
    return {RUNTIME_SHIFT: np.array(4 if bits == 4 else 0, np.uint8)}


def check(method: str | None, block_size: int) -> None:
    if method is not None and method not in BITS:
        raise ConfigError(f"quantize must be one of {', '.join(BITS)} (or none), got {method!r}")
    if block_size not in (16, 32, 64, 128):
        raise ConfigError(f"block_size must be 16, 32, 64 or 128, got {block_size!r}")


def quantize(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``W [N, K]`` -> (packed codes, scales, zero points) in MatMulNBits' layout."""
    return quantize_with_error(w, bits, block)[:3]  # type: ignore[return-value]


def quantize_with_error(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """:func:`quantize`, plus the largest absolute rounding error ``|w - (code - zero) * scale|``
    (from the rounding residual, without dequantizing)."""
    n, k = w.shape
    if k % block:
        raise ConfigError(f"a weight with {k} inputs cannot be split into blocks of {block}; use --block-size 16 or 32")
    top = (1 << bits) - 1
    wb = w.astype(np.float32, copy=False).reshape(n, k // block, block)
    lo, hi = wb.min(-1), wb.max(-1)
    if bits == 8:  # an integer zero point: the range must hold 0 (standard asymmetric uint8)
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    scale = (hi - lo) / np.float32(top)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)  # a constant block: any scale
    zero = (-lo / scale).astype(np.float32)
    if bits == 8:
        # ONNX Runtime's 8-bit MatMulNBits takes integer zero points only.
        zero = np.clip(np.rint(zero), 0, top).astype(np.uint8)
    t = wb / scale[..., None]
    t += zero[..., None]
    c = np.rint(t)
    np.clip(c, 0, top, out=c)
    t -= c
    np.abs(t, out=t)
    t *= scale[..., None]
    err = float(t.max()) if t.size else 0.0
    del t
    codes = c.astype(np.uint8)
    del c
    if bits == 4:
        codes = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(codes), scale.reshape(-1), zero.reshape(-1), err


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The float32 weight ``[N, K]`` the graphs compute from the quantized tensors."""
    n, nb = codes.shape[0], codes.shape[1]
    if bits == 4:
        q = np.empty((n, nb, codes.shape[2] * 2), np.uint8)
        q[..., 0::2] = codes & 0x0F
        q[..., 1::2] = codes >> 4
    else:
        q = codes
    w = (q.astype(np.float32) - zero.astype(np.float32).reshape(n, nb, 1)) * scale.reshape(n, nb, 1)
    return w.reshape(n, k)[:, :k]


# -- graph rewriting ----------------------------------------------------------------------------
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
    later, one weight at a time, by :func:`edgetune.extdata.write_external`)."""
    from onnx import TensorProto

    nb = k // block
    out = []
    for suffix, dims, dtype in ((".q", [n, nb, block * bits // 8], TensorProto.UINT8),
                                (".scale", [n * nb], TensorProto.FLOAT),
                                (".zero", [n * nb], TensorProto.FLOAT if bits == 4 else TensorProto.UINT8)):
        t = TensorProto(name=name + suffix, data_type=dtype)
        t.dims.extend(dims)
        out.append(t)
    return out


def rewrite(model: Any, names: list[str], quantized: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None,
            bits: int, block: int, inference: bool = False) -> None:
    """Replace each weight in ``names`` by its quantized tensors: ``x @ W^T`` becomes
    ``MatMulNBits``, any other use (the backward ``dY @ W``) a run-time dequantization.
    With ``quantized`` None, the new tensors are placeholders to be written lazily. With
    ``inference``, int4 layers take ONNX Runtime's packed kernels (see :func:`_nbits`)."""
    from onnx import TensorProto, helper, numpy_helper

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
        qn, sn, zn = f"{name}.q", f"{name}.scale", f"{name}.zero"
        if quantized is None:
            g.initializer.extend(placeholders(name, n, k, bits, block))
        else:
            codes, scale, zero = quantized[name]
            g.initializer.extend([numpy_helper.from_array(codes, qn), numpy_helper.from_array(scale, sn),
                                  numpy_helper.from_array(zero, zn)])
        nbits = dict(K=k, N=n, bits=bits, block_size=block)
        dq_count = 0
        for node, i in cons.get(name, []):
            at = index[id(node)]
            if node.op_type == "FusedMatMul" and _attr(node, "transB", 0) == 1 and _attr(node, "transA", 0) == 0:
                out = node.output[0]
                alpha = float(_attr(node, "alpha", 1.0))
                mm_out = out if alpha == 1.0 else f"{out}.unscaled"
                nodes = _nbits(g, node.input[0], mm_out, qn, sn, zn, f"{node.name or out}.nbits", nbits, inference)
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
                               inference))
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
           inference: bool) -> list[Any]:
    """``out = x @ W^T`` on the quantized tensors.

    ONNX Runtime packs a ``MatMulNBits`` weight for its fast kernels only when the zero points
    are integers; with float zero points (ours for int4, so that a GGUF's Q4_1 blocks stay
    exact) every call dequantizes the whole weight first, about 35 times slower for one token.
    For inference graphs an int4 layer is therefore split exactly, with ``w = (c - z) s =
    (c - 8) s + (8 - z) s``: a ``MatMulNBits`` without zero points (8 by default, packed, fast)
    plus the block sums of ``x`` times ``C = ((8 - z) s)^T`` ``[K/bs, N]``, a GEMM 1/``bs`` the
    size, whose constant ONNX Runtime folds when it loads the graph. Training graphs keep the
    plain form: their sessions do not pre-pack (each weight would be held twice), and the split
    form measured slower there (63 against 52 s per step on the Phi-3-mini-shaped model)."""
    from onnx import helper, numpy_helper

    if not inference or attrs["bits"] != 4:
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


def _read(f: Any, offset: int, length: int, dtype: Any) -> np.ndarray:
    f.seek(offset)
    buf = f.read(length)
    if len(buf) != length:
        raise ValueError(f"{getattr(f, 'name', 'data file')}: {len(buf)} bytes at offset {offset}, expected {length}")
    return np.frombuffer(buf, dtype)


def write_float_data(b: Any, dest: Any) -> None:
    """The float32 weight file of a quantized bundle's (float) merge template: every tensor in
    its place, quantized weights dequantized, one tensor in memory at a time. A QLoRA adapter
    merges into this float base, as QLoRA deploys."""
    q = b.manifest["quantization"]
    layout, src = q["merge_layout"], q["infer_weights"]
    quantized = set(q["weights"])
    # Read, not mapped: the process holds one tensor at a time, not every page it has read.
    data = open(b.path("infer.onnx.data"), "rb")

    def raw(name: str) -> np.ndarray:
        e = src[name]
        return _read(data, e["offset"], e["length"], e["dtype"]).reshape(e["shape"])

    size = max(e["offset"] + e["length"] for e in layout.values())
    with open(dest, "wb") as f:
        f.truncate(size)
        for name, e in sorted(layout.items(), key=lambda kv: kv[1]["offset"]):
            if name in quantized:
                arr = dequantize(raw(f"{name}.q"), raw(f"{name}.scale"), raw(f"{name}.zero"), int(q["bits"]),
                                 int(e["shape"][1]))
            else:
                arr = raw(name)
            buf = np.ascontiguousarray(arr, dtype=e["dtype"]).tobytes()
            if len(buf) != e["length"]:
                raise ValueError(f"{name}: {len(buf)} bytes for a slot of {e['length']}")
            f.seek(e["offset"])
            f.write(buf)
    data.close()


def change_kept(before: np.ndarray, after: np.ndarray, bits: int, block: int) -> tuple[float, float]:
    """How much of the change ``after - before`` survives quantizing ``after``: the projection
    <Q(after) - before, after - before> and ||after - before||^2 (their ratio is 1 when all of it
    survives, 0 when ``after`` rounds back onto the grid ``before`` came from)."""
    delta = after.astype(np.float64) - before
    back = dequantize(*quantize(after, bits, block), bits, after.shape[1])
    return float(((back.astype(np.float64) - before) * delta).sum()), float(np.square(delta).sum())


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

    from . import extdata

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
        return lambda: _read(data, off, length, dtypes[init.data_type]).reshape(dims)

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
