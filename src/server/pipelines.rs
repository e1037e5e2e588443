//! The pipelines' HTTP API (thin handlers over [`Runs`]):
//!
//! - `GET /pipelines`: the definitions (`[{"name", "params", "jobs"}]`, by name);
//! - `POST /pipelines` `{"pipeline": NAME, "params": {...}}`: run one, 201 with the run record
//!   at its end (`?async`: at once, state `running`);
//!   (`"rebuild": true`: "Retrigger run", a new run whose jobs ignore the result cache, see
//!   [`Runs::start_rebuild`]);
//! - `GET /pipelines/index/`: the stored runs, newest first;
//! - `GET /pipelines/jobs/`: which run each job belongs to (`{"<project>/<id>": {"pipeline",
//!   "run", "url"}}`, for the job list of the web view);
//! - `GET /pipeline/{name}/{run}`: the run record (JSON with `Accept` or `Content-Type:
//!   application/json`, else the web view's run page: the DAG drawn by `app.js`, over a plain
//!   server-rendered summary for browsers without scripts);
//! - `GET /pipeline/{name}/{run}/events`: server-sent events, one run record per change, until
//!   the run ends.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use futures_util::stream;
use serde::Deserialize;

use super::access::require;
use super::ApiError;
use crate::access::{Caller, Scope};
use crate::body::{esc, json, INDEX_HTML};
use crate::pipeline::def::{self, ParamDef};
use crate::pipeline::run::{self, JobRunState, RunLink, RunRecord, RunState, Runs};
use crate::pipeline::PipelineError;
use crate::service::{JobError, Jobs};

mod pages;
pub(super) use pages::titled;

/// The pipelines' routes, with their own state, to merge into the server's router; the runs'
/// jobs go to `jobs`. Validates every definition and fails the runs a previous daemon left
/// running (off the runtime).
pub(super) fn routes<S: Clone + Send + Sync + 'static>(jobs: Arc<dyn Jobs>) -> Router<S> {
    let projects_path = jobs.config().projects_path.clone();
    let runs = Runs::new(jobs, projects_path, None);
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let r = Arc::clone(&runs);
        rt.spawn_blocking(move || check_at_start(&r));
    }
    Router::new()
        .route("/pipelines", any(pipelines))
        .route("/pipelines/index/", get(index))
        .route("/pipelines/jobs/", get(job_runs))
        .route("/pipeline/{name}/{run}", get(run_page))
        .route("/pipeline/{name}/{run}/events", get(events))
        // The web view's pipelines pages and their JSON (pages.rs).
        .merge(pages::routes())
        .layer(axum::middleware::from_fn(pages::browser_page))
        .with_state(runs)
}

