//! Copying restore points from one repository to another (an archive copy).
//!
//! A copy sends only the chunks the destination lacks, through the
//! destination's own write path ([`Mover`]): chunks are compressed and
//! sealed again with its levels and its key, and its packs and index files
//! are written create-only as a backup writes them. The manifest is written
//! last, under the restore point's own name, so a copy that stops halfway
//! leaves no visible restore point at the destination, and a rerun finds
//! the packs already written in the destination's index and sends nothing
//! twice. A pack the stopped copy wrote without its index file (it was
//! killed between the two writes, or with several uploads in flight) is
//! indexed from its own table by the rerun before it sends anything.
//!
//! Chunk ids are hashes keyed by each repository's id key when it is
//! encrypted, so the same bytes may have another id at the destination. If
//! both repositories hash alike, ids carry over and a chunk the destination
//! has is never read at the source. Otherwise every chunk is read once and
//! hashed with the destination's hasher, except where a restore point of
//! the same job copied earlier pairs the ids up: the source's and the
//! destination's manifests of one restore point list the same chunks in the
//! same order, so zipping them gives the map from one id to the other.
//!
//! Before a restore point is reported as copied it is verified at the
//! destination: its manifest is read back and compared, every chunk it
//! names is in the destination's index, and every chunk this copy read from
//! the source is read back from the destination and checked against its id.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::backup::Progress;
use crate::chunker::ChunkBatch;
use crate::error::{Error, Result};
use crate::format;
use crate::ids::{ChunkId, IdMap, IdSet};
use crate::ingest::{rescue_pending_packs, MetaShare, Mover, BATCH_BYTES};
use crate::manifest::{BackupStats, Content, Manifest, Node};
use crate::repo::{Repository, RestorePointName};

/// What copying one restore point did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CopyReport {
    pub restore_point: String,
    /// False if the destination had this restore point already.
    pub copied: bool,
    /// Chunk slots in the restore point's files (holes excluded).
    pub chunks: u64,
    /// Chunks read from the source (the others the destination had).
    pub chunks_read: u64,
    pub bytes_read: u64,
    /// Chunks the destination stored for the first time.
    pub new_chunks: u64,
    /// Bytes written to the destination: chunk frames, pack and index
    /// metadata, and the manifest.
    pub uploaded_bytes: u64,
    /// Chunks read back from the destination and checked against their id.
    pub verified_chunks: u64,
    pub duration_ms: u64,
}

/// Copies restore points in order; keeps the id map between them.
pub struct Copier<'a> {
    from: &'a Repository,
    to: &'a Repository,
    /// Whether both repositories give the same bytes the same id.
    same_ids: bool,
    /// Source id to destination id, for repositories that hash apart.
    map: IdMap<ChunkId>,
    /// Jobs whose earlier copies have been paired into `map`.
    paired: std::collections::HashSet<String>,
    /// Whether packs left without index files at the destination have
    /// been looked for (once per copy run).
    unindexed_done: bool,
}

/// Bytes hashed by both repositories to tell whether their ids agree.
const PROBE: &[u8] = b"flr: do these repositories name chunks alike?";

/// Chunks read from the source by one task: consecutive chunks of a file
/// mostly share a frame, and a thread keeps the frame it decoded last.
const READ_RUN: usize = 32;

impl<'a> Copier<'a> {
    pub fn new(from: &'a Repository, to: &'a Repository) -> Self {
        Copier {
            from,
            to,
            same_ids: from.hasher().id(PROBE) == to.hasher().id(PROBE),
            map: IdMap::default(),
            paired: Default::default(),
            unindexed_done: false,
        }
    }

