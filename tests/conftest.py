from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = ROOT / "examples" / "data" / "tickets"
# A device environment (onnxruntime, numpy, tokenizers; no torch): bundles come prebuilt from
# EDGETUNE_TEST_ASSETS (python tests/tiny.py DIR on a workstation) and tests that need the
# workstation stack are skipped by design, and said so at the end. Everywhere else a missing piece
# is a failure: an importorskip line must never turn a broken environment into a green run.
DEVICE_ONLY = os.environ.get("EDGETUNE_DEVICE_ONLY") == "1"
ASSETS = Path(os.environ["EDGETUNE_TEST_ASSETS"]) if os.environ.get("EDGETUNE_TEST_ASSETS") else None
WORKSTATION_MODULES = {"test_parity", "test_dora", "test_fused", "test_optimizer_graph", "test_real_model",
                       "test_autodiff", "test_openvino", "test_genai", "test_real_tokenizers"}

if not DEVICE_ONLY:
    import flwr  # noqa: F401
    import grimp  # noqa: F401  - the layer tests need it
    import llama_models  # noqa: F401
    import onnx  # noqa: F401
    import peft  # noqa: F401
    import sacrebleu  # noqa: F401
    import torch  # noqa: F401

    import edgetune.device._ext  # noqa: F401  - CI must build the extension, not skip its tests


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if DEVICE_ONLY:
        skipped = terminalreporter.stats.get("skipped", [])
        terminalreporter.write_line(f"device-only run (EDGETUNE_DEVICE_ONLY=1): {len(skipped)} tests that need the "
                                    "workstation stack (torch, transformers, onnx) or are not for this environment "
                                    "were skipped by design")


def _worker_group(item) -> str:
    """Under pytest-xdist (`make test` runs ``-n 2 --dist loadgroup``) each group runs on one
    worker, in order, so the fixtures its tests share are built once: the tests that read the real
    default model's exported bundle or run (and the C++ trainer's file, and test_genai.py, which
    compares against them) form one group, the real DoRA ones another, every other file its own."""
    fixtures = set(getattr(item, "fixturenames", ()))
    if fixtures & {"real_bundle", "real_run"} or item.path.name in ("test_app_training.py", "test_genai.py"):
        return "real-model"
    if "dora_real" in fixtures:
        return "real-model-dora"
    return item.path.name


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("xdist"):
        for item in items:
            item.add_marker(pytest.mark.xdist_group(_worker_group(item)))
    if not DEVICE_ONLY:
        return
    skip = pytest.mark.skip(reason="needs the workstation stack (torch, transformers); this is a device environment")
    for item in items:
        if (item.module.__name__ in WORKSTATION_MODULES or "tiny_model" in getattr(item, "fixturenames", ())
                or item.get_closest_marker("workstation")):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    import tiny

    return tiny.make_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_bundle(request, tmp_path_factory) -> Path:
    if ASSETS is not None:
        return ASSETS / "bundle"
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    tiny_model = request.getfixturevalue("tiny_model")
    out = tmp_path_factory.mktemp("bundle") / "b"
    export(str(tiny_model), out, AdapterConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    return out


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    import tiny

    if ASSETS is not None:
        return ASSETS / "data"
    return tiny.write_chat_data(tmp_path_factory.mktemp("data") / "d")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    # Tests never touch the user's cache, except the real-model ones that share one.
    if "EDGETUNE_HOME" not in os.environ:
        monkeypatch.setenv("EDGETUNE_HOME", str(tmp_path_factory.getbasetemp() / "home"))


@pytest.fixture(scope="session")
def ort_env() -> Path:
    """The Python that runs the app-side consumer scripts: the training environment's own,
    since training and apps now use the same onnxruntime (the scripts import no edgetune)."""
    return Path(sys.executable)


@pytest.fixture(scope="session")
def dora_bundle(request, tmp_path_factory) -> Path:
    if ASSETS is not None:
        return ASSETS / "dora"
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    tiny_model = request.getfixturevalue("tiny_model")
    out = tmp_path_factory.mktemp("dora") / "b"
    export(str(tiny_model), out, AdapterConfig(method="dora", rank=4, alpha=8, targets=("q_proj", "v_proj")))
    return out


@pytest.fixture(scope="session")
def real_bundle(tmp_path_factory) -> Path:
    """The default model (SmolLM2-135M-Instruct) exported once for the slow end-to-end tests."""
    from edgetune.formats import models
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    out = tmp_path_factory.mktemp("real") / "bundle"
    export(models.DEFAULT_MODEL, out, AdapterConfig(rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj")))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_bundle):
    from edgetune.device.tokenizer import ChatTokenizer

    return ChatTokenizer.from_dir(tiny_bundle)
