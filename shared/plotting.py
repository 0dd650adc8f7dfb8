"""One matplotlib style for every notebook, and the few plot helpers several notebooks need."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np

STYLE = {
    "figure.figsize": (7.0, 4.0),
    "figure.dpi": 90,
    "savefig.dpi": 90,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.cmap": "viridis",
}


def use_style() -> None:
    """Readable sizes and a moderate DPI, so notebooks stay small and plots render on GitHub."""
    matplotlib.rcParams.update(STYLE)


def heatmap(ax, matrix, xlabels: Sequence[str] | None = None, ylabels: Sequence[str] | None = None, *,
            title: str = "", cmap: str = "viridis", vmin=None, vmax=None, colorbar: bool = True,
            xlabel: str = "", ylabel: str = "", label_size: int = 7):
    """Draw a 2-D array as an image with optional token labels on both axes. Returns the image artist."""
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu()                 # a torch tensor may live on the GPU
    data = np.asarray(matrix, dtype=float)
    if data.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D matrix, got shape {data.shape}")
    if xlabels is not None and len(xlabels) != data.shape[1]:
        raise ValueError(f"xlabels has {len(xlabels)} entries, matrix has {data.shape[1]} columns")
    if ylabels is not None and len(ylabels) != data.shape[0]:
        raise ValueError(f"ylabels has {len(ylabels)} entries, matrix has {data.shape[0]} rows")
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), list(xlabels), rotation=90, fontsize=label_size)
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), list(ylabels), fontsize=label_size)
    ax.grid(False)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return im


def loglog_fit(ax, x, y, label: str = "", *, marker: str = "o", color=None) -> tuple[float, float]:
    """Scatter y against x on log-log axes with the least-squares line log y = slope*log x + intercept.

    Returns (slope, intercept) in natural-log units, so y ≈ exp(intercept) * x**slope.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"x and y must be 1-D of equal length >= 2, got {x.shape} and {y.shape}")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("loglog_fit needs strictly positive x and y")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    points = ax.plot(x, y, marker, color=color, label=label)[0]
    grid = np.geomspace(x.min(), x.max(), 50)
    ax.plot(grid, np.exp(intercept) * grid**slope, "--", color=points.get_color(),
            label=f"fit: slope {slope:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    return float(slope), float(intercept)


def floor_line(ax, value: float, label: str = "entropy floor", **kwargs):
    """A horizontal dashed line, e.g. the corpus's Bayes floor under a loss curve."""
    kwargs.setdefault("color", "black")
    kwargs.setdefault("linestyle", ":")
    return ax.axhline(value, label=label, **kwargs)
