//! A filesystem that backs up whatever is written into it (`flr mount
//! --ingest`): a backup tool writes its files there (`pg_dump -Fd`,
//! `pg_basebackup -Fp`, `sqlite3 .backup`) and every file is chunked,
//! deduplicated and packed while it is written.
//!
//! [`IngestFs`] keeps an inode table of directories, symlinks and files;
//! each file owns a [`FileWriter`] that stays open until the commit, so a
//! header patched after a long sequential write, a truncate, or a read of
//! what was written all work while memory stays about one batch per file
//! being written (a closed file keeps at most one chunk). One [`Mover`]
//! serves every file; its writer thread makes full packs and their index
//! files durable as they fill, so a crash loses only the commit and the
//! next backup reuses those packs.
//!
//! [`IngestFs::commit`] seals the filesystem, finishes every file, builds
//! the restore point with a [`TreeBuilder`] and writes its manifest
//! ([`crate::ingest::commit`]); [`IngestFs::abort`] stops the mover and
//! commits nothing. Durability is the commit's: `fsync` is accepted and
//! does nothing, since a file is not part of any restore point before it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use crate::fs::{
    Attr, Caller, DirEntry, FsError, FsModel, FsResult, RenameMode, SetAttr, SetTime, StatFs,
    ROOT_INO,
};
use crate::ingest::{self, FileWriter, MetaShare, Mover, TreeBuilder, BATCH_BYTES};
use crate::manifest::{BackupStats, Content, Manifest, Node, NodeKind};
use crate::repo::Repository;
use crate::session::NAME_MAX;

type Time = (i64, u32);

fn now() -> Time {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

/// How an ingest mount starts.
#[derive(Clone, Debug)]
pub struct IngestOptions {
    /// Owner and mode of the root directory: the user the backup tool runs
    /// as must be able to write there.
    pub root_uid: u32,
    pub root_gid: u32,
    pub root_mode: u32,
    /// Bytes a file gathers before they are cut and stored.
    pub batch_bytes: usize,
    /// A path on the repository's filesystem, for the free space `statfs`
    /// reports (none: an object store; a large figure is reported).
    pub space_path: Option<PathBuf>,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            root_uid: 0,
            root_gid: 0,
            root_mode: 0o755,
            batch_bytes: BATCH_BYTES,
            space_path: None,
        }
    }
}

/// One file being written: its writer, and its size where `getattr` can
/// read it without waiting for a write in progress.
struct IngestFile {
    writer: Mutex<FileWriter>,
    size: AtomicU64,
}

enum Body {
    Dir(BTreeMap<Vec<u8>, u64>),
    File(Arc<IngestFile>),
    Symlink(Vec<u8>),
}

struct Inode {
    parent: u64,
    name: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
    atime: Time,
    mtime: Time,
    ctime: Time,
    /// False once unlinked; the inode stays while handles hold it open.
    linked: bool,
    open_handles: u32,
    body: Body,
}

impl Inode {
    fn kind(&self) -> NodeKind {
        match self.body {
            Body::Dir(_) => NodeKind::Dir,
            Body::File(_) => NodeKind::File,
            Body::Symlink(_) => NodeKind::Symlink,
        }
    }
}

struct Tree {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
}

impl Tree {
    fn get(&self, ino: u64) -> FsResult<&Inode> {
        self.inodes.get(&ino).ok_or(FsError::NotFound)
    }

