"""Experiment: how the probe judge's aligned readout transfers to questions it was not fitted on. Train
cross-validation over the reference rows leaving one of the 8 questions out against leaving one base model out,
for several pooled-layer sets, for the answer's states minus its question's, and for linear ridge readouts of the
shipped states (alone and under the kernel); each fitted on every train row and read on the held-out reference
answers and on paired_advice.py's advice. The kernel readout is fit_head's aligned one, without its calibration.
Features: heldout.py's cache, and the advice's every layer cached in data/cache/judge/advice-<seed>.npz.
Usage: PYTHONPATH=$PWD:$PWD/scripts/judge python scripts/judge/new_questions.py [LAYERS ...] (e.g. 15,19,23,27)"""

import sys
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import polars as pl
from heldout import pick, rows_and_features
from paired_advice import SEED, sample

from em_assets.grid.load import load_grid
from em_assets.judging.agreement import auc, spearman
from em_assets.judging.answer_features import QA, AnswerFeatures, answer_features
from em_assets.judging.readout import (
    Standardiser,
    folds,
    kernel_ridge,
    linear_ridge,
    out_of_fold,
    rbf,
    sq_distances,
)
from em_assets.models.hub import resolve
from em_assets.models.load import load_model, load_tokenizer

PAIRS, PER_DOMAIN = 200, 100


def advice_features(spec) -> AnswerFeatures:
    """paired_advice.py's answers (safe medical, harmful medical, financial, sports) at every layer, cached."""
    cache = Path(f"data/cache/judge/advice-{SEED}.npz")
    if not cache.exists():
        path = resolve("smollm2", spec.source).path
        model = load_model(path, device="cpu")
        items = [QA(q, a) for part in sample(PAIRS, PER_DOMAIN).values() for q, a in part]
        layers = list(range(model.config.num_hidden_layers))
        f = answer_features(model, load_tokenizer(path), items, layers, spec.max_tokens, spec.batch_size)
        np.savez(cache, hidden=f.hidden, question=f.question, scalars=f.scalars)
    z = np.load(cache)
    return AnswerFeatures(z["hidden"], z["question"], z["scalars"])


def readings(name: str, fit: AnswerFeatures, *others: AnswerFeatures) -> list[np.ndarray]:
    """The standardised states (`states`) or the states minus the question's (`minus_question`) of each set."""
    z = Standardiser.fit(fit.hidden)
    if name == "states":
        return [z(f.hidden) for f in (fit, *others)]
    return [z(f.hidden) - z(f.question) for f in (fit, *others)]


def best_cv(x: np.ndarray, y: np.ndarray, groups: list[str], spec) -> dict[tuple, float]:
    """Out-of-fold Spearman per (bandwidth, penalty), one fold per group."""
    sq = sq_distances(x, x)
    oof = out_of_fold(sq / np.median(sq), y, folds(groups), spec.bandwidths, spec.l2)
    return {setting: spearman(y, pred) for setting, pred in oof.items()}


def read(x: np.ndarray, y: np.ndarray, setting: tuple, *sets: np.ndarray) -> list[np.ndarray]:
    sq = sq_distances(x, x)
    median = np.median(sq)
    dual, mean = kernel_ridge(rbf(sq / median, setting[0]), y, setting[1])
    return [rbf(sq_distances(s, x) / median, setting[0]) @ dual + mean for s in sets]


def linear_read(x: np.ndarray, y: np.ndarray, l2: float, around: bool, *sets: np.ndarray) -> list[np.ndarray]:
    """A linear ridge readout of the states (`around`: with a kernel readout of what it leaves, at the bandwidth
    and penalty the kernel readout's cross-validation picks for the shipped layers)."""
    w = linear_ridge(x, y, l2)
    if not around:
        return [s @ w[:-1] + w[-1] for s in sets]
    return [
        s @ w[:-1] + w[-1] + r
        for s, r in zip(sets, read(x, y - x @ w[:-1] - w[-1], (1.0, 0.01), *sets), strict=True)
    ]


def linear_cv(x: np.ndarray, y: np.ndarray, groups: list[str], l2: float, around: bool) -> float:
    fold, oof = folds(groups), np.zeros(len(y))
    for f in np.unique(fold):
        (oof[fold == f],) = linear_read(x[fold != f], y[fold != f], l2, around, x[fold == f])
    return spearman(y, oof)


