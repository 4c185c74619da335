//! Makes a repository with many chunks through the real write path, and
//! measures what the chunk index costs at that size.
//!
//! ```text
//! cargo run --release -p vfs-core --example index_scale -- make DIR CHUNKS
//! cargo run --release -p vfs-core --example index_scale -- measure DIR CHUNKS
//! ```
//!
//! `make` stores CHUNKS distinct 64-byte chunks (an 8-byte counter and
//! zeros, packs of about 8,000 of them) through the backup's own mover, in rounds
//! of at most 4 million, merging the index after each round as a backup
//! would. `measure` opens the repository in this process, prints the open
//! time and the resident memory after it, then times dedup lookups of
//! chunks that are stored and of chunks that are not.

use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use vfs_core::chunker::ChunkBatch;
use vfs_core::ids::ChunkId;
use vfs_core::ingest::{MetaShare, Mover};
use vfs_core::local_store::LocalStore;
use vfs_core::manifest::BackupStats;
use vfs_core::repo::{MergeMode, Repository};

const CHUNK: usize = 64;
const ROUND: u64 = 4_000_000;
const BATCH: u64 = 65_536;
const PACK_TARGET: usize = 96 << 10;

fn chunk(n: u64) -> [u8; CHUNK] {
    let mut c = [0u8; CHUNK];
    c[..8].copy_from_slice(&(n + 1).to_le_bytes());
    c
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn open(dir: &str) -> Repository {
    let store = Arc::new(LocalStore::open(std::path::Path::new(dir)).expect("store"));
    Repository::open(store, || Ok(Vec::new())).expect("open")
}

fn make(dir: &str, chunks: u64) {
    std::fs::create_dir_all(dir).expect("dir");
    let store = Arc::new(LocalStore::open(std::path::Path::new(dir)).expect("store"));
    Repository::init(store.as_ref(), None).expect("init");
    let repo = Repository::open(store, || Ok(Vec::new())).expect("open");
    // These chunks compress to a few bytes: a small pack target gives
    // packs of about 8,000 chunks, as 32 MiB packs of 4 KiB pages hold.
    repo.set_pack_target(PACK_TARGET);
    let started = Instant::now();
    let mut next = 0;
    while next < chunks {
        let end = (next + ROUND).min(chunks);
        Mover::scoped(&repo, |mover| {
            let share = MetaShare::default();
            let mut stats = BackupStats::default();
            let mut n = next;
            while n < end {
                let m = (n + BATCH).min(end);
                let mut data = Vec::with_capacity(((m - n) as usize) * CHUNK);
                let mut ranges = Vec::new();
                for k in n..m {
                    ranges.push(data.len()..data.len() + CHUNK);
                    data.extend_from_slice(&chunk(k));
                }
                let batch = ChunkBatch {
                    data,
                    chunks: ranges,
                    offset: n * CHUNK as u64,
                };
                mover.store(&batch, &mut stats, &share)?;
                n = m;
            }
            mover.flush()
        })
        .expect("store chunks");
        let merge = Instant::now();
        repo.merge_index(MergeMode::Incremental, None)
            .expect("merge");
        println!(
            "{end} chunks stored, merge {:.1} s, {:.0} s in all, rss {} MiB",
            merge.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64(),
            rss_kib() >> 10
        );
        next = end;
    }
}

fn measure(dir: &str, chunks: u64) {
    let rss_before = rss_kib();
    let t = Instant::now();
    let repo = open(dir);
    let open_s = t.elapsed().as_secs_f64();
    let rss_open = rss_kib();
    {
        let index = repo.index().read();
        let m = index.merged().expect("a merged index");
        println!(
            "open: {:.3} s; rss {} MiB before, {} MiB after; merged file {} entries of {} packs, {} packs not merged",
            open_s,
            rss_before >> 10,
            rss_open >> 10,
            m.len(),
            m.packs().len(),
            index.unmerged_packs()
        );
    }
    let lookups = 2_000_000u64;
    // Ids first, so the timing is of the lookups alone.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut present: Vec<ChunkId> = Vec::with_capacity(lookups as usize);
    for _ in 0..lookups {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        present.push(repo.hasher().id(&chunk(state % chunks)));
    }
    let absent: Vec<ChunkId> = (0..lookups)
        .map(|k| repo.hasher().id(&chunk(chunks + k)))
        .collect();
    let index = repo.index().read();
    for (what, ids, want) in [("stored", &present, true), ("new", &absent, false)] {
        for pass in ["cold", "warm"] {
            let t = Instant::now();
            let mut hits = 0u64;
            for id in ids.iter() {
                hits += index.has_for_dedup(id) as u64;
            }
            let s = t.elapsed().as_secs_f64();
            assert_eq!(hits == ids.len() as u64, want, "{what}: {hits} hits");
            // As the mover asks: on all cores, a batch at a time.
            let t = Instant::now();
            let par: usize = ids
                .par_chunks(65_536)
                .map(|b| b.iter().filter(|id| index.has_for_dedup(id)).count())
                .sum();
            let ps = t.elapsed().as_secs_f64();
            assert_eq!(par as u64, hits);
            println!(
                "dedup lookups of {what} chunks ({pass}): {:.2} million/s on one thread, {:.2} million/s on {} threads ({hits} of {} found); rss {} MiB",
                ids.len() as f64 / s / 1e6,
                ids.len() as f64 / ps / 1e6,
                rayon::current_num_threads(),
                ids.len(),
                rss_kib() >> 10
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: index_scale make|measure DIR CHUNKS";
    let (mode, dir, chunks) = match &args[1..] {
        [m, d, c] => (m.as_str(), d.as_str(), c.parse::<u64>().expect(usage)),
        _ => panic!("{usage}"),
    };
    match mode {
        "make" => make(dir, chunks),
        "measure" => measure(dir, chunks),
        _ => panic!("{usage}"),
    }
}
