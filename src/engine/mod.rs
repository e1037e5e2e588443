//! The job engine: admission (validation, coalescing, the result cache, the backlog), the jobs in
//! flight, finishing a job (ready, links, metrics), listing, following a job's log, and shutdown.
//!
//! Where the rest lives: [`state`] holds the jobs in flight and their one state-change function;
//! [`layout`] the on-disk layout (`<build_path>/<project>/{pending,ready}/<id>/...`);
//! [`runner`] runs one job (workspace, image, sandbox) into an [`outcome::Report`]; [`follow`]
//! tails a running job's log.

mod capped;
mod checks;
mod data;
pub mod export;
mod follow;
pub mod import;
mod layers;
pub mod layout;
mod lookup;
pub mod outcome;
pub mod retention;
mod runner;
pub mod state;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use images::{BaseSources, Builder, Store};
use tokio::sync::{watch, Semaphore};

use crate::config::Config;
pub use crate::jobs::JobError;
use crate::jobs::{self, BuildInfo, Identity, JobIds, JobRequest, NEVER_RAN, UNKNOWN_DURATION};
use crate::metrics::Metrics;
pub use layout::{JobDir, Layout, Stage};
pub use lookup::Found;
pub use outcome::{JobOutcome, RunError};
use state::{Admission, Ids, InFlight};
pub use state::{JobKey, Phase};

/// How long past its time limit a job's thread may take to come back (a sandbox past the
/// limit is killed at once; this covers what a job does after it, and a thread blocked where
/// no deadline reaches) before the job is abandoned and its slot given back.
pub const ABANDON_GRACE: Duration = Duration::from_secs(60);

/// A scheduled job: its ID, its directory once ready, and its state to wait on.
pub struct Scheduled {
    /// The job's project.
    pub project: String,
    /// The ID it was admitted under (mistry's, or the exact one when mistry's is another
    /// request's).
    pub id: String,
    /// Its directory once ready.
    pub dir: JobDir,
    state: watch::Receiver<Phase>,
    /// Immediately known answer (result cache).
    ready: Option<BuildInfo>,
    coalesced: bool,
}

impl Scheduled {
    /// The job's state as it changes (queued, pending, ready); a result-cache hit is ready at
    /// once (see [`Scheduled::wait`]) and its receiver stays at queued.
    pub fn state(&self) -> watch::Receiver<Phase> {
        self.state.clone()
    }

    /// Whether the answer is known already (a result-cache hit).
    pub fn is_cached(&self) -> bool {
        self.ready.is_some()
    }

    /// Wait for the BuildInfo (without its log fields) and the job's directory, which holds
    /// `out.log` and `stderr.log`.
    pub async fn wait(mut self) -> Result<(BuildInfo, JobDir), JobError> {
        if let Some(info) = self.ready.take() {
            return Ok((info, self.dir));
        }
        let ended = self
            .state
            .wait_for(|s| matches!(s, Phase::Ready(_)))
            .await
            .map(|s| match &*s {
                Phase::Ready(info) => Some(BuildInfo::clone(info)),
                _ => None,
            });
        match ended {
            Ok(Some(mut info)) => {
                info.coalesced = self.coalesced;
                Ok((info, self.dir))
            }
            _ => Err(JobError::Internal(format!(
                "Error building {}/{}: work: the job ended without a result",
                self.project, self.id
            ))),
        }
    }
}

/// The jobs of one agent: admission, coalescing, the result cache, running jobs on the image
/// builder and sandboxes, finishing them into `ready/`, retention and shutdown (see the module
/// doc).
pub struct Engine {
    /// The validated configuration it was started with.
    pub cfg: Config,
    /// The on-disk layout under `build_path`.
    pub layout: Layout,
    builder: Arc<Builder>,
    runner: runner::Runner,
    slots: Arc<Semaphore>,
    jobs: InFlight,
    link_locks: Arc<import::LinkLocks>,
    shutting_down: AtomicBool,
    /// Prometheus counters and histograms of its jobs (`GET /metrics`).
    pub metrics: Metrics,
    /// Retention's state (`retention.rs`).
    retainer: Arc<retention::Retainer>,
    /// How a group's next build gets the last one's cache (layers where overlays work on
    /// `build_path` and the store uses them).
    cache_mode: images::CacheMode,
    /// Ready builds whose cache is being squashed (`layers.rs`).
    squashing: Arc<Mutex<std::collections::HashSet<std::path::PathBuf>>>,
    /// The BuildInfo of each ready build as the listing last read it (`lookup.rs`).
    listed: lookup::Listed,
}

