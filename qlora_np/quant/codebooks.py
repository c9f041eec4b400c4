"""The 16-entry codebooks of the 4-bit formats and the 256-entry map of double quant.

A 4-bit code is an index into a codebook of 16 float32 values in [-1, 1]; a block
of weights is stored as codes plus one float32 scale (its absmax), and decodes to
``codebook[code] * absmax``. The formats differ only in where the 16 values sit:

* NF4  — quantiles of a standard normal (QLoRA, Dettmers et al. 2023), best for
         normally distributed weights. Derived here exactly as bitsandbytes does.
* FP4  — a 1-bit sign, 2-bit exponent, 1-bit mantissa float (bitsandbytes layout,
         stored in bit-pattern order, so code 8 is "-0" and decodes to +0.0).
* INT4 — evenly spaced: symmetric ``(code - 8) / 7`` (so -1 … +1 in steps of 1/7), or
         asymmetric ``int4_asym``: levels 0 … 15 with a per-block zero point.

Each format is a :class:`QuantFormat` in the ``FORMATS`` registry (no if-chains
elsewhere): the codebook, its sorted order and the midpoints used to pick the
nearest code.
"""

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np
from scipy.special import ndtri

from qlora_np.errors import UnknownFormatError

NF4_OFFSET = 0.9677083
"""Largest normal quantile used by NF4: the mean of the quantiles 1 - 1/(2·15) and 1 - 1/(2·16)."""

NESTED_BLOCKSIZE = 256
"""Double quant groups the per-block scales in chunks of 256 (bitsandbytes' value)."""


def torch_linspace_float32(start, stop, num):
    """``num`` evenly spaced float32 points, rounded the way torch.linspace rounds them.

    For fewer than 16 points torch fills the first half as ``start + step*i`` and the
    second half as ``stop - step*(num-1-i)``, all in float32. Reproducing that is what
    makes the derived NF4 table bit-exact.
    """
    start, stop = np.float32(start), np.float32(stop)
    step = np.float32((stop - start) / np.float32(num - 1))
    index = np.arange(num)
    from_start = start + step * index.astype(np.float32)
    from_stop = stop - step * (num - 1 - index).astype(np.float32)
    return np.where(index < num // 2, from_start, from_stop).astype(np.float32)


def derive_nf4_codebook(offset=NF4_OFFSET):
    """NF4 from normal quantiles: 8 positive, 7 negative, one exact zero, scaled to [-1, 1].

    The positive side gets one more level than the negative side so that 0 is exactly
    representable (QLoRA paper, appendix E).
    """
    # 1. evenly spaced probabilities from `offset` down to 0.5 (exclusive)
    positive_probs = torch_linspace_float32(offset, 0.5, 9)[:-1]   # (8,)
    negative_probs = torch_linspace_float32(offset, 0.5, 8)[:-1]   # (7,)
    # 2. their standard-normal quantiles (inverse CDF), in float64
    positive = ndtri(positive_probs.astype(np.float64))
    negative = -ndtri(negative_probs.astype(np.float64))
    # 3. sort together with an exact zero, round to float32, normalise by the max
    values = np.sort(np.concatenate([negative, [0.0], positive]).astype(np.float32))
    return (values / values.max()).astype(np.float32)                 # (16,) float32


FP4_CODEBOOK = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3],
                         dtype=np.float32) / np.float32(12)).astype(np.float32)
"""bitsandbytes FP4 (e2m1): bit 3 is the sign; entry 8 is +0.0 as in bitsandbytes."""

INT4_CODEBOOK = ((np.arange(16, dtype=np.float32) - np.float32(8)) / np.float32(7)).astype(np.float32)
"""Symmetric INT4: code c decodes to (c - 8)/7; quantization only reaches codes 1…15 (−7…7)."""

INT4_ASYM_LEVELS = np.arange(16, dtype=np.float32)
"""Asymmetric INT4: code c decodes to (c - zero_point) * scale, per block."""


