"""The --device hook with a real execution provider: Intel's OpenVINO, through the
onnxruntime-openvino build (x86-64 Linux), which replaces the ``onnxruntime`` module and so
lives in its own environment (.venv-openvino, built on first use). Training, eval and
generation run there; the adapter must equal the CPU run's within float tolerance."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from venvs import side_env

from edgetune.device import trainer
from edgetune.formats import peft_io

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux",
                                 reason="onnxruntime-openvino wheels are x86-64 Linux only")]
DEPS = ["onnxruntime-openvino>=1.24", "numpy", "tokenizers", "jinja2", "click", "safetensors", "tqdm", "psutil"]


@pytest.fixture(scope="module")
def ov_python() -> Path:
    probe = "import onnxruntime as o; assert 'OpenVINOExecutionProvider' in o.get_available_providers()"
    return side_env(".venv-openvino", probe, DEPS)


def et(py: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGETUNE_IMPL": "numpy"}
    return subprocess.run([str(py), "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True, env=env)


def test_train_eval_generate_through_openvino(ov_python, tiny_bundle, chat_data, tmp_path):
    kw = dict(steps=4, lr=1e-2, batch_size=4, seed=3)
    cpu = trainer.train(tiny_bundle, chat_data, tmp_path / "cpu", progress=False, log=lambda s: None, **kw)
    p = et(ov_python, "train", tiny_bundle, "--data", chat_data, "--out", tmp_path / "ov", "--device", "openvino",
           "--steps", 4, "--lr", 1e-2, "--batch-size", 4, "--seed", 3, "--placement", "--no-progress", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout[p.stdout.index("{"):])
    assert out["placement"].get("OpenVINOExecutionProvider", 0) > 0, out["placement"]
    run = json.loads((tmp_path / "ov" / "run.json").read_text())
    assert run["train_providers"][0] == "OpenVINOExecutionProvider"
    # The fused kernels are a CPU-provider library: OpenVINO trains the plain graphs, said once.
    assert run["graphs"]["train"] == "train.onnx" and run["kernels"] == "plain"
    assert p.stderr.count("edgetune: training on the plain graph:") == 1, p.stderr[-2000:]
    ours, ref = peft_io.load(tmp_path / "ov")[1], peft_io.load(cpu.out)[1]
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-3, atol=1e-5)

    e = et(ov_python, "eval", tiny_bundle, "--adapter", tmp_path / "ov", "--data", chat_data / "test.jsonl",
           "--device", "openvino", "--placement", "--json")
    assert e.returncode == 0, e.stderr[-3000:]
    ev = json.loads(e.stdout)
    assert ev["providers"][0] == "OpenVINOExecutionProvider" and ev["placement"].get("OpenVINOExecutionProvider", 0) > 0
    g = et(ov_python, "generate", tiny_bundle, "--adapter", tmp_path / "ov", "-p", "classify this ticket",
           "-n", 8, "--device", "openvino", "--json")
    assert g.returncode == 0, g.stderr[-3000:]
    assert json.loads(g.stdout)["providers"][0] == "OpenVINOExecutionProvider"


def test_bf16_bundle_trains_through_openvino(ov_python, tiny_model, chat_data, tmp_path, monkeypatch):
    """A --compute bf16 bundle's plain graph (bfloat16 weights behind standard Casts) on OpenVINO:
    the adapter equals the CPU provider's run of the same plain graph within float tolerance."""
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    bundle = export(tiny_model, tmp_path / "bundle", AdapterConfig(compute="bf16"))
    monkeypatch.setenv("EDGETUNE_KERNELS", "plain")
    cpu = trainer.train(bundle, chat_data, tmp_path / "cpu", steps=4, lr=1e-2, batch_size=4, seed=3, progress=False,
                        log=lambda s: None)
    p = et(ov_python, "train", bundle, "--data", chat_data, "--out", tmp_path / "ov", "--device", "openvino",
           "--steps", 4, "--lr", 1e-2, "--batch-size", 4, "--seed", 3, "--placement", "--no-progress", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout[p.stdout.index("{"):])
    assert out["placement"].get("OpenVINOExecutionProvider", 0) > 0, out["placement"]
    ours, ref = peft_io.load(tmp_path / "ov")[1], peft_io.load(cpu.out)[1]
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-3, atol=1e-5)