/// How the BuildInfo of a fenced run (see [`Fence`]) starts its `ErrBuild`.
pub const FENCED: &str = "fenced";

/// The check of a run's right to publish its build, made after its job ended and before the
/// build goes to `ready/` (the cluster's fencing: `cluster::jobs`). Called on the run's thread
/// (blocking).
pub trait Fence: Send + Sync {
    /// The run's job ended (its sandbox is gone): the check may start now, while the build is
    /// checked and made readable, [`Fence::holds`] taking its answer.
    fn ended(&self) {}
    /// `true`: publish the build; `false`: the run was superseded, its build is removed.
    fn holds(&self) -> bool;
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// The BuildInfo of job `project/id` that has not run (yet): no exit code, no output, no
/// `Path`, started now.
pub fn blank_info(
    params: &std::collections::BTreeMap<String, String>,
    group: &str,
    project: &str,
    id: &str,
) -> BuildInfo {
    BuildInfo {
        params: params.clone(),
        group: group.to_string(),
        path: String::new(),
        cached: false,
        coalesced: false,
        incremental: false,
        exit_code: NEVER_RAN,
        err_build: String::new(),
        container_stdouterr: String::new(),
        container_stderr: String::new(),
        transport_method: "rsync".into(),
        started_at: now_rfc3339(),
        duration: UNKNOWN_DURATION,
        url: format!("job/{project}/{id}"),
        retries: 0,
    }
}

impl Engine {
    /// Open the layer store and clean up what a crash left behind.
    pub fn new(cfg: Config, helper: Vec<std::ffi::OsString>) -> anyhow::Result<Engine> {
        let builder = Arc::new(builder_for(&cfg, helper, true)?);
        let cache_mode = layers::cache_mode(&cfg, &builder.store);
        let engine = Engine {
            cache_mode,
            squashing: Arc::new(Mutex::new(Default::default())),
            listed: lookup::Listed::default(),
            layout: Layout::new(&cfg.build_path),
            runner: runner::Runner::new(Arc::clone(&builder)),
            slots: Arc::new(Semaphore::new(cfg.job_concurrency)),
            // Running plus queued jobs may not exceed job_concurrency + job_backlog.
            jobs: InFlight::new(cfg.job_concurrency + cfg.job_backlog),
            link_locks: Arc::default(),
            shutting_down: AtomicBool::new(false),
            metrics: Metrics::new(),
            retainer: Arc::new(retention::Retainer::new(&cfg.build_path)),
            builder,
            cfg,
        };
        engine.clean_pending()?;
        engine.retainer.trash().clean_leftovers(engine.store());
        engine.count_hosted();
        Ok(engine)
    }

    /// Jobs running now (holding one of the `job_concurrency` slots).
    pub fn running(&self) -> usize {
        self.cfg
            .job_concurrency
            .saturating_sub(self.slots.available_permits())
    }

    /// Keep ready build `id` of `project` from retention while the guard lives (e.g. a pipeline
    /// job's upstream build until its downstream jobs ran).
    pub fn hold_build(&self, project: &str, id: &str) -> Option<retention::Hold> {
        self.retainer
            .hold(Some(self.layout.job(project, id, Stage::Ready).path()))
    }

    /// The image builder (and through it the layer store) jobs build with.
    pub fn builder(&self) -> &Builder {
        &self.builder
    }

