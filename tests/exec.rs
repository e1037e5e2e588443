//! `mistryd exec` and `mistry exec` end to end: a project's job on this machine with no server,
//! into a temporary state directory; the artifacts copied to the target, exit codes passed
//! through, a second run answered from the cache, and the job ID a mistryd server computes for
//! the same project, group and params.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::pipelines::{cmd_project, job_fields, script_project, write_pipeline};
use common::server::{read, Server, RUN_SH};
use common::{images_dir, mistry_client_bin, mistryd_bin};

mod common;

const SENTENCE: &str = "a server with the same project, group and params gives the same job ID";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mistry-exec")
        .tempdir()
        .unwrap()
}

/// A projects directory with project `hello` (RUN_SH, the server tests' `simple` job).
fn projects(dir: &Path) -> PathBuf {
    let projects = dir.join("projects");
    script_project(&projects, "hello", RUN_SH);
    projects
}

fn exec_with(bin: std::ffi::OsString, state: &Path, args: &[&str]) -> Output {
    let images = images_dir();
    let mut cmd = Command::new(bin);
    cmd.arg("exec")
        .arg("--state-dir")
        .arg(state)
        .arg("--images")
        .arg(&images)
        .args(args)
        .env_remove("XDG_CACHE_HOME")
        .env_remove("MISTRY_LOG");
    cmd.output().expect("running exec")
}

fn exec(state: &Path, args: &[&str]) -> Output {
    exec_with(mistryd_bin(), state, args)
}

/// [`exec`], which must exit 0.
fn exec_ok(state: &Path, args: &[&str]) -> Output {
    let out = exec(state, args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    out
}

/// The job ID of the summary's first line.
fn job_id(out: &Output) -> String {
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("Job ID: "))
        .unwrap_or_else(|| panic!("no job ID in:\n{stdout}\n{}", text(&out.stderr)));
    let rest = line.strip_prefix("Job ID: ").unwrap();
    let (id, sentence) = rest.split_once(' ').unwrap();
    assert_eq!(sentence, format!("({SENTENCE})"));
    assert_eq!(id.len(), 64, "{line}");
    id.to_string()
}

/// (name, job ID) of each `Job NAME: ID, ...` line of a pipeline's local run.
fn ids(out: &Output) -> Vec<(String, String)> {
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("Job "))
        .map(|l| {
            let (name, rest) = l.split_once(": ").unwrap();
            (
                name.to_string(),
                rest.split(',').next().unwrap().to_string(),
            )
        })
        .collect()
}

/// The summary: the last four lines of stdout.
fn summary(out: &Output) -> Vec<String> {
    let stdout = text(&out.stdout);
    let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    assert!(lines.len() >= 4, "{stdout}");
    lines[lines.len() - 4..].to_vec()
}

