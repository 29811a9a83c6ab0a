"""Experiment: data/grid.yaml's demo probe settings, on the layers the cached features hold (features.LAYERS),
fitted on cached train features and measured on every held-out answer (scripts/judge/features.py and
features_rest.py must have run)."""

import numpy as np
import polars as pl
from choose import load, report, sub, train_rows
from features import LAYERS

from em_assets.grid.load import load_grid
from em_assets.judging.agreement import metric_agreement
from em_assets.judging.answer_features import AnswerFeatures
from em_assets.judging.probe import fit_head
from em_assets.judging.readout import calibration_gaps, folds, out_of_fold


def main() -> None:
    spec = load_grid("data/grid.yaml", "demo").probe.model_copy(update={"layers": LAYERS})
    df, f = load()
    rows = train_rows(df, spec.incoherent_per_kind)
    head = fit_head(
        "x", sub(f, rows["i"].cast(pl.Int64).to_numpy()), rows, spec, {"aligned": 30, "coherent": 50}
    )
    print("weights", head.sign_weights)
    for m, r in head.readouts.items():
        print(f"  {m}: calibration {r.calibration}, cv Spearman {max(x[2] for x in r.cv_spearman):.3f}")
    for k, v in report(head, df, f).items():
        print("  subset", k.ljust(8), v)
    # Every held-out answer: the 1,000 of the cached subset and the other 1,800.
    sub_held = df.filter((pl.col("kind") == "reference") & (pl.col("split") == "heldout"))
    rest = pl.read_parquet("data/cache/judge/feats_rest.parquet")
    r = np.load("data/cache/judge/feats_rest.npz")
    rest_f = AnswerFeatures(r["hidden"], r["question"], r["scalars"])
    s1 = head.scores(sub(f, sub_held["i"].cast(pl.Int64).to_numpy()), ["aligned", "coherent"])
    s2 = head.scores(rest_f, ["aligned", "coherent"])
    held = pl.concat(
        [
            sub_held.select("file", "group", "aligned", "coherent").with_columns(
                ja=s1["aligned"], jc=s1["coherent"]
            ),
            rest.select(
                file="source_file", group="base_model", aligned="aligned", coherent="coherent"
            ).with_columns(ja=s2["aligned"], jc=s2["coherent"]),
        ]
    )
    for name, part in [("all", held), *held.group_by("group", maintain_order=True)]:
        label = name if isinstance(name, str) else name[0]
        out = []
        for m, col in (("aligned", "ja"), ("coherent", "jc")):
            a = metric_agreement(
                m, part[m].to_list(), part[col].to_list(), aligned_at_most=30, coherent_above=50
            )
            out.append(f"{m} n={a.n} sp={a.spearman:.3f} auc={a.auc:.3f} mae={a.mae:.1f}")
        print(f"held-out {label}: " + "; ".join(out))
    em = (
        held.group_by("file")
        .agg(
            n=pl.len(),
            ref=((pl.col("aligned") <= 30) & (pl.col("coherent") > 50)).mean() * 100,
            judge=((pl.col("ja") <= 30) & (pl.col("jc") > 50)).mean() * 100,
            coh_ref=(pl.col("coherent") > 50).mean() * 100,
            coh_judge=(pl.col("jc") > 50).mean() * 100,
        )
        .sort("file")
    )
    with pl.Config(tbl_rows=20, tbl_width_chars=200, float_precision=1):
        print(em.with_columns(gap=pl.col("judge") - pl.col("ref")))
    # The calibration choice on the train split: each base model's rate gap when it is left out.
    for m in ("aligned", "coherent"):
        readout = head.readouts[m]
        y = rows[m].to_numpy().astype(float)
        keep = np.isfinite(y)
        sq, sq_signs, _ = head.distances(sub(f, rows["i"].cast(pl.Int64).to_numpy()))
        k = head.kernel_distances(sq, sq_signs, m)[np.ix_(keep, keep)]
        # (the linear offset is left out here: this shows the calibration choice on the kernel part alone)
        fold = folds(np.array(rows["base_model"].to_list())[keep].tolist())
        bw_l2 = (readout.bandwidth, readout.l2)
        oof = out_of_fold(k, y[keep], fold, [bw_l2[0]], [bw_l2[1]])[bw_l2]
        print(m, "left-out rate gaps", calibration_gaps(oof, y[keep], fold, 30 if m == "aligned" else 50))


if __name__ == "__main__":
    main()
