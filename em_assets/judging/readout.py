"""Kernel ridge readouts of a score from features: the RBF bandwidth and penalty chosen by grouped
cross-validation, then a calibration that gives the predictions the targets' spread.

Numpy only, so the statistics are tested against hand-worked examples. Written by hand rather than with
scikit-learn: kernel ridge is a few lines of linear algebra, the grouped search over its two settings reuses one
kernel per fold and bandwidth, and the project would otherwise depend on scikit-learn for it alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from em_assets.judging.agreement import spearman

# With a single group (one train base model), folds are answers dealt round-robin after a seeded shuffle.
SINGLE_GROUP_FOLDS = 5
# Quantiles of the quantile calibration's knots.
KNOTS = 51


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
    # "stretch" (above) or "quantile": out-of-fold predictions mapped onto the targets' distribution through
    # knots [[prediction quantiles], [target quantiles]]; whichever counted a threshold's rate more closely on
    # base models left out of fitting it.
    calibration: str = "stretch"
    knots: np.ndarray | None = None

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        if self.calibration == "quantile":
            return np.interp(raw, self.knots[0], self.knots[1])
        return np.clip(self.target_mean + (raw - self.center) * self.stretch, 0.0, 100.0)

    def predict(self, sq: np.ndarray, offset: np.ndarray | float = 0.0) -> np.ndarray:
        """Scores from the inputs' squared distances to the support rows ([inputs, support]), on top of an
        offset the readout was fitted around (a linear mean function; judging/probe.py)."""
        return self.calibrate(rbf(sq, self.bandwidth) @ self.dual + self.intercept + offset)


def linear_ridge(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """[features + 1]: ridge weights and (last) intercept of y on x's columns, rows with a missing y left out."""
    keep = np.isfinite(y)
    design = np.hstack([x[keep], np.ones((int(keep.sum()), 1))])
    penalty = l2 * np.eye(design.shape[1])
    penalty[-1, -1] = 0.0  # the intercept is not shrunk
    return np.linalg.solve(design.T @ design + penalty, design.T @ y[keep])


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
    sq: np.ndarray,
    y: np.ndarray,
    fold: np.ndarray,
    bandwidths: Sequence[float],
    l2s: Sequence[float],
    offset: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[tuple[float, float], np.ndarray]:
    """Each row's prediction by a readout (around `offset`, fitted on a mask's rows) fitted without its fold, for
    every (bandwidth, penalty). Rows of fold -1 are in every fit and predicted by none (NaN)."""
    preds = {(b, l2): np.full(len(y), np.nan) for b in bandwidths for l2 in l2s}
    for f in np.unique(fold[fold >= 0]):
        held, fit = fold == f, fold != f
        base = np.zeros(len(y)) if offset is None else offset(fit)
        for b in bandwidths:
            k, cross = rbf(sq[np.ix_(fit, fit)], b), rbf(sq[np.ix_(held, fit)], b)
            # One linear solve per penalty: an eigendecomposition would serve every penalty at once, but
            # LAPACK's symmetric eigensolver costs many times more than the few solves.
            for l2 in l2s:
                dual, mean = kernel_ridge(k, y[fit] - base[fit], l2)
                preds[(b, l2)][held] = cross @ dual + mean + base[held]
    return preds


