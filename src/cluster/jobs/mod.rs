//! One job, one run, cluster-wide: job records in the database (table `jobs`, migration V2),
//! claims, placement, coalescing between agents, and the recovery of an agent's death.
//!
//! A request on any agent (`ClusterJobs::submit`: [`Scheduler::look_up`], then
//! [`Scheduler::admit`] and [`Scheduler::finish`]):
//! 1. its job IDs are computed as a single node does ([`Engine::job_ids_of`]); a local build
//!    of this very request (the same group and params but the opaque ones) that succeeded, in
//!    `ready/<id>`, is a result-cache hit as always (unless `rebuild`);
//! 2. else the job's record decides — under mistry's ID, unless that record is another
//!    request's (mistry's ID is ambiguous, see [`crate::jobs::JobIds`]): then under the
//!    request's exact ID; a record of another request is never an answer: `ready` on another live agent → the build is fetched from
//!    it (`copies::fetch_build`) and answered `Cached: true`, `Path` local to this agent;
//!    `queued` or `running` → the request waits for the job's end (`Coalesced: true`): one
//!    `LISTEN` connection per agent (`listen.rs`) fans notifications out to every waiter (no
//!    polling; a 30 s re-read is only a safety net), then the build is fetched from the agent
//!    that ran it when that is another one; no record → `INSERT ... ON CONFLICT DO NOTHING`
//!    (the primary key decides the race between agents) — `running` by this agent at once when
//!    it has a free slot and is the job's preferred agent (placement, below), else `queued`
//!    with its preferred agent — and the request waits like the others; `failed`, `ready` on an
//!    agent that is not alive, or `rebuild` → the record is queued again, with its preferred
//!    agent (a conditional update: again the database decides).
//! 3. `job_backlog`'s 503: the cluster's queue is full when its queued records are at least
//!    the free slots of the alive agents (capacity − their `running` records) plus the
//!    `job_backlog` of the agent taking the request — a single node's "running + queued ≤
//!    job_concurrency + job_backlog", cluster-wide; checked by the insert itself (one
//!    statement), and never for a job inserted `running` here at once (it joins no queue).
//!
//! Round trips of a new job run where it was asked (each statement prepared once per pooled
//! connection, `prepare_cached`: one round trip each): its two possible records read in one
//! statement; the insert (placement, backlog and notification included); the log's start, its
//! chunks and its end's notification (`logs/ship.rs`, beside the run); the run's fence before
//! the build is published; the end recorded. The waiter reads the record only when the end is
//! not one this agent recorded itself ([`Scheduler::finish`]).
//!
//! Claims ([`Scheduler::start`]'s claim loop): while this agent runs fewer claimed jobs than
//! `job_concurrency`, it takes the oldest queued record it may take with
//! `SELECT ... FOR UPDATE SKIP LOCKED` and marks it `running` by itself (one statement), woken
//! by the notification of an insert, by a slot freed here while queued records were left (a
//! freed slot with nothing queued asks nothing), and by a safety tick (1 s while queued jobs
//! are left, else 5 s).
//! Placement: a job's `preferred_agent` is the agent holding its group's last successful
//! build, when it is alive; else the agent taking the request, when it has the project's image
//! (table `agent_images`, migration V4: an agent records the project of every job that ran in
//! its container) and a free slot — the job is then inserted `running` there, and its answer
//! needs no copy — or a short wait for one: it is not *busy* (none of its running jobs started
//! over `records::jobs::BRIEF_RUN` ago) and fewer jobs are queued for it than its capacity —
//! the job is then inserted `running` there too when that agent is the one taking the request
//! and has a place in its own queue ([`Scheduler::wait_briefly`]: it waits there for a slot,
//! as in a single node, and goes back to the cluster's queue after [`LOCAL_WAIT`]), else
//! queued for it; else an alive agent with free capacity that has the
//! project's image; else the least loaded alive agent (`running` records / capacity); ties go
//! to the agent taking the request. The trade-off (docs/cluster.md, "Placement"): load spreads
//! only once the agent asked is busy or lacks the image — a short job run where it was asked,
//! even after a short wait, costs less than one run on an idler agent and fetched back
//! (`copies::fetch_build`), and an agent never runs more than its `job_concurrency`. A job
//! whose `preferred_agent` is another one is left alone for [`PREFERRED_GRACE`], unless that
//! agent is not alive, or full (as many `running` records as its capacity) and busy: the job
//! would wait long.
//! The claimed job runs through the local engine ([`Engine::schedule`]: its result cache,
//! groups, sandbox and `ready/` all apply); once the engine moved it to `ready/`, the record
//! says `ready` (or `failed`) with its BuildInfo, and the end is notified.
//!
//! A group's chain that moves to this agent starts from the last successful build of the
//! group, fetched with its cache from the agent holding it (log: `incremental from <agent>'s
//! build P/ID`), or clean when that agent is not alive (`Incremental: false`, logged too).
//!
//! Failures: every `heartbeat`, the sweeper puts the `running` records of agents that stopped
//! heartbeating for `agent_timeout` back in the queue (`retries` + 1); the re-run's log gets a
//! note line saying so. Silence is judged only once the database and this agent's connection to
//! it have been up for `agent_timeout` (an outage silences every agent; none of them died). At start, this agent heals the records it left `running` (a crash): a
//! build found in its `ready/` is recorded, any other is queued again. A database outage makes
//! requests fail with 503 naming the database; the listener reconnects every second and wakes
//! every waiter to read its job again.
//!
//! Copies: a job that ends again (a rebuild, a re-run) drops the other agents' copies of its
//! old build — on the end's notification, and at an agent's start for what it missed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};

