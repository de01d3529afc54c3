"""Merge speed: the C++ kernels against a plain copy, the obvious numpy merge, and PEFT.

Per matrix, at Phi-3-mini's shapes (3072x3072 and 8192x3072), ranks 8, 16 and 64, float32
and bfloat16: the C++ kernel, the numpy reference written the obvious way, and a plain copy
of the same bytes (the bandwidth limit: the faster of numpy's copy and the same copy split
over the kernel's threads). Then the whole default model's adapter
(SmolLM2-135M, rank 8 on q,k,v,o): edgetune's merge against PEFT's ``merge_and_unload``
in torch on the same weights. The last line is JSON:

    {"bandwidth_fraction": ..., "speedup_vs_numpy": ..., "speedup_vs_torch": ...}

bandwidth_fraction is the worst kernel-over-copy bandwidth over the Phi-3-mini shapes
(float32 and bfloat16); speedup_vs_numpy the worst numpy-over-kernel time in float32;
speedup_vs_torch the whole-model ratio.

A merge of rank r also does 2r flops per weight. The benchmark measures this machine's
multiply-add peak (``fma_peak_gflops``) and prints, per shape, the compute ceiling: the
bandwidth fraction the kernel would reach if it ran at that peak and memory were free
(copy time over FMA time). Where the ceiling is below 1 the merge is compute-bound here, not
memory-bound; ``bandwidth_fraction_memory_bound`` is the worst fraction over the shapes whose
ceiling is at least 1. Copy and kernel runs alternate, so a noisy neighbour slows both.
Usage: ``python bench/merge.py [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  - CPU model and ISA (avx2, avx512f, amx...) from /proc/cpuinfo

from edgetune import kernels

SHAPES = [(3072, 3072), (8192, 3072)]
RANKS = [8, 16, 64]


def best_of(fn, repeat: int) -> float:
    fn()  # warm up: page faults and thread start-up are not merge time
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def threaded_copy(dst: np.ndarray, src: np.ndarray, threads: int) -> None:
    """A copy split over the same threads the kernel uses (numpy releases the GIL while copying)."""
    from concurrent.futures import ThreadPoolExecutor

    rows = np.array_split(np.arange(src.shape[0]), threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda r: np.copyto(dst[r[0]:r[-1] + 1], src[r[0]:r[-1] + 1]), rows))


def numpy_obvious(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, kind: str) -> None:
    if kind == "float32":
        w += scale * (b @ a)
    else:  # numpy has no bfloat16: widen, add, round back
        w[...] = kernels.f32_to_bf16(kernels.bf16_to_f32(w) + scale * (b @ a))


def peak_gflops(threads: int) -> float:
    from edgetune import _ext

    return max(_ext.peak_gflops(threads) for _ in range(5))


def per_matrix(repeat: int, peak: float) -> tuple[list[dict], float, float, float | None]:
    os.environ["EDGETUNE_IMPL"] = "cpp"
    rng = np.random.default_rng(0)
    threads = os.cpu_count() or 1
    rows_out, fracs, speedups, memory_bound = [], [], [], []
    print(f"{'shape':>11} {'rank':>4} {'dtype':>8} {'copy ms':>8} {'kernel ms':>9} {'numpy ms':>9} "
          f"{'GB/s copy':>9} {'GB/s kern':>9} {'bw frac':>7} {'ceiling':>7} {'x numpy':>7}")
    for rows, cols in SHAPES:
        w32 = rng.standard_normal((rows, cols), dtype=np.float32)
        for kind in ("float32", "bfloat16"):
            w = w32 if kind == "float32" else kernels.f32_to_bf16(w32)
            dst = np.empty_like(w)
            # The bandwidth reference is the faster of a plain copy and one split over the threads.
            copies = [lambda: np.copyto(dst, w), lambda: threaded_copy(dst, w, threads)]
            for r in RANKS:
                a = rng.standard_normal((r, cols), dtype=np.float32) * 0.01
                b = rng.standard_normal((rows, r), dtype=np.float32) * 0.01
                merge_once = lambda: kernels.lora_merge(w, a, b, 1e-3)  # noqa: E731
                t_copy, t_kern = interleaved(copies, merge_once, repeat)
                t_np = best_of(lambda: numpy_obvious(w, a, b, 1e-3, kind), max(1, repeat // 4))
                gb = 2 * w.nbytes / 1e9  # read + write
                frac, speed = t_copy / t_kern, t_np / t_kern
                ceiling = t_copy / (2.0 * rows * cols * r / (peak * 1e9))
                fracs.append(frac)
                if ceiling >= 1.0:
                    memory_bound.append(frac)
                if kind == "float32":
                    speedups.append(speed)
                rows_out.append({"shape": [rows, cols], "rank": r, "dtype": kind, "copy_ms": t_copy * 1e3,
                                 "kernel_ms": t_kern * 1e3, "numpy_ms": t_np * 1e3, "bandwidth_fraction": frac,
                                 "compute_ceiling": ceiling, "speedup_vs_numpy": speed})
                print(f"{rows:>5}x{cols:<5} {r:>4} {kind:>8} {t_copy * 1e3:8.2f} {t_kern * 1e3:9.2f} {t_np * 1e3:9.2f} "
                      f"{gb / t_copy:9.1f} {gb / t_kern:9.1f} {frac:7.2f} {ceiling:7.2f} {speed:7.2f}")
    return rows_out, min(fracs), min(speedups), min(memory_bound) if memory_bound else None


def interleaved(copies, kernel, repeat: int) -> tuple[float, float]:
    """Best copy time and best kernel time, the runs alternating so both see the same machine."""
    for fn in (*copies, kernel):
        fn()  # warm up: page faults and thread start-up are not merge time
    t_copy = t_kern = float("inf")
    for _ in range(repeat):
        for fn in copies:
            t = time.perf_counter()
            fn()
            t_copy = min(t_copy, time.perf_counter() - t)
        t = time.perf_counter()
        kernel()
        t_kern = min(t_kern, time.perf_counter() - t)
    return t_copy, t_kern


def whole_model(repeat: int) -> float:
    import torch
    from peft import LoraConfig, get_peft_model

    from edgetune.export import load_model
    from edgetune.models import DEFAULT_MODEL, resolve_model

    path, _ = resolve_model(DEFAULT_MODEL)
    torch.manual_seed(0)
    times_torch, times_ours = [], []
    for _ in range(repeat):
        hf, _tok = load_model(path)
        pm = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        mods = {}
        with torch.no_grad():
            for name, mod in pm.named_modules():
                if hasattr(mod, "lora_B") and "default" in getattr(mod, "lora_B", {}):
                    mod.lora_B["default"].weight.normal_(0, 0.01)
                    mods[name] = (mod.base_layer.weight.detach().numpy().copy(),
                                  mod.lora_A["default"].weight.detach().numpy().copy(),
                                  mod.lora_B["default"].weight.detach().numpy().copy())
        t = time.perf_counter()
        merged = pm.merge_and_unload()
        times_torch.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _name, (w, a, b) in mods.items():
            kernels.lora_merge(w, a, b, 2.0)
        times_ours.append(time.perf_counter() - t)
        # Same result, or the comparison means nothing.
        ref = dict(merged.named_parameters())
        name0 = next(iter(mods))
        hf_name = name0.replace("base_model.model.", "") + ".weight"
        np.testing.assert_allclose(mods[name0][0], ref[hf_name].detach().numpy(), rtol=1e-5, atol=1e-6)
    t_torch, t_ours = min(times_torch), min(times_ours)
    n = len(mods)
    print(f"\nwhole model (SmolLM2-135M, rank 8 on q,k,v,o; {n} matrices): "
          f"PEFT merge_and_unload {t_torch * 1e3:.1f} ms, edgetune {t_ours * 1e3:.1f} ms, x{t_torch / t_ours:.2f}")
    return t_torch / t_ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions: the JSON line within a minute")
    ap.add_argument("--no-model", action="store_true", help="skip the whole-model comparison (needs torch and peft)")
    args = ap.parse_args()
    repeat = 12 if args.quick else 30
    threads = os.cpu_count() or 1
    peak = peak_gflops(threads)
    print(f"machine: {machine.describe()}")
    print(f"edgetune merge benchmark: {threads} cores, kernels={kernels.implementation()}, "
          f"multiply-add peak {peak:.0f} GFLOP/s")
    _, frac, speed, frac_mem = per_matrix(repeat, peak)
    vs_torch = None if args.no_model else whole_model(2 if args.quick else 5)
    print(json.dumps({"bandwidth_fraction": round(frac, 3), "speedup_vs_numpy": round(speed, 2),
                      "speedup_vs_torch": None if vs_torch is None else round(vs_torch, 2),
                      "bandwidth_fraction_memory_bound": None if frac_mem is None else round(frac_mem, 3),
                      "fma_peak_gflops": round(peak, 1)}))


if __name__ == "__main__":
    main()
