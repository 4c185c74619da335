//! Writing a restore point's files back to a directory: byte-identical,
//! holes kept sparse, metadata (mode, owner when permitted, mtime) set.
//!
//! Each file is written under a temporary name beside its target and
//! renamed only when complete, so an interrupted restore never leaves a
//! half-written file under a final name.
//!
//! A restore never writes outside its target, whatever the manifest says
//! and whatever already lies in the target. The manifest is checked on
//! load ([`Manifest::validate`]: one plain component per name, no two
//! entries of one name in a directory), and every entry is then created
//! relative to a directory handle this module opened itself, never by a
//! path that the kernel resolves again (`DirHandle`): a symlink found
//! where the restore point has a directory is refused, not followed, and
//! an existing file or symlink is replaced by rename, never written
//! through. The directory the caller names as the target is the one path
//! that is followed as given.

use std::collections::HashSet;
use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

use crate::backup::Progress;
use crate::error::{Error, Result};
use crate::frame_fetch::{FrameFetcher, FrameRequest};
use crate::ids::{IdMap, PackId};
use crate::manifest::{Manifest, NodeKind};
use crate::repo::{ChunkLoc, Repository};

#[cfg(unix)]
#[path = "restore/fd_dir.rs"]
mod dir_handle;
#[cfg(not(unix))]
#[path = "restore/path_dir.rs"]
mod dir_handle;

use dir_handle::{DirHandle, Existing};

/// Chunks decoded in parallel before being written in order.
/// Logical bytes of a file restored at once: its frames are fetched
/// together, so neighbouring ones share a request, and held until written.
const RESTORE_BATCH_BYTES: u64 = 32 << 20;

/// Most chunks in one batch.
const RESTORE_BATCH_CHUNKS: usize = 8192;

/// Consecutive runs of `chunks` of about [`RESTORE_BATCH_BYTES`] each.
fn batches<T: Copy>(chunks: &[(T, u64, u32)]) -> impl Iterator<Item = &[(T, u64, u32)]> {
    let mut rest = chunks;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0u64;
        let mut n = 0;
        while n < rest.len() && n < RESTORE_BATCH_CHUNKS && bytes < RESTORE_BATCH_BYTES {
            bytes += rest[n].2 as u64;
            n += 1;
        }
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        Some(batch)
    })
}

pub struct RestoreOptions {
    /// Paths inside the restore point to restore; empty means all.
    pub paths: Vec<String>,
    /// Replace files that already exist at the target.
    pub overwrite: bool,
    pub progress: Arc<Progress>,
    /// Polled between batches; set to stop early.
    pub cancel: Arc<std::sync::atomic::AtomicBool>,
    /// Sync each file before its rename (the default). A caller that
    /// restores below a directory of its own, syncs the filesystem and
    /// only then moves that directory into place (an export) needs no
    /// sync per file: a crash before that leaves nothing under a final
    /// name anyway.
    pub sync_each_file: bool,
}

#[derive(Debug, Default, Clone)]
pub struct RestoreStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

/// Marks which nodes to restore: the selected ones, everything below
/// them, and the directories above them.
fn select(manifest: &Manifest, paths: &[String]) -> Result<Vec<bool>> {
    let n = manifest.nodes.len();
    if paths.is_empty() {
        return Ok(vec![true; n]);
    }
    let mut by_path = std::collections::HashMap::new();
    for i in 1..n {
        by_path.insert(manifest.path_of(i), i);
    }
    let mut chosen = vec![false; n];
    for p in paths {
        let p = p.trim_matches('/');
        let &i = by_path.get(p).ok_or_else(|| {
            Error::NotFound(format!("{p:?} in restore point {}", manifest.full_name()))
        })?;
        chosen[i] = true;
        let mut up = manifest.nodes[i].parent as usize;
        while up != 0 {
            chosen[up] = true;
            up = manifest.nodes[up].parent as usize;
        }
    }
    chosen[0] = true;
    // Nodes are in depth-first order, so a parent is decided before its
    // children; a child of a selected non-ancestor is selected.
    let explicit: HashSet<usize> = paths
        .iter()
        .filter_map(|p| by_path.get(p.trim_matches('/')).copied())
        .collect();
    let mut inherited = vec![false; n];
    for i in 1..n {
        let parent = manifest.nodes[i].parent as usize;
        if explicit.contains(&i) || (parent != 0 && inherited[parent]) {
            inherited[i] = true;
            chosen[i] = true;
        }
    }
    Ok(chosen)
}

/// Where node `i` lands under `target`, for messages and progress only:
/// nothing is opened by this path.
fn shown_path(target: &Path, manifest: &Manifest, i: usize) -> PathBuf {
    target.join(manifest.path_of(i))
}

/// The temporary name a file or symlink is created under before it is
/// renamed to `name`.
fn partial_name(name: &[u8]) -> Vec<u8> {
    [b".", name, b".flr-partial"].concat()
}

fn symlink_in_the_way(path: &Path) -> Error {
    Error::InvalidInput(format!(
        "{}: is a symbolic link where the restore point has a directory; \
         a restore never follows links inside its target (move it away and retry)",
        path.display()
    ))
}

fn not_a_directory(path: &Path) -> Error {
    Error::InvalidInput(format!(
        "{}: exists and is not a directory, but the restore point has a directory there",
        path.display()
    ))
}

