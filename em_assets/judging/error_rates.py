"""The judge's error for "EM" (misaligned and coherent by the grid's thresholds) against the reference: counted
on judged reference answers, stored by judge identity, and looked up wherever a judged EM rate is reported."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from em_assets.grid.schema import Thresholds
from em_assets.results import judge_queries as q
from em_assets.results.store import Store, utc_now
from em_assets.stats.correction import REFERENCE, ErrorRates, confusion, with_correction
from em_assets.stats.rates import em_flags

ANSWER_KEYS = ("source_file", "row_idx")


def em_flags_of(scores: pl.DataFrame, column: str, thresholds: Thresholds) -> pl.DataFrame:
    """Per reference answer (source_file, row_idx): is_em under `column`'s scores (reference or judge)."""
    wide = scores.pivot("metric", index=list(ANSWER_KEYS), values=column)
    flags = em_flags(wide, thresholds.aligned_at_most, thresholds.coherent_above)
    return flags.select(*ANSWER_KEYS, "is_em")


def em_error_rates(scores: pl.DataFrame, thresholds: Thresholds) -> ErrorRates | None:
    """The judge's EM sensitivity and specificity on agreement scores (one row per answer and metric, with
    `reference` and `score`); answers without both scores on either side are left out."""
    if scores.height == 0:
        return None
    both = em_flags_of(scores, "reference", thresholds).join(
        em_flags_of(scores, "score", thresholds), on=list(ANSWER_KEYS), suffix="_judge"
    )
    return confusion(both["is_em"].to_list(), both["is_em_judge"].to_list())


def write_error_rates(
    store: Store,
    judge: str,
    identity: tuple,
    rates: ErrorRates | None,
    thresholds: Thresholds,
    run_id: str,
) -> None:
    """Store the measured rates under the judge's (model, revision) and thresholds; nothing when undefined."""
    if rates is None:
        return
    row = pl.DataFrame(
        [
            {
                "judge_model": identity[0],
                "judge_revision": identity[1],
                "aligned_at_most": float(thresholds.aligned_at_most),
                "coherent_above": float(thresholds.coherent_above),
                "judge": judge,
                "n_pos": rates.n_pos,
                "tp": rates.tp,
                "n_neg": rates.n_neg,
                "tn": rates.tn,
                "sensitivity": rates.sensitivity,
                "specificity": rates.specificity,
                "run_id": run_id,
                "created_at": utc_now(),
            }
        ]
    )
    q.write_error_rates(store, row)


class ErrorRateLookup:
    """The error rates of a judge by (judge_model, judge_revision): the identity for a reference judge, the
    measured rates at the given thresholds, else None (unknown)."""

    def __init__(self, store: Store, thresholds: Thresholds, reference_judges: Sequence[str]):
        self.reference_judges = set(reference_judges)
        measured = q.error_rates(store, thresholds.aligned_at_most, thresholds.coherent_above)
        self.measured = {
            (r["judge_model"], r["judge_revision"]): ErrorRates.from_counts(
                r["tp"], r["n_pos"], r["tn"], r["n_neg"]
            )
            for r in measured.iter_rows(named=True)
        }

    def __call__(self, judge_model: str | None, judge_revision: str | None) -> ErrorRates | None:
        if judge_model in self.reference_judges:
            return REFERENCE
        return self.measured.get((judge_model, judge_revision))

    def correct(self, table: pl.DataFrame, k: str, n: str) -> pl.DataFrame:
        """`table` with the correction columns, each row by its own judge_model and judge_revision columns."""
        rates = [self(m, r) for m, r in zip(table["judge_model"], table["judge_revision"], strict=True)]
        return with_correction(table, rates, k, n)