#[test]
fn a_project_runs_locally_and_its_artifacts_reach_the_target() {
    let dir = tempdir();
    let projects = projects(dir.path());
    let state = dir.path().join("state");
    let target = dir.path().join("out/t");
    let project_dir = projects.join("hello");
    let t = target.to_str().unwrap();
    let out = exec_ok(
        &state,
        &[
            "--project-dir",
            project_dir.to_str().unwrap(),
            "-t",
            t,
            "--",
            "--name=world",
            "--extra",
            "two words",
        ],
    );
    assert_eq!(text(&out.stderr), "");
    let stdout = text(&out.stdout);
    // The image steps as progress lines, then the job's log as it ran.
    let lines: Vec<&str> = stdout.lines().collect();
    let steps: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("==> "))
        .collect();
    assert_eq!(
        steps,
        [
            "==> image step 1/3: FROM busybox",
            "==> image step 2/3: COPY run.sh /run.sh",
            "==> image step 3/3: ENTRYPOINT [\"/bin/sh\", \"/run.sh\"]",
        ],
        "{stdout}"
    );
    let at = |l: &str| {
        lines
            .iter()
            .position(|x| *x == l)
            .unwrap_or_else(|| panic!("{l:?} missing from:\n{stdout}"))
    };
    assert!(at("==> image step 3/3: ENTRYPOINT [\"/bin/sh\", \"/run.sh\"]") < at("out: world"));
    assert!(at("out: world") < at("err: world"));
    let id = job_id(&out);
    let ready = state.canonicalize().unwrap().join("hello/ready").join(&id);
    let s = summary(&out);
    assert_eq!(s[1], "Exit code: 0");
    assert!(
        s[2].starts_with("Time: ") && s[2].ends_with('s'),
        "{}",
        s[2]
    );
    assert_eq!(
        s[3],
        format!(
            "Artifacts: {}, copied to {t}",
            ready.join("data/artifacts").display()
        )
    );
    // Exactly the job's artifacts, in the target it created.
    let mut names: Vec<String> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["count.txt", "name.txt", "params.txt"]);
    assert_eq!(read(target.join("name.txt")), "world");
    assert_eq!(read(target.join("count.txt")), "1\n");
    assert_eq!(read(target.join("params.txt")), "extra\nname\n");
    // mistry's layout in the state directory.
    assert_eq!(read(ready.join("data/params/extra")), "two words");
    assert!(read(ready.join("out.log")).contains("out: world\n"));

    // Again: the result cache answers, nothing runs, the artifacts are copied again.
    std::fs::remove_dir_all(&target).unwrap();
    let again = exec_ok(
        &state,
        &[
            "--project-dir",
            project_dir.to_str().unwrap(),
            "-t",
            t,
            "--",
            "--name=world",
            "--extra=two words",
        ],
    );
    assert_eq!(job_id(&again), id);
    let s = summary(&again);
    assert_eq!(
        text(&again.stdout).lines().count(),
        4,
        "{}",
        text(&again.stdout)
    );
    assert_eq!(s[1], "Exit code: 0 (cached)");
    assert_eq!(read(target.join("count.txt")), "1\n");
    assert_eq!(
        std::fs::read_dir(ready.parent().unwrap()).unwrap().count(),
        1,
        "one build"
    );
}

#[test]
fn exit_codes_pass_through_and_errors_are_one_line() {
    let dir = tempdir();
    let projects = projects(dir.path());
    let state = dir.path().join("state");
    let p = projects.to_str().unwrap();
    let target = dir.path().join("never");
    let out = exec(
        &state,
        &[
            "--projects",
            p,
            "--project",
            "hello",
            "-t",
            target.to_str().unwrap(),
            "--",
            "--name=x",
            "--code=5",
        ],
    );
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (
            Some(5),
            "mistry exec: the job failed with exit code 5\n".to_string()
        )
    );
    assert_eq!(summary(&out)[1], "Exit code: 5");
    assert!(
        !target.exists(),
        "no artifacts are copied from a failed job"
    );
    // An image that does not build: exit 1, the reason in one line.
    let bad = projects.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("Dockerfile"), "FROM busybox\nRUN exit 4\n").unwrap();
    let out = exec(&state, &["--project-dir", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "mistry exec: Build failed: could not build docker image: The command '/bin/sh -c exit \
         4' returned a non-zero code: 4\n"
    );
    assert_eq!(summary(&out)[1], "Exit code: -999 (the job did not run)");
    // A directory without a Dockerfile, one that does not exist, a bad param name, a target that
    // is a file: one line each, exit 1, nothing run.
    let nodocker = dir.path().join("nodocker");
    std::fs::create_dir_all(&nodocker).unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let nd = nodocker.canonicalize().unwrap();
    for (args, err) in [
        (
            vec!["--project-dir", nodocker.to_str().unwrap()],
            format!(
                "mistry exec: no Dockerfile in {}: a project is a directory with a Dockerfile \
                 (give --project-dir DIR, or --projects DIR --project NAME)\n",
                nd.display()
            ),
        ),
        (
            vec!["--projects", p, "--project", "nope"],
            format!(
                "mistry exec: project nope in {p}: cannot be opened: No such file or directory \
                 (os error 2)\n"
            ),
        ),
        (
            vec!["--projects", p, "--project", "hello", "--", "--.x=1"],
            "mistry exec: invalid param name \".x\": must not start with '.'\n".to_string(),
        ),
        (
            vec![
                "--projects",
                p,
                "--project",
                "hello",
                "-t",
                file.to_str().unwrap(),
            ],
            format!("mistry exec: target {} is a file\n", file.display()),
        ),
    ] {
        let out = exec(&state, &args);
        assert_eq!(
            (out.status.code(), text(&out.stderr), text(&out.stdout)),
            (Some(1), err, String::new()),
            "{args:?}"
        );
    }
}

