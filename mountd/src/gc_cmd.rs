//! `flr forget`, `flr prune` and `flr unlock`: retention, garbage
//! collection and lock clean-up (the scheme is in `vfs_core::lock`).

use anyhow::{bail, Result};
use clap::Args;
use vfs_core::forget::{forget, KeepPolicy};
use vfs_core::lock::{list_locks, remove_lock};
use vfs_core::prune::{prune, PruneOptions};

use crate::cli::open_repo;
use crate::exit;

#[derive(Args)]
pub struct ForgetArgs {
    #[arg(long)]
    repo: backends::repo_spec::RepoSpec,
    /// Only this job's restore points (each job is its own group).
    #[arg(long)]
    job: Option<String>,
    /// Keep the N newest restore points.
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest restore point of each of the N newest hours (UTC)
    /// that have one.
    #[arg(long, default_value_t = 0)]
    keep_hourly: u32,
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    /// ISO 8601 weeks (Monday to Sunday, UTC).
    #[arg(long, default_value_t = 0)]
    keep_weekly: u32,
    #[arg(long, default_value_t = 0)]
    keep_monthly: u32,
    #[arg(long, default_value_t = 0)]
    keep_yearly: u32,
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PruneArgs {
    #[arg(long)]
    repo: backends::repo_spec::RepoSpec,
    /// Show what would be deleted and repacked; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Unused bytes allowed to stay in packs, as a share of all pack bytes
    /// (`5%`, `0%`, `0.1`); packs above it are repacked.
    #[arg(long, default_value = "5%", value_parser = share_arg)]
    max_unused: f64,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct UnlockArgs {
    #[arg(long)]
    repo: backends::repo_spec::RepoSpec,
    /// Remove every lock, live or not (only when no flr process uses the
    /// repository).
    #[arg(long)]
    remove_all: bool,
    #[arg(long)]
    json: bool,
}

fn share_arg(s: &str) -> std::result::Result<f64, String> {
    let value = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => s.trim().parse::<f64>(),
    }
    .map_err(|_| format!("{s:?} is not a share such as 5% or 0.05"))?;
    if !(0.0..=1.0).contains(&value) {
        return Err(format!("{s:?} is outside 0%..100%"));
    }
    Ok(value)
}

pub fn run_forget(args: ForgetArgs) -> Result<u8> {
    let policy = KeepPolicy {
        last: args.keep_last,
        hourly: args.keep_hourly,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
        yearly: args.keep_yearly,
    };
    if policy.keeps_nothing() {
        bail!("give at least one --keep-* option above 0; a policy keeping nothing would remove every restore point");
    }
    let repo = open_repo(&args.repo)?;
    let report = forget(&repo, args.job.as_deref(), &policy, args.dry_run)?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["requests"] = crate::cli::requests_json(repo.store().requests());
        println!("{v}");
        return Ok(exit::OK);
    }
    let width = report
        .keep
        .iter()
        .chain(&report.remove)
        .map(|d| d.restore_point.len())
        .max()
        .unwrap_or(0)
        .max("restore point".len());
    println!("{:width$}  action  reasons", "restore point");
    for d in report.keep.iter().chain(&report.remove) {
        let action = match (d.keep, report.dry_run) {
            (true, _) => "keep",
            (false, true) => "would remove",
            (false, false) => "remove",
        };
        println!(
            "{:width$}  {action:6}  {}",
            d.restore_point,
            d.reasons.join(", ")
        );
    }
    println!(
        "{} kept, {} {}",
        report.keep.len(),
        report.remove.len(),
        if report.dry_run {
            "would be removed (dry run)"
        } else {
            "removed; run `flr prune` to free their space"
        }
    );
    Ok(exit::OK)
}

pub fn run_prune(args: PruneArgs) -> Result<u8> {
    let repo = open_repo(&args.repo)?;
    let report = prune(
        &repo,
        &PruneOptions {
            dry_run: args.dry_run,
            max_unused: args.max_unused,
        },
    )?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["requests"] = crate::cli::requests_json(repo.store().requests());
        println!("{v}");
        return Ok(exit::OK);
    }
    for l in &report.stale_locks_removed {
        println!("removed stale {l}");
    }
    let would = if report.dry_run { "would be " } else { "" };
    println!(
        "{} restore points, {} packs ({})",
        report.restore_points,
        report.packs_total,
        bytes(report.bytes_total)
    );
    println!(
        "{} packs {would}deleted, {} {would}freed",
        report.packs_deleted,
        bytes(report.bytes_freed)
    );
    println!(
        "{} packs {would}repacked ({}, {} of used chunks stored again)",
        report.packs_repacked,
        bytes(report.bytes_repacked),
        bytes(report.bytes_rewritten)
    );
    if report.packs_pending > 0 {
        println!(
            "{} packs ({}) pending deletion, waiting for running writers: {}",
            report.packs_pending,
            bytes(report.bytes_pending),
            if report.waiting_for.is_empty() {
                "(a later prune decides)".to_string()
            } else {
                report.waiting_for.join(", ")
            }
        );
    }
    if report.packs_rescued > 0 {
        println!(
            "{} pending packs kept: restore points written since use them",
            report.packs_rescued
        );
    }
    println!(
        "{} unused bytes stay in kept packs",
        bytes(report.bytes_unused_kept)
    );
    Ok(exit::OK)
}

pub fn run_unlock(args: UnlockArgs) -> Result<u8> {
    let repo = open_repo(&args.repo)?;
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    for l in list_locks(&repo)? {
        if l.stale || args.remove_all {
            remove_lock(repo.store().as_ref(), &l)?;
            removed.push(l);
        } else {
            kept.push(l);
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "removed": removed, "kept": kept })
        );
    } else {
        for l in &removed {
            println!("removed {}", l.describe());
        }
        for l in &kept {
            println!("kept live {}", l.describe());
        }
        println!("{} locks removed, {} live kept", removed.len(), kept.len());
    }
    Ok(exit::OK)
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
