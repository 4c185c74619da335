//! Writable sessions: a copy-on-write layer over one restore point, so a
//! database engine can attach, replay its log and take writes straight
//! from a mount while the restore point stays untouched.
//!
//! [`CowFs`] serves the same [`FsModel`] calls as the read-only
//! [`RepoFs`] it wraps. Nothing is copied up front or on a file's first
//! write: a file that was written keeps
//! - `extents`: the byte ranges written in this session, whose bytes live at
//!   the same offsets in a sparse data file in `data/` named by the node
//!   ([`format::NodeRef::data_file_name`]);
//! - `base_len`: below it, bytes not written come from the restore point;
//!   a shrinking truncate lowers it, so what lies past a truncate reads as
//!   zeros afterwards, never as old data;
//! - `size`: reads past `base_len` that no extent covers are holes.
//!
//! Reads merge the three. The namespace is copied per directory, and only
//! when something in it changes: an untouched directory or file is served
//! from the restore point directly, under its own inode number. New nodes
//! get numbers from [`FIRST_NEW_INO`] up, so numbers never collide.
//!
//! In memory everything is keyed by inode number; the session's files
//! never are (see [`format::NodeRef`]): a record or checkpoint names a
//! restore point node by its manifest index and converts at the boundary,
//! so a session replays correctly whatever numbers the next mount hands
//! out. Replay trusts nothing it reads: a record that does not fit the
//! state is refused with an error naming the file, never a panic.
//!
//! Durability: every change is a record appended to `journal` (a write
//! record after its bytes are in the data file; anything that discards
//! data, before). A process crash keeps everything the kernel accepted;
//! `fsync` flushes the data file and the journal, so a machine crash keeps
//! everything fsynced. `state` is a checkpoint of the whole overlay; the
//! journal restarts after each checkpoint, tagged with the checkpoint's
//! generation so a checkpoint interrupted midway never replays twice.
//!
//! The session directory's layout and its files' formats are described
//! in [`crate::format`], in the section on writable sessions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::backup::Source;
use crate::error::{Error, Result};
use crate::format::{
    self, NodeRef, FIRST_SESSION_NODE, JOURNAL_HEADER_LEN, SESSION_DATA_DIR, SESSION_FORMAT,
    SESSION_INFO_FILE, SESSION_JOURNAL_FILE, SESSION_LOCK_FILE, SESSION_STATE_FILE, STATE_MAGIC,
};
use crate::fs::{
    Attr, Caller, DirEntry, FsError, FsModel, FsResult, RenameMode, RepoFs, SetAttr, SetTime,
    StatFs, ROOT_INO,
};
use crate::manifest::{Content, Node as ManifestNode, NodeKind};

/// Inode numbers of nodes made in a session start here (they are the
/// nodes' session ids); restore point inodes stay below.
pub const FIRST_NEW_INO: u64 = FIRST_SESSION_NODE;

/// Longest file name, as on Linux filesystems.
pub const NAME_MAX: usize = 255;

/// A journal this long is folded into a checkpoint at the next fsync.
const JOURNAL_COMPACT_BYTES: u64 = 64 << 20;
/// Free space is looked up again after this many bytes written.
const SPACE_CHECK_BYTES: u64 = 16 << 20;

const S_ISGID: u32 = 0o2000;

type Time = (i64, u32);

fn now() -> Time {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

/// Byte ranges `[start, end)`, kept disjoint and merged when they touch.
/// Decoding checks that, so a damaged checkpoint cannot make lookups loop.
/// The bytes covered are counted as ranges come and go, so `getattr` of a
/// file written in many places does not walk its ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<u64, u64>")]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
    /// Bytes covered: the sum of the ranges' lengths. Not stored: decoding
    /// sums it once.
    #[serde(skip)]
    covered: u64,
}

impl TryFrom<BTreeMap<u64, u64>> for RangeSet {
    type Error = String;

    fn try_from(ranges: BTreeMap<u64, u64>) -> std::result::Result<Self, String> {
        let mut last_end = None;
        let mut covered = 0u64;
        for (&a, &b) in &ranges {
            if a >= b || last_end.is_some_and(|e| a <= e) {
                return Err(format!("byte range {a}..{b} is empty or overlaps another"));
            }
            last_end = Some(b);
            covered += b - a;
        }
        Ok(RangeSet { ranges, covered })
    }
}

impl RangeSet {
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        let mut absorbed = 0;
        if let Some((&a, &b)) = self.ranges.range(..=s).next_back() {
            if b >= s {
                s = a;
                e = e.max(b);
            }
        }
        let inside: Vec<u64> = self.ranges.range(s..=e).map(|(&a, _)| a).collect();
        for a in inside {
            if let Some(b) = self.ranges.remove(&a) {
                e = e.max(b);
                absorbed += b - a;
            }
        }
        self.ranges.insert(s, e);
        self.covered = self.covered - absorbed + (e - s);
    }

    /// Drops everything at or past `len`.
    pub fn truncate(&mut self, len: u64) {
        let dropped = self.ranges.split_off(&len);
        self.covered -= dropped.iter().map(|(a, b)| b - a).sum::<u64>();
        if let Some((_, b)) = self.ranges.range_mut(..len).next_back() {
            if *b > len {
                self.covered -= *b - len;
                *b = len;
            }
        }
    }

    /// Bytes covered.
    pub fn total(&self) -> u64 {
        self.covered
    }

    /// Where `pos` stands: `(true, end of its range)` inside a range,
    /// `(false, start of the next range or u64::MAX)` outside.
    pub fn at(&self, pos: u64) -> (bool, u64) {
        if let Some((_, &b)) = self.ranges.range(..=pos).next_back() {
            if b > pos {
                return (true, b);
            }
        }
        let next = self
            .ranges
            .range(pos..)
            .next()
            .map_or(u64::MAX, |(&a, _)| a);
        (false, next)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&a, &b)| (a, b))
    }
}

/// Where a run of a file's bytes comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Written in this session: the data file.
    Session,
    /// The restore point's file.
    Base,
    /// A hole: zeros.
    Zero,
}

/// A file's copy-on-write state; see the module comment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    /// The file is the restore point's (the node's own inode there), not
    /// made in the session.
    pub from_restore_point: bool,
    pub base_len: u64,
    pub size: u64,
    pub extents: RangeSet,
    /// The restore point file's size and 512-byte blocks, for `st_blocks`.
    base_size: u64,
    base_blocks: u64,
}

impl FileState {
    /// `[offset, end)` split by source, `end` clamped to the size.
    pub fn pieces(&self, offset: u64, end: u64) -> Vec<(u64, u64, Piece)> {
        let end = end.min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (inside, bound) = self.extents.at(pos);
            let (next, piece) = if inside {
                (bound.min(end), Piece::Session)
            } else if pos < self.base_len && self.from_restore_point {
                (bound.min(end).min(self.base_len), Piece::Base)
            } else {
                (bound.min(end), Piece::Zero)
            };
            out.push((pos, next, piece));
            pos = next;
        }
        out
    }

    fn truncate(&mut self, size: u64) {
        if size < self.size {
            self.extents.truncate(size);
            self.base_len = self.base_len.min(size);
        }
        self.size = size;
    }

    fn blocks(&self) -> u64 {
        let base = if self.base_size == 0 {
            0
        } else {
            // Scaled when a truncate cut the restore point's part.
            (self.base_blocks as u128 * self.base_len as u128 / self.base_size as u128) as u64
        };
        base.saturating_add(self.extents.total().div_ceil(512))
    }
}

/// `N` names other nodes: an inode number in memory, a [`NodeRef`] in the
/// checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Body<N = u64> {
    File(FileState),
    Dir {
        parent: N,
        children: BTreeMap<Vec<u8>, N>,
    },
    Symlink(Vec<u8>),
    /// Pipes, sockets, device nodes.
    Special,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Node<N = u64> {
    kind: NodeKind,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    rdev: u32,
    atime: Time,
    mtime: Time,
    ctime: Time,
    body: Body<N>,
    /// Open handles; an unlinked node lives on until the last closes.
    #[serde(skip)]
    open: u32,
}

impl Node {
    fn attr(&self, ino: u64) -> Attr {
        let (size, blocks) = match &self.body {
            Body::File(f) => (f.size, f.blocks()),
            Body::Symlink(t) => (t.len() as u64, 0),
            _ => (0, 0),
        };
        Attr {
            ino,
            kind: self.kind,
            size,
            blocks,
            mode: self.mode & 0o7777,
            uid: self.uid,
            gid: self.gid,
            mtime_sec: self.mtime.0,
            mtime_nsec: self.mtime.1,
            atime: self.atime,
            ctime: self.ctime,
            nlink: self.nlink,
            rdev: self.rdev,
        }
    }

    fn file(&mut self) -> FsResult<&mut FileState> {
        match &mut self.body {
            Body::File(f) => Ok(f),
            Body::Dir { .. } => Err(FsError::IsADirectory),
            _ => Err(FsError::InvalidArgument),
        }
    }

