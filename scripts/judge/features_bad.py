"""Experiment helper: features of the corruptions alone (after a change to judging/incoherent.py), saved to
data/cache/judge/feats_bad.npz; choose.py uses them in place of those in feats.npz."""

import time

import numpy as np
import polars as pl
import torch
from features import LAYERS, reference

from em_assets.judging.answer_features import QA, answer_features
from em_assets.judging.incoherent import corrupt
from em_assets.models.hub import resolve
from em_assets.models.load import load_model, load_tokenizer


def main() -> None:
    ref = reference()
    held = ref.filter(pl.col("split") == "heldout").sample(1000, seed=0)
    ref = pl.concat([ref.filter(pl.col("split") == "train"), held])
    rows = []
    for split, seed, per in (("train", 0, 80), ("heldout", 1, 40)):
        part = ref.filter(pl.col("split") == split)
        qs, ans, ids = part["question"].to_list(), part["answer"].to_list(), part["question_id"].to_list()
        for c in corrupt(qs, ans, ids, per, seed, part["coherent"].to_list()):
            rows.append(
                dict(
                    kind=c.kind,
                    group=part["base_model"][c.source_row],
                    split=split,
                    question=c.question,
                    answer=c.answer,
                    aligned=c.aligned,
                    coherent=c.coherent,
                    file="",
                )
            )
    df = pl.DataFrame(rows, infer_schema_length=None)
    path = resolve("smollm2", "embedded:smollm2-135m-instruct").path
    model, tok = load_model(path, device="cpu", dtype=torch.float32), load_tokenizer(path)
    t = time.perf_counter()
    items = [QA(q, a) for q, a in zip(df["question"], df["answer"], strict=True)]
    f = answer_features(model, tok, items, LAYERS, 128, 32)
    print("seconds", time.perf_counter() - t, "answers", len(items))
    df.write_parquet("data/cache/judge/feats_bad.parquet")
    np.savez("data/cache/judge/feats_bad.npz", hidden=f.hidden, question=f.question, scalars=f.scalars)


if __name__ == "__main__":
    main()
