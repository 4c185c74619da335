//! Checking a repository: structure always, and with `read_data` every
//! stored chunk re-read, opened, decompressed and re-hashed. Damage is
//! reported by restore point and file, so an operator knows what is lost.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rayon::prelude::*;

use crate::backup::Progress;
use crate::error::Result;
use crate::ids::{ChunkId, IdSet, PackId};
use crate::repo::{index_key, pack_key, IndexEntry, Repository, INDEX_PREFIX, PACKS_PREFIX};

#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub restore_points: u64,
    pub packs: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// Problems with repository files, each naming the file.
    pub problems: Vec<String>,
    /// Packs no index file lists, with the way to index them. Not damage
    /// by itself: a backup killed between writing a pack and its index
    /// leaves one; only restore points using their chunks are damaged.
    pub unindexed_packs: Vec<String>,
    /// Damaged restore point -> damaged files in it.
    pub damaged: BTreeMap<String, Vec<String>>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.damaged.is_empty()
    }
}

/// A pack as its index file describes it: id, length, entries.
type PackListing = (PackId, u64, Vec<IndexEntry>);

const REPAIR_HINT: &str = "run `flr repair index` to rebuild index files from the packs";

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
    let mut indexed_packs = HashSet::new();
    for key in store.list(INDEX_PREFIX)? {
        match repo.read_index_file(&key) {
            Ok(file) => {
                indexed.extend(file.entries.iter().map(|e| e.id));
                indexed_packs.insert(file.pack);
                entries.push((file.pack, file.pack_len, file.entries));
            }
            Err(e) => report.problems.push(format!("{e}; {REPAIR_HINT}")),
        }
    }
    // Packs that no index file lists: their chunks exist but nothing can
    // find them until the index is rebuilt from the packs themselves.
    // Packs on a prune's pending list have no index file on purpose.
    let pending = crate::lock::pending_pack_set(repo)?;
    let mut unindexed = 0;
    for key in store.list(PACKS_PREFIX)? {
        match pack_id_of_key(&key) {
            Some(id) if indexed_packs.contains(&id) || pending.contains(&id) => {}
            Some(_) => {
                unindexed += 1;
                report.unindexed_packs.push(format!(
                    "{key}: no index file lists this pack; {REPAIR_HINT}"
                ));
            }
            None => report
                .problems
                .push(format!("{key}: not a pack name (not written by flr)")),
        }
    }
    // A missing or wrongly sized pack damages every chunk it holds, and
    // so the restore points using them, even without reading data.
    let mut bad = IdSet::default();
    let mut unreadable = HashSet::new();
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
            bad.extend(locs.iter().map(|l| l.id));
            unreadable.insert(*pack);
        }
    }
    report.packs = entries.len() as u64;

    // Re-read data: every chunk of every readable pack, on all cores. Each
    // worker holds one pack's bytes at a time (read, not mapped), so memory
    // and open files stay bounded however many packs there are.
    if read_data {
        let total: u64 = entries.iter().map(|e| e.1).sum();
        progress.total_bytes.store(total, Ordering::Relaxed);
        let results: Vec<(Vec<ChunkId>, Vec<String>, u64, u64)> = entries
            .par_iter()
            .filter(|(pack, _, _)| !unreadable.contains(pack))
            .map(|(pack, len, locs)| {
                let checked = check_pack(repo, pack, locs);
                progress.read_bytes.fetch_add(*len, Ordering::Relaxed);
                checked
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
                let why = if missing && unindexed > 0 {
                    "missing chunks: they may be in a pack without an index file"
                } else if missing {
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

/// The pack id a pack's key names, if it is one.
pub fn pack_id_of_key(key: &str) -> Option<PackId> {
    let name = key.strip_prefix(PACKS_PREFIX)?.split_once('/')?.1;
    let id = PackId::from_hex(name.strip_suffix(".pack")?)?;
    (pack_key(&id) == key).then_some(id)
}

/// Reads one pack whole and checks it: its hash against its name, its own
/// entry table against its index file, every frame and chunk. Returns the
/// damaged chunks, the problems, the chunks checked and their bytes.
fn check_pack(
    repo: &Repository,
    pack: &PackId,
    locs: &[IndexEntry],
) -> (Vec<ChunkId>, Vec<String>, u64, u64) {
    let key = pack_key(pack);
    let mut bad = Vec::new();
    let mut problems = Vec::new();
    let mut bytes = 0;
    let data = match repo.store().get(&key) {
        Ok(data) => data,
        Err(e) => {
            problems.push(e.to_string());
            return (locs.iter().map(|l| l.id).collect(), problems, 0, 0);
        }
    };
    if blake3::hash(&data).as_bytes() != &pack.0 {
        problems.push(format!("{key}: contents do not match the pack's hash"));
    }
    match repo.parse_pack(&key, &data) {
        Ok(own) if own == locs => {}
        Ok(_) => problems.push(format!(
            "{}: disagrees with the entry table of {key}; {REPAIR_HINT}",
            index_key(pack)
        )),
        Err(e) => problems.push(e.to_string()),
    }
    // Chunks of one frame share its offset and are listed together:
    // decode each frame once.
    for frame in locs.chunk_by(|a, b| a.offset == b.offset) {
        let first = &frame[0];
        let loc = first.loc(0);
        let raw = data
            .get(first.offset as usize..(first.offset as u64 + first.stored_len as u64) as usize);
        let decoded = match raw {
            Some(raw) => repo.decode_frame(&first.id, &loc, pack, raw),
            None => Err(crate::Error::malformed(
                &key,
                "a frame lies beyond the end of the pack",
            )),
        };
        match decoded {
            Err(e) => {
                problems.push(e.to_string());
                bad.extend(frame.iter().map(|e| e.id));
            }
            Ok(plain) => {
                for e in frame {
                    if let Err(err) = repo.chunk_in_frame(&e.id, &e.loc(0), pack, &plain) {
                        problems.push(err.to_string());
                        bad.push(e.id);
                    }
                }
            }
        }
        bytes += frame.iter().map(|e| e.raw_len as u64).sum::<u64>();
    }
    (bad, problems, locs.len() as u64, bytes)
}
