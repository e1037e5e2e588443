//! mistryd end to end: a real server process, busybox-based test projects, HTTP requests.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::server::{artifacts, check_artifact_contents, get_bytes, read, rsync_daemon, Server};
use common::{
    btrfs_dir_or_skip, closed_port, mistry_client_bin, mistryd_bin, wait_for, wait_until, Inetd,
};
use serde_json::Value;

mod common;

#[test]
fn simple_build_params_exit_codes_and_layout() {
    let s = Server::start(serde_json::json!({}));
    let info = s
        .job(serde_json::json!({"project": "simple", "params": {"name": "first", "_opaque": "x"}}));
    let keys: BTreeSet<&str> = info
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "Params",
            "Group",
            "Path",
            "Cached",
            "Coalesced",
            "Incremental",
            "ExitCode",
            "ErrBuild",
            "ContainerStdouterr",
            "ContainerStderr",
            "TransportMethod",
            "StartedAt",
            "Duration",
            "URL"
        ])
    );
    assert_eq!(info["ExitCode"], 0);
    assert_eq!(info["ErrBuild"], "");
    assert_eq!(info["TransportMethod"], "rsync");
    assert_eq!(info["ContainerStderr"], "err: first\n");
    assert!(info["ContainerStdouterr"]
        .as_str()
        .unwrap()
        .contains("out: first\n"));
    assert!(info["Duration"].as_i64().unwrap() > 0);
    let path = artifacts(&info);
    assert_eq!(read(path.join("name.txt")), "first");
    assert_eq!(
        read(path.join("params.txt")),
        "_opaque\nname\n",
        "opaque params reach the job"
    );
    let ready = path.parent().unwrap().parent().unwrap().to_path_buf();
    let id = ready.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(info["URL"], format!("job/simple/{id}"));
    assert_eq!(ready.parent().unwrap(), s.builds().join("simple/ready"));
    for f in [
        "out.log",
        "build_info.json",
        "data/cache",
        "data/params/name",
    ] {
        assert!(ready.join(f).exists(), "{f}");
    }
    let stored: Value = serde_json::from_str(&read(ready.join("build_info.json"))).unwrap();
    assert!(stored.get("ContainerStdouterr").is_none());
    assert_eq!(
        std::fs::read_link(s.builds().join("simple/latest")).unwrap(),
        ready
    );
    // Opaque params do not change the ID.
    let again = s
        .job(serde_json::json!({"project": "simple", "params": {"name": "first", "_opaque": "y"}}));
    assert_eq!(again["Cached"], true);
    assert_eq!(again["Path"], info["Path"]);

    // Exit code 77 is reported, and a failed build does not move `latest`.
    let failed =
        s.job(serde_json::json!({"project": "simple", "params": {"name": "f", "code": "77"}}));
    assert_eq!(failed["ExitCode"], 77);
    assert_eq!(
        std::fs::read_link(s.builds().join("simple/latest")).unwrap(),
        ready
    );
    // A failed build is re-run, not cached.
    let rerun =
        s.job(serde_json::json!({"project": "simple", "params": {"name": "f", "code": "77"}}));
    assert_eq!(
        (rerun["Cached"].as_bool(), rerun["ExitCode"].as_i64()),
        (Some(false), Some(77))
    );
    assert_eq!(s.pending_dirs("simple"), 0);
}

#[test]
fn copy_folder_and_failing_entrypoint() {
    let s = Server::start(serde_json::json!({}));
    let info = s.job(serde_json::json!({"project": "copyfolder"}));
    assert_eq!(info["ExitCode"], 0, "{info}");
    assert_eq!(read(artifacts(&info).join("folder/sub/b.txt")), "b\n");
    let info = s.job(serde_json::json!({"project": "failing"}));
    assert_eq!(info["ExitCode"], 127);
    let stderr = info["ContainerStderr"].as_str().unwrap();
    assert!(stderr.starts_with("oops\n"), "{stderr}");
    assert!(stderr.contains("nosuchcommand: not found"), "{stderr}");
}

#[test]
fn image_build_failures_move_to_ready_and_leave_nothing_pending() {
    let s = Server::start(serde_json::json!({}));
    let info = s.job(serde_json::json!({"project": "badimage"}));
    assert_eq!(info["ExitCode"], -999);
    let err = info["ErrBuild"].as_str().unwrap();
    assert!(err.starts_with("could not build docker image: "), "{err}");
    assert!(info["ContainerStdouterr"]
        .as_str()
        .unwrap()
        .contains("building\n"));
    for _ in 0..3 {
        let info = s.job(serde_json::json!({"project": "invalid"}));
        assert_eq!(info["ExitCode"], -999);
        assert!(
            info["ErrBuild"]
                .as_str()
                .unwrap()
                .contains("unknown instruction: INVALIDCOMMAND"),
            "{info}"
        );
        assert_eq!(s.pending_dirs("invalid"), 0);
        assert_eq!(
            std::fs::read_dir(s.builds().join("invalid/ready"))
                .unwrap()
                .count(),
            1
        );
    }
}

#[test]
fn groups_build_incrementally_and_only_success_moves_the_link() {
    let s = Server::start(serde_json::json!({}));
    let a = s.job(serde_json::json!({"project": "simple", "group": "g", "params": {"name": "a"}}));
    assert_eq!(
        (a["Incremental"].as_bool(), a["Group"].as_str()),
        (Some(false), Some("g"))
    );
    assert_eq!(read(artifacts(&a).join("count.txt")), "1\n");
    let b = s.job(serde_json::json!({"project": "simple", "group": "g", "params": {"name": "b"}}));
    assert_eq!(b["Incremental"], true);
    assert_eq!(
        read(artifacts(&b).join("count.txt")),
        "2\n",
        "cache/ carried over"
    );
    assert_ne!(a["Path"], b["Path"]);
    assert_eq!(read(artifacts(&b).join("name.txt")), "b");
    assert_eq!(
        read(artifacts(&b).join("params.txt")),
        "name\n",
        "params/ starts empty"
    );
    let link = s.builds().join("simple/groups/g");
    let b_ready = artifacts(&b)
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    assert_eq!(std::fs::read_link(&link).unwrap(), b_ready);
    // A failed build in the group does not move its link: the next one starts from b again.
    let c = s.job(serde_json::json!({"project": "simple", "group": "g", "params": {"name": "c", "code": "9"}}));
    assert_eq!(
        (c["ExitCode"].as_i64(), c["Incremental"].as_bool()),
        (Some(9), Some(true))
    );
    assert_eq!(std::fs::read_link(&link).unwrap(), b_ready);
    let d = s.job(serde_json::json!({"project": "simple", "group": "g", "params": {"name": "d"}}));
    assert_eq!(read(artifacts(&d).join("count.txt")), "3\n");
    // Another group starts from scratch.
    let other =
        s.job(serde_json::json!({"project": "simple", "group": "h", "params": {"name": "a"}}));
    assert_eq!(other["Incremental"], false);
}

