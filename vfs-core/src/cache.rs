//! The cache of decoded frames (runs of chunks stored together) used by
//! the mount read path. Each chunk is checked against its id the first
//! time it is served from a frame; the frame remembers the check, so a
//! cache hit does not hash the chunk again. The frame's bytes never change
//! once decoded and live only in this process's memory, so every byte
//! that came from disk or the network is still checked before it is
//! served.
//!
//! Sharded so that readers on different cores rarely meet on one lock;
//! each shard is an LRU bounded in bytes (a hard limit: an insert evicts
//! until the shard fits). A frame being fetched is fetched once: later
//! readers of the same frame wait for that fetch instead of repeating it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::fs::FsError;
use crate::ids::{BuildIdHasher, ChunkId, IdMap};

const SHARDS: usize = 16;

/// Most chunks one frame remembers as checked: a frame holds a few page
/// chunks; one with more (small chunks of a text file) checks the rest on
/// every use, as before.
const CHECKED_PER_FRAME: usize = 32;

/// A decoded frame and the chunks of it already checked against their
/// ids. Its bytes are immutable: a chunk that matched its id once still
/// does.
pub struct Frame {
    bytes: Vec<u8>,
    /// (offset in the frame, length, id) of each chunk checked.
    checked: Mutex<Vec<(u32, u32, ChunkId)>>,
}

impl Frame {
    pub fn new(bytes: Vec<u8>) -> Frame {
        Frame {
            bytes,
            checked: Mutex::new(Vec::new()),
        }
    }

    /// Whether the `len` bytes at `offset` were found to be chunk `id`.
    pub fn was_checked(&self, offset: u32, len: u32, id: &ChunkId) -> bool {
        self.checked
            .lock()
            .iter()
            .any(|(o, l, i)| *o == offset && *l == len && i == id)
    }

    /// Records that the `len` bytes at `offset` hash to `id`. Only a caller
    /// that just checked them may say so.
    pub fn mark_checked(&self, offset: u32, len: u32, id: &ChunkId) {
        let mut checked = self.checked.lock();
        if checked.len() < CHECKED_PER_FRAME {
            checked.push((offset, len, *id));
        }
    }
}

impl std::ops::Deref for Frame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// A decoded frame, shared by the cache and every reader holding it.
pub type ChunkData = Arc<Frame>;

/// A frame being fetched: its result once there, for every reader that
/// waits for it.
#[derive(Default)]
struct Pending {
    result: Mutex<Option<Result<ChunkData, FsError>>>,
    ready: Condvar,
}

impl Pending {
    /// Blocks until the fetch completes. Never on a decode pool thread:
    /// fetches decode on that pool, so pool threads that all wait here
    /// leave no thread to finish the fetch they wait for.
    fn wait(&self) -> Result<ChunkData, FsError> {
        debug_assert!(
            rayon::current_thread_index().is_none(),
            "a decode pool thread waits for a frame fetch"
        );
        let mut result = self.result.lock();
        loop {
            if let Some(r) = &*result {
                return r.clone();
            }
            self.ready.wait(&mut result);
        }
    }
}

type Fetch = Arc<Pending>;

struct Shard {
    lru: lru::LruCache<ChunkId, ChunkData, BuildIdHasher>,
    bytes: usize,
    in_flight: IdMap<Fetch>,
}

#[derive(Default, Debug)]
pub struct CacheCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Readers that found the chunk already being fetched and waited.
    pub shared_fetches: AtomicU64,
    pub evictions: AtomicU64,
}

pub struct ChunkCache {
    shards: Vec<Mutex<Shard>>,
    shard_capacity: usize,
    pub counters: CacheCounters,
}

/// The duty to fetch one frame, taken with [`ChunkCache::claim`]: readers
/// of the frame wait for it meanwhile. Dropped unfulfilled, it fails those
/// readers' wait, and they fetch the frame themselves.
pub struct Claim<'a> {
    cache: &'a ChunkCache,
    id: ChunkId,
    pending: Option<Fetch>,
}

