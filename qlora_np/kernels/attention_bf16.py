"""Training attention in bfloat16, fused: scores, softmax and products a block of queries at a time.

The chunked attention (:func:`qlora_np.models.llama.lora._attention`) makes a chunk's scores
as a whole (queries × keys) array and multiplies with separate batched products, each
a pass over memory. Here one task takes POSITIONS query positions of one kv group
(their g query heads, stacked as :func:`qlora_np.kernels.portable.training.rope_into_groups` orders them)
and keeps its scores in a buffer that stays in the core's cache:

* forward, per block: S = Q Kᵀ (keys up to the block's last allowed one), P = the
  masked softmax of scale·S, O = P V; it keeps only each row's log-sum-exp (lse);
* backward, per kv group, block by block: P again from S and lse, dP = dO Vᵀ,
  dS = scale · P ⊙ (dP − Σ P ⊙ dP), dQ = dS K, and the block's columns of Pᵀ and dSᵀ;
  then dV = Pᵀ dO and dK = dSᵀ Q over all the group's rows, one product each.

Every product multiplies bfloat16 roundings of its operands with float32 sums, in the
``vdpbf16ps`` register tiles of :mod:`qlora_np.kernels.bf16` (so these kernels need AVX-512 BF16:
see :func:`fuses`); :func:`qlora_np.linalg.reference.attention_bf16` and
:func:`~qlora_np.linalg.reference.attention_bf16_backward` are the same arithmetic in NumPy.
Results match them within float32 summation order; the same inputs always give the
same bytes. Forward tasks are (group, block) pairs; backward tasks are whole groups,
because a group's blocks all add into its dK and dV (so batch · kv heads should be at
least the thread count to keep every thread busy).
"""

import numpy as np
from numba import njit, prange

from qlora_np.errors import ShapeError
from qlora_np.kernels import features
from qlora_np.kernels.x86 import amx
from qlora_np.kernels.bf16 import (PANEL, TILE_ROWS, _pair_bits, _rows_times_panel,
                                   _tile_row1, _tile_rows6, pack_panel, round_row_pairs, rounded_rows)
from qlora_np.kernels.portable.training import key_ends, probs_and_grad_row, softmax_row

POSITIONS = 32
"""Query positions per block: a block's scores are POSITIONS·g rows of at most T keys."""


TRANSPOSE_SIDE = 16
"""Keys and row pairs in one square of :func:`_put_column_pairs` (16 uint32: a cache line)."""

FASTER_UP_TO = 1024
"""Sequence length up to which these kernels beat the chunked attention with bfloat16
products (with the AVX-512 tile and with AMX tiles alike): past it a group's Pᵀ and dSᵀ pairs
(T × T·g/2 each) leave the cache."""


def fuses(head_dim):
    """Whether these kernels apply: AVX-512 BF16 here and heads of whole panels."""
    return features.HAS_AVX512_BF16 and head_dim % PANEL == 0


# ---------------------------------------------------------------------------
# The wrappers
# ---------------------------------------------------------------------------

