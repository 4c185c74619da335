#!/usr/bin/env bash
# Installs what flr needs on a fresh Debian machine and builds it once.
# Used by demo.sh and test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# libnfs-utils: this kernel has no NFS client, so the NFS export's tests
# and benchmark use libnfs's userspace tools (nfs-ls, nfs-cat, nfs-cp).
for pkg in fuse3 sqlite3 python3 libnfs-utils; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# The PostgreSQL end-to-end tests and bench/pg.sh run PostgreSQL 15's own
# programs (initdb, pg_ctl, pgbench, pg_basebackup) from this directory.
[ -x /usr/lib/postgresql/15/bin/pg_ctl ] || need+=(postgresql-15)
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
# pjdfstest switches between root, nobody and a second unprivileged user
# with a group of its own name (tests/src/pjdfstest.rs names it).
if ! id flrtest >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin flrtest
fi
# The peer test suites of the writable mount, built from crates.io into
# target/tools (about 40 s each on two idle cores). Pinned: the tests'
# list of known pjdfstest failures names the cases of this version
# (tests/src/tools.rs).
tools="${CARGO_TARGET_DIR:-target}/tools"
for tool in fsx@0.3.2 pjdfstest@0.2.2; do
    name=${tool%@*} version=${tool#*@}
    if [ "$("$tools/bin/$name" --version 2>/dev/null)" != "$name $version" ]; then
        echo "setup: installing $name $version (crates.io) into $tools" >&2
        cargo install --quiet --locked --force --root "$tools" "$name" --version "$version"
    fi
done
# The S3 server the S3 tests run (a file-backed S3
# engine). Its build takes about ten minutes on two busy cores, so it is
# cached outside the checkout, keyed by version; newer versions need a
# newer compiler than ours.
s3s_fs_version=0.14.1
s3s_fs_root=/var/cache/flr-tools/s3s-fs-$s3s_fs_version
if [ ! -x "$s3s_fs_root/bin/s3s-fs" ]; then
    echo "setup: installing s3s-fs $s3s_fs_version (crates.io) into $s3s_fs_root" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO mkdir -p "$s3s_fs_root"
    $SUDO cargo install --quiet --locked --root "$s3s_fs_root" s3s-fs \
        --version "$s3s_fs_version" --features binary
fi
cargo build --release --workspace --all-targets
