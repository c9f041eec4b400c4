"""Every bitsandbytes reference vector is reproduced byte for byte, by both backends."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import qlora_np
from qlora_np.quant import reference
from qlora_np.errors import InvalidValueError
from qlora_np.kernels import blockwise as cpu

from .bnb_cases import BNB_CASES, BNB_DIR, load_case

BACKENDS = ["numba", "reference"]


def _quantize_case(case, backend):
    fields = load_case(case)
    qt = qlora_np.quantize(fields["input"], str(fields["quant_type"]), int(fields["blocksize"]),
                           bool(fields["double_quant"]), backend=backend)
    return fields, qt


def _float_absmax(fields):
    """The float32 absmax bitsandbytes computed before double quant (bnb rules, plain NumPy)."""
    flat = np.asarray(fields["input"], np.float32).reshape(-1)
    blocksize = int(fields["blocksize"])
    nblocks = -(-flat.size // blocksize)
    padded = np.zeros(nblocks * blocksize, np.float32)
    padded[:flat.size] = np.abs(flat)
    absmax = padded.reshape(nblocks, blocksize).max(axis=1)
    if flat.size % blocksize:
        absmax[-1] = max(absmax[-1], np.float32(1e-38))
    return absmax


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BNB_CASES, ids=[c["name"] for c in BNB_CASES])
def test_quantize_reproduces_bnb_bytes(case, backend):
    fields, qt = _quantize_case(case, backend)
    assert qt.packed.tobytes() == fields["packed"].reshape(-1).tobytes()
    assert qt.absmax.dtype == fields["absmax"].dtype
    assert qt.absmax.tobytes() == fields["absmax"].tobytes()
    if bool(fields["double_quant"]):
        assert qt.nested_absmax.tobytes() == fields["nested_absmax"].tobytes()
        assert qt.offset.tobytes() == np.float32(fields["offset"]).tobytes()
        assert qt.nested_code.tobytes() == fields["nested_code"].tobytes()
        assert qt.nested_blocksize == int(fields["nested_blocksize"])
    assert qt.codebook.tobytes() == fields["code"].astype(np.float32).tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BNB_CASES, ids=[c["name"] for c in BNB_CASES])
def test_dequantize_reproduces_bnb_values(case, backend):
    fields, qt = _quantize_case(case, backend)
    expected = fields["dequantized"]
    result = qlora_np.dequantize(qt, backend=backend)
    assert result.dtype == expected.dtype
    assert result.shape == tuple(fields["shape"])
    np.testing.assert_array_equal(result.astype(np.float32), expected.astype(np.float32))


@pytest.mark.parametrize("mean", [reference.torch_mean_float32, cpu.torch_mean_float32],
                         ids=["reference", "numba"])
@pytest.mark.parametrize("case", [c for c in BNB_CASES if c["double_quant"]],
                         ids=[c["name"] for c in BNB_CASES if c["double_quant"]])
def test_torch_mean_reproduces_bnb_offset(case, mean):
    fields = load_case(case)
    assert np.float32(mean(_float_absmax(fields))).tobytes() == np.float32(fields["offset"]).tobytes()


def test_torch_mean_differs_from_a_plain_mean_somewhere():
    # the reason torch's summation order is reproduced: NumPy's pairwise mean disagrees
    rng = np.random.default_rng(0)
    disagreements = 0
    for _ in range(50):
        values = rng.random(1000, dtype=np.float32) * 3
        disagreements += reference.torch_mean_float32(values) != np.float32(values.mean(dtype=np.float32))
    assert disagreements > 0


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_linear4bit_checkpoint_loads_and_matches_bnb_layer_output(quant_type, double_quant):
    stem = "linear4bit_nf4_dq" if double_quant else "linear4bit_fp4"
    state = load_file(BNB_DIR / f"{stem}.safetensors")
    with np.load(BNB_DIR / f"{stem}_io.npz") as io:
        io = {key: io[key] for key in io.files}
    qt = qlora_np.QuantizedTensor.from_bnb(state, "weight")
    assert qt.quant_type == quant_type and qt.double_quant == double_quant
    assert qt.shape == (256, 192) and qt.blocksize == 64
    weight = qt.dequantize()
    np.testing.assert_array_equal(weight, io["weight_dequantized"])
    y = io["x"] @ weight.T + state["bias"]
    np.testing.assert_allclose(y, io["y"], rtol=1e-5, atol=1e-5)
    y_fused = qlora_np.matmul(io["x"], qt) + state["bias"]
    np.testing.assert_allclose(y_fused, io["y_from_dequant_f64"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stem, quant_type, double_quant",
                         [("linear4bit_nf4_dq", "nf4", True), ("linear4bit_fp4", "fp4", False)])
def test_to_bnb_writes_the_same_arrays_as_bnb(stem, quant_type, double_quant):
    state = load_file(BNB_DIR / f"{stem}.safetensors")
    with np.load(BNB_DIR / f"{stem}_io.npz") as io:
        weight_float = io["weight_float"]
    ours = qlora_np.quantize(weight_float, quant_type, 64, double_quant).to_bnb("weight")
    theirs = {key: value for key, value in state.items() if key != "bias"}
    assert list(ours) == [k for k in ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                      "weight.nested_quant_map", f"weight.quant_state.bitsandbytes__{quant_type}"]
                          if k in theirs]
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        assert ours[key].shape == value.shape, key
        assert ours[key].tobytes() == value.tobytes(), key
    quant_state = json.loads(bytes(ours[f"weight.quant_state.bitsandbytes__{quant_type}"]))
    assert quant_state["shape"] == [256, 192]


def _edge_cases():
    with np.load(BNB_DIR / "edge_cases.npz") as data:
        return sorted({key.split("__")[0] for key in data.files})


@pytest.mark.parametrize("name", _edge_cases())
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_that_bnb_turns_into_nan_are_refused(name, backend):
    with np.load(BNB_DIR / "edge_cases.npz") as data:
        values = data[f"{name}__input"]
    quant_type = "nf4" if "_nf4_" in name else "fp4"
    with pytest.raises(InvalidValueError, match="non-finite"):
        qlora_np.quantize(values, quant_type, 64, name.endswith("_dq"), backend=backend)
