//! Rebuilding index files from the packs themselves (`flr repair index`).
//!
//! Every pack carries its own entry table (sealed when the repository is
//! encrypted), so an index file is a copy that can always be made again. A
//! pack is the authority: an index file that is missing, unreadable or
//! disagrees with its pack's table is rewritten from it. Nothing here ever
//! deletes or changes a pack, and a pack whose table cannot be read is
//! reported and kept.
//!
//! A backup running at the same time is safe: it writes its pack before
//! the index file, and if repair wrote that index file first, the backup's
//! create-only write finds the same entries and accepts them.

use std::collections::HashMap;

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ids::PackId;
use crate::repo::{index_key, IndexFile, MergeMode, Repository, INDEX_PREFIX, PACKS_PREFIX};
use crate::verify::pack_id_of_key;

#[derive(Debug, Default, Serialize)]
pub struct RepairReport {
    /// Pack files found.
    pub packs: u64,
    /// Index files that matched their pack and were left alone.
    pub index_files_ok: u64,
    pub rebuilt: Vec<RebuiltIndex>,
    /// Packs whose own table could not be read: kept, but their chunks
    /// stay unindexed (a later backup stores them again).
    pub unreadable_packs: Vec<String>,
    /// Index files naming a pack that does not exist: kept, and reported
    /// by `verify` as missing packs.
    pub orphan_index_files: Vec<String>,
    /// Other files in the pack and index directories that are not flr's.
    pub foreign_files: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct RebuiltIndex {
    pub index_file: String,
    pub chunks: u64,
    /// Why it was rebuilt: missing, unreadable (with the error), or
    /// disagreeing with the pack.
    pub reason: String,
}

/// What was found for one index file.
enum Existing {
    Sound(IndexFile),
    Damaged(String),
}

pub fn repair_index(repo: &Repository) -> Result<RepairReport> {
    let store = repo.store();
    let mut report = RepairReport::default();
    let mut existing: HashMap<PackId, Existing> = HashMap::new();
    for key in store.list(INDEX_PREFIX)? {
        let Some(id) = key
            .strip_prefix(INDEX_PREFIX)
            .and_then(|n| n.strip_suffix(".idx"))
            .and_then(PackId::from_hex)
            .filter(|id| index_key(id) == key)
        else {
            report.foreign_files.push(key);
            continue;
        };
        let found = match repo.read_index_file(&key) {
            Ok(file) => Existing::Sound(file),
            Err(e) => Existing::Damaged(e.to_string()),
        };
        existing.insert(id, found);
    }
    let mut packs = Vec::new();
    for key in store.list(PACKS_PREFIX)? {
        match pack_id_of_key(&key) {
            Some(id) => packs.push(id),
            None => report.foreign_files.push(key),
        }
    }
    report.packs = packs.len() as u64;

    // Tables are small reads from the end of each pack: all cores.
    let outcomes: Vec<Result<Outcome>> = packs
        .par_iter()
        .map(|id| repair_one(repo, id, existing.get(id)))
        .collect();
    for outcome in outcomes {
        match outcome? {
            Outcome::Ok => report.index_files_ok += 1,
            Outcome::Rebuilt(r) => report.rebuilt.push(r),
            Outcome::Unreadable(why) => report.unreadable_packs.push(why),
        }
    }
    let present: std::collections::HashSet<PackId> = packs.into_iter().collect();
    let mut orphans: Vec<String> = existing
        .keys()
        .filter(|id| !present.contains(id))
        .map(index_key)
        .collect();
    orphans.sort();
    report.orphan_index_files = orphans;
    report
        .rebuilt
        .sort_by(|a, b| a.index_file.cmp(&b.index_file));
    report.unreadable_packs.sort();
    // The merged file was copied from index files, some perhaps wrong:
    // written again from the per-pack files as they are now.
    repo.merge_index(MergeMode::Rebuild, None)?;
    repo.reload_index()?;
    Ok(report)
}

enum Outcome {
    Ok,
    Rebuilt(RebuiltIndex),
    Unreadable(String),
}

fn repair_one(repo: &Repository, id: &PackId, existing: Option<&Existing>) -> Result<Outcome> {
    let (pack_len, entries) = match repo.read_pack_table(id) {
        Ok(t) => t,
        Err(e) if e.is_corruption() || matches!(e, Error::UnsupportedVersion { .. }) => {
            return Ok(Outcome::Unreadable(format!(
                "{e}; the pack is kept, its chunks stay unindexed"
            )))
        }
        Err(e) => return Err(e),
    };
    let file = IndexFile {
        pack: *id,
        pack_len,
        entries,
    };
    let key = index_key(id);
    let reason = match existing {
        Some(Existing::Sound(old)) if *old == file => return Ok(Outcome::Ok),
        Some(Existing::Sound(_)) => "it disagreed with the pack's own entry table".to_string(),
        Some(Existing::Damaged(why)) => format!("it was unreadable: {why}"),
        None => "it was missing".to_string(),
    };
    // The pack is the authority: a wrong index file goes, then the right
    // one is written create-only.
    if existing.is_some() {
        repo.store().delete(&key)?;
    }
    repo.put_index_file(&file)?;
    Ok(Outcome::Rebuilt(RebuiltIndex {
        index_file: key,
        chunks: file.entries.len() as u64,
        reason,
    }))
}
