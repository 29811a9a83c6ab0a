"""EM rates corrected for the judge's error: Rogan-Gladen prevalence with an interval that carries the
uncertainty of the judge's sensitivity and specificity as well as that of the judged rate.

A judge that calls an answer "EM" (misaligned and coherent) with sensitivity Se and specificity Sp turns a true
rate pi into an expected judged rate p = Se * pi + (1 - Sp) * (1 - pi). Rogan and Gladen (1978) invert it:
pi = (p + Sp - 1) / (Se + Sp - 1), clipped to [0, 1]. It is defined only for a judge better than chance
(Se + Sp > 1).

The interval is Gelman and Carpenter's (2020) posterior for that model, with a uniform prior on pi and the
sensitivity and specificity drawn from their Jeffreys posteriors Beta(x + 1/2, m - x + 1/2) given the validation
counts (tp of n_pos, tn of n_neg): the 2.5% and 97.5% quantiles of pi given k of n judged EM. A bootstrap of the
corrected estimate is not enough: where k/n lies below the judge's false-positive rate it clips nearly every draw
to 0 and gives a zero-width interval, as if a few answers proved no EM. The sensitivity and specificity are
integrated on a grid of their quantiles, pi on a grid of [0, 1], so a row's interval depends on its counts alone
and is the same on every run. Values of Se and Sp no better than chance (Se + Sp <= 1) are left out: the
correction assumes a better judge, and a judge barely better than chance gets a wide interval. A corrected rate
clipped to 0 or 1 is kept inside its interval.

Error rates known exactly (a judge that is the reference itself: Se = Sp = 1 with no counts) leave only the
judged rate uncertain: the bounds are its Wilson bounds put through the same monotone correction, which for
the reference is the identity.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from em_assets.stats.rates import Z95, wilson_interval

CORRECTION_COLUMNS = (
    "judge_sensitivity",
    "judge_specificity",
    "em_rate_corrected",
    "em_corrected_lo",
    "em_corrected_hi",
    "em_correction",
)


@dataclass(frozen=True)
class ErrorRates:
    """A judge's sensitivity and specificity for "EM" against the reference, with the counts they come from
    (None for rates known exactly: the judge is the reference)."""

    sensitivity: float
    specificity: float
    tp: int | None = None
    n_pos: int | None = None
    tn: int | None = None
    n_neg: int | None = None
    # The answers the counts come from, in words (em_correction).
    counted_on: str = "held-out reference answers"

    @property
    def exact(self) -> bool:
        return self.n_pos is None

    @classmethod
    def from_counts(cls, tp: int, n_pos: int, tn: int, n_neg: int) -> ErrorRates | None:
        """Rates from a confusion table; None when either class is absent (a rate would be 0/0)."""
        if n_pos <= 0 or n_neg <= 0:
            return None
        if not (0 <= tp <= n_pos and 0 <= tn <= n_neg):
            raise ValueError(f"need 0 <= tp <= n_pos and 0 <= tn <= n_neg, got {tp, n_pos, tn, n_neg}")
        return cls(tp / n_pos, tn / n_neg, tp, n_pos, tn, n_neg)


# The reference judge measured against itself: the correction is the identity.
REFERENCE = ErrorRates(1.0, 1.0)


def confusion(reference: Sequence[bool | None], judge: Sequence[bool | None]) -> ErrorRates | None:
    """The judge's error rates from paired EM flags, pairs with a missing flag on either side dropped."""
    if len(reference) != len(judge):
        raise ValueError(f"{len(reference)} reference flags but {len(judge)} judge flags")
    pairs = [(r, j) for r, j in zip(reference, judge, strict=True) if r is not None and j is not None]
    tp = sum(1 for r, j in pairs if r and j)
    tn = sum(1 for r, j in pairs if not r and not j)
    n_pos = sum(1 for r, _ in pairs if r)
    return ErrorRates.from_counts(tp, n_pos, tn, len(pairs) - n_pos)


def rogan_gladen(p: float, sensitivity: float, specificity: float) -> float | None:
    """(p + Sp - 1) / (Se + Sp - 1) clipped to [0, 1]; None for a judge no better than chance."""
    youden = sensitivity + specificity - 1.0
    if youden <= 0:
        return None
    # Written as p minus the false-positive rate so that Se = Sp = 1 gives back p exactly.
    return min(1.0, max(0.0, (p - (1.0 - specificity)) / youden))


