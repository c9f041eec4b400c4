"""Numba kernels with no instruction-set-specific code: the same source compiles to whatever
vector units the CPU has (LLVM picks the lanes)."""
