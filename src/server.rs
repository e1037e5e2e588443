//! The HTTP API of mistryd, as mistry's: `POST /jobs`, `GET /index/`, `GET /job/{project}/{id}`,
//! `GET /log/{project}/{id}` (server-sent events), `GET /metrics`, and the web view at `/`.
//!
//! Clients are not trusted: [`serve`] gives each connection [`Limits::header_timeout`] to send
//! its request headers (also the idle timeout between kept-alive requests) and caps the
//! connections served at once (evicting the oldest one that has not sent a request yet);
//! state-changing requests from another origin's page are refused (403); `/index/` is streamed
//! and `/log` follows the job's state in memory; artifacts are read by fd below the job's
//! `data/artifacts`, never through a symlink.

use std::convert::Infallible;
use std::os::fd::{AsFd, OwnedFd};
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
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
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

/// Limits of the HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once. At the cap, the oldest connection that has not sent a
    /// complete request yet is closed to make room; when there is none, new connections wait
    /// in the kernel's accept queue.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, on a new connection and between requests
    /// of a kept-alive connection (so it is also the idle timeout).
    pub header_timeout: Duration,
}

/// Defaults of [`Limits`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
        }
    }
}

/// A connection that has not sent a complete request yet can be evicted to make room.
struct Fresh {
    waiting: std::sync::atomic::AtomicBool,
    evict: tokio::sync::Notify,
}

/// Connections in the order they were accepted, for eviction at the cap.
#[derive(Default)]
struct Conns {
    queue: std::sync::Mutex<std::collections::VecDeque<std::sync::Weak<Fresh>>>,
}

impl Conns {
    fn push(&self, c: &Arc<Fresh>, cap: usize) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.push_back(Arc::downgrade(c));
        if q.len() > 2 * cap.max(16) {
            q.retain(|w| {
                w.upgrade()
                    .is_some_and(|c| c.waiting.load(std::sync::atomic::Ordering::SeqCst))
            });
        }
    }

    /// Close the oldest connection still waiting for its first request; false if none.
    fn evict_oldest(&self) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(w) = q.pop_front() {
            if let Some(c) = w.upgrade() {
                if c.waiting.load(std::sync::atomic::Ordering::SeqCst) {
                    c.evict.notify_one();
                    return true;
                }
            }
        }
        false
    }
}

fn out_of_fds(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Serve `app` on `listener` until `shutdown` turns true: HTTP/1.1 with a header-read (and
/// idle) timeout and a cap on connections; running out of file descriptors backs off instead of
/// spinning. After shutdown, open connections finish their current request and close.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering;
    let cap = limits.max_connections.clamp(1, 1 << 20);
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    let conns = Arc::new(Conns::default());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if !matches!(last_warning, Some(t) if t.elapsed() < Duration::from_secs(5)) {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    last_warning = Some(std::time::Instant::now());
                }
                if out_of_fds(&e) {
                    // Make room, and give closing connections time to release their fds.
                    conns.evict_oldest();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                conns.evict_oldest();
                tokio::select! {
                    p = Arc::clone(&slots).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = shutdown.wait_for(|s| *s) => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let fresh = Arc::new(Fresh {
            waiting: std::sync::atomic::AtomicBool::new(true),
            evict: tokio::sync::Notify::new(),
        });
        conns.push(&fresh, cap);
        let app = app.clone();
        let http = http.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let f = Arc::clone(&fresh);
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    f.waiting.store(false, Ordering::SeqCst);
                    let mut app = app.clone();
                    tower_service::Service::call(&mut app, req.map(axum::body::Body::new))
                });
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    _ = fresh.evict.notified(), if !stopping => {
                        if fresh.waiting.load(Ordering::SeqCst) {
                            break;
                        }
                    }
                    _ = stop.wait_for(|s| *s), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    drop(listener);
    // Wait for the open connections to finish.
    let _ = slots.acquire_many(cap as u32).await;
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

/// All jobs, newest first, as mistry's JSON array, streamed: one job's BuildInfo is in memory at
/// a time, however many jobs and params there are.
async fn index(State(engine): State<Arc<Engine>>) -> Response {
    blocking_body(
        "application/json",
        move |w| {
            w.write_all(b"[")?;
            let mut first = true;
            for (project, id, state) in engine.list() {
                let Some((state, info)) = engine.job_info(&project, &id, state) else {
                    continue;
                };
                if !first {
                    w.write_all(b",")?;
                }
                first = false;
                serde_json::to_writer(&mut *w, &job_json(&project, &id, state, &info))?;
            }
            w.write_all(b"]")
        },
        |e| tracing::debug!(error = %e, "streaming the index stopped"),
    )
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
    /// The job's state in memory: `Some` once it is ready.
    state: tokio::sync::watch::Receiver<Option<BuildInfo>>,
    file: Option<tokio::fs::File>,
    /// `out.log` while the job runs, and where it is once the job is ready.
    path: std::path::PathBuf,
    ready_path: std::path::PathBuf,
    partial: Vec<u8>,
    lines: std::collections::VecDeque<String>,
    done: bool,
}

impl Tail {
    /// Move the complete lines of `partial` to `lines`.
    fn split_lines(&mut self) {
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            self.lines
                .push_back(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
    }
}

/// How often a running job's log is read for new lines (the job's state wakes the stream at
/// once when it ends).
const LOG_POLL: Duration = Duration::from_millis(100);

/// Follow a running job's log: one event per line, until the job is ready. The job's state comes
/// from the engine's memory (a watch channel), not from disk.
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
                t.split_lines();
                continue;
            }
            let ended = t.state.borrow().is_some();
            if !ended {
                tokio::select! {
                    r = t.state.changed() => {
                        if r.is_ok() {
                            continue;
                        }
                        // The engine dropped the job without a result: stop following it.
                    }
                    _ = tokio::time::sleep(LOG_POLL) => continue,
                }
            }
            // The job is ready: read what was written since the last read, then end.
            if t.file.is_none() {
                t.file = tokio::fs::File::open(&t.ready_path).await.ok();
            }
            if let Some(f) = t.file.as_mut() {
                let mut rest = Vec::new();
                let _ = f.read_to_end(&mut rest).await;
                t.partial.extend_from_slice(&rest);
            }
            t.split_lines();
            if !t.partial.is_empty() {
                let rest = std::mem::take(&mut t.partial);
                t.lines
                    .push_back(String::from_utf8_lossy(&rest).into_owned());
            }
            t.done = true;
        }
    })
}

