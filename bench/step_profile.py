"""Where a training step's time goes: ONNX Runtime's profiler over a few training steps of a bundle,
the kernel time summed by op type, and (``--shapes``) the products' rates by shape.

The steps are bench/train.py's: its multi-turn chats, batches of ``--batch`` rows cut to ``--seq``
tokens, edgetune's default chunks, the optimizer after each step. The first ``--skip`` steps (which
build kernels and arenas) are run but not counted. Kernel time is the profiler's per-node time;
``model_run`` is the whole of each session run, so the difference is ONNX Runtime's own time
between nodes. The profiler adds a little to each node, so a profiled step is slower than a plain
one: use the shares, not the times, beside bench/train.py's figures.

Usage: python bench/step_profile.py [--bundle DIR] [--bf16] [--seq 256] [--batch 8] [--steps 6]
                               [--skip 2] [--shapes] [--json]
(without --bundle, the bundle bench/train.py benchmarks: out/bench-bundle-r8[-bf16-compute], exported
when missing or older than the code)
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import machine  # noqa: E402  (bench/machine.py)
import train as bench_train  # noqa: E402  (bench/train.py: data, batches, the bundle)


def product_gflops(op: str, shapes: list[list[int]], seconds: float) -> float | None:
    """The rate of one MatMul-like node: 2 M K N over its time (a [..., K] times w [N, K] or [K, N];
    the graph's trans_b is not in the profile, so the weight dimension that is not K is N)."""
    if not op.startswith("MatMul") or len(shapes) < 2 or len(shapes[1]) != 2 or not shapes[0] or seconds <= 0:
        return None
    a, w = shapes[0], shapes[1]
    k = a[-1]
    n = w[0] if w[1] == k else w[1]
    return 2.0 * math.prod(a[:-1]) * k * n / seconds / 1e9


def profile(events: list[dict], skip_runs: int) -> dict:
    """The profiler's events summed: kernel time by op type and by (op type, input shapes), over the
    session runs after the first ``skip_runs``."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    cut = runs[skip_runs - 1]["ts"] + runs[skip_runs - 1]["dur"] if 0 < skip_runs <= len(runs) else 0
    counted = [r for r in runs if r["ts"] >= cut]
    by_shape: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < cut:
            continue
        args = e.get("args") or {}
        shapes = [next(iter(s.values())) for s in args.get("input_type_shape", []) if s]
        by_shape[(args.get("op_name", "?"), json.dumps(shapes))].append(e["dur"] / 1e6)
    by_op: dict[str, list[float]] = collections.defaultdict(list)
    for (op, _), v in by_shape.items():
        by_op[op] += v
    total = sum(sum(v) for v in by_op.values())
    ops = [{"op": op, "seconds": sum(v), "share": sum(v) / total if total else 0.0, "calls": len(v)}
           for op, v in sorted(by_op.items(), key=lambda kv: -sum(kv[1]))]
    shapes = []
    for (op, shp), v in sorted(by_shape.items(), key=lambda kv: -sum(kv[1])):
        dims = json.loads(shp)
        med = sorted(v)[len(v) // 2]
        shapes.append({"op": op, "shapes": dims, "seconds": sum(v), "calls": len(v), "median_s": med,
                       "gflops_median_call": product_gflops(op, dims, med)})
    return {"runs": len(counted), "kernel_s": total, "model_run_s": sum(r["dur"] for r in counted) / 1e6,
            "ops": ops, "shapes": shapes}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description="kernel time of a few training steps, by op type (ONNX Runtime's profiler)")
    ap.add_argument("--bundle", help="an exported bundle (default: bench/train.py's, exported when missing)")
    ap.add_argument("--bf16", action="store_true", help="the default bundle exported with --compute bf16")
    ap.add_argument("--data", help="a folder with train.jsonl (default: bench/train.py's chats)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="steps counted")
    ap.add_argument("--skip", type=int, default=2, help="steps run first and not counted")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (default: ONNX Runtime's)")
    ap.add_argument("--packing", choices=["off", "on", "auto"], default="off",
                    help="sequence packing (default off, as bench/train.py runs the sides)")
    ap.add_argument("--top", type=int, default=25, help="rows of each table")
    ap.add_argument("--shapes", action="store_true", help="also the time and rate of each op by input shapes")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    a = ap.parse_args(argv)
    # CPU model, cores and instruction sets first: every figure below is this machine's
    print(f"machine: {machine.describe()}", flush=True)

    from edgetune.device import data as D
    from edgetune.device import runner as R
    from edgetune.device import trainer
    from edgetune.formats.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        if a.bundle:
            bundle = Path(a.bundle)
        else:
            ns = argparse.Namespace(bundle=None, rank=8)
            bundle = bench_train.ensure_bundle(ns, Path(tmp), compute="bf16" if a.bf16 else "float32")
        data = Path(a.data) if a.data else bench_train.make_data(Path(tmp) / "data", 400, 16)
        options = R.session_options

        def profiled(*args, **kw):  # every session of this process: profiled, files in tmp
            so = options(*args, **kw)
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tmp) / "ort")
            return so

        R.session_options = profiled
        try:
            cfg = TrainConfig(steps=a.steps + a.skip, batch_size=a.batch, lr=1e-3, schedule="constant",
                              max_seq_len=a.seq, threads=a.threads, packing=a.packing)
            t = trainer.Trainer(bundle, Path(tmp) / "run", cfg, progress=False, log=lambda s: None)
            t._open()
            batches = bench_train.batches(bundle, data, a.batch, a.seq)[: a.steps + a.skip]
            if len(batches) < a.steps + a.skip:
                raise SystemExit(f"{data} gives {len(batches)} batches of {a.batch}; fewer steps, please")
            runs, step_s = [], []  # the training session's runs of each step: one per chunk
            for b in batches:
                runs.append(len(D.chunks(b, cfg.max_batch_tokens, t.packing)))
                t0 = time.perf_counter()
                t._step([b])
                t.runner.step(1e-3)
                step_s.append(time.perf_counter() - t0)
            events = json.loads(Path(t.runner.train_sess.end_profiling()).read_text())
        finally:
            R.session_options = options
        skip_runs = sum(runs[: a.skip])
        out = profile(events, skip_runs)
    out.update(bundle=str(bundle), kernels=t.runner.kernel_info, graph=t.runner.graphs["train"], seq=a.seq,
               batch=a.batch, steps=a.steps, step_s=step_s[a.skip:],
               machine=machine.describe())
    if a.json:
        print(json.dumps(out))
        return out
    print(f"{out['bundle']} ({out['graph']}, kernels {out['kernels']}); {a.steps} steps of {a.batch} x <= {a.seq} "
          f"tokens after {a.skip} not counted")
    print(f"kernel time {out['kernel_s']:.3f} s, session runs {out['model_run_s']:.3f} s over {out['runs']} runs")
    for r in out["ops"][: a.top]:
        print(f"  {r['op']:24s} {r['seconds']:8.3f} s {100 * r['share']:5.1f} %  {r['calls']:5d} calls")
    if a.shapes:
        print("by input shapes (rate: 2 M K N over the median call, products only):")
        for r in out["shapes"][: a.top]:
            rate = f"{r['gflops_median_call']:.0f} GFLOP/s" if r["gflops_median_call"] else ""
            print(f"  {r['op']:18s} {str(r['shapes'])[:64]:64s} {r['calls']:5d} x {1e3 * r['median_s']:7.3f} ms "
                  f"{r['seconds']:7.3f} s {rate}")
    return out


if __name__ == "__main__":
    main()