    fn get_mut(&mut self, ino: u64) -> FsResult<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(FsError::NotFound)
    }

    fn dir(&self, ino: u64) -> FsResult<&BTreeMap<Vec<u8>, u64>> {
        match &self.get(ino)?.body {
            Body::Dir(children) => Ok(children),
            _ => Err(FsError::NotADirectory),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> FsResult<&mut BTreeMap<Vec<u8>, u64>> {
        match &mut self.get_mut(ino)?.body {
            Body::Dir(children) => Ok(children),
            _ => Err(FsError::NotADirectory),
        }
    }

    fn child(&self, parent: u64, name: &[u8]) -> FsResult<u64> {
        self.dir(parent)?
            .get(name)
            .copied()
            .ok_or(FsError::NotFound)
    }

    /// Whether `ino` is `dir` or below it.
    fn is_within(&self, mut ino: u64, dir: u64) -> bool {
        loop {
            if ino == dir {
                return true;
            }
            if ino == ROOT_INO {
                return false;
            }
            match self.inodes.get(&ino) {
                Some(node) => ino = node.parent,
                None => return false,
            }
        }
    }

    /// Takes `ino` out of its directory; the inode goes too unless a
    /// handle holds it open.
    fn unlink_ino(&mut self, ino: u64) {
        let Some(node) = self.inodes.get_mut(&ino) else {
            return;
        };
        node.linked = false;
        let (parent, name, open) = (node.parent, node.name.clone(), node.open_handles);
        if let Ok(children) = self.dir_mut(parent) {
            if children.get(&name) == Some(&ino) {
                children.remove(&name);
            }
        }
        if open == 0 {
            self.inodes.remove(&ino);
        }
    }

    /// Changes of a directory's entries touch its times.
    fn touch(&mut self, ino: u64, t: Time) {
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.mtime = t;
            node.ctime = t;
        }
    }
}

struct Handle {
    ino: u64,
    file: Arc<IngestFile>,
}

/// Where the ingest is: taking writes, or done (committed, or aborted or
/// failed: either way nothing more is accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    Sealed,
}

/// Counters for the mount's closing message.
#[derive(Default, Debug)]
pub struct IngestCounters {
    pub writes: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Writes into a range already stored (patched headers).
    pub rewrites: AtomicU64,
    pub reads: AtomicU64,
    pub failed_writes: AtomicU64,
}

/// The ingest filesystem; see the module documentation.
pub struct IngestFs {
    mover: Arc<Mover<Arc<Repository>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Closed files go to a thread that stores their final chunks: a
    /// release answered at once keeps the kernel from holding the mount
    /// busy (it waits for the reply before an unmount can pass).
    settle_tx: Mutex<Option<crossbeam_channel::Sender<Arc<IngestFile>>>>,
    settle_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    share: MetaShare,
    options: IngestOptions,
    started: Instant,
    start_time: i64,
    /// Writes hold it shared; sealing takes it exclusive, so a commit
    /// never races a write in progress.
    phase: RwLock<Phase>,
    tree: Mutex<Tree>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    pub counters: IngestCounters,
}

/// The core's errors as the mount reports them: a full disk says so.
fn fs_error(e: crate::Error) -> FsError {
    let no_space = |msg: &str| msg.contains("No space left") || msg.contains("os error 28");
    match &e {
        crate::Error::Io { source, .. }
            if source.raw_os_error() == Some(28)
                || source.kind() == std::io::ErrorKind::StorageFull =>
        {
            FsError::NoSpace
        }
        crate::Error::Storage(msg) if no_space(msg) => FsError::NoSpace,
        _ => FsError::from(e),
    }
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(FsError::InvalidArgument);
    }
    Ok(())
}

