"""The float dtypes a weight may come in, and exact conversions to and from float32.

Quantization always works on float32 (bf16 and f16 widen to it exactly); the
dequantized result is rounded back to the weight's own dtype, round-to-nearest-even,
as bitsandbytes does. bfloat16 arrays are ``ml_dtypes.bfloat16``; raw bf16 bit
patterns stored as uint16 are turned into that with :func:`bfloat16_from_bits`.
"""

import ml_dtypes
import numpy as np

from qlora_np.errors import DTypeError

FLOAT_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
}
"""Dtypes accepted as weights, by name. float64 is quantized from its float32 rounding."""


def float_dtype_name(dtype):
    """The name in FLOAT_DTYPES of ``dtype``, or a DTypeError naming what is accepted."""
    native = np.dtype(dtype).newbyteorder("=")          # big-endian floats are floats too
    for name, known in FLOAT_DTYPES.items():
        if native == known:
            return name
    raise DTypeError(f"expected a float array ({', '.join(FLOAT_DTYPES)}), got dtype {np.dtype(dtype)}")


def resolve_dtype(dtype):
    """A dtype given as a name or numpy dtype → its FLOAT_DTYPES name."""
    if isinstance(dtype, str):
        if dtype not in FLOAT_DTYPES:
            raise DTypeError(f"dtype must be one of {list(FLOAT_DTYPES)}, got {dtype!r}")
        return dtype
    try:
        return float_dtype_name(dtype)
    except TypeError:
        raise DTypeError(f"dtype must be one of {list(FLOAT_DTYPES)}, got {dtype!r}") from None


def as_float32_flat(array):
    """Row-major flattened float32 copy-or-view of a float array: (n,) float32."""
    return np.ascontiguousarray(array, dtype=np.float32).reshape(-1)


def cast_from_float32(values, dtype_name):
    """Round float32 values to ``dtype_name`` (round-to-nearest-even)."""
    return values.astype(FLOAT_DTYPES[dtype_name], copy=False)


def bfloat16_from_bits(bits):
    """View raw bfloat16 bit patterns (uint16) as an ``ml_dtypes.bfloat16`` array."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise DTypeError(f"bfloat16 bit patterns must be uint16, got {bits.dtype}")
    return bits.view(ml_dtypes.bfloat16)
