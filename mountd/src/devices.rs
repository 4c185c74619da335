//! Named-pipe devices (`flr devices`, the daemon's `POST /devices`): one
//! pipe per database and per parallel stream, at `<dir>/<db>/<i>`, that an
//! engine writes its backup to as if to a tape or a file.
//!
//! Pipes are made mode 0600 and owned by the user asking (or `--owner`),
//! in a directory of their own per database (0700, same owner) that holds
//! a `.flr-devices.pid` file naming the process serving them. They are
//! removed when the run ends; a run that died leaves them, and the next
//! run for that database finds its pid gone and removes them first.
//!
//! A pipe cannot tell a writer that finished from one that was killed:
//! both just close it. A tar stream carries its own end (the end-of-archive
//! blocks); for raw streams, [`Writer`] runs the writing command itself and
//! a stream counts only if that command exits with status 0.
//!
//! Unix only: FIFOs, `sh -c` writers and signals have no counterpart on
//! Windows, where making devices and running writers fail with "not
//! supported on Windows".

#[cfg(unix)]
use std::fs::{File, OpenOptions};
#[cfg(unix)]
use std::io::Read;
#[cfg(unix)]
use std::os::fd::AsFd;
#[cfg(unix)]
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
#[cfg(unix)]
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
#[cfg(unix)]
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;
#[cfg(unix)]
use std::time::Instant;

#[cfg(unix)]
use anyhow::bail;
use anyhow::{Context, Result};
use parking_lot::{Condvar, Mutex};
use vfs_core::devices::{Database, Device, DeviceStatus, Opener};

/// The file in each database's directory naming the serving process.
const PID_FILE: &str = ".flr-devices.pid";

/// Where devices go by default: /run/flr/devices for root, else the
/// user's runtime directory.
pub fn default_dir() -> PathBuf {
    let uid = Owner::current().uid;
    if uid == 0 {
        return PathBuf::from("/run/flr/devices");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("flr/devices"),
        _ => std::env::temp_dir().join(format!("flr-devices-{uid}")),
    }
}

/// A user and group to own devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// The user running this process.
    pub fn current() -> Owner {
        let (uid, gid) = crate::host::own_ids();
        Owner { uid, gid }
    }

    /// Windows has no users by name or number to give devices to.
    #[cfg(not(unix))]
    pub fn lookup(user: &str) -> Result<Owner> {
        Err(crate::host::unsupported(&format!("device owners (user {user:?})")).into())
    }

    /// A user by name (or number), with its primary group.
    #[cfg(unix)]
    pub fn lookup(user: &str) -> Result<Owner> {
        use nix::unistd::{Uid, User};
        let found = match User::from_name(user) {
            Ok(Some(u)) => Some(u),
            _ => match user.parse::<u32>() {
                Ok(uid) => match User::from_uid(Uid::from_raw(uid)) {
                    Ok(Some(u)) => Some(u),
                    // A number with no entry: its own group number.
                    _ => return Ok(Owner { uid, gid: uid }),
                },
                Err(_) => None,
            },
        };
        match found {
            Some(u) => Ok(Owner {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
            }),
            None => bail!("no user {user:?} on this system"),
        }
    }
}

/// One database's devices.
pub struct DatabaseDevices {
    pub database: String,
    pub dir: PathBuf,
    pub pipes: Vec<PathBuf>,
}

/// The pipes of one run; removed when dropped.
pub struct DeviceSet {
    pub databases: Vec<DatabaseDevices>,
}

#[cfg(unix)]
fn chown(path: &Path, owner: Owner) -> Result<()> {
    crate::host::lchown(path, owner.uid, owner.gid)
        .with_context(|| format!("cannot give {} to uid {}", path.display(), owner.uid))
}

/// Windows: whether a process runs cannot be told here, so every one
/// counts as running (nothing is cleared or killed as left over).
#[cfg(not(unix))]
pub fn process_alive(pid: u32) -> bool {
    let _ = pid;
    true
}

