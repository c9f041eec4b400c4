"""QuantizedTensor: sizes, validation and the bitsandbytes state-dict round trip."""

import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qlora_np
from qlora_np import BNB_BLOCKSIZES, QuantizedTensor
from qlora_np.errors import QLoraError, ShapeError, StateDictError

QUANT_TYPES = ["nf4", "fp4", "int4", "int4_asym"]
PREFIX = "layer.0.weight"


def _weight(shape=(96, 80), dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _fields(qt):
    return dict(packed=qt.packed, absmax=qt.absmax, shape=qt.shape, dtype=qt.dtype,
                quant_type=qt.quant_type, blocksize=qt.blocksize, codebook=qt.codebook,
                zero_point=qt.zero_point, nested_absmax=qt.nested_absmax,
                nested_code=qt.nested_code, offset=qt.offset,
                nested_blocksize=qt.nested_blocksize, strategy=qt.strategy)


# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape, blocksize, strategy", [((100, 33), 64, "block"), ((7,), 2, "block"),
                                                        ((3000,), 4096, "block"), ((5, 7, 9), 6, "block"),
                                                        ((12, 33), 64, "channel"), ((999,), 64, "tensor")])
def test_nbytes_is_the_sum_of_the_stored_arrays(quant_type, double_quant, shape, blocksize, strategy):
    qt = qlora_np.quantize(_weight(shape), quant_type, blocksize, double_quant, strategy)
    n = int(np.prod(shape))
    effective = {"block": blocksize, "channel": shape[-1], "tensor": n}[strategy]
    nblocks = -(-n // effective)
    assert (qt.size, qt.blocksize, qt.nblocks) == (n, effective, nblocks)
    # the arrays themselves have the documented sizes
    assert qt.packed.dtype == np.uint8 and qt.packed.shape == ((n + 1) // 2,)
    assert qt.absmax.shape == (nblocks,)
    assert qt.absmax.dtype == (np.uint8 if double_quant else np.float32)
    if double_quant:
        assert qt.nested_absmax.dtype == np.float32 and qt.nested_absmax.shape == (-(-nblocks // 256),)
        assert qt.nested_code.shape == (256,) and isinstance(qt.offset, np.float32)
    if quant_type == "int4_asym":
        assert qt.zero_point.dtype == np.uint8 and qt.zero_point.shape == (nblocks,)
    else:
        assert qt.zero_point is None
    # nbytes: every per-tensor array, plus 4 bytes for the float32 offset; codebooks not counted
    expected = qt.packed.nbytes + qt.absmax.nbytes
    if double_quant:
        expected += qt.nested_absmax.nbytes + 4
    if quant_type == "int4_asym":
        expected += qt.zero_point.nbytes
    assert qt.nbytes == expected
    by_formula = ((n + 1) // 2 + nblocks * (1 if double_quant else 4)
                  + (4 * -(-nblocks // 256) + 4 if double_quant else 0)
                  + (nblocks if quant_type == "int4_asym" else 0))
    assert qt.nbytes == by_formula
    assert f"{qt.nbytes} bytes" in repr(qt)


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
def test_dequantize_method_equals_function(quant_type, double_quant, dtype):
    qt = qlora_np.quantize(_weight((33, 17), dtype), quant_type, 64, double_quant)
    for backend in ["numba", "reference"]:
        method = qt.dequantize(backend=backend)
        function = qlora_np.dequantize(qt, backend=backend)
        assert method.dtype == function.dtype == np.dtype(dtype) and method.shape == (33, 17)
        assert method.tobytes() == function.tobytes()
    for override in ["float32", np.float16, ml_dtypes.bfloat16, np.dtype("float64")]:
        method = qt.dequantize(override)
        function = qlora_np.dequantize(qt, dtype=override)
        assert method.dtype == function.dtype == np.dtype(override)
        assert method.tobytes() == function.tobytes()
    # the dtype only rounds: the float32 decode rounded to the weight's dtype
    assert qt.dequantize().tobytes() == qt.dequantize("float32").astype(dtype).tobytes()


# ---------------------------------------------------------------------------
# bitsandbytes state dicts
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("shape, blocksize", [((64, 64), 64), ((7, 13), 128), ((1001,), 32),
                                              ((3, 5, 300), 4096), ((600, 9), 256)])
def test_to_bnb_from_bnb_round_trip(quant_type, double_quant, dtype, shape, blocksize):
    qt = qlora_np.quantize(_weight(shape, dtype), quant_type, blocksize, double_quant)
    state = qt.to_bnb(PREFIX)
    quant_key = f"{PREFIX}.quant_state.bitsandbytes__{quant_type}"
    expected_keys = [PREFIX, f"{PREFIX}.absmax", f"{PREFIX}.quant_map"]
    if double_quant:
        expected_keys += [f"{PREFIX}.nested_absmax", f"{PREFIX}.nested_quant_map"]
    assert list(state) == expected_keys + [quant_key]
    assert state[PREFIX].dtype == np.uint8 and state[PREFIX].shape == (qt.packed.size, 1)
    assert all(isinstance(value, np.ndarray) for value in state.values())
    quant_state = json.loads(bytes(state[quant_key]))
    assert quant_state["quant_type"] == quant_type and quant_state["blocksize"] == blocksize
    assert quant_state["shape"] == list(shape) and quant_state["dtype"] == qt.dtype
    if double_quant:
        assert quant_state["nested_blocksize"] == 256
        assert np.float32(quant_state["nested_offset"]) == qt.offset

    back = QuantizedTensor.from_bnb(state, PREFIX)
    for name, ours in _fields(qt).items():
        theirs = getattr(back, name)
        if isinstance(ours, (np.ndarray, np.floating)):
            theirs = np.asarray(theirs)
            assert theirs.dtype == np.asarray(ours).dtype and theirs.shape == np.asarray(ours).shape, name
            assert theirs.tobytes() == np.asarray(ours).tobytes(), name
        else:
            assert ours == theirs, name
    assert back.nbytes == qt.nbytes
    for backend in ["numba", "reference"]:
        assert back.dequantize(backend=backend).tobytes() == qt.dequantize(backend=backend).tobytes()
    # and the round trip is stable: writing what was read gives the same bytes again
    again = back.to_bnb(PREFIX)
    assert list(again) == list(state)
    assert all(again[k].tobytes() == state[k].tobytes() and again[k].shape == state[k].shape
               for k in state)


def test_from_bnb_picks_its_prefix_out_of_a_larger_state_dict():
    first = qlora_np.quantize(_weight((8, 64), seed=1), "nf4", 64, True)
    second = qlora_np.quantize(_weight((16, 32), seed=2), "fp4", 32)
    state = {**first.to_bnb("a.weight"), **second.to_bnb("b.weight"), "a.bias": np.zeros(8, np.float32)}
    assert QuantizedTensor.from_bnb(state, "a.weight").dequantize().tobytes() == first.dequantize().tobytes()
    assert QuantizedTensor.from_bnb(state, "b.weight").dequantize().tobytes() == second.dequantize().tobytes()


@pytest.mark.parametrize("quant_type, blocksize, strategy, match", [
    ("int4", 64, "block", "no 'int4' format"),
    ("int4_asym", 64, "block", "no 'int4_asym' format"),
    ("nf4", 48, "block", r"block sizes are \(32, 64.*blocksize 48 \(strategy 'block'\)"),
    ("fp4", 2, "block", "blocksize 2 "),
    ("nf4", 64, "channel", "blocksize 80 .strategy 'channel'"),
    ("fp4", 64, "tensor", "blocksize 7680 .strategy 'tensor'"),
])
def test_to_bnb_refuses_what_bitsandbytes_cannot_read(quant_type, blocksize, strategy, match):
    qt = qlora_np.quantize(_weight(), quant_type, blocksize, strategy=strategy)
    with pytest.raises(StateDictError, match=match) as info:
        qt.to_bnb()
    assert isinstance(info.value, QLoraError) and isinstance(info.value, ValueError)


def test_to_bnb_accepts_every_bnb_blocksize_and_channel_rows_of_one():
    for blocksize in BNB_BLOCKSIZES:
        qt = qlora_np.quantize(_weight((40, 128)), "nf4", blocksize, True)
        assert QuantizedTensor.from_bnb(qt.to_bnb()).blocksize == blocksize
    qt = qlora_np.quantize(_weight((10, 256)), "fp4", strategy="channel")
    assert json.loads(bytes(qt.to_bnb()["weight.quant_state.bitsandbytes__fp4"]))["blocksize"] == 256


def _valid_state(double_quant=True, quant_type="nf4"):
    return qlora_np.quantize(_weight(), quant_type, 64, double_quant).to_bnb("weight")


QUANT_KEY = "weight.quant_state.bitsandbytes__nf4"


def _with_json(state, drop=(), **changes):
    quant_state = json.loads(bytes(state[QUANT_KEY]))
    quant_state.update(changes)
    for key in drop:
        del quant_state[key]
    return {**state, QUANT_KEY: np.frombuffer(json.dumps(quant_state).encode(), np.uint8).copy()}


def _without(*keys):
    return lambda s: {k: v for k, v in s.items() if k not in keys}


def _replace(key, value):
    return lambda s: {**s, key: value(s[key]) if callable(value) else value}


MALFORMED = {
    # missing keys
    "no packed": (_without("weight"), "missing key 'weight'"),
    "no absmax": (_without("weight.absmax"), "missing key 'weight.absmax'"),
    "no quant_map": (_without("weight.quant_map"), "missing key 'weight.quant_map'"),
    "no nested_absmax": (_without("weight.nested_absmax"), "missing key 'weight.nested_absmax'"),
    "no nested_quant_map": (_without("weight.nested_quant_map"), "missing key 'weight.nested_quant_map'"),
    "no quant_state": (_without(QUANT_KEY), r"expected one key 'weight\.quant_state\.bitsandbytes__<nf4\|fp4>', found none"),
    "two quant_states": (lambda s: {**s, "weight.quant_state.bitsandbytes__fp4": s[QUANT_KEY]},
                         "expected one key.*found .*__nf4.*__fp4"),
    # wrong dtypes
    "packed int8": (_replace("weight", lambda a: a.view(np.int8)), "packed must be uint8 of shape .3840,., got int8"),
    "absmax float32 under double quant": (_replace("weight.absmax", lambda a: a.astype(np.float32)),
                                          "absmax must be uint8 of shape .120,., got float32"),
    "nested_absmax float16": (_replace("weight.nested_absmax", lambda a: a.astype(np.float16)),
                              "nested_absmax must be float32 of shape .1,., got float16"),
    "quant_map float64": (_replace("weight.quant_map", lambda a: a.astype(np.float64)),
                          "codebook must be float32 of shape .16,., got float64"),
    "nested_quant_map float64": (_replace("weight.nested_quant_map", lambda a: a.astype(np.float64)),
                                 "nested_code must be float32 of shape .256,., got float64"),
    "JSON bytes int8": (_replace(QUANT_KEY, lambda a: a.view(np.int8)), "must be a 1-D uint8 array of JSON bytes, got int8"),
    "JSON bytes 2-D": (_replace(QUANT_KEY, lambda a: a.reshape(1, -1)), r"must be a 1-D uint8 array of JSON bytes, got uint8 \(1, "),
    # wrong sizes
    "packed short": (_replace("weight", lambda a: a[:-3]), r"packed must be uint8 of shape \(3840,\), got uint8 of shape \(3837,\)"),
    "absmax short": (_replace("weight.absmax", lambda a: a[:-1]), r"absmax must be uint8 of shape \(120,\), got uint8 of shape \(119,\)"),
    "absmax long": (_replace("weight.absmax", lambda a: np.append(a, a[:1])), r"absmax .*got uint8 of shape \(121,\)"),
    "nested_absmax long": (_replace("weight.nested_absmax", lambda a: np.append(a, a)), r"nested_absmax .*shape \(2,\)"),
    "quant_map short": (_replace("weight.quant_map", lambda a: a[:8]), r"codebook .*got float32 of shape \(8,\)"),
    "nested_quant_map short": (_replace("weight.nested_quant_map", lambda a: a[:255]), r"nested_code .*shape \(255,\)"),
    # corrupt JSON bytes
    "not JSON": (_replace(QUANT_KEY, np.frombuffer(b"{not json", np.uint8)), "does not hold valid UTF-8 JSON"),
    "not UTF-8": (_replace(QUANT_KEY, np.frombuffer(b'{"a": "\xff\xfe"}', np.uint8)), "does not hold valid UTF-8 JSON"),
    "truncated JSON": (_replace(QUANT_KEY, lambda a: a[:len(a) // 2]), "does not hold valid UTF-8 JSON"),
    "empty JSON": (_replace(QUANT_KEY, np.zeros(0, np.uint8)), "does not hold valid UTF-8 JSON"),
    "JSON array": (_replace(QUANT_KEY, np.frombuffer(b"[1, 2]", np.uint8)), "must hold a JSON object, got list"),
    "JSON null": (_replace(QUANT_KEY, np.frombuffer(b"null", np.uint8)), "must hold a JSON object, got NoneType"),
    # JSON contents
    "JSON quant_type fp4 under the nf4 key": (lambda s: _with_json(s, quant_type="fp4"),
                                              "JSON quant_type 'fp4' does not match the key's 'nf4'"),
    "JSON without quant_type": (lambda s: _with_json(s, drop=["quant_type"]), "JSON quant_type None does not match"),
    "an int4 key": (lambda s: {**_without(QUANT_KEY)(s),
                               "weight.quant_state.bitsandbytes__int4": _with_json(s, quant_type="int4")[QUANT_KEY]},
                    "bitsandbytes 4-bit types are nf4 and fp4, got 'int4'"),
    "shape vs packed size": (lambda s: _with_json(s, shape=[96, 81]), r"packed must be uint8 of shape \(3888,\)"),
    "shape a string": (lambda s: _with_json(s, shape="96x80"), "shape must be a list of non-negative ints, got '96x80'"),
    "shape negative": (lambda s: _with_json(s, shape=[-96, -80]), "shape must be a list of non-negative ints"),
    "shape floats": (lambda s: _with_json(s, shape=[96.0, 80]), "shape must be a list of non-negative ints"),
    "shape missing": (lambda s: _with_json(s, drop=["shape"]), "shape must be a list.*got None"),
    "blocksize negative": (lambda s: _with_json(s, blocksize=-64), "blocksize must be a positive int, got -64"),
    "blocksize zero": (lambda s: _with_json(s, blocksize=0), "blocksize must be a positive int, got 0"),
    "blocksize float": (lambda s: _with_json(s, blocksize=64.0), "blocksize must be a positive int, got 64.0"),
    "blocksize missing": (lambda s: _with_json(s, drop=["blocksize"]), "blocksize must be a positive int, got None"),
    "blocksize vs absmax": (lambda s: _with_json(s, blocksize=128), r"absmax must be uint8 of shape \(60,\)"),
    "dtype int8": (lambda s: _with_json(s, dtype="int8"), r"dtype must be one of \['float32'.*got 'int8'"),
    "dtype missing": (lambda s: _with_json(s, drop=["dtype"]), "dtype must be one of.*got None"),
    "nested_offset string": (lambda s: _with_json(s, nested_offset="0.1"), "nested_offset must be a finite float32 number, got '0.1'"),
    "nested_offset missing": (lambda s: _with_json(s, drop=["nested_offset"]), "nested_offset must be a finite float32 number, got None"),
    "nested_blocksize zero": (lambda s: _with_json(s, nested_blocksize=0), "nested_blocksize must be a positive int, got 0"),
    "nested_blocksize string": (lambda s: _with_json(s, nested_blocksize="256"), "nested_blocksize must be a positive int"),
    "nested_blocksize vs nested_absmax": (lambda s: _with_json(s, nested_blocksize=64),
                                          r"nested_absmax must be float32 of shape \(2,\)"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_from_bnb_names_what_is_wrong(name):
    mutate, match = MALFORMED[name]
    state = mutate(_valid_state())
    with pytest.raises(StateDictError, match=match) as info:
        QuantizedTensor.from_bnb(state, "weight")
    assert isinstance(info.value, QLoraError) and isinstance(info.value, ValueError)


def test_from_bnb_without_double_quant_checks_float_absmax():
    state = _valid_state(double_quant=False)
    assert QuantizedTensor.from_bnb(state).absmax.dtype == np.float32
    with pytest.raises(StateDictError, match=r"absmax must be float32 of shape \(120,\), got uint8"):
        QuantizedTensor.from_bnb({**state, "weight.absmax": state["weight.absmax"].view(np.uint8)[:120]})
    # a nested_blocksize in the JSON makes the nested arrays required
    with pytest.raises(StateDictError, match="missing key 'weight.nested_absmax'"):
        QuantizedTensor.from_bnb(_with_json(state, nested_blocksize=256, nested_offset=0.1))


def test_from_bnb_with_another_prefix_finds_nothing():
    with pytest.raises(StateDictError, match=r"'model\.weight\.quant_state\.bitsandbytes__<nf4\|fp4>', found none"):
        QuantizedTensor.from_bnb(_valid_state(), "model.weight")


# -- fuzzing ------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                         st.sampled_from([0, 1, 2, 63, 64, 65, 128, 256, 96, 80, 7680, -1, "float16",
                                          "bfloat16", "nf4", "fp4"]))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8)

ARRAY_DTYPES = [np.uint8, np.int8, np.float32, np.float16, np.float64, np.int64, np.uint16, np.bool_,
                np.complex64, np.dtype("U3"), np.dtype(object)]


@st.composite
def random_arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(ARRAY_DTYPES)))
    shape = draw(st.one_of(st.just(()), st.tuples(st.integers(0, 4000)),
                           st.tuples(st.integers(0, 60), st.integers(0, 60)),
                           st.tuples(st.integers(0, 12), st.integers(0, 12), st.integers(0, 12))))
    seed = draw(st.integers(0, 2**32 - 1))
    size = int(np.prod(shape))
    raw = np.random.default_rng(seed).integers(0, 256, size * 16, dtype=np.uint8)
    if dtype.kind in "OU":
        return np.array([str(v) for v in raw[:size]], dtype=dtype).reshape(shape)
    return raw[:size * dtype.itemsize].view(dtype).reshape(shape)


@st.composite
def mutated_states(draw):
    quant_type = draw(st.sampled_from(["nf4", "fp4"]))
    state = dict(_valid_state(draw(st.booleans()), quant_type))
    quant_key = f"weight.quant_state.bitsandbytes__{quant_type}"
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(sorted(state) + ["weight.extra"]))
        action = draw(st.sampled_from(["drop", "replace", "garble", "truncate", "retype", "reshape",
                                       "json_field", "json_bytes", "rename"]))
        value = state.get(key)
        if action == "drop" and key in state:
            del state[key]
        elif action == "replace":
            state[key] = draw(random_arrays())
        elif action == "garble" and value is not None and value.size and value.dtype.kind not in "OU":
            garbled = value.reshape(-1).copy().view(np.uint8)
            for _ in range(draw(st.integers(1, 4))):
                garbled[draw(st.integers(0, garbled.size - 1))] = draw(st.integers(0, 255))
            state[key] = garbled.view(value.dtype).reshape(value.shape)
        elif action == "truncate" and value is not None:
            state[key] = value.reshape(-1)[:draw(st.integers(0, value.size))]
        elif action == "retype" and value is not None and value.dtype.kind not in "OUc":
            with np.errstate(all="ignore"):
                state[key] = value.astype(draw(st.sampled_from(ARRAY_DTYPES[:9])))
        elif action == "reshape" and value is not None:
            state[key] = value.reshape(draw(st.sampled_from([(1, -1), (-1, 1), (-1,)]))) if value.size else value
        elif action == "json_field" and quant_key in state:
            try:
                quant_state = json.loads(np.asarray(state[quant_key]).tobytes())
            except (ValueError, TypeError):
                continue
            if isinstance(quant_state, dict):
                field = draw(st.sampled_from(["quant_type", "blocksize", "shape", "dtype", "nested_blocksize",
                                              "nested_offset", "nested_dtype", "other"]))
                if draw(st.booleans()):
                    quant_state.pop(field, None)
                else:
                    quant_state[field] = draw(JSON_VALUES)
                state[quant_key] = np.frombuffer(json.dumps(quant_state).encode(), np.uint8).copy()
        elif action == "json_bytes" and quant_key in state:
            raw = bytearray(np.asarray(state[quant_key]).tobytes())
            position = draw(st.integers(0, len(raw)))
            chunk = draw(st.binary(max_size=6))
            if draw(st.booleans()):
                raw[position:position + len(chunk)] = chunk          # overwrite / delete
            else:
                raw[position:position] = chunk                       # insert
            state[quant_key] = np.frombuffer(bytes(raw), np.uint8).copy()
        elif action == "rename" and quant_key in state:
            new_type = draw(st.sampled_from(["fp4", "nf4", "int4", "", "NF4"]))
            state[f"weight.quant_state.bitsandbytes__{new_type}"] = state.pop(quant_key)
            quant_key = f"weight.quant_state.bitsandbytes__{new_type}"
    return state


@given(state=mutated_states())
@settings(max_examples=300)
def test_from_bnb_on_corrupted_state_only_raises_qlora_errors(state):
    try:
        qt = QuantizedTensor.from_bnb(state, "weight")
    except QLoraError as error:
        assert isinstance(error, StateDictError) and str(error)
        return
    # whatever loads is a consistent tensor that decodes to its shape
    assert qt.packed.size == (qt.size + 1) // 2 and qt.absmax.size == qt.nblocks
    with np.errstate(all="ignore"):
        decoded = qt.dequantize(dtype="float32")
    assert decoded.shape == qt.shape


@pytest.mark.parametrize("changes", [dict(shape=[10**30]), dict(nested_offset=10**400)],
                         ids=["huge shape", "huge int offset"])
def test_from_bnb_with_out_of_range_json_numbers_raises_state_dict_error(changes):
    with pytest.raises(StateDictError):
        QuantizedTensor.from_bnb(_with_json(_valid_state(), **changes))


@pytest.mark.parametrize("dtype", [["float32"], {"name": "float32"}], ids=["list", "object"])
def test_from_bnb_with_a_non_string_json_dtype_raises_state_dict_error(dtype):
    with pytest.raises(StateDictError, match="dtype must be one of"):
        QuantizedTensor.from_bnb(_with_json(_valid_state(), dtype=dtype))


def test_from_bnb_refuses_a_nested_blocksize_that_cannot_decode():
    state = _with_json(_valid_state(), nested_blocksize=2**64)
    try:
        qt = QuantizedTensor.from_bnb(state)
    except StateDictError:
        return
    qt.dequantize()


# ---------------------------------------------------------------------------
# Constructor validation
# ---------------------------------------------------------------------------

def _base(quant_type="nf4", double_quant=False):
    return _fields(qlora_np.quantize(_weight((10, 30)), quant_type, 64, double_quant))


BROKEN_FIELDS = {
    "packed short": (dict(packed=lambda f: f["packed"][:-1]), r"packed must be uint8 of shape \(150,\), got uint8 of shape \(149,\)"),
    "packed int16": (dict(packed=lambda f: f["packed"].astype(np.int16)), "packed must be uint8 .*got int16"),
    "packed 2-D": (dict(packed=lambda f: f["packed"].reshape(-1, 1)), r"packed .*got uint8 of shape \(150, 1\)"),
    "packed a list": (dict(packed=lambda f: list(f["packed"])), "packed must be a numpy array, got list"),
    "absmax short": (dict(absmax=lambda f: f["absmax"][:-1]), r"absmax must be float32 of shape \(5,\), got float32 of shape \(4,\)"),
    "absmax float64": (dict(absmax=lambda f: f["absmax"].astype(np.float64)), "absmax must be float32 .*got float64"),
    "absmax a list": (dict(absmax=lambda f: list(f["absmax"])), "absmax must be a numpy array, got list"),
    "shape vs packed": (dict(shape=lambda f: (10, 31)), r"packed must be uint8 of shape \(155,\)"),
    "blocksize vs absmax": (dict(blocksize=lambda f: 32), r"absmax must be float32 of shape \(10,\)"),
    "codebook short": (dict(codebook=lambda f: f["codebook"][:8]), r"codebook must be float32 of shape \(16,\)"),
    "codebook float64": (dict(codebook=lambda f: f["codebook"].astype(np.float64)), "codebook must be float32.*got float64"),
    "zero_point wrong length": (dict(zero_point=lambda f: np.zeros(4, np.uint8)), r"zero_point must be uint8 of shape \(5,\)"),
    "zero_point float": (dict(zero_point=lambda f: np.zeros(5, np.float32)), "zero_point must be uint8.*got float32"),
}

BROKEN_NESTED = {
    "absmax float32 under double quant": (dict(absmax=lambda f: np.zeros(5, np.float32)), "absmax must be uint8 .*got float32"),
    "nested_absmax too long": (dict(nested_absmax=lambda f: np.zeros(2, np.float32)), r"nested_absmax must be float32 of shape \(1,\)"),
    "nested_absmax missing": (dict(nested_absmax=lambda f: None), "nested_absmax must be a numpy array, got NoneType"),
    "nested_code short": (dict(nested_code=lambda f: f["nested_code"][:255]), r"nested_code must be float32 of shape \(256,\)"),
    "nested_blocksize vs nested_absmax": (dict(nested_blocksize=lambda f: 2), r"nested_absmax must be float32 of shape \(3,\)"),
}


@pytest.mark.parametrize("name", list(BROKEN_FIELDS) + list(BROKEN_NESTED))
def test_constructor_checks_field_consistency(name):
    double_quant = name in BROKEN_NESTED
    changes, match = (BROKEN_NESTED if double_quant else BROKEN_FIELDS)[name]
    fields = _base("int4_asym" if "zero_point" in name else "nf4", double_quant)
    QuantizedTensor(**fields)                                 # the unmodified fields are fine
    for field, change in changes.items():
        fields[field] = change(fields)
    with pytest.raises(ShapeError, match=match) as info:
        QuantizedTensor(**fields)
    assert isinstance(info.value, QLoraError) and isinstance(info.value, ValueError)


def test_constructor_normalises_shape_and_offset():
    fields = _base("nf4", True)
    qt = QuantizedTensor(**{**fields, "shape": [np.int64(10), 30], "offset": 0.25})
    assert qt.shape == (10, 30) and all(type(d) is int for d in qt.shape)
    assert type(qt.offset) is np.float32 and qt.offset == np.float32(0.25)


def test_constructor_refuses_a_zero_blocksize_with_a_qlora_error():
    with pytest.raises(QLoraError):
        QuantizedTensor(**{**_base(), "blocksize": 0})


def test_constructor_requires_a_zero_point_for_int4_asym():
    with pytest.raises(ShapeError):
        QuantizedTensor(**{**_base("int4_asym"), "zero_point": None})


def test_constructor_or_dequantize_refuse_an_unknown_dtype_with_a_qlora_error():
    with pytest.raises(QLoraError):
        QuantizedTensor(**{**_base(), "dtype": "int8"}).dequantize()