async fn log(
    State(engine): State<Arc<Engine>>,
    Path((project, id)): Path<(String, String)>,
) -> Response {
    if crate::jobs::check_name("project", &project).is_err()
        || crate::jobs::check_name("job", &id).is_err()
    {
        return StatusCode::NO_CONTENT.into_response();
    }
    let Some(state) = engine.watch(&project, &id) else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let build = engine.cfg.build_path.join(&project);
    let t = Tail {
        state,
        file: None,
        path: build.join("pending").join(&id).join("out.log"),
        ready_path: build.join("ready").join(&id).join("out.log"),
        partial: Vec::new(),
        lines: Default::default(),
        done: false,
    };
    Sse::new(tail_stream(t)).into_response()
}

/// A response whose body blocking code writes: `produce` runs on a blocking thread with a
/// buffered writer whose 64 KiB chunks go to the client as they come, so memory stays flat
/// however large the body. An error (the client going away included) is passed to `failed`
/// and ends the body with it.
fn blocking_body(
    content_type: &'static str,
    produce: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()> + Send + 'static,
    failed: impl FnOnce(&std::io::Error) + Send + 'static,
) -> Response {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::task::spawn_blocking(move || {
        let err_tx = tx.clone();
        let mut w = std::io::BufWriter::with_capacity(64 * 1024, ChannelWriter { tx });
        let result = produce(&mut w).and_then(|()| std::io::Write::flush(&mut w));
        if let Err(e) = result {
            failed(&e);
            let _ = err_tx.blocking_send(Err(e));
        }
    });
    let stream = stream::poll_fn(move |cx| rx.poll_recv(cx));
    (
        [("content-type", content_type)],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// Sends what a blocking writer produces to an async body, in 64 KiB chunks.
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

/// Open a job's `data/artifacts` without following a symlink anywhere below the job directory:
/// a job that replaced it (or `data/`) with a link gets an error, never the link's target.
pub fn open_artifacts(job_dir: &std::path::Path) -> std::io::Result<OwnedFd> {
    let dir = rustix::fs::open(
        job_dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    open_beneath(&dir, std::path::Path::new("data/artifacts"), true)
}

/// Open `rel` under `root` (a directory fd) without following any symlink and without leaving
/// `root`: `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or, on kernels without openat2,
/// `openat(O_NOFOLLOW)` component by component.
fn open_beneath(root: &OwnedFd, rel: &std::path::Path, dir: bool) -> std::io::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        rel
    };
    let mut flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
    flags |= if dir {
        OFlags::DIRECTORY
    } else {
        // A FIFO must not block the walk.
        OFlags::NONBLOCK
    };
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match rustix::fs::openat2(root, rel, flags, Mode::empty(), resolve) {
        Err(rustix::io::Errno::NOSYS) => {}
        r => return r.map_err(std::io::Error::from),
    }
    let mut cur = rustix::io::dup(root)?;
    let parts: Vec<_> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        let name = match part {
            std::path::Component::Normal(n) => *n,
            std::path::Component::CurDir => continue,
            _ => return Err(std::io::Error::from_raw_os_error(libc::EXDEV)),
        };
        let last = i + 1 == parts.len();
        let f = if last {
            flags
        } else {
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
        };
        cur = rustix::fs::openat(&cur, name, f, Mode::empty())?;
    }
    Ok(cur)
}

/// A tar header of the kind `kind` carrying the mode, owner and time of `st`.
fn header_from(st: &rustix::fs::Stat, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(st.st_uid.into());
    h.set_gid(st.st_gid.into());
    h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    h.set_size(size);
    h
}

