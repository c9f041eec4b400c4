"""The fused 4-bit products (AVX2 and portable paths) against the dense float64 product."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qlora_np
from qlora_np.quant import reference
from qlora_np.linalg import reference as reference_
from qlora_np.kernels import products
from qlora_np.kernels.x86.builder import decode_table
from qlora_np.kernels import features
from qlora_np.kernels.features import HAS_AVX2, HAS_AVX512
from qlora_np.quant.backends import scales

QUANT_TYPES = ["nf4", "fp4", "int4", "int4_asym"]
PERMUTE = pytest.param("permute", marks=pytest.mark.skipif(not HAS_AVX512, reason="no AVX-512VL"))
SHUFFLE = pytest.param("shuffle", marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2"))
PATHS = [PERMUTE, SHUFFLE, "portable"]
"""The three drivers: SIMD with the AVX-512VL permute decode, SIMD with the AVX2 byte-shuffle
decode, and portable Numba."""


@pytest.fixture(autouse=True)
def _restore_the_decode():
    chosen = features.PERMUTE_DECODE
    yield
    features.PERMUTE_DECODE = chosen


def _use(path):
    """Select ``path``'s decode; the ``simd`` argument the products take for it."""
    features.PERMUTE_DECODE = path == "permute"
    return path != "portable"


def _case(out_features, in_features, quant_type, blocksize, double_quant, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out_features, in_features)).astype(np.float32)
    qt = qlora_np.quantize(weight, quant_type, blocksize, double_quant)
    shifts = None if qt.zero_point is None else qt.zero_point.astype(np.float32)
    return qt, scales(qt), shifts, qlora_np.dequantize(qt).astype(np.float64)


def _within_summation_bound(result, exact, magnitudes, length):
    # float32 sums of `length` products: |error| ≤ ~length · 2^-24 · Σ|terms| (plus block
    # scaling, one more rounding per term); a 2× margin over that worst case.
    return np.all(np.abs(result - exact) <= 2 * (length + 2) * 2.0 ** -24 * magnitudes + 1e-30)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=25, deadline=None)
@given(out_features=st.integers(1, 40), blocks_per_row=st.integers(1, 6),
       blocksize=st.sampled_from([2, 6, 32, 64, 128]), quant_type=st.sampled_from(QUANT_TYPES),
       double_quant=st.booleans(), rows=st.integers(1, 4))
