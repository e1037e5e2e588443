//! The agents' statements (table `agents`; registration's logic is `cluster::agents`). Times
//! come from the database's clock (`now()`), never from the agents'.

use std::time::Duration;

use tokio_postgres::Client;

use super::{query_error, Pooled, RecordsError};
use crate::service::AgentInfo;

fn int(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Agent `name`'s row, if any: its advertise URL and whether it is alive (a heartbeat within
/// `agent_timeout`, not stopped).
pub(in crate::cluster) async fn previous(
    client: &Client,
    name: &str,
    agent_timeout: Duration,
) -> Result<Option<(String, bool)>, RecordsError> {
    let g = query_error(format!("reading agent {name}'s row"));
    let row = client
        .query_opt(
            "SELECT advertise_url,
                    stopped_at IS NULL AND last_heartbeat > now() - make_interval(secs => $2)
               FROM agents WHERE name = $1",
            &[&name, &agent_timeout.as_secs_f64()],
        )
        .await
        .map_err(&g)?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some((
        row.try_get(0).map_err(&g)?,
        row.try_get(1).map_err(&g)?,
    )))
}

/// Insert or take over agent `name`'s row: started now, alive, no jobs running.
pub(in crate::cluster) async fn upsert(
    client: &Client,
    name: &str,
    advertise_url: &str,
    capacity: usize,
    version: &str,
) -> Result<(), RecordsError> {
    client
        .execute(
            "INSERT INTO agents (name, advertise_url, capacity, running, version, started_at,
                                 last_heartbeat, stopped_at)
             VALUES ($1, $2, $3, 0, $4, now(), now(), NULL)
             ON CONFLICT (name) DO UPDATE SET
                 advertise_url = EXCLUDED.advertise_url, capacity = EXCLUDED.capacity,
                 running = 0, version = EXCLUDED.version, started_at = now(),
                 last_heartbeat = now(), stopped_at = NULL",
            &[&name, &advertise_url, &int(capacity), &version],
        )
        .await
        .map_err(query_error(format!("registering agent {name}")))?;
    Ok(())
}

/// A heartbeat of agent `name`: the time and the jobs running now; `false` when its row is gone.
pub(in crate::cluster) async fn heartbeat(
    client: &Pooled,
    name: &str,
    running: usize,
) -> Result<bool, RecordsError> {
    let g = query_error(format!("agent {name}'s heartbeat"));
    // Prepared once per connection (every `heartbeat`, on every agent).
    let statement = client
        .prepare_cached(
            "UPDATE agents SET last_heartbeat = now(), running = $2, stopped_at = NULL
              WHERE name = $1",
        )
        .await
        .map_err(&g)?;
    let n = client
        .execute(&statement, &[&name, &int(running)])
        .await
        .map_err(g)?;
    Ok(n > 0)
}

/// Agent `name` stopped gracefully: no jobs running, and not alive.
pub(in crate::cluster) async fn stopped(client: &Client, name: &str) -> Result<(), RecordsError> {
    client
        .execute(
            "UPDATE agents SET running = 0, stopped_at = now() WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(query_error(format!("marking agent {name} stopped")))?;
    Ok(())
}

/// Every agent, by name; alive by `agent_timeout`.
pub(in crate::cluster) async fn list(
    client: &Pooled,
    agent_timeout: Duration,
) -> Result<Vec<AgentInfo>, RecordsError> {
    const TIME: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'"#;
    let g = query_error("listing the agents");
    // Prepared once per connection (the egress policy's refresh asks every `heartbeat`).
    let statement = client
        .prepare_cached(&format!(
            "SELECT name, advertise_url, capacity::bigint, running::bigint, version,
                        to_char(started_at AT TIME ZONE 'UTC', {TIME}),
                        to_char(last_heartbeat AT TIME ZONE 'UTC', {TIME}),
                        EXTRACT(EPOCH FROM now() - last_heartbeat)::float8,
                        stopped_at IS NOT NULL,
                        last_heartbeat > now() - make_interval(secs => $1)
                   FROM agents ORDER BY name"
        ))
        .await
        .map_err(&g)?;
    let rows = client
        .query(&statement, &[&agent_timeout.as_secs_f64()])
        .await
        .map_err(&g)?;
    rows.iter()
        .map(|r| {
            let stopped: bool = r.try_get(8)?;
            let recent: bool = r.try_get(9)?;
            let state = match (stopped, recent) {
                (true, _) => "stopped",
                (false, true) => "alive",
                (false, false) => "stale",
            };
            Ok(AgentInfo {
                name: r.try_get(0)?,
                advertise_url: r.try_get(1)?,
                capacity: r.try_get(2)?,
                running: r.try_get(3)?,
                version: r.try_get(4)?,
                started_at: r.try_get(5)?,
                last_heartbeat: r.try_get(6)?,
                heartbeat_age: r.try_get::<_, f64>(7)?.max(0.0),
                alive: state == "alive",
                state: state.to_string(),
                this: false,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(g)
}

/// The advertise URL of an agent named `name` that heartbeated in the last 5 minutes, not
/// stopped (`mistryd doctor`'s check).
pub(in crate::cluster) async fn namesake(
    client: &Client,
    name: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    client
        .query_opt(
            "SELECT advertise_url FROM agents
              WHERE name = $1 AND stopped_at IS NULL
                AND last_heartbeat > now() - interval '5 minutes'",
            &[&name],
        )
        .await?
        .map(|r| r.try_get::<_, String>(0))
        .transpose()
}
