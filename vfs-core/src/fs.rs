//! The OS-neutral filesystem model of a mount: restore points as a
//! read-only tree `<job>/<restore point>/<files>`, with a `latest` link per
//! job. Mount backends (FUSE, NFS, WinFsp, Dokan) translate their requests
//! into calls on [`RepoFs`] and map [`FsError`] to their own codes.
//!
//! Inodes: 1 is the root; jobs, restore point directories and `latest`
//! links get numbers when listed. A restore point's manifest is loaded on
//! first access and its nodes get a contiguous inode range
//! (`base + node index`), so lookups inside a restore point are array
//! indexing, never a scan.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::cache::{ChunkCache, ChunkData, Frame};
use crate::disk_cache::DiskCache;
use crate::frame_fetch::{FrameFetcher, FrameRequest};
use crate::ids::{ChunkId, IdMap, PackId};
use crate::manifest::{Content, Manifest, NodeKind};
use crate::repo::{ChunkLoc, Repository, RestorePointName};

pub const ROOT_INO: u64 = 1;

/// How often the job and restore point lists are re-read from the
/// repository when a directory of them is listed.
const REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// Bytes read ahead of a sequential reader: the window starts at the
/// first and doubles with each sequential read up to the second (and to a
/// quarter of the memory cache, so prefetched frames are not evicted
/// before they are read).
const READAHEAD_MIN_BYTES: u64 = 1 << 20;
const READAHEAD_MAX_BYTES: u64 = 16 << 20;

/// Sequential reads in a row before readahead starts: one read at a
/// random offset is not a pattern.
const READAHEAD_AFTER: u32 = 2;

/// How far a read may start from where the previous one ended and still
/// count as sequential: the kernel's readahead requests for one reader
/// can reach a multi-threaded server out of order.
const SEQUENTIAL_SLACK: u64 = 256 << 10;

/// Readahead requests waiting for a worker; beyond this they are dropped,
/// so prefetching never delays what readers asked for.
const READAHEAD_QUEUE: usize = 256;

/// The filesystem model's errors. Backends map each to their own code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotADirectory,
    #[error("is a directory")]
    IsADirectory,
    #[error("not a symbolic link")]
    NotASymlink,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("invalid argument")]
    InvalidArgument,
    #[error("bad file handle")]
    BadHandle,
    /// Stored data failed verification; the detail names the chunk.
    #[error("data corrupt: {0}")]
    Corrupt(String),
    /// The repository could not be read (I/O, missing object).
    #[error("repository I/O error: {0}")]
    Io(String),
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file name too long")]
    NameTooLong,
    /// A writable session's state directory is full (or below its reserve).
    #[error("no space left in the session's state directory")]
    NoSpace,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("operation not supported")]
    Unsupported,
    /// A writable session's own files failed (not the repository's).
    #[error("session I/O error: {0}")]
    SessionIo(String),
}

impl FsError {
    /// A session-file error: a full disk becomes [`FsError::NoSpace`].
    pub fn session_io(what: &str, e: &std::io::Error) -> FsError {
        if e.raw_os_error() == Some(28) || e.kind() == std::io::ErrorKind::StorageFull {
            FsError::NoSpace
        } else {
            FsError::SessionIo(format!("{what}: {e}"))
        }
    }
}

impl From<crate::Error> for FsError {
    fn from(e: crate::Error) -> Self {
        if e.is_corruption() {
            FsError::Corrupt(e.to_string())
        } else {
            FsError::Io(e.to_string())
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: NodeKind,
    pub size: u64,
    /// 512-byte blocks holding data (holes take none).
    pub blocks: u64,
    /// Permission bits (07777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Access and change times; a restore point keeps only mtime and
    /// repeats it here, a writable session tracks all three.
    pub atime: (i64, u32),
    pub ctime: (i64, u32),
    pub nlink: u32,
    /// Device number of a device node; 0 otherwise.
    pub rdev: u32,
}

impl Attr {
    /// Sets all three times to `sec.nsec`.
    pub fn with_mtime(mut self, sec: i64, nsec: u32) -> Attr {
        (self.mtime_sec, self.mtime_nsec) = (sec, nsec);
        self.atime = (sec, nsec);
        self.ctime = (sec, nsec);
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: NodeKind,
    pub name: Vec<u8>,
}

/// Figures for `statfs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatFs {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub files: u64,
    pub free_files: u64,
}

/// Who makes a request: new nodes belong to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A time to set: the request's own clock reading, or a given one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(i64, u32),
}

/// The attributes a `setattr` changes; `None` leaves one alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// How `rename` treats an existing target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RenameMode {
    /// Replace it (POSIX rename).
    #[default]
    Replace,
    /// Fail with [`FsError::Exists`] (RENAME_NOREPLACE).
    NoReplace,
    /// Swap the two names; both must exist (RENAME_EXCHANGE).
    Exchange,
}

/// What a mount backend serves: the read-only [`RepoFs`] or a writable
/// session over one restore point (`session::CowFs`). The write calls
/// default to [`FsError::ReadOnly`].
pub trait FsModel: Send + Sync {
    /// Whether anything can change through the mount: a backend caches
    /// less and reports free space.
    fn writable(&self) -> bool {
        false
    }
    fn getattr(&self, ino: u64) -> FsResult<Attr>;
    fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr>;
    fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>>;
    /// The directory holding `ino` (the root is its own parent).
    fn parent(&self, ino: u64) -> FsResult<u64>;
    fn readlink(&self, ino: u64) -> FsResult<Vec<u8>>;
    /// Opens a file; `truncate` empties it first (O_TRUNC).
    fn open(&self, ino: u64, write: bool, truncate: bool) -> FsResult<u64>;
    fn release(&self, fh: u64);
    fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>>;
    fn statfs(&self) -> StatFs;

