"""The package reads as the pipeline: layers import only downward, nothing imports in a circle,
and what a device runs loads no workstation stack."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_edgetune_imports_one_that_imports_it_back():
    grimp = pytest.importorskip("grimp")
    g = grimp.build_graph("edgetune")
    edges = {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}
    assert _cycles(edges) == []


def test_no_benchmark_imports_one_that_imports_it_back():
    names = {p.stem for p in (ROOT / "bench").glob("*.py")}
    edges: dict[str, set[str]] = {}
    for p in (ROOT / "bench").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.ImportFrom) and node.module in names and not node.level:
                deps.add(node.module)
        edges[p.stem] = deps
    assert _cycles(edges) == []


def test_layer_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed here (it is in the test extras)")
    p = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 kept, 0 broken" in p.stdout


def test_device_formats_and_app_load_no_workstation_stack():
    mods = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                  for layer in ("formats", "device", "app") for p in (ROOT / "edgetune" / layer).glob("*.py"))
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "import edgetune.cli\n"
            "print(sorted(k for k in ('torch', 'transformers', 'peft', 'onnx', 'gguf') if k in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent that is a module, not a package
        return False


def test_every_edgetune_module_named_outside_the_package_exists():
    # Benchmarks pass import lines to child processes as strings, and the docs name modules: a
    # rename of a module must not leave either pointing at nothing.
    import re

    pattern = re.compile(r"\bedgetune(?:\.[a-z_][a-z_0-9]*)+")
    public = {"export", "train", "evaluate", "generate", "merge", "pack", "verify", "json", "devices", "dequant_shift"}
    missing = []
    for folder in ("bench", "scripts", "examples", "docs"):
        for f in sorted((ROOT / folder).rglob("*")):
            if f.suffix not in (".py", ".md", ".sh", ".toml") or not f.is_file():
                continue
            for name in set(pattern.findall(f.read_text(errors="replace"))):
                parts = name.split(".")
                if len(parts) == 2 and parts[1] in public:
                    continue  # a public function, an entry-point group, a file or graph-input name
                # the longest prefix that is a module; what follows may be an attribute of it
                if not any(_is_module(".".join(parts[:k])) for k in range(len(parts), 1, -1)):
                    missing.append(f"{f.relative_to(ROOT)}: {name}")
    assert not missing, "modules named but not in the package:\n" + "\n".join(missing)


@pytest.mark.parametrize("device_only", [False, True])
def test_a_missing_test_dependency_fails_the_suite_unless_the_run_is_device_only(device_only):
    """Outside an explicit device-only run, the suite refuses to start without a dependency its tests
    need (here sacrebleu, hidden), instead of skipping those tests without a word."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("CI", "EDGETUNE_DEVICE_ONLY")}
    if device_only:
        env["EDGETUNE_DEVICE_ONLY"] = "1"
    code = "import sys; sys.modules['sacrebleu'] = None; sys.path.insert(0, 'tests'); import conftest"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if device_only:
        assert p.returncode == 0, p.stderr[-2000:]
    else:
        assert p.returncode != 0 and "sacrebleu" in p.stderr, p.stderr[-2000:]
