"""Training speed and memory: edgetune on the current onnxruntime against PyTorch + PEFT, as its
documentation shows it and tuned, and (optionally) against edgetune's former backend (ONNX
Runtime's last training release, 1.19.2, in its own environment: scripts/legacy_env.sh).

Sides (each in its own process, so peak RSS is its own), run in lockstep: all side processes are
alive at once and take turns step by step (the order rotating, a 0.3 s pause before each step),
so step ``i`` of every side runs on the same batch under the same machine conditions, and a
machine whose speed drifts (seen here: 2x between minutes) slows every side alike. Loading,
warm-up and validation run one process at a time. ``--no-lockstep`` runs the sides one after
another instead; rounds alternate the order either way.

- ``edgetune``: the default path, batches run in chunks of at most 1,024 tokens, on the fused
  kernels where the library loads (the JSON's ``fused`` and ``kernels`` say which ran);
- ``edgetune, plain graphs`` (``--plain-side``): the same on the plain graphs
  (``EDGETUNE_KERNELS=plain``), reported as ``*_fused_vs_plain``;
- ``edgetune, no chunks``: the same with ``--max-batch-tokens 0`` (each batch in one pass);
- ``pytorch+peft``: the documented loop: ``model(input_ids, attention_mask, labels)``, full-vocabulary
  logits at every position, one pass per batch;
- ``pytorch+peft tuned``: the same tricks edgetune uses, written in PyTorch: the hidden states of
  labelled positions gathered before ``lm_head`` (logits only where a label is), the same
  token-budget chunks with token-weighted gradient accumulation, each chunk trimmed of the padding
  its rows do not use, no tensor kept alive into the next step, SDPA attention;
- ``pytorch+peft tuned +compile`` (``--compile``): the tuned side with ``torch.compile`` on each
  decoder layer (regional compilation: the 30 layers share one compiled graph, so the first
  compile is short: a whole worker run from an empty inductor cache took 1 min 42 s on 2 cores;
  ``use_cache=False``, so no guard watches a KV cache); with
  ``--compile-body`` also ``pytorch+peft tuned +compile body``: ``torch.compile`` on the whole model
  body (one graph of all 30 layers, about 13 minutes to compile on 2 cores). The ``_tuned`` ratios
  take the fastest of the tuned sides for speed and the smallest for memory (``_tuned_eager``,
  ``_tuned_compile`` and ``_tuned_compile_body`` give each);
- ``edgetune on ORT 1.19.2`` (``--legacy``);
- ``edgetune, int8 products (lever)`` (``--int8 [all|forward]``): a copy of the bundle whose
  frozen-weight products run in int8 (``bench/int8.py``), against edgetune in float32
  (``*_int8_vs_float``) and the best tuned side (``*_int8_vs_tuned``);
- with ``--gradient-checkpointing``: ``edgetune, checkpointed`` (the bundle exported with
  ``--gradient-checkpointing``) and ``pytorch+peft tuned, checkpointed`` (the tuned side with
  transformers' gradient checkpointing, non-reentrant): the same trick on both sides, reported as
  ``*_ckpt`` ratios (and ``*_ckpt_vs_tuned``: checkpointed edgetune against the plain tuned side).

All train the same model, LoRA config, batches (multi-turn chats with prompt masking and varied
lengths), optimizer (AdamW, PyTorch's rule and defaults) and thread count. Each side takes one
untimed warm-up step, then ``--steps`` timed steps (median and min-max reported); the validation
loss is taken before the first step and after the last. flops_fraction is edgetune's useful
work (frozen body forward and activation backward, attention matmuls included, vocabulary
projection of labelled rows) over the machine's float32 multiply-add peak measured by the merge
kernels' FMA loop: in lockstep, read again just before every step (after the pause) and weighted
by the steps' times, because a shared machine's speed drifts between minutes
(``flops_fraction_start_peak`` divides by the reading at the start of the run instead, and
``fma_peak_gflops_steps`` gives the lowest and highest reading). With ``--bf16`` on a CPU with
AVX512-BF16, ``flops_fraction_bf16_peak`` divides the same work by the bfloat16 dot-product peak
(vdpbf16ps, twice the float32 rate), read the same way (on a CPU with AMX, whose tiles the
products use there, the products' own peak is higher still). The last line is JSON:

    {"tokens_per_s_ratio", "tokens_per_s_ratio_tuned", "peak_rss_ratio", "peak_rss_ratio_tuned",
     "loss_gap", "loss_gap_tuned", "flops_fraction", "fused", "kernels", "tokens_per_s_ratio_no_chunks", ...}

ratios are edgetune over the other side; loss_gap is (edgetune - other) / other. In lockstep the
tokens/s ratios are the median, over every step of every round, of the other side's step time over
edgetune's on the same batch (the range is printed); peak RSS is each side's lowest over rounds.
Usage: python bench/train.py [--steps 6] [--batch 8] [--seq 256] [--rank 8] [--rounds 2] [--legacy]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  - CPU model and ISA (avx2, avx512f, amx...) from /proc/cpuinfo

ROOT = Path(__file__).resolve().parent.parent
TICKETS = ROOT / "examples" / "data" / "tickets"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_data(out: Path, n_train: int, n_valid: int, seed: int = 0) -> Path:
    """Multi-turn triage chats (2-6 tickets each) from the sample data: long, varied, masked."""
    rng = random.Random(seed)
    recs = [json.loads(x) for x in (TICKETS / "train.jsonl").read_text().splitlines()]
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("valid", n_valid)):
        lines = []
        for _ in range(n):
            turns = rng.sample(recs, rng.randint(2, 6))
            msgs = [turns[0]["messages"][0]]
            for t in turns:
                msgs += t["messages"][1:]
            lines.append(json.dumps({"messages": msgs}))
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def peak_rss_mb() -> float:
    """This process's own peak (VmHWM): ru_maxrss would also count the parent's peak before exec."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches(bundle: Path, data: Path, batch: int, seq: int, split: str = "train"):
    from edgetune.device import data as D
    from edgetune.device.tokenizer import ChatTokenizer

    tok = ChatTokenizer.from_dir(bundle)
    ds = D.load_dataset(data / f"{split}.jsonl", tok, seq)
    return D.epoch_batches(ds, batch, 0, 0, tok.pad_id)


