"""The seed harness of the lessons (lessons/seeds.py): its t table, its intervals and the verdicts
read from them."""
import math

import pytest
import torch

from lessons.seeds import (T_975, Spread, compare, over_seeds, paired_interval, rank,
                           t_quantile, within)


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 30])
def test_t_table_matches_the_student_t_distribution(df):
    # P(T <= t(0.975, df)) = 0.975: integrate torch's Student-t density from 0 to the tabled
    # quantile (the density is symmetric, so that half must hold 0.475).
    t = T_975[df - 1]
    grid = torch.linspace(0, t, 200_001, dtype=torch.float64)
    density = torch.distributions.StudentT(torch.tensor(float(df), dtype=torch.float64)) \
        .log_prob(grid).exp()
    assert torch.trapezoid(density, grid).item() == pytest.approx(0.475, abs=2e-5)


def test_t_beyond_the_table_is_its_last_entry_and_df_0_is_refused():
    assert t_quantile(100) == T_975[-1]
    with pytest.raises(ValueError, match="at least 2 values"):
        t_quantile(0)


def test_spread_mean_min_max_and_its_text():
    s = Spread((0.94, 0.97, 0.95))
    assert (s.n, s.lo, s.hi) == (3, 0.94, 0.97) and s.mean == pytest.approx(0.95333, abs=1e-5)
    assert s.percent() == "95.3% [94.0, 97.0] n=3"
    assert Spread((0.5,)).percent() == "50.0% (n=1)"
    with pytest.raises(ValueError):
        Spread(())


def test_paired_interval_by_hand():
    a, b = Spread((0.90, 0.95, 0.92)), Spread((0.85, 0.91, 0.86))
    # the differences are 0.05, 0.04, 0.06: mean 0.05, sd 0.01
    ci = paired_interval(a, b)
    half = 4.303 * 0.01 / math.sqrt(3)
    assert ci.mean == pytest.approx(0.05)
    assert (ci.lo, ci.hi) == (pytest.approx(0.05 - half), pytest.approx(0.05 + half))
    with pytest.raises(ValueError, match="same seeds"):
        paired_interval(a, Spread((0.1, 0.2)))


def test_compare_says_higher_only_when_the_interval_excludes_zero():
    steady = compare(Spread((0.90, 0.95, 0.92)), Spread((0.85, 0.91, 0.86)), "A", "B")
    assert steady.holds is True and steady.text.startswith("A higher than B")
    flipped = compare(Spread((0.85, 0.91, 0.86)), Spread((0.90, 0.95, 0.92)), "A", "B")
    assert flipped.holds is False
    # the same means, but one seed disagrees: the interval holds 0
    noisy = compare(Spread((0.97, 0.99, 0.80)), Spread((0.85, 0.91, 0.86)), "A", "B")
    assert noisy.holds is None and "no difference measurable" in noisy.text
    # one seed: never a verdict
    assert compare(Spread((0.9,)), Spread((0.1,)), "A", "B").holds is None


def test_within_needs_the_whole_interval_inside_the_margin():
    close = within(Spread((0.95, 0.96, 0.94)), Spread((0.955, 0.955, 0.945)), 0.03, "Q", "L")
    assert close.holds is True
    far = within(Spread((0.80, 0.81, 0.79)), Spread((0.95, 0.96, 0.94)), 0.03, "Q", "L")
    assert far.holds is False
    wide = within(Spread((0.99, 0.90, 0.95)), Spread((0.95, 0.95, 0.95)), 0.03, "Q", "L")
    assert wide.holds is None and "cannot tell" in wide.text


def test_over_seeds_keeps_the_seed_order_and_rank_names_the_best():
    spreads = over_seeds([0, 1, 2], lambda s: {"a": 0.9 + 0.01 * s, "b": 0.5 + 0.02 * s})
    assert spreads["a"].values == (0.9, 0.91, 0.92)
    lines = rank(spreads)
    assert len(lines) == 1 and lines[0].startswith("a higher than b")
