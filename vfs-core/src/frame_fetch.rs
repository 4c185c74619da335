//! Fetching stored frames for the mount read path: from the disk cache
//! when it holds them, else from the store, with nearby frames of one
//! pack merged into one range request.
//!
//! Every frame, wherever its bytes came from, is decoded by
//! [`Repository::decode_frame`] (opened, decompressed, its length
//! checked) and its chunks are checked against their ids by the reader:
//! the disk cache saves requests, never checks. A cached frame that does
//! not decode is dropped from the disk cache and fetched again.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::disk_cache::DiskCache;
use crate::error::{Error, Result};
use crate::fs::{FsError, FsResult};
use crate::ids::{ChunkId, PackId};
use crate::repo::{pack_key, ChunkLoc, Repository};

/// Largest hole between two wanted frames of one pack that one request
/// still covers, for a remote store: a request costs a round trip (tens
/// of milliseconds on a real object store) and a fee, which buys far more
/// than this many bytes of transfer.
const REMOTE_MAX_GAP: u64 = 256 << 10;

/// Largest span one request covers: bounds the memory one fetch holds.
const MAX_SPAN: u64 = 8 << 20;

/// A frame to fetch: where it is stored, and one chunk of it (named in
/// errors).
#[derive(Clone, Copy, Debug)]
pub struct FrameRequest {
    pub chunk: ChunkId,
    pub loc: ChunkLoc,
    pub pack: PackId,
    pub frame_key: ChunkId,
}

/// Figures for stats and metrics.
#[derive(Default, Debug)]
pub struct FetchCounters {
    /// Range requests sent to the store.
    pub requests: AtomicU64,
    /// Frames that came from the store.
    pub frames_fetched: AtomicU64,
    /// Frames that shared a request with an earlier frame of the same one.
    pub frames_merged: AtomicU64,
    /// Bytes requested from the store, holes between frames included.
    pub bytes_fetched: AtomicU64,
    /// Bytes of holes fetched only to merge requests.
    pub gap_bytes: AtomicU64,
    /// Frames that came from the disk cache and decoded.
    pub frames_from_disk: AtomicU64,
    /// Disk cache files whose bytes did not decode: dropped and fetched
    /// again.
    pub disk_rejected: AtomicU64,
}

/// Fetches frames of the repository `R` points to: a mount's shared one,
/// or one borrowed for the length of a restore.
pub struct FrameFetcher<R = Arc<Repository>> {
    repo: R,
    disk: Option<Arc<DiskCache>>,
    max_gap: u64,
    pub counters: FetchCounters,
}

impl<R: Deref<Target = Repository> + Sync> FrameFetcher<R> {
    pub fn new(repo: R, disk: Option<Arc<DiskCache>>) -> FrameFetcher<R> {
        // A local store reads with pread at memory speed: merging across
        // holes would only read bytes no one wants. Adjacent frames still
        // merge (one call instead of many).
        let max_gap = if repo.store().requests().is_some() {
            REMOTE_MAX_GAP
        } else {
            0
        };
        FrameFetcher {
            repo,
            disk,
            max_gap,
            counters: FetchCounters::default(),
        }
    }

    pub fn disk_cache(&self) -> Option<&Arc<DiskCache>> {
        self.disk.as_ref()
    }

    /// Decodes the frames asked for, in their order. Frames the disk cache
    /// holds cost no request; the rest are fetched, nearby ones of a pack
    /// in one request, and kept in the disk cache once they decode.
    pub fn fetch(&self, wanted: &[FrameRequest]) -> Vec<FsResult<Vec<u8>>> {
        self.fetch_frames(wanted)
            .into_iter()
            .map(|r| r.map_err(FsError::from))
            .collect()
    }

