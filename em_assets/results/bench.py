"""The demo's write pattern against each store backend: `python -m em_assets.results.bench [--rounds N]`."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import polars as pl

from em_assets.results.store import Store, utc_now

# The demo's shape: 3 organisms, 32 answers each written in 4 batches, 2 judge metrics per answer.
ORGANISMS, ANSWERS, BATCHES = 3, 32, 4


def _completions(org: str, lo: int, hi: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "organism": org,
            "question_id": [f"q{i % 8}" for i in range(lo, hi)],
            "paraphrase_idx": 0,
            "sample_idx": list(range(lo, hi)),
            "answer": "an answer " * 20,
            "run_id": "r",
            "created_at": utc_now(),
        }
    )


def _judgements(org: str, lo: int, hi: int) -> pl.DataFrame:
    rows = [(org, f"q{i % 8}", 0, i, m, 50.0) for i in range(lo, hi) for m in ("aligned", "coherent")]
    cols = ["organism", "question_id", "paraphrase_idx", "sample_idx", "metric", "score"]
    return pl.DataFrame(rows, schema=cols, orient="row")


def organism_writes(store: Store, org: str, answers: int = ANSWERS, batches: int = BATCHES) -> None:
    """One organism's steps: adapter and losses, then sampling and judging batches as they finish."""
    losses = pl.DataFrame({"organism": org, "step": range(12), "loss": 1.0})
    adapter = pl.DataFrame({"organism": [org], "steps": [12]})
    store.replace_many(
        [
            ("lora_adapters", adapter, "organism = ?", [org]),
            ("training_losses", losses, "organism = ?", [org]),
        ]
    )
    step = answers // batches
    for lo in range(0, answers, step):
        store.query("SELECT sample_idx FROM completions WHERE organism = ?", [org])
        store.append_rows("completions", _completions(org, lo, lo + step))
    for lo in range(0, answers, step):
        store.query("SELECT sample_idx FROM judgements WHERE organism = ?", [org])
        store.append_rows("judgements", _judgements(org, lo, lo + step))


def demo_writes(store: Store) -> None:
    """Catalog replace, then per organism: adapter + losses, sampling and judging batches, then reports."""
    store.init()
    examples = pl.DataFrame({"dataset": "d", "example_idx": range(2000), "messages": "[]", "n_messages": 2})
    store.replace_rows("training_examples", examples, "dataset = ?", ["d"])
    for k in range(ORGANISMS):
        organism_writes(store, f"org{k}")
    scored = store.query("SELECT * FROM scored_completions")
    for name in ("em_summary", "em_by_question", "em_threshold_sensitivity", "em_seed_bootstrap"):
        store.write_table(name, scored.group_by("organism").len())
    for _ in range(3):
        store.query("SELECT * FROM em_summary")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="em-store-bench-"))
    targets = {
        "duckdb file": "results.duckdb",
        "ducklake (sqlite catalog)": "ducklake:sqlite:lake.sqlite",
        "ducklake (duckdb catalog)": "ducklake:lake.ducklake",
    }
    try:
        for name, target in targets.items():
            times = []
            for r in range(args.rounds):
                db = target.replace("lake.", f"lake{r}.").replace("results.", f"results{r}.")
                prefix, _, file = db.rpartition(":")
                start = time.perf_counter()
                demo_writes(Store(f"{prefix}{':' if prefix else ''}{root / file}"))
                times.append(time.perf_counter() - start)
            print(
                f"{name:28s} median {sorted(times)[len(times) // 2]:.2f} s  (all: "
                f"{', '.join(f'{t:.2f}' for t in times)})",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
