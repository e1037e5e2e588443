//! The job engine: job IDs, coalescing, the result cache, incremental builds, the on-disk layout,
//! and running a job (image build, then the sandbox) with its logs streamed to disk.
//!
//! ```text
//! <build_path>/<project>/pending/<id>/     while the job runs
//! <build_path>/<project>/ready/<id>/       when it ended (renamed from pending)
//!     data/{cache,artifacts,params/<name>} mounted at /data in the job
//!     out.log                              image build output + job stdout and stderr
//!     stderr.log                           job stderr alone (ContainerStderr)
//!     build_info.json                      BuildInfo without the two log fields
//! <build_path>/<project>/latest            link to the last successful build without a group
//! <build_path>/<project>/groups/<group>    link to the group's last successful build
//! ```

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use images::build::{BuildOptions, Builder, LocalImages};
use images::registry::Registries;
use images::store::{Store, Target};
use sandbox::{Bind, ExitStatus, Stdio, User};
use tokio::sync::{watch, Semaphore};

use crate::config::{Config, Effective};
use crate::jobs::{self, BuildInfo, JobRequest, NEVER_RAN, UNKNOWN_DURATION};
use crate::metrics::Metrics;

/// Why a request could not be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// 400.
    BadRequest(String),
    /// 404, text contains `Unknown project 'NAME'`.
    UnknownProject(String),
    /// 503.
    Overloaded,
    /// 500.
    Internal(String),
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::BadRequest(m) | JobError::Internal(m) => f.write_str(m),
            JobError::UnknownProject(p) => write!(f, "Unknown project '{p}'"),
            JobError::Overloaded => f.write_str("Server is overloaded; try again later"),
        }
    }
}

/// A scheduled job: its ID and a receiver that yields the BuildInfo when it is ready.
pub struct Scheduled {
    pub project: String,
    pub id: String,
    /// `<build_path>/<project>/ready/<id>`.
    pub dir: PathBuf,
    result: watch::Receiver<Option<BuildInfo>>,
    /// Immediately known answer (result cache).
    ready: Option<BuildInfo>,
    coalesced: bool,
}

impl Scheduled {
    /// Wait for the BuildInfo (without its log fields) and the job's directory, which holds
    /// `out.log` and `stderr.log`.
    pub async fn wait(mut self) -> Result<(BuildInfo, PathBuf), JobError> {
        let dir = self.dir.clone();
        if let Some(info) = self.ready.take() {
            return Ok((info, dir));
        }
        let info = loop {
            if let Some(info) = self.result.borrow().clone() {
                break info;
            }
            if self.result.changed().await.is_err() {
                return Err(JobError::Internal(format!(
                    "Error building {}/{}: work: the job ended without a result",
                    self.project, self.id
                )));
            }
        };
        let mut info = info;
        info.coalesced = self.coalesced;
        Ok((info, dir))
    }
}

pub struct Engine {
    pub cfg: Config,
    builder: Arc<Builder>,
    slots: Arc<Semaphore>,
    /// Jobs accepted and not finished (queued or running).
    queued: AtomicUsize,
    pending: Mutex<HashMap<String, watch::Receiver<Option<BuildInfo>>>>,
    link_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Host pids of the running sandboxes' init, by job key.
    running: Mutex<HashMap<String, i32>>,
    shutting_down: AtomicBool,
    /// Set once overlay roots turned out not to work on this host.
    no_overlay: AtomicBool,
    pub metrics: Metrics,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

impl Engine {
    /// Open the layer store and clean up what a crash left behind.
    pub fn new(cfg: Config, helper: Vec<std::ffi::OsString>) -> anyhow::Result<Engine> {
        let builder = Arc::new(builder_for(&cfg, helper, true)?);
        let engine = Engine {
            slots: Arc::new(Semaphore::new(cfg.job_concurrency)),
            queued: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
            link_locks: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            no_overlay: AtomicBool::new(false),
            metrics: Metrics::new(),
            builder,
            cfg,
        };
        engine.clean_pending()?;
        engine.count_hosted();
        Ok(engine)
    }

    pub fn builder(&self) -> &Builder {
        &self.builder
    }

