//! Command-line parsing and the one-shot subcommands.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use backends::repo_spec::RepoSpec;
use backends::s3::S3Settings;
use clap::{Parser, Subcommand};
use serde_json::json;
use vfs_core::backup::{self, BackupOptions, Progress, Source, StdinSource};
use vfs_core::chunker::{parse_size, ChunkerKind};
use vfs_core::local_store::LocalStore;
use vfs_core::repo::{Repository, RestorePointName};
use vfs_core::restore::{self, RestoreOptions};
use vfs_core::store::RequestCounts;
use vfs_core::verify;

use crate::exit;
use crate::progress::ProgressDisplay;

#[derive(Parser)]
#[command(
    name = "flr",
    version,
    about = "Back up databases and mount any restore point instantly"
)]
pub struct Cli {
    /// The mount daemon's control socket.
    #[arg(long, global = true, env = "FLR_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a repository in a new or empty directory, or under an empty
    /// S3 prefix (`s3://BUCKET/PREFIX`).
    Init {
        repo: RepoSpec,
        /// Encrypt chunks and metadata; the password comes from
        /// FLR_PASSWORD or is asked on the terminal.
        #[arg(long)]
        encrypt: bool,
        /// zstd level for chunks larger than a database page.
        #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
        compression_level: i32,
        /// zstd level for runs of database pages (speed matters most there).
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        page_compression_level: i32,
    },
    /// Back up files and directories, or a stream from standard input.
    Backup {
        /// A directory, or s3://BUCKET/PREFIX.
        #[arg(long)]
        repo: RepoSpec,
        #[arg(long)]
        job: String,
        /// Read standard input and store it as one file of this name.
        #[arg(long, conflicts_with = "paths")]
        stdin_name: Option<String>,
        /// Read a tar stream from standard input (`pg_basebackup -Ft -D -`,
        /// `tar -c`) and unpack its members into the restore point's files.
        #[arg(long, conflicts_with_all = ["paths", "stdin_name"])]
        stdin_tar: bool,
        /// auto (per file), cdc, or fixed:SIZE (e.g. fixed:8k).
        #[arg(long, default_value = "auto")]
        chunker: String,
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        quiet: bool,
        #[arg(required_unless_present_any = ["stdin_name", "stdin_tar"])]
        paths: Vec<PathBuf>,
    },
    /// Make named pipes for databases to write their backups to (N per
    /// database, at DIR/<db>/<i>), store what comes through them, and
    /// commit one restore point per database, of the job named after it.
    Devices(crate::device_cmd::DevicesArgs),
    /// Take a database (a PostgreSQL data directory or a SQLite file) out
    /// of a restore point: as its files, as one archive, or as a logical
    /// dump, checked first and staged on a writable session.
    Export(crate::export_cmd::ExportArgs),
    /// Copy restore points into a second repository (an archive copy),
    /// sending only the chunks it lacks; each copy is verified there.
    Copy(crate::copy_cmd::CopyArgs),
    /// List restore points with their sizes.
    RestorePoints {
        /// A directory, or s3://BUCKET/PREFIX.
        #[arg(long)]
        repo: RepoSpec,
        #[arg(long)]
        job: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Write a restore point's files (or some of them) to a directory.
    Restore {
        /// A directory, or s3://BUCKET/PREFIX.
        #[arg(long)]
        repo: RepoSpec,
        /// JOB/TIMESTAMP, or JOB for the newest.
        restore_point: String,
        #[arg(long)]
        to: PathBuf,
        /// Replace files that already exist in the target.
        #[arg(long)]
        overwrite: bool,
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        quiet: bool,
        /// Paths inside the restore point; all when none.
        paths: Vec<String>,
    },
    /// Check the repository; with --read-data, re-read and re-hash all data.
    Verify {
        /// A directory, or s3://BUCKET/PREFIX.
        #[arg(long)]
        repo: RepoSpec,
        #[arg(long)]
        read_data: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove restore points by a retention policy (restic's rules, per
    /// job, periods in UTC); mounted restore points are kept.
    Forget(crate::gc_cmd::ForgetArgs),
    /// Delete packs no restore point uses and repack mostly unused ones;
    /// safe while backups run (deletion waits for them).
    Prune(crate::gc_cmd::PruneArgs),
    /// Remove stale locks (or, with --remove-all, every lock).
    Unlock(crate::gc_cmd::UnlockArgs),
    /// Repair repository metadata from the data itself.
    Repair {
        #[command(subcommand)]
        command: RepairCommand,
    },
    /// Mount restore points read-only at MOUNTPOINT/<job>/<restore point>,
    /// or, without MOUNTPOINT while a daemon runs, as a daemon session.
    Mount(crate::mount::MountArgs),
    /// Run the mount daemon: the control API on a Unix socket.
    Daemon {
        /// TOML config (default: /etc/flr/daemon.toml if it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Log one JSON object per line on stderr (for a log collector)
        /// instead of human lines.
        #[arg(long)]
        log_json: bool,
    },
    /// End a daemon mount session (by id or by path).
    Unmount { session: String },
    /// List the daemon's mount sessions.
    Mounts {
        #[arg(long)]
        json: bool,
    },
    /// Show whether a daemon runs, and its sessions and jobs.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Writable sessions (`flr mount --writable`): list, commit, discard.
    Session {
        /// Where sessions keep their changes.
        #[arg(long, env = "FLR_STATE_DIR", global = true)]
        state_dir: Option<PathBuf>,
        #[command(subcommand)]
        command: SessionCommand,
    },
    /// Ingest mounts (`flr mount --ingest`): commit or abort.
    Ingest {
        #[command(subcommand)]
        command: crate::ingest_cmd::IngestCommand,
    },
}

#[derive(Subcommand)]
enum RepairCommand {
    /// Rebuild missing, unreadable or wrong index files from the packs'
    /// own entry tables. Never deletes or changes a pack.
    Index {
        /// A directory, or s3://BUCKET/PREFIX.
        #[arg(long)]
        repo: RepoSpec,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum SessionCommand {
    /// List sessions: mounted ones and ones kept or left by a crash.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Store a session's current state as a new restore point of JOB,
    /// sharing every unchanged chunk. The session stays as it is.
    Commit {
        id: String,
        #[arg(long)]
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// Drop a session's changes: unmounts it if mounted and deletes its
    /// directory.
    Discard { id: String },
}

/// Sets up logging for the command about to run.
pub fn init_logging(cli: &Cli) {
    match cli.command {
        Command::Daemon { log_json, .. } => crate::logging::init("flr daemon", log_json),
        _ => crate::logging::init("flr", false),
    }
}

pub fn run(cli: Cli) -> Result<u8> {
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(mountd::daemon::config::DEFAULT_SOCKET));
    match cli.command {
        Command::Init {
            repo,
            encrypt,
            compression_level,
            page_compression_level,
        } => init(&repo, encrypt, compression_level, page_compression_level),
        Command::Backup {
            repo,
            job,
            stdin_name,
            stdin_tar,
            chunker,
            json,
            quiet,
            paths,
        } => {
            let input = match (stdin_name, stdin_tar) {
                (Some(name), _) => BackupInput::Stdin(name),
                (None, true) => BackupInput::StdinTar,
                (None, false) => BackupInput::Paths(paths),
            };
            run_backup(&repo, job, input, &chunker, json, quiet)
        }
        Command::Devices(args) => crate::device_cmd::run(args),
        Command::Export(args) => crate::export_cmd::run(args, &socket),
        Command::Copy(args) => crate::copy_cmd::run(args),
        Command::RestorePoints { repo, job, json } => list(&repo, job.as_deref(), json),
        Command::Restore {
            repo,
            restore_point,
            to,
            overwrite,
            json,
            quiet,
            paths,
        } => run_restore(&repo, &restore_point, &to, overwrite, json, quiet, paths),
        Command::Verify {
            repo,
            read_data,
            json,
        } => run_verify(&repo, read_data, json),
        Command::Repair {
            command: RepairCommand::Index { repo, json },
        } => run_repair_index(&repo, json),
        Command::Forget(args) => crate::gc_cmd::run_forget(args),
        Command::Prune(args) => crate::gc_cmd::run_prune(args),
        Command::Unlock(args) => crate::gc_cmd::run_unlock(args),
        Command::Mount(args) => crate::mount::run(args, &socket),
        Command::Daemon { config, .. } => crate::remote::daemon(config, cli.socket),
        Command::Unmount { session } => crate::remote::unmount(&socket, &session),
        Command::Mounts { json } => crate::remote::mounts(&socket, json),
        Command::Status { json } => crate::remote::status(&socket, json),
        Command::Ingest { command } => crate::ingest_cmd::run(command),
        Command::Session { state_dir, command } => crate::sessions::run(
            &state_dir.unwrap_or_else(mountd::writable::default_state_dir),
            command,
        ),
    }
}

/// The password from FLR_PASSWORD, or asked on the terminal.
pub fn password(repo: &RepoSpec, confirm: bool) -> vfs_core::Result<Vec<u8>> {
    password_from(None, repo, confirm)
}

/// The password from the variable `env` if given and set, else from
/// FLR_PASSWORD, else asked on the terminal.
fn password_from(env: Option<&str>, repo: &RepoSpec, confirm: bool) -> vfs_core::Result<Vec<u8>> {
    for var in env.into_iter().chain(["FLR_PASSWORD"]) {
        if let Ok(p) = std::env::var(var) {
            return Ok(p.into_bytes());
        }
    }
    if !std::io::stdin().is_terminal() {
        return Err(vfs_core::Error::PasswordNeeded(repo.to_string().into()));
    }
    let io = |e| vfs_core::Error::io("terminal", e);
    let first = rpassword::prompt_password(format!("password for {repo}: ")).map_err(io)?;
    if confirm {
        let again = rpassword::prompt_password("repeat password: ").map_err(io)?;
        if again != first {
            return Err(vfs_core::Error::InvalidInput("the passwords differ".into()));
        }
    }
    if first.is_empty() {
        return Err(vfs_core::Error::InvalidInput("empty password".into()));
    }
    Ok(first.into_bytes())
}

/// Opens the store of a repository named on the command line; an S3 one
/// is reached with the settings of the `AWS_*` environment variables.
pub fn open_store(spec: &RepoSpec) -> Result<Arc<dyn vfs_core::store::ObjectStore>> {
    spec.open_store(&S3Settings::from_env())
        .with_context(|| format!("cannot open repository {spec}"))
}

pub fn open_repo(spec: &RepoSpec) -> Result<Repository> {
    open_repo_as(spec, true, None)
}

/// Opens a repository whose password is read from the variable `env`
/// first (one command with two repositories: `flr copy`).
pub fn open_repo_with(spec: &RepoSpec, env: &str) -> Result<Repository> {
    open_repo_as(spec, true, Some(env))
}

/// Opens a repository that may have damaged index files (verify, repair).
fn open_repo_for_repair(spec: &RepoSpec) -> Result<Repository> {
    open_repo_as(spec, false, None)
}

fn open_repo_as(spec: &RepoSpec, strict: bool, env: Option<&str>) -> Result<Repository> {
    let store = open_store(spec)?;
    let password = || password_from(env, spec, false);
    let repo = if strict {
        Repository::open(store, password)?
    } else {
        Repository::open_for_repair(store, password)?
    };
    for problem in &repo.index().read().problems {
        eprintln!("flr: warning: {problem}");
    }
    Ok(repo)
}

/// Removes what writers that no longer run left behind, where the store
/// keeps such things (temporary files of a local directory; an object
/// store has none: a PUT that never finished leaves nothing).
pub fn clean_stale_writes(spec: &RepoSpec) {
    if let Some(dir) = spec.local_path() {
        if let Ok(local) = LocalStore::open(dir) {
            local.clean_stale_temp_files();
        }
    }
}

/// The requests a repository's store has sent, for `--json` output:
/// `null` for a local directory.
pub fn requests_json(counts: Option<RequestCounts>) -> serde_json::Value {
    match counts {
        Some(c) => {
            let mut v = serde_json::to_value(c).expect("counts serialize");
            v["total"] = json!(c.total());
            v
        }
        None => serde_json::Value::Null,
    }
}

fn init(spec: &RepoSpec, encrypt: bool, level: i32, page_level: i32) -> Result<u8> {
    match spec {
        RepoSpec::Local(path) => {
            if path.exists() {
                let mut entries = std::fs::read_dir(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                if entries.next().is_some() {
                    bail!(
                        "{} is not empty; a repository needs a new or empty directory",
                        path.display()
                    );
                }
            } else {
                std::fs::create_dir_all(path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
            }
        }
        RepoSpec::S3(_) => {}
    }
    let store = open_store(spec)?;
    if let RepoSpec::S3(_) = spec {
        let present = store
            .list("")
            .with_context(|| format!("cannot list {spec}"))?;
        if !present.is_empty() {
            bail!(
                "{spec} already holds {} objects; a repository needs an empty prefix",
                present.len()
            );
        }
    }
    let pw = if encrypt {
        Some(password(spec, true)?)
    } else {
        None
    };
    Repository::init_with_levels(store.as_ref(), pw.as_deref(), level, page_level)?;
    eprintln!(
        "created {}repository at {spec}",
        if encrypt { "encrypted " } else { "" },
    );
    Ok(exit::OK)
}

#[cfg(unix)]
fn own_ids() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or((0, 0), |m| (m.uid(), m.gid()))
}

#[cfg(not(unix))]
fn own_ids() -> (u32, u32) {
    (0, 0)
}

/// What `flr backup` reads.
enum BackupInput {
    Paths(Vec<PathBuf>),
    /// Standard input, stored as one file of this name.
    Stdin(String),
    /// Standard input, a tar stream to unpack.
    StdinTar,
}

fn run_backup(
    repo_path: &RepoSpec,
    job: String,
    input: BackupInput,
    chunker: &str,
    json: bool,
    quiet: bool,
) -> Result<u8> {
    let chunker = ChunkerKind::parse(chunker).map_err(anyhow::Error::msg)?;
    vfs_core::manifest::validate_job_name(&job)?;
    let repo = open_repo(repo_path)?;
    clean_stale_writes(repo_path);
    let source = match input {
        BackupInput::Stdin(name) => {
            let (uid, gid) = own_ids();
            Source::Stream(StdinSource {
                name,
                reader: Box::new(std::io::stdin()),
                mode: 0o640,
                uid,
                gid,
            })
        }
        BackupInput::StdinTar => {
            if chunker.is_some() {
                anyhow::bail!(
                    "--chunker does not apply to --stdin-tar: each member is chunked by its name and first bytes"
                );
            }
            Source::Tar {
                what: "standard input".into(),
                reader: Box::new(std::io::stdin()),
            }
        }
        BackupInput::Paths(paths) => Source::Paths(paths),
    };
    let progress = Arc::new(Progress::default());
    let display = ProgressDisplay::start(progress.clone(), "backup", !quiet && !json);
    let opts = BackupOptions {
        job,
        chunker,
        hostname: mountd::hostname(),
        progress,
    };
    let manifest = backup::backup(&repo, source, &opts)
        .context("backup failed; no restore point was created")?;
    drop(display);
    let s = &manifest.stats;
    if json {
        println!(
            "{}",
            json!({
                "restore_point": manifest.full_name(),
                "stats": stats_json(s),
                "requests": requests_json(repo.store().requests()),
            })
        );
    } else if !quiet {
        println!(
            "restore point {}: {} files, {} read, {} new chunks, {} added in {:.1}s ({}/s)",
            manifest.full_name(),
            s.files,
            human(s.logical_bytes),
            s.new_chunks,
            human(s.added_bytes()),
            s.duration_ms as f64 / 1000.0,
            human((s.logical_bytes as f64 / (s.duration_ms.max(1) as f64 / 1000.0)) as u64),
        );
    }
    if !s.changed_while_reading.is_empty() {
        for f in &s.changed_while_reading {
            eprintln!(
                "flr: warning: {f} changed while it was being read; its copy may be inconsistent"
            );
        }
        return Ok(exit::CHANGED_DURING_BACKUP);
    }
    Ok(exit::OK)
}

pub fn stats_json(s: &vfs_core::manifest::BackupStats) -> serde_json::Value {
    json!({
        "files": s.files,
        "dirs": s.dirs,
        "symlinks": s.symlinks,
        "logical_bytes": s.logical_bytes,
        "read_bytes": s.read_bytes,
        "chunks": s.chunks,
        "new_chunks": s.new_chunks,
        "new_chunk_bytes": s.new_chunk_bytes,
        "new_meta_bytes": s.new_meta_bytes,
        "added_bytes": s.added_bytes(),
        "duration_ms": s.duration_ms,
        "changed_while_reading": s.changed_while_reading,
    })
}

pub use mountd::human;

fn list(repo_path: &RepoSpec, job: Option<&str>, json: bool) -> Result<u8> {
    let repo = open_repo(repo_path)?;
    let names = repo.list_restore_points(job)?;
    let mut rows = Vec::new();
    for name in &names {
        let m = repo.load_manifest(name)?;
        // Stored size: each stored frame the restore point needs, once (a
        // frame holds several pages, and each page's entry names it whole).
        let index = repo.index().read();
        let mut frames = HashSet::new();
        let mut stored = 0u64;
        for node in &m.nodes {
            for id in node.content.ids() {
                if let Some(l) = index.get(&id) {
                    if frames.insert((l.pack, l.offset)) {
                        stored += l.stored_len as u64;
                    }
                }
            }
        }
        rows.push((
            name.clone(),
            m.time,
            m.stats.files,
            m.stats.logical_bytes,
            stored,
            m.stats.added_bytes(),
        ));
    }
    if json {
        let arr: Vec<_> = rows
            .iter()
            .map(|(n, time, files, logical, stored, added)| {
                json!({
                    "name": n.to_string(), "job": n.job, "time": time, "files": files,
                    "logical_bytes": logical, "stored_bytes": stored, "added_bytes": added,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(arr));
    } else {
        println!(
            "{:<48} {:>8} {:>12} {:>12} {:>12}",
            "RESTORE POINT", "FILES", "LOGICAL", "STORED", "ADDED"
        );
        for (n, _, files, logical, stored, added) in &rows {
            println!(
                "{:<48} {:>8} {:>12} {:>12} {:>12}",
                n.to_string(),
                files,
                human(*logical),
                human(*stored),
                human(*added)
            );
        }
    }
    Ok(exit::OK)
}

fn run_restore(
    repo_path: &RepoSpec,
    spec: &str,
    to: &Path,
    overwrite: bool,
    json: bool,
    quiet: bool,
    paths: Vec<String>,
) -> Result<u8> {
    let repo = open_repo(repo_path)?;
    let name: RestorePointName = repo.resolve(spec)?;
    // Taken before the manifest is read, so `flr forget` keeps it.
    let _reader = vfs_core::lock::acquire_reader(&repo, vec![name.to_string()]);
    let manifest = repo.load_manifest(&name)?;
    let progress = Arc::new(Progress::default());
    let display = ProgressDisplay::start(progress.clone(), "restore", !quiet && !json);
    let opts = RestoreOptions {
        paths,
        overwrite,
        progress,
        cancel: Default::default(),
        sync_each_file: true,
    };
    let stats = restore::restore(&repo, &manifest, to, &opts)
        .with_context(|| format!("restore of {name} to {} failed", to.display()))?;
    drop(display);
    if json {
        println!(
            "{}",
            json!({"restore_point": name.to_string(), "files": stats.files, "dirs": stats.dirs,
                   "symlinks": stats.symlinks, "bytes": stats.bytes,
                   "requests": requests_json(repo.store().requests())})
        );
    } else if !quiet {
        println!(
            "restored {name}: {} files, {} to {}",
            stats.files,
            human(stats.bytes),
            to.display()
        );
    }
    Ok(exit::OK)
}

fn run_verify(repo_path: &RepoSpec, read_data: bool, json: bool) -> Result<u8> {
    let repo = open_repo_for_repair(repo_path)?;
    let progress = Arc::new(Progress::default());
    let display = ProgressDisplay::start(progress.clone(), "verify", !json);
    let report = verify::verify(&repo, read_data, &progress)?;
    drop(display);
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["clean"] = json!(report.is_clean());
        v["requests"] = requests_json(repo.store().requests());
        println!("{v}");
    } else {
        for p in &report.unindexed_packs {
            eprintln!("flr: warning: {p}");
        }
        for p in &report.problems {
            eprintln!("flr: damage: {p}");
        }
        for (rp, files) in &report.damaged {
            eprintln!("flr: damaged restore point {rp}:");
            for f in files {
                eprintln!("  {f}");
            }
        }
        println!(
            "checked {} restore points, {} packs{}: {}",
            report.restore_points,
            report.packs,
            if read_data {
                format!(
                    ", {} chunks ({})",
                    report.chunks_checked,
                    human(report.bytes_checked)
                )
            } else {
                String::new()
            },
            if report.is_clean() {
                "no damage found"
            } else {
                "DAMAGE FOUND"
            }
        );
    }
    Ok(if report.is_clean() {
        exit::OK
    } else {
        exit::DAMAGED
    })
}

fn run_repair_index(repo_path: &RepoSpec, json: bool) -> Result<u8> {
    let repo = open_repo_for_repair(repo_path)?;
    let report = vfs_core::repair::repair_index(&repo)?;
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["requests"] = requests_json(repo.store().requests());
        println!("{v}");
    } else {
        for r in &report.rebuilt {
            println!(
                "rebuilt {} ({} chunks): {}",
                r.index_file, r.chunks, r.reason
            );
        }
        for p in &report.unreadable_packs {
            eprintln!("flr: damage: {p}");
        }
        for f in &report.orphan_index_files {
            eprintln!("flr: warning: {f} names a pack that does not exist (kept)");
        }
        for f in &report.foreign_files {
            eprintln!("flr: warning: {f} is not a file flr writes (kept)");
        }
        println!(
            "{} packs: {} index files sound, {} rebuilt, {} packs unreadable",
            report.packs,
            report.index_files_ok,
            report.rebuilt.len(),
            report.unreadable_packs.len()
        );
    }
    Ok(if report.unreadable_packs.is_empty() {
        exit::OK
    } else {
        exit::DAMAGED
    })
}

/// Parses a size argument such as `512M`.
pub fn size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s)
}
