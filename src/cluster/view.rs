//! The cluster in the API, the web view and the metrics (several agents, issue 14):
//!
//! - `GET /artifacts/{project}/{id}` on an agent that does not hold the build: when the job's
//!   record says it ended (`ready` or `failed`) on another, alive agent, the build is fetched
//!   from that agent first ([`fetch_missing`], `copies::fetch_build` without the cache), then
//!   served as usual, so mistry's client (and its rsync/scp from the agent it talked to) works
//!   with any agent. Anything else (no record, its agent is not alive, the fetch fails, no
//!   database) answers as a single node does: `Unknown job P/ID` (404).
//! - Which agent ran each job: `GET /api/agents/jobs` → `{"<project>/<id>": "<agent>"}`
//!   (`Jobs::job_agents`; the route is the server's); `?project=P&id=ID` narrows it to that job. mistry's `/index/` keeps
//!   its exact shape (its clients decode it; nothing is added there): the web view merges this
//!   map into its job list, as it merges `/pipelines/jobs/`. With a database the agent is the
//!   one the job's record names (the agent that ran it, also for a build replicated here);
//!   a job on this agent's disk without a record (a single node, or built before the database)
//!   is this agent's. A queued record (no agent yet) is left out.
//! - The cluster's job list: `GET /api/cluster/jobs[?agent=A][&project=P][&state=S][&limit=N]`
//!   (`Jobs::cluster_jobs`) → the job records of the database, newest first (by the time the
//!   record started running, else was queued), each shaped like an `/index/` entry (`id`,
//!   `project`, `startedAt`, `state` `pending`/`ready`, `buildInfo`: the stored one, or the
//!   blank one from the stored request while the job has not ended) plus `agent` (`null` while
//!   queued), `clusterState` (the record's `queued`/`running`/`ready`/`failed`) and `retries`.
//!   `state=` filters by the record's state (`pending` = queued or running); `limit` defaults to
//!   [`CLUSTER_JOBS_DEFAULT`], at most [`CLUSTER_JOBS_MAX`]; the list also stops after
//!   [`CLUSTER_JOBS_BYTES`] of stored BuildInfo and params, and its query after 5 s (a
//!   statement timeout). The web view merges it with
//!   `/index/` so every agent lists the cluster's jobs. 503 when the database does not answer;
//!   404 on a single node (no database: `/index/` is its whole list).
//! - `/metrics`: with a database, three cluster gauges read at each scrape
//!   ([`update_gauges`]): `mistry_cluster_queue_length` (queued records),
//!   `mistry_cluster_agents_alive` (agents heartbeating within `agent_timeout`, not stopped),
//!   `mistry_cluster_jobs_running` (running records). A single node has none of them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{records, Cluster, ClusterError};
use crate::engine::{Engine, Found};
use crate::jobs;
pub use crate::service::{ClusterJobsFilter, CLUSTER_JOBS_DEFAULT, CLUSTER_JOBS_MAX};

/// How long the view's queries may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn timed<T>(
    cluster: &Cluster,
    what: impl std::future::Future<Output = Result<T, ClusterError>>,
) -> Result<T, ClusterError> {
    match tokio::time::timeout(QUERY_TIMEOUT, what).await {
        Ok(r) => r,
        Err(_) => Err(match cluster.db() {
            Some(db) => db.error(format!("no answer within {QUERY_TIMEOUT:?}")),
            None => ClusterError::NoDatabase,
        }),
    }
}

/// Where an ended job's build is, by its record: the agent's name and URL, when that agent is
/// alive.
struct Holder {
    agent: String,
    url: String,
}

async fn holder(
    cluster: &Cluster,
    engine: &Engine,
    project: &str,
    id: &str,
) -> Result<Option<Holder>, ClusterError> {
    let Some(db) = cluster.db() else {
        return Ok(None);
    };
    let client = db.client().await?;
    let timeout = engine.cfg.cluster.agent_timeout;
    let found = records::view::holder(&client, project, id, timeout)
        .await
        .map_err(|e| db.records_error(e))?;
    Ok(found.map(|(agent, url)| Holder { agent, url }))
}

