//! Every place a job or a RUN step writes is bounded while it runs (`limits.disk`, `limits.log`,
//! `limits.tmpfs`): its root filesystem, its `data/` (cache included), its logs, `/dev/shm` and
//! `RUN --mount=type=tmpfs`. Small limits keep the tests fast; each job that would write without
//! end on a server without these bounds writes slowly and has a time limit, so that such a server
//! fails the test (by the time limit) instead of filling the disk.

use std::time::{Duration, Instant};

use common::server::{read, Server};
use serde_json::{json, Value};

mod common;

/// A BuildInfo in an assertion message: its exit code, error and the end of its log.
fn brief(info: &Value) -> String {
    let log = info["ContainerStdouterr"].as_str().unwrap_or("");
    let tail: String = log
        .chars()
        .rev()
        .take(1500)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!(
        "ExitCode {} ErrBuild {:?}, log ends with:\n{tail}",
        info["ExitCode"], info["ErrBuild"]
    )
}

/// 8 MiB.
const DISK: u64 = 8 << 20;
const DISK_ERROR: &str = "the job exceeded its disk limit of 8388608 bytes and was killed";

fn add(s: &Server, name: &str, dockerfile: &str, mistry_json: Option<&str>) {
    add_with(s, name, dockerfile, mistry_json, &[]);
}

fn add_with(
    s: &Server,
    name: &str,
    dockerfile: &str,
    mistry_json: Option<&str>,
    files: &[(&str, &str)],
) {
    let dir = s.dir.path().join("projects").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    if let Some(text) = mistry_json {
        std::fs::write(dir.join(".mistry.json"), text).unwrap();
    }
    for (path, text) in files {
        std::fs::write(dir.join(path), text).unwrap();
    }
}

/// A job running `script` with /bin/sh.
fn job_image(script: &str) -> String {
    format!(
        "FROM busybox\nCMD [\"/bin/sh\", \"-c\", {}]\n",
        json!(script)
    )
}

/// Writes 1 MB files into `dir` without end, 20 a second (a server without a disk watch lets
/// it run into the time limit).
fn fill_big(dir: &str) -> String {
    format!(
        "mkdir -p {dir}; i=0; while :; do head -c 1000000 /dev/zero > {dir}/f$i; i=$((i+1)); sleep 0.05; done"
    )
}

/// Writes one-block files into `dir` without end, about 2000 a second.
fn fill_small(dir: &str) -> String {
    format!(
        "mkdir -p {dir}; i=0; while :; do for j in 0 1 2 3 4 5 6 7 8 9; do echo $i > {dir}/s$i-$j; done; \
         i=$((i+1)); sleep 0.005; done"
    )
}

/// The job ended by the disk limit, within a few seconds (not by its time limit of 20 s).
fn killed_for_disk(s: &Server, project: &str) -> Value {
    let started = Instant::now();
    let info = s.job(json!({"project": project}));
    assert_eq!(info["ErrBuild"], DISK_ERROR, "{project}: {}", brief(&info));
    assert_eq!(info["ExitCode"], -1, "{project}: {}", brief(&info));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{project}: {:?}",
        started.elapsed()
    );
    info
}

