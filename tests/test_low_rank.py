"""kernels.low_rank: the adapters' weight-gradient product h.T @ g against the reference."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qlora_np.quant import reference
from qlora_np.linalg import reference as reference_
from qlora_np.errors import ShapeError
from qlora_np.kernels import features, low_rank

TILE = pytest.mark.skipif(not features.HAS_AVX512, reason="the register tile needs AVX-512")


def _bound(h, g):
    """What float32 sums of ``rows`` products may be off by: rows · 2⁻²³ · Σ|h||g| (one
    rounding an FMA or addition)."""
    return h.shape[0] * 2.0 ** -23 * (np.abs(h).T.astype(np.float64) @ np.abs(g)) + 1e-30


@TILE
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 300), rank=st.integers(1, 20), n=st.integers(1, 200), seed=st.integers(0, 2 ** 16))
def test_thin_t_product_matches_the_reference(rows, rank, n, seed):
    rng = np.random.default_rng(seed)
    h, g = rng.standard_normal((rows, rank), np.float32), rng.standard_normal((rows, n), np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(low_rank, "SMALL", 0)                          # the tile even for a small g
        got = low_rank.thin_t_product(h, g)
    assert got.shape == (rank, n) and got.dtype == np.float32
    assert np.all(np.abs(got - reference_.thin_t_product(h, g)) <= _bound(h, g))


@TILE
def test_thin_t_product_does_not_depend_on_the_thread_count():
    rng = np.random.default_rng(1)
    h, g = rng.standard_normal((1000, 8), np.float32), rng.standard_normal((1000, 6 * 32 + 5), np.float32)
    before, results = numba.get_num_threads(), []
    try:
        for threads in (1, before):
            numba.set_num_threads(threads)
            results.append(low_rank.thin_t_product(h, g))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("rows", [5, 512])                             # BLAS, and the tile where there is one
def test_thin_t_product_takes_strided_operands(rows):
    rng = np.random.default_rng(rows)
    h = rng.standard_normal((rows, 24), np.float32)[:, ::3]            # (rows, 8), strided
    g = rng.standard_normal((rows, 400), np.float32)[:, ::2]           # (rows, 200), strided columns
    got = low_rank.thin_t_product(h, g)
    assert np.all(np.abs(got - reference_.thin_t_product(h, g)) <= _bound(h, g))


def test_thin_t_product_refuses_operands_that_do_not_share_rows():
    with pytest.raises(ShapeError):
        low_rank.thin_t_product(np.ones((4, 2), np.float32), np.ones((5, 3), np.float32))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 200), rank=st.integers(1, 12), n=st.integers(1, 100).map(lambda n: 2 * n),
       extra=st.sampled_from([0, 8]), seed=st.integers(0, 2 ** 16), avx512=st.booleans())
def test_thin_t_product_reads_bfloat16_pairs(rows, rank, n, extra, seed, avx512):
    """g as the pairs a product rounded (h's pairs may follow): the sums of its bfloat16 values."""
    from qlora_np.kernels import bf16
    rng = np.random.default_rng(seed)
    h, x = rng.standard_normal((rows, rank), np.float32), rng.standard_normal((rows, n), np.float32)
    pairs = bf16.rounded_rows(x, simd=True, rank=extra)                # (rows, n/2 [+ h's room])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "HAS_AVX512", avx512 and features.HAS_AVX512)
        got = low_rank.thin_t_product(h, pairs, n)
    rounded = reference_.round_to_bfloat16(x)
    assert got.shape == (rank, n)
    assert np.all(np.abs(got - reference_.thin_t_product(h, rounded)) <= _bound(h, rounded))


@pytest.mark.parametrize("columns", [7, 0, None])                       # more than the pairs hold, or none
def test_thin_t_product_checks_the_pairs_columns(columns):
    with pytest.raises(ShapeError):
        low_rank.thin_t_product(np.ones((4, 2), np.float32), np.ones((4, 3), np.uint32), columns)
