//! mistryd under load, on loopback: with the image cached,
//!
//! - `POST /jobs` for a job that touches one artifact, new params each time (median
//!   request-to-response; target ≤ 8 ms, as root and rootless);
//! - result-cache hits (median; target ≤ 1 ms) and their throughput under `wrk` where installed
//!   (target ≥ 2000 requests/s);
//! - the idle daemon's resident memory (target ≤ 30 MiB);
//! - the same new-params job with the host's network and with an isolated one (slirp4netns,
//!   namespaces made ahead), two daemons side by side, their jobs alternating, back to back and
//!   50 ms apart: isolated at most 3 ms slower (median of the pairs' differences).
//!
//! `cargo bench --bench server` (`BENCH_RUNS` sets the number of new-params jobs).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{median, ms, Daemon};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `POST /jobs` of project `touch` with param `n` at `url`: the time to the answer.
fn post_at(agent: &ureq::Agent, url: &str, n: usize) -> Duration {
    let t = Instant::now();
    let mut r = agent
        .post(url)
        .send(format!(r#"{{"project": "touch", "params": {{"n": "{n}"}}}}"#).as_str())
        .unwrap();
    let body = r.body_mut().read_to_string().unwrap();
    assert_eq!(r.status().as_u16(), 201, "{body}");
    assert!(body.contains("\"ExitCode\":0"), "{body}");
    t.elapsed()
}

/// A daemon serving project `touch` with network `network`, its image built.
fn daemon_with_network(
    images: &std::path::Path,
    dir: &std::path::Path,
    network: &str,
) -> (Daemon, String) {
    common::touch_project(&dir.join("projects"));
    let config = common::write_config(dir, images, serde_json::json!({ "network": network }));
    let daemon = Daemon::start(&config);
    let url = format!("http://{}/jobs", daemon.addr);
    post_at(&common::agent(None), &url, 0); // builds the image
    (daemon, url)
}

/// Host and isolated networks side by side: two daemons, their new-params jobs alternating
/// (so that the machine's noise hits both alike), each `gap` after the previous answer. The
/// medians of each, and the median of the pairs' differences (isolated - host), in ms.
fn host_vs_isolated(images: &std::path::Path, runs: usize, gap: Duration) -> (f64, f64, f64) {
    let (dh, di) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_host, host_url) = daemon_with_network(images, dh.path(), "host");
    let (_isolated, isolated_url) = daemon_with_network(images, di.path(), "isolated");
    // The isolated pool fills at start; let it, as a running daemon's has.
    std::thread::sleep(Duration::from_millis(500));
    let agent = common::agent(None);
    let (mut h, mut i, mut d) = (Vec::new(), Vec::new(), Vec::new());
    for n in 1..=runs {
        std::thread::sleep(gap);
        let th = ms(post_at(&agent, &host_url, n));
        std::thread::sleep(gap);
        let ti = ms(post_at(&agent, &isolated_url, n));
        h.push(th);
        i.push(ti);
        d.push(ti - th);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (med(&mut h), med(&mut i), med(&mut d))
}

fn main() {
    let images = common::busybox_images();
    let runs: usize = common::env_num("BENCH_RUNS", 40);
    let dir = tempfile::tempdir().unwrap();
    common::touch_project(&dir.path().join("projects"));
    let config = common::write_config(dir.path(), &images, serde_json::json!({}));
    let daemon = Daemon::start(&config);
    std::thread::sleep(Duration::from_millis(300));
    let idle = rss_kib(daemon.pid());
    let url = format!("http://{}/jobs", daemon.addr);
    let agent = common::agent(None);
    let post = |n: usize| post_at(&agent, &url, n);
    post(0); // builds the image
    let mut fresh: Vec<Duration> = (1..=runs).map(post).collect();
    let mut cached: Vec<Duration> = (0..200).map(|_| post(1)).collect();

    let mut wrk_rps = None;
    if Command::new("wrk").arg("--version").output().is_ok() {
        let script = dir.path().join("post.lua");
        std::fs::write(
            &script,
            "wrk.method = \"POST\"\nwrk.body = '{\"project\": \"touch\", \"params\": {\"n\": \"1\"}}'\n",
        )
        .unwrap();
        let out = Command::new("wrk")
            .args(["-t2", "-c32", "-d5s", "-s"])
            .arg(&script)
            .arg(&url)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        wrk_rps = text
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse::<f64>().ok());
    }
    let after = rss_kib(daemon.pid());
    drop(daemon);
    // Host and isolated networks: jobs one after the other as fast as they come back (the pool
    // is refilled meanwhile, on the same cores), and jobs 50 ms apart (a busy server's pace).
    let back_to_back = host_vs_isolated(&images, runs, Duration::ZERO);
    let paced = host_vs_isolated(&images, runs, Duration::from_millis(50));

    println!("mistryd on loopback, image cached ({runs} new-params jobs, 200 cache hits)");
    println!("{:<44} {:>10}   target", "", "measured");
    println!(
        "{:<44} {:>8.1}ms   <= 8 ms",
        "POST /jobs, new params (median)",
        ms(median(&mut fresh))
    );
    println!(
        "{:<44} {:>8.2}ms   <= 1 ms",
        "POST /jobs, result cache hit (median)",
        ms(median(&mut cached))
    );
    match wrk_rps {
        Some(r) => println!(
            "{:<44} {:>10.0}   >= 2000",
            "cache hits/s under wrk -t2 -c32 -d5s", r
        ),
        None => println!(
            "{:<44} {:>10}   >= 2000",
            "cache hits/s under wrk", "no wrk"
        ),
    }
    for (what, (host, isolated, diff)) in [("back to back", back_to_back), ("50 ms apart", paced)] {
        println!(
            "{:<44} {:>8.1}ms",
            format!("new params, {what}, host"),
            host
        );
        println!(
            "{:<44} {:>8.1}ms",
            format!("new params, {what}, isolated"),
            isolated
        );
        println!(
            "{:<44} {:>+8.1}ms   <= +3 ms",
            "  isolated - host (median of pairs)", diff
        );
    }
    println!(
        "{:<44} {:>7.1}MiB   <= 30 MiB",
        "idle daemon RSS",
        idle as f64 / 1024.0
    );
    println!(
        "{:<44} {:>7.1}MiB",
        "daemon RSS after the load",
        after as f64 / 1024.0
    );
}