    fn setattr(&self, _ino: u64, _set: &SetAttr) -> FsResult<Attr> {
        Err(FsError::ReadOnly)
    }
    /// Makes a node of any kind but a directory or symlink: a regular
    /// file, pipe, socket or device node.
    fn mknod(
        &self,
        _parent: u64,
        _name: &[u8],
        _kind: NodeKind,
        _mode: u32,
        _rdev: u32,
        _caller: Caller,
    ) -> FsResult<Attr> {
        Err(FsError::ReadOnly)
    }
    fn mkdir(&self, _parent: u64, _name: &[u8], _mode: u32, _caller: Caller) -> FsResult<Attr> {
        Err(FsError::ReadOnly)
    }
    fn symlink(
        &self,
        _parent: u64,
        _name: &[u8],
        _target: &[u8],
        _caller: Caller,
    ) -> FsResult<Attr> {
        Err(FsError::ReadOnly)
    }
    fn link(&self, _ino: u64, _parent: u64, _name: &[u8]) -> FsResult<Attr> {
        Err(FsError::ReadOnly)
    }
    fn unlink(&self, _parent: u64, _name: &[u8]) -> FsResult<()> {
        Err(FsError::ReadOnly)
    }
    fn rmdir(&self, _parent: u64, _name: &[u8]) -> FsResult<()> {
        Err(FsError::ReadOnly)
    }
    fn rename(
        &self,
        _parent: u64,
        _name: &[u8],
        _new_parent: u64,
        _new_name: &[u8],
        _mode: RenameMode,
    ) -> FsResult<()> {
        Err(FsError::ReadOnly)
    }
    /// Writes at `offset` through an open handle; returns bytes written.
    fn write(&self, _fh: u64, _offset: u64, _data: &[u8]) -> FsResult<u32> {
        Err(FsError::ReadOnly)
    }
    /// Makes a file's data (and with it every change made so far) durable.
    fn fsync(&self, _ino: u64) -> FsResult<()> {
        Ok(())
    }
    /// Reserves `[offset, offset + len)`: extends the file unless
    /// `keep_size`.
    fn fallocate(&self, _ino: u64, _offset: u64, _len: u64, _keep_size: bool) -> FsResult<()> {
        Err(FsError::ReadOnly)
    }
}

/// Which restore points a mount shows.
#[derive(Clone, Debug, Default)]
pub struct MountFilter {
    pub job: Option<String>,
    pub restore_point: Option<RestorePointName>,
    /// With `restore_point`: show that restore point's files at the
    /// mount's root instead of under `<job>/<timestamp>` (the mount daemon
    /// mounts each restore point at its own path).
    pub rooted: bool,
}

pub struct FsOptions {
    pub cache_bytes: usize,
    /// Stored frames kept on local disk (for remote stores), shared by
    /// every mount given the same one.
    pub disk_cache: Option<Arc<DiskCache>>,
    pub readahead_threads: usize,
    /// Owner of the synthetic directories (root, jobs, restore points).
    pub uid: u32,
    pub gid: u32,
    pub filter: MountFilter,
}

/// Counters for logs and metrics.
#[derive(Default, Debug)]
pub struct FsCounters {
    pub reads: AtomicU64,
    pub bytes_served: AtomicU64,
    pub chunk_errors: AtomicU64,
    /// Chunks readahead jobs looked at.
    pub readahead_chunks: AtomicU64,
    /// Frames readahead fetched (nobody had them or was fetching them).
    pub readahead_frames: AtomicU64,
    /// Readahead jobs not queued because the workers were behind.
    pub readahead_dropped: AtomicU64,
    /// Queued readahead jobs skipped because their reader turned random.
    pub readahead_cancelled: AtomicU64,
    /// Restore point manifests read and decoded.
    pub manifest_loads: AtomicU64,
    /// Read latency histogram: bucket i counts reads taking < 2^i µs.
    pub read_latency_us: [AtomicU64; 24],
    /// Sum of all read latencies in µs (the histogram's sum).
    pub read_latency_us_total: AtomicU64,
}

/// A restore point whose manifest is loaded.
struct LoadedRp {
    name: RestorePointName,
    manifest: Manifest,
    /// Inode of node 0 (the restore point directory); node i >= 1 is
    /// `base + i`.
    dir_ino: u64,
    base: u64,
    /// Children of each directory node, sorted by name.
    children: Vec<Vec<(Vec<u8>, u32)>>,
    /// Start offset of each chunk, for content-defined chunk lists.
    offsets: Vec<Vec<u64>>,
    blocks: Vec<u64>,
}

enum Synthetic {
    Root,
    Job(String),
    /// `latest` link of a job.
    Latest(String),
    RestorePoint(RestorePointName),
}

struct Tree {
    next_ino: u64,
    synthetic: HashMap<u64, Synthetic>,
    /// job -> (ino, latest-link ino, restore point name -> ino)
    jobs: BTreeMap<String, (u64, u64, BTreeMap<String, u64>)>,
    /// Loaded restore points by their node range start.
    loaded: BTreeMap<u64, Arc<LoadedRp>>,
    loaded_by_dir: HashMap<u64, Arc<LoadedRp>>,
    last_refresh: Option<Instant>,
    mount_time: i64,
}

struct OpenFile {
    rp: Arc<LoadedRp>,
    node: usize,
    /// End of the previous read, to detect sequential access.
    last_end: AtomicU64,
    /// Sequential reads in a row.
    streak: std::sync::atomic::AtomicU32,
    /// Bumped when access turns random: queued readahead of an older
    /// generation is skipped.
    generation: AtomicU64,
    /// Readahead has been queued up to here.
    ahead_until: AtomicU64,
}

/// A run of chunks of one file to fetch ahead of its reader.
struct ReadaheadJob {
    file: Arc<OpenFile>,
    generation: u64,
    chunks: std::ops::Range<usize>,
}

/// File bytes per readahead job: its frames are fetched together, nearby
/// ones of a pack in one request.
const READAHEAD_JOB_BYTES: u64 = 2 << 20;

pub struct RepoFs {
    repo: Arc<Repository>,
    cache: Arc<ChunkCache>,
    fetcher: Arc<FrameFetcher>,
    tree: RwLock<Tree>,
    /// Restore points being loaded, by directory inode: one load each,
    /// the other readers that ask meanwhile wait for it.
    loading: Mutex<HashMap<u64, Arc<Mutex<()>>>>,
    handles: Mutex<HashMap<u64, Arc<OpenFile>>>,
    next_handle: AtomicU64,
    readahead: Option<crossbeam_channel::Sender<ReadaheadJob>>,
    options: FsOptions,
    pub counters: Arc<FsCounters>,
    /// Names the restore points this mount serves, so `flr forget` keeps
    /// them (see [`crate::lock`]). `None` when the repository cannot be
    /// written (a read-only copy): the mount serves it all the same.
    reader_lock: Option<crate::lock::LockGuard>,
}

