//! The FUSE adapter: serves a filesystem model ([`FsModel`]: the read-only
//! `RepoFs`, or a writable session's `CowFs`) through the Linux kernel's
//! FUSE driver with fuser (pure Rust, no libfuse).
//!
//! - [`mount`] mounts (read-only unless the model is writable) with kernel
//!   permission checks, runs a
//!   fuser session with `threads` workers (each with its own cloned
//!   `/dev/fuse` descriptor) on a background thread, and returns a
//!   [`FuseMount`].
//! - [`FuseMount::wait`] blocks until the filesystem is unmounted, from
//!   here or from outside (`fusermount3 -u`, `umount`);
//!   [`FuseMount::unmounter`] hands out a [`FuseUnmounter`] that another
//!   thread (a signal handler, the control API) uses to end the mount.
//! - `FuseAdapter` implements [`fuser::Filesystem`]: every handler calls
//!   one helper returning `Result<_, FsError>` and replies once; [`errno`]
//!   is the one place where [`FsError`] becomes an errno.
//!
//! Caching: restore point contents are immutable, so names and attributes
//! inside them live in the kernel for [`STABLE_TTL`], files open with
//! `FOPEN_KEEP_CACHE` (page cache survives close and reopen) and their
//! directories with `FOPEN_CACHE_DIR`. The root, job directories, `latest`
//! links and restore point directories change as backups finish, so they
//! get [`LIVE_TTL`]. In a writable session everything gets
//! [`WRITABLE_TTL`] and directory listings are not kept.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Config, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, Session,
    SessionACL, TimeOrNow, WriteFlags,
};
use parking_lot::{Condvar, Mutex};
use vfs_core::fs::{
    Attr, Caller, DirEntry, FsError, FsModel, FsResult, RenameMode, SetAttr, SetTime, ROOT_INO,
};
use vfs_core::manifest::NodeKind;

/// How long the kernel keeps names and attributes inside a restore point:
/// they never change while mounted.
pub const STABLE_TTL: Duration = Duration::from_secs(3600);

/// How long the kernel keeps names and attributes of the root, job
/// directories, `latest` links and restore point directories: new restore
/// points appear and `latest` moves when a backup finishes.
pub const LIVE_TTL: Duration = Duration::from_secs(1);

/// `st_blksize`: the preferred I/O size tools size their buffers by. One
/// maximum FUSE request (256 pages) keeps `cp`-style copies at few round
/// trips without making small tools allocate much.
const BLKSIZE: u32 = 1 << 20;

/// How long the kernel keeps names and attributes in a writable session.
/// Every change passes through the kernel, which drops what a change
/// makes stale, so this only bounds how long a cached attribute may lag.
pub const WRITABLE_TTL: Duration = Duration::from_secs(1);

/// Largest write request in a writable session.
const MAX_WRITE: u32 = 1 << 20;

/// Block size reported by statfs.
const STATFS_BSIZE: u32 = 4096;

/// Background (readahead and async read) requests the kernel may have in
/// flight; fuser's default of 16 starves a multi-threaded session during
/// sequential reads.
const MAX_BACKGROUND: u16 = 64;

/// Kernel readahead per mount, in KiB, set through the mount's bdi: the
/// kernel offers only 128 KiB at init, while one request can carry 1 MiB
/// (256 pages); a window of a few requests keeps several workers busy.
const READAHEAD_KB: u32 = 4096;

/// What [`mount`] needs besides the filesystem model.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// Session worker threads, each reading requests from its own cloned
    /// `/dev/fuse` descriptor. At least 1.
    pub threads: usize,
    /// Let every user in (`allow_other`); the kernel still checks modes.
    /// For a non-root mounter this needs `user_allow_other` in
    /// `/etc/fuse.conf`.
    pub allow_other: bool,
    /// Have `fusermount3` unmount if this process dies, so no dead mount
    /// is left behind. Needs `fusermount3` installed. Without
    /// `allow_other`, fuser then admits only the owner and root (the
    /// kernel option `allow_other` is set, fuser filters the rest).
    pub auto_unmount: bool,
    /// Source name shown in `/proc/mounts` and `df`.
    pub fs_name: String,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            threads: 4,
            allow_other: false,
            auto_unmount: false,
            fs_name: "flr".to_string(),
        }
    }
}

