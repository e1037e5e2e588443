//! Issue 20, class 2: what a job leaves in its `data/` (links to host directories, FIFOs,
//! links inside its cache) is carried into its group's next build, and the daemon never
//! follows it: nothing appears or changes outside the job (a sentinel host directory is
//! checked exactly after every step), the next build starts clean where the last one broke its
//! `data/`, and the daemon stays up. On every backend the tests cover (plain copies, overlay
//! cache layers squashed into one, btrfs snapshots), as root and as an unprivileged user.

mod common;

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::pipelines::{job, post_run, script_project, write_pipeline};
use common::server::{artifacts, read, Server};
use common::{images_dir, mistryd_bin};
use serde_json::{json, Value};

/// A job that leaves its `/data` to its group's next build (`leave`: links to the host
/// directory `host` in place of `/data/input` and `/data/params`, a link to it, a FIFO and a
/// file inside `/data/cache`, after trying to replace `/data` itself; `break`: a link to it
/// instead of `/data/cache`, FIFOs instead of `/data/input` and `/data/params`), or that says
/// what it was given (`check`). `pipe`: a pipeline job reading its input `up`, then leaving
/// `/data/input` a link to `host`.
const LINKS_SH: &str = r#"#!/bin/sh
h=$(cat /data/params/host)
m=$(cat /data/params/mode)
echo "job $m $(cat /data/params/n)"
mkdir -p /data/artifacts
case "$m" in
leave)
    for t in "umount /data" "mv /data /moved" "rmdir /data"; do
        if $t 2>/dev/null; then echo "$t: done"; else echo "$t: refused"; fi
    done > /data/artifacts/data.txt
    mkdir -p /data/cache
    ln -s "$h" /data/cache/out
    mkfifo /data/cache/fifo
    echo cache > /data/cache/file
    rm -rf /data/input; ln -s "$h" /data/input
    rm -rf /data/params; ln -s "$h" /data/params
    ;;
break)
    rm -rf /data/cache
    if [ -d /data/cache ]; then echo kept; else ln -s "$h" /data/cache && echo replaced; fi > /data/artifacts/cache.txt
    rm -rf /data/input; mkfifo /data/input
    rm -rf /data/params; mkfifo /data/params
    ;;
check)
    {
        ls -A /data | grep -v '^input$' | tr '\n' ' '; echo
        ls -A /data/cache | tr '\n' ' '; echo
        readlink /data/cache/out || echo no link
        if [ -p /data/cache/fifo ]; then echo fifo; else echo no fifo; fi
        cat /data/cache/file 2>/dev/null || echo no file
        ls -A /data/params | tr '\n' ' '; echo
        # Absent (a layered cache carries only artifacts and cache), or a directory.
        if [ -L /data/input ] || { [ -e /data/input ] && [ ! -d /data/input ]; }; then
            echo input not a directory
        else
            echo input ok
        fi
    } > /data/artifacts/seen.txt
    ;;
pipe)
    cat /data/input/up/out.txt > /data/artifacts/in.txt
    mv /data/input /data/old && ln -s "$h" /data/input
    ;;
esac
echo ok > /data/artifacts/ok.txt
"#;

/// Writes its param `text` to `/data/artifacts/out.txt`.
const PRODUCE_SH: &str = "#!/bin/sh\ncat /data/params/text > /data/artifacts/out.txt\n";

/// A host directory with one file, which no job may change or add to.
struct Sentinel(PathBuf);

impl Sentinel {
    fn new(s: &Server) -> Sentinel {
        let p = s.dir.path().join("sentinel");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("keep"), "keep\n").unwrap();
        Sentinel(p)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    /// Exactly `keep`, unchanged.
    fn check(&self, ctx: &str) {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["keep"], "{ctx}: something appeared in the sentinel");
        assert_eq!(read(self.0.join("keep")), "keep\n", "{ctx}");
        let meta = std::fs::symlink_metadata(self.0.join("keep")).unwrap();
        assert!(meta.is_file(), "{ctx}");
    }
}

