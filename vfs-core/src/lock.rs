//! Locks in the repository, and why pruning is safe beside running writers.
//!
//! # Lock objects
//!
//! A lock is a set of objects `locks/<lock id>.<n>`, where `<lock id>` is
//! `<kind>-<random>` and `<n>` counts refreshes (16 hex digits, so the
//! newest sorts last). Names are flat, so no directory is left behind on
//! a local store. Each holds a [`LockInfo`]: kind (writer, reader or
//! prune), host, pid, start time, time of the last refresh and, for
//! readers, the restore points served. The store only creates objects and
//! never replaces one, so a refresh writes refresh `n + 1` and then
//! deletes `n`; the lock exists as long as any of its objects does, and
//! its id never changes.
//!
//! A holder refreshes its lock every [`REFRESH_EVERY`]. A lock is stale
//! when its last refresh is older than [`STALE_AFTER`], or at once when it
//! was taken on this host by a process that no longer runs. Stale locks
//! are ignored, and removed by `flr prune` and `flr unlock`.
//!
//! - **Writers** (every ingest: backups, devices, ingest mounts, writable
//!   session commits) take a writer lock in [`crate::ingest::Mover::new`],
//!   BEFORE they read the index they deduplicate against. Before a
//!   manifest is written, [`LockGuard::check`] makes sure the lock still
//!   exists and is far from stale; otherwise the commit fails and writes
//!   nothing.
//! - **Readers** (mounts, restores) take a reader lock naming the restore
//!   points they serve; `flr forget` keeps those restore points ("mounted").
//! - **Prune** takes a prune lock; one prune at a time. Writers go on
//!   while it runs.
//!
//! # Delayed deletion
//!
//! Prune never deletes a pack that a writer may still reuse. It marks the
//! chunks reachable from every manifest, and for the packs holding none:
//!
//! 1. writes `pending/<id>.packs` (the packs and the time);
//! 2. deletes those packs' index files, so that writers starting later do
//!    not see them;
//! 3. lists the locks and writes the live writer locks into
//!    `pending/<id>.writers`.
//!
//! A writer, for its part:
//!
//! a. creates its lock;
//! b. lists `pending/` and reads every pending pack list;
//! c. reads the index files, and never deduplicates against a pack that
//!    (b) found pending.
//!
//! A later prune deletes the packs of `pending/<id>.packs` only when every lock
//! named in its `writers` object is gone (released or stale), and only
//! after listing the manifests once more: a pending pack holding a chunk
//! that a manifest names, and that no pack outside the pending lists
//! holds, is rescued (its index file is written again from the pack's own
//! table, as `flr repair index` does) instead of deleted.
//!
//! Why no writer can lose a chunk. Take a writer W and a pending list P.
//! - If W's lock was created before step 3 listed the locks, W is named in
//!   P's `writers` and nothing of P is deleted while W runs; whatever W
//!   commits is a manifest that the deciding prune lists (W's lock is
//!   removed only after its manifest is written), so W's chunks are
//!   rescued.
//! - Otherwise W's lock was created after step 3, so (b) and (c) come
//!   after steps 1 and 2: W sees P in (b) and never reuses its packs, and
//!   their index files are gone in (c) anyway.
//!
//! A writer stalled for longer than [`STALE_AFTER`] may be treated as gone;
//! that is why it checks its lock before it commits, with a margin
//! ([`CHECK_MARGIN`]) so that no prune can judge the lock stale between
//! the check and the manifest write. Hosts' clocks must agree to within
//! minutes, as with restic.
//!
//! A prune killed between steps 1 and 3 leaves a `packs` object without
//! `writers`; the next prune performs steps 2 and 3 for it before anything
//! else, and writers that started in between have seen it in (b). When no
//! writer lock exists, neither when marking nor after step 2, the packs
//! are deleted at once: a writer starting after that listing cannot see
//! them.
//!
//! A writer that deduplicated against a pack that became pending meanwhile
//! writes that pack's index file again before its manifest
//! ([`crate::ingest::commit`]), so the repository it leaves verifies clean
//! at once, without waiting for the next prune.
//!
//! Readers are not waited for: a mount whose in-memory index points into
//! a repacked pack re-reads the index when the pack is gone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format;
use crate::ids::PackId;
use crate::repo::{MetaEncoder, Repository};
use crate::store::ObjectStore;

