"""Timing on a shared, noisy machine: medians of calls that take turns.

A busy machine has slow spells. Timing A ten times and then B ten times lets a spell land on
one of them only; taking turns (A, B, then B, A, in a new order each round) spreads it over
both, and the median drops the outliers. So the lessons report ratios measured this way, and trust them more than the seconds.
On CUDA every timed call is synchronized before and after (``seconds``).
"""
import random
import statistics
import time

import torch


def synchronize() -> None:
    """Wait for queued CUDA kernels, if CUDA is in use: they run asynchronously, and a clock
    read without waiting would time how fast they are *launched*."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds(fn) -> float:
    """Wall-clock seconds of one call of fn(), including the device work it queued."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def _rounds(fns: dict, repeats: int, warmup: int, measure, seed: int = 0) -> dict:
    """{name: [measure(fn) for each timed round]}: `warmup` untimed rounds (first calls
    allocate memory and pick kernels), then `repeats` rounds, each visiting every fn once in a
    new order. In one fixed order each fn would always run right after the same other one, and
    what a call leaves behind (freed memory the next call must fault in again, a cache full of
    its own data) would always land on that same neighbour; a shuffled order spreads it. The
    shuffle is seeded, so a run can be repeated call for call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    shuffler, names = random.Random(seed), list(fns)
    results = {name: [] for name in fns}
    for _ in range(repeats):
        shuffler.shuffle(names)
        for name in names:
            results[name].append(measure(fns[name]))
    return results


def round_robin_medians(fns: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """{name: fn} -> {name: median seconds of fn()}, the fns taking turns."""
    times = _rounds(fns, repeats, warmup, seconds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def round_robin_phase_medians(steps: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """Like round_robin_medians for step functions that time their own phases: each fn()
    returns a dict of seconds (like memory.time_step). Returns name -> {phase: median}, the
    median being the middle value (the upper one of two for an even count)."""
    runs = _rounds(steps, repeats, warmup, lambda fn: fn())
    return {name: {key: sorted(r[key] for r in rs)[len(rs) // 2] for key in rs[0]}
            for name, rs in runs.items()}


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup` untimed ones."""
    return round_robin_medians({"fn": fn}, repeats, warmup)["fn"]