    /// [`Self::fetch`], with the repository's own errors.
    pub fn fetch_frames(&self, wanted: &[FrameRequest]) -> Vec<Result<Vec<u8>>> {
        let mut out: Vec<Option<Result<Vec<u8>>>> = (0..wanted.len()).map(|_| None).collect();
        let mut from_store = Vec::new();
        for (i, w) in wanted.iter().enumerate() {
            let cached = self.disk.as_ref().and_then(|d| d.get(&w.frame_key));
            match cached {
                Some(raw) => match self.repo.decode_frame(&w.chunk, &w.loc, &w.pack, &raw) {
                    Ok(plain) => {
                        self.counters
                            .frames_from_disk
                            .fetch_add(1, Ordering::Relaxed);
                        out[i] = Some(Ok(plain));
                    }
                    Err(e) => {
                        self.counters.disk_rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            "disk cache: frame {} of pack {} does not decode ({e}); fetching it again",
                            w.frame_key,
                            w.pack
                        );
                        if let Some(d) = &self.disk {
                            d.forget(&w.frame_key);
                        }
                        from_store.push(i);
                    }
                },
                None => from_store.push(i),
            }
        }
        // Runs of frames of one pack, in offset order, one request each.
        from_store.sort_by_key(|&i| (wanted[i].pack.0, wanted[i].loc.offset));
        let mut runs: Vec<Vec<usize>> = Vec::new();
        for i in from_store {
            let w = &wanted[i];
            let joins = runs.last().is_some_and(|run| {
                let first = &wanted[run[0]];
                let end = run
                    .iter()
                    .map(|&j| wanted[j].loc.offset as u64 + wanted[j].loc.stored_len as u64)
                    .max()
                    .unwrap_or(0);
                let start = w.loc.offset as u64;
                first.pack == w.pack
                    && start <= end + self.max_gap
                    && (start + w.loc.stored_len as u64).max(end) - first.loc.offset as u64
                        <= MAX_SPAN
            });
            if joins {
                runs.last_mut().expect("checked").push(i);
            } else {
                runs.push(vec![i]);
            }
        }
        let decoded: Vec<Vec<(usize, Result<Vec<u8>>)>> =
            if runs.len() > 1 || runs.first().is_some_and(|r| r.len() > 4) {
                use rayon::prelude::*;
                runs.par_iter()
                    .map(|run| self.fetch_run(wanted, run))
                    .collect()
            } else {
                runs.iter().map(|run| self.fetch_run(wanted, run)).collect()
            };
        for (i, r) in decoded.into_iter().flatten() {
            out[i] = Some(r);
        }
        out.into_iter()
            .map(|r| r.expect("every frame answered"))
            .collect()
    }

    /// One request for a run of frames of one pack, split and decoded.
    fn fetch_run(&self, wanted: &[FrameRequest], run: &[usize]) -> Vec<(usize, Result<Vec<u8>>)> {
        let pack = wanted[run[0]].pack;
        let start = wanted[run[0]].loc.offset as u64;
        let end = run
            .iter()
            .map(|&i| wanted[i].loc.offset as u64 + wanted[i].loc.stored_len as u64)
            .max()
            .expect("a run has frames");
        let len = (end - start) as usize;
        let wanted_bytes: u64 = run.iter().map(|&i| wanted[i].loc.stored_len as u64).sum();
        let c = &self.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.bytes_fetched.fetch_add(len as u64, Ordering::Relaxed);
        c.gap_bytes
            .fetch_add((len as u64).saturating_sub(wanted_bytes), Ordering::Relaxed);
        c.frames_fetched
            .fetch_add(run.len() as u64, Ordering::Relaxed);
        c.frames_merged
            .fetch_add(run.len() as u64 - 1, Ordering::Relaxed);
        let key = pack_key(&pack);
        let bytes = match self.repo.store().get_range(&key, start, len) {
            Ok(b) => b,
            Err(e) => {
                // Each frame of the run fails alike; the first with the
                // store's own error, the others with its message.
                let shown = e.to_string();
                let mut first = Some(e);
                return run
                    .iter()
                    .map(|&i| {
                        let e = first.take().unwrap_or_else(|| {
                            Error::io(&key, std::io::Error::other(shown.clone()))
                        });
                        (i, Err(e))
                    })
                    .collect();
            }
        };
        let decode = |i: usize| {
            let w = &wanted[i];
            let from = (w.loc.offset as u64 - start) as usize;
            let raw = &bytes[from..from + w.loc.stored_len as usize];
            let plain = self.repo.decode_frame(&w.chunk, &w.loc, &w.pack, raw)?;
            if let Some(d) = &self.disk {
                d.insert_later(&w.frame_key, raw);
            }
            Ok(plain)
        };
        if run.len() > 4 {
            use rayon::prelude::*;
            run.par_iter().map(|&i| (i, decode(i))).collect()
        } else {
            run.iter().map(|&i| (i, decode(i))).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, ObjectStore, RequestCounts};

    /// A memory store that counts range requests as a remote one does.
    struct CountingStore {
        inner: MemoryStore,
        ranges: AtomicU64,
    }

    impl ObjectStore for CountingStore {
        fn location(&self) -> String {
            "counting".into()
        }
        fn put(&self, key: &str, data: &[u8]) -> crate::Result<()> {
            self.inner.put(key, data)
        }
        fn get(&self, key: &str) -> crate::Result<Vec<u8>> {
            self.inner.get(key)
        }
        fn get_range(
            &self,
            key: &str,
            offset: u64,
            len: usize,
        ) -> crate::Result<crate::store::ObjectBytes> {
            self.ranges.fetch_add(1, Ordering::Relaxed);
            self.inner.get_range(key, offset, len)
        }
        fn size(&self, key: &str) -> crate::Result<Option<u64>> {
            self.inner.size(key)
        }
        fn list(&self, prefix: &str) -> crate::Result<Vec<String>> {
            self.inner.list(prefix)
        }
        fn delete(&self, key: &str) -> crate::Result<()> {
            self.inner.delete(key)
        }
        fn requests(&self) -> Option<RequestCounts> {
            Some(RequestCounts {
                range_get: self.ranges.load(Ordering::Relaxed),
                ..Default::default()
            })
        }
    }

    fn repo_with_file(bytes: Vec<u8>) -> (Arc<Repository>, Arc<CountingStore>, Vec<ChunkId>) {
        use crate::backup::{backup, BackupOptions, Source, StdinSource};
        let store = Arc::new(CountingStore {
            inner: MemoryStore::new(),
            ranges: AtomicU64::new(0),
        });
        Repository::init(store.as_ref(), None).unwrap();
        let repo = Arc::new(Repository::open(store.clone(), || Ok(Vec::new())).unwrap());
        let source = Source::Stream(StdinSource {
            name: "data.db".into(),
            reader: Box::new(std::io::Cursor::new(bytes)),
            mode: 0o644,
            uid: 0,
            gid: 0,
        });
        let opts = BackupOptions {
            job: "j".into(),
            chunker: None,
            hostname: "test".into(),
            progress: Default::default(),
        };
        let m = backup(&repo, source, &opts).unwrap();
        let ids = m
            .nodes
            .iter()
            .flat_map(|n| n.content.chunks(n.size))
            .filter_map(|c| c.0)
            .collect();
        (repo, store, ids)
    }

    fn requests_for(repo: &Repository, ids: &[ChunkId]) -> Vec<FrameRequest> {
        let mut seen = crate::ids::IdSet::default();
        let mut out: Vec<FrameRequest> = ids
            .iter()
            .map(|id| {
                let (loc, pack) = repo.locate(id).unwrap();
                FrameRequest {
                    chunk: *id,
                    loc,
                    pack,
                    frame_key: loc.frame_key(&pack),
                }
            })
            .filter(|r| seen.insert(r.frame_key))
            .collect();
        out.sort_by_key(|r| r.loc.offset);
        out
    }

    fn pseudo_random(len: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Compressible, but not trivially.
                (x % 16) as u8
            })
            .collect()
    }

    #[test]
    fn nearby_frames_come_in_one_request_and_decode_as_single_fetches_do() {
        let (repo, store, ids) = repo_with_file(pseudo_random(2 << 20));
        let wanted = requests_for(&repo, &ids);
        assert!(wanted.len() > 10, "{} frames", wanted.len());
        let fetcher = FrameFetcher::new(repo.clone(), None);
        let got = fetcher.fetch(&wanted);
        assert_eq!(store.ranges.load(Ordering::Relaxed), 1);
        for (w, g) in wanted.iter().zip(&got) {
            let single = repo.read_frame_at(&w.chunk, &w.loc, &w.pack).unwrap();
            assert_eq!(g.as_ref().unwrap(), &single);
        }
        // Every other frame: the holes are small, still one request.
        let before = store.ranges.load(Ordering::Relaxed);
        let sparse: Vec<_> = wanted.iter().step_by(2).copied().collect();
        assert!(fetcher.fetch(&sparse).iter().all(|r| r.is_ok()));
        assert_eq!(store.ranges.load(Ordering::Relaxed) - before, 1);
        assert!(fetcher.counters.gap_bytes.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn the_disk_cache_saves_requests_and_a_bad_file_is_fetched_again() {
        let (repo, store, ids) = repo_with_file(pseudo_random(1 << 20));
        let wanted = requests_for(&repo, &ids);
        let tmp = tempfile::tempdir().unwrap();
        let disk = Arc::new(DiskCache::open(tmp.path(), 64 << 20).unwrap());
        let fetcher = FrameFetcher::new(repo.clone(), Some(disk.clone()));
        let first: Vec<_> = fetcher
            .fetch(&wanted)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let sent = store.ranges.load(Ordering::Relaxed);
        // Kept by the cache's writer thread, after the reads returned.
        disk.flush();
        assert_eq!(disk.frames(), wanted.len());
        let again: Vec<_> = fetcher
            .fetch(&wanted)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(first, again);
        assert_eq!(store.ranges.load(Ordering::Relaxed), sent, "no request");
        // A cache file with a valid checksum over bytes that do not
        // decode (as if written by a buggy build): rejected, fetched anew.
        disk.forget(&wanted[0].frame_key);
        disk.insert(&wanted[0].frame_key, b"not a frame at all");
        let third: Vec<_> = fetcher
            .fetch(&wanted)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(first, third);
        assert_eq!(store.ranges.load(Ordering::Relaxed), sent + 1);
        assert_eq!(fetcher.counters.disk_rejected.load(Ordering::Relaxed), 1);
    }
}