    /// Several agents: drop this agent's copy of ready build `project/id` (the job ran again
    /// elsewhere: a rebuild, a re-run), when it is still the copy that was judged stale (its
    /// `StartedAt` is `judged`): as retention removes a build — never while its job is in flight
    /// here, a pipeline holds it or a running build starts from it; the builds whose cache
    /// layers sit on it are squashed first, and a group link pointing at it goes with it (the
    /// group's chain moved to the agent that ran the job again: the next build of the group
    /// here starts from the record's last build, `cluster::jobs`' placement). Moved out of
    /// `ready/` under the project's link lock, then removed. `Ok(true)` when it went.
    pub fn discard_ready(
        &self,
        project: &str,
        id: &str,
        judged: &str,
    ) -> Result<bool, retention::TrashError> {
        let dir = self.layout.job(project, id, Stage::Ready);
        let build = retention::Build {
            project: project.to_string(),
            id: id.to_string(),
            group: dir.read_info().map(|i| i.group).unwrap_or_default(),
            started: std::time::SystemTime::now(),
            path: dir.path().to_path_buf(),
            linked: false,
            layer: true,
        };
        // Its links go at once, even while it is busy (and it stays): no build starts from it
        // any more.
        {
            let lock = self.link_lock(project);
            let _guard = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if dir.read_started_at().as_deref() == Some(judged) {
                retention::unlink_build(&self.layout, project, dir.path());
            }
        }
        let taken =
            self.take_unbusy(&build, || dir.read_started_at().as_deref() == Some(judged))?;
        let Some(path) = taken else {
            return Ok(false);
        };
        retention::remove_taken(self.store(), path)?;
        Ok(true)
    }

    /// Several agents: ready build `dir`, the re-run of a job whose agent died, says so — `note`
    /// appended to its `out.log`, `info` (with its `Retries`) stored as its BuildInfo — under the
    /// project's link lock, as every change of `ready/` (blocking).
    pub fn note_retry(&self, dir: &JobDir, note: &str, info: &BuildInfo) {
        use std::io::Write;
        let lock = self.link_lock(dir.project());
        let _guard = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !dir.is_dir() {
            return;
        }
        if let Err(e) = dir
            .append_log()
            .and_then(|mut f| f.write_all(note.as_bytes()))
        {
            tracing::warn!(project = %dir.project(), id = %dir.id(), error = %e, "could not add a note to the job's log");
        }
        if let Err(e) = dir.write_info(info) {
            tracing::warn!(project = %dir.project(), id = %dir.id(), error = %e, "could not store the BuildInfo of a retried job");
        }
    }

    fn store(&self) -> &Store {
        &self.builder.store
    }

    /// Start-up: every leftover pending build of every project goes (a crash leaves them; they
    /// are never resumed).
    fn clean_pending(&self) -> anyhow::Result<()> {
        for project in self.layout.projects() {
            for job in self.layout.jobs(&project, Stage::Pending) {
                tracing::info!(
                    project,
                    id = job.id(),
                    "removing a pending build left by a crash"
                );
                self.store()
                    .remove_tree(job.path())
                    .map_err(|err| anyhow::anyhow!("removing {}: {err}", job.path().display()))?;
            }
        }
        Ok(())
    }

    /// The `builds_hosted` gauge of every project: a read of each project's `ready/`, done when
    /// `/metrics` is scraped and at start (not at each job's end: that read grows with the
    /// builds kept, and cost every job a scan of thousands of entries).
    pub(crate) fn count_hosted(&self) {
        for p in self.layout.projects() {
            self.metrics
                .set_hosted(&p, self.layout.count(&p, Stage::Ready) as i64);
        }
    }

    /// Validate, identify and schedule a job (or find it running, or in the result cache). The
    /// job goes by mistry's ID unless another request's job holds that one: then by the
    /// request's exact ID ([`jobs::JobIds`]); it is never answered with another request's job.
    pub async fn schedule(self: &Arc<Self>, req: JobRequest) -> Result<Scheduled, JobError> {
        self.schedule_by(req, None, None).await
    }

    /// [`Engine::schedule`] under job ID `id`, one of the request's two IDs, which the
    /// cluster's job record decided (`cluster::jobs`): a build of another request here under
    /// that ID is no answer and is replaced. A run it starts publishes its build (moves it to
    /// `ready/`) only if `fence` still holds then; else the build is discarded.
    pub async fn schedule_as(
        self: &Arc<Self>,
        req: JobRequest,
        id: String,
        fence: Arc<dyn Fence>,
    ) -> Result<Scheduled, JobError> {
        self.schedule_by(req, Some(id), Some(fence)).await
    }