mod janitor;
mod slots;
mod submit;
mod worker;

use super::copies;
use super::listen::Notice;
use super::records::jobs::{self as rows, Claimed as Claim};
use super::records::{self, is_stale, request_from_json, request_json, Record, RecordsError};
use super::{Cluster, ClusterError};
use crate::engine::{Engine, JobDir, JobError, Stage};
use crate::jobs::{BuildInfo, Identity, JobIds, JobRequest};
use crate::service::JobState;

/// A build of a request found in this agent's `ready/` (its BuildInfo and directory).
pub type LocalHit = (BuildInfo, JobDir);

pub use super::JOBS_CHANNEL as CHANNEL;
/// How long other agents leave a job to its preferred agent.
pub const PREFERRED_GRACE: Duration = Duration::from_secs(1);
/// A waiter reads its job's record again after this long without a notification (a safety
/// net; notifications are what wakes it).
const SAFETY_RECHECK: Duration = Duration::from_secs(30);
/// A wait for a job to run reads its record again after this long without a notification (a
/// safety net: the claim's notification wakes it).
const RUNNING_RECHECK: Duration = Duration::from_secs(5);
/// At most this often, every copy here is checked against its record (see `stale_loop`).
const CHECK_COPIES_EVERY: Duration = Duration::from_secs(5);
/// The oldest a run's fence's answer, asked when its job ended, may be when the build is
/// about to be published (the build's checks took longer: it is asked again).
const EARLY_FENCE: Duration = Duration::from_millis(50);
/// How long a run's fence waits for the database to answer before the build is published
/// anyway (its end, recorded later, is fenced too: a superseded build is then discarded).
const FENCE_PATIENCE: Duration = Duration::from_secs(600);
/// The pause before a request reads its job's record again after a write whose answer was
/// lost.
const LOST_REPLY_PAUSE: Duration = Duration::from_millis(200);
/// How long a job inserted `running` here waits for a slot here before it goes back to the
/// cluster's queue (`Scheduler::spawn_waiting`): other agents leave a job to its preferred
/// agent as long.
const LOCAL_WAIT: Duration = PREFERRED_GRACE;
/// How long a stopping agent waits for the runs waiting here for a slot to go back to the
/// cluster's queue (`Scheduler::stop_waiters`).
const STOP_PATIENCE: Duration = Duration::from_secs(5);
/// How long the fence and the sweeper wait for one statement's answer before they take the
/// database for unreachable.
const STATEMENT_PATIENCE: Duration = Duration::from_secs(5);
/// The longest wait before a job that lost its agent runs again.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The wait before the next run of a job put back in the queue after losing its agent
/// `retries` times before: 1s, 2s, 4s, ... at most [`MAX_BACKOFF`].
fn backoff(retries: i32) -> Duration {
    let exp = u32::try_from(retries.clamp(0, 16)).unwrap_or(0);
    Duration::from_secs(1u64 << exp).min(MAX_BACKOFF)
}

