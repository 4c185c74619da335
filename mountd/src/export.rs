//! Export: a database taken out of a restore point as its files, as one
//! archive, or as a logical dump, in the order a DBA expects:
//!
//! 1. check: the restore point and the path, the engine and its programs,
//!    free space in staging and at the target, rights, an empty target,
//!    and for a remote target that its daemon answers and takes the token
//!    — each failure names its check and nothing is written anywhere;
//! 2. mount: for PostgreSQL, the restore point as a writable session whose
//!    changes go to the staging directory (the repository never changes);
//!    a cluster backed up cleanly shut down needs no recovery, so for
//!    `files` to a local target and for `archive` it is not mounted: its
//!    files are restored, or archived, as stored.
//!    A SQLite database with no WAL or journal beside it needs no
//!    recovery: it is mounted read-only and opened immutable for
//!    `logical`, and not mounted at all for `archive` and for `files` to a
//!    local target;
//! 3. stage: make the database consistent (PostgreSQL runs recovery on the
//!    session and shuts down cleanly; a SQLite database with a WAL or a
//!    journal is restored to staging, where opening it rolls the journal
//!    back and a checkpoint moves the WAL into the main file), or dump it
//!    (`pg_dump`, `sqlite3 .dump`);
//! 4. transfer: into a hidden partial directory at the target, renamed
//!    into place once complete, so no partial file ever has a final name.
//!    A file read as stored is restored there from the repository (frames
//!    decoded on every core); what was staged on the target's filesystem
//!    is renamed there; anything else is copied;
//!    to another host, as one checksummed tar stream its daemon unpacks
//!    ([`crate::transfer`]);
//! 5. clean up: server stopped, unmounted, session discarded, staging
//!    removed — also after a failure, a cancel or a signal. A run killed
//!    outright leaves a `state.json` in its staging directory, and the
//!    next export or the next daemon start ([`clear_leftovers`]) stops the
//!    server it started, detaches its mount and removes its files.
//!
//! [`run`] does one export; the command line (`flr export`) and the
//! daemon's export jobs (`POST /exports`) both call it, with an
//! [`ExportControl`] that carries the cancel flag and the progress.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;
use vfs_core::manifest::{Manifest, NodeKind};
use vfs_core::repo::Repository;
use vfs_core::session::SessionOptions;

use crate::transfer::{HashingWriter, RemoteTarget};

/// Default staging directory.
pub const DEFAULT_STAGING: &str = "/var/tmp/flr-staging";

/// Free space asked of staging beyond the estimate (the session's own
/// floor is 256 MiB).
const STAGING_FLOOR: u64 = 320 << 20;

/// Bytes copied between checks of the cancel flag.
const COPY_BUF: usize = 1 << 20;

pub const FORMATS: [&str; 3] = ["files", "archive", "logical"];
pub const LOGICAL_FORMATS: [&str; 3] = ["plain", "custom", "directory"];

/// Where an export goes.
#[derive(Clone, Debug)]
pub enum Target {
    /// An absolute local directory.
    Local(PathBuf),
    /// A directory on another host's daemon.
    Remote(RemoteTarget),
}

impl Target {
    /// A local path (made absolute) or `flr://HOST:PORT/DIR` with the
    /// receiving daemon's token.
    pub fn parse(to: &str, token: Option<String>) -> Result<Target> {
        if to.contains("://") {
            let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
                check_failed(
                    "remote token",
                    format!("{to} needs the bearer token of the daemon there (--token-file FILE or FLR_TOKEN)"),
                )
            })?;
            return RemoteTarget::parse(to, token)
                .map(Target::Remote)
                .map_err(|e| check_failed("target", e));
        }
        Ok(Target::Local(std::path::absolute(to)?))
    }

    /// What the target is called in messages (never with the token).
    pub fn display(&self) -> String {
        match self {
            Target::Local(p) => p.display().to_string(),
            Target::Remote(r) => r.url(),
        }
    }
}

/// One export, as asked for.
#[derive(Clone, Debug)]
pub struct ExportRequest {
    /// The repository (an absolute directory or an S3 spec), as the
    /// session over it records it.
    pub repo_path: String,
    /// JOB/TIMESTAMP, or JOB for the newest.
    pub restore_point: String,
    /// A PostgreSQL data directory or a SQLite file inside the restore point.
    pub path: String,
    /// files, archive or logical.
    pub format: String,
    pub to: Target,
    /// Staging root (absolute); default [`DEFAULT_STAGING`].
    pub staging: Option<PathBuf>,
    pub overwrite: bool,
    pub compress: bool,
    /// plain, custom or directory.
    pub logical_format: String,
    pub databases: Vec<String>,
    pub jobs: usize,
}

impl ExportRequest {
    /// Refuses values no export takes.
    pub fn validate(&self) -> Result<(), String> {
        if !FORMATS.contains(&self.format.as_str()) {
            return Err(format!(
                "format {:?}: give files, archive or logical",
                self.format
            ));
        }
        if !LOGICAL_FORMATS.contains(&self.logical_format.as_str()) {
            return Err(format!(
                "logical_format {:?}: give plain, custom or directory",
                self.logical_format
            ));
        }
        if self.jobs == 0 || self.jobs > 64 {
            return Err("jobs must be between 1 and 64".into());
        }
        if self.path.trim_matches('/').is_empty() {
            return Err("path names the database inside the restore point".into());
        }
        if let Some(s) = &self.staging {
            if !s.is_absolute() {
                return Err(format!("staging {} must be an absolute path", s.display()));
            }
        }
        Ok(())
    }

    pub fn staging_root(&self) -> PathBuf {
        self.staging
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STAGING))
    }
}

/// Time one step took.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepTime {
    pub step: String,
    pub ms: u64,
}

/// Shared between a running export and whoever watches it: the cancel
/// flag, the current step, bytes of the transfer, each finished step's
/// time.
#[derive(Default)]
pub struct ExportControl {
    /// Set to stop: children are killed, copies end at their next buffer.
    pub stop: AtomicBool,
    pub bytes_done: AtomicU64,
    pub bytes_total: AtomicU64,
    /// Bytes restored straight from the repository, not read through a
    /// mount.
    pub bytes_from_store: AtomicU64,
    step: Mutex<Option<(String, Instant)>>,
    steps: Mutex<Vec<StepTime>>,
    /// When the transfer began, for its rate.
    transfer_started: Mutex<Option<Instant>>,
}

impl ExportControl {
    fn begin(&self, step: &str) {
        let mut cur = self.step.lock();
        if let Some((name, at)) = cur.take() {
            self.steps.lock().push(StepTime {
                step: name,
                ms: at.elapsed().as_millis() as u64,
            });
        }
        if step == "transfer" {
            *self.transfer_started.lock() = Some(Instant::now());
        }
        if !step.is_empty() {
            *cur = Some((step.to_string(), Instant::now()));
        }
    }

    /// The step running now (None before the first and after the last).
    pub fn step(&self) -> Option<String> {
        self.step.lock().as_ref().map(|(s, _)| s.clone())
    }

    /// Finished steps with their times.
    pub fn steps(&self) -> Vec<StepTime> {
        self.steps.lock().clone()
    }

    /// Bytes per second of the transfer so far.
    pub fn rate(&self) -> u64 {
        match *self.transfer_started.lock() {
            Some(at) if at.elapsed().as_secs_f64() > 0.05 => {
                (self.bytes_done.load(Ordering::Relaxed) as f64 / at.elapsed().as_secs_f64()) as u64
            }
            _ => 0,
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn add(&self, n: usize) {
        self.bytes_done.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// What an export did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportReport {
    pub restore_point: String,
    pub path: String,
    pub engine: String,
    pub format: String,
    pub target: String,
    /// What was written, by full path (or URL) at the target.
    pub written: Vec<String>,
    pub bytes: u64,
    pub logical_bytes: u64,
    pub estimate_bytes: u64,
    /// Of the files written (at the target or in staging), the bytes
    /// restored straight from the repository rather than read through a
    /// mount.
    #[serde(default)]
    pub from_store_bytes: u64,
    pub duration_ms: u64,
    pub steps: Vec<StepTime>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Engine {
    Sqlite,
    Postgres { major: String },
}

impl Engine {
    fn name(&self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres { .. } => "postgresql",
        }
    }
}

/// What the checks found.
struct Plan {
    engine: Engine,
    /// Bytes of the database in the restore point.
    logical: u64,
    /// Bytes the export writes at the target (estimated).
    estimate: u64,
    /// Owner of the database's files: the engine runs as this user.
    owner: (u32, u32),
    /// PostgreSQL programs.
    pg_bin: Option<PathBuf>,
    /// SQLite: the WAL or journal with bytes beside the database
    /// ([`sqlite_companions`]).
    companions: Vec<(usize, String)>,
}

fn check_failed(check: &str, why: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("check `{check}` failed: {why}; nothing was written")
}

/// Node index of `path` in the manifest.
fn node_at(m: &Manifest, path: &str) -> Option<usize> {
    let mut at = 0usize;
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        at = m
            .nodes
            .iter()
            .enumerate()
            .skip(1)
            .find(|(_, n)| n.parent as usize == at && n.name == part.as_bytes())?
            .0;
    }
    Some(at)
}

fn child_named(m: &Manifest, dir: usize, name: &str) -> Option<usize> {
    m.nodes
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, n)| n.parent as usize == dir && n.name == name.as_bytes())
        .map(|(i, _)| i)
}

