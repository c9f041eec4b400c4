"""Fused products with a packed 4-bit weight W (out, in): codes are decoded in registers.

* :func:`gemv`    — y = x @ W.T for a few rows of x (decode / single-token inference);
* :func:`gemv_t`  — y = g @ W for a few rows of g (the product backward needs).

Neither materialises W. They need rows made of whole blocks (``in % blocksize == 0``)
and an even block size; :func:`supports` says whether a weight qualifies, otherwise the
caller uses the tiled path in :mod:`qlora_np.ops`. Each has an AVX2 driver (permute
lookup, :mod:`.simd`) and a portable Numba driver; both sum every block first and
then scale it, so they agree to float32 summation-order rounding.
"""

import numba
import numpy as np
from numba import njit, prange

from .simd import (AVX2_DOT_ROWS, BYTES_PER_STEP, HAS_AVX2, avx2_axpy_rows1, avx2_axpy_rows4, avx2_dot_rows1,
                   avx2_dot_rows4, codebook_planes, group_order)


def supports(shape, blocksize):
    """Whether a (out, in) weight of this block size can use the fused products."""
    return len(shape) == 2 and blocksize % 2 == 0 and shape[1] % blocksize == 0


def simd_applies(blocksize, simd=None):
    """Whether the AVX2 driver runs: asked for (or not refused), present, and 16-byte blocks."""
    wanted = HAS_AVX2 if simd is None else bool(simd) and HAS_AVX2
    return wanted and (blocksize // 2) % BYTES_PER_STEP == 0


def gemv(x, packed, scales, shifts, codebook, out_features, blocksize, simd=None):
    """(rows, in) float32 x → (rows, out) float32 x @ W.T.

    ``scales`` (nblocks,) float32 are the decoded block scales, ``shifts`` (nblocks,)
    float32 the int4_asym zero points or None (codebook formats).
    """
    rows, in_features = x.shape
    y = gemv_many(x, [(packed, scales, out_features)], codebook, blocksize, simd)
    if shifts is not None:                # (code - zp)·s·x = code·s·x - zp·s·Σx over each block
        blocks_per_row = in_features // blocksize
        block_sums = x.reshape(rows, blocks_per_row, blocksize).sum(axis=2)          # (rows, bpr)
        zero_terms = (scales * shifts).reshape(out_features, blocks_per_row)         # (out, bpr)
        y -= block_sums @ zero_terms.T
    return y


MAX_PARTS = 3
"""Most weights :func:`gemv_many` multiplies in one call (q, k and v)."""

def gemv_many(x, parts, codebook, blocksize, simd=None):
    """x @ [W_1; …; W_k].T for up to MAX_PARTS codebook weights that share x and block size.

    ``parts`` holds (packed, scales, out_features) per weight, scales decoded to float32.
    All of them run in one parallel call: handing work to the threads costs ~10 µs, as
    much as a small model's product (q, k and v, or gate and up, share their input).
    Returns (rows, Σ out) float32, W_1's columns first.
    """
    x = np.ascontiguousarray(x)
    rows, in_features = x.shape
    blocks_per_row = in_features // blocksize
    y = np.empty((rows, sum(part[2] for part in parts)), np.float32)
    if len(parts) > MAX_PARTS or not _same_array_types(parts):    # one compiled variant per type tuple
        return np.concatenate([gemv_many(x, [part], codebook, blocksize, simd) for part in parts], axis=1)
    if not simd_applies(blocksize, simd):
        first = 0
        for packed, scales, out_features in parts:
            _gemv_portable(packed, x, scales, blocks_per_row, blocksize // 2, codebook,
                           y[:, first:first + out_features])
            first += out_features
        return y
    unused = (parts[0][0], parts[0][1], 0)                 # pads the tuples: same types, no rows
    packed, scales, out_features = zip(*(list(parts) + [unused] * (MAX_PARTS - len(parts))))
    _gemv_avx2(packed, scales, out_features, x, group_order(in_features), blocks_per_row,
               blocksize // 2, codebook_planes(codebook), y)
    return y


def _same_array_types(parts):
    """Whether every part's packed and scales arrays have the same Numba type (writeable flag)."""
    return len({(packed.flags.writeable, scales.flags.writeable) for packed, scales, _ in parts}) == 1


@njit(parallel=True, cache=True)
def _gemv_avx2(packed, scales, out_features, x, order, blocks_per_row, block_bytes, planes, y):
    rows = x.shape[0]
    x_ordered = np.empty((rows, order.size), np.float32)               # (rows, in), lane order
    for r in range(rows):
        for i in range(order.size):
            x_ordered[r, i] = x[r, order[i]]
    packed_at = np.array([part.ctypes.data for part in packed])
    scales_at = np.array([part.ctypes.data for part in scales])
    part_end = np.cumsum(np.array(out_features))                        # y column after each part
    row_bytes = blocks_per_row * block_bytes
    x_at, x_stride, y_at, y_stride = x_ordered.ctypes.data, order.size, y.ctypes.data, y.shape[1]
    for column in prange(y_stride):
        part = 0
        while column >= part_end[part]:
            part += 1
        row = np.int64(column - part_end[part] + out_features[part])    # row of W_part
        row_packed = packed_at[part] + row * row_bytes
        row_scales = scales_at[part] + 4 * row * blocks_per_row
        r = 0
        while r + AVX2_DOT_ROWS <= rows:                   # 4 rows of x share one decode
            avx2_dot_rows4(row_packed, x_at + 4 * r * x_stride, x_stride, row_scales, blocks_per_row,
                           block_bytes, planes.ctypes.data, y_at + 4 * (r * y_stride + column), y_stride)
            r += AVX2_DOT_ROWS
        for last in range(r, rows):
            avx2_dot_rows1(row_packed, x_at + 4 * last * x_stride, x_stride, row_scales, blocks_per_row,
                           block_bytes, planes.ctypes.data, y_at + 4 * (last * y_stride + column), y_stride)


@njit(parallel=True, cache=True)
def _gemv_portable(packed, x, scales, blocks_per_row, block_bytes, codebook, y):
    row_bytes = blocks_per_row * block_bytes
    for o in prange(y.shape[1]):
        row = np.int64(o)
        for r in range(y.shape[0]):
            first_block = row * blocks_per_row
            y[r, row] = _dot_row(packed[row * row_bytes:(row + 1) * row_bytes], x[r],
                                 scales[first_block:first_block + blocks_per_row], block_bytes,
                                 codebook)


@njit(cache=True)
def _dot_row(row_bytes, x, row_scales, block_bytes, codebook):
    """Σ_block scale · Σ codebook[code]·x over one row (the portable twin of avx2_dot_row)."""
    total = np.float32(0)
    for block in range(row_scales.size):
        codes = row_bytes[block * block_bytes:(block + 1) * block_bytes]
        values = x[2 * block * block_bytes:2 * (block + 1) * block_bytes]
        block_sum = np.float32(0)
        for j in range(codes.size):
            byte = codes[j]
            block_sum += codebook[byte >> 4] * values[2 * j] + codebook[byte & 15] * values[2 * j + 1]
        total += block_sum * row_scales[block]
    return total


def gemv_t(g, packed, scales, shifts, codebook, in_features, blocksize, simd=None):
    """(rows, out) float32 g → (rows, in) float32 g @ W.

    Each thread takes a range of W's rows and accumulates ``g[o] · W[o]`` into its own
    partial result (cache-resident); the partials are summed at the end.
    """
    rows, out_features = g.shape
    blocks_per_row = in_features // blocksize
    threads = max(1, min(numba.get_num_threads(), out_features))
    partial = np.zeros((threads, rows, in_features), np.float32)
    shifts = np.zeros_like(scales) if shifts is None else shifts
    g = np.ascontiguousarray(g)
    if not simd_applies(blocksize, simd):
        _gemv_t_portable(packed, g, scales, shifts, blocks_per_row, blocksize // 2, codebook, partial)
        return partial.sum(axis=0)
    _gemv_t_avx2(packed, g, scales, shifts, blocks_per_row, blocksize // 2,
                 codebook_planes(codebook), partial)
    result = np.empty((rows, in_features), np.float32)                 # (rows, in)
    result[:, group_order(in_features)] = partial.sum(axis=0)           # undo the lane order
    return result


@njit(parallel=True, cache=True)
def _gemv_t_avx2(packed, g, scales, shifts, blocks_per_row, block_bytes, planes, partial):
    threads, rows, in_features = partial.shape
    out_features = g.shape[1]
    row_bytes = blocks_per_row * block_bytes
    for t in prange(threads):
        coefs = np.empty((rows, blocks_per_row), np.float32)     # g[r, o] · scale of each block
        out_at = partial[t].ctypes.data
        for o in range(t * out_features // threads, (t + 1) * out_features // threads):
            row = np.int64(o)
            first_block = row * blocks_per_row
            for r in range(rows):
                for block in range(blocks_per_row):
                    coefs[r, block] = g[r, row] * scales[first_block + block]
            packed_at = packed.ctypes.data + row * row_bytes
            shifts_at = shifts.ctypes.data + 4 * first_block
            r = 0
            while r + AVX2_DOT_ROWS <= rows:                 # 4 rows of g share one decode
                avx2_axpy_rows4(packed_at, out_at + 4 * r * in_features, in_features,
                                coefs[r:].ctypes.data, shifts_at, blocks_per_row, block_bytes,
                                planes.ctypes.data)
                r += AVX2_DOT_ROWS
            for last in range(r, rows):
                avx2_axpy_rows1(packed_at, out_at + 4 * last * in_features, in_features,
                                coefs[last:].ctypes.data, shifts_at, blocks_per_row, block_bytes,
                                planes.ctypes.data)


@njit(parallel=True, cache=True)
def _gemv_t_portable(packed, g, scales, shifts, blocks_per_row, block_bytes, codebook, partial):
    threads = partial.shape[0]
    out_features = g.shape[1]
    row_bytes = blocks_per_row * block_bytes
    for t in prange(threads):
        for o in range(t * out_features // threads, (t + 1) * out_features // threads):
            row = np.int64(o)
            for r in range(g.shape[0]):
                for block in range(blocks_per_row):
                    index = row * blocks_per_row + block
                    first_byte = row * row_bytes + block * block_bytes
                    _axpy_block(packed[first_byte:first_byte + block_bytes], g[r, row] * scales[index],
                                shifts[index], codebook,
                                partial[t, r, 2 * block * block_bytes:2 * (block + 1) * block_bytes])


@njit(cache=True)
def _axpy_block(codes, coef, shift, codebook, out):
    """out[i] += coef · (codebook[code_i] − shift) over one block (portable twin of avx2_axpy_row)."""
    for j in range(codes.size):
        byte = codes[j]
        out[2 * j] += coef * (codebook[byte >> 4] - shift)
        out[2 * j + 1] += coef * (codebook[byte & 15] - shift)
