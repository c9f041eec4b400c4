"""AVX2 and AVX-512 building blocks for the fused 4-bit products, written as Numba intrinsics.

Numba cannot vectorise ``codebook[code]`` (a gather), so the fused products decode
codes with register lookups instead, in one of two ways:

* **permute** (AVX-512): 8 packed bytes are broadcast to every 64-bit lane, a variable
  shift (``vpsrlvd``) brings each lane's code to its low 4 bits, and one ``vpermps``
  looks 16 codes up among the 16 float32 entries held in one register: 3 operations per
  16 weights. The 16 values come out in :data:`WIDE_ORDER`.
* **shuffle** (AVX2): the 16 entries are split into 4 byte planes (plane k holds byte k
  of every entry); ``vpshufb`` looks up 32 codes in one plane at once, and two rounds of
  unpacks (bytes → 16-bit → 32-bit) reassemble the floats: 12 shuffles per 32 weights,
  in :data:`GROUP_ORDER` (the unpacks work inside 128-bit lanes).

Which one an intrinsic compiles is chosen by the table it is handed
(:func:`decode_table`: the float32 codebook, or its uint8 planes). Either way the callers
permute x (or un-permute the result) once per call with :func:`lane_order`, not once per
weight row.

Two row functions, each walking whole blocks of weight rows:

* ``avx2_dot_rows1/4`` — Σ_i (codebook[code_i]·scale) · x_i for 1 or 4 rows of x   (x @ W.T)
* ``avx2_axpy_rows1/4``, ``avx2_axpy_wrows`` — out_i += coef_block · (codebook[code_i] −
  shift_block) for 1 or 4 rows of g, or AXPY_W_ROWS (8) W rows into 1 row of g   (g @ W)

and, for batches, ``avx2_decode_panel`` (a strip of W rows decoded and scaled into a
buffer) with the register tiles that multiply such a panel with many rows
(``avx2_panel_dot*``, ``avx2_panel_axpy*``).

They are only compiled and called where the CPU has AVX2 and FMA
(:data:`qlora_np.kernels.features.HAS_AVX2`), the permute decode only where it also has
AVX-512F/VL (``features.HAS_AVX512``); the portable Numba
functions in :mod:`qlora_np.kernels.products` compute the same sums.
"""

from functools import lru_cache

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from qlora_np.kernels import features

BYTES_PER_STEP = 16
"""Packed bytes one decode step consumes (32 weights): block byte counts must be multiples."""

GROUP_ORDER = np.array([2 * t + odd for k in range(4) for odd in (1, 0) for t in range(4 * k, 4 * k + 4)])
"""Which of 32 consecutive weights each decoded lane holds: 4 vectors of 8 lanes, each
the odd then the even elements of 8 consecutive pairs (lane halves = low / high nibbles)."""


WIDE_ORDER = np.array([16 * k + t + 8 * high for k in range(2) for t in range(8) for high in (0, 1)])
"""Which of 32 consecutive weights each lane of the permute decode's 2 vectors of 16 holds:
weights t and 8 + t of each 16 in neighbouring lanes (the low and the high 32 bits of a
64-bit lane see bytes 0–3 and 4–7 of its 8)."""

