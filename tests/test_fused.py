"""The fused kernels (cpp_ext/ort_ops, domain edgetune): each op forward and backward against torch
autograd and against the plain-ONNX subgraph it replaces, and whole models trained on the fused
graphs against the plain graphs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetune.device import fused as kernels

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

needs_library = pytest.mark.skipif(not kernels.library().ok and os.environ.get("EDGETUNE_TEST_NO_FUSED") == "1",
                                   reason=f"EDGETUNE_TEST_NO_FUSED=1 and no kernel library: {kernels.library().reason}")
pytestmark = needs_library


def _session(nodes, inputs, outputs, inits=(), fused=True):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                            helper.make_opsetid("edgetune", 1)])
    so = ort.SessionOptions()
    if fused:
        kernels.register(so)
    return m, ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(op, ins, n_out, **attrs):
    names = [f"x{i}" for i in range(len(ins))]
    outs = [f"y{i}" for i in range(n_out)]
    _, s = _session([helper.make_node(op, names, outs, domain="edgetune", **attrs)], names, outs)
    return s.run(None, dict(zip(names, ins)))


def _t(a):
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


SHAPES = [(1, 1, 2), (3, 5, 7), (2, 1, 33), (1, 300, 64), (4, 129)]


@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_forward_and_backward_match_torch(shape):
    rng = np.random.default_rng(0)
    g, u, dy = (rng.normal(0, 3, shape).astype(np.float32) for _ in range(3))
    (y,) = _run("SwiGLU", [g, u], 1)
    dg, du = _run("SwiGLUGrad", [dy, g, u], 2)
    tg, tu = _t(g), _t(u)
    ty = torch.nn.functional.silu(tg) * tu
    ty.backward(torch.tensor(dy, dtype=torch.float64))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(dg, tg.grad.numpy(), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(du, tu.grad.numpy(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_forward_and_backward_match_torch(shape):
    rng = np.random.default_rng(1)
    x, dy = (rng.normal(0, 2, shape).astype(np.float32) for _ in range(2))
    w = rng.normal(1, 0.5, shape[-1]).astype(np.float32)
    y, inv = _run("RMSNorm", [x, w], 2, epsilon=1e-5)
    dx, dw = _run("RMSNormGrad", [dy, x, w, inv], 2)
    # a recomputed norm's extra input, only waited for: the same bits
    y2, inv2 = _run("RMSNorm", [x, w, np.zeros((), np.float32)], 2, epsilon=1e-5)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(inv2, inv)
    tx, tw = _t(x), _t(w)
    ty = tw * (tx * torch.rsqrt(tx.pow(2).mean(-1, keepdim=True) + 1e-5))
    ty.backward(torch.tensor(dy, dtype=torch.float64))
    assert inv.shape == shape[:-1] + (1,)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_add_rmsnorm_forward_and_backward_match_torch(shape):
    """AddRMSNorm (the residual add and the norm) and AddRMSNormGrad (the norm's input gradient plus
    the residual's, with and without the weight gradient)."""
    rng = np.random.default_rng(11)
    a, b, dy, dres = (rng.normal(0, 2, shape).astype(np.float32) for _ in range(4))
    w = rng.normal(1, 0.5, shape[-1]).astype(np.float32)
    y, inv, s = _run("AddRMSNorm", [a, b, w], 3, epsilon=1e-5)
    ds, dw = _run("AddRMSNormGrad", [dy, s, w, inv, dres], 2)
    (ds_only,) = _run("AddRMSNormGrad", [dy, s, w, inv, dres], 1)
    ta, tb, tw = _t(a), _t(b), _t(w)
    ts = ta + tb
    ty = tw * (ts * torch.rsqrt(ts.pow(2).mean(-1, keepdim=True) + 1e-5))
    # s also feeds the next residual add, whose gradient arrives as dres
    (ty * torch.tensor(dy, dtype=torch.float64)).sum().add((ts * torch.tensor(dres, dtype=torch.float64)).sum()).backward()
    assert inv.shape == shape[:-1] + (1,)
    np.testing.assert_allclose(s, a + b, rtol=0, atol=0)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds, ta.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ds, tb.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(ds_only, ds)


def test_add_rmsnorm_refuses_operands_that_differ():
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(Exception, match=r"edgetune::AddRMSNorm: a \[2, 3\], b \[1, 3\] and weight \[3\] do not fit"):
        _run("AddRMSNorm", [z, np.zeros((1, 3), np.float32), np.ones(3, np.float32)], 3, epsilon=1e-5)
    with pytest.raises(Exception, match=r"edgetune::AddRMSNormGrad: dres \[2, 2\] is not shaped like x \[2, 3\]"):
        _run("AddRMSNormGrad", [z, z, np.ones(3, np.float32), np.ones((2, 1), np.float32), np.zeros((2, 2), np.float32)], 1)


@pytest.mark.parametrize("xshape,cshape", [((2, 3, 5, 8), (2, 1, 5, 8)), ((1, 1, 1, 2), (1, 1, 1, 2)),
                                           ((3, 4, 17, 64), (1, 1, 17, 64)), ((2, 6, 16), (6, 16))])
def test_rotary_forward_and_backward_match_torch(xshape, cshape):
    rng = np.random.default_rng(2)
    x, dy = (rng.normal(0, 1, xshape).astype(np.float32) for _ in range(2))
    ang = rng.uniform(0, 6.3, cshape).astype(np.float32)
    c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)  # halves differ: the general case
    (y,) = _run("Rotary", [x, c, s], 1)
    (dx,) = _run("RotaryGrad", [dy, c, s], 1)
    tx = _t(x)
    h = xshape[-1] // 2
    ty = tx * torch.tensor(c, dtype=torch.float64) + torch.cat([-tx[..., h:], tx[..., :h]], -1) * torch.tensor(s, dtype=torch.float64)
    ty.backward(torch.tensor(dy, dtype=torch.float64))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bshd,cshape", [((2, 5, 3, 8), (2, 1, 5, 8)), ((1, 1, 1, 2), (1, 1, 1, 2)),
                                          ((3, 17, 4, 64), (1, 1, 17, 64)), ((2, 7, 1, 16), (7, 16))])
