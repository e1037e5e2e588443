//! A project's page with several agents (src/server/projects.rs): its last builds and its
//! trends on any agent are the cluster's records of the project, jobs that ran on other agents
//! included (each agent's own disk holds only its builds).
//!
//! Agents on one throwaway PostgreSQL (tests/common/postgres.rs); skips when PostgreSQL is
//! missing, failing under `CI`.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/postgres.rs"]
mod postgres;

use common::server::{job_id, Server};
use postgres::Postgres;
use serde_json::{json, Value};

fn agent(pg: &Postgres, name: &str) -> Server {
    cluster::agent_with(&pg.url(), name, 2, json!({"agent_timeout": "15s"}))
}

#[test]
fn any_agent_shows_a_projects_builds_and_trends_from_the_records() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg, "a");
    let b = agent(&pg, "b");
    // Two builds of simple on a, the second failing (exit 3).
    let mut ids = Vec::new();
    for params in [json!({"name": "one"}), json!({"name": "two", "code": "3"})] {
        let info = a.job(json!({"project": "simple", "params": params}));
        let id = job_id(&info);
        assert_eq!(
            pg.psql(&format!("SELECT agent FROM jobs WHERE id = '{id}'")),
            "a",
            "{info}"
        );
        ids.push(id);
    }
    // b ran nothing: what it shows comes from the records.
    let (status, text) = b.get("/api/project/simple/builds", false);
    assert_eq!(status, 200, "{text}");
    let builds: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(
        builds
            .iter()
            .map(|j| (
                j["id"].as_str().unwrap().to_string(),
                j["agent"].clone(),
                j["clusterState"].clone()
            ))
            .collect::<Vec<_>>(),
        vec![
            (ids[1].clone(), json!("a"), json!("failed")),
            (ids[0].clone(), json!("a"), json!("ready")),
        ]
    );
    let (status, svg) = b.get("/trends/simple/duration.svg", false);
    assert_eq!(status, 200, "{svg}");
    // Oldest first: the success, then the failure.
    let bars: Vec<&str> = svg
        .match_indices("<rect class=\"bar ")
        .map(|(i, _)| &svg[i + 17..i + 23])
        .collect();
    assert_eq!(bars, ["tr-ok\"", "tr-bad"], "{svg}");
    let (status, svg) = b.get("/trends/simple/success.svg", false);
    assert_eq!(status, 200, "{svg}");
    assert!(
        svg.contains("<title>builds 1–2: 1 of 2 succeeded</title>"),
        "{svg}"
    );
}
