import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetune.device import trainer
from edgetune.formats import atomic as _io
from edgetune.formats import peft_io
from edgetune.formats.config import TrainConfig
from edgetune.formats.errors import BundleError, ConfigError, DataError, DeviceError, TrainingError

ROOT = Path(__file__).resolve().parent.parent


def run(bundle, data, out, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("lr", 3e-3)
    return trainer.train(bundle, data, out, progress=False, log=lambda s: None, **kw)


def adapter(out):
    return peft_io.load(out)[1]


def test_training_lowers_loss_and_writes_a_run(tiny_bundle, chat_data, tmp_path):
    out = tmp_path / "run"
    r = run(tiny_bundle, chat_data, out, steps=40, lr=5e-2, eval_every=20)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < 0.97 * losses[0]
    assert [m["step"] for m in metrics if "valid_loss" in m] == [20, 40]
    for f in ("run.json", "config.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
              "checkpoints/latest", "loss.png"):
        assert (out / f).is_file(), f
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["train_providers"] == ["CPUExecutionProvider"]
    cfg = json.loads((out / "config.json").read_text())
    assert list(cfg) == sorted(cfg) and cfg["steps"] == 40
    names = set(adapter(out))
    assert all(".default" not in n and ("lora_A" in n or "lora_B" in n) for n in names)
    assert r.valid_loss is not None


def test_same_seed_same_adapter(tiny_bundle, chat_data, tmp_path):
    a = run(tiny_bundle, chat_data, tmp_path / "a", steps=6)
    b = run(tiny_bundle, chat_data, tmp_path / "b", steps=6)
    for k, v in adapter(a.out).items():
        np.testing.assert_array_equal(v, adapter(b.out)[k])


def test_grad_accum_and_token_chunks_match_one_big_batch(tiny_bundle, chat_data, tmp_path):
    # Token-weighted normalisation: 2 x 4 accumulated, or 8 run in chunks, equals 8 at once.
    kw = dict(steps=3, schedule="constant")
    whole = run(tiny_bundle, chat_data, tmp_path / "a", batch_size=8, max_batch_tokens=0, **kw)
    chunked = run(tiny_bundle, chat_data, tmp_path / "b", batch_size=8, max_batch_tokens=16, **kw)
    a, b = adapter(whole.out), adapter(chunked.out)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert abs(whole.final_loss - chunked.final_loss) < 1e-5


def test_grad_accum_sums_micro_batches_like_one_batch_of_their_rows(tiny_bundle, chat_data, tmp_path):
    """--grad-accum 2: a step consumes two micro-batches, and its gradient (and loss) equals that of one
    batch holding both micro-batches' rows (token-weighted, so padding and row split do not matter)."""
    from edgetune.device import data as _data

    t = trainer.Trainer(tiny_bundle, tmp_path / "run", TrainConfig(batch_size=3, grad_accum=2, max_batch_tokens=0),
                        progress=False, log=lambda s: None)
    train, _ = t.load_data(chat_data)
    t._open()
    stream = t._micro_batches(train)
    group = [next(stream)[2] for _ in range(2)]
    loss_accum = t._step(group)
    accum = {k: v.copy() for k, v in t.runner.grads.items()}
    t.runner.zero_grad()
    rows = [_data.Example(b.input_ids[i][b.attention_mask[i] == 1], b.labels[i][b.attention_mask[i] == 1], "x")
            for b in group for i in range(len(b.input_ids))]
    loss_one = t._step([_data.collate(rows, t.tok.pad_id)])
    assert loss_one == pytest.approx(loss_accum, rel=1e-5)
    for k, g in t.runner.grads.items():
        np.testing.assert_allclose(g, accum[k], rtol=1e-4, atol=1e-6 * float(np.abs(accum[k]).max()))
    r = run(tiny_bundle, chat_data, tmp_path / "r", steps=2, batch_size=3, grad_accum=2)
    state = json.loads((latest_checkpoint_dir(r.out) / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["batch_index"] == 4  # two micro-batches per optimizer step


def latest_checkpoint_dir(out):
    from edgetune.formats.run import latest_checkpoint

    return latest_checkpoint(out)


def _train_cmd(bundle, data, out, *extra):
    return [sys.executable, "-m", "edgetune.cli", "train", str(bundle), "--data", str(data), "--out", str(out),
            "--batch-size", "4", "--lr", "3e-3", "--no-progress", *extra]


def test_resume_after_kill_reaches_the_same_adapter(tiny_bundle, chat_data, tmp_path):
    straight = run(tiny_bundle, chat_data, tmp_path / "straight", steps=12, save_every=4)
    env = {**os.environ, "EDGETUNE_FAULT": "step:7"}
    p = subprocess.run(_train_cmd(tiny_bundle, chat_data, tmp_path / "killed", "--steps", "12", "--save-every", "4"),
                       env=env, capture_output=True, text=True)
    assert p.returncode == 137, p.stderr
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step-000004"
    resumed = run(tiny_bundle, chat_data, tmp_path / "killed", steps=12, save_every=4, resume=True)
    assert resumed.steps == 12
    a, b = adapter(straight.out), adapter(resumed.out)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_a_checkpoint_without_its_optimizer_state_is_passed_over(tiny_bundle, chat_data, tmp_path):
    """AdamW's moments missing from the newest checkpoint (its checksum list rewritten to match, so only
    the state's step gives it away): the resume says so and continues from the previous checkpoint."""
    out = tmp_path / "run"
    run(tiny_bundle, chat_data, out, steps=8, save_every=4)
    ck = out / "checkpoints" / "step-000008"
    (ck / "optimizer.safetensors").unlink()
    sums = json.loads((ck / "checksums.json").read_text())
    sums.pop("optimizer.safetensors", None)
    (ck / "checksums.json").write_text(json.dumps(sums))
    logs: list[str] = []
    r = trainer.train(tiny_bundle, chat_data, out, steps=12, save_every=4, resume=True, lr=1e-2, batch_size=4,
                      progress=False, log=logs.append)
    said = "\n".join(logs)
    assert ("passed over damaged checkpoint(s): step-000008: optimizer.safetensors is missing (the optimizer's "
            "state after step 8); resuming from step-000004") in said, said
    assert r.steps == 12


def test_kill_during_checkpoint_write_keeps_previous(tiny_bundle, chat_data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "EDGETUNE_FAULT": "checkpoint-write:2"}
    p = subprocess.run(_train_cmd(tiny_bundle, chat_data, out, "--steps", "12", "--save-every", "4"),
                       env=env, capture_output=True, text=True)
    assert p.returncode == 137
    assert trainer.latest_checkpoint(out).name == "step-000004"
    assert sorted(d.name for d in (out / "checkpoints").iterdir() if not d.name.startswith(".")) == ["latest", "step-000004"]
    r = run(tiny_bundle, chat_data, out, steps=12, save_every=4, resume=True)
    assert r.steps == 12


def test_full_disk_during_checkpoint_keeps_previous(tiny_bundle, chat_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = _io.write_json
    calls = {"n": 0}

    def flaky(path, obj):
        if Path(path).name == "trainer_state.json":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
        return real(path, obj)

    monkeypatch.setattr(trainer._io, "write_json", flaky)
    with pytest.raises(TrainingError) as e:
        run(tiny_bundle, chat_data, out, steps=12, save_every=4)
    assert "could not write checkpoint step-000008 (No space left on device)" in str(e.value)
    assert "the previous checkpoint step-000004 is intact" in str(e.value)
    assert trainer.latest_checkpoint(out).name == "step-000004"
    monkeypatch.setattr(trainer._io, "write_json", real)
    assert run(tiny_bundle, chat_data, out, steps=12, save_every=4, resume=True).steps == 12


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_bundle, chat_data, tmp_path):
    out = tmp_path / "run"
    run(tiny_bundle, chat_data, out, steps=3, save_every=1)
    t = trainer.Trainer(tiny_bundle, out, TrainConfig(steps=6, batch_size=4, save_every=1), resume=True,
                        progress=False, log=lambda s: None)
    tr, va = t.load_data(chat_data)
    t._open()
    name = t.bundle.trainable[1]
    t.runner.params[name] = np.full(t.runner.params[name].shape, np.nan, np.float32)
    with pytest.raises(TrainingError) as e:
        t.fit(tr, va)
    assert str(e.value).startswith("loss is nan at step 4; training stopped before the update, "
                                   f"the last good checkpoint is {out / 'checkpoints' / 'step-000003'}")
    assert trainer.latest_checkpoint(out).name == "step-000003"
    good = run(tiny_bundle, chat_data, out, steps=6, resume=True)
    assert np.isfinite(good.final_loss)


def test_resume_with_a_different_bundle_is_refused(tiny_bundle, tiny_model, chat_data, tmp_path):
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    out = tmp_path / "run"
    run(tiny_bundle, chat_data, out, steps=2)
    other = export(str(tiny_model), tmp_path / "other", AdapterConfig(rank=2, alpha=4, targets=("q_proj",)))
    with pytest.raises(BundleError) as e:
        run(other, chat_data, out, steps=4, resume=True)
    assert "does not match the checkpoint" in str(e.value) and "adapter config" in str(e.value)


def test_existing_run_needs_resume(tiny_bundle, chat_data, tmp_path):
    out = tmp_path / "run"
    run(tiny_bundle, chat_data, out, steps=1)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        run(tiny_bundle, chat_data, out, steps=1)


def test_unknown_device_lists_the_known_ones(tiny_bundle, chat_data, tmp_path):
    with pytest.raises(DeviceError, match="unknown device 'fpga0'; known devices: .*vitisai.*; usable here: cpu"):
        run(tiny_bundle, chat_data, tmp_path / "r", steps=1, device="fpga0")
    with pytest.raises(DeviceError, match="needs VitisAIExecutionProvider, which this onnxruntime does not have"):
        run(tiny_bundle, chat_data, tmp_path / "r", steps=1, device="vitisai")


def test_missing_data_is_reported(tiny_bundle, tmp_path):
    with pytest.raises(DataError, match="data not found"):
        run(tiny_bundle, tmp_path / "nope.jsonl", tmp_path / "r", steps=1)
    assert not (tmp_path / "r").exists()


def test_training_never_imports_torch(tiny_bundle, chat_data, tmp_path):
    # A device has no torch: block its import and run the real CLI.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.') or name in ('transformers', 'peft'):\n"
        "            raise ImportError('torch is not installed on this device')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from edgetune.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        "    assert 'torch' not in sys.modules\n"
    )
    args = _train_cmd(tiny_bundle, chat_data, tmp_path / "run", "--steps", "3")[3:]
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    gen = [sys.executable, "-c", code, "generate", str(tiny_bundle), "--adapter", str(tmp_path / "run"), "-p", "hi", "-n", "4"]
    assert subprocess.run(gen, capture_output=True, text=True).returncode == 0


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup=2, schedule="linear")
    assert [round(trainer.lr_at(s, cfg, 6), 3) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    cos = TrainConfig(lr=1.0, schedule="cosine")
    assert trainer.lr_at(0, cos, 10) == 1.0 and abs(trainer.lr_at(5, cos, 10) - 0.5) < 1e-9


def test_a_graph_op_the_runtime_lacks_is_named(tiny_bundle, chat_data, tmp_path, monkeypatch):
    """A training graph of the old backend's kind (a training-only op) on this onnxruntime."""
    import shutil

    monkeypatch.setenv("EDGETUNE_KERNELS", "plain")  # the plain graph is the one edited below

    onnx = pytest.importorskip("onnx")
    from onnx import helper

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    proto = onnx.load(str(b / "train.onnx"), load_external_data=False)
    proto.graph.node.append(helper.make_node("SoftmaxGrad_13", ["loss", "loss"], ["extra"], domain="com.microsoft"))
    proto.graph.output.append(helper.make_tensor_value_info("extra", 1, None))
    onnx.save(proto, str(b / "train.onnx"))
    # As exported: the manifest records the graph as it now is.
    m = json.loads((b / "edgetune.json").read_text())
    m["files"]["train.onnx"] = _io.sha256_file(b / "train.onnx")
    m["sizes"]["train.onnx"] = (b / "train.onnx").stat().st_size
    (b / "edgetune.json").write_text(json.dumps(_io.seal(m)))
    with pytest.raises(DeviceError) as e:
        run(b, chat_data, tmp_path / "run", steps=1)
    msg = str(e.value)
    assert "uses com.microsoft:SoftmaxGrad_13, which this onnxruntime" in msg and "\n" not in msg
    assert "pip install -U onnxruntime" in msg and not (tmp_path / "run").exists()


def test_old_bundles_and_old_runs_get_the_fix(tiny_bundle, chat_data, tmp_path):
    import shutil

    b = tmp_path / "old"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "edgetune.json").read_text())
    (b / "edgetune.json").write_text(json.dumps({**{k: v for k, v in m.items() if k != "manifest_sha256"}, "format": 1}))
    with pytest.raises(BundleError, match=r"exported for ONNX Runtime's training package \(1.19.2\).*export it again"):
        run(b, chat_data, tmp_path / "r0", steps=1)
    out = tmp_path / "oldrun"
    run(tiny_bundle, chat_data, out, steps=2)
    for ck in (out / "checkpoints").glob("step-*"):  # an ORT checkpoint, as 1.19.2 runs wrote them
        (ck / "adapter.safetensors").rename(ck / "checkpoint")
    with pytest.raises(TrainingError, match="trained by an older edgetune.*edgetune import-peft"):
        run(tiny_bundle, chat_data, out, steps=4, resume=True)


