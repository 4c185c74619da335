//! Packs name their whole layout and describe themselves: two backups of
//! the same bytes cut differently both stay restorable, and a repository
//! that lost its index files is rebuilt from the packs alone.

use std::fs;

use flr_e2e::mount::Mount;
use flr_e2e::rng::Rng;
use flr_e2e::tree::{assert_cmp, assert_same_tree, build_rich_tree, write_random_file, MIB};
use flr_e2e::{scratch, TestRepo};

fn ts(restore_point: &str) -> &str {
    restore_point.split_once('/').expect("JOB/TS").1
}

/// Backs one file up with two chunkers as jobs `a` and `b`; verify with
/// data must be clean and both restores byte-identical.
fn back_up_twice(name: &str, data: &[u8], first: &str, second: &str) {
    let tmp = scratch(name);
    let file = tmp.path().join("data.bin");
    fs::write(&file, data).unwrap();
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let a = repo
        .cmd("backup")
        .args(["--job", "a", "--json", "--chunker", first])
        .arg(&file)
        .run()
        .success();
    let b = repo
        .cmd("backup")
        .args(["--job", "b", "--json", "--chunker", second])
        .arg(&file)
        .run()
        .success();
    assert!(a.json()["stats"]["new_chunks"].as_u64().unwrap() > 0);
    assert!(b.json()["stats"]["new_chunks"].as_u64().unwrap() > 0, "{b}");
    let v = repo.verify_run(true).success().json();
    assert_eq!(v["clean"], true, "{v}");
    for (job, run) in [("a", &a), ("b", &b)] {
        let rp = run.json()["restore_point"].as_str().unwrap().to_string();
        let out = tmp.path().join(format!("out-{job}"));
        repo.restore(&rp, &out, &[] as &[&str]);
        assert_cmp(&file, &out.join("data.bin"));
    }
}

#[test]
fn random_bytes_backed_up_with_cdc_then_fixed_pages_both_verify() {
    let mut rng = Rng::new(90);
    back_up_twice("cdc-fixed", &rng.bytes(MIB as usize), "cdc", "fixed:4096");
}

#[test]
fn compressible_pages_of_4_then_8_kib_both_verify() {
    let data: Vec<u8> = (0..(2 * MIB) as u32)
        .map(|i| (i / 101 % 13) as u8 + b'A')
        .collect();
    back_up_twice("fixed-fixed", &data, "fixed:4096", "fixed:8192");
}

#[test]
fn a_repository_without_index_files_is_rebuilt_from_its_packs() {
    let tmp = scratch("repair-index");
    let src = tmp.path().join("src");
    build_rich_tree(&src, 91);
    let db = tmp.path().join("db");
    fs::create_dir(&db).unwrap();
    let mut rng = Rng::new(92);
    write_random_file(&db.join("app.db"), 3 * MIB, &mut rng);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let files = repo.backup("files", &[&src]);
    let first = repo.backup("db", &[&db]);
    // An incremental sharing most chunks with the first.
    let mut page = fs::read(db.join("app.db")).unwrap();
    page[100_000..108_192].fill(0x5a);
    fs::write(db.join("app.db"), &page).unwrap();
    let second = repo.backup("db", &[&db]);

    let index_dir = repo.path.join("index");
    let packs = repo.packs().len();
    assert!(packs >= 3, "{packs} packs");
    for e in fs::read_dir(&index_dir).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    // Without index files, verify names every pack and the way out.
    let broken = repo.verify_run(false).expect_code(4);
    let report = broken.json();
    let problems = report["problems"].to_string();
    assert!(
        problems.contains("no index file lists this pack"),
        "{problems}"
    );
    assert!(problems.contains("flr repair index"), "{problems}");
    assert!(
        !report["damaged"].as_object().unwrap().is_empty(),
        "{report}"
    );

    let repair = repo
        .flr(["repair", "index", "--json", "--repo"])
        .arg(&repo.path)
        .run()
        .success()
        .json();
    assert_eq!(repair["packs"], packs, "{repair}");
    assert_eq!(
        repair["rebuilt"].as_array().unwrap().len(),
        packs,
        "{repair}"
    );
    assert!(repair["unreadable_packs"].as_array().unwrap().is_empty());
    // Packs are never touched.
    assert_eq!(repo.packs().len(), packs);

    let v = repo.verify_run(true).success().json();
    assert_eq!(v["clean"], true, "{v}");
    // Running it again finds nothing to do.
    let again = repo
        .flr(["repair", "index", "--json", "--repo"])
        .arg(&repo.path)
        .run()
        .success()
        .json();
    assert_eq!(again["index_files_ok"], packs, "{again}");
    assert!(again["rebuilt"].as_array().unwrap().is_empty());

    let out = tmp.path().join("out");
    repo.restore(&files.restore_point, &out.join("files"), &[] as &[&str]);
    assert_same_tree(&src, &out.join("files/src"));
    repo.restore(&second.restore_point, &out.join("db2"), &[] as &[&str]);
    assert_cmp(&db.join("app.db"), &out.join("db2/db/app.db"));

    let mnt = Mount::background(&repo, &tmp.path().join("mnt"), &[]);
    assert_same_tree(
        &src,
        &mnt.join("files").join(ts(&files.restore_point)).join("src"),
    );
    assert_cmp(
        &db.join("app.db"),
        &mnt.join("db")
            .join(ts(&second.restore_point))
            .join("db/app.db"),
    );
    let old = fs::read(
        mnt.join("db")
            .join(ts(&first.restore_point))
            .join("db/app.db"),
    )
    .unwrap();
    assert_eq!(old.len(), page.len());
    assert_ne!(old[100_000..108_192], page[100_000..108_192]);
    assert_eq!(old[..100_000], page[..100_000]);
    mnt.unmount();
}