/// Why a request could not be answered through the cluster.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// As a single node answers (400, 404, 503, 500).
    #[error("{0}")]
    Job(JobError),
    /// 503: the database does not answer.
    #[error("Service unavailable: {0}")]
    Database(#[from] ClusterError),
    /// 503: the build is on another agent and could not be fetched from it.
    #[error("Service unavailable: {0}")]
    Replication(String),
}

impl SubmitError {
    /// The HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            SubmitError::Job(JobError::BadRequest(_)) => 400,
            SubmitError::Job(JobError::UnknownProject(_)) => 404,
            SubmitError::Job(JobError::Overloaded | JobError::Unavailable(_)) => 503,
            SubmitError::Job(JobError::Internal(_)) => 500,
            SubmitError::Database(_) | SubmitError::Replication(_) => 503,
        }
    }
}

impl From<JobError> for SubmitError {
    fn from(e: JobError) -> Self {
        SubmitError::Job(e)
    }
}

/// A request's answer: the BuildInfo and the local directory holding its logs and artifacts.
pub struct Answer {
    /// The build's BuildInfo, as the API returns it (`path`: the artifacts on this agent).
    pub info: BuildInfo,
    /// The job's directory on this agent (`<build_path>/<project>/{pending,ready}/<id>`).
    pub dir: JobDir,
}

/// An admitted request ([`Scheduler::admit`]).
pub enum Admission {
    /// Answered from this agent's result cache.
    Answered(Answer),
    /// Its job is queued or running in the cluster (inserted, queued again, or joined).
    Waiting(Waiting),
    /// Its job ended successfully on another alive agent: that build's copy answers.
    Copy(Copy),
}

impl Admission {
    /// The ID the job goes by.
    pub fn id(&self) -> &str {
        match self {
            Admission::Answered(a) => a.dir.id(),
            Admission::Waiting(w) => &w.id,
            Admission::Copy(c) => &c.id,
        }
    }
}

/// A job in flight in the cluster that a request waits for.
pub struct Waiting {
    project: String,
    id: String,
    identity: Identity,
    events: broadcast::Receiver<Event>,
    /// The ends this agent recorded, told here before their notification comes back.
    ended_here: broadcast::Receiver<EndedHere>,
    coalesced: bool,
}

/// A job that ended successfully on another agent, to copy here.
pub struct Copy {
    project: String,
    id: String,
    identity: Identity,
    rec: Record,
}

/// An end this agent recorded ([`Scheduler::ended_here`]): the job's key, and the BuildInfo
/// of its build in `ready/` when the run published one (`None`: a refusal, without a build).
type EndedHere = (String, Option<Arc<BuildInfo>>);

/// What the listener tells waiters and the claim loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Event {
    /// A job was queued (work to claim).
    Queued,
    /// Job `<project>/<id>` was claimed: it runs.
    Running(String),
    /// Job `<project>/<id>` ended.
    Ended(String),
    /// The listener (re)connected: notifications may have been missed; read again.
    Reconnected,
}

