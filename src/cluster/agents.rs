//! The agents: registration (a namesake that answers is refused), heartbeats, the graceful
//! stop, and the list `/agents` shows (their statements: `records/agents.rs`).

use std::time::Duration;

use super::db::Db;
use super::records::agents as rows;
use super::ClusterError;

pub use crate::service::AgentInfo;

/// What an agent registers.
pub struct Registration<'a> {
    /// The agent's name (`agent_name`), unique among live agents.
    pub name: &'a str,
    /// The URL other agents reach this one at (`advertise_url`).
    pub advertise_url: &'a str,
    /// How many jobs it runs at once (`job_concurrency`).
    pub capacity: usize,
    /// mistryd's version ([`crate::service::VERSION`]).
    pub version: &'a str,
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
    let previous = rows::previous(&client, me.name, agent_timeout)
        .await
        .map_err(|e| db.records_error(e))?;
    if let Some((url, alive)) = previous {
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
    rows::upsert(&client, me.name, me.advertise_url, me.capacity, me.version)
        .await
        .map_err(|e| db.records_error(e))?;
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
        let mut request = agent.get(&url).header("accept", "application/json");
        if let Some(auth) = crate::access::cluster_authorization() {
            request = request.header("authorization", auth);
        }
        let Ok(mut resp) = request.call() else {
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
    let known = rows::heartbeat(&client, name, running)
        .await
        .map_err(|e| db.records_error(e))?;
    if !known {
        return Err(db.error(format!(
            "agent {name} is not registered (its row was deleted)"
        )));
    }
    Ok(())
}

/// A graceful stop: no jobs running, and not alive.
pub async fn stopped(db: &Db, name: &str) -> Result<(), ClusterError> {
    let client = db.client().await?;
    rows::stopped(&client, name)
        .await
        .map_err(|e| db.records_error(e))
}

/// Every agent, by name; alive by `agent_timeout`.
pub async fn list(db: &Db, agent_timeout: Duration) -> Result<Vec<AgentInfo>, ClusterError> {
    let client = db.client().await?;
    rows::list(&client, agent_timeout)
        .await
        .map_err(|e| db.records_error(e))
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
