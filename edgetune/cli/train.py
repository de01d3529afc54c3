"""``edgetune train``: fine-tune a bundle's adapters on the device."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgetune.cli.main import CONTEXT, handle_errors, log, main, print_json

_STEP_OPTIONS = [
    click.option("--steps", type=int, help="Optimizer steps (default: one epoch)."),
    click.option("--epochs", type=float, help="Epochs, if --steps is not given."),
    click.option("--batch-size", "-b", type=int, help="Examples per micro-batch [8]."),
    click.option("--grad-accum", type=int, help="Micro-batches per optimizer step [1]."),
    click.option("--lr", type=float, help="Peak learning rate [3e-4]."),
    click.option("--weight-decay", type=float, help="AdamW's decoupled weight decay [0.01]."),
    click.option("--warmup", type=int, help="Linear warmup steps [0]."),
    click.option("--schedule", type=click.Choice(["linear", "cosine", "constant"]), help="Decay after warmup [linear]."),
    click.option("--max-seq-len", type=int, help="Fit examples into this many tokens [512]."),
    click.option("--truncate", type=click.Choice(["auto", "prompt", "end", "error"]),
                 help="How a longer example is fitted: prompt keeps the answer and the system message and drops "
                      "the oldest turns, then the end of the prompt; end cuts the end and skips a record left "
                      "without answer tokens; error refuses it. auto: prompt for chats, completions and labels, "
                      "end for plain text [auto]."),
    click.option("--seed", type=int, help="Seed for data order and dropout [0]."),
    click.option("--max-batch-tokens", type=int, help="Run each batch in chunks of at most this many padded tokens: "
                 "same step, less memory (0: off) [1024]."),
    click.option("--mask-prompt/--no-mask-prompt", default=None, help="Loss only on assistant/completion tokens [mask]."),
    click.option("--packing", type=click.Choice(["auto", "on", "off"]),
                 help="Pack several records into each row (each sees only itself, positions restart), so no "
                      "padding is computed; the loss is the unpacked batch's. auto: where the fused attention "
                      "runs (train) [auto; off for tokenize]."),
]


def step_options(f: Any) -> Any:
    """The settings that decide a run's steps (data, batches, schedule): shared by train and tokenize."""
    for option in reversed(_STEP_OPTIONS):
        f = option(f)
    return f


@main.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path())
@click.option("--data", "-d", required=True, type=click.Path(), help="Folder with train.jsonl (valid.jsonl) or one .jsonl.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--device", help="Device to train on (see `edgetune devices`) [cpu]. Nodes its execution provider "
              "cannot run fall back to the CPU.")
@click.option("--provider-option", "provider_options", multiple=True, help="KEY=VALUE passed to the device's provider.")
@click.option("--placement", is_flag=True, help="Report how many training-graph nodes each provider ran.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="JSON file of training settings.")
@step_options
@click.option("--eval-every", type=int, help="Validation loss every N steps (0: only at the end) [0].")
@click.option("--task", type=click.Choice(["classification", "qa", "translation", "ner", "chat", "creative"]),
              help="Also report this task's metric on the validation set (default: the data's task.json).")
@click.option("--save-every", type=int, help="Checkpoint every N steps (0: only at the end) [0].")
@click.option("--keep-checkpoints", type=int, help="Newest checkpoints kept in RUN/checkpoints (at least 1) [2].")
@click.option("--threads", type=int, help="CPU threads for ONNX Runtime (0: all cores) [0].")
@click.option("--resume", is_flag=True, help="Continue from the run's last good checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar (metrics still go to metrics.jsonl).")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@handle_errors
def train(bundle: str, data: str, out: str, config_file: str | None, resume: bool, no_progress: bool,
          as_json: bool, placement: bool, **opts: Any) -> None:
    """Fine-tune the adapters of BUNDLE on DATA; write checkpoints and a PEFT adapter to OUT.

    Needs only onnxruntime (any current release, any platform), numpy and tokenizers. The
    training graph is standard ONNX: --device picks the execution provider, and nodes it
    cannot run fall back to the CPU.

    \b
    Examples:
      edgetune train bundle/ --data examples/data/tickets --out run/ --device cpu --steps 100
      edgetune train bundle/ --data data/ --out run/ --epochs 2 --eval-every 20 --save-every 50
      edgetune train bundle/ --data data/ --out run/ --steps 200 --resume
      edgetune train bundle/ --data data/ --out run/ --steps 100 --packing off   # padded rows
    """
    from edgetune.device.trainer import Trainer
    from edgetune.formats.config import TrainConfig, resolve

    cfg = resolve(TrainConfig, config_file, **opts)
    trainer = Trainer(bundle, out, cfg, resume=resume, log=log, progress=not no_progress)
    tr, va = trainer.load_data(data)
    result = trainer.fit(tr, va)
    if placement:
        result.summary["placement"] = trainer.placement(tr)
        if not as_json:
            click.echo("placement (training graph nodes per provider): "
                       + ", ".join(f"{k}={v}" for k, v in result.summary["placement"].items()))
    if as_json:
        print_json({**result.summary, "adapter": str(result.adapter)})
        return
    s = result.summary
    click.echo(f"\ndone: {s['steps']} steps in {s['elapsed_s']}s, {s['tokens_per_s']} tokens/s, peak RSS {s['peak_rss_mb']} MB")
    click.echo(f"final train loss {s['final_loss']:.4f}" + (f", validation loss {s['valid_loss']:.4f}" if s["valid_loss"] is not None else ""))
    click.echo(f"adapter: {result.adapter}   (PEFT format)")
    if (Path(out) / "loss.png").is_file():
        click.echo(f"loss curve: {Path(out) / 'loss.png'}")