# -- workers ---------------------------------------------------------------------------
class Gate:
    """Lockstep with the driver (the default; ``--no-lockstep`` turns it off): a worker says when
    its warm-up step is done, then runs each timed step only when told to and reports its time, so
    that every side's step ``i`` runs on the same batch under the same machine conditions as the
    others'. In a worker started without ``--gated`` every call is a no-op."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.on = bool(getattr(a, "gated", False))

    def before(self, i: int) -> None:
        if self.on and i > 0:
            if i == 1:
                print("@ready", flush=True)
            sys.stdin.readline()

    def after(self, i: int, dt: float) -> None:
        if self.on and i > 0:
            print(f"@step {i} {dt:.6f}", flush=True)

    def finish(self) -> None:  # the validation afterwards runs when the driver says so
        if self.on:
            print("@ready", flush=True)
            sys.stdin.readline()


def worker_edgetune(a: argparse.Namespace) -> dict:
    import onnxruntime as ort

    from edgetune.device import trainer  # never torch: the device side does not have it
    from edgetune.formats.config import TrainConfig

    if "torch" in sys.modules:
        raise SystemExit("torch was imported into the edgetune worker: its RSS would count against edgetune")

    cfg = TrainConfig(steps=a.steps + 1, batch_size=a.batch, lr=a.lr, schedule="constant", max_seq_len=a.seq,
                      threads=a.threads, packing=a.packing, **({} if a.max_batch_tokens is None else {"max_batch_tokens": a.max_batch_tokens}))
    t = trainer.Trainer(a.bundle, Path(a.tmp) / "run", cfg, progress=False, log=lambda s: None)
    t._open()
    train, valid = batches(a.bundle, a.data, a.batch, a.seq), batches(a.bundle, a.data, a.batch, a.seq, "valid")
    vl0 = t.validate_batches(valid)
    times, toks, labs, lengths = [], 0, 0, []
    gate = Gate(a)
    for i, b in enumerate(train[: a.steps + 1]):
        gate.before(i)
        t0 = time.perf_counter()
        loss = t._step([b])
        t.runner.step(a.lr)
        dt = time.perf_counter() - t0
        gate.after(i, dt)
        if i > 0:  # the first step builds kernels and arenas
            times.append(dt)
            toks, labs = toks + b.n_tokens, labs + b.n_labels
            lengths += b.attention_mask.sum(1).tolist()
    gate.finish()
    vl = t.validate_batches(valid)
    return {"side": "edgetune", "s_per_step": float(np.median(times)), "s_min": float(np.min(times)),
            "s_max": float(np.max(times)), "tokens": toks, "labelled": labs,
            "time": float(np.sum(times)), "peak_rss_mb": peak_rss_mb(), "valid_loss": vl, "valid_loss_0": vl0,
            "last_loss": loss, "onnxruntime": ort.__version__, "max_batch_tokens": cfg.max_batch_tokens,
            "packing": t.packing,
            "kernels": t.runner.kernel_info, "graph": t.runner.graphs["train"],
            "lengths": lengths,
            "torch_loaded": "torch" in sys.modules}


def _torch_model(a: argparse.Namespace, **kw):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgetune.formats.models import DEFAULT_MODEL, resolve_model
    from edgetune.workstation.export import _converted_gguf

    torch.set_num_threads(a.threads or os.cpu_count())
    torch.manual_seed(0)
    gguf, _ = resolve_model(DEFAULT_MODEL)
    # --bf16: the frozen base in bfloat16 (its products on oneDNN's AMX or AVX512-BF16 kernels), the adapters in
    # float32 (PEFT's default for a bfloat16 base), the loss on float32 logits.
    dtype = torch.bfloat16 if getattr(a, "bf16", False) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(_converted_gguf(gguf, print), dtype=dtype, **kw)
    return get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=TARGETS, lora_dropout=0.0))


def _torch_valid_loss(model, valid) -> float:
    """Mean loss over the labelled tokens (labels are edgetune's shifted targets)."""
    import torch

    model.eval()
    base = model.base_model.model
    vl, vn = 0.0, 0
    with torch.no_grad():
        for b in valid:
            h = base.model(input_ids=torch.from_numpy(b.input_ids),
                           attention_mask=torch.from_numpy(b.attention_mask), use_cache=False).last_hidden_state
            tgt = torch.from_numpy(b.labels)
            sel = tgt != -100
            vl += torch.nn.functional.cross_entropy(base.lm_head(h[sel]).float(), tgt[sel], reduction="sum").item()
            vn += int(sel.sum())
    model.train()
    return vl / vn


def worker_torch(a: argparse.Namespace) -> dict:
    """PyTorch + PEFT as its documentation shows it."""
    import torch

    model = _torch_model(a)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    train, valid = batches(a.bundle, a.data, a.batch, a.seq), batches(a.bundle, a.data, a.batch, a.seq, "valid")
    vl0 = _torch_valid_loss(model, valid)

    def unshift(lab: np.ndarray) -> torch.Tensor:  # HF shifts labels itself
        out = np.full_like(lab, -100)
        out[:, 1:] = lab[:, :-1]
        return torch.from_numpy(out)

    model.train()
    times, toks, labs, loss = [], 0, 0, None
    gate = Gate(a)
    for i, b in enumerate(train[: a.steps + 1]):
        gate.before(i)
        t0 = time.perf_counter()
        out = model(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.attention_mask),
                    labels=unshift(b.labels))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        dt = time.perf_counter() - t0
        gate.after(i, dt)
        loss = out.loss.item()
        if i > 0:
            times.append(dt)
            toks, labs = toks + b.n_tokens, labs + b.n_labels
    gate.finish()
    vl = _torch_valid_loss(model, valid)
    return {"side": "pytorch+peft", "s_per_step": float(np.median(times)), "s_min": float(np.min(times)),
            "s_max": float(np.max(times)), "tokens": toks, "labelled": labs,
            "time": float(np.sum(times)), "peak_rss_mb": peak_rss_mb(), "valid_loss": vl, "valid_loss_0": vl0,
            "last_loss": loss, "torch": torch.__version__}


