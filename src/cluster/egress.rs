//! What isolated jobs may not reach besides the host itself, as the cluster knows it: the
//! database's hosts (`database_url`) and every agent's advertise URL host (this one's too: it
//! may be a public address the host reaches through NAT). They go to the egress policy of
//! isolated networks (`sandbox::egress`, [`sandbox::EgressPolicy::set_dynamic`]) at start and
//! again every `heartbeat`, as agents come and go and names resolve anew. The database's hosts
//! are read from its URL once, at start: never from the TLS set-up, which reads the CA file
//! (a CA file being replaced must not take the database off the list for a heartbeat).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use sandbox::egress::IpNet;
use tokio::sync::watch;

use super::Cluster;

/// The host and port of an `http(s)://` URL (the scheme's port when it names none).
fn url_host(url: &str) -> Option<(String, u16)> {
    let uri: ureq::http::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    Some((host.to_string(), port))
}

/// The TCP hosts of a database URL (Unix sockets need no rule: a job cannot reach them); none
/// for a URL that does not parse (the daemon refuses it at start).
fn database_hosts(url: &str) -> Vec<(String, u16)> {
    use tokio_postgres::config::Host;
    let Ok((config, _)) = super::db::parse_url(url) else {
        return Vec::new();
    };
    let ports = config.get_ports();
    config
        .get_hosts()
        .iter()
        .enumerate()
        .filter_map(|(i, h)| match h {
            Host::Tcp(name) => Some((
                name.clone(),
                ports.get(i).or(ports.first()).copied().unwrap_or(5432),
            )),
            _ => None,
        })
        .collect()
}

/// Every address of `hosts` (names resolved now; one that does not resolve is skipped).
async fn resolve(hosts: &[(String, u16)]) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    for (host, port) in hosts {
        if let Ok(ip) = host.parse::<IpAddr>() {
            out.insert(sandbox::egress::canonical(ip));
            continue;
        }
        let lookup = tokio::net::lookup_host((host.as_str(), *port));
        if let Ok(Ok(addrs)) = tokio::time::timeout(Duration::from_secs(5), lookup).await {
            out.extend(addrs.map(|a| sandbox::egress::canonical(a.ip())));
        }
    }
    out
}

impl Cluster {
    /// The hosts of the database (`database`) and of every agent (this one included).
    async fn denied_hosts(&self, database: &[(String, u16)]) -> Vec<(String, u16)> {
        let mut hosts: Vec<(String, u16)> = url_host(&self.me.advertise_url).into_iter().collect();
        hosts.extend_from_slice(database);
        if let Some(db) = &self.db {
            if let Ok(agents) = super::agents::list(db, self.agent_timeout).await {
                hosts.extend(agents.iter().filter_map(|a| url_host(&a.advertise_url)));
            }
        }
        hosts
    }

    /// Keep the egress policy's cluster addresses current (see the module documentation):
    /// once now, then every `heartbeat` until [`Cluster::stop`] when there is a database.
    pub async fn start_egress(self: &Arc<Self>, database_url: Option<String>) {
        let database: Arc<[(String, u16)]> = database_url
            .as_deref()
            .map(database_hosts)
            .unwrap_or_default()
            .into();
        let refresh = |me: Arc<Cluster>, database: Arc<[(String, u16)]>| async move {
            let hosts = me.denied_hosts(&database).await;
            let nets: Vec<IpNet> = resolve(&hosts).await.into_iter().map(IpNet::from).collect();
            tracing::debug!(
                ?nets,
                "isolated networks: the cluster's addresses are denied"
            );
            sandbox::egress_policy().set_dynamic(nets);
        };
        refresh(Arc::clone(self), Arc::clone(&database)).await;
        if self.db.is_none() {
            return;
        }
        let me = Arc::clone(self);
        let mut stop: watch::Receiver<bool> = self.stop.subscribe();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.heartbeat.max(Duration::from_secs(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                refresh(Arc::clone(&me), Arc::clone(&database)).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_urls() {
        assert_eq!(
            url_host("http://build1:8462"),
            Some(("build1".into(), 8462))
        );
        assert_eq!(
            url_host("https://[2001:db8::1]/x"),
            Some(("2001:db8::1".into(), 443))
        );
        assert_eq!(url_host("http://10.0.0.5"), Some(("10.0.0.5".into(), 80)));
        assert_eq!(url_host("not a url"), None);
        assert_eq!(
            database_hosts("postgres://mistry:pw@db1:6432,db2/mistry"),
            vec![("db1".into(), 6432), ("db2".into(), 5432)]
        );
        assert_eq!(
            database_hosts("host=/run/postgresql user=mistry"),
            Vec::<(String, u16)>::new()
        );
        assert_eq!(
            database_hosts("host=10.1.2.3 port=5433 user=mistry"),
            vec![("10.1.2.3".into(), 5433)]
        );
    }

    /// The database's hosts come from its URL alone: a CA file that cannot be read (being
    /// replaced, say) does not take them off the list of what jobs may not reach.
    #[test]
    fn database_hosts_do_not_read_the_ca_file() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let missing = dir.path().join("ca.pem");
        assert_eq!(
            database_hosts(&format!(
                "postgres://mistry@db1:6432/mistry?sslmode=verify-full&sslrootcert={}",
                missing.display()
            )),
            vec![("db1".into(), 6432)]
        );
    }

    #[tokio::test]
    async fn addresses_resolve() {
        let got = resolve(&[("127.0.0.1".into(), 1), ("::ffff:10.0.0.1".into(), 1)]).await;
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "127.0.0.1".parse().unwrap()
            ]
        );
    }
}
