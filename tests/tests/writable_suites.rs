//! Peer test suites against a restore point mounted writable: fsx (a
//! seeded random mix of reads, writes, truncations, mmap accesses, syncs
//! and copies on one file, every read checked against a model of the
//! file) and pjdfstest (the POSIX semantics of every namespace call:
//! modes, owners, timestamps, link counts and errno, as root and as two
//! unprivileged users, through the kernel's permission checks).
//!
//! fsx runs on a new file, on a backed-up file that it truncates and
//! regrows (restore point bytes must never come back), and on the start
//! of a backed-up file that it overwrites in place (the untouched rest
//! must still read from the restore point). pjdfstest runs in a directory
//! that came from the backup; a case that fails must be in
//! [`KNOWN_FAILURES`] with the reason, and a listed case that passes must
//! leave the list.
//!
//! Both suites come from crates.io; scripts/setup.sh installs them into
//! `target/tools` and creates pjdfstest's second user.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flr_e2e::fsx::Fsx;
use flr_e2e::pjdfstest::{run_suite, Outcome};
use flr_e2e::rng::Rng;
use flr_e2e::tools::{Tool, FSX, PJDFSTEST};
use flr_e2e::tree::{assert_cmp, write_random_file, MIB};
use flr_e2e::{is_mounted, scratch, TestRepo, WritableMount};

/// Operations per fsx run: tens of thousands mix every kind of operation
/// at every size many times over, in well under a minute on the mount.
const FSX_OPS: u64 = 30_000;

/// The largest size fsx grows a file to (its `flen`), and the size of
/// the backed-up file: three times larger, so that a regrown file has
/// restore point bytes under every offset fsx uses.
const FSX_FILE_LEN: u32 = MIB as u32;
const BACKED_UP_LEN: u64 = 3 * MIB;

/// pjdfstest cases that fail on this filesystem for a reason that is not
/// a bug to fix: the name as pjdfstest prints it, and why.
const KNOWN_FAILURES: &[(&str, &str)] = &[];

/// A source tree (a random file and a directory), backed up, and its
/// restore point mounted writable. The mount is declared first so it is
/// dropped (the session discarded, the mount gone) before the
/// directories are removed.
struct Fixture {
    mount: WritableMount,
    src: PathBuf,
    tmp: tempfile::TempDir,
}

/// The random file of the source tree, and the directory pjdfstest runs
/// in, relative to the backed-up directory.
const BACKED_UP_FILE: &str = "data.bin";
const BACKED_UP_DIR: &str = "dir";

impl Fixture {
    /// Builds, backs up and mounts the tree for a test that runs `suite`,
    /// after checking that the suite is installed.
    #[track_caller]
    fn new(test: &str, seed: u64, suite: &Tool) -> Fixture {
        suite.path();
        let tmp = scratch(test);
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join(BACKED_UP_DIR)).unwrap();
        write_random_file(
            &src.join(BACKED_UP_FILE),
            BACKED_UP_LEN,
            &mut Rng::new(seed),
        );
        fs::write(
            src.join(BACKED_UP_DIR).join("kept.txt"),
            "from the backup\n",
        )
        .unwrap();
        let repo = TestRepo::init(&tmp.path().join("repo"));
        let backup = repo.backup("suite", &[&src]);
        let mount = WritableMount::background(
            &repo,
            &backup.restore_point,
            &tmp.path().join("mnt"),
            &tmp.path().join("state"),
            test,
        );
        let fixture = Fixture { mount, src, tmp };
        assert_cmp(
            &fixture.src.join(BACKED_UP_FILE),
            &fixture.backed_up(BACKED_UP_FILE),
        );
        fixture
    }

    /// `rel` (relative to the backed-up directory) in the mount.
    fn backed_up(&self, rel: &str) -> PathBuf {
        self.mount.join("src").join(rel)
    }

    /// A directory outside the mount for a suite's files.
    fn outside(&self, name: &str) -> PathBuf {
        let dir = self.tmp.path().join(name);
        flr_e2e::mkdir(&dir);
        dir
    }

    /// Panics unless the mount is still there: a suite that crashed the
    /// mount process would otherwise fail with puzzling errors.
    #[track_caller]
    fn assert_still_mounted(&self) {
        assert!(
            is_mounted(self.mount.path()),
            "the writable mount is gone:\n{}",
            self.mount.messages()
        );
    }
}

/// Runs fsx on `file` and asserts that it passed.
#[track_caller]
fn fsx(fixture: &Fixture, file: &Path, fsx: Fsx, what: &str) {
    let started = Instant::now();
    let run = fsx.run(file, &fixture.outside("fsx"));
    fixture.assert_still_mounted();
    run.assert_passed(what);
    eprintln!(
        "fsx on {what}: {} operations (seed {}) passed in {:.1?}",
        fsx.ops,
        fsx.seed,
        started.elapsed()
    );
}

#[test]
fn fsx_on_a_new_file() {
    let fixture = Fixture::new("fsx-new", 1, &FSX);
    let file = fixture.mount.join("fsx-new.bin");
    let run = Fsx {
        ops: FSX_OPS,
        seed: 1,
        file_len: FSX_FILE_LEN,
        block_mode: false,
    };
    fsx(&fixture, &file, run, "a new file");
}

