//! A restore never writes outside its target: restore points whose
//! manifests would lead there (built by hand in [`flr_e2e::hostile`]) are
//! refused by `flr restore` and served by no mount, and a symlink already
//! in the target is never followed. After each attempt the decoy
//! directory outside the target must still be empty.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use flr_e2e::hostile::{hostile_cases, write_restore_point, HostileCase};
use flr_e2e::tree::assert_same_tree;
use flr_e2e::{scratch, Flr, Mount, TestRepo};

/// Everything below `dir`, as relative paths (empty if `dir` is absent).
fn contents(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let path = e.expect("directory entry").path();
            out.push(path.strip_prefix(dir).unwrap().display().to_string());
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[track_caller]
fn assert_empty(dir: &Path, after: &str) {
    let found = contents(dir);
    assert!(
        found.is_empty(),
        "after {after}: {} holds {found:?}",
        dir.display()
    );
}

/// `flr restore RP --to TARGET --quiet`, to add flags to.
fn restore_cmd(repo: &TestRepo, rp: &str, target: &Path) -> Flr {
    repo.cmd("restore")
        .arg(rp)
        .arg("--to")
        .arg(target)
        .arg("--quiet")
}

/// A repository holding every hostile case, and the decoy they aim at.
struct Hostile {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    repo: TestRepo,
    outside: PathBuf,
    cases: Vec<(HostileCase, String)>,
}

fn hostile_repo(test: &str) -> Hostile {
    let tmp = scratch(test);
    let base = tmp.path().to_path_buf();
    let repo = TestRepo::init(&base.join("repo"));
    let outside = base.join("outside");
    fs::create_dir(&outside).unwrap();
    let cases = hostile_cases(&outside)
        .into_iter()
        .map(|case| {
            let rp = write_restore_point(&repo.path, case.job, case.nodes.clone());
            (case, rp)
        })
        .collect();
    Hostile {
        _tmp: tmp,
        base,
        repo,
        outside,
        cases,
    }
}

#[test]
fn flr_restore_refuses_every_hostile_restore_point() {
    let h = hostile_repo("hostile-restore");
    for (case, rp) in &h.cases {
        for overwrite in [false, true] {
            // A sibling of the decoy, so `..` from its root reaches it.
            let target = h.base.join(format!("target-{}", case.job));
            let mut cmd = restore_cmd(&h.repo, rp, &target);
            if overwrite {
                cmd = cmd.arg("--overwrite");
            }
            cmd.run()
                .failure()
                .stderr_has(&[&format!("restore point {rp}"), &case.refusal]);
            let what = format!("restoring {rp} (overwrite {overwrite})");
            assert_empty(&h.outside, &what);
            assert_empty(&target, &what);
        }
    }
}

#[test]
fn a_mount_serves_nothing_of_a_hostile_restore_point() {
    let h = hostile_repo("hostile-mount");
    // A good restore point beside them stays readable.
    let src = h.base.join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/file.txt"), b"still served\n").unwrap();
    let good = h.repo.backup("good", &[&src]);
    let mnt = Mount::background(&h.repo, &h.base.join("mnt"), &[]);
    for (case, rp) in &h.cases {
        let (job, ts) = rp.split_once('/').unwrap();
        let dir = mnt.join(job).join(ts);
        let listed = fs::read_dir(&dir).and_then(|rd| rd.collect::<Result<Vec<_>, _>>());
        match listed {
            Err(e) => assert_eq!(
                e.raw_os_error(),
                Some(libc::EIO),
                "listing {rp} ({}): {e}",
                case.job
            ),
            Ok(entries) => panic!("{rp} was served: {entries:?}"),
        }
        for name in ["x", "d", "f", "x/f"] {
            let r = fs::symlink_metadata(dir.join(name));
            assert!(r.is_err(), "{rp}: {name} was served: {r:?}");
        }
        assert_empty(&h.outside, &format!("mounting {rp}"));
    }
    let messages = mnt.messages();
    assert!(
        messages.contains("appears twice"),
        "the mount does not say why: {messages}"
    );
    let (job, ts) = good.restore_point.split_once('/').unwrap();
    assert_same_tree(&src, &mnt.join(job).join(ts).join("src"));
    mnt.unmount();
}

/// Independent of the manifest checks: a symlink that already sits in the
/// target where the restore point has a directory is refused, with or
/// without --overwrite, and a file's old symlink is replaced, not written
/// through.
#[test]
fn a_symlink_already_in_the_target_is_never_followed() {
    let tmp = scratch("target-symlink");
    let src = tmp.path().join("data");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/inner.txt"), b"inner\n").unwrap();
    fs::write(src.join("top.txt"), b"top\n").unwrap();
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let rp = repo.backup("j", &[&src]).restore_point;
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();

    let target = tmp.path().join("target");
    fs::create_dir_all(target.join("data")).unwrap();
    symlink(&outside, target.join("data/sub")).unwrap();
    for overwrite in [false, true] {
        let mut cmd = restore_cmd(&repo, &rp, &target);
        if overwrite {
            cmd = cmd.arg("--overwrite");
        }
        cmd.run()
            .failure()
            .stderr_has(&["data/sub", "symbolic link"]);
        assert_empty(
            &outside,
            &format!("restore over a link (overwrite {overwrite})"),
        );
    }
    assert!(
        !target.join("data/top.txt").exists(),
        "wrote before refusing"
    );

    // A file's name held by a link to a file outside: --overwrite
    // replaces the link; the file it pointed at keeps its bytes.
    let target = tmp.path().join("target2");
    fs::create_dir_all(target.join("data")).unwrap();
    let victim = outside.join("victim.txt");
    fs::write(&victim, b"keep me\n").unwrap();
    symlink(&victim, target.join("data/top.txt")).unwrap();
    restore_cmd(&repo, &rp, &target)
        .run()
        .failure()
        .stderr_has(&["data/top.txt", "--overwrite"]);
    restore_cmd(&repo, &rp, &target)
        .arg("--overwrite")
        .run()
        .success();
    assert_eq!(fs::read(&victim).unwrap(), b"keep me\n");
    assert!(fs::symlink_metadata(target.join("data/top.txt"))
        .unwrap()
        .is_file());
    assert_same_tree(&src, &target.join("data"));
}
