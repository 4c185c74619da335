//! The NFSv3 adapter: serves a filesystem model ([`FsModel`]: a read-only
//! restore point tree or a writable session) to hosts without FUSE, over
//! one TCP port that carries both the NFS and the MOUNT programs, so a
//! client needs no portmapper.
//!
//! The wire protocol is `nfs3_server`'s. This module owns what that crate
//! leaves to its user, and some of what it does not:
//! - **Who may connect.** The accept loop is flr's own: a client whose
//!   address is not on the allowlist is disconnected before one byte of it
//!   is read. (The crate's listener has no hook for the peer address, so
//!   flr drives the crate's per-connection handler itself.)
//! - **File handles.** A handle carries the model's inode and a tag: a
//!   keyed hash of the inode under a key drawn when the export starts. A
//!   handle of another export (another session, another run) or a made-up
//!   one fails the tag check and gets `NFS3ERR_BADHANDLE` or
//!   `NFS3ERR_STALE`: no handle reaches a file its export did not hand out.
//! - **Malformed streams.** A record-mark guard in front of the crate's
//!   reader refuses fragments larger than any NFS request needs, before
//!   the crate would allocate them; the connection is dropped, the server
//!   keeps serving.
//! - **Open files.** NFS has no open or close. The adapter keeps one open
//!   handle of the model per file and direction, shared by every client,
//!   so a sequential reader keeps its readahead; handles idle for
//!   [`IDLE_CLOSE`] are closed.
//!
//! The export's path is `/`. libnfs takes a URL's path up to its last
//! `/` as the export to mount, so a file in the root is
//! `nfs://HOST//FILE?...` (two slashes); deeper paths need nothing special.
//!
//! Locks: there is no lock manager (NLM). Clients must mount with
//! `nolock` (Linux `mount -o vers=3,nolock,port=P,mountport=P`); libnfs
//! needs nothing. `LINK` and `MKNOD` are not offered by the protocol layer.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nfs3_server::nfs3_types::nfs3::{
    createverf3, fattr3, filename3, ftype3, nfspath3, nfsstat3, nfstime3, sattr3, set_atime,
    set_mtime, specdata3, stable_how, FSINFO3resok, Nfs3Option, FSF3_CANSETTIME, FSF3_HOMOGENEOUS,
    FSF3_SYMLINK,
};
use nfs3_server::nfs3_types::xdr_codec::{Opaque, Pack, Unpack};
use nfs3_server::test_reexports::{process_socket, RPCContext};
use nfs3_server::vfs::{
    DirEntryPlus, FileHandle, NextResult, NfsFileSystem, NfsReadFileSystem, ReadDirPlusIterator,
    VFSCapabilities,
};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use vfs_core::fs::{Attr, Caller, FsError, FsModel, RenameMode, SetAttr, SetTime, ROOT_INO};
use vfs_core::manifest::NodeKind;

/// Open handles of the model unused this long are closed.
pub const IDLE_CLOSE: Duration = Duration::from_secs(30);

/// The largest RPC record accepted: a 1 MiB WRITE and its headers fit
/// with room to spare. Larger fragment lengths are refused unread.
const MAX_RECORD: usize = (1 << 20) + (64 << 10);

/// Largest read and write a client is told to use (FSINFO).
const MAX_IO: u32 = 1 << 20;

/// A network of client addresses: `10.1.2.3`, `10.1.0.0/16`, `::1`,
/// `fd00::/8`, or `0.0.0.0/0` for every IPv4 client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientNet {
    addr: IpAddr,
    prefix: u8,
}

impl ClientNet {
    /// Loopback clients only: the default when an export is bound to a
    /// loopback address and no allowlist is given.
    pub fn loopback() -> [ClientNet; 2] {
        [
            ClientNet {
                addr: IpAddr::from([127, 0, 0, 0]),
                prefix: 8,
            },
            ClientNet {
                addr: IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
                prefix: 128,
            },
        ]
    }

    /// Whether `ip` is in this network. An IPv4 client reaching an IPv6
    /// socket (`::ffff:a.b.c.d`) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the first `bits` bits of two addresses agree.
fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = usize::from(bits);
    let (whole, rest) = (bits / 8, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[whole] & mask == b[whole] & mask
}

impl FromStr for ClientNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or ADDRESS/PREFIX network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(ClientNet { addr, prefix })
    }
}

impl fmt::Display for ClientNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// How an export is served.
#[derive(Clone, Debug)]
pub struct NfsOptions {
    /// Clients that may connect. Empty: loopback clients only.
    pub allow: Vec<ClientNet>,
    /// Owner of nodes created through the export, unless the request sets
    /// one (NFS passes the caller's identity only for the permission
    /// check, not to the filesystem calls).
    pub owner: Caller,
}

/// Figures of one export, for logs.
#[derive(Default, Debug)]
pub struct NfsCounters {
    pub connections: AtomicU64,
    pub refused_clients: AtomicU64,
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    pub bad_handles: AtomicU64,
}

/// A handle as the client holds it: the model's inode and its tag.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NfsHandle([u8; 16]);