/// Whether process `pid` runs; a zombie (killed, not yet reaped by its
/// parent) has ended.
#[cfg(unix)]
pub fn process_alive(pid: u32) -> bool {
    // A zombie (killed, not yet reaped by its parent) has ended.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    if state
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
    {
        return false;
    }
    use nix::errno::Errno;
    pid > 0
        && matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None),
            Ok(()) | Err(Errno::EPERM)
        )
}

/// Removes what a run that died left in a database's directory: its pipes
/// and pid file, nothing else; returns how many pipes. A directory still
/// served by a live process, or holding anything else, is refused.
#[cfg(not(unix))]
fn clear_stale(dir: &Path, database: &str) -> Result<usize> {
    let _ = (dir, database);
    Err(crate::host::unsupported("named-pipe devices (FIFOs)").into())
}

#[cfg(unix)]
fn clear_stale(dir: &Path, database: &str) -> Result<usize> {
    let pid_file = dir.join(PID_FILE);
    if let Ok(text) = std::fs::read_to_string(&pid_file) {
        let pid: u32 = text.trim().parse().unwrap_or(0);
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if process_alive(pid) && comm.trim() == "flr" && pid != std::process::id() {
            bail!(
                "the devices of database {database} in {} are in use by flr (pid {pid})",
                dir.display()
            );
        }
    }
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut stale = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
        let path = entry.path();
        let ft = entry
            .file_type()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        if ft.is_fifo() || entry.file_name() == PID_FILE {
            stale.push(path);
        } else {
            bail!(
                "{} is in the devices directory of database {database} and is not a device; move it away",
                path.display()
            );
        }
    }
    let mut pipes = 0;
    for path in stale {
        tracing::info!("removing {} left by an earlier run", path.display());
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        pipes += usize::from(path.file_name().is_some_and(|n| n != PID_FILE));
    }
    std::fs::remove_dir(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(pipes)
}

/// Removes one database's devices directory of this process (its pipes
/// and pid file), as the run ends abruptly.
pub fn clear_stale_dir_of(dir: &Path) -> Result<usize> {
    let database = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    clear_stale(dir, &database)
}

/// Clears every database directory below `dir` (one run's) that a dead
/// process left, then `dir` itself if empty; returns the pipes removed.
pub fn clear_stale_dir(dir: &Path) -> Result<usize> {
    let mut pipes = 0;
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            pipes += clear_stale(&entry.path(), &name)?;
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(pipes)
}

impl DeviceSet {
    /// Windows has no FIFOs: there are no devices to make.
    #[cfg(not(unix))]
    pub fn create(
        root: &Path,
        databases: &[String],
        streams: usize,
        owner: Owner,
    ) -> Result<DeviceSet> {
        let _ = (root, databases, streams, owner);
        Err(crate::host::unsupported("named-pipe devices (FIFOs)").into())
    }

    /// Makes `streams` pipes for each database under `root`.
    #[cfg(unix)]
    pub fn create(
        root: &Path,
        databases: &[String],
        streams: usize,
        owner: Owner,
    ) -> Result<DeviceSet> {
        if streams == 0 {
            bail!("a database needs at least one stream");
        }
        if databases.is_empty() {
            bail!("name at least one database");
        }
        for (i, db) in databases.iter().enumerate() {
            vfs_core::manifest::validate_job_name(db)?;
            if databases[..i].contains(db) {
                bail!("database {db} is named twice");
            }
        }
        let root = &std::path::absolute(root)
            .with_context(|| format!("cannot resolve {}", root.display()))?;
        if !root.exists() {
            std::fs::create_dir_all(root)
                .with_context(|| format!("cannot create {}", root.display()))?;
            // Every owner must reach its own database's directory.
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot set the mode of {}", root.display()))?;
        }
        let mut set = DeviceSet {
            databases: Vec::new(),
        };
        for db in databases {
            let dir = root.join(db);
            if dir.symlink_metadata().is_ok() {
                clear_stale(&dir, db)?;
            }
            std::fs::create_dir(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            // From here on, dropping the set removes what is made.
            set.databases.push(DatabaseDevices {
                database: db.clone(),
                dir: dir.clone(),
                pipes: Vec::new(),
            });
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
            std::fs::write(dir.join(PID_FILE), format!("{}\n", std::process::id()))
                .with_context(|| format!("cannot write {}", dir.join(PID_FILE).display()))?;
            chown(&dir, owner)?;
            let devices_ref = set.databases.last_mut().expect("just pushed");
            for i in 0..streams {
                let path = dir.join(i.to_string());
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(std::io::Error::from)
                    .with_context(|| format!("cannot make the pipe {}", path.display()))?;
                devices_ref.pipes.push(path.clone());
                // The umask may have taken bits off; 0600 exactly.
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("cannot set the mode of {}", path.display()))?;
                chown(&path, owner)?;
            }
        }
        Ok(set)
    }

