"""AVX2 building blocks for the fused 4-bit products, written as Numba intrinsics.

Numba cannot vectorise ``codebook[code]`` (a gather), so the fused products decode
codes with a permute instead: the 16-entry float32 codebook lives in two 8-lane
registers, ``vpermps`` picks an entry from each by the low 3 bits of the code, and a
blend on bit 3 chooses between them. Eight packed bytes are widened to eight 32-bit
lanes; ``>> 4`` gives the codes of the even elements, ``& 15`` those of the odd
elements, so ``x`` is passed split into its even and odd halves.

Two row functions, each walking whole blocks of one weight row:

* ``avx2_dot_row``  — Σ_block scale · Σ_i codebook[code_i] · x_i   (for x @ W.T)
* ``avx2_axpy_row`` — out_i += coef_block · (codebook[code_i] − shift_block)   (for g @ W)

They are only compiled and called where the CPU has AVX2 and FMA (``HAS_AVX2``); the
portable Numba functions in :mod:`qlora_np.kernels.products` compute the same sums.
"""

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_FEATURES = llvm.get_host_cpu_features()
HAS_AVX2 = bool(_FEATURES.get("avx2", False) and _FEATURES.get("fma", False))
"""Whether this CPU runs the AVX2 path (detected once at import)."""

BYTES_PER_STEP = 16
"""Packed bytes one unrolled step consumes (32 weights): block byte counts must be multiples."""

_F32 = ir.FloatType()
_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V8F = ir.VectorType(_F32, 8)
_V8I = ir.VectorType(_I32, 8)
_V8B = ir.VectorType(_I8, 8)


class _Builder:
    """Helpers over an llvmlite IRBuilder: pointers, vector loads, the codebook lookup."""

    def __init__(self, builder, codebook_address):
        self.b = builder
        module = builder.module
        self.permps = cgutils.get_or_insert_function(
            module, ir.FunctionType(_V8F, [_V8F, _V8I]), "llvm.x86.avx2.permps")
        self.fma = cgutils.get_or_insert_function(
            module, ir.FunctionType(_V8F, [_V8F, _V8F, _V8F]), "llvm.fma.v8f32")
        codebook = self.pointer(codebook_address, _F32)
        self.codebook_low = self.load_v8f(codebook, ir.Constant(_I64, 0))     # entries 0..7
        self.codebook_high = self.load_v8f(codebook, ir.Constant(_I64, 8))    # entries 8..15

    def pointer(self, address, element):
        return self.b.inttoptr(address, element.as_pointer())

    def load_v8f(self, base, index):
        return self.b.load(self.b.bitcast(self.b.gep(base, [index]), _V8F.as_pointer()), align=4)

    def store_v8f(self, value, base, index):
        self.b.store(value, self.b.bitcast(self.b.gep(base, [index]), _V8F.as_pointer()), align=4)

    def load_codes(self, packed, index):
        """8 bytes from packed[index] → (codes of the 8 even elements, of the 8 odd elements)."""
        raw = self.b.load(self.b.bitcast(self.b.gep(packed, [index]), _V8B.as_pointer()), align=1)
        wide = self.b.zext(raw, _V8I)
        return (self.b.lshr(wide, ir.Constant(_V8I, [4] * 8)),
                self.b.and_(wide, ir.Constant(_V8I, [15] * 8)))

    def lookup(self, codes):
        """codebook[codes] for 8 lanes: two in-register permutes and a blend on bit 3."""
        low = self.b.call(self.permps, [self.codebook_low, codes])
        high = self.b.call(self.permps, [self.codebook_high, codes])
        is_high = self.b.icmp_unsigned(">", codes, ir.Constant(_V8I, [7] * 8))
        return self.b.select(is_high, high, low)

    def broadcast(self, scalar):
        lanes = self.b.insert_element(ir.Constant(_V8F, None), scalar, ir.Constant(_I32, 0))
        return self.b.shuffle_vector(lanes, lanes, ir.Constant(_V8I, [0] * 8))

    def horizontal_sum(self, vector):
        total = self.b.extract_element(vector, ir.Constant(_I32, 0))
        for lane in range(1, 8):
            total = self.b.fadd(total, self.b.extract_element(vector, ir.Constant(_I32, lane)))
        return total


_ADDRESS = types.intp