/// A job this agent does not have on disk (`GET /artifacts`): with a database, when its record
/// says it ended on another alive agent, fetch the build from it (verified, atomically into
/// `ready/`) and return it as found on disk now; `None` otherwise (the caller answers as for an
/// unknown job). Failures are logged, never shown to the client.
pub async fn fetch_missing(
    cluster: Option<&Cluster>,
    engine: &Arc<Engine>,
    project: &str,
    id: &str,
) -> Option<Found> {
    let cluster = cluster?;
    cluster.db()?;
    if jobs::check_name("project", project).is_err() || jobs::check_name("job", id).is_err() {
        return None;
    }
    let holder = match timed(cluster, holder(cluster, engine, project, id)).await {
        Ok(Some(h)) if h.agent != cluster.name() => h,
        Ok(_) => return None,
        Err(e) => {
            tracing::warn!(%project, %id, error = %e, "cannot look the job up in the cluster");
            return None;
        }
    };
    match super::copies::fetch_build(&holder.url, &engine.importer(), project, id, false).await {
        Ok(_) => {
            tracing::info!(%project, %id, from = %holder.agent, "build replicated from another agent for its artifacts");
        }
        Err(e) => {
            tracing::warn!(%project, %id, from = %holder.agent, error = %e, "cannot fetch the build for its artifacts");
            return None;
        }
    }
    engine.find_job(project, id).await
}

/// Which agent ran each job (see the module's doc); 503 when the database does not answer.
pub async fn job_agents(
    cluster: Option<&Cluster>,
    engine: &Arc<Engine>,
    only: Option<(String, String)>,
) -> Result<BTreeMap<String, String>, ClusterError> {
    let me = match cluster {
        Some(c) => c.name().to_string(),
        None => engine.cfg.cluster.agent_name.clone(),
    };
    // This agent's disk: every job there is this agent's, unless a record says otherwise.
    let (e, o) = (Arc::clone(engine), only.clone());
    let local: Vec<String> = tokio::task::spawn_blocking(move || match o {
        Some((p, i)) => e.job(&p, &i).map(|f| key(&f)).into_iter().collect(),
        None => e.list().map(|f| key(&f)).collect(),
    })
    .await
    .unwrap_or_default();
    let mut map: BTreeMap<String, String> = local.into_iter().map(|k| (k, me.clone())).collect();
    let Some(cluster) = cluster.filter(|c| c.db().is_some()) else {
        return Ok(map);
    };
    let records = timed(cluster, async {
        let Some(db) = cluster.db() else {
            return Ok(Vec::new());
        };
        let client = db.client().await?;
        let only = only.as_ref().map(|(p, i)| (p.as_str(), i.as_str()));
        let rows = records::view::job_agents(&client, only)
            .await
            .map_err(|e| db.records_error(e))?;
        Ok(rows
            .into_iter()
            .map(|(p, i, a)| (format!("{p}/{i}"), a))
            .collect::<Vec<_>>())
    })
    .await?;
    map.extend(records);
    Ok(map)
}

fn key(f: &Found) -> String {
    format!("{}/{}", f.dir.project(), f.dir.id())
}

/// The list stops after this many bytes of stored BuildInfo and params (a few huge params must
/// not make an agent hold gigabytes).
pub const CLUSTER_JOBS_BYTES: usize = 16 << 20;

