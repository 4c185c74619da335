//! `flr mount --nfs` as a background process, and libnfs's userspace
//! client tools (`nfs-ls`, `nfs-cat`, `nfs-cp`, Debian `libnfs-utils`):
//! this kernel has no NFS client, so the tests speak NFS through them.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::command::{process_alive, run_starter, send_signal, wait_for_exit, Run};
use crate::repo::TestRepo;

/// How long an export gets to start, and to end after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// A running `flr mount --nfs 127.0.0.1:0 ... --background`; dropping it
/// stops the process (SIGTERM, then SIGKILL), also when a test panics.
pub struct NfsExport {
    pub addr: SocketAddr,
    pub pid: u32,
    pub log: PathBuf,
}

impl NfsExport {
    /// Starts an export of `repo` with `extra` arguments on a free
    /// loopback port; panics with its messages unless it is ready.
    #[track_caller]
    pub fn start(repo: &TestRepo, log: &Path, extra: &[&str]) -> NfsExport {
        let cmd = repo
            .flr(["mount", "--nfs", "127.0.0.1:0", "--background", "--repo"])
            .arg(&repo.path)
            .args(extra)
            .into_command();
        let (line, status) = run_starter(cmd, log, START_TIMEOUT);
        let messages = std::fs::read_to_string(log).unwrap_or_default();
        let pid = after(&messages, "(pid ").and_then(|s| s.parse().ok());
        let addr = after(&messages, "exported over NFSv3 at ").and_then(|s| s.parse().ok());
        match (status, pid, addr) {
            (Some(s), Some(pid), Some(addr)) if s.success() => NfsExport {
                addr,
                pid,
                log: log.to_path_buf(),
            },
            (status, pid, _) => {
                if let Some(pid) = pid {
                    send_signal(pid, "KILL");
                }
                panic!("`{line}` did not start an export ({status:?}):\n{messages}")
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The libnfs URL of `path` (relative to the export's root).
    pub fn url(&self, path: &str) -> String {
        let port = self.port();
        format!(
            "nfs://{}/{}?version=3&nfsport={port}&mountport={port}",
            self.addr.ip(),
            path.trim_start_matches('/')
        )
    }

    /// The process's messages so far.
    pub fn messages(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `nfs-ls -R` of `dir`: `(mode string, size, path)` per entry, sorted
    /// by path.
    #[track_caller]
    pub fn ls_recursive(&self, dir: &str) -> Vec<(String, u64, String)> {
        let r = nfs_tool("nfs-ls", [OsStr::new("-R"), OsStr::new(&self.url(dir))]);
        assert!(
            r.status.success(),
            "nfs-ls failed: {r}\n{}",
            self.messages()
        );
        let mut entries: Vec<(String, u64, String)> = r
            .stdout
            .lines()
            .filter_map(|l| {
                // "drwxr-xr-x  2     0     0         4096 path with spaces":
                // five fields, then the path to the end of the line.
                let mut rest = l;
                let mut fields = Vec::new();
                for _ in 0..5 {
                    rest = rest.trim_start();
                    let end = rest.find(' ')?;
                    fields.push(&rest[..end]);
                    rest = &rest[end..];
                }
                let size: u64 = fields[4].parse().ok()?;
                Some((fields[0].to_string(), size, rest[1..].to_string()))
            })
            .collect();
        entries.sort_by(|a, b| a.2.cmp(&b.2));
        entries
    }

    /// `nfs-cp` of `path` to the local file `to`.
    pub fn copy_out(&self, path: &str, to: &Path) -> Run {
        nfs_tool("nfs-cp", [OsStr::new(&self.url(path)), to.as_os_str()])
    }

    /// `nfs-cp` of the local file `from` to `path`.
    pub fn copy_in(&self, from: &Path, path: &str) -> Run {
        nfs_tool("nfs-cp", [from.as_os_str(), OsStr::new(&self.url(path))])
    }

    /// `nfs-cat` of `path`, as bytes.
    #[track_caller]
    pub fn cat(&self, path: &str) -> Vec<u8> {
        let out = Command::new("nfs-cat")
            .arg(self.url(path))
            .stdin(Stdio::null())
            .output()
            .expect("run nfs-cat (Debian libnfs-utils)");
        assert!(
            out.status.success(),
            "nfs-cat {path} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.messages()
        );
        out.stdout
    }

    /// Sends SIGTERM and waits for the process to end by itself; returns
    /// its messages.
    #[track_caller]
    pub fn stop(self) -> String {
        send_signal(self.pid, "TERM");
        assert!(
            wait_for_exit(self.pid, EXIT_GRACE),
            "the export {} still runs {EXIT_GRACE:?} after SIGTERM:\n{}",
            self.pid,
            self.messages()
        );
        let messages = self.messages();
        std::mem::forget(self);
        messages
    }

    pub fn alive(&self) -> bool {
        process_alive(self.pid)
    }
}

impl Drop for NfsExport {
    fn drop(&mut self) {
        if process_alive(self.pid) {
            send_signal(self.pid, "TERM");
            if !wait_for_exit(self.pid, EXIT_GRACE) {
                send_signal(self.pid, "KILL");
                wait_for_exit(self.pid, EXIT_GRACE);
            }
        }
    }
}

/// The text after `marker` up to the next space, `)` or `:` that ends it.
fn after<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    let at = text.find(marker)? + marker.len();
    let rest = &text[at..];
    let end = rest
        .find(|c: char| c == ')' || c.is_whitespace() || c == ',')
        .unwrap_or(rest.len());
    Some(rest[..end].trim_end_matches(':'))
}

/// One libnfs tool run, with a timeout so a hung server fails the test.
pub fn nfs_tool<I, S>(program: &str, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    crate::command::run_with(
        Command::new(program).args(args),
        None,
        Duration::from_secs(120),
    )
}
