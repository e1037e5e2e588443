//! Failures and copies (see the parent's doc): the start-up healing of this agent's records,
//! the sweeper that puts a dead agent's running jobs back in the queue, and the stale copies of
//! builds that ran again elsewhere.

use super::*;

impl Scheduler {
    // ---------------------------------------------------------------- failures

    /// At start: the records this agent left `running` (it crashed), i.e. started before its
    /// registration: a build of the record's request in `ready/` is recorded (the crash came
    /// between the move and the record; it passed its fence), any other is queued again. Jobs
    /// this run of the agent took meanwhile (a request can arrive before this pass) are left
    /// alone.
    pub(super) async fn heal(&self) {
        let crashed = async {
            let (client, err) = self.client().await?;
            rows::lost_runs(&client, rows::Lost::Crashed(self.me()))
                .await
                .map_err(err)
        }
        .await;
        let crashed = match crashed {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(agent = %self.me(), error = %e, "could not look for the jobs a crash left running; the sweepers of other agents will not (this agent is alive)");
                return;
            }
        };
        for run in crashed {
            let (project, id) = (&run.project, &run.id);
            let identity = request_from_json(&run.request).map(|r| Identity::of(&r));
            let dir = self.engine.layout.job(project, id, Stage::Ready);
            match dir
                .read_info()
                .filter(|i| identity.as_ref().is_ok_and(|me| me.matches(i)))
                .filter(|i| of_this_run(i, run.started_at))
            {
                Some(info) => {
                    tracing::info!(%project, %id, "recording a build a crash left unrecorded");
                    self.record_end(project, id, &info, run.attempt, None, false)
                        .await;
                }
                None => {
                    tracing::info!(%project, %id, "queueing again a job a crash interrupted");
                    // It counts as a retry: a job that crashes its agent is not run forever.
                    if let Err(e) = self.requeue_lost(&run, true).await {
                        tracing::warn!(%project, %id, error = %e, "could not queue the job again");
                    }
                }
            }
        }
    }

    /// Put lost run `run` back in the queue — as a retry (`retry`: its agent died, crashed or
    /// was taken for dead; after a backoff), or as is (an orphan) — or, when a retry
    /// would make more runs than `job_attempts`, fail it with a BuildInfo that says so.
    pub(super) async fn requeue_lost(
        &self,
        run: &rows::LostRun,
        retry: bool,
    ) -> Result<(), ClusterError> {
        let (project, id) = (&run.project, &run.id);
        let (client, err) = self.client().await?;
        let runs = run.retries.saturating_add(1);
        if retry && i64::from(runs) >= i64::from(self.cluster.job_attempts) {
            let info = self.out_of_attempts(run, runs);
            let db = self.db()?;
            let json = serde_json::to_string(&info).map_err(|e| db.error(e.to_string()))?;
            if rows::fail_lost(&client, run, &json).await.map_err(err)? {
                tracing::error!(%project, %id, from = %run.agent, runs, "job failed: it lost its agent on each of its job_attempts runs");
            }
            return Ok(());
        }
        let wait = if retry {
            backoff(run.retries)
        } else {
            Duration::ZERO
        };
        if rows::requeue_lost(&client, run, wait, retry)
            .await
            .map_err(err)?
        {
            if retry {
                tracing::warn!(%project, %id, from = %run.agent, retries = runs, ?wait, "job queued again: its agent stopped heartbeating or crashed");
            } else {
                tracing::warn!(%project, %id, from = %run.agent, "job queued again: its run was lost (a crash, or a reply lost between the agent and the database)");
            }
        }
        Ok(())
    }

    /// The BuildInfo of a job that lost its agent on each of its `runs` runs.
    fn out_of_attempts(&self, run: &rows::LostRun, runs: i32) -> BuildInfo {
        let req = request_from_json(&run.request).unwrap_or_else(|_| JobRequest {
            project: run.project.clone(),
            ..JobRequest::default()
        });
        let dir = self.engine.layout.job(&run.project, &run.id, Stage::Ready);
        BuildInfo {
            err_build: format!(
                "Error building {}: the job lost its agent {runs} times (the last one: {}, \
                 which stopped heartbeating or crashed while it ran the job); job_attempts is \
                 {}: it is not run again (ask again to run it anew)",
                run.project, run.agent, self.cluster.job_attempts
            ),
            // As a job abandoned at its time limit: it ran, its exit is unknown.
            exit_code: -1,
            retries: u32::try_from(run.retries).unwrap_or_default(),
            ..self.engine.blank_info(&req, &dir)
        }
    }

    /// Put back in the queue the runs of agents that are not alive (judged by
    /// [`Scheduler::judged`]'s timeout).
    pub(super) async fn requeue_dead(&self) -> Result<(), ClusterError> {
        let lost = {
            let (client, err) = self.client().await?;
            rows::lost_runs(&client, rows::Lost::DeadAgents(self.judged()))
                .await
                .map_err(err)?
        };
        for run in &lost {
            self.requeue_lost(run, true).await?;
        }
        Ok(())
    }

    /// This agent's `running` records that none of its runs is (started more than
    /// `agent_timeout` ago: a reply lost between a claim or an insert and this agent, whose
    /// run never started) go back to the queue.
    pub(super) async fn rescue_orphans(&self) -> Result<(), ClusterError> {
        let mine = {
            let (client, err) = self.client().await?;
            rows::lost_runs(
                &client,
                rows::Lost::Mine(self.me(), self.cluster.agent_timeout),
            )
            .await
            .map_err(err)?
        };
        for run in mine
            .iter()
            .filter(|r| !self.runs_now(&key_of(&r.project, &r.id), r.attempt))
        {
            self.requeue_lost(run, false).await?;
        }
        Ok(())
    }

    /// A job that ran again on another agent (a rebuild, a re-run after a failure or of a dead
    /// agent's build) leaves this agent's copy stale: on its end's notification, a local copy
    /// whose `StartedAt` is not the record's goes (the next request fetches the new build).
    /// An agent that was down meanwhile checks its copies at start ([`Scheduler::drop_stale_copies`]).
    pub(super) async fn stale_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
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
                Ok(Event::Queued | Event::Running(_)) => continue,
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
            // An end this agent recorded is known by its `StartedAt` alone (no whole read).
            let recorded = self.recorded.lock().ok().and_then(|mut r| r.remove(&key));
            if let Some((started, at)) = recorded {
                let ours = at.elapsed() < Duration::from_secs(60)
                    && local.read_started_at().is_some_and(|s| s == started);
                if ours {
                    continue;
                }
            }
            let Some(mine) = local.read_info() else {
                continue;
            };
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
    pub(super) async fn drop_stale_copies(&self) {
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
            let held = async {
                let (client, err) = self.client().await?;
                rows::held_elsewhere(&client, &projects, &ids, self.me())
                    .await
                    .map_err(err)
            }
            .await;
            let held = match held {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(agent = %self.me(), error = %e, "could not check this agent's copies against their records");
                    continue;
                }
            };
            for (project, id, agent, theirs) in held {
                // A build this agent runs or is recording now is its own, not a copy.
                let key = key_of(&project, &id);
                let busy = self.runs.lock().is_ok_and(|r| r.contains_key(&key))
                    || self.recorded.lock().is_ok_and(|r| r.contains_key(&key));
                if busy {
                    continue;
                }
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

    /// Every `heartbeat`: queue again the running jobs of agents that stopped heartbeating,
    /// and this agent's orphans ([`Scheduler::rescue_orphans`]). Silence is only judged once
    /// this agent has reached the database for `agent_timeout` without a break (since its
    /// start, or since an outage or a lost connection: the others' heartbeats could not get
    /// through either; [`Scheduler::judged`]), and — in the statements — once the database
    /// has been up that long (a database restart is no agent's death).
    pub(super) async fn sweep_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.cluster.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let since = match self.reached_since.lock() {
                Ok(mut r) => *r.get_or_insert_with(tokio::time::Instant::now),
                Err(_) => continue,
            };
            // An answer later than a heartbeat is an outage too (a stalled database: the
            // others' heartbeats could not get through either).
            let patience = self.cluster.heartbeat.max(STATEMENT_PATIENCE);
            let work = async {
                if since.elapsed() < self.cluster.agent_timeout {
                    self.ping().await
                } else {
                    self.requeue_dead().await?;
                    self.rescue_orphans().await
                }
            };
            let result = tokio::time::timeout(patience, work)
                .await
                .unwrap_or_else(|_| Err(self.cluster.no_answer(patience)));
            if let Err(e) = result {
                tracing::debug!(agent = %self.me(), error = %e, "the sweeper could not reach the database");
                if let Ok(mut r) = self.reached_since.lock() {
                    *r = None;
                }
            }
        }
    }

    pub(super) async fn ping(&self) -> Result<(), ClusterError> {
        let (client, err) = self.client().await?;
        rows::ping(&client).await.map_err(err)
    }
}

