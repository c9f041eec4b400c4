"""QuantizedTensor: sizes, validation and the bitsandbytes state-dict round trip."""

import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

import qlora_np
from qlora_np import QuantizedTensor
from qlora_np.errors import QLoraError, ShapeError, StateDictError


def _weight(shape=(96, 80), dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False), ("int4_asym", True)])
def test_nbytes_is_the_sum_of_the_stored_arrays(quant_type, double_quant):
    qt = qlora_np.quantize(_weight((100, 33)), quant_type, 64, double_quant)
    arrays = [qt.packed, qt.absmax, qt.nested_absmax, qt.zero_point]
    expected = sum(a.nbytes for a in arrays if a is not None) + (4 if double_quant else 0)
    assert qt.nbytes == expected
    assert qt.packed.size == (100 * 33 + 1) // 2
    assert qt.nblocks == -(-3300 // 64)


def test_dequantize_method_equals_function():
    qt = qlora_np.quantize(_weight(), "nf4", 64, True)
    np.testing.assert_array_equal(qt.dequantize(), qlora_np.dequantize(qt))
    assert qt.dequantize("float16").dtype == np.float16


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("shape", [(64, 64), (7, 13), (1001,)])
def test_to_bnb_from_bnb_round_trip(quant_type, double_quant, dtype, shape):
    qt = qlora_np.quantize(_weight(shape, dtype), quant_type, 128, double_quant)
    state = qt.to_bnb("layer.weight")
    back = QuantizedTensor.from_bnb(state, "layer.weight")
    for name in ["packed", "absmax", "codebook", "nested_absmax", "nested_code", "offset"]:
        ours, theirs = getattr(qt, name), getattr(back, name)
        assert (ours is None) == (theirs is None), name
        if ours is not None:
            assert np.asarray(ours).tobytes() == np.asarray(theirs).tobytes(), name
    assert (back.shape, back.dtype, back.quant_type, back.blocksize) == (qt.shape, qt.dtype, quant_type, 128)
    assert back.dequantize().tobytes() == qt.dequantize().tobytes()
    quant_state = json.loads(bytes(state[f"layer.weight.quant_state.bitsandbytes__{quant_type}"]))
    assert quant_state["shape"] == list(shape) and quant_state["blocksize"] == 128


@pytest.mark.parametrize("quant_type, blocksize, match", [("int4", 64, "no 'int4' format"),
                                                          ("int4_asym", 64, "no 'int4_asym'"),
                                                          ("nf4", 48, "blocksize 48")])
def test_to_bnb_refuses_what_bitsandbytes_cannot_read(quant_type, blocksize, match):
    qt = qlora_np.quantize(_weight(), quant_type, blocksize)
    with pytest.raises(StateDictError, match=match):
        qt.to_bnb()


def _valid_state(double_quant=True):
    return qlora_np.quantize(_weight(), "nf4", 64, double_quant).to_bnb("weight")


def _with_json(state, **changes):
    key = "weight.quant_state.bitsandbytes__nf4"
    quant_state = json.loads(bytes(state[key]))
    quant_state.update(changes)
    state = dict(state)
    state[key] = np.frombuffer(json.dumps(quant_state).encode(), np.uint8).copy()
    return state


@pytest.mark.parametrize("mutate, match", [
    (lambda s: {k: v for k, v in s.items() if k != "weight.absmax"}, "missing key 'weight.absmax'"),
    (lambda s: {k: v for k, v in s.items() if "quant_state" not in k}, "found none"),
    (lambda s: {**s, "weight.absmax": s["weight.absmax"][:-1]}, "absmax must be uint8 of shape"),
    (lambda s: {**s, "weight.absmax": s["weight.absmax"].astype(np.float32)}, "absmax must be uint8"),
    (lambda s: {**s, "weight": s["weight"][:-3]}, "packed must be uint8 of shape"),
    (lambda s: {**s, "weight.quant_state.bitsandbytes__nf4": np.frombuffer(b"{not json", np.uint8)},
     "valid UTF-8 JSON"),
    (lambda s: {**s, "weight.quant_state.bitsandbytes__nf4": np.frombuffer(b"[1, 2]", np.uint8)},
     "JSON object"),
    (lambda s: _with_json(s, quant_type="fp4"), "does not match"),
    (lambda s: _with_json(s, shape=[96, 81]), "packed must be uint8 of shape"),
    (lambda s: _with_json(s, shape="96x80"), "shape must be a list"),
    (lambda s: _with_json(s, blocksize=-64), "blocksize must be a positive int"),
    (lambda s: _with_json(s, dtype="int8"), "dtype must be one of"),
    (lambda s: _with_json(s, nested_offset="0.1"), "nested_offset must be a number"),
    (lambda s: _with_json(s, nested_blocksize=0), "nested_blocksize must be a positive int"),
])
def test_from_bnb_names_what_is_wrong(mutate, match):
    with pytest.raises(StateDictError, match=match):
        QuantizedTensor.from_bnb(mutate(_valid_state()), "weight")


def _random_array(draw):
    dtype = draw(st.sampled_from([np.uint8, np.float32, np.int64, np.float16, np.uint16]))
    shape = draw(st.lists(st.integers(0, 40), max_size=3))
    return np.full(shape, draw(st.integers(0, 200)), dtype)


@st.composite
def mutated_states(draw):
    state = dict(_valid_state(draw(st.booleans())))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(state)))
        action = draw(st.sampled_from(["drop", "replace", "garble", "truncate"]))
        if action == "drop":
            del state[key]
        elif action == "replace":
            state[key] = _random_array(draw)
        elif action == "garble" and state[key].size:
            original = state[key]
            garbled = original.reshape(-1).copy().view(np.uint8)
            garbled[draw(st.integers(0, garbled.size - 1))] = draw(st.integers(0, 255))
            state[key] = garbled.view(original.dtype).reshape(original.shape)
        elif action == "truncate":
            state[key] = state[key].reshape(-1)[:draw(st.integers(0, state[key].size))]
    return state


@given(state=mutated_states())
def test_from_bnb_on_corrupted_state_only_raises_qlora_errors(state):
    try:
        qt = QuantizedTensor.from_bnb(state, "weight")
    except QLoraError:
        return
    qt.dequantize()                      # whatever loads must also decode


def test_constructor_checks_field_consistency():
    qt = qlora_np.quantize(_weight(), "nf4", 64)
    with pytest.raises(ShapeError, match="packed must be uint8 of shape"):
        QuantizedTensor(packed=qt.packed[:-1], absmax=qt.absmax, shape=qt.shape, dtype="float32",
                        quant_type="nf4", blocksize=64, codebook=qt.codebook)
    with pytest.raises(ShapeError, match="codebook must be float32 of shape"):
        QuantizedTensor(packed=qt.packed, absmax=qt.absmax, shape=qt.shape, dtype="float32",
                        quant_type="nf4", blocksize=64, codebook=qt.codebook[:8])
    with pytest.raises(ShapeError, match="absmax must be a numpy array"):
        QuantizedTensor(packed=qt.packed, absmax=list(qt.absmax), shape=qt.shape, dtype="float32",
                        quant_type="nf4", blocksize=64, codebook=qt.codebook)
