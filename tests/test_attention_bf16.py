"""The fused bfloat16 training attention (kernels.attention_bf16) against its NumPy reference
(reference_.attention_bf16), the reference against float64 attention, and a training step
with the fused kernels against one with the chunked attention."""

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qlora_np.models.llama import lora as llama_lora
from qlora_np.quant import reference
from qlora_np.linalg import reference as reference_
from qlora_np.errors import ShapeError
from qlora_np.kernels import features
from qlora_np.kernels import attention_bf16 as fused
from qlora_np.models.llama.config import LlamaConfig
from qlora_np.models.llama.model import LlamaModel
from qlora_np.models.llama.lora import _attention, _attention_backward, _attention_mask

from .test_llama import tiny_weights

FUSED = pytest.mark.skipif(not fused.fuses(64), reason="no AVX-512 BF16")
TILES = [pytest.param(True, marks=pytest.mark.skipif(not features.amx_permitted(), reason="no AMX BF16"), id="amx"),
         pytest.param(False, id="avx512")]
"""Whether the kernels multiply with AMX tiles or the AVX-512 BF16 tile."""


@contextlib.contextmanager
def _tiles(use_amx):
    """The products on AMX tiles where ``use_amx``, else on the AVX-512 BF16 tile."""
    before = features.USE_AMX
    features.USE_AMX = use_amx
    try:
        yield
    finally:
        features.USE_AMX = before


def _inputs(seed, B, KV, group, T, d, packed):
    """q, k, v, grad_out (grouped layout), the mask (causal, or causal within random
    segments when ``packed``) and the scale."""
    rng = np.random.default_rng(seed)
    q, grad_out = (rng.standard_normal((B, KV, T * group, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((B, KV, T, d)).astype(np.float32) for _ in range(2))
    segments = np.sort(rng.integers(0, 3, (B, T)), axis=1) if packed else None
    return q, k, v, grad_out, _attention_mask(T, segments), 1 / np.sqrt(d)


def _assert_close(result, expected, tolerance):
    """Within ``tolerance`` of expected's largest magnitude: one operand of a bfloat16 product
    may round to the other neighbour when the two sides' float32 values differ in the last bit
    (and a gradient that is exactly 0 on one side may be float32 noise on the other)."""
    assert result.shape == expected.shape and result.dtype == np.float32
    assert np.abs(result - expected).max() <= tolerance * np.abs(expected).max() + 1e-6


@FUSED
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 16), B=st.integers(1, 2), KV=st.integers(1, 3), group=st.integers(1, 4),
       T=st.integers(1, 100), d=st.sampled_from([32, 64, 128]), packed=st.booleans())
@pytest.mark.parametrize("use_amx", TILES)
def test_fused_kernels_match_the_reference(use_amx, seed, B, KV, group, T, d, packed):
    q, k, v, grad_out, mask, scale = _inputs(seed, B, KV, group, T, d, packed)
    with _tiles(use_amx):
        out, lse = fused.attention_bf16(q, k, v, mask, scale)
        grads = fused.attention_bf16_backward(q, k, v, mask, lse, grad_out, scale)
    expected_out, expected_lse = reference_.attention_bf16(q, k, v, mask, scale)
    _assert_close(out, expected_out, 2e-3)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)
    expected = reference_.attention_bf16_backward(q, k, v, mask, expected_lse, grad_out, scale)
    for grad, expected_grad in zip(grads, expected):   # dS = P ⊙ (dP − Σ P ⊙ dP) cancels, and its rounding
        _assert_close(grad, expected_grad, 4e-3)        # may go one bfloat16 step (2⁻⁸) the other way


@FUSED
@pytest.mark.parametrize("use_amx", TILES)
def test_fused_kernels_give_the_same_bytes_every_time(use_amx):
    q, k, v, grad_out, mask, scale = _inputs(1, 4, 3, 3, 250, 64, False)
    with _tiles(use_amx):
        first = fused.attention_bf16(q, k, v, mask, scale)
        grads = fused.attention_bf16_backward(q, k, v, mask, first[1], grad_out, scale)
        again = fused.attention_bf16(q, k, v, mask, scale)
        grads_again = fused.attention_bf16_backward(q, k, v, mask, again[1], grad_out, scale)
    for a, b in zip(first + grads, again + grads_again):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("packed", [False, True])