def test_fused_products_match_dense_product(path, out_features, blocks_per_row, blocksize,
                                            quant_type, double_quant, rows):
    simd = _use(path)
    in_features = blocks_per_row * blocksize
    qt, block_scales, shifts, dense = _case(out_features, in_features, quant_type, blocksize,
                                            double_quant)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    g = rng.standard_normal((rows, out_features)).astype(np.float32)

    y = products.gemv(x, qt.packed, block_scales, shifts, qt.codebook, out_features, blocksize, simd)
    assert y.dtype == np.float32 and y.shape == (rows, out_features)
    assert _within_summation_bound(y, x @ dense.T, np.abs(x) @ np.abs(dense).T, in_features)

    gx = products.gemv_t(g, qt.packed, block_scales, shifts, qt.codebook, in_features, blocksize, simd)
    assert gx.dtype == np.float32 and gx.shape == (rows, in_features)
    assert _within_summation_bound(gx, g @ dense, np.abs(g) @ np.abs(dense), out_features)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_fused_products_match_the_reference_products(path, quant_type):
    simd = _use(path)
    qt, block_scales, shifts, _ = _case(96, 256, quant_type, 64, True)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    g = rng.standard_normal((2, 96)).astype(np.float32)
    args = (qt.packed, block_scales, shifts, qt.codebook)
    np.testing.assert_allclose(products.gemv(x, *args, 96, 64, simd), reference_.gemv(x, *args, 96, 64),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(products.gemv_t(g, *args, 256, 64, simd),
                               reference_.gemv_t(g, *args, 256, 64), rtol=1e-5, atol=1e-5)


def test_all_paths_agree_on_a_large_weight():
    qt, block_scales, shifts, dense = _case(512, 2048, "nf4", 64, True)
    x = np.random.default_rng(2).standard_normal((3, 2048)).astype(np.float32)
    g = np.random.default_rng(3).standard_normal((3, 512)).astype(np.float32)
    paths = ["portable"] + ["shuffle"] * HAS_AVX2 + ["permute"] * HAS_AVX512
    for path in paths:
        simd = _use(path)
        y = products.gemv(x, qt.packed, block_scales, shifts, qt.codebook, 512, 64, simd)
        gx = products.gemv_t(g, qt.packed, block_scales, shifts, qt.codebook, 2048, 64, simd)
        np.testing.assert_allclose(y, x @ dense.T, rtol=1e-5, atol=1e-4, err_msg=path)
        np.testing.assert_allclose(gx, g @ dense, rtol=1e-5, atol=1e-4, err_msg=path)


@pytest.mark.skipif(not HAS_AVX512, reason="no AVX-512VL")
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_permute_and_shuffle_decodes_give_the_same_weights(quant_type):
    # g @ W adds each decoded weight (codebook[code] − shift) · coef into its output element
    # in W's row order with either decode, so 1-row, 3-row and panel results agree bit for
    # bit. (x @ W.T does not: the two decodes put weights in different lanes, and so sum
    # each dot in a different order.)
    qt, block_scales, shifts, _ = _case(72, 384, quant_type, 64, True, seed=4)
    rng = np.random.default_rng(5)
    g = rng.standard_normal((20, 72)).astype(np.float32)
    args = (qt.packed, block_scales, shifts, qt.codebook)
    results = {}
    for path in ("shuffle", "permute"):
        _use(path)
        assert decode_table(qt.codebook).dtype == (np.float32 if path == "permute" else np.uint8)
        results[path] = [products.gemv_t(g[:rows], *args, 384, 64, True) for rows in (1, 3)]
        results[path].append(products.gemm_t(g, *args, 384, 64))
    for shuffled, permuted in zip(results["shuffle"], results["permute"]):
        np.testing.assert_array_equal(permuted, shuffled)


def test_simd_path_needs_whole_16_byte_steps():
    assert not products.simd_applies(16, simd=True)          # 8 bytes a block: portable
    assert products.simd_applies(64, simd=True) == HAS_AVX2
    assert not products.simd_applies(64, simd=False)


def test_matmul_picks_fused_panel_or_tiled_products_by_rows(monkeypatch):
    qt, _, _, dense = _case(64, 256, "nf4", 64, True)
    calls = []
    for name in ("gemv", "gemm", "gemv_t", "gemm_t"):
        kernel = getattr(products, name)
        monkeypatch.setattr(products, name, lambda *args, kernel=kernel, name=name, **kw:
                            calls.append(name) or kernel(*args, **kw))
    rng = np.random.default_rng(3)
    for rows in (1, qlora_np.linalg.plan.FUSED_MAX_ROWS_T + 1, qlora_np.linalg.plan.PANEL_MAX_ROWS + 1):
        calls.clear()
        x = rng.standard_normal((rows, 256)).astype(np.float32)
        g = rng.standard_normal((rows, 64)).astype(np.float32)
        np.testing.assert_allclose(qlora_np.matmul(x, qt), x @ dense.T, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(qlora_np.matmul_t(g, qt), g @ dense, rtol=1e-5, atol=1e-4)
        if rows == 1:
            assert calls == ["gemv", "gemv_t"]
        elif rows <= qlora_np.linalg.plan.PANEL_MAX_ROWS:
            assert calls == (["gemm", "gemm_t"] if HAS_AVX2 else ["gemv"])    # no AVX2: fused x @ W.T, tiled g @ W
        else:
            assert calls == []                                               # tiles of W and BLAS


@pytest.mark.parametrize("path", [PERMUTE, SHUFFLE])
@settings(max_examples=30, deadline=None)
@given(out_features=st.integers(1, 40), blocks_per_row=st.integers(1, 24),
       blocksize=st.sampled_from([32, 64, 96, 128]), quant_type=st.sampled_from(QUANT_TYPES),
       double_quant=st.booleans(), rows=st.integers(1, 40), seed=st.integers(0, 99))
def test_panel_products_match_dense_product(path, out_features, blocks_per_row, blocksize, quant_type,
                                            double_quant, rows, seed):
    _use(path)
    # in up to 3072: several panel depths (512) and result chunks (128), some inside a block (96)
    in_features = blocks_per_row * blocksize
    qt, block_scales, shifts, dense = _case(out_features, in_features, quant_type, blocksize,
                                            double_quant, seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    g = rng.standard_normal((rows, out_features)).astype(np.float32)

    y = products.gemm(x, qt.packed, block_scales, shifts, qt.codebook, out_features, blocksize)
    assert y.dtype == np.float32 and y.shape == (rows, out_features)
    assert _within_summation_bound(y, x @ dense.T, np.abs(x) @ np.abs(dense).T, in_features)

    gx = products.gemm_t(g, qt.packed, block_scales, shifts, qt.codebook, in_features, blocksize)
    assert gx.dtype == np.float32 and gx.shape == (rows, in_features)
    assert _within_summation_bound(gx, g @ dense, np.abs(g) @ np.abs(dense), out_features)


@pytest.mark.parametrize("path", [PERMUTE, SHUFFLE])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_panel_products_match_the_reference_and_ignore_the_thread_count(path, quant_type):
    _use(path)
    qt, block_scales, shifts, _ = _case(300, 576, quant_type, 64, True)       # SmolLM2's width
    rng = np.random.default_rng(7)
    x = rng.standard_normal((37, 576)).astype(np.float32)
    g = rng.standard_normal((37, 300)).astype(np.float32)
    args = (qt.packed, block_scales, shifts, qt.codebook)
    y, gx = products.gemm(x, *args, 300, 64), products.gemm_t(g, *args, 576, 64)
    np.testing.assert_allclose(y, reference_.gemm(x, *args, 300, 64), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gx, reference_.gemm_t(g, *args, 576, 64), rtol=1e-5, atol=1e-4)
    threads = numba.get_num_threads()
    try:                                    # each result element is summed by one thread, in one order
        numba.set_num_threads(1)
        np.testing.assert_array_equal(products.gemm(x, *args, 300, 64), y)
        np.testing.assert_array_equal(products.gemm_t(g, *args, 576, 64), gx)
    finally:
        numba.set_num_threads(threads)


def test_non_contiguous_and_batched_inputs():
    qt, _, _, dense = _case(48, 128, "fp4", 32, False)
    x = np.random.default_rng(4).standard_normal((2, 1, 256)).astype(np.float32)[..., ::2]   # strided
    y = qlora_np.matmul(x, qt)
    assert y.shape == (2, 1, 48)
    np.testing.assert_allclose(y, x @ dense.T, rtol=1e-5, atol=1e-4)
    g = np.asfortranarray(np.random.default_rng(5).standard_normal((3, 48)).astype(np.float32))
    np.testing.assert_allclose(qlora_np.matmul_t(g, qt), g @ dense, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_gemv_many_equals_one_product_per_weight(path):
    simd = _use(path)
    parts, expected = [], []
    x = np.random.default_rng(4).standard_normal((3, 128)).astype(np.float32)
    for seed, out_features in enumerate((40, 8, 24)):
        qt, block_scales, _, _ = _case(out_features, 128, "nf4", 64, seed % 2 == 0, seed)
        parts.append((qt.packed, block_scales, out_features))
        expected.append(products.gemv(x, qt.packed, block_scales, None, qt.codebook, out_features, 64, simd))
    y = products.gemv_many(x, parts, qt.codebook, 64, simd)
    np.testing.assert_array_equal(y, np.concatenate(expected, axis=1))
    read_only = parts[1][1].copy()
    read_only.setflags(write=False)                       # another Numba type: one call per weight
    mixed = [parts[0], (parts[1][0], read_only, 8), parts[2]]
    np.testing.assert_array_equal(products.gemv_many(x, mixed, qt.codebook, 64, simd), y)
    np.testing.assert_array_equal(products.gemv_many(x, parts + parts[:2], qt.codebook, 64, simd),
                                  np.concatenate(expected + expected[:2], axis=1))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 3), groups=st.integers(1, 8), seed=st.integers(0, 999),
       spread=st.sampled_from([1e-30, 1.0, 1e4]), zeros=st.booleans())
def test_quantize_activations_equals_the_reference_bit_for_bit(rows, groups, seed, spread, zeros):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, 32 * groups)) * spread).astype(np.float32)
    if zeros:
        x[:, :32] = 0                                               # an all-zero group: scale 0
    xq, x_scales = products.quantize_activations(x)
    expected_xq, expected_scales = reference_.quantize_activations(x)
    np.testing.assert_array_equal(xq, expected_xq)
    np.testing.assert_array_equal(x_scales, expected_scales)
    assert np.abs(xq.astype(np.int64)).max() <= 127


