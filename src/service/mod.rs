//! The jobs interface: everything the server, the web view, the pipeline runner and `mistry
//! exec` ask of jobs, whichever back end runs them — [`LocalJobs`] (the engine of this agent)
//! or `cluster::ClusterJobs` (several agents around one PostgreSQL). The server's state holds an
//! `Arc<dyn Jobs>`; its handlers and the pipeline runner know nothing else of the back end.
//!
//! The verbs of a job's life: [`Jobs::submit`] admits a request (queued, joined to the same job
//! in flight, or answered from the result cache) and gives its ID at once; [`Submitted::wait`]
//! its end (the BuildInfo and its directory on this agent). A retrigger is a submit (with
//! `rebuild` to ignore the result cache); what is known of a job comes from [`Jobs::find`]
//! (its [`JobState`] and BuildInfo), [`Jobs::document`], [`Jobs::follow`] and
//! [`Jobs::log_tail`] (its logs), [`Jobs::artifacts`] (its build here), [`Jobs::list`] (every
//! job here). Discarding a build is never asked from outside: the engine's retention and the
//! cluster's copies decide it.

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod lifecycle_tests;
pub(crate) mod local;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream::BoxStream;
use serde::Serialize;

use crate::config::Config;
pub use crate::engine::export::{Export, ExportError};
pub use crate::engine::retention::Hold;
pub use crate::engine::{Found, JobDir, Stage};
pub use crate::jobs::JobError;
use crate::jobs::{BuildInfo, JobRequest};
use crate::metrics::Metrics;
pub use crate::streams::ByteStream;
pub use local::LocalJobs;

/// A job's log, line by line, while it is in flight.
pub type Lines = BoxStream<'static, String>;

/// A boxed future, as the interface's handles hold them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Where a job is in its life, as both back ends report it. The cluster's job records store it
/// as text with a CHECK (`migrations/V2__jobs.sql`); its transitions are the functions
/// below, which both the records' SQL and their in-memory fake follow.
///
/// ```text
///            claim              end(true)
///   Queued ─────────► Running ───────────► Ready ─┐
///     ▲  ◄─────────────┘ │    ──end(false)► Failed ─┤ rerun (a rebuild, a retrigger, a
///     │   unclaim, rescue │                         │ failed job asked again, a build whose
///     └───────────────────┴─────────────────────────┘ agent is gone)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    /// Accepted, waiting for a slot (or, in the cluster, for an agent to claim it).
    Queued,
    /// Running on an agent (its directory is in `pending/`).
    Running,
    /// Ended successfully; its build is in `ready/`.
    Ready,
    /// Ended with a non-zero exit code or an error (`ErrBuild`); its build, if it has one, is in
    /// `ready/`.
    Failed,
}

impl JobState {
    /// Every state, in the order of a job's life.
    pub const ALL: [JobState; 4] = [
        JobState::Queued,
        JobState::Running,
        JobState::Ready,
        JobState::Failed,
    ];

