"""Numba kernels produce the same bytes as the plain-NumPy reference, and round trips are bounded.

The generated inputs aim at the places where two implementations of the same float32
algorithm can part ways: values that land exactly on a decision boundary (a codebook
midpoint for nf4/fp4/int4, a half-integer step for int4_asym) under one way of
scaling (multiply by the reciprocal, full blocks) or the other (divide, the partial
last block); exact zeros; tiny, subnormal, huge and mixed magnitudes; odd lengths,
odd row lengths and block sizes that do not divide the length.
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import qlora_np
from qlora_np.quant import reference
from qlora_np.quant.codebooks import FORMATS, NESTED_BLOCKSIZE, dynamic_map
from qlora_np.errors import InvalidValueError
from qlora_np.kernels import blockwise as cpu
from qlora_np.kernels.features import HAS_AVX2
from qlora_np.quant.backends import scales

F32 = np.float32
U = 2.0 ** -24                        # float32 unit roundoff
QUANT_TYPES = ["nf4", "fp4", "int4", "int4_asym"]
CODEBOOK_TYPES = ["nf4", "fp4", "int4"]
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64]
BNB_SIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
OTHER_EVEN_SIZES = [2, 6, 10, 100]
STRATEGIES = ["block", "channel", "tensor"]
KINDS = ["normal", "zeros", "constant", "tiny", "subnormal", "huge", "near_max", "mixed", "codebook",
         "boundaries"]
MAGNITUDE = {"normal": 1.0, "zeros": 1e-3, "constant": 3.0, "tiny": 1e-30, "subnormal": 1e-40,
             "huge": 1e30}


# ---------------------------------------------------------------------------
# Input generation
# ---------------------------------------------------------------------------

shapes = st.one_of(
    st.tuples(st.integers(1, 3000)),
    st.tuples(st.sampled_from([1, 2, 3, 63, 64, 65, 127, 2047, 2049, 2999])),
    st.tuples(st.integers(1, 40), st.integers(1, 75)),
    st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(1, 15)),
)

blocksizes = st.one_of(st.sampled_from(BNB_SIZES), st.sampled_from(OTHER_EVEN_SIZES),
                       st.integers(1, 150).map(lambda k: 2 * k))


def effective_blocksize(shape, blocksize, strategy):
    n = int(np.prod(shape))
    return {"block": blocksize, "channel": shape[-1], "tensor": n}[strategy]


def _neighbours(values, steps=2):
    """(m,) float32 → (m, 2·steps + 1) float32: each value and its ±1 … ±steps ulp neighbours."""
    columns = [values]
    up = down = values
    for _ in range(steps):
        up = np.nextafter(up, F32(np.inf)).astype(F32)
        down = np.nextafter(down, F32(-np.inf)).astype(F32)
        columns = [down] + columns + [up]
    return np.stack(columns, axis=1)


def _pick(rng, candidates, hit):
    """Per row, a random candidate among those flagged in ``hit`` (the middle one if none)."""
    weights = hit + 1e-9 * (np.arange(hit.shape[1]) == hit.shape[1] // 2)
    choice = (weights * rng.random(hit.shape) ** 0.5).argmax(axis=1)
    return candidates[np.arange(candidates.shape[0]), choice]


def _block_layout(n, blocksize):
    block_of = np.arange(n) // blocksize
    nblocks = int(block_of[-1]) + 1
    starts = np.arange(nblocks) * blocksize
    lengths = np.minimum(blocksize, n - starts)
    return block_of, nblocks, starts, lengths


def boundary_values(rng, n, blocksize, quant_type):
    """float32 (n,) where most values sit on (or 1-2 ulp around) a rounding boundary.

    Every block gets a random float32 scale and holds its extreme value(s); the other
    elements are chosen so that the scaled value computed *as the kernels compute it*
    (x · fl(1/absmax) in full blocks, x / absmax in the partial last block, x ·
    fl(1/step) for int4_asym) is exactly a midpoint / half-integer when possible.
    """
    block_of, nblocks, starts, lengths = _block_layout(n, blocksize)
    scale = (rng.uniform(0.5, 2.0, nblocks) * 10.0 ** rng.integers(-6, 7, nblocks)).astype(F32)
    if quant_type == "int4_asym":
        low_fraction = rng.choice([0.0, 0.3, 0.5, 1.0], nblocks).astype(F32)
        low = (-scale * low_fraction).astype(F32)                               # (nblocks,)
        high = scale
        step = ((high - low) / F32(15)).astype(F32)
        inverse = (F32(1) / step).astype(F32)
        el_low, el_inv, el_step = low[block_of], inverse[block_of], step[block_of]
        lo_index = np.ceil(low[block_of] * el_inv).astype(np.int64)
        targets = (lo_index + rng.integers(0, 15, n) + 0.5).astype(F32)        # k + 1/2
        candidates = _neighbours((targets * el_step).astype(F32))
        hit = (candidates * el_inv[:, None]).astype(F32) == targets[:, None]
        values = _pick(rng, candidates, hit)
        values = np.clip(values, el_low, high[block_of])
        extremes = [(low, 0), (high, 1)]
    else:
        fmt = FORMATS[quant_type]
        el_scale = scale[block_of]
        reciprocal = (F32(1) / el_scale).astype(F32)
        targets = rng.choice(fmt.midpoints[fmt.midpoints > -1], n).astype(F32)
        candidates = _neighbours((targets * el_scale).astype(F32))
        by_multiply = (candidates * reciprocal[:, None]).astype(F32) == targets[:, None]
        by_divide = (candidates / el_scale[:, None]).astype(F32) == targets[:, None]
        # prefer values on the midpoint under one scaling but not the other: they tell the
        # reciprocal-multiply (full blocks) and divide (last partial block) paths apart
        values = _pick(rng, candidates, (by_multiply | by_divide) + 4.0 * (by_multiply ^ by_divide))
        # a few exact codebook values and zeros among them
        reachable = fmt.codebook[np.abs(fmt.codebook) <= 1]
        exact = rng.random(n) < 0.15
        values[exact] = (rng.choice(reachable, exact.sum()) * el_scale[exact]).astype(F32)
        values[rng.random(n) < 0.05] = 0
        sign = np.where(rng.random(nblocks) < 0.5, F32(-1), F32(1))
        extremes = [((sign * scale).astype(F32), 0)]
    # put each block's extreme value(s) at a random place in it
    for extreme, which in extremes:
        room = np.maximum(lengths - which, 1)
        position = np.minimum(starts + which + (rng.random(nblocks) * room).astype(np.int64),
                              starts + lengths - 1)
        values[position] = extreme
    return values.astype(F32)


def make_values(rng, kind, n, blocksize, quant_type):
    """float64 or float32 values (n,) of the given kind."""
    if kind == "boundaries":
        return boundary_values(rng, n, blocksize, quant_type)
    if kind == "codebook":
        fmt = FORMATS["nf4" if quant_type == "int4_asym" else quant_type]
        absmax = F32(rng.uniform(0.1, 10))
        values = (rng.choice(fmt.codebook[np.abs(fmt.codebook) <= 1], n) * absmax).astype(F32)
        values[::5] = absmax
        return values
    if kind == "near_max":                            # up to FLT_MAX: 1/absmax is subnormal
        return rng.uniform(-1, 1, n) * np.finfo(F32).max
    if kind == "mixed":                               # 1e-30 … 1e30 side by side, some zeros
        values = rng.standard_normal(n) * 10.0 ** rng.integers(-30, 31, n)
        values[rng.random(n) < 0.1] = 0
        return values
    values = rng.standard_normal(n) * MAGNITUDE[kind]
    if kind == "zeros":
        values[rng.random(n) < rng.choice([0.5, 0.9, 1.0])] = 0
    elif kind == "constant":
        values[:] = rng.choice([-1, 1]) * MAGNITUDE[kind]
    return values


def cast(values, dtype):
    """Values in ``dtype``; what the dtype (or float32) cannot hold becomes 0."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(values).astype(dtype)
        out[~np.isfinite(out.astype(F32))] = 0
    return out


