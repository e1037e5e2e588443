//! Building Dockerfiles into the layer store, end to end: the real helper (`mistryd internal`)
//! in the sandbox's user namespace, the busybox base image from `images/recipes/busybox.sh`.
//!
//! Every test runs on the plain and overlay backends, and on btrfs when `MISTRY_TEST_BTRFS` names
//! a directory on a btrfs filesystem (scripts/setup.sh loop-mounts one; under `CI` it must).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

mod common;

use common::build_env::{self, Env};

use common::{helper, images_dir, serve};
use images::{BackendKind, BuildOptions, BuildStats, Builder, Image, LocalImages, Store};
use sandbox::ExitStatus;

fn env_for(kind: BackendKind, parent: Option<&Path>) -> Env {
    build_env::env_for("mistry-build", kind, parent)
}

fn each_backend(f: impl Fn(&Env)) {
    build_env::each_backend("mistry-build", f);
}

impl Env {
    fn build(&self, ctx: &Path) -> (Image, BuildStats, String) {
        self.build_with(ctx, |_| {})
            .unwrap_or_else(|(e, log)| panic!("build failed: {e}\n{log}"))
    }

    /// Run a shell script in a copy of the image, as the image's user and workdir.
    fn sh(&self, image: &Image, script: &str) -> (ExitStatus, String, String) {
        let out = self.run(image, script, true);
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn tar_gz(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

#[test]
fn every_instruction() {
    let url = serve(b"downloaded content\n");
    each_backend(|env| {
        let archive = tar_gz(&[("a/inside.txt", "from the archive\n")]);
        let ctx = env.project(
            "every",
            &[
                (
                    "Dockerfile",
                    &format!(
                        r#"# syntax=docker/dockerfile:1
ARG BASE=busybox
FROM ${{BASE}} AS base
ARG VERSION=1.0
ARG FROM_CLI
ENV APP_HOME=/srv/app LEGACY_FORM_NOT_USED=1
ENV PLAIN value with spaces
LABEL org.example.version=$VERSION "two words"="yes"
WORKDIR $APP_HOME
COPY --chown=builder:builder files/ ./files/
COPY --chmod=750 *.sh /usr/local/bin/
ADD archive.tar.gz /opt/
ADD --chmod=644 {url}/remote.txt /opt/remote.txt
RUN ["/bin/sh", "-c", "echo exec-form > /srv/app/exec.txt"]
RUN echo "$VERSION $FROM_CLI $PLAIN" > /srv/app/args.txt
SHELL ["/bin/sh", "-e", "-c"]
RUN echo shell-form > shell.txt
USER builder
RUN id -un > /home/builder/whoami
EXPOSE 8080 53/udp
VOLUME ["/data"]
STOPSIGNAL SIGQUIT
HEALTHCHECK --interval=5s CMD true
ONBUILD RUN echo triggered > /tmp/onbuild
ENTRYPOINT ["/usr/local/bin/start.sh"]
CMD ["--serve"]
"#
                    ),
                ),
                ("files/one.txt", "one\n"),
                ("files/sub/two.txt", "two\n"),
                ("start.sh", "#!/bin/sh\necho started \"$@\"\n"),
            ],
        );
        std::fs::write(ctx.join("archive.tar.gz"), &archive).unwrap();
        let (image, stats, log) = env
            .build_with(&ctx, |o| {
                o.build_args = vec![("FROM_CLI".into(), "cli".into())];
            })
            .unwrap_or_else(|(e, log)| panic!("{e}\n{log}"));
        assert_eq!(stats.executed_runs, 4, "{log}");
        let c = &image.config;
        assert_eq!(c.workdir, "/srv/app");
        assert_eq!(c.user, "builder");
        assert!(c.env.contains(&"APP_HOME=/srv/app".to_string()));
        assert!(c.env.contains(&"PLAIN=value with spaces".to_string()));
        assert_eq!(
            c.labels.get("org.example.version").map(String::as_str),
            Some("1.0")
        );
        assert_eq!(c.labels.get("two words").map(String::as_str), Some("yes"));
        assert_eq!(c.exposed_ports, ["8080/tcp", "53/udp"]);
        assert_eq!(c.volumes, ["/data"]);
        assert_eq!(c.stop_signal.as_deref(), Some("SIGQUIT"));
        assert_eq!(
            c.healthcheck.as_ref().unwrap()["Test"],
            serde_json::json!(["CMD-SHELL", "true"])
        );
        assert_eq!(c.onbuild, ["RUN echo triggered > /tmp/onbuild"]);
        assert_eq!(c.shell, ["/bin/sh", "-e", "-c"]);
        assert_eq!(c.command(), ["/usr/local/bin/start.sh", "--serve"]);

        let (status, out, err) = env.sh(
            &image,
            "cat files/one.txt files/sub/two.txt exec.txt args.txt shell.txt /home/builder/whoami \
             /opt/a/inside.txt /opt/remote.txt; stat -c '%U %a' files/one.txt /usr/local/bin/start.sh /opt/remote.txt; \
             ls /tmp; pwd; id -un",
        );
        assert_eq!(status, ExitStatus::Exited(0), "{err}");
        assert_eq!(
            out,
            "one\ntwo\nexec-form\n1.0 cli value with spaces\nshell-form\nbuilder\nfrom the archive\n\
             downloaded content\nbuilder 644\nroot 750\nroot 644\n/srv/app\nbuilder\n"
        );
        // ONBUILD runs in an image built FROM this one (here: a later stage).
        let child = env.project(
            "child",
            &[("Dockerfile", "FROM busybox AS parent\nONBUILD RUN echo triggered > /onbuild.txt\nFROM parent\nRUN cat /onbuild.txt\n")],
        );
        let (child_image, _, log) = env.build(&child);
        assert!(
            log.contains("Running ONBUILD trigger: RUN echo triggered > /onbuild.txt"),
            "{log}"
        );
        assert_eq!(env.sh(&child_image, "cat /onbuild.txt").1, "triggered\n");
    });
}

#[test]
fn cache_hits_and_invalidation() {
    each_backend(|env| {
        let ctx = env.project(
            "cache",
            &[
                (
                    "Dockerfile",
                    "FROM busybox\nRUN cat /proc/sys/kernel/random/uuid > /first\nCOPY a.txt /a.txt\nRUN cat /proc/sys/kernel/random/uuid > /second\nCOPY b.txt /b.txt\n",
                ),
                ("a.txt", "a1"),
                ("b.txt", "b1"),
            ],
        );
        let (first, stats, _) = env.build(&ctx);
        assert_eq!((stats.executed_runs, stats.cached), (2, 0));
        let stamps = |img: &Image| env.sh(img, "cat /first /second /a.txt /b.txt").1;
        let before = stamps(&first);

        // Unchanged: nothing runs, same image.
        let (again, stats, log) = env.build(&ctx);
        assert_eq!(stats.executed_runs, 0, "{log}");
        assert_eq!(stats.cached, 4);
        assert_eq!(again.key, first.key);
        assert_eq!(stamps(&again), before);

        // Changing the first COPY source re-runs from that step on.
        std::fs::write(ctx.join("a.txt"), "a2").unwrap();
        let (changed, stats, _) = env.build(&ctx);
        assert_eq!(stats.executed_runs, 1);
        assert_eq!(stats.cached, 1);
        let after = stamps(&changed);
        assert_eq!(
            after.lines().next(),
            before.lines().next(),
            "the first RUN was cached"
        );
        assert_ne!(
            after.lines().nth(1),
            before.lines().nth(1),
            "the second RUN re-ran"
        );
        assert!(after.ends_with("a2b1"));

        // Changing only the last COPY source re-runs nothing.
        std::fs::write(ctx.join("b.txt"), "b2").unwrap();
        let (_, stats, _) = env.build(&ctx);
        assert_eq!(stats.executed_runs, 0);

        // A build arg used by RUN changes its key; rebuild bypasses the cache.
        let (_, stats, _) = env
            .build_with(&ctx, |o| o.no_cache = true)
            .unwrap_or_else(|(e, l)| panic!("{e}\n{l}"));
        assert_eq!((stats.executed_runs, stats.cached), (2, 0));
        assert!(env.tmp_is_empty());
    });
}

#[test]
fn dockerignore_is_honoured() {
    each_backend(|env| {
        let ctx = env.project(
            "ignore",
            &[
                ("Dockerfile", "FROM busybox\nCOPY . /ctx/\n"),
                (".dockerignore", "*.log\nnode_modules\n!keep.log\n"),
                ("app.js", "app"),
                ("debug.log", "noise"),
                ("keep.log", "kept"),
                ("node_modules/dep/index.js", "dep"),
            ],
        );
        let (image, _, _) = env.build(&ctx);
        let (_, out, _) = env.sh(&image, "cd /ctx && find . -type f | sort");
        assert_eq!(out, "./.dockerignore\n./Dockerfile\n./app.js\n./keep.log\n");
        // An ignored file changing does not invalidate the cache.
        std::fs::write(ctx.join("debug.log"), "more noise").unwrap();
        let (again, stats, _) = env.build(&ctx);
        assert_eq!(again.key, image.key);
        assert_eq!(stats.cached, 1);
    });
}

#[test]
fn multi_stage_copy_from() {
    each_backend(|env| {
        let ctx = env.project(
            "multi",
            &[(
                "Dockerfile",
                "FROM busybox AS build\nRUN mkdir -p /out && echo artifact > /out/app && echo junk > /junk\n\
                 FROM scratch AS empty\n\
                 FROM busybox\nCOPY --from=build /out/app /app\nCOPY --from=0 /out/ /from-index/\n",
            )],
        );
        let (image, _, log) = env.build(&ctx);
        let (status, out, err) = env.sh(&image, "cat /app /from-index/app; ls /junk 2>&1 || true");
        assert_eq!(status, ExitStatus::Exited(0), "{err}\n{log}");
        assert_eq!(
            out,
            "artifact\nartifact\nls: /junk: No such file or directory\n"
        );
    });
}

/// An unchanged rebuild of a multi-stage Dockerfile answers every `COPY --from` from the step
/// cache without copying the stage out of its layers (on the overlay store a copy of a whole
/// Debian stage took 30-70 s per step, cached or not); a step that runs reads its sources from
/// a read-only mount of the stage's layers and copies no stage either (a cold build copied the
/// whole stage once per `COPY --from`).
#[test]
fn unchanged_copy_from_copies_no_stage() {
    each_backend(|env| {
        let ctx = env.project(
            "copyfrom",
            &[
                (
                    "Dockerfile",
                    "FROM busybox AS build\nWORKDIR /src\nCOPY app.txt .\n\
                     RUN mkdir -p /out && cp app.txt /out/app\n\
                     FROM busybox\nCOPY --from=build /out/app /app\nCOPY --from=build /src/ /src/\n\
                     CMD [\"cat\", \"/app\"]\n",
                ),
                ("app.txt", "v1\n"),
            ],
        );
        let (first, stats, log) = env.build(&ctx);
        assert_eq!(
            (stats.steps, stats.cached, stats.built, stats.stage_copies),
            (8, 0, 5, 0),
            "{log}"
        );
        let (again, stats, log) = env.build(&ctx);
        assert_eq!(again.key, first.key);
        assert_eq!(
            (
                stats.cached,
                stats.built,
                stats.stage_copies,
                stats.executed_runs
            ),
            (5, 0, 0, 0),
            "{log}"
        );
        assert!(
            log.contains("8 steps: 5 filesystem steps, 5 from the cache, 0 built\n"),
            "{log}"
        );
        // A changed source re-runs the stage and both copies from it, which see the new files.
        std::fs::write(ctx.join("app.txt"), "v2\n").unwrap();
        let (changed, stats, log) = env.build(&ctx);
        assert_eq!(
            (stats.cached, stats.built, stats.stage_copies),
            (1, 4, 0),
            "{log}"
        );
        assert_eq!(env.sh(&changed, "cat /app /src/app.txt").1, "v2\nv2\n");
        assert!(env.tmp_is_empty());
    });
}

#[test]
fn deleted_files_stay_deleted() {
    each_backend(|env| {
        let ctx = env.project(
            "whiteout",
            &[(
                "Dockerfile",
                "FROM busybox\nRUN rm /etc/hostname && rm -r /home/builder\n",
            )],
        );
        let (image, _, _) = env.build(&ctx);
        let view = env.builder.view(&image).unwrap();
        assert_eq!(view.lookup(Path::new("/etc/hostname")), None);
        assert_eq!(view.lookup(Path::new("/home/builder")), None);
        assert_eq!(view.lookup(Path::new("/home/builder/.profile")), None);
        assert!(view.lookup(Path::new("/etc/passwd")).is_some());
        assert_eq!(
            env.sh(&image, "ls /etc/hostname /home/builder 2>&1 | wc -l")
                .1,
            "2\n"
        );
        // An exported image (one flattened layer) has them gone too, and builds FROM it.
        let out = env.root.join("exported");
        env.builder.export(&image, &out, "v1").unwrap();
        let images = env.root.join("imgs");
        std::fs::create_dir_all(&images).unwrap();
        std::os::unix::fs::symlink(&out, images.join("exported")).unwrap();
        let store2 =
            Store::open(&env.root.join("store2"), Some(BackendKind::Plain), helper()).unwrap();
        let b2 = Builder::new(store2, vec![Box::new(LocalImages { dir: images })]);
        let ctx2 = env.project(
            "reimport",
            &[(
                "Dockerfile",
                "FROM exported:v1\nRUN test ! -e /etc/hostname && test -e /etc/passwd\n",
            )],
        );
        let mut log = Vec::new();
        b2.build(&BuildOptions::new("reimport", &ctx2), &mut log)
            .unwrap_or_else(|e| panic!("{e}\n{}", String::from_utf8_lossy(&log)));
        if std::process::Command::new("skopeo")
            .arg("--version")
            .output()
            .is_ok()
        {
            let inspect = common::containers_tool("skopeo", &env.root)
                .arg("inspect")
                .arg(format!("oci:{}:v1", out.display()))
                .output()
                .unwrap();
            assert!(
                inspect.status.success(),
                "{}",
                String::from_utf8_lossy(&inspect.stderr)
            );
        }
    });
}

#[test]
fn broken_dockerfiles_and_failing_runs() {
    each_backend(|env| {
        let ctx = env.project(
            "bad",
            &[("Dockerfile", "FROM busybox\nRUN true\nINVALIDCOMMAND foo\n")],
        );
        let (e, _) = env.build_with(&ctx, |_| {}).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Dockerfile line 3: unknown instruction: INVALIDCOMMAND"
        );

        let ctx = env.project(
            "failing",
            &[("Dockerfile", "FROM busybox\nRUN echo about to fail; echo on stderr >&2; exit 3\nRUN echo never\n")],
        );
        let (e, log) = env.build_with(&ctx, |_| {}).unwrap_err();
        assert_eq!(
            e.to_string(),
            "The command '/bin/sh -c echo about to fail; echo on stderr >&2; exit 3' returned a non-zero code: 3"
        );
        assert!(log.contains("about to fail\non stderr\n"), "{log}");
        assert!(!log.contains("never"));
        assert!(env.tmp_is_empty(), "a failed step left its snapshot behind");

        let ctx = env.project("nobase", &[("Dockerfile", "FROM no-such-image:1\n")]);
        let (e, _) = env.build_with(&ctx, |_| {}).unwrap_err();
        assert_eq!(
            e.to_string(),
            "base image no-such-image:1: not found in the local images directory or any configured registry"
        );
        let ctx = env.project("missing", &[("Dockerfile", "FROM busybox\nCOPY nope /x\n")]);
        let (e, _) = env.build_with(&ctx, |_| {}).unwrap_err();
        assert_eq!(
            e.to_string(),
            "step COPY nope /x (line 2): COPY source \"nope\": not found in the build context"
        );
    });
}

fn layout_with_layer(dir: &Path, layer: &[u8]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let d = images::sha256_digest(data);
        std::fs::write(blobs.join(&d[7..]), data).unwrap();
        (d, data.len())
    };
    let (ld, ls) = put(layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{ld}"]}}}}"#
    );
    let (cd, cs) = put(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{cs}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{ls}}}]}}"#
    );
    let (md, ms) = put(manifest.as_bytes());
    std::fs::write(
        dir.join("index.json"),
        format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{md}","size":{ms}}}]}}"#),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

#[test]
fn layer_owners_are_kept_and_hostile_layers_refused() {
    each_backend(|env| {
        let images = env.root.join("images");
        // A layer with a file owned by 1000:1000 and a setuid file.
        let mut b = tar::Builder::new(Vec::new());
        for (path, uid, mode) in [
            ("owned/by-builder", 1000u64, 0o640u32),
            ("owned/suid", 0, 0o4755),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_uid(uid);
            h.set_gid(uid);
            h.set_mode(mode);
            h.set_size(1);
            h.set_mtime(1_500_000_000);
            b.append_data(&mut h, path, &b"x"[..]).unwrap();
        }
        let owned = b.into_inner().unwrap();
        layout_with_layer(&images.join("owned"), &owned);
        // A layer whose entry climbs out of the root.
        let mut evil = Vec::new();
        let mut h = tar::Header::new_old();
        let name = b"../../../../tmp/mistry-escaped";
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        evil.extend_from_slice(h.as_bytes());
        evil.extend_from_slice(&[0u8; 1024]);
        layout_with_layer(&images.join("evil"), &evil);

        let store = Store::open(
            &env.root.join("store-owners"),
            Some(env.builder.store.backend()),
            helper(),
        )
        .unwrap();
        let b = Builder::new(
            store,
            vec![Box::new(LocalImages {
                dir: images.clone(),
            })],
        );
        let ctx = env.project("owners", &[("Dockerfile", "FROM owned\n")]);
        let mut log = Vec::new();
        let (image, _) = b
            .build(&BuildOptions::new("owners", &ctx), &mut log)
            .unwrap();
        let view = b.view(&image).unwrap();
        let copy = env.root.join("owners-run");
        let target = b
            .store
            .job_target(image.snapshot.as_deref(), &copy, true)
            .unwrap();
        let busybox = images_dir().join("busybox/rootfs/bin/busybox");
        let out = target
            .sandbox()
            .bind(sandbox::Bind::new(&busybox, "/bin/busybox").read_only())
            .command([
                "/bin/busybox",
                "stat",
                "-c",
                "%u:%g %a",
                "/owned/by-builder",
                "/owned/suid",
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "1000:1000 640\n0:0 4755\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // On the host, the file belongs to the sandbox's mapped id of 1000.
        let host_uid = std::fs::metadata(view.lookup(Path::new("/owned/by-builder")).unwrap())
            .unwrap()
            .uid();
        let me = nix::unistd::geteuid().as_raw();
        assert_ne!(host_uid, me);
        b.store.remove_tree(&copy).unwrap();

        let ctx = env.project("evil", &[("Dockerfile", "FROM evil\n")]);
        let e = b
            .build(&BuildOptions::new("evil", &ctx), &mut log)
            .unwrap_err();
        assert!(
            e.to_string().contains("escapes the image root with .."),
            "{e}"
        );
        assert!(e.to_string().contains("layer sha256:"), "{e}");
        assert!(!Path::new("/tmp/mistry-escaped").exists());
        assert_eq!(
            std::fs::read_dir(b.store.root.join("tmp")).unwrap().count(),
            0
        );
    });
}

#[test]
fn garbage_collection_keeps_current_images() {
    each_backend(|env| {
        let ctx = env.project("gc", &[("Dockerfile", "FROM busybox\nRUN echo 1 > /v\n")]);
        let (old, _, _) = env.build(&ctx);
        std::fs::write(ctx.join("Dockerfile"), "FROM busybox\nRUN echo 2 > /v\n").unwrap();
        let (new, _, _) = env.build(&ctx);
        let done = env.builder.store.collect_garbage().unwrap();
        assert_eq!(done.snapshots, 1, "only the old RUN snapshot goes");
        assert!(!env
            .builder
            .store
            .has_snapshot(old.snapshot.as_deref().unwrap()));
        assert!(env
            .builder
            .store
            .has_snapshot(new.snapshot.as_deref().unwrap()));
        let (again, stats, _) = env.build(&ctx);
        assert_eq!((again.key, stats.executed_runs), (new.key, 0));
    });
}

#[test]
fn different_projects_build_in_parallel() {
    each_backend(|env| {
        let a = env.project(
            "par-a",
            &[("Dockerfile", "FROM busybox\nRUN sleep 0.3; echo a > /x\n")],
        );
        let b = env.project(
            "par-b",
            &[("Dockerfile", "FROM busybox\nRUN sleep 0.3; echo b > /x\n")],
        );
        let started = std::time::Instant::now();
        std::thread::scope(|s| {
            let ta = s.spawn(|| env.build(&a));
            let tb = s.spawn(|| env.build(&b));
            let (ia, _, _) = ta.join().unwrap();
            let (ib, _, _) = tb.join().unwrap();
            assert_eq!(env.sh(&ia, "cat /x").1, "a\n");
            assert_eq!(env.sh(&ib, "cat /x").1, "b\n");
        });
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    });
}

// ---- Issue 9: hostile Dockerfiles, contexts, stages and layers ----------------------------

/// A directory outside the store with one file in it, that no build may touch.
fn sentinel(env: &Env, name: &str) -> PathBuf {
    let dir = env.root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("keep"), "untouched").unwrap();
    dir
}

fn assert_untouched(dir: &Path) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["keep"],
        "something was written into {}",
        dir.display()
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("keep")).unwrap(),
        "untouched"
    );
}

