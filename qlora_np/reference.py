"""The QLoRA 4-bit algorithm in plain NumPy: the readable version of every kernel.

Read top to bottom: quantize a flat float32 array block by block, pack two codes a
byte, compress the per-block scales with double quant, then undo each step. The
Numba kernels in :mod:`qlora_np.kernels.cpu` have the same names and give the same
bytes; tests hold the two together and hold this file to bitsandbytes' vectors.

Conventions (bitsandbytes'): the input is flattened row-major; blocks are runs of
``blocksize`` consecutive flat elements and ignore rows; the last block may be
partial. All arithmetic is float32, in the order written here — the order is part of
the format, since it decides which code a value on a midpoint gets.
"""

import numpy as np

from .codebooks import NESTED_BLOCKSIZE, get_format, nested_code_lut

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



# ---------------------------------------------------------------------------
# Products with a packed weight W (out, in): the plain version of kernels.products
# ---------------------------------------------------------------------------

def gemv(x, packed, scales, shifts, codebook, out_features, blocksize):
    """x (rows, in) @ W.T → (rows, out) float32, W decoded whole first (the kernels never do)."""
    weight = _decode_weight(packed, scales, shifts, codebook, out_features, x.shape[1], blocksize)
    return (x @ weight.T).astype(np.float32)


def gemv_t(g, packed, scales, shifts, codebook, in_features, blocksize):
    """g (rows, out) @ W → (rows, in) float32, W decoded whole first."""
    weight = _decode_weight(packed, scales, shifts, codebook, g.shape[1], in_features, blocksize)
    return (g @ weight).astype(np.float32)


def gemm(x, packed, scales, shifts, codebook, out_features, blocksize):
    """x @ W.T for a batch of rows: the sums :func:`gemv` computes (the kernels differ only in
    how they reuse each decoded weight)."""
    return gemv(x, packed, scales, shifts, codebook, out_features, blocksize)


def gemm_t(g, packed, scales, shifts, codebook, in_features, blocksize):
    """g @ W for a batch of rows: the sums :func:`gemv_t` computes."""
    return gemv_t(g, packed, scales, shifts, codebook, in_features, blocksize)


def _decode_weight(packed, scales, shifts, codebook, out_features, in_features, blocksize):
    zero_point = None if shifts is None else shifts.astype(np.uint8)
    flat = dequantize_4bit(packed, scales, zero_point, out_features * in_features, blocksize, codebook)
    return flat.reshape(out_features, in_features)                    # (out, in) float32


# ---------------------------------------------------------------------------
# bfloat16 products (opt-in for training): the plain version of kernels.bf16
# ---------------------------------------------------------------------------

def round_to_bfloat16(a):
    """float32 array → the nearest bfloat16 values (ties to even), as float32; NaN stays NaN."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    # 1. add half a bfloat16 ulp, minus one when the kept last bit is even (ties to even)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    # 2. NaN must not round into infinity: keep its top bits and set the quiet bit
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded[nan] = (bits[nan] >> 16) | 0x40
    return (rounded << 16).astype(np.uint32).view(np.float32).reshape(np.shape(a))


def matmul_bf16(a, b):
    """a (..., rows, k) @ b (..., k, n) with both rounded to bfloat16, summed exactly (float64),
    rounded once to float32."""
    a_rounded = round_to_bfloat16(a).astype(np.float64)       # (..., rows, k)
    b_rounded = round_to_bfloat16(b).astype(np.float64)       # (..., k, n)
    return np.matmul(a_rounded, b_rounded).astype(np.float32)  # (..., rows, n), exact sums rounded once


def attention_bf16(q, k, v, mask, scale):
    """Masked grouped attention with bfloat16 products: the plain version of
    :func:`.kernels.attention_bf16.attention_bf16`.

    q (B, KV, T·g, d), row t·g + j being query head j of the group at position t; k, v
    (B, KV, T, d); mask (B or 1, T, T) bool, True where position t may see key s.
    Returns out (like q) and lse (B, KV, T·g): log Σ exp(scale · scores) of each row,
    all the backward needs to make the probabilities again.
    """
    group = q.shape[2] // k.shape[2]
    # 1. scores = q kᵀ from bfloat16 roundings
    scores = matmul_bf16(q, k.swapaxes(-1, -2))                            # (B, KV, T·g, T)
    # 2. scale, and −inf where the mask hides a key (each row repeats its position's mask)
    allowed = np.repeat(mask, group, axis=1)[:, None]                      # (B or 1, 1, T·g, T)
    scaled = np.where(allowed, scores * np.float32(scale), np.float32(-np.inf))
    # 3. softmax over the keys, and its log-sum-exp
    largest = scaled.max(axis=-1, keepdims=True)
    weights = np.exp(scaled - largest)
    total = weights.sum(axis=-1, keepdims=True)
    probs = weights / total                                                # (B, KV, T·g, T)
    lse = (largest + np.log(total))[..., 0]                                # (B, KV, T·g)
    # 4. out = probs v
    return matmul_bf16(probs, v), lse


def attention_bf16_backward(q, k, v, mask, lse, grad_out, scale):
    """Gradients (dq, dk, dv) of :func:`attention_bf16` for grad_out (like q): the plain
    version of :func:`.kernels.attention_bf16.attention_bf16_backward`."""
    group = q.shape[2] // k.shape[2]
    # 1. the probabilities again, from the scores and lse
    scores = matmul_bf16(q, k.swapaxes(-1, -2))                            # (B, KV, T·g, T)
    allowed = np.repeat(mask, group, axis=1)[:, None]
    probs = np.where(allowed, np.exp(scores * np.float32(scale) - lse[..., None]), np.float32(0))
    # 2. dP = dO vᵀ
    grad_probs = matmul_bf16(grad_out, v.swapaxes(-1, -2))                 # (B, KV, T·g, T)
    # 3. through the softmax: dS = scale · P ⊙ (dP − Σ P ⊙ dP)
    weighted = (grad_probs * probs).sum(axis=-1, keepdims=True)
    grad_scores = np.float32(scale) * probs * (grad_probs - weighted)
    # 4. the products' gradients (k and v sum over their group's query heads by the stacking)
    grad_q = matmul_bf16(grad_scores, k)                                   # (B, KV, T·g, d)
    grad_k = matmul_bf16(grad_scores.swapaxes(-1, -2), q)                  # (B, KV, T, d)
    grad_v = matmul_bf16(probs.swapaxes(-1, -2), grad_out)                 # (B, KV, T, d)
    return grad_q, grad_k, grad_v


# ---------------------------------------------------------------------------
# A LoRA adapter's weight gradients: the plain version of kernels.low_rank
# ---------------------------------------------------------------------------

def thin_t_product(h, g):
    """h (rows, r)ᵀ @ g (rows, n) → (r, n), summed exactly (float64) and rounded once to float32:
    Σ over rows of h[row]ᵀ ⊗ g[row], e.g. LoRA's B.T gradient from h = x A.T and g = dL/dy."""
    return (np.asarray(h, np.float64).T @ np.asarray(g, np.float64)).astype(np.float32)   # (r, n)


