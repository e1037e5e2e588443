//! Real-world projects: a Debian base image (images/recipes/debian.sh; scripts/setup.sh builds it
//! into target/images/debian) with `apt-get`, `pip` and `npm` in image builds and in jobs, under
//! the default security settings (seccomp, limits), and mistry's `uid` build arg pattern.
//!
//! The Debian tests need the image and the network (deb.debian.org, pypi.org,
//! registry.npmjs.org): without them they skip themselves with a message — and fail under `CI`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::server::{artifacts, read, Server};
use common::{images_dir, mistryd_bin};
use serde_json::Value;

mod common;

/// The image build of the real-world project: an `apt-get install` step (network host).
const REALWORLD_DOCKERFILE: &str = "FROM debian
RUN apt-get update && apt-get install -y --no-install-recommends hello
COPY job.sh /usr/local/bin/job.sh
ENTRYPOINT [\"/bin/sh\", \"/usr/local/bin/job.sh\"]
";

/// A job per tool (param `tool`): apt-get, pip into a virtualenv in the cache, npm.
const REALWORLD_JOB: &str = r#"#!/bin/sh
set -eu
mkdir -p /data/artifacts /data/cache
hello > /data/artifacts/hello.txt
case "$(cat /data/params/tool)" in
apt)
    apt-get update
    apt-get install -y --no-install-recommends tree
    tree --version | cut -d' ' -f1,2 > /data/artifacts/tool.txt
    ;;
pip)
    [ -x /data/cache/venv/bin/python ] || python3 -m venv /data/cache/venv
    /data/cache/venv/bin/pip install --no-input --disable-pip-version-check six==1.16.0
    /data/cache/venv/bin/python -c 'import six; print("six", six.__version__)' > /data/artifacts/tool.txt
    ;;
npm)
    mkdir -p /data/cache/app
    cd /data/cache/app
    npm install --no-audit --no-fund is-number@7.0.0
    node -e "const n = require('is-number'); console.log(n(7), n('x'), require('is-number/package.json').version)" > /data/artifacts/tool.txt
    ;;
esac
"#;

/// mistry's upstream pattern: a build user with the daemon's uid. `useradd -u 0` fails.
const UPSTREAM_UID_DOCKERFILE: &str = "FROM debian
ARG uid
RUN useradd -u $uid -m builder
USER builder
CMD [\"/bin/sh\", \"-c\", \"id -un > /data/artifacts/user && id -u > /data/artifacts/uid\"]
";

fn ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Skip (return false) with a message, or fail under CI.
fn skip(why: &str) -> bool {
    assert!(!ci(), "{why}");
    eprintln!("skipped: {why}");
    false
}

/// Whether `host:port` accepts a connection within a few seconds.
fn reachable(host: &str, port: u16) -> bool {
    use std::net::ToSocketAddrs;
    let Ok(addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)).is_ok())
}

/// The Debian image and the package registries are there.
fn debian_prerequisites() -> bool {
    let image = images_dir().join("debian/index.json");
    if !image.is_file() {
        return skip(&format!(
            "no Debian image at {}: run scripts/setup.sh (images/recipes/debian.sh)",
            image.display()
        ));
    }
    for (host, port) in [
        ("deb.debian.org", 80),
        ("pypi.org", 443),
        ("files.pythonhosted.org", 443),
        ("registry.npmjs.org", 443),
    ] {
        if !reachable(host, port) {
            return skip(&format!("{host}:{port} is unreachable"));
        }
    }
    true
}

/// Write a project into the server's projects directory.
fn project(s: &Server, name: &str, files: &[(&str, &str)]) {
    let dir = s.dir.path().join("projects").join(name);
    for (path, content) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
}

/// Remove what is left under `dir` as the sandbox's root (bound on the busybox image's `/tmp`):
/// rootless, the layer store and job files belong to subordinate ids this user cannot remove
/// directly. As root, a no-op (the
/// temporary directory's own removal does it).
fn remove_as_sandbox_root(dir: &Path) {
    if nix::unistd::geteuid().is_root() || !dir.exists() {
        return;
    }
    let rootfs = std::env::var_os("MISTRY_BUSYBOX_ROOTFS")
        .map_or_else(|| images_dir().join("busybox/rootfs"), PathBuf::from);
    let status = Command::new(mistryd_bin())
        .args(["sandbox", "run", "--rootfs"])
        .arg(&rootfs)
        .arg("--bind")
        .arg(format!("{}:/tmp", dir.display()))
        .args(["--", "/bin/sh", "-c", "rm -rf /tmp/* /tmp/.[!.]*"])
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!(
            "could not remove {} in a sandbox: {status:?}",
            dir.display()
        );
    }
}

/// A server whose files are removed, also rootless, when it is dropped.
struct Cleaned(Server);

