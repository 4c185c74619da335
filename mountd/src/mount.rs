//! `flr mount`: restore points as a read-only filesystem, in the
//! foreground until a signal or an outside unmount, or in the background
//! once the mount is ready. Without a MOUNTPOINT while a daemon answers on
//! the socket, the daemon mounts instead (a session, see `remote`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use vfs_core::fs::{FsOptions, MountFilter, RepoFs};
use vfs_core::repo::RestorePointName;

use crate::exit;

/// Default mount root on Linux.
pub const DEFAULT_MOUNT_ROOT: &str = "/mnt/flr";

/// Line a background child prints on stdout once its mount answers.
const READY: &str = "flr-mount-ready";

#[derive(clap::Args)]
pub struct MountArgs {
    #[arg(long)]
    repo: PathBuf,
    /// Where to mount; created if missing. Default /mnt/flr, or a daemon
    /// session when a daemon runs.
    mountpoint: Option<PathBuf>,
    /// Show only this job's restore points.
    #[arg(long)]
    job: Option<String>,
    /// Show only this restore point (JOB/TIMESTAMP).
    #[arg(long, conflicts_with = "job")]
    restore_point: Option<String>,
    /// Bytes of decoded frames (runs of chunks) to keep in memory.
    #[arg(long, default_value = "512M", value_parser = crate::cli::size_arg)]
    cache_size: u64,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Return once the mount is ready and keep serving in the background.
    #[arg(long)]
    background: bool,
    /// Let only the mounting user read the mount (default: everyone,
    /// subject to file modes, so a database server's user can read it).
    #[arg(long)]
    private: bool,
    /// Daemon sessions only: end the session after this many seconds.
    #[arg(long)]
    expires_in: Option<u64>,
}

pub fn run(args: MountArgs, socket: &Path) -> Result<u8> {
    if args.mountpoint.is_none() {
        if mountd::client::is_running(socket) {
            return crate::remote::mount_session(
                socket,
                &args.repo,
                args.job.as_deref(),
                args.restore_point.as_deref(),
                args.expires_in,
            );
        }
        eprintln!(
            "flr: no flr daemon answers on {}; mounting here at {DEFAULT_MOUNT_ROOT}",
            socket.display()
        );
    }
    if args.background {
        return spawn_background();
    }
    let mountpoint = &args
        .mountpoint
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MOUNT_ROOT));
    if backends::fuse::is_stale_mount(mountpoint) {
        bail!(
            "{} is a stale mount left by a process that died; clear it with `fusermount3 -u {0}` (or `umount -l {0}`) and try again",
            mountpoint.display()
        );
    }
    std::fs::create_dir_all(mountpoint)
        .with_context(|| format!("cannot create mount point {}", mountpoint.display()))?;
    let repo = Arc::new(crate::cli::open_repo(&args.repo)?);
    let filter = MountFilter {
        job: args.job.clone(),
        restore_point: args
            .restore_point
            .as_deref()
            .map(|s| repo.resolve(s))
            .transpose()?
            .map(|n: RestorePointName| n),
        rooted: false,
    };
    if let Some(job) = &filter.job {
        vfs_core::manifest::validate_job_name(job)?;
    }
    let (uid, gid) = own_ids();
    let fs = RepoFs::new(
        repo,
        FsOptions {
            cache_bytes: args.cache_size as usize,
            readahead_threads: 2,
            uid,
            gid,
            filter,
        },
    )?;
    let opts = backends::fuse::FuseOptions {
        threads: args.threads.max(1),
        allow_other: !args.private,
        auto_unmount: true,
        fs_name: format!("flr:{}", args.repo.display()),
    };
    let mount = backends::fuse::mount(fs.clone(), mountpoint, &opts)
        .with_context(|| format!("cannot mount at {}", mountpoint.display()))?;

    // Signals unmount; an unmount from outside ends the wait as well.
    let unmount = mount.unmounter();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    let signal_thread = std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("flr: signal {sig}: unmounting");
            // A busy mount (a process has files open) is detached: new
            // opens fail, open files keep working until they are closed.
            if let Err(e) = unmount.unmount().or_else(|_| unmount.detach()) {
                eprintln!("flr: cannot unmount: {e}");
            }
        }
    });

    // Ready: the mount answers. A background parent waits for this line.
    std::fs::metadata(mountpoint)
        .with_context(|| format!("mount at {} does not answer", mountpoint.display()))?;
    eprintln!(
        "flr: mounted {} at {}",
        args.repo.display(),
        mountpoint.display()
    );
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{READY}");
    let _ = out.flush();

    mount.wait();
    mount.unmount().ok();
    drop(signal_thread);
    let c = &fs.counters;
    let cache = &fs.cache().counters;
    use std::sync::atomic::Ordering::Relaxed;
    eprintln!(
        "flr: unmounted {}: {} reads, {} served, {} chunk errors, cache {} hits / {} misses",
        mountpoint.display(),
        c.reads.load(Relaxed),
        crate::cli::human(c.bytes_served.load(Relaxed)),
        c.chunk_errors.load(Relaxed),
        cache.hits.load(Relaxed),
        cache.misses.load(Relaxed),
    );
    Ok(exit::OK)
}

/// Re-runs this command in the foreground as a child in its own session,
/// and returns once the child reports its mount ready.
fn spawn_background() -> Result<u8> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find the flr executable")?;
    let args: Vec<_> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--background")
        .collect();
    let mut child = std::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .context("cannot start the background mount process")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).ok();
    if line.trim() == READY {
        eprintln!("flr: mount running in the background (pid {})", child.id());
        return Ok(exit::OK);
    }
    let status = child.wait().context("waiting for the mount process")?;
    bail!("the background mount failed ({status}); see the messages above")
}

#[cfg(unix)]
fn own_ids() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or((0, 0), |m| (m.uid(), m.gid()))
}
