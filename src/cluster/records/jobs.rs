//! The job records' statements (table `jobs`; the scheduler's logic is `cluster::jobs`):
//! inserts, re-queues, claims, ends, the janitor's re-queues and copies' checks, placement.
//! Every change of a record's state is notified on [`JOBS_CHANNEL`]: `queued` (work to claim;
//! `queued <project>/<id>` for a job queued again to run anew), `running <project>/<id>` (a
//! claim), `ended <project>/<id>` (an end).

use std::time::Duration;

use tokio_postgres::Client;

use super::{
    alive_sql, query_error, sql_sources, sql_target, still_its_run_sql, stored_state, Pooled,
    RecordsError,
};
use crate::cluster::{JOBS_CHANNEL, LOGS_CHANNEL};
use crate::jobs::JobRequest;
use crate::service::JobState;

/// The payload of the notification that job `project/id` was queued again to run anew (a
/// rebuild, a failed job asked again): work to claim, and its build is about to change.
pub(in crate::cluster) fn requeued_payload(project: &str, id: &str) -> String {
    format!("queued {project}/{id}")
}

/// The payload of the notification that job `project/id` ended.
pub(in crate::cluster) fn ended_payload(project: &str, id: &str) -> String {
    format!("ended {project}/{id}")
}

/// A claimed job, as its record stores it.
#[derive(Debug)]
pub(in crate::cluster) struct Claimed {
    pub(in crate::cluster) project: String,
    pub(in crate::cluster) id: String,
    /// The stored request (JSON).
    pub(in crate::cluster) request: String,
    pub(in crate::cluster) retries: i32,
    pub(in crate::cluster) retried_from: Option<String>,
    /// The run's fencing token: what its end must carry.
    pub(in crate::cluster) attempt: i32,
}

/// Claim for agent `me` the oldest queued job it may take (its own preferred jobs first; one
/// preferred by another agent after `grace`, or when that agent is not alive by
/// `agent_timeout`, or full and busy ([`busy_sql`]); none before its `not_before`), mark it
/// `running` by `me` as its next attempt (the fencing token) and notify the claim — one
/// statement (one round trip, atomic; the notification delivered at its commit). With whether
/// any record was queued before it (`false`: nothing to claim, no need to look again before a
/// `queued` notification).
pub(in crate::cluster) async fn claim(
    client: &Pooled,
    me: &str,
    grace: Duration,
    agent_timeout: Duration,
) -> Result<(Option<Claimed>, bool), RecordsError> {
    let g = query_error(format!("claiming a job for agent {me}"));
    let sql = format!(
        "WITH pick AS (
             SELECT j.project, j.id
               FROM jobs j
              WHERE j.state IN ({claimable})
                AND (j.not_before IS NULL OR j.not_before <= now())
                AND (j.preferred_agent IS NULL OR j.preferred_agent = $1
                     OR j.queued_at < now() - make_interval(secs => $2)
                     OR NOT EXISTS (
                         SELECT 1 FROM agents a
                          WHERE a.name = j.preferred_agent AND {alive}
                            AND (NOT {busy}
                                 OR a.capacity > (SELECT count(*) FROM jobs r
                                                   WHERE r.state = 'running'
                                                     AND r.agent = a.name))))
              ORDER BY (j.preferred_agent IS NOT DISTINCT FROM $1) DESC, j.queued_at
              LIMIT 1
                FOR UPDATE OF j SKIP LOCKED),
         upd AS (
             UPDATE jobs u SET state = '{running}', agent = $1, started_at = now(),
                    attempt = u.attempt + 1, not_before = NULL
               FROM pick
              WHERE u.project = pick.project AND u.id = pick.id
          RETURNING u.project, u.id, u.request::text AS request, u.retries, u.retried_from,
                    u.attempt),
         sent AS (SELECT pg_notify($4, 'running ' || upd.project || '/' || upd.id) FROM upd)
         SELECT upd.project, upd.id, upd.request, upd.retries, upd.retried_from, upd.attempt,
                EXISTS (SELECT 1 FROM jobs WHERE state = 'queued'),
                (SELECT count(*) FROM sent)
           FROM (SELECT 1) one LEFT JOIN upd ON true",
        claimable = sql_sources(JobState::claim),
        alive = alive_sql("a", "$3"),
        busy = busy_sql("a"),
        running = sql_target(JobState::Queued, JobState::claim)
    );
    let statement = client.prepare_cached(&sql).await.map_err(&g)?;
    let row = client
        .query_one(
            &statement,
            &[
                &me,
                &grace.as_secs_f64(),
                &agent_timeout.as_secs_f64(),
                &JOBS_CHANNEL,
            ],
        )
        .await
        .map_err(&g)?;
    let left: bool = row.try_get(6).map_err(&g)?;
    let Some(project) = row.try_get::<_, Option<String>>(0).map_err(&g)? else {
        return Ok((None, left));
    };
    let claim = Claimed {
        project,
        id: row.try_get(1).map_err(&g)?,
        request: row.try_get(2).map_err(&g)?,
        retries: row.try_get(3).map_err(&g)?,
        retried_from: row.try_get(4).map_err(&g)?,
        attempt: row.try_get(5).map_err(&g)?,
    };
    Ok((Some(claim), left))
}

