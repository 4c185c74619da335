//! fsx, the file system exerciser: a seeded random sequence of reads,
//! writes, truncations, mmap accesses, syncs and copies on one file, every
//! read checked against an in-memory model of what the file must hold.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::command::{run_with, Run};
use crate::tools::FSX;

/// Long enough for the largest run the tests ask for on a FUSE mount on
/// two busy cores; a hung file operation fails the test instead.
const FSX_TIMEOUT: Duration = Duration::from_secs(300);

/// Relative weights of the operations, fsx's config keys. Hole punching
/// is left out: it needs `fallocate(FALLOC_FL_PUNCH_HOLE)`, which a
/// filesystem may refuse with EOPNOTSUPP and fsx then counts as a
/// failure. `posix_fallocate` is in: glibc falls back to writing zeros
/// when the filesystem has no fallocate.
const WEIGHTS: &[(&str, u32)] = &[
    ("read", 10),
    ("write", 10),
    ("mapread", 5),
    ("mapwrite", 5),
    ("invalidate", 1),
    ("fsync", 1),
    ("fdatasync", 1),
    ("sendfile", 2),
    ("posix_fadvise", 1),
    ("copy_file_range", 3),
    // These change the file's size or reopen it; fsx refuses them in
    // block mode.
    ("truncate", 5),
    ("close_open", 2),
    ("posix_fallocate", 1),
];

/// The operations that change the size or reopen the file.
const SIZE_CHANGING: &[&str] = &["truncate", "close_open", "posix_fallocate"];

/// One fsx run.
pub struct Fsx {
    /// How many operations to do.
    pub ops: u64,
    /// The generator's seed: the same seed replays the same operations.
    pub seed: u64,
    /// The largest size the file grows to; in block mode, the length of
    /// the range fsx overwrites at the start of the file.
    pub file_len: u32,
    /// Block mode: fsx keeps the file's size, overwrites its first
    /// `file_len` bytes with zeros and then works on them; the bytes past
    /// `file_len` are never touched. Without it, fsx truncates the file
    /// to zero when it opens it.
    pub block_mode: bool,
}

impl Fsx {
    /// The configuration file's text.
    fn config(&self) -> String {
        let mut toml = format!(
            "flen = {}\nblockmode = {}\nnosizechecks = {}\n\n",
            self.file_len, self.block_mode, self.block_mode
        );
        // Reads and writes up to 128 KiB at any byte offset: they cross
        // page and FUSE request boundaries, and start and end mid-page.
        toml.push_str("[opsize]\nmin = 0\nmax = 131072\nalign = 1\n\n[weights]\n");
        for (op, weight) in WEIGHTS {
            let weight = if self.block_mode && SIZE_CHANGING.contains(op) {
                0
            } else {
                *weight
            };
            toml.push_str(&format!("{op} = {weight}\n"));
        }
        // fsx's default weights are not zero for these; say it.
        toml.push_str("punch_hole = 0\n");
        toml
    }

    /// Runs fsx on `file`, with its configuration file and (on failure)
    /// its model of the file in `artifacts`, outside the filesystem under
    /// test. The caller judges the outcome.
    pub fn run(&self, file: &Path, artifacts: &Path) -> FsxRun {
        crate::mkdir(artifacts);
        let name = file
            .file_name()
            .expect("fsx needs a file name")
            .to_string_lossy()
            .into_owned();
        let config = artifacts.join(format!("{name}.fsx.toml"));
        std::fs::write(&config, self.config())
            .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let mut cmd = Command::new(FSX.path());
        cmd.arg("-f")
            .arg(&config)
            .arg("-N")
            .arg(self.ops.to_string())
            .arg("-S")
            .arg(self.seed.to_string())
            .arg("-P")
            .arg(artifacts)
            .arg(file)
            // A panic on an unexpected errno prints where it happened.
            .env("RUST_BACKTRACE", "0");
        FsxRun {
            run: run_with(&mut cmd, None, FSX_TIMEOUT),
        }
    }
}

/// What an fsx run did.
pub struct FsxRun {
    pub run: Run,
}

impl FsxRun {
    /// Whether every operation ran and every read matched the model.
    pub fn passed(&self) -> bool {
        self.run.status.success() && self.run.stdout.contains("All operations completed A-OK!")
    }

    /// Panics unless the run passed, after printing all of its output:
    /// the first mismatch, the seed, and the last 1024 operations.
    #[track_caller]
    pub fn assert_passed(&self, what: &str) {
        if self.passed() {
            return;
        }
        eprintln!(
            "fsx on {what} failed; its full output:\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.run.stdout, self.run.stderr
        );
        let first_lines: Vec<&str> = self.run.stderr.lines().take(20).collect();
        panic!(
            "fsx on {what} failed: `{}` ({:?})\n{}",
            self.run.command,
            self.run.status,
            first_lines.join("\n")
        );
    }
}