impl NfsHandle {
    fn ino(&self) -> u64 {
        u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes"))
    }
    fn tag(&self) -> [u8; 8] {
        self.0[8..].try_into().expect("8 bytes")
    }
}

impl fmt::Debug for NfsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NfsHandle({})", self.ino())
    }
}

impl FileHandle for NfsHandle {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(NfsHandle)
    }
}

/// One open handle of the model, shared by every client.
struct OpenFile {
    fh: u64,
    last_used: Instant,
}

/// The model as NFS sees it.
struct Inner {
    fs: Arc<dyn FsModel>,
    key: [u8; 32],
    owner: Caller,
    open: Mutex<HashMap<(u64, bool), OpenFile>>,
    counters: Arc<NfsCounters>,
}

impl Inner {
    fn handle(&self, ino: u64) -> NfsHandle {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&ino.to_le_bytes());
        bytes[8..].copy_from_slice(&self.tag(ino));
        NfsHandle(bytes)
    }

    fn tag(&self, ino: u64) -> [u8; 8] {
        let hash = blake3::keyed_hash(&self.key, &ino.to_le_bytes());
        hash.as_bytes()[..8].try_into().expect("8 bytes")
    }

    /// The inode a client's handle names, if this export handed it out.
    fn ino(&self, h: &NfsHandle) -> Result<u64, nfsstat3> {
        let ino = h.ino();
        if ino != 0 && constant_time_eq(&self.tag(ino), &h.tag()) {
            Ok(ino)
        } else {
            self.counters.bad_handles.fetch_add(1, Ordering::Relaxed);
            Err(nfsstat3::NFS3ERR_BADHANDLE)
        }
    }

    /// The model's handle of `ino` for reading or writing, opened on
    /// first use.
    fn open_file(&self, ino: u64, write: bool) -> Result<u64, FsError> {
        let now = Instant::now();
        if let Some(f) = self.open.lock().get_mut(&(ino, write)) {
            f.last_used = now;
            return Ok(f.fh);
        }
        let fh = self.fs.open(ino, write, false)?;
        let mut open = self.open.lock();
        match open.get_mut(&(ino, write)) {
            // Another request opened it meanwhile: keep one.
            Some(f) => {
                f.last_used = now;
                let kept = f.fh;
                drop(open);
                self.fs.release(fh);
                Ok(kept)
            }
            None => {
                open.insert((ino, write), OpenFile { fh, last_used: now });
                Ok(fh)
            }
        }
    }

    /// Closes the model's handles of `ino` (it was removed or replaced).
    fn close_file(&self, ino: u64) {
        let closed: Vec<u64> = {
            let mut open = self.open.lock();
            [false, true]
                .iter()
                .filter_map(|w| open.remove(&(ino, *w)).map(|f| f.fh))
                .collect()
        };
        for fh in closed {
            self.fs.release(fh);
        }
    }

    /// Closes handles idle since `before`, or all of them.
    fn close_idle(&self, before: Option<Instant>) {
        let closed: Vec<u64> = {
            let mut open = self.open.lock();
            let stale: Vec<(u64, bool)> = open
                .iter()
                .filter(|(_, f)| before.is_none_or(|b| f.last_used < b))
                .map(|(k, _)| *k)
                .collect();
            stale
                .into_iter()
                .filter_map(|k| open.remove(&k).map(|f| f.fh))
                .collect()
        };
        for fh in closed {
            self.fs.release(fh);
        }
    }

    fn attr(&self, ino: u64) -> Result<fattr3, nfsstat3> {
        self.fs
            .getattr(ino)
            .map(|a| self.fattr(&a))
            .map_err(|e| self.status_of_handle(&e))
    }

    /// Attributes as this export shows them: a read-only export shows no
    /// write bits, so clients do not offer writes that would fail.
    fn fattr(&self, a: &Attr) -> fattr3 {
        let mut f = fattr(a);
        if !self.fs.writable() {
            f.mode &= !0o222;
        }
        f
    }

    /// An error on an operation whose object is the handle itself: a node
    /// that is gone makes the handle stale.
    fn status_of_handle(&self, e: &FsError) -> nfsstat3 {
        match e {
            FsError::NotFound => nfsstat3::NFS3ERR_STALE,
            e => self.status(e),
        }
    }

    fn status(&self, e: &FsError) -> nfsstat3 {
        let s = status(e);
        if matches!(
            e,
            FsError::Corrupt(_) | FsError::Io(_) | FsError::SessionIo(_)
        ) {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "NFS request failed");
        }
        s
    }

    /// `.` and `..` are the client's business in FUSE, the server's in NFS.
    fn lookup(&self, dir: u64, name: &[u8]) -> Result<u64, FsError> {
        match name {
            b"." => self.fs.getattr(dir).map(|a| a.ino),
            b".." => self.fs.parent(dir),
            name => self.fs.lookup(dir, name).map(|a| a.ino),
        }
    }

    /// The node at `path` from the root, following symlinks (at most 40);
    /// `..` stops at the root.
    fn resolve_path(&self, path: &[u8]) -> Result<u64, FsError> {
        let mut todo: Vec<Vec<u8>> = components(path);
        todo.reverse();
        let mut stack = vec![ROOT_INO];
        let mut links = 0;
        while let Some(name) = todo.pop() {
            let dir = *stack.last().expect("the root stays");
            match name.as_slice() {
                b"." => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let attr = self.fs.lookup(dir, &name)?;
            if attr.kind != NodeKind::Symlink {
                stack.push(attr.ino);
                continue;
            }
            links += 1;
            if links > 40 {
                return Err(FsError::InvalidArgument);
            }
            let target = self.fs.readlink(attr.ino)?;
            if target.first() == Some(&b'/') {
                stack.truncate(1);
            }
            todo.extend(components(&target).into_iter().rev());
        }
        Ok(*stack.last().expect("the root stays"))
    }

    fn set_attr(&self, ino: u64, s: &sattr3) -> Result<Attr, FsError> {
        let set = set_attr(s);
        if set == SetAttr::default() {
            return self.fs.getattr(ino);
        }
        self.fs.setattr(ino, &set)
    }

    fn caller(&self, s: &sattr3) -> Caller {
        Caller {
            uid: opt(&s.uid).unwrap_or(self.owner.uid),
            gid: opt(&s.gid).unwrap_or(self.owner.gid),
        }
    }
}

