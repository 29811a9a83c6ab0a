"""Do the same questions elicit misalignment everywhere? Rank agreement of per-question rates across organisms:
Spearman's rho per pair with a Fisher-z interval, Kendall's W over all, and differences between two groups."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from em_assets.stats.rates import Z95, wilson_interval


@dataclass(frozen=True)
class Correlation:
    n: int
    rho: float | None = None
    lo: float | None = None
    hi: float | None = None
    note: str | None = None


def spearman(x: np.ndarray, y: np.ndarray, z: float = Z95) -> Correlation:
    """Spearman's rho with a Fisher-z interval, se = sqrt(1.06 / (n - 3)) (Fieller, Hartley and Pearson 1957)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    if n < 4:
        return Correlation(n, note=f"{n} shared questions: an interval needs 4")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(n, note="a rate is the same on every question: no ranking to compare")
    rho = float(stats.spearmanr(x, y).statistic)
    lo, hi = fisher_interval(rho, n, z)
    return Correlation(n, rho, lo, hi, None if lo is not None else PERFECT)


PERFECT = "a perfect ranking: the Fisher-z interval is undefined"


def fisher_interval(rho: float, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Spearman's rho's interval on the Fisher-z scale, se = sqrt(1.06 / (n - 3)) (Fieller, Hartley and Pearson
    1957); n >= 4. None for rho = +-1, whose Fisher z is infinite (clipping it gave an interval that excludes it)."""
    if abs(rho) >= 1.0 - 1e-12:
        return None, None
    centre, half = math.atanh(rho), z * math.sqrt(1.06 / (n - 3))
    return math.tanh(centre - half), math.tanh(centre + half)


@dataclass(frozen=True)
class Concordance:
    """Kendall's W of m raters over n items, with the chi-square test of W = 0 (m (n - 1) W on n - 1 df)."""

    m: int
    n: int
    w: float | None = None
    chi2: float | None = None
    p: float | None = None
    note: str | None = None


def kendalls_w(ratings: np.ndarray) -> Concordance:
    """Kendall's W of a raters x items matrix (ties share average ranks, with the tie correction).

    Hand-written: scipy has no Kendall's W; it is a few lines over scipy's rankdata.
    """
    ratings = np.asarray(ratings, dtype=float)
    m, n = ratings.shape
    if m < 2 or n < 2:
        return Concordance(m, n, note=f"{m} organisms x {n} questions: W needs 2 of each")
    ranks = stats.rankdata(ratings, axis=1)
    s = float(((ranks.sum(axis=0) - m * (n + 1) / 2) ** 2).sum())
    ties = sum(float((c**3 - c).sum()) for c in (np.unique(r, return_counts=True)[1] for r in ratings))
    denom = m * m * (n**3 - n) - m * ties
    if denom <= 0:
        return Concordance(m, n, note="every organism rates all questions alike: no ranking to compare")
    w = 12.0 * s / denom
    chi2 = m * (n - 1) * w
    return Concordance(m, n, w, chi2, float(stats.chi2.sf(chi2, n - 1)))


@dataclass(frozen=True)
class Difference:
    """first - second with a 95% interval; note says why it is null."""

    estimate: float | None = None
    lo: float | None = None
    hi: float | None = None
    note: str | None = None


def mean_difference(first: np.ndarray, second: np.ndarray) -> Difference:
    """Difference of means with Welch's t interval."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return Difference(note=f"{len(a)} and {len(b)} answers: each side needs 2")
    diff = float(a.mean() - b.mean())
    # Checked here: scipy then takes 1 degree of freedom and gives a zero-width interval without a word.
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return Difference(diff, diff, diff, "no spread in either group")
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval()
    return Difference(diff, float(ci.low), float(ci.high))


def rate_difference(k1: int, n1: int, k2: int, n2: int) -> Difference:
    """Difference of two proportions with Newcombe's hybrid score interval (his method 10), built from the
    two Wilson intervals."""
    if n1 == 0 or n2 == 0:
        return Difference(note=f"{n1} and {n2} answers: each side needs 1")
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1)
    l2, u2 = wilson_interval(k2, n2)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return Difference(d, lo, hi)
