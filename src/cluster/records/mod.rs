//! The cluster's records: every SQL statement of the cluster lives in this module (a check in
//! `tests/module_graph.rs` keeps it so), by table or concern — `jobs.rs` the job records
//! (inserts, claims, ends, re-queues, placement), `logs.rs` the central log chunks and the
//! retention, `agents.rs` the agents' rows, `view.rs` the cluster's lists and gauges,
//! `schema.rs` the migration runner's and the probe's statements. Each function takes a
//! connection (`tokio_postgres::Client`, or a pooled one through `Deref`; the hot statements of
//! a request and a run take a [`Pooled`] one, whose prepared statements are kept) and returns
//! typed rows or a [`RecordsError`] naming what it did; the other cluster modules keep their
//! logic.
//!
//! Here too: a job's record as a request reads it, its stored request and typed state, and
//! whether a copy of a build on this agent is the recorded one.

use std::time::Duration;

/// A pooled connection: the hot statements (a request's, a run's) are prepared once per
/// connection with `prepare_cached` — one round trip each afterwards, not two (prepare, then
/// execute) — and planned once per connection too, which a parameter that can remove a costly
/// sub-plan (`$flag OR <sub-query>`) prevents: PostgreSQL then plans the statement anew at
/// every execution, its custom plan always looking cheaper than the generic one (0.4 ms of a
/// new job's database time, for the insert). Such a choice is written in the statement's text
/// instead, one prepared statement per case; test
/// `cluster_jobs::a_new_jobs_statements_are_planned_once_per_connection_not_at_every_job`
/// checks a new job's statements.
pub(super) type Pooled = deadpool_postgres::ClientWrapper;

use crate::jobs::{BuildInfo, Identity, Input, JobRequest};
use crate::service::JobState;

pub(super) mod agents;
pub(super) mod jobs;
pub(super) mod logs;
pub(super) mod schema;
pub(super) mod view;

/// What a statement on the records could not do.
#[derive(Debug, thiserror::Error)]
pub(super) enum RecordsError {
    /// The database refused or did not answer; `what` names the statement's object (the job,
    /// the agent, ...).
    #[error("{what}: {source}")]
    Query {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A record's state the typed state does not know (the column's CHECK allows no other).
    #[error("unknown job state {0:?} in the records")]
    UnknownState(String),
}

/// A `tokio_postgres` error of the statement about `what`.
pub(super) fn query_error(
    what: impl Into<String>,
) -> impl Fn(tokio_postgres::Error) -> RecordsError {
    let what = what.into();
    move |source| RecordsError::Query {
        what: what.clone(),
        source,
    }
}

/// A job's record, as a request reads it.
#[derive(Debug)]
pub(super) struct Record {
    pub(super) state: JobState,
    pub(super) agent: Option<String>,
    pub(super) agent_url: Option<String>,
    pub(super) agent_alive: bool,
    pub(super) build_info: Option<String>,
    /// The stored request (JSON).
    pub(super) request: String,
    /// The fencing token of its runs: incremented by every claim.
    pub(super) attempt: i32,
}

impl Record {
    /// Whether the record is a job of a request with `identity` (the same group and params but
    /// the opaque ones; the project is the record's key).
    pub(super) fn is_for(&self, identity: &Identity) -> bool {
        request_from_json(&self.request).is_ok_and(|r| Identity::of(&r) == *identity)
    }
}

/// A record's stored state (the column's CHECK allows no other).
pub(super) fn stored_state(name: &str) -> Result<JobState, RecordsError> {
    JobState::parse(name).ok_or_else(|| RecordsError::UnknownState(name.to_string()))
}

/// The request as the record stores it (JSON text, cast to jsonb by the query).
pub(super) fn request_json(req: &JobRequest) -> String {
    serde_json::json!({
        "project": req.project,
        "group": req.group,
        "params": req.params,
        "inputs": req.inputs,
        "rebuild": req.rebuild,
    })
    .to_string()
}

pub(super) fn request_from_json(text: &str) -> Result<JobRequest, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Stored {
        project: String,
        #[serde(default)]
        group: String,
        #[serde(default)]
        params: std::collections::BTreeMap<String, String>,
        #[serde(default)]
        inputs: std::collections::BTreeMap<String, Input>,
        #[serde(default)]
        rebuild: bool,
    }
    let s: Stored = serde_json::from_str(text)?;
    Ok(JobRequest {
        project: s.project,
        params: s.params,
        group: s.group,
        rebuild: s.rebuild,
        inputs: s.inputs,
    })
}

/// SQL: a job's record (the columns of `jobs`, unqualified) is still the run of agent `me` (a
/// placeholder): running by it, or queued again meanwhile and not claimed by another agent yet.
/// The condition of every write a run makes: its log, its fence, its end.
pub(super) fn still_its_run_sql(me: &str) -> String {
    format!("((state = 'running' AND agent = {me}) OR state = 'queued')")
}