fn concurrent(s: &Server, n: usize, code: &str) {
    let body = serde_json::json!({"project": "simple", "params": {"name": format!("c{n}"), "sleep": "1", "code": code}}).to_string();
    let results: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let body = body.clone();
                scope.spawn(move || {
                    let (status, text) = s.post("/jobs", &body);
                    assert_eq!(status, 201, "{text}");
                    serde_json::from_str::<Value>(&text).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ran = results.iter().filter(|r| r["Coalesced"] == false).count();
    assert_eq!(ran, 1, "exactly one request runs the job");
    let code: i64 = code.parse().unwrap();
    assert!(results.iter().all(|r| r["ExitCode"] == code));
    assert!(results.iter().all(|r| r["Path"] == results[0]["Path"]));
}

#[test]
fn concurrent_identical_requests_are_coalesced() {
    let s = Server::start(serde_json::json!({}));
    concurrent(&s, 2, "0");
    concurrent(&s, 2, "35");
    concurrent(&s, 20, "0");
    let (_, m) = s.get("/metrics", false);
    // 1 + 1 + 19 requests joined a running job.
    assert!(m.contains("mistry_builds_coalesced_total 21"), "{m}");
    assert!(m.contains("mistry_builds_started_total 3"), "{m}");
    // The hosted builds are counted when /metrics is read: every ready build of the project.
    let hosted = std::fs::read_dir(s.builds().join("simple/ready"))
        .unwrap()
        .count();
    assert!(hosted >= 2, "{hosted}");
    assert!(
        m.contains(&format!(
            "mistry_builds_hosted{{project=\"simple\"}} {hosted}\n"
        )),
        "{m}"
    );
}

#[test]
fn async_requests_and_the_job_endpoints() {
    let s = Server::start(serde_json::json!({}));
    let started = Instant::now();
    let (status, body) = s.post(
        "/jobs?async",
        r#"{"project": "simple", "params": {"name": "bg", "sleep": "1"}}"#,
    );
    assert_eq!((status, body.as_str()), (201, ""));
    assert!(started.elapsed() < Duration::from_millis(900));
    // While pending: the index shows it, the log streams.
    let mut id = String::new();
    wait_until("the job in the index", || {
        let (_, index) = s.get("/index/", false);
        let list: Value = serde_json::from_str(&index).unwrap();
        let Some(job) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["project"] == "simple")
        else {
            return false;
        };
        assert_eq!(job["state"], "pending");
        assert!(job["startedAt"].as_str().unwrap().contains(", "), "{job}");
        id = job["id"].as_str().unwrap().to_string();
        true
    });
    let (status, sse) = s.get(&format!("/log/simple/{id}"), false);
    assert_eq!(status, 200);
    assert!(sse.contains("data: out: bg\n"), "{sse}");
    // Ready: JSON with the header, HTML without, log 204.
    let (status, job) = s.get(&format!("/job/simple/{id}"), true);
    assert_eq!(status, 200);
    let job: Value = serde_json::from_str(&job).unwrap();
    assert_eq!(job["state"], "ready");
    assert_eq!(job["buildInfo"]["ExitCode"], 0);
    let (status, html) = s.get(&format!("/job/simple/{id}"), false);
    assert_eq!(status, 200);
    assert!(html.contains("<!doctype html>"));
    assert_eq!(s.get(&format!("/log/simple/{id}"), false).0, 204);
    assert_eq!(s.get("/job/simple/0000", true).0, 404);
}

#[test]
fn request_errors() {
    let s = Server::start(serde_json::json!({}));
    assert_eq!(
        s.get("/jobs", false),
        (405, "Expected POST, got GET".into())
    );
    let (status, text) = s.post("/jobs", r#"{"project": "nope"}"#);
    assert_eq!((status, text.as_str()), (404, "Unknown project 'nope'"));
    let (status, text) = s.post("/jobs", "{not json");
    assert_eq!(status, 400);
    assert!(text.starts_with("Error unmarshalling body"), "{text}");
    assert_eq!(
        s.post("/jobs", r#"{"params": {}}"#),
        (400, "no project given".into())
    );
    // Hostile names: 400, nothing written outside build_path.
    for body in [
        r#"{"project": "../projects/simple"}"#,
        r#"{"project": "simple", "group": "a/b"}"#,
        r#"{"project": "simple", "group": ".."}"#,
        r#"{"project": "simple", "params": {"../../escape": "x"}}"#,
        r#"{"project": "simple", "params": {"": "x"}}"#,
    ] {
        let (status, text) = s.post("/jobs", body);
        assert_eq!(status, 400, "{body}: {text}");
    }
    assert!(!s.dir.path().join("escape").exists());
    assert!(!s.builds().join("simple").exists(), "nothing was built");
}

#[test]
fn backlog_full_is_503() {
    let s = Server::start(serde_json::json!({"job_concurrency": 1, "job_backlog": 1}));
    let slow = |name: &str| {
        format!(r#"{{"project": "simple", "params": {{"name": "{name}", "sleep": "2"}}}}"#)
    };
    assert_eq!(s.post("/jobs?async", &slow("one")).0, 201);
    assert_eq!(s.post("/jobs?async", &slow("two")).0, 201);
    let (status, text) = s.post("/jobs?async", &slow("three"));
    assert_eq!(
        (status, text.as_str()),
        (503, "Server is overloaded; try again later")
    );
}

#[test]
fn time_limit_kills_the_job_and_says_so() {
    let s = Server::start(serde_json::json!({"time_limit": "1s"}));
    let started = Instant::now();
    let info =
        s.job(serde_json::json!({"project": "simple", "params": {"name": "slow", "sleep": "60"}}));
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(info["ExitCode"], -1);
    assert_eq!(
        info["ErrBuild"],
        "the job exceeded its time limit of 1s and was killed"
    );
    assert!(info["ContainerStdouterr"]
        .as_str()
        .unwrap()
        .contains("time limit of 1s"));
}

#[test]
fn sigkill_during_a_build_then_restart_cleans_up() {
    let mut s = Server::start(serde_json::json!({}));
    s.start_slow_job("k", "30");
    s.kill9();
    assert_eq!(s.pending_dirs("simple"), 1);
    s.spawn();
    assert_eq!(
        s.pending_dirs("simple"),
        0,
        "start-up removes pending builds"
    );
    let info = s.job(serde_json::json!({"project": "simple", "params": {"name": "k"}}));
    assert_eq!(info["ExitCode"], 0);
}

#[test]
fn sigterm_lets_running_jobs_finish() {
    let mut s = Server::start(serde_json::json!({}));
    s.start_slow_job("t", "1");
    let status = s.term();
    assert!(status.success(), "{status:?}");
    assert_eq!(s.pending_dirs("simple"), 0);
    let ready: Vec<_> = std::fs::read_dir(s.builds().join("simple/ready"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(ready.len(), 1);
    let info: Value = serde_json::from_str(&read(ready[0].path().join("build_info.json"))).unwrap();
    assert_eq!(info["ExitCode"], 0, "the job finished");
}

fn vm_hwm_kib(pid: u32) -> u64 {
    read(format!("/proc/{pid}/status"))
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_huge_log_keeps_the_daemons_memory_flat() {
    // Logs are cut at 64 MiB by default (tests/job_limits.rs): this server keeps them whole.
    let s = Server::start(serde_json::json!({"limits": {"log": "unlimited"}}));
    let pid = s.child.as_ref().unwrap().id();
    let bytes: u64 = 300 << 20;
    let body =
        serde_json::json!({"project": "loud", "params": {"bytes": bytes.to_string()}}).to_string();
    let mut r = Server::agent()
        .post(&s.url("/jobs"))
        .send(body.as_str())
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    // Read the (streamed) answer without keeping it: its size and its end.
    let mut reader = r.body_mut().with_config().limit(u64::MAX).reader();
    let mut total = 0u64;
    let mut last = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = std::io::Read::read(&mut reader, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
        last = buf[..n].to_vec();
    }
    assert!(
        total > bytes,
        "the whole log is in the answer ({total} bytes)"
    );
    assert!(
        String::from_utf8_lossy(&last).contains("\"URL\":\"job/loud/"),
        "a complete JSON object"
    );
    let hwm = vm_hwm_kib(pid);
    assert!(
        hwm < 100 * 1024,
        "mistryd peaked at {hwm} KiB for a {bytes}-byte log"
    );
    let log = std::fs::read_dir(s.builds().join("loud/ready"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("out.log");
    assert!(std::fs::metadata(log).unwrap().len() >= bytes);
}

#[test]
fn btrfs_backend_end_to_end() {
    let Some(dir) = btrfs_dir_or_skip() else {
        return;
    };
    let s = Server::start_in(
        Some(Path::new(&dir)),
        serde_json::json!({"filesystem": "btrfs"}),
    );
    let a = s.job(serde_json::json!({"project": "simple", "group": "g", "params": {"name": "a"}}));
    assert_eq!(a["ExitCode"], 0, "{a}");
    let b = s.job(serde_json::json!({"project": "simple", "group": "g", "params": {"name": "b"}}));
    assert_eq!(
        (
            b["Incremental"].as_bool(),
            read(artifacts(&b).join("count.txt"))
        ),
        (Some(true), "2\n".into())
    );
    // Build directories are subvolumes, and b started as a snapshot of a (inode 256 is a
    // subvolume's root).
    use std::os::unix::fs::MetadataExt;
    let ready_b = artifacts(&b)
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    assert_eq!(std::fs::metadata(&ready_b).unwrap().ino(), 256);
    assert_eq!(read(ready_b.join("data/params/name")), "b");
    let again =
        s.job(serde_json::json!({"project": "simple", "group": "g", "params": {"name": "b"}}));
    assert_eq!(again["Cached"], true);
}

#[test]
fn rebuild_rebuilds_every_image_and_names_failures() {
    let s = Server::start(serde_json::json!({}));
    // A job running in the daemon meanwhile is not disturbed (it outlasts both rebuilds).
    s.start_slow_job("busy", "6");
    let out = Command::new(mistryd_bin())
        .arg("rebuild")
        .arg("--config")
        .arg(&s.config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let projects = std::fs::read_dir(s.dir.path().join("projects"))
        .unwrap()
        .count();
    let expected = format!("Finished. Rebuilt: {}, Pruned images: ", projects - 2);
    assert!(stdout.starts_with(&expected), "{stdout}");
    assert!(stdout.trim_end().ends_with("Failed: 2"), "{stdout}");
    assert!(
        stderr.contains("Failed projects: badimage, invalid"),
        "{stderr}"
    );
    let out = Command::new(mistryd_bin())
        .args(["rebuild", "--project", "simple", "--config"])
        .arg(&s.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Rebuilt: 1,"));
    let info =
        s.job(serde_json::json!({"project": "simple", "params": {"name": "busy", "sleep": "6"}}));
    assert_eq!(
        (info["ExitCode"].as_i64(), info["Coalesced"].as_bool()),
        (Some(0), Some(true)),
        "{info}"
    );
}

#[test]
fn overlay_backend_end_to_end() {
    let s = Server::start(serde_json::json!({"filesystem": "overlay"}));
    let a = s.job(serde_json::json!({"project": "simple", "group": "g", "params": {"name": "a"}}));
    assert_eq!(a["ExitCode"], 0, "{a}");
    let b = s.job(serde_json::json!({"project": "simple", "group": "g", "params": {"name": "b"}}));
    assert_eq!(
        (
            b["Incremental"].as_bool(),
            read(artifacts(&b).join("count.txt"))
        ),
        (Some(true), "2\n".into())
    );
    let info = s.job(serde_json::json!({"project": "copyfolder"}));
    assert_eq!(read(artifacts(&info).join("folder/sub/b.txt")), "b\n");
    let info = s.job(serde_json::json!({"project": "badimage"}));
    assert_eq!(info["ExitCode"], -999);
}

// ---- The `mistry` client, end to end ----

fn client(s: &Server, args: &[&str]) -> (i32, String, String) {
    let port = s.addr.rsplit(':').next().unwrap().to_string();
    let out = Command::new(mistry_client_bin())
        .args(["build", "--host", "127.0.0.1", "--port", &port])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// All of it, symlinks kept as symlinks (http, rsync; scp follows them).
fn check_artifacts(target: &Path) {
    check_artifact_contents(target);
    assert_eq!(
        std::fs::read_link(target.join("link-to-dir")).unwrap(),
        Path::new("dir with spaces")
    );
    assert_eq!(read(target.join("link-to-file")), "deep\n");
}

#[test]
fn client_http_transport_params_and_clear_target() {
    let s = Server::start(serde_json::json!({}));
    let target = s.dir.path().join("target");
    let file = s.dir.path().join("value.txt");
    std::fs::write(&file, "from a file").unwrap();
    let (code, out, err) = client(
        &s,
        &[
            "--project",
            "artifacts",
            "-t",
            target.to_str().unwrap(),
            "--",
            "--name",
            &format!("@{}", file.display()),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let port = s.addr.rsplit(':').next().unwrap();
    assert!(
        out.starts_with(&format!(
            "Logs can be found at http://127.0.0.1:{port}/job/artifacts/"
        )),
        "{out}"
    );
    check_artifacts(&target);
    assert_eq!(read(target.join("name.txt")), "from a file");
    // A stale file stays without --clear-target and goes with it.
    std::fs::write(target.join("stale"), "x").unwrap();
    let (code, _, err) = client(
        &s,
        &[
            "--project",
            "artifacts",
            "-t",
            target.to_str().unwrap(),
            "--",
            "--name=b",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(target.join("stale").exists());
    let (code, _, err) = client(
        &s,
        &[
            "--project",
            "artifacts",
            "--clear-target",
            "-t",
            target.to_str().unwrap(),
            "--",
            "--name=b",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!target.join("stale").exists());
    assert_eq!(read(target.join("name.txt")), "b");
    // A target that is a file is an error.
    let (code, _, err) = client(
        &s,
        &["--project", "artifacts", "-t", file.to_str().unwrap()],
    );
    assert_eq!(
        (code, err.trim()),
        (1, format!("target {} is a file", file.display()).as_str())
    );
}

#[test]
fn client_messages_and_exit_codes() {
    let s = Server::start(serde_json::json!({"job_concurrency": 1, "job_backlog": 0}));
    let target = s.dir.path().join("t");
    let t = target.to_str().unwrap();
    // JSON result: the BuildInfo on stdout, nothing else.
    let (code, out, _) = client(
        &s,
        &[
            "--project",
            "simple",
            "--json-result",
            "-t",
            t,
            "--",
            "--name=j",
            "--_token",
            "x",
        ],
    );
    assert_eq!(code, 0);
    let info: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        info["Params"],
        serde_json::json!({"name": "j", "_token": "x"})
    );
    // Verbose: request, result and logs.
    let (code, out, _) = client(
        &s,
        &[
            "--project",
            "simple",
            "-v",
            "-g",
            "grp",
            "-t",
            t,
            "--",
            "--name=v",
        ],
    );
    assert_eq!(code, 0);
    assert!(out.starts_with("Sending request to http://"), "{out}");
    assert!(out.contains("Logs:\n") && out.contains("out: v\n"), "{out}");
    // A failing job.
    let (code, out, err) = client(
        &s,
        &["--project", "simple", "-t", t, "--", "--name=f", "--code=3"],
    );
    assert_eq!(code, 1);
    assert!(out.starts_with("Logs can be found at "), "{out}");
    assert_eq!(
        err,
        "Container error logs:\nerr: f\nBuild failed with exit code 3\n"
    );
    let (code, _, err) = client(&s, &["--project", "badimage", "-t", t]);
    assert_eq!(code, 1);
    assert_eq!(err, "Container error logs:\nThere are no container error logs.\nBuild failed with exit code -999\n");
    // Unknown project, timeout, overloaded, unreachable server.
    let (code, _, err) = client(&s, &["--project", "nope", "-t", t]);
    assert_eq!((code, err.as_str()), (1, "Unknown project 'nope'\n"));
    let (code, _, err) = client(
        &s,
        &[
            "--project",
            "simple",
            "--timeout",
            "1s",
            "-t",
            t,
            "--",
            "--name=slow",
            "--sleep=3",
        ],
    );
    assert_eq!(
        (code, err.as_str()),
        (1, "The build did not finish after 1s\n")
    );
    let (code, _, err) = client(&s, &["--project", "simple", "-t", t, "--", "--name=busy"]);
    assert_eq!(
        (code, err.as_str()),
        (1, "Server is overloaded; try again later\n")
    );
    wait_until("the slow job to end", || s.pending_dirs("simple") == 0);
    // --no-wait: nothing printed, the build completes.
    let (code, out, err) = client(
        &s,
        &[
            "--project",
            "simple",
            "--no-wait",
            "-t",
            t,
            "--",
            "--name=nw",
        ],
    );
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));
    wait_until("the async job", || {
        s.get("/index/", false).1.contains("\"nw\"") && s.pending_dirs("simple") == 0
    });
    let (_held, closed) = closed_port();
    let out = Command::new(mistry_client_bin())
        .args([
            "build",
            "--host",
            "127.0.0.1",
            "--port",
            &closed.to_string(),
            "--project",
            "x",
            "-t",
            t,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.starts_with("cannot reach the mistry server at http://127.0.0.1:"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // Completions.
    let out = Command::new(mistry_client_bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("_mistry()"));
}

fn whoami() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name
}

#[test]
fn client_rsync_transport() {
    let s = Server::start(serde_json::json!({}));
    let daemon = rsync_daemon(&s);
    let port = daemon.port;
    let target = s.dir.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("stale"), "x").unwrap();
    let (code, out, err) = client(
        &s,
        &[
            "--project",
            "artifacts",
            "--transport",
            "rsync",
            "--transport-port",
            &port.to_string(),
            "--clear-target",
            "-t",
            target.to_str().unwrap(),
        ],
    );
    drop(daemon);
    assert_eq!(code, 0, "{out}{err}");
    check_artifacts(&target);
    assert!(
        !target.join("stale").exists(),
        "--clear-target means --delete"
    );
}

#[test]
fn client_scp_transport() {
    let s = Server::start(serde_json::json!({}));
    let d = s.dir.path();
    for key in ["host_key", "user_key"] {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join(key))
            .status()
            .unwrap();
        assert!(st.success());
    }
    std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
    let sshd_config = d.join("sshd_config");
    std::fs::write(
        &sshd_config,
        format!(
            "HostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nSubsystem sftp internal-sftp\n",
            d = d.display()
        ),
    )
    .unwrap();
    // sshd cannot bind port 0 and report: it serves each connection inetd style (`-i`, on its
    // stdin) from a listener of ours.
    let config = sshd_config.clone();
    let sshd = Inetd::start("sshd", move || {
        let mut cmd = Command::new("/usr/sbin/sshd");
        cmd.args(["-i", "-e", "-f"])
            .arg(&config)
            .stderr(std::process::Stdio::null());
        cmd
    });
    let port = sshd.port;
    let ssh_config = d.join("ssh_config");
    std::fs::write(
        &ssh_config,
        format!(
            "Host 127.0.0.1\n  IdentityFile {d}/user_key\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n",
            d = d.display()
        ),
    )
    .unwrap();
    // A file with a set-uid bit on the server (an older server's build): scp, without -p as
    // the client runs it, does not keep the bit.
    let info = s.job(serde_json::json!({"project": "artifacts"}));
    assert_eq!(info["ExitCode"], 0, "{info}");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            artifacts(&info).join("large.md5"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
    }
    let target = d.join("target");
    let (code, out, err) = client(
        &s,
        &[
            "--project",
            "artifacts",
            "--transport",
            "scp",
            "--transport-port",
            &port.to_string(),
            "--transport-user",
            &whoami(),
            "--ssh-config",
            ssh_config.to_str().unwrap(),
            "-t",
            target.to_str().unwrap(),
        ],
    );
    drop(sshd);
    assert_eq!(code, 0, "{out}{err}");
    check_artifact_contents(&target);
    assert_eq!(mode_of(&target.join("large.md5")), 0o755);
}

#[test]
fn configured_mounts_reach_the_job() {
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("file"), "shared content\n").unwrap();
    let s =
        Server::start(serde_json::json!({"mounts": {shared.path().to_str().unwrap(): "/shared"}}));
    let info = s.job(serde_json::json!({"project": "simple", "params": {"name": "m"}}));
    assert_eq!(info["ExitCode"], 0, "{info}");
    assert_eq!(
        read(artifacts(&info).join("shared.txt")),
        "shared content\n"
    );
}

#[test]
fn sigterm_kills_jobs_still_running_after_the_grace_period() {
    let mut s = Server::start(serde_json::json!({}));
    s.grace = "1s".into();
    s.kill9();
    s.spawn();
    s.start_slow_job("long", "60");
    let started = Instant::now();
    let status = s.term();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        s.pending_dirs("simple"),
        0,
        "no pending directory survives a clean stop"
    );
    let ready: Vec<_> = std::fs::read_dir(s.builds().join("simple/ready"))
        .unwrap()
        .flatten()
        .collect();
    let info: Value = serde_json::from_str(&read(ready[0].path().join("build_info.json"))).unwrap();
    assert_eq!(info["ExitCode"], -1);
    assert_eq!(
        info["ErrBuild"],
        "the job was killed (the server is shutting down)"
    );
}

#[test]
fn client_rebuild_rebuilds_the_image() {
    let s = Server::start(serde_json::json!({}));
    let t = s.dir.path().join("t");
    let t = t.to_str().unwrap();
    let log = |args: &[&str]| {
        let mut all = vec!["--project", "simple", "--json-result", "-t", t];
        all.extend_from_slice(args);
        let (code, out, err) = client(&s, &all);
        assert_eq!(code, 0, "{err}");
        let info: Value = serde_json::from_str(out.trim()).unwrap();
        info["ContainerStdouterr"].as_str().unwrap().to_string()
    };
    log(&["--", "--name=r1"]);
    assert!(log(&["--", "--name=r2"]).contains("Using cache"));
    let rebuilt = log(&["--rebuild", "--", "--name=r3"]);
    assert!(!rebuilt.contains("Using cache"), "{rebuilt}");
}

#[test]
fn jobs_of_a_non_root_image_user_can_write_data() {
    let s = Server::start(serde_json::json!({}));
    let info = s.job(serde_json::json!({"project": "asuser", "group": "g"}));
    assert_eq!(info["ExitCode"], 0, "{info}");
    assert_eq!(read(artifacts(&info).join("uid")), "4321\n");
    let uid = nix::unistd::geteuid().as_raw();
    assert!(
        info["ContainerStdouterr"]
            .as_str()
            .unwrap()
            .contains(&format!("server uid {uid}")),
        "the uid build arg"
    );
    // The next build of the group (incremental, its cache/ carried over) works too.
    let again = s.job(serde_json::json!({"project": "asuser", "group": "g", "params": {"n": "2"}}));
    assert_eq!(
        (again["ExitCode"].as_i64(), again["Incremental"].as_bool()),
        (Some(0), Some(true)),
        "{again}"
    );
}

// ---- Issue 9: hostile jobs and hostile clients ----

/// The entries of a tar stream: (path, kind, link target).
fn tar_entries(bytes: &[u8]) -> Vec<(String, tar::EntryType, Option<String>)> {
    let mut archive = tar::Archive::new(bytes);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.path().unwrap().display().to_string(),
                e.header().entry_type(),
                e.link_name().unwrap().map(|l| l.display().to_string()),
            )
        })
        .collect()
}

/// Item 1: a job that replaces /data/artifacts (or what is in it) with links to host paths gets
/// nothing of the host served, by HTTP, rsync or scp.
#[test]
fn artifacts_through_symlinks_are_not_served() {
    let s = Server::start(serde_json::json!({}));
    for (project, mode, what) in [
        ("hostile", "abs", "a symlink"),
        ("hostile", "rel", "a symlink"),
        ("hostile", "file", "something that is not a directory"),
        ("hostileuser", "abs", "a symlink"),
    ] {
        let body = serde_json::json!({"project": project, "params": {"mode": mode}});
        let info = s.job(body.clone());
        let ctx = format!("{project} {mode}: {info}");
        assert_eq!(info["ExitCode"], 0, "{ctx}");
        assert_eq!(
            info["ErrBuild"],
            format!("the job replaced /data/artifacts with {what}; its artifacts are not served"),
            "{ctx}"
        );
        assert!(
            info["ContainerStdouterr"]
                .as_str()
                .unwrap()
                .contains("mistry: the job replaced /data/artifacts with"),
            "{ctx}"
        );
        // On disk (what rsync and scp read): no link left; an empty directory or nothing.
        let path = artifacts(&info);
        match std::fs::symlink_metadata(&path) {
            Ok(m) => {
                assert!(m.is_dir(), "{ctx}: {m:?}");
                assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0, "{ctx}");
            }
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{ctx}"),
        }
        // Over HTTP: an empty tar stream.
        let url = info["URL"].as_str().unwrap().strip_prefix("job/").unwrap();
        let (status, tar) = get_bytes(&s, &format!("/artifacts/{url}"));
        assert_eq!(status, 200, "{ctx}");
        assert_eq!(tar_entries(&tar), vec![], "{ctx}");
        // Not a successful build: not linked, not cached (the next request runs again).
        assert!(!s.builds().join(project).join("latest").exists(), "{ctx}");
        let again = s.job(body);
        assert_eq!(again["Cached"], false, "{ctx}");
        assert_eq!(again["ErrBuild"], info["ErrBuild"], "{ctx}");
    }
    // The client says so and fetches nothing.
    let target = s.dir.path().join("target");
    let (code, _, stderr) = client(
        &s,
        &[
            "--project",
            "hostile",
            "-t",
            target.to_str().unwrap(),
            "--",
            "--mode=abs",
        ],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("the job replaced /data/artifacts with a symlink"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);

    // Links inside artifacts stay links: never followed, by the server nor by the client.
    let info = s.job(serde_json::json!({"project": "hostile", "params": {"mode": "sub"}}));
    assert_eq!(
        (&info["ExitCode"], &info["ErrBuild"]),
        (&0.into(), &"".into()),
        "{info}"
    );
    let url = info["URL"].as_str().unwrap().strip_prefix("job/").unwrap();
    let (status, tar) = get_bytes(&s, &format!("/artifacts/{url}"));
    assert_eq!(status, 200);
    let mut entries = tar_entries(&tar);
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        entries,
        vec![
            ("ok.txt".to_string(), tar::EntryType::Regular, None),
            (
                "sub".to_string(),
                tar::EntryType::Symlink,
                Some("/etc".into())
            ),
            (
                "up".to_string(),
                tar::EntryType::Symlink,
                Some("../../../../../../../../../..".into())
            ),
        ]
    );
    let target = s.dir.path().join("target-sub");
    let (code, _, stderr) = client(
        &s,
        &[
            "--project",
            "hostile",
            "-t",
            target.to_str().unwrap(),
            "--",
            "--mode=sub",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(read(target.join("ok.txt")), "ok\n");
    assert_eq!(
        std::fs::read_link(target.join("sub")).unwrap(),
        Path::new("/etc")
    );

    // A link instead of data/cache is removed (the next build of the group would copy it and
    // the daemon write through it); the artifacts are still served.
    let info =
        s.job(serde_json::json!({"project": "hostile", "group": "g", "params": {"mode": "cache"}}));
    assert_eq!(
        (&info["ExitCode"], &info["ErrBuild"]),
        (&0.into(), &"".into()),
        "{info}"
    );
    let cache = artifacts(&info).parent().unwrap().join("cache");
    assert!(
        std::fs::symlink_metadata(&cache).unwrap().is_dir(),
        "{}",
        cache.display()
    );
}

/// A hand-written tar header (the tar crate refuses to write hostile names).
fn raw_entry(name: &str, kind: tar::EntryType, link: &str, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_entry_type(kind);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// A fake mistry server: every job succeeds, and its artifacts are `tar`.
fn fake_server(tar: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        for _ in 0..2 {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut first = String::new();
            reader.read_line(&mut first).unwrap();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0u8; length];
            std::io::Read::read_exact(&mut reader, &mut body).unwrap();
            let (ctype, answer): (&str, Vec<u8>) = if first.starts_with("POST /jobs") {
                let info = serde_json::json!({
                    "Params": {}, "Group": "", "Path": "/srv/x/ready/1/data/artifacts",
                    "Cached": false, "Coalesced": false, "Incremental": false, "ExitCode": 0,
                    "ErrBuild": "", "TransportMethod": "rsync", "StartedAt": "2024-01-01T00:00:00Z",
                    "Duration": 1, "URL": "job/p/1",
                });
                ("application/json", info.to_string().into_bytes())
            } else {
                ("application/x-tar", tar.clone())
            };
            let mut out = stream;
            let status = if first.starts_with("POST") {
                "201 Created"
            } else {
                "200 OK"
            };
            write!(
                out,
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                answer.len()
            )
            .unwrap();
            out.write_all(&answer).unwrap();
        }
    });
    (addr, handle)
}

/// Item 1, client side: a hostile server's tar stream cannot make `mistry build --transport
/// http` write outside its target.
#[test]
fn the_client_refuses_hostile_artifact_streams() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), "secret\n").unwrap();
    let outside_s = outside.to_str().unwrap().to_string();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "write through a symlink",
            [
                raw_entry("link", tar::EntryType::Symlink, &outside_s, b""),
                raw_entry("link/pwned", tar::EntryType::Regular, "", b"pwned\n"),
            ]
            .concat(),
        ),
        (
            "dot-dot",
            raw_entry("../outside/pwned", tar::EntryType::Regular, "", b"pwned\n"),
        ),
        (
            "hard link out",
            [
                raw_entry("hl", tar::EntryType::Link, "../outside/secret", b""),
                raw_entry("hl", tar::EntryType::Regular, "", b"pwned\n"),
            ]
            .concat(),
        ),
        (
            "directory through a symlink",
            [
                raw_entry("d", tar::EntryType::Symlink, &outside_s, b""),
                raw_entry("d/sub/", tar::EntryType::Directory, "", b""),
            ]
            .concat(),
        ),
    ];
    for (what, entries) in cases {
        let mut tar = entries;
        tar.extend_from_slice(&[0u8; 1024]);
        let (addr, server) = fake_server(tar);
        let (host, port) = addr.rsplit_once(':').unwrap();
        let target = dir
            .path()
            .join(format!("target-{}", what.replace(' ', "-")));
        let out = Command::new(mistry_client_bin())
            .args(["build", "--host", host, "--port", port, "--project", "p"])
            .arg("-t")
            .arg(&target)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        let _ = server.join();
        let mut names: Vec<String> = std::fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["secret".to_string()], "{what}: {stderr}");
        assert_eq!(read(outside.join("secret")), "secret\n", "{what}");
        assert!(!dir.path().join("pwned").exists(), "{what}");
    }
}

/// Item 10 (b): a page of another origin cannot schedule jobs; the Go client, curl (no Origin)
/// and the web view (same origin) can.
#[test]
fn cross_origin_requests_are_refused() {
    let s = Server::start(serde_json::json!({}));
    let body = r#"{"project": "simple", "params": {"name": "x"}}"#;
    for origin in [
        "http://evil.example",
        "null",
        "http://127.0.0.1:1",
        "https://evil.example",
    ] {
        let mut r = Server::agent()
            .post(&s.url("/jobs?async"))
            .header("Origin", origin)
            .header("Content-Type", "text/plain")
            .send(body)
            .unwrap();
        let text = r.body_mut().read_to_string().unwrap();
        assert_eq!(r.status().as_u16(), 403, "{origin}: {text}");
        assert_eq!(
            text,
            format!(
                "Cross-origin request refused: Origin '{origin}' is not this server (http://{})",
                s.addr
            )
        );
    }
    assert!(!s.builds().join("simple").exists(), "no job ran");
    // Same origin, and no origin at all.
    let mut r = Server::agent()
        .post(&s.url("/jobs"))
        .header("Origin", &format!("http://{}", s.addr))
        .send(body)
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        201,
        "{}",
        r.body_mut().read_to_string().unwrap()
    );
    let (status, _) = s.post("/jobs", body);
    assert_eq!(status, 201);
    // Reading stays open to any origin.
    let mut r = Server::agent()
        .get(&s.url("/index/"))
        .header("Origin", "http://evil.example")
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let _ = r.body_mut().read_to_string();
}

/// Raise this process's open files limit to the hard one; how many connections the test may hold.
fn raise_nofile() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let n = 1100.min(hard.saturating_sub(128) as usize);
    assert!(
        n >= 600,
        "this test needs ~1200 open files (hard limit {hard})"
    );
    n
}

