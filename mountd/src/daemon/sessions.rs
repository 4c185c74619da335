//! Mount sessions. A session names one restore point of one repository;
//! the restore point is mounted once, at
//! `<mount root>/<repository>/<job>/<timestamp>`, and shared by all the
//! sessions that ask for it. The last session to end (DELETE, expiry,
//! idle timeout, shutdown) unmounts it.
//!
//! A writable session (`"writable": true`) gets a mount of its own at
//! `<mount root>/<repository>/<job>/<timestamp>+<session id>`, over a
//! copy-on-write session of the same id (see `crate::writable`); ending it
//! discards its changes, committing stores them as a new restore point.
//! Writable sessions never end for idleness, and a daemon shutdown keeps
//! them, resumable with `flr mount --resume`.
//!
//! A session may also be published over NFSv3 (`"export": {"nfs":
//! "ADDR:PORT"}`): an export of its own, of the same model its mount
//! serves (the restore point read-only, or the writable session), with
//! the clients of `settings.nfs_allow`. It stops when the session ends.
//!
//! One async lock guards the table. A mount is made outside it (the API
//! answers, and other sessions come and go, meanwhile), marked as being
//! made, so a second session of the same restore point waits for that
//! mount instead of mounting the path again; unmounting happens under the
//! lock, so nothing mounts at a path while it is unmounted. If a client
//! goes away while its mount is being made, the finished [`Mount`] is
//! dropped, which unmounts it: nothing is left behind.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::nfs::{NfsExport, NfsOptions};
use backends::os_mount::Mount;
use serde::Serialize;
use vfs_core::fs::{Caller, FsModel, FsOptions, MountFilter, RepoFs, ROOT_INO};
use vfs_core::repo::RestorePointName;
use vfs_core::session::{CowFs, SessionOptions};

use crate::writable::{self, ControlServer};

use super::api::ApiError;
use super::metrics::ReadStats;
use super::{log, unix_now, Daemon};

/// Which mount a session uses.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MountKey {
    pub repository: String,
    pub restore_point: RestorePointName,
    /// A writable session's id: its mount is its own.
    pub writable: Option<String>,
}

/// A writable session's copy-on-write layer and control socket.
struct Writable {
    cow: Arc<CowFs>,
    control: Option<ControlServer>,
}

struct SharedMount {
    fs: Arc<RepoFs>,
    writable: Option<Writable>,
    mount: Mount,
    path: PathBuf,
    sessions: usize,
    /// Reads counted at the last idle check, and when activity was last
    /// seen (an open file or a new read).
    last_reads: u64,
    active_at: Instant,
}

struct Session {
    id: String,
    key: MountKey,
    created_at: u64,
    expires: Option<(Instant, u64)>,
    nfs: Option<NfsExport>,
}

#[derive(Default)]
struct Table {
    mounts: HashMap<MountKey, SharedMount>,
    sessions: BTreeMap<String, Session>,
    /// Read statistics of mounts that are gone, so metrics never go back.
    retired: ReadStats,
    closed: bool,
}

#[derive(Default)]
pub struct Sessions {
    table: tokio::sync::Mutex<Table>,
    /// Mounts being made, which happens outside the table's lock: another
    /// session of the same restore point waits for that mount.
    mounting: parking_lot::Mutex<HashMap<MountKey, Arc<tokio::sync::Notify>>>,
}

/// A mount being made: its mark goes, and whoever waits for it wakes,
/// when the mount is in the table or has failed, and also when the
/// request is dropped half-way.
struct MountingMark<'a> {
    sessions: &'a Sessions,
    key: MountKey,
    done: Arc<tokio::sync::Notify>,
}

impl Drop for MountingMark<'_> {
    fn drop(&mut self) {
        self.sessions.mounting.lock().remove(&self.key);
        self.done.notify_waiters();
    }
}

