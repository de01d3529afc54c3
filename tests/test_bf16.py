"""bfloat16 frozen products (``--compute bf16``): the MatMulBF16 kernel against a float64 product
of the same bfloat16-rounded operands, on AMX and with AVX512-BF16 where this CPU has them and in
its plain C++ form; the
exported graphs (bfloat16 weights, casts in the plain graphs, MatMulBF16 in the fused ones); and
training on both forms against the float32 base."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_DATA

from edgetune.device import fused as kernels
from edgetune.formats.config import AdapterConfig
from edgetune.formats.errors import ConfigError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.library().ok, reason=f"no kernel library: {kernels.library().reason}")


def _bits(x: np.ndarray) -> np.ndarray:
    from edgetune.workstation.bf16 import bits

    return bits(x)


def _float(b: np.ndarray) -> np.ndarray:
    from edgetune.workstation.bf16 import to_float

    return to_float(b)


def _product(a: np.ndarray, wb: np.ndarray, trans_b: bool, op: str = "MatMulBF16",
             c: np.ndarray | None = None, low: tuple[np.ndarray, np.ndarray, bool, float] | None = None
             ) -> np.ndarray:
    """MatMulBF16 (float32 out), MatMulBF16Add (plus c) or MatMulBF16Round (bfloat16 out, returned as
    its bits: numpy has no bfloat16, so the graph widens it with a Cast, which is exact); with low
    (p, q, trans_q, scale), MatMulBF16LoRA."""
    rounded = op == "MatMulBF16Round"
    extra = {}
    names = ["a", "w"]
    if low is not None:
        op, names = "MatMulBF16LoRA", names + ["p", "q"]
        extra = dict(trans_q=int(low[2]), scale=float(low[3]))
    names += ["c"] if c is not None else []
    nodes = [helper.make_node(op, names, ["y16" if rounded else "y"], domain="edgetune", trans_b=int(trans_b),
                              **extra)]
    if rounded:
        nodes.append(helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT))
    init = helper.make_tensor("w", TensorProto.BFLOAT16, list(wb.shape), wb.tobytes(), raw=True)
    ins = [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))]
    feeds = {"a": a}
    for name, v in ([("p", low[0]), ("q", low[1])] if low is not None else []) + ([("c", c)] if c is not None else []):
        ins.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(v.shape)))
        feeds[name] = v
    g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [init])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgetune", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    kernels.register(so)
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    first = s.run(None, feeds)[0]
    again = s.run(None, feeds)[0]  # the packed weight is reused
    np.testing.assert_array_equal(first, again)
    return _bits(first) if rounded else first


# (leading dims, M, K, N): odd sizes, a single row and column, the default model's shapes
CASES = [((), 64, 64, 64), ((), 37, 50, 45), ((), 1, 1, 1), ((), 5, 32, 33), ((3,), 7, 40, 24),
         ((), 33, 576, 192), ((2,), 100, 576, 1536), ((), 130, 50, 45), ((2,), 40, 33, 70)]


def check_products() -> None:
    """MatMulBF16 against float64; MatMulBF16Round is MatMulBF16's output rounded to nearest even, and
    MatMulBF16Add its output plus the addend, bit for bit."""
    for lead, m, k, n in CASES:
        for trans_b in (True, False):
            rng = np.random.default_rng(m * 31 + k)
            a = rng.normal(size=lead + (m, k)).astype(np.float32)
            wb = _bits(rng.normal(0, 0.1, (n, k) if trans_b else (k, n)).astype(np.float32))
            w = _float(wb).astype(np.float64)
            ref = _float(_bits(a)).astype(np.float64) @ (w.T if trans_b else w)
            y = _product(a, wb, trans_b)
            assert y.shape == ref.shape
            err = float(np.abs(y - ref).max() / np.abs(ref).max())
            assert err < 2e-6, (lead, m, k, n, trans_b, err)  # float32 sums of exact bfloat16 products
            r = _product(a, wb, trans_b, "MatMulBF16Round")
            assert r.dtype == np.uint16 and r.shape == y.shape
            np.testing.assert_array_equal(r, _bits(y), err_msg=str((lead, m, k, n, trans_b)))
            c = rng.normal(size=y.shape).astype(np.float32)
            np.testing.assert_array_equal(_product(a, wb, trans_b, "MatMulBF16Add", c), y + c,
                                          err_msg=str((lead, m, k, n, trans_b)))
            # MatMulBF16LoRA: the low-rank term p q (q as [r, N] or [N, r]) summed in float32, then c
            for r, trans_q, with_c in ((1, True, False), (8, True, True), (5, False, True), (16, False, False)):
                p = rng.normal(size=lead + (m, r)).astype(np.float32)
                q = rng.normal(0, 0.3, (n, r) if trans_q else (r, n)).astype(np.float32)
                want = y.astype(np.float64) + 1.5 * p.astype(np.float64) @ (q.T if trans_q else q).astype(np.float64)
                want = want + c if with_c else want
                got = _product(a, wb, trans_b, c=c if with_c else None, low=(p, q, trans_q, 1.5))
                tol = 2e-6 * float(np.abs(want).max())
                np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=str((lead, m, k, n, trans_b, r)))
    check_swiglu_bf16()


def test_matmul_bf16_add_refuses_an_addend_of_another_shape():
    a, wb = np.ones((4, 8), np.float32), _bits(np.ones((6, 8), np.float32))
    with pytest.raises(Exception, match=r"edgetune::MatMulBF16Add: c \[4, 5\] is not the product's shape \[4, 6\]"):
        _product(a, wb, True, "MatMulBF16Add", np.zeros((4, 5), np.float32))
    p = np.ones((4, 3), np.float32)
    with pytest.raises(Exception, match=r"edgetune::MatMulBF16LoRA: p \[4, 3\] and q \[3, 6\] do not fit a \[4, 8\] "
                                        r"and an output of 6 columns \(trans_q 1\)"):
        _product(a, wb, True, low=(p, np.ones((3, 6), np.float32), True, 1.0))
    with pytest.raises(Exception, match=r"edgetune::MatMulBF16LoRA: p \[4, 2\]"):
        _product(a, wb, True, low=(np.ones((4, 2), np.float32), np.ones((3, 6), np.float32), False, 1.0))


def _swiglu_nodes(op: str, inputs: dict[str, np.ndarray], outs: list[str]) -> list[np.ndarray]:
    typed = lambda name, v: helper.make_tensor_value_info(  # noqa: E731
        name, TensorProto.BFLOAT16 if v.dtype == np.uint16 else TensorProto.FLOAT, None)
    node = helper.make_node(op, list(inputs), outs, domain="edgetune")
    g = helper.make_graph([node], "g", [typed(k, v) for k, v in inputs.items()],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgetune", 1)])
    so = ort.SessionOptions()
    kernels.register(so)
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {k: (ort.OrtValue.ortvalue_from_numpy_with_onnx_type(v, TensorProto.BFLOAT16) if v.dtype == np.uint16
                 else ort.OrtValue.ortvalue_from_numpy(v)) for k, v in inputs.items()}
    return s.run_with_ort_values(outs, feeds)


def check_swiglu_bf16() -> None:
    """SwiGLUBF16 and SwiGLUBF16Grad are SwiGLU and SwiGLUGrad of the widened values, bit for bit
    (sizes around the ops' 16,384-value blocks)."""
    for shape in [(3, 5), (2, 16385), (40000,)]:
        rng = np.random.default_rng(shape[-1])
        gb, ub = _bits(rng.normal(0, 3, shape).astype(np.float32)), _bits(rng.normal(size=shape).astype(np.float32))
        dy = rng.normal(size=shape).astype(np.float32)
        gf, uf = _float(gb), _float(ub)
        (y16,) = _swiglu_nodes("SwiGLUBF16", {"g": gb, "u": ub}, ["y"])
        (y,) = _swiglu_nodes("SwiGLU", {"g": gf, "u": uf}, ["y"])
        np.testing.assert_array_equal(y16.numpy(), y.numpy())
        dg16, du16 = _swiglu_nodes("SwiGLUBF16Grad", {"dy": dy, "g": gb, "u": ub}, ["dg", "du"])
        dg, du = _swiglu_nodes("SwiGLUGrad", {"dy": dy, "g": gf, "u": uf}, ["dg", "du"])
        np.testing.assert_array_equal(dg16.numpy(), dg.numpy())
        np.testing.assert_array_equal(du16.numpy(), du.numpy())


def test_matmul_bf16_matches_a_float64_product_of_the_rounded_operands():
    """On AMX or AVX512-BF16 where this CPU has one (the op list says so), else the plain C++ product."""
    check_products()


def _ce_head_bf16(h: np.ndarray, wb: np.ndarray, lab: np.ndarray, grad: bool = True) -> list:
    outs = ["loss", "dh"][:1 + grad]
    node = helper.make_node("CrossEntropyHeadBF16", ["h", "w", "lab"], outs, domain="edgetune", ignore_index=-100)
    init = helper.make_tensor("w", TensorProto.BFLOAT16, list(wb.shape), wb.tobytes(), raw=True)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, None),
                                        helper.make_tensor_value_info("lab", TensorProto.INT64, None)],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs], [init])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgetune", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    kernels.register(so)
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"h": h, "lab": lab})


