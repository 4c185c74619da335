//! Garbage collection (`flr prune`): packs that hold nothing any restore
//! point uses are deleted, packs that hold mostly unused bytes are
//! repacked, and both only through the delayed deletion of [`crate::lock`],
//! so that backups may run meanwhile.
//!
//! One run, in order:
//! 1. take the prune lock; remove stale locks;
//! 2. finish pending lists a killed prune left half-done (steps 2 and 3
//!    of [`crate::lock`]);
//! 3. mark: every chunk named by every manifest;
//! 4. decide the pending lists whose writers are all gone: a pack is
//!    rescued if it holds a marked chunk that no pack outside the pending
//!    lists holds, and deleted otherwise (its index file first, then the
//!    pack, then the list);
//! 5. sweep: packs with no marked chunk are unused; while the unused bytes
//!    left in the other packs exceed `max_unused` of all pack bytes, the
//!    packs with the largest unused share are repacked (their marked
//!    chunks stored again through a [`Mover`], which recompresses them);
//! 6. put the unused and repacked packs on a new pending list, deleting
//!    them at once if no writer lock existed at step 1 nor after their
//!    index files were removed.
//!
//! A `kill -9` at any point leaves a repository that verifies clean: index
//! files go before their packs, a pending list before its index files,
//! and a rerun picks up where the last one stopped.

use std::collections::HashSet;

use serde::Serialize;

use crate::chunker::ChunkBatch;
use crate::error::{Error, Result};
use crate::format;
use crate::ids::{IdSet, PackId};
use crate::ingest::{MetaShare, Mover};
use crate::lock::{
    list_locks, list_pending, pending_packs_key, pending_writers_key, remove_lock, FoundPending,
    LockGuard, LockKind, PendingPacks, PendingWriters,
};
use crate::manifest::BackupStats;
use crate::repo::{
    index_key, pack_key, IndexEntry, IndexFile, Repository, INDEX_PREFIX, PACKS_PREFIX,
};
use crate::verify::pack_id_of_key;

#[derive(Clone, Copy, Debug)]
pub struct PruneOptions {
    pub dry_run: bool,
    /// Share (0..=1) of all pack bytes that may stay unused before packs
    /// are repacked.
    pub max_unused: f64,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            dry_run: false,
            max_unused: 0.05,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub restore_points: u64,
    /// Packs in the repository when the run began, and their bytes.
    pub packs_total: u64,
    pub bytes_total: u64,
    /// Packs deleted by this run (of earlier pending lists, or at once).
    pub packs_deleted: u64,
    pub bytes_freed: u64,
    /// Packs on a pending list that waits for running writers.
    pub packs_pending: u64,
    pub bytes_pending: u64,
    /// Packs repacked, the bytes of those packs, and the bytes of marked
    /// chunks stored again.
    pub packs_repacked: u64,
    pub bytes_repacked: u64,
    pub bytes_rewritten: u64,
    /// Pending packs kept because a restore point written since uses them.
    pub packs_rescued: u64,
    /// Unused bytes left in packs that were kept.
    pub bytes_unused_kept: u64,
    pub stale_locks_removed: Vec<String>,
    /// The writer locks that pending lists wait for.
    pub waiting_for: Vec<String>,
}

/// One indexed pack as the sweep sees it.
struct PackUse {
    id: PackId,
    len: u64,
    entries: Vec<IndexEntry>,
    used_bytes: u64,
    frame_bytes: u64,
}

