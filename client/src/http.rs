//! The HTTP requests `mistry build` and `mistry pipeline` share: the agent, and a JSON request
//! whose answer is read whole, with mistry's messages for an unreachable server and a timeout.

use std::time::Duration;

use anyhow::{bail, Result};

/// The environment variable that gives the server's token when `--token` is not given.
pub(crate) const TOKEN_ENV: &str = "MISTRY_TOKEN";

/// The token to send: `--token`, else `MISTRY_TOKEN` (not empty), else none.
pub(crate) fn token(flag: Option<&str>) -> Option<String> {
    flag.map(str::to_string)
        .or_else(|| std::env::var(TOKEN_ENV).ok())
        .filter(|t| !t.is_empty())
}

/// An agent that hands every status back (the caller turns them into messages), gives up
/// after `timeout`, and sends `token` (`Authorization: Bearer`) with every request when there
/// is one (a server with access control, docs/access.md).
pub(crate) fn agent(timeout: Duration, token: Option<String>) -> ureq::Agent {
    let mut config = ureq::config::Config::builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout));
    if let Some(token) = token {
        let value = format!("Bearer {token}");
        config = config.middleware(
            move |mut req: ureq::http::Request<ureq::SendBody>,
                  next: ureq::middleware::MiddlewareNext| {
                if let Ok(v) = ureq::http::HeaderValue::from_str(&value) {
                    req.headers_mut()
                        .insert(ureq::http::header::AUTHORIZATION, v);
                }
                next.handle(req)
            },
        );
    }
    ureq::Agent::new_with_config(config.build())
}

/// What is said when `timeout` passes before the answer: `{what} did not finish after 1h`.
pub(crate) fn timed_out(what: &str, timeout: Duration) -> anyhow::Error {
    anyhow::anyhow!(
        "{what} did not finish after {}",
        crate::duration::format_go(timeout)
    )
}

/// A request to the server at `base` that got no answer: the timeout's message, or that the
/// server cannot be reached.
pub(crate) fn send_error(
    e: ureq::Error,
    base: &str,
    what: &str,
    timeout: Duration,
) -> anyhow::Error {
    match e {
        ureq::Error::Timeout(_) => timed_out(what, timeout),
        e => anyhow::anyhow!("cannot reach the mistry server at {base}: {e}"),
    }
}

/// Send `body` (JSON; a GET when `None`) to `url` on the server at `base`, and read the whole
/// answer: (status, text). `what` names the awaited thing in the timeout message.
pub(crate) fn request(
    agent: &ureq::Agent,
    base: &str,
    url: &str,
    body: Option<&str>,
    what: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let sent = match body {
        Some(body) => agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(body),
        None => agent
            .get(url)
            .header("Accept", "application/json")
            .header("Content-Type", "application/json")
            .call(),
    };
    let mut resp = sent.map_err(|e| send_error(e, base, what, timeout))?;
    let status = resp.status().as_u16();
    let text = match resp
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_string()
    {
        Ok(t) => t,
        Err(ureq::Error::Timeout(_)) => return Err(timed_out(what, timeout)),
        Err(e) => bail!("reading the server's answer: {e}"),
    };
    Ok((status, text))
}

/// The error of an answer other than `201 Created`, as `mistry build` says it.
pub(crate) fn refused(status: u16, text: &str) -> anyhow::Error {
    match status {
        503 => anyhow::anyhow!("Server is overloaded; try again later"),
        401 => anyhow::anyhow!(
            "The server wants a valid token (--token or {TOKEN_ENV}): {}",
            text.trim()
        ),
        403 => anyhow::anyhow!("The server refused: {}", text.trim()),
        _ => anyhow::anyhow!("{}", text.trim()),
    }
}
