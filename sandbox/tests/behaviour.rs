//! What a job sees and how its end is reported. Runs as root and as an unprivileged user
//! (scripts/test.sh does both).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use sandbox::{
    Bind, CgroupLimits, Error, ExitStatus, IdMapping, NetworkMode, Rlimit, Sandbox, Stdio, User,
};
use support::{fixture, fixture_in, host_processes_with, run, text, unique_marker};

fn require_full_map() {
    assert!(
        support::has_full_map(),
        "this test needs a subordinate id range for the calling user in /etc/subuid and \
         /etc/subgid (scripts/setup.sh adds them)"
    );
}

#[test]
fn exit_codes_are_reported_exactly() {
    let f = fixture();
    assert_eq!(f.sh("exit 77").status, ExitStatus::Exited(77));
    assert_eq!(f.sh("true").status, ExitStatus::Exited(0));
    assert_eq!(f.sh("exit 255").status, ExitStatus::Exited(255));
    assert!(f.sh("true").status.success());
}

#[test]
fn death_by_signal_is_reported_as_such() {
    let f = fixture();
    let out = f.sh("kill -TERM $$");
    assert_eq!(out.status, ExitStatus::Signaled(libc::SIGTERM));
    assert_eq!(out.status.to_string(), "killed by signal 15 (SIGTERM)");
    assert_eq!(f.sh("kill -9 $$").status, ExitStatus::Signaled(9));
    assert_eq!(f.sh("kill -SEGV $$").status.signal(), Some(libc::SIGSEGV));
}

#[test]
fn environment_is_exactly_what_was_given() {
    let f = fixture();
    std::env::set_var("MISTRY_HOST_ONLY", "leak");
    let out = run(f
        .sandbox()
        .env("GREETING", "hello world")
        .env("EMPTY", "")
        .command(["env"]));
    let mut vars: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    vars.sort();
    assert_eq!(
        vars,
        [
            "EMPTY=",
            "GREETING=hello world",
            "HOME=/root",
            "HOSTNAME=mistry",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        ]
    );
    // A PATH of our own is used to find the program.
    let out = run(f.sandbox().env("PATH", "/sbin").command(["ifconfig", "-a"]));
    assert_eq!(out.status, ExitStatus::Exited(0), "{}", text(&out.stderr));
}

#[test]
fn working_directory() {
    let f = fixture();
    let out = run(f.sandbox().cwd("/home/builder").command(["/bin/pwd"]));
    assert_eq!(text(&out.stdout), "/home/builder\n");
    let err = f
        .sandbox()
        .cwd("/nope")
        .command(["/bin/pwd"])
        .output()
        .unwrap_err();
    assert_eq!(err.to_string(), "chdir /nope: no such file or directory");
}

