//! Faults on S3 repositories: flr against a real S3 server (s3s-fs)
//! through the fault-injecting proxy of `flr_e2e::fault_proxy`.
//!
//! - Every command (backup, restore, mount read by sqlite3, verify, copy
//!   S3 to local and local to S3, forget, prune) runs through 5xx answers,
//!   resets before and after the server acted, and delays, plain and
//!   encrypted; each succeeds (the store retries) or fails cleanly, and
//!   afterwards the repository verifies clean, every restore point is
//!   there and restores byte for byte.
//! - `kill -9` of a backup, a copy and a prune at exact points (the proxy
//!   freezes after the Nth pack PUT or DELETE): no partial restore point,
//!   verify clean, a rerun succeeds; a rerun copy uploads no pack that the
//!   killed one had stored.
//! - A prune beside a backup that reuses the chunks the prune would delete.
//!
//! Checks read the repository straight from the server (not through the
//! proxy), and its objects as the server's files.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use std::time::Instant;

use flr_e2e::command::Run;
use flr_e2e::fault_proxy::{Exchange, Fault, FaultPlan, FaultProxy};
use flr_e2e::gc::{files, forget, prune, prune_beside_a_reusing_backup, verify_clean};
use flr_e2e::mount::Mount;
use flr_e2e::rng::Rng;
use flr_e2e::s3::S3Server;
use flr_e2e::sqlite::{create_shop, sqlite3};
use flr_e2e::tree::{assert_cmp, assert_same_tree, write_random_file, MIB};
use flr_e2e::{scratch, Flr, TestRepo};

const BUCKET: &str = "backups";

/// One repository seen three ways: through the proxy (what the commands
/// under test use), straight from the server (what the checks use), and
/// as the server's files.
struct Views {
    faulty: TestRepo,
    direct: TestRepo,
    disk: TestRepo,
}

fn views(server: &S3Server, proxy: &FaultProxy, prefix: &str, password: Option<&str>) -> Views {
    let direct = server.init_repo(BUCKET, prefix, password);
    Views {
        faulty: TestRepo {
            path: direct.path.clone(),
            password: direct.password.clone(),
            env: proxy.env(),
        },
        disk: TestRepo {
            path: server.root.join(BUCKET).join(prefix),
            password: None,
            env: Vec::new(),
        },
        direct,
    }
}

/// A small tree: an incompressible file, text, many small files, an
/// empty directory and a symlink.
fn small_tree(root: &Path, seed: u64) {
    let mut rng = Rng::new(seed);
    std::fs::create_dir_all(root.join("sub/empty")).unwrap();
    write_random_file(&root.join("random.bin"), 3 * MIB, &mut rng);
    let text: String = (0..40_000)
        .map(|i| format!("line {i} of the notes\n"))
        .collect();
    std::fs::write(root.join("notes.txt"), text).unwrap();
    for i in 0..30 {
        std::fs::write(root.join(format!("sub/f{i}")), rng.bytes(1000 + 37 * i)).unwrap();
    }
    std::os::unix::fs::symlink("notes.txt", root.join("link")).unwrap();
}

/// Runs a command through the faults until it succeeds, at most three
/// times. Every failure must be clean: an exit code (no signal, no
/// panic) and a message that names the S3 repository at fault.
#[track_caller]
fn until_ok(what: &str, mut attempt: impl FnMut() -> Run) -> Run {
    for round in 1..=3 {
        let run = attempt();
        if run.status.success() {
            return run;
        }
        assert!(
            run.code().is_some() && !run.stderr.contains("panicked"),
            "{what}: not a clean failure: {run}"
        );
        assert!(
            run.stderr.contains("s3://"),
            "{what}: the error names no repository: {run}"
        );
        eprintln!(
            "{what}: attempt {round} failed cleanly: {}",
            run.stderr.trim()
        );
    }
    panic!("{what}: failed three times through the faults");
}

/// `flr copy --from A --to B --json`, with both repositories' passwords
/// and environments.
fn copy_cmd(from: &TestRepo, to: &TestRepo, args: &[&str]) -> Flr {
    let mut f = Flr::new(["copy", "--json", "--from"])
        .arg(&from.path)
        .arg("--to")
        .arg(&to.path)
        .args(args);
    for (k, v) in from.env.iter().chain(&to.env) {
        f = f.env(k, v);
    }
    if let Some(p) = &from.password {
        f = f.env("FLR_FROM_PASSWORD", p);
    }
    if let Some(p) = &to.password {
        f = f.env("FLR_TO_PASSWORD", p);
    }
    f
}

