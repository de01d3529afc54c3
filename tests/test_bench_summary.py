"""bench/train.py's summary: the useful-work fractions against the float32 and bfloat16 peaks."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = {"model_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "vocab_size": 100, "num_attention_heads": 4, "num_key_value_heads": 2}}


def _bench(name: str):
    """bench/<name>.py as a module (bench/ on the path while it loads, for its own imports)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "bench"))


def _bench_train():
    return _bench("train")


def test_no_bench_script_shadows_a_standard_module():
    """``python bench/x.py`` puts bench/ first on the import path: a script named like a standard
    module (profile, say) would be imported in its place by every library that imports that module
    (torch.compile imports cProfile, which imports profile)."""
    names = {p.stem for p in (ROOT / "bench").glob("*.py")}
    assert not names & set(sys.stdlib_module_names), names & set(sys.stdlib_module_names)


def _result(times, peaks, bf16_peaks):
    return {"tokens": 1000, "time": float(sum(times)), "peak_rss_mb": 100.0, "valid_loss": 1.0,
            "lengths": [16] * 8, "labelled": 40, "kernels": "fused (avx512)", "step_times": times,
            "step_peaks": peaks, "step_bf16_peaks": bf16_peaks}


def test_fractions_divide_the_same_work_by_each_peak_weighted_by_step_time():
    bt = _bench_train()
    times, peaks, bpeaks = [1.0, 3.0], [100.0, 200.0], [200.0, 400.0]
    out = bt.summarize({"edgetune": [_result(times, peaks, bpeaks)]}, MANIFEST, 150.0, 300.0)
    work = bt.train_flops(MANIFEST, [16] * 8, 40) / 4.0 / 1e9
    assert out["flops_fraction"] == pytest.approx(work / 175.0, abs=1e-3)  # (1*100 + 3*200) / 4
    assert out["flops_fraction_start_peak"] == pytest.approx(work / 150.0, abs=1e-3)
    assert out["flops_fraction_bf16_peak"] == pytest.approx(work / 350.0, abs=1e-3)
    assert out["bf16_peak_gflops"] == pytest.approx(350.0)


def test_no_bfloat16_fraction_without_its_peak():
    bt = _bench_train()
    out = bt.summarize({"edgetune": [_result([1.0], [100.0], [])]}, MANIFEST, 100.0)
    assert "flops_fraction_bf16_peak" not in out and "flops_fraction" in out


def test_the_bfloat16_loop_runs_only_where_the_kernels_have_it():
    from edgetune.device import _ext

    peak = _ext.peak_bf16_gflops(1, 100_000)
    if _ext.isa() == "avx512bf16":
        assert peak > 0
    else:
        assert peak == 0.0


def _bench_profile():
    return _bench("step_profile")


def test_product_rate_reads_m_k_n_from_the_input_shapes():
    prof = _bench_profile()
    # a [8, 64, 576] times w [1536, 576] (trans_b) or w [576, 1536]: 2 M K N over the call's time
    want = 2 * 512 * 576 * 1536 / 1e-3 / 1e9
    assert prof.product_gflops("MatMulBF16", [[8, 64, 576], [1536, 576]], 1e-3) == pytest.approx(want)
    assert prof.product_gflops("MatMulBF16Round", [[8, 64, 576], [576, 1536]], 1e-3) == pytest.approx(want)
    assert prof.product_gflops("SwiGLUBF16", [[8, 64, 1536], [8, 64, 1536]], 1e-3) is None


def test_profile_counts_the_steps_after_the_skipped_ones(tiny_bundle, chat_data, capsys):
    """bench/step_profile.py on the tiny bundle: two steps counted after one skipped, every node's kernel
    time in exactly one op's row, the shares summing to one, inside the session runs' time."""
    prof = _bench_profile()
    out = prof.main(["--bundle", str(tiny_bundle), "--data", str(chat_data), "--seq", "32", "--batch", "2",
                     "--steps", "2", "--skip", "1", "--shapes", "--json"])
    assert out["runs"] >= 2 and len(out["step_s"]) == 2
    assert sum(r["share"] for r in out["ops"]) == pytest.approx(1.0)
    assert sum(r["seconds"] for r in out["ops"]) == pytest.approx(out["kernel_s"])
    assert sum(r["calls"] for r in out["shapes"]) == sum(r["calls"] for r in out["ops"])
    assert 0 < out["kernel_s"] <= out["model_run_s"]
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("machine: ") and "isa:" in printed[0]  # the CPU and its instruction sets
    assert json.loads(printed[-1])["runs"] == out["runs"]
    # the same steps with none skipped count more runs and more time
    more = prof.main(["--bundle", str(tiny_bundle), "--data", str(chat_data), "--seq", "32", "--batch", "2",
                      "--steps", "3", "--skip", "0", "--json"])
    assert more["runs"] > out["runs"]