#[test]
fn user_switch_by_name_and_ids() {
    require_full_map();
    let f = fixture();
    let ids = |user: User| {
        let out = run(f.sandbox().user(user).command(["/bin/probe", "ids"]));
        assert_eq!(out.status, ExitStatus::Exited(0), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    assert_eq!(ids(User::Root), "0 0 0 0");
    assert_eq!(ids(User::Spec("builder".into())), "1000 1000 1000 1000");
    assert_eq!(ids(User::Spec("1234:4321".into())), "1234 1234 4321 4321");
    assert_eq!(
        ids(User::Id {
            uid: 65534,
            gid: 65534
        }),
        "65534 65534 65534 65534"
    );
    // HOME follows the user.
    let out = run(f.sandbox().user(User::Spec("builder".into())).command([
        "/bin/sh",
        "-c",
        "echo $HOME; id -un",
    ]));
    assert_eq!(text(&out.stdout), "/home/builder\nbuilder\n");
    let err = f
        .sandbox()
        .user(User::Spec("nosuchuser".into()))
        .command(["/bin/true"])
        .output()
        .unwrap_err();
    assert!(matches!(err, Error::User { .. }), "{err}");
}

#[test]
fn single_id_map_has_only_root() {
    let f = fixture();
    let out = run(f
        .sandbox()
        .id_mapping(IdMapping::Single)
        .command(["/bin/cat", "/proc/self/uid_map"]));
    let uid = nix::unistd::geteuid().as_raw();
    let fields: Vec<String> = text(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(fields, ["0", &uid.to_string(), "1"]);
    let err = f
        .sandbox()
        .id_mapping(IdMapping::Single)
        .user(User::Spec("builder".into()))
        .command(["/bin/true"])
        .output()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("uid 1000 / gid 1000 is not mapped in the sandbox (ids 0..=0 are)"),
        "{err}"
    );
}

#[test]
fn full_map_covers_65536_ids() {
    require_full_map();
    let f = fixture();
    let out = f.sh("cat /proc/self/uid_map /proc/self/gid_map");
    let lines: Vec<Vec<String>> = text(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    let uid = nix::unistd::geteuid().as_raw().to_string();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[0], ["0", uid.as_str(), "1"]);
    assert_eq!(lines[1][0], "1");
    assert_eq!(lines[1][2], "65536");
}

#[test]
fn binds_read_write_and_read_only_in_order() {
    let f = fixture();
    let rw = f.host_dir("rw");
    let ro = f.host_dir("ro");
    std::fs::write(ro.join("kept"), "original").unwrap();
    let out = run(f
        .sandbox()
        .bind(Bind::new(&rw, "/data"))
        .bind(Bind::new(&ro, "/data/inputs").read_only())
        .command([
            "/bin/sh",
            "-c",
            "echo written > /data/out && cat /data/inputs/kept && \
                 (echo changed > /data/inputs/kept) 2>&1; echo rc=$?",
        ]));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("original"), "{stdout}");
    assert!(stdout.contains("Read-only file system"), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("rc=1") || stdout.trim_end().ends_with("rc=2"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("out")).unwrap(),
        "written\n"
    );
    assert_eq!(
        std::fs::read_to_string(ro.join("kept")).unwrap(),
        "original"
    );
    // What sandbox root writes belongs to the caller on the host.
    let meta = std::fs::metadata(rw.join("out")).unwrap();
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
    assert_eq!(meta.gid(), nix::unistd::getegid().as_raw());
}

#[test]
fn file_bind_and_missing_source() {
    let f = fixture();
    let file = f.dir.path().join("config.txt");
    std::fs::write(&file, "cfg\n").unwrap();
    let out = run(f
        .sandbox()
        .bind(Bind::new(&file, "/etc/app/config.txt").read_only())
        .command(["/bin/cat", "/etc/app/config.txt"]));
    assert_eq!(text(&out.stdout), "cfg\n");
    let err = f
        .sandbox()
        .bind(Bind::new(f.dir.path().join("absent"), "/x"))
        .command(["/bin/true"])
        .output()
        .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("absent: no such file or directory"),
        "{err}"
    );
    let err = f
        .sandbox()
        .bind(Bind::new(&file, "relative"))
        .command(["/bin/true"])
        .output()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "bind destination must be an absolute path: relative"
    );
}