# (N, D, V): odd sizes, one row, a vocabulary of one entry, one tile and a bit, rows of odd length,
# more than 64 rows (several groups), the default model's width
CE_CASES = [(1, 8, 5), (7, 33, 1), (13, 576, 1000), (70, 64, 129), (9, 20, 257), (40, 31, 300), (64, 576, 4099),
            (0, 16, 40), (100, 64, 8300), (33, 40, 9000),  # one group of rows, the vocabulary in four slices
            (150, 32, 8200), (300, 16, 8192)]  # two and three groups, two slices


def check_ce_heads() -> None:
    """CrossEntropyHeadBF16 against float64 cross-entropy of the same bfloat16-rounded h and w: the
    loss to float32 sums' accuracy, d loss / d h within the rounding of the softmax weights to
    bfloat16 (what the fast path multiplies the weight by)."""
    import torch

    for n, d, v in CE_CASES:
        rng = np.random.default_rng(n * 7 + d + v)
        h = rng.normal(size=(n, d)).astype(np.float32)
        wb = _bits(rng.normal(0, 0.3, (v, d)).astype(np.float32))
        lab = rng.integers(0, v, n).astype(np.int64)
        lab[1::4] = -100
        if n > 3:
            lab[:3] = [0, v - 1, -100]
        th = torch.tensor(_float(_bits(h)), dtype=torch.float64, requires_grad=True)
        tw = torch.tensor(_float(wb), dtype=torch.float64)
        want = torch.nn.functional.cross_entropy(th @ tw.T, torch.tensor(lab), ignore_index=-100, reduction="sum") \
            if n else th.sum() * 0
        want.backward()
        loss, dh = _ce_head_bf16(h, wb, lab)
        assert loss.shape == () and dh.shape == h.shape
        np.testing.assert_allclose(loss, want.item(), rtol=1e-5, atol=1e-4, err_msg=str((n, d, v)))
        grad = th.grad.numpy()
        err = float(np.abs(dh - grad).max(initial=0.0))
        assert err <= 4e-3 * max(1.0, float(np.abs(grad).max(initial=0.0))), ((n, d, v), err)
        assert not np.any(dh[lab == -100]), (n, d, v)
        (alone,) = _ce_head_bf16(h, wb, lab, grad=False)  # forward only (the eval graph): the same loss
        assert alone == loss, (n, d, v)