impl IngestFs {
    /// Starts an ingest into `repo`: the mover's writer runs on a thread of
    /// its own until [`IngestFs::commit`] or [`IngestFs::abort`].
    pub fn new(repo: Arc<Repository>, options: IngestOptions) -> crate::Result<Arc<IngestFs>> {
        let mover = Arc::new(Mover::new(repo)?);
        let writer = mover.clone();
        let thread = std::thread::Builder::new()
            .name("flr-ingest-packs".into())
            .spawn(move || writer.run_writer())
            .map_err(|e| crate::Error::Storage(format!("cannot start the pack writer: {e}")))?;
        let (settle_tx, settle_rx) = crossbeam_channel::unbounded::<Arc<IngestFile>>();
        let settler = mover.clone();
        let settle_thread = std::thread::Builder::new()
            .name("flr-ingest-settle".into())
            .spawn(move || {
                for file in settle_rx {
                    if let Err(e) = file.writer.lock().settle(&*settler) {
                        tracing::warn!("storing a closed file's data failed: {e}");
                    }
                }
            })
            .map_err(|e| crate::Error::Storage(format!("cannot start the ingest: {e}")))?;
        let t = now();
        let root = Inode {
            parent: ROOT_INO,
            name: Vec::new(),
            mode: options.root_mode & 0o7777,
            uid: options.root_uid,
            gid: options.root_gid,
            atime: t,
            mtime: t,
            ctime: t,
            linked: true,
            open_handles: 0,
            body: Body::Dir(BTreeMap::new()),
        };
        Ok(Arc::new(IngestFs {
            mover,
            writer_thread: Mutex::new(Some(thread)),
            settle_tx: Mutex::new(Some(settle_tx)),
            settle_thread: Mutex::new(Some(settle_thread)),
            share: MetaShare::default(),
            options,
            started: Instant::now(),
            start_time: t.0,
            phase: RwLock::new(Phase::Open),
            tree: Mutex::new(Tree {
                inodes: HashMap::from([(ROOT_INO, root)]),
                next_ino: ROOT_INO + 1,
            }),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            counters: IngestCounters::default(),
        }))
    }

    /// Ends the pack writer once it has written what it was handed, and
    /// waits for it. Runs once; later calls return at once.
    fn stop_mover(&self) {
        self.stop_settler();
        let Some(thread) = self.writer_thread.lock().take() else {
            return;
        };
        self.mover.close();
        if thread.join().is_err() {
            tracing::error!("the ingest's pack writer panicked");
        }
    }

    /// Ends the thread that stores closed files' chunks, once it has
    /// stored what it was handed.
    fn stop_settler(&self) {
        drop(self.settle_tx.lock().take());
        if let Some(thread) = self.settle_thread.lock().take() {
            if thread.join().is_err() {
                tracing::error!("the ingest's settle thread panicked");
            }
        }
    }

    /// Seals the filesystem; fails if it was sealed already.
    fn seal(&self) -> crate::Result<()> {
        let mut phase = self.phase.write();
        if *phase != Phase::Open {
            return Err(crate::Error::InvalidInput(
                "this ingest was already committed or aborted".into(),
            ));
        }
        *phase = Phase::Sealed;
        Ok(())
    }

    /// Commits one restore point of `job` holding every file, directory
    /// and symlink written, named by the time the ingest started. Nothing
    /// is visible unless this succeeds; either way the ingest is over.
    pub fn commit(&self, job: &str, hostname: &str) -> crate::Result<Manifest> {
        crate::manifest::validate_job_name(job)?;
        self.seal()?;
        // Closed files' chunks first, so no store runs beside the commit.
        self.stop_settler();
        let outcome = self.build_and_commit(job, hostname);
        self.stop_mover();
        match &outcome {
            Ok(m) => tracing::debug!(
                "committed {}: {} files, {} bytes, {} added",
                m.full_name(),
                m.stats.files,
                m.stats.logical_bytes,
                m.stats.added_bytes()
            ),
            // The caller reports it.
            Err(e) => tracing::debug!("the ingest's commit failed: {e}"),
        }
        outcome
    }

