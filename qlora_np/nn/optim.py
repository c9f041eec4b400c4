"""AdamW, learning-rate schedules and gradient clipping, step for step as PyTorch does them.

Parameters are :class:`qlora_np.nn.lora.Parameter` objects (``.value``, ``.grad``), given
as a list or as a dict name → Parameter (a model's ``parameters()``), so state can be
saved by name.
"""

import math

import numpy as np

from qlora_np.errors import InvalidValueError, ShapeError, StateDictError


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``.

    One step for a parameter p with gradient g, at step t (from 1):

        p ← p · (1 − lr·weight_decay)
        m ← m + (1 − β1)(g − m)                  (torch's lerp form of β1·m + (1−β1)·g)
        v ← β2·v + (1 − β2)·g²
        p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps)

    Parameters whose ``grad`` is None are skipped (their step count does not advance).

    For float32 the rounding follows torch's CPU kernels: the m and v updates are fused
    multiply-adds (one rounding; computed here as an exact float64 product and sum
    rounded once), and the last update is p + (−step_size·m) / denom. torch's
    vectorised sqrt is not IEEE-rounded (1 ulp off for a sixth of values), so results
    agree with torch to about 1 ulp per step rather than bit for bit.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.params = _named(params)
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise InvalidValueError(f"lr, eps and weight_decay must be ≥ 0, "
                                    f"got {lr}, {eps}, {weight_decay}")
        if not all(0 <= beta < 1 for beta in betas) or len(betas) != 2:
            raise InvalidValueError(f"betas must be two numbers in [0, 1), got {betas}")
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.state = {}          # name → {"step": int, "exp_avg": array, "exp_avg_sq": array}

    def zero_grad(self):
        """Forget all gradients (the next backward starts from zero)."""
        for param in self.params.values():
            param.grad = None

    def step(self):
        """Update every parameter that has a gradient."""
        beta1, beta2 = self.betas
        for name, param in self.params.items():
            if param.grad is None:
                continue
            state = self.state.get(name)
            if state is None:
                state = self.state[name] = {"step": 0, "exp_avg": np.zeros_like(param.value),
                                            "exp_avg_sq": np.zeros_like(param.value)}
            dtype = param.value.dtype.type
            grad = param.grad
            state["step"] += 1
            t = state["step"]
            param.value *= dtype(1 - self.lr * self.weight_decay)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg[...] = _fused_multiply_add(dtype(1 - beta1), grad - exp_avg, exp_avg)
            exp_avg_sq *= dtype(beta2)
            exp_avg_sq[...] = _fused_multiply_add(dtype(1 - beta2) * grad, grad, exp_avg_sq)
            step_size = self.lr / (1 - beta1 ** t)
            denom = np.sqrt(exp_avg_sq) / dtype(math.sqrt(1 - beta2 ** t)) + dtype(self.eps)
            param.value += (dtype(-step_size) * exp_avg) / denom

    def state_dict(self):
        """Hyper-parameters and per-parameter moments as plain numbers and arrays (copies)."""
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay,
                "state": {name: {"step": s["step"], "exp_avg": s["exp_avg"].copy(),
                                 "exp_avg_sq": s["exp_avg_sq"].copy()}
                          for name, s in self.state.items()}}

    def load_state_dict(self, state_dict):
        """Restore :meth:`state_dict` output; moments must match the parameters' shapes."""
        missing = {"lr", "betas", "eps", "weight_decay", "state"} - set(state_dict)
        missing |= {f"state.{name}.{key}" for name, saved in state_dict.get("state", {}).items()
                    for key in ("step", "exp_avg", "exp_avg_sq") if key not in saved}
        if missing:
            raise StateDictError(f"optimizer state dict is missing {sorted(missing)}")
        state = {}
        for name, saved in state_dict["state"].items():
            if name not in self.params:
                raise ShapeError(f"optimizer state names unknown parameter {name!r}")
            shape = self.params[name].value.shape
            moments = {}
            for key in ("exp_avg", "exp_avg_sq"):
                array = np.asarray(saved[key])
                if array.shape != shape:
                    raise ShapeError(f"{name}.{key} must have shape {shape}, got {array.shape}")
                moments[key] = array.astype(self.params[name].value.dtype, copy=True)
            state[name] = {"step": int(saved["step"]), **moments}
        self.lr = float(state_dict["lr"])
        self.betas = tuple(float(b) for b in state_dict["betas"])
        self.eps = float(state_dict["eps"])
        self.weight_decay = float(state_dict["weight_decay"])
        self.state = state


