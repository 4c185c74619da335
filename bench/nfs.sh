#!/usr/bin/env bash
# NFS benchmark: reads of one restore point through `flr mount --nfs` (NFSv3,
# read by libnfs in user space: this kernel has no NFS client) against the
# same restore point through the FUSE mount, with the native file as the
# reference, in one run. Written to bench/results/<date>-nfs.md (and printed).
#
# Dataset: the SQLite database of bench/gen_db.py (v1/bench.db, the same bytes
# run.sh uses), backed up with target/release/flr into a fresh repository,
# job `bench`. Every measurement is cold: the page cache is dropped after the
# flr process is started and before the timed read, and each measurement has
# its own flr process, so flr's in-memory cache starts empty.
#
#   sequential  the whole file: `dd bs=1M` of the native file and of the file
#               in the FUSE mount; `nfs-cat URL > /dev/null` through NFS
#   random      bench/nfs_randread.c (built here against libnfs): one job,
#               BENCH_NFS_READS reads of 8 KiB at distinct 8 KiB-aligned
#               blocks in a seeded order, the same offsets on every target;
#               pread(2) on the native file and on the FUSE path, libnfs's
#               synchronous nfs_pread through NFS; a sample of each run's
#               blocks is compared with the native file. With fio installed,
#               fio on the FUSE path too (psync, bs=8k, randread, as run.sh),
#               the same number of reads, to tie the numbers to run.sh's
#
# Usage (as root: it drops the page cache and mounts FUSE filesystems):
#   bench/nfs.sh
#   BENCH_SIZE_MB=64 BENCH_SKIP_BUILD=1 bench/nfs.sh      # quick run (about 1 min)
# Environment:
#   BENCH_SIZE_MB=1024      size of the SQLite database (MiB)
#   BENCH_SEED=20261101     dataset seed (same seed and size -> same bytes); also
#                           the seed of the random read order
#   BENCH_NFS_READS=20000   random reads per target (capped at the file's 8 KiB
#                           blocks: 8192 for 64 MiB)
#   BENCH_REPEAT=1          runs of every measurement; the median is reported
#   BENCH_WORK=bench/work   work directory: the dataset (WORK/data, shared with
#                           run.sh), this script's repository, mount point, tools
#                           and run state under WORK/nfs, logs in WORK/logs/nfs-*
#   BENCH_OUT=FILE          report path; default bench/results/<date>-nfs.md, or
#                           <date>-nfs-<size>mb.md for another size
#   BENCH_SKIP_INSTALL=1    do not apt-get install libnfs-utils, libnfs-dev, gcc,
#                           fuse3 and fio
#   BENCH_SKIP_BUILD=1      use target/release/flr as it is, do not build
#
# The exports and mounts it starts are recorded under WORK/nfs/run and stopped
# at the end, also on failure or Ctrl-C. A measurement that fails is shown as
# `n/a (reason)` and the run goes on; the script then exits 1.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"
ROOT=$(dirname "$HERE")
SIZE_MB=${BENCH_SIZE_MB:-1024}
SEED=${BENCH_SEED:-20261101}
READS=${BENCH_NFS_READS:-20000}
REPEAT=${BENCH_REPEAT:-1}
WORK=$(realpath -m "${BENCH_WORK:-$HERE/work}")
DATE=$(date -u +%F)
if [[ -n "${BENCH_OUT:-}" ]]; then
    OUT=$BENCH_OUT
elif [[ "$SIZE_MB" == 1024 ]]; then
    OUT=$HERE/results/$DATE-nfs.md
else
    OUT=$HERE/results/$DATE-nfs-${SIZE_MB}mb.md
fi

say() { printf '[nfs.sh %s] %s\n' "$(date +%T)" "$*" >&2; }

if [[ $(id -u) != 0 ]]; then
    say "warning: not root: the page cache cannot be dropped and FUSE mounts may fail"
fi

# Everything this script owns sits under NW, which also names every flr
# process it starts (--repo NW/repo), so bench_end_started can tell them apart
# from another driver's.
NW=$WORK/nfs
LOGS=$WORK/logs
REPO=$NW/repo
MNT=$NW/mnt/flr
RESULTS=$NW/run/results.tsv
JOB=bench
mkdir -p "$NW/run" "$NW/mnt" "$LOGS" "$HERE/results"
: > "$RESULTS"

