"""Catalog assets: base models, training datasets and eval questions, pinned and verified."""

from pathlib import Path

import dagster as dg
import polars as pl

from em_assets.catalog import stage as catalog
from em_assets.catalog.parsing import parsing_fields
from em_assets.defs.metadata import md_table
from em_assets.defs.partitions import CPU_OP_TAGS
from em_assets.defs.resources import ExperimentResource, ResultsDB


@dg.asset(
    group_name="catalog",
    kinds={"huggingface", "duckdb"},
    op_tags=CPU_OP_TAGS,
    description="Every base model of the grid resolved to local safetensors and pinned by revision.",
)
def base_models(experiment: ExperimentResource, results: ResultsDB) -> dg.MaterializeResult:
    df = catalog.resolve_base_models(results.store(), experiment.grid(), Path(experiment.cache_dir))
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": df.height,
            "models": md_table(
                df.select("name", "source", "revision", "model_type", "num_layers", "num_params")
            ),
        },
        data_version=dg.DataVersion("|".join(sorted(df["revision"].to_list()))),
    )


@dg.asset(
    group_name="catalog",
    kinds={"duckdb"},
    op_tags=CPU_OP_TAGS,
    description="Upstream chat datasets the recipes train on, sha256-verified, one row per example.",
)
def training_datasets(experiment: ExperimentResource, results: ResultsDB) -> dg.MaterializeResult:
    df = catalog.load_training_datasets(
        results.store(), experiment.grid(), experiment.mirror, Path(experiment.cache_dir)
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": int(df["n_examples"].sum()),
            "datasets": md_table(df.select("dataset", "repo", "commit", "sha256", "n_examples")),
        },
        # A new parser's examples are new data (adapters' keys name its version past 1, as this does).
        data_version=dg.DataVersion(
            "|".join(sorted(df["sha256"].to_list()) + [f"parsing:{v}" for v in parsing_fields().values()])
        ),
    )


@dg.asset(
    group_name="catalog",
    kinds={"duckdb"},
    op_tags=CPU_OP_TAGS,
    description="Every pinned evaluation set's questions and the judge prompts its upstream file brings (the "
    "domain judges lent to the sets that judge alignment without them).",
)
def eval_questions(experiment: ExperimentResource, results: ResultsDB) -> dg.MaterializeResult:
    grid = experiment.grid()
    df = catalog.load_eval_questions(results.store(), grid, experiment.mirror, Path(experiment.cache_dir))
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": df.height,
            "eval_sets_sampled": ", ".join(grid.sampled_eval_sets()),
            "eval_sets_loaded": md_table(df.group_by("eval_set", maintain_order=True).len("rows")),
            "judge_metrics": ", ".join(grid.judge.metrics),
            "questions": md_table(
                df.filter(pl.col("eval_set") == grid.eval.questions).select(
                    "question_id", "paraphrase_idx", "question"
                )
            ),
        },
        data_version=dg.DataVersion("|".join(sorted(set(df["source_sha256"])))),
    )
