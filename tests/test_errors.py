"""Bad input to the public functions raises a typed QLoraError that says what was expected and what came."""

import re

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qlora_np
from qlora_np.errors import (BlocksizeError, DTypeError, InvalidValueError, QLoraError, ShapeError,
                             StateDictError, UnknownFormatError)

BACKENDS = ["numba", "reference"]
QUANT_TYPES = ["nf4", "fp4", "int4", "int4_asym"]
FLOAT_NAMES = r"\(float32, float16, bfloat16, float64\)"


def _raises(error_type, builtin, match, function, *args, **kwargs):
    """Call ``function`` and check the error's type, both base classes and message; return it."""
    with pytest.raises(error_type, match=match) as info:
        function(*args, **kwargs)
    assert isinstance(info.value, QLoraError), type(info.value).__mro__
    assert isinstance(info.value, builtin), type(info.value).__mro__
    return info.value


def test_error_hierarchy():
    for error, builtin in [(InvalidValueError, ValueError), (ShapeError, ValueError),
                           (DTypeError, TypeError), (BlocksizeError, ValueError),
                           (UnknownFormatError, ValueError), (StateDictError, ValueError)]:
        assert issubclass(error, QLoraError) and issubclass(error, builtin)
        assert getattr(qlora_np, error.__name__) is error
    assert not issubclass(DTypeError, ValueError)


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------

@st.composite
def arrays_with_non_finite(draw):
    shape = draw(st.one_of(st.tuples(st.integers(1, 2000)),
                           st.tuples(st.integers(1, 30), st.integers(1, 70)),
                           st.tuples(st.integers(1, 5), st.integers(1, 7), st.integers(1, 11))))
    dtype = draw(st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16, np.float64]))
    n = int(np.prod(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    flat = rng.standard_normal(n).astype(dtype)
    count = draw(st.integers(1, min(n, 5)))
    bad_at = np.sort(rng.choice(n, count, replace=False))
    flat[bad_at] = rng.choice(np.array([np.nan, np.inf, -np.inf]), count).astype(dtype)
    return flat.reshape(shape), int(bad_at[0]), count


@given(case=arrays_with_non_finite(), quant_type=st.sampled_from(QUANT_TYPES),
       blocksize=st.sampled_from([2, 64, 100, 4096]), double_quant=st.booleans(),
       strategy=st.sampled_from(["block", "channel", "tensor"]), backend=st.sampled_from(BACKENDS))
@settings(max_examples=100)
def test_non_finite_values_are_refused_naming_the_first_flat_index(case, quant_type, blocksize,
                                                                   double_quant, strategy, backend):
    array, first, count = case
    error = _raises(InvalidValueError, ValueError,
                    rf"non-finite values: {count} NaN/inf element\(s\) \(or beyond the float32 range\), the first at flat index {first} ",
                    qlora_np.quantize, array, quant_type, blocksize, double_quant, strategy, backend)
    value = str(error).rsplit("value ", 1)[1].rstrip(")")
    assert value in ("nan", "inf", "-inf")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scalar_and_last_element(backend, bad):
    _raises(InvalidValueError, ValueError, r"flat index 0 \(value -?(nan|inf)\)", qlora_np.quantize,
            np.float32(bad), backend=backend)
    values = np.ones((3, 65), np.float32)
    values[2, 64] = bad
    _raises(InvalidValueError, ValueError, "the first at flat index 194 ", qlora_np.quantize, values,
            backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_beyond_the_float32_range_is_refused_with_its_index(backend):
    # finite in float64 but inf once rounded to float32, which is what gets quantized
    values = np.ones(100)
    values[42] = 1e300
    with np.errstate(over="ignore"):
        _raises(InvalidValueError, ValueError, "flat index 42 ", qlora_np.quantize, values, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [0, 3])
def test_a_block_whose_scale_overflows_is_refused_naming_the_block(backend, block):
    # finite values, but int4_asym's step (max - min) / 15 overflows float32 in one block
    values = np.ones(64 * 5, np.float32)
    values[block * 64 + 10] = -3e38
    values[block * 64 + 20] = 3e38
    _raises(InvalidValueError, ValueError,
            rf"block {block} \(elements {block * 64}…\) spans more than the float32 range, so its scale overflows",
            qlora_np.quantize, values, "int4_asym", backend=backend)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_codebook_formats_take_values_up_to_the_float32_maximum(quant_type):
    # absmax is max |x| itself: any finite block has a finite scale
    values = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max, 1.0, 0.0] * 16, np.float32)
    qt = qlora_np.quantize(values, quant_type, 64)
    decoded = qlora_np.dequantize(qt)
    assert np.all(np.isfinite(decoded)) and decoded[0] == values[0] and decoded[1] == values[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_quant_whose_offset_overflows_is_refused_or_decodes_finitely(backend):
    values = np.full(256, 2e38, np.float32)              # 4 blocks of scale 2e38: their sum is 8e38
    with np.errstate(all="ignore"):
        try:
            qt = qlora_np.quantize(values, "nf4", 64, double_quant=True, backend=backend)
        except InvalidValueError:
            return
        decoded = qlora_np.dequantize(qt, backend=backend)
    assert np.isfinite(qt.offset) and np.all(np.isfinite(decoded))


@pytest.mark.parametrize("shape", [(0,), (0, 4), (4, 0), (2, 0, 3)])
@pytest.mark.parametrize("strategy", ["block", "channel", "tensor"])
def test_empty_arrays_are_refused(shape, strategy):
    _raises(InvalidValueError, ValueError, re.escape(f"cannot quantize an empty array (shape {shape})"),
            qlora_np.quantize, np.zeros(shape, np.float32), strategy=strategy)


# ---------------------------------------------------------------------------
# Dtypes
# ---------------------------------------------------------------------------

NON_FLOAT = [np.arange(64, dtype=np.int64), np.arange(64, dtype=np.int8), np.arange(64, dtype=np.uint16),
             np.ones(64, bool), np.ones(64, np.complex64), np.ones(64, np.complex128),
             np.array(["a"] * 64), np.array([b"a"] * 64), np.array([object()] * 64),
             np.array([1.0] * 64, dtype=object), np.zeros(64, "datetime64[s]"), np.zeros(64, np.longdouble)]


@pytest.mark.parametrize("array", NON_FLOAT, ids=[str(a.dtype) for a in NON_FLOAT])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_float_dtypes_are_refused_naming_the_dtype(array, backend):
    _raises(DTypeError, TypeError, rf"expected a float array {FLOAT_NAMES}, got dtype {re.escape(str(array.dtype))}$",
            qlora_np.quantize, array, backend=backend)


def test_python_ints_are_refused_and_python_floats_accepted():
    _raises(DTypeError, TypeError, "got dtype int64", qlora_np.quantize, [1, 2, 3, 4])
    assert qlora_np.quantize([1.0, 2.0, 3.0, 4.0]).dtype == "float64"


# ---------------------------------------------------------------------------
# Block sizes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("blocksize, match", [
    (0, "positive even number, got 0$"), (-64, "positive even number, got -64$"),
    (-2, "positive even number, got -2$"), (33, "positive even number, got 33$"),
    (1, "positive even number, got 1$"), (4097, "got 4097$"),
    (63.5, "must be an int, got 63.5$"), (64.0, "must be an int, got 64.0$"),
    (np.float32(64), "must be an int, got"), (True, "must be an int, got True$"),
    (np.bool_(True), "must be an int, got"), ("64", "must be an int, got '64'$"), (None, "must be an int, got None$"),
])
@pytest.mark.parametrize("quant_type", ["nf4", "int4_asym"])
def test_bad_blocksizes_are_refused(blocksize, match, quant_type):
    error = _raises(BlocksizeError, ValueError, match, qlora_np.quantize, np.ones(128, np.float32),
                    quant_type, blocksize)
    if "even" in match:
        assert "(32, 64, 128, 256, 512, 1024, 2048, 4096)" in str(error)


