//! One job, one run, cluster-wide (issue 14): three mistryd agents on one throwaway PostgreSQL
//! (tests/common/postgres.rs) share their job records: identical requests anywhere run once,
//! a build made on one agent is a result-cache hit on another (fetched from it), the job of an
//! agent killed with `kill -9` completes on another, and a group's jobs stay on the agent
//! holding its last build.
//!
//! Each test skips when PostgreSQL is missing, failing under `CI`.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::collections::BTreeMap;
use std::time::Duration;

use cluster::{agent, agents_named, get_artifacts, log_of, post_job, untar};
use common::server::{job_id, Server};
use common::wait_for;
use postgres::Postgres;
use serde_json::{json, Value};

/// `GET /artifacts/simple/<id>` of `s`, unpacked: path → content of every file.
fn artifacts_over_http(s: &Server, id: &str) -> BTreeMap<String, Vec<u8>> {
    let (status, body) = get_artifacts(s, "simple", id);
    assert_eq!(status, 200);
    untar(&body)
}

#[test]
fn twenty_identical_requests_over_three_agents_run_once() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let servers = agents_named(&pg.url(), ["a1", "a2", "a3"], 2);
    let body = json!({"project": "simple", "params": {"name": "once", "sleep": "2"}});
    let answers: Vec<(usize, u16, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let (s, body) = (&servers[i % 3], &body);
                scope.spawn(move || {
                    let (status, text) = post_job(s, body);
                    (i % 3, status, text)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ids = std::collections::BTreeSet::new();
    let mut fresh = 0;
    let mut logs = std::collections::BTreeSet::new();
    for (agent, status, text) in &answers {
        assert_eq!(*status, 201, "{text}");
        let info: Value = serde_json::from_str(text).unwrap();
        assert_eq!(info["ExitCode"], 0, "{info}");
        assert_eq!(info["ErrBuild"], "", "{info}");
        let log = info["ContainerStdouterr"].as_str().unwrap();
        assert!(log.ends_with("\nout: once\nerr: once\n"), "{log}");
        logs.insert(log.to_string());
        ids.insert(job_id(&info));
        if info["Cached"] == false && info["Coalesced"] == false {
            fresh += 1;
        }
        // Path is local to the agent that answered, and holds the artifacts.
        let path = common::server::artifacts(&info);
        assert!(
            path.starts_with(servers[*agent].builds()),
            "{} is not under {}",
            path.display(),
            servers[*agent].builds().display()
        );
        assert_eq!(common::server::read(path.join("name.txt")), "once");
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(
        logs.len(),
        1,
        "every answer has the one run's log: {logs:?}"
    );
    assert_eq!(fresh, 1, "exactly one request ran the job: {answers:?}");
    // One run in the whole cluster: one agent started it, one record.
    let started: usize = servers
        .iter()
        .map(|s| log_of(s).matches("job started").count())
        .sum();
    assert_eq!(started, 1);
    let claimed: usize = servers
        .iter()
        .map(|s| log_of(s).matches("job claimed").count())
        .sum();
    assert_eq!(claimed, 1);
    let id = ids.into_iter().next().unwrap();
    assert_eq!(
        pg.psql(&format!(
            "SELECT state, retries, build_info->>'ExitCode' FROM jobs WHERE id = '{id}'"
        )),
        "ready|0|0"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM jobs"), "1");
    // The cache count of the run is 1: nothing ran it twice.
    for s in &servers {
        let ready = s.builds().join("simple/ready").join(&id);
        assert_eq!(
            common::server::read(ready.join("data/artifacts/count.txt")),
            "1\n"
        );
    }
}

#[test]
fn a_job_built_on_a_is_a_cache_hit_on_c_with_the_same_artifacts() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    // A alone: the job runs there.
    let a = agent(&pg.url(), "a", 1);
    let body = json!({"project": "simple", "params": {"name": "shared"}});
    let (status, text) = post_job(&a, &body);
    assert_eq!(status, 201, "{text}");
    let built: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (&built["Cached"], &built["ExitCode"]),
        (&json!(false), &json!(0))
    );
    let id = job_id(&built);
    assert_eq!(
        pg.psql(&format!("SELECT agent, state FROM jobs WHERE id = '{id}'")),
        "a|ready"
    );
    let _b = agent(&pg.url(), "b", 1);
    let c = agent(&pg.url(), "c", 1);
    let (status, text) = post_job(&c, &body);
    assert_eq!(status, 201, "{text}");
    let hit: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(hit["Cached"], true, "{hit}");
    assert_eq!(hit["Coalesced"], false, "{hit}");
    assert_eq!(hit["ExitCode"], 0);
    assert_eq!(job_id(&hit), id);
    assert_eq!(hit["ContainerStdouterr"], built["ContainerStdouterr"]);
    // Path is C's own copy.
    let path = common::server::artifacts(&hit);
    assert!(path.starts_with(c.builds()), "{}", path.display());
    assert_eq!(common::server::read(path.join("name.txt")), "shared");
    // C serves the artifacts over http, equal to A's.
    let from_a = artifacts_over_http(&a, &id);
    let from_c = artifacts_over_http(&c, &id);
    assert!(from_a.contains_key("name.txt"), "{:?}", from_a.keys());
    assert_eq!(from_a, from_c);
    // Nothing ran on C, and the record still names A.
    assert_eq!(log_of(&c).matches("job started").count(), 0);
    assert_eq!(
        pg.psql(&format!("SELECT agent, state FROM jobs WHERE id = '{id}'")),
        "a|ready"
    );
    // A rebuild on A: C's copy is stale and goes; C's next answer is the new build.
    let mut rebuild = body.clone();
    rebuild["rebuild"] = json!(true);
    let (status, text) = post_job(&a, &rebuild);
    assert_eq!(status, 201, "{text}");
    let rebuilt: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(rebuilt["Cached"], false, "{rebuilt}");
    assert_ne!(rebuilt["StartedAt"], built["StartedAt"]);
    wait_for("C's stale copy gone", Duration::from_secs(10), || {
        log_of(&c).contains("a stale copy went: the job ran again on another agent")
    });
    assert!(!c.builds().join("simple/ready").join(&id).exists());
    let (status, text) = post_job(&c, &body);
    assert_eq!(status, 201, "{text}");
    let again: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(again["Cached"], true, "{again}");
    assert_eq!(again["StartedAt"], rebuilt["StartedAt"], "{again}");
    assert_eq!(log_of(&c).matches("job started").count(), 0);
    // A's own build is not a stale copy of itself.
    assert!(!log_of(&a).contains("a stale copy went"));
}

#[test]
fn kill9_of_the_agent_running_a_job_completes_it_on_another() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let servers = agents_named(&pg.url(), ["a1", "a2", "a3"], 1);
    let body = json!({"project": "simple", "params": {"name": "survivor", "sleep": "4"}});
    let (status, text) = servers[0].post("/jobs?async", &body.to_string());
    assert_eq!(status, 201, "{text}");
    let mut runner = String::new();
    wait_for("the job running", Duration::from_secs(20), || {
        runner = pg.psql("SELECT coalesce(agent, '') FROM jobs WHERE state = 'running'");
        !runner.is_empty()
    });
    let victim = ["a1", "a2", "a3"]
        .iter()
        .position(|n| *n == runner)
        .unwrap();
    wait_for("its pending build", Duration::from_secs(20), || {
        servers[victim].pending_dirs("simple") > 0
    });
    let waiter = (victim + 1) % 3;
    let victim_pid =
        nix::unistd::Pid::from_raw(servers[victim].child.as_ref().unwrap().id() as i32);
    let answer = std::thread::scope(|scope| {
        let s = &servers[waiter];
        let body = &body;
        let h = scope.spawn(move || post_job(s, body));
        std::thread::sleep(Duration::from_millis(500));
        // kill -9 (the process is reaped when its Server drops).
        nix::sys::signal::kill(victim_pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        h.join().unwrap()
    });
    let (status, text) = answer;
    assert_eq!(status, 201, "{text}");
    let info: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(info["ExitCode"], 0, "{info}");
    assert_eq!(info["Coalesced"], true, "{info}");
    assert_eq!(info["Retries"], 1, "{info}");
    let log = info["ContainerStdouterr"].as_str().unwrap();
    assert!(log.contains("\nout: survivor\nerr: survivor\n"), "{log}");
    assert!(
        log.contains(&format!(
            "mistry: retried (retry 1): agent {runner} stopped heartbeating while it ran this job"
        )),
        "{log}"
    );
    let id = job_id(&info);
    let rows = pg.psql(&format!(
        "SELECT state, agent <> '{runner}', retries, retried_from FROM jobs WHERE id = '{id}'"
    ));
    assert_eq!(rows, format!("ready|t|1|{runner}"));
    assert_eq!(pg.psql("SELECT count(*) FROM jobs"), "1");
    // One run completed in the cluster: the survivors started it once between them.
    let started: usize = servers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, s)| log_of(s).matches("job started").count())
        .sum();
    assert_eq!(started, 1);
}

