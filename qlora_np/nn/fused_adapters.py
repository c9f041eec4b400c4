"""The bfloat16 fusion of a LoRA layer: its adapters ride along in W's one bfloat16 product.

:class:`~qlora_np.nn.lora.LoRALinear` computes y = x Wᵀ + b + s·dropout(x) Aᵀ Bᵀ step by step.
One case gets a faster way: a 4-bit W on the CPU, a float32 call and
``compute_dtype="bfloat16"``. There :func:`qlora_np.linalg.products.matmul_low_rank` works out
x Wᵀ + s·(x Aᵀ) Bᵀ as one bfloat16 product. It rounds x to bfloat16 pairs once, h = x Aᵀ comes
from those pairs, and h's pairs travel with x's through W's decoded panels. That replaces
three float32 passes over x and y. :func:`~qlora_np.linalg.products.matmul_t_low_rank` does the
same for the gradient: g W + (s·g B) A.

The layer asks :func:`rides_along` once per forward or backward call. When it says yes, the
layer calls :func:`forward` or :func:`backward` here in place of its own base and adapter
steps. Every other case uses the plain steps in :mod:`qlora_np.nn.lora`.
"""

from typing import NamedTuple

import numpy as np

from qlora_np.linalg.plan import compute_dtype_name
from qlora_np.linalg.products import matmul_low_rank, matmul_t_low_rank
from qlora_np.quant.tensor import QuantizedTensor


def rides_along(layer, dtype):
    """Whether this call of ``layer`` (computing in ``dtype``) multiplies its adapters inside
    W's bfloat16 product. That needs active adapters, a 4-bit W on the CPU, float32 and bfloat16 compute.

    The backward also needs no dropout mask: the mask sits between (s·g B) A and the gradient to x.
    So the backward asks ``keep is None and rides_along(...)``.
    """
    return (layer.has_adapters and not layer.merged and isinstance(layer.base, QuantizedTensor)
            and layer.device == "cpu" and dtype == np.float32
            and compute_dtype_name(layer.compute_dtype) == "bfloat16")


class FusedForward(NamedTuple):
    """What :func:`forward` gives back."""
    y: np.ndarray            # (rows, out) float32: x Wᵀ + s·hidden Bᵀ (no bias yet)
    hidden: np.ndarray       # (rows, r) float32: dropped Aᵀ, which B's gradient needs
    x_pairs: np.ndarray      # (rows, ≥ in/2) uint32: x's bfloat16 pairs if the product rounded x and
                             # no dropout changed it. A's gradient reads these (half the bytes of x).
                             # Otherwise None


def forward(layer, x, dropped, keep):
    """x Wᵀ + s·(dropped Aᵀ) Bᵀ as one bfloat16 product. x and dropped are (rows, in) float32;
    keep is the dropout mask, or None. The bias is not added here."""
    given = None if keep is None else dropped @ layer.lora_a.T            # (rows, r) from the dropped-out x
    y, hidden, x_pairs = matmul_low_rank(x, layer.base, layer.lora_a, layer.lora_b.T, layer.scale,
                                         layer.compute_dtype, h=given)
    return FusedForward(y, hidden, x_pairs if keep is None else None)


class FusedBackward(NamedTuple):
    """What :func:`backward` gives back."""
    grad_x: np.ndarray       # (rows, in) float32: g W + grad_hidden A
    grad_hidden: np.ndarray  # (rows, r) float32: s · g B
    g_for_b: np.ndarray      # what B's gradient multiplies: g's bfloat16 pairs (rows, ≥ out/2) uint32
                             # if the product rounded all of g, else g (rows, out)


def backward(layer, g, dtype):
    """The gradient to x of a call without dropout, g (rows, out) → :class:`FusedBackward`, with
    grad_hidden from the same bfloat16 product."""
    lora_a = layer.lora_a.astype(dtype, copy=False)                       # (r, in)
    lora_b = layer.lora_b.astype(dtype, copy=False)                       # (out, r)
    grad_x, g_b, g_pairs = matmul_t_low_rank(g, layer.base, lora_b.T, lora_a, layer.scale,
                                             layer.compute_dtype)
    return FusedBackward(grad_x, layer.scale * g_b, g if g_pairs is None else g_pairs)