impl Claim<'_> {
    pub fn id(&self) -> &ChunkId {
        &self.id
    }

    /// Hands the fetched frame (or the failure) to the cache and to the
    /// readers waiting for it.
    pub fn complete(mut self, result: Result<ChunkData, FsError>) {
        let pending = self.pending.take().expect("completed once");
        self.cache.complete(&self.id, &pending, result);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            self.cache.complete(
                &self.id,
                &pending,
                Err(FsError::Io("the frame's fetch was abandoned".into())),
            );
        }
    }
}

impl ChunkCache {
    /// A cache holding at most `capacity` bytes of decoded data.
    pub fn new(capacity: usize) -> Self {
        ChunkCache {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        lru: lru::LruCache::unbounded_with_hasher(BuildIdHasher::default()),
                        bytes: 0,
                        in_flight: IdMap::default(),
                    })
                })
                .collect(),
            shard_capacity: (capacity / SHARDS).max(1),
            counters: CacheCounters::default(),
        }
    }

    /// The bound on resident bytes.
    pub fn capacity(&self) -> usize {
        self.shard_capacity * SHARDS
    }

    fn shard(&self, id: &ChunkId) -> &Mutex<Shard> {
        // Ids are uniform hashes; any byte picks a shard evenly.
        &self.shards[id.0[0] as usize % SHARDS]
    }

    /// True if the chunk is cached or being fetched (used by readahead to
    /// skip work).
    pub fn contains(&self, id: &ChunkId) -> bool {
        let s = self.shard(id).lock();
        s.lru.contains(id) || s.in_flight.contains_key(id)
    }

    pub fn resident_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().bytes).sum()
    }

    /// Takes the fetch of `id` if it is neither cached nor being fetched:
    /// the caller then fetches it (with others, in one request) and
    /// completes the claim. Counted as a miss.
    pub fn claim(&self, id: &ChunkId) -> Option<Claim<'_>> {
        let mut s = self.shard(id).lock();
        if s.lru.contains(id) || s.in_flight.contains_key(id) {
            return None;
        }
        let pending: Fetch = Arc::default();
        s.in_flight.insert(*id, pending.clone());
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        Some(Claim {
            cache: self,
            id: *id,
            pending: Some(pending),
        })
    }

    fn complete(&self, id: &ChunkId, pending: &Fetch, result: Result<ChunkData, FsError>) {
        {
            let mut s = self.shard(id).lock();
            if s.in_flight.get(id).is_some_and(|p| Arc::ptr_eq(p, pending)) {
                s.in_flight.remove(id);
            }
            // Failures are not cached: a later read tries again and is
            // counted again.
            if let Ok(data) = &result {
                if data.len() <= self.shard_capacity && s.lru.put(*id, data.clone()).is_none() {
                    s.bytes += data.len();
                }
                while s.bytes > self.shard_capacity {
                    let Some((_, old)) = s.lru.pop_lru() else {
                        break;
                    };
                    s.bytes -= old.len();
                    self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        *pending.result.lock() = Some(result);
        pending.ready.notify_all();
    }

    /// Returns the chunk, fetching it with `fetch` if no one else is. A
    /// reader that waited for someone else's fetch and saw it fail fetches
    /// once itself (the other may have been a prefetch that gave up).
    pub fn get_or_fetch(
        &self,
        id: &ChunkId,
        fetch: impl FnOnce() -> Result<ChunkData, FsError>,
    ) -> Result<ChunkData, FsError> {
        let shard = self.shard(id);
        let (pending, mine) = {
            let mut s = shard.lock();
            if let Some(v) = s.lru.get(id) {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(v.clone());
            }
            match s.in_flight.get(id) {
                Some(p) => {
                    self.counters.shared_fetches.fetch_add(1, Ordering::Relaxed);
                    (p.clone(), false)
                }
                None => {
                    let p: Fetch = Arc::default();
                    s.in_flight.insert(*id, p.clone());
                    (p, true)
                }
            }
        };
        if !mine {
            return match pending.wait() {
                Ok(data) => Ok(data),
                Err(_) => self.get_or_fetch_own(id, fetch),
            };
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let result = fetch();
        self.complete(id, &pending, result.clone());
        result
    }

    /// [`Self::get_or_fetch`] after a shared fetch failed: fetches unless
    /// it is cached or yet another fetch runs now.
    fn get_or_fetch_own(
        &self,
        id: &ChunkId,
        fetch: impl FnOnce() -> Result<ChunkData, FsError>,
    ) -> Result<ChunkData, FsError> {
        match self.claim(id) {
            Some(claim) => {
                let result = fetch();
                claim.complete(result.clone());
                result
            }
            None => {
                let pending = {
                    let mut s = self.shard(id).lock();
                    if let Some(v) = s.lru.get(id) {
                        self.counters.hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(v.clone());
                    }
                    s.in_flight.get(id).cloned()
                };
                match pending {
                    Some(p) => p.wait(),
                    None => fetch(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn id(n: u32) -> ChunkId {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_le_bytes());
        ChunkId(b)
    }

    #[test]
    fn stays_within_its_byte_bound() {
        let cache = ChunkCache::new(16 * 1024);
        for n in 0..1000 {
            let data: ChunkData = Arc::new(Frame::new(vec![n as u8; 100]));
            cache.get_or_fetch(&id(n), || Ok(data)).unwrap();
            assert!(cache.resident_bytes() <= 16 * 1024);
        }
        assert!(cache.counters.evictions.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn concurrent_readers_share_one_fetch() {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let fetches = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, fetches, barrier) = (cache.clone(), fetches.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    cache
                        .get_or_fetch(&id(7), || {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(Arc::new(Frame::new(vec![1u8; 10])))
                        })
                        .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(&**t.join().unwrap(), &[1u8; 10]);
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn readers_wait_for_a_claimed_fetch_and_share_its_result() {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let claim = cache.claim(&id(3)).expect("nothing cached yet");
        assert!(cache.claim(&id(3)).is_none(), "claimed once");
        let reader = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                cache
                    .get_or_fetch(&id(3), || panic!("the claim's fetch is shared"))
                    .unwrap()
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(30));
        claim.complete(Ok(Arc::new(Frame::new(vec![9u8; 4]))));
        assert_eq!(&**reader.join().unwrap(), &[9u8; 4]);
        assert!(cache.claim(&id(3)).is_none(), "cached now");
    }

    #[test]
    fn an_abandoned_claim_lets_readers_fetch_themselves() {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let claim = cache.claim(&id(4)).unwrap();
        let reader = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                cache.get_or_fetch(&id(4), || Ok(Arc::new(Frame::new(vec![5u8]))))
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(30));
        drop(claim);
        assert_eq!(&**reader.join().unwrap().unwrap(), &[5u8]);
    }

    #[test]
    fn a_frame_remembers_only_the_checks_it_was_told_of() {
        let frame = Frame::new(vec![3u8; 64]);
        assert_eq!(&*frame, &[3u8; 64][..]);
        assert!(!frame.was_checked(0, 16, &id(1)));
        frame.mark_checked(0, 16, &id(1));
        assert!(frame.was_checked(0, 16, &id(1)));
        assert!(!frame.was_checked(0, 16, &id(2)), "another id");
        assert!(!frame.was_checked(16, 16, &id(1)), "another offset");
        assert!(!frame.was_checked(0, 8, &id(1)), "another length");
        // Past its bound a frame stops remembering, and then only asks
        // for more checks.
        for n in 0..100 {
            frame.mark_checked(n, 1, &id(n + 10));
        }
        assert!(frame.was_checked(0, 16, &id(1)));
        assert!(!frame.was_checked(99, 1, &id(109)));
    }

    #[test]
    fn errors_are_not_cached() {
        let cache = ChunkCache::new(1 << 20);
        assert!(cache
            .get_or_fetch(&id(1), || Err(FsError::Corrupt("x".into())))
            .is_err());
        assert!(cache
            .get_or_fetch(&id(1), || Ok(Arc::new(Frame::new(vec![2u8]))))
            .is_ok());
    }
}
