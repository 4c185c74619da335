//! Retention and garbage collection: `flr forget` by policy, `flr prune`
//! freeing and repacking, delayed deletion beside a running backup that
//! reuses the chunks a prune would delete, a killed prune, locks.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flr_e2e::gc::{
    files, forget, names, pack_bytes, prune, prune_beside_a_reusing_backup, restore_file,
    slow_backup, verify_clean, wait_for_writer_lock,
};
use flr_e2e::rng::Rng;
use flr_e2e::tree::{assert_cmp, write_random_file, MIB};
use flr_e2e::{scratch, Mount, TestRepo};

#[test]
fn forget_keeps_by_policy_and_mounted_then_prune_frees_space() {
    let tmp = scratch("forget-prune");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let mut rng = Rng::new(12);
    let mut points = Vec::new();
    for i in 0..4 {
        let src = tmp.path().join(format!("src{i}"));
        std::fs::create_dir(&src).unwrap();
        write_random_file(&src.join("data.bin"), 3 * MIB, &mut rng);
        points.push((repo.backup("db", &[&src]).restore_point, src));
    }
    let before = repo.listing();

    // A policy that keeps nothing is refused.
    repo.cmd("forget").run().failure().stderr_has(&["--keep"]);

    let dry = forget(&repo, &["--keep-last", "2", "--dry-run"]);
    assert_eq!(
        names(&dry["keep"]),
        vec![points[3].0.clone(), points[2].0.clone()]
    );
    assert_eq!(dry["keep"][0]["reasons"], serde_json::json!(["last 1"]));
    assert_eq!(names(&dry["remove"]).len(), 2);
    assert_eq!(
        repo.listing(),
        before,
        "forget --dry-run changed the repository"
    );

    // The oldest is mounted: kept as "mounted" though the policy drops it.
    let mnt = tmp.path().join("mnt");
    let mount = Mount::background(&repo, &mnt, &["--restore-point", &points[0].0]);
    let report = forget(&repo, &["--keep-last", "1"]);
    assert_eq!(
        names(&report["keep"]),
        vec![points[3].0.clone(), points[0].0.clone()]
    );
    assert_eq!(report["keep"][1]["reasons"], serde_json::json!(["mounted"]));
    assert_eq!(
        names(&report["remove"]),
        vec![points[2].0.clone(), points[1].0.clone()]
    );
    assert_eq!(
        repo.restore_point_names(),
        vec![points[0].0.clone(), points[3].0.clone()]
    );
    assert_cmp(
        &mount.join(format!("{}/src0/data.bin", points[0].0)),
        &points[0].1.join("data.bin"),
    );
    mount.unmount();

    // Dry run: reports, changes nothing.
    let before = repo.listing();
    let dry = prune(&repo, &["--dry-run"]);
    assert!(dry["bytes_freed"].as_u64().unwrap() > 0, "{dry}");
    assert_eq!(
        repo.listing(),
        before,
        "prune --dry-run changed the repository"
    );

    let bytes_before = pack_bytes(&repo);
    let report = prune(&repo, &[]);
    let freed = report["bytes_freed"].as_u64().unwrap();
    assert!(freed >= 2 * 3 * MIB, "{report}");
    assert_eq!(report["packs_pending"], 0, "{report}");
    let bytes_after = pack_bytes(&repo);
    assert_eq!(bytes_before - bytes_after, freed, "{report}");
    eprintln!("prune freed {freed} of {bytes_before} pack bytes: {report}");
    assert!(files(&repo, "pending").is_empty());

    for (i, (rp, src)) in [(0, &points[0]), (3, &points[3])] {
        let file = format!("src{i}/data.bin");
        restore_file(
            &repo,
            rp,
            &tmp.path().join("out"),
            &file,
            &src.join("data.bin"),
        );
    }
    verify_clean(&repo);
    // Nothing more to do.
    let again = prune(&repo, &[]);
    assert_eq!(again["packs_deleted"], 0, "{again}");
}

/// One restore point of two files then one of the first alone: after the
/// first is forgotten, half of its pack is unused and is repacked.
fn repack_scenario(repo: &TestRepo, tmp: &Path) {
    let mut rng = Rng::new(7);
    let both = tmp.join("both");
    std::fs::create_dir(&both).unwrap();
    write_random_file(&both.join("a.bin"), 4 * MIB, &mut rng);
    write_random_file(&both.join("b.bin"), 4 * MIB, &mut rng);
    let first = repo.backup("app", &[&both]).restore_point;
    std::fs::remove_file(both.join("b.bin")).unwrap();
    let second = repo.backup("app", &[&both]).restore_point;
    assert!(
        repo.packs().len() == 1,
        "the second backup stored nothing new"
    );
    forget(repo, &["--keep-last", "1"]);
    assert_eq!(repo.restore_point_names(), vec![second.clone()]);
    assert_ne!(first, second);

    // 0% would repack anything unused; 60% leaves this pack alone.
    let lenient = prune(repo, &["--max-unused", "60%"]);
    assert_eq!(lenient["packs_repacked"], 0, "{lenient}");
    let report = prune(repo, &[]);
    assert_eq!(report["packs_repacked"], 1, "{report}");
    let rewritten = report["bytes_rewritten"].as_u64().unwrap();
    assert!((4 * MIB..5 * MIB).contains(&rewritten), "{report}");
    assert!(
        report["bytes_freed"].as_u64().unwrap() >= 8 * MIB,
        "{report}"
    );
    eprintln!("repack: {report}");
    let stored = pack_bytes(repo);
    assert!(stored < 5 * MIB, "{stored} bytes stay");
    restore_file(
        repo,
        &second,
        &tmp.join("out"),
        "both/a.bin",
        &both.join("a.bin"),
    );
    verify_clean(repo);
}

