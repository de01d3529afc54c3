"""bfloat16 frozen products (``--compute bf16``): the MatMulBF16 kernel against a float64 product
of the same bfloat16-rounded operands, on AMX and with AVX512-BF16 where this CPU has them and in
its plain C++ form; the
exported graphs (bfloat16 weights, casts in the plain graphs, MatMulBF16 in the fused ones); and
training on both forms against the float32 base."""
from __future__ import annotations

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


def _product(a: np.ndarray, wb: np.ndarray, trans_b: bool) -> np.ndarray:
    node = helper.make_node("MatMulBF16", ["a", "w"], ["y"], domain="edgetune", trans_b=int(trans_b))
    init = helper.make_tensor("w", TensorProto.BFLOAT16, list(wb.shape), wb.tobytes(), raw=True)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [init])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgetune", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    kernels.register(so)
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    first = s.run(None, {"a": a})[0]
    again = s.run(None, {"a": a})[0]  # the packed weight is reused
    np.testing.assert_array_equal(first, again)
    return first


# (leading dims, M, K, N): odd sizes, a single row and column, the default model's shapes
CASES = [((), 64, 64, 64), ((), 37, 50, 45), ((), 1, 1, 1), ((), 5, 32, 33), ((3,), 7, 40, 24),
         ((), 33, 576, 192), ((2,), 100, 576, 1536), ((), 130, 50, 45), ((2,), 40, 33, 70)]


def check_products() -> None:
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


def test_matmul_bf16_matches_a_float64_product_of_the_rounded_operands():
    """On AMX or AVX512-BF16 where this CPU has one (the op list says so), else the plain C++ product."""
    check_products()


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
    assert (lib.bf16 != "") == ("MatMulBF16" in lib.ops)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        flags = set()  # the kernels are x86's
    want = "amx" if "amx_bf16" in flags else "avx512bf16" if "avx512_bf16" in flags else ""
    assert lib.bf16 == want, (lib.bf16, want)


@pytest.mark.skipif("avx512_bf16" not in _cpu_flags(), reason="this CPU has no AVX512-BF16")
def test_matmul_bf16_with_avx512_bf16_matches_too():
    """EDGETUNE_ISA=avx512bf16: vdpbf16ps, also where the CPU has AMX; the op stays listed, and the
    library says what it runs on."""
    code = ("import sys; sys.path.insert(0, %r); import test_bf16 as t; t.check_products(); "
            "from edgetune.device import fused; print(fused.library().bf16, 'MatMulBF16' in fused.library().ops)"
            ) % str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, EDGETUNE_ISA="avx512bf16"),
                         capture_output=True, text=True, cwd=str(Path(__file__).parent))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["avx512bf16", "True"]


def test_matmul_bf16_plain_product_matches_too():
    """EDGETUNE_ISA=generic turns AMX and AVX512-BF16 off: the plain C++ product, and the op is no
    longer listed."""
    code = ("import sys; sys.path.insert(0, %r); import test_bf16 as t; t.check_products(); "
            "from edgetune.device import fused; print(sorted(fused.library().ops))") % str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, EDGETUNE_ISA="generic"),
                         capture_output=True, text=True, cwd=str(Path(__file__).parent))
    assert out.returncode == 0, out.stderr
    assert "MatMulBF16" not in out.stdout


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
    """The plain graphs hold each frozen linear weight once, in bfloat16, cast to float32 where it
    is read; the fused graphs multiply by it with MatMulBF16 only; the weights are the float32
    export's, rounded to nearest even."""
    b = bf16_bundles["bf16"]
    train = onnx.load(str(b / "train.onnx"))
    bf = {i.name: i for i in train.graph.initializer if i.data_type == TensorProto.BFLOAT16}
    assert len(bf) == 2 * 7 and all(n.endswith(".bf16") for n in bf)
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
    assert ops["MatMulBF16"] == 2 * 7 + 2 * 7 - 3  # forward, and every input gradient but layer 0's q, k, v
    for graph in ("train_fused.onnx", "eval_fused.onnx"):
        g = onnx.load(str(b / graph), load_external_data=False).graph
        readers = [n.op_type for n in g.node for i in n.input if i in bf]
        assert set(readers) == {"MatMulBF16"}, (graph, set(readers))


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
    """A library whose op list lacks MatMulBF16 (a CPU with neither AMX nor AVX512-BF16): the plain
    graph runs, and the reason names both, once."""
    import dataclasses

    from edgetune.device import trainer

    lib = kernels.library()
    monkeypatch.setattr(kernels, "library", lambda: dataclasses.replace(lib, ops=lib.ops - {"MatMulBF16"}))
    monkeypatch.setenv("EDGETUNE_KERNELS", "auto")
    run = trainer.train(bf16_bundles["bf16"], SAMPLE_DATA, tmp_path / "run", steps=2, batch_size=4,
                        progress=False, log=print).out
    assert json.loads((run / "run.json").read_text())["graphs"]["train"] == "train.onnx"
    said = capsys.readouterr()
    assert (said.out + said.err).count("bfloat16 weights with AMX or AVX512-BF16") == 1
