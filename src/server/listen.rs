//! The HTTP listener: HTTP/1.1 with a header-read (and idle) timeout, a deadline for each
//! request's body (408), a send timeout for answers a client stops reading, and a cap on
//! connections that evicts the oldest connection not busy with a request (idle, or still
//! sending a body) at the cap; running out of file descriptors backs off instead of spinning.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Limits of the HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once. At the cap, the oldest connection that is not busy with a
    /// request (waiting for a request's headers, new or kept alive, or still sending a request's
    /// body) is closed to make room; when there is none, new connections wait in the kernel's
    /// accept queue.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, on a new connection and between requests
    /// of a kept-alive connection (so it is also the idle timeout).
    pub header_timeout: Duration,
    /// Time a client has to send a request's whole body once its headers are in: past it, the
    /// request is answered 408 and the connection closed.
    pub body_timeout: Duration,
    /// Time a client may go without accepting any byte of an answer being sent: past it, the
    /// connection is closed (and whatever produced the answer stops).
    pub send_timeout: Duration,
}

/// Defaults of [`Limits`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;
/// Default [`Limits::header_timeout`]: 10 seconds.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`Limits::body_timeout`]: 60 seconds.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`Limits::send_timeout`]: 60 seconds.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            send_timeout: DEFAULT_SEND_TIMEOUT,
        }
    }
}

/// What a connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request's headers (a new connection, or a kept-alive one between
    /// requests): evictable.
    Idle,
    /// Receiving a request's body: evictable.
    Body,
    /// Handling a request, or sending its answer.
    Busy,
}

/// One connection, as eviction sees it.
struct Conn {
    /// The number of its current request, and its phase.
    phase: Mutex<(u64, Phase)>,
    evict: tokio::sync::Notify,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            phase: Mutex::new((0, Phase::Idle)),
            evict: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Phase)> {
        self.phase
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn evictable(&self) -> bool {
        self.lock().1 != Phase::Busy
    }

    /// A request came in (its body already complete or not): its number.
    fn start(&self, body_done: bool) -> u64 {
        let mut p = self.lock();
        p.0 += 1;
        p.1 = if body_done { Phase::Busy } else { Phase::Body };
        p.0
    }

    /// Request `request` moves from `from` to `to` (not when another request came since, or
    /// it is in another phase).
    fn moved(&self, request: u64, from: Phase, to: Phase) {
        let mut p = self.lock();
        if *p == (request, from) {
            p.1 = to;
        }
    }
}

