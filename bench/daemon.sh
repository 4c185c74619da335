#!/usr/bin/env bash
# Mount daemon benchmark:
#  1. time from `POST /sessions` to a readable file under the mount;
#  2. aggregate throughput of 4 concurrent restore jobs (API) against
#     4 concurrent `cp -a` from the mount.
# Usage: bench/daemon.sh [REPO]   (REPO: an existing unencrypted repository;
# without it a 4 x 64 MiB one is made). Needs target/release/flr, curl, root.
set -euo pipefail
cd "$(dirname "$0")/.."
FLR="$PWD/target/release/flr"
[ -x "$FLR" ] || { echo "build first: cargo build --release -p mountd" >&2; exit 1; }
WORK=$(mktemp -d /tmp/flr-daemon-bench.XXXXXX)
SOCK="$WORK/mountd.sock"
DPID=""
cleanup() {
    [ -n "$DPID" ] && kill -TERM "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null || true
    grep -o " $WORK/mnt[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

REPO=${1:-}
if [ -z "$REPO" ]; then
    REPO="$WORK/repo"
    mkdir -p "$WORK/src"
    for i in 1 2 3 4; do
        head -c $((64 << 20)) /dev/urandom > "$WORK/src/file$i.bin"
    done
    "$FLR" init "$REPO" >/dev/null 2>&1
    "$FLR" backup --repo "$REPO" --job bench --quiet "$WORK/src"/file*.bin
    rm -rf "$WORK/src"
fi
RP=$("$FLR" restore-points --repo "$REPO" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["name"])')
mkdir -p "$WORK/restore"
cat > "$WORK/daemon.toml" <<CONF
[settings]
mount_root = "$WORK/mnt"
socket = "$SOCK"
restore_targets = ["$WORK/restore"]
restore_workers = 4
[repositories.bench]
path = "$REPO"
CONF
"$FLR" daemon --config "$WORK/daemon.toml" 2>"$WORK/daemon.log" &
DPID=$!
for _ in $(seq 100); do curl -sf --unix-socket "$SOCK" http://flr/health >/dev/null && break; sleep 0.05; done

api() { curl -sf --unix-socket "$SOCK" -H 'Content-Type: application/json' "$@"; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

# 1. API call to readable mount (cold: first session mounts; each round
#    ends the session so the next one mounts again).
FIRST=$("$FLR" restore-points --repo "$REPO" --json | python3 -c 'import json,sys; rp=[r for r in json.load(sys.stdin) if r["name"]=="'"$RP"'"]; print(rp[0]["name"])')
times=()
for round in 1 2 3 4 5; do
    t0=$(date +%s%N)
    S=$(api -X POST -d "{\"repository\":\"bench\",\"restore_point\":\"$FIRST\"}" http://flr/sessions)
    # Field extraction without a python start inside the timed region.
    P=$(sed -n 's/.*"path":"\([^"]*\)".*/\1/p' <<<"$S"); ID=$(sed -n 's/.*"id":"\([^"]*\)".*/\1/p' <<<"$S")
    for f in "$P"/*; do [ -f "$f" ] && head -c 4096 "$f" >/dev/null && break; done
    t1=$(date +%s%N)
    times+=($(( (t1 - t0) / 1000 )))
    api -X DELETE "http://flr/sessions/$ID" >/dev/null
done
echo "api-to-readable-mount (us, 5 rounds): ${times[*]}"

# 2a. 4 concurrent restore jobs, one file each (or the whole restore point
#     4 times when it has fewer files).
S=$(api -X POST -d "{\"repository\":\"bench\",\"restore_point\":\"$RP\"}" http://flr/sessions)
P=$(echo "$S" | json '["path"]'); SID=$(echo "$S" | json '["id"]')
mapfile -t FILES < <(cd "$P" && find . -type f | sed 's|^\./||' | sort | head -4)
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
t0=$(date +%s%N)
ids=()
for i in 0 1 2 3; do
    f=${FILES[$((i % ${#FILES[@]}))]}
    J=$(api -X POST -d "{\"repository\":\"bench\",\"restore_point\":\"$RP\",\"paths\":[\"$f\"],\"target\":\"$WORK/restore/job$i\"}" http://flr/restore-jobs)
    ids+=($(echo "$J" | json '["id"]'))
done
bytes=0
for id in "${ids[@]}"; do
    while :; do
        J=$(api "http://flr/restore-jobs/$id")
        st=$(sed -n 's/.*"state":"\([a-z]*\)".*/\1/p' <<<"$J")
        [ "$st" = done ] && break
        [ "$st" = failed ] || [ "$st" = cancelled ] && { echo "job $id $st: $J" >&2; exit 1; }
        sleep 0.05
    done
    bytes=$(( bytes + $(echo "$J" | json '["bytes_done"]') ))
done
t1=$(date +%s%N)
ms=$(( (t1 - t0) / 1000000 ))
echo "4 restore jobs: $bytes bytes in ${ms} ms = $(( bytes * 1000 / (ms > 0 ? ms : 1) / 1048576 )) MiB/s"

# 2b. 4 concurrent cp -a from the mount (fresh mount: cold chunk cache).
api -X DELETE "http://flr/sessions/$SID" >/dev/null
S=$(api -X POST -d "{\"repository\":\"bench\",\"restore_point\":\"$RP\"}" http://flr/sessions)
P=$(echo "$S" | json '["path"]')
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
t0=$(date +%s%N)
for i in 0 1 2 3; do
    f=${FILES[$((i % ${#FILES[@]}))]}
    mkdir -p "$WORK/restore/cp$i"
    cp -a "$P/$f" "$WORK/restore/cp$i/" &
done
wait $(jobs -p | grep -v "^$DPID$") 2>/dev/null || true
sync
t1=$(date +%s%N)
ms=$(( (t1 - t0) / 1000000 ))
cpbytes=$(du -sb "$WORK/restore"/cp* | awk '{s+=$1} END {print s}')
echo "4 x cp -a from the mount: $cpbytes bytes in ${ms} ms = $(( cpbytes * 1000 / (ms > 0 ? ms : 1) / 1048576 )) MiB/s"
