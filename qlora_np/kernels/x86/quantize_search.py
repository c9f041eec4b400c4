"""Quantize (AVX2): the code of each scaled value, its rank among the format's 15 sorted
midpoints, found by a 4-level binary search in registers instead of 15 compares.

:func:`search_table` lays the midpoints out as the search visits them, :func:`rank_lut` maps a
rank to its code for formats whose codes are not in value order (FP4), and
:func:`avx2_quantize_blocks` / :func:`avx2_quantize_blocks_reordered` code whole blocks with
them. AVX2 only (8-lane ``vpermps``, ``vpshufb``). The driver is
:func:`qlora_np.kernels.blockwise.quantize_4bit`, whose portable loop gives the same bytes.
"""

from functools import lru_cache

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from qlora_np.kernels.x86.builder import ADDRESS, F32, I8, I32, I64, V8F, V8I, V32B, Builder

RANK_STEP = 16
"""Values one step of :func:`avx2_quantize_blocks` codes (8 packed bytes): block sizes must be multiples."""


def search_table(midpoints):
    """(40,) float32: the thresholds a 4-level binary search over 15 sorted midpoints visits.

    8 lanes each: m[7]; m[3]; m[11]; level 3's m[1], m[5], m[9], m[13] (index = the two
    bits found so far, padded); level 4's m[0], m[2], …, m[14] (index = three bits).
    """
    return _search_table_of(np.ascontiguousarray(midpoints, np.float32).tobytes())


@lru_cache(maxsize=64)
def _search_table_of(midpoints_bytes):
    m = np.frombuffer(midpoints_bytes, np.float32)
    table = np.concatenate([np.full(8, m[7]), np.full(8, m[3]), np.full(8, m[11]),
                            np.tile(m[1::4], 2), m[0::2]]).astype(np.float32)
    table.setflags(write=False)
    return table


def rank_lut(sort_order):
    """(32,) uint8: rank → code (the format's sort order), twice (once per 128-bit lane)."""
    table = np.tile(np.asarray(sort_order, np.uint8), 2)
    table.setflags(write=False)
    return table


def _make_quantize_blocks(reorder):
    """An intrinsic quantizing ``nblocks`` full blocks: absmax (as bits) and packed codes.

    Per block, as :func:`qlora_np.kernels.blockwise._quantize_full_blocks_even` does it: the
    largest |value| as the unsigned max of the bit patterns with the sign cleared, one
    float32 reciprocal of max(absmax, 1e-38), then code = the number of midpoints
    strictly below value · reciprocal. The portable loop counts with 15 compares; here
    4 compares walk a binary search (the midpoints are sorted, so the count is the
    same), the next threshold picked from a register with ``vpermps``. With ``reorder``
    the rank is mapped to its code through the format's sort order (FP4) with one
    ``vpshufb``. Codes pack two a byte, the first value in the high nibble.
    """
    @intrinsic
    def quantize_blocks(typingctx, values, nblocks, blocksize, table, lut, packed, absmax_bits):
        signature = types.void(*([ADDRESS] * 7))

        def codegen(context, builder, sig, args):
            values_at, nblocks, blocksize, table_at, lut_at, packed_at, absmax_at = args
            ir_ = Builder(builder, lut_at, plane_count=1)
            permute = ir_.declare(V8F, [V8F, V8I], "llvm.x86.avx2.permps")
            largest_of = ir_.declare(I32, [V8I], "llvm.vector.reduce.umax.v8i32")
            values, table = ir_.pointer(values_at, F32), ir_.pointer(table_at, F32)
            packed, absmax_bits = ir_.pointer(packed_at, I8), ir_.pointer(absmax_at, I32)
            middle, low_half, high_half, level3, level4 = (ir_.load_vector(table, ir.Constant(I64, 8 * k))
                                                           for k in range(5))
            one = ir.Constant(V8I, [1] * 8)
            size = blocksize.type

            def add_bit(index, above):
                """index · 2 + above (a compare result)."""
                return builder.or_(builder.shl(index, one), builder.zext(above, V8I))

            def codes_of(at, scale):
                scaled = builder.fmul(ir_.load_vector(values, at), scale)
                above = builder.fcmp_ordered(">", scaled, middle)
                index = builder.zext(above, V8I)
                threshold = builder.select(above, high_half, low_half)
                index = add_bit(index, builder.fcmp_ordered(">", scaled, threshold))
                threshold = builder.call(permute, [level3, index])
                index = add_bit(index, builder.fcmp_ordered(">", scaled, threshold))
                threshold = builder.call(permute, [level4, index])
                index = add_bit(index, builder.fcmp_ordered(">", scaled, threshold))
                if reorder:
                    looked_up = builder.call(ir_.pshufb, [ir_.planes[0], builder.bitcast(index, V32B)])
                    index = builder.and_(builder.bitcast(looked_up, V8I), ir.Constant(V8I, [15] * 8))
                return index

            with cgutils.for_range(builder, nblocks) as block_loop:
                start = builder.mul(block_loop.index, blocksize)
                stop = builder.add(start, blocksize)
                # 1. absmax: the unsigned max of the bit patterns, sign bit cleared
                largest = cgutils.alloca_once_value(builder, ir.Constant(V8I, None))
                with cgutils.for_range_slice(builder, start, stop, ir.Constant(size, 8)) as (at, _):
                    bits = builder.bitcast(ir_.load_vector(values, at), V8I)
                    magnitude = builder.and_(bits, ir.Constant(V8I, [0x7FFFFFFF] * 8))
                    so_far = builder.load(largest)
                    builder.store(builder.select(builder.icmp_unsigned(">", magnitude, so_far), magnitude,
                                                 so_far), largest)
                absmax_bits_value = builder.call(largest_of, [builder.load(largest)])
                builder.store(absmax_bits_value, builder.gep(absmax_bits, [block_loop.index]))
                # 2. one reciprocal a block: 1 / max(absmax, 1e-38)
                absmax = builder.bitcast(absmax_bits_value, F32)
                tiny = ir.Constant(F32, float(np.float32(1e-38)))
                floored = builder.select(builder.fcmp_ordered(">", absmax, tiny), absmax, tiny)
                scale = ir_.broadcast(builder.fdiv(ir.Constant(F32, 1.0), floored))
                # 3. codes of 16 values a step, packed into 8 bytes
                with cgutils.for_range_slice(builder, start, stop, ir.Constant(size, RANK_STEP)) as (at, _):
                    first = codes_of(at, scale)
                    second = codes_of(builder.add(at, ir.Constant(size, 8)), scale)
                    evens = builder.shuffle_vector(first, second, ir.Constant(V8I, list(range(0, 16, 2))))
                    odds = builder.shuffle_vector(first, second, ir.Constant(V8I, list(range(1, 16, 2))))
                    pairs = builder.or_(builder.shl(evens, ir.Constant(V8I, [4] * 8)), odds)
                    where = builder.gep(packed, [builder.lshr(at, ir.Constant(size, 1))])
                    builder.store(builder.trunc(pairs, ir.VectorType(I8, 8)),
                                  builder.bitcast(where, ir.VectorType(I8, 8).as_pointer()), align=1)
            return context.get_dummy_value()

        return signature, codegen

    return quantize_blocks


avx2_quantize_blocks = _make_quantize_blocks(reorder=False)
avx2_quantize_blocks_reordered = _make_quantize_blocks(reorder=True)

