//! Helpers of the multi-agent tests (a mistryd agent on a shared database, its log, jobs,
//! artifacts over http; job IDs are `common::server::job_id`). Included with
//! `#[path = "common/cluster.rs"] mod cluster;` beside `mod common;`.
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::common::server::Server;

/// An agent named `name` with `capacity` slots on the database `url`: heartbeat 500ms,
/// agent_timeout 2s.
pub(crate) fn agent(url: &str, name: &str, capacity: usize) -> Server {
    agent_with(url, name, capacity, json!({}))
}

/// [`agent`] with the settings of `extra` (a JSON object) added or replaced.
pub(crate) fn agent_with(url: &str, name: &str, capacity: usize, extra: Value) -> Server {
    let mut config = json!({
        "database_url": url,
        "agent_name": name,
        "job_concurrency": capacity,
        "agent_timeout": "2s",
        "heartbeat": "500ms",
    });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    Server::start(config)
}

/// One [`agent`] per name, each with `capacity` slots, on the database `url`.
pub(crate) fn agents_named<const N: usize>(
    url: &str,
    names: [&str; N],
    capacity: usize,
) -> [Server; N] {
    names.map(|n| agent(url, n, capacity))
}

/// `POST /jobs` of `body` to `s` (waiting for the answer): its status and text.
pub(crate) fn post_job(s: &Server, body: &Value) -> (u16, String) {
    s.post("/jobs", &body.to_string())
}

/// The log of the agent's first start.
pub(crate) fn log_of(s: &Server) -> String {
    std::fs::read_to_string(s.dir.path().join("mistryd-1.log")).unwrap_or_default()
}

/// `GET /artifacts/<project>/<id>` of `s`: its status and body.
pub(crate) fn get_artifacts(s: &Server, project: &str, id: &str) -> (u16, Vec<u8>) {
    crate::common::server::get_bytes(s, &format!("/artifacts/{project}/{id}"))
}

/// A tar stream unpacked in memory: path → content of every regular file.
pub(crate) fn untar(body: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut archive = tar::Archive::new(body);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type().is_file() {
            let path = entry.path().unwrap().display().to_string();
            let mut content = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
            files.insert(path, content);
        }
    }
    files
}

/// Run mistryd (no test projects needed) with `database_url` = `url` in its configuration
/// and `env` as MISTRY_DATABASE_URL; its exit code and stderr (it must stop within 20s).
pub(crate) fn run_mistryd(url: &str, env: Option<&str>) -> (Option<i32>, String) {
    run_mistryd_named(url, env, "lonely")
}

/// [`run_mistryd`] with `agent_name` = `name`.
pub(crate) fn run_mistryd_named(url: &str, env: Option<&str>, name: &str) -> (Option<i32>, String) {
    let dir = tempfile::Builder::new()
        .prefix("mistryd")
        .tempdir()
        .unwrap();
    for d in ["projects", "builds"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        json!({
            "projects_path": dir.path().join("projects"),
            "build_path": dir.path().join("builds"),
            "database_url": url,
            "agent_name": name,
        })
        .to_string(),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(crate::common::mistryd_bin());
    cmd.arg("--config")
        .arg(&config)
        .args(["--addr", "127.0.0.1:0"])
        .env_remove("MISTRY_DATABASE_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(env) = env {
        cmd.env("MISTRY_DATABASE_URL", env);
    }
    let mut child = cmd.spawn().unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(20) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "mistryd did not stop: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert!(
        out.stdout.is_empty(),
        "mistryd said it listens: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    (
        status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
