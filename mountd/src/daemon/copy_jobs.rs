//! Archive copies as daemon jobs: `POST /copies` copies restore points
//! from one configured repository to another with [`vfs_core::copy`], one
//! job at a time, with progress, and `DELETE /copies/{id}` cancels. A
//! cancelled or failed job commits nothing for the restore point it was on;
//! the ones it finished stay copied (and verified).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Semaphore;
use vfs_core::backup::Progress;
use vfs_core::copy::{Copier, CopyReport};
use vfs_core::repo::RestorePointName;

use super::api::ApiError;
use super::job_table::{JobTable, TableJob};
use super::jobs::{cancel_queued_or_running, JobState};
use super::{log, unix_now, Daemon};

/// Finished copy jobs kept for `GET /copies`.
const KEEP_FINISHED: usize = 200;

struct Status {
    state: JobState,
    error: Option<String>,
    started: Option<(Instant, u64)>,
    finished: Option<(Instant, u64)>,
    /// Logical bytes of the restore points already done.
    bytes_before: u64,
    reports: Vec<CopyReport>,
    failed: Vec<(String, String)>,
}

pub struct CopyJob {
    id: String,
    from: String,
    to: String,
    /// Each restore point with its logical size.
    restore_points: Vec<(RestorePointName, u64)>,
    bytes_total: u64,
    created_at: u64,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
    status: Mutex<Status>,
}

#[derive(Serialize)]
pub struct Failure {
    pub restore_point: String,
    pub error: String,
}

/// What the API shows of a copy job.
#[derive(Serialize)]
pub struct CopyJobInfo {
    pub id: String,
    pub from: String,
    pub to: String,
    pub restore_points: Vec<String>,
    pub state: JobState,
    pub error: Option<String>,
    pub cancel_requested: bool,
    /// The restore point being copied now.
    pub current: Option<String>,
    /// Logical bytes of the restore points, done and in all.
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub rate_bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
    /// Bytes written to the destination so far.
    pub uploaded_bytes: u64,
    /// One report per restore point done (copied, or found there already).
    pub done: Vec<CopyReport>,
    pub failed: Vec<Failure>,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
}

impl CopyJob {
    fn info(&self) -> CopyJobInfo {
        let st = self.status.lock();
        let running = st.state == JobState::Running;
        let done = st.bytes_before
            + if running {
                self.progress.read_bytes.load(Relaxed)
            } else {
                0
            };
        let elapsed = match (st.started, st.finished) {
            (Some((s, _)), Some((f, _))) => f.duration_since(s),
            (Some((s, _)), None) => s.elapsed(),
            _ => Duration::ZERO,
        };
        let rate = match elapsed.as_secs_f64() {
            secs if secs > 0.0 => (done as f64 / secs) as u64,
            _ => 0,
        };
        let eta_secs = match st.state {
            JobState::Done => Some(0),
            JobState::Running if rate > 0 => Some(self.bytes_total.saturating_sub(done) / rate),
            _ => None,
        };
        let current = running.then(|| self.progress.current.lock().clone());
        CopyJobInfo {
            id: self.id.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            restore_points: self
                .restore_points
                .iter()
                .map(|(n, _)| n.to_string())
                .collect(),
            state: st.state,
            error: st.error.clone(),
            cancel_requested: self.cancel.load(Relaxed),
            current: current.filter(|c| !c.is_empty()),
            bytes_done: done,
            bytes_total: self.bytes_total,
            rate_bytes_per_sec: rate,
            eta_secs,
            uploaded_bytes: st.reports.iter().map(|r| r.uploaded_bytes).sum(),
            done: st.reports.clone(),
            failed: st
                .failed
                .iter()
                .map(|(rp, e)| Failure {
                    restore_point: rp.clone(),
                    error: e.clone(),
                })
                .collect(),
            created_at: self.created_at,
            started_at: st.started.map(|s| s.1),
            finished_at: st.finished.map(|f| f.1),
        }
    }
}

impl TableJob for CopyJob {
    type Info = CopyJobInfo;
    const KIND: &'static str = "copy job";

    fn id(&self) -> &str {
        &self.id
    }

    fn info(&self) -> CopyJobInfo {
        CopyJob::info(self)
    }

    fn finished(&self) -> bool {
        self.status.lock().state.finished()
    }

    /// A queued job is cancelled at once, a running one after its current
    /// batch of chunks.
    fn cancel(&self) -> Result<(), ApiError> {
        let st = &mut *self.status.lock();
        cancel_queued_or_running(
            &mut st.state,
            &mut st.finished,
            &self.cancel,
            &self.id,
            Self::KIND,
        )
    }

    fn stop(&self) {
        self.cancel.store(true, Relaxed);
    }
}

pub struct CopyJobs {
    pub table: JobTable<CopyJob>,
    /// One copy at a time: each already uses every core.
    slot: Arc<Semaphore>,
}

impl Default for CopyJobs {
    fn default() -> Self {
        CopyJobs {
            table: JobTable::new(KEEP_FINISHED),
            slot: Arc::new(Semaphore::new(1)),
        }
    }
}

/// A copy job as asked for.
pub struct CopyRequest {
    pub from: String,
    pub to: String,
    pub job: Option<String>,
    pub restore_points: Vec<String>,
}

