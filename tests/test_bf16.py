"""bfloat16 products (kernels.bf16, and compute_dtype="bfloat16" in matmul / matmul_t)
against the plain rounding-then-exact-sum reference."""

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qlora_np
from qlora_np.quant import reference
from qlora_np.linalg import reference as reference_
from qlora_np.errors import ShapeError, UnknownFormatError
from qlora_np.kernels import features
from qlora_np.kernels.x86 import amx
from qlora_np.kernels import bf16
from qlora_np.linalg.plan import PANEL_MAX_ROWS, plan_product

AMX = pytest.param("amx", marks=pytest.mark.skipif(not features.amx_permitted(), reason="no AMX BF16"))
AVX512 = pytest.param("avx512", marks=pytest.mark.skipif(not features.HAS_AVX512_BF16, reason="no AVX-512 BF16"))
TILES = [AMX, AVX512]
PATHS = TILES + ["blas"]
"""The three paths: AMX tiles, vdpbf16ps register tiles, and BLAS on the rounded values."""


@contextlib.contextmanager
def _on(path):
    """Run the products on ``path``; yields rounded_rows' ``simd`` flag for it."""
    before = features.USE_AMX
    features.USE_AMX = path == "amx"
    try:
        yield path != "blas"
    finally:
        features.USE_AMX = before


def _bound(a, b):
    """What float32 sums of k exact bfloat16 products may be off by: k · 2⁻²³ · Σ|a||b|
    (each of the k additions rounds once; vdpbf16ps also flushes subnormals, which
    these tests' values never are)."""
    k = a.shape[1]
    return k * 2.0 ** -23 * (np.abs(reference_.round_to_bfloat16(a)).astype(np.float64)
                             @ np.abs(reference_.round_to_bfloat16(b)).astype(np.float64)) + 1e-30


def test_rounding_is_to_nearest_even_and_keeps_specials():
    one_ulp = 2.0 ** -7                                    # bfloat16's ulp at 1
    values = np.array([1.0, 1 + one_ulp / 2, 1 + 1.5 * one_ulp, 1 + one_ulp / 2 + 2 ** -20, -2.5e-3,
                       np.inf, -np.inf, np.nan, 3.4e38, 0.0, -0.0], np.float32)
    expected = [1.0, 1.0, 1 + 2 * one_ulp, 1 + one_ulp]                # ties go to the even neighbour
    rounded = reference_.round_to_bfloat16(values)
    np.testing.assert_array_equal(rounded[:4], expected)
    assert np.isnan(rounded[7]) and np.isinf(rounded[8]) and rounded[5] == np.inf and rounded[6] == -np.inf
    assert np.signbit(rounded[10]) and not np.signbit(rounded[9])
    assert (rounded.view(np.uint32) & 0xFFFF == 0).all()
    kernel = np.empty_like(values[None])
    bf16.round_to_bfloat16(values[None], kernel)
    np.testing.assert_array_equal(kernel[0].view(np.uint32), rounded.view(np.uint32))
    pairs = np.empty((1, (values.size + 1) // 2), np.uint32)
    bf16.round_pairs(values[None], pairs)
    halves = np.stack([pairs[0] & 0xFFFF, pairs[0] >> 16], axis=1).reshape(-1)[:values.size]
    np.testing.assert_array_equal(halves.astype(np.uint32) << 16, rounded.view(np.uint32))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 20), k=st.integers(1, 70), n=st.integers(1, 80), transposed=st.booleans(),
       seed=st.integers(0, 2 ** 16))
@pytest.mark.parametrize("path", PATHS)
def test_product_matches_reference(path, rows, k, n, transposed, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, k)).astype(np.float32)
    b = rng.standard_normal((n, k)).astype(np.float32).T if transposed else \
        rng.standard_normal((k, n)).astype(np.float32)                    # (k, n), either stride
    with _on(path) as simd:
        result = bf16.matmul_bf16(bf16.rounded_rows(a, simd), b)
    assert result.shape == (rows, n) and result.dtype == np.float32
    assert (np.abs(result - reference_.matmul_bf16(a, b)) <= _bound(a, b)).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [40, 64])
