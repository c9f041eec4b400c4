"""Numba kernels for the element-wise passes of a training step (:mod:`qlora_np.models.llama.lora`).

Between its weight products a training step runs chains of NumPy calls over
activation-sized arrays: each a pass over memory, on one core. Each kernel here
does one such chain in one pass, row by row, spread over the Numba threads. The
plain NumPy functions of the same names in :mod:`qlora_np.models.llama.reference` are
their references (float64 training runs those):

* :func:`rms_norm_forward` / :func:`add_rms_norm_backward` — RMSNorm and its gradient;
* :func:`rope_into_groups` / :func:`rope_back_from_groups` — RoPE fused with the
  reordering the attention products need (each kv head's query heads stacked), and
  the inverse rotation fused with the reordering back;
* :func:`masked_softmax` / :func:`masked_softmax_backward` — the attention softmax
  (scale, mask, normalise) in place, keeping each row's log-sum-exp, and its gradient
  with the probabilities made again from the scores and that log-sum-exp;
* :func:`swiglu` / :func:`swiglu_backward` — silu(gate)·up and its gradients;
  :func:`geglu` / :func:`geglu_backward` the same for Gemma's gelu_tanh(gate)·up;
* :func:`cross_entropy` — the loss over the vocabulary and its gradient, in place of
  the logits (the largest array of a step);
* :func:`dropout_keep` — an adapter's dropout mask, hashed from one seed (its reference
  is :func:`qlora_np.nn.lora.dropout_keep`), and :func:`apply_dropout`, the mask applied.

All take and return float32 C-contiguous arrays. ``fastmath`` is on where a kernel sums
(row sums of squares, softmax sums, dot products): those sums may be taken in any order,
so results match the references within float32 rounding, not bit for bit; exp is
:func:`~qlora_np.kernels.portable.exp32.exp32` (within 1.4 ulp of the exact value). The same
inputs always give the same bytes, so training stays reproducible.
"""

import numpy as np
from numba import njit, prange

from qlora_np.kernels.portable.exp32 import exp32, float32_with_bits
from qlora_np.kernels.portable.llama import GELU_A, GELU_C, geglu, rms_norm_row, rotate_pairs, swiglu

__all__ = ["rms_norm_forward", "add_rms_norm_backward", "rope_into_groups", "rope_back_from_groups",
           "masked_softmax", "masked_softmax_backward", "swiglu", "swiglu_backward", "geglu", "geglu_backward",
           "cross_entropy",
           "dropout_keep", "apply_dropout"]


# ---------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------

def rms_norm_forward(x, weight, eps):
    """x (..., d) → (x·r·weight, r) with r = 1/sqrt(mean(x²) + eps) of shape (..., 1)."""
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    inverse_rms = np.empty((rows.shape[0], 1), np.float32)
    _rms_norm_rows(rows, weight, np.float32(eps), out, inverse_rms)
    return out.reshape(x.shape), inverse_rms.reshape(x.shape[:-1] + (1,))


@njit(parallel=True, cache=True)
def _rms_norm_rows(x, weight, eps, out, inverse_rms):
    for t in prange(x.shape[0]):
        inverse_rms[t, 0] = rms_norm_row(x[t], weight, eps, out[t])


def add_rms_norm_backward(grad, x, inverse_rms, weight, grad_out):
    """grad += dL/dx of y = x·r·weight (r as :func:`rms_norm_forward` returned it); returns grad."""
    d = x.shape[-1]
    _rms_norm_backward_rows(grad.reshape(-1, d), x.reshape(-1, d), inverse_rms.reshape(-1, 1), weight,
                            grad_out.reshape(-1, d))
    return grad


@njit(parallel=True, cache=True)
def _rms_norm_backward_rows(grad, x, inverse_rms, weight, grad_out):
    for t in prange(x.shape[0]):
        _rms_norm_backward_row(grad[t], x[t], inverse_rms[t, 0], weight, grad_out[t])


@njit(cache=True, fastmath=True)
def _rms_norm_backward_row(grad, x, inverse, weight, grad_out):
    """grad += r·(g·w) − x·r³·mean((g·w)·x)."""
    dot = np.float32(0)
    for i in range(x.size):
        dot += grad_out[i] * weight[i] * x[i]
    coefficient = inverse * inverse * inverse * (dot / np.float32(x.size))
    for i in range(x.size):
        grad[i] += inverse * (grad_out[i] * weight[i]) - x[i] * coefficient


# ---------------------------------------------------------------------------
# RoPE, fused with the reordering into and out of kv-head groups
# ---------------------------------------------------------------------------

