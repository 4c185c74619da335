//! Bad input and damaged repositories: each must end in a clear error
//! that names the thing at fault, a non-zero exit, and no restore point
//! committed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use flr_e2e::repo::{flip_byte, truncate};
use flr_e2e::rng::Rng;
use flr_e2e::tree::{assert_same_tree, write_random_file, MIB};
use flr_e2e::{flr, scratch, Flr, TestRepo};

/// `.rp` files in the repository, whatever flr itself would list.
fn manifest_files(repo: &TestRepo) -> Vec<String> {
    repo.listing()
        .into_keys()
        .filter(|k| k.starts_with("restore-points/") && k.ends_with(".rp"))
        .collect()
}

fn small_source(dir: &Path, seed: u64) {
    fs::create_dir_all(dir).unwrap();
    let mut rng = Rng::new(seed);
    write_random_file(&dir.join("victim.bin"), 6 * MIB, &mut rng);
    fs::write(dir.join("notes.txt"), b"a small file\n").unwrap();
}

#[test]
fn path_that_does_not_exist() {
    let tmp = scratch("no-path");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let real = tmp.path().join("real");
    small_source(&real, 70);
    let missing = tmp.path().join("no-such-dir/app.db");

    repo.backup_run("j", &[&missing])
        .failure()
        .stderr_has(&["no-such-dir/app.db"]);
    // One good path does not make a bad one acceptable.
    repo.backup_run("j", &[&real, &missing])
        .failure()
        .stderr_has(&["no-such-dir/app.db"]);
    assert!(repo.restore_point_names().is_empty());
    assert!(manifest_files(&repo).is_empty());
}

#[test]
fn repository_directory_that_does_not_exist() {
    let tmp = scratch("no-repo");
    let src = tmp.path().join("src");
    small_source(&src, 71);
    let nowhere = tmp.path().join("missing-repo");
    for args in [
        vec!["backup", "--job", "j"],
        vec!["restore-points"],
        vec!["verify"],
    ] {
        let mut f = Flr::new(&args).arg("--repo").arg(&nowhere);
        if args[0] == "backup" {
            f = f.arg(&src);
        }
        f.run().failure().stderr_has(&["missing-repo"]);
    }
    assert!(
        !nowhere.exists(),
        "a failed command created the repository directory"
    );

    // A directory that exists but holds no repository says so.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    Flr::new(["backup", "--job", "j", "--repo"])
        .arg(&empty)
        .arg(&src)
        .run()
        .failure()
        .stderr_has(&["empty", "init"]);
    assert_eq!(
        fs::read_dir(&empty).unwrap().count(),
        0,
        "wrote into a non-repository"
    );
}

