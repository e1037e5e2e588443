//! `mistryd sandbox run` end to end: a real process, its exit code and messages.

use std::path::PathBuf;
use std::process::{Command, Output};

mod common;

use common::{wait_for, wait_until};

fn rootfs() -> PathBuf {
    let path = std::env::var_os("MISTRY_BUSYBOX_ROOTFS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/images/busybox/rootfs"),
        PathBuf::from,
    );
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
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
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
    wait_until("the job to start", || processes_with(&marker) >= 2);
    caller.kill().unwrap(); // SIGKILL: no chance to clean up
    caller.wait().unwrap();
    wait_for(
        "the processes of the sandbox to die with their caller",
        std::time::Duration::from_secs(5),
        || processes_with(&marker) == 0,
    );
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

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn seccomp_flag_chooses_the_filter() {
    let status = |extra: &[&str]| {
        let out = run(extra, &["/bin/grep", "^Seccomp:", "/proc/self/status"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    assert_eq!(status(&[]), "Seccomp:\t2\n");
    assert_eq!(status(&["--seccomp", "default"]), "Seccomp:\t2\n");
    assert_eq!(status(&["--seccomp", "unconfined"]), "Seccomp:\t0\n");
    // A profile file: mkdir refused with EACCES.
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("p.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}"#,
    )
    .unwrap();
    let p = profile.to_str().unwrap();
    let out = run(&["--seccomp", p], &["/bin/mkdir", "/tmp/x"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "mkdir: can't create directory '/tmp/x': Permission denied\n"
    );
    // A broken profile: 125 and one line naming it.
    std::fs::write(&profile, "{").unwrap();
    let out = run(&["--seccomp", p], &["/bin/true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!("mistryd: seccomp profile {p}: EOF while parsing")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn nested_user_namespaces_need_the_flag() {
    let cmd = ["/bin/cat", "/proc/sys/user/max_user_namespaces"];
    assert_eq!(text(&run(&[], &cmd).stdout), "0\n");
    let out = run(&["--allow-nested-userns"], &cmd);
    assert_ne!(text(&out.stdout), "0\n");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn limits_flags_reach_the_job() {
    let out = run(
        &["--pids", "64", "--nofile", "32:64"],
        &[
            "/bin/sh",
            "-c",
            "grep -E '^Max (processes|open files)' /proc/self/limits | tr -s ' '",
        ],
    );
    assert_eq!(
        text(&out.stdout),
        "Max processes 64 64 processes \nMax open files 32 64 files \n",
        "{}",
        text(&out.stderr)
    );
    // The default: 1024 processes, 1024 open files (within the caller's own hard limits).
    let out = run(&[], &["/bin/sh", "-c", "ulimit -n"]);
    assert_eq!(text(&out.stdout), "1024\n");
    // --pids 0: no process limit of ours.
    let out = run(&["--pids", "0"], &["/bin/sh", "-c", "ulimit -u"]);
    assert_ne!(text(&out.stdout), "1024\n");
}

#[test]
fn a_process_limit_ends_the_job_with_137_and_says_why() {
    let out = run(
        &["--pids", "64"],
        &["/bin/sh", "-c", "while :; do sleep 100 & done"],
    );
    let err = text(&out.stderr);
    if is_root() {
        // The cgroup v1 pids controller (writable as root here) counts the refused fork.
        assert_eq!(out.status.code(), Some(137), "{err}");
        assert_eq!(
            err.lines().last(),
            Some("mistryd: sandbox: exceeded its process limit of 64")
        );
    } else {
        // RLIMIT_NPROC refuses the fork; the shell exits at once.
        assert!(matches!(out.status.code(), Some(2 | 137)), "{err}");
        assert!(err.contains("can't fork"), "{err}");
    }
}

#[test]
fn sandbox_ids_flag_chooses_the_mapping() {
    let map = |extra: &[&str]| {
        let out = run(extra, &["/bin/cat", "/proc/self/uid_map"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
    };
    let uid = nix::unistd::geteuid().as_raw();
    assert_eq!(map(&["--sandbox-ids", "single"]), [format!("0 {uid} 1")]);
    assert_eq!(map(&["--single-id-map"]), [format!("0 {uid} 1")]);
    let name = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_default();
    let subuid = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
    let Some(start) = subuid.lines().find_map(|l| {
        let mut f = l.split(':');
        let (owner, start) = (f.next()?, f.next()?);
        (owner == name || owner == uid.to_string()).then(|| start.to_string())
    }) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "needs a subordinate range (scripts/setup.sh)"
        );
        return;
    };
    assert_eq!(
        map(&["--sandbox-ids", "subordinate"]),
        [format!("0 {start} 65536")]
    );
    let out = run(&["--sandbox-ids", "bogus"], &["/bin/true"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn no_new_privs_falls_back_to_one_id_unless_root() {
    // Under no_new_privs (systemd's NoNewPrivileges=yes) the set-uid newuidmap/newgidmap gain
    // nothing: an unprivileged caller gets the single-id map instead of a failed start; root
    // writes its maps itself and keeps the full one.
    let root = rootfs();
    let out = Command::new("setpriv")
        .arg("--no-new-privs")
        .arg(env!("CARGO_BIN_EXE_mistryd"))
        .args(["sandbox", "run", "--rootfs"])
        .arg(&root)
        .args(["--", "/bin/cat", "/proc/self/uid_map"])
        .output()
        .expect("running setpriv (util-linux)");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines = text(&out.stdout).lines().count();
    let plain = run(&[], &["/bin/cat", "/proc/self/uid_map"]);
    let full = text(&plain.stdout).lines().count();
    if is_root() {
        assert_eq!(lines, full);
    } else {
        assert_eq!(lines, 1, "{}", text(&out.stdout));
    }
}
