"""The demo console: one line per run with what its steps counted and its time (and one per failed step), fed
by a real run's events; the rest of the output (Dagster's event log, warnings, child processes) lands in the log
file instead."""

import io
import os
import subprocess
import sys
import uuid

import dagster as dg
from support.children import holding, not_utf8_env
from support.paths import REPO

from em_assets.cli.progress import ProgressConsole, output_to_log


@dg.asset
def scored(context: dg.AssetExecutionContext) -> None:
    for done in (4, 8):
        context.log.info(f"org: judged {done}/8 (chunk of 4)")
    # A second phase of the same step counts too.
    context.log.info("org: judged 3/3 hand-rated answers")


@dg.asset(deps=[scored])
def quiet() -> None:
    pass


@dg.asset(deps=[quiet])
def broken() -> None:
    raise ValueError("nope")


def test_a_run_gets_one_line_with_its_counts_and_a_failed_step_one_of_its_own():
    out = io.StringIO()
    console = ProgressConsole(out, "org-key")
    job = dg.Definitions(assets=[scored, quiet, broken], jobs=[dg.define_asset_job("j")]).resolve_job_def("j")
    run_id = str(uuid.uuid4())
    with dg.instance_for_test() as instance:
        instance.add_event_listener(run_id, console)
        result = job.execute_in_process(instance=instance, run_id=run_id, raise_on_error=False)
    assert not result.success
    console.finish()
    lines = out.getvalue().splitlines()
    # The failed step gets its line when it fails; the run's line closes it: two steps done, 8 + 3 judged.
    assert [line.split()[:2] for line in lines] == [["FAILED", "broken"], ["ok", "org-key"]]
    assert "org-key" in lines[0]
    assert lines[1].split()[2:6] == ["2", "steps", "judged", "11"] and lines[1].rstrip().endswith("s")
    assert console.failed == ["broken"]
    console.finish()
    assert len(out.getvalue().splitlines()) == 2


def _console_lines(assets) -> list[str]:
    """The console lines of one run of `assets` under the partition name "org-key"."""
    out = io.StringIO()
    console = ProgressConsole(out, "org-key")
    job = dg.Definitions(assets=assets, jobs=[dg.define_asset_job("j")]).resolve_job_def("j")
    run_id = str(uuid.uuid4())
    with dg.instance_for_test() as instance:
        instance.add_event_listener(run_id, console)
        job.execute_in_process(instance=instance, run_id=run_id)
    console.finish()
    return out.getvalue().splitlines()


def test_off_a_terminal_a_long_step_writes_its_progress_as_lines_of_their_own(monkeypatch):
    from em_assets.cli import progress

    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0)
    lines = _console_lines([scored])
    beats = [line for line in lines if line.startswith("..")]
    assert [b.split()[1] for b in beats] == ["scored"] * 4
    assert ["judged 4/8" in b for b in beats] == [False, True, False, False]
    assert "judged 8/8" in beats[2] and "judged 3/3" in beats[3] and "org-key" in beats[1]
    assert lines[-1].split()[:2] == ["ok", "org-key"] and len(lines) == 5


def test_output_goes_to_the_log_file_and_the_console_stays_clean(tmp_path, capfd):
    log = tmp_path / "logs" / "demo.log"
    with output_to_log(log) as console:
        print("dagster event noise")
        print("a library warning", file=sys.stderr)
        os.write(2, b"C-level write\n")
        subprocess.run([sys.executable, "-c", "import sys; print('worker bar', file=sys.stderr)"], check=True)
        console.write("progress line\n")
    captured = capfd.readouterr()
    assert captured.out == "progress line\n" and captured.err == ""
    text = log.read_text()
    assert all(m in text for m in ("dagster event noise", "a library warning", "C-level write", "worker bar"))
    print("after")
    assert capfd.readouterr().out == "after\n"


def test_runs_given_one_width_keep_their_columns_aligned_whatever_their_names():
    out = io.StringIO()
    job = dg.Definitions(assets=[scored], jobs=[dg.define_asset_job("j")]).resolve_job_def("j")
    names = ["catalog", "llama-3.1-8b--risky-financial-advice--s0"]
    with dg.instance_for_test() as instance:
        for name in names:
            console, run_id = ProgressConsole(out, name, max(map(len, names))), str(uuid.uuid4())
            instance.add_event_listener(run_id, console)
            job.execute_in_process(instance=instance, run_id=run_id)
            console.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and len({line.index("1 step") for line in lines}) == 1, lines