    fn children(&self) -> FsResult<&BTreeMap<Vec<u8>, u64>> {
        match &self.body {
            Body::Dir { children, .. } if self.nlink > 0 => Ok(children),
            Body::Dir { .. } => Err(FsError::NotFound),
            _ => Err(FsError::NotADirectory),
        }
    }

    fn children_mut(&mut self) -> FsResult<&mut BTreeMap<Vec<u8>, u64>> {
        match &mut self.body {
            Body::Dir { children, .. } => Ok(children),
            _ => Err(FsError::NotADirectory),
        }
    }

    fn touch(&mut self, t: Time) {
        self.mtime = t;
        self.ctime = t;
    }
}

/// One journal record: a change, with the times it set, so replaying
/// gives the same attributes. `N` names nodes: an inode number in memory, a
/// [`NodeRef`] in the journal. The variants' order is the wire format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Op<N = u64> {
    Make {
        parent: N,
        name: Vec<u8>,
        ino: N,
        kind: NodeKind,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Vec<u8>,
        time: Time,
    },
    Link {
        ino: N,
        parent: N,
        name: Vec<u8>,
        time: Time,
    },
    Remove {
        parent: N,
        name: Vec<u8>,
        dir: bool,
        time: Time,
    },
    Rename {
        parent: N,
        name: Vec<u8>,
        new_parent: N,
        new_name: Vec<u8>,
        exchange: bool,
        no_replace: bool,
        time: Time,
    },
    SetAttr {
        ino: N,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<Time>,
        mtime: Option<Time>,
        time: Time,
    },
    Write {
        ino: N,
        offset: u64,
        len: u64,
        time: Time,
    },
}

impl<N> Op<N> {
    /// The same change with nodes named by `f`.
    fn map<M, E>(
        &self,
        mut f: impl FnMut(&N) -> std::result::Result<M, E>,
    ) -> std::result::Result<Op<M>, E> {
        Ok(match self {
            Op::Make {
                parent,
                name,
                ino,
                kind,
                mode,
                uid,
                gid,
                rdev,
                target,
                time,
            } => Op::Make {
                parent: f(parent)?,
                name: name.clone(),
                ino: f(ino)?,
                kind: *kind,
                mode: *mode,
                uid: *uid,
                gid: *gid,
                rdev: *rdev,
                target: target.clone(),
                time: *time,
            },
            Op::Link {
                ino,
                parent,
                name,
                time,
            } => Op::Link {
                ino: f(ino)?,
                parent: f(parent)?,
                name: name.clone(),
                time: *time,
            },
            Op::Remove {
                parent,
                name,
                dir,
                time,
            } => Op::Remove {
                parent: f(parent)?,
                name: name.clone(),
                dir: *dir,
                time: *time,
            },
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                exchange,
                no_replace,
                time,
            } => Op::Rename {
                parent: f(parent)?,
                name: name.clone(),
                new_parent: f(new_parent)?,
                new_name: new_name.clone(),
                exchange: *exchange,
                no_replace: *no_replace,
                time: *time,
            },
            Op::SetAttr {
                ino,
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
                time,
            } => Op::SetAttr {
                ino: f(ino)?,
                mode: *mode,
                uid: *uid,
                gid: *gid,
                size: *size,
                atime: *atime,
                mtime: *mtime,
                time: *time,
            },
            Op::Write {
                ino,
                offset,
                len,
                time,
            } => Op::Write {
                ino: f(ino)?,
                offset: *offset,
                len: *len,
                time: *time,
            },
        })
    }
}

impl<N> Node<N> {
    /// The same node with the nodes it names renamed by `f`.
    fn map<M, E>(
        &self,
        mut f: impl FnMut(&N) -> std::result::Result<M, E>,
    ) -> std::result::Result<Node<M>, E> {
        let body = match &self.body {
            Body::File(file) => Body::File(file.clone()),
            Body::Dir { parent, children } => Body::Dir {
                parent: f(parent)?,
                children: children
                    .iter()
                    .map(|(name, c)| Ok((name.clone(), f(c)?)))
                    .collect::<std::result::Result<_, E>>()?,
            },
            Body::Symlink(target) => Body::Symlink(target.clone()),
            Body::Special => Body::Special,
        };
        Ok(Node {
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            nlink: self.nlink,
            rdev: self.rdev,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            body,
            open: self.open,
        })
    }
}

/// A checkpoint of the overlay, as stored in `state`.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Snapshot {
    /// [`SESSION_FORMAT`], so the file says what it is on its own.
    format: u32,
    generation: u64,
    /// The id the next node made in the session gets.
    next_id: u64,
    nodes: Vec<(NodeRef, Node<NodeRef>)>,
}

/// The stored name of the node with inode `ino`.
fn node_ref(base: &RepoFs, ino: u64) -> FsResult<NodeRef> {
    if ino >= FIRST_NEW_INO {
        return Ok(NodeRef::Session(ino));
    }
    base.node_index(ROOT_INO, ino)
        .map(NodeRef::RestorePoint)
        .map_err(|_| FsError::Corrupt(format!("inode {ino} is not a node of the restore point")))
}

/// The inode of a stored node name. Fails for a restore point node the
/// manifest does not have, or a session id out of the session's range.
fn node_ino(base: &RepoFs, r: NodeRef) -> std::result::Result<u64, String> {
    match r {
        NodeRef::Session(id) if id >= FIRST_NEW_INO => Ok(id),
        NodeRef::Session(id) => Err(format!("session node id {id} is below the session range")),
        NodeRef::RestorePoint(i) => base
            .node_ino(ROOT_INO, i)
            .map_err(|e| format!("restore point node {i}: {e}")),
    }
}

/// The append-only change log.
struct Journal {
    file: File,
    len: u64,
    generation: u64,
    /// Records appended since the last sync.
    unsynced: bool,
}

impl Journal {
    fn create(path: &Path, generation: u64) -> Result<Journal> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format::journal_header(generation)).map_err(|e| Error::io(&tmp, e))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
        Self::open_at(path, generation, JOURNAL_HEADER_LEN as u64)
    }

    fn open_at(path: &Path, generation: u64, len: u64) -> Result<Journal> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Journal {
            file,
            len,
            generation,
            unsynced: false,
        })
    }

    /// Reads a journal: its generation, its records, and the length of the
    /// intact part (a record torn by a crash ends it).
    fn load(path: &Path) -> Result<(u64, Vec<Op<NodeRef>>, u64)> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        decode_journal(&path.display().to_string(), &bytes)
    }

    fn append(&mut self, op: &Op<NodeRef>) -> FsResult<()> {
        let record = encode_record(op).map_err(|e| FsError::SessionIo(e.to_string()))?;
        crate::restore::write_at(&self.file, &record, self.len)
            .map_err(|e| FsError::session_io("session journal", &e))?;
        self.len += record.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    fn sync(&mut self) -> FsResult<()> {
        if self.unsynced {
            self.file
                .sync_data()
                .map_err(|e| FsError::session_io("session journal", &e))?;
            self.unsynced = false;
        }
        Ok(())
    }
}

/// One journal record, framed.
fn encode_record(op: &Op<NodeRef>) -> Result<Vec<u8>> {
    let payload = postcard::to_allocvec(op)
        .map_err(|e| Error::InvalidInput(format!("journal record does not encode: {e}")))?;
    format::journal_record(&payload)
}

/// A journal's generation, records, and the length of its intact part.
/// `what` names the file in errors.
fn decode_journal(what: &str, bytes: &[u8]) -> Result<(u64, Vec<Op<NodeRef>>, u64)> {
    let generation = format::check_journal_header(what, bytes)?;
    let mut ops = Vec::new();
    let mut pos = JOURNAL_HEADER_LEN;
    while let Some((payload, next)) = format::next_journal_record(bytes, pos) {
        let bad = |why: String| {
            Error::malformed(
                what,
                format!("record at byte {pos} passed its checksum but does not decode: {why}"),
            )
        };
        let (op, rest) = postcard::take_from_bytes(payload).map_err(|e| bad(e.to_string()))?;
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes left over", rest.len())));
        }
        ops.push(op);
        pos = next;
    }
    Ok((generation, ops, pos as u64))
}

/// A checkpoint as stored in `state`.
fn encode_state(snap: &Snapshot) -> Result<Vec<u8>> {
    let payload = postcard::to_allocvec(snap)
        .map_err(|e| Error::InvalidInput(format!("checkpoint does not encode: {e}")))?;
    Ok(format::seal_envelope(STATE_MAGIC, 0, &payload))
}

