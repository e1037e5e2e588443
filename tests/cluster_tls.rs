//! TLS to the cluster's database (src/cluster/tls.rs): libpq's `sslmode` and `sslrootcert` in
//! `database_url`, against a throwaway PostgreSQL with `ssl=on` and certificates made here with
//! the `openssl` command (a test CA, server certificates for 127.0.0.1 and for another name).
//! What the server sees is read from `pg_stat_ssl` per connection (`application_name` is
//! `mistryd <agent>` for the pool, `mistryd <agent> listener` for LISTEN).
//!
//! Skips when PostgreSQL or openssl is missing, failing under `CI`.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::{agent, post_job, run_mistryd};
use common::server::Server;
use postgres::Postgres;
use serde_json::{json, Value};

/// Certificates made with `openssl` in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// `None` (skip) when openssl is missing; a failure under `CI`.
    fn new_or_skip() -> Option<Pki> {
        let found = Command::new("openssl")
            .arg("version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            assert!(std::env::var_os("CI").is_none(), "openssl is not installed");
            eprintln!("skipped: openssl is not installed");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("mistry-pki")
            .tempdir()
            .unwrap();
        Some(Pki { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    }

    /// A CA `<name>.pem` (key `<name>.key`): its certificate's path.
    fn ca(&self, name: &str) -> PathBuf {
        let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &format!("/CN=mistry test CA {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        self.path(&pem)
    }

    /// A server certificate `<name>.crt` signed by the CA `ca` for the subject alternative
    /// names `san` (`IP:127.0.0.1,DNS:localhost`): its certificate and key, PEM.
    fn server(&self, ca: &str, name: &str, san: &str) -> (Vec<u8>, Vec<u8>) {
        let (crt, key, csr, ext) = (
            format!("{name}.crt"),
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.ext"),
        );
        std::fs::write(
            self.path(&ext),
            format!(
                "subjectAltName={san}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
        (
            std::fs::read(self.path(&crt)).unwrap(),
            std::fs::read(self.path(&key)).unwrap(),
        )
    }
}

/// The database and the CA directory, or `None` (skip).
fn setup(ssl: Option<(&str, &str)>) -> Option<(Pki, Postgres)> {
    let pki = Pki::new_or_skip()?;
    pki.ca("ca1");
    pki.ca("ca2");
    let pg = match ssl {
        Some((name, san)) => {
            let (cert, key) = pki.server("ca1", name, san);
            Postgres::start_ssl_or_skip(&cert, &key)?
        }
        None => Postgres::start_or_skip()?,
    };
    Some((pki, pg))
}

/// `url` with a query.
fn with(url: &str, query: &str) -> String {
    format!("{url}?{query}")
}

/// Whether each connection of agent `name` (its pool's, then its listener's) is TLS, as the
/// server sees it: `<application_name>=<ssl>`, one line per distinct pair.
fn ssl_of(pg: &Postgres, name: &str) -> Vec<String> {
    let sql = format!(
        "SELECT DISTINCT a.application_name || '=' || s.ssl FROM pg_stat_ssl s \
         JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name IN ('mistryd {name}', 'mistryd {name} listener') ORDER BY 1"
    );
    let want = 2;
    let started = Instant::now();
    loop {
        let lines: Vec<String> = pg.psql(&sql).lines().map(str::to_string).collect();
        if lines.len() >= want || started.elapsed() > Duration::from_secs(10) {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn expect_ssl(pg: &Postgres, name: &str, ssl: bool) {
    assert_eq!(
        ssl_of(pg, name),
        [
            format!("mistryd {name} listener={ssl}"),
            format!("mistryd {name}={ssl}"),
        ]
    );
}

/// A job on `s`: 201.
fn runs_a_job(s: &Server, name: &str) {
    let (status, text) = post_job(s, &json!({"project": "simple", "params": {"name": name}}));
    assert_eq!(status, 201, "{text}");
    let info: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(info["ExitCode"], 0, "{info}");
}

fn assert_refused(url: &str, line: &str) {
    let (code, stderr) = run_mistryd(url, None);
    let last = stderr.lines().last().unwrap_or("").to_string();
    assert_eq!((code, last), (Some(1), line.to_string()), "{url}");
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn verify_full_with_the_ca_runs_a_job_over_tls_and_an_unknown_ca_is_refused() {
    let Some((pki, pg)) = setup(Some(("db", "IP:127.0.0.1,DNS:localhost"))) else {
        return;
    };
    let ca1 = shown(&pki.path("ca1.pem"));
    let ca2 = shown(&pki.path("ca2.pem"));

    // verify-full with the server's CA: a job runs, every connection is TLS.
    let full = with(&pg.url(), &format!("sslmode=verify-full&sslrootcert={ca1}"));
    let s = agent(&full, "full", 1);
    runs_a_job(&s, "over-tls");
    expect_ssl(&pg, "full", true);
    drop(s);

    // The key=value form, as libpq writes it.
    let kv = format!(
        "host=127.0.0.1 port={} user=mistry dbname=mistry sslmode=verify-full sslrootcert='{ca1}'",
        pg.port
    );
    let s = agent(&kv, "keyvalue", 1);
    expect_ssl(&pg, "keyvalue", true);
    drop(s);

    // require without sslrootcert: TLS, the certificate unchecked.
    let s = agent(&with(&pg.url(), "sslmode=require"), "require", 1);
    expect_ssl(&pg, "require", true);
    drop(s);

    // disable: in the clear, though the server offers TLS.
    let s = agent(&with(&pg.url(), "sslmode=disable"), "plain", 1);
    expect_ssl(&pg, "plain", false);
    drop(s);

    // A SCRAM password over TLS with channel binding required: SCRAM-SHA-256-PLUS works (the
    // server checks the tls-server-end-point hash of its certificate).
    pg.psql("CREATE ROLE agent LOGIN SUPERUSER PASSWORD 's3cret'");
    pg.hba_first("hostssl all agent 127.0.0.1/32 scram-sha-256");
    let port = pg.port;
    let scram = format!(
        "postgres://agent:s3cret@127.0.0.1:{port}/mistry?sslmode=verify-full&sslrootcert={ca1}\
         &channel_binding=require"
    );
    let s = agent(&scram, "scram", 1);
    expect_ssl(&pg, "scram", true);
    assert_eq!(
        pg.psql("SELECT DISTINCT usename FROM pg_stat_activity WHERE application_name = 'mistryd scram'"),
        "agent"
    );
    drop(s);

    // Another CA: refused, and the password stays hidden.
    let url = format!(
        "postgres://mistry:hunter2@127.0.0.1:{port}/mistry?sslmode=verify-full&sslrootcert={ca2}"
    );
    assert_refused(
        &url,
        &format!(
            "mistryd: cannot reach the database at postgres://mistry:***@127.0.0.1:{port}/mistry\
             ?sslmode=verify-full&sslrootcert={ca2}: error performing TLS handshake: the server's \
             certificate is not signed by a trusted CA (unknown CA; trusted: sslrootcert {ca2})"
        ),
    );
    // verify-ca with another CA, and verify-full with the system's CAs: refused alike.
    let url = with(&pg.url(), &format!("sslmode=verify-ca&sslrootcert={ca2}"));
    assert_refused(
        &url,
        &format!(
            "mistryd: cannot reach the database at {url}: error performing TLS handshake: the \
             server's certificate is not signed by a trusted CA (unknown CA; trusted: \
             sslrootcert {ca2})"
        ),
    );
    let url = with(&pg.url(), "sslmode=verify-full");
    assert_refused(
        &url,
        &format!(
            "mistryd: cannot reach the database at {url}: error performing TLS handshake: the \
             server's certificate is not signed by a trusted CA (unknown CA; trusted: the \
             system's CA store)"
        ),
    );
    // An unreadable CA file, an unknown sslmode: named.
    let missing = shown(&pki.path("missing.pem"));
    let url = with(
        &pg.url(),
        &format!("sslmode=verify-full&sslrootcert={missing}"),
    );
    assert_refused(
        &url,
        &format!(
            "mistryd: TLS to the database at {url}: cannot read sslrootcert {missing}: No such \
             file or directory (os error 2)"
        ),
    );
    let url = with(&pg.url(), "sslmode=verify");
    assert_refused(
        &url,
        &format!(
            "mistryd: invalid database_url {url}: sslmode \"verify\" is not one of disable, \
             allow, prefer, require, verify-ca, verify-full"
        ),
    );
}

#[test]
fn verify_full_refuses_a_certificate_for_another_host_that_verify_ca_accepts() {
    let Some((pki, pg)) = setup(Some(("other", "DNS:db.example"))) else {
        return;
    };
    let ca1 = shown(&pki.path("ca1.pem"));
    let ca2 = shown(&pki.path("ca2.pem"));
    let url = with(&pg.url(), &format!("sslmode=verify-full&sslrootcert={ca1}"));
    assert_refused(
        &url,
        &format!(
            "mistryd: cannot reach the database at {url}: error performing TLS handshake: the \
             server's certificate does not match the host name \"127.0.0.1\" (host name \
             mismatch; it is for DnsName(\"db.example\"); sslmode=verify-full)"
        ),
    );
    // verify-ca checks the chain only: it connects.
    let s = agent(
        &with(&pg.url(), &format!("sslmode=verify-ca&sslrootcert={ca1}")),
        "ca",
        1,
    );
    runs_a_job(&s, "verify-ca");
    expect_ssl(&pg, "ca", true);
    drop(s);
    // require with sslrootcert checks the chain (libpq's rule): another CA is refused.
    let url = with(&pg.url(), &format!("sslmode=require&sslrootcert={ca2}"));
    assert_refused(
        &url,
        &format!(
            "mistryd: cannot reach the database at {url}: error performing TLS handshake: the \
             server's certificate is not signed by a trusted CA (unknown CA; trusted: \
             sslrootcert {ca2})"
        ),
    );
}

#[test]
fn a_server_without_tls_refuses_require_and_serves_prefer_and_disable_in_the_clear() {
    let Some((pki, pg)) = setup(None) else {
        return;
    };
    let ca1 = shown(&pki.path("ca1.pem"));
    for query in [
        "sslmode=require".to_string(),
        format!("sslmode=verify-full&sslrootcert={ca1}"),
    ] {
        let url = with(&pg.url(), &query);
        assert_refused(
            &url,
            &format!(
                "mistryd: cannot reach the database at {url}: error performing TLS handshake: \
                 server does not support TLS"
            ),
        );
    }
    // prefer (the default, also when said): plain when the server has no TLS.
    let s = agent(&with(&pg.url(), "sslmode=prefer"), "prefer", 1);
    runs_a_job(&s, "prefer");
    expect_ssl(&pg, "prefer", false);
    drop(s);
    let s = agent(&pg.url(), "default", 1);
    expect_ssl(&pg, "default", false);
    drop(s);
    let s = agent(&with(&pg.url(), "sslmode=disable"), "disable", 1);
    expect_ssl(&pg, "disable", false);
    drop(s);
}
