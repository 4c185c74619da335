//! Damaged chunk data: `verify --read-data` finds it and names the
//! restore point and file; restoring that file fails without leaving it
//! under its final name; everything else stays restorable.

use std::fs;

use flr_e2e::repo::flip_byte;
use flr_e2e::rng::Rng;
use flr_e2e::tree::{assert_cmp, write_random_file, MIB};
use flr_e2e::{scratch, TestRepo};

#[test]
fn flipped_byte_in_a_pack_is_found_and_named() {
    let tmp = scratch("corrupt");
    let src = tmp.path().join("data");
    fs::create_dir(&src).unwrap();
    let mut rng = Rng::new(5);
    // Files are packed in name order; the victim fills nearly the whole
    // pack, so the pack's middle byte is inside it.
    fs::write(src.join("a-small.txt"), b"before the victim\n").unwrap();
    write_random_file(&src.join("victim.bin"), 12 * MIB, &mut rng);
    fs::write(src.join("z-small.txt"), b"after the victim\n").unwrap();
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let backup = repo.backup("nightly", &[&src]);
    let rp = &backup.restore_point;

    let packs = repo.packs();
    assert_eq!(packs.len(), 1, "{packs:?}");
    let len = fs::metadata(&packs[0]).unwrap().len();
    assert!(len > 12 * MIB);
    let pack_id = packs[0].file_stem().unwrap().to_string_lossy().into_owned();
    flip_byte(&packs[0], len / 2);

    let run = repo.verify_run(true).expect_code(4);
    let report = run.json();
    assert_eq!(report["clean"], false, "{report}");
    let damaged = report["damaged"][rp.as_str()]
        .as_array()
        .unwrap_or_else(|| panic!("verify does not name restore point {rp}: {report}"));
    let files: Vec<&str> = damaged.iter().map(|f| f.as_str().unwrap()).collect();
    assert_eq!(files.len(), 1, "{report}");
    assert!(files[0].contains("data/victim.bin"), "{report}");
    assert!(
        report["problems"].to_string().contains(&pack_id),
        "the problems do not name pack {pack_id}: {report}"
    );

    // The structure check does not read data; it still runs and reports.
    let structure = repo.verify_run(false);
    assert!(matches!(structure.code(), Some(0) | Some(4)), "{structure}");
    assert_eq!(structure.json()["restore_points"], 1, "{structure}");

    // The human-readable verify says the same on stderr.
    repo.cmd("verify")
        .arg("--read-data")
        .run()
        .expect_code(4)
        .stderr_has(&[rp.as_str(), "victim.bin"]);

    let out = tmp.path().join("out");
    repo.restore_run(rp, &out, &[] as &[&str])
        .failure()
        .stderr_has(&["victim.bin"]);
    assert!(
        !out.join("data/victim.bin").exists(),
        "a damaged file was restored under its final name"
    );

    let out = tmp.path().join("out-rest");
    repo.restore(rp, &out, &["data/a-small.txt", "data/z-small.txt"]);
    assert_cmp(&src.join("a-small.txt"), &out.join("data/a-small.txt"));
    assert_cmp(&src.join("z-small.txt"), &out.join("data/z-small.txt"));
}