/// A checkpoint read back (not yet checked against the restore point, see
/// [`Overlay::from_snapshot`]). `what` names the file in errors.
fn decode_state(what: &str, bytes: &[u8]) -> Result<Snapshot> {
    let (flags, payload) = format::open_envelope(what, STATE_MAGIC, bytes)?;
    if flags != 0 {
        return Err(Error::malformed(
            what,
            format!("unexpected flags {flags:#x}"),
        ));
    }
    let (snap, rest) = postcard::take_from_bytes::<Snapshot>(payload)
        .map_err(|e| Error::malformed(what, format!("undecodable: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::malformed(
            what,
            format!("{} bytes after the checkpoint", rest.len()),
        ));
    }
    Ok(snap)
}

/// The in-memory overlay: nodes copied from the restore point or made in
/// the session. Nodes not here are the restore point's, untouched.
struct Overlay {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
}

/// What [`Overlay::apply`] needs besides the change.
struct Ctx<'a> {
    base: &'a RepoFs,
    /// `Some` when serving: the record is appended once the change is
    /// known to succeed. `None` when replaying.
    journal: Option<&'a mut Journal>,
    data_dir: &'a Path,
}

impl Ctx<'_> {
    fn record(&mut self, op: &Op) -> FsResult<()> {
        let Some(journal) = &mut self.journal else {
            return Ok(());
        };
        journal.append(&op.map(|&ino| node_ref(self.base, ino))?)
    }

    fn live(&self) -> bool {
        self.journal.is_some()
    }
}

/// The overlay contradicts itself: only a damaged or forged checkpoint or
/// journal gets here.
fn inconsistent(why: String) -> FsError {
    FsError::Corrupt(format!("session state is inconsistent: {why}"))
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
        return Err(FsError::InvalidArgument);
    }
    Ok(())
}

/// Where the bytes written to `ino` in the session live.
fn data_path(base: &RepoFs, data_dir: &Path, ino: u64) -> FsResult<PathBuf> {
    Ok(data_dir.join(node_ref(base, ino)?.data_file_name()))
}

impl Overlay {
    /// Copies a restore point node into the overlay (metadata only).
    fn materialize(&mut self, base: &RepoFs, ino: u64) -> FsResult<()> {
        if self.nodes.contains_key(&ino) {
            return Ok(());
        }
        if ino >= FIRST_NEW_INO {
            return Err(FsError::NotFound);
        }
        let a = base.getattr(ino)?;
        let body = match a.kind {
            NodeKind::Dir => Body::Dir {
                parent: base.parent(ino)?,
                children: base
                    .readdir(ino)?
                    .into_iter()
                    .map(|e| (e.name, e.ino))
                    .collect(),
            },
            NodeKind::File => Body::File(FileState {
                from_restore_point: true,
                base_len: a.size,
                size: a.size,
                extents: RangeSet::default(),
                base_size: a.size,
                base_blocks: a.blocks,
            }),
            NodeKind::Symlink => Body::Symlink(base.readlink(ino)?),
            _ => Body::Special,
        };
        let t = (a.mtime_sec, a.mtime_nsec);
        self.nodes.insert(
            ino,
            Node {
                kind: a.kind,
                // The restore point shows its root without write bits;
                // the session root is writable by its owner.
                mode: if ino == ROOT_INO {
                    a.mode | 0o200
                } else {
                    a.mode
                },
                uid: a.uid,
                gid: a.gid,
                nlink: a.nlink,
                rdev: 0,
                atime: t,
                mtime: t,
                ctime: t,
                body,
                open: 0,
            },
        );
        Ok(())
    }

    fn node(&mut self, base: &RepoFs, ino: u64) -> FsResult<&mut Node> {
        self.materialize(base, ino)?;
        self.nodes.get_mut(&ino).ok_or(FsError::NotFound)
    }

    /// A node already in the overlay (checked, or copied in, before).
    fn get(&mut self, ino: u64) -> FsResult<&mut Node> {
        self.nodes
            .get_mut(&ino)
            .ok_or_else(|| inconsistent(format!("node {ino} went missing")))
    }

    /// A live directory's child, copying the directory into the overlay.
    fn child(&mut self, base: &RepoFs, parent: u64, name: &[u8]) -> FsResult<Option<u64>> {
        Ok(self.node(base, parent)?.children()?.get(name).copied())
    }

    fn dir_parent(&self, base: &RepoFs, ino: u64) -> FsResult<u64> {
        match self.nodes.get(&ino) {
            Some(Node {
                body: Body::Dir { parent, .. },
                ..
            }) => Ok(*parent),
            Some(_) => Err(FsError::NotADirectory),
            None => base.parent(ino),
        }
    }

    /// Whether directory `dir` is `ancestor` or lies under it.
    fn is_within(&self, base: &RepoFs, mut dir: u64, ancestor: u64) -> FsResult<bool> {
        let mut seen = HashSet::new();
        loop {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            if !seen.insert(dir) {
                return Err(inconsistent(format!("directory {dir} lies under itself")));
            }
            dir = self.dir_parent(base, dir)?;
        }
    }

    /// The link count directory `dir` is left with when a subdirectory
    /// leaves it: one fewer, never below the two of an empty directory.
    fn links_without_subdir(&self, dir: u64) -> FsResult<u32> {
        let links = self.nodes.get(&dir).map_or(0, |n| n.nlink);
        if links < 3 {
            return Err(inconsistent(format!(
                "directory {dir} holds a directory but has {links} links"
            )));
        }
        Ok(links - 1)
    }

    /// The link count directory `dir` gets when a subdirectory joins it.
    fn links_with_subdir(&self, dir: u64) -> FsResult<u32> {
        let links = self.nodes.get(&dir).map_or(0, |n| n.nlink);
        links
            .checked_add(1)
            .ok_or_else(|| inconsistent(format!("directory {dir} has too many links")))
    }

