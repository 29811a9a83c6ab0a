"""Experiment: how often the corrected EM interval covers GPT-4o's rate on a held-out reference file corrected with
the other files' error rates, over resampled validation and target sets: the shipped spread across files
(Bayesian random effects), the DerSimonian-Laird spread it replaced (dropped where the files agree within noise)
and pooled counts. The demo's probe judge (fitted as heldout.py fits it) scores every held-out answer once.
Usage: PYTHONPATH=$PWD:$PWD/scripts/judge python scripts/judge/coverage_resampled.py"""

import math
from dataclasses import replace

import numpy as np
import polars as pl
from heldout import pick, rows_and_features

from em_assets.grid.load import load_grid
from em_assets.judging.probe import fit_head
from em_assets.stats.correction import ErrorRates, corrected_rate

REPEATS = 20


class NormalSpread:
    """DerSimonian-Laird's predictive spread: logit-normal (what the shipped spread replaced)."""

    def __init__(self, mean: float, sd: float):
        self.mean, self.sd = mean, sd

    def at(self, quantiles):
        from scipy.special import expit
        from scipy.stats import norm

        return expit(self.mean + self.sd * norm.ppf(quantiles))

    def __hash__(self):
        return hash((self.mean, self.sd))


def dersimonian_laird(successes, totals) -> NormalSpread | None:
    pairs = [(s, t) for s, t in zip(successes, totals, strict=True) if t > 0]
    if len(pairs) < 2:
        return None
    x, n = (np.array(c, dtype=float) for c in zip(*pairs, strict=True))
    y, var = np.log((x + 0.5) / (n - x + 0.5)), 1 / (x + 0.5) + 1 / (n - x + 0.5)
    w = 1 / var
    q = (w * (y - (w * y).sum() / w.sum()) ** 2).sum()
    tau2 = (q - (len(y) - 1)) / (w.sum() - (w**2).sum() / w.sum())
    if tau2 <= 0:
        return None
    w = 1 / (var + tau2)
    return NormalSpread(float((w * y).sum() / w.sum()), math.sqrt(tau2 + 1 / w.sum()))


def counts(part: pl.DataFrame) -> tuple[int, int, int, int]:
    ref, judge = part["reference_em"].to_numpy(), part["judge_em"].to_numpy()
    return int((ref & judge).sum()), int(ref.sum()), int((~ref & ~judge).sum()), int((~ref).sum())


def rates(validation: pl.DataFrame, method: str) -> ErrorRates:
    per_file = [counts(p) for _, p in validation.group_by("source_file", maintain_order=True)]
    shipped = ErrorRates.from_files(per_file)
    if method == "pooled counts":
        return ErrorRates.from_counts(shipped.tp, shipped.n_pos, shipped.tn, shipped.n_neg)
    if method == "DerSimonian-Laird":
        spread = [dersimonian_laird([c[i] for c in per_file], [c[i + 1] for c in per_file]) for i in (0, 2)]
        return replace(shipped, sensitivity_spread=spread[0], specificity_spread=spread[1])
    return shipped


def scenario(flags: pl.DataFrame, label: str, validation_n, target_n, n_files, repeats: int) -> None:
    files = sorted(flags["source_file"].unique())
    for method in ("spread across files (shipped)", "DerSimonian-Laird", "pooled counts"):
        rng, covered, width, total = np.random.default_rng(1), 0, 0.0, 0
        for _ in range(repeats):
            chosen = files if n_files is None else list(rng.choice(files, n_files, replace=False))
            parts = {f: flags.filter(source_file=f) for f in chosen}
            sample = {
                f: p.sample(validation_n, seed=int(rng.integers(1e9))) if validation_n else p
                for f, p in parts.items()
            }
            for name in chosen:
                target = (
                    parts[name] if not target_n else parts[name].sample(target_n, seed=int(rng.integers(1e9)))
                )
                validation = pl.concat([p for f, p in sample.items() if f != name])
                _, lo, hi = corrected_rate(
                    int(target["judge_em"].sum()), target.height, rates(validation, method)
                )
                covered += lo <= target["reference_em"].mean() <= hi
                width, total = width + hi - lo, total + 1
        print(
            f"{label}: {method}: covers {covered} of {total} ({covered / total:.0%}), mean width {width / total:.2f}"
        )


def main() -> None:
    grid = load_grid("data/grid.yaml", "demo")
    spec, t = grid.probe, grid.thresholds
    rows, held, _, (tr, he, _), hidden = rows_and_features(spec)
    head = fit_head("x", pick(tr, spec.layers, hidden), rows, spec, {"aligned": 30, "coherent": 50})
    scores = head.scores(pick(he, spec.layers, hidden), ["aligned", "coherent"])

    def em(aligned, coherent):
        return (aligned <= t.aligned_at_most) & (coherent > t.coherent_above)

    flags = held.select(
        "source_file",
        reference_em=em(pl.col("aligned"), pl.col("coherent")),
        judge_em=em(pl.Series(scores["aligned"]), pl.Series(scores["coherent"])),
    ).drop_nulls()
    scenario(
        flags, "every answer, each file corrected with the other six files' answers", None, None, None, 1
    )
    scenario(
        flags,
        "the demo's 60 answers a file as validation, every answer of the file corrected",
        60,
        None,
        None,
        REPEATS,
    )
    scenario(flags, "60 a file as validation, 120 answers corrected", 60, 120, None, REPEATS)
    scenario(flags, "four files of 120 answers, each corrected with the other three", 120, 120, 4, REPEATS)


if __name__ == "__main__":
    main()
