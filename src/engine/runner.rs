//! Running one job, blocking, on the job's own thread (so the sandbox's parent-death signal
//! follows it): its workspace (through the store), its image, its root filesystem and its
//! sandbox, with stdout and stderr streamed to its log files. Everything ends in one
//! [`Report`].

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use images::{Builder, Image};
use sandbox::{Bind, Stdio, User};

use super::capped::{self, CappedLog};
use super::checks;
use super::data::{open_dir_beneath, Data};
use super::layout::{JobDir, DATA_DIRS};
use super::outcome::{JobOutcome, Report, RunError};
use crate::config::{Config, Effective};
use crate::jobs::{BuildInfo, JobRequest};

/// One job to run.
pub(super) struct Job<'a> {
    pub req: &'a JobRequest,
    /// Its directory in `pending/`.
    pub dir: &'a JobDir,
    /// The group's last successful build, when the job's `data/` starts from it.
    pub previous: Option<&'a std::path::Path>,
    /// How its `data/cache` starts from the group's last build.
    pub cache_mode: images::CacheMode,
    /// Its BuildInfo before it runs (stored while it runs).
    pub blank: &'a BuildInfo,
    /// Upstream artifacts directories, bound read-only at `/data/input/<name>` (pipelines).
    pub inputs: &'a [(String, std::path::PathBuf)],
    /// Told the host pid of the job's sandbox when it starts, and `None` when it ended.
    pub on_sandbox: &'a dyn Fn(Option<i32>),
}

/// When each phase of a job ended, for one debug line per job (`MISTRY_LOG=mistry::engine=debug`):
/// where a job's milliseconds go.
struct Phases {
    start: std::time::Instant,
    marks: std::cell::RefCell<Vec<(&'static str, std::time::Instant)>>,
}

impl Phases {
    fn new() -> Phases {
        Phases {
            start: std::time::Instant::now(),
            marks: std::cell::RefCell::new(Vec::with_capacity(8)),
        }
    }

    fn mark(&self, what: &'static str) {
        self.marks
            .borrow_mut()
            .push((what, std::time::Instant::now()));
    }

    fn log(&self, project: &str) {
        let mut last = self.start;
        let mut text = String::new();
        for (what, at) in self.marks.borrow().iter() {
            let ms = at.duration_since(last).as_secs_f64() * 1e3;
            text.push_str(&format!(" {what}={ms:.2}ms"));
            last = *at;
        }
        tracing::debug!(project, phases = %text.trim_start(), "job phases");
    }
}

/// What running one job's sandbox needs besides its image.
#[derive(Clone, Copy)]
struct Running<'a> {
    cfg: &'a Config,
    job: &'a Job<'a>,
    /// The layers under `data/cache` (mounted as an overlay at `/data/cache`), if any.
    cache_lowers: &'a [std::path::PathBuf],
    settings: &'a Effective,
    phases: &'a Phases,
    /// The job's time limit and when it passes (counted from the job's start).
    deadline: Option<(Duration, Instant)>,
}

impl Running<'_> {
    /// The outcome of a job whose time limit passed before its sandbox started, `while` doing
    /// what.
    fn late(&self, what: &'static str) -> Option<JobOutcome> {
        match self.deadline {
            Some((limit, at)) if Instant::now() >= at => {
                Some(JobOutcome::TimedOutPreparing(limit, what))
            }
            _ => None,
        }
    }
}

/// Runs jobs on images built by its builder.
pub(super) struct Runner {
    builder: Arc<Builder>,
    /// Set once overlay roots turned out not to work on this host.
    overlay_refused: AtomicBool,
}

impl Runner {
    pub(super) fn new(builder: Arc<Builder>) -> Runner {
        Runner {
            builder,
            overlay_refused: AtomicBool::new(false),
        }
    }

