//! Image builds: a small Dockerfile (FROM the busybox base, COPY a script, RUN chmod, WORKDIR,
//! ENTRYPOINT) built cold and then unchanged, side by side in one run with
//! `buildah bud --layers` (overlay storage, chroot isolation) where buildah is installed.
//!
//! `cargo bench --bench image_build` (`BENCH_RUNS` sets the number of cold runs; unchanged
//! rebuilds run 3× as often). Both tools have the base image in their storage before a cold
//! build (not timed); a cold build starts from an empty step cache. Each tool runs as a command,
//! as a user would run it, mistryd with its default backend (overlay on ext4). Targets: unchanged rebuild ≤ 3 ms; cold build ≥ 5× faster than
//! buildah's.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{median, ms, run, timed};

const DOCKERFILE: &str = "FROM busybox\nCOPY run.sh /usr/local/bin/run.sh\nRUN chmod +x /usr/local/bin/run.sh\nWORKDIR /work\nENTRYPOINT [\"/usr/local/bin/run.sh\"]\n";

fn context(dir: &Path, from: &str) -> PathBuf {
    let ctx = dir.join(format!("ctx-{}", from.replace(['/', ':'], "_")));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        DOCKERFILE.replace("FROM busybox", &format!("FROM {from}")),
    )
    .unwrap();
    std::fs::write(ctx.join("run.sh"), "#!/bin/sh\necho hello\n").unwrap();
    ctx
}

fn main() {
    let images = common::busybox_images();
    let runs: usize = common::env_num("BENCH_RUNS", 7);
    let mistryd = common::mistryd_bin();
    let mistryd = mistryd.as_str();
    let work = tempfile::tempdir().unwrap();
    let ctx = context(work.path(), "busybox");
    let base_only = work.path().join("base");
    std::fs::create_dir_all(&base_only).unwrap();
    std::fs::write(base_only.join("Dockerfile"), "FROM busybox\n").unwrap();

    let build = |store: &Path, ctx: &Path| {
        let mut c = Command::new(mistryd);
        // The backend a user gets: the store's default (overlay on ext4, btrfs on btrfs).
        c.args(["image", "build", "--store"])
            .arg(store)
            .arg("--images")
            .arg(&images)
            .arg(ctx);
        c
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let store = work.path().join(format!("store-{i}"));
        run(&mut build(&store, &base_only));
        cold.push(timed(&mut build(&store, &ctx)).0);
        for _ in 0..3 {
            warm.push(timed(&mut build(&store, &ctx)).0);
        }
    }

    let buildah = common::installed("buildah");
    let (mut bcold, mut bwarm) = (Vec::new(), Vec::new());
    if buildah {
        let bctx = context(work.path(), "localhost/busybox");
        for i in 0..runs {
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
                .arg(format!("oci:{}:latest", images.join("busybox").display()))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
            run(b().args(["tag", &id, "localhost/busybox:latest"]));
            let bud = || {
                let mut c = b();
                c.args([
                    "bud",
                    "--layers",
                    "-q",
                    "--isolation",
                    "chroot",
                    "-t",
                    "bench",
                ])
                .arg(&bctx);
                c
            };
            bcold.push(timed(&mut bud()).0);
            for _ in 0..3 {
                bwarm.push(timed(&mut bud()).0);
            }
            let _ = b().args(["rmi", "--all", "--force"]).output();
        }
    }

    println!("image build: FROM busybox, COPY, RUN chmod, WORKDIR, ENTRYPOINT ({runs} cold runs, {} unchanged)", warm.len());
    println!("{:<28} {:>12} {:>14}", "", "cold median", "unchanged med.");
    println!(
        "{:<28} {:>10.1}ms {:>12.1}ms",
        "mistryd image build",
        ms(median(&mut cold)),
        ms(median(&mut warm))
    );
    if buildah {
        println!(
            "{:<28} {:>10.1}ms {:>12.1}ms",
            "buildah bud --layers",
            ms(median(&mut bcold)),
            ms(median(&mut bwarm))
        );
        println!(
            "buildah/mistryd: cold {:.1}x, unchanged {:.1}x; targets: unchanged <= 3 ms, cold >= 5x",
            ms(median(&mut bcold)) / ms(median(&mut cold)),
            ms(median(&mut bwarm)) / ms(median(&mut warm)),
        );
    } else {
        println!("buildah not installed (apt-get install buildah): no comparison");
    }
}
