//! A project's page in the web view and what it reads (all behind [`access::read_project`]):
//!
//! - `GET /project/{project}`: the page (its trends and its last builds, drawn by
//!   `projects.js`); 404 for a project that does not exist;
//! - `GET /api/project/{project}/builds?limit=N`: its last N builds (≤ 100, default 20),
//!   newest first, as `/index/` entries;
//! - `GET /trends/{project}/duration.svg` and `/trends/{project}/success.svg`: the charts of its
//!   last [`TREND_BUILDS`] ended builds ([`crate::trends`], `image/svg+xml`).
//!
//! The builds are this agent's (`Jobs::list`); with several agents, the cluster's records of the
//! project (`Jobs::cluster_jobs`: every agent's jobs, with `agent` and `clusterState`), unless
//! the database does not answer.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use super::access;
use super::pipelines::titled;
use super::ApiError;
use crate::body::json;
use crate::service::{index_entry, ClusterJobsFilter, JobState, Jobs, Stage};
use crate::trends::{self, Build};

/// How many of a project's ended builds the trends show.
pub(crate) const TREND_BUILDS: usize = 50;
/// Builds per bar of the success rate.
const PER_BUCKET: usize = 5;
const MAX_BUILDS: usize = 100;

type JobsState = State<Arc<dyn Jobs>>;

/// The routes of a project's page, behind `read` on the project.
pub(super) fn routes() -> Router<Arc<dyn Jobs>> {
    Router::new()
        .route("/project/{project}", get(page))
        .route("/api/project/{project}/builds", get(builds))
        .route("/trends/{project}/duration.svg", get(duration_svg))
        .route("/trends/{project}/success.svg", get(success_svg))
        .route_layer(axum::middleware::from_fn(access::read_project))
}

/// Whether `project` is one of the configured projects (a directory under `projects_path`).
async fn exists(jobs: &Arc<dyn Jobs>, project: &str) -> bool {
    if crate::jobs::check_name("project", project).is_err() {
        return false;
    }
    let dir = jobs.config().projects_path.join(project);
    tokio::fs::metadata(dir).await.is_ok_and(|m| m.is_dir())
}

async fn page(State(jobs): JobsState, Path(project): Path<String>) -> Response {
    if exists(&jobs, &project).await {
        Html(titled(&format!("{project} · Projects · mistry"))).into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            Html(titled("Unknown project · mistry")),
        )
            .into_response()
    }
}

#[derive(Debug, Default, Deserialize)]
struct BuildsQuery {
    limit: Option<usize>,
}

async fn builds(
    State(jobs): JobsState,
    Path(project): Path<String>,
    query: Result<Query<BuildsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let limit = query
        .ok()
        .and_then(|Query(q)| q.limit)
        .unwrap_or(20)
        .clamp(1, MAX_BUILDS);
    if let Some(records) = records(&jobs, &project, limit, None).await {
        return Ok(json(StatusCode::OK, &records)?);
    }
    let entries = tokio::task::spawn_blocking(move || {
        jobs.list()
            .filter(|f| f.dir.project() == project)
            .take(limit)
            .map(|f| index_entry(&f))
            .collect::<Vec<_>>()
    })
    .await?;
    Ok(json(StatusCode::OK, &entries)?)
}

/// The project's last `limit` records cluster-wide (`states`: of these states only), newest
/// first; `None` on a single node or when the database does not answer.
async fn records(
    jobs: &Arc<dyn Jobs>,
    project: &str,
    limit: usize,
    states: Option<Vec<JobState>>,
) -> Option<Vec<serde_json::Value>> {
    let filter = ClusterJobsFilter {
        agent: None,
        project: Some(project.to_string()),
        states,
        limit: i64::try_from(limit).ok()?,
        // Behind `read_project`: the caller reads this project.
        readable: None,
    };
    match jobs.cluster_jobs(&filter).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(%project, error = %e, "the cluster's records did not answer: this agent's builds only");
            None
        }
    }
}

/// A record's build as the charts read it.
fn record_build(r: &serde_json::Value) -> Build {
    let info = &r["buildInfo"];
    Build {
        id: r["id"].as_str().unwrap_or_default().to_string(),
        started_at: info["StartedAt"].as_str().unwrap_or_default().to_string(),
        duration_ns: info["Duration"].as_i64().unwrap_or(-1),
        ok: info["ExitCode"].as_i64() == Some(0)
            && info["ErrBuild"].as_str().is_none_or(str::is_empty),
    }
}

/// The project's last [`TREND_BUILDS`] ended builds, oldest first: the cluster's records, or
/// this agent's.
async fn trend_builds(jobs: Arc<dyn Jobs>, project: String) -> Result<Vec<Build>, ApiError> {
    let ended = Some(vec![JobState::Ready, JobState::Failed]);
    if let Some(records) = records(&jobs, &project, TREND_BUILDS, ended).await {
        return Ok(records.iter().rev().map(record_build).collect());
    }
    Ok(tokio::task::spawn_blocking(move || ended_here(&jobs, &project)).await?)
}

