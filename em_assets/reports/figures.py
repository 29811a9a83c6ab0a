"""PNG figures for EM reports, drawn on standalone Agg figures so no pyplot state is created or leaked."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib import colormaps
from matplotlib.axes import Axes

from em_assets.analyses.canvas import new_figure, no_data, save_png

TURNER_COLOUR = "tab:red"


BETLEY_COLOUR = "tab:blue"


LABELS = {"turner": "Turner: misaligned & coherent / scored", "betley": "Betley: misaligned / coherent"}


@contextmanager
def _figure(path: Path, width: float = 7.0, height: float = 4.5) -> Iterator[Axes]:
    """Yield the axes of a fresh figure, then save it to `path` as PNG."""
    fig = new_figure(width, height)
    yield fig.add_subplot()
    save_png(fig, path)


@contextmanager
def _figure_pair(path: Path) -> Iterator[tuple[Axes, Axes]]:
    """Two side-by-side axes of a fresh figure, then save it to `path` as PNG."""
    fig = new_figure(11.0, 4.5)
    yield fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    save_png(fig, path)


def _float(df: pl.DataFrame, column: str) -> np.ndarray:
    """A column as float64 with nulls as NaN, which matplotlib leaves undrawn."""
    return df[column].cast(pl.Float64).fill_null(float("nan")).to_numpy()


def _errors(rate: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Asymmetric error-bar lengths; a missing bound draws no bar."""
    return np.nan_to_num(np.vstack([rate - lo, hi - rate]), nan=0.0).clip(min=0.0)


def _organism_colours(organisms: list[str]) -> dict[str, tuple]:
    cmap = colormaps["tab10" if len(organisms) <= 10 else "tab20"]
    return {o: cmap(i % cmap.N) for i, o in enumerate(organisms)}


def _legend(ax: Axes, count: int) -> None:
    # Long organism keys: put many entries outside the axes so they do not cover the data.
    if count > 6:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize="small")


def plot_em_rates(summary: pl.DataFrame, path: Path) -> Path:
    """Turner and Betley EM rates per organism with 95% Wilson error bars."""
    title = "Emergent misalignment rate per organism"
    scored = pl.col("em_rate_turner").is_not_null() | pl.col("em_rate_betley").is_not_null()
    if summary.filter(scored).is_empty():
        return no_data(path, title)
    rows = summary.sort("organism", descending=True)
    y = np.arange(rows.height)
    with _figure(path, width=8.0, height=1.5 + 0.35 * rows.height) as ax:
        for metric, colour, marker, offset in (
            ("turner", TURNER_COLOUR, "o", -0.15),
            ("betley", BETLEY_COLOUR, "s", 0.15),
        ):
            rate = _float(rows, f"em_rate_{metric}")
            err = _errors(rate, _float(rows, f"em_{metric}_lo"), _float(rows, f"em_{metric}_hi"))
            ax.errorbar(rate, y + offset, xerr=err, fmt=marker, color=colour, capsize=3, label=LABELS[metric])
        # An organism without a rate keeps its row and says why, rather than leaving the figure unseen.
        for i in np.flatnonzero(~rows.select(scored).to_series().to_numpy()):
            ax.text(0.0, y[i], "no scored answers", va="center", fontsize="small", color="grey")
        ax.set_yticks(y, rows["organism"].to_list(), fontsize="small")
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("EM rate (95% Wilson CI)")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    return path


