"""A float32 exp that LLVM can vectorise, for the softmax and SiLU kernels.

Numba turns ``np.exp`` in a loop into one call of the C library's ``expf`` per element
(no SVML here), which keeps a loop scalar: a softmax over a row then costs several
times what NumPy's own SIMD exp does. :func:`exp32` is plain arithmetic instead, so
a loop that calls it compiles to vector instructions:

1. x = n·ln 2 + r with n = round(x / ln 2) and |r| ≤ ln 2 / 2 (ln 2 split in two
   parts, so that n·ln 2 is subtracted without rounding error);
2. e^r = 1 + r + r²·p(r), p a degree-4 polynomial fitted (least squares, relative
   error, on Chebyshev nodes) to (e^r − 1 − r) / r²;
3. 2^n = 2^a · 2^b with a = n >> 1, b = n − a, each built from its bits (the exponent
   field a + 127, shifted into place): the two factors stay normal floats over the
   whole range, and e^r · 2^a · 2^b rounds once, also where the result is subnormal.

Accuracy: within 1.4 units in the last place of the exact exp (NumPy's float32 exp
differs from it by at most 3) where e^x is a normal float32 (x in [−87.3, 88.72]);
subnormal results are rounded once; below −104 it returns 0 (as e^x rounds to), above
ln(largest float32) inf. NaN stays NaN.

The function is compiled without ``fastmath`` (said explicitly: Numba would otherwise
compile it with its caller's flags): reassociating step 1 would lose the exactness of
the split, and no-NaN assumptions would drop the NaN test. Callers may use ``fastmath``
for their own sums; LLVM inlines this function with its own, strict, flags.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_LOG2_E = np.float32(1.4426950408889634)
_LN2_HIGH = np.float32(0.693359375)                 # 9 significant bits: n · _LN2_HIGH is exact
_LN2_LOW = np.float32(-2.12194440e-4)               # ln 2 − _LN2_HIGH
_P0, _P1, _P2, _P3, _P4 = (np.float32(c) for c in (0.49999989, 0.16666518, 0.04166953,
                                                   0.00836892, 0.00137514))
_SMALLEST = np.float32(-104.0)                      # e^x below this rounds to 0
_LARGEST = np.float32(88.72284)                     # e^x above this overflows


@intrinsic
def float32_with_bits(typingctx, bits):
    """The float32 whose IEEE bits are the low 32 bits of the integer ``bits`` (a bitcast;
    also :mod:`qlora_np.kernels.portable.training`'s way back from its ordered keys)."""
    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())
    return types.float32(bits), codegen


@njit(cache=True, fastmath=False)        # set, so that it is not inherited from a fastmath caller
def exp32(x):
    """e^x for a float32 x, as described in the module docstring."""
    clamped = min(max(x, _SMALLEST), _LARGEST)
    n = np.floor(clamped * _LOG2_E + np.float32(0.5))                     # 1. x = n·ln 2 + r
    r = (clamped - n * _LN2_HIGH) - n * _LN2_LOW
    p = (((_P4 * r + _P3) * r + _P2) * r + _P1) * r + _P0                 # 2. e^r
    e_r = (p * r * r + r) + np.float32(1)
    a = np.int32(n) >> np.int32(1)                                        # 3. 2^n = 2^a · 2^b
    b = np.int32(n) - a
    two_to_a = float32_with_bits((a + np.int32(127)) << np.int32(23))
    two_to_b = float32_with_bits((b + np.int32(127)) << np.int32(23))
    result = (e_r * two_to_a) * two_to_b
    if x < _SMALLEST:
        result = np.float32(0)
    if x > _LARGEST:
        result = np.float32(np.inf)
    if x != x:
        result = x
    return result
