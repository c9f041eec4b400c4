"""Numba kernels for the Llama inference forward (:meth:`qlora_np.models.llama.model.LlamaModel.forward`).

Token-by-token decoding does little arithmetic per step outside the weight products,
so in NumPy its time went to the dozens of small array calls per layer. Each kernel
here replaces such a chain with one call; the plain NumPy functions of the same
names in :mod:`qlora_np.models.llama.reference` are their references.

* :func:`rms_norm`  — x / sqrt(mean(x²) + eps) · weight, row by row;
* :func:`attend`    — RoPE on q and k, store k and v in the KV cache, causal softmax
  attention with grouped-query heads (a sliding window and soft-capped scores where a
  model has them);
* :func:`swiglu`    — silu(gate) · up (rows spread over threads from PARALLEL_MIN_QUERIES on);
* :func:`geglu`     — gelu_tanh(gate) · up, Gemma's gated MLP, spread likewise.

``fastmath`` is on for the reductions (sums of squares, dot products, softmax sums):
they may be summed in any order, so the results match the references within float32
rounding, not bit for bit; exp is :func:`~qlora_np.kernels.portable.exp32.exp32`, which LLVM
vectorises (within 1.4 ulp of the exact value). Nothing here is part of a bit-exact
format.
"""

import math

import numpy as np
from numba import njit, prange

from qlora_np.kernels.portable.exp32 import exp32

PARALLEL_MIN_QUERIES = 8
"""From this many query positions on, :func:`attend` spreads the heads across threads;
for fewer (decoding) a thread hand-off costs more than the work."""


def rms_norm(x, weight, eps):
    """(T, hidden) float32 x → (T, hidden) float32, normalised over the last axis."""
    out = np.empty_like(x)
    _rms_norm_rows(x, weight, np.float32(eps), out)
    return out


@njit(cache=True)
def _rms_norm_rows(x, weight, eps, out):
    for t in range(x.shape[0]):
        rms_norm_row(x[t], weight, eps, out[t])


@njit(cache=True, fastmath=True)
def rms_norm_row(x, weight, eps, out):
    """out = x · r · weight for one row; returns r = 1/sqrt(mean(x²) + eps) (training keeps it)."""
    square_sum = np.float32(0)
    for i in range(x.size):
        square_sum += x[i] * x[i]
    inverse = np.float32(1) / np.sqrt(square_sum / np.float32(x.size) + eps)
    for i in range(x.size):
        out[i] = x[i] * inverse * weight[i]
    return inverse


def attend(q, k, v, cos, sin, keys, values, start, scale=None, window=0, softcap=0.0):
    """Causal attention of T new positions ``start … start+T-1``, filling the KV cache.

    q (T, H, hd), k and v (T, KV, hd) straight from the projections (before RoPE);
    cos, sin (T, hd/2) the RoPE tables of the new positions; keys and values
    (KV, S, hd) with S ≥ start + T, holding positions 0 … start-1 already: the rotated
    k and v are written at start … start+T-1. ``scale`` multiplies q·k (default 1/√hd);
    with a ``window`` a query sees only the keys less than that many positions back; a
    ``softcap`` turns each scaled score z into softcap · tanh(z / softcap). Returns (T, H·hd) float32.
    """
    T, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    _rotate_keys_into_cache(k, v, cos, sin, keys, values, start)
    out = np.empty((T, heads, head_dim), np.float32)
    scores = np.empty((heads, start + T), np.float32)                 # one row of weights per head
    driver = _attend_heads_parallel if T >= PARALLEL_MIN_QUERIES else _attend_heads
    driver(q, cos, sin, keys, values, start, heads // kv_heads, np.float32(scale), window, np.float32(softcap),
           scores, out)
    return out.reshape(T, heads * head_dim)


@njit(cache=True)
def _rotate_keys_into_cache(k, v, cos, sin, keys, values, start):
    T, kv_heads, head_dim = k.shape
    for t in range(T):
        for h in range(kv_heads):
            rotate_pairs(k[t, h], cos[t], sin[t], keys[h, start + t])
            values[h, start + t, :] = v[t, h, :]


@njit(cache=True)
def rotate_pairs(x, cos, sin, out):
    """RoPE of one head: each pair (x[2i], x[2i+1]) rotated by the angle of cos_i, sin_i, into out."""
    for i in range(cos.size):
        even, odd = x[2 * i], x[2 * i + 1]
        out[2 * i] = even * cos[i] - odd * sin[i]
        out[2 * i + 1] = even * sin[i] + odd * cos[i]


