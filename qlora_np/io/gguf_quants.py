"""GGUF 4-bit blocks from our tensors: an IQ4_NL encoder (gguf-py only decodes it), NF4 → IQ4_NL / Q4_0.

IQ4_NL is llama.cpp's non-linear 4-bit type, the closest GGUF relative of NF4: blocks of
32 values along a row, one float16 scale d, and 16 codes into a fixed int8 table

    value = d · KVALUES[code],   KVALUES = -127 … 113 (16 uneven steps, denser near 0).

A block is 18 bytes: d (2 bytes), then 16 bytes whose low nibbles are values 0…15 and
high nibbles values 16…31. NF4 itself cannot be stored losslessly in either type (its
blocks are 64 values with a float32 scale and a different table), so converting costs a
second rounding; :func:`nf4_to_gguf` reports it.
"""

from dataclasses import dataclass

import gguf
import numpy as np

from qlora_np.errors import ShapeError, UnknownFormatError
from qlora_np.quant.codec import dequantize

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
BLOCK = 32
SCALE_TRIES = 7
"""llama.cpp's search: scales that put the block's extreme on table entries −127 ± 7 … are tried."""



@dataclass(frozen=True)
class TensorError:
    """What storing one tensor in a GGUF type cost: the decoded file value minus the exact value."""

    name: str
    tensor_type: str
    max_abs_error: float
    relative_error: float           # ‖decoded − exact‖ / ‖exact‖ (Frobenius)


def quantize_iq4_nl(values):
    """IQ4_NL blocks of float values (rows, cols), cols a multiple of 32 → uint8 (rows, cols/32·18).

    Per block: codes are the nearest table entries of x/d; d is chosen, as llama.cpp
    does, among the least-squares scales (weights x²) of a few trial scales.
    """
    values = np.asarray(values, np.float32)
    if values.ndim != 2 or values.shape[1] % BLOCK:
        raise ShapeError(f"IQ4_NL needs (rows, cols) with cols a multiple of {BLOCK}, got {values.shape}")
    rows, cols = values.shape
    x = values.reshape(-1, BLOCK).astype(np.float64)                          # (blocks, 32)
    weight = x * x
    extreme = x[np.arange(len(x)), np.abs(x).argmax(axis=1)]                  # signed value of largest |x|
    safe = np.where(extreme == 0, 1.0, extreme)[:, None]
    best_scale = np.zeros(len(x))
    best_score = np.full(len(x), -np.inf)
    trials = [-KVALUES[0] / safe] + [(t + KVALUES[0]) / safe for t in range(-SCALE_TRIES, SCALE_TRIES + 1)]
    for inverse in trials:                                                    # (blocks, 1) each: 1/d
        q = KVALUES[_nearest(x * inverse)]                                    # (blocks, 32)
        sum_qx, sum_q2 = (weight * q * x).sum(axis=1), (weight * q * q).sum(axis=1)
        score = np.where(sum_q2 > 0, sum_qx ** 2 / np.where(sum_q2 > 0, sum_q2, 1), -np.inf)
        better = score > best_score
        best_scale = np.where(better, sum_qx / np.where(sum_q2 > 0, sum_q2, 1), best_scale)
        best_score = np.maximum(score, best_score)
    d = best_scale.astype(np.float16)                                         # stored scale
    d_stored = d.astype(np.float64)[:, None]
    codes = _nearest(np.where(d_stored != 0, x / np.where(d_stored != 0, d_stored, 1), 0.0)).astype(np.uint8)
    packed = codes[:, :16] | (codes[:, 16:] << 4)                             # (blocks, 16)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), packed], axis=1)   # (blocks, 18)
    return blocks.reshape(rows, cols // BLOCK * 18)


def _nearest(scaled):
    """Index of the nearest KVALUES entry for each value (ties go to the upper entry, as in llama.cpp)."""
    midpoints = (KVALUES[1:] + KVALUES[:-1]) / 2                              # (15,)
    return np.searchsorted(midpoints, scaled, side="right")


def nf4_to_gguf(qt, tensor_type="IQ4_NL"):
    """A 2-D NF4 (or any 4-bit) QuantizedTensor as GGUF IQ4_NL or Q4_0 blocks, and the error it costs.

    Returns (blocks uint8 (rows, bytes per row), report) where report holds the max
    absolute and the relative (Frobenius) error of the GGUF values against the decoded
    4-bit tensor.
    """
    if tensor_type not in ("IQ4_NL", "Q4_0"):
        raise UnknownFormatError(f"tensor_type must be 'IQ4_NL' or 'Q4_0', got {tensor_type!r}")
    decoded = dequantize(qt, dtype="float32")
    if decoded.ndim != 2:
        raise ShapeError(f"a GGUF weight is 2-D (out, in), got shape {decoded.shape}")
    ggml_type = gguf.GGMLQuantizationType[tensor_type]
    blocks = quantize_iq4_nl(decoded) if tensor_type == "IQ4_NL" else gguf.quants.quantize(decoded, ggml_type)
    error = gguf.quants.dequantize(blocks, ggml_type).astype(np.float64) - decoded
    report = TensorError("", tensor_type, float(np.abs(error).max()),
                         float(np.linalg.norm(error) / max(np.linalg.norm(decoded), 1e-30)))
    return blocks, report
