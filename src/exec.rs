//! `mistryd exec` (and `mistry exec`, which runs it): a project's job on this machine with no
//! server, through the daemon's own engine — the same image builder, sandbox, job ID and
//! on-disk layout — into a local state directory (`$XDG_CACHE_HOME/mistry` by default).
//!
//! The state directory is a `build_path`: `<state>/<project>/{pending,ready}/<id>/...` and the
//! layer store in `<state>/.mistry`. One `mistry exec` at a time uses a state directory (an
//! engine that starts removes the pending builds it finds); a second one waits.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use mistry_client::ExecArgs;

use crate::config::Config;
use crate::engine::{Engine, Layout, Stage};
use crate::jobs::{self, BuildInfo, JobRequest, NEVER_RAN};
use crate::pipeline::{JobRun, JobRunState, RunRecord, RunState};
use crate::service::{JobDir, Jobs, LocalJobs};

/// The sentence printed with the job ID.
pub const SAME_ID: &str = "a server with the same project, group and params gives the same job ID";

/// What to run: the projects directory and the project in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    /// The directory holding the project (canonicalized), as a server's `projects_path`.
    pub projects_path: PathBuf,
    /// The project's directory name in it.
    pub name: String,
}

/// The project of the options: `--project-dir DIR` (default: the current directory) is project
/// `DIR`'s name in `DIR`'s parent, so that its job ID is the one a server whose projects_path is
/// that parent computes; `--projects P --project N` is `N` in `P`.
pub fn project_of(args: &ExecArgs) -> Result<Project> {
    let (dir, given) = match (&args.projects, &args.project) {
        (Some(projects), Some(name)) => {
            jobs::check_name("project", name).map_err(|e| anyhow!("{e}"))?;
            (
                projects.join(name),
                format!("project {name} in {}", projects.display()),
            )
        }
        _ => {
            let d = args
                .project_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("."));
            let shown = d.display().to_string();
            (d, format!("project directory {shown}"))
        }
    };
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{given}: cannot be opened"))?;
    if !dir.join("Dockerfile").is_file() {
        bail!(
            "no Dockerfile in {}: a project is a directory with a Dockerfile (give --project-dir \
             DIR, or --projects DIR --project NAME)",
            dir.display()
        );
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| anyhow!("{} cannot be a project (it has no name)", dir.display()))?;
    jobs::check_name("project", &name).map_err(|e| anyhow!("{}: {e}", dir.display()))?;
    let projects_path = dir
        .parent()
        .ok_or_else(|| anyhow!("{} cannot be a project (it has no parent)", dir.display()))?
        .to_path_buf();
    Ok(Project {
        projects_path,
        name,
    })
}

/// The state directory: `--state-dir`, else `$XDG_CACHE_HOME/mistry`, else `~/.cache/mistry`.
pub fn state_dir(
    given: Option<&Path>,
    xdg_cache_home: Option<&std::ffi::OsStr>,
    home: Option<&std::ffi::OsStr>,
) -> Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d.to_path_buf());
    }
    // The XDG spec: a relative path is invalid and is ignored.
    if let Some(x) = xdg_cache_home.map(Path::new).filter(|p| p.is_absolute()) {
        return Ok(x.join("mistry"));
    }
    match home.filter(|h| !h.is_empty()) {
        Some(h) => Ok(Path::new(h).join(".cache/mistry")),
        None => bail!("no state directory: give --state-dir DIR (or set XDG_CACHE_HOME or HOME)"),
    }
}