#[test]
fn a_groups_jobs_land_on_the_agent_holding_its_last_build() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let servers = agents_named(&pg.url(), ["a1", "a2", "a3"], 1);
    let job = |s: &Server, name: &str, sleep: &str| -> Value {
        let body =
            json!({"project": "simple", "group": "g", "params": {"name": name, "sleep": sleep}});
        let (status, text) = post_job(s, &body);
        assert_eq!(status, 201, "{text}");
        serde_json::from_str(&text).unwrap()
    };
    let agent_of = |info: &Value| {
        pg.psql(&format!(
            "SELECT agent FROM jobs WHERE id = '{}'",
            job_id(info)
        ))
    };
    let one = job(&servers[0], "one", "0");
    assert_eq!(
        (&one["ExitCode"], &one["Incremental"]),
        (&json!(0), &json!(false))
    );
    let holder = agent_of(&one);
    let h = ["a1", "a2", "a3"]
        .iter()
        .position(|n| *n == holder)
        .unwrap();
    // Asked on another agent, the group's next job runs on the holder, incrementally.
    let two = job(&servers[(h + 1) % 3], "two", "0");
    assert_eq!(agent_of(&two), holder);
    assert_eq!(
        (&two["ExitCode"], &two["Incremental"]),
        (&json!(0), &json!(true))
    );
    let count = |info: &Value, s: &Server| {
        let path = common::server::artifacts(info);
        assert!(path.starts_with(s.builds()), "{}", path.display());
        common::server::read(path.join("count.txt"))
    };
    assert_eq!(count(&two, &servers[(h + 1) % 3]), "2\n");
    // The holder busy (capacity 1) with a slow job of the group: the next job moves to another
    // agent, which starts from the holder's last build and its cache.
    let slow_body =
        json!({"project": "simple", "group": "g", "params": {"name": "slow", "sleep": "4"}});
    let (status, text) = servers[(h + 2) % 3].post("/jobs?async", &slow_body.to_string());
    assert_eq!(status, 201, "{text}");
    wait_for(
        "the slow job on the holder",
        Duration::from_secs(20),
        || pg.psql("SELECT coalesce(agent, '') FROM jobs WHERE state = 'running'") == holder,
    );
    let three = job(&servers[(h + 1) % 3], "three", "0");
    let mover = agent_of(&three);
    assert_ne!(mover, holder);
    let m = ["a1", "a2", "a3"].iter().position(|n| *n == mover).unwrap();
    assert_eq!(
        (&three["ExitCode"], &three["Incremental"]),
        (&json!(0), &json!(true)),
        "{}",
        log_of(&servers[m])
    );
    assert_eq!(count(&three, &servers[(h + 1) % 3]), "3\n");
    assert!(
        log_of(&servers[m]).contains(&format!(
            "incremental from agent {holder}'s build simple/{}",
            job_id(&two)
        )),
        "{}",
        log_of(&servers[m])
    );
}