#[test]
fn a_damaged_index_file_is_rewritten_from_its_pack() {
    let tmp = scratch("repair-damaged");
    let db = tmp.path().join("db");
    fs::create_dir(&db).unwrap();
    write_random_file(&db.join("app.db"), 2 * MIB, &mut Rng::new(93));
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let b = repo.backup("db", &[&db]);
    let idx = repo
        .files_under("index", ".idx")
        .pop()
        .expect("an index file");
    flr_e2e::repo::flip_byte(&idx, 30);
    let report = repo.verify_run(false).expect_code(4).json();
    assert!(
        report["problems"].to_string().contains("flr repair index"),
        "{report}"
    );
    let repair = repo
        .flr(["repair", "index", "--repo"])
        .arg(&repo.path)
        .run()
        .success();
    assert!(
        repair.stdout.contains("rebuilt") && repair.stdout.contains("unreadable"),
        "{repair}"
    );
    assert_eq!(repo.verify_run(true).success().json()["clean"], true);
    let out = tmp.path().join("out");
    repo.restore(&b.restore_point, &out, &[] as &[&str]);
    assert_cmp(&db.join("app.db"), &out.join("db/app.db"));
}

#[test]
fn a_repository_of_format_version_1_is_refused_by_name() {
    use vfs_core::format::{seal_envelope, CHECKSUM_LEN, CONFIG_MAGIC, ENVELOPE_HEADER_LEN};
    let tmp = scratch("old-format");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let config_path = repo.path.join("config");
    let raw = fs::read(&config_path).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&raw[ENVELOPE_HEADER_LEN..raw.len() - CHECKSUM_LEN]).unwrap();
    config["version"] = 1.into();
    fs::write(
        &config_path,
        seal_envelope(CONFIG_MAGIC, 0, config.to_string().as_bytes()),
    )
    .unwrap();
    for sub in ["restore-points", "verify"] {
        repo.cmd(sub)
            .run()
            .failure()
            .stderr_has(&["config", "version 1", "version 2"]);
    }
}

#[test]
fn an_encrypted_repository_is_rebuilt_from_its_sealed_tables() {
    let tmp = scratch("repair-encrypted");
    let file = tmp.path().join("data.bin");
    fs::write(&file, Rng::new(94).bytes(MIB as usize)).unwrap();
    let repo = TestRepo::init_encrypted(&tmp.path().join("repo"), "secret");
    let b = repo.backup("enc", &[&file]);
    for e in fs::read_dir(repo.path.join("index")).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    let repair = repo
        .flr(["repair", "index", "--json", "--repo"])
        .arg(&repo.path)
        .run()
        .success()
        .json();
    assert_eq!(
        repair["rebuilt"].as_array().unwrap().len(),
        repo.packs().len()
    );
    assert_eq!(repo.verify_run(true).success().json()["clean"], true);
    let out = tmp.path().join("out");
    repo.restore(&b.restore_point, &out, &[] as &[&str]);
    assert_cmp(&file, &out.join("data.bin"));
}