    /// Every device: database, stream number, path.
    pub fn devices(&self) -> impl Iterator<Item = (&str, usize, &Path)> {
        self.databases.iter().flat_map(|d| {
            d.pipes
                .iter()
                .enumerate()
                .map(move |(i, p)| (d.database.as_str(), i, p.as_path()))
        })
    }

    /// The databases to back up through these pipes: each restore point's
    /// root is `owner`'s (mode 0700, as a data directory needs), each pipe
    /// waits `timeout` for its writer, and `writer` gives the `--exec`
    /// command of a pipe, if any. Returns them with every device's status.
    pub fn databases(
        &self,
        owner: Owner,
        timeout: Option<Duration>,
        mut writer: impl FnMut(&str, usize, &Path) -> Result<Option<Arc<Writer>>>,
    ) -> Result<(Vec<Database>, Vec<Arc<DeviceStatus>>)> {
        let now = vfs_core::backup::now_secs();
        let mut statuses = Vec::new();
        let mut databases = Vec::new();
        for db in &self.databases {
            let mut root = vfs_core::backup::own_root(now);
            (root.uid, root.gid, root.mode) = (owner.uid, owner.gid, 0o700);
            let mut devices = Vec::new();
            for (i, path) in db.pipes.iter().enumerate() {
                let w = writer(&db.database, i, path)?;
                let status = DeviceStatus::new(path.display().to_string(), db.database.clone(), i);
                statuses.push(status.clone());
                devices.push(Device {
                    status,
                    open: pipe_opener(path.clone(), timeout, w),
                });
            }
            databases.push(Database {
                job: db.database.clone(),
                root,
                devices,
            });
        }
        Ok((databases, statuses))
    }

    /// Removes the pipes and their directories (idempotent).
    pub fn remove(&mut self) {
        for db in self.databases.drain(..) {
            for p in &db.pipes {
                let _ = std::fs::remove_file(p);
            }
            let _ = std::fs::remove_file(db.dir.join(PID_FILE));
            if let Err(e) = std::fs::remove_dir(&db.dir) {
                tracing::warn!("cannot remove {}: {e}", db.dir.display());
            }
        }
    }
}

impl Drop for DeviceSet {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A writing command that flr runs for a device (`--exec`): its exit
/// status decides whether the stream it wrote counts.
#[cfg_attr(not(unix), allow(dead_code))]
pub struct Writer {
    status: Mutex<Option<ExitStatus>>,
    exited: Condvar,
    pid: u32,
}

#[cfg(unix)]
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => format!("ended ({status})"),
    }
}

impl Writer {
    /// Windows: writers feed FIFOs, which it does not have.
    #[cfg(not(unix))]
    pub fn spawn(
        command: &str,
        device: &Path,
        database: &str,
        stream: usize,
    ) -> Result<Arc<Writer>> {
        let _ = (device, database, stream);
        Err(crate::host::unsupported(&format!("device writers (--exec `{command}`)")).into())
    }