    fn build_and_commit(&self, job: &str, hostname: &str) -> crate::Result<Manifest> {
        let tree = std::mem::replace(
            &mut *self.tree.lock(),
            Tree {
                inodes: HashMap::new(),
                next_ino: 0,
            },
        );
        let root = tree.get(ROOT_INO).map_err(|_| {
            crate::Error::InvalidInput("the ingest's root directory is gone".into())
        })?;
        let mut builder = TreeBuilder::new(node_of(root, Content::Empty, 0));
        let mut stats = BackupStats::default();
        // Parents before children, so every put finds its directory.
        let mut todo: Vec<(u64, Vec<u8>)> = vec![(ROOT_INO, Vec::new())];
        while let Some((dir, path)) = todo.pop() {
            let Ok(children) = tree.dir(dir) else {
                continue;
            };
            for (name, &ino) in children {
                let node = tree.get(ino).expect("listed inodes exist");
                let mut child_path = path.clone();
                if !child_path.is_empty() {
                    child_path.push(b'/');
                }
                child_path.extend_from_slice(name);
                let entry = match &node.body {
                    Body::Dir(_) => {
                        todo.push((ino, child_path.clone()));
                        node_of(node, Content::Empty, 0)
                    }
                    Body::Symlink(target) => {
                        let mut n = node_of(node, Content::Empty, target.len() as u64);
                        n.target = target.clone();
                        n
                    }
                    Body::File(file) => {
                        let writer = std::mem::replace(
                            &mut *file.writer.lock(),
                            FileWriter::new(b"", None, 1),
                        );
                        let (content, size, file_stats) =
                            writer.finish(&*self.mover).map_err(|e| {
                                let path = String::from_utf8_lossy(&child_path);
                                match e {
                                    crate::Error::Storage(msg) => {
                                        crate::Error::Storage(format!("{path}: {msg}"))
                                    }
                                    other => crate::Error::Storage(format!("{path}: {other}")),
                                }
                            })?;
                        ingest::add_stats(&mut stats, &file_stats);
                        node_of(node, content, size)
                    }
                };
                builder.put(&child_path, entry)?;
            }
        }
        let nodes = builder.into_nodes();
        ingest::count_nodes(&nodes, &mut stats);
        stats.duration_ms = self.started.elapsed().as_millis() as u64;
        ingest::commit(
            &*self.mover,
            job,
            hostname,
            self.start_time,
            nodes,
            stats,
            &self.share,
        )
    }

    /// Ends the ingest without a restore point. The pack being filled is
    /// written too, so the next backup of the same data finds all of it
    /// but the files' last unstored bytes (a crash loses that pack).
    pub fn abort(&self) {
        if self.seal().is_ok() {
            self.stop_settler();
            if let Err(e) = self.mover.flush() {
                tracing::warn!("writing the last pack of an aborted ingest failed: {e}");
            }
        }
        self.stop_mover();
        tracing::debug!("ingest aborted: nothing committed");
    }

    /// Whether the ingest has been committed or aborted.
    pub fn is_sealed(&self) -> bool {
        *self.phase.read() != Phase::Open
    }

    fn attr_of(&self, tree: &Tree, ino: u64) -> FsResult<Attr> {
        let node = tree.get(ino)?;
        let (size, nlink) = match &node.body {
            Body::Dir(children) => {
                // `find` trusts a directory's link count to skip leaves.
                let subdirs = children
                    .values()
                    .filter(
                        |c| matches!(tree.inodes.get(c), Some(n) if matches!(n.body, Body::Dir(_))),
                    )
                    .count();
                (0, 2 + subdirs as u32)
            }
            Body::File(f) => (f.size.load(Ordering::Relaxed), u32::from(node.linked)),
            Body::Symlink(t) => (t.len() as u64, 1),
        };
        Ok(Attr {
            ino,
            kind: node.kind(),
            size,
            blocks: size.div_ceil(512),
            mode: node.mode,
            uid: node.uid,
            gid: node.gid,
            mtime_sec: node.mtime.0,
            mtime_nsec: node.mtime.1,
            atime: node.atime,
            ctime: node.ctime,
            nlink,
            rdev: 0,
        })
    }

