//! Driving a real PostgreSQL 15 server: clusters made with `initdb`,
//! servers started with `pg_ctl` on any data directory (a plain directory,
//! a restored copy or one inside a mount), queries through `psql`, data
//! from SQL or `pgbench`, and `pg_basebackup`.
//!
//! The tests run as root and PostgreSQL refuses to, so every server-side
//! program runs as the `postgres` user through `runuser`. A server listens
//! on 127.0.0.1 on a free port, keeps its Unix socket and its log in a
//! private run directory outside the data directory (so the log survives
//! whatever happens to the data directory's filesystem), and is stopped
//! when its [`PgServer`] guard drops, also while a failed test unwinds.
//! Every failure message carries the end of the server log.

use std::cell::Cell;
use std::ffi::OsStr;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::command::{process_alive, run_with, tool, wait_for_exit, Run, DEFAULT_TIMEOUT};

/// Where Debian's `postgresql-15` package puts the server programs.
pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// The operating-system user that owns clusters and runs servers.
pub const PG_USER: &str = "postgres";

/// How long `pg_ctl start -w` may wait: crash recovery of a base backup
/// through a cold mount on two busy cores is not instant.
const START_TIMEOUT_S: u32 = 300;

/// How long a fast shutdown may take before the guard escalates.
const STOP_TIMEOUT_S: u32 = 120;

/// Lines of the server log quoted in failure messages.
const LOG_TAIL_LINES: usize = 60;

/// Attempts at starting a server when the port picked turned out taken
/// (another test or process bound it between the probe and the start).
const PORT_ATTEMPTS: usize = 4;

/// The path of a PostgreSQL program; panics with a hint when the server
/// package is missing.
pub fn pg_program(name: &str) -> PathBuf {
    let p = Path::new(PG_BIN_DIR).join(name);
    assert!(
        p.is_file(),
        "{} is missing: install PostgreSQL 15 (`apt-get install postgresql`, or scripts/setup.sh)",
        p.display()
    );
    p
}

/// `runuser -u postgres -- PROGRAM`, started from `/` so that the
/// program never trips over a working directory it cannot enter.
fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", PG_USER, "--"])
        .arg(pg_program(program))
        .current_dir("/");
    cmd
}

/// Runs `cmd` with [`DEFAULT_TIMEOUT`] and `stdin` (or /dev/null).
fn run_cmd(cmd: &mut Command, stdin: Option<&str>) -> Run {
    run_with(cmd, stdin.map(str::as_bytes), DEFAULT_TIMEOUT)
}

/// Gives "other" the right to enter every ancestor of `path` that lacks
/// it (temporary directories are 0700 root), so the `postgres` user can
/// reach `path`. Ancestors that already allow it are left alone.
pub fn make_reachable(path: &Path) {
    for dir in path.ancestors().skip(1) {
        if dir.as_os_str().is_empty() {
            continue;
        }
        let Ok(meta) = fs::metadata(dir) else {
            continue;
        };
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode((mode & 0o7777) | 0o055))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
        }
    }
}

/// Creates `dir` (empty, mode 0700) owned by the `postgres` user, with
/// reachable ancestors: a place for `initdb` or `pg_basebackup` to write.
pub fn make_postgres_dir(dir: &Path) {
    crate::mkdir(dir);
    make_reachable(dir);
    let r = tool("chown", [OsStr::new("postgres:postgres"), dir.as_os_str()]);
    assert!(r.status.success(), "chown {}: {r}", dir.display());
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
}

