//! Export jobs: `POST /exports` runs [`crate::export::run`] on a blocking
//! thread, `GET /exports/{id}` shows its step, bytes, rate, ETA and the
//! time of each finished step, and `DELETE /exports/{id}` stops it. A
//! stopped export undoes what it made (server, mount, session, staging,
//! partial data at the target) before the job is marked cancelled.
//!
//! A local target follows the restore jobs' rule: at or below
//! `settings.restore_targets`. A remote target (`flr://`) is checked by
//! the daemon there. The token for it is kept in memory only, never shown
//! or logged.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::api::ApiError;
use super::job_table::{JobTable, TableJob};
use super::jobs::JobState;
use super::{jobs, log, unix_now, Daemon};
use crate::export::{self, ExportControl, ExportReport, ExportRequest, StepTime, Target};

/// Finished export jobs kept for `GET /exports`.
const KEEP_FINISHED: usize = 200;

/// File in the state directory listing the staging roots export jobs
/// used, so that the next start clears what a crash left in each.
const STAGING_ROOTS: &str = "export-staging-roots";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewExport {
    pub repository: String,
    pub restore_point: String,
    pub path: String,
    pub format: String,
    /// An absolute directory, or flr://HOST:PORT/DIR.
    pub to: String,
    /// Bearer token of the daemon a flr:// target names.
    pub token: Option<String>,
    pub staging: Option<String>,
    #[serde(default)]
    pub overwrite: bool,
    #[serde(default)]
    pub compress: bool,
    pub logical_format: Option<String>,
    #[serde(default)]
    pub databases: Vec<String>,
    pub jobs: Option<usize>,
}

struct Status {
    state: JobState,
    error: Option<String>,
    created_at: u64,
    started: Option<(Instant, u64)>,
    finished: Option<(Instant, u64)>,
    report: Option<ExportReport>,
}

pub struct ExportJob {
    id: String,
    repository: String,
    restore_point: String,
    path: String,
    format: String,
    target: String,
    ctl: Arc<ExportControl>,
    status: Mutex<Status>,
}

#[derive(Serialize)]
pub struct ExportJobInfo {
    pub id: String,
    pub repository: String,
    pub restore_point: String,
    pub path: String,
    pub format: String,
    pub target: String,
    pub state: JobState,
    /// check, mount, stage, transfer or cleanup while running.
    pub step: Option<String>,
    pub error: Option<String>,
    pub cancel_requested: bool,
    /// Bytes of the transfer.
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub rate_bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
    /// Finished steps and their times.
    pub steps: Vec<StepTime>,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// What was written, once done.
    pub report: Option<ExportReport>,
}

impl ExportJob {
    fn info(&self) -> ExportJobInfo {
        let st = self.status.lock();
        let done = self.ctl.bytes_done.load(Relaxed);
        let total = self.ctl.bytes_total.load(Relaxed);
        let rate = self.ctl.rate();
        let step = self.ctl.step();
        let eta_secs = match st.state {
            JobState::Done => Some(0),
            JobState::Running if rate > 0 && step.as_deref() == Some("transfer") => {
                Some(total.saturating_sub(done) / rate)
            }
            _ => None,
        };
        ExportJobInfo {
            id: self.id.clone(),
            repository: self.repository.clone(),
            restore_point: self.restore_point.clone(),
            path: self.path.clone(),
            format: self.format.clone(),
            target: self.target.clone(),
            state: st.state,
            step: if st.state == JobState::Running {
                step
            } else {
                None
            },
            error: st.error.clone(),
            cancel_requested: self.ctl.stop.load(Relaxed),
            bytes_done: done,
            bytes_total: total,
            rate_bytes_per_sec: rate,
            eta_secs,
            steps: st
                .report
                .as_ref()
                .map_or_else(|| self.ctl.steps(), |r| r.steps.clone()),
            created_at: st.created_at,
            started_at: st.started.map(|s| s.1),
            finished_at: st.finished.map(|f| f.1),
            report: st.report.clone(),
        }
    }
}

impl TableJob for ExportJob {
    type Info = ExportJobInfo;
    const KIND: &'static str = "export job";

    fn id(&self) -> &str {
        &self.id
    }

    fn info(&self) -> ExportJobInfo {
        ExportJob::info(self)
    }

    fn finished(&self) -> bool {
        self.status.lock().state.finished()
    }

    /// The job stops at its next check, cleans up, then shows `cancelled`.
    fn cancel(&self) -> Result<(), ApiError> {
        if self.finished() {
            return Err(ApiError::conflict(format!(
                "export job {} has already finished",
                self.id
            )));
        }
        self.stop();
        Ok(())
    }

    fn stop(&self) {
        self.ctl.stop.store(true, Relaxed);
    }
}

pub fn new_table() -> JobTable<ExportJob> {
    JobTable::new(KEEP_FINISHED)
}

/// The staging root jobs use unless they name one.
pub fn default_staging(daemon: &Daemon) -> PathBuf {
    daemon
        .config
        .settings
        .export_staging
        .clone()
        .unwrap_or_else(|| PathBuf::from(export::DEFAULT_STAGING))
}