def worker_torch_tuned(a: argparse.Namespace) -> dict:
    """PyTorch + PEFT with edgetune's tricks: labelled rows only through lm_head, token-budget
    chunks trimmed of padding with token-weighted accumulation, nothing stale, SDPA, optional compile."""
    import torch
    import torch.nn.functional as F

    from edgetune.device import data as D

    model = _torch_model(a, attn_implementation="sdpa")
    if a.ckpt:  # recompute each decoder layer in the backward pass, as edgetune's checkpointed graph does
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.base_model.model.train()
    base = model.base_model.model
    body, head = base.model, base.lm_head
    if a.compile == "layers":  # regional compilation: every decoder layer runs one shared compiled graph
        for layer in body.layers:
            layer.compile(dynamic=True)
    elif a.compile == "body":
        body = torch.compile(body, dynamic=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr)
    train, valid = batches(a.bundle, a.data, a.batch, a.seq), batches(a.bundle, a.data, a.batch, a.seq, "valid")
    vl0 = _torch_valid_loss(model, valid)
    budget = 1024 if a.max_batch_tokens is None else a.max_batch_tokens
    times, toks, labs, loss = [], 0, 0, 0.0
    gate = Gate(a)
    for i, b in enumerate(train[: a.steps + 1]):
        gate.before(i)
        t0 = time.perf_counter()
        loss = 0.0
        for c in D.split_rows(b, budget):  # the same chunks edgetune runs, trimmed of unused padding
            n = int(c.attention_mask.sum(1).max())
            ids, mask = torch.from_numpy(c.input_ids[:, :n]), torch.from_numpy(c.attention_mask[:, :n])
            tgt = torch.from_numpy(c.labels[:, :n])
            sel = tgt != -100
            h = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            part = F.cross_entropy(head(h[sel]).float(), tgt[sel], reduction="sum") / b.n_labels
            part.backward()
            loss += part.item()
            del h, part  # nothing of this chunk outlives it
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        gate.after(i, dt)
        if i > 0:
            times.append(dt)
            toks, labs = toks + b.n_tokens, labs + b.n_labels
    gate.finish()
    vl = _torch_valid_loss(model, valid)
    compiled = {"layers": " +compile", "body": " +compile body"}.get(a.compile, "")
    return {"side": "pytorch+peft tuned" + compiled + (", checkpointed" if a.ckpt else ""),
            "s_per_step": float(np.median(times)),
            "s_min": float(np.min(times)), "s_max": float(np.max(times)), "tokens": toks, "labelled": labs,
            "time": float(np.sum(times)), "peak_rss_mb": peak_rss_mb(), "valid_loss": vl, "valid_loss_0": vl0,
            "last_loss": loss, "torch": torch.__version__, "max_batch_tokens": budget}


