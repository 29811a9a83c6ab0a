"""`em-assets` command line: run the demo, query results read-only, add a base model to the grid."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import polars as pl


def _instance():
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        home = Path(".dagster_home").resolve()
        home.mkdir(exist_ok=True)
        os.environ["DAGSTER_HOME"] = str(home)
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
    from em_assets.store import Store

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


def cmd_sql(args: argparse.Namespace) -> int:
    from em_assets.store import Store

    store = Store(args.db) if args.db else Store()
    if not store.path.exists():
        print(f"no results database at {store.path}", file=sys.stderr)
        return 2
    with store.connect(read_only=True) as conn:
        df = conn.execute(args.query).pl()
    if args.format == "csv":
        sys.stdout.write(df.write_csv())
    elif args.format == "json":
        sys.stdout.write(df.write_json() + "\n")
    else:
        with pl.Config(tbl_rows=args.max_rows, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
            print(df)
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
    sql.add_argument("query")
    sql.add_argument("--db", help="database file (default: EM_DB or data/results.duckdb)")
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument("--max-rows", type=int, default=50)
    sql.set_defaults(func=cmd_sql)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
