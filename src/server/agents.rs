//! The routes about agents (one, or several around one PostgreSQL), over the jobs interface:
//!
//! - `GET /agents`: every agent (this one alone on a single node) as JSON when asked for
//!   (`Content-Type` or `Accept: application/json`), else the web view's agents page; 503 when
//!   the database does not answer.
//! - `GET /api/agents/jobs[?project=P&id=ID]`: which agent ran each job,
//!   `{"<project>/<id>": "<agent>"}` (mistry's `/index/` keeps its exact shape: the web view
//!   merges this map into its job list). A queued record (no agent yet) is left out.
//! - `GET /api/cluster/jobs[?agent=A][&project=P][&state=S][&limit=N]`: the cluster's job
//!   records, newest first, each shaped like an `/index/` entry plus `agent`, `clusterState`
//!   and `retries` (`state=pending`: queued or running); 400 for a bad filter, 404 on a single
//!   node, 503 when the database does not answer.
//! - `GET /api/build/{project}/{id}[?cache=1]`: a ready build of this agent for another one
//!   (`engine::export`; the fetching side is `cluster::copies`).
//! - `/metrics`: OpenMetrics, the cluster's gauges read first when there is one.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use super::access::{reads_key, require, require_admin, require_agent};
use super::{ApiError, JobsState};
use crate::access::{Caller, Scope};
use crate::body::{blocking_body, json, INDEX_HTML};
use crate::service::{ClusterJobsFilter, Jobs, Readable};

/// The agents' routes, to merge into the server's router.
pub(super) fn routes() -> Router<Arc<dyn Jobs>> {
    Router::new()
        .route("/agents", get(agents))
        .route("/api/agents/jobs", get(job_agents))
        .route("/api/cluster/jobs", get(cluster_jobs))
        .route("/api/build/{project}/{id}", get(build))
        .route("/metrics", get(metrics))
}

/// Whether `header` asks for JSON.
fn asks_json(headers: &HeaderMap, header: &str) -> bool {
    headers
        .get(header)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

async fn agents(
    State(jobs): JobsState,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !asks_json(&headers, "content-type") && !asks_json(&headers, "accept") {
        return Ok(Html(INDEX_HTML).into_response());
    }
    require_admin(&caller, "GET /agents")?;
    let list = jobs.agents().await.map_err(ApiError::Agents)?;
    Ok(json(StatusCode::OK, &list)?)
}

/// `?project=P&id=ID`: one job.
#[derive(Debug, Default, Deserialize)]
struct JobAgentsQuery {
    project: Option<String>,
    id: Option<String>,
}

async fn job_agents(
    State(jobs): JobsState,
    caller: Caller,
    query: Result<Query<JobAgentsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let only = match query? {
        Query(JobAgentsQuery {
            project: Some(p),
            id: Some(i),
        }) => Some((p, i)),
        Query(JobAgentsQuery {
            project: None,
            id: None,
        }) => None,
        Query(_) => return Err(ApiError::ProjectAndId),
    };
    if let Some((p, _)) = &only {
        require(&caller, Scope::Read, p)?;
    }
    let mut map = jobs.job_agents(only).await?;
    map.retain(|key, _| reads_key(&caller, key));
    Ok(json(StatusCode::OK, &map)?)
}

/// `?agent=A&project=P&state=S&limit=N` of `GET /api/cluster/jobs`.
#[derive(Debug, Default, Deserialize)]
struct ClusterJobsQuery {
    agent: Option<String>,
    project: Option<String>,
    state: Option<String>,
    limit: Option<i64>,
}

fn cluster_filter(
    query: Result<Query<ClusterJobsQuery>, QueryRejection>,
) -> Result<ClusterJobsFilter, ApiError> {
    let Query(q) = query?;
    Ok(ClusterJobsFilter::new(
        q.agent,
        q.project,
        q.state.as_deref(),
        q.limit,
    )?)
}

async fn cluster_jobs(
    State(jobs): JobsState,
    caller: Caller,
    query: Result<Query<ClusterJobsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let mut filter = cluster_filter(query)?;
    if let Some(p) = &filter.project {
        require(&caller, Scope::Read, p)?;
    }
    // The grant goes into the statement: a limit then counts only the projects the caller
    // reads (filtered after it, the list's length told how many jobs other projects had).
    if let Caller::Granted(_) = &caller {
        let c = caller.clone();
        filter.readable = Some(Readable(Arc::new(move |p: &str| c.allows(Scope::Read, p))));
    }
    match jobs.cluster_jobs(&filter).await? {
        Some(mut list) => {
            list.retain(|entry| {
                entry["project"]
                    .as_str()
                    .is_some_and(|p| caller.allows(Scope::Read, p))
            });
            Ok(json(StatusCode::OK, &list)?)
        }
        None => Err(ApiError::NoCluster),
    }
}

/// `?cache=1` (also `?cache`; `0` and `false` mean without).
#[derive(Debug, Default, Deserialize)]
struct BuildQuery {
    cache: Option<String>,
}

async fn build(
    State(jobs): JobsState,
    caller: Caller,
    Path((project, id)): Path<(String, String)>,
    query: Result<Query<BuildQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    require_agent(&jobs.config().access, &caller, "GET /api/build")?;
    let with_cache = query.is_ok_and(|Query(q)| {
        q.cache
            .is_some_and(|v| !matches!(v.as_str(), "0" | "false"))
    });
    let (j, p, i) = (Arc::clone(&jobs), project.clone(), id.clone());
    let export = tokio::task::spawn_blocking(move || j.export(&p, &i, with_cache)).await??;
    Ok(blocking_body(
        "application/x-tar",
        move |w| export.write(w),
        move |e| tracing::warn!(%project, %id, error = %e, "streaming a build to another agent failed"),
    ))
}

async fn metrics(State(jobs): JobsState, caller: Caller) -> Result<Response, ApiError> {
    require_admin(&caller, "GET /metrics")?;
    jobs.refresh_gauges().await;
    Ok((
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        jobs.metrics().render(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(q: &str) -> Result<ClusterJobsFilter, ApiError> {
        let uri: axum::http::Uri = format!("/api/cluster/jobs?{q}").parse().unwrap();
        cluster_filter(Query::<ClusterJobsQuery>::try_from_uri(&uri))
    }

    #[test]
    fn the_cluster_job_lists_query_is_checked() {
        use crate::service::JobState;
        assert_eq!(
            filter("agent=a&project=p&state=pending&limit=5000").unwrap(),
            ClusterJobsFilter {
                agent: Some("a".into()),
                project: Some("p".into()),
                states: Some(vec![JobState::Queued, JobState::Running]),
                limit: 5000,
                readable: None,
            }
        );
        assert_eq!(filter("agent=&state=").unwrap(), filter("").unwrap());
        let e = filter("limit=-3").unwrap_err();
        assert_eq!(
            (e.status(), e.to_string().as_str()),
            (
                StatusCode::BAD_REQUEST,
                "limit must be between 1 and 5000, got -3"
            )
        );
        assert_eq!(
            filter("limit=x").unwrap_err().status(),
            StatusCode::BAD_REQUEST
        );
    }
}
