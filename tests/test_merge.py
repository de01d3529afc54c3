"""edgetune merge: merged models equal base + adapter."""
import json

import numpy as np
import pytest

from edgetune.app import merge
from edgetune.device import infer, trainer
from edgetune.formats import peft_io
from edgetune.formats.errors import BundleError, ConfigError


@pytest.fixture(scope="module")
def runs(tiny_bundle, chat_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse")
    a = trainer.train(tiny_bundle, chat_data, root / "a", steps=10, lr=5e-2, batch_size=4, progress=False, log=lambda s: None)
    b = trainer.train(tiny_bundle, chat_data, root / "b", steps=10, lr=5e-2, batch_size=4, seed=7, progress=False,
                      log=lambda s: None)
    return a.out, b.out


IDS = np.asarray([[5, 9, 17, 33, 41, 50, 61, 70, 80, 90]], np.int64)


@pytest.mark.parametrize("impl", ["cpp", "numpy"])
def test_merged_onnx_equals_base_plus_adapter(tiny_bundle, runs, tmp_path, monkeypatch, impl):
    monkeypatch.setenv("EDGETUNE_IMPL", impl)
    s = merge.merge(tiny_bundle, [runs[0]], tmp_path / "m")
    assert s["implementation"] == impl
    merged = infer.Model.open(tmp_path / "m").logits(IDS, np.ones_like(IDS))
    want = infer.Model.open(tiny_bundle, adapter=runs[0]).logits(IDS, np.ones_like(IDS))
    np.testing.assert_allclose(merged, want, atol=2e-5)
    # No adapter input, initializer or node is left: no name in the graph file mentions one.
    assert b"lora" not in (tmp_path / "m" / "model.onnx").read_bytes().lower()


def test_generate_and_eval_accept_a_merged_model(tiny_bundle, runs, chat_data, tmp_path):
    merge.merge(tiny_bundle, [runs[0]], tmp_path / "m")
    a = infer.evaluate(tmp_path / "m", chat_data / "test.jsonl")
    b = infer.evaluate(tiny_bundle, chat_data / "test.jsonl", adapter=runs[0])
    assert abs(a["loss"] - b["loss"]) < 1e-4
    assert infer.generate(tmp_path / "m", "hello", max_new_tokens=5) == infer.generate(
        tiny_bundle, "hello", adapter=runs[0], max_new_tokens=5)
    with pytest.raises(BundleError, match="is a merged model"):
        infer.Model.open(tmp_path / "m", adapter=runs[0])


def test_weighted_blend_matches_manual_sum(tiny_bundle, runs, tmp_path):
    from safetensors.numpy import load_file

    from edgetune.formats import bundle

    merge.merge(tiny_bundle, list(runs), tmp_path / "blend", fmt="safetensors", weights=[0.7, -0.3])
    merged = load_file(str(tmp_path / "blend" / "model.safetensors"))
    b = bundle.load(tiny_bundle)
    data = np.fromfile(tiny_bundle / "infer.onnx.data", dtype=np.uint8)
    (_, ta), (_, tb) = peft_io.load(runs[0]), peft_io.load(runs[1])
    scale = b.adapter.scale
    for name, e in b.manifest["weights"].items():
        w = data[e["offset"]:e["offset"] + e["length"]].view(np.float32).reshape(e["shape"])
        module = "base_model.model." + name[: -len(".weight")]
        if module + ".lora_A.weight" in ta:
            want = w + scale * (0.7 * ta[module + ".lora_B.weight"] @ ta[module + ".lora_A.weight"]
                                - 0.3 * tb[module + ".lora_B.weight"] @ tb[module + ".lora_A.weight"])
        else:
            want = w
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_safetensors_folder_loads_in_transformers(tiny_model, tiny_bundle, runs, tmp_path, dtype):
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merge.merge(tiny_bundle, [runs[0]], tmp_path / "hf", fmt="safetensors", dtype=dtype)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                  dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager").eval()
    ref = PeftModel.from_pretrained(base, runs[0] / "adapter").merge_and_unload().eval()
    ids = torch.from_numpy(IDS)
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, ref(input_ids=ids).logits
    tol = 1e-4 if dtype == "float32" else 5e-2
    assert (got - want).abs().max().item() < tol * max(1.0, want.abs().max().item())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == dtype


def test_merge_errors(tiny_bundle, runs, tmp_path):
    with pytest.raises(ConfigError, match="ONNX output is float32"):
        merge.merge(tiny_bundle, [runs[0]], tmp_path / "x", dtype="float16")
    with pytest.raises(ConfigError, match="2 adapters but 1 weights"):
        merge.merge(tiny_bundle, list(runs), tmp_path / "x", weights=[0.5])
    cfg, tensors = peft_io.load(runs[0])
    bad = {k: v[:2] if ".lora_A." in k else v for k, v in tensors.items()}
    from edgetune.formats.config import AdapterConfig

    peft_io.save(tmp_path / "bad", bad, AdapterConfig(rank=2, alpha=8, targets=("q_proj", "v_proj")), "x")
    with pytest.raises(BundleError, match="does not fit bundle"):
        merge.merge(tiny_bundle, [tmp_path / "bad"], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        merge.merge(tiny_bundle, [runs[0]], tmp_path / "full")