/// The client `mistry exec` runs the mistryd beside it; the job ID it prints is the one a mistryd
/// server gives the same project (same directory content), group and params.
#[test]
fn local_and_server_job_ids_match() {
    let server = Server::start(serde_json::json!({}));
    let projects = server.dir.path().join("projects");
    let dir = tempdir();
    let state = dir.path().join("state");
    let target = dir.path().join("t");
    let out = exec_with(
        mistry_client_bin(),
        &state,
        &[
            "--project-dir",
            projects.join("simple").to_str().unwrap(),
            "-g",
            "grp",
            "-t",
            target.to_str().unwrap(),
            "--",
            "--name=same",
            "--_opaque=x",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let local = job_id(&out);
    assert_eq!(read(target.join("name.txt")), "same");
    let info = server.job(serde_json::json!({
        "project": "simple", "group": "grp", "params": {"name": "same", "_opaque": "y"},
    }));
    assert_eq!(info["ExitCode"], 0);
    assert_eq!(info["URL"], format!("job/simple/{local}"));
    // Another param: another ID, locally too.
    let out = exec_ok(
        &state,
        &[
            "--projects",
            projects.to_str().unwrap(),
            "--project",
            "simple",
            "-g",
            "grp",
            "--",
            "--name=other",
        ],
    );
    let other = job_id(&out);
    assert_ne!(other, local);
    let info = server.job(serde_json::json!({
        "project": "simple", "group": "grp", "params": {"name": "other"},
    }));
    assert_eq!(info["URL"], format!("job/simple/{other}"));
}

/// Without --state-dir: `$XDG_CACHE_HOME/mistry`, else `~/.cache/mistry`.
#[test]
fn the_default_state_directory() {
    let dir = tempdir();
    let projects = projects(dir.path());
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let run = |xdg: Option<&Path>| {
        let mut cmd = Command::new(mistryd_bin());
        cmd.arg("exec")
            .arg("--images")
            .arg(images_dir())
            .arg("--project-dir")
            .arg(projects.join("hello"))
            .args(["--", "--name=home"])
            .env("HOME", &home)
            .env_remove("XDG_CACHE_HOME");
        if let Some(x) = xdg {
            cmd.env("XDG_CACHE_HOME", x);
        }
        cmd.output().unwrap()
    };
    let out = run(None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let id = job_id(&out);
    assert!(home.join(".cache/mistry/hello/ready").join(&id).is_dir());
    let xdg = dir.path().join("xdg");
    let out = run(Some(&xdg));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(xdg.join("mistry/hello/ready").join(&id).is_dir());
}

/// Projects `up` and `down` and pipeline `diamond` (a and b run `up`, c runs `down` on both)
/// in `projects`.
fn diamond(projects: &Path) {
    for (name, cmd) in [
        (
            "up",
            "echo up says $(cat /data/params/v); cat /data/params/v > /data/artifacts/v.txt",
        ),
        (
            "down",
            "echo down reads $(cat /data/input/a/v.txt /data/input/b/v.txt); cat /data/input/a/v.txt /data/input/b/v.txt > /data/artifacts/both.txt; exit $(cat /data/params/code)",
        ),
    ] {
        cmd_project(projects, name, cmd);
    }
    write_pipeline(
        projects,
        "diamond",
        r#"{
  "params": {"x": {"required": true}, "code": {"default": "0"}},
  "jobs": {
    "a": {"project": "up", "params": {"v": "a-{{x}}\n"}},
    "b": {"project": "up", "params": {"v": "b-{{x}}\n"}},
    "c": {"project": "down", "params": {"code": "{{code}}"}, "needs": ["a", "b"]}
  }
}"#,
    );
}

/// The index of the one line of `stdout` that is `line`.
fn line_at(stdout: &str, line: &str) -> usize {
    let found: Vec<usize> = stdout
        .lines()
        .enumerate()
        .filter(|(_, l)| *l == line)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(found.len(), 1, "{line:?} once in:\n{stdout}");
    found[0]
}

/// The run ID of a pipeline run's summary.
fn run_id(stdout: &str) -> &str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("Run ID: "))
        .unwrap_or_else(|| panic!("no run ID in:\n{stdout}"))
}

