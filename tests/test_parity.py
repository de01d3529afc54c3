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
    ids = np.asarray([list(range(5, 25))], np.int64)
    ours = m.logits(ids, np.ones_like(ids))
    with torch.no_grad():
        theirs = pm(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    plain = Model.open(tiny_bundle).logits(ids, np.ones_like(ids))
    assert np.abs(plain - ours).max() > 1e-3  # the adapter changes the output


def test_lora_dropout_trains_reproducibly_by_seed(tiny_model, chat_data, tmp_path):
    """--dropout above 0: the exported graph draws dropout masks in training (not in eval), the same
    seed gives the same run and another seed another one."""
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    bundle = export(str(tiny_model), tmp_path / "bundle", AdapterConfig(rank=4, alpha=8, dropout=0.2,
                                                                        targets=("q_proj", "v_proj")))
    kw = dict(steps=4, lr=1e-2, batch_size=4, progress=False, log=lambda s: None)
    a = trainer.train(bundle, chat_data, tmp_path / "a", seed=3, **kw)
    b = trainer.train(bundle, chat_data, tmp_path / "b", seed=3, **kw)
    la, lb = (torch_reference.edgetune_losses(r.out) for r in (a, b))
    assert la == lb
    pa, pb = peft_io.load(a.out)[1], peft_io.load(b.out)[1]
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    # On one batch, two seeds draw two different masks: the adapter gradients differ (the loss does not
    # yet: LoRA's B starts at zero, so the dropped branch adds nothing at step 0); the same seed repeats.
    t = trainer.Trainer(bundle, tmp_path / "d", trainer.TrainConfig(batch_size=4), progress=False, log=lambda s: None)
    train, _ = t.load_data(chat_data)
    t._open()
    batch = next(t._micro_batches(train))[2]
    feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels,
            "label_norm": np.asarray(batch.n_labels, np.float32)}
    grads = []
    for seed in (3, 3, 4):
        trainer._set_seed(seed)
        t.runner.accumulate(feed)
        grads.append({k: v.copy() for k, v in t.runner.grads.items()})
        t.runner.zero_grad()
    b_grads = [k for k in grads[0] if "lora_B" in k]
    assert all(np.array_equal(grads[0][k], grads[1][k]) for k in grads[0])
    assert all(not np.array_equal(grads[0][k], grads[2][k]) for k in b_grads)
