"""Inference on ONNX Runtime: evaluation loss and generation with a KV cache.

Runs a bundle's ``infer.onnx`` (adapter weights are graph inputs: leave them out for the
base model, feed a run's adapter for base+adapter) or a merged model. No torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgetune.device import data as _data
from edgetune.device import dora
from edgetune.device import providers as devices
from edgetune.device.tokenizer import ChatTokenizer
from edgetune.formats import atomic as _io
from edgetune.formats import bundle as _bundle
from edgetune.formats import peft_io
from edgetune.formats.errors import BundleError, DataError
from edgetune.formats.peft_io import check_adapter_matches


def _adapter_feed(b: _bundle.Bundle, adapter: str | Path | None) -> dict[str, np.ndarray]:
    """Adapter tensors keyed by graph input name, checked against the bundle."""
    if adapter is None:
        return {}
    cfg, tensors = peft_io.load(adapter)
    check_adapter_matches(b, cfg, tensors, str(adapter))
    feed = {peft_io.to_graph_name(k, b.trainable): v.astype(np.float32) for k, v in tensors.items()}
    return {**feed, **dora.feed_for_adapter(b, feed)}


def _app_context(root: Path) -> int | None:
    try:
        return int(json.loads((root / "genai_config.json").read_text())["model"]["context_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _app_adapter_feed(root: Path, m: dict[str, Any], adapter: str | Path | None) -> dict[str, np.ndarray]:
    """The tensors of a packed adapter, fed as the app's runtime feeds them (scale folded in)."""
    from edgetune.formats import appdir

    if adapter is None:
        return {}
    entry = m.get("adapters", {}).get(str(adapter))
    path = root / entry["file"] if entry else Path(adapter)
    if not path.is_file():
        raise BundleError(f"{root} has no adapter named {str(adapter)!r}; packed: {', '.join(sorted(m.get('adapters', {}))) or 'none'}")
    return appdir.read_adapter(path)["parameters"]