# --- cleanup: stop what is still running, by the ids and mount points recorded
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # a signal that came while `flr mount --nfs --background` was starting
    # runs this before start_nfs recorded the pid it printed
    grep -o 'in the background (pid [0-9]*' "$NW/run/start.err" 2>/dev/null \
        | grep -o '[0-9]*$' >> "$NW/run/pids" || true
    bench_end_started "$NW"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- tools
need_pkgs=()
command -v nfs-cat >/dev/null 2>&1 || need_pkgs+=(libnfs-utils)
[[ -f /usr/include/nfsc/libnfs.h ]] || need_pkgs+=(libnfs-dev)
command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc)
command -v fusermount3 >/dev/null 2>&1 || need_pkgs+=(fuse3)
command -v fio >/dev/null 2>&1 || need_pkgs+=(fio)
if [[ ${#need_pkgs[@]} -gt 0 && -z "${BENCH_SKIP_INSTALL:-}" ]]; then
    say "installing: ${need_pkgs[*]} (waits for a running apt/dpkg to release its lock)"
    bench_apt_install "$LOGS/nfs-apt.log" "${need_pkgs[@]}" \
        || { say "apt-get install failed, see $LOGS/nfs-apt.log"; exit 1; }
fi
[[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || say "warning: /dev/fuse missing: the FUSE mount will fail"

RANDREAD=$NW/nfs_randread
say "building bench/nfs_randread.c"
gcc -O2 -Wall -o "$RANDREAD" "$HERE/nfs_randread.c" -lnfs 2> "$LOGS/nfs-randread-build.log" \
    || { say "gcc failed, see $LOGS/nfs-randread-build.log"; exit 1; }

# --- flr
FLR=$ROOT/target/release/flr
if [[ -z "${BENCH_SKIP_BUILD:-}" ]]; then
    say "cargo build --release (log: $LOGS/nfs-build.log)"
    (cd "$ROOT" && cargo build --release) > "$LOGS/nfs-build.log" 2>&1 \
        || { say "cargo build failed, see $LOGS/nfs-build.log"; exit 1; }
fi
[[ -x "$FLR" ]] || { say "no binary at target/release/flr"; exit 1; }
grep -q -- '--nfs' <<< "$("$FLR" mount --help 2>&1)" \
    || { say "this flr has no mount --nfs"; exit 1; }
FLR_REV=$(bench_flr_rev "$ROOT")

# --- dataset and repository
say "dataset: ${SIZE_MB} MiB, seed $SEED (reused when the checksums match)"
python3 "$HERE/gen_db.py" --size-mb "$SIZE_MB" --seed "$SEED" --out "$WORK/data" > "$LOGS/nfs-gen_db.json"
SRC=$WORK/data/v1/bench.db
SRC_BYTES=$(stat -c %s "$SRC")
SRC_SHA=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256_v1"])' "$WORK/data/dataset.json")

say "backing up into a fresh repository ($REPO)"
bench_end_started "$NW"   # an earlier run that was killed hard
: > "$NW/run/mounts"
rm -rf "$REPO"
"$FLR" init "$REPO" > "$LOGS/nfs-flr-init.log" 2>&1
"$FLR" backup --repo "$REPO" --job "$JOB" --quiet "$SRC" > "$LOGS/nfs-flr-backup.log" 2>&1
FILE_IN_RP=$JOB/latest/bench.db

# --- helpers
drop() { sync; { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null || true; }

# record TARGET KIND ok|error VALUE: one result line; VALUE is MiB/s for seq,
# nfs_randread's JSON for rand, the reason for an error.
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >> "$RESULTS"; }

# last_line FILE: the last non-empty line of a log, shortened, for a cell.
last_line() { grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n1 | cut -c1-100 || true; }

# The flr process serving the current measurement, and how to reach it.
SERVER_PID=""
NFS_PORT=""

# start_nfs: a fresh `flr mount --nfs` on a free loopback port.
start_nfs() {
    local err=$NW/run/start.err
    SERVER_PID="" NFS_PORT=""
    if ! "$FLR" mount --nfs 127.0.0.1:0 --repo "$REPO" --background > /dev/null 2> "$err"; then
        cat "$err" >> "$LOGS/nfs-export.log"
        START_ERROR="flr mount --nfs: $(last_line "$err")"
        return 1
    fi
    cat "$err" >> "$LOGS/nfs-export.log"
    SERVER_PID=$(grep -o 'in the background (pid [0-9]*' "$err" | grep -o '[0-9]*$' || true)
    NFS_PORT=$(grep -o 'exported over NFSv3 at 127\.0\.0\.1:[0-9]*' "$err" | grep -o '[0-9]*$' || true)
    [[ -n "$SERVER_PID" ]] && echo "$SERVER_PID" >> "$NW/run/pids"
    if [[ -z "$SERVER_PID" || -z "$NFS_PORT" ]]; then
        START_ERROR="no pid or port in flr's output"
        return 1
    fi
}

nfs_url() {
    printf 'nfs://127.0.0.1/%s?version=3&nfsport=%s&mountport=%s' "$1" "$NFS_PORT" "$NFS_PORT"
}

# start_fuse: a fresh `flr mount --background` at MNT.
start_fuse() {
    local err=$NW/run/start.err
    SERVER_PID=""
    mkdir -p "$MNT"
    mountpoint -q "$MNT" && fusermount3 -u "$MNT"
    echo "$MNT" >> "$NW/run/mounts"
    # the background process keeps writing its log (the read stats at unmount)
    if ! "$FLR" mount --repo "$REPO" "$MNT" --background > /dev/null 2>> "$LOGS/nfs-fuse.log"; then
        START_ERROR="flr mount: $(last_line "$LOGS/nfs-fuse.log")"
        return 1
    fi
    SERVER_PID=$(grep -o 'in the background (pid [0-9]*' "$LOGS/nfs-fuse.log" | tail -n1 | grep -o '[0-9]*$' || true)
    [[ -n "$SERVER_PID" ]] && echo "$SERVER_PID" >> "$NW/run/pids"
    [[ -f "$MNT/$FILE_IN_RP" ]] || { START_ERROR="$FILE_IN_RP not in the mount"; return 1; }
}

# stop_server: unmount (FUSE) or SIGTERM (NFS), then wait for the process to
# end, so the next measurement's process starts alone.
stop_server() {
    if mountpoint -q "$MNT" 2>/dev/null; then
        fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
    elif [[ -n "$SERVER_PID" ]]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ -n "$SERVER_PID" ]]; then
        for _ in $(seq 1 150); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$SERVER_PID" 2>/dev/null && kill -9 "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}

# seconds_since T0: wall seconds since an $EPOCHREALTIME reading.
seconds_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.6f", b - a }'; }
mib_per_s() { awk -v n="$SRC_BYTES" -v s="$1" 'BEGIN { printf "%.1f", n / 1048576 / s }'; }

# seq_read TARGET LOG CMD...: a cold, timed run of CMD that reads the whole file.
seq_read() {
    local target=$1 log=$2 t0 secs; shift 2
    drop
    t0=$EPOCHREALTIME
    if ! "$@" > /dev/null 2> "$log"; then
        record "$target" seq error "$(last_line "$log")"
        return 1
    fi
    secs=$(seconds_since "$t0")
    record "$target" seq ok "$(mib_per_s "$secs")"
    say "  $target sequential: $(mib_per_s "$secs") MiB/s"
}

# rand_read TARGET FILE_OR_URL: a cold nfs_randread run.
rand_read() {
    local target=$1 log=$LOGS/nfs-randread-$1.log out
    drop
    if ! out=$("$RANDREAD" "$2" "$READS" "$SEED" "$SRC" 2> "$log"); then
        record "$target" rand error "$(last_line "$log")"
        return 1
    fi
    record "$target" rand ok "$out"
    say "  $target random: $out"
}

# fio_read TARGET PATH: the same reads by fio, as run.sh measures them.
fio_read() {
    local target=$1 json=$LOGS/nfs-fio-$1.json n out
    n=$(( SRC_BYTES / 8192 < READS ? SRC_BYTES / 8192 : READS ))
    drop
    if ! fio --name=r --filename="${2//:/\\:}" --rw=randread --bs=8k --ioengine=psync \
            --direct=0 --invalidate=1 --readonly --numjobs=1 --number_ios="$n" \
            --randseed="$SEED" --output-format=json --output="$json" > "$LOGS/nfs-fio-$1.log" 2>&1; then
        record "$target" rand error "fio: $(last_line "$LOGS/nfs-fio-$1.log")"
        return 1
    fi
    out=$(python3 - "$json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]["read"]
clat = job["clat_ns"]
print(json.dumps({"reads": job["total_ios"], "seconds": job["runtime"] / 1000,
                  "reads_per_s": job["iops"], "mean_us": clat["mean"] / 1000,
                  "p99_us": clat["percentile"]["99.000000"] / 1000}))
PY
    )
    record "$target" rand ok "$out"
    say "  $target random: $out"
}

# session TARGET start_fn MEASURE...: one fresh flr process around one
# measurement; a process that does not start is recorded as the cell's error.
session() {
    local target=$1 start=$2 kind=$3; shift 3
    START_ERROR=""
    if ! "$start"; then
        record "$target" "$kind" error "$START_ERROR"
        stop_server
        return 1
    fi
    local rc=0
    "$@" || rc=$?
    stop_server
    return "$rc"
}

# Checked once per target, outside the timed runs: the bytes served match
# the dataset's checksum.
check_nfs() {
    local sum
    sum=$(nfs-cat "$(nfs_url "$FILE_IN_RP")" 2> "$LOGS/nfs-cat-check.log" | sha256sum | cut -d' ' -f1) \
        || { record nfs check error "nfs-cat: $(last_line "$LOGS/nfs-cat-check.log")"; return 1; }
    [[ "$sum" == "$SRC_SHA" ]] || { record nfs check error "sha256 differs from the dataset"; return 1; }
    record nfs check ok "$sum"
}
check_fuse() {
    local sum
    sum=$(sha256sum "$MNT/$FILE_IN_RP" 2> "$LOGS/nfs-sha-fuse.log" | cut -d' ' -f1) \
        || { record fuse check error "sha256sum: $(last_line "$LOGS/nfs-sha-fuse.log")"; return 1; }
    [[ "$sum" == "$SRC_SHA" ]] || { record fuse check error "sha256 differs from the dataset"; return 1; }
    record fuse check ok "$sum"
}
nfs_seq() { seq_read nfs "$LOGS/nfs-cat.log" nfs-cat "$(nfs_url "$FILE_IN_RP")"; }
nfs_rand() { rand_read nfs "$(nfs_url "$FILE_IN_RP")"; }
fuse_seq() { seq_read fuse "$LOGS/nfs-dd-fuse.log" dd if="$MNT/$FILE_IN_RP" of=/dev/null bs=1M status=none; }
fuse_rand() { rand_read fuse "$MNT/$FILE_IN_RP"; }
fuse_fio() { fio_read fuse-fio "$MNT/$FILE_IN_RP"; }

# --- measurements
FAILED=0
T_START=$EPOCHREALTIME
for round in $(seq 1 "$REPEAT"); do
    say "round $round of $REPEAT"
    seq_read native "$LOGS/nfs-dd-native.log" dd if="$SRC" of=/dev/null bs=1M status=none || FAILED=1
    rand_read native "$SRC" || FAILED=1
    session fuse start_fuse seq fuse_seq || FAILED=1
    session fuse start_fuse rand fuse_rand || FAILED=1
    if command -v fio >/dev/null 2>&1; then
        session fuse-fio start_fuse rand fuse_fio || FAILED=1
    fi
    session nfs start_nfs seq nfs_seq || FAILED=1
    session nfs start_nfs rand nfs_rand || FAILED=1
done
say "checking the bytes served (sha256, not timed)"
session fuse start_fuse check check_fuse || FAILED=1
session nfs start_nfs check check_nfs || FAILED=1
TOTAL_S=$(seconds_since "$T_START")

# --- report
export REPORT_DATE=$DATE REPORT_REV=$FLR_REV REPORT_BYTES=$SRC_BYTES REPORT_SEED=$SEED \
    REPORT_READS=$READS REPORT_REPEAT=$REPEAT REPORT_TOTAL_S=$TOTAL_S
python3 - "$RESULTS" "$OUT" <<'PY'
import json, os, platform, statistics, subprocess, sys

results, out = sys.argv[1:]
env = os.environ
size = int(env["REPORT_BYTES"])
reads = min(int(env["REPORT_READS"]), size // 8192)
cells = {}
for line in open(results):
    target, kind, status, value = line.rstrip("\n").split("\t", 3)
    cells.setdefault((target, kind), []).append((status, value))


def runs(target, kind):
    got = cells.get((target, kind), [])
    return [v for s, v in got if s == "ok"], [v for s, v in got if s == "error"]


def na(errors):
    return f"n/a ({errors[0]})" if errors else "—"


def seq_cell(target):
    ok, errors = runs(target, "seq")
    return f"{statistics.median(float(v) for v in ok):.0f}" if ok and not errors else na(errors)


def rand_cells(target):
    ok, errors = runs(target, "rand")
    if not ok or errors:
        return [na(errors)] * 3
    rs = [json.loads(v) for v in ok]
    return [f"{statistics.median(r[k] for r in rs):.0f}" for k in ("reads_per_s", "mean_us", "p99_us")]


def check_cell(target):
    ok, errors = runs(target, "check")
    return na(errors) if errors else ("sha256 matches" if ok else "—")


cpu = "unknown CPU"
try:
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
except OSError:
    pass
mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
libnfs = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libnfs-utils"],
                        capture_output=True, text=True).stdout.strip() or "unknown"

repeat = int(env["REPORT_REPEAT"])
runs_text = "One run per cell" if repeat == 1 else f"Median of {repeat} runs per cell"
share = reads / (size // 8192)

rows = [("native", "native file: `dd bs=1M` / pread"),
        ("fuse", "`flr mount` (FUSE): `dd bs=1M` / pread"),
        ("fuse-fio", "`flr mount` (FUSE): fio"),
        ("nfs", "`flr mount --nfs` (NFSv3, libnfs): `nfs-cat` / nfs_pread")]
L = [f"# flr over NFS against FUSE, {env['REPORT_DATE']}", "",
     f"Machine: {os.cpu_count()} cores ({cpu}), {mem_gib:.1f} GiB RAM, Linux {platform.release()}. "
     f"flr {env['REPORT_REV']}. Dataset: the SQLite database of bench/gen_db.py, {size / 2**20:.0f} MiB "
     f"({size} bytes, seed {env['REPORT_SEED']}), backed up into one fresh local repository; every row reads the same "
     f"restore point. libnfs {libnfs}. {runs_text}. "
     f"Harness time {float(env['REPORT_TOTAL_S']) / 60:.1f} min.", "",
     "| path | cold sequential MiB/s | cold random 8 KiB reads/s | mean latency µs | p99 latency µs | bytes served |",
     "|---|---|---|---|---|---|"]
for target, label in rows:
    if target == "fuse-fio":
        if not cells.get((target, "rand")):
            continue
        seq, served = "—", "—"
    else:
        seq = seq_cell(target)
        served = "(the reference)" if target == "native" else check_cell(target)
    L.append(f"| {label} | {seq} | " + " | ".join(rand_cells(target)) + f" | {served} |")
L += ["",
      "Cold everywhere: each FUSE or NFS measurement starts its own flr process (so flr's cache is "
      "empty), then `sync; echo 3 > /proc/sys/vm/drop_caches`, then the timed read; the process is "
      "stopped (unmounted, or SIGTERM for the export) before the next one starts. The export is "
      "`flr mount --nfs 127.0.0.1:0 --repo R --background`, NFS and MOUNT on one port, no portmapper. "
      "This kernel has no NFS client, so NFS is read by libnfs in user space over loopback TCP.",
      "",
      "Sequential: the whole file once, wall time of the command. `dd if=FILE of=/dev/null bs=1M` for "
      "native and FUSE (MNT/bench/latest/bench.db); "
      "`nfs-cat 'nfs://127.0.0.1/bench/latest/bench.db?version=3&nfsport=P&mountport=P' > /dev/null` for NFS. "
      "nfs-cat is a user-space libnfs client with no kernel readahead in front of it, while the kernel reads "
      "ahead for the FUSE mount, so the two sequential numbers differ in client as well as in transport.",
      "",
      f"Random: bench/nfs_randread.c, one job, {reads} reads of 8 KiB at distinct 8 KiB-aligned blocks, in "
      "an order drawn from the seed (the same offsets in every row), one read at a time. pread(2) with "
      "POSIX_FADV_RANDOM (no readahead; fio sets the same hint) on the native and FUSE paths, libnfs's "
      "synchronous nfs_pread (no libnfs readahead or page cache) for NFS. reads/s is reads over the wall "
      "time of the loop; latencies are per read, taken around each call. 32 of the blocks read, spread over "
      "the run, are compared with the native file afterwards, and a failed or short read fails the cell. "
      f"The reads touch {share:.0%} of the file's blocks: flr fetches and keeps whole frames (runs of chunks, "
      "far larger than 8 KiB), so the larger that share, the more reads flr serves from its memory. "
      "The fio row, when fio is installed, is run.sh's method on the FUSE path: `fio --rw=randread --bs=8k "
      f"--ioengine=psync --direct=0 --invalidate=1 --numjobs=1 --number_ios={reads}`.",
      "",
      "Bytes served: after the timed runs, one more fresh mount and export, and the sha256 of the whole "
      "file read through each (`sha256sum`, `nfs-cat | sha256sum`) against the dataset's.", ""]
text = "\n".join(L)
with open(out, "w") as f:
    f.write(text)
print(text)
PY
say "report written to $OUT"
if [[ $FAILED != 0 ]]; then
    say "some measurements failed: see the n/a cells and $LOGS/nfs-*"
    exit 1
fi
