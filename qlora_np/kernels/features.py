"""Every CPU feature the kernels look for, and every ``QLORA_NP_*`` override, in one place.

The flags are read from LLVM's view of the host CPU once, when this module is imported
(``cpuid``; no system call). Python dispatch reads them from here at each call
(``features.HAS_AVX2``, not a copy), so a test that sets one here changes what runs.
Numba intrinsics choose their instructions when they are compiled; the Python code that
decides whether to call them reads these flags.

=================== =========================================== ==================== ============================
Flag                What it means                               Needs                Environment override
=================== =========================================== ==================== ============================
``HAS_AVX2``        the AVX2 drivers of the fused 4-bit         ``avx2``, ``fma``
                    products, quantize search and decode
``HAS_AVX512``      one ``vpermps`` looks up all 16 codebook    ``HAS_AVX2``,
                    entries; the low-rank register tile         ``avx512f``,
                                                                ``avx512vl``
``PERMUTE_DECODE``  the fused products decode with the permute  ``HAS_AVX512``       ``QLORA_NP_DECODE=shuffle``
                    (else the AVX2 byte shuffles)                                    turns it off
``HAS_AVX512_BF16`` the ``vdpbf16ps`` tiles of the bfloat16     ``HAS_AVX512``,
                    products                                    ``avx512bf16``
``HAS_AMX_BF16``    the CPU has AMX BF16 tiles                  ``amx-tile``,
                                                                ``amx-bf16``
``USE_AMX``         the bfloat16 products multiply with the     ``HAS_AMX_BF16``     ``QLORA_NP_AMX=0`` turns
                    AMX tiles where :func:`amx_permitted`                            it off
=================== =========================================== ==================== ============================

Linux lets a process use the AMX tiles only once it asks for their state
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``). :func:`amx_permitted` asks the
first time an AMX kernel is about to run and remembers the answer, so importing the
package makes no such call.
"""

import ctypes
import os
import platform
import sys
from functools import lru_cache

import llvmlite.binding as llvm

_HOST = llvm.get_host_cpu_features()

HAS_AVX2 = bool(_HOST.get("avx2", False) and _HOST.get("fma", False))
"""Whether this CPU runs the AVX2 drivers (AVX2 and FMA)."""

HAS_AVX512 = bool(HAS_AVX2 and _HOST.get("avx512f", False) and _HOST.get("avx512vl", False))
"""Whether this CPU can look up all 16 codebook entries with one permute (AVX-512F/VL ``vpermps``)."""

PERMUTE_DECODE = HAS_AVX512 and os.environ.get("QLORA_NP_DECODE", "") != "shuffle"
"""Whether the fused products decode with the permute (``QLORA_NP_DECODE=shuffle``, or setting
this False, picks the AVX2 byte shuffles)."""

HAS_AVX512_BF16 = bool(HAS_AVX512 and _HOST.get("avx512bf16", False))
"""Whether this CPU multiplies bfloat16 pairs with ``vdpbf16ps``."""

HAS_AMX_BF16 = bool(_HOST.get("amx-tile", False) and _HOST.get("amx-bf16", False))
"""Whether this CPU has AMX BF16 tiles (the process may still be refused them: :func:`amx_permitted`)."""

USE_AMX = HAS_AMX_BF16 and os.environ.get("QLORA_NP_AMX", "") != "0"
"""Whether the bfloat16 products multiply with the AMX tiles where :func:`amx_permitted`
(``QLORA_NP_AMX=0``, or setting this False, keeps the AVX-512 tile)."""

_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158


@lru_cache(maxsize=1)
def amx_permitted():
    """Whether Linux lets this process use the AMX tile state: asked once, on the first call;
    False where that is refused, the CPU has no AMX BF16, or this is not Linux on x86-64."""
    if not HAS_AMX_BF16 or sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False

