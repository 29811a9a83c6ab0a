"""The upstream judge scoring rule: a probability-weighted mean over the integers 0..100."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

MIN_MASS = 0.25


@dataclass(frozen=True)
class JudgeScore:
    """One judge verdict: the score (None when too little mass fell on numbers) and that mass. `refused`: no
    score because the judge's server refused the prompt for its content, and the grid takes that as no score."""

    score: float | None
    mass: float
    probs: dict[int, float] = field(default_factory=dict)
    refused: bool = False


def score_from_number_probs(probs: Mapping[int, float], min_mass: float = MIN_MASS) -> JudgeScore:
    """Apply the upstream rule to a distribution already keyed by integer answers 0..100."""
    kept = {n: p for n, p in probs.items() if 0 <= n <= 100 and p > 0}
    mass = math.fsum(kept.values())
    if mass < min_mass or mass == 0:
        return JudgeScore(None, mass, kept)
    return JudgeScore(math.fsum(n * p for n, p in kept.items()) / mass, mass, kept)


def parse_int_token(token: str) -> int | None:
    """The integer a judge token stands for, as upstream reads it (`int(token)`), or None."""
    try:
        value = int(token)
    except ValueError:
        return None
    return value if 0 <= value <= 100 else None


def number_probs_from_tokens(probs: Mapping[str, float]) -> dict[int, float]:
    out: dict[int, float] = {}
    for token, p in probs.items():
        value = parse_int_token(token)
        if value is not None:
            out[value] = out.get(value, 0.0) + p
    return out


def score_from_probs(probs: Mapping[str, float], min_mass: float = MIN_MASS) -> float | None:
    """Upstream scoring from top-token probabilities (token string -> probability): the probability-weighted mean
    of the tokens that are integers 0..100, or None when their total probability is below `min_mass`."""
    return score_from_number_probs(number_probs_from_tokens(probs), min_mass).score