#[test]
fn unreadable_file_as_unprivileged_user() {
    let tmp = scratch("unreadable");
    // Let `nobody` reach into the scratch directory.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let uid: u32 = flr_e2e::command::tool("id", ["-u", "nobody"])
        .success()
        .stdout
        .trim()
        .parse()
        .unwrap();
    let gid: u32 = flr_e2e::command::tool("id", ["-g", "nobody"])
        .success()
        .stdout
        .trim()
        .parse()
        .unwrap();
    let repo_dir = tmp.path().join("repo");
    fs::create_dir(&repo_dir).unwrap();
    std::os::unix::fs::chown(&repo_dir, Some(uid), Some(gid)).unwrap();
    Flr::as_user("nobody", ["init"])
        .arg(&repo_dir)
        .run()
        .success();

    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("readable.txt"), b"anyone may read this\n").unwrap();
    fs::set_permissions(src.join("readable.txt"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(src.join("locked.db"), b"only root\n").unwrap();
    fs::set_permissions(src.join("locked.db"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o755)).unwrap();

    // The test itself must not be fooled: nobody really cannot read it.
    let peek = flr_e2e::command::run(
        std::process::Command::new("runuser")
            .args(["-u", "nobody", "--", "cat"])
            .arg(src.join("locked.db")),
    );
    assert!(
        !peek.status.success(),
        "nobody can read the locked file: {peek}"
    );

    Flr::as_user("nobody", ["backup", "--job", "j", "--repo"])
        .arg(&repo_dir)
        .arg(&src)
        .run()
        .failure()
        .stderr_has(&["locked.db"]);
    let repo = TestRepo {
        path: repo_dir,
        password: None,
        env: Vec::new(),
    };
    assert!(repo.restore_point_names().is_empty());
    assert!(manifest_files(&repo).is_empty());
}

#[test]
fn config_with_unknown_format_version() {
    use vfs_core::format::{seal_envelope, CHECKSUM_LEN, CONFIG_MAGIC, ENVELOPE_HEADER_LEN};
    let tmp = scratch("version");
    let src = tmp.path().join("src");
    small_source(&src, 72);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let config_path = repo.path.join("config");
    let raw = fs::read(&config_path).unwrap();
    let payload = &raw[ENVELOPE_HEADER_LEN..raw.len() - CHECKSUM_LEN];
    let mut config: serde_json::Value = serde_json::from_slice(payload).expect("config is JSON");
    assert_eq!(config["version"], 2, "{config}");
    config["version"] = 99.into();
    fs::write(
        &config_path,
        seal_envelope(CONFIG_MAGIC, 0, config.to_string().as_bytes()),
    )
    .unwrap();

    repo.backup_run("j", &[&src])
        .failure()
        .stderr_has(&["version", "99", "config"]);
    repo.cmd("restore-points")
        .run()
        .failure()
        .stderr_has(&["version", "99"]);
    assert!(manifest_files(&repo).is_empty());
}

#[test]
fn truncated_pack() {
    let tmp = scratch("trunc-pack");
    let src = tmp.path().join("data");
    small_source(&src, 73);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let backup = repo.backup("j", &[&src]);
    let packs = repo.packs();
    assert_eq!(packs.len(), 1, "{packs:?}");
    let pack = &packs[0];
    let pack_name = pack.file_stem().unwrap().to_string_lossy().into_owned();
    let len = fs::metadata(pack).unwrap().len();
    truncate(pack, len / 2);

    let out = tmp.path().join("out");
    repo.restore_run(&backup.restore_point, &out, &[] as &[&str])
        .failure()
        .stderr_has(&[&pack_name]);
    assert!(
        !out.join("data/victim.bin").exists(),
        "a damaged file was restored under its final name"
    );

    let run = repo.verify_run(false).expect_code(4);
    let report = run.json();
    assert_eq!(report["clean"], false, "{report}");
    assert!(
        report["problems"].to_string().contains(&pack_name),
        "{report}"
    );
    assert_eq!(manifest_files(&repo).len(), 1);
}

/// A backup must never report success for a restore point that cannot
/// be restored. When the data being backed up has chunks in a truncated
/// pack, the backup either fails naming the pack (and commits nothing)
/// or stores those chunks again; it must not deduplicate against them.
#[test]
fn backup_over_a_truncated_pack_commits_nothing_unrestorable() {
    let tmp = scratch("trunc-pack-backup");
    let src = tmp.path().join("data");
    small_source(&src, 77);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    repo.backup("j", &[&src]);
    let packs = repo.packs();
    assert_eq!(packs.len(), 1, "{packs:?}");
    let pack_name = packs[0].file_stem().unwrap().to_string_lossy().into_owned();
    truncate(&packs[0], fs::metadata(&packs[0]).unwrap().len() / 2);

    let run = repo.backup_run("j", &[&src]);
    if !run.status.success() {
        run.failure().stderr_has(&[&pack_name]);
        assert_eq!(
            manifest_files(&repo).len(),
            1,
            "a failed backup committed a restore point"
        );
        return;
    }
    let again = TestRepo::parse_backup(run);
    let out = tmp.path().join("out");
    let restore = repo.restore_run(&again.restore_point, &out, &[] as &[&str]);
    assert!(
        restore.status.success(),
        "`flr backup` exited 0 and committed {} (new_chunks {}), but that restore point cannot be \
         restored: the backup deduplicated against chunks of pack {pack_name}, which is shorter than \
         its index says. Restore: {restore}",
        again.restore_point,
        again.stat("new_chunks"),
    );
    assert_same_tree(&src, &out.join("data"));
}

#[test]
fn truncated_index_file() {
    let tmp = scratch("trunc-index");
    let src = tmp.path().join("data");
    small_source(&src, 74);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    repo.backup("j", &[&src]);
    let idx = repo.files_under("index", ".idx");
    assert_eq!(idx.len(), 1, "{idx:?}");
    let idx_name = idx[0].file_name().unwrap().to_string_lossy().into_owned();
    truncate(&idx[0], fs::metadata(&idx[0]).unwrap().len() / 2);

    let more = tmp.path().join("more");
    small_source(&more, 75);
    repo.backup_run("j", &[&more])
        .failure()
        .stderr_has(&[&idx_name]);
    repo.cmd("restore-points")
        .run()
        .failure()
        .stderr_has(&[&idx_name]);
    assert_eq!(
        manifest_files(&repo).len(),
        1,
        "a backup was committed over a damaged index"
    );
}

#[test]
fn garbled_manifest() {
    let tmp = scratch("garbled");
    let src = tmp.path().join("data");
    small_source(&src, 76);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let good = repo.backup("good", &[&src]);
    let bad = repo.backup("bad", &[&src]);
    let rp_file = repo.manifest_path(&bad.restore_point);
    let len = fs::metadata(&rp_file).unwrap().len();
    flip_byte(&rp_file, len / 2);

    let out = tmp.path().join("out");
    repo.restore_run(&bad.restore_point, &out, &[] as &[&str])
        .failure()
        .stderr_has(&[&bad.restore_point]);
    assert!(!out.join("data/victim.bin").exists());

    let report = repo.verify_run(false).expect_code(4).json();
    assert!(
        report["damaged"].get(&bad.restore_point).is_some(),
        "verify does not name {}: {report}",
        bad.restore_point
    );
    assert!(
        report["damaged"].get(&good.restore_point).is_none(),
        "{report}"
    );

    // The damage stays contained: the other restore point restores.
    let out = tmp.path().join("out-good");
    repo.restore(&good.restore_point, &out, &[] as &[&str]);
    assert_same_tree(&src, &out.join("data"));

    // A new backup next to the damaged one still commits.
    repo.backup("good", &[&src]);
    assert_eq!(
        manifest_files(&repo).len(),
        3,
        "{:?}",
        manifest_files(&repo)
    );
}

#[test]
fn usage_errors_exit_2() {
    flr(["backup"]).expect_code(2);
    flr(["no-such-subcommand"]).expect_code(2);
}
