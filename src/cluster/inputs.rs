//! Pipelines in cluster mode: what a pipeline's jobs need of the cluster.
//!
//! A downstream job's request carries `inputs` (name → the project and ID of a needed job's
//! ready build), which the engine mounts read-only at `/data/input/<name>/` from this agent's
//! `ready/`. The cluster may place that job on an agent that does not hold those builds: before
//! a claimed job runs ([`fetch_inputs`], called by `Scheduler::run_claimed`), every input's
//! build is made present here — already in `ready/` and succeeded: nothing to do; else it is
//! fetched (`replicate::fetch_build`, without its cache) from the agent its job record names.
//! An input whose record is missing, not ready (failed, queued, running), held by an agent that
//! is not alive, or that cannot be fetched is an error naming the input, its project and its
//! job ID; the claimed job is then recorded failed with it (`ErrBuild`, like the engine's own
//! check of inputs missing locally: `could not run the job: input "NAME": ...`).
//!
//! [`job_state`] gives a pipeline run the state of one of its jobs' records (`queued`,
//! `running`, `ready`, `failed`), so the run page shows a job running on another agent. (A job
//! that failed on another agent without a build there to fetch is answered from its record's
//! BuildInfo by `Scheduler::local_copy`.)

use super::jobs::Scheduler;
use super::ClusterError;
use crate::engine::{Engine, Stage};
use crate::jobs::JobRequest;

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
    engine: &Engine,
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
        let url = match (&rec.agent_url, rec.agent_alive) {
            (Some(url), true) => url.clone(),
            _ => {
                return Err(error(format!(
                    "is held by agent {agent}, which is not alive"
                )))
            }
        };
        let dir = super::replicate::fetch_build(&url, &engine.layout, project, id, false)
            .await
            .map_err(|e| error(format!("could not be fetched from agent {agent}: {e}")))?;
        let fetched = tokio::task::spawn_blocking(move || dir.read_info())
            .await
            .ok()
            .flatten();
        if !fetched.is_some_and(|i| i.succeeded()) {
            return Err(error(format!("fetched from agent {agent} failed")));
        }
        tracing::info!(job_project = %req.project, input = %name, %project, %id, from = %agent, "input build fetched from another agent");
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