impl Drop for Cleaned {
    fn drop(&mut self) {
        self.0.kill9();
        remove_as_sandbox_root(self.0.dir.path());
    }
}

fn timed_job(s: &Server, what: &str, body: Value) -> Value {
    let t = Instant::now();
    let info = s.job(body);
    eprintln!(
        "{what}: {:.1}s (ExitCode {}, Cached {})",
        t.elapsed().as_secs_f64(),
        info["ExitCode"],
        info["Cached"]
    );
    info
}

fn assert_ok(info: &Value, what: &str) {
    assert_eq!(
        (info["ExitCode"].as_i64(), info["ErrBuild"].as_str()),
        (Some(0), Some("")),
        "{what}: {info}"
    );
}

#[test]
fn debian_projects_run_apt_pip_and_npm_under_the_default_security_settings() {
    if !debian_prerequisites() {
        return;
    }
    // The default security settings: nothing about seccomp or limits in the configuration.
    // Only a time limit, so a hung download fails the test instead of hanging it.
    let s = Cleaned(Server::start(serde_json::json!({"time_limit": "10m"})));
    let s = &s.0;
    project(
        s,
        "realworld",
        &[
            ("Dockerfile", REALWORLD_DOCKERFILE),
            ("job.sh", REALWORLD_JOB),
        ],
    );
    let euid = nix::unistd::geteuid().as_raw();
    eprintln!("daemon uid {euid}");

    // (a) apt-get install in the image build (hello) and in the job (tree).
    let apt = timed_job(
        s,
        "image build + apt job",
        serde_json::json!({"project": "realworld", "params": {"tool": "apt"}}),
    );
    assert_ok(&apt, "apt");
    assert_eq!(
        (apt["Cached"].as_bool(), apt["Incremental"].as_bool()),
        (Some(false), Some(false))
    );
    let out = apt["ContainerStdouterr"].as_str().unwrap();
    assert!(out.contains("Setting up tree "), "{out}");
    assert_eq!(read(artifacts(&apt).join("hello.txt")), "Hello, world!\n");
    assert_eq!(read(artifacts(&apt).join("tool.txt")), "tree v2.1.0\n");
    // The same request again is answered from the result cache.
    let again = s.job(serde_json::json!({"project": "realworld", "params": {"tool": "apt"}}));
    assert_eq!(
        (again["Cached"].as_bool(), again["Path"].as_str()),
        (Some(true), apt["Path"].as_str())
    );

    // (b) pip install into a virtualenv in /data/cache, and import it.
    let pip = timed_job(
        s,
        "pip job",
        serde_json::json!({"project": "realworld", "params": {"tool": "pip"}}),
    );
    assert_ok(&pip, "pip");
    let out = pip["ContainerStdouterr"].as_str().unwrap();
    assert!(out.contains("Successfully installed six-1.16.0"), "{out}");
    assert_eq!(read(artifacts(&pip).join("tool.txt")), "six 1.16.0\n");
    assert_eq!(read(artifacts(&pip).join("hello.txt")), "Hello, world!\n");
    let cache = artifacts(&pip).parent().unwrap().join("cache");
    assert!(
        cache.join("venv/bin/python").exists(),
        "the virtualenv is in the job's cache"
    );

    // (c) npm install, and require it.
    let npm = timed_job(
        s,
        "npm job",
        serde_json::json!({"project": "realworld", "params": {"tool": "npm"}}),
    );
    assert_ok(&npm, "npm");
    let out = npm["ContainerStdouterr"].as_str().unwrap();
    assert!(out.contains("added 1 package"), "{out}");
    assert_eq!(read(artifacts(&npm).join("tool.txt")), "true false 7.0.0\n");
    let cache = artifacts(&npm).parent().unwrap().join("cache");
    let package = read(cache.join("app/node_modules/is-number/package.json"));
    assert!(package.contains("\"version\": \"7.0.0\""), "{package}");
}

