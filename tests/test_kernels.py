"""The C++ merge kernels against the numpy reference, and every error path."""
import numpy as np
import pytest

from edgetune.device import kernels as merge_kernels
from edgetune.formats.errors import MergeError

_ext = pytest.importorskip("edgetune.device._ext")
SHAPES = [(1, 1, 1), (7, 13, 1), (64, 64, 8), (33, 257, 3), (130, 515, 16), (300, 1000, 64)]


@pytest.fixture(autouse=True, params=_ext.isas())
def isa(request, monkeypatch):
    """Every test runs with each instruction-set build of the kernels this CPU has."""
    monkeypatch.setenv("EDGETUNE_ISA", request.param)
    return request.param


def test_the_widest_instruction_set_the_cpu_has_is_built_and_chosen(isa, monkeypatch):
    flags = set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    want = ["generic"]
    if {"avx2", "fma", "f16c"} <= flags:
        want.append("avx2")
        if {"avx512f", "avx512bw"} <= flags:
            want.append("avx512")
            if {"avx512dq", "avx512_bf16"} <= flags:
                want.append("avx512bf16")
    assert _ext.isas() == want
    assert merge_kernels.isa() == isa
    monkeypatch.delenv("EDGETUNE_ISA")
    assert merge_kernels.isa() == want[-1]
    monkeypatch.setenv("EDGETUNE_ISA", "sse9")
    with pytest.raises(MergeError, match="EDGETUNE_ISA=sse9 is not available on this CPU"):
        merge_kernels.isa()
    with pytest.raises(MergeError, match="EDGETUNE_ISA=sse9"):
        merge_kernels.lora_merge(np.zeros((2, 2), np.float32), np.zeros((1, 2), np.float32), np.zeros((2, 1), np.float32), 1.0)


def rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def both(fn, monkeypatch):
    out = {}
    for impl in ("numpy", "cpp"):
        monkeypatch.setenv("EDGETUNE_IMPL", impl)
        out[impl] = fn()
    return out


