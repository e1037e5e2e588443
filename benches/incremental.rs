//! Incremental builds with a big cache: a group whose `/data/cache` holds 1 GiB in 20,000
//! files, then jobs of that group that only touch an artifact. Printed per backend (btrfs
//! snapshots, overlay layers, plain copies): the median request-to-response time of such an
//! incremental job, of a fresh (non-incremental) job of the same project, and the difference —
//! what starting from the group's last build costs (target: ≤ 50 ms on btrfs and overlay; plain
//! copies the whole cache and is the comparison).
//!
//! `cargo bench --bench incremental` (`BENCH_RUNS`: incremental jobs per backend, default 10;
//! `BENCH_CACHE_MIB`: the cache's size, default 1024). btrfs is measured where
//! `MISTRY_TEST_BTRFS` (default `/mnt/mistry-btrfs`) is a writable btrfs directory;
//! `BENCH_BACKENDS=overlay,plain` measures only those.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{median, ms};

const FILES: u64 = 20_000;

fn is_btrfs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC)
}

/// Fields drop in order: the daemon stops before its directory goes.
struct Daemon {
    _daemon: common::Daemon,
    url: String,
    _dir: tempfile::TempDir,
}

fn start(backend: &str, parent: &Path, images: &Path, cache_mib: u64) -> Daemon {
    let dir = tempfile::Builder::new()
        .prefix("mistry-bench-incr")
        .tempdir_in(parent)
        .unwrap();
    let project = dir.path().join("projects/big");
    std::fs::create_dir_all(&project).unwrap();
    // fill=1: 1 GiB in FILES files; else touch one artifact.
    let bytes = cache_mib * 1024 * 1024;
    // The shell's builtin printf: no process per file.
    let script = format!(
        "if [ -f /data/params/fill ]; then cd /data/cache && i=0; \
         while [ $i -lt {FILES} ]; do printf '%{}s' '' > f$i; i=$((i+1)); done; \
         else cat /data/params/n > /data/artifacts/touched; fi",
        bytes.div_ceil(FILES)
    );
    std::fs::write(
        project.join("Dockerfile"),
        format!(
            "FROM busybox\nCMD [\"/bin/sh\", \"-c\", {}]\n",
            serde_json::to_string(&script).unwrap()
        ),
    )
    .unwrap();
    let mut extra = serde_json::json!({"filesystem": backend});
    if backend == "plain" {
        // Plain copies 1 GiB per build: keep the disk in check. (Elsewhere builds hold their
        // changes only; retention would squash the layers every other build, a 1 GiB copy.)
        extra["retention"] = serde_json::json!({"keep": 2});
    }
    let daemon = common::Daemon::start(&common::write_config(dir.path(), images, extra));
    Daemon {
        url: format!("http://{}/jobs", daemon.addr),
        _daemon: daemon,
        _dir: dir,
    }
}

fn main() {
    let images = common::busybox_images();
    let runs: usize = common::env_num("BENCH_RUNS", 10);
    let cache_mib: u64 = common::env_num("BENCH_CACHE_MIB", 1024);
    let btrfs = PathBuf::from(
        std::env::var("MISTRY_TEST_BTRFS").unwrap_or_else(|_| "/mnt/mistry-btrfs".into()),
    );
    let tmp = std::env::temp_dir();
    let mut backends: Vec<(&str, PathBuf)> = Vec::new();
    if is_btrfs(&btrfs) && nix::unistd::access(&btrfs, nix::unistd::AccessFlags::W_OK).is_ok() {
        backends.push(("btrfs", btrfs));
    } else {
        println!(
            "(btrfs: {} is not a writable btrfs directory; skipped)",
            btrfs.display()
        );
    }
    backends.push(("overlay", tmp.clone()));
    backends.push(("plain", tmp));

    let agent = common::agent(Some(Duration::from_secs(600)));
    // BENCH_BACKENDS=overlay,plain: only those.
    if let Ok(only) = std::env::var("BENCH_BACKENDS") {
        backends.retain(|(b, _)| only.split(',').any(|o| o == *b));
    }
    let mut rows = Vec::new();
    for (backend, parent) in backends {
        let d = start(backend, &parent, &images, cache_mib);
        let post = |body: String| {
            let t = Instant::now();
            let mut r = agent.post(&d.url).send(body.as_str()).unwrap();
            let text = r.body_mut().read_to_string().unwrap();
            assert_eq!(r.status().as_u16(), 201, "{text}");
            assert!(text.contains("\"ExitCode\":0"), "{text}");
            (t.elapsed(), text)
        };
        let (fill, _) = post(r#"{"project": "big", "group": "g", "params": {"fill": "1"}}"#.into());
        // Plain copies the whole cache per job: fewer runs.
        let n = if backend == "plain" {
            runs.min(3)
        } else {
            runs
        };
        // Interleaved, so that background work (a squash of the layers, retention) weighs on
        // both alike.
        let (mut incr, mut fresh) = (Vec::new(), Vec::new());
        for i in 0..n {
            let (t, text) = post(format!(
                r#"{{"project": "big", "group": "g", "params": {{"n": "{i}"}}}}"#
            ));
            assert!(text.contains("\"Incremental\":true"), "{text}");
            incr.push(t);
            fresh.push(post(format!(r#"{{"project": "big", "params": {{"n": "{i}"}}}}"#)).0);
        }
        let (incr, fresh) = (median(&mut incr), median(&mut fresh));
        rows.push((backend, fill, incr, fresh, n));
    }

    println!(
        "incremental jobs of a group whose cache holds {cache_mib} MiB in {FILES} files (medians)"
    );
    println!(
        "{:<9} {:>10} {:>14} {:>12} {:>12}   target (start cost)",
        "backend", "fill", "incremental", "fresh", "start cost"
    );
    for (backend, fill, incr, fresh, n) in rows {
        let target = match backend {
            "plain" => "— (copies the cache)",
            _ => "<= 50 ms",
        };
        println!(
            "{backend:<9} {:>9.1}s {:>12.1}ms {:>10.1}ms {:>10.1}ms   {target}   ({n} runs)",
            fill.as_secs_f64(),
            ms(incr),
            ms(fresh),
            ms(incr.saturating_sub(fresh)),
        );
    }
}