/// What the API shows of a session.
#[derive(Serialize)]
pub struct SessionInfo {
    pub id: String,
    pub repository: String,
    pub restore_point: String,
    /// Where the restore point's files are.
    pub path: String,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    /// Whether the files can be changed (a copy-on-write session).
    pub writable: bool,
    /// Readers of the mount this session uses (shared by every session
    /// on the same restore point).
    pub readers: Readers,
    /// Where the session is published besides its mount.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export: Option<ExportInfo>,
}

#[derive(Serialize)]
pub struct ExportInfo {
    /// The NFSv3 export's address (NFS and MOUNT on this one port).
    pub nfs: String,
}

#[derive(Serialize)]
pub struct Readers {
    /// Files open through the mount right now (FUSE open handles).
    pub open_files: u64,
    /// Sessions sharing the mount, this one included.
    pub sessions: u64,
    pub reads: u64,
    pub bytes_served: u64,
}

fn info(s: &Session, m: &SharedMount) -> SessionInfo {
    SessionInfo {
        id: s.id.clone(),
        repository: s.key.repository.clone(),
        restore_point: s.key.restore_point.to_string(),
        path: m.path.display().to_string(),
        created_at: s.created_at,
        expires_at: s.expires.map(|e| e.1),
        writable: m.writable.is_some(),
        readers: Readers {
            open_files: m.fs.open_files() as u64,
            sessions: m.sessions as u64,
            reads: m.fs.counters.reads.load(Relaxed),
            bytes_served: m.fs.counters.bytes_served.load(Relaxed),
        },
        export: s.nfs.as_ref().map(|e| ExportInfo {
            nfs: e.local_addr().to_string(),
        }),
    }
}

/// Whose mount to make: a resolved restore point.
pub struct NewSession {
    pub key: MountKey,
    pub expires_in: Option<Duration>,
    /// Publish the session over NFSv3 at this address too.
    pub nfs: Option<std::net::SocketAddr>,
}

/// What a commit made, for the API.
#[derive(Serialize)]
pub struct Committed {
    pub restore_point: String,
    pub added_bytes: u64,
    pub skipped_special_files: u64,
}

impl Sessions {
    pub async fn list(&self) -> Vec<SessionInfo> {
        let t = self.table.lock().await;
        t.sessions
            .values()
            .filter_map(|s| t.mounts.get(&s.key).map(|m| info(s, m)))
            .collect()
    }

    pub async fn get(&self, id: &str) -> Result<SessionInfo, ApiError> {
        let t = self.table.lock().await;
        t.sessions
            .get(id)
            .and_then(|s| t.mounts.get(&s.key).map(|m| info(s, m)))
            .ok_or_else(|| ApiError::not_found(format!("unknown session {id:?}")))
    }

    /// The copy-on-write layer of writable session `id`.
    async fn cow(&self, id: &str) -> Result<Arc<CowFs>, ApiError> {
        let t = self.table.lock().await;
        let s = t
            .sessions
            .get(id)
            .ok_or_else(|| ApiError::not_found(format!("unknown session {id:?}")))?;
        t.mounts
            .get(&s.key)
            .and_then(|m| m.writable.as_ref())
            .map(|w| w.cow.clone())
            .ok_or_else(|| {
                ApiError::conflict(format!("session {id} is read-only: nothing to commit"))
            })
    }

    /// Read statistics over live and retired mounts, the number of
    /// sessions, mounts and open files.
    pub async fn stats(&self) -> (ReadStats, usize, usize, u64) {
        let t = self.table.lock().await;
        let mut total = t.retired.clone();
        let mut open = 0;
        for m in t.mounts.values() {
            total.add(&m.fs);
            open += m.fs.open_files() as u64;
        }
        (total, t.sessions.len(), t.mounts.len(), open)
    }
}