/// The configuration of a local run: the projects directory, the state directory as
/// build_path (the store inside it), local base images (`--images`). Without a configuration
/// file every other setting is the default but the network (the host's); with one (`--config`,
/// the daemon's own file) every other setting is the file's, as the daemon applies it to a job:
/// network, limits, seccomp, secrets, registries, mounts, time limits, `images_path`...
pub fn config(
    projects_path: &Path,
    state: &Path,
    images: Option<&Path>,
    file: Option<&Path>,
) -> Result<Config> {
    std::fs::create_dir_all(state)
        .with_context(|| format!("creating the state directory {}", state.display()))?;
    // Where the run's projects and state are: never the server's directories (its projects
    // and build_path may not exist here, and a daemon may be using them), nor its store.
    let mut local = serde_json::json!({
        "projects_path": projects_path,
        "build_path": state,
        "store_path": null,
    });
    if let Some(images) = images {
        let images = images
            .canonicalize()
            .with_context(|| format!("base images {}", images.display()))?;
        local["images_path"] = serde_json::json!(images);
    }
    if let Some(file) = file {
        return Config::load_for_local_run(file, &local);
    }
    // The developer's own project on their own machine: the host's network, as before
    // isolated networks existed (a project's .mistry.json may still narrow it).
    local["network"] = serde_json::json!("host");
    if let Some(o) = local.as_object_mut() {
        o.retain(|_, v| !v.is_null());
    }
    Config::parse(&local.to_string(), Path::new("mistry exec"))
}

fn read_sysctl(name: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn usermod_hint() -> String {
    let who = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map_or_else(|| "$USER".into(), |u| u.name);
    format!("usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {who}")
}

/// What a new user's machine may lack, each as one line: user namespaces (an error), and
/// subordinate ids (`Ok(Some(warning))`: only root exists in the sandboxes, which is enough for
/// images whose files all belong to root).
pub fn preflight() -> Result<Option<String>> {
    let root = nix::unistd::geteuid().is_root();
    if read_sysctl("user.max_user_namespaces").as_deref() == Some("0") {
        bail!(
            "no user namespaces: user.max_user_namespaces is 0 (sysctl -w \
             user.max_user_namespaces=28633 as root)"
        );
    }
    if !root && read_sysctl("kernel.unprivileged_userns_clone").as_deref() == Some("0") {
        bail!(
            "no user namespaces: kernel.unprivileged_userns_clone is 0 (sysctl -w \
             kernel.unprivileged_userns_clone=1 as root)"
        );
    }
    if !root && read_sysctl("kernel.apparmor_restrict_unprivileged_userns").as_deref() == Some("1")
    {
        bail!(
            "no user namespaces: AppArmor restricts them (sysctl -w \
             kernel.apparmor_restrict_unprivileged_userns=0 as root)"
        );
    }
    let warning = match sandbox::try_choose_id_map(sandbox::IdMapping::Auto) {
        Err(e) => bail!("no subordinate ids: {e} ({})", usermod_hint()),
        Ok((sandbox::IdMap::Single { .. }, Some(why))) if !root => Some(format!(
            "no subordinate ids ({why}): only root exists in the sandbox, images with files of \
             other users fail to build ({})",
            usermod_hint()
        )),
        Ok(_) => None,
    };
    // The real thing: a sandbox on the host's root.
    let probe = sandbox::Sandbox::new("/")
        .read_only_root(true)
        .network(sandbox::NetworkMode::None)
        .command(["/bin/true"])
        .output();
    match probe {
        Ok(o) if o.status.success() => Ok(warning),
        Ok(o) => bail!(
            "no sandbox can be started (user namespaces): /bin/true ended with {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => bail!("no user namespaces: no sandbox can be started: {e}"),
    }
}

/// Hold the state directory for this run (another `mistry exec` on it waits).
fn lock_state(state: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    let path = state.join(".mistry-exec.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
            eprintln!(
                "mistry exec: waiting for another mistry exec using {}",
                state.display()
            );
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| anyhow!("locking {}: {e}", path.display()))
        }
        Err((_, e)) => bail!("locking {}: {e}", path.display()),
    }
}

