"""Experiment helper: features of the corruptions alone (after a change to judging/incoherent.py), saved to
data/cache/judge/feats_bad.npz; choose.py uses them in place of those in feats.npz."""

import polars as pl
from features import compared_answers, save_features

from em_assets.judging.incoherent import corrupt


def main() -> None:
    ref = compared_answers()
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
    save_features(df, "data/cache/judge/feats_bad.npz")


if __name__ == "__main__":
    main()
