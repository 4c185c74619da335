//! Writing into the repository from many streams at once.
//!
//! A [`Mover`] is the data mover shared by every stream of an ingest: each
//! stream cuts its own chunks (on its own thread, so one slow stream never
//! stalls another) and hands whole batches to [`Mover::store`], which
//! hashes them, compresses and seals the new chunks on the shared rayon
//! pool, and appends them to the one open pack. Full packs go to a writer
//! ([`Mover::run_writer`], on a thread of the owner's choosing) that makes
//! each pack and then its index file durable. The channel to it holds one
//! pack, so a slow disk slows the streams down instead of filling memory.
//!
//! [`FileWriter`] turns writes at any offset into a file's chunk list:
//! sequential writes are cut and stored as they arrive; a write into an
//! already stored range (a header patched at the end) reads the chunks it
//! touches back, patches them and stores them again, so the list stays open
//! until [`FileWriter::finish`]. [`TreeBuilder`] collects the nodes of a
//! restore point by path, and [`commit`] writes its manifest after
//! [`Mover::flush`] has made every chunk it names durable.

use std::collections::HashMap;
use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use rayon::prelude::*;

use crate::chunker::{self, ChunkBatch, ChunkerKind, CDC_MAX};
use crate::error::{Error, Result};
use crate::format::{self, CHUNK_ZSTD};
use crate::ids::{ChunkId, IdSet, PackId};
use crate::lock::{LockGuard, LockKind};
use crate::manifest::{timestamp_name, BackupStats, Content, Manifest, Node, NodeKind};
use crate::repo::{
    pack_key, IndexEntry, IndexFile, PackTable, Repository, RestorePointName, PACKS_PREFIX,
    PAGE_CHUNK_MAX,
};

/// Buffers of written packs kept for new ones: the writer holds one, the
/// channel one, and one is being filled.
const SPARE_PACKS: usize = 2;

/// Batch buffers of finished files kept for the next files.
const SPARE_TAILS: usize = 4;

/// Bytes a stream gathers before it cuts and stores them: large enough to
/// keep both cores busy between hand-offs, small enough that memory stays a
/// few batches per stream.
pub const BATCH_BYTES: usize = 4 << 20;

/// Reads a stream ahead on its own thread, in blocks, into a channel that
/// holds `depth` of them: reading (a pipe, standard input) overlaps with
/// chunking and storing, and memory stays `block * (depth + 2)`. Blocks
/// the reader has used go back to the thread, so no block is allocated
/// (nor its pages faulted in) more than once.
pub struct ReadAhead {
    rx: crossbeam_channel::Receiver<std::io::Result<Vec<u8>>>,
    spent: crossbeam_channel::Sender<Vec<u8>>,
    block: Vec<u8>,
    at: usize,
    done: bool,
}

impl ReadAhead {
    pub fn new(mut reader: Box<dyn std::io::Read + Send>, block: usize, depth: usize) -> Self {
        use std::io::Read;
        let (tx, rx) = crossbeam_channel::bounded(depth);
        let (spent, reuse) = crossbeam_channel::bounded::<Vec<u8>>(depth + 2);
        std::thread::spawn(move || loop {
            let mut buf = reuse
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(block));
            buf.clear();
            // `read_to_end` fills the spare capacity without zeroing it
            // first, and keeps what it read before a failure.
            let read = (&mut reader).take(block as u64).read_to_end(&mut buf);
            let got = buf.len();
            match read {
                Ok(_) => {
                    if (got > 0 && tx.send(Ok(buf)).is_err()) || got < block {
                        return;
                    }
                }
                Err(e) => {
                    // The bytes before the failure first, so that it is
                    // reported where it happened.
                    if got > 0 && tx.send(Ok(buf)).is_err() {
                        return;
                    }
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        });
        ReadAhead {
            rx,
            spent,
            block: Vec::new(),
            at: 0,
            done: false,
        }
    }
}

impl std::io::Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.block.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(b)) => {
                    let used = std::mem::replace(&mut self.block, b);
                    if used.capacity() > 0 {
                        let _ = self.spent.try_send(used);
                    }
                    self.at = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = out.len().min(self.block.len() - self.at);
        out[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Which restore point a stored byte counts for: packs are shared by every
/// stream, so the bytes of a pack's header, table and index file are split
/// between the streams whose frames it holds.
#[derive(Clone, Default)]
pub struct MetaShare(Arc<AtomicU64>);

impl MetaShare {
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The most a pack buffer starts with: the largest pack size a store asks
/// for (S3's 64 MiB); a larger target, as tests set, grows its buffer.
const MAX_PACK_BUFFER: usize = 64 << 20;

/// A pack being filled.
struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<IndexEntry>,
    /// Frame bytes per stream, to split the pack's metadata.
    owners: Vec<(MetaShare, u64)>,
}

impl PackBuilder {
    /// A pack in `spare`'s buffer, if there is one: a fresh 33 MiB buffer
    /// per pack is a page fault for every page it fills.
    fn new(target: usize, spare: &mut Vec<Vec<u8>>) -> Self {
        let mut buf = spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(target.min(MAX_PACK_BUFFER) + (1 << 20)));
        buf.clear();
        buf.extend_from_slice(&format::pack_header());
        PackBuilder {
            buf,
            entries: Vec::new(),
            owners: Vec::new(),
        }
    }

    fn credit(&mut self, share: &MetaShare, bytes: u64) {
        match self
            .owners
            .iter_mut()
            .find(|(s, _)| Arc::ptr_eq(&s.0, &share.0))
        {
            Some((_, b)) => *b += bytes,
            None => self.owners.push((share.clone(), bytes)),
        }
    }
}

struct State {
    pack: PackBuilder,
    /// Chunks claimed by a stream and not yet in the repository's index:
    /// each new chunk is stored once, however many streams meet it.
    pending: IdSet,
    /// `store` calls between claiming chunks and appending them, by the
    /// ticket each drew when it began. A flush waits for the ones that
    /// began before it, so it never seals a pack that lacks a chunk claimed
    /// before it, yet is not held up by streams that go on storing.
    next_ticket: u64,
    active: std::collections::BTreeSet<u64>,
    /// Packs handed to the writer, and packs it has made durable.
    sent: u64,
    written: u64,
    /// The writer's first error: every later call fails with it, so a full
    /// disk stops every stream and commits nothing.
    failure: Option<String>,
    closed: bool,
    /// Buffers of written packs, for the next packs.
    spare_packs: Vec<Vec<u8>>,
}

/// The shared data mover of an ingest; `R` is how it holds the repository
/// (`&Repository` inside a scope, `Arc<Repository>` for a mount).
pub struct Mover<R: Deref<Target = Repository>> {
    repo: R,
    state: Mutex<State>,
    /// Batch buffers of finished files, for the next files' tails.
    spare_tails: Mutex<Vec<Vec<u8>>>,
    changed: Condvar,
    pack_tx: crossbeam_channel::Sender<PackBuilder>,
    pack_rx: crossbeam_channel::Receiver<PackBuilder>,
    /// This ingest's writer lock, taken before the index was read.
    lock: LockGuard,
}

/// What one `store` call found.
pub struct Stored {
    /// Per chunk: its id (`None` for an all-zero chunk, a hole) and length.
    pub chunks: Vec<(Option<ChunkId>, u32)>,
}

impl<R: Deref<Target = Repository>> Mover<R> {
    /// Takes a writer lock, then re-reads the index, so that nothing a
    /// prune has listed for deletion since is reused (see [`crate::lock`]).
    pub fn new(repo: R) -> Result<Self> {
        let lock = LockGuard::acquire(&repo, LockKind::Writer, Vec::new())?;
        repo.reload_index()?;
        let target = repo.pack_target();
        let (pack_tx, pack_rx) = crossbeam_channel::bounded(1);
        Ok(Mover {
            repo,
            state: Mutex::new(State {
                pack: PackBuilder::new(target, &mut Vec::new()),
                pending: IdSet::default(),
                next_ticket: 0,
                active: Default::default(),
                sent: 0,
                written: 0,
                failure: None,
                closed: false,
                spare_packs: Vec::new(),
            }),
            spare_tails: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            pack_tx,
            pack_rx,
            lock,
        })
    }

    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// Fails unless this ingest's writer lock still holds (call before
    /// writing a manifest).
    pub fn check_lock(&self) -> Result<()> {
        self.lock.check()
    }

