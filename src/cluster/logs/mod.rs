//! Central job logs: every job's log in the database as it is produced (table `job_logs`,
//! migration V3), so that every agent's `/job`, `/log` and web view show the log of a job that
//! runs or ran on another agent.
//!
//! Shipping ([`Logs::ship`], started by the scheduler for every job this agent runs): the job's
//! `out.log` and `stderr.log` are read as they grow, every `log_ship_every` (200 ms), and inserted in
//! chunks of at most [`CHUNK_MAX`] bytes keyed by (project, id, stream, byte offset): a retried
//! insert never duplicates. Each chunk is announced on the channel [`CHANNEL`] with
//! `<project>/<id> <stream> <pos> <length>` (never the data: NOTIFY payloads are limited to
//! 8000 bytes). A run first deletes the previous run's chunks (a rebuild, or a retry after an
//! agent died) and announces `<project>/<id> start <run>`; its last chunk is shipped, and
//! `<project>/<id> end` announced, before the job's record turns `ready` or `failed`
//! ([`Shipper::finish`]). A short run's log, never shipped, goes whole with its end's record,
//! announced by its `start <run>` alone ([`WholeLog`]). Chunks are inserted only while the
//! job's record is this agent's (an agent taken for dead does not write over the log of the
//! job's new run). While the database
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
use tokio::sync::{broadcast, mpsc, watch};

mod read;
mod ship;

pub use ship::{Shipper, WholeLog};

use super::listen::Notice;
use super::records::{logs as rows, RecordsError};
use super::{Cluster, ClusterError};
use crate::engine::JobDir;
use crate::streams::ByteStream;

/// A chunk of a stream read from the database.
type Bytes = Vec<u8>;
use crate::jobs::BuildInfo;

pub use super::LOGS_CHANNEL as CHANNEL;
/// The largest chunk shipped.
pub const CHUNK_MAX: usize = 64 * 1024;
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
    /// The stream's name in the database's log rows: `out` or `stderr`.
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
    /// How often a running job's logs are shipped (`log_ship_every`).
    ship_every: Duration,
    events: broadcast::Sender<LogEvent>,
}

impl Logs {
    pub(super) fn new(
        cluster: Arc<Cluster>,
        retention: Option<Duration>,
        ship_every: Duration,
    ) -> Logs {
        Logs {
            cluster,
            retention,
            ship_every,
            events: broadcast::channel(4096).0,
        }
    }

    /// A pooled connection, and how its statements' errors name the database.
    async fn client(
        &self,
    ) -> Result<
        (
            deadpool_postgres::Object,
            impl Fn(RecordsError) -> ClusterError + '_,
        ),
        ClusterError,
    > {
        self.cluster.records_client().await
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

    // ------------------------------------------------------------------ notifications

    /// A notice of the agent's listener ([`super::listen`]), for followers.
    pub(super) fn notified(&self, notice: Notice<'_>) {
        let event = match notice {
            Notice::Reconnected | Notice::Lost => Some(LogEvent::Reconnected),
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
                    tracing::info!(agent = %self.me(), chunks, records, "log_retention: pruned the logs and records of jobs that ended longer ago");
                }
                Err(e) => {
                    tracing::debug!(agent = %self.me(), error = %e, "pruning old logs failed");
                }
            }
        }
    }

    /// Delete the log chunks and the records of jobs that ended longer than `retention` ago
    /// (chunks without a record once they are that old); never those of a job queued or
    /// running. Agents silent that long (and at least a day) that no record names go too. Returns (chunks, records)
    /// deleted.
    pub async fn prune(&self, retention: Duration) -> Result<(u64, u64), ClusterError> {
        let (mut client, err) = self.client().await?;
        let pruned = rows::prune(&mut client, retention).await.map_err(err)?;
        if pruned.agents > 0 {
            let agents = pruned.agents;
            tracing::info!(agents, "log_retention: forgot agents silent for longer");
        }
        Ok((pruned.chunks, pruned.records))
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
