//! Ingest mounts (`flr mount --ingest`) as the command line reaches them:
//! the process serving one listens on a control socket named after its
//! mount point, through which `flr ingest commit|abort MOUNTPOINT` end it.
//!
//! Control protocol: one request line, one reply line. `commit` unmounts,
//! commits the restore point and replies `ok {"restore_point": ...,
//! "stats": {...}}`; `abort` unmounts, commits nothing and replies `ok`;
//! errors reply `error MESSAGE`.

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

/// What a control request asks of the mount process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    Commit,
    Abort,
}

/// Where ingest mounts keep their control sockets: `FLR_RUN_DIR`, else
/// `/run/flr/ingest` for root, else under `XDG_RUNTIME_DIR` (or `/tmp`).
pub fn run_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLR_RUN_DIR") {
        return PathBuf::from(dir).join("ingest");
    }
    if crate::host::is_root() {
        return PathBuf::from("/run/flr/ingest");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("flr/ingest"),
        None => PathBuf::from("/tmp").join(format!("flr-ingest-{}", own_uid())),
    }
}

/// The control socket of the ingest mounted at `mountpoint`: named by a
/// hash of its canonical path, since a socket path is limited to 108
/// bytes and a mount point is not.
pub fn control_path(mountpoint: &Path) -> Result<PathBuf> {
    let canonical = mountpoint
        .canonicalize()
        .with_context(|| format!("no mount point {}", mountpoint.display()))?;
    let hash = blake3::hash(canonical.as_os_str().as_encoded_bytes());
    let name = hex_prefix(hash.as_bytes(), 16);
    Ok(run_dir().join(format!("{name}.sock")))
}

fn hex_prefix(bytes: &[u8], n: usize) -> String {
    bytes[..n].iter().map(|b| format!("{b:02x}")).collect()
}

/// The control socket's server; [`ControlServer::finish`] ends it.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    /// Stops the server, waits for its thread (so a reply being sent
    /// reaches its client before the process exits) and removes the
    /// socket.
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the thread blocked in accept.
        #[cfg(unix)]
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Windows has no Unix sockets here: an ingest mount there cannot be
/// ended by `flr ingest commit|abort`.
#[cfg(not(unix))]
pub fn serve_control(
    mountpoint: &Path,
    end: impl Fn(Ending) -> Result<String> + Send + 'static,
) -> Result<ControlServer> {
    let _ = (mountpoint, end);
    Err(crate::host::unsupported("ingest mounts (their control socket is a Unix socket)").into())
}

/// Serves the control socket of the ingest mounted at `mountpoint` on a
/// thread. `end` is called for a commit or abort request and returns the
/// reply's payload once the ingest is over (or why it could not end).
#[cfg(unix)]
pub fn serve_control(
    mountpoint: &Path,
    end: impl Fn(Ending) -> Result<String> + Send + 'static,
) -> Result<ControlServer> {
    let path = control_path(mountpoint)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if UnixStream::connect(&path).is_ok() {
        bail!(
            "another flr process serves an ingest at {} ({})",
            mountpoint.display(),
            path.display()
        );
    }
    // Nobody answers: a socket left by a crash.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name("flr-ingest-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if thread_stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let mut line = String::new();
                let read = BufReader::new(&conn).read_line(&mut line);
                let ending = match line.trim() {
                    "commit" => Some(Ending::Commit),
                    "abort" => Some(Ending::Abort),
                    _ => None,
                };
                let (reply, over) = match (read, ending) {
                    (Err(e), _) => (format!("error {e}"), false),
                    (Ok(_), Some(ending)) => match end(ending) {
                        Ok(payload) => (format!("ok {payload}"), true),
                        Err(e) => (format!("error {e:#}"), false),
                    },
                    (Ok(_), None) => (format!("error unknown request {:?}", line.trim()), false),
                };
                let _ = writeln!(conn, "{}", reply.trim_end());
                if over {
                    break;
                }
            }
        })
        .context("cannot start the ingest control thread")?;
    Ok(ControlServer {
        path,
        stop,
        thread: Some(thread),
    })
}

/// See the Windows `serve_control`.
#[cfg(not(unix))]
pub fn request(mountpoint: &Path, ending: Ending) -> Result<String> {
    let _ = (mountpoint, ending);
    Err(crate::host::unsupported("ingest mounts (their control socket is a Unix socket)").into())
}

/// Sends one request to the process serving the ingest at `mountpoint`
/// and returns its reply's payload.
#[cfg(unix)]
pub fn request(mountpoint: &Path, ending: Ending) -> Result<String> {
    let path = control_path(mountpoint)?;
    let mut conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            bail!(
                "no ingest mount answers at {} (nothing to commit or abort there)",
                mountpoint.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("cannot reach {}", path.display())),
    };
    // A commit stores the tails of every file and writes the last pack.
    conn.set_read_timeout(Some(Duration::from_secs(24 * 3600)))?;
    let line = match ending {
        Ending::Commit => "commit",
        Ending::Abort => "abort",
    };
    writeln!(conn, "{line}")?;
    let mut reply = String::new();
    BufReader::new(&conn).read_line(&mut reply)?;
    let reply = reply.trim();
    match reply.strip_prefix("ok") {
        Some(rest) => Ok(rest.trim().to_string()),
        None => match reply.strip_prefix("error ") {
            Some(msg) => bail!("{msg}"),
            None => bail!("the ingest's mount process ended without answering"),
        },
    }
}

fn own_uid() -> u32 {
    #[cfg(unix)]
    {
        std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap_or(0)
    }
    #[cfg(not(unix))]
    {
        crate::host::own_ids().0
    }
}