/// Makes a new cluster in `data` (created; must be missing or empty):
/// trust authentication for local and 127.0.0.1 connections (replication
/// included, for `pg_basebackup`), data checksums on, so a page the
/// filesystem garbles is reported rather than read as data.
pub fn init_cluster(data: &Path) {
    make_postgres_dir(data);
    let r = run_cmd(
        as_postgres("initdb").arg("-D").arg(data).args([
            "--auth=trust",
            "--data-checksums",
            "--encoding=UTF8",
            "--locale=C",
            "--username=postgres",
        ]),
        None,
    );
    assert!(
        r.status.success(),
        "initdb of {} failed: {r}",
        data.display()
    );
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running PostgreSQL server. Dropping it stops the server: `pg_ctl
/// stop -m fast`, then `-m immediate`, then SIGKILL to the postmaster's
/// process group, so a panicking test leaves no server (and no busy
/// mount) behind.
pub struct PgServer {
    /// The data directory the server runs on.
    pub data: PathBuf,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    /// The postmaster, read from `postmaster.pid` once it was up; kept so
    /// the guard can end the server even if the data directory became
    /// unreadable.
    pub postmaster: Option<u32>,
    /// Holds the Unix socket and the server log (`server.log`); outlives
    /// the server.
    run_dir: tempfile::TempDir,
    stopped: bool,
    /// Whether a failure message already quoted the log, so the guard
    /// does not print it a second time while the test unwinds.
    log_quoted: Cell<bool>,
}

impl PgServer {
    /// Starts a server on the existing cluster in `data` and waits until it
    /// accepts connections (crash recovery included). Panics with the
    /// server log if it does not come up.
    #[track_caller]
    pub fn start(data: &Path) -> PgServer {
        let run_dir = tempfile::Builder::new()
            .prefix("flr-pg-")
            .tempdir()
            .expect("create the server's run directory");
        make_postgres_dir(run_dir.path());
        let socket_dir = run_dir.path().to_string_lossy().into_owned();
        assert!(
            !socket_dir.contains(char::is_whitespace),
            "run directory {socket_dir:?} has whitespace, which pg_ctl -o cannot carry"
        );
        let mut server = PgServer {
            data: data.to_path_buf(),
            port: 0,
            postmaster: None,
            run_dir,
            stopped: true,
            log_quoted: Cell::new(false),
        };
        for attempt in 1..=PORT_ATTEMPTS {
            server.port = free_port();
            server.stopped = false;
            // Each attempt gets a log of its own (postgres creates it).
            let _ = fs::remove_file(server.log_path());
            let options = format!(
                "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={socket_dir}",
                server.port
            );
            let r = run_cmd(
                as_postgres("pg_ctl")
                    .arg("-D")
                    .arg(data)
                    .arg("-l")
                    .arg(server.log_path())
                    .args(["-w", "-t", &START_TIMEOUT_S.to_string(), "-o", &options])
                    .arg("start"),
                None,
            );
            // Also after a failed start: a timed-out one leaves it running.
            server.postmaster = read_postmaster_pid(data);
            if r.status.success() {
                return server;
            }
            let log = server.log();
            server.halt();
            if !log.contains("Address already in use") || attempt == PORT_ATTEMPTS {
                panic!(
                    "PostgreSQL did not start on {} (attempt {attempt}): {r}\n--- server log ---\n{}",
                    data.display(),
                    tail(&log, LOG_TAIL_LINES)
                );
            }
        }
        unreachable!("every attempt returns or panics")
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The server log file (in the run directory, outside the data
    /// directory).
    pub fn log_path(&self) -> PathBuf {
        self.run_dir.path().join("server.log")
    }

    /// The end of the server log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.log_quoted.set(true);
        tail(&self.log(), LOG_TAIL_LINES)
    }

    /// The log lines that report trouble: any WARNING, ERROR, FATAL or
    /// PANIC, and any "could not ..." (how PostgreSQL words a failed
    /// system call, with its errno text), so a filesystem fault that
    /// PostgreSQL survives still shows.
    pub fn log_problems(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| {
                ["WARNING:", "ERROR:", "FATAL:", "PANIC:", "could not"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .map(str::to_string)
            .collect()
    }

    /// Asserts that the log reports no trouble (see [`Self::log_problems`]).
    #[track_caller]
    pub fn assert_clean_log(&self) {
        let problems = self.log_problems();
        assert!(
            problems.is_empty(),
            "PostgreSQL on {} logged trouble:\n{}\n--- server log ---\n{}",
            self.data.display(),
            problems.join("\n"),
            self.log_tail()
        );
    }

    /// Runs `sql` with `psql` against database `postgres`, stopping at the
    /// first error; does not assert.
    pub fn try_query(&self, sql: &str) -> Run {
        self.try_query_in("postgres", sql)
    }

    /// [`Self::try_query`] in database `db`.
    pub fn try_query_in(&self, db: &str, sql: &str) -> Run {
        run_cmd(
            Command::new(pg_program("psql"))
                .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", "postgres", "-d", db]),
            Some(sql),
        )
    }

    /// Runs `sql` in database `db` and returns its unaligned, tuples-only
    /// output, trimmed; panics with the server log on error.
    #[track_caller]
    pub fn query_in(&self, db: &str, sql: &str) -> String {
        let r = self.try_query_in(db, sql);
        assert!(
            r.status.success(),
            "query in {db} failed on {}: {r}\n--- server log ---\n{}",
            self.data.display(),
            self.log_tail()
        );
        r.stdout.trim().to_string()
    }

    /// Runs `sql` and returns its unaligned, tuples-only output (columns
    /// separated by `|`), trimmed; panics with the server log on error.
    #[track_caller]
    pub fn query(&self, sql: &str) -> String {
        self.query_in("postgres", sql)
    }

    /// Runs `pgbench ARGS... postgres` against this server (as root: the
    /// client needs no server-side rights); panics with the server log on
    /// failure and returns its output.
    #[track_caller]
    pub fn pgbench<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let r = run_cmd(
            Command::new(pg_program("pgbench"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .args(args)
                .arg("postgres"),
            None,
        );
        assert!(
            r.status.success(),
            "pgbench failed on {}: {r}\n--- server log ---\n{}",
            self.data.display(),
            self.log_tail()
        );
        r
    }

    /// `pgbench -i -s SCALE`: the pgbench tables, 100,000 account rows
    /// (about 15 MB on disk) per unit of scale.
    #[track_caller]
    pub fn pgbench_init(&self, scale: u32) {
        self.pgbench(["-i", "-q", "-s", &scale.to_string()]);
    }

    /// `pg_basebackup -X stream` of this running server into `dir`
    /// (created, owned by `postgres`): a copy that needs crash recovery
    /// from its `backup_label` when a server starts on it.
    #[track_caller]
    pub fn base_backup(&self, dir: &Path) {
        make_postgres_dir(dir);
        let r = run_cmd(
            as_postgres("pg_basebackup")
                .arg("-D")
                .arg(dir)
                .args(["-X", "stream", "--checkpoint=fast"])
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ]),
            None,
        );
        assert!(
            r.status.success(),
            "pg_basebackup into {} failed: {r}\n--- server log ---\n{}",
            dir.display(),
            self.log_tail()
        );
    }

    /// `pg_basebackup -D - -Ft -X fetch` of this running server, piped
    /// into `flr backup --stdin-tar --json` as job `job` of `repo`: the
    /// tar stream never touches a disk. Returns flr's run (the pipeline
    /// fails if either side does).
    #[track_caller]
    pub fn base_backup_into(&self, repo: &crate::TestRepo, job: &str) -> Run {
        let script = format!(
            "set -o pipefail; runuser -u {PG_USER} -- {bb} -D - -Ft -X fetch --checkpoint=fast \
               -h 127.0.0.1 -p {port} -U postgres \
             | {flr} backup --repo {repo} --job {job} --stdin-tar --json",
            bb = pg_program("pg_basebackup").display(),
            port = self.port,
            flr = crate::flr::flr_bin().display(),
            repo = repo.path.display(),
        );
        let mut cmd = Command::new("bash");
        cmd.args(["-c", &script]).current_dir("/");
        run_cmd(&mut cmd, None)
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`, which ends with a
    /// shutdown checkpoint) and asserts that it went down and that its log
    /// reports no trouble from start to shutdown.
    #[track_caller]
    pub fn stop(self) {
        self.stop_with("fast");
    }

    /// Stops the server like a crash (`pg_ctl stop -m immediate`: no
    /// shutdown checkpoint), so the next start runs crash recovery; asserts
    /// the same as [`Self::stop`].
    #[track_caller]
    pub fn stop_immediate(self) {
        self.stop_with("immediate");
    }

    #[track_caller]
    fn stop_with(mut self, mode: &str) {
        let r = self.pg_ctl_stop(mode);
        assert!(
            r.status.success(),
            "pg_ctl stop -m {mode} failed on {}: {r}\n--- server log ---\n{}",
            self.data.display(),
            self.log_tail()
        );
        self.stopped = true;
        self.assert_clean_log();
    }

    fn pg_ctl_stop(&self, mode: &str) -> Run {
        run_cmd(
            as_postgres("pg_ctl").arg("-D").arg(&self.data).args([
                "-w",
                "-t",
                &STOP_TIMEOUT_S.to_string(),
                "-m",
                mode,
                "stop",
            ]),
            None,
        )
    }

    /// Ends the server by any means, quietly: fast, then immediate, then
    /// SIGKILL to the postmaster's process group (pg_ctl starts it in a
    /// session of its own, so the group is the server's processes).
    fn halt(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        for mode in ["fast", "immediate"] {
            if self.pg_ctl_stop(mode).status.success() {
                return;
            }
        }
        if let Some(pid) = self.postmaster {
            if process_alive(pid) {
                let _ = tool("kill", ["-KILL", "--", &format!("-{pid}")]);
                let _ = tool("kill", ["-KILL", &pid.to_string()]);
                wait_for_exit(pid, Duration::from_secs(10));
            }
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.stopped && !self.log_quoted.get() {
            eprintln!(
                "--- PostgreSQL log of {} (port {}) ---\n{}",
                self.data.display(),
                self.port,
                self.log_tail()
            );
        }
        self.halt();
    }
}

/// The postmaster's pid: the first line of `DATA/postmaster.pid`.
fn read_postmaster_pid(data: &Path) -> Option<u32> {
    fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// SQL that creates table `items` (if missing) and fills ids `first..=last`
/// with content that depends on the id only, so two runs give the same
/// bytes: a name, an amount and a 100-byte payload, plus an index on the
/// amount.
pub fn items_sql(first: u64, last: u64) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS items(
             id bigint PRIMARY KEY,
             name text NOT NULL,
             amount numeric(12, 2) NOT NULL,
             payload text NOT NULL);
         CREATE INDEX IF NOT EXISTS items_by_amount ON items(amount);
         INSERT INTO items
         SELECT g,
                'item-' || lpad(g::text, 9, '0'),
                ((g * 7919) % 1000003) / 100.0,
                repeat(md5(g::text), 3) || lpad(to_hex(g * 2654435761), 4, '0')
         FROM generate_series({first}, {last}) AS g;"
    )
}

/// Adds items `first..=last` (see [`items_sql`]).
#[track_caller]
pub fn load_items(server: &PgServer, first: u64, last: u64) {
    server.query(&items_sql(first, last));
}

/// Count, sum and an MD5 over every row of `items` in id order: equal
/// fingerprints mean equal contents.
#[track_caller]
pub fn items_fingerprint(server: &PgServer) -> String {
    server.query(
        "SELECT count(*), sum(amount),
                md5(string_agg(id || ':' || name || ':' || amount || ':' || payload, ',' ORDER BY id))
         FROM items;",
    )
}

/// pgbench's invariant after any number of transactions: every balance
/// change is in `pgbench_history`, so the sums of the three balance
/// columns each equal the sum of the deltas. Returns that sum.
#[track_caller]
pub fn assert_pgbench_consistent(server: &PgServer) -> i64 {
    let out = server.query(
        "SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts),
                (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers),
                (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches),
                (SELECT coalesce(sum(delta), 0) FROM pgbench_history);",
    );
    let sums: Vec<i64> = out
        .split('|')
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|e| panic!("{s:?} in {out:?}: {e}"))
        })
        .collect();
    assert!(
        sums.len() == 4 && sums.iter().all(|&s| s == sums[3]),
        "pgbench balances disagree with the history (accounts|tellers|branches|history = {out}) on {}",
        server.data.display()
    );
    sums[3]
}