/// A log line as shown: image steps (`Step 2/5 : RUN make`) become progress lines.
pub fn shown(line: &str) -> String {
    if let Some(rest) = line.strip_prefix("Step ") {
        if let Some((count, text)) = rest.split_once(" : ") {
            if let Some((n, m)) = count.split_once('/') {
                if n.parse::<u32>().is_ok() && m.parse::<u32>().is_ok() {
                    return format!("==> image step {n}/{m}: {text}");
                }
            }
        }
    }
    line.to_string()
}

/// The process exit code of a job: its own when it ran and failed, 1 when it could not run or
/// its build failed, else 0.
pub fn exit_code(info: &BuildInfo) -> i32 {
    match info.exit_code {
        0 if info.err_build.is_empty() => 0,
        c @ 1..=255 => c,
        _ => 1,
    }
}

/// Copy the artifacts of the ready build in `job_dir` to `target` as the server sends them: by
/// file descriptor, links as links, nothing outside `target`.
pub fn copy_artifacts(job_dir: &Path, target: &Path) -> Result<()> {
    std::fs::create_dir_all(target)
        .with_context(|| format!("creating the target {}", target.display()))?;
    let root = crate::tree::open_artifacts(job_dir)
        .with_context(|| format!("opening the artifacts of {}", job_dir.display()))?;
    let (r, w) = nix::unistd::pipe().context("copying the artifacts")?;
    let writer = std::thread::spawn(move || {
        crate::tree::write_tree(&root, std::fs::File::from(w)).map(|_| ())
    });
    let unpacked = mistry_client::unpack(std::fs::File::from(r), target);
    let written = writer
        .join()
        .map_err(|_| anyhow!("copying the artifacts: the writer panicked"))?;
    unpacked?;
    written.context("reading the artifacts")?;
    Ok(())
}

/// `<target>/<job>`, where a pipeline's job's artifacts go, made a directory of its own: the
/// target is the user's (a link there is followed), but `<job>` in it may be what an earlier
/// copy of artifacts left there (a job's symlink): a symlink or anything but a directory is
/// refused, never followed.
fn job_target(target: &Path, job: &str) -> Result<PathBuf> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let to = target.join(job);
    std::fs::create_dir_all(target)
        .with_context(|| format!("creating the target {}", target.display()))?;
    let dir = rustix::fs::open(
        target,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening the target {}", target.display()))?;
    match rustix::fs::statat(&dir, job, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
        Ok(st) => bail!(
            "refusing to copy the artifacts into {}: it is {} (not followed)",
            to.display(),
            if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                "a symlink"
            } else {
                "not a directory"
            }
        ),
        Err(rustix::io::Errno::NOENT) => rustix::fs::mkdirat(&dir, job, Mode::from_raw_mode(0o755))
            .with_context(|| format!("creating {}", to.display()))?,
        Err(e) => return Err(e).with_context(|| format!("{}", to.display())),
    }
    Ok(to)
}

/// `mistryd exec`: print errors as one line; the exit code (the job's when it failed).
/// `set_up` applies the daemon's id mapping to the configuration (as `mistryd` does).
/// `mistryd exec` (`config`: the daemon's configuration file, `--config`, when given).
pub fn main(
    args: &ExecArgs,
    config: Option<&Path>,
    set_up: impl FnOnce(&mut Config) -> Result<()>,
) -> i32 {
    let result = run(args, config, set_up);
    crate::security::stop_networks();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mistry exec: {e:#}");
            1
        }
    }
}

