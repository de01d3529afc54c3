"""Federated fine-tuning with Flower: each device trains the adapter on its own data.

edgetune does not ship a federated engine; it plugs into Flower's (``pip install
'edgetune[federated]'``). ``client_app`` and ``server_app`` are a Flower ``ClientApp`` and
``ServerApp``; a Flower App project names them as its components (see
``examples/federated``). Only adapter tensors travel: the base model never leaves a device.

A round: the server sends the current adapter; every sampled device loads it into its
bundle, trains ``local-steps`` optimizer steps on its data with edgetune's trainer (fresh
AdamW state each round), and replies with the new adapter, its example count and its
losses. The strategy (FedAvg by default, weighted by example count) merges the replies.
After the last round the server writes a run directory, as ``edgetune train`` does, that
``eval``, ``generate``, ``merge`` and ``pack`` take and ``train --resume`` continues.

Device settings come from ``flower-supernode --node-config``:
``bundle`` (path), ``data`` (folder or .jsonl), ``work`` (scratch folder, optional).
Run settings come from the app's ``[tool.flwr.app.config]`` (or ``flwr run --run-config``):
``bundle``, ``out``, ``rounds``, ``local-steps``, ``lr``, ``batch-size``, ``min-nodes``,
``strategy`` (``fedavg``, ``fedprox``, ``fedadam``...; any of Flower's).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgetune.formats import atomic as _io
from edgetune.formats import bundle as _bundle
from edgetune.formats import peft_io
from edgetune.formats.errors import ConfigError

ARRAYS = "arrays"


# -- adapter <-> Flower records -------------------------------------------------------------
def to_record(tensors: Mapping[str, np.ndarray]) -> Any:
    """Adapter tensors (graph names) as a Flower ArrayRecord, in bundle order."""
    from flwr.app import Array, ArrayRecord

    rec = ArrayRecord()
    for name, value in tensors.items():
        rec[name] = Array(np.ascontiguousarray(value, np.float32))
    return rec


def from_record(rec: Any, b: _bundle.Bundle) -> dict[str, np.ndarray]:
    """An ArrayRecord back to adapter tensors, checked against the bundle."""
    tensors = {name: arr.numpy() for name, arr in rec.items()}
    missing = [n for n in b.trainable if n not in tensors]
    extra = [n for n in tensors if n not in set(b.trainable)]
    if missing or extra:
        raise ConfigError(f"the adapter sent does not fit bundle {b.root}: "
                          f"{len(missing)} tensor(s) missing (e.g. {missing[:1]}), {len(extra)} unknown (e.g. {extra[:1]}); "
                          "are the server and this device using bundles of the same export?")
    shapes = b.manifest.get("trainable_shapes", {})
    for n in b.trainable:
        t = tensors[n]
        if shapes and list(t.shape) != shapes[n]:
            raise ConfigError(f"tensor {n} has shape {list(t.shape)}, bundle {b.root} expects {shapes[n]}")
        if t.dtype != np.float32:
            raise ConfigError(f"tensor {n} from the server is {t.dtype}, adapters are float32; "
                              "is the server running edgetune's strategy?")
        if not np.isfinite(t).all():
            raise ConfigError(f"tensor {n} from the server holds NaN or inf ({int((~np.isfinite(t)).sum())} values); "
                              "the aggregated adapter is damaged: restart the round from the last good one")
    return {n: tensors[n] for n in b.trainable}


def initial_adapter(b: _bundle.Bundle) -> dict[str, np.ndarray]:
    """The bundle's freshly initialized adapter (what round 1 starts from)."""
    from edgetune.formats.run import read_tensors

    tensors = read_tensors(b.path("adapter_init.safetensors"))
    return {n: tensors[n] for n in b.trainable}