    /// Drops a node no name and no handle refers to, with its data.
    fn reap(&mut self, base: &RepoFs, data_dir: &Path, ino: u64) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        if node.nlink > 0 || node.open > 0 {
            return;
        }
        let was_file = matches!(node.body, Body::File(_));
        if ino >= FIRST_NEW_INO {
            self.nodes.remove(&ino);
        } else {
            // A restore point node stays as a tombstone, so its inode is
            // not served from the restore point again.
            node.body = Body::Special;
        }
        if was_file {
            if let Ok(path) = data_path(base, data_dir, ino) {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Applies one change: checks it, records it (when serving), then
    /// makes it. Replaying applies the same records in the same order.
    /// Everything a change needs is checked before it is recorded; what is
    /// checked again after only fails on a damaged session.
    fn apply(&mut self, cx: &mut Ctx, op: &Op) -> FsResult<Option<u64>> {
        let base = cx.base;
        match op {
            Op::Make {
                parent,
                name,
                ino,
                kind,
                mode,
                uid,
                gid,
                rdev,
                target,
                time,
            } => {
                check_name(name)?;
                if self.child(base, *parent, name)?.is_some() {
                    return Err(FsError::Exists);
                }
                // Ids are handed out in order and never reused: anything
                // else would overwrite a node.
                if *ino < self.next_ino.max(FIRST_NEW_INO)
                    || *ino == u64::MAX
                    || self.nodes.contains_key(ino)
                {
                    return Err(inconsistent(format!("{ino} is not a new node id")));
                }
                let is_dir = *kind == NodeKind::Dir;
                let parent_links = if is_dir {
                    self.links_with_subdir(*parent)?
                } else {
                    self.get(*parent)?.nlink
                };
                cx.record(op)?;
                self.next_ino = ino + 1;
                let body = match kind {
                    NodeKind::Dir => Body::Dir {
                        parent: *parent,
                        children: BTreeMap::new(),
                    },
                    NodeKind::File => Body::File(FileState::default()),
                    NodeKind::Symlink => Body::Symlink(target.clone()),
                    _ => Body::Special,
                };
                self.nodes.insert(
                    *ino,
                    Node {
                        kind: *kind,
                        mode: *mode,
                        uid: *uid,
                        gid: *gid,
                        nlink: if is_dir { 2 } else { 1 },
                        rdev: *rdev,
                        atime: *time,
                        mtime: *time,
                        ctime: *time,
                        body,
                        open: 0,
                    },
                );
                let p = self.get(*parent)?;
                p.children_mut()?.insert(name.clone(), *ino);
                p.touch(*time);
                p.nlink = parent_links;
                Ok(Some(*ino))
            }
            Op::Link {
                ino,
                parent,
                name,
                time,
            } => {
                check_name(name)?;
                let node = self.node(base, *ino)?;
                if node.kind == NodeKind::Dir {
                    return Err(FsError::NotPermitted);
                }
                if node.nlink == 0 {
                    return Err(FsError::NotFound);
                }
                let links = node
                    .nlink
                    .checked_add(1)
                    .ok_or_else(|| inconsistent(format!("node {ino} has too many links")))?;
                if self.child(base, *parent, name)?.is_some() {
                    return Err(FsError::Exists);
                }
                cx.record(op)?;
                let node = self.get(*ino)?;
                node.nlink = links;
                node.ctime = *time;
                let p = self.get(*parent)?;
                p.children_mut()?.insert(name.clone(), *ino);
                p.touch(*time);
                Ok(Some(*ino))
            }
            Op::Remove {
                parent,
                name,
                dir,
                time,
            } => {
                let ino = self.child(base, *parent, name)?.ok_or(FsError::NotFound)?;
                let node = self.node(base, ino)?;
                match (&node.body, dir) {
                    (Body::Dir { children, .. }, true) => {
                        if !children.is_empty() {
                            return Err(FsError::NotEmpty);
                        }
                        self.links_without_subdir(*parent)?;
                    }
                    (Body::Dir { .. }, false) => return Err(FsError::IsADirectory),
                    (_, true) => return Err(FsError::NotADirectory),
                    (_, false) => {}
                }
                cx.record(op)?;
                self.detach(base, cx.data_dir, *parent, name, ino, *time)?;
                Ok(None)
            }
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                exchange,
                no_replace,
                time,
            } => {
                check_name(new_name)?;
                let src = self.child(base, *parent, name)?.ok_or(FsError::NotFound)?;
                let dst = self.child(base, *new_parent, new_name)?;
                let src_dir = matches!(self.node(base, src)?.body, Body::Dir { .. });
                let moves = parent != new_parent;
                if src_dir && moves && self.is_within(base, *new_parent, src)? {
                    return Err(FsError::InvalidArgument);
                }
                if src_dir && moves {
                    self.links_without_subdir(*parent)?;
                    self.links_with_subdir(*new_parent)?;
                }
                if *exchange {
                    let dst = dst.ok_or(FsError::NotFound)?;
                    let dst_dir = matches!(self.node(base, dst)?.body, Body::Dir { .. });
                    if dst_dir && moves && self.is_within(base, *parent, dst)? {
                        return Err(FsError::InvalidArgument);
                    }
                    if dst_dir && moves {
                        self.links_without_subdir(*new_parent)?;
                        self.links_with_subdir(*parent)?;
                    }
                    cx.record(op)?;
                    self.get(*parent)?.children_mut()?.insert(name.clone(), dst);
                    self.get(*new_parent)?
                        .children_mut()?
                        .insert(new_name.clone(), src);
                    if moves {
                        self.reparent(src, *parent, *new_parent)?;
                        self.reparent(dst, *new_parent, *parent)?;
                    }
                    for n in [src, dst] {
                        self.get(n)?.ctime = *time;
                    }
                    for p in [parent, new_parent] {
                        self.get(*p)?.touch(*time);
                    }
                    return Ok(None);
                }
                if let Some(dst) = dst {
                    if *no_replace {
                        return Err(FsError::Exists);
                    }
                    if dst == src {
                        // Two names of one file: POSIX says do nothing.
                        return Ok(None);
                    }
                    let target = self.node(base, dst)?;
                    match (&target.body, src_dir) {
                        (Body::Dir { children, .. }, true) => {
                            if !children.is_empty() {
                                return Err(FsError::NotEmpty);
                            }
                            self.links_without_subdir(*new_parent)?;
                        }
                        (Body::Dir { .. }, false) => return Err(FsError::IsADirectory),
                        (_, true) => return Err(FsError::NotADirectory),
                        (_, false) => {}
                    }
                }
                cx.record(op)?;
                if let Some(dst) = dst {
                    self.detach(base, cx.data_dir, *new_parent, new_name, dst, *time)?;
                }
                self.get(*parent)?.children_mut()?.remove(name.as_slice());
                self.get(*new_parent)?
                    .children_mut()?
                    .insert(new_name.clone(), src);
                if moves {
                    self.reparent(src, *parent, *new_parent)?;
                }
                self.get(src)?.ctime = *time;
                for p in [parent, new_parent] {
                    self.get(*p)?.touch(*time);
                }
                Ok(None)
            }
            Op::SetAttr {
                ino,
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
                time,
            } => {
                let node = match self.node(base, *ino) {
                    Ok(n) => n,
                    // Replaying a change to a file unlinked since.
                    Err(FsError::NotFound) if !cx.live() => return Ok(None),
                    Err(e) => return Err(e),
                };
                if size.is_some() {
                    node.file()?;
                }
                // A file no name reaches is not recorded: nothing can find
                // it after a restart.
                if node.nlink > 0 {
                    cx.record(op)?;
                }
                let node = self.get(*ino)?;
                if let Some(m) = mode {
                    node.mode = m & 0o7777;
                }
                if let Some(u) = uid {
                    node.uid = *u;
                }
                if let Some(g) = gid {
                    node.gid = *g;
                }
                if let Some(t) = atime {
                    node.atime = *t;
                }
                if let Some(t) = mtime {
                    node.mtime = *t;
                }
                node.ctime = *time;
                if let Some(size) = size {
                    let f = node.file()?;
                    let shrink = *size < f.size;
                    f.truncate(*size);
                    if mtime.is_none() {
                        node.mtime = *time;
                    }
                    if shrink && cx.live() {
                        shrink_data_file(&data_path(base, cx.data_dir, *ino)?, *size)?;
                    }
                }
                Ok(None)
            }
            Op::Write {
                ino,
                offset,
                len,
                time,
            } => {
                // Replay only: serving, the write path updates the node
                // itself (see CowFs::write).
                // Writes to a file unlinked since are not recorded; a
                // restore point file is copied in here as on its open.
                let Ok(node) = self.node(base, *ino) else {
                    return Ok(None);
                };
                let Ok(f) = node.file() else { return Ok(None) };
                let end = offset
                    .checked_add(*len)
                    .filter(|&e| e <= i64::MAX as u64)
                    .ok_or_else(|| inconsistent(format!("write of {len} bytes at {offset}")))?;
                f.extents.insert(*offset, end);
                f.size = f.size.max(end);
                node.touch(*time);
                Ok(None)
            }
        }
    }

    /// Removes the name `name` of `ino` from `parent` (checked to exist).
    fn detach(
        &mut self,
        base: &RepoFs,
        data_dir: &Path,
        parent: u64,
        name: &[u8],
        ino: u64,
        time: Time,
    ) -> FsResult<()> {
        let is_dir = matches!(self.get(ino)?.body, Body::Dir { .. });
        let parent_links = if is_dir {
            self.links_without_subdir(parent)?
        } else {
            self.get(parent)?.nlink
        };
        let p = self.get(parent)?;
        p.children_mut()?.remove(name);
        p.touch(time);
        p.nlink = parent_links;
        let node = self.get(ino)?;
        node.ctime = time;
        node.nlink = if is_dir {
            0
        } else {
            node.nlink.saturating_sub(1)
        };
        self.reap(base, data_dir, ino);
        Ok(())
    }

    /// Moves directory `ino` (a no-op for other kinds) between parents.
    fn reparent(&mut self, ino: u64, from: u64, to: u64) -> FsResult<()> {
        if !matches!(self.get(ino)?.body, Body::Dir { .. }) {
            return Ok(());
        }
        let from_links = self.links_without_subdir(from)?;
        let to_links = self.links_with_subdir(to)?;
        if let Body::Dir { parent, .. } = &mut self.get(ino)?.body {
            *parent = to;
        }
        self.get(from)?.nlink = from_links;
        self.get(to)?.nlink = to_links;
        Ok(())
    }

    /// The overlay a checkpoint holds, checked: every node it names exists
    /// in the restore point or in the session's range, and each node is
    /// what it claims to be. `what` names the file in errors.
    fn from_snapshot(base: &RepoFs, what: &str, snap: Snapshot) -> Result<Overlay> {
        let bad = |why: String| Error::malformed(what, why);
        if snap.format != SESSION_FORMAT {
            return Err(Error::UnsupportedVersion {
                what: what.to_string(),
                found: snap.format,
                supported: SESSION_FORMAT,
            });
        }
        if snap.next_id < FIRST_NEW_INO {
            return Err(bad(format!(
                "next node id {} is below the session range",
                snap.next_id
            )));
        }
        let ino_of = |r: &NodeRef| match r {
            NodeRef::Session(id) if *id >= snap.next_id => Err(format!(
                "session node {id} is past the next id {}",
                snap.next_id
            )),
            _ => node_ino(base, *r),
        };
        let mut nodes = HashMap::with_capacity(snap.nodes.len());
        for (r, stored) in &snap.nodes {
            let ino = ino_of(r).map_err(&bad)?;
            let node = stored.map(ino_of).map_err(&bad)?;
            let is_dir_body = matches!(node.body, Body::Dir { .. });
            let tombstone = matches!(node.body, Body::Special) && node.nlink == 0;
            if is_dir_body != (node.kind == NodeKind::Dir) && !tombstone {
                return Err(bad(format!(
                    "{r:?} is a {:?} with another kind's body",
                    node.kind
                )));
            }
            match &node.body {
                Body::Dir { children, .. } => {
                    if let Some(name) = children.keys().find(|n| check_name(n).is_err()) {
                        return Err(bad(format!("{r:?} holds an invalid name {name:?}")));
                    }
                }
                Body::File(f) if f.from_restore_point != matches!(r, NodeRef::RestorePoint(_)) => {
                    return Err(bad(format!("{r:?} claims the wrong origin")));
                }
                _ => {}
            }
            if nodes.insert(ino, node).is_some() {
                return Err(bad(format!("{r:?} is listed twice")));
            }
        }
        if let Some(root) = nodes.get(&ROOT_INO) {
            if !matches!(root.body, Body::Dir { .. }) || root.nlink == 0 {
                return Err(bad("the root is not a live directory".into()));
            }
        }
        Ok(Overlay {
            nodes,
            next_ino: snap.next_id,
        })
    }

    /// The checkpoint of this overlay, nodes named as stored.
    fn to_snapshot(&self, base: &RepoFs, generation: u64) -> FsResult<Snapshot> {
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for (&ino, node) in &self.nodes {
            // A file no name reaches is gone after a restart.
            if node.nlink == 0 && matches!(node.body, Body::File(_)) {
                continue;
            }
            nodes.push((node_ref(base, ino)?, node.map(|&c| node_ref(base, c))?));
        }
        Ok(Snapshot {
            format: SESSION_FORMAT,
            generation,
            next_id: self.next_ino,
            nodes,
        })
    }
}

fn shrink_data_file(path: &Path, size: u64) -> FsResult<()> {
    match OpenOptions::new().write(true).open(path) {
        Ok(f) => {
            let len = f
                .metadata()
                .map_err(|e| FsError::session_io("session data", &e))?
                .len();
            if len > size {
                f.set_len(size)
                    .map_err(|e| FsError::session_io("session data", &e))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError::session_io("session data", &e)),
    }
}

/// What a session records about itself in `session.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub format: u32,
    pub id: String,
    /// The repository, as given when the session was made (an absolute
    /// directory or an `s3://` URL).
    pub repository: String,
    /// `JOB/TIMESTAMP`.
    pub restore_point: String,
    /// Unix seconds.
    pub created: i64,
}

#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Writes fail with ENOSPC once the state directory's free space
    /// would drop below this, so the journal and checkpoints still fit.
    pub reserve_bytes: u64,
    /// A new session needs at least this much free space to start.
    pub min_free_bytes: u64,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            reserve_bytes: 64 << 20,
            min_free_bytes: 256 << 20,
        }
    }
}

