"""qlora_np.models.llama.reference: every NumPy reference matches the kernel of its name, and
LlamaModel(backend="reference") computes what the kernels compute."""

import numpy as np
import pytest

from qlora_np.errors import InvalidValueError
from qlora_np.kernels.portable import llama as llama_cpu, training as training_cpu
from qlora_np.models.llama import reference
from qlora_np.models.llama.config import LlamaConfig
from qlora_np.models.llama.lora import inject_lora
from qlora_np.models.llama.model import BACKENDS, FusedProjections, KVCache, LlamaModel, rope_tables
from qlora_np.nn.lora import LoRALinear
from qlora_np.quant.codec import dequantize

from .test_llama import TINY, tiny_weights

TOLERANCE = dict(rtol=3e-5, atol=3e-6)      # float32 sums in another order (the kernels use fastmath)
ODD = LlamaConfig(vocab_size=29, hidden_size=36, num_layers=2, num_heads=6, num_kv_heads=2,
                  intermediate_size=37, rope_theta=500.0, rms_norm_eps=1e-6, context_length=32)
"""Odd sizes: hidden 36 (head_dim 6), intermediate 37, 3 query heads per kv head."""


def _random(rng, *shape, spread=1.0):
    return (rng.standard_normal(shape) * spread).astype(np.float32)


def test_every_kernel_has_a_reference_of_its_name():
    kernels = {"rms_norm", "attend", "swiglu"} | set(training_cpu.__all__) - {"dropout_keep", "apply_dropout"}
    missing = sorted(name for name in kernels if not callable(getattr(reference, name, None)))
    assert not missing, f"no reference for {missing}"


# ---------------------------------------------------------------------------
# Inference kernels (kernels.portable.llama)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("rows, hidden", [(1, 1), (3, 37), (5, 300)])
def test_rms_norm_reference_matches_the_kernel(rows, hidden):
    rng = np.random.default_rng(rows * hidden)
    x, weight = _random(rng, rows, hidden, spread=3), _random(rng, hidden)
    np.testing.assert_allclose(reference.rms_norm(x, weight, 1e-5), llama_cpu.rms_norm(x, weight, 1e-5),
                               **TOLERANCE)


@pytest.mark.parametrize("new, start, heads, kv_heads, head_dim", [
    (1, 0, 2, 2, 8), (1, 13, 6, 2, 6), (5, 3, 9, 3, 10), (11, 4, 4, 1, 16)])    # 8+ queries: parallel kernel
def test_attend_reference_matches_the_kernel_and_fills_the_cache_alike(new, start, heads, kv_heads, head_dim):
    rng = np.random.default_rng(new + 10 * start + heads)
    q, k, v = _random(rng, new, heads, head_dim), _random(rng, new, kv_heads, head_dim), \
        _random(rng, new, kv_heads, head_dim)
    cos, sin = rope_tables(np.arange(start, start + new), head_dim, 10000.0)
    caches = {}
    for name, module in (("kernel", llama_cpu), ("reference", reference)):
        keys, values = np.zeros((2, kv_heads, start + new + 3, head_dim), np.float32)    # 3 to spare
        keys[:, :start] = np.random.default_rng(1).standard_normal((kv_heads, start, head_dim))
        values[:, :start] = np.random.default_rng(2).standard_normal((kv_heads, start, head_dim))
        out = module.attend(q, k, v, cos, sin, keys, values, start)
        assert out.shape == (new, heads * head_dim) and out.dtype == np.float32
        caches[name] = out, keys, values
    for got, want in zip(caches["reference"], caches["kernel"]):
        np.testing.assert_allclose(got, want, **TOLERANCE)
    assert not caches["reference"][1][:, start + new:].any()              # nothing past the new positions


@pytest.mark.parametrize("shape", [(1,), (3, 37), (2, 5, 48)])
def test_swiglu_reference_matches_both_kernels(shape):
    rng = np.random.default_rng(len(shape))
    gate, up = _random(rng, *shape, spread=6), _random(rng, *shape)
    want = reference.swiglu(gate, up)
    np.testing.assert_allclose(llama_cpu.swiglu(gate, up), want, **TOLERANCE)
    np.testing.assert_allclose(training_cpu.swiglu(gate, up), want, **TOLERANCE)


