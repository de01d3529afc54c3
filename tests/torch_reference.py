"""The reference the parity tests compare against: PyTorch + PEFT trained as PEFT's
documentation trains (torch.optim.AdamW, defaults), on edgetune's own batches."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def edgetune_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def train_like_peft(pm, bundle: Path, data_dir: Path, steps: int, lr: float, batch_size: int, seed: int):
    """Load the bundle's initial adapter into ``pm`` (a PEFT model), train ``steps`` steps on the
    same batches edgetune draws; return (losses, {graph name: parameter})."""
    import torch

    from edgetune.device import data, runner
    from edgetune.device.tokenizer import ChatTokenizer

    manifest = json.loads((Path(bundle) / "edgetune.json").read_text())
    init = runner.read_tensors(Path(bundle) / "adapter_init.safetensors")
    params = dict(pm.named_parameters())
    names = manifest["trainable"]
    with torch.no_grad():
        for n in names:
            params[n].copy_(torch.from_numpy(init[n]))
    opt = torch.optim.AdamW([params[n] for n in names], lr=lr)
    tok = ChatTokenizer.from_dir(bundle)
    ds = data.load_dataset(Path(data_dir) / "train.jsonl", tok, 512)
    batches = (data.epoch_batches(ds, batch_size, seed, 0, tok.pad_id)
               + data.epoch_batches(ds, batch_size, seed, 1, tok.pad_id))
    losses = []
    pm.train()
    for b in batches[:steps]:
        logits = pm(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.attention_mask)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.from_numpy(b.labels).reshape(-1),
                                                 ignore_index=-100, reduction="sum") / b.n_labels
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: params[n] for n in names}


def worst_adapter_error(run_dir: Path, params) -> float:
    """The largest relative difference, over adapter tensors, between edgetune's saved adapter
    and the reference's, measured by each tensor's norm."""
    from edgetune.formats import peft_io

    mine = peft_io.load(run_dir)[1]
    return max(float(np.linalg.norm(mine[peft_io.to_peft_name(n)] - p.detach().numpy())
                     / np.linalg.norm(p.detach().numpy())) for n, p in params.items())


def assert_same_logits(torch_model, path: Path, adapter: Path | None = None, n: int = 25) -> None:
    """The inference graph at ``path`` (a bundle with ``adapter``, or a merged model) gives
    ``torch_model``'s logits on one sequence of ``n`` tokens."""
    import torch

    from edgetune.device.infer import Model

    torch_model.eval()
    ids = np.asarray([list(range(5, 5 + n))], np.int64)
    with torch.no_grad():
        want = torch_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = Model.open(path, adapter=adapter).logits(ids, np.ones_like(ids))
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()))
