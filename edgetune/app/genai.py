"""The onnxruntime-genai side of an app directory: ``genai_config.json`` (model type, decoder
file, head and layer counts, KV-cache input and output names, special token ids, context) and
``tokenizer_config.json`` with the chat template, both from the bundle's manifest."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetune.formats import atomic as _io
from edgetune.formats import bundle as _bundle
from edgetune.formats.appdir import GENAI_CONFIG
from edgetune.formats.errors import BundleError

# transformers model_type -> onnxruntime-genai model.type, for the families edgetune exports.
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "phi3": "phi3", "gemma2": "gemma2"}


def genai_config(b: _bundle.Bundle, filename: str = "base.onnx") -> dict[str, Any]:
    """The ``genai_config.json`` onnxruntime-genai needs to open an app directory: the decoder's
    file and tensor names, its shape, the stop tokens and the model's own search defaults."""
    mc = b.manifest.get("model_config") or {}
    hf = _read_json(b.path("hf_config.json"))
    gen = _read_json(b.path("generation_config.json"))
    tok = b.manifest.get("tokenizer") or {}
    mtype = mc.get("model_type")
    if mtype not in GENAI_TYPES:
        raise BundleError(f"onnxruntime-genai has no model type for {mtype!r}; supported: {', '.join(GENAI_TYPES)}")
    info = b.manifest["infer"]
    context = int(b.context or 2048)
    stops = tok.get("stop_token_ids") or [tok.get("eos_token_id")]
    bos = hf.get("bos_token_id", gen.get("bos_token_id"))
    sampling = bool(gen.get("do_sample", False))
    return {
        "model": {
            "type": GENAI_TYPES[mtype],
            "bos_token_id": bos if bos is not None else stops[0],
            "eos_token_id": stops if len(stops) > 1 else stops[0],
            "pad_token_id": tok.get("pad_token_id", stops[0]),
            "context_length": context,
            "vocab_size": int(mc["vocab_size"]),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": int(info["head_dim"]),
                "hidden_size": int(mc["hidden_size"]),
                "num_attention_heads": int(mc["num_attention_heads"]),
                "num_hidden_layers": int(info["num_layers"]),
                "num_key_value_heads": int(info["kv_heads"]),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            # The model's generation config, where it says something; greedy otherwise.
            "do_sample": sampling,
            "temperature": float(gen.get("temperature") or 1.0) if sampling else 1.0,
            "top_k": int(gen.get("top_k") or 50) if sampling else 1,
            "top_p": float(gen.get("top_p") or 1.0) if sampling else 1.0,
            "repetition_penalty": float(gen.get("repetition_penalty") or 1.0),
            "max_length": context, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
            "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
            # The exported decoder concatenates its cache; it does not write into a shared buffer.
            "past_present_share_buffer": False,
        },
    }


def _write_genai_config(b: _bundle.Bundle, out: Path, filename: str) -> str:
    _io.write_json(out / GENAI_CONFIG, genai_config(b, filename))
    return _io.sha256_file(out / GENAI_CONFIG)


def _write_tokenizer_config(b: _bundle.Bundle, out: Path) -> None:
    """transformers' ``tokenizer_config.json`` with the chat template inside, as
    onnxruntime-genai's tokenizer (onnxruntime-extensions) reads it."""
    cfg = _read_json(b.path("hf_tokenizer_config.json"))
    meta = b.manifest.get("tokenizer") or {}
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for k in ("bos_token", "eos_token", "pad_token"):
        if meta.get(k) is not None:
            cfg.setdefault(k, meta[k])
    if b.path("chat_template.jinja").is_file():
        cfg["chat_template"] = b.path("chat_template.jinja").read_text()
    _io.write_json(out / "tokenizer_config.json", cfg)


def _read_json(path: Path) -> dict[str, Any]:
    """An optional bundle file (older bundles lack some): its object, or {} when absent."""
    return _io.read_json(path, path.name, "export the bundle again") if path.is_file() else {}