#[test]
fn a_database_outage_fails_requests_with_503_then_they_recover() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg.url(), "a", 1);
    let body = json!({"project": "simple", "params": {"name": "before"}});
    assert_eq!(post_job(&a, &body).0, 201);
    pg.stop();
    let (status, text) = post_job(
        &a,
        &json!({"project": "simple", "params": {"name": "down"}}),
    );
    assert_eq!(status, 503, "{text}");
    assert!(
        text.starts_with(&format!(
            "Service unavailable: the database at {}: ",
            pg.url()
        )),
        "{text}"
    );
    // A build this agent has is still a result-cache hit without the database.
    let (status, text) = post_job(&a, &body);
    assert_eq!(status, 201, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["Cached"],
        true
    );
    pg.start();
    let mut answer = (0, String::new());
    wait_for("requests accepted again", Duration::from_secs(20), || {
        answer = post_job(
            &a,
            &json!({"project": "simple", "params": {"name": "after"}}),
        );
        answer.0 != 503
    });
    assert_eq!(answer.0, 201, "{}", answer.1);
    let info: Value = serde_json::from_str(&answer.1).unwrap();
    assert_eq!(
        (&info["ExitCode"], &info["Cached"]),
        (&json!(0), &json!(false))
    );
    assert_eq!(
        pg.psql("SELECT string_agg(request->'params'->>'name' || ':' || state, ',' ORDER BY created_at) FROM jobs"),
        "before:ready,after:ready"
    );
}

