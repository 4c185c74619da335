//! The table every kind of daemon job lives in (restore, device, export
//! and copy jobs): jobs in the order they were started, looked up by id,
//! and the oldest finished ones forgotten beyond a limit, so a long-running
//! daemon keeps a bounded history.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::api::ApiError;
use super::log;

/// What the table needs of a job.
pub trait TableJob: Send + Sync {
    /// What the API shows of the job.
    type Info;
    /// The job's kind in messages: "restore job", "copy job".
    const KIND: &'static str;

    fn id(&self) -> &str;
    fn info(&self) -> Self::Info;
    /// Whether the job has ended (done, failed or cancelled).
    fn finished(&self) -> bool;
    /// Asks the job to stop, as `DELETE` on it does; an error says why it
    /// cannot be (it has finished, say).
    fn cancel(&self) -> Result<(), ApiError>;
    /// Asks the job to stop, as the daemon does when it shuts down.
    fn stop(&self);
}

pub struct JobTable<J> {
    list: Mutex<BTreeMap<u64, Arc<J>>>,
    seq: AtomicU64,
    /// Finished jobs kept; older ones are forgotten.
    keep_finished: usize,
}

impl<J: TableJob> JobTable<J> {
    pub fn new(keep_finished: usize) -> Self {
        JobTable {
            list: Mutex::new(BTreeMap::new()),
            seq: AtomicU64::new(0),
            keep_finished,
        }
    }

    pub fn find(&self, id: &str) -> Result<Arc<J>, ApiError> {
        self.list
            .lock()
            .values()
            .find(|j| j.id() == id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("unknown {} {id:?}", J::KIND)))
    }

    pub fn get(&self, id: &str) -> Result<J::Info, ApiError> {
        Ok(self.find(id)?.info())
    }

    pub fn list(&self) -> Vec<J::Info> {
        self.jobs().iter().map(|j| j.info()).collect()
    }

    /// The jobs, oldest first.
    pub fn jobs(&self) -> Vec<Arc<J>> {
        self.list.lock().values().cloned().collect()
    }

    /// Jobs not yet finished.
    pub fn running(&self) -> usize {
        self.list.lock().values().filter(|j| !j.finished()).count()
    }

    pub fn cancel(&self, id: &str) -> Result<J::Info, ApiError> {
        let job = self.find(id)?;
        job.cancel()?;
        log(format!("{} {id}: cancel requested", J::KIND));
        Ok(job.info())
    }

    pub fn stop_all(&self) {
        for j in self.list.lock().values() {
            j.stop();
        }
    }

    /// Waits until no job runs, or `limit` passes; says whether none runs.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while self.running() > 0 {
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    pub fn insert(&self, job: Arc<J>) {
        let mut list = self.list.lock();
        list.insert(self.seq.fetch_add(1, Relaxed), job);
        let finished: Vec<u64> = list
            .iter()
            .filter(|(_, j)| j.finished())
            .map(|(k, _)| *k)
            .collect();
        for k in finished
            .iter()
            .take(finished.len().saturating_sub(self.keep_finished))
        {
            list.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    struct Job {
        id: String,
        done: AtomicBool,
    }

    impl TableJob for Job {
        type Info = String;
        const KIND: &'static str = "test job";
        fn id(&self) -> &str {
            &self.id
        }
        fn info(&self) -> String {
            self.id.clone()
        }
        fn finished(&self) -> bool {
            self.done.load(Relaxed)
        }
        fn cancel(&self) -> Result<(), ApiError> {
            if self.finished() {
                return Err(ApiError::conflict(format!("{} has finished", self.id)));
            }
            self.stop();
            Ok(())
        }
        fn stop(&self) {
            self.done.store(true, Relaxed);
        }
    }

    fn job(id: &str, done: bool) -> Arc<Job> {
        Arc::new(Job {
            id: id.into(),
            done: AtomicBool::new(done),
        })
    }

    #[test]
    fn keeps_running_jobs_and_the_newest_finished_ones() {
        let t = JobTable::new(2);
        t.insert(job("run", false));
        for i in 0..5 {
            t.insert(job(&format!("old{i}"), true));
        }
        assert_eq!(t.list(), ["run", "old3", "old4"]);
        assert_eq!(t.running(), 1);
        assert!(t.get("old0").is_err());
    }

    #[test]
    fn cancel_reaches_the_job_and_refuses_what_it_refuses() {
        let t = JobTable::new(10);
        t.insert(job("a", false));
        assert_eq!(t.cancel("a").unwrap(), "a");
        assert_eq!(t.running(), 0);
        assert!(t.cancel("a").is_err());
        assert!(t.cancel("nope").is_err());
    }
}
