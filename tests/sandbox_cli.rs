//! `mistryd sandbox run` end to end: a real process, its exit code and messages.

use std::path::PathBuf;
use std::process::{Command, Output};

fn rootfs() -> PathBuf {
    let path = std::env::var_os("MISTRY_BUSYBOX_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/images/busybox/rootfs")
        });
    assert!(
        path.join("bin/busybox").exists(),
        "no busybox rootfs at {}: run scripts/setup.sh",
        path.display()
    );
    path
}

fn mistryd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mistryd"))
        .args(args)
        .output()
        .expect("running mistryd")
}

fn run(extra: &[&str], cmd: &[&str]) -> Output {
    let root = rootfs();
    let mut args = vec!["sandbox", "run", "--rootfs", root.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(cmd);
    mistryd(&args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn exit_code_and_streams_pass_through() {
    let out = run(&[], &["/bin/sh", "-c", "echo out; echo err >&2; exit 77"]);
    assert_eq!(out.status.code(), Some(77));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
}

#[test]
fn death_by_signal_is_128_plus_n_and_said() {
    let out = run(&[], &["/bin/sh", "-c", "kill -KILL $$"]);
    assert_eq!(out.status.code(), Some(137));
    assert_eq!(
        text(&out.stderr),
        "mistryd: sandbox: killed by signal 9 (SIGKILL)\n"
    );
}

#[test]
fn timeout_is_124_and_said() {
    let out = run(&["--timeout", "300ms"], &["/bin/sleep", "30"]);
    assert_eq!(out.status.code(), Some(124));
    assert_eq!(
        text(&out.stderr),
        "mistryd: sandbox: timed out after 300ms\n"
    );
}

#[test]
fn options_reach_the_job() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in"), "data\n").unwrap();
    let bind = format!("{}:/data:ro", dir.path().display());
    let out = run(
        &[
            "--env",
            "A=1",
            "-e",
            "B=two words",
            "--cwd",
            "/data",
            "--user",
            "builder",
            "--hostname",
            "box",
            "--bind",
            &bind,
            "--tmpfs-tmp",
            "--rlimit",
            "nofile=100",
        ],
        &[
            "/bin/sh",
            "-c",
            "echo $A $B; pwd; id -un; hostname; cat in; ulimit -n; touch x 2>/dev/null || echo ro",
        ],
    );
    assert_eq!(
        text(&out.stdout),
        "1 two words\n/data\nbuilder\nbox\ndata\n100\nro\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn start_failures_are_one_clear_line() {
    let out = run(&[], &["/usr/bin/foo"]);
    assert_eq!(out.status.code(), Some(127));
    assert_eq!(
        text(&out.stderr),
        "mistryd: exec /usr/bin/foo: no such file or directory\n"
    );
    let out = mistryd(&[
        "sandbox",
        "run",
        "--rootfs",
        "/nonexistent",
        "--",
        "/bin/true",
    ]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        text(&out.stderr),
        "mistryd: rootfs /nonexistent: no such file or directory\n"
    );
    let out = run(&["--bind", "nocolon"], &["/bin/true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("invalid bind \"nocolon\""),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["--timeout", "soon"], &["/bin/true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("invalid duration \"soon\""),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn version() {
    let out = mistryd(&["--version"]);
    assert_eq!(
        text(&out.stdout),
        format!("mistryd {}\n", env!("CARGO_PKG_VERSION"))
    );
}

fn processes_with(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(marker))
                .unwrap_or(false)
        })
        .count()
}

#[test]
fn the_sandbox_dies_with_its_caller() {
    let marker = format!(
        "77{}{}",
        std::process::id(),
        std::time::UNIX_EPOCH.elapsed().unwrap().subsec_nanos()
    );
    let root = rootfs();
    let mut caller = Command::new(env!("CARGO_BIN_EXE_mistryd"))
        .args([
            "sandbox",
            "run",
            "--rootfs",
            root.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
        ])
        .arg(format!("setsid sleep {marker} & sleep {marker}"))
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while processes_with(&marker) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the job did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    caller.kill().unwrap(); // SIGKILL: no chance to clean up
    caller.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while processes_with(&marker) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "processes of the sandbox outlived their caller"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn disabled_user_namespaces_name_the_sysctl() {
    // In a user namespace of its own (util-linux unshare), the limit is set to 0 for that
    // namespace only; the host is not touched.
    let root = rootfs();
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "sh", "-c"])
        .arg(format!(
            "echo 0 > /proc/sys/user/max_user_namespaces && exec {} sandbox run --rootfs {} -- /bin/true",
            env!("CARGO_BIN_EXE_mistryd"),
            root.display()
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "mistryd: cannot create namespaces: user namespaces are disabled: sysctl \
         user.max_user_namespaces is 0 (set it to e.g. 15000)\n"
    );
}
