"""x86 building blocks written as Numba intrinsics (AVX2, AVX-512, AVX-512 BF16, AMX). Every
kernel that uses them has a portable twin giving the same bytes, chosen by
:mod:`qlora_np.kernels.features`."""
