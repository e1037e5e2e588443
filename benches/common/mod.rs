//! Helpers the benchmarks share (each bench has `mod common;`): medians, the images directory,
//! the mistryd binary, running commands, and a mistryd serving on loopback.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The median of `v` (the upper one of an even count); sorts `v`.
pub(crate) fn median<T: Ord + Copy>(v: &mut [T]) -> T {
    v.sort();
    v[v.len() / 2]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The number in the environment variable `key` (e.g. `BENCH_RUNS`), else `default`.
pub(crate) fn env_num<T: FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The CPU time (user and system) that process `root` and its descendants used so far: each
/// live process's own and that of its children it waited for (`/proc/<pid>/stat`; the ended
/// children of a process count in it). Clock ticks (1/100 s), so a measure of seconds.
pub(crate) fn tree_cpu(root: u32) -> Duration {
    // (pid, parent, ticks) of every process.
    let procs: Vec<(u32, u32, u64)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // The fields after the command, which may hold spaces and parentheses.
            let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let ppid = rest.get(1)?.parse().ok()?;
            // utime, stime, cutime, cstime: fields 14-17, rest[11..15].
            let ticks = rest
                .get(11..15)?
                .iter()
                .filter_map(|f| f.parse::<u64>().ok())
                .sum();
            Some((pid, ppid, ticks))
        })
        .collect();
    let mut tree = vec![root];
    let mut ticks = 0;
    while let Some(p) = tree.pop() {
        for &(pid, ppid, t) in &procs {
            if pid == p {
                ticks += t;
            }
            if ppid == p {
                tree.push(pid);
            }
        }
    }
    Duration::from_millis(ticks * 10)
}

/// `$MISTRY_TEST_IMAGES`, else `target/images`.
pub(crate) fn images_dir() -> PathBuf {
    std::env::var_os("MISTRY_TEST_IMAGES").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/images"),
        PathBuf::from,
    )
}

/// [`images_dir`], which must hold the busybox image.
pub(crate) fn busybox_images() -> PathBuf {
    let images = images_dir();
    assert!(
        images.join("busybox/index.json").is_file(),
        "run scripts/setup.sh first"
    );
    images
}

/// The mistryd to run: `$MISTRY_BIN` (scripts/bench.sh points it at a copy the unprivileged
/// user can read), else the one cargo built.
pub(crate) fn mistryd_bin() -> String {
    std::env::var("MISTRY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mistryd").into())
}

/// `tool` (buildah, skopeo) with auth and runtime paths of its own under `dir`, never the
/// machine's: without them it uses `/run/containers/<uid>`, which a buildah run as root leaves
/// mode 0700, unreadable by every other user. `dir` must outlive the command.
pub(crate) fn containers_tool(tool: &str, dir: &Path) -> Command {
    use std::os::unix::fs::PermissionsExt;
    let run = dir.join("containers-run");
    std::fs::create_dir_all(&run).expect("creating the tool's runtime directory");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))
        .expect("the tool's runtime directory");
    let mut cmd = Command::new(tool);
    cmd.env("REGISTRY_AUTH_FILE", dir.join("containers-auth.json"))
        .env("XDG_RUNTIME_DIR", &run);
    cmd
}

/// Whether `tool --version` runs and succeeds.
pub(crate) fn installed(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `cmd` (stdout discarded) and panics unless it succeeds; its stderr.
pub(crate) fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{cmd:?}: {stderr}");
    stderr
}

/// [`run`], timed.
pub(crate) fn timed(cmd: &mut Command) -> (Duration, String) {
    let t = Instant::now();
    let stderr = run(cmd);
    (t.elapsed(), stderr)
}

/// An HTTP agent that returns error statuses as responses; `timeout`: for the whole request.
pub(crate) fn agent(timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .timeout_global(timeout)
            .build(),
    )
}

/// A project `touch` in `projects`: it writes its param `n` to an artifact.
pub(crate) fn touch_project(projects: &Path) {
    std::fs::create_dir_all(projects.join("touch")).unwrap();
    std::fs::write(
        projects.join("touch/Dockerfile"),
        "FROM busybox\nCMD [\"/bin/sh\", \"-c\", \"cat /data/params/n > /data/artifacts/touched\"]\n",
    )
    .unwrap();
}

/// `dir/config.json` for projects in `dir/projects`, builds in `dir/builds` (created), the
/// images in `images`, no network, and the fields of `extra` (an object); its path.
pub(crate) fn write_config(dir: &Path, images: &Path, extra: Value) -> PathBuf {
    std::fs::create_dir_all(dir.join("builds")).unwrap();
    let mut cfg = json!({
        "projects_path": dir.join("projects"),
        "build_path": dir.join("builds"),
        "images_path": images,
        "network": "none",
    });
    if let Value::Object(extra) = extra {
        cfg.as_object_mut().unwrap().extend(extra);
    }
    let config = dir.join("config.json");
    std::fs::write(&config, cfg.to_string()).unwrap();
    config
}

/// A mistryd serving on loopback; killed when dropped.
pub(crate) struct Daemon {
    child: Child,
    /// `127.0.0.1:PORT`
    pub addr: String,
}

impl Daemon {
    /// [`mistryd_bin`] with `config`, on a port the kernel chooses (mistryd says which on
    /// stdout).
    pub(crate) fn start(config: &Path) -> Daemon {
        Self::start_on(config, None)
    }

    /// [`Daemon::start`] on the CPUs `cpus` alone (`taskset -c`, e.g. `"0"`) when given.
    pub(crate) fn start_on(config: &Path, cpus: Option<&str>) -> Daemon {
        let mut command = match cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(mistryd_bin());
                c
            }
            None => Command::new(mistryd_bin()),
        };
        let mut child = command
            .arg("--config")
            .arg(config)
            .args(["--addr", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let addr = line
            .trim()
            .strip_prefix("mistryd: listening on ")
            .unwrap_or_else(|| panic!("mistryd said {line:?}"))
            .to_string();
        Daemon { child, addr }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
