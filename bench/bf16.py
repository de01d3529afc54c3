"""bfloat16 frozen products (AMX, or AVX512-BF16 without it): the products of one 1,024-token chunk through one
SmolLM2-135M layer's frozen weights (q, k, v, o, gate, up, down; forward ``x @ W^T`` and the input
gradient ``dY @ W``), timed three ways in the same run:

- ``ort``: ONNX Runtime's float32 ``MatMul`` (MLAS sgemm), a one-node session per product with the
  weight as an initializer, 2 threads: what the float32 graphs run;
- ``edgetune``: the kernel library's ``MatMulBF16`` (what ``--compute bf16`` bundles run: the
  activation rounded to bfloat16 on each call, float32 sums on AMX's tiles or with AVX512-BF16's
  ``vdpbf16ps``), the same kind of session;
- ``torch``: ``torch.matmul`` in bfloat16 (oneDNN's AMX or AVX512-BF16 kernels), the cast of the activation
  counted, in its own process: what a PyTorch user with a bfloat16 base runs.

Each product is timed by all three in turn (best of ``--iters`` calls). Ratios are against
``ort``. ``error`` is the largest error of a product relative to its largest output against a
float64 product of the float32 operands. Needs a CPU with ``amx_bf16`` or ``avx512_bf16`` and the
kernel library (else it says so and stops); ``EDGETUNE_ISA=avx512bf16`` times the AVX512-BF16 kernel
on an AMX CPU.

The last line is JSON: ``{"ort_ms", "edgetune_ms", "torch_ms", "edgetune_speedup", "torch_speedup",
"edgetune_gflops", "edgetune_error", "torch_error", "fma_peak_gflops"}``.

Usage: python bench/bf16.py [--tokens 1024] [--iters 30]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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


def products(tokens: int) -> list[tuple[str, int, int, int, bool]]:
    """(label, M, N, K, trans_b): the forward x @ W^T (W [N, K]), then the input gradient dY @ W
    (W [K, N] there: N and K swapped), as the graphs compute them."""
    out = []
    for name, n, k in WEIGHTS:
        out.append((f"{name} forward", tokens, n, k, True))
        out.append((f"{name} input grad", tokens, k, n, False))
    return out


def one_node(op: str, m: int, n: int, k: int, trans_b: bool, iters: int, threads: int) -> tuple[float, float]:
    """(best ms, error) of a one-node session computing ``a [M, K]`` times the weight into
    ``[M, N]``: ``MatMul`` on the float32 weight laid out as ``[K, N]``, or ``MatMulBF16`` on the
    bfloat16 weight as the graphs store it (``[N, K]`` with ``trans_b``, else ``[K, N]``)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgetune.device import fused
    from edgetune.workstation.bf16 import bits

    r = np.random.default_rng(0)
    a = r.normal(size=(m, k)).astype(np.float32)
    w = (r.normal(size=(n, k) if trans_b else (k, n)) * 0.05).astype(np.float32)
    b = w.T if trans_b else w  # [K, N]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if op == "MatMul":
        node, init = helper.make_node("MatMul", ["a", "w"], ["c"]), numpy_helper.from_array(np.ascontiguousarray(b), "w")
    else:
        fused.register(so)
        node = helper.make_node("MatMulBF16", ["a", "w"], ["c"], domain="edgetune", trans_b=int(trans_b))
        init = helper.make_tensor("w", TensorProto.BFLOAT16, list(w.shape), bits(w).tobytes(), raw=True)
    g = helper.make_graph([node], "p", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])], [init])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgetune", 1)])
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    c = s.run(None, {"a": a})[0]
    best = 1e9
    for _ in range(iters):
        t0 = time.perf_counter()
        s.run(None, {"a": a})
        best = min(best, time.perf_counter() - t0)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    return best * 1e3, float(np.abs(c - ref).max() / np.abs(ref).max())


TORCH_WORKER = r"""
import json, sys, time, torch
m, n, k, iters, threads = map(int, sys.argv[1:6])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
a = torch.randn(m, k, generator=g)
wt = (torch.randn(k, n, generator=g) * 0.05)
wb = wt.to(torch.bfloat16)
ref = a.double() @ wt.double()
best = 1e9
for _ in range(iters):
    t0 = time.perf_counter()
    c = (a.to(torch.bfloat16) @ wb)
    best = min(best, time.perf_counter() - t0)
err = float((c.double() - ref).abs().max() / ref.abs().max())
print(json.dumps({"ms": best * 1e3, "error": err}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="rows of a chunk")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    print(f"machine: {machine.describe()}")
    from edgetune.device import fused

    if "MatMulBF16" not in fused.library().ops:
        print(f"the kernel library does not run MatMulBF16 here: {fused.library().reason or 'no AMX or AVX512-BF16'}")
        return
    print(f"MatMulBF16 runs on: {fused.library().bf16}")
    sys.path.insert(0, str(HERE))
    import train as T  # noqa: E402  - the FMA loop of the merge kernels

    peak = T.fma_peak_gflops(a.threads)
    print(f"multiply-add peak (FMA loop, {a.threads} threads): {peak:.1f} GFLOP/s")
    print("| product | M x N x K | ONNX Runtime float32 ms | edgetune MatMulBF16 ms | PyTorch bf16 ms | MatMulBF16 GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    tot = {"ort": 0.0, "edgetune": 0.0, "torch": 0.0}
    flops, our_err, torch_err = 0.0, 0.0, 0.0
    for label, m, n, k, trans_b in products(a.tokens):
        o, _ = one_node("MatMul", m, n, k, trans_b, a.iters, a.threads)
        e, err = one_node("MatMulBF16", m, n, k, trans_b, a.iters, a.threads)
        t = json.loads(subprocess.run([sys.executable, "-c", TORCH_WORKER, str(m), str(n), str(k), str(a.iters),
                                       str(a.threads)], check=True, capture_output=True, text=True).stdout)
        tot["ort"] += o
        tot["edgetune"] += e
        tot["torch"] += t["ms"]
        flops += 2.0 * m * n * k
        our_err, torch_err = max(our_err, err), max(torch_err, t["error"])
        print(f"| {label} | {m} x {n} x {k} | {o:.2f} | {e:.2f} | {t['ms']:.2f} | {2.0 * m * n * k / e / 1e6:.0f} |")
    gf = flops / tot["edgetune"] / 1e6
    print(f"one layer, one {a.tokens}-token chunk: ONNX Runtime float32 {tot['ort']:.1f} ms, edgetune MatMulBF16 "
          f"{tot['edgetune']:.1f} ms ({tot['ort'] / tot['edgetune']:.2f}x), PyTorch bfloat16 {tot['torch']:.1f} ms "
          f"({tot['ort'] / tot['torch']:.2f}x); MatMulBF16 at {gf:.0f} GFLOP/s, {gf / peak:.2f}x the float32 FMA peak")
    print(json.dumps({"ort_ms": round(tot["ort"], 2), "edgetune_ms": round(tot["edgetune"], 2),
                      "torch_ms": round(tot["torch"], 2),
                      "edgetune_speedup": round(tot["ort"] / tot["edgetune"], 3),
                      "torch_speedup": round(tot["ort"] / tot["torch"], 3), "edgetune_gflops": round(gf, 1),
                      "edgetune_error": our_err, "torch_error": torch_err, "fma_peak_gflops": round(peak, 1),
                      "bf16_kernel": fused.library().bf16}))

if __name__ == "__main__":
    main()
