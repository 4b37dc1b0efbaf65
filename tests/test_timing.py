"""tiny_gpt/timing.py: the functions take turns, warm-up calls are not timed."""
import time

import pytest
import torch

from tiny_gpt.util.timing import median_seconds, pinned_threads, round_robin_medians


def test_functions_take_turns_and_warmup_rounds_come_first():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians = round_robin_medians(fns, repeats=12, warmup=2)
    assert calls[:6] == list("abc") * 2  # the untimed warm-up rounds
    rounds = [calls[i:i + 3] for i in range(6, len(calls), 3)]
    assert len(rounds) == 12 and all(sorted(r) == list("abc") for r in rounds)  # each once
    assert set(medians) == {"a", "b", "c"}


def test_the_order_changes_from_round_to_round_and_repeats_from_run_to_run():
    def visits():
        calls = []
        round_robin_medians({n: (lambda n=n: calls.append(n)) for n in "abc"}, 12, warmup=0)
        return calls
    calls = visits()
    assert calls == visits()  # seeded: the same order again
    followers = {(calls[i], calls[i + 1]) for i in range(len(calls) - 1)}
    assert all((x, y) in followers for x in "abc" for y in "abc" if x != y)  # each after each


def test_the_median_ignores_one_slow_call():
    delays = iter([0.3, 0.0, 0.3, 0.0, 0.0, 0.0])  # a slow warm-up call, then one outlier
    assert median_seconds(lambda: time.sleep(next(delays)), repeats=5, warmup=1) < 0.15


def test_ratio_spread_pairs_the_rounds():
    from tiny_gpt.util.timing import RatioSpread, ratio_spread
    # b is always twice a, but the machine slows down round by round: paired, the ratio is exact
    times = {"a": [1.0, 2.0, 3.0, 4.0, 5.0], "b": [2.0, 4.0, 6.0, 8.0, 10.0]}
    assert ratio_spread(times, "a", "b") == RatioSpread(0.5, 0.5, 0.5)
    # one ratio per round: [0.9, 1.0, 1.1, 1.2, 1.3] -> median 1.1, quartiles 0.95 and 1.25
    spread = ratio_spread({"a": [0.9, 1.0, 1.1, 1.2, 1.3], "b": [1.0] * 5}, "a", "b")
    assert abs(spread.median - 1.1) < 1e-12
    assert abs(spread.low - 0.95) < 1e-12 and abs(spread.high - 1.25) < 1e-12
    assert spread.at_most(1.3) is True and spread.at_most(0.9) is False
    assert spread.at_most(1.1) is None  # the middle half straddles the limit: cannot tell
    with pytest.raises(ValueError, match="at least 2 rounds"):
        ratio_spread({"a": [1.0], "b": [1.0]}, "a", "b")


def test_pinned_threads_sets_and_restores_the_thread_count_even_on_error():
    before = torch.get_num_threads()
    with pinned_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"):
        with pinned_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with pinned_threads(None):  # None: left as it is
        assert torch.get_num_threads() == before