/// A session as `flr session list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SessionStatus {
    pub info: SessionInfo,
    pub dir: PathBuf,
    /// A process serves it (holds its lock).
    pub in_use: bool,
    /// Bytes its directory takes on disk.
    pub disk_bytes: u64,
}

/// Checks a session id: it names a directory.
pub fn validate_session_id(id: &str) -> Result<()> {
    crate::manifest::validate_name("session id", id, 64)
}

pub fn session_dir(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join(id)
}

/// Reads a session's `session.json`, of any format version, so a session
/// of another version can still be listed and discarded; opening it checks
/// the version.
pub fn read_info(state_dir: &Path, id: &str) -> Result<SessionInfo> {
    validate_session_id(id)?;
    let path = session_dir(state_dir, id).join(SESSION_INFO_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(format!(
                "session {id} (no {})",
                path.display()
            )))
        }
        Err(e) => return Err(Error::io(&path, e)),
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::malformed(path.display().to_string(), e.to_string()))
}

/// Refuses a session of another format version. Sessions are short-lived,
/// so there is no migration: the flr that made it commits or discards it.
fn check_format(dir: &Path, info: &SessionInfo) -> Result<()> {
    if info.format == SESSION_FORMAT {
        return Ok(());
    }
    Err(Error::UnsupportedVersion {
        what: format!(
            "session {} ({})",
            info.id,
            dir.join(SESSION_INFO_FILE).display()
        ),
        found: info.format,
        supported: SESSION_FORMAT,
    })
}

