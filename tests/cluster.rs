//! Several mistryd agents around one PostgreSQL (issue 14, the foundation): start-up against the
//! database (migrations, errors), registration, heartbeats, liveness and `/agents`.
//!
//! Each test starts a throwaway PostgreSQL cluster (tests/common/postgres.rs; as mistry-test
//! when the tests run as root) and skips when PostgreSQL is missing, failing under `CI`.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::time::{Duration, Instant};

use cluster::{agent, log_of, run_mistryd, run_mistryd_named};
use common::server::Server;
use common::wait_for;
use postgres::Postgres;
use serde_json::{json, Value};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `GET /agents` as JSON.
fn agents(s: &Server) -> Vec<Value> {
    let (status, text) = s.get("/agents", true);
    assert_eq!(status, 200, "{text}");
    serde_json::from_str::<Vec<Value>>(&text).unwrap()
}

fn by_name<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no agent {name} in {list:?}"))
}

#[test]
fn three_agents_register_and_each_lists_all_of_them() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let servers = [
        agent(&pg.url(), "a1", 1),
        agent(&pg.url(), "a2", 2),
        agent(&pg.url(), "a3", 3),
    ];
    for s in &servers {
        let list = agents(s);
        let names: Vec<&str> = list.iter().map(|a| a["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["a1", "a2", "a3"], "{list:?}");
        for (a, server) in list.iter().zip(&servers) {
            assert_eq!(a["advertise_url"], format!("http://{}", server.addr));
            assert_eq!(a["version"], VERSION);
            assert_eq!(a["alive"], true, "{a}");
            assert_eq!(a["state"], "alive");
            assert_eq!(a["running"], 0);
            assert_eq!(a["this"], server.addr == s.addr);
        }
        let capacities: Vec<i64> = list
            .iter()
            .map(|a| a["capacity"].as_i64().unwrap())
            .collect();
        assert_eq!(capacities, [1, 2, 3]);
    }
    // The heartbeats carry the jobs running: a job on a2 shows on a1's list.
    servers[1].start_slow_job("slow", "5");
    wait_for(
        "a2 running 1 job, seen from a1",
        Duration::from_secs(10),
        || by_name(&agents(&servers[0]), "a2")["running"] == 1,
    );
    assert_eq!(
        pg.psql("SELECT name, running, capacity FROM agents ORDER BY name"),
        "a1|0|1\na2|1|2\na3|0|3"
    );
    // Without asking for JSON, /agents is the web view.
    let (status, html) = servers[2].get("/agents", false);
    assert_eq!(status, 200);
    assert!(html.contains("<title>mistry</title>"), "{html}");
}

#[test]
fn a_gracefully_stopped_agent_is_marked_stopped() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a1 = agent(&pg.url(), "a1", 1);
    let mut a2 = agent(&pg.url(), "a2", 1);
    assert!(a2.term().success());
    let a = agents(&a1);
    let a2_row = by_name(&a, "a2");
    assert_eq!(
        (&a2_row["alive"], &a2_row["state"], &a2_row["running"]),
        (&json!(false), &json!("stopped"), &json!(0)),
        "{a2_row}"
    );
    assert_eq!(
        pg.psql("SELECT name FROM agents WHERE stopped_at IS NOT NULL"),
        "a2"
    );
    // Restarted under the same name, it takes its row over and is alive again.
    a2.spawn();
    let a = agents(&a1);
    assert_eq!(by_name(&a, "a2")["state"], "alive");
    assert_eq!(
        by_name(&a, "a2")["advertise_url"],
        format!("http://{}", a2.addr)
    );
    assert_eq!(pg.psql("SELECT count(*) FROM agents"), "2");
}

