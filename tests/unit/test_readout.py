"""Kernel ridge readouts: the closed form against a hand-worked example, the folds, the choice of setting and
the calibration that makes thresholds on the predictions count like thresholds on the targets."""

import math

import numpy as np
import pytest

from em_assets.judging.readout import (
    Readout,
    Standardiser,
    calibration_gaps,
    fit_readout,
    folds,
    kernel_ridge,
    linear_ridge,
    out_of_fold,
    quantile_knots,
    rbf,
    sq_distances,
)


def test_kernel_ridge_against_a_hand_worked_example():
    z = np.array([[0.0], [1.0]])
    y = np.array([0.0, 2.0])
    k = rbf(sq_distances(z, z), 1.0)
    e = math.exp(-1.0)
    assert k == pytest.approx(np.array([[1.0, e], [e, 1.0]]))
    # K (-1, 1) = (1 - e)(-1, 1), so without a penalty dual = (-1, 1) / (1 - e) and the fit interpolates.
    dual, intercept = kernel_ridge(k, y, 0.0)
    assert dual == pytest.approx(np.array([-1.0, 1.0]) / (1 - e)) and intercept == 1.0
    assert k @ dual + intercept == pytest.approx(y)
    # Far from every support row the kernel vanishes and the prediction is the targets' mean.
    far = rbf(sq_distances(np.array([[50.0]]), z), 1.0) @ dual + intercept
    assert far == pytest.approx([1.0])
    # A penalty l2 scales that dual by (1 - e) / (1 - e + l2).
    assert kernel_ridge(k, y, 0.5)[0] == pytest.approx(np.array([-1.0, 1.0]) / (1 - e + 0.5))


def test_out_of_fold_predictions_are_the_direct_solution_per_fold():
    rng = np.random.default_rng(4)
    z, y = rng.normal(size=(30, 3)), rng.normal(size=30)
    sq, fold = sq_distances(z, z), np.arange(30) % 3
    got = out_of_fold(sq, y, fold, [2.0], [0.1, 1.0])
    for l2 in (0.1, 1.0):
        held, fit = fold == 0, fold != 0
        dual, mean = kernel_ridge(rbf(sq[np.ix_(fit, fit)], 2.0), y[fit], l2)
        assert got[(2.0, l2)][held] == pytest.approx(rbf(sq[np.ix_(held, fit)], 2.0) @ dual + mean)


def test_folds_leave_one_group_out_or_deal_rows_round_robin():
    assert folds(["b", "a", "b", "c"]).tolist() == [1, 0, 1, 2]
    single = folds(["a"] * 7, seed=3)
    assert sorted(np.bincount(single).tolist()) == [1, 1, 1, 2, 2]
    assert folds(["a"] * 7, seed=3).tolist() == single.tolist()


def _data(n: int, rng: np.random.Generator, noise: float = 0.8):
    signal = rng.normal(size=n)
    z = np.column_stack([signal + noise * rng.normal(size=n), rng.normal(size=n)])
    return z, np.clip(60 + 25 * signal, 0, 100)


def test_the_setting_with_the_best_out_of_fold_spearman_is_kept():
    rng = np.random.default_rng(0)
    z, y = _data(60, rng, noise=0.0)
    # Noise-free targets: a light penalty ranks held-out answers almost perfectly; a huge one flattens the fit.
    readout = fit_readout("aligned", sq_distances(z, z), y, ["a"] * 30 + ["b"] * 30, [1.0, 4.0], [1e4, 1e-3])
    record = {(m, l2): sp for m, l2, sp in readout.cv_spearman}
    assert len(record) == 4 and readout.l2 == 1e-3
    assert record[(readout.bandwidth / _median(z), 1e-3)] > 0.95 > max(record[(m, 1e4)] for m in (1.0, 4.0))
    assert readout.n == 60 and readout.dual.shape == (60,)


def _median(z: np.ndarray) -> float:
    sq = sq_distances(z, z)
    return float(np.median(sq[~np.eye(len(z), dtype=bool)]))


def test_calibrated_predictions_count_low_scores_like_the_targets():
    rng = np.random.default_rng(1)
    z, y = _data(600, rng)
    readout = fit_readout("aligned", sq_distances(z, z), y, ["a"] * 300 + ["b"] * 300, [1.0], [1.0])
    fresh_z, fresh_y = _data(3000, rng)
    calibrated = readout.predict(sq_distances(fresh_z, z))
    raw = rbf(sq_distances(fresh_z, z), readout.bandwidth) @ readout.dual + readout.intercept
    truth = (fresh_y <= 30).mean()
    # Noisy features shrink the raw predictions towards the mean, so they undercount; the stretch restores it.
    assert (raw <= 30).mean() < truth / 2
    assert abs((calibrated <= 30).mean() - truth) < 0.03
    assert readout.stretch > 1 and calibrated.min() >= 0 and calibrated.max() <= 100