/// The last successful build of a group, and whether the agent holding it is alive.
#[derive(Debug)]
pub(in crate::cluster) struct GroupBuild {
    pub(in crate::cluster) id: String,
    pub(in crate::cluster) agent: Option<String>,
    pub(in crate::cluster) agent_url: Option<String>,
    pub(in crate::cluster) agent_alive: bool,
}

/// The last successful build of group `group` of `project`, if any.
/// (Asked before each run of a group's job: prepared once per connection.)
pub(in crate::cluster) async fn last_of_group(
    client: &Pooled,
    project: &str,
    group: &str,
    agent_timeout: Duration,
) -> Result<Option<GroupBuild>, RecordsError> {
    let g = query_error(format!("the last build of group {project}/{group}"));
    let statement = client
        .prepare_cached(&format!(
            "SELECT j.id, j.agent, a.advertise_url, COALESCE({}, false)
               FROM jobs j LEFT JOIN agents a ON a.name = j.agent
              WHERE j.project = $1 AND j.group_name = $2 AND j.state = 'ready'
              ORDER BY j.ended_at DESC LIMIT 1",
            alive_sql("a", "$3")
        ))
        .await
        .map_err(&g)?;
    let row = client
        .query_opt(
            &statement,
            &[&project, &group, &agent_timeout.as_secs_f64()],
        )
        .await
        .map_err(&g)?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(GroupBuild {
        id: row.try_get(0).map_err(&g)?,
        agent: row.try_get(1).map_err(&g)?,
        agent_url: row.try_get(2).map_err(&g)?,
        agent_alive: row.try_get(3).map_err(&g)?,
    }))
}

/// Give job `project/id`, claimed by `me` as `attempt`, back to the queue (unless it moved on
/// meanwhile), and notify.
pub(in crate::cluster) async fn unclaim(
    client: &Client,
    project: &str,
    id: &str,
    me: &str,
    attempt: i32,
) -> Result<(), RecordsError> {
    let g = query_error(format!("giving job {project}/{id} back to the queue"));
    client
        .execute(
            &format!(
                "UPDATE jobs SET state = '{queued}', agent = NULL, started_at = NULL
                  WHERE project = $1 AND id = $2 AND state IN ({running}) AND agent = $3
                    AND attempt = $4",
                queued = sql_target(JobState::Running, JobState::requeue),
                running = sql_sources(JobState::requeue)
            ),
            &[&project, &id, &me, &attempt],
        )
        .await
        .map_err(&g)?;
    client
        .execute("SELECT pg_notify($1, 'queued')", &[&JOBS_CHANNEL])
        .await
        .map_err(&g)?;
    Ok(())
}

/// The end of job `project/id` that agent `me` ran as `attempt`: its state and stored
/// BuildInfo (JSON; its `StartedAt` is `started_at`), and whether it ran in its container (the
/// project's image is then cached on `me`).
pub(in crate::cluster) struct End<'a> {
    pub(in crate::cluster) state: JobState,
    pub(in crate::cluster) build_info: &'a str,
    pub(in crate::cluster) started_at: &'a str,
    pub(in crate::cluster) built_here: bool,
    pub(in crate::cluster) attempt: i32,
    /// The run's whole log, when it was not shipped (`logs::WholeLog`): written with the end.
    pub(in crate::cluster) log: Option<EndLog<'a>>,
}

/// A short run's whole log, recorded with its end: the previous run's chunks go, each stream's
/// one chunk (at offset 0) goes in, and `notice` is notified on the logs' channel.
pub(in crate::cluster) struct EndLog<'a> {
    pub(in crate::cluster) run: &'a str,
    pub(in crate::cluster) streams: Vec<&'a str>,
    pub(in crate::cluster) data: Vec<&'a [u8]>,
    pub(in crate::cluster) notice: String,
}

