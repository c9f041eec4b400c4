"""Bad input to the public functions raises a typed QLoraError that says what was expected."""

import numpy as np
import pytest

import qlora_np
from qlora_np.errors import (BlocksizeError, DTypeError, InvalidValueError, QLoraError, ShapeError,
                             UnknownFormatError)


def _raises(error_type, builtin, match, function, *args, **kwargs):
    with pytest.raises(error_type, match=match) as info:
        function(*args, **kwargs)
    assert isinstance(info.value, QLoraError) and isinstance(info.value, builtin)


@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_with_their_index(backend, bad):
    values = np.ones(300, np.float32)
    values[137] = bad
    _raises(InvalidValueError, ValueError, r"non-finite.*flat index 137", qlora_np.quantize, values,
            backend=backend)


def test_a_block_whose_scale_overflows_is_refused():
    # finite values, but int4_asym's step (max - min) / 15 overflows float32
    values = np.array([-3e38, 3e38] * 32, np.float32)
    _raises(InvalidValueError, ValueError, "overflows|non-finite", qlora_np.quantize, values, "int4_asym")


def test_empty_arrays_are_refused():
    _raises(InvalidValueError, ValueError, r"empty array \(shape \(0, 4\)\)", qlora_np.quantize,
            np.zeros((0, 4), np.float32))


@pytest.mark.parametrize("array", [np.arange(64), np.ones(64, bool), np.ones(64, np.complex64),
                                   np.array(["a"] * 64), np.array([object()] * 64)])
def test_non_float_dtypes_are_refused_naming_the_dtype(array):
    _raises(DTypeError, TypeError, f"expected a float array.*got dtype {array.dtype}",
            qlora_np.quantize, array)


@pytest.mark.parametrize("blocksize", [0, -64, 33, 63.5, True, "64", None])
def test_bad_blocksizes_are_refused(blocksize):
    _raises(BlocksizeError, ValueError, "blocksize must be", qlora_np.quantize,
            np.ones(128, np.float32), "nf4", blocksize)


@pytest.mark.parametrize("kwargs, match", [
    (dict(quant_type="nf5"), r"quant_type must be one of \['fp4', 'int4', 'int4_asym', 'nf4'\], got 'nf5'"),
    (dict(quant_type=None), "quant_type must be one of"),
    (dict(strategy="row"), "strategy must be one of"),
    (dict(backend="torch"), "backend must be 'numba' or 'reference', got 'torch'"),
    (dict(double_quant="yes"), "double_quant must be True or False"),
])
def test_unknown_names_are_refused(kwargs, match):
    _raises(UnknownFormatError, ValueError, match, qlora_np.quantize, np.ones(128, np.float32), **kwargs)


def test_dequantize_checks_its_arguments():
    _raises(UnknownFormatError, ValueError, "expects a QuantizedTensor, got ndarray",
            qlora_np.dequantize, np.ones(4, np.float32))
    qt = qlora_np.quantize(np.ones(128, np.float32))
    _raises(DTypeError, TypeError, "dtype must be one of", qlora_np.dequantize, qt, dtype="int8")
    _raises(DTypeError, TypeError, "dtype must be one of", qlora_np.dequantize, qt, dtype=np.int32)


def test_products_check_shapes_and_types():
    qt = qlora_np.quantize(np.ones((8, 64), np.float32))
    _raises(ShapeError, ValueError, r"last dimension 64.*got shape \(3, 32\)", qlora_np.matmul,
            np.ones((3, 32), np.float32), qt)
    _raises(ShapeError, ValueError, "last dimension 8", qlora_np.matmul_t, np.ones((3, 64), np.float32), qt)
    _raises(DTypeError, TypeError, "got dtype int64", qlora_np.matmul, np.ones((3, 64), np.int64), qt)
    _raises(UnknownFormatError, ValueError, "expected a QuantizedTensor", qlora_np.matmul,
            np.ones((3, 64), np.float32), np.ones((8, 64), np.float32))
    flat = qlora_np.quantize(np.ones(64, np.float32))
    _raises(ShapeError, ValueError, "must be 2-D", qlora_np.matmul, np.ones((1, 64), np.float32), flat)
