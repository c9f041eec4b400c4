"""What every x86 intrinsic of the fused 4-bit products shares: the llvmlite IR types, the
:class:`Builder` helper with the two codebook decodes, the lane orders they produce, and the
lookup the decode reads (:func:`decode_table`).

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

Which one an intrinsic compiles is chosen by the lookup it is handed
(:func:`decode_table`: the float32 codebook, or its uint8 planes; :meth:`Builder.for_lookup`).
Either way the callers permute x (or un-permute the result) once per call with
:func:`lane_order`, not once per weight row.

The intrinsics built on this (:mod:`~qlora_np.kernels.x86.dot`, :mod:`~qlora_np.kernels.x86.int8`,
:mod:`~qlora_np.kernels.x86.quantize_search`, :mod:`~qlora_np.kernels.x86.dequantize`,
:mod:`~qlora_np.kernels.x86.panels`) are only compiled and called where the CPU has AVX2 and
FMA (:data:`qlora_np.kernels.features.HAS_AVX2`), the permute decode only where it also has
AVX-512F/VL (``features.HAS_AVX512``); the portable Numba functions in
:mod:`qlora_np.kernels.products` and :mod:`qlora_np.kernels.blockwise` compute the same sums.
"""

from functools import lru_cache

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils

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


def lane_order(n, lookup):
    """Index array (n,) that puts n (a multiple of 32) elements into the lane order of the
    decode that reads ``lookup`` (:func:`decode_table`): WIDE_ORDER or GROUP_ORDER (cached)."""
    return _order_of(n, lookup.dtype == np.float32)


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


# llvmlite types: scalars by width, vectors by lane count and element (F float32, I int32,
# B int8, H int16)
F32 = ir.FloatType()
I8 = ir.IntType(8)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
V8F = ir.VectorType(F32, 8)
V16F = ir.VectorType(F32, 16)
V16I = ir.VectorType(I32, 16)
V2F = ir.VectorType(F32, 2)
V8I = ir.VectorType(I32, 8)
V16B = ir.VectorType(I8, 16)
V32B = ir.VectorType(I8, 32)
V16H = ir.VectorType(ir.IntType(16), 16)