fn check_at_start(runs: &Runs) {
    runs.load_job_runs();
    run::fail_interrupted(&runs.jobs().config().build_path, |p, r| {
        runs.watch(p, r).is_some()
    });
    for name in def::names(runs.projects_path()) {
        match runs.load(&name) {
            Ok(p) => tracing::info!(pipeline = %name, jobs = p.jobs.len(), "pipeline loaded"),
            Err(e) => tracing::warn!(pipeline = %name, error = %e, "invalid pipeline"),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct RunQuery {
    #[serde(rename = "async")]
    is_async: Option<String>,
}

/// A `POST /pipelines` body: the pipeline, its params, and `rebuild`; field names
/// case-insensitive, as for jobs.
fn parse_request(body: &[u8]) -> Result<(String, BTreeMap<String, String>, bool), PipelineError> {
    let bad = |m: String| {
        PipelineError::BadRequest(format!(
            "Error unmarshalling body '{}' to Pipeline: {m}",
            String::from_utf8_lossy(body)
        ))
    };
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| bad("not an object".into()))?;
    let (mut name, mut params, mut rebuild) = (None, BTreeMap::new(), false);
    for (k, v) in obj {
        match k.to_ascii_lowercase().as_str() {
            "pipeline" => {
                name = Some(
                    v.as_str()
                        .ok_or_else(|| bad("pipeline must be a string".into()))?
                        .to_string(),
                );
            }
            "params" if v.is_null() => {}
            "params" => {
                let m = v
                    .as_object()
                    .ok_or_else(|| bad("params must be an object of strings".into()))?;
                for (pk, pv) in m {
                    let pv = pv
                        .as_str()
                        .ok_or_else(|| bad("params must be an object of strings".into()))?;
                    params.insert(pk.clone(), pv.to_string());
                }
            }
            "rebuild" if v.is_null() => {}
            "rebuild" => {
                rebuild = v
                    .as_bool()
                    .ok_or_else(|| bad("rebuild must be a boolean".into()))?;
            }
            _ => {}
        }
    }
    match name {
        Some(n) if !n.is_empty() => Ok((n, params, rebuild)),
        _ => Err(PipelineError::BadRequest("no pipeline given".into())),
    }
}

/// A definition as `GET /pipelines` lists it.
#[derive(serde::Serialize)]
struct Listed {
    name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    description: String,
    params: BTreeMap<String, ParamDef>,
    jobs: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
}

/// Whether `caller` may see a run: read on every project of its jobs (a run without jobs: an
/// admin only).
fn sees_run(caller: &Caller, rec: &RunRecord) -> bool {
    if rec.jobs.is_empty() {
        return caller.is_admin();
    }
    rec.jobs
        .iter()
        .all(|j| caller.allows(Scope::Read, &j.project))
}

/// The projects of pipeline `name` and of those its successes trigger, transitively (blocking).
/// A pipeline `caller` may not read every job's project of, or one in error when `caller` is not
/// an admin, is unknown: the answer is the one of a pipeline that does not exist (its 404 and
/// text), so that neither its projects nor its errors show.
fn projects_of(
    runs: &Runs,
    caller: &Caller,
    name: &str,
) -> Result<std::collections::BTreeSet<String>, ApiError> {
    let mut projects = std::collections::BTreeSet::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec![name.to_string()];
    let hidden = |why: &str| {
        tracing::warn!(target: "audit", status = 404, caller = caller.name(), pipeline = %name, reason = why, "refused: a pipeline the caller may not read");
        ApiError::Pipeline(PipelineError::Unknown(name.to_string()))
    };
    while let Some(n) = todo.pop() {
        if !seen.insert(n.clone()) {
            continue;
        }
        let p = match runs.load(&n) {
            Ok(p) => p,
            Err(PipelineError::Unknown(u)) if n == name => {
                return Err(PipelineError::Unknown(u).into())
            }
            Err(e) if n == name => {
                return Err(if caller.is_admin() {
                    e.into()
                } else {
                    hidden("its definition is in error")
                })
            }
            // A triggered pipeline that does not load starts nothing (its run records the
            // error when it is triggered).
            Err(_) => continue,
        };
        if n == name && !reads_jobs(caller, &p) {
            return Err(hidden("a project of its jobs"));
        }
        projects.extend(p.jobs.into_iter().map(|j| j.project));
        todo.extend(p.on_success.into_iter().map(|t| t.pipeline));
    }
    Ok(projects)
}

/// Whether `caller` reads every project of `p`'s jobs.
fn reads_jobs(caller: &Caller, p: &def::Pipeline) -> bool {
    p.jobs
        .iter()
        .all(|j| caller.allows(Scope::Read, &j.project))
}

/// Which runs `caller` may see, asked once per run (`find`: in flight, else stored).
struct Visible<'a> {
    runs: &'a Arc<Runs>,
    caller: &'a Caller,
    known: std::collections::HashMap<(String, String), bool>,
}

impl<'a> Visible<'a> {
    fn new(runs: &'a Arc<Runs>, caller: &'a Caller) -> Visible<'a> {
        Visible {
            runs,
            caller,
            known: std::collections::HashMap::new(),
        }
    }

    /// Whether the caller sees everything (access control off, an agent): nothing to ask.
    fn all(&self) -> bool {
        !matches!(self.caller, Caller::Granted(_))
    }

    /// Whether the caller sees the run `link` points to (a trigger that did not start: whether
    /// it reads every project of that pipeline's definition).
    async fn link(&mut self, link: &RunLink) -> bool {
        if self.all() {
            return true;
        }
        let key = (link.pipeline.clone(), link.run.clone());
        if let Some(v) = self.known.get(&key) {
            return *v;
        }
        let v = if link.run.is_empty() {
            let (r, n, c) = (
                Arc::clone(self.runs),
                link.pipeline.clone(),
                self.caller.clone(),
            );
            tokio::task::spawn_blocking(move || r.load(&n).is_ok_and(|p| reads_jobs(&c, &p)))
                .await
                .unwrap_or(false)
        } else {
            match self.runs.find(&link.pipeline, &link.run).await {
                Some(rec) => sees_run(self.caller, &rec),
                None => false,
            }
        };
        self.known.insert(key, v);
        v
    }

    /// `rec` without the links to runs the caller may not see (`caused_by`, `triggered`).
    async fn redact(&mut self, mut rec: RunRecord) -> RunRecord {
        if self.all() {
            return rec;
        }
        if let Some(c) = rec.caused_by.take() {
            if self.link(&c).await {
                rec.caused_by = Some(c);
            }
        }
        let mut kept = Vec::with_capacity(rec.triggered.len());
        for t in std::mem::take(&mut rec.triggered) {
            if self.link(&t).await {
                kept.push(t);
            }
        }
        rec.triggered = kept;
        rec
    }
}

