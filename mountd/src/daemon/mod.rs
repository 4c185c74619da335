//! `flr daemon`: the mount service other tools drive over a Unix socket.
//!
//! [`run`] takes a bound listener, a [`Config`] and a shutdown future. It
//! clears mounts a killed daemon left under the mount root, serves the API
//! until the shutdown future resolves, then cancels restore jobs and
//! unmounts every session before returning. [`bind_socket`] makes the
//! socket (mode 0600) and refuses to start beside a live daemon.

pub mod api;
pub mod config;
pub mod copy_jobs;
pub mod device_jobs;
pub mod export_jobs;
pub mod glob;
pub mod job_table;
pub mod jobs;
pub mod metrics;
pub mod receive;
pub mod sessions;

use std::collections::BTreeMap;
use std::future::Future;
#[cfg(unix)]
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use parking_lot::Mutex;
use vfs_core::repo::{Repository, RestorePointName};

pub use config::Config;

/// How deep sessions are mounted below the mount root
/// (`<repository>/<job>/<timestamp>`), and so how deep stale mounts are
/// looked for at start.
pub const MOUNT_DEPTH: usize = 3;

/// How long shutdown waits for open API connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long shutdown waits for cancelled restore jobs to stop.
const JOB_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How often expiry and idle timeouts are checked.
const REAPER_TICK: Duration = Duration::from_millis(500);

