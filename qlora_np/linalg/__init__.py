"""Products with a packed 4-bit weight W: ``matmul`` (x @ W.T), ``matmul_t`` (g @ W), their
low-rank (LoRA) fusions, the plain-NumPy reference of each, and the plan that picks a kernel.
"""

from qlora_np.linalg.plan import explain
from qlora_np.linalg.products import matmul, matmul_t

__all__ = ["matmul", "matmul_t", "explain"]