/// Whether the server closed `c` (EOF or reset), without waiting.
fn closed(c: &std::net::TcpStream) -> bool {
    c.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match std::io::Read::read(&mut &*c, &mut buf) {
            Ok(0) => return true,
            // A 408 or similar before closing.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Item 10 (a): ~1100 half-open connections (silent, or half a header) do not stop the server
/// from answering, and are closed after the header timeout; so is an idle kept-alive connection.
#[test]
fn half_open_connections_do_not_starve_the_server() {
    use std::io::Write;
    let n = raise_nofile();
    let s = Server::start_with(
        None,
        serde_json::json!({}),
        &["--header-timeout", "2s", "--max-connections", "512"],
    );
    let opened = Instant::now();
    let mut held = Vec::new();
    for i in 0..n {
        let mut c = std::net::TcpStream::connect(&s.addr).unwrap();
        if i % 2 == 1 {
            c.write_all(b"GET /index/ HTTP/1.1\r\nHost: x\r\n").unwrap();
        }
        held.push(c);
    }
    // A normal client is still served, at once.
    let agent = Server::agent_within(Duration::from_secs(5));
    let t = Instant::now();
    let mut r = agent.get(&s.url("/index/")).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.body_mut().read_to_string().unwrap(), "[]");
    let mut r = agent
        .post(&s.url("/jobs"))
        .send(r#"{"project": "simple", "params": {"name": "busy"}}"#)
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let info: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(info["ExitCode"], 0);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // An idle kept-alive connection (after one request) is closed too.
    let mut idle = std::net::TcpStream::connect(&s.addr).unwrap();
    idle.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let n = std::io::Read::read(&mut idle, &mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let idle_since = Instant::now();
    // After the header timeout, every half-open connection is closed.
    wait_for(
        "the half-open connections to be closed",
        Duration::from_secs(15).saturating_sub(opened.elapsed()),
        || held.iter().all(closed),
    );
    wait_for(
        "the idle keep-alive connection to be closed",
        Duration::from_secs(5).saturating_sub(idle_since.elapsed()),
        || closed(&idle),
    );
    assert!(idle_since.elapsed() >= Duration::from_millis(1500));
    // And the server still answers.
    let r = agent.get(&s.url("/index/")).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

/// Item 10 (c): a /log stream follows the job's state in memory: it goes on while the job runs
/// whatever happens to build_info.json, and ends when the job does.
#[test]
fn log_streams_follow_the_job_state_in_memory() {
    use std::io::BufRead;
    let s = Server::start(serde_json::json!({}));
    let (status, _) = s.post("/jobs?async", r#"{"project": "ticker"}"#);
    assert_eq!(status, 201);
    wait_until("a pending ticker", || s.pending_dirs("ticker") > 0);
    let pending = std::fs::read_dir(s.builds().join("ticker/pending"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let id = pending.file_name().unwrap().to_string_lossy().into_owned();
    let mut r = Server::agent()
        .get(&s.url(&format!("/log/ticker/{id}")))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut lines = std::io::BufReader::new(r.body_mut().as_reader()).lines();
    let mut data = Vec::new();
    let mut spoiled = false;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            data.push(d.to_string());
            if !spoiled {
                // The on-disk state is not what drives the stream.
                std::fs::write(pending.join("build_info.json"), "garbage").unwrap();
                spoiled = true;
            }
        }
    }
    let job_lines: Vec<&String> = data
        .iter()
        .filter(|l| l.starts_with("\u{1b}[32mline "))
        .collect();
    assert_eq!(job_lines.len(), 8, "{data:?}");
    assert!(job_lines[7].contains("line 8"), "{data:?}");
    // The stream ended because the job did: it is ready now.
    let (status, job) = s.get(&format!("/job/ticker/{id}"), true);
    assert_eq!(status, 200);
    let job: Value = serde_json::from_str(&job).unwrap();
    assert_eq!(job["state"], "ready");
}

/// Item 10 (d): GET /index/ streams, one job at a time: memory stays flat with many jobs with
/// large params, and the JSON is mistry's.
#[test]
fn the_index_streams_with_flat_memory() {
    let s = Server::start(serde_json::json!({}));
    let pid = s.child.as_ref().unwrap().id();
    let n = 1000;
    let big = "x".repeat(100 << 10);
    for i in 0..n {
        let id = format!("{i:064x}");
        let dir = s.builds().join("simple/ready").join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        let info = serde_json::json!({
            "Params": {"big": big, "i": i.to_string()}, "Group": "", "Path": dir.join("data/artifacts"),
            "Cached": false, "Coalesced": false, "Incremental": false, "ExitCode": 0, "ErrBuild": "",
            "TransportMethod": "rsync", "StartedAt": format!("2024-01-01T00:{:02}:{:02}.000000000Z", i / 60, i % 60),
            "Duration": 1, "URL": format!("job/simple/{id}"),
        });
        std::fs::write(dir.join("build_info.json"), info.to_string()).unwrap();
    }
    let before = vm_hwm_kib(pid);
    let (status, body) = get_bytes(&s, "/index/");
    assert_eq!(status, 200);
    assert!(body.len() > n * (100 << 10));
    let list: Value = serde_json::from_slice(&body).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), n);
    // Newest first, mistry's fields.
    assert_eq!(list[0]["buildInfo"]["Params"]["i"], (n - 1).to_string());
    assert_eq!(list[n - 1]["buildInfo"]["Params"]["i"], "0");
    assert_eq!(list[0]["state"], "ready");
    assert_eq!(list[0]["project"], "simple");
    assert_eq!(list[0]["startedAt"], "Mon, 01 Jan 2024 00:16:39");
    let mut keys: Vec<&String> = list[0].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["buildInfo", "id", "project", "startedAt", "state"]);
    let hwm = vm_hwm_kib(pid);
    assert!(
        hwm < before + 40 * 1024,
        "mistryd went from {before} KiB to {hwm} KiB for a {}-byte index",
        body.len()
    );
}

/// Write project `name` (a Dockerfile running `script`) into a running server's projects.
fn add_project(s: &Server, name: &str, script: &str, mistry_json: Option<&str>) {
    let dir = s.dir.path().join("projects").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox\nCOPY job.sh /job.sh\nENTRYPOINT [\"/bin/sh\", \"/job.sh\"]\n",
    )
    .unwrap();
    std::fs::write(dir.join("job.sh"), script).unwrap();
    if let Some(text) = mistry_json {
        std::fs::write(dir.join(".mistry.json"), text).unwrap();
    }
}

const CONFINEMENT_SH: &str = r#"#!/bin/sh
grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status | tr -d ' \t' > /data/artifacts/status
wc -c < /proc/keys | tr -d ' ' > /data/artifacts/keys
"#;

#[test]
fn jobs_run_under_the_operators_seccomp_and_limits_which_projects_cannot_relax() {
    let s = Server::start(serde_json::json!({
        "limits": {"processes": 64, "disk": "1MiB"},
        "projects": {"lenient": {"seccomp": "unconfined"}}
    }));
    // The default: seccomp filter on, /proc/keys masked.
    add_project(&s, "confined", CONFINEMENT_SH, None);
    // A project's own file asks for everything, and gets nothing.
    add_project(
        &s,
        "greedy",
        CONFINEMENT_SH,
        Some(
            r#"{"seccomp": "unconfined", "nested_user_namespaces": true, "limits": {"processes": 100000}}"#,
        ),
    );
    // The operator's entry for a project does relax it.
    add_project(&s, "lenient", CONFINEMENT_SH, None);
    for (project, seccomp) in [("confined", "2"), ("greedy", "2"), ("lenient", "0")] {
        let info = s.job(serde_json::json!({"project": project}));
        assert_eq!(info["ExitCode"], 0, "{project}: {info}");
        let dir = artifacts(&info);
        assert_eq!(
            read(dir.join("status")),
            format!("NoNewPrivs:1\nSeccomp:{seccomp}\n"),
            "{project}"
        );
        assert_eq!(read(dir.join("keys")), "0\n", "{project}");
    }

    // A fork bomb is held to the operator's limit (the project's file asks for more) and said so.
    add_project(
        &s,
        "bomb",
        "#!/bin/sh\nbomb() { bomb | bomb & }\nbomb\nsleep 3\n",
        Some(r#"{"limits": {"processes": 100000}}"#),
    );
    let started = Instant::now();
    let info = s.job(serde_json::json!({"project": "bomb"}));
    assert!(started.elapsed() < Duration::from_secs(25), "{info}");
    if nix::unistd::geteuid().is_root() {
        // Host root is exempt from RLIMIT_NPROC: the watchdog (or a v1 cgroup) kills the job.
        assert_eq!(info["ExitCode"], -1, "{info}");
        assert_eq!(
            info["ErrBuild"], "the job exceeded its process limit of 64 and was killed",
            "{info}"
        );
    } else {
        // Unprivileged, RLIMIT_NPROC in the sandbox's user namespace refuses the forks past
        // the limit (the sandbox tests count them); the job ends on its own.
        assert!(
            info["ExitCode"] == 0
                || info["ErrBuild"] == "the job exceeded its process limit of 64 and was killed",
            "{info}"
        );
    }

    // data/ over the disk limit: the build fails and is not served as a success.
    add_project(
        &s,
        "hoarder",
        "#!/bin/sh\nfor f in a b c; do head -c 600000 /dev/zero > /data/cache/$f; done\necho ok > /data/artifacts/ok\n",
        None,
    );
    let info = s.job(serde_json::json!({"project": "hoarder", "group": "g"}));
    // Killed while it writes (the disk watch looks every 200 ms: tests/job_limits.rs), or, when
    // it ended first, found over the limit when it ended.
    assert!(
        (info["ExitCode"] == 0
            && info["ErrBuild"]
                == "the job's /data holds more than its disk limit of 1048576 bytes")
            || (info["ExitCode"] == -1
                && info["ErrBuild"]
                    == "the job exceeded its disk limit of 1048576 bytes and was killed"),
        "{info}"
    );
    assert!(!s.builds().join("hoarder/groups/g").exists());
    let again = s.job(serde_json::json!({"project": "hoarder", "group": "g"}));
    assert_eq!(
        again["Cached"], false,
        "a failed build is run again: {again}"
    );
    // One file larger than the whole limit is cut off by the file size limit.
    add_project(
        &s,
        "bigfile",
        "#!/bin/sh\nhead -c 2000000 /dev/zero > /data/cache/big\necho \"head: $?\" >&2\n",
        None,
    );
    let info = s.job(serde_json::json!({"project": "bigfile"}));
    if info["ExitCode"] != -1 {
        // (Unless the disk watch killed it first: the file and data/ are at the limit.)
        assert_eq!(
            info["ContainerStderr"], "File size limit exceeded\nhead: 153\n",
            "{info}"
        );
    }
    let len = std::fs::metadata(s.builds().join(format!(
        "bigfile/ready/{}/data/cache/big",
        info["URL"].as_str().unwrap().rsplit('/').next().unwrap()
    )))
    .unwrap()
    .len();
    if info["ExitCode"] == -1 {
        assert!(len <= 1 << 20, "{len}");
    } else {
        assert_eq!(len, 1 << 20);
    }
}

#[test]
fn subordinate_sandbox_ids_keep_a_root_daemons_jobs_off_host_root() {
    if !nix::unistd::geteuid().is_root() {
        // An unprivileged daemon refuses the setting, saying why.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("p")).unwrap();
        std::fs::create_dir_all(dir.path().join("b")).unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(
            &config,
            serde_json::json!({"projects_path": dir.path().join("p"), "build_path": dir.path().join("b")})
                .to_string(),
        )
        .unwrap();
        let out = Command::new(mistryd_bin())
            .args([
                "--config",
                config.to_str().unwrap(),
                "--addr",
                "127.0.0.1:1",
            ])
            .args(["--sandbox-ids", "subordinate"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("--sandbox-ids subordinate is for a daemon running as root"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let subuid: u32 = std::fs::read_to_string("/etc/subuid")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("root:")?.split(':').next()?.parse().ok())
        .expect("root has a subordinate range (scripts/setup.sh)");
    let s = Server::start_with(
        None,
        serde_json::json!({}),
        &["--sandbox-ids", "subordinate"],
    );
    // The sandbox's root must be able to reach the store and the builds.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    add_project(
        &s,
        "whoami",
        "#!/bin/sh\nid -u > /data/artifacts/uid\ncat /data/params/name > /data/artifacts/name\ntouch /data/cache/c\n",
        None,
    );
    let info =
        s.job(serde_json::json!({"project": "whoami", "params": {"name": "x"}, "group": "g"}));
    assert_eq!(info["ExitCode"], 0, "{info}");
    let dir = artifacts(&info);
    assert_eq!(read(dir.join("uid")), "0\n", "root inside");
    assert_eq!(read(dir.join("name")), "x");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(dir.join("uid")).unwrap().uid(),
        subuid,
        "but a subordinate id on the host"
    );
    // The build's directory, private to the daemon and sandbox root's group while the job ran,
    // is the daemon's and readable again.
    let build = dir.parent().unwrap().parent().unwrap();
    let meta = std::fs::metadata(build).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o755, 0));
    // The next build of the group starts from it and can still write.
    let info =
        s.job(serde_json::json!({"project": "whoami", "params": {"name": "y"}, "group": "g"}));
    assert_eq!(
        (info["ExitCode"].clone(), info["Incremental"].clone()),
        (0.into(), true.into()),
        "{info}"
    );
    assert_eq!(read(artifacts(&info).join("name")), "y");
    // The store remembers the mapping: a daemon with the other one refuses it.
    let store = s.builds().join(".mistry");
    let out = Command::new(mistryd_bin())
        .args([
            "--config",
            s.config.to_str().unwrap(),
            "--addr",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "the layer store {} was made with sandbox root {subuid}:",
            store.canonicalize().unwrap().display()
        )) && err.contains("and this process maps sandbox root 0:0"),
        "{err}"
    );
}

/// A job listing its non-opaque params (`name=value`, in name order) in its artifacts; with the
/// opaque param `_gate`, it first waits for `/gate/<_gate>` to exist.
const PARAMS_SH: &str = r#"#!/bin/sh
gate=$(cat /data/params/_gate 2>/dev/null)
if [ -n "$gate" ]; then
    while [ ! -e "/gate/$gate" ]; do sleep 0.05; done
fi
for f in /data/params/[!_]*; do
    [ -e "$f" ] || continue
    printf '%s=%s\n' "${f##*/}" "$(cat "$f")"
done > /data/artifacts/params.txt
"#;

/// mistry's job ID of a request of a project directory holding only files, computed here as
/// mistry defines it: sha256 of the project, the group, each non-opaque param's name and value,
/// then each file's name, NUL, mode (little-endian), content and 0xff.
fn mistry_id(project: &str, group: &str, params: &Value, dir: &Path) -> String {
    use sha2::Digest;
    use std::os::unix::fs::MetadataExt;
    let mut h = sha2::Sha256::new();
    h.update(project);
    h.update(group);
    let params: std::collections::BTreeMap<String, String> =
        serde_json::from_value(params.clone()).unwrap();
    for (k, v) in params.iter().filter(|(k, _)| !k.starts_with('_')) {
        h.update(k);
        h.update(v);
    }
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let meta = std::fs::symlink_metadata(&f).unwrap();
        assert!(meta.is_file(), "{}", f.display());
        h.update(f.file_name().unwrap().as_encoded_bytes());
        h.update([0]);
        h.update(meta.mode().to_le_bytes());
        h.update(std::fs::read(&f).unwrap());
        h.update([0xff]);
    }
    hex::encode(h.finalize())
}

