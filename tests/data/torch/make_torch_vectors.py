"""Record PyTorch outputs that tests/test_torch_vectors.py compares against.

Run with torch installed (these files were made with torch 2.13.0+cpu on an AVX2 CPU):
    python tests/data/torch/make_torch_vectors.py
Writes adamw.npz and lora_linear.npz next to this script. qlora_np itself never imports torch.
"""

import pathlib

import numpy as np
import torch

HERE = pathlib.Path(__file__).parent
rng = np.random.default_rng(2026)

# AdamW: 60 steps on a (37, 29) float32 parameter, gradients over 5 decades, a warm-up lr
initial = rng.standard_normal((37, 29)).astype(np.float32)
grads = np.stack([rng.standard_normal((37, 29)).astype(np.float32) * np.float32(10.0 ** rng.integers(-3, 2))
                  for _ in range(60)])
lrs = np.array([1e-2 * min(1.0, (step + 1) / 10) for step in range(60)])
outputs = {}
for weight_decay in (0.0, 0.05):
    param = torch.tensor(initial.copy(), requires_grad=True)
    optimizer = torch.optim.AdamW([param], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    for grad, lr in zip(grads, lrs):
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
        param.grad = torch.tensor(grad)
        optimizer.step()
    state = optimizer.state[param]
    key = f"wd{weight_decay}"
    outputs[f"param_{key}"] = param.detach().numpy().copy()
    outputs[f"exp_avg_{key}"] = state["exp_avg"].numpy().copy()
    outputs[f"exp_avg_sq_{key}"] = state["exp_avg_sq"].numpy().copy()
np.savez(HERE / "adamw.npz", initial=initial, grads=grads, lrs=lrs, **outputs)

# A LoRA linear layer with bias and dropout off, differentiated by autograd
weight = rng.standard_normal((24, 40)).astype(np.float32)
bias = rng.standard_normal(24).astype(np.float32)
lora_a = rng.standard_normal((4, 40)).astype(np.float32)
lora_b = rng.standard_normal((24, 4)).astype(np.float32)
x = rng.standard_normal((3, 5, 40)).astype(np.float32)
upstream = rng.standard_normal((3, 5, 24)).astype(np.float32)
scale = 8 / 4
tx, ta, tb, tbias = (torch.tensor(v, requires_grad=True) for v in (x, lora_a, lora_b, bias))
y = tx @ torch.tensor(weight).T + tbias + scale * ((tx @ ta.T) @ tb.T)
(y * torch.tensor(upstream)).sum().backward()
np.savez(HERE / "lora_linear.npz", weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, x=x,
         upstream=upstream, alpha=8, y=y.detach().numpy(), grad_x=tx.grad.numpy(),
         grad_lora_a=ta.grad.numpy(), grad_lora_b=tb.grad.numpy(), grad_bias=tbias.grad.numpy(),
         torch_version=torch.__version__)
print("wrote", HERE / "adamw.npz", HERE / "lora_linear.npz")
