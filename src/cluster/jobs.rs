//! One job, one run, cluster-wide: job records in the database (table `jobs`, migration V2),
//! claims, placement, coalescing between agents, and the recovery of an agent's death.
//!
//! A request on any agent ([`Scheduler::submit`]):
//! 1. its job IDs are computed as a single node does ([`Engine::job_ids_of`]); a local build
//!    of this very request (the same group and params but the opaque ones) that succeeded, in
//!    `ready/<id>`, is a result-cache hit as always (unless `rebuild`);
//! 2. else the job's record decides — under mistry's ID, unless that record is another
//!    request's (mistry's ID is ambiguous, see [`crate::jobs::JobIds`]): then under the
//!    request's exact ID; a record of another request is never an answer: `ready` on another live agent → the build is fetched from
//!    it (`replicate::fetch_build`) and answered `Cached: true`, `Path` local to this agent;
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
//!    the free slots of the alive agents (capacity − running, by their heartbeats) plus the
//!    `job_backlog` of the agent taking the request — a single node's "running + queued ≤
//!    job_concurrency + job_backlog", cluster-wide.
//!
//! Claims ([`Scheduler::start`]'s claim loop): while this agent runs fewer claimed jobs than
//! `job_concurrency`, it takes the oldest queued record it may take with
//! `SELECT ... FOR UPDATE SKIP LOCKED` and marks it `running` by itself, woken by the
//! notification of an insert (and by a safety tick: 1 s while queued jobs are left, else 5 s).
//! Placement: a job's `preferred_agent` is the agent holding its group's last successful
//! build, when it is alive; else an alive agent with free capacity that has the project's image (table
//! `agent_images`, migration V4: an agent records the project of every job that ran in its
//! container); else the least loaded alive agent (`running` records / capacity); ties go to the
//! agent taking the request. A job whose `preferred_agent` is another one is left alone for
//! [`PREFERRED_GRACE`], unless that agent is not alive or full (as many `running` records as
//! its capacity).
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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch, Notify};

use super::listen::Notice;
use super::records::{self, is_stale, request_from_json, request_json, stored_state, Record};
use super::replicate;
use super::{Cluster, ClusterError};
use crate::engine::{Engine, JobDir, JobError, Stage};
use crate::jobs::{BuildInfo, Identity, JobIds, JobRequest};
use crate::service::JobState;

pub use super::JOBS_CHANNEL as CHANNEL;
/// How long other agents leave a job to its preferred agent.
pub const PREFERRED_GRACE: Duration = Duration::from_secs(1);
/// A waiter reads its job's record again after this long without a notification (a safety
/// net; notifications are what wakes it).
const SAFETY_RECHECK: Duration = Duration::from_secs(30);
/// At most this often, every copy here is checked against its record (see `stale_loop`).
const CHECK_COPIES_EVERY: Duration = Duration::from_secs(5);

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
    pub info: BuildInfo,
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
    coalesced: bool,
}

/// A job that ended successfully on another agent, to copy here.
pub struct Copy {
    project: String,
    id: String,
    identity: Identity,
    rec: Record,
}

/// What the listener tells waiters and the claim loop.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// A job was queued (work to claim).
    Queued,
    /// Job `<project>/<id>` ended.
    Ended(String),
    /// The listener (re)connected: notifications may have been missed; read again.
    Reconnected,
}

/// A claimed job.
struct Claim {
    project: String,
    id: String,
    request: String,
    retries: i32,
    retried_from: Option<String>,
}

/// The cluster's job scheduler of one agent.
pub struct Scheduler {
    cluster: Arc<Cluster>,
    engine: Arc<Engine>,
    events: broadcast::Sender<Event>,
    /// Jobs this agent claimed and runs now.
    claimed: AtomicUsize,
    /// A claimed job ended here: capacity is free.
    freed: Notify,
    /// The builds whose end this agent recorded lately (key → `StartedAt`): their end's
    /// notification is no news for the stale-copy check (one query less per job). A missed
    /// notification leaves an entry; entries count for a minute, and a reconnection checks
    /// every copy anyway.
    recorded: std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
}

fn key_of(project: &str, id: &str) -> String {
    format!("{project}/{id}")
}

impl Scheduler {
    /// The scheduler of `cluster` (which must have a database) running jobs on `engine`.
    pub(super) fn new(cluster: Arc<Cluster>, engine: Arc<Engine>) -> Scheduler {
        Scheduler {
            cluster,
            engine,
            events: broadcast::channel(4096).0,
            claimed: AtomicUsize::new(0),
            freed: Notify::new(),
            recorded: Default::default(),
        }
    }

    fn db(&self) -> Result<&super::Db, ClusterError> {
        self.cluster.need_db()
    }

    /// The rows of one query.
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, ClusterError> {
        let db = self.db()?;
        let client = db.client().await?;
        client.query(sql, params).await.map_err(|e| db.pg_error(&e))
    }

    pub(super) fn me(&self) -> &str {
        self.cluster.name()
    }

    fn timeout_secs(&self) -> f64 {
        self.cluster.agent_timeout.as_secs_f64()
    }

    /// The tasks of this agent: the start-up healing pass, then the claim loop, and the
    /// sweeper, until `stop` turns true (the agent's listener calls [`Scheduler::notified`]).
    pub(super) fn start(self: &Arc<Self>, stop: watch::Receiver<bool>) {
        let me = Arc::clone(self);
        let stop2 = stop.clone();
        tokio::spawn(async move {
            me.heal().await;
            me.claim_loop(stop2).await
        });
        let me = Arc::clone(self);
        let stop2 = stop.clone();
        tokio::spawn(async move { me.sweep_loop(stop2).await });
        let me = Arc::clone(self);
        tokio::spawn(async move { me.stale_loop(stop).await });
    }

    // ---------------------------------------------------------------- requests

