//! `flr copy`: archive copies between repositories, each with its own key,
//! sending only what the destination lacks, and resuming after a kill.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use flr_e2e::rng::Rng;
use flr_e2e::tree::{assert_same_tree, build_rich_tree, write_random_file, MIB};
use flr_e2e::{scratch, Flr, TestRepo};
use serde_json::Value;

/// `flr copy --from A --to B --json [ARGS]`, with each side's password.
fn copy(from: &TestRepo, to: &TestRepo, args: &[&str]) -> flr_e2e::Run {
    let mut f = Flr::new(["copy", "--json", "--from"])
        .arg(&from.path)
        .arg("--to")
        .arg(&to.path)
        .args(args);
    if let Some(p) = &from.password {
        f = f.env("FLR_FROM_PASSWORD", p);
    }
    if let Some(p) = &to.password {
        f = f.env("FLR_TO_PASSWORD", p);
    }
    f.timeout(Duration::from_secs(600)).run()
}

fn pack_bytes(repo: &TestRepo) -> u64 {
    repo.packs()
        .iter()
        .map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn assert_clean(repo: &TestRepo) {
    let v = repo.verify_run(true).success().json();
    assert_eq!(v["clean"], true, "{v}");
}

fn restored_equals(repo: &TestRepo, rp: &str, expected: &Path, scratch: &Path) {
    let out = scratch.join(format!("out-{}", rp.replace('/', "_")));
    repo.restore(rp, &out, &[] as &[&str]);
    let name = expected.file_name().unwrap();
    assert_same_tree(expected, &out.join(name));
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn copies_plain_to_encrypted_and_on_to_another_key() {
    let tmp = scratch("copy");
    let src = tmp.path().join("src");
    let tree = build_rich_tree(&src, 21);
    let plain = TestRepo::init(&tmp.path().join("plain"));
    let first = plain.backup("files", &[&src]);
    let snap1 = tmp.path().join("snap1");
    flr_e2e::command::tool("cp", ["-a".as_ref(), src.as_os_str(), snap1.as_os_str()]).success();
    // A small change, then a second restore point of the same job.
    let mut rng = Rng::new(5);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(src.join(tree.large))
            .unwrap();
        f.write_all_at(&rng.bytes(64 << 10), 3 * MIB).unwrap();
    }
    fs::write(src.join("added.txt"), b"a new file\n").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let second = plain.backup("files", &[&src]);

    let a = TestRepo::init_encrypted(&tmp.path().join("a"), "first key");
    let v = copy(&plain, &a, &[]).success().json();
    assert_eq!(v["copied"], 2, "{v}");
    assert_eq!(v["errors"], Value::Array(vec![]), "{v}");
    for rp in v["restore_points"].as_array().unwrap() {
        assert!(rp["verified_chunks"].as_u64().unwrap() > 0, "{rp}");
    }
    assert_eq!(
        a.restore_point_names(),
        vec![first.restore_point.clone(), second.restore_point.clone()]
    );
    // The first restore point holds the tree as it was before the change.
    let snap_dir = tmp.path().join("snapshot-view");
    fs::create_dir(&snap_dir).unwrap();
    fs::rename(&snap1, snap_dir.join("src")).unwrap();
    restored_equals(&a, &first.restore_point, &snap_dir.join("src"), tmp.path());
    restored_equals(&a, &second.restore_point, &src, tmp.path());
    assert_clean(&a);

    // A rerun copies nothing and writes nothing.
    let before = a.listing();
    let again = copy(&plain, &a, &[]).success().json();
    assert_eq!(again["copied"], 0, "{again}");
    assert_eq!(again["uploaded_bytes"], 0, "{again}");
    assert_eq!(a.listing(), before, "a rerun changed the destination");

    // Encrypted to encrypted under another key, one restore point at a
    // time: the second copy pairs ids up through the first and reads only
    // the chunks that changed.
    let b = TestRepo::init_encrypted(&tmp.path().join("b"), "second key");
    let one = copy(&a, &b, &[&first.restore_point]).success().json();
    assert_eq!(one["copied"], 1, "{one}");
    let two = copy(&a, &b, &["files"]).success().json();
    let r = &two["restore_points"][0];
    assert_eq!(r["copied"], true, "{two}");
    let (read, chunks) = (
        r["chunks_read"].as_u64().unwrap(),
        r["chunks"].as_u64().unwrap(),
    );
    assert!(
        read * 2 < chunks,
        "an incremental copy between keys read {read} of {chunks} chunks"
    );
    restored_equals(&b, &second.restore_point, &src, tmp.path());
    assert_clean(&b);

    // Wrong password for the destination: refused, nothing written.
    let c = TestRepo::init_encrypted(&tmp.path().join("c"), "third key");
    let before = c.listing();
    let wrong = TestRepo {
        path: c.path.clone(),
        password: Some("not it".into()),
        env: Vec::new(),
    };
    copy(&a, &wrong, &[]).failure();
    assert_eq!(c.listing(), before);
    // The same repository on both sides is refused.
    copy(&a, &a, &[]).failure().stderr_has(&["same repository"]);
}

#[test]
fn a_killed_copy_resumes_without_sending_twice() {
    let tmp = scratch("copy-kill");
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let mut rng = Rng::new(9);
    write_random_file(&src.join("big.bin"), 200 * MIB, &mut rng);
    let from = TestRepo::init(&tmp.path().join("from"));
    let rp = from.backup("big", &[&src]).restore_point;

    // A clean copy, for comparison.
    let fresh = TestRepo::init(&tmp.path().join("fresh"));
    let full = copy(&from, &fresh, &[]).success().json();
    let full_upload = full["uploaded_bytes"].as_u64().unwrap();

    let to = TestRepo::init(&tmp.path().join("to"));
    let mut child = Flr::new(["copy", "--quiet", "--from"])
        .arg(&from.path)
        .arg("--to")
        .arg(&to.path)
        .spawn_quiet();
    let deadline = Instant::now() + Duration::from_secs(120);
    while to.files_under("index", ".idx").len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the copy wrote no index files in 120 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the copy ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        to.restore_point_names().is_empty(),
        "a killed copy left a restore point"
    );
    let v = to.verify_run(true).success().json();
    assert_eq!(v["clean"], true, "{v}");
    let kept = pack_bytes(&to);
    assert!(kept > 0);

    let rerun = copy(&from, &to, &[]).success().json();
    let uploaded = rerun["uploaded_bytes"].as_u64().unwrap();
    let r = &rerun["restore_points"][0];
    assert!(r["chunks_read"].as_u64() < r["chunks"].as_u64(), "{rerun}");
    // What the killed copy made durable is not sent again; at most the
    // pack it was writing (32 MiB, maybe without its index) is.
    assert!(
        uploaded + kept <= full_upload + 33 * MIB,
        "rerun sent {uploaded} after {kept} kept; a clean copy sends {full_upload}"
    );
    assert_eq!(to.restore_point_names(), vec![rp.clone()]);
    restored_equals(&to, &rp, &src, tmp.path());
    assert_clean(&to);
}
