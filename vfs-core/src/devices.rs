//! Backing up several databases at once, each from several streams (the
//! devices an engine writes its backup to).
//!
//! Every device has a thread of its own that waits for its writer, reads
//! the stream and cuts it into chunks: a device that is slow, or whose
//! writer has not started yet, holds up nobody. Hashing, compression and
//! pack writing go through one [`Mover`] shared by all of them (the data
//! movers), so the cores and the one open pack serve whichever stream has
//! data. A database is committed as one restore point of its job once all
//! of its devices have ended cleanly; when one of them fails, the others of
//! that database stop and it commits nothing, while the other databases go
//! on and commit.
//!
//! A raw device becomes the file `stream-<i>` of the restore point; a tar
//! device is unpacked into it ([`crate::tar_stream`]), the members of all
//! of a database's tar devices side by side (a name given by two devices is
//! refused).
//!
//! Opening a device is the caller's: [`Device::open`] waits for a writer
//! (a named pipe, a socket) and is given a check that says when to stop
//! waiting, so this module has no OS code.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::backup::Progress;
use crate::error::{Error, Result};
use crate::ingest::{
    add_stats, commit, count_nodes, FileWriter, MetaShare, Mover, ReadAhead, TreeBuilder,
    BATCH_BYTES,
};
use crate::manifest::{BackupStats, Manifest, Node, NodeKind};
use crate::repo::Repository;
use crate::tar_stream::ingest_tar;

/// What a device carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamFormat {
    /// Any bytes: stored as the file `stream-<i>`.
    Raw,
    /// A tar stream: unpacked into the restore point's files.
    Tar,
}

impl StreamFormat {
    pub fn parse(s: &str) -> std::result::Result<StreamFormat, String> {
        match s {
            "raw" => Ok(StreamFormat::Raw),
            "tar" => Ok(StreamFormat::Tar),
            _ => Err(format!("unknown stream format {s:?}: raw or tar")),
        }
    }
}

/// Waits for a device's writer and returns the stream to read; the
/// argument returns true when waiting should stop (the database failed, or
/// the whole backup was cancelled).
pub type Opener =
    Box<dyn FnOnce(&dyn Fn() -> bool) -> std::io::Result<Box<dyn Read + Send>> + Send>;

/// Where a device is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceState {
    /// No writer yet.
    Waiting,
    Streaming,
    /// Its stream ended cleanly.
    Ended,
    Failed(String),
}

/// A device's live state, for a progress display or an API.
pub struct DeviceStatus {
    /// Names the device (its path) in errors and reports.
    pub label: String,
    pub database: String,
    pub stream: usize,
    pub progress: Progress,
    pub state: Mutex<DeviceState>,
}

impl DeviceStatus {
    pub fn new(label: String, database: String, stream: usize) -> Arc<DeviceStatus> {
        Arc::new(DeviceStatus {
            label,
            database,
            stream,
            progress: Progress::default(),
            state: Mutex::new(DeviceState::Waiting),
        })
    }

    fn set(&self, state: DeviceState) {
        *self.state.lock() = state;
    }
}

pub struct Device {
    pub status: Arc<DeviceStatus>,
    pub open: Opener,
}

pub struct Database {
    /// The job its restore point goes to.
    pub job: String,
    /// The restore point's root directory; raw stream files take its owner.
    pub root: Node,
    pub devices: Vec<Device>,
}

/// How one database's backup ended.
pub struct Outcome {
    pub job: String,
    pub result: Result<Manifest>,
}

