#!/usr/bin/env bash
# Runs the whole test suite: unit and property tests of every crate and the
# end-to-end tests that drive the real binary through a real FUSE mount.
# Builds once (release) and every test reuses that build.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export FLR_BIN="$PWD/target/release/flr"
cargo test --release --workspace --no-fail-fast -- --test-threads=2
