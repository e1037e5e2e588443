//! Requests (see the parent's doc, 1–3): a request admitted through the records — answered
//! from this agent's result cache, joined to its job in flight, inserted or queued again — and
//! its end waited for, as a build in this agent's `ready/`.

use super::*;

/// What [`Scheduler::try_insert`] did.
pub(super) enum Inserted {
    /// Not inserted: the cluster's queue is full.
    Full,
    /// Another agent inserted it first.
    Exists,
    /// Queued for the claims.
    Queued,
    /// Running here at once (this agent's claim).
    Running(Claim),
}

impl Scheduler {
    // ---------------------------------------------------------------- requests

    /// The ID a request goes by in the cluster, as a single node chooses it but with the job
    /// records deciding (`engine::state::Ids::Resolve`): mistry's, unless its record is another
    /// request's (the same ID, another group or params) — then the exact one; a request whose
    /// record is under its exact ID stays there. With the record found under that ID, if any
    /// (under the exact ID it may, against all odds, be another request's too).
    pub(super) async fn home(
        &self,
        project: &str,
        ids: &JobIds,
        identity: &Identity,
    ) -> Result<(String, Option<Record>), ClusterError> {
        // Both records in one statement (a new job has neither).
        let (mistry, exact) = {
            let (client, err) = self.client().await?;
            records::read_ids(
                &client,
                project,
                [&ids.mistry, &ids.exact],
                self.cluster.agent_timeout,
            )
            .await
            .map_err(err)?
        };
        match mistry {
            Some(rec) if rec.is_for(identity) => Ok((ids.mistry.clone(), Some(rec))),
            Some(_) => {
                tracing::info!(%project, id = %ids.mistry, "job ID taken by another request's job: going by the request's exact ID");
                Ok((ids.exact.clone(), exact))
            }
            None => match exact {
                Some(rec) if rec.is_for(identity) => Ok((ids.exact.clone(), Some(rec))),
                _ => Ok((ids.mistry.clone(), None)),
            },
        }
    }

    /// A request's job IDs and this agent's result-cache hit for it (`None` for a rebuild),
    /// in one blocking call: what [`Scheduler::admit`] starts from.
    pub fn look_up(&self, req: &JobRequest) -> Result<(JobIds, Option<LocalHit>), JobError> {
        let ids = self.engine.job_ids_of(req)?;
        let hit = if req.rebuild {
            None
        } else {
            self.engine
                .local_result(&req.project, &ids, &Identity::of(req))
        };
        Ok((ids, hit))
    }