/// Record `end` (one statement: one round trip, atomic): the record (still `me`'s at this
/// attempt, or queued again meanwhile and not claimed by another agent yet: the fence), the
/// run's whole log if it goes with it ([`EndLog`], notified before the end), the end's
/// notification, and the project's image on `me` (its time written at most once a minute: not
/// a write per job). [`Recorded::Already`] when this very end is recorded already (a retry
/// after a lost reply: nothing written or notified again).
pub(in crate::cluster) async fn record_end(
    client: &Pooled,
    project: &str,
    id: &str,
    me: &str,
    end: &End<'_>,
) -> Result<Recorded, RecordsError> {
    let g = query_error(format!("recording the end of job {project}/{id}"));
    let statement = client
        .prepare_cached(&format!(
            "WITH upd AS (
                 UPDATE jobs SET state = $4, agent = $3, build_info = $5::text::jsonb,
                        ended_at = now(), not_before = NULL
                  WHERE project = $1 AND id = $2 AND attempt = $9
                    AND {}
                 RETURNING 1),
             done AS (
                 SELECT 1 FROM jobs
                  WHERE project = $1 AND id = $2 AND attempt = $9 AND agent = $3
                    AND state IN ('ready', 'failed') AND build_info->>'StartedAt' = $10),
             gone AS (
                 DELETE FROM job_logs
                  WHERE $11 AND project = $1 AND id = $2 AND EXISTS (SELECT 1 FROM upd)
                 RETURNING 1),
             -- After the old run's chunks went (reading `gone` runs it first).
             ins AS (
                 INSERT INTO job_logs (project, id, stream, pos, data, agent, run)
                 SELECT $1, $2, c.s, 0, c.d, $3, $12
                   FROM unnest($13::text[], $14::bytea[]) AS c(s, d)
                  WHERE EXISTS (SELECT 1 FROM upd) AND (SELECT count(*) FROM gone) >= 0
                 ON CONFLICT DO NOTHING
                 RETURNING 1),
             logged AS (
                 SELECT pg_notify($15, $16)
                  WHERE $11 AND EXISTS (SELECT 1 FROM upd) AND (SELECT count(*) FROM ins) >= 0),
             -- The end's notification after the log's.
             sent AS (SELECT pg_notify($6, $7) FROM upd WHERE (SELECT count(*) FROM logged) >= 0),
             img AS (
                 INSERT INTO agent_images (agent, project)
                 SELECT $3, $1 FROM upd WHERE $8
                 ON CONFLICT (agent, project) DO UPDATE SET built_at = now()
                    WHERE agent_images.built_at < now() - interval '1 minute'
                 RETURNING 1)
             -- `done` is looked up only when nothing was updated (a retry).
             SELECT (SELECT count(*) FROM upd),
                    CASE WHEN EXISTS (SELECT 1 FROM upd) THEN 0
                         ELSE (SELECT count(*) FROM done) END,
                    (SELECT count(*) FROM sent)",
            still_its_run_sql("$3")
        ))
        .await
        .map_err(&g)?;
    let (run, streams, data, notice) = match &end.log {
        Some(l) => (l.run, &l.streams[..], &l.data[..], l.notice.as_str()),
        None => ("", &[][..], &[][..], ""),
    };
    let row = client
        .query_one(
            &statement,
            &[
                &project,
                &id,
                &me,
                &end.state.as_str(),
                &end.build_info,
                &JOBS_CHANNEL,
                &ended_payload(project, id),
                &end.built_here,
                &end.attempt,
                &end.started_at,
                &end.log.is_some(),
                &run,
                &streams,
                &data,
                &LOGS_CHANNEL,
                &notice,
            ],
        )
        .await
        .map_err(&g)?;
    let (now, already): (i64, i64) = (row.try_get(0).map_err(&g)?, row.try_get(1).map_err(&g)?);
    Ok(if now > 0 {
        Recorded::Now
    } else if already > 0 {
        Recorded::Already
    } else {
        Recorded::Fenced
    })
}

/// What became of a job's end ([`record_end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::cluster) enum Recorded {
    /// Recorded now, and notified.
    Now,
    /// Recorded already (by this very end, whose reply was lost).
    Already,
    /// The record moved on: refused.
    Fenced,
}

