"""Training inside an app: examples/cpp's trainer (the ONNX Runtime C++ API, no Python) against
`edgetune train`, across resumes and kills, and with bad input."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DEVICE_ONLY, ROOT, SAMPLE_DATA, built_once

from edgetune.formats.run import read_tensors

EDGETUNE = [sys.executable, "-m", "edgetune"]
PLAIN = {"EDGETUNE_KERNELS": "plain"}  # both trainers run the same (plain) graphs unless a test says otherwise
STEPS = 10
OPTS = ["--batch-size", "2", "--lr", "3e-3", "--warmup", "2", "--schedule", "cosine", "--seed", "3"]


@pytest.fixture(scope="session")
def cpp_trainer(tmp_path_factory) -> Path:
    """examples/cpp built as its README says (CMake, the wheel's library, Debian's headers)."""
    cmake = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")
    if cmake is None or shutil.which("c++") is None:
        if DEVICE_ONLY:
            pytest.skip("no cmake or C++ compiler in this device environment")
        pytest.fail("cmake and a C++ compiler are needed to build examples/cpp (pip install cmake)")

    def build(out: Path) -> None:
        for cmd in ([cmake, "-S", str(ROOT / "examples" / "cpp"), "-B", str(out), f"-DPython_EXECUTABLE={sys.executable}"],
                    [cmake, "--build", str(out), "-j2"]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    exe = built_once(tmp_path_factory, "cpp-trainer", build) / "edgetune-train-cpp"
    assert exe.is_file()
    return exe


def run(cmd: list, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env={**os.environ, **PLAIN, **(env or {})})
    if check:
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    return r


def tokenize(bundle: Path, data: Path, out: Path, steps: int = STEPS, opts: list = OPTS) -> Path:
    run([*EDGETUNE, "tokenize", data, "--bundle", bundle, "--out", out, "--steps", steps, *opts])
    return out


def py_train(bundle: Path, data: Path, out: Path, steps: int = STEPS, *extra, env: dict | None = None,
             check: bool = True, opts: list = OPTS) -> subprocess.CompletedProcess:
    return run([*EDGETUNE, "train", bundle, "--data", data, "--out", out, "--steps", steps, "--no-progress", *opts,
                *extra], env=env, check=check)


def cpp_train(exe: Path, bundle: Path, batches: Path, out: Path, steps: int = STEPS, *extra, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    return run([exe, bundle, batches, "--out", out, "--steps", steps, "--quiet", *extra], env=env, check=check)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip() and "loss" in json.loads(line)]


def final_adapter(run_dir: Path) -> dict[str, np.ndarray]:
    ck = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return read_tensors(ck / "adapter.safetensors")


def assert_same_adapter(a: dict, b: dict, rel: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = max(float(np.abs(b[k]).max()), 1e-12)
        assert float(np.abs(a[k] - b[k]).max()) / scale <= rel, k


@pytest.fixture(scope="session")
def int4_bundles(request, tmp_path_factory) -> dict[str, Path]:
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    model = request.getfixturevalue("tiny_model")
    out = {}
    for method in ("lora", "dora"):
        out[method] = tmp_path_factory.mktemp(f"{method}_int4") / "b"
        export(str(model), out[method], AdapterConfig(method=method, rank=4, alpha=8, targets=("q_proj", "v_proj"),
                                                      quantize="int4", block_size=16))
    return out


@pytest.fixture(scope="session")
def bf16_bundle(request, tmp_path_factory) -> Path:
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    out = tmp_path_factory.mktemp("lora_bf16") / "b"
    export(str(request.getfixturevalue("tiny_model")), out, AdapterConfig(rank=4, alpha=8, compute="bf16"))
    return out


@pytest.fixture(params=["lora", "dora", "lora-int4", "dora-int4", "lora-bf16"])
def any_bundle(request, tiny_bundle, dora_bundle) -> Path:
    if request.param == "lora":
        return tiny_bundle
    if request.param == "dora":
        return dora_bundle
    if DEVICE_ONLY:
        pytest.skip("exporting the int4 and bfloat16 bundles needs the workstation stack")
    if request.param == "lora-bf16":  # bfloat16 weights behind standard Casts in the plain graph
        return request.getfixturevalue("bf16_bundle")
    return request.getfixturevalue("int4_bundles")[request.param.split("-")[0]]


def test_cpp_trainer_takes_the_python_trainers_steps(cpp_trainer, any_bundle, chat_data, tmp_path):
    batches = tokenize(any_bundle, chat_data, tmp_path / "batches.safetensors")
    py_train(any_bundle, chat_data, tmp_path / "py")
    cpp_train(cpp_trainer, any_bundle, batches, tmp_path / "cpp")
    py, cpp = losses(tmp_path / "py"), losses(tmp_path / "cpp")
    assert len(py) == len(cpp) == STEPS
    np.testing.assert_allclose(cpp, py, atol=1e-5, rtol=0)
    assert py[-1] < py[0]  # it trains
    assert_same_adapter(final_adapter(tmp_path / "cpp"), final_adapter(tmp_path / "py"))
    # The moments too: a resume in either trainer continues the same AdamW.
    ck = "checkpoints/step-%06d/optimizer.safetensors" % STEPS
    assert_same_adapter(read_tensors(tmp_path / "cpp" / ck), read_tensors(tmp_path / "py" / ck))
    state = {k: json.loads((tmp_path / d / "checkpoints" / ("step-%06d" % STEPS) / "trainer_state.json").read_text())
             for k, d in (("py", "py"), ("cpp", "cpp"))}
    for key in ("step", "epoch", "batch_index", "tokens", "labelled", "bundle_id", "adapter"):
        assert state["cpp"][key] == state["py"][key], key


def test_cpp_runs_the_fused_graphs_with_the_kernel_library(cpp_trainer, tiny_bundle, chat_data, tmp_path):
    from edgetune.device import fused

    lib = fused.library()
    if not lib.ok:
        if DEVICE_ONLY or os.environ.get("EDGETUNE_TEST_NO_FUSED") == "1":
            pytest.skip(f"no kernel library here: {lib.reason}")
        pytest.fail(f"the kernel library should load here: {lib.reason}")
    batches = tokenize(tiny_bundle, chat_data, tmp_path / "batches.safetensors")
    py_train(tiny_bundle, chat_data, tmp_path / "py", env={"EDGETUNE_KERNELS": "fused"})
    cpp_train(cpp_trainer, tiny_bundle, batches, tmp_path / "cpp", STEPS, "--kernels", lib.path)
    assert json.loads((tmp_path / "cpp" / "run.json").read_text())["graphs"] == {
        "train": "train_fused.onnx", "optimizer": "optimizer_fused.onnx"}  # the one-call AdamW too
    np.testing.assert_allclose(losses(tmp_path / "cpp"), losses(tmp_path / "py"), atol=1e-5, rtol=0)
    assert_same_adapter(final_adapter(tmp_path / "cpp"), final_adapter(tmp_path / "py"))


def test_cpp_trains_packed_batches_with_the_fused_graph(cpp_trainer, tiny_bundle, chat_data, tmp_path):
    """Several records per row (attention_mask numbering them): the C++ trainer on the fused graph
    takes edgetune train --packing on's steps; a bundle from before packing refuses such a file."""
    from edgetune.device import fused

    lib = fused.library()
    if not lib.ok:
        pytest.skip(f"no kernel library here: {lib.reason}")
    opts = [*OPTS, "--batch-size", "4", "--max-batch-tokens", "128", "--packing", "on"]
    batches = tokenize(tiny_bundle, chat_data, tmp_path / "batches.safetensors", opts=opts)
    assert max(int(v.max()) for k, v in read_tensors(batches).items() if k.endswith("attention_mask")) > 1
    py_train(tiny_bundle, chat_data, tmp_path / "py", opts=opts, env={"EDGETUNE_KERNELS": "fused"})
    cpp_train(cpp_trainer, tiny_bundle, batches, tmp_path / "cpp", STEPS, "--kernels", lib.path)
    np.testing.assert_allclose(losses(tmp_path / "cpp"), losses(tmp_path / "py"), atol=1e-5, rtol=0)
    assert_same_adapter(final_adapter(tmp_path / "cpp"), final_adapter(tmp_path / "py"))
    old = tmp_path / "old_bundle"
    shutil.copytree(tiny_bundle, old)
    m = json.loads((old / "edgetune.json").read_text())
    m.pop("packing")
    (old / "edgetune.json").write_text(json.dumps(m))
    assert_refused(cpp_train(cpp_trainer, old, batches, tmp_path / "x", check=False), "batches.safetensors",
                   "before sequence packing")
    assert not (tmp_path / "x").exists()


