//! The HTTP API of mistryd, as mistry's: `POST /jobs`, `GET /index/`, `GET /job/{project}/{id}`,
//! `GET /log/{project}/{id}` (server-sent events), `GET /metrics`, and the web view at `/`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use futures_util::stream::{self, Stream};
use tokio::io::AsyncReadExt;

use crate::engine::{Engine, JobError};
use crate::jobs::{BuildInfo, JobRequest};

// The web view, embedded: nothing is fetched from elsewhere.
const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");

pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/jobs", any(jobs))
        .route("/index/", get(index))
        .route("/job/{project}/{id}", get(job))
        .route("/log/{project}/{id}", get(log))
        .route("/artifacts/{project}/{id}", get(artifacts))
        .route("/metrics", get(metrics))
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
        .with_state(engine)
}

fn error_response(e: JobError) -> Response {
    let status = match e {
        JobError::BadRequest(_) => StatusCode::BAD_REQUEST,
        JobError::UnknownProject(_) => StatusCode::NOT_FOUND,
        JobError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        JobError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, e.to_string()).into_response()
}

/// A BuildInfo (between `prefix` and `suffix`) with its logs streamed from the job directory.
fn streamed(
    status: StatusCode,
    prefix: &str,
    info: &BuildInfo,
    dir: &std::path::Path,
    suffix: &str,
) -> Response {
    let body = crate::stream_json::body_with(
        prefix,
        info,
        dir.join("out.log"),
        dir.join("stderr.log"),
        suffix,
    );
    (status, [("content-type", "application/json")], body).into_response()
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [("content-type", "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn jobs(
    State(engine): State<Arc<Engine>>,
    method: Method,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    if method != Method::POST {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Expected POST, got {method}"),
        )
            .into_response();
    }
    let req = match JobRequest::parse(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let is_async = query.as_deref().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "async" || kv.starts_with("async="))
    });
    let scheduled = match engine.schedule(req).await {
        Ok(s) => s,
        Err(e) => return error_response(e),
    };
    if is_async {
        return (StatusCode::CREATED, "").into_response();
    }
    match scheduled.wait().await {
        Ok((info, dir)) => streamed(StatusCode::CREATED, "", &info, &dir, ""),
        Err(e) => error_response(e),
    }
}

/// `Mon, 02 Jan 2006 15:04:05`, as mistry's index shows times.
fn index_time(rfc3339: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.format("%a, %d %b %Y %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn job_json(project: &str, id: &str, state: &str, info: &BuildInfo) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "project": project,
        "startedAt": index_time(&info.started_at),
        "buildInfo": info,
        "state": state,
    })
}

async fn index(State(engine): State<Arc<Engine>>) -> Response {
    let list = tokio::task::spawn_blocking(move || engine.list())
        .await
        .unwrap_or_default();
    let items: Vec<serde_json::Value> = list
        .iter()
        .map(|(p, id, state, info)| job_json(p, id, state, info))
        .collect();
    json(StatusCode::OK, &items)
}

async fn job(
    State(engine): State<Arc<Engine>>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (p, i) = (project.clone(), id.clone());
    let found = tokio::task::spawn_blocking(move || engine.job(&p, &i))
        .await
        .ok()
        .flatten();
    let wants_json_early = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let Some((state, info, dir)) = found else {
        if !wants_json_early {
            return (StatusCode::NOT_FOUND, Html(INDEX_HTML)).into_response();
        }
        return (StatusCode::NOT_FOUND, format!("Unknown job {project}/{id}")).into_response();
    };
    let wants_json = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if wants_json {
        // The job object with its buildInfo (and logs) streamed inside.
        let mut head = job_json(&project, &id, state, &info);
        if let Some(obj) = head.as_object_mut() {
            obj.remove("buildInfo");
        }
        let head = serde_json::to_string(&head).unwrap_or_else(|_| "{}".into());
        let prefix = format!("{},\"buildInfo\":", &head[..head.len() - 1]);
        return streamed(StatusCode::OK, &prefix, &info, &dir, "}");
    }
    // The web view renders the job page.
    Html(INDEX_HTML).into_response()
}

struct Tail {
    engine: Arc<Engine>,
    project: String,
    id: String,
    file: Option<tokio::fs::File>,
    path: std::path::PathBuf,
    partial: Vec<u8>,
    lines: std::collections::VecDeque<String>,
    done: bool,
}

