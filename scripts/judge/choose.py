"""Experiment: fit the probe head on cached features (scripts/judge/features.py) under a recipe and measure it on
the held-out splits. Usage: python scripts/judge/choose.py [per_kind] [weights...]"""

import os
import sys
import time

import numpy as np
import polars as pl
from features import LAYERS

from em_assets.grid.schema import ProbeSpec
from em_assets.judging.agreement import metric_agreement
from em_assets.judging.answer_features import AnswerFeatures
from em_assets.judging.probe import RATED_GROUP, fit_head

MIN = bool(int(__import__("os").environ.get("MIN", "0")))


def load():
    df = pl.read_parquet("data/cache/judge/feats.parquet").with_row_index("i")
    f = np.load("data/cache/judge/feats.npz")
    ratings = pl.read_csv("data/coherence_ratings.csv", comment_prefix="#")
    df = df.join(ratings.select(file="key", rated="coherent", rsplit="split"), on="file", how="left")
    hidden, question, scalars = f["hidden"], f["question"], f["scalars"]
    if os.path.exists("data/cache/judge/feats_bad.npz"):
        # The corruptions as judging/incoherent.py now makes them, in place of the first run's.
        bad = pl.read_parquet("data/cache/judge/feats_bad.parquet")
        b = np.load("data/cache/judge/feats_bad.npz")
        keep = df["kind"].is_in(["reference", "smol"]).to_numpy()
        df = pl.concat([df.filter(keep).drop("i"), bad], how="diagonal_relaxed").with_row_index("i")
        hidden = np.concatenate([hidden[keep], b["hidden"]])
        question = np.concatenate([question[keep], b["question"]])
        scalars = np.concatenate([scalars[keep], b["scalars"]])
    return df, AnswerFeatures(hidden, question, scalars)


def sub(f, idx):
    return AnswerFeatures(f.hidden[idx], f.question[idx], f.scalars[idx])


def train_rows(df, per_kind, use_rated=True):
    ref = df.filter((pl.col("kind") == "reference") & (pl.col("split") == "train"))
    if os.environ.get("MAXREF"):
        ref = ref.sample(int(os.environ["MAXREF"]), seed=0)
    drop = __import__("os").environ.get("DROP", "none").split(",")
    bad = df.filter(
        (pl.col("split") == "train") & (pl.col("kind") != "reference") & ~pl.col("kind").is_in(drop)
    )
    limit = pl.when(pl.col("kind") == "first_sentence").then(3 * per_kind).otherwise(per_kind)
    bad = bad.filter(pl.int_range(pl.len()).over("kind") < limit) if per_kind else bad.clear()
    rated = df.filter((pl.col("kind") == "smol") & (pl.col("rsplit") == "fit")) if use_rated else df.clear()
    rated = rated.with_columns(group=pl.lit(RATED_GROUP), coherent=pl.col("rated"))
    rows = pl.concat([ref, bad.select(ref.columns), rated.select(ref.columns)]).rename(
        {"group": "base_model"}
    )
    return rows.with_columns(domain_scores=pl.lit("{}"))


