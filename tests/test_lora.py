"""LoRALinear: hand-written gradients against finite differences, merging, sizes, errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qlora_np
from qlora_np import LoRALinear
from qlora_np.errors import DTypeError, InvalidValueError, ShapeError, UnknownFormatError

from .gradcheck import numeric_gradient

OUT, IN, R = 6, 64, 3


def _layer(mode, bias=True, use_rslora=False, train_bias=False, dropout=0.0, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((OUT, IN))
    layer = LoRALinear.from_weight(weight, bias=rng.standard_normal(OUT) if bias else None, r=R,
                                   alpha=5, dropout=dropout, mode=mode, use_rslora=use_rslora,
                                   seed=seed, train_bias=train_bias, dtype=np.float64)
    if layer.has_adapters:                       # non-zero B so every path carries gradient
        layer.lora_b[...] = rng.standard_normal(layer.lora_b.shape)
    return layer


def _dense_twin(layer):
    """A float64 "lora" layer with W = the layer's decoded weight and the same adapters/bias."""
    weight = qlora_np.dequantize(layer.base).astype(np.float64)
    if layer.has_adapters:
        lora_a, lora_b = layer.lora_a.copy(), layer.lora_b.copy()
    else:                                        # zero adapters add nothing
        lora_a, lora_b = np.zeros((1, IN)), np.zeros((OUT, 1))
    return LoRALinear(weight, layer.bias, lora_a, lora_b, alpha=layer.alpha, mode="lora",
                      use_rslora=layer.use_rslora)


@pytest.mark.parametrize("bias, train_bias", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_gradients_match_finite_differences(bias, train_bias, use_rslora):
    layer = _layer("lora", bias, use_rslora, train_bias)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, IN))                              # batch dims (B, T, in)
    upstream = rng.standard_normal((2, 3, OUT))
    loss = lambda: float(np.sum(layer.forward(x, cache=False) * upstream))   # noqa: E731
    layer.forward(x)
    grad_x = layer.backward(upstream)
    np.testing.assert_allclose(grad_x, numeric_gradient(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.grad_lora_a, numeric_gradient(loss, layer.lora_a), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.grad_lora_b, numeric_gradient(loss, layer.lora_b), rtol=1e-6, atol=1e-7)
    if train_bias:
        np.testing.assert_allclose(layer.grad_bias, numeric_gradient(loss, layer.bias), rtol=1e-6, atol=1e-7)
    else:
        assert layer.grad_bias is None and "bias" not in layer.parameters()


@pytest.mark.parametrize("mode", ["qlora", "quant"])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias, train_bias", [(False, False), (True, False), (True, True)])
def test_quantized_modes_match_finite_differences(mode, use_rslora, bias, train_bias):
    # The 4-bit products run in float32, so a float64 finite difference through them
    # would measure float32 rounding. Instead: (1) adapter gradients are checked by
    # finite differences directly (the base term is the same float32 numbers in every
    # evaluation, so it cancels in the difference up to float64 rounding); (2) grad_x
    # is checked against the float64 twin layer whose W is the decoded 4-bit weight,
    # itself checked by finite differences above, to float32 accuracy.
    layer = _layer(mode, bias, use_rslora, train_bias)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, IN))
    upstream = rng.standard_normal((2, 3, OUT))
    loss = lambda: float(np.sum(layer.forward(x, cache=False) * upstream))   # noqa: E731
    layer.forward(x)
    grad_x = layer.backward(upstream)
    twin = _dense_twin(layer)
    twin.forward(x)
    np.testing.assert_allclose(layer.forward(x, cache=False), twin.forward(x, cache=False),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_x, twin.backward(upstream), rtol=1e-5, atol=1e-5)
    if mode == "qlora":
        for grad, value in ((layer.grad_lora_a, layer.lora_a), (layer.grad_lora_b, layer.lora_b)):
            np.testing.assert_allclose(grad, numeric_gradient(loss, value), rtol=1e-6, atol=1e-6)
    else:
        assert layer.lora_a is None and set(layer.parameters()) <= {"bias"}
    if train_bias:
        np.testing.assert_allclose(layer.grad_bias, numeric_gradient(loss, layer.bias), rtol=1e-6, atol=1e-6)


