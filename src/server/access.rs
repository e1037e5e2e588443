//! Access control on every route, in two places only: [`authenticate`], a layer around the
//! whole router, says who sent each request ([`Caller`], from `Authorization: Bearer <token>`,
//! `Basic` with the token as password for browsers, an `allow` rule for the peer's address, or
//! the cluster token) and answers 401 when it cannot; [`require`] (and [`read_project`], the
//! route layer of the routes with a `{project}` in their path) answers 403 when the caller's
//! grant does not cover a project. Lists ask [`Caller::allows`] of each entry, so that nothing
//! of another project shows. Every refusal is an audit line (`tracing` target `audit`).
//!
//! Public without a token: `/static/*` (the web view's script and style, no data).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Html;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::ApiError;
use crate::access::{Caller, Grant, Policy, Refused, Scope};

/// The token in `Authorization`: `Bearer <token>`, or `Basic` with the token as the password
/// (a browser's sign-in dialog). A header of another form is a wrong token (`Some("")`).
fn token(headers: &HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let value = headers.get(axum::http::header::AUTHORIZATION)?;
    let value = value.to_str().unwrap_or("").trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        return Some(decoded.split_once(':').map_or("", |(_, p)| p).to_string());
    }
    Some(String::new())
}

/// Who sent the request: the token's grant, an allow rule's, another agent, or anyone when
/// access control is off; 401 (and an audit line) when none.
pub(super) async fn authenticate(
    State(access): State<Arc<Policy>>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    if path.starts_with("/static/") || path == "/signin" {
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let token = token(req.headers());
    // The web view's sign-in: a session cookie (when no Authorization is sent); its
    // state-changing requests must send the session's CSRF token.
    if token.is_none() {
        let now = crate::access::now();
        if let Some(session) =
            cookie(req.headers(), SESSION_COOKIE).and_then(|id| access.session(&id, now))
        {
            if !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
                let sent = req
                    .headers()
                    .get("x-csrf-token")
                    .map(|v| v.as_bytes().to_vec())
                    .unwrap_or_default();
                if !bool::from(sent.ct_eq(session.csrf.as_bytes())) {
                    tracing::warn!(target: "audit", status = 403, caller = %session.grant.name, method = %req.method(), path = %req.uri().path(), "refused: a signed-in request without its CSRF token");
                    return ApiError::Csrf.into_response();
                }
            }
            let (grant, hash) = (Arc::clone(&session.grant), session.token_hash);
            req.extensions_mut().insert(Caller::Granted(session.grant));
            let resp = next.run(req).await;
            return until_revoked(resp, access, grant, hash);
        }
    }
    let browser = accepts_html(req.headers());
    match access.authenticate(token.as_deref(), peer, crate::access::now()) {
        Ok(caller) => {
            let guard = match (&caller, &token) {
                (Caller::Granted(g), Some(t)) => {
                    Some((Arc::clone(g), crate::access::hash_token(t)))
                }
                _ => None,
            };
            req.extensions_mut().insert(caller);
            let resp = next.run(req).await;
            match guard {
                Some((grant, hash)) => until_revoked(resp, access, grant, hash),
                None => resp,
            }
        }
        Err(why) => {
            let token_name = match &why {
                Refused::Expired(name) => name.as_str(),
                _ => "-",
            };
            tracing::warn!(
                target: "audit",
                status = 401,
                reason = %why,
                expired_token = token_name,
                peer = ?peer,
                method = %req.method(),
                path = %req.uri().path(),
                "refused: not authenticated"
            );
            if browser {
                // A browser gets the way to sign in (no Basic challenge: no dialog).
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer realm=\"mistry\"")],
                    Html(signin_page(
                        "<p>Sign in first: <a href=\"/signin\">sign in with a token</a>.</p>",
                    )),
                )
                    .into_response();
            }
            ApiError::Unauthorized(why).into_response()
        }
    }
}

/// The session cookie's name (`HttpOnly`).
const SESSION_COOKIE: &str = "mistry_session";
/// The CSRF cookie's name (readable by the web view's script, which sends it back in
/// `X-CSRF-Token`).
const CSRF_COOKIE: &str = "mistry_csrf";

/// The value of cookie `name`, if the request sent one.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_string())
}

/// Whether the request is a browser's page load (`Accept: text/html`).
fn accepts_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// The sign-in page around `body` (a small server-rendered page of its own).
fn signin_page(body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" \
         content=\"width=device-width, initial-scale=1\"><title>Sign in · mistry</title>\
         <link rel=\"stylesheet\" href=\"/static/style.css\"></head><body><main id=\"signin\">\
         <h1>Sign in to mistry</h1>{body}</main></body></html>"
    )
}

/// The sign-in form, after `error` (empty: none).
fn signin_form(error: &str) -> String {
    signin_page(&format!(
        "{error}<form method=\"post\" action=\"/signin\"><p><label for=\"token\">Token</label> \
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" \
         required autofocus> <button type=\"submit\">Sign in</button></p></form>\
         <p>Tokens come from your operator (<code>mistryd token create</code>).</p>"
    ))
}

/// The routes of the web view's sign-in: `GET /signin` (the form), `POST /signin` (a token →
/// the session and CSRF cookies), `POST /signout`.
pub(super) fn routes() -> axum::Router<Arc<dyn crate::service::Jobs>> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route(
            "/signin",
            get(|| async { Html(signin_form("")) }).post(sign_in),
        )
        .route("/signout", post(sign_out))
}

