"""Converting a large GGUF: edgetune's streamed conversion against transformers' GGUF loader.

``export`` starts from a GGUF by converting it once into a float32 HF folder. transformers'
way (``from_pretrained(..., gguf_file=...)`` then ``save_pretrained``) holds every dequantized
tensor and the float model built from them; edgetune's (``edgetune.workstation.export.write_gguf_as_hf``)
dequantizes one tensor at a time into shards of at most 512 MB. No large GGUF is available
here, so the script writes one: a Llama-shaped model with **random weights** (about 1.1B
parameters by default, float16, the default model's tokenizer), labelled as such in its name.
Each side runs in its own process; the peak RSS is its own VmHWM. The tensors of the
two folders are compared exactly. Last line JSON: ``{"peak_rss_mb", "peak_rss_mb_transformers",
"peak_rss_ratio", "seconds", "seconds_transformers", "float32_gb", "identical"}``.

Usage: python bench/convert_gguf.py [--hidden 2048] [--layers 16] [--intermediate 8192] [--work DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  - CPU model and ISA (avx2, avx512f, amx...) from /proc/cpuinfo

ROOT = Path(__file__).resolve().parent.parent


def write_random_gguf(path: Path, hidden: int, layers: int, inter: int, heads: int, kv_heads: int) -> int:
    """A Llama-shaped float16 GGUF with random weights and the default model's tokenizer."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import read_field

    from edgetune.formats import models

    src = gguf.GGUFReader(str(models.resolve_model(models.DEFAULT_MODEL)[0]))
    vocab = len(read_field(src, "tokenizer.ggml.tokens"))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("random-weights-llama-shaped")
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model(read_field(src, "tokenizer.ggml.model")[0])
    w.add_tokenizer_pre(read_field(src, "tokenizer.ggml.pre")[0])
    w.add_token_list(read_field(src, "tokenizer.ggml.tokens"))
    w.add_token_types(read_field(src, "tokenizer.ggml.token_type"))
    w.add_token_merges(read_field(src, "tokenizer.ggml.merges"))
    w.add_bos_token_id(read_field(src, "tokenizer.ggml.bos_token_id")[0])
    w.add_eos_token_id(read_field(src, "tokenizer.ggml.eos_token_id")[0])
    w.add_pad_token_id(read_field(src, "tokenizer.ggml.padding_token_id")[0])
    w.add_add_bos_token(False)
    w.add_chat_template(read_field(src, "tokenizer.chat_template")[0])
    rng = np.random.default_rng(0)
    kv = kv_heads * (hidden // heads)
    n = 0

    def t(name: str, *shape: int) -> None:
        nonlocal n
        a = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16 if len(shape) > 1 else np.float32)
        w.add_tensor(name, a)
        n += a.size

    t("token_embd.weight", vocab, hidden)
    for i in range(layers):
        t(f"blk.{i}.attn_norm.weight", hidden)
        t(f"blk.{i}.attn_q.weight", hidden, hidden)
        t(f"blk.{i}.attn_k.weight", kv, hidden)
        t(f"blk.{i}.attn_v.weight", kv, hidden)
        t(f"blk.{i}.attn_output.weight", hidden, hidden)
        t(f"blk.{i}.ffn_norm.weight", hidden)
        t(f"blk.{i}.ffn_gate.weight", inter, hidden)
        t(f"blk.{i}.ffn_up.weight", inter, hidden)
        t(f"blk.{i}.ffn_down.weight", hidden, inter)
    t("output_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n


def run_side(side: str, gguf_path: Path, out: Path) -> dict:
    code = {
        "edgetune": "from edgetune.workstation.export import write_gguf_as_hf; write_gguf_as_hf(G, O)",
        # transformers marks a model loaded from a GGUF as quantized and refuses to save it: the
        # markers are cleared first (the float32 weights are plain tensors).
        "transformers": ("import torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
                         "m = AutoModelForCausalLM.from_pretrained(G.parent, gguf_file=G.name, dtype=torch.float32); "
                         "m.config.quantization_config = None; m.hf_quantizer = None; m.quantization_method = None; "
                         "m.is_quantized = False; "
                         "m.save_pretrained(O); AutoTokenizer.from_pretrained(G.parent, gguf_file=G.name).save_pretrained(O)"),
    }[side]
    # The peak is the child's own VmHWM: ru_maxrss would also count the parent's pages between
    # fork and exec.
    prog = (f"from pathlib import Path; G = Path({str(gguf_path)!r}); O = Path({str(out)!r}); O.mkdir(); {code}; "
            "print('VmHWM', [int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')][0])")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", prog], cwd=str(ROOT), stdout=subprocess.PIPE, text=True)
    secs = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{side} side failed ({proc.returncode})")
    hwm = next(int(x.split()[1]) for x in proc.stdout.splitlines() if x.startswith("VmHWM"))
    return {"side": side, "seconds": round(secs, 1), "peak_rss_mb": round(hwm / 1024)}


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "np") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    ib.pop("lm_head.weight", None)  # tied to the embedding: transformers may write it or not
    if ia.keys() != ib.keys():
        print(f"tensor names differ: {sorted(set(ia) ^ set(ib))[:5]}")
        return False
    for k in ia:
        with safe_open(str(ia[k]), "np") as x, safe_open(str(ib[k]), "np") as y:
            if not np.array_equal(x.get_tensor(k), y.get_tensor(k)):
                print(f"{k} differs")
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("EDGETUNE_SCALE_DIR", "/var/tmp/edgetune-scale")))
    ap.add_argument("--keep", action="store_true", help="keep the GGUF and both converted folders")
    a = ap.parse_args()
    print(machine.describe(), flush=True)
    work = a.work / "gguf-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    g = work / f"random-llama-{a.hidden}x{a.layers}.F16.gguf"
    n = write_random_gguf(g, a.hidden, a.layers, a.intermediate, a.heads, a.kv_heads)
    print(f"wrote {g.name}: {n / 1e9:.2f}B parameters of RANDOM weights, {g.stat().st_size / 2**30:.2f} GB "
          f"(float32: {4 * n / 2**30:.2f} GB)", flush=True)
    res = {}
    try:
        for side in ("edgetune", "transformers"):
            res[side] = run_side(side, g, work / side)
            print(f"{side}: {res[side]['seconds']} s, peak RSS {res[side]['peak_rss_mb']} MB", flush=True)
        identical = same_tensors(work / "edgetune", work / "transformers")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    e, t = res["edgetune"], res["transformers"]
    print(json.dumps({"peak_rss_mb": e["peak_rss_mb"], "peak_rss_mb_transformers": t["peak_rss_mb"],
                      "peak_rss_ratio": round(e["peak_rss_mb"] / t["peak_rss_mb"], 3), "seconds": e["seconds"],
                      "seconds_transformers": t["seconds"], "float32_gb": round(4 * n / 2**30, 2),
                      "identical": identical}))


if __name__ == "__main__":
    main()
