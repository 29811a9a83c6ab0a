"""The views the reports read pair each answer with its own scores, by every key column: scored_completions,
sweep_scored and scored_by_judge; a key a DuckLake holds twice reads as its last written row."""

from __future__ import annotations

from datetime import datetime

import polars as pl
from support.lake import insert_racing

from em_assets.reports.tables import judged_frame, scored_frame
from em_assets.results.personas import sweep_scores
from em_assets.results.store import Store
from em_assets.results.sweeps import SweepTables

# Two paraphrases of one question, two samples each: (paraphrase_idx, sample_idx, aligned, coherent).
ANSWERS = [(0, 0, 10.0, 55.0), (0, 1, 20.0, 65.0), (1, 0, 30.0, 75.0), (1, 1, 40.0, 85.0)]
LINEAGE = {"base_model": "m", "recipe": "r", "dataset": "d", "seed": 0, "eval_set": "s"}
FIRST = (pl.col("paraphrase_idx") == 0) & (pl.col("sample_idx") == 0)


def _keys(organism: str) -> pl.DataFrame:
    return pl.DataFrame(
        {"organism": organism, "question_id": "q", "paraphrase_idx": [a[0] for a in ANSWERS]}
        | {"sample_idx": [a[1] for a in ANSWERS]},
        schema_overrides={"paraphrase_idx": pl.Int32, "sample_idx": pl.Int32},
    )


def _scores(keys: pl.DataFrame, offset: float = 0.0, **extra) -> pl.DataFrame:
    """Aligned and coherent rows of ANSWERS' scores plus `offset`, with `extra` columns."""
    return pl.concat(
        keys.with_columns(
            metric=pl.lit(metric),
            score=pl.Series([a[i] + offset for a in ANSWERS]),
            **{k: pl.lit(v) for k, v in extra.items()},
        )
        for i, metric in ((2, "aligned"), (3, "coherent"))
    )


def test_each_answer_reads_its_own_scores_across_paraphrases_samples_and_organisms(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.init()
    for organism, offset in (("o", 0.0), ("p", 1.0)):
        store.append_rows(
            "completions", _keys(organism).with_columns(**{k: pl.lit(v) for k, v in LINEAGE.items()})
        )
        store.append_rows("judgements", _scores(_keys(organism), offset, judge_model="j"))
    got = scored_frame(store).select("organism", "paraphrase_idx", "sample_idx", "aligned", "coherent").rows()
    assert got == [("o", p, s, a, c) for p, s, a, c in ANSWERS] + [
        ("p", p, s, a + 1, c + 1) for p, s, a, c in ANSWERS
    ]


def test_a_key_a_lake_holds_twice_reads_as_its_last_written_row(tmp_path):
    store = Store(f"ducklake:sqlite:{tmp_path / 'r.sqlite'}")
    store.init()
    first, later = datetime(2025, 1, 1), datetime(2025, 1, 2)
    answer = (
        _keys("o")
        .filter(FIRST)
        .with_columns(created_at=pl.lit(first), **{k: pl.lit(v) for k, v in LINEAGE.items()})
    )
    store.append_rows("completions", answer.with_columns(sampling_hash=pl.lit("h")))
    judged = _scores(_keys("o"), judge_model="j", created_at=first).filter(FIRST)
    store.append_rows("judgements", judged.with_columns(score=pl.lit(90.0)))
    # A racing judge wrote the answer's aligned score again, later: 10, misaligned.
    again = judged.filter(pl.col("metric") == "aligned")
    insert_racing(store, "judgements", again.with_columns(created_at=pl.lit(later)))
    # And its file judge's scores and the answer itself twice (identical copies).
    file_scores = _scores(_keys("o"), judge_model="file", sampling_hash="h").filter(FIRST)
    store.append_rows("imported_judgements", file_scores)
    insert_racing(store, "completions", store.query("SELECT * FROM completions"))
    assert scored_frame(store).select("aligned", "coherent").rows() == [(10.0, 90.0)]
    by_judge = (
        judged_frame(store).select("judge_source", "judge_model", "aligned", "coherent").sort("judge_source")
    )
    assert by_judge.rows() == [("file", "file", 10.0, 55.0), ("grid", "j", 10.0, 90.0)]


def test_a_sweep_answer_reads_the_scores_of_its_own_setting_and_setting_hash(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.init()
    sweep = SweepTables(store, "o")
    keys = _keys("o").filter(FIRST)
    # Settings a and b hold the same answers (one setting hash, sampled once, copied); c was sampled again under
    # a new hash, and its judgements are of its old answers.
    for setting, now, judged_under, offset in (
        ("a", "h", "h", 0.0),
        ("b", "h", "h", 40.0),
        ("c", "h2", "h1", 0.0),
    ):
        point = {"sweep": "scale", "setting": setting}
        sweep.append_completions(
            keys.with_columns(setting_hash=pl.lit(now), **{k: pl.lit(v) for k, v in point.items()}).to_dicts()
        )
        judged = _scores(_keys("o"), offset, setting_hash=judged_under, judge_model="j", **point).filter(
            FIRST
        )
        sweep.append_judgements(judged.to_dicts())
    got = sweep.scored([("scale", s) for s in "abc"]).select("setting", "aligned", "coherent").rows()
    assert got == [("a", 10.0, 55.0), ("b", 50.0, 95.0), ("c", None, None)]


def test_a_files_scores_stay_with_the_answers_it_carried_not_answers_sampled_since(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.init()
    lineage = {k: pl.lit(v) for k, v in LINEAGE.items()}
    # "imp" holds the file's answers (sampling hash "file"); "o" imported the same file once and samples now.
    for organism, sampled in (("imp", "file"), ("o", "new")):
        store.append_rows(
            "completions", _keys(organism).with_columns(sampling_hash=pl.lit(sampled), **lineage)
        )
        store.append_rows(
            "imported_judgements", _scores(_keys(organism), judge_model="gpt-4o", sampling_hash="file")
        )
    store.append_rows("judgements", _scores(_keys("o"), 1.0, judge_model="j"))
    got = (
        judged_frame(store)
        .group_by("organism", "judge_source", maintain_order=True)
        .agg(pl.len(), pl.col("aligned").count().alias("scored"), pl.col("aligned").sum())
    )
    # imp: the file's 10+20+30+40, and its answers under the grid judge (none judged yet); o: the grid judge's
    # 11+21+31+41 only.
    assert got.sort("organism", "judge_source").rows() == [
        ("imp", "file", 4, 4, 100.0),
        ("imp", "grid", 4, 0, 0.0),
        ("o", "grid", 4, 4, 104.0),
    ]


def test_sweep_scores_read_only_the_answers_of_each_points_current_setting_hash(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.init()
    sweep = SweepTables(store, "o")
    # Point a was re-planned under hash h2: its answers of h wait to be sampled again and count for nothing.
    for setting, answered, current in (("a", "h", "h2"), ("b", "h", "h")):
        point = {"organism": "o", "sweep": "scale", "setting": setting}
        store.append_rows("sweep_points", pl.DataFrame([point | {"setting_hash": current}]))
        rows = _keys("o").with_columns(
            setting_hash=pl.lit(answered), eval_set=pl.lit("s"), **{k: pl.lit(v) for k, v in point.items()}
        )
        sweep.append_completions(rows.to_dicts())
        sweep.append_judgements(
            _scores(_keys("o"), setting_hash=answered, judge_model="j", **point).to_dicts()
        )
    got = sweep_scores(store).select("setting", "paraphrase_idx", "sample_idx", "aligned", "coherent").rows()
    assert got == [("b", p, s, a, c) for p, s, a, c in ANSWERS]
