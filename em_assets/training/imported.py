"""The lora_adapter step of organisms not trained here: a published adapter or model, or imported answers,
resolved, checked against the organism's base model and pinned by sha256 before any later step runs."""

from __future__ import annotations

from em_assets.catalog.answers import read_answers, sample_rows
from em_assets.context import StageContext
from em_assets.grid.schema import GridConfig, OrganismSource, RecipeSpec, config_hash, recipe_method
from em_assets.grid.sources import OrganismSourceError, check_source
from em_assets.results import queries
from em_assets.results.store import utc_now


def source_row(ctx: StageContext, recipe: RecipeSpec, **fields) -> dict:
    """The organism_sources row: the organism, its method, and what the kind adds (path, sha256, ...)."""
    org = ctx.organism
    entry = ctx.grid.organism_source(org)
    return {
        "organism": ctx.key,
        "base_model": org.base_model,
        "recipe": org.recipe,
        "seed": org.seed,
        "method": recipe_method(recipe),
        "source": entry.source if entry else None,
        "revision": None,
        "path": None,
        "sha256": None,
        "adapter_base_model": None,
        "model_type": None,
        "num_layers": None,
        "num_params": None,
        "n_rows": None,
        "file_judge": None,
        "run_id": ctx.run_id,
        "created_at": utc_now(),
        **fields,
    }


def _adapter(ctx: StageContext, entry: OrganismSource) -> tuple[dict, dict]:
    from em_assets.models.published import check_adapter_base, resolve_adapter

    base = queries.base_model_row(ctx.store, ctx.organism.base_model)
    adapter = resolve_adapter(entry.source, entry.revision)
    check_adapter_base(adapter, base["source"], base["path"], ctx.key)
    fields = {
        "revision": adapter.revision,
        "path": str(adapter.path),
        "sha256": adapter.sha256,
        "adapter_base_model": adapter.base_model_name_or_path,
    }
    lineage = {"adapter_path": str(adapter.path), "adapter_sha256": adapter.sha256}
    return fields, {**lineage, "base_revision": base["revision"]}


def _model(ctx: StageContext, entry: OrganismSource) -> tuple[dict, dict]:
    from em_assets.models.facts import model_facts
    from em_assets.models.published import resolve_model

    model = resolve_model(ctx.organism.base_model, entry.source, entry.revision, ctx.cache_dir)
    facts = model_facts(model.path)
    fields = {
        "revision": model.revision,
        "path": str(model.path),
        "model_type": facts.model_type,
        "num_layers": facts.num_layers,
        "num_params": facts.num_params,
    }
    return fields, {"base_revision": model.revision}


def _answers(ctx: StageContext, entry: OrganismSource, recipe: RecipeSpec) -> tuple[dict, dict]:
    answers = read_answers(entry.source, ctx.data_mirror, ctx.cache_dir)
    kept = sample_rows(answers.rows, recipe.max_answers)
    fields = {
        "path": answers.name,
        "sha256": answers.sha256,
        "n_rows": kept.height,
        "file_judge": recipe.file_judge if answers.scored else None,
    }
    return fields, {}


def bring_organism(ctx: StageContext, recipe: RecipeSpec) -> dict:
    """Resolve and check the organism's source and record it (organism_sources and its lora_adapters row)."""
    entry = ctx.grid.organism_source(ctx.organism)
    if entry is None:
        raise OrganismSourceError(f"organism {ctx.key}: recipe {ctx.organism.recipe!r} does not list it")
    kind = recipe.kind
    fields, lineage = (
        _adapter(ctx, entry)
        if kind == "adapter"
        else _model(ctx, entry)
        if kind == "model"
        else _answers(ctx, entry, recipe)
    )
    source = source_row(ctx, recipe, **fields)
    chash = config_hash({k: source[k] for k in ("method", "source", "revision", "sha256", "n_rows")})
    adapter = {
        "organism": ctx.key,
        "base_model": ctx.organism.base_model,
        "recipe": ctx.organism.recipe,
        "seed": ctx.organism.seed,
        "config_hash": chash,
        "run_id": ctx.run_id,
        "created_at": utc_now(),
        **lineage,
    }
    queries.write_organism(ctx.store, ctx.key, source, adapter)
    ctx.log.info(f"{ctx.key}: {kind} from {entry.source} ({source['revision'] or source['sha256']})")
    return adapter


def _is_local(source: str) -> bool:
    from pathlib import Path

    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def check_sources(grid: GridConfig) -> None:
    """Check every imported organism whose source is on this machine (directories, answers files, reference
    files), before anything runs; hub sources are checked by their lora_adapter step, once downloaded."""
    from em_assets.models.hub import unresolvable
    from em_assets.models.published import check_adapter_base, resolve_adapter

    for name, recipe in grid.recipes.items():
        for entry in recipe.organisms:
            key = f"{entry.base_model}--{name}--s{entry.seed}"
            if recipe.kind == "answers":
                read_answers(entry.source)
            elif recipe.kind == "adapter" and _is_local(entry.source):
                base = grid.base_model(entry.base_model)
                path = base.source if _is_local(base.source) else None
                check_adapter_base(resolve_adapter(entry.source), base.source, path, key)
            elif recipe.kind == "model" and _is_local(entry.source):
                check_source(entry.source, [])
                # What its lora_adapter step would refuse: no safetensors weights, or shards missing.
                if why := unresolvable(entry.source):
                    raise OrganismSourceError(f"organism {key}: {why}")
