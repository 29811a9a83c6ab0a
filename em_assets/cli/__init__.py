"""`em-assets` command line: run the demo, query results read-only, add a base model to the grid, forget organisms
taken out of it.

Exit status: 0 done; 2 bad input (arguments, grid, model sources, missing files), with one message and nothing
written; 1 a SQL statement the database rejected, or an unexpected failure (traceback in the demo's log);
130 when interrupted (Ctrl-C; during `demo` SIGTERM too, which stops a run the same way); 141, quietly, when
the program reading its output stopped early (`| head`).
"""

from __future__ import annotations

import argparse
import codecs
import io
import os
import signal
import sys

from em_assets.cli.demo import cmd_demo
from em_assets.cli.errors import bad_input_message
from em_assets.cli.forget import cmd_forget
from em_assets.cli.grid import cmd_add_model, cmd_judge_agreement
from em_assets.cli.organisms import cmd_plan
from em_assets.cli.results import cmd_figures, cmd_migrate, cmd_sql
from em_assets.settings import set_openmp_wait

INTERRUPTED = "interrupted"


def _row_limit(text: str) -> int:
    """--max-rows: a positive count, or -1 for every row (0 would show no row, only an ellipsis)."""
    value = int(text) if text.lstrip("-").isdigit() else 0
    if value < 1 and value != -1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of rows or -1 (all)")
    return value


def parser() -> argparse.ArgumentParser:
    """Every subcommand with its arguments; each sets `func`, the command to run."""
    parser = argparse.ArgumentParser(prog="em-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="materialise every asset of the grid profile (EM_PROFILE, default demo)"
    )
    demo.add_argument("--organism", action="append", help="only this organism key (repeatable)")
    demo.set_defaults(
        func=cmd_demo, interrupted=f"{INTERRUPTED}: the run is marked failed and its pool slots freed"
    )
    plan = sub.add_parser(
        "plan", help="what the grid of the profile will run: each organism's kind, source and what is done"
    )
    plan.add_argument("--format", choices=["table", "json"], default="table")
    plan.set_defaults(func=cmd_plan)
    sql = sub.add_parser("sql", help="run a read-only SQL query on the results database")
    sql.add_argument(
        "query", nargs="?", help="one statement; without it, a shell reading statements from stdin"
    )
    sql.add_argument("--db", help="results store (default: EM_DB, else the local DuckLake under data/)")
    sql.add_argument("--snapshot", type=int, help="read as of this DuckLake snapshot (the past)")
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument(
        "--max-rows",
        type=_row_limit,
        default=50,
        help="rows a table shows, the first and last halves (-1: all; csv and json give every row)",
    )
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
    forget = sub.add_parser(
        "forget",
        help="delete the results of organisms taken out of the grid, their partitions, and rebuild the reports",
    )
    forget.add_argument("organism", nargs="+", help="organism key, e.g. qwen2.5-7b--bad-medical-r1--s0")
    forget.add_argument(
        "--yes", action="store_true", help="on a plain DuckDB file (no snapshots), delete for good"
    )
    forget.set_defaults(func=cmd_forget)
    agree = sub.add_parser(
        "judge-agreement", help="score reference CSVs with a judge and report its agreement with their scores"
    )
    agree.add_argument(
        "--reference",
        nargs="+",
        required=True,
        metavar="FILE",
        help="CSV with response (or answer), question, question_id, aligned, coherent",
    )
    agree.add_argument(
        "--judge",
        help="the grid's judge (default), a comparison judge by name (distilled, probe, local:<model>), or local:<source>",
    )
    agree.add_argument("--format", choices=["json", "table"], default="table")
    agree.set_defaults(
        func=cmd_judge_agreement,
        interrupted=f"{INTERRUPTED}: the judgements scored so far are kept in the judge cache, so a rerun asks "
        "only for the rest",
    )
    return parser


def encodable_stdout() -> None:
    """Stdout for any text where its encoding is not UTF-8: a terminal, or an encoding PYTHONIOENCODING chose, gets
    ASCII borders and escapes (\\u2713) for what it cannot show; a pipe or file UTF-8, as under the C locale."""
    # There a table's borders or an answer's emoji would stop a command with UnicodeEncodeError (a Latin-1
    # locale; under the C locale Python writes UTF-8).
    out, chosen = sys.stdout, os.environ.get("PYTHONIOENCODING", "")
    if not isinstance(out, io.TextIOWrapper) or codecs.lookup(out.encoding).name == "utf-8":
        return
    if out.isatty() or chosen:
        # Read by polars wherever a table sets no formatting of its own.
        os.environ["POLARS_FMT_TABLE_FORMATTING"] = "ASCII_FULL_CONDENSED"
        # An error handler named there ("latin-1:replace") is the user's.
        if ":" not in chosen:
            out.reconfigure(errors="backslashreplace")
    else:
        out.reconfigure(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    # Importing this package loads no torch, so the setting is in place when a command first does.
    set_openmp_wait()
    encodable_stdout()
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader is gone: what is left to print goes nowhere, also at exit, when Python flushes stdout again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except BaseException as exc:
        # Dagster turns SIGINT and SIGTERM inside a step into DagsterExecutionInterruptedError.
        if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "DagsterExecutionInterruptedError":
            # Only the demo starts a Dagster run; each other command says what an interruption leaves.
            print(f"[em-assets] {getattr(args, 'interrupted', INTERRUPTED)}", file=sys.stderr)
            return 128 + signal.SIGINT
        message = bad_input_message(exc) if isinstance(exc, Exception) else None
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
