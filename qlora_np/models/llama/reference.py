"""The Llama forward and training passes in plain NumPy: the references of the Numba kernels.

Each function here has the name of the kernel it checks, and the tests hold that kernel to it:

* inference (:mod:`qlora_np.kernels.portable.llama`): :func:`rms_norm`, :func:`attend`,
  :func:`swiglu`, :func:`geglu`, plus :func:`linear` for the layers' products;
* training (:mod:`qlora_np.kernels.portable.training`): :func:`rms_norm_forward`,
  :func:`add_rms_norm_backward`, :func:`rope_into_groups`, :func:`rope_back_from_groups`,
  :func:`masked_softmax`, :func:`masked_softmax_backward`, :func:`swiglu` (shared with
  inference), :func:`swiglu_backward`, :func:`geglu` and :func:`geglu_backward`, :func:`cross_entropy`.

The kernels fuse their steps and sum in any order. These functions take one step at a time,
with NumPy's own sums. :class:`~qlora_np.models.llama.model.LlamaModel` runs the inference ones
when its backend is "reference". A training step runs the training ones whenever it works in a
dtype other than float32 (float64 gradient checks). The helpers :func:`apply_rope`,
:func:`causal_attention` and :func:`silu` are steps of those functions.
(The dropout references, ``dropout_keep`` and ``apply_dropout``, live with the layer that uses
them, in :mod:`qlora_np.nn.lora`.)
"""

import numpy as np


# ---------------------------------------------------------------------------
# Inference: the references of kernels.portable.llama
# ---------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    """x / sqrt(mean(x²) + eps) · weight over the last axis: (T, hidden) → (T, hidden) float32."""
    mean_square = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)   # (T, 1)
    return (x / np.sqrt(mean_square + np.float32(eps)) * weight).astype(np.float32)


def attend(q, k, v, cos, sin, keys, values, start, scale=None, window=0, softcap=0.0):
    """Causal attention of T new positions ``start … start+T-1``, filling the KV cache.

    q (T, H, hd), k and v (T, KV, hd) straight from the projections (before RoPE);
    cos, sin (T, hd/2) the RoPE tables of the new positions; keys and values (KV, S, hd)
    with S ≥ start + T, holding positions 0 … start-1 already. ``scale``, ``window`` and
    ``softcap`` as :func:`causal_attention` takes them. Returns (T, H·hd) float32.
    """
    T, heads, head_dim = q.shape
    end = start + T
    # 1. RoPE on the new queries and keys: (T, H, hd), (T, KV, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # 2. the rotated keys and the values into the cache at start … end-1: (KV, T, hd) each
    keys[:, start:end] = k.transpose(1, 0, 2)
    values[:, start:end] = v.transpose(1, 0, 2)
    # 3. every query against the keys 0 … its position: (H, T, hd)
    out = causal_attention(q.transpose(1, 0, 2), keys[:, :end], values[:, :end], np.arange(start, end),
                           scale, window, softcap)
    # 4. back to one row per position: (T, H·hd)
    return out.transpose(1, 0, 2).reshape(T, heads * head_dim)


def swiglu(gate, up):
    """silu(gate) · up, element by element: (..., intermediate), in gate's dtype."""
    return silu(gate) * up


def linear(x, weight, bias=None, lora_a=None, lora_b=None, scale=0.0):
    """A layer's inference product y = x Wᵀ + b + scale · (x Aᵀ) Bᵀ, with no dropout: x (T, in),
    weight W (out, in) already decoded, bias (out,) or None, adapters A (r, in) and B (out, r)
    or None. Returns (T, out) float32. This is the reference of
    :class:`~qlora_np.models.llama.model.FusedProjections` and of
    :meth:`~qlora_np.nn.lora.LoRALinear.forward` in eval mode."""
    # 1. the base product x Wᵀ: (T, out)
    y = x @ weight.T
    # 2. + b
    if bias is not None:
        y = y + bias
    # 3. + scale · (x Aᵀ) Bᵀ: (T, r) then (T, out)
    if lora_a is not None:
        y = y + scale * ((x @ lora_a.T) @ lora_b.T)
    return y.astype(np.float32)


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of every head by the angle of (cos_i, sin_i):
    x (T, heads, hd), cos and sin (T, hd/2). The kernels' ``rotate_pairs`` does one head."""
    even, odd = x[..., 0::2], x[..., 1::2]                                          # (T, heads, hd/2)
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = even * s + odd * c
    return out