# -- driver ----------------------------------------------------------------------------
def fma_peak_gflops(threads: int, passes: int = 5, iters: int | None = None, bf16: bool = False) -> float:
    """The machine's multiply-add peak: the merge kernels' FMA loop at their widest vector width,
    the best of ``passes`` passes (``iters`` FMA iterations each; the loop's default if None).
    ``bf16``: the bfloat16 dot-product loop (vdpbf16ps) instead, 0 where the CPU lacks AVX512-BF16."""
    from edgetune.device import _ext

    args = (threads,) if iters is None else (threads, iters)
    loop = _ext.peak_bf16_gflops if bf16 else _ext.peak_gflops
    return max(loop(*args) for _ in range(passes))


def train_flops(manifest: dict, lengths: list[int], labelled: int) -> float:
    """Useful work of one pass over sequences of ``lengths`` tokens: per token, forward 2N and
    activation backward 2N for the frozen body's matmuls; per sequence of L tokens and layer,
    the attention matmuls (QK^T and PV forward, 4 L^2 d; their backward, 8 L^2 d); and the
    vocabulary projection of labelled tokens (the adapters' own work is tiny)."""
    c = manifest["model_config"]
    h, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    body = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    attention = layers * 12.0 * h * sum(L * L for L in lengths)
    return 4.0 * body * sum(lengths) + attention + 4.0 * vocab * h * labelled


LEGACY_SRC = ROOT / "out" / "legacy-src"
LEGACY_PY = ROOT / ".venv-legacy" / "bin" / "python"


def worker_cmd(side: str, a: argparse.Namespace, tmp: Path) -> tuple[list[str], dict, str, Path]:
    out = tmp / f"{side}-{time.time_ns()}.json"
    py, script, bundle, env = sys.executable, __file__, a.bundle, dict(os.environ)
    if side == "legacy":  # the former backend's own worker, source tree and environment
        py, script, bundle = str(LEGACY_PY), str(LEGACY_SRC / "bench" / "train.py"), a.legacy_bundle
        env["PYTHONPATH"] = str(LEGACY_SRC)
    if side == "quantized":
        bundle = a.quantized_bundle
    if side == "ckpt":
        bundle = a.ckpt_bundle
    if side == "int8":
        bundle = a.int8_bundle
    if side == "plain":
        env["EDGETUNE_KERNELS"] = "plain"
    worker = {"torch": "torch", "tuned": "tuned", "tuned_compile": "tuned", "tuned_compile_body": "tuned",
              "tuned_ckpt": "tuned"}.get(side, "edgetune")
    cmd = [py, script, "--worker", worker, "--bundle", str(bundle),
           "--data", str(a.data), "--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq),
           "--rank", str(a.rank), "--lr", str(a.lr), "--threads", str(a.threads), "--tmp", str(tmp / side),
           "--result", str(out), "--packing", a.packing]
    if side == "nochunk":
        cmd += ["--max-batch-tokens", "0"]
    elif a.max_batch_tokens is not None:
        cmd += ["--max-batch-tokens", str(a.max_batch_tokens)]
    if side == "tuned_compile":
        cmd += ["--compile", "layers"]
    if side == "tuned_compile_body":
        cmd += ["--compile", "body"]
    if side == "tuned_ckpt":
        cmd += ["--ckpt"]
    if a.bf16 and worker != "edgetune":
        cmd += ["--bf16"]
    return cmd, env, str(LEGACY_SRC if side == "legacy" else ROOT), out


def run_worker(side: str, a: argparse.Namespace, tmp: Path) -> dict:
    cmd, env, cwd, out = worker_cmd(side, a, tmp)
    subprocess.run(cmd, check=True, env=env, cwd=cwd)
    return worker_result(side, a, out)


PAUSE = 0.3  # s before each step: PyTorch's OpenMP threads spin for a while after their last call


def _expect(p: subprocess.Popen, side: str, prefix: str) -> str:
    """The worker's next protocol line starting with ``prefix``; its other output passes through."""
    for line in p.stdout:
        if line.startswith(prefix):
            return line
        print(line, end="", flush=True)
    raise SystemExit(f"the {side} worker ended early (exit code {p.wait()})")