fn run(
    args: &ExecArgs,
    config_file: Option<&Path>,
    set_up: impl FnOnce(&mut Config) -> Result<()>,
) -> Result<i32> {
    let params = mistry_client::parse_params(&args.params)?;
    for k in params.keys() {
        jobs::check_name("param", k).map_err(|e| anyhow!("{e}"))?;
    }
    if let Some(t) = &args.target {
        if t.is_file() {
            bail!("target {} is a file", t.display());
        }
    }
    let (project, projects_path) = match (&args.pipeline, &args.projects) {
        (Some(name), Some(projects)) => {
            jobs::check_name("pipeline", name).map_err(|e| anyhow!("{e}"))?;
            let p = projects
                .canonicalize()
                .with_context(|| format!("projects directory {}", projects.display()))?;
            (None, p)
        }
        _ => {
            let p = project_of(args)?;
            let path = p.projects_path.clone();
            (Some(p), path)
        }
    };
    let state = state_dir(
        args.state_dir.as_deref(),
        std::env::var_os("XDG_CACHE_HOME").as_deref(),
        std::env::var_os("HOME").as_deref(),
    )?;
    let mut cfg = config(&projects_path, &state, args.images.as_deref(), config_file)?;
    set_up(&mut cfg)?;
    cfg.set_up_networks(false);
    let warning = preflight()?;
    if let Some(w) = &warning {
        eprintln!("mistry exec: warning: {w}");
    }
    let _lock = lock_state(&cfg.build_path)?;
    let helper = crate::image_cli::helper_command()?;
    let engine = Arc::new(Engine::new(cfg, helper).context("starting the engine")?);
    let jobs: Arc<dyn Jobs> = Arc::new(LocalJobs::new(engine));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let Some(project) = project else {
        let name = args.pipeline.clone().unwrap_or_default();
        return pipeline(
            &jobs,
            &rt,
            &projects_path,
            &name,
            params,
            args.target.as_deref(),
        );
    };
    let req = JobRequest {
        project: project.name.clone(),
        group: args.group.clone(),
        params,
        rebuild: args.rebuild,
        ..Default::default()
    };
    let started = Instant::now();
    let (info, dir) = rt.block_on(run_job(&jobs, req))?;
    let elapsed = started.elapsed();
    let mut out = std::io::stdout().lock();
    let code = exit_code(&info);
    let how = if info.exit_code == NEVER_RAN {
        " (the job did not run)"
    } else if info.cached {
        " (cached)"
    } else if info.coalesced {
        " (coalesced)"
    } else {
        ""
    };
    writeln!(out, "Job ID: {} ({SAME_ID})", dir.id())?;
    writeln!(out, "Exit code: {}{how}", info.exit_code)?;
    writeln!(out, "Time: {:.2}s", elapsed.as_secs_f64())?;
    let artifacts = dir.data().join("artifacts");
    match (&args.target, info.succeeded()) {
        (Some(t), true) => {
            copy_artifacts(dir.path(), t)?;
            writeln!(
                out,
                "Artifacts: {}, copied to {}",
                artifacts.display(),
                t.display()
            )?;
        }
        _ => writeln!(out, "Artifacts: {}", artifacts.display())?,
    }
    out.flush()?;
    drop(out);
    if !info.err_build.is_empty() {
        let hint = match (&warning, info.exit_code == NEVER_RAN) {
            (Some(_), true) => format!(" ({})", usermod_hint()),
            _ => String::new(),
        };
        eprintln!(
            "mistry exec: Build failed: {}{hint}",
            info.err_build.trim_end().replace('\n', "; ")
        );
    } else if code != 0 {
        eprintln!(
            "mistry exec: the job failed with exit code {}",
            info.exit_code
        );
    }
    Ok(code)
}

