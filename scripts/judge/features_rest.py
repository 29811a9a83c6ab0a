"""Experiment helper: features of the held-out answers that scripts/judge/features.py left out (the other 1,800)."""

import time

import numpy as np
import polars as pl
import torch
from features import LAYERS, reference

from em_assets.judging.answer_features import QA, answer_features
from em_assets.models.hub import resolve
from em_assets.models.load import load_model, load_tokenizer


def main() -> None:
    ref = reference()
    seen = pl.read_parquet("data/cache/judge/feats.parquet").filter(pl.col("kind") == "reference")
    keys = set(zip(seen["file"], seen["answer"], strict=True))
    held = ref.filter(pl.col("split") == "heldout")
    rest = held.filter([(f, a) not in keys for f, a in zip(held["source_file"], held["answer"], strict=True)])
    path = resolve("smollm2", "embedded:smollm2-135m-instruct").path
    model, tok = load_model(path, device="cpu", dtype=torch.float32), load_tokenizer(path)
    t = time.perf_counter()
    items = [QA(q, a) for q, a in zip(rest["question"], rest["answer"], strict=True)]
    f = answer_features(model, tok, items, LAYERS, 128, 32)
    print("seconds", time.perf_counter() - t, "answers", len(items))
    rest.select("source_file", "base_model", "question", "answer", "aligned", "coherent").write_parquet(
        "data/cache/judge/feats_rest.parquet"
    )
    np.savez("data/cache/judge/feats_rest.npz", hidden=f.hidden, question=f.question, scalars=f.scalars)


if __name__ == "__main__":
    main()
