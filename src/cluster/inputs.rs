//! Pipelines in cluster mode: what a pipeline's jobs need of the cluster.
//!
//! A downstream job's request carries `inputs` (name → the project and ID of a needed job's
//! ready build), which the engine mounts read-only at `/data/input/<name>/` from this agent's
//! `ready/`. The cluster may place that job on an agent that does not hold those builds: before
//! a claimed job runs ([`fetch_inputs`], called by `Scheduler::run_claimed`), every input's
//! build is made present here — already in `ready/` and succeeded: nothing to do; else it is
//! fetched (`copies::fetch_build`, without its cache) from the agent its job record names,
//! or, when that agent is not alive or the fetch fails, from another alive agent holding a copy
//! of that very build (its `StartedAt` is the record's; the agent that took a pipeline run holds
//! every build of the run).
//! An input whose record is missing or not ready (failed, queued, running), or that no alive
//! agent can give, is an error naming the input, its project and its job ID (and what each
//! agent tried answered); the claimed job is then recorded failed with it (`ErrBuild`, like the engine's own
//! check of inputs missing locally: `could not run the job: input "NAME": ...`).
//!
//! (A job that failed on another agent without a build there to fetch is answered from its
//! record's BuildInfo by `Scheduler::local_copy`; a pipeline run sees its job running on another
//! agent through `Scheduler::until_running`.)

use std::sync::Arc;

use super::copies::discard_copy;
use super::records::{self, is_stale};
use super::{Cluster, ClusterError};
use crate::engine::{Engine, Stage};
use crate::jobs::{BuildInfo, JobRequest};
use crate::service::JobState;

/// Why a claimed job's inputs could not all be made present on this agent (its `ErrBuild`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("could not run the job: input {name:?}: the upstream build {project}/{id} {reason}")]
pub struct InputError {
    /// The input's name (the needed job of the pipeline).
    pub name: String,
    /// The upstream build's project.
    pub project: String,
    /// The upstream build's job ID.
    pub id: String,
    /// What is wrong with it, e.g. `failed`.
    pub reason: String,
}

/// Make sure every input build of `req` is in this agent's `ready/` (see the module's doc).
pub(super) async fn fetch_inputs(
    cluster: &Cluster,
    engine: &Arc<Engine>,
    req: &JobRequest,
) -> Result<(), InputError> {
    for (name, input) in &req.inputs {
        let (project, id) = (input.project.as_str(), input.id.as_str());
        let error = |reason: String| InputError {
            name: name.clone(),
            project: project.to_string(),
            id: id.to_string(),
            reason,
        };
        // Names as the engine checks them: nothing outside build_path is ever looked at.
        crate::jobs::check_name("project", project)
            .and_then(|()| crate::jobs::check_name("job", id))
            .map_err(|e| error(format!("has an invalid name: {e}")))?;
        let local = engine.layout.job(project, id, Stage::Ready);
        let here = {
            let local = local.clone();
            tokio::task::spawn_blocking(move || local.read_info())
                .await
                .map_err(|e| error(format!("could not be read here: {e}")))?
        };
        let me = cluster.name();
        let rec = match read(cluster, project, id).await {
            Ok(r) => r,
            // The database does not answer: a build here is taken as it is.
            Err(_)
                if here
                    .as_ref()
                    .is_some_and(super::super::jobs::BuildInfo::succeeded) =>
            {
                continue
            }
            Err(e) => {
                return Err(error(format!(
                    "is not on agent {me}, and its record could not be read: {e}"
                )))
            }
        };
        // A copy here: taken unless the record says the job ran again (another build).
        if let Some(mine) = &here {
            match &rec {
                Some(r)
                    if r.state == JobState::Ready
                        && r.agent.as_deref() != Some(me)
                        && is_stale(mine, r) =>
                {
                    let gone =
                        discard_copy(engine, project, id, r.agent.as_deref(), &mine.started_at)
                            .await;
                    if !gone {
                        return Err(error(
                            "is here in another build than the recorded one, which could not be \
                             replaced"
                                .into(),
                        ));
                    }
                }
                _ if mine.succeeded() => continue,
                _ => return Err(error("failed".into())),
            }
        }
        let holder = match &rec {
            Some(rec) => {
                let agent = rec.agent.clone().unwrap_or_default();
                match rec.state {
                    JobState::Ready => {}
                    JobState::Failed => return Err(error("failed".into())),
                    other => return Err(error(format!("is {other}, not ready"))),
                }
                if agent == me {
                    return Err(error(format!(
                        "is recorded ready on agent {me} (this one), but its build is not here"
                    )));
                }
                let recorded: Option<BuildInfo> = rec
                    .build_info
                    .as_deref()
                    .and_then(|t| serde_json::from_str(t).ok());
                let first = match (&rec.agent_url, rec.agent_alive) {
                    (Some(url), true) => Ok((agent.clone(), url.clone())),
                    _ => Err(Tried(vec![format!("agent {agent} is not alive")])),
                };
                fetch_from_any(cluster, engine, project, id, first, recorded.as_ref())
                    .await
                    .map_err(|tried| {
                        error(format!(
                            "could not be fetched from agent {agent} or a copy: {tried}"
                        ))
                    })?
            }
            // No record (pruned by log_retention, or older than the database): any alive
            // agent's succeeded copy.
            None => {
                let first = Err(Tried(vec!["no record".into()]));
                fetch_from_any(cluster, engine, project, id, first, None)
                    .await
                    .map_err(|tried| {
                        error(format!(
                    "is not on agent {me}, and the cluster has no record of it (tried: {tried})"
                ))
                    })?
            }
        };
        tracing::info!(job_project = %req.project, input = %name, %project, %id, from = %holder, "input build fetched from another agent");
    }
    Ok(())
}