@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=3), r=st.integers(1, 5),
       use_rslora=st.booleans())
@settings(max_examples=30)
def test_any_leading_dimensions_match_the_formula(lead, r, use_rslora):
    rng = np.random.default_rng(len(lead) * 10 + r)
    layer = LoRALinear.from_weight(rng.standard_normal((5, 12)), bias=rng.standard_normal(5), r=r,
                                   alpha=3, mode="lora", use_rslora=use_rslora, dtype=np.float64)
    layer.lora_b[...] = rng.standard_normal(layer.lora_b.shape)
    x = rng.standard_normal(tuple(lead) + (12,))
    upstream = rng.standard_normal(tuple(lead) + (5,))
    scale = 3 / np.sqrt(r) if use_rslora else 3 / r
    delta = scale * layer.lora_b @ layer.lora_a                           # (5, 12)
    np.testing.assert_allclose(layer.forward(x), x @ (layer.base + delta).T + layer.bias, atol=1e-12)
    np.testing.assert_allclose(layer.backward(upstream), upstream @ (layer.base + delta), atol=1e-12)
    rows, grads = x.reshape(-1, 12), upstream.reshape(-1, 5)
    np.testing.assert_allclose(layer.grad_lora_a, scale * layer.lora_b.T @ grads.T @ rows, atol=1e-12)
    np.testing.assert_allclose(layer.grad_lora_b, scale * grads.T @ rows @ layer.lora_a.T, atol=1e-12)


def test_new_layer_computes_the_base_product_and_scale_follows_rslora():
    weight = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
    layer = LoRALinear.from_weight(weight, r=4, alpha=8, mode="lora", seed=0)
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(layer(x), x @ weight.T, rtol=1e-6)
    assert layer.scale == 2.0
    assert LoRALinear.from_weight(weight, r=4, alpha=8, mode="lora", use_rslora=True).scale == 4.0
    bound = 1 / np.sqrt(64)
    assert np.all(np.abs(layer.lora_a) <= bound) and np.all(layer.lora_b == 0)
    gaussian = LoRALinear.from_weight(weight, r=4, mode="lora", init="gaussian", seed=0)
    assert 0.1 < gaussian.lora_a.std() < 0.4                          # N(0, 1/r): std 1/4


def test_dropout_mask_is_shared_by_forward_and_backward_and_off_in_eval():
    layer = _layer("lora", dropout=0.5, seed=4)
    x = np.random.default_rng(5).standard_normal((4, IN))
    upstream = np.random.default_rng(6).standard_normal((4, OUT))
    y = layer.forward(x)
    keep = layer._cache.keep                                   # (4, IN) bool, drawn by this forward
    assert keep.dtype == bool and 0 < keep.mean() < 1

    # the layer's function with this mask fixed, written out: forward and gradients follow it
    def with_mask(lora_a):
        dropped = x * keep / 0.5
        return x @ layer.base.T + layer.bias + layer.scale * (dropped @ lora_a.T) @ layer.lora_b.T
    np.testing.assert_allclose(y, with_mask(layer.lora_a), rtol=1e-12, atol=1e-12)
    grad_x = layer.backward(upstream)
    lora_a = layer.lora_a.copy()
    loss = lambda: float(np.sum(with_mask(lora_a) * upstream))   # noqa: E731
    np.testing.assert_allclose(layer.grad_lora_a, numeric_gradient(loss, lora_a), rtol=1e-6, atol=1e-7)
    grad_dropped = layer.scale * (upstream @ layer.lora_b) @ layer.lora_a
    expected_grad_x = upstream @ layer.base + grad_dropped * keep / 0.5
    np.testing.assert_allclose(grad_x, expected_grad_x, rtol=1e-12, atol=1e-12)

    layer.eval()
    no_dropout = layer.forward(x)
    np.testing.assert_allclose(no_dropout, layer.forward(x))
    assert layer._cache is None
    with pytest.raises(InvalidValueError, match="needs a forward pass"):
        layer.backward(upstream)