def causal_attention(q, keys, values, positions, scale=None, window=0, softcap=0.0):
    """softmax(scale · q kᵀ + causal mask) v with grouped-query heads.

    q (H, T, hd) at ``positions``; keys/values (KV, S, hd) for positions 0 … S-1.
    Query head h reads kv head h // (H / KV). ``scale`` defaults to 1/√hd; with a
    ``window`` (> 0) a query at p sees only keys s with p − s < window; a ``softcap``
    turns each scaled score z into softcap · tanh(z / softcap) before the mask.
    """
    heads, T, hd = q.shape
    kv_heads, S, _ = keys.shape
    group = heads // kv_heads
    scale = np.float32(1 / np.sqrt(hd) if scale is None else scale)
    # 1. scores of each kv head's g query heads against its keys: (KV, g, T, S)
    qg = q.reshape(kv_heads, group * T, hd)                                          # (KV, g·T, hd)
    scores = (qg @ keys.transpose(0, 2, 1)) * scale                                 # (KV, g·T, S)
    scores = scores.reshape(kv_heads, group, T, S)
    if softcap:
        scores = np.float32(softcap) * np.tanh(scores / np.float32(softcap))
    # 2. no query sees a key after its position (nor, with a window, one too far back)
    allowed = np.arange(S)[None, :] <= positions[:, None]                           # (T, S)
    if window:
        allowed &= positions[:, None] - np.arange(S)[None, :] < window
    scores = np.where(allowed, scores, np.float32(-np.inf))
    # 3. softmax over the keys
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    # 4. the weighted values: (KV, g·T, hd) → (H, T, hd)
    out = weights.reshape(kv_heads, group * T, S) @ values
    return out.reshape(heads, T, hd).astype(np.float32)


def silu(x):
    """x · sigmoid(x)."""
    return x / (np.float32(1) + np.exp(-x))


def geglu(gate, up):
    """gelu_tanh(gate) · up, element by element (Gemma's gated MLP), in gate's dtype."""
    return gelu_tanh(gate) * up


GELU_C, GELU_A = np.sqrt(2 / np.pi), 0.044715
"""The constants of the tanh approximation gelu(x) ≈ x/2 · (1 + tanh(c · (x + a·x³)))."""


def gelu_tanh(x):
    """x/2 · (1 + tanh(c · (x + a·x³))), in x's dtype."""
    c, a = x.dtype.type(GELU_C), x.dtype.type(GELU_A)
    return x.dtype.type(0.5) * x * (1 + np.tanh(c * (x + a * x * x * x)))


# ---------------------------------------------------------------------------
# Training: the references of kernels.portable.training (in the dtype they are given)
# ---------------------------------------------------------------------------

def rms_norm_forward(x, weight, eps):
    """x (..., d) → (x·r·weight, r) with r = 1/sqrt(mean(x²) + eps) of shape (..., 1), in x's dtype."""
    inverse_rms = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)      # (..., 1)
    return (x * inverse_rms * weight).astype(x.dtype), inverse_rms.astype(x.dtype)


def add_rms_norm_backward(grad, x, inverse_rms, weight, grad_out):
    """grad += dL/dx of y = x·r·w, r = (mean(x²) + eps)^(-1/2); returns grad."""
    scaled = grad_out * weight                                              # (…, d)
    grad += inverse_rms * scaled - x * inverse_rms ** 3 * np.mean(scaled * x, axis=-1, keepdims=True)
    return grad


def rope_into_groups(x, cos, sin, kv_heads):
    """x (B, T, H, hd) → (B, KV, T·g, hd), adjacent pairs rotated by the angles of cos, sin
    (B·T, hd/2). Row t·g + j of group k holds head k·g + j at position t (g = H / KV)."""
    B, T, H, hd = x.shape
    group = H // kv_heads
    # 1. rotate every head of every position: (B·T, H, hd)
    rotated = apply_rope(x.reshape(B * T, H, hd), cos, sin)
    # 2. stack each kv head's g query heads position by position: (B, KV, T, g, hd) → (B, KV, T·g, hd)
    grouped = rotated.reshape(B, T, kv_heads, group, hd).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(grouped).reshape(B, kv_heads, T * group, hd)


