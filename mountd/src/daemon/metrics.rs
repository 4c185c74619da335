//! `GET /metrics`: Prometheus text exposition (format 0.0.4).

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use vfs_core::fs::RepoFs;

use super::Daemon;

/// Latency buckets kept by `FsCounters::read_latency_us`: bucket i counts
/// reads that took < 2^i µs; the last also takes everything slower.
const LATENCY_BUCKETS: usize = 24;

/// Read-path counters summed over mounts.
#[derive(Clone, Default)]
pub struct ReadStats {
    pub reads: u64,
    pub bytes_served: u64,
    pub chunk_errors: u64,
    /// Range requests the mounts sent for frames, and the frames that
    /// shared one with another.
    pub fetch_requests: u64,
    pub frames_fetched: u64,
    pub frames_merged: u64,
    pub readahead_frames: u64,
    pub latency_buckets: [u64; LATENCY_BUCKETS],
    pub latency_us_total: u64,
}

impl ReadStats {
    pub fn add(&mut self, fs: &RepoFs) {
        let c = &fs.counters;
        self.reads += c.reads.load(Relaxed);
        self.bytes_served += c.bytes_served.load(Relaxed);
        self.chunk_errors += c.chunk_errors.load(Relaxed);
        let f = &fs.fetcher().counters;
        self.fetch_requests += f.requests.load(Relaxed);
        self.frames_fetched += f.frames_fetched.load(Relaxed);
        self.frames_merged += f.frames_merged.load(Relaxed);
        self.readahead_frames += c.readahead_frames.load(Relaxed);
        for (sum, b) in self.latency_buckets.iter_mut().zip(&c.read_latency_us) {
            *sum += b.load(Relaxed);
        }
        self.latency_us_total += c.read_latency_us_total.load(Relaxed);
    }
}

