//! The database: connecting (a pool of `tokio-postgres` connections, `deadpool-postgres`),
//! the embedded migrations (`refinery`), and errors that name the database (password redacted).

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use super::records::{schema, RecordsError};

mod embedded {
    refinery::embed_migrations!("src/cluster/migrations");
}

/// The table where refinery records the migrations applied.
pub const MIGRATION_TABLE: &str = "mistry_schema_history";

/// The advisory lock that serialises the migrations of agents starting at once
/// (`pg_advisory_lock`; "mistry" in ASCII, then 1).
const MIGRATION_LOCK: i64 = 0x6d69_7374_7279_0001;

/// How long connecting, and waiting for a pooled connection, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections per agent.
const POOL_SIZE: usize = 8;

/// What went wrong with the database; every message names it (password redacted).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The `database_url` does not parse (or its TLS parameters do not), or the pool cannot be
    /// made from it.
    #[error("invalid database_url {url}: {reason}")]
    BadUrl {
        /// The URL, password redacted.
        url: String,
        /// Why, on one line.
        reason: String,
    },
    /// The TLS connector could not be made (an unreadable `sslrootcert`, no CA certificate).
    #[error("TLS to the database at {url}: {reason}")]
    Tls {
        /// The URL, password redacted.
        url: String,
        /// Why, naming the file.
        reason: String,
    },
    /// The first connection failed (refused, authentication, TLS handshake, timeout).
    #[error("cannot reach the database at {url}: {reason}")]
    Unreachable {
        /// The URL, password redacted.
        url: String,
        /// The error and its sources, on one line.
        reason: String,
    },
    #[error(
        "the database schema is version {found}, newer than this mistryd ({known}): upgrade mistryd"
    )]
    /// The database was migrated by a newer mistryd: this one refuses to use it.
    TooNew {
        /// The schema version recorded in the database.
        found: i64,
        /// The newest version this mistryd knows.
        known: i64,
    },
    /// Reading the schema version or applying a migration failed.
    #[error("migrating the database at {url}: {reason}")]
    Migration {
        /// The URL, password redacted.
        url: String,
        /// The error and its sources, on one line.
        reason: String,
    },
    /// A query failed, or no connection was available in time.
    #[error("the database at {url}: {reason}")]
    Query {
        /// The URL, password redacted.
        url: String,
        /// The error and its sources, on one line.
        reason: String,
    },
    #[error(
        "another live agent is named {name} (at {url}): give this one its own agent_name, or \
         stop that one"
    )]
    /// Another agent with this `agent_name` has a live heartbeat at another URL, and answers
    /// there as that name.
    NameTaken {
        /// The agent name.
        name: String,
        /// The other agent's URL as it recorded it.
        url: String,
    },
    /// Something only the multi-agent mode has was asked of a single node (no `database_url`).
    #[error("no database: this mistryd runs as a single node (no database_url)")]
    NoDatabase,
}

/// An error and its sources, on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s.replace('\n', " ")
}

/// The URL with its password (if any) replaced by `***`: `postgres://u:***@host/db`, a
/// query's `password=***`, or a key=value string's `password=***` (quoted or not).
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        // Conservatively: everything from the first `:` to the last `@` may be a password
        // (one with an unencoded `@`, `/` or `?` included; a host's port may be hidden too),
        // and every `password=` parameter's value up to the next `&`.
        let rest = match (rest.find(':'), rest.rfind('@')) {
            (Some(colon), Some(at)) if colon < at => {
                format!("{}:***{}", &rest[..colon], &rest[at..])
            }
            _ => rest.to_string(),
        };
        let mut shown = String::with_capacity(rest.len());
        let mut left = rest.as_str();
        while let Some(at) = left.find("password=") {
            let value = at + "password=".len();
            shown.push_str(&left[..value]);
            shown.push_str("***");
            left = &left[value..];
            left = &left[left.find('&').unwrap_or(left.len())..];
        }
        shown.push_str(left);
        return format!("{scheme}://{shown}");
    }
    if let Some(shown) = super::tls::redact_key_values(url) {
        return shown;
    }
    // Not even key=value: show nothing after a `password`.
    match url.find("password") {
        Some(at) => format!("{}password=***", &url[..at]),
        None => url.to_string(),
    }
}

