"""The app directory's own files: ``manifest.json`` (sealed; the hashes that tie every adapter
to the base and tokenizer) and ``NAME.onnx_adapter`` (ONNX Runtime's adapter format, written
and read through its own ``AdapterFormat``). See :mod:`edgetune.app.pack` for the layout."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgetune.formats import atomic as _io
from edgetune.formats.errors import BundleError

MANIFEST = "manifest.json"

FORMAT = 1

ONNX_DTYPE = {"float32": 1, "float16": 10}

NP_DTYPE = {1: np.float32, 10: np.float16}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_meta.json", "chat_template.jinja", "generation_config.json")

GENAI_CONFIG = "genai_config.json"


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


def read_manifest(appdir: Path) -> dict[str, Any]:
    if not appdir.is_dir():
        raise BundleError(f"app directory not found: {appdir}")
    if not (appdir / MANIFEST).is_file():
        raise BundleError(f"{appdir} is not an edgetune app directory ({MANIFEST} is missing)")
    m = _io.read_json(appdir / MANIFEST, "the app manifest", "copy the app directory again")
    _io.check_seal(m, appdir / MANIFEST, "copy the app directory again")
    if m.get("kind") != "edgetune-app" or not isinstance(m.get("files"), dict) or not isinstance(m.get("adapters"), dict):
        raise BundleError(f"{appdir / MANIFEST} is not an edgetune app manifest; copy the app directory again")
    check_names(appdir, m)
    return m


def check_names(appdir: Path, m: dict[str, Any]) -> None:
    """Every file an app manifest names stays inside the app directory; its graphs use only the
    operator domains edgetune runs (see edgetune.formats.safety)."""
    from edgetune.formats import safety

    for name in m.get("files") or {}:
        safety.inside(appdir, name, "file")
    for name, entry in (m.get("adapters") or {}).items():
        if not isinstance(entry, dict):
            raise BundleError(f"{appdir / MANIFEST}: the entry of adapter {name!r} is malformed; copy the app directory again")
        safety.inside(appdir, entry.get("file"), f"file of adapter {name!r}")
    for name in m.get("files") or {}:
        if name.endswith(".onnx"):
            safety.check_onnx_cached(appdir / name, appdir)


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


def match_inputs(adapter: str, params: dict[str, np.ndarray], inputs: dict[str, tuple[str, list[Any]]]) -> list[str]:
    """Problems of an adapter's tensors against a base model's inputs ({name: (type, shape)}):
    a tensor that is no input, or of another type or shape."""
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
