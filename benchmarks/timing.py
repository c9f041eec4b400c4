"""Shared by the benchmark scripts: wall-clock medians."""

import time

import numpy as np


def median_seconds(function, repeat):
    """Median wall time of ``repeat`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