/// Creates a session, mounting its restore point unless another session
/// already has it mounted.
pub async fn create(daemon: &Arc<Daemon>, new: NewSession) -> Result<SessionInfo, ApiError> {
    let mut key = new.key;
    let id = if key.writable.is_some() {
        // Unique across restarts: a kept session directory may hold an
        // older daemon's ids.
        let id = format!("w{}-{}", unix_now(), daemon.new_id("s"));
        key.writable = Some(id.clone());
        id
    } else {
        daemon.new_id("s")
    };
    let new = NewSession {
        key,
        expires_in: new.expires_in,
        nfs: new.nfs,
    };
    let mut t = mounted(daemon, &new.key).await?;
    // The default expiry would discard a writable session's changes
    // unasked: only an explicit one applies to them.
    let expires_in = new.expires_in.or_else(|| {
        let secs = daemon.config.settings.session_expiry_secs;
        (secs > 0 && new.key.writable.is_none()).then(|| Duration::from_secs(secs))
    });
    let nfs = match new.nfs {
        None => None,
        Some(addr) => match export(daemon, &t.mounts[&new.key], addr).await {
            Ok(e) => Some(e),
            Err(e) => {
                // A mount made for this session alone goes with it.
                if t.mounts.get(&new.key).is_some_and(|m| m.sessions == 0) {
                    let m = t.mounts.remove(&new.key).expect("present");
                    t.retired.add(&m.fs);
                    unmount(daemon.mount_root.clone(), m, false).await;
                }
                return Err(e);
            }
        },
    };
    let session = Session {
        id: id.clone(),
        key: new.key.clone(),
        created_at: unix_now(),
        expires: expires_in.map(|d| (Instant::now() + d, unix_now() + d.as_secs())),
        nfs,
    };
    let m = t.mounts.get_mut(&new.key).expect("mounted above");
    m.sessions += 1;
    m.active_at = Instant::now();
    let out = info(&session, m);
    t.sessions.insert(id, session);
    Ok(out)
}

/// The table, locked, with `key` mounted: mounted now unless a session
/// already has it, or waiting for the mount another request is making.
/// The mount is made without the table's lock, so other sessions come and
/// go (and the API answers) meanwhile.
async fn mounted<'a>(
    daemon: &'a Arc<Daemon>,
    key: &MountKey,
) -> Result<tokio::sync::MutexGuard<'a, Table>, ApiError> {
    let sessions = &daemon.sessions;
    loop {
        let t = sessions.table.lock().await;
        if t.closed {
            return Err(ApiError::unavailable("the daemon is shutting down"));
        }
        if t.mounts.contains_key(key) {
            return Ok(t);
        }
        let made_elsewhere = sessions.mounting.lock().get(key).cloned();
        if let Some(done) = made_elsewhere {
            let woken = done.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // A failed mount drops its mark without the table's lock: if
            // the mark went before the wait was registered, the wake-up
            // has gone too, so look again instead of waiting.
            let still = sessions
                .mounting
                .lock()
                .get(key)
                .is_some_and(|d| Arc::ptr_eq(d, &done));
            drop(t);
            if still {
                woken.await;
            }
            continue;
        }
        let done = Arc::new(tokio::sync::Notify::new());
        sessions.mounting.lock().insert(key.clone(), done.clone());
        let mark = MountingMark {
            sessions,
            key: key.clone(),
            done,
        };
        drop(t);
        let (d, k) = (daemon.clone(), key.clone());
        // A failure drops the mark: a waiting request then tries itself.
        let made = tokio::task::spawn_blocking(move || mount(&d, &k))
            .await
            .map_err(|e| ApiError::internal(format!("mount task failed: {e}")))??;
        let mut t = sessions.table.lock().await;
        if t.closed {
            drop(mark);
            unmount(daemon.mount_root.clone(), made, false).await;
            return Err(ApiError::unavailable("the daemon is shutting down"));
        }
        log(format!(
            "mounted {}:{} at {}",
            key.repository,
            key.restore_point,
            made.path.display()
        ));
        t.mounts.insert(key.clone(), made);
        drop(mark);
        return Ok(t);
    }
}

