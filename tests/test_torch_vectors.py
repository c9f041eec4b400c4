"""AdamW and LoRALinear against outputs recorded from PyTorch (tests/data/torch)."""

import pathlib

import numpy as np
import pytest

from qlora_np import LoRALinear, Parameter
from qlora_np.nn.optim import AdamW

TORCH_DIR = pathlib.Path(__file__).parent / "data" / "torch"


def _load(name):
    with np.load(TORCH_DIR / name) as data:
        return {key: data[key] for key in data.files}


def _ulps(a, b):
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adamw_follows_torch_over_60_steps(weight_decay):
    data = _load("adamw.npz")
    param = Parameter("w", data["initial"].copy())
    optimizer = AdamW([param], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    for grad, lr in zip(data["grads"], data["lrs"]):
        optimizer.lr = float(lr)
        param.grad = grad.copy()
        optimizer.step()
    key = f"wd{weight_decay}"
    state = optimizer.state["0.w"]
    # torch's vectorised sqrt is 1 ulp off IEEE for some values; everything else is
    # rounded as torch rounds, so the drift after 60 steps stays at a few ulp
    for ours, theirs in ((param.value, data[f"param_{key}"]), (state["exp_avg"], data[f"exp_avg_{key}"]),
                         (state["exp_avg_sq"], data[f"exp_avg_sq_{key}"])):
        assert ours.dtype == np.float32
        assert np.median(_ulps(ours, theirs)) == 0
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=1e-7)


def test_lora_linear_matches_torch_autograd():
    data = _load("lora_linear.npz")
    layer = LoRALinear(data["weight"], data["bias"].copy(), data["lora_a"].copy(), data["lora_b"].copy(),
                       alpha=int(data["alpha"]), mode="lora", train_bias=True)
    y = layer.forward(data["x"])
    grad_x = layer.backward(data["upstream"])
    for ours, key in ((y, "y"), (grad_x, "grad_x"), (layer.grad_lora_a, "grad_lora_a"),
                      (layer.grad_lora_b, "grad_lora_b"), (layer.grad_bias, "grad_bias")):
        assert ours.dtype == np.float32, key
        np.testing.assert_allclose(ours, data[key], rtol=1e-5, atol=1e-4 * np.abs(data[key]).max(), err_msg=key)
