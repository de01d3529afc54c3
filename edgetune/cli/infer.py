"""``edgetune eval`` and ``edgetune generate``: a bundle with a run's adapter, a merged model or an app directory."""
from __future__ import annotations

import sys
from typing import Any, Callable

import click

from edgetune.cli.main import CONTEXT, handle_errors, log, main, print_json


def _device_opts(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--placement", is_flag=True,
                     help="Also report how many graph nodes each provider actually ran (one profiled pass).")(f)
    f = click.option("--provider-option", multiple=True, help="KEY=VALUE passed to the device's provider.")(f)
    f = click.option("--device", default="cpu", show_default=True, help="Device name (see `edgetune devices`).")(f)
    return click.option("--adapter", "-a", type=click.Path(),
                        help="A run directory or PEFT adapter folder; for an app directory, a packed adapter's name.")(f)


@main.command("eval", context_settings=CONTEXT)
@click.argument("model", type=click.Path())
@_device_opts
@click.option("--data", "-d", required=True, type=click.Path(), help="A .jsonl file, or a folder with test.jsonl.")
@click.option("--batch-size", "-b", default=4, show_default=True)
@click.option("--max-seq-len", default=512, show_default=True)
@click.option("--truncate", type=click.Choice(["auto", "prompt", "end", "error"]), default="auto", show_default=True,
              help="How a longer example is fitted (as in train); use the run's setting to score alike.")
@click.option("--task", type=click.Choice(["classification", "qa", "translation", "ner", "chat", "creative"]),
              help="Also report the task's own metric (default: the data folder's task.json, if any).")
@click.option("--labels", help="classification: the label set, comma-separated [the labels in the data].")
@click.option("--generations", type=click.Path(dir_okay=False), help="Write every reply (and reference) to this JSONL.")
@click.option("--max-new-tokens", default=64, show_default=True, help="Longest generated reply for the task metric.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: loss, perplexity, tokens (and the task metric).")
@handle_errors
def eval_cmd(model: str, adapter: str | None, device: str, provider_option: tuple[str, ...], placement: bool,
             data: str, batch_size: int, max_seq_len: int, truncate: str, task: str | None, labels: str | None,
             generations: str | None, max_new_tokens: int, as_json: bool) -> None:
    """Loss and perplexity over labelled tokens, and the task's own metric, for a bundle (base or
    +adapter), a merged model or an app directory.

    \b
    Examples:
      edgetune eval bundle/ --data data/test.jsonl
      edgetune eval bundle/ --adapter run/ --data data/ --json
      edgetune eval bundle/ --adapter run/ --data tickets/test.jsonl --task classification
      edgetune eval bundle/ --adapter run/ --data qa/ --task qa --generations replies.jsonl
    """
    from edgetune.device import providers as d
    from edgetune.device.infer import Model, evaluate

    m = Model.open(model, adapter, device, d.parse_options(provider_option))
    r = evaluate(model, data, model=m, batch_size=batch_size, max_seq_len=max_seq_len, truncate=truncate, task=task,
                 labels=labels.split(",") if labels else None, generations=generations, max_new_tokens=max_new_tokens,
                 progress=True)
    if placement:
        r["placement"] = m.placement()
    if as_json:
        print_json(r)
        return
    click.echo(f"loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}  over {r['tokens']} tokens "
               f"({r['examples']} examples) on {', '.join(r['providers'])}")
    if "task_metrics" in r:
        tm = r["task_metrics"]
        shown = {k: v for k, v in tm.items() if isinstance(v, (int, float)) and k != "examples"}
        click.echo(f"{tm['task']}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in shown.items()))
        if tm.get("confusion"):
            labs = tm["labels"]
            click.echo("confusion (rows: reference, columns: predicted): " + " | ".join(labs))
            for g, row in sorted(tm["confusion"].items()):
                click.echo(f"  {g:>16}: " + " ".join(f"{row.get(p, 0):>5}" for p in labs))
        if tm.get("unseen_labels", {}).get("labels"):
            u = tm["unseen_labels"]
            click.echo(f"  {u['examples']} example(s) have labels outside the label set: {', '.join(u['labels'])}")
    if placement:
        click.echo("nodes run: " + ", ".join(f"{k} {v}" for k, v in r["placement"].items()))


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path())
@_device_opts
@click.option("--prompt", "-p", required=True, help="The user message.")
@click.option("--system", help="An optional system message.")
@click.option("--max-new-tokens", "-n", default=128, show_default=True)
@click.option("--temperature", "-t", default=0.0, show_default=True, help="0 for greedy decoding.")
@click.option("--top-k", default=0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--raw", is_flag=True, help="Do not apply the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON with the text and the providers used.")
@handle_errors
def generate(model: str, adapter: str | None, device: str, provider_option: tuple[str, ...], placement: bool,
             prompt: str, system: str | None, raw: bool, as_json: bool, **sampling: Any) -> None:
    """Generate a reply with a KV cache on ONNX Runtime, base or base+adapter.

    \b
    Examples:
      edgetune generate bundle/ --prompt "Write a haiku about the sea"
      edgetune generate bundle/ --adapter run/ -p "..." --temperature 0.7 --top-p 0.9
      edgetune generate app/ --adapter support -p "..."     (what an app runs: base.onnx + support.onnx_adapter)
    """
    from edgetune.device import providers as d
    from edgetune.device.infer import Model, generate_full

    m = Model.open(model, adapter, device, d.parse_options(provider_option))
    stream = None if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    r = generate_full(model, prompt, model=m, chat=not raw, system=system, on_text=stream, **sampling)
    where = m.placement() if placement else None
    if as_json:
        print_json({**r, "providers": m.providers, "device": m.device.name,
                     **({"placement": where} if where else {})})
    else:
        click.echo("")
        log(f"[ran on {', '.join(m.providers)}]" + (f" nodes: {where}" if where else ""))