#[test]
fn a_job_is_killed_at_its_disk_limit_while_it_writes() {
    let mut stores = vec![("overlay", None), ("plain", None)];
    if let Some(dir) = common::btrfs_dir_or_skip() {
        // The job's root is a snapshot of its image: counted by what it grows.
        stores.push(("btrfs", Some(dir)));
    }
    for (fs, parent) in stores {
        let s = Server::start_in(
            parent.as_deref(),
            json!({
                "filesystem": fs,
                "time_limit": "20s",
                "limits": {"disk": "8MiB"},
            }),
        );
        // Its root filesystem: big files, and many small ones (under the file size limit).
        add(&s, "bigroot", &job_image(&fill_big("/tmp/big")), None);
        add(&s, "smallroot", &job_image(&fill_small("/var/small")), None);
        // Its data/cache; its project's own file cannot raise the limit.
        add(
            &s,
            "cache",
            &job_image(&fill_big("/data/cache/big")),
            Some(r#"{"limits": {"disk": "100GiB"}}"#),
        );
        for p in ["bigroot", "smallroot", "cache"] {
            let info = killed_for_disk(&s, p);
            assert!(
                info["ContainerStdouterr"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("mistry: {DISK_ERROR}\n")),
                "{fs} {p}: {}",
                brief(&info)
            );
        }
        // What the cache holds stays near the limit (the watch looks every 200 ms, and more
        // often close to the limit).
        let ready = s.builds().join("cache/ready");
        let build = std::fs::read_dir(&ready).unwrap().next().unwrap().unwrap();
        let held = mistry::security::disk_usage(&build.path().join("data"), u64::MAX).unwrap();
        assert!(held < DISK + (16 << 20), "{fs}: {held}");

        // A RUN step's writes to its root filesystem.
        add(
            &s,
            "runfill",
            &format!("FROM busybox\nRUN {}\nCMD true\n", fill_big("/tmp/big")),
            None,
        );
        let started = Instant::now();
        let info = s.job(json!({"project": "runfill"}));
        let err = info["ErrBuild"].as_str().unwrap();
        assert!(
            err.starts_with("could not build docker image: step RUN mkdir -p /tmp/big;")
                && err.ends_with("' exceeded its disk limit of 8388608 bytes"),
            "{fs}: {}",
            brief(&info)
        );
        assert!(started.elapsed() < Duration::from_secs(15));

        // Within the limit a job runs to its end.
        add(
            &s,
            "modest",
            &job_image("head -c 2000000 /dev/zero > /tmp/x && head -c 2000000 /dev/zero > /data/cache/y && echo fine"),
            None,
        );
        let info = s.job(json!({"project": "modest"}));
        assert_eq!(
            (info["ExitCode"].as_i64(), info["ErrBuild"].as_str()),
            (Some(0), Some("")),
            "{}",
            brief(&info)
        );
    }
}

/// `log` is 1 MiB of output and the truncation line (on a line of its own).
fn assert_cut_at_1mib(log: &[u8]) {
    assert!(log.len() > 1 << 20, "{}", log.len());
    let (kept, rest) = log.split_at(1 << 20);
    let line = "[log truncated at 1 MiB]\n";
    let expected = if kept.ends_with(b"\n") {
        line.to_string()
    } else {
        format!("\n{line}")
    };
    assert_eq!(String::from_utf8_lossy(rest), expected);
}

#[test]
fn logs_are_bounded_and_the_job_goes_on() {
    let s = Server::start(json!({"limits": {"log": "1MiB"}, "time_limit": "60s"}));
    // 3 MB on each stream, then the job finishes its work: nothing blocks it.
    add(
        &s,
        "chatty",
        &job_image(
            "yes | head -c 3000000 >&2; yes | head -c 3000000; echo done > /data/artifacts/done",
        ),
        None,
    );
    let info = s.job(json!({"project": "chatty"}));
    assert_eq!(info["ExitCode"], 0, "{}", info["ErrBuild"]);
    assert_eq!(
        read(std::path::Path::new(info["Path"].as_str().unwrap()).join("done")),
        "done\n"
    );
    let build = std::path::Path::new(info["Path"].as_str().unwrap())
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let err = std::fs::read(build.join("stderr.log")).unwrap();
    assert_cut_at_1mib(&err);
    assert!(err[..1 << 20].iter().all(|&b| b == b'y' || b == b'\n'));
    // out.log: the image build, then both streams, cut at the same size.
    let out = std::fs::read(build.join("out.log")).unwrap();
    assert_cut_at_1mib(&out);
    assert!(out.starts_with(b"Step 1/2 : FROM busybox\n"));
    // The answer carries the bounded logs too.
    assert_eq!(info["ContainerStderr"].as_str().unwrap().len(), err.len());
}

#[test]
fn a_job_flooding_its_logs_does_not_hold_up_the_server() {
    let s = Server::start(json!({"limits": {"log": "1MiB"}, "time_limit": "4s"}));
    // Writes to stderr and stdout without end (a server without the bound would fill its disk
    // at the pace of this loop: ~10 MB/s for 4 s).
    add(
        &s,
        "flood",
        &job_image("while :; do yes | head -c 100000 >&2; yes | head -c 100000; sleep 0.01; done"),
        None,
    );
    let (status, text) = s.post("/jobs?async", &json!({"project": "flood"}).to_string());
    assert_eq!(status, 201, "{text}");
    // Meanwhile other jobs run and answer.
    common::wait_until("the flood to start", || s.pending_dirs("flood") > 0);
    let started = Instant::now();
    let info = s.job(json!({"project": "simple", "params": {"name": "meanwhile"}}));
    assert_eq!(info["ExitCode"], 0, "{}", info["ErrBuild"]);
    assert!(started.elapsed() < Duration::from_secs(30));
    // The flood ends at its time limit, its logs bounded.
    let info = s.job(json!({"project": "flood"}));
    assert_eq!(
        info["ErrBuild"], "the job exceeded its time limit of 4s and was killed",
        "{}",
        info["ErrBuild"]
    );
    let out = info["ContainerStdouterr"].as_str().unwrap();
    let last = "mistry: the job exceeded its time limit of 4s and was killed\n";
    assert!(
        out.ends_with(last),
        "{}",
        &out[out.len().saturating_sub(200)..]
    );
    assert_cut_at_1mib(&out.as_bytes()[..out.len() - last.len()]);
    assert_cut_at_1mib(info["ContainerStderr"].as_str().unwrap().as_bytes());
}

/// Writes 2 MB into the directory `$1` and says how it went.
const WRITE_SH: &str =
    "head -c 2000000 /dev/zero > $1/x 2>/dev/null; echo \"$1: $? $(wc -c < $1/x)\"\n";
/// The size option of the tmpfs mounted at `$1`.
const SIZE_SH: &str =
    "sed -n \"s#^[^ ]* $1 tmpfs .*[ ,]\\(size=[0-9]*k\\).*#\\1#p\" /proc/mounts\n";

#[test]
fn tmpfs_mounts_are_bounded() {
    // What the job printed after the image's build log (its CMD's output).
    let job_output = |s: &Server| {
        let info = s.job(json!({"project": "sizes"}));
        assert_eq!(info["ExitCode"], 0, "{}", brief(&info));
        let out = info["ContainerStdouterr"].as_str().unwrap().to_owned();
        let job = &out[out.find("Successfully built").unwrap()..];
        job[job.find('\n').unwrap() + 1..].to_owned()
    };
    // The default: 64 MiB, also for a RUN tmpfs mount without a size.
    let s = Server::start(json!({}));
    let dockerfile = "FROM busybox\nCOPY size.sh write.sh /\n\
        RUN --mount=type=tmpfs,target=/scratch sh /size.sh /scratch > /run-size && \
            sh /write.sh /scratch > /run-write\n\
        CMD [\"/bin/sh\", \"-c\", \"cat /run-size /run-write; sh /size.sh /dev/shm; sh /write.sh /dev/shm\"]\n";
    let files = [("size.sh", SIZE_SH), ("write.sh", WRITE_SH)];
    add_with(&s, "sizes", dockerfile, None, &files);
    assert_eq!(
        job_output(&s),
        "size=65536k\n/scratch: 0 2000000\nsize=65536k\n/dev/shm: 0 2000000\n"
    );

    // Lowered by the operator: writing past it fails (ENOSPC), in a job and in a RUN step.
    let s = Server::start(json!({"limits": {"tmpfs": "1MiB"}}));
    add_with(&s, "sizes", dockerfile, None, &files);
    assert_eq!(
        job_output(&s),
        "size=1024k\n/scratch: 1 1048576\nsize=1024k\n/dev/shm: 1 1048576\n"
    );
}
