"""``edgetune merge``: fold one or more trained adapters into the base weights.

Output formats:

- ``onnx``: a standalone inference model (``model.onnx`` + ``model.onnx.data``) with no
  adapter nodes; ``edgetune generate`` and ``eval`` open it like a bundle. The base
  weights are copied file to file and merged through a memory map, so RAM stays near the
  size of one weight matrix.
- ``safetensors``: a Hugging Face model folder (``config.json``, ``model.safetensors``,
  tokenizer) that ``transformers`` loads, in float32, float16 or bfloat16.
"""
from __future__ import annotations

import json
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgetune.device import kernels
from edgetune.formats import atomic as _io
from edgetune.formats import bundle as _bundle
from edgetune.formats import peft_io, quantized
from edgetune.formats.errors import BundleError, ConfigError
from edgetune.formats.peft_io import check_adapter_matches
from edgetune.workstation import quantize as quant

FORMATS = ("onnx", "safetensors")
DTYPES = ("float32", "float16", "bfloat16")
ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_meta.json", "chat_template.jinja")


@dataclass(frozen=True)
class Source:
    """One adapter to blend in, with its weight."""

    run: Path
    weight: float
    tensors: dict[str, np.ndarray]


def load_sources(b: _bundle.Bundle, runs: Sequence[str | Path], weights: Sequence[float] | None) -> list[Source]:
    if not runs:
        raise ConfigError("merge needs at least one adapter (a run directory or PEFT folder)")
    weights = list(weights) if weights else [1.0] * len(runs)
    if len(weights) != len(runs):
        raise ConfigError(f"{len(runs)} adapters but {len(weights)} weights; give one --weight per adapter")
    out = []
    for run, w in zip(runs, weights):
        cfg, tensors = peft_io.load(run)
        check_adapter_matches(b, cfg, tensors, str(run))
        out.append(Source(Path(run), float(w), tensors))
    return out


def _merge_into(w: np.ndarray, ads: list[tuple[np.ndarray, np.ndarray, float]], magnitude: np.ndarray | None,
                name: str) -> None:
    if magnitude is None:
        kernels.lora_merge_many(w, ads, safe=True, name=name)
    else:  # DoRA: one adapter (blends are refused up front)
        a, bmat, coef = ads[0]
        kernels.dora_merge(w, a, bmat, coef, magnitude, safe=True, name=name)


def _magnitudes(sources: list[Source]) -> dict[str, np.ndarray]:
    """HF weight name -> DoRA magnitude vector (empty for LoRA)."""
    out = {}
    for src in sources:
        for name, m in src.tensors.items():
            if name.endswith(".lora_magnitude_vector"):
                out[name[len("base_model.model."):-len(".lora_magnitude_vector")] + ".weight"] = m
    return out


def _module_adapters(b: _bundle.Bundle, sources: list[Source]) -> dict[str, list[tuple[np.ndarray, np.ndarray, float]]]:
    """HF weight name -> [(A, B, weight * scale)] over all sources."""
    scale = b.adapter.scale
    out: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {}
    for src in sources:
        for name, a in src.tensors.items():
            if ".lora_A." not in name:
                continue
            bmat = src.tensors[name.replace(".lora_A.", ".lora_B.")]
            module = name.split(".lora_A.")[0]
            hf = module[len("base_model.model."):] + ".weight"
            out.setdefault(hf, []).append((a, bmat, src.weight * scale))
    return out


def _check_targets(b: _bundle.Bundle, targets: dict[str, Any]) -> None:
    missing = sorted(set(targets) - set(b.manifest["weights"]))
    if missing:
        raise BundleError(f"bundle {b.root} has no base weight for {missing[0]} (and {len(missing) - 1} more)")


def _view(mm: np.memmap, e: dict[str, Any]) -> np.ndarray:
    """The float32 weight ``e`` (an index entry) as a writable view of the mapped data file."""
    return mm[e["offset"]:e["offset"] + e["length"]].view(np.float32).reshape(e["shape"])


def merge_onnx(b: _bundle.Bundle, sources: list[Source], out: Path, log: Callable[[str], None],
               quantize: str | None = None, block_size: int = 32) -> dict[str, Any] | None:
    if not b.path("merge_template.onnx").is_file():
        raise BundleError(f"bundle {b.root} has no merge_template.onnx ({b.adapter.method} bundles merge to safetensors only)")
    targets = _module_adapters(b, sources)
    _check_targets(b, targets)
    mags = _magnitudes(sources)
    index = b.manifest["weights"]
    with _io.atomic_dir(out) as tmp:
        if b.manifest.get("quantization"):
            quantized.write_float_data(b, tmp / "model.onnx.data")  # a QLoRA adapter merges into a float base
        else:
            shutil.copyfile(b.path("infer.onnx.data"), tmp / "model.onnx.data")
        mm = np.memmap(tmp / "model.onnx.data", dtype=np.uint8, mode="r+")
        kept = change = 0.0  # for --quantize: how much of the merge's change its rounding keeps
        if not quantize:  # every LoRA weight in one call: views of the mapped file, no copies
            kernels.lora_merge_batch([(hf, _view(mm, index[hf]), ads) for hf, ads in targets.items()
                                      if hf not in mags], safe=True)
        for hf, ads in targets.items():
            if not quantize and hf not in mags:
                continue
            w = _view(mm, index[hf])
            before = np.array(w) if quantize else None  # one weight at a time
            _merge_into(w, ads, mags.get(hf), hf)
            if before is not None:
                k, c = quantized.change_kept(before, w, quantized.BITS[quantize], block_size)
                kept, change = kept + k, change + c
        mm.flush()
        del mm
        shutil.copyfile(b.path("merge_template.onnx"), tmp / "model.onnx")
        qinfo = None
        if quantize:
            qinfo = quant.quantize_model(tmp / "model.onnx", "model.onnx.data", quantize, block_size, log)
            qinfo["adapter_change_kept"] = kept = kept / change if change > 0 else 1.0
            if kept < 0.5:
                log(f"warning: after {quantize} rounding the merged weights keep {kept:.0%} of the change the adapter "
                    f"made (its changes are smaller than the {quantize} steps and round back), so the merged model "
                    f"loses most of the fine-tuning; use --quantize int8, or ship the adapter beside the quantized "
                    f"base (pack)")
        _copy_tokenizer(b, tmp)
        manifest = _merged_manifest(b, sources, "onnx", "float32", tmp)
        if qinfo:
            manifest["quantization"] = qinfo
        _io.write_json(tmp / "merged.json", _io.seal(manifest))
    return qinfo