/// Up to `max` bytes from the start of a file of the restore point.
fn read_head(repo: &Repository, m: &Manifest, node: usize, max: usize) -> Result<Vec<u8>> {
    let n = &m.nodes[node];
    let mut out = Vec::new();
    for (id, _, len) in n.content.chunks(n.size) {
        match id {
            Some(id) => out.extend_from_slice(&repo.read_chunk(&id)?),
            None => out.resize(out.len() + len as usize, 0),
        }
        if out.len() >= max {
            break;
        }
    }
    out.truncate(max);
    Ok(out)
}

/// Bytes of the files at and below `node`, and of those under `sub` (a
/// child directory name, for PostgreSQL's `base`).
fn sizes(m: &Manifest, node: usize, sub: Option<&str>) -> (u64, u64) {
    let sub = sub.and_then(|s| child_named(m, node, s));
    let (mut all, mut below) = (0u64, 0u64);
    for (i, n) in m.nodes.iter().enumerate() {
        if n.kind != NodeKind::File {
            continue;
        }
        let mut at = i;
        let mut inside_sub = false;
        loop {
            if Some(at) == sub {
                inside_sub = true;
            }
            if at == node {
                all += n.size;
                if inside_sub {
                    below += n.size;
                }
                break;
            }
            if at == 0 {
                break;
            }
            at = m.nodes[at].parent as usize;
        }
    }
    (all, below)
}

pub fn free_bytes(path: &Path) -> Result<u64> {
    // The nearest existing ancestor holds what will be made.
    let mut p = std::path::absolute(path)?;
    while !p.exists() {
        if !p.pop() {
            break;
        }
    }
    crate::host::free_bytes(&p).with_context(|| format!("statvfs {}", p.display()))
}

pub fn nearest_existing(path: &Path) -> PathBuf {
    let mut p = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    while !p.exists() && p.pop() {}
    p
}

#[cfg(not(unix))]
fn user_name(uid: u32) -> Result<String> {
    Err(crate::host::unsupported(&format!("naming the user of uid {uid}")).into())
}

/// Windows has no users by number to switch to: only a command for this
/// process's own (placeholder) uid runs.
#[cfg(not(unix))]
fn as_user(uid: u32, program: &Path) -> Result<Command> {
    if uid != crate::host::own_ids().0 {
        return Err(crate::host::unsupported(&format!(
            "running {} as the database files' owner (uid {uid})",
            program.display()
        ))
        .into());
    }
    Ok(Command::new(program))
}

#[cfg(unix)]
fn user_name(uid: u32) -> Result<String> {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => Ok(u.name),
        _ => bail!("no user has uid {uid}"),
    }
}

/// Runs a command as `uid`'s user (directly when that is us).
#[cfg(unix)]
fn as_user(uid: u32, program: &Path) -> Result<Command> {
    if uid == nix::unistd::geteuid().as_raw() {
        let mut c = Command::new(program);
        c.current_dir("/");
        return Ok(c);
    }
    let mut c = Command::new("runuser");
    c.args(["-u", &user_name(uid)?, "--"])
        .arg(program)
        .current_dir("/");
    Ok(c)
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn pg_bin_dir(major: &str) -> PathBuf {
    match std::env::var_os("FLR_PG_BIN") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")),
    }
}

fn checks(repo: &Repository, m: &Manifest, args: &ExportRequest, staging: &Path) -> Result<Plan> {
    // The database.
    let node = node_at(m, &args.path).ok_or_else(|| {
        check_failed(
            "path",
            format!("{} is not in restore point {}/{}", args.path, m.job, m.name),
        )
    })?;
    let n = &m.nodes[node];
    let engine = match n.kind {
        NodeKind::File => {
            let head = read_head(repo, m, node, 100)?;
            if head.starts_with(b"SQLite format 3\0") {
                Engine::Sqlite
            } else {
                return Err(check_failed(
                    "engine",
                    format!("{} is not a SQLite database (no SQLite header)", args.path),
                ));
            }
        }
        NodeKind::Dir => match child_named(m, node, "PG_VERSION") {
            Some(v) => {
                let text = read_head(repo, m, v, 64)?;
                let major = String::from_utf8_lossy(&text).trim().to_string();
                if major.is_empty() || !major.chars().all(|c| c.is_ascii_digit()) {
                    return Err(check_failed(
                        "engine",
                        format!("{}/PG_VERSION holds {major:?}, not a version", args.path),
                    ));
                }
                Engine::Postgres { major }
            }
            None => {
                return Err(check_failed(
                    "engine",
                    format!(
                        "{} is a directory without PG_VERSION: not a PostgreSQL data directory",
                        args.path
                    ),
                ))
            }
        },
        _ => {
            return Err(check_failed(
                "engine",
                format!("{} is neither a file nor a directory", args.path),
            ))
        }
    };
    let owner = (n.uid, n.gid);
    let (logical, relations) = sizes(m, node, Some("base"));

    // The engine's programs, in a version that opens it.
    let mut pg_bin = None;
    match &engine {
        Engine::Sqlite => {
            if find_program("sqlite3").is_none() {
                return Err(check_failed(
                    "programs",
                    "sqlite3 is not installed (apt-get install sqlite3)",
                ));
            }
        }
        Engine::Postgres { major } => {
            let dir = pg_bin_dir(major);
            let mut needed = vec!["pg_ctl", "postgres"];
            if args.format == "logical" {
                needed.extend(["pg_dump", "pg_dumpall", "psql"]);
            }
            for p in needed {
                if !dir.join(p).is_file() {
                    return Err(check_failed(
                        "programs",
                        format!(
                            "{} is missing: PostgreSQL {major}'s server programs are needed to open this data directory (apt-get install postgresql-{major})",
                            dir.join(p).display()
                        ),
                    ));
                }
            }
            let out = Command::new(dir.join("pg_ctl"))
                .arg("--version")
                .output()
                .with_context(|| format!("cannot run {}", dir.join("pg_ctl").display()))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let installed = text
                .split_whitespace()
                .last()
                .and_then(|v| v.split('.').next())
                .unwrap_or_default()
                .to_string();
            if &installed != major {
                return Err(check_failed(
                    "programs",
                    format!(
                        "the data directory is PostgreSQL {major}, {} is {installed:?}",
                        dir.join("pg_ctl").display()
                    ),
                ));
            }
            pg_bin = Some(dir);
        }
    }

    // Rights: the engine's user must reach the staging directory; the
    // caller must write the target.
    let stage_at = nearest_existing(staging);
    if let Ok(user) = user_name(owner.0) {
        // The engine runs as this process's user when it owns the files:
        // asked here, with no process started.
        let ok = if owner.0 == crate::host::own_ids().0 {
            crate::host::can_enter(&stage_at)
        } else {
            Command::new("runuser")
                .args(["-u", &user, "--", "test", "-x"])
                .arg(&stage_at)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok {
            return Err(check_failed(
                "staging rights",
                format!(
                    "user {user}, who runs the engine, cannot enter {}",
                    stage_at.display()
                ),
            ));
        }
    }

    // Space, with a margin.
    let estimate = match (&engine, args.format.as_str()) {
        (Engine::Postgres { .. }, "logical") => relations,
        _ => logical,
    };
    let remote = matches!(args.to, Target::Remote(_));
    // A SQLite database with a WAL or journal is restored into staging,
    // with them, and recovered there.
    let companions = match engine {
        Engine::Sqlite => sqlite_companions(m, &args.path),
        Engine::Postgres { .. } => Vec::new(),
    };
    let recovered: u64 = if companions.is_empty() {
        0
    } else {
        logical
            + companions
                .iter()
                .map(|(i, _)| m.nodes[*i].size)
                .sum::<u64>()
    };
    // An archive is made in staging for a remote target, and for a SQLite
    // database recovered there (its backup copy); otherwise it is written
    // into the target.
    let staged_copy =
        args.format == "logical" || (args.format == "archive" && (remote || recovered > 0));
    let staging_need =
        STAGING_FLOOR + logical / 10 + if staged_copy { estimate } else { 0 } + recovered;
    let staging_free = free_bytes(staging)?;
    if staging_free < staging_need {
        return Err(check_failed(
            "staging space",
            format!(
                "{} has {} free, the export needs {} there",
                stage_at.display(),
                crate::human(staging_free),
                crate::human(staging_need)
            ),
        ));
    }
    let target_need = estimate + estimate / 10 + (16 << 20);
    match &args.to {
        Target::Local(to) => check_local_target(to, args.overwrite, target_need)?,
        Target::Remote(r) => check_remote_target(r, args.overwrite, target_need)?,
    }
    Ok(Plan {
        engine,
        logical,
        estimate,
        owner,
        pg_bin,
        companions,
    })
}

/// The caller writes the target, it is empty (unless `overwrite`) and has
/// room for `need` bytes.
fn check_local_target(to: &Path, overwrite: bool, need: u64) -> Result<()> {
    let target_at = nearest_existing(to);
    if !crate::host::can_write(&target_at) {
        return Err(check_failed(
            "target rights",
            format!("{} is not writable here", target_at.display()),
        ));
    }
    if to.exists() {
        if !to.is_dir() {
            return Err(check_failed(
                "target",
                format!("{} exists and is not a directory", to.display()),
            ));
        }
        if !overwrite && !dir_is_empty(to)? {
            return Err(check_failed(
                "target",
                format!(
                    "{} is not empty (give --overwrite to export into it anyway)",
                    to.display()
                ),
            ));
        }
    }
    let free = free_bytes(to)?;
    if free < need {
        return Err(check_failed(
            "target space",
            format!(
                "{} has {} free, the export needs {} there",
                target_at.display(),
                crate::human(free),
                crate::human(need)
            ),
        ));
    }
    Ok(())
}

/// Whether `dir` holds nothing but partial directories of exports.
pub fn dir_is_empty(dir: &Path) -> Result<bool> {
    Ok(!std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .any(|e| !e.file_name().to_string_lossy().starts_with(".flr-partial-")))
}

/// The same checks, made by the receiving daemon (`POST /receive/check`),
/// which also says whether it answers and takes the token.
fn check_remote_target(r: &RemoteTarget, overwrite: bool, need: u64) -> Result<()> {
    let body = json!({"dir": r.dir, "overwrite": overwrite, "bytes": need});
    let resp = r.call("POST", "/receive/check", Some(&body)).map_err(|e| {
        check_failed(
            "remote target",
            format!("the flr daemon at {} does not answer: {e}", r.addr),
        )
    })?;
    let check = match resp.status {
        200 => return Ok(()),
        401 => {
            return Err(check_failed(
                "remote token",
                format!(
                    "the flr daemon at {} refused the token (it takes its settings.tcp_token)",
                    r.addr
                ),
            ))
        }
        403 => "target rights",
        409 | 400 => "target",
        507 => "target space",
        _ => "remote target",
    };
    Err(check_failed(
        check,
        format!("{}: {}", r.url(), resp.error_message()),
    ))
}

/// What a run writes in its staging directory so that a later run can
/// undo it if this one is killed.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct State {
    pid: u32,
    mountpoint: PathBuf,
    /// The postmaster this run started, if one runs.
    postmaster: Option<u32>,
    /// The partial directory at a local target, once made.
    #[serde(default)]
    partial: Option<PathBuf>,
}

