"""bfloat16 products for large batches: ``a @ b`` with a and b rounded to bfloat16 and
summed in float32, as bitsandbytes computes with ``compute_dtype=bfloat16``.

Where the CPU has AVX-512 BF16 (AMD Zen 4, Intel Cooper Lake and Sapphire Rapids) one
``vdpbf16ps`` adds two bfloat16 products into each of 16 float32 sums: twice the
multiply-adds of a float32 FMA, enough to pay for the rounding and packing on the training
shapes. Elsewhere the same roundings are multiplied by NumPy's float32 BLAS (the products
of two bfloat16 values are exact in float32), which gives the same result up to float32
summation order.

Layout: a is rounded into (rows, k/2) uint32 *pairs* (element 2j in the low half, 2j + 1
in the high half), which is a's row-major bfloat16 bytes; b is packed a panel of PANEL
columns at a time, ``panel[j, c]`` = the pair (b[2j, PANEL·p + c], b[2j + 1, PANEL·p + c]).
A register tile then multiplies TILE_ROWS rows of a with one panel: per pair of k, one
broadcast of each row's pair and one ``vdpbf16ps`` per 16 columns.

A 4-bit W's panels are decoded straight from its codes (:func:`times_weight_t`,
:func:`times_weight`): no float32 copy of W is made, and the values are those of
:func:`matmul_bf16` on the dequantized W, byte for byte. :func:`batched_matmul_bf16`
spreads many small products (attention's) over the threads a panel at a time.
"""

from typing import NamedTuple

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qlora_np.errors import ShapeError
from qlora_np.kernels import features
from qlora_np.kernels.x86 import amx
from qlora_np.kernels.x86.dequantize import avx512_dequantize_blocks
"""Whether this CPU has ``vdpbf16ps`` (detected once at import)."""

PANEL = 32
"""Columns of b in one panel: two 16-lane vectors of float32 sums a row."""

TILE_ROWS = 6
"""Rows of a one register tile multiplies with a panel (12 sums of 16 lanes in registers)."""

PACKED_AT_ONCE = 8
"""Panels of a float32 b the AMX driver packs before multiplying all rows with them
(8 × depth × 128 bytes: 288 KB for k = 576, in L2)."""

_ROUNDING_BIAS = np.uint32(0x7FFF)
_QUIET_NAN = np.uint32(0x40)


