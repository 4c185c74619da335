//! Encrypted repositories: round trips, no plaintext at rest, and clear
//! refusals (with nothing written) on a wrong or missing password.

use std::fs;
use std::path::Path;

use flr_e2e::rng::{text_bytes, Rng};
use flr_e2e::tree::{assert_same_tree, MIB};
use flr_e2e::{scratch, Flr, TestRepo};

const PASSWORD: &str = "correct horse battery staple";
const MARKER: &[u8] = b"FLR-E2E-PLAINTEXT-MARKER-5f1c9a";
const NAME_MARKER: &str = "NAMEMARKER-7a2b";

/// Incompressible data with the marker every 4 KiB, so an unencrypted
/// repository stores the marker verbatim (see the control below).
fn marked_random(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut data = rng.bytes(len);
    for at in (0..len - MARKER.len()).step_by(4096) {
        data[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    data
}

/// Repository files that contain `needle`.
fn files_containing(repo: &TestRepo, needle: &[u8]) -> Vec<String> {
    repo.listing()
        .into_keys()
        .filter(|k| !k.ends_with('/'))
        .filter(|k| {
            let data = fs::read(repo.path.join(k)).unwrap();
            data.windows(needle.len()).any(|w| w == needle)
        })
        .collect()
}

fn source(dir: &Path) {
    fs::create_dir(dir).unwrap();
    let mut rng = Rng::new(6);
    fs::write(
        dir.join("marked.bin"),
        marked_random(&mut rng, 2 * MIB as usize),
    )
    .unwrap();
    let mut text = text_bytes(&mut rng, MIB as usize);
    text.extend_from_slice(MARKER);
    fs::write(dir.join("notes.txt"), text).unwrap();
    fs::write(dir.join(format!("file-{NAME_MARKER}.txt")), b"named\n").unwrap();
}

#[test]
fn encrypted_round_trip_without_plaintext_at_rest() {
    let tmp = scratch("encrypt");
    let src = tmp.path().join("src");
    source(&src);

    let repo = TestRepo::init_encrypted(&tmp.path().join("repo"), PASSWORD);
    let backup = repo.backup("secret", &[&src]);
    let out = tmp.path().join("out");
    repo.restore(&backup.restore_point, &out, &[] as &[&str]);
    assert_same_tree(&src, &out.join("src"));
    assert_eq!(
        repo.restore_point_names(),
        vec![backup.restore_point.clone()]
    );
    let report = repo.verify_run(true).success().json();
    assert_eq!(report["clean"], true, "{report}");

    assert_eq!(
        files_containing(&repo, MARKER),
        Vec::<String>::new(),
        "plaintext at rest"
    );
    assert_eq!(
        files_containing(&repo, NAME_MARKER.as_bytes()),
        Vec::<String>::new(),
        "file names at rest"
    );

    // Control: the same backup unencrypted does contain the marker, so
    // the scan above can see plaintext when it is there.
    let plain = TestRepo::init(&tmp.path().join("plain"));
    plain.backup("secret", &[&src]);
    assert!(
        !files_containing(&plain, MARKER).is_empty(),
        "the control repository hides the marker"
    );
}

#[test]
fn wrong_or_missing_password_is_refused_and_writes_nothing() {
    let tmp = scratch("password");
    let src = tmp.path().join("src");
    source(&src);
    let repo = TestRepo::init_encrypted(&tmp.path().join("repo"), PASSWORD);
    let first = repo.backup("secret", &[&src]);
    let before = repo.listing();

    let wrong = |args: &[&str]| {
        Flr::new(args)
            .arg("--repo")
            .arg(&repo.path)
            .password(Some("not the password"))
    };
    wrong(&["backup", "--job", "secret"])
        .arg(&src)
        .run()
        .failure()
        .stderr_has(&["wrong password"]);
    wrong(&["restore-points"])
        .run()
        .failure()
        .stderr_has(&["wrong password"]);
    wrong(&["restore", &first.restore_point])
        .arg("--to")
        .arg(tmp.path().join("out-wrong"))
        .run()
        .failure()
        .stderr_has(&["wrong password"]);
    assert!(!tmp.path().join("out-wrong/src").exists());
    assert_eq!(
        repo.listing(),
        before,
        "a refused command changed the repository"
    );

    // No password at all, and stdin is not a terminal to ask on.
    let run = Flr::new(["backup", "--job", "secret", "--repo"])
        .arg(&repo.path)
        .arg(&src)
        .run()
        .failure();
    let lower = run.stderr.to_lowercase();
    assert!(
        lower.contains("password") && run.stderr.contains("FLR_PASSWORD"),
        "unclear error: {run}"
    );
    assert_eq!(
        repo.listing(),
        before,
        "a refused command changed the repository"
    );

    // Creating an encrypted repository without a password is refused too.
    let new_repo = tmp.path().join("new-repo");
    Flr::new(["init", "--encrypt"])
        .arg(&new_repo)
        .run()
        .failure()
        .stderr_has(&["password"]);
    assert!(!new_repo.join("config").exists());

    // The right password still works.
    assert_eq!(repo.restore_point_names(), [first.restore_point]);
}