@intrinsic
def avx2_dot_row(typingctx, packed, x_even, x_odd, scales, nblocks, block_bytes, codebook):
    """float32 dot of one packed row with x; all pointers are integer addresses.

    ``packed`` points at the row's first byte, ``scales`` at its first block's scale,
    ``x_even``/``x_odd`` at x[0::2] / x[1::2]. ``block_bytes`` is a multiple of 16.
    """
    signature = types.float32(_ADDRESS, _ADDRESS, _ADDRESS, _ADDRESS, _ADDRESS, _ADDRESS, _ADDRESS)

    def codegen(context, builder, sig, args):
        packed_at, even_at, odd_at, scales_at, nblocks, block_bytes, codebook_at = args
        ir_ = _Builder(builder, codebook_at)
        packed, x_even, x_odd = ir_.pointer(packed_at, _I8), ir_.pointer(even_at, _F32), ir_.pointer(odd_at, _F32)
        scales = ir_.pointer(scales_at, _F32)
        zero = ir.Constant(_V8F, None)
        row_sum = cgutils.alloca_once_value(builder, zero)
        partial = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]   # 4 chains for ILP

        def accumulate(index, even_sum, odd_sum):
            even_codes, odd_codes = ir_.load_codes(packed, index)
            for codes, x, total in ((even_codes, x_even, even_sum), (odd_codes, x_odd, odd_sum)):
                weights = ir_.lookup(codes)
                builder.store(builder.call(ir_.fma, [weights, ir_.load_v8f(x, index),
                                                     builder.load(total)]), total)

        with cgutils.for_range(builder, nblocks) as block_loop:
            block = block_loop.index
            first = builder.mul(block, block_bytes)
            for total in partial:
                builder.store(zero, total)
            step = ir.Constant(block_bytes.type, BYTES_PER_STEP)
            with cgutils.for_range_slice(builder, ir.Constant(block_bytes.type, 0), block_bytes,
                                         step) as (offset, _):
                index = builder.add(first, offset)
                accumulate(index, partial[0], partial[1])
                accumulate(builder.add(index, ir.Constant(index.type, 8)), partial[2], partial[3])
            block_sum = builder.fadd(builder.fadd(builder.load(partial[0]), builder.load(partial[1])),
                                     builder.fadd(builder.load(partial[2]), builder.load(partial[3])))
            scale = ir_.broadcast(builder.load(builder.gep(scales, [block])))
            builder.store(builder.call(ir_.fma, [block_sum, scale, builder.load(row_sum)]), row_sum)
        return ir_.horizontal_sum(builder.load(row_sum))

    return signature, codegen


@intrinsic
def avx2_axpy_row(typingctx, packed, out_even, out_odd, coefs, shifts, nblocks, block_bytes,
                  codebook):
    """out[i] += coef[block] · (codebook[code_i] − shift[block]) over one packed row.

    ``out_even``/``out_odd`` point at float32 accumulators for the row's even and odd
    elements, ``coefs``/``shifts`` at the row's first block. ``block_bytes`` % 16 == 0.
    """
    signature = types.void(_ADDRESS, _ADDRESS, _ADDRESS, _ADDRESS, _ADDRESS, _ADDRESS, _ADDRESS,
                           _ADDRESS)

    def codegen(context, builder, sig, args):
        packed_at, even_at, odd_at, coefs_at, shifts_at, nblocks, block_bytes, codebook_at = args
        ir_ = _Builder(builder, codebook_at)
        packed, out_even, out_odd = ir_.pointer(packed_at, _I8), ir_.pointer(even_at, _F32), ir_.pointer(odd_at, _F32)
        coefs, shifts = ir_.pointer(coefs_at, _F32), ir_.pointer(shifts_at, _F32)

        with cgutils.for_range(builder, nblocks) as block_loop:
            block = block_loop.index
            first = builder.mul(block, block_bytes)
            coef = ir_.broadcast(builder.load(builder.gep(coefs, [block])))
            shift = ir_.broadcast(builder.load(builder.gep(shifts, [block])))
            step = ir.Constant(block_bytes.type, 8)
            with cgutils.for_range_slice(builder, ir.Constant(block_bytes.type, 0), block_bytes,
                                         step) as (offset, _):
                index = builder.add(first, offset)
                even_codes, odd_codes = ir_.load_codes(packed, index)
                for codes, out in ((even_codes, out_even), (odd_codes, out_odd)):
                    weights = builder.fsub(ir_.lookup(codes), shift)
                    ir_.store_v8f(builder.call(ir_.fma, [weights, coef, ir_.load_v8f(out, index)]),
                                  out, index)
        return context.get_dummy_value()

    return signature, codegen