#[test]
fn the_uid_build_arg_on_debian_as_documented() {
    if !debian_prerequisites() {
        return;
    }
    let s = Cleaned(Server::start(serde_json::json!({"time_limit": "10m"})));
    let s = &s.0;
    let euid = nix::unistd::geteuid().as_raw();
    project(s, "upstream", &[("Dockerfile", UPSTREAM_UID_DOCKERFILE)]);
    // The example project shows the pattern that works for every daemon user.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/debian");
    let files: Vec<(String, String)> = ["Dockerfile", "build.sh"]
        .iter()
        .map(|f| (f.to_string(), read(example.join(f))))
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    project(s, "example", &files);

    // mistry's upstream pattern, `useradd -u $uid builder`: rootless it works and the job runs
    // as builder with the daemon's uid; a root daemon passes uid 0, and useradd refuses it.
    let info = timed_job(
        s,
        "upstream uid pattern",
        serde_json::json!({"project": "upstream"}),
    );
    if euid == 0 {
        assert_eq!(info["ExitCode"], -999, "{info}");
        let err = info["ErrBuild"].as_str().unwrap();
        assert!(err.starts_with("could not build docker image: "), "{err}");
        let out = info["ContainerStdouterr"].as_str().unwrap();
        assert!(out.contains("UID 0 is not unique"), "{out}");
    } else {
        assert_ok(&info, "upstream uid pattern");
        assert_eq!(read(artifacts(&info).join("user")), "builder\n");
        assert_eq!(read(artifacts(&info).join("uid")), format!("{euid}\n"));
    }

    // The example's pattern: the daemon's uid, or 1000 when that is 0.
    let info = timed_job(
        s,
        "example (uid pattern)",
        serde_json::json!({"project": "example"}),
    );
    assert_ok(&info, "example");
    let uid = if euid == 0 { 1000 } else { euid };
    let about = read(artifacts(&info).join("about.txt"));
    let lines: Vec<&str> = about.lines().collect();
    assert_eq!(lines.len(), 4, "{about}");
    assert_eq!(lines[0], format!("user: builder ({uid})"));
    assert!(lines[1].starts_with("python: 3.11."), "{about}");
    assert!(lines[2].starts_with("node: v18."), "{about}");
    assert_eq!(lines[3], "build: 1");
}

/// `mistryd image build` passes build arg `uid` as the daemon does (its own uid), and
/// `--build-arg uid=...` overrides it. Offline (busybox).
#[test]
fn image_build_passes_the_uid_build_arg() {
    let dir = tempfile::Builder::new()
        .prefix("mistry-uid")
        .tempdir()
        .unwrap();
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nARG uid\nRUN echo \"uid=[$uid]\"\n",
    )
    .unwrap();
    let store = dir.path().join("store");
    let build = |extra: &[&str]| {
        let out = Command::new(mistryd_bin())
            .args(["image", "build", "--store"])
            .arg(&store)
            .arg("--images")
            .arg(images_dir())
            .args(extra)
            .arg(&ctx)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let euid = nix::unistd::geteuid().as_raw();
    let out = build(&[]);
    assert!(out.contains(&format!("uid=[{euid}]")), "{out}");
    let out = build(&["--build-arg", "uid=4242"]);
    assert!(out.contains("uid=[4242]"), "{out}");
    assert!(!out.contains(&format!("uid=[{euid}]")), "{out}");
    remove_as_sandbox_root(dir.path());
}

/// A Dockerfile shape: (project, files, steps, filesystem steps).
type Shape = (
    &'static str,
    &'static [(&'static str, &'static str)],
    usize,
    usize,
);

