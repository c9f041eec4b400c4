"""qlora_np.runtime: freed activations stay in the heap (glibc), the user's settings win."""

import ctypes
import os
import resource

import numpy as np
import pytest

from qlora_np import runtime

GLIBC = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


STEP_SIZES = [3 * 1024 ** 2] * 40 + [600 * 1024] * 40
"""Activations of a made-up training step (bytes): 144 MiB in blocks below NumPy's 4 MiB
huge-page limit, as most of a real step's are."""


def _page_faults_of_a_step():
    """Minor page faults of a step that maps a large array (as the logits), allocates and
    touches STEP_SIZES, then frees it all. With glibc's adaptive defaults every such step
    faults most of its pages in anew."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    logits = np.ones(50 * 1024 ** 2 // 8)
    activations = [np.ones(size // 8) for size in STEP_SIZES]
    del activations, logits
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_later_steps_reuse_the_pages_freed():
    if any(name in os.environ for name in runtime.USER_SETTINGS):
        pytest.skip("the user's malloc settings are in force")
    assert runtime.keep_freed_memory()
    for _ in range(2):
        _page_faults_of_a_step()
    pages = sum(STEP_SIZES) // 4096
    assert _page_faults_of_a_step() < pages // 20


def test_the_users_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert runtime.keep_freed_memory() is False


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_settings_apply_on_glibc(monkeypatch):
    for name in runtime.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert runtime.keep_freed_memory() is True
