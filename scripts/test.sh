#!/usr/bin/env bash
# Runs the whole test suite: unit and property tests of every crate and the
# end-to-end tests that drive the real binary through a real FUSE mount.
# Builds once (release) and every test reuses that build; checks
# formatting and clippy's lints; replays the fuzz corpora (fuzz-checks).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export FLR_BIN="$PWD/target/release/flr"
status=0
# Lints, as CI gates on them; a failure fails the run but the tests still
# run. Clippy uses the release profile setup.sh built with, so build
# scripts and their outputs (zstd's C library) are not redone.
cargo fmt --all --check || status=$?
cargo clippy --release --workspace --all-targets -- -D warnings || status=$?
cargo test --release --workspace --no-fail-fast -- --test-threads=2 || status=$?

# The whole workspace must compile for Windows (the WinFsp adapter in
# backends, the flr binary and daemon in mountd; the end-to-end tests are
# Unix only and compile empty there). It is type-checked, not run: there
# is no Windows here. zstd-sys needs mingw's C compiler.
if rustup target add x86_64-pc-windows-gnu >/dev/null 2>&1 &&
    { dpkg -s gcc-mingw-w64-x86-64 >/dev/null 2>&1 ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-mingw-w64-x86-64 >/dev/null; }; then
    RUSTFLAGS="-D warnings" cargo check --workspace --target x86_64-pc-windows-gnu || status=$?
else
    echo "test: skipped the Windows compile check: the target or mingw could not be installed" >&2
fi
exit $status
