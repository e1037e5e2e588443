//! [`ClusterJobs`]: the jobs interface (`crate::service::Jobs`) of an agent of several around
//! one PostgreSQL. Requests go through the job records (`jobs/`: each job runs once
//! cluster-wide); what is asked of a job that is not on this agent's disk is answered from its
//! record and the central logs (`logs/`), and a build that ended on another agent is fetched
//! here (`copies.rs`) before its artifacts are served. What this agent holds on disk is its
//! engine's (`LocalJobs`'s answers).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::jobs::{Admission, Scheduler, SubmitError};
use super::{view, Cluster, ClusterError};
use crate::config::Config;
use crate::engine::{Engine, Stage};
use crate::jobs::JobRequest;
use crate::metrics::Metrics;
use crate::service::{
    local, AgentInfo, Answer, BoxFuture, ByteStream, ClusterJobsFilter, Export, ExportError, Found,
    Hold, JobError, JobView, Jobs, Lines, LogTail, Submitted,
};

/// The jobs of an agent of a cluster (with a database); without one, the bin uses `LocalJobs`.
pub struct ClusterJobs {
    cluster: Arc<Cluster>,
    engine: Arc<Engine>,
}

impl ClusterJobs {
    /// The jobs of `cluster`'s agent running on `engine`; [`Cluster::start_jobs`] must have
    /// started the scheduler and the central logs (else requests answer 503).
    pub fn new(cluster: Arc<Cluster>, engine: Arc<Engine>) -> ClusterJobs {
        ClusterJobs { cluster, engine }
    }

    fn scheduler(&self) -> Result<&Arc<Scheduler>, JobError> {
        self.cluster
            .scheduler()
            .ok_or_else(|| JobError::Unavailable("the cluster's scheduler is not started".into()))
    }

    fn logs(&self) -> Result<&Arc<super::logs::Logs>, JobError> {
        self.cluster
            .logs()
            .ok_or_else(|| JobError::Unavailable("the cluster's logs are not started".into()))
    }
}

/// A database error as the API answers it (503).
fn unavailable(e: ClusterError) -> JobError {
    JobError::Unavailable(e.to_string())
}

impl From<SubmitError> for JobError {
    fn from(e: SubmitError) -> JobError {
        match e {
            SubmitError::Job(e) => e,
            SubmitError::Database(e) => unavailable(e),
            SubmitError::Replication(e) => JobError::Unavailable(e),
        }
    }
}

#[async_trait::async_trait]
impl Jobs for ClusterJobs {
    fn config(&self) -> &Config {
        &self.engine.cfg
    }

    fn metrics(&self) -> &Metrics {
        &self.engine.metrics
    }

