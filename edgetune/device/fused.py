"""The fused training kernels: finding and loading edgetune's ONNX Runtime custom-op library.

The library (``cpp_ext/ort_ops``, built beside the package as ``libedgetune_ops.so``,
``libedgetune_ops.dylib`` or ``edgetune_ops.dll``) implements the ``edgetune`` domain's ops that a
bundle's fused graphs (``train_fused.onnx``, ``eval_fused.onnx``) use. The fused graphs run when the
session is on the CPU provider and the library loads; otherwise the plain graphs run, which every
ONNX Runtime build and execution provider takes, and the reason is said once.

``EDGETUNE_KERNELS=plain`` forces the plain graphs; ``EDGETUNE_KERNELS=fused`` makes a missing or
refused library an error instead of a fallback; ``EDGETUNE_FUSED_LIBRARY`` names a library file.
"""
from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from edgetune.formats.errors import DeviceError

DOMAIN = "edgetune"  # the ops' domain in the fused graphs
ABI = 1  # the library's EdgetuneFusedAbi() this edgetune's graphs need
FIRST_OPS = ("SwiGLU", "SwiGLUGrad", "RMSNorm", "RMSNormGrad", "Rotary", "RotaryGrad", "Attention", "AttentionGrad")
# The ops a library lists only where AMX or AVX512-BF16 runs them (--compute bf16 bundles' fused graphs)
BF16_OPS = frozenset({"MatMulBF16", "MatMulBF16Add", "MatMulBF16LoRA", "MatMulBF16Round", "SwiGLUBF16",
                      "SwiGLUBF16Grad", "CrossEntropyHeadBF16", "AttentionTBF16", "AttentionTBF16Grad"})
NAMES = {"linux": "libedgetune_ops.so", "darwin": "libedgetune_ops.dylib", "win32": "edgetune_ops.dll"}


@dataclass(frozen=True)
class Library:
    """The library file, or why there is none usable."""

    path: Optional[Path]
    isa: str = ""
    reason: str = ""
    ops: frozenset = frozenset()  # the op names it implements
    bf16: str = ""  # what MatMulBF16 runs on: "amx", "avx512bf16", or "" where it is not listed

    def lacks(self, ops: Any) -> list[str]:
        """The ops of ``ops`` (names) this library does not implement, sorted."""
        return sorted(set(ops) - self.ops)

    @property
    def ok(self) -> bool:
        return self.path is not None and not self.reason


def _file_name() -> str:
    return next((v for k, v in NAMES.items() if sys.platform.startswith(k)), NAMES["linux"])


def find() -> Optional[Path]:
    """The library file: ``EDGETUNE_FUSED_LIBRARY``, else beside this module (a wheel install) or in
    a ``edgetune/device`` folder on ``sys.path`` (an editable install puts built files there)."""
    forced = os.environ.get("EDGETUNE_FUSED_LIBRARY")
    if forced:
        return Path(forced)
    name = _file_name()
    here = Path(__file__).resolve().parent / name
    if here.is_file():
        return here
    for entry in sys.path:
        p = Path(entry or ".") / "edgetune" / "device" / name
        if p.is_file():
            return p
    return None


_probed: dict[str, Library] = {}


def library() -> Library:
    """The library, opened once with ctypes to read its instruction set and ABI version: a file
    built for another machine or an older edgetune is refused here, with the reason."""
    path = find()
    key = str(path)
    if key in _probed:
        return _probed[key]
    if path is None:
        lib = Library(None, reason="the fused-kernel library was not built with this install "
                                   "(ONNX Runtime's headers were missing when it was built; see docs/training.md)")
    elif not path.is_file():
        lib = Library(path, reason=f"{path} does not exist")
    else:
        try:
            handle = ctypes.CDLL(str(path))
            handle.EdgetuneFusedIsa.restype = ctypes.c_char_p
            abi = int(handle.EdgetuneFusedAbi())
            isa = handle.EdgetuneFusedIsa().decode()
            try:  # libraries from before the list implement the first eight ops
                handle.EdgetuneFusedOps.restype = ctypes.c_char_p
                ops = frozenset(handle.EdgetuneFusedOps().decode().split(","))
            except AttributeError:
                ops = frozenset(FIRST_OPS)
            try:  # libraries from before AVX512-BF16 ran MatMulBF16 on AMX only
                handle.EdgetuneBF16.restype = ctypes.c_char_p
                bf16 = handle.EdgetuneBF16().decode()
            except AttributeError:
                bf16 = "amx" if "MatMulBF16" in ops else ""
        except (OSError, AttributeError) as e:
            lib = Library(path, reason=f"{path} cannot be loaded here ({e}); rebuild it for this machine "
                                       "(pip install --force-reinstall edgetune)")
        else:
            why = "" if abi == ABI else (f"{path} implements kernel ABI {abi}, this edgetune needs {ABI}; "
                                         "reinstall edgetune")
            lib = Library(path, isa=isa, reason=why, ops=ops, bf16=bf16)
    _probed[key] = lib
    return lib


def mode() -> str:
    """``auto`` (the default), ``fused`` or ``plain``, from ``EDGETUNE_KERNELS``."""
    want = os.environ.get("EDGETUNE_KERNELS", "auto").strip().lower() or "auto"
    if want not in ("auto", "fused", "plain"):
        raise DeviceError(f"EDGETUNE_KERNELS must be auto, fused or plain, got {want!r}")
    return want


def register(so: Any) -> Library:
    """Register the library's ops in the session options ``so``; raises DeviceError naming the
    file and the reason when it cannot be."""
    lib = library()
    if not lib.ok:
        raise DeviceError(f"fused kernels unavailable: {lib.reason}")
    try:
        so.register_custom_ops_library(str(lib.path))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/RuntimeError types
        raise DeviceError(f"fused kernels unavailable: ONNX Runtime refused {lib.path} ({e})") from None
    return lib


_said: set[str] = set()


def say_once(reason: str, log: Any = None) -> None:
    """Print why the plain graph runs, once per process and reason."""
    if reason in _said:
        return
    _said.add(reason)
    msg = f"edgetune: training on the plain graph: {reason}"
    (log or (lambda s: print(s, file=sys.stderr)))(msg)


def status() -> dict[str, Any]:
    """For ``edgetune doctor``: which kernels a CPU training session would use, and why."""
    lib = library()
    out: dict[str, Any] = {"mode": mode(), "library": str(lib.path) if lib.path else None, "isa": lib.isa or None,
                           "abi": ABI}
    if lib.ok and out["mode"] != "plain":
        try:
            import onnxruntime as ort

            register(ort.SessionOptions())
        except DeviceError as e:
            out["problem"] = str(e)
    elif not lib.ok:
        out["problem"] = lib.reason
    out["in_use"] = "fused" if out["mode"] != "plain" and "problem" not in out else "plain"
    out["bf16_products"] = lib.bf16 or None  # "amx" or "avx512bf16": MatMulBF16 is listed only where one runs it
    return out