    /// Runs `f` with a mover whose writer runs on a scoped thread; the
    /// writer is closed when `f` returns, panics included (call
    /// [`Mover::flush`] inside `f` for the packs to be written).
    pub fn scoped<T>(repo: R, f: impl FnOnce(&Mover<R>) -> Result<T>) -> Result<T>
    where
        R: Sync,
    {
        struct CloseOnDrop<'m, R: Deref<Target = Repository>>(&'m Mover<R>);
        impl<R: Deref<Target = Repository>> Drop for CloseOnDrop<'_, R> {
            fn drop(&mut self) {
                self.0.close();
            }
        }
        let mover = Mover::new(repo)?;
        std::thread::scope(|s| {
            s.spawn(|| mover.run_writer());
            let _close = CloseOnDrop(&mover);
            f(&mover)
        })
    }

    /// Writes full packs until [`Mover::close`]; run it on its own thread.
    /// After a failed write it keeps draining (and dropping) packs so that
    /// no stream blocks on the channel; the failure is reported to them.
    /// Packs go out on as many threads as the store takes writes at once
    /// ([`crate::store::ObjectStore::write_concurrency`]): one for a local
    /// disk, several for an object store, where each write waits a round
    /// trip. Memory stays bounded: one pack in the channel and one per
    /// writing thread.
    pub fn run_writer(&self)
    where
        R: Sync,
    {
        let lanes = self.repo.store().write_concurrency().max(1);
        if lanes == 1 {
            self.write_lane();
        } else {
            std::thread::scope(|s| {
                for _ in 0..lanes {
                    s.spawn(|| self.write_lane());
                }
            });
        }
    }

    fn write_lane(&self) {
        loop {
            // The channel never disconnects (the mover holds both ends):
            // a lane that has nothing to write looks every so often whether
            // the mover was closed and everything sent is written.
            let pack = match self
                .pack_rx
                .recv_timeout(std::time::Duration::from_millis(50))
            {
                Ok(pack) => pack,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    let st = self.state.lock();
                    if st.closed && st.written == st.sent {
                        break;
                    }
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            let failed = self.state.lock().failure.is_some();
            let ids: Vec<ChunkId> = pack.entries.iter().map(|e| e.id).collect();
            let outcome = if failed {
                Ok(None)
            } else {
                write_pack(&self.repo, pack)
            };
            let mut st = self.state.lock();
            st.written += 1;
            let outcome = outcome.map(|buf| {
                if let Some(buf) = buf.filter(|_| st.spare_packs.len() < SPARE_PACKS) {
                    st.spare_packs.push(buf);
                }
            });
            if outcome.is_ok() && !failed {
                // The index has them now.
                for id in &ids {
                    st.pending.remove(id);
                }
            }
            if let Err(e) = outcome {
                tracing::error!("writing a pack failed: {e}");
                st.failure.get_or_insert_with(|| e.to_string());
            }
            let done = st.closed && st.written == st.sent;
            self.changed.notify_all();
            drop(st);
            if done {
                break;
            }
        }
    }

    /// Ends the writer once it has written every pack handed to it (call
    /// after the last flush; the open pack is not written).
    pub fn close(&self) {
        let mut st = self.state.lock();
        st.closed = true;
        if st.written == st.sent {
            // The writer may be waiting for a pack that never comes: an
            // empty one wakes it and is dropped without a write.
            st.sent += 1;
            drop(st);
            let _ = self.pack_tx.send(PackBuilder {
                buf: Vec::new(),
                entries: Vec::new(),
                owners: Vec::new(),
            });
        }
    }

    fn failed(st: &State) -> Result<()> {
        match &st.failure {
            Some(msg) => Err(Error::Storage(msg.clone())),
            None => Ok(()),
        }
    }

    /// Hashes a batch, stores the chunks the repository lacks and returns
    /// every chunk's id; `stats` gets this batch's counts and `share` its
    /// part of the packs' metadata.
    pub fn store(
        &self,
        batch: &ChunkBatch,
        stats: &mut BackupStats,
        share: &MetaShare,
    ) -> Result<Stored> {
        let hasher = self.repo.hasher();
        // 1. Hash on all cores; holes (all-zero chunks) get no id.
        let ids: Vec<Option<ChunkId>> = batch
            .chunks
            .par_iter()
            .map(|r| {
                let data = &batch.data[r.clone()];
                (!is_zero(data)).then(|| hasher.id(data))
            })
            .collect();
        // 2. Claim the chunks nobody has stored or is storing.
        let mut new = Vec::new();
        let ticket;
        {
            let index = self.repo.index().read();
            // On all cores, before the state lock: a lookup that misses
            // the filter stays in memory, one that hits reads the merged
            // index file.
            let known: Vec<bool> = ids
                .par_iter()
                .map(|id| id.is_some_and(|id| index.has_for_dedup(&id)))
                .collect();
            let mut st = self.state.lock();
            Self::failed(&st)?;
            for (k, (r, id)) in batch.chunks.iter().zip(&ids).enumerate() {
                stats.chunks += 1;
                if let Some(id) = id {
                    stats.read_bytes += r.len() as u64;
                    if !known[k] && st.pending.insert(*id) {
                        new.push(k);
                    }
                }
            }
            ticket = st.next_ticket;
            st.next_ticket += 1;
            st.active.insert(ticket);
        }
        let chunks = batch
            .chunks
            .iter()
            .zip(&ids)
            .map(|(r, id)| (*id, r.len() as u32))
            .collect();
        let appended = self.append(batch, &ids, &new, stats, share);
        let mut st = self.state.lock();
        st.active.remove(&ticket);
        self.changed.notify_all();
        if appended.is_err() {
            // Release the claims, so another stream stores these chunks.
            for &k in &new {
                if let Some(id) = ids[k] {
                    st.pending.remove(&id);
                }
            }
        }
        appended?;
        Ok(Stored { chunks })
    }

    /// Compresses and seals the claimed chunks (runs of new pages become
    /// one frame each) on all cores, then appends them to the open pack.
    fn append(
        &self,
        batch: &ChunkBatch,
        ids: &[Option<ChunkId>],
        new: &[usize],
        stats: &mut BackupStats,
        share: &MetaShare,
    ) -> Result<()> {
        if new.is_empty() {
            return Ok(());
        }
        let config = self.repo.config();
        let (level, page_level) = (config.compression_level, config.page_compression_level);
        let keys = self.repo.keys();
        let frames = group_frames(batch, new);
        let encoded: Vec<(Vec<u8>, u8, u32)> = frames
            .par_iter()
            .map(|members| {
                let small = members
                    .iter()
                    .all(|&k| batch.chunks[k].len() <= PAGE_CHUNK_MAX);
                let level = if small { page_level } else { level };
                encode_frame(batch, members, level, keys)
            })
            .collect();
        let target = self.repo.pack_target();
        let mut st = self.state.lock();
        Self::failed(&st)?;
        for (members, (bytes, flags, frame_raw_len)) in frames.iter().zip(encoded) {
            let offset = st.pack.buf.len() as u32;
            let mut frame_offset = 0u32;
            for &k in members {
                let len = batch.chunks[k].len() as u32;
                st.pack.entries.push(IndexEntry {
                    id: ids[k].expect("claimed chunks have ids"),
                    offset,
                    stored_len: bytes.len() as u32,
                    raw_len: len,
                    flags,
                    frame_offset,
                    frame_raw_len,
                });
                frame_offset += len;
            }
            st.pack.buf.extend_from_slice(&bytes);
            st.pack.credit(share, bytes.len() as u64);
            stats.new_chunks += members.len() as u64;
            stats.new_chunk_bytes += bytes.len() as u64;
            if st.pack.buf.len() >= target {
                let next = PackBuilder::new(target, &mut st.spare_packs);
                let full = std::mem::replace(&mut st.pack, next);
                st.sent += 1;
                // The channel holds one pack: waiting here (lock released,
                // so other streams go on cutting and hashing) is the
                // back-pressure of a slow disk.
                let sent = parking_lot::MutexGuard::unlocked(&mut st, || self.pack_tx.send(full));
                if sent.is_err() {
                    return Err(Error::Storage("the pack writer has stopped".into()));
                }
                Self::failed(&st)?;
            }
        }
        Ok(())
    }

    /// Makes every chunk stored so far durable: waits for the `store` calls
    /// that began before it, seals the open pack and waits until the writer
    /// has written it and every pack before it. Call before committing a
    /// manifest; other streams may go on storing meanwhile.
    pub fn flush(&self) -> Result<()> {
        let mut st = self.state.lock();
        let began = st.next_ticket;
        while st.active.first().is_some_and(|&t| t < began) {
            self.changed.wait(&mut st);
        }
        Self::failed(&st)?;
        if !st.pack.entries.is_empty() {
            let target = self.repo.pack_target();
            let next = PackBuilder::new(target, &mut st.spare_packs);
            let full = std::mem::replace(&mut st.pack, next);
            st.sent += 1;
            let sent = parking_lot::MutexGuard::unlocked(&mut st, || self.pack_tx.send(full));
            if sent.is_err() {
                return Err(Error::Storage("the pack writer has stopped".into()));
            }
        }
        let goal = st.sent;
        while st.written < goal && st.failure.is_none() {
            self.changed.wait(&mut st);
        }
        Self::failed(&st)
    }

    /// An empty buffer for a file's tail, recycled if one is spare.
    fn tail_buffer(&self) -> Vec<u8> {
        self.spare_tails.lock().pop().unwrap_or_default()
    }

    /// Keeps a finished file's buffer for the next file.
    fn recycle_tail(&self, mut buf: Vec<u8>) {
        let mut spare = self.spare_tails.lock();
        if buf.capacity() > 0 && spare.len() < SPARE_TAILS {
            buf.clear();
            spare.push(buf);
        }
    }

    /// Indexes the packs that no index file lists and no prune has on a
    /// pending list, from their own entry tables, so that this ingest
    /// reuses their chunks: a writer killed between writing a pack and
    /// its index file leaves such a pack (on an object store, up to one
    /// per upload in flight). Returns how many were indexed.
    ///
    /// Safe beside a prune because it runs under this mover's writer lock
    /// and lists the pending lists after taking it: a prune that lists the
    /// pack later sees the lock and waits for it, one that listed it
    /// before has its list in place until the pack is gone (see
    /// [`crate::lock`]). A pack that cannot be read is left alone.
    pub fn index_unindexed_packs(&self) -> Result<usize> {
        let repo = &*self.repo;
        let pending = crate::lock::pending_pack_set(repo)?;
        let known: std::collections::HashSet<PackId> =
            repo.index().read().packs.iter().copied().collect();
        let mut indexed = 0;
        for key in repo.store().list(PACKS_PREFIX)? {
            let Some(pack) = crate::verify::pack_id_of_key(&key) else {
                continue;
            };
            if known.contains(&pack) || pending.contains(&pack) {
                continue;
            }
            let file = match repo.read_pack_table(&pack) {
                Ok((pack_len, entries)) => IndexFile {
                    pack,
                    pack_len,
                    entries,
                },
                Err(e) => {
                    tracing::warn!("{key}: {e}; not indexed");
                    continue;
                }
            };
            match repo.put_index_file(&file) {
                Ok(_) => {}
                // An index file of other meaning exists: verify reports it.
                Err(Error::Conflict(e)) => {
                    tracing::warn!("{e}: an index file exists for this pack; not indexed");
                    continue;
                }
                Err(e) => return Err(e),
            }
            repo.index().write().add_pack(&file);
            tracing::info!("indexed {key}, which an interrupted writer left without index file");
            indexed += 1;
        }
        Ok(indexed)
    }

    /// A chunk's bytes, whether or not its pack is written yet (a pending
    /// chunk's pack is flushed first).
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        if self.repo.locate(id).is_none() && self.state.lock().pending.contains(id) {
            self.flush()?;
        }
        self.repo.read_chunk(id)
    }
}