def test_python_cpp_python_equals_an_uninterrupted_run(cpp_trainer, dora_bundle, chat_data, tmp_path):
    batches = tokenize(dora_bundle, chat_data, tmp_path / "batches.safetensors")
    py_train(dora_bundle, chat_data, tmp_path / "whole")
    mixed = tmp_path / "mixed"
    # Python stops after step 3 as a killed process would (checkpoint every step) ...
    r = py_train(dora_bundle, chat_data, mixed, STEPS, "--save-every", "1", env={"EDGETUNE_FAULT": "step:3"}, check=False)
    assert r.returncode == 137
    assert (mixed / "checkpoints" / "latest").read_text().strip() == "step-000003"
    # ... the C++ trainer takes it to step 7, and Python finishes it.
    cpp_train(cpp_trainer, dora_bundle, batches, mixed, 7, "--resume")
    py_train(dora_bundle, chat_data, mixed, STEPS, "--resume")
    assert_same_adapter(final_adapter(mixed), final_adapter(tmp_path / "whole"))
    np.testing.assert_allclose(losses(mixed), losses(tmp_path / "whole"), atol=1e-5, rtol=0)


def test_cpp_killed_at_a_random_step_resumes_to_the_same_adapter(cpp_trainer, tiny_bundle, chat_data, tmp_path):
    batches = tokenize(tiny_bundle, chat_data, tmp_path / "batches.safetensors")
    cpp_train(cpp_trainer, tiny_bundle, batches, tmp_path / "whole")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for point, nth in (("step", rng.randint(1, STEPS - 1)), ("checkpoint-write", rng.randint(1, 3))):
        out = tmp_path / f"killed-{point}"
        r = cpp_train(cpp_trainer, tiny_bundle, batches, out, STEPS, "--save-every", "2",
                      env={"EDGETUNE_FAULT": f"{point}:{nth}"}, check=False)
        assert r.returncode == 137, (seed, point, nth, r.stderr)
        cpp_train(cpp_trainer, tiny_bundle, batches, out, STEPS, "--resume")
        assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == \
            list(range(1, STEPS + 1)), (seed, point, nth)
        assert_same_adapter(final_adapter(out), final_adapter(tmp_path / "whole"), rel=0.0)


