"""Packaged adapters, checked in the runtime apps use (onnxruntime >= 1.20 in its own env)."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgetune.app import pack
from edgetune.app.verify import verify
from edgetune.device import infer, trainer
from edgetune.formats import peft_io
from edgetune.formats.appdir import read_adapter
from edgetune.formats.config import TrainConfig
from edgetune.formats.errors import BundleError, ConfigError

ROOT = Path(__file__).resolve().parent.parent
IDS = np.asarray([[5, 9, 17, 33, 41, 50, 61, 70, 80, 90]], np.int64)


@pytest.fixture(scope="module")
def runs(tiny_bundle, chat_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    kw = dict(steps=10, lr=5e-2, batch_size=4, progress=False, log=lambda s: None)
    return (trainer.train(tiny_bundle, chat_data, root / "tickets", **kw).out,
            trainer.train(tiny_bundle, chat_data, root / "other", seed=5, **kw).out)


def test_adapter_file_round_trip(tmp_path):
    params = [("a.lora_A", np.arange(6, dtype=np.float16).reshape(2, 3)), ("b", np.ones((1, 4), np.float32))]
    pack.write_adapter(tmp_path / "x.onnx_adapter", params, adapter_version=3)
    back = read_adapter(tmp_path / "x.onnx_adapter")
    assert back["format_version"] == 1 and back["adapter_version"] == 3
    for name, arr in params:
        np.testing.assert_array_equal(back["parameters"][name], arr)
        assert back["parameters"][name].dtype == arr.dtype


def test_pack_writes_a_small_verified_app_dir(tiny_bundle, runs, tmp_path):
    r = pack.pack(runs[0], tiny_bundle, tmp_path / "app", name="tickets")
    app = tmp_path / "app"
    for f in ("base.onnx", "base.onnx.data", "tickets.onnx_adapter", "manifest.json", "tokenizer.json"):
        assert (app / f).is_file(), f
    m = json.loads((app / "manifest.json").read_text())
    entry = m["adapters"]["tickets"]
    assert entry["dtype"] == "float16" and entry["rank"] == 4 and entry["target_modules"] == ["q_proj", "v_proj"]
    assert set(m) >= {"format", "base_sha256", "tokenizer_sha256", "edgetune_version", "base_inputs"}
    assert verify(app)["tensors_checked"] == 8
    assert r["bytes"] < 64 * 1024


def test_edgetune_logits_equal_base_plus_adapter_in_pack_base(tiny_bundle, runs, tmp_path):
    # The packed base with the adapter fed as inputs equals edgetune's own inference.
    import onnxruntime as ort

    pack.pack(runs[0], tiny_bundle, tmp_path / "app", name="tickets", dtype="float32")
    app = tmp_path / "app"
    params = read_adapter(app / "tickets.onnx_adapter")["parameters"]
    sess = ort.InferenceSession(str(app / "base.onnx"), providers=["CPUExecutionProvider"])
    m = infer.Model.open(tiny_bundle, adapter=runs[0])
    feed = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "position_ids": np.arange(10)[None], **m.empty_past(1)}
    np.testing.assert_allclose(sess.run(["logits"], {**feed, **params})[0], m.logits(IDS, np.ones_like(IDS)), atol=2e-5)
    np.testing.assert_allclose(sess.run(["logits"], feed)[0], infer.Model.open(tiny_bundle).logits(IDS, np.ones_like(IDS)),
                               atol=2e-5)


@pytest.mark.parametrize("model_file", ["base.onnx", "base.ort"])
def test_real_consumer_loads_and_switches_adapters(tiny_bundle, runs, tmp_path, ort_env, model_file):
    app = tmp_path / "app"
    pack.pack(runs[0], tiny_bundle, app, name="tickets", ort_format=model_file == "base.ort")
    pack.pack(runs[1], tiny_bundle, app, name="other")
    assert verify(app)["adapters"] == ["other", "tickets"]
    np.save(tmp_path / "ids.npy", IDS)
    p = subprocess.run([str(ort_env), str(ROOT / "tests" / "app_consumer.py"), str(app), str(tmp_path / "ids.npy"),
                        str(tmp_path / "out.npz"), model_file], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ""})
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert tuple(int(x) for x in info["onnxruntime"].split(".")[:2]) >= (1, 20)
    got = np.load(tmp_path / "out.npz")
    base = infer.Model.open(tiny_bundle).logits(IDS, np.ones_like(IDS))
    tol = dict(atol=2e-3, rtol=2e-3)  # float16 adapter weights
    np.testing.assert_allclose(got["base"], base, atol=1e-4)
    np.testing.assert_allclose(got["base_again"], base, atol=1e-4)
    for name, run in (("tickets", runs[0]), ("other", runs[1])):
        np.testing.assert_allclose(got[name], infer.Model.open(tiny_bundle, adapter=run).logits(IDS, np.ones_like(IDS)), **tol)
    assert np.abs(got["tickets"] - got["other"]).max() > 1e-3


def test_adapter_for_another_base_is_rejected_naming_both(tiny_model, tiny_bundle, runs, tmp_path):
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    pack.pack(runs[0], tiny_bundle, tmp_path / "app", name="tickets")
    other = export(str(tiny_model), tmp_path / "ob", AdapterConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=9))
    with pytest.raises(BundleError) as e:
        pack.pack(runs[0], other, tmp_path / "app", name="again")
    assert "holds a base for" in str(e.value) and "pack it into another directory" in str(e.value)
    pack.pack(runs[1], tiny_bundle, tmp_path / "app2", name="x")
    # Make app2's base a different model file, then check app's adapters against it.
    (tmp_path / "app2" / "base.onnx").write_bytes((tmp_path / "app2" / "base.onnx").read_bytes() + b"\0")
    with pytest.raises(BundleError) as e:
        verify(tmp_path / "app", base=tmp_path / "app2" / "base.onnx")
    msg = str(e.value)
    assert "these adapters were made for" in msg and f"{tmp_path / 'app2' / 'base.onnx'} is" in msg


def test_verify_reports_every_problem(tiny_bundle, runs, tmp_path):
    app = tmp_path / "app"
    pack.pack(runs[0], tiny_bundle, app, name="tickets")
    (app / "tokenizer.json").write_text("{}")
    (app / "tickets.onnx_adapter").write_bytes(b"garbage")
    with pytest.raises(BundleError) as e:
        verify(app)
    assert "tokenizer.json does not match its sha256" in str(e.value)
    assert "adapter tickets: tickets.onnx_adapter does not match its sha256" in str(e.value)


def test_pack_rejects_mismatched_adapter(tiny_bundle, runs, tmp_path):
    from edgetune.formats.config import AdapterConfig

    cfg, tensors = peft_io.load(runs[0])
    peft_io.save(tmp_path / "bad", {k: v[:2] if ".lora_A." in k else v for k, v in tensors.items()},
                 AdapterConfig(rank=2, alpha=8, targets=("q_proj", "v_proj")), "x")
    with pytest.raises(BundleError, match="does not fit bundle"):
        pack.pack(tmp_path / "bad", tiny_bundle, tmp_path / "app")
    assert not (tmp_path / "app").exists()


def test_peft_round_trip_is_bit_for_bit_and_training_continues(tiny_bundle, runs, chat_data, tmp_path):
    from edgetune.device import runner

    src = runs[0] / "adapter"
    run = peft_io.import_peft(src, tiny_bundle, tmp_path / "imported")
    a, b = peft_io.load(src)[1], peft_io.load(run)[1]
    assert set(a) == set(b)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes()
    # What --resume trains from is the checkpoint: it holds the imported tensors, bit for bit.
    ck = runner.read_tensors(run / "checkpoints" / "step-000000" / runner.ADAPTER_FILE)
    names = json.loads((tiny_bundle / "edgetune.json").read_text())["trainable"]
    for g in names:
        assert ck[g].tobytes() == a[peft_io.to_peft_name(g)].tobytes(), g
    r1 = infer.evaluate(tiny_bundle, chat_data / "test.jsonl", adapter=run)
    r0 = infer.evaluate(tiny_bundle, chat_data / "test.jsonl", adapter=runs[0])
    assert r0["loss"] == r1["loss"]
    kw = dict(steps=5, lr=5e-2, batch_size=4, progress=False, log=lambda s: None)
    cont = trainer.train(tiny_bundle, chat_data, run, resume=True, **kw)
    assert cont.steps == 5
    # The same optimization as a fresh run started from those tensors: the same first loss.
    fresh = trainer.Trainer(tiny_bundle, tmp_path / "fresh", TrainConfig(steps=5, lr=5e-2, batch_size=4),
                            progress=False, log=lambda s: None)
    fresh.set_adapter({g: a[peft_io.to_peft_name(g)] for g in names})
    fresh.fit(*fresh.load_data(chat_data))
    def first_loss(r):
        return json.loads((r / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert abs(first_loss(run) - first_loss(tmp_path / "fresh")) < 1e-5
    with pytest.raises(ConfigError, match="already exists"):
        peft_io.import_peft(src, tiny_bundle, tmp_path / "imported")
