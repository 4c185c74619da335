//! `flr mount`: restore points as a read-only filesystem, in the
//! foreground until a signal or an outside unmount, or in the background
//! once the mount is ready. Without a MOUNTPOINT while a daemon answers on
//! the socket, the daemon mounts instead (a session, see `remote`).
//!
//! `--writable` mounts one restore point as a writable session (see
//! `mountd::writable`); unmounting discards it unless `--keep`.
//!
//! `--ingest` mounts an empty filesystem that backs up what is written
//! into it (`vfs_core::ingest_fs`): an unmount or `flr ingest commit`
//! commits one restore point of `--job`; `flr ingest abort`, a signal or
//! a crash commits nothing.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use mountd::ingest::{self as ingest_control, Ending};
use mountd::writable;
use vfs_core::fs::{FsOptions, MountFilter, RepoFs};
use vfs_core::ingest_fs::{IngestFs, IngestOptions};
use vfs_core::repo::RestorePointName;
use vfs_core::session::{self, SessionOptions};

use crate::exit;

/// `eprintln!` that never panics: a background mount's stderr may be a
/// pipe whose reader has gone, and a failed message must not stop the
/// session from being closed properly.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod nfs;

/// Default mount root on Linux.
#[cfg(not(windows))]
pub const DEFAULT_MOUNT_ROOT: &str = "/mnt/flr";
/// Windows: a directory the WinFsp volume is mounted on.
#[cfg(windows)]
pub const DEFAULT_MOUNT_ROOT: &str = r"C:\VeeamFLR";

/// Line a background child prints on stdout once its mount answers.
const READY: &str = "flr-mount-ready";

#[derive(clap::Args)]
pub struct MountArgs {
    /// The repository (with --resume, default: the session's).
    /// A directory, or s3://BUCKET/PREFIX.
    #[arg(long, required_unless_present = "resume")]
    repo: Option<backends::repo_spec::RepoSpec>,
    /// Where to mount; created if missing. Default /mnt/flr, or a daemon
    /// session when a daemon runs.
    mountpoint: Option<PathBuf>,
    /// Show only this job's restore points (with --ingest: the job the
    /// restore point is committed to).
    #[arg(long)]
    job: Option<String>,
    /// Show only this restore point (JOB/TIMESTAMP).
    #[arg(long, conflicts_with = "job")]
    restore_point: Option<String>,
    /// Bytes of decoded frames (runs of chunks) to keep in memory.
    #[arg(long, default_value = "512M", value_parser = crate::cli::size_arg)]
    cache_size: u64,
    /// Keep the stored frames fetched from the repository in this
    /// directory, so later reads (also by later mounts) cost no request:
    /// worth it for an S3 repository. One process at a time uses it.
    #[arg(long)]
    disk_cache: Option<PathBuf>,
    /// The disk cache's bound in bytes, a hard limit (least recently used
    /// frames are evicted).
    #[arg(long, default_value = "10G", value_parser = crate::cli::size_arg)]
    disk_cache_size: u64,
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
    /// Mount one restore point (--restore-point) writable: changes go to a
    /// session directory under --state-dir, never to the repository.
    #[arg(long, requires = "restore_point")]
    writable: bool,
    /// Writable: the session's id (default: JOB-SECONDS-PID).
    #[arg(long, requires = "writable")]
    session: Option<String>,
    /// Mount an existing writable session again (after a crash, or one
    /// kept with --keep).
    #[arg(long, conflicts_with_all = ["writable", "job", "restore_point"])]
    resume: Option<String>,
    /// Where writable sessions keep their changes (default:
    /// /var/lib/flr/sessions for root).
    #[arg(long, env = "FLR_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Writable: keep the session when unmounted, to resume or commit later.
    #[arg(long)]
    keep: bool,
    /// Writable: free space kept back in the state directory; writes that
    /// would use it fail with ENOSPC.
    #[arg(long, default_value = "64M", value_parser = crate::cli::size_arg)]
    reserve: u64,
    /// Writable: refuse to start a session with less free space than this.
    #[arg(long, default_value = "256M", value_parser = crate::cli::size_arg)]
    min_free: u64,
    /// Mount an empty filesystem that backs up whatever is written into
    /// it: unmounting (or `flr ingest commit MOUNTPOINT`) commits one
    /// restore point of --job.
    #[arg(
        long,
        requires = "job",
        conflicts_with_all = ["writable", "restore_point", "resume"]
    )]
    ingest: bool,
    /// Ingest: the user (name or uid) who owns the mount's root, so that
    /// a backup tool running as that user can write there.
    #[arg(long, requires = "ingest")]
    owner: Option<String>,
    /// Serve over NFSv3 at ADDR:PORT instead of mounting here (NFS and
    /// MOUNT on that one port; a bare PORT means 127.0.0.1:PORT). A
    /// restore point is exported read-only; with --writable, the session.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with_all = ["mountpoint", "ingest"])]
    nfs: Option<String>,
    /// NFS: a client address or network (ADDR or ADDR/PREFIX) that may
    /// connect; repeatable. Default: loopback clients only.
    #[arg(long, value_name = "NET", requires = "nfs")]
    nfs_allow: Vec<backends::nfs::ClientNet>,
}