/// Takes a session's lock: the one process serving or changing it.
fn lock_session(dir: &Path, id: &str) -> Result<File> {
    let path = dir.join(SESSION_LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::InvalidInput(format!(
            "session {id} is in use by another process (its mount is still running)"
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
    }
}

/// Every session under `state_dir`, oldest first.
pub fn list_sessions(state_dir: &Path) -> Result<Vec<SessionStatus>> {
    let rd = match std::fs::read_dir(state_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(state_dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(state_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if validate_session_id(&name).is_err() {
            continue;
        }
        let dir = entry.path();
        if !dir.join(SESSION_INFO_FILE).exists() {
            continue;
        }
        let info = read_info(state_dir, &name)?;
        let in_use = File::open(dir.join(SESSION_LOCK_FILE))
            .map(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
            .unwrap_or(false);
        out.push(SessionStatus {
            info,
            disk_bytes: disk_usage(&dir),
            dir,
            in_use,
        });
    }
    out.sort_by(|a, b| (a.info.created, &a.info.id).cmp(&(b.info.created, &b.info.id)));
    Ok(out)
}

/// Deletes a session that no process serves.
pub fn discard(state_dir: &Path, id: &str) -> Result<()> {
    read_info(state_dir, id)?;
    let dir = session_dir(state_dir, id);
    let _lock = lock_session(&dir, id)?;
    remove_session_dir(&dir)
}

fn remove_session_dir(dir: &Path) -> Result<()> {
    // Renamed first, so a crash midway never leaves half a session that
    // looks resumable.
    let doomed = dir.with_file_name(format!(
        ".discard-{}-{}",
        dir.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    std::fs::rename(dir, &doomed).map_err(|e| Error::io(dir, e))?;
    std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))
}

fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += allocated_bytes(&m);
            }
        }
    }
    total
}

#[cfg(unix)]
fn allocated_bytes(m: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    m.blocks() * 512
}

#[cfg(not(unix))]
fn allocated_bytes(m: &std::fs::Metadata) -> u64 {
    m.len()
}

/// Free-space bookkeeping for the reserve.
struct Space {
    checked_at: Instant,
    written_since: u64,
    free: u64,
}

/// A writable session over one restore point.
pub struct CowFs {
    base: Arc<RepoFs>,
    info: SessionInfo,
    dir: PathBuf,
    data_dir: PathBuf,
    options: SessionOptions,
    /// Taken shared by every change and exclusively by a commit, which so
    /// sees one instant of the session.
    gate: RwLock<()>,
    overlay: RwLock<Overlay>,
    journal: Mutex<Journal>,
    /// Open data files by inode.
    data_files: Mutex<HashMap<u64, Arc<File>>>,
    /// Restore point handles by inode, for reads of unchanged ranges.
    base_handles: Mutex<HashMap<u64, u64>>,
    /// Open handles: inode and whether it may write.
    handles: Mutex<HashMap<u64, (u64, bool)>>,
    next_handle: AtomicU64,
    space: Mutex<Space>,
    /// Data files made since the data directory was last synced.
    new_data_files: Mutex<bool>,
    _lock: File,
    pub counters: SessionCounters,
}

#[derive(Default, Debug)]
pub struct SessionCounters {
    pub writes: AtomicU64,
    pub bytes_written: AtomicU64,
    pub fsyncs: AtomicU64,
    pub no_space: AtomicU64,
}

impl CowFs {
    /// Makes a new session `info.id` under `state_dir` over `base` (a
    /// mount model rooted at the restore point `info.restore_point`).
    pub fn create(
        base: Arc<RepoFs>,
        state_dir: &Path,
        info: SessionInfo,
        options: SessionOptions,
    ) -> Result<Arc<CowFs>> {
        validate_session_id(&info.id)?;
        if info.format != SESSION_FORMAT {
            return Err(Error::InvalidInput(format!(
                "session {}: this build makes sessions of format {SESSION_FORMAT}, not {}",
                info.id, info.format
            )));
        }
        std::fs::create_dir_all(state_dir).map_err(|e| Error::io(state_dir, e))?;
        if let Some(free) = free_space(state_dir) {
            if free < options.min_free_bytes {
                return Err(Error::InvalidInput(format!(
                    "{}: only {} MiB free, a writable session needs at least {} MiB (see --min-free)",
                    state_dir.display(),
                    free >> 20,
                    options.min_free_bytes >> 20
                )));
            }
        }
        let dir = session_dir(state_dir, &info.id);
        if dir.exists() {
            return Err(Error::AlreadyExists(format!(
                "session {} ({}): resume it or discard it",
                info.id,
                dir.display()
            )));
        }
        // Built under a temporary name and renamed: a session directory
        // either has its session.json or does not exist.
        let tmp = state_dir.join(format!(".new-{}-{}", info.id, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(tmp.join(SESSION_DATA_DIR)).map_err(|e| Error::io(&tmp, e))?;
        // The session holds database contents: its owner only.
        set_private(&tmp)?;
        let json = serde_json::to_vec_pretty(&info).expect("session info serializes");
        let info_path = tmp.join(SESSION_INFO_FILE);
        std::fs::write(&info_path, json).map_err(|e| Error::io(&info_path, e))?;
        File::open(&info_path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&info_path, e))?;
        Journal::create(&tmp.join(SESSION_JOURNAL_FILE), 0)?;
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
        sync_dir(state_dir)?;
        Self::open(base, &dir, info, options)
    }

    /// Opens an existing session (after a crash, or one kept at unmount),
    /// replaying its journal.
    pub fn resume(
        base: Arc<RepoFs>,
        state_dir: &Path,
        id: &str,
        options: SessionOptions,
    ) -> Result<Arc<CowFs>> {
        let info = read_info(state_dir, id)?;
        Self::open(base, &session_dir(state_dir, id), info, options)
    }

    fn open(
        base: Arc<RepoFs>,
        dir: &Path,
        info: SessionInfo,
        options: SessionOptions,
    ) -> Result<Arc<CowFs>> {
        check_format(dir, &info)?;
        let lock = lock_session(dir, &info.id)?;
        let data_dir = dir.join(SESSION_DATA_DIR);
        std::fs::create_dir_all(&data_dir).map_err(|e| Error::io(&data_dir, e))?;
        // Loads the restore point's manifest: its nodes have inodes from
        // here, so stored names can be turned into them.
        base.readdir(ROOT_INO).map_err(fs_to_error)?;
        let state_path = dir.join(SESSION_STATE_FILE);
        let mut overlay = Overlay {
            nodes: HashMap::new(),
            next_ino: FIRST_NEW_INO,
        };
        let mut generation = 0;
        match std::fs::read(&state_path) {
            Ok(bytes) => {
                let what = state_path.display().to_string();
                let snap = decode_state(&what, &bytes)?;
                generation = snap.generation;
                overlay = Overlay::from_snapshot(&base, &what, snap)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&state_path, e)),
        }
        let journal_path = dir.join(SESSION_JOURNAL_FILE);
        let (jgen, ops, intact) = Journal::load(&journal_path)?;
        let replay = jgen == generation;
        if jgen > generation {
            return Err(Error::malformed(
                journal_path.display().to_string(),
                format!("generation {jgen} is newer than the checkpoint's {generation}"),
            ));
        }
        if !overlay.nodes.contains_key(&ROOT_INO) {
            overlay.materialize(&base, ROOT_INO).map_err(fs_to_error)?;
        }
        if replay {
            let mut cx = Ctx {
                base: &base,
                journal: None,
                data_dir: &data_dir,
            };
            for (n, stored) in ops.iter().enumerate() {
                // A change that failed when it was made was never recorded,
                // so a replayed one fails only if the restore point changed
                // under the session, or the journal is damaged.
                let applied = stored
                    .map(|r| node_ino(&base, *r))
                    .map_err(FsError::Corrupt)
                    .and_then(|op| overlay.apply(&mut cx, &op));
                if let Err(e) = applied {
                    return Err(Error::malformed(
                        journal_path.display().to_string(),
                        format!("record {n} ({stored:?}) does not apply: {e}"),
                    ));
                }
            }
        }
        let journal = Journal::open_at(&journal_path, jgen, intact)?;
        let fs = Arc::new(CowFs {
            base,
            info,
            dir: dir.to_path_buf(),
            data_dir,
            options,
            gate: RwLock::new(()),
            overlay: RwLock::new(overlay),
            journal: Mutex::new(journal),
            data_files: Mutex::new(HashMap::new()),
            base_handles: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            space: Mutex::new(Space {
                checked_at: Instant::now(),
                written_since: u64::MAX,
                free: 0,
            }),
            new_data_files: Mutex::new(false),
            _lock: lock,
            counters: SessionCounters::default(),
        });
        if !ops.is_empty() || !replay {
            fs.checkpoint()?;
        }
        Ok(fs)
    }

    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn base(&self) -> &Arc<RepoFs> {
        &self.base
    }

    /// Writes a checkpoint of the overlay and restarts the journal.
    pub fn checkpoint(&self) -> Result<()> {
        let _gate = self.gate.write();
        let ov = self.overlay.read();
        let mut journal = self.journal.lock();
        self.checkpoint_locked(&ov, &mut journal)
    }

    fn checkpoint_locked(&self, ov: &Overlay, journal: &mut Journal) -> Result<()> {
        for f in self.data_files.lock().values() {
            f.sync_data().map_err(|e| Error::io(&self.data_dir, e))?;
        }
        sync_dir(&self.data_dir)?;
        let generation = journal.generation + 1;
        let path = self.dir.join(SESSION_STATE_FILE);
        let snap = ov.to_snapshot(&self.base, generation).map_err(|e| {
            Error::InvalidInput(format!(
                "{}: cannot write a checkpoint: {e}",
                path.display()
            ))
        })?;
        let bytes = encode_state(&snap)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        sync_dir(&self.dir)?;
        *journal = Journal::create(&self.dir.join(SESSION_JOURNAL_FILE), generation)?;
        Ok(())
    }

    /// Ends the session: keeps it resumable (a checkpoint) or deletes its
    /// directory.
    pub fn close(self: Arc<Self>, keep: bool) -> Result<()> {
        for fh in self.base_handles.lock().drain().map(|(_, fh)| fh) {
            self.base.release(fh);
        }
        if keep {
            return self.checkpoint();
        }
        let dir = self.dir.clone();
        // The lock goes with the directory; nothing may write after this.
        drop(self);
        remove_session_dir(&dir)
    }

    fn run(&self, op: Op) -> FsResult<Option<u64>> {
        self.run_with(|_| Ok(op))
    }

    /// Applies the change `build` makes from the current overlay, under
    /// one lock, so what it read (a free inode number) stays true.
    fn run_with(&self, build: impl FnOnce(&mut Overlay) -> FsResult<Op>) -> FsResult<Option<u64>> {
        let mut ov = self.overlay.write();
        let op = build(&mut ov)?;
        let mut journal = self.journal.lock();
        let mut cx = Ctx {
            base: &self.base,
            journal: Some(&mut journal),
            data_dir: &self.data_dir,
        };
        let out = ov.apply(&mut cx, &op)?;
        if let Op::Remove { .. } | Op::Rename { .. } = op {
            self.forget_reaped(&ov);
        }
        Ok(out)
    }

    /// Closes data files of nodes that are gone.
    fn forget_reaped(&self, ov: &Overlay) {
        self.data_files
            .lock()
            .retain(|ino, _| ov.nodes.get(ino).is_some_and(|n| n.nlink > 0 || n.open > 0));
    }

    fn attr_of(&self, ov: &Overlay, ino: u64) -> FsResult<Attr> {
        match ov.nodes.get(&ino) {
            Some(n) if n.nlink == 0 && n.open == 0 => Err(FsError::NotFound),
            Some(n) => Ok(n.attr(ino)),
            None if ino >= FIRST_NEW_INO => Err(FsError::NotFound),
            None => self.base.getattr(ino),
        }
    }

    fn data_file(&self, ino: u64) -> FsResult<Arc<File>> {
        if let Some(f) = self.data_files.lock().get(&ino) {
            return Ok(f.clone());
        }
        let path = data_path(&self.base, &self.data_dir, ino)?;
        let existed = path.exists();
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| FsError::session_io("session data", &e))?,
        );
        if !existed {
            *self.new_data_files.lock() = true;
        }
        self.data_files.lock().insert(ino, file.clone());
        Ok(file)
    }

    fn base_handle(&self, ino: u64) -> FsResult<u64> {
        if let Some(&fh) = self.base_handles.lock().get(&ino) {
            return Ok(fh);
        }
        let fh = self.base.open(ino, false)?;
        let mut handles = self.base_handles.lock();
        if let Some(&other) = handles.get(&ino) {
            self.base.release(fh);
            return Ok(other);
        }
        handles.insert(ino, fh);
        Ok(fh)
    }

    /// Fails with NoSpace when writing `len` more bytes would eat into the
    /// reserve.
    fn check_space(&self, len: u64) -> FsResult<()> {
        let mut space = self.space.lock();
        if space.written_since >= SPACE_CHECK_BYTES || space.checked_at.elapsed().as_secs() >= 1 {
            if let Some(free) = free_space(&self.data_dir) {
                space.free = free;
                space.written_since = 0;
                space.checked_at = Instant::now();
            } else {
                return Ok(());
            }
        }
        let left = space.free.saturating_sub(space.written_since);
        if left < self.options.reserve_bytes.saturating_add(len) {
            self.counters.no_space.fetch_add(1, Ordering::Relaxed);
            // Look again next time: space may have been freed.
            space.written_since = u64::MAX;
            return Err(FsError::NoSpace);
        }
        space.written_since += len;
        Ok(())
    }

    /// The manifest index of file `ino` in the restore point when the
    /// session has left its bytes as stored: never written and never cut.
    /// `None` for a file made or changed in the session, and for anything
    /// that is not a file. Its metadata may have changed: `getattr` has it.
    pub fn unchanged_file(&self, ino: u64) -> Option<u32> {
        if ino >= FIRST_NEW_INO {
            return None;
        }
        {
            let ov = self.overlay.read();
            if let Some(node) = ov.nodes.get(&ino) {
                match &node.body {
                    Body::File(f)
                        if f.from_restore_point
                            && f.extents.total() == 0
                            && f.base_len == f.base_size
                            && f.size == f.base_size => {}
                    _ => return None,
                }
            }
        }
        if self.base.getattr(ino).ok()?.kind != NodeKind::File {
            return None;
        }
        self.base.node_index(ROOT_INO, ino).ok()
    }

    /// Reads `[offset, offset + size)` of file `ino`, merging session data
    /// over the restore point.
    pub fn read_ino(&self, ino: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let (pieces, data) = {
            let ov = self.overlay.read();
            match ov.nodes.get(&ino) {
                None => {
                    drop(ov);
                    let fh = self.base_handle(ino)?;
                    return self.base.read(fh, offset, size);
                }
                Some(node) => {
                    let Body::File(f) = &node.body else {
                        return Err(FsError::InvalidArgument);
                    };
                    (
                        f.pieces(offset, offset.saturating_add(size as u64)),
                        self.data_files.lock().get(&ino).cloned(),
                    )
                }
            }
        };
        // A range the session never wrote: the restore point's bytes as
        // they come, without merging into a second buffer. (Only a restore
        // point file has base pieces: its own inode there.)
        if let [(start, end, Piece::Base)] = pieces.as_slice() {
            let fh = self.base_handle(ino)?;
            return self.base.read(fh, *start, (end - start) as u32);
        }
        let total = pieces.last().map_or(0, |(_, end, _)| *end - offset);
        let mut out = vec![0u8; total as usize];
        for (start, end, piece) in pieces {
            let buf = &mut out[(start - offset) as usize..(end - offset) as usize];
            match piece {
                Piece::Zero => {}
                Piece::Session => {
                    let file = match &data {
                        Some(f) => f.clone(),
                        None => self.data_file(ino)?,
                    };
                    read_full_at(&file, buf, start)
                        .map_err(|e| FsError::session_io("session data", &e))?;
                }
                Piece::Base => {
                    let fh = self.base_handle(ino)?;
                    let got = self.base.read(fh, start, buf.len() as u32)?;
                    let n = got.len().min(buf.len());
                    buf[..n].copy_from_slice(&got[..n]);
                }
            }
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        parent: u64,
        name: &[u8],
        kind: NodeKind,
        mode: u32,
        rdev: u32,
        target: &[u8],
        caller: Caller,
    ) -> FsResult<Attr> {
        let _gate = self.gate.read();
        let ino = self.run_with(|ov| {
            let p = ov.node(&self.base, parent)?;
            p.children()?;
            // A set-group-ID directory hands its group down, and its bit
            // to subdirectories.
            let inherit = p.mode & S_ISGID != 0;
            let gid = if inherit { p.gid } else { caller.gid };
            let mode = if inherit && kind == NodeKind::Dir {
                mode | S_ISGID
            } else {
                mode
            };
            Ok(Op::Make {
                parent,
                name: name.to_vec(),
                ino: ov.next_ino,
                kind,
                mode: mode & 0o7777,
                uid: caller.uid,
                gid,
                rdev,
                target: target.to_vec(),
                time: now(),
            })
        })?;
        self.attr_of(&self.overlay.read(), ino.expect("make returns the inode"))
    }

    /// Stores the session's current state as a new restore point of job
    /// `job`. Changes wait while the session is read; reads go on. Pipes,
    /// sockets and device nodes are left out (restore points never hold
    /// them) and counted in the second value.
    pub fn commit(
        self: &Arc<Self>,
        opts: &crate::backup::BackupOptions,
    ) -> Result<(crate::manifest::Manifest, u64)> {
        let _gate = self.gate.write();
        let mut nodes = Vec::new();
        let mut files: Vec<(usize, Box<dyn Read + Send>)> = Vec::new();
        let mut skipped = 0;
        let root = self.getattr(ROOT_INO).map_err(fs_to_error)?;
        nodes.push(manifest_node(0, Vec::new(), &root, Vec::new()));
        let mut stack = vec![(ROOT_INO, 0u32)];
        while let Some((dir, idx)) = stack.pop() {
            let mut entries = self.readdir(dir).map_err(fs_to_error)?;
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            let mut subdirs = Vec::new();
            for e in entries {
                let attr = self.getattr(e.ino).map_err(fs_to_error)?;
                let i = nodes.len();
                match attr.kind {
                    NodeKind::Dir => {
                        nodes.push(manifest_node(idx, e.name, &attr, Vec::new()));
                        subdirs.push((e.ino, i as u32));
                    }
                    NodeKind::File => {
                        nodes.push(manifest_node(idx, e.name, &attr, Vec::new()));
                        files.push((
                            i,
                            Box::new(SessionReader {
                                fs: self.clone(),
                                ino: e.ino,
                                pos: 0,
                                size: attr.size,
                            }),
                        ));
                    }
                    NodeKind::Symlink => {
                        let target = self.readlink(e.ino).map_err(fs_to_error)?;
                        nodes.push(manifest_node(idx, e.name, &attr, target));
                    }
                    _ => skipped += 1,
                }
            }
            // Depth first, in name order: pushed in reverse.
            stack.extend(subdirs.into_iter().rev());
        }
        let manifest =
            crate::backup::backup(self.base.repository(), Source::Tree { nodes, files }, opts)?;
        Ok((manifest, skipped))
    }
}