/// The cluster's job scheduler of one agent.
pub struct Scheduler {
    cluster: Arc<Cluster>,
    engine: Arc<Engine>,
    events: broadcast::Sender<Event>,
    /// Each end this agent recorded, as soon as it did (with the record's build verified
    /// here): its waiters answer without waiting for the notification's way back.
    ended_here: broadcast::Sender<EndedHere>,
    /// This agent's slots, and the places of the runs waiting here for one: who gets the next
    /// slot given back (the runs waiting here and the claim loop take turns).
    slots: slots::Slots,
    /// The builds whose end this agent recorded lately (key → `StartedAt`): their end's
    /// notification is no news for the stale-copy check (one query less per job). A missed
    /// notification leaves an entry; entries count for a minute, and a reconnection checks
    /// every copy anyway.
    recorded: std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
    /// The runs this agent runs now, or that wait here for a slot (key → the run): a `running`
    /// record of this agent that is not one of them is an orphan (a lost reply), put back in
    /// the queue.
    runs: std::sync::Mutex<std::collections::HashMap<String, RunHere>>,
    /// The jobs requests here are inserting now (key → how many requests): a record of this
    /// agent's among them is no orphan yet.
    inserting: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// Builds in this agent's `ready/` known to be the ones their records name: answered
    /// without reading the record (see [`Verified`]).
    verified: std::sync::Mutex<Verified>,
    /// The ends this agent is recording now, whose notifications are not news (each one
    /// consumes its key; a reconnection of the listener clears them).
    own_ends: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Since when this agent reaches the database without a break (the sweeper's pings):
    /// until it has for `agent_timeout`, it takes nobody for dead ([`Scheduler::judged`]).
    reached_since: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// One of this agent's runs ([`Scheduler::runs`]).
#[derive(Debug, Clone, Copy)]
struct RunHere {
    /// Its claim's attempt.
    attempt: i32,
    /// Since when it holds a slot (`None`: it waits for one, or gave its slot back and
    /// records its end).
    since: Option<std::time::Instant>,
}

/// Builds in this agent's `ready/` known to be the ones their records name (key →
/// `StartedAt`). A job's end or its queueing to run anew (their notifications) removes its key,
/// a reconnection of the listener every key; each removal starts a new epoch, and what was
/// learnt from a record read in an older epoch is not kept (the record may have changed since).
#[derive(Default)]
struct Verified {
    epoch: u64,
    builds: std::collections::HashMap<String, String>,
}

/// A claimed run's fence (`engine::Fence`): whether the run, as its attempt, may still
/// publish its build, asked of the records once its job ended — the question sent as the
/// sandbox is gone, its answer taken on the run's thread after the build's checks, so that
/// the round trip overlaps them. An answer asked over [`EARLY_FENCE`] before the move is asked
/// again (a build whose checks took longer costs a second question): the records' word is at
/// most that much older than when it was asked just before the move, and the end's record,
/// `… AND attempt = N`, fences what moved on meanwhile, as it did. While the database does not
/// answer, asked again every second for [`FENCE_PATIENCE`], then the build is published (and
/// fenced at its end's record if the record moved on).
struct RunFence {
    cluster: Arc<Cluster>,
    handle: tokio::runtime::Handle,
    project: String,
    id: String,
    attempt: i32,
    fenced: std::sync::atomic::AtomicBool,
    /// The first answer, asked when the job ended ([`crate::engine::Fence::ended`]), and when.
    early: std::sync::Mutex<Option<EarlyAnswer>>,
}

/// [`RunFence`]'s question sent when the job ended: when, and its answer to come.
type EarlyAnswer = (
    std::time::Instant,
    tokio::task::JoinHandle<Result<bool, ClusterError>>,
);

impl RunFence {
    /// Ask the records once (at most [`STATEMENT_PATIENCE`]: a connection that hangs, a
    /// partition that drops packets, is an error too).
    async fn ask(
        cluster: Arc<Cluster>,
        (project, id, attempt): (String, String, i32),
    ) -> Result<bool, ClusterError> {
        let ask = async {
            let (client, err) = cluster.records_client().await?;
            rows::fence_holds(&client, &project, &id, cluster.name(), attempt)
                .await
                .map_err(err)
        };
        tokio::time::timeout(STATEMENT_PATIENCE, ask)
            .await
            .unwrap_or_else(|_| Err(cluster.no_answer(STATEMENT_PATIENCE)))
    }

    fn question(&self) -> (String, String, i32) {
        (self.project.clone(), self.id.clone(), self.attempt)
    }
}

impl crate::engine::Fence for RunFence {
    fn ended(&self) {
        // Before the question goes: its answer is no older than this.
        let asked = std::time::Instant::now();
        let task = self
            .handle
            .spawn(Self::ask(Arc::clone(&self.cluster), self.question()));
        if let Ok(mut early) = self.early.lock() {
            *early = Some((asked, task));
        }
    }

    fn holds(&self) -> bool {
        let deadline = std::time::Instant::now() + FENCE_PATIENCE;
        let mut warned = false;
        let mut early =
            self.early
                .lock()
                .ok()
                .and_then(|mut e| e.take())
                .and_then(|(asked, task)| {
                    if asked.elapsed() <= EARLY_FENCE {
                        Some(task)
                    } else {
                        task.abort();
                        None
                    }
                });
        loop {
            let asked = match early.take().map(|task| self.handle.block_on(task)) {
                Some(Ok(answer)) => answer,
                // Not asked yet, asked too early, or the question's task was cancelled.
                _ => self
                    .handle
                    .block_on(Self::ask(Arc::clone(&self.cluster), self.question())),
            };
            match asked {
                Ok(holds) => {
                    self.fenced.store(!holds, Ordering::SeqCst);
                    return holds;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    if !warned {
                        tracing::warn!(project = %self.project, id = %self.id, error = %e, "the job ended; its build waits for the database before it is published");
                        warned = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(_) => return true,
            }
        }
    }
}

fn key_of(project: &str, id: &str) -> String {
    format!("{project}/{id}")
}

impl Scheduler {
    /// The scheduler of `cluster` (which must have a database) running jobs on `engine`.
    pub(super) fn new(cluster: Arc<Cluster>, engine: Arc<Engine>) -> Scheduler {
        let slots = slots::Slots::new(engine.cfg.job_concurrency, engine.cfg.job_backlog);
        Scheduler {
            cluster,
            engine,
            events: broadcast::channel(4096).0,
            ended_here: broadcast::channel(1024).0,
            slots,
            recorded: Default::default(),
            runs: Default::default(),
            inserting: Default::default(),
            verified: Default::default(),
            own_ends: Default::default(),
            reached_since: Default::default(),
        }
    }

    /// The timeout this agent judges other agents' liveness by now: `agent_timeout` once it
    /// has reached the database for that long without a break, else [`records::UNJUDGED`]
    /// (after its own outage, every agent's heartbeats may look old: none is taken for dead).
    fn judged(&self) -> Duration {
        let reached = self.reached_since.lock().ok().and_then(|r| *r);
        match reached {
            Some(t) if t.elapsed() >= self.cluster.agent_timeout => self.cluster.agent_timeout,
            _ => records::UNJUDGED,
        }
    }

    /// Whether this agent runs attempt `attempt` of `key` now, or may be about to (a request
    /// here is inserting the job: its run starts once the insert answers).
    fn runs_now(&self, key: &str, attempt: i32) -> bool {
        self.inserting.lock().is_ok_and(|i| i.contains_key(key))
            || self
                .runs
                .lock()
                .is_ok_and(|r| r.get(key).is_some_and(|run| run.attempt == attempt))
    }

    /// The epoch of what this agent knows of its builds (see [`Verified`]): taken before a
    /// record is read.
    fn epoch(&self) -> u64 {
        self.verified.lock().map_or(0, |v| v.epoch)
    }

    /// Build `key` (`StartedAt` `started`) here is the record's, as read in epoch `since`
    /// (nothing is kept when the epoch moved on since).
    fn verify(&self, key: String, started: &str, since: u64) {
        if let Ok(mut v) = self.verified.lock() {
            if v.epoch == since {
                v.builds.insert(key, started.to_string());
            }
        }
    }

    /// Whether build `key` (`StartedAt` `started`) here is known to be the record's.
    fn is_verified(&self, key: &str, started: &str) -> bool {
        self.verified
            .lock()
            .is_ok_and(|v| v.builds.get(key).is_some_and(|s| s == started))
    }

    /// Forget what this agent knows of build `key` (`None`: of every build); a new epoch.
    fn forget(&self, key: Option<&str>) {
        if let Ok(mut v) = self.verified.lock() {
            v.epoch += 1;
            match key {
                Some(k) => {
                    v.builds.remove(k);
                }
                None => v.builds.clear(),
            }
        }
    }

    fn db(&self) -> Result<&super::Db, ClusterError> {
        self.cluster.need_db()
    }

    /// A pooled connection, and how its statements' errors name the database.
    async fn client(
        &self,
    ) -> Result<
        (
            deadpool_postgres::Object,
            impl Fn(RecordsError) -> ClusterError + '_,
        ),
        ClusterError,
    > {
        self.cluster.records_client().await
    }

    pub(super) fn me(&self) -> &str {
        self.cluster.name()
    }

    /// The tasks of this agent: the start-up healing pass, then the claim loop, and the
    /// sweeper, until `stop` turns true (the agent's listener calls [`Scheduler::notified`]).
    pub(super) fn start(self: &Arc<Self>, stop: watch::Receiver<bool>) {
        let me = Arc::clone(self);
        let stop2 = stop.clone();
        tokio::spawn(async move {
            me.heal().await;
            me.claim_loop(stop2).await;
        });
        let me = Arc::clone(self);
        let stop2 = stop.clone();
        tokio::spawn(async move { me.sweep_loop(stop2).await });
        let me = Arc::clone(self);
        tokio::spawn(async move { me.stale_loop(stop).await });
    }

    // ---------------------------------------------------------------- notifications

    /// A notice of the agent's listener ([`super::listen`]), for waiters and the claim loop.
    pub(super) fn notified(&self, notice: Notice<'_>) {
        // The record's build may have changed: what this agent knew of it goes first (its own
        // ends too: the next answer reads the record once). Back from an outage, every end may
        // have been missed: all of it goes. During the outage, the builds known stay answers
        // (the records cannot be read; an agent cut off from the database alone answers what
        // it knew last: see docs/cluster.md, "Semantics").
        match notice {
            Notice::Reconnected => {
                if let Ok(mut own) = self.own_ends.lock() {
                    own.clear();
                }
                self.forget(None);
            }
            // A job queued to run anew: its build here is no answer until the new run ends
            // (requests join the run).
            Notice::Notification { channel, payload } if channel == CHANNEL => {
                if let Some(key) = payload.strip_prefix("queued ") {
                    self.forget(Some(key));
                } else if let Some(key) = payload.strip_prefix("ended ") {
                    // The notification of an end this agent is recording is its own (consumed:
                    // any later end of the job is another's, and is forgotten).
                    let own = self.own_ends.lock().is_ok_and(|mut o| o.remove(key));
                    if !own {
                        self.forget(Some(key));
                    }
                }
            }
            Notice::Notification { .. } | Notice::Lost => {}
        }
        if let Some(event) = event_of(notice) {
            let _ = self.events.send(event);
        }
    }
}

/// What a notice of the listener means to the scheduler (`None`: nothing).
fn event_of(notice: Notice<'_>) -> Option<Event> {
    Some(match notice {
        Notice::Reconnected | Notice::Lost => Event::Reconnected,
        Notice::Notification { channel, payload } if channel == CHANNEL => {
            if let Some(key) = payload.strip_prefix("ended ") {
                Event::Ended(key.to_string())
            } else if let Some(key) = payload.strip_prefix("running ") {
                Event::Running(key.to_string())
            } else {
                Event::Queued
            }
        }
        Notice::Notification { .. } => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_records_notifications_are_the_schedulers_events() {
        let on = |payload: &str| {
            event_of(Notice::Notification {
                channel: CHANNEL,
                payload,
            })
        };
        assert_eq!(
            // A claim's, as [`rows::claim`] builds it in SQL.
            on("running p/abc"),
            Some(Event::Running("p/abc".into()))
        );
        assert_eq!(
            on(&rows::ended_payload("p", "abc")),
            Some(Event::Ended("p/abc".into()))
        );
        assert_eq!(on("queued"), Some(Event::Queued));
        assert_eq!(on(&rows::requeued_payload("p", "abc")), Some(Event::Queued));
        assert_eq!(
            event_of(Notice::Notification {
                channel: super::super::LOGS_CHANNEL,
                payload: "running p/abc",
            }),
            None
        );
        assert_eq!(event_of(Notice::Reconnected), Some(Event::Reconnected));
        assert_eq!(event_of(Notice::Lost), Some(Event::Reconnected));
    }

    #[test]
    fn errors_map_to_statuses() {
        let db = ClusterError::Query {
            url: "postgres://db/mistry".into(),
            reason: "connection refused".into(),
        };
        let e = SubmitError::from(db);
        assert_eq!(e.status(), 503);
        assert_eq!(
            e.to_string(),
            "Service unavailable: the database at postgres://db/mistry: connection refused"
        );
        assert_eq!(SubmitError::from(JobError::Overloaded).status(), 503);
        assert_eq!(
            SubmitError::from(JobError::UnknownProject("x".into())).status(),
            404
        );
    }
}
