//! Pipelines in cluster mode (issue 14): three mistryd agents on one throwaway PostgreSQL
//! (tests/common/postgres.rs), with the same projects and pipeline definitions. A run taken by
//! one agent submits its jobs through the cluster's job records: each job runs once
//! cluster-wide, is a result-cache hit for `POST /jobs` and for runs on other agents, and a
//! downstream job that placement sends to an agent without its input builds fetches them first
//! (or fails naming the input when it cannot).
//!
//! Each test skips when PostgreSQL is missing, failing under `CI`.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::path::Path;
use std::time::Duration;

use cluster::{agents_named, get_artifacts, log_of, post_job, untar};
use common::pipelines::{get_json, job, job_fields, post_run, script_project, write_pipeline};
use common::server::{job_id, read, Server};
use postgres::Postgres;
use serde_json::{json, Value};

/// Writes `gen:<text>` to `/data/artifacts/value.txt` (after `sleep` seconds).
const GEN_SH: &str = r#"#!/bin/sh
echo "generating $(cat /data/params/text)"
if [ -n "$(cat /data/params/sleep 2>/dev/null)" ]; then sleep "$(cat /data/params/sleep)"; fi
echo "gen:$(cat /data/params/text)" > /data/artifacts/value.txt
"#;

/// Reads its input `gen` (when it has one): `use(<gen's value>)` in `out.txt`, the names of its
/// inputs in `inputs.txt`; without an input (a group's seed build), `seed`.
const USE_SH: &str = r#"#!/bin/sh
set -e
if [ -d /data/input ]; then
    ls /data/input > /data/artifacts/inputs.txt
    echo "use($(cat /data/input/gen/value.txt))" > /data/artifacts/out.txt
else
    echo seed > /data/artifacts/out.txt
fi
"#;

/// Reads its input `use`: `final[<use's out>]`.
const FINAL_SH: &str = r#"#!/bin/sh
set -e
echo "final[$(cat /data/input/use/out.txt)]" > /data/artifacts/final.txt
"#;

/// `gen` → `use` → `final`; `use` in the group `{{group}}` (empty by default); `gen` sleeps
/// `{{sleep}}` seconds when set.
fn chain() -> Value {
    json!({
        "params": {"text": {"required": true}, "group": {"default": ""}, "sleep": {"default": ""}},
        "jobs": {
            "gen": {"project": "gen", "params": {"text": "{{text}}", "sleep": "{{sleep}}"}},
            "use": {"project": "use", "group": "{{group}}", "needs": ["gen"]},
            "final": {"project": "final", "needs": ["use"]}
        }
    })
}

/// The same projects and pipeline on every agent (job IDs hash the project directories).
fn setup(agents: &[Server]) {
    for s in agents {
        let root = s.dir.path().join("projects");
        script_project(&root, "gen", GEN_SH);
        script_project(&root, "use", USE_SH);
        script_project(&root, "final", FINAL_SH);
        write_pipeline(
            &root,
            "chain",
            &serde_json::to_string_pretty(&chain()).unwrap(),
        );
    }
}

/// File `file` of job `name`'s artifacts (its `path` in the run record).
fn artifact(rec: &Value, name: &str, file: &str) -> String {
    read(Path::new(job(rec, name)["path"].as_str().unwrap()).join(file))
}

/// How many jobs each agent started (its log's `job started` lines).
fn started(agents: &[Server]) -> Vec<usize> {
    agents
        .iter()
        .map(|s| log_of(s).matches("job started").count())
        .collect()
}

/// The run's job IDs by name.
fn ids(rec: &Value) -> Vec<(String, String)> {
    job_fields(rec, "id")
}