impl Drop for Inner {
    /// A request still running when the export stopped may have opened a
    /// handle after the last sweep: the last reference closes it.
    fn drop(&mut self) {
        for (_, f) in self.open.get_mut().drain() {
            self.fs.release(f.fh);
        }
    }
}

fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn constant_time_eq(a: &[u8; 8], b: &[u8; 8]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn opt<T: Copy + Pack + Unpack>(o: &Nfs3Option<T>) -> Option<T> {
    match o {
        Nfs3Option::Some(v) => Some(*v),
        Nfs3Option::None => None,
    }
}

/// The model's error as an NFS status.
pub fn status(e: &FsError) -> nfsstat3 {
    match e {
        FsError::NotFound => nfsstat3::NFS3ERR_NOENT,
        FsError::NotADirectory => nfsstat3::NFS3ERR_NOTDIR,
        FsError::IsADirectory => nfsstat3::NFS3ERR_ISDIR,
        FsError::NotASymlink => nfsstat3::NFS3ERR_INVAL,
        FsError::ReadOnly => nfsstat3::NFS3ERR_ROFS,
        FsError::InvalidArgument => nfsstat3::NFS3ERR_INVAL,
        FsError::BadHandle => nfsstat3::NFS3ERR_BADHANDLE,
        FsError::Corrupt(_) | FsError::Io(_) | FsError::SessionIo(_) => nfsstat3::NFS3ERR_IO,
        FsError::Exists => nfsstat3::NFS3ERR_EXIST,
        FsError::NotEmpty => nfsstat3::NFS3ERR_NOTEMPTY,
        FsError::NameTooLong => nfsstat3::NFS3ERR_NAMETOOLONG,
        FsError::NoSpace => nfsstat3::NFS3ERR_NOSPC,
        FsError::NotPermitted => nfsstat3::NFS3ERR_PERM,
        FsError::Unsupported => nfsstat3::NFS3ERR_NOTSUPP,
    }
}

fn ftype(kind: NodeKind) -> ftype3 {
    match kind {
        NodeKind::Dir => ftype3::NF3DIR,
        NodeKind::Symlink => ftype3::NF3LNK,
        NodeKind::Fifo => ftype3::NF3FIFO,
        NodeKind::Socket => ftype3::NF3SOCK,
        NodeKind::CharDevice => ftype3::NF3CHR,
        NodeKind::BlockDevice => ftype3::NF3BLK,
        NodeKind::File => ftype3::NF3REG,
    }
}

/// NFSv3 times are unsigned 32-bit seconds: earlier than 1970 shows as
/// 1970, later than 2106 as 2106.
fn nfstime(sec: i64, nsec: u32) -> nfstime3 {
    nfstime3 {
        seconds: sec.clamp(0, i64::from(u32::MAX)) as u32,
        nseconds: nsec.min(999_999_999),
    }
}

/// The model's attributes as NFS's.
pub fn fattr(a: &Attr) -> fattr3 {
    fattr3 {
        type_: ftype(a.kind),
        mode: a.mode & 0o7777,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        size: a.size,
        used: a.blocks.saturating_mul(512),
        rdev: specdata3 {
            specdata1: (a.rdev >> 8) & 0xfff,
            specdata2: (a.rdev & 0xff) | ((a.rdev >> 12) & 0xfff00),
        },
        fsid: 0,
        fileid: a.ino,
        atime: nfstime(a.atime.0, a.atime.1),
        mtime: nfstime(a.mtime_sec, a.mtime_nsec),
        ctime: nfstime(a.ctime.0, a.ctime.1),
    }
}

/// A SETATTR's (or CREATE's) attributes as the model's.
pub fn set_attr(s: &sattr3) -> SetAttr {
    let time = |t: Option<nfstime3>, server: bool| match (t, server) {
        (Some(t), _) => Some(SetTime::At(i64::from(t.seconds), t.nseconds)),
        (None, true) => Some(SetTime::Now),
        (None, false) => None,
    };
    let (atime, a_now) = match s.atime {
        set_atime::DONT_CHANGE => (None, false),
        set_atime::SET_TO_SERVER_TIME => (None, true),
        set_atime::SET_TO_CLIENT_TIME(t) => (Some(t), false),
    };
    let (mtime, m_now) = match s.mtime {
        set_mtime::DONT_CHANGE => (None, false),
        set_mtime::SET_TO_SERVER_TIME => (None, true),
        set_mtime::SET_TO_CLIENT_TIME(t) => (Some(t), false),
    };
    SetAttr {
        mode: opt(&s.mode).map(|m| m & 0o7777),
        uid: opt(&s.uid),
        gid: opt(&s.gid),
        size: opt(&s.size),
        atime: time(atime, a_now),
        mtime: time(mtime, m_now),
    }
}

/// The time an exclusive create stores its verifier in, as Linux's
/// server does: the client sets the real times afterwards.
fn verifier_time(v: &createverf3) -> (i64, u32) {
    let sec = u32::from_be_bytes(v.0[..4].try_into().expect("4 bytes"));
    let nsec = u32::from_be_bytes(v.0[4..].try_into().expect("4 bytes")) % 1_000_000_000;
    (i64::from(sec), nsec)
}

/// Runs a call of the model (which may wait on disk or the network) off
/// the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, nfsstat3> + Send + 'static,
) -> Result<T, nfsstat3> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "an NFS request's filesystem call panicked");
            Err(nfsstat3::NFS3ERR_SERVERFAULT)
        }
    }
}

