"""``edgetune export``: a Hugging Face model into a bundle (the workstation stage)."""
from __future__ import annotations

from typing import Any

import click

from edgetune.cli.main import CONTEXT, handle_errors, log, main


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
@click.option("--compute", type=click.Choice(["float32", "int8", "bf16"]),
              help="Arithmetic of the frozen products: float32; int8 on a quantized base (activations quantized "
                   "per block too, forward and input gradients; needs --quantize int8 or int4); or bf16 (the "
                   "training graphs keep the frozen weights in bfloat16 and multiply with AMX or AVX512-BF16; LoRA, "
                   "float base) "
                   "[float32].")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute each layer's activations in the backward pass: live activations of one layer "
                   "instead of all, for about a third more compute per step [off].")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle directory.")
@handle_errors
def export(model: str, out: str, config_file: str | None, overwrite: bool, **opts: Any) -> None:
    """Export MODEL (a known name, a HF folder or a .gguf file) into a training bundle.

    Runs on a workstation with torch (pip install 'edgetune[export]'). Only the
    adapter weights are trainable in the bundle.

    \b
    Examples:
      edgetune export --out bundle/
      edgetune export ./my-hf-model --out bundle/ --rank 16 --alpha 32 --targets all-linear
      edgetune export --out qbundle/ --quantize int4          (QLoRA: int4 base, float32 adapters)
      edgetune export --out fast/ --quantize int8 --compute int8   (int8 products, for CPUs with VNNI or AMX)
      edgetune export --out bf16/ --compute bf16   (bfloat16 products, for CPUs with AMX or AVX512-BF16)
      edgetune export ./phi-3-mini --out big/ --quantize int4 --block-size 64 --gradient-checkpointing
    """
    from edgetune.formats.config import AdapterConfig, resolve
    from edgetune.workstation.export import export as do_export

    cfg = resolve(AdapterConfig, config_file, **opts)
    do_export(model, out, cfg, log=log, overwrite=overwrite)
    click.echo(out)