def _fused_multiply_add(a, b, c):
    """a·b + c rounded once for float32 (the float64 product of two float32 is exact)."""
    if np.result_type(a, b, c) != np.float32:
        return a * b + c
    return (np.float64(a) * np.asarray(b, np.float64) + c).astype(np.float32)


def clip_grad_norm(params, max_norm):
    """Scale all gradients so their global L2 norm is at most ``max_norm``; returns the norm before.

    As torch.nn.utils.clip_grad_norm_: the factor is max_norm / (norm + 1e-6), capped at 1.
    """
    grads = [p.grad for p in _named(params).values() if p.grad is not None]
    total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads))
    factor = min(1.0, max_norm / (total + 1e-6))
    if factor < 1.0:
        for grad in grads:
            grad *= grad.dtype.type(factor)
    return total


# ---------------------------------------------------------------------------
# Learning-rate schedules: functions of the step index (0, 1, 2, …) → lr
# ---------------------------------------------------------------------------

def constant_schedule(lr):
    """The same lr at every step."""
    return lambda step: lr


def warmup_cosine_schedule(lr, warmup_steps, total_steps, min_lr=0.0):
    """Linear warm-up to ``lr`` over ``warmup_steps``, then a half cosine down to ``min_lr``."""
    return _warmup_then(lr, warmup_steps, total_steps, min_lr,
                        lambda progress: 0.5 * (1 + math.cos(math.pi * progress)))


def warmup_linear_schedule(lr, warmup_steps, total_steps, min_lr=0.0):
    """Linear warm-up to ``lr`` over ``warmup_steps``, then a straight line down to ``min_lr``."""
    return _warmup_then(lr, warmup_steps, total_steps, min_lr, lambda progress: 1 - progress)


def _warmup_then(lr, warmup_steps, total_steps, min_lr, decay):
    """Schedule: warm-up, then min_lr + (lr − min_lr)·decay(progress), progress 0 → 1 and held at 1.

    Warm-up is lr·(step + 1)/warmup_steps: it starts at lr/warmup_steps rather than 0,
    so the first step already trains, and reaches lr at step warmup_steps − 1.
    """
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise InvalidValueError(f"need 0 ≤ warmup_steps ≤ total_steps, got {warmup_steps}, {total_steps}")

    def schedule(step):
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr + (lr - min_lr) * decay(progress)
    return schedule


class LRScheduler:
    """Sets ``optimizer.lr`` from a schedule: call :meth:`step` once per optimizer step.

    The first lr is set on construction (step 0); each :meth:`step` moves to the next.
    """

    def __init__(self, optimizer, schedule):
        self.optimizer = optimizer
        self.schedule = schedule
        self.last_step = 0
        optimizer.lr = float(schedule(0))

    def step(self):
        """Move to the next step's lr (and return it)."""
        self.last_step += 1
        self.optimizer.lr = float(self.schedule(self.last_step))
        return self.optimizer.lr

    def state_dict(self):
        """The step reached, to resume the schedule where it was."""
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict):
        """Resume at the saved step (and set the optimizer's lr for it)."""
        self.last_step = int(state_dict["last_step"])
        self.optimizer.lr = float(self.schedule(self.last_step))


def _named(params):
    """A dict name → Parameter from a dict or a list of Parameters."""
    if isinstance(params, dict):
        return dict(params)
    named = {}
    for index, param in enumerate(params):
        named[f"{index}.{param.name}"] = param
    return named