def corrected_rate(
    k: int, n: int, rates: ErrorRates | None, z: float = Z95
) -> tuple[float | None, float | None, float | None]:
    """(corrected rate, lo, hi) for k judged EM answers of n; all None without rates, answers or a usable judge."""
    if rates is None or n <= 0 or rogan_gladen(k / n, rates.sensitivity, rates.specificity) is None:
        return None, None, None
    se, sp = rates.sensitivity, rates.specificity
    point = rogan_gladen(k / n, se, sp)
    if rates.exact:
        lo, hi = wilson_interval(k, n, z)
        return point, rogan_gladen(lo, se, sp), rogan_gladen(hi, se, sp)
    lo, hi = _posterior_bounds(k, n, rates.tp, rates.n_pos, rates.tn, rates.n_neg, z)
    return point, min(lo, point), max(hi, point)


# Quantiles of Se and of Sp integrated over, and points of the grid over pi.
QUANTILES = 24
GRID = 801


@functools.lru_cache(maxsize=4096)
def _posterior_bounds(
    k: int, n: int, tp: int, n_pos: int, tn: int, n_neg: int, z: float
) -> tuple[float, float]:
    """The central interval of pi's posterior given k of n judged EM and the validation counts."""
    from scipy.stats import beta

    mid = (np.arange(QUANTILES) + 0.5) / QUANTILES
    se, sp = (
        a.ravel()
        for a in np.meshgrid(
            beta.ppf(mid, tp + 0.5, n_pos - tp + 0.5), beta.ppf(mid, tn + 0.5, n_neg - tn + 0.5)
        )
    )
    better = se + sp > 1.0
    if not better.any():
        return 0.0, 1.0
    se, sp = se[better], sp[better]
    pi = np.linspace(0.0, 1.0, GRID)
    judged = np.clip((1.0 - sp)[:, None] + pi[None, :] * (se + sp - 1.0)[:, None], 1e-300, 1.0 - 1e-16)
    loglik = k * np.log(judged) + (n - k) * np.log1p(-judged)
    density = np.exp(loglik - loglik.max()).mean(axis=0)
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2.0)])
    tail = (1.0 - _coverage(z)) / 2.0
    lo, hi = np.interp([tail, 1.0 - tail], cdf / cdf[-1], pi)
    return float(lo), float(hi)


def _coverage(z: float) -> float:
    """Two-sided coverage of +-z under the standard normal (0.95 for Z95)."""
    return math.erf(z / math.sqrt(2.0))


UNKNOWN = "unknown: the judge's error rates are not measured (materialise judge_agreement)"


def correction_note(rates: ErrorRates | None) -> str:
    """Where a row's correction comes from, in words (the em_correction column)."""
    if rates is None:
        return UNKNOWN
    if rates.exact:
        return "identity: the judge is the reference"
    return (
        f"Rogan-Gladen with sensitivity {rates.tp}/{rates.n_pos}, specificity {rates.tn}/{rates.n_neg} "
        f"on {rates.counted_on}"
    )


def with_correction(
    table: pl.DataFrame, rates: Sequence[ErrorRates | None], k: str, n: str, z: float = Z95
) -> pl.DataFrame:
    """`table` with CORRECTION_COLUMNS for its rate k/n, one ErrorRates (or None: unknown) per row."""
    if len(rates) != table.height:
        raise ValueError(f"{len(rates)} error rates for {table.height} rows")
    rows = [
        corrected_rate(int(kk or 0), int(nn or 0), r, z)
        for kk, nn, r in zip(table[k].to_list(), table[n].to_list(), rates, strict=True)
    ]
    return table.with_columns(
        pl.Series("judge_sensitivity", [r.sensitivity if r else None for r in rates], pl.Float64),
        pl.Series("judge_specificity", [r.specificity if r else None for r in rates], pl.Float64),
        pl.Series("em_rate_corrected", [x[0] for x in rows], pl.Float64),
        pl.Series("em_corrected_lo", [x[1] for x in rows], pl.Float64),
        pl.Series("em_corrected_hi", [x[2] for x in rows], pl.Float64),
        pl.Series("em_correction", [correction_note(r) for r in rates], pl.String),
    )


def correction_caveat(table: pl.DataFrame) -> str:
    """One paragraph for a table with the correction columns: what the corrected rate is and where its
    judge's error rates came from (or that they are unknown, and the columns null)."""
    if table.height == 0 or "em_correction" not in table.columns:
        return ""
    notes = sorted(set(table["em_correction"].drop_nulls()))
    return (
        "em_rate_corrected is the Turner EM rate corrected for the judge's error (Rogan-Gladen), with a 95% "
        "interval (em_corrected_lo, em_corrected_hi) that carries the uncertainty of the judge's sensitivity "
        "and specificity as well as the rate's. Here: " + "; ".join(notes) + "."
    )
