//! Finding the `flr` binary and building its command lines.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::command::{run_with, Run, DEFAULT_TIMEOUT};

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the test crate lives inside the workspace")
        .to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else the workspace's
/// `target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The binary under test: `FLR_BIN`, else the workspace's release build,
/// else its debug build.
pub fn flr_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("FLR_BIN") {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "FLR_BIN={} is not a file; build it with `cargo build --release -p mountd`",
                p.display()
            );
            return p;
        }
        let target = target_dir();
        for profile in ["release", "debug"] {
            let p = target.join(profile).join("flr");
            if p.is_file() {
                return p;
            }
        }
        panic!(
            "no flr binary: set FLR_BIN, or run `cargo build --release -p mountd` so that {} exists",
            target.join("release/flr").display()
        )
    })
}

/// One `flr` command line. FLR_PASSWORD is removed from the inherited
/// environment, so only tests that set it have it; stdin is /dev/null
/// (not a terminal) unless given.
pub struct Flr {
    cmd: Command,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
}

impl Flr {
    pub fn new<I, S>(args: I) -> Flr
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(flr_bin());
        cmd.args(args).env_remove("FLR_PASSWORD");
        Flr {
            cmd,
            stdin: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same command run as another user (through runuser, as root).
    pub fn as_user<I, S>(user: &str, args: I) -> Flr
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", user, "--"])
            .arg(flr_bin())
            .args(args)
            .env_remove("FLR_PASSWORD");
        Flr {
            cmd,
            stdin: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Flr {
        self.cmd.arg(a);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Flr
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Flr {
        self.cmd.env(key, value);
        self
    }

    /// Sets FLR_PASSWORD when `password` is given.
    pub fn password(self, password: Option<&str>) -> Flr {
        match password {
            Some(p) => self.env("FLR_PASSWORD", p),
            None => self,
        }
    }

    pub fn stdin(mut self, data: Vec<u8>) -> Flr {
        self.stdin = Some(data);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Flr {
        self.timeout = timeout;
        self
    }

    /// Runs to completion and captures the outcome.
    pub fn run(mut self) -> Run {
        run_with(&mut self.cmd, self.stdin.as_deref(), self.timeout)
    }

    /// Starts the process and returns at once, with stdin from /dev/null
    /// and output discarded (for tests that kill or signal it).
    pub fn spawn_quiet(mut self) -> Child {
        let line = crate::command::describe(&self.cmd);
        self.cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"))
    }

    /// The underlying command, for callers that wire stdio themselves.
    pub fn into_command(self) -> Command {
        self.cmd
    }
}

/// Runs `flr ARGS...` with no password and stdin from /dev/null.
pub fn flr<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Flr::new(args).run()
}
