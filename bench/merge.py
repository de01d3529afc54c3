"""Merge speed: the C++ kernels against the memory-bandwidth limits, numpy, PyTorch and PEFT.

Per matrix, at Phi-3-mini's shapes (3072x3072 and 8192x3072), ranks 8, 16 and 64, float32
and bfloat16, beside the kernel:

- two bandwidth references over the same bytes: a plain copy (read W, write another buffer)
  and an in-place read-modify-write pass over W, which is what a merge does; each the faster
  of one thread and the kernel's threads;
- numpy written as a numpy user would: ``np.matmul(s * B, A, out=buf)`` into a buffer
  allocated once, then ``np.add(W, buf, out=W)`` (bfloat16: widened, added, rounded back).

A merge of rank r also does 2r flops per weight. The benchmark measures this machine's
multiply-add peak and, per shape, the compute ceiling: the fraction of the in-place bandwidth
the kernel would reach at that peak were memory free. Below 1 the merge is compute-bound and
its figure is the fraction of the FMA peak; otherwise the fraction of the in-place bandwidth.

Then the whole default model's adapter (SmolLM2-135M, rank 8 on q,k,v,o, float32), the same
work on every side: edgetune's merge path (what ``edgetune merge`` runs: every weight in one call
to the kernels, which deal the small matrices out to the threads whole, plus the finiteness
check), PyTorch as a user would write it (``W.addmm_(B, A, alpha=s)`` per layer, in place; PyTorch
has no batched call for matrices of different shapes, its ``_foreach`` ops being elementwise),
and PEFT's ``merge_and_unload``. The last line is JSON:

    {"bandwidth_fraction_inplace", "fma_fraction_compute_bound", "bandwidth_fraction_copy",
     "speedup_vs_numpy", "speedup_vs_torch", "speedup_vs_peft", "fma_peak_gflops"}

``bandwidth_fraction_inplace`` is the worst over the memory-bound shapes,
``fma_fraction_compute_bound`` the worst over the compute-bound ones, ``bandwidth_fraction_copy``
the worst kernel-over-copy figure over all shapes, ``speedup_vs_numpy`` the worst over float32
shapes. Reference and kernel runs alternate, so a noisy neighbour slows both.
Usage: ``python bench/merge.py [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  - CPU model and ISA (avx2, avx512f, amx...) from /proc/cpuinfo

from edgetune.device import kernels

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


def threaded_rmw(w: np.ndarray, threads: int) -> None:
    """Read and write every element of W in place, split over threads (the merge's memory traffic)."""
    from concurrent.futures import ThreadPoolExecutor

    rows = np.array_split(np.arange(w.shape[0]), threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda r: rmw(w[r[0]:r[-1] + 1]), rows))


def rmw(w: np.ndarray) -> None:
    if w.dtype == np.float32:
        np.multiply(w, np.float32(1.0), out=w)
    else:  # bfloat16 bits
        np.bitwise_or(w, np.uint16(0), out=w)


def numpy_merge(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, kind: str, buf: np.ndarray) -> None:
    """What a numpy user writes: the product into a buffer allocated once, then an in-place add."""
    np.matmul(b * np.float32(scale), a, out=buf)
    if kind == "float32":
        np.add(w, buf, out=w)
    else:  # numpy has no bfloat16: widen, add, round back
        np.add(buf, kernels.bf16_to_f32(w), out=buf)
        w[...] = kernels.f32_to_bf16(buf)


def peak_gflops(threads: int) -> float:
    from edgetune.device import _ext

    return max(_ext.peak_gflops(threads) for _ in range(5))


