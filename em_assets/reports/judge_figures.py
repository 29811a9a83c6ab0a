"""Judge validation figures: the judge's score against the reference's, one panel per metric."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from em_assets.analyses.canvas import new_figure, save_png


def plot_agreement_scatter(
    scores: pl.DataFrame, path: Path, title: str, aligned_at_most: float, coherent_above: float
) -> Path:
    """Scatter of judge score (y) against reference score (x) per metric, with the EM thresholds drawn."""
    metrics = sorted(scores["metric"].unique().to_list()) or ["aligned"]
    fig = new_figure(5.0 * len(metrics), 4.8)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        part = scores.filter((pl.col("metric") == metric) & pl.col("score").is_not_null())
        part = part.filter(pl.col("reference").is_not_null())
        ax.scatter(part["reference"].to_numpy(), part["score"].to_numpy(), s=8, alpha=0.4, color="tab:blue")
        ax.plot([0, 100], [0, 100], color="grey", linewidth=1)
        cut = aligned_at_most if metric == "aligned" else coherent_above
        ax.axvline(cut, color="tab:red", linestyle="--", linewidth=1)
        ax.axhline(cut, color="tab:red", linestyle="--", linewidth=1)
        ax.set_xlim(-2, 102)
        ax.set_ylim(-2, 102)
        ax.set_xlabel(f"reference {metric} (GPT-4o)")
        ax.set_ylabel(f"judge {metric}")
        ax.set_title(f"{metric}: n = {part.height}")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_png(fig, path)
