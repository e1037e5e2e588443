//! The HTTP API of mistryd, as mistry's: `POST /jobs`, `GET /index/`, `GET /job/{project}/{id}`,
//! `GET /log/{project}/{id}` (server-sent events), `GET /artifacts/{project}/{id}`,
//! `GET /metrics`, `GET /agents` (the cluster's agents), and the web view at `/`. Handlers are thin: the engine does the work, and
//! nothing here reads the disk on the runtime's threads.
//!
//! Clients are not trusted: [`serve`] ([`listen`]) gives each connection
//! [`Limits::header_timeout`] to send its request headers (also the idle timeout between
//! kept-alive requests), [`Limits::body_timeout`] to send a request's body (408), and
//! [`Limits::send_timeout`] to accept an answer's bytes, and caps the connections served at
//! once (evicting idle ones and slow senders of bodies at the cap); state-changing requests from
//! another origin's page are refused (403); `/index/` is streamed and `/log` follows the job's
//! state in memory; artifacts are read by fd below the job's `data/artifacts`, never through a
//! symlink ([`artifacts`]).

mod listen;

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
use tokio::io::AsyncReadExt;

use crate::body::blocking_body;
use crate::tree::{open_artifacts, write_tree};
pub use listen::{
    serve, Limits, DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_SEND_TIMEOUT,
};

use crate::engine::{Engine, Found, JobDir, JobError, Stage};
use crate::jobs::{BuildInfo, JobRequest};

// The web view, embedded: nothing is fetched from elsewhere.
use crate::body::{json, unavailable, INDEX_HTML};
const APP_JS: &str = include_str!("../web/app.js");
const STYLE_CSS: &str = include_str!("../web/style.css");

pub fn router(engine: Arc<Engine>) -> Router {
    router_in(engine, None)
}

/// [`router`] of an agent of `cluster` (mistryd): with a database, pipeline runs submit their
/// jobs through the cluster's job records (the handlers find the cluster in an extension).
pub fn router_in(engine: Arc<Engine>, cluster: Option<Arc<crate::cluster::Cluster>>) -> Router {
    Router::new()
        .route("/jobs", any(jobs))
        .route("/index/", get(index))
        .route("/job/{project}/{id}", get(job))
        .route("/log/{project}/{id}", get(log))
        .route("/artifacts/{project}/{id}", get(artifacts))
        // A whole build, for another agent (src/cluster/replicate.rs).
        .route(
            "/api/build/{project}/{id}",
            get(crate::cluster::replicate::serve_build),
        )
        .route("/metrics", get(metrics))
        .route("/agents", get(agents))
        .route(
            "/api/agents/jobs",
            get(crate::cluster::view::serve_job_agents),
        )
        .route(
            "/api/cluster/jobs",
            get(crate::cluster::view::serve_cluster_jobs),
        )
        .route("/api/job/{project}/{id}", get(api_job))
        .route("/api/logtail/{project}/{id}", get(api_logtail))
        .route(
            "/static/app.js",
            get(|| async { ([("content-type", "text/javascript; charset=utf-8")], APP_JS) }),
        )
        .route(
            "/static/style.css",
            get(|| async { ([("content-type", "text/css; charset=utf-8")], STYLE_CSS) }),
        )
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .merge(crate::pipeline::http::routes(Arc::clone(&engine), cluster))
        .layer(axum::middleware::from_fn(same_origin))
        .with_state(engine)
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
    tracing::warn!(%origin, %host, method = %req.method(), path = %req.uri().path(), "refused a cross-origin request");
    (
        StatusCode::FORBIDDEN,
        format!(
            "Cross-origin request refused: Origin '{origin}' is not this server (http://{host})"
        ),
    )
        .into_response()
}

impl IntoResponse for JobError {
    fn into_response(self) -> Response {
        let status = match self {
            JobError::BadRequest(_) => StatusCode::BAD_REQUEST,
            JobError::UnknownProject(_) => StatusCode::NOT_FOUND,
            JobError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            JobError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, self.to_string()).into_response()
    }
}

fn unknown_job(project: &str, id: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("Unknown job {project}/{id}")).into_response()
}

/// A BuildInfo (between `prefix` and `suffix`) with its logs streamed from the job directory.
fn streamed(
    status: StatusCode,
    prefix: String,
    info: BuildInfo,
    dir: JobDir,
    suffix: &'static str,
) -> Response {
    let mut r = blocking_body(
        "application/json",
        move |w| {
            crate::stream_json::write_with(
                w,
                &prefix,
                &info,
                &dir.out_log(),
                &dir.stderr_log(),
                suffix,
            )
        },
        |e| tracing::debug!(error = %e, "streaming a BuildInfo stopped"),
    );
    *r.status_mut() = status;
    r
}

/// `POST /jobs?async`: answer as soon as the job is queued.
#[derive(Debug, Default, Deserialize)]
struct JobsQuery {
    #[serde(rename = "async")]
    is_async: Option<String>,
}

