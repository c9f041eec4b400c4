"""Process settings that make the kernels fast, applied only when asked: :func:`configure`.

Nothing here runs on ``import qlora_np``: the ``qlora-np`` command and the benchmarks call
:func:`configure` first thing, and a program of your own can do the same (before it imports
NumPy, so that OpenBLAS reads its setting). Each setting a user already made wins.

**Threads.** Training alternates Numba kernels and NumPy (BLAS) calls hundreds of times a
step, on the same cores. After each call OpenBLAS's threads spin for a long while and hold
those cores; ``OPENBLAS_THREAD_TIMEOUT=1`` makes them sleep at once. The other way round,
Numba's OpenMP threads (GNU libgomp) spin ``GOMP_SPINCOUNT`` rounds before they sleep: a
spinning thread holds a core through the BLAS call that follows, while a sleeping one is
slow to wake for the next kernel (a bfloat16 step launches about 1,500). 30,000 rounds is
the balance between the two; benchmarks/README.md has the measurements behind it.

**Allocator** (glibc only). A training step allocates its activations (hundreds of MB for a
small model at 1024 tokens) and frees them all at its end. With glibc's default, adaptive
settings most of those pages go back to the OS and the next step faults them in again,
zeroed, paying system time for every page. Fixing the two thresholds below keeps them in
the heap at the same peak RSS.
"""

import ctypes
import os

THREAD_SETTINGS = {"OPENBLAS_THREAD_TIMEOUT": "1", "GOMP_SPINCOUNT": "30000"}
"""Environment variables :func:`configure` sets unless the user set them (see above)."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3        # glibc's mallopt parameters (malloc.h)

MMAP_THRESHOLD = 32 * 1024 ** 2
"""Allocations from this size on get their own mapping (and go back to the OS when
freed); smaller ones come from the heap. 32 MiB is the top of the range glibc's
adaptive threshold moves in; fixing it keeps every block an activation reuses in
the heap."""

TRIM_THRESHOLD = 256 * 1024 ** 2
"""How much free memory the heap may keep at its top before returning it (glibc's
adaptive default is twice the mmap threshold, so a step's worth was returned)."""

configured = None
"""What :func:`configure` applied, by name (as it returns it); None until it has run, so a test
can see that importing the package applied nothing."""

USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
"""glibc's environment variables for the same settings: when the user set one, their
choice stands and nothing is changed."""


def keep_freed_memory():
    """Set glibc's mmap and trim thresholds as above; True if they were set.

    Does nothing (False) on a C library other than glibc or when the user set one of
    USER_SETTINGS. :func:`configure` calls it.
    """
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def configure():
    """Apply the thread and allocator settings above; returns what was set, by name.

    OpenBLAS reads its setting when NumPy loads it, libgomp when the first parallel kernel
    runs: call this before either (the ``qlora-np`` command does it before anything else).
    """
    global configured
    applied = {}
    for name, value in THREAD_SETTINGS.items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    applied["malloc thresholds"] = keep_freed_memory()
    configured = applied
    return applied