/// `RUN` making /l1 -> l2 -> ... -> l45 -> `target` (45 links, more than the kernel follows).
fn chain_run(target: &Path) -> String {
    format!(
        "RUN i=1; while [ $i -lt 45 ]; do ln -s l$((i+1)) /l$i; i=$((i+1)); done; ln -s {} /l45",
        target.display()
    )
}

#[test]
fn symlink_chains_never_lead_writes_out_of_the_image() {
    each_backend(|env| {
        let outside = sentinel(env, "sentinel-chain");
        // The store's own snapshots are a target too (another project's base).
        let snapshots = env.builder.store.root.join("snapshots");
        for (name, target, step) in [
            ("chain-store", &snapshots, "COPY file /l1/poison"),
            ("chain-copy", &outside, "COPY file /l1/copied"),
            ("chain-copy-dir", &outside, "COPY file /l1/"),
            ("chain-add", &outside, "ADD x.tar /l1/"),
            ("chain-workdir", &outside, "WORKDIR /l1/sub"),
        ] {
            let before: Vec<_> = std::fs::read_dir(&snapshots)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            let ctx = env.project(
                name,
                &[
                    (
                        "Dockerfile",
                        &format!("FROM busybox\n{}\n{step}\n", chain_run(target)),
                    ),
                    ("file", "payload"),
                ],
            );
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(7);
            b.append_data(&mut h, "from-tar", &b"payload"[..]).unwrap();
            std::fs::write(ctx.join("x.tar"), b.into_inner().unwrap()).unwrap();
            let result = env.build_with(&ctx, |_| {});
            assert_untouched(&outside);
            assert!(
                !snapshots.join("poison").exists(),
                "{name}: wrote into the store"
            );
            // Only snapshots (the base layers, the RUN step) were added to the store.
            for e in std::fs::read_dir(&snapshots).unwrap() {
                let e = e.unwrap();
                if before.contains(&e.file_name()) {
                    continue;
                }
                let n = e.file_name().to_string_lossy().into_owned();
                assert!(
                    n.len() == 64 && n.chars().all(|c| c.is_ascii_hexdigit()),
                    "{name}: {n} written into the store"
                );
                assert!(!e.path().join("poison").exists(), "{name}");
            }
            let (e, log) = result.unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("ELOOP") && msg.contains("/l1") && msg.contains("(line 3)"),
                "{name}: {msg}\n{log}"
            );
            assert!(env.tmp_is_empty(), "{name}");
        }
        // A short chain is followed inside the image, as Docker does: the write lands in the
        // image at the link's target, never on the host.
        let ctx = env.project(
            "short-chain",
            &[
                (
                    "Dockerfile",
                    &format!(
                        "FROM busybox\nRUN ln -s {} /short\nCOPY file /short/copied\nWORKDIR /short/wd\n",
                        outside.display()
                    ),
                ),
                ("file", "payload"),
            ],
        );
        let (image, _, _) = env.build(&ctx);
        assert_untouched(&outside);
        let (status, out, err) = env.sh(
            &image,
            &format!(
                "cat {0}/copied; test -d {0}/wd && echo dir",
                outside.display()
            ),
        );
        assert_eq!(status, ExitStatus::Exited(0), "{err}");
        assert_eq!(out, "payloaddir\n");
    });
}