pub fn prune(repo: &Repository, opts: &PruneOptions) -> Result<PruneReport> {
    let lock = LockGuard::acquire(repo, LockKind::Prune, Vec::new())?;
    let store = repo.store();
    let mut report = PruneReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };

    // 1. Locks.
    let mut writers_at_start = Vec::new();
    for l in list_locks(repo)? {
        if l.id == lock.id() {
            continue;
        }
        if l.stale {
            report.stale_locks_removed.push(l.describe());
            if !opts.dry_run {
                remove_lock(store.as_ref(), &l)?;
            }
        } else if l.kind() != Some(LockKind::Reader) {
            writers_at_start.push(l.id.clone());
        }
    }

    // 2. Pending lists left without their writers.
    let mut pendings = list_pending(repo)?;
    if !opts.dry_run {
        for p in pendings.iter_mut().filter(|p| p.writers.is_none()) {
            lock.check()?;
            p.writers = Some(take_effect(repo, &lock, &p.id, &p.packs)?);
        }
    }
    let pending_packs: HashSet<PackId> = pendings
        .iter()
        .flat_map(|p| p.packs.packs.iter().map(|(id, _)| *id))
        .collect();

    // 3. Mark. Manifests are listed after step 1 saw the writer locks: a
    // writer whose lock is gone has written its manifest or never will.
    let live: HashSet<String> = list_locks(repo)?
        .into_iter()
        .filter(|l| !l.stale)
        .map(|l| l.id)
        .collect();
    let mut marked = IdSet::default();
    for name in repo.list_restore_points(None)? {
        let manifest = repo.load_manifest(&name).map_err(|e| {
            Error::InvalidInput(format!(
                "cannot read restore point {name} ({e}); nothing was pruned, since its chunks are unknown"
            ))
        })?;
        report.restore_points += 1;
        for node in &manifest.nodes {
            marked.extend(node.content.ids());
        }
    }

    // The indexed packs, and every chunk a pack outside the pending lists
    // holds.
    let mut indexed: Vec<PackUse> = Vec::new();
    let mut elsewhere = IdSet::default();
    let mut indexed_ids = HashSet::new();
    for key in store.list(INDEX_PREFIX)? {
        let file = match repo.read_index_file(&key) {
            Ok(f) => f,
            Err(Error::NotFound(_)) => continue,
            Err(e) => {
                return Err(Error::InvalidInput(format!(
                    "{e}; run `flr repair index` before pruning"
                )))
            }
        };
        indexed_ids.insert(file.pack);
        if pending_packs.contains(&file.pack) {
            continue;
        }
        if store.size(&pack_key(&file.pack))? != Some(file.pack_len) {
            // Verify reports it; its chunks do not count as stored.
            continue;
        }
        elsewhere.extend(file.entries.iter().map(|e| e.id));
        indexed.push(pack_use(file, &marked));
    }
    let mut all_packs = Vec::new();
    for key in store.list(PACKS_PREFIX)? {
        if let Some(id) = pack_id_of_key(&key) {
            all_packs.push(id);
        }
    }
    report.packs_total = all_packs.len() as u64;

    // 4. Earlier pending lists whose writers are all gone.
    for p in &pendings {
        let waits: Vec<&String> = p
            .writers
            .iter()
            .flat_map(|w| w.writers.iter())
            .filter(|w| live.contains(*w))
            .collect();
        let bytes: u64 = p.packs.packs.iter().map(|(_, len)| *len).sum();
        if !waits.is_empty() || p.writers.is_none() {
            report.packs_pending += p.packs.packs.len() as u64;
            report.bytes_pending += bytes;
            report.waiting_for.extend(waits.into_iter().cloned());
            continue;
        }
        if opts.dry_run {
            report.packs_deleted += p.packs.packs.len() as u64;
            report.bytes_freed += bytes;
            continue;
        }
        lock.check()?;
        decide_pending(repo, p, &marked, &elsewhere, &mut report)?;
    }

    // 5. Sweep the packs outside the pending lists.
    let mut unused: Vec<(PackId, u64)> = Vec::new();
    for id in &all_packs {
        if pending_packs.contains(id) || indexed_ids.contains(id) {
            continue;
        }
        // A pack without an index file: a writer killed before writing
        // it, or one writing it now (the pending list waits for it).
        match repo.read_pack_table(id) {
            Ok((len, entries)) if !entries.iter().any(|e| marked.contains(&e.id)) => {
                unused.push((*id, len))
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("{}: {e}; left alone", pack_key(id)),
        }
    }
    let mut partly: Vec<&PackUse> = Vec::new();
    for p in &indexed {
        report.bytes_total += p.len;
        if p.used_bytes == 0 {
            unused.push((p.id, p.len));
        } else if p.used_bytes < p.frame_bytes {
            partly.push(p);
        }
    }
    report.bytes_total += unused
        .iter()
        .filter(|(id, _)| !indexed_ids.contains(id))
        .map(|(_, len)| *len)
        .sum::<u64>();
    let mut unused_kept: u64 = partly.iter().map(|p| p.frame_bytes - p.used_bytes).sum();
    let limit = (report.bytes_total as f64 * opts.max_unused.clamp(0.0, 1.0)) as u64;
    partly.sort_by(|a, b| {
        let share = |p: &PackUse| (p.frame_bytes - p.used_bytes) as f64 / p.frame_bytes as f64;
        share(b).total_cmp(&share(a))
    });
    let mut repack: Vec<&PackUse> = Vec::new();
    for p in partly {
        if unused_kept <= limit {
            break;
        }
        unused_kept -= p.frame_bytes - p.used_bytes;
        repack.push(p);
    }
    report.bytes_unused_kept = unused_kept;
    report.packs_repacked = repack.len() as u64;
    report.bytes_repacked = repack.iter().map(|p| p.len).sum();
    report.bytes_rewritten = repack.iter().map(|p| p.used_bytes).sum();

    if opts.dry_run {
        report.packs_deleted += (unused.len() + repack.len()) as u64;
        report.bytes_freed += unused.iter().map(|(_, l)| *l).sum::<u64>() + report.bytes_repacked;
        return Ok(report);
    }

    if !repack.is_empty() {
        lock.check()?;
        report.bytes_rewritten = repack_packs(repo, &repack, &marked)?;
    }

    // 6. A new pending list.
    let mut doomed: Vec<(PackId, u64)> = unused;
    doomed.extend(repack.iter().map(|p| (p.id, p.len)));
    if !doomed.is_empty() {
        lock.check()?;
        let id = crate::crypto::random_hex(12);
        let packs = PendingPacks {
            time: crate::lock::now(),
            packs: doomed.clone(),
        };
        store.put(
            &pending_packs_key(&id),
            &repo.encode_meta(format::PENDING_MAGIC, &packs),
        )?;
        let writers = take_effect(repo, &lock, &id, &packs)?;
        let bytes: u64 = doomed.iter().map(|(_, l)| *l).sum();
        if writers_at_start.is_empty() && writers.writers.is_empty() {
            let found = FoundPending {
                id,
                packs,
                writers: Some(writers),
            };
            // Nothing reachable is in these packs (they were marked after
            // the manifests were listed, and no writer has run since).
            delete_pending(repo, &found, &mut report)?;
        } else {
            report.packs_pending += doomed.len() as u64;
            report.bytes_pending += bytes;
            report.waiting_for.extend(writers.writers);
        }
    }
    report.waiting_for.sort();
    report.waiting_for.dedup();
    repo.reload_index()?;
    Ok(report)
}