def test_rotary_with_the_heads_transpose_folded_in_is_rotary_after_it_bit_for_bit(bshd, cshape):
    """RotaryT(x) is Rotary(Transpose(x, [0, 2, 1, 3])); RotaryTGrad(dy) is Transpose(RotaryGrad(dy))."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, bshd).astype(np.float32)
    dy = rng.normal(0, 1, (bshd[0], bshd[2], bshd[1], bshd[3])).astype(np.float32)
    ang = rng.uniform(0, 6.3, cshape).astype(np.float32)
    c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    (y,) = _run("RotaryT", [x, c, s], 1)
    (dx,) = _run("RotaryTGrad", [dy, c, s], 1)
    (want_y,) = _run("Rotary", [np.ascontiguousarray(x.transpose(0, 2, 1, 3)), c, s], 1)
    (want_dx,) = _run("RotaryGrad", [dy, c, s], 1)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(dx, want_dx.transpose(0, 2, 1, 3))


def test_rotary_with_the_transpose_refuses_other_ranks():
    z = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(Exception, match=r"edgetune::RotaryT: x \[2, 3, 4\] is not 4-d"):
        _run("RotaryT", [z, np.ones((3, 4), np.float32), np.ones((3, 4), np.float32)], 1)


def _mask(B, S, pad, rng):
    """Causal, with each row's padding at the end: the additive mask the exporter builds."""
    m = np.zeros((B, 1, S, S), np.float32)
    m[:, :, np.triu_indices(S, 1)[0], np.triu_indices(S, 1)[1]] = np.finfo(np.float32).min
    for b in range(B):
        m[b, :, :, S - pad[b]:] = np.finfo(np.float32).min
    return m


def _packed_mask(segments):
    """The exporter's mask for packed rows: ``segments`` [B, S] numbers each row's records 1, 2, ...
    (0: padding); a token sees the earlier tokens of its own record only."""
    seg = np.asarray(segments)
    S = seg.shape[1]
    see = (seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((S, S), bool)) & (seg[:, None, :] > 0)
    return np.where(see, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]


def _segments(lengths, S):
    row = np.zeros(S, np.int64)
    at = 0
    for i, n in enumerate(lengths):
        row[at:at + n] = i + 1
        at += n
    return row


@pytest.mark.parametrize("B,H,Hkv,S,D,pad", [(2, 4, 2, 7, 8, [0, 3]), (1, 1, 1, 1, 2, [0]), (3, 9, 3, 33, 64, [0, 5, 32]),
                                             (1, 2, 2, 300, 16, [0]), (2, 3, 1, 5, 4, [5, 0]),
                                             # packed rows: records of these lengths, then padding
                                             (2, 4, 2, 300, 16, [[40, 1, 97, 130], [299]]),
                                             (3, 2, 1, 45, 8, [[1, 1, 1, 30], [16, 16, 13], [3, 33]]),
                                             # enough packed records for the backward pass to split the
                                             # row at their edges, and padding rows after them
                                             (1, 4, 2, 600, 16, [[70, 90, 1, 80, 130, 100, 64]])])
