//! `RUN --mount` (cache, bind, tmpfs, secret) and `RUN --network`, end to end with the busybox
//! image and the real helper (`mistryd internal`), as root and as the unprivileged user.
//!
//! The cache, bind and secret tests run on the plain and overlay backends, and on btrfs when
//! `MISTRY_TEST_BTRFS` names a directory on btrfs (under `CI` it must).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

mod common;

use common::build_env::{self, Env};

use common::images_dir;
use images::{BackendKind, BuildOptions, BuildStats, Image};

fn plain() -> Env {
    env_for(BackendKind::Plain, None)
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn env_for(kind: BackendKind, parent: Option<&Path>) -> Env {
    build_env::env_for("mistry-mounts", kind, parent)
}

fn each_backend(f: impl Fn(&Env)) {
    build_env::each_backend("mistry-mounts", f);
}

impl Env {
    fn build(&self, ctx: &Path, f: impl FnOnce(&mut BuildOptions)) -> (Image, BuildStats, String) {
        self.build_with(ctx, f)
            .unwrap_or_else(|(e, log)| panic!("build failed: {e}\n{log}"))
    }

    /// Run a shell script in a copy of the image (as root); its stdout (it must succeed).
    fn sh(&self, image: &Image, script: &str) -> String {
        let out = self.run(image, script, false);
        assert!(
            out.status.success(),
            "{script}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Every readable regular file under `dir` that contains `needle`; and how many were read.
fn files_containing(dir: &Path, needle: &[u8]) -> (Vec<PathBuf>, usize) {
    let mut found = Vec::new();
    let mut read = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                if let Ok(data) = std::fs::read(e.path()) {
                    read += 1;
                    if data.windows(needle.len()).any(|w| w == needle) {
                        found.push(e.path());
                    }
                }
            }
        }
    }
    (found, read)
}

const CACHE_DOCKERFILE: &str = "FROM busybox\n\
RUN --mount=type=cache,target=/var/cache/app,sharing=locked \\\n    \
sh -c 'echo run >> /var/cache/app/log && wc -l < /var/cache/app/log > /count'\n\
RUN --mount=type=cache,id=owned,target=/home/c,uid=1000,gid=1000,mode=0700 \\\n    \
stat -c '%u:%g %a' /home/c > /owned\n";

#[test]
fn a_cache_mount_survives_rebuilds_and_stays_out_of_the_image() {
    each_backend(|env| {
        let ctx = env.project("cached", &[("Dockerfile", CACHE_DOCKERFILE)]);
        let (image, _, _) = env.build(&ctx, |_| {});
        assert_eq!(env.sh(&image, "cat /count").trim(), "1");
        assert_eq!(env.sh(&image, "cat /owned").trim(), "1000:1000 700");
        // The cache is not in the image, nor the mount points made for it.
        assert_eq!(
            env.sh(&image, "test -e /var/cache/app && echo there || echo absent; test -e /home/c && echo there || echo absent"),
            "absent\nabsent\n"
        );
        // Rebuilt without the step cache: the step runs again and finds what it left.
        let (image, stats, _) = env.build(&ctx, |o| o.no_cache = true);
        assert_eq!(stats.executed_runs, 2);
        assert_eq!(env.sh(&image, "cat /count").trim(), "2");
        // A changed step sees it too.
        std::fs::write(
            ctx.join("Dockerfile"),
            CACHE_DOCKERFILE.replace("> /count'", "> /count; true'"),
        )
        .unwrap();
        let (image, stats, _) = env.build(&ctx, |_| {});
        assert_eq!(
            stats.executed_runs, 2,
            "the changed step and the one after it"
        );
        assert_eq!(env.sh(&image, "cat /count").trim(), "3");
        // It lives in the store, per project, outside every snapshot.
        let dir = env
            .builder
            .store
            .root
            .join("cache")
            .join(hex("cached"))
            .join(hex("/var/cache/app"));
        assert_eq!(
            std::fs::read_to_string(dir.join("log")).unwrap(),
            "run\nrun\nrun\n"
        );
        let (in_snapshots, _) =
            files_containing(&env.builder.store.root.join("snapshots"), b"run\nrun\n");
        assert!(in_snapshots.is_empty(), "{in_snapshots:?}");
        assert!(env.tmp_is_empty());

        // GC keeps the caches of projects with an image, drops those of the others.
        let other = env.project(
            "gone",
            &[(
                "Dockerfile",
                "FROM busybox\nRUN --mount=type=cache,target=/c touch /c/x\n",
            )],
        );
        env.build(&other, |_| {});
        let gone = env.builder.store.root.join("cache").join(hex("gone"));
        assert!(gone.join(hex("/c")).join("x").is_file());
        std::fs::remove_file(
            env.builder
                .store
                .root
                .join("refs")
                .join(format!("{}.json", hex("gone"))),
        )
        .unwrap();
        let done = env.builder.store.collect_garbage().unwrap();
        assert_eq!(done.caches, 1);
        assert!(!gone.exists());
        assert!(dir.join("log").is_file());
    });
}

#[test]
fn private_and_shared_caches_and_read_only_ones() {
    let env = plain();
    let ctx = env.project(
        "sharing",
        &[(
            "Dockerfile",
            "FROM busybox\n\
             RUN --mount=type=cache,target=/c,id=x,sharing=private echo one > /c/f\n\
             RUN --mount=type=cache,target=/c,id=x,sharing=shared cat /c/f > /seen\n\
             RUN --mount=type=cache,target=/c,id=x,ro sh -c 'if touch /c/g 2>/dev/null; then echo rw; else echo ro; fi > /ro'\n",
        )],
    );
    let (image, _, _) = env.build(&ctx, |_| {});
    assert_eq!(env.sh(&image, "cat /seen; cat /ro"), "one\nro\n");
}

#[test]
fn bind_mounts_from_the_context_and_from_a_stage() {
    each_backend(|env| {
        let ctx = env.project(
            "binds",
            &[
                ("data/file", "hello\n"),
                (
                    "Dockerfile",
                    "FROM busybox AS build\n\
                     RUN mkdir /out && echo built > /out/artifact\n\
                     FROM busybox\n\
                     RUN --mount=type=bind,source=data,target=/mnt/ctx \\\n    \
                     sh -c 'cat /mnt/ctx/file > /from-ctx; if touch /mnt/ctx/new 2>/dev/null; then echo writable; else echo read-only; fi > /ro'\n\
                     RUN --mount=type=bind,from=build,source=/out,target=/mnt/stage cp /mnt/stage/artifact /from-stage\n\
                     RUN --mount=type=bind,from=build,target=/mnt/whole cat /mnt/whole/out/artifact > /whole\n\
                     RUN --mount=type=bind,source=data,target=/mnt/rw,rw \\\n    \
                     sh -c 'echo scribble > /mnt/rw/file && echo more > /mnt/rw/new && cat /mnt/rw/file > /rw-seen'\n\
                     RUN --mount=type=bind,source=data/file,target=/etc/one-file cat /etc/one-file > /one\n\
                     RUN --mount=type=bind,source=up,target=/mnt/up ls /mnt/up > /up\n",
                ),
            ],
        );
        // A link pointing far above the context resolves inside it: the context itself.
        std::os::unix::fs::symlink("../../../../../..", ctx.join("up")).unwrap();
        let (image, _, _) = env.build(&ctx, |_| {});
        assert_eq!(
            env.sh(
                &image,
                "cat /from-ctx /ro /from-stage /whole /rw-seen /one; test -e /mnt/ctx || echo no-stub"
            ),
            "hello\nread-only\nbuilt\nbuilt\nscribble\nhello\nno-stub\n"
        );
        let up = env.sh(&image, "cat /up");
        assert_eq!(up, "Dockerfile\ndata\nup\n");
        // Writes to the rw bind went nowhere.
        assert_eq!(
            std::fs::read_to_string(ctx.join("data/file")).unwrap(),
            "hello\n"
        );
        assert!(!ctx.join("data/new").exists());
        assert!(env.tmp_is_empty());
        // The bound content is part of the step key: a change runs the steps that bind it.
        std::fs::write(ctx.join("data/file"), "changed\n").unwrap();
        let (image, stats, _) = env.build(&ctx, |_| {});
        // The first step binding the context runs again, and every step after it.
        assert_eq!(stats.executed_runs, 6);
        assert_eq!(env.sh(&image, "cat /from-ctx"), "changed\n");
    });
}

#[test]
fn tmpfs_mounts() {
    let env = plain();
    let ctx = env.project(
        "tmpfs",
        &[(
            "Dockerfile",
            "FROM busybox\n\
             RUN --mount=type=tmpfs,target=/scratch,size=1m sh -c '\\\n  \
             grep \" /scratch \" /proc/mounts | cut -d\" \" -f3 > /fstype; echo x > /scratch/f; \\\n  \
             if dd if=/dev/zero of=/scratch/big bs=1024 count=2048 2>/dev/null; then echo fits; else echo full; fi > /size'\n",
        )],
    );
    let (image, _, _) = env.build(&ctx, |_| {});
    assert_eq!(
        env.sh(&image, "cat /fstype /size; test -e /scratch || echo gone"),
        "tmpfs\nfull\ngone\n"
    );
}

#[test]
fn secret_mounts_are_seen_by_the_step_and_stored_nowhere() {
    const SECRET: &str = "s3cr3t-value-XYZ";
    each_backend(|env| {
        let secrets = env.root.join("secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        std::fs::write(secrets.join("token"), SECRET).unwrap();
        let ctx = env.project(
            "secrets",
            &[(
                "Dockerfile",
                "FROM busybox\n\
                 RUN --mount=type=secret,id=token \\\n    \
                 sh -c 'stat -c \"%a %u\" /run/secrets/token > /mode && wc -c < /run/secrets/token > /len'\n\
                 RUN --mount=type=secret,id=token,env=TOKEN,target=/etc/tok,mode=0444,uid=1000 \\\n    \
                 sh -c 'test \"${#TOKEN}\" = 16 && echo env-ok > /env; stat -c \"%a %u\" /etc/tok > /tok'\n\
                 RUN --mount=type=secret,id=absent sh -c 'test -e /run/secrets/absent && echo there || echo skipped' > /absent\n",
            )],
        );
        let token = secrets.join("token");
        let with = |o: &mut BuildOptions| o.secrets = vec![("token".into(), token.clone())];
        let (image, _, log) = env.build(&ctx, with);
        assert_eq!(
            env.sh(&image, "cat /mode /len /env /tok /absent; test -e /run/secrets || echo no-run-secrets; test -e /etc/tok || echo no-tok"),
            "400 0\n16\nenv-ok\n444 1000\nskipped\nno-run-secrets\nno-tok\n"
        );
        assert!(!log.contains(SECRET));
        // Nowhere in the store: layers, step records, refs, tmp.
        let (found, read) = files_containing(&env.builder.store.root, SECRET.as_bytes());
        assert!(found.is_empty(), "the secret is stored in {found:?}");
        assert!(read > 10, "only {read} files read");
        assert!(env.tmp_is_empty());
        // The same value again: every step from the cache.
        let (_, stats, _) = env.build(&ctx, with);
        assert_eq!((stats.cached, stats.executed_runs), (3, 0));
        // A rotated secret rebuilds the steps that use it (and those after them); neither
        // value is stored anywhere, nor in the log.
        const ROTATED: &str = "r0tated-value-QQ";
        std::fs::write(&token, ROTATED).unwrap();
        let (image, stats, log) = env.build(&ctx, with);
        assert_eq!((stats.cached, stats.executed_runs), (0, 3));
        assert_eq!(env.sh(&image, "cat /len"), "16\n");
        assert!(!log.contains(ROTATED));
        for value in [SECRET, ROTATED] {
            let (found, _) = files_containing(&env.builder.store.root, value.as_bytes());
            assert!(found.is_empty(), "{value} is stored in {found:?}");
        }
        // Step keys hold a keyed digest of the value, with a key of the store's own (0600):
        // another store gives the same build other keys, so step keys tell nothing about the
        // value to whoever reads them.
        let key_file = env.builder.store.root.join("step-key");
        let meta = std::fs::metadata(&key_file).unwrap();
        assert_eq!(
            (meta.permissions().mode() & 0o7777, meta.len()),
            (0o600, 32)
        );
        let other = env_for(BackendKind::Plain, None);
        let other_ctx = other.project(
            "secrets",
            &[(
                "Dockerfile",
                &std::fs::read_to_string(ctx.join("Dockerfile")).unwrap(),
            )],
        );
        let (other_image, _, _) = other.build(&other_ctx, with);
        assert_ne!(other_image.key, image.key);
    });
}

/// Issue 20, a hostile cache: project A fills its own cache mount `tools` with a hostile tool,
/// then builds the very step project B uses ("the tool from the cache if there, else the good
/// one") on the same base. B's build must not take A's layer: a step with a cache mount belongs
/// to its project.
#[test]
fn a_step_with_a_cache_mount_is_never_shared_between_projects() {
    const VICTIM: &str = "FROM busybox\n\
        RUN --mount=type=cache,id=tools,target=/cache \\\n    \
        sh -c 'if [ -f /cache/tool ]; then cp /cache/tool /tool; else echo good > /tool; fi'\n";
    each_backend(|env| {
        let evil = env.project(
            "evil",
            &[(
                "Dockerfile",
                "FROM busybox\n\
                 RUN --mount=type=cache,id=tools,target=/cache sh -c 'echo hostile > /cache/tool'\n",
            )],
        );
        env.build(&evil, |_| {});
        std::fs::write(evil.join("Dockerfile"), VICTIM).unwrap();
        let (image, _, _) = env.build(&evil, |_| {});
        assert_eq!(env.sh(&image, "cat /tool"), "hostile\n");

        let victim = env.project("victim", &[("Dockerfile", VICTIM)]);
        let (image, stats, log) = env.build(&victim, |_| {});
        assert_eq!(env.sh(&image, "cat /tool"), "good\n", "{log}");
        assert_eq!((stats.cached, stats.executed_runs), (0, 1), "{log}");
        // The same project again: from the cache.
        let (again, stats, log) = env.build(&victim, |_| {});
        assert_eq!((stats.cached, stats.executed_runs), (1, 0));
        assert!(log.contains(" ---> Using cache"), "{log}");
        assert_eq!(again.key, image.key);
    });
}

/// Issue 20, a secret limited to project B: B's step derives a file from it; A, which may not
/// use the secret, writes the same RUN line. A must run the step itself (without the secret),
/// never get B's layer.
#[test]
fn a_step_with_a_secret_is_never_shared_with_a_project_without_it() {
    const SECRET: &str = "only-for-b-4711";
    const DOCKERFILE: &str = "FROM busybox\n\
        RUN --mount=type=secret,id=token \\\n    \
        sh -c 'if [ -f /run/secrets/token ]; then echo \"derived $(cat /run/secrets/token)\"; else echo none; fi > /derived'\n";
    each_backend(|env| {
        let token = env.root.join("token");
        std::fs::write(&token, SECRET).unwrap();
        // What the daemon's `secrets` setting gives each project (`projects: ["b"]`).
        let b = env.project("b", &[("Dockerfile", DOCKERFILE)]);
        let (image, _, _) = env.build(&b, |o| o.secrets = vec![("token".into(), token.clone())]);
        assert_eq!(
            env.sh(&image, "cat /derived"),
            format!("derived {SECRET}\n")
        );

        let a = env.project("a", &[("Dockerfile", DOCKERFILE)]);
        let (image, stats, log) = env.build(&a, |_| {});
        assert_eq!(env.sh(&image, "cat /derived"), "none\n", "{log}");
        assert_eq!((stats.cached, stats.executed_runs), (0, 1));
        // A project that is given the secret later rebuilds the step (the key says whether a
        // secret was there), and then has its own cache hit.
        let with = |o: &mut BuildOptions| o.secrets = vec![("token".into(), token.clone())];
        let (image, stats, _) = env.build(&a, with);
        assert_eq!(
            env.sh(&image, "cat /derived"),
            format!("derived {SECRET}\n")
        );
        assert_eq!(stats.executed_runs, 1);
        let (_, stats, _) = env.build(&a, with);
        assert_eq!((stats.cached, stats.executed_runs), (1, 0));
    });
}

/// Issue 20, a context bind: the step sees the whole context directory (its owners, times,
/// files `.dockerignore` leaves out), the key only a digest of what COPY would take. A project
/// that hides a file from the digest must not hand the step's result to another.
#[test]
fn a_step_binding_the_context_is_never_shared_between_projects() {
    const DOCKERFILE: &str =
        "FROM busybox\nRUN --mount=type=bind,target=/src sh -c 'cat /src/*.txt > /out'\n";
    let env = plain();
    let evil = env.project(
        "evil",
        &[
            ("Dockerfile", DOCKERFILE),
            ("a.txt", "good\n"),
            ("z.txt", "hostile\n"),
            (".dockerignore", ".dockerignore\nz.txt\n"),
        ],
    );
    let (image, _, _) = env.build(&evil, |_| {});
    assert_eq!(env.sh(&image, "cat /out"), "good\nhostile\n");
    let victim = env.project("victim", &[("Dockerfile", DOCKERFILE), ("a.txt", "good\n")]);
    let (image, stats, log) = env.build(&victim, |_| {});
    assert_eq!(env.sh(&image, "cat /out"), "good\n", "{log}");
    assert_eq!(stats.executed_runs, 1);
}

/// What depends only on the step's own inputs stays shared between projects: plain RUN, COPY,
/// tmpfs and stage binds. A project-private step, and everything after it, is not.
#[test]
fn steps_that_depend_only_on_their_inputs_are_shared_between_projects() {
    const SHARED: &str = "FROM busybox AS stage\n\
        RUN echo staged > /s\n\
        FROM busybox\n\
        RUN echo shared > /f\n\
        COPY same.txt /same.txt\n\
        RUN --mount=type=tmpfs,target=/t --mount=type=bind,from=stage,target=/st cat /st/s > /st-seen\n";
    let env = plain();
    let one = env.project("one", &[("Dockerfile", SHARED), ("same.txt", "x\n")]);
    let (first, stats, _) = env.build(&one, |_| {});
    assert_eq!(stats.executed_runs, 3);
    let two = env.project("two", &[("Dockerfile", SHARED), ("same.txt", "x\n")]);
    let (second, stats, log) = env.build(&two, |_| {});
    assert_eq!((stats.cached, stats.executed_runs), (4, 0), "{log}");
    assert_eq!(log.matches(" ---> Using cache").count(), 4, "{log}");
    assert_eq!(second.key, first.key);
    // A cache mount after them: the shared steps still come from the cache, the private one
    // runs, and so does the plain step after it (its parent is private).
    let private = format!(
        "{SHARED}RUN --mount=type=cache,target=/c echo private > /p\nRUN echo after > /a\n"
    );
    std::fs::write(one.join("Dockerfile"), &private).unwrap();
    std::fs::write(two.join("Dockerfile"), &private).unwrap();
    let (_, stats, _) = env.build(&one, |_| {});
    assert_eq!((stats.cached, stats.executed_runs), (4, 2));
    let (_, stats, _) = env.build(&two, |_| {});
    assert_eq!((stats.cached, stats.executed_runs), (4, 2));
}

#[test]
fn a_missing_required_secret_fails_the_step_naming_it() {
    let env = plain();
    let ctx = env.project(
        "nosecret",
        &[(
            "Dockerfile",
            "FROM busybox\nRUN --mount=type=secret,id=npm_token,required=true true\n",
        )],
    );
    let e = env.fails(&ctx, |_| {});
    assert!(e.contains("(line 2)"), "{e}");
    assert!(
        e.contains("secret \"npm_token\" is required but was not provided"),
        "{e}"
    );
}

#[test]
fn network_none_and_host_per_step() {
    let env = plain();
    let ctx = env.project(
        "net",
        &[(
            "Dockerfile",
            "FROM busybox\n\
             RUN --network=none ls /sys/class/net > /none\n\
             RUN --network=host ls /sys/class/net > /host\n\
             RUN --network=default ls /sys/class/net > /default\n",
        )],
    );
    let (image, _, _) = env.build(&ctx, |o| o.network = sandbox::NetworkMode::Host);
    let mut host: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    host.sort();
    let host = host.join("\n") + "\n";
    assert_eq!(env.sh(&image, "cat /none"), "lo\n");
    assert_eq!(env.sh(&image, "cat /host"), host);
    assert_eq!(env.sh(&image, "cat /default"), host);
    // A build without network cannot be widened by its Dockerfile.
    let e = env.fails(&ctx, |o| o.network = sandbox::NetworkMode::None);
    assert!(
        e.contains("(line 3): --network=host: this build's network is \"none\""),
        "{e}"
    );
}

#[test]
fn unknown_types_options_and_refused_flags_are_errors_naming_the_line() {
    let env = plain();
    let cases = [
        (
            "RUN --mount=type=cache,target=/x,colour=red true",
            "unknown option \"colour\" for --mount=type=cache",
        ),
        (
            "RUN --mount=type=volume,target=/x true",
            "unknown mount type \"volume\"",
        ),
        (
            "RUN --mount=type=ssh true",
            "--mount=type=ssh is not supported",
        ),
        ("RUN --security=insecure true", "--security"),
        (
            "RUN --network=bridge true",
            "--network=bridge: unknown network",
        ),
        (
            "RUN --mount=type=bind,source=missing,target=/m true",
            "--mount source",
        ),
    ];
    for (i, (run, want)) in cases.iter().enumerate() {
        let ctx = env.project(
            &format!("bad{i}"),
            &[("Dockerfile", &format!("FROM busybox\n{run}\n"))],
        );
        let e = env.fails(&ctx, |_| {});
        assert!(e.contains("line 2") && e.contains(want), "{run}: {e}");
    }
}

/// The daemon's `secrets` setting (and its `projects` limit) and `mistryd image build --secret`
/// reach RUN steps; nothing of the secret lands in the job's results.
#[test]
fn the_daemons_secrets_and_image_build_secret_reach_the_step() {
    const SECRET: &str = "daemon-secret-123";
    let outside = tempfile::tempdir().unwrap();
    let token = outside.path().join("token");
    std::fs::write(&token, SECRET).unwrap();
    std::fs::set_permissions(
        outside.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = token.to_str().unwrap();
    let s = common::server::Server::start(serde_json::json!({
        "secrets": {
            "token": path,
            "other": {"src": path, "projects": ["nobody-else"]},
        }
    }));
    let project = s.dir.path().join("projects/sec");
    std::fs::create_dir_all(&project).unwrap();
    let dockerfile = "FROM busybox\n\
         RUN --mount=type=secret,id=token,required=true sh -c 'wc -c < /run/secrets/token > /len'\n\
         RUN --mount=type=secret,id=other sh -c 'test -e /run/secrets/other && echo there || echo absent' > /other\n\
         CMD [\"/bin/sh\", \"-c\", \"cat /len /other > /data/artifacts/out\"]\n";
    std::fs::write(project.join("Dockerfile"), dockerfile).unwrap();
    let info = s.job(serde_json::json!({"project": "sec", "params": {}}));
    assert_eq!(info["ExitCode"], 0, "{info}");
    let out = common::server::artifacts(&info).join("out");
    assert_eq!(std::fs::read_to_string(out).unwrap(), "17\nabsent\n");
    assert!(!info.to_string().contains(SECRET));

    // The one-shot builder takes `--secret id=ID,src=FILE`; a required secret it lacks fails
    // the build naming it.
    let store = outside.path().join("store");
    let build = |extra: &[&str]| {
        std::process::Command::new(common::mistryd_bin())
            .args(["image", "build", "--store"])
            .arg(&store)
            .arg("--images")
            .arg(images_dir())
            .args(extra)
            .arg(&project)
            .output()
            .unwrap()
    };
    let o = build(&["--secret", &format!("id=token,src={path}")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = build(&["--no-cache"]);
    assert!(!o.status.success());
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(err.contains("token"), "{err}");
}

/// `from=` (and `source=`) seed a new cache from a stage, as BuildKit does; the seed is a copy:
/// what the step writes stays in the cache, not in the stage.
#[test]
fn a_cache_seeded_from_a_stage() {
    each_backend(|env| {
        let ctx = env.project(
            "seeded",
            &[(
                "Dockerfile",
                "FROM busybox AS seed\n\
                 RUN mkdir -p /seed/sub && echo seeded > /seed/sub/f\n\
                 FROM busybox\n\
                 RUN --mount=type=cache,target=/c,id=s,from=seed,source=/seed \\\n    \
                 sh -c 'cat /c/sub/f > /out; echo step >> /c/sub/f'\n\
                 RUN --mount=type=cache,target=/c,id=s cat /c/sub/f > /again\n\
                 RUN --mount=type=bind,from=seed,target=/s cat /s/seed/sub/f > /stage\n",
            )],
        );
        let (image, _, _) = env.build(&ctx, |_| {});
        assert_eq!(
            env.sh(&image, "cat /out; echo --; cat /again; echo --; cat /stage"),
            "seeded\n--\nseeded\nstep\n--\nseeded\n"
        );
    });
}