fn write_state(dir: &Path, state: &State) -> Result<()> {
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(state)?)?;
    std::fs::rename(&tmp, dir.join("state.json"))?;
    Ok(())
}

/// Removes what exports killed outright left in `staging` (and in the
/// target, their partial directories): their server, mount and files.
/// Returns how many leftovers it removed; each removal is logged.
pub fn clear_leftovers(staging: &Path, target: Option<&Path>) -> usize {
    let mut removed = 0;
    if let Ok(entries) = std::fs::read_dir(staging) {
        for e in entries.flatten() {
            let dir = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("export-") {
                continue;
            }
            let state: State = std::fs::read(dir.join("state.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            if state.pid != 0 && crate::devices::process_alive(state.pid) {
                continue;
            }
            if let Some(pm) = state
                .postmaster
                .filter(|&p| crate::devices::process_alive(p))
            {
                let _ = crate::host::kill(pm);
                let until = Instant::now() + Duration::from_secs(10);
                while crate::devices::process_alive(pm) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if !state.mountpoint.as_os_str().is_empty() {
                let _ = backends::os_mount::clear_stale_mount(&state.mountpoint);
            }
            if let Some(p) = &state.partial {
                if std::fs::remove_dir_all(p).is_ok() {
                    tracing::warn!(
                        "removed {} left by an export that did not finish",
                        p.display()
                    );
                }
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    removed += 1;
                    tracing::warn!(
                        "removed {} left by an export that did not finish (pid {})",
                        dir.display(),
                        state.pid
                    )
                }
                Err(e) => tracing::warn!("cannot remove {}: {e}", dir.display()),
            }
        }
    }
    if let Some(target) = target {
        if let Ok(entries) = std::fs::read_dir(target) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if partial_is_stale(&name) && std::fs::remove_dir_all(e.path()).is_ok() {
                    removed += 1;
                    tracing::warn!(
                        "removed {} left by an export that did not finish",
                        e.path().display()
                    );
                }
            }
        }
    }
    removed
}

/// Whether `name` is a partial directory (`.flr-partial-PID-...`) whose
/// process is gone.
pub fn partial_is_stale(name: &str) -> bool {
    name.strip_prefix(".flr-partial-")
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| pid != std::process::id() && !crate::devices::process_alive(pid))
}

/// Everything a run made, undone in reverse order when dropped.
struct Cleanup {
    dir: PathBuf,
    state: State,
    pg: Option<(PathBuf, PathBuf, u32)>,
    mount: Option<backends::os_mount::Mount>,
    session: Option<Arc<vfs_core::session::CowFs>>,
    partial: Option<PathBuf>,
    /// An open transfer at a remote target, abandoned on failure.
    receive: Option<(RemoteTarget, String)>,
}