/// Capacity 1: an agent with a free slot is idle. A new job stays on the agent taking the
/// request when it has the project's image and a free slot (placement, docs/cluster.md); else
/// it goes to an agent with a free slot and the image, else to the least loaded one.
#[test]
fn a_new_job_goes_to_the_agent_with_the_projects_image_else_the_least_loaded() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let names = ["a", "b", "c"];
    let [a, b, c] = agents_named(&pg.url(), names, 1);
    let job = |s: &Server, name: &str| -> Value {
        let body = json!({"project": "simple", "params": {"name": name}});
        let (status, text) = post_job(s, &body);
        assert_eq!(status, 201, "{text}");
        let info: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (&info["ExitCode"], &info["Cached"]),
            (&json!(0), &json!(false)),
            "{info}"
        );
        info
    };
    let slow_on = |s: &Server, name: &str, runner: &str| {
        let body = json!({"project": "simple", "params": {"name": name, "sleep": "8"}});
        let (status, text) = s.post("/jobs?async", &body.to_string());
        assert_eq!(status, 201, "{text}");
        wait_for(
            &format!("{name} running on {runner}"),
            Duration::from_secs(20),
            || {
                pg.psql(&format!(
                    "SELECT coalesce(agent, '') FROM jobs WHERE state = 'running' \
                 AND request->'params'->>'name' = '{name}'"
                )) == runner
            },
        );
    };
    let agent_of = |info: &Value| {
        pg.psql(&format!(
            "SELECT agent FROM jobs WHERE id = '{}'",
            job_id(info)
        ))
    };
    // Nobody has the image, nobody is loaded: the agent taking the request runs the job.
    let one = job(&b, "one");
    assert_eq!(agent_of(&one), "b");
    assert_eq!(
        pg.psql("SELECT agent, project FROM agent_images"),
        "b|simple"
    );
    // Asked on A, a new job of the project goes to B, which has its image; A answers with a
    // copy of B's build.
    let two = job(&a, "two");
    assert_eq!(agent_of(&two), "b");
    assert!(b.builds().join("simple/ready").join(job_id(&two)).is_dir());
    let path = common::server::artifacts(&two);
    assert!(path.starts_with(a.builds()), "{}", path.display());
    assert_eq!(common::server::read(path.join("name.txt")), "two");
    assert_eq!(log_of(&a).matches("job started").count(), 0);
    // B full (capacity 1): A and C are the least loaded (0 of 1); the tie goes to A, which
    // took the request.
    slow_on(&b, "slow-b", "b");
    let three = job(&a, "three");
    assert_eq!(agent_of(&three), "a");
    assert!(a
        .builds()
        .join("simple/ready")
        .join(job_id(&three))
        .is_dir());
    // A full too (it has the image now, but no free slot): C, the least loaded, runs it.
    slow_on(&a, "slow-a", "a");
    let four = job(&a, "four");
    assert_eq!(agent_of(&four), "c");
    assert!(c.builds().join("simple/ready").join(job_id(&four)).is_dir());
    assert_eq!(log_of(&c).matches("job started").count(), 1);
    // B and A still run their slow jobs: the placement did not wait for them.
    assert_eq!(
        pg.psql("SELECT string_agg(agent, ',' ORDER BY agent) FROM jobs WHERE state = 'running'"),
        "a,b"
    );
    assert_eq!(
        pg.psql("SELECT string_agg(agent || ':' || project, ',' ORDER BY agent) FROM agent_images"),
        "a:simple,b:simple,c:simple"
    );
}