/// A raw tar entry (any name, unchecked), as a hostile layer carries.
fn raw_tar_entry(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(data.len() as u64);
    h.set_entry_type(kind);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

#[test]
fn hostile_base_layers_stay_inside_the_image() {
    each_backend(|env| {
        let outside = sentinel(env, "sentinel-layer");
        let images = env.root.join("hostile-images");
        let mut chain = Vec::new();
        for i in 1..45 {
            raw_tar_entry(
                &mut chain,
                &format!("l{i}"),
                tar::EntryType::Symlink,
                &format!("l{}", i + 1),
                b"",
            );
        }
        let out_s = outside.display().to_string();
        raw_tar_entry(&mut chain, "l45", tar::EntryType::Symlink, &out_s, b"");
        let mut evil = chain.clone();
        raw_tar_entry(&mut evil, "l1/evil", tar::EntryType::Regular, "", b"pwned");
        evil.extend_from_slice(&[0u8; 1024]);
        layout_with_layer(&images.join("chain-file"), &evil);
        // A hard link whose target is reached through the chain, and a whiteout through it.
        let mut hard = chain.clone();
        raw_tar_entry(&mut hard, "stolen", tar::EntryType::Link, "l1/keep", b"");
        hard.extend_from_slice(&[0u8; 1024]);
        layout_with_layer(&images.join("chain-hardlink"), &hard);
        let mut wh = chain.clone();
        raw_tar_entry(&mut wh, "l1/.wh.keep", tar::EntryType::Regular, "", b"");
        raw_tar_entry(&mut wh, "l1/.wh..wh..opq", tar::EntryType::Regular, "", b"");
        wh.extend_from_slice(&[0u8; 1024]);
        layout_with_layer(&images.join("chain-whiteout"), &wh);

        let store = Store::open(
            &env.root.join("store-hostile"),
            Some(env.builder.store.backend()),
            helper(),
        )
        .unwrap();
        let b = Builder::new(store, vec![Box::new(LocalImages { dir: images })]);
        for (name, expect) in [
            ("chain-file", "ELOOP"),
            ("chain-hardlink", "ELOOP"),
            ("chain-whiteout", "ELOOP"),
        ] {
            let ctx = env.project(name, &[("Dockerfile", &format!("FROM {name}\n"))]);
            let mut log = Vec::new();
            let e = b
                .build(&BuildOptions::new(name, &ctx), &mut log)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(expect) && e.contains("layer sha256:"),
                "{name}: {e}"
            );
            assert_untouched(&outside);
        }
        assert_eq!(
            std::fs::read_dir(b.store.root.join("tmp")).unwrap().count(),
            0
        );
    });
}

