//! The examples of the README and docs/users.md, end to end, on a copy of the repository's
//! `examples/` (the projects directory scripts/example.sh serves): the release pipeline
//! (`examples/pipelines/release.json`: `deps` installs packages, `build` bundles the app with
//! them, `announce` runs on success) started with the README's `curl`, with
//! `mistry pipeline run` and with `mistry exec --pipeline`, whose job IDs are the server's; an
//! incremental `deps` build after a lockfile change; and examples/hello's job.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::pipelines::job;
use common::server::{read, Server};
use common::{images_dir, mistry_client_bin, wait_until};
use serde_json::{json, Value};

/// The app as the release profile bundles it: comment lines stripped.
const APP_RELEASE: &str = r#"#!/bin/sh
APP_NAME=app
APP_VERSION=1.0
banner() {
    line=$(printf '%s' "$1" | sed 's/./=/g')
    printf '%s\n%s\n%s\n' "$line" "$1" "$line"
}
greet() {
    echo "Hello, $1!"
}
banner "$APP_NAME $APP_VERSION"
greet "${1:-world}"
"#;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The repository's examples/.
fn repo_examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// Copy `from` to `to` with the files' modes (they enter the job IDs), so that the copy's job
/// IDs are those of the repository's examples.
fn copy_tree(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let meta = std::fs::symlink_metadata(&src).unwrap();
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if meta.is_dir() {
            copy_tree(&src, &dst);
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(meta.mode_bits()))
                .unwrap();
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

trait ModeBits {
    fn mode_bits(&self) -> u32;
}

impl ModeBits for std::fs::Metadata {
    fn mode_bits(&self) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        self.permissions().mode() & 0o7777
    }
}

/// A temporary directory with a copy of examples/ in `examples`, and mistryd serving it (as
/// scripts/example.sh configures it: network none).
fn serve_examples() -> (tempfile::TempDir, PathBuf, Server) {
    let dir = tempfile::Builder::new()
        .prefix("mistry-examples")
        .tempdir()
        .unwrap();
    let examples = dir.path().join("examples");
    copy_tree(&repo_examples(), &examples);
    let server = Server::start(json!({"projects_path": examples, "network": "none"}));
    (dir, examples, server)
}

/// The files under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