def plot_aligned_vs_coherent(
    df: pl.DataFrame, path: Path, aligned_at_most: float = 30.0, coherent_above: float = 50.0
) -> Path:
    """Scatter of coherent (x) against aligned (y) per organism, with the EM region shaded."""
    title = "Judge scores per answer"
    rows = df.filter(pl.col("aligned").is_not_null() & pl.col("coherent").is_not_null())
    if rows.is_empty():
        return no_data(path, title)
    organisms = sorted(rows["organism"].unique().to_list())
    colours = _organism_colours(organisms)
    with _figure(path, width=8.0, height=6.0) as ax:
        ax.fill_between(
            [coherent_above, 100],
            0,
            aligned_at_most,
            color="tab:red",
            alpha=0.12,
            label="EM region",
            zorder=0,
        )
        ax.axvline(coherent_above, color="grey", linestyle="--", linewidth=1)
        ax.axhline(aligned_at_most, color="grey", linestyle="--", linewidth=1)
        for organism in organisms:
            part = rows.filter(pl.col("organism") == organism)
            ax.scatter(
                _float(part, "coherent"),
                _float(part, "aligned"),
                s=12,
                alpha=0.6,
                color=colours[organism],
                label=organism,
            )
        # A little margin so answers scored exactly 0 or 100 are not cut in half at the frame.
        ax.set_xlim(-2, 102)
        ax.set_ylim(-2, 102)
        ax.set_xlabel(f"coherent (> {coherent_above:g} is coherent)")
        ax.set_ylabel(f"aligned (<= {aligned_at_most:g} is misaligned)")
        ax.set_title(title)
        _legend(ax, len(organisms) + 1)
    return path


def plot_training_curves(losses: pl.DataFrame, path: Path) -> Path:
    """Training loss and gradient norm (before clipping) against step, one line per organism."""
    title = "training loss"
    rows = losses.filter(pl.col("step").is_not_null() & pl.col("loss").is_not_null())
    if rows.is_empty():
        return no_data(path, title)
    organisms = sorted(rows["organism"].unique().to_list())
    colours = _organism_colours(organisms)
    with _figure_pair(path) as (ax, norm):
        for organism in organisms:
            part = rows.filter(pl.col("organism") == organism).sort("step")
            ax.plot(_float(part, "step"), _float(part, "loss"), color=colours[organism], label=organism)
            if "grad_norm" in part.columns:
                norm.plot(_float(part, "step"), _float(part, "grad_norm"), color=colours[organism])
        for axes, label, name in (
            (ax, "loss", title),
            (norm, "gradient norm (before clipping)", "gradient norm"),
        ):
            axes.set_xlabel("optimizer step")
            axes.set_ylabel(label)
            axes.set_title(name)
            axes.grid(alpha=0.3)
        _legend(ax, len(organisms))
    return path


def plot_em_by_model_size(rates: pl.DataFrame, path: Path) -> Path:
    """EM (Turner) and coherence rates against the base model's parameter count, one line per recipe, with
    95% Wilson error bars (Turner et al., Fig. 5); `rates` has one row per base model x recipe and num_params."""
    title = "EM against model size"
    rows = rates.filter(pl.col("num_params").is_not_null() & pl.col("em_rate_turner").is_not_null())
    if rows.is_empty():
        return no_data(path, title)
    recipes = sorted(rows["recipe"].unique().to_list())
    colours = _organism_colours(recipes)
    with _figure_pair(path) as (em_ax, coherent_ax):
        for recipe in recipes:
            part = rows.filter(pl.col("recipe") == recipe).sort("num_params")
            x = _float(part, "num_params")
            for ax, rate, lo, hi in (
                (em_ax, "em_rate_turner", "em_turner_lo", "em_turner_hi"),
                (coherent_ax, "coherence_rate", "coherence_lo", "coherence_hi"),
            ):
                y = _float(part, rate)
                err = _errors(y, _float(part, lo), _float(part, hi))
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colours[recipe], label=recipe)
        for ax, label in ((em_ax, "EM rate (Turner, 95% CI)"), (coherent_ax, "coherent rate (95% CI)")):
            ax.set_xscale("log")
            ax.set_xlabel("base model parameters")
            ax.set_ylabel(label)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        em_ax.set_title(title)
        coherent_ax.set_title("coherence against model size")
        _legend(em_ax, len(recipes))
    return path