fn parse_timestamp_name(name: &str) -> Option<i64> {
    // YYYY-MM-DDTHH-MM-SSZ
    let b = name.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| name.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // days_from_civil, the inverse of the manifest's civil_from_days.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

impl RepoFs {
    /// A mount with a memory cache of its own, of `options.cache_bytes`.
    pub fn new(repo: Arc<Repository>, options: FsOptions) -> crate::Result<Arc<RepoFs>> {
        let cache = Arc::new(ChunkCache::new(options.cache_bytes));
        RepoFs::with_cache(repo, options, cache)
    }

    /// A mount whose decoded frames go to `cache`, which other mounts may
    /// share (one bound for a daemon's mounts); `options.cache_bytes` is
    /// not used. Frames are keyed by their pack's id and their place in
    /// it (`ChunkLoc::frame_key`), and every chunk is checked against its
    /// own repository's id when it is served, so mounts of different
    /// repositories never serve each other's bytes.
    pub fn with_cache(
        repo: Arc<Repository>,
        options: FsOptions,
        cache: Arc<ChunkCache>,
    ) -> crate::Result<Arc<RepoFs>> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let reader_lock = crate::lock::acquire_reader(
            &repo,
            options
                .filter
                .restore_point
                .iter()
                .map(|r| r.to_string())
                .collect(),
        );
        let mut synthetic = HashMap::new();
        synthetic.insert(ROOT_INO, Synthetic::Root);
        let fetcher = Arc::new(FrameFetcher::new(repo.clone(), options.disk_cache.clone()));
        let counters = Arc::new(FsCounters::default());
        let readahead = (options.readahead_threads > 0).then(|| {
            let (tx, rx) = crossbeam_channel::bounded::<ReadaheadJob>(READAHEAD_QUEUE);
            for n in 0..options.readahead_threads {
                let rx = rx.clone();
                let (repo, cache, fetcher, counters) = (
                    repo.clone(),
                    cache.clone(),
                    fetcher.clone(),
                    counters.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("flr-readahead-{n}"))
                    .spawn(move || {
                        for job in rx {
                            prefetch(&job, &repo, &cache, &fetcher, &counters);
                        }
                    })
                    .expect("spawn readahead thread");
            }
            tx
        });
        let fs = Arc::new(RepoFs {
            repo,
            cache,
            fetcher,
            tree: RwLock::new(Tree {
                next_ino: ROOT_INO + 1,
                synthetic,
                jobs: BTreeMap::new(),
                loaded: BTreeMap::new(),
                loaded_by_dir: HashMap::new(),
                last_refresh: None,
                mount_time: now,
            }),
            loading: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            readahead,
            options,
            counters,
            reader_lock,
        });
        fs.refresh(true)?;
        if let Some(rp) = &fs.options.filter.restore_point {
            let tree = fs.tree.read();
            let found = tree
                .jobs
                .get(&rp.job)
                .is_some_and(|(_, _, rps)| rps.contains_key(&rp.name));
            if !found {
                return Err(crate::Error::NotFound(format!("restore point {rp}")));
            }
        }
        Ok(fs)
    }

    pub fn repository(&self) -> &Arc<Repository> {
        &self.repo
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    /// The memory cache, to share with another mount.
    pub fn shared_cache(&self) -> Arc<ChunkCache> {
        self.cache.clone()
    }

    /// How frames reach the memory cache: the disk cache and the requests
    /// to the store, with their counts.
    pub fn fetcher(&self) -> &FrameFetcher {
        &self.fetcher
    }

    /// Re-reads the list of restore points (at most every few seconds
    /// unless forced) and gives new ones inode numbers.
    fn refresh(&self, force: bool) -> crate::Result<()> {
        let first = {
            let tree = self.tree.read();
            if !force
                && tree
                    .last_refresh
                    .is_some_and(|t| t.elapsed() < REFRESH_INTERVAL)
            {
                return Ok(());
            }
            tree.last_refresh.is_none()
        };
        let filter = &self.options.filter;
        let job = filter
            .restore_point
            .as_ref()
            .map(|r| r.job.as_str())
            .or(filter.job.as_deref());
        let names = self.repo.list_restore_points(job)?;
        // Named in the reader lock before they are shown, so none is
        // forgotten once a reader may have opened it.
        let served: Vec<String> = names
            .iter()
            .filter(|n| filter.restore_point.as_ref().is_none_or(|r| r == *n))
            .map(|n| n.to_string())
            .collect();
        if let Some(Err(e)) = self
            .reader_lock
            .as_ref()
            .map(|l| l.set_restore_points(served))
        {
            tracing::warn!("updating this mount's reader lock: {e}");
        }
        // A restore point committed since the index was read refers to
        // chunks the in-memory index does not know yet. Its index files
        // were written before its manifest, so reading the index again now
        // finds them; only then is it shown, or its reads would fail as
        // missing chunks.
        let appeared = {
            let tree = self.tree.read();
            names.iter().any(|name| {
                filter.restore_point.as_ref().is_none_or(|r| r == name)
                    && !tree
                        .jobs
                        .get(&name.job)
                        .is_some_and(|j| j.2.contains_key(&name.name))
            })
        };
        if appeared && !first {
            self.repo.reload_index()?;
        }
        let mut tree = self.tree.write();
        tree.last_refresh = Some(Instant::now());
        for name in names {
            if filter.restore_point.as_ref().is_some_and(|r| *r != name) {
                continue;
            }
            if !tree.jobs.contains_key(&name.job) {
                let (ino, latest) = (tree.next_ino, tree.next_ino + 1);
                tree.next_ino += 2;
                tree.synthetic.insert(ino, Synthetic::Job(name.job.clone()));
                tree.synthetic
                    .insert(latest, Synthetic::Latest(name.job.clone()));
                tree.jobs
                    .insert(name.job.clone(), (ino, latest, BTreeMap::new()));
            }
            if tree.jobs[&name.job].2.contains_key(&name.name) {
                continue;
            }
            // A rooted mount's root is the restore point's directory.
            let ino = if filter.rooted && filter.restore_point.is_some() {
                ROOT_INO
            } else {
                tree.next_ino += 1;
                tree.next_ino - 1
            };
            tree.synthetic
                .insert(ino, Synthetic::RestorePoint(name.clone()));
            tree.jobs
                .get_mut(&name.job)
                .unwrap()
                .2
                .insert(name.name.clone(), ino);
        }
        Ok(())
    }

    fn load(&self, dir_ino: u64, name: &RestorePointName) -> FsResult<Arc<LoadedRp>> {
        if let Some(rp) = self.tree.read().loaded_by_dir.get(&dir_ino) {
            return Ok(rp.clone());
        }
        // One load per restore point, however many readers ask at once
        // (a manifest can be large): the others wait here, then find it.
        let gate = self.loading.lock().entry(dir_ino).or_default().clone();
        let _only_loader = gate.lock();
        if let Some(rp) = self.tree.read().loaded_by_dir.get(&dir_ino) {
            return Ok(rp.clone());
        }
        let loaded = self.load_now(dir_ino, name);
        self.loading.lock().remove(&dir_ino);
        loaded
    }

    fn load_now(&self, dir_ino: u64, name: &RestorePointName) -> FsResult<Arc<LoadedRp>> {
        self.counters.manifest_loads.fetch_add(1, Ordering::Relaxed);
        let manifest = self.repo.load_manifest(name).map_err(|e| {
            log_error(&format!("cannot load restore point {name}: {e}"));
            FsError::from(e)
        })?;
        let n = manifest.nodes.len();
        let mut children: Vec<Vec<(Vec<u8>, u32)>> = vec![Vec::new(); n];
        let mut offsets = vec![Vec::new(); n];
        let mut blocks = vec![0u64; n];
        for (i, node) in manifest.nodes.iter().enumerate() {
            if i > 0 {
                children[node.parent as usize].push((node.name.clone(), i as u32));
            }
            let data_bytes: u64 = match &node.content {
                Content::Empty => 0,
                Content::Fixed { .. } => node.content.data_bytes(node.size),
                Content::Variable { chunks } => {
                    let mut off = 0;
                    let mut data = 0;
                    offsets[i] = chunks
                        .iter()
                        .map(|(id, len)| {
                            let start = off;
                            off += *len as u64;
                            if id.is_some() {
                                data += *len as u64;
                            }
                            start
                        })
                        .collect();
                    data
                }
            };
            blocks[i] = data_bytes.div_ceil(512);
        }
        for c in &mut children {
            c.sort();
        }
        let mut tree = self.tree.write();
        if let Some(rp) = tree.loaded_by_dir.get(&dir_ino) {
            return Ok(rp.clone());
        }
        let base = tree.next_ino - 1;
        tree.next_ino += n as u64;
        let rp = Arc::new(LoadedRp {
            name: name.clone(),
            manifest,
            dir_ino,
            base,
            children,
            offsets,
            blocks,
        });
        tree.loaded.insert(base, rp.clone());
        tree.loaded_by_dir.insert(dir_ino, rp.clone());
        drop(tree);
        // The manifest's stored and plain bytes are gone: give them back.
        crate::memory::release_freed();
        Ok(rp)
    }

    /// Finds what an inode is: a synthetic directory/link or a node of a
    /// loaded restore point.
    fn resolve(&self, ino: u64) -> FsResult<Resolved> {
        let tree = self.tree.read();
        if let Some(s) = tree.synthetic.get(&ino) {
            return Ok(match s {
                Synthetic::Root => Resolved::Root,
                Synthetic::Job(j) => Resolved::Job(j.clone()),
                Synthetic::Latest(j) => Resolved::Latest(j.clone()),
                Synthetic::RestorePoint(name) => match tree.loaded_by_dir.get(&ino) {
                    Some(rp) => Resolved::Node(rp.clone(), 0),
                    None => Resolved::Unloaded(name.clone()),
                },
            });
        }
        let (_, rp) = tree
            .loaded
            .range(..ino)
            .next_back()
            .ok_or(FsError::NotFound)?;
        let i = (ino - rp.base) as usize;
        if i == 0 || i >= rp.manifest.nodes.len() {
            return Err(FsError::NotFound);
        }
        Ok(Resolved::Node(rp.clone(), i))
    }

    fn resolve_loaded(&self, ino: u64) -> FsResult<Resolved> {
        match self.resolve(ino)? {
            Resolved::Unloaded(name) => Ok(Resolved::Node(self.load(ino, &name)?, 0)),
            other => Ok(other),
        }
    }

    fn synthetic_dir(&self, ino: u64, mtime: i64) -> Attr {
        Attr {
            ino,
            kind: NodeKind::Dir,
            size: 0,
            blocks: 0,
            mode: 0o555,
            uid: self.options.uid,
            gid: self.options.gid,
            mtime_sec: mtime,
            mtime_nsec: 0,
            atime: (mtime, 0),
            ctime: (mtime, 0),
            nlink: 2,
            rdev: 0,
        }
    }

    fn node_attr(rp: &LoadedRp, i: usize) -> Attr {
        let node = &rp.manifest.nodes[i];
        let ino = if i == 0 {
            rp.dir_ino
        } else {
            rp.base + i as u64
        };
        let nlink = if node.kind == NodeKind::Dir {
            2 + rp.children[i]
                .iter()
                .filter(|(_, c)| rp.manifest.nodes[*c as usize].kind == NodeKind::Dir)
                .count() as u32
        } else {
            1
        };
        let (mtime_sec, mtime_nsec) = if i == 0 {
            (rp.manifest.time, 0)
        } else {
            (node.mtime_sec, node.mtime_nsec)
        };
        Attr {
            ino,
            kind: node.kind,
            size: node.size,
            blocks: rp.blocks[i],
            // The root shows its own mode without write bits (a data
            // directory at the root keeps 0700 or 0750, as its server
            // demands); a mount is read-only anyway.
            mode: if i == 0 {
                node.mode & !0o222
            } else {
                node.mode
            },
            uid: node.uid,
            gid: node.gid,
            mtime_sec,
            mtime_nsec,
            atime: (mtime_sec, mtime_nsec),
            ctime: (mtime_sec, mtime_nsec),
            nlink,
            rdev: 0,
        }
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let mount_time = self.tree.read().mount_time;
        match self.resolve(ino)? {
            Resolved::Root => Ok(self.synthetic_dir(ino, mount_time)),
            Resolved::Job(job) => {
                let tree = self.tree.read();
                let newest = tree
                    .jobs
                    .get(&job)
                    .and_then(|j| j.2.keys().next_back().cloned());
                Ok(self.synthetic_dir(
                    ino,
                    newest
                        .and_then(|n| parse_timestamp_name(&n))
                        .unwrap_or(mount_time),
                ))
            }
            Resolved::Latest(job) => {
                let target = self.latest_target(&job)?;
                Ok(Attr {
                    ino,
                    kind: NodeKind::Symlink,
                    size: target.len() as u64,
                    blocks: 0,
                    mode: 0o777,
                    uid: self.options.uid,
                    gid: self.options.gid,
                    mtime_sec: 0,
                    mtime_nsec: 0,
                    atime: (0, 0),
                    ctime: (0, 0),
                    nlink: 1,
                    rdev: 0,
                }
                .with_mtime(
                    parse_timestamp_name(&String::from_utf8_lossy(&target)).unwrap_or(mount_time),
                    0,
                ))
            }
            // Until a restore point is opened, its directory's attributes
            // come from its name: no manifest load for `ls -l` of a job.
            Resolved::Unloaded(name) => {
                Ok(self.synthetic_dir(ino, parse_timestamp_name(&name.name).unwrap_or(mount_time)))
            }
            Resolved::Node(rp, i) => Ok(Self::node_attr(&rp, i)),
        }
    }

    fn latest_target(&self, job: &str) -> FsResult<Vec<u8>> {
        let tree = self.tree.read();
        let rps = &tree.jobs.get(job).ok_or(FsError::NotFound)?.2;
        rps.keys()
            .next_back()
            .map(|n| n.as_bytes().to_vec())
            .ok_or(FsError::NotFound)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        match self.resolve_loaded(parent)? {
            Resolved::Root => {
                let _ = self.refresh(false);
                let ino = {
                    let tree = self.tree.read();
                    let job = std::str::from_utf8(name).map_err(|_| FsError::NotFound)?;
                    tree.jobs.get(job).ok_or(FsError::NotFound)?.0
                };
                self.getattr(ino)
            }
            Resolved::Job(job) => {
                let find = || -> Option<u64> {
                    let tree = self.tree.read();
                    let (_, latest, rps) = tree.jobs.get(&job)?;
                    if name == b"latest" {
                        return Some(*latest);
                    }
                    rps.get(std::str::from_utf8(name).ok()?).copied()
                };
                let ino = match find() {
                    Some(ino) => ino,
                    None => {
                        let _ = self.refresh(false);
                        find().ok_or(FsError::NotFound)?
                    }
                };
                self.getattr(ino)
            }
            Resolved::Latest(_) => Err(FsError::NotADirectory),
            Resolved::Unloaded(_) => unreachable!("resolve_loaded loads restore points"),
            Resolved::Node(rp, i) => {
                if rp.manifest.nodes[i].kind != NodeKind::Dir {
                    return Err(FsError::NotADirectory);
                }
                let kids = &rp.children[i];
                let pos = kids
                    .binary_search_by(|(n, _)| n.as_slice().cmp(name))
                    .map_err(|_| FsError::NotFound)?;
                Ok(Self::node_attr(&rp, kids[pos].1 as usize))
            }
        }
    }

    /// The entries of a directory, without `.` and `..` (backends add them).
    pub fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        match self.resolve_loaded(ino)? {
            Resolved::Root => {
                let _ = self.refresh(false);
                let tree = self.tree.read();
                Ok(tree
                    .jobs
                    .iter()
                    .map(|(name, (ino, _, _))| DirEntry {
                        ino: *ino,
                        kind: NodeKind::Dir,
                        name: name.as_bytes().to_vec(),
                    })
                    .collect())
            }
            Resolved::Job(job) => {
                let _ = self.refresh(false);
                let tree = self.tree.read();
                let (_, latest, rps) = tree.jobs.get(&job).ok_or(FsError::NotFound)?;
                let mut out: Vec<DirEntry> = rps
                    .iter()
                    .map(|(name, ino)| DirEntry {
                        ino: *ino,
                        kind: NodeKind::Dir,
                        name: name.as_bytes().to_vec(),
                    })
                    .collect();
                out.push(DirEntry {
                    ino: *latest,
                    kind: NodeKind::Symlink,
                    name: b"latest".to_vec(),
                });
                Ok(out)
            }
            Resolved::Latest(_) => Err(FsError::NotADirectory),
            Resolved::Unloaded(_) => unreachable!("resolve_loaded loads restore points"),
            Resolved::Node(rp, i) => {
                if rp.manifest.nodes[i].kind != NodeKind::Dir {
                    return Err(FsError::NotADirectory);
                }
                Ok(rp.children[i]
                    .iter()
                    .map(|(name, c)| DirEntry {
                        ino: rp.base + *c as u64,
                        kind: rp.manifest.nodes[*c as usize].kind,
                        name: name.clone(),
                    })
                    .collect())
            }
        }
    }

    /// The parent directory's inode, for `..`.
    pub fn parent(&self, ino: u64) -> FsResult<u64> {
        if ino == ROOT_INO {
            return Ok(ROOT_INO);
        }
        match self.resolve(ino)? {
            Resolved::Root => Ok(ROOT_INO),
            Resolved::Job(_) | Resolved::Latest(_) => Ok(ROOT_INO),
            Resolved::Unloaded(name) => Ok(self
                .tree
                .read()
                .jobs
                .get(&name.job)
                .map_or(ROOT_INO, |j| j.0)),
            Resolved::Node(rp, 0) => Ok(self
                .tree
                .read()
                .jobs
                .get(&rp.name.job)
                .map_or(ROOT_INO, |j| j.0)),
            Resolved::Node(rp, i) => {
                let p = rp.manifest.nodes[i].parent as usize;
                Ok(if p == 0 {
                    rp.dir_ino
                } else {
                    rp.base + p as u64
                })
            }
        }
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        match self.resolve(ino)? {
            Resolved::Latest(job) => self.latest_target(&job),
            Resolved::Node(rp, i) if rp.manifest.nodes[i].kind == NodeKind::Symlink => {
                Ok(rp.manifest.nodes[i].target.clone())
            }
            _ => Err(FsError::NotASymlink),
        }
    }

    /// Opens a file for reading; returns a handle for [`RepoFs::read`].
    /// Opening for writing fails with `ReadOnly`.
    pub fn open(&self, ino: u64, write: bool) -> FsResult<u64> {
        let Resolved::Node(rp, i) = self.resolve_loaded(ino)? else {
            return Err(if write {
                FsError::ReadOnly
            } else {
                FsError::IsADirectory
            });
        };
        match rp.manifest.nodes[i].kind {
            NodeKind::Dir => return Err(FsError::IsADirectory),
            NodeKind::File => {}
            _ => return Err(FsError::InvalidArgument),
        }
        if write {
            return Err(FsError::ReadOnly);
        }
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(
            fh,
            Arc::new(OpenFile {
                rp,
                node: i,
                last_end: AtomicU64::new(u64::MAX),
                streak: Default::default(),
                generation: AtomicU64::new(0),
                ahead_until: AtomicU64::new(0),
            }),
        );
        Ok(fh)
    }

    pub fn release(&self, fh: u64) {
        if let Some(file) = self.handles.lock().remove(&fh) {
            // Readahead still queued for it is not wanted any more.
            file.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Files open through this filesystem right now (handles from
    /// [`RepoFs::open`] not yet released): the readers of a mount.
    pub fn open_files(&self) -> usize {
        self.handles.lock().len()
    }

    /// Reads up to `size` bytes at `offset` of an open file. Short only at
    /// end of file. A chunk failing verification fails the whole read
    /// (never wrong bytes) and is logged and counted.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let started = Instant::now();
        let file = self
            .handles
            .lock()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let node = &file.rp.manifest.nodes[file.node];
        if offset >= node.size || size == 0 {
            return Ok(Vec::new());
        }
        let end = node.size.min(offset + size as u64);
        let chunks = ChunkMap::new(&file.rp, file.node);
        // Sequential readers get the next chunks fetched on worker threads,
        // queued before this read's own work so both proceed together.
        let prev_end = file.last_end.swap(end, Ordering::Relaxed);
        let sequential = if prev_end == u64::MAX {
            offset == 0
        } else {
            offset.abs_diff(prev_end) <= SEQUENTIAL_SLACK
        };
        if sequential {
            let streak = file.streak.fetch_add(1, Ordering::Relaxed) + 1;
            if streak >= READAHEAD_AFTER {
                self.read_ahead(&file, &chunks, end, streak);
            }
        } else if file.streak.swap(0, Ordering::Relaxed) > 0 {
            // Turned random: what is queued for this file is not wanted.
            file.generation.fetch_add(1, Ordering::Relaxed);
            file.ahead_until.store(0, Ordering::Relaxed);
        }
        // The pieces of this read: (where the chunk is stored, or None for a
        // hole; start of the chunk; range inside the chunk). Each chunk is
        // located once, under one index lock.
        let mut pieces = Vec::new();
        let mut k = chunks.index_of(offset);
        let mut pos = offset;
        while pos < end {
            let (id, start, len) = chunks.get(k);
            let from = (pos - start) as usize;
            let to = ((end - start) as usize).min(len as usize);
            let place = id.map(|id| {
                Located::find(&self.repo, id).and_then(|chunk| {
                    // The manifest and the index must agree on the chunk's
                    // length; slicing by one of them alone could serve the
                    // neighbouring chunk's bytes.
                    if chunk.loc.raw_len == len {
                        Ok(chunk)
                    } else {
                        Err(FsError::Corrupt(format!(
                            "chunk {id}: the restore point says {len} bytes, the index {}",
                            chunk.loc.raw_len
                        )))
                    }
                })
            });
            pieces.push((place, start, from..to));
            pos = start + to as u64;
            k += 1;
        }
        // The frames of this read that no one holds or fetches are claimed
        // (other readers wait for them) and fetched together: nearby
        // frames of a pack in one request, so a cold small read costs one.
        let mut claims = Vec::new();
        let mut wanted = Vec::new();
        for (place, _, _) in &pieces {
            if let Some(Ok(chunk)) = place {
                if let Some(claim) = self.cache.claim(&chunk.frame_key) {
                    wanted.push(chunk.request());
                    claims.push(claim);
                }
            }
        }
        let mut fetched_here: IdMap<ChunkData> = IdMap::default();
        if !claims.is_empty() {
            for (claim, frame) in claims.into_iter().zip(self.fetcher.fetch(&wanted)) {
                let frame = frame.map(|f| Arc::new(Frame::new(f)));
                if let Ok(f) = &frame {
                    fetched_here.insert(*claim.id(), f.clone());
                }
                claim.complete(frame);
            }
        }
        let get = |place: &FsResult<Located>| match place {
            Ok(chunk) => match fetched_here.get(&chunk.frame_key) {
                Some(frame) => chunk_in(&self.repo, chunk, frame.clone()),
                // Cached, fetched by someone else, or failed here: a
                // failure is tried once more alone (and relocated if a
                // prune moved the chunk).
                None => chunk_bytes(&self.repo, &self.cache, &self.fetcher, chunk),
            },
            Err(e) => Err(e.clone()),
        };
        // A large read of frames not yet cached checks the chunks of the
        // frames fetched here on all cores. Only those: a pool thread must
        // never wait for a frame that another reader or a readahead job is
        // fetching, since that fetch decodes on the same pool, and pool
        // threads all waiting on fetches that need a pool thread to finish
        // hang the mount. The other chunks are looked up on this thread.
        let fetched: Vec<Option<FsResult<ChunkSlice>>> = if fetched_here.len() > 4 {
            use rayon::prelude::*;
            let checked: Vec<Option<FsResult<ChunkSlice>>> = pieces
                .par_iter()
                .map(|(place, _, _)| match place {
                    Some(Ok(chunk)) => fetched_here
                        .get(&chunk.frame_key)
                        .map(|frame| chunk_in(&self.repo, chunk, frame.clone())),
                    _ => None,
                })
                .collect();
            pieces
                .iter()
                .zip(checked)
                .map(|((place, _, _), done)| match done {
                    Some(r) => Some(r),
                    None => place.as_ref().map(get),
                })
                .collect()
        } else {
            pieces
                .iter()
                .map(|(id, _, _)| id.as_ref().map(get))
                .collect()
        };
        let mut out = Vec::with_capacity((end - offset) as usize);
        for ((_, start, range), data) in pieces.iter().zip(fetched) {
            match data {
                None => out.resize(out.len() + range.len(), 0),
                Some(Ok((frame, chunk))) => out
                    .extend_from_slice(&frame[chunk.start + range.start..chunk.start + range.end]),
                Some(Err(e)) => {
                    self.counters.chunk_errors.fetch_add(1, Ordering::Relaxed);
                    log_error(&format!(
                        "read failed: restore point {}, file {}, offset {}: {e}",
                        file.rp.name,
                        file.rp.manifest.path_of(file.node),
                        start + range.start as u64
                    ));
                    return Err(e);
                }
            }
        }
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_served
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        let us = started.elapsed().as_micros() as u64;
        let bucket = (64 - us.leading_zeros() as usize).min(23);
        self.counters.read_latency_us[bucket].fetch_add(1, Ordering::Relaxed);
        self.counters
            .read_latency_us_total
            .fetch_add(us, Ordering::Relaxed);
        Ok(out)
    }

    fn read_ahead(&self, file: &Arc<OpenFile>, chunks: &ChunkMap, end: u64, streak: u32) {
        let Some(tx) = &self.readahead else { return };
        let size = file.rp.manifest.nodes[file.node].size;
        let window = (READAHEAD_MIN_BYTES << (streak - READAHEAD_AFTER).min(8))
            .min(READAHEAD_MAX_BYTES)
            .min(self.cache.capacity() as u64 / 4)
            .max(READAHEAD_JOB_BYTES);
        let queued = file.ahead_until.load(Ordering::Relaxed);
        let from = queued.max(end);
        let until = size.min(end + window);
        // Refill when half the window is used, in one go.
        if from >= until || queued > end + window / 2 {
            return;
        }
        let generation = file.generation.load(Ordering::Relaxed);
        let mut k = chunks.index_of(from);
        while k < chunks.len() {
            let start = chunks.get(k).1;
            if start >= until {
                break;
            }
            let mut last = k + 1;
            while last < chunks.len() && chunks.get(last).1 < start + READAHEAD_JOB_BYTES {
                last += 1;
            }
            let job = ReadaheadJob {
                file: file.clone(),
                generation,
                chunks: k..last,
            };
            if tx.try_send(job).is_err() {
                // Workers are behind: what is not queued is not marked, so
                // the next read queues it again.
                self.counters
                    .readahead_dropped
                    .fetch_add(1, Ordering::Relaxed);
                file.ahead_until.store(start, Ordering::Relaxed);
                return;
            }
            k = last;
        }
        file.ahead_until.store(until, Ordering::Relaxed);
    }

    /// Sizes cover the restore points loaded so far; nothing is free.
    pub fn statfs(&self) -> StatFs {
        let tree = self.tree.read();
        let bytes = tree
            .loaded
            .values()
            .map(|rp| rp.manifest.stats.logical_bytes)
            .sum();
        StatFs {
            total_bytes: bytes,
            free_bytes: 0,
            files: tree.next_ino,
            free_files: 0,
        }
    }
}

impl FsModel for RepoFs {
    fn getattr(&self, ino: u64) -> FsResult<Attr> {
        RepoFs::getattr(self, ino)
    }
    fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        RepoFs::lookup(self, parent, name)
    }
    fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        RepoFs::readdir(self, ino)
    }
    fn parent(&self, ino: u64) -> FsResult<u64> {
        RepoFs::parent(self, ino)
    }
    fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        RepoFs::readlink(self, ino)
    }
    fn open(&self, ino: u64, write: bool, truncate: bool) -> FsResult<u64> {
        RepoFs::open(self, ino, write || truncate)
    }
    fn release(&self, fh: u64) {
        RepoFs::release(self, fh)
    }
    fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        RepoFs::read(self, fh, offset, size)
    }
    fn statfs(&self) -> StatFs {
        RepoFs::statfs(self)
    }
}

