//! A local disk cache of stored frames, for mounts of repositories on a
//! remote store: what a range GET fetched is kept on disk, so a second
//! read (in this mount, a later one, or another mount of the daemon) costs
//! no request.
//!
//! What is kept is the frame exactly as stored in its pack (compressed,
//! sealed when the repository is encrypted), under its frame key
//! ([`crate::repo::ChunkLoc::frame_key`]), which names the pack and every
//! field saying how the frame is decoded. A hit goes through the same
//! decode and chunk checks as a fresh fetch; before that, each file's own
//! checksum (BLAKE3 of its payload, in its header) catches a damaged or
//! truncated file, which is dropped, logged and fetched again.
//!
//! Layout under the cache directory:
//! - `lock`: held exclusively (an OS file lock) by the one process that
//!   uses the directory; a second process is refused with an error naming
//!   the directory. One daemon shares one cache among all its mounts.
//! - `frames/<2 hex>/<64 hex>`: one file per frame, see [`HEADER_LEN`].
//! - `tmp/`: files being written; each is renamed into `frames/` whole,
//!   so a crash leaves at worst a temporary file, removed at the next
//!   open. Files are not fsynced: after a power loss a renamed file may
//!   hold garbage, which its checksum rejects.
//!
//! Frames a mount fetches are written by a thread of the cache's own
//! ([`DiskCache::insert_later`]), so a read never waits for the disk
//! cache's file system; at most [`QUEUE_BYTES`] wait to be written, and a
//! frame past that is not kept. Dropping the cache writes what waits.
//!
//! The bound is a hard limit on bytes, counted per file as its size
//! rounded up to whole 4 KiB blocks (what it takes on disk), including
//! files being written. Eviction is least recently used; the order
//! survives a restart through the files' modification times, which a hit
//! refreshes. Opening a directory rebuilds the table from its files.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::ids::{BuildIdHasher, ChunkId, IdSet};

/// Magic and version of a cached frame file.
const MAGIC: [u8; 8] = *b"FLRDCF01";

/// Header of a cached frame file: magic (8), payload length (u32 LE),
/// reserved zero (4), the frame key (32), BLAKE3 of the payload (32). The
/// key guards against a file copied or renamed under another name.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 32 + 32;
const _: () = assert!(HEADER_LEN == 80);

/// Files are charged in whole blocks of this size.
const BLOCK: u64 = 4096;

/// Payload bytes waiting for the writer thread at most. A frame that
/// would pass it is not kept: a slow disk costs later requests, never the
/// reader's time, and the memory stays bounded.
pub const QUEUE_BYTES: u64 = 16 << 20;

/// Figures for stats and metrics.
#[derive(Default, Debug)]
pub struct DiskCacheCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Frames written into the cache.
    pub inserts: AtomicU64,
    /// Payload bytes served from the cache.
    pub bytes_read: AtomicU64,
    /// Payload bytes written into the cache.
    pub bytes_written: AtomicU64,
    pub evictions: AtomicU64,
    /// Files found damaged (bad header, checksum, length) and dropped.
    pub damaged: AtomicU64,
    /// Writes that failed (a full disk, say); the frame is served anyway.
    pub write_errors: AtomicU64,
    /// Frames not kept because [`QUEUE_BYTES`] were already waiting.
    pub skipped: AtomicU64,
}

struct State {
    /// Frame key -> bytes charged for its file.
    lru: lru::LruCache<ChunkId, u64, BuildIdHasher>,
    /// Bytes charged: files in `lru` and files being written.
    used: u64,
    /// Keys being written now, so two writers never race on one name.
    writing: IdSet,
}

/// The cache directory and its table, shared by the cache's users and its
/// writer thread.
pub struct CacheDir {
    dir: PathBuf,
    capacity: u64,
    state: Mutex<State>,
    next_temp: AtomicU64,
    /// Payload bytes queued for the writer thread.
    queued: AtomicU64,
    /// Held for the cache's life: the OS lock marks the directory as ours.
    _lock: File,
    pub counters: DiskCacheCounters,
}

