"""One figure style for every PNG the pipeline writes: standalone Agg figures (no pyplot state is created or
leaked) saved without matplotlib's version stamp, so a figure redrawn from the same data has the same bytes."""

from __future__ import annotations

import textwrap
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from em_assets.results.artifacts import write_atomically

DPI = 120


def new_figure(width: float, height: float) -> Figure:
    """A fresh figure of `width` x `height` inches with constrained layout; it dies with garbage collection."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Write the figure to `path` whole: drawn beside it, then renamed, so a killed run leaves the last good
    figure, not a truncated one."""
    # Labels carry names from data (question ids, file names): a "$" in one is text, not mathtext to parse.
    for text in fig.findobj(Text):
        text.set_parse_math(False)
    # Two report runs at once (the demo's and one the UI's automation started) draw the same figure.
    return write_atomically(
        path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    )


def no_data(path: Path, title: str, note: str = "no data") -> Path:
    """The figure a report writes when its table is empty: its title over why, so the file always exists."""
    fig = new_figure(7.0, 3.0)
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, textwrap.fill(note, 60), ha="center", va="center", fontsize=12, transform=ax.transAxes)
    ax.set_title(title)
    ax.set_axis_off()
    return save_png(fig, path)