@pytest.mark.parametrize("blocksize", [2, 6, 64, np.int64(64), np.int32(10), 4096, 10**6])
def test_good_blocksizes_are_accepted(blocksize):
    assert qlora_np.quantize(np.ones(128, np.float32), "nf4", blocksize).blocksize == int(blocksize)


@pytest.mark.parametrize("strategy, expected", [("channel", 7), ("tensor", 35)])
def test_channel_and_tensor_strategies_ignore_the_blocksize_argument(strategy, expected):
    # documented: "blocksize is ignored for the latter two" (odd sizes are fine there)
    qt = qlora_np.quantize(np.ones((5, 7), np.float32), blocksize=33, strategy=strategy)
    assert qt.blocksize == expected


# ---------------------------------------------------------------------------
# Names and options
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(quant_type="nf5"), r"quant_type must be one of \['fp4', 'int4', 'int4_asym', 'nf4'\], got 'nf5'$"),
    (dict(quant_type="NF4"), r"quant_type must be one of .*got 'NF4'$"),
    (dict(quant_type=None), "quant_type must be one of .*got None$"),
    (dict(quant_type=4), "quant_type must be one of .*got 4$"),
    (dict(quant_type=["nf4"]), r"quant_type must be one of .*got \['nf4'\]$"),
    (dict(strategy="row"), r"strategy must be one of \('block', 'channel', 'tensor'\), got 'row'$"),
    (dict(strategy=None), "strategy must be one of .*got None$"),
    (dict(backend="torch"), "backend must be 'numba' or 'reference', got 'torch'$"),
    (dict(backend="NUMBA"), "backend must be 'numba' or 'reference', got 'NUMBA'$"),
    (dict(backend=None), "backend must be 'numba' or 'reference', got None$"),
    (dict(double_quant="yes"), "double_quant must be True or False, got 'yes'$"),
    (dict(double_quant=1), "double_quant must be True or False, got 1$"),
    (dict(double_quant=None), "double_quant must be True or False, got None$"),
])
def test_unknown_names_are_refused(kwargs, match):
    _raises(UnknownFormatError, ValueError, match, qlora_np.quantize, np.ones(128, np.float32), **kwargs)


