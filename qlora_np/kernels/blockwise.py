"""Numba CPU kernels: the same functions as :mod:`qlora_np.quant.reference`, same bytes out, fast.

Each public function is a thin Python wrapper (allocate, pick the variant) over a
``prange`` driver that splits the work across threads, which calls a serial
``@njit`` worker for one block. No ``fastmath`` anywhere: every result here must be
bit-identical to the reference, so float32 operations keep their written order.

Workers take slices (``flat[start:stop]``) and loop over ``range(len)``: with indices
LLVM can prove non-negative, Numba drops its negative-index wraparound and the loops
vectorise (indexing ``flat[start + k]`` keeps the wraparound checks, which stop that).
"""

from functools import lru_cache

import numpy as np
from numba import njit, prange

from qlora_np.quant.codebooks import NESTED_BLOCKSIZE, get_format, nested_code_lut
from qlora_np.kernels import features
from qlora_np.kernels.x86.builder import decode_table
from qlora_np.kernels.x86.dequantize import DEQUANTIZE_STEP, avx512_dequantize_blocks
from qlora_np.kernels.x86.quantize_search import (RANK_STEP, avx2_quantize_blocks,
                                                  avx2_quantize_blocks_reordered, rank_lut, search_table)

TINY_SCALE = np.float32(1e-38)
TINY_SCALE_BITS = TINY_SCALE.view(np.uint32)
ABS_MASK = np.uint32(0x7FFFFFFF)
INF_BITS = np.float32(np.inf).view(np.uint32)
ONE = np.float32(1)


# ---------------------------------------------------------------------------
# 4-bit quantization
# ---------------------------------------------------------------------------