async fn pipelines(
    State(runs): State<Arc<Runs>>,
    caller: Caller,
    method: Method,
    query: Result<Query<RunQuery>, QueryRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if method == Method::GET || method == Method::HEAD {
        let r = Arc::clone(&runs);
        let listed = tokio::task::spawn_blocking(move || {
            def::names(r.projects_path())
                .into_iter()
                .filter_map(|name| match r.load(&name) {
                    // Only the pipelines whose every project the caller may read; definitions
                    // in error only to admins (the error may name anything).
                    Ok(p)
                        if !p
                            .jobs
                            .iter()
                            .all(|j| caller.allows(Scope::Read, &j.project)) =>
                    {
                        None
                    }
                    Err(_) if !caller.is_admin() => None,
                    Ok(p) => Some(Listed {
                        name,
                        description: p.description,
                        params: p.params,
                        jobs: p.jobs.into_iter().map(|j| j.name).collect(),
                        error: String::new(),
                    }),
                    Err(e) => Some(Listed {
                        name,
                        description: String::new(),
                        params: BTreeMap::new(),
                        jobs: Vec::new(),
                        error: e.to_string(),
                    }),
                })
                .collect::<Vec<_>>()
        })
        .await?;
        return Ok(json(StatusCode::OK, &listed)?);
    }
    if method != Method::POST {
        return Err(ApiError::Method {
            expected: "GET or POST",
            got: method,
        });
    }
    let (name, params, rebuild) = parse_request(&body)?;
    // Read on every project of the pipeline (else it does not exist for the caller), then
    // build on every project the run may start (its triggered runs' included; one the caller
    // may not read is not named).
    let (r, n, c) = (Arc::clone(&runs), name.clone(), caller.clone());
    let projects = tokio::task::spawn_blocking(move || projects_of(&r, &c, &n)).await??;
    for p in &projects {
        if caller.allows(Scope::Read, p) {
            require(&caller, Scope::Build, p)?;
        } else {
            tracing::warn!(target: "audit", status = 403, caller = caller.name(), scope = "build", project = %p, pipeline = %name, "refused: no grant on a project the pipeline triggers");
            return Err(ApiError::Forbidden {
                scope: Scope::Build,
                project: None,
            });
        }
    }
    let is_async = query.is_ok_and(|Query(q)| q.is_async.is_some());
    let (rx, _) = if rebuild {
        runs.start_rebuild(&name, params).await?
    } else {
        runs.start(&name, params, None).await?
    };
    let mut visible = Visible::new(&runs, &caller);
    if is_async {
        let rec = RunRecord::clone(&rx.borrow());
        return Ok(json(StatusCode::CREATED, &visible.redact(rec).await)?);
    }
    let rec = visible.redact(run::wait_end(rx).await?).await;
    // The backlog was full: as for a job, 503 (the record says which jobs).
    if rec.state == RunState::Failed
        && rec
            .jobs
            .iter()
            .any(|j| j.err_build == JobError::Overloaded.to_string())
    {
        return Err(ApiError::RunOverloaded {
            pipeline: rec.pipeline,
            run: rec.run,
        });
    }
    Ok(json(StatusCode::CREATED, &rec)?)
}

async fn index(State(runs): State<Arc<Runs>>, caller: Caller) -> Result<Response, ApiError> {
    let build_path = runs.jobs().config().build_path.clone();
    let mut recs = tokio::task::spawn_blocking(move || run::list_records(&build_path)).await?;
    // Runs in flight as they are now.
    for r in &mut recs {
        if let Some(rx) = runs.watch(&r.pipeline, &r.run) {
            *r = RunRecord::clone(&rx.borrow());
        }
    }
    recs.retain(|r| sees_run(&caller, r));
    let mut visible = Visible::new(&runs, &caller);
    let mut out = Vec::with_capacity(recs.len());
    for r in recs {
        out.push(visible.redact(r).await);
    }
    Ok(json(StatusCode::OK, &out)?)
}

