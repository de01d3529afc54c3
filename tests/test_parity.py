"""edgetune's training on onnxruntime against PyTorch + PEFT on the same tiny Llama, batches and AdamW."""
import numpy as np
import pytest
import torch_reference

from edgetune.device import trainer
from edgetune.formats import peft_io

torch = pytest.importorskip("torch")


def test_matches_pytorch_peft(tiny_model, tiny_bundle, chat_data, tmp_path):
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import inject_adapter, load_model

    steps, lr, bs, seed = 10, 1e-2, 4, 0
    run = trainer.train(tiny_bundle, chat_data, tmp_path / "run", steps=steps, lr=lr, batch_size=bs, seed=seed,
                        schedule="constant", progress=False, log=lambda s: None)
    hf, _ = load_model(tiny_model)
    pm = inject_adapter(hf, AdapterConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    torch_losses, params = torch_reference.train_like_peft(pm, tiny_bundle, chat_data, steps, lr, bs, seed)
    ort_losses = torch_reference.edgetune_losses(run.out)
    assert abs(ort_losses[0] - torch_losses[0]) < 1e-5
    np.testing.assert_allclose(ort_losses, torch_losses, rtol=0, atol=1e-5)  # every step, not only the first
    ours = peft_io.load(run.out)[1]
    for n, p in params.items():
        theirs = p.detach().numpy()
        mine = ours[peft_io.to_peft_name(n)]
        rel = np.abs(mine - theirs).max() / max(np.abs(theirs).max(), 1e-12)
        assert rel < 1e-4, (n, rel)


def test_peft_loads_our_adapter_and_matches_our_logits(tiny_model, tiny_bundle, chat_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgetune.device.infer import Model

    run = trainer.train(tiny_bundle, chat_data, tmp_path / "run", steps=5, lr=5e-2, batch_size=4,
                        progress=False, log=lambda s: None)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager")
    pm = PeftModel.from_pretrained(base, run.out / "adapter").eval()
    m = Model.open(tiny_bundle, adapter=run.out)
    ids = np.asarray([tok_ids := list(range(5, 25))], np.int64)
    ours = m.logits(ids, np.ones_like(ids))
    with torch.no_grad():
        theirs = pm(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    plain = Model.open(tiny_bundle).logits(ids, np.ones_like(ids))
    assert np.abs(plain - ours).max() > 1e-3  # the adapter changes the output
