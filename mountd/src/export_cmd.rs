//! `flr export`: the command line of [`mountd::export`]. When a daemon
//! answers on the socket and serves the repository, the export runs there
//! as a job (`POST /exports`) and this command follows it, cancelling it
//! on SIGINT or SIGTERM; otherwise it runs here.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mountd::export::{ExportControl, ExportReport, ExportRequest, Target};
use serde_json::{json, Value};

use crate::exit;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// A directory, or s3://BUCKET/PREFIX.
    #[arg(long)]
    repo: backends::repo_spec::RepoSpec,
    /// JOB/TIMESTAMP, or JOB for the newest.
    restore_point: String,
    /// The database inside the restore point: a PostgreSQL data directory
    /// or a SQLite file.
    #[arg(long)]
    path: String,
    /// files: the database's files, consistent, ready to attach; archive:
    /// one file (a tar of the data directory, or a SQLite backup copy);
    /// logical: schema and data (pg_dump, sqlite3 .dump).
    #[arg(long, value_parser = mountd::export::FORMATS)]
    format: String,
    /// A local directory, or flr://HOST:PORT/DIR on another host's daemon;
    /// what is exported goes into it under the database's name.
    #[arg(long)]
    to: String,
    /// File holding the bearer token of the daemon a flr:// target names
    /// (else FLR_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where the session's changes and dumps are staged (default
    /// /var/tmp/flr-staging).
    #[arg(long)]
    staging: Option<PathBuf>,
    /// Export into a target directory that is not empty (an existing item
    /// of the same name is replaced).
    #[arg(long)]
    overwrite: bool,
    /// archive: compress the tar with zstd.
    #[arg(long)]
    compress: bool,
    /// logical, PostgreSQL: pg_dump's format.
    #[arg(long, default_value = "custom", value_parser = mountd::export::LOGICAL_FORMATS)]
    logical_format: String,
    /// logical, PostgreSQL: the databases to dump (default: all but
    /// templates); repeatable.
    #[arg(long = "database")]
    databases: Vec<String>,
    /// logical, PostgreSQL, directory format: parallel dump jobs.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Run here even when a daemon answers.
    #[arg(long)]
    local: bool,
    #[arg(long)]
    json: bool,
    #[arg(long, short)]
    quiet: bool,
}

fn token(args: &ExportArgs) -> Result<Option<String>> {
    if let Some(f) = &args.token_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the token file {}", f.display()))?;
        return Ok(Some(text.trim().to_string()));
    }
    Ok(std::env::var("FLR_TOKEN").ok())
}

