"""Plots every lesson draws the same way: a figure saved and closed, loss curves as moving
averages, heatmaps of values in [0, 1]. Lessons only ever save figures (no window opens)."""
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


@contextmanager
def saved_figure(path: Path, ncols: int = 1, figsize=(6.5, 3.8)):
    """``with saved_figure(path, ncols) as axes:`` draw on a row of ncols axes (one axis when
    ncols is 1); on leaving the block the figure is saved to `path` and closed."""
    plt = matplotlib_pyplot()
    fig, axes = plt.subplots(1, ncols, figsize=figsize)
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
