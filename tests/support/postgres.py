"""A throwaway PostgreSQL server on loopback for the distributed-store tests (Debian's binaries)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

USER = "em"


def pg_bin() -> Path | None:
    """The newest installed server's bin directory (scripts/install-postgres.sh installs one)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI runs as root, so the server runs as Debian's `postgres` user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_server(password: str | None = None) -> Iterator[str]:
    """Start initdb + pg_ctl on 127.0.0.1 at a free port; yield a libpq conninfo (without `password`, which a
    login over TCP then needs); stop and delete at exit."""
    bindir = pg_bin()
    assert bindir, "no PostgreSQL server binaries: run scripts/install-postgres.sh"
    root = Path(tempfile.mkdtemp(prefix="em-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, port = root / "data", _free_port()
    quiet = {"check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    auth = ["--auth=trust"]
    if password is not None:
        (root / "pw").write_text(password + "\n")
        if os.geteuid() == 0:
            os.chown(root / "pw", owner.pw_uid, owner.pw_gid)
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={root / 'pw'}"]
    subprocess.run(_as_owner([str(bindir / "initdb"), "-D", str(data), "-U", USER, *auth]), **quiet)
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off"
    start = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", opts, "-w", "start"]
    subprocess.run(_as_owner(start), **quiet)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)]).returncode:
            assert time.monotonic() < deadline, (root / "log").read_text()
            time.sleep(0.2)
        yield f"dbname=postgres host=127.0.0.1 port={port} user={USER}"
    finally:
        subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]), **quiet)
        shutil.rmtree(root, ignore_errors=True)
