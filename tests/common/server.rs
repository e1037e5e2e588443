//! A real mistryd process with busybox-based test projects, for the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{images_dir, lines_of, mistryd_bin, wait_for_line};

pub(crate) const RUN_SH: &str = r#"#!/bin/sh
p() { cat "/data/params/$1" 2>/dev/null; }
echo "out: $(p name)"
echo "err: $(p name)" >&2
if [ -n "$(p sleep)" ]; then sleep "$(p sleep)"; fi
mkdir -p /data/artifacts /data/cache
p name > /data/artifacts/name.txt
count=$(( $(cat /data/cache/count 2>/dev/null || echo 0) + 1 ))
echo "$count" > /data/cache/count
echo "$count" > /data/artifacts/count.txt
ls /data/params > /data/artifacts/params.txt
if [ -f /shared/file ]; then cp /shared/file /data/artifacts/shared.txt; fi
code=$(p code)
exit "${code:-0}"
"#;

/// A group's chain of builds, each naming the one it follows: `prev.txt` is the previous
/// build's token (from the cache; empty for a clean start), `me.txt` this build's (random).
pub(crate) const CHAIN_SH: &str = r#"#!/bin/sh
mkdir -p /data/artifacts /data/cache
cat /data/cache/me > /data/artifacts/prev.txt 2>/dev/null || : > /data/artifacts/prev.txt
head -c 16 /dev/urandom | md5sum | cut -d' ' -f1 > /data/cache/me
cp /data/cache/me /data/artifacts/me.txt
"#;

pub(crate) const ARTIFACTS_SH: &str = r#"#!/bin/sh
set -e
cd /data/artifacts
mkdir -p "dir with spaces/ünïcødé" deep/a/b/c
echo nested > "dir with spaces/ünïcødé/file (1).txt"
echo deep > deep/a/b/c/leaf
ln -s "dir with spaces" link-to-dir
ln -s deep/a/b/c/leaf link-to-file
head -c 20971520 /dev/urandom > large.bin
md5sum large.bin | cut -d' ' -f1 > large.md5
printf '%s' "$(cat /data/params/name 2>/dev/null)" > name.txt
"#;

/// A job that tries to make the daemon serve host files through symlinks in `/data`
/// (`mode`: `abs`, `rel`, `file`, `sub`, `cache`).
pub(crate) const HOSTILE_SH: &str = r#"#!/bin/sh
case "$(cat /data/params/mode)" in
abs) rm -rf /data/artifacts; ln -s /etc /data/artifacts ;;
rel) rm -rf /data/artifacts; ln -s ../../../../../../../../../.. /data/artifacts ;;
file) rm -rf /data/artifacts; echo not a dir > /data/artifacts ;;
sub)
    mkdir -p /data/artifacts/sub
    echo ok > /data/artifacts/ok.txt
    rm -rf /data/artifacts/sub
    ln -s /etc /data/artifacts/sub
    ln -s ../../../../../../../../../.. /data/artifacts/up
    ;;
cache) echo ok > /data/artifacts/ok.txt; rm -rf /data/cache; ln -s /etc /data/cache ;;
esac
"#;

/// A job that makes set-uid and set-gid files and directories in its artifacts and its cache;
/// with param `locked`, also one in a directory only its owner may list (`locked/inner`); with
/// param `wait`, it then waits (at most 30 s) for a file `go` in its artifacts.
pub(crate) const SETID_SH: &str = r#"#!/bin/sh
set -e
cd /data/artifacts
cp /bin/busybox suid && chmod 4755 suid
echo x > sgid && chmod 2755 sgid
mkdir -p sgid-dir && chmod 2775 sgid-dir
echo y > sgid-dir/both && chmod 6711 sgid-dir/both
echo plain > plain && chmod 640 plain
echo z > /data/cache/tool && chmod 4755 /data/cache/tool
if [ -e /data/params/locked ]; then
    mkdir locked && echo q > locked/inner && chmod 4755 locked/inner && chmod 0311 locked
fi
if [ -e /data/params/wait ]; then
    touch started
    i=0
    while [ ! -e go ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i + 1)); done
    rm -f go started
fi
"#;