    /// The stored name (the records' `state` column).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Ready => "ready",
            JobState::Failed => "failed",
        }
    }

    /// The state of a stored name.
    pub fn parse(name: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The end a BuildInfo tells: ready when the job succeeded, else failed.
    pub fn of_end(info: &BuildInfo) -> JobState {
        if info.succeeded() {
            JobState::Ready
        } else {
            JobState::Failed
        }
    }

    /// Queued or running.
    pub fn in_flight(self) -> bool {
        matches!(self, JobState::Queued | JobState::Running)
    }

    /// The state `/index/` and the web view show (mistry's): `pending` in flight, else `ready`.
    pub fn shown(self) -> &'static str {
        if self.in_flight() {
            "pending"
        } else {
            "ready"
        }
    }

    /// An agent takes a queued job.
    pub fn claim(self) -> Option<JobState> {
        (self == JobState::Queued).then_some(JobState::Running)
    }

    /// The end of a run, recorded by the agent that ran it: from running, or from queued (the
    /// job was put back in the queue meanwhile, its agent taken for dead, and nobody claimed it
    /// yet: the end found is kept).
    pub fn end(self, succeeded: bool) -> Option<JobState> {
        self.in_flight().then_some(if succeeded {
            JobState::Ready
        } else {
            JobState::Failed
        })
    }

    /// An ended job runs again (a rebuild, a retrigger, a failed job asked for again, a build
    /// whose agent is not alive).
    pub fn rerun(self) -> Option<JobState> {
        (!self.in_flight()).then_some(JobState::Queued)
    }

    /// A running job goes back to the queue: its agent died (the rescue counts a retry), or it
    /// cannot run it now (an unclaim).
    pub fn requeue(self) -> Option<JobState> {
        (self == JobState::Running).then_some(JobState::Queued)
    }

    /// The states `transition` leaves from (what a conditional update of the records checks).
    pub fn sources(transition: impl Fn(JobState) -> Option<JobState>) -> Vec<JobState> {
        JobState::ALL
            .into_iter()
            .filter(|s| transition(*s).is_some())
            .collect()
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job's end: its BuildInfo (without the log fields) and its directory on this agent, which
/// holds `out.log`, `stderr.log` and the artifacts.
pub struct Answer {
    /// The job's BuildInfo (`ContainerStdouterr` and `ContainerStderr` empty).
    pub info: BuildInfo,
    /// Its build's directory on this agent (`<build_path>/<project>/ready/<id>`).
    pub dir: JobDir,
}

/// An admitted job ([`Jobs::submit`]): its ID at once, its end by [`Submitted::wait`]. Dropped
/// without waiting (`POST /jobs?async`), the job goes on.
pub struct Submitted {
    /// The job's project.
    pub project: String,
    /// Its job ID (mistry's, or the exact one when mistry's is another request's).
    pub id: String,
    /// Its directory on this agent once it ended.
    pub dir: JobDir,
    /// `Some(true)`: answered from the result cache; `Some(false)`: it runs (or ran) for this
    /// request; `None`: not known before the end (several agents: a copy of another agent's
    /// build is a result-cache hit too).
    pub cached: Option<bool>,
    /// Resolves once the job runs (never, for one that does not run for this request); take it
    /// to follow the job's start while waiting for its end.
    pub started: Option<BoxFuture<()>>,
    end: BoxFuture<Result<Answer, JobError>>,
}

impl Submitted {
    /// A submitted job of `project` under `id` whose end `end` gives.
    pub fn new(
        project: &str,
        id: &str,
        dir: JobDir,
        cached: Option<bool>,
        started: Option<BoxFuture<()>>,
        end: BoxFuture<Result<Answer, JobError>>,
    ) -> Submitted {
        Submitted {
            project: project.to_string(),
            id: id.to_string(),
            dir,
            cached,
            started,
            end,
        }
    }

    /// Wait for the job's end.
    pub async fn wait(self) -> Result<Answer, JobError> {
        self.end.await
    }
}

/// A job as its record in the cluster shows it, for a job that is not on this agent's disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The job's project.
    pub project: String,
    /// Its job ID.
    pub id: String,
    /// The record's state: queued, running, ready or failed.
    pub state: JobState,
    /// The agent that runs or ran it (`None` while queued).
    pub agent: Option<String>,
    /// The stored BuildInfo (logs not included), or a blank one while it has not ended.
    pub info: BuildInfo,
}

impl Recorded {
    /// The job as `/index/` and the web view show it (`state`: `pending` or `ready`, as a job
    /// on disk).
    pub fn json(&self) -> serde_json::Value {
        entry(&self.project, &self.id, &self.info, self.state.shown())
    }
}

/// A job found: on this agent's disk, or (several agents) by its record.
pub enum JobView {
    /// The job is on this agent's disk (`pending/` or `ready/`).
    Here(Found),
    /// The job is known only by its cluster record.
    Elsewhere(Recorded),
}

impl JobView {
    /// On disk: running while in `pending/`, else its end; elsewhere: the record's state.
    pub fn state(&self) -> JobState {
        match self {
            JobView::Here(f) => found_state(f),
            JobView::Elsewhere(r) => r.state,
        }
    }

    /// Its BuildInfo (logs not included; blank while the job has not ended).
    pub fn info(&self) -> &BuildInfo {
        match self {
            JobView::Here(f) => &f.info,
            JobView::Elsewhere(r) => &r.info,
        }
    }

    /// The job as `/index/` and the web view show it: `id`, `project`, `startedAt`,
    /// `buildInfo`, `state` (`pending` or `ready`).
    pub fn json(&self) -> serde_json::Value {
        match self {
            JobView::Here(f) => index_entry(f),
            JobView::Elsewhere(r) => r.json(),
        }
    }
}

