"""Sequence packing: several records share a row, each attending only to itself with its own
positions, so the loss and gradients are the unpacked batch's with no padding between records."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgetune.device import data as D
from edgetune.formats.errors import ConfigError


def _batch(lengths, width=None, seed=0):
    rng = np.random.default_rng(seed)
    width = width or max(lengths)
    ids = np.full((len(lengths), width), 7, np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, D.IGNORE)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(10, 100, n)
        mask[i, :n] = 1
        labels[i, n // 2:n] = rng.integers(10, 100, n - n // 2)
    return D.Batch(ids, mask, labels)


@pytest.mark.parametrize("lengths,max_tokens", [([5, 9, 3, 12, 1, 7], 16), ([40, 40, 40], 64), ([100], 32),
                                                ([8, 8, 8, 8], 0), ([3, 250, 17, 64, 64, 9, 1, 120], 256)])
def test_every_record_lands_once_whole_and_numbered(lengths, max_tokens):
    b = _batch(lengths)
    out = D.pack(b, max_tokens)
    cap = max(max(lengths), max_tokens or 1024)
    found = []
    for c in out:
        assert c.input_ids.shape == c.attention_mask.shape == c.labels.shape
        if max_tokens:
            assert c.input_ids.size <= max(max_tokens, c.input_ids.shape[1])
        for r in range(c.input_ids.shape[0]):
            seg = c.attention_mask[r]
            assert (seg > 0).sum() <= cap
            n_seg = seg.max()
            # segments are numbered 1..n in order, contiguous, then padding
            assert list(seg[seg > 0]) == sorted(seg[seg > 0])
            assert set(seg[seg > 0]) == set(range(1, n_seg + 1))
            assert (seg[(seg > 0).sum():] == 0).all()
            for s in range(1, n_seg + 1):
                found.append((tuple(c.input_ids[r, seg == s]), tuple(c.labels[r, seg == s])))
    want = [(tuple(b.input_ids[i, :n]), tuple(b.labels[i, :n])) for i, n in enumerate(lengths)]
    assert sorted(found) == sorted(want)
    assert sum(c.n_tokens for c in out) == b.n_tokens and sum(c.n_labels for c in out) == b.n_labels
    # fewer padded tokens than the padded batch, never more
    assert sum(c.input_ids.size for c in out) <= max(b.input_ids.size, cap)


def test_rows_come_out_about_equally_long():
    out = D.pack(_batch([170, 160, 150, 180, 175, 165, 172, 158]), 1024)
    rows = [(c.attention_mask[r] > 0).sum() for c in out for r in range(c.input_ids.shape[0])]
    assert len(rows) == 2 and max(rows) - min(rows) <= 180, rows


def _family(family: str, out: Path, **extra) -> Path:
    import test_architectures as A

    saved = dict(A.FAMILIES[family])
    A.FAMILIES[family] = {**saved, **extra}
    try:
        return A.make_family(family, out)
    finally:
        A.FAMILIES[family] = saved


def _train(bundle, data, out, packing, monkeypatch, kernels="auto", steps=10):
    import torch_reference

    from edgetune.device import trainer

    monkeypatch.setenv("EDGETUNE_KERNELS", kernels)
    run = trainer.train(bundle, data, out, steps=steps, lr=1e-2, batch_size=4, seed=0, schedule="constant",
                        packing=packing, max_batch_tokens=128, progress=False, log=lambda s: None)
    manifest = json.loads((run.out / "run.json").read_text())
    from edgetune.formats import peft_io

    return torch_reference.edgetune_losses(run.out), manifest, peft_io.load(run.out / "adapter")[1]


CASES = [("llama", {}, "fused"), ("llama", {}, "plain"), ("qwen2", {}, "fused"),
         # sliding windows shorter than the records: the window applies inside each packed record
         ("mistral", {"sliding_window": 8}, "fused"), ("gemma2", {"sliding_window": 8}, "plain"),
         ("phi3", {"sliding_window": 8}, "fused")]


@pytest.mark.workstation
@pytest.mark.parametrize("family,extra,kernels", CASES, ids=[f"{f}-{k}" for f, _, k in CASES])
def test_packed_training_equals_unpacked(family, extra, kernels, chat_data, tmp_path, monkeypatch):
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    model = _family(family, tmp_path / "model", **extra)
    bundle = export(str(model), tmp_path / "bundle", AdapterConfig(rank=4, alpha=8, targets=("all-linear",)))
    assert json.loads((bundle / "edgetune.json").read_text())["packing"]["version"] == 1
    flat, fm, fa = _train(bundle, chat_data, tmp_path / "flat", "off", monkeypatch, kernels)
    packed, pm, pa = _train(bundle, chat_data, tmp_path / "packed", "on", monkeypatch, kernels)
    assert fm["packing"] is False and pm["packing"] is True
    assert pm["kernels"].startswith("fused (") == (kernels == "fused")
    np.testing.assert_allclose(packed, flat, rtol=0, atol=1e-5)
    for n in fa:
        np.testing.assert_allclose(pa[n], fa[n], rtol=0, atol=1e-4 * max(1.0, float(np.abs(fa[n]).max())))


@pytest.mark.workstation
@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_loss_equals_transformers(family, tmp_path):
    """The exported graph's masks (built from segment ids) give transformers' own loss on records
    longer than the window, packed or not."""
    import onnxruntime as ort
    import torch

    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export, load_model

    model = _family(family, tmp_path / "model", sliding_window=6)
    bundle = export(str(model), tmp_path / "bundle", AdapterConfig(rank=4, alpha=8, targets=("q_proj",)))
    hf, _ = load_model(model)
    b = _batch([23, 9, 30], seed=3)
    vocab = hf.config.vocab_size
    b = D.Batch(b.input_ids % vocab, b.attention_mask, np.where(b.labels >= 0, b.labels % vocab, b.labels))
    with torch.no_grad():
        want = 0.0
        for i in range(3):
            n = int(b.attention_mask[i].sum())
            logits = hf(input_ids=torch.tensor(b.input_ids[i:i + 1, :n])).logits[0]
            lab = torch.tensor(b.labels[i, :n])
            want += float(torch.nn.functional.cross_entropy(logits, lab, ignore_index=-100, reduction="sum"))
    sess = ort.InferenceSession(str(bundle / "eval.onnx"), providers=["CPUExecutionProvider"])
    from safetensors.numpy import load_file

    adapter = load_file(str(bundle / "adapter_init.safetensors"))
    names = {i.name for i in sess.get_inputs()}
    for rows in ([b], D.pack(b, 64)):
        got = 0.0
        for c in rows:
            feed = {"input_ids": c.input_ids, "attention_mask": c.attention_mask, "labels": c.labels,
                    "label_norm": np.asarray(1.0, np.float32), **{k: v for k, v in adapter.items() if k in names}}
            got += float(sess.run(["loss"], feed)[0])
        assert got == pytest.approx(want, rel=1e-5), (rows is not None, got, want)


def test_auto_packs_only_where_the_fused_attention_runs(tiny_bundle, chat_data, tmp_path, monkeypatch):
    from edgetune.device.trainer import Trainer
    from edgetune.formats.config import TrainConfig

    monkeypatch.setenv("EDGETUNE_KERNELS", "plain")
    assert Trainer(tiny_bundle, tmp_path / "a", TrainConfig(steps=1), progress=False, log=lambda s: None).packing is False
    monkeypatch.setenv("EDGETUNE_KERNELS", "auto")
    t = Trainer(tiny_bundle, tmp_path / "b", TrainConfig(steps=1), progress=False, log=lambda s: None)
    assert t.packing is t.runner.fused_attention
    from edgetune.device import fused as kernels

    if kernels.library().ok:  # the fused graphs run here: their attention (AttentionT) packs
        assert t.runner.kernel_info.startswith("fused") and t.packing is True
    assert Trainer(tiny_bundle, tmp_path / "c", TrainConfig(steps=1, packing="off"), progress=False,
                   log=lambda s: None).packing is False


def test_a_bundle_from_before_packing_never_packs(tiny_bundle, tmp_path):
    """Its graphs read attention_mask as 0/1: segment ids would silently join the records."""
    import shutil

    from edgetune.device.trainer import Trainer
    from edgetune.formats import atomic as _io
    from edgetune.formats.config import TrainConfig

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    m = json.loads((old / "edgetune.json").read_text())
    m.pop("packing", None)
    m.pop("sha256", None)
    _io.write_json(old / "edgetune.json", _io.seal(m))
    assert Trainer(old, tmp_path / "a", TrainConfig(steps=1), progress=False, log=lambda s: None).packing is False
    with pytest.raises(ConfigError, match="exported before sequence packing.*export it again"):
        Trainer(old, tmp_path / "b", TrainConfig(steps=1, packing="on"), progress=False, log=lambda s: None)
    assert not (tmp_path / "b").exists()


def test_the_cli_takes_packing_and_refuses_a_wrong_value(tiny_bundle, chat_data, tmp_path):
    from click.testing import CliRunner

    from edgetune.cli import main

    r = CliRunner().invoke(main, ["train", str(tiny_bundle), "--data", str(chat_data), "--out", str(tmp_path / "r"),
                                  "--steps", "2", "--packing", "on", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "run.json").read_text())["packing"] is True
    r = CliRunner().invoke(main, ["train", str(tiny_bundle), "--data", str(chat_data), "--out", str(tmp_path / "s"),
                                  "--packing", "sometimes"])
    assert r.exit_code == 2 and "sometimes" in r.output