def test_cross_entropy_head_bf16_matches_a_float64_loss_of_the_rounded_operands():
    """With AVX512-BF16 where this CPU has it (the op list says so), else in float32 from a float32
    copy of the weight."""
    check_ce_heads()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


@pytest.mark.skipif(bool(os.environ.get("EDGETUNE_ISA")), reason="EDGETUNE_ISA chooses the instruction set")
def test_the_library_multiplies_in_bfloat16_with_what_this_cpu_has():
    """AMX where /proc/cpuinfo lists it, else AVX512-BF16, else none; the op is listed exactly when
    one of them runs it."""
    import platform

    flags, lib = _cpu_flags(), kernels.library()
    assert (lib.bf16 != "") == ("MatMulBF16" in lib.ops) == ("CrossEntropyHeadBF16" in lib.ops) \
        == ("AttentionTBF16" in lib.ops) == ("AttentionTBF16Grad" in lib.ops)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        flags = set()  # the kernels are x86's
    want = "amx" if "amx_bf16" in flags else "avx512bf16" if "avx512_bf16" in flags else ""
    assert lib.bf16 == want, (lib.bf16, want)


@pytest.mark.skipif("avx512_bf16" not in _cpu_flags(), reason="this CPU has no AVX512-BF16")
def test_matmul_bf16_with_avx512_bf16_matches_too():
    """EDGETUNE_ISA=avx512bf16: vdpbf16ps, also where the CPU has AMX; the op stays listed, and the
    library says what it runs on."""
    code = ("import sys; sys.path.insert(0, %r); import test_bf16 as t; t.check_products(); "
            "t.check_ce_heads(); t.check_attention_bf16(); from edgetune.device import fused; "
            "print(fused.library().bf16, {'MatMulBF16', 'CrossEntropyHeadBF16', 'AttentionTBF16'} <= fused.library().ops)"
            ) % str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, EDGETUNE_ISA="avx512bf16"),
                         capture_output=True, text=True, cwd=str(Path(__file__).parent))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["avx512bf16", "True"]


