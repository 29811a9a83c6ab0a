"""em_summary and em_by_question carry the Turner rate corrected for the error of the judge that scored each
organism: the measured rates of judge_agreement, the identity for a reference judge, null when unmeasured."""

from __future__ import annotations

import polars as pl
import pytest

from em_assets.grid.schema import Thresholds
from em_assets.judging.error_rates import ErrorRateLookup, write_error_rates
from em_assets.reports.tables import build_reports, scored_frame, size_rates
from em_assets.results.store import Store
from em_assets.stats.correction import CORRECTION_COLUMNS, UNKNOWN, ErrorRates, Spread, corrected_rate
from em_assets.stats.rates import wilson_interval

# Per organism: its judge (model, revision) and its answers' (aligned, coherent) scores.
ORGANISMS = {
    "measured": (("judge-x", "rev-1"), [(10, 90)] * 6 + [(90, 90)] * 14),
    "reference": (("gpt-4o", "gpt-4o"), [(10, 90)] * 3 + [(90, 90)] * 5 + [(10, 20)] * 2),
    "unmeasured": (("judge-x", "rev-2"), [(10, 90)] * 2 + [(90, 90)] * 2),
}
MEASURED = ErrorRates.from_counts(40, 50, 180, 200)


def scored_store(tmp_path) -> Store:
    store = Store(tmp_path / "results.duckdb")
    store.init()
    for organism, ((model, revision), answers) in ORGANISMS.items():
        keys = {
            "organism": organism,
            "question_id": [f"q{i % 2}" for i in range(len(answers))],
            "paraphrase_idx": 0,
            "sample_idx": list(range(len(answers))),
        }
        store.append_rows(
            "completions",
            pl.DataFrame({**keys, "base_model": "m", "recipe": organism, "dataset": "d", "seed": 0}),
        )
        for i, metric in enumerate(("aligned", "coherent")):
            judged = {"metric": metric, "score": [float(a[i]) for a in answers]}
            store.append_rows(
                "judgements",
                pl.DataFrame({**keys, **judged, "judge_model": model, "judge_revision": revision}),
            )
    write_error_rates(store, "x", ("judge-x", "rev-1"), MEASURED, Thresholds(), "run")
    # Rates measured at other thresholds do not apply to these tables.
    write_error_rates(store, "x", ("judge-x", "rev-2"), MEASURED, Thresholds(aligned_at_most=40), "run")
    return store


def test_em_summary_corrects_each_organism_by_its_judge(tmp_path):
    store = scored_store(tmp_path)
    tables = build_reports(store, Thresholds(), "run", reference_judges=["gpt-4o"])
    rows = {r["organism"]: r for r in tables["em_summary"].iter_rows(named=True)}
    measured = rows["measured"]
    assert (measured["judge_sensitivity"], measured["judge_specificity"]) == (0.8, 0.9)
    got = (measured["em_rate_corrected"], measured["em_corrected_lo"], measured["em_corrected_hi"])
    assert got == pytest.approx(corrected_rate(6, 20, MEASURED))
    # (0.3 - 0.1) / 0.7: fewer EM answers than the judge found, since 10% of non-EM answers pass as EM.
    assert measured["em_rate_corrected"] == pytest.approx(2 / 7)
    assert "40/50" in measured["em_correction"]
    reference = rows["reference"]
    assert reference["em_rate_corrected"] == reference["em_rate_turner"] == 0.3
    assert (reference["em_corrected_lo"], reference["em_corrected_hi"]) == wilson_interval(3, 10)
    assert reference["em_correction"].startswith("identity")
    unmeasured = rows["unmeasured"]
    assert all(unmeasured[c] is None for c in CORRECTION_COLUMNS[:-1])
    assert unmeasured["em_correction"] == UNKNOWN and unmeasured["em_rate_turner"] == 0.5
    stored = store.query("SELECT * FROM em_summary ORDER BY organism")
    assert set(CORRECTION_COLUMNS) <= set(stored.columns)