def test_dropout_keeps_one_minus_p_of_the_values():
    layer = LoRALinear.from_weight(np.ones((4, 64), np.float32), r=2, dropout=0.25, mode="lora", seed=0)
    layer.forward(np.ones((500, 64), np.float32))
    assert layer._cache.keep.mean() == pytest.approx(0.75, abs=0.01)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), p=st.floats(0.0, 0.99),
       seed=st.integers(0, 2 ** 64 - 1))
def test_dropout_kernels_are_their_references(rows, cols, p, seed):
    from qlora_np.kernels.portable import training as training_cpu
    from qlora_np.nn.lora import apply_dropout, dropout_keep

    keep = training_cpu.dropout_keep(seed, (rows, cols), p)
    assert keep.dtype == bool and keep.shape == (rows, cols)
    np.testing.assert_array_equal(keep, dropout_keep(seed, (rows, cols), p))
    values = np.random.default_rng(rows).standard_normal((rows, cols)).astype(np.float32)
    scale = np.float32(1 / (1 - p))
    np.testing.assert_array_equal(training_cpu.apply_dropout(values, keep, scale).view(np.uint32),
                                  apply_dropout(values, keep, scale).view(np.uint32))


def test_dropout_masks_differ_between_draws_and_repeat_from_the_same_state():
    layer = LoRALinear.from_weight(np.ones((4, 64), np.float32), r=2, dropout=0.5, mode="lora", seed=3)
    state = layer.dropout_rng.bit_generator.state
    first, second = layer._dropout_keep((8, 64)), layer._dropout_keep((8, 64))
    assert (first != second).any()
    layer.dropout_rng.bit_generator.state = state
    np.testing.assert_array_equal(layer._dropout_keep((8, 64)), first)
    assert abs(first[:, :32].mean() - first[:, 32:].mean()) < 0.25      # no pattern along a row


@pytest.mark.parametrize("mode", ["qlora", "lora", "quant"])
def test_float32_layers_compute_in_float32_with_dropout(mode):
    weight = np.random.default_rng(10).standard_normal((16, 64)).astype(np.float32)
    layer = LoRALinear.from_weight(weight, bias=np.ones(16), r=4, dropout=0.1, mode=mode,
                                   seed=0, train_bias=True)
    x = np.random.default_rng(11).standard_normal((2, 5, 64)).astype(np.float32)
    y = layer.forward(x)
    grad_x = layer.backward(np.ones((2, 5, 16), np.float32))
    assert y.dtype == grad_x.dtype == np.float32 and grad_x.shape == x.shape
    for param in layer.parameters().values():
        assert param.value.dtype == param.grad.dtype == np.float32
    assert layer.forward(x.astype(np.float64), cache=False).dtype == np.float64   # float64 in, float64 out


def test_layers_without_active_adapters_cache_no_arrays():
    weight = np.random.default_rng(12).standard_normal((8, 64)).astype(np.float32)
    x = np.ones((3, 64), np.float32)
    quant = LoRALinear.from_weight(weight, mode="quant")
    quant.forward(x)
    assert quant._cache.dropped is None and quant._cache.hidden is None
    np.testing.assert_allclose(quant.backward(np.ones((3, 8), np.float32)),
                               np.ones((3, 8)) @ qlora_np.dequantize(quant.base), rtol=1e-5, atol=1e-5)
    merged = LoRALinear.from_weight(weight, mode="lora")
    merged.merge()
    merged.forward(x)
    assert merged._cache.hidden is None
    merged.backward(np.ones((3, 8), np.float32))
    assert merged.grad_lora_a is None                          # a merged layer trains nothing