    /// Admit a request whose job IDs and local result-cache hit [`Scheduler::look_up`] found
    /// (see the module's doc): answered at once from this agent's result cache, or its job in
    /// the records (inserted, queued again, or joined) and its ID decided;
    /// [`Scheduler::finish`] waits for its end.
    pub async fn admit(
        self: &Arc<Self>,
        req: JobRequest,
        ids: JobIds,
        hit: Option<LocalHit>,
    ) -> Result<Admission, SubmitError> {
        let project = req.project.clone();
        let identity = Identity::of(&req);
        if let Some((info, dir)) = hit {
            if self.published_here(&project, dir.id(), &info).await? {
                tracing::info!(%project, id = %dir.id(), "job answered from the result cache");
                return Ok(Admission::Answered(Answer { info, dir }));
            }
        }
        // Subscribed before reading the record: an end notified meanwhile is not missed.
        let events = self.events.subscribe();
        let ended_here = self.ended_here.subscribe();
        let mut id = ids.mistry.clone();
        let waiting = |id: String, events, coalesced| {
            Ok(Admission::Waiting(Waiting {
                project: project.clone(),
                id,
                identity: identity.clone(),
                events,
                ended_here,
                coalesced,
            }))
        };
        // A write whose answer was lost (the connection dropped after the database committed
        // it, or not): the record is read again, and tells.
        let mut lost: Option<ClusterError> = None;
        // A new job (neither of its IDs has a record) is inserted before anything is read: one
        // round trip. Any other is read, and decided, below.
        let mut new = !req.rebuild;
        for _ in 0..10 {
            if std::mem::take(&mut new) {
                match self.insert(&req, &ids.mistry, &ids.exact).await {
                    Ok(Some(true)) => return waiting(ids.mistry.clone(), events, false),
                    // A record under either ID (or the queue is full: read, it may be joined).
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(%project, id = %ids.mistry, error = %e, "inserting the job failed (it may be inserted: its answer was lost); reading its record again");
                        lost = Some(e);
                        tokio::time::sleep(LOST_REPLY_PAUSE).await;
                        continue;
                    }
                }
            }
            let (home, record) = match self.home(&project, &ids, &identity).await {
                Ok(r) => r,
                Err(e) if lost.is_some() => {
                    lost = Some(e);
                    tokio::time::sleep(LOST_REPLY_PAUSE).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            id = home;
            let Some(rec) = record else {
                // The backlog's check is the insert's (one statement).
                match self.insert(&req, &id, "").await {
                    Ok(Some(true)) => return waiting(id, events, false),
                    Ok(None) => return Err(SubmitError::Job(JobError::Overloaded)),
                    // Another agent inserted it first: read it.
                    Ok(Some(false)) => {}
                    Err(e) => {
                        tracing::warn!(%project, %id, error = %e, "inserting the job failed (it may be inserted: its answer was lost); reading its record again");
                        lost = Some(e);
                        tokio::time::sleep(LOST_REPLY_PAUSE).await;
                    }
                }
                continue;
            };
            if !rec.is_for(&identity) {
                return Err(SubmitError::Job(JobError::Internal(format!(
                    "Error building {project}/{id}: another request's job has this ID"
                ))));
            }
            if lost.is_some()
                && rec.state == JobState::Running
                && rec.agent.as_deref() == Some(self.me())
                && !self.runs_now(&key_of(&project, &id), rec.attempt)
            {
                // This agent's own insert, whose answer was lost: it runs nowhere. Back to the
                // queue (a claim runs it; this request waits for it).
                let run = rows::LostRun {
                    project: project.clone(),
                    id: id.clone(),
                    agent: self.me().to_string(),
                    attempt: rec.attempt,
                    retries: 0,
                    request: rec.request.clone(),
                    started_at: None,
                };
                if let Err(e) = self.requeue_lost(&run, false).await {
                    lost = Some(e);
                    tokio::time::sleep(LOST_REPLY_PAUSE).await;
                }
                continue;
            }
            if rec.state == JobState::Ready
                && !req.rebuild
                && rec.agent.as_deref() == Some(self.me())
            {
                // The record's build is this agent's, though this request found no result
                // here before: the job ran here meanwhile (while this request's insert's answer
                // was lost, or another request's run ended). Its build answers — queued again,
                // the same job would run twice and move its group's chain back.
                let dir = self.engine.layout.job(&project, &id, Stage::Ready);
                let mine = tokio::task::spawn_blocking(move || dir.read_info())
                    .await
                    .ok()
                    .flatten();
                if mine.is_some_and(|m| !is_stale(&m, &rec) && identity.matches(&m)) {
                    if let Some(mut answer) =
                        self.local_copy(&project, &id, &identity, &rec).await?
                    {
                        // This request's own run when its insert's answer was lost.
                        answer.info.cached = lost.is_none();
                        answer.info.coalesced = false;
                        tracing::info!(%project, %id, "job answered from this agent's build, which its record names");
                        return Ok(Admission::Answered(answer));
                    }
                }
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
                    match self.requeue(&req, &id, &rec).await {
                        Ok(true) => {
                            tracing::info!(%project, %id, was = %rec.state, agent = ?rec.agent, "job queued again in the cluster");
                            return waiting(id, events, false);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(%project, %id, error = %e, "queueing the job again failed (it may be queued: its answer was lost); reading its record again");
                            lost = Some(e);
                            tokio::time::sleep(LOST_REPLY_PAUSE).await;
                        }
                    }
                }
            }
        }
        if let Some(e) = lost {
            return Err(e.into());
        }
        Err(SubmitError::Job(JobError::Internal(format!(
            "Error building {project}/{id}: the job's record kept changing; try again"
        ))))
    }