@dataclass(frozen=True)
class QuantFormat:
    """One 4-bit format: its codebook and what nearest-code search needs."""

    name: str
    codebook: np.ndarray        # (16,) float32, indexed by code
    sort_order: np.ndarray      # (16,) uint8, codes in ascending codebook order
    midpoints: np.ndarray       # (15,) float32, between consecutive sorted entries
    zero_code: int              # the code a scaled value of exactly 0.0 gets
    asymmetric: bool            # True: per-block zero point, no codebook search
    bnb_name: str | None        # the name bitsandbytes uses, None if bnb lacks it


def _codebook_format(name, codebook, bnb_name):
    # stable sort puts +0 (code 0) before "-0" (code 8) for FP4, as bitsandbytes does
    sort_order = np.argsort(codebook, kind="stable").astype(np.uint8)
    sorted_values = codebook[sort_order]
    midpoints = ((sorted_values[:-1] + sorted_values[1:]) / np.float32(2)).astype(np.float32)
    zero_rank = int(np.count_nonzero(midpoints < np.float32(0)))
    return QuantFormat(name, codebook, sort_order, midpoints, int(sort_order[zero_rank]),
                       asymmetric=False, bnb_name=bnb_name)


FORMATS = {
    "nf4": _codebook_format("nf4", derive_nf4_codebook(), "nf4"),
    "fp4": _codebook_format("fp4", FP4_CODEBOOK, "fp4"),
    "int4": _codebook_format("int4", INT4_CODEBOOK, None),
    "int4_asym": QuantFormat("int4_asym", INT4_ASYM_LEVELS, np.arange(16, dtype=np.uint8),
                             np.zeros(15, np.float32), zero_code=0, asymmetric=True, bnb_name=None),
}
"""Registry of the 4-bit formats, by the ``quant_type`` name users pass."""


def get_format(quant_type):
    """The :class:`QuantFormat` named ``quant_type``, or a clear error listing the valid names."""
    try:
        return FORMATS[quant_type]
    except (KeyError, TypeError):
        raise UnknownFormatError(
            f"quant_type must be one of {sorted(FORMATS)}, got {quant_type!r}") from None


def derive_dynamic_map():
    """The signed 8-bit "dynamic" map of double quant, derived step by step.

    7 exponent levels 10^-6 … 10^0; level i holds 2^i evenly spaced fractions in
    (0.1, 1) and their negatives; plus 0 and 1.0: 2·(1+2+…+64) + 2 = 256 values.
    bitsandbytes computes the same values through torch.linspace; its table agrees
    with this derivation to 1 ulp, and :func:`dynamic_map` returns bitsandbytes' exact
    table so that our bytes equal theirs.
    """
    values = [0.0, 1.0]
    for level in range(7):
        boundaries = np.linspace(0.1, 1.0, 2 ** level + 1, dtype=np.float32)   # (2^level + 1,)
        fractions = (boundaries[:-1] + boundaries[1:]) / np.float32(2)         # (2^level,)
        magnitude = np.float32(10.0 ** (level - 6)) * fractions
        values.extend(magnitude.tolist())
        values.extend((-magnitude).tolist())
    return np.sort(np.array(values, dtype=np.float64)).astype(np.float32)      # (256,) float32


@lru_cache(maxsize=None)
def dynamic_map():
    """bitsandbytes' signed dynamic map (256 float32), read from the package data."""
    path = resources.files("qlora_np") / "data" / "dynamic_map.npy"
    with path.open("rb") as stream:
        table = np.load(stream, allow_pickle=False)
    table.setflags(write=False)
    return table


@lru_cache(maxsize=None)
def nested_code_lut():
    """(65536,) uint8 lookup table that turns a scaled value into its 8-bit code.

    bitsandbytes' CPU 8-bit quantizer does not search the map: it maps v in [-1, 1]
    to a grid index ``trunc(((v + 1) / 2) * 65535 + 0.5)`` and reads the code from a
    table built once — entry j is the number of map midpoints strictly below the grid
    value ``-1 + 2j/65535``. Double quant must use the same table to be bit-exact.
    """
    code = dynamic_map()
    midpoints = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)          # (255,)
    grid = (np.float32(-1) + np.arange(65536, dtype=np.float32) * np.float32(2)
            / np.float32(65535)).astype(np.float32)                                    # (65536,)
    lut = np.searchsorted(midpoints, grid, side="left").astype(np.uint8)
    lut.setflags(write=False)
    return lut