/// Reads every device of every database until all have ended, and commits
/// one restore point per database whose devices all ended cleanly. Setting
/// `cancel` stops the devices that wait or read; the databases not yet
/// committed then fail. A storage failure (a full disk) fails every
/// database that has not committed.
pub fn backup_databases(
    repo: &Repository,
    databases: Vec<Database>,
    format: StreamFormat,
    hostname: &str,
    cancel: &AtomicBool,
) -> Vec<Outcome> {
    let started = Instant::now();
    let start_secs = crate::backup::now_secs();
    let jobs: Vec<String> = databases.iter().map(|d| d.job.clone()).collect();
    let outcomes = Mover::scoped(repo, |mover| {
        Ok(std::thread::scope(|s| {
            let running: Vec<_> = databases
                .into_iter()
                .map(|db| {
                    let job = db.job.clone();
                    let handle = s.spawn(move || {
                        back_up_one(mover, db, format, hostname, cancel, started, start_secs)
                    });
                    (job, handle)
                })
                .collect();
            running
                .into_iter()
                .map(|(job, handle)| Outcome {
                    job,
                    result: handle.join().unwrap_or_else(|_| {
                        Err(Error::Storage(
                            "the database's backup thread panicked".into(),
                        ))
                    }),
                })
                .collect()
        }))
    });
    // Without a writer lock nothing was read: every database fails alike.
    outcomes.unwrap_or_else(|e| {
        let why = e.to_string();
        jobs.into_iter()
            .map(|job| Outcome {
                job,
                result: Err(Error::Storage(why.clone())),
            })
            .collect()
    })
}

/// What one device produced.
enum Produced {
    File(Node),
    Tree(Vec<Node>),
}

fn back_up_one(
    mover: &Mover<&Repository>,
    db: Database,
    format: StreamFormat,
    hostname: &str,
    cancel: &AtomicBool,
    started: Instant,
    start_secs: i64,
) -> Result<Manifest> {
    crate::manifest::validate_job_name(&db.job)?;
    let share = MetaShare::default();
    let failed = AtomicBool::new(false);
    let job = db.job.as_str();
    let root = db.root;
    let results: Vec<Result<(Produced, BackupStats)>> = std::thread::scope(|s| {
        let handles: Vec<_> = db
            .devices
            .into_iter()
            .map(|device| {
                let (share, failed, root) = (&share, &failed, &root);
                s.spawn(move || {
                    let status = device.status.clone();
                    let stop = || failed.load(Ordering::SeqCst) || cancel.load(Ordering::SeqCst);
                    let outcome = read_device(mover, device, format, root, share, &stop);
                    match &outcome {
                        Ok(_) => status.set(DeviceState::Ended),
                        Err(e) => {
                            failed.store(true, Ordering::SeqCst);
                            status.set(DeviceState::Failed(e.to_string()));
                            tracing::debug!("{e}");
                        }
                    }
                    outcome
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Storage("a device thread panicked".into())))
            })
            .collect()
    });
    // The failure that is not a consequence of another is the cause.
    let mut produced = Vec::new();
    let mut stats = BackupStats::default();
    let mut cause: Option<Error> = None;
    for r in results {
        match r {
            Ok((p, s)) => {
                add_stats(&mut stats, &s);
                produced.push(p);
            }
            Err(e) => {
                if cause
                    .as_ref()
                    .is_none_or(|c| matches!(c, Error::Cancelled(_)))
                {
                    cause = Some(e);
                }
            }
        }
    }
    if let Some(e) = cause {
        return Err(e);
    }
    if cancel.load(Ordering::SeqCst) {
        return Err(Error::Cancelled(format!("database {job}: cancelled")));
    }
    let mut root = root;
    let mut tree: Option<TreeBuilder> = None;
    for p in produced {
        let t = tree.get_or_insert_with(|| {
            // A tar's root (its `./` entry, or the owner and mode taken
            // from its first members) gives the restore point's root: a
            // data directory needs its owner and mode 0700.
            if let Produced::Tree(nodes) = &p {
                let r = &nodes[0];
                (root.mode, root.uid, root.gid) = (r.mode, r.uid, r.gid);
                (root.mtime_sec, root.mtime_nsec) = (r.mtime_sec, r.mtime_nsec);
            }
            TreeBuilder::new(root.clone())
        });
        match p {
            Produced::File(node) => {
                let name = node.name.clone();
                t.put(&name, node)?;
            }
            Produced::Tree(nodes) => merge(t, &nodes)?,
        }
    }
    let tree = tree.unwrap_or_else(|| TreeBuilder::new(root));
    let nodes = tree.into_nodes();
    count_nodes(&nodes, &mut stats);
    stats.duration_ms = started.elapsed().as_millis() as u64;
    commit(mover, job, hostname, start_secs, nodes, stats, &share)
}

