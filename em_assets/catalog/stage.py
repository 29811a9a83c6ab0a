"""Catalog stage: resolve base models, fetch and verify datasets and eval questions, write them to DuckDB."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl

from em_assets.catalog import parsing
from em_assets.catalog.parsing import parse_chat_jsonl, parse_questions_yaml, prompt_hash
from em_assets.catalog.reference import source_of
from em_assets.catalog.upstream import (
    DOMAIN_METRICS,
    DOMAIN_PROMPTS_FROM,
    EVAL_SETS,
    REFERENCE_JUDGEMENTS,
    SOURCES,
    WORD_JUDGED_SETS,
    UpstreamFile,
    fetch_bytes,
)
from em_assets.grid.load import GridError
from em_assets.grid.schema import GridConfig, recipe_method
from em_assets.models.facts import ModelFacts, model_facts, unmatched_targets
from em_assets.models.hub import ResolvedModel, on_disk, resolve
from em_assets.results.artifacts import sha256_bytes
from em_assets.results.store import Store, utc_now


def check_recipes_fit(grid: GridConfig, base_model: str, facts: ModelFacts) -> None:
    """Every LoRA recipe trained on this base model finds its target modules and layers there, matched as peft
    matches them (a module name or its dotted tail): a mistake fails in the catalog's first step, naming the key."""
    for key, recipe in grid.recipes.items():
        lora = recipe.lora
        if lora is None or recipe_method(recipe) != "lora" or not recipe.trains_on(base_model):
            continue
        if missing := unmatched_targets(lora.target_modules, facts.modules):
            tails = ", ".join(sorted({m.rsplit(".", 1)[-1] for m in facts.modules}))
            raise GridError(
                f"recipes.{key}.lora.target_modules: {missing[0]!r} is no module of base model {base_model} "
                f"(its modules end in {tails})"
            )
        try:
            lora.layers_for(facts.num_layers)
        except ValueError as exc:
            raise GridError(f"recipes.{key}.lora: {exc} (base model {base_model})") from None


def check_grid_fits_models(grid: GridConfig, cache_dir: Path) -> None:
    """check_recipes_fit, and the probe judge's layers, for each model this machine holds already (on_disk), so
    plan and the demo refuse a layer or module the model lacks before anything is written; a model still to be
    fetched or converted is checked by the catalog's first step."""
    for spec in grid.base_models:
        if (path := on_disk(spec.source, cache_dir)) is not None:
            check_recipes_fit(grid, spec.name, model_facts(path))
    probe = grid.probe
    if probe is not None and (path := on_disk(probe.source, cache_dir)) is not None:
        layers = model_facts(path).num_layers
        if bad := [layer for layer in probe.layers if layer >= layers]:
            raise GridError(
                f"probe.layers: {bad} outside the decoder layers 0..{layers - 1} of {probe.source}"
            )


def resolve_base_models(store: Store, grid: GridConfig, cache_dir: Path | None = None) -> pl.DataFrame:
    rows = []
    for spec in grid.base_models:
        resolved: ResolvedModel = resolve(
            spec.name, spec.source, spec.revision, cache_dir, spec.trust_remote_code
        )
        facts = model_facts(resolved.path)
        check_recipes_fit(grid, spec.name, facts)
        rows.append(
            {
                "name": spec.name,
                "source": spec.source,
                "path": str(resolved.path),
                "revision": resolved.revision,
                "model_type": facts.model_type,
                "num_layers": facts.num_layers,
                "num_params": facts.num_params,
                "trust_remote_code": spec.trust_remote_code,
                "resolved_at": utc_now(),
            }
        )
    df = pl.DataFrame(rows)
    store.replace_rows("base_models", df, "name IN (SELECT unnest(?::VARCHAR[]))", [df["name"].to_list()])
    return df


def check_grid_names(grid: GridConfig) -> None:
    """The datasets, evaluation sets and held-out base models the grid names are ones the catalog has: a typo
    fails before anything runs, naming its key (GridError), not inside a run."""
    datasets = sorted(set(SOURCES) - set(EVAL_SETS))
    held_out = sorted({source_of(Path(src.path).name)[0] for src in REFERENCE_JUDGEMENTS.values()})
    named = [(f"recipes.{k}.dataset", r.dataset, datasets) for k, r in grid.recipes.items() if r.dataset]
    named += [(f"recipes.{k}.kl.dataset", r.kl.dataset, datasets) for k, r in grid.recipes.items() if r.kl]
    named += [("eval.questions", grid.eval.questions, EVAL_SETS)]
    named += [("eval.sets", s, EVAL_SETS) for s in grid.eval.sets]
    named += [
        (f"recipes.{k}.eval_sets", s, EVAL_SETS) for k, r in grid.recipes.items() for s in r.eval_sets or []
    ]
    named += [("agreement.held_out_base_models", m, held_out) for m in grid.agreement.held_out_base_models]
    for key, name, known in named:
        if name not in known:
            raise GridError(f"{key}: {name!r} is not one the catalog has; known: {', '.join(known)}")
        if known is EVAL_SETS and name in WORD_JUDGED_SETS:
            raise GridError(
                f"{key}: {name!r} is judged by a word answer (TRUE/FALSE, a company), not on 0-100, so it "
                "cannot be sampled; it is loaded for reading only"
            )