/// A server for each backend the tests cover: plain (copies), overlay (cache layers, squashed
/// once deeper than one), btrfs (snapshots).
fn servers() -> Vec<(String, Server)> {
    common::backends()
        .into_iter()
        .map(|(kind, parent)| {
            let config = match kind {
                images::BackendKind::Plain => json!({"filesystem": "plain"}),
                images::BackendKind::Overlay => json!({"filesystem": "overlay", "cache_layers": 1}),
                images::BackendKind::Btrfs => json!({"filesystem": "btrfs"}),
            };
            let s = Server::start_in(parent.as_deref(), config.clone());
            let projects = s.dir.path().join("projects");
            script_project(&projects, "links", LINKS_SH);
            // The same job as a user of its image (its data/ is given to that user).
            common::pipelines::write(
                &projects.join("linksuser/Dockerfile"),
                "FROM busybox\nRUN echo app:x:4321:4321::/home/app:/bin/sh >> /etc/passwd && \
                 echo app:x:4321: >> /etc/group\nCOPY run.sh /run.sh\nUSER app\n\
                 ENTRYPOINT [\"/bin/sh\", \"/run.sh\"]\n",
            );
            common::pipelines::write(&projects.join("linksuser/run.sh"), LINKS_SH);
            script_project(&projects, "producer", PRODUCE_SH);
            (config.to_string(), s)
        })
        .collect()
}

/// The build directory (`ready/<id>`) of a BuildInfo or a run's job.
fn build_of(artifacts: &Path) -> PathBuf {
    artifacts.parent().unwrap().parent().unwrap().to_path_buf()
}

fn log_of(info: &Value) -> &str {
    info["ContainerStdouterr"].as_str().unwrap()
}

/// A job of the group `g` of project `links`; it succeeded.
fn links_job(s: &Server, sentinel: &Sentinel, mode: &str, n: u32, ctx: &str) -> Value {
    project_job(s, "links", sentinel, mode, n, ctx)
}

/// A job of the group `g` of `project` (`links` or `linksuser`); it succeeded.
fn project_job(
    s: &Server,
    project: &str,
    sentinel: &Sentinel,
    mode: &str,
    n: u32,
    ctx: &str,
) -> Value {
    let info = s.job(json!({
        "project": project,
        "group": "g",
        "params": {"host": sentinel.path(), "mode": mode, "n": n.to_string()},
    }));
    let ctx = format!("{ctx} {mode} {n}: {info}");
    assert_eq!(
        (&info["ExitCode"], &info["ErrBuild"]),
        (&0.into(), &"".into()),
        "{ctx}"
    );
    assert_eq!(info["Incremental"], n > 1, "{ctx}");
    assert_eq!(read(artifacts(&info).join("ok.txt")), "ok\n", "{ctx}");
    assert!(
        log_of(&info).contains(&format!("job {mode} {n}\n")),
        "{ctx}"
    );
    sentinel.check(&ctx);
    info
}

