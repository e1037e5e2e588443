//! Claims and runs (see the parent's doc): the claim loop, a claimed job run through the
//! engine (its inputs fetched first, its group's chain placed), its end recorded.

use super::slots::SlotWait;
use super::*;
use crate::cluster::logs::WholeLog;

impl Scheduler {
    // ---------------------------------------------------------------- claims

    pub(super) async fn claim_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut events = self.events.subscribe();
        // Whether a record may be queued: a claim that found none, with none queued either,
        // waits for a `queued` notification (or the safety tick) before it looks again — a
        // slot freed here is then no reason to ask the database.
        let mut maybe_queued = true;
        loop {
            let mut left = false;
            while maybe_queued && !*stop.borrow() {
                if self.engine.is_shutting_down() {
                    // No more claims: a slot granted to this loop goes back (a stopping agent
                    // waits for its slots, `stop_waiters`).
                    self.slots.claim_loop_stops();
                    break;
                }
                if !self.slots.reserve_for_claim() {
                    // Every slot taken: the next one given back is this loop's rather than a
                    // waiting run's (queued jobs are not overtaken for ever; slots.rs).
                    break;
                }
                // A slot this loop gives back is not "capacity freed" (`unreserve` does not
                // wake this loop again at once: a busy loop).
                match self.claim_one().await {
                    Ok((Some(claim), _)) => self.spawn_run(claim),
                    Ok((None, queued)) => {
                        self.slots.unreserve();
                        left = queued;
                        maybe_queued = queued;
                        break;
                    }
                    Err(e) => {
                        self.slots.unreserve();
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
                        Ok(Event::Ended(_) | Event::Running(_)) => continue,
                        Ok(_) | Err(_) => return,
                    }
                }
            };
            tokio::select! {
                _ = queued => maybe_queued = true,
                _ = self.slots.freed() => {}
                _ = tokio::time::sleep(tick) => maybe_queued = true,
                _ = stop.wait_for(|s| *s) => break,
            }
            if *stop.borrow() {
                break;
            }
        }
        // A slot granted to this loop, or its turn, goes back to the runs waiting here.
        self.slots.claim_loop_stops();
    }

    /// Reserve one of this agent's `job_concurrency` slots; `false` when all are taken (or the
    /// engine shuts down).
    pub(super) fn reserve(&self) -> bool {
        !self.engine.is_shutting_down() && self.slots.reserve()
    }

    /// Give back a slot (however it was taken): to a run waiting here for one, to the claim
    /// loop, or to the pool (slots.rs).
    pub(super) fn release(&self) {
        self.slots.give_back();
    }

    /// A slot for a run that may wait here: taken now, or the wait for the next one given back
    /// (or none: the engine shuts down).
    fn slot_or_wait(&self) -> SlotWait {
        self.slots.slot_or_wait(|| self.engine.is_shutting_down())
    }

    /// Take one of this agent's places for a run waiting here for a slot, when the wait is
    /// brief: fewer runs wait here than `job_backlog` (a single node's queue), and none of the
    /// runs holding a slot started over [`rows::BRIEF_RUN`] ago (the next slot is given back
    /// soon) — as `records::jobs`' placement judges an agent worth waiting for; a run that
    /// still waits after [`LOCAL_WAIT`] goes back to the cluster's queue. The place is given
    /// back with [`Scheduler::leave_wait`].
    pub(super) fn wait_briefly(&self) -> bool {
        if self.engine.is_shutting_down() {
            return false;
        }
        let brief = self.runs.lock().is_ok_and(|r| {
            r.values()
                .all(|run| run.since.is_none_or(|t| t.elapsed() < rows::BRIEF_RUN))
        });
        brief && self.slots.take_place()
    }

    /// Give back a place [`Scheduler::wait_briefly`] took.
    pub(super) fn leave_wait(&self) {
        self.slots.leave_place();
    }

    /// Since when run `key` (attempt `attempt`) holds a slot (`None`: it holds none).
    fn set_since(&self, key: &str, attempt: i32, since: Option<std::time::Instant>) {
        if let Ok(mut r) = self.runs.lock() {
            if let Some(run) = r.get_mut(key).filter(|run| run.attempt == attempt) {
                run.since = since;
            }
        }
    }

    /// The agent stops (its engine shuts down, no new run waits here): every run still
    /// waiting here for a slot goes back to the cluster's queue now, and this waits (at most
    /// [`STOP_PATIENCE`]) until each did, and until the runs that got a slot late (which the
    /// engine refuses) gave their records back — rather than leave `running` records that
    /// other agents would take for lost runs of this agent (a retry, with its backoff).
    pub(in crate::cluster) async fn stop_waiters(&self) {
        self.slots.drop_waiters();
        let deadline = tokio::time::Instant::now() + STOP_PATIENCE;
        let stopping = self.engine.is_shutting_down();
        let busy = || self.slots.places_taken() > 0 || (stopping && self.slots.taken() > 0);
        while busy() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Run a claimed job (its slot reserved) in the background; it is one of this agent's
    /// runs until it ends (see [`Scheduler::rescue_orphans`]).
    pub(super) fn spawn_run(self: &Arc<Self>, claim: Claim) {
        self.spawn(claim, SlotWait::Now, false);
    }

    /// Run a job inserted `running` here while every slot was taken (a place taken with
    /// [`Scheduler::wait_briefly`], given back here): once a slot is handed to it (in order,
    /// in turns with the claim loop when queued records may be left, slots.rs) — the job waits
    /// here as it would in a single node's queue, without a claim's round trip. Until then it
    /// is one of this agent's runs (its record is no orphan); if the engine shuts down
    /// meanwhile, it goes back to the queue.
    pub(super) fn spawn_waiting(self: &Arc<Self>, claim: Claim) {
        let wait = self.slot_or_wait();
        self.spawn(claim, wait, true);
    }

    /// Run `claim` once it has its slot (`wait`); `placed`: it took a place with
    /// [`Scheduler::wait_briefly`], given back once the wait is over.
    fn spawn(self: &Arc<Self>, claim: Claim, wait: SlotWait, placed: bool) {
        let key = key_of(&claim.project, &claim.id);
        if let Ok(mut r) = self.runs.lock() {
            let since = matches!(wait, SlotWait::Now).then(std::time::Instant::now);
            let run = RunHere {
                attempt: claim.attempt,
                since,
            };
            r.insert(key.clone(), run);
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let attempt = claim.attempt;
            let got = match wait {
                SlotWait::Now => true,
                SlotWait::Later(mut rx) => match tokio::time::timeout(LOCAL_WAIT, &mut rx).await {
                    Ok(handed) => handed.is_ok(),
                    Err(_) => me.slots.stop_waiting(rx),
                },
                SlotWait::Never => false,
            };
            if got {
                if placed {
                    me.leave_wait();
                }
                me.set_since(&key, attempt, Some(std::time::Instant::now()));
                let slot = Slot {
                    scheduler: Arc::clone(&me),
                    held: true.into(),
                    run: (key.clone(), attempt),
                };
                me.run_claimed(claim, &slot).await;
                drop(slot);
            } else {
                // No slot came in time (a run here turned long), or none will (the engine
                // shuts down): back to the cluster's queue, where any agent may claim it. Its
                // place is given back after that (a stopping agent waits for the places).
                tracing::info!(project = %claim.project, id = %claim.id, agent = %me.me(), "the job waited here for a slot too long, or the agent stops: back to the cluster's queue");
                me.unclaim(&claim.project, &claim.id, attempt).await;
                if placed {
                    me.leave_wait();
                }
            }
            if let Ok(mut r) = me.runs.lock() {
                if r.get(&key).is_some_and(|run| run.attempt == attempt) {
                    r.remove(&key);
                }
            }
        });
    }

    /// Claim the oldest queued job this agent may take (its own preferred jobs first); with
    /// whether any record was queued.
    pub(super) async fn claim_one(&self) -> Result<(Option<Claim>, bool), ClusterError> {
        let (client, err) = self.client().await?;
        let claimed = rows::claim(&client, self.me(), PREFERRED_GRACE, self.judged())
            .await
            .map_err(err)?;
        if let (Some(claim), _) = &claimed {
            tracing::info!(project = %claim.project, id = %claim.id, agent = %self.me(), retries = claim.retries, "job claimed");
        }
        Ok(claimed)
    }

    /// A BuildInfo for a claimed job that could not run here.
    pub(super) fn refused(&self, req: &JobRequest, id: &str, err: String) -> BuildInfo {
        let dir = self.engine.layout.job(&req.project, id, Stage::Ready);
        BuildInfo {
            err_build: err,
            ..self.engine.blank_info(req, &dir)
        }
    }

    /// Run a claimed job on the local engine and record its end.
    pub(super) async fn run_claimed(&self, claim: Claim, slot: &Slot) {
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
                self.record_end(&project, &id, &info, claim.attempt, None, false)
                    .await;
                return;
            }
        };
        if !req.group.is_empty() {
            self.place_group(&req).await;
        }
        // A pipeline's job placed here: its input builds are fetched first (cluster/inputs.rs).
        if let Err(e) = super::super::inputs::fetch_inputs(&self.cluster, &self.engine, &req).await
        {
            let info = self.refused(&req, &id, e.to_string());
            self.record_end(&project, &id, &info, claim.attempt, None, false)
                .await;
            return;
        }
        let fence = Arc::new(RunFence {
            cluster: Arc::clone(&self.cluster),
            handle: tokio::runtime::Handle::current(),
            project: project.clone(),
            id: id.clone(),
            attempt: claim.attempt,
            fenced: false.into(),
            early: Default::default(),
        });
        let scheduled = match self
            .engine
            .schedule_as(req.clone(), id.clone(), Arc::clone(&fence) as _)
            .await
        {
            Ok(s) => s,
            Err(JobError::Overloaded) => {
                // Shutting down, or the local backlog is full: back to the queue.
                self.unclaim(&project, &id, claim.attempt).await;
                return;
            }
            Err(e) => {
                let info = self.refused(&req, &id, e.to_string());
                self.record_end(&project, &id, &info, claim.attempt, None, false)
                    .await;
                return;
            }
        };
        // The job's log goes to the database as it is produced (src/cluster/logs/); its last
        // chunk before the record says the job ended.
        let shipper = self.cluster.logs().map(|logs| {
            let dir = self.engine.layout.job(&project, &id, Stage::Pending);
            // A first run has no previous run's log to replace.
            logs.ship(&dir, claim.attempt > 1)
        });
        // `built`: `info` is the build published in `ready/` (its waiters here answer with it).
        let (info, built) = match scheduled.wait().await {
            Ok((mut info, dir)) => {
                info.cached = false;
                info.coalesced = false;
                info.retries = u32::try_from(claim.retries).unwrap_or_default();
                if claim.retries > 0 {
                    let from = claim.retried_from.as_deref().unwrap_or("another agent");
                    let note = format!(
                        "mistry: retried (retry {}): agent {from} stopped heartbeating while it \
                         ran this job; agent {} ran it again\n",
                        claim.retries,
                        self.me()
                    );
                    // The log and the stored BuildInfo say it (result-cache hits answer it).
                    let (engine, info2) = (Arc::clone(&self.engine), info.clone());
                    let _ =
                        tokio::task::spawn_blocking(move || engine.note_retry(&dir, &note, &info2))
                            .await;
                    tracing::info!(%project, %id, from, retries = claim.retries, "a retried job ended");
                }
                (info, true)
            }
            Err(e) => (self.refused(&req, &id, e.to_string()), false),
        };
        // The run is over: its slot goes to the next claim, whose run overlaps this end's
        // record and log (the slot would otherwise wait for their round trips).
        slot.give_back();
        let whole = match shipper {
            Some(s) => s.finish().await,
            None => None,
        };
        if fence.fenced.load(Ordering::SeqCst) {
            tracing::warn!(%project, %id, agent = %self.me(), attempt = claim.attempt, "the job's run was fenced: its record moved on while this agent ran it (taken for dead, the job ran again elsewhere); its build is discarded, never served");
            return;
        }
        if info.err_build.starts_with(crate::engine::FENCED) {
            // This claim joined a run here of an older attempt, which was fenced: this attempt
            // has no build; it goes back to the queue.
            self.unclaim(&project, &id, claim.attempt).await;
            return;
        }
        self.record_end(&project, &id, &info, claim.attempt, whole.as_ref(), built)
            .await;
    }

    /// A group's chain moving to this agent: start from the group's last successful build,
    /// fetched with its cache from the agent holding it, or clean when it is not alive.
    pub(super) async fn place_group(&self, req: &JobRequest) {
        let (project, group) = (&req.project, &req.group);
        let last = async {
            let (client, err) = self.client().await?;
            rows::last_of_group(&client, project, group, self.judged())
                .await
                .map_err(err)
        }
        .await;
        let rows::GroupBuild {
            id: last_id,
            agent,
            agent_url: url,
            agent_alive: alive,
        } = match last {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%project, %group, error = %e, "the group's last build is unknown (database); this agent's own chain is used");
                return;
            }
        };
        let agent = agent.unwrap_or_default();
        let importer = self.engine.importer();
        let local = importer.layout().job(project, &last_id, Stage::Ready);
        if agent == self.me() {
            // The chain goes on from the build the record names (the group's link here may
            // point at a build published by a run that was fenced since): clean if it is gone.
            let base = local.read_info().is_some().then_some(&local);
            if let Err(e) = importer.link_group(project, group, base) {
                let link = importer.layout().link(project, group);
                tracing::warn!(%project, %group, error = %e, "could not update {}", link.display());
            }
            return;
        }
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
            match super::super::copies::fetch_build(&url, &importer, project, &last_id, true).await
            {
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

    /// Give a claimed job (attempt `attempt`) back to the queue (this agent cannot run it
    /// now).
    pub(super) async fn unclaim(&self, project: &str, id: &str, attempt: i32) {
        let result = async {
            let (client, err) = self.client().await?;
            rows::unclaim(&client, project, id, self.me(), attempt)
                .await
                .map_err(err)
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(%project, %id, error = %e, "could not give the job back to the queue; the sweeper will");
        }
    }

    /// Record the end of a job this agent ran as `attempt` (its build is in `ready/` already)
    /// and notify it; retried every second while the database does not answer. A fenced end
    /// (the record moved on) discards the build here: it is never served. `built`: `info` is
    /// the BuildInfo of the build in `ready/` (the run's; else a refusal's, without a build),
    /// handed to this agent's waiters with the end (they need not read it again).
    pub(super) async fn record_end(
        &self,
        project: &str,
        id: &str,
        info: &BuildInfo,
        attempt: i32,
        log: Option<&WholeLog>,
        built: bool,
    ) {
        // Before the record: its notification may come back before the update returns.
        if let Ok(mut r) = self.recorded.lock() {
            r.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(60));
            r.insert(
                key_of(project, id),
                (info.started_at.clone(), std::time::Instant::now()),
            );
        }
        let mut warned = false;
        let key = key_of(project, id);
        let own = |on: bool| {
            if let Ok(mut o) = self.own_ends.lock() {
                if on {
                    o.insert(key.clone());
                } else {
                    o.remove(&key);
                }
            }
        };
        for _ in 0..600 {
            let epoch = self.epoch();
            own(true);
            match self.try_record_end(project, id, info, attempt, log).await {
                Ok(done @ (rows::Recorded::Now | rows::Recorded::Already)) => {
                    if done == rows::Recorded::Already {
                        // Nothing notified by this call (if the first one's notification was
                        // delivered, it consumed the key already).
                        own(false);
                    }
                    self.verify(key.clone(), &info.started_at, epoch);
                    let _ = self
                        .ended_here
                        .send((key.clone(), built.then(|| Arc::new(info.clone()))));
                    return;
                }
                Ok(rows::Recorded::Fenced) => {
                    own(false);
                    self.forget_recorded(project, id);
                    self.fenced_end(project, id, info, attempt).await;
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
        own(false);
        self.forget_recorded(project, id);
    }

    /// The end of attempt `attempt` was fenced: its build here goes, unless the record names
    /// it after all (a later attempt of this agent took the same build as its answer) or a
    /// later attempt runs here (it replaces it); while the record cannot be read, it stays
    /// (answers check it against the record).
    async fn fenced_end(&self, project: &str, id: &str, info: &BuildInfo, attempt: i32) {
        let later_here = self.runs.lock().is_ok_and(|r| {
            r.get(&key_of(project, id))
                .is_some_and(|run| run.attempt > attempt)
        });
        let named = match self.read(project, id).await {
            Ok(Some(rec)) => {
                !rec.state.in_flight()
                    && rec.agent.as_deref() == Some(self.me())
                    && !is_stale(info, &rec)
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(%project, %id, error = %e, "the job's end was fenced; its build stays until it can be checked against the record");
                return;
            }
        };
        if named || later_here {
            tracing::info!(%project, %id, attempt, "the job's end was recorded by a later attempt of this agent");
            return;
        }
        tracing::warn!(%project, %id, agent = %self.me(), attempt, "the job's end was fenced: its record moved on meanwhile (this agent was taken for dead and the job ran again); its build here is discarded, never served");
        self.discard_copy(project, id, None, &info.started_at).await;
    }

    pub(super) fn forget_recorded(&self, project: &str, id: &str) {
        if let Ok(mut r) = self.recorded.lock() {
            r.remove(&key_of(project, id));
        }
    }

    pub(super) async fn try_record_end(
        &self,
        project: &str,
        id: &str,
        info: &BuildInfo,
        attempt: i32,
        log: Option<&WholeLog>,
    ) -> Result<rows::Recorded, ClusterError> {
        let db = self.db()?;
        let stored = BuildInfo {
            container_stdouterr: String::new(),
            container_stderr: String::new(),
            ..info.clone()
        };
        let json = serde_json::to_string(&stored).map_err(|e| db.error(e.to_string()))?;
        let state = JobState::of_end(info);
        let end = rows::End {
            state,
            build_info: &json,
            started_at: &info.started_at,
            built_here: info.err_build.is_empty(),
            attempt,
            log: log.map(|l| rows::EndLog {
                run: &l.run,
                streams: l.chunks.iter().map(|(s, _)| s.as_str()).collect(),
                data: l.chunks.iter().map(|(_, d)| &d[..]).collect(),
                notice: l.notice(project, id),
            }),
        };
        let (client, err) = self.client().await?;
        let recorded = rows::record_end(&client, project, id, self.me(), &end)
            .await
            .map_err(err)?;
        if recorded != rows::Recorded::Fenced {
            tracing::info!(%project, %id, %state, agent = %self.me(), "job recorded in the cluster");
        }
        Ok(recorded)
    }
}

/// A run's slot of this agent's `job_concurrency` (taken by its insert, its claim, or handed
/// to it while it waited here; slots.rs), given back once:
/// when the job's run on the engine ends — its end's record and log are written after that,
/// without the slot, so the next claim's run overlaps their round trips — or, at the latest,
/// when the claim is done with.
pub(super) struct Slot {
    scheduler: Arc<Scheduler>,
    held: std::sync::atomic::AtomicBool,
    /// The run holding it: its key and attempt ([`Scheduler::runs`]).
    run: (String, i32),
}

impl Slot {
    /// Give the slot back (the first call; later ones do nothing): the run holds none from
    /// now on (it is no sign that this agent is busy any more, see
    /// [`Scheduler::wait_briefly`]).
    pub(super) fn give_back(&self) {
        if self.held.swap(false, Ordering::SeqCst) {
            let (key, attempt) = &self.run;
            self.scheduler.set_since(key, *attempt, None);
            self.scheduler.release();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.give_back();
    }
}
