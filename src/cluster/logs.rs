//! Central job logs: every job's log in the database as it is produced (table `job_logs`,
//! migration V3), so that every agent's `/job`, `/log` and web view show the log of a job that
//! runs or ran on another agent.
//!
//! Shipping ([`Logs::ship`], started by the scheduler for every job this agent runs): the job's
//! `out.log` and `stderr.log` are read as they grow, every [`SHIP_EVERY`], and inserted in
//! chunks of at most [`CHUNK_MAX`] bytes keyed by (project, id, stream, byte offset): a retried
//! insert never duplicates. Each chunk is announced on the channel [`CHANNEL`] with
//! `<project>/<id> <stream> <pos> <length>` (never the data: NOTIFY payloads are limited to
//! 8000 bytes). A run first deletes the previous run's chunks (a rebuild, or a retry after an
//! agent died) and announces `<project>/<id> start <run>`; its last chunk is shipped, and
//! `<project>/<id> end` announced, before the job's record turns `ready` or `failed`
//! ([`Shipper::finish`]). Chunks are inserted only while the job's record is this agent's (an
//! agent taken for dead does not write over the log of the job's new run). While the database
//! does not answer, the shipper stops reading (the file is the buffer: memory stays bounded)
//! and resumes where it was.
//!
//! The engine's line follower (`engine::follow`) is not reused: it yields lines, lossily
//! decoded, and the database must hold the log byte for byte.
//!
//! Reading (`ClusterJobs` falls back to these when the job is not on this agent's disk):
//! - [`Logs::document`]: `/job/{p}/{id}` as JSON, the record's BuildInfo with the logs
//!   streamed from the chunks, page by page;
//! - [`Logs::follow`]: `/log/{p}/{id}`, the log's lines while the job is queued or running:
//!   the agent's one `LISTEN` connection (`listen.rs`) fans notifications out to every follower (no
//!   polling; a re-read every 30 s without notifications is a safety net); the stream ends when
//!   the job ends (its record, notified on `mistry_jobs` after its last chunk);
//! - [`Logs::log_tail`]: `/api/logtail/{p}/{id}[?bytes=N]`, the last N bytes (only the
//!   chunks covering them are read).
//!
//! Retention: with `log_retention`, every agent deletes, periodically, the chunks and the
//! records of jobs that ended longer ago than it (never those of a job queued or running).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, Stream};
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, mpsc, watch};

use super::listen::Notice;
use super::{Cluster, ClusterError};
use crate::engine::JobDir;
use crate::streams::ByteStream;

/// A chunk of a stream read from the database.
type Bytes = Vec<u8>;
use crate::jobs::BuildInfo;

pub use super::LOGS_CHANNEL as CHANNEL;
/// The largest chunk shipped.
pub const CHUNK_MAX: usize = 64 * 1024;
/// How often a running job's logs are shipped.
pub const SHIP_EVERY: Duration = Duration::from_millis(200);
/// A follower reads the job's record again after this long without a notification.
const SAFETY_RECHECK: Duration = Duration::from_secs(30);
/// How long the end of a job waits for its last chunks to be shipped while the database does
/// not answer.
const FINAL_DEADLINE: Duration = Duration::from_secs(30);
/// Chunks read per query (at most 1 MiB in memory).
const PAGE_ROWS: i64 = 16;

/// Which log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// `out.log`: the image build's output and the job's stdout and stderr.
    Out,
    /// `stderr.log`: the job's stderr alone.
    Stderr,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Out => "out",
            LogStream::Stderr => "stderr",
        }
    }
}

/// What the listener tells followers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LogEvent {
    /// A chunk of the job `<project>/<id>` was shipped.
    Chunk(String),
    /// A run of the job started (its previous chunks are gone), with its run token.
    Start(String, String),
    /// The job's log was shipped whole (its record ends right after).
    LogEnd(String),
    /// The job ended (its record says `ready` or `failed`, channel `mistry_jobs`).
    End(String),
    /// The listener (re)connected: notifications may have been missed.
    Reconnected,
}

