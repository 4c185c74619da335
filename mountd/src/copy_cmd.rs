//! `flr copy`: restore points into a second repository, the archive copy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use vfs_core::backup::Progress;
use vfs_core::copy::{Copier, CopyReport};
use vfs_core::repo::RestorePointName;

use crate::cli::{human, open_repo_with};
use crate::exit;
use crate::progress::ProgressDisplay;

#[derive(Args)]
pub struct CopyArgs {
    /// The repository to copy from; its password comes from
    /// FLR_FROM_PASSWORD, else FLR_PASSWORD, else the terminal.
    #[arg(long)]
    from: backends::repo_spec::RepoSpec,
    /// The repository to copy to; its password comes from FLR_TO_PASSWORD,
    /// else FLR_PASSWORD, else the terminal.
    #[arg(long)]
    to: backends::repo_spec::RepoSpec,
    /// Copy only restore points of this job.
    #[arg(long)]
    job: Option<String>,
    /// Restore points to copy (JOB/TIMESTAMP, or JOB for its newest);
    /// all of them (of --job) when none is given.
    restore_points: Vec<String>,
    #[arg(long)]
    json: bool,
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: CopyArgs) -> Result<u8> {
    let from = open_repo_with(&args.from, "FLR_FROM_PASSWORD")?;
    let to = open_repo_with(&args.to, "FLR_TO_PASSWORD")?;
    if from.config().id == to.config().id {
        anyhow::bail!("{} and {} are the same repository", args.from, args.to);
    }
    let mut names: Vec<RestorePointName> = if args.restore_points.is_empty() {
        from.list_restore_points(args.job.as_deref())?
    } else {
        let mut names = Vec::new();
        for spec in &args.restore_points {
            let name = from.resolve(spec)?;
            if args.job.as_ref().is_some_and(|j| *j != name.job) {
                anyhow::bail!(
                    "{name} is not a restore point of job {:?}",
                    args.job.unwrap()
                );
            }
            names.push(name);
        }
        names
    };
    // Oldest first: each copy pairs ids up for the next one of its job.
    names.sort_by_key(|n| (n.name.clone(), n.job.clone()));
    names.dedup();

    let cancel = Arc::new(AtomicBool::new(false));
    let signals = crate::interrupt::Interrupts::new().context("cannot install signal handlers")?;
    let handle = signals.handle();
    let flag = cancel.clone();
    let watcher = std::thread::spawn(move || {
        if let Some(sig) = signals.wait() {
            tracing::warn!("signal {sig}: stopping after the current batch; the restore point being copied is not committed");
            flag.store(true, Ordering::Relaxed);
        }
    });

    let progress = Arc::new(Progress::default());
    let display = ProgressDisplay::start(progress.clone(), "copy", !args.quiet && !args.json);
    let mut copier = Copier::new(&from, &to);
    let mut done: Vec<CopyReport> = Vec::new();
    let mut failed: Vec<(String, String)> = Vec::new();
    for name in &names {
        if cancel.load(Ordering::Relaxed) {
            failed.push((name.to_string(), "cancelled".into()));
            continue;
        }
        match copier.copy(name, &progress, &cancel) {
            Ok(r) => {
                if !args.json && !args.quiet {
                    let line = if r.copied {
                        format!(
                            "copied {}: {} chunks, {} read, {} new, {} written, {} verified",
                            r.restore_point,
                            r.chunks,
                            r.chunks_read,
                            r.new_chunks,
                            human(r.uploaded_bytes),
                            r.verified_chunks
                        )
                    } else {
                        format!("{}: already at the destination", r.restore_point)
                    };
                    display.println(&line);
                }
                done.push(r);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::error!("copy of {name} failed: {msg}");
                failed.push((name.to_string(), msg));
            }
        }
    }
    drop(display);
    handle.close();
    let _ = watcher.join();

    let copied = done.iter().filter(|r| r.copied).count();
    if args.json {
        let errors: Vec<_> = failed
            .iter()
            .map(|(rp, e)| json!({"restore_point": rp, "error": e}))
            .collect();
        println!(
            "{}",
            json!({
                "from": from.store().location(),
                "to": to.store().location(),
                "restore_points": done,
                "errors": errors,
                "copied": copied,
                "requests": {
                    "from": crate::cli::requests_json(from.store().requests()),
                    "to": crate::cli::requests_json(to.store().requests()),
                },
                "uploaded_bytes": done.iter().map(|r| r.uploaded_bytes).sum::<u64>(),
            })
        );
    } else {
        for (rp, e) in &failed {
            eprintln!("flr: copy of {rp} failed: {e}");
        }
        if !args.quiet {
            println!(
                "{copied} copied, {} already there, {} failed; {} written to {}",
                done.len() - copied,
                failed.len(),
                human(done.iter().map(|r| r.uploaded_bytes).sum()),
                to.store().location()
            );
        }
    }
    Ok(if failed.is_empty() {
        exit::OK
    } else {
        exit::ERROR
    })
}