impl Cleanup {
    fn stop_server(&mut self) -> Result<()> {
        if let Some((bin, data, uid)) = self.pg.take() {
            let stopped = as_user(uid, &bin.join("pg_ctl"))?
                .arg("-D")
                .arg(&data)
                .args(["-m", "fast", "-w", "-t", "120", "stop"])
                .stdout(Stdio::null())
                .status()?;
            if !stopped.success() {
                let _ = as_user(uid, &bin.join("pg_ctl"))?
                    .arg("-D")
                    .arg(&data)
                    .args(["-m", "immediate", "stop"])
                    .status();
                bail!("the PostgreSQL server on the session did not stop cleanly");
            }
            self.state.postmaster = None;
            let _ = write_state(&self.dir, &self.state);
        }
        Ok(())
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = self.stop_server() {
            tracing::warn!("{e:#}");
        }
        if let Some(m) = self.mount.take() {
            let unmounter = m.unmounter();
            if m.unmount().is_err() {
                let _ = unmounter.detach();
            }
        }
        if let Some(s) = self.session.take() {
            if let Err(e) = s.close(false) {
                tracing::warn!("cannot discard the export's session: {e}");
            }
        }
        if let Some(p) = self.partial.take() {
            let _ = std::fs::remove_dir_all(p);
        }
        if let Some((r, id)) = self.receive.take() {
            if let Err(e) = r.call("DELETE", &format!("/receive/{id}"), None) {
                tracing::warn!(
                    "cannot tell {} to drop transfer {id} (it drops it when the stream breaks): {e}",
                    r.addr
                );
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// Waits for a child, killing it when `stop` is set.
fn wait_child(child: Child, what: &str, stop: &AtomicBool) -> Result<()> {
    wait_child_with(child, what, stop, &mut || {})
}

/// The files a child writes at `path` (a file, or the files of a
/// directory), sent to disk as they grow, so the sync before the export
/// is renamed into place has little left to wait for.
struct GrowingFiles {
    path: PathBuf,
    /// Where each file's next writeback starts.
    sent: std::collections::HashMap<PathBuf, u64>,
    last: Instant,
}

impl GrowingFiles {
    fn new(path: PathBuf) -> GrowingFiles {
        GrowingFiles {
            path,
            sent: Default::default(),
            last: Instant::now(),
        }
    }

    /// Starts the writeback of what was written since the last time,
    /// every 200 ms at most (a failure only leaves it to the sync).
    fn tick(&mut self) {
        if self.last.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last = Instant::now();
        let files: Vec<PathBuf> = match std::fs::read_dir(&self.path) {
            Ok(dir) => dir.flatten().map(|e| e.path()).collect(),
            Err(_) => vec![self.path.clone()],
        };
        for path in files {
            let Ok(file) = std::fs::File::open(&path) else {
                continue;
            };
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let sent = self.sent.entry(path).or_insert(0);
            if len >= *sent + WRITEBACK_STEP {
                vfs_core::restore::start_writeback(&file, *sent, len);
                *sent = len;
            }
        }
    }
}

/// [`wait_child`], calling `tick` every few milliseconds while it runs.
fn wait_child_with(
    mut child: Child,
    what: &str,
    stop: &AtomicBool,
    tick: &mut dyn FnMut(),
) -> Result<()> {
    loop {
        tick();
        if let Some(st) = child.try_wait()? {
            if st.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!("{what} failed ({st}): {}", err.trim());
        }
        if stop.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what}: interrupted by a signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Copies a tree (files, directories, symlinks; modes, owners, times);
/// returns the bytes copied. Not synced here: the caller syncs the
/// target's filesystem once before the rename.
fn copy_tree(from: &Path, to: &Path, ctl: &ExportControl) -> Result<u64> {
    copy_tree_with(from, to, ctl, None)
}

/// Files of a writable session that still hold the restore point's bytes
/// as stored: restored from the repository (frames decoded on every core)
/// instead of read through the mount.
struct StoredFiles<'a> {
    session: &'a vfs_core::session::CowFs,
    repo: &'a Repository,
    manifest: &'a Manifest,
}

/// Files smaller than this are copied through the mount even when
/// unchanged: a restore syncs each file it writes, and for small files one
/// sync of the whole target at the end costs less.
const RESTORE_FROM_STORE_MIN: u64 = 1 << 20;

impl StoredFiles<'_> {
    /// The manifest node to restore for the file `name` at `meta` on the
    /// mount: the node its inode names, when it is a file of that name and
    /// size.
    fn node_for(&self, name: &str, meta: &std::fs::Metadata) -> Option<usize> {
        if meta.len() < RESTORE_FROM_STORE_MIN {
            return None;
        }
        let i = self.session.unchanged_file(inode(meta)?)? as usize;
        let n = self.manifest.nodes.get(i)?;
        (n.kind == NodeKind::File && n.size == meta.len() && n.name == name.as_bytes()).then_some(i)
    }
}

/// A file's inode number; `None` where the platform gives none.
#[cfg(unix)]
fn inode(meta: &std::fs::Metadata) -> Option<u64> {
    Some(std::os::unix::fs::MetadataExt::ino(meta))
}

#[cfg(not(unix))]
fn inode(_meta: &std::fs::Metadata) -> Option<u64> {
    None
}

/// [`copy_tree`], with files the session left as stored restored from the
/// repository.
fn copy_tree_with(
    from: &Path,
    to: &Path,
    ctl: &ExportControl,
    stored: Option<&StoredFiles>,
) -> Result<u64> {
    let meta =
        std::fs::symlink_metadata(from).with_context(|| format!("stat {}", from.display()))?;
    let mut bytes = 0;
    if ctl.stopped() {
        bail!("stopped");
    }
    if meta.file_type().is_symlink() {
        crate::host::symlink(&std::fs::read_link(from)?, to)
            .with_context(|| format!("cannot make {}", to.display()))?;
    } else if meta.is_dir() {
        std::fs::create_dir(to).with_context(|| format!("cannot make {}", to.display()))?;
        let mut entries: Vec<_> = std::fs::read_dir(from)?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            bytes += copy_tree_with(&e.path(), &to.join(e.file_name()), ctl, stored)?;
        }
        crate::host::set_mode(to, crate::host::mode(&meta))?;
    } else if meta.is_file() {
        // A name that is not UTF-8 is copied: the restore takes a `str`.
        let place = to
            .parent()
            .zip(from.file_name().and_then(|n| n.to_str()))
            .filter(|(_, name)| to.file_name().and_then(|n| n.to_str()) == Some(*name));
        let node = stored
            .zip(place)
            .and_then(|(s, (dir, name))| s.node_for(name, &meta).map(|i| (s, dir, name, i)));
        match node {
            Some((s, dir, name, i)) => {
                bytes += restore_into(s.repo, s.manifest, i, dir, name, ctl, true)?;
            }
            None => {
                let src = std::fs::File::open(from)
                    .with_context(|| format!("cannot open {}", from.display()))?;
                let mut dst = WrittenBack::new(
                    std::fs::File::create(to)
                        .with_context(|| format!("cannot create {}", to.display()))?,
                );
                bytes += std::io::copy(&mut counted_reader(src, ctl), &mut dst)
                    .with_context(|| format!("cannot copy {}", from.display()))?;
            }
        }
        crate::host::set_mode(to, crate::host::mode(&meta))?;
    } else {
        // Sockets and pipes (a server's leftovers) are not exported.
        return Ok(0);
    }
    let (uid, gid) = crate::host::owner(&meta);
    let _ = crate::host::lchown(to, uid, gid);
    if !meta.file_type().is_symlink() {
        let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
        let _ = std::fs::File::open(to).and_then(|f| f.set_modified(mtime));
    }
    Ok(bytes)
}

/// `file` read in [`COPY_BUF`] pieces, counted: through FUSE each read is
/// a round trip, and `io::copy` alone would read 8 KiB at a time.
fn counted_reader(
    file: std::fs::File,
    ctl: &ExportControl,
) -> std::io::BufReader<Counted<'_, std::fs::File>> {
    std::io::BufReader::with_capacity(COPY_BUF, Counted { inner: file, ctl })
}

/// A reader that counts into the progress and ends with an error once
/// the export is stopped.
struct Counted<'a, R: Read> {
    inner: R,
    ctl: &'a ExportControl,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.ctl.stopped() {
            // Not `Interrupted`: copies retry that.
            return Err(std::io::Error::other("the export was stopped"));
        }
        let max = buf.len().min(COPY_BUF);
        let n = self.inner.read(&mut buf[..max])?;
        self.ctl.add(n);
        Ok(n)
    }
}

/// Adds `from` to a tar as `name` (a directory with everything below it).
fn append_item<W: Write>(
    b: &mut tar::Builder<W>,
    from: &Path,
    name: &Path,
    ctl: &ExportControl,
) -> Result<()> {
    if ctl.stopped() {
        bail!("stopped");
    }
    let meta =
        std::fs::symlink_metadata(from).with_context(|| format!("stat {}", from.display()))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        b.append_dir(name, from)?;
        let mut entries: Vec<_> = std::fs::read_dir(from)?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            append_item(b, &e.path(), &name.join(e.file_name()), ctl)?;
        }
    } else if ft.is_symlink() {
        b.append_path_with_name(from, name)
            .with_context(|| format!("cannot archive {}", from.display()))?;
    } else if ft.is_file() {
        let mut header = tar::Header::new_gnu();
        header.set_metadata(&meta);
        let file =
            std::fs::File::open(from).with_context(|| format!("cannot open {}", from.display()))?;
        b.append_data(&mut header, name, counted_reader(file, ctl))
            .with_context(|| format!("cannot archive {}", from.display()))?;
    }
    // Sockets and pipes (a server's leftovers) are not exported.
    Ok(())
}

/// A tar of `dir`'s contents (pg_basebackup's layout is the data
/// directory's own), optionally zstd-compressed, written to `out`.
fn write_archive(dir: &Path, out: &Path, compress: bool, ctl: &ExportControl) -> Result<u64> {
    let mut b = tar::Builder::new(ArchiveFile::create(out, compress)?);
    b.follow_symlinks(false);
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        append_item(&mut b, &e.path(), Path::new(&e.file_name()), ctl)?;
    }
    b.into_inner()?.finish()
}