/// The agents a build was asked of and what each answered (or why one was not asked).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
struct Tried(Vec<String>);

/// Fetch build `project/id` from `first` (the recorded holder, or why not), else from any other
/// alive agent holding a succeeded copy of it (with the `recorded` build's `StartedAt`, when
/// there is a record): the agent it came from, or what each one answered.
async fn fetch_from_any(
    cluster: &Cluster,
    engine: &Arc<Engine>,
    project: &str,
    id: &str,
    first: Result<(String, String), Tried>,
    recorded: Option<&BuildInfo>,
) -> Result<String, Tried> {
    let mut tried = Vec::new();
    let mut candidates = Vec::new();
    let holder = match first {
        Ok((name, url)) => {
            candidates.push((name.clone(), url));
            Some(name)
        }
        Err(why) => {
            if recorded.is_some() {
                tried.extend(why.0);
            }
            None
        }
    };
    if let Ok(others) = other_alive(cluster).await {
        candidates.extend(
            others
                .into_iter()
                .filter(|(n, _)| Some(n) != holder.as_ref()),
        );
    }
    for (name, url) in candidates {
        let dir =
            match super::copies::fetch_build(&url, &engine.importer(), project, id, false).await {
                Ok(d) => d,
                Err(e) => {
                    tried.push(format!("agent {name}: {e}"));
                    continue;
                }
            };
        let d2 = dir.clone();
        let info = tokio::task::spawn_blocking(move || d2.read_info())
            .await
            .ok()
            .flatten();
        let same = match (&info, recorded) {
            (Some(i), Some(r)) => i.started_at == r.started_at,
            (Some(_), None) => true,
            _ => false,
        };
        match info {
            Some(i) if i.succeeded() && same => return Ok(name),
            Some(i) => {
                // Not the recorded build (a stale or failed copy): it goes again.
                discard_copy(engine, project, id, Some(&name), &i.started_at).await;
                tried.push(format!("agent {name}: its copy is not the recorded build"));
            }
            None => tried.push(format!("agent {name}: its copy has no BuildInfo")),
        }
    }
    Err(Tried(tried))
}

/// Job `project/id`'s record.
async fn read(
    cluster: &Cluster,
    project: &str,
    id: &str,
) -> Result<Option<records::Record>, ClusterError> {
    let db = cluster.need_db()?;
    let client = db.client().await?;
    records::read(&client, project, id, cluster.agent_timeout)
        .await
        .map_err(|e| db.records_error(e))
}

/// The alive agents but this one (name, advertise URL).
async fn other_alive(cluster: &Cluster) -> Result<Vec<(String, String)>, ClusterError> {
    super::agents::other_alive(cluster.need_db()?, cluster.name(), cluster.agent_timeout).await
}
