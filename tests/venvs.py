"""Test environments beside the project (.venv-genai, .venv-openvino): each built on first use, by
one test process at a time."""
from __future__ import annotations

import fcntl
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def side_env(name: str, probe: str, install: list[str]) -> Path:
    """The interpreter of ``ROOT/name``, where ``probe`` (Python code) runs: the environment is
    created and ``pip install *install`` run in it when not. Two pytest-xdist workers may ask at once:
    one builds under a lock and the other waits, rather than finding the interpreter of a venv whose
    pip is still being installed (seen: "No module named pip"); a venv left without pip is made again."""
    env = ROOT / name
    py = env / "bin" / "python"
    with open(ROOT / f"{name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released when the file closes
        if not py.exists() or subprocess.run([str(py), "-m", "pip", "--version"], capture_output=True).returncode:
            venv.create(env, with_pip=True, clear=True)
        if subprocess.run([str(py), "-c", probe], capture_output=True).returncode != 0:
            subprocess.run([str(py), "-m", "pip", "install", "--quiet", *install], check=True)
    return py
