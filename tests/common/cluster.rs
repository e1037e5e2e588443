//! Helpers of the multi-agent tests (a mistryd agent on a shared database, its log, job IDs,
//! artifacts over http). Included with `#[path = "common/cluster.rs"] mod cluster;` beside
//! `mod common;`.
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::common::server::Server;

/// An agent named `name` with `capacity` slots on the database `url`: heartbeat 500ms,
/// agent_timeout 2s.
pub fn agent(url: &str, name: &str, capacity: usize) -> Server {
    Server::start(json!({
        "database_url": url,
        "agent_name": name,
        "job_concurrency": capacity,
        "agent_timeout": "2s",
        "heartbeat": "500ms",
    }))
}

/// The log of the agent's first start.
pub fn log_of(s: &Server) -> String {
    std::fs::read_to_string(s.dir.path().join("mistryd-1.log")).unwrap_or_default()
}

/// The job ID of an answer (its `URL` is `job/<project>/<id>`).
pub fn id_of(info: &Value) -> String {
    let url = info["URL"].as_str().unwrap();
    url.rsplit('/').next().unwrap().to_string()
}

/// `GET /artifacts/<project>/<id>` of `s`: its status and body.
pub fn get_artifacts(s: &Server, project: &str, id: &str) -> (u16, Vec<u8>) {
    let mut r = Server::agent()
        .get(&s.url(&format!("/artifacts/{project}/{id}")))
        .call()
        .unwrap();
    let body = r
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap();
    (r.status().as_u16(), body)
}

/// A tar stream unpacked in memory: path → content of every regular file.
pub fn untar(body: &[u8]) -> BTreeMap<String, Vec<u8>> {
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
