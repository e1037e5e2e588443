//! Several agents under faults (issue 22): one published build per job, whatever pauses,
//! partitions or loses a reply. Each numbered fault of the issue has a test here:
//!
//! 1. a rebuild on another agent is what every agent serves afterwards (its old copy,
//!    even a group's link target, is never answered again);
//! 2. an agent cut off from the database longer than `agent_timeout` while it runs a job comes
//!    back with a late build that is fenced: discarded, never served (the SIGSTOP variant is
//!    `cluster_failures.rs`' frozen agent);
//! 3. a reply lost between PostgreSQL's commit of a new job and the agent (a TCP proxy the test
//!    controls, `common/pgproxy.rs`) leaves nothing stuck, and (5) the client is answered with
//!    the build, not a 503; a lost reply to a job's end publishes it once;
//! 4. a restart of PostgreSQL longer than `agent_timeout` does not move a group's chain;
//!
//! and a job that keeps losing its agent fails after `job_attempts`, with a clear error; a
//! rebuild while an end's reply is lost leaves one build; a thawed agent that claims its own
//! job again publishes one build.
//! `faults_in_a_row_keep_the_invariants` runs the faults one after another under requests and
//! checks the invariants after each heals.
//!
//! Agents have `agent_timeout` 2s and `heartbeat` 500ms (tests/common/cluster.rs); each test
//! skips when PostgreSQL is missing, failing under `CI`.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/pgproxy.rs"]
mod pgproxy;
#[path = "common/postgres.rs"]
mod postgres;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cluster::{agent, agent_with, get_artifacts, log_of, post_job, untar};
use common::server::{job_id, Server};
use common::wait_for;
use pgproxy::PgProxy;
use postgres::Postgres;
use serde_json::{json, Value};