def test_a_run_too_large_for_memory_is_refused_up_front(tiny_bundle, chat_data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "_available_bytes", lambda: 100 * 2**20)
    with pytest.raises(TrainingError, match=r"training needs about .* GB .*available.*--max-batch-tokens"):
        run(tiny_bundle, chat_data, tmp_path / "r", steps=1)
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("EDGETUNE_SKIP_MEMORY_CHECK", "1")
    run(tiny_bundle, chat_data, tmp_path / "r", steps=1)


def test_export_max_seq_len_bounds_train_eval_generate_and_apps(tiny_model, chat_data, tmp_path):
    from edgetune.app import pack
    from edgetune.device import infer
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    b = export(str(tiny_model), tmp_path / "b", AdapterConfig(rank=4, alpha=8, targets=("q_proj",), max_seq_len=48))
    assert json.loads((b / "edgetune.json").read_text())["context"] == 48
    logs = []
    r = trainer.train(b, chat_data, tmp_path / "r", steps=1, max_seq_len=512, progress=False, log=logs.append)
    assert any("longer than the bundle's context (48 tokens); using 48" in s for s in logs)
    assert json.loads((r.out / "config.json").read_text())["max_seq_len"] == 48
    m = infer.Model.open(b)
    assert m.context == 48
    out = infer.generate_full(b, "word " * 200, model=m, max_new_tokens=8)
    assert len(out["prompt_token_ids"]) + 8 <= 48
    pack.pack(r.out, b, tmp_path / "app")
    assert json.loads((tmp_path / "app" / "genai_config.json").read_text())["model"]["context_length"] == 48
