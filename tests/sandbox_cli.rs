//! `mistryd sandbox run` (and `mistry-sandbox`, the same as a small program) end to end: a real
//! process, its exit code and messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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
    // Rootless, the sandbox nests in the shared held namespace, whose map is the subordinate
    // one: inside, the identity over it; without holding, the map onto the host's ids.
    let held = if is_root() {
        format!("0 {start} 65536")
    } else {
        "0 0 65536".to_string()
    };
    let xdg = tempfile::tempdir().unwrap();
    let _holders = Holders::new(xdg.path());
    let out = shared_run(
        xdg.path(),
        &["--sandbox-ids", "subordinate"],
        &["/bin/cat", "/proc/self/uid_map"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(map_lines(&out.stdout), [held]);
    if !is_root() {
        let holder = only_holder(xdg.path());
        assert_eq!(
            map_lines(&std::fs::read(format!("/proc/{holder}/uid_map")).unwrap()),
            [format!("0 {start} 65536")]
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_mistryd"))
        .args(["sandbox", "run", "--sandbox-ids", "subordinate", "--rootfs"])
        .arg(rootfs())
        .args(["--", "/bin/cat", "/proc/self/uid_map"])
        .env("MISTRY_NO_HELD_USERNS", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(map_lines(&out.stdout), [format!("0 {start} 65536")]);
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

// Shared held user namespaces (sandbox/src/holder.rs): a rootless one-shot `mistryd sandbox
// run` registers its holder in `$XDG_RUNTIME_DIR/mistry` (here a directory of the test's), and
// the next one finds it there. A root caller writes its maps itself and never registers one.

/// Map lines, each line's fields separated by one space.
fn map_lines(b: &[u8]) -> Vec<String> {
    text(b)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

/// This user's subordinate uid range (start, count), needed for a holder (a rootless map that
/// needs newuidmap). Without one the test is skipped, failing under CI.
fn subordinate_range() -> Option<(u32, u32)> {
    let uid = nix::unistd::geteuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_default();
    let found = std::fs::read_to_string("/etc/subuid")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let (owner, start, count) = (f.next()?, f.next()?, f.next()?);
            (owner == name || owner == uid.to_string())
                .then(|| Some((start.parse().ok()?, count.parse().ok()?)))
                .flatten()
        });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "needs a subordinate range (scripts/setup.sh)"
        );
    }
    found
}

/// `mistryd sandbox run` with its holders registered under `xdg` (`XDG_RUNTIME_DIR`).
fn shared_run(xdg: &Path, extra: &[&str], cmd: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mistryd"))
        .args(["sandbox", "run", "--rootfs"])
        .arg(rootfs())
        .args(extra)
        .arg("--")
        .args(cmd)
        .env("XDG_RUNTIME_DIR", xdg)
        .env_remove("MISTRY_NO_HELD_USERNS")
        .output()
        .expect("running mistryd")
}

/// The registry files under `xdg`: (name, content), sorted.
fn registry(xdg: &Path) -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir(xdg.join("mistry")) else {
        return Vec::new();
    };
    let mut files: Vec<_> = dir
        .map(|e| {
            let e = e.unwrap();
            let content = std::fs::read_to_string(e.path()).unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), content)
        })
        .collect();
    files.sort();
    files
}

/// Whether `pid` is a running shared holder (its renamed thread).
fn is_holder(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().next() == Some("Name:\tmistryd-holder")
        && !status.lines().any(|l| l.starts_with("State:\tZ"))
}

/// The one registry file under `xdg`: its holder's pid, checked to be a running holder whose
/// user namespace has this user's full subordinate map.
fn only_holder(xdg: &Path) -> i32 {
    let files = registry(xdg);
    assert_eq!(files.len(), 1, "{files:?}");
    let (name, content) = &files[0];
    assert!(name.starts_with("userns-"), "{name}");
    // Its entry: pid, start time, user namespace's device and inode.
    let fields: Vec<u64> = content
        .trim_end()
        .split(' ')
        .map(|f| f.parse().expect("a number"))
        .collect();
    let pid = i32::try_from(fields[0]).unwrap();
    assert_eq!(content, &entry_of(pid));
    assert!(is_holder(pid), "{pid} is no running holder");
    pid
}

