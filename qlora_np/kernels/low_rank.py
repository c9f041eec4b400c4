"""The float32 products of a LoRA layer's adapter gradients: ``h.T @ g`` for a thin h.

Backward, a LoRA layer needs B's gradient scale · hᵀ g (h = x Aᵀ, g the gradient to y)
and A's gradient (scale · g B)ᵀ x: each sums over all rows of an (rows, r) h times a
tall (rows, n) operand, r = 8 or so. BLAS's sgemm handles such a thin side poorly: on
1024 × 1536 it took 0.45–0.53 ms, reading g at ~13 GB/s, where one pass over g runs at
~37 GB/s here. :func:`thin_t_product` walks g once, a strip of 32 columns at a time, with
8 × 32 sums in sixteen AVX-512 registers: per row, two loads of g, eight broadcasts of
h's row and sixteen FMAs.

Each sum adds its rows in order with one rounding a fused multiply-add, whatever the
thread count (threads share out the strips). The sums differ from BLAS's by float32
rounding only; the plain-NumPy reference is :func:`qlora_np.reference.thin_t_product`.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import ShapeError
from .simd import HAS_AVX512

STRIP = 32
"""Columns of g one register tile sums (two 16-lane vectors)."""

RANKS = 8
"""Columns of h one register tile sums at once (8 × 2 vectors: 16 of AVX-512's 32 registers)."""

SMALL = 1 << 15
"""Fewer values of g than this go to BLAS: the threads' start-up would cost more than the pass."""

_F32, _I64 = ir.FloatType(), ir.IntType(64)
_V16F = ir.VectorType(_F32, 16)
_ALL_FIRST = ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16)      # a shuffle broadcasting lane 0


@intrinsic
def _outer_tile(typingctx, h_at, h_stride, rows, g_at, g_stride, c_at, c_stride):
    """c[0:RANKS, 0:STRIP] = Σ_row h[row, 0:RANKS]ᵀ ⊗ g[row, 0:STRIP], rows in order, one
    FMA each; h, g and c float32 with the given byte strides between rows."""
    def codegen(context, builder, sig, args):
        h_at, h_stride, rows, g_at, g_stride, c_at, c_stride = args
        zero = ir.Constant(_V16F, [0.0] * 16)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3),
                                             "llvm.fma.v16f32")
        sums = [[cgutils.alloca_once_value(builder, zero) for _ in range(STRIP // 16)] for _ in range(RANKS)]
        with cgutils.for_range(builder, rows) as loop:
            g_row = builder.inttoptr(builder.add(g_at, builder.mul(loop.index, g_stride)), _V16F.as_pointer())
            h_row = builder.inttoptr(builder.add(h_at, builder.mul(loop.index, h_stride)), _F32.as_pointer())
            strip = [builder.load(builder.gep(g_row, [ir.Constant(_I64, v)]), align=4)
                     for v in range(STRIP // 16)]
            for rank, rank_sums in enumerate(sums):
                value = builder.load(builder.gep(h_row, [ir.Constant(_I64, rank)]))
                broadcast = builder.insert_element(ir.Constant(_V16F, None), value, ir.Constant(_I64, 0))
                broadcast = builder.shuffle_vector(broadcast, broadcast, _ALL_FIRST)
                for vector, total in zip(strip, rank_sums):
                    builder.store(builder.call(fma, [broadcast, vector, builder.load(total)]), total)
        for rank, rank_sums in enumerate(sums):
            c_row = builder.inttoptr(builder.add(c_at, builder.mul(ir.Constant(_I64, rank), c_stride)),
                                     _V16F.as_pointer())
            for v, total in enumerate(rank_sums):
                builder.store(builder.load(total), builder.gep(c_row, [ir.Constant(_I64, v)]), align=4)
        return context.get_dummy_value()
    return types.void(*([types.intp] * 7)), codegen


@njit(cache=True)
def _strip_sums(h, g, first, out):
    """out[:, first:] = h.T @ g[:, first:] for the last columns (fewer than STRIP), in row
    order (a multiply and an add each: Numba has no scalar FMA)."""
    for rank in range(h.shape[1]):
        for column in range(first, g.shape[1]):
            total = np.float32(0)
            for row in range(g.shape[0]):
                total += h[row, rank] * g[row, column]
            out[rank, column] = total


@njit(parallel=True, cache=True)
def _thin_t_products(h, g, out, threads):
    """out (r, n) = h (rows, r)ᵀ @ g (rows, n), r a multiple of RANKS: each thread takes whole
    strips of STRIP columns; the last partial strip after."""
    rows, n = g.shape
    strips = n // STRIP
    for t in prange(threads):
        for strip in range(t * strips // threads, (t + 1) * strips // threads):
            for rank in range(0, h.shape[1], RANKS):
                _outer_tile(h.ctypes.data + 4 * rank, h.strides[0], rows, g.ctypes.data + 4 * STRIP * strip,
                            g.strides[0], out.ctypes.data + rank * out.strides[0] + 4 * STRIP * strip,
                            out.strides[0])
    _strip_sums(h, g, strips * STRIP, out)


def thin_t_product(h, g):
    """h.T @ g for a thin h (rows, r) and g (rows, n), both float32 → (r, n) float32.

    With AVX-512 a Numba pass over g (see the module); for a small g, or without AVX-512
    (whose 32 registers the tile needs), NumPy's BLAS."""
    if h.ndim != 2 or g.ndim != 2 or h.shape[0] != g.shape[0]:
        raise ShapeError(f"h (rows, r) and g (rows, n) must share their rows, got {h.shape} and {g.shape}")
    if not HAS_AVX512 or h.dtype != np.float32 or g.dtype != np.float32 or g.size < SMALL:
        return h.T @ g
    rank = h.shape[1]
    padded = np.zeros((h.shape[0], -(-rank // RANKS) * RANKS), np.float32)      # (rows, r to RANKS)
    padded[:, :rank] = h
    g = g if g.strides[1] == 4 else np.ascontiguousarray(g)
    out = np.empty((padded.shape[1], g.shape[1]), np.float32)                   # (r to RANKS, n)
    _thin_t_products(padded, g, out, max(1, min(numba.get_num_threads(), g.shape[1] // STRIP)))
    return out[:rank]
