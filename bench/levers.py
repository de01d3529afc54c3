"""What each training lever buys: edgetune with one lever turned off at a time, against edgetune
as it ships, on the default model (the workload of bench/train.py: batch 8 of chats up to 256
tokens, LoRA rank 8 on q,k,v,o, AdamW, the same batches, threads, warm-up and timed steps).

Levers, each undone on its own:

- graph passes at export (a bundle exported with that pass skipped):
  ``fuse_matmuls`` (transposes and constant scales folded into ``FusedMatMul``, SiLU as one
  ``QuickGelu``), ``drop_noop_casts``, ``hoist_shapes`` (the backward pass's shape reads moved
  into the forward pass), ``recompute_cheap`` (attention probabilities, SiLU outputs,
  repeated keys/values and RMSNorm outputs recomputed in the backward pass instead of saved);
- session settings (the shipped bundle, one setting back to ONNX Runtime's default): memory
  patterns on, the default execution order, denormals kept, and glibc's malloc instead of the
  shrunk arena (``EDGETUNE_ORT_ARENA=0``);
- the run: no chunks (``--max-batch-tokens 0``).

Every variant runs in its own process (peak RSS is its own VmHWM); rounds alternate the order.
Each row gives the variant's best round and what the lever buys: shipped tokens/s over the
variant's, and the variant's peak RSS minus the shipped one. The last line is JSON:
``{lever: {"tokens_per_s", "peak_rss_mb", "speedup", "rss_saved_mb"}}``.
Usage: ``python bench/levers.py [--rounds 2] [--only hoist_shapes,daz]`` (about 22 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  - CPU model and ISA (avx2, avx512f, amx...) from /proc/cpuinfo
import train as T  # noqa: E402  - the workload, data and edgetune worker of bench/train.py

ROOT = Path(__file__).resolve().parent.parent
EXPORT_PASSES = {  # lever -> how build() is called without it
    "fuse_matmuls": "lambda proto: 0",
    "drop_noop_casts": "lambda proto, types: 0",
    "hoist_shapes": "lambda proto, n_forward: n_forward",
    "recompute_cheap": "lambda proto, n_forward, types, shapes: 0",
}
SESSION = ("mem_pattern", "default_order", "daz", "malloc")
LEVERS = ["shipped", *EXPORT_PASSES, *SESSION, "chunks"]
WHAT = {
    "shipped": "edgetune as it ships",
    "fuse_matmuls": "matmul folding and QuickGelu (export)",
    "drop_noop_casts": "no-op casts dropped (export)",
    "hoist_shapes": "shape reads hoisted (export)",
    "recompute_cheap": "selective recomputation (export)",
    "mem_pattern": "memory patterns off (session)",
    "default_order": "priority-based order (session)",
    "daz": "denormals as zero (session)",
    "malloc": "shrunk ORT arena, not malloc (session)",
    "chunks": "chunks of <= 1,024 tokens (run)",
}


def export_without(lever: str, out: Path, rank: int) -> None:
    """The default model exported as bench/train.py exports it, with one graph pass skipped."""
    code = (f"from edgetune import autodiff; autodiff.{lever} = {EXPORT_PASSES[lever]}; "
            "from edgetune.config import AdapterConfig; from edgetune.export import export; "
            f"export(None, {str(out)!r}, AdapterConfig(rank={rank}, alpha={2 * rank}, "
            f"targets={tuple(T.TARGETS)!r}), overwrite=True)")
    print(f"exporting the default model without {lever} to {out}", flush=True)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT), stdout=subprocess.DEVNULL)


def worker(a: argparse.Namespace) -> dict:
    """bench/train.py's edgetune side, with one session setting undone."""
    from edgetune import runner

    original = runner.session_options

    def session_options(*args, **kw):
        import onnxruntime as ort

        so = original(*args, **kw)
        if a.worker == "mem_pattern":
            so.enable_mem_pattern = True
        elif a.worker == "default_order":
            so.execution_order = ort.ExecutionOrder.DEFAULT
        elif a.worker == "daz":
            so.add_session_config_entry("session.set_denormal_as_zero", "0")
        return so

    runner.session_options = session_options
    return T.worker_edgetune(a)


def run(lever: str, bundle: Path, a: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{lever}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", lever, "--bundle", str(bundle),
           "--data", str(a.data), "--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq),
           "--rank", str(a.rank), "--lr", str(a.lr), "--threads", str(a.threads), "--tmp", str(tmp / lever),
           "--result", str(out)]
    if lever == "chunks":
        cmd += ["--max-batch-tokens", "0"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if lever == "malloc":
        env["EDGETUNE_ORT_ARENA"] = "0"
    subprocess.run(cmd, check=True, env=env, cwd=str(ROOT))
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per lever")
    ap.add_argument("--only", help="comma-separated levers (the shipped side always runs)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side (one untimed warm-up step first)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-batch-tokens", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=LEVERS, help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.bundle, a.data = Path(a.bundle), Path(a.data)
        Path(a.result).write_text(json.dumps(worker(a)))
        return
    levers = LEVERS if not a.only else ["shipped"] + [x for x in a.only.split(",") if x != "shipped"]
    unknown = [x for x in levers if x not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown lever(s) {', '.join(unknown)}; choose from {', '.join(LEVERS[1:])}")
    print(f"machine: {machine.describe()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="edgetune-levers-") as tmpd:
        tmp = Path(tmpd)
        a.bundle = None
        shipped = T.ensure_bundle(a, tmp)
        bundles = {x: shipped for x in levers}
        for x in levers:
            if x in EXPORT_PASSES:
                bundles[x] = tmp / f"bundle-{x}"
                export_without(x, bundles[x], a.rank)
        a.data = T.make_data(tmp / "data", n_train=a.batch * (a.steps + 1), n_valid=16)
        results: dict[str, list[dict]] = {x: [] for x in levers}
        for r in range(a.rounds):
            for x in (levers if r % 2 == 0 else levers[::-1]):
                res = run(x, bundles[x], a, tmp)
                results[x].append(res)
                print(f"round {r + 1} {WHAT[x] if x == 'shipped' else 'without ' + WHAT[x]:>52}: "
                      f"{res['s_per_step']:.2f} s/step (median; {res['s_min']:.2f}-{res['s_max']:.2f}), "
                      f"{res['tokens'] / res['time']:.0f} tokens/s, peak RSS {res['peak_rss_mb']:.0f} MB, "
                      f"valid loss {res['valid_loss_0']:.4f} -> {res['valid_loss']:.4f}", flush=True)
    tps = {x: max(r["tokens"] / r["time"] for r in rs) for x, rs in results.items()}
    rss = {x: min(r["peak_rss_mb"] for r in rs) for x, rs in results.items()}
    out = {}
    print(f"\n{'lever':<44} {'tokens/s without':>16} {'peak RSS without':>16} {'speed-up':>8} {'RSS saved':>9}")
    for x in levers:
        out[x] = {"tokens_per_s": round(tps[x], 1), "peak_rss_mb": round(rss[x]),
                  "speedup": round(tps["shipped"] / tps[x], 3), "rss_saved_mb": round(rss[x] - rss["shipped"])}
        print(f"{WHAT[x]:<44} {tps[x]:16.0f} {rss[x]:13.0f} MB {out[x]['speedup']:8.2f} {out[x]['rss_saved_mb']:6d} MB")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
