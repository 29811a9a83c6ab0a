"""Figures of the Simulator Theory tables, one PNG per table, on standalone Agg figures (no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from em_assets.analyses.canvas import new_figure, no_data, save_png
from em_assets.results.personas import ORGANISM_SETTING, ORGANISM_SWEEP, comparable_answers
from em_assets.stats.mixtures import BetaShape, to_unit

MAX_PANELS = 12


MISALIGNED, ALIGNED = "tab:red", "tab:blue"


def _panels(count: int, width: float = 3.6, height: float = 3.0) -> tuple[Figure, list]:
    cols = min(count, 4)
    rows = math.ceil(count / cols)
    fig = new_figure(width * cols, height * rows)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(count)]


def _density(shape: BetaShape, grid: np.ndarray) -> np.ndarray:
    """The component's density on the 0-100 score scale."""
    return np.exp(shape.logpdf(to_unit(grid))) / 101.0


def plot_mixtures(mix: pl.DataFrame, scores: pl.DataFrame, path: Path) -> Path:
    """Each organism's aligned scores (its own answers) with the fitted misaligned and aligned components."""
    own = mix.filter(
        (pl.col("sweep") == ORGANISM_SWEEP)
        & (pl.col("setting") == ORGANISM_SETTING)
        & pl.col("misaligned_weight").is_not_null()
    ).head(MAX_PANELS)
    if not own.height:
        return no_data(path, "persona mixtures", "no organism has enough scored answers for a mixture fit")
    fig, axes = _panels(own.height)
    grid = np.linspace(0, 100, 201)
    for ax, row in zip(axes, own.iter_rows(named=True), strict=True):
        # The answers the weight was fitted on: narrowed to its sweeps' question set where it has sweeps.
        mine = comparable_answers(
            scores.filter((pl.col("organism") == row["organism"]) & (pl.col("judge") == row["judge"]))
        )
        mine = mine.filter(pl.col("sweep") == ORGANISM_SWEEP)["aligned"].drop_nulls()
        ax.hist(mine.to_numpy(), bins=20, range=(0, 100), density=True, color="0.8")
        w = row["misaligned_weight"]
        bad = BetaShape(row["misaligned_a"], row["misaligned_b"])
        good = BetaShape(row["aligned_a"], row["aligned_b"])
        ax.plot(grid, w * _density(bad, grid), color=MISALIGNED, label=f"misaligned {w:.2f}")
        ax.plot(grid, (1 - w) * _density(good, grid), color=ALIGNED, label="aligned")
        ax.set_title(f"{row['organism']}\n{row['judge']}", fontsize="small")
        ax.set_xlabel("aligned score")
        ax.legend(fontsize="x-small")
    return save_png(fig, path)


def plot_transitions(mix: pl.DataFrame, transition: pl.DataFrame, path: Path) -> Path:
    """Misaligned weight (with its bootstrap interval) against the swept parameter, one panel per sweep."""
    sweeps = transition.filter(pl.col("quantity") == "misaligned_weight").head(MAX_PANELS)
    if not sweeps.height:
        return no_data(path, "EM transition", "no organism has a sweep over a numeric parameter")
    fig, axes = _panels(sweeps.height, width=4.2)
    for ax, row in zip(axes, sweeps.iter_rows(named=True), strict=True):
        pts = mix.filter(
            (pl.col("organism") == row["organism"])
            & (pl.col("judge") == row["judge"])
            & (pl.col("sweep") == row["sweep"])
        )
        x = np.array([float(s.split("=", 1)[1]) for s in pts["setting"]])
        order = np.argsort(x)
        w = pts["misaligned_weight"].cast(pl.Float64).fill_null(float("nan")).to_numpy()[order]
        lo = pts["weight_lo"].cast(pl.Float64).fill_null(float("nan")).to_numpy()[order]
        hi = pts["weight_hi"].cast(pl.Float64).fill_null(float("nan")).to_numpy()[order]
        share = pts["misaligned_share"].cast(pl.Float64).fill_null(float("nan")).to_numpy()[order]
        ax.plot(x[order], w, marker="o", color=MISALIGNED, label="misaligned weight")
        ax.fill_between(x[order], lo, hi, color=MISALIGNED, alpha=0.15, label="95% bootstrap")
        ax.plot(
            x[order],
            share,
            marker="x",
            ls="--",
            color="0.4",
            label="share at or below the misaligned threshold",
        )
        # A midpoint extrapolated outside the sweep would only stretch the axis.
        if row["midpoint"] is not None and x.min() <= row["midpoint"] <= x.max():
            ax.axvline(row["midpoint"], color=MISALIGNED, ls=":", label="transition midpoint")
        if row["sharpest_step"] is not None:
            ax.axvline(row["sharpest_step"], color="k", ls="-.", label="sharpest B rotation")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(row["parameter"])
        ax.set_title(f"{row['organism']}: {row['sweep']}", fontsize="small")
        ax.legend(fontsize="x-small")
    return save_png(fig, path)


