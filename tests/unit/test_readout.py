"""Ridge readouts: the closed form against a hand-worked example, the folds, the penalty choice and the
calibration that makes thresholds on the predictions count like thresholds on the targets."""

import numpy as np
import pytest

from em_assets.judging.readout import Standardiser, fit_readout, folds, ridge


def test_ridge_against_hand_worked_examples():
    z = np.array([[0.0], [1.0], [2.0]])
    y = np.array([1.0, 3.0, 5.0])
    weight, intercept = ridge(z, y, 0.0)
    assert weight == pytest.approx([2.0]) and intercept == pytest.approx(1.0)
    # Centred z = (-1, 0, 1), so z'z = 2 and z'(y - 3) = 4: w = 4 / (2 + 2) = 1, b = 3 - 1 * 1 = 2.
    weight, intercept = ridge(z, y, 2.0)
    assert weight == pytest.approx([1.0]) and intercept == pytest.approx(2.0)


def test_folds_leave_one_group_out_or_deal_rows_round_robin():
    assert folds(["b", "a", "b", "c"]).tolist() == [1, 0, 1, 2]
    single = folds(["a"] * 7, seed=3)
    assert sorted(np.bincount(single).tolist()) == [1, 1, 1, 2, 2]
    assert folds(["a"] * 7, seed=3).tolist() == single.tolist()


def _data(n: int, rng: np.random.Generator, noise_features: int = 0):
    signal = rng.normal(size=n)
    z = np.column_stack([signal + 0.8 * rng.normal(size=n), rng.normal(size=(n, noise_features))])
    y = np.clip(60 + 25 * signal, 0, 100)
    return z, y


def test_the_penalty_with_the_best_out_of_fold_spearman_is_kept():
    rng = np.random.default_rng(0)
    signal, nuisance = rng.normal(size=60), 3 * rng.normal(size=60)
    # y is z0 - z1 exactly; a huge penalty leaves w close to z'y, which weights z0 alone (signal + nuisance).
    z = np.column_stack([signal + nuisance, nuisance])
    y = 60 + 10 * signal
    readout = fit_readout("aligned", z, y, ["a"] * 30 + ["b"] * 30, [1e6, 1e-6])
    record = dict(readout.cv_spearman)
    assert readout.l2 == 1e-6 and record[1e-6] > 0.99 and record[1e6] < 0.6
    assert readout.n == 60 and readout.weight == pytest.approx([10.0, -10.0], rel=1e-3)


def test_calibrated_predictions_count_low_scores_like_the_targets():
    rng = np.random.default_rng(1)
    z, y = _data(2000, rng)
    readout = fit_readout("aligned", z, y, ["a"] * 1000 + ["b"] * 1000, [1.0])
    fresh_z, fresh_y = _data(4000, rng)
    calibrated = readout.predict(fresh_z)
    raw = fresh_z @ readout.weight + readout.intercept
    truth = (fresh_y <= 30).mean()
    # Noisy features shrink the raw predictions towards the mean, so they undercount; the stretch restores it.
    assert (raw <= 30).mean() < truth / 2
    assert abs((calibrated <= 30).mean() - truth) < 0.03
    assert readout.stretch > 1 and calibrated.min() >= 0 and calibrated.max() <= 100


def test_missing_targets_are_left_out_and_too_few_are_an_error():
    rng = np.random.default_rng(2)
    z, y = _data(20, rng)
    y[:5] = np.nan
    assert fit_readout("coherent", z, y, ["a"] * 20, [1.0]).n == 15
    with pytest.raises(ValueError, match="coherent: 1 train answers"):
        fit_readout("coherent", z[:1], y[5:6], ["a"], [1.0])


def test_standardiser_centres_and_scales_by_the_fitted_features():
    x = np.array([[1.0, 10.0], [3.0, 10.0]])
    std = Standardiser.fit(x)
    assert std(x)[:, 0] == pytest.approx([-1.0, 1.0], abs=1e-5)
    assert std(x)[:, 1] == pytest.approx([0.0, 0.0])
