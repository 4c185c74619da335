//! Backup and restore round trips through the real binary: every kind of
//! file, selective restore, deduplication of unchanged data, concurrent
//! backups, streams from stdin, and files that change while being read.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use flr_e2e::rng::{mixed_bytes, Rng};
use flr_e2e::tree::{
    allocated_bytes, assert_cmp, assert_same_tree, build_rich_tree, regular_files,
    write_random_file, MIB,
};
use flr_e2e::{scratch, TestRepo};

#[test]
fn restore_is_byte_identical_for_every_kind_of_file() {
    let tmp = scratch("restore-all");
    let src = tmp.path().join("src");
    let tree = build_rich_tree(&src, 1);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let backup = repo.backup("tree", &[&src]);
    assert_eq!(
        backup.stat("files"),
        regular_files(&src).len() as u64,
        "{}",
        backup.stats
    );
    assert_eq!(backup.stat("symlinks"), 4, "{}", backup.stats);

    let out = tmp.path().join("out");
    repo.restore(&backup.restore_point, &out, &[] as &[&str]);
    let restored = out.join("src");
    for rel in regular_files(&src) {
        assert_cmp(&src.join(&rel), &restored.join(&rel));
    }
    assert_same_tree(&src, &restored);
    let entries: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        entries,
        ["src"],
        "the restore point root holds exactly the backed-up path"
    );

    // Holes stay holes.
    let sparse = restored.join(tree.sparse);
    assert_eq!(fs::metadata(&sparse).unwrap().len(), tree.sparse_len);
    let allocated = allocated_bytes(&sparse);
    assert!(
        allocated < tree.sparse_len / 10,
        "restored sparse file has {allocated} bytes allocated of {} (source: {})",
        tree.sparse_len,
        allocated_bytes(&src.join(tree.sparse))
    );

    // Selected paths only: one file, one subtree.
    let sel = tmp.path().join("selected");
    let odd = format!("src/{}", tree.odd_file);
    let deep = format!("src/{}", tree.deep_dir);
    repo.restore(&backup.restore_point, &sel, &[odd.as_str(), deep.as_str()]);
    assert_cmp(&src.join(tree.odd_file), &sel.join(&odd));
    assert_same_tree(&src.join(tree.deep_dir), &sel.join(&deep));
    let mut got: Vec<String> = regular_files(&sel.join("src"))
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    got.retain(|p| !p.starts_with("deep/"));
    assert_eq!(
        got,
        [tree.odd_file],
        "selective restore wrote files that were not asked for"
    );
    assert!(!sel.join("src").join(tree.large).exists());

    // A path the restore point lacks is an error naming it.
    repo.restore_run(
        &backup.restore_point,
        &tmp.path().join("none"),
        &["src/no-such-file"],
    )
    .failure()
    .stderr_has(&["no-such-file"]);
}

