"""x86 building blocks written as Numba intrinsics (AVX2, AVX-512, AVX-512 BF16, AMX). Every
kernel that uses them has a portable twin giving the same bytes, chosen by
:mod:`qlora_np.kernels.features`.

The fused 4-bit products' intrinsics, in reading order: ``builder`` (IR types, the two
codebook decodes, lane orders, :func:`~qlora_np.kernels.x86.builder.decode_table`), ``dot``
(the gemv's dot and axpy rows), ``int8`` (the int8-activation dot rows), ``quantize_search``
(quantize by binary search), ``dequantize`` (whole blocks by the permute decode), ``panels``
(decode a panel, multiply it in register tiles); then ``amx`` (the AMX bfloat16 tiles)."""
