//! Jobs in flight (queued or pending) in memory: one record per job, one function for every
//! state change. That function logs the change (one line per change) and feeds the job's watch
//! channel, which coalesced requests, `/log` and the web view follow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::jobs::{BuildInfo, Identity, JobIds};

/// Where a job in flight is, as its watch channel tells it (`crate::service::JobState` is what
/// the jobs interface reports: this is the engine's side of it, with the BuildInfo at the end).
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Accepted, waiting for a slot.
    Queued,
    /// Running: its directory is in `pending/`.
    Pending,
    /// Ended and moved to `ready/`, with its BuildInfo (without the log fields).
    Ready(Arc<BuildInfo>),
}

impl Phase {
    /// The phase's name as logged and announced to `/log` and the web view: `queued`, `pending`
    /// or `ready`.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Pending => "pending",
            Phase::Ready(_) => "ready",
        }
    }
}

/// A job's identity: its project and ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobKey {
    /// The job's project.
    pub project: String,
    /// Its job ID.
    pub id: String,
}

impl JobKey {
    /// The key of job `project/id`.
    pub fn new(project: &str, id: &str) -> JobKey {
        JobKey {
            project: project.to_string(),
            id: id.to_string(),
        }
    }
}

/// One job in flight.
struct JobRecord {
    state: watch::Sender<Phase>,
    /// The request it runs for: only the same one joins it.
    identity: Identity,
    /// Host pid of the job's sandbox (its init) while it runs.
    sandbox: Option<i32>,
}

/// What became of a request.
pub enum Admission {
    /// A new job, now queued.
    Queued(watch::Receiver<Phase>),
    /// The same job is already in flight: follow it.
    Coalesced(watch::Receiver<Phase>),
    /// Answered from the result cache.
    Cached(Box<BuildInfo>),
    /// `capacity` jobs are in flight already.
    Full,
    /// Another request's job is in flight under the only ID this request may have.
    Taken,
}