/// The SQL condition that agent row `a` is alive, `t` the SQL expression of the timeout in
/// seconds: not stopped, and a heartbeat within the timeout — or the database started less
/// than the timeout ago (an outage of the database alone silences every agent; none of them
/// died). The one liveness every statement judges by (placement, claims, the sweeper, reads,
/// the views). An agent that could not reach the database itself lately passes a timeout of
/// [`UNJUDGED`] (`cluster::jobs`): it takes nobody for dead.
pub(super) fn alive_sql(a: &str, t: &str) -> String {
    format!(
        "({a}.stopped_at IS NULL
          AND ({a}.last_heartbeat > now() - make_interval(secs => {t})
               OR pg_postmaster_start_time() > now() - make_interval(secs => {t})))"
    )
}

/// The timeout of an agent that cannot judge liveness now (see [`alive_sql`]): every agent
/// not stopped is alive.
pub(super) const UNJUDGED: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Job `project/id`'s record, with whether its agent is alive ([`alive_sql`] by
/// `agent_timeout`).
pub(super) async fn read(
    client: &Pooled,
    project: &str,
    id: &str,
    agent_timeout: Duration,
) -> Result<Option<Record>, RecordsError> {
    Ok(read_ids(client, project, [id, id], agent_timeout).await?.0)
}

/// The records of jobs `project/ids[0]` and `project/ids[1]` (one statement), as [`read`].
pub(super) async fn read_ids(
    client: &Pooled,
    project: &str,
    ids: [&str; 2],
    agent_timeout: Duration,
) -> Result<(Option<Record>, Option<Record>), RecordsError> {
    let g = query_error(format!("reading the record of job {project}/{}", ids[0]));
    let sql = format!(
        "SELECT j.id, j.state, j.agent, a.advertise_url, COALESCE({}, false),
                j.build_info::text, j.request::text, j.attempt
           FROM jobs j LEFT JOIN agents a ON a.name = j.agent
          WHERE j.project = $1 AND j.id IN ($2, $4)",
        alive_sql("a", "$3")
    );
    let statement = client.prepare_cached(&sql).await.map_err(&g)?;
    let rows = client
        .query(
            &statement,
            &[&project, &ids[0], &agent_timeout.as_secs_f64(), &ids[1]],
        )
        .await
        .map_err(&g)?;
    let mut found = (None, None);
    for r in rows {
        let id: String = r.try_get(0).map_err(&g)?;
        let rec = Record {
            state: stored_state(&r.try_get::<_, String>(1).map_err(&g)?)?,
            agent: r.try_get(2).map_err(&g)?,
            agent_url: r.try_get(3).map_err(&g)?,
            agent_alive: r.try_get(4).map_err(&g)?,
            build_info: r.try_get(5).map_err(&g)?,
            request: r.try_get(6).map_err(&g)?,
            attempt: r.try_get(7).map_err(&g)?,
        };
        if id == ids[0] {
            found.0 = Some(rec);
        } else {
            found.1 = Some(rec);
        }
    }
    if ids[0] == ids[1] {
        found.1 = None;
    }
    Ok(found)
}

/// The states `transition` leaves from, as an SQL list (`'queued', 'running'`): what a
/// conditional update of the records checks (only the enum's names, never outside text).
fn sql_sources(transition: impl Fn(JobState) -> Option<JobState>) -> String {
    JobState::sources(transition)
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The state `transition` leads to from `from`, for an update's `SET state = ...` (the
/// transitions the statements take are defined; `service`'s tests check them).
fn sql_target(from: JobState, transition: fn(JobState) -> Option<JobState>) -> &'static str {
    transition(from).unwrap_or(from).as_str()
}

/// Whether a copy here (`mine`) is not the build the record stores (another run of the job,
/// or a build of another request under the same ID).
pub(super) fn is_stale(mine: &BuildInfo, rec: &Record) -> bool {
    let theirs = rec
        .build_info
        .as_deref()
        .and_then(|t| serde_json::from_str::<BuildInfo>(t).ok());
    theirs.is_none_or(|t| {
        t.started_at != mine.started_at || !Identity::new(&t.group, &t.params).matches(mine)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statements_transitions_come_from_the_typed_state() {
        assert_eq!(sql_sources(JobState::claim), "'queued'");
        assert_eq!(sql_sources(JobState::requeue), "'running'");
        assert_eq!(sql_sources(JobState::rerun), "'ready', 'failed'");
        assert_eq!(sql_target(JobState::Queued, JobState::claim), "running");
        assert_eq!(sql_target(JobState::Running, JobState::requeue), "queued");
        assert_eq!(sql_target(JobState::Failed, JobState::rerun), "queued");
    }

    #[test]
    fn requests_round_trip_through_their_stored_json() {
        let mut req = JobRequest {
            project: "p".into(),
            group: "g".into(),
            rebuild: true,
            ..JobRequest::default()
        };
        req.params.insert("a".into(), "1".into());
        req.inputs.insert(
            "up".into(),
            Input {
                project: "q".into(),
                id: "abc".into(),
            },
        );
        assert_eq!(request_from_json(&request_json(&req)).unwrap(), req);
        assert!(request_from_json("{}").is_err());
    }
}