fn pack_use(file: IndexFile, marked: &IdSet) -> PackUse {
    let mut used_bytes = 0;
    let mut frame_bytes = 0;
    for frame in file.entries.chunk_by(|a, b| a.offset == b.offset) {
        let len = frame[0].stored_len as u64;
        frame_bytes += len;
        if frame.iter().any(|e| marked.contains(&e.id)) {
            used_bytes += len;
        }
    }
    PackUse {
        id: file.pack,
        len: file.pack_len,
        entries: file.entries,
        used_bytes,
        frame_bytes,
    }
}

/// Steps 2 and 3 of [`crate::lock`]: removes the index files of a pending
/// list's packs, then records the writer locks that exist now.
fn take_effect(
    repo: &Repository,
    lock: &LockGuard,
    id: &str,
    packs: &PendingPacks,
) -> Result<PendingWriters> {
    for (pack, _) in &packs.packs {
        repo.store().delete(&index_key(pack))?;
    }
    let writers = PendingWriters {
        writers: list_locks(repo)?
            .into_iter()
            .filter(|l| !l.stale && l.id != lock.id() && l.kind() != Some(LockKind::Reader))
            .map(|l| l.id)
            .collect(),
    };
    repo.store().put(
        &pending_writers_key(id),
        &repo.encode_meta(format::PENDING_WRITERS_MAGIC, &writers),
    )?;
    Ok(writers)
}

