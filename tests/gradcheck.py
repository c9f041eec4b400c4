"""Central finite differences, shared by the gradient tests."""

import numpy as np


def numeric_gradient(loss, array, eps=1e-6):
    """d loss() / d array by central differences, perturbing ``array`` in place one value at a time."""
    grad = np.zeros_like(array)
    flat, out = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        plus = loss()
        flat[i] = saved - eps
        minus = loss()
        flat[i] = saved
        out[i] = (plus - minus) / (2 * eps)
    return grad
