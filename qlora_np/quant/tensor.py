"""QuantizedTensor: packed 4-bit codes plus the scales that decode them.

It holds exactly what a bitsandbytes ``Params4bit`` and its ``QuantState`` hold, as
NumPy arrays, and converts to and from bitsandbytes' ``Linear4bit`` state-dict keys.
"""

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from qlora_np.dtypes import FLOAT_DTYPES
from qlora_np.errors import DTypeError, ShapeError, StateDictError, UnknownFormatError
from qlora_np.kernels.cuda.device import is_device_array
from qlora_np.quant.backends import DEVICES, cuda_kernels, decode
from qlora_np.quant.codebooks import NESTED_BLOCKSIZE, dynamic_map, get_format

MAX_ELEMENTS = 2 ** 48
"""Largest element count (and block size) a tensor may declare: far above any real weight,
far below int64 overflow, so a corrupt shape is refused instead of overflowing."""

BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Block sizes bitsandbytes' quantize_4bit accepts."""

ARRAY_FIELDS = ("packed", "absmax", "codebook", "zero_point", "nested_absmax", "nested_code")
"""The fields of a QuantizedTensor that :meth:`QuantizedTensor.to` moves between devices."""


@dataclass(eq=False)
class QuantizedTensor:
    """A float tensor stored as 4-bit codes with one scale per block.

    Attributes:
        packed:   (ceil(n/2),) uint8 — two codes a byte, first element in the high nibble.
        absmax:   (nblocks,) float32 scales, or uint8 codes of them when double-quantized.
        shape:    the original shape; n = prod(shape), flattened row-major.
        dtype:    name of the original float dtype ("float32", "float16", "bfloat16", "float64").
        quant_type: "nf4", "fp4", "int4" or "int4_asym".
        blocksize:  elements per block (the last block may be partial).
        codebook:   (16,) float32 values the codes index.
        zero_point: (nblocks,) uint8 for int4_asym, else None.
        nested_absmax, nested_code, offset, nested_blocksize: double quant only —
            per-256-chunk absmax (float32), the 256-entry map, the subtracted mean.
        strategy:   "block", "channel" or "tensor" — how blocksize was chosen.
    """

    packed: np.ndarray
    absmax: np.ndarray
    shape: tuple
    dtype: str
    quant_type: str
    blocksize: int
    codebook: np.ndarray
    zero_point: np.ndarray | None = None
    nested_absmax: np.ndarray | None = None
    nested_code: np.ndarray | None = None
    offset: np.float32 | None = None
    nested_blocksize: int | None = None
    strategy: str = "block"

    def __post_init__(self):
        self.shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in self.shape) or _product(self.shape) > MAX_ELEMENTS:
            raise ShapeError(f"shape must be non-negative sizes with at most {MAX_ELEMENTS} "
                             f"elements, got {self.shape}")
        for name in ("blocksize", "nested_blocksize"):
            value = getattr(self, name)
            if value is None and name == "nested_blocksize":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or not 0 < value <= MAX_ELEMENTS:
                raise ShapeError(f"{name} must be an int in 1…{MAX_ELEMENTS}, got {value!r}")
        if self.dtype not in FLOAT_DTYPES:
            raise DTypeError(f"dtype must be one of {list(FLOAT_DTYPES)}, got {self.dtype!r}")
        fmt = get_format(self.quant_type)
        if fmt.asymmetric != (self.zero_point is not None):
            raise ShapeError(f"{self.quant_type} {'needs' if fmt.asymmetric else 'has no'} a zero_point")
        n, nblocks = self.size, self.nblocks
        _expect(self.packed, "packed", np.uint8, ((n + 1) // 2,))
        _expect(self.codebook, "codebook", np.float32, (16,))
        if self.double_quant:
            _expect(self.absmax, "absmax", np.uint8, (nblocks,))
            nchunks = -(-nblocks // self.nested_blocksize)
            _expect(self.nested_absmax, "nested_absmax", np.float32, (nchunks,))
            _expect(self.nested_code, "nested_code", np.float32, (256,))
            if not _is_float32_number(self.offset):
                raise ShapeError(f"offset must be a finite float32 number, got {self.offset!r}")
            self.offset = np.float32(self.offset)
        else:
            _expect(self.absmax, "absmax", np.float32, (nblocks,))
        if self.zero_point is not None:
            _expect(self.zero_point, "zero_point", np.uint8, (nblocks,))

    # -- sizes -------------------------------------------------------------
    @property
    def size(self):
        """Number of elements n of the original tensor."""
        return _product(self.shape)

    @property
    def nblocks(self):
        """Number of scale blocks, ceil(n / blocksize)."""
        return -(-self.size // self.blocksize)

    @property
    def double_quant(self):
        """True when the scales are themselves 8-bit quantized."""
        return self.nested_blocksize is not None

    @property
    def nbytes(self):
        """Exact bytes of the data that grows with n: packed codes + scales (+ nested, zero points).

        The shared 16- and 256-entry codebooks are constants, not counted.
        """
        total = self.packed.nbytes + self.absmax.nbytes
        if self.double_quant:
            total += self.nested_absmax.nbytes + np.dtype(np.float32).itemsize   # + offset
        if self.zero_point is not None:
            total += self.zero_point.nbytes
        return total

    def __repr__(self):
        dq = ", double_quant" if self.double_quant else ""
        return (f"QuantizedTensor(shape={self.shape}, dtype={self.dtype}, {self.quant_type}, "
                f"blocksize={self.blocksize}{dq}, {self.nbytes} bytes)")

    # -- devices -------------------------------------------------------------
    @property
    def device(self):
        """"cuda" when the arrays are GPU device arrays (see :meth:`to`), else "cpu"."""
        return "cuda" if is_device_array(self.packed) else "cpu"

    def to(self, device):
        """This tensor with its arrays on ``device``: "cpu" (NumPy) or "cuda" (numba device arrays).

        Returns ``self`` when nothing has to move. Moving to "cuda" raises DeviceError when
        numba.cuda or a GPU is missing.
        """
        if device not in DEVICES:
            raise UnknownFormatError(f"device must be one of {DEVICES}, got {device!r}")
        arrays = {name: getattr(self, name) for name in ARRAY_FIELDS if getattr(self, name) is not None}
        if all(is_device_array(array) == (device == "cuda") for array in arrays.values()):
            return self
        kernels = cuda_kernels()
        move = kernels.to_device if device == "cuda" else kernels.to_host
        return dataclasses.replace(self, **{name: move(array) for name, array in arrays.items()})

    # -- decoding ----------------------------------------------------------
    def dequantize(self, dtype=None, backend="numba"):
        """The float tensor back, in the original dtype (or ``dtype``)."""
        return decode(self, dtype=dtype, backend=backend)

    # -- bitsandbytes state dicts -------------------------------------------
    def to_bnb(self, prefix="weight"):
        """bitsandbytes ``Linear4bit`` state-dict entries for this weight, as NumPy arrays.

        Keys: ``prefix``, ``.absmax``, ``.quant_map``, (``.nested_absmax``,
        ``.nested_quant_map``,) ``.quant_state.bitsandbytes__<nf4|fp4>`` (UTF-8 JSON
        bytes). Only nf4/fp4 at bitsandbytes' block sizes can be written. A tensor on
        the GPU is copied to the host first.
        """
        if self.device != "cpu":
            return self.to("cpu").to_bnb(prefix)
        fmt = get_format(self.quant_type)
        if fmt.bnb_name is None:
            raise StateDictError(f"bitsandbytes has no {self.quant_type!r} format; only nf4 and fp4 "
                                 "can be written as a bitsandbytes state dict")
        if self.blocksize not in BNB_BLOCKSIZES:
            raise StateDictError(f"bitsandbytes block sizes are {BNB_BLOCKSIZES}, this tensor has "
                                 f"blocksize {self.blocksize} (strategy {self.strategy!r})")
        quant_state = {"quant_type": fmt.bnb_name, "blocksize": self.blocksize,
                       # bnb has no float64 weights; our codes equal those of the float32 cast
                       "dtype": "float32" if self.dtype == "float64" else self.dtype,
                       "shape": list(self.shape)}
        state = {prefix: self.packed.reshape(-1, 1),
                 f"{prefix}.absmax": self.absmax,
                 f"{prefix}.quant_map": self.codebook}
        if self.double_quant:
            state[f"{prefix}.nested_absmax"] = self.nested_absmax
            state[f"{prefix}.nested_quant_map"] = self.nested_code
            quant_state.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                               nested_offset=float(self.offset))
        json_bytes = json.dumps(quant_state).encode("utf-8")
        quant_state_key = f"{prefix}.quant_state.bitsandbytes__{fmt.bnb_name}"
        state[quant_state_key] = np.frombuffer(json_bytes, np.uint8).copy()
        return state

    @classmethod
    def from_bnb(cls, state, prefix="weight"):
        """Build from bitsandbytes ``Linear4bit`` state-dict entries (NumPy arrays).

        Every field is checked against the JSON quant state; anything missing or
        inconsistent raises StateDictError naming the key.
        """
        quant_keys = [k for k in state if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if len(quant_keys) != 1:
            raise StateDictError(f"expected one key '{prefix}.quant_state.bitsandbytes__<nf4|fp4>', "
                                 f"found {quant_keys or 'none'}")
        quant_key = quant_keys[0]
        quant_state = _parse_quant_state(state[quant_key], quant_key)
        key_type = quant_key.rsplit("__", 1)[1]
        if quant_state.get("quant_type") != key_type:
            raise StateDictError(f"{quant_key}: JSON quant_type {quant_state.get('quant_type')!r} "
                                 f"does not match the key's {key_type!r}")
        if key_type not in ("nf4", "fp4"):
            raise StateDictError(f"{quant_key}: bitsandbytes 4-bit types are nf4 and fp4, got {key_type!r}")
        blocksize = quant_state.get("blocksize")
        shape = quant_state.get("shape")
        dtype = quant_state.get("dtype")
        if not isinstance(blocksize, int) or blocksize <= 0:
            raise StateDictError(f"{quant_key}: blocksize must be a positive int, got {blocksize!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise StateDictError(f"{quant_key}: shape must be a list of non-negative ints, got {shape!r}")
        if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
            raise StateDictError(f"{quant_key}: dtype must be one of {list(FLOAT_DTYPES)}, got {dtype!r}")
        fields = dict(packed=_get(state, prefix).reshape(-1), absmax=_get(state, f"{prefix}.absmax"),
                      codebook=_get(state, f"{prefix}.quant_map"), shape=tuple(shape), dtype=dtype,
                      quant_type=key_type, blocksize=blocksize)
        if "nested_blocksize" in quant_state:
            nested_blocksize = quant_state["nested_blocksize"]
            if not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
                raise StateDictError(f"{quant_key}: nested_blocksize must be a positive int, "
                                     f"got {nested_blocksize!r}")
            offset = quant_state.get("nested_offset")
            if not _is_float32_number(offset):
                raise StateDictError(f"{quant_key}: nested_offset must be a finite float32 number, "
                                     f"got {offset!r}")
            fields.update(nested_absmax=_get(state, f"{prefix}.nested_absmax"),
                          nested_code=_get(state, f"{prefix}.nested_quant_map"),
                          offset=offset, nested_blocksize=nested_blocksize)
        try:
            return cls(**fields)
        except (ShapeError, DTypeError) as error:
            raise StateDictError(f"{prefix}: {error}") from None


def quantized_tensor_fields_for_double_quant(codes, nested_absmax, offset):
    """The keyword fields a QuantizedTensor needs when its scales are double-quantized."""
    return dict(absmax=codes, nested_absmax=nested_absmax, nested_code=dynamic_map().copy(),
                offset=np.float32(offset), nested_blocksize=NESTED_BLOCKSIZE)


def _is_float32_number(value):
    """Whether ``value`` is a real number (not bool) that float32 holds without overflow."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        return False
    try:
        return abs(float(value)) <= np.finfo(np.float32).max
    except OverflowError:
        return False


def _product(shape):
    """Exact product of sizes as a Python int (no int64 overflow on corrupt shapes)."""
    total = 1
    for d in shape:
        total *= d
    return total


def _expect(array, name, dtype, shape):
    if not isinstance(array, np.ndarray) and not is_device_array(array):
        raise ShapeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype != dtype or tuple(array.shape) != shape:
        raise ShapeError(f"{name} must be {np.dtype(dtype)} of shape {shape}, "
                         f"got {array.dtype} of shape {array.shape}")


def _get(state, key):
    if key not in state:
        raise StateDictError(f"state dict is missing key {key!r}")
    return np.asarray(state[key])


def _parse_quant_state(array, key):
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise StateDictError(f"{key} must be a 1-D uint8 array of JSON bytes, "
                             f"got {array.dtype} {array.shape}")
    try:
        quant_state = json.loads(array.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateDictError(f"{key} does not hold valid UTF-8 JSON: {error}") from None
    if not isinstance(quant_state, dict):
        raise StateDictError(f"{key} must hold a JSON object, got {type(quant_state).__name__}")
    return quant_state
