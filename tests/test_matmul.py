"""Products with a quantized weight equal products with its decoded values."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qlora_np
from qlora_np.errors import DTypeError, ShapeError, UnknownFormatError

QUANT_TYPES = ["nf4", "fp4", "int4", "int4_asym"]


def _weight(out_features, in_features, seed=0):
    return np.random.default_rng(seed).standard_normal((out_features, in_features)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(out_features=st.integers(1, 70), in_features=st.integers(1, 90),
       quant_type=st.sampled_from(QUANT_TYPES), double_quant=st.booleans(),
       blocksize=st.sampled_from([2, 32, 64, 4096]), rows=st.integers(1, 5),
       backend=st.sampled_from(["numba", "reference"]))
def test_matmul_equals_dense_product_of_decoded_weight(out_features, in_features, quant_type,
                                                       double_quant, blocksize, rows, backend):
    qt = qlora_np.quantize(_weight(out_features, in_features), quant_type, blocksize, double_quant)
    dense = qlora_np.dequantize(qt).astype(np.float64)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    grad = rng.standard_normal((rows, out_features)).astype(np.float32)
    # float32 products of length k: error ≲ k · eps · Σ|terms|
    y = qlora_np.matmul(x, qt, backend)
    bound = in_features * 1.2e-7 * (np.abs(x) @ np.abs(dense).T) + 1e-6
    assert np.all(np.abs(y - x @ dense.T) <= bound)
    gx = qlora_np.matmul_t(grad, qt, backend)
    bound = out_features * 1.2e-7 * (np.abs(grad) @ np.abs(dense)) + 1e-6
    assert np.all(np.abs(gx - grad @ dense) <= bound)


def test_matmul_tiles_many_rows_and_keeps_leading_dims(monkeypatch):
    monkeypatch.setattr(qlora_np.linalg.products, "TILE_ELEMENTS", 3 * 77)     # force many small tiles
    qt = qlora_np.quantize(_weight(50, 77), "nf4", 64, True)
    dense = qlora_np.dequantize(qt)
    x = np.random.default_rng(2).standard_normal((2, 3, 77)).astype(np.float32)
    np.testing.assert_allclose(qlora_np.matmul(x, qt), x @ dense.T, rtol=1e-5, atol=1e-5)
    grad = np.random.default_rng(3).standard_normal((2, 3, 50)).astype(np.float32)
    np.testing.assert_allclose(qlora_np.matmul_t(grad, qt), grad @ dense, rtol=1e-5, atol=1e-5)


def test_matmul_accepts_half_precision_inputs():
    qt = qlora_np.quantize(_weight(8, 64), "nf4", 64)
    x = np.ones((2, 64), np.float16)
    np.testing.assert_allclose(qlora_np.matmul(x, qt), x.astype(np.float32) @ qlora_np.dequantize(qt).T,
                               rtol=1e-6, atol=1e-5)


def test_matmul_rejects_bad_inputs():
    qt = qlora_np.quantize(_weight(8, 64), "nf4", 64)
    with pytest.raises(ShapeError, match="last dimension 64"):
        qlora_np.matmul(np.ones((2, 63), np.float32), qt)
    with pytest.raises(ShapeError, match="last dimension 8"):
        qlora_np.matmul_t(np.ones((2, 64), np.float32), qt)
    with pytest.raises(DTypeError):
        qlora_np.matmul(np.ones((2, 64), np.int32), qt)
    with pytest.raises(ShapeError, match="2-D"):
        qlora_np.matmul(np.ones(4, np.float32), qlora_np.quantize(np.ones(4, np.float32)))
    with pytest.raises(UnknownFormatError):
        qlora_np.matmul(np.ones((2, 64), np.float32), np.ones((8, 64), np.float32))