#[test]
fn copy_sources_resolve_inside_the_context_and_the_stage() {
    each_backend(|env| {
        let secret = env.root.join("host-secret.txt");
        std::fs::write(&secret, "host secret").unwrap();
        let rel_secret = secret.strip_prefix("/").unwrap().display().to_string();
        let ctx = env.project(
            "ctx-links",
            &[
                ("Dockerfile", "FROM busybox\n"),
                ("dir/plain", "plain"),
                // The same path inside the context: what `rootlink/...` must mean.
                (&rel_secret, "context copy"),
            ],
        );
        std::os::unix::fs::symlink("/", ctx.join("rootlink")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../../..", ctx.join("uplink")).unwrap();
        std::os::unix::fs::symlink(&secret, ctx.join("abslink")).unwrap();
        std::os::unix::fs::symlink(&secret, ctx.join("dir/inner-link")).unwrap();
        let df = |body: &str| {
            std::fs::write(ctx.join("Dockerfile"), format!("FROM busybox\n{body}\n")).unwrap();
        };

        // A link to / is the context's root; a final link is followed inside the context.
        df(&format!(
            "COPY rootlink/{rel_secret} /a\nCOPY uplink/{rel_secret} /b\nCOPY abslink /c\nCOPY dir /d/"
        ));
        let (image, _, log) = env.build(&ctx);
        let (status, out, err) = env.sh(
            &image,
            "cat /a /b /c; echo; readlink /d/inner-link; cat /d/plain",
        );
        assert_eq!(status, ExitStatus::Exited(0), "{err}\n{log}");
        assert_eq!(
            out,
            format!(
                "context copycontext copycontext copy\n{}\nplain",
                secret.display()
            )
        );
        // Without that copy in the context, the host's file is not found, never copied.
        std::fs::remove_file(ctx.join(&rel_secret)).unwrap();
        for body in [
            format!("COPY rootlink/{rel_secret} /a"),
            "COPY abslink /c".to_string(),
            format!("COPY uplink/{rel_secret} /b"),
        ] {
            df(&body);
            let (e, _) = env.build_with(&ctx, |_| {}).unwrap_err();
            assert!(
                e.to_string().contains("not found in the build context"),
                "{body}: {e}"
            );
        }

        // COPY --from resolves inside the stage's root.
        let stage = env.project(
            "stage-links",
            &[(
                "Dockerfile",
                "FROM busybox AS s\nRUN ln -s / /hostroot && mkdir -p /root && echo stage-secret > /root/secret\n\
                 FROM busybox\nCOPY --from=s /hostroot/root/secret /x\n",
            )],
        );
        let (image, _, _) = env.build(&stage);
        assert_eq!(env.sh(&image, "cat /x").1, "stage-secret\n");
        std::fs::write(
            stage.join("Dockerfile"),
            format!(
                "FROM busybox AS s\nRUN ln -s / /hostroot\nFROM busybox\nCOPY --from=s /hostroot/{rel_secret} /x\n"
            ),
        )
        .unwrap();
        let (e, _) = env.build_with(&stage, |_| {}).unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
    });
}

fn max_rss_kib() -> i64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .unwrap()
        .max_rss()
}