WIDE_SHIFTS = [8 * (t // 2) + 4 * (1 - t % 2) for t in range(8) for _ in (0, 1)]
"""Bit offset of each 32-bit lane's code in its 4 bytes (the first weight of a byte is its
high nibble)."""


INT8_ORDER = np.array([2 * t + 1 for t in range(16)] + [2 * t for t in range(16)])
"""Which of 32 consecutive weights each byte of :meth:`_Builder.codes32` holds: odd, then even."""

INT8_ORDER_64 = np.array([2 * t + 1 for t in range(32)] + [2 * t for t in range(32)])
"""The same for 64 weights read as 32 bytes at once (blocks of 64): low nibbles, then high."""


def lane_order(n, table):
    """Index array (n,) that puts n (a multiple of 32) elements into the lane order of the
    decode that reads ``table`` (:func:`decode_table`): WIDE_ORDER or GROUP_ORDER (cached)."""
    return _order_of(n, table.dtype == np.float32)


@lru_cache(maxsize=64)
def _order_of(n, wide):
    order = (np.arange(0, n, 32)[:, None] + (WIDE_ORDER if wide else GROUP_ORDER)[None, :]).reshape(-1)
    order.setflags(write=False)
    return order


def decode_table(codebook):
    """What the fused decode looks codes up in: the (16,) float32 codebook itself for the
    permute decode (:data:`qlora_np.kernels.features.PERMUTE_DECODE`), else its byte planes (:func:`codebook_planes`).
    The intrinsics pick their decode from this array's dtype when they are compiled."""
    if features.PERMUTE_DECODE:
        return _codebook_of(np.ascontiguousarray(codebook, np.float32).tobytes())
    return codebook_planes(codebook)


@lru_cache(maxsize=64)
def _codebook_of(codebook_bytes):
    table = np.frombuffer(codebook_bytes, np.float32).copy()
    table.setflags(write=False)
    return table


def codebook_planes(codebook):
    """(4, 32) uint8: byte k of each of the 16 float32 entries, twice (once per 128-bit lane)."""
    return _planes_of(np.ascontiguousarray(codebook, np.float32).tobytes())


@lru_cache(maxsize=64)
def _planes_of(codebook_bytes):
    planes = np.frombuffer(codebook_bytes, np.uint8).reshape(16, 4).T                    # (4, 16)
    planes = np.ascontiguousarray(np.concatenate([planes, planes], axis=1))              # (4, 32)
    planes.setflags(write=False)
    return planes


_F32 = ir.FloatType()
_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V8F = ir.VectorType(_F32, 8)
_V16F = ir.VectorType(_F32, 16)
_V16I = ir.VectorType(_I32, 16)
_V2F = ir.VectorType(_F32, 2)
_V8I = ir.VectorType(_I32, 8)
_V16B = ir.VectorType(_I8, 16)
_V32B = ir.VectorType(_I8, 32)
_V16H = ir.VectorType(ir.IntType(16), 16)


def _unpack_mask(width, high):
    """shufflevector mask of unpack{lo,hi} on two vectors of ``width`` items (2 × 128-bit lanes)."""
    half = width // 2
    first = half // 2 if high else 0
    mask = []
    for lane in (0, 1):
        for t in range(first, first + half // 2):
            mask += [lane * half + t, width + lane * half + t]
    return ir.Constant(ir.VectorType(_I32, width), mask)


class _Builder:
    """Helpers over an llvmlite IRBuilder: pointers, vector loads, the codebook decode."""

    def __init__(self, builder, planes_address, plane_count=4, permute=False):
        self.b = builder
        self.lanes = 16 if permute else 8                # floats in the vectors the decode returns
        self.vector = ir.VectorType(_F32, self.lanes)
        self.pshufb = self.declare(_V32B, [_V32B, _V32B], "llvm.x86.avx2.pshuf.b")
        self.fma = self.declare(self.vector, [self.vector] * 3, f"llvm.fma.v{self.lanes}f32")
        planes = self.pointer(planes_address, _I8)
        self.planes = [builder.load(builder.bitcast(builder.gep(planes, [ir.Constant(_I64, 32 * k)]),
                                                    _V32B.as_pointer()), align=1)
                       for k in range(plane_count)]
        self.permute = permute
        if permute:                                       # the 16 float32 entries in one register
            self.permute16 = self.declare(_V16F, [_V16F, _V16I], "llvm.x86.avx512.permvar.sf.512")
            self.codebook = self.load_vector(self.pointer(planes_address, _F32), ir.Constant(_I64, 0))

    @classmethod
    def for_table(cls, context, builder, table_type, table):
        """A builder whose decode32 reads ``table``, an array argument (:func:`decode_table`):
        the permute decode for the float32 codebook, the byte-shuffle decode for uint8 planes."""
        address = builder.ptrtoint(context.make_array(table_type)(context, builder, table).data, _I64)
        if table_type.dtype == types.float32:
            return cls(builder, address, plane_count=0, permute=True)
        return cls(builder, address)

    def declare(self, result, arguments, name):
        return cgutils.get_or_insert_function(self.b.module, ir.FunctionType(result, arguments), name)

    def pointer(self, address, element):
        return self.b.inttoptr(address, element.as_pointer())

    def row_pointer(self, address, stride, row):
        """float32 pointer to row ``row`` of a matrix at ``address`` with ``stride`` floats a row."""
        offset = self.b.mul(ir.Constant(stride.type, 4 * row), stride)
        return self.pointer(self.b.add(address, offset), _F32)

    def load_vector(self, base, index):
        """``lanes`` floats at base[index]."""
        return self.b.load(self.b.bitcast(self.b.gep(base, [index]), self.vector.as_pointer()), align=4)

    def store_vector(self, value, base, index):
        self.b.store(value, self.b.bitcast(self.b.gep(base, [index]), value.type.as_pointer()), align=4)

    def codes32(self, packed, index):
        """16 bytes at packed[index] → their 32 codes as bytes: the low nibbles (odd
        elements) in the first 128-bit lane, the high nibbles (even elements) in the second."""
        b = self.b
        raw = b.load(b.bitcast(b.gep(packed, [index]), _V16B.as_pointer()), align=1)
        low = b.and_(raw, ir.Constant(_V16B, [15] * 16))
        high = b.lshr(raw, ir.Constant(_V16B, [4] * 16))
        return b.shuffle_vector(low, high, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))

    def decode32(self, packed, index, shift=None, scale=None):
        """16 bytes at packed[index] → their 32 codebook values as vectors of ``lanes``
        floats, in the decode's lane order (:func:`lane_order`), each mapped to
        (value − shift) · scale (broadcast vectors, either may be None). The permute decode
        maps its 16 table entries instead of the 32 values: the same roundings, and the
        mapped table is hoisted out of a block's steps."""
        def mapped(values):
            values = values if shift is None else self.b.fsub(values, shift)
            return values if scale is None else self.b.fmul(values, scale)

        if self.permute:
            return self.decode32_permute(packed, index, mapped(self.codebook))
        return [mapped(values) for values in self.decode32_shuffle(packed, index)]

    def decode32_shuffle(self, packed, index):
        """decode32 with AVX2 byte shuffles, unmapped: 4 × 8 floats in GROUP_ORDER."""
        b = self.b
        codes = self.codes32(packed, index)
        p0, p1, p2, p3 = (b.call(self.pshufb, [plane, codes]) for plane in self.planes)
        halves = []
        for high_half in (False, True):                                 # bytes → 16-bit pairs
            mask = _unpack_mask(32, high_half)
            halves.append((b.bitcast(b.shuffle_vector(p0, p1, mask), _V16H),
                           b.bitcast(b.shuffle_vector(p2, p3, mask), _V16H)))
        floats = []
        for low_words, high_words in halves:                            # 16-bit pairs → floats
            for high_half in (False, True):
                mixed = b.shuffle_vector(low_words, high_words, _unpack_mask(16, high_half))
                floats.append(b.bitcast(mixed, _V8F))
        return floats

    def decode32_permute(self, packed, index, codebook):
        """decode32 with AVX-512: two :meth:`decode16_permute` steps."""
        return [self.decode16_permute(packed, self.b.add(index, ir.Constant(index.type, 8 * k)), codebook)
                for k in range(2)]

    def decode16_permute(self, packed, index, codebook):
        """The 8 bytes at packed[index] in all 8 64-bit lanes, shifted right (``vpsrlvd``) so
        that each 32-bit lane's low nibble is its code in WIDE_ORDER, then looked up among
        the 16 entries of ``codebook`` by one ``vpermps`` (which reads only the low 4 bits of
        each index): 3 operations for 16 weights, 1 of them a shuffle."""
        b = self.b
        word = b.load(b.bitcast(b.gep(packed, [index]), _I64.as_pointer()), align=1)
        wide = ir.VectorType(_I64, 8)
        lanes = b.insert_element(ir.Constant(wide, None), word, ir.Constant(_I32, 0))
        lanes = b.shuffle_vector(lanes, lanes, ir.Constant(_V8I, [0] * 8))
        codes = b.lshr(b.bitcast(lanes, _V16I), ir.Constant(_V16I, WIDE_SHIFTS))
        return b.call(self.permute16, [codebook, codes])

    def prefetch(self, pointer):
        """Ask for the cache line at ``pointer`` (an i8 pointer) ahead of its use (``prefetcht0``)."""
        function = self.declare(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32], "llvm.prefetch.p0")
        self.b.call(function, [pointer, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])

    def sum_of(self, pointers):
        """The sum of the vectors behind ``pointers``, as a tree."""
        values = [self.b.load(pointer) for pointer in pointers]
        while len(values) > 1:
            values = [self.b.fadd(values[j], values[j + 1]) if j + 1 < len(values) else values[j]
                      for j in range(0, len(values), 2)]
        return values[0]

    def broadcast_at(self, pointer, index):
        """pointer[index], a float32, in all ``lanes`` lanes."""
        return self.broadcast(self.b.load(self.b.gep(pointer, [index])))

    def broadcast(self, scalar):
        lanes = self.b.insert_element(ir.Constant(self.vector, None), scalar, ir.Constant(_I32, 0))
        everywhere = ir.Constant(ir.VectorType(_I32, self.lanes), [0] * self.lanes)
        return self.b.shuffle_vector(lanes, lanes, everywhere)

    def store_row_sums(self, totals, out_at, out_stride):
        """out[r · out_stride] = the sum of the lanes of totals[r] (vectors behind allocas)."""
        out = self.pointer(out_at, _F32)
        for r, total in enumerate(totals):
            where = self.b.gep(out, [self.b.mul(ir.Constant(out_stride.type, r), out_stride)])
            self.b.store(self.horizontal_sum(self.b.load(total)), where)

    def horizontal_sum(self, vector):
        """The sum of a vector's lanes as a tree, halves first (3 dependent adds for 8, not 7)."""
        width = vector.type.count
        while width > 1:
            width //= 2
            halves = [ir.Constant(ir.VectorType(_I32, width), list(range(start, start + width)))
                      for start in (0, width)]
            low, high = (self.b.shuffle_vector(vector, vector, half) for half in halves)
            vector = self.b.fadd(low, high)
        return self.b.extract_element(vector, ir.Constant(_I32, 0))


_ADDRESS = types.intp


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
    def dot_rows(typingctx, packed, x_ordered, x_stride, scales, nblocks, block_bytes, planes, out,
                 out_stride):
        signature = types.void(*([_ADDRESS] * 6), planes, _ADDRESS, _ADDRESS)

        def codegen(context, builder, sig, args):
            (packed_at, x_at, x_stride, scales_at, nblocks, block_bytes, planes_value, out_at,
             out_stride) = args
            ir_ = _Builder.for_table(context, builder, sig.args[6], planes_value)
            packed, scales = ir_.pointer(packed_at, _I8), ir_.pointer(scales_at, _F32)
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


AVX2_DOT_ROWS = 4
"""How many rows of x (or g) one call of the 4-row intrinsics handles per weight row."""

avx2_dot_rows1 = _make_dot_rows(1, 4)
avx2_dot_rows4 = _make_dot_rows(AVX2_DOT_ROWS, 2)


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
    interleaved streams, and without this the product ran at 1.6–1.7× ``x @ W.T`` on
    8192×2048 with W out of cache, 1.0–1.2× with it. (Past the last row of a call this
    prefetches bytes it will not read, which is harmless: a prefetch never faults.)
    """
    @intrinsic
    def axpy_rows(typingctx, packed, row_bytes, out_ordered, out_stride, g, g_stride, scales, shifts, nblocks,
                  block_bytes, planes):
        signature = types.void(*([_ADDRESS] * 10), planes)

        def codegen(context, builder, sig, args):
            (packed_at, row_bytes, out_at, out_stride, g_at, g_stride, scales_at, shifts_at, nblocks,
             block_bytes, planes_value) = args
            ir_ = _Builder.for_table(context, builder, sig.args[10], planes_value)
            size = nblocks.type
            packed_rows = [ir_.pointer(builder.add(packed_at, builder.mul(ir.Constant(size, q), row_bytes)),
                                       _I8) for q in range(w_rows)]
            g, scales, shifts = (ir_.pointer(at, _F32) for at in (g_at, scales_at, shifts_at))
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
                        ir_.prefetch(builder.bitcast(builder.gep(table, [ahead]), _I8.as_pointer()))
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
"""How many W rows one call of ``avx2_axpy_wrows`` adds into a single output row."""

avx2_axpy_rows1 = _make_axpy_rows(1)
avx2_axpy_rows4 = _make_axpy_rows(AVX2_DOT_ROWS)
avx2_axpy_wrows = _make_axpy_rows(1, AXPY_W_ROWS)


# ---------------------------------------------------------------------------
# Int8 activations (opt-in, as llama.cpp does): integer dot products of 32 weights
# ---------------------------------------------------------------------------

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
        signature = types.void(*([_ADDRESS] * 11))

        def codegen(context, builder, sig, args):
            (packed_at, xq_at, xq_stride, x_scales_at, x_scales_stride, scales_at, nblocks,
             block_bytes, table_at, out_at, out_stride) = args
            ir_ = _Builder(builder, table_at, plane_count=1)
            sign = ir_.declare(_V32B, [_V32B, _V32B], "llvm.x86.avx2.psign.b")
            pairs = ir_.declare(_V16H, [_V32B, _V32B], "llvm.x86.avx2.pmadd.ub.sw")
            quads = ir_.declare(_V8I, [_V16H, _V16H], "llvm.x86.avx2.pmadd.wd")
            ones = ir.Constant(_V16H, [1] * 16)
            packed, scales = ir_.pointer(packed_at, _I8), ir_.pointer(scales_at, _F32)
            xq_rows = [ir_.pointer(builder.add(xq_at, builder.mul(ir.Constant(xq_stride.type, r), xq_stride)),
                                   _I8) for r in range(rows)]
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
                    xq = builder.load(builder.bitcast(where, _V32B.as_pointer()), align=1)
                    products = builder.call(pairs, [magnitudes, builder.call(sign, [xq, weights])])
                    lane_sums = builder.sitofp(builder.call(quads, [products, ones]), _V8F)
                    sums.append((lane_sums, ir_.broadcast_at(group_scales[r], group)))
                return sums

            def sums_of_64(index):
                """Each row's 8 float lane sums of the 64 products of the block at packed[index]
                (32 bytes), lanes 0–3 times group 0's x scale and lanes 4–7 times group 1's.

                xq is stored as INT8_ORDER_64 for this: the odd elements of both groups, then
                the even ones, matching the low and the high nibbles of the 32 bytes."""
                raw = builder.load(builder.bitcast(builder.gep(packed, [index]), _V32B.as_pointer()), align=1)
                low = builder.and_(raw, ir.Constant(_V32B, [15] * 32))
                high = builder.lshr(raw, ir.Constant(_V32B, [4] * 32))
                weights = [builder.call(ir_.pshufb, [ir_.planes[0], codes]) for codes in (low, high)]
                magnitudes = [builder.call(sign, [w, w]) for w in weights]
                group = builder.udiv(index, step)
                sums = []
                for r in range(rows):
                    lane_sums = None
                    for half, (w, m) in enumerate(zip(weights, magnitudes)):
                        where = builder.gep(xq_rows[r], [builder.add(builder.add(index, index),
                                                                     ir.Constant(index.type, 32 * half))])
                        xq = builder.load(builder.bitcast(where, _V32B.as_pointer()), align=1)
                        signed = builder.call(sign, [xq, w])
                        quad = builder.call(quads, [builder.call(pairs, [m, signed]), ones])
                        lane_sums = quad if lane_sums is None else builder.add(lane_sums, quad)
                    where = builder.bitcast(builder.gep(group_scales[r], [group]), _V2F.as_pointer())
                    two_scales = builder.load(where, align=4)
                    spread = builder.shuffle_vector(two_scales, two_scales,
                                                    ir.Constant(_V8I, [0] * 4 + [1] * 4))
                    sums.append(builder.fmul(builder.sitofp(lane_sums, _V8F), spread))
                return sums

            zero = ir.Constant(_V8F, None)
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
avx2_dot_rows4_int8 = _make_dot_rows_int8(AVX2_DOT_ROWS)


# ---------------------------------------------------------------------------
# Quantize: the rank of each scaled value among the 15 midpoints, by binary search
# ---------------------------------------------------------------------------

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
        signature = types.void(*([_ADDRESS] * 7))

        def codegen(context, builder, sig, args):
            values_at, nblocks, blocksize, table_at, lut_at, packed_at, absmax_at = args
            ir_ = _Builder(builder, lut_at, plane_count=1)
            permute = ir_.declare(_V8F, [_V8F, _V8I], "llvm.x86.avx2.permps")
            largest_of = ir_.declare(_I32, [_V8I], "llvm.vector.reduce.umax.v8i32")
            values, table = ir_.pointer(values_at, _F32), ir_.pointer(table_at, _F32)
            packed, absmax_bits = ir_.pointer(packed_at, _I8), ir_.pointer(absmax_at, _I32)
            middle, low_half, high_half, level3, level4 = (ir_.load_vector(table, ir.Constant(_I64, 8 * k))
                                                           for k in range(5))
            one = ir.Constant(_V8I, [1] * 8)
            size = blocksize.type

            def add_bit(index, above):
                """index · 2 + above (a compare result)."""
                return builder.or_(builder.shl(index, one), builder.zext(above, _V8I))

            def codes_of(at, scale):
                scaled = builder.fmul(ir_.load_vector(values, at), scale)
                above = builder.fcmp_ordered(">", scaled, middle)
                index = builder.zext(above, _V8I)
                threshold = builder.select(above, high_half, low_half)
                index = add_bit(index, builder.fcmp_ordered(">", scaled, threshold))
                threshold = builder.call(permute, [level3, index])
                index = add_bit(index, builder.fcmp_ordered(">", scaled, threshold))
                threshold = builder.call(permute, [level4, index])
                index = add_bit(index, builder.fcmp_ordered(">", scaled, threshold))
                if reorder:
                    looked_up = builder.call(ir_.pshufb, [ir_.planes[0], builder.bitcast(index, _V32B)])
                    index = builder.and_(builder.bitcast(looked_up, _V8I), ir.Constant(_V8I, [15] * 8))
                return index

            with cgutils.for_range(builder, nblocks) as block_loop:
                start = builder.mul(block_loop.index, blocksize)
                stop = builder.add(start, blocksize)
                # 1. absmax: the unsigned max of the bit patterns, sign bit cleared
                largest = cgutils.alloca_once_value(builder, ir.Constant(_V8I, None))
                with cgutils.for_range_slice(builder, start, stop, ir.Constant(size, 8)) as (at, _):
                    bits = builder.bitcast(ir_.load_vector(values, at), _V8I)
                    magnitude = builder.and_(bits, ir.Constant(_V8I, [0x7FFFFFFF] * 8))
                    so_far = builder.load(largest)
                    builder.store(builder.select(builder.icmp_unsigned(">", magnitude, so_far), magnitude,
                                                 so_far), largest)
                absmax_bits_value = builder.call(largest_of, [builder.load(largest)])
                builder.store(absmax_bits_value, builder.gep(absmax_bits, [block_loop.index]))
                # 2. one reciprocal a block: 1 / max(absmax, 1e-38)
                absmax = builder.bitcast(absmax_bits_value, _F32)
                tiny = ir.Constant(_F32, float(np.float32(1e-38)))
                floored = builder.select(builder.fcmp_ordered(">", absmax, tiny), absmax, tiny)
                scale = ir_.broadcast(builder.fdiv(ir.Constant(_F32, 1.0), floored))
                # 3. codes of 16 values a step, packed into 8 bytes
                with cgutils.for_range_slice(builder, start, stop, ir.Constant(size, RANK_STEP)) as (at, _):
                    first = codes_of(at, scale)
                    second = codes_of(builder.add(at, ir.Constant(size, 8)), scale)
                    evens = builder.shuffle_vector(first, second, ir.Constant(_V8I, list(range(0, 16, 2))))
                    odds = builder.shuffle_vector(first, second, ir.Constant(_V8I, list(range(1, 16, 2))))
                    pairs = builder.or_(builder.shl(evens, ir.Constant(_V8I, [4] * 8)), odds)
                    where = builder.gep(packed, [builder.lshr(at, ir.Constant(size, 1))])
                    builder.store(builder.trunc(pairs, ir.VectorType(_I8, 8)),
                                  builder.bitcast(where, ir.VectorType(_I8, 8).as_pointer()), align=1)
            return context.get_dummy_value()

        return signature, codegen

    return quantize_blocks


avx2_quantize_blocks = _make_quantize_blocks(reorder=False)
avx2_quantize_blocks_reordered = _make_quantize_blocks(reorder=True)


# ---------------------------------------------------------------------------
# Dequantize (AVX-512): the permute decode, put back into element order
# ---------------------------------------------------------------------------

DEQUANTIZE_STEP = 8
"""Packed bytes one step of :func:`avx512_dequantize_blocks` decodes (16 values): block byte
counts must be multiples."""

_WIDE_TO_NATURAL = [int(np.flatnonzero(WIDE_ORDER[:16] == i)[0]) for i in range(16)]


@intrinsic
def avx512_dequantize_blocks(typingctx, packed, scales, shifts, nblocks, block_bytes, table, out):
    """out = (codebook[code] − shift) · scale for ``nblocks`` whole blocks, in element order.

    Per block the 16 table entries are mapped to (entry − shift) · scale (the very float32
    operations of the scalar loop, so the values are identical); per 8 packed bytes the
    permute decode gives 16 values in WIDE_ORDER and one more ``vpermps`` puts them in
    element order for a 64-byte store.
    """
    signature = types.void(*([_ADDRESS] * 5), table, _ADDRESS)

    def codegen(context, builder, sig, args):
        packed_at, scales_at, shifts_at, nblocks, block_bytes, table_value, out_at = args
        ir_ = _Builder.for_table(context, builder, sig.args[5], table_value)
        packed, out = ir_.pointer(packed_at, _I8), ir_.pointer(out_at, _F32)
        scales, shifts = ir_.pointer(scales_at, _F32), ir_.pointer(shifts_at, _F32)
        to_natural = ir.Constant(_V16I, _WIDE_TO_NATURAL)
        size = nblocks.type
        with cgutils.for_range(builder, nblocks) as block_loop:
            block = block_loop.index
            shift, scale = ir_.broadcast_at(shifts, block), ir_.broadcast_at(scales, block)
            codebook = builder.fmul(builder.fsub(ir_.codebook, shift), scale)
            first = builder.mul(block, block_bytes)
            with cgutils.for_range_slice(builder, ir.Constant(size, 0), block_bytes,
                                         ir.Constant(size, DEQUANTIZE_STEP)) as (offset, _):
                index = builder.add(first, offset)
                values = ir_.decode16_permute(packed, index, codebook)
                ordered = builder.call(ir_.permute16, [values, to_natural])
                ir_.store_vector(ordered, out, builder.add(index, index))
        return context.get_dummy_value()

    return signature, codegen


# ---------------------------------------------------------------------------
# Panels: decode a strip of W once into a small buffer, then reuse it for many rows
# ---------------------------------------------------------------------------

STRIP = 16
"""Floats in one strip of a panel: the width the g @ W panel kernels work on (2 vectors)."""


@intrinsic
def avx2_decode_panel(typingctx, packed, row_bytes, scales, shifts, blocks_per_row, rows, first_step, steps,
                      steps_per_block, planes, panel, row_stride, strip_stride):
    """Decode weights 32·first_step … 32·(first_step + steps) of ``rows`` W rows into a panel.

    The weights of row r are (codebook[code] − shift) · scale of the 16 bytes at
    packed + r·row_bytes + 16·(first_step + s) for s < steps, in GROUP_ORDER (the decode's lane
    order); their block is (first_step + s) // steps_per_block of the row, whose scales and
    shifts start r·blocks_per_row after ``scales`` / ``shifts``. Weight j of the row's
    decoded strip goes to panel[r·row_stride + (j // STRIP)·strip_stride + j % STRIP]: row
    after row (row_stride = 32·steps, strip_stride = STRIP) or strip after strip
    (row_stride = STRIP, strip_stride = STRIP·rows).
    """
    signature = types.void(*([_ADDRESS] * 9), planes, *([_ADDRESS] * 3))

    def codegen(context, builder, sig, args):
        (packed_at, row_bytes, scales_at, shifts_at, blocks_per_row, rows, first_step, steps,
         steps_per_block, planes_value, panel_at, row_stride, strip_stride) = args
        ir_ = _Builder.for_table(context, builder, sig.args[9], planes_value)
        packed, panel = ir_.pointer(packed_at, _I8), ir_.pointer(panel_at, _F32)
        scales, shifts = ir_.pointer(scales_at, _F32), ir_.pointer(shifts_at, _F32)
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
        signature = types.void(*([_ADDRESS] * 5))

        def codegen(context, builder, sig, args):
            g_at, strip_at, count, out_at, out_stride = args
            ir_ = _Builder(builder, strip_at, plane_count=0)
            strip = ir_.pointer(strip_at, _F32)
            g_rows = [ir_.pointer(builder.add(g_at, ir.Constant(g_at.type, 4 * m)), _F32)
                      for m in range(rows)]
            out_rows = [ir_.row_pointer(out_at, out_stride, m) for m in range(rows)]
            sums = [[cgutils.alloca_once_value(builder, ir_.load_vector(out, ir.Constant(_I64, 8 * j)))
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
                    ir_.store_vector(builder.load(total), out, ir.Constant(_I64, 8 * j))
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
        signature = types.void(*([_ADDRESS] * 7))

        def codegen(context, builder, sig, args):
            x_at, x_stride, panel_at, panel_stride, count, out_at, out_stride = args
            ir_ = _Builder(builder, panel_at, plane_count=0)
            x_pointers = [ir_.row_pointer(x_at, x_stride, m) for m in range(x_rows)]
            w_pointers = [ir_.row_pointer(panel_at, panel_stride, o) for o in range(w_rows)]
            sums = [[cgutils.alloca_once_value(builder, ir.Constant(_V8F, None)) for _ in range(w_rows)]
                    for _ in range(x_rows)]
            with cgutils.for_range(builder, count) as loop:
                at = builder.mul(loop.index, ir.Constant(count.type, 8))
                weights = [ir_.load_vector(pointer, at) for pointer in w_pointers]
                for x_pointer, row_sums in zip(x_pointers, sums):
                    values = ir_.load_vector(x_pointer, at)
                    for w, total in zip(weights, row_sums):
                        builder.store(builder.call(ir_.fma, [w, values, builder.load(total)]), total)
            out = ir_.pointer(out_at, _F32)
            for m, row_sums in enumerate(sums):
                for o, total in enumerate(row_sums):
                    where = builder.gep(out, [builder.add(builder.mul(ir.Constant(out_stride.type, m),
                                                                      out_stride), ir.Constant(_I64, o))])
                    builder.store(builder.fadd(builder.load(where), ir_.horizontal_sum(builder.load(total))),
                                  where)
            return context.get_dummy_value()

        return signature, codegen

    return panel_dot


avx2_panel_dot3x4 = _make_panel_dot(3, 4)
avx2_panel_dot1x4 = _make_panel_dot(1, 4)
avx2_panel_dot3x1 = _make_panel_dot(3, 1)
avx2_panel_dot1x1 = _make_panel_dot(1, 1)
