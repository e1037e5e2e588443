//! The web view in a real browser: Debian's headless Chromium driven through chromedriver
//! (W3C WebDriver over HTTP, tests/common/browser.rs). Screenshots of each page go to
//! target/test-artifacts/ (or `$MISTRY_TEST_ARTIFACTS`).

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::server::Server;
use common::wait_until;
use serde_json::{json, Value};

fn job_of(s: &Server, project: &str) -> Value {
    let (_, index) = s.get("/index/", false);
    let list: Value = serde_json::from_str(&index).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|j| j["project"] == project)
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn the_web_view_in_a_real_browser() {
    let s = Server::start(json!({}));
    let b = Browser::start();
    let base = format!("http://{}", s.addr);

    // A slow job: its page shows log lines live and turns ready without a reload.
    assert_eq!(s.post("/jobs?async", r#"{"project": "ticker"}"#).0, 201);
    wait_until("the ticker job", || !job_of(&s, "ticker").is_null());
    let id = job_of(&s, "ticker")["id"].as_str().unwrap().to_string();
    b.goto(&format!("{base}/job/ticker/{id}"));
    b.eval("window.__marker = 7; return true;");
    b.wait(
        "live log lines",
        "const l = document.getElementById('log'); return !!l && l.textContent.includes('line 2');",
        Duration::from_secs(20),
    );
    assert_eq!(
        b.eval("return document.getElementById('state').textContent;"),
        json!("pending")
    );
    b.screenshot("job-pending");
    b.wait(
        "the ready state",
        "return document.getElementById('state').textContent === 'ready';",
        Duration::from_secs(20),
    );
    assert_eq!(
        b.eval("return window.__marker;"),
        json!(7),
        "the page was reloaded"
    );
    let log = b.eval("return document.getElementById('log').textContent;");
    assert!(log.as_str().unwrap().contains("line 8"), "{log}");
    assert!(
        !log.as_str().unwrap().contains('\u{1b}'),
        "ANSI escapes are rendered, not shown"
    );
    assert_eq!(
        b.eval("return document.querySelectorAll('#log .ansi-32').length > 0;"),
        json!(true)
    );
    assert_eq!(
        b.eval("return document.querySelector('[data-field=ExitCode]').textContent;"),
        json!("0")
    );
    b.screenshot("job-ready");

    // The list shows it; filtering by project and state works.
    b.goto(&format!("{base}/"));
    b.wait(
        "the job in the list",
        "return [...document.querySelectorAll('#jobs tr')].some(r => r.textContent.includes('ticker') && r.textContent.includes('ready'));",
        Duration::from_secs(10),
    );
    b.screenshot("list");
    b.eval("const s = document.getElementById('filter-state'); s.value = 'pending'; s.dispatchEvent(new Event('change')); return true;");
    b.wait(
        "the filter",
        "return document.querySelector('#jobs').textContent.includes('No jobs.');",
        Duration::from_secs(5),
    );

    // Retrigger with rebuild: a new build of the same job starts.
    let before = job_of(&s, "ticker")["buildInfo"]["StartedAt"].clone();
    b.goto(&format!("{base}/job/ticker/{id}"));
    b.wait(
        "the job page",
        "return !!document.getElementById('retrigger');",
        Duration::from_secs(10),
    );
    b.click("#rebuild");
    b.click("#retrigger");
    wait_until("a new build", || {
        let j = job_of(&s, "ticker");
        j["buildInfo"]["StartedAt"] != before
    });

    // Everything user-controlled is text: a hostile param shows as typed, runs nothing.
    let xss = "<script>alert(1)</script>";
    let body = json!({"project": "simple", "params": {"name": xss, "img": "<img src=x onerror=alert(2)>"}});
    let info = s.job(body);
    let url = info["URL"].as_str().unwrap().to_string();
    b.goto(&format!("{base}/{url}"));
    b.wait(
        "the params",
        "return document.querySelectorAll('.param-value').length === 2;",
        Duration::from_secs(10),
    );
    let values =
        b.eval("return [...document.querySelectorAll('.param-value')].map(e => e.textContent);");
    assert_eq!(values, json!(["<img src=x onerror=alert(2)>", xss]));
    assert_eq!(
        b.eval("return document.querySelectorAll('#params script, #params img').length;"),
        json!(0)
    );
    assert!(!b.alert_open(), "a script ran");
    b.screenshot("job-xss");

    // A large log: the page shows its tail and loads the rest on demand.
    let info = s.job(json!({"project": "loud", "params": {"bytes": "4194304"}}));
    let url = info["URL"].as_str().unwrap().to_string();
    b.goto(&format!("{base}/{url}"));
    b.wait(
        "the log tail",
        "const b = document.getElementById('load-all'); return !!b && !b.hidden;",
        Duration::from_secs(10),
    );
    let shown = b
        .eval("return document.getElementById('log').textContent.length;")
        .as_u64()
        .unwrap();
    assert!(shown < 300 * 1024, "{shown} characters shown");
    b.click("#load-all");
    b.wait(
        "the whole log",
        "return document.getElementById('log').textContent.length > 4194304;",
        Duration::from_secs(20),
    );
    b.screenshot("job-large-log");
}
