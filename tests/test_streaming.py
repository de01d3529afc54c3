"""Export streams the weights: the model is traced without its weights, and each weight goes from
the checkpoint to the graphs' data files one at a time. These tests would fail if export loaded
the model as a whole, if a checkpoint layout (shards, bfloat16, pytorch_model.bin) were read
wrongly, or if a missing tensor gave anything but a clear error."""
import shutil

import numpy as np
import pytest

from edgetune.formats.config import AdapterConfig
from edgetune.formats.errors import ModelError

torch = pytest.importorskip("torch")
CFG = AdapterConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))


def _logits_match(model_dir, bundle, dtype=torch.float32):
    import torch_reference
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").float()
    torch_reference.assert_same_logits(hf, bundle)


def test_export_never_loads_the_model(tiny_model, tmp_path, monkeypatch):
    """No from_pretrained, and every base parameter of the traced model is a placeholder of one
    element: a model of any size costs one weight at a time."""
    import transformers

    from edgetune.workstation import export as ex

    def refuse(*a, **k):
        raise AssertionError("export loaded the whole model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    hf, _, source = ex.load_skeleton(tiny_model)
    sizes = {n: p.untyped_storage().nbytes() for n, p in hf.named_parameters()}
    assert sizes and max(sizes.values()) <= 4, sizes
    reads = []
    real_get = source.get
    monkeypatch.setattr(ex.weights.SourceWeights, "get", lambda self, name: reads.append(name) or real_get(name))
    bundle = ex.export(str(tiny_model), tmp_path / "b", CFG)
    # Each base weight is read once for the training data file and once for the inference one.
    counts = {n: reads.count(n) for n in set(reads)}
    assert set(counts.values()) == {2}, counts
    monkeypatch.undo()
    _logits_match(tiny_model, bundle)


def test_sharded_bfloat16_checkpoint(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "bf16"
    hf = AutoModelForCausalLM.from_pretrained(tiny_model)
    hf.to(torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model / f).is_file():
            shutil.copy(tiny_model / f, folder / f)
    assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").is_file()
    from edgetune.workstation.export import export

    bundle = export(str(folder), tmp_path / "b", CFG)
    _logits_match(folder, bundle, torch.bfloat16)


def test_a_pytorch_pickle_checkpoint_is_refused_not_unpickled(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from edgetune.workstation.export import export

    folder = tmp_path / "bin"
    shutil.copytree(tiny_model, folder)
    sd = load_file(str(folder / "model.safetensors"))
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"pytorch_model\.bin is a PyTorch pickle checkpoint.*convert it to safetensors"):
        export(str(folder), tmp_path / "b", CFG)
    assert not (tmp_path / "b").exists()


def test_a_tensor_missing_from_the_checkpoint_is_named(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from edgetune.workstation.export import export

    folder = tmp_path / "cut"
    shutil.copytree(tiny_model, folder)
    sd = load_file(str(folder / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"no tensor for model\.layers\.1\.mlp\.down_proj\.weight"):
        export(str(folder), tmp_path / "b", CFG)
    assert not (tmp_path / "b").exists()


def test_a_tensor_of_the_wrong_shape_is_named(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from edgetune.workstation.export import export

    folder = tmp_path / "shape"
    shutil.copytree(tiny_model, folder)
    sd = load_file(str(folder / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:-1].contiguous()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"up_proj.*shape \[127, 64\].*expects \[128, 64\]"):
        export(str(folder), tmp_path / "b", CFG)


def test_data_files_are_page_aligned_for_large_tensors(tmp_path):
    """Weights of 1 MB or more start on a 4 KB boundary (so ONNX Runtime can map them)."""
    import onnx
    from onnx import helper, numpy_helper

    from edgetune.workstation import extdata

    big = np.arange(300_000, dtype=np.float32).reshape(600, 500)
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "v"], ["z"])],
                          "g", [helper.make_tensor_value_info("x", 1, [600, 500])],
                          [helper.make_tensor_value_info("z", 1, [600, 500])],
                          [numpy_helper.from_array(np.ones((600, 500), np.float32), "v")])
    t = onnx.TensorProto(name="w", data_type=1)
    t.dims.extend([600, 500])
    g.initializer.append(t)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    extdata.write_external(m, tmp_path / "m.onnx", "m.data", {"w": lambda: big}, threshold=0)
    loaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    offsets = {i.name: int({e.key: e.value for e in i.external_data}["offset"]) for i in loaded.graph.initializer}
    assert set(offsets) == {"v", "w"} and all(off % 4096 == 0 for off in offsets.values()), offsets
    import onnxruntime as ort

    x = np.full((600, 500), 2.0, np.float32)
    out = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, x + big + 1)