def test_cpp_sigkill_then_resume(cpp_trainer, tiny_bundle, chat_data, tmp_path):
    """A real kill -9 while the trainer runs (steps and checkpoints in flight)."""
    steps = 300
    batches = tokenize(tiny_bundle, chat_data, tmp_path / "batches.safetensors", steps)
    out = tmp_path / "run"
    p = subprocess.Popen([str(cpp_trainer), str(tiny_bundle), str(batches), "--out", str(out), "--steps", str(steps),
                          "--save-every", "3", "--quiet"], env={**os.environ, **PLAIN})
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:
        m = out / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= 40:
            break
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if p.returncode != -signal.SIGKILL:
        pytest.fail(f"the trainer finished before it could be killed (exit {p.returncode}); give it more steps")
    cpp_train(cpp_trainer, tiny_bundle, batches, out, steps, "--resume")
    cpp_train(cpp_trainer, tiny_bundle, batches, tmp_path / "whole", steps)
    assert_same_adapter(final_adapter(out), final_adapter(tmp_path / "whole"), rel=0.0)


def test_edgetune_takes_over_what_the_cpp_trainer_writes(cpp_trainer, dora_bundle, chat_data, tmp_path):
    batches = tokenize(dora_bundle, chat_data, tmp_path / "batches.safetensors")
    out = tmp_path / "cpp"
    summary = json.loads(cpp_train(cpp_trainer, dora_bundle, batches, out, STEPS, "--json").stdout)
    assert summary["steps"] == STEPS and summary["final_loss"] == losses(out)[-1]
    # The PEFT adapter passes edgetune's checksums (tensors and config) and matches the checkpoint.
    from edgetune.formats import peft_io

    cfg, tensors = peft_io.load(out)
    assert cfg["use_dora"] is True and cfg["r"] == 4
    ck = final_adapter(out)
    assert {peft_io.to_peft_name(k) for k in ck} == set(tensors)
    for k, v in ck.items():
        np.testing.assert_array_equal(tensors[peft_io.to_peft_name(k)], v)
    ev = json.loads(run([*EDGETUNE, "eval", dora_bundle, "--adapter", out, "--data", chat_data / "valid.jsonl",
                         "--json"]).stdout)
    base = json.loads(run([*EDGETUNE, "eval", dora_bundle, "--data", chat_data / "valid.jsonl", "--json"]).stdout)
    assert ev["loss"] < base["loss"]
    run([*EDGETUNE, "merge", dora_bundle, out, "--out", tmp_path / "merged"])
    run([*EDGETUNE, "pack", out, "--bundle", dora_bundle, "--out", tmp_path / "app", "--name", "cpp"])
    run([*EDGETUNE, "verify", tmp_path / "app"])
    run([*EDGETUNE, "doctor", out])
    run([*EDGETUNE, "import-peft", out / "adapter", "--bundle", dora_bundle, "--out", tmp_path / "imported"])
    for k, v in ck.items():
        np.testing.assert_array_equal(final_adapter(tmp_path / "imported")[k], v)


