//! A throwaway PostgreSQL cluster for the multi-agent tests: `initdb` + `pg_ctl` in a temporary
//! directory, trust authentication for the superuser `mistry`, listening on 127.0.0.1 on a free
//! port and on a Unix socket in that directory, with a database `mistry`. Stopped
//! (`pg_ctl stop -m immediate`) and removed on drop. Nothing system-wide is touched.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, the server runs as the
//! unprivileged user `mistry-test` (`runuser`). The binaries are `MISTRY_PG_BIN`, else
//! `/usr/lib/postgresql/15/bin` (Debian 12's `postgresql`, scripts/setup.sh).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The user the server runs as when the tests run as root.
const UNPRIVILEGED: &str = "mistry-test";

pub(crate) struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// `Some(user)`: run the server's tools as this user (the tests run as root).
    as_user: Option<&'static str>,
    /// More `postgres` options (`-c ssl=on ...`; empty for [`Postgres::start_or_skip`]).
    options: String,
}

fn bin_dir() -> PathBuf {
    std::env::var_os("MISTRY_PG_BIN").map_or_else(
        || PathBuf::from("/usr/lib/postgresql/15/bin"),
        PathBuf::from,
    )
}

/// A port nobody listens on now (the kernel's choice, released).
pub(crate) fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

impl Postgres {
    /// A running cluster with the database `mistry`; `None` (the test skips) when PostgreSQL is
    /// not installed, a failure when `CI` is set.
    pub(crate) fn start_or_skip() -> Option<Postgres> {
        Self::start_inner(None, "")
    }

    /// [`Postgres::start_or_skip`] with `pg_stat_statements` loaded, planning tracked, and its
    /// view created in `mistry`: what each statement cost, and how often it was planned.
    pub(crate) fn start_with_statement_stats_or_skip() -> Option<Postgres> {
        let pg = Self::start_inner(
            None,
            " -c shared_preload_libraries=pg_stat_statements \
             -c pg_stat_statements.track_planning=on",
        )?;
        pg.psql("CREATE EXTENSION pg_stat_statements");
        Some(pg)
    }

    /// [`Postgres::start_or_skip`] with TLS: `ssl=on`, the server's certificate `cert_pem` and
    /// its key `key_pem` (PEM) copied into the cluster's directory (`server.crt`,
    /// `server.key` mode 0600, owned by the server's user).
    pub(crate) fn start_ssl_or_skip(cert_pem: &[u8], key_pem: &[u8]) -> Option<Postgres> {
        Self::start_inner(Some((cert_pem, key_pem)), "")
    }

