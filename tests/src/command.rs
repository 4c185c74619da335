//! Running a program to completion and capturing what it did.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Long enough for the slowest step of any test (backing up 1 GiB on two
/// shared cores); short enough that a hung process fails the test instead
/// of the whole run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// A finished process: how it ended and what it printed.
pub struct Run {
    /// The command line, for failure messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The exit code; `None` when a signal ended the process.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics unless the process exited 0.
    #[track_caller]
    pub fn success(self) -> Self {
        assert!(self.status.success(), "expected success from {self}");
        self
    }

    /// Panics unless the process exited with `code`.
    #[track_caller]
    pub fn expect_code(self, code: i32) -> Self {
        assert_eq!(
            self.code(),
            Some(code),
            "unexpected exit status from {self}"
        );
        self
    }

    /// Panics unless the process exited by itself with a non-zero code (a
    /// crash by signal is not a clean failure).
    #[track_caller]
    pub fn failure(self) -> Self {
        match self.code() {
            Some(c) if c != 0 => self,
            _ => panic!("expected a non-zero exit code from {self}"),
        }
    }

    /// Panics unless stderr contains every one of `needles`.
    #[track_caller]
    pub fn stderr_has(self, needles: &[&str]) -> Self {
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr should contain {n:?}: {self}"
            );
        }
        self
    }

    /// Stdout parsed as one JSON value.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match (self.status.code(), self.status.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("signal {s}"),
            (None, None) => "unknown status".to_string(),
        };
        write!(
            f,
            "`{}` ({how})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            clip(&self.stdout),
            clip(&self.stderr)
        )
    }
}

impl fmt::Debug for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Keeps failure messages readable when a tool prints megabytes.
fn clip(s: &str) -> &str {
    const MAX: usize = 8000;
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The command line as a shell would show it.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
            format!("{a:?}")
        } else {
            a.into_owned()
        }
    }));
    parts.join(" ")
}

/// Runs `cmd` with stdin from /dev/null and [`DEFAULT_TIMEOUT`].
pub fn run(cmd: &mut Command) -> Run {
    run_with(cmd, None, DEFAULT_TIMEOUT)
}

/// Runs `cmd` to completion, feeding it `stdin` (or /dev/null, which is
/// not a terminal), capturing stdout and stderr. Kills it and panics after
/// `timeout`.
///
/// The command must not leave a process behind that keeps its stdout or
/// stderr open (as `flr mount --background` does), or reading them would
/// never end; [`crate::Mount`] handles that case.
pub fn run_with(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Run {
    let command = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let feeder = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("piped stdin");
        let data = data.to_vec();
        // A process that exits without reading all of stdin is not an
        // error here; the exit status tells.
        thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let collect = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = collect(Box::new(child.stdout.take().expect("piped stdout")));
    let err = collect(Box::new(child.stderr.take().expect("piped stderr")));
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{command}` did not finish within {timeout:?}; killed it");
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for `{command}`: {e}"),
        }
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let stdout = String::from_utf8_lossy(&out.join().expect("stdout reader")).into_owned();
    let stderr = String::from_utf8_lossy(&err.join().expect("stderr reader")).into_owned();
    Run {
        command,
        status,
        stdout,
        stderr,
    }
}

/// Runs a program with arguments; shorthand for tools (`cmp`, `ls`, ...).
pub fn tool<I, S>(program: &str, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run(Command::new(program).args(args))
}

/// Sends `signal` (a name such as "TERM" or "KILL") to process `pid` with
/// kill(1), so the tests need no unsafe FFI.
pub fn send_signal(pid: u32, signal: &str) {
    let r = tool("kill", [format!("-{signal}"), pid.to_string()]);
    assert!(r.status.success(), "cannot send SIG{signal} to {pid}: {r}");
}

/// Whether process `pid` still runs (a zombie counts as ended).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and
        // may itself contain spaces or parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// Waits until process `pid` has ended; false if it still runs after
/// `timeout`.
pub fn wait_for_exit(pid: u32, timeout: Duration) -> bool {
    let started = Instant::now();
    while process_alive(pid) {
        if started.elapsed() > timeout {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Runs a command that returns once the server it starts in the
/// background is ready (`flr mount --background`), with stdin and stdout
/// closed and stderr into `log` (a file, not a pipe: the server inherits
/// it and keeps it open). Returns its command line and exit status, or
/// `None` if it had not exited within `timeout` (it is killed then).
pub fn run_starter(
    mut cmd: Command,
    log: &std::path::Path,
    timeout: Duration,
) -> (String, Option<ExitStatus>) {
    let log_file =
        std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    let line = describe(&cmd);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the starting command") {
            break Some(s);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    (line, status)
}