# -- one device's round -----------------------------------------------------------------------
def local_round(bundle: str | Path, data: str | Path, work: str | Path, tensors: Mapping[str, np.ndarray],
                server_round: int, steps: int, lr: float, batch_size: int, seed: int = 0,
                log: Any = lambda s: None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Train ``tensors`` for ``steps`` on this device's ``data``; return the new adapter and metrics.

    The round's run directory (``work/round-N``) keeps its metrics and loss curve; the one
    before it is removed, so a device holds one round's checkpoint at a time.
    """
    from edgetune.device.trainer import Trainer
    from edgetune.formats.config import TrainConfig, resolve

    work = Path(work)
    out = work / f"round-{server_round:04d}"
    if out.exists():
        shutil.rmtree(out)
    cfg = resolve(TrainConfig, None, steps=steps, lr=lr, batch_size=batch_size, seed=seed + server_round,
                  warmup=0, schedule="constant", eval_every=0)
    tr = Trainer(bundle, out, cfg, log=log, progress=False)
    train, valid = tr.load_data(data)
    tr.set_adapter(dict(tensors))
    result = tr.fit(train, valid)
    new = tr.adapter_tensors()
    for old in sorted(work.glob("round-*")):
        if old != out:
            shutil.rmtree(old, ignore_errors=True)
    metrics = {"num-examples": float(len(train)), "train_loss": float(result.final_loss)}
    if result.valid_loss is not None:
        metrics["valid_loss"] = float(result.valid_loss)
    return new, metrics


# -- the Flower apps ------------------------------------------------------------------------------
def _node_setting(context: Any, key: str, default: Any = None) -> Any:
    value = context.node_config.get(key, default)
    if value is None:
        raise ConfigError(f"this SuperNode has no '{key}' setting; start it with "
                          f"flower-supernode ... --node-config \"bundle='/path/to/bundle' data='/path/to/data'\"")
    return value


def _make_client_app() -> Any:
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:  # noqa: ANN001
        bundle = Path(_node_setting(context, "bundle"))
        data = Path(_node_setting(context, "data"))
        work = Path(_node_setting(context, "work", str(Path(tempfile.gettempdir()) / "edgetune-federated")))
        b = _bundle.load(bundle)
        config = msg.content.get("config", {})
        tensors = from_record(msg.content[ARRAYS], b)
        new, metrics = local_round(bundle, data, work, tensors, int(config.get("server-round", 0)),
                                   int(config.get("local-steps", 10)), float(config.get("lr", 1e-3)),
                                   int(config.get("batch-size", 4)))
        return Message(content=RecordDict({ARRAYS: to_record(new), "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def _strategy(name: str, min_nodes: int) -> Any:
    from flwr.serverapp import strategy as fs

    classes = {c.__name__.lower(): c for c in vars(fs).values() if isinstance(c, type) and issubclass(c, fs.Strategy)}
    cls = classes.get(name.lower())
    if cls is None:
        raise ConfigError(f"unknown strategy {name!r}; Flower has: {', '.join(sorted(classes))}")
    try:
        return cls(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=min_nodes, min_train_nodes=min_nodes)
    except TypeError as e:
        raise ConfigError(f"strategy {name!r} cannot be built from edgetune's settings ({e}); "
                          "use one of the FedAvg family (fedavg, fedprox, fedadam, fedyogi, fedadagrad, fedavgm, ...)") from None


def _make_server_app() -> Any:
    from flwr.app import ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:  # noqa: ANN001
        cfg = context.run_config
        for key in ("bundle", "out"):
            if not cfg.get(key):
                raise ConfigError(f"run setting '{key}' is missing; set it in [tool.flwr.app.config] "
                                  f"or with flwr run --run-config \"{key}='...'\"")
        b = _bundle.load(cfg["bundle"])
        out = Path(cfg["out"])
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"{out} already exists and is not empty; choose another 'out'")
        strategy = _strategy(str(cfg.get("strategy", "fedavg")), int(cfg.get("min-nodes", 2)))
        train_config = ConfigRecord({"local-steps": int(cfg.get("local-steps", 10)), "lr": float(cfg.get("lr", 1e-3)),
                                     "batch-size": int(cfg.get("batch-size", 4))})
        result = strategy.start(grid=grid, initial_arrays=to_record(initial_adapter(b)),
                                num_rounds=int(cfg.get("rounds", 3)), train_config=train_config)
        write_run(b, from_record(result.arrays, b), out, {
            "rounds": int(cfg.get("rounds", 3)), "strategy": str(cfg.get("strategy", "fedavg")),
            "train_metrics": {str(k): dict(v) for k, v in result.train_metrics_clientapp.items()},
        })

    return app


def write_run(b: _bundle.Bundle, tensors: Mapping[str, np.ndarray], out: str | Path, summary: dict[str, Any]) -> Path:
    """The federated adapter as a run directory (adapter + resumable checkpoint + run.json)."""
    from edgetune.formats.peft_io import import_peft

    with tempfile.TemporaryDirectory() as tmp:
        peft_io.save(Path(tmp) / "adapter", tensors, b.adapter, base=str(b.manifest.get("source")),
                     metadata={"edgetune_base_id": b.base_id, "federated": "flower"})
        import_peft(Path(tmp) / "adapter", b.root, out)
    run_json = Path(out) / "run.json"
    manifest = json.loads(run_json.read_text())
    manifest.update(status="complete", federated=summary)
    manifest.pop("imported_from", None)
    _io.write_json(run_json, manifest)
    return Path(out)


__all__ = ["client_app", "server_app", "local_round", "write_run", "to_record", "from_record", "initial_adapter"]
_apps: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    # The apps are built on first use, so importing edgetune.device.federated does not need Flower.
    if name in ("client_app", "server_app"):
        if name not in _apps:
            _apps[name] = _make_client_app() if name == "client_app" else _make_server_app()
        return _apps[name]
    raise AttributeError(f"module 'edgetune.device.federated' has no attribute {name!r}")
