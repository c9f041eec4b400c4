"""numba.cuda kernels: the functions of :mod:`qlora_np.kernels.blockwise` again, same bytes out, on a GPU.

Each public function is a thin Python wrapper (allocate device arrays, pick the launch shape)
over one ``@cuda.jit`` kernel; arrays in and out are device arrays (:func:`to_device`,
:func:`to_host`). Element-wise kernels loop grid-stride over their items; the reductions
(absmax, double-quant chunk maxima) give each quantization block one CUDA block of
REDUCE_THREADS threads. Matching the CPU bytes takes three habits here:

* every constant is a float32 (a Python float would make Numba compute in float64);
* no ``fastmath``: divisions are IEEE-rounded and subnormals kept (the 1e-38 floor is one);
* a multiply whose result is then added goes through ``multiply_rn``: the CUDA compiler
  otherwise fuses the two into one FMA, which rounds once where the CPU rounds twice.

Under the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, how the tests run without a GPU)
kernels run as Python on NumPy float32 scalars, which never fuse, and libdevice is absent,
so ``multiply_rn`` and ``round_half_even`` are NumPy's functions there.
"""

import warnings
from functools import lru_cache

import numpy as np
from numba import cuda
from numba.core import config
from numba.cuda import libdevice

from qlora_np.quant.codebooks import NESTED_BLOCKSIZE, get_format, nested_code_lut
from qlora_np.dtypes import float_dtype_name
from qlora_np.errors import DeviceError, DTypeError, ShapeError
from qlora_np.kernels.cuda.device import is_device_array

if config.ENABLE_CUDASIM:
    multiply_rn, round_half_even = np.multiply, np.rint
else:
    multiply_rn, round_half_even = libdevice.fmul_rn, libdevice.rintf

THREADS = 128
"""Threads per CUDA block of the element-wise kernels."""

MAX_BLOCKS = 8192
"""Most CUDA blocks an element-wise launch uses; its threads then loop over the rest."""

REDUCE_THREADS = 32
"""Threads that reduce one quantization block (or double-quant chunk) together."""

TILE = 16
"""Edge of the output tile one CUDA block of the tiled products computes (TILE × TILE threads)."""
TILE_PADDED = TILE + 1     # shared tiles of W get one spare column against bank conflicts

FUSED_MAX_ROWS = 8
"""Up to this many rows, the products decode W in registers (:func:`gemv`, :func:`gemv_t`)."""

WARP = 32
WARPS_PER_BLOCK = 4  # output features one CUDA block of :func:`gemv` computes, a warp each
LANES = 8            # torch's float32 vector width, which the double-quant mean follows

TINY_SCALE = np.float32(1e-38)
TINY_SCALE_BITS = np.int32(TINY_SCALE.view(np.int32))
ABS_MASK = np.int32(0x7FFFFFFF)
INF_BITS = np.int32(np.float32(np.inf).view(np.int32))
INF = np.float32(np.inf)
NAN = np.float32(np.nan)
ZERO = np.float32(0)
HALF = np.float32(0.5)
ONE = np.float32(1)
FIFTEEN = np.float32(15)
GRID_STEPS = np.float32(65535)


# ---------------------------------------------------------------------------
# The device and its arrays
# ---------------------------------------------------------------------------

def require_gpu():
    """Raise DeviceError unless numba.cuda sees a GPU with a working driver (or is simulating one)."""
    if not cuda.is_available():
        reason = " ".join(str(cuda.cuda_error()).split())
        raise DeviceError("device 'cuda' was requested but no usable CUDA GPU was found "
                          f"({reason}); use device='cpu', or set NUMBA_ENABLE_CUDASIM=1 to simulate one")


def to_device(array):
    """A device copy of a NumPy array; device arrays are returned as they are."""
    if is_device_array(array):
        return array
    return cuda.to_device(np.ascontiguousarray(array))


def to_host(array):
    """A NumPy copy of a device array (anything with the CUDA array interface); NumPy arrays as they are."""
    if not is_device_array(array):
        return array
    if not hasattr(array, "copy_to_host"):
        array = cuda.as_cuda_array(array)
    return array.copy_to_host()