@njit(cache=True)
def _attend_heads(q, cos, sin, keys, values, start, group, scale, window, softcap, scores, out):
    for h in range(q.shape[1]):
        _attend_head(q, cos, sin, keys[h // group], values[h // group], start, h, scale, window, softcap,
                     scores[h], out)


@njit(parallel=True, cache=True)
def _attend_heads_parallel(q, cos, sin, keys, values, start, group, scale, window, softcap, scores, out):
    for h in prange(q.shape[1]):
        _attend_head(q, cos, sin, keys[h // group], values[h // group], start, h, scale, window, softcap,
                     scores[h], out)


@njit(cache=True, fastmath=True)
def _attend_head(q, cos, sin, keys, values, start, h, scale, window, softcap, scores, out):
    """Every query of head h: rotate it, softmax(scale · q·k) over its visible keys, weigh v.

    keys, values (S, hd) of this head's kv head; scores (≥ start+T,) scratch.
    """
    head_dim = q.shape[2]
    query = np.empty(head_dim, np.float32)
    for t in range(q.shape[0]):
        for i in range(head_dim // 2):                                   # 1. RoPE on the query
            even, odd = q[t, h, 2 * i], q[t, h, 2 * i + 1]
            query[2 * i] = (even * cos[t, i] - odd * sin[t, i]) * scale
            query[2 * i + 1] = (even * sin[t, i] + odd * cos[t, i]) * scale
        visible = start + t + 1                                          # 2. scores of the visible keys
        first = max(0, visible - window) if window > 0 else 0
        largest = np.float32(-np.inf)
        for s in range(first, visible):
            dot = np.float32(0)
            for i in range(head_dim):
                dot += query[i] * keys[s, i]
            if softcap > 0:
                dot = softcap * np.tanh(dot / softcap)
            scores[s] = dot
            largest = max(largest, dot)
        total = np.float32(0)                                            # 3. softmax
        for s in range(first, visible):
            scores[s] = exp32(scores[s] - largest)
            total += scores[s]
        row = out[t, h]                                                  # 4. weighted values
        row[:] = 0
        for s in range(first, visible):
            weight = scores[s] / total
            for i in range(head_dim):
                row[i] += weight * values[s, i]


def swiglu(gate, up):
    """silu(gate) · up, elementwise over (..., intermediate) float32 arrays."""
    return _gated(gate, up, False)


def geglu(gate, up):
    """gelu_tanh(gate) · up, elementwise over (..., intermediate) float32 arrays (Gemma's MLP)."""
    return _gated(gate, up, True)


def _gated(gate, up, gelu):
    """act(gate) · up, act GELU (tanh) or silu; rows spread over threads from PARALLEL_MIN_QUERIES on."""
    width = gate.shape[-1]
    out = np.empty_like(gate)
    driver = _gated_rows_parallel if out.size >= PARALLEL_MIN_QUERIES * width else _gated_rows
    driver(gate.reshape(-1, width), up.reshape(-1, width), out.reshape(-1, width), gelu)
    return out


@njit(cache=True)
def _gated_rows(gate, up, out, gelu):
    for t in range(gate.shape[0]):
        _gated_row(gate[t], up[t], out[t], gelu)


@njit(parallel=True, cache=True)
def _gated_rows_parallel(gate, up, out, gelu):
    for t in prange(gate.shape[0]):
        _gated_row(gate[t], up[t], out[t], gelu)


@njit(cache=True, inline="always")
def _gated_row(gate, up, out, gelu):
    if gelu:
        _geglu_row(gate, up, out)
    else:
        _swiglu_row(gate, up, out)


@njit(cache=True, error_model="numpy")      # no division-by-zero branch: the loop vectorises
def _swiglu_row(gate, up, out):
    for i in range(gate.size):
        out[i] = gate[i] / (np.float32(1) + exp32(-gate[i])) * up[i]


GELU_C = np.float32(math.sqrt(2 / math.pi))
GELU_A = np.float32(0.044715)
"""The constants of the tanh approximation gelu(x) ≈ x/2 · (1 + tanh(c · (x + a·x³)))."""


@njit(cache=True)
def gelu_tanh(x):
    """The tanh approximation of GELU of one float32 (what torch's ``approximate="tanh"`` computes)."""
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(GELU_C * (x + GELU_A * x * x * x)))


@njit(cache=True)
def _geglu_row(gate, up, out):
    for i in range(gate.size):
        out[i] = gelu_tanh(gate[i]) * up[i]
