"""optimizer.onnx, the optimizer step an app runs without Python: the same AdamW update and learning
rates as edgetune's numpy AdamW and schedule, and the trainer runs it."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgetune.device import trainer
from edgetune.device.optim import AdamW, GraphAdamW
from edgetune.formats import atomic as _io
from edgetune.formats import bundle as _bundle
from edgetune.formats.config import TrainConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _graph(tmp_path, shapes):
    from edgetune.workstation import optimizer_graph

    path = tmp_path / "optimizer.onnx"
    onnx.save(optimizer_graph.build(list(shapes), shapes), str(path))
    return path


def test_the_graph_is_float32_only(tmp_path):
    """Mobile and older ONNX Runtime builds lack double kernels (1.24's CPU provider has no double Cos)."""
    from onnx import TensorProto

    m = onnx.load(str(_graph(tmp_path, {"p": [2, 3]})))
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types |= {i.data_type for i in m.graph.initializer}
    assert TensorProto.DOUBLE not in types, types


def test_the_graph_takes_numpy_adamw_steps(tmp_path):
    rng = np.random.default_rng(0)
    shapes = {"a": [4, 7], "b": [7, 1], "c": [1, 1]}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    ref = {k: v.copy() for k, v in params.items()}
    ours, theirs = GraphAdamW(str(_graph(tmp_path, shapes)), weight_decay=0.05), AdamW(weight_decay=0.05)
    for step in range(12):
        grads = {k: (rng.normal(size=s) * 10.0 ** rng.integers(-6, 2)).astype(np.float32) for k, s in shapes.items()}
        lr = 1e-3 * (1 + step % 3)
        ours.step(params, grads, lr)
        theirs.step(ref, grads, lr)
    assert ours.step_count == theirs.step_count == 12
    for k in shapes:
        np.testing.assert_allclose(params[k], ref[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ours.exp_avg[k], theirs.exp_avg[k], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(ours.exp_avg_sq[k], theirs.exp_avg_sq[k], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (5, 5), (4, 2)])
def test_the_graph_learning_rate_follows_the_trainer_schedule(tmp_path, schedule, warmup, total):
    from edgetune.workstation import optimizer_graph

    sess = ort.InferenceSession(str(_graph(tmp_path, {"p": [2]})), providers=["CPUExecutionProvider"])
    cfg = TrainConfig(lr=3e-4, warmup=warmup, schedule=schedule)
    z = np.zeros(2, np.float32)
    for step in range(total + 2):
        f32 = lambda x: np.array(x, np.float32)  # noqa: E731
        feed = {"step": f32(step + 1), "base_lr": f32(cfg.lr), "warmup_steps": f32(warmup), "total_steps": f32(total),
                "schedule": np.array(optimizer_graph.SCHEDULES[schedule], np.int64), "weight_decay": f32(0.0),
                "p": z, "p_grad": z, "exp_avg/p": z, "exp_avg_sq/p": z}
        (lr,) = sess.run(["lr"], feed)
        assert float(lr) == pytest.approx(trainer.lr_at(step, cfg, total), rel=1e-6, abs=1e-12), step


def test_training_on_the_graph_equals_the_numpy_optimizer(tiny_bundle, chat_data, tmp_path):
    """A bundle from before optimizer.onnx trains with numpy's AdamW: the same losses and adapter."""
    import torch_reference

    old = tmp_path / "old-bundle"
    shutil.copytree(tiny_bundle, old)
    m = json.loads((old / _bundle.MANIFEST).read_text())
    assert m["optimizer"]["file"] == "optimizer.onnx"
    del m["optimizer"]
    _io.write_json(old / _bundle.MANIFEST, _io.seal(m))
    kw = dict(steps=10, lr=1e-2, batch_size=4, seed=0, warmup=3, schedule="cosine", progress=False, log=lambda s: None)
    graph = trainer.train(tiny_bundle, chat_data, tmp_path / "graph", **kw)
    numpy_run = trainer.train(old, chat_data, tmp_path / "numpy", **kw)
    np.testing.assert_allclose(torch_reference.edgetune_losses(graph.out),
                               torch_reference.edgetune_losses(numpy_run.out), rtol=1e-5, atol=1e-6)
    from edgetune.formats import peft_io

    # Relative to each tensor's largest value: AdamW divides by the root of the squared gradient, so an
    # element whose gradient is float noise moves by float noise times lr on either side.
    a, b = peft_io.load(graph.out)[1], peft_io.load(numpy_run.out)[1]
    worst = max(float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in a)
    assert worst < 1e-5, worst


def _need_library():
    import os

    from edgetune.device import fused as kernels

    if os.environ.get("EDGETUNE_TEST_NO_FUSED") == "1":
        pytest.skip("EDGETUNE_TEST_NO_FUSED=1: this host builds edgetune without the kernel library")
    assert kernels.library().ok, kernels.library().reason
    return kernels


def test_the_one_call_adamw_gives_the_plain_graphs_bits(tmp_path):
    """optimizer_fused.onnx (one edgetune.AdamW node) against optimizer.onnx: identical parameters and
    moments, step after step, on tensors of odd sizes, size 1, empty, several thread blocks, with
    gradients spanning twelve orders of magnitude and a schedule with warmup and decay."""
    from edgetune.workstation import optimizer_graph

    kernels = _need_library()
    shapes = {"a": [4, 7], "b": [7, 1], "c": [1, 1], "d": [3, 16384 + 5], "e": [0, 8]}
    plain = _graph(tmp_path, shapes)
    fused = tmp_path / "optimizer_fused.onnx"
    onnx.save(optimizer_graph.build(list(shapes), shapes, fused=True), str(fused))
    m = onnx.load(str(fused))
    assert [n.op_type for n in m.graph.node if n.domain == "edgetune"] == ["AdamW"]
    so = ort.SessionOptions()
    kernels.register(so)
    ours, theirs = GraphAdamW(str(fused), 0.05, so), GraphAdamW(str(plain), 0.05)
    rng = np.random.default_rng(1)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    ref = {k: v.copy() for k, v in params.items()}
    start = {k: v.copy() for k, v in params.items()}
    sched = {"base_lr": 3e-3, "warmup_steps": 3, "total_steps": 9, "schedule": 2}
    for step in range(9):
        grads = {k: (rng.normal(size=s) * 10.0 ** rng.integers(-9, 3)).astype(np.float32) for k, s in shapes.items()}
        ours.step(params, grads, 0.0, sched)
        theirs.step(ref, grads, 0.0, sched)
        for k in shapes:
            for x, y in ((params[k], ref[k]), (ours.exp_avg[k], theirs.exp_avg[k]),
                         (ours.exp_avg_sq[k], theirs.exp_avg_sq[k])):
                assert x.shape == y.shape and np.array_equal(x.view(np.uint32), y.view(np.uint32)), (step, k)
    assert all(not np.array_equal(params[k], start[k]) for k in "abcd")  # the steps moved them


def test_the_one_call_adamw_refuses_bad_inputs_by_name(tmp_path):
    from onnx import TensorProto, helper

    kernels = _need_library()
    f = TensorProto.FLOAT
    node = helper.make_node("AdamW", ["s", "d", "b", "p", "g", "m", "v"], ["p1", "m1", "v1"], domain="edgetune",
                            beta1=0.9, one_minus_beta1=0.1, beta2=0.999, one_minus_beta2=0.001, epsilon=1e-8)
    ins = [helper.make_tensor_value_info(n, f, None) for n in ("s", "d", "b", "p", "g", "m", "v")]
    outs = [helper.make_tensor_value_info(n, f, None) for n in ("p1", "m1", "v1")]
    model = helper.make_model(helper.make_graph([node], "t", ins, outs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgetune", 1)])
    model.ir_version = 8
    path = tmp_path / "adamw.onnx"
    onnx.save(model, str(path))
    so = ort.SessionOptions()
    kernels.register(so)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    one = np.array(1.0, np.float32)
    ok = np.ones(3, np.float32)
    out = sess.run(None, {"s": one, "d": one, "b": one, "p": ok, "g": ok, "m": ok, "v": ok})
    assert [o.shape for o in out] == [(3,)] * 3
    with pytest.raises(Exception, match=r"edgetune::AdamW: tensor 0: p \[3\] and input 1 \[4\] differ"):
        sess.run(None, {"s": one, "d": one, "b": one, "p": ok, "g": np.ones(4, np.float32), "m": ok, "v": ok})
    with pytest.raises(Exception, match="edgetune::AdamW: step_size, decay and bc2_sqrt must be scalars"):
        sess.run(None, {"s": ok, "d": one, "b": one, "p": ok, "g": ok, "m": ok, "v": ok})


def test_the_graph_steps_resume_from_a_saved_state_bit_for_bit(tmp_path):
    """The optimizer binds its tensors to buffers of its own once: a run stopped after three steps,
    its moments saved and loaded into a new optimizer with copies of the parameters (bound afresh),
    takes the same steps to the bit as the run that went on."""
    shapes = {"a": [4, 7], "b": [7, 1], "c": [1, 1]}
    path = str(_graph(tmp_path, shapes))
    rng = np.random.default_rng(3)
    start = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(6)]
    whole, run = GraphAdamW(path, 0.05), {k: v.copy() for k, v in start.items()}
    for g in grads:
        whole.step(run, g, 1e-2)
    first, part = GraphAdamW(path, 0.05), {k: v.copy() for k, v in start.items()}
    for g in grads[:3]:
        first.step(part, g, 1e-2)
    saved, at_three = {k: v.copy() for k, v in first.state().items()}, {k: v.copy() for k, v in part.items()}
    first.step(part, grads[3], 1e-2)  # the saved copies are not the buffers the optimizer goes on writing
    assert all(not np.array_equal(saved[k], v) for k, v in first.state().items())
    second, second_params = GraphAdamW(path, 0.05), at_three
    second.load_state(saved, 3)
    for g in grads[3:]:
        second.step(second_params, g, 1e-2)
    for k in shapes:
        assert np.array_equal(second_params[k].view(np.uint32), run[k].view(np.uint32)), k
        assert np.array_equal(second.exp_avg[k].view(np.uint32), whole.exp_avg[k].view(np.uint32)), k
        assert np.array_equal(second.exp_avg_sq[k].view(np.uint32), whole.exp_avg_sq[k].view(np.uint32)), k
    assert second.step_count == whole.step_count == 6