# ---------------------------------------------------------------------------
# Rounding to bfloat16 (round to nearest, ties to even, as torch and vcvtneps2bf16 do)
# ---------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _bfloat16_bits(bits):
    """float32 bits (uint32) → the 16 bits of the nearest bfloat16; NaN stays a (quiet) NaN."""
    if bits & np.uint32(0x7FFFFFFF) > np.uint32(0x7F800000):
        return (bits >> np.uint32(16)) | _QUIET_NAN
    return (bits + _ROUNDING_BIAS + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@njit(parallel=True, cache=True)
def round_pairs(a, pairs):
    """a (rows, k) float32 → pairs (rows, ceil(k/2)) uint32: a rounded to bfloat16, two a
    uint32 (an odd k's last pair has a zero high half)."""
    for r in prange(a.shape[0]):
        round_row_pairs(a[r], pairs[r])


@njit(cache=True, inline="always")
def round_row_pairs(values, pairs):
    """One row of :func:`round_pairs`: values (k,) float32 → pairs (ceil(k/2),) uint32."""
    k = values.size
    bits = values.view(np.uint32)
    for j in range(k // 2):
        pairs[j] = _bfloat16_bits(bits[2 * j]) | (_bfloat16_bits(bits[2 * j + 1]) << np.uint32(16))
    if k % 2:
        pairs[k // 2] = _bfloat16_bits(bits[k - 1])


@njit(cache=True)
def pack_panel(b, p, panel):
    """Panel p of b (k, n) float32, any strides → panel (ceil(k/2), PANEL) uint32: the
    bfloat16 pairs (b[2j, PANEL·p + c], b[2j + 1, PANEL·p + c]), zero past b's edges.
    (Pairs of b's rows in the outer loop: whether b is W or W.T, the 2 × PANEL values
    read stay within a few cache lines.)"""
    k, n = b.shape
    columns = min(PANEL, n - p * PANEL)
    for j in range(panel.shape[0]):
        for c in range(columns):
            pair = _bfloat16_bits(np.float32(b[2 * j, p * PANEL + c]).view(np.uint32))
            if 2 * j + 1 < k:
                high = np.float32(b[2 * j + 1, p * PANEL + c]).view(np.uint32)
                pair |= _bfloat16_bits(high) << np.uint32(16)
            panel[j, c] = pair
        for c in range(columns, PANEL):
            panel[j, c] = 0


@njit(parallel=True, cache=True)
def round_to_bfloat16(a, out):
    """out (rows, k) float32 = a (rows, k) float32 rounded to bfloat16 (the portable path's operands)."""
    for r in prange(a.shape[0]):
        bits, rounded = a[r].view(np.uint32), out[r].view(np.uint32)
        for i in range(bits.size):
            rounded[i] = _bfloat16_bits(bits[i]) << np.uint32(16)


# ---------------------------------------------------------------------------
# Panels straight from a 4-bit W (out, in) of whole-block rows: no float32 copy of W
# ---------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _decode_row(packed, absmax, shift, blocksize, table, row, values):
    """values (in,) float32 = row ``row`` of W, whole blocks decoded as :func:`qlora_np.kernels.blockwise.dequantize_4bit` does."""
    blocks_per_row = values.size // blocksize
    first_block = row * blocks_per_row
    avx512_dequantize_blocks(packed.ctypes.data + first_block * (blocksize // 2),
                             absmax.ctypes.data + 4 * first_block, shift.ctypes.data + 4 * first_block,
                             blocks_per_row, blocksize // 2, table, values.ctypes.data)


@njit(cache=True, inline="always")
def _pair_bits(low, high):
    """float32 bits (uint32) of two values → their bfloat16 pair (low in the low half)."""
    return _bfloat16_bits(low) | (_bfloat16_bits(high) << np.uint32(16))


@njit(parallel=True, cache=True)
def pack_weight_rows(packed, absmax, shift, blocksize, table, in_features, first_row, end_row, panels):
    """The panels of b = W[first_row : end_row].T, for x @ W.T: panels (count, ≥ in/2, PANEL)
    uint32, ``panels[p, j, c]`` = the bfloat16 pair (W[r, 2j], W[r, 2j + 1]) of row
    r = first_row + PANEL·p + c, zero from end_row on (pair-rows past in/2 are left as they
    are). A panel's rows are decoded first, then its pairs are written in order."""
    count, depth = panels.shape[0], in_features // 2
    for p in prange(count):
        values = np.empty(2 * depth, np.float32)                            # (in,) one row of W
        row_pairs = np.zeros((PANEL, depth), np.uint32)                     # (PANEL, in/2) its rows' pairs
        for c in range(min(PANEL, end_row - first_row - PANEL * p)):
            _decode_row(packed, absmax, shift, blocksize, table, first_row + PANEL * p + c, values)
            round_row_pairs(values, row_pairs[c])
        for j0 in range(0, depth, 16):                                      # transposed in 16 × 16 squares
            for c0 in range(0, PANEL, 16):
                for j in range(j0, min(depth, j0 + 16)):
                    for c in range(c0, c0 + 16):
                        panels[p, j, c] = row_pairs[c, j]


@njit(parallel=True, cache=True)
def pack_weight_columns(packed, absmax, shift, blocksize, table, in_features, first_row, rows, panels,
                        threads):
    """The panels of b = W[first_row : first_row + rows], for g @ W: panels
    (ceil(in/PANEL), ceil(rows/2), PANEL) uint32, ``panels[p, j, c]`` = the bfloat16 pair
    (W[first_row + 2j, PANEL·p + c], W[first_row + 2j + 1, PANEL·p + c]); zero past W's
    edges (pair-rows past rows/2 are left as they are). Each two decoded rows fill one
    pair-row of every panel."""
    count, depth = panels.shape[0], -(-rows // 2)
    for t in prange(threads):
        low, high = np.empty(in_features, np.float32), np.zeros(in_features, np.float32)
        low_bits, high_bits = low.view(np.uint32), high.view(np.uint32)
        for j in range(t * depth // threads, (t + 1) * depth // threads):
            _decode_row(packed, absmax, shift, blocksize, table, first_row + 2 * j, low)
            if 2 * j + 1 < rows:
                _decode_row(packed, absmax, shift, blocksize, table, first_row + 2 * j + 1, high)
            else:
                high[:] = 0
            for p in range(count):
                columns = min(PANEL, in_features - PANEL * p)
                for c in range(columns):
                    panels[p, j, c] = _pair_bits(low_bits[PANEL * p + c], high_bits[PANEL * p + c])
                panels[p, j, columns:] = 0


# ---------------------------------------------------------------------------
# The register tile (AVX-512 BF16)
# ---------------------------------------------------------------------------

_F32, _I32, _I64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
_V16F, _V16I = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16)


def _make_tile(rows):
    """An intrinsic setting c[r, 0:PANEL] = Σ_j a_pairs[r, j] · panel[j] for ``rows`` rows.

    llvmlite has no bfloat16 type, so ``vdpbf16ps`` (which LLVM declares on bfloat16
    vectors) is written as inline assembly on the pairs' 32-bit lanes.
    """
    @intrinsic
    def tile(typingctx, a_at, a_stride, panel_at, depth, c_at, c_stride):
        signature = types.void(*([types.intp] * 6))

        def codegen(context, builder, sig, args):
            a_at, a_stride, panel_at, depth, c_at, c_stride = args
            dot = ir.InlineAsm(ir.FunctionType(_V16F, [_V16F, _V16I, _V16I]), "vdpbf16ps $3, $2, $0",
                               "=v,0,v,v")

            def row_address(at, stride, r):
                return builder.add(at, builder.mul(ir.Constant(_I64, 4 * r), stride))

            a_rows = [builder.inttoptr(row_address(a_at, a_stride, r), _I32.as_pointer())
                      for r in range(rows)]
            panel = builder.inttoptr(panel_at, _V16I.as_pointer())
            sums = [[cgutils.alloca_once_value(builder, ir.Constant(_V16F, [0.0] * 16)) for _ in range(2)]
                    for _ in range(rows)]
            with cgutils.for_range(builder, depth) as loop:
                j = loop.index
                pair_index = builder.add(j, j)
                columns = [builder.load(builder.gep(panel, [builder.add(pair_index, ir.Constant(_I64, h))]),
                                        align=4) for h in range(2)]
                for a_row, row_sums in zip(a_rows, sums):
                    a_pair = builder.load(builder.gep(a_row, [j]))
                    pair = builder.insert_element(ir.Constant(_V16I, None), a_pair, ir.Constant(_I32, 0))
                    pair = builder.shuffle_vector(pair, pair, ir.Constant(_V16I, [0] * 16))
                    for half, total in zip(columns, row_sums):
                        builder.store(builder.call(dot, [builder.load(total), pair, half]), total)
            for r, row_sums in enumerate(sums):
                c_row = builder.inttoptr(row_address(c_at, c_stride, r), _V16F.as_pointer())
                for h, total in enumerate(row_sums):
                    builder.store(builder.load(total), builder.gep(c_row, [ir.Constant(_I64, h)]), align=4)
            return context.get_dummy_value()

        return signature, codegen

    return tile


if features.HAS_AVX512_BF16:
    llvm.initialize_native_asmparser()      # Numba's code generator needs it for inline assembly
_tile_rows6 = _make_tile(TILE_ROWS)
_tile_row1 = _make_tile(1)


@njit(cache=True, inline="always")
def _rows_times_panel(a_at, a_stride, rows, depth, panel_at, c_at, c_stride):
    """c[:, panel's columns] = a_pairs (rows, depth; row stride a_stride pairs) @ one packed
    panel, TILE_ROWS rows at a time."""
    r = 0
    while r + TILE_ROWS <= rows:
        _tile_rows6(a_at + 4 * r * a_stride, a_stride, panel_at, depth, c_at + 4 * r * c_stride, c_stride)
        r += TILE_ROWS
    for last in range(r, rows):
        _tile_row1(a_at + 4 * last * a_stride, a_stride, panel_at, depth, c_at + 4 * last * c_stride, c_stride)


@njit(parallel=True, cache=True)
def _panel_products(pairs, b, c, c_stride, threads):
    """c (rows, ≥ n, row stride c_stride floats) = pairs @ b, b (k, n) float32, in panels
    of PANEL columns (c must have room for the last panel's whole width). Each thread
    packs its panels one at a time into its own buffer, which stays in the cache while
    every row of a streams past it."""
    rows, depth = pairs.shape
    count = -(-b.shape[1] // PANEL)
    for t in prange(threads):
        panel = amx.empty_aligned((depth, PANEL), np.uint32)
        for p in range(t * count // threads, (t + 1) * count // threads):
            pack_panel(b, p, panel)
            _rows_times_panel(pairs.ctypes.data, pairs.strides[0] // 4, rows, depth, panel.ctypes.data,
                              c.ctypes.data + 4 * p * PANEL, c_stride)


@njit(parallel=True, cache=True)
def _packed_panel_products(pairs, panels, c, c_stride, threads):
    """:func:`_panel_products` for panels packed beforehand: panels (count, depth, PANEL)."""
    rows, depth = pairs.shape
    count = panels.shape[0]
    for t in prange(threads):
        for p in range(t * count // threads, (t + 1) * count // threads):
            _rows_times_panel(pairs.ctypes.data, pairs.strides[0] // 4, rows, depth, panels[p].ctypes.data,
                              c.ctypes.data + 4 * p * PANEL, c_stride)


@njit(parallel=True, cache=True)
def _amx_panel_products(pairs, b, c, c_stride, threads):
    """:func:`_panel_products` with AMX tiles (:mod:`qlora_np.kernels.x86.amx`), packing PACKED_AT_ONCE panels
    at a time and multiplying every row with them while they are in the cache; c's row
    stride is its own."""
    rows, depth = pairs.shape
    count = -(-b.shape[1] // PANEL)
    for t in prange(threads):
        panels, config = amx.empty_aligned((PACKED_AT_ONCE, depth, PANEL), np.uint32), amx.tile_config()
        amx.start(config)
        end = (t + 1) * count // threads
        for first in range(t * count // threads, end, PACKED_AT_ONCE):
            size = min(PACKED_AT_ONCE, end - first)
            for i in range(size):
                pack_panel(b, first + i, panels[i])
            amx.rows_times_panels(pairs, panels[:size], c[:, first * PANEL:(first + size) * PANEL])
        amx.stop()


@njit(parallel=True, cache=True)
def _amx_thin_products(pairs, b, c, c_stride, threads):
    """:func:`_amx_panel_products` for a b of one panel (n ≤ PANEL: a LoRA adapter's x @ A.T):
    the rows are shared out instead, each thread packing the panel for itself (sharing out
    panels would leave the one panel, and so all the rows, to one thread, which reads them
    from beyond its L2)."""
    rows, depth = pairs.shape
    blocks = -(-rows // amx.BLOCK_ROWS)
    for t in prange(threads):
        first = t * blocks // threads * amx.BLOCK_ROWS
        end = min(rows, (t + 1) * blocks // threads * amx.BLOCK_ROWS)
        panel = amx.empty_aligned((1, depth, PANEL), np.uint32)
        pack_panel(b, 0, panel[0])
        amx.start(amx.tile_config())
        amx.rows_times_panels(pairs[first:end], panel, c[first:end, :PANEL])
        amx.stop()


@njit(parallel=True, cache=True)
def _amx_packed_panel_products(pairs, panels, c, c_stride, threads):
    """:func:`_packed_panel_products` with AMX tiles; c's row stride is its own. (Sharing
    out a's rows instead of the panels, so that each core reads the rows it rounded, was
    tried: 1.64–1.86 s of products over three SmolLM2 steps against 1.63–1.67, no gain.)"""
    count = panels.shape[0]
    for t in prange(threads):
        first, end = t * count // threads, (t + 1) * count // threads
        amx.start(amx.tile_config())
        amx.rows_times_panels(pairs, panels[first:end], c[:, first * PANEL:end * PANEL])
        amx.stop()


# ---------------------------------------------------------------------------
# The product
# ---------------------------------------------------------------------------

def rounded_rows(a, simd=None, rank=0):
    """What :func:`matmul_bf16` takes as a: (rows, k) float32 → its bfloat16 pairs (AVX-512
    BF16) or its bfloat16 values as float32 (portable). Round once, multiply many times.

    ``rank`` > 0 (pairs only) leaves room after a's pairs for a low-rank term h (rows, rank),
    which :func:`put_low_rank` fills, so that :func:`times_weight_t` and :func:`times_weight`
    add h @ e in the same product."""
    a = np.asarray(a, np.float32)
    if a.strides[-1] != 4:                                   # rows may be apart (W's ranges of g's columns)
        a = np.ascontiguousarray(a)
    if features.HAS_AVX512_BF16 if simd is None else simd:
        pairs = amx.empty_aligned((a.shape[0], (a.shape[1] + 1) // 2 + low_rank_pairs(rank)), np.uint32)
        round_pairs(a, pairs)
        return pairs
    if rank:
        raise ShapeError("a low-rank term rides only in bfloat16 pairs (AVX-512 BF16)")
    rounded = np.empty_like(a)
    round_to_bfloat16(a, rounded)
    return rounded


def matmul_bf16(a_rounded, b, out=None):
    """a @ b in bfloat16 with float32 sums: ``a_rounded`` from :func:`rounded_rows` (rows, k),
    b (k, n) float32 with any strides → (rows, n) float32, written into ``out`` (a view
    with unit column stride, e.g. some columns of a larger result) when given."""
    k, n = b.shape
    rows = a_rounded.shape[0]
    if a_rounded.shape[1] != (k if a_rounded.dtype == np.float32 else (k + 1) // 2):
        raise ShapeError(f"rounded a of shape {a_rounded.shape} does not match b of shape {b.shape}")
    if out is None:
        out = amx.empty_aligned((rows, n), np.float32)
    if a_rounded.dtype == np.float32:                               # portable: BLAS on rounded values
        b_rounded = np.empty(b.shape, np.float32)
        round_to_bfloat16(np.ascontiguousarray(b, np.float32), b_rounded)
        np.matmul(a_rounded, b_rounded, out=out)
        return out
    products, threads = _panel_products, None
    if amx.fits(a_rounded.shape[1]):
        products = _amx_panel_products
        if n <= PANEL:
            products, threads = _amx_thin_products, numba.get_num_threads()
    _products_into(out, n, lambda c, c_stride, threads: products(a_rounded, b, c, c_stride, threads), threads)
    return out


def _products_into(out, n, products, threads=None):
    """Run ``products(c, c_stride, threads)`` (a panel driver writing n columns) into out
    (rows, n), through a padded buffer when out has no room for a last partial panel;
    ``threads`` by default one a panel, at most Numba's."""
    threads = threads or min(numba.get_num_threads(), -(-n // PANEL))
    if n % PANEL == 0 and out.strides[1] == 4 and out.strides[0] % 4 == 0:
        products(out, out.strides[0] // 4, threads)
        return
    padded = amx.empty_aligned((out.shape[0], -(-n // PANEL) * PANEL), np.float32)   # room for the last panel
    products(padded, padded.shape[1], threads)
    out[...] = padded[:, :n]


# ---------------------------------------------------------------------------
# Products with a 4-bit W, its panels decoded straight from the codes
# ---------------------------------------------------------------------------

class Weight4bit(NamedTuple):
    """A 4-bit W (out, in) as the kernels read it: packed codes, float32 block scales and
    shifts (zeros for codebook formats), the permute decode's table, block size and shape."""
    packed: np.ndarray
    scales: np.ndarray
    shifts: np.ndarray
    table: np.ndarray
    blocksize: int
    shape: tuple


def decodes_4bit(shape, blocksize):
    """Whether :func:`times_weight_t` / :func:`times_weight` apply: AVX-512 BF16 and the
    permute decode here (read at each call from :mod:`qlora_np.kernels.features`), and W's rows
    made of whole blocks of a multiple of 16 values."""
    return (features.HAS_AVX512_BF16 and features.PERMUTE_DECODE and len(shape) == 2 and blocksize % 16 == 0
            and shape[1] % blocksize == 0)


def times_weight_t(a_pairs, weight, first_row, rows, out, low_rank=None):
    """out (n, rows) = a @ W[first_row : first_row + rows].T in bfloat16, a as its pairs
    (:func:`rounded_rows`): the same values as :func:`matmul_bf16` on the decoded W.
    With ``low_rank`` e (r, out), plus h @ e[:, first_row : first_row + rows] for the h
    whose pairs follow a's (:func:`put_low_rank`)."""
    out_features, in_features = weight.shape
    panels = amx.empty_aligned((-(-rows // PANEL), _depth(a_pairs, in_features // 2, low_rank), PANEL),
                               np.uint32)
    pack_weight_rows(weight.packed, weight.scales, weight.shifts, weight.blocksize, weight.table,
                     in_features, first_row, min(out_features, first_row + rows), panels)
    if low_rank is not None:
        pack_low_rank(low_rank[:, first_row:first_row + rows], in_features // 2, panels)
    _products_into(out, rows, lambda c, c_stride, threads:
                   _packed_products(a_pairs, panels, c, c_stride, threads))
    return out


def times_weight(a_pairs, weight, first_row, rows, out, low_rank=None):
    """out (n, in) = a @ W[first_row : first_row + rows] in bfloat16, a (n, rows) as its
    pairs (:func:`rounded_rows`): the same values as :func:`matmul_bf16` on the decoded W.
    With ``low_rank`` e (r, in), plus h @ e for the h whose pairs follow a's."""
    in_features, own = weight.shape[1], -(-rows // 2)
    panels = amx.empty_aligned((-(-in_features // PANEL), _depth(a_pairs, own, low_rank), PANEL), np.uint32)
    pack_weight_columns(weight.packed, weight.scales, weight.shifts, weight.blocksize, weight.table,
                        in_features, first_row, rows, panels, min(numba.get_num_threads(), own))
    if low_rank is not None:
        pack_low_rank(low_rank, own, panels)
    _products_into(out, in_features, lambda c, c_stride, threads:
                   _packed_products(a_pairs, panels, c, c_stride, threads))
    return out


def put_low_rank(pairs, h, scale=1.0):
    """Round scale · h (rows, r) into the room :func:`rounded_rows` left after a's pairs (zero past h's)."""
    own = pairs.shape[1] - low_rank_pairs(h.shape[1])
    if h.shape[0] != pairs.shape[0] or own < 0:
        raise ShapeError(f"a low-rank term {h.shape} does not fit pairs {pairs.shape}")
    round_pairs(np.float32(scale) * np.asarray(h, np.float32), pairs[:, own:])
    pairs[:, own + (h.shape[1] + 1) // 2:] = 0


def low_rank_pairs(rank):
    """Pair columns a low-rank term of rank ``rank`` takes after a's own: whole AMX tile
    steps, so that a's depth still fits the tiles where it did."""
    return -(-rank // (2 * amx.STEP_PAIRS)) * amx.STEP_PAIRS


def _depth(a_pairs, own, low_rank):
    """The pairs of k in a product of ``a_pairs`` with W's ``own`` and the low-rank term's; or a ShapeError."""
    depth = own + (0 if low_rank is None else low_rank_pairs(low_rank.shape[0]))
    if a_pairs.shape[1] != depth:
        raise ShapeError(f"a has {a_pairs.shape[1]} pairs of k where W (and a low-rank term) take {depth}")
    return depth


@njit(cache=True)
def pack_low_rank(e, first_pair, panels):
    """Pair-rows first_pair … of the panels (count, depth, PANEL) = the panels of e (r, n)
    float32, any strides, zero past r: the rows of b that multiply a low-rank term's pairs.
    Serial: a few rows are not worth waking the threads."""
    filled = (e.shape[0] + 1) // 2
    for p in range(panels.shape[0]):
        pack_panel(e, p, panels[p, first_pair:first_pair + filled])
        panels[p, first_pair + filled:] = 0


def _packed_products(pairs, panels, c, c_stride, threads):
    """The driver for panels packed beforehand: AMX tiles where they fit, else AVX-512 BF16."""
    products = _amx_packed_panel_products if amx.fits(pairs.shape[1]) else _packed_panel_products
    products(pairs, panels, c, c_stride, threads)


# ---------------------------------------------------------------------------
# Batches of small products (attention's, one per batch row and kv head)
# ---------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def _batched_panel_products(pairs, b, c, c_stride):
    """c[g] = pairs[g] @ b[g] for every g: pairs (G, rows, depth), b (G, k, n) float32 any
    strides, c (G, rows, ≥ n rounded up to whole panels) with row stride c_stride floats.
    Each (g, panel) pair is one task, so many small products share the threads evenly."""
    groups, rows, depth = pairs.shape
    count = -(-b.shape[2] // PANEL)
    for task in prange(groups * count):
        g, p = task // count, task % count
        panel = amx.empty_aligned((depth, PANEL), np.uint32)
        pack_panel(b[g], p, panel)
        _rows_times_panel(pairs[g].ctypes.data, depth, rows, depth, panel.ctypes.data,
                          c[g].ctypes.data + 4 * p * PANEL, c_stride)


@njit(parallel=True, cache=True)
def _amx_batched_panel_products(pairs, b, c, c_stride):
    """:func:`_batched_panel_products` with AMX tiles; c's row stride is its own."""
    groups, rows, depth = pairs.shape
    count = -(-b.shape[2] // PANEL)
    for task in prange(groups * count):
        g, p = task // count, task % count
        panel = amx.empty_aligned((1, depth, PANEL), np.uint32)
        pack_panel(b[g], p, panel[0])
        amx.start(amx.tile_config())
        amx.rows_times_panels(pairs[g], panel, c[g, :, p * PANEL:(p + 1) * PANEL])
        amx.stop()


def batched_matmul_bf16(a, b, out=None):
    """a (..., m, k) @ b (..., k, n) in bfloat16 with float32 sums, for a and b with the same
    leading shape and any strides → (..., m, n) float32, written into ``out`` when given.
    Where the CPU lacks AVX-512 BF16, NumPy's float32 products of the rounded values."""
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ShapeError(f"cannot multiply batches of shapes {a.shape} and {b.shape}")
    (m, k), n = a.shape[-2:], b.shape[-1]
    if out is None:
        out = amx.empty_aligned(a.shape[:-1] + (n,), np.float32)
    if not features.HAS_AVX512_BF16:
        rounded_a, rounded_b = np.empty(a.shape, np.float32), np.empty(b.shape, np.float32)
        round_to_bfloat16(np.ascontiguousarray(a, np.float32).reshape(-1, k), rounded_a.reshape(-1, k))
        round_to_bfloat16(np.ascontiguousarray(b, np.float32).reshape(-1, n), rounded_b.reshape(-1, n))
        return np.matmul(rounded_a, rounded_b, out=out)
    pairs = rounded_rows(a.reshape(-1, k)).reshape(-1, m, (k + 1) // 2)        # (G, m, k/2)
    groups = pairs.shape[0]
    b3 = b.reshape(groups, k, n)
    c = out.view()
    try:
        c.shape = (groups, m, n)                                              # a view of out, or none
        fits = n % PANEL == 0 and c.strides[2] == 4 and c.strides[1] % 4 == 0
    except AttributeError:
        fits = False
    if not fits:
        c = amx.empty_aligned((groups, m, -(-n // PANEL) * PANEL), np.float32)
    products = _amx_batched_panel_products if amx.fits(pairs.shape[2]) else _batched_panel_products
    products(pairs, b3, c, c.strides[1] // 4)
    if not fits:
        out[...] = c[:, :, :n].reshape(out.shape)
    return out
