//! The cost of access control per request, on loopback: result-cache hits of `POST /jobs` and
//! `GET /index/` on two daemons side by side (their requests alternating, so that the machine's
//! noise hits both alike): one with access control off, one with 20 tokens (the request's
//! token is hashed and compared with every entry; the answer's body is watched for the token's
//! revocation). Medians of each and of the pairs' differences; target ≤ 0.1 ms per request.
//! The web view's session cookie is not measured: sign-in with a cookie is not there yet.
//!
//! `cargo bench --bench access` (`BENCH_RUNS`: requests of each kind, default 500).

mod common;

use std::time::{Duration, Instant};

use common::{ms, Daemon};
use serde_json::json;

/// How many tokens the second daemon holds.
const TOKENS: usize = 20;

/// `method` `url` (a POST with the job's body) with `token`, once: the time to the answer.
fn request(agent: &ureq::Agent, method: &str, url: &str, token: Option<&str>) -> Duration {
    let t = Instant::now();
    let mut r = if method == "POST" {
        let mut req = agent.post(url);
        if let Some(tok) = token {
            req = req.header("authorization", format!("Bearer {tok}"));
        }
        req.send(r#"{"project": "touch", "params": {"n": "1"}}"#)
    } else {
        let mut req = agent.get(url);
        if let Some(tok) = token {
            req = req.header("authorization", format!("Bearer {tok}"));
        }
        req.call()
    }
    .unwrap();
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap();
    assert!(status == 200 || status == 201, "{status}: {body}");
    t.elapsed()
}

fn med(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let images = common::busybox_images();
    let runs: usize = common::env_num("BENCH_RUNS", 500);
    // The token sent: the last of the 20 entries (every entry is compared whichever matches).
    let token = format!("mistry_bench_{}", "7".repeat(48));
    let tokens: Vec<_> = (0..TOKENS)
        .map(|i| {
            let t = if i + 1 == TOKENS {
                token.clone()
            } else {
                format!("mistry_bench_other_{i}")
            };
            json!({"name": format!("t{i}"),
                   "hash": mistry::access::hash_token(&t).iter().map(|b| format!("{b:02x}")).collect::<String>(),
                   "scopes": ["build"], "projects": ["touch", format!("p{i}-*")]})
        })
        .collect();
    let (d_off, d_on) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    common::touch_project(&d_off.path().join("projects"));
    common::touch_project(&d_on.path().join("projects"));
    let off = Daemon::start(&common::write_config(d_off.path(), &images, json!({})));
    let on = Daemon::start(&common::write_config(
        d_on.path(),
        &images,
        json!({ "tokens": tokens }),
    ));
    let agent = common::agent(None);
    let (jobs_off, jobs_on) = (
        format!("http://{}/jobs", off.addr),
        format!("http://{}/jobs", on.addr),
    );
    // The image built and the job run once: every request after is a cache hit.
    request(&agent, "POST", &jobs_off, None);
    request(&agent, "POST", &jobs_on, Some(&token));
    let (index_off, index_on) = (
        format!("http://{}/index/", off.addr),
        format!("http://{}/index/", on.addr),
    );
    println!("access control per request, on loopback ({runs} of each, alternating)");
    println!(
        "{:<34} {:>10} {:>10} {:>12}   target",
        "", "off", "20 tokens", "difference"
    );
    for (what, method, url_off, url_on) in [
        (
            "POST /jobs, cache hit (median)",
            "POST",
            &jobs_off,
            &jobs_on,
        ),
        ("GET /index/ (median)", "GET", &index_off, &index_on),
    ] {
        let (mut a, mut b, mut d) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let x = ms(request(&agent, method, url_off, None));
            let y = ms(request(&agent, method, url_on, Some(&token)));
            a.push(x);
            b.push(y);
            d.push(y - x);
        }
        println!(
            "{:<34} {:>8.3}ms {:>8.3}ms {:>+10.3}ms   <= +0.1 ms",
            what,
            med(&mut a),
            med(&mut b),
            med(&mut d)
        );
    }
    println!(
        "{:<34} {:>10}",
        "session cookie", "not there yet (no web sign-in)"
    );
}
