"""Fused products with a packed 4-bit weight W (out, in): codes are decoded in registers.

* :func:`gemv`    — y = x @ W.T for a few rows of x (decode / single-token inference);
* :func:`gemv_t`  — y = g @ W for a few rows of g (the product backward needs).

Neither materialises W. They need rows made of whole blocks (``in % blocksize == 0``)
and an even block size; :func:`supports` says whether a weight qualifies, otherwise the
caller uses the tiled path in :mod:`qlora_np.quant.codec`. Each has a SIMD driver (needs AVX2;
it decodes with the AVX-512 permute or the AVX2 byte shuffles, whichever
:func:`~qlora_np.kernels.x86.builder.decode_table` gives: :mod:`qlora_np.kernels.x86.dot`) and a
portable Numba driver; both sum every block first and then scale it, so they agree to float32
summation-order rounding.
"""

import numba
import numpy as np
from numba import njit, prange

from qlora_np.errors import ShapeError
from qlora_np.kernels import features
from qlora_np.kernels.blockwise import zero_shifts
from qlora_np.kernels.x86.builder import BYTES_PER_STEP, decode_table, lane_order
from qlora_np.kernels.x86.dot import (AXPY_W_ROWS, ROWS_PER_DECODE, axpy_rows1, axpy_rows4, axpy_wrows,
                                      dot_rows1, dot_rows4)
from qlora_np.kernels.x86.int8 import (INT8_ORDER, INT8_ORDER_64, avx2_dot_rows1_int8, avx2_dot_rows4_int8,
                                       int8_table)
from qlora_np.kernels.x86.panels import (STRIP, avx2_panel_axpy1, avx2_panel_axpy2, avx2_panel_axpy4,
                                         avx2_panel_axpy6, avx2_panel_dot1x1, avx2_panel_dot1x4,
                                         avx2_panel_dot3x1, avx2_panel_dot3x4, decode_panel)


def supports(shape, blocksize):
    """Whether a (out, in) weight of this block size can use the fused products."""
    return len(shape) == 2 and blocksize % 2 == 0 and shape[1] % blocksize == 0


def simd_applies(blocksize, simd=None):
    """Whether the SIMD drivers run: asked for (or not refused), AVX2 present, and whole 16-byte
    decode steps in a block."""
    wanted = features.HAS_AVX2 if simd is None else bool(simd) and features.HAS_AVX2
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
"""Most weights one call of the SIMD drivers multiplies (q, k and v)."""


def gemv_many(x, parts, codebook, blocksize, simd=None, int8_activations=False):
    """x @ [W_1; …; W_k].T for codebook weights that share x and block size: (rows, Σ out).

    ``parts`` holds (packed, scales, out_features) per weight, scales decoded to float32;
    see :class:`FusedProduct`.
    """
    return FusedProduct(parts, codebook, blocksize, x.shape[1], simd, int8_activations)(x)


