#!/usr/bin/env bash
# Runs one fuzz target under libFuzzer, on stable Rust:
#
#   fuzz/run.sh TARGET [SECONDS]     (default 600; targets: fuzz/fuzz_targets/)
#
# Installs the pinned cargo-fuzz into target/tools if missing, builds the
# target (release, debug assertions on, no sanitizer: `-s none` needs no
# nightly flags), fuzzes from the committed corpus fuzz/corpus/TARGET for
# SECONDS at the lowest priority in one process, then merges what it found
# back into that corpus, minimized. Crashes land in fuzz/artifacts/TARGET/
# (rerun one: fuzz/run.sh TARGET 0 with FUZZ_INPUT=path). The final stats
# are in fuzz/work/TARGET.log.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: fuzz/run.sh TARGET [SECONDS]}
seconds=${2:-600}
tools="$PWD/target/tools"
version=0.13.2
if [ "$("$tools/bin/cargo-fuzz" --version 2>/dev/null)" != "cargo-fuzz $version" ]; then
    echo "fuzz: installing cargo-fuzz $version (crates.io) into $tools" >&2
    cargo install --quiet --locked --force --root "$tools" cargo-fuzz --version "$version"
fi
export PATH="$tools/bin:$PATH"
corpus="$PWD/fuzz/corpus/$target"
work="$PWD/fuzz/work/$target"
artifacts="$PWD/fuzz/artifacts/$target"
mkdir -p "$corpus" "$work/new" "$artifacts"
if [ -z "$(ls -A "$corpus")" ]; then
    cargo run --quiet --release -p flr-fuzz-checks --bin fuzz-seeds -- "$work/seeds"
    cp "$work/seeds/$target"/* "$corpus"/
fi
# Hangs: one input may take 10 s; memory: the harness bounds what a decode
# allocates, this only stops a runaway before the machine does.
flags=(-timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "-artifact_prefix=$artifacts/")
run() { (cd fuzz && nice -n 19 cargo fuzz run -s none -O -a "$target" "$@"); }
if [ -n "${FUZZ_INPUT:-}" ]; then
    run "$FUZZ_INPUT" -- "${flags[@]}"
    exit
fi
set +e
run "$work/new" "$corpus" -- "${flags[@]}" -max_total_time="$seconds" 2>&1 |
    tee "$work.log" | grep -a -E '^#[0-9]+.*(pulse|DONE)|^stat::|ERROR|panicked|SUMMARY'
status=${PIPESTATUS[0]}
set -e
# Merge: the smallest set of inputs keeping every feature, as the corpus.
rm -rf "$work/min" && mkdir -p "$work/min"
run "$work/min" "$corpus" "$work/new" -- -merge=1 "${flags[@]}" >"$work.merge.log" 2>&1
rm -rf "$corpus" && mv "$work/min" "$corpus" && rm -rf "$work/new"
echo "fuzz: $target: $(ls "$corpus" | wc -l) corpus files, $(du -sh "$corpus" | cut -f1)"
exit "$status"
