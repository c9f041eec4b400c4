"""The products of a LoRA layer's adapter gradients: ``h.T @ g`` for a thin h, with g in
float32 or as the bfloat16 pairs a product rounded (summed in float32 either way).

Backward, a LoRA layer needs B's gradient scale · hᵀ g (h = x Aᵀ, g the gradient to y)
and A's gradient (scale · g B)ᵀ x: each sums over all rows of an (rows, r) h times a
tall (rows, n) operand, r = 8 or so. BLAS's sgemm handles such a thin side poorly: it
reads g far slower than one pass over g can. :func:`thin_t_product` walks g once, a strip
of 32 columns at a time, with 8 × 32 sums in sixteen AVX-512 registers: per row, two loads
of g, eight broadcasts of h's row and sixteen FMAs.

Each sum adds its rows in order with one rounding a fused multiply-add, whatever the
thread count (threads share out the strips). The sums differ from BLAS's by float32
rounding only; the plain-NumPy reference is :func:`qlora_np.linalg.reference.thin_t_product`.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from qlora_np.dtypes import bfloat16_from_bits
from qlora_np.errors import ShapeError
from qlora_np.kernels.portable.exp32 import float32_with_bits
from qlora_np.kernels import features

STRIP = 32
"""Columns of g one register tile sums (two 16-lane vectors)."""

RANKS = 8
"""Columns of h one register tile sums at once (8 × 2 vectors: 16 of AVX-512's 32 registers)."""

SMALL = 1 << 15
"""Fewer values of g than this go to BLAS: the threads' start-up would cost more than the pass."""

_F32, _I64 = ir.FloatType(), ir.IntType(64)
_V16F = ir.VectorType(_F32, 16)
_ALL_FIRST = ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16)      # a shuffle broadcasting lane 0


