"""``edgetune tokenize``: a run's batches ahead of time, for a trainer without a tokenizer."""
from __future__ import annotations

from typing import Any

import click

from edgetune.cli.main import CONTEXT, handle_errors, log, main, print_json


@main.command(context_settings=CONTEXT)
@click.argument("data", type=click.Path())
@click.option("--bundle", required=True, type=click.Path(), help="The bundle the batches are for.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Batch file to write (.safetensors).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="JSON file of training settings.")
@click.option("--steps", type=int, help="Optimizer steps (default: one epoch).")
@click.option("--epochs", type=float, help="Epochs, if --steps is not given.")
@click.option("--batch-size", "-b", type=int, help="Examples per micro-batch [8].")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step [1].")
@click.option("--lr", type=float, help="Peak learning rate, for the schedule in the file [3e-4].")
@click.option("--weight-decay", type=float, help="AdamW's decoupled weight decay [0.01].")
@click.option("--warmup", type=int, help="Linear warmup steps [0].")
@click.option("--schedule", type=click.Choice(["linear", "cosine", "constant"]), help="Decay after warmup [linear].")
@click.option("--max-seq-len", type=int, help="Fit examples into this many tokens [512].")
@click.option("--truncate", type=click.Choice(["auto", "prompt", "end", "error"]), help="As for train [auto].")
@click.option("--seed", type=int, help="Seed for data order [0].")
@click.option("--max-batch-tokens", type=int, help="Chunks of at most this many padded tokens (0: off) [1024].")
@click.option("--mask-prompt/--no-mask-prompt", default=None, help="Loss only on assistant/completion tokens [mask].")
@click.option("--json", "as_json", is_flag=True, help="Print the file's metadata as JSON.")
@handle_errors
def tokenize(data: str, bundle: str, out: str, config_file: str | None, as_json: bool, **opts: Any) -> None:
    """Tokenize DATA for BUNDLE into the batches `edgetune train` would run, step by step, in one
    safetensors file: what an app that trains with ONNX Runtime alone (no tokenizer, no Python)
    feeds the training graph. The same options give the same batches as `edgetune train`.

    \b
    Examples:
      edgetune tokenize examples/data/tickets --bundle bundle/ --out batches.safetensors --steps 20
      edgetune tokenize data/ --bundle bundle/ --out b.safetensors --batch-size 4 --lr 1e-3 --json
    """
    import tempfile

    from edgetune.device import batches
    from edgetune.device.trainer import Trainer
    from edgetune.formats.config import TrainConfig, resolve

    cfg = resolve(TrainConfig, config_file, **opts)
    with tempfile.TemporaryDirectory(prefix="edgetune-tokenize-") as tmp:
        trainer = Trainer(bundle, tmp, cfg, log=log, progress=False)
        meta = batches.write(trainer, data, out, cfg.steps)
    if as_json:
        print_json({**meta, "out": out})
        return
    click.echo(f"{out}: {meta['steps']} steps, {sum(meta['chunks'])} chunks, {meta['tokens']} tokens "
               f"({meta['labelled']} labelled) for bundle {meta['bundle_id'][:12]}")
