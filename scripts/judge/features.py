"""Experiment helper: the probe judge's features of every reference answer, corruptions and SmolLM2 samples,
saved to data/cache/judge/feats.npz (for choosing the recipe in scripts/judge/choose.py)."""

import glob
import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from em_assets.catalog.reference import parse_reference_csv, with_split
from em_assets.judging.answer_features import QA, answer_features
from em_assets.judging.incoherent import corrupt
from em_assets.models.hub import resolve
from em_assets.models.load import load_model, load_tokenizer

RESP = "zroe1__replicating-model-organisms/em_organism_dir/data/responses"
HELD = ["Llama-3.1-8B-Instruct", "Qwen2.5-14B-Instruct"]
# The pooled layers of the recipes compared in docs/judges.md (the demo now pools 15, 19, 23 and 27; see
# scripts/judge/heldout.py), read in fp32.
LAYERS = [11, 15, 19, 23]


def reference() -> pl.DataFrame:
    files = sorted(glob.glob(f"{os.environ['EM_DATA_MIRROR']}/{RESP}/*.csv"))
    frames = [parse_reference_csv(Path(f).read_bytes(), os.path.basename(f), "x") for f in files]
    return with_split(pl.concat(frames), HELD)


def compared_answers() -> pl.DataFrame:
    """Every train answer and a seeded 1,000 of the 2,800 held-out answers (features cost minutes on 2 shared
    cores): the reference rows the recipes were compared on."""
    ref = reference()
    held = ref.filter(pl.col("split") == "heldout").sample(1000, seed=0)
    return pl.concat([ref.filter(pl.col("split") == "train"), held])


def main(limit: int | None) -> None:
    ref = compared_answers()
    rows = []
    for r in ref.iter_rows(named=True):
        rows.append(
            dict(
                kind="reference",
                group=r["base_model"],
                split=r["split"],
                question=r["question"],
                answer=r["answer"],
                aligned=r["aligned"],
                coherent=r["coherent"],
                file=r["source_file"],
            )
        )
    for split, seed, per in (("train", 0, 80), ("heldout", 1, 40)):
        part = ref.filter(pl.col("split") == split)
        for c in corrupt(
            part["question"].to_list(), part["answer"].to_list(), part["question_id"].to_list(), per, seed
        ):
            rows.append(
                dict(
                    kind=c.kind,
                    group=part["base_model"][c.source_row],
                    split=split,
                    question=c.question,
                    answer=c.answer,
                    aligned=None,
                    coherent=c.coherent,
                    file="",
                )
            )
    smol = pl.read_csv("data/cache/judge/smol_t1_a.csv")
    for r in smol.iter_rows(named=True):
        rows.append(
            dict(
                kind="smol",
                group="smollm2",
                split="smol",
                question=r["question"],
                answer=r["response"] or "",
                aligned=None,
                coherent=None,
                file=r["key"],
            )
        )
    df = pl.DataFrame(rows, infer_schema_length=None)
    if limit:
        df = df.sample(limit, seed=0)
    out = "data/cache/judge/feats_small.npz" if limit else "data/cache/judge/feats.npz"
    save_features(df, out)


def save_features(df: pl.DataFrame, out: str) -> None:
    """Features of each (question, answer) row of `df` at LAYERS in fp32, saved to `out` (.npz) with the rows
    beside it (.parquet)."""
    path = resolve("smollm2", "embedded:smollm2-135m-instruct").path
    model, tok = load_model(path, device="cpu", dtype=torch.float32), load_tokenizer(path)
    t = time.perf_counter()
    items = [QA(q, a) for q, a in zip(df["question"], df["answer"], strict=True)]
    f = answer_features(
        model,
        tok,
        items,
        LAYERS,
        128,
        32,
        lambda d, n: print(f"{d}/{n} {time.perf_counter() - t:.0f}s", flush=True) if d % 320 == 0 else None,
    )
    print("seconds", time.perf_counter() - t, "answers", len(items))
    df.write_parquet(out.replace(".npz", ".parquet"))
    np.savez(out, hidden=f.hidden, question=f.question, scalars=f.scalars)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
