"""AdamW against a hand-computed sequence, state round trip, schedules and clipping."""

import math

import numpy as np
import pytest

from qlora_np import Parameter
from qlora_np.errors import InvalidValueError, ShapeError, StateDictError
from qlora_np.nn.optim import (AdamW, LRScheduler, clip_grad_norm, constant_schedule,
                               warmup_cosine_schedule, warmup_linear_schedule)


def test_adamw_matches_a_hand_computed_sequence():
    (b1, b2), eps, wd = (0.9, 0.99), 1e-8, 0.5
    param = Parameter("w", np.array([1.0, -2.0]))
    optimizer = AdamW([param], lr=0.1, betas=(b1, b2), eps=eps, weight_decay=wd)
    grads = [[0.5, -1.0], [0.1, 0.3], [-0.4, 0.0], [2.0, -0.25]]
    lrs = [0.1, 0.1, 0.05, 0.2]                               # lr may change between steps
    # by hand, one number at a time, in plain Python floats, as torch.optim.AdamW documents it
    p, m, v = [1.0, -2.0], [0.0, 0.0], [0.0, 0.0]
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        for i in range(2):
            p[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
            denom = math.sqrt(v[i]) / math.sqrt(1 - b2 ** t) + eps
            p[i] -= lr / (1 - b1 ** t) * m[i] / denom
        param.grad = np.array(g)
        optimizer.lr = lr
        optimizer.step()
        np.testing.assert_allclose(param.value, p, rtol=1e-14)
    np.testing.assert_allclose(optimizer.state["0.w"]["exp_avg"], m, rtol=1e-14)
    np.testing.assert_allclose(optimizer.state["0.w"]["exp_avg_sq"], v, rtol=1e-14)
    assert optimizer.state["0.w"]["step"] == 4


def test_parameters_without_gradient_are_skipped():
    a, b = Parameter("a", np.ones(3)), Parameter("b", np.ones(3))
    optimizer = AdamW({"a": a, "b": b}, lr=0.1)
    a.grad = np.ones(3)
    optimizer.step()
    assert np.all(b.value == 1) and "b" not in optimizer.state and optimizer.state["a"]["step"] == 1
    optimizer.zero_grad()
    assert a.grad is None


def test_state_dict_round_trip_resumes_identically():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(6)]

    def run(steps, optimizer, param):
        for g in steps:
            param.grad = g.copy()
            optimizer.step()

    straight = Parameter("w", np.ones((4, 3), np.float32))
    run(grads, AdamW({"w": straight}, lr=0.01), straight)

    resumed = Parameter("w", np.ones((4, 3), np.float32))
    first = AdamW({"w": resumed}, lr=0.01)
    run(grads[:3], first, resumed)
    saved = first.state_dict()
    second = AdamW({"w": resumed}, lr=0.5)            # lr comes back from the state
    second.load_state_dict(saved)
    assert second.lr == 0.01
    run(grads[3:], second, resumed)
    assert resumed.value.tobytes() == straight.value.tobytes()
    assert resumed.value.dtype == np.float32


def test_load_state_dict_checks_names_and_shapes():
    param = Parameter("w", np.ones(3))
    optimizer = AdamW({"w": param})
    param.grad = np.ones(3)
    optimizer.step()
    saved = optimizer.state_dict()
    with pytest.raises(ShapeError, match="unknown parameter 'w'"):
        AdamW({"v": param}).load_state_dict(saved)
    with pytest.raises(ShapeError, match=r"w.exp_avg must have shape \(4,\)"):
        AdamW({"w": Parameter("w", np.ones(4))}).load_state_dict(saved)
    with pytest.raises(InvalidValueError, match="betas"):
        AdamW({"w": param}, betas=(0.9, 1.0))
    del saved["state"]["w"]["exp_avg_sq"]
    with pytest.raises(StateDictError, match="state.w.exp_avg_sq"):
        AdamW({"w": param}).load_state_dict(saved)


def test_schedules():
    assert constant_schedule(0.3)(1000) == 0.3
    cosine = warmup_cosine_schedule(1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(10) == pytest.approx(1.0) and cosine(60) == pytest.approx(0.55)
    assert cosine(110) == pytest.approx(0.1) and cosine(500) == pytest.approx(0.1)
    linear = warmup_linear_schedule(2.0, warmup_steps=0, total_steps=100)
    assert linear(0) == 2.0 and linear(50) == pytest.approx(1.0) and linear(100) == 0.0
    with pytest.raises(InvalidValueError):
        warmup_linear_schedule(1.0, warmup_steps=20, total_steps=10)


def test_scheduler_sets_the_optimizer_lr_each_step_and_resumes():
    optimizer = AdamW([Parameter("w", np.zeros(1))], lr=123.0)
    scheduler = LRScheduler(optimizer, warmup_linear_schedule(1.0, warmup_steps=4, total_steps=8))
    seen = [optimizer.lr] + [scheduler.step() for _ in range(8)]
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert optimizer.lr == 0.0
    resumed = LRScheduler(optimizer, warmup_linear_schedule(1.0, warmup_steps=4, total_steps=8))
    resumed.load_state_dict({"last_step": 5})
    assert optimizer.lr == pytest.approx(0.75) and resumed.step() == pytest.approx(0.5)


def test_clip_grad_norm_scales_to_the_limit_like_torch():
    a, b = Parameter("a", np.zeros(2)), Parameter("b", np.zeros(1))
    a.grad, b.grad = np.array([3.0, 0.0]), np.array([4.0])
    total = clip_grad_norm([a, b], max_norm=1.0)
    assert total == pytest.approx(5.0)
    factor = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(a.grad, [3 * factor, 0])
    np.testing.assert_allclose(b.grad, [4 * factor])
    assert clip_grad_norm([a, b], max_norm=10.0) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(a.grad, [3 * factor, 0])       # under the limit: unchanged