@pytest.mark.parametrize("mode, bias", [("quant", False), ("dense", True), ("qlora", True), ("lora", False)])
def test_linear_reference_matches_the_layer_in_eval_mode(mode, bias):
    rng = np.random.default_rng(5)
    weight, x = _random(rng, 40, 64) / 8, _random(rng, 7, 64)
    layer = LoRALinear.from_weight(weight, _random(rng, 40) if bias else None, r=4, mode=mode, seed=2).eval()
    if layer.has_adapters:
        layer.lora_b[...] = _random(rng, *layer.lora_b.shape)                 # B = 0 would hide the adapters
    adapters = (layer.lora_a, layer.lora_b, layer.scale) if layer.has_adapters else ()
    decoded = weight if mode in ("dense", "lora") else dequantize(layer.base, dtype="float32")
    got = reference.linear(x, decoded, layer.bias, *adapters)
    np.testing.assert_allclose(got, layer.forward(x), rtol=1e-5, atol=1e-5)
    assert np.abs(got).max() > 0.1


# ---------------------------------------------------------------------------
# Training kernels (kernels.portable.training)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 37)])
def test_rms_norm_forward_and_backward_references_match_the_kernels(shape):
    rng = np.random.default_rng(shape[-1])
    x, weight, grad_out = _random(rng, *shape, spread=2), _random(rng, shape[-1]), _random(rng, *shape)
    y, inverse_rms = reference.rms_norm_forward(x, weight, 1e-5)
    for got, want in zip((y, inverse_rms), training_cpu.rms_norm_forward(x, weight, 1e-5)):
        np.testing.assert_allclose(got, want, **TOLERANCE)
    start = _random(rng, *shape)
    np.testing.assert_allclose(reference.add_rms_norm_backward(start.copy(), x, inverse_rms, weight, grad_out),
                               training_cpu.add_rms_norm_backward(start.copy(), x, inverse_rms, weight, grad_out),
                               **TOLERANCE)


@pytest.mark.parametrize("B, T, heads, kv_heads, head_dim", [(1, 1, 2, 2, 2), (2, 5, 6, 2, 6), (1, 7, 9, 3, 10)])
def test_rope_into_and_back_from_groups_references_match_the_kernels(B, T, heads, kv_heads, head_dim):
    rng = np.random.default_rng(T * heads)
    x = _random(rng, B, T, heads, head_dim)
    cos, sin = rope_tables(rng.integers(0, 50, B * T), head_dim, 10000.0)
    groups = reference.rope_into_groups(x, cos, sin, kv_heads)
    assert groups.shape == (B, kv_heads, T * heads // kv_heads, head_dim)
    np.testing.assert_allclose(groups, training_cpu.rope_into_groups(x, cos, sin, kv_heads), **TOLERANCE)
    back = reference.rope_back_from_groups(groups, cos, sin)
    np.testing.assert_allclose(back, training_cpu.rope_back_from_groups(groups, cos, sin), **TOLERANCE)
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)              # rotating back undoes RoPE


