//! The multi-agent mode's settings (top-level keys of the configuration file, beside mistry's):
//! `database_url` (or `MISTRY_DATABASE_URL`), `agent_name`, `advertise_url`, `agent_timeout`,
//! `heartbeat`, `log_retention`, `log_ship_every`, `job_attempts`. What they drive is
//! `crate::cluster`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Deserialize;

/// The environment variable that sets `database_url` (it wins over the file).
pub const DATABASE_URL_ENV: &str = "MISTRY_DATABASE_URL";
/// Default `agent_timeout`.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `heartbeat` (with the default `agent_timeout`; else [`heartbeat_for`] of it).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Default `log_ship_every`.
pub const DEFAULT_LOG_SHIP_EVERY: Duration = Duration::from_millis(200);
/// Default `job_attempts`.
pub const DEFAULT_JOB_ATTEMPTS: u32 = 3;
/// The shortest `agent_timeout`: shorter, a loaded agent would look dead between two heartbeats.
pub const MIN_AGENT_TIMEOUT: Duration = Duration::from_secs(1);

/// The heartbeat an `agent_timeout` implies when `heartbeat` is not set: a sixth of it (5s for
/// the default 30s), so that five heartbeats in a row can be late or lost before the agent
/// looks dead.
pub fn heartbeat_for(agent_timeout: Duration) -> Duration {
    agent_timeout / 6
}

/// The configuration file's keys of the multi-agent mode (top level, beside mistry's).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawSettings {
    /// `database_url`: a PostgreSQL URL; absent or empty: single node.
    pub database_url: Option<String>,
    /// `agent_name`: this agent's name among the others; absent: the host name.
    pub agent_name: Option<String>,
    /// `advertise_url`: `http://` or `https://` URL other agents reach this one at.
    pub advertise_url: Option<String>,
    /// `agent_timeout`: a Go duration (`30s`).
    pub agent_timeout: Option<String>,
    /// `heartbeat`: a Go duration, shorter than `agent_timeout`, not zero; absent: a sixth of
    /// `agent_timeout` ([`heartbeat_for`]).
    pub heartbeat: Option<String>,
    /// `log_retention`: an age (see [`crate::config::parse_age`]), not zero.
    pub log_retention: Option<String>,
    /// `log_ship_every`: a Go duration, not zero.
    pub log_ship_every: Option<String>,
    /// `job_attempts`: at least 1.
    pub job_attempts: Option<u32>,
}

/// The validated settings of the multi-agent mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `database_url` (or `MISTRY_DATABASE_URL`); `None`: single node.
    pub database_url: Option<String>,
    /// `agent_name`, default the host name.
    pub agent_name: String,
    /// `advertise_url`; `None`: derived from the address mistryd listens on
    /// ([`Settings::advertise_url`]).
    pub advertise_url: Option<String>,
    /// An agent without a heartbeat for this long is not alive (`agent_timeout`, default 30s).
    pub agent_timeout: Duration,
    /// How often this agent heartbeats (`heartbeat`; default a sixth of `agent_timeout`, 5s).
    pub heartbeat: Duration,
    /// Jobs that ended longer ago than this lose their central log and record
    /// (`log_retention`; default `None`: kept).
    pub log_retention: Option<Duration>,
    /// How often a running job's log is shipped to the database (`log_ship_every`, default
    /// 200ms): how live other agents' view of it is. A job that ends before its first
    /// shipping writes its log with its end record instead (one statement).
    pub log_ship_every: Duration,
    /// How many times a job runs at most when it keeps losing its agent (the agent dies, or
    /// is taken for dead, while it runs it): then it fails, saying so (`job_attempts`, default
    /// 3). A job put back in the queue waits 1s, 2s, 4s, ... (at most 60s) before its next run.
    pub job_attempts: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            database_url: None,
            agent_name: host_name(),
            advertise_url: None,
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
            heartbeat: DEFAULT_HEARTBEAT,
            log_retention: None,
            log_ship_every: DEFAULT_LOG_SHIP_EVERY,
            job_attempts: DEFAULT_JOB_ATTEMPTS,
        }
    }
}

