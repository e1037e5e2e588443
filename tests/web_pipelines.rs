//! A pipeline run's page in a real browser (headless Chromium through chromedriver, as
//! tests/web.rs): the DAG as inline SVG, live job states, escaped params, links to the jobs, the
//! job list's links to runs, and both Retrigger buttons. Screenshots go to target/test-artifacts/.

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::pipelines::{cmd_project, get_json, job, job_fields, write_pipeline};
use common::server::Server;
use common::wait_until;
use serde_json::{json, Value};

const XSS: &str = "<img src=x onerror=alert(1)>";

/// `web`: fetch → (slow, flaky) → final, and on success `notify`. `flaky` fails until the file
/// `ok` exists in the directory the server mounts at `/shared`.
fn setup(s: &Server) {
    let projects = s.dir.path().join("projects");
    cmd_project(&projects, "flaky", "echo trying; [ -f /shared/ok ]");
    let web = json!({
        "params": {"label": {"required": true}, "sleep": {"default": "4"}},
        "jobs": {
            "fetch": {"project": "simple", "params": {"name": "{{label}}"}},
            "slow": {"project": "simple", "params": {"name": "slow", "sleep": "{{sleep}}"}, "needs": ["fetch"]},
            "flaky": {"project": "flaky", "needs": ["fetch"]},
            "final": {"project": "simple", "params": {"name": "final"}, "needs": ["slow", "flaky"]}
        },
        "on_success": [{"pipeline": "notify", "params": {"from": "{{run}}"}}]
    });
    let notify = json!({
        "params": {"from": {"required": true}},
        "jobs": {"tell": {"project": "simple", "params": {"name": "notify"}}}
    });
    for (name, def) in [("web", web), ("notify", notify)] {
        write_pipeline(&projects, name, &def.to_string());
    }
}

fn record(s: &Server, url: &str) -> Value {
    get_json(s, &format!("/{url}"))
}

