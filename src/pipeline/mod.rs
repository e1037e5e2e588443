//! Pipelines: DAGs of ordinary mistry jobs defined as code next to the projects
//! (`<projects_path>/pipelines/<name>.json`), whose jobs see their needs' artifacts at
//! `/data/input/<job>/`, and which trigger other pipelines on success.
//!
//! [`def`] parses and validates definitions, expands templates and computes run IDs; [`run`]
//! executes runs through the jobs interface (`service::Jobs::submit`: every job keeps the
//! result cache, coalescing, incremental groups and limits of the back end, this agent's engine
//! or the cluster's records) and keeps their records
//! (`<build_path>/.pipelines/<name>/<run>/run.json`); their HTTP API is the server's
//! (`server/pipelines.rs`).

pub(crate) mod def;
pub(crate) mod run;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::service::{JobError, Jobs};
pub(crate) use run::{JobRun, JobRunState, Observer, RunRecord, RunState, Runs};

/// Why a pipeline could not be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PipelineError {
    /// 404.
    #[error("Unknown pipeline '{0}'")]
    Unknown(String),
    /// 400: one line naming the definition file and the key.
    #[error("{0}")]
    Invalid(String),
    /// 400: a request that is not a pipeline request.
    #[error("{0}")]
    BadRequest(String),
    /// 503.
    #[error("Server is overloaded; try again later")]
    Overloaded,
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl From<JobError> for PipelineError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Overloaded => PipelineError::Overloaded,
            JobError::BadRequest(m) => PipelineError::BadRequest(m),
            other => PipelineError::Internal(other.to_string()),
        }
    }
}

/// Run pipeline `name` (defined in `<projects_path>/pipelines/`) with `params` on `jobs` (its
/// jobs' projects are the back end's), to the end; then wait for the runs its `on_success`
/// triggered. `observer` sees every run's record at each change (job states, the end), the
/// triggered runs' too. The record is also written to
/// `<build_path>/.pipelines/<name>/<run>/run.json`.
pub(crate) async fn run_pipeline(
    jobs: &Arc<dyn Jobs>,
    projects_path: &Path,
    name: &str,
    params: BTreeMap<String, String>,
    observer: Option<Observer>,
) -> Result<RunRecord, PipelineError> {
    let runs = Runs::new(Arc::clone(jobs), projects_path.to_path_buf(), observer);
    let record = runs.run(name, params).await?;
    runs.wait_idle().await;
    Ok(record)
}
