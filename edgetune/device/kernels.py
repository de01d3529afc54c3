"""Adapter merge kernels: the C++ extension (``edgetune.device._ext``) and its numpy reference.

Weights are modified in place. ``float32`` and ``float16`` weights are numpy arrays of those
dtypes; ``bfloat16`` weights are ``uint16`` arrays holding the raw bits (numpy has no
bfloat16). Adapters are float32 or float16. ``EDGETUNE_IMPL=cpp|numpy`` forces an
implementation; by default the C++ kernels run, and if the extension is missing edgetune
says so once and uses numpy.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np

from edgetune.formats.errors import MergeError

_warned = False
_chosen: dict[tuple[str, str], str] = {}  # (EDGETUNE_IMPL, EDGETUNE_ISA) -> "cpp" or "numpy"
_ADAPTER_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def _impl() -> str:
    # Chosen once per setting of the two variables: a whole-model merge asks for every matrix.
    env = os.environ
    key = (env.get("EDGETUNE_IMPL", ""), env.get("EDGETUNE_ISA", ""))
    got = _chosen.get(key)
    if got is None:
        got = _chosen[key] = _choose(key[0].lower())
    return got


def _choose(want: str) -> str:
    global _warned
    if want not in ("", "cpp", "numpy"):
        raise MergeError(f"EDGETUNE_IMPL must be cpp or numpy, got {want!r}")
    if want == "numpy":
        return "numpy"
    try:
        from edgetune.device import _ext
    except ImportError as e:
        if want == "cpp":
            raise MergeError(f"EDGETUNE_IMPL=cpp but the C++ extension is not built ({e}); reinstall edgetune") from None
        if not _warned:
            print(f"edgetune: C++ merge extension unavailable ({e}); using the slower numpy reference", file=sys.stderr)
            _warned = True
        return "numpy"
    try:
        _ext.isa()  # EDGETUNE_ISA names a build this CPU runs
    except ValueError as e:
        raise MergeError(str(e)) from None
    return "cpp"


def implementation() -> str:
    """Which implementation the merge functions use now: ``cpp`` or ``numpy``."""
    return _impl()


def isa() -> str:
    """The instruction set the C++ kernels run with (the widest this CPU has, or ``EDGETUNE_ISA``:
    generic, avx2, avx512, avx512bf16), or ``numpy``."""
    if _impl() != "cpp":
        return "numpy"
    from edgetune.device import _ext

    return str(_ext.isa())


def kind_of(w: np.ndarray) -> str:
    return {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.uint16): "bfloat16"}.get(
        w.dtype, "")


# -- bfloat16 <-> float32 (numpy reference) -------------------------------------------
def bf16_to_f32(h: np.ndarray) -> np.ndarray:
    return (h.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(f: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(f, np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def to_f32(w: np.ndarray, kind: str) -> np.ndarray:
    return bf16_to_f32(w) if kind == "bfloat16" else w.astype(np.float32)


def from_f32(f: np.ndarray, kind: str) -> np.ndarray:
    if kind == "bfloat16":
        return f32_to_bf16(f)
    return f.astype(np.float16 if kind == "float16" else np.float32)


# -- checks ------------------------------------------------------------------------------
def _check(w: np.ndarray, pairs: Sequence[tuple[np.ndarray, np.ndarray]], name: str) -> str:
    if not isinstance(w, np.ndarray):
        raise MergeError(f"{name}: W must be a numpy array, got {type(w).__name__}")
    kind = kind_of(w)
    if not kind:
        raise MergeError(f"{name}: W has dtype {w.dtype}; expected float32, float16 or uint16 (bfloat16 bits)")
    if w.ndim != 2:
        raise MergeError(f"{name}: W must be 2-D, got shape {w.shape}")
    if not w.flags.c_contiguous:
        raise MergeError(f"{name}: W must be C-contiguous (got a strided view of shape {w.shape})")
    if not w.flags.writeable:
        raise MergeError(f"{name}: W is read-only; merge needs a writable buffer (copy it, or open the file read-write)")
    for i, (a, b) in enumerate(pairs):
        for label, x in (("A", a), ("B", b)):
            if x.dtype not in _ADAPTER_DTYPES:
                raise MergeError(f"{name}: adapter {i} {label} has dtype {x.dtype}; expected float32 or float16")
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] or b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1]:
            raise MergeError(f"{name}: shapes do not fit: W {w.shape}, A {a.shape}, B {b.shape} "
                             f"(need A (r, {w.shape[1]}), B ({w.shape[0]}, r))")
    return kind


def _safe(w: np.ndarray, kind: str, name: str) -> None:
    if _impl() == "cpp":
        from edgetune.device import _ext

        bad = _ext.first_nonfinite(w, kind)
    else:
        f = to_f32(w, kind).reshape(-1)
        idx = np.flatnonzero(~np.isfinite(f))
        bad = int(idx[0]) if idx.size else -1
    if bad >= 0:
        r, c = divmod(bad, w.shape[1])
        raise MergeError(f"{name}: merge produced a non-finite value at [{r}, {c}]; the adapter or its weight is broken")


# -- kernels -----------------------------------------------------------------------------
def lora_merge_many(w: np.ndarray, adapters: Sequence[tuple[np.ndarray, np.ndarray, float]], *, sign: float = 1.0,
                    safe: bool = False, name: str = "W", threads: int = 0) -> np.ndarray:
    """``W += sign * sum(coef * B @ A)`` in place, for ``(A, B, coef)`` in ``adapters``."""
    pairs = [(np.asarray(a), np.asarray(b)) for a, b, _ in adapters]
    kind = _check(w, pairs, name)
    coefs = [float(c) for _, _, c in adapters]
    if _impl() == "cpp":
        from edgetune.device import _ext

        seen = _ext.lora_merge(w, [np.ascontiguousarray(a) for a, _ in pairs],
                               [np.ascontiguousarray(b) for _, b in pairs], coefs, kind, float(sign), threads, name)
        if safe and kind == "float32" and not seen:
            return w  # the kernel checked every value it wrote; 16-bit stores are checked after rounding
    else:
        acc = to_f32(w, kind)
        for (a, b), c in zip(pairs, coefs):
            acc += (sign * c) * (b.astype(np.float32) @ a.astype(np.float32))
        w[...] = from_f32(acc, kind)
    if safe:
        _safe(w, kind, name)
    return w


def lora_merge_batch(items: Sequence[tuple[str, np.ndarray, Sequence[tuple[np.ndarray, np.ndarray, float]]]], *,
                     sign: float = 1.0, safe: bool = False, threads: int = 0) -> None:
    """:func:`lora_merge_many` over many weights, ``(name, W, adapters)`` each, in place: one call
    into the C++ kernels per dtype, which deal small matrices out to the threads whole instead of
    splitting each one's rows (for a model's many small projections, the hand-off per matrix cost
    as much as the merge). The same results, bit for bit, as one :func:`lora_merge_many` per W."""
    if _impl() != "cpp":
        for name, w, adapters in items:
            lora_merge_many(w, adapters, sign=sign, safe=safe, name=name, threads=threads)
        return
    from edgetune.device import _ext

    groups: dict[str, list] = {}
    for name, w, adapters in items:
        pairs = [(np.asarray(a), np.asarray(b)) for a, b, _ in adapters]
        groups.setdefault(_check(w, pairs, name), []).append((name, w, pairs, [float(c) for _, _, c in adapters]))
    for kind, group in groups.items():
        seen = _ext.lora_merge_batch([w for _, w, _, _ in group],
                                     [[np.ascontiguousarray(a) for a, _ in p] for _, _, p, _ in group],
                                     [[np.ascontiguousarray(b) for _, b in p] for _, _, p, _ in group],
                                     [c for _, _, _, c in group], kind, float(sign), threads,
                                     [name for name, _, _, _ in group])
        if safe:
            for (name, w, _, _), bad in zip(group, seen):
                if kind != "float32" or bad:  # float32: the kernel checked every value it wrote
                    _safe(w, kind, name)


def lora_merge(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, **kw) -> np.ndarray:
    """``W += scale * B @ A`` in place."""
    return lora_merge_many(w, [(a, b, scale)], **kw)


def lora_unmerge(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, **kw) -> np.ndarray:
    """``W -= scale * B @ A`` in place (the inverse of :func:`lora_merge`, up to rounding)."""
    return lora_merge_many(w, [(a, b, scale)], sign=-1.0, **kw)


def dora_merge(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, magnitude: np.ndarray, *,
               safe: bool = False, name: str = "W", threads: int = 0) -> np.ndarray:
    """``W = m * (W + s B@A) / ||W + s B@A||`` per output row, in place."""
    kind = _check(w, [(a, b)], name)
    magnitude = np.asarray(magnitude, np.float32).reshape(-1)
    if magnitude.shape[0] != w.shape[0]:
        raise MergeError(f"{name}: magnitude has {magnitude.shape[0]} values, W has {w.shape[0]} rows")
    if _impl() == "cpp":
        from edgetune.device import _ext

        _ext.dora_merge(w, np.ascontiguousarray(a), np.ascontiguousarray(b), float(scale), magnitude, kind, threads, name)
    else:
        merged = to_f32(w, kind) + float(scale) * (b.astype(np.float32) @ a.astype(np.float32))
        norm = np.sqrt((merged.astype(np.float64) ** 2).sum(axis=1)).astype(np.float32)
        w[...] = from_f32(merged * (magnitude / norm)[:, None], kind)
    if safe:
        _safe(w, kind, name)
    return w


def reference_merge(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """The obvious numpy merge, as a baseline: ``W += scale * (B @ A)`` (two full-size temporaries)."""
    w += scale * (b @ a)
    return w
