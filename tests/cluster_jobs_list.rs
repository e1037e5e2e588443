//! The cluster's job list (issue 14, src/cluster/view.rs): `GET /api/cluster/jobs` on any agent
//! lists the job records of the database (jobs that ran on other agents included), with their
//! agent, record state and retries, filtered by agent, project and state; the web view merges it
//! with the agent's own `/index/`.
//!
//! Agents on one throwaway PostgreSQL (tests/common/postgres.rs). Placement: a project's first
//! job, posted to an idle agent, runs there (no agent has its image yet, all tie), so each agent
//! below gets projects of its own. Each test skips when PostgreSQL is missing, failing under
//! `CI`. The Chromium test runs as root only, as tests/web.rs does.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::collections::BTreeSet;
use std::time::Duration;

use common::server::{job_id, Server};
use common::wait_for;
use postgres::Postgres;
use serde_json::{json, Value};

/// An agent named `name` with 2 slots; agent_timeout 15s (a loaded machine must not make an
/// agent look dead here).
fn agent(pg: &Postgres, name: &str) -> Server {
    cluster::agent_with(&pg.url(), name, 2, json!({"agent_timeout": "15s"}))
}

/// `GET /api/cluster/jobs{query}` of `s`, which must answer 200: the list.
fn cluster_jobs(s: &Server, query: &str) -> Vec<Value> {
    let (status, text) = s.get(&format!("/api/cluster/jobs{query}"), false);
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// The IDs of a list, in its order.
fn ids(list: &[Value]) -> Vec<String> {
    list.iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

/// `POST /jobs` of `body` to `s`, which must run it: its BuildInfo and ID, after checking the
/// record says agent `name` ran it.
fn run_on(pg: &Postgres, s: &Server, name: &str, body: Value) -> (Value, String) {
    let info = s.job(body);
    let id = job_id(&info);
    assert_eq!(
        pg.psql(&format!("SELECT agent FROM jobs WHERE id = '{id}'")),
        name,
        "{info}"
    );
    (info, id)
}

#[test]
fn any_agent_lists_the_jobs_that_others_ran() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg, "a");
    let b = agent(&pg, "b");
    let c = agent(&pg, "c");
    // Two jobs on a, two on c (one failing), in this order; none on b.
    let (one, one_id) = run_on(
        &pg,
        &a,
        "a",
        json!({"project": "simple", "params": {"name": "one"}}),
    );
    let (_, two_id) = run_on(
        &pg,
        &a,
        "a",
        json!({"project": "simple", "params": {"name": "two"}}),
    );
    let (_, copy_id) = run_on(&pg, &c, "c", json!({"project": "copyfolder"}));
    let (failed, failed_id) = run_on(&pg, &c, "c", json!({"project": "failing"}));
    assert_eq!(one["ExitCode"], 0, "{one}");
    assert_eq!(failed["ExitCode"], 127, "{failed}");
    assert_eq!(
        pg.psql("SELECT string_agg(project || ':' || agent || ':' || state, ',' ORDER BY started_at) FROM jobs"),
        "simple:a:ready,simple:a:ready,copyfolder:c:ready,failing:c:failed"
    );
    // B holds none of them: its /index/ is empty, its cluster list has all four, newest first.
    let (status, index) = b.get("/index/", false);
    assert_eq!((status, index.as_str()), (200, "[]"));
    let list = cluster_jobs(&b, "");
    assert_eq!(
        ids(&list),
        [&failed_id, &copy_id, &two_id, &one_id].map(std::clone::Clone::clone)
    );
    let keys: BTreeSet<&str> = list[0]
        .as_object()
        .unwrap()
        .keys()
        .map(std::string::String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "agent",
            "buildInfo",
            "clusterState",
            "id",
            "project",
            "retries",
            "startedAt",
            "state"
        ])
    );
    let summary: Vec<(String, String, String, String, i64)> = list
        .iter()
        .map(|j| {
            (
                j["project"].as_str().unwrap().to_string(),
                j["agent"].as_str().unwrap().to_string(),
                j["state"].as_str().unwrap().to_string(),
                j["clusterState"].as_str().unwrap().to_string(),
                j["retries"].as_i64().unwrap(),
            )
        })
        .collect();
    let row = |p: &str, a: &str, s: &str, cs: &str| (p.into(), a.into(), s.into(), cs.into(), 0);
    assert_eq!(
        summary,
        vec![
            row("failing", "c", "ready", "failed"),
            row("copyfolder", "c", "ready", "ready"),
            row("simple", "a", "ready", "ready"),
            row("simple", "a", "ready", "ready"),
        ]
    );
    // The stored BuildInfo, as the agent that ran the job answered it (without the logs).
    for (entry, info) in [(&list[0], &failed), (&list[3], &one)] {
        for field in [
            "ExitCode",
            "Params",
            "Group",
            "StartedAt",
            "Duration",
            "ErrBuild",
            "URL",
        ] {
            assert_eq!(entry["buildInfo"][field], info[field], "{field}: {entry}");
        }
        assert!(
            entry["buildInfo"].get("ContainerStdouterr").is_none(),
            "{entry}"
        );
    }
    assert_eq!(list[3]["buildInfo"]["Params"], json!({"name": "one"}));
    // `startedAt` in /index/'s format.
    let started = list[3]["startedAt"].as_str().unwrap();
    assert!(
        chrono::NaiveDateTime::parse_from_str(started, "%a, %d %b %Y %H:%M:%S").is_ok(),
        "{started}"
    );
    // Every agent answers the same list.
    assert_eq!(cluster_jobs(&a, ""), list);
    assert_eq!(cluster_jobs(&c, ""), list);

    // Filters.
    let count = |q: &str| cluster_jobs(&b, q).len();
    assert_eq!(
        ids(&cluster_jobs(&b, "?agent=a")),
        [&two_id, &one_id].map(std::clone::Clone::clone)
    );
    assert_eq!(count("?agent=c"), 2);
    assert_eq!(count("?agent=b"), 0);
    assert_eq!(count("?agent=nosuchagent"), 0);
    assert_eq!(count("?project=simple"), 2);
    assert_eq!(count("?project=failing"), 1);
    assert_eq!(
        ids(&cluster_jobs(&b, "?state=failed")),
        vec![failed_id.clone()]
    );
    assert_eq!(count("?state=ready"), 3);
    assert_eq!(count("?state=pending"), 0);
    assert_eq!(count("?state=running"), 0);
    assert_eq!(
        ids(&cluster_jobs(&b, "?agent=c&state=ready")),
        vec![copy_id.clone()]
    );
    assert_eq!(count("?agent=a&project=copyfolder"), 0);
    assert_eq!(ids(&cluster_jobs(&b, "?limit=1")), vec![failed_id.clone()]);
    assert_eq!(count("?limit=3"), 3);
    assert_eq!(count("?limit=5000"), 4);
    assert_eq!(count("?agent=&project=&state="), 4);
    for (q, text) in [
        (
            "?state=done",
            "Unknown state 'done': give queued, running, pending, ready or failed",
        ),
        ("?limit=0", "limit must be between 1 and 5000, got 0"),
        ("?limit=5001", "limit must be between 1 and 5000, got 5001"),
    ] {
        assert_eq!(
            b.get(&format!("/api/cluster/jobs{q}"), false),
            (400, text.to_string()),
            "{q}"
        );
    }
    let (status, _) = b.get("/api/cluster/jobs?limit=many", false);
    assert_eq!(status, 400);

    // A running job: `pending` as mistry says, `running` in the record, the blank BuildInfo of
    // its request.
    let (status, text) = a.post(
        "/jobs?async",
        &json!({"project": "simple", "params": {"name": "slow", "sleep": "4"}}).to_string(),
    );
    assert_eq!(status, 201, "{text}");
    wait_for("the slow job running", Duration::from_secs(30), || {
        pg.psql("SELECT count(*) FROM jobs WHERE state = 'running'") == "1"
    });
    let slow_id = pg.psql("SELECT id FROM jobs WHERE state = 'running'");
    let pending = cluster_jobs(&b, "?state=pending");
    assert_eq!(ids(&pending), vec![slow_id.clone()]);
    assert_eq!(pending[0]["agent"], "a");
    assert_eq!(pending[0]["state"], "pending");
    assert_eq!(pending[0]["clusterState"], "running");
    assert_eq!(pending[0]["buildInfo"]["ExitCode"], -999);
    assert_eq!(
        pending[0]["buildInfo"]["Params"],
        json!({"name": "slow", "sleep": "4"})
    );
    assert_eq!(ids(&cluster_jobs(&b, "?limit=1")), vec![slow_id.clone()]);
    // Its page on b, from the record (the web view links there).
    let (status, page) = b.get(&format!("/job/simple/{slow_id}"), false);
    assert_eq!(status, 200);
    assert!(page.contains("/static/app.js"), "{page}");
    let (status, text) = b.get(&format!("/api/job/simple/{slow_id}"), false);
    assert_eq!(status, 200, "{text}");
    let job: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (job["id"].as_str(), job["state"].as_str()),
        (Some(slow_id.as_str()), Some("pending"))
    );
    wait_for("the slow job ended", Duration::from_secs(30), || {
        cluster_jobs(&b, "?state=pending").is_empty()
    });
    assert_eq!(count("?agent=a&state=ready"), 3);
    // A job that ran on a, shown on b from its record.
    let (status, text) = b.get(&format!("/api/job/simple/{one_id}"), false);
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["buildInfo"]["ExitCode"],
        0
    );

    // A single node has no cluster list: 404, and its /index/ as always.
    let solo = Server::start(json!({}));
    solo.job(json!({"project": "simple", "params": {"name": "solo"}}));
    assert_eq!(
        solo.get("/api/cluster/jobs", false),
        (
            404,
            "No cluster: this mistryd has no database_url (GET /index/ lists its jobs)".to_string()
        )
    );
    let (status, index) = solo.get("/index/", false);
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Vec<Value>>(&index).unwrap().len(), 1);
}