def test_attention_forward_and_backward_match_torch(B, H, Hkv, S, D, pad):
    """Grouped keys and values, padding, rows whose every key is masked (uniform weights, as a plain
    softmax gives), single tokens, long rows, and packed rows (block-diagonal masks, where the
    kernel also skips the keys of the records before a block's, and the backward pass runs ranges of
    records at once)."""
    rng = np.random.default_rng(4)
    q, dout = (rng.normal(0, 1, (B, H, S, D)).astype(np.float32) for _ in range(2))
    k, v = (rng.normal(0, 1, (B, Hkv, S, D)).astype(np.float32) for _ in range(2))
    if isinstance(pad[0], list):
        mask = _packed_mask([_segments(lens, S) for lens in pad])
    else:
        mask = _mask(B, S, pad, rng)
    scale = 1 / np.sqrt(D)
    (o,) = _run("Attention", [q, k, v, mask], 1, scale=float(scale))
    dq, dk, dv = _run("AttentionGrad", [dout, q, k, v, mask], 3, scale=float(scale))
    tq, tk, tv = _t(q), _t(k), _t(v)
    rep = H // Hkv
    kk, vv = tk.repeat_interleave(rep, 1), tv.repeat_interleave(rep, 1)
    masked = torch.tensor(mask < -1e30)
    s = (tq @ kk.transpose(-1, -2)) * scale
    # In float32, the mask's minimum plus a score is that minimum again, so a masked score's value is
    # the minimum while its gradient passes through the Add unchanged: the plain graph's semantics.
    value = torch.where(masked, torch.full_like(s, float(np.finfo(np.float32).min)), s.detach())
    scores = s - s.detach() + value
    to = torch.softmax(scores, -1) @ vv
    to.backward(torch.tensor(dout, dtype=torch.float64))
    np.testing.assert_allclose(o, to.detach().numpy(), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(dq, tq.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dk, tk.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dv, tv.grad.numpy(), rtol=1e-4, atol=1e-5)
    # AttentionT writes the output [B, S, H, D] (the heads' Transpose after it folded in) and
    # AttentionTGrad reads its gradient so: the same values, bit for bit.
    (ot,) = _run("AttentionT", [q, k, v, mask], 1, scale=float(scale))
    np.testing.assert_array_equal(ot, o.transpose(0, 2, 1, 3))
    dout_t = np.ascontiguousarray(dout.transpose(0, 2, 1, 3))
    for got, want in zip(_run("AttentionTGrad", [dout_t, q, k, v, mask], 3, scale=float(scale)), (dq, dk, dv)):
        np.testing.assert_array_equal(got, want)


def _cross_entropy_head(h, w, lab, grad=True):
    g = helper.make_graph([helper.make_node("CrossEntropyHead", ["h", "w", "lab"], ["loss", "dh"][:1 + grad],
                                            domain="edgetune", ignore_index=-100)], "g",
                          [helper.make_tensor_value_info("h", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("w", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("lab", TensorProto.INT64, None)],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ["loss", "dh"][:1 + grad]])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgetune", 1)])
    so = ort.SessionOptions()
    kernels.register(so)
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"h": h, "w": w, "lab": lab})


CE_CASES = [(1, 8, 5, "one"), (7, 33, 1, "odd"), (13, 576, 1000, "odd"), (64, 64, 4099, "sharp"),
            (5, 16, 97, "all-ignored"), (0, 16, 40, "empty"), (9, 20, 65, "edges")]


@pytest.mark.parametrize("N,D,V,kind", CE_CASES, ids=[f"{n}x{d}x{v}-{k}" for n, d, v, k in CE_CASES])
def test_cross_entropy_head_matches_torch(N, D, V, kind):
    """The summed cross-entropy of h w^T over labelled rows and its gradient in h, the vocabulary
    in tiles: against torch autograd in float64 (odd sizes, one row, sharp logits, rows whose
    labels are all ignored, labels 0 and V - 1)."""
    rng = np.random.default_rng(N * 31 + V)
    h = rng.normal(size=(N, D)).astype(np.float32)
    w = (rng.normal(size=(V, D)) * (2.0 if kind == "sharp" else 0.1)).astype(np.float32)
    lab = rng.integers(0, V, N).astype(np.int64)
    lab[::3] = -100
    if kind == "all-ignored":
        lab[:] = -100
    if kind == "edges":
        lab[:4] = [0, V - 1, 0, V - 1]
    def torch_ce(dtype):
        th, tw = torch.tensor(h, dtype=dtype, requires_grad=True), torch.tensor(w, dtype=dtype)
        loss = torch.nn.functional.cross_entropy(th @ tw.T, torch.tensor(lab), ignore_index=-100, reduction="sum") \
            if N else th.sum() * 0
        loss.backward()
        return loss.item(), th.grad.double().numpy()

    want, grad = torch_ce(torch.float64)
    _, grad32 = torch_ce(torch.float32)  # float32 logits' own rounding: the error no float32 kernel avoids
    loss, dh = _cross_entropy_head(h, w, lab)
    assert loss.shape == () and dh.shape == h.shape
    np.testing.assert_allclose(loss, want, rtol=2e-6, atol=1e-5)
    big = lambda a: float(np.abs(a).max(initial=0.0))  # noqa: E731
    assert big(dh - grad) <= 1.5 * big(grad32 - grad) + 1e-6 * max(1.0, big(grad))
    (alone,) = _cross_entropy_head(h, w, lab, grad=False)  # forward only (the eval graph): the same loss
    assert alone == loss


def test_cross_entropy_head_refuses_a_label_outside_the_vocabulary():
    h, w = np.zeros((3, 4), np.float32), np.zeros((10, 4), np.float32)
    with pytest.raises(Exception, match=r"edgetune::CrossEntropyHead: label 10 of row 1 is outside the vocabulary of 10"):
        _cross_entropy_head(h, w, np.array([1, 10, -100], np.int64))
    with pytest.raises(Exception, match=r"edgetune::CrossEntropyHead: h \[3, 4\], w \[10, 5\].*do not fit"):
        _cross_entropy_head(h, np.zeros((10, 5), np.float32), np.array([1, 2, 3], np.int64))