/// Seals a finished pack (appends its own entry table and the trailer),
/// writes it and then its index file, and credits each stream with its
/// share of the metadata. The pack is durable before the index that points
/// into it, and its id hashes the table too, so the same bytes cut into
/// other frames make another pack. Both writes are create-only: an existing
/// object is accepted only if identical in meaning (another backup wrote
/// the very same pack), never replaced.
fn write_pack(repo: &Repository, pack: PackBuilder) -> Result<Option<Vec<u8>>> {
    let PackBuilder {
        mut buf,
        entries,
        owners,
    } = pack;
    if entries.is_empty() {
        return Ok(None);
    }
    let frames = (buf.len() - format::PACK_HEADER_LEN) as u64;
    let table_at = buf.len();
    let table = PackTable { entries };
    buf.extend_from_slice(&repo.encode_meta(format::PACK_TABLE_MAGIC, &table));
    let table_len = (buf.len() - table_at) as u64;
    buf.extend_from_slice(&format::pack_trailer(table_len));
    let id = PackId(*blake3::hash(&buf).as_bytes());
    repo.put_once(&pack_key(&id), &buf, |old| old == buf.as_slice())?;
    let file = IndexFile {
        pack: id,
        pack_len: buf.len() as u64,
        entries: table.entries,
    };
    let idx_len = repo.put_index_file(&file)?;
    repo.index().write().add_pack(&file);
    let meta =
        format::PACK_HEADER_LEN as u64 + table_len + format::PACK_TRAILER_LEN as u64 + idx_len;
    let mut given = 0;
    for (k, (share, bytes)) in owners.iter().enumerate() {
        let part = if k + 1 == owners.len() {
            meta - given
        } else {
            meta * bytes / frames.max(1)
        };
        given += part;
        share.0.fetch_add(part, Ordering::Relaxed);
    }
    Ok(Some(buf))
}

thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(level: i32, data: &[u8]) -> Vec<u8> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((
                level,
                zstd::bulk::Compressor::new(level).expect("zstd context"),
            ));
        }
        c.as_mut()
            .unwrap()
            .1
            .compress(data)
            .expect("zstd compresses in memory")
    })
}

/// Groups new chunks (indices into the batch, in file order) into frames:
/// consecutive small chunks share a frame of up to [`format::FRAME_TARGET`]
/// bytes; a chunk larger than a page is a frame of its own.
fn group_frames(batch: &ChunkBatch, new: &[usize]) -> Vec<Vec<usize>> {
    let mut frames: Vec<Vec<usize>> = Vec::new();
    let mut open_bytes = 0;
    for &k in new {
        let len = batch.chunks[k].len();
        let joins =
            len <= PAGE_CHUNK_MAX && open_bytes > 0 && open_bytes + len <= format::FRAME_TARGET;
        if joins {
            frames.last_mut().expect("open frame").push(k);
            open_bytes += len;
        } else {
            frames.push(vec![k]);
            open_bytes = if len <= PAGE_CHUNK_MAX { len } else { 0 };
        }
    }
    frames
}

/// Compresses (unless that does not shrink it) and seals one frame;
/// returns (stored bytes, chunk flags, frame's plaintext length).
fn encode_frame(
    batch: &ChunkBatch,
    members: &[usize],
    level: i32,
    keys: Option<&crate::crypto::Keys>,
) -> (Vec<u8>, u8, u32) {
    // New chunks of one file mostly lie side by side in the batch: their
    // frame is then a slice of it, not a copy.
    let ranges = || members.iter().map(|&k| batch.chunks[k].clone());
    let contiguous = ranges()
        .zip(ranges().skip(1))
        .all(|(a, b)| a.end == b.start);
    let joined;
    let plain: &[u8] = if contiguous {
        let first = batch.chunks[members[0]].start;
        let last = batch.chunks[*members.last().expect("a frame has members")].end;
        &batch.data[first..last]
    } else {
        let mut v = Vec::with_capacity(ranges().map(|r| r.len()).sum());
        for r in ranges() {
            v.extend_from_slice(&batch.data[r]);
        }
        joined = v;
        &joined
    };
    let raw_len = plain.len() as u32;
    let mut stored = compress(level, plain);
    let mut flags = CHUNK_ZSTD;
    if stored.len() >= plain.len() {
        stored = plain.to_vec();
        flags = 0;
    }
    if let Some(k) = keys {
        stored = k.seal_meta(&stored);
    }
    (stored, flags, raw_len)
}

