"""Compiled kernels. ``blockwise`` (quantize / dequantize / double quant) mirrors
:mod:`qlora_np.quant.reference` name for name; ``products``, ``bf16``, ``low_rank`` and
``attention_bf16`` mirror :mod:`qlora_np.linalg.reference`. They build on ``portable/``
(plain Numba) and ``x86/`` (intrinsics); ``cuda/`` holds the GPU versions."""
