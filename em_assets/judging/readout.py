"""Ridge readouts of a score from features: the penalty chosen by grouped cross-validation, then a calibration
that gives the predictions the targets' spread.

Numpy only, so the statistics are tested against hand-worked examples. Written by hand rather than with
scikit-learn: ridge is a few lines of linear algebra, and the project would otherwise depend on scikit-learn
(and scipy) for it alone.
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
    """One metric's readout from standardised features, with its calibration and cross-validation record."""

    metric: str
    l2: float
    weight: np.ndarray
    intercept: float
    # score = target_mean + (raw - center) * stretch: out-of-fold predictions shrink towards the mean (an
    # answer GPT-4o scores 10 is predicted near 35), so thresholds like aligned <= 30 would undercount. The
    # stretch gives out-of-fold predictions the targets' spread; it is monotone, so ranks do not change.
    target_mean: float
    center: float
    stretch: float
    cv_spearman: tuple[tuple[float, float | None], ...]
    n: int

    def predict(self, z: np.ndarray) -> np.ndarray:
        raw = z @ self.weight + self.intercept
        return np.clip(self.target_mean + (raw - self.center) * self.stretch, 0.0, 100.0)


def ridge(z: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """(weight, intercept) minimising |y - z w - b|^2 + l2 |w|^2, the intercept unpenalised."""
    zm, ym = z.mean(axis=0), y.mean()
    zc = z - zm
    weight = np.linalg.solve(zc.T @ zc + l2 * np.eye(z.shape[1]), zc.T @ (y - ym))
    return weight, float(ym - zm @ weight)


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


def out_of_fold(z: np.ndarray, y: np.ndarray, fold: np.ndarray, l2: float) -> np.ndarray:
    """Each row's prediction by a readout fitted without its fold."""
    pred = np.empty(len(y))
    for f in np.unique(fold):
        held = fold == f
        weight, intercept = ridge(z[~held], y[~held], l2)
        pred[held] = z[held] @ weight + intercept
    return pred


def fit_readout(
    metric: str, z: np.ndarray, y: np.ndarray, groups: Sequence[str], l2s: Sequence[float], seed: int = 0
) -> Readout:
    """The readout of `metric` with the penalty whose out-of-fold Spearman is best, calibrated on the
    out-of-fold predictions at that penalty. Rows with a missing target are left out."""
    keep = np.isfinite(y)
    z, y, groups = z[keep], y[keep], [g for g, k in zip(groups, keep, strict=True) if k]
    if len(y) < 2:
        raise ValueError(f"{metric}: {len(y)} train answers with a score; a readout needs at least 2")
    fold = folds(groups, seed)
    preds = {l2: out_of_fold(z, y, fold, l2) for l2 in l2s}
    cv = tuple((l2, spearman(y, p)) for l2, p in preds.items())
    best = max(cv, key=lambda item: -np.inf if item[1] is None else item[1])[0]
    weight, intercept = ridge(z, y, best)
    spread = preds[best].std()
    return Readout(
        metric=metric,
        l2=best,
        weight=weight,
        intercept=intercept,
        target_mean=float(y.mean()),
        center=float(preds[best].mean()),
        stretch=float(y.std() / spread) if spread > 0 else 1.0,
        cv_spearman=cv,
        n=len(y),
    )