/// The cluster's job records (see the module's doc), newest first, each as its JSON object.
pub async fn cluster_jobs(
    cluster: &Cluster,
    filter: &ClusterJobsFilter,
) -> Result<Vec<serde_json::Value>, ClusterError> {
    let Some(db) = cluster.db() else {
        return Err(ClusterError::NoDatabase);
    };
    let mut client = db.client().await?;
    let listed = records::view::cluster_jobs(&mut client, filter, CLUSTER_JOBS_BYTES)
        .await
        .map_err(|e| db.records_error(e))?;
    let mut out = Vec::with_capacity(listed.len());
    for row in listed {
        let records::view::Listed {
            project,
            id,
            state,
            agent,
            retries,
            build_info: stored,
            group,
            params,
            since,
        } = row;
        let info = stored
            .as_deref()
            .and_then(|t| serde_json::from_str::<jobs::BuildInfo>(t).ok())
            .unwrap_or_else(|| {
                let params = serde_json::from_str(&params).unwrap_or_default();
                jobs::BuildInfo {
                    started_at: since,
                    ..crate::engine::blank_info(&params, &group, &project, &id)
                }
            });
        let job = super::logs::RemoteJob {
            project,
            id,
            state,
            agent,
            info,
        };
        let mut value = job.json();
        if let Some(obj) = value.as_object_mut() {
            obj.insert("agent".into(), serde_json::json!(job.agent));
            obj.insert("clusterState".into(), serde_json::json!(job.state.as_str()));
            obj.insert("retries".into(), serde_json::json!(retries));
        }
        out.push(value);
    }
    Ok(out)
}

/// The cluster's numbers, as `/metrics` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterGauges {
    /// Jobs in state `queued` (`cluster_queue_length`).
    pub queue_length: i64,
    /// Agents not stopped whose last heartbeat is within `agent_timeout`
    /// (`cluster_agents_alive`).
    pub agents_alive: i64,
    /// Jobs in state `running`, on any agent (`cluster_jobs_running`).
    pub jobs_running: i64,
}

/// Read the cluster's numbers (one query).
pub async fn read_gauges(
    cluster: &Cluster,
    engine: &Engine,
) -> Result<ClusterGauges, ClusterError> {
    let Some(db) = cluster.db() else {
        return Err(ClusterError::NoDatabase);
    };
    let client = db.client().await?;
    let (queue_length, agents_alive, jobs_running) =
        records::view::gauges(&client, engine.cfg.cluster.agent_timeout)
            .await
            .map_err(|e| db.records_error(e))?;
    Ok(ClusterGauges {
        queue_length,
        agents_alive,
        jobs_running,
    })
}

/// Before `/metrics` renders: with a database, set the cluster gauges from it. When it does not
/// answer, the gauges keep their last values and a warning is logged.
pub async fn update_gauges(cluster: Option<&Cluster>, engine: &Engine) {
    let Some(cluster) = cluster.filter(|c| c.db().is_some()) else {
        return;
    };
    match timed(cluster, read_gauges(cluster, engine)).await {
        Ok(g) => engine
            .metrics
            .set_cluster(g.queue_length, g.agents_alive, g.jobs_running),
        Err(e) => tracing::warn!(error = %e, "cannot read the cluster gauges"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{ClusterJobsFilter, CLUSTER_JOBS_DEFAULT};

    #[tokio::test]
    async fn a_single_node_says_it_has_no_database() {
        let tmp = tempfile::tempdir().unwrap();
        let (projects, build) = (tmp.path().join("projects"), tmp.path().join("build"));
        std::fs::create_dir_all(&projects).unwrap();
        std::fs::create_dir_all(&build).unwrap();
        let text = serde_json::json!({"projects_path": projects, "build_path": build}).to_string();
        let cfg = crate::config::Config::parse(&text, &tmp.path().join("config.json")).unwrap();
        let cluster = Cluster::connect(&cfg).await.unwrap();
        assert!(cluster.db().is_none());
        let filter = ClusterJobsFilter {
            agent: None,
            project: None,
            states: None,
            limit: CLUSTER_JOBS_DEFAULT,
            readable: None,
        };
        let e = cluster_jobs(&cluster, &filter).await.unwrap_err();
        assert!(matches!(e, ClusterError::NoDatabase), "{e:?}");
        assert_eq!(
            e.to_string(),
            "no database: this mistryd runs as a single node (no database_url)"
        );
    }
}
