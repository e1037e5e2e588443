//! The cluster's failure handling (issue 14, "Failures"): a database restart under load, the
//! ready builds of a dead agent (run again on demand) and of an agent that came back (fetched
//! from it again), a group whose holder died (it starts clean elsewhere), the start-up pass
//! that heals a crash between a build's move to `ready/` and its record, and an agent taken for
//! dead while it was only frozen (its late end does not overwrite the job's re-run).
//!
//! Each test starts a throwaway PostgreSQL cluster (tests/common/postgres.rs) and agents with
//! `agent_timeout` 2s and `heartbeat` 500ms (tests/common/cluster.rs); it skips when
//! PostgreSQL is missing, failing under `CI`.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cluster::{agent, agent_with, get_artifacts, log_of, post_job, untar};
use common::server::{artifacts, job_id, read, Server};
use common::wait_for;
use postgres::Postgres;
use serde_json::{json, Value};

/// The BuildInfo of a 201 answer.
fn info_of(status: u16, text: &str) -> Value {
    assert_eq!(status, 201, "{text}");
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `POST /jobs` of project `simple` with `params` (and `group`, when not empty) on `s`: the
/// BuildInfo of its 201 answer.
fn job(s: &Server, group: &str, params: Value) -> Value {
    let mut body = json!({"project": "simple", "params": params});
    if !group.is_empty() {
        body["group"] = json!(group);
    }
    let (status, text) = post_job(s, &body);
    info_of(status, &text)
}

/// The log of the agent's `n`-th start (1: the first).
fn log_n(s: &Server, n: usize) -> String {
    std::fs::read_to_string(s.dir.path().join(format!("mistryd-{n}.log"))).unwrap_or_default()
}

/// How many times job `id` started on `s` (its `job started` log lines, over all its starts).
fn starts_of(s: &Server, id: &str) -> usize {
    (1..=4)
        .map(|n| {
            log_n(s, n)
                .lines()
                .filter(|l| l.contains("job started") && l.contains(id))
                .count()
        })
        .sum()
}

/// Whether agent `name` is alive by the database's clock (agent_timeout 2s, not stopped).
fn alive(pg: &Postgres, name: &str) -> bool {
    pg.psql(&format!(
        "SELECT stopped_at IS NULL AND last_heartbeat > now() - interval '2 seconds' \
         FROM agents WHERE name = '{name}'"
    )) == "t"
}

/// Wait until agent `name` is not alive (its heartbeats stopped for agent_timeout).
fn wait_dead(pg: &Postgres, name: &str) {
    wait_for(
        &format!("agent {name} not alive"),
        Duration::from_secs(10),
        || !alive(pg, name),
    );
}

/// The record of job `id`: `state|agent|retries`.
fn record(pg: &Postgres, id: &str) -> String {
    pg.psql(&format!(
        "SELECT state, coalesce(agent, ''), retries FROM jobs WHERE id = '{id}'"
    ))
}

/// `GET /artifacts/simple/<id>` of `s`, unpacked: path → content of every file.
fn artifacts_over_http(s: &Server, id: &str) -> BTreeMap<String, Vec<u8>> {
    let (status, body) = get_artifacts(s, "simple", id);
    assert_eq!(status, 200);
    untar(&body)
}

/// The artifacts a job of `simple` named `name` leaves, without a cache before it: its name
/// and a cache count of 1 (`params.txt` lists the params given).
fn expect_fresh_artifacts(files: &BTreeMap<String, Vec<u8>>, name: &str, params: &str) {
    let want: BTreeMap<String, Vec<u8>> = [
        ("count.txt", "1\n".as_bytes()),
        ("name.txt", name.as_bytes()),
        ("params.txt", params.as_bytes()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_vec()))
    .collect();
    assert_eq!(files, &want);
}

/// A `POST /jobs` that gives up after a minute (a request that hangs fails the test instead of
/// hanging it): its status and text.
fn post_with_timeout(s: &Server, body: &Value) -> (u16, String) {
    let agent = Server::agent_within(Duration::from_secs(60));
    let mut r = agent
        .post(&s.url("/jobs"))
        .send(body.to_string())
        .unwrap_or_else(|e| panic!("POST /jobs {body} to {}: {e}", s.addr));
    let status = r.status().as_u16();
    (status, r.body_mut().read_to_string().unwrap())
}

/// One answer of the load of [`restart_under_load`].
struct Answer {
    agent: usize,
    params: Value,
    sent: Instant,
    status: u16,
    text: String,
    /// `name.txt` of the answer's `Path`, read at once (201 only).
    name_txt: Option<String>,
}

/// A restart of the database (`pg_ctl stop -m fast`, `outage`, start) while four clients keep
/// asking three agents for jobs (new ones, slow ones, shared ones, repeats on another agent):
/// every answer is a successful BuildInfo or a 503 naming the database, every request sent
/// after the restart succeeds, and once the load is over every job asked for has exactly one
/// record, `ready`, run once in the cluster (no retry), its artifacts exact on the agent the
/// record names, and is a cache hit when asked again.
fn restart_under_load(agent_timeout: &str, outage: Duration) {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let servers = ["a1", "a2", "a3"]
        .map(|n| agent_with(&pg.url(), n, 2, json!({"agent_timeout": agent_timeout})));
    let stop = AtomicBool::new(false);
    // When the database was started again (None before).
    let restarted = std::sync::Mutex::new(None::<Instant>);
    let answers: Vec<Answer> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..4)
            .map(|t| {
                let (servers, stop) = (&servers, &stop);
                scope.spawn(move || {
                    let mut out = Vec::new();
                    let mut previous: Option<Value> = None;
                    let mut k = 0usize;
                    while !stop.load(Ordering::SeqCst) {
                        // New jobs, some slow enough to straddle the outage, jobs shared by
                        // the clients, and repeats of this client's last job on another agent.
                        let params = match (k % 3, &previous) {
                            (2, Some(p)) => p.clone(),
                            _ if k % 5 == 0 => json!({"name": format!("shared-{}", k / 5)}),
                            _ if k % 4 == 1 => json!({"name": format!("c{t}-{k}"), "sleep": "1"}),
                            _ => json!({"name": format!("c{t}-{k}")}),
                        };
                        let a = (t + k) % 3;
                        let sent = Instant::now();
                        let (status, text) = post_with_timeout(
                            &servers[a],
                            &json!({"project": "simple", "params": params}),
                        );
                        let name_txt = (status == 201).then(|| {
                            let info: Value = serde_json::from_str(&text)
                                .unwrap_or_else(|e| panic!("{e}: {text}"));
                            std::fs::read_to_string(artifacts(&info).join("name.txt"))
                                .unwrap_or_else(|e| format!("unreadable: {e}"))
                        });
                        out.push(Answer {
                            agent: a,
                            params: params.clone(),
                            sent,
                            status,
                            text,
                            name_txt,
                        });
                        previous = Some(params);
                        k += 1;
                        if status != 201 {
                            // The database is down: don't spin.
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                    out
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(2500));
        let stopping = Instant::now();
        pg.stop();
        std::thread::sleep(outage);
        pg.start();
        *restarted.lock().unwrap() = Some(Instant::now());
        eprintln!("the database was down for {:?}", stopping.elapsed());
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, Ordering::SeqCst);
        clients
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let restarted = restarted.lock().unwrap().unwrap();
    let prefix = format!("Service unavailable: the database at {}: ", pg.url());
    let (mut ok, mut unavailable, mut after) = (0, 0, 0);
    // params → job ID, by the 201 answers.
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    for a in &answers {
        let name = a.params["name"].as_str().unwrap();
        if a.sent > restarted {
            after += 1;
            assert_eq!(
                a.status, 201,
                "a request sent after the restart: {} {}",
                a.params, a.text
            );
        }
        match a.status {
            201 => {
                ok += 1;
                let info: Value = serde_json::from_str(&a.text).unwrap();
                assert_eq!(
                    (&info["ExitCode"], &info["ErrBuild"]),
                    (&json!(0), &json!("")),
                    "{info}"
                );
                assert!(
                    artifacts(&info).starts_with(servers[a.agent].builds()),
                    "{info}"
                );
                assert_eq!(a.name_txt.as_deref(), Some(name), "{info}");
                let log = info["ContainerStdouterr"].as_str().unwrap();
                assert!(
                    log.ends_with(&format!("out: {name}\nerr: {name}\n")),
                    "{log}"
                );
                let id = job_id(&info);
                let known = ids.entry(a.params.to_string()).or_insert(id.clone());
                assert_eq!(*known, id);
            }
            503 => {
                unavailable += 1;
                assert!(a.text.starts_with(&prefix), "{}", a.text);
            }
            other => panic!("answer {other} to {}: {}", a.params, a.text),
        }
    }
    assert!(
        ok >= 10 && unavailable >= 1 && after >= 4,
        "{ok} answered 201, {unavailable} 503, {after} sent after the restart"
    );
    // Once the load is over, nothing stays queued or running.
    wait_for("every job ended", Duration::from_secs(30), || {
        pg.psql("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')") == "0"
    });
    let names = ["a1", "a2", "a3"];
    for (params, id) in &ids {
        let p: Value = serde_json::from_str(params).unwrap();
        let name = p["name"].as_str().unwrap();
        let rec = pg.psql(&format!(
            "SELECT state, agent, retries, build_info->>'ExitCode' FROM jobs WHERE id = '{id}'"
        ));
        let fields: Vec<&str> = rec.split('|').collect();
        assert_eq!(
            (fields[0], fields[2], fields[3]),
            ("ready", "0", "0"),
            "{params}: {rec}; re-queues: {}",
            servers
                .iter()
                .flat_map(|s| log_of(s)
                    .lines()
                    .filter(|l| l.contains("queued again"))
                    .map(str::to_string)
                    .collect::<Vec<_>>())
                .collect::<Vec<_>>()
                .join("\n")
        );
        // Its one ready build on the agent the record names, with its exact artifacts; it ran
        // once in the whole cluster.
        let holder = names.iter().position(|n| *n == fields[1]).unwrap();
        let dir = servers[holder].builds().join("simple/ready").join(id);
        let mut files = BTreeMap::new();
        for f in ["count.txt", "name.txt", "params.txt"] {
            files.insert(
                f.to_string(),
                std::fs::read(dir.join("data/artifacts").join(f)).unwrap(),
            );
        }
        let listed = if p.get("sleep").is_some() {
            "name\nsleep\n"
        } else {
            "name\n"
        };
        expect_fresh_artifacts(&files, name, listed);
        let started: usize = servers.iter().map(|s| starts_of(s, id)).sum();
        assert_eq!(started, 1, "{params} ran {started} times");
    }
    // Every job the load asked for, again on another agent: a cache hit.
    for (i, (params, id)) in ids.iter().enumerate() {
        let p: Value = serde_json::from_str(params).unwrap();
        let info = job(&servers[i % 3], "", p.clone());
        assert_eq!(
            (&info["Cached"], &info["ExitCode"]),
            (&json!(true), &json!(0)),
            "{params}: {info}"
        );
        assert_eq!(&job_id(&info), id);
        assert_eq!(read(artifacts(&info).join("name.txt")), p["name"]);
    }
}

/// An outage (about 1.5 s) well within agent_timeout (10s): no agent is taken for dead.
#[test]
fn a_quick_database_restart_under_load_fails_cleanly_and_recovers() {
    restart_under_load("10s", Duration::ZERO);
}

/// An outage longer than agent_timeout: the heartbeats missed while the database was down say
/// nothing of the agents; none of their running jobs may be re-queued for them.
#[test]
fn a_long_database_outage_under_load_fails_cleanly_and_recovers() {
    restart_under_load("2s", Duration::from_secs(3));
}

#[test]
fn a_ready_build_of_a_dead_agent_is_run_again_on_demand() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let mut a = agent(&pg.url(), "a", 1);
    let b = agent(&pg.url(), "b", 1);
    let params = json!({"name": "orphan"});
    let built = job(&a, "", params.clone());
    assert_eq!(built["Cached"], false, "{built}");
    let id = job_id(&built);
    assert_eq!(record(&pg, &id), "ready|a|0");
    a.kill9();
    wait_dead(&pg, "a");
    // A's build is unavailable: B runs the job again.
    let again = job(&b, "", params.clone());
    assert_eq!(
        (&again["Cached"], &again["Coalesced"], &again["ExitCode"]),
        (&json!(false), &json!(false), &json!(0)),
        "{again}"
    );
    assert_eq!(job_id(&again), id);
    assert!(artifacts(&again).starts_with(b.builds()), "{again}");
    assert!(
        again["ContainerStdouterr"]
            .as_str()
            .unwrap()
            .ends_with("\nout: orphan\nerr: orphan\n"),
        "{again}"
    );
    expect_fresh_artifacts(&artifacts_over_http(&b, &id), "orphan", "name\n");
    assert_eq!(starts_of(&b, &id), 1);
    assert_eq!(record(&pg, &id), "ready|b|0");
    assert_eq!(pg.psql("SELECT count(*) FROM jobs"), "1");
    assert!(
        log_of(&b).contains("job queued again in the cluster"),
        "{}",
        log_of(&b)
    );
    // Asked again, B's new build is a cache hit.
    let hit = job(&b, "", params);
    assert_eq!(hit["Cached"], true, "{hit}");
    assert_eq!(starts_of(&b, &id), 1);
}

#[test]
fn a_ready_build_of_an_agent_that_came_back_is_fetched_from_it_again() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let mut a = agent(&pg.url(), "a", 1);
    let b = agent(&pg.url(), "b", 1);
    let params = json!({"name": "returns"});
    let built = job(&a, "", params.clone());
    let id = job_id(&built);
    assert_eq!(record(&pg, &id), "ready|a|0");
    // Killed, taken for dead, then started again (same name and build_path) before anyone
    // asks for the job.
    a.kill9();
    wait_dead(&pg, "a");
    a.spawn();
    assert!(alive(&pg, "a"));
    let hit = job(&b, "", params.clone());
    assert_eq!(
        (&hit["Cached"], &hit["Coalesced"], &hit["ExitCode"]),
        (&json!(true), &json!(false), &json!(0)),
        "{hit}"
    );
    assert_eq!(job_id(&hit), id);
    assert_eq!(hit["ContainerStdouterr"], built["ContainerStdouterr"]);
    assert!(artifacts(&hit).starts_with(b.builds()), "{hit}");
    expect_fresh_artifacts(&artifacts_over_http(&b, &id), "returns", "name\n");
    assert_eq!(starts_of(&b, &id), 0);
    assert_eq!(starts_of(&a, &id), 1);
    assert!(
        log_of(&b).contains("build replicated from another agent"),
        "{}",
        log_of(&b)
    );
    assert_eq!(record(&pg, &id), "ready|a|0");
    // The same after a graceful stop (the agent marked stopped) and a start.
    let params2 = json!({"name": "returns-2"});
    let id2 = job_id(&job(&a, "", params2.clone()));
    assert_eq!(record(&pg, &id2), "ready|a|0");
    assert!(a.term().success());
    assert!(!alive(&pg, "a"));
    a.spawn();
    let hit = job(&b, "", params2);
    assert_eq!(hit["Cached"], true, "{hit}");
    expect_fresh_artifacts(&artifacts_over_http(&b, &id2), "returns-2", "name\n");
    assert_eq!(starts_of(&b, &id2), 0);
    assert_eq!(record(&pg, &id2), "ready|a|0");
}

#[test]
fn a_group_whose_holder_died_starts_clean_on_another_agent() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let mut a = agent(&pg.url(), "a", 1);
    let b = agent(&pg.url(), "b", 1);
    let one = job(&a, "g", json!({"name": "one"}));
    let two = job(&a, "g", json!({"name": "two"}));
    assert_eq!(record(&pg, &job_id(&one)), "ready|a|0");
    assert_eq!(record(&pg, &job_id(&two)), "ready|a|0");
    assert_eq!(
        (&one["Incremental"], &two["Incremental"]),
        (&json!(false), &json!(true))
    );
    assert_eq!(read(artifacts(&two).join("count.txt")), "2\n");
    a.kill9();
    wait_dead(&pg, "a");
    // The group's next job, asked on B: A's chain is gone, B starts clean.
    let three = job(&b, "g", json!({"name": "three"}));
    assert_eq!(
        (&three["ExitCode"], &three["Incremental"], &three["Cached"]),
        (&json!(0), &json!(false), &json!(false)),
        "{three}"
    );
    assert_eq!(record(&pg, &job_id(&three)), "ready|b|0");
    assert!(artifacts(&three).starts_with(b.builds()));
    assert_eq!(read(artifacts(&three).join("count.txt")), "1\n");
    assert_eq!(read(artifacts(&three).join("name.txt")), "three");
    let line = format!(
        "starting clean (Incremental: false): agent a, holding the group's last build simple/{}, \
         is not alive",
        job_id(&two)
    );
    assert_eq!(log_of(&b).matches(&line).count(), 1, "{}", log_of(&b));
    // The chain goes on from B's build.
    let four = job(&b, "g", json!({"name": "four"}));
    assert_eq!(
        (&four["ExitCode"], &four["Incremental"]),
        (&json!(0), &json!(true)),
        "{four}"
    );
    assert_eq!(read(artifacts(&four).join("count.txt")), "2\n");
    assert_eq!(record(&pg, &job_id(&four)), "ready|b|0");
}

#[test]
fn the_start_up_pass_heals_a_crash_between_ready_and_the_record() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let mut a = agent(&pg.url(), "a", 2);
    // `lost` first: its record comes first in the table (the order heal() may see them in).
    let lost = job(&a, "", json!({"name": "lost"}));
    let healed = job(&a, "", json!({"name": "healed"}));
    let (healed_id, lost_id) = (job_id(&healed), job_id(&lost));
    let stored = pg.psql(&format!(
        "SELECT build_info::text FROM jobs WHERE id = '{healed_id}'"
    ));
    assert!(stored.contains("\"ExitCode\": 0"), "{stored}");
    // A crash: `healed` had moved to ready/ and `lost` had not when A died, and neither
    // record was updated.
    a.kill9();
    pg.psql(&format!(
        "UPDATE jobs SET state = 'running', agent = 'a', build_info = NULL, ended_at = NULL \
         WHERE id IN ('{healed_id}', '{lost_id}')"
    ));
    let simple = a.builds().join("simple");
    std::fs::rename(
        simple.join("ready").join(&lost_id),
        simple.join("pending").join(&lost_id),
    )
    .unwrap();
    a.spawn();
    wait_for("both records ended", Duration::from_secs(20), || {
        pg.psql("SELECT count(*) FROM jobs WHERE state = 'ready'") == "2"
    });
    // `healed` is recorded with A's BuildInfo, as it was, and did not run again.
    assert_eq!(record(&pg, &healed_id), "ready|a|0");
    assert_eq!(
        pg.psql(&format!(
            "SELECT build_info = '{}'::jsonb FROM jobs WHERE id = '{healed_id}'",
            stored.replace('\'', "''")
        )),
        "t",
        "{}",
        pg.psql(&format!(
            "SELECT build_info::text FROM jobs WHERE id = '{healed_id}'"
        ))
    );
    assert_eq!(starts_of(&a, &healed_id), 1);
    // `lost` was queued again and ran once more, here (the only agent).
    assert_eq!(record(&pg, &lost_id), "ready|a|1");
    assert_eq!(starts_of(&a, &lost_id), 2);
    let log2 = log_n(&a, 2);
    assert_eq!(
        log2.matches("recording a build a crash left unrecorded")
            .count(),
        1,
        "{log2}"
    );
    assert_eq!(
        log2.matches("queueing again a job a crash interrupted")
            .count(),
        1,
        "{log2}"
    );
    let relost = job(&a, "", json!({"name": "lost"}));
    assert_eq!(relost["Cached"], true);
    assert_eq!(read(artifacts(&relost).join("name.txt")), "lost");
    // Both are cache hits on another agent, fetched from A.
    let b = agent(&pg.url(), "b", 1);
    for (name, id) in [("healed", &healed_id), ("lost", &lost_id)] {
        let hit = job(&b, "", json!({"name": name}));
        assert_eq!(
            (&hit["Cached"], &hit["ExitCode"]),
            (&json!(true), &json!(0)),
            "{hit}"
        );
        assert_eq!(&job_id(&hit), id);
        expect_fresh_artifacts(&artifacts_over_http(&b, id), name, "name\n");
        assert_eq!(starts_of(&b, id), 0);
    }
}

