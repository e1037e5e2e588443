//! The agent's one `LISTEN` connection: it listens on the job records' channel
//! ([`super::JOBS_CHANNEL`]) and the central logs' ([`super::LOGS_CHANNEL`]) and hands every
//! notification to each handler (the scheduler's waiters and claim loop, the logs' followers).
//! When the connection is lost it reconnects every second; each (re)connection and each failure
//! is told to every handler as [`Notice::Reconnected`] (notifications may have been missed:
//! every waiter reads its job again).

use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use tokio::sync::{mpsc, watch};

/// What the listener tells a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Notice<'a> {
    /// A notification on `channel`.
    Notification { channel: &'a str, payload: &'a str },
    /// The listener (re)connected: notifications may have been missed before.
    Reconnected,
    /// The listener lost its connection (or could not connect): notifications may be missed
    /// until it is [`Notice::Reconnected`].
    Lost,
}

/// A receiver of the listener's notices (called on the listener's task: it must not block).
pub(super) type Handler = Box<dyn Fn(Notice<'_>) + Send + Sync>;

/// Listen on the jobs' and the logs' channels for agent `agent` of the database at `url`,
/// telling `handlers`, until `stop` turns true.
pub(super) async fn run(
    url: String,
    agent: String,
    handlers: Vec<Handler>,
    mut stop: watch::Receiver<bool>,
) {
    let tell = |n: Notice<'_>| handlers.iter().for_each(|h| h(n));
    let mut failing = false;
    loop {
        match listen_once(&url, &agent, &tell, &mut stop).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(%agent, error = %e, "the notifications' connection failed; retrying every second");
                }
                failing = true;
            }
        }
        // Whatever was missed: every waiter reads its job again.
        tell(Notice::Lost);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Why the listener's connection failed (it reconnects).
#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error(transparent)]
    Config(#[from] super::ClusterError),
    #[error("{}", super::db::chain(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("the connection to the database was lost")]
    Lost,
}

/// One connection's life; `Ok(true)` when stopped.
async fn listen_once(
    url: &str,
    agent: &str,
    tell: &impl Fn(Notice<'_>),
    stop: &mut watch::Receiver<bool>,
) -> Result<bool, ListenError> {
    // The pool's TLS settings (`sslmode`, `sslrootcert`): super::db::pg_config.
    let (mut config, tls) = super::db::pg_config(url)?;
    config.connect_timeout(Duration::from_secs(5));
    config.application_name(format!("mistryd {agent} listener"));
    let (client, mut connection) = config.connect(tls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, String)>();
    let conn = tokio::spawn(async move {
        let mut messages = stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    let pair = (n.channel().to_string(), n.payload().to_string());
                    if tx.send(pair).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "the notifications' connection ended");
                    return;
                }
            }
        }
    });
    let listening =
        super::records::schema::listen(&client, &[super::JOBS_CHANNEL, super::LOGS_CHANNEL]).await;
    if let Err(e) = listening {
        conn.abort();
        return Err(e.into());
    }
    tracing::info!(%agent, "listening for job and log notifications");
    tell(Notice::Reconnected);
    let stopped = loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some((channel, payload)) => tell(Notice::Notification {
                    channel: &channel,
                    payload: &payload,
                }),
                None => break false,
            },
            _ = stop.wait_for(|s| *s) => break true,
        }
    };
    conn.abort();
    drop(client);
    if stopped {
        Ok(true)
    } else {
        Err(ListenError::Lost)
    }
}
