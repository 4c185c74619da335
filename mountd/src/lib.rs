//! The mount daemon of flr and the client the command line uses to reach
//! it. The `flr` binary (`src/main.rs`) holds the command line; this
//! library holds what tests and other programs drive directly.
//!
//! - [`daemon`]: `flr daemon`. [`daemon::run`] serves the HTTP/JSON control
//!   API (axum) on a Unix socket, and optionally on TCP with a bearer
//!   token, until a shutdown future resolves. On Windows it is served on
//!   TCP only, token required.
//!   - [`daemon::sessions`]: mount sessions. Each restore point is
//!     mounted once (FUSE or WinFsp, through `backends::os_mount`) at
//!     `<mount root>/<repository>/<job>/<timestamp>` and shared by every
//!     session that asks for it; the last session to end unmounts it.
//!   - [`daemon::jobs`]: file-level restore jobs on a bounded worker pool,
//!     running `vfs_core::restore` with progress and a cancel flag.
//!   - [`daemon::api`]: routes, JSON in and out, errors as
//!     `{"error": "..."}` with a status that says what kind of mistake.
//!   - [`daemon::metrics`]: the Prometheus text exposition.
//! - [`devices`]: named-pipe devices for `flr devices` and `POST /devices`.
//! - [`client`]: a small blocking HTTP/1.1 client over the Unix socket.
//! - [`writable`]: writable sessions: opening one over a restore point,
//!   committing it, and the control socket `flr session` reaches it by.
//! - [`export`]: a database out of a restore point as files, an archive
//!   or a logical dump (`flr export`, `POST /exports`); [`transfer`]
//!   sends one to another host's daemon, whose [`daemon::receive`] takes
//!   it.
//! - [`read_stats`]: a mount's read-path figures (caches, requests,
//!   readahead) for `flr mount` and the daemon's metrics.
//! - [`host`]: what differs between Unix and Windows hosts (modes,
//!   owners, process control, syncfs, free space), in one place.
//! - [`ingest`]: the control socket of an ingest mount (`flr mount
//!   --ingest`), through which `flr ingest commit|abort` end it.

/// This host's name, recorded in each restore point it commits (empty if
/// unreadable).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A byte count for people: `1.5 GiB`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub mod client;
pub mod daemon;
pub mod devices;
pub mod export;
pub mod host;
pub mod ingest;
pub mod read_stats;
pub mod transfer;
pub mod writable;
