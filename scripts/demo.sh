#!/usr/bin/env bash
# The main job on an embedded default: make a sample SQLite database, back
# it up into a local repository, list restore points, restore and compare,
# then mount the restore point and query the database through the mount.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
FLR="$PWD/target/release/flr"
WORK="${FLR_DEMO_DIR:-/var/tmp/flr-demo}"
MNT="${FLR_DEMO_MOUNT:-/mnt/flr}"
SIZE_MB="${FLR_DEMO_MB:-300}"

cleanup() {
    if mountpoint -q "$MNT" 2>/dev/null; then fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT"; fi
}
trap cleanup EXIT
cleanup
rm -rf "$WORK/repo" "$WORK/restored"
mkdir -p "$WORK/src"

DB="$WORK/src/app.db"
if [ ! -s "$DB" ]; then
    echo "== making a sample database of about $SIZE_MB MiB: $DB"
    rows=$((SIZE_MB * 1024 * 1024 / 700))
    sqlite3 "$DB" >/dev/null <<SQL
PRAGMA page_size=4096; PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
CREATE TABLE orders(id INTEGER PRIMARY KEY, customer INTEGER, status TEXT, amount REAL, note TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < $rows)
INSERT INTO orders SELECT i, abs(random()) % 50000,
  CASE abs(random()) % 4 WHEN 0 THEN 'new' WHEN 1 THEN 'paid' WHEN 2 THEN 'shipped' ELSE 'returned' END,
  round(abs(random()) % 100000 / 100.0, 2),
  printf('order %d for customer %d: ', i, abs(random()) % 50000) || hex(randomblob(160)) || ' ' || substr(replace(hex(zeroblob(200)), '0', 'ab '), 1, 300)
FROM n;
CREATE INDEX orders_customer ON orders(customer);
SQL
fi
ls -lh "$DB"

echo "== init and back up"
"$FLR" init "$WORK/repo"
"$FLR" backup --repo "$WORK/repo" --job demo "$DB"
echo "== second backup after changing 1% of the rows"
sqlite3 "$DB" "UPDATE orders SET amount = amount + 1 WHERE id IN (SELECT id FROM orders ORDER BY random() LIMIT (SELECT count(*)/100 FROM orders));"
"$FLR" backup --repo "$WORK/repo" --job demo "$DB"
"$FLR" restore-points --repo "$WORK/repo"

echo "== restore the newest restore point and compare"
"$FLR" restore --repo "$WORK/repo" demo --to "$WORK/restored"
cmp "$DB" "$WORK/restored/app.db" && echo "restored file is byte-identical"

echo "== verify every chunk"
"$FLR" verify --repo "$WORK/repo" --read-data

echo "== mount at $MNT and query through the mount"
"$FLR" mount --repo "$WORK/repo" "$MNT" --background
ls -l "$MNT/demo/"
Q="SELECT status, count(*), round(sum(amount), 2) FROM orders GROUP BY status ORDER BY status;"
echo "query: $Q"
sqlite3 "file:$MNT/demo/latest/app.db?immutable=1" "$Q" | tee "$WORK/mounted.txt"
sqlite3 "file:$DB?immutable=1" "$Q" > "$WORK/source.txt"
cmp "$WORK/mounted.txt" "$WORK/source.txt" && echo "answers through the mount equal the source database's"