    fn start_inner(ssl: Option<(&[u8], &[u8])>, extra: &str) -> Option<Postgres> {
        let bin = bin_dir();
        if !bin.join("initdb").is_file() {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL is not installed ({} has no initdb): run scripts/setup.sh",
                bin.display()
            );
            eprintln!(
                "skipped: PostgreSQL is not installed ({} has no initdb)",
                bin.display()
            );
            return None;
        }
        let as_user = nix::unistd::geteuid().is_root().then_some(UNPRIVILEGED);
        let dir = tempfile::Builder::new()
            .prefix("mistry-pg")
            .tempdir()
            .unwrap();
        let owner = as_user.map(|user| {
            nix::unistd::User::from_name(user)
                .unwrap()
                .unwrap_or_else(|| panic!("no user {user}: run scripts/setup.sh"))
        });
        if let Some(u) = &owner {
            nix::unistd::chown(dir.path(), Some(u.uid), Some(u.gid)).unwrap();
        }
        let mut options = extra.to_string();
        if let Some((cert, key)) = ssl {
            use std::os::unix::fs::PermissionsExt;
            let (crt_path, key_path) =
                (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&crt_path, cert).unwrap();
            std::fs::write(&key_path, key).unwrap();
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
            if let Some(u) = &owner {
                for p in [&crt_path, &key_path] {
                    nix::unistd::chown(p, Some(u.uid), Some(u.gid)).unwrap();
                }
            }
            options += &format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                crt_path.display(),
                key_path.display()
            );
        }
        let mut pg = Postgres {
            dir,
            bin,
            port: 0,
            as_user,
            options,
        };
        let out = output(pg.tool("initdb").args([
            "-D",
            pg.data().to_str().unwrap(),
            "-U",
            "mistry",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "-N",
        ]));
        assert!(out.status.success(), "initdb failed: {out:?}");
        // Another process may take the free port between its choice and the start: try others.
        for attempt in 0.. {
            pg.port = free_port();
            if pg.try_start() {
                break;
            }
            assert!(attempt < 3, "PostgreSQL did not start:\n{}", pg.log());
        }
        let out = output(
            Command::new(pg.bin.join("createdb"))
                .args(["-h", "127.0.0.1", "-p", &pg.port.to_string()])
                .args(["-U", "mistry", "mistry"]),
        );
        assert!(out.status.success(), "createdb failed: {out:?}");
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server's log.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A tool of the server (initdb, pg_ctl), as the unprivileged user when we are root.
    fn tool(&self, name: &str) -> Command {
        let mut cmd = match self.as_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(self.bin.join(name));
                c
            }
            None => Command::new(self.bin.join(name)),
        };
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn try_start(&self) -> bool {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c full_page_writes=off{}",
            self.port,
            self.dir.path().display(),
            self.options
        );
        let out = output(
            self.tool("pg_ctl")
                .args(["-D", self.data().to_str().unwrap(), "-l"])
                .arg(self.log_path())
                .args(["-w", "-t", "30", "-o", &options, "start"]),
        );
        out.status.success()
    }

    /// Start the server again (after [`Postgres::stop`]), on the same port.
    pub(crate) fn start(&self) {
        assert!(
            self.try_start(),
            "PostgreSQL did not start:\n{}",
            self.log()
        );
    }

    /// Stop the server (`-m fast`: clients are disconnected).
    pub(crate) fn stop(&self) {
        self.stop_in("fast");
    }

    /// Crash the server (`pg_ctl stop -m immediate`: no shutdown checkpoint, every client cut;
    /// recovery at the next [`Postgres::start`]).
    pub(crate) fn stop_immediate(&self) {
        self.stop_in("immediate");
    }

    /// `pg_ctl stop -m <mode>`, waiting for the server to be down.
    fn stop_in(&self, mode: &str) {
        let out = output(self.tool("pg_ctl").args([
            "-D",
            self.data().to_str().unwrap(),
            "-m",
            mode,
            "-w",
            "stop",
        ]));
        assert!(
            out.status.success(),
            "pg_ctl stop -m {mode} failed: {out:?}"
        );
    }

    /// Put `rules` (pg_hba.conf lines) before the cluster's authentication rules and reload
    /// the server (e.g. password authentication for a role over TLS).
    pub(crate) fn hba_first(&self, rules: &str) {
        let path = self.data().join("pg_hba.conf");
        let current = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{rules}\n{current}")).unwrap();
        let out = output(
            self.tool("pg_ctl")
                .args(["-D", self.data().to_str().unwrap(), "reload"]),
        );
        assert!(out.status.success(), "pg_ctl reload failed: {out:?}");
    }

    /// The server's process (the postmaster; its backends are its children).
    pub(crate) fn pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap();
        text.lines().next().unwrap().trim().parse().unwrap()
    }

    /// `postgres://mistry@127.0.0.1:PORT/mistry`.
    pub(crate) fn url(&self) -> String {
        format!("postgres://mistry@127.0.0.1:{}/mistry", self.port)
    }

    /// The Unix socket's directory.
    pub(crate) fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Run SQL with psql; its unaligned output (`|` between columns), trimmed.
    pub(crate) fn psql(&self, sql: &str) -> String {
        let out = output(
            Command::new(self.bin.join("psql"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args([
                    "-U",
                    "mistry",
                    "-d",
                    "mistry",
                    "-AtX",
                    "-v",
                    "ON_ERROR_STOP=1",
                ])
                .args(["-c", sql]),
        );
        assert!(out.status.success(), "psql -c {sql:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl")
            .args(["-D", self.data().to_str().unwrap_or(""), "-m", "immediate"])
            .args(["-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
