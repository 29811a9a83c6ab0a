"""EM rates corrected for the judge's error: Rogan-Gladen prevalence with an interval that carries the
uncertainty of the judge's sensitivity and specificity as well as that of the judged rate.

A judge that calls an answer "EM" (misaligned and coherent) with sensitivity Se and specificity Sp turns a true
rate pi into an expected judged rate p = Se * pi + (1 - Sp) * (1 - pi). Rogan and Gladen (1978) invert it:
pi = (p + Sp - 1) / (Se + Sp - 1), clipped to [0, 1]. It is defined only for a judge better than chance
(Se + Sp > 1).

The interval is Gelman and Carpenter's (2020) posterior for that model, with a uniform prior on pi and the
sensitivity and specificity drawn from their Jeffreys posteriors Beta(x + 1/2, m - x + 1/2) given the validation
counts (tp of n_pos, tn of n_neg): the 2.5% and 97.5% quantiles of pi given k of n judged EM, reaching 0 where the
judge's errors alone (pi = 0) give k of n or more at least 2.5% of the time, and 1 likewise. A bootstrap of the
corrected estimate is not enough: where k/n lies below the judge's false-positive rate it clips nearly every draw
to 0 and gives a zero-width interval, as if a few answers proved no EM. The sensitivity and specificity are
integrated by Gauss-Hermite quadrature over the normal scores of their quantiles, pi on a grid of [0, 1], so a
row's interval depends on its counts alone and is the same on every run. Values of Se and Sp no better than
chance (Se + Sp <= 1) are left out: the correction assumes a better judge, and a judge barely better than
chance gets a wide interval. A corrected rate clipped to 0 or 1 is kept inside its interval.

A judge's error rates can differ from one organism's answers to another's by more than their counts' noise (the
demo's probe judge finds a far larger share of GPT-4o's EM answers in some held-out reference files than in others;
docs/em-rates.md gives the figures). Where the validation counts come from several reference files, Se and Sp are
each drawn instead from their predictive distribution for a new file under a Bayesian random-effects model across
files (normal on the logit scale, a half-normal prior on the between-file standard deviation; Friede et al. 2017):
the interval is then for answers of an organism the error rates were not measured on, which is what they correct.
A few files cannot show that they agree, so the spread is never dropped: files that agree within their noise get
a narrow one from the prior, files that disagree a wide one.

Error rates known exactly (a judge that is the reference itself: Se = Sp = 1 with no counts) leave only the
judged rate uncertain: the bounds are its Wilson bounds put through the same monotone correction, which for
the reference is the identity.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

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


# The half-normal prior on the between-file standard deviation tau of a rate's logit: the scale Friede et al.
# (2017) and Roever et al. (2021) use as weakly informative for heterogeneity on a log-odds scale.
TAU_PRIOR_SCALE = 0.5
# The grid over tau: past 4 the prior's density is below e^-32 and no posterior mass is lost.
TAU_GRID = np.linspace(0.0, 4.0, 401)


@dataclass(frozen=True)
class Spread:
    """A rate's predictive distribution for a new reference file: a mixture, over a grid of the between-file
    standard deviation tau with its posterior weights, of normals on the logit scale."""

    means: tuple[float, ...]
    sds: tuple[float, ...]
    weights: tuple[float, ...]

    def at(self, quantiles: np.ndarray) -> np.ndarray:
        """The rate at these quantiles of the distribution (the mixture's CDF inverted on a fine grid)."""
        from scipy.special import expit, ndtr

        m, sd, w = (np.array(v) for v in (self.means, self.sds, self.weights))
        grid = np.linspace((m - 8 * sd).min(), (m + 8 * sd).max(), 2001)
        cdf = w @ ndtr((grid[None, :] - m[:, None]) / sd[:, None])
        return expit(np.interp(quantiles, cdf, grid))

    def interval(self) -> tuple[float, float]:
        """Where 95% of new files' rates lie."""
        lo, hi = _spread_at(self, (0.025, 0.975))
        return float(lo), float(hi)

    @property
    def logit_mean(self) -> float:
        return float(np.dot(self.weights, self.means))

    @property
    def logit_sd(self) -> float:
        """The mixture's standard deviation on the logit scale."""
        m, sd, w = (np.array(v) for v in (self.means, self.sds, self.weights))
        return float(np.sqrt(w @ (sd**2 + m**2) - (w @ m) ** 2))


def between_files(successes: Sequence[int], totals: Sequence[int]) -> Spread | None:
    """A new file's rate under Bayesian random effects across files, from each file's successes of totals: None
    where fewer than two files have any answer of the class."""
    # Each file's logit (0.5 added to each cell) is normal about its own logit with its binomial variance, and
    # those about mu with variance tau^2; mu has a flat prior and tau TAU_PRIOR_SCALE's half-normal. Integrated
    # on a grid (no sampler, so the same counts give the same spread): statsmodels' and bayesmeta's versions
    # would each be a dependency for this alone.
    pairs = [(x, n) for x, n in zip(successes, totals, strict=True) if n > 0]
    if len(pairs) < 2:
        return None
    x, n = (np.array(c, dtype=float) for c in zip(*pairs, strict=True))
    y = np.log((x + 0.5) / (n - x + 0.5))
    var = 1.0 / (x + 0.5) + 1.0 / (n - x + 0.5)
    w = 1.0 / (var[None, :] + TAU_GRID[:, None] ** 2)
    mu = (w * y).sum(1) / w.sum(1)
    # log p(tau | y) up to a constant: the prior, and the likelihood with mu integrated out.
    log_post = (
        -0.5 * (TAU_GRID / TAU_PRIOR_SCALE) ** 2
        - 0.5 * np.log(w.sum(1))
        + 0.5 * np.log(w).sum(1)
        - 0.5 * (w * (y[None, :] - mu[:, None]) ** 2).sum(1)
    )
    post = np.exp(log_post - log_post.max())
    post /= post.sum()
    sd = np.sqrt(TAU_GRID**2 + 1.0 / w.sum(1))
    keep = post > 1e-12
    return Spread(tuple(mu[keep]), tuple(sd[keep]), tuple(post[keep] / post[keep].sum()))


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
    # How many reference files they come from, and each rate's spread across them (None: fewer than two files
    # with answers of its class).
    n_files: int | None = None
    sensitivity_spread: Spread | None = None
    specificity_spread: Spread | None = None
    # Each file's (tp, n_pos, tn, n_neg), which the spreads come from (what is stored).
    file_counts: tuple[tuple[int, int, int, int], ...] | None = None

    @property
    def exact(self) -> bool:
        return self.n_pos is None

    def new_file_ranges(self) -> dict[str, tuple[float, float] | None]:
        """Where 95% of new reference files' sensitivity and specificity lie; None for a rate counted on fewer
        than two files."""
        return {
            "sensitivity": self.sensitivity_spread.interval() if self.sensitivity_spread else None,
            "specificity": self.specificity_spread.interval() if self.specificity_spread else None,
        }

    @classmethod
    def from_counts(cls, tp: int, n_pos: int, tn: int, n_neg: int) -> ErrorRates | None:
        """Rates from a confusion table; None when either class is absent (a rate would be 0/0)."""
        if n_pos <= 0 or n_neg <= 0:
            return None
        if not (0 <= tp <= n_pos and 0 <= tn <= n_neg):
            raise ValueError(f"need 0 <= tp <= n_pos and 0 <= tn <= n_neg, got {tp, n_pos, tn, n_neg}")
        return cls(tp / n_pos, tn / n_neg, tp, n_pos, tn, n_neg)

    @classmethod
    def from_files(cls, counts: Sequence[tuple[int, int, int, int]]) -> ErrorRates | None:
        """Rates pooled over reference files' confusion tables (tp, n_pos, tn, n_neg), with each rate's spread
        across them; None when either class is absent from every file."""
        pooled = cls.from_counts(*(sum(c[i] for c in counts) for i in range(4)))
        if pooled is None:
            return None
        return replace(
            pooled,
            n_files=len(counts),
            file_counts=tuple(tuple(int(v) for v in c) for c in counts),
            sensitivity_spread=between_files([c[0] for c in counts], [c[1] for c in counts]),
            specificity_spread=between_files([c[2] for c in counts], [c[3] for c in counts]),
        )


# The reference judge measured against itself: the correction is the identity.
REFERENCE = ErrorRates(1.0, 1.0)


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
    lo, hi = _posterior_bounds(
        k,
        n,
        rates.tp,
        rates.n_pos,
        rates.tn,
        rates.n_neg,
        z,
        rates.sensitivity_spread,
        rates.specificity_spread,
    )
    return point, min(lo, point), max(hi, point)


# Quadrature nodes for Se and for Sp, and points of the grid over pi. Gauss-Hermite nodes reach quantiles of about
# 1e-12: with few validation answers the interval's ends come from those tails, which evenly spaced quantiles miss.
NODES = 32
GRID = 801


@functools.lru_cache(maxsize=1)
def _quadrature() -> tuple[np.ndarray, np.ndarray]:
    """Quantiles and weights that integrate a function of a rate against its distribution."""
    from scipy.special import ndtr

    x, w = np.polynomial.hermite_e.hermegauss(NODES)
    return ndtr(x), w / w.sum()


@functools.lru_cache(maxsize=4096)
def _posterior_bounds(
    k: int,
    n: int,
    tp: int,
    n_pos: int,
    tn: int,
    n_neg: int,
    z: float,
    se_spread: Spread | None = None,
    sp_spread: Spread | None = None,
) -> tuple[float, float]:
    """The central interval of pi's posterior given k of n judged EM and the validation counts (or, for a rate
    that varies between files, its spread)."""
    quantiles, weights = _quadrature()
    se, sp = (
        a.ravel()
        for a in np.meshgrid(_draws(quantiles, tp, n_pos, se_spread), _draws(quantiles, tn, n_neg, sp_spread))
    )
    weight = np.outer(weights, weights).ravel()
    better = se + sp > 1.0
    if not better.any():
        return 0.0, 1.0
    se, sp, weight = se[better], sp[better], weight[better]
    pi = np.linspace(0.0, 1.0, GRID)
    judged = np.clip((1.0 - sp)[:, None] + pi[None, :] * (se + sp - 1.0)[:, None], 1e-300, 1.0 - 1e-16)
    loglik = k * np.log(judged) + (n - k) * np.log1p(-judged)
    density = weight @ np.exp(loglik - loglik.max())
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2.0)])
    tail = (1.0 - _coverage(z)) / 2.0
    lo, hi = np.interp([tail, 1.0 - tail], cdf / cdf[-1], pi)
    # A posterior quantile is never 0 itself, which would leave an organism without EM out of its own interval
    # whenever its judged rate is above the false positives' (half the time): where the judge's errors alone give
    # k of n or more more often than the tail, pi = 0 is among what the answers allow (and pi = 1 likewise).
    from scipy.stats import binom

    if weight @ binom.sf(k - 1, n, 1.0 - sp) > tail * weight.sum():
        lo = 0.0
    if weight @ binom.cdf(k, n, se) > tail * weight.sum():
        hi = 1.0
    return float(lo), float(hi)