def per_matrix(repeat: int, peak: float) -> dict:
    os.environ["EDGETUNE_IMPL"] = "cpp"
    rng = np.random.default_rng(0)
    threads = os.cpu_count() or 1
    rows_out, copy_fr, inplace_fr, fma_fr, speedups = [], [], [], [], []
    print(f"{'shape':>11} {'rank':>4} {'dtype':>8} {'copy ms':>7} {'rmw ms':>7} {'kern ms':>7} {'numpy ms':>8} "
          f"{'GB/s rmw':>8} {'GB/s kern':>9} {'x copy':>6} {'x rmw':>6} {'ceiling':>7} {'FMA frac':>8} {'x numpy':>7}")
    for rows, cols in SHAPES:
        w32 = rng.standard_normal((rows, cols), dtype=np.float32)
        buf = np.empty((rows, cols), np.float32)
        for kind in ("float32", "bfloat16"):
            w = w32.copy() if kind == "float32" else kernels.f32_to_bf16(w32)
            dst = np.empty_like(w)
            copies = [lambda: np.copyto(dst, w), lambda: threaded_copy(dst, w, threads)]
            rmws = [lambda: rmw(w), lambda: threaded_rmw(w, threads)]
            for r in RANKS:
                a = rng.standard_normal((r, cols), dtype=np.float32) * 0.01
                b = rng.standard_normal((rows, r), dtype=np.float32) * 0.01
                merge_once = lambda: kernels.lora_merge(w, a, b, 1e-3)  # noqa: E731
                (t_copy, t_rmw), t_kern = interleaved([copies, rmws], merge_once, repeat)
                t_np = best_of(lambda: numpy_merge(w, a, b, 1e-3, kind, buf), max(2, repeat // 4))
                gb = 2 * w.nbytes / 1e9  # read + write
                flops = 2.0 * rows * cols * r
                ceiling = t_rmw / (flops / (peak * 1e9))
                fma = flops / t_kern / (peak * 1e9)
                row = {"shape": [rows, cols], "rank": r, "dtype": kind, "copy_ms": t_copy * 1e3, "rmw_ms": t_rmw * 1e3,
                       "kernel_ms": t_kern * 1e3, "numpy_ms": t_np * 1e3, "fraction_of_copy": t_copy / t_kern,
                       "fraction_of_inplace": t_rmw / t_kern, "compute_ceiling": ceiling, "fma_fraction": fma,
                       "speedup_vs_numpy": t_np / t_kern}
                copy_fr.append(row["fraction_of_copy"])
                (inplace_fr if ceiling >= 1.0 else fma_fr).append(row["fraction_of_inplace"] if ceiling >= 1.0 else fma)
                if kind == "float32":
                    speedups.append(row["speedup_vs_numpy"])
                rows_out.append(row)
                print(f"{rows:>5}x{cols:<5} {r:>4} {kind:>8} {t_copy * 1e3:7.2f} {t_rmw * 1e3:7.2f} {t_kern * 1e3:7.2f} "
                      f"{t_np * 1e3:8.2f} {gb / t_rmw:8.1f} {gb / t_kern:9.1f} {row['fraction_of_copy']:6.2f} "
                      f"{row['fraction_of_inplace']:6.2f} {ceiling:7.2f} {fma:8.2f} {row['speedup_vs_numpy']:7.2f}")
    return {"rows": rows_out, "bandwidth_fraction_copy": min(copy_fr),
            "bandwidth_fraction_inplace": min(inplace_fr) if inplace_fr else None,
            "fma_fraction_compute_bound": min(fma_fr) if fma_fr else None, "speedup_vs_numpy": min(speedups)}


def interleaved(references, kernel, repeat: int) -> tuple[list[float], float]:
    """Best time of each reference (the faster of its variants) and of the kernel, runs alternating
    so every side sees the same machine."""
    for group in references:
        for fn in group:
            fn()  # warm up: page faults and thread start-up are not merge time
    kernel()
    best = [float("inf")] * len(references)
    t_kern = float("inf")
    for _ in range(repeat):
        for i, group in enumerate(references):
            for fn in group:
                t = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t)
        t = time.perf_counter()
        kernel()
        t_kern = min(t_kern, time.perf_counter() - t)
    return best, t_kern


def whole_model(repeat: int) -> tuple[float, float]:
    """Whole-model merge: edgetune's path vs PyTorch's in-place addmm_ vs PEFT, same weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    from edgetune.formats.models import DEFAULT_MODEL, resolve_model
    from edgetune.workstation.export import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    path, _ = resolve_model(DEFAULT_MODEL)
    torch.manual_seed(0)
    t_peft, t_torch, t_ours = [], [], []
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
        scale = 16 / 8
        ours = {k: v[0].copy() for k, v in mods.items()}
        tw = {k: torch.from_numpy(v[0].copy()) for k, v in mods.items()}
        ta = {k: (torch.from_numpy(v[1]), torch.from_numpy(v[2])) for k, v in mods.items()}

        def torch_side():
            with torch.no_grad():
                for k, w in tw.items():
                    a, b = ta[k]
                    w.addmm_(b, a, alpha=scale)

        def edgetune_side():  # what `edgetune merge` runs: every weight in one call, checked
            kernels.lora_merge_batch([(k, ours[k], [(a, b, scale)]) for k, (_w, a, b) in mods.items()], safe=True)

        # The sides take turns going first, and each starts on a quiet machine: PyTorch's OpenMP
        # threads keep spinning for a while after its last call and would slow whatever runs next.
        sides = [(torch_side, t_torch), (edgetune_side, t_ours)]
        for fn, times in sides if len(t_ours) % 2 == 0 else sides[::-1]:
            time.sleep(0.2)
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        time.sleep(0.2)
        t = time.perf_counter()
        merged = pm.merge_and_unload()
        t_peft.append(time.perf_counter() - t)
        # The same result on every side, or the comparison means nothing.
        ref = dict(merged.named_parameters())
        for k in mods:
            want = ref[k.replace("base_model.model.", "") + ".weight"].detach().numpy()
            np.testing.assert_allclose(ours[k], want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(tw[k].numpy(), want, rtol=1e-5, atol=1e-6)
    tp, tt, to = min(t_peft), min(t_torch), min(t_ours)
    print(f"\nwhole model (SmolLM2-135M, rank 8 on q,k,v,o; {len(mods)} float32 matrices, {torch.get_num_threads()} "
          f"threads): edgetune (kernel + finiteness check) {to * 1e3:.1f} ms, PyTorch W.addmm_(B, A, alpha=s) "
          f"{tt * 1e3:.1f} ms (x{tt / to:.2f}), PEFT merge_and_unload {tp * 1e3:.1f} ms (x{tp / to:.2f})")
    return tt / to, tp / to


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
    res = per_matrix(repeat, peak)
    vs_torch, vs_peft = (None, None) if args.no_model else whole_model(4 if args.quick else 6)

    def r(x, n=3):
        return None if x is None else round(x, n)

    print(json.dumps({"bandwidth_fraction_inplace": r(res["bandwidth_fraction_inplace"]),
                      "fma_fraction_compute_bound": r(res["fma_fraction_compute_bound"]),
                      "bandwidth_fraction_copy": r(res["bandwidth_fraction_copy"]),
                      "speedup_vs_numpy": r(res["speedup_vs_numpy"], 2), "speedup_vs_torch": r(vs_torch, 2),
                      "speedup_vs_peft": r(vs_peft, 2), "fma_peak_gflops": round(peak, 1)}))


if __name__ == "__main__":
    main()
