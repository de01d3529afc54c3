"""Causal attention of the training step, forward and backward: edgetune's fused kernels
(``Attention`` and ``AttentionGrad`` of its ONNX Runtime op library, which never hold the S x S
probabilities) against PyTorch's ``scaled_dot_product_attention`` (``is_causal=True``,
``enable_gqa=True``: its fused CPU kernel, the best a PyTorch user would call) on the same shapes.

The default shapes are one layer of ``bench/train.py``'s workload on SmolLM2-135M: batch 8 x 256
tokens, 9 query heads sharing 3 key/value heads of 64. Each library runs in its own process (torch
is never imported beside ONNX Runtime); both processes are alive at once and take turns, round by
round, so both are timed under the same machine conditions; each figure is the median of
``--iters`` calls in the best of ``--rounds`` rounds. GFLOP/s counts the causal half of the score
matrix: forward 2 products (QK^T, PV), backward 5 (QK^T again, dP, dV, dQ, dK).

``--bf16`` times the forms a ``--compute bf16`` bundle runs: edgetune's ``AttentionTBF16`` and its
gradient (bfloat16 products, float32 softmax and outputs; AVX512-BF16 where the CPU has it) against
PyTorch's kernel on bfloat16 tensors, as a bfloat16 model calls it.

The last line is JSON: ``{"fwd_ms", "bwd_ms", "torch_fwd_ms", "torch_bwd_ms", "speedup",
"gflops", "torch_gflops", "fma_peak_gflops", "fraction_of_peak"}`` (``speedup``: torch's forward
plus backward time over edgetune's).

Usage: python bench/attention.py [--batch 8] [--seq 256] [--threads 2] [--rounds 3] [--iters 20] [--bf16]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  - CPU model and ISA (avx2, avx512f, amx...) from /proc/cpuinfo

HEADS, KV_HEADS, DIM = 9, 3, 64


def inputs(a: argparse.Namespace) -> dict[str, np.ndarray]:
    r = np.random.default_rng(0)
    q, do = (r.normal(size=(a.batch, HEADS, a.seq, DIM)).astype(np.float32) for _ in range(2))
    k, v = (r.normal(size=(a.batch, KV_HEADS, a.seq, DIM)).astype(np.float32) for _ in range(2))
    return {"q": q, "k": k, "v": v, "do": do}


def ort_side(a: argparse.Namespace):
    """Two one-node sessions, as the fused training graph runs the two ops."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgetune.device import fused

    x = inputs(a)
    mask = np.triu(np.full((a.seq, a.seq), np.finfo(np.float32).min, np.float32), 1)[None, None]
    mask = np.ascontiguousarray(np.broadcast_to(mask, (a.batch, 1, a.seq, a.seq)))
    scale = float(1 / np.sqrt(DIM))

    def session(op: str, ins: list[str], outs: list[str]):
        vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ins + outs]
        g = helper.make_graph([helper.make_node(op, ins, outs, domain="edgetune", scale=scale)], op,
                              vi[:len(ins)], vi[len(ins):])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgetune", 1)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        # Each session has its own thread pool, whose threads spin for a while after a run: the two
        # sessions' pools, taking turns, would fight over the cores (measured: 2x the forward time).
        # A training step runs both ops in one session and pool; calls of milliseconds lose nothing
        # to a pool that sleeps between them.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        fused.register(so)  # DeviceError naming the file when the library cannot load
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    op = "AttentionTBF16" if a.bf16 else "Attention"  # AttentionT's output (and dout) are [B, S, H, D]
    if a.bf16 and op not in fused.library().ops:
        sys.exit(f"{op}: not listed by {fused.library().path} (no AVX512-BF16 or AMX here)")
    fwd = session(op, ["q", "k", "v", "m"], ["o"])
    bwd = session(op + "Grad", ["do", "q", "k", "v", "m"], ["dq", "dk", "dv"])
    f_feed = {"q": x["q"], "k": x["k"], "v": x["v"], "m": mask}
    b_feed = dict(f_feed, do=np.ascontiguousarray(x["do"].transpose(0, 2, 1, 3)) if a.bf16 else x["do"])
    return lambda: fwd.run(None, f_feed), lambda: bwd.run(None, b_feed), f"fused ({fused.library().isa})"