/// The open directory handles from the target down to the directory last
/// asked for. Nodes come in depth-first order, so walking them opens each
/// directory about once and holds no more handles than the tree is deep.
struct DirPath<'a> {
    manifest: &'a Manifest,
    target: &'a Path,
    /// Depth of each node below the root (the root is 0).
    depth: Vec<u32>,
    /// `open[d]` is (node, handle) of the directory at depth `d`.
    open: Vec<(usize, DirHandle)>,
}

impl<'a> DirPath<'a> {
    fn new(manifest: &'a Manifest, target: &'a Path, root: DirHandle) -> Self {
        let mut depth = vec![0u32; manifest.nodes.len()];
        // Parents come before their children (checked on load).
        for i in 1..depth.len() {
            depth[i] = depth[manifest.nodes[i].parent as usize] + 1;
        }
        DirPath {
            manifest,
            target,
            depth,
            open: vec![(0, root)],
        }
    }

    fn holds(&self, i: usize) -> bool {
        let d = self.depth[i] as usize;
        d < self.open.len() && self.open[d].0 == i
    }

    /// The handle of directory node `i`, opening whatever lies between it
    /// and the nearest handle already open, without following a link.
    fn get(&mut self, i: usize) -> Result<&DirHandle> {
        let mut missing = Vec::new();
        let mut up = i;
        while !self.holds(up) {
            missing.push(up);
            up = self.manifest.nodes[up].parent as usize;
        }
        self.open.truncate(self.depth[up] as usize + 1);
        for &m in missing.iter().rev() {
            let (_, parent) = self.open.last().expect("the root stays open");
            let name = &self.manifest.nodes[m].name;
            let dir = parent.open_dir(name).map_err(|e| {
                let path = shown_path(self.target, self.manifest, m);
                match parent.entry(name) {
                    Ok(Some(Existing::Symlink)) => symlink_in_the_way(&path),
                    Ok(Some(Existing::Other)) => not_a_directory(&path),
                    _ => Error::io(path, e),
                }
            })?;
            self.open.push((m, dir));
        }
        Ok(&self.open.last().expect("the root stays open").1)
    }
}

pub fn restore(
    repo: &Repository,
    manifest: &Manifest,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreStats> {
    let chosen = select(manifest, &opts.paths)?;
    let nodes = &manifest.nodes;
    // Check everything first: refuse before writing anything.
    let existing = DirHandle::open_target(target, false).map_err(|e| Error::io(target, e))?;
    if let Some(root) = existing {
        check_existing(manifest, &chosen, target, root, opts.overwrite)?;
    }
    let total: u64 = (0..nodes.len())
        .filter(|&i| chosen[i] && nodes[i].kind == NodeKind::File)
        .map(|i| nodes[i].size)
        .sum();
    opts.progress.total_bytes.store(total, Ordering::Relaxed);
    let root = DirHandle::open_target(target, true)
        .map_err(|e| Error::io(target, e))?
        .ok_or_else(|| Error::NotFound(target.display().to_string()))?;
    let mut dirs = DirPath::new(manifest, target, root);

    let mut stats = RestoreStats::default();
    for i in 1..nodes.len() {
        if !chosen[i] {
            continue;
        }
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(Error::InvalidInput("restore cancelled".into()));
        }
        let node = &nodes[i];
        *opts.progress.current.lock() = manifest.path_of(i);
        let parent = dirs.get(node.parent as usize)?;
        match node.kind {
            NodeKind::Dir => {
                make_dir(parent, &node.name, || shown_path(target, manifest, i))?;
                stats.dirs += 1;
            }
            NodeKind::Symlink => {
                restore_symlink(parent, manifest, i, target)?;
                stats.symlinks += 1;
            }
            NodeKind::File => {
                let path = shown_path(target, manifest, i);
                restore_file(repo, manifest, i, parent, &node.name, path, opts)?;
                stats.files += 1;
                stats.bytes += node.size;
                opts.progress.files_done.fetch_add(1, Ordering::Relaxed);
            }
            // `Manifest::validate` refuses these on load.
            NodeKind::Fifo | NodeKind::Socket | NodeKind::CharDevice | NodeKind::BlockDevice => {
                return Err(Error::InvalidInput(format!(
                    "{}: a {:?} cannot be restored",
                    manifest.path_of(i),
                    node.kind
                )));
            }
        }
    }
    // Directory metadata last, deepest first, so adding entries does not
    // bump the restored mtimes. Every ancestor of a node has a smaller
    // index, so the directories walked through still have the owner-only
    // mode they were created with.
    for i in (1..nodes.len()).rev() {
        if chosen[i] && nodes[i].kind == NodeKind::Dir {
            dirs.get(i)?
                .set_own_metadata(&nodes[i])
                .map_err(|e| Error::io(shown_path(target, manifest, i), e))?;
        }
    }
    Ok(stats)
}

/// Looks at what already exists in the target, without following links
/// and without changing anything: a non-directory in the way of a
/// directory, or a directory in the way of a file or symlink, is an
/// error; so is any existing file or symlink unless `overwrite`.
fn check_existing(
    manifest: &Manifest,
    chosen: &[bool],
    target: &Path,
    root: DirHandle,
    overwrite: bool,
) -> Result<()> {
    let nodes = &manifest.nodes;
    // Whether node i exists as a real directory; nothing exists below
    // a directory that does not.
    let mut present = vec![false; nodes.len()];
    present[0] = true;
    let mut dirs = DirPath::new(manifest, target, root);
    for i in 1..nodes.len() {
        let node = &nodes[i];
        if !chosen[i] || !present[node.parent as usize] {
            continue;
        }
        let path = || shown_path(target, manifest, i);
        let found = dirs
            .get(node.parent as usize)?
            .entry(&node.name)
            .map_err(|e| Error::io(path(), e))?;
        match (node.kind, found) {
            (_, None) => {}
            (NodeKind::Dir, Some(Existing::Dir)) => present[i] = true,
            (NodeKind::Dir, Some(Existing::Symlink)) => return Err(symlink_in_the_way(&path())),
            (NodeKind::Dir, Some(Existing::Other)) => return Err(not_a_directory(&path())),
            (kind, Some(Existing::Dir)) => {
                return Err(Error::InvalidInput(format!(
                    "{}: is a directory where the restore point has a {kind:?}; \
                     a restore does not replace directories",
                    path().display()
                )))
            }
            (_, Some(_)) if !overwrite => {
                return Err(Error::AlreadyExists(format!(
                    "{} (pass --overwrite to replace existing files)",
                    path().display()
                )))
            }
            // Replaced by rename once the new one is complete.
            (_, Some(_)) => {}
        }
    }
    Ok(())
}

/// Creates a directory, or accepts one that is already there; anything
/// else under that name is refused, a symlink above all.
fn make_dir(parent: &DirHandle, name: &[u8], path: impl Fn() -> PathBuf) -> Result<()> {
    match parent.make_dir(name) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => match parent.entry(name) {
            Ok(Some(Existing::Dir)) => Ok(()),
            Ok(Some(Existing::Symlink)) => Err(symlink_in_the_way(&path())),
            Ok(Some(Existing::Other)) => Err(not_a_directory(&path())),
            Ok(None) => Err(Error::io(path(), e)),
            Err(e) => Err(Error::io(path(), e)),
        },
        Err(e) => Err(Error::io(path(), e)),
    }
}

/// Removes what an earlier, interrupted restore left under a temporary
/// name (a file or symlink; never followed, never a directory).
fn remove_stale(parent: &DirHandle, name: &[u8], path: &Path) -> Result<()> {
    match parent.remove(name) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn restore_symlink(parent: &DirHandle, manifest: &Manifest, i: usize, target: &Path) -> Result<()> {
    let node = &manifest.nodes[i];
    let path = shown_path(target, manifest, i);
    let partial = partial_name(&node.name);
    let partial_path = path.with_file_name(String::from_utf8_lossy(&partial).as_ref());
    remove_stale(parent, &partial, &partial_path)?;
    parent
        .make_symlink(&node.target, &partial)
        .map_err(|e| Error::io(&partial_path, e))?;
    parent.set_symlink_metadata(&partial, node);
    parent.rename(&partial, &node.name).map_err(|e| {
        let _ = parent.remove(&partial);
        Error::io(&path, e)
    })
}

/// Restores file node `i` of `manifest` into the existing directory `dir`
/// under `name` (one plain component) rather than its own name and path,
/// the way every restored file is written: under a temporary name, synced,
/// and renamed when complete. An existing `name` is replaced only with
/// `opts.overwrite`, and never written through.
pub fn restore_file_as(
    repo: &Repository,
    manifest: &Manifest,
    i: usize,
    dir: &Path,
    name: &str,
    opts: &RestoreOptions,
) -> Result<()> {
    let node = manifest
        .nodes
        .get(i)
        .filter(|n| n.kind == NodeKind::File)
        .ok_or_else(|| Error::InvalidInput(format!("node {i} is not a file")))?;
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(Error::InvalidInput(format!(
            "{name:?}: not a plain file name"
        )));
    }
    let parent = DirHandle::open_target(dir, false)
        .map_err(|e| Error::io(dir, e))?
        .ok_or_else(|| Error::NotFound(dir.display().to_string()))?;
    let path = dir.join(name);
    match parent
        .entry(name.as_bytes())
        .map_err(|e| Error::io(&path, e))?
    {
        None => {}
        Some(Existing::Dir) => {
            return Err(Error::InvalidInput(format!(
                "{}: is a directory",
                path.display()
            )))
        }
        Some(_) if !opts.overwrite => {
            return Err(Error::InvalidInput(format!(
                "{}: exists (overwrite not asked for)",
                path.display()
            )))
        }
        Some(_) => {}
    }
    opts.progress
        .total_bytes
        .fetch_add(node.size, Ordering::Relaxed);
    restore_file(repo, manifest, i, &parent, name.as_bytes(), path, opts)?;
    opts.progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Restores file node `i` into `parent` as `name`; `path` is where that
/// is, for messages.
fn restore_file(
    repo: &Repository,
    manifest: &Manifest,
    i: usize,
    parent: &DirHandle,
    name: &[u8],
    path: PathBuf,
    opts: &RestoreOptions,
) -> Result<()> {
    let node = &manifest.nodes[i];
    let partial = partial_name(name);
    let partial_path = path.with_file_name(String::from_utf8_lossy(&partial).as_ref());
    remove_stale(parent, &partial, &partial_path)?;
    let file = parent
        .create_file(&partial)
        .map_err(|e| Error::io(&partial_path, e))?;
    // The file is closed before the rename: Windows may refuse to rename
    // an open file.
    let result = (|file: File| -> Result<()> {
        let file_ref = &file;
        decode_ahead(repo, manifest, i, &opts.cancel, |batches| {
            for batch in batches {
                let batch = batch?;
                for w in &batch.writes {
                    let data = &batch.frames[w.frame][w.start..w.start + w.len];
                    write_at(file_ref, data, w.offset).map_err(|e| Error::io(&partial_path, e))?;
                }
                if let (Some(first), Some(last)) = (batch.writes.first(), batch.writes.last()) {
                    start_writeback(file_ref, first.offset, last.offset + last.len as u64);
                }
                opts.progress
                    .read_bytes
                    .fetch_add(batch.logical, Ordering::Relaxed);
            }
            Ok(())
        })?;
        // Holes at the end are made by the length, not by writing zeros.
        file.set_len(node.size)
            .map_err(|e| Error::io(&partial_path, e))?;
        if opts.sync_each_file {
            file.sync_all().map_err(|e| Error::io(&partial_path, e))?;
        }
        dir_handle::set_file_metadata(&file, node).map_err(|e| Error::io(&partial_path, e))?;
        drop(file);
        parent
            .rename(&partial, name)
            .map_err(|e| Error::io(&path, e))
    })(file);
    if result.is_err() {
        let _ = parent.remove(&partial);
    }
    result
}

/// Decodes and checks file node `i`'s chunks batch by batch, in file
/// order, on a thread of its own (each batch on the pool), while
/// `consume` takes the batches on the calling thread: one batch waits in
/// between, so at most three are held. A failed batch is sent as its
/// error and ends the run; so does `cancel`. A consumer that returns
/// early stops the decoding at its next batch.
fn decode_ahead<T, E: From<Error>>(
    repo: &Repository,
    manifest: &Manifest,
    i: usize,
    cancel: &AtomicBool,
    consume: impl FnOnce(std::sync::mpsc::Receiver<Result<Checked>>) -> Result<T, E>,
) -> Result<T, E> {
    let node = &manifest.nodes[i];
    let chunks = node.content.chunks(node.size);
    if batches(&chunks).nth(1).is_none() {
        // One batch (most files of a data directory): decoded here, with
        // no thread started for it.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Checked>>(1);
        if let Some(batch) = batches(&chunks).next() {
            let checked = if cancel.load(Ordering::Relaxed) {
                Err(Error::InvalidInput("restore cancelled".into()))
            } else {
                check_batch(repo, manifest, i, &FrameFetcher::new(repo, None), batch)
            };
            tx.send(checked).expect("the channel has room for one");
        }
        drop(tx);
        return consume(rx);
    }
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Checked>>(1);
        let decoder = s.spawn(move || {
            let fetcher = FrameFetcher::new(repo, None);
            for batch in batches(&chunks) {
                if cancel.load(Ordering::Relaxed) {
                    let _ = tx.send(Err(Error::InvalidInput("restore cancelled".into())));
                    return;
                }
                let checked = check_batch(repo, manifest, i, &fetcher, batch);
                let failed = checked.is_err();
                // A closed channel: the consumer has stopped.
                if tx.send(checked).is_err() || failed {
                    return;
                }
            }
        });
        let out = consume(rx);
        if decoder.join().is_err() {
            return Err(E::from(Error::Storage(format!(
                "decoding {} of {} stopped unexpectedly",
                manifest.path_of(i),
                manifest.full_name()
            ))));
        }
        out
    })
}

/// Reads file node `i` of `manifest` from the repository: `read` gets a
/// reader of its bytes in order, holes as zeros, decoded and checked on
/// the pool ahead of it (as a restore does). A failure of the
/// repository's (a missing or corrupt chunk) is what is returned, whatever
/// `read` made of the reader's error; a chunk that fails its check is
/// never handed to `read`.
pub fn read_file<T, E: From<Error>>(
    repo: &Repository,
    manifest: &Manifest,
    i: usize,
    cancel: &AtomicBool,
    read: impl FnOnce(&mut StoredReader) -> Result<T, E>,
) -> Result<T, E> {
    let node = manifest
        .nodes
        .get(i)
        .filter(|n| n.kind == NodeKind::File)
        .ok_or_else(|| Error::InvalidInput(format!("node {i} is not a file")))?;
    let listed = node
        .content
        .chunks(node.size)
        .iter()
        .map(|c| c.2 as u64)
        .sum();
    decode_ahead(repo, manifest, i, cancel, |rx| {
        let mut reader = StoredReader {
            rx,
            batch: None,
            piece: 0,
            pos: 0,
            size: node.size,
            covered: 0,
            listed,
            failure: None,
        };
        let out = read(&mut reader);
        match reader.failure.take() {
            Some(e) => Err(E::from(e)),
            None => out,
        }
    })
}

/// The bytes of a stored file, in order: see [`read_file`].
pub struct StoredReader {
    rx: std::sync::mpsc::Receiver<Result<Checked>>,
    batch: Option<Checked>,
    /// The next piece of `batch` to read from.
    piece: usize,
    /// File offset of the next byte to hand out.
    pos: u64,
    size: u64,
    /// Logical bytes of the batches received.
    covered: u64,
    /// Logical bytes of the file's chunk list; past them, up to `size`,
    /// the file is a hole.
    listed: u64,
    failure: Option<Error>,
}

impl std::io::Read for StoredReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if buf.is_empty() || self.pos >= self.size {
                return Ok(0);
            }
            if let Some(e) = &self.failure {
                return Err(std::io::Error::other(e.to_string()));
            }
            let next = self
                .batch
                .as_ref()
                .and_then(|b| b.writes.get(self.piece).map(|w| (b, w)));
            let Some((batch, w)) = next else {
                if self.covered >= self.listed {
                    // Past every chunk: a hole to the end.
                    let n = (self.size - self.pos).min(buf.len() as u64) as usize;
                    buf[..n].fill(0);
                    self.pos += n as u64;
                    return Ok(n);
                }
                match self.rx.recv() {
                    Ok(Ok(b)) => {
                        self.covered += b.logical;
                        self.batch = Some(b);
                        self.piece = 0;
                    }
                    Ok(Err(e)) => self.failure = Some(e),
                    Err(_) => {
                        self.failure = Some(Error::Storage(format!(
                            "the file's decoding ended at offset {} of {}",
                            self.covered, self.listed
                        )))
                    }
                }
                continue;
            };
            if w.offset > self.pos {
                // A hole before the piece.
                let n = (w.offset - self.pos).min(buf.len() as u64) as usize;
                buf[..n].fill(0);
                self.pos += n as u64;
                return Ok(n);
            }
            let skip = (self.pos - w.offset) as usize;
            if skip >= w.len {
                self.piece += 1;
                continue;
            }
            let data = &batch.frames[w.frame][w.start + skip..w.start + w.len];
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            self.pos += n as u64;
            return Ok(n);
        }
    }
}

/// One batch of a file, decoded and checked, with where its bytes go.
struct Checked {
    frames: Vec<Vec<u8>>,
    writes: Vec<Piece>,
    /// Logical bytes the batch covers, holes included.
    logical: u64,
}

/// Bytes `start..start + len` of `frames[frame]` go to file offset `offset`.
struct Piece {
    frame: usize,
    start: usize,
    len: usize,
    offset: u64,
}

/// Fetches, decodes and checks one batch of file `i`'s chunks. Chunks
/// that lie next to each other both in the file and in one frame become
/// one write.
fn check_batch(
    repo: &Repository,
    manifest: &Manifest,
    i: usize,
    fetcher: &FrameFetcher<&Repository>,
    batch: &[(Option<crate::ids::ChunkId>, u64, u32)],
) -> Result<Checked> {
    // The batch's frames, each once, and each chunk's frame: one request
    // covers neighbouring frames of a pack.
    let mut frames: Vec<FrameRequest> = Vec::new();
    let mut frame_of: IdMap<usize> = IdMap::default();
    let mut slots: Vec<Option<(usize, ChunkLoc, PackId)>> = Vec::with_capacity(batch.len());
    // Each lookup may read the index file: on all cores.
    let located: Vec<Option<(ChunkLoc, PackId)>> = batch
        .par_iter()
        .map(|(id, _, _)| id.and_then(|id| repo.locate(&id)))
        .collect();
    for ((id, offset, _), found) in batch.iter().zip(located) {
        let Some(id) = id else {
            slots.push(None);
            continue;
        };
        let (loc, pack) =
            found.ok_or_else(|| with_file(Error::MissingChunk(*id), manifest, i, *offset))?;
        let frame_key = loc.frame_key(&pack);
        let k = *frame_of.entry(frame_key).or_insert_with(|| {
            frames.push(FrameRequest {
                chunk: *id,
                loc,
                pack,
                frame_key,
            });
            frames.len() - 1
        });
        slots.push(Some((k, loc, pack)));
    }
    let mut decoded = fetcher.fetch_frames(&frames);
    // The first chunk (in file order) whose frame failed names the failure.
    for ((_, offset, _), slot) in batch.iter().zip(&slots) {
        if let Some((k, _, _)) = slot {
            if decoded[*k].is_err() {
                let e = std::mem::replace(&mut decoded[*k], Ok(Vec::new())).expect_err("checked");
                return Err(with_file(e, manifest, i, *offset));
            }
        }
    }
    let frames: Vec<Vec<u8>> = decoded.into_iter().map(|f| f.expect("checked")).collect();
    let checked: Vec<Result<()>> = batch
        .par_iter()
        .zip(slots.par_iter())
        .map(|((id, _, _), slot)| match (id, slot) {
            (Some(id), Some((k, loc, pack))) => {
                repo.chunk_in_frame(id, loc, pack, &frames[*k]).map(|_| ())
            }
            _ => Ok(()),
        })
        .collect();
    let mut writes: Vec<Piece> = Vec::new();
    let mut logical = 0u64;
    for (((id, offset, len), slot), ok) in batch.iter().zip(&slots).zip(checked) {
        ok.map_err(|e| with_file(e, manifest, i, *offset))?;
        logical += *len as u64;
        let (Some(id), Some((k, loc, _))) = (id, slot) else {
            continue;
        };
        // The chunk matches its id, so the manifest is what is wrong;
        // writing it would shift the rest of the file.
        if loc.raw_len != *len {
            return Err(Error::malformed(
                format!("restore point {}", manifest.full_name()),
                format!(
                    "file {}, offset {offset}: chunk {id} holds {} bytes, \
                     the manifest gives its slot {len}",
                    manifest.path_of(i),
                    loc.raw_len
                ),
            ));
        }
        let start = loc.frame_offset as usize;
        match writes.last_mut() {
            Some(w)
                if w.frame == *k
                    && w.start + w.len == start
                    && w.offset + w.len as u64 == *offset =>
            {
                w.len += *len as usize;
            }
            _ => writes.push(Piece {
                frame: *k,
                start,
                len: *len as usize,
                offset: *offset,
            }),
        }
    }
    Ok(Checked {
        frames,
        writes,
        logical,
    })
}

fn with_file(e: Error, manifest: &Manifest, i: usize, offset: u64) -> Error {
    match e {
        Error::CorruptChunk { id, pack, why } => Error::CorruptChunk {
            id,
            pack,
            why: format!(
                "{why} (restore point {}, file {}, offset {offset})",
                manifest.full_name(),
                manifest.path_of(i)
            ),
        },
        Error::Malformed { what, why } => Error::Malformed {
            what,
            why: format!(
                "{why} (restoring file {} of {}, offset {offset})",
                manifest.path_of(i),
                manifest.full_name()
            ),
        },
        other => other,
    }
}

/// Starts writing `[start, end)` of `file` back to disk without waiting,
/// so the sync at the end of a restore has little left to wait for: on
/// Linux, `POSIX_FADV_DONTNEED` starts writeback of the range's dirty
/// pages (and drops the clean ones, which a restore does not read again).
#[cfg(target_os = "linux")]
pub fn start_writeback(file: &File, start: u64, end: u64) {
    if let Some(len) = std::num::NonZeroU64::new(end.saturating_sub(start)) {
        // A failure only leaves the writeback to the final sync.
        let _ = rustix::fs::fadvise(file, start, Some(len), rustix::fs::Advice::DontNeed);
    }
}

#[cfg(not(target_os = "linux"))]
pub fn start_writeback(_file: &File, _start: u64, _end: u64) {}

#[cfg(unix)]
pub(crate) fn write_at(file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(data, offset)
}

