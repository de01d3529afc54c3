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

Every variant runs in its own process (peak RSS is its own VmHWM). The variants run in lockstep
with the shipped side, as bench/train.py's sides do: in groups of ``--group`` variants, the shipped
side and the group's variants are alive at once and take turns step by step (the order rotating,
a pause before each step), so step ``i`` of every side runs on the same batch under the same
machine conditions; rounds alternate the order of the groups. Each row gives what the lever buys:
the speed-up is the median over all paired steps of the variant's step time over the shipped
side's in the same group (with its range), tokens/s the variant's best round, and the RSS saved
the variant's lowest peak minus the shipped side's. ``--no-lockstep`` runs every process one after
another instead. The last line is JSON:
``{lever: {"tokens_per_s", "peak_rss_mb", "speedup", "speedup_min", "speedup_max", "rss_saved_mb"}}``.
Usage: ``python bench/levers.py [--rounds 1] [--steps 8] [--only hoist_shapes,daz]`` (on 2 cores with
``--steps 8``: about 4 minutes of exports, then about 18 minutes per round).
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
            "from edgetune.formats.config import AdapterConfig; from edgetune.workstation.export import export; "
            f"export(None, {str(out)!r}, AdapterConfig(rank={rank}, alpha={2 * rank}, "
            f"targets={tuple(T.TARGETS)!r}), overwrite=True)")
    print(f"exporting the default model without {lever} to {out}", flush=True)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT), stdout=subprocess.DEVNULL)


def worker(a: argparse.Namespace) -> dict:
    """bench/train.py's edgetune side, with one session setting undone."""
    from edgetune.device import runner

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


def worker_cmd(lever: str, a: argparse.Namespace, tmp: Path) -> tuple[list[str], dict, str, Path]:
    """The command, environment and directory of one lever's worker, and where it writes its result."""
    tag = f"{lever}-{time.time_ns()}"
    out = tmp / f"{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", lever, "--bundle", str(a.bundles[lever]),
           "--data", str(a.data), "--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq),
           "--rank", str(a.rank), "--lr", str(a.lr), "--threads", str(a.threads), "--tmp", str(tmp / tag),
           "--result", str(out)]
    if lever == "chunks":
        cmd += ["--max-batch-tokens", "0"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if lever == "malloc":
        env["EDGETUNE_ORT_ARENA"] = "0"
    return cmd, env, str(ROOT), out


def read_result(lever: str, a: argparse.Namespace, out: Path) -> dict:
    return json.loads(out.read_text())


def run(lever: str, a: argparse.Namespace, tmp: Path) -> dict:
    cmd, env, cwd, out = worker_cmd(lever, a, tmp)
    subprocess.run(cmd, check=True, env=env, cwd=cwd)
    return read_result(lever, a, out)


def report(r: int, x: str, res: dict) -> None:
    print(f"round {r + 1} {WHAT[x] if x == 'shipped' else 'without ' + WHAT[x]:>52}: "
          f"{res['s_per_step']:.2f} s/step (median; {res['s_min']:.2f}-{res['s_max']:.2f}), "
          f"{res['tokens'] / res['time']:.0f} tokens/s, peak RSS {res['peak_rss_mb']:.0f} MB, "
          f"valid loss {res['valid_loss_0']:.4f} -> {res['valid_loss']:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1, help="rounds (the order of the groups alternates)")
    ap.add_argument("--group", type=int, default=3, help="variants in lockstep with the shipped side at once")
    ap.add_argument("--no-lockstep", dest="lockstep", action="store_false",
                    help="run every worker one after another instead of in lockstep")
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
    ap.add_argument("--gated", action="store_true", help=argparse.SUPPRESS)
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
        a.bundles = bundles
        results: dict[str, list[dict]] = {x: [] for x in levers}
        ratios: dict[str, list[float]] = {x: [] for x in levers}  # variant step time / shipped, paired
        variants = levers[1:]
        groups = [variants[i: i + a.group] for i in range(0, len(variants), a.group)] or [[]]
        for r in range(a.rounds):
            if not a.lockstep:
                for x in (levers if r % 2 == 0 else levers[::-1]):
                    results[x].append(run(x, a, tmp))
                    report(r, x, results[x][-1])
                continue
            for grp in (groups if r % 2 == 0 else groups[::-1]):
                sides = ["shipped", *(grp if r % 2 == 0 else grp[::-1])]
                got = T.run_lockstep(sides, a, tmp, cmd_for=worker_cmd, result_for=read_result)
                for x in sides:
                    results[x].append(got[x])
                    report(r, x, got[x])
                for x in grp:
                    ratios[x] += [tv / ts for ts, tv in zip(got["shipped"]["step_times"], got[x]["step_times"])]
    tps = {x: max(r["tokens"] / r["time"] for r in rs) for x, rs in results.items()}
    rss = {x: min(r["peak_rss_mb"] for r in rs) for x, rs in results.items()}
    out = {}
    print(f"\n{'lever':<44} {'tokens/s without':>16} {'peak RSS without':>16} {'speed-up (range)':>18} {'RSS saved':>9}")
    for x in levers:
        if ratios[x]:  # lockstep: the median of the paired steps
            sp, lo, hi = float(np.median(ratios[x])), min(ratios[x]), max(ratios[x])
        else:
            sp = lo = hi = tps["shipped"] / tps[x]
        out[x] = {"tokens_per_s": round(tps[x], 1), "peak_rss_mb": round(rss[x]), "speedup": round(sp, 3),
                  "speedup_min": round(lo, 3), "speedup_max": round(hi, 3),
                  "rss_saved_mb": round(rss[x] - rss["shipped"])}
        print(f"{WHAT[x]:<44} {tps[x]:16.0f} {rss[x]:13.0f} MB {sp:6.2f} ({lo:.2f}-{hi:.2f}) "
              f"{out[x]['rss_saved_mb']:6d} MB")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