#[test]
fn expansion_bombs_fail_fast_naming_the_line() {
    let env = env_for(BackendKind::Plain, None);
    let mut bomb = String::from("ARG L1=xxxxxxxxxx\n");
    for i in 2..=10 {
        bomb.push_str(&format!(
            "ARG L{i}={}\n",
            format!("${{L{}}}", i - 1).repeat(10)
        ));
    }
    let started = std::time::Instant::now();
    // Inside a stage and as global ARGs (before FROM).
    for (name, text, line) in [
        (
            "bomb-stage",
            format!("FROM busybox\n{bomb}RUN echo $L10\n"),
            8,
        ),
        ("bomb-global", format!("{bomb}FROM busybox\n"), 7),
    ] {
        let ctx = env.project(name, &[("Dockerfile", &text)]);
        let (e, _) = env.build_with(&ctx, |_| {}).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("longer than 1 MiB"), "{e}");
        assert!(e.contains(&format!("(line {line})")), "{e}");
    }
    // Many words under the cap each, piling up.
    let mut pile = String::from("FROM busybox\nARG A=xxxxxxxxxx\nARG B=");
    pile.push_str(&"${A}".repeat(100_000));
    pile.push('\n');
    for i in 0..40 {
        pile.push_str(&format!("LABEL l{i}=$B\n"));
    }
    let ctx = env.project("bomb-pile", &[("Dockerfile", &pile)]);
    let (e, _) = env.build_with(&ctx, |_| {}).unwrap_err();
    assert!(e.to_string().contains("more than 16 MiB"), "{e}");
    // A Dockerfile over 1 MiB is refused without being read whole.
    let big = format!("FROM busybox\n# {}\n", "x".repeat(1 << 20));
    let ctx = env.project("bomb-big", &[("Dockerfile", &big)]);
    let (e, _) = env.build_with(&ctx, |_| {}).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Dockerfile line 1: the Dockerfile is larger than the limit of 1 MiB"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // Peak memory of this whole test process stays small (the bomb would take gigabytes).
    assert!(max_rss_kib() < 512 * 1024, "max rss {} KiB", max_rss_kib());
}