pub(crate) struct Server {
    pub child: Option<Child>,
    pub addr: String,
    pub grace: String,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// More arguments of mistryd.
    pub args: Vec<String>,
    /// `--addr` (default `127.0.0.1:0`).
    pub listen: String,
    /// More environment variables of mistryd.
    pub env: Vec<(String, String)>,
    /// How many times mistryd was started (names its log).
    spawns: usize,
    /// How long [`Server::spawn`] waits for mistryd to listen (20 s).
    pub start_timeout: Duration,
}

impl Server {
    pub(crate) fn start(extra: Value) -> Server {
        Self::start_in(None, extra)
    }

    pub(crate) fn start_in(parent: Option<&Path>, extra: Value) -> Server {
        Self::start_with(parent, extra, &[])
    }

    /// With more mistryd arguments (e.g. `--header-timeout 2s`).
    pub(crate) fn start_with(parent: Option<&Path>, extra: Value, args: &[&str]) -> Server {
        let mut s = Self::prepare(parent, extra, args);
        s.spawn();
        s
    }

    /// Listening on `listen` (e.g. `0.0.0.0:0`: every address of the host), with more
    /// environment variables.
    pub(crate) fn start_on(listen: &str, extra: Value, env: &[(&str, &str)]) -> Server {
        let mut s = Self::prepare(None, extra, &[]);
        s.listen = listen.to_string();
        s.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s.spawn();
        s
    }

