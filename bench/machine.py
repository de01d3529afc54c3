"""The machine a benchmark ran on: CPU model and the instruction sets that matter here."""
from __future__ import annotations

import os
import platform

ISA = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8",
       "asimd", "sve", "bf16", "i8mm")


def describe() -> str:
    """``CPU model | N cores | isa: ...`` from /proc/cpuinfo (Linux), else what platform knows."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    isa = [f for f in ISA if f in flags]
    return f"{model} | {os.cpu_count()} cores | isa: {' '.join(isa) or 'unknown'}"
