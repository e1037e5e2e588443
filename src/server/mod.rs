//! The HTTP API of mistryd, as mistry's: `POST /jobs`, `GET /index/`, `GET /job/{project}/{id}`,
//! `GET /log/{project}/{id}` (server-sent events), `GET /artifacts/{project}/{id}`,
//! `GET /metrics`, `GET /agents` (the cluster's agents; [`agents`] holds those routes), the
//! pipelines' routes ([`pipelines`]) and the web view at `/`. Handlers are thin: they ask the
//! jobs interface ([`Jobs`], whichever back end runs the jobs: this agent's engine, or the
//! cluster's records) and render its answers; nothing here reads the disk on the runtime's
//! threads. Every error becomes its answer in one place, [`ApiError`] ([`error`]).
//!
//! Clients are not trusted: [`serve`] ([`listen`]) gives each connection
//! [`Limits::header_timeout`] to send its request headers (also the idle timeout between
//! kept-alive requests), [`Limits::body_timeout`] to send a request's body (408), and
//! [`Limits::send_timeout`] to accept an answer's bytes, and caps the connections served at
//! once (evicting idle ones and slow senders of bodies at the cap); state-changing requests from
//! another origin's page are refused (403); `/index/` is streamed and `/log` follows the job's
//! state in memory; artifacts are read by fd below the job's `data/artifacts`, never through a
//! symlink ([`artifacts`]).

mod access;
mod agents;
mod error;
mod listen;
mod pipelines;
mod projects;
mod web_jobs;

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
use futures_util::StreamExt;
use serde::Deserialize;

use crate::access::{Caller, Scope};
use crate::body::{blocking_body, stream_body};
use crate::tree::{open_artifacts, write_tree};
pub(crate) use error::ApiError;
pub use listen::{
    serve, Limits, DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_SEND_TIMEOUT,
};

use crate::jobs::{BuildInfo, JobRequest};
use crate::service::{index_entry, JobDir, Jobs, Stage};

// The web view, embedded: nothing is fetched from elsewhere.
use crate::body::{json, INDEX_HTML};
/// The web view's files under `/static/`: name, content type, contents.
const STATIC_FILES: &[(&str, &str, &str)] = &[
    ("common.js", JS, include_str!("../web/common.js")),
    ("jobs.js", JS, include_str!("../web/jobs.js")),
    ("pipelines.js", JS, include_str!("../web/pipelines.js")),
    ("projects.js", JS, include_str!("../web/projects.js")),
    ("app.js", JS, include_str!("../web/app.js")),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../web/style.css"),
    ),
];
const JS: &str = "text/javascript; charset=utf-8";

/// The server's state: the jobs, whichever back end runs them.
type JobsState = State<Arc<dyn Jobs>>;

/// The API and the web view over `jobs` (the pipelines' routes included).
///
/// Access control ([`crate::access`], the configuration's `tokens` and `allow`) wraps every
/// route: [`access::authenticate`] around the whole router (401), the routes of one project
/// behind [`access::read_project`] (403), the others checking the project of their request or
/// filtering their lists.
pub fn router(jobs: Arc<dyn Jobs>) -> Router {
    let policy = Arc::clone(&jobs.config().access);
    let of_a_project = Router::new()
        .route("/job/{project}/{id}", get(job))
        .route("/log/{project}/{id}", get(log))
        .route("/artifacts/{project}/{id}", get(artifacts))
        .route("/api/job/{project}/{id}", get(api_job))
        .route("/api/logtail/{project}/{id}", get(api_logtail))
        // The web view's job page (issue 23): artifacts listed and one by one, stderr alone.
        .route("/api/artifacts/{project}/{id}", get(web_jobs::job_files))
        .route(
            "/api/artifact/{project}/{id}/{*path}",
            get(web_jobs::artifact_file),
        )
        .route("/api/stderr/{project}/{id}", get(web_jobs::stderr))
        .route_layer(axum::middleware::from_fn(access::read_project));
    Router::new()
        .route("/jobs", any(submit))
        .route("/index/", get(index))
        // The web view's paged job list (issue 23).
        .route("/api/jobs", get(web_jobs::list))
        .merge(of_a_project)
        .route("/static/{file}", get(static_file))
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .merge(agents::routes())
        .merge(access::routes())
        .merge(pipelines::routes(Arc::clone(&jobs)))
        .merge(projects::routes())
        .layer(axum::middleware::from_fn(same_origin))
        .layer(axum::middleware::from_fn_with_state(
            policy,
            access::authenticate,
        ))
        .with_state(jobs)
}

