//! The `agents` table: registration, heartbeats, the graceful stop, and the list `/agents`
//! shows. Times come from the database's clock (`now()`), never from the agents'.

use std::time::Duration;

use super::db::Db;
use super::ClusterError;

pub use crate::service::AgentInfo;

/// What an agent registers.
pub struct Registration<'a> {
    pub name: &'a str,
    pub advertise_url: &'a str,
    pub capacity: usize,
    pub version: &'a str,
}

fn int(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Insert or take over this agent's row (a restart under the same name takes its row over: it
/// is the same agent). A row of the same name that is alive by its heartbeat, with another URL,
/// is another agent when that URL answers as an agent of this name: refused
/// ([`ClusterError::NameTaken`]; two agents sharing a name would claim, heal and record each
/// other's jobs); when it does not answer, it was this agent before a restart on another
/// address, and is taken over with a warning.
pub async fn register(
    db: &Db,
    me: &Registration<'_>,
    agent_timeout: Duration,
) -> Result<(), ClusterError> {
    let client = db.client().await?;
    let previous = client
        .query_opt(
            "SELECT advertise_url,
                    stopped_at IS NULL AND last_heartbeat > now() - make_interval(secs => $2)
               FROM agents WHERE name = $1",
            &[&me.name, &agent_timeout.as_secs_f64()],
        )
        .await
        .map_err(|e| db.pg_error(&e))?;
    if let Some(row) = previous {
        let url: String = row.try_get(0).map_err(|e| db.pg_error(&e))?;
        let alive: bool = row.try_get(1).map_err(|e| db.pg_error(&e))?;
        if alive && url != me.advertise_url && answers_as(&url, me.name).await {
            return Err(ClusterError::NameTaken {
                name: me.name.to_string(),
                url,
            });
        }
        if alive && url != me.advertise_url {
            tracing::warn!(
                agent = me.name,
                other = %url,
                "this agent's name was alive at another address, which does not answer: taken over"
            );
        }
    }
    client
        .execute(
            "INSERT INTO agents (name, advertise_url, capacity, running, version, started_at,
                                 last_heartbeat, stopped_at)
             VALUES ($1, $2, $3, 0, $4, now(), now(), NULL)
             ON CONFLICT (name) DO UPDATE SET
                 advertise_url = EXCLUDED.advertise_url, capacity = EXCLUDED.capacity,
                 running = 0, version = EXCLUDED.version, started_at = now(),
                 last_heartbeat = now(), stopped_at = NULL",
            &[&me.name, &me.advertise_url, &int(me.capacity), &me.version],
        )
        .await
        .map_err(|e| db.pg_error(&e))?;
    tracing::info!(
        agent = me.name,
        url = me.advertise_url,
        database = db.url(),
        "agent registered"
    );
    Ok(())
}

/// Whether the mistryd at `url` answers as agent `name` (its `GET /agents` marks itself).
async fn answers_as(url: &str, name: &str) -> bool {
    let (url, name) = (
        format!("{}/agents", url.trim_end_matches('/')),
        name.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        let agent = ureq::Agent::new_with_config(
            ureq::config::Config::builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(3)))
                .build(),
        );
        let Ok(mut resp) = agent.get(&url).header("accept", "application/json").call() else {
            return false;
        };
        if resp.status().as_u16() != 200 {
            return false;
        }
        let Ok(text) = resp
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_string()
        else {
            return false;
        };
        let Ok(list) = serde_json::from_str::<serde_json::Value>(&text) else {
            return false;
        };
        list.as_array().is_some_and(|all| {
            all.iter()
                .any(|a| a["this"] == serde_json::json!(true) && a["name"] == name.as_str())
        })
    })
    .await
    .unwrap_or(false)
}

/// A heartbeat: the time and the jobs running now. A row deleted meanwhile (by an operator)
/// is an error: the next start registers again.
pub async fn heartbeat(db: &Db, name: &str, running: usize) -> Result<(), ClusterError> {
    let client = db.client().await?;
    let n = client
        .execute(
            "UPDATE agents SET last_heartbeat = now(), running = $2, stopped_at = NULL
              WHERE name = $1",
            &[&name, &int(running)],
        )
        .await
        .map_err(|e| db.pg_error(&e))?;
    if n == 0 {
        return Err(db.error(format!(
            "agent {name} is not registered (its row was deleted)"
        )));
    }
    Ok(())
}

/// A graceful stop: no jobs running, and not alive.
pub async fn stopped(db: &Db, name: &str) -> Result<(), ClusterError> {
    let client = db.client().await?;
    client
        .execute(
            "UPDATE agents SET running = 0, stopped_at = now() WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(|e| db.pg_error(&e))?;
    Ok(())
}

/// Every agent, by name; alive by `agent_timeout`.
pub async fn list(db: &Db, agent_timeout: Duration) -> Result<Vec<AgentInfo>, ClusterError> {
    const TIME: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'"#;
    let client = db.client().await?;
    let rows = client
        .query(
            &format!(
                "SELECT name, advertise_url, capacity::bigint, running::bigint, version,
                        to_char(started_at AT TIME ZONE 'UTC', {TIME}),
                        to_char(last_heartbeat AT TIME ZONE 'UTC', {TIME}),
                        EXTRACT(EPOCH FROM now() - last_heartbeat)::float8,
                        stopped_at IS NOT NULL,
                        last_heartbeat > now() - make_interval(secs => $1)
                   FROM agents ORDER BY name"
            ),
            &[&agent_timeout.as_secs_f64()],
        )
        .await
        .map_err(|e| db.pg_error(&e))?;
    rows.iter()
        .map(|r| {
            let stopped: bool = r.try_get(8).map_err(|e| db.pg_error(&e))?;
            let recent: bool = r.try_get(9).map_err(|e| db.pg_error(&e))?;
            let state = match (stopped, recent) {
                (true, _) => "stopped",
                (false, true) => "alive",
                (false, false) => "stale",
            };
            let get_s = |i: usize| r.try_get::<_, String>(i).map_err(|e| db.pg_error(&e));
            let get_i = |i: usize| r.try_get::<_, i64>(i).map_err(|e| db.pg_error(&e));
            Ok(AgentInfo {
                name: get_s(0)?,
                advertise_url: get_s(1)?,
                capacity: get_i(2)?,
                running: get_i(3)?,
                version: get_s(4)?,
                started_at: get_s(5)?,
                last_heartbeat: get_s(6)?,
                heartbeat_age: r
                    .try_get::<_, f64>(7)
                    .map_err(|e| db.pg_error(&e))?
                    .max(0.0),
                alive: state == "alive",
                state: state.to_string(),
                this: false,
            })
        })
        .collect()
}

/// The alive agents but `me` (name, advertise URL), by name.
pub(super) async fn other_alive(
    db: &Db,
    me: &str,
    agent_timeout: Duration,
) -> Result<Vec<(String, String)>, ClusterError> {
    let all = list(db, agent_timeout).await?;
    Ok(all
        .into_iter()
        .filter(|a| a.alive && a.name != me)
        .map(|a| (a.name, a.advertise_url))
        .collect())
}