    /// Start-up: every leftover pending build of every project goes (a crash leaves them; they
    /// are never resumed).
    fn clean_pending(&self) -> anyhow::Result<()> {
        for project in self.projects_with_builds() {
            let dir = self.cfg.build_path.join(&project).join("pending");
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                tracing::info!(project, id = %e.file_name().to_string_lossy(), "removing a pending build left by a crash");
                self.builder
                    .store
                    .tools()
                    .remove_tree(&e.path())
                    .map_err(|err| anyhow::anyhow!("removing {}: {err}", e.path().display()))?;
            }
        }
        Ok(())
    }

    fn projects_with_builds(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.cfg.build_path) else {
            return Vec::new();
        };
        let mut v: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| jobs::check_name("project", n).is_ok())
            .collect();
        v.sort();
        v
    }

    fn count_hosted(&self) {
        for p in self.projects_with_builds() {
            let n = fs::read_dir(self.cfg.build_path.join(&p).join("ready"))
                .map(|d| d.count())
                .unwrap_or(0);
            self.metrics.set_hosted(&p, n as i64);
        }
    }

    fn key(project: &str, id: &str) -> String {
        format!("{project}/{id}")
    }

    /// Validate, identify and schedule a job (or find it running, or in the result cache).
    pub async fn schedule(self: &Arc<Self>, req: JobRequest) -> Result<Scheduled, JobError> {
        if req.project.is_empty() {
            return Err(JobError::BadRequest("no project given".into()));
        }
        jobs::check_name("project", &req.project).map_err(JobError::BadRequest)?;
        if !req.group.is_empty() {
            jobs::check_name("group", &req.group).map_err(JobError::BadRequest)?;
        }
        for k in req.params.keys() {
            jobs::check_name("param", k).map_err(JobError::BadRequest)?;
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(JobError::Overloaded);
        }
        let project_dir = self.cfg.projects_path.join(&req.project);
        if !project_dir.join("Dockerfile").is_file() {
            return Err(JobError::UnknownProject(req.project.clone()));
        }
        let (p, g, params, dir) = (
            req.project.clone(),
            req.group.clone(),
            req.params.clone(),
            project_dir.clone(),
        );
        let id = tokio::task::spawn_blocking(move || jobs::job_id(&p, &g, &params, &dir))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))?
            .map_err(|e| {
                JobError::Internal(format!(
                    "Error building {}: work: reading the project: {e}",
                    req.project
                ))
            })?;
        let key = Self::key(&req.project, &id);
        let ready_dir = self
            .cfg
            .build_path
            .join(&req.project)
            .join("ready")
            .join(&id);

        let (tx, rx) = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            // Coalescing: the same job already running.
            if let Some(rx) = pending.get(&key) {
                self.metrics.coalesced();
                tracing::info!(project = %req.project, %id, state = "coalesced", "job joins a running identical job");
                return Ok(Scheduled {
                    project: req.project,
                    id,
                    dir: ready_dir,
                    result: rx.clone(),
                    ready: None,
                    coalesced: true,
                });
            }
            // Result cache (a rebuild asks for a fresh run).
            if let Some(mut info) = read_info(&ready_dir) {
                if info.succeeded() && !req.rebuild {
                    info.cached = true;
                    info.coalesced = false;
                    self.metrics.cached();
                    tracing::info!(project = %req.project, %id, state = "cached", "job answered from the result cache");
                    let (_tx, rx) = watch::channel(None);
                    return Ok(Scheduled {
                        project: req.project,
                        id,
                        dir: ready_dir,
                        result: rx,
                        ready: Some(info),
                        coalesced: false,
                    });
                }
            }
            // Running plus queued jobs may not exceed job_concurrency + job_backlog.
            if self.queued.load(Ordering::SeqCst) >= self.cfg.job_backlog + self.cfg.job_concurrency
            {
                return Err(JobError::Overloaded);
            }
            let (tx, rx) = watch::channel(None);
            pending.insert(key.clone(), rx.clone());
            (tx, rx)
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.metrics.started();
        tracing::info!(project = %req.project, %id, state = "queued", "job accepted");
        let engine = Arc::clone(self);
        let job_id = id.clone();
        let project = req.project.clone();
        tokio::spawn(async move {
            let permit = engine.slots.clone().acquire_owned().await;
            let e2 = Arc::clone(&engine);
            let (req2, id2) = (req.clone(), job_id.clone());
            let info = tokio::task::spawn_blocking(move || e2.run(&req2, &id2))
                .await
                .unwrap_or_else(|e| {
                    let mut info = blank_info(&engine.cfg, &req, &job_id);
                    info.err_build = format!("Error building {}: work: {e}", req.project);
                    info
                });
            drop(permit);
            engine.queued.fetch_sub(1, Ordering::SeqCst);
            engine
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&Self::key(&req.project, &job_id));
            let _ = tx.send(Some(info));
        });
        Ok(Scheduled {
            project,
            id,
            dir: ready_dir,
            result: rx,
            ready: None,
            coalesced: false,
        })
    }

    fn link_lock(&self, project: &str) -> Arc<Mutex<()>> {
        let mut m = self.link_locks.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(project.to_string()).or_default().clone()
    }

    /// Run one job to the end (blocking): everything happens on this thread, so the sandbox's
    /// parent-death signal follows it.
    fn run(&self, req: &JobRequest, id: &str) -> BuildInfo {
        let started = Instant::now();
        let project_build = self.cfg.build_path.join(&req.project);
        let pending = project_build.join("pending").join(id);
        let ready = project_build.join("ready").join(id);
        let mut info = blank_info(&self.cfg, req, id);
        tracing::info!(project = %req.project, %id, state = "pending", "job started");

        let result = self.run_in(req, id, &pending, &mut info);
        if let Err(e) = result {
            if info.err_build.is_empty() {
                info.err_build = format!("Error building {}: work: {e}", req.project);
            }
        }
        self.check_data(req, id, &pending, &mut info);
        info.duration = started.elapsed().as_nanos() as i64;
        if pending.is_dir() {
            let stored = BuildInfo {
                container_stdouterr: String::new(),
                container_stderr: String::new(),
                ..info.clone()
            };
            if let Ok(json) = serde_json::to_vec_pretty(&stored) {
                let _ = fs::write(pending.join("build_info.json"), json);
            }
            // A failed build of the same ID may still be in ready/ (it is re-run).
            if ready.exists() {
                let _ = self.builder.store.tools().remove_tree(&ready);
            }
            let _ = fs::create_dir_all(project_build.join("ready"));
            if let Err(e) = fs::rename(&pending, &ready) {
                info.err_build = format!(
                    "Error building {}: work: moving the build to ready: {e}",
                    req.project
                );
                let _ = self.builder.store.tools().remove_tree(&pending);
            }
        }
        if info.succeeded() {
            let lock = self.link_lock(&req.project);
            let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            let link = if req.group.is_empty() {
                project_build.join("latest")
            } else {
                project_build.join("groups").join(&req.group)
            };
            if let Err(e) = replace_symlink(&ready, &link) {
                tracing::warn!(project = %req.project, %id, error = %e, "could not update {}", link.display());
            }
        }
        self.metrics.finished(&info, started.elapsed());
        self.count_hosted();
        tracing::info!(
            project = %req.project, %id, state = "ready", exit_code = info.exit_code,
            incremental = info.incremental, error = %info.err_build, "job finished"
        );
        info
    }

    /// After a job: `data/artifacts` (what HTTP, rsync and scp serve), `data/cache` and
    /// `data/params` (which the daemon writes into on the next build of the group) must be real
    /// directories. A job that replaced one with a symlink (or anything else) gets it removed
    /// (and an empty directory in its place), so that no transport follows it out of the job;
    /// for artifacts the build fails with a clear ErrBuild, so it is neither linked nor cached.
    fn check_data(&self, req: &JobRequest, id: &str, pending: &Path, info: &mut BuildInfo) {
        let data = pending.join("data");
        if !fs::symlink_metadata(&data).is_ok_and(|m| m.is_dir()) {
            return;
        }
        for name in ["artifacts", "cache", "params"] {
            let path = data.join(name);
            let Ok(meta) = fs::symlink_metadata(&path) else {
                // Removed by the job: nothing to serve, nothing to follow.
                continue;
            };
            if meta.is_dir() {
                continue;
            }
            let what = if meta.file_type().is_symlink() {
                "a symlink"
            } else {
                "something that is not a directory"
            };
            // data/ may belong to the image's user: fall back to the user-namespace helper.
            let removed = fs::remove_file(&path).or_else(|_| {
                self.builder
                    .store
                    .tools()
                    .remove_tree(&path)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            });
            if let Err(e) = &removed {
                tracing::error!(project = %req.project, %id, path = %path.display(), error = %e, "could not remove what the job left instead of a directory");
            }
            let _ = fs::create_dir(&path);
            let msg = format!(
                "the job replaced /data/{name} with {what}; {}",
                if name == "artifacts" {
                    "its artifacts are not served"
                } else {
                    "it was removed"
                }
            );
            tracing::warn!(project = %req.project, %id, "{msg}");
            if let Ok(mut log) = OpenOptions::new()
                .append(true)
                .open(pending.join("out.log"))
            {
                let _ = writeln!(log, "mistry: {msg}");
            }
            if name == "artifacts" {
                add_err_build(info, msg);
            }
        }
    }

    fn run_in(
        &self,
        req: &JobRequest,
        id: &str,
        pending: &Path,
        info: &mut BuildInfo,
    ) -> Result<(), String> {
        let project_build = self.cfg.build_path.join(&req.project);
        let tools = self.builder.store.tools();
        if pending.exists() {
            tools.remove_tree(pending).map_err(|e| e.to_string())?;
        }
        fs::create_dir_all(project_build.join("pending"))
            .map_err(|e| format!("creating {}: {e}", pending.display()))?;
        let data = pending.join("data");
        // Incremental: start from the group's last successful build: a btrfs snapshot of it
        // (build directories are subvolumes on btrfs), a copy of its data/ otherwise.
        let group_link = project_build.join("groups").join(&req.group);
        let base = (!req.group.is_empty())
            .then(|| fs::canonicalize(&group_link).ok())
            .flatten()
            .filter(|p| p.join("data").is_dir());
        let btrfs = self.builder.store.backend() == images::store::BackendKind::Btrfs
            && images::store::is_btrfs(&project_build);
        let snapshotted = match (&base, btrfs) {
            (Some(prev), true) => images::store::btrfs_subvolume_snapshot(prev, pending).is_ok(),
            _ => false,
        };
        if snapshotted {
            // Keep data/ (cache/, artifacts/); the previous job's own files go.
            for f in ["out.log", "stderr.log", "build_info.json"] {
                let _ = fs::remove_file(pending.join(f));
            }
            let _ = tools.remove_tree(&data.join("params"));
            info.incremental = true;
        } else {
            let made = btrfs && images::store::btrfs_subvolume_create(pending).is_ok();
            if !made {
                fs::create_dir(pending)
                    .map_err(|e| format!("creating {}: {e}", pending.display()))?;
            }
            if let Some(prev) = base {
                tools
                    .copy_tree(&prev.join("data"), &data)
                    .map_err(|e| format!("cloning the group's last build: {e}"))?;
                let _ = tools.remove_tree(&data.join("params"));
                info.incremental = true;
            }
        }
        // A previous build's data/ may belong to its image's user: give it back to sandbox root
        // (the daemon's user, or with --sandbox-ids subordinate a subordinate id the root daemon
        // can write to anyway) before the daemon writes the new params.
        use std::os::unix::fs::MetadataExt;
        let ours = nix::unistd::geteuid().as_raw();
        if info.incremental && fs::metadata(&data).is_ok_and(|m| m.uid() != ours) {
            tools
                .chown_tree(&data, 0, 0)
                .map_err(|e| format!("taking back the group's last data/: {e}"))?;
        }
        for d in ["cache", "artifacts", "params"] {
            fs::create_dir_all(data.join(d)).map_err(|e| format!("creating data/{d}: {e}"))?;
        }
        for (k, v) in &req.params {
            fs::write(data.join("params").join(k), v)
                .map_err(|e| format!("writing param {k}: {e}"))?;
        }
        let provisional = serde_json::to_vec_pretty(&*info).unwrap_or_default();
        let _ = fs::write(pending.join("build_info.json"), provisional);

        let log_path = pending.join("out.log");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("creating out.log: {e}"))?;
        let settings = self
            .cfg
            .effective(&req.project)
            .map_err(|e| format!("{e:#}"))?;

        // The image.
        let mut opts = BuildOptions::new(&req.project, self.cfg.projects_path.join(&req.project));
        opts.build_args = vec![("uid".into(), nix::unistd::geteuid().as_raw().to_string())];
        opts.build_args.extend(settings.build_args.clone());
        opts.network = settings.network;
        opts.no_cache = req.rebuild;
        opts.run_timeout = settings.time_limit;
        opts.policy = settings.security.policy();
        opts.download.deny_connect = self.cfg.listen.clone();
        if let Some(t) = settings.time_limit {
            opts.download.timeout = opts.download.timeout.min(t);
        }
        let image = match self.builder.build(&opts, &mut log) {
            Ok((image, _)) => image,
            Err(e) => {
                let _ = writeln!(log, "{e}");
                info.exit_code = NEVER_RAN;
                info.err_build = format!("could not build docker image: {e}");
                return Ok(());
            }
        };
        // A job running as a non-root user of its image gets /data as its own (mistry's images
        // create such a user from the `uid` build arg); sandbox root is the daemon's user, or
        // with --sandbox-ids subordinate a subordinate id that must be given /data too.
        let subordinate = sandbox::default_id_mapping() == sandbox::IdMapping::Subordinate;
        let give_data = |uid, gid| {
            images::tools::hand_over_tree(&data, uid, gid)
                .map_err(|e| format!("giving /data to the sandbox: {e}"))
        };
        if image.config.user.is_empty() && subordinate {
            give_data(0, 0)?;
        }
        if !image.config.user.is_empty() {
            let user = sandbox::User::Spec(image.config.user.clone());
            let resolved = match &image.snapshot {
                Some(snap) => self.builder.store.view(snap).resolve_user(&user),
                // An empty image has no /etc/passwd: numeric ids only.
                None => sandbox::resolve_user_with(&user, "", ""),
            };
            match resolved {
                Ok(u) if subordinate => give_data(u.uid, u.gid)?,
                Ok(u) if u.uid != 0 || u.gid != 0 => {
                    tools
                        .chown_tree(&data, u.uid, u.gid)
                        .map_err(|e| format!("giving /data to {}: {e}", image.config.user))?;
                }
                Ok(_) => {}
                Err(e) => {
                    info.err_build = format!("could not run the job: {e}");
                    let _ = writeln!(log, "{}", info.err_build);
                    return Ok(());
                }
            }
        }
        let command = image.config.command();
        if command.is_empty() {
            info.err_build = "could not run the job: the image has no ENTRYPOINT or CMD".into();
            let _ = writeln!(log, "{}", info.err_build);
            return Ok(());
        }

        // The job, on its own view of the image: an overlay over the image (plain backend), or a
        // snapshot of it (btrfs); thrown away in the background afterwards.
        let scratch = self.builder.store.tmp_path("job");
        let attempt = |info: &mut BuildInfo| -> Result<(Target, Result<(), String>), String> {
            let root = self.job_root(image.snapshot.as_deref(), &scratch)?;
            let r = self.run_sandbox(
                req, id, &root, &image, &data, pending, &log, &settings, info,
            );
            Ok((root, r))
        };
        let (root, mut result) = attempt(info)?;
        if let (Target::Overlay { .. }, Err(e)) = (&root, &result) {
            if e.contains("overlay") {
                // The kernel refused an overlay in a user namespace: fall back to a copy.
                tracing::warn!(error = %e, "overlay roots unavailable; jobs run on copies of their image");
                self.no_overlay.store(true, Ordering::SeqCst);
                result = attempt(info)?.1;
            }
        }
        if let (Ok(()), Some(limit)) = (&result, settings.security.limits.disk) {
            check_disk(&data, limit, &log, info);
        }
        let builder = Arc::clone(&self.builder);
        std::thread::spawn(move || {
            if let Err(e) = builder.store.remove_tree(&scratch) {
                tracing::warn!(path = %scratch.display(), error = %e, "could not remove a job's root filesystem");
            }
        });
        result
    }

    /// Prepare the job's root under `scratch`.
    fn job_root(&self, snapshot: Option<&str>, scratch: &Path) -> Result<Target, String> {
        let store = &self.builder.store;
        if scratch.exists() {
            store.remove_tree(scratch).map_err(|e| e.to_string())?;
        }
        store
            .job_target(snapshot, scratch, !self.no_overlay.load(Ordering::SeqCst))
            .map_err(|e| format!("preparing the job's root filesystem: {e}"))
    }

    #[allow(clippy::too_many_arguments)]
    fn run_sandbox(
        &self,
        req: &JobRequest,
        id: &str,
        root: &Target,
        image: &images::build::Image,
        data: &Path,
        pending: &Path,
        log: &File,
        settings: &Effective,
        info: &mut BuildInfo,
    ) -> Result<(), String> {
        let cfg = &image.config;
        let stdout = log.try_clone().map_err(|e| format!("out.log: {e}"))?;
        let mut sb = root
            .sandbox()
            .command(cfg.command())
            .bind(Bind::new(data, "/data"))
            .network(settings.network)
            .policy(settings.security.policy())
            .cwd(if cfg.workdir.is_empty() {
                "/"
            } else {
                cfg.workdir.as_str()
            })
            .stdout(Stdio::Fd(stdout.into()))
            .stderr(Stdio::Piped);
        for (host, inside) in &self.cfg.mounts {
            sb = sb.bind(Bind::new(host, inside));
        }
        for (k, v) in cfg.env_pairs() {
            sb = sb.env(k, v);
        }
        if !cfg.user.is_empty() {
            sb = sb.user(User::Spec(cfg.user.clone()));
        }
        if let Some(t) = settings.time_limit {
            sb = sb.timeout(t);
        }
        if let Some(disk) = settings.security.limits.disk {
            // No single file may be larger than all of data/ may hold.
            sb = sb.rlimit(sandbox::Rlimit {
                resource: sandbox::RlimitResource::FSize,
                soft: disk,
                hard: disk,
            });
        }
        let mut child = match sb.spawn() {
            Ok(c) => c,
            Err(e)
                if matches!(root, Target::Overlay { .. }) && e.to_string().contains("overlay") =>
            {
                return Err(e.to_string());
            }
            Err(e) => {
                let mut l = log;
                let _ = writeln!(l, "{e}");
                let _ = fs::write(pending.join("stderr.log"), format!("{e}\n"));
                info.exit_code = 127;
                info.err_build = String::new();
                return Ok(());
            }
        };
        info.exit_code = 0;
        let key = Self::key(&req.project, id);
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), child.id());
        // stderr goes to out.log and, alone, to stderr.log, as it comes.
        let mut stderr = child.stderr.take();
        let mut log_w = log.try_clone().map_err(|e| format!("out.log: {e}"))?;
        let mut err_w =
            File::create(pending.join("stderr.log")).map_err(|e| format!("stderr.log: {e}"))?;
        let tee = std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            if let Some(s) = stderr.as_mut() {
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let _ = log_w.write_all(&buf[..n]);
                    let _ = err_w.write_all(&buf[..n]);
                }
            }
        });
        let status = child.wait();
        let _ = tee.join();
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        let mut l = log;
        match status {
            Ok(ExitStatus::Exited(c)) => info.exit_code = c,
            Ok(ExitStatus::Signaled(s)) => {
                info.exit_code = 128 + s;
                let _ = writeln!(l, "mistry: the job was {}", ExitStatus::Signaled(s));
            }
            Ok(ExitStatus::TimedOut(t)) => {
                info.exit_code = -1;
                info.err_build = format!("the job exceeded its time limit of {t:?} and was killed");
                let _ = writeln!(l, "mistry: {}", info.err_build);
            }
            Ok(ExitStatus::LimitExceeded(limit)) => {
                info.exit_code = -1;
                info.err_build = format!("the job {limit} and was killed");
                let _ = writeln!(l, "mistry: {}", info.err_build);
            }
            Ok(ExitStatus::Killed) => {
                info.exit_code = -1;
                info.err_build = "the job was killed (the server is shutting down)".into();
                let _ = writeln!(l, "mistry: {}", info.err_build);
            }
            Err(e) => return Err(e.to_string()),
        }
        Ok(())
    }

    /// Graceful shutdown: refuse new jobs, give running ones `grace` to finish, then kill them.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + grace;
        loop {
            let busy = !self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty();
            if !busy {
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Kill what runs, and what starts meanwhile (a job still building its image at the
        // deadline starts its sandbox later); let the killed jobs move to ready.
        let mut killed = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pids: Vec<i32> = self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .copied()
                .collect();
            for pid in pids {
                if killed.insert(pid) {
                    tracing::warn!(pid, "killing a job still running at shutdown");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let busy = !self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty();
            if !busy || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every job on disk, newest first: (project, id, state). Only each job's start time is kept
    /// while sorting, so memory does not grow with the jobs' params; read each job's BuildInfo
    /// with [`Engine::job_info`] as it is sent.
    pub fn list(&self) -> Vec<(String, String, &'static str)> {
        #[derive(serde::Deserialize)]
        struct Started {
            #[serde(rename = "StartedAt", default)]
            started_at: String,
        }
        let mut out = Vec::new();
        for project in self.projects_with_builds() {
            for (state, dir) in [("pending", "pending"), ("ready", "ready")] {
                let Ok(entries) = fs::read_dir(self.cfg.build_path.join(&project).join(dir)) else {
                    continue;
                };
                for e in entries.flatten() {
                    let id = e.file_name().to_string_lossy().into_owned();
                    let Ok(text) = fs::read(e.path().join("build_info.json")) else {
                        continue;
                    };
                    if let Ok(s) = serde_json::from_slice::<Started>(&text) {
                        out.push((s.started_at, project.clone(), id, state));
                    }
                }
            }
        }
        out.sort_by(|a, b| b.0.cmp(&a.0));
        out.into_iter()
            .map(|(_, p, id, state)| (p, id, state))
            .collect()
    }

    /// A job's BuildInfo in the given state (`pending` or `ready`); a pending job that became
    /// ready meanwhile is found there, with its new state.
    pub fn job_info(
        &self,
        project: &str,
        id: &str,
        state: &'static str,
    ) -> Option<(&'static str, BuildInfo)> {
        let base = self.cfg.build_path.join(project);
        if let Some(info) = read_info(&base.join(state).join(id)) {
            return Some((state, info));
        }
        if state == "pending" {
            return read_info(&base.join("ready").join(id)).map(|i| ("ready", i));
        }
        None
    }

    /// A queued or running job's state, in memory: the receiver holds `None` until the job is
    /// ready (moved to `ready/`), then its BuildInfo. `None` when the job is not running.
    pub fn watch(&self, project: &str, id: &str) -> Option<watch::Receiver<Option<BuildInfo>>> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&Self::key(project, id))
            .cloned()
    }

    /// One job: its state, info and directory.
    pub fn job(&self, project: &str, id: &str) -> Option<(&'static str, BuildInfo, PathBuf)> {
        if jobs::check_name("project", project).is_err() || jobs::check_name("job", id).is_err() {
            return None;
        }
        for (state, dir) in [("pending", "pending"), ("ready", "ready")] {
            let d = self.cfg.build_path.join(project).join(dir).join(id);
            if let Some(info) = read_info(&d) {
                return Some((state, info, d));
            }
        }
        None
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
    let mut sources: Vec<Box<dyn images::build::BaseSource>> = Vec::new();
    if let Some(dir) = &cfg.images_path {
        sources.push(Box::new(LocalImages { dir: dir.clone() }));
    }
    sources.push(Box::new(Registries {
        config: cfg.registries.clone(),
    }));
    Ok(Builder::new(store, sources))
}

fn blank_info(cfg: &Config, req: &JobRequest, id: &str) -> BuildInfo {
    BuildInfo {
        params: req.params.clone(),
        group: req.group.clone(),
        path: cfg
            .build_path
            .join(&req.project)
            .join("ready")
            .join(id)
            .join("data/artifacts")
            .display()
            .to_string(),
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
        url: format!("job/{}/{id}", req.project),
    }
}

/// After a job: `data/` may hold at most `limit` bytes; a job that left more fails (its result
/// is neither linked nor cached, and the next build of its group does not start from it).
fn check_disk(data: &Path, limit: u64, log: &File, info: &mut BuildInfo) {
    let msg = match crate::security::disk_usage(data, limit) {
        Ok(used) if used <= limit => return,
        Ok(_) => format!("the job's /data holds more than its disk limit of {limit} bytes"),
        // A tree the daemon cannot read (e.g. a directory the job made mode 000) cannot be
        // shown to be within the limit: it fails.
        Err(e) => format!("the job's /data could not be measured against its disk limit: {e}"),
    };
    let mut l = log;
    let _ = writeln!(l, "mistry: {msg}");
    add_err_build(info, msg);
}

/// Add a failure found after the job ran to its ErrBuild (after what may be there already).
fn add_err_build(info: &mut BuildInfo, msg: String) {
    info.err_build = if info.err_build.is_empty() {
        msg
    } else {
        format!("{}; {msg}", info.err_build)
    };
}

fn read_info(dir: &Path) -> Option<BuildInfo> {
    let text = fs::read(dir.join("build_info.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Point `link` at `target`, atomically.
fn replace_symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    if let Some(parent) = link.parent() {
        fs::create_dir_all(parent)?;
    }
    let tmp = link.with_file_name(format!(
        ".{}.tmp-{}",
        link.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, link)
}