    /// Runs `sh -c command` with FLR_DEVICE, FLR_DATABASE and FLR_STREAM
    /// set, and a thread that waits for it.
    #[cfg(unix)]
    pub fn spawn(
        command: &str,
        device: &Path,
        database: &str,
        stream: usize,
    ) -> Result<Arc<Writer>> {
        let child: Child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .env("FLR_DEVICE", device)
            .env("FLR_DATABASE", database)
            .env("FLR_STREAM", stream.to_string())
            .stdin(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run the writer `{command}`"))?;
        let writer = Arc::new(Writer {
            status: Mutex::new(None),
            exited: Condvar::new(),
            pid: child.id(),
        });
        let w = writer.clone();
        std::thread::spawn(move || {
            let mut child = child;
            let status = child.wait();
            let mut st = w.status.lock();
            *st = Some(status.unwrap_or_else(|_| ExitStatus::from_raw(1 << 8)));
            w.exited.notify_all();
        });
        Ok(writer)
    }

    #[cfg_attr(not(unix), allow(dead_code))]
    fn exited(&self) -> Option<ExitStatus> {
        *self.status.lock()
    }

    #[cfg(unix)]
    fn wait(&self) -> ExitStatus {
        let mut st = self.status.lock();
        loop {
            if let Some(s) = *st {
                return s;
            }
            self.exited.wait(&mut st);
        }
    }

    /// Ends the command if it still runs (the run is over or failed).
    pub fn terminate(&self) {
        #[cfg(unix)]
        if self.exited().is_none() {
            let pid = nix::unistd::Pid::from_raw(self.pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }
}

/// A pipe whose end counts only once its writer has exited cleanly.
#[cfg(unix)]
struct Checked {
    pipe: File,
    writer: Arc<Writer>,
}

#[cfg(unix)]
impl Read for Checked {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.pipe.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let status = self.writer.wait();
            if !status.success() {
                return Err(std::io::Error::other(format!(
                    "its writer (--exec, pid {}) {}",
                    self.writer.pid,
                    describe(status)
                )));
            }
        }
        Ok(n)
    }
}

/// Whether the pipe has bytes, or a writer came and closed it.
#[cfg(unix)]
fn poll_ready(pipe: &File, timeout_ms: u16) -> std::io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, timeout_ms) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => Ok(false),
        Ok(_) => Ok(fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP))),
        Err(e) => Err(e.into()),
    }
}

/// Opens a device's pipe and waits for its writer's first bytes (or its
/// close): until `stop`, until `timeout`, or until the `--exec` writer
/// has exited without writing.
#[cfg(not(unix))]
pub fn pipe_opener(
    path: PathBuf,
    timeout: Option<Duration>,
    writer: Option<Arc<Writer>>,
) -> Opener {
    let _ = (path, timeout, writer);
    Box::new(|_stop: &dyn Fn() -> bool| Err(crate::host::unsupported("named-pipe devices (FIFOs)")))
}

/// Opens a device's pipe and waits for its writer's first bytes (or its
/// close): until `stop`, until `timeout`, or until the `--exec` writer
/// has exited without writing.
#[cfg(unix)]
pub fn pipe_opener(
    path: PathBuf,
    timeout: Option<Duration>,
    writer: Option<Arc<Writer>>,
) -> Opener {
    Box::new(move |stop: &dyn Fn() -> bool| {
        // Non-blocking, so the open itself never waits; a pipe opened so
        // reports nothing until a writer has come (poll's POLLHUP counts
        // only writers that came after this open).
        let pipe = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)?;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if poll_ready(&pipe, 200)? {
                break;
            }
            if stop() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "stopped",
                ));
            }
            if let Some(w) = &writer {
                if let Some(status) = w.exited() {
                    // Its bytes, if any, were in the pipe before it exited.
                    if poll_ready(&pipe, 0)? {
                        break;
                    }
                    return Err(std::io::Error::other(format!(
                        "its writer (--exec, pid {}) {} without writing to it",
                        w.pid,
                        describe(status)
                    )));
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "nobody wrote to it within {} s (--timeout)",
                        timeout.unwrap_or_default().as_secs()
                    ),
                ));
            }
        }
        // From here on, reads wait for data.
        {
            use nix::fcntl::{fcntl, FcntlArg, OFlag};
            let flags = OFlag::from_bits_truncate(fcntl(&pipe, FcntlArg::F_GETFL)?);
            fcntl(&pipe, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
        }
        Ok(match writer {
            Some(writer) => Box::new(Checked { pipe, writer }) as Box<dyn Read + Send>,
            None => Box::new(pipe),
        })
    })
}
