"""``edgetune doctor``: check this installation, and any bundle, run, merged model or app
directory, and say what is wrong and how to fix it.

Every check is a :class:`Check` (what was checked, whether it passed, what was found, and what
to do). Nothing is written except the verified-hash cache (see ``_io.check_files``).
"""
from __future__ import annotations

import importlib
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from edgetune.formats import atomic as _io
from edgetune.formats.errors import EdgetuneError
from edgetune.formats.version import __version__


@dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""
    fix: str = ""
    level: str = "error"  # "error" fails the doctor; "warning" and "info" do not

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _try(what: str, fn: Callable[[], str], fix: str = "", level: str = "error") -> Check:
    try:
        return Check(what, True, fn() or "", level="info")
    except EdgetuneError as e:
        return Check(what, False, str(e), fix, level)
    except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check, never a crash
        return Check(what, False, f"{type(e).__name__}: {e}", fix, level)


# -- the installation ---------------------------------------------------------------------
def installation() -> list[Check]:
    out = [Check("edgetune", True, f"{__version__} on Python {platform.python_version()} "
                 f"({platform.system()} {platform.machine()})", level="info")]
    if sys.version_info < (3, 10):
        out.append(Check("python", False, platform.python_version(), "use Python 3.10 or newer"))

    def ort() -> str:
        import onnxruntime as o

        major, minor = (int(x) for x in o.__version__.split(".")[:2])
        if (major, minor) < (1, 20):
            raise EdgetuneError(f"onnxruntime {o.__version__} is older than 1.20")
        if hasattr(o, "TrainingSession") or "training" in (getattr(o, "__file__", "") or ""):
            raise EdgetuneError(f"onnxruntime {o.__version__} is a training build (onnxruntime-training)")
        return f"{o.__version__}; providers: {', '.join(o.get_available_providers())}"

    out.append(_try("onnxruntime", ort, "pip install -U onnxruntime (and uninstall onnxruntime-training*)"))

    def _ext_isas() -> list[str]:
        from edgetune.device import _ext

        return list(_ext.isas())

    def ext() -> str:
        from edgetune.device import kernels

        impl = kernels.implementation()
        if impl != "cpp":
            raise EdgetuneError("the C++ merge extension is not built; merges run on numpy (slower)")
        return f"C++ merge kernels loaded ({kernels.isa()}; builds for this CPU: {', '.join(_ext_isas())})"

    out.append(_try("merge extension", ext, "reinstall with a C++ compiler and CMake present: pip install -e .",
                    level="warning"))
    def fused() -> str:
        from edgetune.device import fused as kernels

        st = kernels.status()
        if st["mode"] == "plain":
            return "off (EDGETUNE_KERNELS=plain): training runs the plain graphs"
        if st["in_use"] != "fused":
            raise EdgetuneError(f"training on the CPU runs the plain graphs (slower): {st['problem']}")
        on = {"amx": "AMX", "avx512bf16": "AVX512-BF16"}.get(st.get("bf16_products") or "")
        bf16 = (f"bfloat16 products on {on}" if on else
                "no AMX or AVX512-BF16: --compute bf16 bundles train on the plain graphs")
        return f"fused training kernels in use on the CPU ({st['isa']}; {bf16}; {st['library']})"

    out.append(_try("fused kernels", fused, "reinstall edgetune where ONNX Runtime's headers can be found or fetched "
                    "(see docs/training.md, 'Fused kernels')", level="warning"))
    for mod, why in (("tokenizers", "tokenization"), ("jinja2", "chat templates"), ("safetensors", "adapters"),
                     ("numpy", "everything")):
        out.append(_try(mod, lambda m=mod: _version(m), f"pip install {mod}  (needed for {why})"))
    missing = [m for m in ("torch", "transformers", "onnx", "peft") if not _importable(m)]
    out.append(Check("export tools", not missing,
                     "torch, transformers, onnx and peft are installed: this machine can export" if not missing
                     else f"not installed: {', '.join(missing)} (a device install trains without them)",
                     "to export here: pip install 'edgetune[export]'", level="info" if not missing else "warning"))

    def home() -> str:
        from edgetune.formats.atomic import home as h

        root = h()
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".doctor-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
        free = shutil.disk_usage(root).free / 2**30
        if free < 2:
            raise EdgetuneError(f"{root}: only {free:.1f} GiB free")
        return f"{root} (writable, {free:.0f} GiB free)"

    out.append(_try("cache directory", home, "set EDGETUNE_HOME to a writable folder with a few GiB free"))

    def cached() -> str:
        from edgetune.formats import models

        done = []
        for name, spec in models.known_models().items():
            if spec.cached:
                models.verify(name)
                done.append(name)
        return f"verified: {', '.join(done)}" if done else "no model fetched yet (edgetune models fetch)"

    out.append(_try("cached models", cached, "edgetune models fetch NAME --force"))
    return out