    /// Whether this agent's build `project/id` (BuildInfo `info`) is the one its record names,
    /// i.e. may answer a request: known already, or read from the record (no record: a build
    /// from before the cluster, or whose record retention removed). A stale one (the job ran
    /// again elsewhere) goes; one whose job runs again is no answer (the request joins the
    /// run). Unknown while the database does not answer: a 503.
    pub(in crate::cluster) async fn published_here(
        &self,
        project: &str,
        id: &str,
        info: &BuildInfo,
    ) -> Result<bool, SubmitError> {
        let key = key_of(project, id);
        if self.is_verified(&key, &info.started_at) {
            return Ok(true);
        }
        let epoch = self.epoch();
        let Some(rec) = self.read(project, id).await? else {
            return Ok(true);
        };
        if rec.state.in_flight() {
            return Ok(false);
        }
        if is_stale(info, &rec) {
            tracing::info!(%project, %id, agent = ?rec.agent, "this agent's build is not the one the job's record names: it goes");
            self.discard_copy(project, id, rec.agent.as_deref(), &info.started_at)
                .await;
            return Ok(false);
        }
        self.verify(key, &info.started_at, epoch);
        Ok(true)
    }

    /// The end of an admitted job, as a build in this agent's `ready/`.
    pub async fn finish(&self, admission: Admission) -> Result<Answer, SubmitError> {
        match admission {
            Admission::Answered(a) => Ok(a),
            Admission::Waiting(w) => {
                // A job this request inserted or queued again is known to be in flight: its
                // record is read at its end (the events were subscribed before the write).
                let fresh = !w.coalesced;
                let (events, mut here) = (w.events, w.ended_here);
                self.wait_end_from(
                    (&w.project, &w.id, &w.identity),
                    (events, Some(&mut here)),
                    w.coalesced,
                    fresh,
                )
                .await
            }
            Admission::Copy(c) => {
                let (project, id) = (&c.project, &c.id);
                let events = self.events.subscribe();
                let Some(mut answer) = self.local_copy(project, id, &c.identity, &c.rec).await?
                else {
                    // The agent holding the record's build lost it: the job runs again, as
                    // for a dead holder, and this request waits for it.
                    let req = request_from_json(&c.rec.request)
                        .map_err(|e| JobError::Internal(e.to_string()))?;
                    if !self.requeue(&req, id, &c.rec).await? {
                        tracing::info!(%project, %id, "the job's record changed meanwhile; waiting for it");
                    } else {
                        tracing::info!(%project, %id, from = ?c.rec.agent, "job queued again: the agent holding its build lost it");
                    }
                    return self.wait_end(project, id, &c.identity, events, false).await;
                };
                answer.info.cached = true;
                answer.info.coalesced = false;
                self.engine.metrics.cached();
                tracing::info!(%project, %id, from = ?c.rec.agent, "job answered from the cluster's result cache");
                Ok(answer)
            }
        }
    }

