"""The row intrinsics of the fused gemv, each walking whole blocks of packed weight rows:

* :func:`dot_rows1` / :func:`dot_rows4` — Σ_i (codebook[code_i]·scale) · x_i for 1 or
  ROWS_PER_DECODE (4) rows of x   (x @ W.T);
* :func:`axpy_rows1` / :func:`axpy_rows4`, :func:`axpy_wrows` — out_i += coef_block ·
  (codebook[code_i] − shift_block) for 1 or 4 rows of g, or AXPY_W_ROWS (8) W rows into 1
  row of g   (g @ W).

Each compiles the decode its ``lookup`` argument selects (:func:`~qlora_np.kernels.x86.builder.decode_table`:
the AVX-512 permute for the float32 codebook, the AVX2 byte shuffles for its planes), so none
of them is AVX2-only. x (or the result) is in the decode's lane order
(:func:`~qlora_np.kernels.x86.builder.lane_order`). The drivers are
:func:`qlora_np.kernels.products.gemv_many` and :func:`~qlora_np.kernels.products.gemv_t`;
their portable twins compute the same sums.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from qlora_np.kernels.x86.builder import ADDRESS, BYTES_PER_STEP, F32, I8, Builder

def _make_dot_rows(rows, chains):
    """An intrinsic computing ``rows`` dots of one packed weight row with rows of x at once.

    Each decoded group of 32 codebook values is multiplied with every x row, so the
    decode work is shared by ``rows`` products. With the byte-shuffle decode each block's
    sum is then multiplied by its scale once (as the portable loop does); the permute
    decode looks codes up in the codebook times the block's scale (2 multiplies a block)
    and so sums the dequantized weights fl(codebook[code] · scale) · x without a per-block
    step. ``chains`` independent accumulators a row keep the FMAs from waiting on each other.
    """
    @intrinsic
    def dot_rows(typingctx, packed, x_ordered, x_stride, scales, nblocks, block_bytes, lookup, out,
                 out_stride):
        signature = types.void(*([ADDRESS] * 6), lookup, ADDRESS, ADDRESS)

        def codegen(context, builder, sig, args):
            (packed_at, x_at, x_stride, scales_at, nblocks, block_bytes, lookup_value, out_at,
             out_stride) = args
            ir_ = Builder.for_lookup(context, builder, sig.args[6], lookup_value)
            packed, scales = ir_.pointer(packed_at, I8), ir_.pointer(scales_at, F32)
            x_rows = [ir_.row_pointer(x_at, x_stride, r) for r in range(rows)]
            zero = ir.Constant(ir_.vector, None)
            totals = [cgutils.alloca_once_value(builder, zero) for _ in range(rows)]
            chains_used = min(chains, 32 // ir_.lanes)                # at most one per decoded vector
            partials = [[cgutils.alloca_once_value(builder, zero) for _ in range(chains_used)]
                        for _ in range(rows)]
            with cgutils.for_range(builder, nblocks) as block_loop:
                block = block_loop.index
                first = builder.mul(block, block_bytes)
                scale = ir_.broadcast_at(scales, block)
                if not ir_.permute:
                    for chain in (chain for row_chains in partials for chain in row_chains):
                        builder.store(zero, chain)
                step = ir.Constant(block_bytes.type, BYTES_PER_STEP)
                with cgutils.for_range_slice(builder, ir.Constant(block_bytes.type, 0), block_bytes,
                                             step) as (offset, _):
                    index = builder.add(first, offset)
                    x_index = builder.add(index, index)                # 2 weights a byte
                    decoded = ir_.decode32(packed, index, scale=scale if ir_.permute else None)
                    for k, codes_value in enumerate(decoded):
                        at = builder.add(x_index, ir.Constant(x_index.type, ir_.lanes * k))
                        for r in range(rows):
                            chain = partials[r][k % chains_used]
                            builder.store(builder.call(ir_.fma, [codes_value, ir_.load_vector(x_rows[r], at),
                                                                 builder.load(chain)]), chain)
                if not ir_.permute:
                    for total, row_chains in zip(totals, partials):
                        block_sum = ir_.sum_of(row_chains)
                        builder.store(builder.call(ir_.fma, [block_sum, scale, builder.load(total)]), total)
            if ir_.permute:
                for total, row_chains in zip(totals, partials):
                    builder.store(ir_.sum_of(row_chains), total)
            ir_.store_row_sums(totals, out_at, out_stride)
            return context.get_dummy_value()

        return signature, codegen

    return dot_rows


ROWS_PER_DECODE = 4
"""How many rows of x (or g) one call of the 4-row intrinsics handles per weight row: they
share each decode."""

dot_rows1 = _make_dot_rows(1, 4)
dot_rows4 = _make_dot_rows(ROWS_PER_DECODE, 2)


def _make_axpy_rows(rows, w_rows=1):
    """An intrinsic adding coef · (codebook[code] − shift) of ``w_rows`` consecutive packed
    weight rows into ``rows`` output rows (for g @ W).

    Each decode is shared by the ``rows`` output rows, and each output vector is loaded
    and stored once for all ``w_rows`` weight rows (added in row order, so the sums are
    the same as one row at a time). W row q starts q·row_bytes after ``packed``, its
    scales and shifts q·nblocks after ``scales`` / ``shifts``; output row r gets W row q
    times g[r·g_stride + q], so its coefficient in block b is that times the block's
    scale (a float32 product, as the portable loop does).

    With several W rows, the next ``w_rows`` rows (and their scales and shifts) are
    prefetched as fast as these are read: the hardware prefetchers do not follow 8 short
    interleaved streams, so without this the product waits on memory whenever W is out of
    cache. (Past the last row of a call this prefetches bytes it will not read, which is
    harmless: a prefetch never faults.)
    """
    @intrinsic
    def axpy_rows(typingctx, packed, row_bytes, out_ordered, out_stride, g, g_stride, scales, shifts, nblocks,
                  block_bytes, lookup):
        signature = types.void(*([ADDRESS] * 10), lookup)

        def codegen(context, builder, sig, args):
            (packed_at, row_bytes, out_at, out_stride, g_at, g_stride, scales_at, shifts_at, nblocks,
             block_bytes, lookup_value) = args
            ir_ = Builder.for_lookup(context, builder, sig.args[10], lookup_value)
            size = nblocks.type
            packed_rows = [ir_.pointer(builder.add(packed_at, builder.mul(ir.Constant(size, q), row_bytes)),
                                       I8) for q in range(w_rows)]
            g, scales, shifts = (ir_.pointer(at, F32) for at in (g_at, scales_at, shifts_at))
            g_values = [[ir_.broadcast_at(g, builder.add(builder.mul(ir.Constant(size, r), g_stride),
                                                         ir.Constant(size, q)))
                         for r in range(rows)] for q in range(w_rows)]
            outs = [ir_.row_pointer(out_at, out_stride, r) for r in range(rows)]
            group_bytes = builder.mul(ir.Constant(size, w_rows), row_bytes)
            with cgutils.for_range(builder, nblocks) as block_loop:
                block = block_loop.index

                def at_block(table_row):
                    return builder.add(builder.mul(ir.Constant(size, table_row), nblocks), block)

                if w_rows > 1:                  # the next rows' scales and shifts: w_rows floats a block
                    ahead = builder.mul(builder.add(nblocks, block), ir.Constant(size, w_rows))
                    for table in (scales, shifts):
                        ir_.prefetch(builder.bitcast(builder.gep(table, [ahead]), I8.as_pointer()))
                row_shifts = [ir_.broadcast_at(shifts, at_block(q)) for q in range(w_rows)]
                row_coefs = [[builder.fmul(g_value, ir_.broadcast_at(scales, at_block(q))) for g_value in g_q]
                             for q, g_q in enumerate(g_values)]
                first = builder.mul(block, block_bytes)
                step = ir.Constant(block_bytes.type, BYTES_PER_STEP)
                with cgutils.for_range_slice(builder, ir.Constant(block_bytes.type, 0), block_bytes,
                                             step) as (offset, _):
                    index = builder.add(first, offset)
                    if w_rows > 1:              # the next rows' bytes: w_rows · 16 a step
                        ahead = builder.add(group_bytes, builder.mul(index, ir.Constant(size, w_rows)))
                        for line in range(0, BYTES_PER_STEP * w_rows, 64):
                            line_at = builder.add(ahead, ir.Constant(size, line))
                            ir_.prefetch(builder.gep(packed_rows[0], [line_at]))
                    out_index = builder.add(index, index)
                    places = [builder.add(out_index, ir.Constant(out_index.type, ir_.lanes * k))
                              for k in range(32 // ir_.lanes)]
                    sums = [[ir_.load_vector(out, at) for at in places] for out in outs]
                    for packed, shift, coefs_q in zip(packed_rows, row_shifts, row_coefs):
                        for k, weights in enumerate(ir_.decode32(packed, index, shift=shift)):
                            for row_sums, coef in zip(sums, coefs_q):
                                row_sums[k] = builder.call(ir_.fma, [weights, coef, row_sums[k]])
                    for out, row_sums in zip(outs, sums):
                        for at, total in zip(places, row_sums):
                            ir_.store_vector(total, out, at)
            return context.get_dummy_value()

        return signature, codegen

    return axpy_rows


AXPY_W_ROWS = 8
"""How many W rows one call of :func:`axpy_wrows` adds into a single output row."""

axpy_rows1 = _make_axpy_rows(1)
axpy_rows4 = _make_axpy_rows(ROWS_PER_DECODE)
axpy_wrows = _make_axpy_rows(1, AXPY_W_ROWS)

