//! `flr ingest commit|abort MOUNTPOINT`: ends an ingest mount through the
//! control socket of the process serving it (`mountd::ingest`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use mountd::ingest::{self, Ending};

use crate::exit;

#[derive(clap::Subcommand)]
pub enum IngestCommand {
    /// Unmount and commit one restore point holding every file written.
    /// Fails (and commits nothing) while files under the mount are open.
    Commit {
        mountpoint: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Unmount and commit nothing; what was stored stays in packs for the
    /// next backup to reuse.
    Abort { mountpoint: PathBuf },
}

pub fn run(command: IngestCommand) -> Result<u8> {
    match command {
        IngestCommand::Commit { mountpoint, json } => {
            let reply = ingest::request(&mountpoint, Ending::Commit)
                .with_context(|| format!("cannot commit the ingest at {}", mountpoint.display()))?;
            let value: serde_json::Value = serde_json::from_str(&reply)
                .with_context(|| format!("the mount process replied {reply:?}"))?;
            if json {
                println!("{value}");
            } else {
                let s = &value["stats"];
                println!(
                    "restore point {}: {} files, {} written, {} added",
                    value["restore_point"].as_str().unwrap_or_default(),
                    s["files"],
                    crate::cli::human(s["logical_bytes"].as_u64().unwrap_or(0)),
                    crate::cli::human(s["added_bytes"].as_u64().unwrap_or(0)),
                );
            }
            Ok(exit::OK)
        }
        IngestCommand::Abort { mountpoint } => {
            ingest::request(&mountpoint, Ending::Abort)
                .with_context(|| format!("cannot abort the ingest at {}", mountpoint.display()))?;
            println!(
                "ingest at {} aborted: nothing committed",
                mountpoint.display()
            );
            Ok(exit::OK)
        }
    }
}