/// Rescues the packs of a pending list that hold marked chunks found
/// nowhere else, and deletes the rest.
fn decide_pending(
    repo: &Repository,
    p: &FoundPending,
    marked: &IdSet,
    elsewhere: &IdSet,
    report: &mut PruneReport,
) -> Result<()> {
    let mut keep = HashSet::new();
    for (pack, _) in &p.packs.packs {
        let (len, entries) = match repo.read_pack_table(pack) {
            Ok(t) => t,
            // Deleted by a run that was stopped before it removed the list.
            Err(Error::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        if entries
            .iter()
            .any(|e| marked.contains(&e.id) && !elsewhere.contains(&e.id))
        {
            repo.put_index_file(&IndexFile {
                pack: *pack,
                pack_len: len,
                entries,
            })?;
            tracing::info!(
                "{}: used by a restore point written since it was listed; kept",
                pack_key(pack)
            );
            keep.insert(*pack);
            report.packs_rescued += 1;
        }
    }
    let rest = FoundPending {
        id: p.id.clone(),
        packs: PendingPacks {
            time: p.packs.time,
            packs: p
                .packs
                .packs
                .iter()
                .filter(|(id, _)| !keep.contains(id))
                .copied()
                .collect(),
        },
        writers: None,
    };
    delete_pending(repo, &rest, report)
}

/// Deletes a pending list's packs (index file first), then the list.
fn delete_pending(repo: &Repository, p: &FoundPending, report: &mut PruneReport) -> Result<()> {
    let store = repo.store();
    for (pack, len) in &p.packs.packs {
        store.delete(&index_key(pack))?;
        if store.size(&pack_key(pack))?.is_some() {
            store.delete(&pack_key(pack))?;
            report.packs_deleted += 1;
            report.bytes_freed += len;
        }
    }
    store.delete(&pending_writers_key(&p.id))?;
    store.delete(&pending_packs_key(&p.id))
}

/// Stores the marked chunks of `packs` again, through a mover whose
/// deduplication ignores those packs; returns the bytes written.
fn repack_packs(repo: &Repository, packs: &[&PackUse], marked: &IdSet) -> Result<u64> {
    let ids: Vec<PackId> = packs.iter().map(|p| p.id).collect();
    let mut stats = BackupStats::default();
    let share = MetaShare::default();
    Mover::scoped(repo, |mover| {
        repo.index().write().exclude_from_dedup(&ids);
        for p in packs {
            let mut batch = ChunkBatch {
                data: Vec::new(),
                chunks: Vec::new(),
                offset: 0,
            };
            let mut seen = HashSet::new();
            for frame in p.entries.chunk_by(|a, b| a.offset == b.offset) {
                if !frame.iter().any(|e| marked.contains(&e.id)) {
                    continue;
                }
                let loc = frame[0].loc(0);
                let plain = repo.read_frame_at(&frame[0].id, &loc, &p.id)?;
                for e in frame.iter().filter(|e| marked.contains(&e.id)) {
                    if !seen.insert(e.id) {
                        continue;
                    }
                    let bytes = repo.chunk_in_frame(&e.id, &e.loc(0), &p.id, &plain)?;
                    let start = batch.data.len();
                    batch.data.extend_from_slice(bytes);
                    batch.chunks.push(start..batch.data.len());
                }
                if batch.data.len() >= crate::ingest::BATCH_BYTES {
                    mover.store(&batch, &mut stats, &share)?;
                    batch.data.clear();
                    batch.chunks.clear();
                }
            }
            if !batch.chunks.is_empty() {
                mover.store(&batch, &mut stats, &share)?;
            }
        }
        mover.flush()?;
        // The copies must be findable before the originals' index files go.
        mover.check_lock()
    })?;
    Ok(stats.new_chunk_bytes + share.bytes())
}
