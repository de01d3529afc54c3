"""Federated fine-tuning through Flower: real SuperLink and SuperNode processes on this machine."""
import json
import sys

import numpy as np
import pytest
from conftest import ROOT

from edgetune.device import federated, infer
from edgetune.formats import bundle, peft_io
from edgetune.formats.errors import ConfigError

pytest.importorskip("flwr")
sys.path.insert(0, str(ROOT / "examples" / "federated"))


def _partitions(chat_data, root, n=2):
    rows = (chat_data / "train.jsonl").read_text().splitlines()
    parts = []
    for i in range(n):
        p = root / f"device-{i}"
        p.mkdir()
        (p / "train.jsonl").write_text("\n".join(rows[i::n]) + "\n")
        parts.append(p)
    return parts, [len(rows[i::n]) for i in range(n)]


def test_records_round_trip_and_mismatch_is_explained(tiny_bundle, dora_bundle):
    b = bundle.load(tiny_bundle)
    tensors = federated.initial_adapter(b)
    back = federated.from_record(federated.to_record(tensors), b)
    assert list(back) == b.trainable and all(np.array_equal(back[k], tensors[k]) for k in tensors)
    other = federated.initial_adapter(bundle.load(dora_bundle))
    with pytest.raises(ConfigError, match="does not fit bundle .* same export"):
        federated.from_record(federated.to_record(other), b)


def test_tensors_of_another_type_or_not_finite_are_refused(tiny_bundle):
    from flwr.app import Array, ArrayRecord

    b = bundle.load(tiny_bundle)
    tensors = federated.initial_adapter(b)
    first = b.trainable[0]
    rec = ArrayRecord()
    for name, value in tensors.items():
        rec[name] = Array(value.astype(np.float64) if name == first else value)
    with pytest.raises(ConfigError, match=rf"tensor {first} from the server is float64, adapters are float32"):
        federated.from_record(rec, b)
    bad = {**tensors, first: tensors[first].copy()}
    bad[first].flat[[0, 3]] = [np.nan, np.inf]
    with pytest.raises(ConfigError, match=rf"tensor {first} from the server holds NaN or inf \(2 values\)"):
        federated.from_record(federated.to_record(bad), b)


def test_local_round_trains_from_the_sent_adapter(tiny_bundle, chat_data, tmp_path):
    b = bundle.load(tiny_bundle)
    start = federated.initial_adapter(b)
    rng = np.random.default_rng(0)
    start = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()}
    new, metrics = federated.local_round(tiny_bundle, chat_data, tmp_path / "work", start, server_round=1,
                                         steps=2, lr=1e-2, batch_size=4)
    assert metrics["num-examples"] > 0 and np.isfinite(metrics["train_loss"]) and "valid_loss" in metrics
    for k in start:
        assert not np.array_equal(new[k], start[k])
        assert np.abs(new[k] - start[k]).max() < 0.05  # two small steps away from what was sent, not from scratch
    new2, _ = federated.local_round(tiny_bundle, chat_data, tmp_path / "work", new, server_round=2, steps=1,
                                    lr=1e-2, batch_size=4)
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["round-0002"]  # one round kept on the device


@pytest.mark.slow
def test_two_devices_federated_average(tiny_bundle, chat_data, tmp_path):
    import local_federation

    parts, sizes = _partitions(chat_data, tmp_path)
    out, logs = tmp_path / "fl-run", tmp_path / "logs"
    logs.mkdir()
    run = local_federation.run(tiny_bundle, out, parts, rounds=2, local_steps=3, lr=1e-2, batch_size=4, logs=logs)
    assert run["status"] == "complete" and run["federated"]["rounds"] == 2
    losses = [run["federated"]["train_metrics"][r]["train_loss"] for r in ("1", "2")]
    assert losses[1] < losses[0], losses
    # The result is FedAvg of what the devices sent back in the last round, weighted by their data.
    final = peft_io.load(out)[1]
    sent = [peft_io.load(logs / f"node-{i}" / "round-0002")[1] for i in range(2)]
    for k, v in final.items():
        want = (sizes[0] * sent[0][k] + sizes[1] * sent[1][k]) / sum(sizes)
        np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-7)
    # An ordinary run: evaluation takes it, and so does training on.
    ids = np.asarray([list(range(5, 20))], np.int64)
    assert np.isfinite(infer.Model.open(tiny_bundle, adapter=out).logits(ids, np.ones_like(ids))).all()
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["r"] == 4


def test_strategies_by_name():
    assert type(federated._strategy("FedAvg", 2)).__name__ == "FedAvg"
    assert type(federated._strategy("fedadam", 3)).__name__ == "FedAdam"
    with pytest.raises(ConfigError, match="unknown strategy 'fedmagic'; Flower has: .*fedavg"):
        federated._strategy("fedmagic", 2)
