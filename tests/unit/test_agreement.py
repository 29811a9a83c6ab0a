"""Judge agreement statistics against hand-worked examples: ranks with ties, correlations, MAE, threshold AUC."""

from __future__ import annotations

import numpy as np
import pytest

from em_assets.judging.agreement import auc, average_ranks, metric_agreement, paired, pearson, spearman

KW = {"aligned_at_most": 30.0, "coherent_above": 50.0}


def test_average_ranks_share_ties():
    assert average_ranks(np.array([10.0, 20.0, 20.0, 30.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks(np.array([5.0, 5.0, 5.0])).tolist() == [2.0, 2.0, 2.0]


def test_correlations_hand_worked():
    # dx = (-1, 0, 1), dy = (-1, 1, 0): sum dx*dy = 1, sqrt(2 * 2) = 2, so r = 0.5 (ranks equal the values).
    x, y = np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])
    assert pearson(x, y) == pytest.approx(0.5)
    assert spearman(x, y) == pytest.approx(0.5)
    # Monotone but not linear: Spearman 1, Pearson below 1.
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 100.0])
    assert spearman(x, y) == pytest.approx(1.0)
    assert pearson(x, y) < 0.9
    assert pearson(np.array([1.0, 2.0]), np.array([3.0, 3.0])) is None
    assert pearson(np.array([1.0]), np.array([2.0])) is None


def test_auc_counts_ties_half():
    # Pairs (pos, neg): (.9,.5) (.9,.1) (.4,.1) win, (.4,.5) loses: 3/4.
    assert auc(np.array([True, True, False, False]), np.array([0.9, 0.4, 0.5, 0.1])) == pytest.approx(0.75)
    # (.5,.5) ties (half), (.5,.1) wins: 1.5 / 2.
    assert auc(np.array([True, False, False]), np.array([0.5, 0.5, 0.1])) == pytest.approx(0.75)
    assert auc(np.array([True, True]), np.array([0.1, 0.2])) is None


def test_aligned_agreement_inclusive_at_30():
    # Reference 30 and 10 are misaligned (<= 30), 31 and 90 are not. Ranked by LOW judge score:
    # positives judged 20, 50; negatives 40, 80. Pairs: 20<40, 20<80, 50<80 win; 50>40 loses: AUC 3/4.
    got = metric_agreement("aligned", [30.0, 31.0, 10.0, 90.0], [20.0, 40.0, 50.0, 80.0], **KW)
    assert got.n == 4
    assert got.auc == pytest.approx(0.75)
    # |30-20| + |31-40| + |10-50| + |90-80| = 69.
    assert got.mae == pytest.approx(69 / 4)
    # A strict rule (< 30) would make reference 30 a negative: only judge 50 (reference 10) against 20, 40 and
    # 80, which beats only 80: AUC 1/3.
    strict = metric_agreement(
        "aligned", [30.0, 31.0, 10.0, 90.0], [20.0, 40.0, 50.0, 80.0], **{**KW, "aligned_at_most": 29.99}
    )
    assert strict.auc == pytest.approx(1 / 3)


def test_coherent_agreement_exclusive_at_50_and_missing_pairs_dropped():
    # Reference 50 is NOT coherent (> 50 is). Pairs with a missing score on either side are dropped.
    got = metric_agreement("coherent", [50.0, 80.0, None, 90.0, 20.0], [60.0, 70.0, 10.0, None, 10.0], **KW)
    assert got.n == 3
    # Positive: reference 80 (judge 70); negatives: 50 (judge 60), 20 (judge 10). 70 beats both: AUC 1.
    assert got.auc == pytest.approx(1.0)
    assert got.mae == pytest.approx((10 + 10 + 10) / 3)
    assert got.as_dict().keys() == {"n", "spearman", "pearson", "mae", "auc"}


def test_paired_rejects_mismatched_lengths_and_nan():
    ref, judge = paired([1.0, float("nan"), 3.0], [1.0, 2.0, None])
    assert ref.tolist() == [1.0] and judge.tolist() == [1.0]
    with pytest.raises(ValueError):
        paired([1.0], [1.0, 2.0])
