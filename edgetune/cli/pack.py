"""``edgetune pack``, ``verify`` and ``import-peft``: adapters for apps, and PEFT interoperability."""
from __future__ import annotations

import click

from edgetune.cli.main import CONTEXT, handle_errors, log, main, print_json


@main.command(context_settings=CONTEXT)
@click.argument("run", type=click.Path())
@click.option("--bundle", "-b", required=True, type=click.Path(), help="The bundle the run was trained from.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="App directory (created or added to).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--name", help="Adapter name in the app directory [the run directory's name].")
@click.option("--ort-format", is_flag=True, help="Also write base.ort for ONNX Runtime's mobile builds.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@handle_errors
def pack(run: str, bundle: str, out: str, dtype: str, name: str | None, ort_format: bool, as_json: bool) -> None:
    """Package RUN's adapter for apps: a shared base.onnx plus NAME.onnx_adapter and a manifest.

    Apps load the adapter at run time with ONNX Runtime >= 1.20 (LoraAdapter) or
    onnxruntime-genai (Adapters). Packing a second run into the same OUT adds an adapter.

    \b
    Examples:
      edgetune pack run/ --bundle bundle/ --out app/ --name tickets
      edgetune verify app/
    """
    from edgetune.app.pack import pack as do_pack

    r = do_pack(run, bundle, out, dtype=dtype, name=name, ort_format=ort_format, log=log)
    if as_json:
        print_json(r)
    else:
        click.echo(f"{r['adapter']}  ({r['bytes'] / 2**20:.2f} MB, {r['seconds']}s)")


@main.command(context_settings=CONTEXT)
@click.argument("appdir", type=click.Path())
@click.option("--base", type=click.Path(dir_okay=False), help="Check the adapters against this base model instead.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@handle_errors
def verify(appdir: str, base: str | None, as_json: bool) -> None:
    """Check every hash in APPDIR and that each adapter tensor fits a base input (name, dtype, shape).

    \b
    Example:  edgetune verify app/ --base other-app/base.onnx
    """
    from edgetune.app.verify import verify as do_verify

    r = do_verify(appdir, base)
    if as_json:
        print_json(r)
    else:
        click.echo(f"ok: {len(r['adapters'])} adapter(s), {r['tensors_checked']} tensors fit {r['base']}")


@main.command("import-peft", context_settings=CONTEXT)
@click.argument("peft_dir", type=click.Path())
@click.option("--bundle", "-b", required=True, type=click.Path(), help="The bundle to attach the adapter to.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Run directory to create.")
@handle_errors
def import_peft(peft_dir: str, bundle: str, out: str) -> None:
    """Turn a PEFT LoRA adapter (trained anywhere) into a run: eval, merge, pack, or train on.

    Rank, alpha, targets and tensor shapes must match the bundle.

    \b
    Examples:
      edgetune import-peft cloud-adapter/ --bundle bundle/ --out run/
      edgetune train bundle/ --data data/ --out run/ --steps 100 --resume
    """
    from edgetune.formats.peft_io import import_peft as do_import

    click.echo(str(do_import(peft_dir, bundle, out)))