def test_bad_shapes_are_an_error_naming_the_op_not_a_crash():
    with pytest.raises(Exception, match=r"edgetune::SwiGLU: g \[2, 3\] and u \[3, 2\] differ"):
        _run("SwiGLU", [np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32)], 1)
    with pytest.raises(Exception, match=r"edgetune::RMSNorm: x \[2, 3\] and weight \[4\] do not fit"):
        _run("RMSNorm", [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)], 2, epsilon=1e-5)
    with pytest.raises(Exception, match=r"edgetune::RMSNorm: the node has 1 outputs, the op writes 2"):
        _run("RMSNorm", [np.zeros((2, 3), np.float32), np.zeros(3, np.float32)], 1, epsilon=1e-5)
    with pytest.raises(Exception, match=r"edgetune::Rotary: .*even last axis"):
        _run("Rotary", [np.zeros((2, 3), np.float32)] * 3, 1)
    with pytest.raises(Exception, match=r"edgetune::Attention: q \[1, 3, 4, 8\], k \[1, 2, 4, 8\].* do not fit"):
        _run("Attention", [np.zeros((1, 3, 4, 8), np.float32), np.zeros((1, 2, 4, 8), np.float32),
                           np.zeros((1, 2, 4, 8), np.float32), np.zeros((1, 1, 4, 4), np.float32)], 1, scale=1.0)
    q, kv, m = np.zeros((1, 2, 4, 8), np.float32), np.zeros((1, 1, 4, 8), np.float32), np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(Exception, match=r"edgetune::AttentionTGrad: dout \[1, 2, 4, 8\] does not fit q \[1, 2, 4, 8\] "
                                        r"\(dout \[B, S, H, D\]\)"):
        _run("AttentionTGrad", [q, q, kv, kv, m], 3, scale=1.0)


# -- the rewrite: plain subgraphs as the exporter writes them, fused, computing the same -------

def _const(name, value):
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(value, np.float32), name))


def _plain_rmsnorm():
    return [_const("two", 2.0), _const("eps", 1e-6), _const("one", 1.0),
            helper.make_node("Pow", ["x", "two"], ["p"]), helper.make_node("ReduceMean", ["p"], ["m"], axes=[-1]),
            helper.make_node("Add", ["m", "eps"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"]),
            helper.make_node("Div", ["one", "s"], ["r"]), helper.make_node("Mul", ["x", "r"], ["xn"]),
            helper.make_node("Mul", ["w", "xn"], ["y"])], ["x", "w"]


def _plain_swiglu():
    return [helper.make_node("QuickGelu", ["x"], ["a"], domain="com.microsoft", alpha=1.0),
            helper.make_node("Mul", ["a", "w"], ["y"])], ["x", "w"]


def _plain_rotary():
    ints = lambda name, v: helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(v, np.int64), name))  # noqa: E731
    return [ints("z", [0]), ints("h", [4]), ints("e", [2**62]), ints("ax", [-1]),
            helper.make_node("Slice", ["x", "z", "h", "ax"], ["x1"]), helper.make_node("Slice", ["x", "h", "e", "ax"], ["x2"]),
            helper.make_node("Neg", ["x2"], ["n"]), helper.make_node("Concat", ["n", "x1"], ["rh"], axis=-1),
            helper.make_node("Mul", ["x", "c"], ["xc"]), helper.make_node("Mul", ["rh", "s"], ["rs"]),
            helper.make_node("Add", ["xc", "rs"], ["y"])], ["x", "c", "s"]


