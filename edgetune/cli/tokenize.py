"""``edgetune tokenize``: a run's batches ahead of time, for a trainer without a tokenizer."""
from __future__ import annotations

import dataclasses
from typing import Any

import click

from edgetune.cli.main import CONTEXT, handle_errors, log, main, print_json
from edgetune.cli.train import step_options


@main.command(context_settings=CONTEXT)
@click.argument("data", type=click.Path())
@click.option("--bundle", required=True, type=click.Path(), help="The bundle the batches are for.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Batch file to write (.safetensors).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="JSON file of training settings.")
@step_options
@click.option("--json", "as_json", is_flag=True, help="Print the file's metadata as JSON.")
@handle_errors
def tokenize(data: str, bundle: str, out: str, config_file: str | None, as_json: bool, **opts: Any) -> None:
    """Tokenize DATA for BUNDLE into the batches `edgetune train` would run, step by step, in one
    safetensors file: what an app that trains with ONNX Runtime alone (no tokenizer, no Python)
    feeds the training graph. The same options give the same steps as `edgetune train`; rows are
    padded, for either graph, unless --packing on packs several records into each (for an app that
    runs the fused graph, or a bundle's plain graph on short records).

    \b
    Examples:
      edgetune tokenize examples/data/tickets --bundle bundle/ --out batches.safetensors --steps 20
      edgetune tokenize data/ --bundle bundle/ --out b.safetensors --batch-size 4 --lr 1e-3 --json
      edgetune tokenize data/ --bundle bundle/ --out packed.safetensors --steps 20 --packing on
    """
    import tempfile

    from edgetune.device import batches
    from edgetune.device.trainer import Trainer
    from edgetune.formats.config import TrainConfig, resolve

    cfg = resolve(TrainConfig, config_file, **opts)
    if cfg.packing == "auto":  # an app's session may run either graph: rows as the plain graph takes them
        cfg = dataclasses.replace(cfg, packing="off")
    with tempfile.TemporaryDirectory(prefix="edgetune-tokenize-") as tmp:
        trainer = Trainer(bundle, tmp, cfg, log=log, progress=False)
        meta = batches.write(trainer, data, out, cfg.steps)
    if as_json:
        print_json({**meta, "out": out})
        return
    click.echo(f"{out}: {meta['steps']} steps, {sum(meta['chunks'])} chunks, {meta['tokens']} tokens "
               f"({meta['labelled']} labelled) for bundle {meta['bundle_id'][:12]}")
