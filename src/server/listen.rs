//! The HTTP listener: HTTP/1.1 with a header-read (and idle) timeout and a cap on connections,
//! evicting the oldest connection that has not sent a request yet at the cap; running out of
//! file descriptors backs off instead of spinning.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::Router;

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
    waiting: AtomicBool,
    evict: tokio::sync::Notify,
}

/// Connections in the order they were accepted, for eviction at the cap.
#[derive(Default)]
struct Conns {
    queue: Mutex<std::collections::VecDeque<Weak<Fresh>>>,
}

impl Conns {
    fn push(&self, c: &Arc<Fresh>, cap: usize) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.push_back(Arc::downgrade(c));
        if q.len() > 2 * cap.max(16) {
            q.retain(|w| {
                w.upgrade()
                    .is_some_and(|c| c.waiting.load(Ordering::SeqCst))
            });
        }
    }

    /// Close the oldest connection still waiting for its first request; false if none.
    fn evict_oldest(&self) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(w) = q.pop_front() {
            if let Some(c) = w.upgrade() {
                if c.waiting.load(Ordering::SeqCst) {
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
            waiting: AtomicBool::new(true),
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
