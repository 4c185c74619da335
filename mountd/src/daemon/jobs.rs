//! Automated file-level restore: jobs that write chosen files of a
//! restore point (paths or glob patterns) into an allowed directory.
//!
//! Jobs wait in a queue for one of `restore_workers` slots (a semaphore)
//! and run `vfs_core::restore` on a blocking thread. Restore writes each
//! file as `.name.flr-partial` and renames it when complete, and removes
//! the partial file when it stops early, so a cancelled or failed job
//! leaves no half-written file under a final name and no partial file.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Semaphore;
use vfs_core::backup::Progress;
use vfs_core::manifest::Manifest;
use vfs_core::restore::{self, RestoreOptions};

use super::api::ApiError;
use super::job_table::{JobTable, TableJob};
use super::{glob, log, unix_now, Daemon};

/// Finished jobs kept for `GET /restore-jobs`; older ones are forgotten.
const KEEP_FINISHED: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    fn index(self) -> usize {
        self as usize
    }

    pub fn finished(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

struct Status {
    state: JobState,
    error: Option<String>,
    created_at: u64,
    started: Option<(Instant, u64)>,
    finished: Option<(Instant, u64)>,
}

pub struct RestoreJob {
    id: String,
    repository: String,
    restore_point: String,
    target: PathBuf,
    paths: Vec<String>,
    overwrite: bool,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
    status: Mutex<Status>,
}

/// What the API shows of a job.
#[derive(Serialize)]
pub struct JobInfo {
    pub id: String,
    pub repository: String,
    pub restore_point: String,
    pub target: String,
    /// The paths selected (glob patterns expanded); empty means all.
    pub paths: Vec<String>,
    pub overwrite: bool,
    pub state: JobState,
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub files_done: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes per second since the job started running.
    pub rate_bytes_per_sec: u64,
    /// Seconds left at the current rate; null until known.
    pub eta_secs: Option<u64>,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
}

impl RestoreJob {
    fn info(&self) -> JobInfo {
        let st = self.status.lock();
        let done = self.progress.read_bytes.load(Relaxed);
        let total = self.progress.total_bytes.load(Relaxed);
        let elapsed = match (st.started, st.finished) {
            (Some((s, _)), Some((f, _))) => f.duration_since(s),
            (Some((s, _)), None) => s.elapsed(),
            _ => Duration::ZERO,
        };
        let rate = if elapsed.as_secs_f64() > 0.0 {
            (done as f64 / elapsed.as_secs_f64()) as u64
        } else {
            0
        };
        let eta_secs = match st.state {
            JobState::Done => Some(0),
            JobState::Running if rate > 0 => Some(total.saturating_sub(done) / rate),
            _ => None,
        };
        JobInfo {
            id: self.id.clone(),
            repository: self.repository.clone(),
            restore_point: self.restore_point.clone(),
            target: self.target.display().to_string(),
            paths: self.paths.clone(),
            overwrite: self.overwrite,
            state: st.state,
            error: st.error.clone(),
            cancel_requested: self.cancel.load(Relaxed),
            files_done: self.progress.files_done.load(Relaxed),
            bytes_done: done,
            bytes_total: total,
            rate_bytes_per_sec: rate,
            eta_secs,
            created_at: st.created_at,
            started_at: st.started.map(|s| s.1),
            finished_at: st.finished.map(|f| f.1),
        }
    }

    fn finish(&self, state: JobState, error: Option<String>) {
        let mut st = self.status.lock();
        st.state = state;
        st.error = error;
        st.finished = Some((Instant::now(), unix_now()));
    }
}

impl TableJob for RestoreJob {
    type Info = JobInfo;
    const KIND: &'static str = "restore job";

    fn id(&self) -> &str {
        &self.id
    }

    fn info(&self) -> JobInfo {
        RestoreJob::info(self)
    }

    fn finished(&self) -> bool {
        self.status.lock().state.finished()
    }

    /// A queued job is cancelled at once; a running one stops at its next
    /// batch of chunks, removing its partial file.
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

/// Cancels a job that waits for a worker at once (its `state` and
/// `finished` time, under its status lock), and asks a running one,
/// through `flag`, to stop; a finished one is a conflict.
pub fn cancel_queued_or_running(
    state: &mut JobState,
    finished: &mut Option<(Instant, u64)>,
    flag: &AtomicBool,
    id: &str,
    kind: &str,
) -> Result<(), ApiError> {
    if state.finished() {
        let name = serde_json::to_value(*state).unwrap_or_default();
        return Err(ApiError::conflict(format!(
            "{kind} {id} has already finished ({})",
            name.as_str().unwrap_or("finished")
        )));
    }
    flag.store(true, Relaxed);
    if *state == JobState::Queued {
        *state = JobState::Cancelled;
        *finished = Some((Instant::now(), unix_now()));
    }
    Ok(())
}

pub struct Jobs {
    pub table: JobTable<RestoreJob>,
    slots: Arc<Semaphore>,
    /// Bytes written by jobs no longer in the table, for the metrics
    /// counter.
    finished_bytes: AtomicU64,
}

pub struct Counts {
    /// queued, running, done, failed, cancelled
    pub by_state: [u64; 5],
    pub bytes: u64,
}

impl Jobs {
    pub fn new(workers: usize) -> Jobs {
        Jobs {
            table: JobTable::new(KEEP_FINISHED),
            slots: Arc::new(Semaphore::new(workers.max(1))),
            finished_bytes: AtomicU64::new(0),
        }
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts {
            by_state: [0; 5],
            bytes: self.finished_bytes.load(Relaxed),
        };
        for j in self.table.jobs() {
            let state = j.status.lock().state;
            c.by_state[state.index()] += 1;
            if !state.finished() {
                c.bytes += j.progress.read_bytes.load(Relaxed);
            }
        }
        c
    }
}

/// A restore job as asked for.
pub struct JobRequest {
    pub repository: String,
    pub restore_point: String,
    pub paths: Vec<String>,
    pub target: String,
    pub overwrite: bool,
}

/// Checks the request, queues the job and returns it.
pub async fn start(daemon: &Arc<Daemon>, req: JobRequest) -> Result<JobInfo, ApiError> {
    daemon.repo(&req.repository)?;
    let target = check_target(daemon, &req.target)?;
    let d = daemon.clone();
    let (repository, spec, patterns) = (
        req.repository.clone(),
        req.restore_point.clone(),
        req.paths.clone(),
    );
    let (repo, manifest, paths) = tokio::task::spawn_blocking(move || {
        let handle = d.repo(&repository)?;
        let repo = handle.open_for(None).map_err(ApiError::from_core)?;
        let name = repo.resolve(&spec).map_err(ApiError::from_core)?;
        let repo = handle.open_for(Some(&name)).map_err(ApiError::from_core)?;
        let manifest = repo.load_manifest(&name).map_err(ApiError::from_core)?;
        let paths = expand(&manifest, &patterns)?;
        Ok::<_, ApiError>((repo, manifest, paths))
    })
    .await
    .map_err(|e| ApiError::internal(format!("restore job setup failed: {e}")))??;
    if daemon.shutting_down.load(Relaxed) {
        return Err(ApiError::unavailable("the daemon is shutting down"));
    }
    let job = Arc::new(RestoreJob {
        id: daemon.new_id("j"),
        repository: req.repository,
        restore_point: manifest.full_name(),
        target: target.clone(),
        paths: paths.clone(),
        overwrite: req.overwrite,
        progress: Arc::new(Progress::default()),
        cancel: Arc::new(AtomicBool::new(false)),
        status: Mutex::new(Status {
            state: JobState::Queued,
            error: None,
            created_at: unix_now(),
            started: None,
            finished: None,
        }),
    });
    daemon.jobs.table.insert(job.clone());
    log(format!(
        "restore job {} queued: {} -> {}",
        job.id,
        job.restore_point,
        target.display()
    ));
    let info = job.info();
    let d = daemon.clone();
    tokio::spawn(async move {
        let _permit = d.jobs.slots.clone().acquire_owned().await;
        {
            let mut st = job.status.lock();
            if job.cancel.load(Relaxed) || st.state.finished() {
                if !st.state.finished() {
                    st.state = JobState::Cancelled;
                    st.finished = Some((Instant::now(), unix_now()));
                }
                return;
            }
            st.state = JobState::Running;
            st.started = Some((Instant::now(), unix_now()));
        }
        let opts = RestoreOptions {
            paths,
            overwrite: job.overwrite,
            progress: job.progress.clone(),
            cancel: job.cancel.clone(),
            sync_each_file: true,
        };
        let target = job.target.clone();
        let result =
            tokio::task::spawn_blocking(move || restore::restore(&repo, &manifest, &target, &opts))
                .await;
        let (state, error) = match result {
            Ok(Ok(_)) => (JobState::Done, None),
            Ok(Err(_)) if job.cancel.load(Relaxed) => (JobState::Cancelled, None),
            Ok(Err(e)) => (
                JobState::Failed,
                Some(
                    e.to_string()
                        .replace("pass --overwrite", "set \"overwrite\": true"),
                ),
            ),
            Err(e) => (JobState::Failed, Some(format!("restore task failed: {e}"))),
        };
        d.jobs
            .finished_bytes
            .fetch_add(job.progress.read_bytes.load(Relaxed), Relaxed);
        job.finish(state, error.clone());
        match error {
            Some(e) => log(format!("restore job {} failed: {e}", job.id)),
            None => log(format!("restore job {} {:?}", job.id, state).to_lowercase()),
        }
    });
    Ok(info)
}

/// Expands glob patterns against the restore point's paths; plain paths
/// must exist. Empty means everything.
fn expand(manifest: &Manifest, requested: &[String]) -> Result<Vec<String>, ApiError> {
    if requested.is_empty() {
        return Ok(Vec::new());
    }
    let all: Vec<String> = (1..manifest.nodes.len())
        .map(|i| manifest.path_of(i))
        .collect();
    let mut out: Vec<String> = Vec::new();
    for p in requested {
        let p = p.trim_matches('/');
        if p.is_empty() {
            return Err(ApiError::bad_request(
                "an empty path in paths; leave paths empty to restore everything",
            ));
        }
        if glob::is_pattern(p) {
            let before = out.len();
            out.extend(all.iter().filter(|a| glob::matches(p, a)).cloned());
            if out.len() == before {
                return Err(ApiError::not_found(format!(
                    "no path in restore point {} matches {p:?}",
                    manifest.full_name()
                )));
            }
        } else if all.iter().any(|a| a == p) {
            out.push(p.to_string());
        } else {
            return Err(ApiError::not_found(format!(
                "{p:?} is not in restore point {}",
                manifest.full_name()
            )));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Where a restore job may write: an absolute path at or below one of
/// `settings.restore_targets`, and not inside the mount root. Returns the
/// path with its existing part resolved (symlinks followed).
pub fn check_target(daemon: &Daemon, target: &str) -> Result<PathBuf, ApiError> {
    let path = Path::new(target);
    if !path.is_absolute() {
        return Err(ApiError::bad_request(format!(
            "target {target:?} must be an absolute path"
        )));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(ApiError::bad_request(format!(
            "target {target:?} must not contain '..'"
        )));
    }
    let resolved = resolve_existing(path);
    if resolved.exists() && !resolved.is_dir() {
        return Err(ApiError::bad_request(format!(
            "target {target:?} exists and is not a directory"
        )));
    }
    if resolved.starts_with(&daemon.mount_root) {
        return Err(ApiError::forbidden(format!(
            "target {target:?} is inside the mount root {}; restore jobs write outside the read-only mounts",
            daemon.mount_root.display()
        )));
    }
    let allowed = &daemon.config.settings.restore_targets;
    if allowed.is_empty() {
        return Err(ApiError::forbidden(format!(
            "target {target:?} is not allowed: no restore target directories are configured (settings.restore_targets)"
        )));
    }
    if !allowed
        .iter()
        .any(|a| resolved.starts_with(resolve_existing(a)))
    {
        let list: Vec<String> = allowed.iter().map(|a| a.display().to_string()).collect();
        return Err(ApiError::forbidden(format!(
            "target {target:?} is outside the directories restore jobs may write to ({}; settings.restore_targets)",
            list.join(", ")
        )));
    }
    Ok(resolved)
}

/// `path` with its longest existing prefix canonicalized and the rest
/// appended as given.
fn resolve_existing(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut cur = path;
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                cur = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_prefixes_resolve_and_the_rest_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::os::unix::fs::symlink(&real, real.join("link")).unwrap();
        assert_eq!(
            resolve_existing(&real.join("link/new/deeper")),
            real.join("new/deeper")
        );
    }
}