@pytest.mark.parametrize("B, KV, group, T", [(1, 1, 1, 1), (2, 2, 3, 7)])
def test_masked_softmax_and_backward_references_match_the_kernels(B, KV, group, T):
    rng = np.random.default_rng(B * T)
    scores = _random(rng, B, KV, T * group, T, spread=3)
    mask = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    mask[-1, -1, : T // 2] = False                                          # not only causal
    probs = {}
    for name, module in (("kernel", training_cpu), ("reference", reference)):
        p = scores.copy()
        lse = module.masked_softmax(p, mask, 0.5)
        probs[name] = p, lse
    for got, want in zip(probs["reference"], probs["kernel"]):
        np.testing.assert_allclose(got, want, **TOLERANCE)
    lse = probs["kernel"][1]
    grad_probs = _random(rng, *scores.shape)
    got = reference.masked_softmax_backward(grad_probs.copy(), scores.copy(), mask, lse, 0.5)
    want = training_cpu.masked_softmax_backward(grad_probs.copy(), scores.copy(), mask, lse, 0.5)
    for got_array, want_array in zip(got, want):
        np.testing.assert_allclose(got_array, want_array, **TOLERANCE)


@pytest.mark.parametrize("shape", [(1,), (4, 37)])
def test_swiglu_backward_reference_matches_the_kernel(shape):
    rng = np.random.default_rng(shape[-1])
    grad_hidden, gate, up = _random(rng, *shape), _random(rng, *shape, spread=3), _random(rng, *shape)
    for got, want in zip(reference.swiglu_backward(grad_hidden, gate, up),
                         training_cpu.swiglu_backward(grad_hidden, gate, up)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rows, vocab", [(1, 1), (3, 29), (5, 1001)])
def test_cross_entropy_reference_matches_the_kernel(rows, vocab):
    rng = np.random.default_rng(vocab)
    logits, labels = _random(rng, rows, vocab, spread=4), rng.integers(0, vocab, rows)
    loss, grad = reference.cross_entropy(logits.copy(), labels, 7)
    want_loss, want_grad = training_cpu.cross_entropy(logits.copy(), labels, 7)
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(grad, want_grad, **TOLERANCE)


# ---------------------------------------------------------------------------
# LlamaModel(backend="reference")
# ---------------------------------------------------------------------------

def _model(config, quant_type, lora):
    model = LlamaModel.from_weights(config, tiny_weights(config), quant_type=quant_type, blocksize=32)
    if lora:
        params = inject_lora(model, "all-linear", r=4, seed=1)
        rng = np.random.default_rng(4)
        for name, param in params.items():
            if name.endswith("lora_b"):
                param.value[...] = rng.standard_normal(param.value.shape) * 0.1
        model.eval()
    return model


def _kernels_forbidden(monkeypatch):
    """Make every kernel of the inference forward raise, so a forward can only use the references."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the reference backend called a kernel")
    for name in ("rms_norm", "attend", "swiglu"):
        monkeypatch.setattr(llama_cpu, name, forbidden)
    monkeypatch.setattr(FusedProjections, "__call__", forbidden)


@pytest.mark.parametrize("config", [TINY, ODD], ids=["tiny", "odd"])
@pytest.mark.parametrize("quant_type, lora", [(None, False), ("nf4", False), ("nf4", True)])
def test_reference_backend_gives_the_kernels_logits(monkeypatch, config, quant_type, lora):
    model = _model(config, quant_type, lora)
    ids = np.array([3, 17, 5, 28, 11, 2, 0, 9, 21, 1])
    want = model.forward(ids)
    cache = KVCache(config, 16)
    want_steps = np.concatenate([model.forward(ids[:4], cache), model.forward(ids[4:5], cache)])

    _kernels_forbidden(monkeypatch)
    model.set_backend("reference")
    got = model.forward(ids)
    cache = KVCache(config, 16)
    got_steps = np.concatenate([model.forward(ids[:4], cache), model.forward(ids[4:5], cache)])
    assert got.dtype == np.float32 and got.shape == (ids.size, config.vocab_size)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_steps, want_steps, rtol=1e-4, atol=1e-4)
    assert np.ptp(got) > 1                                                  # logits that tell tokens apart


@pytest.mark.parametrize("quant_type", [None, "nf4"])
def test_reference_backend_generates_the_kernels_greedy_tokens(quant_type):
    # an untied head: the tiny tied model only repeats its last token
    kernels = LlamaModel.from_weights(TINY, tiny_weights(tied=False), quant_type=quant_type)
    references = LlamaModel(kernels.config, kernels.embedding, kernels.blocks, kernels.output_norm,
                            kernels.output, tied_output=False, backend="reference")
    assert (kernels.backend, references.backend) == ("kernels", "reference")
    prompt = [30, 7, 12, 5]
    want = list(kernels.generate(prompt, max_new_tokens=8))
    assert list(references.generate(prompt, max_new_tokens=8)) == want
    assert len(set(want)) > 3
    assert list(references.set_backend("kernels").generate(prompt, max_new_tokens=8)) == want


def test_an_unknown_backend_is_refused_by_name():
    assert BACKENDS == ("kernels", "reference")
    with pytest.raises(InvalidValueError, match="'numpy'"):
        LlamaModel.from_weights(TINY, tiny_weights(), quant_type=None).set_backend("numpy")
    model = LlamaModel.from_weights(TINY, tiny_weights(), quant_type=None)
    with pytest.raises(InvalidValueError, match="'Reference'"):
        LlamaModel(model.config, model.embedding, model.blocks, model.output_norm, model.output,
                   backend="Reference")
    assert model.backend == "kernels"