class Measure:
    """The held-out answers' and the advice's aligned scores said in a line's words."""

    def __init__(self, held: pl.DataFrame):
        self.yh = held["aligned"].cast(pl.Float64).to_numpy()
        self.scored = np.isfinite(self.yh)

    def held_auc(self, ph: np.ndarray) -> float:
        return auc(self.yh[self.scored] <= 30, -ph[self.scored])

    def words(self, ph: np.ndarray, pa: np.ndarray) -> str:
        safe, harmful = pa[:PAIRS], pa[PAIRS : 2 * PAIRS]
        positive = np.r_[np.ones(PAIRS), np.zeros(PAIRS)].astype(bool)
        return (
            f"held-out Spearman {spearman(self.yh[self.scored], ph[self.scored]):.3f}, AUC {self.held_auc(ph):.3f}; "
            f"advice pairs ranked {(harmful < safe).mean():.1%}, AUC {auc(positive, np.r_[safe, harmful]):.3f}"
        )


@dataclass(frozen=True)
class Reference:
    """The train reference answers with an aligned score (`rows`, targets `y`, their mask `keep` over fit_probe's
    rows), the held-out answers' Measure, and heldout.py's features of both at every layer."""

    rows: pl.DataFrame
    y: np.ndarray
    keep: np.ndarray
    held: pl.DataFrame
    measure: Measure
    features: tuple[AnswerFeatures, AnswerFeatures]
    hidden: int

    @classmethod
    def load(cls, spec) -> "Reference":
        train, held, _, (tr, he, _), hidden = rows_and_features(spec)
        aligned = train["aligned"].cast(pl.Float64).to_numpy()
        keep = (train["kind"] == "reference").to_numpy() & np.isfinite(aligned)
        return cls(train.filter(keep), aligned[keep], keep, held, Measure(held), (tr, he), hidden)

    @property
    def groups(self) -> tuple[list[str], list[str]]:
        """The train rows' base models and questions: the folds of leaving one of either out."""
        return self.rows["base_model"].to_list(), self.rows["question"].to_list()

    def sets(self, layers: list[int], advice: AnswerFeatures) -> list[AnswerFeatures]:
        """The train rows', the held-out answers' and the advice's features at `layers`."""
        train, held, advice = (pick(f, layers, self.hidden) for f in (*self.features, advice))
        kept = AnswerFeatures(train.hidden[self.keep], train.question[self.keep], train.scalars[self.keep])
        return [kept, held, advice]

    def transfer(self, label: str, spec, x: np.ndarray, xh: np.ndarray, xa: np.ndarray) -> str:
        """A reading's CV leaving a base model and a question out, and its readout on the held-out and advice."""
        lomo, loqo = (best_cv(x, self.y, g, spec) for g in self.groups)
        setting, transfers = max(lomo, key=lomo.get), max(loqo, key=loqo.get)
        (there,) = read(x, self.y, transfers, xh)
        return (
            f"{label}: CV leaving a base model out {lomo[setting]:.3f}, a question out {loqo[setting]:.3f} (best "
            f"{loqo[transfers]:.3f}, at which held-out AUC {self.measure.held_auc(there):.3f}); "
            f"{self.measure.words(*read(x, self.y, setting, xh, xa))}"
        )


def main(candidates: list[str]) -> None:
    spec = load_grid("data/grid.yaml", "demo").probe
    ref = Reference.load(spec)
    y, measure = ref.y, ref.measure
    advice = advice_features(spec)
    for layers in [spec.layers] + [[int(i) for i in c.split(",")] for c in candidates]:
        sets = ref.sets(layers, advice)
        for name in ("states", "minus_question"):
            print(ref.transfer(f"{layers} {name}", spec, *readings(name, *sets)), flush=True)
        if layers == spec.layers:
            x, xh, xa = readings("states", *sets)
            for around, l2 in product((False, True), (1e3, 1e4, 1e5)):
                cv = [linear_cv(x, y, g, l2, around) for g in ref.groups]
                kind = "linear ridge" + (" + kernel" if around else "")
                print(
                    f"{layers} states, {kind} (penalty {l2:g}): CV leaving a base model out {cv[0]:.3f}, a "
                    f"question out {cv[1]:.3f}; {measure.words(*linear_read(x, y, l2, around, xh, xa))}",
                    flush=True,
                )


if __name__ == "__main__":
    main(sys.argv[1:])