#[test]
fn the_cluster_list_is_503_while_the_database_is_down() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg, "a");
    let b = agent(&pg, "b");
    let (_, id) = run_on(
        &pg,
        &a,
        "a",
        json!({"project": "simple", "params": {"name": "x"}}),
    );
    assert_eq!(ids(&cluster_jobs(&b, "")), vec![id.clone()]);
    pg.stop();
    let (status, text) = b.get("/api/cluster/jobs", false);
    assert_eq!(status, 503, "{text}");
    assert!(text.starts_with("Service unavailable: "), "{text}");
    assert!(
        text.contains(&format!("postgres://mistry@127.0.0.1:{}/mistry", pg.port)),
        "{text}"
    );
    // The agent's own list still answers.
    assert_eq!(b.get("/index/", false), (200, "[]".to_string()));
    pg.start();
    wait_for("the list back", Duration::from_secs(30), || {
        b.get("/api/cluster/jobs", false).0 == 200
    });
    assert_eq!(ids(&cluster_jobs(&b, "")), vec![id]);
}

/// B's job list (Chromium) shows the jobs that ran on A and C beside its own, with their agent;
/// the agent and state filters leave exactly the expected rows; A's job links to its page on B.
/// Screenshots go to target/test-artifacts/ (or `$MISTRY_TEST_ARTIFACTS`).
#[test]
fn the_web_views_job_list_shows_the_cluster() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the Chromium test runs as root (as tests/web.rs)");
        return;
    }
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg, "a");
    let b = agent(&pg, "b");
    let c = agent(&pg, "c");
    let (_, a_id) = run_on(
        &pg,
        &a,
        "a",
        json!({"project": "simple", "params": {"name": "on-a"}}),
    );
    let (_, c_id) = run_on(&pg, &c, "c", json!({"project": "failing"}));
    let (_, b_id) = run_on(&pg, &b, "b", json!({"project": "copyfolder"}));
    let browser = common::browser::Browser::start();
    browser.goto(&b.url("/"));
    let rows = "[...document.querySelectorAll('#jobs tr[data-id]')]\
                .map((r) => r.dataset.id + ' ' + r.dataset.agent + ' ' + (r.dataset.held || 'here')).join(',')";
    let expected = format!("{b_id} b here,{c_id} c elsewhere,{a_id} a elsewhere");
    browser.wait(
        "the cluster's three jobs",
        &format!("return {rows} === {expected:?};"),
        Duration::from_secs(20),
    );
    browser.screenshot("cluster-job-list-on-b");
    let cell = |id: &str, css: &str| {
        browser.eval(&format!(
            "return document.querySelector('#jobs tr[data-id=\"{id}\"] {css}').textContent;"
        ))
    };
    assert_eq!(cell(&a_id, "td.agent"), json!("a"));
    assert_eq!(cell(&c_id, "td.agent"), json!("c"));
    assert_eq!(cell(&b_id, "td.agent"), json!("b"));
    assert_eq!(cell(&a_id, "td:nth-child(2)"), json!("simple"));
    assert_eq!(cell(&c_id, "td:nth-child(8)"), json!("127"));
    assert_eq!(cell(&c_id, ".badge.failed"), json!("failed"));
    // The agent filter: exactly A's job, then exactly B's, then all.
    let select = |id: &str, value: &str| {
        browser.eval(&format!(
            "const s = document.getElementById('{id}'); s.value = '{value}'; \
             s.dispatchEvent(new Event('change')); return s.value;"
        ))
    };
    let wait_rows = |what: &str, want: String| {
        browser.wait(
            what,
            &format!(
                "return [...document.querySelectorAll('#jobs tr[data-id]')]\
                 .map((r) => r.dataset.id).join(',') === {want:?};"
            ),
            Duration::from_secs(10),
        );
    };
    assert_eq!(
        browser.eval("return [...document.getElementById('filter-agent').options].map((o) => o.value).join(',');"),
        json!(",a,b,c")
    );
    assert_eq!(select("filter-agent", "a"), json!("a"));
    wait_rows("a's job alone", a_id.clone());
    browser.screenshot("cluster-job-list-agent-a");
    select("filter-agent", "b");
    wait_rows("b's job alone", b_id.clone());
    select("filter-agent", "");
    select("filter-state", "failed");
    wait_rows("c's failed job alone", c_id.clone());
    select("filter-state", "");
    wait_rows("all three", format!("{b_id},{c_id},{a_id}"));
    // From the agents page's link: /?agent=c.
    browser.goto(&b.url("/?agent=c"));
    wait_rows("c's job alone", c_id.clone());
    // A's job links to its page on b, with its agent, exit code and log.
    browser.goto(&b.url("/"));
    wait_rows("all three", format!("{b_id},{c_id},{a_id}"));
    browser.click(&format!("#jobs tr[data-id=\"{a_id}\"] td.id a"));
    browser.wait(
        "a's job page on b",
        "const l = document.getElementById('log'); \
         const f = document.querySelector('[data-field=Agent]'); \
         return !!l && l.textContent.includes('out: on-a') && !!f && f.textContent === 'a';",
        Duration::from_secs(20),
    );
    assert_eq!(
        browser.eval("return location.pathname;"),
        json!(format!("/job/simple/{a_id}"))
    );
    assert_eq!(
        browser.eval("return document.querySelector('[data-field=ExitCode]').textContent;"),
        json!("0")
    );
    browser.screenshot("cluster-job-of-a-on-b");
    assert!(!b.builds().join("simple/ready").join(&a_id).exists());
}
