"""The device-side Python API as the README shows it."""
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
