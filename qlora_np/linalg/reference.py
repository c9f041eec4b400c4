"""Products with a packed 4-bit weight in plain NumPy: the readable version of the product kernels.

Each function decodes W whole with :func:`qlora_np.quant.reference.dequantize_4bit` and
multiplies in NumPy; the kernels in :mod:`qlora_np.kernels.products`, :mod:`qlora_np.kernels.bf16`
and :mod:`qlora_np.kernels.low_rank` compute the same sums without ever holding W decoded, and
the tests hold each kernel to the function of the same name here.
"""

import numpy as np

from qlora_np.quant.reference import dequantize_4bit, unpack_nibbles


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
    :func:`qlora_np.kernels.attention_bf16.attention_bf16`.

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
    version of :func:`qlora_np.kernels.attention_bf16.attention_bf16_backward`."""
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
