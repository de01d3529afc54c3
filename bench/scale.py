"""A 3.8B-parameter model end to end: export, train, evaluate, merge and pack a model shaped like
Phi-3-mini (``transformers.Phi3Config()`` defaults: 32 layers, hidden 3072, 32 heads, vocabulary
32,064) with RANDOM weights. Nothing here measures quality: the weights are noise, and every
directory, log line and report says so. It measures what a model of this size costs.

The model is written by this script (no model hub is reachable): bfloat16 safetensors in shards
of about 2 GB, as Hugging Face ships Phi-3-mini, with a BPE tokenizer trained here on the
project's sample text and Phi-3's chat and end-of-turn tokens.

Each stage runs the ``edgetune`` CLI in its own process; its wall time and peak RSS (from the
kernel's accounting of that process: ``wait4``) are reported. Peak RSS counts the memory-mapped
weights that were read, not only allocations.

    python bench/scale.py [--work DIR] [--quantize int4] [--steps 3] [--seq 256] [--keep]

Stages: make the model (once; cached in DIR), ``export --quantize int4 --block-size 64
--gradient-checkpointing --targets qkv_proj,o_proj --rank 8``, ``train`` (batch 1 x SEQ tokens, STEPS steps), ``eval``, ``merge --quantize int4``,
``pack``, and ``generate`` from the packed app. The last line is JSON.

Disk: about 7.6 GB for the model, 5 GB for the bundle, 15 GB while merge writes the float
weights it re-quantizes. A float32 base (``--quantize none``) needs 31 GB more for the bundle
and 15 GB for the merged model (deleted before ``pack`` unless ``--keep``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  - CPU model and ISA (avx2, avx512f, amx...) from /proc/cpuinfo

ROOT = Path(__file__).resolve().parent.parent
LABEL = "RANDOM WEIGHTS (Phi-3-mini shape, not a trained model)"
SPECIALS = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]
CHAT = ("{% for message in messages %}{{'<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def _corpus() -> list[str]:
    out = []
    for f in sorted((ROOT / "examples").rglob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            out.append(line)
    return out


def make_tokenizer(out: Path, vocab: int) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - len(SPECIALS) - 1, special_tokens=["<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:])
    fast.add_special_tokens({"eos_token": "<|endoftext|>"})
    fast.chat_template = CHAT
    fast.save_pretrained(out)
    return fast


def make_model(out: Path) -> Path:
    """Phi3Config() defaults with random bfloat16 weights, written one tensor at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = Phi3Config()
    tok = make_tokenizer(tmp, cfg.vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = None, ids["<|endoftext|>"], ids["<|endoftext|>"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(tmp)
    GenerationConfig(eos_token_id=[ids["<|endoftext|>"], ids["<|end|>"]], pad_token_id=ids["<|endoftext|>"]
                     ).save_pretrained(tmp)
    (tmp / "README.txt").write_text(f"{LABEL}\nWritten by edgetune's bench/scale.py to measure cost at this size.\n")
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Phi3ForCausalLM(cfg).named_parameters()}
    g = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    size, n_shard, t0 = 0, 0, time.time()

    def flush() -> None:
        nonlocal shard, size, n_shard
        n_shard += 1
        name = f"model-{n_shard:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, cfg.initializer_range, generator=g)
        shard[name] = t
        size += t.numel() * 2
        if size >= 2 << 30:
            flush()
    if shard:
        flush()
    total = sum(int(torch.Size(s).numel()) for s in shapes.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 2}, "weight_map": index}, indent=1))
    print(f"wrote {total / 1e9:.2f}B random parameters in {n_shard} shards ({time.time() - t0:.0f} s)", flush=True)
    tmp.replace(out)
    return out