/// Follow a pending job's log: one event per line, until the job is no longer pending.
fn tail_stream(t: Tail) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(t, |mut t| async move {
        loop {
            if let Some(line) = t.lines.pop_front() {
                return Some((Ok(Event::default().data(line)), t));
            }
            if t.done {
                return None;
            }
            if t.file.is_none() {
                t.file = tokio::fs::File::open(&t.path).await.ok();
            }
            let mut buf = vec![0u8; 16 * 1024];
            let n = match t.file.as_mut() {
                Some(f) => f.read(&mut buf).await.unwrap_or(0),
                None => 0,
            };
            if n > 0 {
                t.partial.extend_from_slice(&buf[..n]);
                while let Some(pos) = t.partial.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = t.partial.drain(..=pos).collect();
                    t.lines
                        .push_back(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
                }
                continue;
            }
            let still_pending = t
                .engine
                .job(&t.project, &t.id)
                .is_some_and(|(state, _, _)| state == "pending");
            if !still_pending {
                if !t.partial.is_empty() {
                    let rest = std::mem::take(&mut t.partial);
                    t.lines
                        .push_back(String::from_utf8_lossy(&rest).into_owned());
                }
                // Read what was written between the last read and the end.
                if let Some(f) = t.file.as_mut() {
                    let mut rest = Vec::new();
                    let _ = f.read_to_end(&mut rest).await;
                    for l in String::from_utf8_lossy(&rest).lines() {
                        t.lines.push_back(l.to_string());
                    }
                }
                t.done = true;
                continue;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

async fn log(
    State(engine): State<Arc<Engine>>,
    Path((project, id)): Path<(String, String)>,
) -> Response {
    let Some(("pending", _, dir)) = engine.job(&project, &id) else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let t = Tail {
        engine,
        project,
        id,
        file: None,
        path: dir.join("out.log"),
        partial: Vec::new(),
        lines: Default::default(),
        done: false,
    };
    Sse::new(tail_stream(t)).into_response()
}

/// Sends what a blocking tar writer produces to an async body, in 64 KiB chunks.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A ready job's artifacts as a tar stream (the native transport of the `mistry` client).
async fn artifacts(
    State(engine): State<Arc<Engine>>,
    Path((project, id)): Path<(String, String)>,
) -> Response {
    let found = {
        let (p, i) = (project.clone(), id.clone());
        tokio::task::spawn_blocking(move || engine.job(&p, &i))
            .await
            .ok()
            .flatten()
    };
    let dir = match found {
        Some(("ready", _, dir)) => dir.join("data/artifacts"),
        Some(_) => {
            return (
                StatusCode::CONFLICT,
                format!("Job {project}/{id} is not ready"),
            )
                .into_response()
        }
        None => {
            return (StatusCode::NOT_FOUND, format!("Unknown job {project}/{id}")).into_response()
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::task::spawn_blocking(move || {
        let err_tx = tx.clone();
        let writer = std::io::BufWriter::with_capacity(64 * 1024, ChannelWriter { tx });
        let mut b = tar::Builder::new(writer);
        b.follow_symlinks(false);
        b.mode(tar::HeaderMode::Complete);
        let result = b
            .append_dir_all(".", &dir)
            .and_then(|_| b.into_inner())
            .and_then(|mut w| std::io::Write::flush(&mut w));
        if let Err(e) = result {
            tracing::warn!(dir = %dir.display(), error = %e, "streaming artifacts failed");
            let _ = err_tx.blocking_send(Err(e));
        }
    });
    let stream = stream::poll_fn(move |cx| rx.poll_recv(cx));
    (
        [("content-type", "application/x-tar")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// A job without its logs (for the web view).
async fn api_job(
    State(engine): State<Arc<Engine>>,
    Path((project, id)): Path<(String, String)>,
) -> Response {
    let (p, i) = (project.clone(), id.clone());
    match tokio::task::spawn_blocking(move || engine.job(&p, &i))
        .await
        .ok()
        .flatten()
    {
        Some((state, info, _)) => json(StatusCode::OK, &job_json(&project, &id, state, &info)),
        None => (StatusCode::NOT_FOUND, format!("Unknown job {project}/{id}")).into_response(),
    }
}

/// A job's log as text: the last `bytes` bytes, or all of it (streamed); `x-log-size` says how
/// big it is.
async fn api_logtail(
    State(engine): State<Arc<Engine>>,
    Path((project, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    use tokio::io::AsyncSeekExt;
    let Some((_, _, dir)) = engine.job(&project, &id) else {
        return (StatusCode::NOT_FOUND, format!("Unknown job {project}/{id}")).into_response();
    };
    let bytes: Option<u64> = query
        .as_deref()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("bytes=")))
        .and_then(|v| v.parse().ok());
    let Ok(mut file) = tokio::fs::File::open(dir.join("out.log")).await else {
        return ([("x-log-size", "0".to_string())], "").into_response();
    };
    let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    if let Some(n) = bytes {
        let _ = file
            .seek(std::io::SeekFrom::Start(size.saturating_sub(n)))
            .await;
    }
    let stream = stream::unfold(file, |mut f| async move {
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

async fn metrics(State(engine): State<Arc<Engine>>) -> Response {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        engine.metrics.render(),
    )
        .into_response()
}
