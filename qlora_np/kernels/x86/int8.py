"""The int8-activation dot rows of the fused gemv (opt-in, as llama.cpp does): x rounded to
int8 per group of 32, the codebook to int8 (:func:`int8_table`), and 32 weights a step
multiplied in integers.

AVX2 only (``vpshufb``, ``vpsignb``, ``vpmaddubsw``, ``vpmaddwd`` on 8-lane vectors),
whatever the float decode: hence the ``avx2_`` names. The driver is
:func:`qlora_np.kernels.products.gemv_many` with ``int8_activations``, which stores xq in
:data:`INT8_ORDER` (or :data:`INT8_ORDER_64`) for them; the portable twin
(``qlora_np.kernels.products._gemv_int8_portable``) gives the same integers.
"""

from functools import lru_cache

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from qlora_np.kernels.x86.builder import (ADDRESS, BYTES_PER_STEP, F32, I8, V2F, V8F, V8I, V16H, V32B,
                                          Builder)
from qlora_np.kernels.x86.dot import ROWS_PER_DECODE

INT8_ORDER = np.array([2 * t + 1 for t in range(16)] + [2 * t for t in range(16)])
"""Which of 32 consecutive weights each byte of :meth:`~qlora_np.kernels.x86.builder.Builder.codes32`
holds: odd, then even (the order xq is stored in for the int8 rows)."""

INT8_ORDER_64 = np.array([2 * t + 1 for t in range(32)] + [2 * t for t in range(32)])
"""The same for 64 weights read as 32 bytes at once (blocks of 64): low nibbles, then high."""


def int8_table(codebook):
    """(32,) int8: the codebook rounded to int8, round(value · 127), twice (once per 128-bit lane)."""
    return _int8_table_of(np.ascontiguousarray(codebook, np.float32).tobytes())


@lru_cache(maxsize=64)
def _int8_table_of(codebook_bytes):
    values = np.rint(np.frombuffer(codebook_bytes, np.float32) * np.float32(127))
    table = np.tile(np.clip(values, -127, 127).astype(np.int8), 2)
    table.setflags(write=False)
    return table


