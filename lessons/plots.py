"""Plots every lesson draws the same way: a figure saved and closed, loss curves as moving
averages (one run per label, or every seed's run), numbers over seeds (mean, min-max whiskers)
next to the curves or along the steps of a run, heatmaps of values in [0, 1]. Lessons only ever
save figures (no window opens)."""
from contextlib import contextmanager
from pathlib import Path

import torch


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def matplotlib_pyplot():
    """pyplot with a non-interactive backend (lessons only ever save figures)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def moving_average(values, k: int) -> list:
    """Means of every k consecutive values: entry j is mean(values[j : j + k]), so there are
    len(values) - k + 1 of them (plot them at steps k .. len(values)). k is cut to the length."""
    t = torch.as_tensor(values, dtype=torch.float64)
    k = max(1, min(k, len(t)))
    return t.unfold(0, k, 1).mean(1).tolist()


def plot_loss_curves(ax, curves: dict, k: int = 10) -> None:
    """{label: training loss per step} -> their k-step moving averages on `ax` (log scale),
    each mean drawn at the last step it covers, so the curves start at step k. k is cut to the
    shortest curve; the curves take the colors C0, C1, ... in order."""
    k = max(1, min([k] + [len(v) for v in curves.values()]))
    for label, losses in curves.items():
        avg = moving_average(losses, k)
        ax.plot(range(len(losses) - len(avg) + 1, len(losses) + 1), avg, lw=1, label=str(label))
    ax.set(xlabel="step", ylabel=f"training loss ({k}-step mean)", yscale="log")
    ax.legend(fontsize=7)


def plot_seed_curves(ax, curves: dict, k: int, colors=None) -> None:
    """{label: [training loss per step, one list per seed]} -> every seed's k-step moving
    average (thin lines, one color per label: colors, default C0, C1, ...; one legend entry per
    label), each mean drawn at the last step it covers (log scale)."""
    colors = colors or [f"C{i}" for i in range(len(curves))]
    for color, (label, runs) in zip(colors, curves.items()):
        for i, losses in enumerate(runs):
            smooth = moving_average(losses, k)  # entry j: mean of steps j+1 .. j+k
            k_used = len(losses) - len(smooth) + 1
            ax.plot(range(k_used, len(losses) + 1), smooth, color=color, lw=0.8,
                    label=f"{label}, {len(runs)} seeds (mean of {k_used})" if i == 0 else None)
    ax.set(xlabel="step", yscale="log")
    ax.legend(fontsize=8)


def plot_spread_tracks(ax, steps, tracks: dict) -> None:
    """{label: [Spread at each of `steps`]} -> one line per label through the means over the
    seeds, whiskers from min to max at every step."""
    for label, spreads in tracks.items():
        ax.errorbar(steps, [v.mean for v in spreads], capsize=3, marker=".", label=label,
                    yerr=[[v.mean - v.lo for v in spreads], [v.hi - v.mean for v in spreads]])
    ax.set(xlabel="step")
    ax.legend(fontsize=8)


def plot_curves_and_spreads(path: Path, title: str, curves: dict, spreads: dict, ylabel: str,
                            scale: float = 1.0) -> None:
    """Left: one loss curve per recipe (plot_loss_curves; the first seed's run); right: one
    number per recipe over the seeds, {label: Spread} (lessons.seeds.errorbars, times scale)."""
    from lessons.seeds import errorbars
    with saved_figure(path, ncols=2, figsize=(12, 3.8)) as (left, right):
        plot_loss_curves(left, curves)
        left.set(title=f"{title} (first seed)")
        errorbars(right, list(spreads), list(spreads.values()), scale)
        right.set(ylabel=ylabel, title=f"{title}: {next(iter(spreads.values())).n} seeds")


def plot_grouped_bars(ax, groups: dict, colors, scale: float = 1.0) -> None:
    """{group: {series: value}} -> one cluster of bars per group (the series side by side, each
    in its color, labelled with its value times scale), one legend entry per series."""
    for i, values in enumerate(groups.values()):
        n = len(values)
        width = 0.8 / n  # the cluster spans 0.8 of the gap between groups
        bars = ax.bar([i + width * (k - (n - 1) / 2) for k in range(n)],
                      [scale * v for v in values.values()], width=width, color=colors)
        ax.bar_label(bars, [f"{scale * v:.2f}" for v in values.values()], fontsize=8)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.legend(bars, list(values))


@contextmanager
def saved_figure(path: Path, ncols: int = 1, figsize=(6.5, 3.8), **subplots):
    """``with saved_figure(path, ncols) as axes:`` draw on a row of ncols axes (one axis when
    ncols is 1; further options, such as width_ratios, go to plt.subplots); on leaving the block
    the figure is saved to `path` and closed."""
    plt = matplotlib_pyplot()
    fig, axes = plt.subplots(1, ncols, figsize=figsize, **subplots)
    try:
        yield axes
        save_figure(fig, path)
    finally:
        plt.close(fig)


def saved_heatmaps(path: Path, rows, title: str, label: str, width_ratios=None):
    """rows: [[(matrix (i, j), panel title), ...], ...] -> one heatmap per matrix, values 0..1,
    indexed from 1 as i (down) and j (across); one colorbar, saved to `path`."""
    plt = matplotlib_pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(15, 2.75 * len(rows)),
                             layout="constrained", squeeze=False,
                             gridspec_kw={"width_ratios": width_ratios})
    for ax_row, panels in zip(axes, rows):
        for ax, (m, panel_title) in zip(ax_row, panels):
            im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                           extent=(0.5, m.shape[1] + 0.5, m.shape[0] + 0.5, 0.5))
            ax.set(title=panel_title, xlabel="j", ylabel="i")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=axes.ravel().tolist(), label=label)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")