#[test]
fn second_backup_of_unchanged_data_adds_almost_nothing() {
    let tmp = scratch("dedup");
    let src = tmp.path().join("data");
    fs::create_dir(&src).unwrap();
    let mut rng = Rng::new(2);
    for i in 0..8 {
        fs::write(
            src.join(format!("part-{i}.bin")),
            mixed_bytes(&mut rng, 3 * MIB as usize + i * 1000),
        )
        .unwrap();
    }
    write_random_file(&src.join("big.bin"), 20 * MIB, &mut rng);
    // A database-like file: stored as page chunks sharing frames.
    fs::write(
        src.join("pages.db"),
        mixed_bytes(&mut rng, 2 * MIB as usize),
    )
    .unwrap();
    let repo = TestRepo::init(&tmp.path().join("repo"));

    let first = repo.backup("daily", &[&src]);
    let second = repo.backup("daily", &[&src]);
    let (a1, a2) = (first.added_bytes(), second.added_bytes());
    assert!(a1 > 20 * MIB, "first backup stored only {a1} bytes");
    assert_eq!(
        second.stat("new_chunks"),
        0,
        "unchanged data stored new chunks: {}",
        second.stats
    );
    assert_eq!(second.stat("new_chunk_bytes"), 0, "{}", second.stats);
    assert!(
        a2 <= 64 * 1024 && a2 * 1000 < a1,
        "second backup of unchanged data added {a2} bytes (first: {a1})"
    );
    assert_ne!(first.restore_point, second.restore_point);

    let rps = repo.restore_points();
    assert_eq!(rps.len(), 2, "{rps:?}");
    let by_name = |name: &str| {
        rps.iter()
            .find(|rp| rp["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed in {rps:?}"))
    };
    let (l1, l2) = (
        by_name(&first.restore_point),
        by_name(&second.restore_point),
    );
    assert_eq!(l1["added_bytes"].as_u64(), Some(a1), "{l1}");
    assert_eq!(l2["added_bytes"].as_u64(), Some(a2), "{l2}");
    assert_eq!(
        l1["stored_bytes"], l2["stored_bytes"],
        "same data, same stored bytes"
    );
    assert_eq!(l1["logical_bytes"], l2["logical_bytes"]);
    // Each stored frame counts once, however many pages it holds: in a
    // fresh repository, the first restore point needs exactly what its
    // backup stored.
    assert_eq!(
        l1["stored_bytes"].as_u64(),
        Some(first.stat("new_chunk_bytes")),
        "{l1} vs {}",
        first.stats
    );
    assert_eq!(l2["job"], "daily");
    assert_eq!(l2["files"].as_u64(), Some(10));

    let out = tmp.path().join("out");
    repo.restore(&second.restore_point, &out, &[] as &[&str]);
    assert_same_tree(&src, &out.join("data"));
}

#[test]
fn two_backups_at_once_into_one_repository() {
    let tmp = scratch("concurrent");
    let src = tmp.path().join("shared");
    fs::create_dir(&src).unwrap();
    let mut rng = Rng::new(8);
    write_random_file(&src.join("random.bin"), 60 * MIB, &mut rng);
    fs::write(
        src.join("text.dat"),
        mixed_bytes(&mut rng, 8 * MIB as usize),
    )
    .unwrap();
    let repo = Arc::new(TestRepo::init(&tmp.path().join("repo")));

    let runs: Vec<_> = ["job-a", "job-b"]
        .into_iter()
        .map(|job| {
            let repo = repo.clone();
            let src = src.clone();
            thread::spawn(move || repo.backup_run(job, &[&src]))
        })
        .collect();
    let backups: Vec<_> = runs
        .into_iter()
        .map(|h| TestRepo::parse_backup(h.join().unwrap().success()))
        .collect();

    let names = repo.restore_point_names();
    assert_eq!(names.len(), 2, "{names:?}");
    for (i, b) in backups.iter().enumerate() {
        assert!(
            names.contains(&b.restore_point),
            "{} not listed in {names:?}",
            b.restore_point
        );
        let out = tmp.path().join(format!("out-{i}"));
        repo.restore(&b.restore_point, &out, &[] as &[&str]);
        assert_same_tree(&src, &out.join("shared"));
    }
    let v = repo.verify_run(true).success().json();
    assert_eq!(v["clean"], true, "{v}");
    assert_eq!(v["restore_points"], 2, "{v}");
}

