import subprocess
import sys
import time

import duckdb
import polars as pl
import pytest

from em_assets.store import Store


def _rows(org: str, n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"organism": [org] * n, "step": list(range(n)), "loss": [1.0] * n},
        schema_overrides={"step": pl.Int32},
    )


def test_replace_rows_touches_only_its_partition(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.init()
    store.replace_rows("training_losses", _rows("a", 3), "organism = ?", ["a"])
    store.replace_rows("training_losses", _rows("b", 2), "organism = ?", ["b"])
    store.replace_rows("training_losses", _rows("a", 1), "organism = ?", ["a"])
    counts = dict(store.query("SELECT organism, count(*) FROM training_losses GROUP BY 1").iter_rows())
    assert counts == {"a": 1, "b": 2}


def test_failed_replace_rolls_back(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.init()
    store.replace_rows("training_losses", _rows("a", 3), "organism = ?", ["a"])
    bad = _rows("a", 2).with_columns(pl.lit(None, dtype=pl.Int32).alias("step"))
    with pytest.raises(duckdb.Error):
        store.replace_rows("training_losses", bad, "organism = ?", ["a"])
    assert store.query("SELECT count(*) AS n FROM training_losses")["n"][0] == 3


def test_writer_waits_for_another_process_holding_the_lock(tmp_path):
    path = tmp_path / "r.duckdb"
    store = Store(path, lock_timeout_s=30)
    store.init()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb,time; c=duckdb.connect({str(path)!r}); print('held', flush=True); "
            "time.sleep(1.5); c.close()",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    store.append_rows("training_losses", _rows("a", 2))
    waited = time.monotonic() - start
    holder.wait(timeout=10)
    assert waited > 0.5
    assert store.query("SELECT count(*) AS n FROM training_losses")["n"][0] == 2


def test_lock_wait_is_bounded(tmp_path):
    path = tmp_path / "r.duckdb"
    Store(path).init()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb,time; c=duckdb.connect({str(path)!r}); print('held', flush=True); time.sleep(5)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(duckdb.IOException):
            Store(path, lock_timeout_s=0.5).append_rows("training_losses", _rows("a", 1))
    finally:
        holder.kill()
        holder.wait()
