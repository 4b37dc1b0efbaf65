"""Timing on a shared, noisy machine: medians of calls that take turns.

A busy machine has slow spells. Timing A ten times and then B ten times lets a spell land on
one of them only; taking turns (A, B, A, B, ...) spreads it over both, and the median drops the
outliers. So the lessons report ratios measured this way, and trust them more than the seconds.
"""
import statistics
import time


def seconds(fn) -> float:
    """Wall-clock seconds of one call of fn()."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def round_robin_medians(fns: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """{name: fn} -> {name: median seconds of fn()}: `warmup` untimed rounds (first calls
    allocate memory and pick kernels), then `repeats` timed rounds, each calling every fn once."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup` untimed ones."""
    return round_robin_medians({"fn": fn}, repeats, warmup)["fn"]
