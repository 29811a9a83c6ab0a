#!/usr/bin/env bash
# Installs Debian's Chromium for the browser test (tests/pipeline/test_ui.py), which drives it through the Python
# `playwright` package with executable_path=/usr/bin/chromium (playwright's own browser download needs the
# internet). Idempotent and quiet: does nothing when /usr/bin/chromium is already there.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq chromium >/dev/null

if [ ! -x "$CHROMIUM" ]; then
    echo "install-browser.sh: apt-get finished but $CHROMIUM is missing" >&2
    exit 1
fi
"$CHROMIUM" --version
