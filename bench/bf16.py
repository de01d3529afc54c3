"""bfloat16 frozen products on AMX, measured as a lever before it is a kernel: the products of one
1,024-token chunk through one SmolLM2-135M layer's frozen weights (q, k, v, o, gate, up, down;
forward ``x @ W^T`` and the input gradient ``dY @ W``), timed three ways in the same run:

- ``ort``: ONNX Runtime's float32 ``MatMul`` (MLAS sgemm), a one-node session per product with the
  weight as an initializer, 2 threads: what edgetune's graphs run today;
- ``amx``: ``bench/amx_bf16.cpp``, a first AMX kernel (the activation rounded to bfloat16 on each
  call, the weight packed once, float32 accumulation), built here with g++;
- ``torch``: ``torch.matmul`` in bfloat16 (oneDNN's AMX kernels), the cast of the activation
  counted, in its own process: what a PyTorch user with a bfloat16 base runs.

Each product is timed by all three in turn (best of ``--iters`` calls). Ratios are against
``ort``. ``error`` is the largest error of a product relative to its largest output (float32
inputs; a double reference for ``amx``, float32 ``torch.matmul`` for ``torch``). Needs a CPU with
``amx_bf16`` (else it says so and stops); the kernel is not in the op library yet.

The last line is JSON: ``{"ort_ms", "amx_ms", "torch_ms", "amx_speedup", "torch_speedup",
"amx_gflops", "amx_error", "torch_error", "fma_peak_gflops"}``.

Usage: python bench/bf16.py [--tokens 1024] [--iters 30]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  - CPU model and ISA (avx2, avx512f, amx...) from /proc/cpuinfo

HERE = Path(__file__).resolve().parent
HIDDEN, KV, MLP = 576, 192, 1536
# (name, out features N, in features K) of one layer's frozen weights
WEIGHTS = [("q", HIDDEN, HIDDEN), ("k", KV, HIDDEN), ("v", KV, HIDDEN), ("o", HIDDEN, HIDDEN),
           ("gate", MLP, HIDDEN), ("up", MLP, HIDDEN), ("down", HIDDEN, MLP)]


def products(tokens: int) -> list[tuple[str, int, int, int]]:
    """(label, M, N, K): the forward x @ W^T, then the input gradient dY @ W (N and K swapped)."""
    out = []
    for name, n, k in WEIGHTS:
        out.append((f"{name} forward", tokens, n, k))
        out.append((f"{name} input grad", tokens, k, n))
    return out


def ort_ms(m: int, n: int, k: int, iters: int, threads: int) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(0)
    w = (r.normal(size=(k, n)) * 0.05).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["c"])], "p",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
                          [numpy_helper.from_array(w, "w")])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                             so, providers=["CPUExecutionProvider"])
    a = r.normal(size=(m, k)).astype(np.float32)
    best = 1e9
    for _ in range(iters):
        t0 = time.perf_counter()
        s.run(None, {"a": a})
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


TORCH_WORKER = r"""
import json, sys, time, torch
m, n, k, iters, threads = map(int, sys.argv[1:6])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
a = torch.randn(m, k, generator=g)
wt = (torch.randn(k, n, generator=g) * 0.05)
wb = wt.to(torch.bfloat16)
ref = a @ wt
best = 1e9
for _ in range(iters):
    t0 = time.perf_counter()
    c = (a.to(torch.bfloat16) @ wb)
    best = min(best, time.perf_counter() - t0)
err = float((c.float() - ref).abs().max() / ref.abs().max())
print(json.dumps({"ms": best * 1e3, "error": err}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="rows of a chunk (a multiple of 32)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    print(f"machine: {machine.describe()}")
    if "amx_bf16" not in machine.describe():
        print("this CPU has no amx_bf16: nothing to measure here")
        return
    if a.tokens % 32:
        raise SystemExit("--tokens must be a multiple of 32 (the probe's block)")
    tmp = Path(tempfile.mkdtemp(prefix="edgetune-bf16-"))
    exe = tmp / "amx_bf16"
    subprocess.run(["g++", "-O3", "-march=sapphirerapids", "-fopenmp", str(HERE / "amx_bf16.cpp"), "-o", str(exe)],
                   check=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    sys.path.insert(0, str(HERE))
    import train as T  # noqa: E402  - the FMA loop of the merge kernels

    peak = T.fma_peak_gflops(a.threads)
    print(f"multiply-add peak (FMA loop, {a.threads} threads): {peak:.1f} GFLOP/s")
    print("| product | M x N x K | ONNX Runtime float32 ms | AMX bf16 probe ms | PyTorch bf16 ms | probe GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    tot = {"ort": 0.0, "amx": 0.0, "torch": 0.0}
    flops, amx_err, torch_err = 0.0, 0.0, 0.0
    for label, m, n, k in products(a.tokens):
        o = ort_ms(m, n, k, a.iters, a.threads)
        p = json.loads(subprocess.run([str(exe), str(m), str(n), str(k), str(a.iters)], env=env, check=True,
                                      capture_output=True, text=True).stdout)
        t = json.loads(subprocess.run([sys.executable, "-c", TORCH_WORKER, str(m), str(n), str(k), str(a.iters),
                                       str(a.threads)], check=True, capture_output=True, text=True).stdout)
        tot["ort"] += o
        tot["amx"] += p["ms"]
        tot["torch"] += t["ms"]
        flops += 2.0 * m * n * k
        amx_err, torch_err = max(amx_err, p["error"]), max(torch_err, t["error"])
        print(f"| {label} | {m} x {n} x {k} | {o:.2f} | {p['ms']:.2f} | {t['ms']:.2f} | {p['gflops']:.0f} |")
    print(f"one layer, one {a.tokens}-token chunk: ONNX Runtime float32 {tot['ort']:.1f} ms, AMX probe "
          f"{tot['amx']:.1f} ms ({tot['ort'] / tot['amx']:.2f}x), PyTorch bfloat16 {tot['torch']:.1f} ms "
          f"({tot['ort'] / tot['torch']:.2f}x); the probe at {flops / tot['amx'] / 1e6:.0f} GFLOP/s, "
          f"{flops / tot['amx'] / 1e6 / peak:.2f}x the float32 FMA peak")
    print(json.dumps({"ort_ms": round(tot["ort"], 2), "amx_ms": round(tot["amx"], 2), "torch_ms": round(tot["torch"], 2),
                      "amx_speedup": round(tot["ort"] / tot["amx"], 3),
                      "torch_speedup": round(tot["ort"] / tot["torch"], 3),
                      "amx_gflops": round(flops / tot["amx"] / 1e6, 1), "amx_error": amx_err,
                      "torch_error": torch_err, "fma_peak_gflops": round(peak, 1)}))


if __name__ == "__main__":
    main()
