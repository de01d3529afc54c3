"""Adapters in PEFT's on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Graph names carry PEFT's in-memory adapter name (``...lora_A.default.weight``); PEFT's files
drop it (``...lora_A.weight``). These helpers convert both ways.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from edgetune.formats import atomic as _io
from edgetune.formats import bundle as _bundle
from edgetune.formats import peft_io
from edgetune.formats.config import AdapterConfig
from edgetune.formats.errors import BundleError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"
CHECKSUM_KEY = "edgetune_tensors_sha256"
CONFIG_CHECKSUM_KEY = "edgetune_config_sha256"  # of adapter_config.json's content, which PEFT cannot carry


def to_peft_name(graph_name: str) -> str:
    # DoRA's magnitude is saved without ".weight" (PEFT keeps its pre-refactor key format).
    magnitude = f".lora_magnitude_vector.{ADAPTER_NAME}.weight"
    if graph_name.endswith(magnitude):
        return graph_name[: -len(magnitude)] + ".lora_magnitude_vector"
    return graph_name.replace(f".{ADAPTER_NAME}.weight", ".weight").replace(f".{ADAPTER_NAME}", "")


def to_graph_name(peft_name: str, graph_names: list[str]) -> str | None:
    lookup = {to_peft_name(g): g for g in graph_names}
    return lookup.get(peft_name)


def peft_config(cfg: AdapterConfig, base: str) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.targets), "bias": "none",
        "use_dora": cfg.method == "dora", "use_rslora": False, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base,
    }


def save(out: str | Path, tensors: Mapping[str, np.ndarray], cfg: AdapterConfig, base: str,
         metadata: Mapping[str, str] | None = None) -> Path:
    """Write a PEFT adapter folder atomically; ``tensors`` are keyed by graph name."""
    from safetensors.numpy import save as st_save

    out = Path(out)
    named = {to_peft_name(k): np.ascontiguousarray(v) for k, v in tensors.items()}
    # PEFT ignores the extra metadata; edgetune checks it when it reads the file back.
    config = peft_config(cfg, base)
    meta = {"format": "pt", **(metadata or {}), CHECKSUM_KEY: tensors_sha256(named),
            CONFIG_CHECKSUM_KEY: config_sha256(config)}
    with _io.atomic_dir(out) as tmp:
        (tmp / WEIGHTS).write_bytes(st_save(named, metadata=meta))
        _io.write_json(tmp / CONFIG, config)
    return out


def adapter_dir(path: str | Path) -> Path:
    """A run directory's ``adapter/`` folder, or ``path`` itself if it is the PEFT folder."""
    path = Path(path)
    return path / "adapter" if (path / "adapter").is_dir() else path


