//! mistryd end to end: a real server process, busybox-based test projects, HTTP requests.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::server::{artifacts, read, Server};
use common::{free_port, mistryd_bin, wait_until};
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
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        let (_, index) = s.get("/index/", false);
        let list: Value = serde_json::from_str(&index).unwrap();
        if let Some(job) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["project"] == "simple")
        {
            assert_eq!(job["state"], "pending");
            assert!(job["startedAt"].as_str().unwrap().contains(", "), "{job}");
            break job["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    };
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
    let s = Server::start(serde_json::json!({}));
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
    let Some(dir) = std::env::var_os("MISTRY_TEST_BTRFS") else {
        eprintln!("MISTRY_TEST_BTRFS not set: the btrfs run is done by scripts/test.sh");
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
    // A job running in the daemon meanwhile is not disturbed.
    s.start_slow_job("busy", "2");
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
        s.job(serde_json::json!({"project": "simple", "params": {"name": "busy", "sleep": "2"}}));
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

fn mistry_client_bin() -> std::ffi::OsString {
    std::env::var_os("MISTRY_CLIENT_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_mistry").into())
}

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

fn md5(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

/// What every transport delivers: names, nesting, a large file intact.
fn check_artifact_contents(target: &Path) {
    assert_eq!(
        read(target.join("dir with spaces/ünïcødé/file (1).txt")),
        "nested\n"
    );
    assert_eq!(read(target.join("deep/a/b/c/leaf")), "deep\n");
    assert_eq!(
        std::fs::metadata(target.join("large.bin")).unwrap().len(),
        20 << 20
    );
    assert_eq!(
        md5(&target.join("large.bin")),
        read(target.join("large.md5")).trim()
    );
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
    let out = Command::new(mistry_client_bin())
        .args([
            "build",
            "--host",
            "127.0.0.1",
            "--port",
            &free_port().to_string(),
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
    let port = free_port();
    let conf = s.dir.path().join("rsyncd.conf");
    // As root, rsyncd would switch to nobody: keep our ids. Unprivileged, it cannot switch.
    let ids = if nix::unistd::geteuid().is_root() {
        "uid = 0\ngid = 0\n"
    } else {
        ""
    };
    std::fs::write(
        &conf,
        format!(
            "pid file = {d}/rsyncd.pid\nuse chroot = false\n{ids}[mistry]\npath = {b}\nread only = true\n",
            d = s.dir.path().display(),
            b = s.builds().display()
        ),
    )
    .unwrap();
    let mut daemon = Command::new("rsync")
        .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--config={}", conf.display()))
        .spawn()
        .unwrap();
    wait_until("the rsync daemon", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
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
    let _ = daemon.kill();
    let _ = daemon.wait();
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
    let port = free_port();
    let sshd_config = d.join("sshd_config");
    std::fs::write(
        &sshd_config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nSubsystem sftp internal-sftp\n",
            d = d.display()
        ),
    )
    .unwrap();
    let mut sshd = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&sshd_config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("sshd", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let ssh_config = d.join("ssh_config");
    std::fs::write(
        &ssh_config,
        format!(
            "Host 127.0.0.1\n  IdentityFile {d}/user_key\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n",
            d = d.display()
        ),
    )
    .unwrap();
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
    let _ = sshd.kill();
    let _ = sshd.wait();
    assert_eq!(code, 0, "{out}{err}");
    check_artifact_contents(&target);
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