/// `{"<project>/<id>": {"pipeline", "run", "url"}}`: the run each job belongs to (the jobs the
/// caller reads, in runs it sees).
async fn job_runs(State(runs): State<Arc<Runs>>, caller: Caller) -> Result<Response, ApiError> {
    let mut visible = Visible::new(&runs, &caller);
    let mut map = serde_json::Map::new();
    for ((project, id), link) in runs.job_runs() {
        if caller.allows(Scope::Read, &project) && visible.link(&link).await {
            map.insert(
                format!("{project}/{id}"),
                serde_json::to_value(link).unwrap_or_default(),
            );
        }
    }
    Ok(json(StatusCode::OK, &map)?)
}

fn wants_json(headers: &HeaderMap) -> bool {
    ["accept", "content-type"].iter().any(|h| {
        headers
            .get(*h)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/json"))
    })
}

fn unknown_run(name: String, run: String) -> ApiError {
    ApiError::UnknownRun { name, run }
}

/// 404, as for a run that does not exist (and an audit line), unless `caller` sees `rec`: a run
/// of projects the caller may not read must not show that it exists, nor name them.
fn require_run(caller: &Caller, rec: &RunRecord) -> Result<(), ApiError> {
    if sees_run(caller, rec) {
        return Ok(());
    }
    tracing::warn!(target: "audit", status = 404, caller = caller.name(), pipeline = %rec.pipeline, run = %rec.run, "refused: a pipeline run the caller may not read");
    Err(unknown_run(rec.pipeline.clone(), rec.run.clone()))
}