def torch_side(a: argparse.Namespace):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    x = {n: torch.from_numpy(t).to(torch.bfloat16 if a.bf16 else torch.float32) for n, t in inputs(a).items()}
    q, k, v = (x[n].clone().requires_grad_(True) for n in "qkv")
    state: dict = {}

    def fwd():
        state["o"] = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def bwd():
        q.grad = k.grad = v.grad = None
        state["o"].backward(x["do"], retain_graph=True)

    fwd()
    return fwd, bwd, f"torch {torch.__version__}"


def worker(a: argparse.Namespace) -> None:
    """Serve rounds on stdin/stdout: each line in is a round; each line out its two medians."""
    fwd, bwd, name = (torch_side if a.side == "torch" else ort_side)(a)
    for _ in range(3):
        fwd(), bwd()
    print(json.dumps({"name": name}), flush=True)
    for _ in sys.stdin:
        tf, tb = [], []
        for _ in range(a.iters):
            t = time.perf_counter()
            fwd()
            tf.append(time.perf_counter() - t)
            t = time.perf_counter()
            bwd()
            tb.append(time.perf_counter() - t)
        print(json.dumps({"fwd": float(np.median(tf)), "bwd": float(np.median(tb))}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python bench/attention.py --seq 64 --rounds 5")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--bf16", action="store_true", help="bfloat16 products on both sides (--compute bf16's attention)")
    p.add_argument("--side", choices=("ort", "torch"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        return worker(a)
    from train import fma_peak_gflops

    peak = fma_peak_gflops(a.threads)
    args = [f"--batch={a.batch}", f"--seq={a.seq}", f"--threads={a.threads}", f"--iters={a.iters}"] + ["--bf16"] * a.bf16
    procs = {s: subprocess.Popen([sys.executable, __file__, f"--side={s}", *args], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for s in ("ort", "torch")}
    names = {s: json.loads(pr.stdout.readline())["name"] for s, pr in procs.items()}
    best: dict[str, dict] = {}
    for r in range(a.rounds):
        for s in (("ort", "torch") if r % 2 == 0 else ("torch", "ort")):
            time.sleep(0.5)
            procs[s].stdin.write("go\n")
            procs[s].stdin.flush()
            got = json.loads(procs[s].stdout.readline())
            if s not in best or got["fwd"] + got["bwd"] < best[s]["fwd"] + best[s]["bwd"]:
                best[s] = got
    for pr in procs.values():
        pr.stdin.close()
        pr.wait()
    flops = a.batch * HEADS * 2.0 * a.seq * (a.seq + 1) / 2 * DIM * 7  # 2 products forward, 5 backward
    e, t = best["ort"], best["torch"]
    res = {"fwd_ms": e["fwd"] * 1e3, "bwd_ms": e["bwd"] * 1e3, "torch_fwd_ms": t["fwd"] * 1e3,
           "torch_bwd_ms": t["bwd"] * 1e3, "speedup": (t["fwd"] + t["bwd"]) / (e["fwd"] + e["bwd"]),
           "gflops": flops / (e["fwd"] + e["bwd"]) / 1e9, "torch_gflops": flops / (t["fwd"] + t["bwd"]) / 1e9,
           "fma_peak_gflops": peak}
    res["fraction_of_peak"] = res["gflops"] / peak
    res["bf16"] = a.bf16
    print(f"machine: {machine.describe()}; multiply-add peak ({a.threads} threads): {peak:.1f} GFLOP/s")
    print(f"causal attention, batch {a.batch} x {a.seq}, {HEADS} heads on {KV_HEADS} key/value heads of {DIM}, "
          f"{a.threads} threads" + (", bfloat16 products" if a.bf16 else ""))
    for side, lab in (("ort", f"edgetune ({names['ort']})"), ("torch", f"PyTorch SDPA ({names['torch']})")):
        b = best[side]
        print(f"  {lab:44s} forward {b['fwd'] * 1e3:7.2f} ms  backward {b['bwd'] * 1e3:7.2f} ms  "
              f"{flops / (b['fwd'] + b['bwd']) / 1e9:6.1f} GFLOP/s")
    print(f"  edgetune / PyTorch speed: {res['speedup']:.2f}x; {res['fraction_of_peak']:.0%} of the float32 "
          "multiply-add peak")
    print(json.dumps({k: v if isinstance(v, bool) else round(v, 4) for k, v in res.items()}))


if __name__ == "__main__":
    main()