/// Links and FIFOs a job leaves in its `data/` (instead of `input`, `params`, `cache`, and
/// inside `cache`) are removed after it ended, never followed by the next build (a copy, a
/// snapshot, cache layers and their squashed copy carry links inside the cache as links), and
/// the next build starts with directories there; `/data` itself cannot be replaced by a job.
#[test]
fn a_groups_next_build_never_follows_what_its_last_job_left() {
    for (config, s) in servers() {
        let sentinel = Sentinel::new(&s);
        let h = sentinel.path();
        let ctx = config.as_str();

        // 1. Links instead of /data/input and /data/params, a link and a FIFO in the cache.
        let first = links_job(&s, &sentinel, "leave", 1, ctx);
        assert_eq!(
            read(artifacts(&first).join("data.txt")),
            "umount /data: refused\nmv /data /moved: refused\nrmdir /data: refused\n",
            "{ctx}"
        );
        for name in ["input", "params"] {
            let line =
                format!("mistry: the job replaced /data/{name} with a symlink; it was removed\n");
            assert!(log_of(&first).contains(&line), "{ctx}: {line} missing");
        }
        let dir = build_of(&artifacts(&first));
        let data = dir.join("data");
        assert!(std::fs::symlink_metadata(&data).unwrap().is_dir(), "{ctx}");
        for name in ["input", "params", "cache", "artifacts"] {
            let m = std::fs::symlink_metadata(data.join(name)).unwrap();
            assert!(m.is_dir(), "{ctx}: data/{name} is {m:?}");
        }
        assert_eq!(
            std::fs::read_link(data.join("cache/out")).unwrap(),
            Path::new(h),
            "{ctx}"
        );

        // 2. The next build: the cache's link and FIFO as they were, input and params
        // directories (params its own), its logs its own (not its last build's).
        let expected_seen = |cache: &str, link: &str, fifo: &str, file: &str| {
            format!(
                "artifacts cache params \n{cache}\n{link}\n{fifo}\n{file}\nhost mode n \n\
                 input ok\n"
            )
        };
        let full = expected_seen("fifo file out ", h, "fifo", "cache");
        let second = links_job(&s, &sentinel, "check", 2, ctx);
        assert_eq!(read(artifacts(&second).join("seen.txt")), full, "{ctx}");
        assert!(!log_of(&second).contains("job leave"), "{ctx}");
        let second_dir = build_of(&artifacts(&second));
        let layered = second_dir.join("cache-layers").exists();
        if config.contains("btrfs") {
            // A snapshot of the last build's directory (a copy would have new inodes).
            use std::os::unix::fs::MetadataExt;
            let ctime = |d: &Path| {
                let m = std::fs::symlink_metadata(d.join("data/cache/file")).unwrap();
                (m.ino(), m.ctime(), m.ctime_nsec())
            };
            assert_eq!(ctime(&second_dir), ctime(&dir), "{ctx}: not a snapshot");
        }
        if !layered {
            // A copy or a snapshot of the cache: the link copied as a link, the FIFO a FIFO.
            let cache = second_dir.join("data/cache");
            assert_eq!(std::fs::read_link(cache.join("out")).unwrap(), Path::new(h));
            let fifo = std::fs::symlink_metadata(cache.join("fifo")).unwrap();
            assert!(fifo.file_type().is_fifo(), "{ctx}");
        } else {
            // Two layers, deeper than cache_layers: squashed into one copy, link and FIFO kept.
            let flat = second_dir.join("cache-flat");
            common::wait_until("the squashed cache", || flat.is_dir());
            assert_eq!(std::fs::read_link(flat.join("out")).unwrap(), Path::new(h));
            let fifo = std::fs::symlink_metadata(flat.join("fifo")).unwrap();
            assert!(fifo.file_type().is_fifo(), "{ctx}");
        }
        sentinel.check(ctx);
        // 3. From the squashed copy (overlay), or a copy of a copy.
        let third = links_job(&s, &sentinel, "check", 3, ctx);
        assert_eq!(read(artifacts(&third).join("seen.txt")), full, "{ctx}");

        // 4. A link instead of /data/cache (a mount point with layers: only its contents go),
        // FIFOs instead of /data/input and /data/params.
        let fourth = links_job(&s, &sentinel, "break", 4, ctx);
        let replaced = read(artifacts(&fourth).join("cache.txt")) == "replaced\n";
        assert_eq!(replaced, !layered, "{ctx}");
        for (name, what, expected) in [
            ("input", "something that is not a directory", true),
            ("params", "something that is not a directory", true),
            ("cache", "a symlink", replaced),
        ] {
            let line =
                format!("mistry: the job replaced /data/{name} with {what}; it was removed\n");
            assert_eq!(log_of(&fourth).contains(&line), expected, "{ctx}: {line}");
        }
        // 5. Starts clean there.
        let fifth = links_job(&s, &sentinel, "check", 5, ctx);
        assert_eq!(
            read(artifacts(&fifth).join("seen.txt")),
            expected_seen("", "no link", "no fifo", "no file"),
            "{ctx}"
        );

        // The same as the image's user, whose data/ only the user namespace may change.
        let first = project_job(&s, "linksuser", &sentinel, "leave", 1, ctx);
        for name in ["input", "params"] {
            let line =
                format!("mistry: the job replaced /data/{name} with a symlink; it was removed\n");
            assert!(log_of(&first).contains(&line), "{ctx}: {line} missing");
        }
        let data = build_of(&artifacts(&first)).join("data");
        for name in ["input", "params"] {
            assert!(
                std::fs::symlink_metadata(data.join(name)).is_err()
                    || std::fs::symlink_metadata(data.join(name)).unwrap().is_dir(),
                "{ctx}: data/{name}"
            );
        }
        let second = project_job(&s, "linksuser", &sentinel, "check", 2, ctx);
        assert_eq!(read(artifacts(&second).join("seen.txt")), full, "{ctx}");

        // The daemon is alive and answers.
        assert_eq!(s.get("/index/", false).0, 200, "{ctx}");
    }
}

/// The state of each job of a run record, and that each succeeded.
fn run_ok(s: &Server, sentinel: &Sentinel, x: u32, ctx: &str) -> Value {
    let rec = post_run(
        s,
        &json!({"pipeline": "pl", "params": {"x": x.to_string(), "host": sentinel.path()}}),
    );
    let ctx = format!("{ctx} run {x}: {rec}");
    sentinel.check(&ctx);
    assert_eq!(rec["state"], "succeeded", "{ctx}");
    let down = job(&rec, "down");
    assert_eq!(down["incremental"], x > 1, "{ctx}");
    let path = PathBuf::from(down["path"].as_str().unwrap());
    assert_eq!(read(path.join("in.txt")), format!("up {x}"), "{ctx}");
    sentinel.check(&ctx);
    rec
}