/// The daemon's log: one event per line through `tracing` (human text, or
/// JSON with `flr daemon --log-json`).
pub fn log(msg: impl std::fmt::Display) {
    tracing::info!(target: "flr::daemon", "{msg}");
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A configured repository, opened on first use and kept open.
pub struct RepoHandle {
    pub name: String,
    pub config: config::RepositoryConfig,
    /// The open repository and the restore points its in-memory index is
    /// known to cover.
    opened: Mutex<Option<(Arc<Repository>, Vec<RestorePointName>)>>,
}

impl RepoHandle {
    /// The requests its store has sent, once open, if it is an object
    /// store. Never waits: while the repository is being opened it has
    /// nothing to say yet.
    pub fn requests(&self) -> Option<vfs_core::store::RequestCounts> {
        let opened = self.opened.try_lock()?;
        opened.as_ref()?.0.store().requests()
    }

    /// The repository, with an index that covers `rp` if it exists
    /// (re-read when `rp` was committed after the last read). Blocking.
    pub fn open_for(&self, rp: Option<&RestorePointName>) -> vfs_core::Result<Arc<Repository>> {
        let mut opened = self.opened.lock();
        if let Some((repo, known)) = opened.as_mut() {
            if rp.is_some_and(|rp| !known.contains(rp)) {
                // Listed first: every listed restore point's index files
                // were written before its manifest, so the reload covers it.
                *known = repo.list_restore_points(None)?;
                repo.reload_index()?;
            }
            return Ok(repo.clone());
        }
        let store = self.config.open_store()?;
        let listed = {
            let repo = Repository::open(store, || self.config.password())?;
            let known = repo.list_restore_points(None)?;
            // The index was read before the listing; read it again so
            // it covers every listed restore point.
            repo.reload_index()?;
            (Arc::new(repo), known)
        };
        let repo = listed.0.clone();
        *opened = Some(listed);
        Ok(repo)
    }
}

/// Everything the handlers share.
pub struct Daemon {
    pub config: Config,
    pub repos: BTreeMap<String, RepoHandle>,
    pub mount_root: PathBuf,
    pub sessions: sessions::Sessions,
    pub jobs: jobs::Jobs,
    pub device_jobs: job_table::JobTable<device_jobs::DeviceJob>,
    pub exports: job_table::JobTable<export_jobs::ExportJob>,
    pub receives: receive::Receives,
    pub copy_jobs: copy_jobs::CopyJobs,
    pub started: Instant,
    pub stale_cleared: Mutex<Vec<String>>,
    pub shutting_down: AtomicBool,
    /// The disk cache of stored frames all mounts share
    /// (`settings.disk_cache`).
    pub disk_cache: Option<Arc<vfs_core::disk_cache::DiskCache>>,
    /// The memory cache of decoded frames all mounts share, bounded by
    /// `settings.cache_size` for the whole daemon.
    pub cache: Arc<vfs_core::cache::ChunkCache>,
    next_id: AtomicU64,
}

impl Daemon {
    /// The shared state for `config`; makes the mount root if missing.
    /// [`run`] calls it; tests and the fuzz harness drive [`api::router`]
    /// over one directly.
    pub fn new(config: Config) -> Result<Daemon> {
        let root = &config.settings.mount_root;
        std::fs::create_dir_all(root)
            .with_context(|| format!("cannot create mount root {}", root.display()))?;
        let mount_root = root
            .canonicalize()
            .with_context(|| format!("mount root {}", root.display()))?;
        let repos = config
            .repositories
            .iter()
            .map(|(name, rc)| {
                (
                    name.clone(),
                    RepoHandle {
                        name: name.clone(),
                        config: rc.clone(),
                        opened: Mutex::new(None),
                    },
                )
            })
            .collect();
        let disk_cache = match &config.settings.disk_cache {
            Some(dir) => Some(Arc::new(
                vfs_core::disk_cache::DiskCache::open(dir, config.disk_cache_bytes())
                    .with_context(|| format!("settings.disk_cache {}", dir.display()))?,
            )),
            None => None,
        };
        Ok(Daemon {
            disk_cache,
            cache: Arc::new(vfs_core::cache::ChunkCache::new(config.cache_bytes())),
            jobs: jobs::Jobs::new(config.settings.restore_workers),
            device_jobs: device_jobs::new_table(),
            exports: export_jobs::new_table(),
            receives: Default::default(),
            copy_jobs: Default::default(),
            sessions: sessions::Sessions::default(),
            config,
            repos,
            mount_root,
            started: Instant::now(),
            stale_cleared: Mutex::new(Vec::new()),
            shutting_down: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        })
    }

    /// A new id with a prefix saying what it names (`s-3`, `j-4`).
    pub fn new_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    pub fn repo(&self, name: &str) -> Result<&RepoHandle, api::ApiError> {
        self.repos
            .get(name)
            .ok_or_else(|| api::ApiError::not_found(format!("unknown repository {name:?}")))
    }
}

/// Binds the control socket at `path` with mode 0600. Refuses when a
/// daemon already answers there; removes a socket file nobody answers on
/// (left by a killed daemon).
#[cfg(unix)]
pub fn bind_socket(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create socket directory {}", parent.display()))?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another flr daemon is already listening on {}; stop it first (or give this one another socket)",
                path.display()
            );
        }
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        log(format!(
            "removing stale socket {} (no daemon answers on it)",
            path.display()
        ));
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    // Bound inside a private directory and renamed into place, so the
    // socket is never reachable with looser permissions than 0600.
    let staging = parent.join(format!(".flr-socket.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    let result = (|| -> Result<std::os::unix::net::UnixListener> {
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))?;
        let tmp = staging.join("sock");
        let listener = std::os::unix::net::UnixListener::bind(&tmp)
            .with_context(|| format!("cannot bind {}", path.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move the socket to {}", path.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    let listener = result?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Finds dead FUSE mounts (server gone: ENOTCONN) at or below `root`, down
/// to [`MOUNT_DEPTH`], and detaches them. Live mounts and other
/// filesystems are not entered.
pub fn clear_stale_mounts(root: &Path) -> Vec<PathBuf> {
    let mut cleared = Vec::new();
    let Ok(root_meta) = std::fs::metadata(root) else {
        if is_dead_mount(root) {
            clear_one(root, &mut cleared);
        }
        return cleared;
    };
    if is_dead_mount(root) {
        clear_one(root, &mut cleared);
    }
    walk(
        root,
        crate::host::device(&root_meta),
        MOUNT_DEPTH,
        &mut cleared,
    );
    cleared
}

/// Whether `path` is a FUSE mount whose server is gone. Besides
/// `backends::os_mount::is_stale_mount` (stat fails with ENOTCONN) this opens
/// the directory, which always reaches the server: for a second or so
/// after the server dies the kernel still answers stat from its cache.
pub fn is_dead_mount(path: &Path) -> bool {
    backends::os_mount::is_stale_mount(path)
        || matches!(std::fs::read_dir(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
}

fn clear_one(path: &Path, cleared: &mut Vec<PathBuf>) {
    match backends::os_mount::clear_stale_mount(path) {
        Ok(()) => {
            log(format!("cleared stale mount {}", path.display()));
            cleared.push(path.to_path_buf());
        }
        Err(e) => log(format!("cannot clear stale mount {}: {e}", path.display())),
    }
}

fn walk(dir: &Path, dev: u64, depth: usize, cleared: &mut Vec<PathBuf>) {
    if depth == 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if is_dead_mount(&path) {
            clear_one(&path, cleared);
            // A mount may have hidden another stale one below it.
            if is_dead_mount(&path) {
                clear_one(&path, cleared);
            }
            continue;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() && crate::host::device(&m) == dev => {
                walk(&path, dev, depth - 1, cleared)
            }
            _ => {}
        }
    }
}

/// What the control API is served on: the Unix socket (with the peer's
/// uid for devices), and on TCP too when `tcp_listen` is set. Windows has
/// no Unix socket here: the listener is the TCP one, bound by the caller
/// at `tcp_listen`, and every request needs the bearer token.
#[cfg(unix)]
pub type ControlListener = tokio::net::UnixListener;
#[cfg(not(unix))]
pub type ControlListener = tokio::net::TcpListener;

/// Serves the control API on `listener` (and on TCP when configured)
/// until `shutdown` resolves, then ends every session and job.
pub async fn run(
    listener: ControlListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let daemon = Arc::new(Daemon::new(config)?);
    let root = daemon.mount_root.clone();
    let cleared = tokio::task::spawn_blocking(move || clear_stale_mounts(&root)).await?;
    if cleared.is_empty() {
        log(format!(
            "no stale mounts under {}",
            daemon.mount_root.display()
        ));
    } else {
        log(format!(
            "cleared {} stale mount(s) left under {} by a previous daemon",
            cleared.len(),
            daemon.mount_root.display()
        ));
    }
    *daemon.stale_cleared.lock() = cleared.iter().map(|p| p.display().to_string()).collect();
    let devices = device_jobs::devices_dir(&daemon);
    tokio::task::spawn_blocking(move || device_jobs::clear_stale(&devices)).await?;
    let (roots, targets) = (
        export_jobs::staging_roots(&daemon),
        daemon.config.settings.restore_targets.clone(),
    );
    let removed = tokio::task::spawn_blocking(move || {
        let staged: usize = roots
            .iter()
            .map(|r| crate::export::clear_leftovers(r, None))
            .sum();
        staged + receive::clear_stale(&targets)
    })
    .await?;
    log(format!(
        "{removed} leftover(s) of unfinished exports removed"
    ));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut servers = Vec::new();
    let app = api::router(daemon.clone());
    #[cfg(unix)]
    {
        let unix = axum::serve(
            listener,
            app.clone()
                .into_make_service_with_connect_info::<api::Peer>(),
        )
        .with_graceful_shutdown(stopped(stop_rx.clone()));
        servers.push(tokio::spawn(async move { unix.await }));
    }
    #[cfg(not(unix))]
    {
        let token = match daemon.config.settings.tcp_token.clone() {
            Some(t) if !t.is_empty() => t,
            _ => bail!("the daemon on Windows listens on TCP only: settings.tcp_token must be set"),
        };
        let app = api::with_bearer_token(app.clone(), token);
        let serve = axum::serve(listener, app).with_graceful_shutdown(stopped(stop_rx.clone()));
        servers.push(tokio::spawn(async move { serve.await }));
    }
    // On Windows the listener above is this TCP one already.
    let tcp_listen = if cfg!(unix) {
        daemon.config.settings.tcp_listen
    } else {
        None
    };
    if let Some(addr) = tcp_listen {
        let token = daemon.config.settings.tcp_token.clone().unwrap_or_default();
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        log(format!("listening on tcp {addr} (bearer token required)"));
        let app = api::with_bearer_token(app, token);
        let serve = axum::serve(tcp, app).with_graceful_shutdown(stopped(stop_rx.clone()));
        servers.push(tokio::spawn(async move { serve.await }));
    }
    let reaper = tokio::spawn(sessions::reap(daemon.clone(), stop_rx.clone()));
    let receive_reaper = {
        let (d, mut rx) = (daemon.clone(), stop_rx.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = rx.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(REAPER_TICK * 10) => d.receives.reap(),
                }
            }
        })
    };
    log(format!(
        "ready: mount root {}, {} repositories",
        daemon.mount_root.display(),
        daemon.repos.len()
    ));

    shutdown.await;
    log("shutting down: ending sessions and jobs");
    daemon.shutting_down.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for server in servers {
        match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => log(format!("server error: {e}")),
            Ok(Err(e)) => log(format!("server task failed: {e}")),
            Err(_) => log("some API connections did not close in time; closing them"),
        }
    }
    let _ = reaper.await;
    let _ = receive_reaper.await;
    daemon.receives.discard_all();
    daemon.jobs.table.stop_all();
    daemon.device_jobs.stop_all();
    daemon.exports.stop_all();
    daemon.copy_jobs.table.stop_all();
    if !daemon.jobs.table.wait_idle(JOB_STOP_TIMEOUT).await {
        log("some restore jobs did not stop in time");
    }
    if !daemon.exports.wait_idle(JOB_STOP_TIMEOUT).await {
        log("some export jobs did not stop in time; their leftovers are removed at the next start");
    }
    if !daemon.copy_jobs.table.wait_idle(JOB_STOP_TIMEOUT).await {
        log("a copy job did not stop in time; what it sent is found again by the next copy");
    }
    if !daemon.device_jobs.wait_idle(JOB_STOP_TIMEOUT).await {
        log("some device jobs did not stop in time; their pipes are cleared at the next start");
    }
    let ended = sessions::end_all(&daemon).await;
    log(format!("stopped: {ended} mount(s) unmounted"));
    Ok(())
}