/// The adapter between `nfs3_server`'s calls and the model.
#[derive(Clone)]
pub struct NfsModel {
    inner: Arc<Inner>,
}

impl NfsModel {
    fn new(fs: Arc<dyn FsModel>, owner: Caller, counters: Arc<NfsCounters>) -> NfsModel {
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).expect("the OS random source failed");
        NfsModel {
            inner: Arc::new(Inner {
                fs,
                key,
                owner,
                open: Mutex::new(HashMap::new()),
                counters,
            }),
        }
    }

    /// Runs `f` on the model off the async workers, with the inode of
    /// `h` checked.
    async fn on<T: Send + 'static>(
        &self,
        h: &NfsHandle,
        f: impl FnOnce(&Inner, u64) -> Result<T, nfsstat3> + Send + 'static,
    ) -> Result<T, nfsstat3> {
        let ino = self.inner.ino(h)?;
        let inner = self.inner.clone();
        blocking(move || f(&inner, ino)).await
    }
}

impl NfsReadFileSystem for NfsModel {
    type Handle = NfsHandle;

    fn root_dir(&self) -> NfsHandle {
        self.inner.handle(ROOT_INO)
    }

    async fn lookup(&self, dir: &NfsHandle, name: &filename3<'_>) -> Result<NfsHandle, nfsstat3> {
        let name = name.0.to_vec();
        self.on(dir, move |m, dir| {
            m.lookup(dir, &name)
                .map(|ino| m.handle(ino))
                .map_err(|e| m.status(&e))
        })
        .await
    }

    /// MOUNT of a path below the root (libnfs mounts the directory of
    /// the file a URL names). Symlinks on the way are followed, so
    /// `JOB/latest/...` mounts; none leads above the export's root.
    async fn lookup_by_path(&self, path: &str) -> Result<NfsHandle, nfsstat3> {
        let path = path.as_bytes().to_vec();
        let inner = self.inner.clone();
        blocking(move || {
            inner
                .resolve_path(&path)
                .map(|ino| inner.handle(ino))
                .map_err(|e| inner.status(&e))
        })
        .await
    }

    async fn getattr(&self, h: &NfsHandle) -> Result<fattr3, nfsstat3> {
        // In memory for both models: no need to leave the async worker.
        let ino = self.inner.ino(h)?;
        self.inner.attr(ino)
    }

    async fn read(
        &self,
        h: &NfsHandle,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        self.on(h, move |m, ino| {
            let size = m.fs.getattr(ino).map_err(|e| m.status_of_handle(&e))?.size;
            if offset >= size {
                return Ok((Vec::new(), true));
            }
            let count = count.min(MAX_IO);
            let fh = m.open_file(ino, false).map_err(|e| m.status(&e))?;
            let data = m.fs.read(fh, offset, count).map_err(|e| m.status(&e))?;
            m.counters.reads.fetch_add(1, Ordering::Relaxed);
            m.counters
                .bytes_read
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            let eof = offset + data.len() as u64 >= size;
            Ok((data, eof))
        })
        .await
    }

