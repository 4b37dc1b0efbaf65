"""tiny_gpt/timing.py: the functions take turns, warm-up calls are not timed."""
import time

from tiny_gpt.util.timing import median_seconds, round_robin_medians


def test_functions_take_turns_and_warmup_rounds_come_first():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    medians = round_robin_medians(fns, repeats=3, warmup=2)
    assert calls == ["a", "b"] * 5
    assert set(medians) == {"a", "b"}


def test_the_median_ignores_one_slow_call():
    delays = iter([0.3, 0.0, 0.3, 0.0, 0.0, 0.0])  # a slow warm-up call, then one outlier
    assert median_seconds(lambda: time.sleep(next(delays)), repeats=5, warmup=1) < 0.15