/// The state of a job found on disk: running while in `pending/`, else its end.
pub fn found_state(f: &Found) -> JobState {
    match f.stage {
        Stage::Pending => JobState::Running,
        Stage::Ready => JobState::of_end(&f.info),
    }
}

/// `Mon, 02 Jan 2006 15:04:05`, as mistry's index shows times.
pub fn index_time(rfc3339: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.format("%a, %d %b %Y %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn entry(project: &str, id: &str, info: &BuildInfo, state: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "project": project,
        "startedAt": index_time(&info.started_at),
        "buildInfo": info,
        "state": state,
    })
}

/// A job on disk as `/index/` and the web view show it.
pub fn index_entry(f: &Found) -> serde_json::Value {
    entry(f.dir.project(), f.dir.id(), &f.info, f.stage.as_str())
}

/// A job's JSON object (`entry`, from [`JobView::json`]) without its `buildInfo`, left open
/// before it: what precedes the BuildInfo when it is streamed with its logs.
pub fn document_prefix(mut entry: serde_json::Value) -> String {
    if let Some(obj) = entry.as_object_mut() {
        obj.remove("buildInfo");
    }
    let head = serde_json::to_string(&entry).unwrap_or_else(|_| "{}".into());
    format!("{},\"buildInfo\":", &head[..head.len() - 1])
}

/// The last bytes of a job's `out.log` ([`Jobs::log_tail`]).
pub struct LogTail {
    /// The log's whole size.
    pub size: u64,
    /// The bytes from the requested offset to the end of the log as it is now.
    pub bytes: ByteStream,
}

/// One agent, as `GET /agents` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentInfo {
    /// Its `agent_name`.
    pub name: String,
    /// `advertise_url` (derived from the listening address when not configured).
    pub advertise_url: String,
    /// Its `job_concurrency`.
    pub capacity: i64,
    /// Jobs running on it at its last heartbeat.
    pub running: i64,
    /// Its mistryd version ([`VERSION`]).
    pub version: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// RFC 3339, UTC.
    pub last_heartbeat: String,
    /// Seconds since its last heartbeat, by the database's clock.
    pub heartbeat_age: f64,
    /// Not stopped, and a heartbeat within the `agent_timeout` of the agent answering.
    pub alive: bool,
    /// `alive`, `stale` (no heartbeat for `agent_timeout`) or `stopped` (shut down gracefully).
    pub state: String,
    /// Whether it is the agent answering.
    pub this: bool,
}

/// This mistryd's version, as agents report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The cluster's job list's default length.
pub const CLUSTER_JOBS_DEFAULT: i64 = 200;
/// The cluster's job list's longest.
pub const CLUSTER_JOBS_MAX: i64 = 5000;

/// A filter of the cluster's job list that is not valid (the 400's text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// A `state` filter that is not a job state; names it.
    #[error("Unknown state '{0}': give queued, running, pending, ready or failed")]
    State(String),
    /// A `limit` outside `1..=`[`CLUSTER_JOBS_MAX`]; names it.
    #[error("limit must be between 1 and {max}, got {0}", max = CLUSTER_JOBS_MAX)]
    Limit(i64),
}

/// The filters of the cluster's job list (`GET /api/cluster/jobs`), checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterJobsFilter {
    /// Only jobs run by the agent of this name; `None`: any agent.
    pub agent: Option<String>,
    /// Only jobs of this project; `None`: every project.
    pub project: Option<String>,
    /// The record states wanted (`None`: all).
    pub states: Option<Vec<JobState>>,
    /// The most jobs listed: 1 to [`CLUSTER_JOBS_MAX`], default [`CLUSTER_JOBS_DEFAULT`].
    pub limit: i64,
    /// Only the projects the caller may read (access control), applied inside the statement so
    /// that `limit` counts only those; `None`: every project.
    pub readable: Option<Readable>,
}

/// Which projects a list may show: the caller's grant, asked of each project name.
#[derive(Clone)]
pub struct Readable(pub Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl Readable {
    /// Whether `project` may be listed.
    pub fn allows(&self, project: &str) -> bool {
        (self.0)(project)
    }
}

impl std::fmt::Debug for Readable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Readable(..)")
    }
}

