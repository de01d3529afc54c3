"""``edgetune pack`` / ``verify`` / ``import-peft``: adapters for apps, and PEFT interop.

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

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__, _io, bundle as _bundle, dora, peft_io
from .errors import BundleError, ConfigError
from .infer import check_adapter_matches

MANIFEST = "manifest.json"
FORMAT = 1
ONNX_DTYPE = {"float32": 1, "float16": 10}
NP_DTYPE = {1: np.float32, 10: np.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_meta.json", "chat_template.jinja", "generation_config.json")
GENAI_CONFIG = "genai_config.json"
# transformers model_type -> onnxruntime-genai model.type, for the families edgetune exports.
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "phi3": "phi3", "gemma2": "gemma2"}


# -- the .onnx_adapter file, through ONNX Runtime's own AdapterFormat ------------------------
def write_adapter(path: Path, params: list[tuple[str, np.ndarray]], adapter_version: int = 1,
                  model_version: int = 1) -> None:
    """Write ``params`` as an ``.onnx_adapter`` file, atomically (temp file, then rename)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(adapter_version)
    fmt.set_model_version(model_version)
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for n, a in params})
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fmt.export_adapter(str(tmp))
        _io.write_bytes(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)


def read_adapter(path: Path) -> dict[str, Any]:
    """Versions and ``{name: array}`` of an ``.onnx_adapter`` file; damage names the file."""
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception as e:  # noqa: BLE001 - ORT raises RuntimeError or its own types
        raise BundleError(f"{path} is not a valid ONNX Runtime adapter file ({str(e).splitlines()[-1][-120:]}); "
                          "copy it again or re-run edgetune pack") from None
    return {"format_version": fmt.get_format_version(), "adapter_version": fmt.get_adapter_version(),
            "model_version": fmt.get_model_version(),
            "parameters": {k: np.array(v.numpy()) for k, v in fmt.get_parameters().items()}}


# -- pack ---------------------------------------------------------------------------------
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


def _read_json(path: Path) -> dict[str, Any]:
    """An optional bundle file (older bundles lack some): its object, or {} when absent."""
    return _io.read_json(path, path.name, "export the bundle again") if path.is_file() else {}


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