/// The tokio-postgres configuration of `url` and its TLS connector: libpq's `sslmode` and
/// `sslrootcert` are taken out and applied ([`super::tls`]); a `connect_timeout` is set when
/// the URL has none. Errors name the URL (password redacted); the CA file is read here.
pub fn pg_config(
    url: &str,
) -> Result<(tokio_postgres::Config, super::tls::MakeRustls), ClusterError> {
    let (config, settings) = parse_url(url)?;
    let tls = super::tls::connector(&settings).map_err(|e| ClusterError::Tls {
        url: redact(url),
        reason: e.to_string(),
    })?;
    Ok((config, tls))
}

/// [`pg_config`] without the TLS connector: the configuration and the TLS settings, nothing
/// read from disk (what names the database's hosts, `egress.rs`, needs no more).
pub(super) fn parse_url(
    url: &str,
) -> Result<(tokio_postgres::Config, super::tls::TlsSettings), ClusterError> {
    use tokio_postgres::config::Host;
    let bad = |reason: String| ClusterError::BadUrl {
        url: redact(url),
        reason,
    };
    let (rest, settings) = super::tls::split(url).map_err(|e| bad(e.to_string()))?;
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| {
        // The parser's message may quote a part of the password.
        if rest.contains("password") {
            bad("it does not parse as a URL or as key=value pairs".into())
        } else {
            bad(chain(&e))
        }
    })?;
    let unix_only = !config.get_hosts().is_empty()
        && config
            .get_hosts()
            .iter()
            .all(|h| !matches!(h, Host::Tcp(_)));
    // libpq ignores sslmode on Unix sockets (no TLS there); tokio-postgres would ask for it.
    config.ssl_mode(if unix_only {
        tokio_postgres::config::SslMode::Disable
    } else {
        settings.mode.negotiation()
    });
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    Ok((config, settings))
}

/// The cluster's database: a pool of connections.
pub struct Db {
    pool: Pool,
    /// The URL, password redacted, for messages.
    shown: String,
}

/// What [`Db::probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// PostgreSQL's `server_version`.
    pub server: String,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The schema's version; `None`: not migrated yet (the first agent's start migrates it).
    pub schema: Option<i64>,
    /// The advertise URL of an agent of this name that heartbeated in the last 5 minutes.
    pub namesake: Option<String>,
}

/// The newest schema version this mistryd knows (its last embedded migration).
pub fn known_version() -> i64 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0)
}

impl Db {
    /// What `mistryd doctor` says of the database at `url`: one connection, nothing written.
    pub async fn probe(url: &str, agent: &str) -> Result<Probe, ClusterError> {
        let shown = redact(url);
        let (mut config, tls) = pg_config(url)?;
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name(format!("mistryd doctor {agent}"));
        }
        let err = |e: tokio_postgres::Error| ClusterError::Unreachable {
            url: shown.clone(),
            reason: chain(&e),
        };
        let (client, connection) = config.connect(tls).await.map_err(err)?;
        let conn_task = tokio::spawn(connection);
        let q = |e: tokio_postgres::Error| ClusterError::Query {
            url: shown.clone(),
            reason: chain(&e),
        };
        let (server, tls_used) = schema::server(&client).await.map_err(q)?;
        let schema = schema::version(&client, MIGRATION_TABLE).await.map_err(q)?;
        let namesake = if schema.is_some() {
            super::records::agents::namesake(&client, agent)
                .await
                .map_err(q)?
        } else {
            None
        };
        drop(client);
        let _ = conn_task.await;
        Ok(Probe {
            server,
            tls: tls_used,
            schema,
            namesake,
        })
    }

    /// Connect to `url`, apply the migrations this mistryd has and the database lacks, and make
    /// the pool. `agent` names the connections (`application_name`).
    pub async fn connect(url: &str, agent: &str) -> Result<Db, ClusterError> {
        let shown = redact(url);
        let (mut config, tls) = pg_config(url)?;
        if config.get_application_name().is_none() {
            config.application_name(format!("mistryd {agent}"));
        }
        let unreachable = |e: tokio_postgres::Error| ClusterError::Unreachable {
            url: shown.clone(),
            reason: chain(&e),
        };
        let (mut client, connection) = config.connect(tls.clone()).await.map_err(unreachable)?;
        let conn_task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "the migration connection ended");
            }
        });
        let migrated = migrate(&mut client, &shown).await;
        drop(client);
        let _ = conn_task.await;
        migrated?;
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| ClusterError::BadUrl {
                url: shown.clone(),
                reason: chain(&e),
            })?;
        Ok(Db { pool, shown })
    }

    /// The URL, password redacted.
    pub fn url(&self) -> &str {
        &self.shown
    }

    /// A connection from the pool.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, ClusterError> {
        use deadpool_postgres::PoolError;
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => self.error(chain(&e)),
            PoolError::Timeout(_) => self.error(format!(
                "no connection within {}s",
                CONNECT_TIMEOUT.as_secs()
            )),
            e => self.error(chain(&e)),
        })
    }

    /// An error of a query (or of getting a connection) on this database.
    pub fn error(&self, reason: impl Into<String>) -> ClusterError {
        ClusterError::Query {
            url: self.shown.clone(),
            reason: reason.into(),
        }
    }

    /// A `tokio_postgres` error on this database.
    pub fn pg_error(&self, e: &tokio_postgres::Error) -> ClusterError {
        self.error(chain(e))
    }

    /// An error of a statement on the records of this database.
    pub(super) fn records_error(&self, e: RecordsError) -> ClusterError {
        self.error(chain(&e))
    }
}