@pytest.mark.parametrize("rows,cols,r", SHAPES)
@pytest.mark.parametrize("adapter_dtype", [np.float32, np.float16])
def test_lora_merge_float32_matches_numpy(rows, cols, r, adapter_dtype, monkeypatch):
    rng = np.random.default_rng(rows * 7 + cols)
    w0, a, b = rand(rng, (rows, cols)), rand(rng, (r, cols), adapter_dtype), rand(rng, (rows, r), adapter_dtype)
    res = both(lambda: merge_kernels.lora_merge(w0.copy(), a, b, 0.5), monkeypatch)
    np.testing.assert_allclose(res["cpp"], res["numpy"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,cols,r", SHAPES)
def test_bfloat16_and_float16_round_like_numpy(rows, cols, r, monkeypatch):
    rng = np.random.default_rng(1)
    base = rand(rng, (rows, cols))
    a, b = rand(rng, (r, cols)), rand(rng, (rows, r))
    for kind in ("bfloat16", "float16"):
        w0 = merge_kernels.from_f32(base, kind)
        res = both(lambda: merge_kernels.lora_merge(w0.copy(), a, b, 0.25), monkeypatch)
        got, want = merge_kernels.to_f32(res["cpp"], kind), merge_kernels.to_f32(res["numpy"], kind)
        # Same float32 sums up to summation order; the stored values differ by at most one rounding step.
        ulp = 2.0 ** -7 if kind == "bfloat16" else 2.0 ** -10
        assert np.all(np.abs(got - want) <= ulp * np.abs(want) + 1e-6), kind


def test_bf16_rounding_is_nearest_even():
    vals = np.array([1.0, 1.00390625, 1.01171875, -2.5, np.inf, 3.4e38], np.float32)
    bits = merge_kernels.f32_to_bf16(vals)
    assert merge_kernels.bf16_to_f32(bits).tolist()[:4] == [1.0, 1.0, 1.015625, -2.5]
    assert np.isinf(merge_kernels.bf16_to_f32(bits)[4])


def test_merge_then_unmerge_restores(monkeypatch):
    rng = np.random.default_rng(2)
    w0, a, b = rand(rng, (96, 80)), rand(rng, (8, 80)), rand(rng, (96, 8))
    for impl in ("numpy", "cpp"):
        monkeypatch.setenv("EDGETUNE_IMPL", impl)
        w = merge_kernels.lora_unmerge(merge_kernels.lora_merge(w0.copy(), a, b, 2.0), a, b, 2.0)
        np.testing.assert_allclose(w, w0, atol=1e-5)


def test_weighted_merge_of_several_adapters(monkeypatch):
    rng = np.random.default_rng(3)
    w0 = rand(rng, (50, 70))
    ads = [(rand(rng, (r, 70)), rand(rng, (50, r)), c) for r, c in ((4, 0.5), (8, -1.5), (1, 2.0))]
    res = both(lambda: merge_kernels.lora_merge_many(w0.copy(), ads), monkeypatch)
    want = w0 + sum(c * (b @ a) for a, b, c in ads)
    np.testing.assert_allclose(res["cpp"], want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(res["numpy"], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_weighted_merge_in_16_bit_with_mixed_adapter_dtypes(kind, monkeypatch):
    rng = np.random.default_rng(5)
    base = rand(rng, (45, 83))
    ads = [(rand(rng, (r, 83), dt), rand(rng, (45, r), dt), c)
           for r, c, dt in ((3, 0.5, np.float16), (16, -0.25, np.float32), (1, 2.0, np.float16))]
    w0 = merge_kernels.from_f32(base, kind)
    res = both(lambda: merge_kernels.lora_merge_many(w0.copy(), ads), monkeypatch)
    want = merge_kernels.to_f32(w0, kind) + sum(c * (b.astype(np.float32) @ a.astype(np.float32)) for a, b, c in ads)
    ulp = 2.0 ** -7 if kind == "bfloat16" else 2.0 ** -10
    for impl in ("cpp", "numpy"):
        got = merge_kernels.to_f32(res[impl], kind)
        assert np.all(np.abs(got - want) <= ulp * np.abs(want) + 1e-4), (kind, impl)


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_16_bit_stores_round_ties_to_even_and_keep_nan_inf(kind, monkeypatch):
    """Bit for bit against numpy where the result is exact: ties, NaN, infinities, in full tiles and edges."""
    rows, cols = 13, 37  # two full 6-row blocks and one row left; two 16-column tiles and 5 columns left
    ulp = 2.0 ** -7 if kind == "bfloat16" else 2.0 ** -10
    base = np.where(np.arange(cols) % 2 == 0, 1.0, 1.0 + ulp).astype(np.float32)
    base = np.tile(base, (rows, 1))
    base[0, 3], base[7, 20], base[12, 36] = np.nan, np.inf, -np.inf
    w0 = merge_kernels.from_f32(base, kind)
    a = np.full((1, cols), ulp / 2, np.float32)  # every sum falls exactly half-way between two values
    b = np.ones((rows, 1), np.float32)
    res = both(lambda: merge_kernels.lora_merge(w0.copy(), a, b, 1.0), monkeypatch)
    np.testing.assert_array_equal(res["cpp"].view(np.uint16), res["numpy"].view(np.uint16))
    got = merge_kernels.to_f32(res["cpp"], kind)
    assert got[1, 0] == 1.0 and got[1, 1] == 1.0 + 2 * ulp  # ties to even, both ways
    assert np.isnan(got[0, 3]) and got[7, 20] == np.inf and got[12, 36] == -np.inf


def test_bfloat16_subnormal_results_round_exactly_and_non_finite_ones_are_reported(monkeypatch):
    """AVX-512 BF16's conversion flushes subnormals to zero: such rows must still round like numpy."""
    rows, cols = 12, 69  # two full 6-row blocks; two 32-column tiles (four 16-column ones) and 5 columns left
    tiny = 2.0 ** -133  # the smallest bfloat16 subnormal
    base = np.tile((np.arange(cols) % 5 + 1).astype(np.float32) * tiny, (rows, 1))
    base[::3] = 1.5  # normal rows beside them, in the same tiles
    w0 = merge_kernels.from_f32(base, "bfloat16")
    a = np.full((1, cols), tiny / 2, np.float32)  # half a subnormal step: ties everywhere
    b = np.ones((rows, 1), np.float32)
    res = both(lambda: merge_kernels.lora_merge(w0.copy(), a, b, 1.0), monkeypatch)
    np.testing.assert_array_equal(res["cpp"].view(np.uint16), res["numpy"].view(np.uint16))
    got = merge_kernels.to_f32(res["cpp"], "bfloat16")
    assert got[1, 0] == 2 * tiny and got[1, 1] == 2 * tiny and got[1, 2] == 4 * tiny  # ties to even, not to zero
    rng = np.random.default_rng(4)
    for at in ((0, 0), (7, 40), (11, 68)):
        w = merge_kernels.from_f32(rand(rng, (rows, cols)), "bfloat16")
        a2, b2 = rand(rng, (2, cols)), rand(rng, (rows, 2))
        assert _ext.lora_merge(w.copy(), [a2], [b2], [0.5], "bfloat16") is False
        a2[1, at[1]] = np.inf
        assert _ext.lora_merge(w, [a2], [b2], [0.5], "bfloat16") is True, at


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float16"])
def test_thread_split_does_not_change_a_bit(kind, monkeypatch):
    """Threads split W by rows; every weight gets the same sum whatever the split."""
    monkeypatch.setenv("EDGETUNE_IMPL", "cpp")
    rng = np.random.default_rng(6)
    w0 = merge_kernels.from_f32(rand(rng, (101, 67)), kind)
    a, b = rand(rng, (5, 67)), rand(rng, (101, 5))
    outs = [merge_kernels.lora_merge(w0.copy(), a, b, 0.3, threads=t).view(np.uint16 if kind != "float32" else np.uint32)
            for t in (1, 2, 3, 7, 0)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


@pytest.mark.parametrize("threads", [0, 1, 2, 3])
def test_batch_merge_equals_one_merge_per_weight_bit_for_bit(threads, monkeypatch):
    """lora_merge_batch deals small weights out to the threads whole and splits large ones by
    rows: every weight must come out exactly as its own lora_merge_many leaves it, in every
    dtype, with blends and float16 adapters, and a non-finite result must name its weight."""
    monkeypatch.setenv("EDGETUNE_IMPL", "cpp")
    rng = np.random.default_rng(11)
    items, want = [], []
    for i, (rows, cols, kind) in enumerate([(576, 576, "float32"), (192, 576, "float32"), (7, 13, "bfloat16"),
                                            (1536, 2048, "float32"), (64, 100, "float16"), (300, 1000, "bfloat16"),
                                            (1, 1, "float32")]):
        w = merge_kernels.from_f32(rand(rng, (rows, cols)), kind)
        ads = [(rand(rng, (r, cols), dt), rand(rng, (rows, r), dt), c)
               for r, dt, c in ((8, np.float32, 2.0), (3, np.float16, -0.5))[: 1 + i % 2]]
        want.append(merge_kernels.lora_merge_many(w.copy(), ads, threads=1))
        items.append((f"w{i}", w, ads))
    merge_kernels.lora_merge_batch(items, safe=True, threads=threads)
    for (name, got, _), ref in zip(items, want):
        np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8), err_msg=name)
    merge_kernels.lora_merge_batch(items, sign=-1.0, threads=threads)  # and back, as unmerge does
    for (name, got, ads), ref in zip(items, want):
        np.testing.assert_array_equal(got.view(np.uint8),
                                      merge_kernels.lora_merge_many(ref.copy(), ads, sign=-1.0).view(np.uint8))
    items[1][2][0][1][5, 0] = np.inf  # a broken adapter in the second weight
    with pytest.raises(MergeError, match=r"w1: merge produced a non-finite value at \[5, 0\]"):
        merge_kernels.lora_merge_batch(items, safe=True, threads=threads)
    with pytest.raises(MergeError, match="w3: shapes do not fit"):
        merge_kernels.lora_merge_batch([items[0], ("w3", items[3][1], items[0][2])])


@pytest.mark.parametrize("kind", ["float32", "bfloat16"])
def test_dora_merge_matches_reference(kind, monkeypatch):
    rng = np.random.default_rng(4)
    base = rand(rng, (40, 300))
    a, b = rand(rng, (4, 300)), rand(rng, (40, 4))
    mag = np.abs(rand(rng, (40,))) + 0.5
    w0 = merge_kernels.from_f32(base, kind)
    res = both(lambda: merge_kernels.dora_merge(w0.copy(), a, b, 0.5, mag), monkeypatch)
    merged = base + 0.5 * (b @ a)
    want = merged * (mag / np.linalg.norm(merged, axis=1))[:, None]
    tol = 1e-5 if kind == "float32" else 1e-2
    for impl in ("cpp", "numpy"):
        np.testing.assert_allclose(merge_kernels.to_f32(res[impl], kind), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", ["cpp", "numpy"])
def test_error_paths_name_the_tensor(impl, monkeypatch):
    monkeypatch.setenv("EDGETUNE_IMPL", impl)
    w, a, b = np.zeros((8, 6), np.float32), np.zeros((2, 6), np.float32), np.zeros((8, 2), np.float32)
    with pytest.raises(MergeError, match=r"q_proj: shapes do not fit: W \(8, 6\), A \(2, 5\), B \(8, 2\)"):
        merge_kernels.lora_merge(w, np.zeros((2, 5), np.float32), b, 1.0, name="q_proj")
    with pytest.raises(MergeError, match="q_proj: W has dtype float64"):
        merge_kernels.lora_merge(w.astype(np.float64), a, b, 1.0, name="q_proj")
    with pytest.raises(MergeError, match="q_proj: W must be C-contiguous"):
        merge_kernels.lora_merge(np.zeros((6, 8), np.float32).T, a, b, 1.0, name="q_proj")
    ro = w.copy()
    ro.flags.writeable = False
    with pytest.raises(MergeError, match="q_proj: W is read-only"):
        merge_kernels.lora_merge(ro, a, b, 1.0, name="q_proj")
    with pytest.raises(MergeError, match="adapter 0 A has dtype int32"):
        merge_kernels.lora_merge(w, a.astype(np.int32), b, 1.0, name="q_proj")
    bad = np.full((2, 6), np.inf, np.float32)
    with pytest.raises(MergeError, match=r"v_proj: merge produced a non-finite value at \[0, 0\]"):
        merge_kernels.lora_merge(w.copy(), bad, np.ones((8, 2), np.float32), 1.0, safe=True, name="v_proj")


def test_cpp_rejects_bad_input_itself():
    from edgetune.device import _ext

    w = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="shapes do not fit"):
        _ext.lora_merge(w, [np.zeros((2, 3), np.float32)], [np.zeros((4, 2), np.float32)], [1.0], "float32")
    with pytest.raises(ValueError, match="weight dtype does not match"):
        _ext.lora_merge(w, [np.zeros((2, 4), np.float32)], [np.zeros((4, 2), np.float32)], [1.0], "bfloat16")


def test_forced_numpy_and_default(monkeypatch):
    monkeypatch.setenv("EDGETUNE_IMPL", "numpy")
    assert merge_kernels.implementation() == "numpy"
    monkeypatch.delenv("EDGETUNE_IMPL")
    assert merge_kernels.implementation() == "cpp"
    monkeypatch.setenv("EDGETUNE_IMPL", "fortran")
    with pytest.raises(MergeError, match="EDGETUNE_IMPL must be cpp or numpy"):
        merge_kernels.implementation()


@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16"])
def test_finiteness_check_finds_the_first_nan_or_inf_anywhere(kind):
    rng = np.random.default_rng(5)
    base = merge_kernels.from_f32(rand(rng, (37, 301)), kind)  # 11,137 values: several scan blocks
    assert _ext.first_nonfinite(base, kind) == -1
    for at in (0, 4095, 4096, 9000, base.size - 1):
        for bad in (np.nan, np.inf, -np.inf):
            w = base.copy()
            w.reshape(-1)[at] = merge_kernels.from_f32(np.array([bad], np.float32), kind)[0]
            w.reshape(-1)[min(at + 7, base.size - 1)] = merge_kernels.from_f32(np.array([np.nan], np.float32), kind)[0]
            assert _ext.first_nonfinite(w, kind) == at, (kind, at, bad)
    big = merge_kernels.from_f32(np.array([65504.0, -3.0e38 if kind != "float16" else -65504.0], np.float32), kind)
    assert _ext.first_nonfinite(big.reshape(1, 2), kind) == -1  # the largest finite values are finite


@pytest.mark.parametrize("at", [(0, 0), (36, 300), (30, 287), (12, 5)])  # full tiles, and the edges
def test_the_kernel_notices_a_non_finite_value_it_writes(at):
    rng = np.random.default_rng(9)
    w = rand(rng, (37, 301))
    a, b = rand(rng, (4, 301)), rand(rng, (37, 4))
    w[at] = np.inf
    with pytest.raises(MergeError, match=rf"non-finite value at \[{at[0]}, {at[1]}\]"):
        merge_kernels.lora_merge(w, a, b, 0.5, safe=True, name="W")
    w = rand(rng, (37, 301))
    b[at[0], 2] = np.nan  # a broken adapter poisons that whole row
    with pytest.raises(MergeError, match=rf"non-finite value at \[{at[0]}, 0\]"):
        merge_kernels.lora_merge(w, a, b, 0.5, safe=True, name="W")
    assert _ext.lora_merge(rand(rng, (37, 301)), [a], [np.nan_to_num(b)], [0.5], "float32") is False


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_thread_pool_serves_concurrent_callers_and_a_forked_child():
    import os
    import threading

    def merge_ones(rows: int) -> np.ndarray:
        w = np.zeros((rows, 64), np.float32)
        merge_kernels.lora_merge(w, np.ones((2, 64), np.float32), np.ones((rows, 2), np.float32), 1.0, threads=2)
        return w

    errors = []

    def caller():
        for rows in range(12, 200, 7):
            if not (merge_ones(rows) == 2.0).all():
                errors.append(rows)

    ts = [threading.Thread(target=caller) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    pid = os.fork()  # the parent's pool threads do not exist in the child: it must start its own
    if pid == 0:
        os._exit(0 if (merge_ones(300) == 2.0).all() else 1)
    assert os.waitpid(pid, 0)[1] == 0