#[test]
fn a_killed_agent_turns_stale_after_agent_timeout() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a1 = agent(&pg.url(), "a1", 1);
    let mut a2 = agent(&pg.url(), "a2", 1);
    let mut a3 = agent(&pg.url(), "a3", 1);
    // Heartbeats keep an agent alive well past agent_timeout (2s).
    std::thread::sleep(Duration::from_secs(3));
    assert!(agents(&a1).iter().all(|a| a["alive"] == true));
    a2.kill9();
    let killed = Instant::now();
    wait_for("a2 stale", Duration::from_secs(10), || {
        by_name(&agents(&a3), "a2")["alive"] == false
    });
    let stale_after = killed.elapsed();
    // Its last heartbeat was at most 500ms before the kill: stale 1.5s to 2s after it.
    assert!(
        stale_after >= Duration::from_millis(1400) && stale_after < Duration::from_secs(4),
        "a2 turned stale {stale_after:?} after kill -9"
    );
    for s in [&a1, &a3] {
        let list = agents(s);
        let a2_row = by_name(&list, "a2");
        assert_eq!(a2_row["state"], "stale", "{a2_row}");
        assert!(a2_row["heartbeat_age"].as_f64().unwrap() >= 2.0, "{a2_row}");
        assert_eq!(by_name(&list, "a1")["alive"], true);
        assert_eq!(by_name(&list, "a3")["alive"], true);
    }
    // kill -9 leaves no trace but the missing heartbeats: the row is not marked stopped.
    assert_eq!(
        pg.psql("SELECT count(*) FROM agents WHERE stopped_at IS NOT NULL"),
        "0"
    );
    a3.kill9();
}

#[test]
fn migrations_apply_once_and_a_newer_schema_is_refused() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let mut a1 = agent(&pg.url(), "a1", 1);
    let history = pg.psql("SELECT version, name, applied_on FROM mistry_schema_history");
    let rows: Vec<&str> = history.lines().collect();
    assert_eq!(rows.len(), 6, "{history}");
    assert!(rows[0].starts_with("1|agents|"), "{history}");
    assert!(rows[1].starts_with("2|jobs|"), "{history}");
    assert!(rows[2].starts_with("3|logs|"), "{history}");
    assert!(rows[3].starts_with("4|images|"), "{history}");
    assert!(rows[4].starts_with("5|recent|"), "{history}");
    assert!(rows[5].starts_with("6|attempts|"), "{history}");
    assert!(log_of(&a1).contains("database migration applied"));
    // A second agent, and the first one again, find the schema up to date.
    let a2 = agent(&pg.url(), "a2", 1);
    assert!(a1.term().success());
    a1.spawn();
    assert_eq!(
        pg.psql("SELECT version, name, applied_on FROM mistry_schema_history"),
        history
    );
    assert!(!log_of(&a2).contains("database migration applied"));
    assert!(
        !std::fs::read_to_string(a1.dir.path().join("mistryd-2.log"))
            .unwrap()
            .contains("database migration applied")
    );
    assert_eq!(
        pg.psql("SELECT string_agg(name, ',' ORDER BY name) FROM agents"),
        "a1,a2"
    );
    // A database migrated by a newer mistryd: this one refuses to start.
    pg.psql(
        "INSERT INTO mistry_schema_history (version, name, applied_on, checksum) \
         VALUES (7, 'future', '2030-01-01T00:00:00Z', '1')",
    );
    let (code, stderr) = run_mistryd(&pg.url(), None);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or(""),
        "mistryd: the database schema is version 7, newer than this mistryd (6): upgrade mistryd",
        "{stderr}"
    );
}