/// Whether a run of job `project/id` by `me` as `attempt` may still publish its build (the
/// fence, checked before the build goes to `ready/`): the record is still that run's, or
/// queued again and not claimed by another agent since.
pub(in crate::cluster) async fn fence_holds(
    client: &Pooled,
    project: &str,
    id: &str,
    me: &str,
    attempt: i32,
) -> Result<bool, RecordsError> {
    let g = query_error(format!("checking the fence of job {project}/{id}"));
    let statement = client
        .prepare_cached(&format!(
            "SELECT EXISTS (SELECT 1 FROM jobs
                             WHERE project = $1 AND id = $2 AND attempt = $4 AND {})",
            still_its_run_sql("$3")
        ))
        .await
        .map_err(&g)?;
    client
        .query_one(&statement, &[&project, &id, &me, &attempt])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(g)
}

/// A `running` record whose run is lost: its agent is not alive, it crashed (the record was
/// started before the agent's registration), or the run is an orphan (nobody runs it).
#[derive(Debug, Clone)]
pub(in crate::cluster) struct LostRun {
    pub(in crate::cluster) project: String,
    pub(in crate::cluster) id: String,
    pub(in crate::cluster) agent: String,
    /// The attempt that is lost (the fence of every change made to it).
    pub(in crate::cluster) attempt: i32,
    /// Times the job was put back in the queue before.
    pub(in crate::cluster) retries: i32,
    /// The stored request (JSON).
    pub(in crate::cluster) request: String,
    /// When the run started (claimed), in seconds since the epoch by the database's clock.
    pub(in crate::cluster) started_at: Option<f64>,
}