/// The host name (the default agent name); `mistryd` when it cannot be read.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "mistryd".to_string())
}

impl Settings {
    /// Validate the file's keys (the environment is applied by [`Settings::apply_env`]).
    pub fn parse(raw: &RawSettings) -> Result<Settings> {
        let mut s = Settings {
            database_url: raw.database_url.clone().filter(|u| !u.is_empty()),
            ..Settings::default()
        };
        if let Some(name) = &raw.agent_name {
            s.agent_name = name.clone();
        }
        check_agent_name(&s.agent_name)?;
        if let Some(url) = &raw.advertise_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("advertise_url {url:?}: must start with http:// or https://");
            }
            s.advertise_url = Some(url.trim_end_matches('/').to_string());
        }
        if let Some(t) = &raw.agent_timeout {
            s.agent_timeout = super::parse_limit(t, "agent_timeout")?;
            if s.agent_timeout < MIN_AGENT_TIMEOUT {
                bail!(
                    "agent_timeout ({:?}) must be at least {:?}, or a loaded agent looks dead \
                     between two heartbeats",
                    s.agent_timeout,
                    MIN_AGENT_TIMEOUT
                );
            }
        }
        s.heartbeat = match &raw.heartbeat {
            Some(t) => super::parse_limit(t, "heartbeat")?,
            None => heartbeat_for(s.agent_timeout),
        };
        if let Some(t) = &raw.log_retention {
            let d = super::parse_age(t).map_err(|e| anyhow::anyhow!("log_retention: {e}"))?;
            if d.is_zero() {
                bail!("log_retention must be longer than 0s (leave it out to keep logs)");
            }
            s.log_retention = Some(d);
        }
        if let Some(t) = &raw.log_ship_every {
            s.log_ship_every = super::parse_limit(t, "log_ship_every")?;
            if s.log_ship_every.is_zero() {
                bail!("log_ship_every must be longer than 0s");
            }
        }
        if let Some(n) = raw.job_attempts {
            if n == 0 {
                bail!("job_attempts must be at least 1");
            }
            s.job_attempts = n;
        }
        if s.heartbeat.is_zero() {
            bail!("heartbeat must be longer than 0s");
        }
        if s.heartbeat >= s.agent_timeout {
            bail!(
                "heartbeat ({:?}) must be shorter than agent_timeout ({:?}), or live agents \
                 look dead between two heartbeats",
                s.heartbeat,
                s.agent_timeout
            );
        }
        Ok(s)
    }

    /// `MISTRY_DATABASE_URL`, when set and not empty, replaces the file's `database_url`.
    pub fn apply_env(&mut self) {
        self.apply_database_url(std::env::var(DATABASE_URL_ENV).ok());
    }

    fn apply_database_url(&mut self, env: Option<String>) {
        if let Some(url) = env.filter(|u| !u.is_empty()) {
            self.database_url = Some(url);
        }
    }

    /// `advertise_url`, else `http://<listen address>`; an unspecified address (`0.0.0.0`,
    /// `[::]`) is replaced by the host name, which other machines can resolve.
    pub fn advertise_url(&self, listen: &[SocketAddr]) -> String {
        if let Some(url) = &self.advertise_url {
            return url.clone();
        }
        match listen.first() {
            Some(a) if a.ip().is_unspecified() => format!("http://{}:{}", host_name(), a.port()),
            Some(a) => format!("http://{a}"),
            None => format!("http://{}:8462", host_name()),
        }
    }
}

