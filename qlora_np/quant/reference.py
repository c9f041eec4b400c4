"""The QLoRA 4-bit algorithm in plain NumPy: the readable version of every kernel.

Read top to bottom: quantize a flat float32 array block by block, pack two codes a
byte, compress the per-block scales with double quant, then undo each step. The
Numba kernels in :mod:`qlora_np.kernels.blockwise` have the same names and give the same
bytes; tests hold the two together and hold this file to bitsandbytes' vectors.

Conventions (bitsandbytes'): the input is flattened row-major; blocks are runs of
``blocksize`` consecutive flat elements and ignore rows; the last block may be
partial. All arithmetic is float32, in the order written here — the order is part of
the format, since it decides which code a value on a midpoint gets.
"""

import numpy as np

from qlora_np.quant.codebooks import NESTED_BLOCKSIZE, get_format, nested_code_lut

TINY_SCALE = np.float32(1e-38)
"""Floor of a block's scale before dividing by it (a float32 subnormal, ≈ 9.99999935e-39)."""


# ---------------------------------------------------------------------------
# 4-bit quantization
# ---------------------------------------------------------------------------

def quantize_4bit(flat, blocksize, quant_type):
    """Quantize a flat float32 array to packed 4-bit codes with one scale per block.

    Returns ``(packed, absmax, zero_point)``: packed (ceil(n/2),) uint8, absmax
    (nblocks,) float32, zero_point (nblocks,) uint8 for ``int4_asym`` else None.
    """
    fmt = get_format(quant_type)
    if fmt.asymmetric:
        codes, absmax, zero_point = _asymmetric_codes(flat, blocksize)
        padding_code = zero_point[-1]
    else:
        codes, absmax = _codebook_codes(flat, blocksize, fmt)
        zero_point, padding_code = None, fmt.zero_code
    # an odd count gets one more code: that of a scaled 0.0, as in bitsandbytes
    if codes.size % 2:
        codes = np.append(codes, np.uint8(padding_code))
    return pack_nibbles(codes), absmax, zero_point


def _codebook_codes(flat, blocksize, fmt):
    """Codes (n,) uint8 and absmax (nblocks,) float32 for a codebook format (nf4, fp4, int4)."""
    n = flat.size
    n_full = n // blocksize
    has_tail = n % blocksize != 0

    # 1. absmax of every block; a partial last block's absmax is floored at 1e-38
    full = flat[:n_full * blocksize].reshape(n_full, blocksize)       # (n_full, blocksize)
    absmax = np.abs(full).max(axis=1) if n_full else np.zeros(0, np.float32)
    if has_tail:
        tail = flat[n_full * blocksize:]                                # (n % blocksize,)
        tail_absmax = max(np.abs(tail).max(), TINY_SCALE)
        absmax = np.append(absmax, np.float32(tail_absmax))
    absmax = absmax.astype(np.float32)                                  # (nblocks,)

    # 2. scale into [-1, 1]: full blocks multiply by one reciprocal per block, the
    #    partial last block divides each element (bitsandbytes does both; they can
    #    differ by 1 ulp, enough to flip a code on a midpoint)
    safe = np.maximum(absmax, TINY_SCALE)
    reciprocal = (np.float32(1) / safe[:n_full]).astype(np.float32)    # (n_full,)
    scaled_full = full * reciprocal[:, None]                           # (n_full, blocksize)
    scaled = scaled_full.reshape(-1)
    if has_tail:
        scaled = np.concatenate([scaled, tail / safe[-1]])
    scaled = np.clip(scaled, np.float32(-1), np.float32(1))            # (n,) float32

    # 3. nearest codebook entry: count the midpoints strictly below each value (a
    #    value exactly on a midpoint takes the lower entry), then map that rank to
    #    the code through the sort order (identity for NF4 and INT4, not for FP4)
    rank = np.searchsorted(fmt.midpoints, scaled, side="left")         # (n,) 0..15
    codes = fmt.sort_order[rank]                                       # (n,) uint8
    return codes, absmax