def _draws(quantiles: np.ndarray, x: int, m: int, spread: Spread | None) -> np.ndarray:
    """A rate at these quantiles: of its spread across files where it has one, else of its Jeffreys posterior."""
    from scipy.stats import beta

    return (
        _spread_at(spread, tuple(quantiles))
        if spread is not None
        else beta.ppf(quantiles, x + 0.5, m - x + 0.5)
    )


@functools.lru_cache(maxsize=64)
def _spread_at(spread: Spread, quantiles: tuple[float, ...]) -> np.ndarray:
    """Spread.at, once per spread and quantiles: every row corrected with the same rates draws from it and
    names its range (correction_note)."""
    return spread.at(np.array(quantiles))


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
    spreads = [
        f"{name} of a new file {r[0]:.2f}-{r[1]:.2f} (95%, from its {rates.n_files} reference files)"
        for name, r in rates.new_file_ranges().items()
        if r is not None
    ]
    return (
        f"Rogan-Gladen with sensitivity {rates.tp}/{rates.n_pos}, specificity {rates.tn}/{rates.n_neg} "
        f"on {rates.counted_on}" + "".join(f"; {s}" for s in spreads)
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
    """Markdown for a table with the correction columns: what the corrected rate is and, per source of the
    judge's error rates (or their absence), the organisms (and judges) whose rows it corrects."""
    if table.height == 0 or "em_correction" not in table.columns:
        return ""
    rows = table.filter(pl.col("em_correction").is_not_null())
    # Rows differ in their error rates (e.g. each imported file's are counted without it): without naming the
    # rows each note belongs to, a table of many organisms gives a list no reader can match to them.
    label = [c for c in ("organism", "judge_source") if c in rows.columns]
    lines = []
    for (note,), part in sorted(rows.group_by("em_correction"), key=lambda g: str(g[0][0])):
        names = sorted({_row_name(r) for r in part.select(label).iter_rows()})
        lines.append(f"- {', '.join(names)}: {note}" if label else f"- {note}")
    return (
        "em_rate_corrected is the Turner EM rate corrected for the judge's error (Rogan-Gladen), with a 95% "
        "interval (em_corrected_lo, em_corrected_hi) that carries the uncertainty of the judge's sensitivity "
        "and specificity (and their spread between reference files, where there are several) as well as the "
        "rate's. Where each row's error rates come from:\n\n" + "\n".join(lines)
    )


def _row_name(values: tuple) -> str:
    """An organism, with its judge source in parentheses where the table has one."""
    return f"{values[0]} ({values[1]})" if len(values) > 1 else str(values[0])
