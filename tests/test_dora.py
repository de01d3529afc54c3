"""DoRA end to end on a tiny model: the same training as PyTorch + PEFT, and every consumer
of an adapter (inference, PEFT, merging) agreeing with PEFT."""
import json

import numpy as np
import pytest

from edgetune.app.verify import verify
from edgetune.device import data, dora, runner, trainer
from edgetune.device.tokenizer import ChatTokenizer
from edgetune.formats import peft_io
from edgetune.formats.appdir import read_adapter
from edgetune.formats.config import AdapterConfig
from edgetune.formats.errors import ConfigError

torch = pytest.importorskip("torch")
CFG = AdapterConfig(method="dora", rank=4, alpha=8, targets=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def dora_run(dora_bundle, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dora-run") / "run"
    trainer.train(dora_bundle, chat_data, out, steps=10, lr=1e-2, batch_size=4, seed=0, schedule="constant",
                  progress=False, log=lambda s: None)
    return out


def _torch_logits(model_dir, adapter, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    model = PeftModel.from_pretrained(base, adapter).eval() if adapter else base
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


IDS = np.asarray([list(range(5, 25))], np.int64)


def test_row_norms_match_the_full_matrix():
    rng = np.random.default_rng(0)
    w, a, b = rng.standard_normal((30, 20)), rng.standard_normal((3, 20)), rng.standard_normal((30, 3))
    want = np.linalg.norm(w + 0.7 * b @ a, axis=1)
    np.testing.assert_allclose(dora.row_norms(w.astype(np.float32), a, b, 0.7), want, rtol=1e-5)


def test_bundle_takes_norms_as_inputs(dora_bundle):
    m = json.loads((dora_bundle / "edgetune.json").read_text())
    mods = dora.modules(m["trainable"])
    assert len(mods) == 4 and len(m["trainable"]) == 12  # A, B and magnitude per layer
    import onnx

    train_inputs = [i.name for i in onnx.load(str(dora_bundle / "train.onnx"), load_external_data=False).graph.input]
    assert [mm.norm_input for mm in mods] == [n for n in train_inputs if n.startswith(dora.NORM_PREFIX)]
    ops = {n.op_type for n in onnx.load(str(dora_bundle / "train.onnx"), load_external_data=False).graph.node}
    assert "ReduceL2" not in ops  # the norm is computed outside the graph


def test_training_matches_pytorch_peft(tiny_model, dora_bundle, chat_data, dora_run):
    """Same initial adapter, batches and AdamW: PEFT's DoRA (norm detached) in torch, and ours."""
    from edgetune.workstation.export import inject_adapter, load_model

    names = json.loads((dora_bundle / "edgetune.json").read_text())["trainable"]
    saved = runner.read_tensors(dora_bundle / "adapter_init.safetensors")
    init = {n: saved[n] for n in names}
    pm = inject_adapter(load_model(tiny_model)[0], CFG)
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for n, v in init.items():
            params[n].copy_(torch.from_numpy(v))
    opt = torch.optim.AdamW([params[n] for n in init], lr=1e-2)
    tok = ChatTokenizer.from_dir(dora_bundle)
    ds = data.load_dataset(chat_data / "train.jsonl", tok, 512)
    batches = data.epoch_batches(ds, 4, 0, 0, tok.pad_id) + data.epoch_batches(ds, 4, 0, 1, tok.pad_id)
    torch_losses = []
    pm.train()
    for b in batches[:10]:
        logits = pm(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.attention_mask)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.from_numpy(b.labels).reshape(-1), ignore_index=-100,
                                                 reduction="sum") / b.n_labels
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch_losses.append(loss.item())
    ours_losses = [json.loads(line)["loss"] for line in (dora_run / "metrics.jsonl").read_text().splitlines()
                   if "loss" in json.loads(line)]
    np.testing.assert_allclose(ours_losses, torch_losses, rtol=0, atol=1e-5)
    ours = peft_io.load(dora_run)[1]
    assert any(k.endswith(".lora_magnitude_vector") for k in ours)  # PEFT's file layout
    for n in init:
        theirs = params[n].detach().numpy()
        rel = np.abs(ours[peft_io.to_peft_name(n)] - theirs).max() / np.abs(theirs).max()
        assert rel < 1e-4, (n, rel)
        if ".lora_B." in n or "magnitude" in n:
            assert not np.allclose(theirs, init[n])  # the weights did move


def test_inference_matches_peft_with_and_without_adapter(tiny_model, dora_bundle, dora_run):
    from edgetune.device.infer import Model

    ours = Model.open(dora_bundle, adapter=dora_run).logits(IDS, np.ones_like(IDS))
    np.testing.assert_allclose(ours, _torch_logits(tiny_model, dora_run / "adapter", IDS), atol=1e-5)
    base = Model.open(dora_bundle).logits(IDS, np.ones_like(IDS))
    np.testing.assert_allclose(base, _torch_logits(tiny_model, None, IDS), atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_merged_model_matches_peft(fmt, tiny_model, dora_bundle, dora_run, tmp_path):
    from edgetune.app.merge import merge

    merge(dora_bundle, [dora_run], tmp_path / "m", fmt=fmt)
    want = _torch_logits(tiny_model, dora_run / "adapter", IDS)
    if fmt == "onnx":
        import onnx

        from edgetune.device.infer import Model

        g = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False).graph
        assert not [i.name for i in g.input if "lora" in i.name or i.name.startswith(dora.NORM_PREFIX)]
        got = Model.open(tmp_path / "m").logits(IDS, np.ones_like(IDS))
    else:
        got = _torch_logits(tmp_path / "m", None, IDS)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_blends_are_refused_clearly(dora_bundle, dora_run, tmp_path):
    from edgetune.app.merge import merge

    with pytest.raises(ConfigError, match="DoRA adapters merge one at a time"):
        merge(dora_bundle, [dora_run, dora_run], tmp_path / "m", weights=[0.5, 0.5])
    assert not (tmp_path / "m").exists()


def test_packed_adapter_runs_in_the_app_runtime(tiny_model, dora_bundle, dora_run, tmp_path, ort_env):
    """The app base takes DoRA's norms as adapter inputs; the adapter file carries them."""
    import os
    import subprocess

    from conftest import ROOT

    from edgetune.app import pack
    from edgetune.device.infer import Model

    app = tmp_path / "app"
    pack.pack(dora_run, dora_bundle, app, name="dora")
    assert verify(app)["tensors_checked"] == 16  # A, B, magnitude and norm for 4 layers
    params = read_adapter(app / "dora.onnx_adapter")["parameters"]
    assert sum(k.startswith(dora.NORM_PREFIX) for k in params) == 4
    np.save(tmp_path / "ids.npy", IDS)
    p = subprocess.run([str(ort_env), str(ROOT / "tests" / "app_consumer.py"), str(app), str(tmp_path / "ids.npy"),
                        str(tmp_path / "out.npz")], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert p.returncode == 0, p.stderr
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(got["base"], _torch_logits(tiny_model, None, IDS), atol=1e-4)
    want = Model.open(dora_bundle, adapter=dora_run).logits(IDS, np.ones_like(IDS))
    np.testing.assert_allclose(got["dora"], want, atol=2e-3, rtol=2e-3)  # float16 adapter
    assert np.abs(got["dora"] - got["base"]).max() > 1e-2


def test_resume_continues_a_dora_run(dora_bundle, chat_data, tmp_path):
    """Norms are recomputed from the restored weights: a resumed run ends where an unbroken one does."""
    kw = dict(lr=1e-2, batch_size=4, seed=0, schedule="constant", progress=False, log=lambda s: None)
    trainer.train(dora_bundle, chat_data, tmp_path / "full", steps=6, **kw)
    trainer.train(dora_bundle, chat_data, tmp_path / "part", steps=3, save_every=3, **kw)
    trainer.train(dora_bundle, chat_data, tmp_path / "part", steps=6, resume=True, **kw)
    a, b = peft_io.load(tmp_path / "full")[1], peft_io.load(tmp_path / "part")[1]
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_peft_dora_adapter_imports_and_runs(tiny_model, dora_bundle, tmp_path):
    """A DoRA adapter saved by PEFT itself (file layout and all) imports and gives PEFT's logits."""
    from edgetune.device.infer import Model
    from edgetune.formats.peft_io import import_peft
    from edgetune.workstation.export import inject_adapter, load_model

    pm = inject_adapter(load_model(tiny_model)[0], CFG)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "peft")
    run = import_peft(tmp_path / "peft", dora_bundle, tmp_path / "run")
    ours = Model.open(dora_bundle, adapter=run).logits(IDS, np.ones_like(IDS))
    np.testing.assert_allclose(ours, _torch_logits(tiny_model, tmp_path / "peft", IDS), atol=1e-5)