#[test]
fn a_run_on_a_runs_each_job_once_in_the_cluster_and_is_cached_everywhere() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let agents = agents_named(&pg.url(), ["a", "b", "c"], 1);
    setup(&agents);
    let [a, b, c] = &agents;

    let rec = post_run(
        a,
        &json!({"pipeline": "chain", "params": {"text": "hello"}}),
    );
    assert_eq!(rec["state"], "succeeded", "{rec}");
    assert_eq!(
        job_fields(&rec, "state"),
        [("gen", "ready"), ("use", "ready"), ("final", "ready")]
            .map(|(n, s)| (n.to_string(), s.to_string()))
    );
    for name in ["gen", "use", "final"] {
        let j = job(&rec, name);
        assert_eq!(
            (&j["cached"], &j["exit_code"], &j["err_build"]),
            (&json!(false), &json!(0), &json!("")),
            "{j}"
        );
        // The answer is local to the agent that took the run.
        let path = j["path"].as_str().unwrap();
        assert!(path.starts_with(a.builds().to_str().unwrap()), "{path}");
    }
    assert_eq!(artifact(&rec, "gen", "value.txt"), "gen:hello\n");
    assert_eq!(artifact(&rec, "use", "inputs.txt"), "gen\n");
    assert_eq!(artifact(&rec, "use", "out.txt"), "use(gen:hello)\n");
    assert_eq!(
        artifact(&rec, "final", "final.txt"),
        "final[use(gen:hello)]\n"
    );

    // One record per job, each ready and run once, with the run's job IDs.
    let recorded = pg.psql(
        "SELECT project, id, state, retries FROM jobs ORDER BY array_position(
            ARRAY['gen', 'use', 'final'], project::text)",
    );
    let expected: Vec<String> = ids(&rec)
        .iter()
        .map(|(name, id)| format!("{name}|{id}|ready|0"))
        .collect();
    assert_eq!(recorded, expected.join("\n"));
    assert_eq!(
        started(&agents).iter().sum::<usize>(),
        3,
        "{:?}",
        started(&agents)
    );
    // The run's record lives on A, which links the jobs it built to the run.
    let run = rec["run"].as_str().unwrap();
    let links = get_json(a, "/pipelines/jobs/");
    for (name, id) in ids(&rec) {
        assert_eq!(
            links[format!("{name}/{id}")]["url"],
            format!("pipeline/chain/{run}"),
            "{links}"
        );
    }
    assert!(a
        .builds()
        .join(".pipelines/chain")
        .join(run)
        .join("run.json")
        .is_file());
    assert!(!c.builds().join(".pipelines").exists());

    // POST /jobs of the run's first job on C: a cache hit, the same build.
    let gen_id = job(&rec, "gen")["id"].as_str().unwrap().to_string();
    let (status, text) = post_job(
        c,
        &json!({"project": "gen", "params": {"text": "hello", "sleep": ""}}),
    );
    assert_eq!(status, 201, "{text}");
    let hit: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (&hit["Cached"], &hit["Coalesced"], &hit["ExitCode"]),
        (&json!(true), &json!(false), &json!(0)),
        "{hit}"
    );
    assert_eq!(job_id(&hit), gen_id);
    let (status, body) = get_artifacts(c, "gen", &gen_id);
    assert_eq!(status, 200);
    let files = untar(&body);
    assert_eq!(
        files.into_iter().collect::<Vec<_>>(),
        vec![("value.txt".to_string(), b"gen:hello\n".to_vec())]
    );

    // The same run taken by B: every job a cache hit of the cluster, nothing runs again.
    let again = post_run(
        b,
        &json!({"pipeline": "chain", "params": {"text": "hello"}}),
    );
    assert_eq!(again["state"], "succeeded", "{again}");
    assert_eq!(again["run"], rec["run"]);
    assert_eq!(ids(&again), ids(&rec));
    for name in ["gen", "use", "final"] {
        assert_eq!(job(&again, name)["cached"], true, "{again}");
        let path = job(&again, name)["path"].as_str().unwrap().to_string();
        assert!(path.starts_with(b.builds().to_str().unwrap()), "{path}");
    }
    assert_eq!(
        artifact(&again, "final", "final.txt"),
        "final[use(gen:hello)]\n"
    );
    assert_eq!(started(&agents).iter().sum::<usize>(), 3);
    assert_eq!(pg.psql("SELECT count(*) FROM jobs"), "3");
    // Cache hits are not B's run's jobs.
    assert_eq!(get_json(b, "/pipelines/jobs/"), json!({}));
}