#[test]
fn stream_from_stdin_restores_to_the_same_bytes() {
    let tmp = scratch("stdin");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let mut rng = Rng::new(9);
    let mut dump = b"-- SQL dump\nBEGIN;\n".to_vec();
    dump.extend_from_slice(&mixed_bytes(&mut rng, 24 * MIB as usize + 4321));
    dump.extend_from_slice(b"\nCOMMIT;\n");

    let run = repo
        .cmd("backup")
        .args(["--job", "dumps", "--stdin-name", "dump.sql", "--json"])
        .stdin(dump.clone())
        .run()
        .success();
    let backup = TestRepo::parse_backup(run);
    assert_eq!(backup.stat("files"), 1);
    assert_eq!(backup.stat("logical_bytes"), dump.len() as u64);

    let out = tmp.path().join("out");
    repo.restore(&backup.restore_point, &out, &[] as &[&str]);
    let restored = fs::read(out.join("dump.sql")).unwrap();
    assert!(
        restored == dump,
        "restored stream differs ({} vs {} bytes)",
        restored.len(),
        dump.len()
    );

    // The restore point holds exactly that one file.
    let entries: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["dump.sql"]);

    // An empty stream is a valid, empty file.
    let run = repo
        .cmd("backup")
        .args(["--job", "dumps", "--stdin-name", "empty.sql", "--json"])
        .stdin(Vec::new())
        .run()
        .success();
    let empty = TestRepo::parse_backup(run);
    let out = tmp.path().join("out-empty");
    repo.restore(&empty.restore_point, &out, &[] as &[&str]);
    assert_eq!(fs::metadata(out.join("empty.sql")).unwrap().len(), 0);
}

#[test]
fn file_growing_during_backup_is_reported_and_committed() {
    let tmp = scratch("changing");
    let src = tmp.path().join("live");
    fs::create_dir(&src).unwrap();
    let mut rng = Rng::new(10);
    write_random_file(&src.join("growing.log"), 150 * MIB, &mut rng);
    fs::write(src.join("steady.txt"), b"does not change\n").unwrap();
    let repo = TestRepo::init(&tmp.path().join("repo"));

    // The writer appends until the backup process has exited, so the
    // file changes during its read whatever the timing.
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        let path = src.join("growing.log");
        thread::spawn(move || {
            let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
            let block = vec![b'x'; 64 << 10];
            let mut appended = 0u64;
            while !done.load(Ordering::Relaxed) {
                f.write_all(&block).unwrap();
                appended += block.len() as u64;
                thread::sleep(Duration::from_millis(2));
            }
            appended
        })
    };
    let run = repo.backup_run("live", &[&src]);
    done.store(true, Ordering::Relaxed);
    let appended = writer.join().unwrap();
    assert!(appended > 0, "the writer never appended");

    let run = run.expect_code(3).stderr_has(&["growing.log"]);
    assert!(
        !run.stderr.contains("steady.txt"),
        "an unchanged file was reported as changed: {run}"
    );
    let backup = TestRepo::parse_backup(run);
    let changed = backup.stats["changed_while_reading"]
        .as_array()
        .expect("list")
        .clone();
    assert_eq!(changed.len(), 1, "{}", backup.stats);
    assert!(
        changed[0].as_str().unwrap().ends_with("growing.log"),
        "{}",
        backup.stats
    );
    assert_eq!(
        repo.restore_point_names(),
        vec![backup.restore_point.clone()],
        "the restore point is committed"
    );

    // What was read is restorable and is a prefix of the file as it is now.
    let out = tmp.path().join("out");
    repo.restore(&backup.restore_point, &out, &[] as &[&str]);
    let restored_len = fs::metadata(out.join("live/growing.log")).unwrap().len();
    assert!(
        restored_len >= 150 * MIB,
        "restored only {restored_len} bytes"
    );
    assert_prefix(&out.join("live/growing.log"), &src.join("growing.log"));
    assert_cmp(&src.join("steady.txt"), &out.join("live/steady.txt"));
}

/// Panics unless the file at `prefix` is a prefix of the file at `whole`.
fn assert_prefix(prefix: &Path, whole: &Path) {
    let len = fs::metadata(prefix).unwrap().len();
    let r = flr_e2e::command::tool(
        "cmp",
        [
            std::ffi::OsStr::new("-n"),
            std::ffi::OsStr::new(&len.to_string()),
            prefix.as_os_str(),
            whole.as_os_str(),
        ],
    );
    assert!(
        r.status.success(),
        "{} is not a prefix of {}: {r}",
        prefix.display(),
        whole.display()
    );
}
