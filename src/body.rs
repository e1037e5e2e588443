//! Response bodies that blocking code writes as they are sent, and the answers (JSON, 503, the
//! web view's page) that the server's and the pipelines' routes share.

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::streams::{blocking_stream, ByteStream};

/// A response of `content_type` whose body is `bytes`.
pub(crate) fn stream_body(content_type: &'static str, bytes: ByteStream) -> Response {
    use futures_util::StreamExt;
    (
        [("content-type", content_type)],
        axum::body::Body::from_stream(bytes.map(|c| c.map(Bytes::from))),
    )
        .into_response()
}

/// A response whose body blocking code writes ([`blocking_stream`]): its 64 KiB chunks go to the
/// client as they come.
pub(crate) fn blocking_body(
    content_type: &'static str,
    produce: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()> + Send + 'static,
    failed: impl FnOnce(&std::io::Error) + Send + 'static,
) -> Response {
    stream_body(content_type, blocking_stream(produce, failed))
}

/// The web view's page, embedded (its script draws every page: the job list, a job, a run).
pub(crate) const INDEX_HTML: &str = include_str!("web/index.html");

/// `value` as JSON with `status` (500 if it does not serialize).
pub(crate) fn json(status: StatusCode, value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [("content-type", "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// 503 `Service unavailable: <e>` (e.g. the cluster's database does not answer).
pub(crate) fn unavailable(e: &impl std::fmt::Display) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("Service unavailable: {e}"),
    )
        .into_response()
}
