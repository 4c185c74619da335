//! The read path's figures of one mount, as `flr mount` reports them when
//! it ends and the daemon sums them for `/metrics`: the memory cache, the
//! fetches from the store (with merged requests), readahead, the disk
//! cache and the store's own request counts.

use std::sync::atomic::Ordering::Relaxed;

use serde_json::{json, Value};
use vfs_core::disk_cache::DiskCache;
use vfs_core::fs::RepoFs;
use vfs_core::repo::Repository;

/// Readahead workers for a mount of `repo`: a remote store waits a round
/// trip per request, so more of them run at once.
pub fn readahead_threads(repo: &Repository) -> usize {
    if repo.store().requests().is_some() {
        4
    } else {
        2
    }
}

/// The disk cache's figures, or `null`.
pub fn disk_cache_json(disk: Option<&DiskCache>) -> Value {
    let Some(d) = disk else {
        return Value::Null;
    };
    let c = &d.counters;
    json!({
        "dir": d.dir().display().to_string(),
        "capacity_bytes": d.capacity(),
        "used_bytes": d.used_bytes(),
        "frames": d.frames(),
        "hits": c.hits.load(Relaxed),
        "misses": c.misses.load(Relaxed),
        "inserts": c.inserts.load(Relaxed),
        "bytes_read": c.bytes_read.load(Relaxed),
        "bytes_written": c.bytes_written.load(Relaxed),
        "evictions": c.evictions.load(Relaxed),
        "damaged": c.damaged.load(Relaxed),
        "write_errors": c.write_errors.load(Relaxed),
        "skipped": c.skipped.load(Relaxed),
    })
}

/// Everything one mount counted, with the store's requests (`null` for a
/// local directory).
pub fn json(fs: &RepoFs) -> Value {
    let c = &fs.counters;
    let cache = fs.cache();
    let f = &fs.fetcher().counters;
    let requests = match fs.repository().store().requests() {
        Some(r) => {
            let mut v = serde_json::to_value(r).expect("counts serialize");
            v["total"] = json!(r.total());
            v
        }
        None => Value::Null,
    };
    json!({
        "reads": c.reads.load(Relaxed),
        "bytes_served": c.bytes_served.load(Relaxed),
        "chunk_errors": c.chunk_errors.load(Relaxed),
        "cache": {
            "hits": cache.counters.hits.load(Relaxed),
            "misses": cache.counters.misses.load(Relaxed),
            "shared_fetches": cache.counters.shared_fetches.load(Relaxed),
            "evictions": cache.counters.evictions.load(Relaxed),
            "resident_bytes": cache.resident_bytes(),
        },
        "fetch": {
            "requests": f.requests.load(Relaxed),
            "frames_fetched": f.frames_fetched.load(Relaxed),
            "frames_merged": f.frames_merged.load(Relaxed),
            "bytes_fetched": f.bytes_fetched.load(Relaxed),
            "gap_bytes": f.gap_bytes.load(Relaxed),
            "frames_from_disk": f.frames_from_disk.load(Relaxed),
            "disk_rejected": f.disk_rejected.load(Relaxed),
        },
        "readahead": {
            "chunks": c.readahead_chunks.load(Relaxed),
            "frames": c.readahead_frames.load(Relaxed),
            "dropped": c.readahead_dropped.load(Relaxed),
            "cancelled": c.readahead_cancelled.load(Relaxed),
        },
        "disk_cache": disk_cache_json(fs.fetcher().disk_cache().map(|d| d.as_ref())),
        "requests": requests,
    })
}
