import json

from click.testing import CliRunner

from edgetune.cli import main
from edgetune.formats.version import __version__


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_version_and_help():
    assert invoke("--version").output.strip() == f"edgetune, version {__version__}"
    for cmd in ("export", "train", "eval", "generate", "devices"):
        r = invoke(cmd, "-h")
        assert r.exit_code == 0 and "Example" in r.output, cmd
    assert "fall back to the CPU" in invoke("train", "--help").output


def test_models_list_json():
    rows = json.loads(invoke("models", "list", "--json").output)
    assert rows[0]["name"] == "smollm2-135m-instruct"
    assert rows[0]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_devices_json_lists_cpu_and_vitisai():
    rows = {r["name"]: r for r in json.loads(invoke("devices", "--json").output)}
    assert rows["cpu"]["available"] is True
    assert rows["vitisai"]["provider"] == "VitisAIExecutionProvider"


def test_errors_are_one_line_with_exit_code_1(tmp_path, tiny_bundle):
    r = invoke("train", tmp_path / "nobundle", "--data", tmp_path, "--out", tmp_path / "run")
    assert r.exit_code == 1
    assert r.output.strip() == f"Error: bundle not found: {tmp_path / 'nobundle'} (create one with: edgetune export --out {tmp_path / 'nobundle'})"
    r = invoke("export", "no-such-model", "--out", tmp_path / "b")
    assert r.exit_code == 1 and "unknown model 'no-such-model'; known models: smollm2-135m-instruct" in r.output
    r = invoke("generate", tiny_bundle, "--device", "npu9", "-p", "hi")
    assert r.exit_code == 1 and "unknown device 'npu9'" in r.output


def test_malformed_jsonl_via_cli(tmp_path, tiny_bundle):
    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "fine"}\n{"text": \n')
    r = invoke("train", tiny_bundle, "--data", f, "--out", tmp_path / "run", "--steps", "1")
    assert r.exit_code == 1 and f"{f}:2: malformed JSON" in r.output
    assert not (tmp_path / "run").exists()


def test_train_eval_generate_json(tmp_path, tiny_bundle, chat_data):
    r = invoke("train", tiny_bundle, "--data", chat_data, "--out", tmp_path / "run", "--steps", "3", "-b", "4",
               "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output[r.output.index("{"):])
    assert summary["steps"] == 3
    r = invoke("eval", tiny_bundle, "--adapter", tmp_path / "run", "--data", chat_data / "test.jsonl", "--json")
    out = json.loads(r.output)
    assert set(out) >= {"loss", "perplexity", "tokens"}
    r = invoke("generate", tiny_bundle, "--adapter", tmp_path / "run", "-p", "hi", "-n", "3", "--json", "--placement")
    out = json.loads(r.output)
    assert out["providers"] == ["CPUExecutionProvider"]
    assert list(out["placement"]) == ["CPUExecutionProvider"] and out["placement"]["CPUExecutionProvider"] > 50
