"""The named writes that drop or replace rows touch only the organism, keys and metrics they name: no answer,
score or sweep point of another is lost."""

from __future__ import annotations

import polars as pl
import pytest

from em_assets.results import queries
from em_assets.results.store import Store
from em_assets.results.sweeps import SweepTables

KEYS = [("q0", 0, 0), ("q0", 0, 1), ("q1", 0, 0)]


def _store(tmp_path) -> Store:
    """Organisms o and p, each with KEYS answered and both metrics judged."""
    store = Store(tmp_path / "r.duckdb")
    store.init()
    for organism in ("o", "p"):
        keys = pl.DataFrame(
            [
                {"organism": organism, "question_id": q, "paraphrase_idx": p, "sample_idx": s}
                for q, p, s in KEYS
            ]
        )
        store.append_rows("completions", keys.with_columns(sampling_hash=pl.lit("h")))
        for metric in ("aligned", "coherent"):
            store.append_rows("judgements", keys.with_columns(metric=pl.lit(metric), score=pl.lit(50.0)))
    return store


def _held(store: Store, table: str) -> list[tuple]:
    cols = "organism, question_id, paraphrase_idx, sample_idx" + (", metric" if table == "judgements" else "")
    return store.query(f"SELECT {cols} FROM {table} ORDER BY ALL").rows()


def test_dropping_stale_answers_keeps_the_kept_ones_and_every_other_organisms(tmp_path):
    store = _store(tmp_path)
    queries.drop_completions_except(store, "o", [("q0", 0, 1)])
    assert _held(store, "completions") == [("o", "q0", 0, 1)] + [("p", *k) for k in KEYS]
    assert _held(store, "judgements") == [("o", "q0", 0, 1, m) for m in ("aligned", "coherent")] + [
        ("p", *k, m) for k in KEYS for m in ("aligned", "coherent")
    ]


def test_dropping_a_stale_judgement_keeps_the_answers_other_metric(tmp_path):
    """The judge writes again only the keys it dropped: a score dropped beside them would stay lost, and its
    answer leave the EM counts."""
    store = _store(tmp_path)
    queries.delete_judgements(store, "o", [("q0", 0, 0, "aligned")])
    held = _held(store, "judgements")
    assert ("o", "q0", 0, 0, "aligned") not in held and ("o", "q0", 0, 0, "coherent") in held
    assert len(held) == 2 * 2 * len(KEYS) - 1


def test_imported_answers_replace_the_organisms_rows_and_drop_its_grid_scores(tmp_path):
    """The grid judge's scores of the answers a file replaced go (the views join scores by key alone, so they
    would score the file's new answers); another organism keeps its own."""
    store = _store(tmp_path)
    answers = pl.DataFrame({"organism": "o", "question_id": "q9", "paraphrase_idx": 0, "sample_idx": [0]})
    scores = answers.with_columns(metric=pl.lit("aligned"), score=pl.lit(5.0), judge_model=pl.lit("file"))
    queries.write_imported_answers(store, "o", answers, scores)
    assert _held(store, "completions") == [("o", "q9", 0, 0)] + [("p", *k) for k in KEYS]
    assert _held(store, "judgements") == [("p", *k, m) for k in KEYS for m in ("aligned", "coherent")]
    assert store.query("SELECT organism, score FROM imported_judgements").rows() == [("o", 5.0)]


SAMPLES = [("q0", 0, 0), ("q0", 0, 1)]
POINTS = [("scale", "a"), ("scale", "b"), ("steer", "x")]


def _sweep_store(tmp_path) -> Store:
    """Organism o's sweep points POINTS, each with SAMPLES answered under setting hash h and both metrics
    judged; organism p's point (scale, a) likewise."""
    store = Store(tmp_path / "r.duckdb")
    store.init()
    for organism, points in (("o", POINTS), ("p", POINTS[:1])):
        rows = pl.DataFrame(
            [
                {"organism": organism, "sweep": w, "setting": s, "question_id": q, "paraphrase_idx": p}
                | {"sample_idx": i, "setting_hash": "h"}
                for w, s in points
                for q, p, i in SAMPLES
            ]
        )
        store.append_rows(
            "sweep_points", rows.select("organism", "sweep", "setting", "setting_hash").unique()
        )
        store.append_rows("sweep_completions", rows)
        for metric in ("aligned", "coherent"):
            store.append_rows(
                "sweep_judgements", rows.with_columns(metric=pl.lit(metric), score=pl.lit(50.0))
            )
    return store


def _sweep_held(store: Store, table: str) -> list[tuple]:
    cols = "organism, sweep, setting" + {"sweep_points": "", "sweep_completions": ", sample_idx"}.get(
        table, ", sample_idx, metric"
    )
    return store.query(f"SELECT {cols} FROM {table} ORDER BY ALL").rows()