pub const LOCKS_PREFIX: &str = "locks/";
pub const PENDING_PREFIX: &str = "pending/";

/// How often a holder refreshes its lock.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);
/// A lock not refreshed for this long is stale: six missed refreshes.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
/// A writer commits only if its last refresh is younger than
/// `STALE_AFTER - CHECK_MARGIN`, so it cannot turn stale while it writes
/// its manifest.
pub const CHECK_MARGIN: Duration = Duration::from_secs(10 * 60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    Writer,
    Reader,
    Prune,
}

impl LockKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LockKind::Writer => "writer",
            LockKind::Reader => "reader",
            LockKind::Prune => "prune",
        }
    }
}

/// What a lock object says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub kind: LockKind,
    pub host: String,
    pub pid: u32,
    /// Seconds since the Unix epoch.
    pub started: i64,
    pub refreshed: i64,
    /// For readers: `job/name` of each restore point served.
    pub restore_points: Vec<String>,
}

/// A lock found in the repository.
#[derive(Clone, Debug, Serialize)]
pub struct FoundLock {
    pub id: String,
    /// `None` when no object of the lock could be decoded.
    pub info: Option<LockInfo>,
    pub stale: bool,
    /// Its objects, oldest first.
    #[serde(skip)]
    pub keys: Vec<String>,
}

impl FoundLock {
    pub fn describe(&self) -> String {
        match &self.info {
            Some(i) => format!(
                "{} lock {} of pid {} on {}, started {}, refreshed {}s ago",
                i.kind.as_str(),
                self.id,
                i.pid,
                i.host,
                crate::manifest::timestamp_name(i.started),
                (now() - i.refreshed).max(0)
            ),
            None => format!("lock {} (unreadable)", self.id),
        }
    }

    pub fn kind(&self) -> Option<LockKind> {
        self.info.as_ref().map(|i| i.kind)
    }
}

pub fn now() -> i64 {
    crate::backup::now_secs()
}

