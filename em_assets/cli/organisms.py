"""`em-assets plan`: what the grid of the current profile will run, organism by organism, without running it."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from em_assets.settings import Settings, settings

if TYPE_CHECKING:
    from em_assets.grid.schema import GridConfig


def organism_plan(grid, progress: dict[str, dict]) -> list[dict]:
    """One entry per organism: key, kind (its method), source, revision, and what the store already holds."""
    from em_assets.grid.schema import recipe_method

    entries = []
    for org in grid.organisms():
        recipe = grid.recipes[org.recipe]
        method = recipe_method(recipe)
        imported = grid.organism_source(org)
        if imported is not None:
            source, revision = imported.source, imported.revision
        elif recipe.dataset is not None:
            source, revision = f"dataset:{recipe.dataset}", None
        else:
            base = grid.base_model(org.base_model)
            source, revision = base.source, base.revision
        held = progress.get(org.key, {})
        entries.append(
            {
                "organism": org.key,
                "kind": method,
                "source": source,
                "revision": revision,
                "done": {
                    "lora_adapter": bool(held.get("source_recorded")),
                    "completions": int(held.get("completions", 0)),
                    "judgements": int(held.get("judgements", 0)),
                },
                "stored_for": _stored_for(held, method, source if imported else None),
            }
        )
    return entries


def plan_summary(entries: list[dict]) -> str:
    """One line under the plan's table: organisms by kind, and how many have lora_adapter, answers, judgements."""
    kinds = ", ".join(f"{n} {kind}" for kind, n in Counter(e["kind"] for e in entries).items())
    # Results kept under a key for another source are replaced on the next run, so they count as not done.
    current = [e["done"] for e in entries if not e["stored_for"]]
    redo = len(entries) - len(current)
    adapters, answered, judged = (
        sum(bool(d[k]) for d in current) for k in ("lora_adapter", "completions", "judgements")
    )
    line = (
        f"{len(entries)} organism{'' if len(entries) == 1 else 's'} ({kinds}): lora_adapter done for {adapters}, "
        f"completions for {answered}, judgements for {judged}"
    )
    return line + (f"; {redo} {'holds' if redo == 1 else 'hold'} another source's results" if redo else "")


def _stored_for(held: dict, method: str, source: str | None) -> str | None:
    """What the store holds under the key when it was recorded for another method or imported source (the
    next run replaces it), else None. A revision recorded resolved (a commit for `main`) is not compared."""
    stored = (held.get("stored_method"), held.get("stored_source"))
    if stored[0] is None or stored == (method, source):
        return None
    return " ".join(x for x in stored if x is not None)


def _progress() -> dict[str, dict]:
    from em_assets.cli.results import usable_store
    from em_assets.results import queries

    # A store the demo would create passes (nothing done yet); one it could not use is refused.
    store = usable_store(may_create=True)
    return queries.organism_progress(store) if store.exists() else {}


def checked_grid(current: Settings) -> GridConfig:
    """The grid's profile, validated without running anything: its schema, the catalog names it uses, its
    organisms' sources, its recipes' layers and modules in the models on disk, and the mirror's pinned files (bad
    input raises before anything is written)."""
    from em_assets.catalog.stage import catalog_files, check_grid_fits_models, check_grid_names
    from em_assets.catalog.upstream import check_mirror
    from em_assets.grid.load import GridError, load_grid
    from em_assets.grid.sources import check_source
    from em_assets.models.hub import EMBEDDED
    from em_assets.training.imported import check_sources

    grid = load_grid(current.grid_path, current.profile)
    check_grid_names(grid)
    for i, base in enumerate(grid.base_models):
        try:
            check_source(base.source, sorted(EMBEDDED))
        except GridError as exc:
            raise GridError(f"base_models[{i}] ({base.name}): {exc}") from None
    check_sources(grid)
    check_grid_fits_models(grid, current.cache_dir)
    if current.data_mirror:
        check_mirror(catalog_files(grid), current.data_mirror)
    check_grid_reads(grid, current)
    return grid


def check_grid_reads(grid: GridConfig, current: Settings) -> None:
    """What the grid names that only a running step would read: the question ids and judge metrics its eval sets
    must have, and the probe judge's hand ratings file. Run after check_grid_names (the sets must be known)."""
    from em_assets.catalog.stage import check_grid_questions
    from em_assets.grid.load import GridError

    check_grid_questions(grid, current.data_mirror, current.cache_dir)
    ratings = grid.probe.hand_ratings if grid.probe else None
    if ratings and not Path(ratings).is_file():
        raise GridError(
            f"probe.hand_ratings: no file at {ratings} (a path relative to the working directory)"
        )


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan; the grid is validated and organism sources are checked first (bad input: 2)."""
    current = settings()
    grid = checked_grid(current)
    progress = _progress()
    entries = organism_plan(grid, progress)
    # Organisms the store holds that the profile no longer lists: the reports still include them.
    stale = sorted(progress.keys() - {e["organism"] for e in entries})
    if args.format == "json":
        print(json.dumps({"organisms": entries, "not_in_grid": stale}, indent=2))
        return 0
    done = [
        f"holds {e['stored_for']}; redone next run"
        if e["stored_for"]
        else f"lora_adapter {'done' if e['done']['lora_adapter'] else 'to do'}, {e['done']['completions']} "
        f"completions, {e['done']['judgements']} judgements"
        for e in entries
    ]
    table = pl.DataFrame(
        {
            "organism": [e["organism"] for e in entries],
            "kind": [e["kind"] for e in entries],
            "source": [e["source"] + (f"@{e['revision']}" if e["revision"] else "") for e in entries],
            "done": done,
        }
    )
    with pl.Config(
        tbl_rows=-1,
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
        fmt_str_lengths=100,
        tbl_width_chars=260,
    ):
        print(table)
    print(plan_summary(entries))
    if stale:
        print(
            f"The store also holds {', '.join(stale)}, not in profile {current.profile!r}: the reports include "
            "them until `em-assets forget KEY` deletes them."
        )
    return 0
