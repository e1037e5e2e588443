//! The pipelines' pages and a project's trends in a real browser (headless Chromium through
//! chromedriver, as tests/web_pipelines.rs): `/pipelines` as a page for browsers and mistry's
//! JSON for everyone else, a pipeline's page (definition, history, the form that starts a run,
//! by keyboard, and the server's refusal in plain words), the run page's states people read and
//! durations, "re-run failed jobs", a project's page with its SVG trends; each page checked by
//! axe-core in light and dark mode, at 390 px without horizontal scrolling, with its `<title>`.
//! Screenshots go to target/test-artifacts/ (or `$MISTRY_TEST_ARTIFACTS`): `pages-*`.

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::pipelines::{cmd_project, get_json, write_pipeline};
use common::server::Server;
use serde_json::{json, Value};

const TAB: &str = "\u{E004}";
const ENTER: &str = "\u{E007}";

fn setup(s: &Server) {
    let projects = s.dir.path().join("projects");
    cmd_project(
        &projects,
        "flaky",
        "echo trying; [ -f /shared/ok ] || exit 3",
    );
    let web = json!({
        "description": "Fetch, test, publish",
        "params": {"label": {"required": true, "description": "what to build"}, "sleep": {"default": "3"}},
        "jobs": {
            "fetch": {"project": "simple", "params": {"name": "{{label}}", "sleep": "{{sleep}}"}},
            "flaky": {"project": "flaky", "needs": ["fetch"]},
            "final": {"project": "simple", "params": {"name": "final"}, "needs": ["flaky"]}
        }
    });
    let other = json!({"jobs": {"one": {"project": "simple", "params": {"name": "other"}}}});
    for (name, def) in [("web", web), ("other", other)] {
        write_pipeline(&projects, name, &def.to_string());
    }
}

/// GET `path` with `accept` (or none): status, content type, body.
fn get_accept(s: &Server, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let mut req = Server::agent().get(&s.url(path));
    if let Some(a) = accept {
        req = req.header("Accept", a);
    }
    let mut r = req.call().unwrap();
    let kind = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (
        r.status().as_u16(),
        kind,
        r.body_mut().read_to_string().unwrap(),
    )
}

/// axe-core in light and dark mode, no horizontal scrolling at 390 px, then back to a desktop
/// in light mode; screenshots of the four.
fn check_page(b: &Browser, page: &str, ready: &str) {
    for (width, dark) in [(1280, false), (1280, true), (390, false), (390, true)] {
        b.viewport(width, if width < 600 { 844 } else { 900 });
        b.dark(dark);
        b.wait(page, ready, Duration::from_secs(10));
        b.assert_accessible(&format!("{page} at {width} px, dark {dark}"));
        assert_eq!(
            b.horizontal_overflow(),
            0,
            "{page} scrolls sideways at {width} px"
        );
        b.screenshot(&format!(
            "pages-{page}-{width}-{}",
            if dark { "dark" } else { "light" }
        ));
    }
    b.viewport(1280, 900);
    b.dark(false);
}

fn text(b: &Browser, css: &str) -> Value {
    b.eval(&format!(
        "const e = document.querySelector({css:?}); return e ? e.textContent : null;"
    ))
}