impl PartialEq for Readable {
    fn eq(&self, other: &Readable) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Readable {}

impl ClusterJobsFilter {
    /// Check a query's values (`state`: a record state or `pending`, i.e. queued or running);
    /// the error is the 400's text.
    pub fn new(
        agent: Option<String>,
        project: Option<String>,
        state: Option<&str>,
        limit: Option<i64>,
    ) -> Result<ClusterJobsFilter, FilterError> {
        let states = match state {
            None | Some("") => None,
            Some("pending") => Some(vec![JobState::Queued, JobState::Running]),
            Some(s) => match JobState::parse(s) {
                Some(one) => Some(vec![one]),
                None => return Err(FilterError::State(s.to_string())),
            },
        };
        let limit = limit.unwrap_or(CLUSTER_JOBS_DEFAULT);
        if !(1..=CLUSTER_JOBS_MAX).contains(&limit) {
            return Err(FilterError::Limit(limit));
        }
        let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
        Ok(ClusterJobsFilter {
            agent: nonempty(agent),
            project: nonempty(project),
            states,
            limit,
            readable: None,
        })
    }
}

/// What the server, the web view, the pipeline runner and `mistry exec` ask of jobs (see the
/// module's doc). Blocking methods say so; the others never block the runtime's threads.
#[async_trait::async_trait]
pub trait Jobs: Send + Sync {
    /// The daemon's configuration.
    fn config(&self) -> &Config;

    /// The daemon's metrics.
    fn metrics(&self) -> &Metrics;

    /// Admit a request: validated, identified, and queued — or joined to the same job in
    /// flight, or answered from the result cache (unless `rebuild`). 400, 404, 503 as
    /// [`JobError`] says.
    async fn submit(&self, req: JobRequest) -> Result<Submitted, JobError>;

    /// Job `project/id`: on this agent's disk, else (several agents) by its record; `None` for
    /// an unknown job (or invalid names).
    async fn find(&self, project: &str, id: &str) -> Result<Option<JobView>, JobError>;

    /// Job `project/id` as `GET /job` shows it in JSON: [`JobView::json`] with the BuildInfo's
    /// log fields filled from its logs, streamed (never whole in memory); `None` for an unknown
    /// job.
    async fn document(&self, project: &str, id: &str) -> Result<Option<ByteStream>, JobError>;

    /// The lines of job `project/id`'s `out.log` while it is in flight, until it ends; `None`
    /// when it is not in flight.
    async fn follow(&self, project: &str, id: &str) -> Result<Option<Lines>, JobError>;

    /// The last `last` bytes of job `project/id`'s `out.log` (all of it without `last`);
    /// `None` for an unknown job.
    async fn log_tail(
        &self,
        project: &str,
        id: &str,
        last: Option<u64>,
    ) -> Result<Option<LogTail>, JobError>;

    /// Job `project/id` on this agent's disk, for its artifacts (several agents: a build that
    /// ended on another agent is fetched here first); `None` when it is not to be had.
    async fn artifacts(&self, project: &str, id: &str) -> Option<Found>;

    /// Keep ready build `project/id` of this agent from retention while the guard lives (a
    /// pipeline's upstream build until its run ends).
    fn hold(&self, project: &str, id: &str) -> Option<Hold>;

    /// Every job on this agent's disk, newest first, read as the caller goes (blocking).
    fn list(&self) -> Box<dyn Iterator<Item = Found> + Send + '_>;

    /// The cluster's job list (the records, newest first, each as an `/index/` entry with
    /// `agent`, `clusterState` and `retries`); `None` on a single node.
    async fn cluster_jobs(
        &self,
        filter: &ClusterJobsFilter,
    ) -> Result<Option<Vec<serde_json::Value>>, JobError>;

    /// Which agent ran each job (`<project>/<id>` → agent): this agent's jobs on disk, and
    /// (several agents) the records; `only`: that one job.
    async fn job_agents(
        &self,
        only: Option<(String, String)>,
    ) -> Result<BTreeMap<String, String>, JobError>;

    /// Every agent, or this one alone on a single node.
    async fn agents(&self) -> Result<Vec<AgentInfo>, JobError>;

    /// How many jobs may run at once: `job_concurrency`, or (several agents) the capacity of
    /// the alive agents.
    async fn capacity(&self) -> usize;

