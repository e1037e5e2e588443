//! Several agents around one PostgreSQL (multi-agent mode): the foundation.
//!
//! Without `database_url` (and `MISTRY_DATABASE_URL`) mistryd is a single node, as always: no
//! database code runs, and `/agents` shows this agent alone, from memory ([`Cluster::local`]).
//!
//! With a database, at start ([`Cluster::connect`]) mistryd
//! 1. connects (one line `cannot reach the database at URL: ...` and exit 1 when it cannot; the
//!    URL's password is never shown, [`db::redact`]);
//! 2. applies the embedded SQL migrations (`src/cluster/migrations/V<N>__<name>.sql`, with
//!    `refinery`), serialised between agents starting at once by an advisory lock, and refuses
//!    a schema newer than it knows (`the database schema is version N, newer than this mistryd
//!    (M): upgrade mistryd`);
//! 3. once the engine is ready, registers this agent ([`Cluster::start`]: an upsert of its row
//!    in `agents`: name, advertise URL, capacity, version), then heartbeats every `heartbeat`:
//!    the time and the number of jobs running. A database outage does not stop the daemon: a
//!    failed heartbeat is a warning, and they resume when the database is back. A graceful
//!    shutdown marks the agent stopped ([`Cluster::stop`]).
//!
//! TLS to the database is not supported yet (`NoTls`): use a Unix socket
//! (`host=/run/postgresql`) or loopback, or a trusted network.
//!
//! `GET /agents` lists every agent with `alive` (a heartbeat within this agent's
//! `agent_timeout`, by the database's clock, and not stopped).
//!
//! What comes next builds on this: job records keyed by (project, id), claims with
//! `FOR UPDATE SKIP LOCKED`, placement, artifact replication and central logs are new
//! migrations (`V2__...`) and new modules beside [`agents`], using [`db::Db`]'s pool.

pub mod agents;
pub mod copies;
pub mod db;
mod egress;
pub mod inputs;
pub mod jobs;
mod listen;
pub mod logs;
mod records;
mod service;
pub mod tls;
pub mod view;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

pub use agents::AgentInfo;
pub use db::{ClusterError, Db};
pub use service::ClusterJobs;

/// The notification channel of the job records.
pub const JOBS_CHANNEL: &str = "mistry_jobs";
/// The notification channel of the logs.
pub const LOGS_CHANNEL: &str = "mistry_logs";

/// This mistryd's version, as agents report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// This agent, as it registers and as a single node shows itself.
#[derive(Debug, Clone)]
struct Me {
    name: String,
    advertise_url: String,
    capacity: usize,
    started_at: String,
}

/// The multi-agent state of a running mistryd: this agent, and the database when there is one.
pub struct Cluster {
    me: Me,
    agent_timeout: Duration,
    heartbeat: Duration,
    job_attempts: u32,
    db: Option<Db>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The cluster's job scheduler ([`Cluster::start_jobs`]), with a database.
    scheduler: std::sync::OnceLock<Arc<jobs::Scheduler>>,
    /// The central job logs ([`Cluster::start_jobs`]), with a database.
    logs: std::sync::OnceLock<Arc<logs::Logs>>,
}

impl Cluster {
    /// A single node (no database): `/agents` shows this agent, from memory.
    pub fn local(cfg: &crate::config::Config) -> Cluster {
        Self::with_db(cfg, None)
    }

    fn with_db(cfg: &crate::config::Config, db: Option<Db>) -> Cluster {
        let s = &cfg.cluster;
        Cluster {
            me: Me {
                name: s.agent_name.clone(),
                advertise_url: s.advertise_url(&cfg.listen),
                capacity: cfg.job_concurrency,
                started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            },
            agent_timeout: s.agent_timeout,
            heartbeat: s.heartbeat,
            job_attempts: s.job_attempts,
            db,
            stop: watch::channel(false).0,
            task: Mutex::new(None),
            scheduler: std::sync::OnceLock::new(),
            logs: std::sync::OnceLock::new(),
        }
    }