#[test]
fn stage_chains_and_deep_trees_are_bounded() {
    let env = env_for(BackendKind::Plain, None);
    // Each stage built on the previous one copies its (large) ENV: the copies count against
    // the substitution budget instead of multiplying in memory.
    let mut chain = String::from("FROM busybox AS s0\nARG A=xxxxxxxxxx\nENV E=");
    chain.push_str(&"${A}".repeat(90_000));
    chain.push('\n');
    for i in 1..=40 {
        chain.push_str(&format!("FROM s{} AS s{i}\n", i - 1));
    }
    let ctx = env.project("bomb-chain", &[("Dockerfile", &chain)]);
    let (e, _) = env.build_with(&ctx, |_| {}).unwrap_err();
    assert!(e.to_string().contains("more than 16 MiB"), "{e}");
    // A tree deeper than the walk allows is an error naming it, not a stack overflow.
    let deep = "FROM busybox AS deep\nRUN mkdir -p /d/$(seq -s / 1 300)\nFROM busybox\nCOPY --from=deep /d /x\n";
    let ctx = env.project("deep-tree", &[("Dockerfile", deep)]);
    let (e, _) = env.build_with(&ctx, |_| {}).unwrap_err();
    assert!(
        e.to_string().contains("more than 256 directory levels"),
        "{e}"
    );
}

