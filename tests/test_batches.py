"""Batch files and the optimizer graph are all an app needs to train: replaying a file written by
`edgetune tokenize` with onnxruntime calls alone (no edgetune code in the loop) takes the steps
`edgetune train` takes."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch_reference

from edgetune.device import batches
from edgetune.formats.errors import DataError

OPTS = ["--steps", "6", "--batch-size", "3", "--lr", "1e-2", "--warmup", "2", "--schedule", "cosine",
        "--max-batch-tokens", "64", "--seed", "5"]


def _et(*args):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True)


def _replay(bundle, path):
    """What an app does, in onnxruntime calls: for each step run the training graph on each chunk,
    add up the gradients, then run optimizer.onnx."""
    import onnxruntime as ort
    from safetensors.numpy import load_file

    meta = json.loads(open(bundle / "edgetune.json").read())
    info, tensors = batches.read(path, meta["base_id"])
    so = ort.SessionOptions()
    # The settings of edgetune's own sessions (edgetune/device/runner.py): the same kernels, the same sums.
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    so.add_session_config_entry("session.disable_prepacking", "1")
    train = ort.InferenceSession(str(bundle / "train.onnx"), so, providers=["CPUExecutionProvider"])
    opt = ort.InferenceSession(str(bundle / "optimizer.onnx"), providers=["CPUExecutionProvider"])
    params = load_file(str(bundle / "adapter_init.safetensors"))
    names = meta["trainable"]
    m = {n: np.zeros_like(params[n]) for n in names}
    v = {n: np.zeros_like(params[n]) for n in names}
    sched = info["schedule"]
    losses = []
    for i in range(1, info["steps"] + 1):
        grads, loss = {n: 0.0 for n in names}, 0.0
        for j in range(info["chunks"][i - 1]):
            feed = {k: tensors[batches.name(i, j, k)] for k in ("input_ids", "attention_mask", "labels", "label_norm")}
            out = train.run(["loss"] + [n + "_grad" for n in names], {**feed, **{n: params[n] for n in names}})
            loss += float(out[0])
            for n, g in zip(names, out[1:]):
                grads[n] = grads[n] + g
        f32 = lambda x: np.array(x, np.float32)  # noqa: E731
        feed = {"step": f32(i), "base_lr": f32(sched["base_lr"]), "warmup_steps": f32(sched["warmup_steps"]),
                "total_steps": f32(sched["total_steps"]), "schedule": np.array(sched["schedule"], np.int64),
                "weight_decay": f32(sched["weight_decay"])}
        for n in names:
            feed.update({n: params[n], n + "_grad": grads[n], "exp_avg/" + n: m[n], "exp_avg_sq/" + n: v[n]})
        outs = [o.name for o in opt.get_outputs()]
        res = dict(zip(outs, opt.run(outs, feed)))
        for n in names:
            params[n], m[n], v[n] = res[n + "/updated"], res[f"exp_avg/{n}/updated"], res[f"exp_avg_sq/{n}/updated"]
        losses.append(loss)
    return losses, params


def test_an_app_replaying_the_batch_file_trains_like_edgetune_train(tiny_bundle, chat_data, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_KERNELS", "plain")  # the app above runs train.onnx
    p = _et("tokenize", chat_data, "--bundle", tiny_bundle, "--out", tmp_path / "b.safetensors", *OPTS, "--json")
    assert p.returncode == 0, p.stderr
    meta = json.loads(p.stdout)
    assert meta["steps"] == 6 and len(meta["chunks"]) == 6 and max(meta["chunks"]) > 1  # chunked steps included
    run = _et("train", tiny_bundle, "--data", chat_data, "--out", tmp_path / "run", *OPTS, "--no-progress")
    assert run.returncode == 0, run.stderr
    ours, params = _replay(tiny_bundle, tmp_path / "b.safetensors")
    np.testing.assert_allclose(ours, torch_reference.edgetune_losses(tmp_path / "run"), rtol=1e-6, atol=1e-7)
    from edgetune.formats.run import ADAPTER_FILE, latest_checkpoint, read_tensors

    want = read_tensors(latest_checkpoint(tmp_path / "run") / ADAPTER_FILE)
    assert set(want) == set(params)
    worst = max(float(np.abs(params[k] - want[k]).max() / np.abs(want[k]).max()) for k in want)
    assert worst < 1e-6, worst


def test_a_packed_batch_file_trains_like_the_padded_one(tiny_bundle, chat_data, tmp_path, monkeypatch):
    """Rows that hold several records (attention_mask numbering them) take the padded file's steps."""
    monkeypatch.setenv("EDGETUNE_KERNELS", "plain")
    got = {}
    for packing in ("off", "on"):
        out = tmp_path / f"{packing}.safetensors"
        p = _et("tokenize", chat_data, "--bundle", tiny_bundle, "--out", out, *OPTS, "--max-batch-tokens", "128",
                "--packing", packing, "--json")
        assert p.returncode == 0, p.stderr
        meta = json.loads(p.stdout)
        assert meta["packed"] is (packing == "on")
        info, tensors = batches.read(out, json.loads((tiny_bundle / "edgetune.json").read_text())["base_id"])
        masks = [tensors[batches.name(i, j, "attention_mask")] for i in range(1, info["steps"] + 1)
                 for j in range(info["chunks"][i - 1])]
        assert (max(int(m.max()) for m in masks) > 1) is (packing == "on")
        got[packing] = _replay(tiny_bundle, out)
    np.testing.assert_allclose(got["on"][0], got["off"][0], rtol=1e-5)
    for k, want in got["off"][1].items():
        assert float(np.abs(got["on"][1][k] - want).max() / np.abs(want).max()) < 1e-4, k


def test_a_batch_file_for_another_bundle_or_damaged_is_refused(tiny_bundle, dora_bundle, chat_data, tmp_path):
    out = tmp_path / "b.safetensors"
    assert _et("tokenize", chat_data, "--bundle", tiny_bundle, "--out", out, "--steps", "2").returncode == 0
    other = json.loads((dora_bundle / "edgetune.json").read_text())["base_id"]
    mine = json.loads((tiny_bundle / "edgetune.json").read_text())["base_id"]
    with pytest.raises(DataError, match=r"was tokenized for another bundle .* tokenize the data again"):
        batches.read(out, other if other != mine else "0" * 64)
    out.write_bytes(out.read_bytes()[:100])
    with pytest.raises(DataError, match=r"is not a readable batch file .* write it again with edgetune tokenize"):
        batches.read(out)
    with pytest.raises(DataError, match="batch file not found"):
        batches.read(tmp_path / "none.safetensors")
