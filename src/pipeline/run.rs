//! Pipeline runs: the DAG executor and the run records.
//!
//! A run submits each job whose needs are ready through the jobs interface ([`Jobs::submit`]:
//! the back end's `job_concurrency`, result cache and coalescing apply to every job), with its
//! needs as
//! [`JobRequest::inputs`]; a failed job skips its dependents, the others go on. One task owns a
//! run's record: every change goes through [`Exec::publish`], which sends it to the run's
//! followers (a watch channel: `POST` waiting, SSE, coalesced requests), writes it atomically to
//! `<build_path>/.pipelines/<name>/<run>/run.json` and tells the [`Observer`].
//!
//! Several agents (`database_url`): the back end is the cluster's job records, so each job runs
//! once cluster-wide, on the agent placement chooses (an agent that does not hold a job's input
//! builds fetches them first), and its build is then in this agent's `ready/` as a request's
//! answer is. The run itself (its record, its followers, its triggers) stays on the agent that
//! took it.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};

use sha2::{Digest, Sha256};

use super::def::{self, Pipeline, Values};
use super::PipelineError;
use crate::jobs::{BuildInfo, Input, JobRequest, NEVER_RAN};
use crate::service::{Hold, JobError, Jobs};

/// Sees every run's record at each change (called on the run's task: keep it short).
pub(crate) type Observer = Arc<dyn Fn(&RunRecord) + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobRunState {
    /// Its needs are not ready yet.
    Waiting,
    /// Accepted, waiting for a slot.
    Queued,
    /// Running.
    Pending,
    /// Ended successfully.
    Ready,
    /// Ended with a non-zero exit code or an error (`err_build`).
    Failed,
    /// Not run: a job it needs failed or was skipped.
    Skipped,
}

impl JobRunState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobRunState::Waiting => "waiting",
            JobRunState::Queued => "queued",
            JobRunState::Pending => "pending",
            JobRunState::Ready => "ready",
            JobRunState::Failed => "failed",
            JobRunState::Skipped => "skipped",
        }
    }
}

/// A link to a run (`triggered`, `caused_by`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunLink {
    pub pipeline: String,
    pub run: String,
    pub url: String,
    /// Why a trigger did not start (then `run` and `url` are empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl RunLink {
    pub fn new(pipeline: &str, run: &str) -> RunLink {
        RunLink {
            pipeline: pipeline.to_string(),
            run: run.to_string(),
            url: format!("pipeline/{pipeline}/{run}"),
            error: String::new(),
        }
    }
}

/// One job of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRun {
    pub name: String,
    pub project: String,
    pub group: String,
    pub params: BTreeMap<String, String>,
    pub needs: Vec<String>,
    pub state: JobRunState,
    /// The job's ID once scheduled (else empty).
    pub id: String,
    /// `job/<project>/<id>` once scheduled.
    pub url: String,
    /// -999 until the job ended (and for a job whose image did not build).
    pub exit_code: i32,
    pub cached: bool,
    pub coalesced: bool,
    pub incremental: bool,
    /// Its artifacts once ready.
    pub path: String,
    pub err_build: String,
}

/// A run's record (`GET /pipeline/{name}/{run}`, `run.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub pipeline: String,
    pub run: String,
    pub params: BTreeMap<String, String>,
    pub state: RunState,
    pub started_at: String,
    /// Nanoseconds; -1 while running.
    pub duration: i64,
    pub url: String,
    /// In a topological order.
    pub jobs: Vec<JobRun>,
    /// The jobs that failed (not those skipped).
    pub failed: Vec<String>,
    pub triggered: Vec<RunLink>,
    pub caused_by: Option<RunLink>,
    /// Why the run ended without running its jobs to the end (e.g. mistryd stopped).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// 0 for an ordinary run; N for the Nth rebuild ("Retrigger run") of the run `rebuild_of`:
    /// every job scheduled with `rebuild` (the result cache ignored). Omitted when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rebuild: u32,
    /// The ordinary run (same pipeline, params and definition) this run rebuilds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_of: Option<RunLink>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl RunRecord {
    pub fn job(&self, name: &str) -> Option<&JobRun> {
        self.jobs.iter().find(|j| j.name == name)
    }
}

