//! Pipelines in cluster mode: what a pipeline's jobs need of the cluster.
//!
//! A downstream job's request carries `inputs` (name → the project and ID of a needed job's
//! ready build), which the engine mounts read-only at `/data/input/<name>/` from this agent's
//! `ready/`. The cluster may place that job on an agent that does not hold those builds: before
//! a claimed job runs ([`fetch_inputs`], called by `Scheduler::run_claimed`), every input's
//! build is made present here — already in `ready/` and succeeded: nothing to do; else it is
//! fetched (`replicate::fetch_build`, without its cache) from the agent its job record names,
//! or, when that agent is not alive or the fetch fails, from another alive agent holding a copy
//! of that very build (its `StartedAt` is the record's; the agent that took a pipeline run holds
//! every build of the run).
//! An input whose record is missing or not ready (failed, queued, running), or that no alive
//! agent can give, is an error naming the input, its project and its job ID (and what each
//! agent tried answered); the claimed job is then recorded failed with it (`ErrBuild`, like the engine's own
//! check of inputs missing locally: `could not run the job: input "NAME": ...`).
//!
//! [`job_state`] gives a pipeline run the state of one of its jobs' records (`queued`,
//! `running`, `ready`, `failed`), so the run page shows a job running on another agent. (A job
//! that failed on another agent without a build there to fetch is answered from its record's
//! BuildInfo by `Scheduler::local_copy`.)

use std::sync::Arc;

use super::jobs::Scheduler;
use super::ClusterError;
use crate::engine::{Engine, Stage};
use crate::jobs::{BuildInfo, JobRequest};

/// Why a claimed job's inputs could not all be made present on this agent (its `ErrBuild`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("could not run the job: input {name:?}: the upstream build {project}/{id} {reason}")]
pub struct InputError {
    /// The input's name (the needed job of the pipeline).
    pub name: String,
    pub project: String,
    pub id: String,
    /// What is wrong with it, e.g. `failed`.
    pub reason: String,
}

/// Make sure every input build of `req` is in this agent's `ready/` (see the module's doc).
pub(super) async fn fetch_inputs(
    scheduler: &Scheduler,
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
        match here {
            Some(info) if info.succeeded() => continue,
            Some(_) => return Err(error("failed".into())),
            None => {}
        }
        let me = scheduler.me();
        let rec = scheduler
            .read(project, id)
            .await
            .map_err(|e| {
                error(format!(
                    "is not on agent {me}, and its record could not be read: {e}"
                ))
            })?
            .ok_or_else(|| {
                error(format!(
                    "is not on agent {me}, and the cluster has no record of it"
                ))
            })?;
        let agent = rec.agent.clone().unwrap_or_default();
        match rec.state.as_str() {
            "ready" => {}
            "failed" => return Err(error("failed".into())),
            other => return Err(error(format!("is {other}, not ready"))),
        }
        if agent == me {
            return Err(error(format!(
                "is recorded ready on agent {me} (this one), but its build is not here"
            )));
        }
        // The holder first; when it is not alive or its fetch fails, any other alive agent
        // holding a copy of this very build (the agent that took a pipeline run holds every
        // build of the run): the copy's StartedAt must be the record's.
        let recorded: Option<BuildInfo> = rec
            .build_info
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok());
        let mut tried = Vec::new();
        let mut candidates = Vec::new();
        match (&rec.agent_url, rec.agent_alive) {
            (Some(url), true) => candidates.push((agent.clone(), url.clone())),
            _ => tried.push(format!("agent {agent} is not alive")),
        }
        if let Ok(others) = scheduler.other_alive_agents().await {
            candidates.extend(others.into_iter().filter(|(n, _)| *n != agent));
        }
        let mut found = None;
        for (holder, url) in candidates {
            let fetched =
                super::replicate::fetch_build(&url, &engine.layout, project, id, false).await;
            let dir = match fetched {
                Ok(d) => d,
                Err(e) => {
                    tried.push(format!("agent {holder}: {e}"));
                    continue;
                }
            };
            let d2 = dir.clone();
            let info = tokio::task::spawn_blocking(move || d2.read_info())
                .await
                .ok()
                .flatten();
            let same = match (&info, &recorded) {
                (Some(i), Some(r)) => i.started_at == r.started_at,
                (Some(_), None) => holder == agent,
                _ => false,
            };
            if info.is_some_and(|i| i.succeeded()) && same {
                found = Some(holder);
                break;
            }
            // Not the recorded build (a stale or failed copy): it goes again.
            let (e2, p, i) = (Arc::clone(engine), project.to_string(), id.to_string());
            let _ = tokio::task::spawn_blocking(move || e2.discard_ready(&p, &i)).await;
            tried.push(format!(
                "agent {holder}: its copy is not the recorded build"
            ));
        }
        let Some(holder) = found else {
            return Err(error(format!(
                "could not be fetched from agent {agent} or a copy: {}",
                tried.join("; ")
            )));
        };
        tracing::info!(job_project = %req.project, input = %name, %project, %id, from = %holder, "input build fetched from another agent");
    }
    Ok(())
}

/// The state of job `project/id`'s record in the cluster (`queued`, `running`, `ready`,
/// `failed`), `None` when there is none.
pub async fn job_state(
    scheduler: &Scheduler,
    project: &str,
    id: &str,
) -> Result<Option<String>, ClusterError> {
    Ok(scheduler.read(project, id).await?.map(|r| r.state))
}