# -- bad input: one line naming the file, exit 1, nothing written -----------------------------------
def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


def assert_refused(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr and "terminate called" not in r.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])


def test_bad_input_is_refused_with_one_line_and_nothing_written(cpp_trainer, tiny_bundle, dora_bundle, chat_data,
                                                               tmp_path):
    from safetensors.numpy import load_file, save

    batches = tokenize(tiny_bundle, chat_data, tmp_path / "batches.safetensors")
    out = tmp_path / "run"
    # A batch file made for another bundle.
    other = tokenize(dora_bundle, chat_data, tmp_path / "other.safetensors")
    assert_refused(cpp_train(cpp_trainer, tiny_bundle, other, out, check=False), str(other), "another bundle")
    # Token ids outside the vocabulary; sequences longer than the bundle's context; a cut file.
    meta = json.loads(json.loads(Path(batches).read_bytes()[8:8 + int.from_bytes(Path(batches).read_bytes()[:8],
                                                                                 "little")])["__metadata__"]["edgetune"])
    tensors = load_file(str(batches))
    bad = dict(tensors)
    bad["step3/chunk0/input_ids"] = bad["step3/chunk0/input_ids"].copy()
    bad["step3/chunk0/input_ids"][0, 0] = meta["vocab_size"] + 5
    (tmp_path / "ids.safetensors").write_bytes(save(bad, metadata={"edgetune": json.dumps(meta)}))
    assert_refused(cpp_train(cpp_trainer, tiny_bundle, tmp_path / "ids.safetensors", out, check=False),
                   "ids.safetensors", "outside the bundle's vocabulary")
    wrong_vocab = {**meta, "vocab_size": meta["vocab_size"] + 1}
    (tmp_path / "vocab.safetensors").write_bytes(save(tensors, metadata={"edgetune": json.dumps(wrong_vocab)}))
    assert_refused(cpp_train(cpp_trainer, tiny_bundle, tmp_path / "vocab.safetensors", out, check=False),
                   "vocab.safetensors", "vocabulary")
    raw = Path(batches).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 100])
    assert_refused(cpp_train(cpp_trainer, tiny_bundle, tmp_path / "cut.safetensors", out, check=False),
                   "cut.safetensors")
    assert_refused(cpp_train(cpp_trainer, tiny_bundle, batches, out, STEPS + 5, check=False), "--steps")
    assert not out.exists()
    # A bundle from another edgetune: no app_training entry, or another format.
    old = tmp_path / "old_bundle"
    shutil.copytree(tiny_bundle, old)
    m = json.loads((old / "edgetune.json").read_text())
    m.pop("app_training")
    (old / "edgetune.json").write_text(json.dumps(m))
    assert_refused(cpp_train(cpp_trainer, old, batches, out, check=False), "edgetune.json", "export the bundle again")
    (old / "edgetune.json").write_text(json.dumps({**m, "format": 1}))
    assert_refused(cpp_train(cpp_trainer, old, batches, out, check=False), "edgetune.json", "format")
    # A damaged weight file.
    shutil.rmtree(old)
    shutil.copytree(tiny_bundle, old)
    with open(old / "train.onnx.data", "r+b") as f:
        f.truncate((old / "train.onnx.data").stat().st_size - 64)
    assert_refused(cpp_train(cpp_trainer, old, batches, out, check=False), "train.onnx.data", "damaged")
    assert not out.exists()
    # A damaged checkpoint: passed over for the one before it; with none intact, refused, nothing changed.
    cpp_train(cpp_trainer, tiny_bundle, batches, out, 6, "--save-every", "2")
    (out / "checkpoints" / "step-000006" / "adapter.safetensors").write_bytes(b"\0" * 64)
    r = cpp_train(cpp_trainer, tiny_bundle, batches, out, STEPS, "--resume", check=False)
    assert r.returncode == 0 and "passed over damaged checkpoint" in r.stderr and "step-000004" in r.stderr
    for ck in (out / "checkpoints").glob("step-*"):
        (ck / "adapter.safetensors").write_bytes(b"\0" * 64)
    before = tree(out)
    assert_refused(cpp_train(cpp_trainer, tiny_bundle, batches, out, STEPS + 0, "--resume", check=False),
                   "no intact checkpoint")
    assert tree(out) == before
    # Another run's folder without --resume; an unknown option.
    assert_refused(cpp_train(cpp_trainer, tiny_bundle, batches, out, check=False), "already holds a run")
    assert_refused(run([cpp_trainer, tiny_bundle, batches, "--out", tmp_path / "x", "--steps", "2", "--bogus"],
                       check=False), "--bogus")


