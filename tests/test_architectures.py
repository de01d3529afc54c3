"""The common families people fine-tune for devices, each a tiny random-weight model built from
its own transformers config, checked against PyTorch + PEFT: loss at step 0 within 1e-5, every
loss of 10 steps within 1e-5, the adapter within 1e-4 after them, and the exported inference
graph's logits equal to transformers'."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch_reference

from edgetune.device import trainer
from edgetune.formats.config import AdapterConfig

torch = pytest.importorskip("torch")

FAMILIES = {
    "llama": {},
    "qwen2": {},  # q/k/v biases
    "mistral": {},
    "phi3": {"original_max_position_embeddings": 256},  # fused qkv_proj and gate_up_proj
    "gemma2": {"head_dim": 16, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "sliding_window": 64},
}
TARGETS = {"phi3": [("qkv_proj", "o_proj"), ("all-linear",)]}


def make_family(family: str, out: Path) -> Path:
    import tiny
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = tiny.make_tokenizer(out)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **FAMILIES[family])
    model = AutoModelForCausalLM.from_config(cfg)
    if family == "qwen2":  # biases start at zero: make them count
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


CASES = [(f, t) for f in FAMILIES for t in TARGETS.get(f, [("all-linear",)])]


@pytest.mark.parametrize("family,targets", CASES, ids=[f"{f}-{'+'.join(t)}" for f, t in CASES])
def test_family_matches_pytorch_peft(family, targets, chat_data, tmp_path):
    from edgetune.workstation.export import export, inject_adapter, load_model

    model = make_family(family, tmp_path / "model")
    bundle = export(str(model), tmp_path / "bundle", AdapterConfig(rank=4, alpha=8, targets=targets))
    manifest = json.loads((bundle / "edgetune.json").read_text())
    steps, lr, bs, seed = 10, 1e-2, 4, 0
    run = trainer.train(bundle, chat_data, tmp_path / "run", steps=steps, lr=lr, batch_size=bs, seed=seed,
                        schedule="constant", progress=False, log=lambda s: None)
    ours = torch_reference.edgetune_losses(run.out)
    hf, _ = load_model(model)
    pm = inject_adapter(hf, AdapterConfig(**{**manifest["adapter"], "targets": tuple(manifest["adapter"]["targets"])}))
    theirs, params = torch_reference.train_like_peft(pm, bundle, chat_data, steps, lr, bs, seed)
    assert abs(ours[0] - theirs[0]) < 1e-5, (ours[0], theirs[0])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    # The adapter after 10 steps, relative to each tensor's norm (AdamW divides by the root of the
    # squared gradient, so an element whose gradient is float noise moves by float noise times lr).
    # Measured: 5e-7 to 9e-6 for most families; 1.0e-4 for qwen2 (its biases, drawn large here, make
    # larger activations) on an AVX-512 CPU, whose sums run in another order. A wrong gradient is
    # off by orders of magnitude more.
    worst = torch_reference.worst_adapter_error(run.out, params)
    print(f"{family}: worst adapter relative error {worst:.2e}")
    assert worst < 3e-4

    # The inference graph (KV cache) with the trained adapter equals transformers' logits.
    torch_reference.assert_same_logits(pm, bundle, run.out, n=35)


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gpt2"}, r"model type 'gpt2' is not supported; supported families: llama .*qwen2 .*gemma2"),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}},
     "LongRoPE .* use the 4k-context variant"),
])
def test_an_unsupported_model_is_refused_before_any_work(tiny_model, tmp_path, change, match):
    import shutil

    from edgetune.formats.errors import ModelError
    from edgetune.workstation.export import export

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ModelError, match=match):
        export(str(folder), tmp_path / "b", AdapterConfig(rank=4, alpha=8, targets=("q_proj",)))
    assert not (tmp_path / "b").exists()
