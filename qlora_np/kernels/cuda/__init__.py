"""numba.cuda kernels (``kernels``), imported only when a tensor goes to "cuda", and ``device``:
whether an array lives on a GPU, asked without importing numba.cuda."""
