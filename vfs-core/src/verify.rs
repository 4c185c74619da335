//! Checking a repository: structure always, and with `read_data` every
//! stored chunk re-read, opened, decompressed and re-hashed. Damage is
//! reported by restore point and file, so an operator knows what is lost.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rayon::prelude::*;

use crate::backup::Progress;
use crate::error::Result;
use crate::format;
use crate::ids::{ChunkId, IdSet, PackId};
use crate::repo::{index_key, pack_key, ChunkLoc, Repository, INDEX_PREFIX};

#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub restore_points: u64,
    pub packs: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// Problems with repository files, each naming the file.
    pub problems: Vec<String>,
    /// Damaged restore point -> damaged files in it.
    pub damaged: BTreeMap<String, Vec<String>>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.damaged.is_empty()
    }
}

/// A pack as its index file describes it: id, length, chunk locations.
type PackListing = (PackId, u64, Vec<(ChunkId, ChunkLoc)>);

pub fn verify(
    repo: &Repository,
    read_data: bool,
    progress: &Arc<Progress>,
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let store = repo.store();

    // Index files, one by one, so one bad file does not hide the others.
    let mut entries: Vec<PackListing> = Vec::new();
    let mut indexed = IdSet::default();
    for key in store.list(INDEX_PREFIX)? {
        match repo.read_index_file(&key) {
            Ok(file) => {
                let locs = file
                    .entries
                    .iter()
                    .map(|e| {
                        indexed.insert(e.id);
                        (
                            e.id,
                            ChunkLoc {
                                pack: 0,
                                offset: e.offset,
                                stored_len: e.stored_len,
                                raw_len: e.raw_len,
                                flags: e.flags,
                                frame_offset: e.frame_offset,
                                frame_raw_len: e.frame_raw_len,
                            },
                        )
                    })
                    .collect();
                entries.push((file.pack, file.pack_len, locs));
            }
            Err(e) => report.problems.push(e.to_string()),
        }
    }
    // A missing or wrongly sized pack damages every chunk it holds, and
    // so the restore points using them, even without reading data.
    let mut bad = IdSet::default();
    let mut unreadable = std::collections::HashSet::new();
    for (pack, len, locs) in &entries {
        let key = pack_key(pack);
        let problem = match store.size(&key)? {
            None => Some(format!("{key}: missing (listed by {})", index_key(pack))),
            Some(n) if n != *len => Some(format!(
                "{key}: {n} bytes, its index says {len} (truncated or damaged)"
            )),
            Some(_) => None,
        };
        if let Some(p) = problem {
            report.problems.push(p);
            bad.extend(locs.iter().map(|l| l.0));
            unreadable.insert(*pack);
        }
    }
    report.packs = entries.len() as u64;

    // Re-read data: every chunk of every readable pack, on all cores.
    if read_data {
        let total: u64 = entries.iter().map(|e| e.1).sum();
        progress.total_bytes.store(total, Ordering::Relaxed);
        let results: Vec<(Vec<ChunkId>, Vec<String>, u64, u64)> = entries
            .par_iter()
            .filter(|(pack, _, _)| !unreadable.contains(pack))
            .map(|(pack, len, locs)| {
                let key = pack_key(pack);
                let mut bad = Vec::new();
                let mut problems = Vec::new();
                let mut bytes = 0;
                match store.get_range(&key, 0, *len as usize) {
                    Err(e) => {
                        problems.push(e.to_string());
                        bad.extend(locs.iter().map(|l| l.0));
                    }
                    Ok(data) => {
                        if let Err(e) = format::check_pack_header(&key, &data) {
                            problems.push(e.to_string());
                        }
                        if blake3::hash(&data).as_bytes() != &pack.0 {
                            problems.push(format!("{key}: contents do not match the pack's hash"));
                        }
                        // Chunks of one frame share its offset and are
                        // listed together: decode each frame once.
                        for frame in locs.chunk_by(|a, b| a.1.offset == b.1.offset) {
                            let (first, loc) = &frame[0];
                            let raw =
                                &data[loc.offset as usize..(loc.offset + loc.stored_len) as usize];
                            match repo.decode_frame(first, loc, pack, raw) {
                                Err(e) => {
                                    problems.push(e.to_string());
                                    bad.extend(frame.iter().map(|(id, _)| *id));
                                }
                                Ok(plain) => {
                                    for (id, loc) in frame {
                                        if let Err(e) = repo.chunk_in_frame(id, loc, pack, &plain) {
                                            problems.push(e.to_string());
                                            bad.push(*id);
                                        }
                                    }
                                }
                            }
                            bytes += frame.iter().map(|(_, l)| l.raw_len as u64).sum::<u64>();
                        }
                    }
                }
                progress.read_bytes.fetch_add(*len, Ordering::Relaxed);
                (bad, problems, locs.len() as u64, bytes)
            })
            .collect();
        for (b, p, n, bytes) in results {
            bad.extend(b);
            report.problems.extend(p);
            report.chunks_checked += n;
            report.bytes_checked += bytes;
        }
    }

    // Restore points: each must decode, and every chunk must be indexed
    // and (with read_data) sound.
    for name in repo.list_restore_points(None)? {
        report.restore_points += 1;
        let manifest = match repo.load_manifest(&name) {
            Ok(m) => m,
            Err(e) => {
                report.problems.push(e.to_string());
                report
                    .damaged
                    .entry(name.to_string())
                    .or_default()
                    .push("(manifest unreadable)".into());
                continue;
            }
        };
        for (i, node) in manifest.nodes.iter().enumerate() {
            let mut missing = false;
            let mut corrupt = false;
            for id in node.content.ids() {
                if !indexed.contains(&id) {
                    missing = true;
                } else if bad.contains(&id) {
                    corrupt = true;
                }
            }
            if missing || corrupt {
                let why = if missing {
                    "missing chunks"
                } else {
                    "damaged chunks"
                };
                report
                    .damaged
                    .entry(name.to_string())
                    .or_default()
                    .push(format!("{} ({why})", manifest.path_of(i)));
            }
        }
    }
    Ok(report)
}