def _make_outer_tile(from_pairs):
    """An intrinsic setting c[0:RANKS, 0:STRIP] = Σ_row h[row, 0:RANKS]ᵀ ⊗ g[row, 0:STRIP],
    rows in order, one FMA each: h and c float32, g float32 or (``from_pairs``) bfloat16
    pairs, STRIP/2 uint32 a row (element 2j in the low half), with the given byte strides
    between rows."""
    @intrinsic
    def outer_tile(typingctx, h_at, h_stride, rows, g_at, g_stride, c_at, c_stride):
        def codegen(context, builder, sig, args):
            h_at, h_stride, rows, g_at, g_stride, c_at, c_stride = args
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3),
                                                 "llvm.fma.v16f32")
            zero = ir.Constant(_V16F, [0.0] * 16)
            sums = [[cgutils.alloca_once_value(builder, zero) for _ in range(STRIP // 16)] for _ in range(RANKS)]
            with cgutils.for_range(builder, rows) as loop:
                g_row = builder.inttoptr(builder.add(g_at, builder.mul(loop.index, g_stride)), _V16I.as_pointer())
                h_row = builder.inttoptr(builder.add(h_at, builder.mul(loop.index, h_stride)), _F32.as_pointer())
                if from_pairs:                       # the low halves are the even columns, the high the odd
                    pairs = builder.load(g_row, align=4)
                    strip = [builder.bitcast(builder.shl(pairs, _SIXTEEN), _V16F),
                             builder.bitcast(builder.and_(pairs, _HIGH_HALVES), _V16F)]
                else:
                    strip = [builder.bitcast(builder.load(builder.gep(g_row, [ir.Constant(_I64, v)]), align=4),
                                             _V16F) for v in range(STRIP // 16)]
                for rank, rank_sums in enumerate(sums):
                    value = builder.load(builder.gep(h_row, [ir.Constant(_I64, rank)]))
                    broadcast = builder.insert_element(ir.Constant(_V16F, None), value, ir.Constant(_I64, 0))
                    broadcast = builder.shuffle_vector(broadcast, broadcast, _ALL_FIRST)
                    for vector, total in zip(strip, rank_sums):
                        builder.store(builder.call(fma, [broadcast, vector, builder.load(total)]), total)
            for rank, rank_sums in enumerate(sums):
                c_row = builder.inttoptr(builder.add(c_at, builder.mul(ir.Constant(_I64, rank), c_stride)),
                                         _V16F.as_pointer())
                vectors = [builder.load(total) for total in rank_sums]
                if from_pairs:                       # even and odd columns back in order
                    vectors = [builder.shuffle_vector(vectors[0], vectors[1], order) for order in _INTERLEAVE]
                for v, vector in enumerate(vectors):
                    builder.store(vector, builder.gep(c_row, [ir.Constant(_I64, v)]), align=4)
            return context.get_dummy_value()
        return types.void(*([types.intp] * 7)), codegen
    return outer_tile


_V16I = ir.VectorType(ir.IntType(32), 16)
_SIXTEEN = ir.Constant(_V16I, [16] * 16)
_HIGH_HALVES = ir.Constant(_V16I, [0xFFFF0000 - (1 << 32)] * 16)
_INTERLEAVE = [ir.Constant(_V16I, [half * 8 + i // 2 + 16 * (i % 2) for i in range(16)]) for half in range(2)]
_outer_tile = _make_outer_tile(from_pairs=False)
_outer_tile_from_pairs = _make_outer_tile(from_pairs=True)


@njit(cache=True)
def _strip_sums(h, g, first, out):
    """out[:, first:] = h.T @ g[:, first:] for the last columns (fewer than STRIP), in row
    order (a multiply and an add each: Numba has no scalar FMA); g float32, or bfloat16
    pairs (uint32) whose out.shape[1] first values are g's columns."""
    for rank in range(h.shape[1]):
        for column in range(first, out.shape[1]):
            total = np.float32(0)
            for row in range(g.shape[0]):
                total += h[row, rank] * _value(g, row, column)
            out[rank, column] = total


def _holds_pairs(g):
    """Whether g is bfloat16 pairs (uint32) rather than float32 values."""
    return g.dtype == np.uint32


@overload(_holds_pairs)
def _holds_pairs_in_numba(g):
    holds = g.dtype == types.uint32
    return lambda g: holds


def _value(g, row, column):
    """g[row, column] of a float32 g, or the column-th bfloat16 value of a row of pairs."""
    return _pair_values(g[row:row + 1], column + 1)[0, column] if _holds_pairs(g) else g[row, column]


@overload(_value)
def _value_in_numba(g, row, column):
    if g.dtype == types.uint32:
        def from_pairs(g, row, column):
            pair = g[row, column // 2]
            return float32_with_bits(pair << np.uint32(16) if column % 2 == 0 else pair & np.uint32(0xFFFF0000))
        return from_pairs
    return lambda g, row, column: g[row, column]


@njit(parallel=True, cache=True)
def _thin_t_products(h, g, out, threads):
    """out (r, n) = h (rows, r)ᵀ @ g, r a multiple of RANKS, g (rows, n) float32 or its
    bfloat16 pairs (rows, ≥ n/2): each thread takes whole strips of STRIP columns; the
    last partial strip after."""
    rows, n = g.shape[0], out.shape[1]
    strips = n // STRIP
    strip_bytes = 4 * STRIP // 2 if _holds_pairs(g) else 4 * STRIP
    for t in prange(threads):
        for strip in range(t * strips // threads, (t + 1) * strips // threads):
            for rank in range(0, h.shape[1], RANKS):
                h_at, c_at = h.ctypes.data + 4 * rank, out.ctypes.data + rank * out.strides[0] + 4 * STRIP * strip
                if _holds_pairs(g):
                    _outer_tile_from_pairs(h_at, h.strides[0], rows, g.ctypes.data + strip_bytes * strip,
                                           g.strides[0], c_at, out.strides[0])
                else:
                    _outer_tile(h_at, h.strides[0], rows, g.ctypes.data + strip_bytes * strip, g.strides[0],
                                c_at, out.strides[0])
    _strip_sums(h, g, strips * STRIP, out)


def thin_t_product(h, g, columns=None):
    """h.T @ g for a thin h (rows, r) float32 and g (rows, n) float32 → (r, n) float32; or
    for g as bfloat16 pairs (rows, ≥ n/2) uint32 (:func:`qlora_np.kernels.bf16.rounded_rows`, a layer's
    input kept at half the bytes) of which the first ``columns`` = n values are g's.

    With AVX-512 a Numba pass over g (see the module); for a small float32 g, or without
    AVX-512 (whose 32 registers the tile needs), NumPy's BLAS (on the pairs' values); for
    a float64 h or g, NumPy's BLAS in float64."""
    pairs = _holds_pairs(g)
    n = (columns or 0) if pairs else g.shape[-1]
    if h.ndim != 2 or g.ndim != 2 or h.shape[0] != g.shape[0] or (pairs and not 0 < n <= 2 * g.shape[1]):
        raise ShapeError(f"h (rows, r) and g (rows, n) or its pairs (rows, ≥ n/2) must share their rows, "
                         f"got {h.shape} and {g.shape} (n = {n})")
    if not pairs and (not features.HAS_AVX512 or h.dtype != np.float32 or g.dtype != np.float32 or g.size < SMALL):
        return h.T @ g
    if not features.HAS_AVX512:
        return h.T @ _pair_values(g, n)
    h = np.asarray(h, np.float32)
    rank = h.shape[1]
    padded = np.zeros((h.shape[0], -(-rank // RANKS) * RANKS), np.float32)      # (rows, r to RANKS)
    padded[:, :rank] = h
    g = g if g.strides[1] == g.itemsize else np.ascontiguousarray(g)
    out = np.empty((padded.shape[1], n), np.float32)                            # (r to RANKS, n)
    _thin_t_products(padded, g, out, max(1, min(numba.get_num_threads(), n // STRIP)))
    return out[:rank]


def _pair_values(pairs, n):
    """The first n bfloat16 values of each row of pairs (rows, ≥ n/2) uint32, as float32
    (a pair's low half is the even value: the row's bfloat16 bits in order)."""
    bits = np.ascontiguousarray(pairs).view(np.uint16)                       # (rows, 2 · pairs)
    return bfloat16_from_bits(bits[:, :n]).astype(np.float32)