/// Work for the writer thread.
enum Job {
    Keep(ChunkId, Vec<u8>),
    /// Answered once every job queued before it is done.
    Flush(crossbeam_channel::Sender<()>),
}

struct Writer {
    jobs: crossbeam_channel::Sender<Job>,
    thread: std::thread::JoinHandle<()>,
}

/// A disk cache of stored frames; see the module comment.
pub struct DiskCache {
    dir: Arc<CacheDir>,
    /// Taken only by `drop`.
    writer: Option<Writer>,
}

impl std::ops::Deref for DiskCache {
    type Target = CacheDir;
    fn deref(&self) -> &CacheDir {
        &self.dir
    }
}

impl Drop for DiskCache {
    /// Writes the frames still queued, then lets the directory go.
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            drop(w.jobs);
            let _ = w.thread.join();
        }
    }
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn charge(payload_len: usize) -> u64 {
    ((HEADER_LEN + payload_len) as u64).div_ceil(BLOCK) * BLOCK
}

impl DiskCache {
    /// Opens (creating it if needed) the cache in `dir`, holding at most
    /// `capacity` bytes, and takes it for this process. The files already
    /// there are kept, oldest evicted first if they exceed `capacity`.
    pub fn open(dir: &Path, capacity: u64) -> Result<DiskCache> {
        for sub in ["frames", "tmp"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| io_err(&p, e))?;
        }
        let lock_path = dir.join("lock");
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                return Err(Error::InvalidInput(format!(
                    "disk cache {} is in use by another process ({}); give each mount process its own directory",
                    dir.display(),
                    match holder.trim() {
                        "" => "pid unknown".to_string(),
                        pid => format!("pid {pid}"),
                    }
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path, e)),
        }
        lock.set_len(0).map_err(|e| io_err(&lock_path, e))?;
        let _ = write!(lock, "{}", std::process::id());

        // Files left being written by a process that died.
        let tmp = dir.join("tmp");
        for e in std::fs::read_dir(&tmp)
            .map_err(|e| io_err(&tmp, e))?
            .flatten()
        {
            let _ = std::fs::remove_file(e.path());
        }

