"""A behavioural transition: a binomial logistic with a ceiling fitted to rates against a swept parameter.

p(x) = top * sigmoid(s * (x - midpoint)). EM rates rise to a plateau well below one (Turner et al.'s organisms
stop near 10-40%), so a plain logistic, whose midpoint is where p = 0.5, would put the transition far outside
the sweep; the ceiling makes the midpoint the half-way point of the rise actually seen. Fitted by maximum
likelihood (scipy.optimize); the midpoint's 95% interval is Wald's, from the inverse of the observed
information, the midpoint being one of the parameters, with binomial variance (no dispersion is estimated, so
answers that vary more than binomially, as answers grouped by question do, make it too narrow). Counts may be
fractional (a mixture weight times the number of answers) and enter the likelihood as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import optimize, special

from em_assets.stats.rates import Z95

# Three parameters: with fewer distinct points the fit has no residual freedom at all.
MIN_POINTS = 4


# A fitted ceiling above this is on its bound of 1 (the rise reaches every answer).
CEILING = 1 - 1e-6

# A Wald interval wider than this many swept ranges is numerically meaningless: reported as undefined.
WIDEST = 10.0


@dataclass(frozen=True)
class TransitionFit:
    """The midpoint of the rise (with its interval), its steepness s, the ceiling, and the slope at the midpoint
    (top * s / 4, rate per unit x); note says why a value is null."""

    n_points: int
    midpoint: float | None = None
    midpoint_lo: float | None = None
    midpoint_hi: float | None = None
    steepness: float | None = None
    top: float | None = None
    max_slope: float | None = None
    note: str | None = None


_SIMPLEX = {"xatol": 1e-8, "fatol": 1e-10, "maxiter": 20000, "maxfev": 20000}


def _nll(theta: np.ndarray, x: np.ndarray, k: np.ndarray, n: np.ndarray) -> float:
    m, s, g = theta
    log_top = -np.logaddexp(0.0, -g)
    log_sig = -np.logaddexp(0.0, -s * (x - m))
    log_p = log_top + log_sig
    log_q = np.log1p(-np.minimum(np.exp(log_p), 1 - 1e-12))
    return float(-(k * log_p + (n - k) * log_q).sum())


def _hessian(f, theta: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """Central-difference Hessian (three parameters: 36 evaluations)."""
    d = len(theta)
    out = np.empty((d, d))
    for i in range(d):
        for j in range(d):
            ei, ej = np.eye(d)[i] * h, np.eye(d)[j] * h
            out[i, j] = (
                f(theta + ei + ej) - f(theta + ei - ej) - f(theta - ei + ej) + f(theta - ei - ej)
            ) / (4 * h * h)
    return out


def fit_transition(x: np.ndarray, k: np.ndarray, n: np.ndarray, counted: str = "answers") -> TransitionFit:
    """Fit the ceilinged logistic to k of n at each x; null values and a note where the data cannot carry it
    (`counted`: what a point with n > 0 has, as the note names it)."""
    x, k, n = (np.asarray(v, dtype=float) for v in (x, k, n))
    keep = n > 0
    x, k, n = x[keep], k[keep], n[keep]
    points = len(np.unique(x))
    if points < MIN_POINTS:
        return TransitionFit(points, note=f"{points} points with {counted}: the fit needs {MIN_POINTS}")
    if k.sum() <= 0:
        return TransitionFit(points, note="no misaligned answers at any point: nothing rises")
    # Standardised x keeps the three parameters on one scale for the optimiser and the Hessian.
    centre, spread = float(x.mean()), float(x.std())
    z = (x - centre) / spread
    theta = _best_fit(z, k, n)
    m, s, g = theta
    top = float(special.expit(g))
    fit = TransitionFit(
        points,
        midpoint=centre + spread * float(m),
        steepness=float(s) / spread,
        top=top,
        max_slope=top * float(s) / spread / 4.0,
    )
    at_ceiling = top > CEILING
    var = _midpoint_variance(theta, z, k, n, at_ceiling)
    if var is None:
        return replace(
            fit, note="flat likelihood at the fit (a step or no rise): midpoint interval undefined"
        )
    half, span = Z95 * spread * var**0.5, float(x.max() - x.min())
    if 2 * half > WIDEST * span:
        return replace(
            fit, note=f"midpoint interval over {WIDEST:g} times the swept range: the sweep does not pin it"
        )
    if _is_step(x, fit.midpoint, fit.steepness):
        return replace(fit, note="a step between two swept points: midpoint interval undefined")
    outside = not x.min() <= fit.midpoint <= x.max()
    notes = ["midpoint outside the swept range (extrapolated)"] * outside
    notes += ["the rise reaches every answer: the interval holds the ceiling at 1"] * at_ceiling
    note = "; ".join(notes) or None
    return replace(fit, midpoint_lo=fit.midpoint - half, midpoint_hi=fit.midpoint + half, note=note)


def _best_fit(z: np.ndarray, k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """(midpoint, steepness, logit of the ceiling) on standardised x: the best of six Nelder-Mead starts."""
    top0 = float(special.logit(min(max(k.sum() / n.sum() * 2, 0.05), 0.95)))
    starts = [np.array([m, s, top0]) for m in np.quantile(z, [0.25, 0.5, 0.75]) for s in (-4.0, 4.0)]
    fits = [
        optimize.minimize(_nll, t, args=(z, k, n), method="Nelder-Mead", options=_SIMPLEX) for t in starts
    ]
    return min(fits, key=lambda r: r.fun).x


def _midpoint_variance(
    theta: np.ndarray, z: np.ndarray, k: np.ndarray, n: np.ndarray, at_ceiling: bool
) -> float | None:
    """The standardised midpoint's Wald variance at the fit; None where the likelihood is flat there."""
    if at_ceiling:
        # A rise to every answer puts the ceiling on its bound, where the likelihood has no curvature in it: the
        # midpoint's interval is taken with the ceiling held there.
        cov = np.linalg.pinv(_hessian(lambda t: _nll(np.append(t, theta[2]), z, k, n), theta[:2]))
    else:
        cov = np.linalg.pinv(_hessian(lambda t: _nll(t, z, k, n), theta))
    var = float(cov[0, 0])
    if not np.isfinite(var) or var <= 0 or not np.all(np.linalg.eigvalsh(_sym(cov)) > 0):
        return None
    return var


def _is_step(x: np.ndarray, midpoint: float, steepness: float) -> bool:
    """Whether the rise goes from 5% to 95% of itself within the gap between swept points the midpoint is in."""
    # A step's points do not say where in the gap it lies, and the Wald interval would only reflect where the
    # optimiser stopped the growing steepness. The gap is the one the midpoint lies in (the nearest, outside the
    # range): a sweep's spacing can vary (the final checkpoint a few steps after the last kept one).
    swept = np.unique(x)
    gap = int(np.clip(np.searchsorted(swept, midpoint), 1, swept.size - 1))
    return bool(2 * np.log(19) / abs(steepness) < swept[gap] - swept[gap - 1])


def _sym(a: np.ndarray) -> np.ndarray:
    return (a + a.T) / 2