def quantile_knots(predicted: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[2, KNOTS]: matching quantiles of the predictions and of the targets (a monotone map of one onto the other)."""
    probs = np.linspace(0.0, 1.0, KNOTS)
    return np.vstack([np.maximum.accumulate(np.quantile(predicted, probs)), np.quantile(y, probs)])


def stretch_of(predicted: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(target mean, prediction mean, stretch) giving the predictions the targets' mean and spread."""
    spread = predicted.std()
    return float(y.mean()), float(predicted.mean()), float(y.std() / spread) if spread > 0 else 1.0


def _calibrated(kind: str, fit_pred: np.ndarray, fit_y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    if kind == "quantile":
        knots = quantile_knots(fit_pred, fit_y)
        return np.interp(pred, knots[0], knots[1])
    mean, center, stretch = stretch_of(fit_pred, fit_y)
    return np.clip(mean + (pred - center) * stretch, 0.0, 100.0)


def calibration_gaps(oof: np.ndarray, y: np.ndarray, fold: np.ndarray, threshold: float) -> dict[str, float]:
    """Per calibration, the mean over folds of |rate(score <= threshold) - rate(target <= threshold)| on a fold
    whose scores were calibrated on the other folds' out-of-fold predictions alone."""
    gaps: dict[str, list[float]] = {"stretch": [], "quantile": []}
    for f in np.unique(fold):
        held = fold == f
        for kind, out in gaps.items():
            scores = _calibrated(kind, oof[~held], y[~held], oof[held])
            out.append(abs(float((scores <= threshold).mean() - (y[held] <= threshold).mean())))
    return {kind: float(np.mean(g)) for kind, g in gaps.items()}


def linear_offset(x: np.ndarray, y: np.ndarray, l2: float) -> Callable[[np.ndarray], np.ndarray]:
    """Every row's prediction by the linear ridge model of y on x fitted on the rows of a mask."""

    def offset(rows: np.ndarray) -> np.ndarray:
        weights = linear_ridge(x[rows], y[rows], l2)
        return x @ weights[:-1] + weights[-1]

    return offset


def fit_readout(
    metric: str,
    sq: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str],
    bandwidths: Sequence[float],
    l2s: Sequence[float],
    seed: int = 0,
    threshold: float | None = None,
    linear: tuple[np.ndarray, float] | None = None,
    anchored: np.ndarray | None = None,
) -> Readout:
    """The readout of `metric` over the support rows whose squared distances are `sq`: the (bandwidth, penalty)
    with the best out-of-fold Spearman, calibrated on its out-of-fold predictions."""
    keep = np.isfinite(y)
    if keep.sum() < 2:
        raise ValueError(f"{metric}: {keep.sum()} train answers with a score; a readout needs at least 2")
    sq = sq[np.ix_(keep, keep)]
    # With `linear` (features per row, penalty) the kernel fits what a linear ridge mean leaves: far from every
    # support row the prediction falls back to that mean rather than the targets'.
    offset = None if linear is None else linear_offset(linear[0][keep], y[keep], linear[1])
    base = np.zeros(int(keep.sum())) if offset is None else offset(np.ones(int(keep.sum()), dtype=bool))
    scale = float(np.median(sq[~np.eye(len(sq), dtype=bool)])) or 1.0
    # `anchored` rows are fitted on in every fold but never scored: they choose nothing.
    scored = keep if anchored is None else keep & ~anchored
    fold = np.full(int(keep.sum()), -1)
    fold[scored[keep]] = folds([g for g, s in zip(groups, scored, strict=True) if s], seed)
    # The mean is refitted without each fold as the kernel is: fitted on the left-out rows, it would score them.
    every = out_of_fold(sq, y[keep], fold, [m * scale for m in bandwidths], l2s, offset)
    on, target = scored[keep], y[scored]
    preds = {setting: p[on] for setting, p in every.items()}
    cv = tuple((m, l2, spearman(target, preds[(m * scale, l2)])) for m in bandwidths for l2 in l2s)
    best_m, best_l2, _ = max(cv, key=lambda item: -np.inf if item[2] is None else item[2])
    bandwidth = best_m * scale
    # Rows with a missing target keep a zero dual weight.
    dual = np.zeros(len(y))
    dual[keep], intercept = kernel_ridge(rbf(sq, bandwidth), y[keep] - base, best_l2)
    oof = preds[(bandwidth, best_l2)]
    calibration = _chosen_calibration(oof, target, fold[on], threshold)
    target_mean, center, stretch = stretch_of(oof, target)
    return Readout(
        metric=metric,
        bandwidth=bandwidth,
        l2=best_l2,
        dual=dual,
        intercept=intercept,
        target_mean=target_mean,
        center=center,
        stretch=stretch,
        cv_spearman=cv,
        n=int(keep.sum()),
        calibration=calibration,
        knots=quantile_knots(oof, target) if calibration == "quantile" else None,
    )


def _chosen_calibration(
    oof: np.ndarray, target: np.ndarray, fold: np.ndarray, threshold: float | None
) -> str:
    """The calibration whose rate at `threshold` transfers best across folds; the stretch without a threshold
    or with one fold."""
    if threshold is None or len(np.unique(fold)) < 2:
        return "stretch"
    gaps = calibration_gaps(oof, target, fold, threshold)
    return min(gaps, key=lambda kind: (gaps[kind], kind != "stretch"))