    async fn submit(&self, req: JobRequest) -> Result<Submitted, JobError> {
        let scheduler = Arc::clone(self.scheduler()?);
        let (s, r) = (Arc::clone(&scheduler), req.clone());
        let (ids, hit) = tokio::task::spawn_blocking(move || s.look_up(&r))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))??;
        let project = req.project.clone();
        let admission = scheduler.admit(req, ids, hit).await?;
        let id = admission.id().to_string();
        let dir = self.engine.layout.job(&project, &id, Stage::Ready);
        let (cached, started) = match &admission {
            Admission::Answered(_) | Admission::Copy(_) => (Some(true), None),
            Admission::Waiting(_) => {
                // The record turning `running` (the claim's notification).
                let (s, p, i) = (Arc::clone(&scheduler), project.clone(), id.clone());
                let running: BoxFuture<()> = Box::pin(async move { s.until_running(&p, &i).await });
                (Some(false), Some(running))
            }
        };
        let end: BoxFuture<Result<Answer, JobError>> = Box::pin(async move {
            let a = scheduler.finish(admission).await?;
            Ok(Answer {
                info: a.info,
                dir: a.dir,
            })
        });
        Ok(Submitted::new(&project, &id, dir, cached, started, end))
    }

    async fn find(&self, project: &str, id: &str) -> Result<Option<JobView>, JobError> {
        if let Some(found) = self.engine.find_job(project, id).await {
            return Ok(Some(JobView::Here(found)));
        }
        let record = self
            .logs()?
            .record(project, id)
            .await
            .map_err(unavailable)?;
        Ok(record.map(JobView::Elsewhere))
    }

    async fn document(&self, project: &str, id: &str) -> Result<Option<ByteStream>, JobError> {
        if let Some(doc) = local::document(&self.engine, project, id).await {
            return Ok(Some(doc));
        }
        let logs = self.logs()?;
        let record = logs.record(project, id).await.map_err(unavailable)?;
        Ok(record.map(|job| logs.document(job)))
    }

    async fn follow(&self, project: &str, id: &str) -> Result<Option<Lines>, JobError> {
        use futures_util::StreamExt;
        if let Some(lines) = self.engine.follow(project, id) {
            return Ok(Some(lines.boxed()));
        }
        let lines = self
            .logs()?
            .follow(project, id)
            .await
            .map_err(unavailable)?;
        Ok(lines.map(futures_util::StreamExt::boxed))
    }

    async fn log_tail(
        &self,
        project: &str,
        id: &str,
        last: Option<u64>,
    ) -> Result<Option<LogTail>, JobError> {
        if let Some(tail) = local::log_tail(&self.engine, project, id, last).await {
            return Ok(Some(tail));
        }
        let tail = self
            .logs()?
            .log_tail(project, id, last)
            .await
            .map_err(unavailable)?;
        Ok(tail.map(|(size, bytes)| LogTail { size, bytes }))
    }

    async fn artifacts(&self, project: &str, id: &str) -> Option<Found> {
        match self.engine.find_job(project, id).await {
            // Not a stale build (one the record does not name goes, and the record's is
            // fetched); while the job runs again, or the record cannot be read, the build here.
            Some(found) if found.stage == Stage::Ready => {
                if let Ok(s) = self.scheduler() {
                    let _ = s.published_here(project, id, &found.info).await;
                }
                if found.dir.read_started_at().as_deref() == Some(found.info.started_at.as_str()) {
                    Some(found)
                } else {
                    view::fetch_missing(Some(&self.cluster), &self.engine, project, id).await
                }
            }
            Some(found) => Some(found),
            // A build another agent holds is fetched from it first.
            None => view::fetch_missing(Some(&self.cluster), &self.engine, project, id).await,
        }
    }

    fn hold(&self, project: &str, id: &str) -> Option<Hold> {
        self.engine.hold_build(project, id)
    }

    fn list(&self) -> Box<dyn Iterator<Item = Found> + Send + '_> {
        Box::new(self.engine.list())
    }

    async fn cluster_jobs(
        &self,
        filter: &ClusterJobsFilter,
    ) -> Result<Option<Vec<serde_json::Value>>, JobError> {
        view::timed(&self.cluster, view::cluster_jobs(&self.cluster, filter))
            .await
            .map(Some)
            .map_err(unavailable)
    }

    async fn job_agents(
        &self,
        only: Option<(String, String)>,
    ) -> Result<BTreeMap<String, String>, JobError> {
        view::job_agents(Some(&self.cluster), &self.engine, only)
            .await
            .map_err(unavailable)
    }

    async fn agents(&self) -> Result<Vec<AgentInfo>, JobError> {
        let list: Vec<AgentInfo> = self
            .cluster
            .agents(self.engine.running())
            .await
            .map_err(|e| JobError::Unavailable(e.to_string()))?;
        Ok(list)
    }

    async fn capacity(&self) -> usize {
        let own = self.engine.cfg.job_concurrency.max(1);
        match self.cluster.agents(self.engine.running()).await {
            Ok(agents) => agents
                .iter()
                .filter(|a| a.alive)
                .map(|a| usize::try_from(a.capacity).unwrap_or(0))
                .sum::<usize>()
                .max(own),
            Err(e) => {
                tracing::warn!(error = %e, "the cluster's capacity is unknown; a run's jobs go {own} at a time");
                own
            }
        }
    }

    async fn refresh_gauges(&self) {
        let engine = Arc::clone(&self.engine);
        let _ = tokio::task::spawn_blocking(move || engine.count_hosted()).await;
        view::update_gauges(Some(&self.cluster), &self.engine).await;
    }

    fn export(&self, project: &str, id: &str, with_cache: bool) -> Result<Export, ExportError> {
        self.engine.export_build(project, id, with_cache)
    }
}
