"""asv suite: one QLoRA training step (forward + backward + AdamW) against dense float32 NumPy."""

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")   # before NumPy: no BLAS thread hand-off stalls

import numpy as np  # noqa: E402

from qlora_np import LoRALinear  # noqa: E402
from qlora_np.optim import AdamW  # noqa: E402


class TrainStep:
    """A 4096×4096 layer, rank 8, 1024 tokens (8 × 128), in each mode."""

    params = ["qlora", "lora"]
    param_names = ["mode"]
    timeout = 300

    def setup(self, mode):
        rng = np.random.default_rng(0)
        weight = (rng.standard_normal((4096, 4096)) * 0.02).astype(np.float32)
        self.x = rng.standard_normal((1024, 4096)).astype(np.float32)
        self.upstream = rng.standard_normal((1024, 4096)).astype(np.float32)
        self.layer = LoRALinear.from_weight(weight, r=8, alpha=16, mode=mode, seed=0)
        self.optimizer = AdamW(self.layer.parameters(), lr=1e-4)
        self.time_step(mode)

    def time_step(self, mode):
        self.layer.forward(self.x)
        self.layer.backward(self.upstream)
        self.optimizer.step()
        self.optimizer.zero_grad()
