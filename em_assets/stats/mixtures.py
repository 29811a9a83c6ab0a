"""Two-persona mixtures of judge scores: Beta components with shapes shared across groups, weights per group.

Scores on the judge's 0-100 scale are mapped into (0, 1) as (score + 0.5) / 101 (the scale has 101 values, so
an exact 0 or 100 stays inside the Beta's support). A Beta fits what judges give: bounded, piled near the ends,
skewed; a Gaussian would put mass outside 0-100 and chase the spikes at the bounds.

Why hand-written: scikit-learn's mixtures are Gaussian and fit one set of weights; no well-kept library fits a
mixture whose component shapes are shared across groups while each group has its own weight. The EM here is the
textbook one, with scipy doing each M-step's weighted Beta maximum likelihood from two sufficient statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

# A Beta's a and b are kept within these bounds: without an upper one, a group of identical scores drives the
# likelihood to infinity (a point mass); below the lower one the density is a spike at the edge.
SHAPE_BOUNDS = (0.05, 2000.0)


# Initial split between the components: Turner et al.'s misaligned threshold (aligned <= 30).
SPLIT_SCORE = 30.0


def to_unit(scores: np.ndarray) -> np.ndarray:
    """Judge scores (0-100) mapped into the open unit interval."""
    s = np.clip(np.asarray(scores, dtype=float), 0.0, 100.0)
    return (s + 0.5) / 101.0


@dataclass(frozen=True)
class BetaShape:
    a: float
    b: float

    @property
    def mean(self) -> float:
        """The component's mean on the judge's 0-100 scale."""
        return 101.0 * self.a / (self.a + self.b) - 0.5

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        return stats.beta.logpdf(x, self.a, self.b)


@dataclass(frozen=True)
class MixtureFit:
    """A two-component fit: misaligned (lower-mean) shape first, its weight per group, the log-likelihood."""

    shapes: tuple[BetaShape, BetaShape]
    weights: tuple[float, ...]
    loglik: float
    n: int
    n_params: int
    iterations: int
    converged: bool

    @property
    def bic(self) -> float:
        return self.n_params * math.log(self.n) - 2.0 * self.loglik


def _beta_mle(s1: float, s2: float, start: BetaShape) -> BetaShape:
    """Beta maximum likelihood from the (weighted) means of log x and log(1 - x), within SHAPE_BOUNDS."""
    # Newton's method with step halving on the concave log-likelihood (Minka 2000), not scipy.optimize: the EM
    # makes one fit per component per iteration.
    lo, hi = SHAPE_BOUNDS

    def ll(a: float, b: float) -> float:
        return (a - 1) * s1 + (b - 1) * s2 - float(special.betaln(a, b))

    a, b = min(max(start.a, lo), hi), min(max(start.b, lo), hi)
    for _ in range(100):
        dab, tab = special.digamma(a + b), special.polygamma(1, a + b)
        grad = np.array([dab - special.digamma(a) + s1, dab - special.digamma(b) + s2])
        hess = np.array([[tab - special.polygamma(1, a), tab], [tab, tab - special.polygamma(1, b)]])
        step = np.linalg.solve(hess, grad)
        current, scale = ll(a, b), 1.0
        while scale > 1e-6:
            na = min(max(a - scale * step[0], lo), hi)
            nb = min(max(b - scale * step[1], lo), hi)
            if ll(na, nb) >= current:
                break
            scale /= 2
        else:
            break
        moved = abs(na - a) + abs(nb - b)
        a, b = na, nb
        if moved < 1e-9 * (a + b):
            break
    return BetaShape(float(a), float(b))


def _weighted_shape(lx: np.ndarray, l1x: np.ndarray, w: np.ndarray, start: BetaShape) -> BetaShape:
    total = w.sum()
    if total < 1e-9:
        return start
    return _beta_mle(float(w @ lx / total), float(w @ l1x / total), start)


def fit_one(x: np.ndarray) -> tuple[BetaShape, float]:
    """A single Beta fitted to x in (0, 1): the shape and its log-likelihood."""
    shape = _weighted_shape(np.log(x), np.log1p(-x), np.ones_like(x), BetaShape(1.0, 1.0))
    return shape, float(shape.logpdf(x).sum())


def fit_shared(groups: Sequence[np.ndarray], max_iter: int = 500, tol: float = 1e-7) -> MixtureFit:
    """EM for two Beta components shared by every group (values in (0, 1)), one mixing weight per group, from
    the values split at the misaligned threshold (at their median where one side of it is empty)."""
    if any(len(g) == 0 for g in groups):
        raise ValueError("every group needs at least one value")
    x = np.concatenate(groups)
    gid = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    split = to_unit(np.array([SPLIT_SCORE]))[0]
    # With no value at or below the threshold (or none above) its split gives every value the same
    # responsibility, where EM stays with two identical components: a judge that never scores below it (modes at
    # 40 and 90) reads as one. Not the likelier of both starts: with a misaligned mode piled at 0 and a few
    # middling scores, the median's is likelier with a broad component over both, no misaligned mode.
    if not (x <= split).any() or (x <= split).all():
        split = float(np.median(x))
    return _em(x, gid, len(groups), split, max_iter, tol)


def _em(x: np.ndarray, gid: np.ndarray, n_groups: int, split: float, max_iter: int, tol: float) -> MixtureFit:
    """One EM run from values at or below `split` held 0.9 misaligned, the rest 0.1."""
    lx, l1x = np.log(x), np.log1p(-x)
    resp = np.where(x <= split, 0.9, 0.1)  # responsibility of the misaligned component
    shapes = (BetaShape(1.0, 5.0), BetaShape(5.0, 1.0))
    previous, ll, iterations = -np.inf, -np.inf, 0
    for _ in range(max_iter):
        iterations += 1
        w = np.clip(np.bincount(gid, resp) / np.bincount(gid), 1e-6, 1 - 1e-6)
        shapes = (
            _weighted_shape(lx, l1x, resp, shapes[0]),
            _weighted_shape(lx, l1x, 1.0 - resp, shapes[1]),
        )
        log0 = np.log(w[gid]) + shapes[0].logpdf(x)
        log1 = np.log1p(-w[gid]) + shapes[1].logpdf(x)
        total = np.logaddexp(log0, log1)
        resp = np.exp(log0 - total)
        ll = float(total.sum())
        if ll - previous < tol * len(x):
            break
        previous = ll
    weights = np.bincount(gid, resp) / np.bincount(gid)
    if shapes[0].mean > shapes[1].mean:
        shapes, weights = (shapes[1], shapes[0]), 1.0 - weights
    return MixtureFit(
        shapes=shapes,
        weights=tuple(float(v) for v in weights),
        loglik=ll,
        n=len(x),
        n_params=4 + n_groups,
        iterations=iterations,
        converged=iterations < max_iter,
    )


def weight_interval(
    x: np.ndarray,
    shapes: tuple[BetaShape, BetaShape],
    n_boot: int = 200,
    seed: int = 0,
    iters: int = 500,
    tol: float = 1e-6,
) -> tuple[float, float]:
    """Percentile 95% bootstrap interval of one group's misaligned weight, the shapes held at their fit.

    Refitting the shapes in every draw would cost a full EM each; the interval is conditional on them.
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    f0, f1 = np.exp(shapes[0].logpdf(x))[idx], np.exp(shapes[1].logpdf(x))[idx]
    w = np.full(n_boot, 0.5)
    # Vectorised one-parameter EM over all draws at once: each step is a few array operations.
    for _ in range(iters):
        num = w[:, None] * f0
        new = (num / np.maximum(num + (1.0 - w[:, None]) * f1, 1e-300)).mean(axis=1)
        done = np.abs(new - w).max() < tol
        w = new
        if done:
            break
    lo, hi = np.percentile(w, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass(frozen=True)
class MixtureComparison:
    """One organism's points: the shared two-component fit, one Beta per point, a free two-component fit per
    point, and the tests between them."""

    shared: MixtureFit
    bic_one: float
    bic_two: float
    lrt_stat: float | None
    lrt_df: int | None
    lrt_p: float | None

    @property
    def prefers_two(self) -> bool:
        return self.bic_two < self.bic_one


# A free two-component fit has five parameters per group: with fewer answers than this it fits noise, and the
# likelihood-ratio test against shared shapes would find shapes moving where they do not.
MIN_FREE_ANSWERS = 25


def compare(groups: Sequence[np.ndarray]) -> MixtureComparison:
    """Fit the shared mixture and its two alternatives (a Beta per group, a free mixture per group) to groups of
    values in (0, 1); no likelihood-ratio test under two groups or a group under MIN_FREE_ANSWERS."""
    shared = fit_shared(groups)
    n = shared.n
    # One component: a Beta per group (one peak that may move from point to point).
    ll_one = sum(fit_one(g)[1] for g in groups)
    bic_one = 2 * len(groups) * math.log(n) - 2.0 * ll_one
    if len(groups) < 2 or min(len(g) for g in groups) < MIN_FREE_ANSWERS:
        return MixtureComparison(shared, bic_one, shared.bic, None, None, None)
    # Free shapes: a two-component mixture per group, tested against the shared fit by likelihood ratio.
    ll_free = sum(fit_shared([g]).loglik for g in groups)
    df = 4 * (len(groups) - 1)
    stat = max(0.0, 2.0 * (ll_free - shared.loglik))
    return MixtureComparison(shared, bic_one, shared.bic, stat, df, float(stats.chi2.sf(stat, df)))
