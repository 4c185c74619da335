#!/usr/bin/env bash
# PostgreSQL on flr: how soon a backed-up cluster answers, and how fast it
# then serves, through a writable session (`flr mount --writable`) against
# the classic way (full `flr restore` to disk, then start).
#
# For each size: a pgbench cluster (`pgbench -i -s N`), stopped and backed
# up with `flr backup`; then
#   1. time to first query, cold: from `flr mount --writable --background`
#      to the first answer of `SELECT count(*) FROM pgbench_branches`
#      (`pg_ctl start -w` included), against `flr restore` + `pg_ctl start
#      -w` + the same query;
#   2. `pgbench -S` (read-only) TPS on the session, warm, against the same
#      cluster on the native disk (the restored copy); then the same for
#      pgbench's default read-write mix.
# Writes bench/results/<date>-pg[-<sizes>mb].md and prints it. The
# clusters are kept in BENCH_WORK/pg/src-<size> and reused by later runs;
# the backups are made afresh by every run.
#
# Usage (as root: drops the page cache, mounts FUSE, runs PostgreSQL as the
# postgres user):
#   bench/pg.sh
# Environment:
#   BENCH_PG_SIZES_MB="1024 4096"  cluster sizes (MiB of table and index data);
#                                  e.g. "128" for a quick run
#   BENCH_PG_RUNS=3                cold runs of each time-to-first-query
#                                  measurement (the median is reported)
#   BENCH_PG_TPS_SECONDS=30        length of each pgbench run (-S, its warm-up, read-write)
#   BENCH_PG_CLIENTS=4             pgbench clients (-c; -j is min(clients, cores))
#   BENCH_WORK=bench/work          work directory; this script uses BENCH_WORK/pg
#   BENCH_OUT=FILE                 report path
#   BENCH_SKIP_INSTALL=1           do not apt-get install PostgreSQL 15
#   BENCH_SKIP_BUILD=1             use target/release/flr as it is, do not build
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
SIZES=${BENCH_PG_SIZES_MB:-1024 4096}
RUNS=${BENCH_PG_RUNS:-3}
TPS_SECONDS=${BENCH_PG_TPS_SECONDS:-30}
CLIENTS=${BENCH_PG_CLIENTS:-4}
WORK=${BENCH_WORK:-$HERE/work}/pg
DATE=$(date +%F)
FLR=$ROOT/target/release/flr
PGBIN=/usr/lib/postgresql/15/bin
# Bytes on disk per unit of pgbench scale (tables and primary keys, after
# `pgbench -i`), measured with PostgreSQL 15: -s 20 gives 336 MB in base/.
BYTES_PER_SCALE=16400000
JOB=pgbench
STARTED=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

if [[ -n "${BENCH_OUT:-}" ]]; then
    OUT=$BENCH_OUT
elif [[ "$SIZES" == "1024 4096" ]]; then
    OUT=$HERE/results/$DATE-pg.md
else
    OUT=$HERE/results/$DATE-pg-$(tr ' ' '-' <<<"$SIZES")mb.md
fi

