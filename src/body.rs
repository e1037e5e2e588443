//! Response bodies that blocking code writes as they are sent, and the answers (JSON, the web
//! view's page) that the server's routes share (its errors are `server::ApiError`'s).

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

/// `value` as JSON with `status` (the error when it does not serialize: the server answers 500).
pub(crate) fn json(
    status: StatusCode,
    value: &impl serde::Serialize,
) -> Result<Response, serde_json::Error> {
    let body = serde_json::to_vec(value)?;
    Ok((status, [("content-type", "application/json")], body).into_response())
}

/// `&`, `<`, `>`, `"` and `'` as entities: everything from a project, a request or a record that
/// goes into a server-rendered page or SVG goes through this.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