fn manifest_node(parent: u32, name: Vec<u8>, a: &Attr, target: Vec<u8>) -> ManifestNode {
    ManifestNode {
        parent,
        name,
        kind: a.kind,
        mode: a.mode,
        uid: a.uid,
        gid: a.gid,
        mtime_sec: a.mtime_sec,
        mtime_nsec: a.mtime_nsec,
        size: if a.kind == NodeKind::File {
            a.size
        } else {
            target.len() as u64
        },
        target,
        content: Content::Empty,
    }
}

/// A session file's bytes as a stream, for commit.
struct SessionReader {
    fs: Arc<CowFs>,
    ino: u64,
    pos: u64,
    size: u64,
}

impl Read for SessionReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.size - self.pos).min(4 << 20) as u32;
        let data = self
            .fs
            .read_ino(self.ino, self.pos, want)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if data.is_empty() {
            return Err(std::io::Error::other("file shrank while being committed"));
        }
        buf[..data.len()].copy_from_slice(&data);
        self.pos += data.len() as u64;
        Ok(data.len())
    }
}

fn fs_to_error(e: FsError) -> Error {
    Error::InvalidInput(e.to_string())
}

impl FsModel for CowFs {
    fn writable(&self) -> bool {
        true
    }

    fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.attr_of(&self.overlay.read(), ino)
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let ov = self.overlay.read();
        match ov.nodes.get(&parent) {
            Some(p) => {
                let ino = *p.children()?.get(name).ok_or(FsError::NotFound)?;
                self.attr_of(&ov, ino)
            }
            None if parent >= FIRST_NEW_INO => Err(FsError::NotFound),
            None => {
                let a = self.base.lookup(parent, name)?;
                match ov.nodes.get(&a.ino) {
                    Some(_) => self.attr_of(&ov, a.ino),
                    None => Ok(a),
                }
            }
        }
    }

    fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let ov = self.overlay.read();
        match ov.nodes.get(&ino) {
            Some(p) => p
                .children()?
                .iter()
                .map(|(name, &c)| {
                    let kind = match ov.nodes.get(&c) {
                        Some(n) => n.kind,
                        None => self.base.getattr(c)?.kind,
                    };
                    Ok(DirEntry {
                        ino: c,
                        kind,
                        name: name.clone(),
                    })
                })
                .collect(),
            None if ino >= FIRST_NEW_INO => Err(FsError::NotFound),
            None => self.base.readdir(ino),
        }
    }

    fn parent(&self, ino: u64) -> FsResult<u64> {
        let ov = self.overlay.read();
        match ov.nodes.get(&ino) {
            Some(Node {
                body: Body::Dir { parent, .. },
                ..
            }) => Ok(*parent),
            Some(_) => Err(FsError::NotADirectory),
            None if ino >= FIRST_NEW_INO => Err(FsError::NotFound),
            None => self.base.parent(ino),
        }
    }

    fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let ov = self.overlay.read();
        match ov.nodes.get(&ino) {
            Some(Node {
                body: Body::Symlink(t),
                ..
            }) => Ok(t.clone()),
            Some(_) => Err(FsError::NotASymlink),
            None if ino >= FIRST_NEW_INO => Err(FsError::NotFound),
            None => self.base.readlink(ino),
        }
    }

    fn open(&self, ino: u64, write: bool, truncate: bool) -> FsResult<u64> {
        let _gate = self.gate.read();
        {
            let mut ov = self.overlay.write();
            let node = ov.node(&self.base, ino)?;
            if node.nlink == 0 {
                return Err(FsError::NotFound);
            }
            match node.kind {
                NodeKind::File => {}
                NodeKind::Dir => return Err(FsError::IsADirectory),
                _ => return Err(FsError::InvalidArgument),
            }
            node.open += 1;
        }
        if truncate && write {
            let set = SetAttr {
                size: Some(0),
                ..SetAttr::default()
            };
            if let Err(e) = self.setattr_gated(ino, &set) {
                let mut ov = self.overlay.write();
                if let Some(n) = ov.nodes.get_mut(&ino) {
                    n.open -= 1;
                }
                return Err(e);
            }
        }
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, (ino, write));
        Ok(fh)
    }

    fn release(&self, fh: u64) {
        let Some((ino, _)) = self.handles.lock().remove(&fh) else {
            return;
        };
        let mut ov = self.overlay.write();
        if let Some(n) = ov.nodes.get_mut(&ino) {
            n.open = n.open.saturating_sub(1);
        }
        ov.reap(&self.base, &self.data_dir, ino);
        self.forget_reaped(&ov);
    }

    fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let (ino, _) = *self.handles.lock().get(&fh).ok_or(FsError::BadHandle)?;
        self.read_ino(ino, offset, size)
    }

    fn statfs(&self) -> StatFs {
        let used = disk_usage(&self.data_dir);
        let free = free_space(&self.data_dir)
            .unwrap_or(0)
            .saturating_sub(self.options.reserve_bytes);
        let logical = self.base.statfs().total_bytes;
        StatFs {
            total_bytes: logical + used + free,
            free_bytes: free,
            files: self.overlay.read().next_ino.saturating_sub(FIRST_NEW_INO) + logical / 4096,
            free_files: free / 4096,
        }
    }

    fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        let _gate = self.gate.read();
        self.setattr_gated(ino, set)
    }

    fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        kind: NodeKind,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        if matches!(kind, NodeKind::Dir | NodeKind::Symlink) {
            return Err(FsError::InvalidArgument);
        }
        self.make(parent, name, kind, mode, rdev, &[], caller)
    }

    fn mkdir(&self, parent: u64, name: &[u8], mode: u32, caller: Caller) -> FsResult<Attr> {
        self.make(parent, name, NodeKind::Dir, mode, 0, &[], caller)
    }

    fn symlink(&self, parent: u64, name: &[u8], target: &[u8], caller: Caller) -> FsResult<Attr> {
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        self.make(parent, name, NodeKind::Symlink, 0o777, 0, target, caller)
    }

    fn link(&self, ino: u64, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let _gate = self.gate.read();
        self.run(Op::Link {
            ino,
            parent,
            name: name.to_vec(),
            time: now(),
        })?;
        self.attr_of(&self.overlay.read(), ino)
    }

    fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        let _gate = self.gate.read();
        self.run(Op::Remove {
            parent,
            name: name.to_vec(),
            dir: false,
            time: now(),
        })
        .map(|_| ())
    }

    fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        let _gate = self.gate.read();
        self.run(Op::Remove {
            parent,
            name: name.to_vec(),
            dir: true,
            time: now(),
        })
        .map(|_| ())
    }

    fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        mode: RenameMode,
    ) -> FsResult<()> {
        let _gate = self.gate.read();
        self.run(Op::Rename {
            parent,
            name: name.to_vec(),
            new_parent,
            new_name: new_name.to_vec(),
            exchange: mode == RenameMode::Exchange,
            no_replace: mode == RenameMode::NoReplace,
            time: now(),
        })
        .map(|_| ())
    }

    fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let (ino, writable) = *self.handles.lock().get(&fh).ok_or(FsError::BadHandle)?;
        if !writable {
            return Err(FsError::BadHandle);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or(FsError::InvalidArgument)?;
        let _gate = self.gate.read();
        self.check_space(data.len() as u64)?;
        let file = self.data_file(ino)?;
        let mut ov = self.overlay.write();
        let node = ov.nodes.get_mut(&ino).ok_or(FsError::BadHandle)?;
        node.file()?;
        crate::restore::write_at(&file, data, offset).map_err(|e| {
            let e = FsError::session_io("session data", &e);
            if e == FsError::NoSpace {
                self.counters.no_space.fetch_add(1, Ordering::Relaxed);
            }
            e
        })?;
        let time = now();
        // An unlinked file's writes need no record: nothing can reach it
        // after a restart.
        if node.nlink > 0 {
            self.journal.lock().append(&Op::Write {
                ino: node_ref(&self.base, ino)?,
                offset,
                len: data.len() as u64,
                time,
            })?;
        }
        let f = node.file()?;
        f.extents.insert(offset, end);
        f.size = f.size.max(end);
        node.touch(time);
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data.len() as u32)
    }

    fn fsync(&self, ino: u64) -> FsResult<()> {
        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        let file = self.data_files.lock().get(&ino).cloned();
        if let Some(f) = file {
            f.sync_data()
                .map_err(|e| FsError::session_io("session data", &e))?;
        }
        let new_files = std::mem::take(&mut *self.new_data_files.lock());
        if new_files {
            sync_dir(&self.data_dir).map_err(|e| FsError::SessionIo(e.to_string()))?;
        }
        let long = {
            let mut journal = self.journal.lock();
            journal.sync()?;
            journal.len > JOURNAL_COMPACT_BYTES
        };
        if long {
            self.checkpoint()
                .map_err(|e| FsError::SessionIo(e.to_string()))?;
        }
        Ok(())
    }

    fn fallocate(&self, ino: u64, offset: u64, len: u64, keep_size: bool) -> FsResult<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or(FsError::InvalidArgument)?;
        let size = self.getattr(ino)?.size;
        // Space is not reserved ahead (the data file stays sparse); the
        // size grows as asked.
        if keep_size || end <= size {
            return Ok(());
        }
        self.setattr(
            ino,
            &SetAttr {
                size: Some(end),
                ..SetAttr::default()
            },
        )
        .map(|_| ())
    }
}

