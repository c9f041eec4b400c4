"""The Numba inference kernels of qlora_np.kernels.portable.llama against their NumPy references."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qlora_np.kernels.portable import llama as llama_cpu
from qlora_np.models.llama.model import rope_tables
from qlora_np.models.llama.reference import apply_rope, causal_attention, rms_norm, silu

# The kernels sum in any order (fastmath): float32 rounding of sums of up to a few
# hundred terms of size ~1 is far below this.
TOLERANCE = dict(rtol=2e-5, atol=2e-5)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 5), hidden=st.integers(1, 300), seed=st.integers(0, 99))
def test_rms_norm_matches_the_reference(rows, hidden, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, hidden)).astype(np.float32) * 3
    weight = rng.standard_normal(hidden).astype(np.float32)
    np.testing.assert_allclose(llama_cpu.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5), **TOLERANCE)


def _reference_attend(q, k, v, positions, keys_before, values_before, theta):
    """RoPE, cache append and causal attention with the NumPy functions of qlora_np.models.llama.model."""
    cos, sin = rope_tables(positions, q.shape[2], theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys = np.concatenate([keys_before, k.transpose(1, 0, 2)], axis=1)         # (KV, S, hd)
    values = np.concatenate([values_before, v.transpose(1, 0, 2)], axis=1)
    out = causal_attention(q.transpose(1, 0, 2), keys, values, positions)       # (H, T, hd)
    return out.transpose(1, 0, 2).reshape(len(positions), -1), keys, values


@pytest.mark.parametrize("new, before, heads, kv_heads", [
    (1, 0, 2, 1), (1, 17, 9, 3), (3, 5, 4, 2), (12, 0, 6, 6), (9, 30, 4, 1)])   # 9+ queries: parallel
def test_attend_matches_rope_cache_and_causal_attention(new, before, heads, kv_heads):
    head_dim, theta = 16, 10000.0
    rng = np.random.default_rng(new * 100 + before)
    q = rng.standard_normal((new, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((new, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((new, kv_heads, head_dim)).astype(np.float32)
    keys = np.zeros((kv_heads, before + new + 4, head_dim), np.float32)          # room to spare
    values = np.zeros_like(keys)
    keys[:, :before] = rng.standard_normal((kv_heads, before, head_dim))
    values[:, :before] = rng.standard_normal((kv_heads, before, head_dim))
    positions = np.arange(before, before + new)
    expected, expected_keys, expected_values = _reference_attend(
        q, k, v, positions, keys[:, :before], values[:, :before], theta)

    out = llama_cpu.attend(q, k, v, *rope_tables(positions, head_dim, theta), keys, values, before)
    assert out.shape == (new, heads * head_dim) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, **TOLERANCE)
    np.testing.assert_allclose(keys[:, :before + new], expected_keys, **TOLERANCE)
    np.testing.assert_array_equal(values[:, :before + new], expected_values)
    assert not keys[:, before + new:].any()                       # nothing written past the new positions


def test_swiglu_matches_silu_times_up():
    rng = np.random.default_rng(3)
    gate = (rng.standard_normal((3, 50)) * 6).astype(np.float32)
    up = rng.standard_normal((3, 50)).astype(np.float32)
    np.testing.assert_allclose(llama_cpu.swiglu(gate, up), silu(gate) * up, **TOLERANCE)


@pytest.mark.parametrize("new, before", [(1, 0), (1, 20), (9, 0), (12, 7)])
@pytest.mark.parametrize("window, softcap, scale", [(0, 0.0, None), (4, 0.0, None), (5, 1.5, 0.3), (0, 2.0, None),
                                                    (64, 0.0, 0.1)])
def test_attend_with_a_window_a_softcap_and_a_scale_matches_its_reference(new, before, window, softcap, scale):
    from qlora_np.models.llama import reference

    heads, kv_heads, head_dim = 4, 2, 8
    rng = np.random.default_rng(new * 10 + before + window)
    q, k, v = (rng.standard_normal((new, n, head_dim)).astype(np.float32) for n in (heads, kv_heads, kv_heads))
    cache = rng.standard_normal((2, kv_heads, before + new, head_dim)).astype(np.float32)
    tables = rope_tables(np.arange(before, before + new), head_dim, 10000.0)
    caches = [cache.copy() for _ in range(2)]
    got = llama_cpu.attend(q, k, v, *tables, *caches[0], before, scale, window, softcap)
    want = reference.attend(q, k, v, *tables, *caches[1], before, scale, window, softcap)
    np.testing.assert_allclose(got, want, **TOLERANCE)
    np.testing.assert_allclose(caches[0], caches[1], **TOLERANCE)
    if window and before + new > window:                            # the window changes the result
        plain = reference.attend(q, k, v, *tables, *cache.copy(), before, scale, 0, softcap)
        assert np.abs(plain - want).max() > 1e-3