/// Process `pid`'s start time (`/proc/<pid>/stat` field 22).
fn start_time_of(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// The registry entry naming process `pid` and its user namespace as they are (ours when its
/// own cannot be seen: another user's process).
fn entry_of(pid: i32) -> String {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata(format!("/proc/{pid}/ns/user"))
        .or_else(|_| std::fs::metadata("/proc/self/ns/user"))
        .unwrap();
    format!("{pid} {} {} {}\n", start_time_of(pid), ns.dev(), ns.ino())
}

/// Kills, when dropped (also when the test fails), the running holders registered under
/// `xdg` and those it was given.
struct Holders {
    xdg: PathBuf,
    seen: std::cell::RefCell<Vec<i32>>,
}

impl Holders {
    fn new(xdg: &Path) -> Self {
        Holders {
            xdg: xdg.to_path_buf(),
            seen: std::cell::RefCell::default(),
        }
    }

    /// Kill `pid` now if it is a holder (and remember it for the end otherwise).
    fn kill(&self, pid: i32) {
        self.seen.borrow_mut().push(pid);
        if is_holder(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        let registered = registry(&self.xdg)
            .into_iter()
            .filter_map(|(_, c)| c.trim_end().parse::<i32>().ok());
        let pids: Vec<i32> = registered.chain(self.seen.take()).collect();
        for pid in pids {
            // Only holders: a planted file may name anything (pid 1).
            if is_holder(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

#[test]
fn one_shot_runs_share_one_registered_holder() {
    let Some((start, count)) = subordinate_range().or(is_root().then_some((0, 0))) else {
        return;
    };
    let xdg = tempfile::tempdir().unwrap();
    let _holders = Holders::new(xdg.path());
    let cmd = ["/bin/cat", "/proc/self/uid_map"];
    let first = shared_run(xdg.path(), &[], &cmd);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    if is_root() {
        // Root maps its ids itself: no holder, nothing registered.
        assert_eq!(registry(xdg.path()), []);
        return;
    }
    let n = count.min(65536);
    // The sandbox nests in the held namespace: the identity over its full map.
    assert_eq!(
        map_lines(&first.stdout),
        ["0 0 1".to_string(), format!("1 1 {n}")]
    );
    let holder = only_holder(xdg.path());
    let dir = std::fs::metadata(xdg.path().join("mistry")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&dir.permissions()) & 0o7777,
        0o700
    );
    let uid = nix::unistd::geteuid();
    assert_eq!(
        map_lines(&std::fs::read(format!("/proc/{holder}/uid_map")).unwrap()),
        [format!("0 {uid} 1"), format!("1 {start} {n}")]
    );
    // It outlived the command that made it, and serves the next one.
    let second = shared_run(xdg.path(), &[], &cmd);
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    assert_eq!(map_lines(&second.stdout), map_lines(&first.stdout));
    assert_eq!(only_holder(xdg.path()), holder);
    assert!(is_holder(holder));
}

#[test]
fn a_planted_registry_file_is_not_used() {
    let Some((_, count)) = subordinate_range().or(is_root().then_some((0, 0))) else {
        return;
    };
    let xdg = tempfile::tempdir().unwrap();
    let holders = Holders::new(xdg.path());
    // Processes that are no holder of ours: a plain child, and one in a user namespace of this
    // user with another map (util-linux unshare maps only the caller).
    let mut plain = Command::new("sleep").arg("60").spawn().unwrap();
    let mut other_map = Command::new("unshare")
        .args(["--user", "--map-root-user", "sleep", "60"])
        .spawn()
        .unwrap();
    let own_ns = std::fs::read_link("/proc/self/ns/user").unwrap();
    let other_pid = other_map.id();
    wait_until("unshare to enter its user namespace", || {
        std::fs::read_link(format!("/proc/{other_pid}/ns/user")).is_ok_and(|ns| ns != own_ns)
    });
    let check = || {
        let out = shared_run(xdg.path(), &[], &["/bin/cat", "/proc/self/uid_map"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        out
    };
    if is_root() {
        // Never a holder for root: a planted file is not even read, nor replaced.
        let dir = xdg.path().join("mistry");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        std::fs::write(dir.join("userns-planted"), "1\n").unwrap();
        let planted = registry(xdg.path());
        check();
        assert_eq!(registry(xdg.path()), planted);
    } else {
        // The registry file's name comes from a first run (the digest of the map).
        check();
        let first = only_holder(xdg.path());
        let first_maps = ["uid_map", "gid_map"]
            .map(|f| std::fs::read_to_string(format!("/proc/{first}/{f}")).unwrap());
        let first_maps = (first_maps[0].clone(), first_maps[1].clone());
        holders.kill(first);
        let (name, first_entry) = registry(xdg.path()).remove(0);
        let n = count.min(65536);
        // A process of this user in a user namespace with exactly the holder's maps (as a
        // rootless container's, or another sandbox's, may be), at a pid a registered holder
        // had: never taken for it.
        let mut same_map = Command::new("unshare")
            .args(["--user", "sleep", "60"])
            .spawn()
            .unwrap();
        let same_pid = same_map.id() as i32;
        wait_until("unshare to enter its user namespace", || {
            std::fs::read_link(format!("/proc/{same_pid}/ns/user")).is_ok_and(|ns| ns != own_ns)
        });
        for (tool, lines) in [("newuidmap", &first_maps.0), ("newgidmap", &first_maps.1)] {
            let status = Command::new(tool)
                .arg(same_pid.to_string())
                .args(lines.split_whitespace())
                .status()
                .unwrap();
            assert!(status.success(), "{tool}");
        }
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{same_pid}/uid_map")).unwrap(),
            first_maps.0
        );
        let same = entry_of(same_pid);
        let fields: Vec<&str> = same.trim_end().split(' ').collect();
        let first_fields: Vec<&str> = first_entry.trim_end().split(' ').collect();
        // The dead holder (a stale entry), pid 1, a plain process, another map, and the same
        // map: under a bare pid (no entry), another start time, another namespace.
        let plants = [
            first_entry.clone(),
            entry_of(1),
            entry_of(plain.id() as i32),
            entry_of(other_pid as i32),
            format!("{same_pid}\n"),
            format!(
                "{same_pid} {} {} {}\n",
                first_fields[1], fields[2], fields[3]
            ),
            format!(
                "{same_pid} {} {} {}\n",
                fields[1], first_fields[2], first_fields[3]
            ),
        ];
        for planted in &plants {
            std::fs::write(xdg.path().join("mistry").join(&name), planted).unwrap();
            let out = check();
            assert_eq!(
                map_lines(&out.stdout),
                ["0 0 1".to_string(), format!("1 1 {n}")],
                "planted {planted}"
            );
            let new = only_holder(xdg.path());
            assert!(
                ![first, 1, plain.id() as i32, other_pid as i32, same_pid].contains(&new),
                "planted {planted}: {new} used"
            );
            assert_eq!(registry(xdg.path())[0].0, name);
            holders.kill(new);
        }
        same_map.kill().unwrap();
        same_map.wait().unwrap();
    }
    for child in [&mut plain, &mut other_map] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[test]
fn the_shared_holder_keeps_no_descriptor_of_its_caller() {
    if subordinate_range().is_none() && !is_root() {
        return;
    }
    let xdg = tempfile::tempdir().unwrap();
    let _holders = Holders::new(xdg.path());
    // As `x=$(mistryd sandbox run ... -- echo hi)`: the output ends when the command does,
    // not when a holder it left behind closes the pipe.
    let mut child = Command::new(env!("CARGO_BIN_EXE_mistryd"))
        .args(["sandbox", "run", "--rootfs"])
        .arg(rootfs())
        .args(["--", "/bin/echo", "hi"])
        .env("XDG_RUNTIME_DIR", xdg.path())
        .env("A_CALLERS_SECRET", "s3cr3t-of-the-caller")
        .env_remove("MISTRY_NO_HELD_USERNS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    std::thread::spawn(move || {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let _ = std::io::Read::read_to_end(&mut stdout, &mut out);
        let _ = std::io::Read::read_to_end(&mut stderr, &mut err);
        let _ = tx.send((out, err));
    });
    // Generous: only a descriptor kept by the holder (10 minutes) would take this long.
    let (out, err) = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the output to end with the command");
    assert!(child.wait().unwrap().success(), "{}", text(&err));
    assert_eq!(text(&out), "hi\n");
    if is_root() {
        assert_eq!(registry(xdg.path()), []);
        return;
    }
    let holder = only_holder(xdg.path());
    // Its one descriptor: the registry directory. Its own session, at /, its own name.
    let fds: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{holder}/fd"))
        .unwrap()
        .map(|e| std::fs::read_link(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(
        fds,
        [std::fs::canonicalize(xdg.path().join("mistry")).unwrap()]
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{holder}/cwd")).unwrap(),
        Path::new("/")
    );
    let stat = std::fs::read_to_string(format!("/proc/{holder}/stat")).unwrap();
    let session = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_string();
    assert_eq!(session, holder.to_string());
    let cmdline = std::fs::read(format!("/proc/{holder}/cmdline")).unwrap();
    assert!(
        cmdline.starts_with(b"mistryd: held user namespace\0"),
        "{}",
        text(&cmdline)
    );
    assert!(!text(&cmdline).contains("echo"), "{}", text(&cmdline));
    // Nor the caller's environment (its secrets), which it outlives.
    let environ = std::fs::read(format!("/proc/{holder}/environ")).unwrap();
    assert!(environ.iter().all(|b| *b == 0), "{}", text(&environ));
}

#[test]
fn a_registry_directory_open_to_others_is_refused() {
    if subordinate_range().is_none() && !is_root() {
        return;
    }
    let xdg = tempfile::tempdir().unwrap();
    let _holders = Holders::new(xdg.path());
    let dir = xdg.path().join("mistry");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let cmd = ["/bin/cat", "/proc/self/uid_map"];
    let out = shared_run(xdg.path(), &[], &cmd);
    // The run works (a private holder, rootless), and nothing is written into the directory.
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let full = map_lines(&out.stdout);
    assert_eq!(full.len(), 2, "{full:?}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    // The same directory made private is used (rootless).
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let out = shared_run(xdg.path(), &[], &cmd);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(map_lines(&out.stdout), full);
    if is_root() {
        assert_eq!(registry(xdg.path()), []);
    } else {
        only_holder(xdg.path());
    }
}

/// `mistry-sandbox` is `mistryd sandbox run` as a program of its own: the same options, output
/// and exit codes, its messages under its own name.
#[test]
fn mistry_sandbox_runs_what_mistryd_sandbox_run_runs() {
    let root = rootfs();
    let root = root.to_str().unwrap();
    let script = "echo \"$GREETING\"; id -u; wc -l < /proc/self/uid_map; echo err >&2; exit 7";
    let opts = [
        "--rootfs",
        root,
        "--env",
        "GREETING=hello",
        "--pids",
        "64",
        "--",
    ];
    let small = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mistry-sandbox"))
            .args(extra)
            .output()
            .expect("running mistry-sandbox")
    };
    let mut args = opts.to_vec();
    args.extend(["/bin/sh", "-c", script]);
    let a = small(&args);
    let mut full = vec!["sandbox", "run"];
    full.extend(&args);
    let b = mistryd(&full);
    assert_eq!(a.status.code(), Some(7), "{}", text(&a.stderr));
    assert_eq!(text(&a.stdout), text(&b.stdout));
    assert!(
        text(&a.stdout).starts_with("hello\n0\n"),
        "{}",
        text(&a.stdout)
    );
    assert_eq!(
        (text(&a.stderr), b.status.code()),
        ("err\n".to_string(), Some(7))
    );
    // A signal's death, and a program that cannot run: said under its own name.
    let mut killed = opts.to_vec();
    killed.extend(["/bin/sh", "-c", "kill -KILL $$"]);
    let k = small(&killed);
    assert_eq!(k.status.code(), Some(137));
    assert_eq!(
        text(&k.stderr),
        "mistry-sandbox: sandbox: killed by signal 9 (SIGKILL)\n"
    );
    let mut missing = opts.to_vec();
    missing.push("/no/such/program");
    let m = small(&missing);
    assert_eq!(m.status.code(), Some(127), "{}", text(&m.stderr));
    assert!(
        text(&m.stderr).starts_with("mistry-sandbox: "),
        "{}",
        text(&m.stderr)
    );
    // Usage errors as clap says them (exit 2), like mistryd's.
    let u = small(&["--rootfs", root, "--no-such-option", "--", "/bin/true"]);
    assert_eq!(u.status.code(), Some(2));
}