/// Which lost runs [`lost_runs`] looks for.
pub(in crate::cluster) enum Lost<'a> {
    /// The runs of agents that are not alive by the timeout (seconds; see
    /// [`super::alive_sql`]).
    DeadAgents(Duration),
    /// Agent `.0`'s runs started before its registration (it crashed).
    Crashed(&'a str),
    /// Agent `.0`'s runs started more than `.1` ago, to compare with the runs it knows.
    Mine(&'a str, Duration),
}

/// The `running` records whose run may be lost (see [`Lost`]).
pub(in crate::cluster) async fn lost_runs(
    client: &Pooled,
    which: Lost<'_>,
) -> Result<Vec<LostRun>, RecordsError> {
    let select = "SELECT j.project, j.id, j.agent, j.attempt, j.retries, j.request::text,
                         EXTRACT(EPOCH FROM j.started_at)::float8
                    FROM jobs j";
    let (me, seconds);
    let (sql, params, what): (
        String,
        Vec<&(dyn tokio_postgres::types::ToSql + Sync)>,
        String,
    ) = match which {
        Lost::DeadAgents(timeout) => {
            seconds = timeout.as_secs_f64();
            (
                format!(
                    "{select} WHERE j.state = 'running' AND NOT EXISTS (
                         SELECT 1 FROM agents a WHERE a.name = j.agent AND {})",
                    alive_sql("a", "$1")
                ),
                vec![&seconds],
                "the jobs of dead agents".to_string(),
            )
        }
        Lost::Crashed(name) => {
            me = name;
            (
                format!(
                    "{select} JOIN agents a ON a.name = j.agent
                      WHERE j.state = 'running' AND j.agent = $1
                        AND j.started_at < a.started_at"
                ),
                vec![&me],
                format!("the jobs agent {name} left running"),
            )
        }
        Lost::Mine(name, older) => {
            (me, seconds) = (name, older.as_secs_f64());
            (
                format!(
                    "{select} WHERE j.state = 'running' AND j.agent = $1
                        AND j.started_at < now() - make_interval(secs => $2)"
                ),
                vec![&me, &seconds],
                format!("the jobs agent {name} runs"),
            )
        }
    };
    let g = query_error(what);
    // Prepared once per connection (the sweeper asks every `heartbeat`).
    let statement = client.prepare_cached(&sql).await.map_err(&g)?;
    client
        .query(&statement, &params)
        .await
        .map_err(&g)?
        .iter()
        .map(|r| {
            Ok(LostRun {
                project: r.try_get(0)?,
                id: r.try_get(1)?,
                agent: r.try_get(2)?,
                attempt: r.try_get(3)?,
                retries: r.try_get(4)?,
                request: r.try_get(5)?,
                started_at: r.try_get(6)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(g)
}

/// Put lost run `run` back in the queue (claimable after `backoff`; a `retry` counts:
/// `retries` + 1, `retried_from` its agent), if the record is still that run; notify. `false`
/// when it moved on.
pub(in crate::cluster) async fn requeue_lost(
    client: &Client,
    run: &LostRun,
    backoff: Duration,
    retry: bool,
) -> Result<bool, RecordsError> {
    let g = query_error(format!("queueing job {}/{} again", run.project, run.id));
    let n: i64 = client
        .query_one(
            &format!(
                "WITH upd AS (
                     UPDATE jobs SET state = '{queued}',
                            retried_from = CASE WHEN $7 THEN agent ELSE retried_from END,
                            retries = retries + CASE WHEN $7 THEN 1 ELSE 0 END,
                            agent = NULL, queued_at = now(), started_at = NULL,
                            not_before = now() + make_interval(secs => $5)
                      WHERE project = $1 AND id = $2 AND state IN ({running}) AND agent = $3
                        AND attempt = $4
                     RETURNING 1),
                 sent AS (SELECT pg_notify($6, 'queued') FROM upd)
                 SELECT (SELECT count(*) FROM upd) + 0 * (SELECT count(*) FROM sent)",
                queued = sql_target(JobState::Running, JobState::requeue),
                running = sql_sources(JobState::requeue)
            ),
            &[
                &run.project,
                &run.id,
                &run.agent,
                &run.attempt,
                &backoff.as_secs_f64(),
                &JOBS_CHANNEL,
                &retry,
            ],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(g)?;
    Ok(n == 1)
}

/// End lost run `run` as failed with BuildInfo `build_info` (JSON), if the record is still
/// that run (its attempts are used up); notify its end. `false` when it moved on.
pub(in crate::cluster) async fn fail_lost(
    client: &Client,
    run: &LostRun,
    build_info: &str,
) -> Result<bool, RecordsError> {
    let g = query_error(format!("failing job {}/{}", run.project, run.id));
    let n: i64 = client
        .query_one(
            "WITH upd AS (
                 UPDATE jobs SET state = 'failed', retried_from = agent, agent = NULL,
                        build_info = $5::text::jsonb, ended_at = now(), not_before = NULL
                  WHERE project = $1 AND id = $2 AND state = 'running' AND agent = $3
                    AND attempt = $4
                 RETURNING 1),
             sent AS (SELECT pg_notify($6, $7) FROM upd)
             SELECT (SELECT count(*) FROM upd) + 0 * (SELECT count(*) FROM sent)",
            &[
                &run.project,
                &run.id,
                &run.agent,
                &run.attempt,
                &build_info,
                &JOBS_CHANNEL,
                &ended_payload(&run.project, &run.id),
            ],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(g)?;
    Ok(n == 1)
}

/// Of the jobs `(projects[i], ids[i])` (copies on agent `me`), the records whose agent is
/// another one: (project, id, agent, the stored build's `StartedAt`).
pub(in crate::cluster) async fn held_elsewhere(
    client: &Client,
    projects: &[&str],
    ids: &[&str],
    me: &str,
) -> Result<Vec<(String, String, Option<String>, Option<String>)>, RecordsError> {
    let g = query_error(format!(
        "checking agent {me}'s copies against their records"
    ));
    let rows = client
        .query(
            "SELECT j.project, j.id, j.agent, j.build_info->>'StartedAt'
               FROM jobs j
               JOIN unnest($1::text[], $2::text[]) AS l(project, id)
                 ON j.project = l.project AND j.id = l.id
              WHERE j.agent IS DISTINCT FROM $3",
            &[&projects, &ids, &me],
        )
        .await
        .map_err(&g)?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            Some((
                r.try_get(0).ok()?,
                r.try_get(1).ok()?,
                r.try_get(2).ok()?,
                r.try_get(3).ok()?,
            ))
        })
        .collect())
}

/// Whether the database answers.
pub(in crate::cluster) async fn ping(client: &Client) -> Result<(), RecordsError> {
    client
        .simple_query("SELECT 1")
        .await
        .map_err(query_error("a ping"))?;
    Ok(())
}

/// Whether the cluster's queue is full: its queued records are at least the free slots of the
/// alive agents (capacity − their `running` records; not the heartbeats' counts, which lag
/// behind by up to a `heartbeat`) plus `backlog`.
pub(in crate::cluster) async fn queue_full(
    client: &Pooled,
    backlog: i64,
    agent_timeout: Duration,
) -> Result<bool, RecordsError> {
    let g = query_error("the cluster's queue length");
    let statement = client
        .prepare_cached(&format!("SELECT {}", queue_full_sql("$1", "$2")))
        .await
        .map_err(&g)?;
    client
        .query_one(&statement, &[&backlog, &agent_timeout.as_secs_f64()])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(g)
}

/// SQL: whether the cluster's queue is full (see [`queue_full`]); `backlog` and `timeout` the
/// placeholders of the backlog and of `agent_timeout` in seconds.
fn queue_full_sql(backlog: &str, timeout: &str) -> String {
    format!(
        "(SELECT count(*) FROM jobs WHERE state = 'queued') >=
         {backlog}::int8
           + COALESCE((SELECT sum(GREATEST(a.capacity - (SELECT count(*) FROM jobs r
                                                          WHERE r.state = 'running'
                                                            AND r.agent = a.name), 0))::int8
                         FROM agents a WHERE {}),
                      0)",
        alive_sql("a", timeout)
    )
}

/// The preferred agent of a job (SQL, `$1` project, `$2` group, `me` and `timeout` the
/// placeholders of this agent's name and of `agent_timeout` in seconds, `free` an SQL
/// condition: this agent has a free slot): the agent holding the group's last successful
/// build, when it is alive; else this agent (the one taking the request), when it has the
/// project's image (table `agent_images`) and either a free slot or a short wait for one
/// ([`waits_briefly`]) — its answer then needs no copy from another agent; else an alive agent
/// with free capacity that has the project's image; else the least loaded alive agent
/// (`running` records / capacity). Ties go to this agent, then by name.
fn preferred(me: &str, timeout: &str, free: &str) -> String {
    let (h_alive, a_alive) = (alive_sql("h", timeout), alive_sql("a", timeout));
    let brief = waits_briefly(me);
    format!(
        "COALESCE(
           (SELECT h.name
              FROM (SELECT p.agent FROM jobs p
                     WHERE p.project = $1 AND p.group_name = $2 AND $2 <> ''
                       AND p.state = 'ready'
                     ORDER BY p.ended_at DESC LIMIT 1) l
              JOIN agents h ON h.name = l.agent
             WHERE {h_alive}),
           (SELECT i.agent FROM agent_images i
             WHERE i.agent = {me} AND i.project = $1 AND ({free} OR {brief})),
           (SELECT a.name FROM agents a,
                   LATERAL (SELECT count(*) AS n FROM jobs r
                             WHERE r.state = 'running' AND r.agent = a.name) r
             WHERE {a_alive}
             ORDER BY (a.capacity > r.n
                       AND EXISTS (SELECT 1 FROM agent_images i
                                    WHERE i.agent = a.name AND i.project = $1)) DESC,
                      r.n::float8 / a.capacity, a.name = {me} DESC, a.name
             LIMIT 1))"
    )
}

