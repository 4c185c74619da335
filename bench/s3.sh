#!/usr/bin/env bash
# S3 benchmark: flr on S3, flr on a local directory and restic on S3, on the
# SQLite dataset of bench/gen_db.py, against one local s3s-fs server on a free
# loopback port (behind bench/s3proxy.py, which counts the requests), in one
# run. Written to bench/results/<date>-s3.md (and printed).
#
# Usage (as root: it drops the page cache and mounts FUSE filesystems):
#   bench/s3.sh
# Environment:
#   BENCH_SIZE_MB=1024      size of the SQLite database (MiB); 64 for a quick run
#   BENCH_SEED=20261101     dataset seed (same seed and size -> same bytes)
#   BENCH_FIO_RUNTIME=15    cap in seconds of each fio run
#   BENCH_ROUNDS=3          rounds of flr's backups, alternating S3 and local
#                           (the median is reported, with every round)
#   BENCH_WORK=/var/tmp/flr-s3bench
#                           work directory: dataset, server storage, repositories,
#                           mounts, caches, logs (WORK/logs); the dataset is kept
#                           for the next run, the rest is made afresh
#   BENCH_OUT=FILE          report path; default bench/results/<date>-s3.md, or
#                           <date>-s3-<size>mb.md for another size
#   BENCH_SKIP_INSTALL=1    do not apt-get install the tools
#   BENCH_SKIP_BUILD=1      use target/release/flr as it is, do not build
#   FLR_S3S_FS=PATH         the s3s-fs binary (default: where scripts/setup.sh
#                           installs it, /var/cache/flr-tools/s3s-fs-0.14.1)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"
ROOT=$(dirname "$HERE")
SIZE_MB=${BENCH_SIZE_MB:-1024}
SEED=${BENCH_SEED:-20261101}
FIO_RUNTIME=${BENCH_FIO_RUNTIME:-15}
ROUNDS=${BENCH_ROUNDS:-3}
WORK=${BENCH_WORK:-/var/tmp/flr-s3bench}
DATE=$(date -u +%F)
S3S_FS=${FLR_S3S_FS:-/var/cache/flr-tools/s3s-fs-0.14.1/bin/s3s-fs}
if [[ -n "${BENCH_OUT:-}" ]]; then
    OUT=$BENCH_OUT
elif [[ "$SIZE_MB" == 1024 ]]; then
    OUT=$HERE/results/$DATE-s3.md
else
    OUT=$HERE/results/$DATE-s3-${SIZE_MB}mb.md
fi

say() { printf '[s3.sh %s] %s\n' "$(date +%T)" "$*" >&2; }

if [[ $(id -u) != 0 ]]; then
    say "warning: not root: the page cache cannot be dropped and FUSE mounts may fail"
fi
mkdir -p "$WORK/run" "$WORK/logs" "$WORK/mnt" "$HERE/results"

# The driver stops the server, the proxy and the mounts itself; this trap ends
# whatever it recorded if it dies first.
DRIVER_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$DRIVER_PID" ]] && kill -0 "$DRIVER_PID" 2>/dev/null; then
        kill -TERM "$DRIVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$DRIVER_PID" 2>/dev/null || break; sleep 0.2; done
    fi
    bench_end_started "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- tools
need_pkgs=()
declare -A pkg_of=([restic]=restic [fio]=fio [fusermount3]=fuse3 [zstd]=zstd)
for cmd in "${!pkg_of[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || need_pkgs+=("${pkg_of[$cmd]}")
done
if [[ ${#need_pkgs[@]} -gt 0 && -z "${BENCH_SKIP_INSTALL:-}" ]]; then
    say "installing: ${need_pkgs[*]} (waits for a running apt/dpkg to release its lock)"
    bench_apt_install "$WORK/logs/apt.log" "${need_pkgs[@]}" \
        || { say "apt-get install failed, see $WORK/logs/apt.log"; exit 1; }
fi
[[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || say "warning: /dev/fuse missing: mounts will fail"
if [[ ! -x "$S3S_FS" ]]; then
    say "no s3s-fs at $S3S_FS: run scripts/setup.sh (it installs s3s-fs 0.14.1 there), or set FLR_S3S_FS"
    exit 1
fi

# --- flr
FLR=$ROOT/target/release/flr
if [[ -z "${BENCH_SKIP_BUILD:-}" ]]; then
    say "cargo build --release -p mountd (log: $WORK/logs/build.log)"
    (cd "$ROOT" && nice cargo build --release -p mountd) > "$WORK/logs/build.log" 2>&1 \
        || { say "flr build failed, see $WORK/logs/build.log"; exit 1; }
fi
[[ -x "$FLR" ]] || { say "no binary at $FLR"; exit 1; }

# --- dataset
say "dataset: ${SIZE_MB} MiB, seed $SEED (reused when the checksums match)"
python3 "$HERE/gen_db.py" --size-mb "$SIZE_MB" --seed "$SEED" --out "$WORK/data" > "$WORK/logs/gen_db.json"

# --- measurements
say "measuring (log lines below; tool output in $WORK/logs/)"
# in the background and waited for, so that a signal reaches the trap at once
python3 "$HERE/s3bench.py" --work "$WORK" --flr "$FLR" --flr-rev "$(bench_flr_rev "$ROOT")" \
    --s3s-fs "$S3S_FS" --size-mb "$SIZE_MB" --fio-runtime "$FIO_RUNTIME" --rounds "$ROUNDS" --date "$DATE" --out "$OUT" &
DRIVER_PID=$!
rc=0
wait "$DRIVER_PID" || rc=$?
DRIVER_PID=""
if [[ $rc != 0 ]]; then
    say "the measuring driver failed (exit $rc)"
    exit "$rc"
fi
say "report written to $OUT"