/// The one mapping from the filesystem model's errors to errno.
pub fn errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::NotADirectory => Errno::ENOTDIR,
        FsError::IsADirectory => Errno::EISDIR,
        FsError::NotASymlink => Errno::EINVAL,
        FsError::ReadOnly => Errno::EROFS,
        FsError::InvalidArgument => Errno::EINVAL,
        FsError::BadHandle => Errno::EBADF,
        FsError::Corrupt(_) => Errno::EIO,
        FsError::Io(_) => Errno::EIO,
        FsError::Exists => Errno::EEXIST,
        FsError::NotEmpty => Errno::ENOTEMPTY,
        FsError::NameTooLong => Errno::ENAMETOOLONG,
        FsError::NoSpace => Errno::ENOSPC,
        FsError::NotPermitted => Errno::EPERM,
        FsError::Unsupported => Errno::EOPNOTSUPP,
        FsError::SessionIo(_) => Errno::EIO,
    }
}

fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::Dir => FileType::Directory,
        NodeKind::File => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
        NodeKind::CharDevice => FileType::CharDevice,
        NodeKind::BlockDevice => FileType::BlockDevice,
    }
}

/// Seconds and nanoseconds around the epoch (negative before it) as a
/// `SystemTime`; out-of-range values clamp to the epoch.
fn system_time(sec: i64, nsec: u32) -> SystemTime {
    let whole = if sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(sec.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(sec.unsigned_abs()))
    };
    whole
        .and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nsec))))
        .unwrap_or(UNIX_EPOCH)
}

fn file_attr(a: &Attr) -> FileAttr {
    let mtime = system_time(a.mtime_sec, a.mtime_nsec);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        // Backups keep one time per node and the model repeats it as
        // atime and ctime; writable sessions keep all three.
        atime: system_time(a.atime.0, a.atime.1),
        mtime,
        ctime: system_time(a.ctime.0, a.ctime.1),
        crtime: mtime,
        kind: file_type(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// Whether an open asks for anything but reading.
fn wants_write(flags: OpenFlags) -> bool {
    flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0
}

/// A directory's entries as `readdir` hands them out: `.`, `..`, then the
/// children. The entry at index `i` carries offset `i + 1`, the position to
/// resume after it.
struct Listing {
    entries: Vec<DirEntry>,
    /// Whether the entries' names and attributes may change (see
    /// [`LIVE_TTL`]).
    live: bool,
}

impl Listing {
    /// Entries to send for a request at `offset` (0, or the offset of the
    /// last entry the kernel received), each with its own offset.
    fn entries_after(&self, offset: u64) -> impl Iterator<Item = (u64, &DirEntry)> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        self.entries
            .iter()
            .enumerate()
            .skip(start)
            .map(|(i, e)| (i as u64 + 1, e))
    }
}

/// A time from a setattr request.
fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => SetTime::At(d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                // Before the epoch: whole seconds down, nanoseconds up.
                let d = e.duration();
                let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                SetTime::At(sec, nsec)
            }
        },
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// The node kind a mknod mode asks for.
fn mknod_kind(mode: u32) -> FsResult<NodeKind> {
    match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => Ok(NodeKind::File),
        libc::S_IFIFO => Ok(NodeKind::Fifo),
        libc::S_IFSOCK => Ok(NodeKind::Socket),
        libc::S_IFCHR => Ok(NodeKind::CharDevice),
        libc::S_IFBLK => Ok(NodeKind::BlockDevice),
        _ => Err(FsError::InvalidArgument),
    }
}

/// Translates kernel requests into [`FsModel`] calls.
struct FuseAdapter {
    fs: Arc<dyn FsModel>,
    /// Open directory handles. A listing is taken on the first readdir of
    /// a handle and served from there, so offsets stay valid while restore
    /// points appear and a large directory is not re-listed per batch.
    dirs: Mutex<HashMap<u64, Option<Arc<Listing>>>>,
    next_dir: AtomicU64,
}