pub(crate) fn is_zero(data: &[u8]) -> bool {
    // Word-sized steps; the compiler vectorises this loop.
    let mut words = data.chunks_exact(8);
    words.all(|w| u64::from_ne_bytes(w.try_into().unwrap()) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// One file being written: its stored chunks, then the bytes not yet cut.
pub struct FileWriter {
    /// The file's name, for choosing a chunker from it and its first bytes.
    name: Vec<u8>,
    kind: Option<ChunkerKind>,
    chunks: Vec<(Option<ChunkId>, u32)>,
    /// File offset of each chunk's first byte.
    starts: Vec<u64>,
    /// Bytes covered by `chunks`; `tail` holds the bytes from here on.
    frontier: u64,
    tail: Vec<u8>,
    batch_bytes: usize,
    stats: BackupStats,
    share: MetaShare,
}

impl FileWriter {
    /// `chunker: None` chooses from the name and first bytes
    /// ([`ChunkerKind::choose`]); `batch_bytes` bounds the bytes held
    /// before they are stored.
    pub fn new(name: &[u8], chunker: Option<ChunkerKind>, batch_bytes: usize) -> Self {
        FileWriter {
            name: name.to_vec(),
            kind: chunker,
            chunks: Vec::new(),
            starts: Vec::new(),
            frontier: 0,
            tail: Vec::new(),
            batch_bytes: batch_bytes.max(1),
            stats: BackupStats::default(),
            share: MetaShare::default(),
        }
    }

    /// Counts the metadata of this file's packs into `share` (one per
    /// restore point) rather than a share of its own.
    pub fn with_share(mut self, share: MetaShare) -> Self {
        self.share = share;
        self
    }

    pub fn size(&self) -> u64 {
        self.frontier + self.tail.len() as u64
    }

    fn kind(&mut self) -> ChunkerKind {
        if self.kind.is_none() {
            let head = if self.frontier == 0 {
                &self.tail[..self.tail.len().min(100)]
            } else {
                &[][..]
            };
            self.kind = Some(ChunkerKind::choose(&self.name, head));
        }
        self.kind.expect("chosen above")
    }

    /// Cuts the tail into chunks and stores them; with `eof` false the last,
    /// possibly incomplete chunk stays in the tail.
    fn cut<R: Deref<Target = Repository>>(&mut self, mover: &Mover<R>, eof: bool) -> Result<()> {
        if self.tail.is_empty() {
            return Ok(());
        }
        let kind = self.kind();
        let ranges = chunker::cut(kind, &self.tail, eof);
        let used = ranges.last().map_or(0, |r| r.end);
        if used == 0 {
            return Ok(());
        }
        // The batch borrows the whole tail and gives it back: the bytes
        // past the last cut move to its front, so one buffer serves every
        // batch of the file (a fresh one per batch cost a page fault per
        // 4 KiB, and growing it a copy).
        let batch = ChunkBatch {
            data: std::mem::take(&mut self.tail),
            chunks: ranges,
            offset: self.frontier,
        };
        let stored = mover.store(&batch, &mut self.stats, &self.share);
        let mut data = batch.data;
        let stored = match stored {
            Ok(s) => s,
            Err(e) => {
                // Keep the bytes: the write that failed is reported, and
                // the file is as it was before it.
                self.tail = data;
                return Err(e);
            }
        };
        data.copy_within(used.., 0);
        data.truncate(data.len() - used);
        self.tail = data;
        for (id, len) in stored.chunks {
            self.starts.push(self.frontier);
            self.chunks.push((id, len));
            self.frontier += len as u64;
        }
        Ok(())
    }

    /// Stores every chunk of the tail that is final, keeping at most one
    /// chunk's worth in memory: for a file closed but kept open for later
    /// rewrites, so that many such files do not each hold a whole batch.
    /// The file's chunking stays what it would have been.
    pub fn settle<R: Deref<Target = Repository>>(&mut self, mover: &Mover<R>) -> Result<()> {
        self.cut(mover, false)?;
        self.tail.shrink_to_fit();
        Ok(())
    }

    /// Bytes held before cutting: the batch size, and at least two of the
    /// largest chunks (a content-defined cut needs that much to be final).
    fn threshold(&self) -> usize {
        let largest = match self.kind {
            Some(ChunkerKind::Fixed(size)) => size as usize,
            Some(ChunkerKind::Cdc { max, .. }) => 2 * max as usize,
            None => 2 * CDC_MAX as usize,
        };
        self.batch_bytes.max(largest)
    }

    fn cut_if_full<R: Deref<Target = Repository>>(&mut self, mover: &Mover<R>) -> Result<()> {
        if self.tail.len() >= self.threshold() {
            self.cut(mover, false)?;
        }
        Ok(())
    }

    /// Grows the tail with zeros up to file offset `end`, storing as it goes
    /// (a hole costs no memory beyond one batch, and no chunks).
    fn zero_fill<R: Deref<Target = Repository>>(
        &mut self,
        mover: &Mover<R>,
        end: u64,
    ) -> Result<()> {
        while self.size() < end {
            let room = self.threshold().saturating_sub(self.tail.len()).max(1);
            let add = (end - self.size()).min(room as u64) as usize;
            self.tail.resize(self.tail.len() + add, 0);
            self.cut_if_full(mover)?;
        }
        Ok(())
    }

    /// The chunks overlapping `range` of the stored part: (index, start).
    fn chunks_over(&self, range: Range<u64>) -> Range<usize> {
        let first = self
            .starts
            .partition_point(|&s| s <= range.start)
            .saturating_sub(1);
        let end = self.starts.partition_point(|&s| s < range.end);
        first..end.max(first)
    }

    fn chunk_bytes<R: Deref<Target = Repository>>(
        &self,
        mover: &Mover<R>,
        k: usize,
    ) -> Result<Vec<u8>> {
        let (id, len) = self.chunks[k];
        match id {
            Some(id) => mover.read_chunk(&id),
            None => Ok(vec![0; len as usize]),
        }
    }

    /// Writes `data` at `offset`; a gap before it reads as zeros.
    pub fn write_at<R: Deref<Target = Repository>>(
        &mut self,
        mover: &Mover<R>,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let end = offset + data.len() as u64;
        if offset < self.frontier {
            // Patch stored chunks: read each back, change it, store it
            // again under its new id, same length.
            let stored_end = end.min(self.frontier);
            let over = self.chunks_over(offset..stored_end);
            let mut buf = Vec::new();
            let mut ranges = Vec::new();
            for k in over.clone() {
                let mut bytes = self.chunk_bytes(mover, k)?;
                let start = self.starts[k];
                let lo = offset.max(start);
                let hi = stored_end.min(start + bytes.len() as u64);
                bytes[(lo - start) as usize..(hi - start) as usize]
                    .copy_from_slice(&data[(lo - offset) as usize..(hi - offset) as usize]);
                ranges.push(buf.len()..buf.len() + bytes.len());
                buf.extend_from_slice(&bytes);
            }
            let batch = ChunkBatch {
                data: buf,
                chunks: ranges,
                offset: self.starts[over.start],
            };
            let stored = mover.store(&batch, &mut self.stats, &self.share)?;
            for (k, (id, _)) in over.zip(stored.chunks) {
                self.chunks[k].0 = id;
            }
        }
        if end > self.frontier {
            let from = offset.max(self.frontier);
            let data = &data[(from - offset) as usize..];
            self.zero_fill(mover, from)?;
            let at = (from - self.frontier) as usize;
            let overlap = (self.tail.len() - at).min(data.len());
            self.tail[at..at + overlap].copy_from_slice(&data[..overlap]);
            if self.tail.capacity() == 0 && overlap < data.len() {
                self.tail = mover.tail_buffer();
            }
            // Append the rest a batch at a time.
            for piece in data[overlap..].chunks(self.batch_bytes) {
                self.tail.extend_from_slice(piece);
                self.cut_if_full(mover)?;
            }
        }
        Ok(())
    }

    /// Up to `len` bytes at `offset` (fewer at the end of the file).
    pub fn read_at<R: Deref<Target = Repository>>(
        &self,
        mover: &Mover<R>,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>> {
        let end = (offset + len as u64).min(self.size());
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        if offset >= end {
            return Ok(out);
        }
        if offset < self.frontier {
            let stored_end = end.min(self.frontier);
            for k in self.chunks_over(offset..stored_end) {
                let bytes = self.chunk_bytes(mover, k)?;
                let start = self.starts[k];
                let lo = offset.max(start);
                let hi = stored_end.min(start + bytes.len() as u64);
                out.extend_from_slice(&bytes[(lo - start) as usize..(hi - start) as usize]);
            }
        }
        if end > self.frontier {
            let lo = offset.max(self.frontier) - self.frontier;
            out.extend_from_slice(&self.tail[lo as usize..(end - self.frontier) as usize]);
        }
        Ok(out)
    }

    /// Truncates or extends (with zeros) the file to `len` bytes.
    pub fn set_len<R: Deref<Target = Repository>>(
        &mut self,
        mover: &Mover<R>,
        len: u64,
    ) -> Result<()> {
        if len >= self.frontier {
            if len >= self.size() {
                return self.zero_fill(mover, len);
            }
            self.tail.truncate((len - self.frontier) as usize);
            return Ok(());
        }
        // Drop the chunks from the one holding `len`; its kept part becomes
        // the tail again (chunks start on chunk boundaries, so a fixed-size
        // file stays aligned).
        let k = self.starts.partition_point(|&s| s <= len) - 1;
        let mut head = self.chunk_bytes(mover, k)?;
        head.truncate((len - self.starts[k]) as usize);
        self.chunks.truncate(k);
        self.frontier = self.starts[k];
        self.starts.truncate(k);
        self.tail = head;
        Ok(())
    }

    /// Stores the rest and returns the file's content, size and counts.
    pub fn finish<R: Deref<Target = Repository>>(
        mut self,
        mover: &Mover<R>,
    ) -> Result<(Content, u64, BackupStats)> {
        self.cut(mover, true)?;
        mover.recycle_tail(std::mem::take(&mut self.tail));
        let size = self.frontier;
        let mut stats = self.stats;
        stats.logical_bytes += size;
        let content = if self.chunks.is_empty() {
            Content::Empty
        } else {
            match self.kind.unwrap_or_else(ChunkerKind::default_cdc) {
                ChunkerKind::Fixed(chunk_size) => Content::Fixed {
                    chunk_size,
                    chunks: self.chunks.into_iter().map(|c| c.0).collect(),
                },
                ChunkerKind::Cdc { .. } => Content::Variable {
                    chunks: self.chunks,
                },
            }
        };
        Ok((content, size, stats))
    }
}

/// Splits a path from an archive or a mount into its names, refusing the
/// ones that would leave the restore point: absolute paths and `..`.
/// `.` and empty components are dropped.
pub fn path_components(path: &[u8]) -> Result<Vec<&[u8]>> {
    let shown = || String::from_utf8_lossy(path).into_owned();
    if path.first() == Some(&b'/') {
        return Err(Error::InvalidInput(format!(
            "{:?}: an absolute path; only paths inside the restore point are taken",
            shown()
        )));
    }
    let mut out = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(Error::InvalidInput(format!(
                    "{:?}: a path with `..` would leave the restore point; refused",
                    shown()
                )))
            }
            p if p.contains(&0) => {
                return Err(Error::InvalidInput(format!(
                    "{:?}: a name holds NUL",
                    shown()
                )))
            }
            p => out.push(p),
        }
    }
    Ok(out)
}