say() { printf '[pg.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { say "$*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root: the page cache is dropped, FUSE mounted and PostgreSQL run as postgres"
for s in $SIZES; do [[ "$s" =~ ^[0-9]+$ && "$s" -ge 32 ]] || die "BENCH_PG_SIZES_MB: $s is not a size in MiB (>= 32)"; done

mkdir -p "$WORK"/{logs,mnt,run,sessions} "$HERE/results"
LOGS=$WORK/logs
STATE=$WORK/sessions

# --- what this script started, ended by the trap: servers by data
# directory, mounts by path, sessions by id.
SERVERS=()
MOUNTS=()
SESSIONS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local d m s
    for d in "${SERVERS[@]}"; do
        [[ -f "$d/postmaster.pid" ]] && as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
    done
    for m in "${MOUNTS[@]}"; do
        mountpoint -q "$m" 2>/dev/null && { fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; }
    done
    for s in "${SESSIONS[@]}"; do
        [[ -e "$STATE/$s" ]] && "$FLR" session discard "$s" --state-dir "$STATE" >/dev/null 2>&1 || true
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# PostgreSQL's server programs refuse to run as root.
as_pg() { (cd / && runuser -u postgres -- "$@"); }

# --- tools
if [[ ! -x $PGBIN/pg_ctl && -z "${BENCH_SKIP_INSTALL:-}" ]]; then
    say "installing postgresql-15 (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=1200 install -y -qq postgresql-15 >> "$LOGS/apt.log" 2>&1 ||
        { apt-get -o DPkg::Lock::Timeout=1200 update -qq >> "$LOGS/apt.log" 2>&1 &&
          apt-get -o DPkg::Lock::Timeout=1200 install -y -qq postgresql-15 >> "$LOGS/apt.log" 2>&1; } ||
        die "apt-get install postgresql-15 failed, see $LOGS/apt.log"
fi
[[ -x $PGBIN/pg_ctl ]] || die "PostgreSQL 15 is not installed ($PGBIN/pg_ctl missing)"
if [[ -z "${BENCH_SKIP_BUILD:-}" ]]; then
    say "cargo build --release -p mountd (log: $LOGS/build.log)"
    (cd "$ROOT" && cargo build --release -p mountd) > "$LOGS/build.log" 2>&1 ||
        die "build failed, see $LOGS/build.log"
fi
[[ -x $FLR ]] || die "no binary at $FLR"
WRITABLE=""
"$FLR" mount --help 2>/dev/null | grep -q -- '--writable' && WRITABLE=1
[[ -n $WRITABLE ]] || say "this flr has no 'mount --writable': the session columns will say n/a"
FLR_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
[[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | head -1)" ]] && FLR_REV="$FLR_REV, uncommitted changes"
# PostgreSQL must reach every directory it runs in.
namei -m "$WORK" | awk 'NR > 1 && $1 ~ /^d/ && substr($1, 10, 1) !~ /[xt]/ {bad = 1} END {exit bad}' ||
    die "$WORK is not reachable by the postgres user (a parent lacks o+x); set BENCH_WORK elsewhere"

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
RUN_DIR=$WORK/run
chown postgres: "$RUN_DIR"

now_ns() { date +%s%N; }
secs() { awk -v ns="$1" 'BEGIN { printf "%.2f", ns / 1e9 }'; }
median() { tr ' ' '\n' | sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }

# pg_start DATA LOG [OPTIONS]: starts a server on DATA and waits until it
# is up; OPTIONS are more `-c name=value` for this run only.
pg_start() {
    SERVERS+=("$1")
    as_pg "$PGBIN/pg_ctl" -D "$1" -l "$2" -w -t 600 \
        -o "-c port=$PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$RUN_DIR ${3:-}" start >/dev/null
}
pg_stop() { as_pg "$PGBIN/pg_ctl" -D "$1" -m fast -w -t 600 stop >/dev/null; }
psql_q() { "$PGBIN/psql" -XAtq -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -c "$1"; }
# Polls until the first query answers (pg_ctl -w returns when the server
# accepts connections; the query also reads the table through the mount).
first_query() {
    local n deadline=$(( $(now_ns) + 600 * 1000000000 ))
    until n=$(psql_q 'SELECT count(*) FROM pgbench_branches' 2>/dev/null); do
        (( $(now_ns) < deadline )) || return 1
        sleep 0.01
    done
    [[ "$n" == "$1" ]] || { say "pgbench_branches has $n rows, expected $1"; return 1; }
}
# tps LOG [ARGS]: pgbench ARGS for TPS_SECONDS; prints the TPS.
tps() {
    local log=$1 jobs=$(( CLIENTS < $(nproc) ? CLIENTS : $(nproc) ))
    shift
    "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -n "$@" -c "$CLIENTS" -j "$jobs" \
        -T "$TPS_SECONDS" postgres > "$LOGS/$log.pgbench" 2>&1 || return 1
    sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$LOGS/$log.pgbench" | tail -1
}
# The read-only mix (-S) after a warm-up run of it, then the default
# read-write mix (TPC-B-like; changes the cluster, so it comes last).
# Results in R[<size>:tps_<where>] and R[<size>:tpcb_<where>].
measure_tps() {
    local size=$1 where=$2 label="the native copy"
    [[ $where == mount ]] && label="the writable session"
    say "$size MiB: pgbench -S on $label (warm-up, then ${TPS_SECONDS} s), then the read-write mix"
    tps "$where-$size-warmup" -S >/dev/null || true
    R[$size:tps_$where]=$(tps "$where-$size" -S) || R[$size:tps_$where]="n/a (pgbench failed)"
    R[$size:tpcb_$where]=$(tps "$where-$size-rw") || R[$size:tpcb_$where]="n/a (pgbench failed)"
}

# mount_session RP MNT ID: a writable session of RP at MNT.
mount_session() {
    MOUNTS+=("$2")
    SESSIONS+=("$3")
    mkdir -p "$2"
    "$FLR" mount --repo "$REPO" --restore-point "$1" --writable --session "$3" \
        --state-dir "$STATE" --background "$2" >> "$LOGS/mount-$3.log" 2>&1
}
# end_session MNT ID: stop the server on it, unmount, and make sure the
# session is gone (the unmount discards it; discard explicitly if not).
end_session() {
    [[ -f "$1/pgdata/postmaster.pid" ]] && pg_stop "$1/pgdata"
    fusermount3 -u "$1"
    local i
    for i in $(seq 1 100); do [[ -e "$STATE/$2" ]] || break; sleep 0.1; done
    if [[ -e "$STATE/$2" ]]; then
        say "session $2 still in $STATE after the unmount; discarding it"
        "$FLR" session discard "$2" --state-dir "$STATE" >> "$LOGS/mount-$2.log" 2>&1
    fi
}

declare -A R   # results, by "<size>:<key>"
for size in $SIZES; do
    scale=$(( size * 1048576 / BYTES_PER_SCALE ))
    (( scale >= 1 )) || scale=1
    src=$WORK/src-$size
    REPO=$WORK/repo-$size
    R[$size:scale]=$scale

    # --- the cluster, reused while its scale is the same
    if [[ "$(cat "$src/made" 2>/dev/null)" != "scale=$scale" ]]; then
        say "$size MiB: initdb + pgbench -i -s $scale"
        rm -rf "$src"
        mkdir -p "$src/pgdata"
        chown postgres: "$src/pgdata"
        chmod 700 "$src/pgdata"
        as_pg "$PGBIN/initdb" -D "$src/pgdata" --auth=trust -E UTF8 --locale=C -U postgres > "$LOGS/initdb-$size.log" 2>&1
        # A small WAL budget while loading, so that the final checkpoint
        # leaves about 128 MB of WAL instead of a copy of the data.
        pg_start "$src/pgdata" "$RUN_DIR/server-src-$size.log" "-c max_wal_size=128MB -c min_wal_size=32MB"
        "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -q -s "$scale" postgres > "$LOGS/pgbench-init-$size.log" 2>&1
        psql_q 'CHECKPOINT' >/dev/null
        pg_stop "$src/pgdata"
        echo "scale=$scale" > "$src/made"
    fi
    R[$size:bytes]=$(du -sb "$src/pgdata" | cut -f1)
    R[$size:base]=$(du -sb "$src/pgdata/base" | cut -f1)

    # --- the backup, made afresh by the flr under test
    rm -rf "$REPO"
    "$FLR" init "$REPO" > "$LOGS/init-$size.log" 2>&1
    drop_caches
    t0=$(now_ns)
    "$FLR" backup --repo "$REPO" --job "$JOB" --json "$src/pgdata" > "$LOGS/backup-$size.json" 2> "$LOGS/backup-$size.err"
    t1=$(now_ns)
    RP=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["restore_point"])' < "$LOGS/backup-$size.json")
    R[$size:backup_s]=$(secs $((t1 - t0)))
    R[$size:stored]=$(du -sb "$REPO" | cut -f1)
    say "$size MiB: scale $scale, $(mib "${R[$size:bytes]}") MiB on disk, restore point $RP"

    # --- full restore + start + first query, cold
    restored=$WORK/restored-$size
    totals=() restores=()
    for run in $(seq 1 "$RUNS"); do
        rm -rf "$restored"
        drop_caches
        t0=$(now_ns)
        "$FLR" restore --repo "$REPO" "$RP" --to "$restored" --quiet >> "$LOGS/restore-$size.log" 2>&1
        t1=$(now_ns)
        pg_start "$restored/pgdata" "$RUN_DIR/server-restored-$size.log"
        first_query "$scale"
        t2=$(now_ns)
        restores+=($((t1 - t0)))
        totals+=($((t2 - t0)))
        say "$size MiB: restore + first query run $run: $(secs $((t2 - t0))) s (restore $(secs $((t1 - t0))) s)"
        [[ $run == "$RUNS" ]] || pg_stop "$restored/pgdata"
    done
    R[$size:restore_total]=$(secs "$(median <<<"${totals[*]}")")
    R[$size:restore_only]=$(secs "$(median <<<"${restores[*]}")")

    # --- native TPS, on the restored copy (still running)
    measure_tps "$size" native
    pg_stop "$restored/pgdata"
    rm -rf "$restored"

    # --- writable session: time to first query, cold; then TPS, warm
    if [[ -z $WRITABLE ]]; then
        R[$size:mount_total]="n/a (no --writable)"
        R[$size:tps_mount]="n/a (no --writable)"
        R[$size:tpcb_mount]="n/a (no --writable)"
        continue
    fi
    mnt=$WORK/mnt/pg-$size
    firsts=()
    failed=""
    for run in $(seq 1 "$RUNS"); do
        id=bench-$size-$run
        drop_caches
        t0=$(now_ns)
        if ! mount_session "$RP" "$mnt" "$id"; then
            failed="mount failed: $(tail -n1 "$LOGS/mount-$id.log")"; break
        fi
        if ! pg_start "$mnt/pgdata" "$RUN_DIR/server-mount-$size-$run.log"; then
            failed="pg_ctl start failed: $(grep -m1 -E 'FATAL|PANIC|ERROR' "$RUN_DIR/server-mount-$size-$run.log" || echo see log)"
            fusermount3 -u "$mnt" || true
            break
        fi
        if ! first_query "$scale"; then
            failed="first query failed"; end_session "$mnt" "$id"; break
        fi
        t1=$(now_ns)
        firsts+=($((t1 - t0)))
        say "$size MiB: session mount to first query run $run: $(secs $((t1 - t0))) s"
        [[ $run == "$RUNS" ]] || end_session "$mnt" "$id"
    done
    if [[ -n $failed ]]; then
        say "$size MiB: $failed"
        R[$size:mount_total]="n/a (${failed:0:120})"
        R[$size:tps_mount]="n/a"
        R[$size:tpcb_mount]="n/a"
        continue
    fi
    R[$size:mount_total]=$(secs "$(median <<<"${firsts[*]}")")
    measure_tps "$size" mount
    end_session "$mnt" "bench-$size-$RUNS"
done

# --- report
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "—" }'; }
# a whole number with thousands separators, or the text as it is
num() { if [[ "$1" =~ ^[0-9.]+$ ]]; then printf '%.0f' "$1" | sed ':a; s/\B[0-9]\{3\}\>/,&/; ta'; else printf '%s' "$1"; fi; }
cpu=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
{
    echo "# flr PostgreSQL benchmark — $DATE"
    echo
    echo "Generated by \`bench/pg.sh\` (BENCH_PG_SIZES_MB=\"$SIZES\", $RUNS cold runs per time to first query, pgbench runs of ${TPS_SECONDS} s x $CLIENTS clients). Total time: $(awk -v s=$(( $(date +%s) - STARTED )) 'BEGIN { printf "%.1f", s / 60 }') min."
    echo
    echo "## Machine"
    echo
    echo "- CPU: $cpu, $(nproc) cores; RAM $(awk '/MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo) GiB; kernel $(uname -r); work dir filesystem: $(df -T "$WORK" | awk 'NR == 2 { print $2 }')"
    echo "- $("$PGBIN/postgres" --version); flr $("$FLR" --version | awk '{ print $NF }') ($FLR_REV)"
    echo "- Load average (1/5/15 min) at start: $LOAD_START, at end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the numbers)"
    echo
    echo "## Clusters"
    echo
    echo "| cluster | pgbench scale | on disk MiB (base/ + pg_wal/) | tables and indexes MiB | flr backup s | stored MiB |"
    echo "|---|---:|---:|---:|---:|---:|"
    for size in $SIZES; do
        echo "| $size MiB | ${R[$size:scale]} | $(mib "${R[$size:bytes]}") | $(mib "${R[$size:base]}") | ${R[$size:backup_s]} | $(mib "${R[$size:stored]}") |"
    done
    echo
    echo "## Time to first query, cold"
    echo
    echo "| cluster | writable session: mount + start + first query s | flr restore + start + first query s | of which restore s | session faster by |"
    echo "|---|---:|---:|---:|---:|"
    for size in $SIZES; do
        sp=$(ratio "${R[$size:restore_total]}" "${R[$size:mount_total]}")
        [[ $sp != — ]] && sp="${sp}x"
        echo "| $size MiB | ${R[$size:mount_total]} | ${R[$size:restore_total]} | ${R[$size:restore_only]} | $sp |"
    done
    echo
    echo "## pgbench TPS, warm"
    echo
    echo "| cluster | -S (read-only): writable session | native disk | session ÷ native | read-write (TPC-B-like): writable session | native disk | session ÷ native |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for size in $SIZES; do
        echo "| $size MiB | $(num "${R[$size:tps_mount]}") | $(num "${R[$size:tps_native]}") | $(ratio "${R[$size:tps_mount]}" "${R[$size:tps_native]}") | $(num "${R[$size:tpcb_mount]}") | $(num "${R[$size:tpcb_native]}") | $(ratio "${R[$size:tpcb_mount]}" "${R[$size:tpcb_native]}") |"
    done
    echo
    echo "Method. Each cluster is \`initdb\` (defaults, no data checksums) + \`pgbench -i -s N\` (loaded with max_wal_size 128MB, so pg_wal/ stays small), a CHECKPOINT, stopped with \`pg_ctl stop -m fast\`, then backed up with \`flr backup\` into a new repository (page cache dropped first); pgbench rows are mostly blank padding, so they compress far better than real data. PostgreSQL runs with its default settings (shared_buffers 128 MB), so most reads are served by the kernel page cache or the filesystem underneath. Every cold measurement starts after \`sync; echo 3 > /proc/sys/vm/drop_caches\`; the median of $RUNS runs is shown."
    echo "Session: from the start of \`flr mount --writable --background\` to the first answer of \`SELECT count(*) FROM pgbench_branches\`, \`pg_ctl start -w\` included. Restore: \`flr restore\` into an empty directory on the same disk (no sync afterwards), then \`pg_ctl start -w\` and the same query."
    echo "TPS: \`pgbench -n -S -c $CLIENTS -j min($CLIENTS, cores) -T $TPS_SECONDS\` after a warm-up run of the same length, then the same without -S (the default read-write mix: updates, an insert, WAL flushed at every commit), on the cluster in a writable session and on the restored copy on the native disk; client and server share the machine."
} > "$OUT"
cat "$OUT"
say "report written to $OUT"