/// How far the agent's clock may be behind the database's when a build is judged to be of a
/// run ([`of_this_run`]).
const CLOCK_SKEW: f64 = 5.0;

/// Whether build `info` is of the run that started (was claimed) at `started` (seconds since
/// the epoch, the database's clock): it started after, give or take [`CLOCK_SKEW`] — an older
/// build of the job (the one a rebuild was to replace) is not.
fn of_this_run(info: &BuildInfo, started: Option<f64>) -> bool {
    let Some(started) = started else {
        return false;
    };
    chrono::DateTime::parse_from_rfc3339(&info.started_at).is_ok_and(|t| {
        let t = t.timestamp() as f64 + f64::from(t.timestamp_subsec_nanos()) / 1e9;
        t >= started - CLOCK_SKEW
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_is_of_a_run_when_it_started_after_its_claim() {
        let info = |at: &str| BuildInfo {
            started_at: at.to_string(),
            ..crate::engine::blank_info(&Default::default(), "", "p", "abc")
        };
        // 2026-12-06T12:00:00Z
        let claimed = Some(1_796_558_400.0);
        assert!(of_this_run(&info("2026-12-06T12:00:01Z"), claimed));
        // The agent's clock a little behind the database's.
        assert!(of_this_run(&info("2026-12-06T11:59:56.5Z"), claimed));
        // The build a rebuild was to replace.
        assert!(!of_this_run(&info("2026-12-06T11:50:00Z"), claimed));
        assert!(!of_this_run(&info("not a time"), claimed));
        assert!(!of_this_run(&info("2026-12-06T12:00:01Z"), None));
    }
}
