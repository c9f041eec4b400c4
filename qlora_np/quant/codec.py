"""Public quantize / dequantize: validate the input, pick a backend, build the result.

The backends (:mod:`qlora_np.quant.backends`) give the same bytes: "numba" (the default) or
"reference" (plain NumPy). Work runs where the data lives: a tensor on "cuda" (``QuantizedTensor.to("cuda")``, or
``quantize(..., device="cuda")``, or quantizing a GPU device array) runs the numba.cuda
kernels of :mod:`qlora_np.kernels.cuda.kernels`, and its results are device arrays.
"""

import numpy as np

from qlora_np.dtypes import as_float32_flat, float_dtype_name
from qlora_np.errors import BlocksizeError, DTypeError, InvalidValueError, UnknownFormatError
from qlora_np.kernels.cuda.device import is_device_array
from qlora_np.quant.backends import cuda_kernels, decode, get_backend
from qlora_np.quant.codebooks import get_format
from qlora_np.quant.tensor import BNB_BLOCKSIZES, QuantizedTensor, quantized_tensor_fields_for_double_quant

STRATEGIES = ("block", "channel", "tensor")


def quantize(array, quant_type="nf4", blocksize=64, double_quant=False, strategy="block",
             backend="numba", device=None):
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
        device: "cpu" or "cuda" (the result's arrays live there); None: "cuda" for a GPU
            device array (which must be float32), else "cpu".
    """
    fmt = get_format(quant_type)
    device = ("cuda" if is_device_array(array) else "cpu") if device is None else device
    kernels = get_backend(backend, device)
    if not is_device_array(array):
        array = np.asarray(array)
    dtype = float_dtype_name(array.dtype)
    if is_device_array(array) and dtype != "float32":
        raise DTypeError(f"a GPU array is quantized as float32 only, got {dtype}; cast it first")
    if array.size == 0:
        raise InvalidValueError(f"cannot quantize an empty array (shape {array.shape})")
    blocksize = _resolve_blocksize(array.shape, blocksize, strategy)
    if not isinstance(double_quant, (bool, np.bool_)):
        raise UnknownFormatError(f"double_quant must be True or False, got {double_quant!r}")

    flat = _flat_float32(array, device)                                  # (n,) float32
    with np.errstate(invalid="ignore", over="ignore"):      # NaN/inf are refused just below
        packed, absmax, zero_point = kernels.quantize_4bit(flat, blocksize, fmt.name)
    if not np.isfinite(_host(absmax)).all():
        _raise_non_finite(_host(flat), _host(absmax), blocksize)

    fields = dict(packed=packed, absmax=absmax, zero_point=zero_point, shape=array.shape,
                  dtype=dtype, quant_type=fmt.name, blocksize=blocksize,
                  codebook=fmt.codebook.copy(), strategy=strategy)
    if double_quant:
        codes, nested_absmax, offset = kernels.double_quantize(absmax)
        if not (np.isfinite(offset) and np.isfinite(_host(nested_absmax)).all()):
            raise InvalidValueError("cannot double-quantize these scales: their float32 mean "
                                    f"overflows (largest scale {_host(absmax).max()}); "
                                    "use double_quant=False")
        fields.update(quantized_tensor_fields_for_double_quant(codes, nested_absmax, offset))
    return QuantizedTensor(**fields).to(device)              # the codebooks join the codes there


def _flat_float32(array, device):
    """``array`` flattened row-major to (n,) float32 on ``device`` (copied over if elsewhere)."""
    if is_device_array(array):
        flat = array.reshape(-1)
        return flat if device == "cuda" else cuda_kernels().to_host(flat)
    flat = as_float32_flat(array)
    return cuda_kernels().to_device(flat) if device == "cuda" else flat


def _host(array):
    """A NumPy array of ``array``'s values, copied from the GPU if it lives there."""
    return cuda_kernels().to_host(array) if is_device_array(array) else array


def dequantize(qt, dtype=None, backend="numba"):
    """Decode a :class:`QuantizedTensor` to an array of its shape, in its dtype (or ``dtype``).

    A tensor on the GPU decodes to a float32 device array (the GPU kernels cast nothing).
    """
    if not isinstance(qt, QuantizedTensor):
        raise UnknownFormatError(f"dequantize expects a QuantizedTensor, got {type(qt).__name__}")
    return decode(qt, dtype, backend)


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
        raise InvalidValueError(f"cannot quantize non-finite values: {bad.size} NaN/inf element(s) "
                                "(or beyond the float32 range), "
                                f"the first at flat index {first} (value {flat[first]})")
    block = int(np.flatnonzero(~np.isfinite(absmax))[0])
    raise InvalidValueError(f"block {block} (elements {block * blocksize}…) spans more than the "
                            "float32 range, so its scale overflows")