def test_product_writes_into_a_column_view(path, k):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((45, k), np.float32), rng.standard_normal((k, 64), np.float32)
    out = np.full((45, 100), 7.0, np.float32)
    with _on(path) as simd:
        bf16.matmul_bf16(bf16.rounded_rows(a, simd), b, out=out[:, 32:96])
    assert (np.abs(out[:, 32:96] - reference_.matmul_bf16(a, b)) <= _bound(a, b)).all()
    assert (out[:, :32] == 7).all() and (out[:, 96:] == 7).all()


@pytest.mark.parametrize("path", PATHS)
def test_each_path_is_within_the_bound_on_a_training_shape(path):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((300, 576), np.float32), rng.standard_normal((576, 200), np.float32)
    with _on(path) as simd:
        result = bf16.matmul_bf16(bf16.rounded_rows(a, simd), b)
    assert (np.abs(result - reference_.matmul_bf16(a, b)) <= _bound(a, b)).all()


@pytest.mark.skipif(not features.amx_permitted(), reason="no AMX BF16")
@pytest.mark.parametrize("rows", [1, 31, 32, 33, 70])
@pytest.mark.parametrize("k", [32, 96, 576, 2048])
def test_amx_rows_do_not_depend_on_their_neighbours(rows, k):
    """A last partial block of rows goes through zero-padded spares: each row's values are
    those it gets alone, and closer to the exact sums than the bound (k = 2048: groups of
    8 of the 10 panels)."""
    rng = np.random.default_rng(rows * k)
    a, b = rng.standard_normal((rows, k), np.float32), rng.standard_normal((k, 9 * 32 + 5), np.float32)
    with _on("amx"):
        assert amx.fits(k // 2)
        together = bf16.matmul_bf16(bf16.rounded_rows(a), b)
        for r in range(rows):
            alone = bf16.matmul_bf16(bf16.rounded_rows(a[r:r + 1]), b)
            np.testing.assert_array_equal(together[r:r + 1], alone)
    assert (np.abs(together - reference_.matmul_bf16(a, b)) <= _bound(a, b) / 4).all()


def test_amx_is_turned_off_from_the_environment():
    code = "from qlora_np.kernels import features; print(features.USE_AMX)"
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "QLORA_NP_AMX": "0"},
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


def test_amx_takes_only_whole_steps_of_k(monkeypatch):
    monkeypatch.setattr(features, "USE_AMX", True)
    monkeypatch.setattr(features, "amx_permitted", lambda: True)
    assert amx.fits(16) and amx.fits(288) and not amx.fits(20) and not amx.fits(8)
    monkeypatch.setattr(features, "USE_AMX", False)
    assert not amx.fits(288)


@pytest.mark.parametrize("quant_type", ["nf4", "int4_asym"])
def test_matmul_and_matmul_t_in_bfloat16(quant_type):
    rng = np.random.default_rng(3)
    out_features, in_features, rows = 96, 128, PANEL_MAX_ROWS + 30        # the decoded-tile path
    qt = qlora_np.quantize(rng.standard_normal((out_features, in_features), np.float32), quant_type, 64, True)
    weight = qlora_np.dequantize(qt)                                        # (out, in)
    x = rng.standard_normal((rows, in_features), np.float32)
    g = rng.standard_normal((rows, out_features), np.float32)
    y = qlora_np.matmul(x, qt, compute_dtype="bfloat16")
    assert (np.abs(y - reference_.matmul_bf16(x, weight.T)) <= _bound(x, weight.T)).all()
    grad = qlora_np.matmul_t(g, qt, compute_dtype="bfloat16")
    assert (np.abs(grad - reference_.matmul_bf16(g, weight)) <= _bound(g, weight)).all()
    exact = qlora_np.matmul(x, qt)
    assert 0 < np.abs(y - exact).max() <= 0.02 * np.abs(exact).max()      # really rounded, and only that


FROM_CODES = pytest.mark.skipif(not bf16.decodes_4bit((64, 64), 64), reason="no AVX-512 BF16 permute decode")


def _weight(quant_type, out_features, in_features, blocksize, seed):
    """(the kernels' Weight4bit, the dequantized float32 W) of a random quantized W."""
    rng = np.random.default_rng(seed)
    qt = qlora_np.quantize(rng.standard_normal((out_features, in_features), np.float32), quant_type,
                           blocksize, True)
    return qlora_np.linalg.products._bfloat16_weight(qt), qlora_np.dequantize(qt)