@dataclass
class Model:
    """An inference session over a KV-cache graph, plus what is needed to feed it."""

    session: Any
    tok: ChatTokenizer
    num_layers: int
    kv_heads: int
    head_dim: int
    extra: dict[str, np.ndarray]
    device: devices.Device
    onnx_path: Path
    context: int | None = None  # the model's position limit; a longer prompt keeps its end

    @classmethod
    def open(cls, path: str | Path, adapter: str | Path | None = None, device: str = "cpu",
             provider_options: dict[str, str] | None = None, threads: int = 0) -> "Model":
        """Open a bundle (optionally with a run's adapter), a merged-model folder, or an app
        directory from ``edgetune pack`` (``adapter`` is then a packed adapter's name or file)."""
        import onnxruntime as ort

        root = Path(path)
        if not root.exists():
            raise BundleError(f"{root} not found: give a bundle (edgetune export), a merged model (edgetune merge) "
                              "or an app directory (edgetune pack)")
        dev = devices.resolve(device, provider_options)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # adapter weights are overridable inputs by design; skip ORT's warning
        if threads:
            so.intra_op_num_threads = threads
        if (root / _bundle.MANIFEST).is_file():
            b = _bundle.load(root)
            extra = _adapter_feed(b, adapter)
            info = b.manifest["infer"]
            onnx_path = b.path("infer.onnx")
            context = b.context
        elif (root / "merged.json").is_file():
            if adapter is not None:
                raise BundleError(f"{root} is a merged model: its adapter is already folded in; drop --adapter")
            merged = _io.read_json(root / "merged.json", "the merged model's manifest", "merge again or copy it again")
            _io.check_seal(merged, root / "merged.json", "merge again or copy it again")
            if merged.get("kind") != "edgetune-merged" or not isinstance(merged.get("infer"), dict):
                raise BundleError(f"{root / 'merged.json'} is not an edgetune merged-model manifest; merge again")
            from edgetune.formats import safety

            for name in merged.get("files") or {}:
                safety.inside(root, name, "file")
            problems = _io.check_files(root, merged.get("files") or {}, merged.get("sizes"), None,
                                       "merge again or copy the merged model again")
            if problems:
                raise BundleError(f"merged model {root} is not usable:\n  - " + "\n  - ".join(problems))
            safety.check_onnx_cached(root / "model.onnx", root)
            info = merged["infer"]
            context = merged.get("context") or (merged.get("model_config") or {}).get("max_position_embeddings")
            extra, onnx_path = {}, root / "model.onnx"
        elif (root / "manifest.json").is_file():
            from edgetune.formats import appdir

            m = appdir.read_manifest(root)
            appdir.check_app_files(root, m, adapter)
            info, context = m["infer"], _app_context(root)
            extra, onnx_path = _app_adapter_feed(root, m, adapter), root / "base.onnx"
        else:
            raise BundleError(f"{root} is neither an edgetune bundle, a merged model nor an app directory")
        sess = devices.session(onnx_path, dev, so)
        if extra and (root / "manifest.json").is_file() and not (root / _bundle.MANIFEST).is_file():
            from edgetune.formats import appdir

            inputs = {i.name: (i.type, list(i.shape)) for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
            problems = appdir.match_inputs(str(adapter), extra, inputs)
            if problems:
                raise BundleError(f"adapter {adapter} does not fit the base of {root} (run edgetune verify {root}):\n  - "
                                  + "\n  - ".join(problems[:8]))
        return cls(sess, ChatTokenizer.from_dir(root), int(info["num_layers"]), int(info["kv_heads"]),
                   int(info["head_dim"]), extra, dev, onnx_path, int(context) if context else None)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def placement(self) -> dict[str, int]:
        """Nodes each execution provider actually ran, from one profiled forward pass."""
        ids = np.asarray([[1, 2, 3, 4]], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None],
                **self.empty_past(1), **self.extra}
        return devices.placement(self.onnx_path, self.device, feed)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return {f"past_key_values.{i}.{kv}": z for i in range(self.num_layers) for kv in ("key", "value")}

    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray,
                past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past, **self.extra}
        outs = self.session.run(None, feed)
        present = {}
        for i in range(self.num_layers):
            present[f"past_key_values.{i}.key"] = outs[1 + 2 * i]
            present[f"past_key_values.{i}.value"] = outs[2 + 2 * i]
        return outs[0], present

    def reply(self, messages: list[dict[str, str]], max_new_tokens: int) -> dict[str, Any]:
        """A greedy reply to a conversation, with its token ids (see :func:`generate_full`)."""
        return generate_full(None, "", model=self, messages=messages, max_new_tokens=max_new_tokens)

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Logits for every position of right-padded sequences, no cache."""
        pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        return self.forward(ids, mask, pos, self.empty_past(ids.shape[0]))[0]


def _nll(logits: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    sel = targets != _data.IGNORE
    rows = logits[sel].astype(np.float64)
    if rows.size == 0:
        return 0.0, 0
    m = rows.max(axis=1, keepdims=True)
    lse = np.log(np.exp(rows - m).sum(axis=1)) + m[:, 0]
    picked = rows[np.arange(len(rows)), targets[sel]]
    return float((lse - picked).sum()), int(sel.sum())


def evaluate(path: str | Path, data: str | Path, adapter: str | Path | None = None, device: str = "cpu",
             batch_size: int = 4, max_seq_len: int = 512, mask_prompt: bool = True,
             model: Model | None = None, truncate: str = "auto", task: str | None = None,
             labels: list[str] | None = None, generations: str | Path | None = None,
             max_new_tokens: int = 64, progress: bool = False) -> dict[str, Any]:
    """Mean loss and perplexity over the labelled tokens of a JSONL file, and with ``task`` (or a
    ``task.json`` beside the data) that task's own metric under ``task_metrics`` (see edgetune.device.tasks)."""
    model = model or Model.open(path, adapter, device)
    file = _data.resolve_split(data, "test") if Path(data).is_dir() else Path(data)
    if file is None:
        raise DataError(f"{data} has no test.jsonl; pass a .jsonl file")
    if model.context and max_seq_len > model.context:
        max_seq_len = model.context  # the bundle's context (export --max-seq-len) bounds every sequence
    ds = _data.load_dataset(file, model.tok, max_seq_len, mask_prompt, truncate)
    total, count = 0.0, 0
    for s in range(0, len(ds), batch_size):
        b = _data.collate(ds.examples[s:s + batch_size], model.tok.pad_id)
        nll, n = _nll(model.logits(b.input_ids, b.attention_mask), b.labels)
        total, count = total + nll, count + n
    loss = total / max(1, count)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count,
           "examples": len(ds), "providers": model.providers, "device": model.device.name,
           "truncation": {k: v for k, v in ds.stats.items() if k != "skipped_records"}}
    from edgetune.device import tasks

    task = task or tasks.read_task(data)
    if task:
        out["task_metrics"] = tasks.evaluate_task(model, Path(file), task, labels, max_new_tokens,
                                                  Path(generations) if generations else None, progress=progress)
    return out


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def _pick(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    if s.top_k:
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < s.top_p
        mask = np.zeros_like(p, bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


def generate_ids(model: Model, prompt_ids: list[int], s: Sampling) -> Iterator[int]:
    """Yield new token ids: one prefill, then one decode step per token, reusing the cache."""
    rng = np.random.default_rng(s.seed)
    ids = np.asarray([prompt_ids], np.int64)
    n = ids.shape[1]
    logits, past = model.forward(ids, np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None], model.empty_past(1))
    stop = model.tok.stop_ids | {model.tok.eos_id}
    for _ in range(s.max_new_tokens):
        nxt = _pick(logits[0, -1], s, rng)
        if nxt in stop:
            return
        yield nxt
        logits, past = model.forward(np.asarray([[nxt]], np.int64), np.ones((1, n + 1), np.int64),
                                     np.asarray([[n]], np.int64), past)
        n += 1


def fit_prompt(ids: list[int], context: int | None, max_new_tokens: int) -> list[int]:
    """A prompt longer than the context leaves room for the reply and keeps its end."""
    if not context or len(ids) + max_new_tokens <= context:
        return ids
    if max_new_tokens >= context:
        raise DataError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in a context of {context}")
    return ids[len(ids) - (context - max_new_tokens):]


def generate(path: str | Path, prompt: str, adapter: str | Path | None = None, device: str = "cpu",
             chat: bool = True, system: str | None = None, on_text: Callable[[str], None] | None = None,
             model: Model | None = None, **sampling: Any) -> str:
    """Generate a reply to ``prompt`` (through the chat template unless ``chat=False``)."""
    return generate_full(path, prompt, adapter, device, chat, system, on_text, model, **sampling)["text"]


def generate_full(path: str | Path, prompt: str, adapter: str | Path | None = None, device: str = "cpu",
                  chat: bool = True, system: str | None = None, on_text: Callable[[str], None] | None = None,
                  model: Model | None = None, messages: list[dict[str, str]] | None = None,
                  **sampling: Any) -> dict[str, Any]:
    """As :func:`generate`, also returning the prompt's and the reply's token ids. ``messages``
    (a whole conversation to reply to) replaces ``prompt`` and ``system``."""
    model = model or Model.open(path, adapter, device)
    s = Sampling(**sampling)
    if messages is not None:
        text = model.tok.render(messages, add_generation_prompt=True)
    elif chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = model.tok.render(msgs, add_generation_prompt=True)
    else:
        text = prompt
    prompt_ids = fit_prompt(model.tok.encode(text), model.context, s.max_new_tokens)
    out: list[int] = []
    shown = ""
    for t in generate_ids(model, prompt_ids, s):
        out.append(t)
        if on_text is not None:
            full = model.tok.decode(out)
            on_text(full[len(shown):])
            shown = full
    return {"text": model.tok.decode(out), "token_ids": out, "prompt_token_ids": prompt_ids}
