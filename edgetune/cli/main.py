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

from edgetune.formats.errors import EdgetuneError
from edgetune.formats.version import __version__

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


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
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


def log(msg: str) -> None:
    click.echo(msg, err=True)


def print_json(obj: Any) -> None:
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

