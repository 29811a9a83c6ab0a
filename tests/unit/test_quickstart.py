"""A clone anywhere: the Makefile names a mirror only when there is one, and offline with no mirror the catalog
fails with one message naming the file, its URL and EM_DATA_MIRROR."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.net import free_port
from support.paths import EM_ASSETS, REPO

from em_assets.catalog.upstream import REFERENCE_JUDGEMENTS, SOURCES


def _make_mirror(clone: Path, env: dict[str, str]) -> str:
    """EM_DATA_MIRROR as the Makefile's recipes see it, in a copy of the Makefile at `clone`."""
    clone.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "Makefile", clone / "Makefile")
    done = subprocess.run(
        ["make", "-s", "--eval", 'show-mirror: ; @echo "[$$EM_DATA_MIRROR]"', "show-mirror"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()[1:-1]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_the_makefile_sets_a_mirror_only_when_there_is_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EM_DATA_MIRROR"}
    assert _make_mirror(tmp_path / "alone" / "clone", env) == ""
    (tmp_path / "beside" / "shared" / "upstream").mkdir(parents=True)
    assert _make_mirror(tmp_path / "beside" / "clone", env) == str(
        tmp_path / "beside" / "shared" / "upstream"
    )
    mine = {**env, "EM_DATA_MIRROR": "/somewhere/else"}
    assert _make_mirror(tmp_path / "beside" / "clone", mine) == "/somewhere/else"


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """No mirror, an empty cache, and every HTTPS request sent to a closed loopback port."""
    closed = f"http://127.0.0.1:{free_port()}"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"EM_DATA_MIRROR", "no_proxy", "NO_PROXY"} and not k.startswith("EM_")
    }
    return {
        **env,
        "PYTHONPATH": str(REPO),
        "https_proxy": closed,
        "HTTPS_PROXY": closed,
        "HF_HUB_OFFLINE": "1",
        "EM_CACHE_DIR": str(tmp_path / "cache"),
        "DAGSTER_HOME": str(tmp_path / "home"),
        "EM_DB": str(tmp_path / "clone" / "results.duckdb"),
        "EM_GRID": str(REPO / "data" / "grid.yaml"),
        "EM_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "EM_FIGURES_DIR": str(tmp_path / "figures"),
    }


def _names_the_file_its_url_and_the_mirror_setting(message: str, sources) -> None:
    assert message.startswith("error: could not download "), message
    assert any(s.path in message and s.url in message for s in sources), message
    assert "EM_DATA_MIRROR" in message
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1, message


def test_offline_without_a_mirror_the_catalog_names_the_file_its_url_and_em_data_mirror(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    code = (
        "import sys\n"
        "from em_assets.catalog.upstream import DownloadError, SOURCES, fetch_bytes\n"
        "try:\n"
        "    fetch_bytes(SOURCES['insecure'])\n"
        "except DownloadError as exc:\n"
        "    sys.exit(f'error: {exc}')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=clone, env=_offline_env(tmp_path), capture_output=True, text=True
    )
    assert done.returncode == 1
    _names_the_file_its_url_and_the_mirror_setting(done.stderr, [SOURCES["insecure"]])
    assert not (tmp_path / "cache" / "upstream").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_offline_without_a_mirror_the_demo_exits_2_with_that_one_message(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    done = subprocess.run(
        [EM_ASSETS, "demo"], cwd=clone, env=_offline_env(tmp_path), capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    # Whichever pinned file is asked for first (an imported organism's reference answers, checked before any run,
    # or a catalog asset's file) names itself; nothing is written.
    _names_the_file_its_url_and_the_mirror_setting(
        done.stderr, [*SOURCES.values(), *REFERENCE_JUDGEMENTS.values()]
    )
    assert "Traceback" not in done.stdout
    assert not (clone / "results.duckdb").exists(), "a results store was written"


# cp -n as coreutils 9.2 to 9.4 (Ubuntu 24.04) and BSD (macOS) have it: a skipped copy is a failure.
_STRICT_CP = """#!/bin/sh
if [ "$1" = "-n" ] && [ -e "$3" ]; then echo "cp: not replacing '$3'" >&2; exit 1; fi
exec {cp} "$@"
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("folder", ["plain/clone", "my projects/clone é"])
def test_a_second_make_demo_runs_and_keeps_the_instance_config(tmp_path, folder):
    clone = tmp_path / folder
    (clone / "scripts").mkdir(parents=True)
    shipped = ["Makefile", "dagster.yaml", "pyproject.toml", "scripts/install_smollm2.py"]
    for name in shipped:
        shutil.copy(REPO / name, clone / name)
    # A set-up already done, and an em-assets that only says it ran.
    (clone / ".venv" / "bin").mkdir(parents=True)
    (clone / ".venv" / ".demo").touch()
    (clone / ".venv" / "bin" / "em-assets").write_text('#!/bin/sh\necho ran "$@"\n')
    (clone / ".venv" / "bin" / "em-assets").chmod(0o755)
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "cp").write_text(_STRICT_CP.format(cp=shutil.which("cp")))
    (shims / "cp").chmod(0o755)
    # Run as a user's shell runs it, not as a sub-make of `make test` (which prints its directories).
    env = {
        k: v for k, v in os.environ.items() if k not in {"DAGSTER_HOME", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    }
    env["PATH"] = f"{shims}{os.pathsep}{env['PATH']}"
    settings = clone / ".dagster_home" / "dagster.yaml"
    for run in range(2):
        done = subprocess.run(
            ["make", "--no-print-directory", "demo"], cwd=clone, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith("ran demo"), done.stdout
        # Copied on the first run; a user's own instance settings stay as they are.
        assert settings.read_text() == ((REPO / "dagster.yaml").read_text() if run == 0 else "# mine\n")
        settings.write_text("# mine\n")
    # Nothing written beside the clone, nor in it but the instance's folder (a path split at a space would).
    assert [p.name for p in clone.parent.iterdir()] == [clone.name]
    assert {p.name for p in clone.iterdir()} == {
        *(Path(n).parts[0] for n in shipped),
        ".venv",
        ".dagster_home",
    }