    /// Run `job` to its end.
    pub(super) fn run(&self, cfg: &Config, job: &Job) -> Report {
        let phases = Phases::new();
        let mut report = Report {
            outcome: JobOutcome::Exited(0),
            incremental: false,
            problems: Vec::new(),
        };
        report.outcome = match self.prepare(job) {
            Ok(workspace) => {
                phases.mark("workspace");
                let incremental = workspace.incremental;
                report.incremental = incremental;
                let cache_lowers = workspace.cache_lowers;
                // While it runs, the job's BuildInfo is the blank one.
                let provisional = BuildInfo {
                    incremental,
                    ..job.blank.clone()
                };
                let _ = job.dir.write_info(&provisional);
                self.execute(cfg, job, &cache_lowers, &mut report.problems, &phases)
                    .unwrap_or_else(JobOutcome::Internal)
            }
            Err(e) => JobOutcome::Internal(e),
        };
        // The overlay's work directory of /data/cache is of no use once the job ended.
        let work = job.dir.path().join(images::CACHE_WORK);
        if fs::symlink_metadata(&work).is_ok() {
            if let Err(e) = self.builder.store.remove_tree(&work) {
                tracing::warn!(path = %work.display(), error = %e, "could not remove a job's cache work directory");
            }
        }
        let store = &self.builder.store;
        let (problem, mut lines) = checks::data_dirs(store, job.dir);
        report.problems.extend(problem);
        let (problem, more) = checks::set_id(store, job.dir);
        report.problems.extend(problem);
        lines.extend(more);
        if !lines.is_empty() {
            if let Ok(mut log) = job.dir.append_log() {
                for l in lines {
                    let _ = writeln!(log, "{l}");
                }
            }
        }
        // Stripped: the build may be seen again (mistry's layout is readable).
        if job.dir.is_dir() {
            if let Err(e) = store.show_job_dir(job.dir.path()) {
                tracing::error!(project = %job.req.project, id = job.dir.id(), error = %e, "could not make a build's directory readable");
            }
        }
        phases.mark("checks");
        phases.log(&job.req.project);
        report
    }

