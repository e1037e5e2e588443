//! Central job logs (issue 14): agents on one throwaway PostgreSQL (tests/common/postgres.rs)
//! ship the logs of the jobs they run to the database as they are produced, so that another
//! agent's `/log` (live), `/job`, `/api/logtail` and web view show them; `log_retention`
//! prunes them.
//!
//! Each test skips when PostgreSQL is missing, failing under `CI`. The Chromium test runs as
//! root only, as tests/web.rs does.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::io::BufRead;
use std::time::{Duration, Instant};

use cluster::log_of;
use common::server::{job_id, Server};
use common::wait_for;
use postgres::Postgres;
use serde_json::{json, Value};

/// An agent named `name`: heartbeat 500ms, agent_timeout 15s (a loaded machine must not make
/// an agent look dead here), and `extra` settings.
fn agent(pg: &Postgres, name: &str, mut extra: Value) -> Server {
    if let Some(e) = extra.as_object_mut() {
        e.entry("agent_timeout").or_insert_with(|| json!("15s"));
    }
    cluster::agent_with(&pg.url(), name, 2, extra)
}

/// Queue `body` on `s` (`?async`) and wait until the database says it runs on agent `name`;
/// returns its ID.
fn start_on(pg: &Postgres, s: &Server, name: &str, body: &Value) -> String {
    let (status, text) = s.post("/jobs?async", &body.to_string());
    assert_eq!(status, 201, "{text}");
    let project = body["project"].as_str().unwrap();
    let mut id = String::new();
    wait_for("the job running", Duration::from_secs(30), || {
        id = pg.psql(&format!(
            "SELECT id FROM jobs WHERE project = '{project}' AND state = 'running' \
             AND agent = '{name}'"
        ));
        !id.is_empty()
    });
    id
}

fn state_of(pg: &Postgres, project: &str, id: &str) -> String {
    pg.psql(&format!(
        "SELECT state FROM jobs WHERE project = '{project}' AND id = '{id}'"
    ))
}

fn ready_file(s: &Server, project: &str, id: &str, name: &str) -> Vec<u8> {
    std::fs::read(s.builds().join(project).join("ready").join(id).join(name)).unwrap_or_default()
}

/// `GET /api/logtail/...` of `s`: (status, x-log-size, body bytes).
fn logtail(s: &Server, project: &str, id: &str, bytes: Option<u64>) -> (u16, String, Vec<u8>) {
    let q = bytes.map(|n| format!("?bytes={n}")).unwrap_or_default();
    let mut r = Server::agent()
        .get(&s.url(&format!("/api/logtail/{project}/{id}{q}")))
        .call()
        .unwrap();
    let size = r
        .headers()
        .get("x-log-size")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let status = r.status().as_u16();
    (status, size, r.body_mut().read_to_vec().unwrap())
}