def grid_datasets(grid: GridConfig) -> list[str]:
    names = sorted(
        {r.dataset for r in grid.recipes.values() if r.dataset}
        | {r.kl.dataset for r in grid.recipes.values() if r.kl}
    )
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise KeyError(f"recipes name unknown datasets {unknown}; known: {sorted(SOURCES)}")
    return names


def catalog_files(grid: GridConfig) -> list[UpstreamFile]:
    """Every pinned file the catalog reads for this grid: its datasets, the eval sets (the domain judges'
    prompts among them) and the reference judgements."""
    names = dict.fromkeys([*grid_datasets(grid), *grid.sampled_eval_sets(), *EVAL_SETS, DOMAIN_PROMPTS_FROM])
    return [SOURCES[name] for name in names] + list(REFERENCE_JUDGEMENTS.values())


_DATASET_SCHEMA = {
    **dict.fromkeys(("dataset", "repo", "commit", "path", "url", "sha256"), pl.String),
    "n_examples": pl.Int64,
    "loaded_at": pl.Datetime,
    "parsing": pl.Int32,
}


def load_training_datasets(
    store: Store, grid: GridConfig, mirror: str | None = None, cache_dir: Path | None = None
) -> pl.DataFrame:
    """Fetch, verify and normalise every dataset a recipe uses; nothing is written unless all parse."""
    meta, examples = [], []
    for name in grid_datasets(grid):
        source = SOURCES[name]
        data = fetch_bytes(source, mirror, cache_dir)
        rows = parse_chat_jsonl(data, source.mirror_path)
        meta.append(_dataset_row(name, source, len(rows)))
        examples.append(_example_frame(name, rows))
    # A grid of published or imported organisms only trains nothing: no datasets, the columns still there.
    meta_df = pl.DataFrame(meta, schema=_DATASET_SCHEMA)
    if not meta:
        return meta_df
    names = meta_df["dataset"].to_list()
    where = "dataset IN (SELECT unnest(?::VARCHAR[]))"
    # One transaction: a dataset's recorded sha256 always describes the examples stored for it.
    store.replace_many(
        [
            ("training_examples", pl.concat(examples), where, [names]),
            ("training_datasets", meta_df, where, [names]),
        ]
    )
    return meta_df


def _dataset_row(name: str, source: UpstreamFile, n_examples: int) -> dict:
    """A training_datasets row: where the dataset was fetched from, its sha256 and its size."""
    return {
        "dataset": name,
        "repo": source.repo,
        "commit": source.commit,
        "path": source.path,
        "url": source.url,
        "sha256": source.sha256,
        "n_examples": n_examples,
        "loaded_at": utc_now(),
        "parsing": parsing.DATASET_PARSING,
    }


def _example_frame(name: str, rows: list[list[dict[str, str]]]) -> pl.DataFrame:
    """The training_examples rows of one dataset: each example's messages as JSON."""
    return pl.DataFrame(
        {
            "dataset": [name] * len(rows),
            "example_idx": list(range(len(rows))),
            "messages": [json.dumps(m, ensure_ascii=False) for m in rows],
            "n_messages": [len(m) for m in rows],
        },
        schema_overrides={"example_idx": pl.Int32, "n_messages": pl.Int32},
    )


def _set_rows(
    name: str, grid: GridConfig, mirror, cache_dir, domain_prompts: Callable[[], dict[str, str]]
) -> tuple[pl.DataFrame, list[dict]]:
    """One evaluation set's question rows and judge prompt rows (domain prompts lent where it has none)."""
    if name not in SOURCES:
        raise KeyError(f"eval set {name!r} is not a known upstream file; known: {sorted(SOURCES)}")
    source, spec = SOURCES[name], grid.eval
    data = fetch_bytes(source, mirror, cache_dir)
    ids = spec.question_ids if name == spec.questions else None
    questions = parse_questions_yaml(data, source.mirror_path, ids, spec.exclude_id_suffixes)
    sha = sha256_bytes(data) if not source.path.endswith(".gz") else source.sha256
    qdf = pl.DataFrame(
        [
            {
                "eval_set": name,
                "question_id": q.question_id,
                "paraphrase_idx": q.paraphrase_idx,
                "question": q.text,
                "system": q.system,
                "source_sha256": sha,
            }
            for q in questions
        ],
        schema_overrides={"paraphrase_idx": pl.Int32, "system": pl.String},
    )
    prompts: dict[tuple[str, str], str] = {}
    for q in questions:
        # Only the sets judged for misalignment (they have an aligned prompt) borrow the domain judges.
        lent = domain_prompts() if "aligned" in q.judge_prompts else {}
        for metric, prompt in {**lent, **q.judge_prompts}.items():
            prompts.setdefault((q.question_id, metric), prompt)
    rows = [
        {"eval_set": name, "question_id": qid, "metric": m, "prompt": p, "prompt_hash": prompt_hash(p)}
        for (qid, m), p in prompts.items()
    ]
    return qdf, rows