/// The IDs a request may go by.
#[derive(Debug, Clone, Copy)]
pub enum Ids<'a> {
    /// mistry's ID, unless a job of another request is in flight or on disk under it: then the
    /// exact one. A request with a job under its exact ID (in flight, or a build on disk) keeps
    /// going by it.
    Resolve(&'a JobIds),
    /// This one, which the cluster's job record decided: a build of another request on disk
    /// under it is no answer, and the new build replaces it; another request's job in flight
    /// under it is [`Admission::Taken`].
    Given(&'a str),
}

/// What an ID holds for a request.
enum Slot {
    Free,
    /// This request's job, in flight.
    Flying(watch::Receiver<Phase>),
    /// This request's build on disk.
    Built(Box<BuildInfo>),
    /// Another request's job in flight.
    TheirsFlying,
    /// Another request's build on disk.
    TheirsBuilt,
}

/// The jobs in flight, at most `capacity` at once.
pub struct InFlight {
    jobs: Mutex<HashMap<JobKey, JobRecord>>,
    capacity: usize,
}

impl InFlight {
    /// No job in flight yet; at most `capacity` at once (the engine gives `job_concurrency` +
    /// `job_backlog`), beyond which [`InFlight::admit`] answers [`Admission::Full`].
    pub fn new(capacity: usize) -> InFlight {
        InFlight {
            jobs: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobKey, JobRecord>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admit a request of `project` (`identity`) under one of `ids`, atomically with respect
    /// to every other admission and state change, and say which ID it took: join the same
    /// request's job in flight; else answer from its build on disk (`on_disk(id)`, the stored
    /// BuildInfo, read under the lock so that a job turning ready meanwhile is found there)
    /// when it succeeded and `rebuild` is not asked; else queue a new job if there is room. A
    /// job or build of another request is never an answer (see [`Ids`]).
    pub fn admit(
        &self,
        project: &str,
        ids: Ids<'_>,
        identity: &Identity,
        rebuild: bool,
        on_disk: impl Fn(&str) -> Option<BuildInfo>,
    ) -> (String, Admission) {
        let mut jobs = self.lock();
        let slot = |jobs: &HashMap<JobKey, JobRecord>, id: &str| {
            if let Some(rec) = jobs.get(&JobKey::new(project, id)) {
                return if rec.identity == *identity {
                    Slot::Flying(rec.state.subscribe())
                } else {
                    Slot::TheirsFlying
                };
            }
            match on_disk(id) {
                Some(info) if identity.matches(&info) => Slot::Built(Box::new(info)),
                Some(_) => Slot::TheirsBuilt,
                None => Slot::Free,
            }
        };
        let (id, slot) = match ids {
            Ids::Given(id) => match slot(&jobs, id) {
                Slot::TheirsBuilt => (id, Slot::Free),
                s => (id, s),
            },
            Ids::Resolve(ids) => match slot(&jobs, &ids.mistry) {
                s @ (Slot::Flying(_) | Slot::Built(_)) => (ids.mistry.as_str(), s),
                Slot::Free => match slot(&jobs, &ids.exact) {
                    s @ (Slot::Flying(_) | Slot::Built(_)) => (ids.exact.as_str(), s),
                    _ => (ids.mistry.as_str(), Slot::Free),
                },
                Slot::TheirsFlying | Slot::TheirsBuilt => {
                    let s = slot(&jobs, &ids.exact);
                    announce(&JobKey::new(project, &ids.mistry), "taken", None);
                    (ids.exact.as_str(), s)
                }
            },
        };
        let key = JobKey::new(project, id);
        let admission = match slot {
            Slot::Flying(state) => {
                announce(&key, "coalesced", None);
                Admission::Coalesced(state)
            }
            Slot::TheirsFlying => Admission::Taken,
            Slot::Built(mut info) if info.succeeded() && !rebuild => {
                announce(&key, "cached", None);
                info.cached = true;
                info.coalesced = false;
                Admission::Cached(info)
            }
            Slot::Built(_) | Slot::Free | Slot::TheirsBuilt => {
                if jobs.len() >= self.capacity {
                    Admission::Full
                } else {
                    let (tx, rx) = watch::channel(Phase::Queued);
                    jobs.insert(
                        key.clone(),
                        JobRecord {
                            state: tx,
                            identity: identity.clone(),
                            sandbox: None,
                        },
                    );
                    announce(&key, "queued", None);
                    Admission::Queued(rx)
                }
            }
        };
        (id.to_string(), admission)
    }

    /// The one place a job's state changes: the change is logged and sent to every follower; a
    /// ready job leaves the jobs in flight.
    pub fn set(&self, key: &JobKey, state: Phase) {
        let mut jobs = self.lock();
        let ready = matches!(state, Phase::Ready(_));
        let rec = if ready { jobs.remove(key) } else { None };
        let Some(tx) = rec
            .as_ref()
            .map(|r| &r.state)
            .or(jobs.get(key).map(|r| &r.state))
        else {
            return;
        };
        if let Phase::Ready(info) = &state {
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
    pub fn watch(&self, key: &JobKey) -> Option<watch::Receiver<Phase>> {
        self.lock().get(key).map(|r| r.state.subscribe())
    }

    /// Whether no job is in flight.
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
            tracing::info!(%project, %id, state, "job answered from the result cache");
        }
        ("coalesced", None) => {
            tracing::info!(%project, %id, state, "job joins a running identical job");
        }
        ("taken", None) => tracing::info!(
            %project, %id, "job ID taken by another request's job: going by the request's exact ID"
        ),
        (_, None) => tracing::info!(%project, %id, state, "job state changed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(group: &str, param: &str, exit_code: i32) -> BuildInfo {
        serde_json::from_value(serde_json::json!({
            "Params": {"a": param, "_opaque": "o"}, "Group": group, "Path": "", "Cached": false,
            "Coalesced": false, "Incremental": false, "ExitCode": exit_code, "ErrBuild": "",
            "TransportMethod": "rsync", "StartedAt": "", "Duration": 1, "URL": ""
        }))
        .unwrap()
    }

    fn ok() -> BuildInfo {
        info("", "1", 0)
    }

    fn me() -> Identity {
        Identity::new("", &[("a".to_string(), "1".to_string())].into())
    }

    /// Admit `me()` under exactly `id`, nothing on disk.
    fn admit(jobs: &InFlight, id: &str, on_disk: Option<BuildInfo>) -> Admission {
        jobs.admit("p", Ids::Given(id), &me(), false, |_| on_disk.clone())
            .1
    }

    #[test]
    fn one_record_per_job_through_its_states() {
        let jobs = InFlight::new(2);
        let (a, b, c) = (
            JobKey::new("p", "a"),
            JobKey::new("p", "b"),
            JobKey::new("p", "c"),
        );
        let Admission::Queued(mut rx) = admit(&jobs, "a", None) else {
            panic!("not queued")
        };
        // A job in flight is joined, whatever the result cache holds.
        assert!(matches!(
            jobs.admit("p", Ids::Given("a"), &me(), false, |_| panic!(
                "no cache lookup"
            ))
            .1,
            Admission::Coalesced(_)
        ));
        assert!(matches!(
            admit(&jobs, "b", Some(ok())),
            Admission::Cached(_)
        ));
        // A failed build, or a rebuild, runs again.
        assert!(matches!(
            admit(&jobs, "b", Some(info("", "1", 3))),
            Admission::Queued(_)
        ));
        assert!(matches!(admit(&jobs, "c", None), Admission::Full));
        jobs.set(&a, Phase::Pending);
        assert_eq!(*rx.borrow_and_update(), Phase::Pending);
        jobs.set_sandbox(&a, Some(42));
        assert_eq!(jobs.sandboxes(), [42]);
        jobs.set(&a, Phase::Ready(Arc::new(ok())));
        assert!(matches!(*rx.borrow_and_update(), Phase::Ready(_)));
        assert!(jobs.watch(&a).is_none());
        assert!(jobs.sandboxes().is_empty());
        let rebuild = jobs.admit("p", Ids::Given("c"), &me(), true, |_| Some(ok()));
        assert!(matches!(rebuild.1, Admission::Queued(_)));
        jobs.set(&b, Phase::Ready(Arc::new(ok())));
        jobs.set(&c, Phase::Ready(Arc::new(ok())));
        assert!(jobs.is_empty());
    }

    /// Requests sharing mistry's ID: the first takes it, the other goes by its exact ID,
    /// whichever holds mistry's (a job in flight or a build on disk); neither is answered with
    /// the other's job.
    #[test]
    fn a_request_never_gets_another_requests_job() {
        let ids = JobIds {
            mistry: "m".into(),
            exact: "x-theirs".into(),
        };
        let mine = JobIds {
            mistry: "m".into(),
            exact: "x-mine".into(),
        };
        let theirs = Identity::new("gx1", &Default::default());
        let jobs = InFlight::new(8);
        // Theirs in flight under mistry's ID: mine is queued under its exact ID, then joined
        // there by the same request (opaque params aside), theirs joins theirs.
        let (id, a) = jobs.admit("p", Ids::Resolve(&ids), &theirs, false, |_| None);
        assert!(matches!((id.as_str(), a), ("m", Admission::Queued(_))));
        let (id, a) = jobs.admit("p", Ids::Resolve(&mine), &me(), false, |_| None);
        assert!(matches!((id.as_str(), a), ("x-mine", Admission::Queued(_))));
        let again = Identity::new(
            "",
            &[("a".into(), "1".into()), ("_o".into(), "2".into())].into(),
        );
        let (id, a) = jobs.admit("p", Ids::Resolve(&mine), &again, false, |_| None);
        assert!(matches!(
            (id.as_str(), a),
            ("x-mine", Admission::Coalesced(_))
        ));
        let (id, a) = jobs.admit("p", Ids::Resolve(&ids), &theirs, false, |_| None);
        assert!(matches!((id.as_str(), a), ("m", Admission::Coalesced(_))));
        // Another request's job in flight under the given ID is no answer either.
        assert!(matches!(admit(&jobs, "m", None), Admission::Taken));
        jobs.set(&JobKey::new("p", "m"), Phase::Ready(Arc::new(ok())));
        jobs.set(&JobKey::new("p", "x-mine"), Phase::Ready(Arc::new(ok())));
        // Theirs on disk under mistry's ID: mine goes by its exact ID, a cache hit there.
        let disk = |id: &str| match id {
            "m" => Some(info("gx1", "", 0)),
            "x-mine" => Some(ok()),
            _ => None,
        };
        let (id, a) = jobs.admit("p", Ids::Resolve(&mine), &me(), false, disk);
        assert!(matches!((id.as_str(), a), ("x-mine", Admission::Cached(_))));
        // Mine on disk under its exact ID, mistry's free again: it stays by its exact ID.
        let disk = |id: &str| (id == "x-mine").then(ok);
        let (id, a) = jobs.admit("p", Ids::Resolve(&mine), &me(), false, disk);
        assert!(matches!((id.as_str(), a), ("x-mine", Admission::Cached(_))));
        // Mine on disk under mistry's ID: a cache hit there; nothing anywhere: mistry's ID.
        let disk = |id: &str| (id == "m").then(ok);
        let (id, a) = jobs.admit("p", Ids::Resolve(&mine), &me(), false, disk);
        assert!(matches!((id.as_str(), a), ("m", Admission::Cached(_))));
        let (id, a) = jobs.admit("p", Ids::Resolve(&mine), &me(), false, |_| None);
        assert!(matches!((id.as_str(), a), ("m", Admission::Queued(_))));
        // The cluster's record gave mistry's ID: another request's build on disk there is
        // replaced, not answered.
        let jobs = InFlight::new(8);
        let (id, a) = jobs.admit("p", Ids::Given("m"), &me(), false, |_| {
            Some(info("gx1", "", 0))
        });
        assert!(matches!((id.as_str(), a), ("m", Admission::Queued(_))));
    }
}