fn id_of(rec: &Value, name: &str) -> String {
    let id = job(rec, name)["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64, "{rec}");
    id
}

fn artifacts(rec: &Value, name: &str) -> PathBuf {
    PathBuf::from(job(rec, name)["path"].as_str().unwrap())
}

/// `sh APP you`: the bundled app, run on the host.
fn run_app(app: &Path) -> String {
    let out = Command::new("sh").arg(app).arg("you").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// The README's `curl -X POST -d BODY http://ADDR/pipelines`: (status, body). Without curl on
/// the machine, the same request from the test.
fn curl_post(s: &Server, body: &str) -> (u16, String) {
    let url = s.url("/pipelines");
    match Command::new("curl")
        .args([
            "-sS",
            "-X",
            "POST",
            "-d",
            body,
            "-w",
            "\n%{http_code}",
            &url,
        ])
        .output()
    {
        Ok(out) => {
            assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
            let stdout = text(&out.stdout);
            let (answer, status) = stdout.rsplit_once('\n').unwrap();
            (status.parse().unwrap(), answer.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("no curl on this machine: the README's request is sent by the test");
            s.post("/pipelines", body)
        }
        Err(e) => panic!("running curl: {e}"),
    }
}

/// The README's curl for the release pipeline of `version`: 201 and a succeeded run's record.
fn curl_release(s: &Server, version: &str) -> Value {
    let body = format!(r#"{{"pipeline": "release", "params": {{"version": "{version}"}}}}"#);
    let (status, body) = curl_post(s, &body);
    assert_eq!(status, 201, "{body}");
    let rec: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(rec["state"], "succeeded", "{rec}");
    rec
}

/// The run record of a (possibly still running) run, once it ended.
fn ended(s: &Server, url: &str) -> Value {
    let mut rec = Value::Null;
    wait_until(url, || {
        let (status, body) = s.get(&format!("/{url}"), true);
        assert_eq!(status, 200, "{url}: {body}");
        rec = serde_json::from_str(&body).unwrap();
        rec["state"] != "running"
    });
    rec
}

/// `mistry ARGS...` (the client), in `cwd`.
fn client(cwd: &Path, args: &[&str]) -> Output {
    Command::new(mistry_client_bin())
        .current_dir(cwd)
        .args(args)
        .env_remove("XDG_CACHE_HOME")
        .env_remove("MISTRY_LOG")
        .env("NO_COLOR", "1")
        .output()
        .expect("running mistry")
}

/// `mistry pipeline run`'s lines without the passing states (`queued`, `pending`: whether a
/// job shows them depends on timing).
fn settled_lines(out: &Output) -> Vec<String> {
    text(&out.stdout)
        .lines()
        .filter(|l| !l.ends_with(": queued") && !l.ends_with(": pending"))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_release_pipeline_over_http_with_the_client_and_locally() {
    let (dir, examples, s) = serve_examples();
    let base = format!("http://{}", s.addr);
    let mirror = examples.join("deps/mirror");

    // The README's curl: deps, then build with deps' artifacts, then the announce pipeline.
    let rec = curl_release(&s, "1.0");
    assert_eq!(rec["pipeline"], "release");
    assert_eq!(
        rec["params"],
        json!({"version": "1.0", "profile": "release"})
    );
    assert_eq!(rec["failed"], json!([]));
    assert_eq!(rec["caused_by"], Value::Null);
    let run = rec["run"].as_str().unwrap().to_string();
    assert_eq!(rec["url"], format!("pipeline/release/{run}"));
    let names: Vec<(&str, &str)> = rec["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["name"].as_str().unwrap(), j["state"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("deps", "ready"), ("build", "ready")]);
    let (deps, build) = (job(&rec, "deps"), job(&rec, "build"));
    assert_eq!(
        (
            &deps["project"],
            &deps["group"],
            &deps["params"],
            &deps["needs"]
        ),
        (&json!("deps"), &json!("release"), &json!({}), &json!([]))
    );
    assert_eq!(
        (
            &build["project"],
            &build["group"],
            &build["params"],
            &build["needs"]
        ),
        (
            &json!("app"),
            &json!(""),
            &json!({"version": "1.0", "profile": "release"}),
            &json!(["deps"])
        )
    );
    for j in [deps, build] {
        assert_eq!(
            (
                &j["exit_code"],
                &j["cached"],
                &j["incremental"],
                &j["err_build"]
            ),
            (&json!(0), &json!(false), &json!(false), &json!("")),
            "{j}"
        );
    }
    let (deps_id, build_id) = (id_of(&rec, "deps"), id_of(&rec, "build"));
    // deps: the packages of deps.lock, fetched into the group's cache and installed.
    let d = artifacts(&rec, "deps");
    assert_eq!(
        files(&d),
        [
            "installed.txt",
            "report.txt",
            "vendor/banner.sh",
            "vendor/greet.sh"
        ]
    );
    assert_eq!(read(d.join("installed.txt")), "banner 0.3.1\ngreet 1.2.0\n");
    assert_eq!(read(d.join("report.txt")), "2 fetched, 0 from the cache\n");
    assert_eq!(
        read(d.join("vendor/greet.sh")),
        read(mirror.join("greet-1.2.0.sh"))
    );
    assert_eq!(
        read(d.join("vendor/banner.sh")),
        read(mirror.join("banner-0.3.1.sh"))
    );
    let deps_log = read(s.builds().join("deps/ready").join(&deps_id).join("out.log"));
    assert!(
        deps_log.ends_with(
            "fetching banner 0.3.1\nfetching greet 1.2.0\n2 fetched, 0 from the cache\n"
        ),
        "{deps_log}"
    );
    // build: the app bundled with them.
    let b = artifacts(&rec, "build");
    assert_eq!(files(&b), ["app-1.0/BUILD", "app-1.0/bin/app"]);
    assert_eq!(
        read(b.join("app-1.0/BUILD")),
        "app 1.0\nprofile: release\npackage: banner 0.3.1\npackage: greet 1.2.0\n"
    );
    assert_eq!(read(b.join("app-1.0/bin/app")), APP_RELEASE);
    assert_eq!(
        std::fs::metadata(b.join("app-1.0/bin/app"))
            .unwrap()
            .mode_bits(),
        0o755
    );
    assert_eq!(
        run_app(&b.join("app-1.0/bin/app")),
        "=======\napp 1.0\n=======\nHello, you!\n"
    );
    let build_log = read(s.builds().join("app/ready").join(&build_id).join("out.log"));
    assert!(
        build_log
            .ends_with("building app 1.0 (release) with 2 packages\nsmoke test: Hello, mistry!\n"),
        "{build_log}"
    );
    // announce: triggered with the build's job ID.
    let triggered = rec["triggered"].as_array().unwrap();
    assert_eq!(triggered.len(), 1, "{rec}");
    assert_eq!(triggered[0]["pipeline"], "announce");
    let announce_run = triggered[0]["run"].as_str().unwrap().to_string();
    let url = format!("pipeline/announce/{announce_run}");
    assert_eq!(triggered[0]["url"], url);
    let ann = ended(&s, &url);
    assert_eq!(ann["state"], "succeeded", "{ann}");
    assert_eq!(ann["params"], json!({"version": "1.0", "build": build_id}));
    assert_eq!(ann["caused_by"]["pipeline"], "release");
    assert_eq!(ann["caused_by"]["run"], run);
    assert_eq!(
        read(artifacts(&ann, "notice").join("notice.txt")),
        format!("app 1.0 is out: job/app/{build_id}\n")
    );

    // A missing required param: 400, one line naming the file and the key.
    let (status, body) = curl_post(&s, r#"{"pipeline": "release"}"#);
    assert_eq!(
        (status, body.as_str()),
        (
            400,
            "pipelines/release.json: params.version: missing required param \"version\""
        )
    );
    // The pipelines, with their params; `pipelines/` is no project.
    let (status, body) = s.get("/pipelines", true);
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    let summary: Vec<(String, Value, Value)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p.get("error"), None, "{p}");
            (
                p["name"].as_str().unwrap().to_string(),
                p["params"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .into(),
                p["jobs"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "announce".to_string(),
                json!(["build", "version"]),
                json!(["notice"])
            ),
            (
                "release".to_string(),
                json!(["profile", "version"]),
                json!(["deps", "build"])
            ),
        ]
    );
    let (status, body) = s.post("/jobs", r#"{"project": "pipelines"}"#);
    assert_eq!(
        (status, body.as_str()),
        (404, "Unknown project 'pipelines'")
    );

    // The client, as docs/users.md runs it: the same run, every job from the cache; the build's
    // artifacts fetched.
    let port = s.addr.rsplit_once(':').unwrap().1.to_string();
    // `mistry pipeline run release`, the build's artifacts into `target`.
    let release = |target: &Path, params: &[&str]| {
        let t = format!("build={}", target.display());
        let mut args = vec![
            "pipeline",
            "run",
            "release",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--artifacts",
            &t,
            "--",
        ];
        args.extend_from_slice(params);
        client(dir.path(), &args)
    };
    let target = dir.path().join("release-1.0");
    let out = release(&target, &["--version=1.0"]);
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (Some(0), String::new())
    );
    assert_eq!(
        settled_lines(&out),
        [
            format!("Pipeline run can be found at {base}/pipeline/release/{run}"),
            format!("deps: ready (cached), logs at {base}/job/deps/{deps_id}"),
            format!("build: ready (cached), logs at {base}/job/app/{build_id}"),
            format!("Triggered pipeline announce: {base}/{url}"),
            "Pipeline release succeeded: 2 jobs ready (2 cached)".to_string(),
        ]
    );
    assert_eq!(files(&target), ["app-1.0/BUILD", "app-1.0/bin/app"]);
    assert_eq!(read(target.join("app-1.0/bin/app")), APP_RELEASE);
    // A new version: deps from the cache, a new build.
    let target = dir.path().join("release-1.1");
    let out = release(&target, &["--version=1.1", "--profile=debug"]);
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (Some(0), String::new())
    );
    let lines = settled_lines(&out);
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert_eq!(
        lines[1],
        format!("deps: ready (cached), logs at {base}/job/deps/{deps_id}")
    );
    let new_build = lines[2]
        .strip_prefix(&format!("build: ready, logs at {base}/job/app/"))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_ne!(new_build, build_id);
    assert!(lines[3].starts_with(&format!(
        "Triggered pipeline announce: {base}/pipeline/announce/"
    )));
    assert_eq!(
        lines[4],
        "Pipeline release succeeded: 2 jobs ready (1 cached)"
    );
    assert_eq!(
        read(target.join("app-1.1/BUILD")),
        "app 1.1\nprofile: debug\npackage: banner 0.3.1\npackage: greet 1.2.0\n"
    );
    let app = read(target.join("app-1.1/bin/app"));
    assert!(
        app.starts_with("#!/bin/sh\nset -x\nAPP_NAME=app\nAPP_VERSION=1.1\n# banner 0.3.1: frames a line of text.\n"),
        "{app}"
    );
    assert_eq!(
        run_app(&target.join("app-1.1/bin/app")),
        "=======\napp 1.1\n=======\nHello, you!\n"
    );

    // Locally, as docs/users.md runs it: `mistry exec --projects examples --pipeline release`.
    // The same run and job IDs as the server's, the artifacts of each job in <target>/<job>.
    let state = dir.path().join("state");
    let out = client(
        dir.path(),
        &[
            "exec",
            "--projects",
            "examples",
            "--pipeline",
            "release",
            "--state-dir",
            state.to_str().unwrap(),
            "--images",
            images_dir().to_str().unwrap(),
            "-t",
            "out",
            "--",
            "--version=1.0",
        ],
    );
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (Some(0), String::new())
    );
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let local = |name: &str| -> String {
        let prefix = format!("Job {name}: ");
        let line = lines
            .iter()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no job {name} in:\n{stdout}"));
        line.split(',').next().unwrap().to_string()
    };
    assert_eq!(
        (local("deps"), local("build")),
        (deps_id.clone(), build_id.clone())
    );
    for want in [
        format!("Run ID: {run}"),
        format!("deps: ready, job {deps_id}"),
        format!("build: ready, job {build_id}"),
        format!("Triggered pipeline announce: run {announce_run}, succeeded"),
        "a server with the same projects, pipeline and params gives the same job IDs".to_string(),
    ] {
        assert!(
            lines.contains(&want.as_str()),
            "{want:?} missing:\n{stdout}"
        );
    }
    assert_eq!(
        lines.last(),
        Some(&"Pipeline release succeeded: 2 jobs ready (0 cached)"),
        "{stdout}"
    );
    let out_dir = dir.path().join("out");
    assert_eq!(
        files(&out_dir.join("build")),
        ["app-1.0/BUILD", "app-1.0/bin/app"]
    );
    assert_eq!(read(out_dir.join("build/app-1.0/bin/app")), APP_RELEASE);
    assert_eq!(
        read(out_dir.join("deps/installed.txt")),
        "banner 0.3.1\ngreet 1.2.0\n"
    );

    // A changed lockfile: a new deps job, incremental in its group: only the new package is
    // fetched, the other comes from the cache of the group's last build.
    let lock = examples.join("deps/deps.lock");
    std::fs::write(&lock, read(&lock).replace("greet 1.2.0", "greet 1.3.0")).unwrap();
    let rec = curl_release(&s, "1.2");
    let deps = job(&rec, "deps");
    assert_eq!(
        (&deps["cached"], &deps["incremental"]),
        (&json!(false), &json!(true)),
        "{deps}"
    );
    assert_ne!(id_of(&rec, "deps"), deps_id);
    let d = artifacts(&rec, "deps");
    assert_eq!(read(d.join("report.txt")), "1 fetched, 1 from the cache\n");
    assert_eq!(read(d.join("installed.txt")), "banner 0.3.1\ngreet 1.3.0\n");
    assert_eq!(
        run_app(&artifacts(&rec, "build").join("app-1.2/bin/app")),
        "=======\napp 1.2\n=======\nHello, you, nice to see you!\n"
    );
}

/// examples/hello, as the README's first curl runs it, beside the pipelines.
#[test]
fn the_hello_example_still_works() {
    let (_dir, _examples, s) = serve_examples();
    let info = s.job(json!({"project": "hello", "params": {"name": "you"}}));
    assert_eq!(info["ExitCode"], 0, "{info}");
    let a = PathBuf::from(info["Path"].as_str().unwrap());
    assert_eq!(files(&a), ["greeting.txt"]);
    assert_eq!(
        read(a.join("greeting.txt")),
        "hello, you (build 1 on mistry, as root)\n"
    );
    // Its cache across the builds of a group.
    for (name, build) in [("a", 1), ("b", 2)] {
        let info = s.job(json!({"project": "hello", "group": "g", "params": {"name": name}}));
        assert_eq!(info["ExitCode"], 0, "{info}");
        assert_eq!(info["Incremental"], build > 1, "{info}");
        assert_eq!(
            read(PathBuf::from(info["Path"].as_str().unwrap()).join("greeting.txt")),
            format!("hello, {name} (build {build} on mistry, as root)\n")
        );
    }
}
