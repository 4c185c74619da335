//! Crash safety: a backup killed with SIGKILL at any moment leaves a
//! repository that verifies clean and shows no new restore point, and the
//! next backup reuses the chunks the killed ones stored.

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use flr_e2e::rng::Rng;
use flr_e2e::tree::{assert_cmp, write_random_file, MIB};
use flr_e2e::{scratch, TestRepo};

const ROUNDS: usize = 6;

#[test]
fn killed_backups_leave_a_consistent_repository() {
    let tmp = scratch("crash");
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let seed = 4;
    let mut rng = Rng::new(seed);
    write_random_file(&src.join("big.bin"), 300 * MIB, &mut rng);

    // A separate repository measures how long a backup takes here: a
    // full one (nothing to reuse) and a repeat (everything reused, the
    // fastest any round can be), and what a full backup adds.
    let fresh = TestRepo::init(&tmp.path().join("fresh"));
    let started = Instant::now();
    let full = fresh.backup("crash", &[&src]);
    let full_time = started.elapsed();
    let started = Instant::now();
    fresh.backup("crash", &[&src]);
    let repeat_time = started.elapsed();
    eprintln!(
        "full backup {full_time:?} ({} bytes added), repeat {repeat_time:?}",
        full.added_bytes()
    );

    // Kills land between 50 ms and most of the round's expected duration,
    // which shrinks as the repository fills (stored chunks are only
    // hashed again). Stratified: round i draws from the i-th slice of its
    // window, so early and late kills both happen whatever the seed.
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let low = Duration::from_millis(50);
    let mut killed = 0;
    let mut completed = 0;
    for round in 0..ROUNDS {
        let stored: u64 = repo
            .packs()
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        let new_fraction = 1.0 - (stored as f64 / full.added_bytes() as f64).min(1.0);
        let expected = repeat_time + (full_time.saturating_sub(repeat_time)).mul_f64(new_fraction);
        let high = (expected * 4 / 5).max(low + Duration::from_millis(100));
        let slice = (high - low).as_secs_f64() / ROUNDS as f64;
        let delay =
            low + Duration::from_secs_f64(slice * (round as f64 + rng.below(1000) as f64 / 1000.0));
        let mut child = repo
            .cmd("backup")
            .args(["--job", "crash", "--quiet"])
            .arg(&src)
            .spawn_quiet();
        std::thread::sleep(delay);
        let _ = child.kill();
        let status = child.wait().unwrap();
        eprintln!("round {round}: delay {delay:?} of an expected {expected:?}: {status}");
        if status.signal() == Some(libc::SIGKILL) {
            killed += 1;
        } else {
            // Finished before the kill (the machine was faster than at
            // calibration): a normal backup, which must have succeeded.
            assert!(
                status.success(),
                "round {round}: the backup failed by itself: {status}"
            );
            completed += 1;
        }

        let verify = repo.verify_run(false);
        assert_eq!(
            verify.code(),
            Some(0),
            "round {round} (seed {seed}, delay {delay:?}): the repository does not verify after the kill: {verify}"
        );
        let names = repo.restore_point_names();
        if status.signal() == Some(libc::SIGKILL) && names.len() == completed + 1 {
            // The kill landed after the manifest was written (the commit
            // is one create-only write), while the process was exiting:
            // a complete backup, and the repository verified above.
            eprintln!("round {round}: killed after its commit");
            killed -= 1;
            completed += 1;
        }
        assert_eq!(
            names.len(),
            completed,
            "round {round} (seed {seed}, delay {delay:?}): a killed backup left a restore point: {names:?}"
        );
    }
    assert!(
        killed >= ROUNDS - 2,
        "only {killed} of {ROUNDS} backups were still running when killed; the test proves little"
    );
    let leftover_packs = repo.packs().len();
    eprintln!("packs after the killed backups: {leftover_packs}");

    let last = repo.backup("crash", &[&src]);
    eprintln!(
        "complete backup after the kills: {} bytes added",
        last.added_bytes()
    );
    let points = repo.restore_points();
    assert_eq!(points.len(), completed + 1, "{points:?}");
    // The first backup to complete in this repository is the one that
    // reuses what the killed ones stored.
    let first_added = points[0]["added_bytes"].as_u64().expect("added_bytes");
    assert!(
        first_added < full.added_bytes(),
        "the first complete backup added {first_added} bytes, as much as a fresh one ({}): \
         nothing the killed backups stored was reused ({leftover_packs} packs were left)",
        full.added_bytes()
    );

    let report = repo.verify_run(true).success().json();
    assert_eq!(report["clean"], true, "{report}");

    let out = tmp.path().join("out");
    repo.restore(&last.restore_point, &out, &[] as &[&str]);
    assert_cmp(&src.join("big.bin"), &out.join("src/big.bin"));
}