    async fn schedule_by(
        self: &Arc<Self>,
        req: JobRequest,
        given: Option<String>,
        fence: Option<Arc<dyn Fence>>,
    ) -> Result<Scheduled, JobError> {
        Self::check_request(&req)?;
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(JobError::Overloaded);
        }
        // Identify the job (hashing the project directory) and admit it: coalescing, then the
        // result cache (a rebuild asks for a fresh run), then the backlog; off the runtime's
        // threads, as it reads the disk.
        let (engine, r) = (Arc::clone(self), req.clone());
        let (id, admission) =
            tokio::task::spawn_blocking(move || engine.admit(&r, given.as_deref(), fence))
                .await
                .map_err(|e| JobError::Internal(e.to_string()))??;
        self.scheduled(&req, id, admission)
    }

    /// The request's names are valid (project, group, params, inputs).
    fn check_request(req: &JobRequest) -> Result<(), JobError> {
        if req.project.is_empty() {
            return Err(JobError::BadRequest("no project given".into()));
        }
        jobs::check_name("project", &req.project)?;
        if !req.group.is_empty() {
            jobs::check_name("group", &req.group)?;
        }
        for k in req.params.keys() {
            jobs::check_name("param", k)?;
        }
        for (name, input) in &req.inputs {
            jobs::check_name("input", name)?;
            jobs::check_name("project", &input.project)?;
            jobs::check_name("job", &input.id)?;
        }
        Ok(())
    }

    fn scheduled(
        &self,
        req: &JobRequest,
        id: String,
        admission: Admission,
    ) -> Result<Scheduled, JobError> {
        let key = JobKey::new(&req.project, &id);
        let scheduled = |state, ready: Option<BuildInfo>, coalesced| Scheduled {
            project: req.project.clone(),
            id: id.clone(),
            dir: self.layout.job(&key.project, &key.id, Stage::Ready),
            state,
            ready,
            coalesced,
        };
        match admission {
            Admission::Queued(state) => Ok(scheduled(state, None, false)),
            Admission::Coalesced(state) => Ok(scheduled(state, None, true)),
            Admission::Cached(info) => Ok(scheduled(
                watch::channel(Phase::Queued).1,
                Some(*info),
                false,
            )),
            Admission::Full => Err(JobError::Overloaded),
            Admission::Taken => Err(JobError::Internal(format!(
                "Error building {}/{id}: work: another request's job runs under this ID",
                req.project
            ))),
        }
    }

    /// The job's ID (hashing the project directory), and what becomes of it (blocking); under
    /// ID `given` when one is. A queued job is started here, so that a request cancelled
    /// meanwhile leaves no job behind that nobody runs.
    fn admit(
        self: &Arc<Self>,
        req: &JobRequest,
        given: Option<&str>,
        fence: Option<Arc<dyn Fence>>,
    ) -> Result<(String, Admission), JobError> {
        let ids = self.identify(req)?;
        let want = match given {
            None => Ids::Resolve(&ids),
            Some(id) if id == ids.mistry || id == ids.exact => Ids::Given(id),
            Some(id) => {
                return Err(JobError::Internal(format!(
                    "Error building {}: this agent computes job ID {} (or {}) for this \
                     request, not {id}: the agents' projects_path differ",
                    req.project, ids.mistry, ids.exact
                )))
            }
        };
        let identity = Identity::of(req);
        let (id, admission) = self
            .jobs
            .admit(&req.project, want, &identity, req.rebuild, |id| {
                self.layout.job(&req.project, id, Stage::Ready).read_info()
            });
        match admission {
            Admission::Queued(_) => {
                self.start(req.clone(), JobKey::new(&req.project, &id), fence);
            }
            Admission::Coalesced(_) => self.metrics.coalesced(),
            Admission::Cached(_) => self.metrics.cached(),
            Admission::Full | Admission::Taken => {}
        }
        Ok((id, admission))
    }

