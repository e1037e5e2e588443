//! The central logs' statements (table `job_logs`; the shipping and reading logic is
//! `cluster::logs`), a job's record as the logs' readers show it, and the retention's deletes.

use std::time::Duration;

use tokio_postgres::Client;

use super::{query_error, still_its_run_sql, stored_state, Pooled, RecordsError};
use crate::cluster::LOGS_CHANNEL;
use crate::service::JobState;

/// A job's record as `/job`, `/log` and the tail show it.
#[derive(Debug)]
pub(in crate::cluster) struct Shown {
    pub(in crate::cluster) state: JobState,
    pub(in crate::cluster) agent: Option<String>,
    /// The stored request (JSON).
    pub(in crate::cluster) request: String,
    /// The stored BuildInfo (JSON), once the job ended.
    pub(in crate::cluster) build_info: Option<String>,
    /// When it started running, else was queued (`YYYY-MM-DDTHH:MM:SS.ffffffZ`).
    pub(in crate::cluster) since: String,
}

/// Job `project/id`'s record, as the logs' readers show it.
pub(in crate::cluster) async fn shown(
    client: &Client,
    project: &str,
    id: &str,
) -> Result<Option<Shown>, RecordsError> {
    let g = query_error(format!("reading the record of job {project}/{id}"));
    let row = client
        .query_opt(
            "SELECT state, agent, request::text, build_info::text,
                    to_char(COALESCE(started_at, queued_at) AT TIME ZONE 'UTC',
                            'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
               FROM jobs WHERE project = $1 AND id = $2",
            &[&project, &id],
        )
        .await
        .map_err(&g)?;
    let Some(row) = row else { return Ok(None) };
    let state: String = row.try_get(0).map_err(&g)?;
    Ok(Some(Shown {
        state: stored_state(&state)?,
        agent: row.try_get(1).map_err(&g)?,
        request: row.try_get(2).map_err(&g)?,
        build_info: row.try_get(3).map_err(&g)?,
        since: row.try_get(4).map_err(&g)?,
    }))
}

/// The size of stream `stream` (`out`, `stderr`) of job `project/id`'s log.
pub(in crate::cluster) async fn size(
    client: &Client,
    project: &str,
    id: &str,
    stream: &str,
) -> Result<u64, RecordsError> {
    let g = query_error(format!("the size of job {project}/{id}'s {stream} log"));
    let row = client
        .query_opt(
            "SELECT pos + octet_length(data) FROM job_logs
              WHERE project = $1 AND id = $2 AND stream = $3
              ORDER BY pos DESC LIMIT 1",
            &[&project, &id, &stream],
        )
        .await
        .map_err(&g)?;
    let size: i64 = match row {
        Some(r) => r.try_get(0).map_err(&g)?,
        None => 0,
    };
    Ok(u64::try_from(size).unwrap_or(0))
}

/// Up to `rows` chunks of a log covering bytes from `from` on, in order: (offset, data, run).
/// A chunk is at most `chunk_max` bytes: one starting `chunk_max` before `from` or earlier ends
/// before it (the bound keeps the query on the primary key).
pub(in crate::cluster) async fn page(
    client: &Client,
    (project, id, stream): (&str, &str, &str),
    from: u64,
    chunk_max: usize,
    rows: i64,
) -> Result<Vec<(u64, Vec<u8>, String)>, RecordsError> {
    let g = query_error(format!("reading job {project}/{id}'s {stream} log"));
    let from = i64::try_from(from).unwrap_or(i64::MAX);
    let chunk_max = i64::try_from(chunk_max).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "SELECT pos, data, run FROM job_logs
              WHERE project = $1 AND id = $2 AND stream = $3
                AND pos > $4::bigint - $5::bigint AND pos + octet_length(data) > $4::bigint
              ORDER BY pos LIMIT $6",
            &[&project, &id, &stream, &from, &chunk_max, &rows],
        )
        .await
        .map_err(&g)?;
    let mut page = Vec::with_capacity(rows.len());
    for r in rows {
        let pos: i64 = r.try_get(0).map_err(&g)?;
        let data: Vec<u8> = r.try_get(1).map_err(&g)?;
        let run: String = r.try_get(2).map_err(&g)?;
        page.push((u64::try_from(pos).unwrap_or(0), data, run));
    }
    Ok(page)
}

/// A run of job `project/id` by agent `me` starts: the previous run's chunks go, and `payload`
/// is notified on the logs' channel — only while the job's record is `me`'s (running by it, or
/// queued again and not claimed yet), as for [`insert_chunk`]; `false` when it is not (a run
/// that started shipping late, after its agent was taken for dead, never deletes the log of
/// the job's new run).
pub(in crate::cluster) async fn start_run(
    client: &Pooled,
    project: &str,
    id: &str,
    me: &str,
    payload: &str,
) -> Result<bool, RecordsError> {
    let g = query_error(format!("starting job {project}/{id}'s log"));
    // One statement (atomic; its notification delivered at its commit).
    let statement = client
        .prepare_cached(&format!(
            "WITH own AS (
                 SELECT EXISTS (SELECT 1 FROM jobs
                                 WHERE project = $1 AND id = $2 AND {}) AS yes),
             gone AS (DELETE FROM job_logs
                       WHERE project = $1 AND id = $2 AND (SELECT yes FROM own)
                      RETURNING 1),
             sent AS (SELECT pg_notify($3, $4) FROM own WHERE own.yes)
             SELECT own.yes, (SELECT count(*) FROM gone), (SELECT count(*) FROM sent) FROM own",
            still_its_run_sql("$5")
        ))
        .await
        .map_err(&g)?;
    let row = client
        .query_one(&statement, &[&project, &id, &LOGS_CHANNEL, &payload, &me])
        .await
        .map_err(&g)?;
    row.try_get::<_, bool>(0).map_err(g)
}