def _importable(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def _version(mod: str) -> str:
    m = importlib.import_module(mod)
    return str(getattr(m, "__version__", "installed"))


# -- things on disk -------------------------------------------------------------------------
def kind_of(path: Path) -> str | None:
    if (path / "edgetune.json").is_file():
        return "bundle"
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir():
        return "run"
    if (path / "merged.json").is_file():
        return "merged"
    if (path / "manifest.json").is_file():
        return "app"
    if (path / "adapter_config.json").is_file():
        return "adapter"
    return None


def check_path(path: str | Path) -> list[Check]:
    path = Path(path)
    if not path.exists():
        return [Check(str(path), False, "not found", "check the path")]
    kind = kind_of(path) if path.is_dir() else None
    if kind is None:
        return [Check(str(path), False, "not a bundle, run, merged model, app directory or adapter folder",
                      "give the directory that edgetune export, train, merge or pack wrote")]
    return {"bundle": _bundle, "run": _run, "merged": _merged, "app": _app, "adapter": _adapter}[kind](path)


def _sessions(paths: list[Path]) -> str:
    import onnxruntime as ort

    from edgetune.device import providers as devices

    dev = devices.resolve("cpu")
    so = ort.SessionOptions()
    so.log_severity_level = 3  # adapter weights are overridable inputs by design
    for p in paths:
        devices.session(p, dev, so)
    return f"{len(paths)} graph(s) load in onnxruntime"


def _bundle(path: Path) -> list[Check]:
    from edgetune.device.tokenizer import ChatTokenizer
    from edgetune.formats import bundle as b

    fix = "export the bundle again, or copy it again from where it was exported"
    loaded: list[Any] = []  # the bundle, once its files check out

    def files() -> str:
        loaded.append(b.load(path))
        return _bundle_summary(loaded[0])

    out = [_try(f"bundle {path}: files", files, fix)]
    if not out[0].ok:
        return out
    out.append(_try(f"bundle {path}: tokenizer", lambda: (ChatTokenizer.from_dir(path), "loads")[1], fix))
    out.append(_try(f"bundle {path}: graphs", lambda: _sessions([path / "eval.onnx", path / "infer.onnx"]), fix))
    out.append(_try(f"bundle {path}: fused graphs", lambda: _fused_graphs(path), fix, level="warning"))
    if (loaded[0].manifest.get("quantization") or {}).get("compute") == "int8":
        out.append(_try(f"bundle {path}: int8 products", _int8_products,
                        "export again with --compute float32 (the default) to train faster on this CPU",
                        level="warning"))
    return out


def _int8_products() -> str:
    from edgetune.device import cpu

    warning = cpu.int8_products_warning()
    if warning:
        raise EdgetuneError(warning)
    return ("this CPU has int8 dot-product instructions" if cpu.int8_dot()
            else "this CPU's int8 instructions are unknown here")


def _fused_graphs(path: Path) -> str:
    """Whether the bundle's fused graphs load here (they are optional: the plain ones always run)."""
    import onnxruntime as ort

    from edgetune.device import fused as kernels
    from edgetune.formats import bundle as b

    entry = b.load(path, verify_hashes=False).manifest.get("fused") or {}
    if not entry:
        return "none (exported where the kernel library was not built): training runs the plain graphs"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    kernels.register(so)
    for name in (entry["train"], entry["eval"]):
        ort.InferenceSession(str(path / name), so, providers=["CPUExecutionProvider"])
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(entry.get("ops", {}).items()))
    return f"{entry['train']} and {entry['eval']} load with the kernel library ({ops})"