@pytest.mark.parametrize("path", [SHUFFLE, "portable"])                  # int8 does not use the decode
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize, rows", [(32, 1), (64, 5), (128, 4), (256, 2)])
def test_int8_activation_products_match_the_reference(path, quant_type, blocksize, rows):
    simd = _use(path)
    qt, block_scales, _, dense = _case(37, 4 * blocksize, quant_type, blocksize, True, seed=rows)
    x = np.random.default_rng(9).standard_normal((rows, 4 * blocksize)).astype(np.float32)
    y = products.gemv_many(x, [(qt.packed, block_scales, 37)], qt.codebook, blocksize, simd,
                           int8_activations=True)
    expected = reference_.gemv_int8(x, qt.packed, block_scales, qt.codebook, 37, blocksize)
    # the integer dots are exact: only float32 rounding of ≤ in/32 scaled group sums differs
    bound = 4 * (4 * blocksize // 32 + 2) * 2.0 ** -24 * (np.abs(x) @ np.abs(dense).T) + 1e-30
    assert np.all(np.abs(y - expected) <= bound)
    exact = x @ dense.T                                              # and it is close to exact
    assert np.linalg.norm(y - exact) <= 0.03 * np.linalg.norm(exact)


def test_int8_activations_in_matmul_and_where_they_do_not_apply():
    qt = qlora_np.quantize(np.random.default_rng(2).standard_normal((48, 96)).astype(np.float32), "nf4", 32)
    x = np.random.default_rng(3).standard_normal((2, 96)).astype(np.float32)
    approximate = qlora_np.matmul(x, qt, int8_activations=True)
    np.testing.assert_allclose(approximate, reference_.gemv_int8(x, qt.packed, qt.absmax, qt.codebook, 48, 32),
                               rtol=1e-5, atol=1e-5)
    assert not np.array_equal(approximate, qlora_np.matmul(x, qt))
    for exact_only in (qlora_np.quantize(qt_weight := np.ones((8, 96), np.float32), "int4_asym", 32),
                       qlora_np.quantize(qt_weight, "nf4", 48)):        # zero points; 48 = 1.5 groups
        np.testing.assert_array_equal(qlora_np.matmul(x, exact_only, int8_activations=True),
                                      qlora_np.matmul(x, exact_only))


def test_int8_activations_refuse_partial_groups():
    qt, block_scales, _, _ = _case(4, 96, "nf4", 48, False)
    with pytest.raises(qlora_np.ShapeError, match="whole groups of 32"):
        products.gemv_many(np.ones((1, 96), np.float32), [(qt.packed, block_scales, 4)], qt.codebook, 48,
                           int8_activations=True)
