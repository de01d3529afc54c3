"""``edgetune merge``: fold adapters into the base weights."""
from __future__ import annotations

import click

from edgetune.cli.main import CONTEXT, handle_errors, log, main, print_json


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
@handle_errors
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
    from edgetune.app.merge import merge
    from edgetune.formats.errors import ConfigError

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
        summary = merge(bundle, runs, out, fmt, dtype, ws, log=log, overwrite=overwrite, quantize=quantize,
                        block_size=block_size)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        print_json(summary)
    else:
        click.echo(f"merged {summary['adapters']} adapter(s) into {out} ({fmt}, {dtype}) in {summary['seconds']}s "
                   f"with the {summary['implementation']} kernels")