impl CowFs {
    fn setattr_gated(&self, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        let time = now();
        let resolve = |t: Option<SetTime>| {
            t.map(|t| match t {
                SetTime::Now => time,
                SetTime::At(s, n) => (s, n),
            })
        };
        self.run(Op::SetAttr {
            ino,
            mode: set.mode,
            uid: set.uid,
            gid: set.gid,
            size: set.size,
            atime: resolve(set.atime),
            mtime: resolve(set.mtime),
            time,
        })?;
        self.attr_of(&self.overlay.read(), ino)
    }
}

impl Drop for CowFs {
    fn drop(&mut self) {
        for fh in self.base_handles.get_mut().drain().map(|(_, fh)| fh) {
            self.base.release(fh);
        }
    }
}

/// Reads `buf.len()` bytes at `offset`; past the end of the file the rest
/// stays zero (a data file is sparse and may end before the file does).
#[cfg(unix)]
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(windows)]
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.seek_read(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(())
}

#[cfg(unix)]
fn set_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(dir, e))
}

#[cfg(not(unix))]
fn set_private(_dir: &Path) -> Result<()> {
    Ok(())
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<()> {
    Ok(())
}

/// Bytes an unprivileged writer may still use on `path`'s filesystem.
#[cfg(unix)]
pub fn free_space(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    #[allow(unsafe_code)]
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and outlives the call; `st` is a
    // valid, writable statvfs.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(not(unix))]
pub fn free_space(_path: &Path) -> Option<u64> {
    None
}

#[cfg(test)]
mod format_tests;

#[cfg(test)]
mod replay_tests;

#[cfg(test)]
mod range_set_tests {
    use super::RangeSet;
    use proptest::prelude::*;

    /// What a byte map says the set covers, one bit per byte.
    fn covered_bytes(set: &RangeSet) -> Vec<bool> {
        let mut bytes = vec![false; 512];
        for (a, b) in set.iter() {
            for x in a..b {
                bytes[x as usize] = true;
            }
        }
        bytes
    }

    proptest! {
        /// The running count always equals the bytes the ranges cover, and
        /// the ranges cover exactly what a byte map of the same inserts and
        /// truncates does.
        #[test]
        fn the_running_count_matches_the_ranges(
            ops in proptest::collection::vec((0u64..3, 0u64..200, 0u64..60), 1..60)
        ) {
            let mut set = RangeSet::default();
            let mut model = vec![false; 512];
            for (kind, at, len) in ops {
                if kind < 2 {
                    set.insert(at, at + len);
                    for x in at..at + len {
                        model[x as usize] = true;
                    }
                } else {
                    set.truncate(at);
                    for x in at..512 {
                        model[x as usize] = false;
                    }
                }
                let summed: u64 = set.iter().map(|(a, b)| b - a).sum();
                prop_assert_eq!(set.total(), summed);
                prop_assert_eq!(covered_bytes(&set), model.clone());
                let decoded = RangeSet::try_from(set.ranges.clone()).unwrap();
                prop_assert_eq!(&decoded, &set);
            }
        }
    }
}
