//! A cold build of a Debian-based project, side by side with `buildah bud --layers` (overlay
//! storage, chroot isolation): the time and the size of each tool's storage afterwards.
//!
//! `cargo bench --bench debian_build` (`BENCH_RUNS` cold runs each, default 3, interleaved).
//! Needs the Debian base image of `images/recipes/debian.sh` at `$MISTRY_TEST_IMAGES/debian`
//! (default `target/images/debian`), buildah, and the network (the project's RUN step runs
//! `apt-get update && apt-get install`). mistryd builds with the backend it chooses by default
//! for a store in `$TMPDIR` (printed). Both tools have the base image in their storage before
//! the cold build (not timed; its size is counted); a cold build starts from an empty step
//! cache. Targets: mistryd's cold time ≤ buildah's, its store ≤ 1.2× buildah's storage.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{median, run, timed};

/// Disk usage of `dir` in bytes (hard links once). Rootless, the trees hold files of
/// subordinate ids this user cannot read: measured inside `buildah unshare` (the same id
/// mapping mistryd's sandboxes use).
fn disk_usage(dir: &Path) -> u64 {
    let own = tempfile::tempdir().expect("a directory for buildah's own paths");
    let mut cmd = if nix::unistd::geteuid().is_root() {
        Command::new("du")
    } else {
        let mut c = common::containers_tool("buildah", own.path());
        c.args(["unshare", "du"]);
        c
    };
    let out = cmd.args(["-s", "-B1"]).arg(dir).output().expect("du");
    assert!(
        out.status.success(),
        "du {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du's output")
}

const DOCKERFILE: &str = "FROM debian
RUN apt-get update && apt-get install -y --no-install-recommends jq && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY package.json app.js ./
RUN node app.js > /app/out.txt && jq -e .name package.json
";

fn context(dir: &Path, from: &str) -> PathBuf {
    let ctx = dir.join(format!("ctx-{}", from.replace(['/', ':'], "_")));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        DOCKERFILE.replace("FROM debian", &format!("FROM {from}")),
    )
    .unwrap();
    std::fs::write(
        ctx.join("package.json"),
        "{\"name\": \"bench\", \"version\": \"1.0.0\"}\n",
    )
    .unwrap();
    std::fs::write(
        ctx.join("app.js"),
        "console.log('built with', process.version);\n",
    )
    .unwrap();
    ctx
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() {
    let images = common::images_dir();
    let debian = images.join("debian");
    if !debian.join("index.json").is_file() {
        eprintln!(
            "debian_build: no Debian base image at {}: build it with `images/recipes/debian.sh {}` \
             (as root, with debootstrap and the network), or point MISTRY_TEST_IMAGES at a \
             directory holding one",
            debian.display(),
            debian.display()
        );
        std::process::exit(1);
    }
    if !common::installed("buildah") {
        eprintln!("debian_build: needs buildah (apt-get install buildah) to compare with");
        std::process::exit(1);
    }
    let runs: usize = common::env_num("BENCH_RUNS", 3).max(1);
    let mistryd = common::mistryd_bin();
    let mistryd = mistryd.as_str();
    let work = tempfile::tempdir().unwrap();
    let ctx = context(work.path(), "debian");
    let base_only = work.path().join("base");
    std::fs::create_dir_all(&base_only).unwrap();
    std::fs::write(base_only.join("Dockerfile"), "FROM debian\n").unwrap();
    let bctx = context(work.path(), "localhost/debian");

    let build = |store: &Path, ctx: &Path| {
        let mut c = Command::new(mistryd);
        c.args(["image", "build", "--store"])
            .arg(store)
            .arg("--images")
            .arg(&images)
            .arg(ctx)
            .env("NO_COLOR", "1")
            .env_remove("MISTRY_LOG");
        c
    };
    let (mut cold, mut size, mut bcold, mut bsize) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut backend = String::new();
    for i in 0..runs {
        // mistryd: the base in the store first (not timed), then the project, cold.
        let store = work.path().join(format!("store-{i}"));
        let stderr = run(&mut build(&store, &base_only));
        if let Some(line) = stderr.lines().find(|l| l.contains("storage backend")) {
            backend = line
                .split_once("storage backend ")
                .map(|(_, r)| r.split(" store=").next().unwrap_or(r).to_string())
                .unwrap_or_default();
        }
        cold.push(timed(&mut build(&store, &ctx)).0);
        size.push(disk_usage(&store));

        // buildah: the base pulled into its storage first (not timed), then `bud --layers`.
        let root = work.path().join(format!("buildah-{i}"));
        let b = || {
            let mut c = common::containers_tool("buildah", &root);
            c.arg("--root")
                .arg(root.join("root"))
                .arg("--runroot")
                .arg(root.join("run"))
                .args(["--storage-driver", "overlay"]);
            c
        };
        let out = b()
            .args(["pull", "-q"])
            .arg(format!("oci:{}:latest", debian.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        run(b().args(["tag", &id, "localhost/debian:latest"]));
        let mut bud = b();
        bud.args([
            "bud",
            "--layers",
            "-q",
            "--isolation",
            "chroot",
            "--network",
            "host",
            "-t",
            "bench",
        ])
        .arg(&bctx);
        bcold.push(timed(&mut bud).0);
        bsize.push(disk_usage(&root.join("root")));
        let _ = b().args(["rmi", "--all", "--force"]).output();
        // The trees hold subordinate ids' files: removed in their user namespace.
        if !nix::unistd::geteuid().is_root() {
            let _ = common::containers_tool("buildah", work.path())
                .args(["unshare", "rm", "-rf"])
                .arg(&root)
                .arg(&store)
                .output();
        }
    }

    let (c, s) = (median(&mut cold), median(&mut size));
    let (bc, bs) = (median(&mut bcold), median(&mut bsize));
    println!(
        "cold build of a Debian project (FROM debian, apt-get install jq, COPY, RUN node): \
         median of {runs}, {}",
        if nix::unistd::geteuid().is_root() {
            "as root"
        } else {
            "rootless"
        }
    );
    println!("mistryd's backend: {backend}");
    println!("{:<28} {:>10} {:>12}", "", "cold", "storage");
    println!(
        "{:<28} {:>9.1}s {:>8.0} MiB",
        "mistryd image build",
        c.as_secs_f64(),
        mib(s)
    );
    println!(
        "{:<28} {:>9.1}s {:>8.0} MiB",
        "buildah bud --layers",
        bc.as_secs_f64(),
        mib(bs)
    );
    println!(
        "mistryd/buildah: time {:.2}x (target <= 1), storage {:.2}x (target <= 1.2)",
        c.as_secs_f64() / bc.as_secs_f64(),
        s as f64 / bs as f64
    );
}
