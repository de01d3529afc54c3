from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = ROOT / "examples" / "data" / "tickets"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    import tiny

    return tiny.make_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model, tmp_path_factory) -> Path:
    from edgetune.config import AdapterConfig
    from edgetune.export import export

    out = tmp_path_factory.mktemp("bundle") / "b"
    export(str(tiny_model), out, AdapterConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    return out


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    import tiny

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
def dora_bundle(tiny_model, tmp_path_factory) -> Path:
    from edgetune.config import AdapterConfig
    from edgetune.export import export

    out = tmp_path_factory.mktemp("dora") / "b"
    export(str(tiny_model), out, AdapterConfig(method="dora", rank=4, alpha=8, targets=("q_proj", "v_proj")))
    return out
