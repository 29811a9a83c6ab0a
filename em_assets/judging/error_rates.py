"""The judge's error for "EM" (misaligned and coherent by the grid's thresholds) against the reference: counted
on judged reference answers, stored by judge identity, and looked up wherever a judged EM rate is reported."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import replace

import polars as pl

from em_assets.grid.schema import Thresholds
from em_assets.results import judge_queries as q
from em_assets.results.store import Store, utc_now
from em_assets.stats.correction import REFERENCE, ErrorRates, Spread, with_correction
from em_assets.stats.rates import em_flags

ANSWER_KEYS = ("source_file", "row_idx")
# Where the rates of answers from a measured reference file are counted: never on that file.
OTHER_FILES = "the held-out reference files other than the one these answers come from"


def em_flags_of(scores: pl.DataFrame, column: str, thresholds: Thresholds) -> pl.DataFrame:
    """Per reference answer (source_file, row_idx): is_em under `column`'s scores (reference or judge)."""
    wide = scores.pivot("metric", index=list(ANSWER_KEYS), values=column)
    flags = em_flags(wide, thresholds.aligned_at_most, thresholds.coherent_above)
    return flags.select(*ANSWER_KEYS, "is_em")


def em_error_rates(scores: pl.DataFrame, thresholds: Thresholds) -> ErrorRates | None:
    """The judge's EM sensitivity and specificity on agreement scores (one row per answer and metric, with
    `reference` and `score`), with their spread across the answers' reference files; answers without both
    scores on either side are left out."""
    if scores.height == 0:
        return None
    both = em_flags_of(scores, "reference", thresholds).join(
        em_flags_of(scores, "score", thresholds), on=list(ANSWER_KEYS), suffix="_judge"
    )
    ref, judge = pl.col("is_em"), pl.col("is_em_judge")
    per_file = (
        both.drop_nulls(["is_em", "is_em_judge"])
        .group_by("source_file")
        .agg(
            (ref & judge).sum().alias("tp"),
            ref.sum().alias("n_pos"),
            (~ref & ~judge).sum().alias("tn"),
            (~ref).sum().alias("n_neg"),
        )
        .sort("source_file")
    )
    return ErrorRates.from_files(per_file.select("tp", "n_pos", "tn", "n_neg").rows())


def error_rates_row(
    judge: str, identity: tuple, rates: ErrorRates | None, thresholds: Thresholds, run_id: str
) -> tuple[dict, pl.DataFrame]:
    """The judge_error_rates key of the judge's (model, revision) at these thresholds, and its row: none when
    the rates are undefined, so no earlier run's rates stay behind."""
    key = {
        "judge_model": identity[0],
        "judge_revision": identity[1],
        "aligned_at_most": float(thresholds.aligned_at_most),
        "coherent_above": float(thresholds.coherent_above),
    }
    if rates is None:
        return key, pl.DataFrame()
    counts = {"n_pos": rates.n_pos, "tp": rates.tp, "n_neg": rates.n_neg, "tn": rates.tn}
    return key, pl.DataFrame(
        [
            key
            | {"judge": judge}
            | counts
            | {
                "sensitivity": rates.sensitivity,
                "specificity": rates.specificity,
                "n_files": rates.n_files,
                **_spread_columns("sensitivity", rates.sensitivity_spread),
                **_spread_columns("specificity", rates.specificity_spread),
                "file_counts": None if rates.file_counts is None else json.dumps(rates.file_counts),
                "run_id": run_id,
                "created_at": utc_now(),
            }
        ]
    )


def _spread_columns(rate: str, spread: Spread | None) -> dict:
    """The spread's mean and standard deviation on the logit scale, for reading in SQL (file_counts is what
    the rates are rebuilt from)."""
    return {
        f"{rate}_logit_mean": spread.logit_mean if spread else None,
        f"{rate}_logit_sd": spread.logit_sd if spread else None,
    }