def _plain_attention():
    """Grouped-query attention as the exporter writes it: k and v repeated from 2 heads to 4."""
    ints = lambda name, v: helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(v, np.int64), name))  # noqa: E731
    nodes = [ints("two", 2), ints("ex", [1, 2, 2, 5, 8]), ints("sh", [1, 4, 5, 8])]
    for t in ("k", "v"):
        nodes += [helper.make_node("Unsqueeze", [t, "two"], [f"{t}u"]), helper.make_node("Expand", [f"{t}u", "ex"], [f"{t}e"]),
                  helper.make_node("Reshape", [f"{t}e", "sh"], [f"{t}r"])]
    nodes += [helper.make_node("FusedMatMul", ["x", "kr"], ["sc"], domain="com.microsoft", alpha=0.35, transB=1),
              helper.make_node("Add", ["sc", "m"], ["a"]), helper.make_node("Softmax", ["a"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vr"], ["y"])]
    return nodes, ["x", "k", "v", "m"]


@pytest.mark.parametrize("build,op", [(_plain_rmsnorm, "RMSNorm"), (_plain_swiglu, "SwiGLU"), (_plain_rotary, "Rotary"),
                                      (_plain_attention, "Attention")])
def test_the_rewrite_finds_the_exported_pattern_and_computes_the_same(build, op):
    from edgetune.workstation.gradients.fused import fuse

    nodes, inputs = build()
    rng = np.random.default_rng(3)
    feed = {"x": rng.normal(size=(2, 3, 8)).astype(np.float32),
            "w": rng.normal(size=(2, 3, 8) if op == "SwiGLU" else (8,)).astype(np.float32),
            "c": rng.normal(size=(1, 3, 8)).astype(np.float32), "s": rng.normal(size=(1, 3, 8)).astype(np.float32)}
    if op == "Attention":
        feed = {"x": rng.normal(size=(1, 4, 5, 8)).astype(np.float32), "k": rng.normal(size=(1, 2, 5, 8)).astype(np.float32),
                "v": rng.normal(size=(1, 2, 5, 8)).astype(np.float32), "m": _mask(1, 5, [1], rng)}
    feed = {k: v for k, v in feed.items() if k in inputs}
    m, plain = _session(nodes, inputs, ["y"], fused=False)
    counts = fuse(m)
    assert counts == {op: 1}
    assert [n.op_type for n in m.graph.node] == [op]  # the pattern and its constants are gone
    so = ort.SessionOptions()
    kernels.register(so)
    fused = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(fused.run(["y"], feed)[0], plain.run(["y"], feed)[0], rtol=1e-5, atol=1e-6)


def test_the_residual_add_and_its_gradient_sum_fuse_into_the_norm():
    """A two-layer residual stream, h1 = h0 + o1, h2 = h1 + o2, each sum normalized: the training
    graph's adds become AddRMSNorm, the sums of each norm's input gradient with the residual's become
    AddRMSNormGrad, and the gradients equal the plain graph's; an add of a broadcast operand stays."""
    from edgetune.workstation.gradients import driver

    def model(broadcast):
        f = TensorProto.FLOAT
        rng = np.random.default_rng(5)
        inits = [onnx.numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), n) for n in ("p1", "p2", "p3")]
        inits += [onnx.numpy_helper.from_array(rng.normal(1, 0.2, 8).astype(np.float32), n) for n in ("w1", "w2")]
        nodes = [helper.make_node("MatMul", ["h0", "p1"], ["o1"]),
                 helper.make_node("Add", ["o1", "bias"] if broadcast else ["h0", "o1"], ["h1"])]
        for k, (x, w, y) in enumerate((("h1", "w1", "n1"), ("h2", "w2", "n2"))):
            nodes += [helper.make_node("Pow", [x, "two"], [f"sq{k}"]),
                      helper.make_node("ReduceMean", [f"sq{k}"], [f"ms{k}"], axes=[-1]),
                      helper.make_node("Add", [f"ms{k}", "eps"], [f"ae{k}"]), helper.make_node("Sqrt", [f"ae{k}"], [f"rt{k}"]),
                      helper.make_node("Div", ["one", f"rt{k}"], [f"iv{k}"]), helper.make_node("Mul", [x, f"iv{k}"], [f"xn{k}"]),
                      helper.make_node("Mul", [w, f"xn{k}"], [y])]
            if k == 0:
                nodes += [helper.make_node("MatMul", ["n1", "p2"], ["o2"]), helper.make_node("Add", ["h1", "o2"], ["h2"])]
        nodes += [helper.make_node("MatMul", ["n2", "p3"], ["z"]), helper.make_node("ReduceSum", ["z"], ["loss"], keepdims=0)]
        nodes = [_const("eps", 1e-6), _const("one", 1.0), _const("two", 2.0)] + nodes
        ins = [helper.make_tensor_value_info("h0", f, [2, 3, 8])]
        if broadcast:
            ins.append(helper.make_tensor_value_info("bias", f, [8]))
        g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("loss", f, [])], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    rng = np.random.default_rng(6)
    feed = {"h0": rng.normal(size=(2, 3, 8)).astype(np.float32)}
    results = {}
    for fused in (False, True):
        tg = driver.build(model(False), ["p1", "p2", "p3"], "loss", [feed], fused=fused)
        ops = [n.op_type for n in tg.model.graph.node]
        so = ort.SessionOptions()
        if fused:
            kernels.register(so)
            assert ops.count("AddRMSNorm") == 2 and ops.count("AddRMSNormGrad") == 1 and "Sum" not in ops, ops
        f = dict(feed, **tg.initial)
        sess = ort.InferenceSession(tg.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        results[fused] = dict(zip(names, sess.run(names, {k: v for k, v in f.items()
                                                           if k in {i.name for i in sess.get_inputs()}})))
    for k, v in results[False].items():
        np.testing.assert_allclose(results[True][k], v, rtol=1e-5, atol=1e-5, err_msg=k)
    tg = driver.build(model(True), ["p1", "p2", "p3"], "loss", [dict(feed, bias=np.ones(8, np.float32))], fused=True)
    assert [n.op_type for n in tg.model.graph.node].count("AddRMSNorm") == 1  # h2's add only: h1's broadcasts


def test_the_rewrite_fuses_the_vocabulary_projection_and_its_loss(monkeypatch):
    """FusedMatMul(h, W^T) into SoftmaxCrossEntropyLoss(sum): one CrossEntropyHead, the same loss
    and d loss / d h; a trainable (non-initializer) projection or a mean loss stays plain."""
    from edgetune.workstation.gradients.fused import fuse

    rng = np.random.default_rng(5)
    h, w = rng.normal(size=(6, 16)).astype(np.float32), (rng.normal(size=(50, 16)) * 0.3).astype(np.float32)
    lab = np.array([3, -100, 0, 49, 7, 7], np.int64)

    def model(reduction="sum", init=True):
        nodes = [helper.make_node("FusedMatMul", ["h", "W"], ["logits"], domain="com.microsoft", transB=1, alpha=1.0),
                 helper.make_node("SoftmaxCrossEntropyLoss", ["logits", "lab"], ["loss"], ignore_index=-100,
                                  reduction=reduction)]
        ins = [helper.make_tensor_value_info("h", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("lab", TensorProto.INT64, None)]
        if not init:
            ins.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, None))
        g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("loss", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(w, "W")] if init else [])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])

    m = model()
    monkeypatch.setenv("EDGETUNE_FUSED_LOSS", "0")
    assert fuse(model()) == {}  # left to ONNX Runtime when asked at export
    monkeypatch.delenv("EDGETUNE_FUSED_LOSS")  # fused by default
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"h": h, "lab": lab})
    assert fuse(m) == {"CrossEntropyHead": 1}
    assert [n.op_type for n in m.graph.node] == ["CrossEntropyHead"]
    so = ort.SessionOptions()
    kernels.register(so)
    got = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"h": h, "lab": lab})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert fuse(model("mean")) == {} and fuse(model(init=False)) == {}


