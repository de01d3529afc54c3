"""The matrix products of edgetune's training step, each timed in ONNX Runtime and in PyTorch on
the same shapes and layouts: how fast the matrix-product library alone lets each side be.

1. A worker without torch trains ``--steps`` steps of ``bench/train.py``'s workload (SmolLM2-135M,
   rank 8 on q,k,v,o, batch 8 x <= 256 tokens, chunks of <= 1,024 tokens) with ONNX Runtime's
   profiler on, and lists every MatMul, FusedMatMul and Gemm node it ran: input shapes, transposes,
   kernel time in the step. That is edgetune's share of matrix products, in place.
2. Each distinct product (op, shapes, transposes) is then timed in isolation, as a one-node ONNX
   Runtime session with the training session's options, and as ``torch.matmul`` on tensors of the
   same layout (a transposed operand is a transposed view, which PyTorch hands to its BLAS as a
   transpose flag): median of repeated calls, the same threads, each library in its own process.
   Both processes are alive at once and take turns product by product (the order alternating, a
   pause before each), so both time a product under the same machine conditions; the best of
   ``--rounds`` passes is kept.

Weighted by how often the step runs each product, the two isolated totals say how much of the
training gap is the matrix-product library. The last line is JSON:

    {"ort_ms_per_step", "torch_ms_per_step", "torch_speedup", "in_step_ms", "gflops_ort",
     "gflops_torch", "fma_peak_gflops", "flops_fraction_ceiling"}

``flops_fraction_ceiling`` is ONNX Runtime's isolated rate over the FMA peak: the most
``bench/train.py``'s ``flops_fraction`` could reach if every other op of the step were free.

Reduced precision, the lever the CPUs with VNNI and AMX offer: the products with a frozen weight
(the body's forward ``x @ W^T`` and its backward ``dY @ W``; the adapters and attention stay
float32) are also timed as each library would run them with reduced-precision frozen weights:
ONNX Runtime's ``DynamicQuantizeMatMul`` (int8 weight with per-column scales, the activation
quantized to uint8 per call; MLAS's integer kernels, AMX or VNNI where the CPU has them; ONNX
Runtime's CPU provider has no bfloat16 MatMul), and in PyTorch the faster of bfloat16 (weight and
activation in bfloat16, the activation's cast not counted: at best inductor fuses it into the op
before; oneDNN's AMX kernels where the CPU has them) and int8 (``torch._int_mm`` after quantizing
the activation per call). Each side's reduced-precision step
counts its float32 time for every other product. JSON adds ``ort_lowp_ms_per_step``,
``torch_lowp_ms_per_step``, ``torch_lowp_speedup``, ``ort_lowp_error`` and ``torch_lowp_error``
(the largest error of a product relative to its largest output; the training loss is not measured
here).

Usage: python bench/matmul.py [--steps 2] [--threads N] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  - CPU model and ISA (avx2, avx512f, amx...) from /proc/cpuinfo
import train as T  # noqa: E402  - the training benchmark's workload, bundle and FMA peak

OPS = ("MatMul", "FusedMatMul", "Gemm")


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def worker_profile(a: argparse.Namespace) -> dict:
    """Train with the profiler on; every matrix-product node's shapes, attributes and time."""
    import onnx

    from edgetune.device import runner, trainer
    from edgetune.formats.config import TrainConfig

    if "torch" in sys.modules:
        raise SystemExit("torch was imported into the edgetune worker")
    cfg = TrainConfig(steps=a.steps + 1, batch_size=8, lr=1e-3, schedule="constant", max_seq_len=256,
                      threads=a.threads)
    t = trainer.Trainer(a.bundle, Path(a.tmp) / "run", cfg, progress=False, log=lambda s: None)
    t._open()
    r = t.runner

    def profiled():  # new options per session: a fused graph's session registers the kernel library in them
        so = runner.session_options(r.threads, r._shared, arena=r.arena)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(a.tmp) / "profile")
        return r._session(r.graphs["train"], so=so)

    r.train_sess = profiled()
    train = T.batches(a.bundle, a.data, 8, 256)
    t._step([train[0]])  # warm-up, not counted
    r.train_sess.end_profiling()
    r.train_sess = profiled()
    t0 = time.perf_counter()
    for b in train[1: a.steps + 1]:
        t._step([b])
        r.step(1e-3)
    wall = time.perf_counter() - t0
    events = json.loads(Path(r.train_sess.end_profiling()).read_text())
    graph = onnx.load(str(r.bundle.path(r.graphs["train"])), load_external_data=False).graph
    nodes = {n.name: n for n in graph.node}
    frozen = {i.name for i in graph.initializer}  # the frozen weights; the adapters are inputs
    prods: dict[str, dict] = {}
    total_kernel = 0.0
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        total_kernel += ev["dur"]
        if args.get("op_name") not in OPS:
            continue
        node = nodes[ev["name"][: -len("_kernel_time")]]
        shapes = [list(s.values())[0] for s in args["input_type_shape"]]
        at = {k: v for k, v in _attrs(node).items() if k in ("transA", "transB", "alpha", "beta", "transBatchA",
                                                              "transBatchB")}
        # A frozen weight as the second operand, the first not transposed: reduced precision applies.
        lowp = len(node.input) > 1 and node.input[1] in frozen and not at.get("transA") and len(shapes[1]) == 2
        key = json.dumps([node.op_type, shapes, at, lowp], sort_keys=True)
        p = prods.setdefault(key, {"op": node.op_type, "shapes": shapes, "attrs": at, "lowp": lowp, "count": 0,
                                   "us": 0.0})
        p["count"] += 1
        p["us"] += ev["dur"]
    return {"products": list(prods.values()), "steps": a.steps, "wall_s": wall, "kernel_us": total_kernel}