fn key_of(project: &str, id: &str) -> String {
    format!("{project}/{id}")
}

pub use crate::service::Recorded as RemoteJob;

/// The central logs of one agent.
pub struct Logs {
    cluster: Arc<Cluster>,
    retention: Option<Duration>,
    events: broadcast::Sender<LogEvent>,
}

impl Logs {
    pub(super) fn new(cluster: Arc<Cluster>, retention: Option<Duration>) -> Logs {
        Logs {
            cluster,
            retention,
            events: broadcast::channel(4096).0,
        }
    }

    fn db(&self) -> Result<&super::Db, ClusterError> {
        self.cluster.need_db()
    }

    fn me(&self) -> &str {
        self.cluster.name()
    }

    /// With `log_retention`, the pruner, until `stop` turns true (the agent's listener calls
    /// [`Logs::notified`]).
    pub(super) fn start(self: &Arc<Self>, stop: watch::Receiver<bool>) {
        if let Some(retention) = self.retention {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.prune_loop(retention, stop).await });
        }
    }

    // ------------------------------------------------------------------ shipping

    /// Ship the logs of the job whose directory is `dir` (in `pending/` while it runs; its
    /// `ready/` twin is read at the end when a log was not opened before) until
    /// [`Shipper::finish`].
    pub fn ship(self: &Arc<Self>, dir: &JobDir) -> Shipper {
        let (tx, rx) = watch::channel(false);
        let me = Arc::clone(self);
        let dir = dir.clone();
        let task = tokio::spawn(async move { me.run_shipper(dir, rx).await });
        Shipper { finish: tx, task }
    }

    async fn run_shipper(self: Arc<Self>, dir: JobDir, mut finish: watch::Receiver<bool>) {
        let (project, id) = (dir.project().to_string(), dir.id().to_string());
        let ready = dir.in_stage(crate::engine::Stage::Ready);
        let run = format!(
            "{}-{}",
            self.me(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        );
        let mut tails = [
            Tail::new(LogStream::Out, dir.out_log(), ready.out_log()),
            Tail::new(LogStream::Stderr, dir.stderr_log(), ready.stderr_log()),
        ];
        let mut started = false;
        let mut finishing = false;
        let mut deadline = None;
        let mut warned = false;
        // The run starts at once (off the job's critical path: a job that ends within
        // SHIP_EVERY then only ships its chunks).
        let mut first = true;
        loop {
            if !finishing && !first {
                tokio::select! {
                    _ = tokio::time::sleep(SHIP_EVERY) => {}
                    _ = finish.wait_for(|f| *f) => finishing = true,
                }
            }
            first = false;
            if finishing && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + FINAL_DEADLINE);
            }
            let shipped = async {
                if !started {
                    self.start_run(&project, &id, &run).await?;
                    started = true;
                }
                for t in &mut tails {
                    if !self
                        .ship_available(&project, &id, &run, t, finishing)
                        .await?
                    {
                        return Ok(false);
                    }
                }
                Ok::<_, ClusterError>(true)
            }
            .await;
            match shipped {
                Ok(true) if finishing => {
                    if let Err(e) = self.notify(&format!("{} end", key_of(&project, &id))).await {
                        tracing::debug!(%project, %id, error = %e, "could not announce the end of the job's log");
                    }
                    return;
                }
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(%project, %id, agent = %self.me(), "the job's record is no longer this agent's: its log is not shipped further");
                    return;
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(%project, %id, error = %e, "shipping the job's log to the database failed; retrying");
                        warned = true;
                    }
                    if let Some(d) = deadline {
                        if tokio::time::Instant::now() >= d {
                            tracing::warn!(%project, %id, error = %e, "the end of the job's log was not shipped: the database does not answer (it stays in the agent's out.log)");
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }

    /// A run starts: the previous run's chunks go, and followers are told.
    async fn start_run(&self, project: &str, id: &str, run: &str) -> Result<(), ClusterError> {
        let db = self.db()?;
        let mut client = db.client().await?;
        let tx = client.transaction().await.map_err(|e| db.pg_error(&e))?;
        tx.execute(
            "DELETE FROM job_logs WHERE project = $1 AND id = $2",
            &[&project, &id],
        )
        .await
        .map_err(|e| db.pg_error(&e))?;
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANNEL, &format!("{} start {run}", key_of(project, id))],
        )
        .await
        .map_err(|e| db.pg_error(&e))?;
        tx.commit().await.map_err(|e| db.pg_error(&e))
    }

    /// Ship what `t`'s file holds beyond what was shipped, in chunks; `Ok(false)` when the
    /// job's record is no longer this agent's.
    async fn ship_available(
        &self,
        project: &str,
        id: &str,
        run: &str,
        t: &mut Tail,
        finishing: bool,
    ) -> Result<bool, ClusterError> {
        loop {
            t.fill(finishing).await;
            if t.buf.is_empty() {
                return Ok(true);
            }
            if !self.insert_chunk(project, id, run, t).await? {
                return Ok(false);
            }
            t.pos += t.buf.len() as u64;
            t.buf.clear();
        }
    }

    async fn insert_chunk(
        &self,
        project: &str,
        id: &str,
        run: &str,
        t: &Tail,
    ) -> Result<bool, ClusterError> {
        let db = self.db()?;
        let client = db.client().await?;
        let pos = i64::try_from(t.pos).unwrap_or(i64::MAX);
        let payload = format!(
            "{} {} {} {}",
            key_of(project, id),
            t.stream.as_str(),
            t.pos,
            t.buf.len()
        );
        let row = client
            .query_one(
                "WITH own AS (
                     SELECT EXISTS (SELECT 1 FROM jobs
                                     WHERE project = $1 AND id = $2
                                       AND ((state = 'running' AND agent = $6)
                                            OR state = 'queued')) AS yes),
                 ins AS (
                     INSERT INTO job_logs (project, id, stream, pos, data, agent, run)
                     SELECT $1, $2, $3, $4, $5, $6, $7 FROM own WHERE own.yes
                     ON CONFLICT DO NOTHING
                     RETURNING 1),
                 sent AS (SELECT pg_notify($8, $9) FROM ins)
                 SELECT own.yes, (SELECT count(*) FROM sent) FROM own",
                &[
                    &project,
                    &id,
                    &t.stream.as_str(),
                    &pos,
                    &t.buf,
                    &self.me(),
                    &run,
                    &CHANNEL,
                    &payload,
                ],
            )
            .await
            .map_err(|e| db.pg_error(&e))?;
        row.try_get::<_, bool>(0).map_err(|e| db.pg_error(&e))
    }

    async fn notify(&self, payload: &str) -> Result<(), ClusterError> {
        let db = self.db()?;
        let client = db.client().await?;
        client
            .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
            .await
            .map_err(|e| db.pg_error(&e))?;
        Ok(())
    }

    // ------------------------------------------------------------------ reading

    /// The record of job `project`/`id`; `None` when there is none (or the names are invalid).
    pub async fn record(&self, project: &str, id: &str) -> Result<Option<RemoteJob>, ClusterError> {
        if crate::jobs::check_name("project", project).is_err()
            || crate::jobs::check_name("job", id).is_err()
        {
            return Ok(None);
        }
        let db = self.db()?;
        let client = db.client().await?;
        let row = client
            .query_opt(
                "SELECT state, agent, request::text, build_info::text,
                        to_char(COALESCE(started_at, queued_at) AT TIME ZONE 'UTC',
                                'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
                   FROM jobs WHERE project = $1 AND id = $2",
                &[&project, &id],
            )
            .await
            .map_err(|e| db.pg_error(&e))?;
        let Some(row) = row else { return Ok(None) };
        let g = |e: tokio_postgres::Error| db.pg_error(&e);
        let state: String = row.try_get(0).map_err(g)?;
        let state = super::records::stored_state(db, &state)?;
        let agent: Option<String> = row.try_get(1).map_err(g)?;
        let request: String = row.try_get(2).map_err(g)?;
        let stored: Option<String> = row.try_get(3).map_err(g)?;
        let since: String = row.try_get(4).map_err(g)?;
        let info = stored
            .as_deref()
            .and_then(|t| serde_json::from_str::<BuildInfo>(t).ok())
            .unwrap_or_else(|| blank_info(project, id, &request, since));
        Ok(Some(RemoteJob {
            project: project.to_string(),
            id: id.to_string(),
            state,
            agent,
            info,
        }))
    }

    /// The size of a job's log in the database.
    pub async fn size(&self, project: &str, id: &str, s: LogStream) -> Result<u64, ClusterError> {
        let db = self.db()?;
        let client = db.client().await?;
        let row = client
            .query_opt(
                "SELECT pos + octet_length(data) FROM job_logs
                  WHERE project = $1 AND id = $2 AND stream = $3
                  ORDER BY pos DESC LIMIT 1",
                &[&project, &id, &s.as_str()],
            )
            .await
            .map_err(|e| db.pg_error(&e))?;
        let size: i64 = match row {
            Some(r) => r.try_get(0).map_err(|e| db.pg_error(&e))?,
            None => 0,
        };
        Ok(u64::try_from(size).unwrap_or(0))
    }

    /// Up to [`PAGE_ROWS`] chunks of a log covering bytes from `from` on, in order: (offset,
    /// data, run).
    async fn page(
        &self,
        project: &str,
        id: &str,
        s: LogStream,
        from: u64,
    ) -> Result<Vec<(u64, Vec<u8>, String)>, ClusterError> {
        let db = self.db()?;
        let client = db.client().await?;
        let from = i64::try_from(from).unwrap_or(i64::MAX);
        // A chunk is at most CHUNK_MAX bytes: one starting CHUNK_MAX before `from` or earlier
        // ends before it (the bound keeps the query on the primary key).
        let rows = client
            .query(
                "SELECT pos, data, run FROM job_logs
                  WHERE project = $1 AND id = $2 AND stream = $3
                    AND pos > $4::bigint - $5::bigint AND pos + octet_length(data) > $4::bigint
                  ORDER BY pos LIMIT $6",
                &[
                    &project,
                    &id,
                    &s.as_str(),
                    &from,
                    &(CHUNK_MAX as i64),
                    &PAGE_ROWS,
                ],
            )
            .await
            .map_err(|e| db.pg_error(&e))?;
        let mut page = Vec::with_capacity(rows.len());
        for r in rows {
            let g = |e: tokio_postgres::Error| db.pg_error(&e);
            let pos: i64 = r.try_get(0).map_err(g)?;
            let data: Vec<u8> = r.try_get(1).map_err(g)?;
            let run: String = r.try_get(2).map_err(g)?;
            page.push((u64::try_from(pos).unwrap_or(0), data, run));
        }
        Ok(page)
    }

    /// Send the bytes `[from, to)` of a log (`span`; `to`: `None` for all there is) to `tx`,
    /// page by page; `Ok(false)` when the receiver went away.
    async fn send_range(
        &self,
        project: &str,
        id: &str,
        s: LogStream,
        (from, to): (u64, Option<u64>),
        mut each: impl FnMut(&[u8]) -> Option<Bytes>,
        tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> Result<bool, ClusterError> {
        let mut pos = from;
        loop {
            if to.is_some_and(|t| pos >= t) {
                return Ok(true);
            }
            let page = self.page(project, id, s, pos).await?;
            if page.is_empty() {
                return Ok(true);
            }
            for (start, data, _) in page {
                let end = start + data.len() as u64;
                let end = to.map_or(end, |t| end.min(t));
                if end <= pos {
                    continue;
                }
                // A gap (never expected) is skipped.
                let skip = usize::try_from(pos.saturating_sub(start)).unwrap_or(0);
                let take = usize::try_from(end - start).unwrap_or(0);
                let piece = &data[skip.min(take)..take.min(data.len())];
                pos = end;
                if let Some(b) = each(piece) {
                    if tx.send(Ok(b)).await.is_err() {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// `GET /job/{p}/{id}` as JSON for a job that is not on this agent: `job` (its record) as
    /// `/index/` shows it, with the BuildInfo's logs streamed from the database.
    pub fn document(self: &Arc<Self>, job: RemoteJob) -> ByteStream {
        let prefix = crate::service::document_prefix(job.json());
        let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
        let me = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = me.write_job(&job, prefix, &tx).await {
                tracing::debug!(project = %job.project, id = %job.id, error = %e, "streaming a job's log from the database stopped");
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
            }
        });
        Box::pin(stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }

    async fn write_job(
        &self,
        job: &RemoteJob,
        prefix: String,
        tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> Result<(), ClusterError> {
        let (project, id) = (job.project.as_str(), job.id.as_str());
        let mut fields = match serde_json::to_value(BuildInfo {
            container_stdouterr: String::new(),
            container_stderr: String::new(),
            ..job.info.clone()
        }) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let send = |s: String| async move { tx.send(Ok(s.into_bytes())).await.is_ok() };
        if !send(format!("{prefix}{{")).await {
            return Ok(());
        }
        for (name, s) in [
            ("ContainerStdouterr", LogStream::Out),
            ("ContainerStderr", LogStream::Stderr),
        ] {
            fields.remove(name);
            if self.size(project, id, s).await? == 0 {
                continue;
            }
            if !send(format!("\"{name}\":\"")).await {
                return Ok(());
            }
            let mut carry = Vec::new();
            let escape = |bytes: &[u8]| {
                let text = crate::stream_json::escape_chunk(&mut carry, bytes, false);
                (!text.is_empty()).then(|| text.into_bytes())
            };
            if !self
                .send_range(project, id, s, (0, None), escape, tx)
                .await?
            {
                return Ok(());
            }
            let last = crate::stream_json::escape_chunk(&mut carry, &[], true);
            if !send(format!("{last}\",")).await {
                return Ok(());
            }
        }
        let rest = serde_json::to_string(&fields).unwrap_or_else(|_| "{}".into());
        send(format!("{}}}", &rest[1..])).await;
        Ok(())
    }

    /// `GET /api/logtail/{p}/{id}[?bytes=N]` for a job that is not on this agent: its
    /// `out.log`'s size and its last `bytes` bytes (all of it without `bytes`); `None` when
    /// there is no record.
    pub async fn log_tail(
        self: &Arc<Self>,
        project: &str,
        id: &str,
        bytes: Option<u64>,
    ) -> Result<Option<(u64, ByteStream)>, ClusterError> {
        if self.record(project, id).await?.is_none() {
            return Ok(None);
        }
        let size = self.size(project, id, LogStream::Out).await?;
        let from = bytes.map_or(0, |n| size.saturating_sub(n));
        let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
        let me = Arc::clone(self);
        let (p, i) = (project.to_string(), id.to_string());
        tokio::spawn(async move {
            let each = |b: &[u8]| Some(b.to_vec());
            let sent = me
                .send_range(&p, &i, LogStream::Out, (from, Some(size)), each, &tx)
                .await;
            if let Err(e) = sent {
                tracing::debug!(project = %p, id = %i, error = %e, "streaming a log tail from the database stopped");
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
            }
        });
        Ok(Some((
            size,
            Box::pin(stream::poll_fn(move |cx| rx.poll_recv(cx))),
        )))
    }

    /// The lines of the `out.log` of job `project`/`id` while it is queued or running on any
    /// agent, live, until the job ends; `Ok(None)` when it is not in flight (or unknown).
    pub async fn follow(
        self: &Arc<Self>,
        project: &str,
        id: &str,
    ) -> Result<Option<impl Stream<Item = String> + Send + 'static>, ClusterError> {
        // Subscribed before reading the record: an end announced meanwhile is not missed.
        let events = self.events.subscribe();
        match self.record(project, id).await? {
            Some(job) if job.state.in_flight() => {}
            _ => return Ok(None),
        }
        let f = Follow {
            logs: Arc::clone(self),
            project: project.to_string(),
            id: id.to_string(),
            key: key_of(project, id),
            events,
            run: None,
            pos: 0,
            partial: Vec::new(),
            lines: VecDeque::new(),
            ending: false,
            done: false,
        };
        Ok(Some(stream::unfold(f, |mut f| async move {
            f.next_line().await.map(|l| (l, f))
        })))
    }

    // ------------------------------------------------------------------ notifications

    /// A notice of the agent's listener ([`super::listen`]), for followers.
    pub(super) fn notified(&self, notice: Notice<'_>) {
        let event = match notice {
            Notice::Reconnected => Some(LogEvent::Reconnected),
            Notice::Notification { channel, payload } => parse_event(channel, payload),
        };
        if let Some(event) = event {
            let _ = self.events.send(event);
        }
    }

    // ------------------------------------------------------------------ retention

    async fn prune_loop(self: Arc<Self>, retention: Duration, mut stop: watch::Receiver<bool>) {
        let every = (retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(600));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match self.prune(retention).await {
                Ok((0, 0)) => {}
                Ok((chunks, records)) => {
                    tracing::info!(agent = %self.me(), chunks, records, "log_retention: pruned the logs and records of jobs that ended longer ago")
                }
                Err(e) => {
                    tracing::debug!(agent = %self.me(), error = %e, "pruning old logs failed")
                }
            }
        }
    }

    /// Delete the log chunks and the records of jobs that ended longer than `retention` ago
    /// (chunks without a record once they are that old); never those of a job queued or
    /// running. Agents silent that long (and at least a day) that no record names go too. Returns (chunks, records)
    /// deleted.
    pub async fn prune(&self, retention: Duration) -> Result<(u64, u64), ClusterError> {
        let db = self.db()?;
        let secs = retention.as_secs_f64();
        let mut client = db.client().await?;
        let tx = client.transaction().await.map_err(|e| db.pg_error(&e))?;
        let chunks = tx
            .execute(
                "DELETE FROM job_logs l
                  WHERE l.at < now() - make_interval(secs => $1)
                    AND NOT EXISTS (
                        SELECT 1 FROM jobs j
                         WHERE j.project = l.project AND j.id = l.id
                           AND (j.state IN ('queued', 'running')
                                OR j.ended_at IS NULL
                                OR j.ended_at >= now() - make_interval(secs => $1)))",
                &[&secs],
            )
            .await
            .map_err(|e| db.pg_error(&e))?;
        let records = tx
            .execute(
                "DELETE FROM jobs
                  WHERE state IN ('ready', 'failed')
                    AND ended_at < now() - make_interval(secs => $1)",
                &[&secs],
            )
            .await
            .map_err(|e| db.pg_error(&e))?;
        // Agents silent that long, and at least a day (stopped or gone), that no record names
        // any more, and the images recorded for them: the agents page and placement forget
        // them.
        let agents = tx
            .execute(
                "DELETE FROM agents a
                  WHERE a.last_heartbeat < now() - make_interval(secs => GREATEST($1::float8, 86400))
                    AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.agent = a.name)",
                &[&secs],
            )
            .await
            .map_err(|e| db.pg_error(&e))?;
        if agents > 0 {
            tx.execute(
                "DELETE FROM agent_images i
                  WHERE NOT EXISTS (SELECT 1 FROM agents a WHERE a.name = i.agent)",
                &[],
            )
            .await
            .map_err(|e| db.pg_error(&e))?;
            tracing::info!(agents, "log_retention: forgot agents silent for longer");
        }
        tx.commit().await.map_err(|e| db.pg_error(&e))?;
        Ok((chunks, records))
    }
}

/// The event a notification means, for followers.
fn parse_event(channel: &str, payload: &str) -> Option<LogEvent> {
    if channel == super::JOBS_CHANNEL {
        return payload
            .strip_prefix("ended ")
            .map(|k| LogEvent::End(k.to_string()));
    }
    let mut words = payload.split(' ');
    let key = words.next()?.to_string();
    match words.next()? {
        "start" => Some(LogEvent::Start(key, words.next().unwrap_or("").to_string())),
        "end" => Some(LogEvent::LogEnd(key)),
        _ => Some(LogEvent::Chunk(key)),
    }
}

/// The BuildInfo of a job that has not ended, from its stored request.
fn blank_info(project: &str, id: &str, request: &str, since: String) -> BuildInfo {
    #[derive(serde::Deserialize, Default)]
    struct Stored {
        #[serde(default)]
        group: String,
        #[serde(default)]
        params: std::collections::BTreeMap<String, String>,
    }
    let req: Stored = serde_json::from_str(request).unwrap_or_default();
    BuildInfo {
        started_at: since,
        ..crate::engine::blank_info(&req.params, &req.group, project, id)
    }
}

/// A log file as the shipper reads it.
struct Tail {
    stream: LogStream,
    pending: std::path::PathBuf,
    ready: std::path::PathBuf,
    file: Option<tokio::fs::File>,
    /// The offset of `buf`'s first byte (all before it is shipped).
    pos: u64,
    /// Read, not shipped yet (at most [`CHUNK_MAX`]).
    buf: Vec<u8>,
}

impl Tail {
    fn new(stream: LogStream, pending: std::path::PathBuf, ready: std::path::PathBuf) -> Tail {
        Tail {
            stream,
            pending,
            ready,
            file: None,
            pos: 0,
            buf: Vec::new(),
        }
    }

    /// Read more into `buf`, up to [`CHUNK_MAX`] (the file opened in `pending/`, or in
    /// `ready/` once the job ended).
    async fn fill(&mut self, ended: bool) {
        if self.file.is_none() {
            let path = if ended { &self.ready } else { &self.pending };
            self.file = tokio::fs::File::open(path).await.ok();
        }
        let Some(f) = self.file.as_mut() else { return };
        while self.buf.len() < CHUNK_MAX {
            let mut more = vec![0u8; CHUNK_MAX - self.buf.len()];
            match f.read(&mut more).await {
                Ok(0) | Err(_) => return,
                Ok(n) => self.buf.extend_from_slice(&more[..n]),
            }
        }
    }
}

/// A running job's log shipping.
pub struct Shipper {
    finish: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Shipper {
    /// The job ended (its directory is in `ready/`): ship the rest of its logs and announce
    /// their end; returns once done (or given up after 30 s without the database).
    pub async fn finish(self) {
        let _ = self.finish.send(true);
        let _ = self.task.await;
    }
}

/// A follower of a job's log (`/log` for a job on another agent).
struct Follow {
    logs: Arc<Logs>,
    project: String,
    id: String,
    key: String,
    events: broadcast::Receiver<LogEvent>,
    /// The run whose chunks are read (a new run restarts the log).
    run: Option<String>,
    /// The offset of the next byte to read.
    pos: u64,
    partial: Vec<u8>,
    lines: VecDeque<String>,
    ending: bool,
    done: bool,
}

impl Follow {
    fn split_lines(&mut self) {
        while let Some(at) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=at).collect();
            self.lines
                .push_back(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
    }

    fn restart(&mut self, run: Option<String>) {
        self.run = run;
        self.pos = 0;
        self.partial.clear();
    }

    /// Read the chunks from `pos` on; `Ok(true)` when some were.
    async fn read_more(&mut self) -> Result<bool, ClusterError> {
        let page = self
            .logs
            .page(&self.project, &self.id, LogStream::Out, self.pos)
            .await?;
        if page.is_empty() {
            return Ok(false);
        }
        for (start, data, run) in page {
            match &self.run {
                Some(r) if *r != run => {
                    // Another run replaced the one followed: its log starts again.
                    self.restart(Some(run));
                    return Ok(true);
                }
                Some(_) => {}
                None => self.run = Some(run),
            }
            let end = start + data.len() as u64;
            if end <= self.pos {
                continue;
            }
            let skip = usize::try_from(self.pos.saturating_sub(start)).unwrap_or(0);
            self.partial
                .extend_from_slice(&data[skip.min(data.len())..]);
            self.pos = end;
        }
        self.split_lines();
        Ok(true)
    }

    /// Whether the job is still queued or running (its record says).
    async fn in_flight(&self) -> bool {
        matches!(self.logs.record(&self.project, &self.id).await, Ok(Some(j)) if j.state.in_flight())
    }

    /// Wait for a notification about this job (or a reason to read it again).
    async fn wait(&mut self) {
        let woken = tokio::time::timeout(SAFETY_RECHECK, async {
            loop {
                match self.events.recv().await {
                    Ok(LogEvent::Chunk(k) | LogEvent::LogEnd(k)) if k == self.key => return None,
                    Ok(LogEvent::Start(k, run)) if k == self.key => return Some(Some(run)),
                    Ok(LogEvent::End(k)) if k == self.key => return Some(None),
                    Ok(LogEvent::Reconnected) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Some(Some(String::new()))
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Closed) => return Some(None),
                }
            }
        })
        .await;
        match woken {
            Ok(None) => {}
            // A run starts: unless it is the one followed, its log starts again.
            Ok(Some(Some(run))) if !run.is_empty() => {
                if self.run.as_deref() != Some(run.as_str()) {
                    self.restart(Some(run));
                }
            }
            Ok(Some(None)) => self.ending = true,
            // Missed notifications, or none for long: the record says whether it goes on.
            Ok(Some(Some(_))) | Err(_) => {
                if !self.in_flight().await {
                    self.ending = true;
                }
            }
        }
    }

    async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(l) = self.lines.pop_front() {
                return Some(l);
            }
            if self.done {
                return None;
            }
            match self.read_more().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(project = %self.project, id = %self.id, error = %e, "following a log in the database stopped");
                    self.ending = true;
                }
            }
            if self.ending {
                if !self.partial.is_empty() {
                    let rest = std::mem::take(&mut self.partial);
                    self.lines
                        .push_back(String::from_utf8_lossy(&rest).into_owned());
                }
                self.done = true;
                continue;
            }
            self.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::NEVER_RAN;

    #[test]
    fn notifications_are_parsed() {
        assert_eq!(
            parse_event(CHANNEL, "p/abc out 65536 100"),
            Some(LogEvent::Chunk("p/abc".into()))
        );
        assert_eq!(
            parse_event(CHANNEL, "p/abc start a1-5"),
            Some(LogEvent::Start("p/abc".into(), "a1-5".into()))
        );
        assert_eq!(
            parse_event(CHANNEL, "p/abc end"),
            Some(LogEvent::LogEnd("p/abc".into()))
        );
        assert_eq!(
            parse_event(super::super::JOBS_CHANNEL, "ended p/abc"),
            Some(LogEvent::End("p/abc".into()))
        );
        assert_eq!(parse_event(super::super::JOBS_CHANNEL, "queued"), None);
    }

    #[test]
    fn a_blank_info_comes_from_the_request() {
        let info = blank_info(
            "p",
            "abc",
            r#"{"project":"p","group":"g","params":{"a":"1"}}"#,
            "2024-01-01T00:00:00.000000Z".into(),
        );
        assert_eq!(info.group, "g");
        assert_eq!(info.params.get("a").map(String::as_str), Some("1"));
        assert_eq!(info.url, "job/p/abc");
        assert_eq!(info.exit_code, NEVER_RAN);
        assert_eq!(
            crate::service::index_time(&info.started_at),
            "Mon, 01 Jan 2024 00:00:00"
        );
    }
}
