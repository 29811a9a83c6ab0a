"""The answers browser: one self-contained HTML page (inline CSS and JS, data as embedded JSON, no network)
with every organism's answers and scores, filtered by organism, question and quadrant, sorted by score."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from string import Template

import polars as pl

from em_assets.grid.schema import Thresholds
from em_assets.results.store import Store
from em_assets.stats.rates import em_flags

QUADRANTS = {
    "em": "EM (misaligned and coherent)",
    "aligned": "aligned and coherent",
    "incoherent": "incoherent",
    "unscored": "not scored",
}


@dataclass(frozen=True)
class AnswersPage:
    path: Path
    rows: int
    by_quadrant: dict[str, int]


def answers_frame(store: Store) -> pl.DataFrame:
    """Every completion with its question, answer and aligned/coherent scores."""
    return store.query(
        "SELECT organism, question_id, paraphrase_idx, sample_idx, question, answer, aligned, coherent "
        "FROM scored_completions ORDER BY organism, question_id, paraphrase_idx, sample_idx"
    )


def with_quadrants(df: pl.DataFrame, thresholds: Thresholds) -> pl.DataFrame:
    """Label each answer by the report's EM rule: EM, aligned (coherent, not misaligned), incoherent, unscored."""
    flags = em_flags(df, thresholds.aligned_at_most, thresholds.coherent_above)
    quadrant = (
        pl.when(pl.col("is_em"))
        .then(pl.lit("em"))
        .when(pl.col("em_turner_eligible") & pl.col("is_coherent"))
        .then(pl.lit("aligned"))
        .when(pl.col("is_coherent") == False)  # noqa: E712 (a null coherence is unscored, not incoherent)
        .then(pl.lit("incoherent"))
        .otherwise(pl.lit("unscored"))
    )
    return flags.with_columns(quadrant=quadrant).select(
        "organism", "question_id", "question", "answer", "aligned", "coherent", "quadrant"
    )


def render(df: pl.DataFrame, thresholds: Thresholds) -> str:
    """The page as text; `df` has the columns of `with_quadrants`."""
    rows = [
        [
            r["organism"],
            r["question_id"],
            r["question"],
            r["answer"],
            r["aligned"],
            r["coherent"],
            r["quadrant"],
        ]
        for r in df.iter_rows(named=True)
    ]
    # "</" inside a <script> block would end it early; JSON reads "<\/" as "</".
    data = json.dumps({"rows": rows, "quadrants": QUADRANTS}).replace("</", "<\\/")
    template = Template((Path(__file__).with_name("answers_page.html")).read_text())
    return template.substitute(
        data=data,
        rule=f"EM: aligned &le; {thresholds.aligned_at_most:g} and coherent &gt; {thresholds.coherent_above:g}",
    )


def write_answers_page(store: Store, thresholds: Thresholds, out: Path) -> AnswersPage:
    """Build the page from the results database and write it atomically to `out`."""
    df = with_quadrants(answers_frame(store), thresholds)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(df, thresholds))
    tmp.replace(out)
    counts = dict(df.group_by("quadrant").len().iter_rows())
    return AnswersPage(out, df.height, {q: counts.get(q, 0) for q in QUADRANTS})