/// The line of one job of a pipeline run when its state changes (`None`: still waiting). Jobs of
/// a triggered run are prefixed by its pipeline.
pub fn pipeline_line(main: &str, rec: &RunRecord, j: &JobRun, layout: &Layout) -> Option<String> {
    let prefix = if rec.pipeline == main {
        String::new()
    } else {
        format!("{}/", rec.pipeline)
    };
    let what = match j.state {
        JobRunState::Waiting => return None,
        JobRunState::Queued | JobRunState::Pending => j.state.as_str().to_string(),
        JobRunState::Ready => {
            let flags: Vec<&str> = [
                (j.cached, "cached"),
                (j.coalesced, "coalesced"),
                (j.incremental, "incremental"),
            ]
            .into_iter()
            .filter_map(|(on, f)| on.then_some(f))
            .collect();
            if flags.is_empty() {
                format!("ready, job {}", j.id)
            } else {
                format!("ready ({}), job {}", flags.join(", "), j.id)
            }
        }
        JobRunState::Failed => {
            let log = layout.job(&j.project, &j.id, Stage::Ready).out_log();
            let why = match j.exit_code {
                0 | NEVER_RAN => {
                    let first = j.err_build.lines().next().unwrap_or("").to_string();
                    if first.is_empty() {
                        "failed".to_string()
                    } else {
                        format!("failed: {first}")
                    }
                }
                c => format!("failed with exit code {c}"),
            };
            if j.id.is_empty() {
                why
            } else {
                format!("{why}, job {}, log {}", j.id, log.display())
            }
        }
        JobRunState::Skipped => "skipped (a job it needs failed)".to_string(),
    };
    Some(format!("{prefix}{}: {what}", j.name))
}

/// A job of a run: (pipeline, run, job name).
type RunJob = (String, String, String);

/// A line of a local pipeline run, printed in the order the run's changes came.
enum Print {
    Line(String),
    /// After the last line of a job's log (its follower ended).
    AfterLog(tokio::sync::oneshot::Receiver<()>, String),
    /// After the log of a job that ended before it could be followed (its `out.log`, each line
    /// after the prefix).
    AfterLogFile(PathBuf, String, String),
}

/// Print the lines of a local pipeline run in order, until every sender is gone.
async fn printer(mut lines: tokio::sync::mpsc::UnboundedReceiver<Print>) {
    while let Some(p) = lines.recv().await {
        match p {
            Print::Line(line) => println!("{line}"),
            Print::AfterLog(ended, line) => {
                let _ = ended.await;
                println!("{line}");
            }
            Print::AfterLogFile(log, prefix, line) => {
                print_log_file(log, prefix).await;
                println!("{line}");
            }
        }
    }
}

/// What a local pipeline run shows: each job's last state, the runs seen, and the jobs whose
/// log is followed.
struct Shown {
    states: std::collections::HashMap<RunJob, JobRunState>,
    runs: Vec<RunRecord>,
    /// The jobs whose log was looked for when they started running: whether it is followed
    /// (its follower's end), or was not in flight any more (`None`).
    followed: std::collections::HashMap<RunJob, Option<tokio::sync::oneshot::Receiver<()>>>,
    /// The tasks printing logs.
    followers: Vec<tokio::task::JoinHandle<()>>,
    /// To the printer; `None` once the run ended.
    print: Option<tokio::sync::mpsc::UnboundedSender<Print>>,
}

impl Shown {
    fn new(print: tokio::sync::mpsc::UnboundedSender<Print>) -> Shown {
        Shown {
            states: Default::default(),
            runs: Vec::new(),
            followed: Default::default(),
            followers: Vec::new(),
            print: Some(print),
        }
    }

    fn print(&self, p: Print) {
        if let Some(tx) = &self.print {
            let _ = tx.send(p);
        }
    }

