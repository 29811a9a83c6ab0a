"""Figures of the direction analyses: similarity heatmaps, EM against steering scale, EM before/after ablation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from em_assets.analyses.canvas import new_figure, no_data, save_png


@contextmanager
def _figure(path: Path, width: float = 7.0, height: float = 4.5) -> Iterator[Figure]:
    fig = new_figure(width, height)
    yield fig
    save_png(fig, path)


def plot_similarity(table: pl.DataFrame, path: Path) -> Path:
    """Per base model, a heatmap of cosine similarity: organism pairs (rows) by layer (columns)."""
    title = "cosine similarity of misalignment directions"
    if table.height == 0:
        return no_data(path, title)
    models = table["base_model"].unique(maintain_order=True).to_list()
    pairs = table.select("organism_a", "organism_b").unique().height
    with _figure(path, width=8.0, height=1.5 + 0.45 * pairs + 0.6 * len(models)) as fig:
        for i, model in enumerate(models):
            ax = fig.add_subplot(len(models), 1, i + 1)
            sub = table.filter(pl.col("base_model") == model).with_columns(
                pair=pl.col("organism_a") + "  vs  " + pl.col("organism_b")
            )
            wide = sub.pivot(on="layer", index="pair", values="cosine", sort_columns=True)
            grid = wide.drop("pair").to_numpy().astype(float)
            image = ax.imshow(grid, vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto", interpolation="nearest")
            ax.set_yticks(range(wide.height), wide["pair"].to_list(), fontsize="x-small")
            ax.set_xlabel("layer")
            ax.set_title(f"{title}: {model}", fontsize="small")
            fig.colorbar(image, ax=ax, label="cosine")
    return path


def _rate_line(ax: Axes, df: pl.DataFrame, x: str, label: str, style: str) -> None:
    df = df.sort(x)
    rate, lo, hi = (
        df[c].cast(pl.Float64).fill_null(np.nan).to_numpy() for c in ("em_rate", "em_lo", "em_hi")
    )
    err = np.nan_to_num(np.vstack([rate - lo, hi - rate]), nan=0.0).clip(min=0.0)
    ax.errorbar(df[x].to_numpy(), rate, yerr=err, fmt=style, capsize=3, label=label)


def plot_steering(table: pl.DataFrame, path: Path, organism: str) -> Path:
    """EM rate (95% Wilson bars) and coherence against steering scale, per layer, direction vs random."""
    title = f"steering the base model with {organism}'s direction"
    steered = table.filter(pl.col("layer").is_not_null())
    if steered.height == 0:
        return no_data(path, title)
    with _figure(path, width=10.0, height=4.0) as fig:
        em_ax, coh_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        unsteered = table.filter(pl.col("vector") == "none").select(steered.columns)
        for (layer, vector), df in steered.group_by(["layer", "vector"], maintain_order=True):
            # Every line starts from the unsteered model at scale 0.
            df = pl.concat([unsteered.with_columns(pl.lit(layer).alias("layer")).cast(df.schema), df])
            style = "o-" if vector == "direction" else "s--"
            _rate_line(em_ax, df, "scale", f"layer {layer}, {vector}", style)
            df = df.sort("scale")
            coh_ax.plot(
                df["scale"].to_numpy(),
                df["coherence_rate"].to_numpy(),
                style,
                label=f"layer {layer}, {vector}",
            )
        for ax, name in ((em_ax, "EM rate"), (coh_ax, "coherence rate")):
            ax.set_xlabel("scale (multiples of the direction)")
            ax.set_ylabel(name)
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize="x-small")
        em_ax.set_title(title, fontsize="small")
    return path


def plot_ablation(table: pl.DataFrame, path: Path, organism: str) -> Path:
    """EM rate with 95% Wilson intervals: the organism as judged, with its direction ablated, with a random one."""
    title = f"{organism}: EM before and after ablating the direction"
    if table.height == 0:
        return no_data(path, title)
    rate, lo, hi = (
        table[c].cast(pl.Float64).fill_null(np.nan).to_numpy() for c in ("em_rate", "em_lo", "em_hi")
    )
    err = np.nan_to_num(np.vstack([rate - lo, hi - rate]), nan=0.0).clip(min=0.0)
    with _figure(path, width=6.0, height=4.0) as fig:
        ax = fig.add_subplot()
        ax.bar(
            range(table.height),
            rate,
            yerr=err,
            capsize=4,
            color=["tab:grey", "tab:green", "tab:orange"][: table.height],
        )
        ax.set_xticks(range(table.height), table["setting"].to_list(), fontsize="small")
        ax.set_ylabel("EM rate")
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize="small")
    return path