#[test]
fn an_agent_taken_for_dead_while_frozen_does_not_overwrite_the_rerun() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg.url(), "a", 1);
    let b = agent(&pg.url(), "b", 1);
    let body = json!({"project": "simple", "params": {"name": "frozen", "sleep": "3"}});
    let (status, text) = a.post("/jobs?async", &body.to_string());
    assert_eq!(status, 201, "{text}");
    wait_for("the job running on a", Duration::from_secs(20), || {
        pg.psql("SELECT coalesce(agent, '') FROM jobs WHERE state = 'running'") == "a"
    });
    wait_for("its pending build", Duration::from_secs(20), || {
        a.pending_dirs("simple") > 0
    });
    // A freezes (SIGSTOP: no heartbeats, but its job goes on): B takes the job over.
    let pid = nix::unistd::Pid::from_raw(a.child.as_ref().unwrap().id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let answer = std::thread::scope(|scope| {
        let h = scope.spawn(|| post_with_timeout(&b, &body));
        wait_for("the job running on b", Duration::from_secs(20), || {
            pg.psql("SELECT coalesce(agent, '') FROM jobs WHERE state = 'running'") == "b"
        });
        // A thaws while B runs the job: A's run ends, the record is B's.
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
        h.join().unwrap()
    });
    let info = info_of(answer.0, &answer.1);
    assert_eq!(
        (&info["ExitCode"], &info["Coalesced"]),
        (&json!(0), &json!(true)),
        "{info}"
    );
    let id = job_id(&info);
    let log = info["ContainerStdouterr"].as_str().unwrap();
    assert!(log.contains("\nout: frozen\nerr: frozen\n"), "{log}");
    assert!(
        log.ends_with(
            "mistry: retried (retry 1): agent a stopped heartbeating while it ran this job; \
             agent b ran it again\n"
        ),
        "{log}"
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT state, agent, retries, retried_from FROM jobs WHERE id = '{id}'"
        )),
        "ready|b|1|a"
    );
    wait_for("a's late run fenced", Duration::from_secs(20), || {
        log_of(&a).contains("the job's run was fenced")
    });
    // Nothing of A's late end reached the record or the central log: one run's log, B's.
    assert_eq!(
        pg.psql(&format!(
            "SELECT state, agent, retries FROM jobs WHERE id = '{id}'"
        )),
        "ready|b|1"
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT string_agg(DISTINCT agent, ',') FROM job_logs WHERE id = '{id}'"
        )),
        "b"
    );
    let central = pg.psql(&format!(
        "SELECT convert_from(string_agg(data, ''::bytea ORDER BY pos), 'UTF8') FROM job_logs \
         WHERE id = '{id}' AND stream = 'stderr'"
    ));
    assert_eq!(central, "err: frozen");
    assert_eq!(starts_of(&a, &id), 1);
    assert_eq!(starts_of(&b, &id), 1);
    // A is alive again; its late build was discarded before it reached ready/ (fenced):
    // A answers with B's build, the one the record names.
    wait_for("a alive again", Duration::from_secs(10), || alive(&pg, "a"));
    let hit = job(&a, "", json!({"name": "frozen", "sleep": "3"}));
    assert_eq!(
        (&hit["Cached"], &hit["StartedAt"]),
        (&json!(true), &info["StartedAt"]),
        "{hit}"
    );
    assert_eq!(read(artifacts(&hit).join("name.txt")), "frozen");
}

