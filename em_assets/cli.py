"""`em-assets` command line: run the demo, query results read-only, add a base model to the grid."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import polars as pl

from em_assets.settings import DAGSTER_HOME_ENV, settings

# Spinning OpenMP threads starve each other on small shared CPUs; set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _instance():
    """The persistent local instance (DAGSTER_HOME, default .dagster_home), so runs show in the UI."""
    from dagster import DagsterInstance

    home = settings().dagster_home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ[DAGSTER_HOME_ENV] = str(home)
    shipped = Path("dagster.yaml")
    if shipped.exists() and not (home / "dagster.yaml").exists():
        shutil.copy(shipped, home / "dagster.yaml")
    return DagsterInstance.get()


def run_pipeline(organism_keys: list[str] | None = None) -> list[dict]:
    """Materialise the catalog, every organism partition of the grid, then the reports; returns step timings."""
    from em_assets.definitions import defs
    from em_assets.defs.partitions import organisms
    from em_assets.defs.resources import ExperimentResource

    instance = _instance()
    keys = organism_keys or [o.key for o in ExperimentResource.from_env().grid().organisms()]
    known = set(instance.get_dynamic_partitions(organisms.name))
    instance.add_dynamic_partitions(organisms.name, [k for k in keys if k not in known])
    runs = [("catalog_job", None)] + [("organism_job", k) for k in keys] + [("reports_job", None)]
    timings = []
    for job_name, key in runs:
        start = time.perf_counter()
        result = defs.resolve_job_def(job_name).execute_in_process(instance=instance, partition_key=key)
        wall = time.perf_counter() - start
        for stat in instance.get_run_step_stats(result.run_id):
            timings.append(
                {
                    "job": job_name,
                    "partition": key or "",
                    "step": stat.step_key,
                    "seconds": round((stat.end_time or 0) - (stat.start_time or 0), 2),
                }
            )
        print(f"[em-assets] {job_name} {key or ''} done in {wall:.1f}s", flush=True)
    return timings


def cmd_demo(args: argparse.Namespace) -> int:
    from em_assets.results.store import Store

    start = time.perf_counter()
    timings = run_pipeline(args.organism or None)
    total = time.perf_counter() - start
    with pl.Config(tbl_rows=-1, tbl_hide_dataframe_shape=True, fmt_str_lengths=60, tbl_width_chars=160):
        print(pl.DataFrame(timings))
        summary = Store().query(
            "SELECT organism, n_answers, em_rate_turner, em_turner_lo, em_turner_hi, em_rate_betley, "
            "coherence_rate, mean_aligned, mean_coherent FROM em_summary ORDER BY organism"
        )
        print(summary)
    print(f"[em-assets] pipeline finished in {total:.1f}s")
    return 0


def _print_frame(df: pl.DataFrame, fmt: str, max_rows: int) -> None:
    if fmt == "csv":
        sys.stdout.write(df.write_csv())
    elif fmt == "json":
        sys.stdout.write(df.write_json() + "\n")
    else:
        with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
            print(df)


def cmd_sql(args: argparse.Namespace) -> int:
    """Read-only queries. Each statement opens and closes its own connection, so an open shell never holds the
    database lock that running materialisations need."""
    import duckdb

    store = _store(args)
    if store is None:
        return 2
    if not store.exists():
        print(f"no results database at {store.path}", file=sys.stderr)
        return 2
    # Read-only with no file or network access: COPY ... TO and ATTACH cannot write elsewhere either.
    safe = {"enable_external_access": False}
    if args.query:
        try:
            with store.connect(read_only=True, config=safe) as conn:
                _print_frame(conn.execute(args.query).pl(), args.format, args.max_rows)
        except duckdb.Error as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("em-sql> " if interactive else "")
        except EOFError:
            return 0
        if not line.strip():
            continue
        if line.strip().rstrip(";").lower() in {"quit", "exit", ".quit", ".exit"}:
            return 0
        try:
            with store.connect(read_only=True, config=safe) as conn:
                _print_frame(conn.execute(line).pl(), args.format, args.max_rows)
        except duckdb.Error as exc:
            print(f"error: {exc}", file=sys.stderr)


def _store(args: argparse.Namespace):
    """The store the command names (--db, else EM_DB), as of --snapshot; None after printing why not."""
    from em_assets.results.store import Store

    store = Store(args.db) if args.db else Store()
    if args.snapshot is None:
        return store
    if not store.lake:
        print(
            f"error: {store.path} is a plain DuckDB file, which keeps no snapshots: snapshots need a DuckLake "
            "store (EM_DB=ducklake:sqlite:data/results.sqlite, or ducklake:postgres:...)",
            file=sys.stderr,
        )
        return None
    return store.at_snapshot(args.snapshot)


def cmd_figures(args: argparse.Namespace) -> int:
    """Redraw the report figures from one snapshot, e.g. the `source_snapshot` a past em_figures recorded."""
    import duckdb

    from em_assets.grid.load import GridError, load_grid
    from em_assets.grid.schema import Thresholds
    from em_assets.reports.tables import rebuild_figures

    store = _store(args)
    if store is None:
        return 2
    try:
        # Only for a snapshot whose em_summary is empty; otherwise its own thresholds are used.
        fallback = load_grid().thresholds
    except GridError:
        fallback = Thresholds()
    try:
        paths = rebuild_figures(store, args.snapshot, Path(args.out), fallback)
    except duckdb.Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Copy a DuckDB results file (the layout before DuckLake) into the configured store."""
    from em_assets.results.migrate import migrate
    from em_assets.results.store import Store

    store = Store(args.db) if args.db else Store()
    try:
        counts = migrate(Path(args.source), store)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for table, n in counts.items():
        print(f"{table}\t{n}")
    print(
        f"[em-assets] copied {len(counts)} tables, {sum(counts.values())} rows into {store.location.describe()}"
    )
    return 0


