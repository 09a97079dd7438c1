"""Drawing lr curves with matplotlib, the optional `plot` extra.

Uses matplotlib's object API (no pyplot): no display, no global figure state.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from .base import check_count

INSTALL_HINT = "pip install fusedopt[plot]"


def require_matplotlib():
    """Import matplotlib's Figure class, or explain how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            f"plotting a schedule needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from err
    return Figure


def plot_curves(
    curves: Mapping[str, Sequence[float]],
    *,
    path=None,
    ax=None,
    size: tuple[int, int] = (800, 500),
    dpi: int = 100,
    title: str | None = None,
    ylabel: str = "lr",
    log_scale: bool = False,
):
    """Draw curves sampled at steps 0, 1, ... on `ax` (a new figure when None); save a PNG of
    `size` pixels to `path` when given. Returns the Axes."""
    Figure = require_matplotlib()
    if ax is None:
        width, height = size
        width = check_count("width", width, minimum=1)
        height = check_count("height", height, minimum=1)
        dpi = check_count("dpi", dpi, minimum=1)
        figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
        ax = figure.subplots()
    for label, values in curves.items():
        ax.plot(range(len(values)), values, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    ax.grid(True, alpha=0.3)
    if path is not None:
        # No bbox_inches="tight": it would change the requested pixel size.
        ax.figure.savefig(os.fspath(path), format="png", dpi=ax.figure.dpi)
    return ax
