"""EM rates corrected for the judge's error (Rogan-Gladen), checked against a hand-worked example: the point
estimate exactly, the interval against the delta-method (Rogan and Gladen 1978) bounds it approaches."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy.special import expit, ndtr

from em_assets.stats.correction import (
    CORRECTION_COLUMNS,
    REFERENCE,
    UNKNOWN,
    ErrorRates,
    Spread,
    between_files,
    corrected_rate,
    correction_caveat,
    correction_note,
    rogan_gladen,
    with_correction,
)
from em_assets.stats.rates import wilson_interval


def delta_bounds(k: int, n: int, r: ErrorRates) -> tuple[float, float]:
    """Rogan-Gladen's own normal-approximation bounds with estimated Se and Sp, written out by hand."""
    p, se, sp = k / n, r.sensitivity, r.specificity
    pi = (p + sp - 1) / (se + sp - 1)
    var = (p * (1 - p) / n + pi**2 * se * (1 - se) / r.n_pos + (1 - pi) ** 2 * sp * (1 - sp) / r.n_neg) / (
        se + sp - 1
    ) ** 2
    return pi - 1.959964 * math.sqrt(var), pi + 1.959964 * math.sqrt(var)


def test_hand_worked_example():
    # 30 of 100 answers judged EM, by a judge that found 80 of 100 reference-EM answers (Se 0.8) and passed
    # 90 of 100 reference non-EM answers (Sp 0.9): (0.3 + 0.9 - 1) / (0.8 + 0.9 - 1) = 0.2 / 0.7.
    rates = ErrorRates.from_counts(80, 100, 90, 100)
    assert rogan_gladen(0.3, 0.8, 0.9) == pytest.approx(2 / 7)
    point, lo, hi = corrected_rate(30, 100, rates)
    assert point == pytest.approx(2 / 7)
    # By hand: var = (0.3*0.7/100 + (2/7)^2*0.8*0.2/100 + (5/7)^2*0.9*0.1/100) / 0.7^2 = 0.0054894,
    # so 2/7 -+ 1.96 * 0.07409 = (0.1405, 0.4309); the posterior is slightly right-skewed.
    assert delta_bounds(30, 100, rates) == pytest.approx((0.1405, 0.4309), abs=1e-4)
    assert lo == pytest.approx(0.1405, abs=0.01) and hi == pytest.approx(0.4309, abs=0.01)
    # Ten times the answers everywhere: the delta bounds (0.2398, 0.3316) and the posterior's agree closely.
    big = ErrorRates.from_counts(800, 1000, 900, 1000)
    _, lo, hi = corrected_rate(300, 1000, big)
    assert (lo, hi) == pytest.approx(delta_bounds(300, 1000, big), abs=0.003)


def test_interval_carries_the_uncertainty_of_sensitivity_and_specificity():
    # The same Se and Sp measured on 20 answers each, then on 20,000: the interval narrows towards the one for
    # rates known exactly (the Wilson bounds of k/n corrected), and is always wider than it.
    known = ErrorRates(0.8, 0.9)
    exact_lo, exact_hi = corrected_rate(30, 100, known)[1:]
    widths = []
    for m in (20, 200, 20_000):
        _, lo, hi = corrected_rate(30, 100, ErrorRates.from_counts(int(0.8 * m), m, int(0.9 * m), m))
        assert lo < exact_lo + 0.005 and hi > exact_hi - 0.005
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] == pytest.approx(exact_hi - exact_lo, abs=0.01)


def test_reference_judge_is_the_identity():
    for k, n in [(0, 24), (3, 24), (24, 24), (7, 50)]:
        point, lo, hi = corrected_rate(k, n, REFERENCE)
        assert point == k / n and (lo, hi) == wilson_interval(k, n)


def test_clipped_and_undefined():
    # More judged EM than the false positives explain at most, and fewer than they explain at least.
    rates = ErrorRates.from_counts(5, 10, 8, 10)
    assert corrected_rate(0, 50, rates)[0] == 0.0 and corrected_rate(50, 50, rates)[0] == 1.0
    # A judge no better than chance corrects nothing; no answers, nothing to correct.
    assert corrected_rate(5, 10, ErrorRates.from_counts(3, 10, 5, 10)) == (None, None, None)
    assert corrected_rate(0, 0, rates) == (None, None, None)
    # Exactly chance (Se + Sp = 1), and a class absent from the validation answers: nothing to correct with.
    assert rogan_gladen(0.3, 0.5, 0.5) is None
    assert corrected_rate(5, 10, ErrorRates.from_counts(5, 10, 5, 10)) == (None, None, None)
    assert ErrorRates.from_counts(1, 2, 0, 0) is None
    # A judge barely better than chance: the interval is wide.
    _, lo, hi = corrected_rate(10, 40, ErrorRates.from_counts(6, 10, 5, 10))
    assert lo == 0.0 and hi > 0.8


