"""Keep freed memory for reuse instead of handing it back to the OS (glibc only).

A training step allocates its activations (~700 MB for SmolLM2-135M at 1024 tokens)
and frees them all at its end. With glibc's default, adaptive settings most of those
pages go back to the OS and the next step faults them in again, zeroed: ~170,000 page
faults and ~0.4 s of system time a step. Fixing the two thresholds below keeps them
in the heap (~600 faults a step) at the same peak RSS.
"""

import ctypes
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3        # glibc's mallopt parameters (malloc.h)

MMAP_THRESHOLD = 32 * 1024 ** 2
"""Allocations from this size on get their own mapping (and go back to the OS when
freed); smaller ones come from the heap. 32 MiB is the top of the range glibc's
adaptive threshold moves in; fixing it keeps every block an activation reuses in
the heap."""

TRIM_THRESHOLD = 256 * 1024 ** 2
"""How much free memory the heap may keep at its top before returning it (glibc's
adaptive default is twice the mmap threshold, so a step's worth was returned)."""

USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
"""glibc's environment variables for the same settings: when the user set one, their
choice stands and nothing is changed."""


def keep_freed_memory():
    """Set glibc's mmap and trim thresholds as above; True if they were set.

    Does nothing (False) on a C library other than glibc or when the user set one of
    USER_SETTINGS. ``import qlora_np`` calls it.
    """
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