def test_cpp_trainer_stops_on_a_nonfinite_loss_without_an_update(cpp_trainer, tiny_bundle, chat_data, tmp_path):
    from safetensors.numpy import load_file, save

    batches = tokenize(tiny_bundle, chat_data, tmp_path / "batches.safetensors")
    raw = Path(batches).read_bytes()
    meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]["edgetune"]
    tensors = load_file(str(batches))
    tensors["step4/chunk0/label_norm"] = np.array(0.0, np.float32)  # loss / 0
    (tmp_path / "nan.safetensors").write_bytes(save(tensors, metadata={"edgetune": meta}))
    out = tmp_path / "run"
    r = cpp_train(cpp_trainer, tiny_bundle, tmp_path / "nan.safetensors", out, STEPS, "--save-every", "2", check=False)
    assert_refused(r, "at step 4", "not finite", "step-000002")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"


@pytest.mark.slow
def test_cpp_trainer_on_the_real_model(cpp_trainer, real_bundle, tmp_path):
    """20 steps on SmolLM2-135M-Instruct: the C++ trainer lowers the held-out loss exactly as
    `edgetune train` does (both on the fused graphs where the kernel library loads, as by default)."""
    from edgetune.device import fused, infer

    opts = ["--batch-size", "4", "--lr", "1e-3", "--warmup", "3"]
    steps = 20
    lib = fused.library()
    kernels = ["--kernels", str(lib.path)] if lib.ok else []
    env = {"EDGETUNE_KERNELS": "fused" if lib.ok else "plain"}
    batches = tokenize(real_bundle, SAMPLE_DATA, tmp_path / "batches.safetensors", steps, opts)
    py_train(real_bundle, SAMPLE_DATA, tmp_path / "py", steps, env=env, opts=opts)
    cpp_train(cpp_trainer, real_bundle, batches, tmp_path / "cpp", steps, *kernels, env=env)
    np.testing.assert_allclose(losses(tmp_path / "cpp"), losses(tmp_path / "py"), atol=1e-4, rtol=0)
    test = SAMPLE_DATA / "test.jsonl"
    held_out = {name: infer.evaluate(real_bundle, test, model=infer.Model.open(
        real_bundle, adapter=None if name == "base" else tmp_path / name))["loss"] for name in ("base", "py", "cpp")}
    assert held_out["cpp"] < 0.8 * held_out["base"], held_out
    assert abs(held_out["cpp"] - held_out["py"]) <= 1e-4, held_out