fn job_json(s: &Server, project: &str, id: &str) -> Value {
    let (status, text) = s.get(&format!("/job/{project}/{id}"), true);
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_job_on_one_agent_is_followed_live_and_read_whole_from_another() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg, "a", json!({}));
    let b = agent(&pg, "b", json!({}));
    let id = start_on(&pg, &a, "a", &json!({"project": "ticker"}));

    // B's /log follows it live: the lines come while it runs, in order, once each, and the
    // stream ends when the job does.
    let mut r = Server::agent()
        .get(&b.url(&format!("/log/ticker/{id}")))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut data = Vec::new();
    let mut first_job_line = None;
    let mut state_at_first_line = String::new();
    for line in std::io::BufReader::new(r.body_mut().as_reader()).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data:") {
            let d = d.strip_prefix(' ').unwrap_or(d).to_string();
            if first_job_line.is_none() && d.contains("line 1") {
                first_job_line = Some(Instant::now());
                state_at_first_line = state_of(&pg, "ticker", &id);
            }
            data.push(d);
        }
    }
    let ended = Instant::now();
    assert_eq!(
        state_at_first_line,
        "running",
        "the first line came while the job ran: {data:?}\n{}",
        log_of(&b)
    );
    let first = first_job_line.expect("no job line");
    assert!(
        ended - first >= Duration::from_millis(2000),
        "the ticker prints for 3 s: the lines came as they were printed ({:?})",
        ended - first
    );
    assert_eq!(
        state_of(&pg, "ticker", &id),
        "ready",
        "the stream ended with the job"
    );
    let job_lines: Vec<&String> = data
        .iter()
        .filter(|l| l.starts_with("\u{1b}[32mline "))
        .collect();
    let expected: Vec<String> = (1..=8)
        .map(|i| format!("\u{1b}[32mline {i}\u{1b}[0m"))
        .collect();
    assert_eq!(job_lines, expected.iter().collect::<Vec<_>>(), "{data:?}");
    // Every line of A's out.log, once, in order.
    let out = ready_file(&a, "ticker", &id, "out.log");
    assert!(!out.is_empty());
    assert_eq!(
        format!("{}\n", data.join("\n")),
        String::from_utf8(out.clone()).unwrap()
    );

    // B has no copy of the build: what it shows comes from the database.
    assert!(!b.builds().join("ticker/ready").join(&id).exists());
    // B's /job: the same log as A's out.log (and stderr.log), byte for byte.
    let on_b = job_json(&b, "ticker", &id);
    assert_eq!(on_b["state"], "ready", "{on_b}");
    assert_eq!(on_b["id"], id.as_str());
    assert_eq!(on_b["project"], "ticker");
    let info = &on_b["buildInfo"];
    assert_eq!(info["ExitCode"], 0, "{on_b}");
    assert_eq!(
        info["ContainerStdouterr"].as_str().unwrap().as_bytes(),
        &out[..]
    );
    let stderr = ready_file(&a, "ticker", &id, "stderr.log");
    assert_eq!(
        info["ContainerStderr"].as_str().unwrap_or("").as_bytes(),
        &stderr[..]
    );
    // A's own /job says the same.
    let on_a = job_json(&a, "ticker", &id);
    assert_eq!(
        on_a["buildInfo"]["ContainerStdouterr"],
        info["ContainerStdouterr"]
    );
    assert_eq!(on_a["startedAt"], on_b["startedAt"]);
    // /api/job (the web view's) too, without the logs.
    let (status, text) = b.get(&format!("/api/job/ticker/{id}"), false);
    assert_eq!(status, 200, "{text}");
    let api: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(api["state"], "ready");
    assert_eq!(api["buildInfo"]["URL"], format!("job/ticker/{id}"));
    // The HTML page exists on B.
    assert_eq!(b.get(&format!("/job/ticker/{id}"), false).0, 200);

    // B's /api/logtail: the exact tail for bytes=N, and x-log-size.
    let size = out.len() as u64;
    for n in [0, 1, 7, 100, size - 1, size, size + 10] {
        let (status, got_size, body) = logtail(&b, "ticker", &id, Some(n));
        assert_eq!(status, 200);
        assert_eq!(got_size, size.to_string());
        let from = out.len().saturating_sub(n as usize);
        assert_eq!(body, &out[from..], "bytes={n}");
    }
    let (_, _, whole) = logtail(&b, "ticker", &id, None);
    assert_eq!(whole, out);
    // A job that is nowhere.
    let nowhere = "0".repeat(64);
    assert_eq!(logtail(&b, "ticker", &nowhere, None).0, 404);
    assert_eq!(b.get(&format!("/job/ticker/{nowhere}"), true).0, 404);
    assert_eq!(b.get(&format!("/api/job/ticker/{nowhere}"), false).0, 404);
    // Not in flight: 204, as on a single node.
    let r = Server::agent()
        .get(&b.url(&format!("/log/ticker/{id}")))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);

    // The chunks: keyed by offsets, contiguous, none duplicated.
    let rows = pg.psql(&format!(
        "SELECT count(*), sum(octet_length(data)), count(DISTINCT agent),
                bool_and(pos = COALESCE(prev_end, 0))
           FROM (SELECT pos, data, agent,
                        lag(pos + octet_length(data)) OVER (ORDER BY pos) AS prev_end
                   FROM job_logs WHERE id = '{id}' AND stream = 'out') c"
    ));
    let cols: Vec<&str> = rows.split('|').collect();
    assert!(
        cols[0].parse::<u32>().unwrap() >= 2,
        "shipped as it ran: {rows}"
    );
    assert_eq!(cols[1], size.to_string(), "{rows}");
    assert_eq!(cols[2], "1", "{rows}");
    assert_eq!(cols[3], "t", "{rows}");
}

