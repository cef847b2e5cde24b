"""PNG plots for kd.report: heatmaps, accuracy against model size, training curves (matplotlib, Agg)."""
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kd import fileio  # noqa: E402


@dataclass
class Heatmap:
    """One panel: a matrix of means (nan where no run) with its row and column labels."""

    title: str
    row_labels: list[str]
    col_labels: list[str]
    values: np.ndarray


@dataclass
class Series:
    """One line: y (mean) and its spread (sample std, nan for one run) against x."""

    label: str
    x: np.ndarray
    y: np.ndarray
    spread: np.ndarray
    dashed: bool = False


def heatmaps(
    panels: Sequence[Heatmap], row_name: str, col_name: str, path: Path, label: str = "test top-1 (%)"
) -> Path:
    """Annotated heatmaps side by side, sharing one colour scale."""
    finite = np.concatenate([p.values[np.isfinite(p.values)] for p in panels])
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 3.4 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        image = ax.imshow(panel.values, cmap="viridis", vmin=low, vmax=high, aspect="auto")
        ax.set(xticks=range(len(panel.col_labels)), xticklabels=panel.col_labels, xlabel=col_name,
               yticks=range(len(panel.row_labels)), yticklabels=panel.row_labels, title=panel.title)
        for (i, j), value in np.ndenumerate(panel.values):
            if math.isfinite(value):
                dark = value < (low + high) / 2
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white" if dark else "black")
    axes[0][0].set_ylabel(row_name)
    fig.colorbar(image, ax=axes[0].tolist(), label=label)
    return save(fig, path)


def lines(series: Sequence[Series], xlabel: str, ylabel: str, path: Path, log_x: bool = False) -> Path:
    """Mean ± std against x: error bars at each point, one line per series."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in series:
        yerr = np.where(np.isfinite(s.spread), s.spread, 0.0)
        ax.errorbar(s.x, s.y, yerr=yerr, marker="o", capsize=3, linestyle="--" if s.dashed else "-", label=s.label)
    if log_x:
        ax.set_xscale("log")
    return finish(fig, ax, xlabel, ylabel, path)


def bands(series: Sequence[Series], xlabel: str, ylabel: str, path: Path) -> Path:
    """Mean lines with a ± std band (no band for a single run)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in series:
        (line,) = ax.plot(s.x, s.y, marker=".", linestyle="--" if s.dashed else "-", label=s.label)
        if np.isfinite(s.spread).all():
            ax.fill_between(s.x, s.y - s.spread, s.y + s.spread, color=line.get_color(), alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return finish(fig, ax, xlabel, ylabel, path)


def finish(fig: plt.Figure, ax: plt.Axes, xlabel: str, ylabel: str, path: Path) -> Path:
    """Labels, grid, the legend outside the axes (it would hide lines), then save."""
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return save(fig, path)


def save(fig: plt.Figure, path: Path) -> Path:
    """The figure in `path`'s format, written atomically (a reader sees the old file or the new one)."""
    image = io.BytesIO()
    fig.savefig(image, format=path.suffix.lstrip("."), dpi=120, bbox_inches="tight")
    plt.close(fig)
    fileio.atomic_write_bytes(path, image.getvalue())
    return path
