"""Panels, for batches too large to share register decodes: :func:`decode_panel` decodes a
strip of W rows once, scaled, into a small buffer, and register tiles multiply that buffer
with many rows: :func:`avx2_panel_dot3x4` and its edge tiles (x @ W.T),
:func:`avx2_panel_axpy6` and its smaller tiles (g @ W).

:func:`decode_panel` compiles the decode its ``lookup`` selects
(:func:`~qlora_np.kernels.x86.builder.decode_table`: AVX-512 permute or AVX2 shuffles); the
tiles only read and write float32 buffers with 8-lane FMAs, and need nothing past AVX2:
hence their ``avx2_`` names. The drivers are :func:`qlora_np.kernels.products.gemm` and
:func:`~qlora_np.kernels.products.gemm_t`.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from qlora_np.kernels.x86.builder import ADDRESS, BYTES_PER_STEP, F32, I8, I64, V8F, Builder

STRIP = 16
"""Floats in one strip of a panel: the width the g @ W panel kernels work on (2 vectors)."""


@intrinsic
def decode_panel(typingctx, packed, row_bytes, scales, shifts, blocks_per_row, rows, first_step, steps,
                 steps_per_block, lookup, panel, row_stride, strip_stride):
    """Decode weights 32·first_step … 32·(first_step + steps) of ``rows`` W rows into a panel.

    The weights of row r are (codebook[code] − shift) · scale of the 16 bytes at
    packed + r·row_bytes + 16·(first_step + s) for s < steps, in the lane order of the decode
    ``lookup`` selects (:func:`~qlora_np.kernels.x86.builder.lane_order`); their block is
    (first_step + s) // steps_per_block of the row, whose scales and shifts start
    r·blocks_per_row after ``scales`` / ``shifts``. Weight j of the row's
    decoded strip goes to panel[r·row_stride + (j // STRIP)·strip_stride + j % STRIP]: row
    after row (row_stride = 32·steps, strip_stride = STRIP) or strip after strip
    (row_stride = STRIP, strip_stride = STRIP·rows).
    """
    signature = types.void(*([ADDRESS] * 9), lookup, *([ADDRESS] * 3))

    def codegen(context, builder, sig, args):
        (packed_at, row_bytes, scales_at, shifts_at, blocks_per_row, rows, first_step, steps,
         steps_per_block, lookup_value, panel_at, row_stride, strip_stride) = args
        ir_ = Builder.for_lookup(context, builder, sig.args[9], lookup_value)
        packed, panel = ir_.pointer(packed_at, I8), ir_.pointer(panel_at, F32)
        scales, shifts = ir_.pointer(scales_at, F32), ir_.pointer(shifts_at, F32)
        size = rows.type
        with cgutils.for_range(builder, rows) as row_loop:
            first_block = builder.mul(row_loop.index, blocks_per_row)
            first_byte = builder.mul(row_loop.index, row_bytes)
            row_at = builder.mul(row_loop.index, row_stride)
            with cgutils.for_range(builder, steps) as step_loop:
                step = builder.add(first_step, step_loop.index)
                block = builder.add(first_block, builder.udiv(step, steps_per_block))
                scale, shift = ir_.broadcast_at(scales, block), ir_.broadcast_at(shifts, block)
                index = builder.add(first_byte, builder.mul(step, ir.Constant(size, BYTES_PER_STEP)))
                first_strip = builder.mul(step_loop.index, ir.Constant(size, 32 // STRIP))
                for k, weights in enumerate(ir_.decode32(packed, index, shift, scale)):
                    strip = builder.add(first_strip, ir.Constant(size, ir_.lanes * k // STRIP))
                    at = builder.add(builder.add(row_at, builder.mul(strip, strip_stride)),
                                     ir.Constant(size, ir_.lanes * k % STRIP))
                    ir_.store_vector(weights, panel, at)
        return context.get_dummy_value()

    return signature, codegen


def _make_panel_axpy(rows):
    """An intrinsic adding g[:, i] · strip[i, :] over the rows i of one panel strip into
    ``rows`` rows of out (g @ W).

    out[m, 0:16] += Σ_{i < count} g[m, i] · strip[i, 0:16], where strip rows are contiguous
    and g is packed for the tile, g[m, i] at g + 4·(i·rows + m), so it is read in order:
    the rows × 2 sums stay in registers for the whole strip (12 of the 16 AVX2 registers
    for 6 rows), and each strip vector is loaded once for all ``rows`` rows.
    """
    @intrinsic
    def panel_axpy(typingctx, g, strip, count, out, out_stride):
        signature = types.void(*([ADDRESS] * 5))

        def codegen(context, builder, sig, args):
            g_at, strip_at, count, out_at, out_stride = args
            ir_ = Builder(builder, strip_at, plane_count=0)
            strip = ir_.pointer(strip_at, F32)
            g_rows = [ir_.pointer(builder.add(g_at, ir.Constant(g_at.type, 4 * m)), F32)
                      for m in range(rows)]
            out_rows = [ir_.row_pointer(out_at, out_stride, m) for m in range(rows)]
            sums = [[cgutils.alloca_once_value(builder, ir_.load_vector(out, ir.Constant(I64, 8 * j)))
                     for j in range(STRIP // 8)] for out in out_rows]
            with cgutils.for_range(builder, count) as loop:
                first = builder.mul(loop.index, ir.Constant(count.type, STRIP))
                weights = [ir_.load_vector(strip, builder.add(first, ir.Constant(count.type, 8 * j)))
                           for j in range(STRIP // 8)]
                g_index = builder.mul(loop.index, ir.Constant(count.type, rows))
                for g_row, row_sums in zip(g_rows, sums):
                    coef = ir_.broadcast_at(g_row, g_index)
                    for w, total in zip(weights, row_sums):
                        builder.store(builder.call(ir_.fma, [w, coef, builder.load(total)]), total)
            for out, row_sums in zip(out_rows, sums):
                for j, total in enumerate(row_sums):
                    ir_.store_vector(builder.load(total), out, ir.Constant(I64, 8 * j))
            return context.get_dummy_value()

        return signature, codegen

    return panel_axpy


avx2_panel_axpy6 = _make_panel_axpy(6)
avx2_panel_axpy4 = _make_panel_axpy(4)
avx2_panel_axpy2 = _make_panel_axpy(2)
avx2_panel_axpy1 = _make_panel_axpy(1)


def _make_panel_dot(x_rows, w_rows):
    """An intrinsic adding the dots of ``x_rows`` rows of x with ``w_rows`` panel rows to out
    (x @ W.T).

    out[m·out_stride + o] += Σ_{k < 8·count} x[m, k] · panel[o, k] (rows ``x_stride`` and
    ``panel_stride`` floats apart): x_rows × w_rows vector sums (at most 12 registers) take
    one FMA per loaded pair, and are summed across lanes once at the end.
    """
    @intrinsic
    def panel_dot(typingctx, x, x_stride, panel, panel_stride, count, out, out_stride):
        signature = types.void(*([ADDRESS] * 7))

        def codegen(context, builder, sig, args):
            x_at, x_stride, panel_at, panel_stride, count, out_at, out_stride = args
            ir_ = Builder(builder, panel_at, plane_count=0)
            x_pointers = [ir_.row_pointer(x_at, x_stride, m) for m in range(x_rows)]
            w_pointers = [ir_.row_pointer(panel_at, panel_stride, o) for o in range(w_rows)]
            sums = [[cgutils.alloca_once_value(builder, ir.Constant(V8F, None)) for _ in range(w_rows)]
                    for _ in range(x_rows)]
            with cgutils.for_range(builder, count) as loop:
                at = builder.mul(loop.index, ir.Constant(count.type, 8))
                weights = [ir_.load_vector(pointer, at) for pointer in w_pointers]
                for x_pointer, row_sums in zip(x_pointers, sums):
                    values = ir_.load_vector(x_pointer, at)
                    for w, total in zip(weights, row_sums):
                        builder.store(builder.call(ir_.fma, [w, values, builder.load(total)]), total)
            out = ir_.pointer(out_at, F32)
            for m, row_sums in enumerate(sums):
                for o, total in enumerate(row_sums):
                    where = builder.gep(out, [builder.add(builder.mul(ir.Constant(out_stride.type, m),
                                                                      out_stride), ir.Constant(I64, o))])
                    builder.store(builder.fadd(builder.load(where), ir_.horizontal_sum(builder.load(total))),
                                  where)
            return context.get_dummy_value()

        return signature, codegen

    return panel_dot


avx2_panel_dot3x4 = _make_panel_dot(3, 4)
avx2_panel_dot1x4 = _make_panel_dot(1, 4)
avx2_panel_dot3x1 = _make_panel_dot(3, 1)
avx2_panel_dot1x1 = _make_panel_dot(1, 1)