    /// Copies one restore point, unless the destination has it already (in
    /// which case it is checked to be the same backup). `progress` counts
    /// the restore point's logical bytes; `cancel` stops between batches,
    /// with no manifest written.
    pub fn copy(
        &mut self,
        name: &RestorePointName,
        progress: &Progress,
        cancel: &AtomicBool,
    ) -> Result<CopyReport> {
        let started = Instant::now();
        let source = self.from.load_manifest(name)?;
        let mut report = CopyReport {
            restore_point: name.to_string(),
            ..Default::default()
        };
        if let Some(existing) = self.existing(name)? {
            same_backup(&source, &existing, true)?;
            if !self.same_ids {
                self.pair(&source, &existing);
            }
            report.chunks = count_chunks(&source);
            report.duration_ms = started.elapsed().as_millis() as u64;
            return Ok(report);
        }
        if !self.same_ids && self.paired.insert(name.job.clone()) {
            self.pair_earlier(name)?;
        }
        progress
            .total_bytes
            .store(source.nodes.iter().map(|n| n.size).sum(), Ordering::Relaxed);
        progress.read_bytes.store(0, Ordering::Relaxed);
        *progress.current.lock() = name.to_string();

        let to = self.to;
        let (manifest, read_here, stats, share, manifest_len) = Mover::scoped(to, |mover| {
            if !self.unindexed_done {
                mover.index_unindexed_packs()?;
                self.unindexed_done = true;
            }
            let mut send = Send {
                copier: self,
                mover,
                stats: BackupStats::default(),
                share: MetaShare::default(),
                report: &mut report,
                read_here: IdSet::default(),
                slots: Vec::new(),
                todo: Vec::new(),
                todo_bytes: 0,
                progress,
                cancel,
            };
            let manifest = send.run(&source)?;
            let (read_here, stats, share) = (send.read_here, send.stats, send.share);
            mover.flush()?;
            // As a backup commits: only while this writer's lock holds,
            // and with the index files of pending packs it uses restored.
            mover.check_lock()?;
            rescue_pending_packs(to, &manifest)?;
            let encoded = to.encode_meta(format::MANIFEST_MAGIC, &manifest);
            let key = to.new_manifest_key(&manifest);
            to.put_once(&key, &encoded, |old| {
                to.decode_meta::<Manifest>(&key, format::MANIFEST_MAGIC, old)
                    .is_ok_and(|old| old == manifest)
            })?;
            to.note_manifest_key(name, &key);
            to.merge_index_if_due();
            Ok((manifest, read_here, stats, share, encoded.len() as u64))
        })?;
        report.new_chunks = stats.new_chunks;
        report.uploaded_bytes = stats.new_chunk_bytes + share.bytes() + manifest_len;
        report.verified_chunks = self.verify(name, &manifest, &read_here)?;
        report.copied = true;
        report.duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            "copied {name}: {} chunks read, {} new, {} bytes written",
            report.chunks_read,
            report.new_chunks,
            report.uploaded_bytes
        );
        Ok(report)
    }

    /// The destination's manifest of `name`, if it has one.
    fn existing(&self, name: &RestorePointName) -> Result<Option<Manifest>> {
        if self.to.manifest_key(name)?.is_none() {
            return Ok(None);
        }
        self.to.load_manifest(name).map(Some)
    }

    /// Pairs ids up from the newest restore point of `name`'s job that
    /// both repositories hold.
    fn pair_earlier(&mut self, name: &RestorePointName) -> Result<()> {
        let there: std::collections::HashSet<RestorePointName> = self
            .to
            .list_restore_points(Some(&name.job))?
            .into_iter()
            .collect();
        let Some(common) = self
            .from
            .list_restore_points(Some(&name.job))?
            .into_iter()
            .rev()
            .find(|rp| rp != name && there.contains(rp))
        else {
            return Ok(());
        };
        let (a, b) = (
            self.from.load_manifest(&common)?,
            self.to.load_manifest(&common)?,
        );
        if same_backup(&a, &b, false).is_ok() {
            self.pair(&a, &b);
        }
        Ok(())
    }

    /// Records the id pairs of one restore point held at both ends.
    fn pair(&mut self, source: &Manifest, copied: &Manifest) {
        for (a, b) in source.nodes.iter().zip(&copied.nodes) {
            for (x, y) in a.content.ids().zip(b.content.ids()) {
                self.map.insert(x, y);
            }
        }
    }

    /// Checks the copy at the destination (see the module doc); returns
    /// how many chunks were read back.
    fn verify(
        &self,
        name: &RestorePointName,
        manifest: &Manifest,
        read_here: &IdSet,
    ) -> Result<u64> {
        let stored = self.to.load_manifest(name)?;
        if stored != *manifest {
            return Err(Error::Conflict(format!(
                "restore point {name} at {} differs from what was copied",
                self.to.store().location()
            )));
        }
        for node in &stored.nodes {
            for id in node.content.ids() {
                if self.to.locate(&id).is_none() {
                    return Err(Error::MissingChunk(id));
                }
            }
        }
        let ids: Vec<ChunkId> = read_here.iter().copied().collect();
        ids.par_iter()
            .try_for_each(|id| self.to.read_chunk(id).map(|_| ()))?;
        Ok(ids.len() as u64)
    }
}