#[test]
fn an_unreachable_database_stops_the_start_with_one_line() {
    // No PostgreSQL needed: nothing listens on the port.
    let (_held, port) = common::closed_port();
    let url = format!("postgres://mistry@127.0.0.1:{port}/mistry");
    let (code, stderr) = run_mistryd(&url, None);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or(""),
        format!(
            "mistryd: cannot reach the database at {url}: error connecting to server: \
             Connection refused (os error 111)"
        ),
        "{stderr}"
    );
    // MISTRY_DATABASE_URL wins over the file, and a password is never shown.
    let (_held2, port2) = common::closed_port();
    let (code, stderr) = run_mistryd(
        &url,
        Some(&format!(
            "postgres://mistry:hunter2@127.0.0.1:{port2}/mistry"
        )),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or(""),
        format!(
            "mistryd: cannot reach the database at postgres://mistry:***@127.0.0.1:{port2}/mistry: \
             error connecting to server: Connection refused (os error 111)"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// Each agent's last heartbeat, by the database's clock (microseconds since the epoch).
fn heartbeats(pg: &Postgres) -> Vec<(String, i64)> {
    pg.psql(
        "SELECT name, (EXTRACT(EPOCH FROM last_heartbeat) * 1000000)::bigint FROM agents \
         ORDER BY name",
    )
    .lines()
    .map(|l| {
        let (name, t) = l.split_once('|').unwrap();
        (name.to_string(), t.parse().unwrap())
    })
    .collect()
}

#[test]
fn heartbeats_resume_after_a_database_restart() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let mut a1 = agent(&pg.url(), "a1", 1);
    let mut a2 = agent(&pg.url(), "a2", 1);
    let before = heartbeats(&pg);
    assert_eq!(before.len(), 2);
    pg.stop();
    // The agents live on; /agents says the database is unavailable.
    std::thread::sleep(Duration::from_millis(1500));
    let (status, text) = a1.get("/agents", true);
    assert_eq!(status, 503, "{text}");
    assert_eq!(
        text,
        format!(
            "the database at {}: error connecting to server: Connection refused (os error 111)",
            pg.url()
        )
    );
    assert_eq!(a1.get("/", false).0, 200);
    for s in [&mut a1, &mut a2] {
        assert!(s.child.as_mut().unwrap().try_wait().unwrap().is_none());
    }
    assert!(log_of(&a1).contains("heartbeat failed"), "{}", log_of(&a1));
    pg.start();
    // Both heartbeat again: last_heartbeat advances past its value before the outage.
    wait_for(
        "heartbeats after the restart",
        Duration::from_secs(15),
        || {
            let now = heartbeats(&pg);
            now.len() == 2 && now.iter().zip(&before).all(|(n, b)| n.1 > b.1 + 1_000_000)
        },
    );
    let list = agents(&a2);
    assert!(list.iter().all(|a| a["alive"] == true), "{list:?}");
    wait_for("the resumption logged", Duration::from_secs(5), || {
        log_of(&a1).contains("heartbeats resumed")
    });
}

/// The web view's agents page, from the job list's header: alive and stale agents, this one
/// marked.
#[test]
fn the_agents_page_shows_alive_and_stale_agents() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a1 = agent(&pg.url(), "a1", 1);
    let _a2 = agent(&pg.url(), "a2", 2);
    let mut a3 = agent(&pg.url(), "a3", 3);
    a3.kill9();
    wait_for("a3 stale", Duration::from_secs(10), || {
        by_name(&agents(&a1), "a3")["alive"] == false
    });
    let b = common::browser::Browser::start();
    b.goto(&a1.url("/"));
    b.wait(
        "the job list",
        "return !!document.getElementById('jobs')",
        Duration::from_secs(10),
    );
    b.click("#nav-agents");
    b.wait(
        "the agents page with three agents",
        "return document.querySelectorAll('#agents tr').length === 3",
        Duration::from_secs(10),
    );
    assert_eq!(b.eval("return location.pathname"), "/agents");
    let rows = b.eval(
        "return [...document.querySelectorAll('#agents tr')].map((tr) => \
         [...tr.children].slice(0, 4).map((td) => td.textContent).join('|'))",
    );
    assert_eq!(
        rows,
        json!(["a1 (this one)|alive|0|1", "a2|alive|0|2", "a3|stale|0|3"])
    );
    assert_eq!(
        b.eval("return document.getElementById('agents-note').textContent"),
        "2 of 3 agents alive."
    );
    assert_eq!(
        b.eval("return document.querySelector('tr[data-agent=a3] td:nth-child(2)').className"),
        "agent-stale"
    );
}