/// An HTTP server on 127.0.0.1 answering every request with `respond(path)`.
fn serve_with(respond: impl Fn(&str, u16) -> Vec<u8> + Send + 'static) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
            let _ = s.write_all(&respond(&path, addr.port()));
        }
    });
    addr
}

#[test]
fn add_url_follows_the_network_policy() {
    let env = env_for(BackendKind::Plain, None);
    let addr = serve_with(|path, port| {
        match path {
        "/loop" => format!(
            "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/loop\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .into_bytes(),
        "/big" => {
            let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n".to_vec();
            r.extend(vec![b'x'; 5000]);
            r
        }
        "/big-unsized" => {
            let mut r = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
            r.extend(vec![b'x'; 5000]);
            r
        }
        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n".to_vec(),
    }
    });
    let add = |name: &str, path: &str| {
        env.project(
            name,
            &[(
                "Dockerfile",
                &format!("FROM busybox\nADD http://{addr}{path} /got\nRUN cat /got\n"),
            )],
        )
    };
    // Allowed: a small file.
    let (image, _, _) = env.build(&add("url-ok", "/ok"));
    assert_eq!(env.sh(&image, "cat /got").1, "ok\n");
    // network: none refuses the download.
    let (e, _) = env
        .build_with(&add("url-none", "/ok2"), |o| {
            o.network = sandbox::NetworkMode::None;
        })
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("downloading is not allowed with network \"none\""),
        "{e}"
    );
    // A redirect loop stops at the limit.
    let (e, _) = env
        .build_with(&add("url-loop", "/loop"), |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("more than 10 redirects"), "{e}");
    // Bodies over the limit, announced or not.
    for (name, path) in [("url-big", "/big"), ("url-big-unsized", "/big-unsized")] {
        let (e, _) = env
            .build_with(&add(name, path), |o| o.download.max_bytes = 1000)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("larger than the limit of 1000 bytes"),
            "{name}: {e}"
        );
    }
    // The daemon's own address (as listened on: exact, or every address of the port).
    for deny in [addr, format!("0.0.0.0:{}", addr.port()).parse().unwrap()] {
        let (e, _) = env
            .build_with(&add("url-deny", "/ok3"), |o| {
                o.download.deny_connect = vec![deny];
            })
            .unwrap_err();
        assert!(
            e.to_string().contains("build server's own address"),
            "{deny}: {e}"
        );
    }
    // Reached through a redirect from an allowed server: refused too.
    let redirector = serve_with(move |_, _| {
        format!(
            "HTTP/1.1 302 Found\r\nLocation: http://localhost:{}/ok4\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            addr.port()
        )
        .into_bytes()
    });
    let ctx = env.project(
        "url-redirect-deny",
        &[(
            "Dockerfile",
            &format!("FROM busybox\nADD http://{redirector}/x /got\n"),
        )],
    );
    let (e, _) = env
        .build_with(&ctx, |o| o.download.deny_connect = vec![addr])
        .unwrap_err();
    assert!(e.to_string().contains("build server's own address"), "{e}");
    assert!(env.tmp_is_empty());
}

