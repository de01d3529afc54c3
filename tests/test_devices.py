"""The device hook: built-in names, vendor plugins through entry points, real placement."""
import json
import os
import subprocess
import sys

import pytest

from edgetune.device import providers as devices
from edgetune.formats.errors import DeviceError

PLUGIN = '''
from edgetune import Device

def device():
    return Device("fakeboard", "CPUExecutionProvider", {}, "a board whose provider is the CPU's")

def missing():
    return Device("npu-x", "NpuXExecutionProvider", {}, "a board whose provider is not installed")
'''


@pytest.fixture()
def plugin_path(tmp_path):
    """A real installed distribution (dist-info + module) that registers two devices."""
    (tmp_path / "fakeboard_edgetune.py").write_text(PLUGIN)
    info = tmp_path / "fakeboard_edgetune-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeboard-edgetune\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[edgetune.devices]\nfakeboard = fakeboard_edgetune:device\nnpu-x = fakeboard_edgetune:missing\n")
    return tmp_path


def cli(plugin_path, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True, env=env)


def test_vendor_plugin_device_is_listed_and_runs(plugin_path, tiny_bundle, chat_data):
    rows = {r["name"]: r for r in json.loads(cli(plugin_path, "devices", "--json").stdout)}
    assert rows["fakeboard"]["available"] and not rows["npu-x"]["available"]
    p = cli(plugin_path, "eval", tiny_bundle, "--device", "fakeboard", "--data", chat_data / "test.jsonl",
            "--placement", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["device"] == "fakeboard" and out["providers"] == ["CPUExecutionProvider"]
    assert out["placement"]["CPUExecutionProvider"] > 50


def test_plugin_whose_provider_is_missing_is_refused(plugin_path, tiny_bundle):
    p = cli(plugin_path, "generate", tiny_bundle, "--device", "npu-x", "-p", "hi")
    assert p.returncode == 1
    assert "device 'npu-x' needs NpuXExecutionProvider, which this onnxruntime does not have" in p.stderr
    assert "usable devices: cpu, fakeboard" in p.stderr


def test_provider_options_and_names():
    d = devices.resolve("CPUExecutionProvider", {"arena": "1"})
    assert d.name == "cpu" and d.options == {"arena": "1"}
    assert devices.parse_options(["a=1", "b = x"]) == {"a": "1", "b": "x"}
    with pytest.raises(DeviceError, match="provider option 'a' must look like KEY=VALUE"):
        devices.parse_options(["a"])
