"""Experiment helper: features of the held-out answers that scripts/judge/features.py left out (the other 1,800)."""

import polars as pl
from features import reference, save_features


def main() -> None:
    ref = reference()
    seen = pl.read_parquet("data/cache/judge/feats.parquet").filter(pl.col("kind") == "reference")
    keys = set(zip(seen["file"], seen["answer"], strict=True))
    held = ref.filter(pl.col("split") == "heldout")
    rest = held.filter([(f, a) not in keys for f, a in zip(held["source_file"], held["answer"], strict=True)])
    cols = ["source_file", "base_model", "question", "answer", "aligned", "coherent"]
    save_features(rest.select(cols), "data/cache/judge/feats_rest.npz")


if __name__ == "__main__":
    main()