        let mut found: Vec<(SystemTime, ChunkId, u64)> = Vec::new();
        let frames = dir.join("frames");
        for sub in std::fs::read_dir(&frames)
            .map_err(|e| io_err(&frames, e))?
            .flatten()
        {
            let Ok(entries) = std::fs::read_dir(sub.path()) else {
                tracing::warn!(
                    "disk cache: removing {}: not a cached frame",
                    sub.path().display()
                );
                let _ = std::fs::remove_file(sub.path());
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                let key = e
                    .file_name()
                    .to_str()
                    .and_then(|n| hex::decode(n).ok())
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .map(ChunkId);
                let meta = e.metadata();
                match (key, meta) {
                    (Some(key), Ok(m)) if m.is_file() && m.len() >= HEADER_LEN as u64 => {
                        let mtime = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        found.push((mtime, key, charge(m.len() as usize - HEADER_LEN)));
                    }
                    _ => {
                        tracing::warn!(
                            "disk cache: removing {}: not a cached frame",
                            path.display()
                        );
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        found.sort();
        let mut lru = lru::LruCache::unbounded_with_hasher(BuildIdHasher::default());
        let mut used = 0;
        for (_, key, c) in found {
            lru.put(key, c);
            used += c;
        }
        let cache = Arc::new(CacheDir {
            dir: dir.to_path_buf(),
            capacity,
            state: Mutex::new(State {
                lru,
                used,
                writing: IdSet::default(),
            }),
            next_temp: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            _lock: lock,
            counters: DiskCacheCounters::default(),
        });
        let victims = {
            let mut s = cache.state.lock();
            cache.evict_until(&mut s, 0)
        };
        cache.drop_victims(&victims);
        tracing::info!(
            "disk cache {}: {} frames, {} of {} bytes used",
            dir.display(),
            cache.frames(),
            cache.used_bytes(),
            capacity
        );
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let thread = {
            let cache = cache.clone();
            std::thread::Builder::new()
                .name("flr-disk-cache".into())
                .spawn(move || {
                    for job in queue {
                        match job {
                            Job::Keep(key, payload) => {
                                cache
                                    .queued
                                    .fetch_sub(payload.len() as u64, Ordering::Relaxed);
                                cache.keep_marked(&key, &payload);
                            }
                            Job::Flush(done) => {
                                let _ = done.send(());
                            }
                        }
                    }
                })
                .map_err(|e| io_err(dir, e))?
        };
        Ok(DiskCache {
            dir: cache,
            writer: Some(Writer { jobs, thread }),
        })
    }

    /// Queues the stored frame `payload` to be kept under `key` by the
    /// cache's writer thread, and returns at once. Nothing is queued for a
    /// key held or queued already, nor past [`QUEUE_BYTES`] (counted as
    /// skipped). Until written, the frame is a miss. The bytes are copied
    /// only once queued.
    pub fn insert_later(&self, key: &ChunkId, payload: &[u8]) {
        let len = payload.len() as u64;
        {
            let mut s = self.state.lock();
            if s.lru.contains(key) || s.writing.contains(key) {
                return;
            }
            if self.queued.load(Ordering::Relaxed) + len > QUEUE_BYTES {
                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            s.writing.insert(*key);
            self.queued.fetch_add(len, Ordering::Relaxed);
        }
        let sent = match &self.writer {
            Some(w) => w.jobs.send(Job::Keep(*key, payload.to_vec())).is_ok(),
            None => false,
        };
        if !sent {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            self.state.lock().writing.remove(key);
        }
    }

    /// Waits until every frame queued before this call is written (or
    /// given up).
    pub fn flush(&self) {
        let (done, wait) = crossbeam_channel::bounded(1);
        let sent = match &self.writer {
            Some(w) => w.jobs.send(Job::Flush(done)).is_ok(),
            None => false,
        };
        if sent {
            let _ = wait.recv();
        }
    }
}

impl CacheDir {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes charged now (whole blocks of every file, also those being
    /// written); never above [`Self::capacity`].
    pub fn used_bytes(&self) -> u64 {
        self.state.lock().used
    }

    /// Frames held.
    pub fn frames(&self) -> usize {
        self.state.lock().lru.len()
    }

    fn path_of(&self, key: &ChunkId) -> PathBuf {
        let hex = key.to_hex();
        self.dir.join("frames").join(&hex[..2]).join(hex)
    }

    /// Pops least recently used entries until `extra` more bytes fit;
    /// returns them. Their bytes stay charged until the caller has removed
    /// their files (outside the lock) and calls [`Self::release`], so the
    /// files on disk never exceed the bound, even for a moment.
    fn evict_until(&self, s: &mut State, extra: u64) -> Vec<(ChunkId, u64)> {
        let mut victims = Vec::new();
        let mut freed = 0;
        while s.used - freed + extra > self.capacity {
            let Some((key, c)) = s.lru.pop_lru() else {
                break;
            };
            freed += c;
            victims.push((key, c));
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
        victims
    }

    /// Removes the victims' files, then stops charging for them.
    fn drop_victims(&self, victims: &[(ChunkId, u64)]) {
        if victims.is_empty() {
            return;
        }
        let keys: Vec<ChunkId> = victims.iter().map(|v| v.0).collect();
        self.remove_files(&keys);
        let freed: u64 = victims.iter().map(|v| v.1).sum();
        self.state.lock().used -= freed;
    }

    fn remove_files(&self, keys: &[ChunkId]) {
        for key in keys {
            let path = self.path_of(key);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("disk cache: cannot remove {}: {e}", path.display());
                }
            }
        }
    }

    /// The stored frame under `key`, if cached and intact. A damaged file
    /// is dropped (and logged): the caller fetches the frame again.
    pub fn get(&self, key: &ChunkId) -> Option<Vec<u8>> {
        if self.state.lock().lru.get(key).is_none() {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let path = self.path_of(key);
        match read_checked(&path, key) {
            Ok(payload) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes_read
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
                // Keeps the order of use for the next open.
                let _ = filetime::set_file_mtime(&path, filetime::FileTime::now());
                Some(payload)
            }
            Err(why) => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                if why.kind() == std::io::ErrorKind::NotFound {
                    // Evicted between the lookup and the open.
                    tracing::debug!("disk cache: {} went away", path.display());
                } else {
                    self.counters.damaged.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "disk cache: dropping {}: {why}; fetching the frame again",
                        path.display()
                    );
                }
                self.forget(key);
                None
            }
        }
    }

    /// Drops `key`'s entry and file (a damaged file, or one whose bytes
    /// did not decode).
    pub fn forget(&self, key: &ChunkId) {
        let popped = self.state.lock().lru.pop(key);
        if let Some(c) = popped {
            self.drop_victims(&[(*key, c)]);
        }
    }

    /// Keeps the stored frame `payload` under `key`, evicting what it
    /// must to stay within the bound. Failures are logged and counted,
    /// never returned: the cache is an optimisation.
    pub fn insert(&self, key: &ChunkId, payload: &[u8]) {
        {
            let mut s = self.state.lock();
            if s.lru.contains(key) || s.writing.contains(key) {
                return;
            }
            s.writing.insert(*key);
        }
        self.keep_marked(key, payload);
    }

    /// [`Self::insert`] of a key the caller has put in `writing`, which
    /// this takes out again whatever happens.
    fn keep_marked(&self, key: &ChunkId, payload: &[u8]) {
        let c = charge(payload.len());
        let give_up = || {
            self.state.lock().writing.remove(key);
        };
        if c > self.capacity || payload.len() > u32::MAX as usize {
            return give_up();
        }
        // Room is made first, its files removed, then the new file's
        // bytes are charged; a few rounds if other writers take the room.
        let mut reserved = false;
        for _ in 0..4 {
            let victims = {
                let mut s = self.state.lock();
                if s.used + c <= self.capacity {
                    s.used += c;
                    reserved = true;
                    break;
                }
                self.evict_until(&mut s, c)
            };
            if victims.is_empty() {
                // Everything left is being written or removed by others.
                break;
            }
            self.drop_victims(&victims);
        }
        if !reserved {
            return give_up();
        }
        let written = self.write_file(key, payload);
        let mut s = self.state.lock();
        s.writing.remove(key);
        match written {
            Ok(()) => {
                s.lru.put(*key, c);
                self.counters.inserts.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes_written
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                s.used -= c;
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("disk cache: cannot keep frame {key}: {e}");
            }
        }
    }

    fn write_file(&self, key: &ChunkId, payload: &[u8]) -> Result<()> {
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join("tmp").join(format!("{}.{n}", key.to_hex()));
        let path = self.path_of(key);
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[16..48].copy_from_slice(&key.0);
        header[48..80].copy_from_slice(blake3::hash(payload).as_bytes());
        let result = (|| {
            let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
            f.write_all(&header)
                .and_then(|()| f.write_all(payload))
                .map_err(|e| io_err(&tmp, e))?;
            drop(f);
            let parent = path.parent().expect("frames/<2 hex>");
            std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Reads a cached frame file and checks its header and checksum.
fn read_checked(path: &Path, key: &ChunkId) -> std::io::Result<Vec<u8>> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    if bytes.len() < HEADER_LEN || bytes[..8] != MAGIC {
        return Err(bad("not a cached frame (short, or bad magic)"));
    }
    let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    if bytes.len() - HEADER_LEN != len {
        return Err(bad(&format!(
            "{} payload bytes, the header says {len}",
            bytes.len() - HEADER_LEN
        )));
    }
    if bytes[16..48] != key.0 {
        return Err(bad("holds another frame"));
    }
    let payload = &bytes[HEADER_LEN..];
    if blake3::hash(payload).as_bytes() != &bytes[48..80] {
        return Err(bad("checksum mismatch"));
    }
    Ok(payload.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> ChunkId {
        ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    fn payload(n: u32, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u32 ^ n) as u8).collect()
    }

    /// Sum of the charged sizes of the files under `frames/` and `tmp/`.
    fn on_disk(dir: &Path) -> u64 {
        let mut total = 0;
        for sub in ["frames", "tmp"] {
            let mut stack = vec![dir.join(sub)];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(d).unwrap().flatten() {
                    let m = e.metadata().unwrap();
                    if m.is_dir() {
                        stack.push(e.path());
                    } else {
                        total += m.len().div_ceil(BLOCK) * BLOCK;
                    }
                }
            }
        }
        total
    }

    #[test]
    fn keeps_and_serves_frames() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(cache.get(&key(1)), None);
        cache.insert(&key(1), &payload(1, 10_000));
        assert_eq!(cache.get(&key(1)), Some(payload(1, 10_000)));
        assert_eq!(cache.get(&key(2)), None);
        assert_eq!(cache.counters.hits.load(Ordering::Relaxed), 1);
        assert_eq!(cache.counters.misses.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn never_exceeds_its_bound_and_evicts_the_least_recently_used() {
        let tmp = tempfile::tempdir().unwrap();
        let cap = 100 * 1024;
        let cache = DiskCache::open(tmp.path(), cap).unwrap();
        for n in 0..200 {
            cache.insert(&key(n), &payload(n, 3000 + (n as usize * 37) % 9000));
            // Key 0 is used all along, so it stays.
            assert!(cache.get(&key(0)).is_some(), "after {n}");
            assert!(cache.used_bytes() <= cap);
            assert!(on_disk(tmp.path()) <= cap, "after {n}");
        }
        assert_eq!(on_disk(tmp.path()), cache.used_bytes());
        assert!(cache.counters.evictions.load(Ordering::Relaxed) > 150);
        assert_eq!(cache.get(&key(1)), None, "the oldest unused went first");
        assert!(cache.get(&key(199)).is_some());
        // A frame larger than the whole cache is not kept.
        cache.insert(&key(1000), &payload(7, cap as usize));
        assert_eq!(cache.get(&key(1000)), None);
    }

    #[test]
    fn concurrent_writers_stay_within_the_bound() {
        let tmp = tempfile::tempdir().unwrap();
        let cap = 64 * 1024;
        let cache = std::sync::Arc::new(DiskCache::open(tmp.path(), cap).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    for n in 0..100 {
                        let k = t * 1000 + n;
                        cache.insert(&key(k), &payload(k, 5000));
                        assert!(cache.used_bytes() <= cap);
                        if let Some(p) = cache.get(&key(k / 2)) {
                            assert_eq!(p, payload(k / 2, 5000));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(on_disk(tmp.path()) <= cap);
        assert_eq!(cache.counters.damaged.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_reopened_cache_keeps_its_frames_and_their_order() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let cache = DiskCache::open(tmp.path(), 1 << 20).unwrap();
            for n in 0..10 {
                cache.insert(&key(n), &payload(n, 5000));
                // Distinct modification times, oldest first.
                let t = filetime::FileTime::from_unix_time(1_000_000 + n as i64, 0);
                filetime::set_file_mtime(cache.path_of(&key(n)), t).unwrap();
            }
            // A half-written file left by a crash.
            std::fs::write(tmp.path().join("tmp/leftover.1"), b"partial").unwrap();
        }
        // Reopened with room for four: the six oldest go.
        let cache = DiskCache::open(tmp.path(), 4 * charge(5000)).unwrap();
        assert_eq!(cache.frames(), 4);
        assert_eq!(
            std::fs::read_dir(tmp.path().join("tmp")).unwrap().count(),
            0
        );
        for n in 0..6 {
            assert_eq!(cache.get(&key(n)), None, "{n}");
        }
        for n in 6..10 {
            assert_eq!(cache.get(&key(n)), Some(payload(n, 5000)), "{n}");
        }
        assert_eq!(on_disk(tmp.path()), cache.used_bytes());
    }

    #[test]
    fn damaged_or_truncated_files_are_dropped_never_served() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), 1 << 20).unwrap();
        for n in 0..4 {
            cache.insert(&key(n), &payload(n, 5000));
        }
        let flip = |path: PathBuf, at: usize| {
            let mut b = std::fs::read(&path).unwrap();
            b[at] ^= 0x40;
            std::fs::write(&path, b).unwrap();
        };
        flip(cache.path_of(&key(0)), HEADER_LEN + 1234);
        flip(cache.path_of(&key(1)), 20);
        let truncated = std::fs::read(cache.path_of(&key(2))).unwrap();
        std::fs::write(cache.path_of(&key(2)), &truncated[..truncated.len() - 100]).unwrap();
        for n in 0..3 {
            assert_eq!(cache.get(&key(n)), None, "{n}");
            assert!(!cache.path_of(&key(n)).exists(), "{n} stays on disk");
        }
        assert_eq!(cache.counters.damaged.load(Ordering::Relaxed), 3);
        cache.insert(&key(0), &payload(0, 5000));
        assert_eq!(cache.get(&key(0)), Some(payload(0, 5000)));
        std::fs::copy(cache.path_of(&key(3)), cache.path_of(&key(0))).unwrap();
        assert_eq!(cache.get(&key(0)), None, "another frame's file");
        assert_eq!(cache.get(&key(3)), Some(payload(3, 5000)));
        // Garbage under the frames directory is cleared at open.
        drop(cache);
        std::fs::write(tmp.path().join("frames/zz-not-a-key"), b"x").unwrap();
        let cache = DiskCache::open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(cache.frames(), 1);
        assert!(!tmp.path().join("frames/zz-not-a-key").exists());
    }

    #[test]
    fn queued_frames_are_written_by_the_writer_within_the_queue_bound() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), 1 << 30).unwrap();
        cache.insert_later(&key(1), &payload(1, 10_000));
        // Queued twice: once.
        cache.insert_later(&key(1), &payload(1, 10_000));
        cache.flush();
        assert_eq!(cache.get(&key(1)), Some(payload(1, 10_000)));
        assert_eq!(cache.counters.inserts.load(Ordering::Relaxed), 1);
        // A frame larger than the queue's bound is never queued, so a slow
        // disk cannot make the queue hold more.
        cache.insert_later(&key(2), &payload(2, QUEUE_BYTES as usize + 1));
        cache.flush();
        assert_eq!(cache.counters.skipped.load(Ordering::Relaxed), 1);
        assert_eq!(cache.get(&key(2)), None);
        assert_eq!(cache.queued.load(Ordering::Relaxed), 0);
        // What waits at the end is written when the cache is dropped.
        for n in 10..40 {
            cache.insert_later(&key(n), &payload(n, 5000));
        }
        drop(cache);
        let cache = DiskCache::open(tmp.path(), 1 << 30).unwrap();
        for n in 10..40 {
            assert_eq!(cache.get(&key(n)), Some(payload(n, 5000)), "{n}");
        }
    }

    #[test]
    fn a_second_process_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let _first = DiskCache::open(tmp.path(), 1 << 20).unwrap();
        // Another open file description stands for another process: the
        // lock is per open file, not per process.
        let err = DiskCache::open(tmp.path(), 1 << 20).err().expect("refused");
        let msg = err.to_string();
        assert!(msg.contains("in use by another process"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
    }
}