def test_a_near_miss_is_left_plain():
    from edgetune.workstation.gradients.fused import fuse

    nodes, inputs = _plain_rmsnorm()
    nodes[1] = _const("eps", 1e-6)
    nodes[3] = helper.make_node("Pow", ["x", "eps"], ["p"])  # x ** 1e-6 is no mean square
    m, _ = _session(nodes, inputs, ["y"], fused=False)
    assert fuse(m) == {}
    nodes, inputs = _plain_swiglu()
    nodes[0] = helper.make_node("QuickGelu", ["x"], ["a"], domain="com.microsoft", alpha=1.702)  # GELU, not SiLU
    m, _ = _session(nodes, inputs, ["y"], fused=False)
    assert fuse(m) == {}


# -- whole models ---------------------------------------------------------------------------

def _losses(bundle: Path, data: Path, out: Path, mode: str, monkeypatch) -> tuple[list[float], dict]:
    import torch_reference

    from edgetune.device import trainer

    monkeypatch.setenv("EDGETUNE_KERNELS", mode)
    run = trainer.train(bundle, data, out, steps=10, lr=1e-2, batch_size=4, seed=0, schedule="constant",
                        progress=False, log=lambda s: None)
    manifest = json.loads((run.out / "run.json").read_text())
    return torch_reference.edgetune_losses(run.out), manifest


FAMILY_CASES = [("llama", "lora", None, ""), ("llama", "dora", None, ""), ("llama", "lora", "int4", ""),
                ("llama", "lora", None, "ckpt"), ("qwen2", "lora", None, ""), ("phi3", "lora", None, ""),
                ("gemma2", "lora", None, "")]


@pytest.mark.parametrize("family,variant,quantize,ckpt", FAMILY_CASES,
                         ids=["-".join(filter(None, c)) for c in FAMILY_CASES])
def test_fused_graphs_train_like_the_plain_ones(family, variant, quantize, ckpt, chat_data, tmp_path, monkeypatch):
    from test_architectures import make_family

    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    model = make_family(family, tmp_path / "model")
    cfg = AdapterConfig(rank=4, alpha=8, targets=("all-linear",), method=variant, quantize=quantize,
                        gradient_checkpointing=ckpt == "ckpt")
    bundle = export(str(model), tmp_path / "bundle", cfg)
    fused = json.loads((bundle / "edgetune.json").read_text())["fused"]
    assert fused["ops"].get("RMSNorm") and (fused["ops"].get("RotaryT") or fused["ops"].get("Rotary")), fused
    # The loss over the vocabulary too, except Gemma-2's (its logits are soft-capped first) and an
    # int4 lm_head's (a MatMulNBits product; a tied one stays float and fuses).
    if quantize is None:
        assert bool(fused["ops"].get("CrossEntropyHead")) == (family != "gemma2"), fused
    # No Transpose beside a rotary op: the heads' transposes of q and k fold into RotaryT and
    # RotaryTGrad, forward and backward. Phi-3 rotates a slice of each head (no transpose beside).
    if family != "phi3":
        tr = onnx.load(str(bundle / fused["train"]), load_external_data=False)
        ops = [n.op_type for n in tr.graph.node]
        assert ops.count("RotaryT") >= ops.count("RotaryTGrad") == fused["ops"]["RotaryTGrad"] > 0, ops
        assert "Rotary" not in ops and "RotaryGrad" not in ops
    # Nor after the attention output, nor before its gradient (AttentionT, AttentionTGrad; Gemma-2's
    # soft-capped scores keep its attention plain).
    if family != "gemma2":
        assert fused["ops"].get("AttentionT", 0) >= fused["ops"].get("AttentionTGrad", 0) > 0, fused["ops"]
        assert not fused["ops"].get("Attention") and not fused["ops"].get("AttentionGrad"), fused["ops"]
    ev = onnx.load(str(bundle / fused["eval"]), load_external_data=False)
    assert all(len(n.output) == 1 for n in ev.graph.node if n.op_type == "CrossEntropyHead")  # no gradient in eval
    plain, pm = _losses(bundle, chat_data, tmp_path / "plain", "plain", monkeypatch)
    ours, fm = _losses(bundle, chat_data, tmp_path / "fused", "fused", monkeypatch)
    assert pm["graphs"]["train"] == "train.onnx" and pm["kernels"] == "plain"
    assert fm["graphs"]["train"] == "train_fused.onnx" and fm["kernels"].startswith("fused (")
    assert len(ours) == 10
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-5)


