"""Shared by the benchmark scripts: wall-clock medians."""

import time

import numpy as np


def median_seconds(function, repeat):
    """Median wall time of ``repeat`` calls after one warm-up call."""
    return interleaved_medians([function], repeat, rounds=1)[0]


def interleaved_medians(functions, repeat, rounds=5):
    """Median wall time of each function over ``repeat`` calls, taken in ``rounds`` rounds.

    Each round times a few calls of every function in turn (after one untimed call, so a
    round does not pay for the previous function's threads winding down). On a shared
    machine with slow spells lasting seconds, this puts an operation and its baseline in
    the same spells, so their ratio is fair even when both times drift.
    """
    per_round = max(1, repeat // rounds)
    times = [[] for _ in functions]
    for _ in range(rounds):
        for function, samples in zip(functions, times):
            function()
            for _ in range(per_round):
                start = time.perf_counter()
                function()
                samples.append(time.perf_counter() - start)
    return [float(np.median(samples)) for samples in times]