def attention_bf16(q, k, v, mask, scale):
    """Masked grouped attention forward: q (B, KV, T·g, d), k and v (B, KV, T, d) float32,
    mask (B or 1, T, T) bool (every query allows at least one key) → (out like q, lse
    (B, KV, T·g) float32), lse being each query row's log Σ exp(scale · scores)."""
    B, KV, rows, d, T, group = _checked(q, k, v, mask)
    q_pairs = _pairs(q)                                                      # (G, T·g, d/2) uint32
    kt_panels = _transposed_panels(_pairs(k), T)                             # (G, T/32, d/2, 32)
    v_panels = _row_panels(v)                                                # (G, d/32, T/2, 32)
    out = amx.empty_aligned(q.shape, np.float32)
    lse = np.empty(q.shape[:3], np.float32)
    _forward_blocks(q_pairs, kt_panels, v_panels, mask, key_ends(mask), np.float32(scale), KV, group,
                    out.reshape(B * KV, rows, d), lse.reshape(B * KV, rows), amx.fits(d // 2))
    return out, lse


def attention_bf16_backward(q, k, v, mask, lse, grad_out, scale):
    """Gradients (dq, dk, dv) of :func:`attention_bf16`'s output given grad_out (like q)
    and the lse it returned; the probabilities are made again from q, k and lse."""
    B, KV, rows, d, T, group = _checked(q, k, v, mask)
    if lse.shape != q.shape[:3] or grad_out.shape != q.shape:
        raise ShapeError(f"lse {lse.shape} and grad_out {grad_out.shape} must match q {q.shape}")
    G = B * KV
    grad_q = amx.empty_aligned(q.shape, np.float32)
    grad_k, grad_v = amx.empty_aligned(k.shape, np.float32), amx.empty_aligned(v.shape, np.float32)
    _backward_groups(_pairs(q), _transposed_panels(_pairs(k), T), _row_panels(k),
                     _transposed_panels(_pairs(v), T), _pairs(grad_out),
                     np.ascontiguousarray(q, np.float32).reshape(G, rows, d),
                     np.ascontiguousarray(grad_out, np.float32).reshape(G, rows, d),
                     mask, key_ends(mask), np.ascontiguousarray(lse, np.float32).reshape(G, rows),
                     np.float32(scale), KV, group,
                     grad_q.reshape(G, rows, d), grad_k.reshape(G, T, d), grad_v.reshape(G, T, d),
                     amx.fits(d // 2))
    return grad_q, grad_k, grad_v


def _checked(q, k, v, mask):
    """The shapes (B, KV, T·g, d, T, g), or a ShapeError."""
    if q.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ShapeError(f"q (B, KV, T·g, d) and k, v (B, KV, T, d) do not fit: {q.shape}, {k.shape}, "
                         f"{v.shape}")
    B, KV, rows, d = q.shape
    T = k.shape[2]
    if T == 0 or rows % T or mask.shape not in ((B, T, T), (1, T, T)):
        raise ShapeError(f"q rows {rows} must be a multiple of T = {T}, mask (B or 1, T, T): {mask.shape}")
    if not fuses(d):
        raise ShapeError(f"the fused kernels need AVX-512 BF16 and a head size that is a multiple of "
                         f"{PANEL}, got {d}")
    return B, KV, rows, d, T, rows // T


def _pairs(x):
    """(B, KV, n, d) float32 → (B·KV, n, d/2) uint32: its rows' bfloat16 pairs."""
    B, KV, n, d = x.shape
    return rounded_rows(x.reshape(-1, d)).reshape(B * KV, n, d // 2)


@njit(parallel=True, cache=True)
def _transposed_panels(pairs, T):
    """pairs (G, T, d/2) → the panels of their transposes (G, ceil(T/PANEL), d/2, PANEL):
    ``[g, p, j, c]`` = pairs[g, PANEL·p + c, j], zero past T (for S = Q Kᵀ and dP = dO Vᵀ)."""
    G, _, half = pairs.shape
    panels = amx.zeros_aligned((G, -(-T // PANEL), half, PANEL), np.uint32)
    for g in prange(G):
        for key in range(T):
            for j in range(half):
                panels[g, key // PANEL, j, key % PANEL] = pairs[g, key, j]
    return panels


def _row_panels(x):
    """x (B, KV, T, d) float32 → (G, d/PANEL, ceil(T/PANEL)·PANEL/2, PANEL) uint32: the
    panels of each group's x as the b of a product (for O = P V and dQ = dS K), zero past T."""
    B, KV, T, d = x.shape
    values = np.ascontiguousarray(x, np.float32).reshape(B * KV, T, d)
    panels = amx.zeros_aligned((B * KV, d // PANEL, -(-T // PANEL) * PANEL // 2, PANEL), np.uint32)
    _pack_row_panels(values, panels)
    return panels


@njit(parallel=True, cache=True)
def _pack_row_panels(values, panels):
    T = values.shape[1]
    for g in prange(values.shape[0]):
        for p in range(panels.shape[1]):
            pack_panel(values[g], p, panels[g, p, :(T + 1) // 2])


# ---------------------------------------------------------------------------
# Forward: one task per (group, block)
# ---------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def _forward_blocks(q_pairs, kt_panels, v_panels, mask, ends, scale, kv_heads, group, out, lse, use_amx):
    """out, lse (G, T·g, …) of every group, a block of POSITIONS positions per task. The
    tasks alternate short and long blocks (causal blocks grow with their position), so
    that each thread's contiguous share of them holds as much work as the other's.
    ``use_amx``: multiply with AMX tiles (:mod:`qlora_np.kernels.x86.amx`), else the AVX-512 BF16 tile."""
    G, rows = lse.shape
    T = rows // group
    blocks = -(-T // POSITIONS)
    for task in prange(G * blocks):
        g, turn = task // blocks, task % blocks
        block = turn // 2 if turn % 2 == 0 else blocks - 1 - turn // 2
        b = g // kv_heads if mask.shape[0] > 1 else 0
        if use_amx:
            amx.start(amx.tile_config())
        _forward_block(q_pairs[g], kt_panels[g], v_panels[g], mask[b], ends[b], scale, group,
                       block * POSITIONS, min(T, (block + 1) * POSITIONS), out[g], lse[g], use_amx)
        if use_amx:
            amx.stop()


@njit(cache=True)
def _forward_block(q_pairs, kt_panels, v_panels, mask, ends, scale, group, first, end, out, lse, use_amx):
    """One block: query positions [first, end) of one group → their out rows and lse."""
    rows, r0 = (end - first) * group, first * group
    key_panels = -(-ends[first:end].max() // PANEL)
    # 1. S = Q Kᵀ, one panel of keys at a time
    scores = _block_times_panels(q_pairs, r0, rows, kt_panels, key_panels, use_amx)  # (rows, keys)
    # 2. P = softmax(scale · S) over the allowed keys; keep log Σ exp
    for i in range(rows):
        t = first + i // group
        lse[r0 + i] = softmax_row(scores[i], mask[t], ends[t], scale)
    # 3. O = P V with P rounded to bfloat16 pairs
    _rounded_times_panels(scores, v_panels, out, r0, use_amx)


@njit(cache=True)
def _block_times_panels(pairs, r0, rows, panels, count, use_amx):
    """pairs[r0 : r0 + rows] (…, d/2) @ the first ``count`` panels (… , d/2, PANEL) →
    (rows, count·PANEL) float32: a block's S = Q Kᵀ or dP = dO Vᵀ, keys up to a panel's end."""
    half = pairs.shape[1]
    product = amx.empty_aligned((rows, count * PANEL), np.float32)
    if use_amx:
        amx.rows_times_panels(pairs[r0:r0 + rows], panels[:count], product)
        return product
    for p in range(count):
        _rows_times_panel(pairs.ctypes.data + 4 * r0 * half, half, rows, half, panels[p].ctypes.data,
                          product.ctypes.data + 4 * p * PANEL, count * PANEL)
    return product


@njit(cache=True)
def _rounded_times_panels(values, panels, out, r0, use_amx):
    """out[r0 : r0 + rows] = values (rows, keys) rounded to bfloat16 @ the b whose panels
    (d/PANEL, ≥ keys/2, PANEL) are given: a block's O = P V or dQ = dS K."""
    rows, keys = values.shape
    pairs = amx.empty_aligned((rows, keys // 2), np.uint32)                 # (rows, keys/2)
    for i in range(rows):
        round_row_pairs(values[i], pairs[i])
    d = out.shape[1]
    if use_amx:
        amx.rows_times_panels(pairs, panels[:, :keys // 2], out[r0:r0 + rows])
        return
    for p in range(panels.shape[0]):
        _rows_times_panel(pairs.ctypes.data, keys // 2, rows, keys // 2, panels[p].ctypes.data,
                          out.ctypes.data + 4 * (r0 * d + p * PANEL), d)


# ---------------------------------------------------------------------------
# Backward: one task per group, its blocks in turn
# ---------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def _backward_groups(q_pairs, kt_panels, k_panels, vt_panels, grad_out_pairs, q, grad_out, mask, ends, lse,
                     scale, kv_heads, group, grad_q, grad_k, grad_v, use_amx):
    """grad_q (G, T·g, d), grad_k and grad_v (G, T, d) of every group, one group per task."""
    G, rows, d = q.shape
    T = rows // group
    keys = k_panels.shape[2] * 2                                             # T rounded up to panels
    depth = -(-rows // (2 * amx.STEP_PAIRS)) * amx.STEP_PAIRS                # T·g/2 up to whole tile steps
    for g in prange(G):
        b = g // kv_heads if mask.shape[0] > 1 else 0
        if use_amx:
            amx.start(amx.tile_config())
        probs_t = amx.zeros_aligned((keys, depth), np.uint32)                # Pᵀ's pairs, (keys, T·g/2)
        grad_scores_t = amx.zeros_aligned((keys, depth), np.uint32)          # dSᵀ's pairs
        for first in range(0, T, POSITIONS):
            _backward_block(q_pairs[g], kt_panels[g], k_panels[g], vt_panels[g], grad_out_pairs[g], mask[b],
                            ends[b], lse[g], scale, group, first, min(T, first + POSITIONS), grad_q[g],
                            probs_t, grad_scores_t, use_amx)
        # dV = Pᵀ dO and dK = dSᵀ Q over all the group's rows
        _lower_product(probs_t, grad_out[g], group, grad_v[g], use_amx)
        _lower_product(grad_scores_t, q[g], group, grad_k[g], use_amx)
        if use_amx:
            amx.stop()


@njit(cache=True)
def _backward_block(q_pairs, kt_panels, k_panels, vt_panels, grad_out_pairs, mask, ends, lse, scale, group,
                    first, end, grad_q, probs_t, grad_scores_t, use_amx):
    """One block of one group: its grad_q rows, and its columns of Pᵀ and dSᵀ (as pairs)."""
    rows, r0 = (end - first) * group, first * group
    key_panels = -(-ends[first:end].max() // PANEL)
    # 1. P again: S = Q Kᵀ, P = exp(scale · S − lse) on the allowed keys
    probs = _block_times_panels(q_pairs, r0, rows, kt_panels, key_panels, use_amx)   # (rows, keys)
    # 2. dP = dO Vᵀ
    grad_scores = _block_times_panels(grad_out_pairs, r0, rows, vt_panels, key_panels, use_amx)
    # 3. dS = scale · P ⊙ (dP − Σ P ⊙ dP), row by row
    for i in range(rows):
        t = first + i // group
        probs_and_grad_row(probs[i], grad_scores[i], mask[t], ends[t], lse[r0 + i], scale)
    # 4. dQ = dS K
    _rounded_times_panels(grad_scores, k_panels, grad_q, r0, use_amx)
    # 5. this block's columns of Pᵀ and dSᵀ, for dV and dK
    _put_column_pairs(probs, r0, probs_t)
    _put_column_pairs(grad_scores, r0, grad_scores_t)


@njit(cache=True)
def _put_column_pairs(values, r0, pairs_t):
    """pairs_t[s, r0/2 + i] = the bfloat16 pair (values[2i, s], values[2i + 1, s]): values
    (rows, keys) float32 as rows r0 … of a transposed product's a (r0 even). The pairs are
    made row by row first (a loop LLVM vectorises), then copied in squares of TRANSPOSE_SIDE
    keys × pairs, whose reads and writes each stay within a few cache lines: faster than making
    each pair where it goes."""
    rows, keys = values.shape
    bits = values.view(np.uint32)
    pairs = np.empty((rows // 2, keys), np.uint32)
    for i in range(rows // 2):
        for s in range(keys):
            pairs[i, s] = _pair_bits(bits[2 * i, s], bits[2 * i + 1, s])
    for s0 in range(0, keys, TRANSPOSE_SIDE):
        for i0 in range(0, rows // 2, TRANSPOSE_SIDE):
            for s in range(s0, min(keys, s0 + TRANSPOSE_SIDE)):
                for i in range(i0, min(rows // 2, i0 + TRANSPOSE_SIDE)):
                    pairs_t[s, r0 // 2 + i] = pairs[i, s]
    if rows % 2:
        for s in range(keys):
            pairs_t[s, r0 // 2 + rows // 2] = _pair_bits(bits[rows - 1, s], np.uint32(0))


@njit(cache=True)
def _lower_product(pairs_t, b, group, out, use_amx):
    """out (T, d) = aᵀ b in bfloat16 for a causal aᵀ given as pairs_t (≥ T, ≥ rows/2, zero
    past rows/2) and b (rows, d) float32: key s sees no row before s·g, so each tile of
    keys starts its sums at the pair of its first key's first row (the rows before add
    only zeros; for AMX, at the pair before it that leaves whole steps of k)."""
    T, d = out.shape
    depth = pairs_t.shape[1]
    panels = amx.zeros_aligned((d // PANEL, depth, PANEL), np.uint32)
    for p in range(d // PANEL):
        pack_panel(b, p, panels[p, :(b.shape[0] + 1) // 2])
    if use_amx:
        for s in range(0, T, amx.BLOCK_ROWS):
            start = depth - (depth - s * group // 2) // amx.STEP_PAIRS * amx.STEP_PAIRS
            amx.rows_times_panels(pairs_t[s:min(T, s + amx.BLOCK_ROWS), start:], panels[:, start:],
                                  out[s:s + amx.BLOCK_ROWS])
        return
    for s in range(0, T, TILE_ROWS):
        start = s * group // 2                                               # the pair of key s's first row
        for p in range(d // PANEL):
            a_at = pairs_t.ctypes.data + 4 * (s * depth + start)
            panel_at = panels[p].ctypes.data + 4 * start * PANEL
            c_at = out.ctypes.data + 4 * (s * d + p * PANEL)
            if s + TILE_ROWS <= T:
                _tile_rows6(a_at, depth, panel_at, depth - start, c_at, d)
            else:
                for key in range(T - s):
                    _tile_row1(a_at + 4 * key * depth, depth, panel_at, depth - start, c_at + 4 * key * d, d)
