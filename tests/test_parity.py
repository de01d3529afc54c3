"""edgetune's training on onnxruntime against PyTorch + PEFT on the same tiny Llama, batches and AdamW."""
import json

import numpy as np
import pytest

from edgetune import data, peft_io, runner, trainer
from edgetune.tokenizer import ChatTokenizer

torch = pytest.importorskip("torch")


def _initial_adapter(bundle):
    names = json.loads((bundle / "edgetune.json").read_text())["trainable"]
    init = runner.read_tensors(bundle / "adapter_init.safetensors")
    return {n: init[n] for n in names}


def test_matches_pytorch_peft(tiny_model, tiny_bundle, chat_data, tmp_path):
    from edgetune.config import AdapterConfig
    from edgetune.export import inject_adapter, load_model

    steps, lr, bs, seed = 10, 1e-2, 4, 0
    run = trainer.train(tiny_bundle, chat_data, tmp_path / "run", steps=steps, lr=lr, batch_size=bs, seed=seed,
                        schedule="constant", progress=False, log=lambda s: None)
    ort_losses = [json.loads(line)["loss"] for line in (run.out / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]

    hf, _ = load_model(tiny_model)
    cfg = AdapterConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    pm = inject_adapter(hf, cfg)
    init = _initial_adapter(tiny_bundle)
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for n, v in init.items():
            params[n].copy_(torch.from_numpy(v))
    trainable = [params[n] for n in init]
    # As PEFT's documentation trains: torch.optim.AdamW with its defaults.
    opt = torch.optim.AdamW(trainable, lr=lr)
    tok = ChatTokenizer.from_dir(tiny_bundle)
    ds = data.load_dataset(chat_data / "train.jsonl", tok, 512)
    batches = data.epoch_batches(ds, bs, seed, 0, tok.pad_id) + data.epoch_batches(ds, bs, seed, 1, tok.pad_id)
    torch_losses = []
    pm.train()
    for b in batches[:steps]:
        logits = pm(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.attention_mask)).logits
        labels = torch.from_numpy(b.labels)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum") / b.n_labels
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch_losses.append(loss.item())

    assert abs(ort_losses[0] - torch_losses[0]) < 1e-5
    np.testing.assert_allclose(ort_losses, torch_losses, rtol=0, atol=1e-5)  # every step, not only the first
    ours = peft_io.load(run.out)[1]
    for n in init:
        theirs = params[n].detach().numpy()
        mine = ours[peft_io.to_peft_name(n)]
        rel = np.abs(mine - theirs).max() / max(np.abs(theirs).max(), 1e-12)
        assert rel < 1e-4, (n, rel)


def test_peft_loads_our_adapter_and_matches_our_logits(tiny_model, tiny_bundle, chat_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgetune.infer import Model

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
