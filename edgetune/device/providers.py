"""Device names to ONNX Runtime execution providers: the hook for accelerators.

Built-in names cover the common providers; a board vendor adds its own through the
``edgetune.devices`` entry-point group (a callable returning a :class:`Device`), and
``--provider-option KEY=VALUE`` passes options through. The provider that actually ran
is always reported, never only the one asked for.

A device runs training, eval and generation: the training graph is standard ONNX, so any
provider takes the nodes it supports; the rest fall back to the CPU provider, and
``--placement`` reports how many nodes each provider actually ran.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edgetune.formats.errors import DeviceError


@dataclass(frozen=True)
class Device:
    name: str
    provider: str
    options: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    library: str | None = None  # a plugin provider's shared library, registered before use


BUILTIN = {
    d.name: d
    for d in (
        Device("cpu", "CPUExecutionProvider", description="the CPU (always available)"),
        Device("vitisai", "VitisAIExecutionProvider",
               description="AMD Vitis AI: Versal, Alveo and Zynq UltraScale+ FPGA boards"),
        Device("cuda", "CUDAExecutionProvider", description="NVIDIA GPUs"),
        Device("dml", "DmlExecutionProvider", description="DirectML on Windows"),
        Device("coreml", "CoreMLExecutionProvider", description="Apple Neural Engine / GPU"),
        Device("nnapi", "NnapiExecutionProvider", description="Android NNAPI"),
        Device("qnn", "QNNExecutionProvider", description="Qualcomm NPUs"),
        Device("openvino", "OpenVINOExecutionProvider", description="Intel CPUs, GPUs and NPUs"),
        Device("xnnpack", "XnnpackExecutionProvider", description="XNNPACK CPU kernels (mobile)"),
    )
}


def _plugins() -> dict[str, Device]:
    from importlib.metadata import entry_points

    out: dict[str, Device] = {}
    for ep in entry_points(group="edgetune.devices"):
        try:
            dev = ep.load()()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not hide the others
            raise DeviceError(f"device plugin {ep.name!r} ({ep.value}) failed to load: {e}") from None
        out[dev.name] = dev
    return out


def known() -> dict[str, Device]:
    return {**BUILTIN, **_plugins()}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve(name: str, options: Mapping[str, str] | None = None) -> Device:
    """Find ``name`` and check its provider is installed; the error lists what is available."""
    devices = known()
    by_provider = {d.provider: d for d in devices.values()}
    dev = devices.get(name) or by_provider.get(name)
    avail = available_providers()
    usable = sorted(n for n, d in devices.items() if d.provider in avail)
    if dev is None:
        raise DeviceError(f"unknown device {name!r}; known devices: {', '.join(sorted(devices))}; "
                          f"usable here: {', '.join(usable)}")
    if dev.library:
        _register_library(dev)
        avail = available_providers()
    if dev.provider not in avail:
        raise DeviceError(f"device {name!r} needs {dev.provider}, which this onnxruntime does not have; "
                          f"available providers: {', '.join(avail)}; usable devices: {', '.join(usable)}")
    if options:
        dev = Device(dev.name, dev.provider, {**dev.options, **options}, dev.description, dev.library)
    return dev


def _register_library(dev: Device) -> None:
    import onnxruntime as ort

    register = getattr(ort, "register_execution_provider_library", None)
    if register is None:
        raise DeviceError(f"device {dev.name!r} is a plugin provider; this onnxruntime ({ort.__version__}) "
                          "cannot load plugin providers (onnxruntime >= 1.22 inference builds can)")
    register(dev.provider, dev.library)


# ONNX Runtime's inference sessions remove Dropout nodes ("EliminateDropout"), even in training mode:
# the training graph's dropout would silently never drop anything.
TRAINING_DISABLED_OPTIMIZERS = ["EliminateDropout"]


def session(model: str | os.PathLike, dev: Device, so: Any = None, training: bool = False) -> Any:
    """An inference session on ``dev`` with the CPU as fallback for unsupported nodes; ``training``
    keeps the graph's dropout (see :data:`TRAINING_DISABLED_OPTIMIZERS`)."""
    import onnxruntime as ort

    providers: list[Any] = [(dev.provider, dict(dev.options))]
    if dev.provider != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
        # Providers rebuild graphs with ORT's default logger, which warns about by-design inputs.
        ort.set_default_logger_severity(3)
    try:
        return ort.InferenceSession(str(model), sess_options=so, providers=providers,
                                    disabled_optimizers=TRAINING_DISABLED_OPTIMIZERS if training else None)
    except Exception as e:  # noqa: BLE001 - ORT raises several unrelated types here
        text = str(e)
        damage = ("Protobuf parsing", "INVALID_PROTOBUF", "NO_SUCHFILE", "external data", "External data",
                  "ModelProto does not have a graph")
        if any(d in text for d in damage):
            from edgetune.formats.errors import BundleError

            raise BundleError(f"{model} (or its weight file) is damaged or not an ONNX model "
                              f"({text.splitlines()[0][:160]}); export it again or copy it again") from None
        raise DeviceError(f"cannot start {dev.provider} for {Path(model).name}: {e}") from None


def placement(model: str | os.PathLike, dev: Device, feed: Mapping[str, Any]) -> dict[str, int]:
    """Run once with profiling on and count the nodes each provider actually executed."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "edgetune_profile")
        sess = session(model, dev, so)
        sess.run(None, dict(feed))
        events = json.loads(Path(sess.end_profiling()).read_text())
    counts: dict[str, int] = {}
    seen = set()
    for ev in events:
        args = ev.get("args") or {}
        prov = args.get("provider")
        if ev.get("cat") == "Node" and prov and ev.get("name") not in seen:
            seen.add(ev.get("name"))
            counts[prov] = counts.get(prov, 0) + 1
    return counts


def parse_options(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise DeviceError(f"provider option {p!r} must look like KEY=VALUE")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out
