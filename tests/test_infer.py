import json

import numpy as np
import pytest

from edgetune import infer, peft_io, trainer
from edgetune.errors import BundleError, DataError


@pytest.fixture(scope="module")
def run_dir(tiny_bundle, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("infer") / "run"
    trainer.train(tiny_bundle, chat_data, out, steps=20, lr=5e-2, batch_size=4, progress=False, log=lambda s: None)
    return out


def test_kv_cache_decode_equals_full_forward(tiny_bundle, run_dir):
    m = infer.Model.open(tiny_bundle, adapter=run_dir)
    ids = np.asarray([[5, 9, 17, 33, 41, 50, 61, 70]], np.int64)
    full = m.logits(ids, np.ones_like(ids))
    logits, past = m.forward(ids[:, :5], np.ones((1, 5), np.int64), np.arange(5)[None], m.empty_past(1))
    np.testing.assert_allclose(logits, full[:, :5], atol=1e-5)
    for t in range(5, 8):
        step, past = m.forward(ids[:, t:t + 1], np.ones((1, t + 1), np.int64), np.asarray([[t]]), past)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


def test_padding_does_not_change_logits(tiny_bundle):
    m = infer.Model.open(tiny_bundle)
    ids = np.asarray([[5, 9, 17, 33, 41, 50]], np.int64)
    alone = m.logits(ids, np.ones_like(ids))
    batch = np.asarray([[5, 9, 17, 33, 41, 50, 2, 2], [7, 8, 9, 10, 11, 12, 13, 14]], np.int64)
    mask = np.asarray([[1] * 6 + [0, 0], [1] * 8], np.int64)
    np.testing.assert_allclose(m.logits(batch, mask)[0, :6], alone[0], atol=1e-5)


def test_eval_matches_training_validation_loss(tiny_bundle, chat_data, run_dir):
    r = infer.evaluate(tiny_bundle, chat_data / "valid.jsonl", adapter=run_dir)
    valid = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["valid_loss"]
    assert abs(r["loss"] - valid) < 1e-4
    assert r["perplexity"] == pytest.approx(np.exp(r["loss"]))
    base = infer.evaluate(tiny_bundle, chat_data / "valid.jsonl")
    assert r["loss"] < base["loss"]
    assert r["providers"] == ["CPUExecutionProvider"]


def test_generate_is_deterministic_and_sampling_is_seeded(tiny_bundle, run_dir):
    m = infer.Model.open(tiny_bundle, adapter=run_dir)
    a = infer.generate(tiny_bundle, "classify this ticket: my invoice is wrong", model=m, max_new_tokens=8)
    b = infer.generate(tiny_bundle, "classify this ticket: my invoice is wrong", model=m, max_new_tokens=8)
    assert a == b
    s1 = infer.generate(tiny_bundle, "hello", model=m, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    s2 = infer.generate(tiny_bundle, "hello", model=m, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert s1 == s2


def test_adapter_for_another_bundle_is_rejected_with_every_difference(tiny_bundle, run_dir, tmp_path):
    cfg, tensors = peft_io.load(run_dir)
    from edgetune.config import AdapterConfig

    bad = {k.replace("q_proj", "k_proj"): v[:, :2] if "lora_A" in k else v for k, v in tensors.items()}
    peft_io.save(tmp_path / "bad", {k: v for k, v in bad.items()}, AdapterConfig(rank=2, alpha=8, targets=("k_proj", "v_proj")), "x")
    with pytest.raises(BundleError) as e:
        infer.Model.open(tiny_bundle, adapter=tmp_path / "bad")
    msg = str(e.value)
    assert "does not fit bundle" in msg and "rank 2 != bundle rank 4" in msg
    assert "targets ['k_proj', 'v_proj'] != bundle targets ['q_proj', 'v_proj']" in msg
    assert "has no place in this bundle" in msg


def test_missing_bundle_and_adapter(tmp_path, tiny_bundle):
    with pytest.raises(BundleError, match="neither an edgetune bundle, a merged model nor an app directory"):
        infer.Model.open(tmp_path)
    with pytest.raises(BundleError, match="is not a PEFT adapter folder"):
        infer.Model.open(tiny_bundle, adapter=tmp_path)
    with pytest.raises(DataError, match="has no test.jsonl"):
        infer.evaluate(tiny_bundle, tmp_path)
