"""Directories written by edgetune 0.1.0 before the package moved into layers still open.

``tests/fixtures/release-0.1.0`` holds a bundle, a run, a merged model and an app directory
made by that release from a one-layer tiny Llama, and ``expected.json`` the losses and token
ids that release computed from them. No torch needed: this runs in device environments too.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetune.cli import main
from edgetune.device import infer, trainer

FIXTURE = Path(__file__).parent / "fixtures" / "release-0.1.0"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
CASES = {"bundle_run": ("bundle", "run"), "merged": ("merged", None), "app": ("app", "tickets"), "base": ("bundle", None)}


def _tree_sha(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("release") / "r"
    shutil.copytree(FIXTURE, dest)
    return dest


@pytest.mark.parametrize("case", sorted(CASES))
def test_old_directories_compute_what_they_computed(old, case):
    path, adapter = CASES[case]
    before = _tree_sha(old / path)
    r = infer.evaluate(old / path, old / "data" / "test.jsonl", adapter=old / adapter if case == "bundle_run" else adapter)
    g = infer.generate_full(old / path, "classify this ticket: my invoice is wrong",
                            adapter=old / adapter if case == "bundle_run" else adapter, max_new_tokens=6)
    want = EXPECTED[case]
    assert r["tokens"] == want["tokens"]
    assert r["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert g["token_ids"] == want["token_ids"]
    assert _tree_sha(old / path) == before  # opening never edits its input


def test_old_run_resumes_and_old_app_verifies(old):
    run = old / "run"
    trainer.train(old / "bundle", old / "data", run, resume=True, steps=4, batch_size=2, progress=False,
                  log=lambda *a: None)
    state = json.loads((run / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4
    res = CliRunner().invoke(main, ["verify", str(old / "app")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["doctor", str(old / "bundle"), str(run), str(old / "merged"), str(old / "app")])
    assert res.exit_code == 0, res.output
    assert "0 problem(s)" in res.output