/// Connections in the order they were accepted, for eviction at the cap.
#[derive(Default)]
struct Conns {
    queue: Mutex<std::collections::VecDeque<Weak<Conn>>>,
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Weak<Conn>>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, c: &Arc<Conn>, cap: usize) {
        let mut q = self.lock();
        q.push_back(Arc::downgrade(c));
        if q.len() > 2 * cap.max(16) {
            q.retain(|w| w.strong_count() > 0);
        }
    }

    /// Close the oldest connection that is not busy with a request; false if none.
    fn evict_oldest(&self) -> bool {
        let mut q = self.lock();
        q.retain(|w| w.strong_count() > 0);
        let Some(i) = q
            .iter()
            .position(|w| w.upgrade().is_some_and(|c| c.evictable()))
        else {
            return false;
        };
        match q.remove(i).and_then(|w| w.upgrade()) {
            Some(c) => {
                c.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

fn out_of_fds(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// How often the accept loop, at the cap, tries to evict again while no room was made (the
/// connection it evicted became busy meanwhile).
const EVICT_AGAIN: Duration = Duration::from_secs(1);

/// Serve `app` on `listener` until `shutdown` turns true (see the module's doc). After shutdown,
/// open connections finish their current request and close.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let cap = limits.max_connections.clamp(1, 1 << 20);
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    let conns = Arc::new(Conns::default());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut last_warning: Option<std::time::Instant> = None;
    'accept: loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
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
        let permit = loop {
            if let Ok(p) = Arc::clone(&slots).try_acquire_owned() {
                break p;
            }
            conns.evict_oldest();
            tokio::select! {
                p = Arc::clone(&slots).acquire_owned() => match p {
                    Ok(p) => break p,
                    Err(_) => break 'accept,
                },
                _ = tokio::time::sleep(EVICT_AGAIN) => {}
                _ = shutdown.wait_for(|s| *s) => break 'accept,
            }
        };
        let _ = stream.set_nodelay(true);
        let conn_state = Arc::new(Conn::new());
        conns.push(&conn_state, cap);
        let (app, http, conns) = (app.clone(), http.clone(), Arc::clone(&conns));
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let c = Arc::clone(&conn_state);
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                answer(app.clone(), Arc::clone(&c), limits.body_timeout, peer, req)
            });
            let io = SendTimeout::new(stream, limits.send_timeout);
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(io), service);
            tokio::pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    _ = conn_state.evict.notified(), if !stopping => {
                        if conn_state.evictable() {
                            break;
                        }
                        // It became busy meanwhile: a candidate again once idle.
                        conns.push(&conn_state, cap);
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

/// Answer one request of connection `conn`: its body bounded by `body_timeout` (a body not
/// received in time is answered 408, and the connection closed), the connection's phase
/// followed (body, busy, idle again once the answer is sent).
fn answer(
    mut app: Router,
    conn: Arc<Conn>,
    body_timeout: Duration,
    peer: std::net::SocketAddr,
    req: hyper::Request<Incoming>,
) -> impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> {
    let (parts, body) = req.into_parts();
    let request = conn.start(body.is_end_stream());
    let late = Arc::new(AtomicBool::new(false));
    let body = TimedBody {
        inner: body,
        deadline: Box::pin(tokio::time::sleep(body_timeout)),
        conn: Arc::clone(&conn),
        request,
        late: Arc::clone(&late),
        done: false,
    };
    let mut req = hyper::Request::from_parts(parts, axum::body::Body::new(body));
    // The peer's address, for the `allow` rules of access control.
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(peer));
    let called = tower_service::Service::call(&mut app, req);
    async move {
        let mut response = called.await?;
        if late.load(Ordering::SeqCst) {
            response = (
                StatusCode::REQUEST_TIMEOUT,
                [("connection", "close")],
                format!(
                    "Request body not received within {}s",
                    body_timeout.as_secs_f64()
                ),
            )
                .into_response();
        }
        conn.moved(request, Phase::Body, Phase::Busy);
        Ok(response.map(|inner| {
            axum::body::Body::new(Sent {
                inner,
                conn,
                request,
            })
        }))
    }
}

/// Why a request body ended early.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received within its deadline")]
struct BodyTooSlow;

/// A request's body with a deadline for all of it; its end (or its being dropped unread) makes
/// the connection busy.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    conn: Arc<Conn>,
    request: u64,
    /// Set when the deadline passed (the answer is a 408).
    late: Arc<AtomicBool>,
    done: bool,
}

impl TimedBody {
    fn finish(&mut self) {
        self.done = true;
        self.conn.moved(self.request, Phase::Body, Phase::Busy);
    }
}

impl hyper::body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.finish();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if self.inner.is_end_stream() {
                    self.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.late.store(true, Ordering::SeqCst);
                    self.finish();
                    Poll::Ready(Some(Err(BodyTooSlow.into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TimedBody {
    fn drop(&mut self) {
        if !self.done {
            // Not read (the handler did not need it): the handler is at work.
            self.finish();
        }
    }
}

/// An answer's body; once sent (or dropped), the connection is idle again.
struct Sent {
    inner: axum::body::Body,
    conn: Arc<Conn>,
    request: u64,
}

impl hyper::body::Body for Sent {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.conn.moved(self.request, Phase::Busy, Phase::Idle);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Sent {
    fn drop(&mut self) {
        self.conn.moved(self.request, Phase::Busy, Phase::Idle);
    }
}

/// A connection's socket whose writes may stall for at most `timeout`: when the client accepts
/// nothing for that long, writing fails (`TimedOut`), which ends the connection.
struct SendTimeout<T> {
    inner: T,
    timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> SendTimeout<T> {
    fn new(inner: T, timeout: Duration) -> SendTimeout<T> {
        SendTimeout {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// A write that made progress (`Ready`) resets the clock; one that cannot (`Pending`)
    /// starts it, or fails once it ran out.
    fn check<R>(
        &mut self,
        polled: Poll<std::io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<R>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client accepted nothing for {}s", timeout.as_secs_f64()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(polled, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(polled, cx)
    }
}