/// A chunk of a log, shipped by agent `agent` during run `run`.
pub(in crate::cluster) struct Chunk<'a> {
    pub(in crate::cluster) project: &'a str,
    pub(in crate::cluster) id: &'a str,
    pub(in crate::cluster) stream: &'a str,
    pub(in crate::cluster) pos: u64,
    pub(in crate::cluster) data: &'a [u8],
    pub(in crate::cluster) agent: &'a str,
    pub(in crate::cluster) run: &'a str,
}

/// Insert `chunk` (never twice: keyed by its offset) and notify `payload`, only while the job's
/// record is its agent's (running by it, or queued again and not claimed yet); `false` when it
/// is not.
pub(in crate::cluster) async fn insert_chunk(
    client: &Pooled,
    chunk: &Chunk<'_>,
    payload: &str,
) -> Result<bool, RecordsError> {
    let g = query_error(format!(
        "shipping job {}/{}'s {} log",
        chunk.project, chunk.id, chunk.stream
    ));
    let pos = i64::try_from(chunk.pos).unwrap_or(i64::MAX);
    let statement = client
        .prepare_cached(&format!(
            "WITH own AS (
                 SELECT EXISTS (SELECT 1 FROM jobs
                                 WHERE project = $1 AND id = $2 AND {}) AS yes),
             ins AS (
                 INSERT INTO job_logs (project, id, stream, pos, data, agent, run)
                 SELECT $1, $2, $3, $4, $5, $6, $7 FROM own WHERE own.yes
                 ON CONFLICT DO NOTHING
                 RETURNING 1),
             sent AS (SELECT pg_notify($8, $9) FROM ins)
             SELECT own.yes, (SELECT count(*) FROM sent) FROM own",
            still_its_run_sql("$6")
        ))
        .await
        .map_err(&g)?;
    let row = client
        .query_one(
            &statement,
            &[
                &chunk.project,
                &chunk.id,
                &chunk.stream,
                &pos,
                &chunk.data,
                &chunk.agent,
                &chunk.run,
                &LOGS_CHANNEL,
                &payload,
            ],
        )
        .await
        .map_err(&g)?;
    row.try_get::<_, bool>(0).map_err(g)
}

/// Notify `payload` on the logs' channel.
pub(in crate::cluster) async fn notify(client: &Pooled, payload: &str) -> Result<(), RecordsError> {
    let g = query_error("a log's notification");
    let statement = client
        .prepare_cached("SELECT pg_notify($1, $2)")
        .await
        .map_err(&g)?;
    client
        .execute(&statement, &[&LOGS_CHANNEL, &payload])
        .await
        .map_err(g)?;
    Ok(())
}

/// What [`prune`] deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(in crate::cluster) struct Pruned {
    pub(in crate::cluster) chunks: u64,
    pub(in crate::cluster) records: u64,
    pub(in crate::cluster) agents: u64,
}

/// Delete the log chunks and the records of jobs that ended longer than `retention` ago
/// (chunks without a record once they are that old); never those of a job queued or running.
/// Agents silent that long, and at least a day (stopped or gone), that no record names any
/// more go too, with the images recorded for them (the agents page and placement forget them).
pub(in crate::cluster) async fn prune(
    client: &mut Client,
    retention: Duration,
) -> Result<Pruned, RecordsError> {
    let g = query_error("pruning old logs and records");
    let secs = retention.as_secs_f64();
    let tx = client.transaction().await.map_err(&g)?;
    let chunks = tx
        .execute(
            "DELETE FROM job_logs l
              WHERE l.at < now() - make_interval(secs => $1)
                AND NOT EXISTS (
                    SELECT 1 FROM jobs j
                     WHERE j.project = l.project AND j.id = l.id
                       AND (j.state IN ('queued', 'running')
                            OR j.ended_at IS NULL
                            OR j.ended_at >= now() - make_interval(secs => $1)))",
            &[&secs],
        )
        .await
        .map_err(&g)?;
    let records = tx
        .execute(
            "DELETE FROM jobs
              WHERE state IN ('ready', 'failed')
                AND ended_at < now() - make_interval(secs => $1)",
            &[&secs],
        )
        .await
        .map_err(&g)?;
    let agents = tx
        .execute(
            "DELETE FROM agents a
              WHERE a.last_heartbeat < now() - make_interval(secs => GREATEST($1::float8, 86400))
                AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.agent = a.name)",
            &[&secs],
        )
        .await
        .map_err(&g)?;
    if agents > 0 {
        tx.execute(
            "DELETE FROM agent_images i
              WHERE NOT EXISTS (SELECT 1 FROM agents a WHERE a.name = i.agent)",
            &[],
        )
        .await
        .map_err(&g)?;
    }
    tx.commit().await.map_err(&g)?;
    Ok(Pruned {
        chunks,
        records,
        agents,
    })
}
