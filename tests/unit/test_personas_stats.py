"""Simulator Theory statistics on synthetic data with known answers: mixture weights, BIC, the shared-shape
test, a logistic transition point, Kendall's W by hand, Spearman's interval and difference intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from em_assets.stats import concordance, mixtures
from em_assets.stats.transition import fit_transition

# Weights are recovered within this absolute error from 400 draws per point (the binomial standard error of a
# weight near 0.5 is 0.025 at that size; the components overlap a little).
WEIGHT_TOLERANCE = 0.06


def _two_personas(rng, n: int, weight: float) -> np.ndarray:
    """Judge-like scores: a misaligned mode near 10 and an aligned one near 90, on 0-100."""
    bad = rng.random(n) < weight
    return 100 * np.where(bad, rng.beta(1.5, 12, n), rng.beta(12, 1.5, n))


def test_shared_mixture_recovers_each_points_weight_and_prefers_two_components():
    rng = np.random.default_rng(3)
    truth = (0.05, 0.25, 0.5)
    groups = [mixtures.to_unit(_two_personas(rng, 400, w)) for w in truth]
    result = mixtures.compare(groups)
    assert result.shared.weights == pytest.approx(truth, abs=WEIGHT_TOLERANCE)
    assert result.prefers_two and result.bic_two < result.bic_one - 10
    low, high = result.shared.shapes
    assert low.mean < 20 < 80 < high.mean
    # The shapes really are shared, so the test of free shapes finds nothing.
    assert result.lrt_df == 8 and result.lrt_p > 0.01
    lo, hi = mixtures.weight_interval(groups[1], result.shared.shapes)
    assert lo < truth[1] < hi and hi - lo < 0.2


def test_one_peak_prefers_one_component():
    rng = np.random.default_rng(4)
    groups = [mixtures.to_unit(100 * rng.beta(8, 3, 400)) for _ in range(3)]
    assert not mixtures.compare(groups).prefers_two


def test_two_modes_with_no_score_at_or_below_the_threshold_are_two_components():
    """Regression: EM started from the threshold's split, which gives every value the same responsibility when
    none lies at or below 30; it stayed with two identical components and BIC preferred one peak."""
    rng = np.random.default_rng(0)
    groups = [
        100 * np.where(rng.random(200) < w, rng.beta(80, 120, 200), rng.beta(40, 5, 200)) for w in (0.2, 0.4)
    ]
    assert min(g.min() for g in groups) > mixtures.SPLIT_SCORE
    result = mixtures.compare([mixtures.to_unit(g) for g in groups])
    # The modes (near 40 and 89) barely overlap: each weight is the share of answers in the lower one.
    assert result.prefers_two and result.shared.weights == pytest.approx(
        [(g < 60).mean() for g in groups], abs=0.01
    )
    assert result.shared.shapes[0].mean == pytest.approx(40, abs=2)


def test_a_misaligned_mode_piled_at_zero_keeps_its_component_beside_a_few_middling_scores():
    """Regression: the fit kept the likelier of the threshold's and the median's starts; with scores in steps of
    5, a misaligned mode piled at 0 and 4% middling answers, the median's was a broad component over both (mean
    58, weights 0.40 and 0.37), which the report reads as no misaligned mode and gives no weight."""
    rng = np.random.default_rng(0)

    def scores(n: int, misaligned: float) -> np.ndarray:
        kind = rng.choice(3, size=n, p=[misaligned, 0.04, 0.96 - misaligned])
        raw = np.where(
            kind == 0, rng.normal(10, 8, n), np.where(kind == 1, rng.normal(55, 12, n), rng.normal(92, 5, n))
        )
        return np.clip(5 * np.round(raw / 5), 0, 100)

    groups = [scores(300, 0.2), scores(300, 0.1)]
    fit = mixtures.fit_shared([mixtures.to_unit(g) for g in groups])
    assert fit.shapes[0].mean < mixtures.SPLIT_SCORE < fit.shapes[1].mean
    assert fit.weights == pytest.approx([(g <= mixtures.SPLIT_SCORE).mean() for g in groups], abs=0.02)


def test_shapes_that_move_between_points_fail_the_shared_shape_test():
    rng = np.random.default_rng(5)
    moved = 100 * np.where(rng.random(400) < 0.3, rng.beta(6, 6, 400), rng.beta(12, 1.5, 400))
    groups = [mixtures.to_unit(_two_personas(rng, 400, 0.3)), mixtures.to_unit(moved)]
    result = mixtures.compare(groups)
    assert result.lrt_df == 4 and result.lrt_p < 1e-3


def test_one_group_has_no_shape_test_and_bounds_keep_identical_scores_finite():
    result = mixtures.compare([mixtures.to_unit(np.full(30, 100.0))])
    assert result.lrt_p is None and math.isfinite(result.bic_one) and math.isfinite(result.bic_two)
    assert mixtures.to_unit(np.array([0.0, 100.0])) == pytest.approx([0.5 / 101, 100.5 / 101])
    # Two points, but one too small for a free two-component fit of its own.
    rng = np.random.default_rng(8)
    small = [mixtures.to_unit(_two_personas(rng, n, 0.3)) for n in (100, mixtures.MIN_FREE_ANSWERS - 1)]
    assert mixtures.compare(small).lrt_p is None


def test_logistic_fit_recovers_a_known_transition_point():
    rng = np.random.default_rng(6)
    x = np.arange(0, 101, 10.0)
    n = np.full(len(x), 400)
    k = rng.binomial(n, 0.4 / (1 + np.exp(-0.15 * (x - 45))))
    fit = fit_transition(x, k, n)
    assert fit.note is None and fit.midpoint == pytest.approx(45, abs=5)
    assert fit.midpoint_lo < 45 < fit.midpoint_hi
    assert fit.top == pytest.approx(0.4, abs=0.05) and fit.max_slope > 0


def test_logistic_fit_says_why_it_cannot_fit():
    assert "needs 4" in fit_transition([0, 1, 2], [0, 1, 2], [5, 5, 5]).note
    assert "no misaligned" in fit_transition([0, 1, 2, 3], [0, 0, 0, 0], [5, 5, 5, 5]).note
    # One misaligned answer in twenty at a middle point: nothing pins a rise.
    unpinned = fit_transition([0, 1, 2, 3], [0, 1, 0, 0], [5, 5, 5, 5])
    assert unpinned.midpoint_lo is None and unpinned.note is not None


@pytest.mark.parametrize("k", [[0, 0, 2, 5, 8, 10], [10, 8, 5, 2, 0, 0]])
def test_a_rise_to_every_answer_keeps_its_midpoint_interval(k):
    """Regression: a ceiling fitted at 1 has no curvature, and the whole interval was dropped as a flat fit."""
    fit = fit_transition(np.arange(6.0), k, [10] * 6)
    assert fit.top == pytest.approx(1.0) and "ceiling at 1" in fit.note
    mid = 3.0 if k[0] == 0 else 2.0
    assert fit.midpoint == pytest.approx(mid, abs=0.05)
    assert mid - 1.5 < fit.midpoint_lo < mid < fit.midpoint_hi < mid + 1.5


def test_a_step_through_a_point_at_half_the_rise_has_no_midpoint_interval():
    """Regression: the steepness grows without bound there, and the Wald interval (about 1 / s wide) only said
    where the optimiser stopped: [0.96, 1.04] for a midpoint anywhere between 0.5 and 1.5."""
    fit = fit_transition(np.arange(5.0), [0, 1, 2, 2, 2], [2] * 5)
    assert fit.midpoint == pytest.approx(1.0, abs=0.01) and fit.midpoint_lo is None
    assert "a step between two swept points" in fit.note


@pytest.mark.parametrize("last", [45.0, 41.0])
def test_a_step_within_the_midpoints_gap_has_no_midpoint_interval_however_close_other_points_are(last):
    """Regression: the rise was held against the sweep's narrowest gap, so a final checkpoint one step after the
    last kept one (40, 41) gave a Wald interval to a step that lies within the gap from 15 to 20."""
    x = np.array([0, 5, 10, 15, 20, 25, 30, 35, 40, last])
    # 5% to 95% of a rise of steepness 1.5 spans 3.9 steps, centred at 17.3.
    k = np.round(200 * 0.3 / (1 + np.exp(-1.5 * (x - 17.3))))
    fit = fit_transition(x, k, [200] * len(x))
    assert fit.midpoint == pytest.approx(17.3, abs=0.2) and fit.midpoint_lo is None
    assert "a step between two swept points" in fit.note


def test_a_midpoint_interval_over_ten_swept_ranges_wide_is_undefined():
    """Regression: the half-width was held against ten swept ranges, so intervals up to twenty wide were kept."""
    x = np.array([0.0, 4, 8, 12])
    fit = fit_transition(x, [1, 3, 3, 3], [8, 8, 8, 8])
    # The Wald interval here is about 11.6 swept ranges wide (half-width 5.8).
    assert fit.midpoint is not None and fit.midpoint_lo is None and fit.midpoint_hi is None
    assert "10 times the swept range" in fit.note


def test_kendalls_w_matches_a_hand_worked_example():
    # Three raters, four items. Rank sums: 1+1+2=4, 2+3+1=6, 3+2+3=8, 4+4+4=12 (mean 7.5);
    # S = 3.5^2 + 1.5^2 + 0.5^2 + 4.5^2 = 35; W = 12 S / (m^2 (n^3 - n)) = 420 / 540 = 7/9.
    ratings = np.array([[1, 2, 3, 4], [1, 3, 2, 4], [2, 1, 3, 4]])
    result = concordance.kendalls_w(ratings)
    assert result.w == pytest.approx(7 / 9)
    assert result.chi2 == pytest.approx(3 * 3 * 7 / 9)
    # Ties: rater 2 ties items 1 and 2 (ranks 1.5, 1.5, 3, 4; T = 2^3 - 2 = 6). Rank sums 3.5, 5.5, 9, 12;
    # S = 4^2 + 2^2 + 1.5^2 + 4.5^2 = 42.5; W = 12 S / (9 * 60 - 3 * 6) = 510 / 522.
    tied = np.array([[1, 2, 3, 4], [1, 1, 3, 4], [1.5, 2.5, 3, 4]])
    assert concordance.kendalls_w(tied).w == pytest.approx(510 / 522)
    assert concordance.kendalls_w(np.ones((3, 4))).note is not None


def test_spearman_interval_brackets_rho_and_needs_variation():
    x = np.arange(10.0)
    # A perfect ranking has no Fisher-z interval (clipping rho gave one that excluded it: 0.99994 to 1 - 2e-8
    # for 4 items, a ranking chance alone gives 1 time in 24).
    result = concordance.spearman(x, x**2)
    assert result.rho == pytest.approx(1.0) and (result.lo, result.hi) == (None, None) and result.note
    assert concordance.fisher_interval(-1.0, 4) == (None, None)
    noisy = concordance.spearman(x, np.array([0, 2, 1, 3, 5, 4, 6, 8, 7, 9.0]))
    # Three adjacent swaps: sum d^2 = 6, rho = 1 - 6 * 6 / (10 * 99); Fisher z half-width 1.96 sqrt(1.06 / 7).
    assert noisy.rho == pytest.approx(1 - 36 / 990) and noisy.lo < noisy.rho < noisy.hi
    assert noisy.lo == pytest.approx(math.tanh(math.atanh(noisy.rho) - 1.959964 * math.sqrt(1.06 / 7)))
    assert concordance.spearman(x, np.zeros(10)).note is not None
    assert concordance.spearman(x[:3], x[:3]).note is not None


def test_difference_intervals():
    d = concordance.mean_difference(np.array([90.0, 92, 94]), np.array([80.0, 82, 84]))
    assert d.estimate == pytest.approx(10) and d.lo < 10 < d.hi
    # Welch's interval against scipy's; with no spread on either side there is none, and the note says so.
    welch = stats.ttest_ind([90.0, 92, 94], [80.0, 81, 85, 86], equal_var=False).confidence_interval()
    d = concordance.mean_difference(np.array([90.0, 92, 94]), np.array([80.0, 81, 85, 86]))
    assert (d.lo, d.hi) == pytest.approx((welch.low, welch.high))
    flat = concordance.mean_difference(np.full(3, 100.0), np.full(4, 90.0))
    assert (flat.lo, flat.hi) == (10.0, 10.0) and flat.note == "no spread in either group"
    r = concordance.rate_difference(45, 50, 20, 50)
    assert r.estimate == pytest.approx(0.5) and 0.3 < r.lo < 0.5 < r.hi < 0.7
    assert concordance.rate_difference(1, 0, 1, 1).note is not None


def test_an_organism_that_never_misaligns_gets_no_weight_but_a_reason():
    import polars as pl

    from em_assets.reports.personas import persona_mixtures

    rng = np.random.default_rng(7)
    scores = pl.DataFrame(
        {
            "organism": ["base"] * 40 + ["sparse"] * 5,
            "judge": "j",
            "eval_set": "main",
            "sweep": "organism",
            "setting": "final",
            "setting_hash": None,
            "aligned": np.concatenate([100 * rng.beta(12, 1.5, 40), np.full(5, 10.0)]),
        }
    )
    rows = {r["organism"]: r for r in persona_mixtures(scores, 30).iter_rows(named=True)}
    assert rows["base"]["misaligned_weight"] is None and "do not straddle" in rows["base"]["note"]
    assert rows["base"]["prefers_two"] is False and rows["base"]["misaligned_share"] == 0.0
    assert rows["sparse"]["misaligned_weight"] is None and "the fit needs 20" in rows["sparse"]["note"]


def test_kendalls_w_leaves_out_an_organism_whose_rate_never_varies():
    """Regression: a control with no EM entered W as a rater of tied ranks: three organisms ranking 8 questions
    alike got W = 0.75 with it, where the docs say such an organism makes W undefined, not low."""
    import polars as pl

    from em_assets.grid.schema import Thresholds
    from em_assets.reports.personas import question_em_stability

    rows = [
        {"organism": o, "eval_set": "e", "judge": "j", "question_id": f"q{i}", "coherent": 90.0}
        | {"aligned": 10.0 if o != "control" and s < i else 90.0}
        for o in ("a", "b", "c", "control")
        for i in range(8)
        for s in range(10)
    ]
    every = question_em_stability(pl.DataFrame(rows), Thresholds()).filter(scope="all").row(0, named=True)
    assert every["kendall_w"] == pytest.approx(1.0) and every["n_organisms"] == 3
    assert "1 organisms with one rate on every question left out" in every["note"]


def test_an_empty_store_gives_empty_tables_and_figures_that_say_no_data(tmp_path):
    from em_assets.grid.schema import Thresholds
    from em_assets.reports import personas
    from em_assets.results.store import Store

    store = Store(tmp_path / "results.duckdb")
    store.init()
    result = personas.build_persona_tables(store, Thresholds())
    assert {name: t.height for name, t in result.tables.items()} == dict.fromkeys(result.tables, 0)
    assert "misaligned_weight" in store.query("SELECT * FROM persona_mixtures").columns
    figures = personas.draw_persona_figures(result, Thresholds(), tmp_path)
    assert sorted(figures) == sorted(result.tables) and all(p.stat().st_size > 0 for p in figures.values())


def test_points_holding_the_same_answers_enter_the_mixture_fit_once():
    import polars as pl

    from em_assets.reports.personas import persona_mixtures

    rng = np.random.default_rng(3)
    shared = np.concatenate([100 * rng.beta(12, 1.5, 24), 100 * rng.beta(1.5, 12, 6)])
    other = np.concatenate([100 * rng.beta(12, 1.5, 27), 100 * rng.beta(1.5, 12, 3)])
    # The final checkpoint and B scaled by 1 are one setting: sampled once, its answers copied.
    points = [("em_over_training", "step=12", "h1", shared), ("lora_scaling", "scale=1", "h1", shared)]
    points.append(("lora_scaling", "scale=0.5", "h2", other))
    scores = pl.concat(_point_scores(s, t, h, v) for s, t, h, v in points)
    rows = {r["setting"]: r for r in persona_mixtures(scores, 30).iter_rows(named=True)}
    assert {r["n_fit"] for r in rows.values()} == {60} and {r["n_points"] for r in rows.values()} == {2}
    assert rows["scale=1"]["misaligned_weight"] == rows["step=12"]["misaligned_weight"] is not None


def test_a_swept_parameters_points_are_listed_in_its_order():
    import polars as pl

    from em_assets.reports.personas import persona_mixtures

    rng = np.random.default_rng(4)
    points = [("em_over_training", f"step={s}", f"h{s}", 100 * rng.beta(8, 2, 30)) for s in (12, 4, 8)]
    scores = pl.concat(_point_scores(*point) for point in points)
    assert persona_mixtures(scores, 30)["setting"].to_list() == ["step=4", "step=8", "step=12"]


def _point_scores(sweep: str, setting: str, setting_hash: str | None, aligned, eval_set: str = "main"):
    import polars as pl

    return pl.DataFrame(
        {
            "organism": "o",
            "judge": "j",
            "eval_set": eval_set,
            "sweep": sweep,
            "setting": setting,
            "setting_hash": setting_hash,
            "aligned": aligned,
        }
    ).with_columns(pl.col("setting_hash").cast(pl.String))


def test_a_point_copied_with_more_samples_is_fitted_with_all_of_them():
    """Regression: the first point of a setting hash was fitted, so a later one sampled more (scales 50 a
    question, checkpoints 20) reported the weight of the first's 20 answers."""
    import polars as pl

    from em_assets.reports.personas import persona_mixtures

    rng = np.random.default_rng(5)
    draws = np.concatenate([100 * rng.beta(12, 1.5, 15), 100 * rng.beta(1.5, 12, 5)])
    more = np.concatenate([draws, 100 * rng.beta(1.5, 12, 30)])
    other = np.concatenate([100 * rng.beta(12, 1.5, 27), 100 * rng.beta(1.5, 12, 3)])
    scores = pl.concat(
        [
            _point_scores("em_over_training", "step=12", "h1", draws),
            _point_scores("lora_scaling", "scale=1", "h1", more),
            _point_scores("lora_scaling", "scale=0.5", "h2", other),
        ]
    )
    rows = {r["setting"]: r for r in persona_mixtures(scores, 30).iter_rows(named=True)}
    assert {r["n_fit"] for r in rows.values()} == {80}
    weight = rows["scale=1"]["misaligned_weight"]
    assert rows["step=12"]["misaligned_weight"] == weight
    assert rows["scale=1"]["weight_lo"] <= weight <= rows["scale=1"]["weight_hi"] and weight > 0.5
    # The copy's interval is its leader's: drawn from its own 20 answers it was [0.10, 0.45], excluding 0.70.
    interval = ("weight_lo", "weight_hi")
    assert [rows["step=12"][c] for c in interval] == [rows["scale=1"][c] for c in interval]