impl FuseAdapter {
    fn new(fs: Arc<dyn FsModel>) -> Self {
        FuseAdapter {
            fs,
            dirs: Mutex::new(HashMap::new()),
            next_dir: AtomicU64::new(1),
        }
    }

    /// Whether the children of directory `dir` may change: those of the
    /// root (jobs) and of job directories (restore points, `latest`).
    fn children_live(&self, dir: u64) -> bool {
        self.fs.writable() || dir == ROOT_INO || self.fs.parent(dir) == Ok(ROOT_INO)
    }

    fn is_live(&self, ino: u64) -> bool {
        self.fs.writable()
            || ino == ROOT_INO
            || self.fs.parent(ino).map_or(true, |p| self.children_live(p))
    }

    fn ttl(&self, live: bool) -> Duration {
        if self.fs.writable() {
            WRITABLE_TTL
        } else if live {
            LIVE_TTL
        } else {
            STABLE_TTL
        }
    }

    fn entry(&self, attr: FsResult<Attr>, reply: ReplyEntry) {
        match attr {
            Ok(a) => reply.entry(&WRITABLE_TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn empty(result: FsResult<()>, reply: ReplyEmpty) {
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn do_lookup(&self, parent: u64, name: &OsStr) -> FsResult<(Duration, FileAttr)> {
        let attr = self.fs.lookup(parent, name.as_bytes())?;
        Ok((self.ttl(self.children_live(parent)), file_attr(&attr)))
    }

    fn do_getattr(&self, ino: u64) -> FsResult<(Duration, FileAttr)> {
        let attr = self.fs.getattr(ino)?;
        Ok((self.ttl(self.is_live(ino)), file_attr(&attr)))
    }

    fn do_open(&self, ino: u64, flags: OpenFlags) -> FsResult<u64> {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        self.fs
            .open(ino, write, write && flags.0 & libc::O_TRUNC != 0)
    }

    fn do_opendir(&self, ino: u64, flags: OpenFlags) -> FsResult<(u64, FopenFlags)> {
        if wants_write(flags) {
            return Err(FsError::IsADirectory);
        }
        let attr = self.fs.getattr(ino)?;
        if attr.kind != NodeKind::Dir {
            return Err(FsError::NotADirectory);
        }
        let fh = self.next_dir.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().insert(fh, None);
        // Inside a restore point a directory never changes: the kernel may
        // keep its listing across opens.
        let cache = if self.is_live(ino) {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        };
        Ok((fh, cache))
    }

    fn list(&self, ino: u64) -> FsResult<Listing> {
        let children = self.fs.readdir(ino)?;
        let parent = self.fs.parent(ino)?;
        let mut entries = Vec::with_capacity(children.len() + 2);
        entries.push(DirEntry {
            ino,
            kind: NodeKind::Dir,
            name: b".".to_vec(),
        });
        entries.push(DirEntry {
            ino: parent,
            kind: NodeKind::Dir,
            name: b"..".to_vec(),
        });
        entries.extend(children);
        Ok(Listing {
            entries,
            live: self.children_live(ino),
        })
    }

    /// The listing of an open directory, taken on first use. Without a
    /// known handle (should not happen) the directory is listed afresh.
    fn listing(&self, ino: u64, fh: u64) -> FsResult<Arc<Listing>> {
        if let Some(Some(listing)) = self.dirs.lock().get(&fh) {
            return Ok(listing.clone());
        }
        let listing = Arc::new(self.list(ino)?);
        // The kernel serializes readdir on one open directory, so no other
        // listing of this handle races with this one.
        if let Some(slot) = self.dirs.lock().get_mut(&fh) {
            *slot = Some(listing.clone());
        }
        Ok(listing)
    }

    /// Entries with attributes for readdirplus, from `offset` until the
    /// kernel's buffer is full. An entry whose attributes fail ends the
    /// batch; the error is returned only if nothing precedes it, so the
    /// kernel gets the entries before it and the error on the next call.
    fn do_readdirplus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        reply: &mut ReplyDirectoryPlus,
    ) -> FsResult<()> {
        let listing = self.listing(ino, fh)?;
        let ttl = self.ttl(listing.live);
        for (n, (next, e)) in listing.entries_after(offset).enumerate() {
            let attr = match self.fs.getattr(e.ino) {
                Ok(a) => file_attr(&a),
                Err(err) if n == 0 => return Err(err),
                Err(_) => break,
            };
            let name = OsStr::from_bytes(&e.name);
            if reply.add(INodeNo(e.ino), next, name, &ttl, &attr, Generation(0)) {
                break;
            }
        }
        Ok(())
    }

    fn do_access(&self, ino: u64, mask: AccessFlags) -> FsResult<()> {
        if mask.contains(AccessFlags::W_OK) && !self.fs.writable() {
            return Err(FsError::ReadOnly);
        }
        // Modes are checked by the kernel (default_permissions); this only
        // confirms the inode exists.
        self.fs.getattr(ino).map(|_| ())
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Each capability is optional: an older kernel lacking one still
        // mounts, just with more round trips.
        for wanted in [
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            let _ = config.add_capabilities(wanted);
        }
        // The largest readahead the kernel offers (it cannot be raised
        // here; see READAHEAD_KB for the bdi setting that can).
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        if self.fs.writable() {
            // FUSE_ATOMIC_O_TRUNC is left off on purpose: with it the kernel
            // drops a file's pages on any O_TRUNC open before checking
            // ETXTBSY, pulling them from under a program running from the
            // mount. Without it the kernel truncates by a setattr after
            // its own checks.
            if let Err(max) = config.set_max_write(MAX_WRITE) {
                let _ = config.set_max_write(max);
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent.0, name) {
            Ok((ttl, attr)) => reply.entry(&ttl, &attr, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    // Inode numbers stay valid for the life of the mount, so the kernel's
    // forgets need no bookkeeping: the default no-op forget is right.

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.do_getattr(ino.0) {
            Ok((ttl, attr)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Permission to change each attribute was checked by the kernel
        // (default_permissions), which also clears set-ID bits as POSIX
        // asks and sends the new mode here.
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
        };
        match self.fs.setattr(ino.0, &set) {
            Ok(a) => reply.attr(&WRITABLE_TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(&e)),
        }
    }

    // The kernel has applied the umask to `mode` (no FUSE_DONT_MASK).
    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let attr = mknod_kind(mode).and_then(|kind| {
            self.fs.mknod(
                parent.0,
                name.as_bytes(),
                kind,
                mode & 0o7777,
                rdev,
                caller(req),
            )
        });
        self.entry(attr, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let attr = self
            .fs
            .mkdir(parent.0, name.as_bytes(), mode & 0o7777, caller(req));
        self.entry(attr, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.fs.unlink(parent.0, name.as_bytes()), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.fs.rmdir(parent.0, name.as_bytes()), reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let attr = self.fs.symlink(
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            caller(req),
        );
        self.entry(attr, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mode = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else if flags.is_empty() {
            RenameMode::Replace
        } else {
            // RENAME_WHITEOUT is for union filesystems.
            return reply.error(Errno::EINVAL);
        };
        let result = self.fs.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            mode,
        );
        Self::empty(result, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let attr = self.fs.link(ino.0, newparent.0, newname.as_bytes());
        self.entry(attr, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.do_open(ino.0, flags) {
            // Contents are immutable: the page cache stays valid across
            // opens, and close has nothing to flush.
            Ok(fh) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(self.fs.fsync(ino.0), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.do_opendir(ino.0, flags) {
            Ok((fh, cache)) => reply.opened(FileHandle(fh), cache),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.listing(ino.0, fh.0) {
            Ok(listing) => {
                for (next, e) in listing.entries_after(offset) {
                    let name = OsStr::from_bytes(&e.name);
                    if reply.add(INodeNo(e.ino), next, file_type(e.kind), name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.do_readdirplus(ino.0, fh.0, offset, &mut reply) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(self.fs.fsync(ino.0), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let st = self.fs.statfs();
        let bsize = u64::from(STATFS_BSIZE);
        let free = st.free_bytes / bsize;
        reply.statfs(
            st.total_bytes.div_ceil(bsize),
            free,
            free,
            st.files,
            st.free_files,
            STATFS_BSIZE,
            255,
            STATFS_BSIZE,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(errno(&FsError::ReadOnly));
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // Backups keep no extended attributes.
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(&FsError::ReadOnly));
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.do_access(ino.0, mask) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let made = self
            .fs
            .mknod(
                parent.0,
                name.as_bytes(),
                NodeKind::File,
                mode & 0o7777,
                0,
                caller(req),
            )
            .and_then(|attr| {
                let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
                Ok((self.fs.open(attr.ino, write, false)?, attr))
            });
        match made {
            Ok((fh, attr)) => reply.created(
                &WRITABLE_TTL,
                &file_attr(&attr),
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = match mode {
            0 => self.fs.fallocate(ino.0, offset, length, false),
            libc::FALLOC_FL_KEEP_SIZE => self.fs.fallocate(ino.0, offset, length, true),
            // Punching, collapsing, zeroing ranges: not offered.
            _ if !self.fs.writable() => Err(FsError::ReadOnly),
            _ => Err(FsError::Unsupported),
        };
        Self::empty(result, reply);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // Only called when the destination is on this filesystem. A
        // writable session lets the kernel copy through read and write.
        if self.fs.writable() {
            reply.error(Errno::ENOSYS);
        } else {
            reply.error(errno(&FsError::ReadOnly));
        }
    }
}

/// Whether a mount's session has ended, for [`FuseMount::wait`] and to
/// keep [`FuseUnmounter`] from unmounting whatever is mounted at the path
/// after this mount is gone.
struct MountState {
    mountpoint: PathBuf,
    /// Device number of the mounted filesystem, set once the session
    /// runs (it answers the stat that tells it).
    dev: OnceLock<u64>,
    ended: Mutex<bool>,
    ended_cv: Condvar,
}

impl MountState {
    fn has_ended(&self) -> bool {
        *self.ended.lock()
    }

    /// Whether this mount still sits at the mount point: the session runs
    /// and the path is not covered by another filesystem. A path that
    /// cannot be stat'ed (busy or dead FUSE server) counts as ours.
    fn is_mounted(&self) -> bool {
        if self.has_ended() {
            return false;
        }
        match (self.dev.get(), std::fs::metadata(&self.mountpoint)) {
            (Some(&dev), Ok(meta)) => meta.dev() == dev,
            _ => true,
        }
    }

    fn set_ended(&self) {
        *self.ended.lock() = true;
        self.ended_cv.notify_all();
    }
}

/// Marks the session ended when the session thread exits, even by panic,
/// so [`FuseMount::wait`] never blocks on a dead session.
struct EndOnDrop(Arc<MountState>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.set_ended();
    }
}

/// A running mount. Dropping it unmounts (lazily if files are open)
/// without waiting for the session to end; [`FuseMount::unmount`] also
/// joins the session.
pub struct FuseMount {
    state: Arc<MountState>,
    session: Option<JoinHandle<io::Result<()>>>,
}

/// Ends a mount from any thread: a cheap clone of the mount's state, for
/// a signal-handling thread or the control API while another thread sits
/// in [`FuseMount::wait`].
#[derive(Clone)]
pub struct FuseUnmounter {
    state: Arc<MountState>,
}

impl FuseUnmounter {
    /// Unmounts. Fails with [`io::ErrorKind::ResourceBusy`] while files or
    /// working directories under the mount are in use, leaving the mount
    /// working; try again later or [`FuseUnmounter::detach`]. Unmounting
    /// an already unmounted filesystem succeeds.
    pub fn unmount(&self) -> io::Result<()> {
        if !self.state.is_mounted() {
            return Ok(());
        }
        unmount_path(&self.state.mountpoint, false)
    }

    /// Detaches the mount from the directory tree now (`umount -l`):
    /// processes with files open under it keep reading them, and the
    /// session ends when the last one is closed.
    pub fn detach(&self) -> io::Result<()> {
        if !self.state.is_mounted() {
            return Ok(());
        }
        unmount_path(&self.state.mountpoint, true)
    }
}

impl FuseMount {
    /// The mount point, canonicalized.
    pub fn mountpoint(&self) -> &Path {
        &self.state.mountpoint
    }

    /// A handle that unmounts from another thread.
    pub fn unmounter(&self) -> FuseUnmounter {
        FuseUnmounter {
            state: self.state.clone(),
        }
    }

    /// Whether the session has ended (the filesystem was unmounted).
    pub fn has_ended(&self) -> bool {
        self.state.has_ended()
    }

    /// Blocks until the filesystem is unmounted, by [`FuseUnmounter`] or
    /// from outside (`fusermount3 -u`, `umount`).
    pub fn wait(&self) {
        let mut ended = self.state.ended.lock();
        while !*ended {
            self.state.ended_cv.wait(&mut ended);
        }
    }

    /// Unmounts and joins the session threads, returning the session's
    /// final error if it had one. If files under the mount are still open,
    /// the mount is detached instead (see [`FuseUnmounter::detach`]) and
    /// this returns without joining: the session keeps serving those files
    /// and ends by itself when they are closed.
    pub fn unmount(mut self) -> io::Result<()> {
        let unmounter = self.unmounter();
        match unmounter.unmount() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {
                unmounter.detach()?;
                tracing::warn!(
                    "{} was busy; detached it, open files keep working until closed",
                    self.state.mountpoint.display()
                );
                self.session = None;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        session
            .join()
            .map_err(|_| io::Error::other("FUSE session thread panicked"))?
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if self.session.is_none() {
            return;
        }
        let unmounter = self.unmounter();
        if let Err(e) = unmounter.unmount().or_else(|_| unmounter.detach()) {
            tracing::error!("cannot unmount {}: {e}", self.state.mountpoint.display());
        }
    }
}

/// Mounts `fs` read-only at `mountpoint` and serves it on background
/// threads until unmounted.
pub fn mount(fs: Arc<dyn FsModel>, mountpoint: &Path, opts: &FuseOptions) -> io::Result<FuseMount> {
    let mountpoint = mountpoint.canonicalize().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("mount point {}: {e}", mountpoint.display()),
        )
    })?;
    let mut config = Config::default();
    config.mount_options = vec![
        if fs.writable() {
            MountOption::RW
        } else {
            MountOption::RO
        },
        MountOption::DefaultPermissions,
        MountOption::FSName(opts.fs_name.clone()),
        MountOption::Subtype("flr".to_string()),
        MountOption::NoDev,
        MountOption::NoSuid,
        // Access times would be invented; skip their bookkeeping.
        MountOption::NoAtime,
    ];
    config.acl = if opts.allow_other {
        SessionACL::All
    } else if opts.auto_unmount {
        // fuser requires an ACL other than Owner for auto_unmount.
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    if opts.auto_unmount {
        config.mount_options.push(MountOption::AutoUnmount);
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;

    // Session::new mounts and completes the kernel handshake.
    let session = Session::new(FuseAdapter::new(fs), &mountpoint, &config).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot mount FUSE at {}: {e}", mountpoint.display()),
        )
    })?;
    let state = Arc::new(MountState {
        mountpoint,
        dev: OnceLock::new(),
        ended: Mutex::new(false),
        ended_cv: Condvar::new(),
    });
    let end = EndOnDrop(state.clone());
    let thread = std::thread::Builder::new()
        .name("flr-fuse".to_string())
        .spawn(move || {
            let _end = end;
            session.run()
        })?;
    // The session answers this stat: the mount's device number names its
    // readahead setting and later proves the mount point is still ours.
    if let Ok(meta) = std::fs::metadata(&state.mountpoint) {
        let _ = state.dev.set(meta.dev());
        raise_readahead(meta.dev());
    }
    Ok(FuseMount {
        state,
        session: Some(thread),
    })
}

/// Sets the mount's readahead window through its backing device info
/// (`/sys/class/bdi/0:N`, named after the FUSE connection's device
/// number). Best effort: needs root and sysfs; without it reads work,
/// with smaller requests.
fn raise_readahead(dev: u64) {
    let (major, minor) = split_dev(dev);
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    let _ = std::fs::write(path, READAHEAD_KB.to_string());
}

/// Major and minor numbers of a device number, in glibc's encoding.
fn split_dev(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    (major, minor)
}

/// Whether `path` is a dead FUSE mount: one whose server is gone, so
/// `stat` fails with ENOTCONN. [`clear_stale_mount`] removes it.
pub fn is_stale_mount(path: &Path) -> bool {
    matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
}

/// Detaches whatever is mounted at `path` (meant for a dead FUSE mount
/// found by [`is_stale_mount`]), so the directory can be mounted again.
pub fn clear_stale_mount(path: &Path) -> io::Result<()> {
    unmount_path(path, true)
}

/// Unmounts `path`, lazily (`MNT_DETACH`) if `lazy`. Root calls umount2
/// directly; other users go through the setuid `fusermount3`.
fn unmount_path(path: &Path, lazy: bool) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mount point contains NUL"))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the
    // call, and umount2 does not keep the pointer.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::umount2(c_path.as_ptr(), flags) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EPERM) => fusermount_unmount(path, lazy),
        // Not a mount point (any more): someone else unmounted it.
        Some(libc::EINVAL) => Ok(()),
        Some(libc::EBUSY) => Err(busy(path)),
        _ => Err(io::Error::new(
            err.kind(),
            format!("cannot unmount {}: {err}", path.display()),
        )),
    }
}

fn busy(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::ResourceBusy,
        format!(
            "cannot unmount {}: busy (files or working directories under it are in use)",
            path.display()
        ),
    )
}

fn fusermount_unmount(path: &Path, lazy: bool) -> io::Result<()> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "fusermount3 not found");
    for program in ["fusermount3", "fusermount"] {
        let mut cmd = Command::new(program);
        cmd.arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        let out = match cmd.arg("--").arg(path).output() {
            Ok(out) => out,
            Err(e) => {
                last = e;
                continue;
            }
        };
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("busy") {
            return Err(busy(path));
        }
        return Err(io::Error::other(format!(
            "cannot unmount {}: {program}: {}",
            path.display(),
            stderr.trim()
        )));
    }
    Err(io::Error::new(
        last.kind(),
        format!("cannot unmount {}: {last}", path.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fs_error_has_its_own_errno() {
        let cases = [
            (FsError::NotFound, libc::ENOENT),
            (FsError::NotADirectory, libc::ENOTDIR),
            (FsError::IsADirectory, libc::EISDIR),
            (FsError::NotASymlink, libc::EINVAL),
            (FsError::ReadOnly, libc::EROFS),
            (FsError::InvalidArgument, libc::EINVAL),
            (FsError::BadHandle, libc::EBADF),
            (FsError::Corrupt("chunk 00ff".into()), libc::EIO),
            (FsError::Io("pack missing".into()), libc::EIO),
            (FsError::Exists, libc::EEXIST),
            (FsError::NotEmpty, libc::ENOTEMPTY),
            (FsError::NameTooLong, libc::ENAMETOOLONG),
            (FsError::NoSpace, libc::ENOSPC),
            (FsError::NotPermitted, libc::EPERM),
            (FsError::Unsupported, libc::EOPNOTSUPP),
            (FsError::SessionIo("data file".into()), libc::EIO),
        ];
        for (e, code) in cases {
            assert_eq!(errno(&e).code(), code, "{e:?}");
        }
    }

    #[test]
    fn write_intents_are_detected() {
        assert!(!wants_write(OpenFlags(libc::O_RDONLY)));
        assert!(!wants_write(OpenFlags(libc::O_RDONLY | libc::O_NOATIME)));
        assert!(wants_write(OpenFlags(libc::O_WRONLY)));
        assert!(wants_write(OpenFlags(libc::O_RDWR)));
        assert!(wants_write(OpenFlags(libc::O_RDONLY | libc::O_TRUNC)));
    }

    #[test]
    fn setattr_times_round_trip_around_the_epoch() {
        let at = |t: SystemTime| set_time(TimeOrNow::SpecificTime(t));
        assert_eq!(at(UNIX_EPOCH + Duration::new(5, 7)), SetTime::At(5, 7));
        assert_eq!(
            at(UNIX_EPOCH - Duration::new(1, 250_000_000)),
            SetTime::At(-2, 750_000_000)
        );
        assert_eq!(at(UNIX_EPOCH - Duration::from_secs(3)), SetTime::At(-3, 0));
        for (sec, nsec) in [(-2i64, 750_000_000u32), (4, 1)] {
            assert_eq!(at(system_time(sec, nsec)), SetTime::At(sec, nsec));
        }
        assert_eq!(set_time(TimeOrNow::Now), SetTime::Now);
    }

    #[test]
    fn mknod_modes_name_their_kind() {
        assert_eq!(mknod_kind(libc::S_IFIFO | 0o644), Ok(NodeKind::Fifo));
        assert_eq!(mknod_kind(libc::S_IFREG | 0o600), Ok(NodeKind::File));
        assert_eq!(mknod_kind(0o600), Ok(NodeKind::File));
        assert_eq!(mknod_kind(libc::S_IFSOCK), Ok(NodeKind::Socket));
        assert_eq!(mknod_kind(libc::S_IFDIR), Err(FsError::InvalidArgument));
    }

    #[test]
    fn times_before_and_after_the_epoch() {
        assert_eq!(system_time(1, 500), UNIX_EPOCH + Duration::new(1, 500));
        assert_eq!(
            system_time(-2, 250_000_000),
            UNIX_EPOCH - Duration::from_millis(1750)
        );
        // Extremes never panic, whatever the platform can represent.
        let _ = system_time(i64::MAX, 999_999_999);
        let _ = system_time(i64::MIN, 999_999_999);
    }

    #[test]
    fn attributes_keep_permission_bits_only() {
        let a = Attr {
            ino: 7,
            kind: NodeKind::File,
            size: 10,
            blocks: 1,
            mode: 0o100644,
            uid: 1,
            gid: 2,
            mtime_sec: 3,
            mtime_nsec: 4,
            atime: (5, 6),
            ctime: (7, 8),
            nlink: 1,
            rdev: 0,
        };
        let f = file_attr(&a);
        assert_eq!(f.perm, 0o644);
        assert_eq!(f.kind, FileType::RegularFile);
        assert_eq!(f.ino, INodeNo(7));
        assert_eq!(f.mtime, UNIX_EPOCH + Duration::new(3, 4));
        assert_eq!(f.atime, UNIX_EPOCH + Duration::new(5, 6));
        assert_eq!(f.ctime, UNIX_EPOCH + Duration::new(7, 8));
    }

    #[test]
    fn device_numbers_split_like_glibc() {
        // glibc's makedev.
        let makedev = |major: u64, minor: u64| {
            (major & 0xfff) << 8 | (major & !0xfff) << 32 | (minor & 0xff) | (minor & !0xff) << 12
        };
        for (major, minor) in [
            (0, 40),
            (259, 70_000),
            (4100, 1 << 19),
            (0xffff_ffff, 0xffff_ffff),
        ] {
            assert_eq!(split_dev(makedev(major, minor)), (major, minor));
        }
    }

    #[test]
    fn listing_offsets_resume_after_each_entry() {
        let entry = |ino, name: &str| DirEntry {
            ino,
            kind: NodeKind::Dir,
            name: name.as_bytes().to_vec(),
        };
        let listing = Listing {
            entries: vec![entry(5, "."), entry(1, ".."), entry(9, "a"), entry(10, "b")],
            live: false,
        };
        let all: Vec<(u64, u64)> = listing.entries_after(0).map(|(o, e)| (o, e.ino)).collect();
        assert_eq!(all, [(1, 5), (2, 1), (3, 9), (4, 10)]);
        // Resuming at an entry's offset yields exactly what follows it.
        let rest: Vec<u64> = listing.entries_after(3).map(|(_, e)| e.ino).collect();
        assert_eq!(rest, [10]);
        assert_eq!(listing.entries_after(4).count(), 0);
        assert_eq!(listing.entries_after(u64::MAX).count(), 0);
    }
}