    /// A run's record changed: print the state line of each job whose state changed, follow
    /// the log of each job that starts running (its lines prefixed `[job] `, or
    /// `[pipeline/job] ` in a triggered run), and print a job's end line after its log (a job
    /// from the result cache has no log lines).
    fn observe(
        &mut self,
        jobs: &Arc<dyn Jobs>,
        rt: &tokio::runtime::Handle,
        main: &str,
        layout: &Layout,
        rec: &RunRecord,
    ) {
        match self
            .runs
            .iter()
            .position(|r| r.pipeline == rec.pipeline && r.run == rec.run)
        {
            Some(i) => self.runs[i] = rec.clone(),
            None => {
                if rec.pipeline != main {
                    self.print(Print::Line(format!(
                        "==> pipeline {} triggered (run {})",
                        rec.pipeline, rec.run
                    )));
                }
                self.runs.push(rec.clone());
            }
        }
        for j in &rec.jobs {
            let key = (rec.pipeline.clone(), rec.run.clone(), j.name.clone());
            if self.states.insert(key.clone(), j.state) == Some(j.state) {
                continue;
            }
            let Some(line) = pipeline_line(main, rec, j, layout) else {
                continue;
            };
            let prefix = if rec.pipeline == main {
                format!("[{}] ", j.name)
            } else {
                format!("[{}/{}] ", rec.pipeline, j.name)
            };
            match j.state {
                JobRunState::Pending => {
                    self.print(Print::Line(line));
                    if self.followed.contains_key(&key) {
                        continue;
                    }
                    // Its log as it comes, or (it ended before it could be followed) whole
                    // from ready/; its end line after it.
                    let (done, ended) = tokio::sync::oneshot::channel();
                    let (jobs, project, id) = (Arc::clone(jobs), j.project.clone(), j.id.clone());
                    let log = layout.job(&j.project, &j.id, Stage::Ready).out_log();
                    self.followers.push(rt.spawn(async move {
                        if !follow_log(&jobs, &project, &id, prefix.clone()).await {
                            print_log_file(log, prefix).await;
                        }
                        let _ = done.send(());
                    }));
                    self.followed.insert(key, Some(ended));
                }
                JobRunState::Ready | JobRunState::Failed => {
                    match self.followed.get_mut(&key).and_then(Option::take) {
                        Some(ended) => self.print(Print::AfterLog(ended, line)),
                        // It ended before it could be followed: its log is complete.
                        None if !j.cached && !j.id.is_empty() => {
                            let log = layout.job(&j.project, &j.id, Stage::Ready).out_log();
                            self.print(Print::AfterLogFile(log, prefix, line));
                        }
                        None => self.print(Print::Line(line)),
                    }
                }
                _ => self.print(Print::Line(line)),
            }
        }
    }
}