/// The out.log of a run's job.
fn run_log(rec: &Value, name: &str) -> String {
    let path = PathBuf::from(job(rec, name)["path"].as_str().unwrap());
    read(build_of(&path).join("out.log"))
}

/// A pipeline job in a group leaves `/data/input` (where its inputs are mounted) a link to a
/// host directory: its group's next build does not create its inputs' mount points through
/// it. And a build whose `data/input` or `data/input/<job>` are links (one made before they
/// were checked, or fetched from elsewhere) has them replaced when the next build starts.
#[test]
fn a_pipeline_jobs_input_links_lead_nowhere() {
    for (config, s) in servers() {
        let sentinel = Sentinel::new(&s);
        let ctx = config.as_str();
        write_pipeline(
            &s.dir.path().join("projects"),
            "pl",
            r#"{
  "params": {"x": {"required": true}, "host": {"required": true}},
  "jobs": {
    "up": {"project": "producer", "params": {"text": "up {{x}}"}},
    "down": {"project": "links", "group": "g",
             "params": {"host": "{{host}}", "mode": "pipe", "n": "{{x}}"}, "needs": ["up"]}
  }
}"#,
        );
        let first = run_ok(&s, &sentinel, 1, ctx);
        let mut last = run_ok(&s, &sentinel, 2, ctx);
        assert!(
            run_log(&first, "down")
                .contains("mistry: the job replaced /data/input with a symlink; it was removed\n"),
            "{ctx}"
        );
        // What the daemon finds when the next build starts, whoever left it there (a layered
        // cache carries only data/artifacts and data/cache: nothing of data/input).
        for (plant, shown) in [("input", "/data/input"), ("input/up", "/data/input/up")] {
            let build = build_of(Path::new(job(&last, "down")["path"].as_str().unwrap()));
            let carried = !build.join("cache-layers").exists();
            let data = build.join("data");
            let p = data.join(plant);
            std::fs::create_dir_all(data.join("input")).unwrap();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            }
            std::os::unix::fs::symlink(sentinel.path(), &p).unwrap();
            let x = if plant == "input" { 3 } else { 4 };
            last = run_ok(&s, &sentinel, x, ctx);
            let line = format!(
                "mistry: the group's last build left {shown} as a symlink; it starts as an empty \
                 directory\n"
            );
            assert_eq!(
                run_log(&last, "down").contains(&line),
                carried,
                "{ctx}: {line}"
            );
        }
    }
}

/// `mistryd exec` copies a pipeline's artifacts into `<target>/<job>`: a link there (made by an
/// earlier copy of a job's artifacts into the same target) is refused, never written through.
#[test]
fn exec_never_copies_artifacts_through_a_link_a_job_left_in_the_target() {
    let dir = tempfile::Builder::new()
        .prefix("mistry-links")
        .tempdir()
        .unwrap();
    let sentinel = dir.path().join("sentinel");
    std::fs::create_dir(&sentinel).unwrap();
    let projects = dir.path().join("projects");
    script_project(
        &projects,
        "linker",
        "#!/bin/sh\nln -s \"$(cat /data/params/host)\" /data/artifacts/b\n",
    );
    script_project(&projects, "producer", PRODUCE_SH);
    write_pipeline(
        &projects,
        "two",
        r#"{"jobs": {"b": {"project": "producer", "params": {"text": "b"}}}}"#,
    );
    let state = dir.path().join("state");
    let target = dir.path().join("t");
    let exec = |args: &[&str]| -> Output {
        Command::new(mistryd_bin())
            .arg("exec")
            .arg("--state-dir")
            .arg(&state)
            .arg("--images")
            .arg(images_dir())
            .args(["--projects", projects.to_str().unwrap(), "-t"])
            .arg(&target)
            .args(args)
            .env_remove("XDG_CACHE_HOME")
            .env_remove("MISTRY_LOG")
            .output()
            .unwrap()
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let out = exec(&[
        "--project",
        "linker",
        "--",
        &format!("--host={}", sentinel.display()),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_link(target.join("b")).unwrap(), sentinel);
    let out = exec(&["--pipeline", "two"]);
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (
            Some(1),
            format!(
                "mistry exec: job b: refusing to copy the artifacts into {}: it is a symlink \
                 (not followed)\n",
                target.join("b").display()
            )
        )
    );
    assert_eq!(std::fs::read_dir(&sentinel).unwrap().count(), 0);
    // Without the link, the artifacts go there.
    std::fs::remove_file(target.join("b")).unwrap();
    let out = exec(&["--pipeline", "two"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(read(target.join("b/out.txt")), "b");
}
