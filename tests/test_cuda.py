"""The numba.cuda kernels give the CPU kernels' bytes: on a GPU, or under Numba's CUDA simulator.

Without a GPU, :func:`test_cuda_suite_under_simulator` runs this file again in a subprocess
with ``NUMBA_ENABLE_CUDASIM=1`` (the simulator must be on before numba.cuda is first imported,
so it cannot share this process); there every ``@on_cuda`` test runs each kernel as Python.
The simulator starts one Python thread per CUDA thread, so shapes stay small. With a GPU the
same tests also run in this process, on the GPU.

Quantize, double quant and dequantize must match the CPU byte for byte; products match the
float64 product of the decoded weight within float32 summation error (k · 1.2e-7 · Σ|terms|).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qlora_np
from qlora_np import LoRALinear
from qlora_np.quant import codec as ops, backends
from qlora_np.quant.codebooks import dynamic_map, get_format
from qlora_np.errors import DeviceError, DTypeError, InvalidValueError, QLoraError, UnknownFormatError
from qlora_np.kernels import blockwise as cpu

ROOT = Path(__file__).resolve().parents[1]
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _cuda_status():
    """(numba.cuda imports, it sees a GPU or is simulating one)."""
    try:
        from numba import cuda
    except ImportError:
        return False, False
    return True, cuda.is_available()


HAS_NUMBA_CUDA, HAS_CUDA = _cuda_status()
on_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU: test_cuda_suite_under_simulator runs "
                                                  "these under the CUDA simulator")
# small shapes on purpose: on a real GPU numba would warn that their grids underuse it
pytestmark = pytest.mark.filterwarnings("ignore:Grid size")

FIELDS = ("packed", "absmax", "zero_point", "nested_absmax", "nested_code", "codebook")


@pytest.fixture(scope="module")
def gk():
    """:mod:`qlora_np.kernels.cuda.kernels`, imported only by the tests that run kernels."""
    from qlora_np.kernels.cuda import kernels as cuda
    return cuda


def _values(kind, n, seed=0):
    """(n,) float32 test values: "normal", or "edges" — zero runs, subnormals, codebook midpoints."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n).astype(np.float32)
    if kind == "edges":
        values[:64] = 0.0                                               # an all-zero block
        values[64:80] = np.float32(3e-39) * rng.integers(-3, 4, 16)     # subnormal-only values
        midpoints = get_format("nf4").midpoints
        values[80:95] = midpoints * np.float32(2.5)                     # exactly on midpoints …
        values[95] = np.float32(2.5)                                    # … of a block scaled by 2.5
        values[-3:] = np.float32(1e-3)
    return values


# (quant type, shape, blocksize, strategy, double_quant, values): every format, odd counts,
# partial last blocks, odd block sizes (13 per channel, 9 per tensor), edge values
QUANTIZE_CASES = [
    ("nf4", (7, 45), 64, "block", True, "normal"),
    ("nf4", (301,), 64, "block", False, "edges"),
    ("nf4", (5, 13), 6, "block", True, "normal"),
    ("nf4", (5, 13), None, "channel", True, "normal"),
    ("fp4", (4, 75), 32, "block", True, "edges"),
    ("fp4", (2, 9), None, "tensor", False, "normal"),
    ("int4", (257,), 64, "block", True, "normal"),
    ("int4_asym", (3, 61), 32, "block", True, "normal"),
    ("int4_asym", (301,), 64, "block", False, "edges"),
    ("int4_asym", (3, 13), None, "channel", False, "normal"),
]


def _quantize_both(quant_type, shape, blocksize, strategy, double_quant, kind):
    weight = _values(kind, int(np.prod(shape))).reshape(shape)
    args = (weight, quant_type, blocksize or 64, double_quant, strategy)
    return qlora_np.quantize(*args), qlora_np.quantize(*args, device="cuda")