def quantize_4bit(flat, blocksize, quant_type, simd=None):
    """Same contract as :func:`qlora_np.quant.reference.quantize_4bit`: (packed, absmax, zero_point).

    Full blocks of a multiple of 16 values use the AVX2 binary search where the CPU has
    it (``simd=False`` forces the portable loop, for tests); both give the same bytes.
    """
    fmt = get_format(quant_type)
    n = flat.size
    nblocks = -(-n // blocksize)
    packed = np.empty((n + 1) // 2, np.uint8)
    absmax = np.empty(nblocks, np.float32)
    if fmt.asymmetric:
        zero_point = np.empty(nblocks, np.uint8)
        codes = np.empty(n + n % 2, np.uint8)
        _quantize_asymmetric_blocks(flat, flat.view(np.uint32), blocksize, codes, absmax, zero_point)
        if n % 2:
            codes[n] = zero_point[-1]
        _pack_pairs(codes, packed)
        return packed, absmax, zero_point
    reorder = not (fmt.sort_order == np.arange(16)).all()     # only FP4 maps rank → code
    n_full = n // blocksize
    bits, absmax_bits = flat.view(np.uint32), absmax.view(np.uint32)
    if blocksize % 2 == 0:
        # full blocks in parallel straight into bytes, then the partial last block alone
        if _rank_search_applies(flat, blocksize, simd):
            _quantize_full_blocks_avx2(flat, blocksize, n_full, search_table(fmt.midpoints),
                                       rank_lut(fmt.sort_order), reorder, packed, absmax_bits)
        else:
            _quantize_full_blocks_even(flat, bits, blocksize, n_full, fmt.midpoints, fmt.sort_order,
                                       reorder, packed, absmax, absmax_bits)
        if n_full < nblocks:
            codes = np.empty(n - n_full * blocksize + n % 2, np.int32)
            _quantize_tail_block(flat, bits, n_full * blocksize, fmt.midpoints, fmt.sort_order,
                                 reorder, fmt.zero_code, codes, absmax, absmax_bits)
            _pack_codes(codes, packed[n_full * blocksize // 2:])
    else:
        # odd block sizes: blocks share bytes, so code every element first, pack after
        codes = np.empty(n + n % 2, np.int32)
        _quantize_blocks_any(flat, bits, blocksize, fmt.midpoints, fmt.sort_order, reorder, codes,
                             absmax, absmax_bits)
        if n % 2:
            codes[n] = fmt.zero_code
        _pack_codes(codes, packed)
    return packed, absmax, None


def _rank_search_applies(flat, blocksize, simd):
    """Whether full blocks go through the AVX2 search: wanted, present, 16-value steps, contiguous."""
    wanted = features.HAS_AVX2 if simd is None else bool(simd) and features.HAS_AVX2
    return wanted and blocksize % RANK_STEP == 0 and flat.flags.c_contiguous


@njit(cache=True, inline="always")
def _block_absmax_bits(bits):
    """Bit pattern of max |x| over a block, from the float32 bit patterns ``bits``.

    Clearing the sign bit and comparing as uint32 orders finite floats exactly as
    their magnitudes and puts inf and NaN above all of them, so a block holding one
    gets an inf/NaN absmax, which the caller rejects. An integer max also
    vectorises, unlike a float max that must watch for NaN.
    """
    largest = np.uint32(0)
    for i in range(bits.size):
        largest = max(largest, bits[i] & ABS_MASK)
    return largest


@njit(cache=True, inline="always")
def _code_ranks(values, inverse, divide, midpoints, sort_order, reorder, codes):
    """codes[k] = code of values[k] scaled by ``inverse`` (multiply) or 1/``inverse`` (divide).

    The rank of a value is the number of midpoints strictly below it; no clamp to
    [-1, 1] is needed first since every midpoint lies inside (-1, 1). Counting with
    15 compares (instead of a search) lets LLVM vectorise the loop.
    """
    for k in range(values.size):
        scaled = values[k] / inverse if divide else values[k] * inverse
        rank = np.int32(0)
        for m in range(15):
            rank += np.int32(scaled > midpoints[m])
        codes[k] = rank
    if reorder:
        for k in range(values.size):
            codes[k] = sort_order[codes[k]]


@njit(cache=True, inline="always")
def _pack_codes(codes, packed):
    """packed[j] = codes[2j] << 4 | codes[2j + 1] (the first code in the high nibble)."""
    for j in range(codes.size // 2):
        packed[j] = (codes[2 * j] << 4) | codes[2 * j + 1]


@njit(parallel=True, cache=True)
def _quantize_full_blocks_even(flat, bits, blocksize, n_full, midpoints, sort_order, reorder,
                               packed, absmax, absmax_bits):
    """Full blocks of an even size, in parallel groups of 64 blocks (one scratch buffer per group)."""
    group = 64
    for first in prange(-(-n_full // group)):
        codes = np.empty(blocksize, np.int32)
        for block in range(first * group, min(n_full, (first + 1) * group)):
            start = block * blocksize
            absmax_bits[block] = _block_absmax_bits(bits[start:start + blocksize])
            # full blocks: one float32 reciprocal per block, then a multiply per element
            reciprocal = ONE / max(absmax[block], TINY_SCALE)
            _code_ranks(flat[start:start + blocksize], reciprocal, False, midpoints,
                        sort_order, reorder, codes)
            _pack_codes(codes, packed[start // 2:])


@njit(parallel=True, cache=True)
def _quantize_full_blocks_avx2(flat, blocksize, n_full, table, lut, reorder, packed, absmax_bits):
    """:func:`_quantize_full_blocks_even` by
    :func:`qlora_np.kernels.x86.quantize_search.avx2_quantize_blocks`, 64 blocks a call."""
    group = 64
    values_at, packed_at, absmax_at = flat.ctypes.data, packed.ctypes.data, absmax_bits.ctypes.data
    for first in prange(-(-n_full // group)):
        block = first * group
        count = min(n_full - block, group)
        start = block * blocksize
        if reorder:
            avx2_quantize_blocks_reordered(values_at + 4 * start, count, blocksize, table.ctypes.data,
                                           lut.ctypes.data, packed_at + start // 2, absmax_at + 4 * block)
        else:
            avx2_quantize_blocks(values_at + 4 * start, count, blocksize, table.ctypes.data,
                                 lut.ctypes.data, packed_at + start // 2, absmax_at + 4 * block)


@njit(cache=True)
def _quantize_tail_block(flat, bits, start, midpoints, sort_order, reorder, zero_code, codes,
                         absmax, absmax_bits):
    """The partial last block: absmax floored at 1e-38 and a true division per element."""
    stop = flat.size
    absmax_bits[-1] = max(_block_absmax_bits(bits[start:stop]), TINY_SCALE_BITS)
    _code_ranks(flat[start:stop], absmax[-1], True, midpoints, sort_order, reorder, codes)
    if codes.size > stop - start:                  # odd count: pad with the code of 0.0
        codes[-1] = zero_code


@njit(parallel=True, cache=True)
def _quantize_blocks_any(flat, bits, blocksize, midpoints, sort_order, reorder, codes,
                         absmax, absmax_bits):
    """Any block size: one code per element (blocks may share bytes), packed afterwards."""
    n = flat.size
    for block in prange(absmax.size):
        start = block * blocksize
        stop = min(start + blocksize, n)
        is_tail = stop - start < blocksize
        largest = _block_absmax_bits(bits[start:stop])
        absmax_bits[block] = max(largest, TINY_SCALE_BITS) if is_tail else largest
        safe = max(absmax[block], TINY_SCALE)
        scale = safe if is_tail else ONE / safe
        _code_ranks(flat[start:stop], scale, is_tail, midpoints, sort_order, reorder,
                    codes[start:stop])


@njit(parallel=True, cache=True)
def _quantize_asymmetric_blocks(flat, bits, blocksize, codes, scale, zero_point):
    """int4_asym: per block, 15 equal steps over [min(x, 0), max(x, 0)] and a zero point."""
    n = flat.size
    for block in prange(scale.size):
        start = block * blocksize
        stop = min(start + blocksize, n)
        values = flat[start:stop]
        low = np.float32(0)
        high = np.float32(0)
        for i in range(values.size):
            low = min(low, values[i])
            high = max(high, values[i])
        step = (high - low) / np.float32(15)
        if _block_absmax_bits(bits[start:stop]) >= INF_BITS:
            step = np.float32(np.nan)              # NaN or inf in the block: the caller rejects it
        scale[block] = step
        inverse = ONE / step if step > 0 else np.float32(0)
        divide = inverse == np.inf                 # subnormal step: divide, as the reference does
        zero = np.rint(-low / step) if divide else np.rint(-low * inverse)
        zero = min(max(zero, np.float32(0)), np.float32(15))
        zero_point[block] = np.uint8(zero)
        block_codes = codes[start:stop]
        for i in range(values.size):
            level = np.rint(values[i] / step) if divide else np.rint(values[i] * inverse)
            block_codes[i] = np.uint8(min(max(level + zero, np.float32(0)), np.float32(15)))


@njit(parallel=True, cache=True)
def _pack_pairs(codes, packed):
    """Parallel pack of a uint8 code array (used by int4_asym)."""
    for j in prange(packed.size):
        packed[j] = (codes[2 * j] << 4) | codes[2 * j + 1]


# ---------------------------------------------------------------------------
# 4-bit dequantization
# ---------------------------------------------------------------------------

def dequantize_4bit(packed, absmax, zero_point, n, blocksize, codebook, start=0, parallel=True, simd=None):
    """Same contract as :func:`qlora_np.quant.reference.dequantize_4bit`: (n,) float32.

    ``parallel=False`` decodes on the calling thread only. The tiled products use it:
    when a BLAS call follows, Numba's OpenMP workers would still be spin-waiting for
    more work and take the cores from BLAS's threads, slowing the whole training step;
    a one-thread decode of a tile costs far less than that.
    With the AVX-512 permute decode (:data:`qlora_np.kernels.features.PERMUTE_DECODE`; ``simd=False``
    refuses it) whole blocks of a multiple of 16 values decode 16 at a time; the values
    are the same bytes either way.
    """
    out = np.empty(n, np.float32)
    if zero_point is None:
        shift = zero_shifts(absmax.size)
    else:                                          # (code - zp) · scale == codebook[code] - zp, times scale
        shift = zero_point.astype(np.float32)
    if blocksize % 2 == 0 and start % blocksize == 0:
        blocks = -(-n // blocksize)
        if simd is not False and features.PERMUTE_DECODE and blocksize % (2 * DEQUANTIZE_STEP) == 0:
            codebook32 = decode_table(codebook)           # PERMUTE_DECODE: the float32 codebook
            if parallel:
                _dequantize_blocks_wide(packed, absmax, shift, blocksize, codebook32, start, out)
            else:
                _dequantize_range_wide(packed, absmax, shift, blocksize, codebook32, start, out, 0, blocks)
        elif parallel:
            _dequantize_blocks_even(packed, absmax, shift, blocksize, codebook, start, out)
        else:
            _dequantize_block_range(packed, absmax, shift, blocksize, codebook, start, out, 0, blocks)
    else:
        _dequantize_blocks_any(packed, absmax, shift, blocksize, codebook, start, out)
    return out


@lru_cache(maxsize=32)
def zero_shifts(nblocks):
    """(nblocks,) float32 zeros, read-only: the shifts of a codebook format, made once a size
    (zeroing a fresh array each call would be a large share of a 1-row product's time)."""
    zeros = np.zeros(nblocks, np.float32)
    zeros.setflags(write=False)
    return zeros


@njit(cache=True)
def _dequantize_block_even(block_bytes, scale, shift, codebook, out):
    """Decode the codes in ``block_bytes`` into out (len(out) values, the first in a high nibble)."""
    pairs = out.size // 2
    for j in range(pairs):
        byte = block_bytes[j]
        out[2 * j] = (codebook[byte >> 4] - shift) * scale
        out[2 * j + 1] = (codebook[byte & 15] - shift) * scale
    if 2 * pairs < out.size:
        out[2 * pairs] = (codebook[block_bytes[pairs] >> 4] - shift) * scale


@njit(cache=True)
def _dequantize_block_range(packed, absmax, shift, blocksize, codebook, start, out, first, stop):
    """Blocks first … stop-1 counted from ``start`` (a block boundary), into out[their range - start]."""
    end = start + out.size
    for k in range(first, stop):
        block = start // blocksize + k
        lo = block * blocksize
        hi = min(lo + blocksize, end)
        _dequantize_block_even(packed[lo >> 1:], absmax[block], shift[block], codebook,
                               out[lo - start:hi - start])


@njit(parallel=True, cache=True)
def _dequantize_blocks_even(packed, absmax, shift, blocksize, codebook, start, out):
    """Whole blocks from ``start`` (a block boundary), in parallel groups of 16 blocks."""
    blocks = -(-out.size // blocksize)
    group = 16
    for g in prange(-(-blocks // group)):
        first = np.int64(g) * group
        _dequantize_block_range(packed, absmax, shift, blocksize, codebook, start, out,
                                first, min(first + group, blocks))


@njit(cache=True)
def _dequantize_range_wide(packed, absmax, shift, blocksize, codebook, start, out, first, stop):
    """:func:`_dequantize_block_range` with the whole blocks decoded by
    :func:`qlora_np.kernels.x86.dequantize.avx512_dequantize_blocks` (the last block may be partial:
    scalar); ``codebook`` is float32."""
    whole = min(stop, out.size // blocksize)
    if whole > first:
        block = start // blocksize + first
        avx512_dequantize_blocks(packed.ctypes.data + block * (blocksize // 2),
                                 absmax.ctypes.data + 4 * block, shift.ctypes.data + 4 * block,
                                 whole - first, blocksize // 2, codebook,
                                 out.ctypes.data + 4 * first * blocksize)
    if stop > whole:
        _dequantize_block_range(packed, absmax, shift, blocksize, codebook, start, out, max(whole, first),
                                stop)


@njit(parallel=True, cache=True)
def _dequantize_blocks_wide(packed, absmax, shift, blocksize, codebook, start, out):
    """:func:`_dequantize_blocks_even` on :func:`_dequantize_range_wide`: a driver of its own
    rather than a flag, so that CPUs without AVX-512 never compile the intrinsic."""
    blocks = -(-out.size // blocksize)
    group = 16
    for g in prange(-(-blocks // group)):
        first = np.int64(g) * group
        _dequantize_range_wide(packed, absmax, shift, blocksize, codebook, start, out, first,
                               min(first + group, blocks))


@njit(parallel=True, cache=True)
def _dequantize_blocks_any(packed, absmax, shift, blocksize, codebook, start, out):
    """Any block size or start: decode element by element, in parallel chunks."""
    chunk = 4096
    for first in prange(-(-out.size // chunk)):
        lo = np.int64(first) * chunk
        for k in range(lo, min(out.size, lo + chunk)):
            i = np.int64(start) + k
            block = i // np.int64(blocksize)
            byte = np.int64(packed[i >> 1])
            code = byte & 15 if i & 1 else byte >> 4
            out[k] = (codebook[code] - shift[block]) * absmax[block]


# ---------------------------------------------------------------------------
# Double quantization
# ---------------------------------------------------------------------------

def double_quantize(absmax):
    """Same contract as :func:`qlora_np.quant.reference.double_quantize`: (codes, nested_absmax, offset)."""
    offset = torch_mean_float32(absmax)
    nchunks = -(-absmax.size // NESTED_BLOCKSIZE)
    codes = np.empty(absmax.size, np.uint8)
    nested_absmax = np.empty(nchunks, np.float32)
    _quantize_8bit_chunks(absmax, offset, NESTED_BLOCKSIZE, nested_code_lut(), codes, nested_absmax)
    return codes, nested_absmax, offset


@njit(parallel=True, cache=True)
def _quantize_8bit_chunks(absmax, offset, chunk_size, lut, codes, nested_absmax):
    """Centre the scales on ``offset`` and 8-bit quantize them chunk by chunk (LUT rounding)."""
    n = absmax.size
    for chunk in prange(nested_absmax.size):
        start = chunk * chunk_size
        stop = min(start + chunk_size, n)
        chunk_max = np.float32(0)
        for i in range(start, stop):
            chunk_max = max(chunk_max, abs(absmax[i] - offset))
        nested_absmax[chunk] = chunk_max
        if chunk_max == 0:
            codes[start:stop] = 0
            continue
        inverse = ONE / chunk_max
        for i in range(start, stop):
            scaled = min(max((absmax[i] - offset) * inverse, -ONE), ONE)
            grid = (scaled + ONE) * np.float32(0.5) * np.float32(65535) + np.float32(0.5)
            codes[i] = lut[np.uint16(grid)]


def dequantize_absmax(codes, nested_absmax, offset, nested_code, nested_blocksize):
    """Same contract as :func:`qlora_np.quant.reference.dequantize_absmax`: (nblocks,) float32."""
    out = np.empty(codes.size, np.float32)
    _dequantize_8bit_chunks(codes, nested_absmax, np.float32(offset), nested_code,
                            nested_blocksize, out)
    return out


@njit(parallel=True, cache=True)
def _dequantize_8bit_chunks(codes, nested_absmax, offset, nested_code, chunk_size, out):
    n = codes.size
    for chunk in prange(nested_absmax.size):
        start = chunk * chunk_size
        for i in range(start, min(start + chunk_size, n)):
            out[i] = nested_code[codes[i]] * nested_absmax[chunk] + offset


def torch_mean_float32(values):
    """Same contract as :func:`qlora_np.quant.reference.torch_mean_float32` (torch's float32 mean)."""
    return np.float32(_torch_mean_float32(np.ascontiguousarray(values, dtype=np.float32)))


@njit(cache=True)
def _torch_mean_float32(values):
    n = values.size
    lanes = 8 if n >= 8 else 1
    n_vectors = n // lanes
    lane_sums = _cascade_row_sum(values[:n_vectors * lanes].reshape(n_vectors, lanes))
    total = np.float32(0)
    if lanes == 1:
        total = lane_sums[0]
    else:
        for i in range(n_vectors * lanes, n):
            total += values[i]
        for lane in range(lanes):
            total += lane_sums[lane]
    return total / np.float32(n)


@njit(cache=True)
def _cascade_row_sum(items):
    """(m, lanes) → (lanes,): groups of 4 rows through the cascade, then the leftover rows."""
    m, lanes = items.shape
    groups = m // 4
    partial = _cascade_levels(items[:groups * 4].reshape(groups, 4, lanes))
    for row in range(groups * 4, m):
        for lane in range(lanes):
            partial[0, lane] += items[row, lane]
    for k in range(1, 4):
        for lane in range(lanes):
            partial[0, lane] += partial[k, lane]
    return partial[0]


@njit(cache=True)
def _cascade_levels(rows):
    """torch's multi-row cascade sum with 4 accumulator levels: (size, 4, lanes) → (4, lanes)."""
    size, nrows, lanes = rows.shape
    ceil_log2 = 1
    if size > 2:
        ceil_log2 = 0
        while (1 << ceil_log2) < size:
            ceil_log2 += 1
    level_power = max(4, ceil_log2 // 4)
    step = 1 << level_power
    acc = np.zeros((4, nrows, lanes), np.float32)
    i = 0
    while i + step <= size:
        for _ in range(step):
            acc[0] += rows[i]
            i += 1
        for level in range(1, 4):
            acc[level] += acc[level - 1]
            acc[level - 1] = 0
            if i & ((step - 1) << (level * level_power)):
                break
    while i < size:
        acc[0] += rows[i]
        i += 1
    for level in range(1, 4):
        acc[0] += acc[level]
    return acc[0]