/// One restore point on its way: the chunks still to read, and the new
/// chunk lists being filled in.
struct Send<'c, 'a, 'm> {
    copier: &'c mut Copier<'a>,
    mover: &'m Mover<&'a Repository>,
    stats: BackupStats,
    share: MetaShare,
    report: &'c mut CopyReport,
    /// Destination ids of every chunk read from the source.
    read_here: IdSet,
    /// Per node, its new chunk ids; `None` until known (and for holes).
    slots: Vec<Vec<Option<ChunkId>>>,
    /// Chunks to read: (node, slot, source id, length).
    todo: Vec<(usize, usize, ChunkId, u32)>,
    todo_bytes: usize,
    progress: &'c Progress,
    cancel: &'c AtomicBool,
}

impl Send<'_, '_, '_> {
    fn run(&mut self, source: &Manifest) -> Result<Manifest> {
        for (n, node) in source.nodes.iter().enumerate() {
            let chunks = node.content.chunks(node.size);
            self.slots.push(vec![None; chunks.len()]);
            for (slot, (id, _, len)) in chunks.into_iter().enumerate() {
                let Some(id) = id else {
                    self.progress
                        .read_bytes
                        .fetch_add(len as u64, Ordering::Relaxed);
                    continue;
                };
                self.report.chunks += 1;
                match self.known(&id) {
                    Some(there) => {
                        self.slots[n][slot] = Some(there);
                        self.progress
                            .read_bytes
                            .fetch_add(len as u64, Ordering::Relaxed);
                    }
                    None => {
                        self.todo.push((n, slot, id, len));
                        self.todo_bytes += len as usize;
                        if self.todo_bytes >= BATCH_BYTES {
                            self.send_batch()?;
                        }
                    }
                }
            }
        }
        self.send_batch()?;
        let nodes = source
            .nodes
            .iter()
            .zip(std::mem::take(&mut self.slots))
            .map(|(node, slots)| with_ids(node, slots))
            .collect();
        Ok(Manifest {
            nodes,
            ..source.clone()
        })
    }

    /// The destination's id of a source chunk, if the destination has (or
    /// this copy has just stored) that chunk.
    fn known(&self, id: &ChunkId) -> Option<ChunkId> {
        let there = if self.copier.same_ids {
            *id
        } else {
            *self.copier.map.get(id)?
        };
        // A chunk in a pack a prune is about to delete is sent again, as a
        // backup stores it again.
        (self.read_here.contains(&there) || self.copier.to.index().read().has_for_dedup(&there))
            .then_some(there)
    }

    /// Reads the chunks in `todo` from the source on all cores and stores
    /// them at the destination.
    fn send_batch(&mut self) -> Result<()> {
        if self.todo.is_empty() {
            return Ok(());
        }
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled("the copy was cancelled".into()));
        }
        let from = self.copier.from;
        let runs: Vec<Vec<Vec<u8>>> = self
            .todo
            .par_chunks(READ_RUN)
            .map(|run| {
                run.iter()
                    .map(|(_, _, id, len)| {
                        let bytes = from.read_chunk(id)?;
                        if bytes.len() != *len as usize {
                            return Err(Error::malformed(
                                format!("chunk {id}"),
                                format!("holds {} bytes, its file says {len}", bytes.len()),
                            ));
                        }
                        Ok(bytes)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut batch = ChunkBatch {
            data: Vec::with_capacity(self.todo_bytes),
            chunks: Vec::with_capacity(self.todo.len()),
            offset: 0,
        };
        for bytes in runs.into_iter().flatten() {
            let at = batch.data.len();
            batch.data.extend_from_slice(&bytes);
            batch.chunks.push(at..batch.data.len());
        }
        let stored = self.mover.store(&batch, &mut self.stats, &self.share)?;
        for ((n, slot, id, len), (there, _)) in self.todo.drain(..).zip(stored.chunks) {
            self.slots[n][slot] = there;
            if let Some(there) = there {
                self.read_here.insert(there);
                if !self.copier.same_ids {
                    self.copier.map.insert(id, there);
                }
            }
            self.report.chunks_read += 1;
            self.report.bytes_read += len as u64;
            self.progress
                .read_bytes
                .fetch_add(len as u64, Ordering::Relaxed);
        }
        self.todo_bytes = 0;
        Ok(())
    }
}

/// A node with its chunk list's ids replaced, lengths kept.
fn with_ids(node: &Node, slots: Vec<Option<ChunkId>>) -> Node {
    let content = match &node.content {
        Content::Empty => Content::Empty,
        Content::Fixed { chunk_size, .. } => Content::Fixed {
            chunk_size: *chunk_size,
            chunks: slots,
        },
        Content::Variable { chunks } => Content::Variable {
            chunks: slots
                .into_iter()
                .zip(chunks)
                .map(|(id, (_, len))| (id, *len))
                .collect(),
        },
    };
    Node {
        content,
        ..node.clone()
    }
}

fn count_chunks(m: &Manifest) -> u64 {
    m.nodes.iter().map(|n| n.content.ids().count() as u64).sum()
}

/// Checks that a restore point at the destination is the source's backup:
/// same time and host, and the same tree with the same chunk layout (ids
/// may differ between repositories that hash apart).
fn same_backup(source: &Manifest, there: &Manifest, hostname_check: bool) -> Result<()> {
    let differs = |what: &str| {
        Err(Error::Conflict(format!(
            "the destination has a restore point {} that is another backup ({what} differs)",
            source.full_name()
        )))
    };
    if source.time != there.time || (hostname_check && source.hostname != there.hostname) {
        return differs("time or host");
    }
    if source.nodes.len() != there.nodes.len() {
        return differs("its tree");
    }
    for (a, b) in source.nodes.iter().zip(&there.nodes) {
        let layout = |n: &Node| {
            n.content
                .chunks(n.size)
                .into_iter()
                .map(|(id, off, len)| (id.is_some(), off, len))
                .collect::<Vec<_>>()
        };
        let same = a.parent == b.parent
            && a.name == b.name
            && a.kind == b.kind
            && a.size == b.size
            && a.mode == b.mode
            && a.target == b.target
            && layout(a) == layout(b);
        if !same {
            return differs("its tree");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{self, BackupOptions, Source, StdinSource};
    use crate::store::{MemoryStore, ObjectStore as _};
    use std::sync::Arc;

    fn repo(password: Option<&[u8]>) -> Repository {
        let store = Arc::new(MemoryStore::new());
        Repository::init(store.as_ref(), password).unwrap();
        let pw = password.map(|p| p.to_vec());
        Repository::open(store, move || Ok(pw.unwrap())).unwrap()
    }

    fn back_up(repo: &Repository, data: Vec<u8>) -> RestorePointName {
        let source = Source::Stream(StdinSource {
            name: "db".into(),
            reader: Box::new(std::io::Cursor::new(data)),
            mode: 0o600,
            uid: 0,
            gid: 0,
        });
        let opts = BackupOptions {
            job: "j".into(),
            chunker: None,
            hostname: "h".into(),
            progress: Default::default(),
        };
        let m = backup::backup(repo, source, &opts).unwrap();
        RestorePointName {
            job: m.job,
            name: m.name,
        }
    }

    fn bytes_of(repo: &Repository, name: &RestorePointName) -> Vec<u8> {
        let m = repo.load_manifest(name).unwrap();
        let node = m.nodes.iter().find(|n| n.name == b"db").unwrap();
        let mut out = Vec::new();
        for (id, _, len) in node.content.chunks(node.size) {
            match id {
                Some(id) => out.extend(repo.read_chunk(&id).unwrap()),
                None => out.extend(std::iter::repeat_n(0, len as usize)),
            }
        }
        out
    }

    fn data(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 56) as u8
            })
            .collect()
    }

    fn copy_all(from: &Repository, to: &Repository) -> Vec<CopyReport> {
        let mut c = Copier::new(from, to);
        from.list_restore_points(None)
            .unwrap()
            .iter()
            .map(|rp| {
                c.copy(rp, &Progress::default(), &AtomicBool::new(false))
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn copies_between_keys_and_sends_only_what_is_new() {
        for (pa, pb) in [
            (None, None),
            (Some(&b"one"[..]), None),
            (None, Some(&b"two"[..])),
            (Some(&b"one"[..]), Some(&b"two"[..])),
        ] {
            let (a, b) = (repo(pa), repo(pb));
            let mut first = data(7, 3 << 20);
            let rp1 = back_up(&a, first.clone());
            let reports = copy_all(&a, &b);
            assert!(reports[0].copied && reports[0].new_chunks > 0);
            assert_eq!(bytes_of(&b, &rp1), first);

            // Change a little, back up again (a second later: one name per
            // second and job).
            std::thread::sleep(std::time::Duration::from_millis(1100));
            first[100_000..100_100].fill(9);
            let rp2 = back_up(&a, first.clone());
            let mut c = Copier::new(&a, &b);
            let r = c
                .copy(&rp2, &Progress::default(), &AtomicBool::new(false))
                .unwrap();
            assert!(r.copied);
            assert!(
                r.chunks_read * 10 < r.chunks,
                "an incremental copy read {} of {} chunks",
                r.chunks_read,
                r.chunks
            );
            assert_eq!(bytes_of(&b, &rp2), first);

            // Again: nothing to do.
            let again = copy_all(&a, &b);
            assert!(again.iter().all(|r| !r.copied && r.uploaded_bytes == 0));
        }
    }

    #[test]
    fn a_rerun_reuses_packs_left_without_index_files() {
        // A copy that stored its packs and was killed before their index
        // files and the manifest: the rerun indexes the packs and stores
        // nothing again, though the destination seals anew.
        let a = repo(None);
        let store = Arc::new(MemoryStore::new());
        Repository::init(store.as_ref(), Some(b"k")).unwrap();
        let open = || Repository::open(store.clone(), || Ok(b"k".to_vec())).unwrap();
        let rp = back_up(&a, data(11, 2 << 20));
        let first = open();
        let r = copy_all(&a, &first);
        assert!(r[0].new_chunks > 0);
        let packs = store.list(crate::repo::PACKS_PREFIX).unwrap();
        for key in store.list(crate::repo::INDEX_PREFIX).unwrap() {
            store.delete(&key).unwrap();
        }
        first.delete_restore_point(&rp).unwrap();

        let b = open();
        let again = copy_all(&a, &b);
        assert!(again[0].copied);
        assert_eq!(again[0].new_chunks, 0, "chunks were stored again");
        assert_eq!(store.list(crate::repo::PACKS_PREFIX).unwrap(), packs);
        assert_eq!(
            store.list(crate::repo::INDEX_PREFIX).unwrap().len(),
            packs.len()
        );
        assert_eq!(bytes_of(&b, &rp), data(11, 2 << 20));
    }

    #[test]
    fn cancel_writes_no_manifest() {
        let (a, b) = (repo(None), repo(None));
        let rp = back_up(&a, data(3, 1 << 20));
        let mut c = Copier::new(&a, &b);
        let err = c
            .copy(&rp, &Progress::default(), &AtomicBool::new(true))
            .unwrap_err();
        assert!(matches!(err, Error::Cancelled(_)));
        assert!(b.list_restore_points(None).unwrap().is_empty());
    }

    #[test]
    fn another_backup_of_the_same_name_is_a_conflict() {
        let (a, b) = (repo(None), repo(None));
        let rp = back_up(&a, data(3, 100_000));
        let m = a.load_manifest(&rp).unwrap();
        let other = Manifest {
            time: m.time + 5,
            ..m
        };
        b.store()
            .put(
                &b.new_manifest_key(&other),
                &b.encode_meta(format::MANIFEST_MAGIC, &other),
            )
            .unwrap();
        let mut c = Copier::new(&a, &b);
        let err = c
            .copy(&rp, &Progress::default(), &AtomicBool::new(false))
            .unwrap_err();
        assert!(matches!(err, Error::Conflict(_)), "{err}");
    }
}
