#!/usr/bin/env bash
# Export benchmark: `flr export` of each format against the manual path
# (`flr restore` of the whole restore point, then the engine's own tool),
# `restic restore` followed by the same tool (when restic is installed),
# and the native baselines: `cp -a` of a native copy for `files`, and
# `pg_dump` on the native cluster for `logical`.
#
# Datasets: the SQLite database of bench/gen_db.py (BENCH_EXPORT_SQLITE_MB,
# default 1024) and a pgbench cluster (BENCH_EXPORT_PG_SCALE, default 32,
# about 490 MiB). Each is backed up once into a fresh flr repository (and a
# restic one). Every timed run starts with a dropped page cache and
# reports wall time and peak RSS of the whole run (GNU time; for the
# manual paths, the larger of its two commands).
#
# Every measurement runs BENCH_ROUNDS times (default 2), a round being one
# pass over all of them, the second in reverse order (each path runs
# once early and once late: on this VM the same command varies by a
# third from one minute to the next). The report gives the median and the
# range.
#
# Usage (as root: drops the page cache, mounts FUSE, runs PostgreSQL as
# the postgres user): bench/export.sh
# Environment: BENCH_WORK (default bench/work; this script uses
# BENCH_WORK/export), BENCH_OUT (report path, default
# bench/results/<date>-export.md), BENCH_ROUNDS, BENCH_SKIP_INSTALL (do
# not apt-get install restic and the tools).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FLR="$ROOT/target/release/flr"
[ -x "$FLR" ] || { echo "build first: cargo build --release -p mountd" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
SQLITE_MB=${BENCH_EXPORT_SQLITE_MB:-1024}
PG_SCALE=${BENCH_EXPORT_PG_SCALE:-32}
ROUNDS=${BENCH_ROUNDS:-2}
WORK=${BENCH_WORK:-$ROOT/bench/work}/export
OUT=${BENCH_OUT:-$ROOT/bench/results/$(date -u +%Y-%m-%d)-export.md}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
mkdir -p "$WORK"
chmod 755 "$WORK" "$(dirname "$WORK")"
RUN=$WORK/run
SERVER_PID=""
cleanup() {
    [ -d "$RUN/native-pg" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$RUN/native-pg" -m fast stop >/dev/null 2>&1 || true
    [ -d "$RUN/restored-pg/pgdata" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$RUN/restored-pg/pgdata" -m immediate stop >/dev/null 2>&1 || true
    [ -d "$RUN/restored-pg${PG_SRC:-/none}/pgdata" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$RUN/restored-pg$PG_SRC/pgdata" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$RUN"
}
trap cleanup EXIT
rm -rf "$RUN"
mkdir -p "$RUN"
chmod 755 "$RUN"
# The peers and tools, from Debian, unless BENCH_SKIP_INSTALL is set.
need_pkgs=()
for tool in restic:restic sqlite3:sqlite3 zstd:zstd /usr/bin/time:time; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_pkgs+=("${tool#*:}")
done
if [ ${#need_pkgs[@]} -gt 0 ] && [ -z "${BENCH_SKIP_INSTALL:-}" ]; then
    echo "installing: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=1200 install -y "${need_pkgs[@]}" >"$WORK/apt.log" 2>&1 \
        || { apt-get -o DPkg::Lock::Timeout=1200 update >>"$WORK/apt.log" 2>&1 || true
             apt-get -o DPkg::Lock::Timeout=1200 install -y "${need_pkgs[@]}" >>"$WORK/apt.log" 2>&1; } \
        || { echo "apt-get install failed, see $WORK/apt.log" >&2; exit 1; }
fi
HAVE_RESTIC=0
command -v restic >/dev/null && HAVE_RESTIC=1
export RESTIC_PASSWORD=bench-export

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# timed LABEL CMD...: runs CMD with a dropped cache; appends "LABEL secs rss_kib".
RESULTS=$RUN/results.txt
timed() {
    local label=$1; shift
    drop
    /usr/bin/time -f "%e %M" -o "$RUN/time.txt" "$@" >"$RUN/cmd.log" 2>&1 \
        || { echo "$label failed:"; cat "$RUN/cmd.log"; exit 1; }
    echo "$label $(cat "$RUN/time.txt")" >> "$RESULTS"
    echo "$label: $(cat "$RUN/time.txt") (s, KiB)"
}
# timed2 LABEL "CMD1" "CMD2": two timed shell commands, time summed, RSS max.
timed2() {
    local label=$1
    drop
    /usr/bin/time -f "%e %M" -o "$RUN/t1.txt" bash -c "$2" >"$RUN/cmd.log" 2>&1 || { echo "$label (1) failed"; cat "$RUN/cmd.log"; exit 1; }
    /usr/bin/time -f "%e %M" -o "$RUN/t2.txt" bash -c "$3" >>"$RUN/cmd.log" 2>&1 || { echo "$label (2) failed"; cat "$RUN/cmd.log"; exit 1; }
    read -r s1 m1 < "$RUN/t1.txt"; read -r s2 m2 < "$RUN/t2.txt"
    local s m
    s=$(python3 -c "print(round($s1 + $s2, 2))")
    m=$(( m1 > m2 ? m1 : m2 ))
    echo "$label $s $m" >> "$RESULTS"
    echo "$label: $s $m (s, KiB)"
}

# ------------------------------------------------------------ datasets
python3 bench/gen_db.py --size-mb "$SQLITE_MB" --out "$WORK/sqlite-$SQLITE_MB" >/dev/null
LITE_SRC=$WORK/sqlite-$SQLITE_MB/v1
PG_SRC=$WORK/pg-s$PG_SCALE
if [ ! -f "$PG_SRC/pgdata/PG_VERSION" ]; then
    rm -rf "$PG_SRC"; mkdir -p "$PG_SRC/pgdata"; chown -R postgres "$PG_SRC"
    runuser -u postgres -- "$PGBIN/initdb" -D "$PG_SRC/pgdata" -A trust -U postgres >/dev/null
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PG_SRC/pgdata" -w -o "-c port=54391 -c listen_addresses='' -c unix_socket_directories=/tmp" start >/dev/null
    runuser -u postgres -- "$PGBIN/pgbench" -h /tmp -p 54391 -U postgres -i -s "$PG_SCALE" -q postgres >/dev/null 2>&1
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PG_SRC/pgdata" -m fast -w stop >/dev/null
fi
LITE_BYTES=$(stat -c %s "$LITE_SRC/bench.db")
PG_BYTES=$(du -sb "$PG_SRC/pgdata" | cut -f1)

"$FLR" init "$RUN/repo" >/dev/null 2>&1
"$FLR" backup --repo "$RUN/repo" --job lite --quiet "$LITE_SRC/bench.db"
"$FLR" backup --repo "$RUN/repo" --job pg --quiet "$PG_SRC/pgdata"
if [ $HAVE_RESTIC = 1 ]; then
    restic -r "$RUN/restic" init -q >/dev/null
    restic -r "$RUN/restic" --cache-dir "$RUN/restic-cache" backup -q --tag lite "$LITE_SRC/bench.db" >/dev/null
    restic -r "$RUN/restic" --cache-dir "$RUN/restic-cache" backup -q --tag pg "$PG_SRC/pgdata" >/dev/null
fi
STAGE=$RUN/staging

export_run() { # LABEL RP PATH FORMAT [extra...]
    local label=$1 rp=$2 path=$3 format=$4; shift 4
    rm -rf "$RUN/out"
    timed "$label" "$FLR" export --repo "$RUN/repo" "$rp" --path "$path" --format "$format" \
        --to "$RUN/out" --staging "$STAGE" --local --quiet "$@"
}
fresh() { rm -rf "$RUN/out" "$RUN/restored" "$RUN/restored-pg"; mkdir -p "$RUN/out"; chown postgres "$RUN/out"; }

# The measurements, one per line of MEASURES: each a shell command line.
# A round runs them in order; the next round in reverse order.
LITE_DB_REL=bench.db
PG_REL=pgdata
PGRUN="runuser -u postgres -- $PGBIN"
# dump_restored DATADIR: start a server on a restored data directory,
# pg_dump it, stop it (as one shell command for timed2).
dump_restored() {
    echo "chown -R postgres $RUN/restored-pg && $PGRUN/pg_ctl -D $1 -w -o \"-c port=54392 -c listen_addresses='' -c unix_socket_directories=/tmp\" start >/dev/null && $PGRUN/pg_dump -h /tmp -p 54392 -U postgres -Fc -f $RUN/out/postgres.dump postgres && $PGRUN/pg_ctl -D $1 -m fast -w stop >/dev/null"
}
DUMP_RESTORED=$(dump_restored "$RUN/restored-pg/$PG_REL")
native_pg() { # start|stop the source cluster, for pg_dump on it
    if [ "$1" = start ]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PG_SRC/pgdata" -w -o "-c port=54391 -c listen_addresses='' -c unix_socket_directories=/tmp" start >/dev/null
    else
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PG_SRC/pgdata" -m fast -w stop >/dev/null
    fi
}
MEASURES=(
    "export_run lite-files-flr lite $LITE_DB_REL files"
    "export_run lite-archive-flr lite $LITE_DB_REL archive"
    "export_run lite-logical-flr lite $LITE_DB_REL logical"
    "fresh; timed lite-files-cp cp -a '$LITE_SRC/bench.db' '$RUN/out/'"
    # The export syncs what it wrote before it renames it into place;
    # cp -a does not. The same copy with a sync, for reference.
    "fresh; timed lite-files-cpsync bash -c \"cp -a '$LITE_SRC/bench.db' '$RUN/out/' && sync\""
    "fresh; timed lite-files-manual '$FLR' restore --repo '$RUN/repo' lite --to '$RUN/restored' --quiet"
    "fresh; timed2 lite-archive-manual \"$FLR restore --repo $RUN/repo lite --to $RUN/restored --quiet\" \"sqlite3 $RUN/restored/$LITE_DB_REL \\\".backup '$RUN/out/bench.db'\\\"\""
    "fresh; timed2 lite-logical-manual \"$FLR restore --repo $RUN/repo lite --to $RUN/restored --quiet\" \"sqlite3 $RUN/restored/$LITE_DB_REL .dump > $RUN/out/bench.sql\""
    "fresh; timed lite-logical-native bash -c \"sqlite3 '$LITE_SRC/bench.db' .dump > '$RUN/out/bench.sql'\""
    "export_run pg-files-flr pg $PG_REL files"
    "export_run pg-archive-flr pg $PG_REL archive"
    "export_run pg-logical-flr pg $PG_REL logical"
    "fresh; timed pg-files-cp cp -a '$PG_SRC/pgdata' '$RUN/out/'"
    "fresh; timed pg-files-cpsync bash -c \"cp -a '$PG_SRC/pgdata' '$RUN/out/' && sync\""
    "fresh; timed pg-files-manual '$FLR' restore --repo '$RUN/repo' pg --to '$RUN/restored-pg' --quiet"
    "fresh; timed2 pg-archive-manual \"$FLR restore --repo $RUN/repo pg --to $RUN/restored-pg --quiet\" \"tar -cf $RUN/out/pgdata.tar -C $RUN/restored-pg/$PG_REL .\""
    "fresh; timed2 pg-logical-manual \"$FLR restore --repo $RUN/repo pg --to $RUN/restored-pg --quiet\" \"\$DUMP_RESTORED\""
    # Native pg_dump on the source cluster, running.
    "native_pg start; fresh; timed pg-logical-native runuser -u postgres -- '$PGBIN/pg_dump' -h /tmp -p 54391 -U postgres -Fc -f '$RUN/out/postgres.dump' postgres; native_pg stop"
)
if [ $HAVE_RESTIC = 1 ]; then
    MEASURES+=(
        "fresh; timed lite-files-restic restic -r '$RUN/restic' --cache-dir '$RUN/restic-cache' restore latest --tag lite --target '$RUN/restored' -q"
        "fresh; timed2 lite-logical-restic \"restic -r $RUN/restic --cache-dir $RUN/restic-cache restore latest --tag lite --target $RUN/restored -q\" \"sqlite3 $RUN/restored$LITE_SRC/$LITE_DB_REL .dump > $RUN/out/bench.sql\""
        "fresh; timed pg-files-restic restic -r '$RUN/restic' --cache-dir '$RUN/restic-cache' restore latest --tag pg --target '$RUN/restored-pg' -q"
        # restic restores the source's absolute path below its target.
        "fresh; timed2 pg-logical-restic \"restic -r $RUN/restic --cache-dir $RUN/restic-cache restore latest --tag pg --target $RUN/restored-pg -q\" \"\$(dump_restored $RUN/restored-pg$PG_SRC/$PG_REL)\""
    )
fi
for round in $(seq 1 "$ROUNDS"); do
    echo "round $round of $ROUNDS"
    if [ $((round % 2)) = 1 ]; then
        for ((k = 0; k < ${#MEASURES[@]}; k++)); do eval "${MEASURES[$k]}"; done
    else
        for ((k = ${#MEASURES[@]} - 1; k >= 0; k--)); do eval "${MEASURES[$k]}"; done
    fi
done

# ------------------------------------------------------------ report
mkdir -p "$(dirname "$OUT")"
python3 - "$RESULTS" "$OUT" "$LITE_BYTES" "$PG_BYTES" "$PG_SCALE" "$HAVE_RESTIC" <<'PY'
import sys, platform, datetime, os
res, out, lite_b, pg_b, scale, restic = sys.argv[1:]
import statistics
runs = {}
for line in open(res):
    label, secs, rss = line.split()
    runs.setdefault(label, []).append((float(secs), int(rss)))
# Per label: (median seconds, largest peak RSS, every run's seconds).
r = {label: (statistics.median(s for s, _ in v), max(m for _, m in v), sorted(s for s, _ in v))
     for label, v in runs.items()}
def row(label):
    if label not in r:
        return "—", "—"
    s, m, all_s = r[label]
    spread = f" ({all_s[0]:.2f}–{all_s[-1]:.2f})" if len(all_s) > 1 else ""
    return f"{s:.2f} s{spread}", f"{m / 1024:.0f}"
def ratio(a, b):
    if a in r and b in r and r[a][0] > 0:
        return f"{r[b][0] / r[a][0]:.2f}x"
    return "—"
lines = [f"# Export benchmark, {datetime.date.today()}", "",
         f"Host: {platform.node()}, {os.cpu_count()} CPUs. Page cache dropped before every run.",
         f"SQLite database: {int(lite_b) / 2**20:.0f} MiB (bench/gen_db.py). PostgreSQL: pgbench -s {scale}, data directory {int(pg_b) / 2**20:.0f} MiB, backed up stopped.",
         f"Wall seconds (median of {max(len(v) for v in runs.values())} runs, each in its own round; fastest–slowest) / peak RSS MiB (largest). Manual path = `flr restore` of the restore point, then the engine's tool; two commands: time summed, RSS the larger.",
         "" if restic == "1" else "restic is not installed on this host: its rows are empty.", ""]
for db in ["lite", "pg"]:
    lines += [f"## {'SQLite' if db == 'lite' else 'PostgreSQL'}", "",
              "| format | flr export | manual (flr restore + tool) | restic restore + tool | native | flr vs manual | flr vs native |",
              "|---|---|---|---|---|---|---|"]
    for fmt in ["files", "archive", "logical"]:
        native = f"{db}-{fmt}-cp" if fmt == "files" else f"{db}-{fmt}-native"
        cells = []
        for lab in [f"{db}-{fmt}-flr", f"{db}-{fmt}-manual", f"{db}-{fmt}-restic", native]:
            s, m = row(lab)
            cells.append(f"{s} / {m} MiB" if s != "—" else "—")
        lines.append(f"| {fmt} | " + " | ".join(cells) +
                     f" | {ratio(f'{db}-{fmt}-flr', f'{db}-{fmt}-manual')} | {ratio(f'{db}-{fmt}-flr', native)} |")
    if f"{db}-files-cpsync" in r:
        lines.append(f"`cp -a` followed by `sync` (the export syncs before it renames): {r[f'{db}-files-cpsync'][0]:.2f} s.")
    lines.append("")
lines += ["Ratios are the other path's time over flr's: above 1 means flr is faster.",
          "Native for files is `cp -a` of the source file or data directory; for logical, `sqlite3 .dump` / `pg_dump -Fc` on the source.", ""]
open(out, "w").write("\n".join(lines))
print("\n".join(lines))
PY
