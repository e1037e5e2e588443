//! The cluster in the API (issue 14, src/cluster/view.rs): `GET /artifacts` on an agent that
//! does not hold the build fetches it from the agent that does; `GET /api/agents/jobs` says which
//! agent ran each job; `/metrics` has the cluster gauges; mistry's `/index/` keeps its shape.
//!
//! Three mistryd agents on one throwaway PostgreSQL (tests/common/postgres.rs). Each test skips
//! when PostgreSQL is missing, failing under `CI`.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cluster::{agent, get_artifacts, untar};
use common::server::{job_id, Server};
use common::wait_for;
use postgres::Postgres;
use serde_json::{json, Value};

fn job_agents(s: &Server, query: &str) -> BTreeMap<String, String> {
    let (status, text) = s.get(&format!("/api/agents/jobs{query}"), false);
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// The values of `mistry_cluster_*` in `/metrics` of `s`.
fn cluster_gauges(s: &Server) -> BTreeMap<String, String> {
    let (status, text) = s.get("/metrics", false);
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| l.starts_with("mistry_cluster_"))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn gauges(queue: u32, alive: u32, running: u32) -> BTreeMap<String, String> {
    [
        ("mistry_cluster_queue_length", queue),
        ("mistry_cluster_agents_alive", alive),
        ("mistry_cluster_jobs_running", running),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[test]
fn artifacts_of_a_job_built_on_a_are_served_by_c_without_a_post_to_c() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let mut a = agent(&pg.url(), "a", 1);
    let built = a.job(json!({"project": "artifacts", "params": {"name": "from-a"}}));
    assert_eq!(built["ExitCode"], 0, "{built}");
    let id = job_id(&built);
    assert_eq!(
        pg.psql(&format!("SELECT agent, state FROM jobs WHERE id = '{id}'")),
        "a|ready"
    );
    let b = agent(&pg.url(), "b", 1);
    let c = agent(&pg.url(), "c", 1);
    let ready_on_c = c.builds().join("artifacts/ready").join(&id);
    assert!(!ready_on_c.exists());

    let (status, from_a) = get_artifacts(&a, "artifacts", &id);
    assert_eq!(status, 200);
    let (status, from_c) = get_artifacts(&c, "artifacts", &id);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&from_c));
    let (files_a, files_c) = (untar(&from_a), untar(&from_c));
    assert_eq!(files_a, files_c);
    assert_eq!(files_c["name.txt"], b"from-a");
    assert_eq!(files_c["large.bin"].len(), 20 * 1024 * 1024);
    assert_eq!(
        files_c["dir with spaces/ünïcødé/file (1).txt"],
        b"nested\n".to_vec()
    );
    // The build is C's own now (without A's cache), and nothing ran on C.
    assert_eq!(
        common::server::read(ready_on_c.join("data/artifacts/name.txt")),
        "from-a"
    );
    assert!(ready_on_c.join("build_info.json").is_file());
    assert!(!ready_on_c.join("data/cache").join("count").exists());
    assert!(cluster::log_of(&c).contains("build replicated from another agent for its artifacts"));
    assert_eq!(cluster::log_of(&c).matches("job started").count(), 0);
    // A second request is served from C's copy: no second fetch.
    let (status, again) = get_artifacts(&c, "artifacts", &id);
    assert_eq!((status, untar(&again)), (200, files_a.clone()));
    assert_eq!(
        cluster::log_of(&c)
            .matches("build replicated from another agent")
            .count(),
        1
    );

    // Unknown jobs: the 404 of a single node.
    let (status, body) = get_artifacts(&c, "artifacts", "nosuchjob");
    assert_eq!(
        (status, String::from_utf8_lossy(&body).into_owned()),
        (404, "Unknown job artifacts/nosuchjob".to_string())
    );
    let (status, body) = get_artifacts(&c, "nosuchproject", &id);
    assert_eq!(
        (status, String::from_utf8_lossy(&body).into_owned()),
        (404, format!("Unknown job nosuchproject/{id}"))
    );
    // A's build while A is dead: unavailable, the same 404 on B (which never fetched it).
    a.kill9();
    wait_for("a not alive", Duration::from_secs(20), || {
        pg.psql(
            "SELECT count(*) FROM agents WHERE name = 'a' AND last_heartbeat > now() - interval '2 s'",
        ) == "0"
    });
    let (status, body) = get_artifacts(&b, "artifacts", &id);
    assert_eq!(
        (status, String::from_utf8_lossy(&body).into_owned()),
        (404, format!("Unknown job artifacts/{id}"))
    );
    assert!(!b.builds().join("artifacts/ready").join(&id).exists());
    // C still serves its copy.
    let (status, still) = get_artifacts(&c, "artifacts", &id);
    assert_eq!((status, untar(&still)), (200, files_a));
}