def _bundle_summary(bundle: Any) -> str:
    a = bundle.adapter
    return (f"{len(bundle.manifest['files'])} files intact; {bundle.manifest.get('source')}, {a.method} rank {a.rank} "
            f"on {', '.join(a.targets)}" + (f"; {a.quantize} base, {a.compute} products" if a.quantize else ""))


def _adapter(path: Path) -> list[Check]:
    from edgetune.formats import peft_io

    def load() -> str:
        cfg, tensors = peft_io.load(path)
        return f"{len(tensors)} tensors, rank {cfg.get('r')}, targets {cfg.get('target_modules')}"

    return [_try(f"adapter {path}", load, "copy the adapter folder again")]


def _run(path: Path) -> list[Check]:
    from edgetune.device import trainer
    from edgetune.formats import bundle as b
    from edgetune.formats import peft_io
    from edgetune.formats.peft_io import check_adapter_matches

    out: list[Check] = []
    run: dict[str, Any] = {}
    try:
        run = _io.read_json(path / "run.json", "the run manifest", "")
        _io.check_seal(run, path / "run.json", "")
        out.append(Check(f"run {path}: run.json", True, f"status {run.get('status')}", level="info"))
    except EdgetuneError as e:
        out.append(Check(f"run {path}: run.json", False, str(e), "the adapter and checkpoints may still be intact",
                         level="warning"))
    skipped: list[str] = []
    ck = trainer.latest_checkpoint(path, skipped)
    if skipped:
        out.append(Check(f"run {path}: checkpoints", False, "damaged: " + "; ".join(skipped),
                         "train --resume passes over damaged checkpoints and continues from the newest intact one",
                         level="warning"))
    out.append(Check(f"run {path}: resumable", ck is not None, f"from {ck.name}" if ck else "no intact checkpoint",
                     "" if ck else "train again into a new --out", level="info" if ck else "warning"))
    if (path / "adapter").is_dir():
        out += [Check(c.what.replace("adapter ", "run "), c.ok, c.detail, c.fix) for c in _adapter(path)]
    bundle_dir = (path / run["bundle"]).resolve() if isinstance(run.get("bundle"), str) else None
    if bundle_dir is not None and bundle_dir.is_dir() and (path / "adapter").is_dir():
        def fits() -> str:
            bb = b.load(bundle_dir)
            if bb.base_id != run.get("bundle_id"):
                raise EdgetuneError(f"{bundle_dir} is another bundle (id {bb.base_id[:12]}) than the run's "
                                    f"({str(run.get('bundle_id'))[:12]})")
            cfg, tensors = peft_io.load(path)
            check_adapter_matches(bb, cfg, tensors, str(path))
            return f"fits {bundle_dir}"

        out.append(_try(f"run {path}: bundle", fits, "give the bundle the run was trained from"))
    return out


def _merged(path: Path) -> list[Check]:
    from edgetune.device.infer import Model

    def load() -> str:
        Model.open(path)
        return "files intact; the model loads"

    return [_try(f"merged model {path}", load, "merge again, or copy the merged model again")]


def _app(path: Path) -> list[Check]:
    from edgetune.app.verify import verify

    def check() -> str:
        r = verify(path)
        return f"adapters {', '.join(r['adapters']) or '(none)'}; {r['tensors_checked']} tensors match the base"

    return [_try(f"app directory {path}", check, "copy the app directory again, or pack again")]


def run(paths: list[str | Path], install: bool = True) -> dict[str, Any]:
    checks = (installation() if install else []) + [c for p in paths for c in check_path(p)]
    failed = [c for c in checks if not c.ok and c.level == "error"]
    return {"ok": not failed, "checks": [c.to_json() for c in checks],
            "errors": len(failed), "warnings": sum(1 for c in checks if not c.ok and c.level == "warning")}
