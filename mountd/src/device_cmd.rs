//! `flr devices`: named pipes for databases to write their backups to,
//! stored as they arrive, one restore point per database.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use mountd::devices::{DeviceSet, Owner, Writer};
use serde_json::json;
use vfs_core::backup::Progress;
use vfs_core::devices::{self, StreamFormat};

use crate::exit;
use crate::progress::ProgressDisplay;

#[derive(clap::Args)]
pub struct DevicesArgs {
    /// A directory, or s3://BUCKET/PREFIX.
    #[arg(long)]
    repo: backends::repo_spec::RepoSpec,
    /// Parallel streams (pipes) per database.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// raw: each stream is stored as the file `stream-<i>`; tar: each
    /// stream is a tar archive, unpacked into the restore point.
    #[arg(long, default_value = "raw", value_parser = StreamFormat::parse)]
    format: StreamFormat,
    /// Where the pipes go: DIR/<db>/<i> (default /run/flr/devices for
    /// root).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Give the pipes to this user (the engine's, e.g. postgres).
    #[arg(long)]
    owner: Option<String>,
    /// Seconds to wait for a writer to start on each device; a device
    /// nobody writes to by then fails its database.
    #[arg(long)]
    timeout: Option<u64>,
    /// Run this shell command once per device to write it, with
    /// FLR_DEVICE, FLR_DATABASE and FLR_STREAM set; a stream counts only
    /// if its command exits with status 0 (a pipe alone cannot tell a
    /// killed writer from one that finished).
    #[arg(long)]
    exec: Option<String>,
    /// Print the devices, and at the end the outcome, as JSON lines.
    #[arg(long)]
    json: bool,
    #[arg(long, short)]
    quiet: bool,
    /// The databases; each one's restore point goes to the job of its
    /// name.
    #[arg(required = true)]
    databases: Vec<String>,
}

pub fn run(args: DevicesArgs) -> Result<u8> {
    let owner = match &args.owner {
        Some(user) => Owner::lookup(user)?,
        None => Owner::current(),
    };
    let repo = crate::cli::open_repo(&args.repo)?;
    crate::cli::clean_stale_writes(&args.repo);
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(mountd::devices::default_dir);
    let mut set = DeviceSet::create(&dir, &args.databases, args.streams, owner)?;

    // The devices exist: tell whoever starts the writers.
    let mut out = std::io::stdout();
    if args.json {
        let list: Vec<_> = set
            .devices()
            .map(|(db, i, p)| json!({"db": db, "stream": i, "path": p}))
            .collect();
        writeln!(out, "{}", json!({ "devices": list }))?;
    } else {
        for (_, _, p) in set.devices() {
            writeln!(out, "{}", p.display())?;
        }
    }
    out.flush()?;

    let cancel = Arc::new(AtomicBool::new(false));
    let signals = crate::interrupt::Interrupts::new().context("cannot install signal handlers")?;
    let flag = cancel.clone();
    let dirs: Vec<PathBuf> = set.databases.iter().map(|d| d.dir.clone()).collect();
    std::thread::spawn(move || {
        if let Some(sig) = signals.wait() {
            tracing::warn!("signal {sig}: stopping; no restore point will be committed");
            flag.store(true, Ordering::SeqCst);
            // A device whose writer holds its pipe open without writing
            // keeps its reader waiting: give the rest a while to stop,
            // then remove the pipes and end here.
            std::thread::sleep(Duration::from_secs(5));
            for dir in &dirs {
                let _ = mountd::devices::clear_stale_dir_of(dir);
            }
            std::process::exit(exit::ERROR as i32);
        }
    });

    let mut writers = Vec::new();
    let timeout = args.timeout.map(Duration::from_secs);
    let (databases, statuses) = set.databases(owner, timeout, |db, i, path| {
        Ok(match &args.exec {
            Some(cmd) => {
                let w = Writer::spawn(cmd, path, db, i)?;
                writers.push(w.clone());
                Some(w)
            }
            None => None,
        })
    })?;

    // One bar for all devices.
    let total = Arc::new(Progress::default());
    let done = Arc::new(AtomicBool::new(false));
    let summer = {
        let (total, statuses, done) = (total.clone(), statuses.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let sum: u64 = statuses
                    .iter()
                    .map(|s| s.progress.read_bytes.load(Ordering::Relaxed))
                    .sum();
                total.read_bytes.store(sum, Ordering::Relaxed);
                total.total_bytes.store(sum, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let display = ProgressDisplay::start(total, "devices", !args.quiet && !args.json);
    let outcomes =
        devices::backup_databases(&repo, databases, args.format, &mountd::hostname(), &cancel);
    done.store(true, Ordering::Relaxed);
    let _ = summer.join();
    drop(display);
    for w in &writers {
        w.terminate();
    }
    set.remove();

    let mut all_ok = true;
    let mut results = Vec::new();
    for o in &outcomes {
        match &o.result {
            Ok(m) => {
                let s = &m.stats;
                if !args.json && !args.quiet {
                    println!(
                        "restore point {}: {} files, {} read, {} added",
                        m.full_name(),
                        s.files,
                        crate::cli::human(s.logical_bytes),
                        crate::cli::human(s.added_bytes()),
                    );
                }
                results.push(json!({
                    "db": o.job,
                    "restore_point": m.full_name(),
                    "stats": crate::cli::stats_json(s),
                }));
            }
            Err(e) => {
                all_ok = false;
                eprintln!(
                    "flr: error: database {}: {e}; no restore point was committed",
                    o.job
                );
                results.push(json!({"db": o.job, "error": e.to_string()}));
            }
        }
    }
    if args.json {
        println!("{}", json!({ "results": results }));
    }
    Ok(if all_ok { exit::OK } else { exit::ERROR })
}