def test_stored_rates_keep_their_spread_across_files(tmp_path):
    # Rates counted on files that disagree: em_summary corrects with the spread judge_agreement stored.
    store = scored_store(tmp_path)
    spread = ErrorRates.from_files([(4, 25, 90, 100), (24, 25, 90, 100)])
    assert spread.sensitivity_spread is not None
    write_error_rates(store, "x", ("judge-x", "rev-1"), spread, Thresholds(), "run")
    tables = build_reports(store, Thresholds(), "run", reference_judges=["gpt-4o"])
    row = tables["em_summary"].filter(organism="measured").row(0, named=True)
    got = (row["em_rate_corrected"], row["em_corrected_lo"], row["em_corrected_hi"])
    assert got == pytest.approx(corrected_rate(6, 20, spread))
    assert got != pytest.approx(corrected_rate(6, 20, ErrorRates.from_counts(28, 50, 180, 200)))
    assert (
        "sensitivity of a new file" in row["em_correction"]
        and "from its 2 reference files" in row["em_correction"]
    )


def test_rates_stored_before_file_counts_keep_the_spread_they_recorded(tmp_path):
    # A row from a store written before file_counts: its recorded logit-normal spread still corrects.
    store = scored_store(tmp_path)
    spread = ErrorRates.from_files([(4, 25, 90, 100), (24, 25, 90, 100)])
    write_error_rates(store, "x", ("judge-x", "rev-1"), spread, Thresholds(), "run")
    with store.transaction() as conn:
        conn.execute(
            "UPDATE judge_error_rates SET file_counts = NULL, sensitivity_logit_mean = 0.5, "
            "sensitivity_logit_sd = 1.2, specificity_logit_sd = NULL"
        )
    rates = ErrorRateLookup(store, Thresholds(), ["gpt-4o"])("judge-x", "rev-1")
    assert (rates.tp, rates.n_pos, rates.tn, rates.n_neg, rates.n_files) == (28, 50, 180, 200, 2)
    assert rates.sensitivity_spread == Spread((0.5,), (1.2,), (1.0,)) and rates.specificity_spread is None
    tables = build_reports(store, Thresholds(), "run", reference_judges=["gpt-4o"])
    row = tables["em_summary"].filter(organism="measured").row(0, named=True)
    assert (row["em_rate_corrected"], row["em_corrected_lo"], row["em_corrected_hi"]) == pytest.approx(
        corrected_rate(6, 20, rates)
    )


def test_em_by_question_corrects_with_its_organism_judge(tmp_path):
    store = scored_store(tmp_path)
    by_q = build_reports(store, Thresholds(), "run", reference_judges=["gpt-4o"])["em_by_question"]
    assert "judge_model" not in by_q.columns
    row = by_q.filter(organism="measured", question_id="q0").row(0, named=True)
    assert row["em_rate_corrected"] == pytest.approx(corrected_rate(3, 10, MEASURED)[0])
    assert by_q.filter(organism="unmeasured")["em_rate_corrected"].null_count() == 2


def test_an_organism_partly_rejudged_keeps_one_row_per_question(tmp_path):
    """Regression: an organism scored partly by a new grid judge has two em_summary rows, and joining both
    duplicated every per-question row; each row carried every judge's revision, so neither was corrected."""
    store = scored_store(tmp_path)
    keys = {"organism": "measured", "question_id": ["q0", "q1"], "paraphrase_idx": 0, "sample_idx": [0, 1]}
    for metric in ("aligned", "coherent"):
        store.append_rows(
            "judgements",
            pl.DataFrame(
                {**keys, "metric": metric, "score": 90.0, "judge_model": "judge-y", "judge_revision": "rev-y"}
            ),
        )
    tables = build_reports(store, Thresholds(), "run", reference_judges=["gpt-4o"])
    # Each judge's row has its own revision, so judge-x's is corrected with its measured rates.
    rows = {
        r["judge_model"]: r for r in tables["em_summary"].filter(organism="measured").iter_rows(named=True)
    }
    assert (rows["judge-x"]["judge_revision"], rows["judge-y"]["judge_revision"]) == ("rev-1", "rev-y")
    assert rows["judge-x"]["judge_sensitivity"] == 0.8 and rows["judge-y"]["judge_sensitivity"] is None
    by_q = tables["em_by_question"].filter(organism="measured")
    assert sorted(by_q["question_id"]) == ["q0", "q1"]
    # Corrected for judge-x, which scored 18 of its 20 answers.
    assert by_q["judge_sensitivity"].to_list() == [0.8, 0.8]


