#!/usr/bin/env bash
# The cost of a first write into a large file from a restore point: kernel
# overlayfs over the read-only flr mount (which copies the whole file up
# before the write returns) against a writable flr session (which stores
# only the bytes written).
#
# Usage (as root): bench/first_write.sh [SIZE_MB]   (default 1024)
# Builds nothing: uses target/release/flr. Prints a markdown table.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FLR="$(dirname "$HERE")/target/release/flr"
SIZE_MB=${1:-1024}
WORK=$(mktemp -d /var/tmp/flr-first-write-XXXXXX)

cleanup() {
    umount "$WORK/overlay" 2>/dev/null || true
    umount "$WORK/ro" 2>/dev/null || true
    umount "$WORK/rw" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/src" "$WORK/ro" "$WORK/rw" "$WORK/upper" "$WORK/ovwork" "$WORK/overlay"
# Incompressible data, so the restore point is as large as the file.
head -c "$((SIZE_MB << 20))" /dev/urandom > "$WORK/src/table.dat"
"$FLR" init "$WORK/repo" >/dev/null
"$FLR" backup --repo "$WORK/repo" --job big -q "$WORK/src"
RP=$("$FLR" restore-points --repo "$WORK/repo" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["name"])')

# One 8 KiB page written in the middle of the file, synced, timed.
first_write() {
    local file=$1
    sync
    echo 3 > /proc/sys/vm/drop_caches
    local t0 t1
    t0=$(date +%s.%N)
    dd if=/dev/zero of="$file" bs=8192 count=1 seek=$((SIZE_MB * 64)) conv=notrunc,fsync status=none
    t1=$(date +%s.%N)
    python3 -c "print(f'{$t1 - $t0:.3f}')"
}

"$FLR" mount --repo "$WORK/repo" --restore-point "$RP" "$WORK/ro" --background 2>/dev/null
mount -t overlay overlay -o "lowerdir=$WORK/ro/$RP,upperdir=$WORK/upper,workdir=$WORK/ovwork" "$WORK/overlay"
overlay_s=$(first_write "$WORK/overlay/src/table.dat")
overlay_mb=$(du -sm "$WORK/upper" | cut -f1)
umount "$WORK/overlay"
umount "$WORK/ro"

"$FLR" mount --repo "$WORK/repo" --restore-point "$RP" --writable --session fw \
    --state-dir "$WORK/state" "$WORK/rw" --background 2>/dev/null
session_s=$(first_write "$WORK/rw/src/table.dat")
session_kb=$(du -sk "$WORK/state/fw" | cut -f1)
umount "$WORK/rw"

echo "| first 8 KiB write (fsync) into a ${SIZE_MB} MiB file | seconds | stored for it |"
echo "|---|---:|---:|"
echo "| overlayfs over the read-only mount | $overlay_s | ${overlay_mb} MiB |"
echo "| writable session | $session_s | ${session_kb} KiB (whole session directory) |"
