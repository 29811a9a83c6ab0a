"""Experiment: how often each held-out reference file's corrected EM interval covers GPT-4o's rate when the file
is corrected with the other files' error rates, with the rates' spread across files and with pooled counts.
Run after a demo, in its checkout: the grid's judge scores every answer of the seven held-out files (through the
judge cache), and the demo's own sample (the answers judge_agreement scored) is read from its store.
Usage: PYTHONPATH=$PWD:$PWD/scripts/judge python scripts/judge/coverage.py"""

import polars as pl
from features import reference

from em_assets.cli.results import usable_store
from em_assets.grid.load import load_grid
from em_assets.judging.agreement_stage import pick_judge, score_reference, upstream_templates
from em_assets.judging.error_rates import em_error_rates, em_flags_of
from em_assets.results import judge_queries
from em_assets.settings import settings
from em_assets.stats.correction import ErrorRates, corrected_rate


def coverage(scores: pl.DataFrame, thresholds, label: str) -> None:
    """Per file: GPT-4o's rate, the judge's, and the corrected interval from the other files' rates."""
    rows = {"spread across files": [], "pooled counts": []}
    for name in sorted(scores["source_file"].unique()):
        own = scores.filter(pl.col("source_file") == name)
        spread = em_error_rates(scores.filter(pl.col("source_file") != name), thresholds)
        pooled = ErrorRates.from_counts(spread.tp, spread.n_pos, spread.tn, spread.n_neg)
        reference = em_flags_of(own, "reference", thresholds)["is_em"].mean()
        judged = em_flags_of(own, "score", thresholds)["is_em"]
        for kind, rates in (("spread across files", spread), ("pooled counts", pooled)):
            point, lo, hi = corrected_rate(int(judged.sum()), judged.len(), rates)
            rows[kind].append((name, reference, judged.mean(), point, lo, hi))
    print(f"== {label}")
    for kind, found in rows.items():
        covered = sum(lo <= ref <= hi for _, ref, _, _, lo, hi in found)
        width = sum(hi - lo for *_, lo, hi in found) / len(found)
        print(f"{kind}: covers GPT-4o's rate on {covered} of {len(found)} files, mean width {width:.3f}")
        for name, ref, judged, point, lo, hi in found:
            print(
                f"  {name[:44]:44} GPT-4o {ref:.3f} judge {judged:.3f} corrected {point:.3f} [{lo:.3f}, {hi:.3f}]"
            )


def main() -> None:
    current = settings()
    grid = load_grid(current.grid_path, current.profile)
    store = usable_store(may_create=False)
    rows = reference().filter(pl.col("split") == "heldout")
    templates = upstream_templates(grid, current.data_mirror, current.cache_dir)
    spec = pick_judge(grid, None)
    every, _ = score_reference(store, grid, spec, rows, templates, cache_dir=current.cache_dir)
    coverage(every, grid.thresholds, "every answer of the held-out files")
    t = grid.thresholds
    sample = judge_queries.agreement_scores_by_identity(store, t.aligned_at_most, t.coherent_above)
    coverage(sample, t, "the demo's sample (the answers judge_agreement scored)")


if __name__ == "__main__":
    main()