# -- verify ---------------------------------------------------------------------------------
def _session_io(path: Path) -> tuple[dict[str, tuple[str, list[Any]]], list[str]]:
    """The base's inputs (adapter weights included) and output names."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Only the signature is read: no graph optimization (also avoids a crash of
    # onnxruntime 1.23's full-level optimizer on this graph).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - a damaged model is reported, not raised
        raise BundleError(f"{path} cannot be loaded by onnxruntime ({str(e).splitlines()[0][:160]}); "
                          "copy the app directory again or re-run edgetune pack") from None
    # Inputs with a default (every adapter weight) are "overridable initializers" to ORT.
    ins = {i.name: (i.type, list(i.shape)) for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    return ins, [o.name for o in sess.get_outputs()]


def _check_genai(appdir: Path, ins: dict[str, Any], outs: list[str], problems: list[str]) -> None:
    """``genai_config.json`` must describe the base it sits beside, or onnxruntime-genai fails at run time."""
    path = appdir / GENAI_CONFIG
    try:
        cfg = json.loads(path.read_text())
        dec, model = cfg["model"]["decoder"], cfg["model"]
        names = (dec["inputs"]["input_ids"], dec["inputs"]["attention_mask"], dec["inputs"]["position_ids"])
        layers, pk, pv = int(dec["num_hidden_layers"]), dec["inputs"]["past_key_names"], dec["inputs"]["past_value_names"]
        ok, vk, vv = dec["outputs"]["logits"], dec["outputs"]["present_key_names"], dec["outputs"]["present_value_names"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"{GENAI_CONFIG} is not a usable onnxruntime-genai config ({type(e).__name__}: {e}); "
                        "re-run edgetune pack")
        return
    if not (appdir / dec.get("filename", "")).is_file():
        problems.append(f"{GENAI_CONFIG}: decoder file {dec.get('filename')!r} is not in {appdir}")
    want_in = [*names, *(p % i for i in range(layers) for p in (pk, pv))]
    want_out = [ok, *(p % i for i in range(layers) for p in (vk, vv))]
    missing = [n for n in want_in if n not in ins] + [n for n in want_out if n not in outs]
    if missing:
        problems.append(f"{GENAI_CONFIG} names {len(missing)} tensor(s) the base model does not have, e.g. {missing[0]}")
    extra_layers = sum(1 for n in ins if n.startswith("past_key_values.") and n.endswith(".key")) - layers
    if extra_layers:
        problems.append(f"{GENAI_CONFIG}: num_hidden_layers is {layers}, the base model has {layers + extra_layers}")
    past = ins.get(pk % 0)
    if past and isinstance(past[1][1], int) and past[1][1] != dec.get("num_key_value_heads"):
        problems.append(f"{GENAI_CONFIG}: num_key_value_heads is {dec.get('num_key_value_heads')}, the base has {past[1][1]}")
    if past and isinstance(past[1][3], int) and past[1][3] != dec.get("head_size"):
        problems.append(f"{GENAI_CONFIG}: head_size is {dec.get('head_size')}, the base has {past[1][3]}")
    if model.get("eos_token_id") is None:
        problems.append(f"{GENAI_CONFIG}: no eos_token_id; generation would never stop")


def verify(appdir: str | Path, base: str | Path | None = None) -> dict[str, Any]:
    """Check every hash and every adapter tensor against the base; all problems in one error."""
    appdir = Path(appdir)
    m = read_manifest(appdir)
    problems: list[str] = []
    for f, digest in m.get("files", {}).items():
        if not (appdir / f).is_file():
            problems.append(f"{f} is missing")
        elif _io.sha256_file(appdir / f) != digest:
            problems.append(f"{f} does not match its sha256 in the manifest")
    base_path = Path(base) if base else appdir / "base.onnx"
    if base is not None:
        _check_other_base(m, base_path, problems)
    base_ok = base_path.is_file() and not any(
        p.startswith(("base.onnx", f"base model {base_path}", "these adapters were made for")) for p in problems)
    inputs, outputs = {}, []
    if base_ok:
        try:
            inputs, outputs = _session_io(base_path)
        except BundleError as e:
            problems.append(str(e))
    if inputs and GENAI_CONFIG in m.get("files", {}):
        _check_genai(appdir, inputs, outputs, problems)
    elif GENAI_CONFIG not in m.get("files", {}):
        problems.append(f"{GENAI_CONFIG} is not listed: onnxruntime-genai cannot open this directory; "
                        "pack it again with this edgetune")
    checked = 0
    for name, entry in m.get("adapters", {}).items():
        f = appdir / entry["file"]
        if not f.is_file():
            problems.append(f"adapter {name}: {entry['file']} is missing")
            continue
        if _io.sha256_file(f) != entry["sha256"]:
            problems.append(f"adapter {name}: {entry['file']} does not match its sha256")
            continue
        params = read_adapter(f)["parameters"]
        checked += len(params)
        if inputs:
            problems += _match_inputs(name, params, inputs)
    if problems:
        raise BundleError(f"{appdir} failed verification:\n  - " + "\n  - ".join(problems))
    return {"appdir": str(appdir), "base": str(base_path), "adapters": sorted(m.get("adapters", {})),
            "tensors_checked": checked, "ok": True}


def read_manifest(appdir: Path) -> dict[str, Any]:
    if not appdir.is_dir():
        raise BundleError(f"app directory not found: {appdir}")
    if not (appdir / MANIFEST).is_file():
        raise BundleError(f"{appdir} is not an edgetune app directory ({MANIFEST} is missing)")
    m = _io.read_json(appdir / MANIFEST, "the app manifest", "copy the app directory again")
    _io.check_seal(m, appdir / MANIFEST, "copy the app directory again")
    if m.get("kind") != "edgetune-app" or not isinstance(m.get("files"), dict) or not isinstance(m.get("adapters"), dict):
        raise BundleError(f"{appdir / MANIFEST} is not an edgetune app manifest; copy the app directory again")
    return m


def check_app_files(appdir: Path, m: dict[str, Any], adapter: str | Path | None = None) -> None:
    """Before running an app directory: its files (and the named adapter's) by size, and by
    sha256 once per file version."""
    files = dict(m.get("files") or {})
    sizes = dict(m.get("sizes") or {})
    entry = (m.get("adapters") or {}).get(str(adapter)) if adapter is not None else None
    if entry:
        files[entry["file"]] = entry["sha256"]
        if "bytes" in entry:
            sizes[entry["file"]] = entry["bytes"]
    problems = _io.check_files(appdir, files, sizes, None, "copy the app directory again or re-run edgetune pack")
    if problems:
        raise BundleError(f"app directory {appdir} is not usable:\n  - " + "\n  - ".join(problems))


def _check_other_base(m: dict[str, Any], base_path: Path, problems: list[str]) -> None:
    if not base_path.is_file():
        problems.append(f"base model {base_path} not found")
        return
    if _io.sha256_file(base_path) == m["base_sha256"]:
        return
    other = "an unknown model"
    om = base_path.parent / MANIFEST
    if om.is_file():
        try:
            ob = read_manifest(base_path.parent).get("base", {})
        except BundleError:
            ob = {"source": f"a model whose {MANIFEST} is damaged", "bundle_base_id": "?"}
        other = f"{ob.get('source')} (id {str(ob.get('bundle_base_id'))[:12]})"
    mine = m.get("base", {})
    problems.append(f"these adapters were made for {mine.get('source')} (id {str(mine.get('bundle_base_id'))[:12]}, "
                    f"base.onnx sha256 {m['base_sha256'][:12]}), but {base_path} is {other} "
                    f"(sha256 {_io.sha256_file(base_path)[:12]})")


def _match_inputs(adapter: str, params: dict[str, np.ndarray], inputs: dict[str, tuple[str, list[Any]]]) -> list[str]:
    out = []
    want_type = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)"}
    for pname, arr in params.items():
        if pname not in inputs:
            out.append(f"adapter {adapter}: tensor {pname} is not an input of the base model")
            continue
        typ, shape = inputs[pname]
        if typ != want_type.get(arr.dtype):
            out.append(f"adapter {adapter}: tensor {pname} is {arr.dtype}, the base input is {typ}")
        if [d if isinstance(d, int) else None for d in shape] != list(arr.shape):
            out.append(f"adapter {adapter}: tensor {pname} has shape {list(arr.shape)}, the base input {shape}")
    return out