/// (name, state, cached) of each job.
fn summary(rec: &Value) -> Vec<(String, String, bool)> {
    let cached = rec["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["cached"].as_bool().unwrap());
    job_fields(rec, "state")
        .into_iter()
        .zip(cached)
        .map(|((name, state), cached)| (name, state, cached))
        .collect()
}

fn expect(v: &[(&str, &str, bool)]) -> Vec<(String, String, bool)> {
    v.iter()
        .map(|(n, s, c)| (n.to_string(), s.to_string(), *c))
        .collect()
}

/// The state people read of a job's box (its text says it with an icon).
fn box_state(b: &Browser, job: &str) -> Value {
    b.eval(&format!(
        "const g = document.querySelector('#dag g.job[data-job={job}]'); return g ? g.dataset.state : null;"
    ))
}

#[test]
fn a_pipeline_run_in_a_real_browser() {
    let shared = tempfile::tempdir().unwrap();
    let s = Server::start(json!({"mounts": {shared.path().to_str().unwrap(): "/shared"}}));
    setup(&s);
    let b = Browser::start();
    let base = format!("http://{}", s.addr);
    let long = Duration::from_secs(90);

    // A run with a slow job and a hostile param; its page follows it live.
    let (status, text) = s.post(
        "/pipelines?async",
        &json!({"pipeline": "web", "params": {"label": XSS}}).to_string(),
    );
    assert_eq!(status, 201, "{text}");
    let started: Value = serde_json::from_str(&text).unwrap();
    let run = started["run"].as_str().unwrap().to_string();
    let url = started["url"].as_str().unwrap().to_string();
    assert_eq!(url, format!("pipeline/web/{run}"));
    b.goto(&format!("{base}/{url}"));
    b.wait(
        "the DAG",
        "return document.querySelectorAll('#dag g.job').length === 4;",
        Duration::from_secs(10),
    );
    b.eval("window.__marker = 7; return true;");
    // Four boxes in columns by depth, four arrows for the needs.
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#dag g.job')].map(g => [g.dataset.job, g.getAttribute('transform')]);"),
        json!([["fetch", "translate(16,16)"], ["flaky", "translate(296,16)"], ["slow", "translate(296,110)"], ["final", "translate(576,16)"]])
    );
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#dag path.edge')].map(e => e.dataset.from + '>' + e.dataset.to).sort();"),
        json!(["fetch>flaky", "fetch>slow", "flaky>final", "slow>final"])
    );
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#dag g.job .job-project')].map(t => t.textContent);"),
        json!(["simple", "flaky", "simple", "simple"])
    );
    // The slow job goes pending, then ready, without a reload.
    b.wait(
        "the slow job pending",
        "const g = document.querySelector('#dag g.job[data-job=slow]'); return !!g && g.dataset.state === 'running';",
        long,
    );
    assert_eq!(
        b.eval("return document.querySelector('#dag g.job[data-job=slow]').classList.contains('state-pending');"),
        json!(true)
    );
    assert_eq!(box_state(&b, "fetch"), json!("success"));
    assert_eq!(
        b.eval("return document.getElementById('run-state').dataset.state;"),
        json!("running")
    );
    b.screenshot("pipeline-running");
    b.wait(
        "the run's end",
        "return document.getElementById('run-state').dataset.state === 'failed';",
        long,
    );
    assert_eq!(
        b.eval("return window.__marker;"),
        json!(7),
        "the page was reloaded"
    );
    for (j, state) in [
        ("fetch", "success"),
        ("slow", "success"),
        ("flaky", "failed"),
        ("final", "skipped"),
    ] {
        assert_eq!(box_state(&b, j), json!(state), "{j}");
    }
    assert_eq!(
        b.eval("return document.querySelector('[data-field=Failed]').textContent;"),
        json!("flaky")
    );
    let first = record(&s, &url);
    assert_eq!(first["state"], "failed", "{first}");

    // The hostile param is text; nothing ran.
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#run-params .param-value')].map(e => e.textContent);"),
        json!([XSS, "4"])
    );
    assert_eq!(
        b.eval("return document.querySelectorAll('#app img, #app script').length;"),
        json!(0)
    );
    assert!(!b.alert_open(), "a script ran");
    b.screenshot("pipeline-failed");

    // Each box links to its job's page and log.
    let fetch_id = job(&first, "fetch")["id"].as_str().unwrap().to_string();
    let flaky_id = job(&first, "flaky")["id"].as_str().unwrap().to_string();
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#dag a.job-link')].map(a => a.getAttribute('href'));"),
        json!([
            format!("/job/simple/{fetch_id}"),
            format!("/job/flaky/{flaky_id}"),
            format!("/job/simple/{}", job(&first, "slow")["id"].as_str().unwrap()),
        ]),
        "the skipped job has no page"
    );
    assert_eq!(
        b.eval("return document.querySelector('#dag a.log-link').getAttribute('href');"),
        json!(format!("/api/logtail/simple/{fetch_id}"))
    );
    let (status, log) = s.get(&format!("/api/logtail/simple/{fetch_id}"), false);
    assert_eq!(
        (status, log.contains(&format!("out: {XSS}"))),
        (200, true),
        "{log}"
    );
    b.click("#dag a.job-link");
    b.wait(
        "the job page",
        "const s = document.getElementById('state'); return !!s && s.textContent === 'ready';",
        Duration::from_secs(10),
    );
    assert_eq!(
        b.eval("return location.pathname;"),
        json!(format!("/job/simple/{fetch_id}"))
    );
    // The job's page and the job list link back to the run.
    b.wait(
        "the run link on the job page",
        "const a = document.querySelector('#job-run a.run-link'); return !!a;",
        Duration::from_secs(10),
    );
    assert_eq!(
        b.eval("return document.querySelector('#job-run a.run-link').getAttribute('href');"),
        json!(format!("/{url}"))
    );
    b.goto(&format!("{base}/"));
    b.wait(
        "the run links in the list",
        &format!("const r = document.querySelector('#jobs tr[data-id=\"{flaky_id}\"] a.run-link'); return !!r;"),
        Duration::from_secs(10),
    );
    assert_eq!(
        b.eval(&format!("return document.querySelector('#jobs tr[data-id=\"{flaky_id}\"] a.run-link').getAttribute('href');")),
        json!(format!("/{url}"))
    );
    b.screenshot("pipeline-job-list");

    // Retrigger failed jobs: the same run again; only the failed job and the one it skipped run.
    std::fs::write(shared.path().join("ok"), "").unwrap();
    b.goto(&format!("{base}/{url}"));
    b.wait(
        "the buttons",
        "const b = document.getElementById('retrigger-failed'); return !!b && !b.disabled;",
        Duration::from_secs(10),
    );
    b.eval("window.__marker = 8; return true;");
    b.click("#retrigger-failed");
    b.wait(
        "the retried run's end",
        "return document.getElementById('run-state').dataset.state === 'success';",
        long,
    );
    assert_eq!(
        b.eval("return window.__marker;"),
        json!(8),
        "the page was reloaded"
    );
    assert_eq!(
        b.eval("return location.pathname;"),
        json!(format!("/{url}"))
    );
    let retried = record(&s, &url);
    assert_eq!(retried["state"], "succeeded", "{retried}");
    assert_eq!(
        summary(&retried),
        expect(&[
            ("fetch", "ready", true),
            ("flaky", "ready", false),
            ("slow", "ready", true),
            ("final", "ready", false),
        ])
    );
    assert_eq!(job(&retried, "flaky")["id"], flaky_id.as_str());
    for (j, state) in [
        ("fetch", "cached"),
        ("slow", "cached"),
        ("flaky", "success"),
        ("final", "success"),
    ] {
        assert_eq!(box_state(&b, j), json!(state), "{j}");
    }
    assert_eq!(
        b.eval(
            "return document.querySelector('#dag g.job[data-job=fetch] .job-state').textContent;"
        ),
        json!("↺ cached")
    );
    b.screenshot("pipeline-retried");

    // The trigger link, and the triggered run's link back.
    let notify = retried["triggered"][0]["url"].as_str().unwrap().to_string();
    assert!(notify.starts_with("pipeline/notify/"), "{retried}");
    b.wait(
        "the trigger link",
        "return !!document.querySelector('[data-field=Triggered] a');",
        Duration::from_secs(10),
    );
    b.click("[data-field=Triggered] a");
    b.wait(
        "the triggered run's page",
        "return !!document.getElementById('caused-by');",
        Duration::from_secs(10),
    );
    assert_eq!(
        b.eval("return location.pathname;"),
        json!(format!("/{notify}"))
    );
    assert_eq!(
        b.eval("return document.getElementById('caused-by').getAttribute('href');"),
        json!(format!("/{url}"))
    );

    // Retrigger run: a new run (the first rebuild of this one) where every job runs again.
    b.goto(&format!("{base}/{url}"));
    b.wait(
        "the buttons",
        "const b = document.getElementById('retrigger-run'); return !!b && !b.disabled;",
        Duration::from_secs(10),
    );
    b.click("#retrigger-run");
    b.wait(
        "the rebuild's page",
        &format!(
            "return location.pathname !== '/{url}' && !!document.getElementById('rebuild-of');"
        ),
        Duration::from_secs(10),
    );
    b.wait(
        "the rebuild's end",
        "return document.getElementById('run-state').dataset.state === 'success';",
        long,
    );
    let path = b.eval("return location.pathname;");
    let rebuild_url = path.as_str().unwrap().trim_start_matches('/').to_string();
    let rebuilt = record(&s, &rebuild_url);
    assert_eq!(
        (
            rebuilt["rebuild"].clone(),
            rebuilt["rebuild_of"]["run"].clone()
        ),
        (json!(1), json!(run))
    );
    assert_ne!(rebuilt["run"], json!(run));
    assert_eq!(
        summary(&rebuilt),
        expect(&[
            ("fetch", "ready", false),
            ("flaky", "ready", false),
            ("slow", "ready", false),
            ("final", "ready", false),
        ])
    );
    assert_eq!(
        b.eval("return document.getElementById('rebuild-of').getAttribute('href');"),
        json!(format!("/{url}"))
    );
    b.screenshot("pipeline-rebuild");
    // The jobs now belong to the rebuild.
    wait_until("the jobs' run", || {
        let (_, text) = s.get("/pipelines/jobs/", false);
        let map: Value = serde_json::from_str(&text).unwrap();
        map[format!("flaky/{flaky_id}")]["url"] == json!(rebuild_url)
    });
}