enum Resolved {
    Root,
    Job(String),
    Latest(String),
    Unloaded(RestorePointName),
    Node(Arc<LoadedRp>, usize),
}

/// Offset-to-chunk lookup for one file: a division for fixed chunks, a
/// binary search over start offsets for content-defined ones.
struct ChunkMap<'a> {
    content: &'a Content,
    offsets: &'a [u64],
    size: u64,
}

impl<'a> ChunkMap<'a> {
    fn new(rp: &'a LoadedRp, node: usize) -> Self {
        ChunkMap {
            content: &rp.manifest.nodes[node].content,
            offsets: &rp.offsets[node],
            size: rp.manifest.nodes[node].size,
        }
    }

    fn len(&self) -> usize {
        match self.content {
            Content::Empty => 0,
            Content::Fixed { chunks, .. } => chunks.len(),
            Content::Variable { chunks } => chunks.len(),
        }
    }

    fn index_of(&self, offset: u64) -> usize {
        match self.content {
            Content::Empty => 0,
            Content::Fixed { chunk_size, .. } => (offset / *chunk_size as u64) as usize,
            Content::Variable { .. } => match self.offsets.binary_search(&offset) {
                Ok(i) => i,
                Err(i) => i - 1,
            },
        }
    }

    /// (id, start offset, length) of chunk `k`.
    fn get(&self, k: usize) -> (Option<ChunkId>, u64, u32) {
        match self.content {
            Content::Empty => (None, 0, 0),
            Content::Fixed { chunk_size, chunks } => {
                let start = k as u64 * *chunk_size as u64;
                (
                    chunks[k],
                    start,
                    (self.size - start).min(*chunk_size as u64) as u32,
                )
            }
            Content::Variable { chunks } => (chunks[k].0, self.offsets[k], chunks[k].1),
        }
    }
}