/// The same tar of directory node `dir`'s contents, read straight from
/// the repository: each file decoded and checked as a restore does, with
/// the stored mode, owner and mtime. Entries of `dir` named in
/// `leave_out` are not archived.
fn write_stored_archive(
    repo: &Repository,
    m: &Manifest,
    dir: usize,
    leave_out: &[&str],
    out: &Path,
    compress: bool,
    ctl: &ExportControl,
) -> Result<u64> {
    let mut b = tar::Builder::new(ArchiveFile::create(out, compress)?);
    // Each node's path in the tar; `None` outside `dir`. Parents come
    // before their children (the manifest is checked for it).
    let mut paths: Vec<Option<PathBuf>> = vec![None; m.nodes.len()];
    paths[dir] = Some(PathBuf::new());
    for (i, n) in m.nodes.iter().enumerate().skip(dir + 1) {
        let parent = n.parent as usize;
        let Some(above) = &paths[parent] else {
            continue;
        };
        if parent == dir && leave_out.iter().any(|l| l.as_bytes() == n.name) {
            continue;
        }
        if ctl.stopped() {
            bail!("stopped");
        }
        let path = above.join(crate::host::name_from_bytes(&n.name));
        let mut h = tar::Header::new_gnu();
        h.set_mode(n.mode);
        h.set_uid(n.uid.into());
        h.set_gid(n.gid.into());
        h.set_mtime(n.mtime_sec.max(0) as u64);
        h.set_size(0);
        let shown = || format!("cannot archive {}", m.path_of(i));
        match n.kind {
            NodeKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, &path, std::io::empty())
                    .with_context(shown)?;
            }
            NodeKind::Symlink => {
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, &path, crate::host::name_from_bytes(&n.target))
                    .with_context(shown)?;
            }
            NodeKind::File => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(n.size);
                vfs_core::restore::read_file(repo, m, i, &ctl.stop, |r| {
                    b.append_data(&mut h, &path, Counted { inner: r, ctl })
                        .with_context(shown)
                })?;
                ctl.bytes_from_store.fetch_add(n.size, Ordering::Relaxed);
            }
            // Never in a restore point.
            _ => continue,
        }
        paths[i] = Some(path);
    }
    b.into_inner()?.finish()
}

/// What a stored cluster's archive leaves out, as the archive of a
/// session does: a stopped server's leftovers (pg_basebackup leaves them
/// out too).
const PG_LEFT_OUT: [&str; 1] = ["postmaster.opts"];

/// An archive being written: plain or zstd-compressed, behind one buffer.
struct ArchiveFile {
    out: std::io::BufWriter<ArchiveSink>,
}

enum ArchiveSink {
    Plain(WrittenBack),
    Zstd(zstd::Encoder<'static, WrittenBack>),
}

impl ArchiveFile {
    fn create(path: &Path, compress: bool) -> Result<ArchiveFile> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let file = WrittenBack::new(file);
        let sink = if compress {
            ArchiveSink::Zstd(zstd::Encoder::new(file, 3)?)
        } else {
            ArchiveSink::Plain(file)
        };
        Ok(ArchiveFile {
            out: std::io::BufWriter::with_capacity(COPY_BUF, sink),
        })
    }

    /// Ends the archive's stream and syncs it; returns its length.
    fn finish(self) -> Result<u64> {
        let file = match self.out.into_inner().map_err(|e| e.into_error())? {
            ArchiveSink::Plain(f) => f,
            ArchiveSink::Zstd(enc) => enc.finish()?,
        };
        file.file.sync_all()?;
        Ok(file.written)
    }
}

impl Write for ArchiveFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

impl Write for ArchiveSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ArchiveSink::Plain(f) => f.write(buf),
            ArchiveSink::Zstd(enc) => enc.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ArchiveSink::Plain(f) => f.flush(),
            ArchiveSink::Zstd(enc) => enc.flush(),
        }
    }
}

/// A file written from start to end whose written part is sent to disk
/// as it grows, so the sync at its end has little left to wait for.
struct WrittenBack {
    file: std::fs::File,
    written: u64,
    /// Where the next writeback starts.
    sent: u64,
}

/// Bytes written between two writebacks.
const WRITEBACK_STEP: u64 = 16 << 20;

impl WrittenBack {
    fn new(file: std::fs::File) -> WrittenBack {
        WrittenBack {
            file,
            written: 0,
            sent: 0,
        }
    }
}

