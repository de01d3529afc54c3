"""Every file edgetune reads, damaged as files get damaged: cut short at several points, a
flipped byte in the header and in the payload, emptied, or replaced by a foreign file of the
same name. Each case runs the command a user would run on it and asserts: a non-zero exit (or,
where edgetune can recover, success), a message naming the file, no traceback, and nothing
written."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DEVICE_ONLY

from edgetune.app import merge, pack
from edgetune.cli import main
from edgetune.device import trainer

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2


def _damages(size: int) -> dict[str, object]:
    """name -> bytes transform"""
    return {
        "empty": lambda b: b"",
        "cut-1": lambda b: b[:1],
        "cut-half": lambda b: b[: len(b) // 2],
        "cut-end": lambda b: b[:-2],  # JSON files end in a newline: cut into the content
        "flip-head": lambda b: _flip(b, min(9, len(b) - 1)),
        "flip-mid": lambda b: _flip(b, len(b) // 2),
        "foreign": lambda b: PNG,
        "foreign-json": lambda b: b'{"hello": "world"}\n',
    }


def _flip(b: bytes, i: int) -> bytes:
    out = bytearray(b)
    out[i] ^= 0x5A
    return bytes(out)


@pytest.fixture(scope="module")
def world(tiny_bundle, chat_data, tmp_path_factory):
    """One of everything: a bundle, a run with two checkpoints, a merged model, an app directory."""
    root = tmp_path_factory.mktemp("world")
    bundle = root / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    run = trainer.train(bundle, chat_data, root / "run", steps=4, save_every=2, batch_size=4, progress=False,
                        log=lambda s: None).out
    merge.merge(bundle, [run], root / "merged")
    pack.pack(run, bundle, root / "app", name="tickets")
    return {"bundle": bundle, "run": run, "merged": root / "merged", "app": root / "app", "data": chat_data}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _cli(args: list[str]) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    out = r.output + (r.stderr if hasattr(r, "stderr") and r.stderr and r.stderr not in r.output else "")
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"uncaught {type(r.exception).__name__}: {r.exception}")
    return r.exit_code, out


# (directory kind, file inside it, command over the copy; OUT is a path that must stay absent)
CASES = [
    ("bundle", "edgetune.json", ["eval", "{bundle}", "--data", "{data}/test.jsonl"]),
    ("bundle", "train.onnx", ["train", "{bundle}", "--data", "{data}", "--out", "{out}", "--steps", "1"]),
    ("bundle", "train.onnx.data", ["train", "{bundle}", "--data", "{data}", "--out", "{out}", "--steps", "1"]),
    ("bundle", "eval.onnx", ["eval", "{bundle}", "--data", "{data}/test.jsonl"]),
    ("bundle", "infer.onnx", ["generate", "{bundle}", "-p", "hi", "-n", "2"]),
    ("bundle", "infer.onnx.data", ["generate", "{bundle}", "-p", "hi", "-n", "2"]),
    ("bundle", "adapter_init.safetensors", ["train", "{bundle}", "--data", "{data}", "--out", "{out}", "--steps", "1"]),
    ("bundle", "tokenizer.json", ["eval", "{bundle}", "--data", "{data}/test.jsonl"]),
    ("bundle", "tokenizer_meta.json", ["eval", "{bundle}", "--data", "{data}/test.jsonl"]),
    ("bundle", "chat_template.jinja", ["train", "{bundle}", "--data", "{data}", "--out", "{out}", "--steps", "1"]),
    ("bundle", "app_base_f16.onnx", ["pack", "{run0}", "--bundle", "{bundle}", "--out", "{out}"]),
    ("run", "adapter/adapter_model.safetensors", ["eval", "{bundle0}", "--adapter", "{run}", "--data", "{data}/test.jsonl"]),
    ("run", "adapter/adapter_config.json", ["pack", "{run}", "--bundle", "{bundle0}", "--out", "{out}"]),
    ("run", "adapter/adapter_model.safetensors", ["merge", "{bundle0}", "{run}", "--out", "{out}"]),
    ("merged", "merged.json", ["generate", "{merged}", "-p", "hi", "-n", "2"]),
    ("merged", "model.onnx", ["generate", "{merged}", "-p", "hi", "-n", "2"]),
    ("merged", "model.onnx.data", ["eval", "{merged}", "--data", "{data}/test.jsonl"]),
    ("app", "manifest.json", ["verify", "{app}"]),
    ("app", "base.onnx", ["verify", "{app}"]),
    ("app", "base.onnx.data", ["generate", "{app}", "--adapter", "tickets", "-p", "hi", "-n", "2"]),
    ("app", "tickets.onnx_adapter", ["generate", "{app}", "--adapter", "tickets", "-p", "hi", "-n", "2"]),
    ("app", "genai_config.json", ["verify", "{app}"]),
    ("app", "tokenizer_config.json", ["verify", "{app}"]),
    ("app", "tokenizer.json", ["generate", "{app}", "-p", "hi", "-n", "2"]),
]


@pytest.mark.parametrize("damage", list(_damages(0)))
@pytest.mark.parametrize("kind,name,command", CASES, ids=[f"{c[1]}-{c[2][0]}" for c in CASES])
def test_damaged_file_is_named_and_nothing_is_written(world, tmp_path, kind, name, command, damage):
    copy = tmp_path / kind
    shutil.copytree(world[kind], copy)
    target = copy / name
    raw = target.read_bytes()
    new = _damages(len(raw))[damage](raw)
    if new == raw:
        pytest.skip("this damage leaves the file as it was")
    target.write_bytes(new)
    before = _snapshot(copy)
    out = tmp_path / "out"
    paths = {**{k: str(v) for k, v in world.items()}, kind: str(copy), "out": str(out),
             "bundle0": str(world["bundle"]), "run0": str(world["run"])}
    code, text = _cli([a.format(**paths) for a in command])
    assert code != 0, text
    assert Path(name).name in text, text
    assert "Traceback" not in text and "This is a bug" not in text, text
    assert not out.exists(), "a failed command left output behind"
    assert _snapshot(copy) == before, "a failed command changed its input"


@pytest.mark.parametrize("name", ["adapter.safetensors", "optimizer.safetensors", "trainer_state.json",
                                  "checksums.json"])
@pytest.mark.parametrize("damage", ["empty", "cut-half", "flip-mid", "foreign"])
def test_a_damaged_checkpoint_is_passed_over_on_resume(world, tmp_path, name, damage):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    f = newest / name
    f.write_bytes(_damages(0)[damage](f.read_bytes()))
    logs: list[str] = []
    r = trainer.train(world["bundle"], world["data"], run, steps=5, resume=True, batch_size=4, progress=False,
                      log=logs.append)
    assert r.steps == 5
    said = " ".join(logs)
    assert f"passed over damaged checkpoint(s): {newest.name}" in said, said
    if name == "checksums.json" and damage == "flip-mid":
        # a flipped digest blames the file it no longer matches
        assert re.search(r"step-000004: \w+\.\w+ does not match its checksum \(damaged\)", said), said
    else:
        assert f"step-000004/{name}" in said or f"step-000004: {name}" in said, said
    assert "resuming from step-000002" in said


def test_every_checkpoint_damaged_is_a_clear_error(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    for ck in (run / "checkpoints").glob("step-*"):
        (ck / "adapter.safetensors").write_bytes(b"")
    code, text = _cli(["train", world["bundle"], "--data", world["data"], "--out", run, "--steps", "6", "--resume"])
    assert code != 0 and "no intact checkpoint" in text and "Traceback" not in text, text


def test_damaged_latest_pointer_falls_back_to_the_newest_checkpoint(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (run / "checkpoints" / "latest").write_bytes(PNG)
    assert trainer.latest_checkpoint(run).name == "step-000004"


@pytest.mark.parametrize("content,expect", [
    ("\ufeff".encode("utf-16-le") + '{"text": "a"}\n'.encode("utf-16-le"), "UTF-16"),
    ('{"text": "caf\u00e9"}\n'.encode("latin-1"), "train.jsonl:1: not UTF-8 text"),
    (PNG, "train.jsonl:1"),
    (b'{"text": "ok"}\n[1, 2]\n', "train.jsonl:2: each line must be a JSON object, not a list"),
    (b'{"text": "ok"}\n{"text": "cut sh', "train.jsonl:2: malformed JSON"),
    (b"", "train.jsonl"),
    (b"\n\n  \n", "train.jsonl"),
])
def test_damaged_data_names_file_and_line(world, tmp_path, content, expect):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.jsonl").write_bytes(content)
    code, text = _cli(["train", world["bundle"], "--data", d, "--out", tmp_path / "out", "--steps", "1"])
    assert code != 0 and expect in text and "Traceback" not in text, text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,says", [
    (b"", "config file is empty"), (b"[1]", "config file must hold a JSON object, not a list"),
    (b"{'rank': 8}", r"config file is not valid JSON \(line 1, column 2"),
    (PNG, r"config file is not UTF-8 text \(byte 0; it looks like binary data\)"),
    (b'{"lr": "eight"}', "lr: cannot use 'eight' as float"), (b'{"lr": [8]}', r"lr: cannot use \[8\] as float"),
    (b'{"nope": 1}', r"unknown key\(s\) nope; known: batch_size"),
    ('{"rank": 8}'.encode("utf-16"), r"config file is not UTF-8 text \(byte 0; it looks like UTF-16")])
def test_damaged_config_file_is_named(world, tmp_path, content, says):
    cfg = tmp_path / "cfg.json"
    cfg.write_bytes(content)
    code, text = _cli(["train", world["bundle"], "--data", world["data"], "--out", tmp_path / "out", "--config", cfg])
    assert code == 1 and "Traceback" not in text, text
    assert re.search(r"Error: \S*cfg\.json: " + says, text), text
    assert not (tmp_path / "out").exists()


def test_the_real_entry_point_prints_one_line_and_debug_shows_the_traceback(world, tmp_path):
    app = tmp_path / "app"
    shutil.copytree(world["app"], app)
    (app / "tickets.onnx_adapter").write_bytes(b"")
    exe = [sys.executable, "-m", "edgetune.cli"]
    p = subprocess.run([*exe, "generate", app, "--adapter", "tickets", "-p", "hi"], capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "tickets.onnx_adapter" in p.stderr, p.stderr
    assert p.stderr.startswith("Error: ")
    p = subprocess.run([*exe, "--debug", "generate", app, "--adapter", "tickets", "-p", "hi"], capture_output=True,
                       text=True)
    assert p.returncode == 1 and "Traceback" in p.stderr
    env = {**os.environ, "EDGETUNE_DEBUG": "1"}
    p = subprocess.run([*exe, "generate", app, "--adapter", "tickets", "-p", "hi"], capture_output=True, text=True,
                       env=env)
    assert "Traceback" in p.stderr


def test_an_unexpected_exception_is_called_a_bug(monkeypatch):
    from edgetune.device import infer

    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(infer.Model, "open", boom)
    code, text = _cli(["generate", "anything", "-p", "hi"])
    assert code == 1 and "unexpected ZeroDivisionError" in text and "This is a bug in edgetune" in text
    assert "Traceback" not in text


def test_doctor_names_each_damaged_file(world, tmp_path):
    for kind in ("bundle", "app", "merged"):
        shutil.copytree(world[kind], tmp_path / kind)
    shutil.copytree(world["run"], tmp_path / "run")
    (tmp_path / "bundle" / "infer.onnx.data").write_bytes(b"\0" * 10)
    (tmp_path / "app" / "genai_config.json").write_text("{}")
    (tmp_path / "merged" / "model.onnx").write_bytes(PNG)
    newest = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    (newest / "optimizer.safetensors").write_bytes(b"")
    code, text = _cli(["doctor", "--no-install", *(tmp_path / k for k in ("bundle", "app", "merged", "run"))])
    assert code == 1, text
    for needle in ("infer.onnx.data", "genai_config.json", "model.onnx", f"{newest.name}: optimizer.safetensors"):
        assert needle in text, (needle, text)
    code, text = _cli(["doctor", "--no-install", "--json", world["bundle"], world["run"], world["app"], world["merged"]])
    r = json.loads(text)
    assert code == 0 and r["ok"] and r["errors"] == 0, text


def test_doctor_checks_the_installation():
    code, text = _cli(["doctor", "--json"])
    r = json.loads(text)
    names = {c["what"] for c in r["checks"]}
    assert {"onnxruntime", "merge extension", "fused kernels", "cache directory", "export tools"} <= names
    # The environment the suite runs in is complete: the doctor must say so, and exit 0. A device
    # environment lacks the export tools by design, which the doctor reports as a warning.
    failed = [c for c in r["checks"] if not c["ok"]]
    allowed = {"export tools"} if DEVICE_ONLY else set()
    assert code == 0 and r["ok"] and r["errors"] == 0, failed
    assert all(c["what"] in allowed and c["level"] == "warning" for c in failed), failed


def test_shipped_manifests_hold_no_absolute_path(world):
    """The bundle here comes from a local model folder, the worst case for leaking a path."""
    def strings(o):
        if isinstance(o, dict):
            for k, v in o.items():
                yield k
                yield from strings(v)
        elif isinstance(o, list):
            for v in o:
                yield from strings(v)
        elif isinstance(o, str):
            yield o

    for f in (world["app"] / "manifest.json", world["run"] / "run.json", world["merged"] / "merged.json",
              world["app"] / "genai_config.json"):
        found = [s for s in strings(json.loads(f.read_text())) if s.startswith("/") or str(world["bundle"].parent) in s]
        assert not found, (f.name, found)
    run = json.loads((world["run"] / "run.json").read_text())
    assert (world["run"] / run["bundle"]).resolve() == world["bundle"].resolve()