async fn run_page(
    State(runs): State<Arc<Runs>>,
    caller: Caller,
    Path((name, run)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let found = runs.find(&name, &run).await;
    if let Some(rec) = &found {
        require_run(&caller, rec)?;
    }
    let Some(rec) = found else {
        return Err(unknown_run(name, run));
    };
    let rec = Visible::new(&runs, &caller).redact(rec).await;
    if wants_json(&headers) {
        Ok(json(StatusCode::OK, &rec)?)
    } else {
        Ok(Html(page(&rec)).into_response())
    }
}

async fn events(
    State(runs): State<Arc<Runs>>,
    caller: Caller,
    Path((name, run)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let event = |rec: &RunRecord| {
        Ok::<_, Infallible>(
            Event::default().data(serde_json::to_string(rec).unwrap_or_else(|_| "{}".into())),
        )
    };
    if let Some(rx) = runs.watch(&name, &run) {
        let now = RunRecord::clone(&rx.borrow());
        require_run(&caller, &now)?;
        // The record now, then each change, until the run ends (each without the links to runs
        // the caller may not see).
        let s = stream::unfold((rx, false, true), move |(mut rx, done, first)| {
            let (runs, caller) = (Arc::clone(&runs), caller.clone());
            async move {
                if done {
                    return None;
                }
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                let rec = RunRecord::clone(&rx.borrow_and_update());
                let done = rec.state != RunState::Running;
                let rec = Visible::new(&runs, &caller).redact(rec).await;
                Some((event(&rec), (rx, done, false)))
            }
        });
        return Ok(Sse::new(s).into_response());
    }
    match runs.find(&name, &run).await {
        Some(rec) => {
            require_run(&caller, &rec)?;
            let rec = Visible::new(&runs, &caller).redact(rec).await;
            Ok(Sse::new(stream::iter([event(&rec)])).into_response())
        }
        None => Err(unknown_run(name, run)),
    }
}

/// The run's page: the web view, whose script draws the DAG and follows the run live, over a
/// plain summary rendered here (for browsers without scripts; everything from the record
/// escaped).
fn page(rec: &RunRecord) -> String {
    let title = format!(
        "<title>{} {} · mistry</title>",
        esc(&rec.pipeline),
        esc(&rec.run[..rec.run.len().min(12)])
    );
    // The page's placeholder, whatever attributes its <main> has.
    INDEX_HTML
        .replacen("<title>mistry</title>", &title, 1)
        .replacen("<p class=\"muted\">Loading…</p>", &summary(rec), 1)
}

/// A plain summary of a run: its state, params, jobs and links.
fn summary(rec: &RunRecord) -> String {
    let state = |s: &str| format!("<span class=\"state-{s}\">{s}</span>");
    let run_state = match rec.state {
        RunState::Running => "running",
        RunState::Succeeded => "succeeded",
        RunState::Failed => "failed",
    };
    let mut h = String::new();
    h.push_str(&format!(
        "<h1>Pipeline {} <small>{}</small></h1><p>{} · started {}</p>",
        esc(&rec.pipeline),
        esc(&rec.run),
        state(run_state),
        esc(&rec.started_at)
    ));
    if !rec.params.is_empty() {
        h.push_str("<p>Params: ");
        for (k, v) in &rec.params {
            h.push_str(&format!("<code>{}={}</code> ", esc(k), esc(v)));
        }
        h.push_str("</p>");
    }
    if let Some(c) = &rec.caused_by {
        h.push_str(&format!(
            "<p>Caused by <a href=\"/{}\">{} {}</a></p>",
            esc(&c.url),
            esc(&c.pipeline),
            esc(&c.run)
        ));
    }
    h.push_str("<table><tr><th>Job</th><th>Project</th><th>Needs</th><th>State</th><th>Exit code</th><th>Links</th></tr>");
    for j in &rec.jobs {
        let links = if j.id.is_empty() {
            String::new()
        } else {
            format!(
                "<a href=\"/{}\">job</a> <a href=\"/api/logtail/{}/{}\">log</a>",
                esc(&j.url),
                esc(&j.project),
                esc(&j.id)
            )
        };
        let code = if matches!(j.state, JobRunState::Ready | JobRunState::Failed) {
            j.exit_code.to_string()
        } else {
            String::new()
        };
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}{}</td><td>{}</td><td>{}</td></tr>",
            esc(&j.name),
            esc(&j.project),
            esc(&j.needs.join(", ")),
            state(j.state.as_str()),
            if j.err_build.is_empty() {
                String::new()
            } else {
                format!(" {}", esc(&j.err_build))
            },
            code,
            links
        ));
    }
    h.push_str("</table>");
    if !rec.triggered.is_empty() {
        h.push_str("<p>Triggered: ");
        for t in &rec.triggered {
            if t.error.is_empty() {
                h.push_str(&format!(
                    "<a href=\"/{}\">{} {}</a> ",
                    esc(&t.url),
                    esc(&t.pipeline),
                    esc(&t.run)
                ));
            } else {
                h.push_str(&format!("{}: {} ", esc(&t.pipeline), esc(&t.error)));
            }
        }
        h.push_str("</p>");
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        let (n, p, r) = parse_request(br#"{"Pipeline": "a", "PARAMS": {"x": "1"}}"#).unwrap();
        assert_eq!(n, "a");
        assert_eq!(p.get("x").map(String::as_str), Some("1"));
        assert!(!r);
        let (_, _, r) = parse_request(br#"{"pipeline": "a", "Rebuild": true}"#).unwrap();
        assert!(r);
        assert!(parse_request(br#"{"pipeline": "a", "rebuild": "yes"}"#).is_err());
        assert_eq!(
            parse_request(br#"{"params": {}}"#).unwrap_err().to_string(),
            "no pipeline given"
        );
        assert!(parse_request(br#"{"pipeline": "a", "params": {"x": 1}}"#).is_err());
        assert!(parse_request(b"{nope").is_err());
    }

    #[test]
    fn the_page_is_the_web_view_with_an_escaped_summary() {
        let rec = RunRecord {
            pipeline: "p".into(),
            run: "a".repeat(64),
            params: [("x".to_string(), "<img src=x onerror=alert(1)>".to_string())].into(),
            state: RunState::Running,
            started_at: String::new(),
            duration: -1,
            url: format!("pipeline/p/{}", "a".repeat(64)),
            jobs: Vec::new(),
            failed: Vec::new(),
            triggered: Vec::new(),
            caused_by: None,
            error: String::new(),
            rebuild: 0,
            rebuild_of: None,
        };
        let h = page(&rec);
        assert!(
            h.contains("<script src=\"/static/app.js\"></script>"),
            "{h}"
        );
        assert!(
            h.contains("<main id=\"app\" tabindex=\"-1\"><h1>Pipeline p <small>"),
            "{h}"
        );
        assert!(!h.contains("Loading…"), "{h}");
        assert!(h.contains("<title>p aaaaaaaaaaaa · mistry</title>"), "{h}");
        assert!(h.contains("x=&lt;img src=x onerror=alert(1)&gt;"), "{h}");
        assert!(!h.contains("<img"), "{h}");
        assert!(!h.contains("http-equiv=\"refresh\""), "{h}");
    }

    #[test]
    fn rebuild_ids() {
        let a = run::rebuild_run_id(&"b".repeat(64), 1);
        assert!(run::is_run_id(&a));
        assert_ne!(a, run::rebuild_run_id(&"b".repeat(64), 2));
    }

    #[test]
    fn pages_escape() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }
}