/// `Set-Cookie` values for a session (`max_age` 0: removed).
fn cookies(id: &str, csrf: &str, max_age: i64, secure: bool) -> [String; 2] {
    let secure = if secure { "; Secure" } else { "" };
    [
        format!(
            "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}"
        ),
        format!("{CSRF_COOKIE}={csrf}; SameSite=Strict; Path=/; Max-Age={max_age}{secure}"),
    ]
}

async fn sign_in(
    State(jobs): State<Arc<dyn crate::service::Jobs>>,
    form: Result<
        axum::extract::Form<HashMap<String, String>>,
        axum::extract::rejection::FormRejection,
    >,
) -> Response {
    let policy = Arc::clone(&jobs.config().access);
    let token = form
        .ok()
        .and_then(|axum::extract::Form(f)| f.get("token").cloned())
        .unwrap_or_default();
    match policy.sign_in(token.trim(), crate::access::now()) {
        Ok(s) => {
            tracing::info!(target: "audit", caller = %s.name, "signed in to the web view");
            let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
            for c in cookies(&s.id, &s.csrf, s.max_age, policy.behind_https()) {
                if let Ok(v) = header::HeaderValue::from_str(&c) {
                    resp.headers_mut().append(header::SET_COOKIE, v);
                }
            }
            resp
        }
        Err(why) => {
            tracing::warn!(target: "audit", status = 401, reason = %why, "refused: a web sign-in");
            (
                StatusCode::UNAUTHORIZED,
                Html(signin_form(
                    "<p role=\"alert\" class=\"error\">That token is not valid.</p>",
                )),
            )
                .into_response()
        }
    }
}

/// `POST /signout`: the session ends, its cookies are removed.
async fn sign_out(
    State(jobs): State<Arc<dyn crate::service::Jobs>>,
    headers: HeaderMap,
) -> Response {
    let policy = Arc::clone(&jobs.config().access);
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        policy.sign_out(&id);
    }
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/signin")]).into_response();
    for c in cookies("", "", 0, policy.behind_https()) {
        if let Ok(v) = header::HeaderValue::from_str(&c) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

/// The longest a stream sleeps before it looks at its token's expiry again.
const EXPIRY_CHECK: std::time::Duration = std::time::Duration::from_secs(3600);

/// `resp` with a body that ends when the token it was answered to is revoked (a reload that no
/// longer grants it the same), or expires: a log followed, a run's events or a long download
/// must not outlive the token. Each end is an audit line.
fn until_revoked(
    resp: Response,
    policy: Arc<Policy>,
    grant: Arc<Grant>,
    hash: [u8; 32],
) -> Response {
    use futures_util::StreamExt;
    let (parts, body) = resp.into_parts();
    let changes = policy.changes();
    let inner = body.into_data_stream();
    let state = Some((inner, changes, grant));
    let stream = futures_util::stream::unfold(state, move |state| {
        let policy = Arc::clone(&policy);
        async move {
            let (mut inner, mut changes, mut grant) = state?;
            loop {
                let left = grant
                    .expires
                    .map(|e| u64::try_from(e - crate::access::now()).unwrap_or(0));
                let wait = std::time::Duration::from_secs(left.unwrap_or(0)).min(EXPIRY_CHECK);
                tokio::select! {
                    item = inner.next() => {
                        return item.map(|i| (i, Some((inner, changes, grant))));
                    }
                    Ok(()) = changes.changed() => {}
                    () = tokio::time::sleep(wait), if left.is_some() => {}
                }
                match policy
                    .now()
                    .still_grants(&hash, &grant, crate::access::now())
                {
                    Some(g) => grant = g,
                    None => {
                        tracing::warn!(target: "audit", caller = %grant.name, "ended a response: its token was revoked or expired");
                        return None;
                    }
                }
            }
        }
    });
    Response::from_parts(parts, axum::body::Body::from_stream(stream))
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Response;

    /// The caller [`authenticate`] found; a route outside its layer refuses (fails closed).
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Caller, Response> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            tracing::warn!(target: "audit", status = 401, method = %parts.method, path = %parts.uri.path(), "refused: a route outside the authentication layer");
            ApiError::Unauthorized(Refused::Missing).into_response()
        })
    }
}

/// 403 (and an audit line) unless `caller` has `scope` on `project`.
pub(super) fn require(caller: &Caller, scope: Scope, project: &str) -> Result<(), ApiError> {
    if caller.allows(scope, project) {
        return Ok(());
    }
    tracing::warn!(target: "audit", status = 403, caller = caller.name(), scope = scope.as_str(), %project, "refused: no grant");
    Err(ApiError::Forbidden {
        scope,
        project: Some(project.to_string()),
    })
}

/// 403 (and an audit line) unless `caller` may use the server-wide routes (`what`); an admin's
/// use of them is an audit line too.
pub(super) fn require_admin(caller: &Caller, what: &str) -> Result<(), ApiError> {
    if caller.is_admin() {
        if let Caller::Granted(g) = caller {
            tracing::info!(target: "audit", caller = %g.name, %what, "admin request");
        }
        return Ok(());
    }
    tracing::warn!(target: "audit", status = 403, caller = caller.name(), %what, "refused: not admin");
    Err(ApiError::Forbidden {
        scope: Scope::Admin,
        project: None,
    })
}

