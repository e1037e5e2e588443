//! Prometheus metrics of the jobs server (`GET /metrics`).

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::jobs::BuildInfo;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Project {
    project: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    started: Counter,
    finished: Family<Outcome, Counter>,
    cached: Counter,
    coalesced: Counter,
    incremental: Counter,
    duration: Histogram,
    hosted: Family<Project, Gauge>,
    pipeline_started: Counter,
    pipeline_finished: Family<Outcome, Counter>,
    pipeline_coalesced: Counter,
    /// The cluster gauges, registered at their first value (with a database only).
    cluster: OnceLock<ClusterGauges>,
}

/// `mistry_cluster_*`: the cluster's queue, alive agents and running jobs (src/cluster/view.rs).
struct ClusterGauges {
    queue_length: Gauge,
    agents_alive: Gauge,
    jobs_running: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mistry");
        let started = Counter::default();
        let finished = Family::<Outcome, Counter>::default();
        let cached = Counter::default();
        let coalesced = Counter::default();
        let incremental = Counter::default();
        let duration = Histogram::new(exponential_buckets(0.05, 2.0, 16));
        let hosted = Family::<Project, Gauge>::default();
        registry.register("builds_started", "Builds started", started.clone());
        registry.register(
            "builds_finished",
            "Builds finished, by outcome (success, failed, error)",
            finished.clone(),
        );
        registry.register(
            "builds_cached",
            "Requests served from the result cache",
            cached.clone(),
        );
        registry.register(
            "builds_coalesced",
            "Requests coalesced with a running identical build",
            coalesced.clone(),
        );
        registry.register(
            "builds_incremental",
            "Builds started from their group's last build",
            incremental.clone(),
        );
        registry.register(
            "build_duration_seconds",
            "Duration of builds",
            duration.clone(),
        );
        registry.register(
            "builds_hosted",
            "Builds kept on disk, by project",
            hosted.clone(),
        );
        let pipeline_started = Counter::default();
        let pipeline_finished = Family::<Outcome, Counter>::default();
        let pipeline_coalesced = Counter::default();
        registry.register(
            "pipeline_runs_started",
            "Pipeline runs started",
            pipeline_started.clone(),
        );
        registry.register(
            "pipeline_runs_finished",
            "Pipeline runs finished, by outcome (success, failed)",
            pipeline_finished.clone(),
        );
        registry.register(
            "pipeline_runs_coalesced",
            "Pipeline run requests joined to a running identical run",
            pipeline_coalesced.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            pipeline_started,
            pipeline_finished,
            pipeline_coalesced,
            started,
            finished,
            cached,
            coalesced,
            incremental,
            duration,
            hosted,
            cluster: OnceLock::new(),
        }
    }

    /// Set the cluster gauges (several agents): queued records, agents alive, running records.
    /// They are registered at the first call, so a single node shows none of them.
    pub fn set_cluster(&self, queue_length: i64, agents_alive: i64, jobs_running: i64) {
        let g = self.cluster.get_or_init(|| {
            let g = ClusterGauges {
                queue_length: Gauge::default(),
                agents_alive: Gauge::default(),
                jobs_running: Gauge::default(),
            };
            let mut registry = self
                .registry
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            registry.register(
                "cluster_queue_length",
                "Jobs queued in the cluster (records waiting for an agent)",
                g.queue_length.clone(),
            );
            registry.register(
                "cluster_agents_alive",
                "Agents of the cluster heartbeating within agent_timeout",
                g.agents_alive.clone(),
            );
            registry.register(
                "cluster_jobs_running",
                "Jobs running in the cluster (records claimed by an agent)",
                g.jobs_running.clone(),
            );
            g
        });
        g.queue_length.set(queue_length);
        g.agents_alive.set(agents_alive);
        g.jobs_running.set(jobs_running);
    }

    pub fn started(&self) {
        self.started.inc();
    }

    pub fn cached(&self) {
        self.cached.inc();
    }

    pub fn coalesced(&self) {
        self.coalesced.inc();
    }

    pub fn finished(&self, info: &BuildInfo, took: Duration) {
        let outcome = if info.succeeded() {
            "success"
        } else if info.err_build.is_empty() {
            "failed"
        } else {
            "error"
        };
        self.finished
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
        if info.incremental {
            self.incremental.inc();
        }
        self.duration.observe(took.as_secs_f64());
    }

    pub fn pipeline_started(&self) {
        self.pipeline_started.inc();
    }

    pub fn pipeline_coalesced(&self) {
        self.pipeline_coalesced.inc();
    }

    pub fn pipeline_finished(&self, succeeded: bool) {
        let outcome = if succeeded { "success" } else { "failed" };
        self.pipeline_finished
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn set_hosted(&self, project: &str, n: i64) {
        self.hosted
            .get_or_create(&Project {
                project: project.into(),
            })
            .set(n);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}
