"""Which graphs a training run uses: the fused ones on the CPU when the kernel library loads, the plain
ones otherwise, with the reason said once and nothing lost. Runs in a device environment too."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from edgetune.device import fused as kernels
from edgetune.device import trainer
from edgetune.formats import atomic as _io
from edgetune.formats import bundle as _bundle
from edgetune.formats.errors import DeviceError


@pytest.fixture(autouse=True)
def _fresh_probe(monkeypatch):
    # Each test sees the library (or its absence) afresh and hears the fallback reason afresh.
    monkeypatch.setattr(kernels, "_probed", {})
    monkeypatch.setattr(kernels, "_said", set())
    monkeypatch.delenv("EDGETUNE_KERNELS", raising=False)
    monkeypatch.delenv("EDGETUNE_FUSED_LIBRARY", raising=False)


def _train(bundle, data, out, steps=2):
    return trainer.train(bundle, data, out, steps=steps, lr=1e-2, batch_size=4, seed=0, schedule="constant",
                         progress=False, log=lambda s: None)


def _run_manifest(run) -> dict:
    return json.loads((Path(run.out) / "run.json").read_text())


def _need_library() -> None:
    # A host that cannot get ONNX Runtime's headers opts out explicitly; the suite never skips silently.
    if os.environ.get("EDGETUNE_TEST_NO_FUSED") == "1":
        pytest.skip("EDGETUNE_TEST_NO_FUSED=1: this host builds edgetune without the kernel library")
    assert kernels.library().ok, kernels.library().reason


def test_the_library_is_built():
    _need_library()
    lib = kernels.library()
    assert lib.isa in ("generic", "avx2", "avx512")


def test_cpu_training_runs_the_fused_graphs_and_records_them(tiny_bundle, chat_data, tmp_path):
    _need_library()
    run = _train(tiny_bundle, chat_data, tmp_path / "run")
    m = _run_manifest(run)
    assert m["graphs"] == {"train": "train_fused.onnx", "eval": "eval_fused.onnx", "optimizer": "optimizer_fused.onnx"}
    assert m["kernels"] == f"fused ({kernels.library().isa})"


def test_a_missing_library_trains_on_the_plain_graphs_and_says_why_once(tiny_bundle, chat_data, tmp_path,
                                                                         monkeypatch, capsys):
    monkeypatch.setenv("EDGETUNE_FUSED_LIBRARY", str(tmp_path / "nowhere" / "libedgetune_ops.so"))
    first = _train(tiny_bundle, chat_data, tmp_path / "a")
    second = _train(tiny_bundle, chat_data, tmp_path / "b")
    err = capsys.readouterr().err
    assert err.count("edgetune: training on the plain graph:") == 1, err
    assert f"{tmp_path / 'nowhere' / 'libedgetune_ops.so'} does not exist" in err
    for run in (first, second):
        assert _run_manifest(run)["graphs"]["train"] == "train.onnx"
        assert _run_manifest(run)["kernels"] == "plain"
        assert math.isfinite(run.summary["final_loss"])


def test_a_library_built_for_another_machine_is_named_and_refused(tiny_bundle, chat_data, tmp_path, monkeypatch,
                                                                  capsys):
    bad = tmp_path / "libedgetune_ops.so"
    bad.write_bytes(b"\x7fELF" + os.urandom(256))  # what a copy from another platform looks like to dlopen
    monkeypatch.setenv("EDGETUNE_FUSED_LIBRARY", str(bad))
    run = _train(tiny_bundle, chat_data, tmp_path / "run")
    err = capsys.readouterr().err
    assert f"{bad} cannot be loaded here" in err and "rebuild it for this machine" in err
    assert _run_manifest(run)["kernels"] == "plain"


def test_asking_for_fused_kernels_that_cannot_load_is_an_error(tiny_bundle, chat_data, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_KERNELS", "fused")
    monkeypatch.setenv("EDGETUNE_FUSED_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(DeviceError, match=r"EDGETUNE_KERNELS=fused, but .*missing.so does not exist"):
        _train(tiny_bundle, chat_data, tmp_path / "run")
    assert not (tmp_path / "run" / "adapter").exists()
    monkeypatch.setenv("EDGETUNE_KERNELS", "fast")
    with pytest.raises(DeviceError, match=r"EDGETUNE_KERNELS must be auto, fused or plain, got 'fast'"):
        _train(tiny_bundle, chat_data, tmp_path / "run2")


def test_a_fused_graph_with_an_op_the_library_lacks_falls_back_naming_the_file(tiny_bundle, chat_data, tmp_path,
                                                                               capsys):
    _need_library()
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    graph = bundle / "train_fused.onnx"
    raw = graph.read_bytes()
    assert b"SwiGLUGrad" in raw
    graph.write_bytes(raw.replace(b"SwiGLUGrad", b"SwiGLUGrax"))  # an op from a newer edgetune, say
    m = json.loads((bundle / _bundle.MANIFEST).read_text())
    m["files"]["train_fused.onnx"] = _io.sha256_file(graph)
    m.pop("seal", None)
    _io.write_json(bundle / _bundle.MANIFEST, _io.seal(m))
    run = _train(bundle, chat_data, tmp_path / "run")
    err = capsys.readouterr().err
    assert f"training on the plain graph: {graph} uses edgetune:SwiGLUGrax, which the kernel library" in err, err
    assert _run_manifest(run)["kernels"] == "plain"
    assert "Traceback" not in err


def test_an_older_library_without_a_kernel_the_bundle_uses_falls_back_naming_it(tiny_bundle, chat_data, tmp_path,
                                                                                   monkeypatch, capsys):
    _need_library()
    lib = kernels.library()
    assert "CrossEntropyHead" in lib.ops
    bundle = tmp_path / "bundle"  # a bundle whose fused graphs use the vocabulary kernel, as its manifest says
    shutil.copytree(tiny_bundle, bundle)
    m = json.loads((bundle / _bundle.MANIFEST).read_text())
    m["fused"]["ops"]["CrossEntropyHead"] = 1
    m.pop("seal", None)
    _io.write_json(bundle / _bundle.MANIFEST, _io.seal(m))
    # A library from before the vocabulary kernel (it lists no ops: the first eight are assumed).
    old = kernels.Library(lib.path, isa=lib.isa, ops=frozenset(kernels.FIRST_OPS))
    monkeypatch.setattr(kernels, "library", lambda: old)
    run = _train(bundle, chat_data, tmp_path / "run")
    err = capsys.readouterr().err
    # (the residual, LoRA and head-transpose kernels came after the first eight too)
    assert f"training on the plain graph: {lib.path} lacks the kernels AddRMSNorm, AddRMSNormGrad, AttentionT, " \
        "AttentionTGrad, CrossEntropyHead, LoRA, LoRAGrad, RotaryT, RotaryTGrad " in err, err
    assert "reinstall edgetune" in err
    assert _run_manifest(run)["kernels"] == "plain"


def test_plain_kernels_can_be_forced(tiny_bundle, chat_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGETUNE_KERNELS", "plain")
    run = _train(tiny_bundle, chat_data, tmp_path / "run")
    assert _run_manifest(run)["graphs"]["train"] == "train.onnx"
    assert "training on the plain graph" not in capsys.readouterr().err  # asked for: nothing to explain
