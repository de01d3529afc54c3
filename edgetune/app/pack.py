"""``edgetune pack``: adapters for apps, beside one shared base model (verify: :mod:`edgetune.app.verify`).

An app directory holds one shared base model and any number of small adapters::

    APPDIR/
      base.onnx, base.onnx.data   the base inference model; adapter weights are graph inputs
                                  whose defaults have no effect, so it runs with or without one
      NAME.onnx_adapter           ONNX Runtime's adapter format (LoRA scale folded in)
      manifest.json               hashes that tie every adapter to this base and tokenizer
      genai_config.json           the model description onnxruntime-genai reads
      tokenizer.json, tokenizer_config.json (with the chat template), tokenizer_meta.json,
      chat_template.jinja, generation_config.json

ONNX Runtime >= 1.20 loads the adapters with ``LoraAdapter`` and
``RunOptions.add_active_adapter``; onnxruntime-genai opens the directory with
``og.Model(APPDIR)`` and switches adapters with ``og.Adapters`` and
``Generator.set_active_adapter``.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgetune.app.genai import _write_genai_config, _write_tokenizer_config
from edgetune.device import dora
from edgetune.formats import atomic as _io
from edgetune.formats import bundle as _bundle
from edgetune.formats import lock as _lock
from edgetune.formats import peft_io
from edgetune.formats.appdir import (
    FORMAT,
    GENAI_CONFIG,
    MANIFEST,
    ONNX_DTYPE,
    TOKENIZER_FILES,
    read_manifest,
    write_adapter,
)
from edgetune.formats.errors import BundleError, ConfigError
from edgetune.formats.peft_io import check_adapter_matches
from edgetune.formats.version import __version__


def _base_entry(b: _bundle.Bundle, dtype: str) -> dict[str, Any]:
    return {"source": _io.source_name(b.manifest.get("source")), "source_sha256": b.manifest.get("source_sha256"),
            "bundle_base_id": b.base_id, "adapter_dtype": dtype}


def pack(run: str | Path, bundle: str | Path, out: str | Path, dtype: str = "float16", name: str | None = None,
         ort_format: bool = False, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Write (or add to) an app directory: the shared base once, then ``NAME.onnx_adapter``."""
    if dtype not in ONNX_DTYPE:
        raise ConfigError(f"dtype must be float16 or float32, got {dtype!r}")
    t0 = time.time()
    b = _bundle.load(bundle)
    template = b.path("app_base_f16.onnx" if dtype == "float16" else "app_base.onnx")
    if not template.is_file():
        raise BundleError(f"bundle {b.root} has no {template.name}; re-export it with this edgetune")
    cfg, tensors = peft_io.load(run)
    check_adapter_matches(b, cfg, tensors, str(run))
    name = name or Path(run).resolve().name
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"--name {name!r}: use letters, digits, '-', '_' or '.'")
    out = Path(out)
    with _lock.hold(out, "packed into"):
        return _pack_locked(b, template, run, cfg, tensors, name, out, dtype, ort_format, t0)


def _pack_locked(b: _bundle.Bundle, template: Path, run: str | Path, cfg: dict[str, Any], tensors: dict[str, np.ndarray],
                 name: str, out: Path, dtype: str, ort_format: bool, t0: float) -> dict[str, Any]:
    manifest = _existing_manifest(out, b, dtype)
    graph = {peft_io.to_graph_name(k, b.trainable): v.astype(np.float32) for k, v in tensors.items()}
    # DoRA: the row norms of W + s B A, which the graph takes as inputs, travel with the adapter.
    graph.update(dora.feed_for_adapter(b, graph))
    params = []
    for g, arr in sorted(graph.items()):
        if ".lora_B." in g:
            arr = arr * np.float32(b.adapter.scale)  # fold the LoRA scale in
        params.append((g, arr.astype(np.float16 if dtype == "float16" else np.float32)))
    entry = {"rank": b.adapter.rank, "alpha": b.adapter.alpha, "scale_folded": b.adapter.scale,
             "target_modules": sorted(b.adapter.targets), "dtype": dtype, "parameters": len(params),
             "run": Path(run).resolve().name, "edgetune_version": __version__}
    if manifest is None:
        # A new app directory appears whole or not at all.
        with _io.atomic_dir(out) as tmp:
            manifest = _write_base(b, template, tmp, dtype)
            size = _add(b, tmp, manifest, name, params, entry, ort_format)
    else:
        size = _add(b, out, manifest, name, params, entry, ort_format)
    fname = f"{name}.onnx_adapter"
    return {"out": str(out), "adapter": str(out / fname), "bytes": size, "seconds": round(time.time() - t0, 2)}