#[test]
fn a_downstream_job_placed_on_another_agent_fetches_its_input_first() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let agents = agents_named(&pg.url(), ["a", "b", "c"], 1);
    setup(&agents);
    let [a, _b, c] = &agents;
    // The group g's last build on C: the group's next jobs go to C.
    let (status, text) = post_job(c, &json!({"project": "use", "group": "g"}));
    assert_eq!(status, 201, "{text}");
    let seed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(seed["ExitCode"], 0, "{seed}");
    assert_eq!(
        pg.psql(&format!(
            "SELECT agent FROM jobs WHERE id = '{}'",
            job_id(&seed)
        )),
        "c"
    );

    let rec = post_run(
        a,
        &json!({"pipeline": "chain", "params": {"text": "placed", "group": "g"}}),
    );
    assert_eq!(rec["state"], "succeeded", "{rec}");
    let [(_, gen_id), (_, use_id), (_, final_id)] = <[_; 3]>::try_from(ids(&rec)).unwrap();
    // gen ran on A (the agent taking the run, all agents idle), use on C (its group's holder).
    assert_eq!(
        pg.psql(&format!(
            "SELECT project, agent FROM jobs WHERE id IN ('{gen_id}', '{use_id}') ORDER BY project"
        )),
        "gen|a\nuse|c"
    );
    // C fetched gen's build from A before use ran, and use read it at /data/input/gen/.
    assert!(
        log_of(c).contains("input build fetched from another agent"),
        "{}",
        log_of(c)
    );
    assert_eq!(
        read(
            c.builds()
                .join("gen/ready")
                .join(&gen_id)
                .join("data/artifacts/value.txt")
        ),
        "gen:placed\n"
    );
    assert_eq!(artifact(&rec, "use", "inputs.txt"), "gen\n");
    assert_eq!(artifact(&rec, "use", "out.txt"), "use(gen:placed)\n");
    assert_eq!(
        artifact(&rec, "final", "final.txt"),
        "final[use(gen:placed)]\n"
    );
    assert_eq!(job(&rec, "use")["incremental"], true, "{rec}");
    // Each job once: the seed and use on C, gen on A; final wherever placement put it.
    assert_eq!(
        pg.psql(&format!(
            "SELECT count(*), sum(retries) FROM jobs WHERE id IN ('{gen_id}', '{use_id}', '{final_id}')
                AND state = 'ready'"
        )),
        "3|0"
    );
    assert_eq!(
        started(&agents).iter().sum::<usize>(),
        4,
        "{:?}",
        started(&agents)
    );
    assert!(started(&agents)[2] >= 2, "{:?}", started(&agents));
}