#[track_caller]
fn restore_equals(repo: &TestRepo, rp: &str, expected: &Path, out: &Path) {
    let _ = std::fs::remove_dir_all(out);
    until_ok(&format!("restore {rp}"), || {
        let _ = std::fs::remove_dir_all(out);
        repo.restore_run(rp, out, &[] as &[&str])
    });
    assert_same_tree(expected, &out.join(expected.file_name().unwrap()));
}

#[track_caller]
fn backup_json(repo: &TestRepo, job: &str, paths: &[&Path]) -> String {
    let run = until_ok(&format!("backup {job}"), || repo.backup_run(job, paths));
    run.json()["restore_point"]
        .as_str()
        .expect("the backup names its restore point")
        .to_string()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn commands_through_faults(test: &str, password: Option<&str>, seed: u64) {
    let tmp = scratch(test);
    let server = S3Server::start(&tmp.path().join("s3"), &[BUCKET]);
    let proxy = FaultProxy::start(server.port, FaultPlan::none());
    let repo = views(&server, &proxy, "flr", password);
    let archive = views(&server, &proxy, "archive", password.map(|_| "archive key"));
    proxy.set_plan(FaultPlan::mixed(seed, 20));
    let r = &repo.faulty;

    // Two restore points of a tree (the second after a change), one of a
    // SQLite database.
    let src = tmp.path().join("src");
    small_tree(&src, seed);
    let first = backup_json(r, "files", &[&src]);
    let before = tmp.path().join("before");
    flr_e2e::command::tool("cp", ["-a".as_ref(), src.as_os_str(), before.as_os_str()]).success();
    std::fs::write(src.join("notes.txt"), "changed notes\n").unwrap();
    std::fs::write(src.join("sub/added"), Rng::new(seed + 1).bytes(300_000)).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let second = backup_json(r, "files", &[&src]);
    let db_dir = tmp.path().join("db");
    std::fs::create_dir(&db_dir).unwrap();
    let db = db_dir.join("shop.db");
    create_shop(&db, 500, 8_000);
    sqlite3(&db, "PRAGMA wal_checkpoint(TRUNCATE);").success();
    let shop = backup_json(r, "shop", &[&db_dir]);
    let all = sorted(vec![first.clone(), second.clone(), shop.clone()]);
    assert_eq!(sorted(repo.direct.restore_point_names()), all);

    // Restores, byte for byte.
    let out = tmp.path().join("out");
    let before_view = tmp.path().join("before-view");
    std::fs::create_dir(&before_view).unwrap();
    std::fs::rename(&before, before_view.join("src")).unwrap();
    restore_equals(r, &first, &before_view.join("src"), &out);
    restore_equals(r, &second, &src, &out);

    // A read-only mount: sqlite3 queries through the kernel, every read
    // a range GET through the faults.
    {
        let mnt = tmp.path().join("mnt");
        let mount = Mount::background(r, &mnt, &["--job", "shop"]);
        let mounted = mount.join(format!("{shop}/db/shop.db"));
        assert_cmp(&db, &mounted);
        let uri = format!("file:{}?immutable=1", mounted.display());
        for q in [
            "SELECT count(*), sum(amount_cents) FROM orders;",
            "SELECT * FROM orders WHERE id IN (1, 777, 7999);",
        ] {
            let expected = sqlite3(&db, q).success();
            assert_eq!(sqlite3(&uri, q).success().stdout, expected.stdout, "{q}");
        }
        mount.unmount();
    }

    // Verify re-reads every pack through the faults.
    let v = until_ok("verify", || r.verify_run(true));
    assert_eq!(v.json()["clean"], true, "{v}");

    // S3 to a local repository (its own key, if encrypted), and back from
    // it to another S3 prefix.
    let local = match password {
        Some(_) => TestRepo::init_encrypted(&tmp.path().join("local"), "local key"),
        None => TestRepo::init(&tmp.path().join("local")),
    };
    let down = until_ok("copy s3 to local", || copy_cmd(r, &local, &[]).run());
    assert_eq!(down.json()["errors"], serde_json::json!([]), "{down}");
    assert_eq!(sorted(local.restore_point_names()), all);
    restore_equals(&local, &second, &src, &out);
    let up = until_ok("copy local to s3", || {
        copy_cmd(&local, &archive.faulty, &[]).run()
    });
    assert_eq!(up.json()["errors"], serde_json::json!([]), "{up}");
    assert_eq!(sorted(archive.direct.restore_point_names()), all);
    restore_equals(&archive.faulty, &first, &before_view.join("src"), &out);
    verify_clean(&archive.direct);

    // Forget the first restore point of the tree, prune what only it used.
    until_ok("forget", || {
        r.cmd("forget")
            .args(["--json", "--job", "files", "--keep-last", "1"])
            .run()
    });
    let pruned = until_ok("prune", || {
        r.cmd("prune").args(["--json", "--max-unused", "0%"]).run()
    })
    .json();
    eprintln!("prune through faults: {pruned}");
    assert!(pruned["bytes_freed"].as_u64().unwrap() > 0, "{pruned}");
    // Deletes are counted (object_store sends them as bulk-delete POSTs).
    assert!(
        pruned["requests"]["delete"].as_u64().unwrap() > 0,
        "{pruned}"
    );
    let kept = sorted(vec![second.clone(), shop.clone()]);
    assert_eq!(sorted(repo.direct.restore_point_names()), kept);
    restore_equals(r, &second, &src, &out);
    let out_db = tmp.path().join("out-db");
    until_ok("restore shop", || {
        let _ = std::fs::remove_dir_all(&out_db);
        r.restore_run(&shop, &out_db, &[] as &[&str])
    });
    assert_cmp(&db, &out_db.join("db/shop.db"));

    // Whatever the faults did, the repositories are whole.
    verify_clean(&repo.direct);
    verify_clean(&archive.direct);
    assert!(files(&repo.disk, "pending").is_empty());
    let injected = proxy.injected();
    eprintln!("{test}: {}", proxy.summary());
    for f in [
        Fault::Status500,
        Fault::Status503,
        Fault::ResetBeforeForward,
        Fault::ResetMidResponse,
        Fault::Delay,
    ] {
        assert!(
            injected.get(&f).copied().unwrap_or(0) > 0,
            "no {f:?} was injected: {}",
            proxy.summary()
        );
    }
}

#[test]
fn every_command_survives_faults_on_s3() {
    commands_through_faults("s3-faults", None, 41);
}

#[test]
fn every_command_survives_faults_on_an_encrypted_s3_repository() {
    commands_through_faults("s3-faults-enc", Some("fault password"), 42);
}

fn is_pack_put(e: &Exchange) -> bool {
    e.method == "PUT" && e.path.contains("/packs/") && e.succeeded_upstream()
}

/// A delete the server carried out: `object_store` sends each as a bulk
/// delete (`POST /BUCKET?delete`).
fn is_delete(e: &Exchange) -> bool {
    (e.method == "DELETE" || (e.method == "POST" && e.query == "delete")) && e.succeeded_upstream()
}

/// The pack objects the server holds, as their keys below the prefix.
fn pack_keys(disk: &TestRepo) -> BTreeSet<String> {
    disk.packs()
        .iter()
        .map(|p| {
            p.strip_prefix(&disk.path)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Starts `cmd`, waits until the proxy has frozen, kills it with SIGKILL
/// and thaws the proxy. Returns whether it was killed: with `may_finish`,
/// a command that ends (successfully) before the proxy freezes is fine.
#[track_caller]
fn kill_when_frozen(what: &str, cmd: Flr, proxy: &FaultProxy, may_finish: bool) -> bool {
    let mut child = cmd.spawn_quiet();
    let started = Instant::now();
    let mut ended = None;
    while !proxy.is_frozen() && started.elapsed() < Duration::from_secs(120) {
        ended = child.try_wait().unwrap();
        if ended.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let frozen = proxy.is_frozen();
    let _ = child.kill();
    let _ = child.wait();
    proxy.thaw();
    if let Some(status) = ended {
        assert!(
            may_finish && status.success(),
            "{what}: ended by itself before the kill: {status} ({})",
            proxy.summary()
        );
        return false;
    }
    assert!(
        frozen,
        "{what}: the proxy never froze ({})",
        proxy.summary()
    );
    true
}

#[test]
fn a_killed_backup_on_s3_leaves_no_restore_point_and_a_rerun_succeeds() {
    let tmp = scratch("s3-kill-backup");
    let server = S3Server::start(&tmp.path().join("s3"), &[BUCKET]);
    let proxy = FaultProxy::start(server.port, FaultPlan::none());
    let repo = views(&server, &proxy, "flr", None);
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    write_random_file(&src.join("big.bin"), 80 * MIB, &mut Rng::new(3));

    // Killed once the first pack is stored, before its index file is.
    proxy.freeze_after(1, is_pack_put);
    kill_when_frozen(
        "backup",
        repo.faulty
            .cmd("backup")
            .args(["--job", "big", "--quiet"])
            .arg(&src),
        &proxy,
        false,
    );
    assert!(!repo.disk.packs().is_empty(), "no pack was stored");
    assert!(
        repo.direct.restore_point_names().is_empty(),
        "a killed backup left a restore point"
    );
    verify_clean(&repo.direct);

    let rp = backup_json(&repo.faulty, "big", &[&src]);
    assert_eq!(repo.direct.restore_point_names(), vec![rp.clone()]);
    verify_clean(&repo.direct);
    restore_equals(&repo.direct, &rp, &src, &tmp.path().join("out"));
}

/// Pack bytes the server holds for `disk`.
fn stored_pack_bytes(disk: &TestRepo) -> u64 {
    disk.packs()
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

/// A copy to S3 killed after its first stored pack (whose index file it
/// never wrote), a rerun killed after its first pack, a third run to the
/// end. No run may send a pack the server holds when it starts (a plain
/// destination would make the very same pack again), nor the chunks of
/// one (an encrypted destination seals them anew, into another pack): the
/// packs stored over all runs add up to what one uninterrupted copy
/// stores.
fn killed_copy_resumes(test: &str, password: Option<&str>) {
    let tmp = scratch(test);
    let server = S3Server::start(&tmp.path().join("s3"), &[BUCKET]);
    let proxy = FaultProxy::start(server.port, FaultPlan::none());
    let to = views(&server, &proxy, "archive", password);
    let fresh = views(&server, &proxy, "fresh", password);
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    write_random_file(&src.join("big.bin"), 80 * MIB, &mut Rng::new(8));
    let from = TestRepo::init(&tmp.path().join("from"));
    let rp = from.backup("big", &[&src]).restore_point;
    copy_cmd(&from, &fresh.direct, &["--quiet"]).run().success();
    let one_copy = stored_pack_bytes(&fresh.disk);

    let mut landed = 0;
    for round in 1..=3 {
        let there = pack_keys(&to.disk);
        proxy.clear_log();
        let cmd = copy_cmd(&from, &to.faulty, &["--quiet"]);
        let killed = if round < 3 {
            proxy.freeze_after(1, is_pack_put);
            kill_when_frozen(&format!("copy round {round}"), cmd, &proxy, round > 1)
        } else {
            cmd.run().success();
            false
        };
        if killed {
            assert!(
                to.direct.restore_point_names().is_empty(),
                "a killed copy left a restore point"
            );
            verify_clean(&to.direct);
            assert!(
                pack_keys(&to.disk).len() > there.len(),
                "round {round} stored no pack before it was killed"
            );
        }
        let log = proxy.log();
        let again: Vec<&Exchange> = log
            .iter()
            .filter(|e| {
                e.method == "PUT"
                    && there
                        .iter()
                        .any(|k| e.path.ends_with(&format!("/{BUCKET}/archive/{k}")))
            })
            .collect();
        assert!(
            again.is_empty(),
            "round {round} sent again packs the server held: {again:?}"
        );
        let bytes: u64 = log
            .iter()
            .filter(|e| is_pack_put(e))
            .map(|e| e.body_len)
            .sum();
        landed += bytes;
        eprintln!(
            "round {round}: {} packs held before, {bytes} pack bytes stored, killed: {killed}",
            there.len()
        );
        if !killed {
            break;
        }
    }
    let stored = stored_pack_bytes(&to.disk);
    eprintln!("pack bytes stored over the runs: {landed} (on the server {stored}); one copy stores {one_copy}");
    assert!(
        landed <= one_copy + MIB,
        "the runs stored {landed} pack bytes, one copy stores {one_copy}: chunks were sent twice"
    );
    assert_eq!(to.direct.restore_point_names(), vec![rp.clone()]);
    let report = to.direct.verify_run(true).success().json();
    assert_eq!(report["clean"], true, "{report}");
    assert_eq!(
        report["unindexed_packs"],
        serde_json::json!([]),
        "packs of the killed runs were left unused: {report}"
    );
    restore_equals(&to.direct, &rp, &src, &tmp.path().join("out"));
}

#[test]
fn a_killed_copy_to_s3_resumes_without_sending_a_pack_twice() {
    killed_copy_resumes("s3-kill-copy", None);
}

#[test]
fn a_killed_copy_to_an_encrypted_s3_repository_resumes_without_sending_twice() {
    killed_copy_resumes("s3-kill-copy-enc", Some("archive key"));
}

#[test]
fn a_killed_prune_on_s3_leaves_a_clean_repository_and_a_rerun_completes() {
    let tmp = scratch("s3-kill-prune");
    let server = S3Server::start(&tmp.path().join("s3"), &[BUCKET]);
    let proxy = FaultProxy::start(server.port, FaultPlan::none());
    let repo = views(&server, &proxy, "flr", None);
    let mut rng = Rng::new(6);
    // Twelve restore points, each in a pack of its own; all but the last
    // forgotten.
    let mut last = (String::new(), Vec::new());
    for _ in 0..12 {
        let data = rng.bytes(MIB as usize / 2);
        let rp = repo
            .direct
            .cmd("backup")
            .args(["--job", "k", "--stdin-name", "d.bin", "--json"])
            .stdin(data.clone())
            .run()
            .success()
            .json()["restore_point"]
            .as_str()
            .unwrap()
            .to_string();
        last = (rp, data);
    }
    let last_file = tmp.path().join("last");
    std::fs::create_dir(&last_file).unwrap();
    std::fs::write(last_file.join("d.bin"), &last.1).unwrap();
    forget(&repo.direct, &["--keep-last", "1"]);
    let packs_before = repo.disk.packs().len();
    let indexes_before = repo.disk.files_under("index", ".idx").len();

    // Killed among the index deletions, then among the pack deletions.
    let check = |round: &str| {
        assert_eq!(
            repo.direct.restore_point_names(),
            vec![last.0.clone()],
            "{round}"
        );
        verify_clean(&repo.direct);
        let out = tmp.path().join("out");
        let _ = std::fs::remove_dir_all(&out);
        repo.direct.restore(&last.0, &out, &[] as &[&str]);
        assert_cmp(&out.join("d.bin"), &last_file.join("d.bin"));
    };
    for deletes in [3, indexes_before as u64 + 4] {
        proxy.freeze_after(deletes, is_delete);
        kill_when_frozen(
            &format!("prune after {deletes} deletes"),
            repo.faulty.cmd("prune"),
            &proxy,
            false,
        );
        eprintln!(
            "killed after {deletes} deletes: {} of {packs_before} packs, {} of {indexes_before} index files left",
            repo.disk.packs().len(),
            repo.disk.files_under("index", ".idx").len()
        );
        check(&format!("after {deletes} deletes"));
    }
    assert!(
        repo.disk.packs().len() < packs_before,
        "the kills came too early"
    );
    let report = prune(&repo.faulty, &[]);
    eprintln!("rerun: {report}");
    assert_eq!(report["packs_pending"], 0, "{report}");
    assert!(files(&repo.disk, "pending").is_empty());
    assert!(
        files(&repo.disk, "locks").is_empty(),
        "a lock was left behind"
    );
    assert_eq!(repo.disk.packs().len(), 1);
    check("after the rerun");
}

#[test]
fn prune_on_s3_beside_a_backup_that_reuses_forgotten_chunks() {
    let tmp = scratch("s3-prune-concurrent");
    let server = S3Server::start(&tmp.path().join("s3"), &[BUCKET]);
    let proxy = FaultProxy::start(server.port, FaultPlan::none());
    let repo = views(&server, &proxy, "flr", None);
    prune_beside_a_reusing_backup(&repo.direct, &repo.disk, tmp.path());
}