def test_the_demo_gives_every_run_the_width_of_its_longest_name(monkeypatch):
    from em_assets.cli import demo

    runs = []
    monkeypatch.setattr(
        demo, "_run_job", lambda instance, job, key, console, width: runs.append((key, width))
    )
    keys = ["tiny--base--s0", "llama-3.1-8b--risky-financial-advice--s0"]
    with dg.instance_for_test() as instance:
        monkeypatch.setattr(demo, "local_instance", lambda: instance)
        demo.run_pipeline(io.StringIO(), keys)
    # The catalog, each organism, the reports: all as wide as the longest key.
    assert runs == [(None, 40), (keys[0], 40), (keys[1], 40), (None, 40)]


@dg.asset(
    check_specs=[
        dg.AssetCheckSpec("holds_rows", asset="checked"),
        dg.AssetCheckSpec("enough_rows", asset="checked"),
    ]
)
def checked() -> dg.MaterializeResult:
    return dg.MaterializeResult(
        check_results=[
            dg.AssetCheckResult(check_name="holds_rows", passed=True),
            dg.AssetCheckResult(
                check_name="enough_rows",
                passed=False,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"result": "3 rows, 4 needed"},
            ),
        ]
    )


def test_a_run_line_counts_its_checks_and_a_check_that_did_not_pass_gets_a_line():
    lines = _console_lines([checked])
    assert len(lines) == 2 and "checks 1/2" in lines[0]
    assert lines[1].split()[:4] == ["warn", "org-key", "check", "enough_rows:"]
    assert lines[1].endswith("3 rows, 4 needed")


def test_a_step_waiting_on_a_results_file_another_process_holds_says_so_on_the_console(tmp_path):
    """Regression: the store's lock-wait warning reached only the log file, so a demo held up for as long as
    EM_DB_LOCK_TIMEOUT (10 minutes by default) by a `duckdb` shell showed nothing on its console."""
    import polars as pl
    import yaml

    from em_assets.results.store import Store

    path = tmp_path / "r.duckdb"
    Store(path).init()

    @dg.asset
    def losses() -> None:
        Store(path, lock_timeout_s=30).append_rows(
            "training_losses", pl.DataFrame({"organism": ["a"], "step": [1], "loss": [1.0]})
        )

    # The shipped instance settings route the em_assets loggers into the run's event log.
    shipped = yaml.safe_load((REPO / "dagster.yaml").read_text())["python_logs"]
    out = io.StringIO()
    console = ProgressConsole(out, "org-key")
    job = dg.Definitions(assets=[losses], jobs=[dg.define_asset_job("j")]).resolve_job_def("j")
    run_id = str(uuid.uuid4())
    with dg.instance_for_test(overrides={"python_logs": shipped}) as instance:
        instance.add_event_listener(run_id, console)
        # A raw read-only connection (a `duckdb` shell) in another process, held past the store's WARN_AFTER_S.
        code = (
            f"import duckdb, time; c = duckdb.connect({str(path)!r}, read_only=True); "
            "print('held', flush=True); time.sleep(5)"
        )
        holder = holding(code)
        job.execute_in_process(instance=instance, run_id=run_id)
    console.finish()
    assert holder.wait(timeout=10) == 0
    wait, done = out.getvalue().splitlines()
    assert wait.split()[:3] == ["wait", "org-key", "losses:"], wait
    assert "r.duckdb is locked by" in wait and f"(PID {holder.pid})" in wait, wait
    assert done.split()[:2] == ["ok", "org-key"]


def test_under_a_locale_that_is_not_utf8_the_console_and_the_log_take_any_text(tmp_path):
    # A failed check's reason, a worker's output or a traceback may hold any text: console and log take it.
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from em_assets.cli import encodable_stdout\n"
        "from em_assets.cli.progress import output_to_log\n"
        "encodable_stdout()\n"
        "with output_to_log(Path(sys.argv[1])) as console:\n"
        "    console.write('FAILED check: \\u2713 \\u00e9\\n')\n"
        "    print('worker: \\u4e2d\\u6587 \\U0001f600')\n"
        "from em_assets.cli.demo import _log_traceback\n"
        "try:\n"
        "    raise ValueError('no file at /home/\\u4e2d')\n"
        "except ValueError:\n"
        "    _log_traceback(Path(sys.argv[1]))\n"
    )
    log = tmp_path / "demo.log"
    done = subprocess.run(
        [sys.executable, "-c", code, str(log)], env=not_utf8_env(), capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.decode("utf-8") == "FAILED check: ✓ é\n"
    text = log.read_text(encoding="utf-8")
    assert text.startswith("worker: 中文 😀\n") and text.endswith("ValueError: no file at /home/中\n")
