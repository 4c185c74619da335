//! The cache of decoded frames (runs of chunks stored together) used by
//! the mount read path; each chunk is checked against its id when served.
//!
//! Sharded so that readers on different cores rarely meet on one lock;
//! each shard is an LRU bounded in bytes (a hard limit: an insert evicts
//! until the shard fits). A frame being fetched is fetched once: later
//! readers of the same frame wait for that fetch instead of repeating it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use crate::fs::FsError;
use crate::ids::{BuildIdHasher, ChunkId, IdMap};

const SHARDS: usize = 16;

/// A decoded chunk, shared by the cache and every reader holding it.
pub type ChunkData = Arc<Vec<u8>>;

type Fetch = Arc<OnceLock<Result<ChunkData, FsError>>>;

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

    /// Returns the chunk, fetching it with `fetch` if no one else is.
    pub fn get_or_fetch(
        &self,
        id: &ChunkId,
        fetch: impl FnOnce() -> Result<ChunkData, FsError>,
    ) -> Result<ChunkData, FsError> {
        let shard = self.shard(id);
        let cell = {
            let mut s = shard.lock();
            if let Some(v) = s.lru.get(id) {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(v.clone());
            }
            match s.in_flight.get(id) {
                Some(cell) => {
                    self.counters.shared_fetches.fetch_add(1, Ordering::Relaxed);
                    cell.clone()
                }
                None => {
                    let cell: Fetch = Arc::new(OnceLock::new());
                    s.in_flight.insert(*id, cell.clone());
                    cell
                }
            }
        };
        let mut fetched_here = false;
        let result = cell
            .get_or_init(|| {
                fetched_here = true;
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                fetch()
            })
            .clone();
        if fetched_here {
            let mut s = shard.lock();
            s.in_flight.remove(id);
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
        result
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
            let data: ChunkData = Arc::new(vec![n as u8; 100]);
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
                            Ok(Arc::new(vec![1u8; 10]))
                        })
                        .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(&*t.join().unwrap(), &[1u8; 10]);
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn errors_are_not_cached() {
        let cache = ChunkCache::new(1 << 20);
        assert!(cache
            .get_or_fetch(&id(1), || Err(FsError::Corrupt("x".into())))
            .is_err());
        assert!(cache
            .get_or_fetch(&id(1), || Ok(Arc::new(vec![2u8])))
            .is_ok());
    }
}