@st.composite
def quantize_cases(draw):
    """(array, quantize keyword arguments) covering every format, strategy, dtype and magnitude."""
    quant_type = draw(st.sampled_from(QUANT_TYPES))
    strategy = draw(st.sampled_from(STRATEGIES))
    shape = draw(shapes)
    blocksize = draw(blocksizes)
    kind = draw(st.sampled_from(KINDS))
    if kind == "boundaries":                          # f16/bf16 would round the boundary values
        dtype = draw(st.sampled_from([np.float32, np.float64]))
    else:
        dtype = draw(st.sampled_from(DTYPES))
    n = int(np.prod(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = make_values(rng, kind, n, effective_blocksize(shape, blocksize, strategy), quant_type)
    array = cast(values.reshape(shape), dtype)
    kwargs = dict(quant_type=quant_type, blocksize=blocksize, strategy=strategy,
                  double_quant=draw(st.booleans()))
    return array, kwargs


# ---------------------------------------------------------------------------
# Numba == reference, through the public functions
# ---------------------------------------------------------------------------

ARRAY_FIELDS = ["packed", "absmax", "zero_point", "nested_absmax", "offset", "nested_code", "codebook"]
META_FIELDS = ["shape", "dtype", "quant_type", "blocksize", "nested_blocksize", "strategy"]


def assert_same_tensor(ours, theirs):
    for name in ARRAY_FIELDS:
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), name
        if a is not None:
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert a.tobytes() == b.tobytes(), name
    for name in META_FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name


def quantize_or_error(array, **kwargs):
    """(QuantizedTensor, None), or (None, message) when quantize refuses the values."""
    with np.errstate(all="ignore"):
        try:
            return qlora_np.quantize(array, **kwargs), None
        except InvalidValueError as error:
            return None, str(error)


@given(case=quantize_cases())
@settings(max_examples=300)
def test_numba_quantize_and_dequantize_equal_reference_bytes(case):
    array, kwargs = case
    fast, fast_error = quantize_or_error(array, backend="numba", **kwargs)
    slow, slow_error = quantize_or_error(array, backend="reference", **kwargs)
    assert fast_error == slow_error
    if fast_error:                    # near FLT_MAX: an int4_asym range or a dq mean can overflow
        assert ((kwargs["quant_type"] == "int4_asym" and "scale overflows" in fast_error)
                or (kwargs["double_quant"] and "cannot double-quantize" in fast_error))
        return
    assert_same_tensor(fast, slow)
    assert fast.shape == array.shape and fast.dtype == qlora_np.dtypes.float_dtype_name(array.dtype)
    assert fast.blocksize == effective_blocksize(array.shape, kwargs["blocksize"], kwargs["strategy"])
    assert fast.double_quant == kwargs["double_quant"]
    assert (fast.zero_point is not None) == (kwargs["quant_type"] == "int4_asym")
    # decode in float32 first: rounding to f16 / bf16 could hide a 1-ulp difference
    with np.errstate(all="ignore"):
        decoded = {backend: qlora_np.dequantize(slow, dtype="float32", backend=backend)
                   for backend in ["numba", "reference"]}
        in_dtype = qlora_np.dequantize(fast, backend="numba")
        in_dtype_reference = qlora_np.dequantize(slow, backend="reference")
    assert decoded["numba"].dtype == np.float32 and decoded["numba"].shape == array.shape
    assert decoded["numba"].tobytes() == decoded["reference"].tobytes()
    assert in_dtype.dtype == array.dtype and in_dtype.shape == array.shape
    assert in_dtype.tobytes() == in_dtype_reference.tobytes()


@given(case=quantize_cases())
@settings(max_examples=40)
def test_float64_and_non_contiguous_inputs_quantize_as_their_float32_row_major_copy(case):
    array, kwargs = case
    assume(array.dtype == np.float64 or array.ndim >= 2)
    as_f32 = np.ascontiguousarray(array, dtype=F32)
    expected, error = quantize_or_error(as_f32, **kwargs)
    got, same_error = quantize_or_error(array, **kwargs)
    assert error == same_error
    assume(error is None)
    assert got.packed.tobytes() == expected.packed.tobytes()
    assert np.asarray(got.absmax).tobytes() == np.asarray(expected.absmax).tobytes()
    if array.ndim >= 2 and kwargs["strategy"] == "block":
        # a transposed (non-contiguous) view is flattened in its own row-major order
        view = array.swapaxes(0, -1)
        assert not view.flags.c_contiguous or 1 in array.shape
        expected, error = quantize_or_error(np.ascontiguousarray(view), **kwargs)
        got, same_error = quantize_or_error(view, **kwargs)
        assert error == same_error
        if error is None:
            assert got.packed.tobytes() == expected.packed.tobytes()


# ---------------------------------------------------------------------------
# Numba == reference, function by function
# ---------------------------------------------------------------------------

@given(n=st.integers(1, 3000), blocksize=st.one_of(st.integers(1, 70), st.sampled_from(BNB_SIZES)),
       quant_type=st.sampled_from(QUANT_TYPES), kind=st.sampled_from(KINDS),
       seed=st.integers(0, 2**32 - 1), simd=st.booleans())
@settings(max_examples=200)
def test_quantize_4bit_equals_reference_for_any_blocksize(n, blocksize, quant_type, kind, seed, simd):
    # the public API only reaches odd block sizes through strategy="channel"/"tensor";
    # the kernels take any block size directly. simd=False: the portable loop even
    # where the AVX2 search would run (block sizes of a multiple of 16)
    rng = np.random.default_rng(seed)
    flat = cast(make_values(rng, kind, n, blocksize, quant_type), F32)
    with np.errstate(all="ignore"):
        fast = cpu.quantize_4bit(flat, blocksize, quant_type, simd=simd)
        slow = reference.quantize_4bit(flat, blocksize, quant_type)
    nblocks = -(-n // blocksize)
    assert fast[0].shape == ((n + 1) // 2,) and fast[1].shape == (nblocks,)
    for a, b in zip(fast, slow):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@st.composite
def decode_cases(draw):
    total = draw(st.integers(1, 3000))
    blocksize = draw(st.one_of(st.sampled_from([2, 6, 32, 64, 100, 256]), st.integers(1, 80)))
    quant_type = draw(st.sampled_from(QUANT_TYPES))
    # starts on a block boundary take the per-block fast path, others the per-element one
    if draw(st.booleans()):
        start = blocksize * draw(st.integers(0, (total - 1) // blocksize))
    else:
        start = draw(st.integers(0, total - 1))
    n = draw(st.integers(1, total - start))
    seed = draw(st.integers(0, 2**32 - 1))
    return total, blocksize, quant_type, start, n, seed


@given(case=decode_cases())
@settings(max_examples=150)
def test_dequantize_4bit_from_any_start_equals_reference(case):
    total, blocksize, quant_type, start, n, seed = case
    rng = np.random.default_rng(seed)
    values = cast(make_values(rng, "mixed" if seed % 3 == 0 else "normal", total, blocksize,
                              quant_type), F32)
    packed, absmax, zero_point = reference.quantize_4bit(values, blocksize, quant_type)
    codebook = FORMATS[quant_type].codebook
    args = (packed, absmax, zero_point, n, blocksize, codebook)
    fast = cpu.dequantize_4bit(*args, start=start)
    slow = reference.dequantize_4bit(*args, start=start)
    assert fast.dtype == slow.dtype == np.float32 and fast.shape == (n,)
    assert fast.tobytes() == slow.tobytes()
    assert cpu.dequantize_4bit(*args, start=start, parallel=False).tobytes() == slow.tobytes()
    for parallel in (True, False):             # without the AVX-512 decode (used where present)
        assert cpu.dequantize_4bit(*args, start=start, parallel=parallel, simd=False).tobytes() == slow.tobytes()
    # a window is exactly that slice of the whole decode
    whole = reference.dequantize_4bit(packed, absmax, zero_point, total, blocksize, codebook)
    assert fast.tobytes() == whole[start:start + n].tobytes()


scale_arrays = st.builds(
    lambda n, seed, magnitude, kind: _scale_array(n, seed, magnitude, kind),
    st.integers(1, 3000), st.integers(0, 2**32 - 1),
    st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30]),
    st.sampled_from(["uniform", "constant", "mixed", "two_values", "with_zeros"]))


def _scale_array(n, seed, magnitude, kind):
    rng = np.random.default_rng(seed)
    if kind == "constant":
        return np.full(n, magnitude, F32)
    if kind == "two_values":                   # centred values are ±d: lands exactly on ±1
        return rng.choice(np.array([magnitude, 2 * magnitude], F32), n)
    values = rng.random(n) * magnitude
    if kind == "mixed":
        values *= 10.0 ** rng.integers(-5, 6, n)
    if kind == "with_zeros":
        values[rng.random(n) < 0.3] = 0
    return values.astype(F32)


@given(absmax=scale_arrays)
@settings(max_examples=150)
def test_double_quantize_equals_reference(absmax):
    fast, slow = cpu.double_quantize(absmax), reference.double_quantize(absmax)
    nchunks = -(-absmax.size // NESTED_BLOCKSIZE)
    assert fast[0].dtype == np.uint8 and fast[0].shape == absmax.shape
    assert fast[1].dtype == np.float32 and fast[1].shape == (nchunks,)
    assert np.asarray(fast[2]).dtype == np.float32
    for a, b in zip(fast, slow):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert np.float32(fast[2]).tobytes() == np.float32(reference.torch_mean_float32(absmax)).tobytes()


@given(nblocks=st.integers(1, 3000), chunk=st.sampled_from([1, 7, 64, 256, 1000]),
       seed=st.integers(0, 2**32 - 1), offset=st.floats(-1e6, 1e6))
def test_dequantize_absmax_equals_reference(nblocks, chunk, seed, offset):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, nblocks).astype(np.uint8)
    nested_absmax = (rng.random(-(-nblocks // chunk)) * 10.0 ** rng.integers(-8, 8)).astype(F32)
    code = dynamic_map()
    fast = cpu.dequantize_absmax(codes, nested_absmax, F32(offset), code, chunk)
    slow = reference.dequantize_absmax(codes, nested_absmax, F32(offset), code, chunk)
    assert fast.dtype == np.float32 and fast.shape == (nblocks,)
    assert fast.tobytes() == slow.tobytes()


@given(n=st.one_of(st.integers(1, 40), st.integers(1, 200_000)), seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(["positive", "signed", "mixed"]))
@settings(max_examples=80)
def test_torch_mean_equals_reference(n, seed, kind):
    rng = np.random.default_rng(seed)
    values = rng.random(n) * 3 if kind == "positive" else rng.standard_normal(n)
    if kind == "mixed":
        values *= 10.0 ** rng.integers(-6, 7, n)
    values = values.astype(F32)
    fast, slow = cpu.torch_mean_float32(values), reference.torch_mean_float32(values)
    assert np.asarray(fast).dtype == np.asarray(slow).dtype == np.float32
    assert np.float32(fast).tobytes() == np.float32(slow).tobytes()
    # it is a mean: close to the float64 one
    assert abs(float(fast) - values.astype(np.float64).mean()) <= 1e-5 * np.abs(values).mean() + 1e-30


def test_torch_mean_equals_reference_across_the_level_carries():
    # 4096 groups of 4 × 8 lanes fill level 2 of the cascade once; +27 adds leftover
    # rows (< 4 vectors) and a scalar tail (< 8 values)
    values = np.random.default_rng(7).random(4096 * 32 + 27, dtype=F32) * 5
    assert cpu.torch_mean_float32(values).tobytes() == reference.torch_mean_float32(values).tobytes()


# ---------------------------------------------------------------------------
# Round-trip error bounds
# ---------------------------------------------------------------------------

def max_half_gap(codebook):
    return float(np.max(np.diff(np.sort(codebook.astype(np.float64)))) / 2)


def codebook_error_bound(absmax):
    """Error allowance, beyond absmax · half_gap, for one block (float64, per element).

    scaled = fl(x · fl(1/a)) is within 2u of x/a (plus an absolute 2^-150 · |x| when 1/a
    is subnormal, i.e. a > 2^126); decoding fl(c · a) adds u·a. Together ≤ a · (3u +
    2^-150 · a); 8u leaves room.
    """
    absmax = absmax.astype(np.float64)
    return absmax * (8 * U + 2.0 ** -150 * absmax)


@st.composite
def round_trip_cases(draw, quant_types, dtypes=(np.float32,), subnormal=False):
    quant_type = draw(st.sampled_from(quant_types))
    n = draw(st.integers(1, 4000))
    blocksize = draw(st.one_of(st.sampled_from(BNB_SIZES + OTHER_EVEN_SIZES),
                               st.integers(1, 150).map(lambda k: 2 * k)))
    kind = draw(st.sampled_from(["normal", "zeros", "tiny", "huge", "mixed", "codebook",
                                 "boundaries", "near_max"] + ["subnormal", "near_normal_min"] * subnormal))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "near_max":                            # scales close to FLT_MAX: 1/absmax is subnormal
        values = rng.uniform(-3.4e38, 3.4e38, n)
    elif kind == "near_normal_min":                   # ranges around 1e-38: subnormal int4_asym steps
        values = rng.standard_normal(n) * 10.0 ** rng.integers(-45, -36, n)
    else:
        values = make_values(rng, kind, n, blocksize, quant_type)
    dtype = draw(st.sampled_from(list(dtypes)))
    return cast(values, dtype), quant_type, blocksize


def _block_absmax(x, blocksize):
    n = x.size
    nblocks = -(-n // blocksize)
    padded = np.zeros(nblocks * blocksize, np.float64)
    padded[:n] = np.abs(x)
    return padded.reshape(nblocks, blocksize).max(axis=1)


@given(case=round_trip_cases(CODEBOOK_TYPES, DTYPES), double_quant=st.booleans())
@settings(max_examples=150)
def test_codebook_round_trip_error_is_at_most_half_the_widest_gap_per_block(case, double_quant):
    x, quant_type, blocksize = case
    x32 = x.astype(F32).astype(np.float64)            # what is quantized: the float32 values
    block_absmax = _block_absmax(x32, blocksize)
    if double_quant:                                  # keep the scales' sum finite (see test_errors)
        assume(block_absmax.sum() < 3e38)
    # a block whose absmax is below the floor 1e-38 is scaled by the floor (bnb's rule)
    assume(np.all((block_absmax >= 1e-38) | (block_absmax == 0)))
    qt = qlora_np.quantize(x, quant_type, blocksize, double_quant)
    plain_absmax = qlora_np.quantize(x, quant_type, blocksize).absmax.astype(np.float64)
    assert np.array_equal(plain_absmax[block_absmax > 0], block_absmax[block_absmax > 0])
    decoded = qlora_np.dequantize(qt, dtype="float32").reshape(-1).astype(np.float64)
    block_of = np.arange(x.size) // blocksize
    half_gap = max_half_gap(qt.codebook)
    a = plain_absmax[block_of]
    bound = a * half_gap + codebook_error_bound(a)
    if double_quant:
        # codes are chosen with the exact scale a, decoded with the 8-bit approximation a':
        # |x - c·a'| ≤ |x - c·a| + |c|·|a - a'| + u·|a'|, and |c| ≤ 1 for every reachable code
        decoded_scales = scales(qt).astype(np.float64)[block_of]
        bound = bound + np.abs(decoded_scales - a) + U * np.abs(decoded_scales)
    error = np.abs(decoded - x32)
    assert np.all(error <= bound), (np.max(error / np.maximum(a, 1e-300)), half_gap)
    # and the bound is not vacuous: blocks are decoded to within their own scale
    if not double_quant:
        assert np.all(error <= a * (half_gap + 1e-6) + 1e-300)


@given(case=round_trip_cases(["int4_asym"], subnormal=True))
@settings(max_examples=150)
def test_int4_asym_round_trip_error_is_at_most_half_a_step(case):
    # zero point z = rint(-low/s), code = clip(rint(x/s) + z, 0, 15). Without the clip the
    # error is |x - rint(x/s)·s| ≤ s/2. The clip only bites when rint(high/s) + rint(-low/s)
    # = 16 (high/s - low/s = 15), and then the error is |rint(-low/s) - (-low/s)|·s ≤ s/2 too.
    # Float32: a few u of s on top; a subnormal step s is stored to ±2^-150 absolute, which
    # moves (high - low)/s off 15 by ≤ 15·2^-150/s and the decode rounds to ±2^-150:
    # ≤ 17·2^-150 absolute in all (so even a step that rounds to 0 stays within it).
    x, _, blocksize = case
    x = x.astype(np.float64)
    block_of = np.arange(x.size) // blocksize
    nblocks = block_of[-1] + 1
    padded = np.zeros(nblocks * blocksize)
    padded[:x.size] = x
    blocks = padded.reshape(nblocks, blocksize)
    span = np.maximum(blocks.max(axis=1), 0) - np.minimum(blocks.min(axis=1), 0)
    assume(np.all(span <= 3.4e38))
    qt = qlora_np.quantize(x.astype(F32), "int4_asym", blocksize)
    step = qt.absmax.astype(np.float64)
    assert np.allclose(step, span / 15, rtol=1e-6, atol=2.0 ** -149)
    error = np.abs(qlora_np.dequantize(qt).astype(np.float64) - x)
    s = step[block_of]
    bound = s * (0.5 + 6e-6) + 17 * 2.0 ** -150
    assert np.all(error <= bound), np.max(error / bound)
    assert np.all(error[span[block_of] == 0] == 0)


@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("value", [2e-38, -2e-38, 4e-38, 1e-39, 1e-44])
def test_int4_asym_tiny_ranges_round_trip_within_half_a_step(backend, value):
    # a block range below ~4.4e-38 has a subnormal step with no float32 reciprocal
    x = np.array([0.0, value, value / 3, value * 0.6] * 16, F32)
    qt = qlora_np.quantize(x, "int4_asym", 64, backend=backend)
    error = np.abs(qlora_np.dequantize(qt, backend=backend).astype(np.float64) - x.astype(np.float64))
    assert np.all(error <= float(qt.absmax[0]) * 0.5000031 + 17 * 2.0 ** -150)
    assert qt.zero_point[0] == (15 if value < 0 else 0)


def _dynamic_map_half_gap():
    code = np.sort(dynamic_map().astype(np.float64))
    # largest half gap inside the map, and the distance from ±1 to the ends of the map
    return max(np.max(np.diff(code)) / 2, 1 + code[0], 1 - code[-1])


@given(absmax=scale_arrays)
@settings(max_examples=150)
def test_double_quant_scale_error_is_bounded_by_the_8bit_map(absmax):
    # centred d = a - offset, chunk max M; scaled s = d/M ∈ [-1, 1] is rounded to a grid
    # point of spacing 2/65535 (error ≤ 1/65535), whose nearest map entry is within the
    # map's largest half gap H. Then a' = fl(fl(map·M) + offset).
    # So |a' - a| ≤ M·(H + 1/65535) + float32 rounding (≤ a few u of |a|, |offset|, M).
    codes, nested_absmax, offset = cpu.double_quantize(absmax)
    decoded = cpu.dequantize_absmax(codes, nested_absmax, offset, dynamic_map(), NESTED_BLOCKSIZE)
    chunk_max = np.repeat(nested_absmax.astype(np.float64), NESTED_BLOCKSIZE)[:absmax.size]
    a = absmax.astype(np.float64)
    offset = float(offset)
    centred = (absmax - np.float32(offset)).astype(np.float64)
    assert np.array_equal(chunk_max, np.repeat(
        [np.abs(centred[i:i + NESTED_BLOCKSIZE]).max() for i in range(0, a.size, NESTED_BLOCKSIZE)],
        NESTED_BLOCKSIZE)[:a.size])
    bound = chunk_max * (_dynamic_map_half_gap() + 1.0 / 65535 + 8 * U) + 4 * U * (np.abs(a) + abs(offset))
    error = np.abs(decoded.astype(np.float64) - a)
    assert np.all(error <= bound), np.max(error / np.maximum(chunk_max, 1e-300))
    # the offset is the mean (torch's summation order: close to the exact mean)
    assert abs(offset - a.mean()) <= 1e-5 * np.abs(a).mean()


@pytest.mark.skipif(not HAS_AVX2, reason="no AVX2")
@pytest.mark.parametrize("quant_type", CODEBOOK_TYPES)
@pytest.mark.parametrize("blocksize", [16, 64, 4096])
@pytest.mark.parametrize("kind", ["boundaries", "codebook", "mixed", "subnormal"])
def test_avx2_search_and_portable_loop_code_identically(quant_type, blocksize, kind):
    # the binary search (4 compares) must find the same rank as counting 15 compares,
    # ties on a midpoint included; FP4 also maps ranks through its sort order
    rng = np.random.default_rng(blocksize)
    flat = cast(make_values(rng, kind, 40 * blocksize + 10, blocksize, quant_type), F32)
    assert cpu._rank_search_applies(flat, blocksize, simd=True)
    with np.errstate(all="ignore"):
        avx2 = cpu.quantize_4bit(flat, blocksize, quant_type, simd=True)
        portable = cpu.quantize_4bit(flat, blocksize, quant_type, simd=False)
    assert avx2[0].tobytes() == portable[0].tobytes()
    assert avx2[1].tobytes() == portable[1].tobytes()


@pytest.mark.parametrize("quant_type", CODEBOOK_TYPES)
@pytest.mark.parametrize("backend", ["numba", "reference"])
@given(absmax=st.floats(1e-30, 1e30), n=st.integers(1, 700),
       blocksize=st.sampled_from([2, 6, 64, 100, 256]), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=30)
def test_codebook_values_times_absmax_decode_exactly(quant_type, backend, absmax, n, blocksize, seed):
    codebook = FORMATS[quant_type].codebook
    reachable = codebook[np.abs(codebook) <= 1]          # int4's -8/7 lies outside [-1, 1]
    absmax = F32(absmax)
    rng = np.random.default_rng(seed)
    x = (rng.choice(reachable, n) * absmax).astype(F32)
    x[::blocksize] = absmax                             # every block (the tail too) has absmax `absmax`
    qt = qlora_np.quantize(x, quant_type, blocksize, backend=backend)
    assert np.all(qt.absmax == absmax)
    assert qlora_np.dequantize(qt, backend=backend).tobytes() == x.tobytes()


@pytest.mark.parametrize("quant_type", CODEBOOK_TYPES)
@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("n", [64, 70])                 # full block only / full block + tail
def test_values_exactly_on_a_midpoint_take_the_lower_entry(quant_type, backend, n):
    # absmax a power of two: the reciprocal and both scalings are exact, so the scaled
    # value is the midpoint itself; ties go to the lower codebook entry (bitsandbytes' `>`)
    fmt = FORMATS[quant_type]
    ordered = np.sort(fmt.codebook)
    absmax = F32(2.0 ** -3)
    ranks = np.arange(n) % 15
    usable = fmt.midpoints[ranks] > -1
    x = np.where(usable, fmt.midpoints[ranks] * absmax, 0).astype(F32)
    x[0] = x[64 % n] = absmax
    usable[[0, 64 % n]] = False
    qt = qlora_np.quantize(x, quant_type, 64, backend=backend)
    decoded = qlora_np.dequantize(qt, backend=backend)
    np.testing.assert_array_equal(decoded[usable], (ordered[ranks[usable]] * absmax).astype(F32))


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_subnormal_blocks_are_scaled_by_the_floor_in_both_backends(backend):
    # bitsandbytes floors the scale of the partial last block (and the divisor of every
    # block) at 1e-38: a block of subnormals is scaled by the floor, not by its absmax
    x = np.array([1e-40, -5e-41] * 40, F32)               # 64-element block + 16-element tail
    qt = qlora_np.quantize(x, "nf4", 64, backend=backend)
    assert qt.absmax[0] == F32(1e-40) and qt.absmax[1] == F32(1e-38)
    decoded = qlora_np.dequantize(qt, backend=backend)
    # 1e-40 · 1e38 = 0.01 → nf4's 0 → decodes to 0 (an error of the whole absmax, by design)
    assert np.all(decoded == 0)