/// `mistryd exec --pipeline NAME`: the run (and the runs it triggers) on the local engine, a line
/// per job state change and each job's image steps and log as they come, prefixed with its name
/// (interleaved when jobs run in parallel; none for a job from the result cache), then the
/// summary; the artifacts of each ready job copied to
/// `<target>/<job>/`. Exit code 0 when the run succeeded, else 1.
fn pipeline(
    jobs: &Arc<dyn Jobs>,
    rt: &tokio::runtime::Runtime,
    projects_path: &Path,
    name: &str,
    params: std::collections::BTreeMap<String, String>,
    target: Option<&Path>,
) -> Result<i32> {
    let (print, lines) = tokio::sync::mpsc::unbounded_channel();
    let printing = rt.spawn(printer(lines));
    let shown = Arc::new(std::sync::Mutex::new(Shown::new(print)));
    let layout = Layout::new(&jobs.config().build_path);
    let observer: crate::pipeline::Observer = {
        let (shown, main, layout) = (Arc::clone(&shown), name.to_string(), layout.clone());
        let (jobs, handle) = (Arc::clone(jobs), rt.handle().clone());
        Arc::new(move |rec: &RunRecord| {
            let mut guard = shown
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            guard.observe(&jobs, &handle, &main, &layout, rec);
        })
    };
    let started = Instant::now();
    let run = rt.block_on(crate::pipeline::run_pipeline(
        jobs,
        projects_path,
        name,
        params,
        Some(observer),
    ));
    // Every run ended: print what is left (the last logs and end lines) before the summary.
    let followers = {
        let mut s = shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.print = None;
        std::mem::take(&mut s.followers)
    };
    rt.block_on(async {
        for f in followers {
            let _ = f.await;
        }
        let _ = printing.await;
    });
    let rec = run.map_err(|e| anyhow!("{e}"))?;
    let elapsed = started.elapsed();
    let succeeded = rec.state == RunState::Succeeded;
    let mut out = std::io::stdout().lock();
    let ready = rec
        .jobs
        .iter()
        .filter(|j| j.state == JobRunState::Ready)
        .count();
    let cached = rec.jobs.iter().filter(|j| j.cached).count();
    writeln!(out, "Run ID: {}", rec.run)?;
    for j in &rec.jobs {
        if j.id.is_empty() {
            writeln!(out, "Job {}: {}", j.name, j.state.as_str())?;
            continue;
        }
        let dir = layout.job(&j.project, &j.id, Stage::Ready);
        let artifacts = dir.data().join("artifacts");
        let mut line = format!(
            "Job {}: {}, {}, exit code {}, artifacts {}",
            j.name,
            j.id,
            j.state.as_str(),
            j.exit_code,
            artifacts.display()
        );
        if let (Some(t), true, JobRunState::Ready) = (target, succeeded, j.state) {
            let to = job_target(t, &j.name).with_context(|| format!("job {}", j.name))?;
            copy_artifacts(dir.path(), &to).with_context(|| format!("job {}", j.name))?;
            line.push_str(&format!(", copied to {}", to.display()));
        }
        writeln!(out, "{line}")?;
    }
    writeln!(
        out,
        "a server with the same projects, pipeline and params gives the same job IDs"
    )?;
    let runs = shown
        .lock()
        .map_or_else(|e| e.into_inner().runs.clone(), |g| g.runs.clone());
    for t in &rec.triggered {
        if !t.error.is_empty() {
            writeln!(
                out,
                "Triggered pipeline {}: did not start: {}",
                t.pipeline, t.error
            )?;
            continue;
        }
        let state = runs
            .iter()
            .find(|r| r.pipeline == t.pipeline && r.run == t.run)
            .map_or_else(
                || "started".into(),
                |r| format!("{:?}", r.state).to_lowercase(),
            );
        writeln!(
            out,
            "Triggered pipeline {}: run {}, {state}",
            t.pipeline, t.run
        )?;
    }
    writeln!(out, "Time: {:.2}s", elapsed.as_secs_f64())?;
    if succeeded {
        writeln!(
            out,
            "Pipeline {name} succeeded: {ready} jobs ready ({cached} cached)"
        )?;
        return Ok(0);
    }
    out.flush()?;
    drop(out);
    let with = |state: JobRunState| -> Vec<&str> {
        rec.jobs
            .iter()
            .filter(|j| j.state == state)
            .map(|j| j.name.as_str())
            .collect()
    };
    let mut why = Vec::new();
    for (what, names) in [
        ("failed jobs", with(JobRunState::Failed)),
        ("skipped", with(JobRunState::Skipped)),
    ] {
        if !names.is_empty() {
            why.push(format!("{what}: {}", names.join(", ")));
        }
    }
    if !rec.error.is_empty() {
        why.push(rec.error.clone());
    }
    eprintln!("mistry exec: Pipeline {name} failed: {}", why.join("; "));
    Ok(1)
}

/// Print a log line as shown, after `prefix` (empty, or `[job] ` in a pipeline).
fn print_line(prefix: &str, line: &str) {
    println!("{prefix}{}", shown(line));
}

/// Follow the log of job `id` of `project` while it is in flight: print each line as it comes
/// (after `prefix`) until the job ends; whether it was in flight (not from the result cache,
/// and not ended yet).
async fn follow_log(jobs: &Arc<dyn Jobs>, project: &str, id: &str, prefix: String) -> bool {
    let Ok(Some(mut lines)) = jobs.follow(project, id).await else {
        return false;
    };
    while let Some(line) = lines.next().await {
        print_line(&prefix, &line);
    }
    true
}

/// Print the complete log of a job that ended before it could be followed (its `out.log` in
/// `ready/`); nothing when it cannot be read.
async fn print_log_file(log: PathBuf, prefix: String) {
    if let Ok(text) = tokio::fs::read_to_string(&log).await {
        for line in text.lines() {
            print_line(&prefix, line);
        }
    }
}

