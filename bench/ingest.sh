#!/usr/bin/env bash
# Backup ingest of PostgreSQL, side by side in one run: how fast each tool
# takes a cluster in, how much it stores, how much an incremental adds, and
# how much memory the backup process needs.
#
# One pgbench cluster (`pgbench -i -s BENCH_INGEST_SCALE`, ~490 MiB at 30),
# then, each timed after dropping the page cache:
#   1. pg_basebackup -D - -Ft -X fetch > file on local disk: the limit;
#   2. the same stream into `flr backup --stdin-tar` (and, for reference,
#      flr alone reading the tar file of 1);
#   3. pgBackRest full backups with process-max 1 and 2;
#   4. restic backup --stdin of the same stream;
#   5. a 1% update, then incrementals of flr, pgBackRest and restic against
#      the changed pages;
#   6. pg_dump -Fd -j 1/2/4 to local disk against the same into
#      `flr mount --ingest` (when this flr has it);
#   7. 1, 2 and 4 databases at once with pg_dump -Fc into `flr devices`
#      pipes, against the same to local files (when this flr has it).
# Writes bench/results/<date>-ingest[-s<scale>].md and prints it.
#
# Usage (as root: drops the page cache, runs PostgreSQL and pgBackRest as
# the postgres user, mounts FUSE):
#   bench/ingest.sh
# Environment:
#   BENCH_INGEST_SCALE=30      pgbench scale of the cluster (30: ~490 MiB; 270: ~4 GiB);
#                              5 for a quick run
#   BENCH_REPEAT=1             timed runs of each full backup and dump (median shown);
#                              the incrementals run once
#   BENCH_PGBR_COMPRESS=lz4    pgBackRest compress-type (lz4 or zst)
#   BENCH_DUMP_COMPRESS=0      pg_dump -Z level for parts 6 and 7 (0: the backup
#                              target compresses, not pg_dump)
#   BENCH_WORK=bench/work      work directory; this script uses BENCH_WORK/ingest
#   BENCH_OUT=FILE             report path
#   BENCH_SKIP_INSTALL=1       do not apt-get install the tools
#   BENCH_SKIP_BUILD=1         use target/release/flr as it is, do not build
#   BENCH_FLR=PATH             the flr binary to measure (default target/release/flr;
#                              implies BENCH_SKIP_BUILD)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
SCALE=${BENCH_INGEST_SCALE:-30}
REPEAT=${BENCH_REPEAT:-1}
PGBR_COMPRESS=${BENCH_PGBR_COMPRESS:-lz4}
DUMP_Z=${BENCH_DUMP_COMPRESS:-0}
WORK=${BENCH_WORK:-$HERE/work}/ingest
DATE=$(date +%F)
FLR=${BENCH_FLR:-$ROOT/target/release/flr}
[[ -n "${BENCH_FLR:-}" ]] && BENCH_SKIP_BUILD=1
PGBIN=/usr/lib/postgresql/15/bin
DB=bench
STANZA=ingest
STARTED=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
# cpu_busy: percent of all cores busy over the next 2 s (others' work when
# this script is idle)
cpu_busy() {
    local a b
    a=$(head -1 /proc/stat); sleep 2; b=$(head -1 /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {
        n = split(a, x); split(b, y); t = 0
        for (i = 2; i <= n; i++) t += y[i] - x[i]
        idle = (y[5] - x[5]) + (y[6] - x[6])
        printf "%.0f", (t > 0) ? 100 * (t - idle) / t : 0 }'
}
BUSY_START=$(cpu_busy)

if [[ -n "${BENCH_OUT:-}" ]]; then
    OUT=$BENCH_OUT
elif [[ "$SCALE" == 30 ]]; then
    OUT=$HERE/results/$DATE-ingest.md
else
    OUT=$HERE/results/$DATE-ingest-s$SCALE.md
fi

say() { printf '[ingest.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { say "$*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root: the page cache is dropped, FUSE mounted and PostgreSQL run as postgres"
[[ "$SCALE" =~ ^[0-9]+$ && "$SCALE" -ge 1 ]] || die "BENCH_INGEST_SCALE: $SCALE is not a pgbench scale (>= 1)"
[[ "$REPEAT" =~ ^[0-9]+$ && "$REPEAT" -ge 1 ]] || die "BENCH_REPEAT: $REPEAT is not a count (>= 1)"
case "$PGBR_COMPRESS" in lz4|zst) ;; *) die "BENCH_PGBR_COMPRESS must be lz4 or zst" ;; esac
[[ "$DUMP_Z" =~ ^[0-9]$ ]] || die "BENCH_DUMP_COMPRESS: $DUMP_Z is not a pg_dump -Z level (0-9)"

mkdir -p "$WORK"/{logs,run,out,mnt} "$HERE/results"
LOGS=$WORK/logs
RUN_DIR=$WORK/run
OUTD=$WORK/out
PGDATA=$WORK/pgdata

# PostgreSQL's server programs (and pgBackRest with them) refuse to run as root.
as_pg() { (cd / && runuser -u postgres -- "$@"); }

# --- what this script started, ended by the trap: servers by data
# directory, mounts by path, background processes by id.
SERVERS=()
MOUNTS=()
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local d m p
    for p in "${PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null && kill "$p" 2>/dev/null || true
    done
    for m in "${MOUNTS[@]}"; do
        mountpoint -q "$m" 2>/dev/null && { fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; }
    done
    for d in "${SERVERS[@]}"; do
        [[ -f "$d/postmaster.pid" ]] && as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- tools
