//! Today's Dockerfile syntax, end to end (issue 11): heredocs for RUN, COPY and ADD as BuildKit
//! runs them, COPY/ADD flags (`--link`, `--parents`, `--checksum`), refused git sources and
//! unsupported flags, and `COPY --from` keeping owners. Built with the real helper
//! (`mistryd internal`) from the busybox image, as tests/image_build.rs does.

use std::path::{Path, PathBuf};

mod common;

use common::build_env::{self, Env};

use common::serve;
use images::{BackendKind, BuildStats, Image};
use sandbox::ExitStatus;

fn env_for(kind: BackendKind, parent: Option<&Path>) -> Env {
    build_env::env_for("mistry-syntax", kind, parent)
}

impl Env {
    fn build(&self, ctx: &Path) -> (Image, BuildStats, String) {
        self.build_with(ctx, |_| {})
            .unwrap_or_else(|(e, log)| panic!("build failed: {e}\n{log}"))
    }

    fn build_err(&self, ctx: &Path) -> String {
        self.fails(ctx, |_| {})
    }

    /// Run a shell script in a copy of the image (as root), its stdout back; it must succeed.
    fn sh(&self, image: &Image, script: &str) -> String {
        let out = self.run(image, script, false);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status,
            ExitStatus::Exited(0),
            "{script}\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

/// A Dockerfile as projects write them with BuildKit's heredocs. `{greeting}` is replaced to
/// test the cache.
const HEREDOC_DOCKERFILE: &str = r#"# syntax=docker/dockerfile:1
FROM busybox AS base
ARG APP_USER=app
ENV APP_HOME=/srv/app

# Several commands in one step, the way real projects set up an image.
RUN <<EOF
set -eu
mkdir -p "$APP_HOME/bin" /etc/app
echo "home is $APP_HOME, user ${APP_USER}" > /etc/app/home
EOF

# <<- strips the leading tabs of every line (the quoted string's second line included).
RUN <<-EOF
	set -e
	for f in one two; do
		echo "$f" >> /etc/app/list
	done
	echo "
	bar" > /etc/app/bar-run
EOF

# A script run by its interpreter.
RUN <<EOF
#!/bin/sh
set -eu
echo "script $0 with $# arguments" > /etc/app/shebang
echo "{greeting}" >> /etc/app/shebang
EOF

RUN <<EOF
#!/usr/bin/awk -f
BEGIN {
	print "awk says hi" > "/etc/app/awk"
}
EOF

# The shell processes heredocs of a command itself.
RUN cat <<A > /etc/app/a && cat <<'B' > /etc/app/b
a=$APP_HOME
A
b=$APP_HOME
B

# Config files: expanded (unquoted delimiter, quotes kept) and as written.
COPY <<EOF /etc/app/app.conf
user=${APP_USER}
home="$APP_HOME"
quoted='${APP_USER:-nobody}'
literal=\$HOME
EOF

COPY <<'EOF' /srv/app/bin/start.sh
#!/bin/sh
exec echo "starting as $(id -u) in $APP_HOME"
EOF

COPY <<-EOF /etc/app/chomped
	indented
		deeper
EOF

COPY --chmod=755 --chown=1000:1000 <<EOF <<"two.txt" /srv/app/data/
first $APP_USER
EOF
second $APP_USER
two.txt

ADD <<EOF /etc/app/added
added by ${APP_USER}
EOF

RUN chmod +x /srv/app/bin/start.sh && /srv/app/bin/start.sh > /etc/app/started
"#;

fn heredoc_project(env: &Env, greeting: &str) -> PathBuf {
    env.project(
        "heredocs",
        &[(
            "Dockerfile",
            &HEREDOC_DOCKERFILE.replace("{greeting}", greeting),
        )],
    )
}

#[test]
fn heredocs_as_real_projects_write_them() {
    let env = env_for(BackendKind::Plain, None);
    let ctx = heredoc_project(&env, "hello");
    let (image, stats, log) = env.build(&ctx);
    assert_eq!(stats.executed_runs, 6, "{log}");
    let files = [
        "/etc/app/home",
        "/etc/app/list",
        "/etc/app/bar-run",
        "/etc/app/shebang",
        "/etc/app/awk",
        "/etc/app/a",
        "/etc/app/b",
        "/etc/app/app.conf",
        "/srv/app/bin/start.sh",
        "/etc/app/chomped",
        "/srv/app/data/EOF",
        "/srv/app/data/two.txt",
        "/etc/app/added",
        "/etc/app/started",
    ];
    let mut script = String::new();
    for f in files {
        script.push_str(&format!("echo '== {f}'; cat {f}; "));
    }
    assert_eq!(
        env.sh(&image, &script),
        "== /etc/app/home\nhome is /srv/app, user app\n\
         == /etc/app/list\none\ntwo\n\
         == /etc/app/bar-run\n\nbar\n\
         == /etc/app/shebang\nscript /dev/pipes/EOF with 0 arguments\nhello\n\
         == /etc/app/awk\nawk says hi\n\
         == /etc/app/a\na=/srv/app\n\
         == /etc/app/b\nb=$APP_HOME\n\
         == /etc/app/app.conf\nuser=app\nhome=\"/srv/app\"\nquoted='app'\nliteral=$HOME\n\
         == /srv/app/bin/start.sh\n#!/bin/sh\nexec echo \"starting as $(id -u) in $APP_HOME\"\n\
         == /etc/app/chomped\nindented\ndeeper\n\
         == /srv/app/data/EOF\nfirst app\n\
         == /srv/app/data/two.txt\nsecond $APP_USER\n\
         == /etc/app/added\nadded by app\n\
         == /etc/app/started\nstarting as 0 in /srv/app\n"
    );
    // Heredoc files are 0644 and root's unless told otherwise; nothing of the script stays.
    assert_eq!(
        env.sh(
            &image,
            "stat -c '%n %u:%g %a' /etc/app/app.conf /etc/app/added /srv/app/data \
             /srv/app/data/EOF /srv/app/data/two.txt"
        ),
        "/etc/app/app.conf 0:0 644\n/etc/app/added 0:0 644\n/srv/app/data 1000:1000 755\n\
         /srv/app/data/EOF 1000:1000 755\n/srv/app/data/two.txt 1000:1000 755\n"
    );
    let rootfs = env.builder.rootfs(&image).unwrap();
    assert!(rootfs.join("etc/app/home").is_file());
    assert!(
        !rootfs.join("dev/pipes").exists(),
        "the script's mount point is in the image"
    );
    assert!(env.tmp_is_empty(), "tmp/ is left with files");

    // Unchanged: everything from the cache.
    let (again, stats, log) = env.build(&ctx);
    assert_eq!(stats.executed_runs, 0, "{log}");
    assert_eq!(again.key, image.key);

    // A changed heredoc body (of a script run from its file) runs that step and the ones after.
    let ctx = heredoc_project(&env, "bonjour");
    let (changed, stats, log) = env.build(&ctx);
    assert_eq!(stats.executed_runs, 4, "{log}");
    assert_ne!(changed.key, image.key);
    assert_eq!(
        env.sh(&changed, "cat /etc/app/shebang"),
        "script /dev/pipes/EOF with 0 arguments\nbonjour\n"
    );
}

#[test]
fn heredoc_bodies_are_in_the_step_key() {
    let env = env_for(BackendKind::Plain, None);
    let df = |run: &str, file: &str| {
        format!(
            "FROM busybox\nRUN <<EOF\necho {run} > /run.txt\nEOF\nCOPY <<EOF /file.txt\n{file}\nEOF\n"
        )
    };
    let ctx = env.project("keys", &[("Dockerfile", &df("one", "alpha"))]);
    let (image, stats, _) = env.build(&ctx);
    assert_eq!(stats.executed_runs, 1);
    assert_eq!(env.sh(&image, "cat /run.txt /file.txt"), "one\nalpha\n");
    // The COPY body changes: the RUN is cached, the file is new.
    std::fs::write(ctx.join("Dockerfile"), df("one", "beta")).unwrap();
    let (image, stats, _) = env.build(&ctx);
    assert_eq!((stats.executed_runs, stats.cached), (0, 1));
    assert_eq!(env.sh(&image, "cat /run.txt /file.txt"), "one\nbeta\n");
    // The RUN body changes: it runs again.
    std::fs::write(ctx.join("Dockerfile"), df("two", "beta")).unwrap();
    let (image, stats, _) = env.build(&ctx);
    assert_eq!((stats.executed_runs, stats.cached), (1, 0));
    assert_eq!(env.sh(&image, "cat /run.txt /file.txt"), "two\nbeta\n");
}

#[test]
fn copy_link_and_parents() {
    let env = env_for(BackendKind::Plain, None);
    let ctx = env.project(
        "parents",
        &[
            (
                "Dockerfile",
                "FROM busybox\n\
                 COPY --link conf/app.ini /etc/app.ini\n\
                 COPY --link=false conf/app.ini /etc/app2.ini\n\
                 COPY ./x/a.txt ./y/a.txt /no_parents/\n\
                 COPY --parents ./x/a.txt ./y/a.txt /parents/\n\
                 COPY --parents x/./sub/*.txt /pivot/\n\
                 COPY --parents=true src /app/\n\
                 COPY --parents */a.txt /wild\n",
            ),
            ("conf/app.ini", "[app]\n"),
            ("x/a.txt", "xa\n"),
            ("y/a.txt", "ya\n"),
            ("x/sub/b.txt", "xsb\n"),
            ("x/sub/c.txt", "xsc\n"),
            ("src/main.c", "int main;\n"),
            ("src/lib/util.c", "int util;\n"),
        ],
    );
    let (image, _, _) = env.build(&ctx);
    assert_eq!(
        env.sh(
            &image,
            "cat /etc/app.ini /etc/app2.ini; \
             cd /no_parents && find . -type f | sort && cat a.txt; \
             cd /parents && find . -type f | sort; \
             cd /pivot && find . -type f | sort; \
             cd /app && find . | sort; \
             cd /wild && find . -type f | sort"
        ),
        "[app]\n[app]\n\
         ./a.txt\nya\n\
         ./x/a.txt\n./y/a.txt\n\
         ./sub/b.txt\n./sub/c.txt\n\
         .\n./src\n./src/lib\n./src/lib/util.c\n./src/main.c\n\
         ./x/a.txt\n./y/a.txt\n"
    );
}

#[test]
fn add_checksum_git_sources_and_unknown_flags() {
    let env = env_for(BackendKind::Plain, None);
    let url = serve(b"downloaded content\n");
    let good = "sha256:35b85adf20bea0ee7ade90888c839745854892bfe1b736d356a395fb4574a472";
    let ctx = env.project(
        "checksum",
        &[(
            "Dockerfile",
            &format!("FROM busybox\nADD --checksum={good} {url}/file.txt /got.txt\n"),
        )],
    );
    let (image, _, _) = env.build(&ctx);
    assert_eq!(env.sh(&image, "cat /got.txt"), "downloaded content\n");

    let bad = format!("sha256:{}", "0".repeat(64));
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM busybox\nRUN true\nADD --checksum={bad} {url}/file.txt /got.txt\n"),
    )
    .unwrap();
    // The step as logged, cut at 80 characters.
    let step: String = format!("ADD --checksum={bad} {url}/file.txt /got.txt")
        .chars()
        .take(80)
        .collect();
    assert_eq!(
        env.build_err(&ctx),
        format!(
            "step {step} (line 3): ADD {url}/file.txt: checksum mismatch: expected {bad}, got \
             {good}"
        )
    );
    assert!(env.tmp_is_empty(), "tmp/ is left with files");

    for (dockerfile, message) in [
        (
            "FROM busybox\nADD https://github.com/x/y.git /src\n",
            "step ADD https://github.com/x/y.git /src (line 2): ADD https://github.com/x/y.git: \
             git sources are not supported; clone the repository into the build context (or RUN \
             git clone) instead",
        ),
        (
            "FROM busybox\nADD git@github.com:x/y.git /src\n",
            "step ADD git@github.com:x/y.git /src (line 2): ADD git@github.com:x/y.git: git \
             sources are not supported; clone the repository into the build context (or RUN git \
             clone) instead",
        ),
        (
            "FROM busybox\nADD --checksum=sha256:abc a.txt /a\n",
            "step ADD --checksum=sha256:abc a.txt /a (line 2): invalid --checksum \
             \"sha256:abc\": expected sha256:HEX (or sha384:, sha512:) with the digest in \
             hexadecimal",
        ),
        (
            "FROM busybox\nCOPY --frm=x a.txt /a\n",
            "Dockerfile line 2: unknown flag --frm for COPY",
        ),
        (
            "FROM busybox\nRUN --device=/dev/fuse true\n",
            "Dockerfile line 2: RUN --device is not supported by mistry (RUN steps see only the \
             sandbox's own devices)",
        ),
        (
            "FROM busybox\nCOPY --exclude=*.md . /app\n",
            "Dockerfile line 2: COPY --exclude is not supported by mistry (use .dockerignore)",
        ),
        (
            "FROM --platfrm=linux/amd64 busybox\n",
            "Dockerfile line 1: unknown flag --platfrm for FROM",
        ),
        (
            "FROM busybox\nHEALTHCHECK --intervl=1s CMD true\n",
            "Dockerfile line 2: unknown flag --intervl for HEALTHCHECK",
        ),
        (
            "FROM busybox\nRUN <<EOF\necho never ends\n",
            "Dockerfile line 2: unterminated heredoc <<EOF: no line \"EOF\" ends it",
        ),
    ] {
        let ctx = env.project("refused", &[("Dockerfile", dockerfile), ("a.txt", "a\n")]);
        assert_eq!(env.build_err(&ctx), message, "{dockerfile}");
    }
}

#[test]
fn copy_from_keeps_owners_and_modes() {
    for (kind, parent) in common::backends() {
        eprintln!("== backend {kind}");
        let env = env_for(kind, parent.as_deref());
        let ctx = env.project(
            "owners",
            &[
                (
                    "Dockerfile",
                    "FROM busybox AS build\n\
                     RUN mkdir -p /out/dir && echo u > /out/dir/user.txt && echo r > /out/root.txt \
                      && ln -s dir/user.txt /out/link && chown -R 1000:1000 /out/dir \
                      && chown -h 1000:1000 /out/link && chmod 750 /out/dir \
                      && chmod 640 /out/dir/user.txt && chmod 4755 /out/root.txt\n\
                     FROM busybox\n\
                     COPY --from=build /out/ /kept/\n\
                     COPY --from=build /out/dir /dir-new\n\
                     RUN mkdir /existing && chmod 700 /existing\n\
                     COPY --from=build /out/dir /existing\n\
                     COPY --from=build /out/dir/user.txt /user.txt\n\
                     COPY --from=build --chown=2000:3000 /out/ /chowned/\n\
                     COPY --from=build --chown=2000:3000 --chmod=600 /out/root.txt /chmod.txt\n\
                     COPY ctx.txt /ctx.txt\n",
                ),
                ("ctx.txt", "c\n"),
            ],
        );
        let (image, _, log) = env.build(&ctx);
        assert_eq!(
            env.sh(
                &image,
                "stat -c '%n %u:%g %a' /kept /kept/dir /kept/dir/user.txt /kept/root.txt \
                 /dir-new /dir-new/user.txt /existing /existing/user.txt /user.txt /chowned \
                 /chowned/dir /chowned/dir/user.txt /chowned/root.txt /chmod.txt /ctx.txt; \
                 stat -c '%n %u:%g' /kept/link /chowned/link; cat /kept/link"
            ),
            "/kept 0:0 755\n/kept/dir 1000:1000 750\n/kept/dir/user.txt 1000:1000 640\n\
             /kept/root.txt 0:0 4755\n/dir-new 1000:1000 750\n/dir-new/user.txt 1000:1000 640\n\
             /existing 0:0 700\n/existing/user.txt 1000:1000 640\n/user.txt 1000:1000 640\n\
             /chowned 2000:3000 755\n/chowned/dir 2000:3000 750\n\
             /chowned/dir/user.txt 2000:3000 640\n/chowned/root.txt 2000:3000 4755\n\
             /chmod.txt 2000:3000 600\n/ctx.txt 0:0 644\n\
             /kept/link 1000:1000\n/chowned/link 2000:3000\nu\n",
            "{log}"
        );
        assert!(env.tmp_is_empty(), "tmp/ is left with files");
    }
}
