//! An in-memory fake of the jobs interface, for tests that run in milliseconds: records keyed by
//! (project, ID) whose every state change goes through [`JobState`]'s transitions, and agents
//! the test drives — it claims queued jobs for an agent ([`FakeJobs::claim`]), ends them
//! ([`FakeJobs::end`]), declares an agent dead ([`FakeJobs::rescue`]) or drops an ended build
//! ([`FakeJobs::discard`]). In `auto` mode every queued job is claimed and ended at once with
//! its project's exit code ([`FakeJobs::exit_code`]), as the pipeline runner's tests want.
//!
//! What it answers follows both real back ends: one job per request identity (project, group,
//! params, inputs), a request joining the same job in flight (`coalesced`), a successful ended
//! job answering from the result cache (`cached`) unless `rebuild`, a failed or discarded one
//! running again.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::{
    AgentInfo, Answer, ByteStream, ClusterJobsFilter, Export, ExportError, Found, Hold, JobError,
    JobState, JobView, Jobs, Lines, LogTail, Recorded, Submitted,
};
use crate::config::Config;
use crate::engine::{Layout, Stage};
use crate::jobs::{BuildInfo, JobRequest};
use crate::metrics::Metrics;

/// One job's record.
#[derive(Debug, Clone)]
pub(crate) struct FakeRecord {
    pub state: JobState,
    pub agent: Option<String>,
    /// Its end (`None` while it has not ended since it last ran).
    pub info: Option<BuildInfo>,
    /// How many times it was queued (1 for a job that ran once).
    pub runs: u32,
    /// How many times a dead agent's run of it was put back in the queue.
    pub retries: u32,
    request: JobRequest,
}

#[derive(Default)]
struct State {
    records: BTreeMap<(String, String), FakeRecord>,
    /// The order jobs were queued in (the claims take the oldest first).
    queue: Vec<(String, String)>,
    /// Every submit, in order (project, ID).
    submits: Vec<(String, String)>,
    exit_codes: BTreeMap<String, i32>,
}

/// The fake (see the module's doc).
pub(crate) struct FakeJobs {
    cfg: Config,
    metrics: Metrics,
    layout: Layout,
    projects: BTreeSet<String>,
    auto: bool,
    state: Mutex<State>,
    /// Bumped at every change: waiters read the records again.
    changes: watch::Sender<u64>,
}

/// A request's job ID: a hash of its identity (the real IDs hash the project's files too).
pub(crate) fn fake_id(req: &JobRequest) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&req.project, &req.group, &req.params, &req.inputs).hash(&mut h);
    format!("{:016x}", h.finish())
}

impl FakeJobs {
    /// A fake over `cfg` knowing `projects`; `auto`: jobs run (and end) as soon as they are
    /// queued.
    pub(crate) fn new(cfg: Config, projects: &[&str], auto: bool) -> Arc<FakeJobs> {
        Arc::new(FakeJobs {
            layout: Layout::new(cfg.build_path.clone()),
            cfg,
            metrics: Metrics::new(),
            projects: projects
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
            auto,
            state: Mutex::new(State::default()),
            changes: watch::channel(0).0,
        })
    }

