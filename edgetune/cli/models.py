"""``edgetune models`` and ``edgetune devices``: what this installation knows and can run on."""
from __future__ import annotations

import click

from edgetune.cli.main import CONTEXT, handle_errors, main, print_json


# -- models ---------------------------------------------------------------------
@main.group(context_settings=CONTEXT)
def models() -> None:
    """Known base models and the local model cache ($EDGETUNE_HOME)."""


@models.command("list", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@handle_errors
def models_list(as_json: bool) -> None:
    """List known models and whether each is in the cache.

    \b
    Example:  edgetune models list --json
    """
    from edgetune.formats import models as m

    rows = [{"name": s.name, "architecture": s.architecture, "cached": s.cached, "path": str(s.path),
             "sha256": s.sha256, "target_modules": list(s.target_modules), "description": s.description}
            for s in m.known_models().values()]
    if as_json:
        print_json(rows)
        return
    for r in rows:
        mark = "cached" if r["cached"] else "not fetched"
        click.echo(f"{r['name']:28} {r['architecture']:8} {mark:12} {r['description']}")


@models.command("fetch", context_settings=CONTEXT)
@click.argument("name", default="smollm2-135m-instruct")
@click.option("--force", is_flag=True, help="Download again even if cached.")
@handle_errors
def models_fetch(name: str, force: bool) -> None:
    """Download NAME once into the cache and verify its sha256.

    \b
    Example:  edgetune models fetch smollm2-135m-instruct
    """
    from edgetune.formats import models as m

    click.echo(str(m.fetch(name, force=force)))


# -- devices --------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@handle_errors
def devices(as_json: bool) -> None:
    """List device names, their execution providers and whether they are usable here.

    Training always runs on the CPU (ONNX Runtime's training runtime is CPU-only);
    devices run eval, generate and validation. Vendors add devices through the
    ``edgetune.devices`` entry-point group.

    \b
    Example:  edgetune devices --json
    """
    from edgetune.device import providers as d

    avail = d.available_providers()
    rows = [{"name": x.name, "provider": x.provider, "available": x.provider in avail, "description": x.description}
            for x in d.known().values()]
    if as_json:
        print_json(rows)
        return
    for r in rows:
        click.echo(f"{r['name']:10} {r['provider']:28} {'yes' if r['available'] else 'no ':4} {r['description']}")