    async fn readdirplus(
        &self,
        dir: &NfsHandle,
        cookie: u64,
    ) -> Result<impl ReadDirPlusIterator<NfsHandle>, nfsstat3> {
        let entries = self
            .on(dir, move |m, dir| {
                let parent = m.fs.parent(dir).map_err(|e| m.status_of_handle(&e))?;
                let children = m.fs.readdir(dir).map_err(|e| m.status_of_handle(&e))?;
                let mut all = Vec::with_capacity(children.len() + 2);
                all.push((dir, b".".to_vec()));
                all.push((parent, b"..".to_vec()));
                all.extend(children.into_iter().map(|e| (e.ino, e.name)));
                Ok(all)
            })
            .await?;
        // The cookie of entry i is i + 1: the position to resume after it.
        let start = usize::try_from(cookie).unwrap_or(usize::MAX);
        Ok(Listing {
            model: self.inner.clone(),
            entries,
            next: start,
        })
    }

    async fn readlink(&self, h: &NfsHandle) -> Result<nfspath3<'_>, nfsstat3> {
        self.on(h, |m, ino| {
            m.fs.readlink(ino)
                .map(|t| nfspath3(Opaque::owned(t)))
                .map_err(|e| m.status_of_handle(&e))
        })
        .await
    }

    async fn fsinfo(&self, root: &NfsHandle) -> Result<FSINFO3resok, nfsstat3> {
        let attr = self.getattr(root).await.ok();
        Ok(FSINFO3resok {
            obj_attributes: match attr {
                Some(a) => nfs3_server::nfs3_types::nfs3::post_op_attr::Some(a),
                None => nfs3_server::nfs3_types::nfs3::post_op_attr::None,
            },
            rtmax: MAX_IO,
            rtpref: MAX_IO,
            rtmult: 4096,
            wtmax: MAX_IO,
            wtpref: MAX_IO,
            wtmult: 4096,
            dtpref: 64 << 10,
            // Database files grow past the crate's default of 128 GiB.
            maxfilesize: i64::MAX as u64,
            time_delta: nfstime3 {
                seconds: 0,
                nseconds: 1,
            },
            properties: FSF3_SYMLINK | FSF3_HOMOGENEOUS | FSF3_CANSETTIME,
        })
    }
}

/// A directory listing being paged out.
struct Listing {
    model: Arc<Inner>,
    entries: Vec<(u64, Vec<u8>)>,
    next: usize,
}

impl ReadDirPlusIterator<NfsHandle> for Listing {
    async fn next(&mut self) -> NextResult<DirEntryPlus<NfsHandle>> {
        let Some((ino, name)) = self.entries.get(self.next) else {
            return NextResult::Eof;
        };
        self.next += 1;
        // A child removed since the listing is still listed, without
        // attributes; the client's lookup will find it gone.
        let attr = self
            .model
            .fs
            .getattr(*ino)
            .ok()
            .map(|a| self.model.fattr(&a));
        NextResult::Ok(DirEntryPlus {
            fileid: *ino,
            name: filename3(Opaque::owned(name.clone())),
            cookie: self.next as u64,
            name_attributes: attr,
            name_handle: Some(self.model.handle(*ino)),
        })
    }
}

impl NfsFileSystem for NfsModel {
    fn capabilities(&self) -> VFSCapabilities {
        if self.inner.fs.writable() {
            VFSCapabilities::ReadWrite
        } else {
            VFSCapabilities::ReadOnly
        }
    }

    async fn setattr(&self, h: &NfsHandle, s: sattr3) -> Result<fattr3, nfsstat3> {
        self.on(h, move |m, ino| {
            m.set_attr(ino, &s)
                .map(|a| fattr(&a))
                .map_err(|e| m.status_of_handle(&e))
        })
        .await
    }

    async fn write(
        &self,
        h: &NfsHandle,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        let data = data.to_vec();
        self.on(h, move |m, ino| {
            let fh = m.open_file(ino, true).map_err(|e| m.status_of_handle(&e))?;
            let mut done = 0usize;
            while done < data.len() {
                let n =
                    m.fs.write(fh, offset + done as u64, &data[done..])
                        .map_err(|e| m.status(&e))?;
                if n == 0 {
                    return Err(nfsstat3::NFS3ERR_IO);
                }
                done += n as usize;
            }
            m.counters.writes.fetch_add(1, Ordering::Relaxed);
            m.counters
                .bytes_written
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            let achieved = match stable {
                stable_how::UNSTABLE => stable_how::UNSTABLE,
                _ => {
                    m.fs.fsync(ino).map_err(|e| m.status(&e))?;
                    stable_how::FILE_SYNC
                }
            };
            Ok((m.attr(ino)?, achieved))
        })
        .await
    }

    async fn create(
        &self,
        dir: &NfsHandle,
        name: &filename3<'_>,
        s: sattr3,
    ) -> Result<(NfsHandle, fattr3), nfsstat3> {
        let name = name.0.to_vec();
        self.on(dir, move |m, dir| {
            let mode = opt(&s.mode).unwrap_or(0o644) & 0o7777;
            let attr = match m
                .fs
                .mknod(dir, &name, NodeKind::File, mode, 0, m.caller(&s))
            {
                Ok(a) => a,
                // UNCHECKED: an existing file is opened as it is (and
                // truncated if the attributes say so).
                Err(FsError::Exists) => {
                    let a = m.fs.lookup(dir, &name).map_err(|e| m.status(&e))?;
                    if a.kind != NodeKind::File {
                        return Err(nfsstat3::NFS3ERR_EXIST);
                    }
                    a
                }
                Err(e) => return Err(m.status(&e)),
            };
            let mut rest = s.clone();
            rest.mode = Nfs3Option::None;
            rest.uid = Nfs3Option::None;
            rest.gid = Nfs3Option::None;
            let attr = m.set_attr(attr.ino, &rest).map_err(|e| m.status(&e))?;
            Ok((m.handle(attr.ino), fattr(&attr)))
        })
        .await
    }