class FusedProduct:
    """x @ [W_1; …; W_k].T for fixed codebook weights sharing x and block size, prepared once.

    Up to MAX_PARTS weights run in one parallel call: handing work to the threads, and
    preparing a call's arguments, each cost a sizeable share of a small model's product.
    So decoding keeps one of these per group of weights with the same input (q, k and v;
    gate and up) and pays only the kernel call per token.

    ``int8_activations`` (where :func:`int8_supports`) rounds x to int8 per group of 32
    and the codebook to int8 and multiplies in integers, as llama.cpp does: faster, not
    exact (see :func:`qlora_np.linalg.reference.gemv_int8`).
    """

    def __init__(self, parts, codebook, blocksize, in_features, simd=None, int8_activations=False):
        if int8_activations and not int8_supports(in_features, blocksize):
            raise ShapeError(f"int8 activations need whole groups of {INT8_GROUP} in every block, got "
                             f"in_features {in_features} and blocksize {blocksize}")
        parts = list(parts)
        self.out_features = tuple(int(part[2]) for part in parts)
        self._total = sum(self.out_features)
        shape = (in_features // blocksize, blocksize // 2)                # blocks a row, bytes a block
        use_simd = simd_applies(blocksize, simd)
        if use_simd and len(parts) <= MAX_PARTS and _same_array_types(parts):
            self._calls = [_simd_call(parts, codebook, blocksize, shape, int8_activations, None)]
            return
        self._calls, first = [], 0                                       # one call per weight
        for part in parts:
            columns = slice(first, first + part[2])
            first += part[2]
            if use_simd:
                self._calls.append(_simd_call([part], codebook, blocksize, shape, int8_activations, columns))
            elif int8_activations:
                self._calls.append((_gemv_int8_portable, part[:2] + shape + (int8_table(codebook)[:16],),
                                    columns))
            else:
                self._calls.append((_gemv_portable, part[:2] + shape + (codebook,), columns))

    def __call__(self, x):
        """(rows, in) float32 x → (rows, Σ out) float32."""
        x = np.ascontiguousarray(x)
        y = np.empty((x.shape[0], self._total), np.float32)
        scratch = _scratch(self._calls[0][0], x)
        for kernel, static, columns in self._calls:
            kernel(x, *scratch, *static, y if columns is None else y[:, columns])
        return y


def _scratch(kernel, x):
    """The buffers a kernel fills from x before multiplying: the drivers hand raw addresses
    to the intrinsics, so these must be owned here (Numba frees its own arrays after their
    last use by name, which is before the loop that reads them through an address)."""
    if kernel is _gemv_simd:
        return (np.empty_like(x),)                                    # x in lane order
    if kernel is _gemv_portable:
        return ()
    return np.empty(x.shape, np.int8), np.empty((x.shape[0], x.shape[1] // INT8_GROUP), np.float32)


def _simd_call(parts, codebook, blocksize, shape, int8_activations, columns):
    """(kernel, its arguments after x, y's columns) of one SIMD call for up to MAX_PARTS weights."""
    unused = (parts[0][0], parts[0][1], 0)                 # pads the tuples: same types, no rows
    packed, scales, out_features = zip(*(list(parts) + [unused] * (MAX_PARTS - len(parts))))
    if int8_activations:
        return _gemv_int8_avx2, (packed, scales, out_features) + shape + (int8_table(codebook),), columns
    lookup = decode_table(codebook)
    order = lane_order(shape[0] * blocksize, lookup)
    return _gemv_simd, (packed, scales, out_features, order) + shape + (lookup,), columns


def _same_array_types(parts):
    """Whether every part's packed and scales arrays have the same Numba type (writeable flag)."""
    return len({(packed.flags.writeable, scales.flags.writeable) for packed, scales, _ in parts}) == 1


@njit(parallel=True, cache=True)
def _gemv_simd(x, x_ordered, packed, scales, out_features, order, blocks_per_row, block_bytes, lookup, y):
    rows = x.shape[0]
    for r in range(rows):                                               # x_ordered: (rows, in), lane order
        for i in range(order.size):
            x_ordered[r, i] = x[r, order[i]]
    packed_at, scales_at, part_end = _part_tables(packed, scales, out_features)
    row_bytes = blocks_per_row * block_bytes
    x_at, x_stride, y_at, y_stride = x_ordered.ctypes.data, order.size, y.ctypes.data, y.strides[0] // 4
    for column in prange(y.shape[1]):   # y may be a view of some columns
        part, row = _part_row(column, part_end, out_features)
        row_packed = packed_at[part] + row * row_bytes
        row_scales = scales_at[part] + 4 * row * blocks_per_row
        r = 0
        while r + ROWS_PER_DECODE <= rows:                 # 4 rows of x share one decode
            dot_rows4(row_packed, x_at + 4 * r * x_stride, x_stride, row_scales, blocks_per_row,
                      block_bytes, lookup, y_at + 4 * (r * y_stride + column), y_stride)
            r += ROWS_PER_DECODE
        for last in range(r, rows):
            dot_rows1(row_packed, x_at + 4 * last * x_stride, x_stride, row_scales, blocks_per_row,
                      block_bytes, lookup, y_at + 4 * (last * y_stride + column), y_stride)


@njit(cache=True)
def _part_tables(packed, scales, out_features):
    """Addresses of each part's packed bytes and scales, and the y column after each part."""
    packed_at = np.array([part.ctypes.data for part in packed])
    scales_at = np.array([part.ctypes.data for part in scales])
    return packed_at, scales_at, np.cumsum(np.array(out_features))


@njit(cache=True)
def _part_row(column, part_end, out_features):
    """(part, row of that part's W) of y's column ``column``."""
    part = 0
    while column >= part_end[part]:
        part += 1
    return part, np.int64(column - part_end[part] + out_features[part])


@njit(parallel=True, cache=True)
def _gemv_portable(x, packed, scales, blocks_per_row, block_bytes, codebook, y):
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
    """Σ_block scale · Σ codebook[code]·x over one row (the portable twin of
    :func:`~qlora_np.kernels.x86.dot.dot_rows1`)."""
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


# ---------------------------------------------------------------------------
# Int8 activations (opt-in): the integer products llama.cpp uses for decoding
# ---------------------------------------------------------------------------

INT8_GROUP = 32
"""Elements of x that share one int8 scale (llama.cpp's Q8_0 group): one decode step."""


def int8_supports(in_features, blocksize):
    """Whether int8 activations apply: whole groups of 32 in every block."""
    return in_features % INT8_GROUP == 0 and blocksize % INT8_GROUP == 0


def quantize_activations(x):
    """(rows, in) float32 x → int8 xq (rows, in) and float32 group scales (rows, in/32).

    Per group of 32: xq = rint(x · 127 / max|x|), scale = max|x| / 127² (one 127 for x,
    one for the int8 codebook), so x·w ≈ scale · xq · round(127·codebook[code]) · block scale.
    """
    rows, in_features = x.shape
    xq = np.empty((rows, in_features), np.int8)
    x_scales = np.empty((rows, in_features // INT8_GROUP), np.float32)
    _quantize_activation_groups(x, NATURAL_ORDER, xq, x_scales)
    return xq, x_scales


NATURAL_ORDER = np.arange(INT8_GROUP)


@njit(cache=True)
def _quantize_activation_groups(x, order, xq, x_scales):
    """Fill xq and x_scales (see :func:`quantize_activations`); xq is stored in ``order``
    (of 32 or 64 elements): xq[first + i] holds element first + order[i] of each chunk."""
    inverses = np.empty(x_scales.shape[1], np.float32)
    for r in range(x.shape[0]):
        for group in range(x_scales.shape[1]):
            largest = np.float32(0)
            for value in x[r, group * INT8_GROUP:(group + 1) * INT8_GROUP]:
                largest = max(largest, abs(value))
            inverses[group] = np.float32(127) / largest if largest > 0 else np.float32(0)
            x_scales[r, group] = largest / np.float32(127 * 127)
        for first in range(0, x.shape[1], order.size):
            for i in range(order.size):
                element = first + order[i]
                xq[r, first + i] = np.int8(np.rint(x[r, element] * inverses[element // INT8_GROUP]))


@njit(parallel=True, cache=True)
def _gemv_int8_avx2(x, xq, x_scales, packed, scales, out_features, blocks_per_row, block_bytes, table, y):
    rows, in_features = x.shape
    order = INT8_ORDER_64 if block_bytes == 32 else INT8_ORDER          # as the intrinsic reads them
    _quantize_activation_groups(x, order, xq, x_scales)
    packed_at, scales_at, part_end = _part_tables(packed, scales, out_features)
    row_bytes = blocks_per_row * block_bytes
    groups = x_scales.shape[1]
    xq_at, xs_at, y_at = xq.ctypes.data, x_scales.ctypes.data, y.ctypes.data
    y_stride = y.strides[0] // 4
    for column in prange(y.shape[1]):   # y may be a view of some columns
        part, row = _part_row(column, part_end, out_features)
        row_packed = packed_at[part] + row * row_bytes
        row_scales = scales_at[part] + 4 * row * blocks_per_row
        r = 0
        while r + ROWS_PER_DECODE <= rows:                 # 4 rows of x share one lookup
            avx2_dot_rows4_int8(row_packed, xq_at + r * in_features, in_features, xs_at + 4 * r * groups,
                                groups, row_scales, blocks_per_row, block_bytes, table.ctypes.data,
                                y_at + 4 * (r * y_stride + column), y_stride)
            r += ROWS_PER_DECODE
        for last in range(r, rows):
            avx2_dot_rows1_int8(row_packed, xq_at + last * in_features, in_features,
                                xs_at + 4 * last * groups, groups, row_scales, blocks_per_row, block_bytes,
                                table.ctypes.data, y_at + 4 * (last * y_stride + column), y_stride)


@njit(parallel=True, cache=True)
def _gemv_int8_portable(x, xq, x_scales, packed, scales, blocks_per_row, block_bytes, table, y):
    _quantize_activation_groups(x, NATURAL_ORDER, xq, x_scales)
    row_bytes = blocks_per_row * block_bytes
    groups_per_block = block_bytes // (INT8_GROUP // 2)
    for o in prange(y.shape[1]):
        row = np.int64(o)
        for r in range(y.shape[0]):
            total = np.float32(0)
            for block in range(blocks_per_row):
                block_sum = np.float32(0)
                for g in range(groups_per_block):
                    group = block * groups_per_block + g
                    first = row * row_bytes + group * (INT8_GROUP // 2)
                    block_sum += np.float32(_int8_dot(packed[first:first + INT8_GROUP // 2],
                                                      xq[r, group * INT8_GROUP:(group + 1) * INT8_GROUP],
                                                      table)) * x_scales[r, group]
                total += block_sum * scales[row * blocks_per_row + block]
            y[r, row] = total


@njit(cache=True)
def _int8_dot(codes, xq, table):
    """Σ table[code_i] · xq_i over one group, exactly in integers."""
    total = 0
    for j in range(codes.size):
        byte = codes[j]
        total += np.int32(table[byte >> 4]) * np.int32(xq[2 * j]) \
            + np.int32(table[byte & 15]) * np.int32(xq[2 * j + 1])
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
    shifts = zero_shifts(scales.size) if shifts is None else shifts
    g = np.ascontiguousarray(g)
    if not simd_applies(blocksize, simd):
        _gemv_t_portable(packed, g, scales, shifts, blocks_per_row, blocksize // 2, codebook, partial)
        return partial.sum(axis=0)
    lookup = decode_table(codebook)
    _gemv_t_simd(packed, g, scales, shifts, blocks_per_row, blocksize // 2, lookup, partial)
    result = np.empty((rows, in_features), np.float32)                 # (rows, in)
    result[:, lane_order(in_features, lookup)] = partial.sum(axis=0)    # undo the lane order
    return result


@njit(parallel=True, cache=True)
def _gemv_t_simd(packed, g, scales, shifts, blocks_per_row, block_bytes, lookup, partial):
    threads, rows, in_features = partial.shape
    out_features = g.shape[1]
    row_bytes = blocks_per_row * block_bytes
    for t in prange(threads):
        out_at = partial[t].ctypes.data
        o, stop = t * out_features // threads, (t + 1) * out_features // threads
        while o < stop:
            row = np.int64(o)
            packed_at = packed.ctypes.data + row * row_bytes
            g_at = g.ctypes.data + 4 * row
            scales_at = scales.ctypes.data + 4 * row * blocks_per_row
            shifts_at = shifts.ctypes.data + 4 * row * blocks_per_row
            if rows == 1 and o + AXPY_W_ROWS <= stop:       # 8 W rows share each load and store of the result
                axpy_wrows(packed_at, row_bytes, out_at, in_features, g_at, out_features, scales_at,
                           shifts_at, blocks_per_row, block_bytes, lookup)
                o += AXPY_W_ROWS
                continue
            r = 0
            while r + ROWS_PER_DECODE <= rows:               # 4 rows of g share one decode
                axpy_rows4(packed_at, row_bytes, out_at + 4 * r * in_features, in_features,
                           g_at + 4 * r * out_features, out_features, scales_at, shifts_at,
                           blocks_per_row, block_bytes, lookup)
                r += ROWS_PER_DECODE
            for last in range(r, rows):
                axpy_rows1(packed_at, row_bytes, out_at + 4 * last * in_features, in_features,
                           g_at + 4 * last * out_features, out_features, scales_at, shifts_at,
                           blocks_per_row, block_bytes, lookup)
            o += 1


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
    """out[i] += coef · (codebook[code_i] − shift) over one block (portable twin of
    :func:`~qlora_np.kernels.x86.dot.axpy_rows1`)."""
    for j in range(codes.size):
        byte = codes[j]
        out[2 * j] += coef * (codebook[byte >> 4] - shift)
        out[2 * j + 1] += coef * (codebook[byte & 15] - shift)


# ---------------------------------------------------------------------------
# Panels (need AVX2): batches of rows decode each strip of W once into a cache-sized buffer
# ---------------------------------------------------------------------------

PANEL_ROWS = 8
"""W rows in one x @ W.T panel: 8 rows × PANEL_DEPTH floats (16 KiB) stay in L1 while every
group of 3 rows of x is multiplied with them."""

PANEL_DEPTH = 512
"""Elements of each W row in one x @ W.T panel (a multiple of 32)."""

PANEL_T_WIDTH = 64
"""Columns of g @ W one thread owns at a time (a multiple of 32; not 128: its decode would
write 8 strips 16 KiB apart)."""

PANEL_T_ROWS = 256
"""W rows in one g @ W panel: each of its strips of 16 columns (16 KiB) stays in L1 while every
group of up to 6 rows of g is multiplied with it."""

PANEL_PAD = STRIP
"""Floats added to the row stride of the x @ W.T buffers, so rows a power of two apart do not
all fall into the same L1 cache set."""


def gemm(x, packed, scales, shifts, codebook, out_features, blocksize):
    """(rows, in) float32 x → (rows, out) float32 x @ W.T, decoding W a panel at a time (needs AVX2).

    For batches too large to share register decodes (:func:`gemv`) but small enough that
    decode + BLAS per tile does not pay: every panel of W (PANEL_ROWS rows × PANEL_DEPTH)
    is decoded once, scaled, and multiplied with all rows of x in 3 × 4 register tiles
    (:func:`qlora_np.kernels.x86.panels.avx2_panel_dot3x4`). Needs :func:`simd_applies`.
    """
    y = np.zeros((x.shape[0], out_features), np.float32)
    panel_arguments = _panel_arguments(packed, scales, shifts, codebook, x.shape[1], blocksize)
    _gemm_simd(np.ascontiguousarray(x), *panel_arguments, y)
    return y


def _panel_arguments(packed, scales, shifts, codebook, in_features, blocksize):
    """The weight's arguments of both panel drivers, after their x or g."""
    shifts = zero_shifts(scales.size) if shifts is None else shifts
    lookup = decode_table(codebook)
    return (packed, scales, shifts, in_features // blocksize, blocksize // 2, lookup,
            lane_order(in_features, lookup), numba.get_num_threads())


@njit(parallel=True, cache=True)
def _gemm_simd(x, packed, scales, shifts, blocks_per_row, block_bytes, lookup, order, threads, y):
    rows, in_features = x.shape
    out_features = y.shape[1]
    x_stride = in_features + PANEL_PAD
    x_ordered = np.empty(rows * x_stride, np.float32)                 # x in lane order, rows padded
    for r in range(rows):
        for i in range(in_features):
            x_ordered[r * x_stride + i] = x[r, order[i]]
    panels = (out_features + PANEL_ROWS - 1) // PANEL_ROWS
    for t in prange(threads):
        panel = np.empty(PANEL_ROWS * (PANEL_DEPTH + PANEL_PAD), np.float32)
        for p in range(t * panels // threads, (t + 1) * panels // threads):
            first_row = p * PANEL_ROWS
            panel_rows = min(PANEL_ROWS, out_features - first_row)
            for first in range(0, in_features, PANEL_DEPTH):
                depth = min(PANEL_DEPTH, in_features - first)
                _decode_panel(packed, scales, shifts, blocks_per_row, block_bytes, lookup,
                              first_row, panel_rows, first, depth, panel, depth + PANEL_PAD, STRIP)
                _panel_dots(x_ordered[first:], x_stride, panel, depth + PANEL_PAD, panel_rows, depth,
                            y[:, first_row:])


@njit(cache=True)
def _decode_panel(packed, scales, shifts, blocks_per_row, block_bytes, lookup, first_row, panel_rows,
                  first, depth, panel, row_stride, strip_stride):
    """W[first_row:first_row + panel_rows, first:first + depth], scaled, into panel (lane order)."""
    row_bytes = blocks_per_row * block_bytes
    first_block = first_row * blocks_per_row
    decode_panel(packed.ctypes.data + first_row * row_bytes, row_bytes,
                 scales.ctypes.data + 4 * first_block, shifts.ctypes.data + 4 * first_block,
                 blocks_per_row, panel_rows, first // 32, depth // 32, block_bytes // BYTES_PER_STEP,
                 lookup, panel.ctypes.data, row_stride, strip_stride)


@njit(cache=True)
def _panel_dots(x, x_stride, panel, panel_stride, panel_rows, depth, y):
    """y[r, o] += Σ_{k < depth} x[r·x_stride + k] · panel[o·panel_stride + k] for every row r of y
    and o < panel_rows, in tiles of 3 rows × 4 panel rows (then 1 × 4, 3 × 1, 1 × 1 at the edges)."""
    rows, y_stride = y.shape[0], y.strides[0] // 4
    x_at, panel_at, y_at, count = x.ctypes.data, panel.ctypes.data, y.ctypes.data, depth // 8
    r = 0
    while r < rows:
        at_x, at_y = x_at + 4 * r * x_stride, y_at + 4 * r * y_stride
        three = r + 3 <= rows
        o = 0
        while o + 4 <= panel_rows:
            at_panel = panel_at + 4 * o * panel_stride
            if three:
                avx2_panel_dot3x4(at_x, x_stride, at_panel, panel_stride, count, at_y + 4 * o, y_stride)
            else:
                avx2_panel_dot1x4(at_x, x_stride, at_panel, panel_stride, count, at_y + 4 * o, y_stride)
            o += 4
        for last in range(o, panel_rows):
            at_panel = panel_at + 4 * last * panel_stride
            if three:
                avx2_panel_dot3x1(at_x, x_stride, at_panel, panel_stride, count, at_y + 4 * last, y_stride)
            else:
                avx2_panel_dot1x1(at_x, x_stride, at_panel, panel_stride, count, at_y + 4 * last, y_stride)
        r += 3 if three else 1


def gemm_t(g, packed, scales, shifts, codebook, in_features, blocksize):
    """(rows, out) float32 g → (rows, in) float32 g @ W, decoding W a panel at a time (needs AVX2).

    Each thread owns PANEL_T_WIDTH columns of the result at a time; for every PANEL_T_ROWS
    rows of W it decodes that strip once and adds g's columns times it into all rows
    (6 × 16 register tiles, :func:`qlora_np.kernels.x86.panels.avx2_panel_axpy6`), reading g from a copy packed in
    the order the tiles use. Needs :func:`simd_applies`.
    """
    result = np.empty((g.shape[0], in_features), np.float32)
    _gemm_t_simd(np.ascontiguousarray(g), *_panel_arguments(packed, scales, shifts, codebook, in_features,
                                                             blocksize), result)
    return result


@njit(cache=True)
def _tile_rows(rows_left):
    """Rows of g the next axpy tile takes: 6 while it can, but 8 rows as 4 + 4 (not 6 + 2: two
    rows make only 4 independent FMA chains), then 4, 2, 1."""
    if rows_left > 8 or rows_left in (6, 7):
        return 6
    if rows_left >= 4:
        return 4
    return 2 if rows_left >= 2 else 1


@njit(parallel=True, cache=True)
def _gemm_t_simd(g, packed, scales, shifts, blocks_per_row, block_bytes, lookup, order, threads, result):
    rows, out_features = g.shape
    in_features = result.shape[1]
    g_packed = np.empty(rows * out_features, np.float32)    # each tile's rows interleaved: (out, tile)
    first = 0
    while first < rows:
        tile = _tile_rows(rows - first)
        for o in range(out_features):
            for r in range(tile):
                g_packed[first * out_features + o * tile + r] = g[first + r, o]
        first += tile
    chunks = (in_features + PANEL_T_WIDTH - 1) // PANEL_T_WIDTH
    for t in prange(threads):
        panel = np.empty(PANEL_T_ROWS * PANEL_T_WIDTH, np.float32)
        sums = np.empty((rows, PANEL_T_WIDTH), np.float32)                    # lane order
        for chunk in range(t * chunks // threads, (t + 1) * chunks // threads):
            first_column = chunk * PANEL_T_WIDTH
            width = min(PANEL_T_WIDTH, in_features - first_column)
            sums[:] = 0
            for first_row in range(0, out_features, PANEL_T_ROWS):
                panel_rows = min(PANEL_T_ROWS, out_features - first_row)
                _decode_panel(packed, scales, shifts, blocks_per_row, block_bytes, lookup,
                              first_row, panel_rows, first_column, width, panel, STRIP, STRIP * panel_rows)
                for strip in range(width // STRIP):
                    _strip_axpys(g_packed, out_features, first_row, panel[strip * STRIP * panel_rows:],
                                 panel_rows, sums[:, strip * STRIP:])
            for r in range(rows):                                             # undo the lane order
                for j in range(width):
                    result[r, order[first_column + j]] = sums[r, j]


@njit(cache=True)
def _strip_axpys(g_packed, out_features, first_row, strip, strip_rows, sums):
    """sums[r, 0:16] += Σ_i g[r, first_row + i] · strip[i, 0:16] for every row r, tile by tile."""
    rows, sums_stride = sums.shape[0], sums.strides[0] // 4
    first = 0
    while first < rows:
        tile = _tile_rows(rows - first)
        g_at = g_packed.ctypes.data + 4 * (first * out_features + first_row * tile)
        out_at = sums.ctypes.data + 4 * first * sums_stride
        if tile == 6:
            avx2_panel_axpy6(g_at, strip.ctypes.data, strip_rows, out_at, sums_stride)
        elif tile == 4:
            avx2_panel_axpy4(g_at, strip.ctypes.data, strip_rows, out_at, sums_stride)
        elif tile == 2:
            avx2_panel_axpy2(g_at, strip.ctypes.data, strip_rows, out_at, sums_stride)
        else:
            avx2_panel_axpy1(g_at, strip.ctypes.data, strip_rows, out_at, sums_stride)
        first += tile