/// Write the tree under `root` (an open directory: a job's artifacts) as a tar stream. Every
/// entry is opened by fd below `root`, never through a symlink: links are sent as links (their
/// targets are not read), FIFOs, sockets and devices are skipped.
pub fn write_tree<W: std::io::Write>(root: &OwnedFd, out: W) -> std::io::Result<W> {
    use std::os::unix::ffi::OsStrExt;
    let mut b = tar::Builder::new(out);
    // Directories still to send, as paths relative to root (re-opened beneath root, so no fd is
    // held per level however deep the tree is).
    let mut todo = vec![std::path::PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let dir = open_beneath(root, &rel, true)?;
        if !rel.as_os_str().is_empty() {
            let st = rustix::fs::fstat(&dir)?;
            let mut h = header_from(&st, tar::EntryType::Directory, 0);
            b.append_data(&mut h, &rel, std::io::empty())?;
        }
        let mut names = images::inroot::list(dir.as_fd())?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = rel.join(&name);
            let st = match rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            match rustix::fs::FileType::from_raw_mode(st.st_mode) {
                rustix::fs::FileType::Directory => subdirs.push(path),
                rustix::fs::FileType::RegularFile => {
                    // Swapped for something else since the stat: skipped.
                    let Some((fd, st)) = images::inroot::open_file_at(dir.as_fd(), &name)? else {
                        continue;
                    };
                    let size = u64::try_from(st.st_size).unwrap_or(0);
                    let mut h = header_from(&st, tar::EntryType::Regular, size);
                    let file = std::io::Read::take(std::fs::File::from(fd), size);
                    b.append_data(&mut h, &path, file)?;
                }
                rustix::fs::FileType::Symlink => {
                    let target = rustix::fs::readlinkat(&dir, &name, Vec::new())?;
                    let mut h = header_from(&st, tar::EntryType::Symlink, 0);
                    b.append_link(
                        &mut h,
                        &path,
                        std::ffi::OsStr::from_bytes(target.as_bytes()),
                    )?;
                }
                _ => {}
            }
        }
        todo.extend(subdirs.into_iter().rev());
    }
    b.into_inner()
}

/// A ready job's artifacts as a tar stream (the native transport of the `mistry` client). The
/// tree is read by fd from the job's `data/artifacts`, never following a symlink out of it.
async fn artifacts(
    State(engine): State<Arc<Engine>>,
    Path((project, id)): Path<(String, String)>,
) -> Response {
    let found = {
        let (p, i) = (project.clone(), id.clone());
        tokio::task::spawn_blocking(move || engine.job(&p, &i).map(|(s, _, d)| (s, d)))
            .await
            .ok()
            .flatten()
    };
    let dir = match found {
        Some(("ready", dir)) => dir,
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
    let root = match tokio::task::spawn_blocking(move || open_artifacts(&dir)).await {
        Ok(Ok(fd)) => Some(fd),
        // A job that removed its artifacts directory has no artifacts.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
        Ok(Err(e)) => {
            tracing::warn!(%project, %id, error = %e, "refusing to serve artifacts");
            return (
                StatusCode::CONFLICT,
                format!(
                    "The artifacts of job {project}/{id} are not served: data/artifacts is not a \
                     directory of the job ({e})"
                ),
            )
                .into_response();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(tar: &[u8]) -> Vec<(String, tar::EntryType, Option<String>)> {
        let mut a = tar::Archive::new(tar);
        let mut v: Vec<_> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                    e.link_name().unwrap().map(|l| l.display().to_string()),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn artifacts_are_read_by_fd_and_links_are_not_followed() {
        let job = tempfile::tempdir().unwrap();
        let art = job.path().join("data/artifacts");
        std::fs::create_dir_all(art.join("sub")).unwrap();
        std::fs::write(art.join("file"), "content").unwrap();
        std::fs::write(art.join("sub/x"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", art.join("etc")).unwrap();
        nix::unistd::mkfifo(&art.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let root = open_artifacts(job.path()).unwrap();
        let tar = write_tree(&root, Vec::new()).unwrap();
        use tar::EntryType::{Directory, Regular, Symlink};
        assert_eq!(
            entries(&tar),
            vec![
                ("etc".into(), Symlink, Some("/etc".into())),
                ("file".into(), Regular, None),
                ("sub".into(), Directory, None),
                ("sub/x".into(), Regular, None),
            ]
        );

        // data/artifacts, or data/, replaced by a link: refused, whatever the link says.
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(other.path().join("artifacts")).unwrap();
        std::fs::remove_dir_all(&art).unwrap();
        for target in [other.path().join("artifacts"), "../../..".into()] {
            std::os::unix::fs::symlink(&target, &art).unwrap();
            let e = open_artifacts(job.path()).unwrap_err();
            assert!(
                matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
                "{target:?}: {e}"
            );
            std::fs::remove_file(&art).unwrap();
        }
        std::fs::remove_dir_all(job.path().join("data")).unwrap();
        std::os::unix::fs::symlink(other.path(), job.path().join("data")).unwrap();
        let e = open_artifacts(job.path()).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
            "{e}"
        );
    }
}
