"""The completions step of an `answers` organism: the file's rows become its completions, and the scores the
file carries become judgements of the file's judge (imported_judgements), both in one transaction."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import polars as pl

from em_assets.catalog.answers import read_answers, sample_rows
from em_assets.context import StageContext
from em_assets.grid.schema import config_hash
from em_assets.results import queries
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.store import utc_now

IMPORTED = "imported"


def answer_rows(ctx: StageContext, rows: pl.DataFrame, shash: str) -> pl.DataFrame:
    """Completion rows in file order; sample_idx counts each question's answers from 0."""
    org = ctx.organism
    numbered = rows.with_columns(sample_idx=pl.int_range(pl.len()).over("question_id").cast(pl.Int32))
    return pl.DataFrame(
        [
            {
                "organism": ctx.key,
                "base_model": org.base_model,
                "recipe": org.recipe,
                "seed": org.seed,
                "eval_set": f"file:{r['source_file']}",
                "question_id": r["question_id"],
                "paraphrase_idx": 0,
                "sample_idx": r["sample_idx"],
                "question": r["question"],
                "system": None,
                "answer": r["answer"],
                "finish_reason": IMPORTED,
                "sampling_hash": shash,
                "run_id": ctx.run_id,
                "created_at": utc_now(),
            }
            for r in numbered.iter_rows(named=True)
        ],
        schema_overrides={"paraphrase_idx": pl.Int32, "sample_idx": pl.Int32},
        infer_schema_length=None,
    )


def score_rows(ctx: StageContext, rows: pl.DataFrame, judge: str, shash: str, sha: str) -> pl.DataFrame:
    """One row per answer and score the file gives (aligned, coherent and any domain score)."""
    numbered = rows.with_columns(sample_idx=pl.int_range(pl.len()).over("question_id"))
    out = []
    for r in numbered.iter_rows(named=True):
        scores = {"aligned": r["aligned"], "coherent": r["coherent"], **json.loads(r["domain_scores"])}
        out += [
            {
                "organism": ctx.key,
                "question_id": r["question_id"],
                "paraphrase_idx": 0,
                "sample_idx": r["sample_idx"],
                "metric": metric,
                "score": score,
                "judge_model": judge,
                "source_sha256": sha,
                "source_row": r["row_idx"],
                "sampling_hash": shash,
                "run_id": ctx.run_id,
                "created_at": utc_now(),
            }
            for metric, score in scores.items()
            if score is not None
        ]
    return pl.DataFrame(out, infer_schema_length=None)


@dataclass(frozen=True)
class ImportResult:
    imported: int
    reused: int
    seconds: float
    sampling_hash: str


def import_answers(ctx: StageContext) -> ImportResult:
    """Write the organism's completions and file judgements from its answers file, unless they are current."""
    recipe, entry = ctx.grid.recipes[ctx.organism.recipe], ctx.grid.organism_source(ctx.organism)
    recorded = ctx.current_source(recipe)
    # The judge name is in the hash: the file's scores are stored under it.
    shash = config_hash(
        {
            "answers_sha256": recorded["sha256"],
            "n_rows": recorded["n_rows"],
            "file_judge": recorded["file_judge"],
        }
    )
    have = queries.completion_hashes(ctx.store, ctx.key)
    if have.height == recorded["n_rows"] and set(have["sampling_hash"]) == {shash}:
        ctx.log.info(f"{ctx.key}: all {have.height} imported answers are up to date")
        return ImportResult(0, have.height, 0.0, shash)
    start = time.perf_counter()
    answers = read_answers(entry.source, ctx.data_mirror, ctx.cache_dir)
    if answers.sha256 != recorded["sha256"]:
        raise MissingUpstreamError(
            f"{answers.name}: sha256 {answers.sha256} differs from the recorded {recorded['sha256']}; "
            "materialise lora_adapter again to take the new file"
        )
    rows = sample_rows(answers.rows, recipe.max_answers)
    scores = score_rows(ctx, rows, recipe.file_judge, shash, answers.sha256)
    queries.write_imported_answers(ctx.store, ctx.key, answer_rows(ctx, rows, shash), scores)
    ctx.log.info(f"{ctx.key}: imported {rows.height}/{rows.height} answers from {answers.name}")
    return ImportResult(rows.height, 0, time.perf_counter() - start, shash)