#[test]
fn an_input_lost_by_its_holder_comes_from_a_copy_else_the_job_fails_naming_it() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let agents = agents_named(&pg.url(), ["a", "b", "c"], 1);
    setup(&agents);
    let [a, b, c] = &agents;
    // use's group is held by C.
    let (status, text) = post_job(c, &json!({"project": "use", "group": "g"}));
    assert_eq!(status, 201, "{text}");
    // gen built on B, copied to A by a cache hit there; then B loses its build (its record
    // still says ready on B).
    let gen_on_b_copied_to_a = |text: &str| {
        let gen = json!({"project": "gen", "params": {"text": text, "sleep": ""}});
        let (status, body) = post_job(b, &gen);
        assert_eq!(status, 201, "{body}");
        let id = job_id(&serde_json::from_str(&body).unwrap());
        let (status, body) = post_job(a, &gen);
        assert_eq!(status, 201, "{body}");
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["Cached"],
            true
        );
        std::fs::remove_dir_all(b.builds().join("gen/ready").join(&id)).unwrap();
        id
    };
    let run = |text: &str| {
        let (status, body) = a.post(
            "/pipelines",
            &json!({"pipeline": "chain", "params": {"text": text, "group": "g"}}).to_string(),
        );
        assert_eq!(status, 201, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };

    // 1. C fetches gen's build from A's copy (the agent that took the run holds it).
    let gen_id = gen_on_b_copied_to_a("copied");
    let rec = run("copied");
    assert_eq!(rec["state"], "succeeded", "{rec}");
    assert_eq!(artifact(&rec, "use", "out.txt"), "use(gen:copied)\n");
    assert!(
        log_of(c).contains("input build fetched from another agent") && log_of(c).contains(&gen_id),
        "{}",
        log_of(c)
    );

    // 1b. No record at all (log_retention pruned it): any alive agent's copy will do.
    let gen_id = gen_on_b_copied_to_a("unrecorded");
    pg.psql(&format!(
        "DELETE FROM jobs WHERE project = 'gen' AND id = '{gen_id}'"
    ));
    let rec = run("unrecorded");
    assert_eq!(rec["state"], "succeeded", "{rec}");
    assert_eq!(artifact(&rec, "use", "out.txt"), "use(gen:unrecorded)\n");
    assert!(c.builds().join("gen/ready").join(&gen_id).is_dir());

    // 2. A's copy is not the recorded build (its StartedAt differs), and B lost the recorded
    //    one: A's copy is never answered (it goes), and gen runs again — the run succeeds with
    //    the new build.
    let gen_id = gen_on_b_copied_to_a("lost");
    let info = a
        .builds()
        .join("gen/ready")
        .join(&gen_id)
        .join("build_info.json");
    let mut stored: Value = serde_json::from_str(&read(&info)).unwrap();
    stored["StartedAt"] = json!("2001-01-01T00:00:00Z");
    std::fs::write(&info, stored.to_string()).unwrap();
    let rec = run("lost");
    assert_eq!(rec["state"], "succeeded", "{rec}");
    assert_eq!(job(&rec, "gen")["cached"], false, "{rec}");
    assert_eq!(artifact(&rec, "use", "out.txt"), "use(gen:lost)\n");
    assert!(
        log_of(a).contains("this agent's build is not the one the job's record names"),
        "{}",
        log_of(a)
    );
    assert!(
        log_of(a).contains("job queued again: the agent holding its build lost it"),
        "{}",
        log_of(a)
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT state, build_info->>'StartedAt' <> '2001-01-01T00:00:00Z' FROM jobs \
             WHERE project = 'gen' AND id = '{gen_id}'"
        )),
        "ready|t"
    );
    // Of use, the group's first job and the jobs of runs 1, 1b and 2 ran on C.
    assert_eq!(log_of(c).matches("job started").count(), 4, "{}", log_of(c));
}

#[test]
fn a_job_running_on_another_agent_is_pending_in_the_run() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let agents = agents_named(&pg.url(), ["a", "b", "c"], 1);
    setup(&agents);
    let [a, b, _c] = &agents;
    // B has gen's image: gen's next job goes to B.
    let (status, text) = post_job(
        b,
        &json!({"project": "gen", "params": {"text": "warm", "sleep": ""}}),
    );
    assert_eq!(status, 201, "{text}");

    let (status, text) = a.post(
        "/pipelines?async",
        &json!({"pipeline": "chain", "params": {"text": "slow", "sleep": "3"}}).to_string(),
    );
    assert_eq!(status, 201, "{text}");
    let started_rec: Value = serde_json::from_str(&text).unwrap();
    let page = format!("/pipeline/chain/{}", started_rec["run"].as_str().unwrap());
    let mut rec = Value::Null;
    common::wait_for("gen pending in the run", Duration::from_secs(20), || {
        rec = get_json(a, &page);
        job(&rec, "gen")["state"] == "pending"
    });
    let gen_id = job(&rec, "gen")["id"].as_str().unwrap().to_string();
    assert_eq!(gen_id.len(), 64, "{rec}");
    assert_eq!(
        (&job(&rec, "use")["state"], &job(&rec, "final")["state"]),
        (&json!("waiting"), &json!("waiting"))
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT agent, state FROM jobs WHERE project = 'gen' AND id = '{gen_id}'"
        )),
        "b|running"
    );
    common::wait_for("the run's end", Duration::from_secs(60), || {
        rec = get_json(a, &page);
        rec["state"] != "running"
    });
    assert_eq!(rec["state"], "succeeded", "{rec}");
    assert_eq!(
        artifact(&rec, "final", "final.txt"),
        "final[use(gen:slow)]\n"
    );
}