/// Starts an NFS export of a mount's model: the writable session, or the
/// read-only restore point.
async fn export(
    daemon: &Daemon,
    m: &SharedMount,
    addr: std::net::SocketAddr,
) -> Result<NfsExport, ApiError> {
    let model: Arc<dyn FsModel> = match &m.writable {
        Some(w) => w.cow.clone(),
        None => m.fs.clone(),
    };
    // Nodes created over NFS belong to the owner of the export's root.
    let owner = model.getattr(ROOT_INO).map_or_else(
        |_| {
            let (uid, gid) = own_ids();
            Caller { uid, gid }
        },
        |a| Caller {
            uid: a.uid,
            gid: a.gid,
        },
    );
    let opts = NfsOptions {
        allow: daemon.config.nfs_allow(),
        owner,
    };
    let e = backends::nfs::export(model, addr, opts)
        .await
        // The address is taken, or not this host's: a conflict with the
        // host's state, not a malformed request.
        .map_err(|e| ApiError::conflict(format!("cannot serve NFS at {addr}: {e}")))?;
    log(format!(
        "NFS export of {} at {}",
        m.path.display(),
        e.local_addr()
    ));
    Ok(e)
}

/// Stores writable session `id` as a new restore point of `job`.
pub async fn commit(daemon: &Daemon, id: &str, job: String) -> Result<Committed, ApiError> {
    vfs_core::manifest::validate_job_name(&job).map_err(ApiError::from_core)?;
    let cow = daemon.sessions.cow(id).await?;
    let c = tokio::task::spawn_blocking(move || writable::commit(&cow, &job))
        .await
        .map_err(|e| ApiError::internal(format!("commit task failed: {e}")))?
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    log(format!("session {id} committed as {}", c.restore_point));
    Ok(Committed {
        restore_point: c.restore_point,
        added_bytes: c.added_bytes,
        skipped_special_files: c.skipped,
    })
}

/// The directory writable sessions keep their changes in.
pub fn state_dir(daemon: &Daemon) -> PathBuf {
    daemon
        .config
        .settings
        .state_dir
        .clone()
        .unwrap_or_else(writable::default_state_dir)
}

/// Mounts one restore point at its path below the mount root, writable
/// when the key names a session. Blocking.
fn mount(daemon: &Arc<Daemon>, key: &MountKey) -> Result<SharedMount, ApiError> {
    let handle = daemon.repo(&key.repository)?;
    let repo = handle
        .open_for(Some(&key.restore_point))
        .map_err(ApiError::from_core)?;
    let leaf = match &key.writable {
        Some(id) => format!("{}+{id}", key.restore_point.name),
        None => key.restore_point.name.clone(),
    };
    let path = daemon
        .mount_root
        .join(&key.repository)
        .join(&key.restore_point.job)
        .join(leaf);
    if super::is_dead_mount(&path) {
        let _ = backends::os_mount::clear_stale_mount(&path);
    }
    // Mounts are made outside the table's lock: another one's cleanup
    // may remove an empty parent between the steps of create_dir_all.
    let mut tries = 0;
    while let Err(e) = std::fs::create_dir_all(&path) {
        tries += 1;
        if e.kind() != std::io::ErrorKind::NotFound || tries == 3 {
            return Err(ApiError::internal(format!(
                "cannot create mount point {}: {e}",
                path.display()
            )));
        }
    }
    if let Some(id) = &key.writable {
        return mount_writable(daemon, key, id, repo, handle, path);
    }
    let (uid, gid) = own_ids();
    let readahead_threads = crate::read_stats::readahead_threads(&repo);
    let fs = RepoFs::with_cache(
        repo,
        FsOptions {
            cache_bytes: daemon.config.cache_bytes(),
            disk_cache: daemon.disk_cache.clone(),
            readahead_threads,
            uid,
            gid,
            filter: MountFilter {
                job: None,
                restore_point: Some(key.restore_point.clone()),
                rooted: true,
            },
        },
        daemon.cache.clone(),
    )
    .map_err(|e| {
        remove_mount_dirs(&daemon.mount_root, &path);
        ApiError::from_core(e)
    })?;
    let opts = backends::os_mount::MountOptions {
        threads: daemon.config.settings.fuse_threads,
        allow_other: true,
        auto_unmount: daemon.config.settings.auto_unmount,
        fs_name: format!("flr:{}:{}", key.repository, key.restore_point),
    };
    let mount = backends::os_mount::mount(fs.clone(), &path, &opts).map_err(|e| {
        remove_mount_dirs(&daemon.mount_root, &path);
        ApiError::internal(format!("cannot mount at {}: {e}", path.display()))
    })?;
    // Ready once the mount answers.
    std::fs::metadata(&path).map_err(|e| {
        ApiError::internal(format!("mount at {} does not answer: {e}", path.display()))
    })?;
    Ok(SharedMount {
        fs,
        writable: None,
        mount,
        path,
        sessions: 0,
        last_reads: 0,
        active_at: Instant::now(),
    })
}

