"""The bundle directory: fixed file names and a manifest that every loader checks.

::

    BUNDLE/
      edgetune.json            manifest (versions, hashes, adapter config, graph names)
      train.onnx(+.data)       forward, loss and the adapter gradients, in standard ONNX ops
      eval.onnx                forward and loss; reads the frozen weights from train.onnx.data
      adapter_init.safetensors the adapter weights a run starts from
      infer.onnx(+.data)       KV-cache inference graph; adapter weights are inputs
      tokenizer.json, tokenizer_meta.json, chat_template.jinja, hf_tokenizer_config.json
      hf_config.json, generation_config.json   the model's own configs, as transformers wrote them
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune.formats import atomic as _io
from edgetune.formats import safety
from edgetune.formats.config import AdapterConfig
from edgetune.formats.errors import BundleError
from edgetune.formats.version import __version__

MANIFEST = "edgetune.json"
FORMAT = 2  # 1: graphs for ONNX Runtime's training package (1.19.2); 2: standard ops, any onnxruntime
HASHED = ("train.onnx", "train.onnx.data", "eval.onnx", "adapter_init.safetensors",
          "infer.onnx", "infer.onnx.data", "merge_template.onnx", "app_base.onnx",
          "app_base_f16.onnx", "tokenizer.json", "generation_config.json", "tokenizer_meta.json",
          "chat_template.jinja", "hf_config.json", "hf_tokenizer_config.json", "train_fused.onnx", "eval_fused.onnx",
          "optimizer.onnx", "dora_norms.onnx")
# Files that do not change what the base model computes: a bundle's id (which adapters are checked
# against) is the same with or without them.
NOT_IN_ID = ("adapter_init.safetensors", "train_fused.onnx", "eval_fused.onnx", "optimizer.onnx", "dora_norms.onnx")


def _versions() -> dict[str, str]:
    out = {"edgetune": __version__, "python": platform.python_version()}
    for mod in ("onnxruntime", "torch", "transformers", "peft", "onnx"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version is informative only
            pass
    return out


def make_manifest(root: Path, *, source: str, source_sha256: str | None, adapter: AdapterConfig,
                  trainable: list[str], kv: dict[str, Any], tokenizer: dict[str, Any],
                  hf_config: dict[str, Any], shapes: dict[str, list[int]],
                  weights: dict[str, dict[str, Any]], train_weights: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Describe a freshly exported bundle in ``root``; hashes every file."""
    files = {name: _io.sha256_file(root / name) for name in HASHED if (root / name).exists()}
    sizes = {name: (root / name).stat().st_size for name in files}
    ident = hashlib.sha256(json.dumps([files[k] for k in sorted(files) if k not in NOT_IN_ID]).encode()).hexdigest()
    return {
        "format": FORMAT,
        "kind": "edgetune-bundle",
        "base_id": ident,
        "source": source,
        "source_sha256": source_sha256,
        "versions": _versions(),
        "adapter": adapter.to_dict(),
        "trainable": trainable,
        "trainable_shapes": shapes,
        "train_inputs": ["input_ids", "attention_mask", "labels", "label_norm"],
        "train_outputs": ["loss"],
        "train_graph": {"params": trainable, "grads": [p + "_grad" for p in trainable], "opset": 17},
        "infer": kv,
        "tokenizer": tokenizer,
        "model_config": {k: hf_config.get(k) for k in (
            "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "max_position_embeddings", "tie_word_embeddings")},
        # The context a bundle is meant for: the model's, or less if export was given --max-seq-len.
        "context": min(x for x in (hf_config.get("max_position_embeddings"), adapter.max_seq_len) if x),
        "weights": weights,
        "train_weights": train_weights,
        "files": files,
        "sizes": sizes,
    }


@dataclass(frozen=True)
class Bundle:
    """A checked bundle directory."""

    root: Path
    manifest: dict[str, Any]

    def path(self, name: str) -> Path:
        """A file of the bundle; a name from the manifest that leads out of the folder is refused."""
        return safety.inside(self.root, name, "file")

    @property
    def adapter(self) -> AdapterConfig:
        a = dict(self.manifest["adapter"])
        a["targets"] = tuple(a["targets"])
        return AdapterConfig(**a)

    @property
    def trainable(self) -> list[str]:
        return list(self.manifest["trainable"])

    @property
    def base_id(self) -> str:
        return str(self.manifest["base_id"])

    @property
    def context(self) -> int | None:
        c = self.manifest.get("context") or (self.manifest.get("model_config") or {}).get("max_position_embeddings")
        return int(c) if c else None

    @property
    def num_layers(self) -> int:
        return int(self.manifest["infer"]["num_layers"])


def load(root: str | Path, verify_hashes: bool = True) -> Bundle:
    """Open a bundle, checking before any work that every file is there with its size and (once
    per file version, see ``_io.check_files``) its sha256; all problems in one error."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle not found: {root} (create one with: edgetune export --out {root})")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} is not an edgetune bundle: {MANIFEST} is missing")
    manifest = _io.read_json(mpath, "the bundle manifest", "export the bundle again or copy it again")
    _io.check_seal(manifest, mpath, "export the bundle again or copy it again")
    problems = []
    if manifest.get("kind") != "edgetune-bundle":
        problems.append(f"kind is {manifest.get('kind')!r}, expected 'edgetune-bundle'")
    if manifest.get("format") == 1:
        raise BundleError(f"bundle {root} was exported for ONNX Runtime's training package (1.19.2), which this "
                          f"edgetune no longer uses; export it again: edgetune export {manifest.get('source', 'MODEL')} "
                          f"--out NEW_BUNDLE (its runs' adapters stay usable: edgetune import-peft RUN/adapter)")
    if manifest.get("format") != FORMAT:
        problems.append(f"format {manifest.get('format')!r} is not supported (this edgetune reads format {FORMAT})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        problems.append("the manifest's file list is damaged")
        files = {}
    for key in ("adapter", "trainable", "infer", "base_id"):
        if key not in manifest:
            problems.append(f"the manifest has no {key!r}")
    if not problems:
        for name in files:
            safety.inside(root, name, "file")
        problems += _io.check_files(root, files, manifest.get("sizes"), None if verify_hashes else (),
                                    "export the bundle again or copy it again")
    if problems:
        raise BundleError(f"bundle {root} is not usable ({MANIFEST} says):\n  - " + "\n  - ".join(problems))
    check_structure(root, manifest)
    return Bundle(root, manifest)


def check_structure(root: Path, manifest: dict[str, Any]) -> None:
    """What a checksum cannot vouch for when the bundle's maker wrote the checksums too: every
    graph's operator domains and external data (:func:`edgetune.formats.safety.check_onnx`), the
    weight indexes' files, offsets and lengths, and the vocabulary's size."""
    mpath = root / MANIFEST
    vocab = (manifest.get("model_config") or {}).get("vocab_size")
    if vocab is not None and (not isinstance(vocab, int) or not 0 < vocab <= safety.MAX_VOCAB):
        raise BundleError(f"{mpath}: a vocabulary of {vocab} tokens is refused (limit {safety.MAX_VOCAB}); "
                          "export the bundle again")
    for name in manifest.get("files") or {}:
        if name.endswith(".onnx"):
            safety.check_onnx_cached(root / name, root)
    q = manifest.get("quantization") or {}
    for key, index in (("train_weights", manifest.get("train_weights")), ("weights", manifest.get("weights")),
                       ("quantization.infer_weights", q.get("infer_weights"))):
        safety.check_index(root, index or {}, f"{mpath} ({key})")