    /// The job's directory, with `data/` (from the group's last build when there is one) and
    /// its params. Everything below `data/` is what the group's last job left: it is created
    /// and written by fd below `data/`, never through a link (see `data.rs`); what is in the way
    /// of a directory the daemon needs is replaced, and the job's log says so.
    fn prepare(&self, job: &Job) -> Result<images::Workspace, RunError> {
        let dir = job.dir;
        let store = &self.builder.store;
        let workspace = store.prepare_job_dir(dir.path(), job.previous, job.cache_mode)?;
        // Until the job ended and its data/ was stripped of set-id bits, nobody else may reach
        // into it.
        store.hide_job_dir(dir.path())?;
        // A fresh job directory has no data/ yet (the store made it empty).
        match fs::create_dir(dir.data()) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(RunError::io("creating data/")(e))
            }
            _ => {}
        }
        let data = Data::open(dir.path()).map_err(RunError::io("opening data/"))?;
        let mut replaced = Vec::new();
        for d in DATA_DIRS.iter().filter(|d| **d != "params") {
            let r = data
                .ensure_dir(store, Path::new(d))
                .map_err(RunError::io(format!("creating data/{d}")))?;
            replaced.extend(r);
        }
        // Mount points of the inputs (pipelines).
        for (name, _) in job.inputs {
            let r = data
                .ensure_dir(store, &Path::new("input").join(name))
                .map_err(RunError::io(format!("creating data/input/{name}")))?;
            replaced.extend(r);
        }
        // The params: always a new directory, each file created new in it.
        let params = data
            .fresh_dir(store, "params")
            .map_err(RunError::io("creating data/params"))?;
        for (k, v) in &job.req.params {
            Data::create_file(&params, k, v.as_bytes())
                .map_err(RunError::io(format!("writing param {k}")))?;
        }
        if !replaced.is_empty() {
            let mut log = dir.append_log().map_err(RunError::io("creating out.log"))?;
            for r in &replaced {
                let msg = format!(
                    "the group's last build left {} as {}; it starts as an empty directory",
                    r.shown(),
                    r.what
                );
                tracing::warn!(project = dir.project(), id = dir.id(), "{msg}");
                let _ = writeln!(log, "mistry: {msg}");
            }
        }
        Ok(workspace)
    }

    /// Build the image and run the job on it; `problems` gets what is found after it ran.
    fn execute(
        &self,
        cfg: &Config,
        job: &Job,
        cache_lowers: &[std::path::PathBuf],
        problems: &mut Vec<String>,
        phases: &Phases,
    ) -> Result<JobOutcome, RunError> {
        let mut log = job
            .dir
            .append_log()
            .map_err(RunError::io("creating out.log"))?;
        let settings = cfg
            .effective(&job.req.project)
            .map_err(|e| RunError::Settings(format!("{e:#}")))?;
        // The time limit counts from the job's start: preparing its data/ and building its
        // image count too.
        let at = Running {
            cfg,
            job,
            cache_lowers,
            settings: &settings,
            phases,
            deadline: settings.time_limit.map(|t| (t, phases.start + t)),
        };
        // What the job and its image build write to out.log is bounded; mistry's own lines
        // (below) are not.
        let mut out = CappedLog::new(
            log.try_clone().map_err(RunError::io("out.log"))?,
            settings.security.limits.log,
        );
        let outcome = match at.late("its data/ was prepared") {
            Some(late) => late,
            None => self.build_and_run(&at, &mut out)?,
        };
        if let Some(line) = outcome.log_line() {
            let _ = writeln!(log, "{line}");
        }
        // What data/ holds when the job ends (the watch may have missed what it wrote last);
        // not again for a job the watch killed for it.
        let killed_for_disk = matches!(
            outcome,
            JobOutcome::LimitExceeded(
                sandbox::Limit::Disk(_) | sandbox::Limit::DiskUnmeasurable(_)
            )
        );
        let measure = outcome.sandbox_ran() && !killed_for_disk;
        if let (true, Some(limit)) = (measure, settings.security.limits.disk) {
            if let Some(p) = checks::disk(&job.dir.data(), limit) {
                let _ = writeln!(log, "mistry: {p}");
                problems.push(p);
            }
        }
        Ok(outcome)
    }

    fn build_and_run(&self, at: &Running, out: &mut CappedLog) -> Result<JobOutcome, RunError> {
        let Running {
            cfg,
            job,
            settings,
            phases,
            ..
        } = *at;
        let mut opts = cfg.build_options_with(&job.req.project, settings);
        opts.no_cache = job.req.rebuild;
        opts.deadline = at.deadline.map(|(_, d)| d);
        let image =
            match self.builder.build(&opts, out) {
                Ok((image, _)) => image,
                Err(images::BuildError::Deadline) => {
                    return Ok(at.late("its image was built").unwrap_or(
                        JobOutcome::ImageBuildFailed(images::BuildError::Deadline.to_string()),
                    ))
                }
                Err(e) => return Ok(JobOutcome::ImageBuildFailed(e.to_string())),
            };
        phases.mark("image");
        if let Some(late) = at.late("its image was built") {
            return Ok(late);
        }
        if let Err(e) = self.give_data(&image, job.dir) {
            return match e {
                GiveData::User(e) => Ok(JobOutcome::CouldNotRun(e)),
                GiveData::Failed(e) => Err(e),
            };
        }
        if let Some(late) = at.late("its /data was handed over") {
            return Ok(late);
        }
        if image.config.command().is_empty() {
            return Ok(JobOutcome::CouldNotRun(
                "the image has no ENTRYPOINT or CMD".into(),
            ));
        }
        let overlay = !self.overlay_refused.load(Ordering::SeqCst);
        phases.mark("data");
        match self.sandbox(at, &image, overlay, out) {
            Err(e) if overlay && e.overlay_refused() => {
                // The kernel refused an overlay in a user namespace: fall back to a copy.
                tracing::warn!(error = %e, "overlay roots unavailable; jobs run on copies of their image");
                self.overlay_refused.store(true, Ordering::SeqCst);
                self.sandbox(at, &image, false, out)
            }
            r => r,
        }
    }

    /// A job running as a non-root user of its image gets `/data` as its own (mistry's images
    /// create such a user from the `uid` build arg); sandbox root is the daemon's user, or with
    /// `--sandbox-ids subordinate` a subordinate id that must be given `/data` too.
    fn give_data(&self, image: &Image, dir: &JobDir) -> Result<(), GiveData> {
        let store = &self.builder.store;
        let data = dir.data();
        let subordinate = sandbox::default_id_mapping() == sandbox::IdMapping::Subordinate;
        let to_sandbox = |uid, gid| {
            store
                .hand_over_tree(&data, uid, gid)
                .map_err(|e| GiveData::Failed(RunError::store("giving /data to the sandbox")(e)))
        };
        let user = &image.config.user;
        if user.is_empty() {
            return if subordinate {
                to_sandbox(0, 0)
            } else {
                Ok(())
            };
        }
        let u = store
            .resolve_user(image.snapshot.as_deref(), &User::Spec(user.clone()))
            .map_err(|e| GiveData::User(e.to_string()))?;
        if subordinate {
            to_sandbox(u.uid, u.gid)
        } else if u.uid != 0 || u.gid != 0 {
            store.chown_tree(&data, u.uid, u.gid).map_err(|e| {
                GiveData::Failed(RunError::store(format!("giving /data to {user}"))(e))
            })
        } else {
            Ok(())
        }
    }

    /// Run the job's sandbox on its own root (an overlay over its image when `overlay`, else a
    /// snapshot or a copy), thrown away in the background afterwards.
    fn sandbox(
        &self,
        at: &Running,
        image: &Image,
        overlay: bool,
        out: &mut CappedLog,
    ) -> Result<JobOutcome, RunError> {
        let Running {
            cfg,
            job,
            cache_lowers,
            settings,
            phases,
            ..
        } = *at;
        // What is bound from the host is opened by fd without following a link, and bound only
        // if it is still that directory when the sandbox starts (`Bind::from_fd`).
        let data_bind = Bind::from_fd(
            Data::open(job.dir.path())
                .and_then(|d| d.bind_fd())
                .map_err(RunError::io("opening data/ to bind it"))?,
            job.dir.data(),
            "/data",
        );
        let mut input_binds = Vec::with_capacity(job.inputs.len());
        for (name, artifacts) in job.inputs {
            match open_input(artifacts) {
                Ok(fd) => input_binds
                    .push(Bind::from_fd(fd, artifacts, format!("/data/input/{name}")).read_only()),
                Err(e) => return Ok(JobOutcome::CouldNotRun(format!("input {name:?}: {e}"))),
            }
        }
        if !cache_lowers.is_empty() {
            // The upper and work directories of /data/cache, which the store just made for this
            // job (nothing else writes there before it runs): real directories.
            for rel in ["data/cache", images::CACHE_WORK] {
                open_dir_beneath(job.dir.path(), Path::new(rel))
                    .map_err(RunError::io(format!("checking {rel} before mounting it")))?;
            }
        }
        let root = self
            .builder
            .store
            .job_root(image.snapshot.as_deref(), overlay)
            .map_err(RunError::store("preparing the job's root filesystem"))?;
        phases.mark("root");
        let ic = &image.config;
        // data/ (its cache included) counts against the disk limit with the job's root.
        let mut sb = root
            .sandbox()
            .command(ic.command())
            .count_disk(job.dir.data(), sandbox::Counted::All)
            .network(settings.network)
            .policy(settings.security.policy())
            .cwd(if ic.workdir.is_empty() {
                "/"
            } else {
                ic.workdir.as_str()
            })
            .stdout(Stdio::Piped)
            .stderr(Stdio::Piped);
        sb = sb.bind(data_bind);
        if !cache_lowers.is_empty() {
            // The group's cache: its last builds' layers read-only, this job's changes in
            // data/cache (nothing copied).
            let rw = (
                job.dir.data().join("cache"),
                job.dir.path().join(images::CACHE_WORK),
            );
            sb = sb.overlay_mount(cache_lowers.to_vec(), Some(rw), "/data/cache");
        }
        for input in input_binds {
            sb = sb.bind(input);
        }
        for (host, inside) in &cfg.mounts {
            sb = sb.bind(Bind::new(host, inside));
        }
        for (k, v) in ic.env_pairs() {
            sb = sb.env(k, v);
        }
        if !ic.user.is_empty() {
            sb = sb.user(User::Spec(ic.user.clone()));
        }
        if let Some((_, deadline)) = at.deadline {
            // What is left of the job's time limit.
            sb = sb.timeout(deadline.saturating_duration_since(Instant::now()));
        }
        let mut err_w = CappedLog::new(
            job.dir
                .create_stderr_log()
                .map_err(RunError::io("stderr.log"))?,
            settings.security.limits.log,
        );
        let mut child = match sb.spawn() {
            Ok(c) => c,
            // A refused overlay root is retried on a copy (a refused cache overlay is not: the
            // engine probed it at start).
            Err(e @ sandbox::Error::Overlay(_)) if root.is_overlay() && cache_lowers.is_empty() => {
                return Err(e.into())
            }
            Err(e) => {
                let _ = writeln!(err_w, "{e}");
                return Ok(JobOutcome::CouldNotStart(e.to_string()));
            }
        };
        phases.mark("sandbox start");
        (job.on_sandbox)(Some(child.id()));
        // stdout and stderr go to out.log and stderr alone to stderr.log, as they come, both
        // bounded; read to the end whatever the bound, so the job never blocks on a full pipe.
        let streams = [child.stdout.take(), child.stderr.take()];
        let status = std::thread::scope(|s| {
            let copier = s.spawn(|| capped::pump(streams, out, &mut err_w));
            let status = child.wait();
            if status.is_err() {
                // Its pipes close only once it is gone.
                let _ = child.kill();
            }
            let _ = copier.join();
            status
        });
        phases.mark("job");
        (job.on_sandbox)(None);
        Ok(match status? {
            // The sandbox had what was left of the job's time limit: the job had all of it.
            sandbox::ExitStatus::TimedOut(left) => {
                JobOutcome::TimedOut(at.deadline.map_or(left, |(limit, _)| limit))
            }
            other => other.into(),
        })
    }
}

/// An input's `data/artifacts` (`<build>/data/artifacts` of a ready build), to bind it: opened
/// below the build's directory without following a link (`O_PATH`), as the upstream job may
/// have replaced it with one.
fn open_input(artifacts: &Path) -> Result<std::os::fd::OwnedFd, InputNotReady> {
    let build = artifacts.parent().and_then(Path::parent);
    let not_ready = || InputNotReady(build.unwrap_or(artifacts).to_path_buf());
    let build = build.ok_or_else(not_ready)?;
    open_dir_beneath(build, Path::new("data/artifacts")).map_err(|_| not_ready())
}

/// An upstream build (its directory) whose `data/artifacts` a job cannot see.
#[derive(Debug, thiserror::Error)]
#[error("the upstream build {} is not ready", .0.display())]
struct InputNotReady(std::path::PathBuf);

/// Why `/data` could not be given to the job's user.
enum GiveData {
    /// The image's `USER` does not resolve: the job cannot run.
    User(String),
    Failed(RunError),
}
