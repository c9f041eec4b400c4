"""The Numba kernels of qlora_np.kernels.portable.training and exp32 against their NumPy references."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from numba import njit

from qlora_np.models.llama import lora as llama_lora, reference
from qlora_np.kernels.portable import training as training_cpu
from qlora_np.kernels.portable.exp32 import exp32

# The kernels sum in any order (fastmath) and use exp32 (≤ 1.4 ulp) where NumPy uses its
# own exp (≤ 3 ulp from exp32): float32 rounding of sums of up to a few hundred terms
# of size ~1 stays far below this.
TOLERANCE = dict(rtol=3e-5, atol=3e-6)


@njit
def _exp32_all(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = exp32(x[i])
    return out


def test_exp32_is_within_two_ulp_of_the_exact_exp_over_the_normal_range():
    x = np.linspace(-87.3, 88.7228, 1_000_001, dtype=np.float32)
    exact = np.exp(x.astype(np.float64))
    relative = np.abs(_exp32_all(x) / exact - 1)
    assert relative.max() < 2 * 2.0 ** -24                     # 2 units in the last place


def test_exp32_rounds_subnormal_results_once():
    x = np.linspace(-103.9, -87.4, 100_001, dtype=np.float32)
    exact = np.exp(x.astype(np.float64)).astype(np.float32)    # correctly rounded
    spacing = np.float32(2.0 ** -149)                          # the subnormal step
    assert np.max(np.abs(_exp32_all(x) - exact)) <= spacing


def test_exp32_edges():
    x = np.array([0, -0.0, 1, -np.inf, np.inf, np.nan, -105, -1000, 89, 1000], np.float32)
    got = _exp32_all(x)
    assert got[0] == got[1] == 1
    np.testing.assert_allclose(got[2], np.e, rtol=2 ** -23)
    assert got[3] == 0 and got[4] == np.inf and np.isnan(got[5])
    assert got[6] == 0 and got[7] == 0                          # e^x rounds to 0
    assert got[8] == np.inf and got[9] == np.inf
    assert _exp32_all(x[:1].repeat(64))[63] == 1                # the vectorised loop agrees


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=80), data=st.data())
def test_largest_allowed_is_numpys_max_over_the_allowed_values(values, data):
    values = np.array(values, np.float32)
    allowed = np.array(data.draw(st.lists(st.booleans(), min_size=values.size, max_size=values.size)))
    end = data.draw(st.integers(0, values.size))
    seen = values[:end][allowed[:end]]
    expected = seen.max() if seen.size else -np.inf
    assert training_cpu.largest_allowed(values, allowed, end) == expected
    assert training_cpu.largest_allowed(values, None, values.size) == values.max()


def test_largest_allowed_orders_signed_zeros_and_infinities_and_keeps_a_nan():
    values = np.array([-0.0, -np.inf, -3.5, 0.0, -1e-45], np.float32)
    assert np.signbit(training_cpu.largest_allowed(values, None, 3))          # −0 is the largest of the first 3
    assert not np.signbit(training_cpu.largest_allowed(values, None, 5))      # +0 beats −0
    assert training_cpu.largest_allowed(values, np.zeros(5, bool), 5) == -np.inf
    assert np.isnan(training_cpu.largest_allowed(np.array([1.0, np.nan], np.float32), None, 2))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), width=st.integers(1, 300), seed=st.integers(0, 99))
def test_rms_norm_forward_and_backward_match_the_reference(rows, width, seed):
    rng = np.random.default_rng(seed)
    x, grad_out, grad = (rng.standard_normal((3, 2, rows, width)) * 2).astype(np.float32)
    weight = rng.standard_normal(width).astype(np.float32)
    got_y, got_inverse = training_cpu.rms_norm_forward(x, weight, 1e-5)
    want_y, want_inverse = reference.rms_norm_forward(x, weight, 1e-5)
    np.testing.assert_allclose(got_y, want_y, **TOLERANCE)
    np.testing.assert_allclose(got_inverse, want_inverse, **TOLERANCE)
    got = training_cpu.add_rms_norm_backward(grad.copy(), x, want_inverse, weight, grad_out)
    want = reference.add_rms_norm_backward(grad.copy(), x, want_inverse, weight, grad_out)
    np.testing.assert_allclose(got, want, **TOLERANCE)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 20), KV=st.integers(1, 3), group=st.integers(1, 3),
       half=st.integers(1, 8), seed=st.integers(0, 99))
def test_rope_into_and_back_from_groups_match_the_reference(B, T, KV, group, half, seed):
    rng = np.random.default_rng(seed)
    H = KV * group
    x = rng.standard_normal((B, T, H, 2 * half)).astype(np.float32)
    angles = rng.uniform(-7, 7, (B * T, half))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    groups = training_cpu.rope_into_groups(x, cos, sin, KV)
    assert groups.shape == (B, KV, T * group, 2 * half)
    np.testing.assert_allclose(groups, reference.rope_into_groups(x, cos, sin, KV), **TOLERANCE)
    b, t, h = rng.integers(B), rng.integers(T), rng.integers(H)      # the layout: head h at t
    rotated = reference.apply_rope(x[b, t, h][None, None], cos[b * T + t][None], sin[b * T + t][None])
    np.testing.assert_allclose(groups[b, h // group, t * group + h % group], rotated[0, 0], **TOLERANCE)
    back = training_cpu.rope_back_from_groups(groups, cos, sin)
    np.testing.assert_allclose(back, reference.rope_back_from_groups(groups, cos, sin), **TOLERANCE)
    np.testing.assert_allclose(back, x, **TOLERANCE)               # a rotation, undone


def _mask(rng, B, T, kind):
    causal = np.tril(np.ones((T, T), bool))
    if kind == "causal":
        return causal[None]
    if kind == "segments":
        segments = np.sort(rng.integers(0, 3, (B, T)), axis=1)
        return (segments[:, :, None] == segments[:, None, :]) & causal
    mask = rng.random((B, T, T)) < 0.5                          # any pattern, one key at least
    mask[:, np.arange(T), rng.integers(0, T, T)] = True
    return mask


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), KV=st.integers(1, 3), group=st.integers(1, 3), T=st.integers(1, 40),
       hd=st.integers(1, 16), kind=st.sampled_from(["causal", "segments", "any"]), seed=st.integers(0, 99))
def test_masked_softmax_and_its_backward_match_the_reference(B, KV, group, T, hd, kind, seed):
    rng = np.random.default_rng(seed)
    mask = _mask(rng, B, T, kind)
    scores = (rng.standard_normal((B, KV, T * group, T)) * 4).astype(np.float32)
    scale = 1 / np.sqrt(hd)
    probs, want = scores.copy(), scores.copy()
    lse = training_cpu.masked_softmax(probs, mask, scale)
    want_lse = reference.masked_softmax(want, mask, scale)
    np.testing.assert_allclose(probs, want, **TOLERANCE)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    heads_mask = np.broadcast_to(mask[:, None, :, None], (B, KV, T, group, T)).reshape(probs.shape)
    assert np.all(probs[~heads_mask] == 0)                      # masked keys get exactly 0
    np.testing.assert_allclose(probs.sum(axis=-1), 1, rtol=1e-5)

    grad_probs = rng.standard_normal(probs.shape).astype(np.float32)
    again, got = training_cpu.masked_softmax_backward(grad_probs.copy(), scores.copy(), mask, lse, scale)
    want_again, expected = reference.masked_softmax_backward(grad_probs.copy(), scores.copy(), mask, lse, scale)
    np.testing.assert_allclose(again, probs, rtol=3e-5, atol=1e-7)            # the forward's probabilities
    np.testing.assert_allclose(want_again, probs, rtol=3e-5, atol=1e-7)
    assert np.all(again[~heads_mask] == 0)
    np.testing.assert_allclose(got, expected, rtol=3e-5, atol=3e-5)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), width=st.integers(1, 300), seed=st.integers(0, 99))
def test_swiglu_and_its_backward_match_the_reference(rows, width, seed):
    rng = np.random.default_rng(seed)
    gate, up, grad_hidden = (rng.standard_normal((3, 2, rows, width)) * 5).astype(np.float32)
    np.testing.assert_allclose(training_cpu.swiglu(gate, up), reference.swiglu(gate, up), **TOLERANCE)
    (grad_gate, grad_up) = training_cpu.swiglu_backward(grad_hidden, gate, up)
    want_gate, want_up = reference.swiglu_backward(grad_hidden, gate, up)
    np.testing.assert_allclose(grad_up, want_up, **TOLERANCE)
    # d silu/d gate = σ·(1 + gate·(1 − σ)) cancels near gate ≈ −1.28, where float32 keeps only
    # the error of its terms (~|grad·up|·(1 + |gate|) · a few ulp), not a relative one (hypothesis
    # found 6e-5 relative there: rows=28, width=51, seed=36)
    terms = np.abs(grad_hidden * up) * (1 + np.abs(gate))
    assert np.all(np.abs(grad_gate - want_gate) <= 3e-5 * np.abs(want_gate) + 3e-7 * terms + 3e-6)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), width=st.integers(1, 300), seed=st.integers(0, 99))
def test_geglu_and_its_backward_match_the_reference_and_float64(rows, width, seed):
    rng = np.random.default_rng(seed)
    gate, up, grad_hidden = (rng.standard_normal((3, 2, rows, width)) * 4).astype(np.float32)
    np.testing.assert_allclose(training_cpu.geglu(gate, up), reference.geglu(gate, up), **TOLERANCE)
    exact = [g.astype(np.float64) for g in (grad_hidden, gate, up)]
    want_gate, want_up = reference.geglu_backward(*exact)
    got_gate, got_up = training_cpu.geglu_backward(grad_hidden, gate, up)
    scale = np.abs(grad_hidden * up) * (1 + np.abs(gate)) + np.abs(grad_hidden * gate)
    for got, want in ((got_gate, want_gate), (got_up, want_up)):
        assert np.all(np.abs(got - want) <= 1e-5 * np.abs(want) + 1e-6 * scale + 1e-7)


def test_geglu_backward_is_the_derivative_of_the_forward():
    """The float64 reference's gradient against central differences of its forward."""
    gate = np.linspace(-6, 6, 241)
    step = 1e-6
    slope = (reference.geglu(gate + step, np.ones_like(gate)) - reference.geglu(gate - step, np.ones_like(gate))) / (2 * step)
    grad_gate, grad_up = reference.geglu_backward(np.ones_like(gate), gate, np.full_like(gate, 2.0))
    np.testing.assert_allclose(grad_gate, 2 * slope, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(grad_up, reference.gelu_tanh(gate), rtol=1e-12)


def test_swiglu_saturates_like_the_reference_far_out():
    gate = np.array([[-200, -90, -20, 0, 20, 90, 200]], np.float32)
    up = np.ones_like(gate)
    with np.errstate(over="ignore"):                            # NumPy's exp(200) is inf, as meant
        want_hidden, want_grads = reference.swiglu(gate, up), reference.swiglu_backward(up, gate, up)
    np.testing.assert_allclose(training_cpu.swiglu(gate, up), want_hidden, atol=1e-30)
    for got, want in zip(training_cpu.swiglu_backward(up, gate, up), want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("packed", [False, True])
def test_float32_training_attention_matches_the_float64_path(packed):
    """The kernels (float32) and the NumPy references (float64) inside _attention and its backward
    (three chunks of queries, the last one short)."""
    rng = np.random.default_rng(1)
    B, H, KV, T, d = 2, 6, 2, 150, 16
    q, grad_out = rng.standard_normal((2, B, KV, T * H // KV, d))
    k, v = rng.standard_normal((2, B, KV, T, d))
    segments = np.repeat(np.arange(3), -(-T // 3))[None, :T].repeat(B, 0) if packed else None
    mask = llama_lora._attention_mask(T, segments)
    results = {}
    for dtype in (np.float32, np.float64):
        cast = [a.astype(dtype) for a in (q, k, v, grad_out)]
        out, lse = llama_lora._attention(*cast[:3], mask)
        results[dtype] = (out,) + llama_lora._attention_backward(*cast[:3], mask, lse, cast[3])
    for got, want in zip(results[np.float32], results[np.float64]):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 12), vocab=st.integers(1, 3000), spread=st.sampled_from([0.1, 5.0, 60.0]),
       seed=st.integers(0, 99))
def test_cross_entropy_matches_the_reference(rows, vocab, spread, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, vocab)) * spread).astype(np.float32)
    labels = rng.integers(0, vocab, rows)
    normalizer = rows + 3
    loss, grad = training_cpu.cross_entropy(logits.copy(), labels, normalizer)
    want_loss, want_grad = reference.cross_entropy(logits.astype(np.float64), labels, normalizer)
    assert loss == pytest.approx(want_loss, rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7 / normalizer)
    np.testing.assert_allclose(grad.sum(axis=-1), 0, atol=1e-6)        # softmax sums to 1, minus the 1