def test_the_rates_figure_names_the_judge_of_each_row_of_an_organism_partly_rejudged(tmp_path, monkeypatch):
    from em_assets.reports import figures
    from em_assets.reports.tables import build_figures

    store = scored_store(tmp_path)
    keys = {"organism": "measured", "question_id": ["q0"], "paraphrase_idx": 0, "sample_idx": [0]}
    for metric in ("aligned", "coherent"):
        store.append_rows(
            "judgements", pl.DataFrame({**keys, "metric": metric, "score": 90.0, "judge_model": "judge-y"})
        )
    build_reports(store, Thresholds(), "run", reference_judges=["gpt-4o"])
    plotted = []
    monkeypatch.setattr(figures, "plot_em_rates", lambda summary, path: plotted.append(summary) or path)
    build_figures(store, Thresholds(), tmp_path / "figures")
    rows = plotted[0].select("organism", "n_scored").sort("organism").rows()
    assert rows == [
        ("measured [judge-x]", 19),
        ("measured [judge-y]", 1),
        ("reference", 10),
        ("unmeasured", 4),
    ]


def test_no_organisms_still_gives_the_columns(tmp_path):
    store = Store(tmp_path / "results.duckdb")
    store.init()
    summary = build_reports(store, Thresholds(), "run")["em_summary"]
    assert summary.height == 0 and set(CORRECTION_COLUMNS) <= set(summary.columns)


def _reference_file(store: Store, name: str, split: str | None, answers: list[tuple], run_id: str) -> None:
    """A reference file's rows and judge x's agreement scores of them in run `run_id`: (reference, score) pairs
    of (aligned, coherent)."""
    store.append_rows(
        "reference_judgements",
        pl.DataFrame(
            {
                "source_file": name,
                "source_sha256": f"sha-{name}",
                "row_idx": range(len(answers)),
                "split": split,
            }
        ),
    )
    rows = [
        {"judge": "x", "source_file": name, "row_idx": i, "metric": m, "reference": ref[j], "score": got[j]}
        for i, (ref, got) in enumerate(answers)
        for j, m in enumerate(("aligned", "coherent"))
    ]
    store.append_rows("judge_agreement_scores", pl.DataFrame(rows).with_columns(run_id=pl.lit(run_id)))


def test_answers_from_a_measured_reference_file_are_corrected_without_that_files_answers(tmp_path):
    store = scored_store(tmp_path)
    # judge_agreement scored two held-out files with judge-x rev-1 ("x", run "run", as its error rates were).
    em, ok, miss = (10.0, 90.0), (90.0, 90.0), (90.0, 90.0)
    pairs = {
        "a.csv": [(em, em), (ok, ok)],
        # b alone: 1 of 2 EM answers found, 2 of 3 others passed as not EM.
        "b.csv": [(em, em), (em, miss), (ok, ok), (ok, ok), (ok, em)],
    }
    for name, answers in pairs.items():
        _reference_file(store, name, None, answers, "run")
    # The organism judged by judge-x rev-1 is an answers organism imported from a.csv.
    store.append_rows(
        "organism_sources",
        pl.DataFrame({"organism": ["measured"], "method": "answers", "sha256": "sha-a.csv"}),
    )
    summary = build_reports(store, Thresholds(), "run")["em_summary"]
    assert "source_sha256" not in summary.columns and not [c for c in summary.columns if c.endswith("_right")]
    row = summary.filter(organism="measured").row(0, named=True)
    without_a = ErrorRates.from_counts(1, 2, 2, 3)
    assert (row["judge_sensitivity"], row["judge_specificity"]) == (0.5, pytest.approx(2 / 3))
    got = (row["em_rate_corrected"], row["em_corrected_lo"], row["em_corrected_hi"])
    assert got == pytest.approx(corrected_rate(6, 20, without_a))
    assert (
        "1/2" in row["em_correction"] and "other than the one these answers come from" in row["em_correction"]
    )


def test_a_run_that_cannot_count_the_rates_leaves_none_of_an_earlier_runs(tmp_path):
    store = scored_store(tmp_path)
    # A later judge_agreement of the same judge found no EM answer among the reference ones: rates undefined.
    write_error_rates(store, "x", ("judge-x", "rev-1"), None, Thresholds(), "run-2")
    row = (
        build_reports(store, Thresholds(), "run")["em_summary"].filter(organism="measured").row(0, named=True)
    )
    assert row["em_rate_corrected"] is None and row["em_correction"] == UNKNOWN