    /// The server's directory, projects and configuration, not started yet.
    fn prepare(parent: Option<&Path>, extra: Value, args: &[&str]) -> Server {
        let dir = match parent {
            Some(p) => tempfile::Builder::new().prefix("mistryd").tempdir_in(p),
            None => tempfile::Builder::new().prefix("mistryd").tempdir(),
        }
        .unwrap();
        let projects = dir.path().join("projects");
        let builds = dir.path().join("builds");
        std::fs::create_dir_all(&builds).unwrap();
        let project = |name: &str, files: &[(&str, &str)]| {
            let d = projects.join(name);
            for (path, content) in files {
                let p = d.join(path);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, content).unwrap();
            }
        };
        project(
            "simple",
            &[
                (
                    "Dockerfile",
                    "FROM busybox\nCOPY run.sh /run.sh\nENTRYPOINT [\"/bin/sh\", \"/run.sh\"]\n",
                ),
                ("run.sh", RUN_SH),
            ],
        );
        project(
            "chain",
            &[(
                "Dockerfile",
                "FROM busybox\nCOPY chain.sh /chain.sh\nENTRYPOINT [\"/bin/sh\", \"/chain.sh\"]\n",
            ),
            ("chain.sh", CHAIN_SH)],
        );
        project(
            "copyfolder",
            &[
                ("Dockerfile", "FROM busybox\nCOPY folder/ /folder/\nCMD [\"cp\", \"-r\", \"/folder\", \"/data/artifacts/\"]\n"),
                ("folder/a.txt", "a\n"),
                ("folder/sub/b.txt", "b\n"),
            ],
        );
        project(
            "failing",
            &[("Dockerfile", "FROM busybox\nENTRYPOINT [\"/bin/sh\", \"-c\", \"echo oops >&2; nosuchcommand\"]\n")],
        );
        project(
            "badimage",
            &[(
                "Dockerfile",
                "FROM busybox\nRUN echo building; exit 3\nCMD true\n",
            )],
        );
        project(
            "invalid",
            &[("Dockerfile", "FROM busybox\nINVALIDCOMMAND foo\n")],
        );
        project(
            "loud",
            &[(
                "Dockerfile",
                "FROM busybox\nCMD [\"/bin/sh\", \"-c\", \"yes 0123456789abcdef | head -c $(cat /data/params/bytes)\"]\n",
            )],
        );
        project(
            "asuser",
            &[(
                "Dockerfile",
                "FROM busybox\nARG uid\nRUN echo app:x:4321:4321::/home/app:/bin/sh >> /etc/passwd && echo app:x:4321: >> /etc/group && echo \"server uid $uid\"\nUSER app\nCMD [\"/bin/sh\", \"-c\", \"id -u > /data/artifacts/uid && echo cached > /data/cache/c\"]\n",
            )],
        );
        project(
            "ticker",
            &[(
                "Dockerfile",
                "FROM busybox\nCMD [\"/bin/sh\", \"-c\", \"for i in 1 2 3 4 5 6 7 8; do printf '\\\\033[32mline %s\\\\033[0m\\\\n' $i; sleep 0.4; done\"]\n",
            )],
        );
        project(
            "artifacts",
            &[
                (
                    "Dockerfile",
                    "FROM busybox\nCOPY make.sh /make.sh\nENTRYPOINT [\"/bin/sh\", \"/make.sh\"]\n",
                ),
                ("make.sh", ARTIFACTS_SH),
            ],
        );
        project(
            "hostile",
            &[
                (
                    "Dockerfile",
                    "FROM busybox\nCOPY hostile.sh /hostile.sh\nENTRYPOINT [\"/bin/sh\", \"/hostile.sh\"]\n",
                ),
                ("hostile.sh", HOSTILE_SH),
            ],
        );
        project(
            "hostileuser",
            &[
                (
                    "Dockerfile",
                    "FROM busybox\nRUN echo app:x:4321:4321::/home/app:/bin/sh >> /etc/passwd && echo app:x:4321: >> /etc/group\nCOPY hostile.sh /hostile.sh\nUSER app\nENTRYPOINT [\"/bin/sh\", \"/hostile.sh\"]\n",
                ),
                ("hostile.sh", HOSTILE_SH),
            ],
        );
        project(
            "setid",
            &[
                (
                    "Dockerfile",
                    "FROM busybox\nCOPY setid.sh /setid.sh\nENTRYPOINT [\"/bin/sh\", \"/setid.sh\"]\n",
                ),
                ("setid.sh", SETID_SH),
            ],
        );
        project(
            "setiduser",
            &[
                (
                    "Dockerfile",
                    "FROM busybox\nRUN echo app:x:4321:4321::/home/app:/bin/sh >> /etc/passwd && echo app:x:4321: >> /etc/group\nCOPY setid.sh /setid.sh\nUSER app\nENTRYPOINT [\"/bin/sh\", \"/setid.sh\"]\n",
                ),
                ("setid.sh", SETID_SH),
            ],
        );
        let mut config = serde_json::json!({
            "projects_path": projects,
            "build_path": builds,
            "images_path": images_dir(),
            "job_concurrency": 4,
        });
        if let (Some(obj), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                obj.insert(k.clone(), v.clone());
            }
        }
        let config_path = dir.path().join("config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        Server {
            child: None,
            addr: String::new(),
            grace: "10s".into(),
            dir,
            config: config_path,
            args: args.iter().map(std::string::ToString::to_string).collect(),
            listen: "127.0.0.1:0".into(),
            env: Vec::new(),
            spawns: 0,
            start_timeout: Duration::from_secs(20),
        }
    }

    /// Start mistryd on `listen` (`127.0.0.1:0`) and take the port it reports on stdout
    /// (`mistryd: listening on ADDR`); its log goes to `mistryd-N.log` in the server's directory.
    pub(crate) fn spawn(&mut self) {
        self.spawns += 1;
        let log_path = self.dir.path().join(format!("mistryd-{}.log", self.spawns));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(mistryd_bin())
            .arg("--config")
            .arg(&self.config)
            .args(["--addr", &self.listen, "--shutdown-grace", &self.grace])
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = lines_of(child.stdout.take().unwrap());
        self.child = Some(child);
        let addr = wait_for_line(&stdout, self.start_timeout, |l| {
            l.strip_prefix("mistryd: listening on ").map(str::to_string)
        });
        self.addr = addr.unwrap_or_else(|out| {
            panic!(
                "mistryd did not start: stdout:\n{out}log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        });
    }

    pub(crate) fn builds(&self) -> PathBuf {
        self.dir.path().join("builds")
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) fn agent() -> ureq::Agent {
        ureq::Agent::new_with_config(
            ureq::config::Config::builder()
                .http_status_as_error(false)
                .build(),
        )
    }

    /// [`Server::agent`], giving up on a request after `timeout` (a hung server fails the
    /// test instead of hanging it).
    pub(crate) fn agent_within(timeout: std::time::Duration) -> ureq::Agent {
        ureq::Agent::new_with_config(
            ureq::config::Config::builder()
                .http_status_as_error(false)
                .timeout_global(Some(timeout))
                .build(),
        )
    }

    pub(crate) fn post(&self, path: &str, body: &str) -> (u16, String) {
        let mut r = Self::agent().post(&self.url(path)).send(body).unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    }

    pub(crate) fn job(&self, body: Value) -> Value {
        let (status, text) = self.post("/jobs", &body.to_string());
        assert_eq!(status, 201, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    pub(crate) fn get(&self, path: &str, json: bool) -> (u16, String) {
        let mut req = Self::agent().get(&self.url(path));
        if json {
            req = req.header("Content-Type", "application/json");
        }
        let mut r = req.call().unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    }

    /// Schedule project `simple` with `name` sleeping `sleep` seconds, and wait until it runs.
    pub(crate) fn start_slow_job(&self, name: &str, sleep: &str) {
        let body =
            serde_json::json!({"project": "simple", "params": {"name": name, "sleep": sleep}});
        let (status, text) = self.post("/jobs?async", &body.to_string());
        assert_eq!(status, 201, "{text}");
        super::wait_until("a pending build", || self.pending_dirs("simple") > 0);
    }

    pub(crate) fn pending_dirs(&self, project: &str) -> usize {
        std::fs::read_dir(self.builds().join(project).join("pending"))
            .map_or(0, std::iter::Iterator::count)
    }

    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn term(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        c.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub(crate) fn read(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

pub(crate) fn artifacts(info: &Value) -> PathBuf {
    PathBuf::from(info["Path"].as_str().unwrap())
}

/// The job ID of a BuildInfo (its `URL` is `job/<project>/<id>`).
pub(crate) fn job_id(info: &Value) -> String {
    let url = info["URL"].as_str().unwrap();
    url.rsplit('/').next().unwrap().to_string()
}

/// An rsync daemon serving `s`'s build_path as the module `mistry` (read only), its config and
/// pid file in `s`'s directory. rsync's daemon cannot bind port 0 and report: it serves each
/// connection inetd style (on its stdin) from a listener of ours (`port`).
pub(crate) fn rsync_daemon(s: &Server) -> super::Inetd {
    let conf = s.dir.path().join("rsyncd.conf");
    // As root, rsyncd would switch to nobody: keep our ids. Unprivileged, it cannot switch.
    let ids = if nix::unistd::geteuid().is_root() {
        "uid = 0\ngid = 0\n"
    } else {
        ""
    };
    std::fs::write(
        &conf,
        format!(
            "pid file = {d}/rsyncd.pid\nuse chroot = false\n{ids}[mistry]\npath = {b}\nread only = true\n",
            d = s.dir.path().display(),
            b = s.builds().display()
        ),
    )
    .unwrap();
    super::Inetd::start("the rsync daemon", move || {
        let mut cmd = Command::new("rsync");
        cmd.arg("--daemon")
            .arg(format!("--config={}", conf.display()));
        cmd
    })
}

/// The MD5 of the file at `path` (`md5sum`), in hex.
pub(crate) fn md5(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

/// What every transport delivers: names, nesting, a large file intact.
pub(crate) fn check_artifact_contents(target: &Path) {
    assert_eq!(
        read(target.join("dir with spaces/ünïcødé/file (1).txt")),
        "nested\n"
    );
    assert_eq!(read(target.join("deep/a/b/c/leaf")), "deep\n");
    assert_eq!(
        std::fs::metadata(target.join("large.bin")).unwrap().len(),
        20 << 20
    );
    assert_eq!(
        md5(&target.join("large.bin")),
        read(target.join("large.md5")).trim()
    );
}

/// `GET path` of `s`: its status and body, whatever its size.
pub(crate) fn get_bytes(s: &Server, path: &str) -> (u16, Vec<u8>) {
    let mut r = Server::agent().get(&s.url(path)).call().unwrap();
    let status = r.status().as_u16();
    let body = r
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_vec()
        .unwrap();
    (status, body)
}