fn mount_writable(
    daemon: &Arc<Daemon>,
    key: &MountKey,
    id: &str,
    repo: Arc<vfs_core::repo::Repository>,
    handle: &super::RepoHandle,
    path: PathBuf,
) -> Result<SharedMount, ApiError> {
    let cow = writable::open_session(
        repo,
        &handle.config.path.absolute().to_string(),
        &key.restore_point,
        &state_dir(daemon),
        id,
        false,
        writable::OpenOptions {
            cache_bytes: daemon.config.cache_bytes(),
            cache: Some(daemon.cache.clone()),
            disk_cache: daemon.disk_cache.clone(),
            session: SessionOptions::default(),
        },
    )
    .map_err(|e| {
        remove_mount_dirs(&daemon.mount_root, &path);
        ApiError::internal(format!("{e:#}"))
    })?;
    let opts = backends::os_mount::MountOptions {
        threads: daemon.config.settings.fuse_threads,
        allow_other: true,
        auto_unmount: daemon.config.settings.auto_unmount,
        fs_name: format!("flr:{}:{}", key.repository, key.restore_point),
    };
    let mount = match backends::os_mount::mount(cow.clone(), &path, &opts) {
        Ok(m) => m,
        Err(e) => {
            let _ = cow.close(false);
            remove_mount_dirs(&daemon.mount_root, &path);
            return Err(ApiError::internal(format!(
                "cannot mount at {}: {e}",
                path.display()
            )));
        }
    };
    // `flr session discard` reaches the session through its control
    // socket; it ends the session here like DELETE does.
    let (d, session, rt) = (
        daemon.clone(),
        id.to_string(),
        tokio::runtime::Handle::current(),
    );
    let control = writable::serve_control(cow.clone(), move || {
        rt.block_on(end(&d, &session))
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("{}", e.message))
    })
    .map_err(|e| log(format!("session {id}: {e:#}")))
    .ok();
    Ok(SharedMount {
        fs: cow.base().clone(),
        writable: Some(Writable { cow, control }),
        mount,
        path,
        sessions: 0,
        last_reads: 0,
        active_at: Instant::now(),
    })
}

/// Removes the empty directories of a mount path up to the mount root.
fn remove_mount_dirs(root: &Path, path: &Path) {
    let mut dir = path;
    while dir != root && dir.starts_with(root) {
        if std::fs::remove_dir(dir).is_err() {
            break;
        }
        match dir.parent() {
            Some(p) => dir = p,
            None => break,
        }
    }
}

/// Takes a session out of the table and stops its export; returns its
/// mount if it was the last session on it.
async fn detach(t: &mut Table, id: &str) -> Option<Option<SharedMount>> {
    let mut s = t.sessions.remove(id)?;
    if let Some(e) = s.nfs.take() {
        stop_export(e).await;
    }
    let m = t.mounts.get_mut(&s.key)?;
    m.sessions -= 1;
    if m.sessions > 0 {
        return Some(None);
    }
    let m = t.mounts.remove(&s.key)?;
    t.retired.add(&m.fs);
    Some(Some(m))
}

async fn stop_export(e: NfsExport) {
    let addr = e.local_addr();
    e.stop().await;
    log(format!("NFS export at {addr} stopped"));
}

