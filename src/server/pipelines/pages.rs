//! The pipelines' pages of the web view and the JSON they read (new routes: mistry's answers in
//! the parent module stay as they are):
//!
//! - `GET /pipelines` from a browser (`Accept` naming `text/html` and not `application/json`):
//!   the web view's list of pipelines ([`browser_page`], a layer in front of the JSON answer,
//!   which every other client still gets);
//! - `GET /pipeline/{name}`: a pipeline's page (its definition, its history, a form to start a
//!   run), drawn by `pipelines.js`;
//! - `GET /api/pipelines/{name}`: its definition (`{"name", "description", "params", "jobs":
//!   [{"name", "project", "needs"}], "on_success": [names]}`);
//! - `GET /api/pipelines/{name}/runs?page=N&per_page=M`: its runs, newest first, M (≤ 100,
//!   default 20) a page: `{"pipeline", "page", "per_page", "total", "runs": [records]}`.
//!
//! A pipeline is known to a caller who reads every project of its jobs (to anyone else it is
//! unknown: 404, the answer for a name that does not exist); its history lists the runs whose
//! every project the caller reads ([`super::sees_run`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};

use super::{esc, sees_run, ApiError, Visible};
use crate::access::{Caller, Scope};
use crate::body::{json, INDEX_HTML};
use crate::pipeline::def::{ParamDef, Pipeline};
use crate::pipeline::run::{self, RunRecord, Runs};
use crate::pipeline::PipelineError;

/// Runs a history page holds at most.
pub(crate) const MAX_PER_PAGE: usize = 100;
const DEFAULT_PER_PAGE: usize = 20;

/// The pages' routes (merged into the pipelines' router).
pub(super) fn routes() -> Router<Arc<Runs>> {
    Router::new()
        .route("/pipeline/{name}", get(pipeline_page))
        .route("/api/pipelines/{name}", get(definition))
        .route("/api/pipelines/{name}/runs", get(history))
}

/// Whether a request is a browser's navigation: `Accept` names `text/html` and not
/// `application/json` (mistry's clients send none, `*/*` or `application/json`).
pub(crate) fn wants_html(headers: &HeaderMap) -> bool {
    let accept: Vec<&str> = headers
        .get_all("accept")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    accept.iter().any(|a| a.contains("text/html"))
        && !accept.iter().any(|a| a.contains("application/json"))
}

/// The web view with `title` (plain text, escaped here) as its `<title>`.
pub(crate) fn titled(title: &str) -> String {
    INDEX_HTML.replacen(
        "<title>mistry</title>",
        &format!("<title>{}</title>", esc(title)),
        1,
    )
}

/// The layer in front of `/pipelines`: a browser's `GET` gets the web view's list page; every
/// other request goes on to mistry's answer.
pub(super) async fn browser_page(req: Request, next: Next) -> Response {
    if req.uri().path() == "/pipelines"
        && matches!(*req.method(), Method::GET | Method::HEAD)
        && wants_html(req.headers())
    {
        return Html(titled("Pipelines · mistry")).into_response();
    }
    next.run(req).await
}

/// Pipeline `name` if `caller` reads every project of its jobs; else, as for a name that does
/// not exist, unknown (blocking).
fn visible(runs: &Runs, caller: &Caller, name: &str) -> Result<Pipeline, ApiError> {
    match runs.load(name) {
        Ok(p)
            if p.jobs
                .iter()
                .all(|j| caller.allows(Scope::Read, &j.project)) =>
        {
            Ok(p)
        }
        // A definition in error is shown to an admin (the list says why).
        Err(PipelineError::Invalid(e)) if caller.is_admin() => {
            Err(PipelineError::Invalid(e).into())
        }
        _ => Err(PipelineError::Unknown(name.to_string()).into()),
    }
}

async fn visible_async(
    runs: &Arc<Runs>,
    caller: Caller,
    name: String,
) -> Result<Pipeline, ApiError> {
    let r = Arc::clone(runs);
    tokio::task::spawn_blocking(move || visible(&r, &caller, &name)).await?
}