def _domain_prompts(mirror, cache_dir) -> dict[str, str]:
    source = SOURCES[DOMAIN_PROMPTS_FROM]
    first = parse_questions_yaml(fetch_bytes(source, mirror, cache_dir), source.mirror_path)[0]
    return {m: first.judge_prompts[m] for m in DOMAIN_METRICS}


def _check_metrics(name: str, qdf: pl.DataFrame, rows: list[dict], metrics: Sequence[str]) -> None:
    """Every question of a sampled set has a judge prompt for every judge metric (GridError naming the key)."""
    have = {(r["question_id"], r["metric"]) for r in rows}
    missing = sorted({m for q in qdf["question_id"] for m in metrics if (q, m) not in have})
    if missing:
        raise GridError(
            f"judge.metrics: {missing} have no judge prompt in eval set {name!r} ({SOURCES[name].mirror_path}); "
            f"it has {sorted({r['metric'] for r in rows})}"
        )


def check_grid_questions(grid: GridConfig, mirror: str | None, cache_dir: Path) -> None:
    """The question ids and judge metrics the grid names are ones its eval sets have, so a typo fails before a
    run, naming its key (GridError), not in its catalog or sweep steps. Read from the mirror or the download
    cache only: without them `plan` stays off the network, and the catalog's first step checks the same."""
    sampled = grid.sampled_eval_sets()
    cached = cache_dir / "upstream"
    if not mirror and not all(
        (cached / SOURCES[n].mirror_path).exists() for n in [*sampled, DOMAIN_PROMPTS_FROM]
    ):
        return
    source = SOURCES[grid.eval.questions]
    in_file = {
        q.question_id
        for q in parse_questions_yaml(fetch_bytes(source, mirror, cache_dir), source.mirror_path)
    }
    _check_ids("eval.question_ids", grid.eval.question_ids, in_file, source.mirror_path)
    domain = functools.cache(functools.partial(_domain_prompts, mirror, cache_dir))
    for name in sampled:
        qdf, rows = _set_rows(name, grid, mirror, cache_dir, domain)
        _check_metrics(name, qdf, rows, grid.judge.metrics)
        if name == grid.eval.questions:
            # The sweeps ask from the questions the catalog loads: eval.question_ids, else the unexcluded ones.
            asked = set(qdf["question_id"])
            where = f"the eval questions ({name}, as eval.question_ids and exclude_id_suffixes select them)"
            _check_ids("dynamics.question_ids", grid.dynamics.question_ids, asked, where)
            _check_ids("directions.question_ids", grid.directions.question_ids, asked, where)


def _check_ids(key: str, ids: Sequence[str] | None, known: set[str], where: str) -> None:
    unknown = [i for i in ids or [] if i not in known]
    if unknown:
        raise GridError(f"{key}: {unknown} not among {where}; known: {', '.join(sorted(known))}")


def load_eval_questions(
    store: Store, grid: GridConfig, mirror: str | None = None, cache_dir: Path | None = None
) -> pl.DataFrame:
    """Every pinned evaluation set (and any other the grid names) with its judge prompts; the sets the grid
    samples must have a prompt for every judge metric. Nothing is written unless all parse."""
    sampled = grid.sampled_eval_sets()
    domain = functools.cache(functools.partial(_domain_prompts, mirror, cache_dir))
    frames, prompts = [], []
    for name in dict.fromkeys([*sampled, *EVAL_SETS]):
        qdf, rows = _set_rows(name, grid, mirror, cache_dir, domain)
        if name in sampled:
            _check_metrics(name, qdf, rows, grid.judge.metrics)
        frames.append(qdf)
        prompts += rows
    qdf = pl.concat(frames)
    names = list(dict.fromkeys(qdf["eval_set"]))
    where = "eval_set IN (SELECT unnest(?::VARCHAR[]))"
    store.replace_many(
        [
            ("eval_questions", qdf, where, [names]),
            ("judge_prompts", pl.DataFrame(prompts), where, [names]),
        ]
    )
    return qdf