def load(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a PEFT adapter folder (or a run directory): (config dict, tensors keyed by PEFT name)."""
    from safetensors.numpy import load_file

    path = adapter_dir(path)
    if not path.exists():
        raise BundleError(f"adapter not found: {path} (give a run directory or a PEFT adapter folder)")
    cfgf, wf = path / CONFIG, path / WEIGHTS
    if not cfgf.is_file() or not wf.is_file():
        raise BundleError(f"{path} is not a PEFT adapter folder ({CONFIG} and {WEIGHTS} expected)")
    fix = "copy the adapter again, or re-run the training that made it"
    cfg = _io.read_json(cfgf, "the adapter config", fix)
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in cfg]
    if missing:
        raise BundleError(f"{cfgf}: not a PEFT LoRA adapter config (no {', '.join(missing)}); {fix}")
    from edgetune.formats import safety

    safety.check_safetensors(wf, fix)
    try:
        tensors = load_file(str(wf))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damage
        raise BundleError(f"{wf}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); {fix}") from None
    bad = sorted(k for k, v in tensors.items() if v.dtype.kind != "f")
    if bad:
        raise BundleError(f"{wf}: tensor {bad[0]} is {tensors[bad[0]].dtype}, adapters are floating point; {fix}")
    meta = _metadata(wf)
    want = meta.get(CHECKSUM_KEY)
    if want is not None and want != tensors_sha256(tensors):
        raise BundleError(f"{wf}: the tensor data does not match the checksum written with it (damaged); {fix}")
    want = meta.get(CONFIG_CHECKSUM_KEY)
    if want is not None and want != config_sha256(cfg):
        raise BundleError(f"{cfgf} was changed or damaged after the adapter was written (it does not match the "
                          f"checksum in {wf.name}); {fix}")
    return cfg, tensors


def config_sha256(cfg: Mapping) -> str:
    """The settings that change what the adapter computes; where the base lives may be edited."""
    return _io._canonical_sha({k: v for k, v in cfg.items() if k not in ("base_model_name_or_path", "revision",
                                                                          "inference_mode")})


def tensors_sha256(tensors: Mapping[str, np.ndarray]) -> str:
    """A checksum of tensors independent of file layout: names, dtypes, shapes and bytes, in name order."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        v = np.ascontiguousarray(tensors[k])
        h.update(f"{k}|{v.dtype.str}|{list(v.shape)}|".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def _metadata(path: Path) -> dict:
    import json
    import struct

    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            return json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error):
        return {}


def import_peft(peft_dir: str | Path, bundle: str | Path, out: str | Path) -> Path:
    """Turn a PEFT LoRA adapter into a run directory: eval, merge, pack, or train on with --resume."""
    from edgetune.formats import bundle as _bundle
    from edgetune.formats.errors import ConfigError
    from edgetune.formats.peft_io import check_adapter_matches
    from edgetune.formats.run import TrainerState, write_checkpoint

    b = _bundle.load(bundle)
    cfg, tensors = load(peft_dir)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{peft_dir}: peft_type {cfg.get('peft_type')!r} is not LORA")
    check_adapter_matches(b, cfg, tensors, str(peft_dir))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already exists and is not empty; choose another --out")
    # float32 holds every float16/bfloat16 value exactly, so the checkpoint keeps the adapter's values.
    graph = {to_graph_name(k, b.trainable): np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    with _io.atomic_dir(out) as tmp:
        ck = tmp / "checkpoints" / "step-000000"
        ck.mkdir(parents=True)
        write_checkpoint(ck, graph, None)
        st = TrainerState(bundle_id=b.base_id, adapter=b.manifest["adapter"])
        _io.write_json(ck / "trainer_state.json", st.to_json())
        _io.write_text(tmp / "checkpoints" / "latest", "step-000000\n")
        save(tmp / "adapter", graph, b.adapter, base=str(b.manifest.get("source")),
                     metadata={"edgetune_base_id": b.base_id, "imported_from": Path(peft_dir).name})
        _io.write_json(tmp / "run.json", {"kind": "edgetune-run", "format": 1, "bundle": _io.relative(b.root, out),
                                          "bundle_id": b.base_id, "adapter": b.manifest["adapter"],
                                          "status": "imported", "imported_from": Path(peft_dir).name})
    return out


def check_adapter_matches(b: _bundle.Bundle, cfg: dict, tensors: dict[str, np.ndarray], where: str) -> None:
    """Every difference between an adapter and a bundle, in one error."""
    problems = []
    want = b.adapter
    if int(cfg.get("r", -1)) != want.rank:
        problems.append(f"rank {cfg.get('r')} != bundle rank {want.rank}")
    if float(cfg.get("lora_alpha", -1)) != float(want.alpha):
        problems.append(f"alpha {cfg.get('lora_alpha')} != bundle alpha {want.alpha}")
    if sorted(cfg.get("target_modules") or []) != sorted(want.targets):
        problems.append(f"targets {sorted(cfg.get('target_modules') or [])} != bundle targets {sorted(want.targets)}")
    if bool(cfg.get("use_dora", False)) != (want.method == "dora"):
        problems.append(f"method {'dora' if cfg.get('use_dora') else 'lora'} != bundle method {want.method}")
    shapes = b.manifest.get("trainable_shapes", {})
    names = {peft_io.to_peft_name(g): g for g in b.trainable}
    for k, v in tensors.items():
        g = names.get(k)
        if g is None:
            problems.append(f"tensor {k} has no place in this bundle")
        elif shapes and list(v.shape) != shapes[g]:
            problems.append(f"tensor {k} has shape {list(v.shape)}, the bundle expects {shapes[g]}")
    missing = sorted(set(names) - set(tensors))
    if missing:
        problems.append(f"{len(missing)} bundle tensor(s) missing from the adapter, e.g. {missing[0]}")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise BundleError(f"adapter {where} does not fit bundle {b.root} (base {b.manifest.get('source')}):\n  - "
                          + "\n  - ".join(shown))