def test_numpy_bool_double_quant_is_accepted():
    assert qlora_np.quantize(np.ones(128, np.float32), double_quant=np.bool_(True)).double_quant


# ---------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("thing, name", [(np.ones(4, np.float32), "ndarray"), (None, "NoneType"),
                                         ({"weight": np.zeros(2, np.uint8)}, "dict"), ("nf4", "str")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantize_of_a_non_quantized_tensor_is_refused(thing, name, backend):
    _raises(UnknownFormatError, ValueError, f"dequantize expects a QuantizedTensor, got {name}$",
            qlora_np.dequantize, thing, backend=backend)


@pytest.mark.parametrize("dtype, shown", [("int8", "'int8'"), ("float", "'float'"), ("float8", "'float8'"),
                                          ("Float32", "'Float32'"), (np.int32, "<class 'numpy.int32'>"),
                                          (np.dtype("complex64"), "dtype\\('complex64'\\)"), (int, "<class 'int'>"),
                                          (3, "3"), (object(), "<object object at")])
def test_dequantize_refuses_bad_dtypes_naming_them(dtype, shown):
    qt = qlora_np.quantize(np.ones(128, np.float32))
    _raises(DTypeError, TypeError, rf"dtype must be one of \['float32', 'float16', 'bfloat16', 'float64'\], got {shown}",
            qlora_np.dequantize, qt, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64", np.float16,
                                   ml_dtypes.bfloat16, np.dtype("float64"), np.float32])
def test_dequantize_accepts_every_float_dtype(dtype):
    qt = qlora_np.quantize(np.ones(128, np.float32))
    out = qlora_np.dequantize(qt, dtype=dtype)
    assert out.dtype == np.dtype(dtype) and np.all(out.astype(np.float32) == 1)


def test_dequantize_refuses_an_unknown_backend():
    qt = qlora_np.quantize(np.ones(128, np.float32))
    _raises(UnknownFormatError, ValueError, "backend must be 'numba' or 'reference', got 'cuda'$",
            qlora_np.dequantize, qt, backend="cuda")


# ---------------------------------------------------------------------------
# Products
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 3, 20])                   # fused (≤ 8 rows) and tiled paths
def test_products_check_shapes_and_types(backend, rows):
    qt = qlora_np.quantize(np.ones((8, 64), np.float32))
    _raises(ShapeError, ValueError, r"x must have last dimension 64 to multiply the weight of shape \(8, 64\), "
            rf"got shape \({rows}, 32\)$", qlora_np.matmul, np.ones((rows, 32), np.float32), qt, backend)
    _raises(ShapeError, ValueError, r"x must have last dimension 64 .*got shape \(64, 8\)$",
            qlora_np.matmul, np.ones((64, 8), np.float32), qt, backend)          # W's layout, transposed
    _raises(ShapeError, ValueError, r"x must have last dimension 64 .*got shape \(\)$",
            qlora_np.matmul, np.float32(1), qt, backend)
    _raises(ShapeError, ValueError, r"grad must have last dimension 8 .*got shape \(2, 3, 64\)$",
            qlora_np.matmul_t, np.ones((2, 3, 64), np.float32), qt, backend)
    _raises(DTypeError, TypeError, "got dtype int64", qlora_np.matmul, np.ones((rows, 64), np.int64), qt, backend)
    _raises(DTypeError, TypeError, "got dtype complex64", qlora_np.matmul_t,
            np.ones((rows, 8), np.complex64), qt, backend)
    # the right shapes work, with any leading dimensions
    assert qlora_np.matmul(np.ones((2, rows, 64), np.float32), qt, backend).shape == (2, rows, 8)
    assert qlora_np.matmul_t(np.ones((rows, 8), np.float16), qt, backend).shape == (rows, 64)


@pytest.mark.parametrize("product", [qlora_np.matmul, qlora_np.matmul_t])
def test_products_need_a_2d_quantized_weight(product):
    x = np.ones((1, 64), np.float32)
    _raises(UnknownFormatError, ValueError, "expected a QuantizedTensor weight, got ndarray", product,
            x, np.ones((8, 64), np.float32))
    for shape in [(64,), (2, 4, 64)]:
        weight = qlora_np.quantize(np.ones(shape, np.float32))
        _raises(ShapeError, ValueError, re.escape(f"a Linear weight must be 2-D (out, in), got shape {shape}"),
                product, x, weight)