async fn jobs(
    State(engine): State<Arc<Engine>>,
    cluster: Option<axum::Extension<Arc<crate::cluster::Cluster>>>,
    method: Method,
    query: Result<Query<JobsQuery>, QueryRejection>,
    body: Bytes,
) -> Response {
    if method != Method::POST {
        let msg = format!("Expected POST, got {method}");
        return (StatusCode::METHOD_NOT_ALLOWED, msg).into_response();
    }
    let req = match JobRequest::parse(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let is_async = query.is_ok_and(|Query(q)| q.is_async.is_some());
    // Several agents: the job records decide (src/cluster/jobs.rs).
    if let Some(scheduler) = cluster.as_ref().and_then(|c| c.scheduler()) {
        return match scheduler.submit(req, is_async).await {
            Ok(None) => (StatusCode::CREATED, "").into_response(),
            Ok(Some(a)) => streamed(StatusCode::CREATED, String::new(), a.info, a.dir, ""),
            Err(e) => {
                let status =
                    StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                (status, e.to_string()).into_response()
            }
        };
    }
    let scheduled = match engine.schedule(req).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    if is_async {
        return (StatusCode::CREATED, "").into_response();
    }
    match scheduled.wait().await {
        Ok((info, dir)) => streamed(StatusCode::CREATED, String::new(), info, dir, ""),
        Err(e) => e.into_response(),
    }
}

/// `Mon, 02 Jan 2006 15:04:05`, as mistry's index shows times.
fn index_time(rfc3339: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.format("%a, %d %b %Y %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// A job as `/index/` and the web view show it.
fn job_json(f: &Found) -> serde_json::Value {
    serde_json::json!({
        "id": f.dir.id(),
        "project": f.dir.project(),
        "startedAt": index_time(&f.info.started_at),
        "buildInfo": f.info,
        "state": f.stage.as_str(),
    })
}

/// All jobs, newest first, as mistry's JSON array, streamed: one job's BuildInfo is in memory at
/// a time, however many jobs and params there are.
async fn index(State(engine): State<Arc<Engine>>) -> Response {
    blocking_body(
        "application/json",
        move |w| {
            w.write_all(b"[")?;
            for (i, found) in engine.list().enumerate() {
                if i > 0 {
                    w.write_all(b",")?;
                }
                serde_json::to_writer(&mut *w, &job_json(&found))?;
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
/// inside; otherwise the web view, which renders the job page.
async fn job(
    State(engine): State<Arc<Engine>>,
    cluster: Option<axum::Extension<Arc<crate::cluster::Cluster>>>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let found = engine.find_job(&project, &id).await;
    // Several agents: a job that is not here is shown from its record and central log.
    if let (None, Some(logs)) = (&found, central_logs(&cluster)) {
        if !wants_json(&headers) {
            if let Ok(Some(_)) = logs.record(&project, &id).await {
                return Html(INDEX_HTML).into_response();
            }
        } else if let Some(r) = logs.job_response(&project, &id).await {
            return r;
        }
    }
    match (found, wants_json(&headers)) {
        (Some(found), true) => {
            let mut head = job_json(&found);
            if let Some(obj) = head.as_object_mut() {
                obj.remove("buildInfo");
            }
            let head = serde_json::to_string(&head).unwrap_or_else(|_| "{}".into());
            let prefix = format!("{},\"buildInfo\":", &head[..head.len() - 1]);
            streamed(StatusCode::OK, prefix, found.info, found.dir, "}")
        }
        (None, true) => unknown_job(&project, &id),
        (Some(_), false) => Html(INDEX_HTML).into_response(),
        (None, false) => (StatusCode::NOT_FOUND, Html(INDEX_HTML)).into_response(),
    }
}

/// A job in flight's log lines as server-sent events, until it is ready; 204 when it is not in
/// flight.
async fn log(
    State(engine): State<Arc<Engine>>,
    cluster: Option<axum::Extension<Arc<crate::cluster::Cluster>>>,
    Path((project, id)): Path<(String, String)>,
) -> Response {
    match engine.follow(&project, &id) {
        Some(lines) => {
            Sse::new(lines.map(|l| Ok::<_, Infallible>(Event::default().data(l)))).into_response()
        }
        // Several agents: a job in flight on another agent, from the central log.
        None => match central_logs(&cluster) {
            Some(logs) => match logs.follow(&project, &id).await {
                Ok(Some(lines)) => {
                    Sse::new(lines.map(|l| Ok::<_, Infallible>(Event::default().data(l))))
                        .into_response()
                }
                Ok(None) => StatusCode::NO_CONTENT.into_response(),
                Err(e) => unavailable(&e),
            },
            None => StatusCode::NO_CONTENT.into_response(),
        },
    }
}

/// The central job logs (src/cluster/logs.rs), with a database.
fn central_logs(
    cluster: &Option<axum::Extension<Arc<crate::cluster::Cluster>>>,
) -> Option<&Arc<crate::cluster::logs::Logs>> {
    cluster.as_ref().and_then(|c| c.0.logs())
}

/// A ready job's artifacts as a tar stream (the native transport of the `mistry` client).
async fn artifacts(
    State(engine): State<Arc<Engine>>,
    cluster: Option<axum::Extension<Arc<crate::cluster::Cluster>>>,
    Path((project, id)): Path<(String, String)>,
) -> Response {
    let found = match engine.find_job(&project, &id).await {
        // Several agents: a build another agent holds is fetched from it first.
        None => {
            let cluster = cluster.as_ref().map(|c| &*c.0);
            crate::cluster::view::fetch_missing(cluster, &engine, &project, &id).await
        }
        found => found,
    };
    let dir = match found {
        Some(f) if f.stage == Stage::Ready => f.dir,
        Some(_) => {
            let msg = format!("Job {project}/{id} is not ready");
            return (StatusCode::CONFLICT, msg).into_response();
        }
        None => return unknown_job(&project, &id),
    };
    let root = match tokio::task::spawn_blocking(move || open_artifacts(dir.path())).await {
        Ok(Ok(fd)) => Some(fd),
        // A job that removed its artifacts directory has no artifacts.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
        Ok(Err(e)) => {
            tracing::warn!(%project, %id, error = %e, "refusing to serve artifacts");
            let msg = format!(
                "The artifacts of job {project}/{id} are not served: data/artifacts is not a \
                 directory of the job ({e})"
            );
            return (StatusCode::CONFLICT, msg).into_response();
        }
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    blocking_body(
        "application/x-tar",
        move |w| {
            match &root {
                Some(root) => write_tree(root, w),
                None => tar::Builder::new(w).into_inner(),
            }
            .map(drop)
        },
        move |e| tracing::warn!(%project, %id, error = %e, "streaming artifacts failed"),
    )
}

/// A job without its logs (for the web view).
async fn api_job(
    State(engine): State<Arc<Engine>>,
    cluster: Option<axum::Extension<Arc<crate::cluster::Cluster>>>,
    Path((project, id)): Path<(String, String)>,
) -> Response {
    match engine.find_job(&project, &id).await {
        Some(found) => json(StatusCode::OK, &job_json(&found)),
        // Several agents: a job that is not here, from its record.
        None => match central_logs(&cluster) {
            Some(logs) => match logs.record(&project, &id).await {
                Ok(Some(job)) => json(StatusCode::OK, &job.json()),
                Ok(None) => unknown_job(&project, &id),
                Err(e) => unavailable(&e),
            },
            None => unknown_job(&project, &id),
        },
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
    State(engine): State<Arc<Engine>>,
    cluster: Option<axum::Extension<Arc<crate::cluster::Cluster>>>,
    Path((project, id)): Path<(String, String)>,
    query: Result<Query<LogTailQuery>, QueryRejection>,
) -> Response {
    use tokio::io::AsyncSeekExt;
    let bytes = query.ok().and_then(|Query(q)| q.bytes);
    let Some(found) = engine.find_job(&project, &id).await else {
        // Several agents: a job that is not here, from the central log.
        if let Some(logs) = central_logs(&cluster) {
            if let Some(r) = logs.logtail_response(&project, &id, bytes).await {
                return r;
            }
        }
        return unknown_job(&project, &id);
    };
    let Ok(mut file) = tokio::fs::File::open(found.dir.out_log()).await else {
        return ([("x-log-size", "0".to_string())], "").into_response();
    };
    let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    if let Some(n) = bytes {
        let _ = file
            .seek(std::io::SeekFrom::Start(size.saturating_sub(n)))
            .await;
    }
    let stream = futures_util::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match f.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), f))
            }
        }
    });
    (
        [
            ("content-type", "text/plain; charset=utf-8".to_string()),
            ("x-log-size", size.to_string()),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// `GET /agents`: every agent of the cluster (this one alone without a database) as JSON when
/// asked for (`Content-Type` or `Accept: application/json`), else the web view's agents page;
/// 503 when the database does not answer. The cluster handle is an extension mistryd adds; a
/// router without it shows this agent from the configuration.
async fn agents(
    State(engine): State<Arc<Engine>>,
    cluster: Option<axum::Extension<Arc<crate::cluster::Cluster>>>,
    headers: HeaderMap,
) -> Response {
    let accepts_json = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !wants_json(&headers) && !accepts_json {
        return Html(INDEX_HTML).into_response();
    }
    let cluster = match cluster {
        Some(axum::Extension(c)) => c,
        None => Arc::new(crate::cluster::Cluster::local(&engine.cfg)),
    };
    match cluster.agents(engine.running()).await {
        Ok(list) => json(StatusCode::OK, &list),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn metrics(
    State(engine): State<Arc<Engine>>,
    cluster: Option<axum::Extension<Arc<crate::cluster::Cluster>>>,
) -> Response {
    crate::cluster::view::update_gauges(cluster.as_ref().map(|c| &*c.0), &engine).await;
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        engine.metrics.render(),
    )
        .into_response()
}