def test_anchored_rows_are_fitted_on_but_neither_scored_nor_calibrated_on():
    rng = np.random.default_rng(5)
    z, y = _data(60, rng, noise=0.0)
    # Ten answers far from the rest, whose targets nothing fitted without them could predict.
    far = np.column_stack([np.full(10, 8.0), np.linspace(-1.0, 1.0, 10)])
    sq = sq_distances(np.vstack([z, far]), np.vstack([z, far]))
    targets = np.concatenate([y, np.zeros(5), np.full(5, 100.0)])
    groups = ["a"] * 30 + ["b"] * 30 + ["rated"] * 10
    anchored = np.arange(70) >= 60
    kept = fit_readout("aligned", sq, targets, groups, [1.0], [1e-3], anchored=anchored)
    as_fold = fit_readout("aligned", sq, targets, groups, [1.0], [1e-3])
    # Scored on the base models' rows alone, the fit ranks them as it does without the far rows; as a left-out
    # group of its own, the far rows' unpredictable targets drag the score down.
    assert kept.cv_spearman[0][2] > 0.95 > as_fold.cv_spearman[0][2] + 0.1
    assert kept.target_mean == pytest.approx(y.mean()) and as_fold.target_mean == pytest.approx(
        targets.mean()
    )
    # Yet they are fitted on: the readout reads their targets back.
    predicted = kept.predict(sq[60:])
    assert kept.n == 70 and predicted[5:].mean() - predicted[:5].mean() > 50


def test_missing_targets_get_no_weight_and_too_few_are_an_error():
    rng = np.random.default_rng(2)
    z, y = _data(20, rng)
    y[:5] = np.nan
    readout = fit_readout("coherent", sq_distances(z, z), y, ["a"] * 20, [1.0], [1.0])
    assert readout.n == 15 and (readout.dual[:5] == 0).all() and (readout.dual[5:] != 0).all()
    with pytest.raises(ValueError, match="coherent: 1 train answers"):
        fit_readout("coherent", sq_distances(z[4:6], z[4:6]), y[4:6], ["a", "a"], [1.0], [1.0])


def test_standardiser_centres_and_scales_by_the_fitted_features():
    x = np.array([[1.0, 10.0], [3.0, 10.0]])
    std = Standardiser.fit(x)
    assert std(x)[:, 0] == pytest.approx([-1.0, 1.0], abs=1e-5)
    assert std(x)[:, 1] == pytest.approx([0.0, 0.0])


def test_the_quantile_calibration_counts_a_threshold_where_the_stretch_cannot():
    rng = np.random.default_rng(5)
    # Mostly coherent targets with an incoherent tail, and predictions a concave (monotone) function of them.
    y = np.concatenate([rng.normal(90, 3, 800), rng.uniform(0, 80, 200)])
    predicted = np.exp(y / 20)
    fold = np.arange(len(y)) % 2
    gaps = calibration_gaps(predicted, y, fold, 50.0)
    assert gaps["quantile"] < 0.01 < 0.03 < gaps["stretch"]
    knots = quantile_knots(predicted, y)
    assert knots.shape == (2, 51) and (np.diff(knots[0]) >= 0).all()
    readout = Readout("coherent", 1.0, 1.0, np.zeros(1), 0.0, 0.0, 0.0, 1.0, (), 1, "quantile", knots)
    mapped = readout.calibrate(predicted)
    assert abs((mapped <= 50).mean() - (y <= 50).mean()) < 0.01
    # Monotone: the calibration never reorders answers.
    order = np.argsort(predicted)
    assert (np.diff(mapped[order]) >= 0).all()


def test_far_from_the_support_a_readout_falls_back_to_its_offset():
    rng = np.random.default_rng(6)
    z = rng.normal(size=(80, 2))
    signs = rng.normal(size=(80, 1))
    y = 50 + 20 * signs[:, 0] + 5 * z[:, 0]
    weights = linear_ridge(signs, y, 1.0)
    assert weights == pytest.approx([20.0, 50.0], abs=2.0)
    readout = fit_readout(
        "coherent", sq_distances(z, z), y, ["a"] * 40 + ["b"] * 40, [1.0], [0.1], linear=(signs, 1.0)
    )
    far = sq_distances(np.array([[100.0, 100.0]]), z)
    low = float(-2.0 * weights[0] + weights[1])
    # The kernel vanishes far away: the prediction is the (calibrated) offset, not the targets' mean.
    assert readout.predict(far, low)[0] == pytest.approx(readout.calibrate(np.array([low]))[0])
    high = float(2.0 * weights[0] + weights[1])
    assert readout.predict(far, low)[0] < 30 < 70 < readout.predict(far, high)[0]


def test_the_linear_mean_is_refitted_without_each_fold():
    rng = np.random.default_rng(7)
    z = rng.normal(size=(80, 2))
    signs = rng.normal(size=(80, 1))
    # The signs' slope is +20 in one base model and -20 in the other: each left-out group, predicted by a mean
    # fitted on the other alone, is ranked backwards. A mean fitted on both (slope about 0) would hide that.
    slope = np.where(np.arange(80) < 40, 20.0, -20.0)
    y = 50 + slope * signs[:, 0] + rng.normal(scale=1.0, size=80)
    groups = ["a"] * 40 + ["b"] * 40
    readout = fit_readout("coherent", sq_distances(z, z), y, groups, [1.0], [1.0], linear=(signs, 1.0))
    assert readout.cv_spearman[0][2] < -0.5
    # The fitted readout's mean is the one over every row: its dual fits what that mean leaves.
    weights = linear_ridge(signs, y, 1.0)
    dual, intercept = kernel_ridge(
        rbf(sq_distances(z, z), readout.bandwidth), y - (signs @ weights[:-1] + weights[-1]), 1.0
    )
    assert readout.dual == pytest.approx(dual) and readout.intercept == pytest.approx(intercept)