# ---------------------------------------------------------------------------
# Int8 activations: the approximation llama.cpp makes when decoding (opt-in here)
# ---------------------------------------------------------------------------

INT8_GROUP = 32


def quantize_activations(x):
    """x (rows, in) float32 → int8 xq (rows, in) and float32 scales (rows, in/32).

    Each group of 32 is rounded to int8 against its own largest magnitude; the scale,
    max|x| / 127², also undoes the 127 of the int8 codebook (:func:`gemv_int8`).
    """
    rows, in_features = x.shape
    groups = x.reshape(rows, in_features // INT8_GROUP, INT8_GROUP)            # (rows, G, 32)
    # 1. the largest magnitude of each group, and 127 over it (0 for an all-zero group)
    largest = np.abs(groups).max(axis=2)                                         # (rows, G)
    safe = np.where(largest > 0, largest, np.float32(1))
    inverse = np.where(largest > 0, np.float32(127) / safe, np.float32(0)).astype(np.float32)
    # 2. round each value times that to the nearest integer (ties to even): -127 … 127
    xq = np.rint(groups * inverse[:, :, None]).astype(np.int8).reshape(rows, in_features)
    return xq, (largest / np.float32(127 * 127)).astype(np.float32)


def gemv_int8(x, packed, scales, codebook, out_features, blocksize):
    """x (rows, in) @ W.T with int8 activations → (rows, out) float32.

    The weights' codes index the codebook rounded to int8, round(127 · value); each group
    of 32 products of int8 values is an exact integer, then scaled by the group's x scale
    and the block's weight scale. blocksize and in must be multiples of 32.
    """
    rows, in_features = x.shape
    groups = in_features // INT8_GROUP
    # 1. int8 codebook and int8 activations
    table = np.clip(np.rint(codebook * np.float32(127)), -127, 127).astype(np.int64)       # (16,)
    xq, x_scales = quantize_activations(x)                                    # (rows, in), (rows, G)
    # 2. every weight as its int8 codebook value
    codes = unpack_nibbles(packed, out_features * in_features)
    weights = table[codes].reshape(out_features, groups, INT8_GROUP)          # (out, G, 32)
    # 3. exact integer dot product of each group
    dots = np.einsum("rgi,ogi->rog", xq.reshape(rows, groups, INT8_GROUP).astype(np.int64), weights)
    # 4. times the group's x scale and the block's weight scale (blocksize/32 groups a block)
    group_weight_scales = np.repeat(scales.reshape(out_features, -1), blocksize // INT8_GROUP, axis=1)
    y = (dots * x_scales[:, None, :].astype(np.float64) * group_weight_scales[None]).sum(axis=2)
    return y.astype(np.float32)                                                # (rows, out)