/// Submit the job, stream its log while it runs, and wait for its BuildInfo.
async fn run_job(jobs: &Arc<dyn Jobs>, req: JobRequest) -> Result<(BuildInfo, JobDir)> {
    let project = req.project.clone();
    let submitted = jobs
        .submit(req)
        .await
        .map_err(|e| anyhow!("{project}: {e}"))?;
    let followed = follow_log(jobs, &project, &submitted.id, String::new()).await;
    let answer = submitted
        .wait()
        .await
        .map_err(|e| anyhow!("{project}: {e}"))?;
    if !followed && !answer.info.cached {
        // It ended before it could be followed: its log is complete in ready/.
        print_log_file(answer.dir.out_log(), String::new()).await;
    }
    Ok((answer.info, answer.dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn state_dir_defaults() {
        let s = |g: Option<&str>, x: Option<&str>, h: Option<&str>| {
            state_dir(g.map(Path::new), x.map(OsStr::new), h.map(OsStr::new))
        };
        assert_eq!(
            s(Some("/s"), Some("/x"), Some("/h")).unwrap(),
            PathBuf::from("/s")
        );
        assert_eq!(
            s(None, Some("/x"), Some("/h")).unwrap(),
            PathBuf::from("/x/mistry")
        );
        assert_eq!(
            s(None, Some("rel"), Some("/h")).unwrap(),
            PathBuf::from("/h/.cache/mistry")
        );
        assert_eq!(
            s(None, None, None).unwrap_err().to_string(),
            "no state directory: give --state-dir DIR (or set XDG_CACHE_HOME or HOME)"
        );
    }

    #[test]
    fn progress_lines_and_exit_codes() {
        assert_eq!(shown("Step 2/5 : RUN make"), "==> image step 2/5: RUN make");
        assert_eq!(shown("Step by step : x"), "Step by step : x");
        assert_eq!(shown("out: x"), "out: x");
        let info = |code, err: &str| BuildInfo {
            params: Default::default(),
            group: String::new(),
            path: String::new(),
            cached: false,
            coalesced: false,
            incremental: false,
            exit_code: code,
            err_build: err.into(),
            container_stdouterr: String::new(),
            container_stderr: String::new(),
            transport_method: String::new(),
            started_at: String::new(),
            duration: 0,
            url: String::new(),
            retries: 0,
        };
        assert_eq!(exit_code(&info(0, "")), 0);
        assert_eq!(exit_code(&info(3, "")), 3);
        assert_eq!(exit_code(&info(0, "symlink")), 1);
        assert_eq!(exit_code(&info(NEVER_RAN, "image")), 1);
        assert_eq!(exit_code(&info(300, "")), 1);
    }

    #[test]
    fn projects_from_options() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("web");
        std::fs::create_dir_all(&p).unwrap();
        let args = |project_dir: Option<&Path>| ExecArgs {
            project_dir: project_dir.map(Path::to_path_buf),
            projects: None,
            project: None,
            pipeline: None,
            group: String::new(),
            target: None,
            state_dir: None,
            images: None,
            rebuild: false,
            params: Vec::new(),
        };
        let e = project_of(&args(Some(&p))).unwrap_err().to_string();
        assert!(e.starts_with("no Dockerfile in "), "{e}");
        std::fs::write(p.join("Dockerfile"), "FROM busybox\n").unwrap();
        let got = project_of(&args(Some(&p.join(".")))).unwrap();
        assert_eq!(
            got,
            Project {
                projects_path: dir.path().canonicalize().unwrap(),
                name: "web".into()
            }
        );
        let mut a = args(None);
        a.projects = Some(dir.path().to_path_buf());
        a.project = Some("web".into());
        assert_eq!(project_of(&a).unwrap().name, "web");
        a.project = Some("../x".into());
        assert!(project_of(&a).is_err());
    }
}