@on_cuda
@pytest.mark.parametrize("case", QUANTIZE_CASES, ids=lambda case: "-".join(map(str, case)))
def test_quantize_and_dequantize_bytes_equal_cpu(case):
    on_cpu, on_gpu = _quantize_both(*case)
    assert on_gpu.device == "cuda" and on_cpu.device == "cpu"
    back = on_gpu.to("cpu")
    for field in FIELDS:
        expected, got = getattr(on_cpu, field), getattr(back, field)
        assert (expected is None) == (got is None), field
        if expected is not None:
            assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), field
    assert np.float32(on_gpu.offset or 0).tobytes() == np.float32(on_cpu.offset or 0).tobytes()
    decoded = qlora_np.dequantize(on_gpu)
    assert decoded.shape == on_cpu.shape
    assert decoded.copy_to_host().tobytes() == qlora_np.dequantize(on_cpu, dtype="float32").tobytes()


@on_cuda
@pytest.mark.parametrize("start, n", [(0, 100), (3, 61), (64, 128)])
def test_dequantize_from_an_offset_equals_cpu(gk, start, n):
    qt = qlora_np.quantize(_values("normal", 320), "nf4", 32)
    expected = cpu.dequantize_4bit(qt.packed, qt.absmax, None, n, 32, qt.codebook, start=start)
    on_gpu = qt.to("cuda")
    got = gk.dequantize_4bit(on_gpu.packed, on_gpu.absmax, None, n, 32, on_gpu.codebook, start=start)
    assert got.copy_to_host().tobytes() == expected.tobytes()


@on_cuda
@pytest.mark.parametrize("n", [1, 3, 8, 13, 100, 1000, 20_000])
def test_torch_mean_bits_equal_cpu(gk, n):
    # magnitudes over 6 decades make the summation order show in the last bits
    values = (np.random.default_rng(n).lognormal(0, 3, n)).astype(np.float32)
    assert gk.torch_mean_float32(values).tobytes() == cpu.torch_mean_float32(values).tobytes()


@on_cuda
@pytest.mark.parametrize("scales", [np.full(7, 0.25, np.float32)] + [
    np.random.default_rng(n).gamma(2.0, 0.1, n).astype(np.float32) for n in (1, 256, 257, 600)],
    ids=["equal", "1", "256", "257", "600"])
def test_double_quantize_bytes_equal_cpu(gk, scales):
    codes, nested_absmax, offset = cpu.double_quantize(scales)
    gpu_codes, gpu_nested, gpu_offset = gk.double_quantize(gk.to_device(scales))
    assert gpu_offset.tobytes() == offset.tobytes()
    assert gpu_codes.copy_to_host().tobytes() == codes.tobytes()
    assert gpu_nested.copy_to_host().tobytes() == nested_absmax.tobytes()
    nested_code = dynamic_map()
    decoded = gk.dequantize_absmax(gpu_codes, gpu_nested, offset, gk.to_device(nested_code), 256)
    expected = cpu.dequantize_absmax(codes, nested_absmax, offset, nested_code, 256)
    assert decoded.copy_to_host().tobytes() == expected.tobytes()


def _product_bound(left, right_abs, k):
    """Float32 summation error bound of left @ right for k terms a sum."""
    return k * 1.2e-7 * (np.abs(left) @ right_abs) + 1e-6


@on_cuda
@pytest.mark.parametrize("quant_type, double_quant, blocksize, rows", [
    ("nf4", True, 64, 1), ("int4_asym", False, 32, 3), ("fp4", False, 6, 8), ("nf4", True, 64, 11)])
def test_products_match_decoded_weight(quant_type, double_quant, blocksize, rows):
    """matmul = x @ W.T and matmul_t = g @ W: fused kernels up to 8 rows, tiled above."""
    out_features, in_features = 20, 40
    weight = _values("normal", out_features * in_features).reshape(out_features, in_features)
    qt = qlora_np.quantize(weight, quant_type, blocksize, double_quant)
    dense = qlora_np.dequantize(qt).astype(np.float64)                       # (out, in)
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    grad = rng.standard_normal((1, rows, out_features)).astype(np.float32)   # leading dims kept
    on_gpu = qt.to("cuda")
    y = qlora_np.matmul(x, on_gpu).copy_to_host()
    assert y.shape == (rows, out_features)
    assert np.all(np.abs(y - x @ dense.T) <= _product_bound(x, np.abs(dense).T, in_features))
    gx = qlora_np.matmul_t(grad, on_gpu).copy_to_host()
    assert gx.shape == (1, rows, in_features)
    assert np.all(np.abs(gx - grad @ dense) <= _product_bound(grad, np.abs(dense), out_features))
    assert qlora_np.matmul(np.zeros((0, in_features), np.float32), on_gpu).shape == (0, out_features)


