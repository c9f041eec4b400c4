"""Compiled kernels: ``cpu`` (Numba, parallel) mirrors :mod:`qlora_np.reference` name for name."""