def _add(b: _bundle.Bundle, out: Path, manifest: dict[str, Any], name: str, params: list[tuple[str, np.ndarray]],
         entry: dict[str, Any], ort_format: bool) -> int:
    """Write the adapter (and base.ort if asked), then the manifest, which names them, last."""
    if ort_format and "base.ort" not in manifest["files"]:
        manifest["files"]["base.ort"] = _write_ort_format(out)
        # Mobile builds run ORT-format models only: point onnxruntime-genai at base.ort.
        manifest["files"][GENAI_CONFIG] = _write_genai_config(b, out, "base.ort")
        manifest.setdefault("sizes", {}).update({f: (out / f).stat().st_size for f in ("base.ort", GENAI_CONFIG)})
    fname = f"{name}.onnx_adapter"
    write_adapter(out / fname, params)
    size = (out / fname).stat().st_size
    manifest["adapters"][name] = {"file": fname, "sha256": _io.sha256_file(out / fname), "bytes": size, **entry}
    _io.write_json(out / MANIFEST, _io.seal(manifest))
    return size


def _existing_manifest(out: Path, b: _bundle.Bundle, dtype: str) -> dict[str, Any] | None:
    if not (out / MANIFEST).is_file():
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"{out} exists, is not empty and has no {MANIFEST}; choose another --out")
        return None
    m = read_manifest(out)
    base = m.get("base", {})
    if base.get("bundle_base_id") != b.base_id or base.get("adapter_dtype") != dtype:
        raise BundleError(f"{out} holds a base for {base.get('source')} (id {str(base.get('bundle_base_id'))[:12]}, "
                          f"{base.get('adapter_dtype')} adapters); this adapter is for {b.manifest.get('source')} "
                          f"(id {b.base_id[:12]}, {dtype}); pack it into another directory")
    return m


def _write_base(b: _bundle.Bundle, template: Path, out: Path, dtype: str) -> dict[str, Any]:
    shutil.copyfile(b.path("infer.onnx.data"), out / ".base.onnx.data.tmp")
    (out / ".base.onnx.data.tmp").replace(out / "base.onnx.data")
    shutil.copyfile(template, out / ".base.onnx.tmp")
    (out / ".base.onnx.tmp").replace(out / "base.onnx")
    for f in TOKENIZER_FILES:
        if b.path(f).is_file():
            shutil.copyfile(b.path(f), out / f)
    _write_tokenizer_config(b, out)
    _write_genai_config(b, out, "base.onnx")
    names = ("base.onnx", "base.onnx.data", *TOKENIZER_FILES, "tokenizer_config.json", GENAI_CONFIG)
    files = {f: _io.sha256_file(out / f) for f in names if (out / f).is_file()}
    sizes = {f: (out / f).stat().st_size for f in files}
    return {"format": FORMAT, "kind": "edgetune-app", "edgetune_version": __version__, "base": _base_entry(b, dtype),
            "base_sha256": files["base.onnx"], "base_data_sha256": files["base.onnx.data"],
            "tokenizer_sha256": files.get("tokenizer.json"), "files": files, "sizes": sizes,
            "base_inputs": b.trainable + [m.norm_input for m in dora.modules(b.trainable)],
            "infer": b.manifest["infer"], "adapters": {}}


def _write_ort_format(out: Path) -> str:
    """``base.ort`` for ONNX Runtime's mobile (ORT-format-only) builds; basic optimizations only,
    so every execution provider can still take its nodes. Returns its sha256."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.add_session_config_entry("session.save_model_format", "ORT")
    tmp = out / ".base.ort.tmp"
    so.optimized_model_filepath = str(tmp)
    ort.InferenceSession(str(out / "base.onnx"), so, providers=["CPUExecutionProvider"])
    tmp.replace(out / "base.ort")
    return _io.sha256_file(out / "base.ort")