def test_reference_is_attention_up_to_bfloat16_rounding(packed):
    """Against the float64 chunked attention of a training step (llama_lora._attention)."""
    q, k, v, grad_out, mask, scale = _inputs(2, 2, 2, 3, 150, 64, packed)
    out, lse = reference_.attention_bf16(q, k, v, mask, scale)
    grads = reference_.attention_bf16_backward(q, k, v, mask, lse, grad_out, scale)
    wide = [a.astype(np.float64) for a in (q, k, v, grad_out)]
    exact_out, exact_lse = _attention(*wide[:3], mask)
    exact_grads = _attention_backward(*wide[:3], mask, exact_lse, wide[3])
    for result, exact in zip((out,) + grads, (exact_out,) + exact_grads):
        difference = np.abs(result - exact).max()
        assert 0 < difference <= 0.02 * np.abs(exact).max()            # rounded, by bfloat16's steps only
    probabilities = np.exp(reference_.matmul_bf16(q, k.swapaxes(-1, -2)) * np.float32(scale) - lse[..., None])
    allowed = np.repeat(mask, 3, axis=1)[:, None]
    np.testing.assert_allclose(np.where(allowed, probabilities, 0).sum(-1), 1, rtol=1e-5)


@FUSED
def test_bad_shapes_are_refused():
    q, k, v, grad_out, mask, scale = _inputs(3, 1, 2, 2, 8, 64, False)
    with pytest.raises(ShapeError, match="do not fit"):
        fused.attention_bf16(q, k[:, :1], v, mask, scale)
    with pytest.raises(ShapeError, match="multiple of T"):
        fused.attention_bf16(q[:, :, :15], k, v, mask, scale)
    with pytest.raises(ShapeError, match="mask"):
        fused.attention_bf16(q, k, v, mask[:, :4, :4], scale)
    with pytest.raises(ShapeError, match="head size"):
        fused.attention_bf16(q[..., :48], k[..., :48], v[..., :48], mask, scale)
    _, lse = fused.attention_bf16(q, k, v, mask, scale)
    with pytest.raises(ShapeError, match="lse"):
        fused.attention_bf16_backward(q, k, v, mask, lse[..., 1:], grad_out, scale)


@FUSED
@pytest.mark.parametrize("packed, checkpoint", [(False, False), (True, False), (False, True)])
def test_training_step_with_fused_attention_matches_the_chunked_one(monkeypatch, packed, checkpoint):
    """Same loss and adapter gradients, up to bfloat16 rounding, with and without the fused kernels."""
    config = LlamaConfig(vocab_size=50, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                         intermediate_size=96, rope_theta=10000.0, rms_norm_eps=1e-5, context_length=64)
    model = LlamaModel.from_weights(config, tiny_weights(config), quant_type="nf4", blocksize=32)
    model.set_compute_dtype("bfloat16")
    params = llama_lora.inject_lora(model, "all-linear", r=4, alpha=8, seed=0)
    for index, param in enumerate(params.values()):
        param.value[...] = np.random.default_rng(index).standard_normal(param.value.shape) * 0.2
    rng = np.random.default_rng(5)
    ids, labels = (rng.integers(0, config.vocab_size, (2, 40)) for _ in range(2))
    segments = np.repeat([[0] * 17 + [1] * 23], 2, axis=0) if packed else None
    results = []
    for fuses in (fused.fuses, lambda head_dim: False):
        monkeypatch.setattr(fused, "fuses", fuses)
        loss = llama_lora.loss_and_backward(model, ids, labels, segments=segments, checkpoint=checkpoint)
        results.append((loss, [param.grad for param in params.values()]))
        for param in params.values():
            param.grad = None
    (loss, grads), (chunked_loss, chunked_grads) = results
    assert abs(loss - chunked_loss) <= 1e-3 * abs(chunked_loss)
    for grad, chunked in zip(grads, chunked_grads):
        assert np.abs(grad - chunked).max() <= 0.02 * np.abs(chunked).max()


def test_long_sequences_take_the_chunked_attention():
    """Past FASTER_UP_TO positions the fused backward's per-group buffers leave the cache."""
    config = LlamaConfig(vocab_size=50, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=96, rope_theta=10000.0, rms_norm_eps=1e-5, context_length=4096)
    model = LlamaModel.from_weights(config, tiny_weights(config), quant_type="nf4", blocksize=32)
    model.set_compute_dtype("bfloat16")
    short = llama_lora._attention_passes(model, np.float32, fused.FASTER_UP_TO)
    long = llama_lora._attention_passes(model, np.float32, fused.FASTER_UP_TO + 1)
    assert long.forward.func is _attention and long.backward.func is _attention_backward
    assert (short.forward.func is fused.attention_bf16) == fused.fuses(config.head_dim)
