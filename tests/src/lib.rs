//! End-to-end tests of flr: the real `flr` binary against real files, a
//! real kernel FUSE mount and real clients (`sqlite3`, PostgreSQL,
//! coreutils, `tar`). Nothing is mocked; every test owns its temporary
//! directories, mount points and server ports, so tests run in parallel.
//!
//! The helpers, by layer:
//! - [`command`]: run any program with arguments, environment and stdin,
//!   capture its exit status, stdout and stderr, with a timeout.
//! - [`flr`]: find the built `flr` binary ([`flr::flr_bin`]) and build its
//!   command lines ([`flr::Flr`]).
//! - [`repo`]: a repository in a temporary directory ([`repo::TestRepo`])
//!   with typed wrappers for init, backup, restore and listing.
//! - [`daemon`]: [`daemon::Daemon`], a `flr daemon` process of a test's
//!   own, and HTTP exchanges with it over its socket or TCP listener.
//! - [`mount`]: [`mount::Mount`], a guard around `flr mount --background`
//!   that unmounts and ends the mount process on drop, also when the test
//!   panics; [`mount::WritableMount`], the same for a restore point
//!   mounted writable, whose session it discards;
//!   [`mount::is_mounted`] reads `/proc/mounts`.
//! - [`nfs`]: [`nfs::NfsExport`], a guard around `flr mount --nfs`,
//!   and libnfs's userspace client tools, which the tests speak NFS with.
//! - [`s3`]: a real S3 server (s3s-fs) per test; [`fault_proxy`]: an
//!   HTTP proxy in front of it that injects 5xx answers, resets, cut-off
//!   responses and delays on a seeded fraction of requests, logs every
//!   request and can freeze at an exact point of a run.
//! - [`gc`]: `flr forget` / `flr prune` wrappers and the scenario of a
//!   prune beside a backup that reuses what the prune would delete,
//!   shared by the local and the S3 suites.
//! - [`hostile`]: restore points no backup writes (duplicate names,
//!   `..`, '/', NUL, a symlink then a directory of its name), stored by
//!   hand, to check that nothing restores or serves them.
//! - [`tree`]: builds a source tree with every kind of file and compares
//!   two trees (kind, size, permission bits, mtime to the nanosecond,
//!   symlink targets, contents byte for byte).
//! - [`sqlite`]: the `sqlite3` shell, and databases built with it.
//! - [`postgres`]: PostgreSQL 15 clusters and servers run as the
//!   `postgres` user ([`postgres::PgServer`], stopped on drop), queries
//!   through `psql`, `pgbench` and `pg_basebackup`.
//! - [`rng`]: a small seeded generator, so every "random" input is
//!   reproducible from the seed printed in a failure.
//! - [`tools`]: the peer test suites scripts/setup.sh installs into
//!   `target/tools`; [`fsx`] runs the file exerciser on one file;
//!   [`pjdfstest`] runs the POSIX suite in a directory and parses its
//!   report into one outcome per test case.
//!
//! The binary comes from `FLR_BIN`, else `target/release/flr`, else
//! `target/debug/flr`; the test command builds it once beforehand.
//!
//! Unix only: the helpers drive FUSE mounts, Unix permissions and
//! `std::os::unix`, so on other targets the crate is empty (the
//! workspace still type-checks for Windows).
#![cfg(unix)]

pub mod command;
pub mod daemon;
pub mod fault_proxy;
pub mod flr;
pub mod fsx;
pub mod gc;
pub mod hostile;
pub mod mount;
pub mod nfs;
pub mod pjdfstest;
pub mod postgres;
pub mod repo;
pub mod rng;
pub mod s3;
pub mod sqlite;
pub mod tarball;
pub mod tools;
pub mod tree;

pub use command::{run, Run};
pub use flr::{flr, flr_bin, Flr};
pub use mount::{is_mounted, Mount, WritableMount};
pub use postgres::PgServer;
pub use repo::{Backup, TestRepo};
pub use rng::Rng;

use std::path::Path;

/// A fresh temporary directory for one test, named after it so a leftover
/// is easy to trace.
pub fn scratch(test: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("flr-e2e-{test}-"))
        .tempdir()
        .expect("cannot create a temporary directory")
}

/// Creates `dir` and its parents, panicking with the path on failure.
pub fn mkdir(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
}