    /// Resolves once job `project/id`'s record says it runs; never when it ends first or has
    /// no record. Woken by the claim's notification (`running <project>/<id>`); the record is
    /// read at first (after subscribing: a claim meanwhile is not missed), after every
    /// (re)connection of the listener (notifications may have been lost) and every
    /// [`RUNNING_RECHECK`] without news.
    pub async fn until_running(&self, project: &str, id: &str) {
        let key = key_of(project, id);
        let mut events = self.events.subscribe();
        loop {
            match self.read(project, id).await {
                Ok(Some(rec)) if rec.state == JobState::Running => return,
                Ok(Some(rec)) if rec.state == JobState::Queued => {}
                Err(e) => {
                    tracing::debug!(%project, %id, error = %e, "could not read whether the job runs");
                }
                Ok(_) => return std::future::pending().await,
            }
            let _ = tokio::time::timeout(RUNNING_RECHECK, async {
                loop {
                    match events.recv().await {
                        Ok(Event::Running(k) | Event::Ended(k)) if k == key => return,
                        Ok(Event::Reconnected) | Err(broadcast::error::RecvError::Lagged(_)) => {
                            return
                        }
                        Ok(_) => continue,
                        // No listener any more: only the slow re-reads are left.
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await;
                        }
                    }
                }
            })
            .await;
        }
    }

    pub(super) async fn read(
        &self,
        project: &str,
        id: &str,
    ) -> Result<Option<Record>, ClusterError> {
        let (client, err) = self.client().await?;
        records::read(&client, project, id, self.cluster.agent_timeout)
            .await
            .map_err(err)
    }

    /// Drop this agent's copy of `project/id` (see [`copies::discard_copy`]).
    pub(super) async fn discard_copy(
        &self,
        project: &str,
        id: &str,
        agent: Option<&str>,
        judged: &str,
    ) -> bool {
        copies::discard_copy(&self.engine, project, id, agent, judged).await
    }

    /// 503 when the cluster's queue is full (see the module's doc).
    pub(super) async fn check_backlog(&self) -> Result<(), SubmitError> {
        let backlog = i64::try_from(self.engine.cfg.job_backlog).unwrap_or(i64::MAX);
        let (client, err) = self.client().await?;
        let full = rows::queue_full(&client, backlog, self.judged())
            .await
            .map_err(err)?;
        if full {
            return Err(SubmitError::Job(JobError::Overloaded));
        }
        Ok(())
    }

    /// Insert the job; `Some(false)` when another agent inserted it first, `None` when the
    /// cluster's queue is full (the backlog's 503, see the module's doc). With a free slot
    /// here, and this agent the job's preferred one (see `records::jobs::insert`), the job is
    /// inserted `running` by this agent and starts at once (no claim round trip, and the answer
    /// needs no replication); with every slot taken but a brief wait here (by this agent's
    /// runs, [`Scheduler::wait_briefly`], and by the records), it is inserted `running` by this
    /// agent too and waits here for a slot, as in a single node's queue
    /// ([`Scheduler::spawn_waiting`]); else it is queued for the claims, its preferred agent
    /// first.
    /// Not when the job has a record under the ID `unless` (`""`: none): `Some(false)` then.
    pub(super) async fn insert(
        self: &Arc<Self>,
        req: &JobRequest,
        id: &str,
        unless: &str,
    ) -> Result<Option<bool>, ClusterError> {
        // What the insert holds until its run is registered (given back by the guard however
        // this ends, a request dropped mid-insert — its client gone — included): a slot here
        // or a place to wait here for one (`Scheduler::spawn_waiting`: every slot taken, the
        // job may still run here after a brief wait, as in a single node's queue), and its
        // key among the jobs being inserted (until its run is registered, a record this insert
        // made is no orphan: a lost reply of another request's insert of the same job here
        // never takes it for one).
        let here = self.reserve();
        let soon = !here && self.wait_briefly();
        let mut held = Inserting::new(self, key_of(&req.project, id), here, soon);
        let answer = match self.try_insert(req, id, (here, soon), unless).await {
            Err(e) => Err(e),
            Ok(Inserted::Full) => Ok(None),
            Ok(Inserted::Exists) => Ok(Some(false)),
            Ok(Inserted::Queued) => {
                tracing::info!(project = %req.project, %id, agent = %self.me(), "job queued in the cluster");
                Ok(Some(true))
            }
            Ok(Inserted::Running(claim)) => {
                tracing::info!(project = %claim.project, id = %claim.id, agent = %self.me(), "job claimed (taken by the agent that received it)");
                // The slot or the place goes to the run.
                held.hand_over();
                if here {
                    self.spawn_run(claim);
                } else {
                    self.spawn_waiting(claim);
                }
                Ok(Some(true))
            }
        };
        drop(held);
        answer
    }

    /// Insert the job (see [`Scheduler::insert`]), `running` here when `here` allows: a free
    /// slot here, or a place to wait here for one (`records::jobs::insert`).
    pub(super) async fn try_insert(
        &self,
        req: &JobRequest,
        id: &str,
        here: (bool, bool),
        unless: &str,
    ) -> Result<Inserted, ClusterError> {
        let request = request_json(req);
        let job = rows::NewJob::of(req, id, &request);
        let backlog = i64::try_from(self.engine.cfg.job_backlog).unwrap_or(i64::MAX);
        let (client, err) = self.client().await?;
        let state = rows::insert(
            &client,
            &job,
            here,
            self.me(),
            self.judged(),
            backlog,
            unless,
        )
        .await
        .map_err(err)?;
        Ok(match state {
            rows::Inserted::QueueFull => Inserted::Full,
            rows::Inserted::Exists => Inserted::Exists,
            rows::Inserted::As(JobState::Queued) => Inserted::Queued,
            rows::Inserted::As(_) => Inserted::Running(Claim {
                project: req.project.clone(),
                id: id.to_string(),
                request,
                retries: 0,
                retried_from: None,
                attempt: 1,
            }),
        })
    }

    /// Queue an ended job again, if its record is still as `rec` says (its request included:
    /// a record deleted and inserted again by another request meanwhile is not this one).
    pub(super) async fn requeue(
        &self,
        req: &JobRequest,
        id: &str,
        rec: &Record,
    ) -> Result<bool, ClusterError> {
        let request = request_json(req);
        let job = rows::NewJob::of(req, id, &request);
        let (mut client, err) = self.client().await?;
        rows::rerun(
            &mut client,
            &job,
            (rec.state, rec.agent.as_deref(), &rec.request),
            self.me(),
            self.judged(),
        )
        .await
        .map_err(err)
    }

    /// Wait for the job's end, then answer with its build, local to this agent (a build of a
    /// request with `identity`).
    pub(super) async fn wait_end(
        &self,
        project: &str,
        id: &str,
        identity: &Identity,
        events: broadcast::Receiver<Event>,
        coalesced: bool,
    ) -> Result<Answer, SubmitError> {
        self.wait_end_from((project, id, identity), (events, None), coalesced, false)
            .await
    }

    /// [`Scheduler::wait_end`]; when `in_flight`, the job is known to be queued or running
    /// (`events` subscribed before): its record is first read once an event says it may have
    /// ended.
    pub(super) async fn wait_end_from(
        &self,
        (project, id, identity): (&str, &str, &Identity),
        (mut events, mut ended_here): (
            broadcast::Receiver<Event>,
            Option<&mut broadcast::Receiver<EndedHere>>,
        ),
        coalesced: bool,
        in_flight: bool,
    ) -> Result<Answer, SubmitError> {
        let key = key_of(project, id);
        let mut read_now = !in_flight;
        loop {
            if !std::mem::replace(&mut read_now, true) {
                match self
                    .wait_for_end(&key, &mut events, ended_here.as_deref_mut())
                    .await
                {
                    Woken::Gone => {
                        return Err(SubmitError::Job(JobError::Internal(format!(
                            "Error building {key}: the agent is shutting down"
                        ))))
                    }
                    Woken::Ended(built) => {
                        if let Some(mut answer) =
                            self.recorded_here(project, id, identity, built).await
                        {
                            answer.info.cached = false;
                            answer.info.coalesced = coalesced;
                            return Ok(answer);
                        }
                    }
                    Woken::Recheck => {}
                }
                continue;
            }
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
                let Some(mut answer) = self.local_copy(project, id, identity, &rec).await? else {
                    return Err(SubmitError::Replication(format!(
                        "the agent holding the build {key} ({}) lost it: try again",
                        rec.agent.as_deref().unwrap_or_default()
                    )));
                };
                answer.info.cached = false;
                answer.info.coalesced = coalesced;
                return Ok(answer);
            }
            read_now = false;
        }
    }

    /// Wait until job `key` may have ended: [`Woken::Ended`] on its end's notification (or
    /// this agent's record of it, with its build's BuildInfo), [`Woken::Recheck`] on a
    /// reconnection of the listener (notifications may have been missed) or after
    /// [`SAFETY_RECHECK`] without news, [`Woken::Gone`] when the listener is gone (the agent
    /// shuts down).
    async fn wait_for_end(
        &self,
        key: &str,
        events: &mut broadcast::Receiver<Event>,
        ended_here: Option<&mut broadcast::Receiver<EndedHere>>,
    ) -> Woken {
        let notified = async {
            loop {
                match events.recv().await {
                    Ok(Event::Ended(k)) if k == key => return Woken::Ended(None),
                    Ok(Event::Reconnected) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Woken::Recheck
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Closed) => return Woken::Gone,
                }
            }
        };
        // An end this agent recorded: told at once (a lag: the record is read).
        let here = async {
            let Some(rx) = ended_here else {
                return std::future::pending().await;
            };
            loop {
                match rx.recv().await {
                    Ok((k, built)) if k == key => return Woken::Ended(built),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => return Woken::Recheck,
                    Err(broadcast::error::RecvError::Closed) => {
                        return std::future::pending().await
                    }
                }
            }
        };
        let woken = tokio::time::timeout(SAFETY_RECHECK, async {
            tokio::select! {
                w = notified => w,
                w = here => w,
            }
        })
        .await;
        woken.unwrap_or(Woken::Recheck)
    }

    /// On a job's end's notification: the answer from this agent's `ready/`, without reading
    /// the record, when the build there is one this agent recorded as the job's end (it is
    /// [`Scheduler::is_verified`]: an end recorded by another agent forgets the key before its
    /// notification reaches the waiters) and a build of the request with `identity`. `built`:
    /// the build's BuildInfo as this agent's run published it (told with its end), else read
    /// from `ready/`. `None`: the record is read.
    async fn recorded_here(
        &self,
        project: &str,
        id: &str,
        identity: &Identity,
        built: Option<Arc<BuildInfo>>,
    ) -> Option<Answer> {
        let dir = self.engine.layout.job(project, id, Stage::Ready);
        let info = match built {
            // Still the build in `ready/` (a small read, as the stale-copy check's).
            Some(info) if dir.read_started_at().as_deref() == Some(info.started_at.as_str()) => {
                Arc::unwrap_or_clone(info)
            }
            Some(_) => return None,
            None => {
                let d = dir.clone();
                tokio::task::spawn_blocking(move || d.read_info())
                    .await
                    .ok()??
            }
        };
        if !self.is_verified(&key_of(project, id), &info.started_at) || !identity.matches(&info) {
            return None;
        }
        let info = BuildInfo {
            path: dir.artifacts_when_ready().display().to_string(),
            ..info
        };
        Some(Answer { info, dir })
    }

    /// The ended job's build in this agent's `ready/` (fetched from the agent that ran it when
    /// that is another one), and its BuildInfo with `Path` local; never a build of a request
    /// other than `identity`'s, nor another build than the record's. `None` when the agent
    /// holding the record's successful build answers that it has none (it lost it).
    pub(super) async fn local_copy(
        &self,
        project: &str,
        id: &str,
        identity: &Identity,
        rec: &Record,
    ) -> Result<Option<Answer>, SubmitError> {
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
        if here && local.as_ref().is_some_and(|m| is_stale(m, rec)) {
            // Not the build the record names (a fenced run's that slipped in): never an answer.
            local = None;
        }
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
                (Some(agent), Some(url)) => super::super::copies::fetch_build(
                    url,
                    &self.engine.importer(),
                    project,
                    id,
                    false,
                )
                .await
                .map_err(|e| {
                    let lost = matches!(e, super::super::copies::ReplicateError::NotFound { .. });
                    (
                        lost,
                        format!(
                            "fetching the build {project}/{id} from agent {agent} ({url}): {e}"
                        ),
                    )
                }),
                _ => Err((
                    false,
                    format!("the build {project}/{id} has no agent holding it"),
                )),
            };
            if matches!(fetched, Err((true, _))) && rec.state == JobState::Ready {
                return Ok(None);
            }
            let fetched = fetched.map_err(|(_, e)| e);
            match fetched {
                Ok(d) => {
                    dir = d;
                    local = dir.read_info();
                    if let Some(other) = local.as_ref().filter(|m| is_stale(m, rec)) {
                        // The holder has another build of the job than its record names.
                        let judged = other.started_at.clone();
                        self.discard_copy(project, id, rec.agent.as_deref(), &judged)
                            .await;
                        return Err(SubmitError::Replication(format!(
                            "agent {} holds another build of {project}/{id} than its record \
                             names: try again",
                            rec.agent.as_deref().unwrap_or_default()
                        )));
                    }
                    tracing::info!(%project, %id, from = ?rec.agent, "build replicated from another agent");
                }
                Err(e) => match stored().filter(|i| failed && identity.matches(i)) {
                    Some(info) => {
                        tracing::info!(%project, %id, error = %e, "a failed job answered from its record");
                        let info = BuildInfo {
                            path: dir.artifacts_when_ready().display().to_string(),
                            ..info
                        };
                        return Ok(Some(Answer { info, dir }));
                    }
                    None => return Err(SubmitError::Replication(e)),
                },
            }
        }
        let Some(info) = local.or_else(stored) else {
            return Err(SubmitError::Job(JobError::Internal(format!(
                "Error building {project}/{id}: its BuildInfo is missing"
            ))));
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
        Ok(Some(Answer { info, dir }))
    }
}