/// The BuildInfo of a 201 answer.
fn info_of(status: u16, text: &str) -> Value {
    assert_eq!(status, 201, "{text}");
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn body(group: &str, params: Value) -> Value {
    let mut body = json!({"project": "simple", "params": params});
    if !group.is_empty() {
        body["group"] = json!(group);
    }
    body
}

/// `POST /jobs` of project `simple` on `s`: the BuildInfo of its 201 answer.
fn job(s: &Server, group: &str, params: Value) -> Value {
    let (status, text) = post_job(s, &body(group, params));
    info_of(status, &text)
}

/// `POST /jobs` of `body` on `s`, again while the answer is a 503 (the database coming back),
/// for at most 20 s: the BuildInfo of its 201 answer.
fn job_retrying(s: &Server, body: &Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, text) = post_job(s, body);
        if status != 503 || Instant::now() > deadline {
            return info_of(status, &text);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET /artifacts/simple/<id>` of `s`, unpacked: path → content of every file.
fn artifacts_over_http(s: &Server, id: &str) -> BTreeMap<String, Vec<u8>> {
    let (status, body) = get_artifacts(s, "simple", id);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    untar(&body)
}

fn text(files: &BTreeMap<String, Vec<u8>>, name: &str) -> String {
    String::from_utf8_lossy(files.get(name).map_or(&[][..], Vec::as_slice)).into_owned()
}

/// The record of job `id`: `state|agent|retries`.
fn record(pg: &Postgres, id: &str) -> String {
    pg.psql(&format!(
        "SELECT state, coalesce(agent, ''), retries FROM jobs WHERE id = '{id}'"
    ))
}

/// The `StartedAt` of the build in `s`'s `ready/<id>` (`None`: none there).
fn started_here(s: &Server, id: &str) -> Option<String> {
    let text = std::fs::read_to_string(
        s.builds()
            .join("simple/ready")
            .join(id)
            .join("build_info.json"),
    )
    .ok()?;
    let info: Value = serde_json::from_str(&text).ok()?;
    info["StartedAt"].as_str().map(str::to_string)
}

/// How many times job `id` started on `s` (its `job started` log lines).
fn starts_of(s: &Server, id: &str) -> usize {
    log_of(s)
        .lines()
        .filter(|l| l.contains("job started") && l.contains(id))
        .count()
}

/// Wait until the only running record is on agent `name`.
fn wait_running_on(pg: &Postgres, name: &str) {
    wait_for(
        &format!("a job running on {name}"),
        Duration::from_secs(20),
        || {
            pg.psql("SELECT string_agg(coalesce(agent, ''), ',') FROM jobs WHERE state = 'running'")
                == name
        },
    );
}

/// No record is left queued or running.
fn nothing_in_flight(pg: &Postgres) -> bool {
    pg.psql("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')") == "0"
}

/// Fault 1: a job built on A (a group's, so A's group link points at it), then rebuilt on B
/// (A is full): A answers B's build afterwards — its BuildInfo and its artifacts, over the
/// API and over HTTP — and never its own old one.
#[test]
fn a_rebuild_on_another_agent_is_what_every_agent_serves() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg.url(), "a", 1);
    let b = agent(&pg.url(), "b", 1);
    let params = json!({"name": "renewed"});
    let built = job(&a, "g", params.clone());
    let id = job_id(&built);
    assert_eq!(text(&artifacts_over_http(&a, &id), "count.txt"), "1\n");
    // A is full: the rebuild, asked of B, runs on B.
    let busy = body("", json!({"name": "busy", "sleep": "6"}));
    let (status, t) = a.post("/jobs?async", &busy.to_string());
    assert_eq!(status, 201, "{t}");
    wait_running_on(&pg, "a");
    let mut again = body("g", params.clone());
    again["rebuild"] = json!(true);
    let (status, t) = post_job(&b, &again);
    let rebuilt = info_of(status, &t);
    assert_eq!(
        (&rebuilt["Cached"], &rebuilt["ExitCode"]),
        (&json!(false), &json!(0)),
        "{rebuilt}"
    );
    assert_ne!(rebuilt["StartedAt"], built["StartedAt"]);
    assert_eq!(record(&pg, &id), "ready|b|0");
    let published = artifacts_over_http(&b, &id);
    // Every agent answers the record's build now.
    for s in [&a, &b] {
        let hit = job(s, "g", params.clone());
        assert_eq!(
            (&hit["StartedAt"], &hit["ExitCode"]),
            (&rebuilt["StartedAt"], &json!(0)),
            "{hit}"
        );
        assert_eq!(artifacts_over_http(s, &id), published);
    }
    assert_eq!(
        started_here(&a, &id),
        rebuilt["StartedAt"].as_str().map(str::to_string)
    );
}

/// Fault 2, through a partition: A, cut off from the database (a proxy) for 3 × agent_timeout
/// while it runs a job, is taken for dead; B runs the job again and publishes it. A's run ends
/// during the partition; when it heals, A's end is refused (fenced: the record moved on to
/// B's attempt) and A's build is discarded: A serves B's build, and the record, the central
/// log and every agent agree on one build.
#[test]
fn a_partitioned_agent_that_comes_back_never_serves_its_late_build() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let proxy = PgProxy::start(pg.port);
    let a = agent(&proxy.url(), "a", 1);
    let b = agent(&pg.url(), "b", 1);
    let params = json!({"name": "cut", "sleep": "3"});
    let (status, t) = a.post("/jobs?async", &body("", params.clone()).to_string());
    assert_eq!(status, 201, "{t}");
    wait_running_on(&pg, "a");
    wait_for("its pending build", Duration::from_secs(20), || {
        a.pending_dirs("simple") > 0
    });
    proxy.partition();
    let cut = Instant::now();
    // B takes the job over once A looks dead, and answers with its own run.
    let published = job(&b, "", params.clone());
    let id = job_id(&published);
    assert_eq!(record(&pg, &id), "ready|b|1");
    let left = Duration::from_secs(6).saturating_sub(cut.elapsed());
    std::thread::sleep(left);
    // A's run ended meanwhile: its build waits for the fence, unpublished.
    wait_for("A's run ended", Duration::from_secs(20), || {
        log_of(&a).contains("its build waits for the database before it is published")
    });
    assert_eq!(started_here(&a, &id), None);
    proxy.heal();
    wait_for("A's late end fenced", Duration::from_secs(30), || {
        log_of(&a).contains("fenced")
    });
    let hit = job(&a, "", params);
    assert_eq!(
        (&hit["StartedAt"], &hit["ExitCode"]),
        (&published["StartedAt"], &json!(0)),
        "{hit}"
    );
    assert_eq!(record(&pg, &id), "ready|b|1");
    assert_eq!(
        pg.psql(&format!(
            "SELECT string_agg(DISTINCT agent, ',') FROM job_logs WHERE id = '{id}'"
        )),
        "b"
    );
    assert_eq!(
        started_here(&a, &id),
        published["StartedAt"].as_str().map(str::to_string)
    );
    assert!(nothing_in_flight(&pg));
}

/// Faults 3 and 5: PostgreSQL commits A's insert of a new job and the reply is lost (the
/// connection drops): the client is answered with the build (201, exit 0), not a 503; the
/// job ran once and no record is left in flight.
#[test]
fn a_lost_reply_to_a_new_jobs_insert_is_answered_once_and_leaves_nothing_stuck() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let proxy = PgProxy::start(pg.port);
    let a = agent(&proxy.url(), "a", 1);
    let b = agent(&pg.url(), "b", 1);
    // A has no image recorded yet: the whole placement statement inserts (the short one,
    // tried first, inserts nothing).
    proxy.lose_reply_to("WITH qfull AS");
    let started = Instant::now();
    let (status, t) = post_job(&a, &body("", json!({"name": "lost"})));
    assert_eq!(proxy.lost(), 1, "the insert's reply was not lost");
    let info = info_of(status, &t);
    assert_eq!(info["ExitCode"], 0, "{info}");
    let id = job_id(&info);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        pg.psql(&format!("SELECT state FROM jobs WHERE id = '{id}'")),
        "ready"
    );
    assert_eq!(starts_of(&a, &id) + starts_of(&b, &id), 1);
    assert!(nothing_in_flight(&pg));
    // Asked again anywhere: the same build.
    let hit = job(&b, "", json!({"name": "lost"}));
    assert_eq!(hit["StartedAt"], info["StartedAt"], "{hit}");

    // A has the project's image now: its next new job is inserted by the short statement
    // (`records::jobs::insert_here`), whose reply is lost the same way.
    assert_eq!(
        pg.psql("SELECT string_agg(agent, ',' ORDER BY agent) FROM agent_images"),
        "a"
    );
    // New connections: the statement's text goes through again (a Parse), and is seen.
    proxy.cut_all();
    proxy.lose_reply_to("WITH mine AS");
    let (status, t) = post_job(&a, &body("", json!({"name": "lost again"})));
    assert_eq!(proxy.lost(), 2, "the second insert's reply was not lost");
    let again = info_of(status, &t);
    assert_eq!(again["ExitCode"], 0, "{again}");
    let id = job_id(&again);
    assert_eq!(
        pg.psql(&format!(
            "SELECT state || ' ' || agent FROM jobs WHERE id = '{id}'"
        )),
        "ready a"
    );
    assert_eq!(starts_of(&a, &id) + starts_of(&b, &id), 1);
    assert!(nothing_in_flight(&pg));
}

/// A lost reply to the statement that records a job's end: the end is recorded once, the
/// build stays published (the agent does not take its own recorded end for a fenced one).
#[test]
fn a_lost_reply_to_a_jobs_end_publishes_it_once() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let proxy = PgProxy::start(pg.port);
    let a = agent(&proxy.url(), "a", 1);
    proxy.lose_reply_to("build_info = $5::text::jsonb");
    let info = job(&a, "", json!({"name": "ended"}));
    // Counted when the proxy's thread reads the reply, which a loaded machine may run after
    // the answer came through the end's notification.
    wait_for("the end's reply lost", Duration::from_secs(10), || {
        proxy.lost() == 1
    });
    let id = job_id(&info);
    assert_eq!(record(&pg, &id), "ready|a|0");
    assert_eq!(
        started_here(&a, &id),
        info["StartedAt"].as_str().map(str::to_string)
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT build_info->>'StartedAt' FROM jobs WHERE id = '{id}'"
        )),
        info["StartedAt"].as_str().unwrap()
    );
    assert!(!log_of(&a).contains("fenced"), "{}", log_of(&a));
    let hit = job(&a, "", json!({"name": "ended"}));
    assert_eq!(
        (&hit["Cached"], &hit["StartedAt"]),
        (&json!(true), &info["StartedAt"])
    );
}

/// A job's end is recorded and its reply lost; its agent A is cut off before it asks again,
/// and meanwhile the job is rebuilt on B. When A comes back, its end — recorded, but an
/// attempt ago — is fenced: A's build goes, and every agent serves the rebuild.
#[test]
fn a_rebuild_while_an_ends_reply_is_lost_leaves_one_build() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let proxy = PgProxy::start(pg.port);
    let a = agent(&proxy.url(), "a", 1);
    let b = agent(&pg.url(), "b", 1);
    proxy.lose_reply_to("build_info = $5::text::jsonb");
    let params = json!({"name": "lostend"});
    let (status, t) = a.post("/jobs?async", &body("", params.clone()).to_string());
    assert_eq!(status, 201, "{t}");
    // A asks again a second after the loss: cut off before.
    wait_for("the end's reply lost", Duration::from_secs(30), || {
        proxy.lost() == 1
    });
    proxy.partition();
    let id = pg.psql("SELECT id FROM jobs WHERE project = 'simple'");
    assert_eq!(record(&pg, &id), "ready|a|0");
    let first = pg.psql(&format!(
        "SELECT build_info->>'StartedAt' FROM jobs WHERE id = '{id}'"
    ));
    let mut again = body("", params.clone());
    again["rebuild"] = json!(true);
    let (status, t) = post_job(&b, &again);
    let rebuilt = info_of(status, &t);
    assert_eq!(
        (&rebuilt["Cached"], &rebuilt["ExitCode"]),
        (&json!(false), &json!(0)),
        "{rebuilt}"
    );
    assert_ne!(rebuilt["StartedAt"], json!(first));
    assert_eq!(record(&pg, &id), "ready|b|0");
    proxy.heal();
    wait_for("A's end fenced", Duration::from_secs(30), || {
        log_of(&a).contains("the job's end was fenced")
    });
    let hit = job(&a, "", params);
    assert_eq!(
        (&hit["StartedAt"], &hit["ExitCode"]),
        (&rebuilt["StartedAt"], &json!(0)),
        "{hit}"
    );
    assert_eq!(artifacts_over_http(&a, &id), artifacts_over_http(&b, &id));
    assert_eq!(
        started_here(&a, &id),
        rebuilt["StartedAt"].as_str().map(str::to_string)
    );
    assert_eq!(record(&pg, &id), "ready|b|0");
}

/// A frozen agent claims its own job again: A (SIGSTOP, longer than agent_timeout) is taken for
/// dead while it runs a job, the job is queued again (B is busy, so nobody else takes it), A
/// thaws and claims it while its first run still runs. The new claim joins that run, which is
/// fenced at its end (the record is a later attempt's): its build is never published, the
/// claim goes back to the queue and runs the job afresh. One build, the record's, served.
#[test]
fn a_thawed_agent_that_claims_its_own_job_again_publishes_one_build() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg.url(), "a", 2);
    let b = agent(&pg.url(), "b", 1);
    // B gets the image, then a long job: it takes nothing else.
    assert_eq!(job(&b, "", json!({"name": "warm"}))["ExitCode"], 0);
    let (status, t) = b.post(
        "/jobs?async",
        &body("", json!({"name": "busy", "sleep": "60"})).to_string(),
    );
    assert_eq!(status, 201, "{t}");
    wait_running_on(&pg, "b");
    let params = json!({"name": "again", "sleep": "10"});
    let (status, t) = a.post("/jobs?async", &body("", params.clone()).to_string());
    assert_eq!(status, 201, "{t}");
    wait_for("the job running on a", Duration::from_secs(20), || {
        pg.psql("SELECT count(*) FROM jobs WHERE state = 'running' AND agent = 'a'") == "1"
    });
    let id = pg.psql("SELECT id FROM jobs WHERE state = 'running' AND agent = 'a'");
    wait_for("its pending build", Duration::from_secs(20), || {
        a.pending_dirs("simple") > 0
    });
    let pid = nix::unistd::Pid::from_raw(a.child.as_ref().unwrap().id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    wait_for("the job queued again", Duration::from_secs(20), || {
        record(&pg, &id) == "queued||1"
    });
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_for(
        "the job claimed again by a",
        Duration::from_secs(20),
        || record(&pg, &id) == "running|a|1",
    );
    // The first run ends (10 s after it started), fenced; the job runs again, then ends.
    let info = job(&a, "", params);
    assert_eq!(info["ExitCode"], 0, "{info}");
    assert_eq!(job_id(&info), id);
    assert_eq!(record(&pg, &id), "ready|a|1");
    let recorded = pg.psql(&format!(
        "SELECT build_info->>'StartedAt' FROM jobs WHERE id = '{id}'"
    ));
    assert_eq!(info["StartedAt"], json!(recorded));
    assert_eq!(started_here(&a, &id), Some(recorded));
    assert!(
        log_of(&a).contains("the job's run was fenced"),
        "the first run was not fenced"
    );
    assert_eq!(
        starts_of(&a, &id),
        2,
        "the job ran twice on a: its first run, then afresh"
    );
    assert_eq!(starts_of(&b, &id), 0);
}

/// Fault 4: a restart of PostgreSQL longer than agent_timeout (every heartbeat looks expired
/// when it is back) does not move a group's chain off the agent holding its last build: the
/// next build of the group follows it (incremental, cache count 2) wherever it is asked.
#[test]
fn a_database_restart_does_not_move_a_groups_chain() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg.url(), "a", 1);
    let b = agent(&pg.url(), "b", 1);
    let first = job(&a, "chain", json!({"name": "c1"}));
    assert_eq!(record(&pg, &job_id(&first)), "ready|a|0");
    pg.stop();
    std::thread::sleep(Duration::from_secs(3));
    pg.start();
    let next = job_retrying(&b, &body("chain", json!({"name": "c2"})));
    let id = job_id(&next);
    assert_eq!(
        (&next["Incremental"], &next["ExitCode"]),
        (&json!(true), &json!(0)),
        "{next}"
    );
    assert_eq!(text(&artifacts_over_http(&b, &id), "count.txt"), "2\n");
    assert!(!log_of(&a).contains("starting clean") && !log_of(&b).contains("starting clean"));
}

/// A job that keeps losing its agent (here: each agent running it is killed) runs at most
/// `job_attempts` times, then fails with an error that says so in its BuildInfo — answered
/// to the client waiting for it.
#[test]
fn a_job_that_keeps_losing_its_agent_fails_after_its_attempts() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let attempts = json!({"job_attempts": 2});
    let mut agents: Vec<Server> = ["a", "b", "c"]
        .iter()
        .map(|n| agent_with(&pg.url(), n, 1, attempts.clone()))
        .collect();
    let params = json!({"name": "doomed", "sleep": "60"});
    let (status, t) = agents[0].post("/jobs?async", &body("", params.clone()).to_string());
    assert_eq!(status, 201, "{t}");
    wait_running_on(&pg, "a");
    agents[0].kill9();
    wait_for("the job taken over", Duration::from_secs(20), || {
        matches!(
            pg.psql("SELECT coalesce(agent, '') FROM jobs WHERE state = 'running'")
                .as_str(),
            "b" | "c"
        )
    });
    let second = pg.psql("SELECT agent FROM jobs WHERE state = 'running'");
    let (killed, survivor) = if second == "b" { (1, 2) } else { (2, 1) };
    std::thread::scope(|scope| {
        let s = &agents[survivor];
        let waiter = scope.spawn(|| post_job(s, &body("", params.clone())));
        std::thread::sleep(Duration::from_millis(500));
        // Kill the second agent running it (not the survivor, which waits).
        let pid = nix::unistd::Pid::from_raw(pg_agent_pid(&agents, killed) as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        let (status, t) = waiter.join().unwrap();
        let info = info_of(status, &t);
        let err = info["ErrBuild"].as_str().unwrap_or_default();
        assert!(
            err.contains("lost its agent 2 times") && err.contains("job_attempts"),
            "{info}"
        );
        assert_eq!(info["ExitCode"], -1, "{info}");
    });
    assert_eq!(
        pg.psql("SELECT state, retries FROM jobs WHERE request->'params'->>'name' = 'doomed'"),
        "failed|1"
    );
    let _ = &mut agents;
}

fn pg_agent_pid(agents: &[Server], i: usize) -> u32 {
    agents[i].child.as_ref().unwrap().id()
}

// ---------------------------------------------------------------- faults in a row

/// A client's HTTP agent: at most 120 s per request.
fn client() -> ureq::Agent {
    Server::agent_within(Duration::from_secs(120))
}

/// `POST /jobs` of `body` to the agent at `base` as a careful client does: again after a 503
/// or a transport error (asking again is safe: it joins the job), for at most 90 s. The
/// BuildInfo of the 201 answer; any other status fails the test.
fn post_retrying(base: &str, body: &Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    let agent = client();
    loop {
        let answer = agent
            .post(&format!("{base}/jobs"))
            .send(body.to_string())
            .map(|mut r| {
                (
                    r.status().as_u16(),
                    r.body_mut().read_to_string().unwrap_or_default(),
                )
            });
        match answer {
            Ok((201, text)) => return serde_json::from_str(&text).unwrap(),
            Ok((503, text)) if Instant::now() < deadline => {
                eprintln!("503 from {base} (retrying): {text}");
            }
            Err(e) if Instant::now() < deadline => eprintln!("{base}: {e} (retrying)"),
            Ok((status, text)) => panic!("POST /jobs {body} to {base}: {status} {text}"),
            Err(e) => panic!("POST /jobs {body} to {base}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET /artifacts/<project>/<id>` of the agent at `base`, unpacked.
fn artifacts_at(base: &str, project: &str, id: &str) -> BTreeMap<String, Vec<u8>> {
    let mut r = client()
        .get(&format!("{base}/artifacts/{project}/{id}"))
        .call()
        .unwrap();
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_vec().unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    untar(&body)
}

/// How many of the chain's builds followed another (see [`check_invariants`]).
static CHAIN_LINKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One request of the load and its answer.
struct Answered {
    body: Value,
    info: Value,
}

/// The load of one phase, on the agents at `bases`: three clients posting three new jobs each
/// (sleeping 1 s, over the agents in turn), one identical job asked of every agent at once,
/// and a group's chain of three builds one after the other.
fn load(bases: &[String], phase: &str) -> Vec<Answered> {
    let n = bases.len();
    let mut plan: Vec<Vec<(String, Value)>> = (0..3)
        .map(|c| {
            (0..3)
                .map(|k| {
                    let params = json!({"name": format!("{phase}-c{c}-{k}"), "sleep": "1"});
                    (bases[(c + k) % n].clone(), body("", params))
                })
                .collect()
        })
        .collect();
    for b in bases {
        let shared = json!({"name": format!("{phase}-shared"), "sleep": "1"});
        plan.push(vec![(b.clone(), body("", shared))]);
    }
    plan.push(
        (0..3)
            .map(|k| {
                let body = json!({"project": "chain", "group": "chain",
                                  "params": {"name": format!("{phase}-g{k}")}});
                (bases[k % n].clone(), body)
            })
            .collect(),
    );
    std::thread::scope(|scope| {
        let clients: Vec<_> = plan
            .into_iter()
            .map(|requests| {
                scope.spawn(move || {
                    requests
                        .into_iter()
                        .map(|(base, body)| Answered {
                            info: post_retrying(&base, &body),
                            body,
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect()
    })
}

/// The invariants once a fault healed: no record left in flight; every answer a success whose
/// build is the one its record names; every agent answers each job with that build, the same
/// bytes; the group's chain linear (each build follows the one before it: its `prev.txt` is
/// that build's `me.txt` — or, when it says it started clean, is empty). `chain` is the
/// token of the chain's last build.
fn check_invariants(pg: &Postgres, bases: &[String], answers: &[Answered], chain: &mut String) {
    wait_for("no record in flight", Duration::from_secs(60), || {
        nothing_in_flight(pg)
    });
    let mut jobs: BTreeMap<(String, String), &Value> = BTreeMap::new();
    for a in answers {
        assert_eq!(a.info["ExitCode"], 0, "{}", a.info);
        let id = job_id(&a.info);
        let recorded = pg.psql(&format!(
            "SELECT state || ' ' || (build_info->>'StartedAt') FROM jobs WHERE id = '{id}'"
        ));
        assert_eq!(
            recorded,
            format!("ready {}", a.info["StartedAt"].as_str().unwrap()),
            "an answer is not the build its record names: {}",
            a.info
        );
        let project = a.body["project"].as_str().unwrap().to_string();
        jobs.insert((project, id), &a.body);
    }
    for ((project, id), body) in &jobs {
        let started = pg.psql(&format!(
            "SELECT build_info->>'StartedAt' FROM jobs WHERE id = '{id}'"
        ));
        let mut seen: Option<BTreeMap<String, Vec<u8>>> = None;
        for base in bases {
            let info = post_retrying(base, body);
            assert_eq!(info["StartedAt"], json!(started), "{base}: {info}");
            let files = artifacts_at(base, project, id);
            if let Some(s) = &seen {
                assert_eq!(&files, s, "{base} serves other bytes for job {id}");
            }
            seen = Some(files);
        }
    }
    let mut chain_builds: Vec<&Answered> = answers
        .iter()
        .filter(|a| a.body["group"] == "chain")
        .collect();
    chain_builds.sort_by_key(|a| a.body["params"]["name"].as_str().unwrap().to_string());
    for a in chain_builds {
        let files = artifacts_at(&bases[0], "chain", &job_id(&a.info));
        let prev = String::from_utf8_lossy(&files["prev.txt"])
            .trim()
            .to_string();
        let want = if a.info["Incremental"] == true {
            chain.clone()
        } else {
            String::new()
        };
        assert_eq!(prev, want, "the chain forked or skipped: {}", a.info);
        *chain = String::from_utf8_lossy(&files["me.txt"]).trim().to_string();
        if a.info["Incremental"] == true {
            CHAIN_LINKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The agent running the most jobs now (once some run), by index (`a` is 0).
fn busiest(pg: &Postgres) -> usize {
    wait_for("jobs running", Duration::from_secs(20), || {
        pg.psql("SELECT count(*) FROM jobs WHERE state = 'running'") != "0"
    });
    let name = pg.psql(
        "SELECT agent FROM jobs WHERE state = 'running' GROUP BY agent ORDER BY count(*) DESC, agent LIMIT 1",
    );
    usize::from(name.as_bytes()[0] - b'a')
}

/// The load of `phase` on the agents at `bases`, with `fault` applied to the busiest agent
/// once jobs run (it returns once the fault healed): that agent and the answers.
fn under_fault(
    pg: &Postgres,
    bases: &[String],
    phase: &str,
    fault: impl FnOnce(usize),
) -> (usize, Vec<Answered>) {
    std::thread::scope(|scope| {
        let h = scope.spawn(|| load(bases, phase));
        let x = busiest(pg);
        fault(x);
        (x, h.join().unwrap())
    })
}

/// Faults one after another, each under load, the invariants checked once it healed: an
/// agent frozen (SIGSTOP) longer than agent_timeout while it runs jobs; an agent cut off
/// from the database (a partition) for 3 × agent_timeout; an agent whose traffic to the
/// database stalls that long (delivered late, no connection cut); a lost reply to a new job's insert
/// and to a job's end; an agent killed (kill -9) while it runs jobs, then started again;
/// PostgreSQL crashed and restarted (`pg_ctl restart -m immediate`) with an outage longer
/// than agent_timeout. Clients ask again after a 503 or a dropped connection, as the docs
/// tell them to (docs/cluster.md, "Semantics").
#[test]
fn faults_in_a_row_keep_the_invariants() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let proxies: Vec<PgProxy> = (0..3).map(|_| PgProxy::start(pg.port)).collect();
    let mut agents: Vec<Server> = ["a", "b", "c"]
        .iter()
        .zip(&proxies)
        .map(|(n, p)| agent(&p.url(), n, 2))
        .collect();
    let bases = |agents: &[Server]| -> Vec<String> { agents.iter().map(|s| s.url("")).collect() };
    let pid = |s: &Server| nix::unistd::Pid::from_raw(s.child.as_ref().unwrap().id() as i32);
    let signal = nix::sys::signal::kill;
    use nix::sys::signal::Signal::{SIGCONT, SIGKILL, SIGSTOP};
    let mut chain = String::new();

    // 1. An agent frozen while it runs jobs, longer than agent_timeout.
    let all = bases(&agents);
    let (x, answers) = under_fault(&pg, &all, "stop", |x| {
        signal(pid(&agents[x]), SIGSTOP).unwrap();
        std::thread::sleep(Duration::from_secs(6));
        signal(pid(&agents[x]), SIGCONT).unwrap();
    });
    check_invariants(&pg, &all, &answers, &mut chain);
    // The fault did bite: the frozen agent's runs went to others, and its late ends were
    // fenced.
    assert_ne!(pg.psql("SELECT sum(retries) FROM jobs"), "0");
    assert!(
        log_of(&agents[x]).contains("fenced"),
        "{}",
        log_of(&agents[x])
    );

    // 2. An agent cut off from the database for 3 × agent_timeout.
    let retried = pg.psql("SELECT sum(retries) FROM jobs");
    let fenced = |s: &Server| log_of(s).matches("fenced").count();
    let before: Vec<usize> = agents.iter().map(fenced).collect();
    let (x, answers) = under_fault(&pg, &all, "cut", |x| {
        proxies[x].partition();
        std::thread::sleep(Duration::from_secs(6));
        proxies[x].heal();
    });
    check_invariants(&pg, &all, &answers, &mut chain);
    assert_ne!(pg.psql("SELECT sum(retries) FROM jobs"), retried);
    assert!(fenced(&agents[x]) > before[x], "{}", log_of(&agents[x]));

    // 2b. An agent's traffic to the database stalls (nothing delivered, no connection cut)
    //     for 3 × agent_timeout, then goes through late.
    let (x, answers) = under_fault(&pg, &all, "stall", |x| {
        proxies[x].stall();
        std::thread::sleep(Duration::from_secs(6));
        proxies[x].heal();
    });
    check_invariants(&pg, &all, &answers, &mut chain);
    eprintln!("stalled agent {x}: {} fenced", fenced(&agents[x]));

    // 3. Lost replies: to a new job's insert on A, to a job's end on B.
    // Statements are prepared once per connection: new connections send their text again.
    proxies[0].cut_all();
    proxies[1].cut_all();
    proxies[0].lose_reply_to("INSERT INTO jobs (project, id, group_name");
    proxies[1].lose_reply_to("build_info = $5::text::jsonb");
    let answers = load(&all, "lost");
    assert_eq!(
        (proxies[0].lost(), proxies[1].lost()),
        (1, 1),
        "the replies were not lost"
    );
    check_invariants(&pg, &all, &answers, &mut chain);

    // 4. C killed while it runs jobs (the load goes to A and B, which queue what they cannot
    //    run for C to claim), then started again.
    let x = 2;
    let answers = std::thread::scope(|scope| {
        let h = scope.spawn(|| load(&all[..2], "kill"));
        let _ = std::panic::catch_unwind(|| {
            wait_for("a job running on c", Duration::from_secs(10), || {
                pg.psql("SELECT count(*) FROM jobs WHERE state = 'running' AND agent = 'c'") != "0"
            });
        });
        signal(pid(&agents[x]), SIGKILL).unwrap();
        h.join().unwrap()
    });
    check_invariants(&pg, &all[..2], &answers, &mut chain);
    agents[x].kill9();
    agents[x].spawn();
    let all = bases(&agents);
    let answers = load(&all, "killed");
    check_invariants(&pg, &all, &answers, &mut chain);

    // 5. PostgreSQL crashes and comes back after longer than agent_timeout.
    let (_, answers) = under_fault(&pg, &all, "pg", |_| {
        pg.stop_immediate();
        std::thread::sleep(Duration::from_secs(3));
        pg.start();
    });
    check_invariants(&pg, &all, &answers, &mut chain);
    // Most of the chain's builds followed the one before (a few may start clean: their
    // holder was frozen, cut off or killed).
    let links = CHAIN_LINKS.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        links >= 8,
        "only {links} of the chain's 21 builds followed another"
    );
}

/// A client that goes away while its new job's insert waits for its answer (the statement
/// executed, its reply held by the proxy): the request is dropped mid-insert. The slot it held
/// is given back — the agent's only one: a later job runs there at once — and the record the
/// statement made, an orphan nobody runs, goes back to the queue and runs once.
#[test]
fn a_request_dropped_mid_insert_gives_its_slot_back_and_its_record_runs_once() {
    use std::io::Write;
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let proxy = PgProxy::start(pg.port);
    let a = agent(&proxy.url(), "a", 1);
    // The project's image recorded for A: its new jobs are inserted `running` by A.
    job(&a, "", json!({"name": "warm"}));

    // New connections: the insert's text goes through again (a Parse), and is seen.
    proxy.cut_all();
    proxy.delay_reply_to(
        "INSERT INTO jobs (project, id, group_name",
        Duration::from_secs(3),
    );
    let request = body("", json!({"name": "abandoned"})).to_string();
    let mut stream = std::net::TcpStream::connect(&a.addr).unwrap();
    write!(
        stream,
        "POST /jobs HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{request}",
        a.addr,
        request.len()
    )
    .unwrap();
    // The insert is committed, its reply held; the client goes away meanwhile.
    wait_for("the insert's reply held", Duration::from_secs(10), || {
        proxy.holding() == 1
    });
    drop(stream);
    wait_for("the held reply", Duration::from_secs(10), || {
        proxy.delayed() == 1
    });

    // The slot came back: the next job runs on A (its only slot) within seconds.
    let started = Instant::now();
    let mut answer = client()
        .post(&a.url("/jobs"))
        .send(body("", json!({"name": "after"})).to_string().as_str())
        .unwrap_or_else(|e| panic!("the job after the dropped request got no answer: {e}"));
    let text = answer.body_mut().read_to_string().unwrap();
    let after = info_of(answer.status().as_u16(), &text);
    assert_eq!(after["ExitCode"], 0, "{after}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    // The dropped request's record: back to the queue (no run of it had started), then run
    // once, by A.
    let id = pg.psql("SELECT id FROM jobs WHERE request->'params'->>'name' = 'abandoned'");
    assert_eq!(id.len(), 64, "no record of the dropped request: {id:?}");
    wait_for(
        "the dropped request's job to end",
        Duration::from_secs(20),
        || pg.psql(&format!("SELECT state FROM jobs WHERE id = '{id}'")) == "ready",
    );
    assert_eq!(starts_of(&a, &id), 1);
    assert!(
        log_of(&a)
            .lines()
            .any(|l| l.contains("job claimed") && !l.contains("taken by") && l.contains(&id)),
        "the dropped request's job was not claimed from the queue:\n{}",
        log_of(&a)
    );
    assert!(nothing_in_flight(&pg));
}