#[test]
fn a_job_that_ends_while_the_database_is_down_is_recorded_when_it_is_back() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    // agent_timeout 10s: the outage takes nobody for dead.
    let [a, b] = ["a", "b"].map(|n| agent_with(&pg.url(), n, 1, json!({"agent_timeout": "10s"})));
    let params = json!({"name": "outage", "sleep": "2"});
    let body = json!({"project": "simple", "params": params});
    let (status, text) = a.post("/jobs?async", &body.to_string());
    assert_eq!(status, 201, "{text}");
    wait_for("the job running on a", Duration::from_secs(20), || {
        pg.psql("SELECT coalesce(agent, '') FROM jobs WHERE state = 'running'") == "a"
    });
    wait_for("its pending build", Duration::from_secs(20), || {
        a.pending_dirs("simple") > 0
    });
    pg.stop();
    // The job ends while the database is down: its build waits (pending) until the fence
    // can be checked — it is not published, and a request for it is a 503 meanwhile.
    wait_for("the job ended on a", Duration::from_secs(20), || {
        log_of(&a).contains("its build waits for the database before it is published")
    });
    let ready = a.builds().join("simple/ready");
    assert_eq!(std::fs::read_dir(&ready).map_or(0, Iterator::count), 0);
    let (status, text) = post_job(&a, &json!({"project": "simple", "params": params}));
    assert_eq!(status, 503, "{text}");
    pg.start();
    wait_for(
        "the job's build published and recorded",
        Duration::from_secs(20),
        || {
            std::fs::read_dir(&ready).is_ok_and(|d| d.count() == 1)
                && pg.psql("SELECT state FROM jobs") == "ready"
        },
    );
    let hit = job(&a, "", params.clone());
    assert_eq!(
        (&hit["Cached"], &hit["ExitCode"]),
        (&json!(true), &json!(0)),
        "{hit}"
    );
    let id = job_id(&hit);
    wait_for("the job's end recorded", Duration::from_secs(20), || {
        record(&pg, &id) == "ready|a|0"
    });
    assert!(
        log_of(&a).contains("shipping the job's log to the database failed; retrying"),
        "{}",
        log_of(&a)
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT build_info->>'ExitCode', build_info->>'StartedAt' = '{}' FROM jobs \
             WHERE id = '{id}'",
            hit["StartedAt"].as_str().unwrap()
        )),
        "0|t"
    );
    // Its whole log reached the database.
    let central = pg.psql(&format!(
        "SELECT convert_from(string_agg(data, ''::bytea ORDER BY pos), 'UTF8') FROM job_logs \
         WHERE id = '{id}' AND stream = 'stderr'"
    ));
    assert_eq!(central, "err: outage");
    // B gets it from A.
    let fetched = job(&b, "", params);
    assert_eq!(fetched["Cached"], true, "{fetched}");
    assert_eq!(starts_of(&b, &id), 0);
    expect_fresh_artifacts(&artifacts_over_http(&b, &id), "outage", "name\nsleep\n");
}