def rope_into_groups(x, cos, sin, kv_heads):
    """x (B, T, H, hd) → (B, KV, T·g, hd), adjacent pairs rotated by the angles of cos, sin (B·T, hd/2).

    Row t·g + j of group k holds head k·g + j at position t (g = H / KV): each kv head's
    query heads stacked position by position, so that rows [t0·g, t1·g) are the queries
    of positions t0 … t1-1 (with kv_heads = H, one head per group).
    """
    B, T, H, hd = x.shape
    out = np.empty((B, kv_heads, T * (H // kv_heads), hd), np.float32)
    _rope_between_layouts(x, cos.reshape(B, T, -1), sin.reshape(B, T, -1), out, True)
    return out


def rope_back_from_groups(grad, cos, sin):
    """grad (B, KV, T·g, hd) in :func:`rope_into_groups`' order → (B, T, KV·g, hd), rotated back
    by the angles (the gradient of RoPE)."""
    B, KV, rows, hd = grad.shape
    T = cos.shape[0] // B
    out = np.empty((B, T, KV * (rows // T), hd), np.float32)
    _rope_between_layouts(out, cos.reshape(B, T, -1), -sin.reshape(B, T, -1), grad, False)   # by −angle
    return out


@njit(parallel=True, cache=True)
def _rope_between_layouts(by_head, cos, sin, grouped, into_groups):
    """Rotate every (position, head) row from by_head (B, T, H, hd) into grouped
    (B, KV, T·g, hd), or the other way round."""
    B, T, H, hd = by_head.shape
    group = H // grouped.shape[1]
    for bt in prange(B * T):
        b, t = bt // T, bt % T
        for h in range(H):
            grouped_row = grouped[b, h // group, t * group + h % group]
            if into_groups:
                rotate_pairs(by_head[b, t, h], cos[b, t], sin[b, t], grouped_row)
            else:
                rotate_pairs(grouped_row, cos[b, t], sin[b, t], by_head[b, t, h])


# ---------------------------------------------------------------------------
# Attention softmax
# ---------------------------------------------------------------------------

def masked_softmax(scores, mask, scale):
    """softmax(scale·scores) over the keys ``mask`` allows, in place; returns each row's
    log-sum-exp (B, KV, T·g) float32, log Σ exp(scale·scores) over those keys, from which
    :func:`masked_softmax_backward` makes the probabilities again.

    scores (B, KV, T·g, S) in :func:`rope_into_groups`' row order (row t·g + j is query
    position t); mask (B or 1, T, S) bool, True where query t may see key s (every row
    must allow at least one key).
    """
    B, KV, rows, S = scores.shape
    lse = np.empty((B, KV, rows), np.float32)
    _masked_softmax_rows(scores.reshape(-1, S), mask, key_ends(mask), np.float32(scale),
                         rows // mask.shape[1], KV * rows, lse.reshape(-1))
    return lse


def masked_softmax_backward(grad_probs, scores, mask, lse, scale):
    """The probabilities again and dL/dscores, in place: scores (the forward's scores
    again) become P = exp(scale·scores − lse) on the allowed keys, grad_probs (dL/dP)
    becomes dL/dscores = scale · P ⊙ (dP − Σ_j P_j dP_j). Returns (probs, grad_scores).

    Making P again costs an exp a score but keeps no (queries × keys) array between
    the passes. Shapes as :func:`masked_softmax`; lse is what it returned.
    """
    B, KV, rows, S = scores.shape
    _softmax_backward_rows(grad_probs.reshape(-1, S), scores.reshape(-1, S), mask, key_ends(mask),
                           np.ascontiguousarray(lse, np.float32).reshape(-1), np.float32(scale),
                           rows // mask.shape[1], KV * rows)
    return scores, grad_probs


def key_ends(mask):
    """(B or 1, T) int64: 1 + the last key each query position may see (keys after it
    are all masked: causal, half the row, skipped without exp)."""
    return (mask.shape[2] - np.argmax(mask[:, :, ::-1], axis=-1)).astype(np.int64)


@njit(cache=True, inline="always")
def _batch_and_position(row, mask, group, rows_per_batch):
    """(batch of the mask, query position) of row ``row`` of the flattened (B·KV·T·g) scores."""
    return (row // rows_per_batch if mask.shape[0] > 1 else 0), row // group % mask.shape[1]


@njit(parallel=True, cache=True)
def _masked_softmax_rows(scores, mask, ends, scale, group, rows_per_batch, lse):
    for row in prange(scores.shape[0]):
        b, t = _batch_and_position(row, mask, group, rows_per_batch)
        lse[row] = softmax_row(scores[row], mask[b, t], ends[b, t], scale)


@njit(parallel=True, cache=True)
def _softmax_backward_rows(grad, scores, mask, ends, lse, scale, group, rows_per_batch):
    for row in prange(grad.shape[0]):
        b, t = _batch_and_position(row, mask, group, rows_per_batch)
        probs_and_grad_row(scores[row], grad[row], mask[b, t], ends[b, t], lse[row], scale)


@njit(cache=True, inline="always")
def _ordered_key(bits):
    """float32 bits (int32) → an int32 in the floats' order (negatives' magnitudes flipped)."""
    return bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF))


_NO_KEY = np.int32(-2 ** 31)            # the smallest int32: below −inf's key; only negative NaNs reach it


@njit(cache=True)
def largest_allowed(values, allowed, end):
    """The largest of values[:end] (float32) where ``allowed`` (None: everywhere), −inf if
    none. Taken over the values' bits as integers in the same order: LLVM vectorises an
    integer max, where a float compare-and-select stays one serial chain (that chain was
    half of a softmax row's time, and most of the cross-entropy's over the vocabulary).
    A positive NaN comes out as the largest; a negative one is passed over."""
    bits = values.view(np.int32)
    top = _NO_KEY
    for s in range(end):
        key = _ordered_key(bits[s])
        if allowed is not None:
            key = key if allowed[s] else _NO_KEY
        top = max(top, key)
    return np.float32(-np.inf) if top == _NO_KEY else float32_with_bits(_ordered_key(top))


@njit(cache=True, fastmath=True, error_model="numpy")
def softmax_row(scores, allowed, end, scale):
    """scores[:] = softmax(scale · scores) over the keys ``allowed`` before ``end``, 0 elsewhere;
    returns log Σ exp(scale · scores) over the allowed keys. (scale > 0, so the largest
    scaled score is the largest score, scaled: rounding keeps the order.)"""
    largest = largest_allowed(scores, allowed, end) * scale
    total = np.float32(0)
    for s in range(end):
        weight = exp32(scores[s] * scale - largest) if allowed[s] else np.float32(0)
        scores[s] = weight
        total += weight
    inverse = np.float32(1) / total
    for s in range(end):
        scores[s] *= inverse
    scores[end:] = 0
    return largest + np.log(total)


@njit(cache=True, fastmath=True, error_model="numpy")
def probs_and_grad_row(probs, grad, allowed, end, lse, scale):
    """probs[:] = exp(scale · S − lse) from the scores S in probs, 0 where not allowed; then
    grad[:] = scale · P ⊙ (dP − Σ P ⊙ dP) from the dP in grad."""
    for s in range(end):
        probs[s] = exp32(probs[s] * scale - lse) if allowed[s] else np.float32(0)
    probs[end:] = 0
    weighted = np.float32(0)
    for s in range(end):
        weighted += grad[s] * probs[s]
    for s in range(end):
        grad[s] = (grad[s] - weighted) * probs[s] * scale
    grad[end:] = 0


# ---------------------------------------------------------------------------
# SwiGLU and GeGLU backward (the forwards are the inference kernels')
# ---------------------------------------------------------------------------

def swiglu_backward(grad_hidden, gate, up):
    """Gradients of hidden = silu(gate)·up: (dL/dgate, dL/dup), each shaped like gate."""
    return _gated_backward(grad_hidden, gate, up, False)


def geglu_backward(grad_hidden, gate, up):
    """Gradients of hidden = gelu_tanh(gate)·up: (dL/dgate, dL/dup), each shaped like gate."""
    return _gated_backward(grad_hidden, gate, up, True)


def _gated_backward(grad_hidden, gate, up, gelu):
    width = gate.shape[-1]
    grad_gate, grad_up = np.empty_like(gate), np.empty_like(up)
    _gated_backward_rows(grad_hidden.reshape(-1, width), gate.reshape(-1, width), up.reshape(-1, width),
                         grad_gate.reshape(-1, width), grad_up.reshape(-1, width), gelu)
    return grad_gate, grad_up


@njit(parallel=True, cache=True)
def _gated_backward_rows(grad_hidden, gate, up, grad_gate, grad_up, gelu):
    for t in prange(gate.shape[0]):
        if gelu:
            _geglu_backward_row(grad_hidden[t], gate[t], up[t], grad_gate[t], grad_up[t])
        else:
            _swiglu_backward_row(grad_hidden[t], gate[t], up[t], grad_gate[t], grad_up[t])


@njit(cache=True, error_model="numpy")      # no division-by-zero branch: the loop vectorises
def _swiglu_backward_row(grad_hidden, gate, up, grad_gate, grad_up):
    """With σ = sigmoid(gate): d silu/d gate = σ·(1 + gate·(1 − σ)), silu = gate·σ."""
    one = np.float32(1)
    for i in range(gate.size):
        sigmoid = one / (one + exp32(-gate[i]))
        grad_gate[i] = grad_hidden[i] * up[i] * sigmoid * (one + gate[i] * (one - sigmoid))
        grad_up[i] = grad_hidden[i] * gate[i] * sigmoid


@njit(cache=True)
def _geglu_backward_row(grad_hidden, gate, up, grad_gate, grad_up):
    """With τ = tanh(c·(g + a·g³)): d gelu/dg = (1 + τ)/2 + g/2 · (1 − τ²) · c · (1 + 3a·g²)."""
    half, one, three = np.float32(0.5), np.float32(1), np.float32(3)
    for i in range(gate.size):
        g = gate[i]
        tanh = np.tanh(GELU_C * (g + GELU_A * g * g * g))
        slope = half * (one + tanh) + half * g * (one - tanh * tanh) * GELU_C * (one + three * GELU_A * g * g)
        grad_gate[i] = grad_hidden[i] * up[i] * slope
        grad_up[i] = grad_hidden[i] * half * g * (one + tanh)


# ---------------------------------------------------------------------------
# Cross-entropy over the vocabulary
# ---------------------------------------------------------------------------

def cross_entropy(logits, labels, normalizer):
    """Summed cross-entropy of logits (n, vocab) at labels (n,) over ``normalizer``, and
    dL/dlogits = (softmax − onehot) / normalizer written over the logits; returns both.

    Labels must lie in [0, vocab): the caller checks (the kernel does not).
    """
    losses = np.empty(logits.shape[0], np.float64)
    _cross_entropy_rows(logits, np.asarray(labels, np.int64), np.float32(1 / normalizer), losses)
    return float(losses.sum()) / normalizer, logits


@njit(parallel=True, cache=True)
def _cross_entropy_rows(logits, labels, scale, losses):
    for row in prange(logits.shape[0]):
        losses[row] = _cross_entropy_row(logits[row], labels[row], scale)


@njit(cache=True, fastmath=True, error_model="numpy")
def _cross_entropy_row(logits, label, scale):
    """One row: its loss log Σ exp(l) − l[label] (float64), and the row turned into its gradient."""
    largest = largest_allowed(logits, None, logits.size)
    picked = logits[label] - largest
    total = np.float32(0)
    for s in range(logits.size):
        weight = exp32(logits[s] - largest)
        logits[s] = weight
        total += weight
    factor = scale / total
    for s in range(logits.size):
        logits[s] *= factor
    logits[label] -= scale
    return np.log(np.float64(total)) - np.float64(picked)


# ---------------------------------------------------------------------------
# Dropout masks
# ---------------------------------------------------------------------------

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1, _MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def dropout_keep(seed, shape, p):
    """Which of ``shape`` (rows, cols) values inverted dropout keeps, from one 64-bit seed:
    the bytes of :func:`qlora_np.nn.lora.dropout_keep` (its reference), every value hashed on
    its own, so the rows go to the threads in any order."""
    keep = np.empty(shape, np.bool_)
    _dropout_keep_rows(np.uint64(seed), _drop_threshold(p), keep.reshape(-1, shape[-1]))
    return keep


def _drop_threshold(p):
    """Below this 32-bit number a value is dropped: round(p · 2³²)."""
    return np.uint64(round(p * 2 ** 32))


@njit(parallel=True, cache=True)
def _dropout_keep_rows(seed, threshold, keep):
    rows, cols = keep.shape
    for r in prange(rows):
        first = np.uint64(r) * np.uint64(cols) + np.uint64(1)
        for c in range(cols):
            hashed = _splitmix64(seed + (first + np.uint64(c)) * _GOLDEN_GAMMA)
            keep[r, c] = (hashed >> np.uint64(32)) >= threshold


@njit(cache=True, inline="always")
def _splitmix64(z):
    """SplitMix64's output function: a 64-bit hash whose bits pass statistical tests."""
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


def apply_dropout(values, keep, scale):
    """values · keep · scale (float32, keep bool, both (rows, cols)): inverted dropout in one
    parallel pass, the bytes of :func:`qlora_np.nn.lora.apply_dropout`."""
    out = np.empty_like(values)
    _apply_dropout_rows(values.reshape(-1, values.shape[-1]), keep.reshape(-1, values.shape[-1]),
                        np.float32(scale), out.reshape(-1, values.shape[-1]))
    return out


@njit(parallel=True, cache=True)
def _apply_dropout_rows(values, keep, scale, out):
    for r in prange(values.shape[0]):
        for c in range(values.shape[1]):
            out[r, c] = values[r, c] * np.float32(keep[r, c]) * scale