def test_backward_uses_up_the_cache_of_the_last_caching_forward():
    layer = _layer("lora")
    x = np.random.default_rng(13).standard_normal((2, IN))
    layer.forward(x)
    layer.forward(np.ones((2, IN)), cache=False)                # leaves the cache of x alone
    layer.backward(np.ones((2, OUT)))
    np.testing.assert_allclose(layer.grad_lora_b, layer.scale * np.ones((OUT, 2)) @ (x @ layer.lora_a.T))
    with pytest.raises(InvalidValueError, match="needs a forward pass"):
        layer.backward(np.ones((2, OUT)))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_forward_without_its_input_gives_the_same_gradients_given_x_again(dropout):
    weight = np.random.default_rng(14).standard_normal((OUT, IN)).astype(np.float32)
    layers = [LoRALinear.from_weight(weight, r=2, dropout=dropout, seed=6) for _ in range(2)]
    for layer in layers:
        layer.lora_b[:] = np.random.default_rng(15).standard_normal(layer.lora_b.shape)
        layer.train()
    keeping, recomputing = layers
    x = np.random.default_rng(16).standard_normal((3, 2, IN)).astype(np.float32)
    grad_y = np.random.default_rng(17).standard_normal((3, 2, OUT)).astype(np.float32)
    assert np.array_equal(keeping.forward(x), recomputing.forward(x, keep_input=False))
    assert recomputing._cache.dropped is None
    with pytest.raises(InvalidValueError, match="keep_input=False"):
        recomputing.backward(grad_y)
    with pytest.raises(ShapeError, match="forward's shape"):
        recomputing.backward(grad_y, x=x[:2])
    assert np.array_equal(keeping.backward(grad_y), recomputing.backward(grad_y, x=x))    # the cache survived
    for name, param in keeping.parameters().items():
        assert np.array_equal(recomputing.parameters()[name].grad, param.grad), name


def test_gradients_accumulate_until_zero_grad():
    layer = _layer("lora")
    x = np.ones((2, IN))
    upstream = np.ones((2, OUT))
    layer.forward(x)
    layer.backward(upstream)
    first = layer.grad_lora_a.copy()
    layer.forward(x)
    layer.backward(upstream)
    np.testing.assert_allclose(layer.grad_lora_a, 2 * first)
    layer.zero_grad()
    assert layer.grad_lora_a is None


