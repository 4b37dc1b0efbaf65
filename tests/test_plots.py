"""lessons/plots.py: the plots every lesson draws the same way, read back from the axes."""
import pytest

from lessons.plots import (matplotlib_pyplot, moving_average, plot_curves_and_spreads,
                           plot_grouped_bars, plot_seed_curves, plot_spread_tracks)
from lessons.seeds import Spread


@pytest.fixture
def ax():
    plt = matplotlib_pyplot()
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def test_moving_average_is_the_mean_of_every_k_consecutive_values():
    assert moving_average([1, 2, 3, 4, 6], 2) == [1.5, 2.5, 3.5, 5.0]


def test_seed_curves_draw_every_seed_at_the_last_step_each_mean_covers(ax):
    curves = {"LoRA": [[8, 4, 2, 1], [4, 4, 4, 4]], "QLoRA": [[1, 1, 1, 1]]}
    plot_seed_curves(ax, curves, k=2)
    lines = ax.get_lines()
    assert len(lines) == 3  # one per seed
    assert list(lines[0].get_xdata()) == [2, 3, 4] and list(lines[0].get_ydata()) == [6, 3, 1.5]
    assert [line.get_color() for line in lines] == ["C0", "C0", "C1"]  # one color per label
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "LoRA, 2 seeds (mean of 2)", "QLoRA, 1 seeds (mean of 2)"]


def test_spread_tracks_put_the_mean_at_each_step_with_min_max_whiskers(ax):
    plot_spread_tracks(ax, [0, 10], {"lora": [Spread((1.0, 3.0)), Spread((4.0, 5.0, 9.0))]})
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [0, 10] and list(line.get_ydata()) == [2.0, 6.0]
    (whiskers,) = ax.collections  # the vertical bars: segments from lo to hi at each step
    assert [tuple(seg[:, 1]) for seg in whiskers.get_segments()] == [(1.0, 3.0), (4.0, 9.0)]


def test_grouped_bars_center_each_cluster_on_its_group_and_scale_the_values(ax):
    plot_grouped_bars(ax, {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 4}}, ["C0", "C1"], 10.0)
    bars = ax.patches
    assert [b.get_height() for b in bars] == [10, 20, 30, 40]
    centers = [b.get_x() + b.get_width() / 2 for b in bars]
    assert centers == pytest.approx([-0.2, 0.2, 0.8, 1.2])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["x", "y"]


def test_curves_and_spreads_save_one_figure(tmp_path, capsys):
    path = tmp_path / "runs.png"
    plot_curves_and_spreads(path, "t", {"a": [3.0, 2.0, 1.0]},
                            {"a": Spread((1.0, 2.0)), "b": Spread((2.0, 2.0))}, "loss")
    assert path.stat().st_size > 0 and f"saved {path}" in capsys.readouterr().out