# -- LoRA: a LoRA branch u = scale (x A^T) B^T, forward and backward in one op each ----------------

LORA_CASES = [((), 1, 1, 1, 1), ((2,), 3, 5, 7, 2), ((1,), 33, 64, 48, 8), ((2, 3), 50, 576, 192, 8),
              ((), 300, 40, 70, 16), ((), 65, 17, 9, 5), ((), 4, 96, 80, 64)]


@pytest.mark.parametrize("lead,M,K,N,r", LORA_CASES)
def test_lora_forward_and_backward_match_torch(lead, M, K, N, r):
    """Odd sizes, one row, rank 1 to 64, row counts across the kernel's 32-row blocks and its tasks."""
    rng = np.random.default_rng(M * 7 + K + r)
    x = rng.normal(size=lead + (M, K)).astype(np.float32)
    a, b = rng.normal(0, 0.2, (r, K)).astype(np.float32), rng.normal(0, 0.2, (N, r)).astype(np.float32)
    du = rng.normal(size=lead + (M, N)).astype(np.float32)
    u, h = _run("LoRA", [x, a, b], 2, scale=2.0)
    da, db, dx = _run("LoRAGrad", [du, x, h, a, b], 3, scale=2.0)
    da2, db2 = _run("LoRAGrad", [du, x, h, a, b], 2, scale=2.0)  # without dx (a first layer's input)
    tx, ta, tb = _t(x), _t(a), _t(b)
    th = tx @ ta.T
    tu = 2.0 * th @ tb.T
    tu.backward(torch.tensor(du, dtype=torch.float64))
    tol = dict(rtol=2e-5, atol=2e-5 * max(1.0, np.sqrt(M * K / 64)))
    np.testing.assert_allclose(h, th.detach().numpy(), **tol)
    np.testing.assert_allclose(u, tu.detach().numpy(), **tol)
    np.testing.assert_allclose(da, ta.grad.numpy(), **tol)
    np.testing.assert_allclose(db, tb.grad.numpy(), **tol)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    np.testing.assert_array_equal(da2, da)
    np.testing.assert_array_equal(db2, db)
    again = _run("LoRAGrad", [du, x, h, a, b], 3, scale=2.0)  # the same bits on every run (fixed blocks)
    for first, second in zip((da, db, dx), again):
        np.testing.assert_array_equal(first, second)
    # LoRADown and LoRAGradH (the branch without its output and input gradient, which the bfloat16
    # products add): the same h, dA and dB, and dh = d loss / d h
    (h2,) = _run("LoRADown", [x, a], 1)
    np.testing.assert_array_equal(h2, h)
    da3, db3, dh = _run("LoRAGradH", [du, x, h, a, b], 3, scale=2.0)
    np.testing.assert_array_equal(da3, da)
    np.testing.assert_array_equal(db3, db)
    th2 = _t(h)
    (2.0 * th2 @ _t(b).T).backward(torch.tensor(du, dtype=torch.float64))
    np.testing.assert_allclose(dh, th2.grad.numpy(), **tol)


def test_lora_refuses_operands_that_do_not_fit():
    x = np.zeros((2, 3, 8), np.float32)
    with pytest.raises(Exception, match=r"edgetune::LoRA: x \[2, 3, 8\], A \[4, 7\] and B \[5, 4\] do not fit"):
        _run("LoRA", [x, np.zeros((4, 7), np.float32), np.zeros((5, 4), np.float32)], 2, scale=1.0)
    with pytest.raises(Exception, match=r"r <= 64"):
        _run("LoRA", [np.zeros((2, 80), np.float32), np.zeros((65, 80), np.float32), np.zeros((90, 65), np.float32)], 2,
             scale=1.0)
    a, b = np.zeros((4, 8), np.float32), np.zeros((5, 4), np.float32)
    with pytest.raises(Exception, match=r"edgetune::LoRAGrad: du \[2, 3, 4\] and h \[2, 3, 4\] must be \[2, 3, 5\]"):
        _run("LoRAGrad", [np.zeros((2, 3, 4), np.float32), x, np.zeros((2, 3, 4), np.float32), a, b], 2, scale=1.0)
    with pytest.raises(Exception, match=r"edgetune::LoRADown: x \[2, 3, 8\] and A \[4, 7\] do not fit \(\[\.\.\., K\], \[r, K\], r <= 64\)"):
        _run("LoRADown", [x, np.zeros((4, 7), np.float32)], 1)
    with pytest.raises(Exception, match=r"edgetune::LoRAGradH: du \[2, 3, 4\] and h \[2, 3, 4\] must be \[2, 3, 5\]"):
        _run("LoRAGradH", [np.zeros((2, 3, 4), np.float32), x, np.zeros((2, 3, 4), np.float32), a, b], 3, scale=1.0)