/// Capacity 2: the agent taking a request keeps a new job when it has the project's image and
/// a free slot, though another agent with the image is idle (its answer needs no copy); it
/// sends the job elsewhere only when it is full (to an agent with a free slot and the image,
/// whose build is then fetched back to answer).
#[test]
fn a_new_job_stays_on_the_agent_taking_it_when_it_has_the_image_and_a_free_slot() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let [a, b] = agents_named(&pg.url(), ["a", "b"], 2);
    let job = |s: &Server, name: &str| -> Value {
        let body = json!({"project": "simple", "params": {"name": name}});
        let (status, text) = post_job(s, &body);
        assert_eq!(status, 201, "{text}");
        let info: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (&info["ExitCode"], &info["Cached"]),
            (&json!(0), &json!(false)),
            "{info}"
        );
        let path = common::server::artifacts(&info);
        assert!(path.starts_with(s.builds()), "{}", path.display());
        assert_eq!(common::server::read(path.join("name.txt")), name);
        info
    };
    let running_on = |runner: &str| {
        pg.psql(&format!(
            "SELECT count(*) FROM jobs WHERE state = 'running' AND agent = '{runner}'"
        ))
    };
    // B's slow jobs end on their own (8 s); A's outlast the test.
    let slow_on = |s: &Server, name: &str, runner: &str| {
        let sleep = if runner == "b" { "8" } else { "60" };
        let body = json!({"project": "simple", "params": {"name": name, "sleep": sleep}});
        let (status, text) = s.post("/jobs?async", &body.to_string());
        assert_eq!(status, 201, "{text}");
        wait_for(
            &format!("{name} running on {runner}"),
            Duration::from_secs(20),
            || {
                pg.psql(&format!(
                    "SELECT coalesce(agent, '') FROM jobs WHERE state = 'running' \
                     AND request->'params'->>'name' = '{name}'"
                )) == runner
            },
        );
    };
    let agent_of = |info: &Value| {
        pg.psql(&format!(
            "SELECT agent FROM jobs WHERE id = '{}'",
            job_id(info)
        ))
    };
    let fetched = |s: &Server| {
        log_of(s)
            .matches("build replicated from another agent")
            .count()
    };
    // B gets the image (nobody had it), then is filled: A, the least loaded, runs the next
    // job and gets the image too.
    assert_eq!(agent_of(&job(&b, "zero")), "b");
    slow_on(&b, "slow-b1", "b");
    slow_on(&b, "slow-b2", "b");
    assert_eq!(agent_of(&job(&a, "one")), "a");
    assert_eq!(
        pg.psql("SELECT string_agg(agent, ',' ORDER BY agent) FROM agent_images"),
        "a,b"
    );
    // A runs 1 of 2, B is idle (both have the image): a job asked on A stays on A.
    slow_on(&a, "slow-a1", "a");
    wait_for("B idle", Duration::from_secs(30), || running_on("b") == "0");
    let three = job(&a, "three");
    assert_eq!(agent_of(&three), "a");
    assert_eq!(running_on("a"), "1");
    // Asked on B, idle with the image: B.
    assert_eq!(agent_of(&job(&b, "four")), "b");
    assert_eq!((fetched(&a), fetched(&b)), (0, 0));
    // A full (2 of 2): B, with a free slot and the image, runs it; A answers with a copy.
    slow_on(&a, "slow-a2", "a");
    let five = job(&a, "five");
    assert_eq!(agent_of(&five), "b");
    assert!(b.builds().join("simple/ready").join(job_id(&five)).is_dir());
    assert_eq!((fetched(&a), fetched(&b)), (1, 0));
}