/// This host's name, as locks record it.
pub fn hostname() -> String {
    #[cfg(target_os = "linux")]
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        return h.trim().to_string();
    }
    std::env::var("COMPUTERNAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

fn is_stale(info: &LockInfo, host: &str, at: i64) -> bool {
    if info.host == host && !crate::local_store::process_alive(info.pid) {
        return true;
    }
    at - info.refreshed > STALE_AFTER.as_secs() as i64
}

/// Every lock in the repository, with its newest readable object.
pub fn list_locks(repo: &Repository) -> Result<Vec<FoundLock>> {
    let mut by_id: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for key in repo.store().list(LOCKS_PREFIX)? {
        let Some((id, _)) = key
            .strip_prefix(LOCKS_PREFIX)
            .and_then(|rest| rest.rsplit_once('.'))
        else {
            continue;
        };
        by_id.entry(id.to_string()).or_default().push(key);
    }
    let host = hostname();
    let at = now();
    let mut out = Vec::new();
    for (id, keys) in by_id {
        let mut info = None;
        let mut gone = true;
        for key in keys.iter().rev() {
            match repo.store().get(key) {
                Ok(raw) => {
                    gone = false;
                    if let Ok(i) = repo.decode_meta::<LockInfo>(key, format::LOCK_MAGIC, &raw) {
                        info = Some(i);
                        break;
                    }
                }
                // Refreshed or released since the listing.
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if gone && info.is_none() {
            continue;
        }
        // An undecodable lock cannot be judged: it counts as live until
        // `flr unlock` removes it.
        let stale = info.as_ref().is_some_and(|i| is_stale(i, &host, at));
        out.push(FoundLock {
            id,
            info,
            stale,
            keys,
        });
    }
    Ok(out)
}

/// Removes every object of a lock.
pub fn remove_lock(store: &dyn ObjectStore, lock: &FoundLock) -> Result<()> {
    for key in &lock.keys {
        store.delete(key)?;
    }
    Ok(())
}

fn lock_key(id: &str, n: u64) -> String {
    format!("{LOCKS_PREFIX}{id}.{n:016x}")
}

struct Held {
    store: Arc<dyn ObjectStore>,
    encoder: MetaEncoder,
    id: String,
    info: Mutex<LockInfo>,
    /// Refresh number of the newest object written.
    n: AtomicU64,
    refreshed: AtomicI64,
    /// Set when the lock was found removed (by a prune that judged it
    /// stale): the holder must not commit.
    lost: AtomicBool,
    stop: Mutex<bool>,
    wake: parking_lot::Condvar,
    refreshing: Mutex<()>,
}

impl Held {
    fn refresh(&self) -> Result<()> {
        // The refresher thread and `set_restore_points` both refresh.
        let _one = self.refreshing.lock();
        let old = self.n.load(Ordering::SeqCst);
        if self.store.size(&lock_key(&self.id, old))?.is_none() {
            self.lost.store(true, Ordering::SeqCst);
            return Err(lost(&self.id));
        }
        let at = now();
        let encoded = {
            let mut info = self.info.lock();
            info.refreshed = at;
            self.encoder.encode(format::LOCK_MAGIC, &*info)
        };
        self.store.put(&lock_key(&self.id, old + 1), &encoded)?;
        self.n.store(old + 1, Ordering::SeqCst);
        self.refreshed.store(at, Ordering::SeqCst);
        self.store.delete(&lock_key(&self.id, old))
    }
}

fn lost(id: &str) -> Error {
    Error::Locked(format!(
        "lock {id} was removed from the repository (judged stale by a prune or removed by `flr unlock`); nothing was committed"
    ))
}

/// A lock this process holds: refreshed on a thread of its own, removed
/// on drop.
pub struct LockGuard {
    held: Arc<Held>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LockGuard {
    /// Creates a lock. A prune lock is refused while another live prune
    /// lock exists (two prunes started at the same moment may both be
    /// refused; neither has changed anything).
    pub fn acquire(
        repo: &Repository,
        kind: LockKind,
        restore_points: Vec<String>,
    ) -> Result<LockGuard> {
        let at = now();
        let info = LockInfo {
            kind,
            host: hostname(),
            pid: std::process::id(),
            started: at,
            refreshed: at,
            restore_points,
        };
        let id = format!("{}-{}", kind.as_str(), crate::crypto::random_hex(8));
        let encoder = repo.meta_encoder();
        repo.store().put(
            &lock_key(&id, 0),
            &encoder.encode(format::LOCK_MAGIC, &info),
        )?;
        let held = Arc::new(Held {
            store: repo.store().clone(),
            encoder,
            id,
            info: Mutex::new(info),
            n: AtomicU64::new(0),
            refreshed: AtomicI64::new(at),
            lost: AtomicBool::new(false),
            stop: Mutex::new(false),
            wake: parking_lot::Condvar::new(),
            refreshing: Mutex::new(()),
        });
        let refresher = held.clone();
        let thread = std::thread::Builder::new()
            .name("flr-lock-refresh".into())
            .spawn(move || {
                let mut stop = refresher.stop.lock();
                loop {
                    // Checked before each wait: a drop may come before
                    // this thread first waits.
                    if *stop {
                        return;
                    }
                    let timed_out = refresher
                        .wake
                        .wait_for(&mut stop, REFRESH_EVERY)
                        .timed_out();
                    if *stop {
                        return;
                    }
                    if timed_out {
                        if let Err(e) = refresher.refresh() {
                            tracing::error!("refreshing lock {}: {e}", refresher.id);
                            if refresher.lost.load(Ordering::SeqCst) {
                                return;
                            }
                        }
                    }
                }
            })
            .map_err(|e| Error::Storage(format!("cannot start the lock refresher: {e}")))?;
        let guard = LockGuard {
            held,
            thread: Some(thread),
        };
        if kind == LockKind::Prune {
            let others: Vec<FoundLock> = list_locks(repo)?
                .into_iter()
                .filter(|l| l.kind() == Some(LockKind::Prune) && !l.stale && l.id != guard.held.id)
                .collect();
            if let Some(other) = others.first() {
                return Err(Error::Locked(format!(
                    "another prune is running: {}",
                    other.describe()
                )));
            }
        }
        tracing::debug!("took {} lock {}", kind.as_str(), guard.held.id);
        Ok(guard)
    }

    pub fn id(&self) -> &str {
        &self.held.id
    }

    /// Replaces the restore points a reader lock names (written at once).
    pub fn set_restore_points(&self, restore_points: Vec<String>) -> Result<()> {
        {
            let mut info = self.held.info.lock();
            if info.restore_points == restore_points {
                return Ok(());
            }
            info.restore_points = restore_points;
        }
        self.held.refresh()
    }

    /// Fails unless the lock still exists and was refreshed recently
    /// enough that no prune can judge it stale before the caller's next
    /// write lands.
    pub fn check(&self) -> Result<()> {
        let held = &self.held;
        if held.lost.load(Ordering::SeqCst)
            || held
                .store
                .size(&lock_key(&held.id, held.n.load(Ordering::SeqCst)))?
                .is_none()
        {
            held.lost.store(true, Ordering::SeqCst);
            return Err(lost(&held.id));
        }
        let age = now() - held.refreshed.load(Ordering::SeqCst);
        if age >= (STALE_AFTER - CHECK_MARGIN).as_secs() as i64 {
            return Err(Error::Locked(format!(
                "lock {} was last refreshed {age}s ago, too close to being judged stale; nothing was committed",
                held.id
            )));
        }
        Ok(())
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        *self.held.stop.lock() = true;
        self.held.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let n = self.held.n.load(Ordering::SeqCst);
        for k in [n, n + 1] {
            if let Err(e) = self.held.store.delete(&lock_key(&self.held.id, k)) {
                tracing::warn!("removing lock {}: {e}", self.held.id);
            }
        }
    }
}

/// A reader lock if one can be taken. Reading needs no lock, so a
/// repository this process cannot write (a read-only copy) is still
/// served; `flr forget` then cannot know, and a warning says so.
pub fn acquire_reader(repo: &Repository, restore_points: Vec<String>) -> Option<LockGuard> {
    match LockGuard::acquire(repo, LockKind::Reader, restore_points) {
        Ok(lock) => Some(lock),
        Err(e) => {
            tracing::warn!(
                "cannot take a reader lock in {} ({e}); `flr forget` will not know these restore points are in use",
                repo.store().location()
            );
            None
        }
    }
}

/// A prune's list of packs to delete later (`pending/<id>.packs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPacks {
    pub time: i64,
    /// Each pack and its length.
    pub packs: Vec<(PackId, u64)>,
}

/// The writer locks a pending list waits for (`pending/<id>.writers`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingWriters {
    pub writers: Vec<String>,
}

pub fn pending_packs_key(id: &str) -> String {
    format!("{PENDING_PREFIX}{id}.packs")
}

pub fn pending_writers_key(id: &str) -> String {
    format!("{PENDING_PREFIX}{id}.writers")
}

/// A pending list found in the repository.
pub struct FoundPending {
    pub id: String,
    pub packs: PendingPacks,
    /// `None` if the prune that wrote it stopped before step 3.
    pub writers: Option<PendingWriters>,
}

/// Every pending list. An unreadable one fails: its packs would otherwise
/// be reused by writers and then deleted.
pub fn list_pending(repo: &Repository) -> Result<Vec<FoundPending>> {
    let keys: BTreeSet<String> = repo.store().list(PENDING_PREFIX)?.into_iter().collect();
    let mut out = Vec::new();
    for key in &keys {
        let Some(id) = key
            .strip_prefix(PENDING_PREFIX)
            .and_then(|k| k.strip_suffix(".packs"))
        else {
            continue;
        };
        let raw = match repo.store().get(key) {
            Ok(raw) => raw,
            // Finished by a prune since the listing.
            Err(Error::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        let packs: PendingPacks = repo.decode_meta(key, format::PENDING_MAGIC, &raw)?;
        let wkey = pending_writers_key(id);
        let writers = if keys.contains(&wkey) {
            match repo.store().get(&wkey) {
                Ok(raw) => Some(repo.decode_meta(&wkey, format::PENDING_WRITERS_MAGIC, &raw)?),
                Err(Error::NotFound(_)) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        out.push(FoundPending {
            id: id.to_string(),
            packs,
            writers,
        });
    }
    Ok(out)
}

/// The packs of every pending list.
pub fn pending_pack_set(repo: &Repository) -> Result<std::collections::HashSet<PackId>> {
    Ok(list_pending(repo)?
        .into_iter()
        .flat_map(|p| p.packs.packs.into_iter().map(|(id, _)| id))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn repo() -> Repository {
        let store = Arc::new(MemoryStore::new());
        Repository::init(store.as_ref(), None).unwrap();
        Repository::open(store, || Ok(Vec::new())).unwrap()
    }

    #[test]
    fn a_lock_is_listed_while_held_and_gone_after_drop() {
        let repo = repo();
        let guard = LockGuard::acquire(&repo, LockKind::Reader, vec!["a/1".into()]).unwrap();
        let locks = list_locks(&repo).unwrap();
        assert_eq!(locks.len(), 1);
        let info = locks[0].info.as_ref().unwrap();
        assert_eq!(info.kind, LockKind::Reader);
        assert_eq!(info.restore_points, vec!["a/1".to_string()]);
        assert!(!locks[0].stale);
        guard.set_restore_points(vec!["a/2".into()]).unwrap();
        let locks = list_locks(&repo).unwrap();
        assert_eq!(locks.len(), 1, "a refresh keeps one lock id");
        assert_eq!(locks[0].keys.len(), 1);
        assert_eq!(
            locks[0].info.as_ref().unwrap().restore_points,
            vec!["a/2".to_string()]
        );
        guard.check().unwrap();
        drop(guard);
        assert!(list_locks(&repo).unwrap().is_empty());
        assert!(repo.store().list(LOCKS_PREFIX).unwrap().is_empty());
    }

    #[test]
    fn a_removed_lock_fails_its_check() {
        let repo = repo();
        let guard = LockGuard::acquire(&repo, LockKind::Writer, Vec::new()).unwrap();
        for l in list_locks(&repo).unwrap() {
            remove_lock(repo.store().as_ref(), &l).unwrap();
        }
        let err = guard.check().unwrap_err().to_string();
        assert!(err.contains("was removed"), "{err}");
    }

    #[test]
    fn a_second_prune_is_refused_naming_the_first() {
        let repo = repo();
        let first = LockGuard::acquire(&repo, LockKind::Prune, Vec::new()).unwrap();
        let err = LockGuard::acquire(&repo, LockKind::Prune, Vec::new())
            .err()
            .expect("a second prune is refused")
            .to_string();
        assert!(err.contains(first.id()), "{err}");
        // The refused one removed its own lock again.
        assert_eq!(list_locks(&repo).unwrap().len(), 1);
        drop(first);
        LockGuard::acquire(&repo, LockKind::Prune, Vec::new()).unwrap();
    }

    #[test]
    fn locks_of_dead_processes_on_this_host_and_old_locks_are_stale() {
        let host = hostname();
        let mut info = LockInfo {
            kind: LockKind::Writer,
            host: host.clone(),
            pid: std::process::id(),
            started: 0,
            refreshed: 1000,
            restore_points: Vec::new(),
        };
        assert!(!is_stale(&info, &host, 1000 + 60));
        assert!(is_stale(
            &info,
            &host,
            1000 + STALE_AFTER.as_secs() as i64 + 1
        ));
        info.host = "elsewhere".into();
        info.pid = u32::MAX;
        assert!(!is_stale(&info, &host, 1000 + 60));
        info.host = host.clone();
        assert!(is_stale(&info, &host, 1000 + 60), "dead pid on this host");
    }
}
