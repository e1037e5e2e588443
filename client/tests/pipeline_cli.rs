//! `mistry pipeline run|list` and `mistry exec` end to end, against fake servers and a fake
//! mistryd: the requests sent, the lines printed, exit codes, `--json-result`, `--no-wait`,
//! `--artifacts` over the http transport, and `mistry exec` handing its options to `mistryd exec`.
//!
//! `MISTRY_CLIENT_BIN` names the binary when the tests run as another user (scripts/test.sh).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{client_bin, fake_server, mistry, read, tar_of, text};
use serde_json::{json, Value};

fn pipeline(port: u16, args: &[&str]) -> Output {
    let mut cmd = mistry();
    cmd.args(["pipeline", args[0]])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(&args[1..]);
    cmd.output().expect("running mistry")
}

const RUN: &str = "5e1f";

fn job(name: &str, project: &str, id: &str, state: &str, extra: Value) -> Value {
    let mut j = json!({
        "name": name, "project": project, "group": "", "params": {}, "needs": [],
        "state": state, "id": id, "url": format!("job/{project}/{id}"), "exit_code": 0,
        "cached": false, "coalesced": false, "incremental": false, "path": "", "err_build": "",
    });
    for (k, v) in extra.as_object().unwrap() {
        j[k] = v.clone();
    }
    j
}

fn record(state: &str, jobs: Vec<Value>) -> Value {
    let failed: Vec<Value> = jobs
        .iter()
        .filter(|j| j["state"] == "failed")
        .map(|j| j["name"].clone())
        .collect();
    json!({
        "pipeline": "assets", "run": RUN, "params": {"branch": "main"}, "state": state,
        "started_at": "2024-01-01T00:00:00Z", "duration": if state == "running" { -1 } else { 5 },
        "url": format!("pipeline/assets/{RUN}"), "jobs": jobs, "failed": failed,
        "triggered": [], "caused_by": null,
    })
}

fn deps(state: &str, extra: Value) -> Value {
    job("deps", "example-deps", "d1", state, extra)
}

fn assets(state: &str, extra: Value) -> Value {
    job("assets", "example-build", "a2", state, extra)
}

fn sse(events: &[Value]) -> Vec<u8> {
    events
        .iter()
        .map(|e| format!("data: {e}\n\n"))
        .collect::<String>()
        .into_bytes()
}

