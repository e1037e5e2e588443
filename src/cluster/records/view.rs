//! The view's statements (`cluster::view`: which agent ran what, the cluster's job list, a
//! build's holder for `GET /artifacts`, the gauges of `/metrics`).

use std::time::Duration;

use tokio_postgres::Client;

use super::{query_error, stored_state, RecordsError};
use crate::service::{ClusterJobsFilter, JobState};

/// The agent holding job `project/id`'s ended build (`ready` or `failed`), and its URL, when
/// that agent is alive.
pub(in crate::cluster) async fn holder(
    client: &Client,
    project: &str,
    id: &str,
    agent_timeout: Duration,
) -> Result<Option<(String, String)>, RecordsError> {
    let g = query_error(format!("the agent holding job {project}/{id}"));
    let row = client
        .query_opt(
            "SELECT j.agent, a.advertise_url
               FROM jobs j JOIN agents a ON a.name = j.agent
              WHERE j.project = $1 AND j.id = $2 AND j.state IN ('ready', 'failed')
                AND a.stopped_at IS NULL
                AND a.last_heartbeat > now() - make_interval(secs => $3)",
            &[&project, &id, &agent_timeout.as_secs_f64()],
        )
        .await
        .map_err(&g)?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some((
        row.try_get(0).map_err(&g)?,
        row.try_get(1).map_err(&g)?,
    )))
}

/// The agent of every record that has one (`only`: of that job alone): `(project, id, agent)`.
pub(in crate::cluster) async fn job_agents(
    client: &Client,
    only: Option<(&str, &str)>,
) -> Result<Vec<(String, String, String)>, RecordsError> {
    let g = query_error("the agents of the jobs");
    let rows = match only {
        Some((p, i)) => {
            client
                .query(
                    "SELECT project, id, agent FROM jobs
                      WHERE project = $1 AND id = $2 AND agent IS NOT NULL",
                    &[&p, &i],
                )
                .await
        }
        None => {
            client
                .query(
                    "SELECT project, id, agent FROM jobs WHERE agent IS NOT NULL",
                    &[],
                )
                .await
        }
    }
    .map_err(&g)?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(g)
}

/// A record of the cluster's job list.
#[derive(Debug)]
pub(in crate::cluster) struct Listed {
    pub(in crate::cluster) project: String,
    pub(in crate::cluster) id: String,
    pub(in crate::cluster) state: JobState,
    pub(in crate::cluster) agent: Option<String>,
    pub(in crate::cluster) retries: i32,
    /// The stored BuildInfo (JSON), once the job ended.
    pub(in crate::cluster) build_info: Option<String>,
    /// The stored request's group and params (JSON).
    pub(in crate::cluster) group: String,
    pub(in crate::cluster) params: String,
    /// When it started running, else was queued.
    pub(in crate::cluster) since: String,
}

/// The job records `filter` asks for, newest first (by the time the record started running,
/// else was queued); bounded by the database's time (a 5 s statement timeout) and this agent's
/// memory (the rows are read as they come, up to `max_bytes` of stored BuildInfo and params).
pub(in crate::cluster) async fn cluster_jobs(
    client: &mut Client,
    filter: &ClusterJobsFilter,
    max_bytes: usize,
) -> Result<Vec<Listed>, RecordsError> {
    let g = query_error("listing the cluster's jobs");
    let tx = client.transaction().await.map_err(&g)?;
    tx.batch_execute("SET LOCAL statement_timeout = '5s'")
        .await
        .map_err(&g)?;
    // The projects the caller may read, of those the records hold (the grant is a predicate,
    // asked here of each name, so that the statement's LIMIT counts only them).
    let projects: Option<Vec<String>> = match &filter.readable {
        Some(readable) => {
            let rows = tx
                .query("SELECT DISTINCT project FROM jobs", &[])
                .await
                .map_err(&g)?;
            let mut names = Vec::with_capacity(rows.len());
            for row in &rows {
                let name: String = row.try_get(0).map_err(&g)?;
                if readable.allows(&name) {
                    names.push(name);
                }
            }
            Some(names)
        }
        None => None,
    };
    let states: Option<Vec<&str>> = filter
        .states
        .as_ref()
        .map(|v| v.iter().map(|s| s.as_str()).collect());
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
        &filter.agent,
        &filter.project,
        &states,
        &filter.limit,
        &projects,
    ];
    let stream = tx
        .query_raw(
            "SELECT project, id, state, agent, retries, build_info::text,
                    COALESCE(request->>'group', ''), COALESCE(request->'params', '{}')::text,
                    to_char(COALESCE(started_at, queued_at) AT TIME ZONE 'UTC',
                            'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
               FROM jobs
              WHERE ($1::text IS NULL OR agent = $1)
                AND ($2::text IS NULL OR project = $2)
                AND ($3::text[] IS NULL OR state = ANY($3))
                AND ($5::text[] IS NULL OR project = ANY($5))
              ORDER BY COALESCE(started_at, queued_at) DESC, project, id
              LIMIT $4",
            params.iter().copied(),
        )
        .await
        .map_err(&g)?;
    // Boxed so that it can go before the rollback (an unread rest is then discarded).
    let mut stream = Box::pin(stream);
    let mut rows = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = futures_util::TryStreamExt::try_next(&mut stream)
        .await
        .map_err(&g)?
    {
        bytes += row
            .try_get::<_, Option<&str>>(5)
            .ok()
            .flatten()
            .map_or(0, str::len)
            + row.try_get::<_, &str>(7).map_or(0, str::len);
        rows.push(row);
        if bytes > max_bytes {
            break;
        }
    }
    drop(stream);
    let _ = tx.rollback().await;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let state: String = row.try_get(2).map_err(&g)?;
        out.push(Listed {
            project: row.try_get(0).map_err(&g)?,
            id: row.try_get(1).map_err(&g)?,
            state: stored_state(&state)?,
            agent: row.try_get(3).map_err(&g)?,
            retries: row.try_get(4).map_err(&g)?,
            build_info: row.try_get(5).map_err(&g)?,
            group: row.try_get(6).map_err(&g)?,
            params: row.try_get(7).map_err(&g)?,
            since: row.try_get(8).map_err(&g)?,
        });
    }
    Ok(out)
}

/// The cluster's gauges: queued records, alive agents (by `agent_timeout`), running records.
pub(in crate::cluster) async fn gauges(
    client: &Client,
    agent_timeout: Duration,
) -> Result<(i64, i64, i64), RecordsError> {
    let g = query_error("the cluster's gauges");
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM jobs WHERE state = 'queued'),
                    (SELECT count(*) FROM agents WHERE stopped_at IS NULL
                        AND last_heartbeat > now() - make_interval(secs => $1)),
                    (SELECT count(*) FROM jobs WHERE state = 'running')",
            &[&agent_timeout.as_secs_f64()],
        )
        .await
        .map_err(&g)?;
    Ok((
        row.try_get(0).map_err(&g)?,
        row.try_get(1).map_err(&g)?,
        row.try_get(2).map_err(&g)?,
    ))
}