/// A diamond pipeline (a and b independent, c reads both from /data/input/), run locally:
/// its job lines, each job's log prefixed with its name (none for a cached job), the artifacts of each job in `<target>/<job>`, all cached the second time, a
/// failed job's exit, an unknown param and an unknown pipeline as one line each.
#[test]
fn a_pipeline_runs_locally() {
    let dir = tempdir();
    let projects = dir.path().join("projects");
    diamond(&projects);
    let state = dir.path().join("state");
    let target = dir.path().join("t");
    let p = projects.to_str().unwrap();
    let run = |params: &[&str], target: Option<&Path>| {
        let mut args = vec!["--projects", p, "--pipeline", "diamond"];
        if let Some(t) = target {
            args.extend(["-t", t.to_str().unwrap()]);
        }
        args.push("--");
        args.extend_from_slice(params);
        exec(&state, &args)
    };
    let out = run(&["--x=1"], Some(&target));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
    let stdout = text(&out.stdout);
    let first = ids(&out);
    assert_eq!(
        first.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    for (name, id) in &first {
        assert_eq!(id.len(), 64, "{stdout}");
        let line = format!("{name}: ready, job {id}");
        assert!(
            stdout.lines().any(|l| l == line),
            "{line} missing:\n{stdout}"
        );
    }
    // Each job's image steps and log as they came, prefixed with its name, before its end
    // line; c's after a's and b's ended.
    let at = |l: &str| line_at(&stdout, l);
    let ready = |n: usize| at(&format!("{}: ready, job {}", first[n].0, first[n].1));
    for (n, echoed) in [
        (0, "[a] up says a-1"),
        (1, "[b] up says b-1"),
        (2, "[c] down reads a-1 b-1"),
    ] {
        let step = at(&format!(
            "[{}] ==> image step 1/2: FROM busybox",
            first[n].0
        ));
        assert!(step < at(echoed) && at(echoed) < ready(n), "{stdout}");
    }
    assert!(ready(0) < at("[c] ==> image step 1/2: FROM busybox"));
    assert!(ready(1) < at("[c] ==> image step 1/2: FROM busybox"));
    assert!(
        stdout
            .lines()
            .filter(|l| l.starts_with('['))
            .all(|l| ["[a] ", "[b] ", "[c] "].iter().any(|p| l.starts_with(p))),
        "{stdout}"
    );
    assert!(stdout.contains(
        "\na server with the same projects, pipeline and params gives the same job IDs\n"
    ));
    assert!(
        stdout.ends_with("Pipeline diamond succeeded: 3 jobs ready (0 cached)\n"),
        "{stdout}"
    );
    assert_eq!(read(target.join("a/v.txt")), "a-1\n");
    assert_eq!(read(target.join("b/v.txt")), "b-1\n");
    assert_eq!(read(target.join("c/both.txt")), "a-1\nb-1\n");
    // The upstream jobs are ordinary jobs: `exec --project up` with the same params is job a.
    let out = exec_ok(
        &state,
        &["--projects", p, "--project", "up", "--", "--v=a-1\n"],
    );
    assert_eq!(job_id(&out), first[0].1);
    assert_eq!(summary(&out)[1], "Exit code: 0 (cached)");

    // Again: every job from the cache, the same IDs.
    let out = run(&["--x=1"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(ids(&out), first);
    let stdout = text(&out.stdout);
    for (name, id) in &first {
        let line = format!("{name}: ready (cached), job {id}");
        assert!(
            stdout.lines().any(|l| l == line),
            "{line} missing:\n{stdout}"
        );
    }
    // Nothing ran: no log lines, only the three state lines before the summary.
    assert!(!stdout.lines().any(|l| l.starts_with('[')), "{stdout}");
    assert_eq!(line_at(&stdout, &format!("Run ID: {}", run_id(&stdout))), 3);
    assert!(stdout.ends_with("Pipeline diamond succeeded: 3 jobs ready (3 cached)\n"));

    // c fails: exit 1, the reason on stderr; a and b still come from the cache.
    let out = run(&["--x=1", "--code=3"], None);
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (
            Some(1),
            "mistry exec: Pipeline diamond failed: failed jobs: c\n".to_string()
        )
    );
    let got = ids(&out);
    assert_eq!(got[..2], first[..2]);
    assert_ne!(got[2].1, first[2].1);
    let failed = format!(
        "c: failed with exit code 3, job {}, log {}",
        got[2].1,
        state
            .canonicalize()
            .unwrap()
            .join("down/ready")
            .join(&got[2].1)
            .join("out.log")
            .display()
    );
    assert!(
        text(&out.stdout).lines().any(|l| l == failed),
        "{failed} missing:\n{}",
        text(&out.stdout)
    );
    // Only c ran: its log (what it echoed before it failed) before its end line.
    let stdout = text(&out.stdout);
    assert!(
        line_at(&stdout, "[c] down reads a-1 b-1") < line_at(&stdout, &failed),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .filter(|l| l.starts_with('['))
            .all(|l| l.starts_with("[c] ")),
        "{stdout}"
    );

    let out = run(&["--x=1", "--y=2"], None);
    assert_eq!(
        (out.status.code(), text(&out.stderr), text(&out.stdout)),
        (
            Some(1),
            "mistry exec: pipelines/diamond.json: params: unknown param \"y\"\n".to_string(),
            String::new()
        )
    );
    let out = exec(&state, &["--projects", p, "--pipeline", "nope"]);
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (
            Some(1),
            "mistry exec: Unknown pipeline 'nope'\n".to_string()
        )
    );
}

/// The jobs of a pipeline run locally have the IDs a server's run of it gives them (c's ID
/// includes a's and b's), and `mistry pipeline run` against that server fetches c's artifacts.
#[test]
fn local_and_server_pipeline_job_ids_match() {
    let server = Server::start(serde_json::json!({}));
    let projects = server.dir.path().join("projects");
    diamond(&projects);
    let dir = tempdir();
    let state = dir.path().join("state");
    let out = exec_ok(
        &state,
        &[
            "--projects",
            projects.to_str().unwrap(),
            "--pipeline",
            "diamond",
            "--",
            "--x=7",
        ],
    );
    let local = ids(&out);
    assert_eq!(local.len(), 3);
    let (port, t) = (
        server.addr.rsplit_once(':').unwrap().1,
        dir.path().join("c"),
    );
    let ct = format!("c={}", t.display());
    let out = Command::new(mistry_client_bin())
        .args([
            "pipeline",
            "run",
            "diamond",
            "--host",
            "127.0.0.1",
            "--port",
            port,
        ])
        .args(["--json-result", "--artifacts", &ct, "--", "--x=7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let record: serde_json::Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(record["state"], "succeeded");
    let remote = job_fields(&record, "id");
    let sorted = |mut v: Vec<(String, String)>| {
        v.sort();
        v
    };
    assert_eq!(sorted(remote), sorted(local));
    assert_eq!(read(t.join("both.txt")), "a-7\nb-7\n");
}

/// `--config`: the daemon's own configuration file makes the local run the server's — its
/// limits and network reach the job (exact values, against the run without it) — while the
/// file's projects_path and build_path (absent on this machine) are replaced by the run's.
/// Unknown keys (which the daemon ignores) and invalid values are refused, naming the file.
#[test]
fn the_daemons_configuration_file_applies_to_a_local_run() {
    let dir = tempdir();
    let projects = dir.path().join("projects");
    cmd_project(
        &projects,
        "probe",
        "ulimit -Hn > /data/artifacts/open_files; grep : /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort > /data/artifacts/networks",
    );
    let project = projects.join("probe");
    let p = project.to_str().unwrap();
    let config = dir.path().join("mistryd.json");
    std::fs::write(
        &config,
        r#"{"projects_path": "/nonexistent/projects", "build_path": "/nonexistent/builds",
            "network": "none", "limits": {"open_files": 321}, "job_concurrency": 2}"#,
    )
    .unwrap();
    let read = |t: &Path, f: &str| std::fs::read_to_string(t.join(f)).unwrap();
    // Without the file: the local defaults (the host's network, the default limits).
    let plain = dir.path().join("plain");
    exec_ok(
        &dir.path().join("state1"),
        &["--project-dir", p, "-t", plain.to_str().unwrap()],
    );
    let mut host: Vec<String> = std::fs::read_to_string("/proc/net/dev")
        .unwrap()
        .lines()
        .filter_map(|l| Some(l.split_once(':')?.0.trim().to_string()))
        .collect();
    host.sort();
    assert_eq!(read(&plain, "networks"), format!("{}\n", host.join("\n")));
    assert_ne!(read(&plain, "open_files"), "321\n");
    // With it, through the client (`mistry exec --config` hands it to `mistryd exec`).
    let served = dir.path().join("served");
    let out = exec_with(
        mistry_client_bin(),
        &dir.path().join("state2"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--project-dir",
            p,
            "-t",
            served.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(read(&served, "open_files"), "321\n");
    assert_eq!(read(&served, "networks"), "lo\n");
    assert!(!Path::new("/nonexistent/builds").exists());

    // Unknown settings, an invalid one, a file that is not there: exit 1, one line naming it.
    let c = config.display().to_string();
    for (file, err) in [
        (
            r#"{"netwrok": "none", "limits": {"procesess": 5}, "projects": {"probe": {"timelimit": "1m"}}}"#,
            format!(
                "mistry exec: --config {c}: unknown settings netwrok, limits.procesess, \
                 projects.probe.timelimit (the daemon ignores what it does not know; a local run \
                 refuses it)\n"
            ),
        ),
        (
            r#"{"network": "wide"}"#,
            format!(
                "mistry exec: --config {c}: network: unknown network mode \"wide\" (expected \
                 none, isolated or host)\n"
            ),
        ),
        (
            r#"{"limits": {"open_files": "many"}}"#,
            format!(
                "mistry exec: --config {c}: limits.open_files: \"many\" is not a positive whole \
                 number or \"unlimited\"\n"
            ),
        ),
    ] {
        std::fs::write(&config, file).unwrap();
        let out = exec(
            &dir.path().join("state3"),
            &["--config", &c, "--project-dir", p],
        );
        assert_eq!(
            (out.status.code(), text(&out.stderr)),
            (Some(1), err),
            "{file}"
        );
        assert_eq!(text(&out.stdout), "");
    }
    let missing = dir.path().join("missing.json");
    let out = exec(
        &dir.path().join("state3"),
        &["--config", missing.to_str().unwrap(), "--project-dir", p],
    );
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (
            Some(1),
            format!(
                "mistry exec: --config {}: No such file or directory (os error 2)\n",
                missing.display()
            )
        )
    );
}