/// Dockerfile shapes of real projects, on the busybox base (offline).
const SHAPES: &[Shape] = &[
    (
        "copyfrom",
        &[
            (
                "Dockerfile",
                "FROM busybox AS build\nWORKDIR /src\nCOPY . .\n\
                 RUN mkdir -p /out && cat *.txt > /out/app\n\
                 FROM busybox\nCOPY --from=build /out/app /usr/local/bin/app\n\
                 COPY --from=0 /src /srccopy\nCMD [\"cat\", \"/usr/local/bin/app\"]\n",
            ),
            ("a.txt", "a\n"),
            ("b.txt", "b\n"),
        ],
        8,
        5,
    ),
    (
        "argfirst",
        &[(
            "Dockerfile",
            "ARG BASE=busybox\nARG VERSION=1.2.3\nFROM ${BASE} AS b\nARG VERSION\n\
             RUN echo $VERSION > /v\nFROM $BASE\nARG VERSION\nCOPY --from=b /v /v\n\
             RUN echo \"$VERSION\" >> /v\nCMD [\"cat\", \"/v\"]\n",
        )],
        8,
        3,
    ),
    (
        "cachemount",
        &[(
            "Dockerfile",
            "FROM busybox\n\
             RUN --mount=type=cache,target=/cache sh -c 'date >> /cache/log; wc -l < /cache/log > /count'\n\
             RUN --mount=type=cache,id=shared,target=/c2,sharing=locked echo x >> /c2/x && echo y > /y\n\
             CMD [\"cat\", \"/count\"]\n",
        )],
        4,
        2,
    ),
    (
        "heredocs",
        &[(
            "Dockerfile",
            "# syntax=docker/dockerfile:1\nFROM busybox\nRUN <<EOF\necho hi > /a\nEOF\n\
             COPY <<EOF /etc/conf\nx=1\nEOF\nRUN <<EOF\n#!/bin/sh\necho script > /b\nEOF\n\
             RUN cat <<A > /c && cat <<B > /d\none\nA\ntwo\nB\nCMD [\"cat\", \"/a\", \"/b\", \"/c\", \"/d\"]\n",
        )],
        6,
        4,
    ),
    (
        "dockerignore",
        &[
            (
                "Dockerfile",
                "FROM busybox\nCOPY . /app\nRUN ls -R /app > /listing\nCMD [\"cat\", \"/listing\"]\n",
            ),
            (".dockerignore", "node_modules\n*.log\n"),
            ("node_modules/x/i.js", "junk\n"),
            ("debug.log", "log\n"),
            ("src/main.js", "code\n"),
        ],
        4,
        2,
    ),
    (
        "golike",
        &[
            (
                "Dockerfile",
                "ARG GO_VERSION=1.22\nFROM busybox AS deps\nWORKDIR /src\nCOPY go.mod go.sum ./\n\
                 RUN --mount=type=cache,target=/root/go/pkg/mod cat go.mod > /deps\n\
                 FROM deps AS build\nARG GO_VERSION\nENV CGO_ENABLED=0\nCOPY . .\n\
                 RUN --mount=type=cache,target=/root/.cache/go-build \\\n\
                 --mount=type=bind,source=go.mod,target=/mnt/go.mod \\\n\
                 printf '#!/bin/sh\\necho served\\n' > /server && chmod 755 /server\n\
                 FROM busybox\nCOPY --from=build /server /server\nUSER 65534:65534\nEXPOSE 8080\n\
                 ENTRYPOINT [\"/server\"]\n",
            ),
            ("go.mod", "module example.com/svc\n\ngo 1.22\n"),
            ("go.sum", ""),
            ("main.go", "package main\n\nfunc main() {}\n"),
        ],
        14,
        6,
    ),
    (
        "nodelike",
        &[
            (
                "Dockerfile",
                "FROM busybox AS deps\nWORKDIR /app\nCOPY package.json package-lock.json ./\n\
                 RUN --mount=type=cache,target=/root/.npm mkdir -p node_modules/dep && \
                 cat package-lock.json > node_modules/dep/index.js\n\
                 FROM deps AS build\nCOPY . .\nRUN mkdir -p dist && cat src/*.js > dist/app.js\n\
                 FROM busybox\nENV NODE_ENV=production\nWORKDIR /app\n\
                 COPY --from=deps /app/node_modules ./node_modules\n\
                 COPY --from=build /app/dist ./dist\nCOPY package.json ./\n\
                 CMD [\"cat\", \"dist/app.js\"]\n",
            ),
            ("package.json", "{\"name\": \"n\", \"version\": \"1.0.0\"}\n"),
            ("package-lock.json", "{\"lockfileVersion\": 3}\n"),
            ("src/index.js", "console.log(1)\n"),
        ],
        14,
        9,
    ),
];

/// The build log's summary line of a job (`N steps: F filesystem steps, C from the cache, B
/// built`).
fn build_summary(info: &Value) -> String {
    let out = info["ContainerStdouterr"].as_str().unwrap_or_default();
    out.lines()
        .find(|l| l.contains(" filesystem steps, "))
        .unwrap_or_else(|| panic!("no build summary in the log:\n{out}"))
        .to_string()
}

/// Issue 24: an unchanged Dockerfile and context rebuilds entirely from the step cache, for
/// every shape, on the path a job takes: two jobs of a project with different params (their
/// IDs differ, so each builds the image) report every filesystem step from the cache the second
/// time; a `Rebuild` job ignores the cache, as documented (`--rebuild`).
#[test]
fn unchanged_rebuilds_of_every_shape_are_full_cache_hits() {
    let s = Cleaned(Server::start(serde_json::json!({})));
    let s = &s.0;
    for (name, files, _, _) in SHAPES {
        project(s, name, files);
    }
    for (name, _, steps, fs) in SHAPES {
        let first = s.job(serde_json::json!({"project": name, "params": {"run": "1"}}));
        assert_ok(&first, name);
        let summary = build_summary(&first);
        assert!(
            summary.starts_with(&format!("{steps} steps: {fs} filesystem steps, ")),
            "{name}: {summary}"
        );
        let second = s.job(serde_json::json!({"project": name, "params": {"run": "2"}}));
        assert_ok(&second, name);
        assert_ne!(first["Path"], second["Path"], "{name}: two jobs");
        assert_eq!(
            build_summary(&second),
            format!("{steps} steps: {fs} filesystem steps, {fs} from the cache, 0 built"),
            "{name}: {}",
            second["ContainerStdouterr"]
        );
    }
    let rebuild =
        s.job(serde_json::json!({"project": "golike", "params": {"run": "3"}, "rebuild": true}));
    assert_ok(&rebuild, "golike rebuild");
    assert_eq!(
        build_summary(&rebuild),
        "14 steps: 6 filesystem steps, 0 from the cache, 6 built"
    );
}
