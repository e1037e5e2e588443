//! [`LocalJobs`]: the jobs interface over this agent's engine alone (a single node, and `mistry
//! exec`). A job's life is the engine's: admission, coalescing and the result cache
//! (`engine::state::InFlight`), the run, `pending/` → `ready/`.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{
    AgentInfo, Answer, ByteStream, ClusterJobsFilter, Export, ExportError, Found, Hold, JobError,
    JobView, Jobs, LogTail, Submitted, VERSION,
};
use crate::config::Config;
use crate::engine::{Engine, Phase};
use crate::jobs::JobRequest;
use crate::metrics::Metrics;

/// The jobs of this agent's engine.
pub struct LocalJobs {
    engine: Arc<Engine>,
    /// When this agent started (`/agents`).
    started_at: String,
}

impl LocalJobs {
    /// The jobs interface over `engine`; its start time (shown by `/agents`) is now.
    pub fn new(engine: Arc<Engine>) -> LocalJobs {
        LocalJobs {
            engine,
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }

    /// The engine under this interface.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

/// Admit `req` on `engine`: the [`Submitted`] handle of the engine's job.
pub(crate) async fn submit(engine: &Arc<Engine>, req: JobRequest) -> Result<Submitted, JobError> {
    let scheduled = engine.schedule(req).await?;
    let cached = scheduled.is_cached();
    // Its start as the engine tells it (never for a result-cache hit, whose receiver stays at
    // queued).
    let started = (!cached).then(|| {
        let mut phase = scheduled.state();
        Box::pin(async move {
            loop {
                if matches!(*phase.borrow_and_update(), Phase::Pending) {
                    return;
                }
                if matches!(*phase.borrow(), Phase::Ready(_)) || phase.changed().await.is_err() {
                    // Ended (or dropped) without being seen running.
                    return std::future::pending().await;
                }
            }
        }) as super::BoxFuture<()>
    });
    let (project, id, dir) = (
        scheduled.project.clone(),
        scheduled.id.clone(),
        scheduled.dir.clone(),
    );
    let end = Box::pin(async move {
        let (info, dir) = scheduled.wait().await?;
        Ok(Answer { info, dir })
    });
    Ok(Submitted::new(
        &project,
        &id,
        dir,
        Some(cached),
        started,
        end,
    ))
}

/// Job `project/id` on `engine`'s disk as `GET /job` shows it in JSON, its logs read from its
/// files as the stream is read.
pub(crate) async fn document(engine: &Arc<Engine>, project: &str, id: &str) -> Option<ByteStream> {
    let found = engine.find_job(project, id).await?;
    let prefix = super::document_prefix(super::index_entry(&found));
    let Found { info, dir, .. } = found;
    Some(crate::stream_json::stream_with(
        prefix,
        info,
        dir.out_log(),
        dir.stderr_log(),
        "}",
    ))
}

/// The last `last` bytes of the `out.log` of job `project/id` on `engine`'s disk.
pub(crate) async fn log_tail(
    engine: &Arc<Engine>,
    project: &str,
    id: &str,
    last: Option<u64>,
) -> Option<LogTail> {
    let found = engine.find_job(project, id).await?;
    let Ok(mut file) = tokio::fs::File::open(found.dir.out_log()).await else {
        return Some(LogTail {
            size: 0,
            bytes: Box::pin(futures_util::stream::empty()),
        });
    };
    let size = file.metadata().await.map_or(0, |m| m.len());
    if let Some(n) = last {
        let _ = file
            .seek(std::io::SeekFrom::Start(size.saturating_sub(n)))
            .await;
    }
    let bytes = futures_util::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match f.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), f))
            }
        }
    });
    Some(LogTail {
        size,
        bytes: Box::pin(bytes),
    })
}

/// Which agent ran each job of `engine`'s disk: `me`, every one.
pub(crate) async fn job_agents(
    engine: &Arc<Engine>,
    me: &str,
    only: Option<(String, String)>,
) -> BTreeMap<String, String> {
    let key = |f: &Found| format!("{}/{}", f.dir.project(), f.dir.id());
    let e = Arc::clone(engine);
    let local: Vec<String> = tokio::task::spawn_blocking(move || match only {
        Some((p, i)) => e.job(&p, &i).map(|f| key(&f)).into_iter().collect(),
        None => e.list().map(|f| key(&f)).collect(),
    })
    .await
    .unwrap_or_default();
    local.into_iter().map(|k| (k, me.to_string())).collect()
}

#[async_trait::async_trait]
impl Jobs for LocalJobs {
    fn config(&self) -> &Config {
        &self.engine.cfg
    }

    fn metrics(&self) -> &Metrics {
        &self.engine.metrics
    }

    async fn submit(&self, req: JobRequest) -> Result<Submitted, JobError> {
        submit(&self.engine, req).await
    }

    async fn find(&self, project: &str, id: &str) -> Result<Option<JobView>, JobError> {
        Ok(self.engine.find_job(project, id).await.map(JobView::Here))
    }

    async fn document(&self, project: &str, id: &str) -> Result<Option<ByteStream>, JobError> {
        Ok(document(&self.engine, project, id).await)
    }

    async fn follow(&self, project: &str, id: &str) -> Result<Option<super::Lines>, JobError> {
        Ok(self
            .engine
            .follow(project, id)
            .map(|lines| lines.boxed() as super::Lines))
    }

    async fn log_tail(
        &self,
        project: &str,
        id: &str,
        last: Option<u64>,
    ) -> Result<Option<LogTail>, JobError> {
        Ok(log_tail(&self.engine, project, id, last).await)
    }

    async fn artifacts(&self, project: &str, id: &str) -> Option<Found> {
        self.engine.find_job(project, id).await
    }

    fn hold(&self, project: &str, id: &str) -> Option<Hold> {
        self.engine.hold_build(project, id)
    }

    fn list(&self) -> Box<dyn Iterator<Item = Found> + Send + '_> {
        Box::new(self.engine.list())
    }

    async fn cluster_jobs(
        &self,
        _filter: &ClusterJobsFilter,
    ) -> Result<Option<Vec<serde_json::Value>>, JobError> {
        Ok(None)
    }

    async fn job_agents(
        &self,
        only: Option<(String, String)>,
    ) -> Result<BTreeMap<String, String>, JobError> {
        Ok(job_agents(&self.engine, &self.engine.cfg.cluster.agent_name, only).await)
    }

    async fn agents(&self) -> Result<Vec<AgentInfo>, JobError> {
        let cfg = &self.engine.cfg;
        Ok(vec![AgentInfo {
            name: cfg.cluster.agent_name.clone(),
            advertise_url: cfg.cluster.advertise_url(&cfg.listen),
            capacity: cfg.job_concurrency as i64,
            running: self.engine.running() as i64,
            version: VERSION.to_string(),
            started_at: self.started_at.clone(),
            last_heartbeat: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            heartbeat_age: 0.0,
            alive: true,
            state: "alive".into(),
            this: true,
        }])
    }

    async fn capacity(&self) -> usize {
        self.engine.cfg.job_concurrency.max(1)
    }

    async fn refresh_gauges(&self) {
        let engine = Arc::clone(&self.engine);
        let _ = tokio::task::spawn_blocking(move || engine.count_hosted()).await;
    }

    fn export(&self, project: &str, id: &str, with_cache: bool) -> Result<Export, ExportError> {
        self.engine.export_build(project, id, with_cache)
    }
}
