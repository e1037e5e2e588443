//! What the daemon does for a job before its sandbox starts cannot be made to hang: a file it
//! reads from an image (`/etc/passwd`, `/etc/group`) that is a FIFO, a link or huge fails the job
//! at once with a clear error and gives its slot back, and the job's time limit counts from its
//! start (its image build included). Each test has a client timeout: on a server that hangs,
//! it fails instead of waiting for ever.

use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::{json, Value};

mod common;

fn add(s: &Server, name: &str, dockerfile: &str) {
    let dir = s.dir.path().join("projects").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    std::fs::write(dir.join("f"), "f\n").unwrap();
}

/// POST /jobs, giving up after `secs` seconds (a hung server fails the test).
fn job_within(s: &Server, body: Value, secs: u64) -> Value {
    let agent = Server::agent_within(Duration::from_secs(secs));
    let mut r = agent
        .post(&s.url("/jobs"))
        .send(body.to_string())
        .unwrap_or_else(|e| panic!("no answer to {body} within {secs} s: {e}"));
    let text = r.body_mut().read_to_string().unwrap();
    assert_eq!(r.status().as_u16(), 201, "{text}");
    serde_json::from_str(&text).unwrap()
}

const FIFO_PASSWD: &str = "FROM busybox\nRUN rm /etc/passwd && mkfifo /etc/passwd\n";
const NOT_REGULAR: &str = "user \"someone\": the image's /etc/passwd is not a regular file";

#[test]
fn special_user_files_fail_the_job_at_once_and_give_its_slot_back() {
    let mut stores = vec![("plain", None), ("overlay", None)];
    if let Some(dir) = common::btrfs_dir_or_skip() {
        stores.push(("btrfs", Some(dir)));
    }
    for (fs, parent) in stores {
        let s = Server::start_in(
            parent.as_deref(),
            json!({"filesystem": fs, "job_concurrency": 2}),
        );
        // The job's user, a RUN step's, COPY --chown's: each reads /etc/passwd (and group).
        add(
            &s,
            "jobuser",
            &format!("{FIFO_PASSWD}USER someone\nCMD true\n"),
        );
        add(
            &s,
            "runuser",
            &format!("{FIFO_PASSWD}USER someone\nRUN true\nCMD true\n"),
        );
        add(
            &s,
            "chown",
            &format!("{FIFO_PASSWD}COPY --chown=someone f /f\nCMD true\n"),
        );
        add(
            &s,
            "group",
            "FROM busybox\nRUN echo someone:x:1234:1234::/:/bin/sh >> /etc/passwd && \
             rm /etc/group && mkfifo /etc/group\nUSER someone\nCMD true\n",
        );
        // A link (followed inside the image) to a FIFO, a 1 GiB (sparse) file.
        add(
            &s,
            "link",
            "FROM busybox\nRUN mkfifo /etc/pipe && rm /etc/passwd && ln -s /etc/pipe /etc/passwd\n\
             USER someone\nCMD true\n",
        );
        add(
            &s,
            "huge",
            "FROM busybox\nRUN truncate -s 1G /etc/passwd\nUSER someone\nCMD true\n",
        );
        let expect = [
            ("jobuser", format!("could not run the job: {NOT_REGULAR}")),
            ("link", format!("could not run the job: {NOT_REGULAR}")),
            (
                "group",
                "could not run the job: user \"someone\": the image's /etc/group is not a \
                 regular file"
                    .to_string(),
            ),
            (
                "huge",
                "could not run the job: user \"someone\": the image's /etc/passwd is larger \
                 than 4 MiB"
                    .to_string(),
            ),
        ];
        for (project, err) in &expect {
            let started = Instant::now();
            let info = job_within(&s, json!({"project": project}), 60);
            assert_eq!(info["ErrBuild"], err.as_str(), "{fs} {project}");
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{fs} {project}"
            );
        }
        let info = job_within(&s, json!({"project": "runuser"}), 60);
        let err = info["ErrBuild"].as_str().unwrap();
        assert!(
            err.starts_with("could not build docker image: step RUN true (line 4): ")
                && err.ends_with(NOT_REGULAR),
            "{fs}: {err}"
        );
        let info = job_within(&s, json!({"project": "chown"}), 60);
        let err = info["ErrBuild"].as_str().unwrap();
        assert!(
            err.starts_with("could not build docker image: step COPY --chown=someone f /f")
                && err.ends_with(&format!("--chown: {NOT_REGULAR}")),
            "{fs}: {err}"
        );

        // Two such jobs at once (both slots), then a normal job: the slots came back.
        for n in ["1", "2"] {
            let body = json!({"project": "jobuser", "params": {"n": n}});
            let (status, text) = s.post("/jobs?async", &body.to_string());
            assert_eq!(status, 201, "{text}");
        }
        let info = job_within(
            &s,
            json!({"project": "simple", "params": {"name": "x"}}),
            60,
        );
        assert_eq!(info["ExitCode"], 0, "{fs}: {}", info["ErrBuild"]);
    }
}

#[test]
fn the_time_limit_counts_from_the_jobs_start() {
    let s = Server::start(json!({"time_limit": "2s"}));
    // Each RUN step is shorter than the limit, both together are not.
    add(
        &s,
        "slowbuild",
        "FROM busybox\nRUN sleep 1.5\nRUN sleep 1.5\nCMD true\n",
    );
    let started = Instant::now();
    let info = job_within(&s, json!({"project": "slowbuild"}), 60);
    assert_eq!(
        info["ErrBuild"],
        "the job exceeded its time limit of 2s before it started (while its image was built) \
         and was stopped"
    );
    assert_eq!(info["ExitCode"], -1);
    assert!(started.elapsed() < Duration::from_secs(10));
    // A job whose image took most of the limit gets only what is left.
    add(
        &s,
        "lateish",
        "FROM busybox\nRUN sleep 1.2\nCMD [\"sleep\", \"1.5\"]\n",
    );
    let info = job_within(&s, json!({"project": "lateish"}), 60);
    assert_eq!(
        info["ErrBuild"], "the job exceeded its time limit of 2s and was killed",
        "{info}"
    );
    // Built once, the image is cached: the job alone fits.
    let info = job_within(&s, json!({"project": "lateish"}), 60);
    assert_eq!(info["ExitCode"], 0, "{info}");
}