/// `GET /pipeline/{name}`: the pipeline's page (404 with the web view for a pipeline the
/// caller does not see).
async fn pipeline_page(
    State(runs): State<Arc<Runs>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Response {
    match visible_async(&runs, caller, name.clone()).await {
        Ok(_) => Html(titled(&format!("{name} · Pipelines · mistry"))).into_response(),
        Err(_) => (
            StatusCode::NOT_FOUND,
            Html(titled("Unknown pipeline · mistry")),
        )
            .into_response(),
    }
}

/// A job of a definition as `GET /api/pipelines/{name}` gives it.
#[derive(Debug, Serialize)]
struct DefJob {
    name: String,
    project: String,
    needs: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Definition {
    name: String,
    description: String,
    params: BTreeMap<String, ParamDef>,
    jobs: Vec<DefJob>,
    on_success: Vec<String>,
}

async fn definition(
    State(runs): State<Arc<Runs>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let p = visible_async(&runs, caller.clone(), name.clone()).await?;
    // The pipelines its successes start, those the caller sees only (a hidden one is named
    // nowhere).
    let (r, c, targets) = (
        Arc::clone(&runs),
        caller,
        p.on_success
            .iter()
            .map(|t| t.pipeline.clone())
            .collect::<Vec<_>>(),
    );
    let on_success = tokio::task::spawn_blocking(move || {
        targets
            .into_iter()
            .filter(|t| visible(&r, &c, t).is_ok())
            .collect::<Vec<_>>()
    })
    .await?;
    let d = Definition {
        name,
        description: p.description,
        params: p.params,
        jobs: p
            .jobs
            .into_iter()
            .map(|j| DefJob {
                name: j.name,
                project: j.project,
                needs: j.needs,
            })
            .collect(),
        on_success,
    };
    Ok(json(StatusCode::OK, &d)?)
}

#[derive(Debug, Default, Deserialize)]
struct PageQuery {
    page: Option<usize>,
    per_page: Option<usize>,
}

#[derive(Debug, Serialize)]
struct History {
    pipeline: String,
    page: usize,
    per_page: usize,
    total: usize,
    runs: Vec<RunRecord>,
}

/// `page` (from 1) of `recs` (already filtered), `per_page` (1 to [`MAX_PER_PAGE`]) a page.
fn paged(recs: Vec<RunRecord>, page: usize, per_page: usize) -> (usize, Vec<RunRecord>) {
    let total = recs.len();
    let skip = (page - 1).saturating_mul(per_page);
    (total, recs.into_iter().skip(skip).take(per_page).collect())
}

async fn history(
    State(runs): State<Arc<Runs>>,
    caller: Caller,
    Path(name): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query.map(|Query(q)| q).unwrap_or_default();
    let page = q.page.unwrap_or(1).max(1);
    let per_page = q
        .per_page
        .unwrap_or(DEFAULT_PER_PAGE)
        .clamp(1, MAX_PER_PAGE);
    visible_async(&runs, caller.clone(), name.clone()).await?;
    let build_path = runs.jobs().config().build_path.clone();
    let n = name.clone();
    let mut recs = tokio::task::spawn_blocking(move || {
        let mut recs = run::list_records(&build_path);
        recs.retain(|r| r.pipeline == n);
        recs
    })
    .await?;
    // Runs in flight as they are now.
    for r in &mut recs {
        if let Some(rx) = runs.watch(&r.pipeline, &r.run) {
            *r = RunRecord::clone(&rx.borrow());
        }
    }
    recs.retain(|r| sees_run(&caller, r));
    let (total, page_runs) = paged(recs, page, per_page);
    // Without the links to runs the caller may not see (`caused_by`, `triggered`).
    let mut seen = Visible::new(&runs, &caller);
    let mut shown = Vec::with_capacity(page_runs.len());
    for r in page_runs {
        shown.push(seen.redact(r).await);
    }
    let runs = shown;
    Ok(json(
        StatusCode::OK,
        &History {
            pipeline: name,
            page,
            per_page,
            total,
            runs,
        },
    )?)
}

#[cfg(test)]
mod tests {
    //! The pages and their JSON through the router in process (the fake jobs; run records
    //! written where the server reads them), with and without access control.

    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::Request;
    use tower_service::Service as _;

    use crate::access::hash_token;
    use crate::config::Config;
    use crate::pipeline::run::{write_record, JobRun, JobRunState, RunRecord, RunState};
    use crate::service::fake::{FakeHandle, FakeJobs};

    struct App {
        _dir: tempfile::TempDir,
        build: std::path::PathBuf,
        router: axum::Router,
    }

    fn app(tokens: bool) -> App {
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
            r#"{"description": "the open one", "params": {"who": {"required": true}, "n": {"default": "3"}},
                "jobs": {"a": {"project": "app"}, "b": {"project": "app", "needs": ["a"]}}}"#,
        )
        .unwrap();
        std::fs::write(
            projects.join("pipelines/mixed-pipe.json"),
            r#"{"jobs": {"a": {"project": "app"}, "b": {"project": "hidden-proj"}}}"#,
        )
        .unwrap();
        let mut cfg = serde_json::json!({"projects_path": projects, "build_path": build});
        if tokens {
            cfg["tokens"] = serde_json::json!([
                {"name": "reader", "hash": hex::encode(hash_token("tok-reader")), "scopes": ["read"], "projects": ["app"]},
                {"name": "admin", "hash": hex::encode(hash_token("tok-admin")), "scopes": ["admin"], "projects": ["*"]}
            ]);
        }
        let cfg = Config::parse(&cfg.to_string(), &dir.path().join("config.json")).unwrap();
        let jobs = FakeHandle(FakeJobs::new(cfg, &["app", "hidden-proj"], true));
        App {
            _dir: dir,
            build,
            router: super::super::super::router(Arc::new(jobs)),
        }
    }

    fn rec(pipeline: &str, n: usize, projects: &[&str]) -> RunRecord {
        RunRecord {
            pipeline: pipeline.into(),
            run: format!("{n:064x}"),
            params: Default::default(),
            state: if n % 2 == 0 {
                RunState::Succeeded
            } else {
                RunState::Failed
            },
            started_at: format!("2026-01-01T00:00:{n:02}Z"),
            duration: 1_000_000_000,
            url: format!("pipeline/{pipeline}/{n:064x}"),
            jobs: projects
                .iter()
                .enumerate()
                .map(|(i, p)| JobRun {
                    name: format!("j{i}"),
                    project: (*p).into(),
                    group: String::new(),
                    params: Default::default(),
                    needs: Vec::new(),
                    state: JobRunState::Ready,
                    id: String::new(),
                    url: String::new(),
                    exit_code: 0,
                    cached: false,
                    coalesced: false,
                    incremental: false,
                    path: String::new(),
                    err_build: String::new(),
                })
                .collect(),
            failed: Vec::new(),
            triggered: Vec::new(),
            caused_by: None,
            error: String::new(),
            rebuild: 0,
            rebuild_of: None,
        }
    }

    impl App {
        async fn get(&self, uri: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
            let mut req = Request::builder().uri(uri);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let resp = match self
                .router
                .clone()
                .call(req.body(Body::empty()).unwrap())
                .await
            {
                Ok(r) => r,
                Err(e) => match e {},
            };
            let status = resp.status().as_u16();
            let kind = resp
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 22)
                .await
                .unwrap();
            (status, kind, String::from_utf8(body.to_vec()).unwrap())
        }
    }

    const BROWSER: &str =
        "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";

    #[tokio::test]
    async fn the_list_is_a_page_for_browsers_and_json_for_everyone_else() {
        let a = app(false);
        let want_json = r#"[{"name":"mixed-pipe","params":{},"jobs":["a","b"]},{"name":"open-pipe","description":"the open one","params":{"n":{"default":"3"},"who":{"required":true}},"jobs":["a","b"]}]"#;
        for accept in [
            None,
            Some("*/*"),
            Some("application/json"),
            Some("application/json, text/html"),
        ] {
            let h: Vec<(&str, &str)> = accept.map(|v| ("accept", v)).into_iter().collect();
            assert_eq!(
                a.get("/pipelines", &h).await,
                (200, "application/json".to_string(), want_json.to_string()),
                "{accept:?}"
            );
        }
        let (status, kind, body) = a.get("/pipelines", &[("accept", BROWSER)]).await;
        assert_eq!((status, kind.as_str()), (200, "text/html; charset=utf-8"));
        assert!(body.contains("<title>Pipelines · mistry</title>"), "{body}");
        assert!(
            body.contains("<script src=\"/static/pipelines.js\"></script>"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn a_pipelines_page_and_definition() {
        let a = app(false);
        let (status, _, body) = a.get("/pipeline/open-pipe", &[("accept", BROWSER)]).await;
        assert_eq!(status, 200);
        assert!(
            body.contains("<title>open-pipe · Pipelines · mistry</title>"),
            "{body}"
        );
        let (status, _, body) = a.get("/pipeline/nope", &[("accept", BROWSER)]).await;
        assert_eq!(status, 404);
        assert!(
            body.contains("<title>Unknown pipeline · mistry</title>"),
            "{body}"
        );
        assert_eq!(
            a.get("/api/pipelines/open-pipe", &[]).await,
            (
                200,
                "application/json".to_string(),
                r#"{"name":"open-pipe","description":"the open one","params":{"n":{"default":"3"},"who":{"required":true}},"jobs":[{"name":"a","project":"app","needs":[]},{"name":"b","project":"app","needs":["a"]}],"on_success":[]}"#.to_string()
            )
        );
        let (status, _, body) = a.get("/api/pipelines/nope", &[]).await;
        assert_eq!((status, body.as_str()), (404, "Unknown pipeline 'nope'"));
    }

    #[tokio::test]
    async fn history_is_paged_newest_first() {
        let a = app(false);
        for n in 0..25 {
            write_record(&a.build, &rec("open-pipe", n, &["app"])).unwrap();
        }
        write_record(&a.build, &rec("mixed-pipe", 99, &["app", "hidden-proj"])).unwrap();
        let runs = |body: &str| -> (serde_json::Value, Vec<String>) {
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            let started = v["runs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["started_at"].as_str().unwrap()[17..19].to_string())
                .collect();
            (
                serde_json::json!([v["pipeline"], v["page"], v["per_page"], v["total"]]),
                started,
            )
        };
        let (status, _, body) = a.get("/api/pipelines/open-pipe/runs", &[]).await;
        assert_eq!(status, 200, "{body}");
        let (head, started) = runs(&body);
        assert_eq!(head, serde_json::json!(["open-pipe", 1, 20, 25]));
        assert_eq!(started.first().map(String::as_str), Some("24"));
        assert_eq!(started.len(), 20);
        let (_, _, body) = a
            .get("/api/pipelines/open-pipe/runs?page=2&per_page=10", &[])
            .await;
        let (head, started) = runs(&body);
        assert_eq!(head, serde_json::json!(["open-pipe", 2, 10, 25]));
        assert_eq!(
            started,
            ["14", "13", "12", "11", "10", "09", "08", "07", "06", "05"]
        );
        let (_, _, body) = a
            .get("/api/pipelines/open-pipe/runs?page=3&per_page=1000", &[])
            .await;
        let (head, started) = runs(&body);
        assert_eq!(head, serde_json::json!(["open-pipe", 3, 100, 25]));
        assert!(started.is_empty());
        let (_, _, body) = a.get("/api/pipelines/mixed-pipe/runs", &[]).await;
        assert_eq!(runs(&body).1, ["99"]);
    }

    #[tokio::test]
    async fn a_caller_sees_only_pipelines_and_runs_of_projects_it_reads() {
        let a = app(true);
        write_record(&a.build, &rec("open-pipe", 1, &["app"])).unwrap();
        // A run of a pipeline whose definition changed since: it used a hidden project.
        write_record(&a.build, &rec("open-pipe", 2, &["app", "hidden-proj"])).unwrap();
        write_record(&a.build, &rec("mixed-pipe", 3, &["app", "hidden-proj"])).unwrap();
        let reader = [("authorization", "Bearer tok-reader")];
        let admin = [("authorization", "Bearer tok-admin")];
        assert_eq!(a.get("/api/pipelines/open-pipe", &[]).await.0, 401);
        assert_eq!(a.get("/pipeline/open-pipe", &[]).await.0, 401);
        // The list's page too: authentication comes first.
        assert_eq!(a.get("/pipelines", &[("accept", BROWSER)]).await.0, 401);
        let (status, _, body) = a.get("/pipelines", &[("accept", BROWSER), reader[0]]).await;
        assert_eq!(status, 200);
        assert!(body.contains("<title>Pipelines · mistry</title>"), "{body}");
        let (status, _, body) = a.get("/api/pipelines/open-pipe/runs", &reader).await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["total"], 1, "{body}");
        assert_eq!(v["runs"][0]["run"], format!("{:064x}", 1));
        assert!(!body.contains("hidden"), "{body}");
        for path in [
            "/api/pipelines/mixed-pipe",
            "/api/pipelines/mixed-pipe/runs",
        ] {
            assert_eq!(
                a.get(path, &reader).await,
                (
                    404,
                    "text/plain; charset=utf-8".to_string(),
                    "Unknown pipeline 'mixed-pipe'".to_string()
                ),
                "{path}"
            );
        }
        assert_eq!(a.get("/pipeline/mixed-pipe", &reader).await.0, 404);
        let (status, _, body) = a.get("/api/pipelines/mixed-pipe/runs", &admin).await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["total"], 1, "{body}");
        let (status, _, body) = a.get("/api/pipelines/open-pipe/runs", &admin).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((status, v["total"].clone()), (200, serde_json::json!(2)));
    }
}