    /// Answer a request through the cluster (see the module's doc); `Ok(None)` for `?async`
    /// once the job is known to be queued, running or ready.
    pub async fn submit(
        self: &Arc<Self>,
        req: JobRequest,
        is_async: bool,
    ) -> Result<Option<Answer>, SubmitError> {
        let (engine, r) = (Arc::clone(&self.engine), req.clone());
        let ids = tokio::task::spawn_blocking(move || engine.job_ids_of(&r))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))??;
        self.submit_as(req, ids, is_async).await
    }

    /// The ID a request goes by in the cluster, as a single node chooses it but with the job
    /// records deciding (`engine::state::Ids::Resolve`): mistry's, unless its record is another
    /// request's (the same ID, another group or params) — then the exact one; a request whose
    /// record is under its exact ID stays there. With the record found under that ID, if any
    /// (under the exact ID it may, against all odds, be another request's too).
    async fn home(
        &self,
        project: &str,
        ids: &JobIds,
        identity: &Identity,
    ) -> Result<(String, Option<Record>), ClusterError> {
        match self.read(project, &ids.mistry).await? {
            Some(rec) if rec.is_for(identity) => Ok((ids.mistry.clone(), Some(rec))),
            Some(_) => {
                tracing::info!(%project, id = %ids.mistry, "job ID taken by another request's job: going by the request's exact ID");
                Ok((ids.exact.clone(), self.read(project, &ids.exact).await?))
            }
            None => match self.read(project, &ids.exact).await? {
                Some(rec) if rec.is_for(identity) => Ok((ids.exact.clone(), Some(rec))),
                _ => Ok((ids.mistry.clone(), None)),
            },
        }
    }

    /// The job ID [`Scheduler::submit_as`] will answer `req` with (barring a race with
    /// another request taking mistry's ID first): a local build of this request that
    /// succeeded (unless `rebuild`), else the one the records give ([`Scheduler::home`]).
    /// For a pipeline run, which shows a job's ID before its end.
    pub async fn job_id(&self, req: &JobRequest, ids: &JobIds) -> Result<String, SubmitError> {
        let identity = Identity::of(req);
        if !req.rebuild {
            let (engine, p, i, who) = (
                Arc::clone(&self.engine),
                req.project.clone(),
                ids.clone(),
                identity.clone(),
            );
            let here = tokio::task::spawn_blocking(move || {
                [&i.mistry, &i.exact].into_iter().find_map(|id| {
                    engine
                        .local_build(&p, id, &who)
                        .filter(|(info, _)| info.succeeded())
                        .map(|_| id.clone())
                })
            })
            .await
            .map_err(|e| JobError::Internal(e.to_string()))?;
            if let Some(id) = here {
                return Ok(id);
            }
        }
        Ok(self.home(&req.project, ids, &identity).await?.0)
    }

    /// [`Scheduler::submit`] of a request whose job IDs the caller computed (with
    /// [`Engine::job_ids_of`]).
    pub async fn submit_as(
        self: &Arc<Self>,
        req: JobRequest,
        ids: JobIds,
        is_async: bool,
    ) -> Result<Option<Answer>, SubmitError> {
        match self.admit(req, ids).await? {
            Admission::Answered(a) => Ok(Some(a)),
            _ if is_async => Ok(None),
            a => self.finish(a).await.map(Some),
        }
    }

    /// Admit a request (see the module's doc): answered at once from this agent's result
    /// cache, or its job in the records (inserted, queued again, or joined) and its ID decided;
    /// [`Scheduler::finish`] waits for its end.
    pub async fn admit(
        self: &Arc<Self>,
        req: JobRequest,
        ids: JobIds,
    ) -> Result<Admission, SubmitError> {
        let project = req.project.clone();
        let identity = Identity::of(&req);
        if !req.rebuild {
            let (engine, p, i, who) = (
                Arc::clone(&self.engine),
                project.clone(),
                ids.clone(),
                identity.clone(),
            );
            let hit = tokio::task::spawn_blocking(move || engine.local_result(&p, &i, &who))
                .await
                .map_err(|e| JobError::Internal(e.to_string()))?;
            if let Some((info, dir)) = hit {
                tracing::info!(%project, id = %dir.id(), "job answered from the result cache");
                return Ok(Admission::Answered(Answer { info, dir }));
            }
        }
        // Subscribed before reading the record: an end notified meanwhile is not missed.
        let events = self.events.subscribe();
        let mut id = ids.mistry.clone();
        let waiting = |id: String, events, coalesced| {
            Ok(Admission::Waiting(Waiting {
                project: project.clone(),
                id,
                identity: identity.clone(),
                events,
                coalesced,
            }))
        };
        for _ in 0..10 {
            let (home, record) = self.home(&project, &ids, &identity).await?;
            id = home;
            let Some(rec) = record else {
                self.check_backlog().await?;
                if self.insert(&req, &id).await? {
                    tracing::info!(%project, %id, agent = %self.me(), "job queued in the cluster");
                    return waiting(id, events, false);
                }
                continue; // Another agent inserted it first: read it.
            };
            if !rec.is_for(&identity) {
                return Err(SubmitError::Job(JobError::Internal(format!(
                    "Error building {project}/{id}: another request's job has this ID"
                ))));
            }
            match rec.state {
                JobState::Queued | JobState::Running => {
                    tracing::info!(%project, %id, state = %rec.state, agent = ?rec.agent, "job joins an identical job of the cluster");
                    self.engine.metrics.coalesced();
                    return waiting(id, events, true);
                }
                JobState::Ready
                    if !req.rebuild
                        && rec.agent_alive
                        && rec.agent.as_deref() != Some(self.me()) =>
                {
                    return Ok(Admission::Copy(Copy {
                        project: project.clone(),
                        id,
                        identity: identity.clone(),
                        rec,
                    }));
                }
                _ => {
                    // Failed, unavailable (its agent is not alive, or this agent no longer
                    // has it), or a rebuild: run it again.
                    self.check_backlog().await?;
                    if self.requeue(&req, &id, &rec).await? {
                        tracing::info!(%project, %id, was = %rec.state, agent = ?rec.agent, "job queued again in the cluster");
                        return waiting(id, events, false);
                    }
                }
            }
        }
        Err(SubmitError::Job(JobError::Internal(format!(
            "Error building {project}/{id}: the job's record kept changing; try again"
        ))))
    }

    /// The end of an admitted job, as a build in this agent's `ready/`.
    pub async fn finish(&self, admission: Admission) -> Result<Answer, SubmitError> {
        match admission {
            Admission::Answered(a) => Ok(a),
            Admission::Waiting(w) => {
                self.wait_end(&w.project, &w.id, &w.identity, w.events, w.coalesced)
                    .await
            }
            Admission::Copy(c) => {
                let (project, id) = (&c.project, &c.id);
                let mut answer = self.local_copy(project, id, &c.identity, &c.rec).await?;
                answer.info.cached = true;
                answer.info.coalesced = false;
                self.engine.metrics.cached();
                tracing::info!(%project, %id, from = ?c.rec.agent, "job answered from the cluster's result cache");
                Ok(answer)
            }
        }
    }

    pub(super) async fn read(
        &self,
        project: &str,
        id: &str,
    ) -> Result<Option<Record>, ClusterError> {
        records::read(self.db()?, project, id, self.cluster.agent_timeout).await
    }

    /// Drop this agent's copy of `project/id` (see [`replicate::discard_copy`]).
    pub(super) async fn discard_copy(
        &self,
        project: &str,
        id: &str,
        agent: Option<&str>,
        judged: &str,
    ) -> bool {
        replicate::discard_copy(&self.engine, project, id, agent, judged).await
    }

    /// 503 when the cluster's queue is full (see the module's doc).
    async fn check_backlog(&self) -> Result<(), SubmitError> {
        let db = self.db()?;
        let client = db.client().await?;
        let backlog = i64::try_from(self.engine.cfg.job_backlog).unwrap_or(i64::MAX);
        let full: bool = client
            .query_one(
                "SELECT (SELECT count(*) FROM jobs WHERE state = 'queued') >=
                        $1 + COALESCE((SELECT sum(GREATEST(capacity - running, 0))
                                         FROM agents
                                        WHERE stopped_at IS NULL
                                          AND last_heartbeat > now() - make_interval(secs => $2)),
                                      0)",
                &[&backlog, &self.timeout_secs()],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| db.pg_error(&e))?;
        if full {
            return Err(SubmitError::Job(JobError::Overloaded));
        }
        Ok(())
    }

    /// The preferred agent of a job (SQL, `$1` project, `$2` group, `me` and `timeout` the
    /// placeholders of this agent's name and of `agent_timeout` in seconds): the agent holding
    /// the group's last successful build, when it is alive; else an alive agent with free capacity that has the
    /// project's image (table `agent_images`); else the least loaded alive agent (`running`
    /// records / capacity). Ties go to this agent, then by name.
    fn preferred(me: &str, timeout: &str) -> String {
        format!(
            "COALESCE(
               (SELECT h.name
                  FROM (SELECT p.agent FROM jobs p
                         WHERE p.project = $1 AND p.group_name = $2 AND $2 <> ''
                           AND p.state = 'ready'
                         ORDER BY p.ended_at DESC LIMIT 1) l
                  JOIN agents h ON h.name = l.agent
                 WHERE h.stopped_at IS NULL
                   AND h.last_heartbeat > now() - make_interval(secs => {timeout})),
               (SELECT a.name FROM agents a,
                       LATERAL (SELECT count(*) AS n FROM jobs r
                                 WHERE r.state = 'running' AND r.agent = a.name) r
                 WHERE a.stopped_at IS NULL
                   AND a.last_heartbeat > now() - make_interval(secs => {timeout})
                 ORDER BY (a.capacity > r.n
                           AND EXISTS (SELECT 1 FROM agent_images i
                                        WHERE i.agent = a.name AND i.project = $1)) DESC,
                          r.n::float8 / a.capacity, a.name = {me} DESC, a.name
                 LIMIT 1))"
        )
    }

    /// Insert the job; `false` when another agent inserted it first. With a free slot here, and
    /// this agent the job's preferred one (see [`Scheduler::preferred`]), the job is inserted
    /// `running` by this agent and starts at once (no claim round trip, and the answer needs no
    /// replication); else it is queued for the claims, its preferred agent first.
    async fn insert(self: &Arc<Self>, req: &JobRequest, id: &str) -> Result<bool, ClusterError> {
        let here = self.reserve();
        let inserted = self.try_insert(req, id, here).await;
        match &inserted {
            Ok(Some(claim)) if claim.is_some() => {}
            _ if here => self.release(),
            _ => {}
        }
        match inserted? {
            None => Ok(false),
            Some(None) => Ok(true),
            Some(Some(claim)) => {
                tracing::info!(project = %claim.project, id = %claim.id, agent = %self.me(), "job claimed (taken by the agent that received it)");
                self.spawn_run(claim);
                Ok(true)
            }
        }
    }

    /// `None`: not inserted; `Some(None)`: queued; `Some(Some(claim))`: running here.
    async fn try_insert(
        &self,
        req: &JobRequest,
        id: &str,
        here: bool,
    ) -> Result<Option<Option<Claim>>, ClusterError> {
        let db = self.db()?;
        let client = db.client().await?;
        let request = request_json(req);
        // One statement (one round trip, atomic), the queued job's notification included.
        let row = client
            .query_opt(
                &format!(
                    "WITH pref AS (SELECT {} AS agent),
                          mine AS (SELECT $5 AND (pref.agent IS NULL OR pref.agent = $6) AS yes
                                     FROM pref),
                          ins AS (
                              INSERT INTO jobs (project, id, group_name, request, preferred_agent,
                                                state, agent, started_at)
                              SELECT $1, $3, $2, $4::text::jsonb, pref.agent,
                                     CASE WHEN mine.yes THEN 'running' ELSE 'queued' END,
                                     CASE WHEN mine.yes THEN $6 END,
                                     CASE WHEN mine.yes THEN now() END
                                FROM pref, mine
                              ON CONFLICT (project, id) DO NOTHING
                              RETURNING state),
                          sent AS (SELECT pg_notify($8, 'queued') FROM ins
                                    WHERE ins.state = 'queued')
                     SELECT ins.state, (SELECT count(*) FROM sent) FROM ins",
                    Self::preferred("$6", "$7")
                ),
                &[
                    &req.project,
                    &req.group,
                    &id,
                    &request,
                    &here,
                    &self.me(),
                    &self.timeout_secs(),
                    &CHANNEL,
                ],
            )
            .await
            .map_err(|e| db.pg_error(&e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let state: String = row.try_get(0).map_err(|e| db.pg_error(&e))?;
        if stored_state(db, &state)? == JobState::Queued {
            return Ok(Some(None));
        }
        Ok(Some(Some(Claim {
            project: req.project.clone(),
            id: id.to_string(),
            request,
            retries: 0,
            retried_from: None,
        })))
    }

    /// Queue an ended job again, if its record is still as `rec` says (its request included:
    /// a record deleted and inserted again by another request meanwhile is not this one).
    async fn requeue(
        &self,
        req: &JobRequest,
        id: &str,
        rec: &Record,
    ) -> Result<bool, ClusterError> {
        let db = self.db()?;
        let mut client = db.client().await?;
        let tx = client.transaction().await.map_err(|e| db.pg_error(&e))?;
        let n = tx
            .execute(
                &format!(
                    "UPDATE jobs SET state = 'queued', agent = NULL, build_info = NULL,
                            request = $4::text::jsonb, retries = 0, retried_from = NULL,
                            queued_at = now(), started_at = NULL, ended_at = NULL,
                            preferred_agent = {}
                      WHERE project = $1 AND id = $3 AND state = $5
                        AND agent IS NOT DISTINCT FROM $6 AND request = $9::text::jsonb",
                    Self::preferred("$7", "$8")
                ),
                &[
                    &req.project,
                    &req.group,
                    &id,
                    &request_json(req),
                    &rec.state.as_str(),
                    &rec.agent,
                    &self.me(),
                    &self.timeout_secs(),
                    &rec.request,
                ],
            )
            .await
            .map_err(|e| db.pg_error(&e))?;
        if n == 1 {
            tx.execute("SELECT pg_notify($1, 'queued')", &[&CHANNEL])
                .await
                .map_err(|e| db.pg_error(&e))?;
        }
        tx.commit().await.map_err(|e| db.pg_error(&e))?;
        Ok(n == 1)
    }

    /// Wait for the job's end, then answer with its build, local to this agent (a build of a
    /// request with `identity`).
    async fn wait_end(
        &self,
        project: &str,
        id: &str,
        identity: &Identity,
        mut events: broadcast::Receiver<Event>,
        coalesced: bool,
    ) -> Result<Answer, SubmitError> {
        let key = key_of(project, id);
        loop {
            let Some(rec) = self.read(project, id).await? else {
                return Err(SubmitError::Job(JobError::Internal(format!(
                    "Error building {key}: the job's record was deleted"
                ))));
            };
            if !rec.is_for(identity) {
                return Err(SubmitError::Job(JobError::Internal(format!(
                    "Error building {key}: the job's record is another request's now; try again"
                ))));
            }
            if !rec.state.in_flight() {
                let mut answer = self.local_copy(project, id, identity, &rec).await?;
                answer.info.cached = false;
                answer.info.coalesced = coalesced;
                return Ok(answer);
            }
            let woken = tokio::time::timeout(SAFETY_RECHECK, async {
                loop {
                    match events.recv().await {
                        Ok(Event::Ended(k)) if k == key => return true,
                        Ok(Event::Reconnected) | Err(broadcast::error::RecvError::Lagged(_)) => {
                            return true
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Closed) => return false,
                    }
                }
            })
            .await;
            if woken == Ok(false) {
                return Err(SubmitError::Job(JobError::Internal(format!(
                    "Error building {key}: the agent is shutting down"
                ))));
            }
        }
    }

    /// The ended job's build in this agent's `ready/` (fetched from the agent that ran it when
    /// that is another one), and its BuildInfo with `Path` local; never a build of a request
    /// other than `identity`'s.
    async fn local_copy(
        &self,
        project: &str,
        id: &str,
        identity: &Identity,
        rec: &Record,
    ) -> Result<Answer, SubmitError> {
        let layout = &self.engine.layout;
        let mut dir = layout.job(project, id, Stage::Ready);
        let here = rec.agent.as_deref() == Some(self.me());
        let stored = || -> Option<BuildInfo> {
            rec.build_info
                .as_deref()
                .and_then(|t| serde_json::from_str(t).ok())
        };
        // A copy here of another run of the job (the record's build is newer: a rebuild or a
        // re-run elsewhere, whose end this request waited for) goes first.
        let mut local = dir.read_info();
        if let Some(mine) = local.as_ref().filter(|m| !here && is_stale(m, rec)) {
            let judged = mine.started_at.clone();
            local = if self
                .discard_copy(project, id, rec.agent.as_deref(), &judged)
                .await
            {
                None
            } else {
                dir.read_info()
            };
            if local.as_ref().is_some_and(|m| is_stale(m, rec)) {
                return Err(SubmitError::Replication(format!(
                    "this agent's copy of {project}/{id} is an older build, in use: try again"
                )));
            }
        }
        if !here && local.is_none() {
            // A failed job may have no build to fetch (refused before it ran, e.g. an input
            // that could not be fetched): its record's BuildInfo answers.
            let failed = rec.state == JobState::Failed;
            let fetched = match (&rec.agent, &rec.agent_url) {
                (Some(agent), Some(url)) => {
                    super::replicate::fetch_build(url, &self.engine.importer(), project, id, false)
                        .await
                        .map_err(|e| {
                            format!(
                                "fetching the build {project}/{id} from agent {agent} ({url}): {e}"
                            )
                        })
                }
                _ => Err(format!("the build {project}/{id} has no agent holding it")),
            };
            match fetched {
                Ok(d) => {
                    tracing::info!(%project, %id, from = ?rec.agent, "build replicated from another agent");
                    dir = d;
                    local = dir.read_info();
                }
                Err(e) => match stored().filter(|i| failed && identity.matches(i)) {
                    Some(info) => {
                        tracing::info!(%project, %id, error = %e, "a failed job answered from its record");
                        let info = BuildInfo {
                            path: dir.artifacts_when_ready().display().to_string(),
                            ..info
                        };
                        return Ok(Answer { info, dir });
                    }
                    None => return Err(SubmitError::Replication(e)),
                },
            }
        }
        let info = match local.or_else(stored) {
            Some(i) => i,
            None => {
                return Err(SubmitError::Job(JobError::Internal(format!(
                    "Error building {project}/{id}: its BuildInfo is missing"
                ))))
            }
        };
        if !identity.matches(&info) {
            return Err(SubmitError::Replication(format!(
                "the build {project}/{id} here is another request's (another group or params): \
                 try again"
            )));
        }
        let info = BuildInfo {
            path: dir.artifacts_when_ready().display().to_string(),
            ..info
        };
        Ok(Answer { info, dir })
    }

    // ---------------------------------------------------------------- notifications

    /// A notice of the agent's listener ([`super::listen`]), for waiters and the claim loop.
    pub(super) fn notified(&self, notice: Notice<'_>) {
        let event = match notice {
            Notice::Reconnected => Event::Reconnected,
            Notice::Notification { channel, payload } if channel == CHANNEL => {
                match payload.strip_prefix("ended ") {
                    Some(key) => Event::Ended(key.to_string()),
                    None => Event::Queued,
                }
            }
            Notice::Notification { .. } => return,
        };
        let _ = self.events.send(event);
    }

    // ---------------------------------------------------------------- claims

    async fn claim_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut events = self.events.subscribe();
        loop {
            let mut left = false;
            while !*stop.borrow() && self.reserve() {
                // A slot given back here is not "capacity freed" (`release` would wake this
                // loop again at once: a busy loop).
                match self.claim_one().await {
                    Ok(Some(claim)) => self.spawn_run(claim),
                    Ok(None) => {
                        self.unreserve();
                        left = self.any_queued().await.unwrap_or(true);
                        break;
                    }
                    Err(e) => {
                        self.unreserve();
                        tracing::debug!(agent = %self.me(), error = %e, "claiming jobs failed");
                        left = true;
                        break;
                    }
                }
            }
            let tick = if left {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(5)
            };
            // Woken by work to claim (not by the ends of jobs: those free capacity here only
            // through `release`).
            let queued = async {
                loop {
                    match events.recv().await {
                        Ok(Event::Ended(_)) => continue,
                        Ok(_) | Err(_) => return,
                    }
                }
            };
            tokio::select! {
                _ = queued => {}
                _ = self.freed.notified() => {}
                _ = tokio::time::sleep(tick) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Reserve one of this agent's `job_concurrency` slots for a claim; `false` when all are
    /// taken (or the engine shuts down).
    fn reserve(&self) -> bool {
        if self.engine.is_shutting_down() {
            return false;
        }
        let capacity = self.engine.cfg.job_concurrency;
        self.claimed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < capacity).then_some(n + 1)
            })
            .is_ok()
    }

    /// Give back a slot [`Scheduler::reserve`] took, and wake the claim loop (capacity freed).
    fn release(&self) {
        self.unreserve();
        self.freed.notify_one();
    }

    /// Give back a slot [`Scheduler::reserve`] took, quietly.
    fn unreserve(&self) {
        self.claimed.fetch_sub(1, Ordering::SeqCst);
    }

    /// Run a claimed job (its slot reserved) in the background.
    fn spawn_run(self: &Arc<Self>, claim: Claim) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            me.run_claimed(claim).await;
            me.release();
        });
    }

    async fn any_queued(&self) -> Result<bool, ClusterError> {
        let db = self.db()?;
        let client = db.client().await?;
        client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 'queued')",
                &[],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| db.pg_error(&e))
    }

    /// Claim the oldest queued job this agent may take (its own preferred jobs first).
    async fn claim_one(&self) -> Result<Option<Claim>, ClusterError> {
        let db = self.db()?;
        let mut client = db.client().await?;
        let tx = client.transaction().await.map_err(|e| db.pg_error(&e))?;
        let row = tx
            .query_opt(
                "SELECT j.project, j.id, j.request::text, j.retries, j.retried_from
                   FROM jobs j
                  WHERE j.state = 'queued'
                    AND (j.preferred_agent IS NULL OR j.preferred_agent = $1
                         OR j.queued_at < now() - make_interval(secs => $2)
                         OR NOT EXISTS (
                             SELECT 1 FROM agents a
                              WHERE a.name = j.preferred_agent AND a.stopped_at IS NULL
                                AND a.last_heartbeat > now() - make_interval(secs => $3)
                                AND a.capacity > (SELECT count(*) FROM jobs r
                                                   WHERE r.state = 'running'
                                                     AND r.agent = a.name)))
                  ORDER BY (j.preferred_agent IS NOT DISTINCT FROM $1) DESC, j.queued_at
                  LIMIT 1
                    FOR UPDATE OF j SKIP LOCKED",
                &[
                    &self.me(),
                    &PREFERRED_GRACE.as_secs_f64(),
                    &self.timeout_secs(),
                ],
            )
            .await
            .map_err(|e| db.pg_error(&e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let g = |e: tokio_postgres::Error| db.pg_error(&e);
        let claim = Claim {
            project: row.try_get(0).map_err(g)?,
            id: row.try_get(1).map_err(g)?,
            request: row.try_get(2).map_err(g)?,
            retries: row.try_get(3).map_err(g)?,
            retried_from: row.try_get(4).map_err(g)?,
        };
        tx.execute(
            "UPDATE jobs SET state = 'running', agent = $3, started_at = now()
              WHERE project = $1 AND id = $2",
            &[&claim.project, &claim.id, &self.me()],
        )
        .await
        .map_err(|e| db.pg_error(&e))?;
        tx.commit().await.map_err(|e| db.pg_error(&e))?;
        tracing::info!(project = %claim.project, id = %claim.id, agent = %self.me(), retries = claim.retries, "job claimed");
        Ok(Some(claim))
    }

    /// A BuildInfo for a claimed job that could not run here.
    fn refused(&self, req: &JobRequest, id: &str, err: String) -> BuildInfo {
        let dir = self.engine.layout.job(&req.project, id, Stage::Ready);
        BuildInfo {
            err_build: err,
            ..self.engine.blank_info(req, &dir)
        }
    }

    /// Run a claimed job on the local engine and record its end.
    async fn run_claimed(&self, claim: Claim) {
        let (project, id) = (claim.project.clone(), claim.id.clone());
        let req = match request_from_json(&claim.request) {
            Ok(r) => r,
            Err(e) => {
                let req = JobRequest {
                    project: project.clone(),
                    ..JobRequest::default()
                };
                let info = self.refused(
                    &req,
                    &id,
                    format!("Error building {project}: the job's stored request is invalid: {e}"),
                );
                self.record_end(&project, &id, &info).await;
                return;
            }
        };
        if !req.group.is_empty() {
            self.place_group(&req).await;
        }
        // A pipeline's job placed here: its input builds are fetched first (cluster/inputs.rs).
        if let Err(e) = super::inputs::fetch_inputs(&self.cluster, &self.engine, &req).await {
            let info = self.refused(&req, &id, e.to_string());
            self.record_end(&project, &id, &info).await;
            return;
        }
        let scheduled = match self.engine.schedule_as(req.clone(), id.clone()).await {
            Ok(s) => s,
            Err(JobError::Overloaded) => {
                // Shutting down, or the local backlog is full: back to the queue.
                self.unclaim(&project, &id).await;
                return;
            }
            Err(e) => {
                let info = self.refused(&req, &id, e.to_string());
                self.record_end(&project, &id, &info).await;
                return;
            }
        };
        // The job's log goes to the database as it is produced (src/cluster/logs.rs); its last
        // chunk before the record says the job ended.
        let shipper = self
            .cluster
            .logs()
            .map(|logs| logs.ship(&self.engine.layout.job(&project, &id, Stage::Pending)));
        let info = match scheduled.wait().await {
            Ok((mut info, dir)) => {
                if claim.retries > 0 {
                    let from = claim.retried_from.as_deref().unwrap_or("another agent");
                    let note = format!(
                        "mistry: retried (retry {}): agent {from} stopped heartbeating while it \
                         ran this job; agent {} ran it again\n",
                        claim.retries,
                        self.me()
                    );
                    append_note(&dir, &note);
                    tracing::info!(%project, %id, from, retries = claim.retries, "a retried job ended");
                }
                info.cached = false;
                info.coalesced = false;
                info.retries = u32::try_from(claim.retries).unwrap_or_default();
                if info.retries > 0 {
                    // The stored BuildInfo says it too (result-cache hits answer it).
                    let (dir2, info2) = (dir.clone(), info.clone());
                    let _ = tokio::task::spawn_blocking(move || dir2.write_info(&info2)).await;
                }
                info
            }
            Err(e) => self.refused(&req, &id, e.to_string()),
        };
        if let Some(s) = shipper {
            s.finish().await;
        }
        self.record_end(&project, &id, &info).await;
    }

    /// A group's chain moving to this agent: start from the group's last successful build,
    /// fetched with its cache from the agent holding it, or clean when it is not alive.
    async fn place_group(&self, req: &JobRequest) {
        let (project, group) = (&req.project, &req.group);
        let last = async {
            let db = self.db()?;
            let client = db.client().await?;
            client
                .query_opt(
                    "SELECT j.id, j.agent, a.advertise_url,
                            COALESCE(a.stopped_at IS NULL
                                     AND a.last_heartbeat > now() - make_interval(secs => $3),
                                     false)
                       FROM jobs j LEFT JOIN agents a ON a.name = j.agent
                      WHERE j.project = $1 AND j.group_name = $2 AND j.state = 'ready'
                      ORDER BY j.ended_at DESC LIMIT 1",
                    &[project, group, &self.timeout_secs()],
                )
                .await
                .map_err(|e| db.pg_error(&e))
        }
        .await;
        let row = match last {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%project, %group, error = %e, "the group's last build is unknown (database); this agent's own chain is used");
                return;
            }
        };
        let (Ok(last_id), Ok(agent), Ok(url), Ok(alive)) = (
            row.try_get::<_, String>(0),
            row.try_get::<_, Option<String>>(1),
            row.try_get::<_, Option<String>>(2),
            row.try_get::<_, bool>(3),
        ) else {
            return;
        };
        let agent = agent.unwrap_or_default();
        if agent == self.me() {
            return;
        }
        let importer = self.engine.importer();
        let local = importer.layout().job(project, &last_id, Stage::Ready);
        let has_cache = |d: &JobDir| {
            std::fs::symlink_metadata(d.data().join("cache")).is_ok_and(|m| m.is_dir())
        };
        let base = if local.read_info().is_some() && has_cache(&local) {
            tracing::info!(%project, %group, "incremental from agent {agent}'s build {project}/{last_id} (already here)");
            Some(local)
        } else if let (true, Some(url)) = (alive, url) {
            // A copy here without its cache (a replica made to answer a request) is set aside
            // while the build is fetched again with its cache (an existing ready/<id> would
            // win over the fetch), and put back if that fails.
            let aside = importer.set_aside(project, &last_id);
            match super::replicate::fetch_build(&url, &importer, project, &last_id, true).await {
                Ok(dir) => {
                    tracing::info!(%project, %group, "incremental from agent {agent}'s build {project}/{last_id}");
                    if let Some(aside) = aside {
                        aside.remove();
                    }
                    Some(dir)
                }
                Err(e) => {
                    if let Some(aside) = aside {
                        aside.restore();
                    }
                    tracing::warn!(%project, %group, error = %e, "starting clean (Incremental: false): fetching agent {agent}'s build {project}/{last_id} failed");
                    None
                }
            }
        } else {
            tracing::info!(%project, %group, "starting clean (Incremental: false): agent {agent}, holding the group's last build {project}/{last_id}, is not alive");
            None
        };
        if let Err(e) = importer.link_group(project, group, base.as_ref()) {
            let link = importer.layout().link(project, group);
            tracing::warn!(%project, %group, error = %e, "could not update {}", link.display());
        }
    }

    /// Give a claimed job back to the queue (this agent cannot run it now).
    async fn unclaim(&self, project: &str, id: &str) {
        let result = async {
            let db = self.db()?;
            let client = db.client().await?;
            client
                .execute(
                    "UPDATE jobs SET state = 'queued', agent = NULL, started_at = NULL
                      WHERE project = $1 AND id = $2 AND state = 'running' AND agent = $3",
                    &[&project, &id, &self.me()],
                )
                .await
                .map_err(|e| db.pg_error(&e))?;
            client
                .execute("SELECT pg_notify($1, 'queued')", &[&CHANNEL])
                .await
                .map_err(|e| db.pg_error(&e))?;
            Ok::<_, ClusterError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(%project, %id, error = %e, "could not give the job back to the queue; the sweeper will");
        }
    }

    /// Record the end of a job this agent ran (its build is in `ready/` already) and notify
    /// it; retried every second while the database does not answer.
    async fn record_end(&self, project: &str, id: &str, info: &BuildInfo) {
        // Before the record: its notification may come back before the update returns.
        if let Ok(mut r) = self.recorded.lock() {
            r.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(60));
            r.insert(
                key_of(project, id),
                (info.started_at.clone(), std::time::Instant::now()),
            );
        }
        let mut warned = false;
        for _ in 0..600 {
            match self.try_record_end(project, id, info).await {
                Ok(true) => return,
                Ok(false) => {
                    self.forget_recorded(project, id);
                    tracing::warn!(%project, %id, agent = %self.me(), "the job's record was taken over meanwhile (this agent was taken for dead): its build stays here, unrecorded");
                    return;
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(%project, %id, error = %e, "recording the job's end failed; retrying every second");
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.forget_recorded(project, id);
    }

    fn forget_recorded(&self, project: &str, id: &str) {
        if let Ok(mut r) = self.recorded.lock() {
            r.remove(&key_of(project, id));
        }
    }

    async fn try_record_end(
        &self,
        project: &str,
        id: &str,
        info: &BuildInfo,
    ) -> Result<bool, ClusterError> {
        let db = self.db()?;
        let stored = BuildInfo {
            container_stdouterr: String::new(),
            container_stderr: String::new(),
            ..info.clone()
        };
        let json = serde_json::to_string(&stored).map_err(|e| db.error(e.to_string()))?;
        let state = JobState::of_end(info).as_str();
        // One statement (one round trip, atomic): the record (still ours, or queued again
        // meanwhile and not claimed by another agent yet), the end's notification, and — when
        // the job ran in its container — the project's image cached here (placement).
        let client = db.client().await?;
        let n: i64 = client
            .query_one(
                "WITH upd AS (
                     UPDATE jobs SET state = $4, agent = $3, build_info = $5::text::jsonb,
                            ended_at = now()
                      WHERE project = $1 AND id = $2
                        AND ((state = 'running' AND agent = $3) OR state = 'queued')
                     RETURNING 1),
                 sent AS (SELECT pg_notify($6, $7) FROM upd),
                 img AS (
                     INSERT INTO agent_images (agent, project)
                     SELECT $3, $1 FROM upd WHERE $8
                     ON CONFLICT (agent, project) DO UPDATE SET built_at = now()
                     RETURNING 1)
                 SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM sent)",
                &[
                    &project,
                    &id,
                    &self.me(),
                    &state,
                    &json,
                    &CHANNEL,
                    &format!("ended {}", key_of(project, id)),
                    &info.err_build.is_empty(),
                ],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| db.pg_error(&e))?;
        if n == 1 {
            tracing::info!(%project, %id, %state, agent = %self.me(), "job recorded in the cluster");
        }
        Ok(n == 1)
    }

    // ---------------------------------------------------------------- failures

    /// At start: the records this agent left `running` (it crashed), i.e. started before its
    /// registration: a build of the record's request in `ready/` is recorded (the crash came
    /// between the move and the record), any other is queued again. Jobs this run of the agent took meanwhile (a request
    /// can arrive before this pass) are left alone.
    async fn heal(&self) {
        let rows = self
            .rows(
                "SELECT j.project, j.id, j.request::text FROM jobs j JOIN agents a ON a.name = j.agent
                  WHERE j.state = 'running' AND j.agent = $1 AND j.started_at < a.started_at",
                &[&self.me()],
            )
            .await;
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(agent = %self.me(), error = %e, "could not look for the jobs a crash left running; the sweepers of other agents will not (this agent is alive)");
                return;
            }
        };
        for row in rows {
            let (Ok(project), Ok(id), Ok(request)) = (
                row.try_get::<_, String>(0),
                row.try_get::<_, String>(1),
                row.try_get::<_, String>(2),
            ) else {
                continue;
            };
            let identity = request_from_json(&request).map(|r| Identity::of(&r));
            let dir = self.engine.layout.job(&project, &id, Stage::Ready);
            match dir
                .read_info()
                .filter(|i| identity.as_ref().is_ok_and(|me| me.matches(i)))
            {
                Some(info) => {
                    tracing::info!(%project, %id, "recording a build a crash left unrecorded");
                    self.record_end(&project, &id, &info).await;
                }
                None => {
                    tracing::info!(%project, %id, "queueing again a job a crash interrupted");
                    if let Err(e) = self.requeue_running(Some((&project, &id))).await {
                        tracing::warn!(%project, %id, error = %e, "could not queue the job again");
                    }
                }
            }
        }
    }

    /// Queue again the running jobs of agents that are not alive, or (`crashed`) this agent's
    /// job `(project, id)` started before its registration; notify.
    async fn requeue_running(&self, crashed: Option<(&str, &str)>) -> Result<u64, ClusterError> {
        let db = self.db()?;
        let mut client = db.client().await?;
        let tx = client.transaction().await.map_err(|e| db.pg_error(&e))?;
        let (project, id) = crashed.unzip();
        let rows = tx
            .query(
                "UPDATE jobs SET state = 'queued', retried_from = agent, agent = NULL,
                        retries = retries + 1, queued_at = now(), started_at = NULL
                  WHERE state = 'running'
                    AND CASE WHEN $3::text IS NULL
                        THEN pg_postmaster_start_time() < now() - make_interval(secs => $1)
                         AND NOT EXISTS (
                             SELECT 1 FROM agents a
                              WHERE a.name = jobs.agent AND a.stopped_at IS NULL
                                AND a.last_heartbeat > now() - make_interval(secs => $1))
                        ELSE project = $3 AND id = $4 AND agent = $2
                             AND started_at < (SELECT a.started_at FROM agents a
                                                WHERE a.name = $2)
                        END
                 RETURNING project, id, retried_from, retries",
                &[&self.timeout_secs(), &self.me(), &project, &id],
            )
            .await
            .map_err(|e| db.pg_error(&e))?;
        if !rows.is_empty() {
            tx.execute("SELECT pg_notify($1, 'queued')", &[&CHANNEL])
                .await
                .map_err(|e| db.pg_error(&e))?;
        }
        tx.commit().await.map_err(|e| db.pg_error(&e))?;
        for r in &rows {
            let project: String = r.try_get(0).unwrap_or_default();
            let id: String = r.try_get(1).unwrap_or_default();
            let from: Option<String> = r.try_get(2).unwrap_or_default();
            let retries: i32 = r.try_get(3).unwrap_or_default();
            tracing::warn!(%project, %id, from = ?from, retries, "job queued again: its agent stopped heartbeating or crashed");
        }
        Ok(rows.len() as u64)
    }

    /// A job that ran again on another agent (a rebuild, a re-run after a failure or of a dead
    /// agent's build) leaves this agent's copy stale: on its end's notification, a local copy
    /// whose `StartedAt` is not the record's goes (the next request fetches the new build).
    /// An agent that was down meanwhile checks its copies at start ([`Scheduler::drop_stale_copies`]).
    async fn stale_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut events = self.events.subscribe();
        // Every copy is checked at start, and again once the database answers after ends may
        // have been missed (a reconnection, a lag) — at most every few seconds.
        let mut check_all = true;
        let mut checked: Option<tokio::time::Instant> = None;
        loop {
            if check_all
                && checked.is_none_or(|t| t.elapsed() >= CHECK_COPIES_EVERY)
                && self.ping().await.is_ok()
            {
                checked = Some(tokio::time::Instant::now());
                check_all = false;
                self.drop_stale_copies().await;
            }
            let event = tokio::select! {
                e = events.recv() => e,
                _ = tokio::time::sleep(CHECK_COPIES_EVERY), if check_all => continue,
                _ = stop.wait_for(|s| *s) => return,
            };
            let key = match event {
                Ok(Event::Ended(key)) => key,
                Ok(Event::Queued) => continue,
                Ok(Event::Reconnected) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    check_all = true;
                    if let Ok(mut r) = self.recorded.lock() {
                        r.clear();
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let Some((project, id)) = key.split_once('/') else {
                continue;
            };
            // Names as requests are checked (a notification is anyone's to send).
            if crate::jobs::check_name("project", project)
                .and_then(|()| crate::jobs::check_name("job", id))
                .is_err()
            {
                continue;
            }
            let local = self.engine.layout.job(project, id, Stage::Ready);
            let Some(mine) = local.read_info() else {
                continue;
            };
            let ours = self
                .recorded
                .lock()
                .ok()
                .and_then(|mut r| r.remove(&key))
                .is_some_and(|(started, at)| {
                    started == mine.started_at && at.elapsed() < Duration::from_secs(60)
                });
            if ours {
                continue;
            }
            let rec = match self.read(project, id).await {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(%project, %id, error = %e, "could not check a copy against its record");
                    continue;
                }
            };
            if rec.agent.as_deref() == Some(self.me()) || !is_stale(&mine, &rec) {
                continue;
            }
            self.discard_copy(project, id, rec.agent.as_deref(), &mine.started_at)
                .await;
        }
    }

    /// At start: this agent's copies of builds whose jobs ran again elsewhere (or were queued
    /// again) while it was down go — the notifications of their ends were missed.
    async fn drop_stale_copies(&self) {
        let layout = self.engine.layout.clone();
        let local: Vec<(String, String, String)> = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            for project in layout.projects() {
                for job in layout.jobs(&project, Stage::Ready) {
                    if let Some(started) = job.read_started_at() {
                        all.push((project.clone(), job.id().to_string(), started));
                    }
                }
            }
            all
        })
        .await
        .unwrap_or_default();
        for chunk in local.chunks(500) {
            let (projects, ids): (Vec<&str>, Vec<&str>) = chunk
                .iter()
                .map(|(p, i, _)| (p.as_str(), i.as_str()))
                .unzip();
            let rows = self
                .rows(
                    "SELECT j.project, j.id, j.agent, j.build_info->>'StartedAt'
                       FROM jobs j
                       JOIN unnest($1::text[], $2::text[]) AS l(project, id)
                         ON j.project = l.project AND j.id = l.id
                      WHERE j.agent IS DISTINCT FROM $3",
                    &[&projects, &ids, &self.me()],
                )
                .await;
            let rows = match rows {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(agent = %self.me(), error = %e, "could not check this agent's copies against their records");
                    continue;
                }
            };
            for row in rows {
                let (Ok(project), Ok(id), Ok(agent), Ok(theirs)) = (
                    row.try_get::<_, String>(0),
                    row.try_get::<_, String>(1),
                    row.try_get::<_, Option<String>>(2),
                    row.try_get::<_, Option<String>>(3),
                ) else {
                    continue;
                };
                let mine = chunk
                    .iter()
                    .find(|(p, i, _)| *p == project && *i == id)
                    .map(|(_, _, s)| s.as_str());
                if let Some(mine) = mine.filter(|m| theirs.as_deref() != Some(*m)) {
                    self.discard_copy(&project, &id, agent.as_deref(), mine)
                        .await;
                }
            }
        }
    }

    /// Every `heartbeat`: queue again the running jobs of agents that stopped heartbeating.
    /// Silence is only judged once this agent has reached the database for `agent_timeout`
    /// without a break (since its start, or since an outage or a lost connection: the others'
    /// heartbeats could not get through either), and — in the query — once the database has
    /// been up that long (a database restart is no agent's death).
    async fn sweep_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.cluster.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reached_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let since = *reached_since.get_or_insert_with(tokio::time::Instant::now);
            let result = if since.elapsed() < self.cluster.agent_timeout {
                self.ping().await
            } else {
                self.requeue_running(None).await.map(|_| ())
            };
            if let Err(e) = result {
                tracing::debug!(agent = %self.me(), error = %e, "the sweeper could not reach the database");
                reached_since = None;
            }
        }
    }

    async fn ping(&self) -> Result<(), ClusterError> {
        let db = self.db()?;
        let client = db.client().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| db.pg_error(&e))?;
        Ok(())
    }
}

/// Append a note line to a ready build's `out.log`.
fn append_note(dir: &JobDir, note: &str) {
    use std::io::Write;
    if let Err(e) = dir
        .append_log()
        .and_then(|mut f| f.write_all(note.as_bytes()))
    {
        tracing::warn!(project = %dir.project(), id = %dir.id(), error = %e, "could not add a note to the job's log");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