/// 403 unless `caller` is another agent (the cluster token), when agents authenticate each
/// other; else as [`require_admin`].
pub(super) fn require_agent(access: &Policy, caller: &Caller, what: &str) -> Result<(), ApiError> {
    if !access.has_cluster_token() {
        return require_admin(caller, what);
    }
    if matches!(caller, Caller::Agent) {
        return Ok(());
    }
    tracing::warn!(target: "audit", status = 403, caller = caller.name(), %what, "refused: not an agent of the cluster");
    Err(ApiError::Forbidden {
        scope: Scope::Admin,
        project: None,
    })
}

/// The route layer of the routes with `{project}` in their path: `read` on it.
pub(super) async fn read_project(
    caller: Caller,
    Path(params): Path<HashMap<String, String>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(project) = params.get("project") else {
        // Every route under this layer names a project; one that does not is refused.
        tracing::warn!(target: "audit", status = 403, caller = caller.name(), path = %req.uri().path(), "refused: a project's route without a project");
        return ApiError::Forbidden {
            scope: Scope::Read,
            project: None,
        }
        .into_response();
    };
    match require(&caller, Scope::Read, project) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Whether a `<project>/<id>` key names a project `caller` may read.
pub(super) fn reads_key(caller: &Caller, key: &str) -> bool {
    key.split_once('/')
        .is_some_and(|(project, _)| caller.allows(Scope::Read, project))
}

#[cfg(test)]
mod tests {
    //! Every route class through the router in process, with the fake jobs: no token, a wrong
    //! one, another project's, each scope, an expired one; exact statuses, and bodies that do
    //! not name projects the token may not read.

    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower_service::Service as _;

    use crate::access::hash_token;
    use crate::config::Config;
    use crate::service::fake::{FakeHandle, FakeJobs};

    struct App {
        _dir: tempfile::TempDir,
        router: axum::Router,
    }

    fn entry(name: &str, scope: &str, project: &str) -> serde_json::Value {
        serde_json::json!({"name": name, "hash": hex::encode(hash_token(&format!("tok-{name}"))),
                           "scopes": [scope], "projects": [project]})
    }

    fn app(tokens: &[serde_json::Value]) -> App {
        let dir = tempfile::tempdir().unwrap();
        let (projects, build) = (dir.path().join("projects"), dir.path().join("build"));
        std::fs::create_dir_all(projects.join("pipelines")).unwrap();
        std::fs::create_dir_all(&build).unwrap();
        for p in ["app", "hidden-proj"] {
            std::fs::create_dir_all(projects.join(p)).unwrap();
            std::fs::write(projects.join(p).join("Dockerfile"), "FROM busybox\n").unwrap();
        }
        std::fs::write(
            projects.join("pipelines/open-pipe.json"),
            r#"{"jobs": {"a": {"project": "app"}}}"#,
        )
        .unwrap();
        std::fs::write(
            projects.join("pipelines/mixed-pipe.json"),
            r#"{"jobs": {"a": {"project": "app"}, "b": {"project": "hidden-proj"}}}"#,
        )
        .unwrap();
        std::fs::write(
            projects.join("pipelines/trig-pipe.json"),
            r#"{"jobs": {"a": {"project": "app", "params": {"k": "trig"}}},
                "on_success": [{"pipeline": "hidden-pipe"}]}"#,
        )
        .unwrap();
        std::fs::write(
            projects.join("pipelines/hidden-pipe.json"),
            r#"{"jobs": {"h": {"project": "hidden-proj"}}}"#,
        )
        .unwrap();
        std::fs::write(
            projects.join("pipelines/broken-pipe.json"),
            r#"{"jobs": {"a": {"project": "hidden-proj", "nope": 1}}}"#,
        )
        .unwrap();
        let mut expired = entry("old", "admin", "*");
        expired["expires"] = "2001-01-01T00:00:00Z".into();
        let mut all = tokens.to_vec();
        all.push(expired);
        let text = serde_json::json!({"projects_path": projects, "build_path": build,
                                      "tokens": all});
        let cfg = Config::parse(&text.to_string(), &dir.path().join("config.json")).unwrap();
        let jobs = FakeHandle(FakeJobs::new(cfg, &["app", "hidden-proj"], true));
        App {
            _dir: dir,
            router: super::super::router(Arc::new(jobs)),
        }
    }

    fn standard() -> App {
        app(&[
            entry("reader", "read", "app"),
            entry("builder", "build", "ap*"),
            entry("admin", "admin", "*"),
            entry("other", "admin", "hidden-*"),
        ])
    }

    impl App {
        async fn send(
            &self,
            method: &str,
            uri: &str,
            token: Option<&str>,
            body: &str,
        ) -> (StatusCode, Option<String>, String) {
            let mut req = Request::builder().method(method).uri(uri);
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer tok-{t}"));
            }
            let req = req.body(Body::from(body.to_string())).unwrap();
            let resp = match self.router.clone().call(req).await {
                Ok(r) => r,
                Err(e) => match e {},
            };
            let status = resp.status();
            let challenge = resp
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_string());
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            (
                status,
                challenge,
                String::from_utf8_lossy(&body).into_owned(),
            )
        }

        async fn status(&self, method: &str, uri: &str, token: Option<&str>) -> StatusCode {
            self.send(method, uri, token, "").await.0
        }
    }

    const JOB: &str = r#"{"project": "app", "params": {"x": "1"}}"#;

    #[tokio::test]
    async fn no_token_wrong_token_and_expired_token_are_401_everywhere_but_static() {
        let a = standard();
        for uri in [
            "/",
            "/index/",
            "/job/app/x",
            "/log/app/x",
            "/artifacts/app/x",
            "/api/job/app/x",
            "/api/logtail/app/x",
            "/agents",
            "/api/agents/jobs",
            "/api/cluster/jobs",
            "/api/build/app/x",
            "/metrics",
            "/pipelines",
            "/pipelines/index/",
            "/pipelines/jobs/",
            "/pipeline/p/r",
            "/pipeline/p/r/events",
            "/no-such-route",
        ] {
            for token in [None, Some("wrong"), Some("old")] {
                let (status, challenge, body) = a.send("GET", uri, token, "").await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri} {token:?}");
                assert!(challenge.unwrap().starts_with("Bearer"), "{uri}");
                assert!(!body.contains("old"), "{uri}: {body}");
            }
        }
        let (status, _, _) = a.send("POST", "/jobs", None, JOB).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, _) = a.send("POST", "/jobs", Some("wrong"), JOB).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            a.status("GET", "/static/app.js", None).await,
            StatusCode::OK
        );
        // Basic with the token as password (a browser) is a token too.
        let req = Request::builder()
            .uri("/api/job/app/x")
            .header("authorization", "Basic dTp0b2stcmVhZGVy") // u:tok-reader
            .body(Body::empty())
            .unwrap();
        let resp = a.router.clone().call(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_projects_routes_need_read_on_it() {
        let a = standard();
        for route in ["job", "log", "artifacts", "api/job", "api/logtail"] {
            let uri = format!("/{route}/hidden-proj/x");
            for t in ["reader", "builder"] {
                let (status, _, body) = a.send("GET", &uri, Some(t), "").await;
                assert_eq!(status, StatusCode::FORBIDDEN, "{uri} {t}");
                assert_eq!(
                    body, "Forbidden: this token has no read scope on project hidden-proj",
                    "{uri}"
                );
            }
            // Allowed through to the handler: the fake knows no such job.
            let expected = if route == "log" {
                StatusCode::NO_CONTENT
            } else {
                StatusCode::NOT_FOUND
            };
            let uri = format!("/{route}/app/x");
            for t in ["reader", "builder", "admin"] {
                assert_eq!(a.status("GET", &uri, Some(t)).await, expected, "{uri} {t}");
            }
            assert_eq!(
                a.status("GET", &uri, Some("other")).await,
                StatusCode::FORBIDDEN
            );
        }
    }

    #[tokio::test]
    async fn jobs_need_build_on_their_project() {
        let a = standard();
        let (status, _, body) = a.send("POST", "/jobs", Some("reader"), JOB).await;
        assert_eq!(
            (status, body.as_str()),
            (
                StatusCode::FORBIDDEN,
                "Forbidden: this token has no build scope on project app"
            )
        );
        assert_eq!(
            a.send("POST", "/jobs", Some("other"), JOB).await.0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            a.send("POST", "/jobs", Some("builder"), JOB).await.0,
            StatusCode::CREATED
        );
        assert_eq!(
            a.send("POST", "/jobs", Some("admin"), JOB).await.0,
            StatusCode::CREATED
        );
        // An unknown project is refused before anyone learns it does not exist.
        let unknown = r#"{"project": "nope", "params": {}}"#;
        assert_eq!(
            a.send("POST", "/jobs", Some("builder"), unknown).await.0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            a.send("POST", "/jobs", Some("admin"), unknown).await.0,
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn server_wide_routes_need_admin() {
        let a = standard();
        for uri in ["/metrics", "/api/build/app/x"] {
            for t in ["reader", "builder"] {
                assert_eq!(
                    a.status("GET", uri, Some(t)).await,
                    StatusCode::FORBIDDEN,
                    "{uri} {t}"
                );
            }
        }
        assert_eq!(
            a.status("GET", "/metrics", Some("admin")).await,
            StatusCode::OK
        );
        // The fake exports nothing: past the check, its error.
        assert_ne!(
            a.status("GET", "/api/build/app/x", Some("admin")).await,
            StatusCode::FORBIDDEN
        );
        let req = |t: &str| {
            Request::builder()
                .uri("/agents")
                .header("accept", "application/json")
                .header("authorization", format!("Bearer tok-{t}"))
                .body(Body::empty())
                .unwrap()
        };
        let r = a.router.clone().call(req("reader")).await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let r = a.router.clone().call(req("admin")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        // The web view's page itself is for anyone signed in.
        assert_eq!(
            a.status("GET", "/agents", Some("reader")).await,
            StatusCode::OK
        );
        assert_eq!(a.status("GET", "/", Some("reader")).await, StatusCode::OK);
    }

    #[tokio::test]
    async fn lists_answer_with_what_the_token_reads() {
        let a = standard();
        for uri in [
            "/index/",
            "/pipelines",
            "/pipelines/index/",
            "/pipelines/jobs/",
        ] {
            let (status, _, body) = a.send("GET", uri, Some("reader"), "").await;
            assert_eq!(status, StatusCode::OK, "{uri}");
            assert!(!body.contains("hidden"), "{uri}: {body}");
        }
        let (_, _, body) = a.send("GET", "/pipelines", Some("reader"), "").await;
        assert!(
            body.contains("open-pipe") && !body.contains("mixed-pipe"),
            "{body}"
        );
        let (_, _, body) = a.send("GET", "/pipelines", Some("admin"), "").await;
        assert!(
            body.contains("open-pipe") && body.contains("mixed-pipe"),
            "{body}"
        );
        // Starting a run needs build on each of its projects (a pipeline of a project the
        // caller may not read does not exist for it: pipelines_of_hidden_projects_look_like_none).
        let (status, _, _) = a
            .send(
                "POST",
                "/pipelines?async",
                Some("reader"),
                r#"{"pipeline": "open-pipe"}"#,
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, _, body) = a
            .send(
                "POST",
                "/pipelines?async",
                Some("builder"),
                r#"{"pipeline": "open-pipe"}"#,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, _, body) = a
            .send(
                "GET",
                "/api/agents/jobs?project=hidden-proj&id=x",
                Some("reader"),
                "",
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        let (status, _, _) = a
            .send(
                "GET",
                "/api/cluster/jobs?project=hidden-proj",
                Some("reader"),
                "",
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

    impl App {
        /// `GET uri` with `Accept: application/json`: status and body.
        async fn get_json(&self, uri: &str, token: &str) -> (StatusCode, String) {
            let req = Request::builder()
                .uri(uri)
                .header("accept", "application/json")
                .header("authorization", format!("Bearer tok-{token}"))
                .body(Body::empty())
                .unwrap();
            let resp = self.router.clone().call(req).await.unwrap();
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        }

        /// A pipeline run by the admin, to its end: its record.
        async fn run(&self, pipeline: &str) -> serde_json::Value {
            let body = serde_json::json!({ "pipeline": pipeline }).to_string();
            let (status, _, text) = self.send("POST", "/pipelines", Some("admin"), &body).await;
            assert_eq!(status, StatusCode::CREATED, "{text}");
            serde_json::from_str(&text).unwrap()
        }
    }

    /// Review findings 2 and 3: a pipeline, or a run, of a project the caller may not read
    /// answers exactly as one that does not exist; no list or record links to it.
    #[tokio::test]
    async fn pipelines_of_hidden_projects_look_like_none() {
        let a = standard();
        let a = &a;
        let post = |name: &str| {
            let body = serde_json::json!({ "pipeline": name }).to_string();
            async move {
                a.send("POST", "/pipelines?async", Some("builder"), &body)
                    .await
            }
        };
        // Unknown, in error, or with a job of a hidden project: the same 404 and text.
        for name in ["no-such-pipe", "mixed-pipe", "broken-pipe"] {
            let (status, _, body) = post(name).await;
            assert_eq!(
                (status, body),
                (StatusCode::NOT_FOUND, format!("Unknown pipeline '{name}'")),
                "{name}"
            );
        }
        // An admin of every project sees the definition's error.
        let (status, _, body) = a
            .send(
                "POST",
                "/pipelines?async",
                Some("admin"),
                r#"{"pipeline": "broken-pipe"}"#,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        // Readable, but its success triggers a hidden project's pipeline: 403, naming none.
        let (status, _, body) = post("trig-pipe").await;
        assert_eq!(
            (status, body.as_str()),
            (
                StatusCode::FORBIDDEN,
                "Forbidden: this needs the build scope"
            )
        );

        // Runs: one of app and hidden-proj, one of app that triggers one of hidden-proj.
        let mixed = a.run("mixed-pipe").await;
        let trig = a.run("trig-pipe").await;
        let (mixed_run, trig_run) = (
            mixed["run"].as_str().unwrap().to_string(),
            trig["run"].as_str().unwrap().to_string(),
        );
        let hidden_run = trig["triggered"][0]["run"].as_str().unwrap().to_string();
        assert_eq!(trig["triggered"][0]["pipeline"], "hidden-pipe", "{trig}");
        // The admin sees the links.
        let (status, body) = a
            .get_json(&format!("/pipeline/trig-pipe/{trig_run}"), "admin")
            .await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("hidden-pipe"), "{body}");

        // The reader of app: the hidden runs are unknown, as a run that never was.
        let fake = "f".repeat(64);
        for (name, run) in [
            ("mixed-pipe", &mixed_run),
            ("hidden-pipe", &hidden_run),
            ("hidden-pipe", &fake),
        ] {
            for suffix in ["", "/events"] {
                let uri = format!("/pipeline/{name}/{run}{suffix}");
                let want = (
                    StatusCode::NOT_FOUND,
                    format!("Unknown pipeline run {name}/{run}"),
                );
                assert_eq!(a.get_json(&uri, "reader").await, want, "{uri}");
                let (status, _, body) = a.send("GET", &uri, Some("reader"), "").await;
                assert_eq!((status, body), want, "{uri}");
            }
        }
        // Its own run shows, without the link to the hidden run it triggered.
        let uri = format!("/pipeline/trig-pipe/{trig_run}");
        let (status, body) = a.get_json(&uri, "reader").await;
        assert_eq!(status, StatusCode::OK);
        let rec: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(rec["triggered"], serde_json::json!([]), "{rec}");
        for uri in [uri.clone(), format!("{uri}/events")] {
            let (status, _, body) = a.send("GET", &uri, Some("reader"), "").await;
            assert_eq!(status, StatusCode::OK, "{uri}");
            assert!(body.contains("trig-pipe"), "{uri}: {body}");
            assert!(!body.contains("hidden"), "{uri}: {body}");
        }
        // The lists: app's job of the mixed run is not linked to it.
        let (status, body) = a.get_json("/pipelines/jobs/", "reader").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(&trig_run), "{body}");
        assert!(
            !body.contains("mixed") && !body.contains("hidden"),
            "{body}"
        );
        let (_, body) = a.get_json("/pipelines/jobs/", "admin").await;
        assert!(body.contains(&mixed_run), "{body}");
        let (status, body) = a.get_json("/pipelines/index/", "reader").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(&trig_run), "{body}");
        assert!(
            !body.contains("mixed") && !body.contains("hidden"),
            "{body}"
        );
        // The web view's routes of a pipeline (the review of the new pages): its definition
        // names no hidden pipeline its successes start, its history no hidden run.
        for (uri, shows) in [
            ("/api/pipelines/trig-pipe", "\"on_success\":[]"),
            ("/api/pipelines/trig-pipe/runs", trig_run.as_str()),
        ] {
            let (status, body) = a.get_json(uri, "reader").await;
            assert_eq!(status, StatusCode::OK, "{uri}: {body}");
            assert!(body.contains(shows), "{uri}: {body}");
            assert!(!body.contains("hidden"), "{uri}: {body}");
            let (_, body) = a.get_json(uri, "admin").await;
            assert!(body.contains("hidden-pipe"), "{uri}: {body}");
        }
    }

    impl App {
        /// `method uri` with `headers` and `body`: status, headers, body.
        async fn raw(
            &self,
            method: &str,
            uri: &str,
            headers: &[(&str, &str)],
            body: &str,
        ) -> (StatusCode, axum::http::HeaderMap, String) {
            let mut req = Request::builder().method(method).uri(uri);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let resp = self
                .router
                .clone()
                .call(req.body(Body::from(body.to_string())).unwrap())
                .await
                .unwrap();
            let (status, headers) = (resp.status(), resp.headers().clone());
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            (status, headers, String::from_utf8_lossy(&body).into_owned())
        }

        /// Sign in with token `tok-<name>`: the `Cookie` header's value and the CSRF token.
        async fn sign_in(&self, name: &str) -> (String, String) {
            let form = [("content-type", "application/x-www-form-urlencoded")];
            let (status, headers, body) = self
                .raw("POST", "/signin", &form, &format!("token=tok-{name}"))
                .await;
            assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
            let set: Vec<&str> = headers
                .get_all("set-cookie")
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            let value = |name: &str| {
                set.iter()
                    .find_map(|c| c.strip_prefix(&format!("{name}=")))
                    .and_then(|c| c.split(';').next())
                    .unwrap()
                    .to_string()
            };
            let (id, csrf) = (value("mistry_session"), value("mistry_csrf"));
            (format!("mistry_session={id}; mistry_csrf={csrf}"), csrf)
        }
    }

    /// The web view's sign-in: a form of its own, a session cookie (never the token) and a CSRF
    /// token that state-changing requests must send; sign-out ends the session.
    #[tokio::test]
    async fn the_web_view_signs_in_with_a_cookie_and_csrf() {
        let a = standard();
        let (status, _, body) = a.send("GET", "/signin", None, "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("<label for=\"token\">Token</label>")
                && body.contains("<form method=\"post\" action=\"/signin\">"),
            "{body}"
        );
        let form = [("content-type", "application/x-www-form-urlencoded")];
        let (status, headers, body) = a.raw("POST", "/signin", &form, "token=nope").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(headers.get("set-cookie").is_none());
        assert!(body.contains("role=\"alert\""), "{body}");

        let (status, headers, _) = a.raw("POST", "/signin", &form, "token=tok-builder").await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_eq!(headers["location"], "/");
        let set: Vec<String> = headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        assert_eq!(set.len(), 2, "{set:?}");
        assert!(
            set[0].starts_with("mistry_session=")
                && set[0].ends_with("; HttpOnly; SameSite=Strict; Path=/; Max-Age=43200"),
            "{set:?}"
        );
        assert!(
            set[1].starts_with("mistry_csrf=")
                && set[1].ends_with("; SameSite=Strict; Path=/; Max-Age=43200"),
            "{set:?}"
        );
        assert!(!set.iter().any(|c| c.contains("tok-builder")), "{set:?}");

        let (cookie, csrf) = a.sign_in("builder").await;
        let with = |extra: &[(&'static str, String)]| {
            let mut h = vec![("cookie", cookie.clone())];
            h.extend(extra.iter().cloned());
            h
        };
        let send = |method: &'static str, uri: &'static str, h: Vec<(&'static str, String)>| {
            let a = &a;
            async move {
                let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let body = if method == "POST" { JOB } else { "" };
                let (status, _, text) = a.raw(method, uri, &h, body).await;
                (status, text)
            }
        };
        assert_eq!(send("GET", "/index/", with(&[])).await.0, StatusCode::OK);
        assert_eq!(
            send("GET", "/api/job/hidden-proj/x", with(&[])).await.0,
            StatusCode::FORBIDDEN
        );
        let csrf_refusal = (
            StatusCode::FORBIDDEN,
            "Forbidden: a signed-in request must send its CSRF token (X-CSRF-Token)".to_string(),
        );
        assert_eq!(send("POST", "/jobs", with(&[])).await, csrf_refusal);
        assert_eq!(
            send("POST", "/jobs", with(&[("x-csrf-token", "f".repeat(64))])).await,
            csrf_refusal
        );
        assert_eq!(
            send("POST", "/jobs", with(&[("x-csrf-token", csrf.clone())]))
                .await
                .0,
            StatusCode::CREATED
        );
        // Another site's page, even with the token: the origin check.
        let cross = with(&[
            ("x-csrf-token", csrf.clone()),
            ("origin", "http://evil.example".into()),
            ("host", "mistry.example".into()),
        ]);
        assert_eq!(send("POST", "/jobs", cross).await.0, StatusCode::FORBIDDEN);
        // A cookie of no session: 401; a browser's page gets the way to sign in.
        let bad = vec![("cookie", "mistry_session=abc".to_string())];
        assert_eq!(
            send("GET", "/index/", bad.clone()).await.0,
            StatusCode::UNAUTHORIZED
        );
        let mut page = bad;
        page.push(("accept", "text/html".into()));
        let (status, body) = send("GET", "/", page).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(body.contains("<a href=\"/signin\">"), "{body}");
        // Sign-out (a state-changing request: with its CSRF token) ends the session.
        assert_eq!(send("POST", "/signout", with(&[])).await, csrf_refusal);
        let (status, headers, _) = a
            .raw(
                "POST",
                "/signout",
                &[("cookie", cookie.as_str()), ("x-csrf-token", csrf.as_str())],
                "",
            )
            .await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_eq!(headers["location"], "/signin");
        assert_eq!(
            send("GET", "/index/", with(&[])).await.0,
            StatusCode::UNAUTHORIZED
        );
    }

    /// The log lines of target `audit` written while the returned guard lives (this thread's).
    struct Audit(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Audit {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture_audit() -> (
        Arc<std::sync::Mutex<Vec<u8>>>,
        tracing::subscriber::DefaultGuard,
    ) {
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        let b = Arc::clone(&buf);
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("audit=info"))
            .with_ansi(false)
            .with_writer(move || Audit(Arc::clone(&b)))
            .finish();
        (buf, tracing::subscriber::set_default(subscriber))
    }

    /// Review finding 6 and the CSRF check: every refusal is an audit line, the fail-closed
    /// ones too (a route outside the authentication layer, a project's route without a
    /// project), and a signed-in request without its CSRF token.
    #[tokio::test]
    async fn every_refusal_is_an_audit_line() {
        let (buf, _guard) = capture_audit();
        let text = || String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
        // Outside the layer: no caller.
        let mut bare: axum::Router = axum::Router::new()
            .route(
                "/x",
                axum::routing::get(|_: crate::access::Caller| async { "no" }),
            )
            .route(
                "/y",
                axum::routing::get(|| async { "no" })
                    .route_layer(axum::middleware::from_fn(super::read_project)),
            )
            .layer(axum::middleware::from_fn(
                |mut req: axum::extract::Request, next: axum::middleware::Next| async move {
                    if req.uri().path() == "/y" {
                        req.extensions_mut().insert(crate::access::Caller::Open);
                    }
                    next.run(req).await
                },
            ));
        let get = |uri: &str| Request::builder().uri(uri).body(Body::empty()).unwrap();
        let r = bare.call(get("/x")).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(
            text().contains("refused: a route outside the authentication layer"),
            "{}",
            text()
        );
        let r = bare.call(get("/y")).await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(
            text().contains("refused: a project's route without a project"),
            "{}",
            text()
        );
        let a = standard();
        let (cookie, _) = a.sign_in("builder").await;
        let (status, _, _) = a
            .raw("POST", "/jobs", &[("cookie", cookie.as_str())], JOB)
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(
            text().contains("refused: a signed-in request without its CSRF token")
                && text().contains("caller=builder"),
            "{}",
            text()
        );
    }

    /// Write `tokens` as the tokens file `path` (its owner's).
    fn write_tokens(path: &std::path::Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Whether a streamed body ends (its run's events until then skipped; a hang fails after
    /// 30 s).
    async fn ends(
        body: &mut (impl futures_util::Stream<Item = Result<axum::body::Bytes, axum::Error>> + Unpin),
    ) -> bool {
        while next_chunk(body).await.is_some() {}
        true
    }

    /// The next chunk of a streamed body, or `None` at its end (a hang fails after 30 s).
    async fn next_chunk(
        body: &mut (impl futures_util::Stream<Item = Result<axum::body::Bytes, axum::Error>> + Unpin),
    ) -> Option<String> {
        use futures_util::StreamExt;
        let item = tokio::time::timeout(std::time::Duration::from_secs(30), body.next())
            .await
            .expect("the stream neither sent nor ended");
        item.map(|b| String::from_utf8_lossy(&b.unwrap()).into_owned())
    }

    /// Review finding 7 and the reload: a revoked token's open stream ends, its new requests
    /// get 401; an expired token's stream ends at its expiry; a tokens file in error keeps the
    /// tokens in force.
    #[tokio::test]
    async fn a_reload_revokes_tokens_and_ends_their_streams() {
        let dir = tempfile::tempdir().unwrap();
        let (projects, build) = (dir.path().join("projects"), dir.path().join("build"));
        std::fs::create_dir_all(projects.join("pipelines")).unwrap();
        std::fs::create_dir_all(projects.join("app")).unwrap();
        std::fs::create_dir_all(&build).unwrap();
        std::fs::write(projects.join("app/Dockerfile"), "FROM busybox\n").unwrap();
        std::fs::write(
            projects.join("pipelines/open-pipe.json"),
            r#"{"jobs": {"a": {"project": "app"}}}"#,
        )
        .unwrap();
        let tokens_file = dir.path().join("tokens.json");
        let mut soon = entry("soon", "read", "app");
        soon["expires"] = chrono::DateTime::from_timestamp(crate::access::now() + 2, 0)
            .unwrap()
            .to_rfc3339()
            .into();
        let all = [
            entry("reader", "read", "app"),
            entry("builder", "build", "app"),
            soon,
        ];
        write_tokens(
            &tokens_file,
            &serde_json::Value::from(all.to_vec()).to_string(),
        );
        let text = serde_json::json!({"projects_path": projects, "build_path": build,
                                      "tokens_file": "tokens.json"});
        let cfg = Config::parse(&text.to_string(), &dir.path().join("config.json")).unwrap();
        let policy = Arc::clone(&cfg.access);
        // Jobs stay queued: the run stays running, its events stream open.
        let jobs = FakeHandle(FakeJobs::new(cfg, &["app"], false));
        let a = App {
            _dir: dir,
            router: super::super::router(Arc::new(jobs)),
        };
        let (status, _, body) = a
            .send(
                "POST",
                "/pipelines?async",
                Some("builder"),
                r#"{"pipeline": "open-pipe"}"#,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let run: serde_json::Value = serde_json::from_str(&body).unwrap();
        let uri = format!(
            "/pipeline/open-pipe/{}/events",
            run["run"].as_str().unwrap()
        );
        let open = |t: &str| {
            Request::builder()
                .uri(&uri)
                .header("authorization", format!("Bearer tok-{t}"))
                .body(Body::empty())
                .unwrap()
        };
        let (reader_cookie, _) = a.sign_in("reader").await;
        let (soon_cookie, _) = a.sign_in("soon").await;
        let by_cookie = |c: &str| {
            let c = c.to_string();
            let a = &a;
            async move {
                a.raw("GET", "/pipelines", &[("cookie", c.as_str())], "")
                    .await
                    .0
            }
        };
        assert_eq!(by_cookie(&reader_cookie).await, StatusCode::OK);
        let mut streams = Vec::new();
        for t in ["reader", "builder", "soon"] {
            let resp = a.router.clone().call(open(t)).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{t}");
            let mut body = resp.into_body().into_data_stream();
            let first = next_chunk(&mut body).await.unwrap();
            assert!(first.contains("\"state\":\"running\""), "{first}");
            streams.push(body);
        }
        let mut soon_stream = streams.pop().unwrap();
        let mut builder_stream = streams.pop().unwrap();
        let mut reader_stream = streams.pop().unwrap();
        // The expiring token's stream ends at its expiry.
        assert!(ends(&mut soon_stream).await);
        // Its session ended with it.
        assert_eq!(by_cookie(&soon_cookie).await, StatusCode::UNAUTHORIZED);

        // The reader is revoked: its stream ends, its requests are refused; the builder's
        // stream goes on.
        write_tokens(
            &tokens_file,
            &serde_json::Value::from(vec![entry("builder", "build", "app")]).to_string(),
        );
        assert_eq!(policy.reload().unwrap(), (1, 0));
        assert!(ends(&mut reader_stream).await);
        assert_eq!(by_cookie(&reader_cookie).await, StatusCode::UNAUTHORIZED);
        assert_eq!(
            a.status("GET", "/pipelines", Some("reader")).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            a.status("GET", "/pipelines", Some("builder")).await,
            StatusCode::OK
        );
        // A file in error: the tokens in force stay (fails safe, not open).
        write_tokens(&tokens_file, "[{\"name\": ");
        assert!(policy.reload().is_err());
        assert_eq!(
            a.status("GET", "/pipelines", Some("builder")).await,
            StatusCode::OK
        );
        assert_eq!(
            a.status("GET", "/pipelines", Some("reader")).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            a.status("GET", "/pipelines", None).await,
            StatusCode::UNAUTHORIZED
        );
        // The builder's stream is still open: what came is events, and it did not end.
        loop {
            let next = tokio::time::timeout(
                std::time::Duration::from_millis(300),
                futures_util::StreamExt::next(&mut builder_stream),
            )
            .await;
            match next {
                Err(_) => break,
                Ok(Some(chunk)) => assert!(chunk.unwrap().starts_with(b"data: ")),
                Ok(None) => panic!("the builder's stream ended"),
            }
        }
    }

    #[tokio::test]
    async fn without_tokens_everything_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let (projects, build) = (dir.path().join("projects"), dir.path().join("build"));
        std::fs::create_dir_all(&projects).unwrap();
        std::fs::create_dir_all(&build).unwrap();
        let text = serde_json::json!({"projects_path": projects, "build_path": build});
        let cfg = Config::parse(&text.to_string(), &dir.path().join("config.json")).unwrap();
        let a = App {
            _dir: dir,
            router: super::super::router(Arc::new(FakeHandle(FakeJobs::new(cfg, &["app"], true)))),
        };
        assert_eq!(
            a.send("POST", "/jobs", None, JOB).await.0,
            StatusCode::CREATED
        );
        assert_eq!(a.status("GET", "/metrics", None).await, StatusCode::OK);
        assert_eq!(
            a.status("GET", "/api/job/app/x", Some("junk")).await,
            StatusCode::NOT_FOUND
        );
    }
}
