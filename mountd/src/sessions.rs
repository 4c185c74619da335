//! `flr session list|commit|discard`. A mounted session is reached through
//! the control socket of the process serving it; one that no process
//! serves (kept, or left by a crash) is opened here.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;
use vfs_core::session::{self, SessionOptions};

use crate::cli::SessionCommand;
use crate::exit;
use mountd::writable;

pub fn run(state_dir: &Path, command: SessionCommand) -> Result<u8> {
    match command {
        SessionCommand::List { json } => list(state_dir, json),
        SessionCommand::Commit { id, job, json } => commit(state_dir, &id, &job, json),
        SessionCommand::Discard { id } => discard(state_dir, &id),
    }
}

fn list(state_dir: &Path, json: bool) -> Result<u8> {
    let sessions = session::list_sessions(state_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&sessions)?);
        return Ok(exit::OK);
    }
    if sessions.is_empty() {
        println!("no sessions in {}", state_dir.display());
        return Ok(exit::OK);
    }
    println!(
        "{:<32} {:<40} {:>10}  state",
        "ID", "RESTORE POINT", "CHANGES"
    );
    for s in sessions {
        println!(
            "{:<32} {:<40} {:>10}  {}",
            s.info.id,
            s.info.restore_point,
            crate::cli::human(s.disk_bytes),
            if s.in_use {
                "mounted"
            } else {
                "kept (resume or discard)"
            }
        );
    }
    Ok(exit::OK)
}

fn commit(state_dir: &Path, id: &str, job: &str, json: bool) -> Result<u8> {
    vfs_core::manifest::validate_job_name(job)?;
    let info = session::read_info(state_dir, id)?;
    let (name, added, skipped) = match writable::request(state_dir, id, &format!("commit {job}"))? {
        Some(reply) => {
            let mut parts = reply.split_whitespace();
            let name = parts.next().unwrap_or_default().to_string();
            let added = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let skipped = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            (name, added, skipped)
        }
        None => {
            // Not mounted: open the session here, commit, keep it.
            let spec = backends::repo_spec::RepoSpec::parse(&info.repository)
                .map_err(anyhow::Error::msg)?;
            let repo = std::sync::Arc::new(crate::cli::open_repo(&spec)?);
            let rp = repo.resolve(&info.restore_point)?;
            let cow = writable::open_session(
                repo,
                &info.repository,
                &rp,
                state_dir,
                id,
                true,
                writable::OpenOptions {
                    cache_bytes: 256 << 20,
                    cache: None,
                    disk_cache: None,
                    session: SessionOptions {
                        min_free_bytes: 0,
                        ..SessionOptions::default()
                    },
                },
            )?;
            let c = writable::commit(&cow, job)?;
            cow.close(true)
                .with_context(|| format!("cannot close session {id}"))?;
            (c.restore_point, c.added_bytes, c.skipped)
        }
    };
    if json {
        println!(
            "{}",
            json!({"restore_point": name, "added_bytes": added, "skipped_special_files": skipped})
        );
    } else {
        println!("{name}");
        eprintln!(
            "flr: session {id} committed as {name} ({} added{})",
            crate::cli::human(added),
            if skipped > 0 {
                format!("; {skipped} pipes, sockets or device nodes left out")
            } else {
                String::new()
            }
        );
    }
    Ok(exit::OK)
}

fn discard(state_dir: &Path, id: &str) -> Result<u8> {
    session::read_info(state_dir, id)?;
    match writable::request(state_dir, id, "discard")? {
        Some(_) => {}
        None => session::discard(state_dir, id)?,
    }
    eprintln!("flr: session {id} discarded");
    Ok(exit::OK)
}