    /// The configuration it was made with.
    pub(crate) fn cfg(&self) -> &Config {
        &self.cfg
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// The exit code `auto` mode ends `project`'s jobs with (default 0).
    pub(crate) fn exit_code(&self, project: &str, code: i32) {
        self.lock().exit_codes.insert(project.to_string(), code);
    }

    /// Job `project/id`'s record.
    pub(crate) fn record(&self, project: &str, id: &str) -> Option<FakeRecord> {
        self.lock()
            .records
            .get(&(project.to_string(), id.to_string()))
            .cloned()
    }

    /// Every submit so far (project, ID), in order.
    pub(crate) fn submits(&self) -> Vec<(String, String)> {
        self.lock().submits.clone()
    }

    /// `agent` claims the oldest queued job: its key.
    pub(crate) fn claim(&self, agent: &str) -> Option<(String, String)> {
        let key = {
            let mut st = self.lock();
            let State { records, queue, .. } = &mut *st;
            let pos = queue
                .iter()
                .position(|k| records.get(k).is_some_and(|r| r.state.claim().is_some()))?;
            let key = queue.remove(pos);
            let rec = records.get_mut(&key)?;
            rec.state = rec.state.claim()?;
            rec.agent = Some(agent.to_string());
            key
        };
        self.changed();
        Some(key)
    }

    /// `agent` ends job `project/id` with `exit_code`; whether the record took it (it is
    /// `agent`'s running job, or queued again meanwhile: [`JobState::end`]).
    pub(crate) fn end(&self, agent: &str, project: &str, id: &str, exit_code: i32) -> bool {
        let ended = {
            let mut st = self.lock();
            let key = (project.to_string(), id.to_string());
            let Some(rec) = st.records.get_mut(&key) else {
                return false;
            };
            let mine = rec.state == JobState::Queued || rec.agent.as_deref() == Some(agent);
            match rec.state.end(exit_code == 0).filter(|_| mine) {
                Some(next) => {
                    let mut info = crate::engine::blank_info(
                        &rec.request.params,
                        &rec.request.group,
                        project,
                        id,
                    );
                    info.exit_code = exit_code;
                    rec.state = next;
                    rec.agent = Some(agent.to_string());
                    rec.info = Some(info);
                    st.queue.retain(|k| *k != key);
                    true
                }
                None => false,
            }
        };
        if ended {
            self.changed();
        }
        ended
    }

    /// `agent` is dead: its running jobs go back to the queue ([`JobState::requeue`]), each
    /// counting a retry; how many.
    pub(crate) fn rescue(&self, agent: &str) -> usize {
        let n = {
            let mut st = self.lock();
            let State { records, queue, .. } = &mut *st;
            let mut n = 0;
            for (key, rec) in records.iter_mut() {
                if rec.agent.as_deref() != Some(agent) {
                    continue;
                }
                if let Some(next) = rec.state.requeue() {
                    rec.state = next;
                    rec.agent = None;
                    rec.retries += 1;
                    queue.push(key.clone());
                    n += 1;
                }
            }
            n
        };
        self.changed();
        self.run_auto();
        n
    }

    /// Drop ended job `project/id`'s build and record (retention; a stale copy); refused (false)
    /// while it is in flight.
    pub(crate) fn discard(&self, project: &str, id: &str) -> bool {
        let mut st = self.lock();
        let key = (project.to_string(), id.to_string());
        match st.records.get(&key) {
            Some(rec) if !rec.state.in_flight() => {
                st.records.remove(&key);
                true
            }
            _ => false,
        }
    }

    /// `auto` mode: claim and end every queued job.
    fn run_auto(&self) {
        if !self.auto {
            return;
        }
        while let Some((project, id)) = self.claim("auto") {
            let code = self.lock().exit_codes.get(&project).copied().unwrap_or(0);
            self.end("auto", &project, &id, code);
        }
    }

    /// The end of job `key` once it leaves flight: its BuildInfo as a request sees it.
    async fn wait_end(
        self: Arc<Self>,
        key: (String, String),
        coalesced: bool,
    ) -> Result<Answer, JobError> {
        let mut changes = self.changes.subscribe();
        loop {
            let ended = {
                let st = self.lock();
                match st.records.get(&key) {
                    None => {
                        return Err(JobError::Internal(format!(
                            "Error building {}/{}: the job's record was deleted",
                            key.0, key.1
                        )))
                    }
                    Some(r) if !r.state.in_flight() => r.info.clone(),
                    Some(_) => None,
                }
            };
            if let Some(mut info) = ended {
                info.coalesced = coalesced;
                let dir = self.layout.job(&key.0, &key.1, Stage::Ready);
                return Ok(Answer { info, dir });
            }
            if changes.changed().await.is_err() {
                return Err(JobError::Overloaded);
            }
        }
    }

    /// [`Jobs::submit`] of the fake (an `Arc` receiver: the end waits on it).
    pub(crate) fn submit_now(self: &Arc<Self>, req: JobRequest) -> Result<Submitted, JobError> {
        if !self.projects.contains(&req.project) {
            return Err(JobError::UnknownProject(req.project));
        }
        let id = fake_id(&req);
        let key = (req.project.clone(), id.clone());
        enum Then {
            Cached(Box<BuildInfo>),
            Wait { coalesced: bool },
        }
        let then = {
            let mut st = self.lock();
            st.submits.push(key.clone());
            let (then, queued) = match st.records.get_mut(&key) {
                Some(rec) if rec.state.in_flight() => {
                    self.metrics.coalesced();
                    (Then::Wait { coalesced: true }, false)
                }
                Some(rec) if rec.state == JobState::Ready && !req.rebuild => {
                    self.metrics.cached();
                    let mut info = rec.info.clone().unwrap_or_else(|| {
                        crate::engine::blank_info(&req.params, &req.group, &req.project, &id)
                    });
                    info.cached = true;
                    (Then::Cached(Box::new(info)), false)
                }
                Some(rec) => {
                    // Failed, or a rebuild: it runs again.
                    let next = rec.state.rerun().ok_or_else(|| {
                        JobError::Internal(format!("{} cannot run again", rec.state))
                    })?;
                    rec.state = next;
                    rec.agent = None;
                    rec.info = None;
                    rec.runs += 1;
                    (Then::Wait { coalesced: false }, true)
                }
                None => {
                    st.records.insert(
                        key.clone(),
                        FakeRecord {
                            state: JobState::Queued,
                            agent: None,
                            info: None,
                            runs: 1,
                            retries: 0,
                            request: req.clone(),
                        },
                    );
                    (Then::Wait { coalesced: false }, true)
                }
            };
            if queued {
                st.queue.push(key.clone());
            }
            then
        };
        self.changed();
        let dir = self.layout.job(&req.project, &id, Stage::Ready);
        let submitted = match then {
            Then::Cached(info) => {
                let answer = Answer {
                    info: *info,
                    dir: dir.clone(),
                };
                Submitted::new(
                    &req.project,
                    &id,
                    dir,
                    Some(true),
                    None,
                    Box::pin(async move { Ok(answer) }),
                )
            }
            Then::Wait { coalesced } => {
                let end = Box::pin(Arc::clone(self).wait_end(key, coalesced));
                Submitted::new(&req.project, &id, dir, Some(false), None, end)
            }
        };
        self.run_auto();
        Ok(submitted)
    }
}

/// The fake as the interface ([`Jobs`] needs an `Arc` to wait on: this wraps one).
pub(crate) struct FakeHandle(pub Arc<FakeJobs>);

#[async_trait::async_trait]
impl Jobs for FakeHandle {
    fn config(&self) -> &Config {
        &self.0.cfg
    }

    fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    async fn submit(&self, req: JobRequest) -> Result<Submitted, JobError> {
        self.0.submit_now(req)
    }

    async fn find(&self, project: &str, id: &str) -> Result<Option<JobView>, JobError> {
        Ok(self.0.record(project, id).map(|r| {
            JobView::Elsewhere(Recorded {
                project: project.to_string(),
                id: id.to_string(),
                state: r.state,
                agent: r.agent.clone(),
                info: r.info.clone().unwrap_or_else(|| {
                    crate::engine::blank_info(&r.request.params, &r.request.group, project, id)
                }),
            })
        }))
    }

    async fn document(&self, _: &str, _: &str) -> Result<Option<ByteStream>, JobError> {
        Ok(None)
    }

    async fn follow(&self, _: &str, _: &str) -> Result<Option<Lines>, JobError> {
        Ok(None)
    }

    async fn log_tail(
        &self,
        _: &str,
        _: &str,
        _: Option<u64>,
    ) -> Result<Option<LogTail>, JobError> {
        Ok(None)
    }

    async fn artifacts(&self, _: &str, _: &str) -> Option<Found> {
        None
    }

    fn hold(&self, _: &str, _: &str) -> Option<Hold> {
        None
    }

    fn list(&self) -> Box<dyn Iterator<Item = Found> + Send + '_> {
        Box::new(std::iter::empty())
    }

    async fn cluster_jobs(
        &self,
        _: &ClusterJobsFilter,
    ) -> Result<Option<Vec<serde_json::Value>>, JobError> {
        Ok(None)
    }

    async fn job_agents(
        &self,
        _: Option<(String, String)>,
    ) -> Result<BTreeMap<String, String>, JobError> {
        Ok(BTreeMap::new())
    }

    async fn agents(&self) -> Result<Vec<AgentInfo>, JobError> {
        Ok(Vec::new())
    }

    async fn capacity(&self) -> usize {
        4
    }

    async fn refresh_gauges(&self) {}

    fn export(&self, project: &str, id: &str, _: bool) -> Result<Export, ExportError> {
        // The fake has no builds.
        Err(ExportError::NotReady {
            project: project.to_string(),
            id: id.to_string(),
        })
    }
}
