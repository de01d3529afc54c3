"""The device-side Python API as the README shows it."""
import pytest

import edgetune


def test_readme_api(tiny_bundle, chat_data, tmp_path):
    run = edgetune.train(tiny_bundle, data=chat_data, out=tmp_path / "run", steps=4, batch_size=4, lr=1e-2,
                         eval_every=2, save_every=2, progress=False, log=lambda s: None)
    assert run.summary["steps"] == 4 and run.valid_loss is not None
    r = edgetune.evaluate(tiny_bundle, chat_data / "test.jsonl", adapter=tmp_path / "run")
    assert set(r) >= {"loss", "perplexity", "tokens"}
    model = edgetune.Model.open(tiny_bundle, adapter=tmp_path / "run")
    assert isinstance(edgetune.generate(tiny_bundle, "hello", model=model, max_new_tokens=4), str)
    assert issubclass(edgetune.EdgetuneError, Exception)


def test_every_stage_from_the_top(tiny_model, chat_data, tmp_path):
    """export, train, evaluate, generate, merge, pack and verify, each from ``edgetune`` itself."""
    bundle = edgetune.export(tiny_model, tmp_path / "b", rank=2, alpha=4, targets=("q_proj", "v_proj"))
    assert edgetune.export.__doc__ and edgetune.merge.__doc__ and edgetune.pack.__doc__
    run = tmp_path / "run"
    edgetune.train(bundle, chat_data, run, steps=2, batch_size=4, progress=False, log=lambda s: None)
    edgetune.merge(bundle, [run], tmp_path / "merged")
    base = edgetune.evaluate(tmp_path / "merged", chat_data / "test.jsonl")["loss"]
    assert base == pytest.approx(edgetune.evaluate(bundle, chat_data / "test.jsonl", adapter=run)["loss"], rel=1e-4)
    edgetune.pack(run, bundle, tmp_path / "app", name="t")
    assert edgetune.verify(tmp_path / "app")["adapters"] == ["t"]
    try:
        edgetune.export(tiny_model, tmp_path / "x", rank=2, colour="blue")
    except edgetune.ConfigError as e:
        assert "colour" in str(e)
    else:
        raise AssertionError("an unknown adapter setting was accepted")