fn staging_roots_file(daemon: &Daemon) -> PathBuf {
    daemon
        .config
        .settings
        .state_dir
        .clone()
        .unwrap_or_else(crate::writable::default_state_dir)
        .join(STAGING_ROOTS)
}

/// Every staging root jobs of this daemon used (the default first).
pub fn staging_roots(daemon: &Daemon) -> Vec<PathBuf> {
    let mut roots = vec![default_staging(daemon)];
    if let Ok(text) = std::fs::read_to_string(staging_roots_file(daemon)) {
        for l in text.lines().filter(|l| !l.is_empty()) {
            let p = PathBuf::from(l);
            if !roots.contains(&p) {
                roots.push(p);
            }
        }
    }
    roots
}

fn remember_staging(daemon: &Daemon, root: &Path) {
    if staging_roots(daemon).iter().any(|r| r == root) {
        return;
    }
    let file = staging_roots_file(daemon);
    let appended = file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)?;
            writeln!(f, "{}", root.display())
        });
    if let Err(e) = appended {
        log(format!(
            "cannot note staging root {} in {}: {e}",
            root.display(),
            file.display()
        ));
    }
}

/// Checks the request and starts the job.
pub async fn start(daemon: &Arc<Daemon>, req: NewExport) -> Result<ExportJobInfo, ApiError> {
    let handle = daemon.repo(&req.repository)?;
    let repo_path = handle.config.path.absolute().to_string();
    let to = if req.to.contains("://") {
        Target::parse(&req.to, req.token.clone())
            .map_err(|e| ApiError::bad_request(format!("{e:#}")))?
    } else {
        Target::Local(jobs::check_target(daemon, &req.to)?)
    };
    let staging = match &req.staging {
        Some(s) => {
            let p = PathBuf::from(s);
            if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
                return Err(ApiError::bad_request(format!(
                    "staging {s:?} must be an absolute path without '..'"
                )));
            }
            p
        }
        None => default_staging(daemon),
    };
    let request = ExportRequest {
        repo_path,
        restore_point: req.restore_point.clone(),
        path: req.path.clone(),
        format: req.format.clone(),
        to,
        staging: Some(staging.clone()),
        overwrite: req.overwrite,
        compress: req.compress,
        logical_format: req
            .logical_format
            .clone()
            .unwrap_or_else(|| "custom".into()),
        databases: req.databases.clone(),
        jobs: req.jobs.unwrap_or(1),
    };
    request.validate().map_err(ApiError::bad_request)?;
    if daemon.shutting_down.load(Relaxed) {
        return Err(ApiError::unavailable("the daemon is shutting down"));
    }
    let (d, name, spec) = (
        daemon.clone(),
        req.repository.clone(),
        req.restore_point.clone(),
    );
    let repo = tokio::task::spawn_blocking(move || {
        let handle = d.repo(&name)?;
        let repo = handle.open_for(None).map_err(ApiError::from_core)?;
        // Reopened when the restore point is newer than the index read;
        // an unknown one fails the job's check step.
        match repo.resolve(&spec) {
            Ok(rp) => handle.open_for(Some(&rp)).map_err(ApiError::from_core),
            Err(_) => Ok(repo),
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("export job setup failed: {e}")))??;
    remember_staging(daemon, &staging);
    let job = Arc::new(ExportJob {
        id: daemon.new_id("x"),
        repository: req.repository,
        restore_point: req.restore_point,
        path: req.path,
        format: req.format,
        target: request.to.display(),
        ctl: Arc::new(ExportControl::default()),
        status: Mutex::new(Status {
            state: JobState::Running,
            error: None,
            created_at: unix_now(),
            started: Some((Instant::now(), unix_now())),
            finished: None,
            report: None,
        }),
    });
    daemon.exports.insert(job.clone());
    log(format!(
        "export job {} started: {}:{} {} as {} -> {}",
        job.id, job.repository, job.restore_point, job.path, job.format, job.target
    ));
    let info = job.info();
    tokio::spawn(async move {
        let ctl = job.ctl.clone();
        let result = tokio::task::spawn_blocking(move || export::run(repo, &request, &ctl)).await;
        let (state, error, report) = match result {
            Ok(Ok(r)) => (JobState::Done, None, Some(r)),
            Ok(Err(_)) if job.ctl.stop.load(Relaxed) => (JobState::Cancelled, None, None),
            Ok(Err(e)) => (JobState::Failed, Some(format!("{e:#}")), None),
            Err(e) => (
                JobState::Failed,
                Some(format!("export task failed: {e}")),
                None,
            ),
        };
        {
            let mut st = job.status.lock();
            st.state = state;
            st.error = error.clone();
            st.report = report;
            st.finished = Some((Instant::now(), unix_now()));
        }
        match error {
            Some(e) => log(format!("export job {} failed: {e}", job.id)),
            None => log(format!("export job {} {:?}", job.id, state).to_lowercase()),
        }
    });
    Ok(info)
}
