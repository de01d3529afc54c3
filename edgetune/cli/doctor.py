"""``edgetune doctor``: check this installation and any bundle, run, merged model or app directory."""
from __future__ import annotations

import sys

import click

from edgetune.cli.main import CONTEXT, handle_errors, main, print_json


@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--no-install", is_flag=True, help="Check only the given directories, not this installation.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@handle_errors
def doctor(paths: tuple[str, ...], no_install: bool, as_json: bool) -> None:
    """Check this installation and any bundle, run, merged model or app directory; say what to fix.

    Exit code 0 when nothing is wrong, 1 otherwise (warnings alone do not fail).

    \b
    Examples:
      edgetune doctor                          the installation: onnxruntime, extension, cache, models
      edgetune doctor bundle/ run/ app/        also every file, checkpoint and graph of these
      edgetune doctor app/ --no-install --json
    """
    from edgetune.app.doctor import run

    r = run(list(paths), install=not no_install)
    if as_json:
        print_json(r)
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