#[test]
fn pipelines_pages_in_a_real_browser() {
    let shared = tempfile::tempdir().unwrap();
    let s = Server::start(json!({"mounts": {shared.path().to_str().unwrap(): "/shared"}}));
    setup(&s);
    let base = format!("http://{}", s.addr);
    // A failed build of flaky outside the pipeline, for its trends.
    let (status, failed) = s.post("/jobs", r#"{"project": "flaky", "params": {"n": "1"}}"#);
    assert_eq!(status, 201, "{failed}");
    assert_eq!(
        serde_json::from_str::<Value>(&failed).unwrap()["ExitCode"],
        3,
        "{failed}"
    );

    // mistry's answer for API clients, byte for byte; a page for a browser.
    let want = r#"[{"name":"other","params":{},"jobs":["one"]},{"name":"web","description":"Fetch, test, publish","params":{"label":{"required":true,"description":"what to build"},"sleep":{"default":"3"}},"jobs":["fetch","flaky","final"]}]"#;
    for accept in [None, Some("*/*"), Some("application/json")] {
        assert_eq!(
            get_accept(&s, "/pipelines", accept),
            (200, "application/json".to_string(), want.to_string()),
            "{accept:?}"
        );
    }
    let (status, kind, body) = get_accept(
        &s,
        "/pipelines",
        Some("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    );
    assert_eq!((status, kind.as_str()), (200, "text/html; charset=utf-8"));
    assert!(body.contains("<title>Pipelines · mistry</title>"), "{body}");

    let b = Browser::start();

    // A pipeline's page: its definition, an empty history, the form.
    b.goto(&format!("{base}/pipeline/web"));
    b.wait(
        "the form",
        "return !!document.getElementById('run-form');",
        Duration::from_secs(10),
    );
    assert_eq!(
        b.eval("return document.title;"),
        json!("web · Pipelines · mistry")
    );
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#run-form label')].map(l => [l.textContent, l.htmlFor]);"),
        json!([["label (required)", "param-0"], ["sleep", "param-1"]])
    );
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#run-form input')].map(i => [i.name, i.value, i.required]);"),
        json!([["label", "", true], ["sleep", "3", false]])
    );
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#pipeline-jobs tbody tr')].map(r => [...r.cells].map(c => c.textContent));"),
        json!([["fetch", "simple", ""], ["flaky", "flaky", "fetch"], ["final", "simple", "flaky"]])
    );
    assert_eq!(
        b.eval(
            "return document.querySelector('#pipeline-jobs a.project-link').getAttribute('href');"
        ),
        json!("/project/simple")
    );
    b.wait(
        "the history",
        "return !!document.getElementById('history-runs');",
        Duration::from_secs(10),
    );
    assert_eq!(text(&b, "#history-runs"), json!("No runs yet."));
    assert_eq!(text(&b, "#history-page"), json!("Page 1 of 1 (0 runs)"));
    check_page(
        &b,
        "pipeline",
        "return !!document.getElementById('history-runs');",
    );

    // The server's refusal, in plain words next to the form (the browser's own check of the
    // required param taken away, so that the server answers).
    b.eval("document.getElementById('param-0').required = false; return true;");
    b.click("#run-submit");
    b.wait(
        "the refusal",
        "return document.getElementById('run-form-error').textContent !== '';",
        Duration::from_secs(10),
    );
    let refusal = text(&b, "#run-form-error");
    let refusal = refusal.as_str().unwrap();
    assert!(
        refusal.starts_with("The server refused these params: ") && refusal.contains("label"),
        "{refusal}"
    );
    assert_eq!(b.eval("return location.pathname;"), json!("/pipeline/web"));
    assert_eq!(get_json(&s, "/pipelines/index/"), json!([]));

    // By keyboard: Tab reaches the first input, type, Enter submits; the run's page follows.
    b.goto(&format!("{base}/pipeline/web"));
    b.wait(
        "the form",
        "return !!document.getElementById('param-0');",
        Duration::from_secs(10),
    );
    let mut tabs = 0;
    while b.eval("return document.activeElement && document.activeElement.id;") != json!("param-0")
    {
        tabs += 1;
        assert!(tabs < 30, "Tab never reached the form");
        b.keys(TAB);
    }
    b.keys("hello");
    b.keys(ENTER);
    b.wait(
        "the run's page",
        "return /^\\/pipeline\\/web\\/[0-9a-f]{64}$/.test(location.pathname) && !!document.getElementById('run-table');",
        Duration::from_secs(10),
    );
    let path = b.eval("return location.pathname;");
    let url = path.as_str().unwrap().trim_start_matches('/').to_string();
    let run = url.rsplit('/').next().unwrap().to_string();
    assert_eq!(
        b.eval("return document.title;"),
        json!(format!("web {} · mistry", &run[..12]))
    );
    // While fetch sleeps: running, with its elapsed time.
    b.wait(
        "the running job's elapsed time",
        "const c = document.querySelector('td.job-duration[data-job=fetch]'); return !!c && / so far$/.test(c.textContent);",
        Duration::from_secs(60),
    );
    assert_eq!(
        b.eval("return document.querySelector('#dag g.job[data-job=fetch]').dataset.state;"),
        json!("running")
    );
    assert_eq!(
        b.eval("return document.getElementById('retrigger-failed').disabled;"),
        json!(true)
    );
    b.wait(
        "the run's end",
        "const s = document.getElementById('run-state'); return s.dataset.state === 'failed';",
        Duration::from_secs(90),
    );
    // The states people read: text and icon, the exit code of the failure.
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#run-jobs tr')].map(r => [r.dataset.job, r.querySelector('.st').dataset.state, r.querySelector('.st').textContent]);"),
        json!([["fetch", "success", "✔success"], ["flaky", "failed", "✖failed (exit 3)"], ["final", "skipped", "⤳skipped"]])
    );
    assert_eq!(text(&b, "#run-state"), json!("✖failed (1 job)"));
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#dag g.job')].map(g => [g.dataset.job, g.dataset.state, g.querySelector('.job-state').textContent]);"),
        json!([["fetch", "success", "✔ success"], ["flaky", "failed", "✖ failed 3"], ["final", "skipped", "⤳ skipped"]])
    );
    b.wait(
        "the jobs' durations",
        "return [...document.querySelectorAll('td.job-duration')].map(c => c.textContent).filter(t => /^\\d+\\.\\d\\ds$/.test(t)).length === 2;",
        Duration::from_secs(10),
    );
    assert_eq!(text(&b, "td.job-duration[data-job=final]"), json!(""));
    let rec = get_json(&s, &format!("/{url}"));
    assert_eq!(rec["params"], json!({"label": "hello", "sleep": "3"}));
    assert_eq!(
        b.eval("return document.getElementById('retrigger-failed').disabled;"),
        json!(false)
    );
    // The DAG scrolls inside its box at 390 px; the page does not.
    b.viewport(390, 844);
    assert_eq!(
        b.eval(
            "const d = document.getElementById('dag-box'); return d.scrollWidth > d.clientWidth;"
        ),
        json!(true)
    );
    check_page(&b, "run", "return !!document.getElementById('run-table');");

    // Re-run failed jobs: the same run, the failed job again, to success.
    std::fs::write(shared.path().join("ok"), "").unwrap();
    b.click("#retrigger-failed");
    b.wait(
        "the re-run's end",
        "return document.getElementById('run-state').dataset.state === 'success';",
        Duration::from_secs(90),
    );
    assert_eq!(
        b.eval(
            "return [...document.querySelectorAll('#run-jobs tr .st')].map(s => s.dataset.state);"
        ),
        json!(["cached", "success", "success"])
    );
    assert_eq!(
        b.eval("return document.getElementById('retrigger-failed').disabled;"),
        json!(true)
    );

    // The list: each pipeline with its last runs.
    b.goto(&format!("{base}/pipelines"));
    b.wait(
        "the runs",
        "return !!document.querySelector('#runs-web tr[data-run]');",
        Duration::from_secs(10),
    );
    assert_eq!(
        b.eval("return document.title;"),
        json!("Pipelines · mistry")
    );
    assert_eq!(
        b.eval("return [...document.querySelectorAll('.pipeline-card')].map(c => [c.dataset.pipeline, c.querySelector('a.pipeline-link').getAttribute('href')]);"),
        json!([["other", "/pipeline/other"], ["web", "/pipeline/web"]])
    );
    assert_eq!(
        text(&b, "[data-pipeline=web] .pipeline-meta"),
        json!("Jobs: fetch, flaky, finalParams: label (required), sleep = 3")
    );
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#runs-web tr')].map(r => [r.querySelector('a').getAttribute('href'), r.querySelector('.st').dataset.state]);"),
        json!([[format!("/{url}"), "success"]])
    );
    b.wait(
        "the other's runs",
        "return !!document.getElementById('runs-other');",
        Duration::from_secs(10),
    );
    assert_eq!(text(&b, "#runs-other"), json!("No runs yet."));
    assert_eq!(
        b.eval("return document.getElementById('nav-pipelines').getAttribute('href');"),
        json!("/pipelines")
    );
    check_page(
        &b,
        "pipelines",
        "return !!document.getElementById('runs-other');",
    );

    // The pipeline's history now.
    b.goto(&format!("{base}/pipeline/web"));
    b.wait(
        "the history",
        "return !!document.querySelector('#history-runs tr[data-run]');",
        Duration::from_secs(10),
    );
    assert_eq!(text(&b, "#history-page"), json!("Page 1 of 1 (1 run)"));
    assert_eq!(
        b.eval("return document.querySelector('#history-runs a').getAttribute('href');"),
        json!(format!("/{url}"))
    );

    // A project's page, linked from the job list: its trends (server-rendered SVG) and builds.
    b.goto(&format!("{base}/"));
    b.wait(
        "the job list's project links",
        "return !!document.querySelector('#jobs a.project-link[href=\"/project/flaky\"]');",
        Duration::from_secs(10),
    );
    b.click("#jobs a.project-link[href=\"/project/flaky\"]");
    b.wait(
        "the charts",
        "return !!document.querySelector('#trend-duration-box svg') && !!document.querySelector('#trend-success-box svg') && !!document.querySelector('#project-builds tr[data-id]');",
        Duration::from_secs(10),
    );
    assert_eq!(
        b.eval("return document.title;"),
        json!("flaky · Projects · mistry")
    );
    // Two builds of flaky, oldest first: the failure (hatched) then the success.
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#trend-duration rect.bar')].map(r => r.classList[1]);"),
        json!(["tr-bad", "tr-ok"])
    );
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#trend-success text.rate')].map(t => t.textContent);"),
        json!(["50%"])
    );
    assert_eq!(
        b.eval("return [document.getElementById('trend-duration').getAttribute('role'), document.querySelector('#trend-duration title').textContent];"),
        json!(["img", "Build durations of flaky"])
    );
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#project-builds tr')].map(r => r.querySelector('.st').textContent);"),
        json!(["✔success", "✖failed (exit 3)"])
    );
    let flaky_id = rec["jobs"][1]["id"].as_str().unwrap();
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#project-builds a')].map(a => a.getAttribute('href'));")[0],
        json!(format!("/job/flaky/{flaky_id}"))
    );
    // The chart follows dark mode: its text's colour changes.
    let fill = "return getComputedStyle(document.querySelector('#trend-duration .tr-text')).fill;";
    let light = b.eval(fill);
    b.dark(true);
    assert_ne!(b.eval(fill), light);
    b.dark(false);
    check_page(
        &b,
        "project",
        "return !!document.querySelector('#trend-success-box svg');",
    );
    let (status, kind, svg) = get_accept(&s, "/trends/flaky/duration.svg", None);
    assert_eq!((status, kind.as_str()), (200, "image/svg+xml"));
    assert_eq!(svg.matches("<rect class=\"bar").count(), 2, "{svg}");
}
