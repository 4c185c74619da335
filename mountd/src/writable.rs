//! Writable sessions as the command line and the daemon serve them: the
//! copy-on-write model of `vfs_core::session` over a restore point, its
//! FUSE mount, and a control socket in the session directory through which
//! `flr session commit|discard` reach the process that serves it.
//!
//! Control protocol (`<session dir>/control.sock`): one request line, one
//! reply line. `commit JOB` replies `ok JOB/TIMESTAMP ADDED_BYTES SKIPPED`;
//! `discard` unmounts, deletes the session and replies `ok`; errors reply
//! `error MESSAGE`.

#[cfg(unix)]
use std::io::{BufRead, BufReader, Write};
#[cfg(unix)]
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
#[cfg(unix)]
use std::time::Duration;

#[cfg(unix)]
use anyhow::bail;
use anyhow::{Context, Result};
use vfs_core::backup::{BackupOptions, Progress};
use vfs_core::fs::{FsOptions, MountFilter, RepoFs};
use vfs_core::repo::{Repository, RestorePointName};
#[cfg(unix)]
use vfs_core::session;
use vfs_core::session::{CowFs, SessionInfo, SessionOptions};

/// Where sessions live unless `--state-dir` or `FLR_STATE_DIR` says
/// otherwise: `/var/lib/flr/sessions` for root, else under the user's
/// state home.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLR_STATE_DIR") {
        return PathBuf::from(dir);
    }
    if crate::host::is_root() {
        return PathBuf::from("/var/lib/flr/sessions");
    }
    let state_home = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    state_home.join("flr/sessions")
}

/// A fresh session id: the restore point's job, the time and the pid.
pub fn new_session_id(rp: &RestorePointName) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{}-{secs}-{}", rp.job, std::process::id())
}

pub struct OpenOptions {
    /// Bytes of decoded frames the session's own cache keeps, unless it
    /// shares `cache`.
    pub cache_bytes: usize,
    /// A memory cache shared with other mounts (the daemon's one).
    pub cache: Option<Arc<vfs_core::cache::ChunkCache>>,
    /// Stored frames kept on disk (see `vfs_core::disk_cache`).
    pub disk_cache: Option<Arc<vfs_core::disk_cache::DiskCache>>,
    pub session: SessionOptions,
}