/// SQL: agent `a` (an alias of `agents`) is *busy*: one of its `running` jobs started over
/// [`BRIEF_RUN`] ago. An agent that is full but not busy frees a slot soon (its jobs are
/// short so far): a job waits for it rather than run elsewhere and be copied back.
fn busy_sql(a: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM jobs b
                  WHERE b.state = 'running' AND b.agent = {a}.name
                    AND b.started_at < now() - make_interval(secs => {}))",
        BRIEF_RUN.as_secs_f64()
    )
}

/// How long a running job may have run for its agent not to be busy ([`busy_sql`]).
pub(in crate::cluster) const BRIEF_RUN: Duration = Duration::from_millis(500);

/// SQL: agent `me` (a placeholder) is worth waiting for: not busy ([`busy_sql`]), and fewer jobs
/// queued for it (preferred) than its capacity — a new job there waits for at most one round
/// of short runs.
fn waits_briefly(me: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM agents w
                  WHERE w.name = {me} AND NOT {}
                    AND w.capacity > (SELECT count(*) FROM jobs q
                                       WHERE q.state = 'queued' AND q.preferred_agent = w.name))",
        busy_sql("w")
    )
}

/// SQL: agent `me` (a placeholder) has a free slot by the records (`running` records below its
/// capacity).
fn own_free_slot(me: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM agents m
                  WHERE m.name = {me}
                    AND m.capacity > (SELECT count(*) FROM jobs r
                                       WHERE r.state = 'running' AND r.agent = m.name))"
    )
}

