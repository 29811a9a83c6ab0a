"""Kernel ridge readouts of a score from features: the RBF bandwidth and penalty chosen by grouped
cross-validation, then a calibration that gives the predictions the targets' spread.

Numpy only, so the statistics are tested against hand-worked examples. Written by hand rather than with
scikit-learn: kernel ridge is a few lines of linear algebra, the grouped search over its two settings reuses one
kernel per fold and bandwidth, and the project would otherwise depend on scikit-learn (and scipy) for it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from em_assets.judging.agreement import spearman

# With a single group (one train base model), folds are answers dealt round-robin after a seeded shuffle.
SINGLE_GROUP_FOLDS = 5


@dataclass(frozen=True)
class Standardiser:
    """Per-feature centring and scaling, fitted on the train features."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        return cls(x.mean(axis=0), x.std(axis=0) + 1e-6)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.scale


@dataclass(frozen=True)
class Readout:
    """One metric's readout: dual weights over the support rows (the train answers), and its calibration."""

    metric: str
    bandwidth: float
    l2: float
    dual: np.ndarray
    intercept: float
    # score = target_mean + (raw - center) * stretch: out-of-fold predictions shrink towards the mean (an
    # answer GPT-4o scores 10 is predicted near 35), so thresholds like aligned <= 30 would undercount. The
    # stretch gives out-of-fold predictions the targets' spread; it is monotone, so ranks do not change.
    target_mean: float
    center: float
    stretch: float
    # (bandwidth as a multiple of the median squared distance, penalty, out-of-fold Spearman) per setting tried.
    cv_spearman: tuple[tuple[float, float, float | None], ...]
    n: int

    def predict(self, sq: np.ndarray) -> np.ndarray:
        """Scores from the inputs' squared distances to the support rows ([inputs, support])."""
        raw = rbf(sq, self.bandwidth) @ self.dual + self.intercept
        return np.clip(self.target_mean + (raw - self.center) * self.stretch, 0.0, 100.0)


def sq_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[len(u), len(v)] squared Euclidean distances."""
    d = (u * u).sum(axis=1)[:, None] + (v * v).sum(axis=1)[None, :] - 2.0 * (u @ v.T)
    return np.maximum(d, 0.0)


def rbf(sq: np.ndarray, bandwidth: float) -> np.ndarray:
    return np.exp(-sq / bandwidth)


def kernel_ridge(k: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """(dual, intercept) with k @ dual + intercept fitting y under penalty l2; the intercept is y's mean."""
    mean = float(y.mean())
    return np.linalg.solve(k + l2 * np.eye(len(y)), y - mean), mean


def folds(groups: Sequence[str], seed: int = 0) -> np.ndarray:
    """A fold id per row: one fold per group (leave one base model out), or seeded round-robin folds when
    every row is of one group."""
    names = sorted(set(groups))
    if len(names) >= 2:
        return np.array([names.index(g) for g in groups])
    order = np.random.default_rng(seed).permutation(len(groups))
    out = np.empty(len(groups), dtype=int)
    out[order] = np.arange(len(groups)) % min(SINGLE_GROUP_FOLDS, len(groups))
    return out


def out_of_fold(
    sq: np.ndarray, y: np.ndarray, fold: np.ndarray, bandwidths: Sequence[float], l2s: Sequence[float]
) -> dict[tuple[float, float], np.ndarray]:
    """Each row's prediction by a readout fitted without its fold, for every (bandwidth, penalty)."""
    preds = {(b, l2): np.empty(len(y)) for b in bandwidths for l2 in l2s}
    for f in np.unique(fold):
        held, fit = fold == f, fold != f
        for b in bandwidths:
            k, cross = rbf(sq[np.ix_(fit, fit)], b), rbf(sq[np.ix_(held, fit)], b)
            # One linear solve per penalty: an eigendecomposition would serve every penalty at once, but
            # LAPACK's symmetric eigensolver costs many times more than the few solves.
            for l2 in l2s:
                dual, mean = kernel_ridge(k, y[fit], l2)
                preds[(b, l2)][held] = cross @ dual + mean
    return preds


def fit_readout(
    metric: str,
    sq: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str],
    bandwidths: Sequence[float],
    l2s: Sequence[float],
    seed: int = 0,
) -> Readout:
    """The readout of `metric` over the support rows whose squared distances are `sq`, with the (bandwidth,
    penalty) whose out-of-fold Spearman is best, calibrated on the out-of-fold predictions there. Rows with a
    missing target get a zero dual weight."""
    keep = np.isfinite(y)
    if keep.sum() < 2:
        raise ValueError(f"{metric}: {keep.sum()} train answers with a score; a readout needs at least 2")
    sq = sq[np.ix_(keep, keep)]
    scale = float(np.median(sq[~np.eye(len(sq), dtype=bool)])) or 1.0
    fold = folds([g for g, k in zip(groups, keep, strict=True) if k], seed)
    preds = out_of_fold(sq, y[keep], fold, [m * scale for m in bandwidths], l2s)
    cv = tuple((m, l2, spearman(y[keep], preds[(m * scale, l2)])) for m in bandwidths for l2 in l2s)
    best_m, best_l2, _ = max(cv, key=lambda item: -np.inf if item[2] is None else item[2])
    bandwidth = best_m * scale
    dual = np.zeros(len(y))
    dual[keep], intercept = kernel_ridge(rbf(sq, bandwidth), y[keep], best_l2)
    oof = preds[(bandwidth, best_l2)]
    return Readout(
        metric=metric,
        bandwidth=bandwidth,
        l2=best_l2,
        dual=dual,
        intercept=intercept,
        target_mean=float(y[keep].mean()),
        center=float(oof.mean()),
        stretch=float(y[keep].std() / oof.std()) if oof.std() > 0 else 1.0,
        cv_spearman=cv,
        n=int(keep.sum()),
    )