#[test]
fn prune_repacks_mostly_unused_packs() {
    let tmp = scratch("repack");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    repack_scenario(&repo, tmp.path());
}

#[test]
fn prune_repacks_in_an_encrypted_repository() {
    let tmp = scratch("repack-enc");
    let repo = TestRepo::init_encrypted(&tmp.path().join("repo"), "prune secret");
    repack_scenario(&repo, tmp.path());
}

#[test]
fn prune_beside_a_backup_that_reuses_forgotten_chunks() {
    let tmp = scratch("prune-concurrent");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    prune_beside_a_reusing_backup(&repo, &repo, tmp.path());
}

#[test]
fn a_backup_whose_lock_was_removed_commits_nothing() {
    let tmp = scratch("lock-lost");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let mut child = slow_backup(&repo, "b", "data.bin");
    wait_for_writer_lock(&repo);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&Rng::new(3).bytes(MIB as usize)).unwrap();
    // Live, so only --remove-all takes it.
    let kept = repo.cmd("unlock").arg("--json").run().success().json();
    assert_eq!(kept["kept"].as_array().unwrap().len(), 1, "{kept}");
    repo.cmd("unlock").arg("--remove-all").run().success();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the backup committed without its lock"
    );
    assert!(stderr.contains("was removed"), "{stderr}");
    assert!(repo.restore_point_names().is_empty());
}

#[test]
fn a_second_prune_is_refused_while_one_runs() {
    let tmp = scratch("prune-twice");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let store: Arc<dyn vfs_core::store::ObjectStore> =
        Arc::new(vfs_core::local_store::LocalStore::open(&repo.path).unwrap());
    let opened = vfs_core::repo::Repository::open(store, || Ok(Vec::new())).unwrap();
    // A live prune lock, held by this test's process.
    let held =
        vfs_core::lock::LockGuard::acquire(&opened, vfs_core::lock::LockKind::Prune, Vec::new())
            .unwrap();
    repo.cmd("prune")
        .run()
        .failure()
        .stderr_has(&["another prune is running", held.id()]);
    drop(held);
    prune(&repo, &[]);
}

#[test]
fn a_killed_prune_leaves_a_clean_repository_and_a_rerun_completes() {
    let tmp = scratch("prune-kill");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let mut rng = Rng::new(5);
    // Many restore points, each in packs of its own, all but one forgotten.
    let mut last = String::new();
    for _ in 0..24 {
        last = repo
            .cmd("backup")
            .args(["--job", "k", "--stdin-name", "d.bin", "--json"])
            .stdin(rng.bytes(MIB as usize / 2))
            .run()
            .success()
            .json()["restore_point"]
            .as_str()
            .unwrap()
            .to_string();
    }
    let last_data = tmp.path().join("last.bin");
    repo.restore(&last, &tmp.path().join("keep"), &[] as &[&str]);
    std::fs::rename(tmp.path().join("keep/d.bin"), &last_data).unwrap();
    forget(&repo, &["--keep-last", "1"]);
    let packs_before = repo.packs().len();

    // Kills stepping through the run, until one prune runs to its end;
    // after each, the repository verifies clean.
    let mut killed = 0;
    let mut midway = 0;
    let mut delay = Duration::from_millis(1);
    loop {
        let mut child = repo.cmd("prune").spawn_quiet();
        std::thread::sleep(delay);
        let status = match child.try_wait().unwrap() {
            Some(s) => s,
            None => {
                child.kill().unwrap();
                killed += 1;
                child.wait().unwrap()
            }
        };
        let packs = repo.packs().len();
        let indexes = repo.files_under("index", ".idx").len();
        let partial = packs > 1
            && (packs < packs_before || indexes < packs || !files(&repo, "pending").is_empty());
        if status.code() != Some(0) && partial {
            midway += 1;
        }
        restore_file(&repo, &last, &tmp.path().join("out"), "d.bin", &last_data);
        verify_clean(&repo);
        if status.code() == Some(0) {
            break;
        }
        assert!(delay < Duration::from_secs(20), "prune never finished");
        delay += Duration::from_micros(1500);
    }
    eprintln!("{killed} prunes killed, {midway} with the repository part-pruned");
    let report = prune(&repo, &[]);
    eprintln!("rerun: {report}");
    assert_eq!(report["packs_pending"], 0, "{report}");
    assert!(files(&repo, "pending").is_empty());
    assert!(files(&repo, "locks").is_empty(), "a lock was left behind");
    assert!(repo.packs().len() < packs_before);
    restore_file(&repo, &last, &tmp.path().join("out"), "d.bin", &last_data);
    verify_clean(&repo);
}