pub fn run(args: MountArgs, socket: &Path) -> Result<u8> {
    let writable = args.writable || args.resume.is_some();
    if args.resume.is_some() && args.mountpoint.is_none() && args.nfs.is_none() {
        bail!("--resume needs a MOUNTPOINT (or --nfs)");
    }
    if args.ingest && args.mountpoint.is_none() {
        bail!("--ingest needs a MOUNTPOINT");
    }
    if let Some(addr) = &args.nfs {
        return nfs::run(&args, addr);
    }
    if args.mountpoint.is_none() {
        if mountd::client::is_running(socket) {
            if args.disk_cache.is_some() {
                say!("flr: --disk-cache is ignored for a daemon session: the daemon's settings.disk_cache applies");
            }
            return crate::remote::mount_session(
                socket,
                args.repo.as_ref().expect("required without --resume"),
                args.job.as_deref(),
                args.restore_point.as_deref(),
                args.expires_in,
                args.writable,
            );
        }
        if writable {
            bail!(
                "no flr daemon answers on {}: give a MOUNTPOINT for a writable mount",
                socket.display()
            );
        }
        say!(
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
    if backends::os_mount::is_stale_mount(mountpoint) {
        bail!(
            "{} is a stale mount left by a process that died; clear it with `fusermount3 -u {0}` (or `umount -l {0}`) and try again",
            mountpoint.display()
        );
    }
    std::fs::create_dir_all(mountpoint)
        .with_context(|| format!("cannot create mount point {}", mountpoint.display()))?;
    if writable {
        return run_writable(&args, mountpoint);
    }
    if args.ingest {
        return run_ingest(&args, mountpoint);
    }
    let repo_path = args.repo.as_ref().expect("required without --resume");
    let fs = open_repo_fs(&args)?;
    let opts = backends::os_mount::MountOptions {
        threads: args.threads.max(1),
        allow_other: !args.private,
        auto_unmount: true,
        fs_name: format!("flr:{}", repo_path),
    };
    let mount = backends::os_mount::mount(fs.clone(), mountpoint, &opts)
        .with_context(|| format!("cannot mount at {}", mountpoint.display()))?;
    serve(
        &mount,
        mountpoint,
        None,
        &format!("mounted {} at {}", repo_path, mountpoint.display()),
    )?;
    mount.unmount().ok();
    report_reads(&fs, mountpoint);
    Ok(exit::OK)
}

/// The read-only model of `--repo`, with `--job`/`--restore-point`. An
/// NFS export of one restore point has that restore point's files at its
/// root, as a writable session's export has.
fn open_repo_fs(args: &MountArgs) -> Result<Arc<RepoFs>> {
    let repo_path = args.repo.as_ref().expect("required without --resume");
    let repo = Arc::new(crate::cli::open_repo(repo_path)?);
    let filter = MountFilter {
        job: args.job.clone(),
        restore_point: args
            .restore_point
            .as_deref()
            .map(|s| repo.resolve(s))
            .transpose()?
            .map(|n: RestorePointName| n),
        rooted: args.nfs.is_some() && args.restore_point.is_some(),
    };
    if let Some(job) = &filter.job {
        vfs_core::manifest::validate_job_name(job)?;
    }
    let (uid, gid) = own_ids();
    let readahead_threads = mountd::read_stats::readahead_threads(&repo);
    let fs = RepoFs::new(
        repo,
        FsOptions {
            cache_bytes: args.cache_size as usize,
            disk_cache: open_disk_cache(args)?,
            readahead_threads,
            uid,
            gid,
            filter,
        },
    )?;
    Ok(fs)
}

/// `--disk-cache DIR`, opened and taken for this process.
fn open_disk_cache(args: &MountArgs) -> Result<Option<Arc<vfs_core::disk_cache::DiskCache>>> {
    let Some(dir) = &args.disk_cache else {
        return Ok(None);
    };
    let cache = vfs_core::disk_cache::DiskCache::open(dir, args.disk_cache_size)
        .with_context(|| format!("--disk-cache {}", dir.display()))?;
    Ok(Some(Arc::new(cache)))
}

/// The read path's figures at unmount: a summary line, then all of them
/// as one JSON line (`flr: read stats {...}`) for scripts.
fn report_reads(fs: &RepoFs, mountpoint: &Path) {
    // The frames still waiting for the disk cache's writer go to disk
    // first: the next mount finds them, and the figures count them.
    if let Some(d) = fs.fetcher().disk_cache() {
        d.flush();
    }
    let c = &fs.counters;
    let cache = &fs.cache().counters;
    use std::sync::atomic::Ordering::Relaxed;
    let disk = fs
        .fetcher()
        .disk_cache()
        .map(|d| {
            format!(
                ", disk cache {} hits / {} misses",
                d.counters.hits.load(Relaxed),
                d.counters.misses.load(Relaxed)
            )
        })
        .unwrap_or_default();
    say!(
        "flr: unmounted {}: {} reads, {} served, {} chunk errors, cache {} hits / {} misses{disk}",
        mountpoint.display(),
        c.reads.load(Relaxed),
        crate::cli::human(c.bytes_served.load(Relaxed)),
        c.chunk_errors.load(Relaxed),
        cache.hits.load(Relaxed),
        cache.misses.load(Relaxed),
    );
    say!("flr: read stats {}", mountd::read_stats::json(fs));
}

/// Serves a mount until it is unmounted: signals unmount it (and set
/// `signalled`), and so does anyone from outside. Prints the ready line a
/// background parent waits for.
fn serve(
    mount: &backends::os_mount::Mount,
    mountpoint: &Path,
    signalled: Option<Arc<AtomicBool>>,
    message: &str,
) -> Result<()> {
    let unmount = mount.unmounter();
    let signals = crate::interrupt::Interrupts::new().context("cannot install signal handlers")?;
    let signal_thread = std::thread::spawn(move || {
        if let Some(sig) = signals.wait() {
            say!("flr: signal {sig}: unmounting");
            if let Some(flag) = &signalled {
                flag.store(true, Ordering::SeqCst);
            }
            // A busy mount (a process has files open) is detached: new
            // opens fail, open files keep working until they are closed.
            if let Err(e) = unmount.unmount().or_else(|_| unmount.detach()) {
                say!("flr: cannot unmount: {e}");
            }
        }
    });

    // Ready: the mount answers. A background parent waits for this line.
    std::fs::metadata(mountpoint)
        .with_context(|| format!("mount at {} does not answer", mountpoint.display()))?;
    say!("flr: {message}");
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{READY}");
    let _ = out.flush();

    mount.wait();
    drop(signal_thread);
    Ok(())
}

/// A writable session, opened or resumed.
struct Session {
    cow: Arc<session::CowFs>,
    id: String,
    repo_path: backends::repo_spec::RepoSpec,
    rp: RestorePointName,
    resume: bool,
    state_dir: PathBuf,
}

/// Opens the session `--writable`/`--resume` ask for.
fn open_writable(args: &MountArgs) -> Result<Session> {
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(writable::default_state_dir);
    let (repo_path, rp_text, id) = match &args.resume {
        Some(id) => {
            let info = session::read_info(&state_dir, id)?;
            let repo = match args.repo.clone() {
                Some(r) => r,
                None => backends::repo_spec::RepoSpec::parse(&info.repository)
                    .map_err(anyhow::Error::msg)?,
            };
            (repo, info.restore_point, Some(id.clone()))
        }
        None => (
            args.repo.clone().expect("required without --resume"),
            args.restore_point.clone().expect("required by --writable"),
            args.session.clone(),
        ),
    };
    let repo = Arc::new(crate::cli::open_repo(&repo_path)?);
    let rp = repo.resolve(&rp_text)?;
    let resume = args.resume.is_some();
    let id = id.unwrap_or_else(|| writable::new_session_id(&rp));
    let cow = writable::open_session(
        repo,
        &repo_path.absolute().to_string(),
        &rp,
        &state_dir,
        &id,
        resume,
        writable::OpenOptions {
            cache_bytes: args.cache_size as usize,
            cache: None,
            disk_cache: open_disk_cache(args)?,
            session: SessionOptions {
                reserve_bytes: args.reserve,
                min_free_bytes: args.min_free,
            },
        },
    )?;
    Ok(Session {
        cow,
        id,
        repo_path,
        rp,
        resume,
        state_dir,
    })
}

/// `flr mount --writable` / `--resume`: one restore point as a writable
/// session until unmounted; then the session is discarded, or kept with
/// `--keep`.
fn run_writable(args: &MountArgs, mountpoint: &Path) -> Result<u8> {
    let Session {
        cow,
        id,
        repo_path,
        rp,
        resume,
        state_dir,
    } = open_writable(args)?;
    let opts = backends::os_mount::MountOptions {
        threads: args.threads.max(1),
        allow_other: !args.private,
        auto_unmount: true,
        fs_name: format!("flr:{}", repo_path),
    };
    let mount = match backends::os_mount::mount(cow.clone(), mountpoint, &opts) {
        Ok(m) => m,
        Err(e) => {
            // A session made just now holds nothing yet.
            let _ = cow.close(resume);
            return Err(e).with_context(|| format!("cannot mount at {}", mountpoint.display()));
        }
    };

    // A discard through the control socket unmounts, then waits here until
    // the session is gone.
    let discarded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<std::result::Result<(), String>>();
    let done_rx = parking_lot::Mutex::new(done_rx);
    let unmounter = mount.unmounter();
    let flag = discarded.clone();
    let control = writable::serve_control(cow.clone(), move || {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        unmounter.unmount().or_else(|_| unmounter.detach())?;
        match done_rx.lock().recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => bail!("{e}"),
            Err(_) => bail!("the mount process ended first"),
        }
    });
    let control = control
        .map_err(|e| {
            say!("flr: warning: {e:#}; `flr session commit|discard {id}` cannot reach this mount")
        })
        .ok();
    serve(
        &mount,
        mountpoint,
        None,
        &format!(
            "writable session {id} of {rp} mounted at {}; changes go to {}",
            mountpoint.display(),
            cow.dir().display()
        ),
    )?;
    mount.unmount().ok();
    let discarded = discarded.load(std::sync::atomic::Ordering::SeqCst);
    close_session(
        args, cow, &id, &state_dir, discarded, control, done_tx, mountpoint,
    )
}

/// Ends a served session: reports, then discards it, or keeps it with
/// `--keep` (unless a discard was asked for); answers a waiting discard.
#[allow(clippy::too_many_arguments)]
fn close_session(
    args: &MountArgs,
    cow: Arc<session::CowFs>,
    id: &str,
    state_dir: &Path,
    discarded: bool,
    control: Option<writable::ControlServer>,
    done_tx: std::sync::mpsc::Sender<std::result::Result<(), String>>,
    mountpoint: &Path,
) -> Result<u8> {
    let keep = args.keep && !discarded;
    report_reads(cow.base(), mountpoint);
    let c = &cow.counters;
    use std::sync::atomic::Ordering::Relaxed;
    say!(
        "flr: unmounted {}: {} writes, {} written, {} fsyncs, {} refused for space",
        mountpoint.display(),
        c.writes.load(Relaxed),
        crate::cli::human(c.bytes_written.load(Relaxed)),
        c.fsyncs.load(Relaxed),
        c.no_space.load(Relaxed),
    );
    // Stopped while its socket still exists (closing may delete it).
    if let Some(c) = &control {
        c.stop();
    }
    let closed = cow.close(keep);
    let _ = done_tx.send(closed.as_ref().map(|_| ()).map_err(|e| e.to_string()));
    // A discard's reply goes out before this process ends.
    if let Some(c) = control {
        c.finish();
    }
    closed.with_context(|| format!("cannot close session {id}"))?;
    if keep {
        say!(
            "flr: session {id} kept in {}: `flr mount --resume {id} MOUNTPOINT` mounts it again, `flr session commit {id} --job JOB` stores it, `flr session discard {id}` drops it",
            state_dir.display()
        );
    } else {
        say!("flr: session {id} discarded");
    }
    Ok(exit::OK)
}

/// `flr mount --ingest`: an empty filesystem whose files are backed up as
/// they are written. The unmount commits one restore point of `--job`;
/// `flr ingest abort` and signals end it without one.
fn run_ingest(args: &MountArgs, mountpoint: &Path) -> Result<u8> {
    let repo_path = args.repo.as_ref().expect("required without --resume");
    let job = args.job.clone().expect("required by --ingest");
    vfs_core::manifest::validate_job_name(&job)?;
    let (root_uid, root_gid) = match &args.owner {
        Some(user) => lookup_user(user)?,
        None => own_ids(),
    };
    let repo = Arc::new(crate::cli::open_repo(repo_path)?);
    let fs = IngestFs::new(
        repo,
        IngestOptions {
            root_uid,
            root_gid,
            root_mode: 0o755,
            batch_bytes: vfs_core::ingest::BATCH_BYTES,
            space_path: repo_path.local_path().map(Path::to_path_buf),
        },
    )
    .context("cannot start the ingest")?;
    let opts = backends::os_mount::MountOptions {
        threads: args.threads.max(1),
        allow_other: !args.private,
        auto_unmount: true,
        fs_name: format!("flr-ingest:{}", repo_path),
    };
    let mount = match backends::os_mount::mount(fs.clone(), mountpoint, &opts) {
        Ok(m) => m,
        Err(e) => {
            fs.abort();
            return Err(e).with_context(|| format!("cannot mount at {}", mountpoint.display()));
        }
    };

    // A commit or abort through the control socket unmounts, then waits
    // here for the outcome.
    let asked: Arc<parking_lot::Mutex<Option<Ending>>> = Arc::default();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<std::result::Result<String, String>>();
    let done_rx = parking_lot::Mutex::new(done_rx);
    let unmounter = mount.unmounter();
    let asked_here = asked.clone();
    let shown = mountpoint.display().to_string();
    let control = ingest_control::serve_control(mountpoint, move |ending| {
        *asked_here.lock() = Some(ending);
        let unmounted = match ending {
            // Files still open could still be written: no commit then.
            Ending::Commit => unmount_when_idle(&unmounter),
            Ending::Abort => unmounter.unmount().or_else(|_| unmounter.detach()),
        };
        if let Err(e) = unmounted {
            *asked_here.lock() = None;
            bail!("{e}; close the files open under {shown} and try again");
        }
        match done_rx.lock().recv() {
            Ok(Ok(payload)) => Ok(payload),
            Ok(Err(e)) => bail!("{e}"),
            Err(_) => bail!("the mount process ended first"),
        }
    })
    .map_err(|e| say!("flr: warning: {e:#}; `flr ingest commit|abort` cannot reach this mount"))
    .ok();
    let signalled = Arc::new(AtomicBool::new(false));
    serve(
        &mount,
        mountpoint,
        Some(signalled.clone()),
        &format!(
            "ingest into job {job} of {} mounted at {}; unmount or `flr ingest commit {}` commits it",
            repo_path,
            mountpoint.display(),
            mountpoint.display()
        ),
    )?;
    mount.unmount().ok();
    let ending = match *asked.lock() {
        Some(e) => e,
        None if signalled.load(Ordering::SeqCst) => Ending::Abort,
        None => Ending::Commit,
    };
    let c = &fs.counters;
    use std::sync::atomic::Ordering::Relaxed;
    say!(
        "flr: unmounted {}: {} writes, {} written, {} rewrites, {} failed writes",
        mountpoint.display(),
        c.writes.load(Relaxed),
        crate::cli::human(c.bytes_written.load(Relaxed)),
        c.rewrites.load(Relaxed),
        c.failed_writes.load(Relaxed),
    );
    let outcome = match ending {
        Ending::Abort => {
            fs.abort();
            say!("flr: ingest aborted: nothing committed");
            Ok(String::new())
        }
        Ending::Commit => match fs.commit(&job, &mountd::hostname()) {
            Ok(m) => {
                let s = &m.stats;
                say!(
                    "flr: committed restore point {}: {} files, {} written, {} added",
                    m.full_name(),
                    s.files,
                    crate::cli::human(s.logical_bytes),
                    crate::cli::human(s.added_bytes()),
                );
                Ok(serde_json::json!({
                    "restore_point": m.full_name(),
                    "stats": crate::cli::stats_json(s),
                })
                .to_string())
            }
            Err(e) => Err(format!(
                "the ingest's commit failed, nothing was committed: {e}"
            )),
        },
    };
    let _ = done_tx.send(outcome.clone());
    // A commit's reply goes out before this process ends.
    if let Some(c) = control {
        c.finish();
    }
    match outcome {
        Ok(_) => Ok(exit::OK),
        Err(e) => bail!("{e}"),
    }
}

/// Unmounts, waiting a few seconds while the mount is busy: the kernel
/// holds a mount busy until the releases of files just closed are
/// answered. Still busy after that: files are open, and the error says so.
fn unmount_when_idle(unmounter: &backends::os_mount::Unmounter) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match unmounter.unmount() {
            Err(e)
                if e.kind() == std::io::ErrorKind::ResourceBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// A user's uid and gid, from a name in /etc/passwd or a number.
fn lookup_user(user: &str) -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let numeric = user.parse::<u32>().ok();
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 {
            continue;
        }
        let (Ok(uid), Ok(gid)) = (fields[2].parse::<u32>(), fields[3].parse::<u32>()) else {
            continue;
        };
        if fields[0] == user || numeric == Some(uid) {
            return Ok((uid, gid));
        }
    }
    match numeric {
        Some(uid) => Ok((uid, uid)),
        None => bail!("--owner {user}: no such user in /etc/passwd"),
    }
}

/// Re-runs this command in the foreground as a child in its own session,
/// and returns once the child reports its mount ready.
fn spawn_background() -> Result<u8> {
    let exe = std::env::current_exe().context("cannot find the flr executable")?;
    let args: Vec<_> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--background")
        .collect();
    let mut command = std::process::Command::new(exe);
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    #[cfg(windows)]
    {
        // Its own process group: the console's Ctrl-C for this one does
        // not reach it (as process_group(0) does on Unix).
        use std::os::windows::process::CommandExt;
        const CREATE_NEW_PROCESS_GROUP: u32 = 0x0000_0200;
        command.creation_flags(CREATE_NEW_PROCESS_GROUP);
    }
    let mut child = command
        .spawn()
        .context("cannot start the background mount process")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).ok();
    if line.trim() == READY {
        say!("flr: mount running in the background (pid {})", child.id());
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

#[cfg(not(unix))]
fn own_ids() -> (u32, u32) {
    mountd::host::own_ids()
}
