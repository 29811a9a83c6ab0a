"""Experiment: the demo's probe judge on SmolLM2 answers rated by hand, all held out (data/demo_answer_ratings.csv,
the demo's own answers, by organism; data/steered_ratings.csv, steered answers, by scale): coherence rates judged and
by hand (and by a second pass where the file has one), Spearman and AUC. The head is fitted as the demo fits it
(scripts/judge/fit_demo_probe.py, whose feature cache it shares).
Usage: PYTHONPATH=$PWD:$PWD/scripts/judge python scripts/judge/demo_answers.py [RATINGS.csv [GROUP_COLUMN[,COLUMN]]]"""

import sys

import polars as pl
from fit_demo_probe import fit_demo_head

from em_assets.grid.load import load_grid
from em_assets.judging.agreement import metric_agreement, spearman
from em_assets.judging.probe import ProbeJudge
from em_assets.models.hub import resolve
from em_assets.models.load import load_model, load_tokenizer


def line(name: str, part: pl.DataFrame) -> str:
    a = metric_agreement(
        "coherent",
        part["coherent"].to_list(),
        part["judged"].to_list(),
        aligned_at_most=30,
        coherent_above=50,
    )
    auc = "n/a (one class)" if a.auc is None else f"{a.auc:.2f}"
    retest = ""
    if "coherent_second_pass" in part.columns:
        again = part["coherent_second_pass"]
        retest = (
            f"; second pass: {(again > 50).mean():.1%} by hand, judge Spearman "
            f"{spearman(again.to_numpy(), part['judged'].to_numpy()):.2f}, passes' Spearman "
            f"{spearman(again.to_numpy(), part['coherent'].to_numpy()):.2f}"
        )
    return (
        f"{name} (n {part.height}): coherent {(part['judged'] > 50).mean():.1%} judged vs "
        f"{(part['coherent'] > 50).mean():.1%} by hand; Spearman {a.spearman:.2f}, AUC {auc}, "
        f"mean score {part['judged'].mean():.0f} vs {part['coherent'].mean():.0f}{retest}"
    )


def main(ratings: str = "data/demo_answer_ratings.csv", group: str = "organism") -> None:
    spec = load_grid("data/grid.yaml", "demo").probe
    path = resolve("smollm2", spec.source).path
    fit = fit_demo_head(spec, path)
    judge = ProbeJudge(load_model(path, device="cpu"), load_tokenizer(path), fit.head, spec.batch_size)
    rated = pl.read_csv(ratings, comment_prefix="#").with_columns(pl.col("response").fill_null(""))
    inputs = [judge.render("coherent", q, a) for q, a in rated.select("question", "response").rows()]
    rated = rated.with_columns(judged=pl.Series([s.score for s in judge.score(inputs)]))
    print(line("all", rated))
    base = rated["organism"].str.contains("--base--")
    if base.any():
        print(line("the three trained organisms", rated.filter(~base)))
    columns = group.split(",")
    for values, part in rated.sort(columns, maintain_order=True).group_by(columns, maintain_order=True):
        print("  " + line(" ".join(f"{c} {v}" for c, v in zip(columns, values, strict=True)), part))


if __name__ == "__main__":
    main(*sys.argv[1:3])