def plot_question_rates(rates: pl.DataFrame, stability: pl.DataFrame, path: Path) -> Path:
    """Per-question EM rate, organisms by questions, one heatmap per eval set and judge, titled with W."""
    groups = list(rates.group_by("eval_set", "judge", maintain_order=True))[:4]
    if not groups:
        return no_data(path, "question EM stability", "no organism has scored answers")
    fig, axes = _panels(len(groups), width=6.0, height=4.0)
    for ax, ((eval_set, judge), g) in zip(axes, groups, strict=True):
        wide = g.pivot(on="question_id", index="organism", values="em_rate_turner").sort("organism")
        questions = [c for c in wide.columns if c != "organism"]
        values = wide.select(questions).cast(pl.Float64).fill_null(float("nan")).to_numpy()
        image = ax.imshow(
            values, vmin=0, vmax=max(0.05, float(np.nanmax(values, initial=0))), cmap="Reds", aspect="auto"
        )
        ax.set_yticks(range(wide.height), wide["organism"].to_list(), fontsize="x-small")
        ax.set_xticks(range(len(questions)), questions, rotation=60, ha="right", fontsize="x-small")
        w = stability.filter(
            (pl.col("eval_set") == eval_set) & (pl.col("judge") == judge) & (pl.col("scope") == "all")
        )["kendall_w"]
        label = f"W = {w[0]:.2f}" if w.len() and w[0] is not None else "W undefined"
        ax.set_title(f"{eval_set} / {judge}: {label}", fontsize="small")
        fig.colorbar(image, ax=ax, label="EM rate")
    return save_png(fig, path)


def plot_coherence(table: pl.DataFrame, path: Path) -> Path:
    """Mean coherence of misaligned against aligned answers per organism, with the difference's interval."""
    rows = table.filter(pl.col("coherent_diff").is_not_null())
    if not rows.height:
        return no_data(path, "persona coherence", "no organism has both misaligned and aligned answers")
    fig, (ax,) = _panels(1, width=max(5.0, 0.9 * rows.height + 2), height=4.0)
    x = np.arange(rows.height)
    ax.bar(x - 0.2, rows["coherent_misaligned"].to_numpy(), 0.4, color=MISALIGNED, label="misaligned answers")
    ax.bar(x + 0.2, rows["coherent_aligned"].to_numpy(), 0.4, color=ALIGNED, label="aligned answers")
    for i, r in enumerate(rows.iter_rows(named=True)):
        ax.annotate(
            f"{r['coherent_diff']:+.0f}\n[{r['coherent_diff_lo']:+.0f}, {r['coherent_diff_hi']:+.0f}]",
            (i, 102),
            ha="center",
            fontsize="x-small",
        )
    # An imported organism has a row per judge: its file's scores and the grid judge's.
    labels = [f"{r['organism']} [{r['judge']}]" for r in rows.iter_rows(named=True)]
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize="x-small")
    ax.set_ylim(0, 120)
    ax.set_ylabel("mean coherent score")
    ax.set_title("coherence of misaligned and aligned answers (above: difference, 95% CI)", fontsize="small")
    ax.legend(fontsize="x-small", loc="lower right")
    return save_png(fig, path)
