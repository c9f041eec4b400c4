"""Dequantize (AVX-512): whole blocks decoded by the permute decode and put back into
element order, 16 values a step.

AVX-512 only: it takes the float32 codebook (:func:`~qlora_np.kernels.x86.builder.decode_table`
under :data:`qlora_np.kernels.features.PERMUTE_DECODE`), never the AVX2 byte planes. The
drivers are :func:`qlora_np.kernels.blockwise.dequantize_4bit` and the bfloat16 panels of
:mod:`qlora_np.kernels.bf16`; the scalar loop gives the same bytes.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from qlora_np.kernels.x86.builder import ADDRESS, F32, I8, V16I, WIDE_ORDER, Builder

DEQUANTIZE_STEP = 8
"""Packed bytes one step of :func:`avx512_dequantize_blocks` decodes (16 values): block byte
counts must be multiples."""

_WIDE_TO_NATURAL = [int(np.flatnonzero(WIDE_ORDER[:16] == i)[0]) for i in range(16)]


@intrinsic
def avx512_dequantize_blocks(typingctx, packed, scales, shifts, nblocks, block_bytes, codebook, out):
    """out = (codebook[code] − shift) · scale for ``nblocks`` whole blocks, in element order.

    Per block the 16 entries of ``codebook`` (float32) are mapped to (entry − shift) · scale
    (the very float32 operations of the scalar loop, so the values are identical); per 8
    packed bytes the permute decode gives 16 values in WIDE_ORDER and one more ``vpermps``
    puts them in element order for a 64-byte store.
    """
    signature = types.void(*([ADDRESS] * 5), codebook, ADDRESS)

    def codegen(context, builder, sig, args):
        packed_at, scales_at, shifts_at, nblocks, block_bytes, codebook_value, out_at = args
        ir_ = Builder.for_lookup(context, builder, sig.args[5], codebook_value)
        packed, out = ir_.pointer(packed_at, I8), ir_.pointer(out_at, F32)
        scales, shifts = ir_.pointer(scales_at, F32), ir_.pointer(shifts_at, F32)
        to_natural = ir.Constant(V16I, _WIDE_TO_NATURAL)
        size = nblocks.type
        with cgutils.for_range(builder, nblocks) as block_loop:
            block = block_loop.index
            shift, scale = ir_.broadcast_at(shifts, block), ir_.broadcast_at(scales, block)
            mapped = builder.fmul(builder.fsub(ir_.codebook, shift), scale)
            first = builder.mul(block, block_bytes)
            with cgutils.for_range_slice(builder, ir.Constant(size, 0), block_bytes,
                                         ir.Constant(size, DEQUANTIZE_STEP)) as (offset, _):
                index = builder.add(first, offset)
                values = ir_.decode16_permute(packed, index, mapped)
                ordered = builder.call(ir_.permute16, [values, to_natural])
                ir_.store_vector(ordered, out, builder.add(index, index))
        return context.get_dummy_value()

    return signature, codegen