/// fsx opens the backed-up file with O_TRUNC and then grows and shrinks
/// it: every byte it has not written must read as zero, never as the
/// restore point's byte at that offset.
#[test]
fn fsx_on_a_backed_up_file_truncated_and_regrown() {
    let fixture = Fixture::new("fsx-regrown", 2, &FSX);
    let file = fixture.backed_up(BACKED_UP_FILE);
    let run = Fsx {
        ops: FSX_OPS,
        seed: 2,
        file_len: FSX_FILE_LEN,
        block_mode: false,
    };
    fsx(
        &fixture,
        &file,
        run,
        "a backed-up file, truncated and regrown",
    );
}

/// fsx keeps the backed-up file's size and works on its first bytes;
/// everything after them must still be the restore point's bytes. The
/// boundary is on a page (fsx expects zeros past its end within the last
/// page it maps) but on no larger power of two, so it cuts through
/// whatever block the filesystem copies up.
#[test]
fn fsx_overwrites_the_start_of_a_backed_up_file_in_place() {
    let fixture = Fixture::new("fsx-in-place", 3, &FSX);
    let file = fixture.backed_up(BACKED_UP_FILE);
    let overwritten = FSX_FILE_LEN + 3 * 4096;
    let run = Fsx {
        ops: FSX_OPS,
        seed: 3,
        file_len: overwritten,
        block_mode: true,
    };
    fsx(
        &fixture,
        &file,
        run,
        "the start of a backed-up file, in place",
    );

    let len = fs::metadata(&file).unwrap().len();
    assert_eq!(len, BACKED_UP_LEN, "fsx in block mode changed the size");
    let tail = |path: &Path| {
        let mut buf = vec![0u8; (BACKED_UP_LEN - u64::from(overwritten)) as usize];
        fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut buf, u64::from(overwritten))
            .unwrap_or_else(|e| panic!("read the tail of {}: {e}", path.display()));
        buf
    };
    let (expected, actual) = (tail(&fixture.src.join(BACKED_UP_FILE)), tail(&file));
    if let Some(at) = expected.iter().zip(&actual).position(|(e, a)| e != a) {
        panic!(
            "byte {} of the backed-up file (past the {overwritten} bytes fsx wrote) \
             is {:#04x}, the restore point has {:#04x}",
            u64::from(overwritten) + at as u64,
            actual[at],
            expected[at]
        );
    }
}

#[test]
fn pjdfstest_in_a_backed_up_directory() {
    let fixture = Fixture::new("pjdfstest", 4, &PJDFSTEST);
    let dir = fixture.backed_up(BACKED_UP_DIR);
    let started = Instant::now();
    // The secondary filesystem, for the cross-device cases, is the disk
    // the scratch directory is on.
    let suite = run_suite(
        &dir,
        &fixture.outside("secondary"),
        &fixture.outside("pjdfstest"),
    );
    let elapsed = started.elapsed();
    fixture.assert_still_mounted();
    let report = &suite.report;
    let s = report.summary;
    eprintln!(
        "pjdfstest: {} passed, {} failed, {} skipped of {} cases in {elapsed:.1?}",
        s.passed, s.failed, s.skipped, s.total
    );
    for case in report.with(Outcome::Skipped) {
        eprintln!("pjdfstest: skipped {case}");
    }

    let known = |name: &str| KNOWN_FAILURES.iter().find(|(n, _)| *n == name);
    let mut problems = Vec::new();
    for case in report.with(Outcome::Failed) {
        match known(&case.name) {
            Some((_, why)) => eprintln!("pjdfstest: known failure {} ({why})", case.name),
            None => problems.push(format!("failed: {case}")),
        }
    }
    for (name, _) in KNOWN_FAILURES {
        let outcome = report
            .cases
            .iter()
            .find(|c| c.name == *name)
            .map(|c| c.outcome);
        if outcome != Some(Outcome::Failed) {
            problems.push(format!(
                "{name} is in KNOWN_FAILURES but ended {outcome:?}: remove it from the list"
            ));
        }
    }
    // The suite must really have run: as root, with every user it
    // switches to, and with the features configured for it.
    for case in report.with(Outcome::Skipped) {
        if case
            .details
            .iter()
            .any(|d| d.contains("requires root") || d.contains("requires features"))
        {
            problems.push(format!("skipped for want of root or a feature: {case}"));
        }
    }
    assert!(
        problems.is_empty(),
        "pjdfstest in the writable mount: {} unexpected results \
         ({} passed of {}):\n{}\n--- pjdfstest's stderr ---\n{}",
        problems.len(),
        s.passed,
        s.total,
        problems.join("\n"),
        suite.run.stderr
    );

    // The rest of the backed-up tree is untouched by the suite.
    assert_cmp(
        &fixture.src.join(BACKED_UP_FILE),
        &fixture.backed_up(BACKED_UP_FILE),
    );
    assert_eq!(
        fs::read_to_string(fixture.backed_up(BACKED_UP_DIR).join("kept.txt")).unwrap(),
        "from the backup\n"
    );
}