#[test]
fn a_big_log_is_shipped_in_chunks_and_read_back_equal() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg, "a", json!({}));
    let b = agent(&pg, "b", json!({}));
    let bytes = 6 << 20;
    let info = a.job(json!({"project": "loud", "params": {"bytes": bytes.to_string()}}));
    assert_eq!(info["ExitCode"], 0, "{info}");
    let id = &job_id(&info);
    let out = ready_file(&a, "loud", id, "out.log");
    assert!(out.len() >= bytes, "{}", out.len());
    // Chunks of at most 64 KiB.
    let rows = pg.psql(&format!(
        "SELECT count(*), max(octet_length(data)), sum(octet_length(data))
           FROM job_logs WHERE id = '{id}' AND stream = 'out'"
    ));
    let cols: Vec<u64> = rows.split('|').map(|c| c.parse().unwrap()).collect();
    assert!(cols[0] >= (bytes as u64) / 65536, "{rows}");
    assert!(cols[1] <= 65536, "{rows}");
    assert_eq!(cols[2], out.len() as u64, "{rows}");
    // Read back from B, whole and as a tail.
    let (status, size, whole) = logtail(&b, "loud", id, None);
    assert_eq!(status, 200);
    assert_eq!(size, out.len().to_string());
    assert!(whole == out, "the whole log read back differs");
    let (_, _, tail) = logtail(&b, "loud", id, Some(100_000));
    assert!(tail == out[out.len() - 100_000..], "the tail differs");
    let on_b = job_json(&b, "loud", id);
    assert!(
        on_b["buildInfo"]["ContainerStdouterr"]
            .as_str()
            .unwrap()
            .as_bytes()
            == &out[..],
        "B's /job log differs"
    );
    assert!(!b.builds().join("loud/ready").join(id).exists());
}

#[test]
fn a_short_jobs_log_is_recorded_with_its_end_in_one_statement() {
    // A job that ends before its log's first shipping (`log_ship_every`) writes its log with
    // its end record: one transaction (the chunks' `at` is the record's `ended_at`, both now() of
    // it), not four statements.
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    // Shipping every hour: the job ends before its first shipping, however loaded the machine.
    let a = agent(&pg, "a", json!({"log_ship_every": "1h"}));
    let b = agent(&pg, "b", json!({}));
    // The image first (its build's output makes the first job's log long and slow).
    let warm = a.job(json!({"project": "simple", "params": {"name": "warm"}}));
    assert_eq!(warm["ExitCode"], 0, "{warm}");
    let info = a.job(json!({"project": "simple", "params": {"name": "short"}}));
    assert_eq!(info["ExitCode"], 0, "{info}");
    let id = &job_id(&info);
    let out = ready_file(&a, "simple", id, "out.log");
    let err = ready_file(&a, "simple", id, "stderr.log");
    assert_eq!(err, b"err: short\n");
    let rows = pg.psql(&format!(
        "SELECT l.stream, l.pos, octet_length(l.data), l.at = j.ended_at, l.agent
           FROM job_logs l JOIN jobs j USING (project, id)
          WHERE l.project = 'simple' AND l.id = '{id}' ORDER BY l.stream"
    ));
    assert_eq!(
        rows,
        format!("out|0|{}|t|a\nstderr|0|{}|t|a", out.len(), err.len()),
        "one chunk per stream, written with the end record"
    );
    // Another agent reads it back equal.
    let (status, _, whole) = logtail(&b, "simple", id, None);
    assert_eq!(status, 200);
    assert!(whole == out, "the log read back from B differs");
    assert_eq!(
        job_json(&b, "simple", id)["buildInfo"]["ContainerStderr"],
        "err: short\n"
    );
}

#[test]
fn a_new_run_replaces_the_previous_runs_log() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg, "a", json!({}));
    let b = agent(&pg, "b", json!({}));
    let body = json!({"project": "simple", "params": {"name": "twice"}});
    let first = a.job(body.clone());
    let id = &job_id(&first);
    let runs = || {
        pg.psql(&format!(
            "SELECT count(DISTINCT run), sum(octet_length(data)) FROM job_logs \
             WHERE id = '{id}' AND stream = 'out'"
        ))
    };
    let size = ready_file(&a, "simple", id, "out.log").len();
    assert_eq!(runs(), format!("1|{size}"));
    let mut again = body.clone();
    again["rebuild"] = json!(true);
    let second = a.job(again);
    assert_eq!(second["Cached"], false, "{second}");
    // One run's chunks, the new one's: B shows A's out.log of the rebuild.
    let out = ready_file(&a, "simple", id, "out.log");
    assert_eq!(runs(), format!("1|{}", out.len()));
    let (_, _, whole) = logtail(&b, "simple", id, None);
    assert_eq!(
        String::from_utf8(whole).unwrap(),
        String::from_utf8(out).unwrap()
    );
    assert_eq!(
        job_json(&b, "simple", id)["buildInfo"]["ContainerStderr"],
        "err: twice\n"
    );
}