/// `POST /jobs` of `body` (waiting for the job), failing after a minute rather than hanging
/// (a request made to wait on another request's job that never ends).
fn job_within_a_minute(s: &Server, body: &Value) -> Value {
    let (url, text) = (s.url("/jobs"), body.to_string());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = Server::agent().post(&url).send(&text).unwrap();
        let _ = tx.send((r.status().as_u16(), r.body_mut().read_to_string().unwrap()));
    });
    let (status, text) = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no answer to {body} within a minute"));
    assert_eq!(status, 201, "{body}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// Requests whose mistry job IDs collide (`{a: "1b2"}` / `{a: "1", b: "2"}`, `{ab: "1"}` /
/// `{a: "b1"}`, group `gx1` / group `g` with `x=1`), in both orders, the first one done or
/// still in flight: each gets a build of its own with its own params — the first by mistry's
/// ID, exactly as mistry computes it, the other by its exact ID — and each is a result-cache
/// hit of its own build afterwards; the group links point at each group's build.
#[test]
fn requests_sharing_a_mistry_job_id_never_get_each_others_build() {
    let gates = tempfile::tempdir().unwrap();
    let s = Server::start(serde_json::json!({
        "mounts": {gates.path().to_str().unwrap(): "/gate"},
    }));
    add_project(&s, "collide", PARAMS_SH, None);
    let project_dir = s.dir.path().join("projects/collide");
    let expected = |req: &Value| -> String {
        let params = req["params"].as_object().unwrap();
        params
            .iter()
            .filter(|(k, _)| !k.starts_with('_'))
            .map(|(k, v)| format!("{k}={}\n", v.as_str().unwrap()))
            .collect()
    };
    let req = |group: &str, params: Value| serde_json::json!({"project": "collide", "group": group, "params": params});
    let check = |req: &Value, info: &Value| {
        assert_eq!(info["ExitCode"], 0, "{info}");
        assert_eq!(info["Params"], req["params"], "{info}");
        assert_eq!(info["Group"], req["group"], "{info}");
        assert_eq!(
            read(artifacts(info).join("params.txt")),
            expected(req),
            "the build of {req} is not its own: {info}"
        );
    };
    let mut case = 0;
    let mut check_pair = |first: Value, second: Value, in_flight: bool| {
        case += 1;
        let gate = format!("gate{case}");
        let mut first = first;
        let first_id = mistry_id(
            "collide",
            first["group"].as_str().unwrap(),
            &first["params"],
            &project_dir,
        );
        assert_eq!(
            first_id,
            mistry_id(
                "collide",
                second["group"].as_str().unwrap(),
                &second["params"],
                &project_dir
            ),
            "{first} and {second} do not collide"
        );
        let (a, b) = if in_flight {
            // The first one is queued and waits for its gate while the second is asked for.
            first["params"]["_gate"] = Value::from(gate.clone());
            let (status, text) = s.post("/jobs?async", &first.to_string());
            assert_eq!(status, 201, "{text}");
            let b = job_within_a_minute(&s, &second);
            assert_eq!(b["Coalesced"], false, "{b}");
            // The same request as the first still joins it.
            let joined = std::thread::scope(|scope| {
                let waiting = scope.spawn(|| job_within_a_minute(&s, &first));
                std::thread::sleep(Duration::from_millis(200));
                std::fs::write(gates.path().join(&gate), "").unwrap();
                waiting.join().unwrap()
            });
            (joined, b)
        } else {
            let a = job_within_a_minute(&s, &first);
            (a, job_within_a_minute(&s, &second))
        };
        check(&first, &a);
        check(&second, &b);
        assert_eq!(b["Cached"], false, "{b}");
        assert_eq!(common::server::job_id(&a), first_id, "{a}");
        assert_ne!(common::server::job_id(&b), first_id, "{b}");
        // Each is a result-cache hit of its own build now.
        for (req, built) in [(&first, &a), (&second, &b)] {
            let again = job_within_a_minute(&s, req);
            assert_eq!(again["Cached"], true, "{again}");
            assert_eq!(again["Path"], built["Path"], "{again}");
            check(req, &again);
        }
        // A group's link points at its own build.
        for (req, built) in [(&first, &a), (&second, &b)] {
            let group = req["group"].as_str().unwrap();
            if !group.is_empty() {
                let link = s.builds().join("collide/groups").join(group);
                assert_eq!(
                    std::fs::read_link(&link).unwrap(),
                    artifacts(built).parent().unwrap().parent().unwrap()
                );
            }
        }
    };
    for in_flight in [false, true] {
        for t in ["1", "2"] {
            let t = format!("{t}{}", u8::from(in_flight));
            let pairs = [
                (
                    req("", serde_json::json!({"a": format!("{t}b{t}")})),
                    req("", serde_json::json!({"a": t, "b": t})),
                ),
                (
                    req("", serde_json::json!({"ab": t})),
                    req("", serde_json::json!({"a": format!("b{t}")})),
                ),
                (
                    req(&format!("g{t}x1"), serde_json::json!({})),
                    req(&format!("g{t}"), serde_json::json!({"x": "1"})),
                ),
            ];
            for (x, y) in pairs {
                // Both orders: the tag's first round one way, its second the other.
                if t.starts_with('1') {
                    check_pair(x, y, in_flight);
                } else {
                    check_pair(y, x, in_flight);
                }
            }
        }
    }
    // A request that collides with nothing keeps mistry's ID.
    let solo = req("", serde_json::json!({"a": "solo", "_o": "x"}));
    let info = job_within_a_minute(&s, &solo);
    check(&solo, &info);
    assert_eq!(
        common::server::job_id(&info),
        mistry_id("collide", "", &solo["params"], &project_dir)
    );
}

/// A `POST /jobs` whose headers (with `Expect: 100-continue`) the server has read and whose
/// body it waits for: the `100 Continue` came, and the first bytes of a `length`-byte body
/// were sent.
fn slow_body(s: &Server, length: usize) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(&s.addr).unwrap();
    c.write_all(
        format!(
            "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let expected = b"HTTP/1.1 100 Continue\r\n\r\n";
    let mut got = vec![0u8; expected.len()];
    c.read_exact(&mut got).unwrap();
    assert_eq!(got, expected, "{}", String::from_utf8_lossy(&got));
    c.write_all(b"{\"pr").unwrap();
    c
}

/// Send one more body byte on every connection still open, every 300 ms, until `stop`.
fn drip(conns: Vec<std::net::TcpStream>, stop: std::sync::mpsc::Receiver<()>) {
    use std::io::Write;
    let mut conns: Vec<_> = conns.into_iter().map(Some).collect();
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        stop.recv_timeout(Duration::from_millis(300))
    {
        for slot in &mut conns {
            if slot.as_mut().is_some_and(|c| c.write_all(b"o").is_err()) {
                *slot = None;
            }
        }
    }
}

/// Issue 20, class 7: clients that send a request's headers, then its body a byte at a time,
/// hold no connection slot the server needs: at the cap (20), the oldest of them is closed to
/// serve a new request; and a body not received within `--body-timeout` is answered 408 and
/// its connection closed, while complete requests are served as before.
#[test]
fn slow_request_bodies_neither_hold_the_connection_cap_nor_last() {
    let agent = Server::agent_within(Duration::from_secs(20));
    // The cap full of slow bodies (the body timeout is the default, a minute).
    let s = Server::start_with(None, serde_json::json!({}), &["--max-connections", "20"]);
    let held: Vec<_> = (0..20).map(|_| slow_body(&s, 1000)).collect();
    let watched: Vec<_> = held.iter().map(|c| c.try_clone().unwrap()).collect();
    let (stop, stopped) = std::sync::mpsc::channel();
    let dripping = std::thread::spawn(move || drip(held, stopped));
    let mut r = agent
        .post(&s.url("/jobs"))
        .send(r#"{"project": "simple", "params": {"name": "legit"}}"#)
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let info: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(info["ExitCode"], 0, "{info}");
    let r = agent.get(&s.url("/index/")).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        watched.iter().any(closed),
        "no slow body was evicted to make room"
    );
    let _ = stop.send(());
    dripping.join().unwrap();
    drop(s);

    // A short body timeout: a body dripping in, or never sent, gets a 408 and the connection
    // closes; a complete request is served.
    let s = Server::start_with(None, serde_json::json!({}), &["--body-timeout", "1s"]);
    for dripped in [true, false] {
        use std::io::Read;
        let c = slow_body(&s, 1000);
        let (stop, stopped) = std::sync::mpsc::channel();
        let dripping = dripped.then(|| {
            let c = c.try_clone().unwrap();
            std::thread::spawn(move || drip(vec![c], stopped))
        });
        // Up to the end of the connection (a reset when the dripped bytes were not read).
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match (&c).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("{e}: {}", String::from_utf8_lossy(&answer)),
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert!(
            answer.ends_with("Request body not received within 1s"),
            "{answer}"
        );
        let _ = stop.send(());
        if let Some(d) = dripping {
            d.join().unwrap();
        }
    }
    let mut r = agent
        .post(&s.url("/jobs"))
        .send(r#"{"project": "simple", "params": {"name": "whole"}}"#)
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let info: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(info["ExitCode"], 0, "{info}");
}

/// Issue 20, class 7: a client that stops reading a large streamed answer (a 20 MiB artifact)
/// has its connection closed after `--send-timeout` (which frees the thread writing the
/// answer) instead of holding it until it goes away.
#[test]
fn an_answer_nobody_reads_is_cut_after_the_send_timeout() {
    use nix::sys::socket::{connect, setsockopt, socket, sockopt, AddressFamily, SockFlag};
    use std::io::{Read, Write};
    let s = Server::start_with(None, serde_json::json!({}), &["--send-timeout", "1s"]);
    let info = s.job(serde_json::json!({"project": "artifacts"}));
    assert_eq!(info["ExitCode"], 0, "{info}");
    let id = common::server::job_id(&info);
    // A small receive buffer (no autotuning): the server's writes stall soon.
    let fd = socket(
        AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::RcvBuf, &65536).unwrap();
    let addr: std::net::SocketAddr = s.addr.parse().unwrap();
    let std::net::SocketAddr::V4(v4) = addr else {
        panic!("{addr}")
    };
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &nix::sys::socket::SockaddrIn::from(v4),
    )
    .unwrap();
    let mut c = std::net::TcpStream::from(fd);
    c.write_all(format!("GET /artifacts/artifacts/{id} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    // Read nothing for a while: the server gives up after a second of stalled writes.
    std::thread::sleep(Duration::from_secs(4));
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let ended = loop {
        match c.read(&mut buf) {
            Ok(0) => break "closed",
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
            Err(e) => panic!("after {total} bytes: {e}"),
        }
    };
    assert!(
        total < 20 << 20,
        "the whole answer ({total} bytes) came: it was not cut ({ended})"
    );
}
/// The permission bits (`0o7777`) of `p`, not following a link.
fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Every (path, mode) of a tar stream.
fn tar_modes(bytes: &[u8]) -> Vec<(String, u32)> {
    let mut archive = tar::Archive::new(bytes);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.path().unwrap().display().to_string(),
                e.header().mode().unwrap(),
            )
        })
        .collect()
}

/// What the setid project's job leaves, as every copy of it must have it: no set-id bit.
fn check_setid_artifacts(art: &Path, plain: u32) {
    for (name, want) in [
        ("suid", 0o755),
        ("sgid", 0o755),
        ("sgid-dir", 0o775),
        ("sgid-dir/both", 0o711),
        ("plain", plain),
    ] {
        assert_eq!(mode_of(&art.join(name)), want, "{name}");
    }
}

/// Issue 20, class 8: a job's set-uid and set-gid files (owned by the daemon's user, host root
/// for a root daemon) never leave the sandbox with their bits: not on disk once the job ended
/// (what rsync and scp of build_path read), not in `data/cache` (the next build's), not in
/// `GET /artifacts`, not through the client's http and rsync transports — the last two even
/// when a file on the server has one.
#[test]
fn set_id_bits_never_leave_the_sandbox() {
    let s = Server::start(serde_json::json!({}));
    let info = s.job(serde_json::json!({"project": "setid"}));
    assert_eq!(
        (&info["ExitCode"], &info["ErrBuild"]),
        (&0.into(), &"".into()),
        "{info}"
    );
    let art = artifacts(&info);
    let data = art.parent().unwrap();
    check_setid_artifacts(&art, 0o640);
    assert_eq!(mode_of(&data.join("cache/tool")), 0o755);
    assert_eq!(mode_of(data.parent().unwrap()), 0o755, "readable again");
    assert!(
        info["ContainerStdouterr"].as_str().unwrap().contains(
            "mistry: removed the set-uid/set-gid bits of 5 files and directories in /data"
        ),
        "{info}"
    );

    // A file that has a set-uid bit on the server anyway (an older server's build): not served
    // with it, nor fetched with it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(art.join("plain"), std::fs::Permissions::from_mode(0o4750)).unwrap();
    let id = common::server::job_id(&info);
    let (status, tar) = get_bytes(&s, &format!("/artifacts/setid/{id}"));
    assert_eq!(status, 200);
    let modes = tar_modes(&tar);
    assert!(modes.contains(&("plain".into(), 0o750)), "{modes:?}");
    assert!(modes.contains(&("suid".into(), 0o755)), "{modes:?}");
    assert!(modes.iter().all(|(_, m)| m & 0o6000 == 0), "{modes:?}");

    let daemon = rsync_daemon(&s);
    for transport in ["http", "rsync"] {
        let target = s.dir.path().join(format!("target-{transport}"));
        let port = daemon.port.to_string();
        let mut args = vec!["--project", "setid", "--transport", transport];
        if transport == "rsync" {
            args.extend(["--transport-port", &port]);
        }
        args.extend(["-t", target.to_str().unwrap()]);
        let (code, out, err) = client(&s, &args);
        assert_eq!(code, 0, "{transport}: {out}{err}");
        check_setid_artifacts(&target, 0o750);
    }
}

/// Issue 20, class 8: set-id files of the image's user (another id than the daemon's: for an
/// unprivileged daemon, one only the user namespace may change), one in a directory that only
/// that id may list: their bits go too.
#[test]
fn set_id_bits_of_another_id_in_a_locked_directory_go_too() {
    use std::os::unix::fs::MetadataExt;
    let s = Server::start(serde_json::json!({}));
    let info = s.job(serde_json::json!({"project": "setiduser", "params": {"locked": "1"}}));
    assert_eq!(
        (&info["ExitCode"], &info["ErrBuild"]),
        (&0.into(), &"".into()),
        "{info}"
    );
    let art = artifacts(&info);
    assert_ne!(
        std::fs::symlink_metadata(art.join("suid")).unwrap().uid(),
        nix::unistd::geteuid().as_raw(),
        "the job's files are another id's"
    );
    check_setid_artifacts(&art, 0o640);
    assert_eq!(mode_of(&art.join("locked")), 0o311);
    assert_eq!(mode_of(&art.join("locked/inner")), 0o755);
    assert_eq!(mode_of(&art.parent().unwrap().join("cache/tool")), 0o755);
    assert!(
        info["ContainerStdouterr"].as_str().unwrap().contains(
            "mistry: removed the set-uid/set-gid bits of 6 files and directories in /data"
        ),
        "{info}"
    );
}

/// Issue 20, class 8: while a job runs (before its set-id bits are removed), its build
/// directory is the daemon's alone: other local users cannot reach a set-uid file in it.
#[test]
fn a_running_jobs_directory_is_private() {
    let s = Server::start(serde_json::json!({}));
    let request = serde_json::json!({"project": "setid", "params": {"wait": "1"}});
    let (status, text) = s.post("/jobs?async", &request.to_string());
    assert_eq!(status, 201, "{text}");
    let pending = s.builds().join("setid/pending");
    let mut dir = None;
    wait_until("the job to start", || {
        dir = std::fs::read_dir(&pending)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("data/artifacts/started").exists());
        dir.is_some()
    });
    let dir = dir.unwrap();
    // Sandbox root is the daemon's user here (`--sandbox-ids auto`): 0700.
    assert_eq!(mode_of(&dir), 0o700);
    assert_eq!(mode_of(&dir.join("data/artifacts/suid")), 0o4755);
    std::fs::write(dir.join("data/artifacts/go"), "").unwrap();
    let info = s.job(request);
    assert_eq!(info["ExitCode"], 0, "{info}");
    let art = artifacts(&info);
    assert_eq!(mode_of(art.parent().unwrap().parent().unwrap()), 0o755);
    assert_eq!(mode_of(&art.join("suid")), 0o755);
}