need=()
[[ -x $PGBIN/pg_ctl ]] || need+=(postgresql-15)
command -v pgbackrest >/dev/null || need+=(pgbackrest)
command -v restic >/dev/null || need+=(restic)
[[ -x /usr/bin/time ]] || need+=(time)
command -v zstd >/dev/null || need+=(zstd)
command -v fusermount3 >/dev/null || need+=(fuse3)
if [[ ${#need[@]} -gt 0 ]]; then
    [[ -z "${BENCH_SKIP_INSTALL:-}" ]] || die "missing: ${need[*]} (and BENCH_SKIP_INSTALL is set)"
    say "installing: ${need[*]} (apt; waits for a running apt/dpkg to release its lock)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=1200 install -y -qq "${need[@]}" >> "$LOGS/apt.log" 2>&1 ||
        { apt-get -o DPkg::Lock::Timeout=1200 update -qq >> "$LOGS/apt.log" 2>&1 &&
          apt-get -o DPkg::Lock::Timeout=1200 install -y -qq "${need[@]}" >> "$LOGS/apt.log" 2>&1; } ||
        die "apt-get install failed, see $LOGS/apt.log"
fi
if [[ -z "${BENCH_SKIP_BUILD:-}" ]]; then
    say "cargo build --release -p mountd (log: $LOGS/build.log)"
    (cd "$ROOT" && nice -n 10 cargo build --release -p mountd) > "$LOGS/build.log" 2>&1 ||
        die "build failed, see $LOGS/build.log"
fi
[[ -x $FLR ]] || die "no flr binary at $FLR"
FLR_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
[[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | head -1)" ]] && FLR_REV="$FLR_REV, uncommitted changes"
HAVE_INGEST=""
"$FLR" mount --help 2>/dev/null | grep -q -- --ingest && HAVE_INGEST=1
HAVE_DEVICES=""
"$FLR" devices --help >/dev/null 2>&1 && HAVE_DEVICES=1
[[ -n $HAVE_INGEST ]] || say "this flr has no 'mount --ingest': part 6 measures local disk only"
[[ -n $HAVE_DEVICES ]] || say "this flr has no 'devices': part 7 is skipped"
# PostgreSQL must reach every directory it runs in.
namei -m "$WORK" | awk 'NR > 1 && $1 ~ /^d/ && substr($1, 10, 1) !~ /[xt]/ {bad = 1} END {exit bad}' ||
    die "$WORK is not reachable by the postgres user (a parent lacks o+x); set BENCH_WORK elsewhere"
chown postgres: "$RUN_DIR"

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

now_ns() { date +%s%N; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
du_b() { du -sb "$1" | cut -f1; }
median() { tr ' ' '\n' | sed '/^$/d' | sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }
max_of() { tr ' ' '\n' | sed '/^$/d' | sort -n | tail -1; }
# MiB/s of BYTES in NS nanoseconds
rate() { awk -v b="$1" -v ns="$2" 'BEGIN { if (ns > 0) printf "%.1f", b / 1048576 / (ns / 1e9); else print "—" }'; }
jget() { python3 -c "import json, sys; d = json.loads(sys.stdin.readline()); print($2)" < "$1"; }
# /usr/bin/time writes "peak-RSS-KiB user-s sys-s" as its last line (the
# CPU of the process and of the children it waited for)
rss_kib() { tail -n1 "$1" 2>/dev/null | awk '$1 ~ /^[0-9]+$/ { print $1 }'; }
cpu_s() { tail -n1 "$1" 2>/dev/null | awk 'NF == 3 { printf "%.1f", $2 + $3 }'; }
TIME=(/usr/bin/time -f '%M %U %S' -o "$RUN_DIR/rss")

pg_start() {
    SERVERS+=("$1")
    as_pg "$PGBIN/pg_ctl" -D "$1" -l "$2" -w -t 600 \
        -o "-c port=$PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$RUN_DIR" start >/dev/null
}
pg_stop() { as_pg "$PGBIN/pg_ctl" -D "$1" -m fast -w -t 600 stop >/dev/null; }
psql_q() { "$PGBIN/psql" -XAtq -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d "${2:-$DB}" -c "$1"; }
basebackup() { "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PORT" -U postgres -D - -Ft -X fetch -c fast; }

# new_cluster DIR LOG: initdb with the settings every part needs. pgBackRest
# wants archiving on; archive_command stays a no-op except while a
# pgBackRest backup runs, so the WAL of the load and of the update is not
# archived (nor counted) anywhere. No autovacuum: nothing writes pages
# between the backups but the update of part 5.
new_cluster() {
    rm -rf "$1"
    mkdir -p "$1"
    chown postgres: "$1"
    chmod 700 "$1"
    as_pg "$PGBIN/initdb" -D "$1" --auth=trust -E UTF8 --locale=C -U postgres > "$2" 2>&1
    cat >> "$1/postgresql.conf" <<CONF

# bench/ingest.sh
wal_level = replica
max_wal_senders = 8
archive_mode = on
archive_command = '/bin/true'
autovacuum = off
max_wal_size = 1GB
min_wal_size = 80MB
CONF
}

# --- the cluster: made once per scale and kept (pristine-s<scale>); every
# run works on a fresh copy, since part 5 changes it.
PRISTINE=$WORK/pristine-s$SCALE
if [[ "$(cat "$PRISTINE/made" 2>/dev/null)" != "scale=$SCALE" ]]; then
    say "initdb + pgbench -i -s $SCALE (kept in $PRISTINE for later runs)"
    new_cluster "$PRISTINE/pgdata" "$LOGS/initdb.log"
    pg_start "$PRISTINE/pgdata" "$RUN_DIR/server-pristine.log"
    psql_q "CREATE DATABASE $DB" postgres >/dev/null
    "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -q -s "$SCALE" "$DB" > "$LOGS/pgbench-init.log" 2>&1
    psql_q 'CHECKPOINT' >/dev/null
    pg_stop "$PRISTINE/pgdata"
    echo "scale=$SCALE" > "$PRISTINE/made"
fi
say "fresh copy of the cluster in $PGDATA"
rm -rf "$PGDATA"
cp -a "$PRISTINE/pgdata" "$PGDATA"
pg_start "$PGDATA" "$RUN_DIR/server.log"
DB_BYTES=$(psql_q "SELECT pg_database_size('$DB')")
BASE_BYTES=$(du_b "$PGDATA/base")

declare -A R   # results by key; a value that is not a number is shown as it is
LOADS=()       # 1-minute load average at the start of each timed run

# timed NAME FN [ARGS]: REPEAT times: FN_setup (untimed, when it exists),
# drop the page cache, FN ARGS timed. Sets R[NAME:ns] (median), R[NAME:rss]
# (max KiB, from $RUN_DIR/rss when FN wrote it) or R[NAME] = "n/a (...)"
# when a run failed (its log says why).
timed() {
    local name=$1 fn=$2 i t0 t1 walls=() rsss=() cpus=() r c
    shift 2
    for i in $(seq 1 "$REPEAT"); do
        if declare -F "${fn}_setup" >/dev/null; then
            "${fn}_setup" "$@" || { R[$name]="n/a (setup failed, see $LOGS)"; return 1; }
        fi
        rm -f "$RUN_DIR/rss"
        drop_caches
        LOADS+=("$(cut -d' ' -f1 /proc/loadavg)")
        t0=$(now_ns)
        if ! "$fn" "$@"; then
            R[$name]="n/a (${FAIL_WHY:-failed}, see $LOGS)"
            FAIL_WHY=""
            say "$name: failed"
            return 1
        fi
        t1=$(now_ns)
        walls+=($((t1 - t0)))
        r=$(rss_kib "$RUN_DIR/rss")
        [[ -n $r ]] && rsss+=("$r")
        c=$(cpu_s "$RUN_DIR/rss")
        [[ -n $c ]] && cpus+=("$c")
    done
    R[$name:ns]=$(median <<<"${walls[*]}")
    R[$name:ns_min]=$(tr ' ' '\n' <<<"${walls[*]}" | sort -n | head -1)
    R[$name:ns_max]=$(max_of <<<"${walls[*]}")
    R[$name:runs]=${#walls[@]}
    R[$name:rss]=$(max_of <<<"${rsss[*]:-}")
    R[$name:cpu]=$(median <<<"${cpus[*]:-}")
    say "$name: $(awk -v ns="${R[$name:ns]}" 'BEGIN { printf "%.2f", ns / 1e9 }') s (runs: $(tr ' ' '\n' <<<"${walls[*]}" | awk '{ printf "%s%.2f", (NR > 1) ? " " : "", $1 / 1e9 }') s)"
}
FAIL_WHY=""

# ---------------------------------------------------------------- 1. limit
run_pgbb() {
    "${TIME[@]}" "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PORT" -U postgres -D - -Ft -X fetch -c fast \
        > "$OUTD/base.tar" 2> "$LOGS/pgbb.err" || return 1
    # to local disk: written through, like the backup tools' own fsyncs
    sync "$OUTD/base.tar"
}
say "1. pg_basebackup -Ft -X fetch to a local file"
timed pgbb run_pgbb || die "pg_basebackup failed, see $LOGS/pgbb.err: nothing to compare with"
DATA_BYTES=$(stat -c %s "$OUTD/base.tar")
R[pgbb:stored]=$DATA_BYTES
# WAL segments in the stream (-X fetch): new in every backup, not data pages
WAL_SEGMENTS=$(tar -tf "$OUTD/base.tar" | grep -c '^pg_wal/[0-9A-F]\{24\}$' || true)

# ---------------------------------------------------------------- 2. flr
FLR_REPO=$OUTD/flr-repo
# flr alone, from the tar file of part 1 (cold): what flr takes in when
# nothing upstream is waiting on it; the pipeline below is what counts
run_flr_file_setup() { rm -rf "$FLR_REPO" && "$FLR" init "$FLR_REPO" > "$LOGS/flr-init.log" 2>&1; }
run_flr_file() {
    "${TIME[@]}" "$FLR" backup --repo "$FLR_REPO" --job pg --stdin-tar --json < "$OUTD/base.tar" \
        > "$LOGS/flr-file.json" 2> "$LOGS/flr-file.err"
}
say "2. flr backup --stdin-tar < the tar file (flr alone)"
timed flr_file run_flr_file || true
rm -f "$OUTD/base.tar"

run_flr_full_setup() { rm -rf "$FLR_REPO" && "$FLR" init "$FLR_REPO" > "$LOGS/flr-init.log" 2>&1; }
run_flr_full() {
    basebackup 2> "$LOGS/flr-full-pgbb.err" |
        "${TIME[@]}" "$FLR" backup --repo "$FLR_REPO" --job pg --stdin-tar --json \
            > "$LOGS/flr-full.json" 2> "$LOGS/flr-full.err"
}
say "2. pg_basebackup | flr backup --stdin-tar"
if timed flr run_flr_full; then
    R[flr:stored]=$(du_b "$FLR_REPO")
fi

# ---------------------------------------------------------------- 3. pgBackRest
PGBR_CONF=$RUN_DIR/pgbackrest.conf
mkdir -p "$WORK/pgbackrest"/{log,lock}
chown -R postgres: "$WORK/pgbackrest"
cat > "$PGBR_CONF" <<CONF
[global]
log-path=$WORK/pgbackrest/log
lock-path=$WORK/pgbackrest/lock
log-level-console=warn
log-level-file=info
compress-type=$PGBR_COMPRESS
start-fast=y
repo1-retention-full=99

[$STANZA]
pg1-path=$PGDATA
pg1-port=$PORT
pg1-socket-path=$RUN_DIR
pg1-user=postgres
CONF
chown postgres: "$PGBR_CONF"
pgbr() { as_pg pgbackrest --config="$PGBR_CONF" --stanza="$STANZA" --repo1-path="$1" "${@:2}"; }
# archive_to REPO: WAL is archived into REPO from now on (or nowhere: "").
archive_to() {
    local cmd=/bin/true
    [[ -n $1 ]] && cmd="pgbackrest --config=$PGBR_CONF --stanza=$STANZA --repo1-path=$1 archive-push %p"
    psql_q "ALTER SYSTEM SET archive_command = '$cmd'" >/dev/null &&
        psql_q 'SELECT pg_reload_conf()' >/dev/null &&
        sleep 0.5   # the archiver rereads its settings at the reload
}
run_pgbr_setup() {
    local repo=$OUTD/pgbr-repo-pm$1
    rm -rf "$repo" && mkdir -p "$repo" && chown postgres: "$repo" &&
        pgbr "$repo" stanza-create >> "$LOGS/pgbr-pm$1.log" 2>&1 &&
        archive_to "$repo"
}
run_pgbr() {
    "${TIME[@]}" runuser -u postgres -- pgbackrest --config="$PGBR_CONF" --stanza="$STANZA" \
        --repo1-path="$OUTD/pgbr-repo-pm$1" --process-max="$1" --type=full backup \
        >> "$LOGS/pgbr-pm$1.log" 2>&1
}
for pm in 1 2; do
    say "3. pgBackRest full backup, process-max $pm, compress-type $PGBR_COMPRESS"
    timed "pgbr$pm" run_pgbr "$pm" || true
done
archive_to ""
for pm in 1 2; do
    [[ -d $OUTD/pgbr-repo-pm$pm/backup ]] && R[pgbr$pm:stored]=$(du_b "$OUTD/pgbr-repo-pm$pm")
done

# ---------------------------------------------------------------- 4. restic
RESTIC_REPO=$OUTD/restic-repo
export RESTIC_PASSWORD=bench-ingest   # restic always encrypts
restic_b() {
    basebackup 2> "$LOGS/restic-$1-pgbb.err" |
        "${TIME[@]}" restic -r "$RESTIC_REPO" --cache-dir "$OUTD/restic-cache" backup --stdin \
            --stdin-filename base.tar -q >> "$LOGS/restic-$1.log" 2>&1
}
run_restic_full_setup() {
    rm -rf "$RESTIC_REPO" "$OUTD/restic-cache" &&
        restic -r "$RESTIC_REPO" init > "$LOGS/restic-init.log" 2>&1
}
run_restic_full() { restic_b full; }
say "4. pg_basebackup | restic backup --stdin"
if timed restic run_restic_full; then
    R[restic:stored]=$(du_b "$RESTIC_REPO")
fi

# ---------------------------------------------------------------- 5. incremental
say "5. the 1% update, then the incrementals"
psql_q 'CHECKPOINT' >/dev/null
PAGES_OLD=$(psql_q "SELECT count(DISTINCT (ctid::text::point)[0]) FROM pgbench_accounts WHERE aid % 100 = 0")
python3 "$HERE/pagediff.py" snapshot "$PGDATA" "$RUN_DIR/pages.snapshot"
psql_q "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 100 = 0" >/dev/null
# the new row versions' pages (this reads every row once, as any later
# query would, and so sets the hint bits now rather than after a backup)
PAGES_NEW=$(psql_q "SELECT count(DISTINCT (ctid::text::point)[0]) FROM pgbench_accounts WHERE aid % 100 = 0")
ROWS=$(psql_q "SELECT count(*) FROM pgbench_accounts WHERE aid % 100 = 0")
INDEX_PAGES=$(psql_q "SELECT pg_relation_size('pgbench_accounts_pkey') / 8192")
psql_q 'CHECKPOINT' >/dev/null
python3 "$HERE/pagediff.py" diff "$PGDATA" "$RUN_DIR/pages.snapshot" --pages-out "$OUTD/changed-pages" \
    > "$LOGS/pagediff.json"
CHANGED_BYTES=$(jget "$LOGS/pagediff.json" 'd["changed_bytes"]')
CHANGED_PAGES=$(jget "$LOGS/pagediff.json" 'd["changed_pages"]')
ALL_PAGES=$(jget "$LOGS/pagediff.json" 'd["pages"]')
CHANGED_ZSTD=$(zstd -3 -c -q "$OUTD/changed-pages" | wc -c)
rm -f "$OUTD/changed-pages" "$RUN_DIR/pages.snapshot"
ESTIMATE_BYTES=$(( (PAGES_OLD + PAGES_NEW + INDEX_PAGES) * 8192 ))
say "5. $ROWS rows updated; $CHANGED_PAGES of $ALL_PAGES pages changed ($(mib "$CHANGED_BYTES") MiB; zstd -3: $(mib "$CHANGED_ZSTD") MiB)"

# incremental KEY FN REPO: FN once, timed; R[KEY:incr] = growth of REPO on disk
incremental() {
    local before
    before=$(du_b "$3")
    REPEAT=1 timed "$1" "$2" || return 1
    R[$1:incr]=$(( $(du_b "$3") - before ))
}
run_flr_incr() {
    basebackup 2> "$LOGS/flr-incr-pgbb.err" |
        "${TIME[@]}" "$FLR" backup --repo "$FLR_REPO" --job pg --stdin-tar --json \
            > "$LOGS/flr-incr.json" 2> "$LOGS/flr-incr.err"
}
if [[ -n ${R[flr:ns]:-} ]] && incremental flr_incr run_flr_incr "$FLR_REPO"; then
    R[flr_incr:added]=$(jget "$LOGS/flr-incr.json" 'd["stats"]["added_bytes"]')
    "$FLR" restore-points --repo "$FLR_REPO" --json > "$LOGS/flr-restore-points.json" 2>&1 || true
fi
run_pgbr_incr_setup() { archive_to "$OUTD/pgbr-repo-pm2"; }
run_pgbr_incr() {
    "${TIME[@]}" runuser -u postgres -- pgbackrest --config="$PGBR_CONF" --stanza="$STANZA" \
        --repo1-path="$OUTD/pgbr-repo-pm2" --process-max=2 --type=incr backup \
        >> "$LOGS/pgbr-incr.log" 2>&1
}
[[ -n ${R[pgbr2:ns]:-} ]] && { incremental pgbr_incr run_pgbr_incr "$OUTD/pgbr-repo-pm2" || true; }
archive_to ""
run_restic_incr() { restic_b incr; }
[[ -n ${R[restic:ns]:-} ]] && { incremental restic_incr run_restic_incr "$RESTIC_REPO" || true; }

# ---------------------------------------------------------------- 6. pg_dump -Fd
DUMPS=$OUTD/dumps
mkdir -p "$DUMPS"
chown postgres: "$DUMPS"
pg_dump_to() {   # pg_dump_to JOBS DIR, as postgres, peak RSS measured
    "${TIME[@]}" runuser -u postgres -- "$PGBIN/pg_dump" -h 127.0.0.1 -p "$PORT" -U postgres \
        -Fd -j "$1" -Z "$DUMP_Z" -f "$2" "$DB" >> "$LOGS/pg_dump-j$1.log" 2>&1
}
run_dump_local_setup() { rm -rf "$DUMPS/dump-j$1"; }
run_dump_local() { pg_dump_to "$1" "$DUMPS/dump-j$1" && sync "$DUMPS/dump-j$1"/*; }
# the peak RSS (KiB) of the `flr mount` process serving MP, or nothing
mount_vmhwm() {
    local p args
    for p in /proc/[0-9]*; do
        args=$(tr '\0' '\n' 2>/dev/null < "$p/cmdline") || continue
        if grep -qxF -- "$1" <<<"$args" && grep -qx -- --ingest <<<"$args"; then
            awk '/^VmHWM/ { print $2 }' "$p/status" 2>/dev/null
            return 0
        fi
    done 2>/dev/null
}
run_dump_ingest_setup() {
    local mp=$WORK/mnt/dump-j$1
    mountpoint -q "$mp" 2>/dev/null && fusermount3 -u "$mp"
    mkdir -p "$mp" &&
        rm -rf "$OUTD/ingest-repo-j$1" && "$FLR" init "$OUTD/ingest-repo-j$1" >> "$LOGS/ingest-j$1.log" 2>&1
}
run_dump_ingest() {
    local mp=$WORK/mnt/dump-j$1 hwm
    MOUNTS+=("$mp")
    "$FLR" mount --ingest --repo "$OUTD/ingest-repo-j$1" --job dump --owner postgres --background "$mp" \
        >> "$LOGS/ingest-j$1.log" 2>&1 || { FAIL_WHY="flr mount --ingest failed"; return 1; }
    pg_dump_to "$1" "$mp/dump-j$1" || { FAIL_WHY="pg_dump into the mount failed"; return 1; }
    # the mount's peak, not pg_dump's
    hwm=$(mount_vmhwm "$mp")
    if [[ -n $hwm ]]; then echo "$hwm" > "$RUN_DIR/rss"; else rm -f "$RUN_DIR/rss"; fi
    "$FLR" ingest commit "$mp" --json > "$LOGS/ingest-j$1.json" 2>> "$LOGS/ingest-j$1.log" ||
        { FAIL_WHY="flr ingest commit failed"; return 1; }
}
for j in 1 2 4; do
    say "6. pg_dump -Fd -j $j to local disk"
    if timed "dump_local$j" run_dump_local "$j"; then
        R[dump_local$j:stored]=$(du_b "$DUMPS/dump-j$j")
    fi
    rm -rf "$DUMPS/dump-j$j"
    if [[ -z $HAVE_INGEST ]]; then
        R[dump_ingest$j]="not available in this build"
        continue
    fi
    say "6. pg_dump -Fd -j $j into flr mount --ingest"
    if timed "dump_ingest$j" run_dump_ingest "$j"; then
        R[dump_ingest$j:stored]=$(du_b "$OUTD/ingest-repo-j$j")
    fi
    mountpoint -q "$WORK/mnt/dump-j$j" 2>/dev/null && { fusermount3 -u "$WORK/mnt/dump-j$j" || true; }
done

# ---------------------------------------------------------------- 7. devices
# K databases of scale SCALE/K each (the same total for every K, so the
# aggregate rates compare the same work), in a cluster of their own, made
# once per scale and kept.
KS="1 2 4"
dbs_of() { local i; for ((i = 0; i < $1; i++)); do printf 'k%s_%s ' "$1" "$i"; done; }
dump_fc() {   # dump_fc DB FILE: pg_dump -Fc as postgres, written by postgres
    as_pg sh -c 'exec "$0" -h 127.0.0.1 -p "$1" -U postgres -Fc -Z "$2" "$3" > "$4"' \
        "$PGBIN/pg_dump" "$PORT" "$DUMP_Z" "$1" "$2"
}
run_multi_local_setup() { rm -rf "$DUMPS/fc" && mkdir -p "$DUMPS/fc" && chown postgres: "$DUMPS/fc"; }
run_multi_local() {
    local db pids=() p rc=0
    for db in $(dbs_of "$1"); do
        dump_fc "$db" "$DUMPS/fc/$db.dump" >> "$LOGS/multi-local-k$1.log" 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    [[ $rc == 0 ]] && sync "$DUMPS/fc"/*.dump
}
run_multi_flr_setup() {
    rm -rf "$OUTD/devices-repo-k$1" "$WORK/devices-k$1" &&
        "$FLR" init "$OUTD/devices-repo-k$1" >> "$LOGS/devices-k$1.log" 2>&1
}
run_multi_flr() {
    local k=$1 out=$LOGS/devices-k$1.jsonl dpid db path pids=() p rc=0 i
    : > "$out"
    # shellcheck disable=SC2046
    "${TIME[@]}" "$FLR" devices --repo "$OUTD/devices-repo-k$k" --streams 1 --format raw \
        --dir "$WORK/devices-k$k" --json --owner postgres --timeout 600 $(dbs_of "$k") \
        > "$out" 2>> "$LOGS/devices-k$k.log" &
    dpid=$!
    PIDS+=("$dpid")
    for ((i = 0; i < 1200; i++)); do
        grep -q '"devices"' "$out" && break
        kill -0 "$dpid" 2>/dev/null || { FAIL_WHY="flr devices ended before it listed its pipes"; return 1; }
        sleep 0.05
    done
    grep -q '"devices"' "$out" || { FAIL_WHY="flr devices listed no pipes within 60 s"; kill "$dpid"; return 1; }
    local paths=()
    while read -r db path; do
        dump_fc "$db" "$path" >> "$LOGS/devices-k$k.log" 2>&1 &
        pids+=($!)
        paths+=("$path")
    done < <(grep -m1 '"devices"' "$out" | python3 -c '
import json, sys
for d in json.loads(sys.stdin.readline())["devices"]:
    if d["stream"] == 0:
        print(d["db"], d["path"])')
    [[ ${#pids[@]} == "$k" ]] || { FAIL_WHY="flr devices listed ${#pids[@]} pipes, not $k"; rc=1; }
    if ! wait "$dpid"; then
        FAIL_WHY="flr devices failed: $(sed -n 's/.*"error":"\([^"]*\)".*/\1/p' "$out" | head -1)"
        rc=1
        # a writer still waiting for its reader would wait for ever: read for it
        for path in "${paths[@]}"; do timeout 10 cat "$path" > /dev/null 2>&1 & done
    fi
    for p in "${pids[@]}"; do wait "$p" || { FAIL_WHY=${FAIL_WHY:-"pg_dump into a device failed"}; rc=1; }; done
    return $rc
}
if [[ -n $HAVE_DEVICES ]]; then
    pg_stop "$PGDATA"
    DEVDATA=$WORK/devices-s$SCALE
    if [[ "$(cat "$DEVDATA/made" 2>/dev/null)" != "scale=$SCALE" ]]; then
        say "7. the databases for part 7: $KS at once, scale $SCALE/K each (kept in $DEVDATA)"
        new_cluster "$DEVDATA/pgdata" "$LOGS/initdb-devices.log"
        pg_start "$DEVDATA/pgdata" "$RUN_DIR/server-devices.log"
        for k in $KS; do
            for db in $(dbs_of "$k"); do
                psql_q "CREATE DATABASE $db" postgres >/dev/null
                "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -q -s $(( SCALE / k > 0 ? SCALE / k : 1 )) "$db" \
                    >> "$LOGS/pgbench-init-devices.log" 2>&1
            done
        done
        psql_q 'CHECKPOINT' postgres >/dev/null
        pg_stop "$DEVDATA/pgdata"
        echo "scale=$SCALE" > "$DEVDATA/made"
    fi
    pg_start "$DEVDATA/pgdata" "$RUN_DIR/server-devices.log"
    for k in $KS; do
        say "7. $k database(s) at once: pg_dump -Fc to local files"
        if timed "multi_local$k" run_multi_local "$k"; then
            R[multi_local$k:bytes]=$(cat "$DUMPS/fc"/*.dump | wc -c)
            R[multi_local$k:stored]=${R[multi_local$k:bytes]}
        fi
        rm -rf "$DUMPS/fc"
        say "7. $k database(s) at once: pg_dump -Fc into flr devices"
        if timed "multi_flr$k" run_multi_flr "$k"; then
            R[multi_flr$k:stored]=$(du_b "$OUTD/devices-repo-k$k")
            # the bytes streamed, as flr counted them (else as the local run wrote them)
            R[multi_flr$k:bytes]=$(tail -n1 "$LOGS/devices-k$k.jsonl" | python3 -c '
import json, sys
r = json.loads(sys.stdin.readline())["results"]
print(sum(x["stats"]["logical_bytes"] for x in r))' 2>/dev/null || echo "${R[multi_local$k:bytes]:-0}")
        fi
    done
    pg_stop "$DEVDATA/pgdata"
else
    for k in $KS; do R[multi_flr$k]="not available in this build"; done
    pg_stop "$PGDATA"
fi

# ---------------------------------------------------------------- report
# cell KEY BYTES: MiB/s of BYTES over KEY's median wall time, or KEY's note
cell_rate() {
    if [[ -n ${R[$1]:-} ]]; then printf '%s' "${R[$1]}"
    elif [[ -n ${R[$1:ns]:-} && -n ${2:-} ]]; then
        rate "$2" "${R[$1:ns]}"
        # the spread of several runs: slowest to fastest
        [[ ${R[$1:runs]} -gt 1 ]] && printf ' (%s–%s)' "$(rate "$2" "${R[$1:ns_max]}")" "$(rate "$2" "${R[$1:ns_min]}")"
    else printf 'n/a (not run)'; fi
}
cell_mib() { if [[ -n ${1:-} ]]; then mib "$1"; else printf '—'; fi; }
cell_rss() { if [[ -n ${R[$1:rss]:-} ]]; then awk -v k="${R[$1:rss]}" 'BEGIN { printf "%.0f", k / 1024 }'; else printf '—'; fi; }
num_or_dash() { [[ "$1" =~ ^[0-9.]+$ ]] && printf '%s' "$1" || printf '—'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && a > 0 && b > 0) printf "%.2f", a / b; else print "—" }'; }
# verdict RATIO ge|le TARGET
verdict() {
    [[ $1 == — ]] && { printf 'n/a'; return; }
    awk -v r="$1" -v op="$2" -v t="$3" 'BEGIN { ok = (op == "ge") ? r >= t : r <= t; printf ok ? "PASS" : "MISS" }'
}
row() { printf '| %s | %s | %s | %s | %s | %s |\n' "$@"; }
cpu_of() { [[ -n ${R[$1:cpu]:-} ]] && printf '%s s' "${R[$1:cpu]}" || printf 'n/a'; }
secs_of() { [[ -n ${R[$1:ns]:-} ]] && awk -v ns="${R[$1:ns]}" 'BEGIN { printf "%.1f s", ns / 1e9 }' || printf 'n/a'; }

# the plain rate of a run that worked, for the ratios
raw_rate() { if [[ -z ${R[$1]:-} && -n ${R[$1:ns]:-} && -n ${2:-} ]]; then rate "$2" "${R[$1:ns]}"; fi; }
rate_flr=$(raw_rate flr "$DATA_BYTES"); rate_pgbb=$(raw_rate pgbb "$DATA_BYTES")
rate_pgbr2=$(raw_rate pgbr2 "$DATA_BYTES")
rate_ing4=$(raw_rate dump_ingest4 "$DB_BYTES"); rate_loc4=$(raw_rate dump_local4 "$DB_BYTES")
rate_k1=$(raw_rate multi_flr1 "${R[multi_flr1:bytes]:-}"); rate_k4=$(raw_rate multi_flr4 "${R[multi_flr4:bytes]:-}")
r1=$(ratio "$rate_flr" "$rate_pgbb")
r2=$(ratio "$rate_flr" "$rate_pgbr2")
r3=$(ratio "${R[flr_incr:incr]:-}" "$CHANGED_BYTES")
r3b=$(ratio "${R[pgbr_incr:incr]:-}" "$CHANGED_BYTES")
r3c=$(ratio "${R[restic_incr:incr]:-}" "$CHANGED_BYTES")
r3z=$(ratio "${R[flr_incr:incr]:-}" "$CHANGED_ZSTD")
r3zb=$(ratio "${R[pgbr_incr:incr]:-}" "$CHANGED_ZSTD")
r3zc=$(ratio "${R[restic_incr:incr]:-}" "$CHANGED_ZSTD")
r4=$(ratio "$rate_ing4" "$rate_loc4")
r5=$(ratio "$rate_k4" "$rate_k1")
why_na() { [[ $1 == — ]] && printf ' (%s)' "$2"; return 0; }

FAILED=()
for key in "${!R[@]}"; do
    [[ $key == *:* ]] && continue
    [[ ${R[$key]} == n/a* ]] && FAILED+=("$key")
done
[[ ${#FAILED[@]} == 0 ]] || mapfile -t FAILED < <(printf '%s\n' "${FAILED[@]}" | sort)
loads=$(tr ' ' '\n' <<<"${LOADS[*]}" | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s-%s", lo, hi }')
cpu=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
pgbr_label="pgBackRest $(pgbackrest version | awk '{ print $2 }')"
restic_label="restic $(restic version | awk '{ print $2 }')"
{
    echo "# flr ingest benchmark: PostgreSQL — $DATE"
    echo
    echo "Generated by \`bench/ingest.sh\` (BENCH_INGEST_SCALE=$SCALE, BENCH_REPEAT=$REPEAT, pgBackRest compress-type $PGBR_COMPRESS, pg_dump -Z $DUMP_Z). Total time: $(awk -v s=$(( $(date +%s) - STARTED )) 'BEGIN { printf "%.1f", s / 60 }') min."
    if [[ ${#FAILED[@]} -gt 0 ]]; then
        echo
        echo "**Incomplete run**: failed: ${FAILED[*]} (see the cells, and $LOGS)."
    fi
    echo
    echo "## Machine"
    echo
    echo "- CPU: $cpu, $(nproc) cores; RAM $(awk '/MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo) GiB; kernel $(uname -r); work dir filesystem: $(df -T "$WORK" | awk 'NR == 2 { print $2 }')"
    echo "- $("$PGBIN/postgres" --version); $pgbr_label; $restic_label; flr $("$FLR" --version | awk '{ print $NF }') ($FLR_REV)"
    echo "- flr has \`mount --ingest\`: $([[ -n $HAVE_INGEST ]] && echo yes || echo no); \`devices\`: $([[ -n $HAVE_DEVICES ]] && echo yes || echo no)"
    echo "- Load average (1/5/15 min) at start: $LOAD_START, at end: $(cut -d' ' -f1-3 /proc/loadavg); 1-minute load at the start of the timed runs: $loads; CPU busy with other work just before the run: ${BUSY_START}% of all cores, just after: $(cpu_busy)% (other work on the machine skews the numbers)"
    echo
    echo "## Dataset"
    echo
    echo "- \`pgbench -i -s $SCALE\` in database \`$DB\`: $(mib "$DB_BYTES") MiB (pg_database_size), base/ $(mib "$BASE_BYTES") MiB; the \`pg_basebackup -Ft -X fetch\` stream is $(mib "$DATA_BYTES") MiB ($DATA_BYTES bytes), of which $WAL_SEGMENTS WAL segment(s) of 16 MiB (the WAL of the backup itself: new in every backup, so part of every incremental of a stream, but not counted as changed pages)."
    echo "- 1% update: \`UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 100 = 0\` ($ROWS rows), then CHECKPOINT. Changed pages, measured by comparing every 8 KiB page of the relation files in base/ and global/ before and after: **$CHANGED_PAGES of $ALL_PAGES pages, $(mib "$CHANGED_BYTES") MiB** (those pages concatenated, \`zstd -3\`: $(mib "$CHANGED_ZSTD") MiB). Estimate from the rows: $PAGES_OLD heap pages held the old versions, $PAGES_NEW hold the new ones, and every one of the $INDEX_PAGES pages of pgbench_accounts_pkey may hold an updated key (one key in 100, a few hundred per leaf): about $(mib "$ESTIMATE_BYTES") MiB. With fillfactor 100 no update stays on its page, so a 1% update touches most pages of the table."
    echo
    echo "## Results"
    echo
    echo "| tool | what | MiB/s | stored MiB | incremental MiB | peak RSS MiB |"
    echo "|---|---|---:|---:|---:|---:|"
    row "pg_basebackup" "\`-D - -Ft -X fetch -c fast\` to a local file (the limit)" "$(cell_rate pgbb "$DATA_BYTES")" "$(cell_mib "${R[pgbb:stored]:-}")" "—" "$(cell_rss pgbb)"
    flr_incr="$(cell_mib "${R[flr_incr:incr]:-}")"
    [[ -n ${R[flr_incr:added]:-} ]] && flr_incr="$flr_incr (added_bytes $(mib "${R[flr_incr:added]}"))"
    [[ -n ${R[flr_incr]:-} ]] && flr_incr=${R[flr_incr]}
    row "flr" "the same stream into \`backup --stdin-tar\`" "$(cell_rate flr "$DATA_BYTES")" "$(cell_mib "${R[flr:stored]:-}")" "$flr_incr" "$(cell_rss flr)"
    row "flr" "the same tar from a local file (\`--stdin-tar < file\`, no pg_basebackup upstream; for reference)" "$(cell_rate flr_file "$DATA_BYTES")" "—" "—" "$(cell_rss flr_file)"
    row "$pgbr_label" "full backup, process-max 1, $PGBR_COMPRESS" "$(cell_rate pgbr1 "$DATA_BYTES")" "$(cell_mib "${R[pgbr1:stored]:-}")" "—" "$(cell_rss pgbr1)"
    pgbr_incr=$(cell_mib "${R[pgbr_incr:incr]:-}"); [[ -n ${R[pgbr_incr]:-} ]] && pgbr_incr=${R[pgbr_incr]}
    row "$pgbr_label" "full backup, process-max 2, $PGBR_COMPRESS; then \`--type=incr\`" "$(cell_rate pgbr2 "$DATA_BYTES")" "$(cell_mib "${R[pgbr2:stored]:-}")" "$pgbr_incr" "$(cell_rss pgbr2)"
    restic_incr=$(cell_mib "${R[restic_incr:incr]:-}"); [[ -n ${R[restic_incr]:-} ]] && restic_incr=${R[restic_incr]}
    row "$restic_label" "the same stream into \`backup --stdin\` (always encrypted)" "$(cell_rate restic "$DATA_BYTES")" "$(cell_mib "${R[restic:stored]:-}")" "$restic_incr" "$(cell_rss restic)"
    row "changed pages" "the 1% update, 8 KiB pages (zstd -3 of them: $(mib "$CHANGED_ZSTD") MiB)" "—" "—" "$(mib "$CHANGED_BYTES")" "—"
    for j in 1 2 4; do
        row "pg_dump" "\`-Fd -j $j -Z $DUMP_Z\` to local disk" "$(cell_rate "dump_local$j" "$DB_BYTES")" "$(cell_mib "${R[dump_local$j:stored]:-}")" "—" "$(cell_rss "dump_local$j")"
        row "flr" "\`pg_dump -Fd -j $j -Z $DUMP_Z\` into \`mount --ingest\`, then \`ingest commit\`" "$(cell_rate "dump_ingest$j" "$DB_BYTES")" "$(cell_mib "${R[dump_ingest$j:stored]:-}")" "—" "$(cell_rss "dump_ingest$j")"
    done
    for k in $KS; do
        if [[ -n $HAVE_DEVICES ]]; then
            row "pg_dump" "$k database(s) at once, \`-Fc -Z $DUMP_Z\` to local files ($(cell_mib "${R[multi_local$k:bytes]:-}") MiB)" "$(cell_rate "multi_local$k" "${R[multi_local$k:bytes]:-}")" "$(cell_mib "${R[multi_local$k:stored]:-}")" "—" "$(cell_rss "multi_local$k")"
        fi
        row "flr" "$k database(s) at once, \`pg_dump -Fc -Z $DUMP_Z\` into \`flr devices\` pipes (raw, 1 stream each)" "$(cell_rate "multi_flr$k" "${R[multi_flr$k:bytes]:-}")" "$(cell_mib "${R[multi_flr$k:stored]:-}")" "—" "$(cell_rss "multi_flr$k")"
    done
    echo
    echo "## Targets"
    echo
    echo "- \`--stdin-tar\` ≥ 0.8x pg_basebackup to local disk: **${r1}x**$(why_na "$r1" "a run failed") — $(verdict "$r1" ge 0.8)"
    echo "- flr full backup ≥ 2x pgBackRest with the same cores (process-max 2): **${r2}x**$(why_na "$r2" "a run failed") — $(verdict "$r2" ge 2)"
    echo "- flr incremental within 1.5x of the changed pages: **${r3}x**$(why_na "$r3" "a run failed") — $(verdict "$r3" le 1.5) (pgBackRest incr: ${r3b}x, restic: ${r3c}x). Against those pages compressed (zstd -3), a stricter bar: flr ${r3z}x, pgBackRest ${r3zb}x, restic ${r3zc}x"
    echo "- ingest mount ≥ 0.8x local disk for pg_dump -Fd -j 4: **${r4}x**$(why_na "$r4" "$([[ -n $HAVE_INGEST ]] && echo 'a run failed' || echo 'not available in this build')") — $(verdict "$r4" ge 0.8)"
    echo "- 4 databases at once ≥ the aggregate throughput of one: **${r5}x**$(why_na "$r5" "$([[ -n $HAVE_DEVICES ]] && echo 'a run failed' || echo 'not available in this build')") — $(verdict "$r5" ge 1)"
    echo
    echo "## Method"
    echo
    echo "Every timed run starts after \`sync; echo 3 > /proc/sys/vm/drop_caches\` (PostgreSQL keeps its 128 MB of shared buffers); with BENCH_REPEAT > 1 the rate of the median wall time is shown, with the slowest and fastest run in parentheses (the incrementals run once). MiB/s is MiB of the data over wall time: the pg_basebackup stream size for the full backups (also for pgBackRest, which reads the files itself), the database size (pg_database_size) for pg_dump -Fd, and the bytes pg_dump wrote for the databases at once (aggregate: all bytes over the wall time of the whole run). The local-disk references fsync what they wrote (\`sync FILE...\`) inside the timed region, as the backup tools do. Stored MiB is \`du -sb\` of the repository (of the file or dump directory for the references); incremental MiB is how much the repository grew on disk with the second backup. Peak RSS is \`/usr/bin/time -f %M\` of the backup process (for pgBackRest and pg_dump -j, the largest of its processes; for the ingest mount, VmHWM of the mount process before the commit)."
    echo "Cluster: PostgreSQL defaults plus wal_level=replica, max_wal_senders=8, archive_mode=on, autovacuum=off (nothing but the update changes pages between backups). pg_basebackup runs with \`-c fast\` (the checkpoint at its start does not wait); pgBackRest with start-fast=y, its archive_command set for its own backups only (so the WAL of the update is archived nowhere, and each backup carries the WAL it needs, like \`-X fetch\`), repo on the same disk, run as postgres. flr: \`flr init\` (unencrypted, defaults), \`backup --repo R --job pg --stdin-tar --json\`; the incremental is a second such backup into the same repository (its added_bytes from \`--json\` in parentheses). restic: \`init\`, \`backup --stdin --stdin-filename base.tar\`, repository v2 with its default compression, cache in the work dir (not counted). The incremental runs come after the update in this order: flr, pgBackRest (\`--type=incr\`, process-max 2, into the process-max 2 repository), restic; each reads the cluster with a cold page cache. pg_dump runs as postgres over TCP; each ingest mount run gets a new repository; \`-j\` spreads whole tables over the workers, and pgbench_accounts is nearly all of the data, so more jobs help pg_dump little here. Databases at once: K = 1, 2, 4 databases each made by \`pgbench -i -s $SCALE/K\` (the same total for every K, so the aggregate rates compare the same work), in a cluster of their own, each dumped by its own \`pg_dump -Fc\` at the same time."
    echo "Incremental wall times: flr $(secs_of flr_incr), pgBackRest incr $(secs_of pgbr_incr), restic $(secs_of restic_incr)."
    echo "CPU seconds (user + sys; median) of the backup process and the children it waited for (for the piped backups the backup tool only: pg_basebackup upstream and the server's walsender are not in it), full backups: flr $(cpu_of flr) (from the file: $(cpu_of flr_file)), pgBackRest process-max 1 $(cpu_of pgbr1), process-max 2 $(cpu_of pgbr2), restic $(cpu_of restic), pg_basebackup to a file $(cpu_of pgbb); incrementals: flr $(cpu_of flr_incr), pgBackRest $(cpu_of pgbr_incr), restic $(cpu_of restic_incr). With the other work on the machine, a tool that needs more CPU loses more."
} > "$OUT"
cat "$OUT"
say "report written to $OUT"
[[ ${#FAILED[@]} == 0 ]] || { say "incomplete run: ${FAILED[*]}"; exit 1; }