/// A job to insert: its project, group, ID and stored request (JSON).
pub(in crate::cluster) struct NewJob<'a> {
    pub(in crate::cluster) project: &'a str,
    pub(in crate::cluster) group: &'a str,
    pub(in crate::cluster) id: &'a str,
    pub(in crate::cluster) request: &'a str,
}

impl<'a> NewJob<'a> {
    /// Job `id` of `req`, whose stored request is `request` (`records::request_json`).
    pub(in crate::cluster) fn of(req: &'a JobRequest, id: &'a str, request: &'a str) -> Self {
        NewJob {
            project: &req.project,
            group: &req.group,
            id,
            request,
        }
    }
}

/// What [`insert`] did.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::cluster) enum Inserted {
    /// Inserted in this state.
    As(JobState),
    /// Another agent inserted it first.
    Exists,
    /// Not inserted: the cluster's queue is full ([`queue_full`]).
    QueueFull,
}

/// Insert `job` (one statement: one round trip, atomic, the backlog's check and a queued
/// job's notification included; a job inserted `running` notifies nobody: no waiter can have
/// seen it queued, and `Scheduler::until_running` reads the record first): `running` by `me`
/// at once when `me` is its preferred agent ([`preferred`]; its first attempt) and either
/// `here` (a free slot on `me`) or `soon` (the run may wait on `me` for a slot, and the
/// records agree that the wait is brief: [`waits_briefly`]), else `queued` with its preferred
/// agent unless the cluster's queue is full (its queued records at least the alive agents'
/// free slots plus `backlog`, as [`queue_full`]; a job that runs at once joins no queue).
/// Not when the job has a record under the ID `unless` either ([`Inserted::Exists`]; `""`:
/// no such ID), so that a request can insert before it reads (a new job's one round trip).
pub(in crate::cluster) async fn insert(
    client: &Pooled,
    job: &NewJob<'_>,
    (here, soon): (bool, bool),
    me: &str,
    agent_timeout: Duration,
    backlog: i64,
    unless: &str,
) -> Result<Inserted, RecordsError> {
    if job.group.is_empty() && (here || soon) {
        if let Some(inserted) = insert_here(client, job, here, me, unless).await? {
            return Ok(inserted);
        }
    }
    let g = query_error(format!("inserting job {}/{}", job.project, job.id));
    // `here` and `soon` are written in the statement, not passed: one statement per case,
    // each planned once per connection (see [`Pooled`]).
    let (free, mine) = match (here, soon) {
        (true, _) => ("true".to_string(), "true".to_string()),
        (false, true) => ("false".to_string(), waits_briefly("$5")),
        (false, false) => ("false".to_string(), "false".to_string()),
    };
    let sql = format!(
        "WITH qfull AS (SELECT {} AS yes),
              pref AS (SELECT {} AS agent),
              mine AS (SELECT ({mine})
                              AND (pref.agent IS NULL OR pref.agent = $5) AS yes
                         FROM pref),
              ins AS (
                  INSERT INTO jobs (project, id, group_name, request, preferred_agent,
                                    state, agent, started_at, attempt)
                  SELECT $1, $3, $2, $4::text::jsonb, pref.agent,
                         CASE WHEN mine.yes THEN 'running' ELSE 'queued' END,
                         CASE WHEN mine.yes THEN $5 END,
                         CASE WHEN mine.yes THEN now() END,
                         CASE WHEN mine.yes THEN 1 ELSE 0 END
                    FROM pref, mine, qfull
                   WHERE (mine.yes OR NOT qfull.yes)
                     AND NOT EXISTS (SELECT 1 FROM jobs u WHERE u.project = $1 AND u.id = $9)
                  ON CONFLICT (project, id) DO NOTHING
                  RETURNING state),
              sent AS (SELECT pg_notify($7, 'queued') FROM ins WHERE ins.state = 'queued')
         SELECT (SELECT ins.state FROM ins), qfull.yes, (SELECT count(*) FROM sent)
           FROM qfull",
        queue_full_sql("$8", "$6"),
        preferred("$5", "$6", &free),
    );
    let statement = client.prepare_cached(&sql).await.map_err(&g)?;
    let row = client
        .query_one(
            &statement,
            &[
                &job.project,
                &job.group,
                &job.id,
                &job.request,
                &me,
                &agent_timeout.as_secs_f64(),
                &JOBS_CHANNEL,
                &backlog,
                &unless,
            ],
        )
        .await
        .map_err(&g)?;
    let state: Option<String> = row.try_get(0).map_err(&g)?;
    let full: bool = row.try_get(1).map_err(&g)?;
    Ok(match state {
        Some(state) => Inserted::As(stored_state(&state)?),
        None if full => Inserted::QueueFull,
        None => Inserted::Exists,
    })
}

