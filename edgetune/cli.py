"""The ``edgetune`` command line. Every failure is a short message on stderr and exit code 1;
``--debug`` (or ``EDGETUNE_DEBUG=1``) adds the traceback for a bug report."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import EdgetuneError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _debug() -> bool:
    return os.environ.get("EDGETUNE_DEBUG", "") not in ("", "0")


def _os_message(e: OSError) -> str:
    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    hint = {28: "free some space and run the command again", 13: "check the file's permissions",
            30: "the file system is read-only; choose another --out"}.get(e.errno or 0, "")
    return f"{e.strerror or e}:{where}" + (f"; {hint}" if hint else "")


class _Group(click.Group):
    """Runs a command; turns whatever escapes it into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except EdgetuneError as e:
            self._fail(e, str(e))
        except KeyboardInterrupt:
            self._fail(None, "interrupted; files being written were left as they were before", code=130)
        except MemoryError as e:
            self._fail(e, "out of memory; use a smaller --batch-size or --max-batch-tokens")
        except OSError as e:
            self._fail(e, _os_message(e))
        except Exception as e:  # noqa: BLE001 - the last line of defence: a bug, said as such
            where = ""
            tb = e.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is not None:
                where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
            self._fail(e, f"unexpected {type(e).__name__}{where}: {str(e)[:300]}\n"
                          "This is a bug in edgetune. Please report it with the output of `edgetune doctor` "
                          "and of the same command run with --debug.")

    @staticmethod
    def _fail(e: BaseException | None, msg: str, code: int = 1) -> None:
        if e is not None and _debug():
            import traceback

            traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
        click.echo(f"Error: {msg}", err=True)
        sys.exit(code)


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn EdgetuneError into click's one-line error (the group handles everything else)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgetuneError as e:
            if _debug():
                raise
            raise click.ClickException(str(e)) from None
    return wrapper


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        os.environ["EDGETUNE_DEBUG"] = "1"


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="edgetune")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Show the full traceback of an error (also: EDGETUNE_DEBUG=1), for bug reports.")
def main() -> None:
    """Fine-tune language-model adapters on the device that uses them.

    \b
    Workstation:  edgetune export smollm2-135m-instruct --out bundle/
    Device:       edgetune train bundle/ --data data/ --out run/ --device cpu --steps 100
                  edgetune eval bundle/ --adapter run/ --data data/test.jsonl
                  edgetune generate bundle/ --adapter run/ --prompt "Hello"
    """


# -- models ---------------------------------------------------------------------
@main.group(context_settings=CONTEXT)
def models() -> None:
    """Known base models and the local model cache ($EDGETUNE_HOME)."""


@models.command("list", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_errors
def models_list(as_json: bool) -> None:
    """List known models and whether each is in the cache.

    \b
    Example:  edgetune models list --json
    """
    from . import models as m

    rows = [{"name": s.name, "architecture": s.architecture, "cached": s.cached, "path": str(s.path),
             "sha256": s.sha256, "target_modules": list(s.target_modules), "description": s.description}
            for s in m.known_models().values()]
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        mark = "cached" if r["cached"] else "not fetched"
        click.echo(f"{r['name']:28} {r['architecture']:8} {mark:12} {r['description']}")


@models.command("fetch", context_settings=CONTEXT)
@click.argument("name", default="smollm2-135m-instruct")
@click.option("--force", is_flag=True, help="Download again even if cached.")
@_errors
def models_fetch(name: str, force: bool) -> None:
    """Download NAME once into the cache and verify its sha256.

    \b
    Example:  edgetune models fetch smollm2-135m-instruct
    """
    from . import models as m

    click.echo(str(m.fetch(name, force=force)))


# -- devices --------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_errors
def devices(as_json: bool) -> None:
    """List device names, their execution providers and whether they are usable here.

    Training always runs on the CPU (ONNX Runtime's training runtime is CPU-only);
    devices run eval, generate and validation. Vendors add devices through the
    ``edgetune.devices`` entry-point group.

    \b
    Example:  edgetune devices --json
    """
    from . import devices as d

    avail = d.available_providers()
    rows = [{"name": x.name, "provider": x.provider, "available": x.provider in avail, "description": x.description}
            for x in d.known().values()]
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        click.echo(f"{r['name']:10} {r['provider']:28} {'yes' if r['available'] else 'no ':4} {r['description']}")


# -- export ---------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.argument("model", required=False, default="smollm2-135m-instruct")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Bundle directory to create.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="JSON file of adapter settings.")
@click.option("--method", type=click.Choice(["lora", "dora"]), help="Adapter method [lora].")
@click.option("--rank", "-r", type=int, help="Adapter rank [8].")
@click.option("--alpha", type=float, help="LoRA alpha; scale is alpha/rank [16].")
@click.option("--dropout", type=float, help="Dropout on the adapter input [0.0].")
@click.option("--targets", help="Comma-separated module names, or all-linear [q_proj,k_proj,v_proj,o_proj].")
@click.option("--max-seq-len", type=int,
              help="The bundle's context: generate, eval, train and apps stay within it [the model's].")
@click.option("--seed", type=int, help="Seed for the adapter's initial weights [0].")
@click.option("--quantize", type=click.Choice(["int4", "int8"]),
              help="Store the frozen base block-quantized (QLoRA); adapters train in float32 [none].")
@click.option("--block-size", type=int, help="Quantization block along each weight's inputs [32].")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute each layer's activations in the backward pass: live activations of one layer "
                   "instead of all, for about a third more compute per step [off].")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle directory.")
