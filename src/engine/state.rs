//! Jobs in flight (queued or pending) in memory: one record per job, one function for every
//! state change. That function logs the change (one line per change) and feeds the job's watch
//! channel, which coalesced requests, `/log` and the web view follow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::jobs::BuildInfo;

/// Where a job is in its life.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Accepted, waiting for a slot.
    Queued,
    /// Running: its directory is in `pending/`.
    Pending,
    /// Ended and moved to `ready/`, with its BuildInfo (without the log fields).
    Ready(Arc<BuildInfo>),
}

impl JobState {
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Pending => "pending",
            JobState::Ready(_) => "ready",
        }
    }
}

/// A job's identity: its project and ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobKey {
    pub project: String,
    pub id: String,
}

impl JobKey {
    pub fn new(project: &str, id: &str) -> JobKey {
        JobKey {
            project: project.to_string(),
            id: id.to_string(),
        }
    }
}

/// One job in flight.
struct JobRecord {
    state: watch::Sender<JobState>,
    /// Host pid of the job's sandbox (its init) while it runs.
    sandbox: Option<i32>,
}

/// What became of a request.
pub enum Admission {
    /// A new job, now queued.
    Queued(watch::Receiver<JobState>),
    /// The same job is already in flight: follow it.
    Coalesced(watch::Receiver<JobState>),
    /// Answered from the result cache.
    Cached(Box<BuildInfo>),
    /// `capacity` jobs are in flight already.
    Full,
}

/// The jobs in flight, at most `capacity` at once.
pub struct InFlight {
    jobs: Mutex<HashMap<JobKey, JobRecord>>,
    capacity: usize,
}

impl InFlight {
    pub fn new(capacity: usize) -> InFlight {
        InFlight {
            jobs: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobKey, JobRecord>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admit a request for job `key`, atomically with respect to every other admission and
    /// state change: join the same job in flight; else answer from `cached` (the result cache,
    /// consulted under the lock so that a job turning ready meanwhile is found there); else
    /// queue a new job if there is room.
    pub fn admit(&self, key: &JobKey, cached: impl FnOnce() -> Option<BuildInfo>) -> Admission {
        let mut jobs = self.lock();
        if let Some(rec) = jobs.get(key) {
            announce(key, "coalesced", None);
            return Admission::Coalesced(rec.state.subscribe());
        }
        if let Some(info) = cached() {
            announce(key, "cached", None);
            return Admission::Cached(Box::new(info));
        }
        if jobs.len() >= self.capacity {
            return Admission::Full;
        }
        let (tx, rx) = watch::channel(JobState::Queued);
        jobs.insert(
            key.clone(),
            JobRecord {
                state: tx,
                sandbox: None,
            },
        );
        announce(key, "queued", None);
        Admission::Queued(rx)
    }

    /// The one place a job's state changes: the change is logged and sent to every follower; a
    /// ready job leaves the jobs in flight.
    pub fn set(&self, key: &JobKey, state: JobState) {
        let mut jobs = self.lock();
        let ready = matches!(state, JobState::Ready(_));
        let rec = if ready { jobs.remove(key) } else { None };
        let Some(tx) = rec
            .as_ref()
            .map(|r| &r.state)
            .or(jobs.get(key).map(|r| &r.state))
        else {
            return;
        };
        if let JobState::Ready(info) = &state {
            announce(key, state.name(), Some(info));
        } else {
            announce(key, state.name(), None);
        }
        tx.send_replace(state);
    }

    /// Record the host pid of the job's sandbox (`None` once it ended), for shutdown.
    pub fn set_sandbox(&self, key: &JobKey, pid: Option<i32>) {
        if let Some(rec) = self.lock().get_mut(key) {
            rec.sandbox = pid;
        }
    }

    /// A job in flight's state.
    pub fn watch(&self, key: &JobKey) -> Option<watch::Receiver<JobState>> {
        self.lock().get(key).map(|r| r.state.subscribe())
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The sandboxes running now.
    pub fn sandboxes(&self) -> Vec<i32> {
        self.lock().values().filter_map(|r| r.sandbox).collect()
    }
}

/// The daemon's log line of a state change.
fn announce(key: &JobKey, state: &str, info: Option<&BuildInfo>) {
    let (project, id) = (&key.project, &key.id);
    match (state, info) {
        (_, Some(info)) => tracing::info!(
            %project, %id, state, exit_code = info.exit_code, incremental = info.incremental,
            error = %info.err_build, "job finished"
        ),
        ("queued", None) => tracing::info!(%project, %id, state, "job accepted"),
        ("pending", None) => tracing::info!(%project, %id, state, "job started"),
        ("cached", None) => {
            tracing::info!(%project, %id, state, "job answered from the result cache")
        }
        ("coalesced", None) => {
            tracing::info!(%project, %id, state, "job joins a running identical job")
        }
        (_, None) => tracing::info!(%project, %id, state, "job state changed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> BuildInfo {
        serde_json::from_value(serde_json::json!({
            "Params": {}, "Group": "", "Path": "", "Cached": false, "Coalesced": false,
            "Incremental": false, "ExitCode": 0, "ErrBuild": "", "TransportMethod": "rsync",
            "StartedAt": "", "Duration": 1, "URL": ""
        }))
        .unwrap()
    }

    #[test]
    fn one_record_per_job_through_its_states() {
        let jobs = InFlight::new(2);
        let (a, b, c) = (
            JobKey::new("p", "a"),
            JobKey::new("p", "b"),
            JobKey::new("p", "c"),
        );
        let Admission::Queued(mut rx) = jobs.admit(&a, || None) else {
            panic!("not queued")
        };
        // A job in flight is joined, whatever the result cache holds.
        assert!(matches!(
            jobs.admit(&a, || panic!("no cache lookup")),
            Admission::Coalesced(_)
        ));
        assert!(matches!(
            jobs.admit(&b, || Some(info())),
            Admission::Cached(_)
        ));
        assert!(matches!(jobs.admit(&b, || None), Admission::Queued(_)));
        assert!(matches!(jobs.admit(&c, || None), Admission::Full));
        jobs.set(&a, JobState::Pending);
        assert_eq!(*rx.borrow_and_update(), JobState::Pending);
        jobs.set_sandbox(&a, Some(42));
        assert_eq!(jobs.sandboxes(), [42]);
        jobs.set(&a, JobState::Ready(Arc::new(info())));
        assert!(matches!(*rx.borrow_and_update(), JobState::Ready(_)));
        assert!(jobs.watch(&a).is_none());
        assert!(jobs.sandboxes().is_empty());
        assert!(matches!(jobs.admit(&c, || None), Admission::Queued(_)));
        jobs.set(&b, JobState::Ready(Arc::new(info())));
        jobs.set(&c, JobState::Ready(Arc::new(info())));
        assert!(jobs.is_empty());
    }
}