#[test]
fn a_second_live_agent_with_the_same_name_is_refused() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let mut twin = agent(&pg.url(), "twin", 1);
    let first_url = twin.url("");
    let (code, stderr) = run_mistryd_named(&pg.url(), None, "twin");
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or(""),
        format!(
            "mistryd: another live agent is named twin (at {first_url}): give this one its own \
             agent_name, or stop that one"
        ),
        "{stderr}"
    );
    // The first one is untouched: still registered at its own URL.
    assert_eq!(
        pg.psql("SELECT advertise_url FROM agents WHERE name = 'twin'"),
        first_url
    );
    // Killed (its row still alive by its heartbeat, its address silent): the name is taken
    // over by a restart on another address, with a warning.
    twin.kill9();
    let again = agent(&pg.url(), "twin", 1);
    assert!(
        log_of(&again).contains(
            "this agent's name was alive at another address, which does not answer: taken over"
        ),
        "{}",
        log_of(&again)
    );
    assert_eq!(
        pg.psql("SELECT advertise_url FROM agents WHERE name = 'twin'"),
        again.url("")
    );
}

/// `mistryd doctor` with the configuration `config`: its exit code and stdout.
fn doctor(config: &std::path::Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(common::mistryd_bin())
        .args(["--config", config.to_str().unwrap(), "doctor"])
        .env_remove("MISTRY_DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The doctor's lines about the database (they start with the level and name it).
fn database_lines(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.contains("database") || l.contains("agent name") || l.contains("agent named"))
        .map(std::string::ToString::to_string)
        .collect()
}

#[test]
fn the_doctor_checks_the_database_schema_and_name() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let write = |url: &str, name: &str| {
        std::fs::write(
            &config,
            json!({
                "projects_path": dir.path(),
                "build_path": dir.path(),
                "database_url": url,
                "agent_name": name,
            })
            .to_string(),
        )
        .unwrap();
    };
    // A fresh database: reachable, not migrated yet, the name free.
    write(&pg.url(), "doc");
    let (_, out) = doctor(&config);
    let version = pg.psql("SHOW server_version");
    assert_eq!(
        database_lines(&out),
        [
            format!(
                "ok    database {}: PostgreSQL {version}, in the clear",
                pg.url()
            ),
            "ok    database schema: not created yet (mistryd's start applies its 6 migrations)"
                .to_string(),
            "ok    agent name doc: free".to_string(),
        ],
        "{out}"
    );
    // An agent of that name runs: migrated, and the name is warned about.
    let s = agent(&pg.url(), "doc", 1);
    let (_, out) = doctor(&config);
    assert_eq!(
        database_lines(&out)[1..],
        [
            "ok    database schema version 6, up to date".to_string(),
            format!(
                "warn  an agent named doc heartbeated lately, at {}  — if it is another running \
                 mistryd, give this one its own agent_name (a second live agent of a name is \
                 refused)",
                s.url("")
            ),
        ],
        "{out}"
    );
    // A newer schema fails the check; an unreachable database too.
    pg.psql(
        "INSERT INTO mistry_schema_history (version, name, applied_on, checksum) \
         VALUES (9, 'future', '2030-01-01T00:00:00Z', '1')",
    );
    write(&pg.url(), "other");
    let (code, out) = doctor(&config);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(
            "FAIL  database schema version 9, newer than this mistryd (6)  — upgrade mistryd"
        ),
        "{out}"
    );
    write("postgres://mistry:secret@127.0.0.1:1/mistry", "other");
    let (code, out) = doctor(&config);
    assert_eq!(code, Some(1), "{out}");
    let line = database_lines(&out).join("\n");
    assert!(
        line.starts_with(
            "FAIL  cannot reach the database at postgres://mistry:***@127.0.0.1:1/mistry: "
        ),
        "{out}"
    );
    assert!(!out.contains("secret"), "{out}");
}