#[test]
fn every_agent_says_which_agent_ran_each_job() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let names = ["a1", "a2", "a3"];
    let servers: Vec<Server> = names.iter().map(|n| agent(&pg.url(), n, 1)).collect();
    // One job posted to each agent; the record names the agent that ran it.
    let mut expected = BTreeMap::new();
    for (s, name) in servers.iter().zip(names) {
        let info = s.job(json!({"project": "simple", "params": {"name": name}}));
        assert_eq!(info["ExitCode"], 0, "{info}");
        let id = job_id(&info);
        let runner = pg.psql(&format!("SELECT agent FROM jobs WHERE id = '{id}'"));
        assert!(names.contains(&runner.as_str()), "{runner}");
        expected.insert(format!("simple/{id}"), runner);
    }
    assert_eq!(expected.len(), 3);
    for s in &servers {
        assert_eq!(job_agents(s, ""), expected);
    }
    // Each build asked on every agent (a cache hit, replicated where it was not): every
    // agent still names the agent that ran it.
    for s in &servers {
        for name in names {
            let hit = s.job(json!({"project": "simple", "params": {"name": name}}));
            assert_eq!(hit["Cached"], true, "{hit}");
            assert!(s.builds().join("simple/ready").join(job_id(&hit)).is_dir());
        }
    }
    for s in &servers {
        assert_eq!(job_agents(s, ""), expected);
    }
    // One job.
    let (key1, runner1) = expected.iter().next().unwrap();
    let id1 = key1.strip_prefix("simple/").unwrap();
    assert_eq!(
        job_agents(&servers[1], &format!("?project=simple&id={id1}")),
        BTreeMap::from([(key1.clone(), runner1.clone())])
    );
    assert_eq!(
        job_agents(&servers[1], "?project=simple&id=nosuchjob"),
        BTreeMap::new()
    );
    let (status, text) = servers[1].get("/api/agents/jobs?project=simple", false);
    assert_eq!(
        (status, text.as_str()),
        (400, "Give both project and id, or neither")
    );
    // A queued job has no agent yet: it is not in the map; once it runs, it is.
    let (status, text) = servers[0].post(
        "/jobs?async",
        &json!({"project": "simple", "params": {"name": "slow", "sleep": "3"}}).to_string(),
    );
    assert_eq!(status, 201, "{text}");
    wait_for("the slow job running", Duration::from_secs(20), || {
        pg.psql("SELECT count(*) FROM jobs WHERE state = 'running'") == "1"
    });
    let runner = pg.psql("SELECT agent FROM jobs WHERE state = 'running'");
    let slow_id = pg.psql("SELECT id FROM jobs WHERE state = 'running'");
    assert_eq!(
        job_agents(&servers[1], "")[&format!("simple/{slow_id}")],
        runner
    );

    // A single node: its jobs are its own.
    let solo = Server::start(json!({"agent_name": "solo"}));
    let info = solo.job(json!({"project": "simple", "params": {"name": "solo"}}));
    assert_eq!(
        job_agents(&solo, ""),
        BTreeMap::from([(format!("simple/{}", job_id(&info)), "solo".to_string())])
    );
}

#[test]
fn metrics_have_the_cluster_gauges() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let mut servers: Vec<Server> = ["a1", "a2", "a3"]
        .iter()
        .map(|n| agent(&pg.url(), n, 1))
        .collect();
    for s in &servers {
        assert_eq!(cluster_gauges(s), gauges(0, 3, 0));
    }
    // The per-agent metrics stay.
    let (_, text) = servers[0].get("/metrics", false);
    assert!(
        text.contains("# TYPE mistry_builds_started counter"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE mistry_cluster_queue_length gauge"),
        "{text}"
    );
    // Four slow jobs on three slots: three run, one waits.
    for i in 0..4 {
        let body = json!({"project": "simple", "params": {"name": format!("g{i}"), "sleep": "6"}});
        let (status, text) = servers[0].post("/jobs?async", &body.to_string());
        assert_eq!(status, 201, "{text}");
    }
    wait_for("three running, one queued", Duration::from_secs(20), || {
        pg.psql("SELECT string_agg(state || ':' || n, ',' ORDER BY state) FROM (SELECT state, count(*) n FROM jobs GROUP BY state) s")
            == "queued:1,running:3"
    });
    assert_eq!(cluster_gauges(&servers[1]), gauges(1, 3, 3));
    // An agent killed: two alive once its heartbeat is older than agent_timeout.
    servers[2].kill9();
    wait_for("two agents alive", Duration::from_secs(20), || {
        cluster_gauges(&servers[0])["mistry_cluster_agents_alive"] == "2"
    });
    // Every job ends; the killed agent's job is re-run elsewhere.
    wait_for("every job ended", Duration::from_secs(60), || {
        cluster_gauges(&servers[0]) == gauges(0, 2, 0)
    });
    assert_eq!(
        pg.psql("SELECT count(*) FROM jobs WHERE state = 'ready'"),
        "4"
    );

    // A single node has none of them.
    let solo = Server::start(json!({}));
    assert_eq!(cluster_gauges(&solo), BTreeMap::new());
    let (_, text) = solo.get("/metrics", false);
    assert!(!text.contains("mistry_cluster_"), "{text}");
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn the_index_keeps_mistrys_shape_with_a_database() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let solo = Server::start(json!({}));
    let a = agent(&pg.url(), "a", 1);
    let b = agent(&pg.url(), "b", 1);
    let body = json!({"project": "simple", "params": {"name": "shape"}});
    solo.job(body.clone());
    let on_a = a.job(body.clone());
    // On b, a cache hit fetched from a.
    let on_b = b.job(body);
    assert_eq!(on_b["Cached"], true, "{on_b}");
    let index = |s: &Server| -> Vec<Value> {
        let (status, text) = s.get("/index/", false);
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    };
    let single = index(&solo);
    assert_eq!(single.len(), 1);
    let job_keys = keys(&single[0]);
    assert_eq!(
        job_keys,
        ["buildInfo", "id", "project", "startedAt", "state"]
            .iter()
            .map(std::string::ToString::to_string)
            .collect()
    );
    let info_keys = keys(&single[0]["buildInfo"]);
    for s in [&a, &b] {
        let list = index(s);
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(keys(&list[0]), job_keys);
        assert_eq!(keys(&list[0]["buildInfo"]), info_keys);
        assert_eq!(list[0]["id"], job_id(&on_a));
        assert_eq!(list[0]["state"], "ready");
    }
}
