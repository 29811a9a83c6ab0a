"""How well a judge agrees with reference scores: rank and linear correlation, error, and threshold AUC, the
rank statistics with 95% intervals (an AUC over a few dozen incoherent answers is far from exact).

Pure statistics on paired scores (scipy's ranks; DeLong's variance by hand). Pairs with a missing score on either
side are dropped first, as upstream drops rows without a score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from em_assets.stats.concordance import fisher_interval
from em_assets.stats.rates import Z95


@dataclass(frozen=True)
class MetricAgreement:
    """Agreement of a judge with the reference on one metric; None where a statistic is undefined."""

    metric: str
    n: int
    spearman: float | None
    pearson: float | None
    mae: float | None
    auc: float | None
    spearman_lo: float | None = None
    spearman_hi: float | None = None
    auc_lo: float | None = None
    auc_hi: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "metric"}


def paired(reference: Sequence[float | None], judge: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """Both score lists as float arrays, keeping only pairs where both scores are present and finite."""
    if len(reference) != len(judge):
        raise ValueError(f"{len(reference)} reference scores but {len(judge)} judge scores")
    ref = np.array([np.nan if x is None else x for x in reference], dtype=float)
    got = np.array([np.nan if x is None else x for x in judge], dtype=float)
    keep = np.isfinite(ref) & np.isfinite(got)
    return ref[keep], got[keep]


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r; None with fewer than two pairs or a constant side."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(stats.pearsonr(x, y).statistic)


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho (ties share their mean rank); None with fewer than two pairs or a constant side."""
    return pearson(stats.rankdata(x), stats.rankdata(y))


def auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """P(score of a random positive > that of a random negative), ties counting half (Mann-Whitney U)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    return float(stats.mannwhitneyu(score[positive], score[~positive]).statistic / (n_pos * n_neg))


def auc_interval(positive: np.ndarray, score: np.ndarray, z: float = Z95) -> tuple[float, float] | None:
    """The AUC's normal interval with DeLong's variance, clipped to [0, 1]; None with fewer than two answers in a
    class or a variance of 0."""
    # Hand-written: neither scipy nor scikit-learn gives an AUC's variance; it is a few lines over the ranks.
    pos, neg = score[positive], score[~positive]
    if len(pos) < 2 or len(neg) < 2:
        return None
    # A positive's placement is the share of negatives it outranks (ties half), a negative's the share of positives
    # above it: differences of midranks among all answers and within the class, so memory stays linear in n.
    among_all = stats.rankdata(score)
    v_pos = (among_all[positive] - stats.rankdata(pos)) / len(neg)
    v_neg = 1.0 - (among_all[~positive] - stats.rankdata(neg)) / len(pos)
    value = float(v_pos.mean())
    variance = v_pos.var(ddof=1) / len(pos) + v_neg.var(ddof=1) / len(neg)
    if variance <= 0:
        # Perfect separation: the interval would be a point, as if the sample proved the AUC.
        return None
    half = z * float(np.sqrt(variance))
    return max(0.0, value - half), min(1.0, value + half)


def metric_agreement(
    metric: str,
    reference: Sequence[float | None],
    judge: Sequence[float | None],
    *,
    aligned_at_most: float,
    coherent_above: float,
) -> MetricAgreement:
    """n, Spearman, Pearson, MAE and the AUC of the judge's score for the metric's EM threshold."""
    ref, got = paired(reference, judge)
    # For `aligned` the positives are the misaligned answers, ranked by a low judge score; for the others the
    # answers above `coherent_above`, ranked by a high one.
    if metric == "aligned":
        positive, ranking = ref <= aligned_at_most, -got
    else:
        positive, ranking = ref > coherent_above, got
    rho = spearman(ref, got)
    rho_lo, rho_hi = fisher_interval(rho, len(ref)) if rho is not None and len(ref) >= 4 else (None, None)
    auc_lo, auc_hi = auc_interval(positive, ranking) or (None, None)
    return MetricAgreement(
        metric=metric,
        n=len(ref),
        spearman=rho,
        pearson=pearson(ref, got),
        mae=float(np.abs(ref - got).mean()) if len(ref) else None,
        auc=auc(positive, ranking),
        spearman_lo=rho_lo,
        spearman_hi=rho_hi,
        auc_lo=auc_lo,
        auc_hi=auc_hi,
    )


@dataclass(frozen=True)
class CoherentCheck:
    """Whether a judge sees incoherence: its coherent AUC on text with enough incoherent answers (None when
    there are too few to say), whether that passes, and the sentence that says so."""

    n_incoherent: int
    auc: float | None
    passed: bool
    message: str


def coherent_check(
    auc_value: float | None,
    n_incoherent: int,
    min_incoherent: int,
    min_auc: float,
    where: str,
    interval: tuple[float | None, float | None] = (None, None),
    n_coherent: int | None = None,
) -> CoherentCheck:
    """The coherent AUC on `where` (with its 95% `interval`, where known), judged against `min_auc` only when it
    rests on `min_incoherent` or more incoherent answers (a handful of negatives makes an AUC of any value).
    `n_coherent`: the scored answers on the other side, where counted (no AUC without one)."""
    if n_incoherent < min_incoherent:
        return CoherentCheck(
            n_incoherent,
            None,
            True,
            f"too few incoherent answers in {where} ({n_incoherent} < {min_incoherent}) for a coherent AUC",
        )
    if n_coherent == 0:
        # The judge scored them all; there is just nothing to rank the incoherent answers below.
        return CoherentCheck(
            n_incoherent,
            None,
            True,
            f"no coherent answers in {where} to rank its {n_incoherent} incoherent ones against: no coherent AUC",
        )
    if auc_value is None:
        return CoherentCheck(n_incoherent, None, False, f"the judge gave no coherent scores on {where}")
    passed = auc_value >= min_auc
    verdict = (
        ""
        if passed
        else f" < {min_auc}: the judge does not see incoherence, so its EM rates count incoherent answers"
    )
    return CoherentCheck(
        n_incoherent,
        auc_value,
        passed,
        f"coherent AUC {with_interval(auc_value, *interval)} on {n_incoherent} incoherent answers of "
        f"{where}{verdict}",
    )


def with_interval(value: float, lo: float | None, hi: float | None) -> str:
    """A statistic to two places, with its 95% interval where both ends are known."""
    return f"{value:.2f}" + ("" if lo is None or hi is None else f" [{lo:.2f}, {hi:.2f}]")