/// Capacity 1: an agent that is full but not busy (its running job is young: a short wait)
/// keeps a new job asked of it, queued for itself, though another agent with the image is idle
/// (the job would otherwise run there and its build be copied back); once its running job is
/// old (busy), the next job goes to the idle agent at once.
#[test]
fn a_new_job_waits_for_the_full_agent_taking_it_unless_that_agent_is_busy() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let [a, b] = agents_named(&pg.url(), ["a", "b"], 1);
    let post = |s: &Server, name: &str| {
        let body = json!({"project": "simple", "params": {"name": name}});
        let (status, text) = post_job(s, &body);
        assert_eq!(status, 201, "{text}");
    };
    // Both get the image.
    post(&a, "first-a");
    post(&b, "first-b");
    // A runs a long job; its record says it started a moment ago (a young run) for as long
    // as the test needs.
    let body = json!({"project": "simple", "params": {"name": "long", "sleep": "60"}});
    let (status, text) = a.post("/jobs?async", &body.to_string());
    assert_eq!(status, 201, "{text}");
    let long = "request->'params'->>'name' = 'long'";
    wait_for("the long job running on a", Duration::from_secs(20), || {
        pg.psql(&format!(
            "SELECT coalesce(agent, '') FROM jobs WHERE state = 'running' AND {long}"
        )) == "a"
    });
    pg.psql(&format!(
        "UPDATE jobs SET started_at = now() + interval '1 hour' WHERE {long}"
    ));
    let placed = |name: &str| {
        let (status, text) = a.post(
            "/jobs?async",
            &json!({"project": "simple", "params": {"name": name}}).to_string(),
        );
        assert_eq!(status, 201, "{text}");
        pg.psql(&format!(
            "SELECT coalesce(preferred_agent, '') FROM jobs \
             WHERE request->'params'->>'name' = '{name}'"
        ))
    };
    // Full, not busy: queued for A (B, idle with the image, would have taken it at once).
    assert_eq!(placed("short-wait"), "a");
    // Busy (its running job started long ago): the next one goes to B.
    pg.psql(&format!(
        "UPDATE jobs SET started_at = now() - interval '1 minute' WHERE {long}"
    ));
    assert_eq!(placed("spread"), "b");
    wait_for(
        "the spread job to end on b",
        Duration::from_secs(20),
        || {
            pg.psql("SELECT state || '|' || agent FROM jobs WHERE request->'params'->>'name' = 'spread'")
            == "ready|b"
        },
    );
}

/// Capacity 1: a new job asked of an agent whose one slot is taken by a young run is inserted
/// `running` by that agent and waits there for the slot, as in a single node's queue (no claim:
/// its record started when it was inserted), though another agent with the image is idle; a
/// job that waits there longer than a second (the run there turned long) goes back to the
/// cluster's queue and the idle agent runs it (its second attempt).
#[test]
fn a_new_job_waits_on_the_full_agent_taking_it_and_leaves_when_the_wait_turns_long() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let [a, b] = agents_named(&pg.url(), ["a", "b"], 1);
    let post = |s: &Server, name: &str, sleep: &str| {
        let body = json!({"project": "simple", "params": {"name": name, "sleep": sleep}});
        let (status, text) = s.post("/jobs?async", &body.to_string());
        assert_eq!(status, 201, "{text}");
    };
    let record = |name: &str| {
        pg.psql(&format!(
            "SELECT state || '|' || coalesce(agent, '') || '|' || attempt || '|' ||
                    (started_at = queued_at)
               FROM jobs WHERE request->'params'->>'name' = '{name}'"
        ))
    };
    let ended = |name: &str, timeout: u64| {
        wait_for(
            &format!("{name} to end"),
            Duration::from_secs(timeout),
            || record(name).starts_with("ready|"),
        );
        record(name)
    };
    // Both get the image.
    let (status, text) = post_job(&a, &json!({"project": "simple", "params": {"name": "a0"}}));
    assert_eq!(status, 201, "{text}");
    let (status, text) = post_job(&b, &json!({"project": "simple", "params": {"name": "b0"}}));
    assert_eq!(status, 201, "{text}");
    // A short run takes A's slot; the next job asked of A waits there for it.
    post(&a, "short", "0.2");
    post(&a, "after-short", "");
    assert_eq!(ended("after-short", 30), "ready|a|1|true");
    assert_eq!(ended("short", 30), "ready|a|1|true");
    // A long run takes A's slot: the job waiting there leaves after a second, and B runs it.
    post(&a, "long", "20");
    post(&a, "after-long", "");
    assert_eq!(ended("after-long", 30), "ready|b|2|false");
    assert!(
        log_of(&a).contains("the job waited here for a slot too long"),
        "{}",
        log_of(&a)
    );
    assert_eq!(record("long"), "running|a|1|true");
}