def _make_dot_rows_int8(rows):
    """An intrinsic computing ``rows`` dots of one packed weight row with int8 rows of x.

    x comes quantized per group of 32 (:func:`qlora_np.kernels.products.quantize_activations`):
    int8 values xq in codes32's order (odd elements, then even) and one float scale per
    group. A step looks the 32 codes up as int8 weights (one ``vpshufb``), multiplies
    them with xq exactly in integers (``vpmaddubsw`` on |w| and sign(w)·xq, then
    ``vpmaddwd``: |sums| ≤ 4·127² fit int32), converts the 8 lane sums to float and
    adds them times the group's scale; each block's sum is then multiplied by its scale.
    Blocks of exactly 64 weights (the default size) are read 32 bytes at a time instead,
    both groups at once, with xq in INT8_ORDER_64.
    """
    @intrinsic
    def dot_rows_int8(typingctx, packed, xq, xq_stride, x_scales, x_scales_stride, scales, nblocks,
                      block_bytes, table, out, out_stride):
        signature = types.void(*([ADDRESS] * 11))

        def codegen(context, builder, sig, args):
            (packed_at, xq_at, xq_stride, x_scales_at, x_scales_stride, scales_at, nblocks,
             block_bytes, table_at, out_at, out_stride) = args
            ir_ = Builder(builder, table_at, plane_count=1)
            sign = ir_.declare(V32B, [V32B, V32B], "llvm.x86.avx2.psign.b")
            pairs = ir_.declare(V16H, [V32B, V32B], "llvm.x86.avx2.pmadd.ub.sw")
            quads = ir_.declare(V8I, [V16H, V16H], "llvm.x86.avx2.pmadd.wd")
            ones = ir.Constant(V16H, [1] * 16)
            packed, scales = ir_.pointer(packed_at, I8), ir_.pointer(scales_at, F32)
            xq_rows = [ir_.pointer(builder.add(xq_at, builder.mul(ir.Constant(xq_stride.type, r), xq_stride)),
                                   I8) for r in range(rows)]
            group_scales = [ir_.row_pointer(x_scales_at, x_scales_stride, r) for r in range(rows)]
            step = ir.Constant(block_bytes.type, BYTES_PER_STEP)

            def group_sums(index):
                """Each row's 8 float lane sums of one step's 32 products, times the group's x scale."""
                weights = builder.call(ir_.pshufb, [ir_.planes[0], ir_.codes32(packed, index)])
                magnitudes = builder.call(sign, [weights, weights])
                group = builder.udiv(index, step)
                sums = []
                for r in range(rows):
                    where = builder.gep(xq_rows[r], [builder.add(index, index)])
                    xq = builder.load(builder.bitcast(where, V32B.as_pointer()), align=1)
                    products = builder.call(pairs, [magnitudes, builder.call(sign, [xq, weights])])
                    lane_sums = builder.sitofp(builder.call(quads, [products, ones]), V8F)
                    sums.append((lane_sums, ir_.broadcast_at(group_scales[r], group)))
                return sums

            def sums_of_64(index):
                """Each row's 8 float lane sums of the 64 products of the block at packed[index]
                (32 bytes), lanes 0–3 times group 0's x scale and lanes 4–7 times group 1's.

                xq is stored as INT8_ORDER_64 for this: the odd elements of both groups, then
                the even ones, matching the low and the high nibbles of the 32 bytes."""
                raw = builder.load(builder.bitcast(builder.gep(packed, [index]), V32B.as_pointer()), align=1)
                low = builder.and_(raw, ir.Constant(V32B, [15] * 32))
                high = builder.lshr(raw, ir.Constant(V32B, [4] * 32))
                weights = [builder.call(ir_.pshufb, [ir_.planes[0], codes]) for codes in (low, high)]
                magnitudes = [builder.call(sign, [w, w]) for w in weights]
                group = builder.udiv(index, step)
                sums = []
                for r in range(rows):
                    lane_sums = None
                    for half, (w, m) in enumerate(zip(weights, magnitudes)):
                        where = builder.gep(xq_rows[r], [builder.add(builder.add(index, index),
                                                                     ir.Constant(index.type, 32 * half))])
                        xq = builder.load(builder.bitcast(where, V32B.as_pointer()), align=1)
                        signed = builder.call(sign, [xq, w])
                        quad = builder.call(quads, [builder.call(pairs, [m, signed]), ones])
                        lane_sums = quad if lane_sums is None else builder.add(lane_sums, quad)
                    where = builder.bitcast(builder.gep(group_scales[r], [group]), V2F.as_pointer())
                    two_scales = builder.load(where, align=4)
                    spread = builder.shuffle_vector(two_scales, two_scales,
                                                    ir.Constant(V8I, [0] * 4 + [1] * 4))
                    sums.append(builder.fmul(builder.sitofp(lane_sums, V8F), spread))
                return sums

            zero = ir.Constant(V8F, None)
            totals = [cgutils.alloca_once_value(builder, zero) for _ in range(rows)]
            partials = [cgutils.alloca_once_value(builder, zero) for _ in range(rows)]

            def emit_blocks(blocks_of_64):
                with cgutils.for_range(builder, nblocks) as loop:
                    block = loop.index
                    first = builder.mul(block, block_bytes)
                    if blocks_of_64:
                        block_sums = sums_of_64(first)
                    else:                                    # one group of 32 a step
                        for partial in partials:
                            builder.store(zero, partial)
                        with cgutils.for_range_slice(builder, ir.Constant(block_bytes.type, 0), block_bytes,
                                                     step) as (offset, _):
                            step_sums = group_sums(builder.add(first, offset))
                            for partial, (sums, scale) in zip(partials, step_sums):
                                updated = builder.call(ir_.fma, [sums, scale, builder.load(partial)])
                                builder.store(updated, partial)
                        block_sums = [builder.load(partial) for partial in partials]
                    for total, block_sum in zip(totals, block_sums):
                        scale = ir_.broadcast_at(scales, block)
                        updated = builder.call(ir_.fma, [block_sum, scale, builder.load(total)])
                        builder.store(updated, total)

            is_64 = builder.icmp_unsigned("==", block_bytes, ir.Constant(block_bytes.type, 32))
            with builder.if_else(is_64) as (blocks_of_64, other_blocks):
                with blocks_of_64:
                    emit_blocks(blocks_of_64=True)
                with other_blocks:
                    emit_blocks(blocks_of_64=False)
            ir_.store_row_sums(totals, out_at, out_stride)
            return context.get_dummy_value()

        return signature, codegen

    return dot_rows_int8


avx2_dot_rows1_int8 = _make_dot_rows_int8(1)
avx2_dot_rows4_int8 = _make_dot_rows_int8(ROWS_PER_DECODE)