/// A bind of a directory the caller opened and checked (`Bind::from_fd`) binds that very
/// directory, and nothing else: a source swapped for a symlink after the check is refused.
#[test]
fn a_checked_bind_refuses_a_source_swapped_for_a_link() {
    use std::os::fd::OwnedFd;
    let f = fixture();
    let checked = f.host_dir("checked");
    std::fs::write(checked.join("mark"), "checked\n").unwrap();
    let other = f.host_dir("other");
    std::fs::write(other.join("mark"), "other\n").unwrap();
    let open = |p: &std::path::Path| -> OwnedFd {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(p)
            .unwrap()
            .into()
    };
    let out = run(f
        .sandbox()
        .bind(Bind::from_fd(open(&checked), &checked, "/data").read_only())
        .command(["/bin/cat", "/data/mark"]));
    assert_eq!(text(&out.stdout), "checked\n");
    // Checked, then swapped for a link to another directory before the sandbox starts.
    let fd = open(&checked);
    std::fs::rename(&checked, f.dir.path().join("moved")).unwrap();
    std::os::unix::fs::symlink(&other, &checked).unwrap();
    let err = f
        .sandbox()
        .bind(Bind::from_fd(fd, &checked, "/data"))
        .command(["/bin/cat", "/data/mark"])
        .output()
        .unwrap_err();
    assert!(matches!(err, Error::Bind { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("it is not the directory that was checked"),
        "{err}"
    );
}

#[test]
fn hostname_is_the_sandboxes_own() {
    let f = fixture();
    assert_eq!(text(&f.sh("hostname").stdout), "mistry\n");
    let out = run(f.sandbox().hostname("builder-7").command(["/bin/hostname"]));
    assert_eq!(text(&out.stdout), "builder-7\n");
}

#[test]
fn stdout_and_stderr_are_kept_apart() {
    let f = fixture();
    let out = f.sh("echo out1; echo err1 >&2; echo out2; echo err2 >&2");
    assert_eq!(text(&out.stdout), "out1\nout2\n");
    assert_eq!(text(&out.stderr), "err1\nerr2\n");
}

#[test]
fn stdin_can_be_piped() {
    let f = fixture();
    let mut child = f
        .sandbox()
        .stdin(Stdio::Piped)
        .stdout(Stdio::Piped)
        .command(["tr", "a-z", "A-Z"])
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "HELLO\n");
}

#[test]
fn timeout_kills_the_whole_tree_including_a_double_forked_daemon() {
    let f = fixture();
    let marker = unique_marker();
    let started = Instant::now();
    let out = run(f.sandbox().timeout(Duration::from_millis(800)).command([
        "/bin/sh",
        "-c",
        &format!("setsid sh -c 'sleep {marker} & sleep {marker}' & sleep {marker}"),
    ]));
    assert_eq!(out.status, ExitStatus::TimedOut(Duration::from_millis(800)));
    assert_eq!(out.status.to_string(), "timed out after 800ms");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(host_processes_with(&marker), Vec::<i32>::new());
}

#[test]
fn nothing_is_left_running_after_the_job() {
    let f = fixture();
    let marker = unique_marker();
    // The job starts a daemon (double fork, own session) and exits at once.
    let out = f.sh(&format!(
        "setsid sh -c 'sleep {marker} &' ; sleep 0.2; echo done"
    ));
    assert_eq!(out.status, ExitStatus::Exited(0));
    assert_eq!(text(&out.stdout), "done\n");
    assert_eq!(host_processes_with(&marker), Vec::<i32>::new());
}

#[test]
fn orphans_are_reaped_by_init() {
    let f = fixture();
    // Three orphans exit while the job lives on; none may stay a zombie.
    let out = f.sh("for i in 1 2 3; do (sleep 0.05 &) ; done; sleep 0.5; \
         for s in /proc/[0-9]*/stat; do cat $s; echo; done");
    let states: Vec<char> = text(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next())
        })
        .collect();
    assert!(!states.is_empty(), "{}", text(&out.stdout));
    assert!(!states.contains(&'Z'), "zombies: {}", text(&out.stdout));
}

#[test]
fn init_is_pid_1_and_the_job_pid_2() {
    let f = fixture();
    assert_eq!(
        text(&f.sh("echo $$; cat /proc/1/status | grep ^PPid").stdout),
        "2\nPPid:\t0\n"
    );
}

#[test]
fn signals_are_forwarded_to_the_job() {
    let f = fixture();
    let mut child = f
        .sandbox()
        .stdout(Stdio::Piped)
        .command([
            "/bin/sh",
            "-c",
            "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.05; done",
        ])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    child.signal(libc::SIGTERM).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "got-term");
    assert_eq!(child.wait().unwrap(), ExitStatus::Exited(3));
}

#[test]
fn kill_ends_everything() {
    let f = fixture();
    let marker = unique_marker();
    let mut child = f
        .sandbox()
        .command(["/bin/sh", "-c", &format!("sleep {marker} & sleep {marker}")])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(host_processes_with(&marker).len(), 2);
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap(), ExitStatus::Killed);
    assert_eq!(host_processes_with(&marker), Vec::<i32>::new());
}

#[test]
fn missing_executable_and_rootfs_are_clear_errors() {
    let f = fixture();
    let err = f.sandbox().command(["/usr/bin/foo"]).output().unwrap_err();
    assert_eq!(
        err.to_string(),
        "exec /usr/bin/foo: no such file or directory"
    );
    let err = f.sandbox().command(["foo", "--bar"]).output().unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"exec: "foo": executable file not found in $PATH"#
    );
    let err = f.sandbox().command(["/etc/passwd"]).output().unwrap_err();
    assert_eq!(err.to_string(), "exec /etc/passwd: permission denied");
    let err = Sandbox::new(f.dir.path().join("nope"))
        .command(["/bin/true"])
        .output()
        .unwrap_err();
    assert!(matches!(err, Error::Rootfs { .. }));
    assert!(
        err.to_string()
            .ends_with("/nope: no such file or directory"),
        "{err}"
    );
    let err = f.sandbox().output().unwrap_err();
    assert_eq!(err.to_string(), "no command given");
}