fn check_agent_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 {
        bail!("agent_name {name:?}: must be 1 to 255 characters");
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        bail!("agent_name {name:?}: must not contain spaces or control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_defaults_validation_and_environment() {
        let s = Settings::parse(&RawSettings::default()).unwrap();
        assert_eq!(s.database_url, None);
        assert_eq!(s.agent_name, host_name());
        assert_eq!(
            (s.agent_timeout, s.heartbeat),
            (Duration::from_secs(30), Duration::from_secs(5))
        );
        let addr: SocketAddr = "127.0.0.1:8462".parse().unwrap();
        assert_eq!(s.advertise_url(&[addr]), "http://127.0.0.1:8462");
        let any: SocketAddr = "0.0.0.0:9000".parse().unwrap();
        assert_eq!(
            s.advertise_url(&[any]),
            format!("http://{}:9000", host_name())
        );

        let raw = RawSettings {
            database_url: Some("postgres://mistry@db/mistry".into()),
            agent_name: Some("a1".into()),
            advertise_url: Some("http://a1.example:8462/".into()),
            agent_timeout: Some("2s".into()),
            heartbeat: Some("500ms".into()),
            log_retention: Some("30d".into()),
            log_ship_every: Some("1s".into()),
            job_attempts: Some(5),
        };
        let mut s = Settings::parse(&raw).unwrap();
        assert_eq!(s.job_attempts, 5);
        assert_eq!(s.log_ship_every, Duration::from_secs(1));
        assert_eq!(s.advertise_url(&[addr]), "http://a1.example:8462");
        assert_eq!(s.heartbeat, Duration::from_millis(500));
        assert_eq!(s.log_retention, Some(Duration::from_secs(30 * 86400)));
        s.apply_database_url(Some(String::new()));
        assert_eq!(
            s.database_url.as_deref(),
            Some("postgres://mistry@db/mistry")
        );
        s.apply_database_url(Some("postgres://other/x".into()));
        assert_eq!(s.database_url.as_deref(), Some("postgres://other/x"));

        // Without `heartbeat`, it follows `agent_timeout`: a short timeout is no error.
        let s = Settings::parse(&RawSettings {
            agent_timeout: Some("5s".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (s.agent_timeout, s.heartbeat),
            (
                Duration::from_secs(5),
                Duration::from_millis(833) + Duration::from_nanos(333_333)
            )
        );
        assert_eq!(
            heartbeat_for(Duration::from_secs(60)),
            Duration::from_secs(10)
        );
        assert_eq!(heartbeat_for(DEFAULT_AGENT_TIMEOUT), DEFAULT_HEARTBEAT);

        let bad = |raw: RawSettings| Settings::parse(&raw).unwrap_err().to_string();
        assert_eq!(
            Settings::parse(&RawSettings::default())
                .unwrap()
                .job_attempts,
            3
        );
        assert_eq!(
            bad(RawSettings {
                job_attempts: Some(0),
                ..Default::default()
            }),
            "job_attempts must be at least 1"
        );
        assert_eq!(
            bad(RawSettings {
                log_ship_every: Some("0s".into()),
                ..Default::default()
            }),
            "log_ship_every must be longer than 0s"
        );
        assert_eq!(
            bad(RawSettings {
                agent_timeout: Some("999ms".into()),
                ..Default::default()
            }),
            "agent_timeout (999ms) must be at least 1s, or a loaded agent looks dead between two \
             heartbeats"
        );
        // A heartbeat set explicitly is still checked against the timeout.
        assert_eq!(
            bad(RawSettings {
                agent_timeout: Some("5s".into()),
                heartbeat: Some("5s".into()),
                ..Default::default()
            }),
            "heartbeat (5s) must be shorter than agent_timeout (5s), or live agents look dead \
             between two heartbeats"
        );
        assert_eq!(
            bad(RawSettings {
                heartbeat: Some("30s".into()),
                ..Default::default()
            }),
            "heartbeat (30s) must be shorter than agent_timeout (30s), or live agents look \
             dead between two heartbeats"
        );
        assert_eq!(
            bad(RawSettings {
                agent_name: Some("a b".into()),
                ..Default::default()
            }),
            "agent_name \"a b\": must not contain spaces or control characters"
        );
        assert_eq!(
            bad(RawSettings {
                advertise_url: Some("a1:8462".into()),
                ..Default::default()
            }),
            "advertise_url \"a1:8462\": must start with http:// or https://"
        );
    }
}