/// A chunk as served: its decoded frame and the chunk's range in it.
type ChunkSlice = (ChunkData, std::ops::Range<usize>);

/// Where a chunk is stored, looked up once per read.
struct Located {
    id: ChunkId,
    loc: ChunkLoc,
    pack: PackId,
    frame_key: ChunkId,
}

impl Located {
    fn find(repo: &Repository, id: ChunkId) -> FsResult<Located> {
        let (loc, pack) = repo.locate(&id).ok_or(crate::Error::MissingChunk(id))?;
        Ok(Located {
            id,
            loc,
            pack,
            frame_key: loc.frame_key(&pack),
        })
    }

    fn request(&self) -> FrameRequest {
        FrameRequest {
            chunk: self.id,
            loc: self.loc,
            pack: self.pack,
            frame_key: self.frame_key,
        }
    }
}

/// Fetches, for a readahead job, the frames of its chunks that no one
/// holds or fetches, together (see [`FrameFetcher::fetch`]), into the
/// memory cache. Failures are left for a reader to meet (and report).
fn prefetch(
    job: &ReadaheadJob,
    repo: &Repository,
    cache: &ChunkCache,
    fetcher: &FrameFetcher,
    counters: &FsCounters,
) {
    if job.file.generation.load(Ordering::Relaxed) != job.generation {
        counters.readahead_cancelled.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let map = ChunkMap::new(&job.file.rp, job.file.node);
    let mut claims = Vec::new();
    let mut wanted = Vec::new();
    for k in job.chunks.clone() {
        counters.readahead_chunks.fetch_add(1, Ordering::Relaxed);
        let Some(id) = map.get(k).0 else { continue };
        let Ok(chunk) = Located::find(repo, id) else {
            continue;
        };
        if let Some(claim) = cache.claim(&chunk.frame_key) {
            wanted.push(chunk.request());
            claims.push(claim);
        }
    }
    if claims.is_empty() {
        return;
    }
    counters
        .readahead_frames
        .fetch_add(claims.len() as u64, Ordering::Relaxed);
    for (claim, frame) in claims.into_iter().zip(fetcher.fetch(&wanted)) {
        claim.complete(frame.map(|f| Arc::new(Frame::new(f))));
    }
}

/// A chunk's range in its decoded frame, checked against its id the first
/// time the frame serves it.
fn chunk_in(repo: &Repository, chunk: &Located, frame: ChunkData) -> FsResult<ChunkSlice> {
    let (offset, len) = (chunk.loc.frame_offset, chunk.loc.raw_len);
    if !frame.was_checked(offset, len, &chunk.id) {
        repo.chunk_in_frame(&chunk.id, &chunk.loc, &chunk.pack, &frame)?;
        frame.mark_checked(offset, len, &chunk.id);
    }
    let start = offset as usize;
    Ok((frame, start..start + len as usize))
}

/// A chunk's bytes: its decoded frame (from the cache, or decoded once
/// however many readers ask) and the chunk's range in it, checked against
/// the chunk's id once per decoded frame.
fn chunk_bytes(
    repo: &Repository,
    cache: &ChunkCache,
    fetcher: &FrameFetcher,
    chunk: &Located,
) -> FsResult<ChunkSlice> {
    match frame_bytes(repo, cache, fetcher, chunk) {
        Ok(found) => Ok(found),
        Err(e) => {
            // A prune repacked the chunk and deleted its old pack: the
            // index read again locates it in its new pack.
            let gone = repo
                .store()
                .size(&crate::repo::pack_key(&chunk.pack))
                .is_ok_and(|s| s.is_none());
            if !gone {
                return Err(e);
            }
            repo.reload_index()?;
            let again = Located::find(repo, chunk.id)?;
            if again.pack == chunk.pack {
                return Err(e);
            }
            tracing::debug!(
                "chunk {} moved from pack {} to {}",
                chunk.id,
                chunk.pack,
                again.pack
            );
            frame_bytes(repo, cache, fetcher, &again)
        }
    }
}

fn frame_bytes(
    repo: &Repository,
    cache: &ChunkCache,
    fetcher: &FrameFetcher,
    chunk: &Located,
) -> FsResult<ChunkSlice> {
    let frame = cache.get_or_fetch(&chunk.frame_key, || {
        let mut one = fetcher.fetch(&[chunk.request()]);
        Ok(Arc::new(Frame::new(one.pop().expect("one frame asked")?)))
    })?;
    chunk_in(repo, chunk, frame)
}

fn log_error(msg: &str) {
    tracing::error!("{msg}");
}

/// Stable names of restore point nodes. Inode numbers are handed out as
/// restore points load, so the same node can get another number in another
/// mount; its index in the (immutable) manifest never changes. Writable
/// sessions store these indices, never inode numbers.
impl RepoFs {
    /// The manifest index of `ino` in the restore point whose directory
    /// inode is `dir`.
    pub fn node_index(&self, dir: u64, ino: u64) -> FsResult<u32> {
        match self.resolve_loaded(ino)? {
            Resolved::Node(rp, i) if rp.dir_ino == dir => {
                u32::try_from(i).map_err(|_| FsError::NotFound)
            }
            _ => Err(FsError::NotFound),
        }
    }

    /// The inode of node `index` of the restore point whose directory
    /// inode is `dir`, loading it if needed.
    pub fn node_ino(&self, dir: u64, index: u32) -> FsResult<u64> {
        let Resolved::Node(rp, 0) = self.resolve_loaded(dir)? else {
            return Err(FsError::NotADirectory);
        };
        let i = index as usize;
        if i >= rp.manifest.nodes.len() {
            return Err(FsError::NotFound);
        }
        Ok(if i == 0 {
            rp.dir_ino
        } else {
            rp.base + i as u64
        })
    }

    /// Moves the inode numbers restore points loaded from now on get by
    /// `n`, as loading other restore points first would. For tests that
    /// check nothing stored depends on inode numbers.
    #[doc(hidden)]
    pub fn skip_inodes(&self, n: u64) {
        self.tree.write().next_ino += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repository in memory holding one restore point of job `app`: a
    /// file `db.bin` of `data`, backed up from a stream.
    fn repo_with_file(data: Vec<u8>) -> (Arc<Repository>, crate::manifest::Manifest) {
        use crate::backup::{backup, BackupOptions, Source, StdinSource};
        let store = Arc::new(crate::store::MemoryStore::new());
        Repository::init(store.as_ref(), None).unwrap();
        let repo = Arc::new(Repository::open(store, || Ok(Vec::new())).unwrap());
        let source = Source::Stream(StdinSource {
            name: "db.bin".into(),
            reader: Box::new(std::io::Cursor::new(data)),
            mode: 0o644,
            uid: 0,
            gid: 0,
        });
        let opts = BackupOptions {
            job: "app".into(),
            chunker: None,
            hostname: "test".into(),
            progress: Default::default(),
        };
        let m = backup(&repo, source, &opts).unwrap();
        (repo, m)
    }

    #[test]
    fn a_rooted_mount_shows_one_restore_point_at_its_root() {
        let (repo, m) = repo_with_file(vec![7u8; 10_000]);
        let name = RestorePointName::parse(&m.full_name()).unwrap();
        let fs = RepoFs::new(
            repo,
            FsOptions {
                cache_bytes: 1 << 20,
                disk_cache: None,
                readahead_threads: 0,
                uid: 0,
                gid: 0,
                filter: MountFilter {
                    job: None,
                    restore_point: Some(name),
                    rooted: true,
                },
            },
        )
        .unwrap();
        let entries = fs.readdir(ROOT_INO).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].name, b"db.bin");
        assert_eq!(fs.parent(ROOT_INO), Ok(ROOT_INO));
        let file = fs.lookup(ROOT_INO, b"db.bin").unwrap();
        assert_eq!(fs.parent(file.ino), Ok(ROOT_INO));
        assert_eq!(fs.getattr(ROOT_INO).unwrap().kind, NodeKind::Dir);
        let fh = fs.open(file.ino, false).unwrap();
        assert_eq!(fs.open_files(), 1);
        assert_eq!(fs.read(fh, 0, 20_000).unwrap(), vec![7u8; 10_000]);
        fs.release(fh);
        assert_eq!(fs.open_files(), 0);
    }

    #[test]
    fn a_chunk_is_checked_once_per_frame_and_a_damaged_one_never_passes() {
        let (repo, m) = repo_with_file((0..64u32 << 10).map(|i| (i * 7 % 251) as u8).collect());
        let id = match &m
            .nodes
            .iter()
            .find(|n| n.name == b"db.bin")
            .unwrap()
            .content
        {
            crate::manifest::Content::Fixed { chunks, .. } => chunks[0].unwrap(),
            crate::manifest::Content::Variable { chunks } => chunks[0].0.unwrap(),
            other => panic!("unexpected content {other:?}"),
        };
        let chunk = Located::find(&repo, id).unwrap();
        let plain = repo.read_frame_at(&id, &chunk.loc, &chunk.pack).unwrap();
        let (offset, len) = (chunk.loc.frame_offset, chunk.loc.raw_len);

        // A frame whose chunk bytes were damaged after decoding fails on
        // every use: a failed check is never remembered as a pass.
        let mut damaged = plain.clone();
        damaged[offset as usize] ^= 1;
        let damaged = Arc::new(Frame::new(damaged));
        for _ in 0..2 {
            assert!(chunk_in(&repo, &chunk, damaged.clone()).is_err());
            assert!(!damaged.was_checked(offset, len, &id));
        }

        let good = Arc::new(Frame::new(plain));
        assert!(!good.was_checked(offset, len, &id));
        let (frame, range) = chunk_in(&repo, &chunk, good.clone()).unwrap();
        assert_eq!(range, offset as usize..(offset + len) as usize);
        assert!(frame.was_checked(offset, len, &id));
        // Another id, or another range, at the same place is not covered
        // by that check.
        let mut other = id;
        other.0[0] ^= 1;
        assert!(!good.was_checked(offset, len, &other));
        assert!(!good.was_checked(offset, len - 1, &id));
        let moved = Located {
            id: other,
            loc: chunk.loc,
            pack: chunk.pack,
            frame_key: chunk.frame_key,
        };
        assert!(chunk_in(&repo, &moved, good.clone()).is_err());
        assert!(chunk_in(&repo, &chunk, good).is_ok());
    }

    #[test]
    fn timestamp_names_parse_back() {
        for t in [0i64, 951_782_400, 1_795_318_174] {
            assert_eq!(
                parse_timestamp_name(&crate::manifest::timestamp_name(t)),
                Some(t)
            );
        }
    }
}