@pytest.mark.parametrize(
    ("k", "n", "counts", "bounds"),
    [
        # Importance-sampled posteriors of the same model (2 million draws of pi, Se and Sp, weighted by the
        # likelihood of k of n): (0.0006, 0.0936), (0.0018, 0.2593) and (0.8533, 0.9988).
        (0, 60, (40, 60, 330, 350), (0.0, 0.0936)),
        (0, 24, (43, 74, 322, 346), (0.0, 0.2593)),
        (24, 24, (50, 60, 330, 350), (0.8533, 1.0)),
    ],
)
def test_a_rate_outside_what_the_judges_errors_explain_keeps_a_real_interval(k, n, counts, bounds):
    """Regression: every bootstrap draw of the corrected rate clipped to 0 (or 1), so 0 of 60 judged EM by a judge
    with a 6% false-positive rate came out as [0, 0], as if 60 answers proved no EM."""
    point, lo, hi = corrected_rate(k, n, ErrorRates.from_counts(*counts))
    assert point in (0.0, 1.0) and lo <= point <= hi
    assert (lo, hi) == pytest.approx(bounds, abs=0.005)


@pytest.mark.parametrize(
    ("k", "n", "counts", "bounds"),
    [
        # Importance-sampled posteriors of the same model (4 million draws): (0.0021, 0.3105), (0.0114, 0.4486).
        # Both lower bounds are 0: the judge's false positives alone give k of 60 or more 20% of the time or more.
        (3, 60, (4, 6, 50, 54), (0.0, 0.3105)),
        (12, 60, (10, 14, 40, 46), (0.0, 0.4486)),
    ],
)
def test_few_validation_answers_keep_the_tails_of_their_error_rates(k, n, counts, bounds):
    """Regression: Se and Sp were integrated at evenly spaced quantiles, the lowest 2%, which leaves out the
    low sensitivities that set the upper bound when a judge was measured on few EM answers (0.254 and 0.430)."""
    _, lo, hi = corrected_rate(k, n, ErrorRates.from_counts(*counts))
    assert (lo, hi) == pytest.approx(bounds, abs=0.005)


def test_an_organism_without_em_stays_inside_its_interval():
    """Regression: the bounds were the posterior's 2.5% and 97.5% quantiles, and a quantile is never 0, so an
    organism with no EM was outside its interval whenever its judged rate came out above the judge's measured
    false-positive rate: in 50% of simulated draws, where a 95% interval should miss it in 2.5%."""
    rng = np.random.default_rng(0)
    se, sp, n, n_pos, n_neg = 0.8, 0.95, 400, 60, 340
    covered = []
    for _ in range(100):
        rates = ErrorRates.from_counts(
            int(rng.binomial(n_pos, se)), n_pos, int(rng.binomial(n_neg, sp)), n_neg
        )
        _, lo, _ = corrected_rate(int(rng.binomial(n, 1 - sp)), n, rates)
        covered.append(lo == 0.0)
    assert np.mean(covered) >= 0.9
    # 25 of 400 judged EM is above the 18 of 340 false positives measured, yet pure false positives give 25 or
    # more 31% of the time: 0 is allowed. 45 or more they give 0.2% of the time: it is not.
    rates = ErrorRates.from_counts(48, 60, 322, 340)
    point, lo, hi = corrected_rate(25, 400, rates)
    assert point > 0 and lo == 0.0 and hi > point
    assert corrected_rate(45, 400, rates)[1] > 0.02
    # Likewise at the top: 1 is allowed for 150 of 200 judged EM (corrected 0.93) by a judge that finds 48 of 60
    # EM answers, not for 120 of 200.
    assert corrected_rate(150, 200, rates)[2] == 1.0
    assert corrected_rate(120, 200, rates)[2] < 1.0


def test_zero_is_allowed_exactly_while_false_positives_give_k_or_more_at_least_2_5_percent_of_the_time():
    # Sp and Se 0.95 measured on a million answers each. 40 answers: false positives alone, Binomial(40, 0.05),
    # give 5 or more 4.80% of the time and 6 or more 1.39%, so 5 judged EM allow 0 and 6 do not. Likewise
    # misses alone give 35 or fewer of 40 EM answers judged EM 4.80% of the time, 34 or fewer 1.39%.
    def at_least(k: int) -> float:
        return sum(math.comb(40, i) * 0.05**i * 0.95 ** (40 - i) for i in range(k, 41))

    assert (at_least(5), at_least(6)) == pytest.approx((0.0480, 0.0139), abs=1e-4)
    rates = ErrorRates.from_counts(950_000, 1_000_000, 950_000, 1_000_000)
    assert corrected_rate(5, 40, rates)[1] == 0.0 and corrected_rate(6, 40, rates)[1] > 0.0
    assert corrected_rate(35, 40, rates)[2] == 1.0 and corrected_rate(34, 40, rates)[2] < 1.0


