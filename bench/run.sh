#!/usr/bin/env bash
# flr benchmark: flr side by side with the native filesystem, restic, borg and
# casync, in one run, written to bench/results/<date>.md (and printed).
#
# Usage (as root: it drops the page cache and mounts FUSE filesystems):
#   bench/run.sh
# Environment:
#   BENCH_SIZE_MB=1024      size of the SQLite database (MiB); 64 or 128 for a quick run
#   BENCH_ONLY=all|backup|mount
#                           run a part only; `mount` reuses the repositories of an
#                           earlier backup run of the same dataset (or makes them, untimed)
#   BENCH_SEED=20261101     dataset seed (same seed and size -> same bytes)
#   BENCH_FIO_RUNTIME=15    cap in seconds of each fio run
#   BENCH_WORK=bench/work   work directory (dataset, repositories, mounts, logs)
#   BENCH_OUT=FILE          report path; default bench/results/<date>.md for the
#                           default size and a full run, else <date>-<size>mb[-part].md
#   BENCH_SKIP_INSTALL=1    do not apt-get install the tools
#   BENCH_SKIP_BUILD=1      use target/release/flr as it is, do not build
#   BENCH_PG=1              afterwards, also run bench/pg.sh (PostgreSQL on a writable
#                           session against a full restore; its own report, its own
#                           settings BENCH_PG_*, see the top of pg.sh)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"
ROOT=$(dirname "$HERE")
SIZE_MB=${BENCH_SIZE_MB:-1024}
ONLY=${BENCH_ONLY:-all}
SEED=${BENCH_SEED:-20261101}
FIO_RUNTIME=${BENCH_FIO_RUNTIME:-15}
WORK=${BENCH_WORK:-$HERE/work}
DATE=$(date +%F)

case "$ONLY" in all|backup|mount) ;; *) echo "BENCH_ONLY must be all, backup or mount" >&2; exit 2 ;; esac
if [[ -n "${BENCH_OUT:-}" ]]; then
    OUT=$BENCH_OUT
else
    name=$DATE
    [[ "$SIZE_MB" != 1024 ]] && name="$name-${SIZE_MB}mb"
    [[ "$ONLY" != all ]] && name="$name-$ONLY"
    OUT=$HERE/results/$name.md
fi

say() { printf '[run.sh %s] %s\n' "$(date +%T)" "$*" >&2; }

if [[ $(id -u) != 0 ]]; then
    say "warning: not root: the page cache cannot be dropped and FUSE mounts may fail"
fi

mkdir -p "$WORK/run" "$WORK/logs" "$WORK/mnt" "$HERE/results"

# --- cleanup: unmount what the driver mounted and end the processes it started,
# by the ids it recorded (the driver cleans up itself; this covers a crash).
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    bench_end_started "$WORK"
    exit "$rc"
}
DRIVER_PID=""
stop_driver() {
    # the measuring driver cleans up its own mounts when told to stop
    if [[ -n "$DRIVER_PID" ]] && kill -0 "$DRIVER_PID" 2>/dev/null; then
        kill -TERM "$DRIVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$DRIVER_PID" 2>/dev/null || break; sleep 0.2; done
    fi
}
trap cleanup EXIT
trap 'stop_driver; exit 130' INT
trap 'stop_driver; exit 143' TERM

# --- tools
need_pkgs=()
declare -A pkg_of=([restic]=restic [borg]=borgbackup [casync]=casync [fio]=fio [sqlite3]=sqlite3
                   [fusermount3]=fuse3 [zstd]=zstd [hyperfine]=hyperfine [/usr/bin/time]=time)
for cmd in "${!pkg_of[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || need_pkgs+=("${pkg_of[$cmd]}")
done
# borg mount needs a FUSE binding for Python
python3 -c 'import llfuse' 2>/dev/null || /usr/bin/python3 -c 'import llfuse' 2>/dev/null \
    || /usr/bin/python3 -c 'import pyfuse3' 2>/dev/null || need_pkgs+=(python3-llfuse)
if [[ ${#need_pkgs[@]} -gt 0 && -z "${BENCH_SKIP_INSTALL:-}" ]]; then
    say "installing: ${need_pkgs[*]} (waits for a running apt/dpkg to release its lock)"
    bench_apt_install "$WORK/logs/apt.log" "${need_pkgs[@]}" \
        || { say "apt-get install failed, see $WORK/logs/apt.log"; exit 1; }
fi
[[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || say "warning: /dev/fuse missing: mounts will fail"

# --- flr
FLR=$ROOT/target/release/flr
FLR_ERROR=""
if [[ -z "${BENCH_SKIP_BUILD:-}" ]]; then
    say "cargo build --release (log: $WORK/logs/build.log)"
    if ! (cd "$ROOT" && cargo build --release) > "$WORK/logs/build.log" 2>&1; then
        msg=$(grep -m1 -E '^error' "$WORK/logs/build.log" || tail -n1 "$WORK/logs/build.log")
        FLR_ERROR="flr build failed: ${msg:0:100}"
        say "$FLR_ERROR"
    fi
fi
if [[ -z "$FLR_ERROR" && ! -x "$FLR" ]]; then
    FLR_ERROR="no binary at target/release/flr"
fi
FLR_REV=$(bench_flr_rev "$ROOT")

# --- dataset
say "dataset: ${SIZE_MB} MiB, seed $SEED (reused when the checksums match)"
python3 "$HERE/gen_db.py" --size-mb "$SIZE_MB" --seed "$SEED" --out "$WORK/data" > "$WORK/logs/gen_db.json"

# --- measurements
args=(run --work "$WORK" --only "$ONLY" --size-mb "$SIZE_MB" --fio-runtime "$FIO_RUNTIME"
      --date "$DATE" --out "$OUT" --flr "$FLR" --flr-rev "$FLR_REV")
[[ -n "$FLR_ERROR" ]] && args+=(--flr-error "$FLR_ERROR")
say "measuring (log lines below; tool output in $WORK/logs/)"
# started in the background and waited for, so that a signal to this script
# is handled at once (bash runs traps only between foreground commands)
python3 "$HERE/bench.py" "${args[@]}" &
DRIVER_PID=$!
rc=0
wait "$DRIVER_PID" || rc=$?
DRIVER_PID=""
if [[ $rc != 0 ]]; then
    say "the measuring driver failed (exit $rc)"
    exit "$rc"
fi
say "report written to $OUT"

if [[ -n "${BENCH_PG:-}" ]]; then
    say "PostgreSQL: bench/pg.sh (its report goes to bench/results/<date>-pg*.md)"
    # flr is built already; BENCH_OUT names this script's report, not pg.sh's
    env -u BENCH_OUT BENCH_SKIP_BUILD=1 BENCH_WORK="$WORK" "$HERE/pg.sh" || {
        rc=$?
        say "bench/pg.sh failed (exit $rc)"
        exit "$rc"
    }
fi
