//! Mounting a repository (or one restore point writable) for a test, and
//! always unmounting it again.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::command::{process_alive, send_signal, wait_for_exit};
use crate::flr::Flr;
use crate::repo::TestRepo;

/// How long `flr mount --background` may take to report the mount ready.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the mount process gets to exit after an unmount before it is
/// killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Decodes the octal escapes (`\040` for a space, ...) of /proc/mounts.
fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let octal = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = octal.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The lines of /proc/mounts whose mount point is `path` (give it
/// canonical, as the kernel shows it), each as (source, fs type).
pub fn mounts_at(path: &Path) -> Vec<(String, String)> {
    let want = path.to_string_lossy();
    std::fs::read_to_string("/proc/mounts")
        .expect("read /proc/mounts")
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            (f.len() >= 3 && unescape_mount_field(f[1]) == want)
                .then(|| (unescape_mount_field(f[0]), f[2].to_string()))
        })
        .collect()
}

/// Whether anything is mounted at `path` (canonical).
pub fn is_mounted(path: &Path) -> bool {
    !mounts_at(path).is_empty()
}

/// Unmounts whatever is at `path`: `fusermount3 -u`, then `umount -l` if
/// that fails (busy, or not a FUSE mount of ours). Quiet; callers check
/// [`is_mounted`] afterwards.
pub fn force_unmount(path: &Path) {
    let quiet = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if is_mounted(path) && !quiet("fusermount3", &["-u"]) {
        quiet("umount", &["-l"]);
    }
}

/// A repository mounted with `flr mount --background`. Dropping it (also
/// while a failed test unwinds) unmounts with `fusermount3 -u`, falling
/// back to `umount -l`, waits for the mount process to end and kills it
/// if it does not.
pub struct Mount {
    /// The mount point, canonical.
    pub path: PathBuf,
    /// The background mount process, from its "pid N" message.
    pub pid: Option<u32>,
    /// Everything the mount processes wrote on stderr.
    pub log: PathBuf,
}

impl Mount {
    /// Mounts `repo` at `mountpoint` (created if missing) with `extra`
    /// arguments; panics with the mount's messages unless it is ready.
    #[track_caller]
    pub fn background(repo: &TestRepo, mountpoint: &Path, extra: &[&str]) -> Mount {
        crate::mkdir(mountpoint);
        let path = mountpoint.canonicalize().expect("canonical mount point");
        let log = path.with_extension("mount-log");
        // The mount process inherits stderr and keeps it open: a file, not
        // a pipe, or reading the pipe would never end.
        let cmd = repo
            .flr(["mount", "--repo"])
            .arg(&repo.path)
            .arg(&path)
            .arg("--background")
            .args(extra)
            .into_command();
        let (line, status) = crate::command::run_starter(cmd, &log, MOUNT_TIMEOUT);
        let messages = std::fs::read_to_string(&log).unwrap_or_default();
        let mut mount = Mount {
            pid: parse_pid(&messages).or_else(|| find_server(&path)),
            path,
            log,
        };
        match status {
            Some(s) if s.success() => {}
            Some(s) => {
                mount.cleanup();
                panic!("`{line}` failed ({s}):\n{messages}");
            }
            None => {
                mount.cleanup();
                panic!("`{line}` was not ready within {MOUNT_TIMEOUT:?}:\n{messages}");
            }
        }
        let mounted = mounts_at(&mount.path);
        assert!(
            mounted
                .iter()
                .any(|(_, fs_type)| fs_type.starts_with("fuse")),
            "`{line}` exited 0 but no FUSE filesystem is mounted at {} ({mounted:?}):\n{messages}",
            mount.path.display()
        );
        mount
    }