    async fn create_exclusive(
        &self,
        dir: &NfsHandle,
        name: &filename3<'_>,
        verf: createverf3,
    ) -> Result<NfsHandle, nfsstat3> {
        let name = name.0.to_vec();
        self.on(dir, move |m, dir| {
            let (sec, nsec) = verifier_time(&verf);
            match m.fs.mknod(dir, &name, NodeKind::File, 0o600, 0, m.owner) {
                Ok(a) => {
                    let stamp = SetAttr {
                        mtime: Some(SetTime::At(sec, nsec)),
                        ..SetAttr::default()
                    };
                    m.fs.setattr(a.ino, &stamp).map_err(|e| m.status(&e))?;
                    Ok(m.handle(a.ino))
                }
                // A retransmitted create finds its own file: same verifier.
                Err(FsError::Exists) => {
                    let a = m.fs.lookup(dir, &name).map_err(|e| m.status(&e))?;
                    if a.kind == NodeKind::File && (a.mtime_sec, a.mtime_nsec) == (sec, nsec) {
                        Ok(m.handle(a.ino))
                    } else {
                        Err(nfsstat3::NFS3ERR_EXIST)
                    }
                }
                Err(e) => Err(m.status(&e)),
            }
        })
        .await
    }

    async fn mkdir(
        &self,
        dir: &NfsHandle,
        name: &filename3<'_>,
    ) -> Result<(NfsHandle, fattr3), nfsstat3> {
        let name = name.0.to_vec();
        self.on(dir, move |m, dir| {
            let a =
                m.fs.mkdir(dir, &name, 0o755, m.owner)
                    .map_err(|e| m.status(&e))?;
            Ok((m.handle(a.ino), fattr(&a)))
        })
        .await
    }

    async fn remove(&self, dir: &NfsHandle, name: &filename3<'_>) -> Result<(), nfsstat3> {
        let name = name.0.to_vec();
        self.on(dir, move |m, dir| {
            let a = m.fs.lookup(dir, &name).map_err(|e| m.status(&e))?;
            // REMOVE and RMDIR arrive here both.
            let done = if a.kind == NodeKind::Dir {
                m.fs.rmdir(dir, &name)
            } else {
                m.fs.unlink(dir, &name)
            };
            done.map_err(|e| m.status(&e))?;
            if a.kind != NodeKind::Dir && a.nlink <= 1 {
                m.close_file(a.ino);
            }
            Ok(())
        })
        .await
    }

    async fn rename<'a>(
        &self,
        from_dir: &NfsHandle,
        from_name: &filename3<'a>,
        to_dir: &NfsHandle,
        to_name: &filename3<'a>,
    ) -> Result<(), nfsstat3> {
        let to_dir = self.inner.ino(to_dir)?;
        let (from_name, to_name) = (from_name.0.to_vec(), to_name.0.to_vec());
        self.on(from_dir, move |m, from_dir| {
            let replaced = m.fs.lookup(to_dir, &to_name).ok();
            m.fs.rename(from_dir, &from_name, to_dir, &to_name, RenameMode::Replace)
                .map_err(|e| m.status(&e))?;
            if let Some(r) = replaced.filter(|r| r.kind != NodeKind::Dir && r.nlink <= 1) {
                m.close_file(r.ino);
            }
            Ok(())
        })
        .await
    }

    async fn symlink<'a>(
        &self,
        dir: &NfsHandle,
        name: &filename3<'a>,
        target: &nfspath3<'a>,
        s: &sattr3,
    ) -> Result<(NfsHandle, fattr3), nfsstat3> {
        let (name, target) = (name.0.to_vec(), target.0.to_vec());
        let caller = self.inner.caller(s);
        self.on(dir, move |m, dir| {
            let a =
                m.fs.symlink(dir, &name, &target, caller)
                    .map_err(|e| m.status(&e))?;
            Ok((m.handle(a.ino), fattr(&a)))
        })
        .await
    }

    async fn commit(&self, h: &NfsHandle, _offset: u64, _count: u32) -> Result<(), nfsstat3> {
        self.on(h, |m, ino| {
            m.fs.fsync(ino).map_err(|e| m.status_of_handle(&e))
        })
        .await
    }
}

/// Watches the RPC record marks of a client's stream as it is read and
/// fails the stream at a fragment longer than [`MAX_RECORD`], or a record
/// of several fragments that adds up to more.
struct RecordGuard<S> {
    inner: S,
    /// Bytes of the current fragment header seen (0..4).
    header: [u8; 4],
    header_len: usize,
    /// Bytes of the current fragment's body still to come.
    body_left: usize,
    /// Bytes of the current record so far, and whether its last fragment
    /// has begun.
    record: usize,
    last: bool,
}