pub async fn render(daemon: &Daemon) -> String {
    let (reads, sessions, mounts, open_files) = daemon.sessions.stats().await;
    let jobs = daemon.jobs.counts();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let one = |v: u64| vec![(String::new(), v)];
    metric(
        "flr_sessions_active",
        "gauge",
        "Mount sessions open.",
        &one(sessions as u64),
    );
    metric(
        "flr_mounts_active",
        "gauge",
        "Restore points mounted (shared by sessions).",
        &one(mounts as u64),
    );
    metric(
        "flr_open_files",
        "gauge",
        "Files open through the daemon's mounts.",
        &one(open_files),
    );
    // One memory cache serves every mount of the daemon.
    let cache = &daemon.cache;
    metric(
        "flr_cache_hits_total",
        "counter",
        "Frame lookups served from the cache of decoded frames.",
        &one(cache.counters.hits.load(Relaxed)),
    );
    metric(
        "flr_cache_misses_total",
        "counter",
        "Frame lookups that fetched and decoded from the repository.",
        &one(cache.counters.misses.load(Relaxed)),
    );
    metric(
        "flr_cache_evictions_total",
        "counter",
        "Decoded frames evicted from the memory cache to stay within its bound.",
        &one(cache.counters.evictions.load(Relaxed)),
    );
    metric(
        "flr_cache_resident_bytes",
        "gauge",
        "Bytes of decoded frames the daemon's one memory cache holds, for all its mounts.",
        &one(cache.resident_bytes() as u64),
    );
    metric(
        "flr_cache_capacity_bytes",
        "gauge",
        "The memory cache's bound (settings.cache_size), shared by all mounts.",
        &one(cache.capacity() as u64),
    );
    metric(
        "flr_frame_fetch_requests_total",
        "counter",
        "Range requests the mounts sent to repositories for frames.",
        &one(reads.fetch_requests),
    );
    metric(
        "flr_frames_fetched_total",
        "counter",
        "Frames the mounts fetched from repositories.",
        &one(reads.frames_fetched),
    );
    metric(
        "flr_frames_merged_total",
        "counter",
        "Fetched frames that shared a range request with a nearby frame.",
        &one(reads.frames_merged),
    );
    metric(
        "flr_readahead_frames_total",
        "counter",
        "Frames fetched ahead of sequential readers.",
        &one(reads.readahead_frames),
    );
    if let Some(d) = &daemon.disk_cache {
        let c = &d.counters;
        for (name, help, v) in [
            (
                "flr_disk_cache_hits_total",
                "Frames served from the disk cache.",
                c.hits.load(Relaxed),
            ),
            (
                "flr_disk_cache_misses_total",
                "Frames the disk cache did not hold (or held damaged).",
                c.misses.load(Relaxed),
            ),
            (
                "flr_disk_cache_evictions_total",
                "Frames evicted from the disk cache to stay within its bound.",
                c.evictions.load(Relaxed),
            ),
            (
                "flr_disk_cache_damaged_total",
                "Disk cache files found damaged, dropped and fetched again.",
                c.damaged.load(Relaxed),
            ),
            (
                "flr_disk_cache_skipped_total",
                "Fetched frames not kept because the disk cache's writer was 16 MiB behind.",
                c.skipped.load(Relaxed),
            ),
            (
                "flr_disk_cache_read_bytes_total",
                "Stored frame bytes served from the disk cache.",
                c.bytes_read.load(Relaxed),
            ),
            (
                "flr_disk_cache_written_bytes_total",
                "Stored frame bytes written into the disk cache.",
                c.bytes_written.load(Relaxed),
            ),
        ] {
            metric(name, "counter", help, &one(v));
        }
        metric(
            "flr_disk_cache_used_bytes",
            "gauge",
            "Bytes the disk cache holds (whole blocks).",
            &one(d.used_bytes()),
        );
        metric(
            "flr_disk_cache_capacity_bytes",
            "gauge",
            "The disk cache's bound.",
            &one(d.capacity()),
        );
    }
    metric(
        "flr_reads_total",
        "counter",
        "Read requests served by the mounts.",
        &one(reads.reads),
    );
    metric(
        "flr_bytes_served_total",
        "counter",
        "Bytes returned to readers of the mounts.",
        &one(reads.bytes_served),
    );
    metric(
        "flr_chunk_errors_total",
        "counter",
        "Reads failed because a chunk failed verification or could not be read.",
        &one(reads.chunk_errors),
    );
    let states = ["queued", "running", "done", "failed", "cancelled"];
    metric(
        "flr_restore_jobs",
        "gauge",
        "Restore jobs known to the daemon, by state.",
        &states
            .iter()
            .zip(jobs.by_state)
            .map(|(s, n)| (format!("{{state=\"{s}\"}}"), n))
            .collect::<Vec<_>>(),
    );
    metric(
        "flr_restore_bytes_total",
        "counter",
        "Bytes written by restore jobs.",
        &one(jobs.bytes),
    );
    // Requests to object stores, per repository: a user pays for each.
    let mut by_kind = Vec::new();
    let mut bytes = Vec::new();
    let mut failed = Vec::new();
    for (name, handle) in &daemon.repos {
        let Some(c) = handle.requests() else {
            continue;
        };
        for (kind, n) in [
            ("get", c.get),
            ("range_get", c.range_get),
            ("put", c.put),
            ("list", c.list),
            ("head", c.head),
            ("delete", c.delete),
            ("other", c.other),
        ] {
            by_kind.push((format!("{{repository=\"{name}\",kind=\"{kind}\"}}"), n));
        }
        bytes.push((
            format!("{{repository=\"{name}\",direction=\"up\"}}"),
            c.bytes_up,
        ));
        bytes.push((
            format!("{{repository=\"{name}\",direction=\"down\"}}"),
            c.bytes_down,
        ));
        failed.push((format!("{{repository=\"{name}\"}}"), c.failed));
    }
    metric(
        "flr_store_requests_total",
        "counter",
        "Requests sent to an object-store repository, by kind (retries included).",
        &by_kind,
    );
    metric(
        "flr_store_request_failures_total",
        "counter",
        "Object-store requests answered with a server error or not answered.",
        &failed,
    );
    metric(
        "flr_store_bytes_total",
        "counter",
        "Body bytes sent to (up) and received from (down) an object-store repository.",
        &bytes,
    );
    // The histogram: cumulative buckets in seconds.
    let _ = writeln!(
        out,
        "# HELP flr_read_latency_seconds Time to serve one read request."
    );
    let _ = writeln!(out, "# TYPE flr_read_latency_seconds histogram");
    let mut cumulative = 0;
    for (i, n) in reads.latency_buckets.iter().enumerate() {
        cumulative += n;
        if i + 1 < LATENCY_BUCKETS {
            let le = (1u64 << i) as f64 / 1e6;
            let _ = writeln!(
                out,
                "flr_read_latency_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
    }
    let _ = writeln!(
        out,
        "flr_read_latency_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
    );
    let _ = writeln!(
        out,
        "flr_read_latency_seconds_sum {}",
        reads.latency_us_total as f64 / 1e6
    );
    let _ = writeln!(out, "flr_read_latency_seconds_count {cumulative}");
    out
}