#[test]
fn network_none_has_only_loopback_and_it_is_up() {
    let f = fixture();
    let out = f.sh("ls /sys/class/net; cat /sys/class/net/lo/flags");
    // IFF_UP (0x1) is set on lo.
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("lo"));
    let flags = u32::from_str_radix(lines.next().unwrap().trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "{stdout}");
    // A server on the sandbox's own loopback is reachable from inside.
    let out = f.sh("nc -l -p 8080 -e echo pong & sleep 0.2; echo ping | nc 127.0.0.1 8080");
    assert_eq!(text(&out.stdout), "pong\n", "{}", text(&out.stderr));
}

#[test]
fn host_network_shares_interfaces_and_resolv_conf() {
    let f = fixture();
    let out = run(f.sandbox().network(NetworkMode::Host).command([
        "/bin/sh",
        "-c",
        "ls /sys/class/net; echo ---; cat /etc/resolv.conf",
    ]));
    let stdout = text(&out.stdout);
    let (ifaces, resolv) = stdout.split_once("---\n").unwrap();
    let mut host: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    host.sort();
    let mut inside: Vec<&str> = ifaces.lines().collect();
    inside.sort();
    assert_eq!(inside, host);
    assert_eq!(
        resolv,
        std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
    );
}

#[test]
fn read_only_root_with_writable_tmpfs_tmp() {
    let f = fixture();
    let out = run(f.sandbox().read_only_root(true).tmpfs_tmp(true).command([
        "/bin/sh",
        "-c",
        "touch /newfile 2>&1; echo rc=$?; echo x > /tmp/ok && cat /tmp/ok; echo y > /dev/shm/z && cat /dev/shm/z",
    ]));
    assert_eq!(
        text(&out.stdout),
        "touch: /newfile: Read-only file system\nrc=1\nx\ny\n"
    );
    assert!(!f.rootfs.join("newfile").exists());
    assert!(!f.rootfs.join("tmp/ok").exists());
}