/// A job run again elsewhere while an agent holding a copy of its old build was down: that copy
/// goes when the agent starts again (the end's notification was missed), and its next answer is
/// the new build.
#[test]
fn a_copy_made_stale_while_its_agent_was_down_goes_at_start() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg.url(), "a", 1);
    let mut b = agent(&pg.url(), "b", 1);
    let params = json!({"name": "renewed"});
    let built = job(&a, "", params.clone());
    let id = job_id(&built);
    let copy = job(&b, "", params.clone());
    assert_eq!(copy["Cached"], true, "{copy}");
    assert_eq!(copy["StartedAt"], built["StartedAt"]);
    let held = b.builds().join("simple/ready").join(&id);
    assert!(held.join("build_info.json").is_file());
    // B stops; A rebuilds the job meanwhile.
    assert!(b.term().success());
    let (status, text) = post_job(
        &a,
        &json!({"project": "simple", "params": params, "rebuild": true}),
    );
    let rebuilt = info_of(status, &text);
    assert_eq!(rebuilt["Cached"], false, "{rebuilt}");
    assert_ne!(rebuilt["StartedAt"], built["StartedAt"]);
    // B starts again: its copy of the old build goes, and B answers with the new one.
    b.spawn();
    wait_for("B's stale copy gone", Duration::from_secs(20), || {
        log_n(&b, 2).contains("a stale copy went: the job ran again on another agent")
    });
    assert_eq!(log_n(&b, 2).matches("a stale copy went").count(), 1);
    let again = job(&b, "", params);
    assert_eq!(
        (&again["Cached"], &again["StartedAt"]),
        (&json!(true), &rebuilt["StartedAt"]),
        "{again}"
    );
    assert_eq!(starts_of(&b, &id), 0);
    // A's own build is no copy: it stays.
    assert!(!log_of(&a).contains("a stale copy went"));
}