def test_rates_from_counts_and_files():
    r = ErrorRates.from_counts(2, 3, 1, 2)
    assert r.sensitivity == pytest.approx(2 / 3) and r.specificity == 0.5
    assert ErrorRates.from_counts(0, 0, 1, 2) is None
    with pytest.raises(ValueError):
        ErrorRates.from_counts(3, 2, 0, 1)
    # Pooled over files; a class absent from every file leaves the rates undefined.
    pooled = ErrorRates.from_files([(2, 3, 1, 2), (0, 0, 4, 5)])
    assert (pooled.tp, pooled.n_pos, pooled.tn, pooled.n_neg, pooled.n_files) == (2, 3, 5, 7, 2)
    assert ErrorRates.from_files([(0, 0, 1, 2), (0, 0, 4, 5)]) is None


def test_columns_per_row_and_unknown_rates_are_null():
    table = pl.DataFrame({"organism": ["a", "b", "c"], "k": [30, 3, 4], "n": [100, 24, 24]})
    rates = [ErrorRates.from_counts(80, 100, 90, 100), REFERENCE, None]
    out = with_correction(table, rates, "k", "n")
    assert out.columns == ["organism", "k", "n", *CORRECTION_COLUMNS]
    a, b, c = out.iter_rows(named=True)
    assert a["em_rate_corrected"] == pytest.approx(2 / 7) and a["judge_sensitivity"] == 0.8
    assert "80/100" in a["em_correction"] and "90/100" in a["em_correction"]
    assert (b["em_rate_corrected"], b["judge_sensitivity"], b["judge_specificity"]) == (3 / 24, 1.0, 1.0)
    assert (b["em_corrected_lo"], b["em_corrected_hi"]) == wilson_interval(3, 24)
    assert all(c[col] is None for col in CORRECTION_COLUMNS[:-1]) and c["em_correction"] == UNKNOWN
    # A row's interval depends on its own counts only, not on its neighbours.
    alone = with_correction(table.head(1), rates[:1], "k", "n")
    assert alone.row(0) == out.row(0)


def test_the_caveat_names_the_rows_each_source_of_error_rates_corrects():
    table = pl.DataFrame(
        {
            "organism": ["a", "b", "b", "c"],
            "judge_source": ["grid", "grid", "em_file", "grid"],
            "k": [30, 3, 3, 4],
            "n": [100, 24, 24, 24],
        }
    )
    measured = ErrorRates.from_counts(80, 100, 90, 100)
    caveat = correction_caveat(with_correction(table, [measured, measured, REFERENCE, None], "k", "n"))
    lines = [line for line in caveat.splitlines() if line.startswith("- ")]
    assert len(lines) == 3
    assert lines[0].startswith("- a (grid), b (grid): Rogan-Gladen with sensitivity 80/100")
    assert lines[1] == "- b (em_file): identity: the judge is the reference"
    assert lines[2] == f"- c (grid): {UNKNOWN}"
    # Without naming columns (a sweep's table), each source once.
    unnamed = correction_caveat(
        with_correction(table.drop("organism", "judge_source"), [measured] * 4, "k", "n")
    )
    assert [line for line in unnamed.splitlines() if line.startswith("- ")] == [
        f"- {correction_note(measured)}"
    ]
    assert correction_caveat(table.head(0)) == ""


def brute_force_predictive(x: list[int], n: list[int], quantiles: list[float]) -> np.ndarray:
    """The same model integrated another way: the joint posterior of (tau, mu) on a dense grid, each file's
    logit normal about mu with its binomial variance, a flat prior on mu and a half-normal of scale 0.5 on
    tau, and the new file's logit normal about mu with variance tau^2 (its CDF summed over the grid)."""
    xs, ns = np.array(x, dtype=float), np.array(n, dtype=float)
    y, v = np.log((xs + 0.5) / (ns - xs + 0.5)), 1 / (xs + 0.5) + 1 / (ns - xs + 0.5)
    tau, mu = np.meshgrid(np.linspace(0.005, 4.0, 400), np.linspace(-6.0, 6.0, 481), indexing="ij")
    # The scale written out (Friede et al. 2017), not imported: a changed TAU_PRIOR_SCALE must fail here.
    log_like = -0.5 * (tau / 0.5) ** 2
    for yi, vi in zip(y, v, strict=True):
        log_like = log_like - 0.5 * (yi - mu) ** 2 / (vi + tau**2) - 0.5 * np.log(vi + tau**2)
    weight = np.exp(log_like - log_like.max()).ravel()
    keep = weight > 1e-9 * weight.max()
    weight, tau, mu = weight[keep] / weight[keep].sum(), tau.ravel()[keep], mu.ravel()[keep]
    theta = np.linspace(-8.0, 8.0, 401)
    cdf = np.array([weight @ ndtr((t - mu) / tau) for t in theta])
    return expit(np.interp(quantiles, cdf, theta))