fn body(v: &Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

#[test]
fn help_lists_pipeline_and_exec() {
    let out = mistry().arg("--help").output().unwrap();
    let help = text(&out.stdout);
    assert!(
        help.contains("  pipeline     Run or list the server's pipelines\n"),
        "{help}"
    );
    assert!(
        help.contains(
            "  exec         Build a project's image and run its job on this machine, no server \
             (through mistryd)\n"
        ),
        "{help}"
    );
    let out = mistry().args(["pipeline", "run", "-h"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for flag in [
        "Usage: mistry pipeline run [OPTIONS] <NAME> [-- <PARAMS>...]",
        "--host <HOST>",
        "-p, --port <PORT>",
        "--json-result",
        "--no-wait",
        "--timeout <TIMEOUT>",
        "--artifacts <JOB=DIR>",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    let out = mistry().args(["exec", "-h"]).output().unwrap();
    let help = text(&out.stdout);
    for flag in [
        "--project-dir <DIR>",
        "--projects <DIR>",
        "--project <PROJECT>",
        "--pipeline <NAME>",
        "-t, --target <TARGET>",
        "--state-dir <DIR>",
        "--images <DIR>",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    let out = mistry().args(["completions", "bash"]).output().unwrap();
    let script = text(&out.stdout);
    for word in [
        "mistry__subcmd__pipeline__subcmd__run",
        "mistry__subcmd__exec",
        "--artifacts",
        "--state-dir",
    ] {
        assert!(script.contains(word), "{word} missing from the completions");
    }
    // Usage errors (exit 1, as every failure of mistry's client): no name, a bad --artifacts,
    // --no-wait with --artifacts.
    for args in [
        &["pipeline", "run"][..],
        &["pipeline", "run", "p", "--artifacts", "nodir"],
        &["pipeline", "run", "p", "--no-wait", "--artifacts", "a=b"],
        &["exec", "--project", "p"],
    ] {
        let out = mistry().args(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

/// The run is started asynchronously, followed through its events; a line per job state
/// change, the summary, exit 0.
#[test]
fn a_run_prints_each_job_state_and_the_summary() {
    let events = [
        record(
            "running",
            vec![deps("pending", json!({})), assets("waiting", json!({}))],
        ),
        record(
            "running",
            vec![
                deps("ready", json!({"cached": true})),
                assets("pending", json!({})),
            ],
        ),
        record(
            "succeeded",
            vec![
                deps("ready", json!({"cached": true})),
                assets("ready", json!({"incremental": true})),
            ],
        ),
    ];
    let (port, server) = fake_server(vec![
        (
            201,
            "application/json",
            body(&record(
                "running",
                vec![deps("queued", json!({})), assets("waiting", json!({}))],
            )),
        ),
        (200, "text/event-stream", sse(&events)),
    ]);
    let out = pipeline(
        port,
        &["run", "assets", "--", "--branch=main", "--env", "staging"],
    );
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (Some(0), String::new())
    );
    assert_eq!(
        text(&out.stdout),
        format!(
            "Pipeline run can be found at {base}/pipeline/assets/{RUN}\n\
             deps: queued\n\
             deps: pending\n\
             deps: ready (cached), logs at {base}/job/example-deps/d1\n\
             assets: pending\n\
             assets: ready (incremental), logs at {base}/job/example-build/a2\n\
             Pipeline assets succeeded: 2 jobs ready (1 cached)\n"
        )
    );
    let seen = server.join().unwrap();
    assert_eq!(seen[0].line, "POST /pipelines?async HTTP/1.1");
    let sent: Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!(
        sent,
        json!({"pipeline": "assets", "params": {"branch": "main", "env": "staging"}})
    );
    assert_eq!(
        seen[1].line,
        format!("GET /pipeline/assets/{RUN}/events HTTP/1.1")
    );
    assert_eq!(seen[1].accept, "text/event-stream");
}

/// A failed job and the job it skipped: their lines, the reason on stderr, exit 1. With
/// --json-result: only the final record on stdout.
#[test]
fn a_failed_run_exits_1_and_json_result_prints_the_record() {
    let last = record(
        "failed",
        vec![
            deps("failed", json!({"exit_code": 3})),
            assets("skipped", json!({})),
        ],
    );
    let answers = || {
        vec![
            (
                201,
                "application/json",
                body(&record(
                    "running",
                    vec![deps("pending", json!({})), assets("waiting", json!({}))],
                )),
            ),
            (200, "text/event-stream", sse(std::slice::from_ref(&last))),
        ]
    };
    let (port, server) = fake_server(answers());
    let out = pipeline(port, &["run", "assets"]);
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (
            Some(1),
            "Pipeline assets failed: failed jobs: deps; skipped: assets\n".to_string()
        )
    );
    assert_eq!(
        text(&out.stdout),
        format!(
            "Pipeline run can be found at {base}/pipeline/assets/{RUN}\n\
             deps: pending\n\
             deps: failed with exit code 3, logs at {base}/job/example-deps/d1\n\
             assets: skipped (a job it needs failed)\n"
        )
    );
    server.join().unwrap();

    let (port, server) = fake_server(answers());
    let out = pipeline(port, &["run", "assets", "--json-result"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap(), last);
    assert_eq!(
        text(&out.stderr),
        "Pipeline assets failed: failed jobs: deps; skipped: assets\n"
    );
    server.join().unwrap();
}

/// Without events (404), the run's record is asked for until it ends.
#[test]
fn without_events_the_record_is_polled() {
    let (port, server) = fake_server(vec![
        (
            201,
            "application/json",
            body(&record("running", vec![deps("pending", json!({}))])),
        ),
        (404, "text/plain", b"Not Found".to_vec()),
        (
            200,
            "application/json",
            body(&record("running", vec![deps("pending", json!({}))])),
        ),
        (
            200,
            "application/json",
            body(&record("succeeded", vec![deps("ready", json!({}))])),
        ),
    ]);
    let out = pipeline(port, &["run", "assets", "--json-result"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let got: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(got["state"], "succeeded");
    let seen = server.join().unwrap();
    assert_eq!(seen[2].line, format!("GET /pipeline/assets/{RUN} HTTP/1.1"));
    assert_eq!(seen[2].accept, "application/json");
    assert_eq!(seen[3].line, format!("GET /pipeline/assets/{RUN} HTTP/1.1"));
}

/// --no-wait: the run's URL (or its record with --json-result), nothing followed.
#[test]
fn no_wait_prints_the_run_and_returns() {
    let first = record("running", vec![deps("queued", json!({}))]);
    let (port, server) = fake_server(vec![(201, "application/json", body(&first))]);
    let out = pipeline(port, &["run", "assets", "--no-wait"]);
    assert_eq!(
        (out.status.code(), text(&out.stdout), text(&out.stderr)),
        (
            Some(0),
            format!("Pipeline run can be found at http://127.0.0.1:{port}/pipeline/assets/{RUN}\n"),
            String::new()
        )
    );
    let seen = server.join().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].line, "POST /pipelines?async HTTP/1.1");
    let (port, server) = fake_server(vec![(201, "application/json", body(&first))]);
    let out = pipeline(port, &["run", "assets", "--no-wait", "--json-result"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        serde_json::from_str::<Value>(&text(&out.stdout)).unwrap(),
        first
    );
    server.join().unwrap();
}

/// The server's refusals are one line on stderr and exit 1, as for `mistry build`.
#[test]
fn refusals_are_one_line_and_exit_1() {
    for (status, answer, err) in [
        (404, "Unknown pipeline 'nope'", "Unknown pipeline 'nope'\n"),
        (
            400,
            "pipelines/assets.json: params.branch is required",
            "pipelines/assets.json: params.branch is required\n",
        ),
        (
            503,
            "Server is overloaded; try again later",
            "Server is overloaded; try again later\n",
        ),
    ] {
        let (port, server) = fake_server(vec![(status, "text/plain", answer.as_bytes().to_vec())]);
        let out = pipeline(port, &["run", "nope"]);
        assert_eq!(
            (out.status.code(), text(&out.stdout), text(&out.stderr)),
            (Some(1), String::new(), err.to_string()),
            "{status}"
        );
        server.join().unwrap();
    }
    // Params are checked before anything is sent.
    let out = pipeline(1, &["run", "p", "--", "bare"]);
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (
            Some(1),
            "invalid job param \"bare\": expected --name=value or --name value\n".to_string()
        )
    );
}

/// --artifacts JOB=DIR: each named job's artifacts over the http transport, into DIR (created);
/// an unknown job is an error naming the jobs there are.
#[test]
fn artifacts_of_named_jobs_are_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let (d, a) = (dir.path().join("d/deep"), dir.path().join("a"));
    let done = record(
        "succeeded",
        vec![deps("ready", json!({})), assets("ready", json!({}))],
    );
    let (port, server) = fake_server(vec![
        (201, "application/json", body(&done)),
        (200, "application/x-tar", tar_of(&[("lock.txt", "deps\n")])),
        (
            200,
            "application/x-tar",
            tar_of(&[("public/app.js", "js\n")]),
        ),
    ]);
    let (ds, as_) = (
        format!("deps={}", d.display()),
        format!("assets={}", a.display()),
    );
    let out = pipeline(
        port,
        &["run", "assets", "--artifacts", &ds, "--artifacts", &as_],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let seen = server.join().unwrap();
    assert_eq!(seen[1].line, "GET /artifacts/example-deps/d1 HTTP/1.1");
    assert_eq!(seen[2].line, "GET /artifacts/example-build/a2 HTTP/1.1");
    assert_eq!(read(&d.join("lock.txt")), "deps\n");
    assert_eq!(read(&a.join("public/app.js")), "js\n");

    let (port, server) = fake_server(vec![(201, "application/json", body(&done))]);
    let nope = format!("nope={}", a.display());
    let out = pipeline(port, &["run", "assets", "--artifacts", &nope]);
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (
            Some(1),
            "pipeline assets has no job nope (its jobs: deps, assets)\n".to_string()
        )
    );
    server.join().unwrap();
    // A target that is a file: refused before anything is sent.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let f = format!("deps={}", file.display());
    let out = pipeline(1, &["run", "assets", "--artifacts", &f]);
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (Some(1), format!("target {} is a file\n", file.display()))
    );
}

#[test]
fn list_prints_each_pipeline_with_params_and_jobs() {
    let all = json!([
        {"name": "assets", "params": {"branch": {"required": true}, "env": {"default": "production"}}, "jobs": ["deps", "assets"]},
        {"name": "notify", "params": {}, "jobs": ["send"]},
    ]);
    let (port, server) = fake_server(vec![(200, "application/json", body(&all))]);
    let out = pipeline(port, &["list"]);
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (Some(0), String::new())
    );
    assert_eq!(
        text(&out.stdout),
        "assets  params: --branch (required), --env (default \"production\")  jobs: deps, assets\n\
         notify  params: none  jobs: send\n"
    );
    assert_eq!(server.join().unwrap()[0].line, "GET /pipelines HTTP/1.1");
    let (port, server) = fake_server(vec![(200, "application/json", b"[]".to_vec())]);
    let out = pipeline(port, &["list"]);
    assert_eq!(text(&out.stdout), "No pipelines.\n");
    server.join().unwrap();
}

/// `mistry exec` runs `mistryd exec` next to it (else on PATH) with the same options, and exits
/// with its code; with neither, one line and exit 1.
#[test]
fn exec_hands_over_to_mistryd() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&empty).unwrap();
    let client = bin.join("mistry");
    // Executables are written by `cp`, not by this process: a child that another test forks
    // while this one holds a file open for writing would keep it open, and exec would fail
    // with ETXTBSY.
    let install = |from: &Path, to: &Path| {
        let st = Command::new("cp").arg(from).arg(to).status().unwrap();
        assert!(st.success(), "cp {} {}", from.display(), to.display());
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    install(&client_bin(), &client);
    let run = |path: &Path, args: &[&str]| {
        Command::new(&client)
            .env_clear()
            .env("PATH", path)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&empty, &["exec"]);
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (
            Some(1),
            format!(
                "mistry exec: mistry exec runs jobs with mistryd, which is neither next to {} \
                 nor on PATH: install mistryd beside mistry\n",
                client.display()
            )
        )
    );
    // A mistryd on PATH, then one beside mistry (which wins).
    let args_file = dir.path().join("args");
    let fake = |at: &Path, code: i32| {
        let script = dir.path().join("script");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done > '{}'\necho {}\nexit {code}\n",
                args_file.display(),
                at.display()
            ),
        )
        .unwrap();
        install(&script, at);
    };
    fake(&empty.join("mistryd"), 7);
    let out = run(
        &empty,
        &[
            "exec",
            "--project-dir",
            "my app",
            "-t",
            "out",
            "--",
            "--a=1",
            "--b",
            "two words",
        ],
    );
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(7), format!("{}\n", empty.join("mistryd").display()))
    );
    assert_eq!(
        read(&args_file),
        "exec\n--project-dir\nmy app\n--target\nout\n--\n--a=1\n--b\ntwo words\n"
    );
    fake(&bin.join("mistryd"), 0);
    let out = run(
        &empty,
        &[
            "exec",
            "--projects",
            "p",
            "--pipeline",
            "assets",
            "-g",
            "main",
        ],
    );
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), format!("{}\n", bin.join("mistryd").display()))
    );
    assert_eq!(
        read(&args_file),
        "exec\n--projects\np\n--pipeline\nassets\n--group\nmain\n"
    );
}
