import json

import pytest

from edgetune.formats.config import AdapterConfig, TrainConfig, resolve
from edgetune.formats.errors import ConfigError


def test_defaults_and_scale():
    c = AdapterConfig()
    assert (c.rank, c.alpha, c.targets) == (8, 16.0, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert c.scale == 2.0


@pytest.mark.parametrize("kw,msg", [
    ({"rank": 0}, "rank must be a positive integer, got 0"),
    ({"dropout": 1.5}, "dropout must be in [0, 1), got 1.5"),
    ({"method": "ia3"}, "method must be one of lora, dora, got 'ia3'"),
])
def test_bad_adapter_values_name_the_value(kw, msg):
    with pytest.raises(ConfigError) as e:
        AdapterConfig(**kw)
    assert str(e.value) == msg


def test_precedence_cli_over_file_over_defaults(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": 0.01, "batch_size": 2}))
    c = resolve(TrainConfig, f, lr=0.5, batch_size=None)
    assert c.lr == 0.5 and c.batch_size == 2 and c.grad_accum == 1


def test_unknown_key_in_file_is_an_error(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"learning_rate": 0.01}))
    with pytest.raises(ConfigError, match="unknown key\\(s\\) learning_rate"):
        resolve(TrainConfig, f)


def test_targets_from_comma_string():
    c = resolve(AdapterConfig, None, targets="q_proj, v_proj")
    assert c.targets == ("q_proj", "v_proj")


def test_bad_type_is_reported():
    with pytest.raises(ConfigError, match="steps: cannot use 'ten'"):
        resolve(TrainConfig, None, steps="ten")


def test_export_does_not_flood_the_terminal(tiny_model, tmp_path, capfd):
    """ORT's graph builder logs every transformer at INFO level unless told otherwise."""
    from edgetune.workstation.export import export

    export(str(tiny_model), tmp_path / "b", AdapterConfig(rank=2, targets=("q_proj",)))
    err = capfd.readouterr().err
    assert "I:onnxruntime" not in err and "W:onnxruntime" not in err, err[-2000:]
