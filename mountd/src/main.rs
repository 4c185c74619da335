//! `flr`: the command line and mount daemon of flr.
//!
//! Subcommands map one to one onto the core: `init`, `backup`,
//! `restore-points`, `restore`, `verify` work on a repository through
//! `vfs_core`; `mount` builds the filesystem model and hands it to the
//! OS's mount adapter in `backends` (FUSE on Linux, WinFsp on Windows).
//! Commands that run until stopped wait for [`interrupt`] (SIGINT/SIGTERM,
//! or Ctrl-C/Ctrl-Break on Windows). Errors carry context with `anyhow`
//! and end in the exit codes documented in `docs/cli.md`. `daemon` runs the mount
//! service of the `mountd` library; `mounts`, `unmount`, `status` (and
//! `mount` when a daemon runs) talk to it over its socket ([`remote`]).
//! `session` lists, commits and discards writable sessions ([`sessions`]).
//! `ingest` commits or aborts an ingest mount ([`ingest_cmd`]).

mod cli;
mod copy_cmd;
mod device_cmd;
mod export_cmd;
mod gc_cmd;
mod ingest_cmd;
mod interrupt;
mod logging;
mod mount;
mod progress;
mod remote;
mod sessions;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: the read path allocates and frees a buffer per chunk on
/// several threads, where glibc's arenas spent visible time growing and
/// trimming their heaps.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hands the calling thread's freed pages, and the arenas' empty ones,
/// back to the system (see [`vfs_core::memory`]).
#[allow(unsafe_code)]
fn release_freed() {
    // SAFETY: mi_collect takes a flag and only walks mimalloc's own
    // structures; it is safe to call from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Exit codes scripts can rely on.
pub mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    /// Backup committed, but some files changed while being read.
    pub const CHANGED_DURING_BACKUP: u8 = 3;
    /// Verify found damage.
    pub const DAMAGED: u8 = 4;
}

fn main() -> ExitCode {
    // mimalloc asks for transparent huge pages on its arenas, and then
    // every touch of a fresh 2 MiB range makes all of it resident: a mount
    // stood at 36 MiB before its first read, 26 MiB of it huge pages. The
    // process's memory is meant to follow its caches' bounds, so it takes
    // small pages only.
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
    vfs_core::memory::set_release_hook(release_freed);
    let args = cli::Cli::parse();
    cli::init_logging(&args);
    match cli::run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("flr: error: {e:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}