def as_rows(array, axis_size, name):
    """(..., k) float array → ((rows, k) float32 device array, leading shape), checking k.

    Host arrays of any float dtype are cast on the host and copied over; device arrays
    must be float32 and C-contiguous (nothing is cast on the GPU).
    """
    if is_device_array(array):
        if array.dtype != np.float32:
            raise DTypeError(f"{name} on the GPU must be float32, got {array.dtype}")
    else:
        array = np.asarray(array)
        float_dtype_name(array.dtype)
    shape = tuple(array.shape)
    if len(shape) == 0 or shape[-1] != axis_size:
        raise ShapeError(f"{name} must have last dimension {axis_size}, got shape {shape}")
    lead = shape[:-1]
    if is_device_array(array):
        return array.reshape(-1, axis_size), lead
    return to_device(np.asarray(array, np.float32).reshape(-1, axis_size)), lead


def _grid(count):
    """CUDA blocks of THREADS for a grid-stride loop over ``count`` items."""
    return max(1, min(-(-count // THREADS), MAX_BLOCKS))


@lru_cache(maxsize=None)
def _format_tables(quant_type):
    """The format's midpoints (15,) float32 and sort order (16,) uint8, on the device once."""
    fmt = get_format(quant_type)
    return cuda.to_device(fmt.midpoints), cuda.to_device(fmt.sort_order)


@lru_cache(maxsize=None)
def _nested_code_lut():
    """The double-quant lookup table (65536,) uint8 on the device."""
    return cuda.to_device(nested_code_lut())


@lru_cache(maxsize=None)
def _no_zero_point():
    """A one-byte stand-in passed where a format has no zero points (the kernels do not read it)."""
    return cuda.to_device(np.zeros(1, np.uint8))


# ---------------------------------------------------------------------------
# 4-bit quantization
# ---------------------------------------------------------------------------

def quantize_4bit(flat, blocksize, quant_type):
    """Same contract as :func:`qlora_np.quant.reference.quantize_4bit`, on device arrays.

    ``flat`` (n,) float32 → packed (ceil(n/2),) uint8, absmax (nblocks,) float32,
    zero_point (nblocks,) uint8 for int4_asym else None.
    """
    fmt = get_format(quant_type)
    n = flat.size
    nblocks = -(-n // blocksize)
    packed = cuda.device_array((n + 1) // 2, np.uint8)
    absmax = cuda.device_array(nblocks, np.float32)
    if fmt.asymmetric:
        zero_point = cuda.device_array(nblocks, np.uint8)
        _asymmetric_scale_kernel[nblocks, REDUCE_THREADS](flat, flat.view(np.int32), blocksize, absmax,
                                                          zero_point)
        _asymmetric_codes_kernel[_grid(packed.size), THREADS](flat, absmax, zero_point, blocksize, packed)
        return packed, absmax, zero_point
    _absmax_kernel[nblocks, REDUCE_THREADS](flat.view(np.int32), blocksize, absmax.view(np.int32))
    midpoints, sort_order = _format_tables(fmt.name)
    full_stop = n // blocksize * blocksize                 # elements before the partial last block
    _codebook_codes_kernel[_grid(packed.size), THREADS](flat, absmax, blocksize, full_stop, midpoints,
                                                        sort_order, fmt.zero_code, packed)
    return packed, absmax, None


@cuda.jit
def _absmax_kernel(bits, blocksize, absmax_bits):
    """absmax_bits[b] = bit pattern of max |x| over quantization block b, one CUDA block each.

    Clearing the sign bit and comparing bit patterns as integers orders floats by magnitude
    and puts inf and NaN above all of them, so a block holding one gets a non-finite absmax,
    which the caller rejects. The partial last block's absmax is floored at 1e-38.
    """
    block = cuda.blockIdx.x
    lane = cuda.threadIdx.x
    start = block * blocksize
    stop = min(start + blocksize, bits.size)
    largest = np.int32(0)
    for i in range(start + lane, stop, REDUCE_THREADS):
        largest = max(largest, bits[i] & ABS_MASK)
    lane_largest = cuda.shared.array(REDUCE_THREADS, np.int32)
    lane_largest[lane] = largest
    cuda.syncthreads()
    if lane == 0:
        for other in range(1, REDUCE_THREADS):
            largest = max(largest, lane_largest[other])
        if stop - start < blocksize:
            largest = max(largest, TINY_SCALE_BITS)
        absmax_bits[block] = largest


@cuda.jit(device=True)
def _codebook_code(flat, i, absmax, blocksize, full_stop, midpoints, sort_order):
    """4-bit code of flat[i]: scaled into [-1, 1] by its block's absmax, then its midpoint rank."""
    safe = max(absmax[i // blocksize], TINY_SCALE)
    if i < full_stop:
        scaled = flat[i] * (ONE / safe)        # full blocks: times one float32 reciprocal
    else:
        scaled = flat[i] / safe                # the partial last block: a true division
    rank = 0
    for m in range(15):
        if scaled > midpoints[m]:
            rank += 1
    return sort_order[rank]


@cuda.jit
def _codebook_codes_kernel(flat, absmax, blocksize, full_stop, midpoints, sort_order, zero_code, packed):
    """packed[j] = code(flat[2j]) << 4 | code(flat[2j + 1]); an odd count pads with ``zero_code``."""
    n = flat.size
    for j in range(cuda.grid(1), packed.size, cuda.gridsize(1)):
        high = _codebook_code(flat, 2 * j, absmax, blocksize, full_stop, midpoints, sort_order)
        low = zero_code
        if 2 * j + 1 < n:
            low = _codebook_code(flat, 2 * j + 1, absmax, blocksize, full_stop, midpoints, sort_order)
        packed[j] = (high << 4) | low


@cuda.jit
def _asymmetric_scale_kernel(flat, bits, blocksize, scale, zero_point):
    """int4_asym, one CUDA block per block: 15 equal steps over [min(x, 0), max(x, 0)] and the
    code of 0.0 as zero point. A block holding inf or NaN gets a NaN scale (rejected by the caller)."""
    block = cuda.blockIdx.x
    lane = cuda.threadIdx.x
    start = block * blocksize
    stop = min(start + blocksize, flat.size)
    low = ZERO
    high = ZERO
    largest = np.int32(0)
    for i in range(start + lane, stop, REDUCE_THREADS):
        low = min(low, flat[i])
        high = max(high, flat[i])
        largest = max(largest, bits[i] & ABS_MASK)
    lane_low = cuda.shared.array(REDUCE_THREADS, np.float32)
    lane_high = cuda.shared.array(REDUCE_THREADS, np.float32)
    lane_largest = cuda.shared.array(REDUCE_THREADS, np.int32)
    lane_low[lane] = low
    lane_high[lane] = high
    lane_largest[lane] = largest
    cuda.syncthreads()
    if lane == 0:
        for other in range(1, REDUCE_THREADS):
            low = min(low, lane_low[other])
            high = max(high, lane_high[other])
            largest = max(largest, lane_largest[other])
        step = (high - low) / FIFTEEN
        if largest >= INF_BITS:
            step = NAN
        scale[block] = step
        inverse = ONE / step if step > ZERO else ZERO
        if inverse == INF:                     # a subnormal step has no reciprocal: divide
            zero = round_half_even(-low / step)
        else:
            zero = round_half_even(-low * inverse)
        zero_point[block] = np.uint8(min(max(zero, ZERO), FIFTEEN))


@cuda.jit(device=True)
def _asymmetric_code(value, step, zero):
    """int4_asym code of ``value``: round(value / step) + zero point, clamped to 0 … 15."""
    inverse = ONE / step if step > ZERO else ZERO
    if inverse == INF:
        level = round_half_even(value / step)
    else:
        level = round_half_even(value * inverse)
    return np.uint8(min(max(level + zero, ZERO), FIFTEEN))


@cuda.jit
def _asymmetric_codes_kernel(flat, scale, zero_point, blocksize, packed):
    """int4_asym codes, two a byte; an odd count pads with the last block's zero point."""
    n = flat.size
    for j in range(cuda.grid(1), packed.size, cuda.gridsize(1)):
        block = 2 * j // blocksize
        high = _asymmetric_code(flat[2 * j], scale[block], np.float32(zero_point[block]))
        low = zero_point[zero_point.size - 1]
        if 2 * j + 1 < n:
            block = (2 * j + 1) // blocksize
            low = _asymmetric_code(flat[2 * j + 1], scale[block], np.float32(zero_point[block]))
        packed[j] = (high << 4) | low


# ---------------------------------------------------------------------------
# 4-bit dequantization
# ---------------------------------------------------------------------------

def dequantize_4bit(packed, absmax, zero_point, n, blocksize, codebook, start=0):
    """Same contract as :func:`qlora_np.quant.reference.dequantize_4bit`: (n,) float32 device array."""
    out = cuda.device_array(n, np.float32)
    has_zero_point = zero_point is not None
    zero_point = zero_point if has_zero_point else _no_zero_point()
    _dequantize_kernel[_grid(n), THREADS](packed, absmax, zero_point, has_zero_point, codebook,
                                          blocksize, start, out)
    return out


@cuda.jit(device=True)
def _weight_at(packed, scales, zero_point, has_zero_point, codebook, blocksize, i):
    """Decoded flat element i: (codebook[code] − zero point) · scale of its block, one multiply."""
    byte = np.int64(packed[i >> 1])
    code = byte & 15 if i & 1 else byte >> 4
    block = i // blocksize
    shift = np.float32(zero_point[block]) if has_zero_point else ZERO
    return (codebook[code] - shift) * scales[block]


@cuda.jit
def _dequantize_kernel(packed, scales, zero_point, has_zero_point, codebook, blocksize, start, out):
    """out[k] = decoded flat element start + k."""
    for k in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[k] = _weight_at(packed, scales, zero_point, has_zero_point, codebook, blocksize, start + k)


# ---------------------------------------------------------------------------
# Double quantization
# ---------------------------------------------------------------------------

def double_quantize(absmax):
    """Same contract as :func:`qlora_np.quant.reference.double_quantize`: (codes, nested_absmax, offset).

    codes and nested_absmax are device arrays; offset is a host float32 (it goes into the
    state dict's JSON).
    """
    offset = _torch_mean(absmax)                                          # (1,) on the device
    nchunks = -(-absmax.size // NESTED_BLOCKSIZE)
    codes = cuda.device_array(absmax.size, np.uint8)
    nested_absmax = cuda.device_array(nchunks, np.float32)
    _quantize_8bit_chunks_kernel[nchunks, REDUCE_THREADS](absmax, offset, NESTED_BLOCKSIZE,
                                                          _nested_code_lut(), codes, nested_absmax)
    return codes, nested_absmax, np.float32(offset.copy_to_host()[0])


def torch_mean_float32(values):
    """Same contract as :func:`qlora_np.quant.reference.torch_mean_float32`: torch's float32 mean."""
    if not is_device_array(values):
        values = cuda.to_device(np.ascontiguousarray(values, np.float32))
    return np.float32(_torch_mean(values).copy_to_host()[0])


def _torch_mean(values):
    """(1,) float32 device array holding torch's mean of ``values``, computed by one warp.

    One warp is the design (torch's order has 32 independent chains), so numba's warning
    about grids too small to fill the GPU is silenced for this launch.
    """
    mean = cuda.device_array(1, np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grid size")
        _torch_mean_kernel[1, WARP](values, mean)
    return mean


@cuda.jit(device=True)
def _cascade_chain(values, first, stride, size):
    """Sum values[first + g · stride] for g < size through torch's 4-level cascade.

    Level 0 adds ``step`` items at a time (step = 16 until size > 2^16); each full level is
    carried into the next, so only sums of similar size are ever added.
    """
    ceil_log2 = 1
    if size > 2:
        ceil_log2 = 0
        while (1 << ceil_log2) < size:
            ceil_log2 += 1
    level_power = max(4, ceil_log2 // 4)
    step = 1 << level_power
    acc = cuda.local.array(4, np.float32)
    for level in range(4):
        acc[level] = ZERO
    g = 0
    while g + step <= size:
        for _ in range(step):
            acc[0] += values[first + g * stride]
            g += 1
        for level in range(1, 4):
            acc[level] += acc[level - 1]
            acc[level - 1] = ZERO
            if g & ((step - 1) << (level * level_power)):
                break
    while g < size:
        acc[0] += values[first + g * stride]
        g += 1
    for level in range(1, 4):
        acc[0] += acc[level]
    return acc[0]


@cuda.jit
def _torch_mean_kernel(values, mean):
    """mean[0] = float32 mean of values, summed in torch's single-thread CPU order, by one warp.

    torch views the values as 8-lane vectors and sums groups of 4 vectors: each of the
    4 × 8 (vector-in-group, lane) positions is an independent cascade, one per thread here.
    Thread 0 then adds the leftover vectors, the 4 partial vectors, the scalar tail and the
    lanes, in torch's order.
    """
    thread = cuda.threadIdx.x
    row = thread // LANES
    lane = thread % LANES
    n = values.size
    lanes = LANES if n >= LANES else 1
    n_vectors = n // lanes
    groups = n_vectors // 4
    partial = cuda.shared.array((4, LANES), np.float32)        # [vector in group, lane]
    if lane < lanes:
        partial[row, lane] = _cascade_chain(values, row * lanes + lane, 4 * lanes, groups)
    cuda.syncthreads()
    if thread == 0:
        for vector in range(groups * 4, n_vectors):
            for k in range(lanes):
                partial[0, k] += values[vector * lanes + k]
        for r in range(1, 4):
            for k in range(lanes):
                partial[0, k] += partial[r, k]
        total = ZERO
        if lanes == 1:
            total = partial[0, 0]
        else:
            for i in range(n_vectors * lanes, n):
                total += values[i]
            for k in range(lanes):
                total += partial[0, k]
        mean[0] = total / np.float32(n)


@cuda.jit
def _quantize_8bit_chunks_kernel(absmax, offset, chunk_size, lut, codes, nested_absmax):
    """Centre the scales on offset[0] and 8-bit quantize them, one CUDA block per chunk (LUT rounding)."""
    chunk = cuda.blockIdx.x
    lane = cuda.threadIdx.x
    start = chunk * chunk_size
    stop = min(start + chunk_size, absmax.size)
    centre = offset[0]
    largest = ZERO
    for i in range(start + lane, stop, REDUCE_THREADS):
        largest = max(largest, abs(absmax[i] - centre))
    lane_largest = cuda.shared.array(REDUCE_THREADS, np.float32)
    lane_largest[lane] = largest
    cuda.syncthreads()
    if lane == 0:
        for other in range(1, REDUCE_THREADS):
            largest = max(largest, lane_largest[other])
        lane_largest[0] = largest
        nested_absmax[chunk] = largest
    cuda.syncthreads()
    chunk_max = lane_largest[0]
    for i in range(start + lane, stop, REDUCE_THREADS):
        if chunk_max == ZERO:
            codes[i] = 0
        else:
            scaled = min(max((absmax[i] - centre) * (ONE / chunk_max), -ONE), ONE)
            grid = multiply_rn((scaled + ONE) * HALF, GRID_STEPS) + HALF
            codes[i] = lut[np.uint16(grid)]


def dequantize_absmax(codes, nested_absmax, offset, nested_code, nested_blocksize):
    """Same contract as :func:`qlora_np.quant.reference.dequantize_absmax`: (nblocks,) float32 device array."""
    out = cuda.device_array(codes.size, np.float32)
    _dequantize_8bit_kernel[_grid(codes.size), THREADS](codes, nested_absmax, np.float32(offset),
                                                        nested_code, nested_blocksize, out)
    return out


@cuda.jit
def _dequantize_8bit_kernel(codes, nested_absmax, offset, nested_code, chunk_size, out):
    """out[i] = float32(map[code] · nested_absmax[chunk]) + offset (two roundings, as on the CPU)."""
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = multiply_rn(nested_code[codes[i]], nested_absmax[i // chunk_size]) + offset


# ---------------------------------------------------------------------------
# Products with a packed weight W (out, in), never decoded to global memory
# ---------------------------------------------------------------------------

def matmul(x, packed, scales, zero_point, codebook, out_features, blocksize):
    """(rows, in) float32 device x → (rows, out) x @ W.T: fused for ≤ FUSED_MAX_ROWS rows, else tiled."""
    if x.shape[0] == 0:
        return cuda.device_array((0, out_features), np.float32)
    if x.shape[0] <= FUSED_MAX_ROWS:
        return gemv(x, packed, scales, zero_point, codebook, out_features, blocksize)
    return _product_tiled(x, packed, scales, zero_point, codebook, blocksize, out_features, False)


def matmul_t(g, packed, scales, zero_point, codebook, in_features, blocksize):
    """(rows, out) float32 device g → (rows, in) g @ W: fused for ≤ FUSED_MAX_ROWS rows, else tiled."""
    if g.shape[0] == 0:
        return cuda.device_array((0, in_features), np.float32)
    if g.shape[0] <= FUSED_MAX_ROWS:
        return gemv_t(g, packed, scales, zero_point, codebook, in_features, blocksize)
    return _product_tiled(g, packed, scales, zero_point, codebook, blocksize, in_features, True)


def gemv(x, packed, scales, zero_point, codebook, out_features, blocksize):
    """x @ W.T for up to FUSED_MAX_ROWS rows of x, one warp per output feature."""
    _check_fused_rows(x)
    y = cuda.device_array((x.shape[0], out_features), np.float32)
    has_zero_point = zero_point is not None
    zero_point = zero_point if has_zero_point else _no_zero_point()
    blocks = -(-out_features // WARPS_PER_BLOCK)
    _gemv_kernel[blocks, (WARP, WARPS_PER_BLOCK)](x, packed, scales, zero_point, has_zero_point,
                                                  codebook, blocksize, y)
    return y


def gemv_t(g, packed, scales, zero_point, codebook, in_features, blocksize):
    """g @ W for up to FUSED_MAX_ROWS rows of g, one thread per input feature."""
    _check_fused_rows(g)
    y = cuda.device_array((g.shape[0], in_features), np.float32)
    has_zero_point = zero_point is not None
    zero_point = zero_point if has_zero_point else _no_zero_point()
    _gemv_t_kernel[_grid(in_features), THREADS](g, packed, scales, zero_point, has_zero_point, codebook,
                                                blocksize, y)
    return y


def _check_fused_rows(rows_array):
    if not 1 <= rows_array.shape[0] <= FUSED_MAX_ROWS:
        raise ShapeError(f"the fused products take 1 … {FUSED_MAX_ROWS} rows, got {rows_array.shape[0]}")


@cuda.jit
def _gemv_kernel(x, packed, scales, zero_point, has_zero_point, codebook, blocksize, y):
    """y = x @ W.T: warp w of the block owns output feature o and decodes W's row o in registers.

    Lane l takes elements l, l + 32, … of the row, so neighbouring lanes read neighbouring
    codes; each decoded weight serves every row of x. Lane sums meet in shared memory.
    """
    rows, in_features = x.shape
    out_features = y.shape[1]
    lane = cuda.threadIdx.x
    warp = cuda.threadIdx.y
    feature = cuda.blockIdx.x * WARPS_PER_BLOCK + warp
    sums = cuda.local.array(FUSED_MAX_ROWS, np.float32)
    for r in range(rows):
        sums[r] = ZERO
    if feature < out_features:
        row_start = feature * in_features
        for k in range(lane, in_features, WARP):
            weight = _weight_at(packed, scales, zero_point, has_zero_point, codebook, blocksize,
                                row_start + k)
            for r in range(rows):
                sums[r] += weight * x[r, k]
    lane_sums = cuda.shared.array((WARPS_PER_BLOCK, FUSED_MAX_ROWS, WARP), np.float32)
    for r in range(rows):
        lane_sums[warp, r, lane] = sums[r]
    cuda.syncthreads()
    if lane == 0 and feature < out_features:
        for r in range(rows):
            total = ZERO
            for other in range(WARP):
                total += lane_sums[warp, r, other]
            y[r, feature] = total


@cuda.jit
def _gemv_t_kernel(g, packed, scales, zero_point, has_zero_point, codebook, blocksize, y):
    """y = g @ W: each thread walks down one column of W, decoding it in registers.

    Neighbouring threads take neighbouring columns, so every step reads neighbouring codes;
    each decoded weight serves every row of g.
    """
    rows, out_features = g.shape
    in_features = y.shape[1]
    sums = cuda.local.array(FUSED_MAX_ROWS, np.float32)
    for column in range(cuda.grid(1), in_features, cuda.gridsize(1)):
        for r in range(rows):
            sums[r] = ZERO
        for o in range(out_features):
            weight = _weight_at(packed, scales, zero_point, has_zero_point, codebook, blocksize,
                                o * in_features + column)
            for r in range(rows):
                sums[r] += g[r, o] * weight
        for r in range(rows):
            y[r, column] = sums[r]


def _product_tiled(left, packed, scales, zero_point, codebook, blocksize, columns, transposed):
    """left @ W.T (W is (columns, k)), or left @ W when ``transposed`` (W is (k, columns))."""
    out = cuda.device_array((left.shape[0], columns), np.float32)
    has_zero_point = zero_point is not None
    zero_point = zero_point if has_zero_point else _no_zero_point()
    in_features = left.shape[1] if not transposed else columns
    blocks = (-(-columns // TILE), -(-left.shape[0] // TILE))
    _product_tiled_kernel[blocks, (TILE, TILE)](left, packed, scales, zero_point, has_zero_point, codebook,
                                                blocksize, in_features, transposed, out)
    return out


@cuda.jit
def _product_tiled_kernel(left, packed, scales, zero_point, has_zero_point, codebook, blocksize,
                          in_features, transposed, out):
    """out = left @ W.T, or left @ W when ``transposed``: one TILE × TILE tile of out per CUDA block.

    Each step stages a TILE-wide slice of ``left`` and a TILE × TILE tile of W, decoded from
    its codes, in shared memory, then every thread adds TILE products to its output.
    Threads next to each other in x load neighbouring elements of both.
    """
    left_tile = cuda.shared.array((TILE, TILE), np.float32)            # [row, k]
    weight_tile = cuda.shared.array((TILE, TILE_PADDED), np.float32)     # [k, column]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    rows, columns = out.shape
    inner = left.shape[1]
    first_column = cuda.blockIdx.x * TILE
    row = cuda.blockIdx.y * TILE + ty
    column = first_column + tx
    total = ZERO
    for k0 in range(0, inner, TILE):
        k = k0 + tx
        left_tile[ty, tx] = left[row, k] if row < rows and k < inner else ZERO
        if transposed:                         # W (inner, columns): W[k0 + ty, first_column + tx]
            tile_k, tile_column = ty, tx
            flat_index = (k0 + ty) * in_features + first_column + tx
        else:                                  # W (columns, inner): W[first_column + ty, k0 + tx]
            tile_k, tile_column = tx, ty
            flat_index = (first_column + ty) * in_features + k0 + tx
        inside = k0 + tile_k < inner and first_column + tile_column < columns
        weight_tile[tile_k, tile_column] = _weight_at(packed, scales, zero_point, has_zero_point,
                                                      codebook, blocksize, flat_index) if inside else ZERO
        cuda.syncthreads()
        for j in range(TILE):
            total += left_tile[ty, j] * weight_tile[j, tx]
        cuda.syncthreads()
    if row < rows and column < columns:
        out[row, column] = total


# ---------------------------------------------------------------------------
# Dense float32 helpers: what LoRALinear needs around the 4-bit products
# ---------------------------------------------------------------------------

def gemm(a, b, transpose_a=False, transpose_b=False, alpha=1.0, out=None, beta=0.0):
    """out = alpha · op(a) @ op(b) + beta · out on float32 device matrices; a new out if None.

    op transposes when asked (no copy is made). ``beta`` = 0 never reads ``out``.
    """
    rows = a.shape[1] if transpose_a else a.shape[0]
    inner = a.shape[0] if transpose_a else a.shape[1]
    columns = b.shape[0] if transpose_b else b.shape[1]
    if (b.shape[1] if transpose_b else b.shape[0]) != inner:
        raise ShapeError(f"cannot multiply {tuple(a.shape)}{'ᵀ' * transpose_a} by "
                         f"{tuple(b.shape)}{'ᵀ' * transpose_b}")
    if out is None:
        out = cuda.device_array((rows, columns), np.float32)
    blocks = (-(-columns // TILE), -(-rows // TILE))
    _gemm_kernel[blocks, (TILE, TILE)](a, b, transpose_a, transpose_b, np.float32(alpha), np.float32(beta),
                                       out)
    return out


@cuda.jit
def _gemm_kernel(a, b, transpose_a, transpose_b, alpha, beta, out):
    """The dense twin of :func:`_product_tiled_kernel`: TILE × TILE outputs per CUDA block."""
    a_tile = cuda.shared.array((TILE, TILE), np.float32)               # [row, k]
    b_tile = cuda.shared.array((TILE, TILE_PADDED), np.float32)          # [k, column]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    rows, columns = out.shape
    inner = a.shape[0] if transpose_a else a.shape[1]
    first_row = cuda.blockIdx.y * TILE
    first_column = cuda.blockIdx.x * TILE
    total = ZERO
    for k0 in range(0, inner, TILE):
        if transpose_a:                        # a (inner, rows): a[k0 + ty, first_row + tx]
            a_row, a_k = tx, ty
            inside = k0 + ty < inner and first_row + tx < rows
            a_value = a[k0 + ty, first_row + tx] if inside else ZERO
        else:                                  # a (rows, inner): a[first_row + ty, k0 + tx]
            a_row, a_k = ty, tx
            inside = first_row + ty < rows and k0 + tx < inner
            a_value = a[first_row + ty, k0 + tx] if inside else ZERO
        a_tile[a_row, a_k] = a_value
        if transpose_b:                        # b (columns, inner): b[first_column + ty, k0 + tx]
            b_k, b_column = tx, ty
            inside = first_column + ty < columns and k0 + tx < inner
            b_value = b[first_column + ty, k0 + tx] if inside else ZERO
        else:                                  # b (inner, columns): b[k0 + ty, first_column + tx]
            b_k, b_column = ty, tx
            inside = k0 + ty < inner and first_column + tx < columns
            b_value = b[k0 + ty, first_column + tx] if inside else ZERO
        b_tile[b_k, b_column] = b_value
        cuda.syncthreads()
        for j in range(TILE):
            total += a_tile[ty, j] * b_tile[j, tx]
        cuda.syncthreads()
    row = first_row + ty
    column = first_column + tx
    if row < rows and column < columns:
        value = alpha * total
        if beta != ZERO:
            value += beta * out[row, column]
        out[row, column] = value


def add_row(matrix, row):
    """matrix (rows, columns) += row (columns,) on every row, in place (a bias)."""
    _add_row_kernel[_grid(matrix.size), THREADS](matrix, row)


@cuda.jit
def _add_row_kernel(matrix, row):
    columns = matrix.shape[1]
    for i in range(cuda.grid(1), matrix.size, cuda.gridsize(1)):
        matrix[i // columns, i % columns] += row[i % columns]


def column_sums(matrix):
    """(rows, columns) → (columns,) float32 sums over the rows (a bias gradient)."""
    sums = cuda.device_array(matrix.shape[1], np.float32)
    _column_sums_kernel[_grid(matrix.shape[1]), THREADS](matrix, sums)
    return sums


@cuda.jit
def _column_sums_kernel(matrix, sums):
    for column in range(cuda.grid(1), sums.size, cuda.gridsize(1)):
        total = ZERO
        for r in range(matrix.shape[0]):
            total += matrix[r, column]
        sums[column] = total


def masked_scale(values, keep, factor):
    """values · keep · factor as a new array: inverted dropout with a bool mask of the same shape."""
    out = cuda.device_array(values.shape, np.float32)
    _masked_scale_kernel[_grid(values.size), THREADS](values.reshape(-1), keep.reshape(-1),
                                                      np.float32(factor), out.reshape(-1))
    return out


@cuda.jit
def _masked_scale_kernel(values, keep, factor, out):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = values[i] * np.float32(keep[i]) * factor


def add_in_place(target, values):
    """target += values, element-wise, for float32 device arrays of one shape."""
    if tuple(target.shape) != tuple(values.shape):
        raise ShapeError(f"cannot add shape {tuple(values.shape)} to shape {tuple(target.shape)}")
    _add_kernel[_grid(target.size), THREADS](target.reshape(-1), values.reshape(-1))


@cuda.jit
def _add_kernel(target, values):
    for i in range(cuda.grid(1), target.size, cuda.gridsize(1)):
        target[i] += values[i]