/// The project's last [`TREND_BUILDS`] ended builds on this agent, oldest first (blocking).
fn ended_here(jobs: &Arc<dyn Jobs>, project: &str) -> Vec<Build> {
    let mut out: Vec<Build> = jobs
        .list()
        .filter(|f| f.dir.project() == project && f.stage == Stage::Ready)
        .take(TREND_BUILDS)
        .map(|f| Build {
            id: f.dir.id().to_string(),
            started_at: f.info.started_at.clone(),
            duration_ns: f.info.duration,
            ok: f.info.succeeded(),
        })
        .collect();
    out.reverse();
    out
}

fn svg(body: String) -> Response {
    (
        [
            ("content-type", "image/svg+xml"),
            ("cache-control", "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn duration_svg(
    State(jobs): JobsState,
    Path(project): Path<String>,
) -> Result<Response, ApiError> {
    let builds = trend_builds(jobs, project.clone()).await?;
    Ok(svg(trends::duration_chart(&project, &builds)))
}

async fn success_svg(
    State(jobs): JobsState,
    Path(project): Path<String>,
) -> Result<Response, ApiError> {
    let builds = trend_builds(jobs, project.clone()).await?;
    Ok(svg(trends::success_chart(&project, &builds, PER_BUCKET)))
}

#[cfg(test)]
mod tests {
    //! The routes through the router in process (the fake jobs, which hold no builds): the
    //! page, the JSON and the charts, and `read` on the project for each.

    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::Request;
    use tower_service::Service as _;

    use crate::access::hash_token;
    use crate::config::Config;
    use crate::service::fake::{FakeHandle, FakeJobs};

    async fn get(router: &axum::Router, uri: &str, token: Option<&str>) -> (u16, String, String) {
        let mut req = Request::builder().uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = match router.clone().call(req.body(Body::empty()).unwrap()).await {
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

    #[tokio::test]
    async fn a_projects_page_charts_and_builds_behind_read() {
        let dir = tempfile::tempdir().unwrap();
        let (projects, build) = (dir.path().join("projects"), dir.path().join("build"));
        for p in ["app", "hidden-proj"] {
            std::fs::create_dir_all(projects.join(p)).unwrap();
            std::fs::write(projects.join(p).join("Dockerfile"), "FROM busybox\n").unwrap();
        }
        std::fs::create_dir_all(&build).unwrap();
        let cfg = serde_json::json!({"projects_path": projects, "build_path": build, "tokens": [
            {"name": "reader", "hash": hex::encode(hash_token("tok-reader")), "scopes": ["read"], "projects": ["app"]}
        ]});
        let cfg = Config::parse(&cfg.to_string(), &dir.path().join("config.json")).unwrap();
        let jobs = FakeHandle(FakeJobs::new(cfg, &["app", "hidden-proj"], true));
        let router = super::super::router(Arc::new(jobs));
        let t = Some("tok-reader");

        let (status, kind, body) = get(&router, "/project/app", t).await;
        assert_eq!((status, kind.as_str()), (200, "text/html; charset=utf-8"));
        assert!(
            body.contains("<title>app · Projects · mistry</title>"),
            "{body}"
        );
        assert!(
            body.contains("<script src=\"/static/projects.js\"></script>"),
            "{body}"
        );
        assert_eq!(
            get(&router, "/api/project/app/builds?limit=500", t).await,
            (200, "application/json".into(), "[]".into())
        );
        for chart in ["duration", "success"] {
            let (status, kind, body) = get(&router, &format!("/trends/app/{chart}.svg"), t).await;
            assert_eq!((status, kind.as_str()), (200, "image/svg+xml"), "{body}");
            assert!(body.starts_with(&format!("<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"trend\" id=\"trend-{chart}\" role=\"img\"")), "{body}");
            assert!(body.contains(">No builds yet.</text>"), "{body}");
        }
        // Unknown project: the page says so.
        let (status, _, body) = get(&router, "/project/nope", Some("tok-reader")).await;
        assert_eq!(status, 403, "{body}");

        // Another project's: refused, and nothing of it in the answer.
        for path in [
            "/project/hidden-proj",
            "/api/project/hidden-proj/builds",
            "/trends/hidden-proj/duration.svg",
            "/trends/hidden-proj/success.svg",
        ] {
            let (status, _, body) = get(&router, path, t).await;
            assert_eq!(status, 403, "{path}: {body}");
            assert!(
                !body.contains("<svg") && !body.contains("<title>hidden"),
                "{path}: {body}"
            );
            assert_eq!(get(&router, path, None).await.0, 401, "{path}");
        }
    }

    #[tokio::test]
    async fn an_unknown_project_is_404() {
        let dir = tempfile::tempdir().unwrap();
        let (projects, build) = (dir.path().join("projects"), dir.path().join("build"));
        std::fs::create_dir_all(projects.join("app")).unwrap();
        std::fs::create_dir_all(&build).unwrap();
        let cfg = serde_json::json!({"projects_path": projects, "build_path": build});
        let cfg = Config::parse(&cfg.to_string(), &dir.path().join("config.json")).unwrap();
        let jobs = FakeHandle(FakeJobs::new(cfg, &["app"], true));
        let router = super::super::router(Arc::new(jobs));
        let (status, _, body) = get(&router, "/project/nope", None).await;
        assert_eq!(status, 404);
        assert!(
            body.contains("<title>Unknown project · mistry</title>"),
            "{body}"
        );
        assert_eq!(get(&router, "/project/app", None).await.0, 200);
    }
}