def test_merge_then_forward_equals_unmerged_forward_lora():
    layer = _layer("lora")
    x = np.random.default_rng(7).standard_normal((5, IN))
    before = layer.forward(x, cache=False)
    original = layer.base.copy()
    assert layer.merge() is None and layer.merged
    np.testing.assert_allclose(layer.forward(x, cache=False), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    np.testing.assert_allclose(layer.base, original, rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer.forward(x, cache=False), before, rtol=1e-12, atol=1e-12)


def test_qlora_merge_reports_requantization_error_and_unmerge_restores_exactly():
    layer = _layer("qlora")
    x = np.random.default_rng(8).standard_normal((5, IN))
    before = layer.forward(x, cache=False)
    original = layer.base
    layer.merge()                                            # float merge: exact up to float32
    assert isinstance(layer.base, np.ndarray)
    np.testing.assert_allclose(layer.forward(x, cache=False), before, rtol=1e-5, atol=1e-4)
    layer.unmerge()
    assert layer.base is original
    report = layer.merge(requantize=True)
    assert isinstance(layer.base, qlora_np.QuantizedTensor)
    assert 0 < report.mean_abs_error <= report.max_abs_error
    assert 0 < report.relative_frobenius_error < 0.2          # NF4 error is ~0.1 of the weight
    layer.unmerge()
    np.testing.assert_array_equal(layer.forward(x, cache=False), before)


def test_memory_report_bytes_equal_the_arrays():
    weight = np.random.default_rng(9).standard_normal((128, 256)).astype(np.float32)
    layer = LoRALinear.from_weight(weight, bias=np.zeros(128), r=8, mode="qlora")
    report = layer.memory_report()
    qt = layer.base
    assert report["base_weight"] == qt.packed.nbytes
    assert report["base_weight"] + report["quant_constants"] == qt.nbytes
    assert report["quant_constants"] == qt.absmax.nbytes + qt.nested_absmax.nbytes + 4
    assert report["adapters"] == layer.lora_a.nbytes + layer.lora_b.nbytes == 4 * 8 * (128 + 256)
    assert report["gradients"] == report["adapters"] and report["optimizer_state"] == 2 * report["adapters"]
    assert report["bias"] == 128 * 4
    assert report["total"] == sum(v for k, v in report.items() if k != "total")
    assert layer.trainable_parameters() == 8 * (128 + 256)
    assert layer.total_parameters() == 128 * 256 + 128 + 8 * (128 + 256)
    dense = LoRALinear.from_weight(weight, r=8, mode="lora").memory_report()
    assert dense["base_weight"] == weight.nbytes and dense["quant_constants"] == 0


def test_bad_inputs_raise_typed_errors():
    layer = _layer("lora")
    with pytest.raises(ShapeError, match="last dimension 64"):
        layer.forward(np.ones((2, 63)))
    with pytest.raises(DTypeError):
        layer.forward(np.ones((2, IN), np.int32))
    layer.forward(np.ones((2, IN)))
    with pytest.raises(ShapeError, match=r"grad_out must have shape \(2, 6\)"):
        layer.backward(np.ones((2, 5)))
    with pytest.raises(DTypeError):
        layer.backward(np.ones((2, OUT), np.int64))
    weight = np.ones((8, 64), np.float32)
    with pytest.raises(ShapeError, match="2-D"):
        LoRALinear.from_weight(np.ones(64, np.float32))
    with pytest.raises(InvalidValueError, match="rank r"):
        LoRALinear.from_weight(weight, r=0)
    with pytest.raises(UnknownFormatError, match="mode must be one of"):
        LoRALinear.from_weight(weight, mode="full")
    with pytest.raises(UnknownFormatError, match="init must be one of"):
        LoRALinear.from_weight(weight, init="zeros")
    with pytest.raises(InvalidValueError, match="dropout"):
        LoRALinear.from_weight(weight, dropout=1.0)
    with pytest.raises(ShapeError, match=r"lora_b must have shape \(8, 2\)"):
        LoRALinear(weight, None, np.ones((2, 64)), np.ones((8, 3)), mode="lora")
    with pytest.raises(UnknownFormatError, match="needs base to be a QuantizedTensor"):
        LoRALinear(weight, None, np.ones((2, 64)), np.ones((8, 2)), mode="qlora")
    with pytest.raises(InvalidValueError, match="no adapters"):
        LoRALinear.from_weight(weight, mode="quant").merge()
    with pytest.raises(InvalidValueError, match="requantize needs a 4-bit base"):
        LoRALinear.from_weight(weight, mode="lora").merge(requantize=True)


def test_from_weight_takes_an_already_quantized_weight():
    weight = np.random.default_rng(11).standard_normal((16, 64)).astype(np.float32)
    qt = qlora_np.quantize(weight, "fp4", 32)
    layer = LoRALinear.from_weight(qt, r=4, seed=0)
    assert layer.base is qt and layer.lora_a.shape == (4, 64) and layer.lora_b.shape == (16, 4)
    x = np.ones((2, 64), np.float32)
    np.testing.assert_array_equal(layer.forward(x), qlora_np.matmul(x, qt))          # B starts at zero
    with pytest.raises(UnknownFormatError, match="float ndarray"):
        LoRALinear.from_weight(qt, mode="lora")