def rope_back_from_groups(grad, cos, sin):
    """grad (B, KV, T·g, hd) in :func:`rope_into_groups`' order → (B, T, H, hd), rotated back
    by the angles (the gradient of RoPE)."""
    B, kv_heads, rows, hd = grad.shape
    T = cos.shape[0] // B
    # 1. one row per (position, head) again: (B, KV, T, g, hd) → (B·T, H, hd)
    heads = grad.reshape(B, kv_heads, T, rows // T, hd).transpose(0, 2, 1, 3, 4).reshape(B * T, -1, hd)
    # 2. rotate by the opposite angles
    return apply_rope(heads, cos, -sin).reshape(B, T, -1, hd)


def masked_softmax(scores, mask, scale):
    """softmax(scale·scores) over the allowed keys in place; returns each row's log-sum-exp.

    scores (B, KV, T·g, S), row t·g + j for query position t; mask (B or 1, T, S);
    log-sum-exp (B, KV, T·g): log Σ exp(scale·scores) over the allowed keys.
    """
    heads = _by_position(scores, mask)                                       # (B, KV, T, g, S)
    # 1. scale, and −inf where the mask forbids
    heads *= scores.dtype.type(scale)
    np.copyto(heads, scores.dtype.type(-np.inf), where=~mask[:, None, :, None])
    # 2. exp of the scores less each row's largest, normalised
    largest = heads.max(axis=-1, keepdims=True)
    heads -= largest
    np.exp(heads, out=heads)
    total = heads.sum(axis=-1, keepdims=True)
    heads /= total
    # 3. log Σ exp = largest + log(total): (B, KV, T·g)
    return (largest + np.log(total)).reshape(scores.shape[:3])


def masked_softmax_backward(grad_probs, scores, mask, lse, scale):
    """In place: scores (the forward's again) → P = exp(scale·scores − lse) on the allowed
    keys; grad_probs (dL/dP) → dL/dscores = scale·P·(dP − Σ_j P_j dP_j). Returns (P, dL/dscores)."""
    heads = _by_position(scores, mask)                                       # (B, KV, T, g, S)
    # 1. the probabilities again from the scores and the log-sum-exp
    heads *= scores.dtype.type(scale)
    heads -= lse.reshape(heads.shape[:-1] + (1,))
    np.copyto(heads, scores.dtype.type(-np.inf), where=~mask[:, None, :, None])
    np.exp(heads, out=heads)
    # 2. the softmax's gradient
    grad_probs -= np.sum(grad_probs * scores, axis=-1, keepdims=True)
    grad_probs *= scores
    grad_probs *= scores.dtype.type(scale)
    return scores, grad_probs


def _by_position(scores, mask):
    """scores (B, KV, T·g, S) viewed as (B, KV, T, g, S), to meet the mask (B or 1, T, S)."""
    B, KV, rows, S = scores.shape
    return scores.reshape(B, KV, mask.shape[1], rows // mask.shape[1], S)


def swiglu_backward(grad_hidden, gate, up):
    """Gradients of hidden = silu(gate)·up: (dL/dgate, dL/dup); d silu/dg = σ·(1 + g·(1 − σ))."""
    sigmoid = 1 / (1 + np.exp(-gate))
    return grad_hidden * up * sigmoid * (1 + gate * (1 - sigmoid)), grad_hidden * gate * sigmoid


def geglu_backward(grad_hidden, gate, up):
    """Gradients of hidden = gelu_tanh(gate)·up: (dL/dgate, dL/dup). With u = c·(g + a·g³) and
    τ = tanh(u): d gelu/dg = (1 + τ)/2 + g/2 · (1 − τ²) · c · (1 + 3a·g²)."""
    c, a = gate.dtype.type(GELU_C), gate.dtype.type(GELU_A)
    tanh = np.tanh(c * (gate + a * gate ** 3))
    slope = (1 + tanh) / 2 + gate / 2 * (1 - tanh * tanh) * c * (1 + 3 * a * gate * gate)
    return grad_hidden * up * slope, grad_hidden * gelu_tanh(gate)


def cross_entropy(logits, labels, normalizer):
    """Summed cross-entropy of logits (n, vocab) at labels (n,), divided by ``normalizer``; and dL/dlogits.

    Works in place: ``logits`` becomes the gradient (the (n, vocab) array is the
    largest activation of a step, so no second copy of it is made).
    """
    rows = np.arange(len(labels))
    # 1. the loss: log Σ exp(l) − l[label] per row, with the row's largest taken out first
    logits -= logits.max(axis=-1, keepdims=True)                            # (n, vocab) shifted
    picked = logits[rows, labels].astype(np.float64)                        # (n,)
    np.exp(logits, out=logits)
    total = logits.sum(axis=-1, keepdims=True)                              # (n, 1)
    loss = float(np.sum(np.log(total[:, 0], dtype=np.float64) - picked)) / normalizer
    # 2. the gradient: (softmax − onehot) / normalizer
    logits /= total
    logits[rows, labels] -= 1
    logits /= logits.dtype.type(normalizer)
    return loss, logits
