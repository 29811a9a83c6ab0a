"""What the assets show about their partition after a stage ran: loss curves, completion and judge coverage."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import polars as pl

from em_assets.results.store import Store


@dataclass(frozen=True)
class LossCurve:
    rows: pl.DataFrame  # step, loss


@dataclass(frozen=True)
class CompletionSummary:
    total: int
    empty: int
    mean_tokens: float | None  # None when no answer has a token count (imported answers)
    finish_reasons: dict[str, int]
    preview: pl.DataFrame  # the first answer of each question, cut to 200 characters
    version: str  # the answers' hash: the asset's data version


@dataclass(frozen=True)
class JudgementCoverage:
    total: int
    missing: int  # (completion, metric) pairs with no judgement row
    by_metric: pl.DataFrame


def training_losses(store: Store, organism: str) -> LossCurve:
    return LossCurve(
        store.query("SELECT step, loss FROM training_losses WHERE organism = ? ORDER BY step", [organism])
    )


def completions(store: Store, organism: str) -> CompletionSummary:
    rows = store.query(
        "SELECT question_id, paraphrase_idx, sample_idx, question, system, sampling_hash, num_tokens, "
        "finish_reason, answer FROM completions WHERE organism = ? ORDER BY ALL",
        [organism],
    )
    # Each answer with its key, prompt and settings: answers sampled again for a reworded question, or added
    # for a larger samples_per_question, change it where the sampling hash alone would not.
    named = ["question_id", "paraphrase_idx", "sample_idx", "question", "system", "sampling_hash", "answer"]
    version = hashlib.sha256(json.dumps(rows.select(named).rows()).encode()).hexdigest()[:16]
    preview = (
        rows.group_by("question_id", maintain_order=True)
        .first()
        .with_columns(pl.col("answer").str.slice(0, 200))
    )
    return CompletionSummary(
        total=rows.height,
        empty=rows.filter(pl.col("answer").str.strip_chars() == "").height,
        mean_tokens=rows["num_tokens"].mean(),
        finish_reasons=dict(rows["finish_reason"].value_counts().iter_rows()),
        preview=preview,
        version=version,
    )


def judgements(store: Store, organism: str, metrics: list[str]) -> JudgementCoverage:
    by_metric = store.query(
        "SELECT metric, count(*) AS n, count(score) AS scored, avg(score) AS mean_score, avg(mass) AS mean_mass "
        "FROM judgements WHERE organism = ? GROUP BY metric ORDER BY metric",
        [organism],
    )
    # The coverage rule is an anti-join: every completion times every judge metric must have a row.
    missing = store.query(
        "SELECT count(*) AS n FROM completions c, (SELECT unnest(?::VARCHAR[]) AS metric) m "
        "WHERE c.organism = ? AND NOT EXISTS (SELECT 1 FROM judgements j WHERE j.organism = c.organism "
        "AND j.question_id = c.question_id AND j.paraphrase_idx = c.paraphrase_idx "
        "AND j.sample_idx = c.sample_idx AND j.metric = m.metric)",
        [metrics, organism],
    )["n"][0]
    total = int(by_metric["n"].sum()) if by_metric.height else 0
    return JudgementCoverage(total=total, missing=int(missing), by_metric=by_metric)
