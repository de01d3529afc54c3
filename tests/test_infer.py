import json

import numpy as np
import pytest

from edgetune.device import infer, trainer
from edgetune.formats import peft_io
from edgetune.formats.errors import BundleError, DataError


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


def _softmax(z):
    p = np.exp(z - z.max())
    return p / p.sum()


def test_sampling_follows_temperature_top_k_and_top_p_as_defined():
    z = np.array([2.0, 1.5, 1.0, 0.0, -1.0, -3.0], np.float32)
    n = 40000

    def freq(**kw):
        rng = np.random.default_rng(0)
        s = infer.Sampling(**kw)
        return np.bincount([infer._pick(z, s, rng) for _ in range(n)], minlength=len(z)) / n

    tol = 4 * np.sqrt(0.25 / n)  # four standard errors of a frequency
    for t in (1.0, 0.5, 2.0):
        assert np.abs(freq(temperature=t) - _softmax(z.astype(np.float64) / t)).max() < tol, t
    # top-k keeps the k most likely tokens, renormalised
    want = np.zeros(len(z))
    want[:2] = _softmax(z[:2].astype(np.float64))
    assert np.abs(freq(temperature=1.0, top_k=2) - want).max() < tol
    # top-p keeps the smallest set of most likely tokens whose probability reaches p
    p = _softmax(z.astype(np.float64))
    k = int(np.searchsorted(np.cumsum(p), 0.8) + 1)  # p = .41 .25 .15 .06 ...: the first three reach 0.8
    want = np.zeros(len(z))
    want[:k] = p[:k] / p[:k].sum()
    got = freq(temperature=1.0, top_p=0.8)
    assert k == 3 and (got[k:] == 0).all() and np.abs(got - want).max() < tol
    # a temperature near zero and top-k 1 are greedy
    assert freq(temperature=1e-4)[0] == 1.0 and freq(temperature=3.0, top_k=1)[0] == 1.0


def test_sampled_generation_matches_the_models_distribution(tiny_bundle, run_dir):
    m = infer.Model.open(tiny_bundle, adapter=run_dir)
    prompt = "classify this ticket: my invoice is wrong"
    greedy = infer.generate(tiny_bundle, prompt, model=m, max_new_tokens=8)
    assert infer.generate(tiny_bundle, prompt, model=m, max_new_tokens=8, temperature=1.0, top_k=1, seed=5) == greedy
    assert infer.generate(tiny_bundle, prompt, model=m, max_new_tokens=8, temperature=1e-6, seed=5) == greedy
    # first tokens sampled with different seeds follow the softmax of the model's logits
    ids = m.tok.encode(m.tok.render([{"role": "user", "content": prompt}], add_generation_prompt=True))
    arr = np.asarray([ids], np.int64)
    z = m.logits(arr, np.ones_like(arr))[0, -1].astype(np.float64)
    # the temperature at which the tiny model's top token has about a third of the mass
    t = min((0.02 * 1.25 ** i for i in range(40)), key=lambda t: abs(_softmax(z / t).max() - 0.35))
    p = _softmax(z / t)
    assert 0.25 < p.max() < 0.45
    n = 1500
    stop = sorted(m.tok.stop_ids | {m.tok.eos_id})
    # a stop token ends the generator without a token: count those draws as one "stop" outcome
    firsts = [next(infer.generate_ids(m, ids, infer.Sampling(max_new_tokens=1, temperature=t, seed=s)), -1)
              for s in range(n)]
    got = np.bincount([f if f >= 0 else stop[0] for f in firsts], minlength=len(p)) / n
    p[stop[0]] = p[stop].sum()
    p[stop[1:]] = 0.0
    top = np.argsort(-p)[:5]
    assert np.abs(got[top] - p[top]).max() < 4 * np.sqrt(0.25 / n), (got[top], p[top])
    assert len(set(firsts)) > 1


def test_adapter_for_another_bundle_is_rejected_with_every_difference(tiny_bundle, run_dir, tmp_path):
    cfg, tensors = peft_io.load(run_dir)
    from edgetune.formats.config import AdapterConfig

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