impl<S> RecordGuard<S> {
    fn new(inner: S) -> Self {
        RecordGuard {
            inner,
            header: [0; 4],
            header_len: 0,
            body_left: 0,
            record: 0,
            last: false,
        }
    }

    /// Follows `bytes` just read through the framing.
    fn watch(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (4 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len < 4 {
                continue;
            }
            self.header_len = 0;
            let mark = u32::from_be_bytes(self.header);
            let len = (mark & 0x7fff_ffff) as usize;
            if self.last {
                self.record = 0;
            }
            self.last = mark & 0x8000_0000 != 0;
            self.record += len;
            if self.record > MAX_RECORD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("an RPC record of more than {MAX_RECORD} bytes"),
                ));
            }
            self.body_left = len;
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RecordGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if let Err(e) = self.watch(&buf.filled()[before..]) {
                return Poll::Ready(Err(e));
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RecordGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A running export: [`NfsExport::stop`] ends it.
pub struct NfsExport {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    model: NfsModel,
    pub counters: Arc<NfsCounters>,
}

impl NfsExport {
    /// Where the export listens (the port a client passes as both its NFS
    /// and its MOUNT port).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, drops every connection and closes the model's
    /// open handles.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let model = self.model.inner.clone();
        let _ = tokio::task::spawn_blocking(move || model.close_idle(None)).await;
    }
}

/// Starts serving `fs` over NFSv3 at `addr`, on the current tokio
/// runtime. A read-only model is exported read-only: writes get
/// `NFS3ERR_ROFS`, ACCESS grants no writing, modes lose their write bits.
pub async fn export(
    fs: Arc<dyn FsModel>,
    addr: SocketAddr,
    opts: NfsOptions,
) -> io::Result<NfsExport> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let allow: Vec<ClientNet> = if opts.allow.is_empty() {
        ClientNet::loopback().to_vec()
    } else {
        opts.allow.clone()
    };
    let counters = Arc::new(NfsCounters::default());
    let model = NfsModel::new(fs, opts.owner, counters.clone());
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(accept_loop(
        listener,
        Arc::new(model.clone()),
        allow,
        stopped,
        counters.clone(),
    ));
    tokio::spawn(close_idle_files(Arc::downgrade(&model.inner)));
    tracing::info!(%addr, writable = model.inner.fs.writable(), "NFS export listening");
    Ok(NfsExport {
        addr,
        stop,
        task,
        model,
        counters,
    })
}

async fn close_idle_files(model: Weak<Inner>) {
    loop {
        tokio::time::sleep(IDLE_CLOSE / 3).await;
        let Some(m) = model.upgrade() else {
            return;
        };
        let before = Instant::now().checked_sub(IDLE_CLOSE);
        if let Some(before) = before {
            let _ = tokio::task::spawn_blocking(move || m.close_idle(Some(before))).await;
        }
    }
}

async fn accept_loop<T: NfsFileSystem + 'static>(
    listener: TcpListener,
    fs: Arc<T>,
    allow: Vec<ClientNet>,
    mut stopped: watch::Receiver<bool>,
    counters: Arc<NfsCounters>,
) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    // One context for every connection: it carries the generation number
    // of the crate's handle prefix, which must not change between
    // connections.
    let base = RPCContext::test_ctx("/", fs);
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "NFS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !allow.iter().any(|n| n.contains(peer.ip())) {
            counters.refused_clients.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %peer, "NFS client refused: not on the export's allowlist");
            drop(socket);
            continue;
        }
        counters.connections.fetch_add(1, Ordering::Relaxed);
        tracing::info!(client = %peer, "NFS client connected");
        let mut ctx = base.clone();
        ctx.local_port = port;
        ctx.client_addr = peer.to_string();
        connections.spawn(serve_connection(socket, ctx));
    }
    connections.shutdown().await;
}