/// The nodes of a restore point, built by path in any order: a missing
/// parent directory is made on the way (owned like the root, mode 0755),
/// and an entry given twice keeps its last version, as `tar` does.
pub struct TreeBuilder {
    nodes: Vec<Node>,
    children: HashMap<(u32, Vec<u8>), u32>,
}

impl TreeBuilder {
    /// `root` is the root directory's node (its name and parent are
    /// ignored).
    pub fn new(mut root: Node) -> Self {
        root.parent = 0;
        root.name = Vec::new();
        root.kind = NodeKind::Dir;
        root.content = Content::Empty;
        root.size = 0;
        TreeBuilder {
            nodes: vec![root],
            children: HashMap::new(),
        }
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }

    /// The node at `path`, if there is one.
    pub fn lookup(&self, path: &[u8]) -> Result<Option<usize>> {
        let mut at = 0u32;
        for name in path_components(path)? {
            match self.children.get(&(at, name.to_vec())) {
                Some(&i) => at = i,
                None => return Ok(None),
            }
        }
        Ok(Some(at as usize))
    }

    /// Puts `node` at `path`, replacing what was there (a directory keeps
    /// its entries and takes the new metadata); returns its index. The path
    /// must name something below the root.
    pub fn put(&mut self, path: &[u8], mut node: Node) -> Result<usize> {
        let parts = path_components(path)?;
        let Some((name, dirs)) = parts.split_last() else {
            // The root itself (`./` in a tar): it takes the metadata.
            if node.kind == NodeKind::Dir {
                let root = &mut self.nodes[0];
                (root.mode, root.uid, root.gid) = (node.mode, node.uid, node.gid);
                (root.mtime_sec, root.mtime_nsec) = (node.mtime_sec, node.mtime_nsec);
                return Ok(0);
            }
            return Err(Error::InvalidInput(format!(
                "{:?}: names the root of the restore point, which is a directory",
                String::from_utf8_lossy(path)
            )));
        };
        let mut at = 0u32;
        for dir in dirs {
            at = match self.children.get(&(at, dir.to_vec())) {
                Some(&i) if self.nodes[i as usize].kind == NodeKind::Dir => i,
                Some(_) => {
                    return Err(Error::InvalidInput(format!(
                        "{:?}: a parent of it is not a directory",
                        String::from_utf8_lossy(path)
                    )))
                }
                None => {
                    let parent = self.nodes[0].clone();
                    let dir_node = Node {
                        parent: at,
                        name: dir.to_vec(),
                        mode: 0o755,
                        ..parent
                    };
                    self.insert(dir_node)
                }
            };
        }
        node.parent = at;
        node.name = name.to_vec();
        match self.children.get(&(at, name.to_vec())).copied() {
            Some(i) => {
                let was_dir = self.nodes[i as usize].kind == NodeKind::Dir;
                if was_dir && node.kind != NodeKind::Dir && self.children.keys().any(|k| k.0 == i) {
                    return Err(Error::InvalidInput(format!(
                        "{:?}: replaces a directory that has entries",
                        String::from_utf8_lossy(path)
                    )));
                }
                self.nodes[i as usize] = node;
                Ok(i as usize)
            }
            None => Ok(self.insert(node) as usize),
        }
    }

