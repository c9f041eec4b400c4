"""Numba kernels produce the same bytes as the plain-NumPy reference, and round trips are bounded."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

import qlora_np
from qlora_np import reference
from qlora_np.codebooks import FORMATS
from qlora_np.kernels import cpu
from qlora_np.ops import scales

QUANT_TYPES = ["nf4", "fp4", "int4", "int4_asym"]
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64]
BLOCKSIZES = [2, 6, 10, 32, 64, 100, 128, 256, 512, 1024, 2048, 4096]


@st.composite
def float_arrays(draw):
    """Arrays of many shapes and magnitudes, with exact zeros and values on code midpoints."""
    shape = draw(st.one_of(st.tuples(st.integers(1, 3000)),
                           st.tuples(st.integers(1, 40), st.integers(1, 70)),
                           st.tuples(st.integers(1, 5), st.integers(1, 9), st.integers(1, 13))))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    magnitude = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]))
    values = rng.standard_normal(shape) * magnitude
    kind = draw(st.sampled_from(["normal", "zeros", "midpoints", "mixed"]))
    flat = values.reshape(-1)
    if kind == "zeros":
        flat[rng.random(flat.size) < 0.5] = 0
    elif kind == "midpoints":                  # scaled value exactly on a midpoint of a format
        midpoints = FORMATS[draw(st.sampled_from(["nf4", "fp4", "int4"]))].midpoints
        flat[:] = rng.choice(midpoints, flat.size) * np.float32(magnitude)
        flat[::7] = magnitude                  # gives most blocks absmax == magnitude
    elif kind == "mixed":
        flat *= 10.0 ** rng.integers(-8, 8, flat.size)
    dtype = draw(st.sampled_from(DTYPES))
    with np.errstate(over="ignore"):
        cast = values.astype(dtype)
    cast[~np.isfinite(cast.astype(np.float32))] = 0     # past the dtype's (or float32's) range
    return cast


def _fields(qt):
    return [qt.packed, qt.absmax, qt.zero_point, qt.nested_absmax, qt.offset]


def _assert_same_bytes(ours, theirs):
    for a, b in zip(_fields(ours), _fields(theirs)):
        assert (a is None) == (b is None)
        if a is not None:
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@given(array=float_arrays(), quant_type=st.sampled_from(QUANT_TYPES), double_quant=st.booleans(),
       blocksize=st.sampled_from(BLOCKSIZES), strategy=st.sampled_from(["block", "channel", "tensor"]))
def test_numba_equals_reference_bytes(array, quant_type, double_quant, blocksize, strategy):
    kwargs = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                  strategy=strategy)
    fast = qlora_np.quantize(array, backend="numba", **kwargs)
    slow = qlora_np.quantize(array, backend="reference", **kwargs)
    _assert_same_bytes(fast, slow)
    decoded_fast = qlora_np.dequantize(fast, backend="numba")
    decoded_slow = qlora_np.dequantize(slow, backend="reference")
    assert decoded_fast.dtype == array.dtype and decoded_fast.shape == array.shape
    assert decoded_fast.tobytes() == decoded_slow.tobytes()


@given(n=st.integers(1, 2000), blocksize=st.sampled_from([2, 6, 64, 100, 256]),
       start=st.integers(0, 500), quant_type=st.sampled_from(QUANT_TYPES), seed=st.integers(0, 99))
def test_dequantize_from_any_start_equals_reference(n, blocksize, start, quant_type, seed):
    values = np.random.default_rng(seed).standard_normal(n + start).astype(np.float32)
    packed, absmax, zero_point = reference.quantize_4bit(values, blocksize, quant_type)
    codebook = FORMATS[quant_type].codebook
    args = (packed, absmax, zero_point, n, blocksize, codebook)
    assert (cpu.dequantize_4bit(*args, start=start).tobytes()
            == reference.dequantize_4bit(*args, start=start).tobytes())


@given(nblocks=st.integers(1, 3000), seed=st.integers(0, 999), magnitude=st.sampled_from([1e-6, 1.0, 1e6]))
def test_double_quant_and_torch_mean_equal_reference(nblocks, seed, magnitude):
    absmax = (np.random.default_rng(seed).random(nblocks) * magnitude).astype(np.float32)
    assert np.float32(cpu.torch_mean_float32(absmax)) == reference.torch_mean_float32(absmax)
    fast, slow = cpu.double_quantize(absmax), reference.double_quantize(absmax)
    for a, b in zip(fast, slow):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    codes, nested_absmax, offset = slow
    code = qlora_np.dynamic_map()
    assert (cpu.dequantize_absmax(codes, nested_absmax, offset, code, 256).tobytes()
            == reference.dequantize_absmax(codes, nested_absmax, offset, code, 256).tobytes())


def _max_half_gap(codebook):
    ordered = np.sort(codebook)
    return float(np.max(np.diff(ordered)) / 2)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@given(n=st.integers(1, 5000), blocksize=st.sampled_from([32, 64, 100, 4096]), seed=st.integers(0, 999))
def test_round_trip_error_is_at_most_half_a_code_gap(quant_type, n, blocksize, seed):
    values = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    qt = qlora_np.quantize(values, quant_type, blocksize)
    error = np.abs(qlora_np.dequantize(qt) - values)
    block_of = np.arange(n) // blocksize
    # nearest code: |x/s − c| ≤ half the widest gap; scaling adds a few float32 roundings.
    # FP4's codebook has no ±1 entry beyond 1 (its max is 1), so the bound holds there too.
    bound = qt.absmax[block_of] * (_max_half_gap(qt.codebook) + 4e-7)
    assert np.all(error <= bound)


@given(n=st.integers(1, 5000), blocksize=st.sampled_from([32, 64, 100]), seed=st.integers(0, 999))
def test_int4_asym_round_trip_error_is_at_most_half_a_step(n, blocksize, seed):
    values = (np.random.default_rng(seed).standard_normal(n) + 0.7).astype(np.float32)
    qt = qlora_np.quantize(values, "int4_asym", blocksize)
    error = np.abs(qlora_np.dequantize(qt) - values)
    step = qt.absmax[np.arange(n) // blocksize]
    # the zero point is rounded, shifting the grid by up to half a step: ≤ one step in all,
    # and the grid covers [min, max] so nothing is clipped by more than that.
    assert np.all(error <= step * (1 + 1e-5))
    assert np.median(error / step) < 0.5


@given(n=st.integers(1, 5000), seed=st.integers(0, 999))
def test_double_quant_adds_a_bounded_scale_error(n, seed):
    values = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    plain = qlora_np.quantize(values, "nf4", 64)
    nested = qlora_np.quantize(values, "nf4", 64, double_quant=True)
    assert nested.packed.tobytes() == plain.packed.tobytes()       # codes do not depend on it
    decoded_scales = scales(nested)
    # 8-bit dynamic map: near ±1 its steps are ≤ 1/64 (levels 2^6 over (0.1, 1]) → error ≤ chunk max / 128
    chunk_max = np.repeat(nested.nested_absmax, 256)[:plain.nblocks]
    assert np.all(np.abs(decoded_scales - plain.absmax) <= chunk_max / 100 + 1e-7)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_codebook_values_times_absmax_decode_exactly(quant_type):
    codebook = FORMATS[quant_type].codebook
    reachable = codebook[np.abs(codebook) <= 1]          # int4's -8/7 lies outside [-1, 1]
    rng = np.random.default_rng(0)
    absmax = np.float32(0.75)
    block = (rng.choice(reachable, 64) * absmax).astype(np.float32)
    block[0] = absmax
    qt = qlora_np.quantize(block, quant_type, 64)
    assert qt.absmax[0] == absmax
    np.testing.assert_array_equal(qlora_np.dequantize(qt), block)