def test_matmul_bf16_plain_product_matches_too():
    """EDGETUNE_ISA=generic turns AMX and AVX512-BF16 off: the plain C++ product, and the op is no
    longer listed."""
    code = ("import sys; sys.path.insert(0, %r); import test_bf16 as t; t.check_products(); "
            "t.check_ce_heads(); t.check_attention_bf16(); from edgetune.device import fused; "
            "print(sorted(fused.library().ops))"
            ) % str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, EDGETUNE_ISA="generic"),
                         capture_output=True, text=True, cwd=str(Path(__file__).parent))
    assert out.returncode == 0, out.stderr
    assert "MatMulBF16" not in out.stdout and "CrossEntropyHeadBF16" not in out.stdout and "AttentionTBF16" not in out.stdout
    # what a CPU without them lacks is what edgetune knows as the bfloat16 ops (its fallback's reason)
    plain = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    if kernels.library().bf16:
        assert kernels.library().ops - plain == kernels.BF16_OPS


def _attention_bf16(q, k, v, mask, dout_t, scale):
    def session(op, n_in, n_out):
        names, outs = [f"x{i}" for i in range(n_in)], [f"y{i}" for i in range(n_out)]
        g = helper.make_graph([helper.make_node(op, names, outs, domain="edgetune", scale=float(scale))], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgetune", 1)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        kernels.register(so)
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    (o,) = session("AttentionTBF16", 4, 1).run(None, {"x0": q, "x1": k, "x2": v, "x3": mask})
    grads = session("AttentionTBF16Grad", 5, 3).run(None, {"x0": dout_t, "x1": q, "x2": k, "x3": v, "x4": mask})
    return [o] + grads


# (B, H, Hkv, S, D, padding or packed records' lengths): odd sizes, a head size that is not a
# multiple of 32, grouped keys and values, single tokens, rows whose every key is masked, long rows,
# and packed rows (block-diagonal masks)
ATTENTION_CASES = [(2, 4, 2, 7, 8, [0, 3]), (1, 1, 1, 1, 2, [0]), (3, 9, 3, 33, 64, [0, 5, 32]),
                   (1, 2, 2, 300, 40, [0]), (2, 3, 1, 5, 4, [5, 0]), (2, 9, 3, 256, 64, [0, 100]),
                   (2, 4, 2, 300, 16, [[40, 1, 97, 130], [299]]), (1, 4, 2, 600, 16, [[70, 90, 1, 80, 130, 100, 64]])]


def check_attention_bf16() -> None:
    """AttentionTBF16 and its gradient against float64 attention whose seven products take the
    operands the kernels round to bfloat16 (q, k, v, dout, the softmax weights and the scores'
    gradient), the softmax and the sums unrounded: within float32 sums and the odd score gradient
    that rounds the other way (well under 1e-3 of each output's largest value)."""
    from test_fused import _mask, _packed_mask, _segments

    def bf(x):
        return _float(_bits(np.asarray(x, np.float32))).astype(np.float64)

    for B, H, Hkv, S, D, pad in ATTENTION_CASES:
        rng = np.random.default_rng(S * 7 + D)
        q, dout = (rng.normal(0, 1, (B, H, S, D)).astype(np.float32) for _ in range(2))
        k, v = (rng.normal(0, 1, (B, Hkv, S, D)).astype(np.float32) for _ in range(2))
        mask = _packed_mask([_segments(lens, S) for lens in pad]) if isinstance(pad[0], list) else _mask(B, S, pad, rng)
        scale = 1 / np.sqrt(D)
        dout_t = np.ascontiguousarray(dout.transpose(0, 2, 1, 3))
        o, dq, dk, dv = _attention_bf16(q, k, v, mask, dout_t, scale)
        kk, vv = (np.repeat(x, H // Hkv, 1) for x in (k, v))
        s = np.einsum("bhsd,bhtd->bhst", bf(q), bf(kk)) * scale + mask.astype(np.float64)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        dp = np.einsum("bhsd,bhtd->bhst", bf(dout), bf(vv))
        ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * scale
        want = [np.einsum("bhst,bhtd->bshd", bf(p), bf(vv)), np.einsum("bhst,bhtd->bhsd", bf(ds), bf(kk)),
                np.einsum("bhst,bhsd->bhtd", bf(ds), bf(q)).reshape(B, Hkv, H // Hkv, S, D).sum(2),
                np.einsum("bhst,bhsd->bhtd", bf(p), bf(dout)).reshape(B, Hkv, H // Hkv, S, D).sum(2)]
        for name, got, ref in zip(("out", "dq", "dk", "dv"), (o, dq, dk, dv), want):
            assert got.shape == ref.shape, (name, got.shape, ref.shape)
            err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
            assert err < 1e-3, (B, H, Hkv, S, D, name, err)


def test_attention_bf16_matches_float64_attention_of_the_rounded_operands():
    """With AVX512-BF16 where this CPU has it (and the library lists the ops), else in plain C++."""
    check_attention_bf16()


def test_attention_bf16_names_itself_when_dout_does_not_fit():
    q, kv = np.zeros((1, 2, 4, 8), np.float32), np.zeros((1, 1, 4, 8), np.float32)
    m = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(Exception, match=r"edgetune::AttentionTBF16Grad: dout \[1, 2, 4, 8\] does not fit q "
                                        r"\[1, 2, 4, 8\] \(dout \[B, S, H, D\]\)"):
        _attention_bf16(q, kv, kv, m, q, 1.0)


def test_bf16_rounding_is_to_nearest_even():
    from edgetune.workstation.bf16 import bits, to_float

    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, 0.0, -0.0, np.inf, np.nan, 1e-40], np.float32)
    b = bits(x)
    assert list(b[:6]) == [0x3F80, 0x3F80, 0x3F82, 0xC020, 0x0000, 0x8000]  # the ties go to even
    assert to_float(b[6:7])[0] == np.inf and np.isnan(to_float(b[7:8])[0])
    np.testing.assert_array_equal(to_float(bits(to_float(b))), to_float(b))


@pytest.mark.workstation
def test_compute_bf16_refuses_a_quantized_base_and_dora():
    with pytest.raises(ConfigError, match="quantized base"):
        AdapterConfig(quantize="int4", compute="bf16")
    with pytest.raises(ConfigError, match="DoRA"):
        AdapterConfig(method="dora", compute="bf16")


@pytest.fixture(scope="module")
def bf16_bundles(tiny_model, tmp_path_factory):
    from edgetune.workstation.export import export

    root = tmp_path_factory.mktemp("bf16")
    return {c: export(tiny_model, root / c, AdapterConfig(compute=c)) for c in ("float32", "bf16")}


@pytest.mark.workstation
def test_bf16_bundle_graphs(bf16_bundles):
    """The plain graphs hold each frozen linear weight and the tied embedding once, in bfloat16,
    cast to float32 where it is read; the fused graphs multiply by the linear weights with
    MatMulBF16 only (MatMulBF16Round, bfloat16 out, for the gate and up projections that only
    SwiGLUBF16 and its gradient read), compute the vocabulary loss with CrossEntropyHeadBF16 on the bfloat16
    embedding and look up its rows in bfloat16 (no float32 copy of it); the weights are the float32
    export's, rounded to nearest even."""
    b = bf16_bundles["bf16"]
    train = onnx.load(str(b / "train.onnx"))
    bf = {i.name: i for i in train.graph.initializer if i.data_type == TensorProto.BFLOAT16}
    embed = "base_model.model.model.embed_tokens.weight.bf16"
    assert len(bf) == 2 * 7 + 1 and embed in bf and all(n.endswith(".bf16") for n in bf)
    floats = {i.name for i in train.graph.initializer}
    assert not {n[: -len(".bf16")] for n in bf} & floats
    casts = [n for n in train.graph.node if n.op_type == "Cast" and n.input[0] in bf]
    assert len(casts) == len(bf)
    ref = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(bf16_bundles["float32"] / "train.onnx")).graph.initializer}
    for name, init in bf.items():
        raw = np.frombuffer(init.raw_data, np.uint16).reshape(tuple(init.dims))
        np.testing.assert_array_equal(raw, _bits(ref[name[: -len(".bf16")]]), err_msg=name)
    man = json.loads((b / "edgetune.json").read_text())
    ops = man["fused"]["ops"]
    # forward, and every input gradient but layer 0's q, k, v; each layer's gate and up rounded
    # and each LoRA layer's base product with the adapter's branch made in it (q, k, v, o forward)
    assert ops["MatMulBF16"] + ops["MatMulBF16Round"] + ops["MatMulBF16Add"] + ops["MatMulBF16LoRA"] == 2 * 7 + 2 * 7 - 3
    # and the input gradients' Sums as chains of them, each LoRA branch's input gradient made in
    # one of its layer's products (layer 1's q/k/v and both layers' o), the gate/up pairs adding
    assert ops["MatMulBF16Round"] == 2 * 2 and ops["MatMulBF16Add"] == 1 + 1
    assert ops["MatMulBF16LoRA"] == 2 * 4 + (3 + 1 + 1)
    # no branch is stored: LoRADown makes h, LoRAGradH dh (LoRAGrad where no dx is wanted: layer 0's q, k, v)
    assert "LoRA" not in ops and ops["LoRADown"] == 2 * 4 and ops["LoRAGradH"] == 3 + 1 + 1 and ops["LoRAGrad"] == 3
    assert ops["SwiGLUBF16"] == ops["SwiGLUBF16Grad"] == 2 and "SwiGLU" not in ops and "SwiGLUGrad" not in ops
    assert ops["CrossEntropyHeadBF16"] == 1 and "CrossEntropyHead" not in ops
    # the attention's products in bfloat16 too
    assert ops["AttentionTBF16"] == ops["AttentionTBF16Grad"] == 2 and not {"AttentionT", "AttentionTGrad"} & set(ops)
    for graph in ("train_fused.onnx", "eval_fused.onnx"):
        g = onnx.load(str(b / graph), load_external_data=False).graph
        readers = {(n.op_type, i) for n in g.node for i in n.input if i in bf}
        assert {op for op, i in readers if i != embed} == {"MatMulBF16", "MatMulBF16Round", "MatMulBF16LoRA"} | (
            {"MatMulBF16Add"} if graph == "train_fused.onnx" else set()), (graph, readers)
        products = {n.output[0] for n in g.node if n.op_type.startswith("MatMulBF16")}
        assert not any(n.op_type in ("Add", "Sum") and set(n.input) & products for n in g.node), graph
        assert {op for op, i in readers if i == embed} == {"Gather", "CrossEntropyHeadBF16"}, (graph, readers)
        assert not any(n.op_type == "Cast" and n.input[0] in bf for n in g.node), graph


@pytest.mark.workstation
def test_bf16_bundle_trains_fused_and_plain_like_float32(bf16_bundles, tmp_path, monkeypatch):
    """Ten steps on each form of the bfloat16 bundle, and on the float32 bundle: the fused form
    (AMX or AVX512-BF16, or the plain graph where this CPU has neither, said once) and the plain one agree, and
    both stay within 1e-3 of the float32 losses."""
    from edgetune.device import trainer

    def losses(bundle, kernels_mode, out):
        monkeypatch.setenv("EDGETUNE_KERNELS", kernels_mode)
        run = trainer.train(bundle, SAMPLE_DATA, out, steps=10, batch_size=4, lr=1e-2, progress=False,
                            log=lambda s: None).out
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        info = json.loads((run / "run.json").read_text())
        return [r["loss"] for r in rows if "loss" in r], info

    ref, _ = losses(bf16_bundles["float32"], "auto", tmp_path / "f32")
    fused, info = losses(bf16_bundles["bf16"], "auto", tmp_path / "fused")
    plain, _ = losses(bf16_bundles["bf16"], "plain", tmp_path / "plain")
    assert len(ref) == len(fused) == len(plain) == 10
    np.testing.assert_allclose(fused, ref, rtol=1e-3)
    np.testing.assert_allclose(plain, ref, rtol=1e-3)
    if "MatMulBF16" in kernels.library().ops:
        assert str(info.get("kernels", "")).startswith("fused"), info.get("kernels")


@pytest.mark.workstation
def test_bf16_bundle_without_amx_trains_on_the_plain_graph_and_says_why(bf16_bundles, tmp_path, monkeypatch, capsys):
    """A library whose op list lacks the bfloat16 ops (a CPU with neither AMX nor AVX512-BF16): the
    plain graph runs, and the reason names both, once."""
    import dataclasses

    from edgetune.device import trainer

    lib = kernels.library()
    monkeypatch.setattr(kernels, "library", lambda: dataclasses.replace(lib, ops=lib.ops - kernels.BF16_OPS))
    monkeypatch.setattr(kernels, "_said", set())  # said once per process: not yet in this test's
    monkeypatch.setenv("EDGETUNE_KERNELS", "auto")
    run = trainer.train(bf16_bundles["bf16"], SAMPLE_DATA, tmp_path / "run", steps=2, batch_size=4,
                        progress=False, log=print).out
    assert json.loads((run / "run.json").read_text())["graphs"]["train"] == "train.onnx"
    said = capsys.readouterr()
    assert (said.out + said.err).count("bfloat16 weights with AMX or AVX512-BF16") == 1


@pytest.mark.workstation
def test_bf16_bundle_with_its_own_head_trains_fused_like_plain(chat_data, tmp_path, monkeypatch):
    """A head not tied to the embedding (Qwen2's tiny config): its weight is one of the bfloat16
    linear weights, the fused loss reads it with CrossEntropyHeadBF16, the embedding stays float32,
    and the fused and plain graphs' losses agree."""
    from test_architectures import make_family

    from edgetune.device import trainer
    from edgetune.workstation.export import export

    bundle = export(str(make_family("qwen2", tmp_path / "model")), tmp_path / "bundle",
                    AdapterConfig(rank=4, alpha=8, compute="bf16"))
    train = onnx.load(str(bundle / "train.onnx"), load_external_data=False)
    inits = {i.name: i.data_type for i in train.graph.initializer}
    assert inits["base_model.model.lm_head.weight.bf16"] == TensorProto.BFLOAT16
    assert inits["base_model.model.model.embed_tokens.weight"] == TensorProto.FLOAT
    fused = json.loads((bundle / "edgetune.json").read_text())["fused"]
    assert fused["ops"].get("CrossEntropyHeadBF16") == 1, fused["ops"]

    def losses(mode):
        monkeypatch.setenv("EDGETUNE_KERNELS", mode)
        run = trainer.train(bundle, chat_data, tmp_path / mode, steps=6, batch_size=4, lr=1e-2, progress=False,
                            log=lambda s: None).out
        info = json.loads((run / "run.json").read_text())
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x], info

    plain, _ = losses("plain")
    ours, info = losses("auto")
    assert len(ours) == len(plain) == 6
    np.testing.assert_allclose(ours, plain, rtol=1e-3)
    if kernels.BF16_OPS <= kernels.library().ops:
        assert info["graphs"]["train"] == "train_fused.onnx", info["graphs"]