def _lora_model(rank=4, frozen_a=False):
    """y = x W^T + 2 (x A^T) B^T as the exporter writes a LoRA layer (FusedMatMuls with transB), and a loss."""
    rng = np.random.default_rng(8)
    f = TensorProto.FLOAT
    inits = [onnx.numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n)
             for n, s in (("W", (12, 16)), ("A", (rank, 16)), ("B", (12, rank)))]
    nodes = [helper.make_node("FusedMatMul", ["x", "W"], ["base"], domain="com.microsoft", transB=1),
             helper.make_node("FusedMatMul", ["x", "A"], ["t"], domain="com.microsoft", transB=1),
             helper.make_node("FusedMatMul", ["t", "B"], ["u"], domain="com.microsoft", transB=1, alpha=2.0),
             helper.make_node("Add", ["base", "u"], ["y"]), helper.make_node("Mul", ["y", "y"], ["sq"]),
             helper.make_node("ReduceSum", ["sq"], ["loss"], keepdims=0)]
    ins = [helper.make_tensor_value_info("x", f, [2, 5, 16])]
    if frozen_a:  # A a graph input, not a weight: no LoRA branch
        ins.append(helper.make_tensor_value_info("A", f, [rank, 16]))
        inits = [i for i in inits if i.name != "A"]
    g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("loss", f, [])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_the_lora_branch_fuses_and_its_gradients_equal_the_plain_graphs():
    """The two products of a LoRA branch become LoRA, their gradients one LoRAGrad (no Gemm, MatMul or
    FusedMatMul left for them), and the training graph's loss and gradients are the plain graph's."""
    from edgetune.workstation.gradients import driver

    feed = {"x": np.random.default_rng(9).normal(size=(2, 5, 16)).astype(np.float32)}
    results = {}
    for fused in (False, True):
        tg = driver.build(_lora_model(), ["A", "B"], "loss", [feed], fused=fused)
        ops = [n.op_type for n in tg.model.graph.node]
        so = ort.SessionOptions()
        if fused:
            kernels.register(so)
            assert ops.count("LoRA") == 1 and ops.count("LoRAGrad") == 1, ops
            assert ops.count("FusedMatMul") == 1 and "Gemm" not in ops and "MatMul" not in ops, ops  # the base's only
        sess = ort.InferenceSession(tg.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        f = {k: v for k, v in dict(feed, **tg.initial).items() if k in {i.name for i in sess.get_inputs()}}
        results[fused] = dict(zip(names, sess.run(names, f)))
    assert set(results[True]) == set(results[False])
    for k, v in results[False].items():
        np.testing.assert_allclose(results[True][k], v, rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("rank,frozen_a", [(16, False), (4, True)])
def test_what_is_not_a_lora_branch_is_left_alone(rank, frozen_a):
    """A rank as large as the layer (16 of 16 inputs), or A that is no weight: the products stay."""
    from edgetune.workstation.gradients.fused import fuse

    m = _lora_model(rank, frozen_a)
    assert "LoRA" not in fuse(m)
    assert [n.op_type for n in m.graph.node].count("FusedMatMul") == 3


# The op tests above, in a process of their own for each narrower build of the library
OP_TESTS = "match_torch or matches_torch or bit_for_bit or equal_the_plain"


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_the_narrower_builds_pass_the_op_tests(isa):
    """EDGETUNE_ISA picks the library's AVX2 or generic build: the op tests above pass on it too, so
    an AVX-512 machine checks the kernels an AVX2 machine (or, for the generic build, an Arm one) runs."""
    if os.environ.get("EDGETUNE_ISA"):
        pytest.skip("EDGETUNE_ISA chooses the instruction set already")
    env = dict(os.environ, EDGETUNE_ISA=isa)
    which = subprocess.run([sys.executable, "-c", "from edgetune.device import fused; print(fused.library().isa)"],
                           env=env, capture_output=True, text=True)
    if isa != "generic" and which.stdout.strip() != isa:
        pytest.skip(f"this CPU does not run the {isa} build")
    assert which.stdout.strip() == isa, which.stdout + which.stderr
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)),
                          "-k", OP_TESTS], env=env, capture_output=True, text=True, cwd=str(Path(__file__).parent))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout
