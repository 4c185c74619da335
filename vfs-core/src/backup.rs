//! Backing up files, directories and streams into a restore point.
//!
//! Data flow: a walk collects the tree's metadata first (so progress knows
//! the total); a reader thread streams each file through its chunker into
//! batches; the caller's thread hashes the batch on all cores, compresses
//! and seals only chunks the repository lacks (again on all cores), and
//! appends them to the open pack; a writer thread makes full packs and
//! their index files durable. The manifest is written last: until then no
//! restore point is visible, and every pack already written is indexed, so
//! an interrupted backup's chunks are reused by the next one.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::chunker::{ChunkBatch, ChunkStream, ChunkerKind};
use crate::error::{Error, Result};
use crate::ids::ChunkId;
use crate::ingest::{commit, count_nodes, MetaShare, Mover, ReadAhead, TreeBuilder, BATCH_BYTES};
use crate::manifest::{validate_job_name, BackupStats, Content, Manifest, Node, NodeKind};
use crate::repo::Repository;
use crate::tar_stream::ingest_tar;

/// Live counters for a progress display; all fields are updated as the
/// backup runs.
#[derive(Default)]
pub struct Progress {
    pub total_bytes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub files_done: AtomicU64,
    pub total_files: AtomicU64,
    pub current: Mutex<String>,
}

pub struct StdinSource {
    pub name: String,
    pub reader: Box<dyn Read + Send>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

pub enum Source {
    Paths(Vec<PathBuf>),
    Stream(StdinSource),
    /// A tar stream, unpacked into the restore point's files as it arrives
    /// (see [`crate::tar_stream`]); `what` names it in errors.
    Tar {
        what: String,
        reader: Box<dyn Read + Send>,
    },
    /// A tree described up front (node 0 is the root directory), each
    /// file's bytes coming from a reader: a writable session commits this
    /// way.
    Tree {
        nodes: Vec<Node>,
        files: Vec<(usize, Box<dyn Read + Send>)>,
    },
}

pub struct BackupOptions {
    pub job: String,
    /// `None` chooses per file (see [`ChunkerKind::choose`]).
    pub chunker: Option<ChunkerKind>,
    pub hostname: String,
    pub progress: Arc<Progress>,
}

/// What the reader thread reads for one file node.
enum FileInput {
    Path(PathBuf),
    Stream(Box<dyn Read + Send>),
}

struct Walk {
    nodes: Vec<Node>,
    inputs: Vec<(usize, FileInput)>,
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn node_from_meta(parent: u32, name: Vec<u8>, meta: &std::fs::Metadata, kind: NodeKind) -> Node {
    let (mode, uid, gid, mtime_sec, mtime_nsec) = unix_meta(meta);
    Node {
        parent,
        name,
        kind,
        mode,
        uid,
        gid,
        mtime_sec,
        mtime_nsec,
        size: if kind == NodeKind::File {
            meta.len()
        } else {
            0
        },
        target: Vec::new(),
        content: Content::Empty,
    }
}

#[cfg(unix)]
fn unix_meta(meta: &std::fs::Metadata) -> (u32, u32, u32, i64, u32) {
    use std::os::unix::fs::MetadataExt;
    (
        meta.mode() & 0o7777,
        meta.uid(),
        meta.gid(),
        meta.mtime(),
        meta.mtime_nsec() as u32,
    )
}

#[cfg(not(unix))]
fn unix_meta(meta: &std::fs::Metadata) -> (u32, u32, u32, i64, u32) {
    let mode = if meta.is_dir() {
        0o755
    } else if meta.permissions().readonly() {
        0o444
    } else {
        0o644
    };
    let (s, ns) = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or((0, 0), |d| (d.as_secs() as i64, d.subsec_nanos()));
    (mode, 0, 0, s, ns)
}

#[cfg(unix)]
fn name_bytes(name: &std::ffi::OsStr) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    name.as_bytes().to_vec()
}

#[cfg(not(unix))]
fn name_bytes(name: &std::ffi::OsStr) -> Vec<u8> {
    name.to_string_lossy().as_bytes().to_vec()
}

#[cfg(unix)]
fn link_bytes(target: PathBuf) -> Vec<u8> {
    use std::os::unix::ffi::OsStringExt;
    target.into_os_string().into_vec()
}

#[cfg(not(unix))]
fn link_bytes(target: PathBuf) -> Vec<u8> {
    target.to_string_lossy().as_bytes().to_vec()
}

fn walk(source: Source) -> Result<Walk> {
    let root = own_root(now_secs());
    let mut walk = Walk {
        nodes: Vec::new(),
        inputs: Vec::new(),
    };
    match source {
        Source::Tree { nodes, files } => {
            if nodes.first().is_none_or(|n| n.kind != NodeKind::Dir) {
                return Err(Error::InvalidInput(
                    "a tree to back up needs a root directory".into(),
                ));
            }
            walk.nodes = nodes;
            walk.inputs = files
                .into_iter()
                .map(|(i, r)| (i, FileInput::Stream(r)))
                .collect();
        }
        Source::Tar { .. } => unreachable!("backup_tar unpacks tar streams"),
        Source::Stream(s) => {
            if s.name.is_empty() || s.name.contains('/') || s.name == "." || s.name == ".." {
                return Err(Error::InvalidInput(format!(
                    "invalid stream name {:?}",
                    s.name
                )));
            }
            walk.nodes.push(root.clone());
            walk.nodes.push(Node {
                parent: 0,
                name: s.name.into_bytes(),
                kind: NodeKind::File,
                mode: s.mode,
                uid: s.uid,
                gid: s.gid,
                ..root
            });
            walk.inputs.push((1, FileInput::Stream(s.reader)));
        }
        Source::Paths(paths) => {
            if paths.is_empty() {
                return Err(Error::InvalidInput(
                    "nothing to back up: no paths given".into(),
                ));
            }
            walk.nodes.push(root);
            let mut seen = HashSet::new();
            for path in paths {
                let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
                let name = match path.file_name() {
                    Some(n) => name_bytes(n),
                    None => {
                        let canon = path.canonicalize().map_err(|e| Error::io(&path, e))?;
                        canon
                            .file_name()
                            .map(name_bytes)
                            .unwrap_or_else(|| b"root".to_vec())
                    }
                };
                if !seen.insert(name.clone()) {
                    return Err(Error::InvalidInput(format!(
                        "two paths to back up share the name {:?}; back them up in separate jobs or from their parent",
                        String::from_utf8_lossy(&name)
                    )));
                }
                walk_path(&mut walk, 0, name, &path, meta)?;
            }
        }
    }
    Ok(walk)
}

fn walk_path(
    walk: &mut Walk,
    parent: u32,
    name: Vec<u8>,
    path: &Path,
    meta: std::fs::Metadata,
) -> Result<()> {
    let ft = meta.file_type();
    let idx = walk.nodes.len();
    if ft.is_dir() {
        walk.nodes
            .push(node_from_meta(parent, name, &meta, NodeKind::Dir));
        let rd = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
        let mut entries = Vec::new();
        for e in rd {
            let e = e.map_err(|e| Error::io(path, e))?;
            entries.push(e.file_name());
        }
        entries.sort();
        for child in entries {
            let cpath = path.join(&child);
            let cmeta = std::fs::symlink_metadata(&cpath).map_err(|e| Error::io(&cpath, e))?;
            walk_path(walk, idx as u32, name_bytes(&child), &cpath, cmeta)?;
        }
    } else if ft.is_symlink() {
        let mut node = node_from_meta(parent, name, &meta, NodeKind::Symlink);
        node.target = link_bytes(std::fs::read_link(path).map_err(|e| Error::io(path, e))?);
        node.size = node.target.len() as u64;
        walk.nodes.push(node);
    } else if ft.is_file() {
        walk.nodes
            .push(node_from_meta(parent, name, &meta, NodeKind::File));
        walk.inputs.push((idx, FileInput::Path(path.to_path_buf())));
    } else {
        return Err(Error::InvalidInput(format!(
            "{}: not a regular file, directory or symlink (devices, sockets and pipes are not backed up; to back up a stream, pipe it to `flr backup --stdin-name`)",
            path.display()
        )));
    }
    Ok(())
}

/// Messages from the reader thread.
enum ReadEvent {
    Start { node: usize, kind: ChunkerKind },
    Batch(ChunkBatch),
    End { node: usize, changed: bool },
    Failed(Error),
}

fn read_files(
    inputs: Vec<(usize, FileInput)>,
    paths: Vec<String>,
    chunker: Option<ChunkerKind>,
    tx: crossbeam_channel::Sender<ReadEvent>,
) {
    for ((node, input), display) in inputs.into_iter().zip(paths) {
        let (reader, before, path): (Box<dyn Read + Send>, _, _) = match input {
            FileInput::Stream(r) => (r, None, None),
            FileInput::Path(p) => match File::open(&p).and_then(|f| Ok((f.metadata()?, f))) {
                Ok((m, f)) => (Box::new(f), Some(m), Some(p)),
                Err(e) => {
                    let _ = tx.send(ReadEvent::Failed(Error::io(&p, e)));
                    return;
                }
            },
        };
        let mut reader = reader;
        // The chunker is chosen from the first bytes (SQLite's header
        // declares the page size), which are then fed back in front.
        let mut head = vec![0u8; 100];
        let mut got = 0;
        while got < head.len() {
            match reader.read(&mut head[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(ReadEvent::Failed(Error::io(&display, e)));
                    return;
                }
            }
        }
        head.truncate(got);
        let base = display
            .rsplit('/')
            .next()
            .unwrap_or(&display)
            .as_bytes()
            .to_vec();
        let kind = chunker.unwrap_or_else(|| ChunkerKind::choose(&base, &head));
        if tx.send(ReadEvent::Start { node, kind }).is_err() {
            return;
        }
        let mut stream =
            ChunkStream::new(std::io::Cursor::new(head).chain(reader), kind, BATCH_BYTES);
        loop {
            match stream.next_batch() {
                Ok(Some(batch)) => {
                    if tx.send(ReadEvent::Batch(batch)).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(ReadEvent::Failed(Error::io(&display, e)));
                    return;
                }
            }
        }
        let changed = match (before, path) {
            (Some(before), Some(p)) => match std::fs::metadata(&p) {
                Ok(after) => {
                    after.len() != before.len() || after.modified().ok() != before.modified().ok()
                }
                Err(_) => true,
            },
            _ => false,
        };
        if tx.send(ReadEvent::End { node, changed }).is_err() {
            return;
        }
    }
}

/// The file whose batches are arriving.
struct CurrentFile {
    node: usize,
    kind: ChunkerKind,
    chunks: Vec<(Option<ChunkId>, u32)>,
    size: u64,
}

/// Runs a backup and commits it as a new restore point.
pub fn backup(repo: &Repository, source: Source, opts: &BackupOptions) -> Result<Manifest> {
    validate_job_name(&opts.job)?;
    let started = Instant::now();
    let start_secs = now_secs();
    if let Source::Tar { what, reader } = source {
        return backup_tar(repo, &what, reader, opts, started, start_secs);
    }
    let Walk { mut nodes, inputs } = walk(source)?;

    let progress = &opts.progress;
    let total: u64 = inputs.iter().map(|(i, _)| nodes[*i].size).sum();
    progress.total_bytes.store(total, Ordering::Relaxed);
    progress
        .total_files
        .store(inputs.len() as u64, Ordering::Relaxed);

    let mut stats = BackupStats::default();
    count_nodes(&nodes, &mut stats);

    let display: Vec<String> = inputs.iter().map(|(i, _)| path_in(&nodes, *i)).collect();

    let (tx, rx) = crossbeam_channel::bounded::<ReadEvent>(2);
    let share = MetaShare::default();
    Mover::scoped(repo, |mover| {
        std::thread::scope(|scope| {
            let chunker = opts.chunker;
            scope.spawn(move || read_files(inputs, display, chunker, tx));
            let mut current: Option<CurrentFile> = None;
            // The reader stops when it sees the channel close.
            let rx = rx;
            for event in rx.iter() {
                match event {
                    ReadEvent::Failed(e) => return Err(e),
                    ReadEvent::Start { node, kind } => {
                        *progress.current.lock() = path_in(&nodes, node);
                        current = Some(CurrentFile {
                            node,
                            kind,
                            chunks: Vec::new(),
                            size: 0,
                        });
                    }
                    ReadEvent::Batch(batch) => {
                        let Some(CurrentFile { chunks, size, .. }) = current.as_mut() else {
                            continue;
                        };
                        let stored = mover.store(&batch, &mut stats, &share)?;
                        *size += batch.data.len() as u64;
                        chunks.extend(stored.chunks);
                        progress
                            .read_bytes
                            .fetch_add(batch.data.len() as u64, Ordering::Relaxed);
                    }
                    ReadEvent::End { node, changed } => {
                        let Some(CurrentFile {
                            node: n,
                            kind,
                            chunks,
                            size,
                        }) = current.take()
                        else {
                            continue;
                        };
                        debug_assert_eq!(n, node);
                        let file = &mut nodes[node];
                        file.size = size;
                        stats.logical_bytes += size;
                        file.content = if chunks.is_empty() {
                            Content::Empty
                        } else {
                            match kind {
                                ChunkerKind::Fixed(chunk_size) => Content::Fixed {
                                    chunk_size,
                                    chunks: chunks.into_iter().map(|c| c.0).collect(),
                                },
                                ChunkerKind::Cdc { .. } => Content::Variable { chunks },
                            }
                        };
                        if changed {
                            stats.changed_while_reading.push(path_in(&nodes, node));
                        }
                        progress.files_done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(())
        })?;
        // Commit: the manifest goes last, under a name no other writer
        // holds (`commit` flushes the packs first).
        stats.duration_ms = started.elapsed().as_millis() as u64;
        commit(
            mover,
            &opts.job,
            &opts.hostname,
            start_secs,
            nodes,
            stats,
            &share,
        )
    })
}

/// A tar stream's backup: its members become the restore point's nodes.
fn backup_tar(
    repo: &Repository,
    what: &str,
    reader: Box<dyn Read + Send>,
    opts: &BackupOptions,
    started: Instant,
    start_secs: i64,
) -> Result<Manifest> {
    let share = MetaShare::default();
    let mut tree = TreeBuilder::new(own_root(start_secs));
    let reader = ReadAhead::new(reader, 1 << 20, 8);
    Mover::scoped(repo, |mover| {
        let mut stats = ingest_tar(mover, reader, &mut tree, &share, what, &opts.progress)?;
        let nodes = tree.into_nodes();
        count_nodes(&nodes, &mut stats);
        stats.duration_ms = started.elapsed().as_millis() as u64;
        commit(
            mover,
            &opts.job,
            &opts.hostname,
            start_secs,
            nodes,
            stats,
            &share,
        )
    })
}

/// A root directory owned by whoever runs the backup.
pub fn own_root(mtime_sec: i64) -> Node {
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut root = Node {
        parent: 0,
        name: Vec::new(),
        kind: NodeKind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_sec,
        mtime_nsec: 0,
        size: 0,
        target: Vec::new(),
        content: Content::Empty,
    };
    #[cfg(unix)]
    if let Ok(m) = std::fs::metadata(".") {
        let (_, uid, gid, _, _) = unix_meta(&m);
        root.uid = uid;
        root.gid = gid;
    }
    root
}

fn path_in(nodes: &[Node], mut i: usize) -> String {
    let mut parts = Vec::new();
    while i != 0 {
        parts.push(String::from_utf8_lossy(&nodes[i].name).into_owned());
        i = nodes[i].parent as usize;
    }
    parts.reverse();
    parts.join("/")
}
