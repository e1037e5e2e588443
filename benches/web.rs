//! The web view's job routes with 10,000 jobs on disk: the paged list (`GET /api/jobs`: its
//! first page, a filtered page, a text search) beside mistry's whole list (`GET /index/`), and
//! what a job's page asks (`GET /api/job`, `GET /api/artifacts`). The jobs' `build_info.json`
//! are written straight into the on-disk layout (`<build_path>/<project>/ready/<id>/`), so the
//! store fills in seconds. Prints figures (median of `BENCH_RUNS`, default 10); asserts only that
//! each answer is complete, nothing about time.
//!
//! With chromedriver and Chromium installed, also the time Chromium takes to draw the list's
//! first page and a job's page (its log and artifacts included), from navigation to the page's
//! `performance.mark` (`jobs-drawn`, `job-drawn`).
//!
//! `cargo bench --bench web` (`BENCH_JOBS` sets the number of jobs).

mod common;
/// The end-to-end tests' helpers, for their browser (tests/common/browser.rs).
#[path = "../tests/common/mod.rs"]
mod tests_common;

use std::time::Instant;

use common::{env_num, ms, Daemon};
use serde_json::{json, Value};

/// `n` ready jobs over 10 projects, newest first; every 7th exits 1. Their (project, id).
fn write_jobs(builds: &std::path::Path, n: usize) -> Vec<(String, String)> {
    let now = chrono::Utc::now();
    (0..n)
        .map(|i| {
            let project = format!("p{}", i % 10);
            let id = format!("{i:08x}{}", "0".repeat(56));
            let dir = builds.join(&project).join("ready").join(&id);
            std::fs::create_dir_all(dir.join("data/artifacts")).unwrap();
            std::fs::write(dir.join("data/artifacts/out.txt"), format!("{i}\n")).unwrap();
            let info = json!({"Params": {"n": format!("value-{i}"), "branch": "main"}, "Group": "",
                "Path": dir.join("data/artifacts"), "Cached": false, "Coalesced": false,
                "Incremental": false, "ExitCode": i32::from(i % 7 == 6), "ErrBuild": "",
                "TransportMethod": "rsync",
                "StartedAt": (now - chrono::Duration::seconds(i as i64)).to_rfc3339(),
                "Duration": 2_000_000_000i64, "URL": format!("job/{project}/{id}")});
            std::fs::write(dir.join("build_info.json"), info.to_string()).unwrap();
            std::fs::write(dir.join("out.log"), format!("job {i}\n")).unwrap();
            (project, id)
        })
        .collect()
}

/// The median time of `runs` GETs of `path`, and the last answer's size.
fn time(agent: &ureq::Agent, addr: &str, path: &str, runs: usize) -> (f64, usize, String) {
    let mut times = Vec::new();
    let mut body = String::new();
    for _ in 0..runs {
        let t = Instant::now();
        let mut r = agent.get(&format!("http://{addr}{path}")).call().unwrap();
        body = r.body_mut().read_to_string().unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}: {body}");
        times.push(ms(t.elapsed()));
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], body.len(), body)
}

fn main() {
    let n = env_num("BENCH_JOBS", 10_000usize);
    let runs = env_num("BENCH_RUNS", 10usize);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("projects")).unwrap();
    let config = common::write_config(dir.path(), &common::images_dir(), json!({}));
    let t = Instant::now();
    let jobs = write_jobs(&dir.path().join("builds"), n);
    println!("web: {n} jobs written in {:.0} ms", ms(t.elapsed()));
    let daemon = Daemon::start(&config);
    let agent = common::agent(None);
    let (project, id) = &jobs[n / 2];
    let cases = [
        ("GET /index/ (mistry's whole list)", "/index/".to_string()),
        ("GET /api/jobs (first page)", "/api/jobs".to_string()),
        ("GET /api/jobs?page=50", "/api/jobs?page=50".to_string()),
        (
            "GET /api/jobs?project=p3&state=failed",
            "/api/jobs?project=p3&state=failed".to_string(),
        ),
        (
            "GET /api/jobs?q=value-4242",
            "/api/jobs?q=value-4242".to_string(),
        ),
        (
            "GET /api/job/{p}/{id} (job page)",
            format!("/api/job/{project}/{id}"),
        ),
        (
            "GET /api/artifacts/{p}/{id} (job page)",
            format!("/api/artifacts/{project}/{id}"),
        ),
    ];
    for (what, path) in cases {
        let (median, size, body) = time(&agent, &daemon.addr, &path, runs);
        if path.starts_with("/api/jobs") {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert!(v["jobs"].as_array().unwrap().len() <= 100, "{path}");
            println!(
                "web: {what}: median {median:.1} ms, {size} bytes, {} of {} jobs",
                v["jobs"].as_array().unwrap().len(),
                v["total"]
            );
        } else {
            println!("web: {what}: median {median:.1} ms, {size} bytes");
        }
    }
    if !common::installed("chromedriver") {
        println!("web: no chromedriver: the pages' render times are not measured");
        return;
    }
    let b = tests_common::browser::Browser::start();
    let base = format!("http://{}", daemon.addr);
    for (what, url, mark) in [
        ("the list's first page", format!("{base}/"), "jobs-drawn"),
        (
            "a job's page",
            format!("{base}/job/{project}/{id}"),
            "job-drawn",
        ),
    ] {
        let mut times = Vec::new();
        for _ in 0..runs {
            b.goto(&url);
            let got = format!("return performance.getEntriesByName('{mark}').length > 0;");
            b.wait(mark, &got, std::time::Duration::from_secs(120));
            let at = b.eval(&format!(
                "return performance.getEntriesByName('{mark}')[0].startTime;"
            ));
            times.push(at.as_f64().unwrap_or(f64::NAN));
        }
        times.sort_by(f64::total_cmp);
        println!(
            "web: Chromium, {what} drawn: median {:.0} ms after navigation ({n} jobs)",
            times[times.len() / 2]
        );
    }
}
