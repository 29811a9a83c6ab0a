"""Convergence of directions (Soligo et al.): per layer, the cosine similarity of the misalignment directions
of organisms that share a base model."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import polars as pl

SCHEMA = {
    "base_model": pl.String,
    "organism_a": pl.String,
    "organism_b": pl.String,
    "layer": pl.Int32,
    "cosine": pl.Float64,
    "contrast_a": pl.String,
    "contrast_b": pl.String,
    "sha256_a": pl.String,
    "sha256_b": pl.String,
}


def layer_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of two [layers, hidden] arrays, row by row (NaN where either row is zero)."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (a * b).sum(axis=1) / norms, np.nan)


def similarity_table(directions: pl.DataFrame, arrays: dict[str, np.ndarray]) -> pl.DataFrame:
    """One row per pair of organisms of one base model and layer; `arrays` maps organism to its direction."""
    rows = []
    for (base_model,), group in directions.group_by(["base_model"], maintain_order=True):
        records = group.sort("organism").to_dicts()
        for a, b in combinations(records, 2):
            cos = layer_cosines(arrays[a["organism"]], arrays[b["organism"]])
            rows += [
                {
                    "base_model": base_model,
                    "organism_a": a["organism"],
                    "organism_b": b["organism"],
                    "layer": layer,
                    "cosine": float(c),
                    "contrast_a": a["contrast"],
                    "contrast_b": b["contrast"],
                    "sha256_a": a["direction_sha256"],
                    "sha256_b": b["direction_sha256"],
                }
                for layer, c in enumerate(cos)
            ]
    return pl.DataFrame(rows, schema=SCHEMA)


def load_arrays(directions: pl.DataFrame) -> dict[str, np.ndarray]:
    """Each organism's direction file, checked against its recorded sha256."""
    from em_assets.analyses.steering import load_directions

    return {
        r["organism"]: load_directions(r["direction_path"], r["direction_sha256"]).numpy()
        for r in directions.iter_rows(named=True)
    }


@dataclass(frozen=True)
class SimilarityReport:
    table: pl.DataFrame
    figure: Path
    organisms: int


def build_similarity(store, figures_dir: Path) -> SimilarityReport:
    """The `direction_similarity` table (replaced whole) and its heatmap, from every stored direction."""
    from em_assets.analyses.figures import plot_similarity
    from em_assets.results import directions as db

    store.init()
    directions = db.computed_directions(store)
    table = similarity_table(directions, load_arrays(directions))
    store.write_table("direction_similarity", table)
    figure = plot_similarity(table, Path(figures_dir) / "direction_similarity.png")
    return SimilarityReport(table, figure, directions.height)
