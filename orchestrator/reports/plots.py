"""PNG plots for the reports: one matplotlib set-up (the Agg backend, no display), figures as bytes written
atomically by the caller."""

from __future__ import annotations

import io


def subplots(ncols: int = 1, figsize: tuple[float, float] = (7, 3.6)):
    """A figure and its axes (a list of ``ncols``) on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, dpi=110, squeeze=False)
    return fig, list(axes[0])


def figure_png(fig) -> bytes:
    """A finished matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def draw_lines(ax, series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
               log_y: bool = False, bold: str | None = None) -> None:
    """Each named series of (x, y) points as a line on ``ax`` (``bold``: the one to draw thicker)."""
    for name, pts in series.items():
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=name,
                    linewidth=2.5 if name == bold else 1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if any(series.values()):
        ax.legend(fontsize=7 if len(series) > 4 else None)


def line_plot(series: dict[str, list[tuple[float, float]]], title: str, ylabel: str, xlabel: str = "optimizer step",
              log_y: bool = False, bold: str | None = None, figsize: tuple[float, float] = (7, 3.6)) -> bytes:
    """One panel of named series as PNG bytes."""
    fig, (ax,) = subplots(1, figsize)
    draw_lines(ax, series, title, xlabel, ylabel, log_y, bold)
    return figure_png(fig)
