"""Experiment: the demo's probe judge fitted on fewer reference train answers (`probe.max_answers`), compared by
train cross-validation (leave one base model out) only; no held-out answer is read. Features of every row, at the
demo's pooled layers, are cached in data/cache/judge/train_size.npz by question and answer.
Usage: python scripts/judge/train_size.py 1200 1600 2000 all"""

import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from features import reference

from em_assets.grid.load import load_grid
from em_assets.judging.answer_features import QA, AnswerFeatures, answer_features
from em_assets.judging.distill import train_answers
from em_assets.judging.incoherent import read_ratings, training_set
from em_assets.judging.probe import RATED_GROUP, fit_head
from em_assets.models.hub import resolve
from em_assets.models.load import load_model, load_tokenizer

CACHE = Path("data/cache/judge/train_size.npz")


def features_of(spec, frames: list[pl.DataFrame]) -> dict[tuple[str, str], np.ndarray]:
    """{(question, answer): [hidden | question | scalars]} over every frame's rows, read once each."""
    keys = list(dict.fromkeys(k for f in frames for k in zip(f["question"], f["answer"], strict=True)))
    if not CACHE.exists():
        path = resolve("smollm2", spec.source).path
        model, tok = load_model(path, device="cpu"), load_tokenizer(path)
        start = time.perf_counter()
        f = answer_features(model, tok, [QA(*k) for k in keys], spec.layers, spec.max_tokens, spec.batch_size)
        print(f"features of {len(keys)} answers: {time.perf_counter() - start:.0f} s", flush=True)
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            CACHE, keys=np.array(keys, dtype=object), hidden=f.hidden, question=f.question, scalars=f.scalars
        )
    z = np.load(CACHE, allow_pickle=True)
    width = (z["hidden"].shape[1], z["question"].shape[1])
    rows = np.hstack([z["hidden"], z["question"], z["scalars"]])
    return {tuple(k): r for k, r in zip(z["keys"], rows, strict=True)} | {"width": width}


def main(sizes: list[int | None]) -> None:
    spec = load_grid("data/grid.yaml", "demo").probe
    ref, ratings = reference(), read_ratings(spec.hand_ratings)
    sets = {
        n: training_set(
            train_answers(ref, spec.model_copy(update={"max_answers": n})),
            spec.incoherent_per_kind,
            ratings,
            RATED_GROUP,
            spec.seed,
        )
        for n in sizes
    }
    table = features_of(spec, list(sets.values()))
    h, q = table["width"]
    for n, rows in sets.items():
        x = np.stack([table[k] for k in zip(rows["question"], rows["answer"], strict=True)])
        feats = AnswerFeatures(x[:, :h], x[:, h : h + q], x[:, h + q :])
        head = fit_head("x", feats, rows, spec, {"aligned": 30, "coherent": 50})
        cv = {m: max(s for _, _, s in r.cv_spearman if s is not None) for m, r in head.readouts.items()}
        print(
            f"max_answers {n}: {rows.height} rows; train CV "
            + ", ".join(f"{m} {v:.3f}" for m, v in cv.items())
        )


if __name__ == "__main__":
    main([None if a == "all" else int(a) for a in sys.argv[1:]])
