//! The web view's job list, paged and filtered on the server (`GET /api/jobs`): mistry's
//! `/index/` stays as it is (every job, its shape unchanged); this route answers one page of at
//! most [`PER_PAGE`] jobs with the total, the projects and agents for the filters, and each
//! job's state as a person reads it ([`readable_state`]). Only the projects the caller may read
//! are seen: jobs of the others are dropped before anything is counted or named.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::access::require;
use super::{ApiError, JobsState};
use crate::access::{Caller, Scope};
use crate::body::{blocking_body, json as json_answer};
use crate::service::{
    index_entry, ClusterJobsFilter, JobDir, JobView, Jobs, Readable, Stage, CLUSTER_JOBS_MAX,
};
use crate::tree::{is_gone, list_tree, open_artifact_file, open_artifacts};

/// The most jobs on one page.
pub(crate) const PER_PAGE: usize = 100;

/// `?project=P&state=S&q=TEXT&agent=A&page=N&per_page=N` (`page` from 1; `per_page` 1 to
/// [`PER_PAGE`]). Lenient, as a page's URL is typed by people: an unknown state matches no job,
/// a page past the last is empty.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ListQuery {
    project: Option<String>,
    state: Option<String>,
    q: Option<String>,
    agent: Option<String>,
    page: Option<usize>,
    per_page: Option<usize>,
}

/// The state a person reads of a job (an `/index/` entry, or a cluster record's with its
/// `clusterState`), as common.js's `jobState`: `(key, detail)`, key one of `queued`, `running`,
/// `failed` (detail `exit N` or `build error`), `cached`, `success`.
pub(crate) fn readable_state(entry: &Value) -> (&'static str, String) {
    let info = &entry["buildInfo"];
    let state = entry["state"].as_str().unwrap_or("");
    let cluster = entry["clusterState"].as_str();
    if cluster == Some("queued") || state == "queued" {
        return ("queued", String::new());
    }
    if state == "pending" || cluster == Some("running") {
        return ("running", String::new());
    }
    if info["ErrBuild"].as_str().is_some_and(|e| !e.is_empty()) {
        return ("failed", "build error".into());
    }
    match info["ExitCode"].as_i64() {
        Some(code) if code != 0 => return ("failed", format!("exit {code}")),
        _ => {}
    }
    if cluster == Some("failed") {
        return ("failed", String::new());
    }
    if info["Cached"].as_bool() == Some(true) {
        return ("cached", String::new());
    }
    ("success", String::new())
}

/// Whether `entry` (with its `agent`) holds `needle` (lowercase) in its ID, project, group,
/// agent, or a param's name or value.
fn matches_text(entry: &Value, needle: &str) -> bool {
    let has = |v: &Value| {
        v.as_str()
            .is_some_and(|s| s.to_lowercase().contains(needle))
    };
    let info = &entry["buildInfo"];
    has(&entry["id"])
        || has(&entry["project"])
        || has(&info["Group"])
        || has(&entry["agent"])
        || info["Params"].as_object().is_some_and(|ps| {
            ps.iter()
                .any(|(k, v)| k.to_lowercase().contains(needle) || has(v))
        })
}