def _packed(b):
    """pack_panel's panels of a float32 b (k, n): the layout the 4-bit panel decoders must give."""
    panels = np.empty((-(-b.shape[1] // bf16.PANEL), (b.shape[0] + 1) // 2, bf16.PANEL), np.uint32)
    for p in range(panels.shape[0]):
        bf16.pack_panel(b, p, panels[p])
    return panels


@FROM_CODES
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4_asym"])
@pytest.mark.parametrize("out_features, in_features, blocksize, first_row, rows",
                         [(96, 128, 64, 0, 96), (70, 48, 16, 32, 37), (33, 256, 128, 1, 31)])
def test_panels_from_codes_are_the_panels_of_the_decoded_weight(quant_type, out_features, in_features,
                                                                blocksize, first_row, rows):
    weight, decoded = _weight(quant_type, out_features, in_features, blocksize, seed=5)
    part = decoded[first_row:first_row + rows]                               # (rows, in)
    for_x = np.empty((-(-rows // bf16.PANEL), in_features // 2, bf16.PANEL), np.uint32)
    bf16.pack_weight_rows(weight.packed, weight.scales, weight.shifts, blocksize, weight.table,
                          in_features, first_row, first_row + rows, for_x)
    np.testing.assert_array_equal(for_x, _packed(part.T))
    for_g = np.empty((-(-in_features // bf16.PANEL), (rows + 1) // 2, bf16.PANEL), np.uint32)
    bf16.pack_weight_columns(weight.packed, weight.scales, weight.shifts, blocksize, weight.table,
                             in_features, first_row, rows, for_g, 2)
    np.testing.assert_array_equal(for_g, _packed(part))


@FROM_CODES
@settings(max_examples=25, deadline=None)
@given(quant_type=st.sampled_from(["nf4", "fp4", "int4_asym"]), out_features=st.integers(1, 100),
       blocks=st.integers(1, 4), blocksize=st.sampled_from([16, 32, 64, 128]), n=st.integers(1, 20),
       data=st.data())
@pytest.mark.parametrize("path", TILES)
def test_products_from_codes_equal_products_with_the_decoded_weight(path, quant_type, out_features, blocks,
                                                                   blocksize, n, data):
    with _on(path):
        _check_products_from_codes(quant_type, out_features, blocks, blocksize, n, data)


def _check_products_from_codes(quant_type, out_features, blocks, blocksize, n, data):
    in_features = blocks * blocksize
    weight, decoded = _weight(quant_type, out_features, in_features, blocksize, seed=out_features)
    first_row = data.draw(st.integers(0, out_features - 1))
    rows = data.draw(st.integers(1, out_features - first_row))
    rng = np.random.default_rng(n)
    x, g = rng.standard_normal((n, in_features), np.float32), rng.standard_normal((n, rows), np.float32)
    part = decoded[first_row:first_row + rows]
    y = bf16.times_weight_t(bf16.rounded_rows(x), weight, first_row, rows, np.empty((n, rows), np.float32))
    np.testing.assert_array_equal(y, bf16.matmul_bf16(bf16.rounded_rows(x), part.T))
    grad = bf16.times_weight(bf16.rounded_rows(g), weight, first_row, rows,
                             np.empty((n, in_features), np.float32))
    np.testing.assert_array_equal(grad, bf16.matmul_bf16(bf16.rounded_rows(g), part))


@FROM_CODES
@settings(max_examples=20, deadline=None)
@given(out_features=st.integers(1, 100), blocks=st.integers(1, 4), blocksize=st.sampled_from([16, 32, 64]),
       n=st.integers(1, 40), rank=st.integers(1, 40), data=st.data())
@pytest.mark.parametrize("path", TILES)
def test_a_low_rank_term_rides_in_the_product_as_more_k(path, out_features, blocks, blocksize, n, rank, data):
    """x @ W.T + h @ e with h's pairs after x's and e's rows after W's: the same bytes as the
    product of [x | h | 0] with [W.T; e; 0], and so within bfloat16 of the float32 sums."""
    in_features = blocks * blocksize
    weight, decoded = _weight("nf4", out_features, in_features, blocksize, seed=rank)
    first_row = data.draw(st.integers(0, out_features - 1))
    rows = data.draw(st.integers(1, out_features - first_row))
    part = decoded[first_row:first_row + rows]                               # (rows, in)
    rng = np.random.default_rng(n)
    x, g = rng.standard_normal((n, in_features), np.float32), rng.standard_normal((n, rows), np.float32)
    h = rng.standard_normal((n, rank), np.float32)
    e_out, e_in = rng.standard_normal((rank, out_features), np.float32), rng.standard_normal((rank, in_features),
                                                                                          np.float32)
    padding = 2 * bf16.low_rank_pairs(rank) - rank
    with _on(path):
        x_pairs, g_pairs = bf16.rounded_rows(x, rank=rank), bf16.rounded_rows(g, rank=rank)
        bf16.put_low_rank(x_pairs, h)
        bf16.put_low_rank(g_pairs, h)
        y = bf16.times_weight_t(x_pairs, weight, first_row, rows, np.empty((n, rows), np.float32), low_rank=e_out)
        grad = bf16.times_weight(g_pairs, weight, first_row, rows, np.empty((n, in_features), np.float32),
                                 low_rank=e_in)
        e_part = e_out[:, first_row:first_row + rows]
        expected_y = bf16.matmul_bf16(bf16.rounded_rows(np.hstack([x, h, np.zeros((n, padding), np.float32)])),
                                      np.vstack([part.T, e_part, np.zeros((padding, rows), np.float32)]))
        g_even = np.hstack([g, np.zeros((n, rows % 2), np.float32)])     # h's pairs start on a whole pair
        expected_grad = bf16.matmul_bf16(
            bf16.rounded_rows(np.hstack([g_even, h, np.zeros((n, padding), np.float32)])),
            np.vstack([part, np.zeros((rows % 2, in_features), np.float32), e_in,
                       np.zeros((padding, in_features), np.float32)]))
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(grad, expected_grad)
    exact_y, exact_grad = x @ part.T + h @ e_part, g @ part + h @ e_in
    sizes_y = np.abs(x) @ np.abs(part.T) + np.abs(h) @ np.abs(e_part)
    sizes_grad = np.abs(g) @ np.abs(part) + np.abs(h) @ np.abs(e_in)
    assert np.all(np.abs(y - exact_y) <= 2 ** -7 * sizes_y + 1e-6)          # two roundings of 2⁻⁹ each, and sums
    assert np.all(np.abs(grad - exact_grad) <= 2 ** -7 * sizes_grad + 1e-6)


@FROM_CODES
def test_a_low_rank_term_must_fit_the_pairs():
    weight, _ = _weight("nf4", 40, 64, 64, seed=1)
    x, h = np.ones((3, 64), np.float32), np.ones((3, 8), np.float32)
    with pytest.raises(ShapeError):                                          # pairs without h's columns
        bf16.times_weight_t(bf16.rounded_rows(x), weight, 0, 40, np.empty((3, 40), np.float32),
                            low_rank=np.ones((8, 40), np.float32))
    with pytest.raises(ShapeError):                                          # h with another row count
        bf16.put_low_rank(bf16.rounded_rows(x, rank=8), h[:2])


@FROM_CODES
@pytest.mark.parametrize("path", TILES)
def test_products_from_codes_do_not_depend_on_the_thread_count(path):
    import numba

    weight, _ = _weight("nf4", 96, 128, 64, seed=3)
    x = np.random.default_rng(3).standard_normal((100, 128)).astype(np.float32)     # 3 blocks and a part
    g = np.random.default_rng(4).standard_normal((100, 96)).astype(np.float32)
    before, results = numba.get_num_threads(), []
    try:
        for threads in (1, before):
            numba.set_num_threads(threads)
            with _on(path):
                y = bf16.times_weight_t(bf16.rounded_rows(x), weight, 0, 96, np.empty((100, 96), np.float32))
                grad = bf16.times_weight(bf16.rounded_rows(g), weight, 0, 96,
                                         np.empty((100, 128), np.float32))
                results.append((y, grad))
    finally:
        numba.set_num_threads(before)
    for one, many in zip(*results):
        np.testing.assert_array_equal(one, many)


@FROM_CODES
def test_weights_larger_than_a_tile_go_in_row_ranges(monkeypatch):
    monkeypatch.setattr(qlora_np.linalg.products, "TILE_ELEMENTS", 64 * 128)             # ranges of 64 rows
    rng = np.random.default_rng(6)
    qt = qlora_np.quantize(rng.standard_normal((200, 128), np.float32), "nf4", 64)
    assert [count for _, count in qlora_np.linalg.products._weight_row_ranges(qt)] == [64, 64, 64, 8]
    weight = qlora_np.dequantize(qt)
    x = rng.standard_normal((PANEL_MAX_ROWS + 5, 128), np.float32)
    g = rng.standard_normal((PANEL_MAX_ROWS + 5, 200), np.float32)
    np.testing.assert_array_equal(qlora_np.matmul(x, qt, compute_dtype="bfloat16"),
                                  bf16.matmul_bf16(bf16.rounded_rows(x), weight.T))
    grad = qlora_np.matmul_t(g, qt, compute_dtype="bfloat16")
    assert (np.abs(grad - reference_.matmul_bf16(g, weight)) <= _bound(g, weight)).all()


@pytest.mark.parametrize("ranges", [False, True])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [5, PANEL_MAX_ROWS + 5])
def test_low_rank_products_add_the_term(monkeypatch, ranges, compute_dtype, rows):
    """ops.matmul_low_rank / matmul_t_low_rank = (matmul / matmul_t + scale · h @ e, h) with
    h = x @ a.T: float32 where the term does not ride along (float32, few rows), within
    bfloat16 where it does, also when W goes in row ranges (h rides with the first range
    of g @ W)."""
    if ranges:
        monkeypatch.setattr(qlora_np.linalg.products, "TILE_ELEMENTS", 64 * 128)         # ranges of 64 rows
    rng = np.random.default_rng(rows)
    qt = qlora_np.quantize(rng.standard_normal((200, 128), np.float32), "nf4", 64)
    weight = qlora_np.dequantize(qt)
    x, g = rng.standard_normal((rows, 128), np.float32), rng.standard_normal((rows, 200), np.float32)
    a_in, a_out = rng.standard_normal((8, 128), np.float32), rng.standard_normal((8, 200), np.float32)
    y, h_x, x_pairs = qlora_np.linalg.products.matmul_low_rank(x, qt, a_in, a_out, 0.5, compute_dtype)
    grad, h_g, g_pairs = qlora_np.linalg.products.matmul_t_low_rank(g, qt, a_out, a_in, 0.5, compute_dtype)
    given = rng.standard_normal((rows, 8), np.float32)
    y_given, h_given, _ = qlora_np.linalg.products.matmul_low_rank(x, qt, a_in, a_out, 0.5, compute_dtype, h=given)
    np.testing.assert_array_equal(h_given, given)
    folds = plan_product("forward", rows, qt, compute_dtype).kernel == "bfloat16_panels"
    cases = [(h_x, x @ a_in.T, np.abs(x) @ np.abs(a_in.T)), (h_g, g @ a_out.T, np.abs(g) @ np.abs(a_out.T)),
             (y, x @ weight.T + 0.5 * (x @ a_in.T) @ a_out,                  # |x| |W| + 0.5 |x| |A| |e|
              np.abs(x) @ np.abs(weight.T) + 0.5 * (np.abs(x) @ np.abs(a_in.T)) @ np.abs(a_out)),
             (grad, g @ weight + 0.5 * (g @ a_out.T) @ a_in,
              np.abs(g) @ np.abs(weight) + 0.5 * (np.abs(g) @ np.abs(a_out.T)) @ np.abs(a_in)),
             (y_given, x @ weight.T + 0.5 * given @ a_out,
              np.abs(x) @ np.abs(weight.T) + 0.5 * np.abs(given) @ np.abs(a_out))]
    for got, exact, sizes in cases:
        if folds:                                     # bfloat16 operands: 2⁻⁹ each, a few of them
            assert np.all(np.abs(got - exact) <= 2 ** -7 * sizes + 1e-5)
        else:                                         # float32, BLAS adding the term after the product
            np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-3)
    assert (x_pairs is not None) == folds                                      # x's pairs, h's after them
    assert (g_pairs is not None) == (folds and not ranges)                    # g's, where all in one range
    if g_pairs is not None:
        np.testing.assert_array_equal(g_pairs[:, :100], bf16.rounded_rows(g))
    if folds:
        np.testing.assert_array_equal(x_pairs[:, :64], bf16.rounded_rows(x))
        without = qlora_np.matmul_t(g, qt, compute_dtype="bfloat16")
        assert not np.allclose(grad, without, atol=1e-2)                     # the term is there


def test_low_rank_products_check_their_operands():
    qt = qlora_np.quantize(np.ones((40, 64), np.float32), "nf4", 64)
    x, a_in, a_out = np.ones((300, 64), np.float32), np.ones((8, 64), np.float32), np.ones((8, 40), np.float32)
    with pytest.raises(ShapeError):
        qlora_np.linalg.products.matmul_low_rank(x, qt, a_in, np.ones((8, 41), np.float32), compute_dtype="bfloat16")
    with pytest.raises(ShapeError):
        qlora_np.linalg.products.matmul_low_rank(x, qt, a_in, a_out, h=np.ones((300, 7), np.float32))
    with pytest.raises(ShapeError):
        qlora_np.linalg.products.matmul_t_low_rank(np.ones((300, 40), np.float32), qt, a_out[:7], a_in)


def test_small_batches_stay_exact_float32():
    rng = np.random.default_rng(4)
    qt = qlora_np.quantize(rng.standard_normal((64, 128), np.float32), "nf4", 64)
    x = rng.standard_normal((3, 128), np.float32)
    np.testing.assert_array_equal(qlora_np.matmul(x, qt, compute_dtype="bfloat16"), qlora_np.matmul(x, qt))


@pytest.mark.parametrize("simd", [True, False])
def test_mismatched_operands_are_refused(simd):
    rounded = bf16.rounded_rows(np.ones((3, 64), np.float32), simd)
    with pytest.raises(ShapeError, match="does not match"):
        bf16.matmul_bf16(rounded, np.ones((66, 32), np.float32))


def test_unknown_compute_dtype_is_a_typed_error():
    qt = qlora_np.quantize(np.ones((64, 64), np.float32), "nf4", 64)
    for bad in ("float16", "bf16", 3, object()):
        with pytest.raises(UnknownFormatError, match="compute_dtype"):
            qlora_np.matmul(np.ones((1, 64), np.float32), qt, compute_dtype=bad)
    with pytest.raises(UnknownFormatError, match="compute_dtype"):
        qlora_np.matmul_t(np.ones((1, 64), np.float32), qt, compute_dtype="half")


def test_lora_layer_trains_in_bfloat16():
    from qlora_np.nn.lora import LoRALinear
    rng = np.random.default_rng(5)
    layer = LoRALinear.from_weight(rng.standard_normal((64, 128), np.float32), r=4, seed=0)
    layer.lora_b[...] = rng.standard_normal(layer.lora_b.shape).astype(np.float32)
    x = rng.standard_normal((PANEL_MAX_ROWS + 10, 128), np.float32)
    g = rng.standard_normal((PANEL_MAX_ROWS + 10, 64), np.float32)
    results = {}
    for compute_dtype in ("float32", "bfloat16"):
        layer.compute_dtype = compute_dtype
        y = layer.forward(x)
        grad_x = layer.backward(g)
        results[compute_dtype] = y, grad_x, layer.grad_lora_a.copy(), layer.grad_lora_b.copy()
        layer.zero_grad()
    for exact, rounded in zip(results["float32"], results["bfloat16"]):       # the adapters' products too
        assert 0 < np.abs(rounded - exact).max() <= 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_lora_layer_keeps_what_its_backward_needs(compute_dtype):
    """keep_input=False: a float32 layer needs x again; a bfloat16 one whose adapters rode
    in the product keeps x's pairs (half the bytes) and needs nothing."""
    from qlora_np.nn.lora import LoRALinear
    rng = np.random.default_rng(6)
    layer = LoRALinear.from_weight(rng.standard_normal((64, 128), np.float32), r=4, seed=0)
    layer.compute_dtype = compute_dtype
    layer.lora_b[...] = rng.standard_normal(layer.lora_b.shape).astype(np.float32)
    x = rng.standard_normal((PANEL_MAX_ROWS + 10, 128), np.float32)
    layer.forward(x, keep_input=False)
    rides = compute_dtype == "bfloat16" and bf16.decodes_4bit((64, 128), 64)
    assert layer.needs_input_again() is not rides
    layer.backward(np.ones((PANEL_MAX_ROWS + 10, 64), np.float32), x=None if rides else x)
    grad_a = layer.grad_lora_a.copy()
    layer.zero_grad()
    layer.forward(x)
    layer.backward(np.ones((PANEL_MAX_ROWS + 10, 64), np.float32))
    np.testing.assert_array_equal(layer.grad_lora_a, grad_a)                    # the same either way


@pytest.mark.parametrize("path", PATHS)
def test_batched_products_match_each_groups_product(path, monkeypatch):
    simd = path != "blas"
    monkeypatch.setattr(features, "HAS_AVX512_BF16", simd)
    monkeypatch.setattr(features, "USE_AMX", path == "amx")
    rng = np.random.default_rng(7)
    a = rng.standard_normal((2, 3, 37, 64), np.float32)
    b = rng.standard_normal((2, 3, 40, 64), np.float32).transpose(0, 1, 3, 2)    # (2, 3, 64, 40) strided
    out = np.full((2, 3, 50, 40), 7.0, np.float32)
    bf16.batched_matmul_bf16(a, b, out=out[:, :, 5:42])                          # a view of rows
    for i, j in np.ndindex(2, 3):
        group_a, group_b, result = a[i, j], b[i, j], out[i, j, 5:42]
        assert (np.abs(result - reference_.matmul_bf16(group_a, group_b)) <= _bound(group_a, group_b)).all()
        if simd:                                     # the same tiles as one product: the same bytes
            np.testing.assert_array_equal(result, bf16.matmul_bf16(bf16.rounded_rows(group_a), group_b))
    assert (out[:, :, :5] == 7).all() and (out[:, :, 42:] == 7).all()
    with pytest.raises(ShapeError, match="cannot multiply"):
        bf16.batched_matmul_bf16(a, b[:1])


def test_training_attention_in_bfloat16_stays_close_to_float32():
    from qlora_np.models.llama import lora as llama_lora

    rng = np.random.default_rng(8)
    B, KV, g, T, d = 2, 2, 3, 160, 64                        # two query chunks, the second partial
    q, go = (rng.standard_normal((B, KV, T * g, d), np.float32) * 0.3 for _ in range(2))
    k, v = (rng.standard_normal((B, KV, T, d), np.float32) * 0.3 for _ in range(2))
    mask = np.tril(np.ones((T, T), bool))[None]
    results = {}
    for name, product in (("float32", np.matmul), ("bfloat16", bf16.batched_matmul_bf16)):
        out, lse = llama_lora._attention(q, k, v, mask, product)
        results[name] = (out, *llama_lora._attention_backward(q, k, v, mask, lse, go, product))
    for exact, rounded in zip(results["float32"], results["bfloat16"]):
        difference = np.abs(rounded - exact).max()
        assert 0 < difference <= 0.02 * np.abs(exact).max()          # rounded, and only by bfloat16's steps


def test_turning_the_permute_decode_off_takes_the_decoded_tile_path(monkeypatch):
    rng = np.random.default_rng(9)
    qt = qlora_np.quantize(rng.standard_normal((64, 128), np.float32), "nf4", 64)
    x = rng.standard_normal((PANEL_MAX_ROWS + 3, 128), np.float32)
    before = qlora_np.matmul(x, qt, compute_dtype="bfloat16")
    monkeypatch.setattr(features, "PERMUTE_DECODE", False)                  # as QLORA_NP_DECODE=shuffle
    assert not bf16.decodes_4bit(qt.shape, qt.blocksize)
    np.testing.assert_array_equal(qlora_np.matmul(x, qt, compute_dtype="bfloat16"), before)