    /// With `database_url`: connect and migrate (`cfg.listen` must be set: the default
    /// advertise URL is derived from it); without: [`Cluster::local`]. [`Cluster::start`]
    /// registers the agent once it can take requests.
    pub async fn connect(cfg: &crate::config::Config) -> Result<Cluster, ClusterError> {
        let Some(url) = &cfg.cluster.database_url else {
            return Ok(Self::local(cfg));
        };
        let db = Db::connect(url, &cfg.cluster.agent_name).await?;
        Ok(Self::with_db(cfg, Some(db)))
    }

    /// Register this agent and heartbeat every `heartbeat` with the number of jobs `running()`
    /// says run now, until [`Cluster::stop`]. No-op without a database.
    pub async fn start(
        self: &Arc<Self>,
        running: impl Fn() -> usize + Send + Sync + 'static,
    ) -> Result<(), ClusterError> {
        self.register().await?;
        self.start_heartbeat(running);
        Ok(())
    }

    /// With a database: the cluster's job scheduler on `engine` (`jobs`): requests go through
    /// the job records, and this agent heals what a crash left, listens for job
    /// notifications, claims queued jobs and sweeps the jobs of dead agents (every
    /// `heartbeat`), until [`Cluster::stop`]. No-op without a database.
    pub fn start_jobs(self: &Arc<Self>, engine: Arc<crate::engine::Engine>) {
        if self.db.is_none() || self.scheduler.get().is_some() {
            return;
        }
        let url = engine.cfg.cluster.database_url.clone();
        let logs = url.as_ref().map(|_| {
            let logs = Arc::new(logs::Logs::new(
                Arc::clone(self),
                engine.cfg.cluster.log_retention,
                engine.cfg.cluster.log_ship_every,
            ));
            logs.start(self.stop.subscribe());
            let _ = self.logs.set(Arc::clone(&logs));
            logs
        });
        let scheduler = Arc::new(jobs::Scheduler::new(Arc::clone(self), engine));
        if let Some(url) = url {
            // One LISTEN connection for the job records' and the logs' notifications.
            let mut handlers: Vec<listen::Handler> = Vec::new();
            let s = Arc::clone(&scheduler);
            handlers.push(Box::new(move |n| s.notified(n)));
            if let Some(logs) = logs {
                handlers.push(Box::new(move |n| logs.notified(n)));
            }
            let (name, stop) = (self.name().to_string(), self.stop.subscribe());
            tokio::spawn(listen::run(url, name, handlers, stop));
        }
        scheduler.start(self.stop.subscribe());
        let _ = self.scheduler.set(scheduler);
    }

    /// The cluster's job scheduler, once started (with a database).
    pub fn scheduler(&self) -> Option<&Arc<jobs::Scheduler>> {
        self.scheduler.get()
    }

    /// The central job logs, once started (with a database).
    pub fn logs(&self) -> Option<&Arc<logs::Logs>> {
        self.logs.get()
    }

    /// Whether there is a database (multi-agent mode).
    pub fn db(&self) -> Option<&Db> {
        self.db.as_ref()
    }

    /// The database, for what needs one (the scheduler, the central logs).
    fn need_db(&self) -> Result<&Db, ClusterError> {
        self.db().ok_or(ClusterError::NoDatabase)
    }

    /// A pooled connection to the records, and how its statements' errors name the database
    /// (the scheduler's and the central logs').
    async fn records_client(
        &self,
    ) -> Result<
        (
            deadpool_postgres::Object,
            impl Fn(records::RecordsError) -> ClusterError + '_,
        ),
        ClusterError,
    > {
        let db = self.need_db()?;
        Ok((db.client().await?, move |e| db.records_error(e)))
    }

    /// The error of a statement the database did not answer within `patience`.
    fn no_answer(&self, patience: Duration) -> ClusterError {
        match self.need_db() {
            Ok(db) => db.error(format!("no answer within {patience:?}")),
            Err(e) => e,
        }
    }

    /// This agent's name.
    pub fn name(&self) -> &str {
        &self.me.name
    }

    /// This agent's advertise URL.
    pub fn advertise_url(&self) -> &str {
        &self.me.advertise_url
    }

    async fn register(&self) -> Result<(), ClusterError> {
        let Some(db) = &self.db else { return Ok(()) };
        agents::register(
            db,
            &agents::Registration {
                name: &self.me.name,
                advertise_url: &self.me.advertise_url,
                capacity: self.me.capacity,
                version: VERSION,
            },
            self.agent_timeout,
        )
        .await
    }

