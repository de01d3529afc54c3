"""DoRA in the graphs: the weight norm is a graph input, computed outside the graph.

DoRA scales each output row of ``W + s B A`` to a learned magnitude ``m``:
``y = m / ||W + s B A|| * (x W^T + s x A^T B^T)``. PEFT (following the DoRA paper,
section 4.3) treats the norm as a constant in the backward pass. ONNX has no stop-gradient,
so edgetune's graphs take the norm as an input (``dora_norm.<module>``) and the caller
computes it from the current weights: the trainer before every optimizer step, inference
once when it loads an adapter. The gradient then flows exactly as in PEFT.

The norm is computed without forming ``W + s B A``:
``||W_o + s (BA)_o||^2 = ||W_o||^2 + 2 s (W A^T)_o . B_o + s^2 B_o (A A^T) B_o^T``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

NORM_PREFIX = "dora_norm."


@dataclass(frozen=True)
class DoraModule:
    """Graph names of one DoRA-adapted linear layer."""

    path: str  # e.g. base_model.model.model.layers.0.self_attn.q_proj

    @property
    def a(self) -> str:
        return f"{self.path}.lora_A.default.weight"

    @property
    def b(self) -> str:
        return f"{self.path}.lora_B.default.weight"

    @property
    def magnitude(self) -> str:
        return f"{self.path}.lora_magnitude_vector.default.weight"

    @property
    def base(self) -> str:
        return f"{self.path}.base_layer.weight"

    @property
    def norm_input(self) -> str:
        return NORM_PREFIX + self.path


def modules(trainable: list[str]) -> list[DoraModule]:
    """The DoRA layers among a bundle's trainable tensors, in graph order."""
    suffix = ".lora_magnitude_vector.default.weight"
    return [DoraModule(n[: -len(suffix)]) for n in trainable if n.endswith(suffix)]


def row_norms(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, w_sq: np.ndarray | None = None) -> np.ndarray:
    """``||W + scale * B @ A||`` per output row, float32, without building the full matrix.

    ``w_sq`` is ``(W * W).sum(1)`` in float64 if already known (W is frozen while training).
    """
    a = a.astype(np.float32, copy=False)
    b = b.astype(np.float32, copy=False)
    if w_sq is None:
        w_sq = weight_sq(w)
    cross = np.einsum("ok,ok->o", w @ a.T, b, dtype=np.float64)
    lora_sq = np.einsum("ok,ok->o", b @ (a @ a.T), b, dtype=np.float64)
    sq = w_sq + 2.0 * scale * cross + scale * scale * lora_sq
    return np.sqrt(np.maximum(sq, 0.0)).astype(np.float32)


def weight_sq(w: np.ndarray) -> np.ndarray:
    w64 = w.astype(np.float64, copy=False)
    return np.einsum("oi,oi->o", w64, w64)


def norms_feed(mods: list[DoraModule], base: Mapping[str, np.ndarray], tensors: Mapping[str, np.ndarray],
               scale: float, w_sq: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Graph inputs ``dora_norm.*`` for the adapter ``tensors`` (keyed by graph name)."""
    return {m.norm_input: row_norms(base[m.base], tensors[m.a], tensors[m.b], scale,
                                    None if w_sq is None else w_sq[m.base]) for m in mods}


def bundle_base_weights(b: Any, mods: list[DoraModule]) -> Mapping[str, np.ndarray]:
    """The frozen base rows of each DoRA layer, read (memory-mapped) from the bundle's
    inference weights through the manifest's index; with a quantized base, dequantized when
    asked for (one layer at a time, as the graphs compute them)."""
    data = np.memmap(b.path("infer.onnx.data"), dtype=np.uint8, mode="r")
    q = b.manifest.get("quantization")
    if q:
        return _Dequantized(data, q, {m.base for m in mods})
    by_graph = {e["graph_name"]: e for e in b.manifest["weights"].values()}
    out = {}
    for m in mods:
        e = by_graph[m.base]
        raw = data[e["offset"]: e["offset"] + e["length"]]
        out[m.base] = np.frombuffer(raw, np.float32).reshape(e["shape"])
    return out


class _Dequantized(Mapping[str, np.ndarray]):
    def __init__(self, data: np.ndarray, q: dict[str, Any], names: set[str]) -> None:
        self.data, self.q, self.names = data, q, names

    def _raw(self, name: str) -> np.ndarray:
        e = self.q["infer_weights"][name]
        return np.frombuffer(self.data[e["offset"]: e["offset"] + e["length"]], e["dtype"]).reshape(e["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        from edgetune.formats import quantized

        if name not in self.names:
            raise KeyError(name)
        if name not in set(self.q["weights"]):
            return self._raw(name)
        k = int(self.q["merge_layout"][name]["shape"][1])
        return quantized.dequantize(*(self._raw(t) for t in quantized.tensor_names(name)),
                                int(self.q["bits"]), k)

    def __iter__(self) -> Any:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def feed_for_adapter(b: Any, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``dora_norm.*`` inputs of a bundle's inference graph for an adapter (graph names)."""
    mods = modules(b.trainable)
    if not mods:
        return {}
    return norms_feed(mods, bundle_base_weights(b, mods), tensors, b.adapter.scale)