    fn insert(&mut self, node: Node) -> u32 {
        let i = self.nodes.len() as u32;
        self.children.insert((node.parent, node.name.clone()), i);
        self.nodes.push(node);
        i
    }

    /// The nodes, ready for a manifest.
    pub fn into_nodes(self) -> Vec<Node> {
        self.nodes
    }
}

/// Counts a tree's entries into `stats`.
pub fn count_nodes(nodes: &[Node], stats: &mut BackupStats) {
    for n in nodes.iter().skip(1) {
        match n.kind {
            NodeKind::Dir => stats.dirs += 1,
            NodeKind::File => stats.files += 1,
            NodeKind::Symlink => stats.symlinks += 1,
            _ => {}
        }
    }
}

/// Adds up the counts of one file (or stream) into a restore point's.
pub fn add_stats(into: &mut BackupStats, file: &BackupStats) {
    into.logical_bytes += file.logical_bytes;
    into.read_bytes += file.read_bytes;
    into.chunks += file.chunks;
    into.new_chunks += file.new_chunks;
    into.new_chunk_bytes += file.new_chunk_bytes;
    into.new_meta_bytes += file.new_meta_bytes;
    into.changed_while_reading
        .extend(file.changed_while_reading.iter().cloned());
}

/// Commits a restore point of `job`: flushes the mover (so every chunk the
/// nodes name is durable), then writes the manifest under a name no other
/// writer holds. Until this returns, nothing of the backup is visible.
pub fn commit<R: Deref<Target = Repository>>(
    mover: &Mover<R>,
    job: &str,
    hostname: &str,
    time: i64,
    nodes: Vec<Node>,
    mut stats: BackupStats,
    share: &MetaShare,
) -> Result<Manifest> {
    crate::manifest::validate_job_name(job)?;
    mover.flush()?;
    let repo = mover.repo();
    stats.new_meta_bytes += share.bytes();
    let mut manifest = Manifest {
        job: job.to_string(),
        name: timestamp_name(time),
        time,
        hostname: hostname.to_string(),
        stats,
        nodes,
    };
    manifest.validate("new restore point")?;
    mover.check_lock()?;
    rescue_pending_packs(repo, &manifest)?;
    let estimate = repo.encode_meta(format::MANIFEST_MAGIC, &manifest).len() as u64;
    manifest.stats.new_meta_bytes += estimate;
    loop {
        // Asked first, as well as refused by the create-only put of a key
        // that names the manifest's contents: another backup of this job
        // may have finished in the same second.
        if repo.restore_point_taken(&manifest.job, &manifest.name)? {
            manifest.time += 1;
            manifest.name = timestamp_name(manifest.time);
            continue;
        }
        let encoded = repo.encode_meta(format::MANIFEST_MAGIC, &manifest);
        let key = repo.new_manifest_key(&manifest);
        match repo.store().put(&key, &encoded) {
            Ok(()) => {}
            Err(Error::AlreadyExists(_)) => {
                manifest.time += 1;
                manifest.name = timestamp_name(manifest.time);
                continue;
            }
            Err(e) => return Err(e),
        }
        let name = RestorePointName {
            job: manifest.job.clone(),
            name: manifest.name.clone(),
        };
        repo.note_manifest_key(&name, &key);
        // Two writers that looked at the same moment, on a store that
        // does not refuse a second create: both restore points are kept,
        // under names that tell them apart.
        let shared: Vec<String> = repo
            .list_restore_points(Some(&manifest.job))?
            .into_iter()
            .filter(|n| n.base() == manifest.name)
            .map(|n| n.to_string())
            .collect();
        if shared.len() > 1 {
            tracing::warn!(
                "{} backups of job {:?} committed under the same time on {} \
                 (the store does not refuse a second create); they are {}",
                shared.len(),
                manifest.job,
                repo.location(),
                shared.join(", ")
            );
        }
        repo.merge_index_if_due();
        return Ok(manifest);
    }
}

/// Writes again the index files of packs on a prune's pending list that
/// `manifest` uses (this writer reused them before they were listed, or
/// wrote them itself), so the repository verifies clean as soon as the
/// manifest is written. The prune that decides about them keeps them too.
pub(crate) fn rescue_pending_packs(repo: &Repository, manifest: &Manifest) -> Result<()> {
    let pending = crate::lock::pending_pack_set(repo)?;
    if pending.is_empty() {
        return Ok(());
    }
    let mut used = std::collections::HashSet::new();
    {
        let index = repo.index().read();
        for node in &manifest.nodes {
            for id in node.content.ids() {
                if let Some(loc) = index.get(&id) {
                    let pack = index.packs[loc.pack as usize];
                    if pending.contains(&pack) {
                        used.insert(pack);
                    }
                }
            }
        }
    }
    for pack in used {
        let (pack_len, entries) = repo.read_pack_table(&pack)?;
        repo.put_index_file(&IndexFile {
            pack,
            pack_len,
            entries,
        })?;
        tracing::info!("kept pack {pack}, listed for deletion by a prune, which this backup uses");
    }
    Ok(())
}
