"""The ``edgetune`` command: one module per command group, each a thin layer over the API."""
# Each command module adds its commands to ``main`` when imported.
from edgetune.cli import doctor, export, infer, merge, models, pack, tokenize, train  # noqa: F401
from edgetune.cli.main import main

__all__ = ["main"]