/// One of the web view's embedded files ([`STATIC_FILES`]); 404 for any other name.
async fn static_file(Path(file): Path<String>) -> Response {
    match STATIC_FILES.iter().find(|(name, _, _)| *name == file) {
        Some((_, kind, body)) => ([("content-type", *kind)], *body).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Refuse a state-changing request (any method but GET, HEAD and OPTIONS) whose `Origin` is
/// present and not this server's own (`http://HOST` or `https://HOST`, `HOST` from the `Host`
/// header): a page of another site must not schedule jobs. mistry's client and curl send no
/// `Origin`; the web view is same-origin.
async fn same_origin(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let Some(origin) = req.headers().get(axum::http::header::ORIGIN) else {
        return next.run(req).await;
    };
    let host = req
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let origin = String::from_utf8_lossy(origin.as_bytes()).into_owned();
    let own = !host.is_empty()
        && ["http://", "https://"]
            .iter()
            .any(|scheme| origin.eq_ignore_ascii_case(&format!("{scheme}{host}")));
    if own {
        return next.run(req).await;
    }
    tracing::warn!(target: "audit", status = 403, %origin, %host, method = %req.method(), path = %req.uri().path(), "refused a cross-origin request");
    ApiError::CrossOrigin {
        origin,
        host: host.to_string(),
    }
    .into_response()
}

fn unknown_job(project: String, id: String) -> ApiError {
    ApiError::UnknownJob { project, id }
}

/// A BuildInfo with its logs streamed from the job directory.
fn streamed(status: StatusCode, info: BuildInfo, dir: JobDir) -> Response {
    let bytes =
        crate::stream_json::stream_with(String::new(), info, dir.out_log(), dir.stderr_log(), "");
    let mut r = stream_body("application/json", bytes);
    *r.status_mut() = status;
    r
}

/// `POST /jobs?async`: answer as soon as the job is queued.
#[derive(Debug, Default, Deserialize)]
struct JobsQuery {
    #[serde(rename = "async")]
    is_async: Option<String>,
}

/// `POST /jobs`: the BuildInfo once the job ended (201), or 201 at once with `?async`.
async fn submit(
    State(jobs): JobsState,
    caller: Caller,
    method: Method,
    query: Result<Query<JobsQuery>, QueryRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if method != Method::POST {
        return Err(ApiError::Method {
            expected: "POST",
            got: method,
        });
    }
    let req = JobRequest::parse(&body)?;
    access::require(&caller, Scope::Build, &req.project)?;
    let submitted = jobs.submit(req).await?;
    if query.is_ok_and(|Query(q)| q.is_async.is_some()) {
        return Ok((StatusCode::CREATED, "").into_response());
    }
    let answer = submitted.wait().await?;
    Ok(streamed(StatusCode::CREATED, answer.info, answer.dir))
}

/// All jobs, newest first, as mistry's JSON array, streamed: one job's BuildInfo is in memory at
/// a time, however many jobs and params there are. Only the projects the caller may read.
async fn index(State(jobs): JobsState, caller: Caller) -> Response {
    blocking_body(
        "application/json",
        move |w| {
            w.write_all(b"[")?;
            let readable = jobs
                .list()
                .filter(|f| caller.allows(Scope::Read, f.dir.project()));
            for (i, found) in readable.enumerate() {
                if i > 0 {
                    w.write_all(b",")?;
                }
                serde_json::to_writer(&mut *w, &index_entry(&found))?;
            }
            w.write_all(b"]")
        },
        |e| tracing::debug!(error = %e, "streaming the index stopped"),
    )
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// With `Content-Type: application/json`, the job object with its buildInfo (and logs) streamed
/// inside; otherwise the web view, which renders the job page (404 for an unknown job).
async fn job(
    State(jobs): JobsState,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !wants_json(&headers) {
        return Ok(match jobs.find(&project, &id).await {
            Ok(Some(_)) => Html(INDEX_HTML).into_response(),
            _ => (StatusCode::NOT_FOUND, Html(INDEX_HTML)).into_response(),
        });
    }
    match jobs.document(&project, &id).await? {
        Some(doc) => Ok(stream_body("application/json", doc)),
        None => Err(unknown_job(project, id)),
    }
}

/// A job in flight's log lines as server-sent events, until it ends; 204 when it is not in
/// flight.
async fn log(
    State(jobs): JobsState,
    Path((project, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(match jobs.follow(&project, &id).await? {
        Some(lines) => {
            Sse::new(lines.map(|l| Ok::<_, Infallible>(Event::default().data(l)))).into_response()
        }
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// A ready job's artifacts as a tar stream (the native transport of the `mistry` client).
async fn artifacts(
    State(jobs): JobsState,
    Path((project, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let dir = match jobs.artifacts(&project, &id).await {
        Some(f) if f.stage == Stage::Ready => f.dir,
        Some(_) => return Err(ApiError::NotReady { project, id }),
        None => return Err(unknown_job(project, id)),
    };
    let root = match tokio::task::spawn_blocking(move || open_artifacts(dir.path())).await? {
        Ok(fd) => Some(fd),
        // A job that removed its artifacts directory has no artifacts.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            tracing::warn!(%project, %id, error = %source, "refusing to serve artifacts");
            return Err(ApiError::Artifacts {
                project,
                id,
                source,
            });
        }
    };
    Ok(blocking_body(
        "application/x-tar",
        move |w| {
            match &root {
                Some(root) => write_tree(root, w),
                None => tar::Builder::new(w).into_inner(),
            }
            .map(drop)
        },
        move |e| tracing::warn!(%project, %id, error = %e, "streaming artifacts failed"),
    ))
}

/// A job without its logs (for the web view).
async fn api_job(
    State(jobs): JobsState,
    Path((project, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    match jobs.find(&project, &id).await? {
        Some(view) => Ok(json(StatusCode::OK, &view.json())?),
        None => Err(unknown_job(project, id)),
    }
}

/// `?bytes=N`: the last N bytes of a log.
#[derive(Debug, Default, Deserialize)]
struct LogTailQuery {
    bytes: Option<u64>,
}

/// A job's log as text: the last `bytes` bytes, or all of it (streamed); `x-log-size` says how
/// big it is.
async fn api_logtail(
    State(jobs): JobsState,
    Path((project, id)): Path<(String, String)>,
    query: Result<Query<LogTailQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let bytes = query.ok().and_then(|Query(q)| q.bytes);
    match jobs.log_tail(&project, &id, bytes).await? {
        Some(tail) => {
            let mut r = stream_body("text/plain; charset=utf-8", tail.bytes);
            if let Ok(size) = tail.size.to_string().parse() {
                r.headers_mut().insert("x-log-size", size);
            }
            Ok(r)
        }
        None => Err(unknown_job(project, id)),
    }
}