/// What an insert holds ([`Scheduler::insert`]): its key among the jobs being inserted, and a
/// slot here (`here`) or a place to wait here for one (`soon`) until they go to the job's run
/// ([`Inserting::hand_over`]); given back when dropped, however the insert ended.
struct Inserting<'a> {
    scheduler: &'a Scheduler,
    key: String,
    here: bool,
    soon: bool,
}

impl<'a> Inserting<'a> {
    fn new(scheduler: &'a Scheduler, key: String, here: bool, soon: bool) -> Self {
        if let Ok(mut i) = scheduler.inserting.lock() {
            *i.entry(key.clone()).or_insert(0) += 1;
        }
        Inserting {
            scheduler,
            key,
            here,
            soon,
        }
    }

    /// The slot or the place goes to the job's run (which gives it back).
    fn hand_over(&mut self) {
        self.here = false;
        self.soon = false;
    }
}

impl Drop for Inserting<'_> {
    fn drop(&mut self) {
        if self.here {
            self.scheduler.release();
        }
        if self.soon {
            self.scheduler.leave_wait();
        }
        if let Ok(mut i) = self.scheduler.inserting.lock() {
            if let Some(n) = i.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    i.remove(&self.key);
                }
            }
        }
    }
}

/// Why [`Scheduler::wait_for_end`] returned.
enum Woken {
    /// The job's end was notified; with its build's BuildInfo when this agent's run published
    /// it.
    Ended(Option<Arc<BuildInfo>>),
    /// Notifications may have been missed, or none came for long: the record is read.
    Recheck,
    /// The listener is gone (the agent shuts down).
    Gone,
}
