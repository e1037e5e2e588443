//! The cost of access control per request, on loopback: result-cache hits of `POST /jobs` and
//! `GET /index/` on two daemons side by side (their requests alternating, so that the machine's
//! noise hits both alike): one with access control off, one with 20 tokens (the request's
//! token is hashed and compared with every entry; the answer's body is watched for the token's
//! revocation), and the latter again with a web view's session cookie (and its CSRF token on
//! the POST). Medians of each and of the differences to "off"; target ≤ 0.1 ms per request.
//!
//! `cargo bench --bench access` (`BENCH_RUNS`: requests of each kind, default 500).

mod common;

use std::time::{Duration, Instant};

use common::{ms, Daemon};
use serde_json::json;

/// How many tokens the second daemon holds.
const TOKENS: usize = 20;

/// How a request authenticates.
#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Bearer(&'a str),
    /// The `Cookie` header and the CSRF token.
    Session(&'a str, &'a str),
}

/// `method` `url` (a POST with the job's body) with `auth`, once: the time to the answer.
fn request(agent: &ureq::Agent, method: &str, url: &str, auth: Auth<'_>) -> Duration {
    let t = Instant::now();
    let headers: Vec<(&str, String)> = match auth {
        Auth::None => Vec::new(),
        Auth::Bearer(tok) => vec![("authorization", format!("Bearer {tok}"))],
        Auth::Session(cookie, csrf) => {
            vec![
                ("cookie", cookie.to_string()),
                ("x-csrf-token", csrf.to_string()),
            ]
        }
    };
    let mut r = if method == "POST" {
        let mut req = agent.post(url);
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        req.send(r#"{"project": "touch", "params": {"n": "1"}}"#)
    } else {
        let mut req = agent.get(url);
        for (k, v) in &headers {
            req = req.header(*k, v);
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
    request(&agent, "POST", &jobs_off, Auth::None);
    request(&agent, "POST", &jobs_on, Auth::Bearer(&token));
    // A web view's sign-in: its cookies (the 303 not followed).
    let no_redirects = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .build(),
    );
    let mut r = no_redirects
        .post(&format!("http://{}/signin", on.addr))
        .header("content-type", "application/x-www-form-urlencoded")
        .send(format!("token={token}").as_str())
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        303,
        "{}",
        r.body_mut().read_to_string().unwrap()
    );
    let set: Vec<String> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_string))
        .collect();
    let cookie = set.join("; ");
    let csrf = set
        .iter()
        .find_map(|c| c.strip_prefix("mistry_csrf="))
        .unwrap()
        .to_string();
    let (index_off, index_on) = (
        format!("http://{}/index/", off.addr),
        format!("http://{}/index/", on.addr),
    );
    println!("access control per request, on loopback ({runs} of each, alternating)");
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10} {:>10}   target",
        "", "off", "20 tokens", "+", "cookie", "+"
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
        let (mut a, mut b, mut d, mut c, mut e) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let x = ms(request(&agent, method, url_off, Auth::None));
            let y = ms(request(&agent, method, url_on, Auth::Bearer(&token)));
            let z = ms(request(
                &agent,
                method,
                url_on,
                Auth::Session(&cookie, &csrf),
            ));
            a.push(x);
            b.push(y);
            d.push(y - x);
            c.push(z);
            e.push(z - x);
        }
        println!(
            "{:<34} {:>8.3}ms {:>8.3}ms {:>+8.3}ms {:>8.3}ms {:>+8.3}ms   <= +0.1 ms",
            what,
            med(&mut a),
            med(&mut b),
            med(&mut d),
            med(&mut c),
            med(&mut e)
        );
    }
}
