"""Packing speed and size for the default model: `edgetune pack` on a rank-8 q,k,v,o run.

Exports the default model (cached under out/), makes a short run, packs it as float16 and
prints the adapter size and the packing time against the targets (under 2 MB, under 5 s).
The last line is JSON: {"adapter_mb": ..., "pack_seconds": ..., "verify_seconds": ...}.
Usage: python bench/pack.py
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  - CPU model and ISA (avx2, avx512f, amx...) from /proc/cpuinfo

from edgetune.app import pack
from edgetune.app.verify import verify
from edgetune.device import trainer
from edgetune.formats.config import AdapterConfig

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    print(f"machine: {machine.describe()}")
    bundle = ROOT / "out" / "bench-bundle-r8"
    if not (bundle / "edgetune.json").is_file():
        from edgetune.workstation.export import export

        export(None, bundle, AdapterConfig(rank=8, alpha=16), overwrite=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = trainer.train(bundle, ROOT / "examples" / "data" / "tickets", Path(tmp) / "run", steps=2, batch_size=2,
                            progress=False, log=lambda s: None)
        t0 = time.perf_counter()
        r = pack.pack(run.out, bundle, Path(tmp) / "app", name="tickets")
        t_pack = time.perf_counter() - t0
        t0 = time.perf_counter()
        verify(Path(tmp) / "app")
        t_verify = time.perf_counter() - t0
    mb = r["bytes"] / 2**20
    print(f"adapter file: {mb:.2f} MB (target < 2 MB); pack: {t_pack:.2f} s (target < 5 s, includes writing the "
          f"shared base once); verify: {t_verify:.2f} s")
    print(json.dumps({"adapter_mb": round(mb, 3), "pack_seconds": round(t_pack, 2), "verify_seconds": round(t_verify, 2)}))


if __name__ == "__main__":
    main()