def cmd_add_model(args: argparse.Namespace) -> int:
    from em_assets.grid.edit import add_base_model
    from em_assets.grid.load import GridError

    try:
        spec = add_base_model(
            Path(args.grid) if args.grid else settings().grid_path,
            args.profile or settings().profile,
            args.source,
            name=args.name,
            revision=args.revision,
            trust_remote_code=args.trust_remote_code,
        )
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"added base model {spec.name} ({spec.source}); the grid sensor will add its organisms and runs")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="em-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="materialise every asset of the grid profile (EM_PROFILE, default demo)"
    )
    demo.add_argument("--organism", action="append", help="only this organism key (repeatable)")
    demo.set_defaults(func=cmd_demo)
    sql = sub.add_parser("sql", help="run a read-only SQL query on the results database")
    sql.add_argument(
        "query", nargs="?", help="one statement; without it, a shell reading statements from stdin"
    )
    sql.add_argument("--db", help="results store (default: EM_DB, else the local DuckLake under data/)")
    sql.add_argument("--snapshot", type=int, help="read as of this DuckLake snapshot (the past)")
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument("--max-rows", type=int, default=50)
    sql.set_defaults(func=cmd_sql)
    figs = sub.add_parser("figures", help="redraw the report figures from a DuckLake snapshot")
    figs.add_argument(
        "--snapshot", type=int, required=True, help="the snapshot, e.g. a recorded source_snapshot"
    )
    figs.add_argument("--out", required=True, help="folder for the PNG files")
    figs.add_argument("--db", help="results store (default: EM_DB)")
    figs.set_defaults(func=cmd_figures)
    mig = sub.add_parser("migrate", help="copy a DuckDB results file into the configured store (EM_DB)")
    mig.add_argument("--from", dest="source", required=True, help="the DuckDB file, e.g. data/results.duckdb")
    mig.add_argument("--db", help="target store (default: EM_DB)")
    mig.set_defaults(func=cmd_migrate)
    add = sub.add_parser("add-model", help="add a base model (Hugging Face id or local path) to the grid")
    add.add_argument("source")
    add.add_argument("--name", help="grid name (default: derived from the source)")
    add.add_argument("--revision", help="hub commit to pin")
    add.add_argument("--trust-remote-code", action="store_true")
    add.add_argument("--grid", help="grid file (default: EM_GRID or data/grid.yaml)")
    add.add_argument("--profile", help="profile (default: EM_PROFILE or demo)")
    add.set_defaults(func=cmd_add_model)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