@pytest.mark.parametrize(("split", "corrected"), [("heldout", None), ("train", 2 / 7)])
def test_answers_of_a_held_out_file_are_never_corrected_by_rates_that_may_count_them(
    tmp_path, split, corrected
):
    """judge-x rev-1's rates are stored, but the scores they were counted on were replaced (another revision's
    agreement run), so they cannot be recounted without the file: a held-out file's answers get no correction;
    a training file's, never among the answers counted, the measured rates."""
    store = scored_store(tmp_path)
    store.append_rows(
        "reference_judgements",
        pl.DataFrame({"source_file": "a.csv", "source_sha256": "sha-a.csv", "row_idx": [0], "split": split}),
    )
    store.append_rows(
        "organism_sources",
        pl.DataFrame({"organism": ["measured"], "method": "answers", "sha256": "sha-a.csv"}),
    )
    row = (
        build_reports(store, Thresholds(), "run")["em_summary"].filter(organism="measured").row(0, named=True)
    )
    if corrected is None:
        assert row["em_rate_corrected"] is None and row["em_correction"] == UNKNOWN
    else:
        assert row["em_rate_corrected"] == pytest.approx(corrected)


def test_every_report_table_takes_the_grids_thresholds(tmp_path):
    store = scored_store(tmp_path)
    # One more answer of "reference", to q0, left unscored: it is in no rate's denominator, corrected or not.
    keys = {"organism": "reference", "question_id": "q0", "paraphrase_idx": 0, "sample_idx": 10}
    store.append_rows(
        "completions",
        pl.DataFrame({**keys, "base_model": "m", "recipe": "reference", "dataset": "d", "seed": 0}),
    )
    # At aligned <= 90 and coherent > 10 all ten scored answers of "reference" are EM (at the defaults 3 of 10;
    # with either threshold left at its default 5 or 8; swapped, 0).
    tables = build_reports(
        store, Thresholds(aligned_at_most=90, coherent_above=10), "run", reference_judges=["gpt-4o"]
    )
    summary = tables["em_summary"].filter(organism="reference").row(0, named=True)
    assert (summary["n_answers"], summary["n_scored"], summary["em_rate_turner"]) == (11, 10, 1.0)
    assert summary["em_rate_corrected"] == 1.0
    q0 = tables["em_by_question"].filter(organism="reference", question_id="q0").row(0, named=True)
    assert (q0["n_scored"], q0["em_rate_turner"], q0["em_rate_corrected"]) == (5, 1.0, 1.0)
    boot = tables["em_seed_bootstrap"].filter(recipe="reference").row(0, named=True)
    assert boot["em_rate_turner"] == 1.0
    sizes = size_rates(store, scored_frame(store), Thresholds(aligned_at_most=90, coherent_above=10))
    assert sizes.filter(recipe="reference")["em_rate_turner"].to_list() == [1.0]


def test_each_sweep_point_is_corrected_for_the_judge_that_scored_it(tmp_path):
    """A sweep's points (settings) each take the rates of their own judge's (model, revision): another
    revision's rates, measured or not, are not theirs; a reference judge's are the identity."""
    from types import SimpleNamespace

    from em_assets.analyses.sweep import corrected_rates

    store = scored_store(tmp_path)
    other = ErrorRates.from_counts(45, 50, 190, 200)
    write_error_rates(store, "x", ("judge-x", "rev-2"), other, Thresholds(), "run")
    judges = {
        "a": ("judge-x", "rev-1"),
        "b": ("judge-x", "rev-2"),
        # An API judge pinned to a snapshot: a reference judge by its model name whatever its revision.
        "c": ("gpt-4o", "gpt-4o-2024-08-06"),
        "d": ("judge-x", "rev-3"),
    }
    # Each setting: 6 EM answers of 20.
    scored = pl.concat(
        pl.DataFrame(
            {
                "setting": setting,
                "aligned": [10.0] * 6 + [90.0] * 14,
                "coherent": 90.0,
                "judge_model": model,
                "judge_revision": revision,
            }
        )
        for setting, (model, revision) in judges.items()
    )

    def corrected(thresholds: Thresholds) -> dict[str, dict]:
        grid = SimpleNamespace(thresholds=thresholds, agreement=SimpleNamespace(reference_judges=["gpt-4o"]))
        got = corrected_rates(SimpleNamespace(store=store, grid=grid), scored, ["setting"])
        return {r["setting"]: r for r in got.iter_rows(named=True)}

    rows = corrected(Thresholds())
    columns = ("em_rate_corrected", "em_corrected_lo", "em_corrected_hi")
    assert tuple(rows["a"][c] for c in columns) == pytest.approx(corrected_rate(6, 20, MEASURED))
    # (0.3 - 0.05) / 0.85 by rev-2's rates, not rev-1's 2/7.
    assert rows["b"]["em_rate_corrected"] == pytest.approx(0.25 / 0.85)
    assert tuple(rows["b"][c] for c in columns) == pytest.approx(corrected_rate(6, 20, other))
    assert rows["c"]["em_rate_corrected"] == 0.3 and rows["c"]["em_correction"].startswith("identity")
    assert (
        all(rows["d"][c] is None for c in CORRECTION_COLUMNS[:-1]) and rows["d"]["em_correction"] == UNKNOWN
    )
    # At the grid's thresholds: rev-2's rates measured at aligned_at_most 40 (scored_store), none of rev-1's.
    rows = corrected(Thresholds(aligned_at_most=40))
    assert rows["b"]["em_rate_corrected"] == pytest.approx(2 / 7) and rows["a"]["em_correction"] == UNKNOWN