def run_lockstep(sides: list[str], a: argparse.Namespace, tmp: Path, cmd_for=None,
                 result_for=None) -> dict[str, dict]:
    """Every side in its own process, all alive at once, taking turns step by step: step ``i`` of
    each side runs on the same batch, back to back with the others' (the order rotating), so a
    machine whose speed drifts slows every side alike. Loading, warm-up and validation run one
    worker at a time; each result gets its ``step_times``. ``cmd_for(side, a, tmp)`` and
    ``result_for(side, a, out)`` default to this benchmark's workers (bench/levers.py passes its own)."""
    cmd_for, result_for = cmd_for or worker_cmd, result_for or worker_result
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        for side in sides:
            cmd, env, cwd, out = cmd_for(side, a, tmp)
            p = subprocess.Popen(cmd + ["--gated"], env=env, cwd=cwd, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, bufsize=1)
            procs[side] = (p, out)
            _expect(p, side, "@ready")
        steps: dict[str, list[float]] = {side: [] for side in sides}
        peaks: dict[str, list[float]] = {side: [] for side in sides}
        bf16_peaks: dict[str, list[float]] = {side: [] for side in sides}
        for i in range(1, a.steps + 1):
            k = i % len(sides)
            for side in sides[k:] + sides[:k]:
                p = procs[side][0]
                time.sleep(PAUSE)
                # The multiply-add peak the machine offers this minute, measured between the pause
                # and the step (0.1-0.2 s): flops_fraction divides by the peak beside each step.
                peaks[side].append(fma_peak_gflops(a.threads, passes=2, iters=10_000_000))  # about 0.1 s
                if getattr(a, "bf16_peak", 0.0):
                    bf16_peaks[side].append(fma_peak_gflops(a.threads, passes=2, iters=5_000_000, bf16=True))
                p.stdin.write("go\n")
                p.stdin.flush()
                steps[side].append(float(_expect(p, side, "@step").split()[2]))
        results = {}
        for side in sides:
            p, out = procs[side]
            _expect(p, side, "@ready")
            p.stdin.write("go\n")
            p.stdin.close()
            for line in p.stdout:
                print(line, end="", flush=True)
            if p.wait() != 0:
                raise SystemExit(f"the {side} worker failed (exit code {p.returncode})")
            results[side] = {**result_for(side, a, out), "step_times": steps[side], "step_peaks": peaks[side],
                             "step_bf16_peaks": bf16_peaks[side]}
        return results
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()


def worker_result(side: str, a: argparse.Namespace, out: Path) -> dict:
    res = json.loads(out.read_text())
    if side == "quantized":
        res["side"] = f"edgetune, {a.quantize} base" + (f", {a.compute} compute" if a.compute != "float32" else "")
    if side == "nochunk":
        res["side"] = "edgetune, no chunks"
    if side == "ckpt":
        res["side"] = "edgetune, checkpointed"
    if side == "int8":
        res["side"] = "edgetune, int8 products (lever)"
    if side == "plain":
        res["side"] = "edgetune, plain graphs"
    if side == "legacy":
        res["side"] = "edgetune on ORT 1.19.2"
        res.setdefault("s_min", res["s_per_step"])
        res.setdefault("s_max", res["s_per_step"])
    return res


def ensure_bundle(a: argparse.Namespace, tmp: Path, quantize: str | None = None, ckpt: bool = False,
                  compute: str = "float32") -> Path:
    if a.bundle and not quantize and not ckpt and compute == "float32":
        return Path(a.bundle)
    out = ROOT / "out" / (f"bench-bundle-r{a.rank}" + (f"-{quantize}" if quantize else "")
                          + (f"-{compute}-compute" if compute != "float32" else "") + ("-ckpt" if ckpt else ""))
    m = json.loads((out / "edgetune.json").read_text()) if (out / "edgetune.json").is_file() else {}
    stamp = out / "bench-source.sha256"  # the code the bundle was exported with: a change re-exports it
    fresh = stamp.is_file() and stamp.read_text() == export_source_hash()
    if m.get("format") != 2 or "sizes" not in m or not fresh:
        # In a child process: the driver stays small, so no worker inherits an export-sized peak.
        print(f"exporting the default model (rank {a.rank} on {','.join(TARGETS)}"
              f"{', ' + quantize + ' base' if quantize else ''}{', ' + compute + ' compute' if compute != 'float32' else ''}) "
              f"to {out}", flush=True)
        code = ("from edgetune.formats.config import AdapterConfig; from edgetune.workstation.export import export; "
                f"export(None, {str(out)!r}, AdapterConfig(rank={a.rank}, alpha={2 * a.rank}, "
                f"targets={tuple(TARGETS)!r}, quantize={quantize!r}, compute={compute!r}, gradient_checkpointing={ckpt!r}), "
                "overwrite=True)")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT))
        stamp.write_text(export_source_hash())
    return out