@_errors
def export(model: str, out: str, config_file: str | None, overwrite: bool, **opts: Any) -> None:
    """Export MODEL (a known name, a HF folder or a .gguf file) into a training bundle.

    Runs on a workstation with torch (pip install 'edgetune[export]'). Only the
    adapter weights are trainable in the bundle.

    \b
    Examples:
      edgetune export --out bundle/
      edgetune export ./my-hf-model --out bundle/ --rank 16 --alpha 32 --targets all-linear
      edgetune export --out qbundle/ --quantize int4          (QLoRA: int4 base, float32 adapters)
      edgetune export ./phi-3-mini --out big/ --quantize int4 --block-size 64 --gradient-checkpointing
    """
    from .config import AdapterConfig, resolve
    from .export import export as do_export

    cfg = resolve(AdapterConfig, config_file, **opts)
    do_export(model, out, cfg, log=_log, overwrite=overwrite)
    click.echo(out)


# -- train ----------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path())
@click.option("--data", "-d", required=True, type=click.Path(), help="Folder with train.jsonl (valid.jsonl) or one .jsonl.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--device", help="Device to train on (see `edgetune devices`) [cpu]. Nodes its execution provider "
              "cannot run fall back to the CPU.")
@click.option("--provider-option", "provider_options", multiple=True, help="KEY=VALUE passed to the device's provider.")
@click.option("--placement", is_flag=True, help="Report how many training-graph nodes each provider ran.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="JSON file of training settings.")
@click.option("--steps", type=int, help="Optimizer steps (default: one epoch).")
@click.option("--epochs", type=float, help="Epochs, if --steps is not given.")
@click.option("--batch-size", "-b", type=int, help="Examples per micro-batch [8].")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step [1].")
@click.option("--lr", type=float, help="Peak learning rate [3e-4].")
@click.option("--weight-decay", type=float, help="AdamW's decoupled weight decay [0.01].")
@click.option("--warmup", type=int, help="Linear warmup steps [0].")
@click.option("--schedule", type=click.Choice(["linear", "cosine", "constant"]), help="Decay after warmup [linear].")
@click.option("--max-seq-len", type=int, help="Fit examples into this many tokens [512].")
@click.option("--truncate", type=click.Choice(["auto", "prompt", "end", "error"]),
              help="How a longer example is fitted: prompt keeps the answer and the system message and drops "
                   "the oldest turns, then the end of the prompt; end cuts the end; error refuses it. auto: "
                   "prompt for chats, completions and labels, end for plain text [auto].")
@click.option("--eval-every", type=int, help="Validation loss every N steps (0: only at the end) [0].")
@click.option("--task", type=click.Choice(["classification", "qa", "translation", "ner", "chat", "creative"]),
              help="Also report this task's metric on the validation set (default: the data's task.json).")
@click.option("--save-every", type=int, help="Checkpoint every N steps (0: only at the end) [0].")
@click.option("--seed", type=int, help="Seed for data order and dropout [0].")
@click.option("--threads", type=int, help="CPU threads for ONNX Runtime (0: all cores) [0].")
@click.option("--max-batch-tokens", type=int,
              help="Run each batch in chunks of at most this many padded tokens: same step, less memory (0: off) [1024].")
@click.option("--mask-prompt/--no-mask-prompt", default=None, help="Loss only on assistant/completion tokens [mask].")
@click.option("--resume", is_flag=True, help="Continue from the run's last good checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar (metrics still go to metrics.jsonl).")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@_errors
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
    """
    from .config import TrainConfig, resolve
    from .trainer import Trainer

    cfg = resolve(TrainConfig, config_file, **opts)
    trainer = Trainer(bundle, out, cfg, resume=resume, log=_log, progress=not no_progress)
    tr, va = trainer.load_data(data)
    result = trainer.fit(tr, va)
    if placement:
        result.summary["placement"] = trainer.placement(tr)
        if not as_json:
            click.echo("placement (training graph nodes per provider): "
                       + ", ".join(f"{k}={v}" for k, v in result.summary["placement"].items()))
    if as_json:
        _print_json({**result.summary, "adapter": str(result.adapter)})
        return
    s = result.summary
    click.echo(f"\ndone: {s['steps']} steps in {s['elapsed_s']}s, {s['tokens_per_s']} tokens/s, peak RSS {s['peak_rss_mb']} MB")
    click.echo(f"final train loss {s['final_loss']:.4f}" + (f", validation loss {s['valid_loss']:.4f}" if s["valid_loss"] is not None else ""))
    click.echo(f"adapter: {result.adapter}   (PEFT format)")
    if (Path(out) / "loss.png").is_file():
        click.echo(f"loss curve: {Path(out) / 'loss.png'}")


# -- eval / generate --------------------------------------------------------------
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
@_errors
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
    from . import devices as d
    from .infer import Model, evaluate

    m = Model.open(model, adapter, device, d.parse_options(provider_option))
    r = evaluate(model, data, model=m, batch_size=batch_size, max_seq_len=max_seq_len, truncate=truncate, task=task,
                 labels=labels.split(",") if labels else None, generations=generations, max_new_tokens=max_new_tokens,
                 progress=True)
    if placement:
        r["placement"] = m.placement()
    if as_json:
        _print_json(r)
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
@_errors
def generate(model: str, adapter: str | None, device: str, provider_option: tuple[str, ...], placement: bool,
             prompt: str, system: str | None, raw: bool, as_json: bool, **sampling: Any) -> None:
    """Generate a reply with a KV cache on ONNX Runtime, base or base+adapter.

    \b
    Examples:
      edgetune generate bundle/ --prompt "Write a haiku about the sea"
      edgetune generate bundle/ --adapter run/ -p "..." --temperature 0.7 --top-p 0.9
      edgetune generate app/ --adapter support -p "..."     (what an app runs: base.onnx + support.onnx_adapter)
    """
    from . import devices as d
    from .infer import Model, generate_full

    m = Model.open(model, adapter, device, d.parse_options(provider_option))
    stream = None if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    r = generate_full(model, prompt, model=m, chat=not raw, system=system, on_text=stream, **sampling)
    where = m.placement() if placement else None
    if as_json:
        _print_json({**r, "providers": m.providers, "device": m.device.name,
                     **({"placement": where} if where else {})})
    else:
        click.echo("")
        _log(f"[ran on {', '.join(m.providers)}]" + (f" nodes: {where}" if where else ""))


# -- merge ----------------------------------------------------------------------------
@main.command("merge", context_settings=CONTEXT)
@click.argument("bundle", type=click.Path())
@click.argument("run", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Directory for the merged model.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "safetensors"]), default="onnx", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--adapter", "-a", "extra", multiple=True, type=click.Path(), help="Another adapter to blend in (repeat).")
@click.option("--weight", "-w", "weights", multiple=True, type=float,
              help="Blend weight, one per --adapter (RUN gets 1.0), or one per adapter including RUN first.")
@click.option("--quantize", type=click.Choice(["int4", "int8"]),
              help="Re-quantize the merged linear weights block-wise (MatMulNBits; ONNX output).")
@click.option("--block-size", default=32, show_default=True, type=int, help="Weights per quantization block.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@_errors
def merge_cmd(bundle: str, run: str, out: str, fmt: str, dtype: str, extra: tuple[str, ...],
              weights: tuple[float, ...], quantize: str | None, block_size: int, overwrite: bool, as_json: bool) -> None:
    """Fold RUN's adapter (and any --adapter) into the base weights of BUNDLE.

    Uses the C++ kernels (EDGETUNE_IMPL=numpy forces the numpy reference). ONNX output
    runs with `edgetune generate/eval OUT`; safetensors output is a Hugging Face folder.

    \b
    Examples:
      edgetune merge bundle/ run/ --out merged/
      edgetune merge bundle/ run/ --out hf-merged/ --format safetensors --dtype bfloat16
      edgetune merge bundle/ run_a/ --adapter run_b/ --weight 0.7 --weight 0.3 --out blend/
      edgetune merge qlora-bundle/ run/ --out merged-int4/ --quantize int4
    """
    from .errors import ConfigError
    from .merge import merge

    runs = [run, *extra]
    if weights and len(weights) == len(extra):
        ws = [1.0, *weights]
    elif weights and len(weights) == len(runs):
        ws = list(weights)
    elif weights:
        raise click.ClickException(f"{len(weights)} --weight values for {len(runs)} adapters; "
                                   "give one per --adapter, or one per adapter including RUN")
    else:
        ws = [1.0] * len(runs)
    try:
        summary = merge(bundle, runs, out, fmt, dtype, ws, log=_log, overwrite=overwrite, quantize=quantize,
                        block_size=block_size)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        _print_json(summary)
    else:
        click.echo(f"merged {summary['adapters']} adapter(s) into {out} ({fmt}, {dtype}) in {summary['seconds']}s "
                   f"with the {summary['implementation']} kernels")


# -- pack / verify / import-peft -------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.argument("run", type=click.Path())
@click.option("--bundle", "-b", required=True, type=click.Path(), help="The bundle the run was trained from.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="App directory (created or added to).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--name", help="Adapter name in the app directory [the run directory's name].")
@click.option("--ort-format", is_flag=True, help="Also write base.ort for ONNX Runtime's mobile builds.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@_errors
def pack(run: str, bundle: str, out: str, dtype: str, name: str | None, ort_format: bool, as_json: bool) -> None:
    """Package RUN's adapter for apps: a shared base.onnx plus NAME.onnx_adapter and a manifest.

    Apps load the adapter at run time with ONNX Runtime >= 1.20 (LoraAdapter) or
    onnxruntime-genai (Adapters). Packing a second run into the same OUT adds an adapter.

    \b
    Examples:
      edgetune pack run/ --bundle bundle/ --out app/ --name tickets
      edgetune verify app/
    """
    from .pack import pack as do_pack

    r = do_pack(run, bundle, out, dtype=dtype, name=name, ort_format=ort_format, log=_log)
    if as_json:
        _print_json(r)
    else:
        click.echo(f"{r['adapter']}  ({r['bytes'] / 2**20:.2f} MB, {r['seconds']}s)")


@main.command(context_settings=CONTEXT)
@click.argument("appdir", type=click.Path())
@click.option("--base", type=click.Path(dir_okay=False), help="Check the adapters against this base model instead.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@_errors
def verify(appdir: str, base: str | None, as_json: bool) -> None:
    """Check every hash in APPDIR and that each adapter tensor fits a base input (name, dtype, shape).

    \b
    Example:  edgetune verify app/ --base other-app/base.onnx
    """
    from .pack import verify as do_verify

    r = do_verify(appdir, base)
    if as_json:
        _print_json(r)
    else:
        click.echo(f"ok: {len(r['adapters'])} adapter(s), {r['tensors_checked']} tensors fit {r['base']}")


@main.command("import-peft", context_settings=CONTEXT)
@click.argument("peft_dir", type=click.Path())
@click.option("--bundle", "-b", required=True, type=click.Path(), help="The bundle to attach the adapter to.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Run directory to create.")
@_errors
def import_peft(peft_dir: str, bundle: str, out: str) -> None:
    """Turn a PEFT LoRA adapter (trained anywhere) into a run: eval, merge, pack, or train on.

    Rank, alpha, targets and tensor shapes must match the bundle.

    \b
    Examples:
      edgetune import-peft cloud-adapter/ --bundle bundle/ --out run/
      edgetune train bundle/ --data data/ --out run/ --steps 100 --resume
    """
    from .peft_io import import_peft as do_import

    click.echo(str(do_import(peft_dir, bundle, out)))


@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--no-install", is_flag=True, help="Check only the given directories, not this installation.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@_errors
def doctor(paths: tuple[str, ...], no_install: bool, as_json: bool) -> None:
    """Check this installation and any bundle, run, merged model or app directory; say what to fix.

    Exit code 0 when nothing is wrong, 1 otherwise (warnings alone do not fail).

    \b
    Examples:
      edgetune doctor                          the installation: onnxruntime, extension, cache, models
      edgetune doctor bundle/ run/ app/        also every file, checkpoint and graph of these
      edgetune doctor app/ --no-install --json
    """
    from .doctor import run

    r = run(list(paths), install=not no_install)
    if as_json:
        _print_json(r)
    else:
        for c in r["checks"]:
            mark = "ok  " if c["ok"] else ("WARN" if c["level"] == "warning" else "FAIL")
            detail = c["detail"].replace("\n", "\n        ")
            click.echo(f"{mark}  {c['what']}: {detail}")
            if not c["ok"] and c["fix"]:
                click.echo(f"      -> {c['fix']}")
        click.echo(f"{r['errors']} problem(s), {r['warnings']} warning(s)")
    if not r["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