def _unpack_mask(width, high):
    """shufflevector mask of unpack{lo,hi} on two vectors of ``width`` items (2 × 128-bit lanes)."""
    half = width // 2
    first = half // 2 if high else 0
    mask = []
    for lane in (0, 1):
        for t in range(first, first + half // 2):
            mask += [lane * half + t, width + lane * half + t]
    return ir.Constant(ir.VectorType(I32, width), mask)


class Builder:
    """Helpers over an llvmlite IRBuilder: pointers, vector loads, the codebook decode.

    ``lookup_address`` is where the decode's lookup lies: with ``permute`` the 16 float32
    codebook entries, else ``plane_count`` byte planes of 32 bytes for ``vpshufb`` (0 where
    an intrinsic decodes nothing and only wants the helpers)."""

    def __init__(self, builder, lookup_address, plane_count=4, permute=False):
        self.b = builder
        self.lanes = 16 if permute else 8                # floats in the vectors the decode returns
        self.vector = ir.VectorType(F32, self.lanes)
        self.pshufb = self.declare(V32B, [V32B, V32B], "llvm.x86.avx2.pshuf.b")
        self.fma = self.declare(self.vector, [self.vector] * 3, f"llvm.fma.v{self.lanes}f32")
        planes = self.pointer(lookup_address, I8)
        self.planes = [builder.load(builder.bitcast(builder.gep(planes, [ir.Constant(I64, 32 * k)]),
                                                    V32B.as_pointer()), align=1)
                       for k in range(plane_count)]
        self.permute = permute
        if permute:                                       # the 16 float32 entries in one register
            self.permute16 = self.declare(V16F, [V16F, V16I], "llvm.x86.avx512.permvar.sf.512")
            self.codebook = self.load_vector(self.pointer(lookup_address, F32), ir.Constant(I64, 0))

    @classmethod
    def for_lookup(cls, context, builder, lookup_type, lookup):
        """A builder whose decode32 reads ``lookup``, an array argument (:func:`decode_table`):
        the permute decode for the float32 codebook, the byte-shuffle decode for uint8 planes."""
        address = builder.ptrtoint(context.make_array(lookup_type)(context, builder, lookup).data, I64)
        if lookup_type.dtype == types.float32:
            return cls(builder, address, plane_count=0, permute=True)
        return cls(builder, address)

    def declare(self, result, arguments, name):
        return cgutils.get_or_insert_function(self.b.module, ir.FunctionType(result, arguments), name)

    def pointer(self, address, element):
        return self.b.inttoptr(address, element.as_pointer())

    def row_pointer(self, address, stride, row):
        """float32 pointer to row ``row`` of a matrix at ``address`` with ``stride`` floats a row."""
        offset = self.b.mul(ir.Constant(stride.type, 4 * row), stride)
        return self.pointer(self.b.add(address, offset), F32)

    def load_vector(self, base, index):
        """``lanes`` floats at base[index]."""
        return self.b.load(self.b.bitcast(self.b.gep(base, [index]), self.vector.as_pointer()), align=4)

    def store_vector(self, value, base, index):
        self.b.store(value, self.b.bitcast(self.b.gep(base, [index]), value.type.as_pointer()), align=4)

    def codes32(self, packed, index):
        """16 bytes at packed[index] → their 32 codes as bytes: the low nibbles (odd
        elements) in the first 128-bit lane, the high nibbles (even elements) in the second."""
        b = self.b
        raw = b.load(b.bitcast(b.gep(packed, [index]), V16B.as_pointer()), align=1)
        low = b.and_(raw, ir.Constant(V16B, [15] * 16))
        high = b.lshr(raw, ir.Constant(V16B, [4] * 16))
        return b.shuffle_vector(low, high, ir.Constant(ir.VectorType(I32, 32), list(range(32))))

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
            halves.append((b.bitcast(b.shuffle_vector(p0, p1, mask), V16H),
                           b.bitcast(b.shuffle_vector(p2, p3, mask), V16H)))
        floats = []
        for low_words, high_words in halves:                            # 16-bit pairs → floats
            for high_half in (False, True):
                mixed = b.shuffle_vector(low_words, high_words, _unpack_mask(16, high_half))
                floats.append(b.bitcast(mixed, V8F))
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
        word = b.load(b.bitcast(b.gep(packed, [index]), I64.as_pointer()), align=1)
        wide = ir.VectorType(I64, 8)
        lanes = b.insert_element(ir.Constant(wide, None), word, ir.Constant(I32, 0))
        lanes = b.shuffle_vector(lanes, lanes, ir.Constant(V8I, [0] * 8))
        codes = b.lshr(b.bitcast(lanes, V16I), ir.Constant(V16I, WIDE_SHIFTS))
        return b.call(self.permute16, [codebook, codes])

    def prefetch(self, pointer):
        """Ask for the cache line at ``pointer`` (an i8 pointer) ahead of its use (``prefetcht0``)."""
        function = self.declare(ir.VoidType(), [I8.as_pointer(), I32, I32, I32], "llvm.prefetch.p0")
        self.b.call(function, [pointer, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])

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
        lanes = self.b.insert_element(ir.Constant(self.vector, None), scalar, ir.Constant(I32, 0))
        everywhere = ir.Constant(ir.VectorType(I32, self.lanes), [0] * self.lanes)
        return self.b.shuffle_vector(lanes, lanes, everywhere)

    def store_row_sums(self, totals, out_at, out_stride):
        """out[r · out_stride] = the sum of the lanes of totals[r] (vectors behind allocas)."""
        out = self.pointer(out_at, F32)
        for r, total in enumerate(totals):
            where = self.b.gep(out, [self.b.mul(ir.Constant(out_stride.type, r), out_stride)])
            self.b.store(self.horizontal_sum(self.b.load(total)), where)

    def horizontal_sum(self, vector):
        """The sum of a vector's lanes as a tree, halves first (3 dependent adds for 8, not 7)."""
        width = vector.type.count
        while width > 1:
            width //= 2
            halves = [ir.Constant(ir.VectorType(I32, width), list(range(start, start + width)))
                      for start in (0, width)]
            low, high = (self.b.shuffle_vector(vector, vector, half) for half in halves)
            vector = self.b.fadd(low, high)
        return self.b.extract_element(vector, ir.Constant(I32, 0))


ADDRESS = types.intp
"""The Numba type of the raw addresses the intrinsics take (``array.ctypes.data`` and offsets)."""