fn read_device(
    mover: &Mover<&Repository>,
    device: Device,
    format: StreamFormat,
    root: &Node,
    share: &MetaShare,
    stop: &dyn Fn() -> bool,
) -> Result<(Produced, BackupStats)> {
    let status = device.status;
    let what = format!(
        "device {} (database {}, stream {})",
        status.label, status.database, status.stream
    );
    let stopped = || {
        Error::Cancelled(format!(
            "{what}: stopped: the backup was cancelled, or another device of its database failed"
        ))
    };
    let reader = match (device.open)(stop) {
        Ok(r) => r,
        Err(_) if stop() => return Err(stopped()),
        Err(e) => return Err(Error::InvalidInput(format!("{what}: {e}"))),
    };
    status.set(DeviceState::Streaming);
    let reader = ReadAhead::new(reader, 1 << 20, 4);
    match format {
        StreamFormat::Raw => {
            let name = format!("stream-{}", status.stream).into_bytes();
            let (content, size, stats) =
                read_raw(mover, reader, &name, share, &status, stop, &what).map_err(|e| {
                    if stop() {
                        stopped()
                    } else {
                        e
                    }
                })?;
            let node = Node {
                parent: 0,
                name,
                kind: NodeKind::File,
                mode: 0o640,
                uid: root.uid,
                gid: root.gid,
                mtime_sec: crate::backup::now_secs(),
                mtime_nsec: 0,
                size,
                target: Vec::new(),
                content,
            };
            Ok((Produced::File(node), stats))
        }
        StreamFormat::Tar => {
            let mut tree = TreeBuilder::new(root.clone());
            let stats = ingest_tar(
                mover,
                Stoppable {
                    inner: reader,
                    stop,
                },
                &mut tree,
                share,
                &what,
                &status.progress,
            );
            match stats {
                Ok(stats) => Ok((Produced::Tree(tree.into_nodes()), stats)),
                Err(_) if stop() => Err(stopped()),
                Err(e) => Err(e),
            }
        }
    }
}

/// A stream that ends with an error once `stop` says so.
struct Stoppable<'s, R> {
    inner: R,
    stop: &'s dyn Fn() -> bool,
}

impl<R: Read> Read for Stoppable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if (self.stop)() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "stopped",
            ));
        }
        self.inner.read(buf)
    }
}

fn read_raw(
    mover: &Mover<&Repository>,
    mut reader: ReadAhead,
    name: &[u8],
    share: &MetaShare,
    status: &DeviceStatus,
    stop: &dyn Fn() -> bool,
    what: &str,
) -> Result<(crate::manifest::Content, u64, BackupStats)> {
    let mut w = FileWriter::new(name, None, BATCH_BYTES).with_share(share.clone());
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        if stop() {
            return Err(Error::Cancelled(String::new()));
        }
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::InvalidInput(format!(
                    "{what}: the stream failed at byte {at}: {e}"
                )))
            }
        };
        w.write_at(mover, at, &buf[..n])?;
        at += n as u64;
        status
            .progress
            .read_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }
    w.finish(mover)
}

/// Puts the nodes of one device's tree into the database's tree; a name
/// both hold is refused unless both are directories.
fn merge(tree: &mut TreeBuilder, nodes: &[Node]) -> Result<()> {
    let mut paths: Vec<Vec<u8>> = Vec::with_capacity(nodes.len());
    paths.push(Vec::new());
    for (i, node) in nodes.iter().enumerate().skip(1) {
        // A tree lists a parent before its entries.
        let mut path = paths[node.parent as usize].clone();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(&node.name);
        if let Some(at) = tree.lookup(&path)? {
            let both_dirs = node.kind == NodeKind::Dir && tree.nodes()[at].kind == NodeKind::Dir;
            if !both_dirs {
                return Err(Error::InvalidInput(format!(
                    "{:?} comes in two of the database's streams",
                    String::from_utf8_lossy(&path)
                )));
            }
        }
        debug_assert_eq!(paths.len(), i);
        tree.put(&path, node.clone())?;
        paths.push(path);
    }
    Ok(())
}
