//! Backups through devices, driven over the API (`POST /devices`): the
//! daemon makes the named pipes, answers with their paths and a job id at
//! once, and stores what the engine writes as it comes; `GET /devices/{id}`
//! shows each device's state and bytes and, at the end, each database's
//! restore point or error.
//!
//! Each job's pipes live in a directory of their own,
//! `<devices_dir>/<job id>/<db>/<i>`, owned by the user who asked (the
//! peer of the Unix socket) or by `owner`. A daemon that dies leaves them;
//! the next one removes them at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use vfs_core::devices::{self, DeviceState, DeviceStatus, StreamFormat};

use super::api::ApiError;
use super::job_table::{JobTable, TableJob};
use super::{log, unix_now, Daemon};
use crate::devices::{DeviceSet, Owner};

/// Finished device jobs kept for `GET /devices`.
const KEEP_FINISHED: usize = 200;

/// Most databases one job may hold.
pub const MAX_DATABASES: usize = 64;

/// Most streams one database may ask for.
pub const MAX_STREAMS: usize = 64;

pub struct DeviceRequest {
    pub repository: String,
    pub databases: Vec<String>,
    pub streams: usize,
    pub format: StreamFormat,
    pub owner: Owner,
    pub timeout: Option<Duration>,
}

#[derive(Clone, Serialize)]
pub struct DatabaseResult {
    pub restore_point: Option<String>,
    pub added_bytes: Option<u64>,
    pub error: Option<String>,
}

struct Finished {
    at: (Instant, u64),
    results: BTreeMap<String, DatabaseResult>,
}

pub struct DeviceJob {
    id: String,
    repository: String,
    format: StreamFormat,
    databases: Vec<String>,
    devices: Vec<Arc<DeviceStatus>>,
    cancel: Arc<AtomicBool>,
    created: (Instant, u64),
    finished: Mutex<Option<Finished>>,
}

#[derive(Serialize)]
pub struct DeviceInfo {
    pub stream: usize,
    pub path: String,
    /// waiting, streaming, ended or failed.
    pub state: &'static str,
    pub error: Option<String>,
    pub bytes: u64,
}

#[derive(Serialize)]
pub struct DatabaseInfo {
    pub name: String,
    /// running, done or failed.
    pub state: &'static str,
    pub bytes: u64,
    pub restore_point: Option<String>,
    pub added_bytes: Option<u64>,
    pub error: Option<String>,
    pub devices: Vec<DeviceInfo>,
}

#[derive(Serialize)]
pub struct DeviceJobInfo {
    pub id: String,
    pub repository: String,
    pub format: &'static str,
    /// running, done (every database committed), failed (some did not)
    /// or cancelled.
    pub state: &'static str,
    pub cancel_requested: bool,
    pub bytes: u64,
    pub rate_bytes_per_sec: u64,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    pub databases: Vec<DatabaseInfo>,
}

impl DeviceJob {
    pub fn info(&self) -> DeviceJobInfo {
        let finished = self.finished.lock();
        let bytes_of = |s: &DeviceStatus| s.progress.read_bytes.load(Relaxed);
        let mut databases = Vec::new();
        for name in &self.databases {
            let mine: Vec<&Arc<DeviceStatus>> = self
                .devices
                .iter()
                .filter(|d| &d.database == name)
                .collect();
            let result = finished.as_ref().and_then(|f| f.results.get(name)).cloned();
            let state = match &result {
                None => "running",
                Some(r) if r.error.is_none() => "done",
                Some(_) => "failed",
            };
            let result = result.unwrap_or(DatabaseResult {
                restore_point: None,
                added_bytes: None,
                error: None,
            });
            databases.push(DatabaseInfo {
                name: name.clone(),
                state,
                bytes: mine.iter().map(|d| bytes_of(d)).sum(),
                restore_point: result.restore_point,
                added_bytes: result.added_bytes,
                error: result.error,
                devices: mine
                    .iter()
                    .map(|d| {
                        let (state, error) = match &*d.state.lock() {
                            DeviceState::Waiting => ("waiting", None),
                            DeviceState::Streaming => ("streaming", None),
                            DeviceState::Ended => ("ended", None),
                            DeviceState::Failed(e) => ("failed", Some(e.clone())),
                        };
                        DeviceInfo {
                            stream: d.stream,
                            path: d.label.clone(),
                            state,
                            error,
                            bytes: bytes_of(d),
                        }
                    })
                    .collect(),
            });
        }
        let bytes: u64 = databases.iter().map(|d| d.bytes).sum();
        let end = finished.as_ref().map_or_else(Instant::now, |f| f.at.0);
        let secs = end.duration_since(self.created.0).as_secs_f64();
        let cancelled = self.cancel.load(Relaxed);
        let state = match &*finished {
            None => "running",
            Some(_) if cancelled => "cancelled",
            Some(f) if f.results.values().all(|r| r.error.is_none()) => "done",
            Some(_) => "failed",
        };
        DeviceJobInfo {
            id: self.id.clone(),
            repository: self.repository.clone(),
            format: match self.format {
                StreamFormat::Raw => "raw",
                StreamFormat::Tar => "tar",
            },
            state,
            cancel_requested: cancelled,
            bytes,
            rate_bytes_per_sec: if secs > 0.0 {
                (bytes as f64 / secs) as u64
            } else {
                0
            },
            created_at: self.created.1,
            finished_at: finished.as_ref().map(|f| f.at.1),
            databases,
        }
    }
}

