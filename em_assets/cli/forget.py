"""`em-assets forget`: organisms taken out of the grid leave the results store and the reports."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from em_assets.cli.errors import ForgetError
from em_assets.settings import settings

if TYPE_CHECKING:
    from em_assets.results.store import Store


def _check(keys: list[str], confirmed: bool) -> tuple[Store, set[str]]:
    """The store to forget the keys in and the organism partitions Dagster knows, after refusing (ForgetError)
    what would lose work or do nothing."""
    from em_assets.cli.results import usable_store
    from em_assets.grid.load import load_grid
    from em_assets.results.forget import rows_held

    if blank := [k for k in keys if not k.strip()]:
        raise ForgetError(
            f"an empty organism key ({len(blank)} of {len(keys)}): give keys like base--recipe--s0"
        )
    current = settings()
    in_grid = {o.key for o in load_grid(current.grid_path, current.profile).organisms()} & set(keys)
    if in_grid:
        raise ForgetError(
            f"{', '.join(sorted(in_grid))} {'is' if len(in_grid) == 1 else 'are'} in profile {current.profile!r} "
            f"of {current.grid_path}: take it out of the grid first, or its next run computes it again"
        )
    store = usable_store()
    if not store.lake and not confirmed:
        raise ForgetError(
            f"{store.path} is a plain DuckDB file, which keeps no snapshots: the rows would be gone for good. "
            "Pass --yes to delete them anyway"
        )
    held = rows_held(store, keys)
    partitions = _partitions()
    unknown = [k for k, n in held.items() if n == 0 and k not in partitions]
    if unknown:
        raise ForgetError(f"the store holds no rows and Dagster no partition for {', '.join(unknown)}")
    return store, partitions


def _partitions() -> set[str]:
    """The organism partitions the local Dagster instance knows (none without one)."""
    if not settings().dagster_home.exists():
        return set()
    from em_assets.cli.demo import local_instance
    from em_assets.defs.partitions import organisms

    return set(local_instance().get_dynamic_partitions(organisms.name))


def cmd_forget(args: argparse.Namespace) -> int:
    from em_assets.cli.demo import local_instance, log_file, logged_runs, run_reports
    from em_assets.defs.partitions import organisms
    from em_assets.results.forget import forget

    keys = list(dict.fromkeys(args.organism))
    store, partitions = _check(keys, args.yes)
    log_path = log_file("forget")
    before = store.current_snapshot()
    deleted = forget(store, keys)
    counts = ", ".join(f"{table} {n}" for table, n in deleted.items()) or "none"
    print(f"[em-assets] forgot {', '.join(keys)}: {sum(deleted.values())} rows ({counts})")
    if deleted and before is not None:
        print(f"[em-assets] snapshot {before} still holds them (em-assets sql --snapshot {before} ...)")
    gone = [k for k in keys if k in partitions]
    if gone:
        instance = local_instance()
        for key in gone:
            instance.delete_dynamic_partition(organisms.name, key)
        print(f"[em-assets] removed the Dagster partition(s) {', '.join(gone)}")
    print(f"[em-assets] their files under {settings().artifacts_dir} are kept")
    print(f"[em-assets] rebuilding the reports; full log in {log_path}", flush=True)
    return logged_runs(log_path, run_reports) or 0
