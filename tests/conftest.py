from __future__ import annotations

import fcntl
import os
import shutil
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


# `make test` runs ``-n 2 --dist load --maxschedchunk 1``: each pytest-xdist worker takes the next
# test when it is free, in this order. The longest tests go first, so both workers stay busy to the
# end instead of one starting a ten-minute test when the other has nothing left; the first of each
# worker's two builds a real-model fixture, one each (see `built_once`). Not ``--dist loadgroup``:
# with pytest 9.2 it silently ignores the groups (pytest-xdist issue 1386).
LONGEST_FIRST = (
    "test_fine_tune_lowers_held_out_loss_and_changes_generation",  # worker 1 builds real_bundle, real_run
    "test_qlora_int4_base_on_the_real_model",
    "test_dora_on_the_real_model",  # worker 2 builds dora_real
    "test_onnxruntime_genai_runs_a_dora_adapter",
    "test_int8_products_on_the_real_model",
    "test_bf16_products_on_the_real_model",
    "test_onnxruntime_genai_runs_the_app_dir_token_for_token",
    "test_cpp_trainer_on_the_real_model",
    "test_streamed_gguf_conversion_equals_transformers_loader",
    "test_peft_logits_match_on_the_real_model",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(getattr(item, "originalname", item.name), len(rank)))
    if not DEVICE_ONLY:
        return
    skip = pytest.mark.skip(reason="needs the workstation stack (torch, transformers); this is a device environment")
    for item in items:
        if (item.module.__name__ in WORKSTATION_MODULES or "tiny_model" in getattr(item, "fixturenames", ())
                or item.get_closest_marker("workstation")):
            item.add_marker(skip)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The directory ``build(path)`` makes, made once per test run: pytest-xdist workers each have
    their own session fixtures, so the first to ask builds it under a lock and the other waits
    for it and reads the same files. For what is expensive to build and only read after."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "built-once"
    root.mkdir(exist_ok=True)
    out, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            build(out)
            done.touch()
    return out


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

    return built_once(tmp_path_factory, "real-bundle", lambda out: export(
        models.DEFAULT_MODEL, out, AdapterConfig(rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"))))


# The standard short run on the sample tickets: 30 steps, validation after 15 and 30.
SHORT_RUN = dict(steps=30, batch_size=4, lr=1e-3, warmup=3, eval_every=15, valid_batches=4)


@pytest.fixture(scope="session")
def real_run(real_bundle, tmp_path_factory) -> Path:
    """The standard short run on the real bundle: 30 steps on the sample tickets, two validations."""
    from edgetune.device import trainer

    return built_once(tmp_path_factory, "real-run", lambda out: trainer.train(
        real_bundle, SAMPLE_DATA, out, **SHORT_RUN, progress=False, log=lambda s: None))


@pytest.fixture(scope="session")
def dora_real(tmp_path_factory) -> tuple[Path, Path]:
    """The default model exported with DoRA and trained for 15 steps: (bundle, run)."""
    from edgetune.device import trainer
    from edgetune.formats import models
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    def build(root: Path) -> None:
        root.mkdir()
        export(models.DEFAULT_MODEL, root / "bundle",
               AdapterConfig(method="dora", rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj")))
        trainer.train(root / "bundle", SAMPLE_DATA, root / "run", steps=15, batch_size=4, lr=1e-3, warmup=3,
                      progress=False, log=lambda s: None)

    root = built_once(tmp_path_factory, "real-dora", build)
    return root / "bundle", root / "run"


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_bundle):
    from edgetune.device.tokenizer import ChatTokenizer

    return ChatTokenizer.from_dir(tiny_bundle)