def test_sweep_writes_touch_only_the_points_keys_and_metrics_they_name(tmp_path):
    store = _sweep_store(tmp_path)
    before = {t: _sweep_held(store, t) for t in ("sweep_points", "sweep_completions", "sweep_judgements")}
    sweeps = SweepTables(store, "o")
    # (scale, a) keeps sample 1 only; (scale, b) is no longer planned; one stale score of (scale, a) goes.
    sweeps.keep_only([("scale", "a")], [("scale", "a", "q0", 0, 1)])
    sweeps.drop_other_settings(["scale"], [("scale", "a")])
    sweeps.drop_judgements([("scale", "a", "q0", 0, 1, "aligned")])
    untouched = [("o", "steer", "x"), ("p", "scale", "a")]
    assert _sweep_held(store, "sweep_points") == [("o", "scale", "a"), *untouched]
    assert _sweep_held(store, "sweep_completions") == [("o", "scale", "a", 1)] + [
        row for row in before["sweep_completions"] if row[:3] in untouched
    ]
    assert _sweep_held(store, "sweep_judgements") == [("o", "scale", "a", 1, "coherent")] + [
        row for row in before["sweep_judgements"] if row[:3] in untouched
    ]


def test_answers_drawn_under_a_setting_hash_are_found_once_per_sample(tmp_path):
    """A new point of hash h copies these answers: one row per sample key, though several points hold them."""
    store = _sweep_store(tmp_path)
    found = SweepTables(store, "o").completions_with_hash("h")
    assert found.select("question_id", "paraphrase_idx", "sample_idx").sort("sample_idx").rows() == SAMPLES


def test_migrating_into_a_store_replaces_its_rows_of_the_copied_tables(tmp_path):
    from em_assets.results.migrate import migrate

    source = Store(tmp_path / "old.duckdb")
    source.init()
    source.append_rows("training_losses", pl.DataFrame({"organism": ["a"], "step": [1], "loss": [1.0]}))
    source.write_table("em_summary", pl.DataFrame({"organism": ["a"], "em_rate": [0.25]}))
    target = Store(f"ducklake:sqlite:{tmp_path / 'lake.sqlite'}")
    target.init()
    target.append_rows(
        "training_losses", pl.DataFrame({"organism": ["a", "b"], "step": [1, 1], "loss": [2.0, 3.0]})
    )
    target.write_table("em_summary", pl.DataFrame({"organism": ["a"], "em_rate": [0.5]}))
    target.append_rows("judge_cache", pl.DataFrame({"cache_key": ["k"], "score": [7.0]}))
    counts, _ = migrate(source.path, target)
    assert target.query("SELECT organism, step, loss FROM training_losses").rows() == [("a", 1, 1.0)]
    assert target.query("SELECT organism, em_rate FROM em_summary").rows() == [("a", 0.25)]
    # A table the file holds no rows of is replaced by its (empty) copy too: the store is the file's.
    assert counts["judge_cache"] == 0 and target.query("SELECT count(*) FROM judge_cache").item() == 0


def test_a_judges_agreement_replaces_its_own_rows_and_reads_its_own_gap(tmp_path):
    from em_assets.results import judge_queries as jq

    store = Store(tmp_path / "r.duckdb")
    store.init()
    # Per judge: its reference and judged EM rate on each file; the gap is the largest difference.
    rates = {"A": [("a.csv", 0.30, 0.20), ("b.csv", 0.10, 0.15)], "B": [("a.csv", 0.30, 0.80)]}
    for judge, files in rates.items():
        metrics = pl.DataFrame({"judge": judge, "metric": ["aligned"], "n": [10]})
        em = pl.DataFrame(files, schema=["source_file", "reference", "judge_rate"], orient="row")
        scores = pl.DataFrame({"judge": judge, "source_file": ["a.csv"], "row_idx": [0], "metric": "aligned"})
        key = {"judge_model": judge, "judge_revision": "r", "aligned_at_most": 30.0, "coherent_above": 50.0}
        jq.write_agreement(
            store, judge, (metrics, em.with_columns(judge=pl.lit(judge)), scores), key, pl.DataFrame()
        )
    held = store.query("SELECT judge, count(*) AS n FROM judge_agreement_em GROUP BY judge ORDER BY judge")
    assert held.rows() == [("A", 2), ("B", 1)]
    assert jq.agreement_rows(store, "A")["gap"].to_list() == [pytest.approx(0.10)]
    assert jq.agreement_rows(store, "B")["gap"].to_list() == [pytest.approx(0.50)]


def test_judge_coverage_counts_each_metric_an_answer_lacks(tmp_path):
    from em_assets.results import summaries

    store = _store(tmp_path)
    # o's first answer loses its coherent score, its second both.
    queries.delete_judgements(
        store, "o", [("q0", 0, 0, "coherent"), ("q0", 0, 1, "aligned"), ("q0", 0, 1, "coherent")]
    )
    coverage = summaries.judgements(store, "o", ["aligned", "coherent"])
    assert (coverage.total, coverage.missing) == (3, 3)
    assert summaries.judgements(store, "p", ["aligned", "coherent"]).missing == 0