def test_a_new_files_rate_under_random_effects_matches_a_brute_force_integration():
    quantiles = [0.025, 0.25, 0.5, 0.75, 0.975]
    for x, n in (([10, 18], [20, 20]), ([38, 4, 20], [40, 40, 40]), ([10, 11, 9], [20, 20, 20])):
        got = between_files(x, n).at(np.array(quantiles))
        assert got == pytest.approx(brute_force_predictive(x, n, quantiles), abs=0.004)
    # A file without answers of the class says nothing and is left out; one file alone has no spread.
    assert between_files([10, 18, 0], [20, 20, 0]) == between_files([10, 18], [20, 20])
    assert between_files([10], [20]) is None


def test_a_spreads_range_and_moments_hand_worked():
    # One normal on the logit scale, mean 0 and sd 1: 95% of new files lie in expit(-+1.959964) = 0.12347-0.87653.
    assert Spread((0.0,), (1.0,), (1.0,)).interval() == pytest.approx((0.12347, 0.87653), abs=2e-4)
    # An even mixture of N(0, 1) and N(2, 1): mean 1, variance (1 + 0 + 1 + 4) / 2 - 1^2 = 2.
    mixture = Spread((0.0, 2.0), (1.0, 1.0), (0.5, 0.5))
    assert (mixture.logit_mean, mixture.logit_sd) == pytest.approx((1.0, math.sqrt(2.0)))


def test_files_that_agree_get_a_narrower_spread_than_files_that_disagree_but_never_none():
    # A few files cannot show that they agree: agreeing counts still leave room for a new file to differ.
    agree, disagree = between_files([10, 11, 9], [20, 20, 20]), between_files([2, 18, 10], [20, 20, 20])
    (a_lo, a_hi), (d_lo, d_hi) = agree.interval(), disagree.interval()
    assert a_lo < 0.5 < a_hi and d_hi - d_lo > (a_hi - a_lo) + 0.2
    # More files that agree narrow it: the prior gives way to the data.
    many = between_files([10, 11, 9, 10, 10, 11, 9, 10], [20] * 8).interval()
    assert many[1] - many[0] < a_hi - a_lo
    assert agree.logit_mean == pytest.approx(0.0, abs=0.05) and agree.logit_sd > 0


def test_files_that_disagree_widen_the_interval_for_a_new_file():
    # The same pooled counts (Se 64/100, Sp 180/200), once from files that agree and once from files whose
    # sensitivity ranges from 0.2 to 0.95: the second's interval is for an organism like none measured.
    agree = ErrorRates.from_files([(16, 25, 45, 50)] * 4)
    disagree = ErrorRates.from_files([(5, 25, 45, 50), (23, 25, 45, 50), (12, 25, 45, 50), (24, 25, 45, 50)])
    pooled = ErrorRates.from_counts(64, 100, 180, 200)
    assert disagree.sensitivity == pooled.sensitivity and disagree.n_files == 4
    assert isinstance(disagree.sensitivity_spread, Spread) and disagree.file_counts[0] == (5, 25, 45, 50)
    point, lo, hi = corrected_rate(30, 100, disagree)
    _, agree_lo, agree_hi = corrected_rate(30, 100, agree)
    _, pooled_lo, pooled_hi = corrected_rate(30, 100, pooled)
    assert point == corrected_rate(30, 100, pooled)[0] == corrected_rate(30, 100, agree)[0]
    # Pooled counts say nothing of a new file; files that agree a little; files that disagree much.
    assert lo < agree_lo and hi > agree_hi + 0.1
    assert agree_lo <= pooled_lo and agree_hi >= pooled_hi
    low, high = disagree.new_file_ranges()["sensitivity"]
    assert low < 0.3 and high > 0.9
    agree_low, agree_high = agree.new_file_ranges()["sensitivity"]
    assert low < agree_low < 0.64 < agree_high < high
    assert "sensitivity of a new file" in correction_note(
        disagree
    ) and "from its 4 reference files" in correction_note(disagree)
    assert "of a new file" not in correction_note(pooled)