/// A job waiting on an agent for a slot when that agent stops (SIGTERM, a short shutdown
/// grace) goes back to the cluster's queue before the agent marks itself stopped: another agent
/// runs it as a plain queued job, not as a lost run of a dead agent (no retry counted).
#[test]
fn a_job_waiting_on_a_stopping_agent_goes_back_to_the_queue_without_a_retry() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let [mut a, b] = agents_named(&pg.url(), ["a", "b"], 1);
    for (s, name) in [(&a, "a0"), (&b, "b0")] {
        let (status, text) = post_job(s, &json!({"project": "simple", "params": {"name": name}}));
        assert_eq!(status, 201, "{text}");
    }
    // A again, its running jobs given 200 ms after SIGTERM.
    assert!(a.term().success());
    a.grace = "200ms".into();
    a.spawn();
    let post = |s: &Server, name: &str, sleep: &str| {
        let body = json!({"project": "simple", "params": {"name": name, "sleep": sleep}});
        let (status, text) = s.post("/jobs?async", &body.to_string());
        assert_eq!(status, 201, "{text}");
    };
    post(&a, "long", "20");
    post(&a, "waiting", "");
    assert_eq!(
        pg.psql(
            "SELECT state || '|' || agent || '|' || (started_at = queued_at) FROM jobs \
             WHERE request->'params'->>'name' = 'waiting'"
        ),
        "running|a|true"
    );
    assert!(a.term().success());
    let record = || {
        pg.psql(
            "SELECT state || '|' || coalesce(agent, '') || '|' || attempt || '|' || retries \
               FROM jobs WHERE request->'params'->>'name' = 'waiting'",
        )
    };
    wait_for(
        "the waiting job to end on b",
        Duration::from_secs(30),
        || record().starts_with("ready|"),
    );
    assert_eq!(record(), "ready|b|2|0");
}

/// Requests whose mistry job IDs collide (`{name: "xnzy"}` / `{name: "x", nz: "y"}`), asked on
/// two agents: the second request, on the other agent, is not answered with the first one's
/// build (neither fetched from its agent once ready, nor joined while it runs) but gets a build
/// and a record of its own under its exact ID; each is then a cluster-wide result-cache hit of
/// its own build, on either agent.
#[test]
fn a_request_sharing_a_mistry_job_id_on_another_agent_gets_its_own_build() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let [a, b] = agents_named(&pg.url(), ["a", "b"], 2);
    let job = |s: &Server, params: Value| -> Value {
        let body = json!({"project": "simple", "params": params});
        let (status, text) = post_job(s, &body);
        assert_eq!(status, 201, "{text}");
        let info: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(info["ExitCode"], 0, "{info}");
        assert_eq!(info["Params"], params, "{info}");
        let path = common::server::artifacts(&info);
        assert!(path.starts_with(s.builds()), "{}", path.display());
        let name = params["name"].as_str().unwrap();
        assert_eq!(
            common::server::read(path.join("name.txt")),
            name,
            "not the build of {params}: {info}"
        );
        info
    };
    // Ready on A first.
    let x = job(&a, json!({"name": "xnzy"}));
    let y = job(&b, json!({"name": "x", "nz": "y"}));
    assert_eq!(
        (&y["Cached"], &y["Coalesced"]),
        (&json!(false), &json!(false))
    );
    assert_ne!(job_id(&y), job_id(&x));
    assert_eq!(
        common::server::read(common::server::artifacts(&y).join("params.txt")),
        "name\nnz\n"
    );
    // Each is its own cache hit, on either agent.
    for s in [&a, &b] {
        assert_eq!(job(s, json!({"name": "xnzy"}))["URL"], x["URL"]);
        let again = job(s, json!({"name": "x", "nz": "y"}));
        assert_eq!((&again["Cached"], &again["URL"]), (&json!(true), &y["URL"]));
    }
    // Still running on A ({name: "w", sleep: "3"}) while the other is asked on B.
    let slow = json!({"project": "simple", "params": {"name": "w", "sleep": "3"}});
    let (status, text) = a.post("/jobs?async", &slow.to_string());
    assert_eq!(status, 201, "{text}");
    let other = job(&b, json!({"name": "wsleep3"}));
    assert_eq!(other["Coalesced"], false, "{other}");
    let w = job(&a, json!({"name": "w", "sleep": "3"}));
    assert_ne!(job_id(&w), job_id(&other));
    // One record per request, each with its own request.
    assert_eq!(
        pg.psql("SELECT request->'params'->>'name', state FROM jobs ORDER BY 1"),
        "w|ready\nwsleep3|ready\nx|ready\nxnzy|ready"
    );
}

