"""asv suite: one QLoRA training step (forward + backward + AdamW) against dense float32 NumPy."""

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")   # before NumPy: no BLAS thread hand-off stalls

import numpy as np  # noqa: E402

from qlora_np import LoRALinear  # noqa: E402
from qlora_np.nn.optim import AdamW  # noqa: E402


class TrainStep:
    """A 4096×4096 layer, rank 8, 1024 tokens (8 × 128), in each mode, compute dtype
    (bfloat16 acts on the 4-bit products only) and dropout."""

    params = (["qlora", "lora"], ["float32", "bfloat16"], [0.0, 0.05])
    param_names = ["mode", "compute_dtype", "dropout"]
    timeout = 300

    def setup(self, mode, compute_dtype, dropout):
        rng = np.random.default_rng(0)
        weight = (rng.standard_normal((4096, 4096)) * 0.02).astype(np.float32)
        self.x = rng.standard_normal((1024, 4096)).astype(np.float32)
        self.upstream = rng.standard_normal((1024, 4096)).astype(np.float32)
        self.layer = LoRALinear.from_weight(weight, r=8, alpha=16, dropout=dropout, mode=mode, seed=0)
        self.layer.compute_dtype = compute_dtype
        self.optimizer = AdamW(self.layer.parameters(), lr=1e-4)
        self.time_step(mode, compute_dtype, dropout)

    def time_step(self, mode, compute_dtype, dropout):
        self.layer.forward(self.x)
        self.layer.backward(self.upstream)
        self.optimizer.step()
        self.optimizer.zero_grad()