    /// Before `/metrics` renders: the gauges read from elsewhere (the cluster's), if any.
    async fn refresh_gauges(&self);

    /// Ready build `project/id` of this agent, for another agent (blocking).
    fn export(&self, project: &str, id: &str, with_cache: bool) -> Result<Export, ExportError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_their_transitions() {
        use JobState::*;
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobState::parse("pending"), None);
        assert_eq!(Queued.claim(), Some(Running));
        assert_eq!(Running.claim(), None);
        assert_eq!(Ready.claim(), None);
        assert_eq!(Running.end(true), Some(Ready));
        assert_eq!(Running.end(false), Some(Failed));
        // A late end of a rescued job, not claimed again yet, is kept.
        assert_eq!(Queued.end(true), Some(Ready));
        assert_eq!(Ready.end(true), None);
        assert_eq!(Failed.rerun(), Some(Queued));
        assert_eq!(Ready.rerun(), Some(Queued));
        assert_eq!(Running.rerun(), None);
        assert_eq!(Running.requeue(), Some(Queued));
        assert_eq!(Queued.requeue(), None);
        assert_eq!(JobState::sources(JobState::claim), [Queued]);
        assert_eq!(JobState::sources(|s| s.end(true)), [Queued, Running]);
        assert_eq!(JobState::sources(JobState::rerun), [Ready, Failed]);
        assert_eq!(JobState::sources(JobState::requeue), [Running]);
        assert_eq!(
            (Queued.shown(), Running.shown(), Failed.shown()),
            ("pending", "pending", "ready")
        );
    }

    #[test]
    fn states_have_their_stored_names_and_ends() {
        use crate::engine::layout::Layout;
        use JobState::*;
        let names: Vec<String> = JobState::ALL.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["queued", "running", "ready", "failed"]);
        assert_eq!(
            JobState::ALL.map(JobState::as_str),
            ["queued", "running", "ready", "failed"]
        );
        assert_eq!(JobState::parse("running"), Some(Running));
        assert_eq!(JobState::parse(""), None);
        assert_eq!(
            JobState::ALL.map(JobState::in_flight),
            [true, true, false, false]
        );
        assert_eq!(Ready.shown(), "ready");
        let mut info: BuildInfo = serde_json::from_value(serde_json::json!({
            "Params": {}, "Group": "", "Path": "p", "Cached": false, "Coalesced": false,
            "Incremental": false, "ExitCode": 0, "ErrBuild": "", "TransportMethod": "rsync",
            "StartedAt": "t", "Duration": -1, "URL": "u"
        }))
        .unwrap();
        assert_eq!(JobState::of_end(&info), Ready);
        let layout = Layout::new("/nonexistent");
        let found = |stage: Stage, info: &BuildInfo| Found {
            stage,
            info: info.clone(),
            dir: layout.job("p", "id", stage),
        };
        assert_eq!(found_state(&found(Stage::Ready, &info)), Ready);
        assert_eq!(found_state(&found(Stage::Pending, &info)), Running);
        info.exit_code = 2;
        assert_eq!(JobState::of_end(&info), Failed);
        assert_eq!(found_state(&found(Stage::Ready, &info)), Failed);
        info.exit_code = 0;
        info.err_build = "x".into();
        assert_eq!(JobState::of_end(&info), Failed);
    }

    #[test]
    fn the_cluster_job_lists_filters_are_checked() {
        let f = |state: Option<&str>, limit: Option<i64>| {
            ClusterJobsFilter::new(Some(String::new()), None, state, limit)
        };
        assert_eq!(
            f(None, None),
            Ok(ClusterJobsFilter {
                agent: None,
                project: None,
                states: None,
                limit: CLUSTER_JOBS_DEFAULT,
                readable: None,
            })
        );
        assert_eq!(
            f(Some("pending"), Some(5000)).unwrap().states,
            Some(vec![JobState::Queued, JobState::Running])
        );
        assert_eq!(
            f(Some("failed"), None).unwrap().states,
            Some(vec![JobState::Failed])
        );
        assert_eq!(
            f(Some("Ready"), None).unwrap_err().to_string(),
            "Unknown state 'Ready': give queued, running, pending, ready or failed"
        );
        assert_eq!(
            f(None, Some(0)).unwrap_err().to_string(),
            "limit must be between 1 and 5000, got 0"
        );
    }
}