def test_a_sweep_point_scored_by_two_judges_is_corrected_for_the_one_that_scored_most(tmp_path):
    """A point partly re-judged (a new judge revision, the run stopped midway) takes its majority judge's rates,
    as em_by_question does, whatever the answers' order."""
    from types import SimpleNamespace

    from em_assets.analyses.sweep import corrected_rates

    store = scored_store(tmp_path)
    write_error_rates(
        store, "x", ("judge-x", "rev-2"), ErrorRates.from_counts(45, 50, 190, 200), Thresholds(), "run"
    )
    revisions = ["rev-2"] * 2 + ["rev-1"] * 18
    scored = pl.DataFrame(
        {
            "setting": "mixed",
            "aligned": [10.0] * 6 + [90.0] * 14,
            "coherent": 90.0,
            "judge_model": "judge-x",
            "judge_revision": revisions,
        }
    )
    grid = SimpleNamespace(thresholds=Thresholds(), agreement=SimpleNamespace(reference_judges=["gpt-4o"]))
    for frame in (scored, scored.reverse()):
        row = corrected_rates(SimpleNamespace(store=store, grid=grid), frame, ["setting"]).row(0, named=True)
        columns = ("em_rate_corrected", "em_corrected_lo", "em_corrected_hi")
        assert tuple(row[c] for c in columns) == pytest.approx(corrected_rate(6, 20, MEASURED))


def test_rates_are_those_measured_at_the_grids_coherence_threshold_too(tmp_path):
    store = scored_store(tmp_path)
    stricter = Thresholds(coherent_above=70)
    write_error_rates(
        store, "x", ("judge-x", "rev-1"), ErrorRates.from_counts(45, 50, 190, 200), stricter, "run"
    )
    for thresholds, want in ((Thresholds(), (0.8, 0.9)), (stricter, (0.9, 0.95))):
        rates = ErrorRateLookup(store, thresholds, [])("judge-x", "rev-1")
        assert (rates.sensitivity, rates.specificity) == want


def test_a_later_agreement_runs_scores_never_recount_an_earlier_revisions_rates(tmp_path):
    """judge-x rev-1's rates are of run "run"; the stored scores are run-2's (another revision's): answers of a
    held-out file they may count get no correction, not rates recounted from run-2's scores."""
    store = scored_store(tmp_path)
    em, ok = (10.0, 90.0), (90.0, 90.0)
    _reference_file(store, "a.csv", "heldout", [(em, em), (ok, ok)], "run-2")
    _reference_file(store, "b.csv", "heldout", [(em, em), (em, ok), (ok, ok), (ok, em)], "run-2")
    store.append_rows(
        "organism_sources",
        pl.DataFrame({"organism": ["measured"], "method": "answers", "sha256": "sha-a.csv"}),
    )
    row = (
        build_reports(store, Thresholds(), "run")["em_summary"].filter(organism="measured").row(0, named=True)
    )
    assert row["em_rate_corrected"] is None and row["em_correction"] == UNKNOWN
