"""QLoRA: a block-quantized frozen base (int4, int8) with float32 adapters."""
import json

import numpy as np
import pytest

from edgetune.app import doctor
from edgetune.device import cpu, trainer
from edgetune.formats import quantized
from edgetune.formats.config import AdapterConfig
from edgetune.formats.errors import ConfigError
from edgetune.workstation import quantize as quant


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_round_trip_is_within_half_a_step(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((24, 96)).astype(np.float32) * rng.uniform(0.01, 2, (24, 1)).astype(np.float32)
    w[3, :32] = 0.7  # a constant block
    codes, scale, zero = quantized.quantize(w, bits, 32)
    assert codes.dtype == np.uint8 and codes.shape == (24, 3, 32 * bits // 8)
    back = quantized.dequantize(codes, scale, zero, bits, 96)
    step = np.repeat(scale.reshape(24, 3), 32, axis=1)
    slack = 0.5 if bits == 4 else 1.0  # int8 rounds its zero point to an integer too
    assert (np.abs(back - w) <= slack * step + 1e-6).all()
    np.testing.assert_allclose(back[3, :32], 0.7, rtol=1e-6)


def test_values_on_a_q4_1_grid_get_their_own_codes_back():
    """GGUF's Q4_1 stores w = d*q + m per block of 32 (q in 0..15, the block's minimum at q=0 and
    maximum at q=15). Weights dequantized from such a file are re-quantized to the same codes."""
    rng = np.random.default_rng(0)
    n, k = 16, 128
    q = rng.integers(0, 16, (n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    d = rng.uniform(0.001, 0.05, (n, k // 32, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.4, 0.0, (n, k // 32, 1)).astype(np.float16).astype(np.float32)
    w = (d * q + m).astype(np.float32).reshape(n, k)
    codes, scale, zero = quantized.quantize(w, 4, 32)
    got = np.empty_like(q)
    got[..., 0::2], got[..., 1::2] = codes & 15, codes >> 4
    assert (got == q).all()
    assert np.abs(quantized.dequantize(codes, scale, zero, 4, k) - w).max() < 1e-6


@pytest.mark.parametrize("bits", [4, 8])
def test_graph_rewrite_forward_and_backward_match_numpy(bits):
    import onnxruntime as ort

    pytest.importorskip("onnx")
    from onnx import TensorProto as T
    from onnx import helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(1)
    n, k = 48, 64
    w = rng.standard_normal((n, k)).astype(np.float32)
    nodes = [helper.make_node("FusedMatMul", ["X", "W"], ["Y"], domain="com.microsoft", transB=1, alpha=0.5),
             helper.make_node("MatMul", ["D", "W"], ["G"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", T.FLOAT, [None, k]),
                                       helper.make_tensor_value_info("D", T.FLOAT, [None, n])],
                          [helper.make_tensor_value_info("Y", T.FLOAT, [None, n]),
                           helper.make_tensor_value_info("G", T.FLOAT, [None, k])], [nh.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    assert quant.linear_weights(model.graph, set()) == ["W"]
    qt = quantized.quantize(w, bits, 32)
    quant.rewrite(model, ["W"], {"W": qt}, bits, 32)
    ops = [nd.op_type for nd in model.graph.node]
    assert "MatMulNBits" in ops and "FusedMatMul" not in ops
    assert all(i.name != "W" for i in model.graph.initializer)  # no float copy of W is stored
    # The backward dequant waits for the incoming gradient D, so ORT cannot run it early.
    assert any(nd.op_type == "Shape" and list(nd.input) == ["D"] for nd in model.graph.node)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x, dy = rng.standard_normal((5, k)).astype(np.float32), rng.standard_normal((5, n)).astype(np.float32)
    y, gx = sess.run(None, {"X": x, "D": dy, **quantized.runtime_feeds(bits)})
    deq = quantized.dequantize(*qt, bits, k)
    np.testing.assert_allclose(y, 0.5 * x @ deq.T, atol=2e-5)
    np.testing.assert_allclose(gx, dy @ deq, atol=2e-5)


def test_config_checks():
    with pytest.raises(ConfigError, match="quantize must be one of"):
        AdapterConfig(quantize="nf4")
    with pytest.raises(ConfigError, match="block_size"):
        AdapterConfig(quantize="int4", block_size=48)
    with pytest.raises(ConfigError, match="compute must be"):
        AdapterConfig(quantize="int8", compute="int4")
    with pytest.raises(ConfigError, match="--quantize int8 or --quantize int4"):
        AdapterConfig(compute="int8")
    for q in ("int8", "int4"):
        assert AdapterConfig(quantize=q, compute="int8").compute == "int8"


def _nbits_graph(w, bits, compute):
    pytest.importorskip("onnx")
    from onnx import TensorProto as T
    from onnx import helper
    from onnx import numpy_helper as nh

    n, k = w.shape
    nodes = [helper.make_node("FusedMatMul", ["X", "W"], ["Y"], domain="com.microsoft", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", T.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("Y", T.FLOAT, [None, n])], [nh.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    quant.rewrite(model, ["W"], {"W": quantized.quantize(w, bits, 32)}, bits, 32, compute=compute)
    return model


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_compute_runs_int8_kernels_only_on_packed_weights(bits):
    """compute int8 sets accuracy_level 4, which ONNX Runtime honours only for weights it packed at
    load: the runner's sessions pre-pack for such bundles (and only for them). An int4 weight's
    product is split: a MatMulNBits without its float zero points (which ONNX Runtime packs) plus
    the zero points' correction."""
    import onnxruntime as ort

    from edgetune.device import runner

    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    x = rng.standard_normal((7, 96)).astype(np.float32)
    model = _nbits_graph(w, bits, "int8")
    nb = [nd for nd in model.graph.node if nd.op_type == "MatMulNBits"]
    assert len(nb) == 1 and any(a.name == "accuracy_level" and a.i == 4 for a in nb[0].attribute)
    assert len(nb[0].input) == (4 if bits == 8 else 3)
    exact = x @ quantized.dequantize(*quantized.quantize(w, bits, 32), bits, 96).T
    got = {}
    for prepack in (False, True):
        sess = ort.InferenceSession(model.SerializeToString(), runner.session_options(1, prepack=prepack),
                                    providers=["CPUExecutionProvider"])
        got[prepack] = sess.run(None, {"X": x})[0]
    np.testing.assert_allclose(got[False], exact, atol=2e-4)  # unpacked: dequantized, float32 products
    err = np.abs(got[True] - exact).max()
    assert 1e-5 < err < 0.02 * np.abs(exact).max(), err  # packed: int8 activations, close but not float32


def test_int8_compute_transposed_copy_is_the_weight_the_forward_pass_uses():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    q = quantized.quantize(w, 8, 32)
    deq = quantized.dequantize(*q, 8, 96)
    qt = quantized.transposed(*q, 8, 32, 96)
    assert qt[0].shape == (96, 2, 32)
    back = quantized.dequantize(*qt, 8, 64)
    step = np.repeat(qt[1].reshape(96, 2), 32, axis=1)
    assert (np.abs(back - deq.T) <= step + 1e-6).all()  # within a step of the int8 grid along N
    # int4: the copy is of the symmetric part (code - 8) * scale, which the split product's
    # MatMulNBits computes; the zero points' correction has a gradient of its own.
    q4 = quantized.quantize(w, 4, 32)
    sym = quantized.dequantize(q4[0], q4[1], np.full_like(q4[2], 8.0), 4, 96)
    qt = quantized.transposed(*q4, 4, 32, 96)
    back = quantized.dequantize(*qt, 8, 64)
    step = np.repeat(qt[1].reshape(96, 2), 32, axis=1)
    assert (np.abs(back - sym.T) <= step + 1e-6).all()
    assert np.abs(back - quantized.dequantize(*q4, 4, 96).T).max() > 10 * step.max()
    model = _nbits_graph(w, 8, "int8")
    assert {i.name for i in model.graph.initializer} >= {"W.qT", "W.scaleT", "W.zeroT"}


@pytest.fixture(scope="module")
def qlora_bundle(tiny_model, tmp_path_factory):
    from edgetune.workstation.export import export

    out = tmp_path_factory.mktemp("qlora") / "b"
    export(str(tiny_model), out, AdapterConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"), quantize="int4"))
    return out


def _dequantized_torch_model(tiny_model, bundle):
    """transformers' model with every quantized weight replaced by what the bundle computes."""
    import torch

    from edgetune.workstation.export import load_model

    hf, _ = load_model(tiny_model)
    m = json.loads((bundle / "edgetune.json").read_text())
    q = m["quantization"]
    idx = q["infer_weights"]
    raw = np.memmap(bundle / "infer.onnx.data", dtype=np.uint8, mode="r")

    def tensor(name):
        e = idx[name]
        return np.frombuffer(raw[e["offset"]:e["offset"] + e["length"]], e["dtype"]).reshape(e["shape"])

    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name in q["weights"]:
            hfname = name.replace("base_model.model.", "").replace(".base_layer", "")
            k = params[hfname].shape[1]
            w = quantized.dequantize(tensor(f"{name}.q"), tensor(f"{name}.scale"), tensor(f"{name}.zero"), q["bits"], k)
            params[hfname].copy_(torch.from_numpy(w))
    return hf, m


def test_qlora_bundle_stores_no_float_linear_weights(qlora_bundle):
    m = json.loads((qlora_bundle / "edgetune.json").read_text())
    q = m["quantization"]
    assert q["bits"] == 4 and len(q["weights"]) == 2 * 7  # q,k,v,o,gate,up,down in 2 layers
    for f in ("train_weights", ):
        names = set(m[f])
        assert not (names & set(q["weights"])), "a float copy of a quantized weight is in train.onnx.data"
        assert {f"{w}.q" for w in q["weights"]} <= names
    assert q["quantized_bytes"] < 0.25 * q["float_bytes"]


def test_qlora_matches_pytorch_peft_on_the_dequantized_base(tiny_model, qlora_bundle, chat_data, tmp_path):
    pytest.importorskip("torch")
    import torch_reference

    from edgetune.workstation.export import inject_adapter

    steps, lr, bs, seed = 10, 1e-2, 4, 0
    run = trainer.train(qlora_bundle, chat_data, tmp_path / "run", steps=steps, lr=lr, batch_size=bs, seed=seed,
                        schedule="constant", progress=False, log=lambda s: None)
    hf, m = _dequantized_torch_model(tiny_model, qlora_bundle)
    pm = inject_adapter(hf, AdapterConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    theirs, params = torch_reference.train_like_peft(pm, qlora_bundle, chat_data, steps, lr, bs, seed)
    np.testing.assert_allclose(torch_reference.edgetune_losses(run.out), theirs, rtol=0, atol=1e-5)
    assert torch_reference.worst_adapter_error(run.out, params) < 1e-4


def test_qlora_inference_logits_equal_the_dequantized_model(tiny_model, qlora_bundle):
    torch = pytest.importorskip("torch")
    from edgetune.device.infer import Model

    hf, _ = _dequantized_torch_model(tiny_model, qlora_bundle)
    ids = np.asarray([list(range(5, 30))], np.int64)
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    ours = Model.open(qlora_bundle).logits(ids, np.ones_like(ids))
    np.testing.assert_allclose(ours, theirs, atol=5e-5)


@pytest.fixture(scope="module")
def qlora_run(qlora_bundle, chat_data, tmp_path_factory):
    return trainer.train(qlora_bundle, chat_data, tmp_path_factory.mktemp("qrun") / "run", steps=20, lr=3e-2,
                         batch_size=4, progress=False, log=lambda s: None).out


def test_qlora_adapter_merges_into_a_float_base(qlora_bundle, qlora_run, tmp_path):
    from edgetune.app import merge
    from edgetune.device.infer import Model

    ids = np.asarray([list(range(5, 30))], np.int64)
    want = Model.open(qlora_bundle, adapter=qlora_run).logits(ids, np.ones_like(ids))
    merge.merge(qlora_bundle, [qlora_run], tmp_path / "m")
    got = Model.open(tmp_path / "m").logits(ids, np.ones_like(ids))
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(want - Model.open(qlora_bundle).logits(ids, np.ones_like(ids))).max() > 1e-3
    merge.merge(qlora_bundle, [qlora_run], tmp_path / "st", fmt="safetensors")
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "st", attn_implementation="eager")
    with torch.no_grad():
        np.testing.assert_allclose(hf(input_ids=torch.from_numpy(ids)).logits.numpy(), want, atol=5e-5)
    assert not list((tmp_path / "st").glob(".*tmp"))


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_merge_can_requantize_the_merged_weights(qlora_bundle, qlora_run, tmp_path, method):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from edgetune.app import merge
    from edgetune.device.infer import Model

    merge.merge(qlora_bundle, [qlora_run], tmp_path / "f")
    s = merge.merge(qlora_bundle, [qlora_run], tmp_path / "q", quantize=method, block_size=16)
    assert s["quantize"] == method
    fm = onnx.load(str(tmp_path / "f" / "model.onnx"))
    qm = onnx.load(str(tmp_path / "q" / "model.onnx"))
    fw = {i.name: numpy_helper.to_array(i) for i in fm.graph.initializer}
    qw = {i.name: numpy_helper.to_array(i) for i in qm.graph.initializer}
    linear = quant.linear_weights(fm.graph, set())
    assert linear and not set(linear) & set(qw)  # no float copy of a linear weight is left
    assert sum(n.op_type == "MatMulNBits" for n in qm.graph.node) == len(linear)
    bits = quantized.BITS[method]
    from edgetune.formats import bundle as _bundle

    quantized.write_float_data(_bundle.load(qlora_bundle), tmp_path / "base.data")  # the weights before the merge
    base = np.fromfile(tmp_path / "base.data", np.uint8)
    offsets = {i.name: int({e.key: e.value for e in i.external_data}["offset"])
               for i in onnx.load(str(tmp_path / "f" / "model.onnx"), load_external_data=False).graph.initializer
               if i.external_data}
    change = kept = 0.0
    for name in linear:  # the merged float weights, quantized exactly as the bundle's base was
        codes, scale, zero = quantized.quantize(fw[name], bits, 16)
        w0 = base[offsets[name]:offsets[name] + fw[name].nbytes].view(np.float32).reshape(fw[name].shape)
        if not np.array_equal(fw[name], w0):  # a weight the adapter changed
            delta = fw[name].astype(np.float64) - w0
            change += float(np.square(delta).sum())
            kept += float(((quantized.dequantize(codes, scale, zero, bits, fw[name].shape[1]) - w0) * delta).sum())
        np.testing.assert_array_equal(qw[f"{name}.q"], codes)
        np.testing.assert_array_equal(qw[f"{name}.scale"], scale)
        np.testing.assert_array_equal(qw[f"{name}.zero"], zero)
    # the reported check: how much of the merge's change survives the rounding
    got_kept = json.loads((tmp_path / "q" / "merged.json").read_text())["quantization"]["adapter_change_kept"]
    assert got_kept == pytest.approx(kept / change, rel=1e-6) and s["adapter_change_kept"] == round(got_kept, 3)
    ids = np.asarray([list(range(5, 30))], np.int64)
    want = Model.open(tmp_path / "f").logits(ids, np.ones_like(ids))
    got = Model.open(tmp_path / "q").logits(ids, np.ones_like(ids))
    assert np.abs(got - want).max() < (0.05 if method == "int8" else 0.5) * np.abs(want).max()
    meta = json.loads((tmp_path / "q" / "merged.json").read_text())
    assert meta["quantization"]["method"] == method
    assert (tmp_path / "q" / "model.onnx.data").stat().st_size < (tmp_path / "f" / "model.onnx.data").stat().st_size
    with pytest.raises(ConfigError, match="--quantize writes ONNX"):
        merge.merge(qlora_bundle, [qlora_run], tmp_path / "x", fmt="safetensors", quantize=method)


def test_qlora_pack_runs_the_quantized_base_in_onnxruntime_genai(qlora_bundle, qlora_run, tmp_path):
    import test_genai as tg

    from edgetune.app import pack

    app = tmp_path / "app"
    pack.pack(qlora_run, qlora_bundle, app, name="q", dtype="float32")
    ops = open(app / "base.onnx", "rb").read()
    assert b"MatMulNBits" in ops  # the app ships the int4 base
    assert (app / "base.onnx.data").stat().st_size == (qlora_bundle / "infer.onnx.data").stat().st_size
    got = tg.run_app(tg.genai_python(), app)
    tg.check_same_tokens(got, app, qlora_bundle, {"q": qlora_run})


@pytest.mark.parametrize("qc", [{"quant_method": "bitsandbytes", "load_in_4bit": True}, {"quant_method": "gptq", "bits": 4},
                                {"quant_method": "awq"}])
def test_a_prequantized_folder_is_refused_naming_what_works(tiny_model, tmp_path, qc):
    import shutil

    from edgetune.formats.errors import ModelError
    from edgetune.workstation.export import export

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    with pytest.raises(ModelError, match=rf"already quantized \({qc['quant_method']}\).*--quantize int4"):
        export(str(folder), tmp_path / "b", AdapterConfig(rank=4, alpha=8, targets=("q_proj",)))
    assert not (tmp_path / "b").exists()


def test_qlora_dora_matches_pytorch_peft_on_the_dequantized_base(tiny_model, chat_data, tmp_path):
    """DoRA on an int4 base: the magnitudes start from the dequantized rows (as PEFT's DoRA does
    on a bitsandbytes base), the norms fed while training come from them too, and 10 steps agree
    with PyTorch + PEFT on the dequantized weights. Then merge into a float base and pack."""
    pytest.importorskip("torch")
    import torch_reference

    from edgetune.app import merge as merge_mod
    from edgetune.workstation.export import export, inject_adapter

    cfg = AdapterConfig(method="dora", rank=4, alpha=8, targets=("q_proj", "v_proj"), quantize="int4")
    bundle = export(str(tiny_model), tmp_path / "b", cfg)
    steps, lr, bs, seed = 10, 1e-2, 4, 0
    run = trainer.train(bundle, chat_data, tmp_path / "run", steps=steps, lr=lr, batch_size=bs, seed=seed,
                        schedule="constant", progress=False, log=lambda s: None)
    hf, m = _dequantized_torch_model(tiny_model, bundle)
    q_weights = set(m["quantization"]["weights"])
    assert {f"base_model.model.model.layers.{i}.self_attn.{t}.base_layer.weight" for i in (0, 1)
            for t in ("q_proj", "v_proj")} <= q_weights  # the DoRA layers' bases are int4 too
    pm = inject_adapter(hf, AdapterConfig(method="dora", rank=4, alpha=8, targets=("q_proj", "v_proj")))
    theirs, params = torch_reference.train_like_peft(pm, bundle, chat_data, steps, lr, bs, seed)
    np.testing.assert_allclose(torch_reference.edgetune_losses(run.out), theirs, rtol=0, atol=1e-5)
    assert torch_reference.worst_adapter_error(run.out, params) < 1e-4
    # The bundle's inference graph with the trained adapter, and the merge into a float base,
    # give the logits PyTorch + PEFT gives on the dequantized base.
    torch_reference.assert_same_logits(pm, bundle, run.out)
    merge_mod.merge(bundle, [run.out], tmp_path / "merged")
    torch_reference.assert_same_logits(pm, tmp_path / "merged")


def test_untied_lm_head_is_quantized(tmp_path):
    """Every linear weight of the decoder and an untied lm_head are int4; the embedding stays
    float32 (it is read a few rows at a time)."""
    pytest.importorskip("torch")
    from test_architectures import make_family

    from edgetune.workstation.export import export

    model = make_family("mistral", tmp_path / "m")
    assert not json.loads((model / "config.json").read_text()).get("tie_word_embeddings")
    bundle = export(str(model), tmp_path / "b", AdapterConfig(rank=4, alpha=8, targets=("q_proj",), quantize="int4"))
    m = json.loads((bundle / "edgetune.json").read_text())
    names = m["quantization"]["weights"]
    assert len(names) == 2 * 7 + 1 and "base_model.model.lm_head.weight" in names
    assert m["train_weights"]["base_model.model.model.embed_tokens.weight"]["dtype"] == "float32"


@pytest.mark.parametrize("base", ["int8", "int4"])
def test_int8_compute_trains_with_int8_products_forward_and_backward(base, tiny_model, chat_data, tmp_path):
    """A compute-int8 bundle runs no dequantization: every frozen product, the input gradients
    included, is an int8 MatMulNBits; its losses stay close to the same base with float32
    products, and differ from them (the int8 kernels ran). An int4 base's products are split
    (a MatMulNBits without zero points plus their correction, a MatMul on block sums)."""
    import onnx

    from edgetune.workstation.export import export

    losses = {}
    for compute in ("float32", "int8"):
        b = export(str(tiny_model), tmp_path / compute, AdapterConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"),
                                                                       quantize=base, block_size=16, compute=compute))
        m = json.loads((b / "edgetune.json").read_text())
        q = m["quantization"]
        assert q["compute"] == compute
        copies = [t for w in q["weights"] for t in quantized.tensor_names(w, copy=True)]
        if compute == "int8":  # the manifest counts the copies the graphs read: all but layer 0's q, k, v
            read = [w for w in q["weights"] if quantized.tensor_names(w, copy=True)[0] in m["train_weights"]]
            assert len(read) == 11
            # each copy of W [N, K]: int8 codes [K, N/16, 16], a float32 scale and a uint8 zero point per block
            sizes = [np.prod(q["merge_layout"][w]["shape"]) for w in read]
            assert q["transposed_bytes"] == sum(nk + nk // 16 * 5 for nk in sizes)
        else:
            assert "transposed_bytes" not in q and not set(copies) & set(m["train_weights"])
        for f in ("train.onnx", "train_fused.onnx"):
            if not (b / f).is_file():
                continue
            g = onnx.load(str(b / f), load_external_data=False).graph
            nbits = [nd for nd in g.node if nd.op_type == "MatMulNBits"]
            on_copy = [nd for nd in nbits if nd.input[1].endswith(".qT")]
            dequant = [nd for nd in g.node if nd.op_type == "BitShift"]
            if compute == "int8":
                # 14 weights forward; input gradients of all but the first layer's q, k, v.
                assert len(nbits) == 25 and len(on_copy) == 11 and not dequant
                assert all(a.i == 4 for nd in nbits for a in nd.attribute if a.name == "accuracy_level")
                assert {i.name for i in g.initializer} >= {nd.input[k] for nd in on_copy for k in (1, 2, 3)}
                assert all(len(nd.input) == (4 if base == "int8" else 3) for nd in nbits if nd not in on_copy)
            else:
                assert len(nbits) == 14 and not on_copy and len(dequant) == 11 * (1 if base == "int8" else 3)
        logged = []
        run = trainer.train(b, chat_data, tmp_path / f"run-{compute}", steps=10, lr=1e-2, batch_size=4, seed=0,
                            schedule="constant", progress=False, log=logged.append)
        # On a CPU without int8 dot products (this AVX2 one), training and doctor say the products are slow here.
        slow_here = compute == "int8" and cpu.int8_dot() is False
        assert any(line.startswith("int8 products: this CPU has no int8") for line in logged) == slow_here
        checks = [c for c in doctor.run([b], install=False)["checks"] if c["what"].endswith("int8 products")]
        assert [c["ok"] for c in checks] == ([] if compute == "float32" else [not slow_here])
        losses[compute] = np.array([r["loss"] for r in map(json.loads, (run.out / "metrics.jsonl").read_text().splitlines())
                                    if "loss" in r])
    assert len(losses["int8"]) == 10
    gap = np.abs(losses["int8"] - losses["float32"]).max()
    assert 1e-6 < gap < 0.01 * losses["float32"].max(), gap


@pytest.mark.parametrize("line,has", [("flags\t\t: fpu sse2 avx avx2 fma f16c", False),
                                      ("flags\t\t: fpu avx2 avx512f avx512_vnni", True),
                                      ("flags\t\t: fpu avx2 avx_vnni", True),
                                      ("flags\t\t: avx512f amx_bf16 amx_tile amx_int8", True),
                                      ("Features\t: fp asimd evtstrm aes crc32", False),
                                      ("Features\t: fp asimd asimddp", True)])
def test_int8_dot_products_are_read_from_the_cpu_flags(line, has, tmp_path):
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\n{line}\n\nprocessor\t: 1\n{line}\n")
    assert cpu.int8_dot(str(tmp_path / "cpuinfo")) is has
    assert bool(cpu.int8_products_warning(str(tmp_path / "cpuinfo"))) is not has
    assert cpu.int8_dot(str(tmp_path / "none")) is not False  # unknown is never called slow