/// Opens session `id` over restore point `rp` of `repo`: a new one, or with
/// `resume` the existing one.
pub fn open_session(
    repo: Arc<Repository>,
    repository: &str,
    rp: &RestorePointName,
    state_dir: &Path,
    id: &str,
    resume: bool,
    opts: OpenOptions,
) -> Result<Arc<CowFs>> {
    let (uid, gid) = own_ids();
    let readahead_threads = crate::read_stats::readahead_threads(&repo);
    let options = FsOptions {
        cache_bytes: opts.cache_bytes,
        disk_cache: opts.disk_cache,
        readahead_threads,
        uid,
        gid,
        filter: MountFilter {
            job: None,
            restore_point: Some(rp.clone()),
            rooted: true,
        },
    };
    let base = match opts.cache {
        Some(cache) => RepoFs::with_cache(repo, options, cache),
        None => RepoFs::new(repo, options),
    }?;
    let cow = if resume {
        CowFs::resume(base, state_dir, id, opts.session)?
    } else {
        let info = SessionInfo {
            format: vfs_core::format::SESSION_FORMAT,
            id: id.to_string(),
            repository: repository.to_string(),
            restore_point: rp.to_string(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        };
        CowFs::create(base, state_dir, info, opts.session)?
    };
    Ok(cow)
}

/// What a commit made.
pub struct Committed {
    pub restore_point: String,
    pub added_bytes: u64,
    /// Pipes, sockets and device nodes left out.
    pub skipped: u64,
}

/// Stores the session's current state as a restore point of `job`.
pub fn commit(cow: &Arc<CowFs>, job: &str) -> Result<Committed> {
    vfs_core::manifest::validate_job_name(job)?;
    let opts = BackupOptions {
        job: job.to_string(),
        chunker: None,
        hostname: crate::hostname(),
        progress: Arc::new(Progress::default()),
    };
    let (manifest, skipped) = cow
        .commit(&opts)
        .with_context(|| format!("cannot commit session {}", cow.info().id))?;
    Ok(Committed {
        restore_point: manifest.full_name(),
        added_bytes: manifest.stats.added_bytes(),
        skipped,
    })
}

fn control_path(session_dir: &Path) -> PathBuf {
    session_dir.join("control.sock")
}

/// The control socket's server; [`ControlServer::stop`] ends it.
pub struct ControlServer {
    #[cfg_attr(not(unix), allow(dead_code))]
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    /// Tells the server thread to end (it holds the session open until
    /// then); a request being answered is finished first.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the thread blocked in accept.
        #[cfg(unix)]
        let _ = UnixStream::connect(&self.path);
    }

    /// Stops the server and waits for its thread, so a reply being sent
    /// (to a discard) reaches its client before the process exits. Not
    /// from the server thread itself.
    pub fn finish(mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Windows has no Unix sockets here: the session is served without a
/// control socket, and `flr session` says so when it tries to reach it
/// (the daemon's API still commits and discards its own sessions).
#[cfg(not(unix))]
pub fn serve_control(
    cow: Arc<CowFs>,
    discard: impl Fn() -> Result<()> + Send + 'static,
) -> Result<ControlServer> {
    drop(discard);
    tracing::warn!(
        "{}: `flr session commit|discard` cannot reach this session",
        crate::host::unsupported("a writable session's control socket (a Unix socket)")
    );
    Ok(ControlServer {
        path: control_path(cow.dir()),
        stop: Arc::new(AtomicBool::new(false)),
        thread: None,
    })
}

/// Serves the control socket of a mounted session on a thread.
/// `discard` is called for a discard request and returns once the session
/// is gone (or with why it could not be).
#[cfg(unix)]
pub fn serve_control(
    cow: Arc<CowFs>,
    discard: impl Fn() -> Result<()> + Send + 'static,
) -> Result<ControlServer> {
    let path = control_path(cow.dir());
    // The session lock is ours: a socket file left here is stale.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut server = ControlServer {
        path,
        stop: stop.clone(),
        thread: None,
    };
    let thread = std::thread::Builder::new()
        .name("flr-session-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let mut line = String::new();
                let read = BufReader::new(&conn).read_line(&mut line);
                let reply = match (read, line.trim().split_once(' ')) {
                    (Err(e), _) => format!("error {e}"),
                    (Ok(_), Some(("commit", job))) => match commit(&cow, job) {
                        Ok(c) => format!("ok {} {} {}", c.restore_point, c.added_bytes, c.skipped),
                        Err(e) => format!("error {e:#}"),
                    },
                    (Ok(_), None) if line.trim() == "discard" => match discard() {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("error {e:#}"),
                    },
                    _ => format!("error unknown request {:?}", line.trim()),
                };
                let _ = writeln!(conn, "{reply}");
                if line.trim() == "discard" && reply == "ok" {
                    break;
                }
            }
        })
        .context("cannot start the session control thread")?;
    server.thread = Some(thread);
    Ok(server)
}

/// See the Windows `serve_control`: no session has a control socket.
#[cfg(not(unix))]
pub fn request(state_dir: &Path, id: &str, line: &str) -> Result<Option<String>> {
    let _ = (state_dir, id, line);
    Err(crate::host::unsupported(
        "reaching a writable session's control socket (a Unix socket); commit or discard it through the daemon's API",
    )
    .into())
}

/// Sends one request to the process serving a session. `Ok(None)`: no
/// process serves it.
#[cfg(unix)]
pub fn request(state_dir: &Path, id: &str, line: &str) -> Result<Option<String>> {
    let path = control_path(&session::session_dir(state_dir, id));
    let mut conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e).with_context(|| format!("cannot reach {}", path.display())),
    };
    // A commit reads the whole session: allow it time.
    conn.set_read_timeout(Some(Duration::from_secs(24 * 3600)))?;
    writeln!(conn, "{line}")?;
    let mut reply = String::new();
    BufReader::new(&conn).read_line(&mut reply)?;
    let reply = reply.trim();
    match reply.strip_prefix("ok") {
        Some(rest) => Ok(Some(rest.trim().to_string())),
        None => match reply.strip_prefix("error ") {
            Some(msg) => bail!("{msg}"),
            None => bail!("the session's process ended without answering"),
        },
    }
}

#[cfg(unix)]
fn own_ids() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or((0, 0), |m| (m.uid(), m.gid()))
}

#[cfg(not(unix))]
fn own_ids() -> (u32, u32) {
    crate::host::own_ids()
}
