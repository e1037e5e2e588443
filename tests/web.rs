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
        "return [...document.querySelectorAll('#jobs tr')].some(r => r.textContent.includes('ticker') && r.textContent.includes('success'));",
        Duration::from_secs(10),
    );
    b.screenshot("list");
    b.eval("const s = document.getElementById('filter-state'); s.value = 'running'; s.dispatchEvent(new Event('change')); return true;");
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

/// The states people read (issue 23): a job whose command exits 3 reads "failed (exit 3)" with
/// the ✖ icon in its row and on its page, never a green "ready"; mistry's own state stays in
/// its JSON and among the page's fields. A retrigger that cannot run says why in plain words.
#[test]
fn states_people_read_and_retrigger_answers() {
    let s = Server::start(json!({}));
    let b = Browser::start();
    let base = format!("http://{}", s.addr);
    let failed = s.job(json!({"project": "simple", "params": {"code": "3"}}));
    assert_eq!(failed["ExitCode"], 3);
    let ok = s.job(json!({"project": "simple", "params": {"name": "fine"}}));
    let failed_id = failed["URL"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let ok_id = ok["URL"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();

    // The list: each row's state as colour, text and icon.
    b.goto(&format!("{base}/"));
    let row_state = |id: &str| {
        b.eval(&format!(
            "const r = document.querySelector('#jobs tr[data-id=\"{id}\"] .st'); return r ? [r.dataset.state, r.textContent, r.querySelector('.st-icon').getAttribute('aria-hidden')] : null;"
        ))
    };
    b.wait(
        "both rows",
        &format!("return !!document.querySelector('#jobs tr[data-id=\"{failed_id}\"] .st') && !!document.querySelector('#jobs tr[data-id=\"{ok_id}\"] .st');"),
        Duration::from_secs(10),
    );
    assert_eq!(
        row_state(&failed_id),
        json!(["failed", "\u{2716}failed (exit 3)", "true"])
    );
    assert_eq!(
        row_state(&ok_id),
        json!(["success", "\u{2714}success", "true"])
    );
    let colours = b.eval(&format!(
        "const c = (id) => getComputedStyle(document.querySelector('#jobs tr[data-id=\"' + id + '\"] .st')).color; return [c('{failed_id}'), c('{ok_id}')];"
    ));
    assert_ne!(colours[0], colours[1], "failed and success look alike");

    // The job's page: the same badge in its heading; mistry's `ready` only as its field.
    b.goto(&format!("{base}/job/simple/{failed_id}"));
    b.wait(
        "the failed job's page",
        "return !!document.getElementById('job-state');",
        Duration::from_secs(10),
    );
    assert_eq!(
        b.eval("const s = document.getElementById('job-state'); return [s.dataset.state, s.textContent, s.closest('h1') !== null];"),
        json!(["failed", "\u{2716}failed (exit 3)", true])
    );
    assert_eq!(
        b.eval("return document.querySelector('[data-field=\"State (mistry)\"]').textContent;"),
        json!("ready")
    );
    let (_, doc) = s.get(&format!("/api/job/simple/{failed_id}"), false);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc["state"], "ready", "mistry's JSON keeps its state");

    // Retrigger's answers in plain words: 400, 403 and 503 as the server would answer them
    // (fetch answers them here), then a real 404 (the project is gone).
    for (status, body, said) in [
        (400, "Invalid request: bad params", "Not scheduled: the server refused this job's request as it was stored; it cannot be re-run as it is (the server said: Invalid request: bad params)."),
        (403, "forbidden", "Not scheduled: you may look at project simple but not build it (or the request came from another site) (the server said: forbidden)."),
        (503, "Too many jobs", "Not scheduled: the server is too busy to take a job now (its queue is full or the cluster's database is unreachable). Try again in a moment (the server said: Too many jobs)."),
    ] {
        b.eval(&format!(
            "window.__fetch = window.__fetch || window.fetch; window.fetch = (u, o) => (o && o.method === 'POST') ? Promise.resolve(new Response({body:?}, {{status: {status}}})) : window.__fetch(u, o); return true;"
        ));
        b.click("#retrigger");
        b.wait(
            &format!("the {status} note"),
            &format!("return document.getElementById('retrigger-note').textContent === {said:?};"),
            Duration::from_secs(5),
        );
        assert_eq!(
            b.eval("return document.getElementById('retrigger-note').className;"),
            json!("err")
        );
    }
    b.eval("window.fetch = window.__fetch; return true;");
    std::fs::remove_dir_all(s.dir.path().join("projects/simple")).unwrap();
    b.click("#retrigger");
    b.wait(
        "the 404 note",
        "return document.getElementById('retrigger-note').textContent.startsWith('Not scheduled: project simple no longer exists on this server, so this job cannot be re-run');",
        Duration::from_secs(5),
    );
}

/// Writes `n` ready jobs of `project` straight into the on-disk layout (newest first: job 0 is
/// the newest), every 10th exiting 2, each taking 1.5 s; their IDs, in that order.
fn fake_jobs(s: &Server, project: &str, n: usize) -> Vec<String> {
    let start = chrono::Utc::now() - chrono::Duration::hours(1);
    (0..n)
        .map(|i| {
            let id = format!("{i:04}{}", "b".repeat(60));
            let dir = s.builds().join(project).join("ready").join(&id);
            std::fs::create_dir_all(dir.join("data/artifacts")).unwrap();
            let info = json!({"Params": {"n": i.to_string()}, "Group": "", "Path": dir.join("data/artifacts"),
                "Cached": false, "Coalesced": false, "Incremental": false,
                "ExitCode": if i % 10 == 9 { 2 } else { 0 }, "ErrBuild": "", "TransportMethod": "rsync",
                "StartedAt": (start - chrono::Duration::seconds(i as i64)).to_rfc3339(),
                "Duration": 1_500_000_000i64, "URL": format!("job/{project}/{id}")});
            std::fs::write(dir.join("build_info.json"), info.to_string()).unwrap();
            id
        })
        .collect()
}

/// The job list: pages of 100 filtered on the server, project/state/text/page in the URL, each
/// row's duration (a running job's live elapsed time), and focus, scroll and the rows themselves
/// kept across the live refresh.
#[test]
fn the_job_list_pages_filters_and_keeps_focus() {
    let s = Server::start(json!({}));
    let b = Browser::start();
    let base = format!("http://{}", s.addr);
    let ids = fake_jobs(&s, "bulk", 150);
    // A job running for 65 s (its pending directory, as the engine leaves it while it runs).
    let running = format!("run{}", "c".repeat(61));
    let dir = s.builds().join("bulk/pending").join(&running);
    std::fs::create_dir_all(&dir).unwrap();
    let started = (chrono::Utc::now() - chrono::Duration::seconds(65)).to_rfc3339();
    std::fs::write(
        dir.join("build_info.json"),
        json!({"Params": {}, "Group": "", "Path": "",
        "Cached": false, "Coalesced": false, "Incremental": false, "ExitCode": -999, "ErrBuild": "",
        "TransportMethod": "rsync", "StartedAt": started, "Duration": -1_000_000_000i64,
        "URL": format!("job/bulk/{running}")})
        .to_string(),
    )
    .unwrap();
    let rows = "return [...document.querySelectorAll('#jobs tr[data-id]')].map(r => r.dataset.id);";

    // Filters from the URL: the failed jobs of bulk, on the server.
    b.goto(&format!("{base}/?project=bulk&state=failed"));
    b.wait(
        "the failed jobs",
        "return document.querySelectorAll('#jobs tr[data-id]').length === 15;",
        Duration::from_secs(10),
    );
    let failed: Vec<String> = ids.iter().skip(9).step_by(10).cloned().collect();
    assert_eq!(b.eval(rows), json!(failed));
    assert_eq!(
        b.eval("return [document.getElementById('filter-project').value, document.getElementById('filter-state').value, document.title];"),
        json!(["bulk", "failed", "Jobs \u{b7} mistry"])
    );

    // Pages of 100: the first, then the second through the pager; the URL follows.
    b.goto(&format!("{base}/?project=bulk"));
    b.wait(
        "the first page",
        "return document.getElementById('page-info').textContent === 'Page 1 of 2 \u{b7} 151 jobs';",
        Duration::from_secs(10),
    );
    let first = b.eval(rows);
    assert_eq!(first.as_array().unwrap().len(), 100);
    assert_eq!(first[0], json!(running));
    assert_eq!(first[1], json!(ids[0]));
    assert_eq!(
        b.eval(&format!(
            "return document.querySelector('#jobs tr[data-id=\"{}\"] td.time').textContent;",
            ids[0]
        )),
        json!("1.50s")
    );
    let elapsed = |b: &Browser| {
        b.eval(&format!(
            "return document.querySelector('#jobs tr[data-id=\"{running}\"] td.time').textContent;"
        ))
    };
    let before = elapsed(&b);
    assert!(before.as_str().unwrap().starts_with("1m"), "{before}");
    assert_eq!(
        b.eval(&format!(
            "return document.querySelector('#jobs tr[data-id=\"{running}\"] .st').dataset.state;"
        )),
        json!("running")
    );
    b.wait(
        "the elapsed time ticking",
        &format!("return document.querySelector('#jobs tr[data-id=\"{running}\"] td.time').textContent !== {before};"),
        Duration::from_secs(5),
    );
    b.click("#page-next");
    b.wait(
        "the second page",
        "return document.querySelectorAll('#jobs tr[data-id]').length === 51 && location.search === '?project=bulk&page=2';",
        Duration::from_secs(10),
    );
    assert_eq!(b.eval(rows)[0], json!(ids[99]));

    // Text search, typed: focus stays in the box, the rows stay the same elements and the
    // page keeps its scroll across live refreshes.
    b.viewport(1280, 400);
    b.goto(&format!("{base}/"));
    b.wait(
        "the list",
        "return document.querySelectorAll('#jobs tr[data-id]').length === 100;",
        Duration::from_secs(10),
    );
    b.click("#filter-q");
    b.keys("bbbb");
    b.wait(
        "the search",
        "return location.search === '?q=bbbb' && document.getElementById('page-info').textContent === 'Page 1 of 2 \u{b7} 150 jobs';",
        Duration::from_secs(10),
    );
    b.eval("window.scrollTo(0, 600); const r = document.querySelector('#jobs tr[data-id]:nth-child(20)'); r.__kept = 1; window.__calls = 0; const f = window.fetch; window.fetch = (u, o) => { if (String(u).startsWith('/api/jobs')) window.__calls++; return f(u, o); }; return true;");
    b.wait(
        "two live refreshes",
        "return window.__calls >= 2;",
        Duration::from_secs(10),
    );
    assert_eq!(
        b.eval("return [document.activeElement.id, document.activeElement.value, window.scrollY, document.querySelector('#jobs tr[data-id]:nth-child(20)').__kept];"),
        json!(["filter-q", "bbbb", 600, 1])
    );
}

/// A job page's per-file artifact downloads: each path opened by fd below the build's
/// artifacts with `RESOLVE_BENEATH`, no symlink followed: a link the job left to /etc/passwd,
/// to another project's build (absolute, relative, as a directory on the way) or a `..` path
/// is a 404 whose body holds none of the target's bytes; a real file is served whole.
#[test]
fn artifact_downloads_stay_below_the_artifacts() {
    let s = Server::start(json!({}));
    let other = s.job(json!({"project": "simple", "params": {"name": "other-secret"}}));
    let other_id = other["URL"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let mine = s.job(json!({"project": "copyfolder"}));
    let id = mine["URL"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    // What the job could have left in its artifacts (everything below data/ is the job's).
    let art = s
        .builds()
        .join("copyfolder/ready")
        .join(&id)
        .join("data/artifacts");
    let other_art = s
        .builds()
        .join("simple/ready")
        .join(&other_id)
        .join("data/artifacts");
    assert_eq!(
        std::fs::read_to_string(other_art.join("name.txt")).unwrap(),
        "other-secret"
    );
    let link = |target: &std::path::Path, name: &str| {
        std::os::unix::fs::symlink(target, art.join(name)).unwrap();
    };
    link("/etc/passwd".as_ref(), "passwd");
    link(&other_art, "other");
    link(&other_art.join("name.txt"), "other-file");
    link(
        format!("../../../../simple/ready/{other_id}/data/artifacts/name.txt").as_ref(),
        "rel",
    );
    link("../../../../simple".as_ref(), "up");

    let (status, body) = s.get(
        &format!("/api/artifact/copyfolder/{id}/folder/sub/b.txt"),
        false,
    );
    assert_eq!((status, body.as_str()), (200, "b\n"));
    let r = ureq::get(&s.url(&format!("/api/artifact/copyfolder/{id}/folder/a.txt")))
        .call()
        .unwrap();
    assert_eq!(
        r.headers()
            .get("content-disposition")
            .unwrap()
            .to_str()
            .unwrap(),
        "attachment; filename=\"a.txt\""
    );
    // A name the kernel refuses (too long; with a newline that must not reach the log as a
    // line of its own) is no artifact either: 404, not 500.
    let long = format!("%0Afake%20audit%20line%20{}", "a".repeat(300));
    for path in [
        long.as_str(),
        "passwd",
        "other/name.txt",
        "other-file",
        "rel",
        "up/ready",
        "%2E%2E%2F%2E%2E%2Fbuild_info.json",
        "folder%2F..%2F..%2F..%2F..%2Fsimple",
        "%2Fetc%2Fpasswd",
        "folder",
    ] {
        let (status, body) = s.get(&format!("/api/artifact/copyfolder/{id}/{path}"), false);
        assert_eq!(status, 404, "{path}: {body}");
        assert!(
            !body.contains("root:") && !body.contains("other-secret") && !body.contains("ExitCode"),
            "{path}: {body}"
        );
    }
    // The listing names the links as links, and does not go through them.
    let (status, list) = s.get(&format!("/api/artifacts/copyfolder/{id}"), false);
    assert_eq!(status, 200, "{list}");
    let list: Value = serde_json::from_str(&list).unwrap();
    let files: Vec<(String, String, u64)> = list["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().into(),
                f["kind"].as_str().unwrap().into(),
                f["size"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, String, u64)> = [
        ("folder", "dir", 0),
        ("folder/a.txt", "file", 2),
        ("folder/sub", "dir", 0),
        ("folder/sub/b.txt", "file", 2),
        ("other", "link", 0),
        ("other-file", "link", 0),
        ("passwd", "link", 0),
        ("rel", "link", 0),
        ("up", "link", 0),
    ]
    .iter()
    .map(|(p, k, n)| (p.to_string(), k.to_string(), *n))
    .collect();
    assert_eq!(files, want);
    assert_eq!(list["ready"], true);
    assert!(
        list["dockerfile"]
            .as_str()
            .unwrap()
            .starts_with("FROM busybox\n"),
        "{list}"
    );
}

/// A job's page (line anchors, stdout/stderr tabs by keyboard, search, artifacts and the tar,
/// the image, follow while live) and every page of the jobs' part — the list, a failed job, a
/// live job, the agents — accessible (axe-core: no critical or serious violation) in light and
/// dark, at 1280 and 390 px wide without horizontal scrolling, with a meaningful title and a
/// skip link first in the tab order. Screenshots of each go to target/test-artifacts/ (or
/// `$MISTRY_TEST_ARTIFACTS`: scripts/web-screenshots.sh writes them to docs/screenshots/).
#[test]
fn a_jobs_page_and_every_page_accessible() {
    let s = Server::start(json!({}));
    let b = Browser::start();
    let base = format!("http://{}", s.addr);
    let failed = s.job(json!({"project": "simple", "params": {"name": "hello", "code": "3"}}));
    let id = failed["URL"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let short = &id[..12];

    // Line anchors: #L2 scrolls to and marks line 2.
    b.goto(&format!("{base}/job/simple/{id}#L2"));
    b.wait(
        "line 2 marked",
        "const l = document.getElementById('L2'); return !!l && l.classList.contains('target');",
        Duration::from_secs(10),
    );
    assert_eq!(
        b.eval("return document.title;"),
        json!(format!(
            "failed (exit 3) \u{b7} simple/{short} \u{b7} mistry"
        ))
    );
    let lines = b.eval("return [...document.querySelectorAll('#log .line')].map(l => l.id);");
    let n = lines.as_array().unwrap().len();
    assert!(n >= 2, "{lines}");
    assert_eq!(lines[0], "L1");
    assert_eq!(lines[n - 1], json!(format!("L{n}")));

    // Artifacts, one by one and as the tar; the image's Dockerfile.
    b.wait(
        "the artifacts",
        "return document.querySelectorAll('#artifacts a.artifact').length === 3;",
        Duration::from_secs(10),
    );
    let prefix = format!("/api/artifact/simple/{id}/");
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#artifacts a.artifact')].map(a => a.getAttribute('href'));"),
        json!([format!("{prefix}count.txt"), format!("{prefix}name.txt"), format!("{prefix}params.txt")])
    );
    assert_eq!(
        b.eval_async("const done = arguments[arguments.length - 1]; fetch(document.querySelectorAll('#artifacts a.artifact')[1].href).then(r => r.text()).then(done);"),
        json!("hello")
    );
    assert_eq!(
        b.eval("return document.getElementById('artifacts-tar').getAttribute('href');"),
        json!(format!("/artifacts/simple/{id}"))
    );
    assert!(b
        .eval("return document.getElementById('dockerfile').textContent;")
        .as_str()
        .unwrap()
        .starts_with("FROM busybox\n"));

    assert_eq!(
        b.eval("return /^Image [0-9a-f]{12} from base sha256:[0-9a-f]{12} \\(from its build log\\)\\.$/.test(document.getElementById('image-built').textContent);"),
        json!(true),
        "{}",
        b.eval("return document.getElementById('image-built').textContent;")
    );

    // Tabs by keyboard: the arrow keys move between Output and Stderr.
    b.eval("document.getElementById('tab-out').focus(); return true;");
    b.keys("\u{E014}");
    b.wait(
        "the stderr tab",
        "return document.getElementById('log').textContent === 'err: hello\\n';",
        Duration::from_secs(5),
    );
    assert_eq!(
        b.eval("return [document.activeElement.id, document.getElementById('tab-err').getAttribute('aria-selected'), document.getElementById('tab-out').getAttribute('aria-selected')];"),
        json!(["tab-err", "true", "false"])
    );
    b.keys("\u{E012}");
    b.wait(
        "the output tab",
        "return document.getElementById('log').textContent.includes('out: hello\\n');",
        Duration::from_secs(5),
    );

    // Search: both matches highlighted, next and previous.
    b.click("#log-search");
    b.keys("HELLO");
    b.wait(
        "the matches",
        "return document.getElementById('log-search-count').textContent === '1 of 2';",
        Duration::from_secs(5),
    );
    assert_eq!(
        b.eval("return [document.querySelectorAll('#log .line.match').length, CSS.highlights.get('log-match').size];"),
        json!([2, 2])
    );
    b.click("#log-next");
    assert_eq!(
        b.eval("return [document.getElementById('log-search-count').textContent, document.querySelector('#log .line.match-current').textContent];"),
        json!(["2 of 2", "err: hello\n"])
    );
    b.click("#log-prev");
    assert_eq!(
        b.eval("return document.querySelector('#log .line.match-current').textContent;"),
        json!("out: hello\n")
    );

    // A live job: follow, then unfollow; its elapsed time runs.
    assert_eq!(
        s.post(
            "/jobs?async",
            r#"{"project": "simple", "params": {"name": "live", "sleep": "60"}}"#
        )
        .0,
        201
    );
    wait_until("the live job", || {
        job_of(&s, "simple")["state"] == "pending"
    });
    let live = job_of(&s, "simple")["id"].as_str().unwrap().to_string();
    b.goto(&format!("{base}/job/simple/{live}"));
    b.wait(
        "the live page",
        "const f = document.getElementById('follow'); return !!f && !f.hidden && document.getElementById('log').textContent.includes('out: live');",
        Duration::from_secs(20),
    );
    assert_eq!(
        b.eval("return [document.getElementById('job-state').dataset.state, document.getElementById('follow').getAttribute('aria-pressed'), /^\\d+(m\\d+)?s so far$/.test(document.getElementById('job-time').textContent)];"),
        json!(["running", "true", true])
    );
    b.click("#follow");
    assert_eq!(
        b.eval("return document.getElementById('follow').getAttribute('aria-pressed');"),
        json!("false")
    );

    // Every page: titles, skip link, axe in light and dark, no sideways scrolling on a phone.
    let pages = [
        ("list", format!("{base}/"), "Jobs \u{b7} mistry".to_string(), "document.querySelectorAll('#jobs tr[data-id]').length === 2"),
        ("job-failed", format!("{base}/job/simple/{id}"), format!("failed (exit 3) \u{b7} simple/{short} \u{b7} mistry"), "document.querySelectorAll('#artifacts a.artifact').length === 3 && !!document.getElementById('L1')"),
        ("job-live", format!("{base}/job/simple/{live}"), format!("running \u{b7} simple/{} \u{b7} mistry", &live[..12]), "document.getElementById('log').textContent.includes('out: live')"),
        ("agents", format!("{base}/agents"), "Agents \u{b7} mistry".to_string(), "document.querySelectorAll('#agents tr').length === 1"),
    ];
    for (name, url, title, ready) in &pages {
        for (width, height, form) in [(1280, 900, "desktop"), (390, 844, "phone")] {
            b.viewport(width, height);
            for dark in [false, true] {
                b.dark(dark);
                b.goto(url);
                b.wait(name, &format!("return {ready};"), Duration::from_secs(20));
                let shown = format!("{name} {form} {}", if dark { "dark" } else { "light" });
                assert_eq!(b.eval("return document.title;"), json!(title), "{shown}");
                b.assert_accessible(&shown);
                assert_eq!(b.horizontal_overflow(), 0, "{shown}");
                let scheme = if dark { "dark" } else { "light" };
                b.screenshot(&format!("web-{name}-{form}-{scheme}"));
                if name.starts_with("job") {
                    b.eval("document.querySelector('main h2:last-of-type').scrollIntoView(); return true;");
                    b.screenshot(&format!("web-{name}-log-{form}-{scheme}"));
                }
            }
        }
    }
    // Keyboard: the first Tab reaches the skip link, which moves focus to the content.
    b.viewport(1280, 900);
    b.goto(&format!("{base}/"));
    b.keys("\u{E004}");
    assert_eq!(
        b.eval("return [document.activeElement.className, document.activeElement.textContent, getComputedStyle(document.activeElement).outlineStyle];"),
        json!(["skip-link", "Skip to content", "solid"])
    );
    b.keys("\u{E007}");
    assert_eq!(b.eval("return document.activeElement.id;"), json!("app"));
}