    /// `self.path.join(rel)`.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// The mount processes' messages so far.
    pub fn messages(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts with `fusermount3 -u` and asserts that the mount is gone
    /// and the mount process exits by itself.
    #[track_caller]
    pub fn unmount(mut self) {
        let r = crate::command::tool(
            "fusermount3",
            [std::ffi::OsStr::new("-u"), self.path.as_os_str()],
        );
        assert!(r.status.success(), "fusermount3 -u failed: {r}");
        assert!(
            !is_mounted(&self.path),
            "still mounted after fusermount3 -u"
        );
        if let Some(pid) = self.pid.take() {
            assert!(
                wait_for_exit(pid, EXIT_GRACE),
                "mount process {pid} still runs {EXIT_GRACE:?} after the unmount:\n{}",
                self.messages()
            );
        }
    }

    fn cleanup(&mut self) {
        force_unmount(&self.path);
        if let Some(pid) = self.pid.take() {
            if !wait_for_exit(pid, EXIT_GRACE) && process_alive(pid) {
                send_signal(pid, "KILL");
                wait_for_exit(pid, EXIT_GRACE);
            }
        }
        // A killed server can leave a dead mount behind.
        force_unmount(&self.path);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// How long `flr session discard` gets when a writable mount is dropped;
/// the mount is unmounted and its process ended after it either way.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(30);

/// A restore point mounted writable in a copy-on-write session: `flr
/// mount --restore-point RP --writable --session ID --state-dir DIR
/// --background`, its changes kept in `DIR/ID`. Dropping it (also while
/// a failed test unwinds) runs `flr session discard`, which unmounts and
/// removes the changes, and then makes sure the mount and its process
/// are gone as [`Mount`] does.
pub struct WritableMount {
    pub mount: Mount,
    pub session: String,
    pub state_dir: PathBuf,
    password: Option<String>,
}

impl WritableMount {
    /// Mounts `restore_point` of `repo` writable at `mountpoint` as
    /// session `session`, with its state under `state_dir` (both created
    /// if missing); panics with the mount's messages unless it is ready.
    #[track_caller]
    pub fn background(
        repo: &TestRepo,
        restore_point: &str,
        mountpoint: &Path,
        state_dir: &Path,
        session: &str,
    ) -> WritableMount {
        crate::mkdir(state_dir);
        let state = state_dir
            .to_str()
            .expect("the tests' scratch paths are UTF-8");
        let mount = Mount::background(
            repo,
            mountpoint,
            &[
                "--restore-point",
                restore_point,
                "--writable",
                "--session",
                session,
                "--state-dir",
                state,
            ],
        );
        WritableMount {
            mount,
            session: session.to_string(),
            state_dir: state_dir.to_path_buf(),
            password: repo.password.clone(),
        }
    }

    /// The mount point, canonical.
    pub fn path(&self) -> &Path {
        &self.mount.path
    }

    /// `self.path().join(rel)`.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mount.join(rel)
    }

    /// The mount processes' messages so far.
    pub fn messages(&self) -> String {
        self.mount.messages()
    }
}

impl Drop for WritableMount {
    fn drop(&mut self) {
        let mut child = Flr::new(["session", "discard"])
            .arg(&self.session)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .password(self.password.as_deref())
            .spawn_quiet();
        let started = Instant::now();
        // Never panic here: this also runs while a failed test unwinds.
        while let Ok(None) = child.try_wait() {
            if started.elapsed() > DISCARD_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // `self.mount` drops next: unmount and end the process if the
        // discard did not.
    }
}

/// The pid in "... (pid 1234)" from `flr mount --background`.
fn parse_pid(messages: &str) -> Option<u32> {
    let at = messages.find("pid ")?;
    let digits: String = messages[at + 4..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// The `flr mount` process serving `mountpoint`, found by its command
/// line (mount points are unique temporary directories), in case its
/// message did not name it.
fn find_server(mountpoint: &Path) -> Option<u32> {
    let want = mountpoint.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .find(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.contains(&b"mount".as_slice()) && args.contains(&want)
        })
}

/// Unmounts a path on drop, for tests that run a mount command expected
/// to fail: if it unexpectedly mounts, the test still leaves nothing.
pub struct UnmountOnDrop(pub PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        force_unmount(&self.0);
    }
}

/// Mounts a tmpfs at `dir` (created if missing) with mount options
/// `options` (`size=16m`, `ro,size=8m`), unmounted when the guard drops.
#[track_caller]
pub fn tmpfs(dir: &Path, options: &str) -> UnmountOnDrop {
    crate::mkdir(dir);
    let r = crate::command::tool(
        "mount",
        [
            "-t",
            "tmpfs",
            "-o",
            options,
            "tmpfs",
            &dir.to_string_lossy(),
        ],
    );
    assert!(r.status.success(), "{r}");
    UnmountOnDrop(dir.to_path_buf())
}

/// The other ways to start a [`WritableMount`]: with more `flr mount`
/// options, and mounting an existing session again.
impl WritableMount {
    /// As [`WritableMount::background`], with `extra` options for the
    /// session (`--keep`, `--reserve SIZE`, `--min-free SIZE`).
    #[track_caller]
    pub fn background_with(
        repo: &TestRepo,
        restore_point: &str,
        mountpoint: &Path,
        state_dir: &Path,
        session: &str,
        extra: &[&str],
    ) -> WritableMount {
        let mut args = vec![
            "--restore-point",
            restore_point,
            "--writable",
            "--session",
            session,
        ];
        args.extend_from_slice(extra);
        WritableMount::start(repo, mountpoint, state_dir, session, &args)
    }

    /// `flr mount --resume ID`: session `session` of `state_dir`, kept or
    /// left by a crash, mounted again at `mountpoint` with `extra`
    /// options.
    #[track_caller]
    pub fn resume(
        repo: &TestRepo,
        mountpoint: &Path,
        state_dir: &Path,
        session: &str,
        extra: &[&str],
    ) -> WritableMount {
        let mut args = vec!["--resume", session];
        args.extend_from_slice(extra);
        WritableMount::start(repo, mountpoint, state_dir, session, &args)
    }

    #[track_caller]
    fn start(
        repo: &TestRepo,
        mountpoint: &Path,
        state_dir: &Path,
        session: &str,
        args: &[&str],
    ) -> WritableMount {
        crate::mkdir(state_dir);
        let state = state_dir
            .to_str()
            .expect("the tests' scratch paths are UTF-8");
        let mut args = args.to_vec();
        args.extend(["--state-dir", state]);
        WritableMount {
            mount: Mount::background(repo, mountpoint, &args),
            session: session.to_string(),
            state_dir: state_dir.to_path_buf(),
            password: repo.password.clone(),
        }
    }
}