@on_cuda
@pytest.mark.parametrize("mode", ["qlora", "lora"])
def test_lora_layer_on_gpu_matches_cpu(mode):
    """Forward, backward and every gradient (bias and dropout on) agree with the CPU layer."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((12, 32)).astype(np.float32)
    bias = rng.standard_normal(12).astype(np.float32)
    layers = [LoRALinear.from_weight(weight, bias, r=4, alpha=8, dropout=0.25, mode=mode, seed=5,
                                     train_bias=True) for _ in range(2)]
    for layer in layers:
        layer.lora_b[:] = np.random.default_rng(4).standard_normal(layer.lora_b.shape)
    on_cpu, on_gpu = layers[0], layers[1].to("cuda")
    assert on_gpu.device == "cuda"
    x = rng.standard_normal((2, 3, 32)).astype(np.float32)
    grad_y = rng.standard_normal((2, 3, 12)).astype(np.float32)
    y, y_gpu = on_cpu.forward(x), on_gpu.forward(x).copy_to_host()
    np.testing.assert_allclose(y_gpu, y, rtol=1e-4, atol=1e-5)
    grad_x, grad_x_gpu = on_cpu.backward(grad_y), on_gpu.backward(grad_y).copy_to_host()
    np.testing.assert_allclose(grad_x_gpu, grad_x, rtol=1e-4, atol=1e-5)
    on_gpu.to("cpu")
    for name, param in on_cpu.parameters().items():
        np.testing.assert_allclose(on_gpu.parameters()[name].grad, param.grad, rtol=1e-4, atol=1e-5)


@on_cuda
def test_lora_layer_on_gpu_recomputes_an_input_it_did_not_keep():
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((12, 32)).astype(np.float32)
    layers = [LoRALinear.from_weight(weight, r=4, dropout=0.25, seed=5) for _ in range(2)]
    for layer in layers:
        layer.lora_b[:] = np.random.default_rng(4).standard_normal(layer.lora_b.shape)
        layer.to("cuda").train()
    x = rng.standard_normal((2, 3, 32)).astype(np.float32)
    grad_y = rng.standard_normal((2, 3, 12)).astype(np.float32)
    layers[0].forward(x)
    layers[1].forward(x, keep_input=False)
    grads_x = [layers[0].backward(grad_y), layers[1].backward(grad_y, x=x)]
    np.testing.assert_array_equal(*(grad.copy_to_host() for grad in grads_x))
    for keeping, recomputing in zip(*(layer.to("cpu").parameters().values() for layer in layers)):
        np.testing.assert_array_equal(keeping.grad, recomputing.grad)


@on_cuda
def test_tensor_moves_between_devices_unchanged():
    qt = qlora_np.quantize(_values("normal", 4 * 64).reshape(4, 64), "nf4", 64, True)
    on_gpu = qt.to("cuda")
    assert on_gpu.to("cuda") is on_gpu and qt.to("cpu") is qt
    assert on_gpu.nbytes == qt.nbytes and repr(on_gpu) == repr(qt)
    state, state_from_gpu = qt.to_bnb(), on_gpu.to_bnb()
    assert state.keys() == state_from_gpu.keys()
    assert all(state[key].tobytes() == state_from_gpu[key].tobytes() for key in state)


@on_cuda
def test_quantize_a_device_array():
    from numba import cuda
    weight = _values("normal", 3 * 64).reshape(3, 64)
    on_gpu = qlora_np.quantize(cuda.to_device(weight), "fp4", 64)
    assert on_gpu.device == "cuda" and on_gpu.shape == (3, 64)
    assert on_gpu.to("cpu").packed.tobytes() == qlora_np.quantize(weight, "fp4", 64).packed.tobytes()
    with pytest.raises(DTypeError, match="float32 only"):
        qlora_np.quantize(cuda.to_device(weight.astype(np.float64)))


@on_cuda
def test_gpu_errors_name_the_problem():
    weight = _values("normal", 2 * 64).reshape(2, 64)
    weight[1, 5] = np.nan
    with pytest.raises(InvalidValueError, match="first at flat index 69"):
        qlora_np.quantize(weight, device="cuda")
    on_cpu = qlora_np.quantize(np.ones((2, 64), np.float32))
    on_gpu = on_cpu.to("cuda")
    with pytest.raises(DTypeError, match="gives float32"):
        qlora_np.dequantize(on_gpu, dtype="float16")
    with pytest.raises(DeviceError, match="on the GPU but the weight is on the CPU"):
        qlora_np.matmul(qlora_np.dequantize(on_gpu), on_cpu)
    with pytest.raises(UnknownFormatError, match="runs on the CPU"):
        backends.get_backend("reference", "cuda")
    layer = LoRALinear.from_weight(np.ones((2, 64), np.float32), r=2).to("cuda")
    with pytest.raises(DeviceError, match="merge runs on the CPU"):
        layer.merge()
    with pytest.raises(DTypeError, match="float32"):
        LoRALinear.from_weight(np.ones((2, 64)), r=2, dtype=np.float64).to("cuda")


def test_device_error_is_a_runtime_error_and_device_names_are_checked():
    assert issubclass(DeviceError, QLoraError) and issubclass(DeviceError, RuntimeError)
    weight = np.ones((2, 64), np.float32)
    with pytest.raises(UnknownFormatError, match="device must be one of"):
        qlora_np.quantize(weight, device="gpu")
    with pytest.raises(UnknownFormatError, match="device must be one of"):
        qlora_np.quantize(weight).to("tpu")
    with pytest.raises(UnknownFormatError, match="device must be one of"):
        LoRALinear.from_weight(weight, r=2).to("cuda:0")


@pytest.mark.skipif(HAS_CUDA, reason="a GPU (or the simulator) is present")
def test_cuda_without_a_gpu_raises_device_error():
    weight = np.ones((2, 64), np.float32)
    message = "no usable CUDA GPU" if HAS_NUMBA_CUDA else "needs numba.cuda"
    with pytest.raises(DeviceError, match=message):
        qlora_np.quantize(weight, device="cuda")
    with pytest.raises(DeviceError, match=message):
        qlora_np.quantize(weight).to("cuda")
    with pytest.raises(DeviceError, match=message):
        LoRALinear.from_weight(weight, r=2).to("cuda")


def test_library_works_without_numba_cuda():
    """With numba.cuda unimportable, the CPU path runs and "cuda" says what to install."""
    script = """if True:
        import sys
        sys.modules["numba.cuda"] = None             # as if neither numba-cuda nor numba's copy existed
        import numpy as np
        import qlora_np
        from qlora_np.errors import DeviceError
        qt = qlora_np.quantize(np.ones((2, 64), np.float32), double_quant=True)
        assert qlora_np.matmul(np.ones((1, 64), np.float32), qt).shape == (1, 2)
        try:
            qt.to("cuda")
        except DeviceError as error:
            assert "pip install 'qlora_np[cuda]'" in str(error), error
        else:
            raise AssertionError("moving to cuda without numba.cuda did not raise")
    """
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(SIMULATED, reason="this is the simulator run")
@pytest.mark.skipif(not HAS_NUMBA_CUDA, reason="numba.cuda is not installed (pip install '.[cuda]')")
def test_cuda_suite_under_simulator():
    """Every @on_cuda test above, in a subprocess with the CUDA simulator on."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", NUMBA_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " failed" not in result.stdout, report