async fn serve_connection<T: NfsFileSystem + 'static>(socket: TcpStream, ctx: RPCContext<T>) {
    let _ = socket.set_nodelay(true);
    let client = ctx.client_addr.clone();
    match process_socket(RecordGuard::new(socket), ctx).await {
        Ok(()) => tracing::info!(%client, "NFS client disconnected"),
        Err(e) => tracing::info!(%client, error = %e, "NFS connection ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_networks_match_by_prefix() {
        let net: ClientNet = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: ClientNet = "192.168.1.5".parse().unwrap();
        assert!(one.contains("192.168.1.5".parse().unwrap()));
        assert!(!one.contains("192.168.1.4".parse().unwrap()));
        let odd: ClientNet = "172.16.0.0/12".parse().unwrap();
        assert!(odd.contains("172.31.255.255".parse().unwrap()));
        assert!(!odd.contains("172.32.0.0".parse().unwrap()));
        let all: ClientNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!(!all.contains("::2".parse().unwrap()));
        let v6: ClientNet = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(ClientNet::loopback()
            .iter()
            .any(|n| n.contains("::1".parse().unwrap())));
        for bad in ["10.0.0.0/33", "nonsense", "::/129", "1.2.3.4/x"] {
            assert!(bad.parse::<ClientNet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_record_guard_refuses_oversized_fragments_only() {
        let mut g = RecordGuard::new(());
        // Two small records, one split across fragments and reads.
        let mut stream = Vec::new();
        stream.extend_from_slice(&(100u32).to_be_bytes());
        stream.extend_from_slice(&[7u8; 100]);
        stream.extend_from_slice(&(0x8000_0000u32 | 50).to_be_bytes());
        stream.extend_from_slice(&[7u8; 50]);
        stream.extend_from_slice(&(0x8000_0000u32 | (MAX_RECORD as u32)).to_be_bytes());
        stream.extend_from_slice(&vec![0u8; MAX_RECORD]);
        for piece in stream.chunks(3) {
            g.watch(piece).unwrap();
        }
        // The record of the next fragment starts afresh.
        assert_eq!(g.body_left, 0);
        let huge = (0x8000_0000u32 | (MAX_RECORD as u32 + 1)).to_be_bytes();
        assert!(g.watch(&huge).is_err());
        // Fragments that add up past the bound fail too.
        let mut g = RecordGuard::new(());
        let half = (MAX_RECORD as u32 / 2 + 1).to_be_bytes();
        g.watch(&half).unwrap();
        g.watch(&vec![0u8; MAX_RECORD / 2 + 1]).unwrap();
        assert!(g.watch(&half).is_err());
    }

    #[test]
    fn handles_carry_a_tag_only_their_export_accepts() {
        struct Empty;
        impl FsModel for Empty {
            fn getattr(&self, _: u64) -> vfs_core::fs::FsResult<Attr> {
                Err(FsError::NotFound)
            }
            fn lookup(&self, _: u64, _: &[u8]) -> vfs_core::fs::FsResult<Attr> {
                Err(FsError::NotFound)
            }
            fn readdir(&self, _: u64) -> vfs_core::fs::FsResult<Vec<vfs_core::fs::DirEntry>> {
                Ok(Vec::new())
            }
            fn parent(&self, _: u64) -> vfs_core::fs::FsResult<u64> {
                Ok(ROOT_INO)
            }
            fn readlink(&self, _: u64) -> vfs_core::fs::FsResult<Vec<u8>> {
                Err(FsError::NotASymlink)
            }
            fn open(&self, _: u64, _: bool, _: bool) -> vfs_core::fs::FsResult<u64> {
                Err(FsError::NotFound)
            }
            fn release(&self, _: u64) {}
            fn read(&self, _: u64, _: u64, _: u32) -> vfs_core::fs::FsResult<Vec<u8>> {
                Err(FsError::BadHandle)
            }
            fn statfs(&self) -> vfs_core::fs::StatFs {
                vfs_core::fs::StatFs::default()
            }
        }
        let owner = Caller { uid: 0, gid: 0 };
        let a = NfsModel::new(Arc::new(Empty), owner, Arc::default());
        let b = NfsModel::new(Arc::new(Empty), owner, Arc::default());
        let h = a.inner.handle(42);
        assert_eq!(a.inner.ino(&h), Ok(42));
        assert_eq!(b.inner.ino(&h), Err(nfsstat3::NFS3ERR_BADHANDLE));
        // The inode alone, or another inode under a valid tag, is refused.
        let mut forged = h;
        forged.0[..8].copy_from_slice(&43u64.to_le_bytes());
        assert_eq!(a.inner.ino(&forged), Err(nfsstat3::NFS3ERR_BADHANDLE));
        assert_eq!(NfsHandle::from_bytes(&h.0[..8]), None);
        assert_eq!(a.inner.counters.bad_handles.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn attributes_and_errors_translate() {
        let a = Attr {
            ino: 9,
            kind: NodeKind::File,
            size: 5 << 30,
            blocks: 16,
            mode: 0o100644,
            uid: 26,
            gid: 27,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 5,
            atime: (-5, 0),
            ctime: (1_700_000_001, 7),
            nlink: 1,
            rdev: 0,
        };
        let f = fattr(&a);
        assert_eq!(
            (f.fileid, f.size, f.used, f.mode),
            (9, 5 << 30, 8192, 0o644)
        );
        assert_eq!(f.atime.seconds, 0, "times before 1970 clamp");
        assert_eq!((f.mtime.seconds, f.mtime.nseconds), (1_700_000_000, 5));
        assert!(matches!(f.type_, ftype3::NF3REG));
        assert_eq!(status(&FsError::ReadOnly), nfsstat3::NFS3ERR_ROFS);
        assert_eq!(status(&FsError::Corrupt("x".into())), nfsstat3::NFS3ERR_IO);
        assert_eq!(status(&FsError::NoSpace), nfsstat3::NFS3ERR_NOSPC);
        let v = createverf3([0, 0, 1, 0, 0x3b, 0x9a, 0xca, 0x05]);
        assert_eq!(verifier_time(&v), (256, 5));
    }
}