def _asymmetric_codes(flat, blocksize):
    """Codes (n,) uint8, scale (nblocks,) float32, zero point (nblocks,) uint8 for int4_asym."""
    n = flat.size
    nblocks = -(-n // blocksize)
    padded = np.zeros(nblocks * blocksize, np.float32)
    padded[:n] = flat
    blocks = padded.reshape(nblocks, blocksize)                        # (nblocks, blocksize)
    # a zero-padded tail cannot move the range: it always includes 0 (step 1)

    # 1. range of every block, widened to include 0 so that 0 is exact
    low = np.minimum(blocks.min(axis=1), np.float32(0))                 # (nblocks,)
    high = np.maximum(blocks.max(axis=1), np.float32(0))
    # 2. 15 equal steps between them; the zero point is the code of 0.0
    scale = ((high - low) / np.float32(15)).astype(np.float32)
    inverse = np.zeros_like(scale)
    with np.errstate(over="ignore"):
        np.divide(np.float32(1), scale, out=inverse, where=scale > 0)
    # 3. code = round(x · 1/scale) + zero point, clamped to 0..15; a subnormal scale
    #    (range below ~4e-38) has no float32 reciprocal, so those blocks divide instead
    divide = np.isinf(inverse)                                          # (nblocks,)
    safe_scale = np.where(divide, scale, np.float32(1))
    zero_point = np.where(divide, np.rint(-low / safe_scale), np.rint(-low * inverse))
    zero_point = np.clip(zero_point, 0, 15)                             # (nblocks,) float32
    levels = np.where(divide[:, None], np.rint(blocks / safe_scale[:, None]),
                      np.rint(blocks * inverse[:, None]))
    codes = np.clip(levels + zero_point[:, None], 0, 15)               # (nblocks, blocksize)
    return codes.reshape(-1)[:n].astype(np.uint8), scale, zero_point.astype(np.uint8)


def pack_nibbles(codes):
    """Two 4-bit codes a byte, the first in the high nibble: (2m,) uint8 → (m,) uint8."""
    pairs = codes.reshape(-1, 2)                                        # (ceil(n/2), 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).astype(np.uint8)


def unpack_nibbles(packed, n):
    """Inverse of :func:`pack_nibbles`: (ceil(n/2),) uint8 → (n,) uint8 codes."""
    high = packed >> 4                                                  # first element of each pair
    low = packed & 0x0F
    return np.stack([high, low], axis=1).reshape(-1)[:n]


def dequantize_4bit(packed, absmax, zero_point, n, blocksize, codebook, start=0):
    """Decode flat elements [start, start + n) of the packed codes to float32 (n,).

    ``absmax`` is the float32 scale actually used (for double quant, the output of
    :func:`dequantize_absmax`). Each value is one float32 multiply: codebook[code] ·
    absmax[i // blocksize] — or (code − zero_point) · scale when a zero point is given
    (int4_asym). ``start`` lets a matrix product decode a few rows at a time.
    """
    flat_index = start + np.arange(n)                                   # (n,)
    # 1. codes of the n elements: high nibble for even flat indices, low for odd
    byte = packed[flat_index >> 1]
    codes = np.where(flat_index % 2 == 0, byte >> 4, byte & 0x0F)       # (n,) uint8
    # 2. the scale of each element's block (flat index // blocksize, ignoring rows)
    block_of = flat_index // blocksize                                  # (n,)
    scale = absmax[block_of]                                            # (n,) float32
    # 3. codebook value times scale
    if zero_point is not None:
        levels = codes.astype(np.float32) - zero_point[block_of].astype(np.float32)
        return (levels * scale).astype(np.float32)
    return (codebook[codes] * scale).astype(np.float32)


# ---------------------------------------------------------------------------
# Double quantization: compress the float32 scales to 8 bits
# ---------------------------------------------------------------------------

def double_quantize(absmax):
    """Compress per-block scales: subtract their mean, then 8-bit quantize in chunks of 256.

    Returns ``(codes, nested_absmax, offset)``: codes (nblocks,) uint8, nested_absmax
    (ceil(nblocks/256),) float32, offset float32 — the mean that was subtracted.
    """
    # 1. offset = mean of the scales, summed in the order torch sums (bit-exactness)
    offset = torch_mean_float32(absmax)
    # 2. centre them; the centred values are small and signed
    centred = (absmax - offset).astype(np.float32)                      # (nblocks,)
    # 3. 8-bit blockwise quantization with the signed dynamic map
    codes, nested_absmax = quantize_8bit_blockwise(centred, NESTED_BLOCKSIZE)
    return codes, nested_absmax, offset


def dequantize_absmax(codes, nested_absmax, offset, nested_code, nested_blocksize):
    """Undo :func:`double_quantize`: float32(map[code] · nested_absmax[chunk]) + offset."""
    chunk_of = np.arange(codes.size) // nested_blocksize                # (nblocks,)
    centred = (nested_code[codes] * nested_absmax[chunk_of]).astype(np.float32)
    return (centred + np.float32(offset)).astype(np.float32)           # (nblocks,)


def quantize_8bit_blockwise(values, blocksize):
    """bitsandbytes' CPU 8-bit blockwise quantizer (dynamic map, lookup-table rounding).

    Returns codes (n,) uint8 and per-chunk absmax (ceil(n/blocksize),) float32.
    """
    n = values.size
    nchunks = -(-n // blocksize)
    lut = nested_code_lut()
    codes = np.zeros(n, np.uint8)
    chunk_absmax = np.zeros(nchunks, np.float32)
    for chunk in range(nchunks):
        part = values[chunk * blocksize:(chunk + 1) * blocksize]         # (≤ blocksize,)
        # 1. absmax of the chunk; an all-zero chunk keeps code 0 everywhere
        absmax = np.abs(part).max()
        chunk_absmax[chunk] = absmax
        if absmax == 0:
            continue
        # 2. scale by the float32 reciprocal into [-1, 1]
        scaled = np.clip(part * (np.float32(1) / absmax), np.float32(-1), np.float32(1))
        # 3. index a 65536-point grid on [-1, 1] and read the code from the table
        grid_index = ((scaled + np.float32(1)) * np.float32(0.5) * np.float32(65535)
                      + np.float32(0.5)).astype(np.float32).astype(np.uint16)
        codes[chunk * blocksize:chunk * blocksize + part.size] = lut[grid_index]
    return codes, chunk_absmax


def torch_mean_float32(values):
    """float32 mean of a 1-D float32 array, summed exactly as torch sums on one CPU thread.

    The offset of double quant is ``absmax.mean()`` in torch; a plain NumPy mean
    differs from it by 1–2 ulp about half of the time, which changes every stored
    code. torch (with 8-lane float vectors) splits the array into 8-lane vectors,
    sums groups of 4 vectors with a cascade of 4 accumulator levels, then adds the
    scalar tail and the 8 lanes in order. The mean is that sum / n in float32.
    """
    values = np.asarray(values, np.float32)
    n = values.size
    lanes = 8
    if n < lanes:
        return np.float32(_cascade_row_sum(values.reshape(n, 1))[0] / np.float32(n))
    n_vectors = n // lanes
    lane_sums = _cascade_row_sum(values[:n_vectors * lanes].reshape(n_vectors, lanes))   # (8,)
    total = np.float32(0)
    for value in values[n_vectors * lanes:]:                       # scalar tail first
        total = np.float32(total + value)
    for lane_sum in lane_sums:                                     # then the lanes, in order
        total = np.float32(total + lane_sum)
    return np.float32(total / np.float32(n))


def _cascade_row_sum(items):
    """Sum (m, lanes) float32 items down to (lanes,) in torch's order (4-way ILP + cascade)."""
    m, lanes = items.shape
    groups = m // 4
    partial = _cascade_levels(items[:groups * 4].reshape(groups, 4, lanes))   # (4, lanes)
    for row in items[groups * 4:]:
        partial[0] += row
    for k in range(1, 4):
        partial[0] += partial[k]
    return partial[0]


def _cascade_levels(rows):
    """torch's multi-row cascade: (size, 4, lanes) → (4, lanes) with 4 accumulator levels.

    Level 0 adds ``step`` rows at a time (step = 16 until size > 2^16); each full
    level is carried into the next, so only sums of similar size are ever added.
    """
    size = rows.shape[0]
    ceil_log2 = 1 if size <= 2 else int(size - 1).bit_length()
    level_power = max(4, ceil_log2 // 4)
    step = 1 << level_power
    acc = np.zeros((4,) + rows.shape[1:], np.float32)                 # (levels, 4, lanes)
    i = 0
    while i + step <= size:
        for _ in range(step):
            acc[0] += rows[i]
            i += 1
        for level in range(1, 4):
            acc[level] += acc[level - 1]
            acc[level - 1] = 0
            if i & ((step - 1) << (level * level_power)):
                break
    while i < size:
        acc[0] += rows[i]
        i += 1
    for level in range(1, 4):
        acc[0] += acc[level]
    return acc[0]