#[test]
fn dockerfile_and_dockerignore_links_stay_in_the_context() {
    let env = env_for(BackendKind::Plain, None);
    let host_df = env.root.join("host-Dockerfile");
    std::fs::write(&host_df, "FROM busybox\nRUN echo from-the-host\n").unwrap();
    let host_ignore = env.root.join("host-ignore");
    std::fs::write(&host_ignore, "secret-line[\n").unwrap();
    let ctx = env.project("df-links", &[("file", "f")]);
    std::os::unix::fs::symlink(&host_df, ctx.join("Dockerfile")).unwrap();
    let (e, _) = env.build_with(&ctx, |_| {}).unwrap_err();
    assert!(
        e.to_string().contains("No such file or directory"),
        "the host's Dockerfile was read: {e}"
    );
    // Inside the context, the same link target is what is read.
    let inner = ctx.join(host_df.strip_prefix("/").unwrap());
    std::fs::create_dir_all(inner.parent().unwrap()).unwrap();
    std::fs::write(&inner, "FROM busybox\nCOPY . /ctx/\n").unwrap();
    std::os::unix::fs::symlink(&host_ignore, ctx.join(".dockerignore")).unwrap();
    let (image, _, log) = env.build(&ctx);
    assert!(!log.contains("secret-line"), "{log}");
    assert_eq!(env.sh(&image, "cat /ctx/file").1, "f");
}

#[test]
fn job_dirs_and_job_roots_come_from_the_store() {
    use images::CacheMode::Copy;
    use std::os::unix::fs::MetadataExt;
    each_backend(|env| {
        let store = &env.builder.store;
        let builds = env.root.join("builds/p");
        // A first job: nothing to start from.
        let first = builds.join("ready/a");
        assert!(
            !store
                .prepare_job_dir(&first, None, Copy)
                .unwrap()
                .incremental
        );
        assert_eq!(std::fs::read_dir(&first).unwrap().count(), 0);
        for d in ["cache", "artifacts", "params"] {
            std::fs::create_dir_all(first.join("data").join(d)).unwrap();
        }
        std::fs::write(first.join("data/cache/c"), "cached").unwrap();
        std::fs::write(first.join("data/params/p"), "old").unwrap();
        std::fs::write(first.join("out.log"), "log").unwrap();
        std::fs::write(first.join("build_info.json"), "{}").unwrap();
        if env.builder.store.backend() == BackendKind::Btrfs {
            // A subvolume, so that the group's next job can snapshot it.
            assert_eq!(std::fs::metadata(&first).unwrap().ino(), 256);
        }

        // The group's next job starts from its data/, without its params or files.
        let next = builds.join("pending/b");
        std::fs::create_dir_all(next.join("stale")).unwrap();
        assert!(
            store
                .prepare_job_dir(&next, Some(&first), Copy)
                .unwrap()
                .incremental
        );
        let mut names: Vec<_> = std::fs::read_dir(&next)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["data"]);
        assert_eq!(
            std::fs::read_to_string(next.join("data/cache/c")).unwrap(),
            "cached"
        );
        assert!(next.join("data/artifacts").is_dir());
        assert!(!next.join("data/params").exists());
        // The previous job is untouched.
        assert_eq!(
            std::fs::read_to_string(first.join("data/params/p")).unwrap(),
            "old"
        );
        assert!(first.join("out.log").is_file());
        // A previous job without data/ is no start.
        let empty = builds.join("ready/empty");
        std::fs::create_dir_all(&empty).unwrap();
        assert!(
            !store
                .prepare_job_dir(&next, Some(&empty), Copy)
                .unwrap()
                .incremental
        );
        assert_eq!(std::fs::read_dir(&next).unwrap().count(), 0);
        store.remove_tree(&next).unwrap();
        store.remove_tree(&first).unwrap();
        assert!(!next.exists() && !first.exists());

        // A job's root: an overlay where the backend allows one, else a snapshot or a copy;
        // what the job writes stays out of the image; dropped, it goes away.
        let ctx = env.project("jobroot", &[("Dockerfile", "FROM busybox\n")]);
        let (image, _, _) = env.build(&ctx);
        for overlay in [true, false] {
            let root = store.job_root(image.snapshot.as_deref(), overlay).unwrap();
            let expect_overlay = match store.backend() {
                BackendKind::Overlay => true,
                BackendKind::Plain => overlay,
                BackendKind::Btrfs => false,
            };
            assert_eq!(root.is_overlay(), expect_overlay, "overlay: {overlay}");
            let out = root
                .sandbox()
                .command(["/bin/sh", "-c", "echo job > /written && cat /written"])
                .output()
                .unwrap();
            assert_eq!(out.status, ExitStatus::Exited(0));
            assert_eq!(String::from_utf8_lossy(&out.stdout), "job\n");
            drop(root);
            common::wait_until("the job root is removed", || env.tmp_is_empty());
        }
        let (status, stdout, _) = env.sh(&image, "test -e /written; echo $?");
        assert_eq!((status, stdout.as_str()), (ExitStatus::Exited(0), "1\n"));
    });
}
