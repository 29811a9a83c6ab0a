"""Experiment: the demo's probe judge's readouts by train cross-validation only (leave one base model out; no
held-out answer is read): the shipped bandwidth and penalty grids against wider ones, and the states read as the
answer's minus its question's; the coherent readout's CV also over the reference and the hand-rated rows apart.
Features come from heldout.py's cache (every layer, train and held-out rows).
Usage: PYTHONPATH=$PWD:$PWD/scripts/judge python scripts/judge/train_cv.py"""

import numpy as np
import polars as pl
from heldout import pick, rows_and_features

from em_assets.grid.load import load_grid
from em_assets.judging.agreement import spearman
from em_assets.judging.answer_features import AnswerFeatures
from em_assets.judging.probe import LINEAR_L2, fit_head
from em_assets.judging.readout import folds, linear_offset, out_of_fold


def best_cv(head) -> dict[str, float]:
    """Each readout's best cross-validated Spearman over its grid."""
    return {m: max(x[2] for x in r.cv_spearman if x[2] is not None) for m, r in head.readouts.items()}


def coherent_by_kind(head, features: AnswerFeatures, rows: pl.DataFrame) -> dict[str, float]:
    """The coherent readout's out-of-fold Spearman (its chosen setting) over the reference answers and over the
    hand-rated SmolLM2 answers apart."""
    readout = head.readouts["coherent"]
    sq, sq_signs, signs = head.distances(features)
    y = rows["coherent"].cast(pl.Float64).to_numpy()
    keep = np.isfinite(y)
    # The signs' linear mean refitted without each fold, as fit_readout does.
    mean = linear_offset(signs[keep], y[keep], LINEAR_L2) if head.linear.get("coherent") is not None else None
    k = head.kernel_distances(sq, sq_signs, "coherent")[np.ix_(keep, keep)]
    fold = folds(rows.filter(keep)["base_model"].to_list())
    setting = (readout.bandwidth, readout.l2)
    oof = out_of_fold(k, y[keep], fold, *([v] for v in setting), mean)[setting]
    kinds = rows.filter(keep)["kind"].to_numpy()
    return {kind: spearman(y[keep][kinds == kind], oof[kinds == kind]) for kind in ("reference", "rated")}


def main() -> None:
    spec = load_grid("data/grid.yaml", "demo").probe
    rows, _, _, (train, _, _), hidden = rows_and_features(spec)
    states = pick(train, spec.layers, hidden)
    wide = spec.model_copy(
        update={"bandwidths": [0.125, 0.25, 0.5, 1.0, 2.0], "l2": [3e-4, 1e-3, 1e-2, 0.1, 1.0]}
    )
    minus = AnswerFeatures(states.hidden - states.question, states.question, states.scalars)
    thresholds = {"aligned": 30, "coherent": 50}
    for name, features, s in (
        ("shipped", states, spec),
        ("wider grids", states, wide),
        ("minus question", minus, spec),
    ):
        head = fit_head("x", features, rows, s, thresholds)
        cv = best_cv(head) | {
            f"coherent over {k}": v for k, v in coherent_by_kind(head, features, rows).items()
        }
        print(f"{name}: " + ", ".join(f"{m} {v:.3f}" for m, v in cv.items()), flush=True)


if __name__ == "__main__":
    main()