/// Checks the request (both repositories configured and distinct, every
/// restore point named exists), queues the job and returns it.
pub async fn start(daemon: &Arc<Daemon>, req: CopyRequest) -> Result<CopyJobInfo, ApiError> {
    daemon.repo(&req.from)?;
    daemon.repo(&req.to)?;
    if req.from == req.to {
        return Err(ApiError::bad_request(format!(
            "from and to are both {:?}; a copy needs two repositories",
            req.from
        )));
    }
    let d = daemon.clone();
    let (from, to, job, specs) = (
        req.from.clone(),
        req.to.clone(),
        req.job.clone(),
        req.restore_points.clone(),
    );
    let (names, bytes_total) = tokio::task::spawn_blocking(move || {
        let src = d.repo(&from)?.open_for(None).map_err(ApiError::from_core)?;
        let dst = d.repo(&to)?.open_for(None).map_err(ApiError::from_core)?;
        if src.config().id == dst.config().id {
            return Err(ApiError::bad_request(format!(
                "{from:?} and {to:?} are the same repository"
            )));
        }
        let mut names = if specs.is_empty() {
            src.list_restore_points(job.as_deref())
                .map_err(ApiError::from_core)?
        } else {
            let mut names = Vec::new();
            for spec in &specs {
                let name = src.resolve(spec).map_err(ApiError::from_core)?;
                if job.as_ref().is_some_and(|j| *j != name.job) {
                    return Err(ApiError::bad_request(format!(
                        "{name} is not a restore point of job {:?}",
                        job.as_deref().unwrap_or_default()
                    )));
                }
                names.push(name);
            }
            names
        };
        names.sort_by_key(|n| (n.name.clone(), n.job.clone()));
        names.dedup();
        let mut sized = Vec::new();
        for n in names {
            let m = src.load_manifest(&n).map_err(ApiError::from_core)?;
            sized.push((n, m.nodes.iter().map(|n| n.size).sum::<u64>()));
        }
        let total = sized.iter().map(|(_, s)| s).sum();
        Ok::<_, ApiError>((sized, total))
    })
    .await
    .map_err(|e| ApiError::internal(format!("copy job setup failed: {e}")))??;
    if names.is_empty() {
        return Err(ApiError::not_found(format!(
            "no restore points to copy in {:?}",
            req.from
        )));
    }
    if daemon.shutting_down.load(Relaxed) {
        return Err(ApiError::unavailable("the daemon is shutting down"));
    }
    let job = Arc::new(CopyJob {
        id: daemon.new_id("c"),
        from: req.from,
        to: req.to,
        restore_points: names,
        bytes_total,
        created_at: unix_now(),
        progress: Arc::new(Progress::default()),
        cancel: Arc::new(AtomicBool::new(false)),
        status: Mutex::new(Status {
            state: JobState::Queued,
            error: None,
            started: None,
            finished: None,
            bytes_before: 0,
            reports: Vec::new(),
            failed: Vec::new(),
        }),
    });
    daemon.copy_jobs.table.insert(job.clone());
    log(format!(
        "copy job {} queued: {} restore points, {} -> {}",
        job.id,
        job.restore_points.len(),
        job.from,
        job.to
    ));
    let info = job.info();
    let d = daemon.clone();
    tokio::spawn(async move {
        let _permit = d.copy_jobs.slot.clone().acquire_owned().await;
        {
            let mut st = job.status.lock();
            if job.cancel.load(Relaxed) || st.state != JobState::Queued {
                if st.state == JobState::Queued {
                    st.state = JobState::Cancelled;
                    st.finished = Some((Instant::now(), unix_now()));
                }
                return;
            }
            st.state = JobState::Running;
            st.started = Some((Instant::now(), unix_now()));
        }
        let runner = job.clone();
        let daemon = d.clone();
        let result = tokio::task::spawn_blocking(move || run(&daemon, &runner)).await;
        let (state, error) = match result {
            Ok(Ok(())) if job.cancel.load(Relaxed) => (JobState::Cancelled, None),
            Ok(Ok(())) => {
                let st = job.status.lock();
                match st.failed.first() {
                    None => (JobState::Done, None),
                    Some((rp, e)) => (
                        JobState::Failed,
                        Some(format!(
                            "{} of {} restore points failed; {rp}: {e}",
                            st.failed.len(),
                            job.restore_points.len()
                        )),
                    ),
                }
            }
            Ok(Err(e)) => (JobState::Failed, Some(e.to_string())),
            Err(e) => (JobState::Failed, Some(format!("copy task failed: {e}"))),
        };
        {
            let mut st = job.status.lock();
            st.state = state;
            st.error = error.clone();
            st.finished = Some((Instant::now(), unix_now()));
        }
        match error {
            Some(e) => log(format!("copy job {} failed: {e}", job.id)),
            None => log(format!("copy job {} {:?}", job.id, state).to_lowercase()),
        }
    });
    Ok(info)
}

/// Copies the job's restore points in order (blocking).
fn run(daemon: &Daemon, job: &CopyJob) -> vfs_core::Result<()> {
    let from = daemon
        .repo(&job.from)
        .map_err(|e| vfs_core::Error::NotFound(e.message))?
        .open_for(None)?;
    let to = daemon
        .repo(&job.to)
        .map_err(|e| vfs_core::Error::NotFound(e.message))?
        .open_for(None)?;
    // The copy's Mover reloads the index once it holds the writer lock:
    // packs other writers added since the daemon read it are not sent again.
    let mut copier = Copier::new(&from, &to);
    for (name, size) in &job.restore_points {
        if job.cancel.load(Relaxed) {
            break;
        }
        match copier.copy(name, &job.progress, &job.cancel) {
            Ok(report) => {
                let mut st = job.status.lock();
                st.bytes_before += size;
                st.reports.push(report);
            }
            Err(vfs_core::Error::Cancelled(_)) => break,
            Err(e) => {
                log(format!("copy job {}: {name} failed: {e}", job.id));
                let mut st = job.status.lock();
                st.bytes_before += size;
                st.failed.push((name.to_string(), e.to_string()));
            }
        }
        job.progress.read_bytes.store(0, Relaxed);
    }
    Ok(())
}