    /// Heartbeats: failures are warnings (the first of a series, then one a minute); the first
    /// success after them says the heartbeats resumed.
    fn start_heartbeat(self: &Arc<Self>, running: impl Fn() -> usize + Send + Sync + 'static) {
        if self.db.is_none() {
            return;
        }
        let me = Arc::clone(self);
        let mut stop = self.stop.subscribe();
        let task = tokio::spawn(async move {
            let Some(db) = &me.db else { return };
            let mut tick = tokio::time::interval(me.heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // The registration was the first heartbeat.
            let mut failing_since: Option<tokio::time::Instant> = None;
            let mut last_warning = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let limit = me.heartbeat.max(Duration::from_secs(1));
                let beat = agents::heartbeat(db, &me.me.name, running());
                let result = match tokio::time::timeout(limit, beat).await {
                    Ok(r) => r,
                    Err(_) => Err(db.error(format!("no answer within {limit:?}"))),
                };
                match (result, failing_since) {
                    (Ok(()), Some(since)) => {
                        tracing::info!(
                            agent = %me.me.name,
                            after = ?since.elapsed(),
                            "heartbeats resumed: the database is back"
                        );
                        failing_since = None;
                    }
                    (Ok(()), None) => {}
                    (Err(e), None) => {
                        tracing::warn!(agent = %me.me.name, error = %e, "heartbeat failed; retrying every {:?}", me.heartbeat);
                        failing_since = Some(tokio::time::Instant::now());
                        last_warning = tokio::time::Instant::now();
                    }
                    (Err(e), Some(since)) => {
                        if last_warning.elapsed() >= Duration::from_secs(60) {
                            tracing::warn!(agent = %me.me.name, error = %e, failing_for = ?since.elapsed(), "heartbeats still fail");
                            last_warning = tokio::time::Instant::now();
                        } else {
                            tracing::debug!(agent = %me.me.name, error = %e, "heartbeat failed");
                        }
                    }
                }
            }
        });
        *self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
    }

    /// Stop heartbeating and mark this agent stopped in the database (graceful shutdown, after
    /// the engine's: the runs still waiting here for a slot first go back to the cluster's
    /// queue); a failure is a warning.
    pub async fn stop(&self) {
        if let Some(scheduler) = self.scheduler.get() {
            scheduler.stop_waiters().await;
        }
        let _ = self.stop.send(true);
        let task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
        if let Some(db) = &self.db {
            let limit = Duration::from_secs(5);
            match tokio::time::timeout(limit, agents::stopped(db, &self.me.name)).await {
                Ok(Ok(())) => {
                    tracing::info!(agent = %self.me.name, "marked stopped in the database");
                }
                Ok(Err(e)) => {
                    tracing::warn!(agent = %self.me.name, error = %e, "could not mark the agent stopped");
                }
                Err(_) => {
                    tracing::warn!(agent = %self.me.name, "could not mark the agent stopped: no answer within 5s");
                }
            }
        }
    }

    /// Every agent (by name), or this one alone without a database; `running_here` is this
    /// agent's number of running jobs now (a single node's `running`).
    pub async fn agents(&self, running_here: usize) -> Result<Vec<AgentInfo>, ClusterError> {
        let Some(db) = &self.db else {
            return Ok(vec![AgentInfo {
                name: self.me.name.clone(),
                advertise_url: self.me.advertise_url.clone(),
                capacity: self.me.capacity as i64,
                running: running_here as i64,
                version: VERSION.to_string(),
                started_at: self.me.started_at.clone(),
                last_heartbeat: chrono::Utc::now()
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                heartbeat_age: 0.0,
                alive: true,
                state: "alive".into(),
                this: true,
            }]);
        };
        let limit = Duration::from_secs(5);
        let mut list = match tokio::time::timeout(limit, agents::list(db, self.agent_timeout)).await
        {
            Ok(r) => r?,
            Err(_) => return Err(db.error(format!("no answer within {limit:?}"))),
        };
        for a in &mut list {
            a.this = a.name == self.me.name;
        }
        Ok(list)
    }
}