/// This agent's jobs (newest first) and the cluster's records held only elsewhere, merged by
/// start time, each list keeping its order (as the page's `mergeJobs` did).
fn merge(local: Vec<Value>, records: Vec<Value>) -> Vec<Value> {
    let here: HashSet<(String, String)> = local
        .iter()
        .map(|j| (j["project"].to_string(), j["id"].to_string()))
        .collect();
    let others: Vec<Value> = records
        .into_iter()
        .filter(|r| !here.contains(&(r["project"].to_string(), r["id"].to_string())))
        .collect();
    if others.is_empty() {
        return local;
    }
    let time = |j: &Value| {
        j["buildInfo"]["StartedAt"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map_or(0, |t| t.timestamp_millis())
    };
    let mut out = Vec::with_capacity(local.len() + others.len());
    let (mut a, mut b) = (local.into_iter().peekable(), others.into_iter().peekable());
    loop {
        let take_local = match (a.peek(), b.peek()) {
            (Some(l), Some(r)) => time(l) >= time(r),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        out.extend(if take_local { a.next() } else { b.next() });
    }
    out
}

/// `GET /api/jobs`: one page of the job list, filtered, for the web view.
pub(super) async fn list(
    State(jobs): JobsState,
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let (project, state, agent) = (nonempty(q.project), nonempty(q.state), nonempty(q.agent));
    let text = nonempty(q.q).map(|t| t.to_lowercase());
    if let Some(p) = &project {
        require(&caller, Scope::Read, p)?;
    }
    let per_page = q.per_page.unwrap_or(PER_PAGE).clamp(1, PER_PAGE);
    let page = q.page.unwrap_or(1).max(1);

    // Several agents: the records of jobs held elsewhere, and which agent ran each job. The
    // project and the caller's grant narrow the statement itself, so that its limit counts
    // only what this caller reads (how far back a reader's list goes never tells how many
    // jobs hidden projects ran).
    let grant = caller.clone();
    let everything = ClusterJobsFilter {
        agent: None,
        project: project.clone(),
        states: None,
        limit: CLUSTER_JOBS_MAX,
        readable: Some(Readable(Arc::new(move |p: &str| {
            grant.allows(Scope::Read, p)
        }))),
    };
    let records = jobs.cluster_jobs(&everything).await?;
    let agents = match records {
        Some(_) => Some(jobs.job_agents(None).await?),
        None => None,
    };
    let me = jobs.config().cluster.agent_name.clone();
    let reader = Arc::clone(&jobs);
    let reader_caller = caller.clone();
    let local: Vec<Value> = tokio::task::spawn_blocking(move || {
        reader
            .list()
            .filter(|f| reader_caller.allows(Scope::Read, f.dir.project()))
            .map(|f| index_entry(&f))
            .collect()
    })
    .await?;
    let records: Vec<Value> = records
        .unwrap_or_default()
        .into_iter()
        .filter(|r| {
            r["project"]
                .as_str()
                .is_some_and(|p| caller.allows(Scope::Read, p))
        })
        .collect();
    let all = merge(local, records);

    let mut projects = BTreeSet::new();
    let mut agent_names = BTreeSet::new();
    let mut total = 0usize;
    let first = (page - 1).saturating_mul(per_page);
    let mut shown = Vec::new();
    for mut entry in all {
        let key = format!(
            "{}/{}",
            entry["project"].as_str().unwrap_or(""),
            entry["id"].as_str().unwrap_or("")
        );
        let ran_by = match &agents {
            Some(map) => map
                .get(&key)
                .cloned()
                .or_else(|| entry["agent"].as_str().map(str::to_string))
                .unwrap_or_default(),
            None => me.clone(),
        };
        if !ran_by.is_empty() {
            agent_names.insert(ran_by.clone());
        }
        if let Some(p) = entry["project"].as_str() {
            projects.insert(p.to_string());
        }
        let (shown_state, detail) = readable_state(&entry);
        if let Some(obj) = entry.as_object_mut() {
            obj.insert("agent".into(), json!(ran_by));
            obj.insert(
                "display".into(),
                json!({"key": shown_state, "detail": detail}),
            );
        }
        let wanted = project.as_deref().is_none_or(|p| entry["project"] == p)
            && agent.as_deref().is_none_or(|a| ran_by == a)
            && state.as_deref().is_none_or(|s| s == shown_state)
            && text.as_deref().is_none_or(|t| matches_text(&entry, t));
        if !wanted {
            continue;
        }
        if total >= first && shown.len() < per_page {
            shown.push(entry);
        }
        total += 1;
    }
    let pages = total.div_ceil(per_page).max(1);
    Ok(json_answer(
        StatusCode::OK,
        &json!({
            "jobs": shown,
            "total": total,
            "page": page,
            "pages": pages,
            "perPage": per_page,
            "projects": projects,
            "agents": agent_names,
        }),
    )?)
}

/// The most artifacts a job's page lists.
const MAX_LISTED: usize = 2000;
/// The most bytes of a project's Dockerfile shown on a job's page.
const MAX_DOCKERFILE: u64 = 64 * 1024;

/// The ready build of `project/id` on this agent's disk: its directory; `None` when the job
/// is unknown, not ready, or held only by another agent.
async fn ready_here(
    jobs: &Arc<dyn Jobs>,
    project: &str,
    id: &str,
) -> Result<Option<JobDir>, ApiError> {
    Ok(match jobs.find(project, id).await? {
        Some(JobView::Here(f)) if f.stage == Stage::Ready => Some(f.dir),
        _ => None,
    })
}

/// Project `project`'s Dockerfile as it is now (the image a job ran on was built from it, or
/// from an earlier version), opened by fd below `projects_path` without following a symlink;
/// `None` when there is none to be read.
fn dockerfile(projects: &std::path::Path, project: &str) -> Option<String> {
    use std::io::Read as _;
    let root = rustix::fs::open(
        projects,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    let rel = std::path::Path::new(project).join("Dockerfile");
    let (file, _) = crate::tree::open_artifact_file(&root, &rel).ok()?;
    let mut text = String::new();
    file.take(MAX_DOCKERFILE).read_to_string(&mut text).ok()?;
    Some(text)
}

/// `GET /api/artifacts/{project}/{id}`: what a job's page shows beside mistry's fields: its
/// artifacts (listed by fd, links not followed; only a ready build on this agent's disk), its
/// project's Dockerfile, whether its stderr is here.
pub(super) async fn job_files(
    State(jobs): JobsState,
    Path((project, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let view = jobs.find(&project, &id).await?;
    let Some(view) = view else {
        return Err(ApiError::UnknownJob { project, id });
    };
    let (here, ready) = match &view {
        JobView::Here(f) => (true, f.stage == Stage::Ready),
        JobView::Elsewhere(_) => (false, false),
    };
    let dir = ready_here(&jobs, &project, &id).await?;
    let projects = jobs.config().projects_path.clone();
    let p = project.clone();
    let (files, truncated, dockerfile) = tokio::task::spawn_blocking(move || {
        let listed = dir.map(|d| match open_artifacts(d.path()) {
            Ok(root) => list_tree(&root, MAX_LISTED),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Vec::new(), false)),
            Err(e) => Err(e),
        });
        let (files, truncated) = match listed {
            Some(Ok(l)) => l,
            Some(Err(e)) => {
                tracing::warn!(project = %p, error = %e, "listing artifacts");
                (Vec::new(), false)
            }
            None => (Vec::new(), false),
        };
        (files, truncated, dockerfile(&projects, &p))
    })
    .await?;
    Ok(json_answer(
        StatusCode::OK,
        &json!({
            "here": here,
            "ready": ready,
            "files": files,
            "truncated": truncated,
            "dockerfile": dockerfile,
        }),
    )?)
}

/// `GET /api/artifact/{project}/{id}/{*path}`: one file of a ready job's artifacts, opened by fd
/// below its `data/artifacts` with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: a symlink or
/// `..` anywhere on the way is a 404, never what it points at.
pub(super) async fn artifact_file(
    State(jobs): JobsState,
    Path((project, id, path)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let Some(dir) = ready_here(&jobs, &project, &id).await? else {
        return Err(ApiError::UnknownJob { project, id });
    };
    let rel = std::path::PathBuf::from(&path);
    let opened = tokio::task::spawn_blocking(move || {
        let root = open_artifacts(dir.path())?;
        open_artifact_file(&root, &rel)
    })
    .await?;
    let (file, size) = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || is_gone(&e) => {
            return Err(ApiError::UnknownJob {
                project,
                id: format!("{id}/{path}"),
            })
        }
        // Names the kernel refuses (too long, invalid) are no artifact either.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENAMETOOLONG | libc::EINVAL)) => {
            return Err(ApiError::UnknownJob {
                project,
                id: format!("{id}/{path}"),
            })
        }
        Err(source) => {
            // `?path`: the requested path escaped (a reader must not write lines into the log).
            tracing::warn!(%project, %id, path = ?path, error = %source, "refusing to serve an artifact");
            return Err(ApiError::Artifacts {
                project,
                id,
                source,
            });
        }
    };
    let name = path
        .rsplit('/')
        .next()
        .unwrap_or("artifact")
        .chars()
        .map(|c| {
            if c.is_control() || c == '"' || c == '\\' {
                '_'
            } else {
                c
            }
        })
        .collect::<String>();
    let mut r = blocking_body(
        "application/octet-stream",
        move |w| std::io::copy(&mut std::io::Read::take(file, size), w).map(drop),
        move |e| tracing::warn!(%project, %id, path = ?path, error = %e, "streaming an artifact failed"),
    );
    let headers = r.headers_mut();
    if let Ok(v) = format!("attachment; filename=\"{name}\"").parse() {
        headers.insert("content-disposition", v);
    }
    if let Ok(v) = size.to_string().parse() {
        headers.insert("content-length", v);
    }
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    Ok(r)
}

/// `GET /api/stderr/{project}/{id}`: a job's stderr alone (`stderr.log`; its stdout and stderr
/// together are `/api/logtail`), from this agent's disk, else from its document.
pub(super) async fn stderr(
    State(jobs): JobsState,
    Path((project, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    match jobs.find(&project, &id).await? {
        Some(JobView::Here(f)) => {
            // Streamed, never read whole: a job may leave `limits.log` bytes of stderr, and
            // readers may ask for it many times at once.
            let path = f.dir.stderr_log();
            let opened = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&path)
            })
            .await?;
            let file = match opened {
                Ok(f) => Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(source) => {
                    return Err(ApiError::Artifacts {
                        project,
                        id,
                        source,
                    })
                }
            };
            let mut r = blocking_body(
                "text/plain; charset=utf-8",
                move |w| match file {
                    // What it held when opened (a running job's log grows: /log follows it).
                    Some(f) => {
                        let size = f.metadata()?.len();
                        std::io::copy(&mut std::io::Read::take(f, size), w).map(drop)
                    }
                    None => Ok(()),
                },
                move |e| tracing::warn!(%project, %id, error = %e, "streaming a job's stderr failed"),
            );
            r.headers_mut().insert(
                "x-content-type-options",
                HeaderValue::from_static("nosniff"),
            );
            Ok(r)
        }
        Some(JobView::Elsewhere(_)) => {
            let Some(doc) = jobs.document(&project, &id).await? else {
                return Err(ApiError::UnknownJob { project, id });
            };
            // At most this much of the other agent's document is held (its stdout and stderr
            // with its BuildInfo): beyond it, the page says so instead of holding more.
            const HELD: usize = 16 << 20;
            let mut all = Vec::new();
            let mut doc = doc;
            while let Some(chunk) = futures_util::StreamExt::next(&mut doc).await {
                match chunk {
                    Ok(c) if all.len() + c.len() <= HELD => all.extend_from_slice(&c),
                    Ok(_) => {
                        return Ok((
                            [("content-type", "text/plain; charset=utf-8")],
                            "mistry: this job ran on another agent and its logs are too large \
                             to show here; download its log or its build instead\n",
                        )
                            .into_response())
                    }
                    Err(_) => break,
                }
            }
            let v: Value = serde_json::from_slice(&all).unwrap_or(Value::Null);
            let text = v["buildInfo"]["ContainerStderr"]
                .as_str()
                .unwrap_or("")
                .to_string();
            Ok(([("content-type", "text/plain; charset=utf-8")], text).into_response())
        }
        None => Err(ApiError::UnknownJob { project, id }),
    }
}

#[cfg(test)]
mod tests {
    //! `GET /api/jobs` through the router in process: paging, each filter, the readable states,
    //! and access control (other projects' jobs neither listed, counted nor named; cluster
    //! records filtered the same way).

    use std::collections::BTreeMap;
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use serde_json::{json, Value};
    use tower_service::Service as _;

    use crate::access::hash_token;
    use crate::config::Config;
    use crate::engine::{blank_info, Found, Layout, Stage};
    use crate::jobs::{BuildInfo, JobRequest};
    use crate::service::fake::{FakeHandle, FakeJobs};
    use crate::service::{
        AgentInfo, ByteStream, ClusterJobsFilter, Export, ExportError, Hold, JobError, JobView,
        Jobs, Lines, LogTail, Submitted,
    };

    /// The fake, listing `jobs` (newest first) and, with `records`, the cluster's.
    struct Listed {
        fake: FakeHandle,
        jobs: Vec<(Stage, String, String, BuildInfo)>,
        records: Option<Vec<Value>>,
        /// Each cluster list asked for: its project and what its grant says of `app` and
        /// `hidden-proj`.
        asked: Arc<std::sync::Mutex<Vec<String>>>,
    }

    #[async_trait::async_trait]
    impl Jobs for Listed {
        fn config(&self) -> &Config {
            self.fake.config()
        }
        fn metrics(&self) -> &crate::metrics::Metrics {
            self.fake.metrics()
        }
        async fn submit(&self, req: JobRequest) -> Result<Submitted, JobError> {
            self.fake.submit(req).await
        }
        async fn find(&self, project: &str, id: &str) -> Result<Option<JobView>, JobError> {
            self.fake.find(project, id).await
        }
        async fn document(&self, p: &str, i: &str) -> Result<Option<ByteStream>, JobError> {
            self.fake.document(p, i).await
        }
        async fn follow(&self, p: &str, i: &str) -> Result<Option<Lines>, JobError> {
            self.fake.follow(p, i).await
        }
        async fn log_tail(
            &self,
            p: &str,
            i: &str,
            n: Option<u64>,
        ) -> Result<Option<LogTail>, JobError> {
            self.fake.log_tail(p, i, n).await
        }
        async fn artifacts(&self, p: &str, i: &str) -> Option<Found> {
            self.fake.artifacts(p, i).await
        }
        fn hold(&self, p: &str, i: &str) -> Option<Hold> {
            self.fake.hold(p, i)
        }
        fn list(&self) -> Box<dyn Iterator<Item = Found> + Send + '_> {
            let layout = Layout::new(self.config().build_path.clone());
            Box::new(self.jobs.iter().map(move |(stage, p, i, info)| Found {
                stage: *stage,
                info: info.clone(),
                dir: layout.job(p, i, *stage),
            }))
        }
        async fn cluster_jobs(
            &self,
            f: &ClusterJobsFilter,
        ) -> Result<Option<Vec<Value>>, JobError> {
            let grant = |p: &str| f.readable.as_ref().map(|r| r.allows(p));
            if let Ok(mut a) = self.asked.lock() {
                a.push(format!(
                    "project={:?} app={:?} hidden={:?}",
                    f.project,
                    grant("app"),
                    grant("hidden-proj")
                ));
            }
            // As the statement: the project and the grant before the limit.
            Ok(self.records.clone().map(|rs| {
                rs.into_iter()
                    .filter(|r| {
                        let p = r["project"].as_str().unwrap_or("");
                        f.project.as_deref().is_none_or(|want| want == p) && grant(p) != Some(false)
                    })
                    .collect()
            }))
        }
        async fn job_agents(
            &self,
            _: Option<(String, String)>,
        ) -> Result<BTreeMap<String, String>, JobError> {
            Ok(self
                .jobs
                .iter()
                .map(|(_, p, i, _)| (format!("{p}/{i}"), "here".to_string()))
                .collect())
        }
        async fn agents(&self) -> Result<Vec<AgentInfo>, JobError> {
            self.fake.agents().await
        }
        async fn capacity(&self) -> usize {
            4
        }
        async fn refresh_gauges(&self) {}
        fn export(&self, p: &str, i: &str, c: bool) -> Result<Export, ExportError> {
            self.fake.export(p, i, c)
        }
    }

    fn info(project: &str, id: &str, n: usize, exit: i32) -> BuildInfo {
        let mut params = BTreeMap::new();
        params.insert("n".to_string(), format!("value-{n}"));
        BuildInfo {
            exit_code: exit,
            duration: 1_500_000_000,
            started_at: format!("2026-01-01T00:{:02}:{:02}Z", 59 - n / 60, 59 - n % 60),
            ..blank_info(&params, "g", project, id)
        }
    }

    struct App {
        _dir: tempfile::TempDir,
        router: axum::Router,
        asked: Arc<std::sync::Mutex<Vec<String>>>,
    }

    /// 250 jobs of `app` (every 10th exits 2, the first is running), 3 of `hidden-proj`;
    /// tokens `reader` (read on `app`) and `admin` (everything).
    fn app(records: Option<Vec<Value>>) -> App {
        let dir = tempfile::tempdir().unwrap();
        let (projects, build) = (dir.path().join("projects"), dir.path().join("build"));
        std::fs::create_dir_all(&projects).unwrap();
        std::fs::create_dir_all(&build).unwrap();
        let token = |name: &str, scope: &str, project: &str| {
            json!({"name": name, "hash": hex::encode(hash_token(&format!("tok-{name}"))),
                   "scopes": [scope], "projects": [project]})
        };
        let text = json!({"projects_path": projects, "build_path": build, "tokens": [
            token("reader", "read", "app"), token("admin", "admin", "*")]});
        let cfg = Config::parse(&text.to_string(), &dir.path().join("config.json")).unwrap();
        let mut jobs = Vec::new();
        for n in 0..253 {
            let (project, exit) = if n % 84 == 83 {
                ("hidden-proj", 0)
            } else {
                ("app", if n % 10 == 9 { 2 } else { 0 })
            };
            let id = format!("{n:04}{}", "a".repeat(60));
            let stage = if n == 0 { Stage::Pending } else { Stage::Ready };
            let mut i = info(project, &id, n, exit);
            if n == 0 {
                i.exit_code = crate::jobs::NEVER_RAN;
                i.duration = crate::jobs::UNKNOWN_DURATION;
            }
            jobs.push((stage, project.to_string(), id, i));
        }
        let fake = FakeHandle(FakeJobs::new(cfg, &["app", "hidden-proj"], true));
        let asked = Arc::default();
        let listed = Listed {
            fake,
            jobs,
            records,
            asked: Arc::clone(&asked),
        };
        App {
            _dir: dir,
            router: super::super::router(Arc::new(listed)),
            asked,
        }
    }

    impl App {
        async fn get(&self, uri: &str, token: &str) -> (StatusCode, Value) {
            let req = Request::builder()
                .uri(uri)
                .header("authorization", format!("Bearer tok-{token}"))
                .body(Body::empty())
                .unwrap();
            let resp = match self.router.clone().call(req).await {
                Ok(r) => r,
                Err(e) => match e {},
            };
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 24)
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&body).into_owned();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        }
    }

    fn ids(v: &Value) -> Vec<String> {
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap()[..4].to_string())
            .collect()
    }

    #[tokio::test]
    async fn pages_of_at_most_100_with_the_total_and_filters() {
        let a = app(None);
        let (status, v) = a.get("/api/jobs", "admin").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (&v["total"], &v["page"], &v["pages"], &v["perPage"]),
            (&json!(253), &json!(1), &json!(3), &json!(100))
        );
        assert_eq!(v["jobs"].as_array().unwrap().len(), 100);
        assert_eq!(v["projects"], json!(["app", "hidden-proj"]));
        let first = &v["jobs"][0];
        assert_eq!(first["display"], json!({"key": "running", "detail": ""}));
        assert_eq!(first["state"], "pending", "mistry's state is kept");
        assert_eq!(
            v["jobs"][9]["display"],
            json!({"key": "failed", "detail": "exit 2"})
        );
        assert_eq!(v["jobs"][9]["state"], "ready");
        assert_eq!(
            v["jobs"][1]["display"],
            json!({"key": "success", "detail": ""})
        );
        let (_, v) = a.get("/api/jobs?page=3", "admin").await;
        assert_eq!(v["jobs"].as_array().unwrap().len(), 53);
        assert_eq!(ids(&v)[0], "0200");
        let (_, v) = a.get("/api/jobs?page=9", "admin").await;
        assert_eq!(
            (v["jobs"].as_array().unwrap().len(), &v["total"]),
            (0, &json!(253))
        );
        // Each filter, on the server.
        let (_, v) = a.get("/api/jobs?state=failed&project=app", "admin").await;
        assert_eq!(v["total"], 25);
        assert_eq!(ids(&v)[..3], ["0009", "0019", "0029"]);
        let (_, v) = a.get("/api/jobs?state=running", "admin").await;
        assert_eq!(ids(&v), ["0000"]);
        let (_, v) = a.get("/api/jobs?q=VALUE-12", "admin").await;
        assert_eq!(
            ids(&v),
            [
                "0012", "0120", "0121", "0122", "0123", "0124", "0125", "0126", "0127", "0128",
                "0129"
            ]
        );
        let (_, v) = a.get("/api/jobs?q=0042a", "admin").await;
        assert_eq!(ids(&v), ["0042"]);
        let (_, v) = a.get("/api/jobs?agent=nobody", "admin").await;
        assert_eq!(v["total"], 0);
        let (_, v) = a
            .get("/api/jobs?per_page=1000&state=nonsense", "admin")
            .await;
        assert_eq!((&v["total"], &v["perPage"]), (&json!(0), &json!(100)));
    }

    #[tokio::test]
    async fn other_projects_are_neither_listed_counted_nor_named() {
        let record = |project: &str, id: &str| {
            json!({"id": id, "project": project, "startedAt": "", "state": "ready",
                   "agent": "far", "clusterState": "ready", "retries": 0,
                   "buildInfo": info(project, id, 300, 0)})
        };
        let a = app(Some(vec![
            record("hidden-proj", "remote-hidden"),
            record("app", "remote-app"),
        ]));
        let (status, v) = a.get("/api/jobs?per_page=100", "reader").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["total"], 251, "250 of app and its record elsewhere");
        assert_eq!(v["projects"], json!(["app"]));
        let text = v.to_string();
        assert!(!text.contains("hidden"), "{text}");
        let (_, v) = a.get("/api/jobs?q=remote", "reader").await;
        assert_eq!(v["jobs"][0]["id"], "remote-app");
        assert_eq!(v["jobs"][0]["agent"], "far");
        assert_eq!(v["agents"], json!(["far", "here"]));
        assert_eq!(v["total"], 1);
        let (status, _) = a.get("/api/jobs?project=hidden-proj", "reader").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (_, v) = a.get("/api/jobs?q=remote", "admin").await;
        assert_eq!(v["total"], 2);
        // The cluster's statement itself is narrowed to the project and the caller's grant, so
        // that its limit counts only what the caller reads (review: how far back a reader's
        // list went told how many jobs hidden projects ran).
        a.asked.lock().unwrap().clear();
        a.get("/api/jobs?project=app", "reader").await;
        a.get("/api/jobs", "reader").await;
        assert_eq!(
            *a.asked.lock().unwrap(),
            [
                r#"project=Some("app") app=Some(true) hidden=Some(false)"#,
                r#"project=None app=Some(true) hidden=Some(false)"#
            ]
        );
    }

    #[tokio::test]
    async fn a_jobs_page_routes_need_read_on_its_project() {
        let a = app(None);
        for route in [
            "api/artifacts/hidden-proj/x",
            "api/artifact/hidden-proj/x/some/file",
            "api/stderr/hidden-proj/x",
        ] {
            let (status, body) = a.get(&format!("/{route}"), "reader").await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{route}");
            assert!(!body.to_string().contains("aaaa"), "{route}: {body}");
            let (status, _) = a.get(&format!("/{route}"), "admin").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{route}");
        }
        for route in [
            "api/artifacts/app/x",
            "api/artifact/app/x/f",
            "api/stderr/app/x",
        ] {
            let (status, _) = a.get(&format!("/{route}"), "reader").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{route}");
        }
    }
}
