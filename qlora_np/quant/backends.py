"""The backends that run the blockwise kernels, and the decoding every product starts from.

A backend is a module with the same four functions (``quantize_4bit``, ``dequantize_4bit``,
``double_quantize``, ``dequantize_absmax``) and the same bytes out:

* ``"numba"``     — parallel Numba kernels (:mod:`qlora_np.kernels.blockwise`), the default;
* ``"reference"`` — the plain NumPy teaching version (:mod:`qlora_np.quant.reference`);
* on "cuda", the numba.cuda kernels of :mod:`qlora_np.kernels.cuda.kernels`.
"""

from qlora_np.dtypes import cast_from_float32, resolve_dtype
from qlora_np.errors import DeviceError, DTypeError, UnknownFormatError
from qlora_np.kernels import blockwise
from qlora_np.quant import reference

DEVICES = ("cpu", "cuda")


def cuda_kernels():
    """:mod:`qlora_np.kernels.cuda.kernels`, once numba.cuda imports and sees a GPU (or simulates one).

    Imported on first use, so the library works without numba-cuda and without a GPU;
    when either is missing, asking for "cuda" raises DeviceError saying which.
    """
    try:
        from qlora_np.kernels.cuda import kernels as cuda
    except ImportError as error:
        raise DeviceError("device 'cuda' needs numba.cuda: pip install 'qlora_np[cuda]' "
                          f"(importing it failed: {error})") from None
    cuda.require_gpu()
    return cuda


def get_backend(backend, device="cpu"):
    """The module implementing the kernels: ``backend`` "numba" or "reference" on the CPU,
    :mod:`qlora_np.kernels.cuda.kernels` on "cuda" (DeviceError without numba.cuda or a GPU)."""
    if device not in DEVICES:
        raise UnknownFormatError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda":
        if backend != "numba":
            raise UnknownFormatError(f"backend {backend!r} runs on the CPU; device 'cuda' takes 'numba'")
        return cuda_kernels()
    if backend == "reference":
        return reference
    if backend == "numba":
        return blockwise
    raise UnknownFormatError(f"backend must be 'numba' or 'reference', got {backend!r}")


def scales(qt, backend="numba"):
    """The float32 scale of every block of ``qt`` (decoding the nested codes if double-quantized).

    Decoded nested scales are kept on the tensor after the first call (4 bytes per block,
    outside ``nbytes``): products call this for every token, and decoding them each
    time cost more than the product for small layers.
    """
    if not qt.double_quant:
        return qt.absmax
    cached = qt.__dict__.get("_decoded_scales")
    if cached is None:
        cached = get_backend(backend, qt.device).dequantize_absmax(
            qt.absmax, qt.nested_absmax, qt.offset, qt.nested_code, qt.nested_blocksize)
        if qt.device == "cpu":
            cached.setflags(write=False)
        qt.__dict__["_decoded_scales"] = cached
    return cached


def decode(qt, dtype=None, backend="numba"):
    """A :class:`~qlora_np.quant.tensor.QuantizedTensor` decoded to an array of its shape, in its
    dtype (or ``dtype``); a tensor on the GPU decodes to a float32 device array (the GPU kernels
    cast nothing)."""
    kernels = get_backend(backend, qt.device)
    out_dtype = qt.dtype if dtype is None else resolve_dtype(dtype)
    if qt.device == "cuda" and dtype is not None and out_dtype != "float32":
        raise DTypeError(f"on the GPU dequantize gives float32, got dtype {out_dtype!r}; "
                         "use .to('cpu') for other dtypes")
    flat = kernels.dequantize_4bit(qt.packed, scales(qt, backend), qt.zero_point, qt.size,
                                   qt.blocksize, qt.codebook)            # (n,) float32
    if qt.device == "cuda":
        return flat.reshape(qt.shape)
    return cast_from_float32(flat, out_dtype).reshape(qt.shape)