impl TableJob for DeviceJob {
    type Info = DeviceJobInfo;
    const KIND: &'static str = "device job";

    fn id(&self) -> &str {
        &self.id
    }

    fn info(&self) -> DeviceJobInfo {
        DeviceJob::info(self)
    }

    fn finished(&self) -> bool {
        self.finished.lock().is_some()
    }

    /// Devices waiting or streaming end, and the databases not yet
    /// committed commit nothing. A finished job is left as it is.
    fn cancel(&self) -> Result<(), ApiError> {
        if !self.finished() {
            self.stop();
        }
        Ok(())
    }

    fn stop(&self) {
        self.cancel.store(true, SeqCst);
    }
}

pub fn new_table() -> JobTable<DeviceJob> {
    JobTable::new(KEEP_FINISHED)
}

/// Where the daemon makes device pipes.
pub fn devices_dir(daemon: &Daemon) -> PathBuf {
    daemon
        .config
        .settings
        .devices_dir
        .clone()
        .unwrap_or_else(crate::devices::default_dir)
}

/// Removes the pipes a daemon that died left under `root`.
pub fn clear_stale(root: &Path) {
    let Ok(jobs) = std::fs::read_dir(root) else {
        return;
    };
    for job in jobs.flatten() {
        let dir = job.path();
        if !job.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match crate::devices::clear_stale_dir(&dir) {
            Ok(n) if n > 0 => log(format!(
                "removed {n} device(s) left in {} by a previous daemon",
                dir.display()
            )),
            Ok(_) => {}
            Err(e) => log(format!("cannot clear {}: {e:#}", dir.display())),
        }
    }
}

/// Makes the job's pipes and starts reading them; returns at once.
pub async fn start(daemon: &Arc<Daemon>, req: DeviceRequest) -> Result<DeviceJobInfo, ApiError> {
    if daemon.shutting_down.load(Relaxed) {
        return Err(ApiError::unavailable("the daemon is shutting down"));
    }
    if req.streams == 0 || req.streams > MAX_STREAMS {
        return Err(ApiError::bad_request(format!(
            "streams must be 1 to {MAX_STREAMS}"
        )));
    }
    if req.databases.is_empty() || req.databases.len() > MAX_DATABASES {
        return Err(ApiError::bad_request(format!(
            "databases: name at least one and at most {MAX_DATABASES}"
        )));
    }
    for (i, db) in req.databases.iter().enumerate() {
        vfs_core::manifest::validate_job_name(db).map_err(ApiError::from_core)?;
        if req.databases[..i].contains(db) {
            return Err(ApiError::bad_request(format!(
                "database {db:?} is named twice"
            )));
        }
    }
    daemon.repo(&req.repository)?;
    let repo = {
        let d = daemon.clone();
        let name = req.repository.clone();
        tokio::task::spawn_blocking(move || {
            d.repo(&name)?.open_for(None).map_err(ApiError::from_core)
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??
    };
    let id = daemon.new_id("d");
    let dir = devices_dir(daemon).join(&id);
    let set = DeviceSet::create(&dir, &req.databases, req.streams, req.owner)
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let cancel = Arc::new(AtomicBool::new(false));
    let (databases, statuses) = set
        .databases(req.owner, req.timeout, |_, _, _| Ok(None))
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let job = Arc::new(DeviceJob {
        id: id.clone(),
        repository: req.repository.clone(),
        format: req.format,
        databases: req.databases.clone(),
        devices: statuses,
        cancel: cancel.clone(),
        created: (Instant::now(), unix_now()),
        finished: Mutex::new(None),
    });
    daemon.device_jobs.insert(job.clone());
    log(format!(
        "device job {id}: {} pipe(s) for {} in {}",
        job.devices.len(),
        req.databases.join(", "),
        dir.display()
    ));
    let running = job.clone();
    let format = req.format;
    tokio::task::spawn_blocking(move || {
        let mut set = set;
        let outcomes =
            devices::backup_databases(&repo, databases, format, &crate::hostname(), &cancel);
        set.remove();
        let _ = std::fs::remove_dir(&dir);
        let mut results = BTreeMap::new();
        for o in outcomes {
            let r = match o.result {
                Ok(m) => {
                    log(format!(
                        "device job {}: committed {}",
                        running.id,
                        m.full_name()
                    ));
                    DatabaseResult {
                        restore_point: Some(m.full_name()),
                        added_bytes: Some(m.stats.added_bytes()),
                        error: None,
                    }
                }
                Err(e) => {
                    log(format!(
                        "device job {}: database {}: {e}; no restore point was committed",
                        running.id, o.job
                    ));
                    DatabaseResult {
                        restore_point: None,
                        added_bytes: None,
                        error: Some(e.to_string()),
                    }
                }
            };
            results.insert(o.job, r);
        }
        *running.finished.lock() = Some(Finished {
            at: (Instant::now(), unix_now()),
            results,
        });
    });
    Ok(job.info())
}
