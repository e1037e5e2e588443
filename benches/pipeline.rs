//! Pipelines on mistryd, on loopback: once every job of a pipeline is in the result cache, the
//! median `POST /pipelines` latency of a run of N jobs (a chain j1 → j2 → … → jN, and a fan-out:
//! one job that N − 1 jobs need), beside N × the median `POST /jobs` latency of one cached job.
//! The difference is the run's overhead over its jobs (loading and validating the definition,
//! the run ID, the run record written at each change, the inputs of each job); target: a run
//! answers in ≤ N × the cached-job latency + 5 ms.
//!
//! `cargo bench --bench pipeline` (`BENCH_RUNS` sets the number of runs per pipeline, default
//! 50; 200 cached jobs are timed).

mod common;

use std::time::{Duration, Instant};

use common::{median, ms, Daemon};
use serde_json::{json, Value};

/// A pipeline of `n` jobs of project `touch`: a chain, or a fan-out from its first job.
fn definition(n: usize, fan_out: bool) -> Value {
    let mut jobs = serde_json::Map::new();
    for i in 1..=n {
        let mut job = json!({"project": "touch", "params": {"n": format!("j{i}-{{{{n}}}}")}});
        if i > 1 {
            let need = if fan_out { 1 } else { i - 1 };
            job["needs"] = json!([format!("j{need}")]);
        }
        jobs.insert(format!("j{i}"), job);
    }
    json!({"params": {"n": {"required": true}}, "jobs": jobs})
}

fn main() {
    let images = common::busybox_images();
    let runs: usize = common::env_num("BENCH_RUNS", 50).max(1);
    let dir = tempfile::tempdir().unwrap();
    let projects = dir.path().join("projects");
    common::touch_project(&projects);
    // (name, N, shape)
    let shapes: Vec<(String, usize, &str)> = vec![
        ("chain1".into(), 1, "chain"),
        ("chain3".into(), 3, "chain"),
        ("chain6".into(), 6, "chain"),
        ("fan3".into(), 3, "fan-out"),
        ("fan6".into(), 6, "fan-out"),
    ];
    std::fs::create_dir_all(projects.join("pipelines")).unwrap();
    for (name, n, shape) in &shapes {
        std::fs::write(
            projects.join("pipelines").join(format!("{name}.json")),
            definition(*n, *shape == "fan-out").to_string(),
        )
        .unwrap();
    }
    let config = common::write_config(dir.path(), &images, json!({}));
    let daemon = Daemon::start(&config);
    let addr = &daemon.addr;
    let agent = common::agent(None);
    // (latency, answer)
    let post = |path: &str, body: &str| -> (Duration, Value) {
        let t = Instant::now();
        let mut r = agent
            .post(&format!("http://{addr}{path}"))
            .send(body)
            .unwrap();
        let text = r.body_mut().read_to_string().unwrap();
        let elapsed = t.elapsed();
        assert_eq!(r.status().as_u16(), 201, "{path}: {text}");
        (elapsed, serde_json::from_str(&text).unwrap())
    };

    // One cached job (its first run builds the image).
    let job = r#"{"project": "touch", "params": {"n": "cached"}}"#;
    let (_, info) = post("/jobs", job);
    assert_eq!(info["ExitCode"], 0, "{info}");
    let mut cached_job: Vec<Duration> = (0..200)
        .map(|_| {
            let (d, info) = post("/jobs", job);
            assert_eq!(info["Cached"], true, "{info}");
            d
        })
        .collect();
    let job_ms = ms(median(&mut cached_job));

    let mut rows = Vec::new();
    for (name, n, shape) in &shapes {
        let body = json!({"pipeline": name, "params": {"n": "0"}}).to_string();
        let (_, rec) = post("/pipelines", &body);
        assert_eq!(rec["state"], "succeeded", "{rec}");
        let mut times: Vec<Duration> = (0..runs)
            .map(|_| {
                let (d, rec) = post("/pipelines", &body);
                assert_eq!(rec["state"], "succeeded", "{rec}");
                let jobs = rec["jobs"].as_array().unwrap();
                assert_eq!(jobs.len(), *n, "{rec}");
                assert!(jobs.iter().all(|j| j["cached"] == true), "{rec}");
                d
            })
            .collect();
        rows.push((name.clone(), *n, *shape, ms(median(&mut times))));
    }
    drop(daemon);

    println!(
        "mistryd on loopback, every job cached ({runs} runs per pipeline, 200 cached jobs); \
         cached POST /jobs (median): {job_ms:.2} ms"
    );
    println!(
        "{:<10} {:<8} {:>3} {:>14} {:>12} {:>12} {:>12}   target (<= N x job + 5 ms)",
        "pipeline", "shape", "N", "POST /pipelines", "N x job", "overhead", "per job"
    );
    for (name, n, shape, run_ms) in rows {
        let jobs_ms = n as f64 * job_ms;
        let overhead = run_ms - jobs_ms;
        let target = jobs_ms + 5.0;
        println!(
            "{:<10} {:<8} {:>3} {:>12.2}ms {:>10.2}ms {:>10.2}ms {:>10.2}ms   <= {:.2} ms {}",
            name,
            shape,
            n,
            run_ms,
            jobs_ms,
            overhead,
            overhead / n as f64,
            target,
            if run_ms <= target { "ok" } else { "MISSED" }
        );
    }
}