/// A new job's statements are planned once per pooled connection, not at every job: the
/// insert of a job run where it was asked, with or without a group (the whole placement
/// statement), the fence and the end. A statement with a parameter that lets PostgreSQL drop a
/// sub-plan (`$here OR ...`) was planned anew at each execution — its custom plan always looks
/// cheaper than the generic one — which cost each new job 0.4 ms of the database's time.
#[test]
fn a_new_jobs_statements_are_planned_once_per_connection_not_at_every_job() {
    let Some(pg) = Postgres::start_with_statement_stats_or_skip() else {
        return;
    };
    let a = agent(&pg.url(), "a", 2);
    // More jobs than the planning of every pooled connection (below) may take.
    const JOBS: usize = 120;
    for i in 0..JOBS {
        for group in ["", "g"] {
            let info = a.job(json!({"project": "simple", "group": group,
                                    "params": {"name": format!("plan-{i}")}}));
            assert_eq!(info["ExitCode"], 0, "{info}");
            assert_eq!(info["Cached"], false, "{info}");
        }
    }
    let stats = |like: &str| -> (usize, usize) {
        let row = pg.psql(&format!(
            "SELECT sum(calls), sum(plans) FROM pg_stat_statements
              WHERE regexp_replace(query, '\\s+', ' ', 'g') LIKE '{like}'"
        ));
        let parsed = row
            .split_once('|')
            .and_then(|(c, p)| Some((c.parse().ok()?, p.parse().ok()?)));
        parsed.unwrap_or_else(|| {
            let seen = pg.psql(
                "SELECT calls, plans, left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
                   FROM pg_stat_statements WHERE calls > 5 ORDER BY calls DESC",
            );
            panic!("no statement like {like}: {row}; the statements:\n{seen}")
        })
    };
    for (what, like) in [
        (
            "the insert here",
            "WITH mine AS (SELECT EXISTS (SELECT % FROM agent_images %",
        ),
        ("the whole insert", "WITH qfull AS %"),
        (
            "the group's last build",
            "SELECT j.id, j.agent, a.advertise_url, %",
        ),
        (
            "the fence",
            "SELECT EXISTS (SELECT % FROM jobs WHERE %attempt = $4%",
        ),
        ("the end", "WITH upd AS ( UPDATE jobs SET state = $4%"),
    ] {
        let (calls, plans) = stats(like);
        // Each group's first job is not run where it was asked by the short insert: a few
        // calls more or less than the jobs.
        assert!(calls >= JOBS - 2, "{what}: {calls} calls");
        // PostgreSQL's first five executions of a prepared statement get custom plans, then
        // the generic one is planned and kept: at most 6 plans on each of the agent's 8
        // pooled connections, however the jobs fall on them.
        assert!(
            plans <= 6 * 8,
            "{what} is planned at every execution: {plans} plans of {calls} calls"
        );
    }
}
