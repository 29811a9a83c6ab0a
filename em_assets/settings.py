"""Settings from the environment, read here and nowhere else; every other module takes them as arguments."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

GRID_ENV = "EM_GRID"
PROFILE_ENV = "EM_PROFILE"
DB_ENV = "EM_DB"
DB_DATA_PATH_ENV = "EM_DB_DATA_PATH"
LOCK_TIMEOUT_ENV = "EM_DB_LOCK_TIMEOUT"
MIRROR_ENV = "EM_DATA_MIRROR"
CACHE_ENV = "EM_CACHE_DIR"
ARTIFACTS_ENV = "EM_ARTIFACTS_DIR"
FIGURES_ENV = "EM_FIGURES_DIR"
LOGS_ENV = "EM_LOGS_DIR"
DEVICE_ENV = "EM_DEVICE"
PACKED_LINEARS_ENV = "EM_PACKED_LINEARS"
CPU_DTYPE_ENV = "EM_CPU_DTYPE"
DAGSTER_HOME_ENV = "DAGSTER_HOME"
# Where huggingface_hub keeps downloaded models (read by that library, named here for the deployment).
HF_HOME_ENV = "HF_HOME"


class SettingsError(ValueError):
    """An environment variable the project reads holds a value it cannot use."""


def _seconds(env: Mapping[str, str], name: str, fallback: float) -> float:
    text = env.get(name) or ""
    try:
        value = float(text) if text else fallback
    except ValueError:
        raise SettingsError(f"{name}={text!r}: give a number of seconds, e.g. 600") from None
    if value < 0:
        raise SettingsError(f"{name}={text!r}: give a number of seconds, e.g. 600")
    return value


def _device(env: Mapping[str, str], fallback: str) -> str:
    text = env.get(DEVICE_ENV) or fallback
    # Checked here, not when torch first meets it in a step: a typo fails before anything runs.
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise SettingsError(f"{DEVICE_ENV}={text!r}: give auto, cpu, cuda, cuda:<index> or mps")
    return text


# libgomp's spin (in iterations) before an idle OpenMP thread sleeps, where the user set no wait policy. Waking
# a sleeping thread costs more than a small matmul, so sleeping at once (OMP_WAIT_POLICY=PASSIVE) slows
# small-batch decoding (docs/cpu.md). This project runs one multi-threaded process at a time (sampling and
# training workers get one thread each), and a short spin gives the core up soon to another process.
OPENMP_SPIN = "10000"
OPENMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_openmp_wait(env: MutableMapping[str, str] | None = None) -> str:
    """The bounded spin unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set; returns the setting in force. OpenMP
    reads it once, when torch first loads, so entry points call this before importing torch."""
    env = os.environ if env is None else env
    if not any(env.get(name) for name in OPENMP_WAIT_VARS):
        env["GOMP_SPINCOUNT"] = OPENMP_SPIN
    return openmp_wait(env)


def openmp_wait(env: Mapping[str, str] | None = None) -> str:
    """The OpenMP wait setting in the environment, e.g. "GOMP_SPINCOUNT=10000"; "default" where none is set."""
    env = os.environ if env is None else env
    return " ".join(f"{name}={env[name]}" for name in OPENMP_WAIT_VARS if env.get(name)) or "default"


# The values each switch takes, its default first.
PACKED_CHOICES = ("1", "0")
CPU_DTYPES = ("auto", "bfloat16", "float32")


def _one_of(env: Mapping[str, str], name: str, allowed: tuple[str, ...], say: str) -> str:
    """The variable's value, the first of `allowed` when unset; refused unless it is one of them (a "false" read
    as anything but "0" would leave a switch on, the opposite of what was asked)."""
    text = env.get(name) or allowed[0]
    if text not in allowed:
        raise SettingsError(f"{name}={text!r}: give {say}")
    return text


def torch_device(device: str) -> str | None:
    """The device models load on for a device setting; None for "auto", picked for the machine (cuda > mps >
    cpu)."""
    return None if device == "auto" else device


@dataclass(frozen=True)
class Settings:
    """Where the grid, results, caches and artifacts live, and which device to compute on."""

    grid_path: Path = Path("data/grid.yaml")
    profile: str = "demo"
    # A local DuckLake by default (snapshots, concurrent writers); a plain DuckDB file is any other path.
    # A string, not a Path: a PostgreSQL catalog's URI (postgresql://...) must keep its double slash.
    database: str = "ducklake:sqlite:data/results.sqlite"
    # A DuckLake's Parquet folder (or s3:// prefix); needed with a PostgreSQL catalog, else beside the catalog.
    db_data_path: str | None = None
    # A reader holding the database file (e.g. a `duckdb` shell) pauses writers; they wait this long.
    lock_timeout_s: float = 600.0
    data_mirror: str | None = None
    cache_dir: Path = Path("data/cache")
    artifacts_dir: Path = Path("data/artifacts")
    figures_dir: Path = Path("data/figures")
    # The demo's full log (Dagster events, library warnings, worker output) goes here, one file per run.
    logs_dir: Path = Path("data/logs")
    calibration_path: Path = Path("data/judge_calibration.yaml")
    device: str = "auto"
    # Linear layers on a CPU run on weights packed once per inference loop (models/packed.py); "0" turns
    # it off, should a CPU or torch build compute them wrongly.
    packed_linears: bool = True
    # What models compute in on a CPU: "auto" is bf16 where the CPU multiplies bf16 natively, else fp32
    # (models/load.py).
    cpu_dtype: str = "auto"
    dagster_home: Path = Path(".dagster_home")

    @property
    def torch_device(self) -> str | None:
        return torch_device(self.device)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        default = cls()

        def path(name: str, fallback: Path) -> Path:
            return Path(env[name]) if env.get(name) else fallback

        packed = _one_of(env, PACKED_LINEARS_ENV, PACKED_CHOICES, "0 (off) or 1 (on, the default)")
        return cls(
            grid_path=path(GRID_ENV, default.grid_path),
            profile=env.get(PROFILE_ENV) or default.profile,
            database=env.get(DB_ENV) or default.database,
            db_data_path=env.get(DB_DATA_PATH_ENV) or default.db_data_path,
            lock_timeout_s=_seconds(env, LOCK_TIMEOUT_ENV, default.lock_timeout_s),
            data_mirror=env.get(MIRROR_ENV) or None,
            cache_dir=path(CACHE_ENV, default.cache_dir),
            artifacts_dir=path(ARTIFACTS_ENV, default.artifacts_dir),
            figures_dir=path(FIGURES_ENV, default.figures_dir),
            logs_dir=path(LOGS_ENV, default.logs_dir),
            device=_device(env, default.device),
            packed_linears=packed == "1",
            cpu_dtype=_one_of(env, CPU_DTYPE_ENV, CPU_DTYPES, "auto, bfloat16 or float32"),
            dagster_home=path(DAGSTER_HOME_ENV, default.dagster_home),
        )


def settings() -> Settings:
    """The settings in force now (the environment is read on each call, so tests may change it)."""
    return Settings.from_env()


def secret(name: str) -> str | None:
    """A secret (an API key) from the environment variable the grid names; never stored or logged."""
    return os.environ.get(name) or None
