"""The documentation names only commands and options that exist, and README stays short."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click

from edgetune.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _command_lines() -> list[tuple[str, str]]:
    """Every ``edgetune ...`` invocation inside a code block or inline code of the pages."""
    out = []
    for page in PAGES:
        text = page.read_text()
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S) + re.findall(r"`(edgetune [^`]+)`", text)
        for block in blocks:
            for line in block.splitlines():
                line = re.split(r"\s{3,}", line.split("#")[0].strip())[0]  # drop a description column
                for part in re.split(r"&&|\|", line):
                    part = part.strip()
                    if part.startswith("edgetune ") and "..." not in part:
                        out.append((page.name, part))
    return out


def _resolve(words: list[str]) -> tuple[click.Command, list[str]]:
    cmd: click.Command = main
    while isinstance(cmd, click.Group) and words and words[0] in cmd.commands:
        cmd = cmd.commands[words.pop(0)]
    return cmd, words


def test_pages_show_commands():
    assert len(_command_lines()) >= 20


def test_every_documented_command_and_option_exists():
    problems = []
    for page, line in _command_lines():
        try:
            words = shlex.split(line.replace("[", " ").replace("]", " ").replace("|", " "))[1:]
        except ValueError:
            continue
        cmd, rest = _resolve(words)
        if cmd is main and rest and not rest[0].startswith("-"):
            problems.append(f"{page}: {line}: no command {rest[0]!r}")
            continue
        opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for w in rest:
            name = w.split("=")[0]
            if re.match(r"--?[A-Za-z]", name) and name not in opts | {"-h", "--help"}:
                problems.append(f"{page}: {line}: {cmd.name} has no option {name}")
    assert problems == []


def test_readme_is_a_five_minute_read():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