/// `<build_path>/.pipelines`.
pub(crate) fn runs_dir(build_path: &Path) -> PathBuf {
    build_path.join(".pipelines")
}

/// A run ID as [`Pipeline::run_id`] makes them (64 lowercase hex digits).
pub(crate) fn is_run_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The run ID of the `n`th rebuild of run `base`: sha256 of `rebuild\0<base>\0<n>\0`.
pub(crate) fn rebuild_run_id(base: &str, n: u32) -> String {
    let mut h = Sha256::new();
    for part in ["rebuild", base, &n.to_string()] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// Reserve the next rebuild of run `base` of `pipeline`: the first `n` from 1 whose run
/// directory `create_dir` makes (atomic, so two rebuilds at once get different numbers).
fn reserve_rebuild(
    build_path: &Path,
    pipeline: &str,
    base: &str,
) -> std::io::Result<(u32, String)> {
    let dir = runs_dir(build_path).join(pipeline);
    std::fs::create_dir_all(&dir)?;
    for n in 1..=u32::MAX {
        let run = rebuild_run_id(base, n);
        match std::fs::create_dir(dir.join(&run)) {
            Ok(()) => return Ok((n, run)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no rebuild number left"))
}

fn record_file(build_path: &Path, pipeline: &str, run: &str) -> PathBuf {
    runs_dir(build_path)
        .join(pipeline)
        .join(run)
        .join("run.json")
}

/// The stored record of a run (blocking).
pub(crate) fn read_record(build_path: &Path, pipeline: &str, run: &str) -> Option<RunRecord> {
    if crate::jobs::check_name("pipeline", pipeline).is_err() || !is_run_id(run) {
        return None;
    }
    let bytes = std::fs::read(record_file(build_path, pipeline, run)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Store a record atomically (tmp + rename; blocking).
pub(crate) fn write_record(build_path: &Path, rec: &RunRecord) -> std::io::Result<()> {
    let file = record_file(build_path, &rec.pipeline, &rec.run);
    let dir = file.parent().unwrap_or(build_path);
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(".run.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, file)
}

/// Every stored run, newest first (blocking).
pub(crate) fn list_records(build_path: &Path) -> Vec<RunRecord> {
    let mut out = Vec::new();
    let Ok(pipelines) = std::fs::read_dir(runs_dir(build_path)) else {
        return out;
    };
    for p in pipelines.flatten() {
        let name = p.file_name().to_string_lossy().into_owned();
        let Ok(runs) = std::fs::read_dir(p.path()) else {
            continue;
        };
        for r in runs.flatten() {
            if let Some(rec) = read_record(build_path, &name, &r.file_name().to_string_lossy()) {
                out.push(rec);
            }
        }
    }
    out.sort_by(|a, b| b.started_at.cmp(&a.started_at));
    out
}

/// Start-up: a run stored as running, and not `in_flight`, belongs to a daemon that stopped; it
/// is failed now (blocking).
pub(crate) fn fail_interrupted(build_path: &Path, in_flight: impl Fn(&str, &str) -> bool) {
    for mut rec in list_records(build_path) {
        if rec.state != RunState::Running || in_flight(&rec.pipeline, &rec.run) {
            continue;
        }
        rec.state = RunState::Failed;
        rec.error = "mistryd stopped during the run".into();
        for j in &mut rec.jobs {
            match j.state {
                JobRunState::Waiting => j.state = JobRunState::Skipped,
                JobRunState::Queued | JobRunState::Pending => {
                    j.state = JobRunState::Failed;
                    j.err_build = "mistryd stopped before the job ended".into();
                    rec.failed.push(j.name.clone());
                }
                _ => {}
            }
        }
        if let Err(e) = write_record(build_path, &rec) {
            tracing::warn!(pipeline = %rec.pipeline, run = %rec.run, error = %e, "could not mark an interrupted run failed");
        }
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

type RunKey = (String, String);

/// What [`Runs::start`] gives: the run's record to follow, and whether it joined a run in
/// flight.
pub(crate) type StartFuture = Pin<
    Box<dyn Future<Output = Result<(watch::Receiver<Arc<RunRecord>>, bool), PipelineError>> + Send>,
>;

/// The runs of one server (or one local runner): those in flight, for coalescing and following.
pub(crate) struct Runs {
    /// The jobs (this agent's engine, or the cluster's records).
    jobs: Arc<dyn Jobs>,
    /// Where `pipelines/` is.
    projects_path: PathBuf,
    in_flight: Mutex<HashMap<RunKey, watch::Receiver<Arc<RunRecord>>>>,
    /// Job (`project`, `id`) → the run it belongs to: the latest run that scheduled it other
    /// than from the result cache (see [`Runs::job_runs`]).
    by_job: Mutex<HashMap<(String, String), RunLink>>,
    idle: Notify,
    observer: Option<Observer>,
}

impl Runs {
    /// The runs of pipelines defined in `projects_path`, whose jobs go to `jobs`.
    pub(crate) fn new(
        jobs: Arc<dyn Jobs>,
        projects_path: PathBuf,
        observer: Option<Observer>,
    ) -> Arc<Runs> {
        Arc::new(Runs {
            jobs,
            projects_path,
            in_flight: Mutex::new(HashMap::new()),
            by_job: Mutex::new(HashMap::new()),
            idle: Notify::new(),
            observer,
        })
    }

    pub(crate) fn jobs(&self) -> &Arc<dyn Jobs> {
        &self.jobs
    }

    fn build_path(&self) -> &Path {
        &self.jobs.config().build_path
    }

    pub(crate) fn projects_path(&self) -> &Path {
        &self.projects_path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RunKey, watch::Receiver<Arc<RunRecord>>>> {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn by_job(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), RunLink>> {
        self.by_job
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Which run each job belongs to: the latest run that scheduled it and did not find it in
    /// the result cache (it built it, rebuilt it, or joined its build in flight). Jobs run by
    /// `POST /jobs` alone are not there.
    pub(crate) fn job_runs(&self) -> Vec<((String, String), RunLink)> {
        let mut v: Vec<_> = self
            .by_job()
            .iter()
            .map(|(k, l)| (k.clone(), l.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Fill [`Runs::job_runs`] from the stored records (at start; blocking). What runs noted
    /// meanwhile is newer and stays.
    pub(crate) fn load_job_runs(&self) {
        let mut found = HashMap::new();
        // Oldest first: a later run takes the job over.
        for rec in list_records(self.build_path()).iter().rev() {
            for j in &rec.jobs {
                if !j.id.is_empty() && !j.cached {
                    found.insert(
                        (j.project.clone(), j.id.clone()),
                        RunLink::new(&rec.pipeline, &rec.run),
                    );
                }
            }
        }
        let mut map = self.by_job();
        for (k, v) in found {
            map.entry(k).or_insert(v);
        }
    }

    /// Load and validate pipeline `name` (blocking).
    pub(crate) fn load(&self, name: &str) -> Result<Pipeline, PipelineError> {
        Pipeline::load(&self.projects_path, &self.jobs.config().projects_path, name)
    }

    /// Validate and start a run (or join the identical run in flight); its record follows.
    /// `bool`: joined a run in flight.
    ///
    /// (A boxed future of a named type: a run starts the runs it triggers.)
    pub(crate) fn start(
        self: &Arc<Self>,
        name: &str,
        params: BTreeMap<String, String>,
        caused_by: Option<RunLink>,
    ) -> StartFuture {
        Box::pin(Arc::clone(self).start_run(name.to_string(), params, caused_by, false))
    }

    /// Start a rebuild of a run ("Retrigger run"): every job scheduled with `rebuild` (the result
    /// cache ignored), as a new run of its own, never coalesced: its ID is
    /// [`rebuild_run_id`]`(ordinary run ID, N)` for the Nth rebuild, and its record says
    /// `rebuild: N` and `rebuild_of`. The runs it triggers are ordinary runs.
    pub(crate) fn start_rebuild(
        self: &Arc<Self>,
        name: &str,
        params: BTreeMap<String, String>,
    ) -> StartFuture {
        Box::pin(Arc::clone(self).start_run(name.to_string(), params, None, true))
    }

    async fn start_run(
        self: Arc<Self>,
        name: String,
        params: BTreeMap<String, String>,
        caused_by: Option<RunLink>,
        rebuild: bool,
    ) -> Result<(watch::Receiver<Arc<RunRecord>>, bool), PipelineError> {
        let (me, n) = (Arc::clone(&self), name.clone());
        let p = tokio::task::spawn_blocking(move || me.load(&n))
            .await
            .map_err(|e| PipelineError::Internal(e.to_string()))??;
        let params = p.resolve_params(&params)?;
        let base = p.run_id(&params);
        let (run, number, rebuild_of) = if rebuild {
            let (b, name, base2) = (
                self.build_path().to_path_buf(),
                p.name.clone(),
                base.clone(),
            );
            let (n, run) = tokio::task::spawn_blocking(move || reserve_rebuild(&b, &name, &base2))
                .await
                .map_err(|e| PipelineError::Internal(e.to_string()))?
                .map_err(|e| {
                    PipelineError::Internal(format!(
                        "pipeline {}: storing a rebuild of run {base}: {e}",
                        p.name
                    ))
                })?;
            (run, n, Some(RunLink::new(&p.name, &base)))
        } else {
            (base, 0, None)
        };
        let key = (p.name.clone(), run.clone());
        let mut runs = self.lock();
        if let Some(rx) = runs.get(&key) {
            self.jobs.metrics().pipeline_coalesced();
            tracing::info!(pipeline = %p.name, %run, "pipeline run joins a running identical run");
            return Ok((rx.clone(), true));
        }
        let record = RunRecord {
            pipeline: p.name.clone(),
            run: run.clone(),
            url: format!("pipeline/{}/{run}", p.name),
            params: params.clone(),
            state: RunState::Running,
            started_at: now_rfc3339(),
            duration: -1,
            jobs: initial_jobs(&p, &params, &run),
            failed: Vec::new(),
            triggered: Vec::new(),
            caused_by,
            error: String::new(),
            rebuild: number,
            rebuild_of,
        };
        let (tx, rx) = watch::channel(Arc::new(record.clone()));
        runs.insert(key.clone(), rx.clone());
        drop(runs);
        self.jobs.metrics().pipeline_started();
        tracing::info!(pipeline = %p.name, %run, rebuild = number, "pipeline run started");
        let exec = Exec {
            runs: Arc::clone(&self),
            p,
            rebuild,
            rec: record,
            tx,
            started: Instant::now(),
            holds: Vec::new(),
            unlinked: Default::default(),
        };
        tokio::spawn(exec.execute(key));
        Ok((rx, false))
    }

    /// Run a pipeline to its end (or follow the identical run in flight to its end).
    pub(crate) async fn run(
        self: &Arc<Self>,
        name: &str,
        params: BTreeMap<String, String>,
    ) -> Result<RunRecord, PipelineError> {
        let (rx, _) = self.start(name, params, None).await?;
        wait_end(rx).await
    }

    /// A run in flight.
    pub(crate) fn watch(
        &self,
        pipeline: &str,
        run: &str,
    ) -> Option<watch::Receiver<Arc<RunRecord>>> {
        self.lock()
            .get(&(pipeline.to_string(), run.to_string()))
            .cloned()
    }

    /// A run in flight, else stored.
    pub(crate) async fn find(&self, pipeline: &str, run: &str) -> Option<RunRecord> {
        if let Some(rx) = self.watch(pipeline, run) {
            return Some(RunRecord::clone(&rx.borrow()));
        }
        let (b, p, r) = (
            self.build_path().to_path_buf(),
            pipeline.to_string(),
            run.to_string(),
        );
        tokio::task::spawn_blocking(move || read_record(&b, &p, &r))
            .await
            .ok()
            .flatten()
    }

    /// Wait until no run is in flight (the runs triggered by others too).
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.lock().is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// Wait for a run's end and give its final record.
pub(crate) async fn wait_end(
    mut rx: watch::Receiver<Arc<RunRecord>>,
) -> Result<RunRecord, PipelineError> {
    let ended = rx
        .wait_for(|r| r.state != RunState::Running)
        .await
        .map(|r| RunRecord::clone(&r));
    ended.map_err(|_| {
        let r = rx.borrow();
        PipelineError::Internal(format!(
            "pipeline {} run {}: the run ended without a result",
            r.pipeline, r.run
        ))
    })
}

/// A run's jobs before it starts: their params and group expanded, all waiting.
fn initial_jobs(p: &Pipeline, params: &BTreeMap<String, String>, run: &str) -> Vec<JobRun> {
    let values = Values {
        params,
        pipeline: &p.name,
        run,
        job_ids: None,
    };
    p.jobs
        .iter()
        .map(|j| JobRun {
            name: j.name.clone(),
            project: j.project.clone(),
            group: def::expand(&j.group, &values),
            params: def::expand_map(&j.params, &values),
            needs: j.needs.clone(),
            state: JobRunState::Waiting,
            id: String::new(),
            url: String::new(),
            exit_code: NEVER_RAN,
            cached: false,
            coalesced: false,
            incremental: false,
            path: String::new(),
            err_build: String::new(),
        })
        .collect()
}

/// What a job's task reports.
enum Event {
    /// Admitted (queued, or found in the result cache or in flight).
    Scheduled {
        id: String,
        path: String,
        /// A result-cache hit; `None`: not known yet (several agents: the answer says).
        cached: Option<bool>,
    },
    /// It runs.
    Pending,
    /// It ended (or could not be scheduled).
    Done(Result<BuildInfo, JobError>),
}

/// One run being executed; owns the record.
struct Exec {
    runs: Arc<Runs>,
    p: Pipeline,
    /// Every job scheduled with `rebuild`.
    rebuild: bool,
    rec: RunRecord,
    tx: watch::Sender<Arc<RunRecord>>,
    started: Instant,
    /// The run's ready builds, kept from retention until the run ends (downstream jobs mount
    /// their artifacts).
    holds: Vec<Hold>,
    /// Jobs scheduled without knowing whether they were result-cache hits: linked to the run
    /// ([`Runs::job_runs`]) at their end unless they were.
    unlinked: std::collections::HashSet<usize>,
}

impl Exec {
    /// Every change of the record: to the followers, to disk, to the observer.
    async fn publish(&mut self) {
        let rec = Arc::new(self.rec.clone());
        // Stored first: whoever is told of the change finds it on disk too.
        let build_path = self.runs.build_path().to_path_buf();
        let stored = Arc::clone(&rec);
        let written = tokio::task::spawn_blocking(move || write_record(&build_path, &stored)).await;
        if let Ok(Err(e)) = written {
            tracing::warn!(pipeline = %rec.pipeline, run = %rec.run, error = %e, "could not store the run's record");
        }
        self.tx.send_replace(Arc::clone(&rec));
        if let Some(obs) = &self.runs.observer {
            obs(&rec);
        }
    }

    async fn execute(mut self, key: RunKey) {
        self.publish().await;

        let index: HashMap<String, usize> = self
            .rec
            .jobs
            .iter()
            .enumerate()
            .map(|(i, j)| (j.name.clone(), i))
            .collect();
        let mut started = vec![false; self.rec.jobs.len()];
        let mut running = 0usize;
        // At most job_concurrency jobs of a run in flight at once: a wide pipeline waits for
        // slots here rather than filling the backlog (which answers 503). With several agents,
        // the capacity of the cluster.
        let cap = self.runs.jobs.capacity().await;
        let (etx, mut erx) = mpsc::unbounded_channel::<(usize, Event)>();
        let mut dirty = false;
        loop {
            // Skip what can no longer run; start what can.
            let mut changed = false;
            for (i, was_started) in started.iter_mut().enumerate() {
                if *was_started || self.rec.jobs[i].state != JobRunState::Waiting {
                    continue;
                }
                let needs: Vec<usize> = self.rec.jobs[i]
                    .needs
                    .iter()
                    .filter_map(|n| index.get(n).copied())
                    .collect();
                let states: Vec<JobRunState> =
                    needs.iter().map(|&n| self.rec.jobs[n].state).collect();
                if states
                    .iter()
                    .any(|s| matches!(s, JobRunState::Failed | JobRunState::Skipped))
                {
                    self.rec.jobs[i].state = JobRunState::Skipped;
                    changed = true;
                } else if states.iter().all(|s| *s == JobRunState::Ready) && running < cap {
                    let job = &self.rec.jobs[i];
                    let req = JobRequest {
                        project: job.project.clone(),
                        params: job.params.clone(),
                        group: job.group.clone(),
                        rebuild: self.rebuild,
                        inputs: needs
                            .iter()
                            .map(|&n| {
                                let up = &self.rec.jobs[n];
                                (
                                    up.name.clone(),
                                    Input {
                                        project: up.project.clone(),
                                        id: up.id.clone(),
                                    },
                                )
                            })
                            .collect(),
                    };
                    *was_started = true;
                    running += 1;
                    tokio::spawn(job_task(Arc::clone(&self.runs.jobs), i, req, etx.clone()));
                }
            }
            // The jobs are in a topological order: one pass skips every dependent of a failed
            // job.
            if changed || dirty {
                self.publish().await;
            }
            if running == 0 {
                break;
            }
            let Some((i, event)) = erx.recv().await else {
                break;
            };
            // This change and those that came meanwhile, published at once.
            if self.apply(i, event) {
                running -= 1;
            }
            while let Ok((i, event)) = erx.try_recv() {
                if self.apply(i, event) {
                    running -= 1;
                }
            }
            dirty = true;
        }
        // Jobs never started (the loop ended early): skipped.
        for (i, j) in self.rec.jobs.iter_mut().enumerate() {
            if !started[i] && j.state == JobRunState::Waiting {
                j.state = JobRunState::Skipped;
            }
        }
        self.rec.failed = self
            .rec
            .jobs
            .iter()
            .filter(|j| j.state == JobRunState::Failed)
            .map(|j| j.name.clone())
            .collect();
        let succeeded = self.rec.failed.is_empty()
            && self.rec.jobs.iter().all(|j| j.state == JobRunState::Ready);
        if succeeded {
            self.trigger().await;
        }
        self.rec.state = if succeeded {
            RunState::Succeeded
        } else {
            RunState::Failed
        };
        self.rec.duration = self.started.elapsed().as_nanos() as i64;
        self.runs.jobs.metrics().pipeline_finished(succeeded);
        tracing::info!(pipeline = %self.rec.pipeline, run = %self.rec.run, state = ?self.rec.state, failed = ?self.rec.failed, "pipeline run finished");
        self.publish().await;
        self.runs.lock().remove(&key);
        self.runs.idle.notify_waiters();
    }

    /// Apply what job `i`'s task reported; `true` when the job ended.
    fn apply(&mut self, i: usize, event: Event) -> bool {
        let Some(job) = self.rec.jobs.get_mut(i) else {
            return false;
        };
        match event {
            Event::Scheduled { id, path, cached } => {
                if cached.is_none() {
                    self.unlinked.insert(i);
                } else if cached == Some(false) {
                    self.runs.by_job().insert(
                        (job.project.clone(), id.clone()),
                        RunLink::new(&self.rec.pipeline, &self.rec.run),
                    );
                }
                job.url = format!("job/{}/{id}", job.project);
                job.id = id;
                job.path = path;
                job.state = JobRunState::Queued;
                false
            }
            Event::Pending => {
                if job.state == JobRunState::Queued {
                    job.state = JobRunState::Pending;
                }
                false
            }
            Event::Done(Ok(info)) => {
                if self.unlinked.remove(&i) && !info.cached {
                    self.runs.by_job().insert(
                        (job.project.clone(), job.id.clone()),
                        RunLink::new(&self.rec.pipeline, &self.rec.run),
                    );
                }
                if info.succeeded() {
                    self.holds
                        .extend(self.runs.jobs.hold(&job.project, &job.id));
                }
                job.state = if info.succeeded() {
                    JobRunState::Ready
                } else {
                    JobRunState::Failed
                };
                job.exit_code = info.exit_code;
                job.cached = info.cached;
                job.coalesced = info.coalesced;
                job.incremental = info.incremental;
                job.path = info.path;
                job.err_build = info.err_build;
                if !info.url.is_empty() {
                    job.url = info.url;
                }
                true
            }
            Event::Done(Err(e)) => {
                job.state = JobRunState::Failed;
                job.err_build = e.to_string();
                true
            }
        }
    }

    /// Start the `on_success` runs, linked both ways.
    async fn trigger(&mut self) {
        let job_ids: BTreeMap<String, String> = self
            .rec
            .jobs
            .iter()
            .map(|j| (j.name.clone(), j.id.clone()))
            .collect();
        let values = Values {
            params: &self.rec.params,
            pipeline: &self.p.name,
            run: &self.rec.run,
            job_ids: Some(&job_ids),
        };
        let triggers: Vec<(String, BTreeMap<String, String>)> = self
            .p
            .on_success
            .iter()
            .map(|t| (t.pipeline.clone(), def::expand_map(&t.params, &values)))
            .collect();
        let me = RunLink::new(&self.rec.pipeline, &self.rec.run);
        for (pipeline, params) in triggers {
            let link = match self.runs.start(&pipeline, params, Some(me.clone())).await {
                Ok((rx, _)) => {
                    let run = rx.borrow().run.clone();
                    tracing::info!(pipeline = %self.rec.pipeline, run = %self.rec.run, triggered = %pipeline, triggered_run = %run, "pipeline run triggered another");
                    RunLink::new(&pipeline, &run)
                }
                Err(e) => {
                    tracing::warn!(pipeline = %self.rec.pipeline, run = %self.rec.run, triggered = %pipeline, error = %e, "a trigger did not start");
                    RunLink {
                        pipeline: pipeline.clone(),
                        run: String::new(),
                        url: String::new(),
                        error: e.to_string(),
                    }
                }
            };
            self.rec.triggered.push(link);
        }
    }
}

/// Submit one job and report its states to the run: its ID at once, `pending` once it runs, then
/// its end.
async fn job_task(
    jobs: Arc<dyn Jobs>,
    i: usize,
    req: JobRequest,
    events: mpsc::UnboundedSender<(usize, Event)>,
) {
    let mut submitted = match jobs.submit(req).await {
        Ok(s) => s,
        Err(e) => {
            let _ = events.send((i, Event::Done(Err(e))));
            return;
        }
    };
    let _ = events.send((
        i,
        Event::Scheduled {
            id: submitted.id.clone(),
            path: submitted.dir.artifacts_when_ready().display().to_string(),
            cached: submitted.cached,
        },
    ));
    let mut started = submitted
        .started
        .take()
        .unwrap_or_else(|| Box::pin(std::future::pending()));
    let mut seen = false;
    let wait = submitted.wait();
    tokio::pin!(wait);
    let result = loop {
        tokio::select! {
            r = &mut wait => break r,
            () = &mut started, if !seen => {
                seen = true;
                let _ = events.send((i, Event::Pending));
            }
        }
    };
    let _ = events.send((i, Event::Done(result.map(|a| a.info))));
}
