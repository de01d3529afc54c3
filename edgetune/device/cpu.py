"""What this CPU offers ONNX Runtime's int8 kernels: whether int8 products can pay here.

ONNX Runtime's int8 matrix products (``MatMulNBits`` with ``accuracy_level`` 4, which a bundle
exported with ``--compute int8`` runs) are fast where the CPU multiplies int8 in one instruction:
VNNI (AVX-512 or AVX) and AMX on x86-64, the dot-product extension on 64-bit ARM. Without them an
int8 multiply-add takes two instructions, and the int8 products measured at about half the
float32 speed (AMD EPYC with AVX2: 0.45-0.52x, see docs/benchmarks.md).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

# /proc/cpuinfo's names (x86 "flags", ARM "Features") and numpy's, for the int8 dot products.
_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}
_NUMPY = {"AVX512VNNI", "ASIMDDP"}


@functools.lru_cache(maxsize=None)
def int8_dot(cpuinfo: str = "/proc/cpuinfo") -> Optional[bool]:
    """True where the CPU has int8 dot-product instructions, False where it has none, None when
    this cannot be told (no ``/proc/cpuinfo`` and numpy does not say)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags |= set(value.split())
    if flags:
        return bool(flags & _FLAGS)
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats
        except ImportError:
            return None
    if any(feats.get(f) for f in _NUMPY):
        return True
    return None  # numpy knows neither AVX-VNNI nor AMX: no verdict


def int8_products_warning(cpuinfo: str = "/proc/cpuinfo") -> str:
    """A sentence for a bundle with int8 products on this CPU, or "" when they can pay here."""
    if int8_dot(cpuinfo) is not False:
        return ""
    return ("this CPU has no int8 dot-product instructions (VNNI, AMX or ARM dotprod), so ONNX Runtime's int8 "
            "products run at about half its float32 speed here")
