"""Public quantize / dequantize: validate the input, pick a backend, build the result.

Backends implement the same four functions (``quantize_4bit``, ``dequantize_4bit``,
``double_quantize``, ``dequantize_absmax``) with the same bytes out:

* ``"numba"``     — parallel Numba kernels (:mod:`qlora_np.kernels.cpu`), the default;
* ``"reference"`` — the plain NumPy teaching version (:mod:`qlora_np.reference`).
"""

import numpy as np

from . import reference
from .codebooks import get_format
from .dtypes import as_float32_flat, cast_from_float32, float_dtype_name, resolve_dtype
from .errors import BlocksizeError, InvalidValueError, UnknownFormatError
from .tensor import BNB_BLOCKSIZES, QuantizedTensor, quantized_tensor_fields_for_double_quant

STRATEGIES = ("block", "channel", "tensor")


def get_backend(backend):
    """The module implementing the kernels for ``backend`` ("numba" or "reference")."""
    if backend == "reference":
        return reference
    if backend == "numba":
        from .kernels import cpu
        return cpu
    raise UnknownFormatError(f"backend must be 'numba' or 'reference', got {backend!r}")


def quantize(array, quant_type="nf4", blocksize=64, double_quant=False, strategy="block",
             backend="numba"):
    """Quantize a float array to 4 bits; returns a :class:`QuantizedTensor`.

    Args:
        array: float32 / float16 / bfloat16 (ml_dtypes) / float64, any shape, not empty,
            all values finite. It is flattened row-major, as bitsandbytes does.
        quant_type: "nf4", "fp4", "int4" (symmetric) or "int4_asym" (zero point).
        blocksize: elements per scale for ``strategy="block"``: one of bitsandbytes'
            sizes (32 … 4096) or any other positive even number.
        double_quant: also 8-bit quantize the scales (QLoRA's double quantization).
        strategy: "block"; "channel" (one scale per row of the last axis); "tensor"
            (one scale for everything). ``blocksize`` is ignored for the latter two.
        backend: "numba" (default) or "reference".
    """
    fmt = get_format(quant_type)
    kernels = get_backend(backend)
    array = np.asarray(array)
    dtype = float_dtype_name(array.dtype)
    if array.size == 0:
        raise InvalidValueError(f"cannot quantize an empty array (shape {array.shape})")
    blocksize = _resolve_blocksize(array.shape, blocksize, strategy)
    if not isinstance(double_quant, (bool, np.bool_)):
        raise UnknownFormatError(f"double_quant must be True or False, got {double_quant!r}")

    flat = as_float32_flat(array)                                        # (n,) float32
    packed, absmax, zero_point = kernels.quantize_4bit(flat, blocksize, fmt.name)
    if not np.isfinite(absmax).all():
        _raise_non_finite(flat, absmax, blocksize)

    fields = dict(packed=packed, absmax=absmax, zero_point=zero_point, shape=array.shape,
                  dtype=dtype, quant_type=fmt.name, blocksize=blocksize,
                  codebook=fmt.codebook.copy(), strategy=strategy)
    if double_quant:
        fields.update(quantized_tensor_fields_for_double_quant(*kernels.double_quantize(absmax)))
    return QuantizedTensor(**fields)


def dequantize(qt, dtype=None, backend="numba"):
    """Decode a :class:`QuantizedTensor` to an array of its shape, in its dtype (or ``dtype``)."""
    if not isinstance(qt, QuantizedTensor):
        raise UnknownFormatError(f"dequantize expects a QuantizedTensor, got {type(qt).__name__}")
    kernels = get_backend(backend)
    out_dtype = qt.dtype if dtype is None else resolve_dtype(dtype)
    flat = kernels.dequantize_4bit(qt.packed, scales(qt, backend), qt.zero_point, qt.size,
                                   qt.blocksize, qt.codebook)            # (n,) float32
    return cast_from_float32(flat, out_dtype).reshape(qt.shape)


def scales(qt, backend="numba"):
    """The float32 scale of every block of ``qt`` (decoding the nested codes if double-quantized)."""
    if not qt.double_quant:
        return qt.absmax
    return get_backend(backend).dequantize_absmax(qt.absmax, qt.nested_absmax, qt.offset,
                                                  qt.nested_code, qt.nested_blocksize)


def _resolve_blocksize(shape, blocksize, strategy):
    """The block size a strategy implies for an array of ``shape``."""
    if strategy == "tensor":
        return int(np.prod(shape, dtype=np.int64))
    if strategy == "channel":
        return int(shape[-1]) if len(shape) else 1
    if strategy != "block":
        raise UnknownFormatError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if isinstance(blocksize, (bool, np.bool_)) or not isinstance(blocksize, (int, np.integer)):
        raise BlocksizeError(f"blocksize must be an int, got {blocksize!r}")
    blocksize = int(blocksize)
    if blocksize in BNB_BLOCKSIZES or (blocksize > 0 and blocksize % 2 == 0):
        return blocksize
    raise BlocksizeError(f"blocksize must be one of bitsandbytes' {BNB_BLOCKSIZES} or another "
                         f"positive even number, got {blocksize}")


def _raise_non_finite(flat, absmax, blocksize):
    bad = np.flatnonzero(~np.isfinite(flat))
    if bad.size:
        first = int(bad[0])
        raise InvalidValueError(f"cannot quantize non-finite values: {bad.size} NaN/inf element(s), "
                                f"the first at flat index {first} (value {flat[first]})")
    block = int(np.flatnonzero(~np.isfinite(absmax))[0])
    raise InvalidValueError(f"block {block} (elements {block * blocksize}…) spans more than the "
                            "float32 range, so its scale overflows")