def make_data(out: Path, tok_dir: Path, seq: int, n: int) -> Path:
    """Chat records of about ``seq`` tokens from the sample tickets (prompt masked)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    words = " ".join(json.loads(x).get("text") or json.dumps(json.loads(x)) for x in
                     (ROOT / "examples/tasks/domain/train.jsonl").read_text().splitlines()).split()
    out.mkdir(parents=True, exist_ok=True)
    recs, pos = [], 0
    for _ in range(n):
        q, a = [], []
        while len(tok(" ".join(q + a))["input_ids"]) < seq - 16:
            (q if len(q) < 40 else a).append(words[pos % len(words)])
            pos += 1
        recs.append({"messages": [{"role": "user", "content": " ".join(q)},
                                  {"role": "assistant", "content": " ".join(a)}]})
    for split in ("train", "valid"):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return out


def run(stage: str, args: list[str], log: Path) -> dict:
    """Run one CLI stage in its own process: wall time and that process's peak RSS."""
    cmd = [sys.executable, "-m", "edgetune", *args]
    print(f"[{stage}] {' '.join(args)}", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.time() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"[{stage}] failed with exit code {code}:\n{tail}")
    rec = {"stage": stage, "seconds": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    print(f"[{stage}] {wall:.1f} s, peak RSS {usage.ru_maxrss / 1024:,.0f} MB", flush=True)
    return rec


def dir_mb(p: Path) -> int:
    return round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("EDGETUNE_SCALE_DIR", "/var/tmp/edgetune-scale")))
    ap.add_argument("--quantize", default="int4", choices=["int4", "int8", "none"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--no-gradient-checkpointing", dest="gc", action="store_false",
                    help="keep every layer's activations (about 3 GB more at 256 tokens)")
    ap.add_argument("--keep", action="store_true", help="keep bundle, run, merged model and app directory")
    a = ap.parse_args()
    print(f"machine: {machine.describe()}", flush=True)
    print(f"model: {LABEL}", flush=True)
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work / "phi3-mini-shaped-random")
    data = make_data(work / "data", model, a.seq, a.steps + 2)
    tag = a.quantize
    bundle, rund, merged, app, logs = (work / f"bundle-{tag}", work / f"run-{tag}", work / f"merged-{tag}",
                                       work / f"app-{tag}", work / "logs")
    for d in (bundle, rund, merged, app):
        shutil.rmtree(d, ignore_errors=True)
    logs.mkdir(exist_ok=True)
    q = [] if tag == "none" else ["--quantize", tag, "--block-size", str(a.block_size)]
    q += ["--gradient-checkpointing"] if a.gc else []
    rows = [run("export", ["export", str(model), "--out", str(bundle), "--rank", "8", "--alpha", "16",
                           "--targets", "qkv_proj,o_proj", "--max-seq-len", "4096", *q], logs / "export.log")]
    rows[-1]["bundle_mb"] = dir_mb(bundle)
    rows.append(run("train", ["train", str(bundle), "--data", str(data), "--out", str(rund), "--steps", str(a.steps),
                              "--batch-size", "1", "--max-seq-len", str(a.seq), "--lr", "1e-4", "--no-progress"],
                    logs / "train.log"))
    recs = [json.loads(x) for x in (rund / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "elapsed" in r]
    times = [b["elapsed"] - a_["elapsed"] for a_, b in zip(recs, recs[1:])]
    rows[-1].update(first_step_s=recs[0]["elapsed"] if recs else None,
                    s_per_step=round(statistics.median(times), 1) if times else None, losses=[r["loss"] for r in recs], tokens_per_s=[r["tokens_per_s"] for r in recs])
    print(f"[train] s/step after the first: {times}; losses {rows[-1]['losses']}", flush=True)
    rows.append(run("eval", ["eval", str(bundle), "--adapter", str(rund), "--data", str(data / "valid.jsonl"),
                             "--json"], logs / "eval.log"))
    merge_q = ["--quantize", tag, "--block-size", str(a.block_size)] if tag != "none" else []
    rows.append(run("merge", ["merge", str(bundle), str(rund), "--out", str(merged), *merge_q], logs / "merge.log"))
    rows[-1]["merged_mb"] = dir_mb(merged)
    if not a.keep:  # a float32 merge is 15 GB: free it before pack writes the app
        shutil.rmtree(merged, ignore_errors=True)
    rows.append(run("pack", ["pack", str(rund), "--bundle", str(bundle), "--out", str(app), "--name", "scale"],
                    logs / "pack.log"))
    rows[-1]["app_mb"] = dir_mb(app)
    rows.append(run("generate", ["generate", str(app), "--adapter", "scale", "--prompt", "Hello", "--max-new-tokens",
                                 "8"], logs / "generate.log"))
    if not a.keep:
        for d in (bundle, rund, merged, app):
            shutil.rmtree(d, ignore_errors=True)
    print(json.dumps({"model": LABEL, "machine": machine.describe(), "quantize": tag, "block_size": a.block_size,
                      "gradient_checkpointing": a.gc, "steps": a.steps, "seq": a.seq, "stages": rows}))


if __name__ == "__main__":
    main()
