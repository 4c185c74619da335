//! Retention and garbage collection, shared by the local and the S3
//! suites: `flr forget` and `flr prune` wrappers, a clean-verify check, and
//! the scenario of a prune beside a backup that reuses the chunks the
//! prune would delete.
//!
//! A repository is named twice where it matters: `repo` runs the commands
//! (a directory or an `s3://` URL), `disk` is where its objects are files
//! to look at (the same directory for a local repository, the S3 server's
//! directory of the prefix for one on s3s-fs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::rng::Rng;
use crate::tree::{assert_cmp, MIB};
use crate::TestRepo;

/// `flr verify --read-data --json` finds no problem and no damage.
#[track_caller]
pub fn verify_clean(repo: &TestRepo) {
    let run = repo.verify_run(true).success();
    let v = run.json();
    assert!(
        v["problems"].as_array().is_some_and(|p| p.is_empty())
            && v["damaged"].as_object().is_some_and(|d| d.is_empty()),
        "verify --read-data is not clean: {v}"
    );
}

/// Files (not directories) under `sub`.
pub fn files(disk: &TestRepo, sub: &str) -> Vec<PathBuf> {
    disk.files_under(sub, "")
        .into_iter()
        .filter(|p| p.is_file())
        .collect()
}

pub fn pack_bytes(disk: &TestRepo) -> u64 {
    disk.packs()
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// `flr prune --json EXTRA...`; must succeed.
#[track_caller]
pub fn prune(repo: &TestRepo, extra: &[&str]) -> Value {
    repo.cmd("prune")
        .arg("--json")
        .args(extra)
        .run()
        .success()
        .json()
}

/// `flr forget --json EXTRA...`; must succeed.
#[track_caller]
pub fn forget(repo: &TestRepo, extra: &[&str]) -> Value {
    repo.cmd("forget")
        .arg("--json")
        .args(extra)
        .run()
        .success()
        .json()
}

/// The restore point names of a `keep` or `remove` list.
pub fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|d| d["restore_point"].as_str().unwrap().to_string())
        .collect()
}

/// Restores `rp` into `dir` (emptied first) and compares `file` in it
/// with `expect`.
#[track_caller]
pub fn restore_file(repo: &TestRepo, rp: &str, dir: &Path, file: &str, expect: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    repo.restore(rp, dir, &[] as &[&str]);
    assert_cmp(&dir.join(file), expect);
}

/// `flr backup --stdin-name NAME` whose input the test writes.
pub fn slow_backup(repo: &TestRepo, job: &str, name: &str) -> Child {
    let mut cmd = repo
        .cmd("backup")
        .args(["--job", job, "--stdin-name", name, "--json"])
        .into_command();
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("start flr backup")
}

pub fn writer_locks(disk: &TestRepo) -> usize {
    files(disk, "locks")
        .iter()
        .filter(|p| p.to_string_lossy().contains("/writer-"))
        .count()
}

#[track_caller]
pub fn wait_for_writer_lock(disk: &TestRepo) {
    let started = Instant::now();
    while writer_locks(disk) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the backup took no writer lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Restore point X, then Y; X is forgotten. A backup of X's bytes starts
/// and gets half of its input; two prunes run meanwhile and must only put
/// X's packs on a pending list; the backup ends, reusing X's chunks. Both
/// restore points then restore byte for byte and verify clean, before and
/// after the prune that decides about the pending packs (and rescues
/// them).
pub fn prune_beside_a_reusing_backup(repo: &TestRepo, disk: &TestRepo, tmp: &Path) {
    let mut rng = Rng::new(99);
    let x = rng.bytes(6 * MIB as usize);
    let y = rng.bytes(2 * MIB as usize);
    let x_file = tmp.join("x.bin");
    std::fs::write(&x_file, &x).unwrap();
    let y_file = tmp.join("y.bin");
    std::fs::write(&y_file, &y).unwrap();
    let store = |data: &[u8]| {
        repo.cmd("backup")
            .args(["--job", "a", "--stdin-name", "data.bin", "--json"])
            .stdin(data.to_vec())
            .run()
            .success()
            .json()["restore_point"]
            .as_str()
            .unwrap()
            .to_string()
    };
    store(&x);
    let kept = store(&y);
    forget(repo, &["--keep-last", "1"]);
    assert_eq!(repo.restore_point_names(), vec![kept.clone()]);
    let x_packs = disk.packs().len();

    // A backup of X starts (its lock and index come first), and gets the
    // first half of its input.
    let mut child = slow_backup(repo, "b", "data.bin");
    wait_for_writer_lock(disk);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&x[..3 * MIB as usize]).unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    // Two prunes meanwhile: X's packs only go pending, nothing is deleted.
    for round in 0..2 {
        let report = prune(repo, &[]);
        assert_eq!(report["packs_deleted"], 0, "round {round}: {report}");
        assert!(report["packs_pending"].as_u64().unwrap() >= 1, "{report}");
        assert!(
            report["waiting_for"]
                .as_array()
                .is_some_and(|w| w.len() == 1),
            "{report}"
        );
        eprintln!("prune {round} beside the backup: {report}");
    }
    assert_eq!(
        disk.packs().len(),
        x_packs,
        "a pack was deleted under the backup"
    );

    stdin.write_all(&x[3 * MIB as usize..]).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let b = v["restore_point"].as_str().unwrap().to_string();
    assert!(
        v["stats"]["added_bytes"].as_u64().unwrap() < MIB,
        "the backup did not reuse X's chunks: {v}"
    );

    // Both restore points are whole at once, and after the prune that
    // decides about the pending packs.
    let out = tmp.join("out");
    restore_file(repo, &b, &out, "data.bin", &x_file);
    restore_file(repo, &kept, &out, "data.bin", &y_file);
    verify_clean(repo);
    let report = prune(repo, &[]);
    assert!(report["packs_rescued"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(report["packs_pending"], 0, "{report}");
    restore_file(repo, &b, &out, "data.bin", &x_file);
    restore_file(repo, &kept, &out, "data.bin", &y_file);
    verify_clean(repo);
    assert!(files(disk, "pending").is_empty());
}
