#!/usr/bin/env bash
# Installs what flr needs on a fresh Debian machine and builds it once.
# Used by demo.sh and test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in fuse3 sqlite3 python3; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# schemathesis checks the daemon's API against its OpenAPI document.
if ! command -v schemathesis >/dev/null 2>&1; then
    echo "setup: installing schemathesis (PyPI)" >&2
    if ! python3 -m pip --version >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-pip >/dev/null
    fi
    python3 -m pip install -q schemathesis >/dev/null || python3 -m pip install -q --break-system-packages schemathesis >/dev/null
fi
if [ ! -e /dev/fuse ]; then
    echo "setup: /dev/fuse is missing: this machine cannot mount FUSE filesystems" >&2
    exit 1
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust with rustup" >&2; exit 1; }
cargo build --release --workspace --all-targets
