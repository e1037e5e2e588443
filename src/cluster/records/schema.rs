//! The statements around the records rather than on them: the migration runner's (its history
//! table, its advisory lock; the migrations themselves are `src/cluster/migrations/`), the
//! probe's (`mistryd doctor`), and the listener's `LISTEN`. They return `tokio_postgres`'s
//! errors: `db.rs` and `listen.rs` name the database in theirs.

use tokio_postgres::Client;

/// The schema version the database's migration history (table `table`) holds; `None` when it
/// has none (never migrated).
pub(in crate::cluster) async fn version(
    client: &Client,
    table: &str,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_one(
            &format!("SELECT COALESCE(MAX(version), 0)::bigint FROM {table}"),
            &[],
        )
        .await?;
    Ok(Some(row.try_get(0)?))
}

/// Take (`true`) or give back (`false`) the advisory lock `key` (the migrations' turns).
pub(in crate::cluster) async fn advisory_lock(
    client: &Client,
    key: i64,
    take: bool,
) -> Result<(), tokio_postgres::Error> {
    let sql = if take {
        "SELECT pg_advisory_lock($1)"
    } else {
        "SELECT pg_advisory_unlock($1)"
    };
    client.execute(sql, &[&key]).await.map(|_| ())
}

/// PostgreSQL's `server_version`, and whether this connection is TLS.
pub(in crate::cluster) async fn server(
    client: &Client,
) -> Result<(String, bool), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version'),
                    COALESCE((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
            &[],
        )
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// Listen on `channels` (names of ours, never outside text).
pub(in crate::cluster) async fn listen(
    client: &Client,
    channels: &[&str],
) -> Result<(), tokio_postgres::Error> {
    let sql: Vec<String> = channels.iter().map(|c| format!("LISTEN {c}")).collect();
    client.batch_execute(&sql.join("; ")).await
}