impl Write for WrittenBack {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.sent >= WRITEBACK_STEP {
            vfs_core::restore::start_writeback(&self.file, self.sent, self.written);
            self.sent = self.written;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Bytes of the files at and below `path`.
fn tree_bytes(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|d| d.flatten().map(|e| tree_bytes(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) if m.is_file() => m.len(),
        _ => 0,
    }
}

/// Sends `items` to a remote target as one tar stream and has the
/// receiver check its hash and rename them into place.
fn send_remote(
    r: &RemoteTarget,
    items: &[(PathBuf, String)],
    overwrite: bool,
    need: u64,
    cleanup: &mut Cleanup,
    ctl: &ExportControl,
) -> Result<u64> {
    let refused = |what: &str, resp: &crate::client::Response| {
        anyhow!(
            "{what} {}: {} (HTTP {})",
            r.url(),
            resp.error_message(),
            resp.status
        )
    };
    let resp = r
        .call(
            "POST",
            "/receive",
            Some(&json!({"dir": r.dir, "overwrite": overwrite, "bytes": need})),
        )
        .with_context(|| format!("cannot reach the flr daemon at {}", r.addr))?;
    if resp.status != 201 {
        return Err(refused("cannot open a transfer to", &resp));
    }
    let id = resp.json()["id"]
        .as_str()
        .ok_or_else(|| anyhow!("{} answered POST /receive without an id", r.addr))?
        .to_string();
    cleanup.receive = Some((r.clone(), id.clone()));
    let mut sent = (String::new(), 0u64);
    let resp = r.upload(&format!("/receive/{id}"), &mut |w| {
        let mut hashed = HashingWriter::new(w);
        {
            let mut b = tar::Builder::new(&mut hashed);
            b.follow_symlinks(false);
            for (from, name) in items {
                append_item(&mut b, from, Path::new(name), ctl)?;
            }
            b.finish()?;
        }
        sent = hashed.finish();
        Ok(())
    })?;
    if resp.status != 200 {
        return Err(refused("the transfer was refused by", &resp));
    }
    let resp = r
        .call(
            "POST",
            &format!("/receive/{id}/commit"),
            Some(&json!({"blake3": sent.0, "bytes": sent.1})),
        )
        .with_context(|| format!("cannot reach the flr daemon at {}", r.addr))?;
    // Committed or refused, the receiver is done with it.
    cleanup.receive = None;
    if resp.status != 200 {
        return Err(refused("the transfer was not kept by", &resp));
    }
    Ok(sent.1)
}

/// How an export reads the database out of the restore point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    /// A writable session, mounted: the engine runs on it (PostgreSQL).
    Session,
    /// A read-only mount of the restore point: the engine only reads.
    ReadOnlyMount,
    /// Nothing mounted: the file goes straight from the repository to the
    /// target.
    Stored,
    /// The files restored into staging, where the engine recovers them.
    Staged,
}

/// Something that goes to the target.
enum Item {
    /// A file or tree to copy (on a mount).
    Path(PathBuf),
    /// A file or tree the export made in its staging directory: moved to
    /// a local target when it is on the same filesystem.
    Staged(PathBuf),
    /// A file node of the restore point, restored from the repository.
    Stored(usize),
    /// A directory node of the restore point and everything below it,
    /// restored from the repository.
    StoredTree(usize),
    /// A tar of a directory node's contents, written straight from the
    /// repository.
    StoredArchive(usize),
}

/// The files beside SQLite database `path` that hold part of it: a WAL
/// or a rollback journal with bytes in it, as (node, suffix).
fn sqlite_companions(m: &Manifest, path: &str) -> Vec<(usize, String)> {
    ["-wal", "-journal"]
        .iter()
        .filter_map(|suffix| {
            let i = node_at(m, &format!("{}{suffix}", path.trim_end_matches('/')))?;
            let n = &m.nodes[i];
            (n.kind == NodeKind::File && n.size > 0).then(|| (i, suffix.to_string()))
        })
        .collect()
}

/// A `file:` URI that opens `path` read-only and immutable: sqlite3 takes
/// no locks and looks for no WAL, which is right for a file that cannot
/// change and has no WAL with bytes beside it.
fn immutable_uri(path: &Path) -> String {
    #[cfg(unix)]
    let bytes = {
        use std::os::unix::ffi::OsStrExt;
        path.as_os_str().as_bytes().to_vec()
    };
    #[cfg(not(unix))]
    let bytes = path.to_string_lossy().into_owned().into_bytes();
    let mut uri = String::from("file:");
    for &b in &bytes {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str("?immutable=1");
    uri
}

/// Brings a staged SQLite database at `file` to a consistent main file:
/// opening it rolls a hot journal back, the checkpoint moves the WAL's
/// frames into the main file, and the last connection's close removes the
/// WAL. `run_sql` runs one command of sqlite3 on it as the engine's user.
fn sqlite_recover(file: &Path, run_sql: &dyn Fn(&str) -> Result<()>) -> Result<()> {
    run_sql("PRAGMA wal_checkpoint(TRUNCATE); SELECT count(*) FROM sqlite_master;")?;
    let beside = |suffix: &str| {
        let mut p = file.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    let _ = std::fs::remove_file(beside("-shm"));
    for suffix in ["-wal", "-journal"] {
        let left = beside(suffix);
        match std::fs::metadata(&left) {
            Ok(m) if m.len() > 0 => bail!(
                "sqlite3 left {} with {} bytes after recovering the database",
                left.display(),
                m.len()
            ),
            Ok(_) => std::fs::remove_file(&left)
                .with_context(|| format!("cannot remove {}", left.display()))?,
            Err(_) => {}
        }
    }
    Ok(())
}

/// Restores file node `node` into `dir` as `name` with the repository's
/// own restore (frames decoded on every core, holes kept sparse, synced),
/// stopping when the export is stopped; counted in the export's progress
/// when `count`. Returns the file's size.
fn restore_into(
    repo: &Repository,
    m: &Manifest,
    node: usize,
    dir: &Path,
    name: &str,
    ctl: &ExportControl,
    count: bool,
) -> Result<u64> {
    watched_restore(ctl, count, Vec::new(), |opts| {
        vfs_core::restore::restore_file_as(repo, m, node, dir, name, opts)
    })
    .with_context(|| format!("cannot restore {} into {}", m.path_of(node), dir.display()))?;
    ctl.bytes_from_store
        .fetch_add(m.nodes[node].size, Ordering::Relaxed);
    Ok(m.nodes[node].size)
}

/// Restores directory node `node` (everything below it) from the
/// repository to `to`, which must not exist yet; counted in the export's
/// progress. Returns the bytes of its files.
fn restore_tree(
    repo: &Repository,
    m: &Manifest,
    node: usize,
    to: &Path,
    ctl: &ExportControl,
) -> Result<u64> {
    let Some(dir) = to.parent() else {
        bail!("{}: no directory to restore into", to.display());
    };
    // The restore writes the node at its own path below a scratch
    // directory beside `to`; that is then moved into place.
    let scratch = dir.join(format!(
        ".flr-tree-{}",
        to.file_name().unwrap_or_default().to_string_lossy()
    ));
    let path = m.path_of(node);
    let stats = watched_restore(ctl, true, vec![path.clone()], |opts| {
        vfs_core::restore::restore(repo, m, &scratch, opts)
    })
    .with_context(|| format!("cannot restore {path} into {}", dir.display()))?;
    std::fs::rename(scratch.join(&path), to)
        .with_context(|| format!("cannot move the restored {path} to {}", to.display()))?;
    std::fs::remove_dir_all(&scratch)
        .with_context(|| format!("cannot remove {}", scratch.display()))?;
    ctl.bytes_from_store
        .fetch_add(stats.bytes, Ordering::Relaxed);
    Ok(stats.bytes)
}

/// Runs a restore of `paths` (the options' selection) with `f`, moving its
/// progress into the export's (when `count`) and stopping it when the
/// export is stopped.
fn watched_restore<T>(
    ctl: &ExportControl,
    count: bool,
    paths: Vec<String>,
    f: impl FnOnce(&vfs_core::restore::RestoreOptions) -> vfs_core::Result<T>,
) -> vfs_core::Result<T> {
    let progress = Arc::new(vfs_core::backup::Progress::default());
    let cancel = Arc::new(AtomicBool::new(false));
    let opts = vfs_core::restore::RestoreOptions {
        paths,
        overwrite: false,
        progress: progress.clone(),
        cancel: cancel.clone(),
        // What an export restores goes to its staging directory or to the
        // target's partial directory; that is synced as a whole before
        // anything is renamed into place.
        sync_each_file: false,
    };
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut shown = 0u64;
            loop {
                let finished = done.load(Ordering::Acquire);
                if ctl.stopped() {
                    cancel.store(true, Ordering::Relaxed);
                }
                let now = progress.read_bytes.load(Ordering::Relaxed);
                if count {
                    ctl.add(now.saturating_sub(shown) as usize);
                }
                shown = now;
                if finished {
                    break;
                }
                std::thread::park_timeout(Duration::from_millis(100));
            }
        });
        let restored = f(&opts);
        done.store(true, Ordering::Release);
        watcher.thread().unpark();
        restored
    })
}

/// `pg_control`'s `state` when the cluster was shut down cleanly
/// (`DB_SHUTDOWNED`). The field follows the system identifier and two
/// version numbers, at byte 16 in every release flr reads.
const PG_STATE_SHUT_DOWN: u32 = 1;

/// Whether PostgreSQL data directory `node` was backed up cleanly shut
/// down, so its files attach as they are stored: `pg_control` says so, and
/// there is no `backup_label` (a base backup's copy), no recovery or
/// standby signal file and no `postmaster.pid`.
fn pg_shut_down_cleanly(repo: &Repository, m: &Manifest, node: usize) -> Result<bool> {
    for name in [
        "backup_label",
        "recovery.signal",
        "standby.signal",
        "postmaster.pid",
    ] {
        if child_named(m, node, name).is_some() {
            return Ok(false);
        }
    }
    let Some(control) =
        child_named(m, node, "global").and_then(|g| child_named(m, g, "pg_control"))
    else {
        return Ok(false);
    };
    let head = read_head(repo, m, control, 20)?;
    Ok(head.len() == 20
        && u32::from_le_bytes(head[16..20].try_into().expect("four bytes")) == PG_STATE_SHUT_DOWN)
}

/// Moves what the export staged at `from` to `to`: a rename when both are
/// on one filesystem, a copy otherwise. Returns the bytes moved.
fn move_staged(from: &Path, to: &Path, ctl: &ExportControl) -> Result<u64> {
    match std::fs::rename(from, to) {
        Ok(()) => {
            let n = tree_bytes(to);
            ctl.add(n as usize);
            Ok(n)
        }
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => copy_tree(from, to, ctl),
        Err(e) => {
            Err(e).with_context(|| format!("cannot move {} to {}", from.display(), to.display()))
        }
    }
}

