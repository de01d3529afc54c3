"""Weights streamed tensor by tensor (workstation side): read from a model's checkpoint files,
written into an ONNX graph's external data file.

Export never loads the model's weights as a whole: graphs are traced from a model whose
weights are placeholders, and each weight is read from the checkpoint, converted (float32, or
block-quantized), written and freed before the next. Graphs of any size are saved with external
data, so protobuf's 2 GB limit never applies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from edgetune.formats import quantized
from edgetune.formats.errors import ModelError

Loader = Callable[[], np.ndarray]
PAGE = 4096


def _raw(init: Any) -> bytes | None:
    """The bytes of an initializer stored inside the graph (raw or typed fields)."""
    from onnx import TensorProto, numpy_helper

    if init.data_location == TensorProto.EXTERNAL:
        return None
    if init.HasField("raw_data"):
        return init.raw_data
    return numpy_helper.to_array(init).tobytes()


def write_external(proto: Any, onnx_path: Path, data_name: str, lazy: Mapping[str, Loader] | None = None,
                   threshold: int = 1024, dry: bool = False) -> None:
    """Save ``proto`` as ``onnx_path`` with its weights in ``data_name`` beside it.

    Initializers named in ``lazy`` hold only their type and shape; their values come from the
    loader, one at a time, as they are written. Other initializers of at least ``threshold``
    bytes move to the data file too; those already external keep their place. New tensors go
    at the end of an existing data file; large ones start on a page boundary, so ONNX Runtime
    can map them. With ``dry``, offsets are assigned as if written and no data is written.
    """
    import onnx
    from onnx import TensorProto

    lazy = lazy or {}
    data_path = onnx_path.parent / data_name
    itemsize = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.INT64: 8,
                TensorProto.INT32: 4, TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.DOUBLE: 8,
                TensorProto.BOOL: 1}
    dtypes = {TensorProto.FLOAT: np.float32, TensorProto.UINT8: np.uint8, TensorProto.INT64: np.int64}
    f = None if dry else open(data_path, "r+b" if data_path.exists() else "wb")
    try:
        pos = data_path.stat().st_size if data_path.exists() else 0
        for init in proto.graph.initializer:
            if init.name in lazy:
                size = int(np.prod(init.dims, dtype=np.int64)) * itemsize[init.data_type]
                payload: bytes | np.ndarray | None = None
                if not dry:
                    arr = np.asarray(lazy[init.name]())
                    want = dtypes.get(init.data_type)
                    if want is not None and arr.dtype != want:
                        arr = arr.astype(want)
                    if list(arr.shape) != list(init.dims):
                        raise ModelError(f"{init.name}: the checkpoint holds shape {list(arr.shape)}, the model "
                                         f"expects {list(init.dims)}")
                    payload = np.ascontiguousarray(arr)
            else:
                raw = _raw(init)
                if raw is None or len(raw) < threshold:
                    continue
                size, payload = len(raw), raw
            align = PAGE if size >= 1 << 20 else 64
            pos = (pos + align - 1) // align * align
            if f is not None:
                f.seek(pos)
                f.write(payload.data if isinstance(payload, np.ndarray) else payload)  # type: ignore[union-attr]
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                init.ClearField(field)
            del init.external_data[:]
            init.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(pos)), ("length", str(size))):
                init.external_data.append(onnx.StringStringEntryProto(key=k, value=v))
            pos += size
        if f is not None and f.tell() < pos:
            f.truncate(pos)
    finally:
        if f is not None:
            f.close()
    onnx.save(proto, str(onnx_path))


class Quantized:
    """Lazy block quantization of checkpoint weights: loaders for ``W.q``, ``W.scale`` and
    ``W.zero`` that quantize ``W`` once (the three are written one after another)."""

    def __init__(self, load: Callable[[str], np.ndarray], bits: int, block: int) -> None:
        self.load, self.bits, self.block = load, bits, block
        self._last: tuple[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        self._last_t: tuple[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        self.float_bytes = 0
        self.quantized_bytes = 0
        self.max_relative_error = 0.0

    def parts(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._last is None or self._last[0] != name:
            w = self.load(name)
            *q, err = quantized.quantize_with_error(w, self.bits, self.block)
            self.max_relative_error = max(self.max_relative_error, err / max(1e-12, float(np.abs(w).max())))
            self.float_bytes += w.nbytes
            self.quantized_bytes += sum(a.nbytes for a in q)
            self._last = (name, tuple(q))  # type: ignore[assignment]
        return self._last[1]

    def loaders(self, name: str, transposed: bool = False) -> dict[str, Loader]:
        """Loaders of ``W.q``, ``W.scale``, ``W.zero``; with ``transposed``, also of the int8 copy of
        ``W^T`` that ``compute int8`` graphs take (``W.qT``, ...; see :func:`quantize.rewrite`)."""
        out: dict[str, Loader] = {t: (lambda i=i: self.parts(name)[i])
                                  for i, t in enumerate(quantized.tensor_names(name))}
        if transposed:
            out.update({t: (lambda i=i: self.transposed(name)[i])
                        for i, t in enumerate(quantized.tensor_names(name, copy=True))})
        return out

    def transposed(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._last_t is None or self._last_t[0] != name:
            codes = self.parts(name)[0]
            k = codes.shape[1] * codes.shape[2] * 8 // self.bits
            self._last_t = (name, quantized.transposed(*self.parts(name), self.bits, self.block, k))
        return self._last_t[1]