def test_the_documented_batch_rules_rebuild_what_tokenize_writes(tiny_bundle, tmp_path):
    """An app with its own tokenizer: docs/training.md's rules, applied with tokenizers and jinja2
    only (no edgetune), give the tensors `edgetune tokenize` writes."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    msgs = [{"role": "system", "content": "Triage."}, {"role": "user", "content": "my invoice is wrong"},
            {"role": "assistant", "content": "category: billing"}, {"role": "user", "content": "and the parcel?"},
            {"role": "assistant", "content": "category: shipping"}]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"messages": msgs}) + "\n")
    batches = tokenize(tiny_bundle, data, tmp_path / "b.safetensors", 1, ["--batch-size", "1"])
    got = load_file(str(batches))

    meta = json.loads((tiny_bundle / "tokenizer_meta.json").read_text())
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string((tiny_bundle / meta["chat_template"]).read_text())
    def render(m, gen=False):
        return template.render(messages=m, add_generation_prompt=gen, eos_token=meta["eos_token"],
                               bos_token=meta.get("bos_token") or "")
    full = render(msgs)
    spans = [(len(render(msgs[:i], True)), len(render(msgs[:i + 1]))) for i, m in enumerate(msgs)
             if m["role"] == "assistant"]
    enc = Tokenizer.from_file(str(tiny_bundle / "tokenizer.json")).encode(full, add_special_tokens=False)
    labelled = [any(s < b and max(e, s + 1) > a for a, b in spans) for s, e in enc.offsets]
    labels = [enc.ids[t + 1] if labelled[t + 1] else -100 for t in range(len(enc.ids) - 1)] + [-100]
    n = len(enc.ids)
    pad = -n % 8
    np.testing.assert_array_equal(got["step1/chunk0/input_ids"], [enc.ids + [meta["pad_token_id"]] * pad])
    np.testing.assert_array_equal(got["step1/chunk0/attention_mask"], [[1] * n + [0] * pad])
    np.testing.assert_array_equal(got["step1/chunk0/labels"], [labels + [-100] * pad])
    assert float(got["step1/chunk0/label_norm"]) == sum(x != -100 for x in labels) > 0


def test_cpp_trainer_applies_dropout(cpp_trainer, tiny_model, tiny_bundle, chat_data, tmp_path):
    """With --dropout the training session keeps its Dropout nodes (ONNX Runtime's EliminateDropout
    would remove them): the run differs from the same adapter without dropout after the first step."""
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    bundle = export(str(tiny_model), tmp_path / "b", AdapterConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"),
                                                                   dropout=0.3))
    cpp_train(cpp_trainer, bundle, tokenize(bundle, chat_data, tmp_path / "drop.safetensors", 4), tmp_path / "a", 4)
    cpp_train(cpp_trainer, tiny_bundle, tokenize(tiny_bundle, chat_data, tmp_path / "plain.safetensors", 4),
              tmp_path / "b2", 4)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b2")
    assert a[0] == b[0]  # the same initial adapter (lora_B = 0): the first step's loss does not see the mask
    assert all(x != y for x, y in zip(a[1:], b[1:]))
