"""edgetune: fine-tune language-model adapters on the device that uses them.

The pipeline, one function per stage (each stage reads a directory and writes a new one)::

    import edgetune
    edgetune.export("smollm2-135m-instruct", "bundle/", rank=8)          # workstation (torch)
    run = edgetune.train("bundle/", data="data/", out="run/", steps=100)  # device: onnxruntime only
    print(edgetune.evaluate("bundle/", "data/test.jsonl", adapter="run/"))
    print(edgetune.generate("bundle/", "Hello", adapter="run/"))
    edgetune.merge("bundle/", ["run/"], "merged/")
    edgetune.pack("run/", "bundle/", "app/", name="tickets")

Everything but ``export`` needs only onnxruntime (any current release), numpy and tokenizers.
Imports are lazy, so ``import edgetune`` stays cheap on a device.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from edgetune.formats.errors import (
    BundleError,
    ConfigError,
    DataError,
    DeviceError,
    EdgetuneError,
    MergeError,
    ModelError,
    TrainingError,
)
from edgetune.formats.version import __version__

if TYPE_CHECKING:
    from edgetune.device.infer import Model
    from edgetune.device.providers import Device
    from edgetune.device.trainer import RunResult, Trainer

PathLike = str | os.PathLike
Log = Callable[[str], None]


def export(model: PathLike | None, out: PathLike, *, config: PathLike | None = None, overwrite: bool = False,
           log: Log = lambda s: None, **adapter: Any) -> Path:
    """Export ``model`` (a known name, a Hugging Face folder, a ``.safetensors`` or ``.gguf`` file)
    into a bundle ``out`` whose training graphs train only the adapter. ``adapter`` holds
    AdapterConfig fields (``method``, ``rank``, ``alpha``, ``dropout``, ``targets``, ``quantize``...);
    they override the JSON file ``config``. Needs the export extras (torch)."""
    from edgetune.formats.config import AdapterConfig, resolve
    from edgetune.workstation.export import export as _export

    return _export(model, out, resolve(AdapterConfig, config, **adapter), log=log, overwrite=overwrite)


def train(bundle: PathLike, data: PathLike, out: PathLike, *, resume: bool = False, log: Log = print,
          progress: bool = True, **options: Any) -> "RunResult":
    """Train the adapters of ``bundle`` on ``data`` (a folder with ``train.jsonl``, or one file)
    into the run directory ``out``; ``options`` are TrainConfig fields (``steps``, ``lr``...)."""
    from edgetune.device.trainer import train as _train

    return _train(bundle, data, out, resume=resume, log=log, progress=progress, **options)


def evaluate(path: PathLike, data: PathLike, adapter: PathLike | None = None, device: str = "cpu",
             **options: Any) -> dict[str, Any]:
    """Loss, perplexity and the task metric of a bundle (with a run's adapter), a merged model or
    an app directory on a JSONL file."""
    from edgetune.device.infer import evaluate as _evaluate

    return _evaluate(path, data, adapter, device, **options)


def generate(path: PathLike, prompt: str, adapter: PathLike | None = None, device: str = "cpu",
             **options: Any) -> str:
    """A reply to ``prompt`` through the chat template, with a KV cache on ONNX Runtime."""
    from edgetune.device.infer import generate as _generate

    return _generate(path, prompt, adapter, device, **options)


def merge(bundle: PathLike, runs: Sequence[PathLike], out: PathLike, **options: Any) -> dict[str, Any]:
    """Fold the adapters of ``runs`` into the base weights of ``bundle``; write ``out``."""
    from edgetune.app.merge import merge as _merge

    return _merge(bundle, runs, out, **options)


def pack(run: PathLike, bundle: PathLike, out: PathLike, **options: Any) -> dict[str, Any]:
    """Package a run's adapter for apps: a shared base model plus ``NAME.onnx_adapter`` files."""
    from edgetune.app.pack import pack as _pack

    return _pack(run, bundle, out, **options)


def verify(appdir: PathLike, base: PathLike | None = None) -> dict[str, Any]:
    """Check every hash of an app directory and that each adapter fits its base."""
    from edgetune.app.verify import verify as _verify

    return _verify(appdir, base)


def __getattr__(name: str) -> Any:
    if name in ("Trainer", "RunResult"):
        from edgetune.device import trainer

        return getattr(trainer, name)
    if name == "Device":  # what a vendor's ``edgetune.devices`` entry point returns
        from edgetune.device.providers import Device

        return Device
    if name == "Model":
        from edgetune.device.infer import Model

        return Model
    raise AttributeError(name)


__all__ = ["BundleError", "ConfigError", "DataError", "Device", "DeviceError", "EdgetuneError", "MergeError", "Model",
           "ModelError", "RunResult", "Trainer", "TrainingError", "__version__", "evaluate", "export", "generate",
           "merge", "pack", "train", "verify"]