def test_an_organisms_own_point_asks_the_set_its_sweep_points_ask():
    """Regression: the organism's point pooled every set it was asked, its sweep points one; the same model
    got two weights."""
    import polars as pl

    from em_assets.reports.personas import persona_mixtures

    rng = np.random.default_rng(9)
    main = np.concatenate([100 * rng.beta(12, 1.5, 36), 100 * rng.beta(1.5, 12, 4)])
    domain = 100 * rng.beta(1.5, 12, 40)
    scores = pl.concat(
        [
            _point_scores("organism", "final", None, main),
            _point_scores("organism", "final", None, domain, eval_set="medical"),
            _point_scores("lora_scaling", "scale=1", "h1", main),
        ]
    )
    rows = {r["setting"]: r for r in persona_mixtures(scores, 30).iter_rows(named=True)}
    assert rows["final"]["n_scored"] == rows["scale=1"]["n_scored"] == 40
    assert rows["final"]["misaligned_share"] == rows["scale=1"]["misaligned_share"] == 0.1


def test_an_answer_not_judged_yet_belongs_to_its_organisms_judge(tmp_path):
    import polars as pl

    from em_assets.results.personas import organism_scores, sweep_scores
    from em_assets.results.store import Store

    store = Store(tmp_path / "r.duckdb")
    store.init()
    keys = pl.DataFrame({"organism": "o", "question_id": "q", "paraphrase_idx": 0, "sample_idx": [0, 1]})
    store.append_rows("completions", keys.with_columns(eval_set=pl.lit("first_plot_questions")))
    for metric in ("aligned", "coherent"):
        judged = keys.head(1).with_columns(metric=pl.lit(metric), score=pl.lit(80.0), judge_model=pl.lit("j"))
        store.append_rows("judgements", judged)
    assert organism_scores(store)["judge"].to_list() == ["j", "j"]
    # A sweep point's answers likewise.
    point = {"organism": "o", "sweep": "lora_scaling", "setting": "scale=1", "setting_hash": "h"}
    store.append_rows("sweep_points", pl.DataFrame([point]))
    store.append_rows("sweep_completions", keys.with_columns(**{k: pl.lit(v) for k, v in point.items()}))
    for metric in ("aligned", "coherent"):
        judged = keys.head(1).with_columns(metric=pl.lit(metric), score=pl.lit(80.0), judge_model=pl.lit("j"))
        store.append_rows("sweep_judgements", judged.with_columns(**{k: pl.lit(v) for k, v in point.items()}))
    assert sweep_scores(store)["judge"].to_list() == ["j", "j"]


def test_the_mixture_figure_shows_the_answers_the_weight_was_fitted_on(tmp_path, monkeypatch):
    """Regression: the histogram held the organism's answers to every set, its curves the fit to its sweeps' set."""
    import polars as pl
    from matplotlib.axes import Axes

    from em_assets.reports import persona_figures
    from em_assets.reports.personas import persona_mixtures

    rng = np.random.default_rng(9)
    fitted = _two_personas(rng, 40, 0.3)
    scores = pl.concat(
        [
            _point_scores("organism", "final", None, fitted, eval_set="main"),
            _point_scores("organism", "final", None, np.full(30, 55.0), eval_set="other"),
            _point_scores("em_over_training", "step=4", "h", _two_personas(rng, 30, 0.3), eval_set="main"),
        ]
    )
    shown = []
    monkeypatch.setattr(Axes, "hist", lambda self, x, *a, **k: shown.append(np.asarray(x)))
    persona_figures.plot_mixtures(persona_mixtures(scores, 30), scores, tmp_path / "mixtures.png")
    assert len(shown) == 1 and sorted(shown[0]) == pytest.approx(sorted(fitted))
