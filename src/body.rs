//! Response bodies that blocking code writes as they are sent.

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::stream;

/// A response whose body blocking code writes: `produce` runs on a blocking thread with a
/// buffered writer whose 64 KiB chunks go to the client as they come, so memory stays flat
/// however large the body. An error (the client going away included) is passed to `failed`
/// and ends the body with it.
pub fn blocking_body(
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

/// The web view's page, embedded (its script draws every page: the job list, a job, a run).
pub const INDEX_HTML: &str = include_str!("web/index.html");

/// `value` as JSON with `status` (500 if it does not serialize).
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [("content-type", "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// 503 `Service unavailable: <e>` (e.g. the cluster's database does not answer).
pub fn unavailable(e: &impl std::fmt::Display) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("Service unavailable: {e}"),
    )
        .into_response()
}