    /// The request's IDs (hashing the project directory; blocking): 404 for an unknown
    /// project.
    fn identify(&self, req: &JobRequest) -> Result<JobIds, JobError> {
        let project_dir = self.cfg.projects_path.join(&req.project);
        if !project_dir.join("Dockerfile").is_file() {
            return Err(JobError::UnknownProject(req.project.clone()));
        }
        jobs::job_ids(
            &req.project,
            &req.group,
            &req.params,
            &req.inputs,
            &project_dir,
        )
        .map_err(|e| {
            JobError::Internal(format!(
                "Error building {}: work: reading the project: {e}",
                req.project
            ))
        })
    }

    /// Validate a request and compute its job IDs (blocking: it hashes the project directory),
    /// as [`Engine::schedule`] does, without admitting it (the cluster's scheduler,
    /// `cluster::jobs`, decides which one it goes by and where it runs). Refused while shutting
    /// down.
    pub fn job_ids_of(&self, req: &JobRequest) -> Result<JobIds, JobError> {
        Self::check_request(req)?;
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(JobError::Overloaded);
        }
        self.identify(req)
    }

    /// A ready build of `project` under `id` that is a build of a request with `identity`
    /// (blocking): its BuildInfo and directory; `None` when there is none, or it is another
    /// request's.
    pub fn local_build(
        &self,
        project: &str,
        id: &str,
        identity: &Identity,
    ) -> Option<(BuildInfo, JobDir)> {
        let dir = self.layout.job(project, id, Stage::Ready);
        let info = dir.read_info().filter(|i| identity.matches(i))?;
        Some((info, dir))
    }

    /// The result cache alone (blocking): a local build of a request with `identity` that
    /// succeeded, under mistry's ID or else the exact one, as a result-cache hit (`Cached:
    /// true`, counted), with its directory.
    pub fn local_result(
        &self,
        project: &str,
        ids: &JobIds,
        identity: &Identity,
    ) -> Option<(BuildInfo, JobDir)> {
        let (mut info, dir) = [&ids.mistry, &ids.exact].into_iter().find_map(|id| {
            self.local_build(project, id, identity)
                .filter(|(i, _)| i.succeeded())
        })?;
        info.cached = true;
        info.coalesced = false;
        self.metrics.cached();
        Some((info, dir))
    }

    /// Whether the engine refuses new jobs (shutting down).
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Run a queued job when a slot is free, then make it ready. The slot is given back
    /// whatever happens: the job ends, fails, panics, or (a thread blocked in a system call
    /// cannot be interrupted) outlives its time limit by [`ABANDON_GRACE`] and is abandoned.
    fn start(self: &Arc<Self>, req: JobRequest, key: JobKey, fence: Option<Arc<dyn Fence>>) {
        self.metrics.started();
        let engine = Arc::clone(self);
        tokio::spawn(async move {
            let permit = engine.slots.clone().acquire_owned().await;
            let (e2, req2, key2) = (Arc::clone(&engine), req.clone(), key.clone());
            let abandoned = Arc::new(AtomicBool::new(false));
            let gone = Arc::clone(&abandoned);
            let mut task =
                tokio::task::spawn_blocking(move || e2.run(&req2, &key2, &gone, fence.as_deref()));
            // The project's time limit is at most the operator's (its own file can only lower
            // it), and counts from the job's start.
            let joined = match engine.cfg.operator_time_limit(&req.project) {
                Some(t) => tokio::time::timeout(t + ABANDON_GRACE, &mut task)
                    .await
                    .map_err(|_| t),
                None => Ok((&mut task).await),
            };
            let info = match joined {
                Ok(Ok(info)) => info,
                Ok(Err(e)) => {
                    let dir = engine.layout.job(&key.project, &key.id, Stage::Pending);
                    outcome::Report {
                        outcome: JobOutcome::Internal(RunError::Panicked(e.to_string())),
                        incremental: false,
                        problems: Vec::new(),
                    }
                    .into_info(engine.blank_info(&req, &dir), &req.project)
                }
                Err(limit) => engine.abandon(&req, &key, limit, &abandoned, task).await,
            };
            drop(permit);
            engine.jobs.set(&key, Phase::Ready(Arc::new(info)));
            // Retention of the job's group (and the low-water mark), after the answer; a deep
            // cache is squashed in the background, followed by the group's retention again.
            let e2 = Arc::clone(&engine);
            let _ = tokio::task::spawn_blocking(move || {
                e2.retain_after_job(&key.project, &req.group);
                e2.squash_if_deep(&key, &req.group);
            })
            .await;
        });
    }

    /// Give up on a job whose thread did not come back within its time limit and
    /// [`ABANDON_GRACE`] (blocked in a system call): its directory goes to the trash (the
    /// thread, if it ever returns, finds nothing to finish, and a new run of the same job starts
    /// clean), removed once the thread is done; its waiters get a failure.
    async fn abandon(
        self: &Arc<Self>,
        req: &JobRequest,
        key: &JobKey,
        limit: Duration,
        abandoned: &AtomicBool,
        task: tokio::task::JoinHandle<BuildInfo>,
    ) -> BuildInfo {
        abandoned.store(true, Ordering::SeqCst);
        tracing::error!(project = %key.project, id = %key.id, ?limit, "a job's thread did not return after its time limit: the job is abandoned and its slot given back");
        let dir = self.layout.job(&key.project, &key.id, Stage::Pending);
        let trash = self.retainer.trash().dir().join(format!(
            "{}-abandoned-{}-{}",
            std::process::id(),
            key.project,
            key.id
        ));
        let (from, to) = (dir.path().to_path_buf(), trash.clone());
        let moved = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(to.parent().unwrap_or(&to))?;
            std::fs::rename(&from, &to)
        })
        .await;
        if matches!(moved, Ok(Ok(()))) {
            let engine = Arc::clone(self);
            tokio::spawn(async move {
                let _ = task.await;
                let _ =
                    tokio::task::spawn_blocking(move || engine.store().remove_tree(&trash)).await;
            });
        }
        let info = BuildInfo {
            exit_code: -1,
            err_build: format!(
                "the job exceeded its time limit of {limit:?} and was abandoned (it did not stop: \
                 see the server's log)"
            ),
            ..self.blank_info(req, &dir)
        };
        self.metrics.finished(&info, limit + ABANDON_GRACE);
        info
    }

    fn link_lock(&self, project: &str) -> Arc<Mutex<()>> {
        self.link_locks.of(project)
    }

    /// The door for builds made elsewhere (`import.rs`): placed in `ready/` under the link
    /// lock, as this engine's own.
    pub fn importer(&self) -> import::Importer {
        import::Importer::new(self.layout.clone(), Arc::clone(&self.link_locks))
    }

    /// The BuildInfo of `req`'s job that has not run (yet), its `Path` that of `dir` once ready.
    pub(crate) fn blank_info(&self, req: &JobRequest, dir: &JobDir) -> BuildInfo {
        BuildInfo {
            path: dir.artifacts_when_ready().display().to_string(),
            ..blank_info(&req.params, &req.group, dir.project(), dir.id())
        }
    }

    /// Run one job to the end (blocking), then — when `fence` (if any) still holds — move it to
    /// `ready/` and, when it succeeded, point its group's link at it; a fenced run's build is
    /// removed, and its BuildInfo's `ErrBuild` starts with [`FENCED`].
    fn run(
        &self,
        req: &JobRequest,
        key: &JobKey,
        abandoned: &AtomicBool,
        fence: Option<&dyn Fence>,
    ) -> BuildInfo {
        let started = Instant::now();
        self.jobs.set(key, Phase::Pending);
        let dir = self.layout.job(&key.project, &key.id, Stage::Pending);
        let blank = self.blank_info(req, &dir);
        let previous = self.layout.last_good(&req.project, &req.group);
        // Retention leaves the base of this build alone while it runs.
        let _base = self.retainer.hold(previous.as_deref());
        // And the cache layers it may sit on.
        let _layers = self.hold_layers(previous.as_deref());
        // Upstream builds stay while this job reads them.
        let mut _upstream = Vec::with_capacity(req.inputs.len());
        let inputs: Vec<(String, std::path::PathBuf)> = req
            .inputs
            .iter()
            .map(|(name, i)| {
                _upstream.push(self.hold_build(&i.project, &i.id));
                let build = self.layout.job(&i.project, &i.id, Stage::Ready);
                (name.clone(), build.data().join("artifacts"))
            })
            .collect();
        let job = runner::Job {
            req,
            dir: &dir,
            previous: previous.as_deref(),
            cache_mode: self.cache_mode,
            blank: &blank,
            inputs: &inputs,
            on_sandbox: &|pid| {
                self.jobs.set_sandbox(key, pid);
                if pid.is_none() {
                    if let Some(f) = fence {
                        f.ended();
                    }
                }
            },
        };
        let report = self.runner.run(&self.cfg, &job);
        let mut info = report.into_info(blank, &req.project);
        info.duration = started.elapsed().as_nanos() as i64;
        if abandoned.load(Ordering::SeqCst) {
            // Answered and moved to the trash meanwhile (Engine::abandon).
            return info;
        }
        // Asked before the link lock: the fence may wait for the database.
        let fenced = fence.is_some_and(|f| !f.holds());
        if abandoned.load(Ordering::SeqCst) {
            // Abandoned while the fence waited (its directory is in the trash).
            return info;
        }
        if fenced {
            if dir.is_dir() {
                if let Err(e) = self.store().remove_tree(dir.path()) {
                    tracing::warn!(project = %req.project, id = %key.id, error = %e, "could not remove a fenced run's build");
                }
            }
            info.err_build = format!(
                "{FENCED}: the job's record moved on while this agent ran it (it was taken for \
                 dead and the job ran again elsewhere); this build is discarded"
            );
            self.metrics.finished(&info, started.elapsed());
            return info;
        }
        // Ready and linked under the project's link lock: retention, which takes it too, never
        // sees a successful build between the two.
        let lock = self.link_lock(&req.project);
        let guard = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if dir.is_dir() {
            if let Err(e) = self.to_ready(&dir, &info) {
                info.err_build = format!(
                    "Error building {}: work: moving the build to ready: {e}",
                    req.project
                );
            }
        }
        if info.succeeded() {
            let link = self.layout.link(&req.project, &req.group);
            if let Err(e) = dir.in_stage(Stage::Ready).link_from(&link) {
                tracing::warn!(project = %req.project, id = %key.id, error = %e, "could not update {}", link.display());
            }
        }
        drop(guard);
        self.metrics.finished(&info, started.elapsed());
        info
    }

    /// Store the job's BuildInfo and move its directory to `ready/` (replacing a failed build of
    /// the same ID, which is re-run).
    fn to_ready(&self, dir: &JobDir, info: &BuildInfo) -> std::io::Result<()> {
        let _ = dir.write_info(info);
        let ready = dir.in_stage(Stage::Ready);
        if ready.exists() {
            // A rebuild replaces a build another one's cache may sit on: squash those first.
            retention::unpin_id(&self.layout, self.store(), dir.project(), dir.id());
            let _ = self.store().remove_tree(ready.path());
        }
        if let Err(e) = dir.rename_to_ready() {
            let _ = self.store().remove_tree(dir.path());
            return Err(e);
        }
        Ok(())
    }

    /// Graceful shutdown: refuse new jobs, give running ones `grace` to finish, then kill them.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + grace;
        while !self.jobs.is_empty() {
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.jobs.is_empty() {
            return;
        }
        // Kill what runs, and what starts meanwhile (a job still building its image at the
        // deadline starts its sandbox later); let the killed jobs move to ready.
        let mut killed = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for pid in self.jobs.sandboxes() {
                if killed.insert(pid) {
                    tracing::warn!(pid, "killing a job still running at shutdown");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if self.jobs.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The image builder of a configuration. `owner`: this process owns the store (the daemon) and
/// may clean what a crash left in it; `mistryd rebuild` works beside a running daemon and may not.
pub fn builder_for(
    cfg: &Config,
    helper: Vec<std::ffi::OsString>,
    owner: bool,
) -> anyhow::Result<Builder> {
    use anyhow::Context;
    let store = if owner {
        Store::open(&cfg.store_path, cfg.filesystem, helper)
    } else {
        Store::attach(&cfg.store_path, cfg.filesystem, helper)
    }
    .with_context(|| format!("opening the layer store {}", cfg.store_path.display()))?;
    Ok(Builder::with_sources(
        store,
        BaseSources {
            images_dir: cfg.images_path.clone(),
            registries: cfg.registries.clone(),
        },
    ))
}