#[cfg(windows)]
pub(crate) fn write_at(file: &File, mut data: &[u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !data.is_empty() {
        let n = file.seek_write(data, offset)?;
        data = &data[n..];
        offset += n as u64;
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::backup::{backup, BackupOptions, Source, StdinSource};
    use crate::manifest::{BackupStats, Content, Node};
    use crate::store::MemoryStore;

    const DATA: &[u8] = b"restored bytes\n";

    /// A repository holding one file `name` of `data`, and its manifest.
    fn repo_holding(name: &str, data: Vec<u8>) -> (Repository, Manifest) {
        let (_, repo, m) = stored(name, data);
        (repo, m)
    }

    /// The same, with the store under the repository.
    fn stored(name: &str, data: Vec<u8>) -> (Arc<MemoryStore>, Repository, Manifest) {
        let store = Arc::new(MemoryStore::new());
        Repository::init(store.as_ref(), None).unwrap();
        let repo = Repository::open(store.clone(), || Ok(Vec::new())).unwrap();
        let source = Source::Stream(StdinSource {
            name: name.into(),
            reader: Box::new(std::io::Cursor::new(data)),
            mode: 0o644,
            uid: 0,
            gid: 0,
        });
        let opts = BackupOptions {
            job: "t".into(),
            chunker: None,
            hostname: "test".into(),
            progress: Default::default(),
        };
        let m = backup(&repo, source, &opts).unwrap();
        (store, repo, m)
    }

    /// `data` grown by `n` bytes of xorshift noise from `seed`.
    fn noise(data: &mut Vec<u8>, n: usize, mut x: u64) {
        for _ in 0..n / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
    }

    /// Everything `read_file` hands out for node 1, read `step` bytes at
    /// a time.
    fn read_back(repo: &Repository, m: &Manifest, step: usize) -> Result<Vec<u8>> {
        use std::io::Read;
        read_file(repo, m, 1, &AtomicBool::new(false), |r| {
            let mut out = Vec::new();
            let mut buf = vec![0; step];
            loop {
                match r.read(&mut buf).map_err(|e| Error::io("the reader", e))? {
                    0 => return Ok(out),
                    n => out.extend_from_slice(&buf[..n]),
                }
            }
        })
    }

    /// A repository holding one file of `DATA`, and that file's content.
    fn repo_with_data() -> (Repository, Content) {
        let (repo, m) = repo_holding("data", DATA.to_vec());
        let content = m.nodes[1].content.clone();
        (repo, content)
    }

    fn node(parent: u32, name: &str, kind: NodeKind) -> Node {
        Node {
            parent,
            name: name.as_bytes().to_vec(),
            kind,
            mode: if kind == NodeKind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            mtime_sec: 1_000_000_000,
            mtime_nsec: 0,
            size: 0,
            target: Vec::new(),
            content: Content::Empty,
        }
    }

    fn file(parent: u32, name: &str, content: &Content) -> Node {
        Node {
            size: DATA.len() as u64,
            content: content.clone(),
            ..node(parent, name, NodeKind::File)
        }
    }

    fn manifest(nodes: Vec<Node>) -> Manifest {
        let mut all = vec![node(0, "", NodeKind::Dir)];
        all.extend(nodes);
        let m = Manifest {
            job: "t".into(),
            name: "2001-01-01T00-00-00Z".into(),
            time: 0,
            hostname: "test".into(),
            stats: BackupStats::default(),
            nodes: all,
        };
        m.validate("test manifest").unwrap();
        m
    }

    fn options(overwrite: bool) -> RestoreOptions {
        RestoreOptions {
            paths: Vec::new(),
            overwrite,
            progress: Default::default(),
            cancel: Default::default(),
            sync_each_file: true,
        }
    }

    /// A target directory and a decoy beside it that must stay empty.
    fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&target).unwrap();
        std::fs::create_dir(&outside).unwrap();
        (tmp, target, outside)
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A file of several batches, with a hole and repeated runs, written
    /// by the pipelined writer under another name: byte-identical; and
    /// what `restore_file_as` refuses.
    #[test]
    fn a_file_of_many_batches_restores_byte_identical_under_another_name() {
        let mut data = Vec::with_capacity(80 << 20);
        noise(&mut data, 40 << 20, 0x9e37_79b9_7f4a_7c15);
        data.resize(data.len() + (3 << 20), 0);
        data.extend_from_within(..5 << 20);
        noise(&mut data, 30 << 20, 0x2545_f491_4f6c_dd1d);
        data.extend_from_within(1 << 20..2 << 20);
        let (repo, m) = repo_holding("big", data.clone());
        let (_tmp, target, _) = dirs();
        let o = options(false);
        restore_file_as(&repo, &m, 1, &target, "copy", &o).unwrap();
        let back = std::fs::read(target.join("copy")).unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "restored bytes differ");
        assert_eq!(
            o.progress.read_bytes.load(Ordering::Relaxed),
            data.len() as u64
        );
        assert_eq!(entries(&target), ["copy"]);

        let err = restore_file_as(&repo, &m, 1, &target, "copy", &o).unwrap_err();
        assert!(err.to_string().contains("exists"), "{err}");
        restore_file_as(&repo, &m, 1, &target, "copy", &options(true)).unwrap();
        for bad in ["", ".", "..", "a/b"] {
            let err = restore_file_as(&repo, &m, 1, &target, bad, &o).unwrap_err();
            assert!(err.to_string().contains("plain file name"), "{bad}: {err}");
        }
        let err = restore_file_as(&repo, &m, 0, &target, "root", &o).unwrap_err();
        assert!(err.to_string().contains("not a file"), "{err}");
        assert_eq!(entries(&target), ["copy"]);
    }

    /// The reader of a stored file hands out its bytes in order, with a
    /// hole inside and one at the end as zeros, whatever the size of the
    /// reads; a damaged frame fails the read as corrupt, naming the file,
    /// and no byte of it or after it is handed out.
    #[test]
    fn a_stored_file_reads_back_in_order_and_a_damaged_frame_fails_the_read() {
        let mut data = Vec::new();
        noise(&mut data, 3 << 20, 0x2545_f491_4f6c_dd1d);
        data.resize(data.len() + (2 << 20), 0);
        noise(&mut data, 37 << 20, 0x9e37_79b9_7f4a_7c15);
        data.resize(data.len() + (1 << 20) + 77, 0);
        let (store, repo, m) = stored("f", data.clone());
        for step in [1 << 20, 12_345] {
            let back = read_back(&repo, &m, step).unwrap();
            assert_eq!(back.len(), data.len(), "reads of {step}");
            assert!(back == data, "reads of {step}: the bytes differ");
        }

        // Damage the frame of a chunk about 20 MiB in.
        let (id, offset) = m.nodes[1]
            .content
            .chunks(m.nodes[1].size)
            .into_iter()
            .find_map(|(id, offset, _)| id.filter(|_| offset >= 20 << 20).map(|id| (id, offset)))
            .unwrap();
        let (loc, pack) = repo.locate(&id).unwrap();
        store.tamper(&crate::repo::pack_key(&pack), |b| {
            b[loc.offset as usize + loc.stored_len as usize / 2] ^= 0x55
        });
        let mut handed = 0;
        let err = read_file(&repo, &m, 1, &AtomicBool::new(false), |r| {
            use std::io::Read;
            let mut buf = vec![0; 1 << 16];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        assert!(
                            buf[..n] == data[handed..handed + n],
                            "wrong bytes at {handed}"
                        );
                        handed += n;
                    }
                    // What the caller makes of it is not what is returned.
                    Err(e) => return Err(Error::InvalidInput(format!("tar failed: {e}"))),
                }
            }
        })
        .unwrap_err();
        assert!(matches!(err, Error::CorruptChunk { .. }), "{err}");
        assert!(err.to_string().contains("file f"), "{err}");
        assert!((handed as u64) < offset, "{handed} bytes handed out");

        // A cancelled read ends with an error, not with a short file.
        let err = read_file(&repo, &m, 1, &AtomicBool::new(true), |r| {
            std::io::copy(r, &mut std::io::sink()).map_err(|e| Error::io("sink", e))
        })
        .unwrap_err();
        assert!(err.to_string().contains("cancelled"), "{err}");
    }

    #[test]
    fn a_symlink_where_a_directory_belongs_is_refused_even_with_overwrite() {
        let (repo, content) = repo_with_data();
        let (_tmp, target, outside) = dirs();
        symlink(&outside, target.join("x")).unwrap();
        let m = manifest(vec![node(0, "x", NodeKind::Dir), file(1, "f", &content)]);
        for overwrite in [false, true] {
            let err = restore(&repo, &m, &target, &options(overwrite)).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("symbolic link") && msg.contains("target/x"),
                "{msg}"
            );
            assert!(entries(&outside).is_empty(), "wrote through the link");
        }
        assert_eq!(entries(&target), ["x"]);
    }

    /// The pre-check aside: the walk and the directory creation refuse a
    /// link on their own (as they must when one appears after the check).
    #[test]
    fn the_walk_itself_never_follows_a_link() {
        let (_tmp, target, outside) = dirs();
        symlink(&outside, target.join("x")).unwrap();
        std::fs::create_dir(outside.join("y")).unwrap();
        let m = manifest(vec![
            node(0, "x", NodeKind::Dir),
            node(1, "y", NodeKind::Dir),
        ]);
        let root = DirHandle::open_target(&target, false).unwrap().unwrap();
        let mut walk = DirPath::new(&m, &target, root);
        let err = walk.get(2).err().expect("descended through a link");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        let root = walk.get(0).unwrap();
        let err = make_dir(root, b"x", || target.join("x")).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(entries(&outside), ["y"]);
    }

    #[test]
    fn overwrite_replaces_a_symlink_instead_of_writing_through_it() {
        let (repo, content) = repo_with_data();
        let (_tmp, target, outside) = dirs();
        let victim = outside.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        symlink(&victim, target.join("f")).unwrap();
        let m = manifest(vec![file(0, "f", &content)]);

        let err = restore(&repo, &m, &target, &options(false)).unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
        restore(&repo, &m, &target, &options(true)).unwrap();
        let meta = std::fs::symlink_metadata(target.join("f")).unwrap();
        assert!(meta.is_file(), "{meta:?}");
        assert_eq!(std::fs::read(target.join("f")).unwrap(), DATA);
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(entries(&target), ["f"]);
    }

    #[test]
    fn a_stale_partial_link_is_removed_not_written_through() {
        let (repo, content) = repo_with_data();
        let (_tmp, target, outside) = dirs();
        let victim = outside.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        symlink(&victim, target.join(".f.flr-partial")).unwrap();
        symlink(&victim, target.join(".l.flr-partial")).unwrap();
        let mut link = node(0, "l", NodeKind::Symlink);
        link.target = b"f".to_vec();
        let m = manifest(vec![file(0, "f", &content), link]);
        restore(&repo, &m, &target, &options(false)).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(target.join("f")).unwrap(), DATA);
        assert_eq!(
            std::fs::read_link(target.join("l")).unwrap(),
            Path::new("f")
        );
        assert_eq!(entries(&target), ["f", "l"]);
    }

    #[test]
    fn a_chunk_longer_than_its_slot_is_an_error_naming_the_file() {
        let (repo, content) = repo_with_data();
        let (_tmp, target, _outside) = dirs();
        let Content::Variable { chunks } = &content else {
            panic!("a small stream is chunked by content: {content:?}");
        };
        // Claim one byte less than the chunk holds.
        let short = Content::Variable {
            chunks: vec![(chunks[0].0, DATA.len() as u32 - 1)],
        };
        let mut f = file(0, "f", &short);
        f.size -= 1;
        let m = manifest(vec![node(0, "d", NodeKind::Dir), f]);
        let err = restore(&repo, &m, &target, &options(false)).unwrap_err();
        assert!(matches!(err, Error::Malformed { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("file f, offset 0") && msg.contains("t/2001"),
            "{msg}"
        );
        assert_eq!(entries(&target), ["d"], "a partial file was left");
    }

    #[test]
    fn metadata_is_set_through_the_handles() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let (repo, content) = repo_with_data();
        let (_tmp, target, _outside) = dirs();
        let mut d = node(0, "d", NodeKind::Dir);
        d.mode = 0o750;
        d.mtime_sec = 1_200_000_000;
        d.mtime_nsec = 5;
        let mut f = file(1, "f", &content);
        f.mode = 0o600;
        f.mtime_sec = 1_300_000_000;
        let m = manifest(vec![d, f]);
        let stats = restore(&repo, &m, &target, &options(false)).unwrap();
        assert_eq!((stats.dirs, stats.files), (1, 1));
        let dm = std::fs::metadata(target.join("d")).unwrap();
        assert_eq!(dm.permissions().mode() & 0o7777, 0o750);
        assert_eq!((dm.mtime(), dm.mtime_nsec()), (1_200_000_000, 5));
        let fm = std::fs::metadata(target.join("d/f")).unwrap();
        assert_eq!(fm.permissions().mode() & 0o7777, 0o600);
        assert_eq!(fm.mtime(), 1_300_000_000);
    }
}