/// Unmounts (detaching if files are still open) and removes the mount's
/// directories; a writable session's changes are kept (`keep`) or
/// discarded. Runs the blocking part on a worker thread; the caller holds
/// the table lock so nothing mounts at the path meanwhile.
async fn unmount(root: PathBuf, m: SharedMount, keep: bool) -> bool {
    let path = m.path.clone();
    let SharedMount {
        mount,
        fs,
        writable,
        ..
    } = m;
    let dirs = path.clone();
    let done = tokio::task::spawn_blocking(move || {
        let r = mount.unmount();
        drop(fs);
        if let Some(w) = writable {
            if let Some(c) = &w.control {
                c.stop();
            }
            let id = w.cow.info().id.clone();
            match w.cow.close(keep) {
                Ok(()) if keep => log(format!(
                    "session {id} kept: `flr mount --resume {id} MOUNTPOINT` mounts it again"
                )),
                Ok(()) => log(format!("session {id}: changes discarded")),
                Err(e) => log(format!("session {id}: cannot close: {e}")),
            }
        }
        remove_mount_dirs(&root, &dirs);
        r
    })
    .await;
    match done {
        Ok(Ok(())) => {
            log(format!("unmounted {}", path.display()));
            true
        }
        Ok(Err(e)) => {
            log(format!("cannot unmount {}: {e}", path.display()));
            false
        }
        Err(e) => {
            log(format!("unmount task for {} failed: {e}", path.display()));
            false
        }
    }
}

/// Ends a session; unmounts its restore point if no other session uses
/// it. Returns whether an unmount happened.
pub async fn end(daemon: &Daemon, id: &str) -> Result<bool, ApiError> {
    let mut t = daemon.sessions.table.lock().await;
    let last = detach(&mut t, id)
        .await
        .ok_or_else(|| ApiError::not_found(format!("unknown session {id:?}")))?;
    log(format!("session {id} ended"));
    Ok(match last {
        Some(m) => unmount(daemon.mount_root.clone(), m, false).await,
        None => false,
    })
}

/// Ends every session and refuses new ones; returns the mounts unmounted.
pub async fn end_all(daemon: &Daemon) -> usize {
    let mut t = daemon.sessions.table.lock().await;
    t.closed = true;
    let exports: Vec<NfsExport> = std::mem::take(&mut t.sessions)
        .into_values()
        .filter_map(|s| s.nfs)
        .collect();
    for e in exports {
        stop_export(e).await;
    }
    let mounts: Vec<SharedMount> = t.mounts.drain().map(|(_, m)| m).collect();
    let mut n = 0;
    for m in mounts {
        t.retired.add(&m.fs);
        if unmount(daemon.mount_root.clone(), m, true).await {
            n += 1;
        }
    }
    n
}

/// Ends sessions past their expiry, and all sessions of mounts idle past
/// the idle timeout, until `stop` turns true.
pub async fn reap(daemon: Arc<Daemon>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let idle_limit = Duration::from_secs(daemon.config.settings.idle_timeout_secs);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(super::REAPER_TICK) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let mut t = daemon.sessions.table.lock().await;
        let now = Instant::now();
        let mut ending: Vec<(String, &'static str)> = t
            .sessions
            .values()
            .filter(|s| s.expires.is_some_and(|(at, _)| at <= now))
            .map(|s| (s.id.clone(), "expired"))
            .collect();
        if !idle_limit.is_zero() {
            let mut idle_keys = Vec::new();
            for (key, m) in t.mounts.iter_mut().filter(|(k, _)| k.writable.is_none()) {
                let reads = m.fs.counters.reads.load(Relaxed);
                if m.fs.open_files() > 0 || reads != m.last_reads {
                    m.last_reads = reads;
                    m.active_at = now;
                } else if now.duration_since(m.active_at) >= idle_limit {
                    idle_keys.push(key.clone());
                }
            }
            for s in t.sessions.values() {
                if idle_keys.contains(&s.key) && !ending.iter().any(|(id, _)| *id == s.id) {
                    ending.push((s.id.clone(), "idle"));
                }
            }
        }
        for (id, why) in ending {
            log(format!("session {id} ended ({why})"));
            if let Some(Some(m)) = detach(&mut t, &id).await {
                unmount(daemon.mount_root.clone(), m, false).await;
            }
        }
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
