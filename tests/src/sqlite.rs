//! Driving the real `sqlite3` command-line shell.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use crate::command::{run_with, Run, DEFAULT_TIMEOUT};

/// Runs `sql` (fed on stdin) against `db`, which may be a path or a
/// `file:` URI; stops at the first error (`-bail`). Does not assert.
pub fn sqlite3(db: impl AsRef<OsStr>, sql: &str) -> Run {
    run_with(
        Command::new("sqlite3").arg("-bail").arg(db.as_ref()),
        Some(sql.as_bytes()),
        DEFAULT_TIMEOUT,
    )
}

/// Page size of every database the tests create.
pub const PAGE_SIZE: u64 = 4096;

/// Creates `path` with one table `t(id INTEGER PRIMARY KEY, name TEXT,
/// payload BLOB)` of `rows` rows of about 230 bytes: a text name, then a
/// blob of 80 random bytes, 40 zero bytes and 60 digits, so pages are
/// partly compressible. About 18 rows fill a 4 KiB page.
pub fn create_wide_table(path: &Path, rows: u64) {
    let sql = format!(
        "PRAGMA page_size={PAGE_SIZE};
         PRAGMA journal_mode=OFF;
         PRAGMA synchronous=OFF;
         CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT NOT NULL, payload BLOB NOT NULL);
         WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {rows})
         INSERT INTO t
         SELECT i,
                printf('customer-%08d-%s', i, substr('alpha beta gamma delta epsilon zeta eta theta', 1 + i % 20, 16)),
                randomblob(80) || zeroblob(40) || CAST(printf('%060d', i) AS BLOB)
         FROM c;"
    );
    let r = sqlite3(path, &sql);
    assert!(
        r.status.success(),
        "creating {} failed: {r}",
        path.display()
    );
}

/// Creates `path` with `customers` and `orders` tables, secondary indexes
/// and deterministic contents (no random()): about `orders` x 120 bytes.
pub fn create_shop(path: &Path, customers: u64, orders: u64) {
    let sql = format!(
        "PRAGMA page_size={PAGE_SIZE};
         PRAGMA journal_mode=WAL;
         CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL);
         CREATE TABLE orders(id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                             amount_cents INTEGER NOT NULL, day TEXT NOT NULL, note TEXT NOT NULL);
         BEGIN;
         WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {customers})
         INSERT INTO customers
         SELECT i, printf('customer %06d', i),
                CASE i % 7 WHEN 0 THEN 'Paris' WHEN 1 THEN 'Lyon' WHEN 2 THEN 'Köln' WHEN 3 THEN 'Berlin'
                           WHEN 4 THEN 'Wien' WHEN 5 THEN 'Zürich' ELSE 'Genève' END
         FROM c;
         WITH RECURSIVE o(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM o WHERE i < {orders})
         INSERT INTO orders
         SELECT i, 1 + (i * 7919) % {customers}, (i * 104729) % 100000,
                date('2020-01-01', '+' || (i % 1500) || ' days'),
                printf('order %08d: %s', i, substr(hex(i * 2654435761), 1, 12)) || ' ' ||
                substr('lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor', 1 + i % 30, 50)
         FROM o;
         CREATE INDEX orders_by_customer ON orders(customer_id);
         CREATE INDEX orders_by_day ON orders(day, amount_cents);
         CREATE INDEX customers_by_city ON customers(city);
         COMMIT;
         PRAGMA wal_checkpoint(TRUNCATE);
         PRAGMA journal_mode=DELETE;"
    );
    let r = sqlite3(path, &sql);
    assert!(
        r.status.success(),
        "creating {} failed: {r}",
        path.display()
    );
}