def export_source_hash() -> str:
    """A hash of the sources that decide what an export writes (the graph builders, the manifest,
    the kernel library's ops), so a bundle from older code is not benchmarked as the current one."""
    import hashlib

    h = hashlib.sha256()
    for d in ("edgetune/workstation", "edgetune/formats", "cpp_ext/ort_ops"):
        for f in sorted((ROOT / d).rglob("*")):
            if f.is_file() and f.suffix in (".py", ".cpp", ".hpp"):
                h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def ensure_legacy_bundle(a: argparse.Namespace) -> Path:
    """The same model and adapter exported by the former backend's code, in its environment."""
    subprocess.run(["bash", str(ROOT / "scripts" / "legacy_env.sh")], check=True)
    out = ROOT / "out" / f"bench-bundle-legacy-r{a.rank}"
    if not (out / "edgetune.json").is_file():
        print(f"exporting the default model for the 1.19.2 backend to {out}", flush=True)
        code = ("from edgetune.formats.config import AdapterConfig; from edgetune.workstation.export import export; "
                f"export(None, {str(out)!r}, AdapterConfig(rank={a.rank}, alpha={2 * a.rank}, "
                f"targets={tuple(TARGETS)!r}), overwrite=True)")
        subprocess.run([str(LEGACY_PY), "-c", code], check=True, cwd=str(LEGACY_SRC),
                       env={**os.environ, "PYTHONPATH": str(LEGACY_SRC)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="edgetune vs PyTorch + PEFT training speed and memory")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side (one untimed warm-up step first)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256, help="longest sequence; the data are cut to it")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds per side")
    ap.add_argument("--max-batch-tokens", type=int, default=None,
                    help="edgetune's chunking of each batch (default: edgetune's own default; 0 turns it off)")
    ap.add_argument("--packing", choices=["off", "on", "auto"], default="off",
                    help="edgetune's sequence packing (default off: the PyTorch sides run the same padded rows, "
                         "so the sides compute the same tokens)")
    ap.add_argument("--bundle", help="an exported bundle of the default model (else one is exported)")
    ap.add_argument("--legacy", action="store_true", help="also run the ONNX Runtime 1.19.2 training backend")
    ap.add_argument("--no-legacy", action="store_true", help=argparse.SUPPRESS)  # the default now
    ap.add_argument("--no-torch", action="store_true", help="skip both PyTorch + PEFT sides")
    ap.add_argument("--no-chunks-side", action="store_true", help="skip the edgetune side without chunks")
    ap.add_argument("--plain-side", action="store_true",
                    help="also run edgetune on the plain graphs (EDGETUNE_KERNELS=plain), against the fused default")
    ap.add_argument("--compile", nargs="?", const="layers", choices=["layers", "body"],
                    help="add a side: the tuned PyTorch with torch.compile on each decoder layer (the _tuned "
                         "ratios then take the fastest and the smallest of the tuned sides)")
    ap.add_argument("--compile-body", action="store_true",
                    help="add a side: the tuned PyTorch with torch.compile on its whole model body "
                         "(about 13 minutes to compile on 2 cores)")
    ap.add_argument("--quantize", choices=["int4", "int8"],
                    help="also train on a block-quantized base (QLoRA) and compare it with the float32 base")
    ap.add_argument("--compute", choices=["float32", "int8"], default="float32",
                    help="the quantized base's products: weights dequantized to float32, or int8 activations "
                         "too (MatMulNBits accuracy_level 4, forward and input gradients; with --quantize int8)")
    ap.add_argument("--bf16", action="store_true",
                    help="bfloat16 frozen weights on every side: edgetune's bundle exported with --compute bf16 "
                         "(AMX or AVX512-BF16 products), PyTorch's base loaded in bfloat16 with float32 adapters")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="also run edgetune exported with --gradient-checkpointing against the tuned PyTorch side "
                         "with gradient checkpointing (the same trick on both sides)")
    ap.add_argument("--int8", nargs="?", const="all", choices=["all", "forward", "smooth"],
                    help="also train a copy of the bundle whose frozen-weight products (all but lm_head, "
                         "down_proj and o_proj; or the forward pass's only; or, smooth, all but lm_head "
                         "with SmoothQuant's per-channel smoothing in the forward pass) run in int8 "
                         "(DynamicQuantizeMatMul; bench/int8.py): the reduced-precision lever, measured")
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data")
    ap.add_argument("--no-lockstep", dest="lockstep", action="store_false",
                    help="run the sides one after another instead of step by step in turn")
    ap.add_argument("--worker", choices=["edgetune", "torch", "tuned"], help=argparse.SUPPRESS)
    ap.add_argument("--gated", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.bundle, a.data = Path(a.bundle), Path(a.data)
        res = {"edgetune": worker_edgetune, "torch": worker_torch, "tuned": worker_torch_tuned}[a.worker](a)
        Path(a.result).write_text(json.dumps(res))
        return
    with tempfile.TemporaryDirectory(prefix="edgetune-bench-") as tmpd:
        tmp = Path(tmpd)
        a.bundle = ensure_bundle(a, tmp, compute="bf16" if a.bf16 else "float32")
        a.data = Path(a.data) if a.data else make_data(tmp / "data", n_train=a.batch * (a.steps + 1), n_valid=16)
        sides = (["edgetune"] + (["plain"] if a.plain_side else []) + ([] if a.no_chunks_side else ["nochunk"])
                 + (["quantized"] if a.quantize else [])
                 + (["int8"] if a.int8 else [])
                 + (["legacy"] if a.legacy else []) + ([] if a.no_torch else ["torch", "tuned"])
                 + (["tuned_compile"] if a.compile and not a.no_torch else [])
                 + (["tuned_compile_body"] if a.compile_body and not a.no_torch else [])
                 + (["ckpt"] + ([] if a.no_torch else ["tuned_ckpt"]) if a.gradient_checkpointing else []))
        if a.gradient_checkpointing:
            a.ckpt_bundle = ensure_bundle(a, tmp, ckpt=True)
        if a.quantize:
            a.quantized_bundle = ensure_bundle(a, tmp, a.quantize, compute=a.compute)
        if a.int8:
            import int8

            opts: dict = {"forward": {"backward": False}}.get(a.int8, {})
            if a.int8 == "smooth":  # calibration only when it is used: it loads the model in PyTorch
                opts = {"keep": lambda n: "embed_tokens" in n,
                        "smooth": int8.calibrate(batches(a.bundle, a.data, a.batch, a.seq))}
            a.int8_bundle = int8.int8_bundle(a.bundle, Path(f"{a.bundle}-int8-{a.int8}"), **opts)
        if a.legacy:
            a.legacy_bundle = ensure_legacy_bundle(a)
        print(f"machine: {machine.describe()}")
        from edgetune.device import kernels

        gflops = fma_peak_gflops(a.threads)
        print(f"multiply-add peak (float32 FMA loop of the {kernels.isa()} kernels, {a.threads} threads): "
              f"{gflops:.1f} GFLOP/s")
        # --bf16 runs their frozen products on bfloat16 dot products, at twice the float32 FMA rate
        # where the CPU has AVX512-BF16: their useful work is measured against that peak as well.
        a.bf16_peak = fma_peak_gflops(a.threads, bf16=True) if a.bf16 else 0.0
        if a.bf16_peak:
            print(f"bfloat16 dot-product peak (vdpbf16ps loop, {a.threads} threads): {a.bf16_peak:.1f} GFLOP/s")
        results: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(a.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            together = run_lockstep([s for s in order if s != "legacy"], a, tmp) if a.lockstep else {}
            for side in order:
                res = together.get(side) or run_worker(side, a, tmp)
                results[side].append(res)
                chunks = f" (chunks of <= {res['max_batch_tokens']} tokens)" if res.get("max_batch_tokens") else ""
                v0 = f"{res['valid_loss_0']:.4f} -> " if "valid_loss_0" in res else ""
                print(f"round {r + 1} {res['side'] + chunks:>13}: {res['s_per_step']:.2f} s/step "
                      f"(median; {res['s_min']:.2f}-{res['s_max']:.2f}), "
                      f"{res['tokens'] / res['time']:.0f} tokens/s ({res['labelled'] / res['time']:.0f} labelled), "
                      f"peak RSS {res['peak_rss_mb']:.0f} MB, valid loss {v0}{res['valid_loss']:.4f}", flush=True)
    manifest = json.loads((Path(a.bundle) / "edgetune.json").read_text())
    out = summarize(results, manifest, gflops, a.bf16_peak)
    out["bf16"] = bool(a.bf16)  # bfloat16 frozen weights on every side (--bf16)
    if a.quantize:
        out.update(summarize_quantized(results, json.loads((Path(a.quantized_bundle) / "edgetune.json").read_text())))
    print(json.dumps(out))


def summarize_quantized(results: dict[str, list[dict]], manifest: dict) -> dict:
    """The quantized base against the float32 base, in the same run."""
    q = manifest["quantization"]
    best = {s: max(results[s], key=lambda r: r["tokens"] / r["time"]) for s in ("edgetune", "quantized")}
    rss = {s: min(r["peak_rss_mb"] for r in results[s]) for s in ("edgetune", "quantized")}
    saved_mb = (q["float_bytes"] - q["quantized_bytes"]) / 2**20
    tps = {s: best[s]["tokens"] / best[s]["time"] for s in best}
    out = {"quantized_tokens_per_s_ratio": round(tps["quantized"] / tps["edgetune"], 3),
           "quantized_rss_drop_mb": round(rss["edgetune"] - rss["quantized"]),
           "quantized_weight_bytes_saved_mb": round(saved_mb),
           "quantized_rss_drop_fraction_of_saved": round((rss["edgetune"] - rss["quantized"]) / saved_mb, 3),
           "quantized_loss_gap": round((best["quantized"]["valid_loss"] - best["edgetune"]["valid_loss"])
                                       / best["edgetune"]["valid_loss"], 4)}
    print(f"{q['method']} base: {tps['quantized']:.0f} tokens/s ({out['quantized_tokens_per_s_ratio']:.2f}x float32); "
          f"peak RSS {rss['quantized']:.0f} MB vs {rss['edgetune']:.0f} MB: {out['quantized_rss_drop_mb']} MB less, "
          f"{out['quantized_rss_drop_fraction_of_saved']:.0%} of the {saved_mb:.0f} MB the weights shrank (both "
          f"bases with the same allocator)")
    return out


def summarize(results: dict[str, list[dict]], manifest: dict, gflops: float, bf16_peak: float = 0.0) -> dict:
    """Each side's best round (highest tokens/s) and lowest peak RSS; ratios are edgetune over the other.
    ``bf16_peak``: the bfloat16 dot-product peak read at the start (0 when not measured)."""
    def tps(r: dict) -> float:
        return r["tokens"] / r["time"]

    best = {side: max(rs, key=tps) for side, rs in results.items()}
    rss = {side: min(r["peak_rss_mb"] for r in rs) for side, rs in results.items()}
    tuned = [s for s in ("tuned", "tuned_compile", "tuned_compile_body") if s in best]
    if len(tuned) > 1:
        # The tuned baseline at its best on each axis: the fastest of the plain and compiled sides
        # for speed (and the loss), the smallest for memory.
        for side in tuned:
            best[side + "_plain"], rss[side + "_plain"] = best[side], rss[side]
        best["tuned"] = max((best[s + "_plain"] for s in tuned), key=tps)
        rss["tuned"] = min(rss[s + "_plain"] for s in tuned)
    def paired(mine: str, side: str) -> list[float]:
        """Step by step in lockstep runs: the other side's time over mine for the same batch."""
        return [o / m for rm, ro in zip(results.get(mine, []), results.get(side, []))
                for m, o in zip(rm.get("step_times", []), ro.get("step_times", []))]

    e = best["edgetune"]
    fl = train_flops(manifest, e["lengths"], e["labelled"]) / e["time"] / 1e9
    out = {"flops_fraction": round(fl / gflops, 3), "fused": str(e.get("kernels", "")).startswith("fused"),
           "kernels": e.get("kernels")}
    start = gflops
    if e.get("step_peaks"):
        # The machine's speed drifts (2x between minutes has been seen): in lockstep the peak is
        # read before every step, and the fraction divides by the peak the steps had, weighted
        # by each step's time. The peak read once at the start gives flops_fraction_start_peak.
        t, pk = np.asarray(e["step_times"]), np.asarray(e["step_peaks"])
        gflops = float(np.sum(t * pk) / np.sum(t))
        out.update({"flops_fraction": round(fl / gflops, 3), "flops_fraction_start_peak": round(fl / start, 3),
                    "fma_peak_gflops_steps": [round(float(pk.min()), 1), round(float(pk.max()), 1)]})
    if bf16_peak:
        # The same useful work over the bfloat16 dot-product peak (time-weighted beside the steps
        # in lockstep, as above): the fraction of what bfloat16 products could reach.
        bpk = np.asarray(e.get("step_bf16_peaks") or [])
        if len(bpk) and len(bpk) == len(e.get("step_times", [])):
            bf16_peak = float(np.sum(np.asarray(e["step_times"]) * bpk) / np.sum(e["step_times"]))
        out.update({"flops_fraction_bf16_peak": round(fl / bf16_peak, 3), "bf16_peak_gflops": round(bf16_peak, 1)})
    names = {"tuned": tuned, "tuned_plain": ["tuned"], "tuned_compile_plain": ["tuned_compile"],
             "tuned_compile_body_plain": ["tuned_compile_body"]}
    for mine, side, suffix in (("edgetune", "torch", ""), ("edgetune", "tuned", "_tuned"),
                               ("edgetune", "tuned_plain", "_tuned_eager"),
                               ("edgetune", "tuned_compile_plain", "_tuned_compile"),
                               ("edgetune", "tuned_compile_body_plain", "_tuned_compile_body"),
                               ("edgetune", "nochunk", "_no_chunks"), ("edgetune", "legacy", "_vs_1192"),
                               ("int8", "edgetune", "_int8_vs_float"), ("int8", "tuned", "_int8_vs_tuned"),
                               ("ckpt", "tuned_ckpt", "_ckpt"), ("ckpt", "tuned", "_ckpt_vs_tuned"),
                               ("edgetune", "plain", "_fused_vs_plain")):
        if side in best and mine in best:
            m, o = best[mine], best[side]
            speed = tps(m) / tps(o)
            # In lockstep, the median of the step-by-step ratios (against the faster tuned side
            # when there are two); else each side's best round.
            pairs = [paired(mine, s) for s in names.get(side, [side])]
            if all(pairs):
                speed = min(float(np.median(x)) for x in pairs)
                x = min(pairs, key=np.median)
                print(f"{mine} vs {side}: tokens/s ratio {speed:.3f}, step by step (median of {len(x)} paired "
                      f"steps; range {min(x):.2f}-{max(x):.2f})")
            out.update({f"tokens_per_s_ratio{suffix}": round(speed, 3),
                        f"peak_rss_ratio{suffix}": round(rss[mine] / rss[side], 3),
                        f"loss_gap{suffix}": round((m["valid_loss"] - o["valid_loss"]) / o["valid_loss"], 4)})
    beside = (f" beside its steps, {gflops:.1f} GFLOP/s time-weighted, readings {out['fma_peak_gflops_steps'][0]}-"
              f"{out['fma_peak_gflops_steps'][1]}; {out['flops_fraction_start_peak']:.0%} of the {start:.1f} "
              f"GFLOP/s read at the start") if "fma_peak_gflops_steps" in out else " measured in this run"
    print(f"\nedgetune {tps(e):.0f} tokens/s; useful work {fl:.1f} GFLOP/s ({out['flops_fraction']:.0%} of the "
          f"float32 multiply-add peak{beside})")
    if "flops_fraction_bf16_peak" in out:
        print(f"  {out['flops_fraction_bf16_peak']:.0%} of the bfloat16 dot-product peak "
              f"({out['bf16_peak_gflops']:.1f} GFLOP/s)")
    return out


if __name__ == "__main__":
    main()