/// [`insert`]'s common case, a statement PostgreSQL plans in a fraction of the whole one's
/// time (the whole one's planning was most of a new job's database time): a job of no group,
/// with a free slot on `me` (`here`) or a brief wait there (else [`waits_briefly`] by the
/// records), is `me`'s to run when `me` has the project's image — what [`preferred`] chooses
/// then, `me` — and is inserted `running` by `me` (no notification, as [`insert`]). `None`
/// when the records do not make `me` its agent (no image recorded, or the wait not brief):
/// the whole statement decides then.
///
/// Two statements, one per case, rather than one with `$here OR <the wait is brief>`, so that
/// each is planned once per connection (see [`Pooled`]).
async fn insert_here(
    client: &Pooled,
    job: &NewJob<'_>,
    here: bool,
    me: &str,
    unless: &str,
) -> Result<Option<Inserted>, RecordsError> {
    let g = query_error(format!("inserting job {}/{}", job.project, job.id));
    let brief = if here {
        String::new()
    } else {
        format!("AND {}", waits_briefly("$5"))
    };
    let sql = format!(
        "WITH mine AS (SELECT EXISTS (SELECT 1 FROM agent_images i
                                        WHERE i.agent = $5 AND i.project = $1)
                              {brief} AS yes),
              ins AS (
                  INSERT INTO jobs (project, id, group_name, request, preferred_agent,
                                    state, agent, started_at, attempt)
                  SELECT $1, $2, '', $3::text::jsonb, $5, 'running', $5, now(), 1
                    FROM mine
                   WHERE mine.yes
                     AND NOT EXISTS (SELECT 1 FROM jobs u WHERE u.project = $1 AND u.id = $4)
                  ON CONFLICT (project, id) DO NOTHING
                  RETURNING state)
         SELECT (SELECT ins.state FROM ins), mine.yes
           FROM mine"
    );
    let statement = client.prepare_cached(&sql).await.map_err(&g)?;
    let row = client
        .query_one(
            &statement,
            &[&job.project, &job.id, &job.request, &unless, &me],
        )
        .await
        .map_err(&g)?;
    let state: Option<String> = row.try_get(0).map_err(&g)?;
    let mine: bool = row.try_get(1).map_err(&g)?;
    Ok(match state {
        Some(state) => Some(Inserted::As(stored_state(&state)?)),
        None if mine => Some(Inserted::Exists),
        None => None,
    })
}

/// Queue job `job` again (its request stored anew), if its record is still `state`, by
/// `agent`, for the stored request `stored` (a record deleted and inserted again by another
/// request meanwhile is not this one); its preferred agent chosen again; notify. `false` when
/// the record changed.
pub(in crate::cluster) async fn rerun(
    client: &mut Client,
    job: &NewJob<'_>,
    (state, agent, stored): (JobState, Option<&str>, &str),
    me: &str,
    agent_timeout: Duration,
) -> Result<bool, RecordsError> {
    // A job in flight is joined, never queued again.
    let Some(to) = state.rerun() else {
        return Ok(false);
    };
    let g = query_error(format!("queueing job {}/{} again", job.project, job.id));
    let tx = client.transaction().await.map_err(&g)?;
    let n = tx
        .execute(
            &format!(
                "UPDATE jobs SET state = '{}', agent = NULL, build_info = NULL,
                        attempt = attempt + 1,
                        request = $4::text::jsonb, retries = 0, retried_from = NULL,
                        queued_at = now(), started_at = NULL, ended_at = NULL,
                        not_before = NULL, preferred_agent = {}
                  WHERE project = $1 AND id = $3 AND state = $5
                    AND agent IS NOT DISTINCT FROM $6 AND request = $9::text::jsonb",
                to.as_str(),
                preferred("$7", "$8", &own_free_slot("$7"))
            ),
            &[
                &job.project,
                &job.group,
                &job.id,
                &job.request,
                &state.as_str(),
                &agent,
                &me,
                &agent_timeout.as_secs_f64(),
                &stored,
            ],
        )
        .await
        .map_err(&g)?;
    if n == 1 {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&JOBS_CHANNEL, &requeued_payload(job.project, job.id)],
        )
        .await
        .map_err(&g)?;
    }
    tx.commit().await.map_err(&g)?;
    Ok(n == 1)
}
