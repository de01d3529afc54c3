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
  gradient rule of ``MatMulNBits`` (``edgetune.workstation.gradients``) dequantizes the weight again in
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

from edgetune.formats.errors import ConfigError

BITS = {"int4": 4, "int8": 8}
# A uint8 graph input, fed 4 for int4 and 0 for int8: the nibble shift of the backward dequant.
# Because the dequant starts from a run-time value, ONNX Runtime cannot fold it into a float32
# constant when it loads the graph.
RUNTIME_SHIFT = "edgetune.dequant_shift"

PARTS = (".q", ".scale", ".zero")  # a quantized weight W's tensors: W.q, W.scale, W.zero
COPY = "T"  # and its transposed int8 copy's (compute int8 graphs): W.qT, W.scaleT, W.zeroT


def tensor_names(weight: str, copy: bool = False) -> tuple[str, str, str]:
    """The names of the tensors that hold the quantized ``weight`` (codes, scales, zero points),
    or with ``copy`` those of its transposed int8 copy (see :func:`transposed`)."""
    q, s, z = (weight + part + (COPY if copy else "") for part in PARTS)
    return q, s, z


def weight_name(tensor: str) -> str | None:
    """The weight that ``tensor`` (one of :func:`tensor_names`) belongs to, else None."""
    for part in PARTS:
        for sfx in (part, part + COPY):
            if tensor.endswith(sfx):
                return tensor[:-len(sfx)]
    return None


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

def transposed(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, block: int,
               k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The int8 copy of ``W^T [K, N]`` in blocks along ``N``, quantized from the weight the
    forward pass's ``MatMulNBits`` computes: what a ``compute int8`` graph's input-gradient
    product reads (``W.qT``, ``W.scaleT``, ``W.zeroT``). For int8 that is the dequantized ``W``;
    for int4 the symmetric part ``(code - 8) * scale``, since a ``compute int8`` graph splits an
    int4 product into that part and a small zero-point correction of its own (see
    :func:`edgetune.workstation.quantize.rewrite`), whose gradient the graph computes apart."""
    if bits == 4:
        zero = np.full(zero.shape, 8.0, np.float32)
    w = dequantize(codes, scale, zero, bits, k)
    return quantize(np.ascontiguousarray(w.T), 8, block)


def read_at(f: Any, offset: int, length: int, dtype: Any) -> np.ndarray:
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
        return read_at(data, e["offset"], e["length"], e["dtype"]).reshape(e["shape"])

    size = max(e["offset"] + e["length"] for e in layout.values())
    with open(dest, "wb") as f:
        f.truncate(size)
        for name, e in sorted(layout.items(), key=lambda kv: kv[1]["offset"]):
            if name in quantized:
                arr = dequantize(*(raw(t) for t in tensor_names(name)), int(q["bits"]),
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