#[test]
fn log_retention_prunes_old_logs_and_records_but_not_running_jobs() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg, "a", json!({"log_retention": "1s"}));
    // A job that ended: its chunks are there, then pruned with its record.
    let info = a.job(json!({"project": "simple", "params": {"name": "old"}}));
    assert_eq!(info["ExitCode"], 0, "{info}");
    let id = &job_id(&info);
    let chunks = |id: &str| {
        pg.psql(&format!("SELECT count(*) FROM job_logs WHERE id = '{id}'"))
            .parse::<u32>()
            .unwrap()
    };
    assert!(chunks(id) >= 1);
    // A job that runs longer than the retention keeps its log while it runs.
    let ticker = start_on(&pg, &a, "a", &json!({"project": "ticker"}));
    wait_for("the old job's log pruned", Duration::from_secs(10), || {
        chunks(id) == 0
    });
    assert_eq!(
        pg.psql(&format!("SELECT count(*) FROM jobs WHERE id = '{id}'")),
        "0"
    );
    assert!(log_of(&a).contains("log_retention: pruned"));
    // The ticker runs for ~3 s: wait until its first chunk is older than the retention.
    wait_for("a chunk older than 1s", Duration::from_secs(30), || {
        pg.psql(&format!(
            "SELECT count(*) FROM job_logs WHERE id = '{ticker}' AND at < now() - interval '1.5s'"
        )) != "0"
            || state_of(&pg, "ticker", &ticker) != "running"
    });
    if state_of(&pg, "ticker", &ticker) == "running" {
        assert!(chunks(&ticker) >= 1, "a running job's log is kept");
    }
    // Its build on disk is not touched (builds follow `retention`).
    assert!(a.builds().join("simple/ready").join(id).is_dir());
    // Once it ended, it goes too.
    wait_for("the ticker's log pruned", Duration::from_secs(30), || {
        chunks(&ticker) == 0
    });
    // An agent silent for longer than the retention and a day, which no record names, is
    // forgotten with its images; one silent for less than a day, and the live one, stay.
    pg.psql(
        "INSERT INTO agents (name, advertise_url, capacity, version, last_heartbeat, stopped_at)
         VALUES ('ghost', 'http://127.0.0.1:1', 1, 'x', now() - interval '2 days', now()),
                ('napping', 'http://127.0.0.1:2', 1, 'x', now() - interval '2 hours', now())",
    );
    pg.psql("INSERT INTO agent_images (agent, project) VALUES ('ghost', 'simple')");
    wait_for("the ghost forgotten", Duration::from_secs(10), || {
        pg.psql("SELECT count(*) FROM agents WHERE name = 'ghost'") == "0"
    });
    assert_eq!(
        pg.psql("SELECT string_agg(name, ',' ORDER BY name) FROM agents"),
        "a,napping"
    );
    assert_eq!(
        pg.psql("SELECT string_agg(DISTINCT agent, ',') FROM agent_images"),
        "a"
    );
}

/// B's web view shows the lines of a job running on A live (Chromium; root only, as
/// tests/web.rs). Screenshots go to target/test-artifacts/ (or `$MISTRY_TEST_ARTIFACTS`).
#[test]
fn another_agents_job_is_live_in_the_web_view() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the Chromium test runs as root (as tests/web.rs)");
        return;
    }
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let a = agent(&pg, "a", json!({}));
    let b = agent(&pg, "b", json!({}));
    let browser = common::browser::Browser::start();
    let id = start_on(&pg, &a, "a", &json!({"project": "ticker"}));
    browser.goto(&b.url(&format!("/job/ticker/{id}")));
    browser.eval("window.__marker = 7; return true;");
    browser.wait(
        "live log lines from agent a",
        "const l = document.getElementById('log'); return !!l && l.textContent.includes('line 2');",
        Duration::from_secs(20),
    );
    assert_eq!(
        browser.eval("return document.getElementById('state').textContent;"),
        json!("pending")
    );
    assert_eq!(state_of(&pg, "ticker", &id), "running");
    browser.screenshot("cluster-job-pending-on-b");
    browser.wait(
        "the ready state",
        "return document.getElementById('state').textContent === 'ready';",
        Duration::from_secs(20),
    );
    assert_eq!(
        browser.eval("return window.__marker;"),
        json!(7),
        "the page was reloaded"
    );
    let log = browser.eval("return document.getElementById('log').textContent;");
    let log = log.as_str().unwrap();
    for i in 1..=8 {
        assert_eq!(log.matches(&format!("line {i}\n")).count(), 1, "{log}");
    }
    assert!(!log.contains('\u{1b}'), "ANSI escapes are rendered");
    assert_eq!(
        browser.eval("return document.querySelector('[data-field=ExitCode]').textContent;"),
        json!("0")
    );
    browser.screenshot("cluster-job-ready-on-b");
    assert!(!b.builds().join("ticker/ready").join(&id).exists());
}