def _flops(p: dict) -> float:
    a, b = p["shapes"][0], p["shapes"][1]
    at = p["attrs"]
    m = a[-1] if at.get("transA") else a[-2]
    k = a[-2] if at.get("transA") else a[-1]
    n = b[-2] if at.get("transB") else b[-1]
    batch = int(np.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))) if len(a) > 2 or len(b) > 2 else 1
    return 2.0 * batch * m * k * n


def _reps(seconds_per_call: float) -> int:
    return max(5, min(200, int(0.25 / max(seconds_per_call, 1e-6))))


def _median_time(f) -> float:
    for _ in range(3):
        f()
    t0 = time.perf_counter()
    f()
    ts = []
    for _ in range(_reps(time.perf_counter() - t0)):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _serve(calls: dict) -> None:
    """Lockstep with the driver: time product ``j`` in ``variant`` (float32 or lowp) when it sends
    ``j variant``; answer ``@time j variant seconds error`` (nan: the variant does not apply)."""
    print("@ready", flush=True)
    for line in sys.stdin:
        j, variant = line.split()
        call = calls.get((int(j), variant))
        t, err = (_median_time(call[0]), call[1]) if call else (float("nan"), float("nan"))
        print(f"@time {j} {variant} {t:.9f} {err:.3e}", flush=True)


def _weight_kn(p: dict, w: np.ndarray) -> np.ndarray:
    """The frozen operand as the [K, N] matrix the product multiplies by."""
    return np.ascontiguousarray(w.T) if p["attrs"].get("transB") else w


