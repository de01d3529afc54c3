"""App directories opened by onnxruntime-genai itself, in an environment that holds only
onnxruntime-genai and what it pulls in (.venv-genai, from tests/requirements-app.txt, built on
first use). Its greedy tokens must equal ``edgetune generate``'s, token for token."""
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest
from venvs import side_env

from edgetune.app import pack
from edgetune.app.verify import verify
from edgetune.device import infer, trainer
from edgetune.formats.appdir import read_adapter
from edgetune.formats.errors import BundleError

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["hello world", "classify this ticket: the app crashes when I log in", "my invoice is wrong"]
NEW_TOKENS = 32
pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"),
                                reason="onnxruntime-genai publishes wheels for x86-64 and arm64")


def genai_python() -> Path:
    py = side_env(".venv-genai", "import onnxruntime_genai", ["-r", str(ROOT / "tests" / "requirements-app.txt")])
    # The app environment must not be able to import edgetune.
    assert subprocess.run([str(py), "-c", "import edgetune"], capture_output=True, cwd="/").returncode != 0
    return py


@pytest.fixture(scope="module")
def og_python() -> Path:
    return genai_python()


def run_app(py: Path, app: Path, prompts=PROMPTS, bad=(), new_tokens=NEW_TOKENS) -> dict:
    p = subprocess.run([str(py), str(ROOT / "tests" / "app_genai.py"), str(app), "--prompts", json.dumps(prompts),
                        "--max-new-tokens", str(new_tokens), "--logits", "--bad", *map(str, bad)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, cwd="/")
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def edgetune_reply(model_dir: Path, prompt: str, adapter=None, new_tokens=NEW_TOKENS) -> dict:
    m = infer.Model.open(model_dir, adapter)
    return infer.generate_full(model_dir, prompt, model=m, max_new_tokens=new_tokens)


@pytest.fixture(scope="module")
def runs(tiny_bundle, chat_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("genai")
    kw = dict(steps=30, lr=3e-2, batch_size=4, progress=False, log=lambda s: None)
    return (trainer.train(tiny_bundle, chat_data, root / "tickets", **kw).out,
            trainer.train(tiny_bundle, chat_data, root / "other", seed=5, lr=1e-2, **{k: v for k, v in kw.items() if k != "lr"}).out)


def check_same_tokens(got: dict, app: Path, bundle: Path | None = None, runs_by_name: dict | None = None,
                      prompts=PROMPTS, logits_atol=1e-4) -> None:
    seen = {}
    for r in got["runs"]:
        ours = edgetune_reply(app, r["prompt"], r["adapter"])
        assert r["prompt_ids"] == ours["prompt_token_ids"], "chat template or tokenizer differs"
        assert r["ids"] == ours["token_ids"], (r["adapter"], r["prompt"])
        # The next-token distribution after the prompt, not only its argmax.
        m = infer.Model.open(app, r["adapter"])
        ids = np.asarray([ours["prompt_token_ids"]], np.int64)
        want = m.logits(ids, np.ones_like(ids))[0, -1]
        np.testing.assert_allclose(np.asarray(r["logits"]), want, atol=logits_atol * max(1.0, np.abs(want).max()))
        assert r["stopped"] == (len(ours["token_ids"]) < NEW_TOKENS)
        key = (r["adapter"], r["prompt"])
        # Switching adapters on one model: the same adapter gives the same tokens every time.
        assert seen.setdefault(key, r["ids"]) == r["ids"]
        if bundle is not None and r["adapter"] is not None:
            # The float32-packed adapter is the run's adapter: the bundle gives the same tokens.
            assert edgetune_reply(bundle, r["prompt"], runs_by_name[r["adapter"]])["token_ids"] == r["ids"]
    outs = {a: [r["logits"] for r in got["runs"] if r["adapter"] == a][:len(prompts)]
            for a in {r["adapter"] for r in got["runs"]}}
    for a in outs:
        for b in outs:
            if a != b:  # every adapter (and none) gives other logits
                assert np.abs(np.asarray(outs[a]) - np.asarray(outs[b])).max() > 1e-3, (a, b)


def test_genai_opens_the_app_dir_and_matches_edgetune_generate(og_python, tiny_bundle, runs, tmp_path):
    app = tmp_path / "app"
    pack.pack(runs[0], tiny_bundle, app, name="tickets", dtype="float32")
    pack.pack(runs[1], tiny_bundle, app, name="other", dtype="float32")
    assert verify(app)["ok"]
    got = run_app(og_python, app)
    assert got["onnxruntime_genai"].startswith("0.")
    check_same_tokens(got, app, tiny_bundle, {"tickets": runs[0], "other": runs[1]})


def test_float16_adapters_and_ort_format(og_python, tiny_bundle, runs, tmp_path):
    app = tmp_path / "app"
    pack.pack(runs[0], tiny_bundle, app, name="tickets", ort_format=True)
    pack.pack(runs[1], tiny_bundle, app, name="other")
    cfg = json.loads((app / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["filename"] == "base.ort"
    assert verify(app)["ok"]
    check_same_tokens(run_app(og_python, app), app)


def test_dora_adapter_in_genai(og_python, dora_bundle, chat_data, tmp_path):
    run = trainer.train(dora_bundle, chat_data, tmp_path / "run", steps=40, lr=5e-2, batch_size=4, progress=False,
                        log=lambda s: None).out
    app = tmp_path / "app"
    pack.pack(run, dora_bundle, app, name="dora", dtype="float32")
    got = run_app(og_python, app)
    check_same_tokens(got, app, dora_bundle, {"dora": run})


def test_mismatched_adapter_what_genai_and_verify_say(og_python, tiny_bundle, runs, tmp_path):
    app = tmp_path / "app"
    pack.pack(runs[0], tiny_bundle, app, name="tickets")
    params = read_adapter(app / "tickets.onnx_adapter")["parameters"]
    # An adapter made for another base: the same tensor names, another rank.
    pack.write_adapter(tmp_path / "rank2.onnx_adapter", [(k, v[:2] if ".lora_A." in k else v[:, :2])
                                                         for k, v in params.items()])
    pack.write_adapter(tmp_path / "names.onnx_adapter", [("not.an.input", np.zeros((2, 2), np.float16))])
    whole = (app / "tickets.onnx_adapter").read_bytes()
    (tmp_path / "cut.onnx_adapter").write_bytes(whole[: len(whole) // 2])  # a download that stopped halfway
    got = run_app(og_python, app, prompts=PROMPTS[:1], new_tokens=4,
                  bad=[tmp_path / "rank2.onnx_adapter", tmp_path / "names.onnx_adapter", tmp_path / "cut.onnx_adapter"])
    said = got["bad"]
    assert "invalid dimensions" in said[str(tmp_path / "rank2.onnx_adapter")], said
    assert "Invalid input name: not.an.input" in said[str(tmp_path / "names.onnx_adapter")], said
    assert said[str(tmp_path / "cut.onnx_adapter")] != "accepted", said
    # verify, which the README tells app builds to run, names both problems before the app runs.
    (app / "rank2.onnx_adapter").write_bytes((tmp_path / "rank2.onnx_adapter").read_bytes())
    m = json.loads((app / "manifest.json").read_text())
    m["adapters"]["rank2"] = {**m["adapters"]["tickets"], "file": "rank2.onnx_adapter",
                              "sha256": pack._io.sha256_file(app / "rank2.onnx_adapter")}
    (app / "manifest.json").write_text(json.dumps(pack._io.seal(m)))
    with pytest.raises(BundleError) as e:
        verify(app)
    assert "adapter rank2: tensor" in str(e.value) and "has shape" in str(e.value)


def test_verify_names_a_missing_or_edited_genai_config(tiny_bundle, runs, tmp_path):
    app = tmp_path / "app"
    pack.pack(runs[0], tiny_bundle, app, name="tickets")
    cfg = json.loads((app / "genai_config.json").read_text())
    cfg["model"]["decoder"]["num_hidden_layers"] += 1
    (app / "genai_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError) as e:
        verify(app)
    assert "genai_config.json does not match its sha256" in str(e.value)
    assert "num_hidden_layers is 3, the base model has 2" in str(e.value)
    (app / "genai_config.json").unlink()
    with pytest.raises(BundleError, match="genai_config.json is missing"):
        verify(app)


def test_truncated_adapter_is_named_by_verify(tiny_bundle, runs, tmp_path):
    app = tmp_path / "app"
    pack.pack(runs[0], tiny_bundle, app, name="tickets")
    f = app / "tickets.onnx_adapter"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(BundleError, match="adapter tickets: tickets.onnx_adapter does not match its sha256"):
        verify(app)


def test_example_chat_app_runs_with_genai_only(og_python, tiny_bundle, runs, tmp_path):
    app = tmp_path / "app"
    pack.pack(runs[0], tiny_bundle, app, name="tickets")
    chat = ROOT / "examples" / "app" / "chat.py"
    env = {**os.environ, "PYTHONPATH": ""}
    want = edgetune_reply(app, PROMPTS[1], "tickets", new_tokens=12)["text"]
    p = subprocess.run([str(og_python), str(chat), str(app), "--adapter", "tickets", "--prompt", PROMPTS[1],
                        "--max-new-tokens", "12"], capture_output=True, text=True, env=env, cwd="/")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout == want + "\n"
    # The interactive loop: switch to the adapter, ask, back to the base, ask, quit.
    p = subprocess.run([str(og_python), str(chat), str(app), "--max-new-tokens", "12"], capture_output=True, text=True,
                       env=env, cwd="/", input=f"/adapter tickets\n{PROMPTS[1]}\n/adapter nope\n/quit\n")
    assert p.returncode == 0, p.stderr[-2000:]
    assert want in p.stdout and "no adapter 'nope'; packed: tickets" in p.stdout
    p = subprocess.run([str(og_python), str(chat), str(app), "--adapter", "nope", "--prompt", "x"],
                       capture_output=True, text=True, env=env, cwd="/")
    assert p.returncode != 0 and "no adapter 'nope'" in p.stderr


def test_generation_stops_on_every_stop_token_of_the_generation_config(og_python, tiny_model, tiny_bundle, chat_data,
                                                                        tmp_path):
    """A model whose generation config lists an end-of-turn token beside eos (as Llama-3 and
    Phi-3 do): edgetune and the app both stop on it. Listing the first token of the base model's
    greedy reply (taken from `edgetune generate` here) must end every reply at once."""
    import shutil

    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    ids = edgetune_reply(tiny_bundle, PROMPTS[0])["token_ids"]
    assert len(ids) >= 2 and ids[0] != 2, ids  # eos only: the reply goes on past its first token
    first = ids[0]
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, first]}))
    bundle = export(str(model), tmp_path / "bundle", AdapterConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    assert json.loads((bundle / "tokenizer_meta.json").read_text())["stop_token_ids"] == [2, first]
    run = trainer.train(bundle, chat_data, tmp_path / "run", steps=2, progress=False, log=lambda s: None).out
    app = tmp_path / "app"
    pack.pack(run, bundle, app, name="x", dtype="float32")
    assert json.loads((app / "genai_config.json").read_text())["model"]["eos_token_id"] == [2, first]
    got = run_app(og_python, app, prompts=PROMPTS[:1])
    base = [r for r in got["runs"] if r["adapter"] is None][0]
    assert base["stopped"] and base["ids"] == [] == edgetune_reply(app, PROMPTS[0])["token_ids"]
    assert edgetune_reply(bundle, PROMPTS[0])["token_ids"] == []