    fn open_phase(&self) -> FsResult<parking_lot::RwLockReadGuard<'_, Phase>> {
        let phase = self.phase.read();
        if *phase != Phase::Open {
            return Err(FsError::ReadOnly);
        }
        Ok(phase)
    }

    /// Adds a node named `name` to directory `parent`.
    fn add_node(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        caller: Caller,
        body: Body,
    ) -> FsResult<Attr> {
        check_name(name)?;
        let mut tree = self.tree.lock();
        if tree.dir(parent)?.contains_key(name) {
            return Err(FsError::Exists);
        }
        let ino = tree.next_ino;
        tree.next_ino += 1;
        let t = now();
        tree.inodes.insert(
            ino,
            Inode {
                parent,
                name: name.to_vec(),
                mode: mode & 0o7777,
                uid: caller.uid,
                gid: caller.gid,
                atime: t,
                mtime: t,
                ctime: t,
                linked: true,
                open_handles: 0,
                body,
            },
        );
        tree.dir_mut(parent)?.insert(name.to_vec(), ino);
        tree.touch(parent, t);
        self.attr_of(&tree, ino)
    }

    fn new_writer(&self, name: &[u8]) -> FileWriter {
        FileWriter::new(name, None, self.options.batch_bytes).with_share(self.share.clone())
    }

    /// Sets a file's length; to 0 it starts over with a new writer (and a
    /// chunker chosen again from what is written next).
    fn set_file_len(&self, name: &[u8], file: &IngestFile, len: u64) -> FsResult<()> {
        let mut writer = file.writer.lock();
        if len == 0 {
            *writer = self.new_writer(name);
        } else {
            writer.set_len(&*self.mover, len).map_err(fs_error)?;
        }
        file.size.store(writer.size(), Ordering::Relaxed);
        Ok(())
    }

    fn file_of(&self, ino: u64) -> FsResult<(Vec<u8>, Arc<IngestFile>)> {
        let tree = self.tree.lock();
        let node = tree.get(ino)?;
        match &node.body {
            Body::File(f) => Ok((node.name.clone(), f.clone())),
            Body::Dir(_) => Err(FsError::IsADirectory),
            Body::Symlink(_) => Err(FsError::InvalidArgument),
        }
    }

    fn handle(&self, fh: u64) -> FsResult<(u64, Arc<IngestFile>)> {
        let handles = self.handles.lock();
        let h = handles.get(&fh).ok_or(FsError::BadHandle)?;
        Ok((h.ino, h.file.clone()))
    }

    fn touch_file(&self, ino: u64) {
        let t = now();
        self.tree.lock().touch(ino, t);
    }
}

/// A restore point node with an inode's metadata.
fn node_of(node: &Inode, content: Content, size: u64) -> Node {
    Node {
        parent: 0,
        name: Vec::new(),
        kind: node.kind(),
        mode: node.mode,
        uid: node.uid,
        gid: node.gid,
        mtime_sec: node.mtime.0,
        mtime_nsec: node.mtime.1,
        size,
        target: Vec::new(),
        content,
    }
}

impl Drop for IngestFs {
    fn drop(&mut self) {
        // Dropped without a commit: the writer must not outlive us.
        self.stop_mover();
    }
}

impl FsModel for IngestFs {
    fn writable(&self) -> bool {
        true
    }

    fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.attr_of(&self.tree.lock(), ino)
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let tree = self.tree.lock();
        let ino = tree.child(parent, name)?;
        self.attr_of(&tree, ino)
    }

    fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let tree = self.tree.lock();
        let children = tree.dir(ino)?;
        Ok(children
            .iter()
            .filter_map(|(name, &child)| {
                let node = tree.inodes.get(&child)?;
                Some(DirEntry {
                    ino: child,
                    kind: node.kind(),
                    name: name.clone(),
                })
            })
            .collect())
    }

    fn parent(&self, ino: u64) -> FsResult<u64> {
        Ok(self.tree.lock().get(ino)?.parent)
    }

    fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        match &self.tree.lock().get(ino)?.body {
            Body::Symlink(t) => Ok(t.clone()),
            _ => Err(FsError::NotASymlink),
        }
    }

    fn open(&self, ino: u64, write: bool, truncate: bool) -> FsResult<u64> {
        let _phase = if write || truncate {
            Some(self.open_phase()?)
        } else {
            None
        };
        let (name, file) = self.file_of(ino)?;
        if truncate {
            self.set_file_len(&name, &file, 0)?;
            self.touch_file(ino);
        }
        let mut tree = self.tree.lock();
        // Unlinked meanwhile: the file is gone for new opens.
        tree.get_mut(ino)?.open_handles += 1;
        drop(tree);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Handle { ino, file });
        Ok(fh)
    }

    fn release(&self, fh: u64) {
        let Some(h) = self.handles.lock().remove(&fh) else {
            return;
        };
        let mut tree = self.tree.lock();
        let Some(node) = tree.inodes.get_mut(&h.ino) else {
            return;
        };
        node.open_handles = node.open_handles.saturating_sub(1);
        let (last, linked) = (node.open_handles == 0, node.linked);
        if last && !linked {
            tree.inodes.remove(&h.ino);
            return;
        }
        drop(tree);
        if last && !self.is_sealed() {
            // Closed for now: store what is final, keep one chunk at most.
            if let Some(tx) = &*self.settle_tx.lock() {
                let _ = tx.send(h.file);
            }
        }
    }

    fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let (_, file) = self.handle(fh)?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        let writer = file.writer.lock();
        writer
            .read_at(&*self.mover, offset, size as usize)
            .map_err(fs_error)
    }

    fn statfs(&self) -> StatFs {
        let written = self.counters.bytes_written.load(Ordering::Relaxed);
        let free = self
            .options
            .space_path
            .as_deref()
            .and_then(crate::session::free_space)
            .unwrap_or(1 << 50);
        StatFs {
            total_bytes: written + free,
            free_bytes: free,
            files: self.tree.lock().inodes.len() as u64,
            free_files: free / 4096,
        }
    }

    fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        let _phase = self.open_phase()?;
        if let Some(len) = set.size {
            let (name, file) = self.file_of(ino)?;
            self.set_file_len(&name, &file, len)?;
        }
        let t = now();
        let mut tree = self.tree.lock();
        let node = tree.get_mut(ino)?;
        if let Some(mode) = set.mode {
            node.mode = mode & 0o7777;
        }
        if let Some(uid) = set.uid {
            node.uid = uid;
        }
        if let Some(gid) = set.gid {
            node.gid = gid;
        }
        let at = |s: SetTime| match s {
            SetTime::Now => t,
            SetTime::At(sec, nsec) => (sec, nsec),
        };
        if let Some(a) = set.atime {
            node.atime = at(a);
        }
        if let Some(m) = set.mtime {
            node.mtime = at(m);
        } else if set.size.is_some() {
            node.mtime = t;
        }
        node.ctime = t;
        self.attr_of(&tree, ino)
    }

    fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        kind: NodeKind,
        mode: u32,
        _rdev: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        let _phase = self.open_phase()?;
        if kind != NodeKind::File {
            // A restore point holds no pipes, sockets or device nodes.
            return Err(FsError::NotPermitted);
        }
        let file = Arc::new(IngestFile {
            writer: Mutex::new(self.new_writer(name)),
            size: AtomicU64::new(0),
        });
        self.add_node(parent, name, mode, caller, Body::File(file))
    }

    fn mkdir(&self, parent: u64, name: &[u8], mode: u32, caller: Caller) -> FsResult<Attr> {
        let _phase = self.open_phase()?;
        self.add_node(parent, name, mode, caller, Body::Dir(BTreeMap::new()))
    }

    fn symlink(&self, parent: u64, name: &[u8], target: &[u8], caller: Caller) -> FsResult<Attr> {
        let _phase = self.open_phase()?;
        self.add_node(parent, name, 0o777, caller, Body::Symlink(target.to_vec()))
    }

    fn link(&self, _ino: u64, _parent: u64, _name: &[u8]) -> FsResult<Attr> {
        // A restore point's nodes each have one name.
        Err(FsError::NotPermitted)
    }

    fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        let _phase = self.open_phase()?;
        let mut tree = self.tree.lock();
        let ino = tree.child(parent, name)?;
        if tree.get(ino)?.kind() == NodeKind::Dir {
            return Err(FsError::IsADirectory);
        }
        tree.unlink_ino(ino);
        tree.touch(parent, now());
        Ok(())
    }

    fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        let _phase = self.open_phase()?;
        let mut tree = self.tree.lock();
        let ino = tree.child(parent, name)?;
        if !tree.dir(ino)?.is_empty() {
            return Err(FsError::NotEmpty);
        }
        tree.unlink_ino(ino);
        tree.touch(parent, now());
        Ok(())
    }

    fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        mode: RenameMode,
    ) -> FsResult<()> {
        let _phase = self.open_phase()?;
        check_name(new_name)?;
        let mut tree = self.tree.lock();
        let ino = tree.child(parent, name)?;
        tree.dir(new_parent)?;
        let is_dir = tree.get(ino)?.kind() == NodeKind::Dir;
        if is_dir && tree.is_within(new_parent, ino) {
            // Into itself or below.
            return Err(FsError::InvalidArgument);
        }
        let existing = tree.dir(new_parent)?.get(new_name).copied();
        match (mode, existing) {
            (RenameMode::Exchange, _) => return Err(FsError::Unsupported),
            (_, Some(old)) if old == ino => return Ok(()),
            (RenameMode::NoReplace, Some(_)) => return Err(FsError::Exists),
            (RenameMode::Replace, Some(old)) => {
                let old_node = tree.get(old)?;
                match (is_dir, old_node.kind() == NodeKind::Dir) {
                    (true, true) => {
                        if !tree.dir(old)?.is_empty() {
                            return Err(FsError::NotEmpty);
                        }
                    }
                    (true, false) => return Err(FsError::NotADirectory),
                    (false, true) => return Err(FsError::IsADirectory),
                    (false, false) => {}
                }
                tree.unlink_ino(old);
            }
            (_, None) => {}
        }
        tree.dir_mut(parent)?.remove(name);
        tree.dir_mut(new_parent)?.insert(new_name.to_vec(), ino);
        let t = now();
        let node = tree.get_mut(ino)?;
        node.parent = new_parent;
        node.name = new_name.to_vec();
        node.ctime = t;
        tree.touch(parent, t);
        tree.touch(new_parent, t);
        Ok(())
    }

    fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let _phase = self.open_phase()?;
        let (ino, file) = self.handle(fh)?;
        let result = {
            let mut writer = file.writer.lock();
            if offset < writer.size() {
                self.counters.rewrites.fetch_add(1, Ordering::Relaxed);
            }
            let r = writer.write_at(&*self.mover, offset, data);
            file.size.store(writer.size(), Ordering::Relaxed);
            r
        };
        if let Err(e) = result {
            // The first failure is logged; after it, most writes fail alike.
            if self.counters.failed_writes.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::error!("a write of {} bytes at {offset} failed: {e}", data.len());
            }
            return Err(fs_error(e));
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.touch_file(ino);
        Ok(data.len() as u32)
    }

    fn fallocate(&self, ino: u64, offset: u64, len: u64, keep_size: bool) -> FsResult<()> {
        let _phase = self.open_phase()?;
        let (name, file) = self.file_of(ino)?;
        let end = offset.saturating_add(len);
        if keep_size || end <= file.size.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.set_file_len(&name, &file, end)?;
        self.touch_file(ino);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const ME: Caller = Caller { uid: 1, gid: 2 };

    fn new_fs() -> Arc<IngestFs> {
        let store = Arc::new(MemoryStore::new());
        Repository::init(store.as_ref(), None).unwrap();
        let repo = Repository::open(store, || unreachable!("not encrypted")).unwrap();
        IngestFs::new(Arc::new(repo), IngestOptions::default()).unwrap()
    }

    #[test]
    fn a_full_disk_is_reported_as_such() {
        let full = crate::Error::io("packs/ab", std::io::Error::from_raw_os_error(28));
        assert_eq!(fs_error(full), FsError::NoSpace);
        let later = crate::Error::Storage("packs/ab: No space left on device (os error 28)".into());
        assert_eq!(fs_error(later), FsError::NoSpace);
        let other = crate::Error::Storage("permission denied".into());
        assert!(matches!(fs_error(other), FsError::Io(_)));
    }

    #[test]
    fn names_that_cannot_be_stored_are_refused() {
        let fs = new_fs();
        for bad in [&b""[..], b".", b"..", b"a/b"] {
            assert_eq!(
                fs.mkdir(ROOT_INO, bad, 0o755, ME),
                Err(FsError::InvalidArgument)
            );
        }
        let long = vec![b'x'; NAME_MAX + 1];
        assert_eq!(
            fs.mkdir(ROOT_INO, &long, 0o755, ME),
            Err(FsError::NameTooLong)
        );
        fs.mkdir(ROOT_INO, b"d", 0o755, ME).unwrap();
        assert_eq!(fs.mkdir(ROOT_INO, b"d", 0o755, ME), Err(FsError::Exists));
    }

    #[test]
    fn a_directory_cannot_move_below_itself_and_kinds_must_match() {
        let fs = new_fs();
        let a = fs.mkdir(ROOT_INO, b"a", 0o755, ME).unwrap();
        let b = fs.mkdir(a.ino, b"b", 0o755, ME).unwrap();
        assert_eq!(
            fs.rename(ROOT_INO, b"a", b.ino, b"a", RenameMode::Replace),
            Err(FsError::InvalidArgument)
        );
        fs.mknod(ROOT_INO, b"f", NodeKind::File, 0o644, 0, ME)
            .unwrap();
        assert_eq!(
            fs.rename(ROOT_INO, b"f", a.ino, b"b", RenameMode::Replace),
            Err(FsError::IsADirectory)
        );
        assert_eq!(
            fs.rename(a.ino, b"b", ROOT_INO, b"f", RenameMode::Replace),
            Err(FsError::NotADirectory)
        );
        assert_eq!(
            fs.rename(a.ino, b"b", ROOT_INO, b"f", RenameMode::NoReplace),
            Err(FsError::Exists)
        );
        fs.rename(a.ino, b"b", ROOT_INO, b"c", RenameMode::Replace)
            .unwrap();
        assert_eq!(fs.parent(b.ino), Ok(ROOT_INO));
        assert_eq!(fs.readdir(a.ino).unwrap(), Vec::new());
    }

    #[test]
    fn an_unlinked_open_file_stays_readable_until_closed() {
        let fs = new_fs();
        let f = fs
            .mknod(ROOT_INO, b"f", NodeKind::File, 0o644, 0, ME)
            .unwrap();
        let fh = fs.open(f.ino, true, false).unwrap();
        fs.write(fh, 0, b"still here").unwrap();
        fs.unlink(ROOT_INO, b"f").unwrap();
        assert_eq!(fs.lookup(ROOT_INO, b"f"), Err(FsError::NotFound));
        assert_eq!(fs.getattr(f.ino).unwrap().nlink, 0);
        assert_eq!(fs.read(fh, 0, 100).unwrap(), b"still here");
        fs.release(fh);
        assert_eq!(fs.getattr(f.ino), Err(FsError::NotFound));
        assert_eq!(fs.read(fh, 0, 1), Err(FsError::BadHandle));
    }
}