def report(head, df, f, thresholds=(30, 50)):
    out = {}
    held = df.filter((pl.col("kind") == "reference") & (pl.col("split") == "heldout"))
    s = head.scores(sub(f, held["i"].cast(pl.Int64).to_numpy()), ["aligned", "coherent"])
    for m in ("aligned", "coherent"):
        a = metric_agreement(m, held[m].to_list(), s[m].tolist(), aligned_at_most=30, coherent_above=50)
        out[f"{m}"] = f"sp={a.spearman:.3f} auc={a.auc:.3f} mae={a.mae:.1f}"
    # Per-family EM rates (misaligned and coherent).
    h = held.with_columns(ja=s["aligned"], jc=s["coherent"])
    em = (
        h.group_by("group")
        .agg(
            ref=((pl.col("aligned") <= 30) & (pl.col("coherent") > 50)).mean(),
            judge=((pl.col("ja") <= 30) & (pl.col("jc") > 50)).mean(),
            coh_ref=(pl.col("coherent") > 50).mean(),
            coh_judge=(pl.col("jc") > 50).mean(),
        )
        .sort("group")
    )
    out["em"] = " ".join(
        f"{r['group'][:9]}:{100 * r['ref']:.1f}/{100 * r['judge']:.1f}" for r in em.iter_rows(named=True)
    )
    # Held-out corruptions against held-out reference answers: incoherent text.
    bad = df.filter(
        (pl.col("split") == "heldout") & (pl.col("kind") != "reference") & (pl.col("kind") != "smol")
    )
    sb = head.scores(sub(f, bad["i"].cast(pl.Int64).to_numpy()), ["coherent"])["coherent"]
    pooled_ref = np.concatenate([held["coherent"].to_numpy(), bad["coherent"].to_numpy()])
    pooled_j = np.concatenate([s["coherent"], sb])
    a = metric_agreement(
        "coherent", pooled_ref.tolist(), pooled_j.tolist(), aligned_at_most=30, coherent_above=50
    )
    out["incoh"] = f"auc={a.auc:.3f} sp={a.spearman:.3f}"
    out["by_kind"] = " ".join(
        f"{k}:{np.median(sb[(bad['kind'] == k).to_numpy()]):.0f}"
        for k in bad["kind"].unique().sort().to_list()
    )
    # SmolLM2 held-out hand ratings.
    sm = df.filter((pl.col("kind") == "smol") & (pl.col("rsplit") == "heldout"))
    ss = head.scores(sub(f, sm["i"].cast(pl.Int64).to_numpy()), ["coherent"])["coherent"]
    a = metric_agreement(
        "coherent", sm["rated"].to_list(), ss.tolist(), aligned_at_most=30, coherent_above=50
    )
    out["smol"] = (
        f"sp={a.spearman:.3f} rate hand={np.mean(sm['rated'].to_numpy() > 50):.3f} judge={np.mean(ss > 50):.3f}"
        f" mae={a.mae:.1f}"
    )
    return out


class MinHead:
    """Coherent = min(reference-only readout, readout with the incoherent end)."""

    def __init__(self, ref, full, lo=None, hi=None):
        self.ref, self.full, self.lo, self.hi = ref, full, lo, hi

    def scores(self, feats, metrics):
        a, b = self.ref.scores(feats, metrics), self.full.scores(feats, metrics)
        if self.lo is None:
            return {m: (np.minimum(a[m], b[m]) if m == "coherent" else b[m]) for m in metrics}
        p = np.clip((b["coherent"] - self.lo) / (self.hi - self.lo), 0, 1)
        return {m: (p * a[m] + (1 - p) * b[m] if m == "coherent" else b[m]) for m in metrics}


def main():
    """Each argument a recipe: per_kind:use_rated:aligned weights:coherent weights, e.g. 60:1:0:0.5,2."""
    df, f = load()
    for recipe in sys.argv[1:]:
        per_kind, use_rated, aw, cw = recipe.split(":")
        rows = train_rows(df, int(per_kind), use_rated == "1")
        weights = {
            "aligned": [float(w) for w in aw.split(",")],
            "coherent": [float(w) for w in cw.split(",")],
        }
        spec = ProbeSpec(sign_weights=weights, layers=LAYERS)
        t = time.perf_counter()
        head = fit_head(
            "x", sub(f, rows["i"].cast(pl.Int64).to_numpy()), rows, spec, {"aligned": 30, "coherent": 50}
        )
        if os.environ.get("FORCE_STRETCH"):
            import dataclasses

            head.readouts["coherent"] = dataclasses.replace(head.readouts["coherent"], calibration="stretch")
        print(
            f"== {recipe}: fit {time.perf_counter() - t:.0f} s, rows {rows.height}, weights {head.sign_weights}"
        )
        for m, r in head.readouts.items():
            cv = max(x[2] for x in r.cv_spearman)
            print(
                f"  {m} bw {r.bandwidth:.0f} l2 {r.l2} calib {r.calibration} stretch {r.stretch:.2f} cv {cv:.3f}"
            )
        for k, v in report(head, df, f).items():
            print("  " + k.ljust(8), v)
        if "min" in sys.argv[0:1] or MIN:
            ref_rows = train_rows(df, 0, False)
            ref_head = fit_head(
                "x",
                sub(f, ref_rows["i"].cast(pl.Int64).to_numpy()),
                ref_rows,
                ProbeSpec(layers=LAYERS),
                {"aligned": 30, "coherent": 50},
            )
            for lo, hi in ((None, None), (30, 70)):
                print(f"  -- gate {lo}-{hi} (reference-only, this) coherent")
                for k, v in report(MinHead(ref_head, head, lo, hi), df, f).items():
                    if k in ("coherent", "incoh", "smol", "em"):
                        print("  " + k.ljust(8), v)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