def _rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def _ort_int8(p: dict, x: np.ndarray, w: np.ndarray, so) -> tuple:
    """``DynamicQuantizeMatMul``: the weight in int8 with a scale per output column."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    wkn = _weight_kn(p, w) * float(p["attrs"].get("alpha", 1.0))
    scale = np.maximum(np.abs(wkn).max(0), 1e-30).astype(np.float32) / 127
    q = np.clip(np.round(wkn / scale), -127, 127).astype(np.int8)
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "q", "s"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    err = _rel_err(sess.run(None, {"x": x})[0], x @ wkn)
    return (lambda: sess.run(None, {"x": x})), err


def worker_ort(a: argparse.Namespace) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgetune.device import runner

    prods = json.loads(Path(a.products).read_text())
    rng = np.random.default_rng(0)
    calls = {}
    for j, p in enumerate(prods):
        names = [f"x{i}" for i in range(len(p["shapes"]))]
        node = helper.make_node(p["op"], names, ["y"], domain="com.microsoft" if p["op"] == "FusedMatMul" else "",
                                **p["attrs"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                                for n, s in zip(names, p["shapes"])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        so = runner.session_options(a.threads, None, arena=runner.use_arena())
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feed = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, p["shapes"])}
        calls[(j, "f32")] = (lambda sess=sess, feed=feed: sess.run(None, feed)), 0.0
        if p["lowp"]:
            calls[(j, "lowp")] = _ort_int8(p, feed["x0"], feed["x1"], so)
    _serve(calls)


def worker_torch(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    prods = json.loads(Path(a.products).read_text())
    g = torch.Generator().manual_seed(0)
    calls = {}
    for j, p in enumerate(prods):
        xs = [torch.randn(s, generator=g) for s in p["shapes"]]
        at = p["attrs"]
        xa = xs[0].transpose(-1, -2) if at.get("transA") else xs[0]
        wb = xs[1].transpose(-1, -2) if at.get("transB") else xs[1]
        alpha = float(at.get("alpha", 1.0))
        if p["op"] == "Gemm" and len(xs) > 2:
            f = (lambda xa=xa, wb=wb, c=xs[2], at=at, alpha=alpha:
                 torch.addmm(c, xa, wb, beta=float(at.get("beta", 1.0)), alpha=alpha))
        elif alpha != 1.0:
            f = (lambda xa=xa, wb=wb, alpha=alpha: torch.matmul(xa, wb).mul_(alpha))
        else:
            f = (lambda xa=xa, wb=wb: torch.matmul(xa, wb))
        calls[(j, "f32")] = f, 0.0
        if p["lowp"]:
            calls[(j, "lowp")] = _torch_lowp(torch, xa, (wb * alpha).contiguous())
    _serve(calls)


def _torch_lowp(torch, x, w) -> tuple:
    """The faster of bfloat16 (weight stored in bfloat16, the activation already in bfloat16: at
    best its cast is fused into the op before, as inductor does) and int8 (``torch._int_mm``, the
    activation quantized per call, a scale per weight column)."""
    ref = (x @ w).numpy()
    w16, x16 = w.to(torch.bfloat16), x.to(torch.bfloat16)
    scale = w.abs().amax(0).clamp_min(1e-30) / 127
    wq = (w / scale).round().clamp(-127, 127).to(torch.int8)

    def bf16():
        return torch.matmul(x16, w16)

    def int8():
        x2 = x.reshape(-1, x.shape[-1])
        s = x2.abs().amax().clamp_min(1e-30) / 127
        y = torch._int_mm((x2 / s).round_().clamp_(-127, 127).to(torch.int8), wq)
        return (y * (scale * s)).reshape(*x.shape[:-1], -1)

    best = None
    for f in (bf16, int8):
        try:
            err = _rel_err(f().float().numpy(), ref)
        except RuntimeError:  # _int_mm's shape limits
            continue
        t = _median_time(f)
        if best is None or t < best[0]:
            best = (t, f, err)
    return best[1], best[2]


PAUSE = 0.2  # s before each timing: PyTorch's OpenMP threads spin for a while after their last call


def time_products(a: argparse.Namespace, tmp: Path, prods: list[dict]) -> tuple[dict, dict]:
    """Both timing workers alive at once, taking turns product by product (the order alternating),
    so both time each product under the same machine conditions; the best of ``--rounds``. Times
    and errors keyed by (side, variant)."""
    procs = {}
    for side in ("ort", "torch"):
        cmd = [sys.executable, __file__, "--worker", side, "--threads", str(a.threads), "--products",
               str(tmp / "products.json"), "--bundle", str(a.bundle), "--data", str(a.data)]
        procs[side] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        T._expect(procs[side], side, "@ready")
    n = len(prods)
    variants = ("f32", "lowp")
    best = {(side, v): [float("inf")] * n for side in procs for v in variants}
    err = {(side, v): [float("nan")] * n for side in procs for v in variants}
    try:
        for r in range(a.rounds):
            for j in range(n):
                for v in variants if prods[j]["lowp"] else ("f32",):
                    for side in (("ort", "torch") if (j + r) % 2 == 0 else ("torch", "ort")):
                        time.sleep(PAUSE)
                        procs[side].stdin.write(f"{j} {v}\n")
                        procs[side].stdin.flush()
                        t, e = T._expect(procs[side], side, "@time").split()[3:5]
                        best[side, v][j] = min(best[side, v][j], float(t))
                        err[side, v][j] = float(e)
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()
    return best, err


def run_profile(a: argparse.Namespace, tmp: Path) -> dict:
    res = tmp / "profile.json"
    subprocess.run([sys.executable, __file__, "--worker", "profile", "--threads", str(a.threads), "--steps",
                    str(a.steps), "--tmp", str(tmp), "--result", str(res), "--bundle", str(a.bundle), "--data",
                    str(a.data)], check=True)
    return json.loads(res.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="profiled training steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2, help="passes over the products, both libraries in lockstep; best kept")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--bundle")
    ap.add_argument("--data")
    ap.add_argument("--worker", choices=["profile", "ort", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--products", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.bundle, a.data = Path(a.bundle), Path(a.data)
        if a.worker == "profile":
            Path(a.result).write_text(json.dumps(worker_profile(a)))
        else:
            {"ort": worker_ort, "torch": worker_torch}[a.worker](a)
        return
    with tempfile.TemporaryDirectory(prefix="edgetune-matmul-") as tmpd:
        tmp = Path(tmpd)
        a.bundle = T.ensure_bundle(a, tmp)
        a.data = Path(a.data) if a.data else T.make_data(tmp / "data", n_train=8 * (a.steps + 1), n_valid=8)
        print(f"machine: {machine.describe()}", flush=True)
        peak = T.fma_peak_gflops(a.threads)
        print(f"multiply-add peak (FMA loop, {a.threads} threads): {peak:.1f} GFLOP/s", flush=True)
        prof = run_profile(a, tmp)
        prods = sorted(prof["products"], key=lambda p: -p["us"])
        (tmp / "products.json").write_text(json.dumps(prods))
        best, err = time_products(a, tmp, prods)
    steps = prof["steps"]
    print(f"\n{prof['steps']} profiled steps: {prof['wall_s'] / steps:.2f} s/step, kernels {prof['kernel_us'] / 1e3 / steps:.0f} "
          f"ms/step, of which matrix products {sum(p['us'] for p in prods) / 1e3 / steps:.0f} ms")
    print("\n| product | shapes | per step | in the step, ms | ORT alone, ms | PyTorch alone, ms | ORT GFLOP/s "
          "| PyTorch GFLOP/s | ORT int8, ms | PyTorch bf16/int8, ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    tot = {"ort": 0.0, "torch": 0.0, "step": 0.0, "flops": 0.0, "ort_lowp": 0.0, "torch_lowp": 0.0}
    for j, p in enumerate(prods):
        so, st = best["ort", "f32"][j], best["torch", "f32"][j]
        lo, lt = (best["ort", "lowp"][j], best["torch", "lowp"][j]) if p["lowp"] else (so, st)
        n = p["count"] / steps
        fl = _flops(p)
        tot["ort"] += n * so
        tot["torch"] += n * st
        tot["ort_lowp"] += n * lo
        tot["torch_lowp"] += n * lt
        tot["step"] += p["us"] / 1e6 / steps
        tot["flops"] += n * fl
        tr = "".join(k for k in ("transA", "transB") if p["attrs"].get(k))
        lowp = f"{n * lo * 1e3:.1f} | {n * lt * 1e3:.1f}" if p["lowp"] else "- | -"
        print(f"| {p['op']}{' ' + tr if tr else ''} | {' x '.join(str(s) for s in p['shapes'][:2])} | {n:g} "
              f"| {p['us'] / 1e3 / steps:.1f} | {n * so * 1e3:.1f} | {n * st * 1e3:.1f} | {fl / so / 1e9:.0f} "
              f"| {fl / st / 1e9:.0f} | {lowp} |")
    summary = {"ort_ms_per_step": round(tot["ort"] * 1e3, 1), "torch_ms_per_step": round(tot["torch"] * 1e3, 1),
               "torch_speedup": round(tot["ort"] / tot["torch"], 3), "in_step_ms": round(tot["step"] * 1e3, 1),
               "gflops_ort": round(tot["flops"] / tot["ort"] / 1e9, 1),
               "gflops_torch": round(tot["flops"] / tot["torch"] / 1e9, 1), "fma_peak_gflops": round(peak, 1),
               # bench/train.py's flops_fraction cannot pass this: its FLOPs are these products'.
               "flops_fraction_ceiling": round(tot["flops"] / tot["ort"] / 1e9 / peak, 3),
               "ort_lowp_ms_per_step": round(tot["ort_lowp"] * 1e3, 1),
               "torch_lowp_ms_per_step": round(tot["torch_lowp"] * 1e3, 1),
               "torch_lowp_speedup": round(tot["ort_lowp"] / tot["torch_lowp"], 3),
               "ort_lowp_error": float(f"{np.nanmax(err['ort', 'lowp']):.3g}"),
               "torch_lowp_error": float(f"{np.nanmax(err['torch', 'lowp']):.3g}")}
    print(f"\nmachine: {machine.describe()}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