/// Apply the embedded migrations under the advisory lock (agents starting at once take turns:
/// the first applies, the others find them applied), after refusing a schema newer than ours.
async fn migrate(client: &mut tokio_postgres::Client, shown: &str) -> Result<(), ClusterError> {
    let err = |e: &dyn std::error::Error| ClusterError::Migration {
        url: shown.to_string(),
        reason: chain(e),
    };
    schema::advisory_lock(client, MIGRATION_LOCK, true)
        .await
        .map_err(|e| err(&e))?;
    let result = async {
        if let Some(found) = schema::version(client, MIGRATION_TABLE)
            .await
            .map_err(|e| err(&e))?
        {
            let known = known_version();
            if found > known {
                return Err(ClusterError::TooNew { found, known });
            }
        }
        let report = embedded::migrations::runner()
            .set_migration_table_name(MIGRATION_TABLE)
            .run_async(client)
            .await
            .map_err(|e| err(&e))?;
        for m in report.applied_migrations() {
            tracing::info!(
                version = m.version(),
                name = m.name(),
                "database migration applied"
            );
        }
        Ok(())
    }
    .await;
    // The lock also goes with the connection; unlock anyway, the connection may be pooled one day.
    let _ = schema::advisory_lock(client, MIGRATION_LOCK, false).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://mistry@127.0.0.1:5433/mistry"),
            "postgres://mistry@127.0.0.1:5433/mistry"
        );
        assert_eq!(
            redact("postgres://mistry:s3cr:et@db/mistry?sslmode=disable"),
            "postgres://mistry:***@db/mistry?sslmode=disable"
        );
        assert_eq!(
            redact("postgresql://db/mistry?user=m&password=x&sslmode=disable"),
            "postgresql://db/mistry?user=m&password=***&sslmode=disable"
        );
        assert_eq!(
            redact("host=/run/postgresql user=mistry password=x dbname=mistry"),
            "host=/run/postgresql user=mistry password=*** dbname=mistry"
        );
        // A `/` in the password, a quoted password with a space, the TLS parameters.
        assert_eq!(
            redact("postgres://mistry:a/b@db/mistry?sslmode=verify-full&sslrootcert=/ca.pem"),
            "postgres://mistry:***@db/mistry?sslmode=verify-full&sslrootcert=/ca.pem"
        );
        assert_eq!(
            redact("host=db password='a b' sslmode=require"),
            "host=db password=*** sslmode=require"
        );
        assert_eq!(redact("host=db password='a b"), "host=db password=***");
        // An unencoded `@` in the password; an `@` in the query; both forms at once.
        assert_eq!(redact("postgres://u:p@ss@db/m"), "postgres://u:***@db/m");
        assert_eq!(
            redact("postgres://db/m?user=u&password=secret&application_name=x@y"),
            "postgres://db/m?user=u&password=***&application_name=x@y"
        );
        assert_eq!(
            redact("postgres://u:one@db/m?password=two&sslmode=require"),
            "postgres://u:***@db/m?password=***&sslmode=require"
        );
    }

    #[test]
    fn the_embedded_schema_is_version_6() {
        assert_eq!(known_version(), 6);
    }
}