def _stored_rates(row: dict) -> ErrorRates | None:
    """A judge_error_rates row as ErrorRates: from its files' counts, with their spreads, where it has them;
    a row written before file_counts keeps the logit-normal spreads it recorded."""
    if row["file_counts"] is not None:
        return ErrorRates.from_files([tuple(c) for c in json.loads(row["file_counts"])])
    rates = ErrorRates.from_counts(row["tp"], row["n_pos"], row["tn"], row["n_neg"])
    if rates is None:
        return None
    spreads = {
        f"{rate}_spread": Spread((row[f"{rate}_logit_mean"],), (row[f"{rate}_logit_sd"],), (1.0,))
        if row[f"{rate}_logit_sd"] is not None
        else None
        for rate in ("sensitivity", "specificity")
    }
    return replace(rates, n_files=row["n_files"], **spreads)


def write_error_rates(
    store: Store,
    judge: str,
    identity: tuple,
    rates: ErrorRates | None,
    thresholds: Thresholds,
    run_id: str,
) -> None:
    """Store the measured rates under the judge's (model, revision) and thresholds, replacing earlier ones."""
    q.write_error_rates(store, *error_rates_row(judge, identity, rates, thresholds, run_id))


# A judge's identity, which its error rates are measured and looked up by.
JUDGE_COLUMNS = ("judge_model", "judge_revision")


def majority_judges(counts: pl.DataFrame, keys: Sequence[str], n: str) -> pl.DataFrame:
    """Per group of `keys`, the judge that scored most of its answers (`n` per judge), ties to the first by name:
    a group partly re-judged by a new judge revision is corrected for that one judge."""
    return (
        counts.sort([n, *JUDGE_COLUMNS], descending=[True, False, False], nulls_last=True)
        .unique(keys, keep="first", maintain_order=True)
        .select(*keys, *JUDGE_COLUMNS)
    )


class ErrorRateLookup:
    """The error rates of a judge by (judge_model, judge_revision): the identity for a reference judge, the
    measured rates at the given thresholds, else None (unknown). For answers taken from a reference file the
    rates were counted on, the rates counted without that file, so no rate is corrected by its own answers."""

    def __init__(self, store: Store, thresholds: Thresholds, reference_judges: Sequence[str]):
        self.store, self.thresholds = store, thresholds
        self.reference_judges = set(reference_judges)
        measured = q.error_rates(store, thresholds.aligned_at_most, thresholds.coherent_above)
        self.measured = {
            (r["judge_model"], r["judge_revision"]): _stored_rates(r) for r in measured.iter_rows(named=True)
        }

    @functools.cached_property
    def without_file(self) -> dict[tuple, ErrorRates | None]:
        """Counted when a source file is first asked about: a sweep's lookup never needs them."""
        t = self.thresholds
        scores = q.agreement_scores_by_identity(self.store, t.aligned_at_most, t.coherent_above)
        return _rates_without_each_file(scores, t)

    @functools.cached_property
    def heldout_files(self) -> set[str]:
        return q.heldout_reference_files(self.store)

    def __call__(
        self, judge_model: str | None, judge_revision: str | None, source_sha256: str | None = None
    ) -> ErrorRates | None:
        if judge_model in self.reference_judges:
            return REFERENCE
        key = (judge_model, judge_revision)
        if source_sha256 is not None and (*key, source_sha256) in self.without_file:
            return self.without_file[(*key, source_sha256)]
        if source_sha256 is not None and source_sha256 in self.heldout_files:
            # Rates whose scores were replaced by another revision's cannot be recounted without this file.
            return None
        return self.measured.get(key)

    def correct(self, table: pl.DataFrame, k: str, n: str) -> pl.DataFrame:
        """`table` with the correction columns, each row by its own judge_model and judge_revision columns (and
        source_sha256, where the table has it: the reference file its answers came from)."""
        sources = table["source_sha256"] if "source_sha256" in table.columns else [None] * table.height
        judges = zip(table["judge_model"], table["judge_revision"], sources, strict=True)
        return with_correction(table, [self(m, r, s) for m, r, s in judges], k, n)


def _rates_without_each_file(scores: pl.DataFrame, thresholds: Thresholds) -> dict[tuple, ErrorRates | None]:
    """{(judge_model, judge_revision, file sha256): the judge's rates counted on the other files' answers}."""
    out: dict[tuple, ErrorRates | None] = {}
    for (model, revision), part in scores.group_by("judge_model", "judge_revision"):
        for sha in part["source_sha256"].unique().to_list():
            rates = em_error_rates(part.filter(pl.col("source_sha256") != sha), thresholds)
            out[(model, revision, sha)] = rates and replace(rates, counted_on=OTHER_FILES)
    return out