def _safetensors_header(entries: list[tuple[str, str, list[int], int]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": ST_DTYPE[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def merge_safetensors(b: _bundle.Bundle, sources: list[Source], out: Path, dtype: str,
                      log: Callable[[str], None]) -> None:
    targets = _module_adapters(b, sources)
    _check_targets(b, targets)
    mags = _magnitudes(sources)
    index = b.manifest["weights"]
    itemsize = 4 if dtype == "float32" else 2
    names = sorted(index)
    entries = [(n, dtype, index[n]["shape"], int(np.prod(index[n]["shape"])) * itemsize) for n in names]
    with _io.atomic_dir(out) as tmp:
        base_file = b.path("infer.onnx.data")
        if b.manifest.get("quantization"):
            base_file = tmp / ".float-base.tmp"
            quantized.write_float_data(b, base_file)
        base = np.memmap(base_file, dtype=np.uint8, mode="r")
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(_safetensors_header(entries))
            for n in names:  # one tensor in memory at a time
                e = index[n]
                w = np.array(base[e["offset"]:e["offset"] + e["length"]].view(np.float32).reshape(e["shape"]))
                if n in targets:
                    _merge_into(w, targets[n], mags.get(n), n)
                f.write(kernels.from_f32(w, dtype).tobytes())
        del base
        if base_file.parent == tmp:
            base_file.unlink()
        cfg = json.loads(b.path("hf_config.json").read_text())
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = cfg["dtype"] = dtype
        _io.write_json(tmp / "config.json", cfg)
        _copy_tokenizer(b, tmp)
        if b.path("hf_tokenizer_config.json").is_file():
            shutil.copyfile(b.path("hf_tokenizer_config.json"), tmp / "tokenizer_config.json")
        _io.write_json(tmp / "merged.json", _io.seal(_merged_manifest(b, sources, "safetensors", dtype, tmp)))


def _copy_tokenizer(b: _bundle.Bundle, tmp: Path) -> None:
    for name in TOKENIZER_FILES:
        if b.path(name).is_file():
            shutil.copyfile(b.path(name), tmp / name)


def _merged_manifest(b: _bundle.Bundle, sources: list[Source], fmt: str, dtype: str, root: Path) -> dict[str, Any]:
    files = sorted(f.name for f in root.iterdir() if f.is_file() and f.name != "merged.json")
    return {"kind": "edgetune-merged", "format": fmt, "dtype": dtype, "base_id": b.base_id,
            "context": b.context,
            "source": _io.source_name(b.manifest.get("source")), "infer": b.manifest["infer"], "adapter": b.manifest["adapter"],
            # Names and hashes only: a merged model is shipped, and holds no path of this machine.
            "adapters": [{"run": Path(s.run).resolve().name, "weight": s.weight} for s in sources],
            "files": {f: _io.sha256_file(root / f) for f in files},
            "sizes": {f: (root / f).stat().st_size for f in files},
            "implementation": kernels.implementation()}


def merge(bundle: str | Path, runs: Sequence[str | Path], out: str | Path, fmt: str = "onnx",
          dtype: str = "float32", weights: Sequence[float] | None = None,
          log: Callable[[str], None] = lambda s: None, overwrite: bool = False,
          quantize: str | None = None, block_size: int = 32) -> dict[str, Any]:
    """Merge ``runs`` (weighted) into the base of ``bundle``; write ``out``; return a summary.
    ``quantize`` (int4, int8; ONNX output) re-quantizes the merged weights block-wise."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if fmt == "onnx" and dtype != "float32":
        raise ConfigError("ONNX output is float32; use --format safetensors for float16 or bfloat16")
    if quantize and fmt != "onnx":
        raise ConfigError("--quantize writes ONNX (MatMulNBits); for a quantized Hugging Face model, merge to "
                          "safetensors and quantize it with the tool that will load it")
    if quantize:
        quantized.check(quantize, block_size)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    b = _bundle.load(bundle)
    sources = load_sources(b, runs, weights)
    if b.adapter.method == "dora" and (len(sources) > 1 or sources[0].weight != 1.0):
        raise ConfigError("DoRA adapters merge one at a time with weight 1: a DoRA layer rescales whole rows, "
                          "so a weighted blend of DoRA adapters is not defined; merge LoRA adapters to blend")
    t0 = time.time()
    qinfo = None
    if fmt == "onnx":
        qinfo = merge_onnx(b, sources, out, log, quantize, block_size)
    else:
        merge_safetensors(b, sources, out, dtype, log)
    return {"out": str(out), "format": fmt, "dtype": dtype, "adapters": len(sources),
            "seconds": round(time.time() - t0, 2), "implementation": kernels.implementation(),
            **({"quantize": quantize, "block_size": block_size,
                "adapter_change_kept": round(qinfo["adapter_change_kept"], 3)} if qinfo else {})}
