#!/usr/bin/env bash
# Installs Debian's PostgreSQL server binaries for the distributed-store test (tests/test_lake_postgres.py),
# which starts its own throwaway server (initdb + pg_ctl on 127.0.0.1, a temporary data directory) as the
# unprivileged `postgres` user. Idempotent and quiet: does nothing when initdb is already there.
set -euo pipefail

if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq postgresql >/dev/null

if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    echo "install-postgres.sh: apt-get finished but no /usr/lib/postgresql/*/bin/initdb" >&2
    exit 1
fi
ls -d /usr/lib/postgresql/*/bin/initdb
