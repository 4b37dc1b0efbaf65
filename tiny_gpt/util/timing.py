"""Timing on a shared, noisy machine: medians of calls that take turns.

A busy machine has slow spells. Timing A ten times and then B ten times lets a spell land on
one of them only; taking turns (A, B, then B, A, in a new order each round) spreads it over
both, and the median drops the outliers. So the lessons report ratios measured this way, and
trust them more than the seconds; ratio_spread reads a ratio round by round, with its spread.
On CUDA every timed call is synchronized before and after (``seconds``).
"""
import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

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


def round_robin_times(fns: dict, repeats: int = 5, warmup: int = 1, measure=seconds,
                      seed: int = 0) -> dict:
    """{name: [measure(fn) for each timed round]}: `warmup` untimed rounds (first calls
    allocate memory and pick kernels), then `repeats` rounds, each visiting every fn once in a
    new order. In one fixed order each fn would always run right after the same other one, and
    what a call leaves behind (freed memory the next call must fault in again, a cache full of
    its own data) would always land on that same neighbour; a shuffled order spreads it. The
    shuffle is seeded, so a run can be repeated call for call. `measure` is `seconds`, or for
    a fn that times itself, e.g. `lambda fn: fn()["total"]`."""
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


def medians(times: dict) -> dict:
    """{name: [values]} -> {name: their median}."""
    return {name: statistics.median(values) for name, values in times.items()}


def round_robin_medians(fns: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """{name: fn} -> {name: median seconds of fn()}, the fns taking turns."""
    return medians(round_robin_times(fns, repeats, warmup))


def round_robin_phase_medians(steps: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """Like round_robin_medians for step functions that time their own phases: each fn()
    returns a dict of seconds (like memory.time_step). Returns name -> {phase: median}, the
    median being the middle value (the upper one of two for an even count)."""
    runs = round_robin_times(steps, repeats, warmup, measure=lambda fn: fn())
    return {name: {key: sorted(r[key] for r in rs)[len(rs) // 2] for key in rs[0]}
            for name, rs in runs.items()}


@dataclass(frozen=True)
class RatioSpread:
    """A ratio of two timings from the rounds of one run: its median and the middle half."""
    median: float
    low: float   # first quartile of the per-round ratios
    high: float  # third quartile

    def at_most(self, limit):
        """True if even the upper quartile is within `limit`, False if even the lower one is
        above it, None when the middle half straddles it: this run cannot tell."""
        if self.high <= limit:
            return True
        return False if self.low > limit else None

    def __str__(self):
        return f"{self.median:.3f}x [{self.low:.3f}, {self.high:.3f}]"


def ratio_spread(times: dict, numerator: str, denominator: str) -> RatioSpread:
    """times[numerator][i] / times[denominator][i] for every round i of round_robin_times: the
    two ran in the same round, close together in time, so a slow spell of the machine that
    lasts a round slows both, and the round's ratio keeps what the code does. -> their median
    and quartiles: how far apart the rounds of this run put the ratio."""
    ratios = [a / b for a, b in zip(times[numerator], times[denominator])]
    if len(ratios) < 2:
        raise ValueError(f"ratio_spread needs at least 2 rounds, got {len(ratios)}")
    low, _, high = statistics.quantiles(ratios, n=4)
    return RatioSpread(statistics.median(ratios), low, high)


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup` untimed ones."""
    return round_robin_medians({"fn": fn}, repeats, warmup)["fn"]


@contextmanager
def pinned_threads(n=None):
    """``with pinned_threads(2):`` run the block on n intra-op CPU threads (None: leave them
    as they are); torch's thread count comes back afterwards, even if the block raised."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)
