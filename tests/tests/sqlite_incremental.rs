//! The incremental cost of a database that changes in place: a ~1 GiB
//! SQLite database, 1% of its rows updated at random, backed up twice.
//! Page-granular storage must re-store about the changed pages, not most
//! of the file (peers re-store 60-70% of it; see DESIGN.md).

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use flr_e2e::rng::Rng;
use flr_e2e::sqlite::{create_wide_table, sqlite3, PAGE_SIZE};
use flr_e2e::tree::{assert_cmp, MIB};
use flr_e2e::{scratch, TestRepo};

/// Rows of about 230 bytes: about 1 GiB.
const ROWS: u64 = 4_600_000;

/// BLAKE3 of every page of `path`.
fn page_hashes(path: &Path) -> Vec<blake3::Hash> {
    let mut f = File::open(path).unwrap();
    let mut buf = vec![0u8; (8 * MIB) as usize];
    let mut out = Vec::new();
    loop {
        let mut got = 0;
        while got < buf.len() {
            let n = f.read(&mut buf[got..]).unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            break;
        }
        assert_eq!(
            got as u64 % PAGE_SIZE,
            0,
            "file is not a whole number of pages"
        );
        out.extend(buf[..got].chunks(PAGE_SIZE as usize).map(blake3::hash));
        if got < buf.len() {
            break;
        }
    }
    out
}

#[test]
fn one_percent_of_rows_updated_stores_a_fraction_of_the_file() {
    let tmp = scratch("sqlite-1g");
    let dir = tmp.path().join("db");
    std::fs::create_dir(&dir).unwrap();
    let db = dir.join("app.db");
    let t = Instant::now();
    create_wide_table(&db, ROWS);
    let size = std::fs::metadata(&db).unwrap().len();
    eprintln!("created {size} bytes in {:?}", t.elapsed());
    assert!(
        (900 * MIB..1300 * MIB).contains(&size),
        "database is {size} bytes, not about 1 GiB"
    );
    let before = page_hashes(&db);

    let repo = TestRepo::init(&tmp.path().join("repo"));
    let t = Instant::now();
    let full = repo.backup("app", &[&dir]);
    eprintln!(
        "full backup: {} bytes added in {:?}",
        full.added_bytes(),
        t.elapsed()
    );

    // 1% of the rows, spread at random, rewritten with values of the same
    // size so every change happens in place on its page.
    let mut rng = Rng::new(3);
    let mut ids: Vec<u64> = (0..ROWS / 100).map(|_| 1 + rng.below(ROWS)).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut sql = String::from("CREATE TEMP TABLE picked(id INTEGER PRIMARY KEY);\n");
    for batch in ids.chunks(500) {
        let values: Vec<String> = batch.iter().map(|id| format!("({id})")).collect();
        sql += &format!("INSERT INTO picked VALUES {};\n", values.join(","));
    }
    sql += "UPDATE t SET payload = randomblob(80) || zeroblob(40) || CAST(printf('%060d', id + 7) AS BLOB)
            WHERE id IN picked;
            SELECT changes();";
    let r = sqlite3(&db, &sql);
    assert!(r.status.success(), "update failed: {r}");
    assert_eq!(r.stdout.trim(), ids.len().to_string(), "{r}");

    let after = page_hashes(&db);
    assert_eq!(
        before.len(),
        after.len(),
        "the update changed the file's size"
    );
    let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    let fraction = changed as f64 / after.len() as f64;
    eprintln!(
        "{} rows updated; {changed} of {} pages changed ({:.1}%)",
        ids.len(),
        after.len(),
        fraction * 100.0
    );
    assert!(
        (0.05..=0.40).contains(&fraction),
        "{:.1}% of pages changed: the workload is not the one this test is about",
        fraction * 100.0
    );

    let t = Instant::now();
    let incremental = repo.backup("app", &[&dir]);
    let ratio = incremental.added_bytes() as f64 / full.added_bytes() as f64;
    eprintln!(
        "incremental backup: {} bytes added in {:?} ({:.1}% of the full backup's)",
        incremental.added_bytes(),
        t.elapsed(),
        ratio * 100.0
    );
    assert!(
        ratio <= 0.40,
        "the incremental backup added {} bytes, {:.1}% of the full backup's {} (limit 40%) for {:.1}% changed pages",
        incremental.added_bytes(),
        ratio * 100.0,
        full.added_bytes(),
        fraction * 100.0
    );

    let out = tmp.path().join("out");
    repo.restore(&incremental.restore_point, &out, &[] as &[&str]);
    assert_cmp(&db, &out.join("db/app.db"));
    let check = sqlite3(
        format!("file:{}?immutable=1", out.join("db/app.db").display()),
        "PRAGMA integrity_check;",
    );
    assert_eq!(check.stdout.trim(), "ok", "{check}");
}