#[test]
fn minimal_dev() {
    let f = fixture();
    let out = f.sh(
        "ls /dev | tr '\\n' ' '; echo; echo x > /dev/null && head -c 5 /dev/zero | wc -c; \
         head -c 7 /dev/urandom | wc -c; readlink /dev/stdout; readlink /dev/fd; echo x > /dev/full",
    );
    assert_eq!(
        text(&out.stdout),
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero \n5\n7\n/proc/self/fd/1\n/proc/self/fd\n"
    );
    assert!(
        text(&out.stderr).contains("No space left on device"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn rlimits_apply() {
    let f = fixture();
    let out = run(f
        .sandbox()
        .rlimit("nofile=64:128".parse::<Rlimit>().unwrap())
        .rlimit("core=0".parse::<Rlimit>().unwrap())
        .command(["/bin/sh", "-c", "ulimit -n; ulimit -Hn; ulimit -c"]));
    assert_eq!(text(&out.stdout), "64\n128\n0\n");
}

#[test]
fn cgroup_limits_apply_or_are_skipped_with_a_reason() {
    let f = fixture();
    let child = f
        .sandbox()
        .cgroup_limits(CgroupLimits {
            memory_max: Some(256 << 20),
            pids_max: Some(64),
            cpus: None,
        })
        .command(["/bin/sh", "-c", "cat /proc/self/cgroup"])
        .stdout(Stdio::Piped)
        .spawn()
        .unwrap();
    let notes = child.notes().to_vec();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status, ExitStatus::Exited(0));
    match notes
        .iter()
        .find(|n| n.starts_with("cgroup limits skipped: "))
    {
        // Hosts that do not delegate (this CI's hybrid layout) run the job without limits.
        Some(note) => assert!(note.len() > "cgroup limits skipped: ".len()),
        // Where delegated, the job lives in its own cgroup (the root of its cgroup namespace).
        None => assert_eq!(text(&out.stdout).trim_end(), "0::/"),
    }
}

#[test]
fn capabilities_are_dockers_default_set_and_no_new_privs() {
    let f = fixture();
    let status = |user: User| {
        let out = run(f
            .sandbox()
            .user(user)
            .command(["/bin/cat", "/proc/self/status"]));
        text(&out.stdout)
    };
    let field = |s: &str, name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap()
    };
    let root = status(User::Root);
    // CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE NET_RAW
    // SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP
    assert_eq!(field(&root, "CapBnd:"), "00000000a80425fb");
    assert_eq!(field(&root, "CapEff:"), "00000000a80425fb");
    assert_eq!(field(&root, "NoNewPrivs:"), "1");
    if support::has_full_map() {
        let builder = status(User::Spec("builder".into()));
        assert_eq!(field(&builder, "CapEff:"), "0000000000000000");
        assert_eq!(field(&builder, "CapBnd:"), "00000000a80425fb");
    }
}

/// `/bin/sh -c script` on an overlay root: `f`'s rootfs under a new upper directory; its output
/// and the upper directory.
fn run_on_overlay(f: &support::Fixture, script: &str) -> (sandbox::Output, std::path::PathBuf) {
    let upper = f.host_dir("upper");
    let work = f.host_dir("work");
    let out = run(Sandbox::new_overlay(vec![f.rootfs.clone()], &upper, &work)
        .command(["/bin/sh", "-c", script]));
    (out, upper)
}

/// Layers under `/dev` (a store in `/dev/shm`): the sandbox stages its overlay layers on a
/// tmpfs over its own `/dev`, so it must have grabbed them before.
#[test]
fn an_overlay_root_may_have_its_layers_under_dev() {
    let f = fixture_in(std::path::Path::new("/dev/shm"));
    let (out, upper) = run_on_overlay(&f, "echo new > /etc/added && head -1 /etc/passwd");
    assert_eq!(out.status, ExitStatus::Exited(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "root:x:0:0:root:/root:/bin/sh\n");
    assert_eq!(
        std::fs::read_to_string(upper.join("etc/added")).unwrap(),
        "new\n"
    );
    assert!(!f.rootfs.join("etc/added").exists());
}

#[test]
fn ipc_and_uts_are_private() {
    let f = fixture();
    let host_ipc = std::fs::read_link("/proc/self/ns/ipc").unwrap();
    let host_uts = std::fs::read_link("/proc/self/ns/uts").unwrap();
    let out = f.sh("for n in ipc uts cgroup; do readlink /proc/self/ns/$n; done");
    let stdout = text(&out.stdout);
    let inside: Vec<&str> = stdout.lines().collect();
    assert_eq!(inside.len(), 3);
    assert_ne!(inside[0], host_ipc.to_string_lossy());
    assert_ne!(inside[1], host_uts.to_string_lossy());
}

#[test]
fn overlay_root_keeps_the_lower_layer_untouched() {
    let f = fixture();
    let (out, upper) = run_on_overlay(
        &f,
        "echo new > /etc/added && rm /etc/hostname && cat /etc/passwd | head -1 && ls /etc/hostname 2>&1",
    );
    assert_eq!(out.status, ExitStatus::Exited(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "root:x:0:0:root:/root:/bin/sh\nls: /etc/hostname: No such file or directory\n"
    );
    // The lower layer is unchanged; the change is in the upper directory.
    assert!(f.rootfs.join("etc/hostname").exists());
    assert!(!f.rootfs.join("etc/added").exists());
    assert_eq!(
        std::fs::read_to_string(upper.join("etc/added")).unwrap(),
        "new\n"
    );
}

/// Once its job runs, the sandbox's init no longer maps its copy of the caller's memory: a
/// large heap of the caller's is not shared copy-on-write with init for the job's whole life
/// (each page the caller wrote meanwhile was copied, and each copy interrupted the other CPUs).
#[test]
fn init_gives_back_its_copy_of_the_callers_memory() {
    let f = fixture();
    // 256 MiB of the caller's heap, every page written.
    let heap = vec![1u8; 256 << 20];
    let mut child = f.sandbox().command(["sleep", "30"]).spawn().expect("spawn");
    let rss_anon_kib = || -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("init's status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("RssAnon")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut rss = rss_anon_kib();
    while rss >= 64 << 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        rss = rss_anon_kib();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        rss < 64 << 10,
        "init still maps {rss} KiB of anonymous memory (the caller's heap is {} KiB)",
        heap.len() >> 10
    );
    assert_eq!(std::hint::black_box(&heap)[heap.len() - 1], 1);
}

/// A job signalling its init with what the caller had handlers for (Rust's SIGSEGV and SIGBUS
/// handlers run on an alternate stack of the caller's memory, which init gives back): init has
/// no handler left, so the signals are not delivered, and the job's end is reported as is.
#[test]
fn a_job_cannot_kill_its_init_with_the_callers_signal_handlers() {
    let f = fixture();
    let out =
        f.sh("sleep 0.2; kill -SEGV 1; kill -BUS 1; kill -ILL 1; sleep 0.2; echo alive; exit 5");
    assert_eq!(text(&out.stdout), "alive\n", "{:?}", out.status);
    assert_eq!(out.status, ExitStatus::Exited(5));
}

/// Jobs that end at once, many times (with a timeout, so a lost end shows as one): init never
/// misses its job's end, however soon after its start it comes.
#[test]
fn jobs_that_end_at_once_are_always_reaped() {
    let f = fixture();
    for i in 0..150 {
        let out = run(f
            .sandbox()
            .timeout(Duration::from_secs(10))
            .command(["/bin/sh", "-c", "exit 3"]));
        assert_eq!(out.status, ExitStatus::Exited(3), "run {i}");
    }
}

/// A FIFO the image put where a file is bound (a hostile image: `RUN mkfifo /etc/hosts`) does
/// not hold the sandbox's start for ever: the file is bound over it and the job reads the file.
#[test]
fn a_fifo_at_a_files_mount_point_does_not_block_the_start() {
    let f = fixture();
    let fifo = f.rootfs.join("etc/from-host");
    let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0, "mkfifo");
    let host = f.dir.path().join("from-host");
    std::fs::write(&host, "bound\n").expect("host file");
    let sandbox = f
        .sandbox()
        .bind(Bind::new(&host, "/etc/from-host").read_only())
        .command(["cat", "/etc/from-host"]);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(sandbox.output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the sandbox's start still waits on the FIFO after 30 s")
        .expect("the sandbox runs");
    assert_eq!(text(&out.stdout), "bound\n", "{}", text(&out.stderr));
    assert_eq!(out.status, ExitStatus::Exited(0));
}

/// A file written for a job (a heredoc's script) and executed right after: a sandbox another
/// thread starts meanwhile must not keep a descriptor of it open for writing, or the exec
/// fails with "Text file busy" (ETXTBSY) in a build that has nothing to do with that sandbox.
#[test]
fn a_script_written_while_other_sandboxes_start_runs_at_once() {
    let f = fixture();
    let dir = f.host_dir("scripts");
    // A long script: its write takes long enough for a start elsewhere to fall within it.
    let mut script = b"#!/bin/sh\necho ran\nexit 0\n".to_vec();
    script.extend(std::iter::repeat_n(b"# padding\n", 50_000).flatten());
    let stop = std::sync::atomic::AtomicBool::new(false);
    // The starters stop however this thread leaves the scope (a panic too: the scope waits).
    struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    assert_eq!(f.sh("true").status, ExitStatus::Exited(0));
                }
            });
        }
        let _stop = Stop(&stop);
        let mut failures = Vec::new();
        for i in 0..40 {
            let file = dir.join(format!("script-{i}"));
            if let Err(e) = sandbox::write_executable(&file, &script) {
                failures.push(format!("{i}: writing the script: {e}"));
                break;
            }
            let out = f
                .sandbox()
                .bind(Bind::new(&file, "/run-me").read_only())
                .command(["/run-me"])
                .output();
            match out {
                Ok(o)
                    if (o.status, text(&o.stdout).as_str()) == (ExitStatus::Exited(0), "ran\n") => {
                }
                Ok(o) => failures.push(format!("{i}: {}: {}", o.status, text(&o.stderr))),
                Err(e) => failures.push(format!("{i}: {e}")),
            }
        }
        drop(_stop);
        assert!(failures.is_empty(), "{failures:#?}");
    });
}
