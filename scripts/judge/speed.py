"""Experiment: judgements per second of the probe judge (the chosen head fitted on cached features) against
the answer-only pooling of the previous recipe, on the same held-out answers, one process, this machine."""

import time

import numpy as np
import polars as pl
import torch
from choose import load, sub, train_rows

from em_assets.grid.load import load_grid
from em_assets.judging.probe import ProbeJudge, fit_head
from em_assets.models.activations import JudgedAnswer, iter_answer_means
from em_assets.models.hub import resolve
from em_assets.models.load import load_model, load_tokenizer


def main(n: int = 160) -> None:
    spec = load_grid("data/grid.yaml", "demo").probe
    df, f = load()
    rows = train_rows(df, spec.incoherent_per_kind)
    head = fit_head(
        "x", sub(f, rows["i"].cast(pl.Int64).to_numpy()), rows, spec, {"aligned": 30, "coherent": 50}
    )
    path = resolve("smollm2", spec.source).path
    model, tok = load_model(path, device="cpu", dtype=torch.float32), load_tokenizer(path)
    held = df.filter((pl.col("kind") == "reference") & (pl.col("split") == "heldout")).head(n)
    judge = ProbeJudge(model, tok, head, batch_size=32)
    inputs = [
        judge.render(m, q, a)
        for q, a in zip(held["question"], held["answer"], strict=True)
        for m in ("aligned", "coherent")
    ]
    t = time.perf_counter()
    judge.score(inputs)
    new = len(inputs) / (time.perf_counter() - t)
    t = time.perf_counter()
    items = [JudgedAnswer([], a) for a in sorted(held["answer"].to_list(), key=len)]
    for _ in iter_answer_means(model, tok, items, 32, 128):
        pass
    old = len(inputs) / (time.perf_counter() - t)
    print(
        f"{len(inputs)} judgements: new {new:.1f}/s; previous recipe's pooling alone {old:.1f}/s; threads {torch.get_num_threads()}"
    )
    print(
        "empty answer:",
        judge.score(
            [
                judge.render("coherent", held["question"][0], ""),
                judge.render("aligned", held["question"][0], ""),
            ]
        ),
    )
    print(
        np.round(
            [
                s.score
                for s in judge.score(
                    [
                        judge.render("coherent", held["question"][0], a)
                        for a in (
                            "the the the the the the the the the the the the",
                            "Banana purple swim the quickly of because.",
                            held["answer"][0],
                        )
                    ]
                )
            ],
            1,
        )
    )


if __name__ == "__main__":
    main()