pub fn run(args: ExportArgs, socket: &Path) -> Result<u8> {
    // Programs run from `/` and the daemon has its own directory: every
    // path handed on is absolute.
    let token = token(&args)?;
    let to = Target::parse(&args.to, token.clone())?;
    let staging = args
        .staging
        .as_deref()
        .map(std::path::absolute)
        .transpose()?;
    let req = ExportRequest {
        repo_path: args.repo.absolute().to_string(),
        restore_point: args.restore_point.clone(),
        path: args.path.clone(),
        format: args.format.clone(),
        to,
        staging,
        overwrite: args.overwrite,
        compress: args.compress,
        logical_format: args.logical_format.clone(),
        databases: args.databases.clone(),
        jobs: args.jobs,
    };
    req.validate().map_err(|e| anyhow!(e))?;
    if !args.local && mountd::client::is_running(socket) {
        if let Some(name) = crate::remote::daemon_repository(socket, &args.repo)? {
            let report = through_daemon(socket, &name, &req, token.as_deref(), &args)?;
            return print(&args, &report);
        }
        tracing::info!(
            "the flr daemon on {} does not serve {}: exporting here",
            socket.display(),
            args.repo
        );
    }
    let repo = Arc::new(crate::cli::open_repo(&args.repo)?);
    let ctl = Arc::new(ExportControl::default());
    let signals = crate::interrupt::Interrupts::new()?;
    let handle = signals.handle();
    let c = ctl.clone();
    let waiter = std::thread::spawn(move || {
        if signals.wait().is_some() {
            c.stop.store(true, Ordering::SeqCst);
        }
    });
    let bar = Bar::start(show_bar(&args));
    let done = Arc::new(AtomicBool::new(false));
    let drawer = {
        let (ctl, bar, done) = (ctl.clone(), bar.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                bar.update(
                    ctl.step().as_deref(),
                    ctl.bytes_done.load(Ordering::Relaxed),
                    ctl.bytes_total.load(Ordering::Relaxed),
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let result = mountd::export::run(repo, &req, &ctl);
    done.store(true, Ordering::Relaxed);
    let _ = drawer.join();
    bar.finish();
    handle.close();
    let _ = waiter.join();
    let report = match result {
        Err(e) if ctl.stop.load(Ordering::SeqCst) => {
            return Err(e.context("interrupted by a signal; everything the export made is removed"))
        }
        r => r?,
    };
    print(&args, &report)
}

fn show_bar(args: &ExportArgs) -> bool {
    !args.quiet && !args.json && std::io::stderr().is_terminal()
}

fn print(args: &ExportArgs, r: &ExportReport) -> Result<u8> {
    if args.json {
        println!("{}", serde_json::to_value(r)?);
    } else if !args.quiet {
        let steps: Vec<String> = r
            .steps
            .iter()
            .map(|s| format!("{} {:.1}s", s.step, s.ms as f64 / 1000.0))
            .collect();
        println!(
            "exported {} of {} ({}, {}) to {}: {} in {:.1}s ({})",
            r.path,
            r.restore_point,
            r.engine,
            r.format,
            r.written.join(", "),
            crate::cli::human(r.bytes),
            r.duration_ms as f64 / 1000.0,
            steps.join(", ")
        );
    }
    Ok(exit::OK)
}

/// A job on the daemon, followed until it ends.
fn through_daemon(
    socket: &Path,
    repository: &str,
    req: &ExportRequest,
    token: Option<&str>,
    args: &ExportArgs,
) -> Result<ExportReport> {
    let mut body = json!({
        "repository": repository,
        "restore_point": req.restore_point,
        "path": req.path,
        "format": req.format,
        "to": match &req.to {
            Target::Local(p) => p.display().to_string(),
            Target::Remote(r) => r.url(),
        },
        "overwrite": req.overwrite,
        "compress": req.compress,
        "logical_format": req.logical_format,
        "databases": req.databases,
        "jobs": req.jobs,
    });
    if let Some(s) = &req.staging {
        body["staging"] = json!(s.display().to_string());
    }
    if let (Target::Remote(_), Some(t)) = (&req.to, token) {
        body["token"] = json!(t);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let signals = crate::interrupt::Interrupts::new()?;
    let handle = signals.handle();
    let flag = stop.clone();
    let waiter = std::thread::spawn(move || {
        if signals.wait().is_some() {
            flag.store(true, Ordering::SeqCst);
        }
    });
    let job = crate::remote::call_ok(socket, "POST", "/exports", Some(&body), "export failed")?;
    let id = job["id"].as_str().unwrap_or_default().to_string();
    tracing::info!(
        "export job {id} runs on the flr daemon on {}",
        socket.display()
    );
    let bar = Bar::start(show_bar(args));
    let mut cancelled = false;
    let info = loop {
        let info = crate::remote::call_ok(
            socket,
            "GET",
            &format!("/exports/{id}"),
            None,
            "following the export",
        )?;
        if let Some("done" | "failed" | "cancelled") = info["state"].as_str() {
            break info;
        }
        bar.update(
            info["step"].as_str(),
            info["bytes_done"].as_u64().unwrap_or(0),
            info["bytes_total"].as_u64().unwrap_or(0),
        );
        if stop.load(Ordering::SeqCst) && !cancelled {
            cancelled = true;
            let _ = crate::remote::call_ok(
                socket,
                "DELETE",
                &format!("/exports/{id}"),
                None,
                "cancelling the export",
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    bar.finish();
    handle.close();
    let _ = waiter.join();
    match info["state"].as_str() {
        Some("done") => Ok(serde_json::from_value(report_of(&info))?),
        Some("cancelled") => bail!("export job {id} was cancelled; everything it made is removed"),
        _ => bail!(
            "{}",
            info["error"].as_str().unwrap_or("the export job failed")
        ),
    }
}

fn report_of(info: &Value) -> Value {
    info["report"].clone()
}

/// The progress bar: the step, and the transfer's bytes.
#[derive(Clone)]
struct Bar(Option<ProgressBar>);

impl Bar {
    fn start(show: bool) -> Bar {
        if !show {
            return Bar(None);
        }
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Bar(Some(bar))
    }

    fn update(&self, step: Option<&str>, done: u64, total: u64) {
        if let Some(b) = &self.0 {
            b.set_prefix(step.unwrap_or("").to_string());
            b.set_length(total);
            b.set_position(done);
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