/// One export, step by step; `ctl` stops it and shows its progress.
/// Every check runs before anything is written; whatever happens after,
/// what the run made is undone before it returns.
pub fn run(
    repo: Arc<Repository>,
    args: &ExportRequest,
    ctl: &ExportControl,
) -> Result<ExportReport> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    args.validate().map_err(|e| anyhow!(e))?;
    let staging_root = args.staging_root();
    clear_leftovers(
        &staging_root,
        match &args.to {
            Target::Local(p) => Some(p.as_path()),
            Target::Remote(_) => None,
        },
    );

    // 1. Checks.
    ctl.begin("check");
    let rp = repo
        .resolve(&args.restore_point)
        .map_err(|e| check_failed("restore point", e))?;
    let manifest = repo
        .load_manifest(&rp)
        .map_err(|e| check_failed("restore point", e))?;
    let plan = checks(&repo, &manifest, args, &staging_root)?;
    if ctl.stopped() {
        bail!("stopped before anything was written");
    }

    // 2. Mount the restore point as a session staged here.
    ctl.begin("mount");
    std::fs::create_dir_all(&staging_root)
        .with_context(|| format!("cannot create {}", staging_root.display()))?;
    let dir = staging_root.join(format!(
        "export-{}-{}-{seq}",
        std::process::id(),
        vfs_core::backup::now_secs()
    ));
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    crate::host::set_mode(&dir, 0o711)?;
    let mountpoint = dir.join("mnt");
    std::fs::create_dir(&mountpoint)?;
    let mut cleanup = Cleanup {
        dir: dir.clone(),
        state: State {
            pid: std::process::id(),
            mountpoint: mountpoint.clone(),
            postmaster: None,
            partial: None,
        },
        pg: None,
        mount: None,
        session: None,
        partial: None,
        receive: None,
    };
    write_state(&dir, &cleanup.state)?;
    // How the database is read. PostgreSQL runs on a writable session,
    // unless the cluster was shut down cleanly: its files then need no
    // recovery, and `files` and `archive` take them as they are stored.
    // A SQLite database whose WAL or rollback journal holds bytes is
    // restored to staging and recovered there; one without is read as it
    // is stored: restored straight into the target for `files` and
    // `archive`, and opened immutable on a read-only mount for `logical`.
    let companions = &plan.companions;
    let local_target = matches!(args.to, Target::Local(_));
    let db_node = node_at(&manifest, &args.path).expect("checked");
    let reading = match plan.engine {
        // A cluster shut down cleanly needs no recovery: its files are
        // what the engine attaches as they are.
        Engine::Postgres { .. }
            if (args.format == "files" && local_target || args.format == "archive")
                && pg_shut_down_cleanly(&repo, &manifest, db_node)? =>
        {
            Reading::Stored
        }
        Engine::Postgres { .. } => Reading::Session,
        Engine::Sqlite if !companions.is_empty() => Reading::Staged,
        Engine::Sqlite if args.format == "files" && local_target || args.format == "archive" => {
            Reading::Stored
        }
        Engine::Sqlite => Reading::ReadOnlyMount,
    };
    let os_mount = |fs: Arc<dyn vfs_core::fs::FsModel>| -> Result<backends::os_mount::Mount> {
        let opts = backends::os_mount::MountOptions {
            threads: 2,
            allow_other: true,
            auto_unmount: false,
            fs_name: format!("flr-export:{}", args.repo_path),
        };
        backends::os_mount::mount(fs, &mountpoint, &opts)
            .with_context(|| format!("cannot mount at {}", mountpoint.display()))
    };
    match reading {
        Reading::Session => {
            let id = format!("export-{}-{seq}", std::process::id());
            let cow = crate::writable::open_session(
                repo.clone(),
                &args.repo_path,
                &rp,
                &dir.join("sessions"),
                &id,
                false,
                crate::writable::OpenOptions {
                    // One sequential pass: a small cache of decoded frames does.
                    cache_bytes: 64 << 20,
                    cache: None,
                    disk_cache: None,
                    session: SessionOptions {
                        reserve_bytes: 64 << 20,
                        min_free_bytes: 256 << 20,
                    },
                },
            )?;
            cleanup.session = Some(cow.clone());
            cleanup.mount = Some(os_mount(cow)?);
        }
        Reading::ReadOnlyMount => {
            let fs = vfs_core::fs::RepoFs::new(
                repo.clone(),
                vfs_core::fs::FsOptions {
                    cache_bytes: 64 << 20,
                    disk_cache: None,
                    readahead_threads: crate::read_stats::readahead_threads(&repo),
                    uid: 0,
                    gid: 0,
                    filter: vfs_core::fs::MountFilter {
                        job: None,
                        restore_point: Some(rp.clone()),
                        rooted: true,
                    },
                },
            )?;
            cleanup.mount = Some(os_mount(fs)?);
        }
        Reading::Stored | Reading::Staged => {}
    }
    let db = mountpoint.join(args.path.trim_start_matches('/'));
    if matches!(reading, Reading::Session | Reading::ReadOnlyMount) {
        std::fs::metadata(&db)
            .with_context(|| format!("the mount does not answer at {}", db.display()))?;
    }

    ctl.begin("stage");
    // 3. Stage: consistent, or dumped.
    let name = Path::new(&args.path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "database".into());
    let out = dir.join("out");
    std::fs::create_dir(&out)?;
    crate::host::set_mode(&out, 0o700)?;
    crate::host::lchown(&out, plan.owner.0, plan.owner.1)?;
    // What goes to the target, and its name there.
    let mut items: Vec<(Item, String)> = Vec::new();
    match &plan.engine {
        Engine::Sqlite => {
            let sqlite = find_program("sqlite3").expect("checked");
            // `writes`: a file the command makes, sent to disk as it grows.
            let run_sqlite = |database: &str,
                              command: &str,
                              stdout: Stdio,
                              writes: Option<&Path>|
             -> Result<()> {
                let child = as_user(plan.owner.0, &sqlite)?
                    .arg(database)
                    .arg(command)
                    .stdout(stdout)
                    .stderr(Stdio::piped())
                    .spawn()?;
                let mut growing = writes.map(|p| GrowingFiles::new(p.to_path_buf()));
                wait_child_with(
                    child,
                    &format!("sqlite3 {command:?}"),
                    &ctl.stop,
                    &mut || {
                        if let Some(g) = &mut growing {
                            g.tick()
                        }
                    },
                )
            };
            // The database as sqlite3 is to open it.
            let source = if reading == Reading::Staged {
                let restored = out.join("restored");
                std::fs::create_dir(&restored)?;
                crate::host::set_mode(&restored, 0o700)?;
                crate::host::lchown(&restored, plan.owner.0, plan.owner.1)?;
                restore_into(&repo, &manifest, db_node, &restored, &name, ctl, false)?;
                for (i, suffix) in companions {
                    restore_into(
                        &repo,
                        &manifest,
                        *i,
                        &restored,
                        &format!("{name}{suffix}"),
                        ctl,
                        false,
                    )?;
                }
                let file = restored.join(&name);
                sqlite_recover(&file, &|command| {
                    run_sqlite(&file.display().to_string(), command, Stdio::null(), None)
                })?;
                if args.format == "files" {
                    items.push((Item::Staged(file.clone()), name.clone()));
                }
                file.display().to_string()
            } else {
                immutable_uri(&db)
            };
            match args.format.as_str() {
                "files" => match reading {
                    Reading::Staged => {}
                    Reading::Stored => items.push((Item::Stored(db_node), name.clone())),
                    _ => items.push((Item::Path(db.clone()), name.clone())),
                },
                // Nothing beside it, so the stored file is the consistent
                // copy the backup API would make: the same pages, only the
                // header's change counters would differ.
                "archive" if reading == Reading::Stored => {
                    if local_target {
                        items.push((Item::Stored(db_node), name.clone()));
                    } else {
                        restore_into(&repo, &manifest, db_node, &out, &name, ctl, false)?;
                        items.push((Item::Staged(out.join(&name)), name.clone()));
                    }
                }
                "archive" => {
                    let copy = out.join(&name);
                    run_sqlite(
                        &source,
                        &format!(
                            ".backup '{}'",
                            copy.display().to_string().replace('\'', "''")
                        ),
                        Stdio::null(),
                        Some(&copy),
                    )?;
                    items.push((Item::Staged(copy), name.clone()));
                }
                _ => {
                    let dump = out.join(format!("{name}.sql"));
                    let file = std::fs::File::create(&dump)?;
                    crate::host::lchown(&dump, plan.owner.0, plan.owner.1)?;
                    run_sqlite(&source, ".dump", Stdio::from(file), Some(&dump))?;
                    items.push((Item::Staged(dump), format!("{name}.sql")));
                }
            }
        }
        Engine::Postgres { .. } if reading == Reading::Stored => {
            if args.format == "archive" {
                let file = format!("{name}.tar{}", if args.compress { ".zst" } else { "" });
                if local_target {
                    items.push((Item::StoredArchive(db_node), file));
                } else {
                    let staged = out.join(&file);
                    write_stored_archive(
                        &repo,
                        &manifest,
                        db_node,
                        &PG_LEFT_OUT,
                        &staged,
                        args.compress,
                        ctl,
                    )?;
                    items.push((Item::Staged(staged), file));
                }
            } else {
                items.push((Item::StoredTree(db_node), name.clone()));
            }
        }
        Engine::Postgres { .. } => {
            let bin = plan.pg_bin.clone().expect("checked");
            let sock = dir.join("sock");
            std::fs::create_dir(&sock)?;
            crate::host::lchown(&sock, plan.owner.0, plan.owner.1)?;
            let port = free_port()?;
            // A server of its own: no TCP, no archiving, no replication;
            // recovery of a base backup runs to its end and it comes up.
            let options = format!(
                "-c port={port} -c listen_addresses='' -c unix_socket_directories={} -c archive_mode=off -c max_wal_senders=0 -c wal_level=replica",
                sock.display()
            );
            let log = out.join("server.log");
            let child = as_user(plan.owner.0, &bin.join("pg_ctl"))?
                .arg("-D")
                .arg(&db)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "600", "-o", &options, "start"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            cleanup.pg = Some((bin.clone(), db.clone(), plan.owner.0));
            // The postmaster's pid goes into the state as soon as it shows,
            // so a run killed during a long recovery is still cleaned up.
            let record = |state: &mut State| {
                if state.postmaster.is_none() {
                    let pid = std::fs::read_to_string(db.join("postmaster.pid"))
                        .ok()
                        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()));
                    if pid.is_some() {
                        state.postmaster = pid;
                        let _ = write_state(&dir, state);
                    }
                }
            };
            let started_pg = wait_child_with(
                child,
                "starting PostgreSQL on the session (recovery)",
                &ctl.stop,
                &mut || record(&mut cleanup.state),
            );
            record(&mut cleanup.state);
            if let Err(e) = started_pg {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(8).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(e.context(format!("server log:\n{}", tail.join("\n"))));
            }
            if args.format == "logical" {
                let dbs =
                    if args.databases.is_empty() {
                        let o = as_user(plan.owner.0, &bin.join("psql"))?
                        .args(["-X", "-A", "-t", "-h"])
                        .arg(&sock)
                        .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres", "-c"])
                        .arg("SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1")
                        .output()?;
                        if !o.status.success() {
                            bail!(
                                "cannot list the cluster's databases: {}",
                                String::from_utf8_lossy(&o.stderr).trim()
                            );
                        }
                        String::from_utf8_lossy(&o.stdout)
                            .lines()
                            .map(|l| l.trim().to_string())
                            .filter(|l| !l.is_empty())
                            .collect()
                    } else {
                        args.databases.clone()
                    };
                let dumps = out.join(&name);
                std::fs::create_dir(&dumps)?;
                crate::host::lchown(&dumps, plan.owner.0, plan.owner.1)?;
                let globals = dumps.join("globals.sql");
                let child = as_user(plan.owner.0, &bin.join("pg_dumpall"))?
                    .args(["--globals-only", "-h"])
                    .arg(&sock)
                    .args(["-p", &port.to_string(), "-U", "postgres", "-f"])
                    .arg(&globals)
                    .stderr(Stdio::piped())
                    .spawn()?;
                wait_child(child, "pg_dumpall --globals-only", &ctl.stop)?;
                for d in &dbs {
                    let (flag, file) = match args.logical_format.as_str() {
                        "plain" => ("p", format!("{d}.sql")),
                        "directory" => ("d", d.clone()),
                        _ => ("c", format!("{d}.dump")),
                    };
                    let mut cmd = as_user(plan.owner.0, &bin.join("pg_dump"))?;
                    cmd.args(["-F", flag, "-h"])
                        .arg(&sock)
                        .args(["-p", &port.to_string(), "-U", "postgres", "-f"])
                        .arg(dumps.join(&file));
                    if flag == "d" && args.jobs > 1 {
                        cmd.args(["-j", &args.jobs.to_string()]);
                    }
                    let child = cmd.arg(d).stderr(Stdio::piped()).spawn()?;
                    let mut growing = GrowingFiles::new(dumps.join(&file));
                    wait_child_with(
                        child,
                        &format!("pg_dump of database {d}"),
                        &ctl.stop,
                        &mut || growing.tick(),
                    )?;
                }
                cleanup.stop_server()?;
                items.push((Item::Staged(dumps), name.clone()));
            } else {
                // Shut down cleanly: the files need no recovery now.
                cleanup.stop_server()?;
                let _ = std::fs::remove_file(db.join("postmaster.opts"));
                if args.format == "files" {
                    items.push((Item::Path(db.clone()), name.clone()));
                } else {
                    let file = format!("{name}.tar{}", if args.compress { ".zst" } else { "" });
                    if matches!(args.to, Target::Remote(_)) {
                        // One file to send: made here, then streamed.
                        let staged = out.join(&file);
                        write_archive(&db, &staged, args.compress, ctl)?;
                        items.push((Item::Staged(staged), file));
                    } else {
                        items.push((Item::Path(db.clone()), file));
                    }
                }
            }
        }
    }

    // 4. Transfer.
    ctl.begin("transfer");
    let is_archive = matches!(plan.engine, Engine::Postgres { .. })
        && args.format == "archive"
        && matches!(args.to, Target::Local(_));
    ctl.bytes_total.store(
        items
            .iter()
            .map(|(from, _)| match from {
                Item::Stored(node) => manifest.nodes[*node].size,
                Item::StoredTree(node) | Item::StoredArchive(node) => {
                    sizes(&manifest, *node, None).0
                }
                Item::Path(p) | Item::Staged(p) => tree_bytes(p),
            })
            .sum(),
        Ordering::Relaxed,
    );
    let names: Vec<String> = items.iter().map(|(_, n)| n.clone()).collect();
    let (bytes, written) = match &args.to {
        Target::Local(to) => {
            // Into a partial directory, renamed into place.
            std::fs::create_dir_all(to)
                .with_context(|| format!("cannot create {}", to.display()))?;
            let partial = to.join(format!(".flr-partial-{}-{seq}", std::process::id()));
            let _ = std::fs::remove_dir_all(&partial);
            std::fs::create_dir(&partial)
                .with_context(|| format!("cannot create {}", partial.display()))?;
            cleanup.partial = Some(partial.clone());
            cleanup.state.partial = Some(partial.clone());
            write_state(&dir, &cleanup.state)?;
            let mut bytes = 0u64;
            for (from, to_name) in &items {
                let dest = partial.join(to_name);
                bytes += match from {
                    Item::Stored(node) => {
                        restore_into(&repo, &manifest, *node, &partial, to_name, ctl, true)?
                    }
                    Item::StoredTree(node) => restore_tree(&repo, &manifest, *node, &dest, ctl)?,
                    Item::StoredArchive(node) => write_stored_archive(
                        &repo,
                        &manifest,
                        *node,
                        &PG_LEFT_OUT,
                        &dest,
                        args.compress,
                        ctl,
                    )?,
                    Item::Path(p) | Item::Staged(p) if is_archive => {
                        write_archive(p, &dest, args.compress, ctl)?
                    }
                    Item::Staged(p) => move_staged(p, &dest, ctl)?,
                    Item::Path(p) => match &cleanup.session {
                        Some(session) => copy_tree_with(
                            p,
                            &dest,
                            ctl,
                            Some(&StoredFiles {
                                session,
                                repo: &repo,
                                manifest: &manifest,
                            }),
                        )?,
                        None => copy_tree(p, &dest, ctl)?,
                    },
                };
            }
            if ctl.stopped() {
                bail!("stopped");
            }
            // One sync of the target's filesystem instead of one per file
            // (a data directory has thousands), before anything is renamed.
            crate::host::sync_filesystem(&partial)
                .with_context(|| format!("cannot sync the filesystem of {}", partial.display()))?;
            for to_name in &names {
                let final_path = to.join(to_name);
                if final_path.symlink_metadata().is_ok() {
                    // Checked: only with --overwrite.
                    if final_path.is_dir() && !final_path.is_symlink() {
                        std::fs::remove_dir_all(&final_path)?;
                    } else {
                        std::fs::remove_file(&final_path)?;
                    }
                }
                std::fs::rename(partial.join(to_name), &final_path).with_context(|| {
                    format!("cannot move the export to {}", final_path.display())
                })?;
            }
            let _ = std::fs::remove_dir(&partial);
            cleanup.partial = None;
            let written = names
                .iter()
                .map(|n| to.join(n).display().to_string())
                .collect();
            (bytes, written)
        }
        Target::Remote(r) => {
            let need = plan.estimate + plan.estimate / 10 + (16 << 20);
            let paths = items
                .iter()
                .map(|(from, name)| match from {
                    Item::Path(p) | Item::Staged(p) => Ok((p.clone(), name.clone())),
                    Item::Stored(_) | Item::StoredTree(_) | Item::StoredArchive(_) => {
                        Err(anyhow!("a remote target is sent files, not stored nodes"))
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            let bytes = send_remote(r, &paths, args.overwrite, need, &mut cleanup, ctl)?;
            let written = names
                .iter()
                .map(|n| format!("{}/{n}", r.url().trim_end_matches('/')))
                .collect();
            (bytes, written)
        }
    };

    // 5. Clean up.
    ctl.begin("cleanup");
    drop(cleanup);
    ctl.begin("");

    Ok(ExportReport {
        restore_point: rp.to_string(),
        path: args.path.clone(),
        engine: plan.engine.name().to_string(),
        format: args.format.clone(),
        target: args.to.display(),
        written,
        bytes,
        logical_bytes: plan.logical,
        estimate_bytes: plan.estimate,
        from_store_bytes: ctl.bytes_from_store.load(Ordering::Relaxed),
        duration_ms: started.elapsed().as_millis() as u64,
        steps: ctl.steps(),
    })
}
