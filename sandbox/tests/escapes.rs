//! Escape attempts from inside a sandbox: each must fail, and the host must be unchanged.
//! Each test has a control showing the same probe succeeds where it should, so that a test
//! cannot pass because the probe itself is broken.

mod support;

use std::net::TcpListener;
use std::os::unix::fs::symlink;
use std::process::{Command, Stdio as HostStdio};

use sandbox::{Bind, ExitStatus, NetworkMode, Policy, Seccomp, User};
use support::{fixture, run, text, Fixture};

/// Run the probe with `args` in `sandbox`; returns its one-line answer ("ok" or "err ENAME").
fn probe(sb: sandbox::Sandbox, args: &[&str]) -> String {
    let mut argv = vec!["/bin/probe"];
    argv.extend_from_slice(args);
    let out = run(sb.command(argv));
    let answer = text(&out.stdout).trim().to_string();
    assert!(
        matches!(out.status, ExitStatus::Exited(0 | 1)),
        "probe {args:?}: {:?} {}",
        out.status,
        text(&out.stderr)
    );
    answer
}

fn probe_default(f: &Fixture, args: &[&str]) -> String {
    probe(f.sandbox(), args)
}

/// Nested user namespaces allowed and no seccomp filter: what the kernel itself refuses inside
/// a nested namespace, with nothing else in the way.
fn nested_allowed() -> Policy {
    Policy {
        seccomp: Seccomp::Unconfined,
        nested_user_namespaces: true,
        ..Policy::default()
    }
}

#[test]
fn host_files_outside_the_rootfs_cannot_be_read() {
    let f = fixture();
    let secret_dir = f.host_dir("secret");
    let secret = secret_dir.join("key");
    std::fs::write(&secret, "top secret").unwrap();
    let secret = secret.to_str().unwrap().to_string();
    // Control: the probe reads a file that is inside.
    assert_eq!(probe_default(&f, &["read", "/etc/passwd"]), "ok");
    assert_eq!(probe_default(&f, &["read", &secret]), "err ENOENT");
    let dotdot = format!("/../../../../..{secret}");
    assert_eq!(probe_default(&f, &["read", &dotdot]), "err ENOENT");
    let via_init = probe_default(&f, &["read", &format!("/proc/1/root{secret}")]);
    assert!(
        via_init == "err ENOENT" || via_init == "err EACCES",
        "{via_init}"
    );
    // A symlink in the image pointing at the host path resolves inside the sandbox.
    symlink(&secret, f.rootfs.join("etc/evil")).unwrap();
    assert_eq!(probe_default(&f, &["read", "/etc/evil"]), "err ENOENT");
    // The host's root directory is nowhere to be seen: / holds exactly the rootfs' entries.
    let out = f.sh("ls /");
    let mut expected: Vec<String> = std::fs::read_dir(&f.rootfs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    expected.sort();
    assert_eq!(text(&out.stdout).lines().collect::<Vec<_>>(), expected);
    // The old root is detached: exactly one mount sits at /, and no mount of the sandbox comes
    // from the host's root filesystem other than the rootfs itself and the explicit binds.
    let out = f.sh("awk '$5 == \"/\"' /proc/self/mountinfo | wc -l");
    assert_eq!(text(&out.stdout), "1\n");
}

#[test]
fn a_symlink_in_the_image_cannot_redirect_a_mount_to_the_host() {
    let f = fixture();
    let target = f.host_dir("host-target");
    let src = f.host_dir("src");
    // /link in the image points at a host directory path.
    symlink(&target, f.rootfs.join("link")).unwrap();
    let out = run(f.sandbox().bind(Bind::new(&src, "/link/sub")).command([
        "/bin/sh",
        "-c",
        "touch /link/sub/made; echo rc=$?",
    ]));
    assert_eq!(text(&out.stdout), "rc=0\n", "{}", text(&out.stderr));
    // The mount point was created inside the rootfs, never in the host directory.
    assert!(!target.join("sub").exists());
    assert!(f
        .rootfs
        .join(target.strip_prefix("/").unwrap())
        .join("sub")
        .is_dir());
    assert!(src.join("made").exists());
}

#[test]
fn a_hostile_passwd_symlink_reads_the_images_own_files() {
    let f = fixture();
    let fake = f.dir.path().join("fake-passwd");
    std::fs::write(&fake, "evil:x:4242:4242::/:/bin/sh\n").unwrap();
    std::fs::remove_file(f.rootfs.join("etc/passwd")).unwrap();
    symlink(&fake, f.rootfs.join("etc/passwd")).unwrap();
    let err = f
        .sandbox()
        .user(User::Spec("evil".into()))
        .command(["/bin/true"])
        .output()
        .unwrap_err();
    assert!(err.to_string().contains("no user \"evil\""), "{err}");
}

#[test]
fn read_only_binds_cannot_be_written_or_remounted() {
    let f = fixture();
    let ro = f.host_dir("ro");
    std::fs::write(ro.join("file"), "original").unwrap();
    let sb = || f.sandbox().bind(Bind::new(&ro, "/ro").read_only());
    assert_eq!(probe(sb(), &["write", "/ro/file", "changed"]), "err EROFS");
    // No CAP_SYS_ADMIN: no remount, no unmount, no new proc.
    assert_eq!(probe(sb(), &["remount-rw", "/ro"]), "err EPERM");
    assert_eq!(probe(sb(), &["umount", "/ro"]), "err EPERM");
    // By default no nested user namespace can be made at all.
    assert_eq!(probe(sb(), &["nested", "remount-rw", "/ro"]), "err EPERM");
    // Where allowed, it gives capabilities back, but the mounts are locked there.
    let nested = || sb().policy(nested_allowed());
    assert_eq!(
        probe(nested(), &["nested", "remount-rw", "/ro"]),
        "err EPERM"
    );
    assert_eq!(probe(nested(), &["nested", "umount", "/ro"]), "err EINVAL");
    assert_eq!(
        std::fs::read_to_string(ro.join("file")).unwrap(),
        "original"
    );
    // Control: the same write works on a read-write bind.
    let rw = f.host_dir("rw");
    std::fs::write(rw.join("file"), "original").unwrap();
    let out = probe(
        f.sandbox().bind(Bind::new(&rw, "/rw")),
        &["write", "/rw/file", "changed"],
    );
    assert_eq!(out, "ok");
    assert_eq!(std::fs::read_to_string(rw.join("file")).unwrap(), "changed");
}

#[test]
fn host_processes_can_be_neither_seen_nor_signalled_nor_traced() {
    let f = fixture();
    let mut host = Command::new("sleep")
        .arg("30")
        .stdout(HostStdio::null())
        .spawn()
        .unwrap();
    let pid = host.id().to_string();
    // Only the sandbox's own processes are visible.
    let out = f.sh("ls -d /proc/[0-9]* | wc -l");
    let visible: usize = text(&out.stdout).trim().parse().unwrap();
    assert!(visible <= 4, "{visible} processes visible");
    assert_eq!(probe_default(&f, &["kill", &pid, "9"]), "err ESRCH");
    assert_eq!(probe_default(&f, &["ptrace", &pid]), "err ESRCH");
    // Control: the probe can signal a process of its own sandbox (itself, pid 2).
    assert_eq!(probe_default(&f, &["kill", "2", "0"]), "ok");
    assert!(
        host.try_wait().unwrap().is_none(),
        "the host process was killed"
    );
    host.kill().unwrap();
    let _ = host.wait();
}

#[test]
fn network_none_cannot_reach_the_hosts_loopback() {
    let f = fixture();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    assert_eq!(
        probe_default(&f, &["connect", "127.0.0.1", &port]),
        "err ECONNREFUSED"
    );
    assert!(listener.accept().is_err(), "the host server was reached");
    // Control: with the host network the same connect succeeds.
    let out = probe(
        f.sandbox().network(NetworkMode::Host),
        &["connect", "127.0.0.1", &port],
    );
    assert_eq!(out, "ok");
}

#[test]
fn the_hosts_proc_cannot_be_mounted() {
    let f = fixture();
    assert_eq!(probe_default(&f, &["mount-proc", "/tmp"]), "err EPERM");
    // Nested user namespace (where allowed): capabilities there, but it does not own our PID
    // namespace.
    assert_eq!(
        probe(
            f.sandbox().policy(nested_allowed()),
            &["nested", "mount-proc", "/tmp"]
        ),
        "err EPERM"
    );
    // Control: the nested namespace itself is made (no id map yet: the overflow ids).
    assert_eq!(
        probe(f.sandbox().policy(nested_allowed()), &["nested", "ids"]),
        "65534 65534 65534 65534"
    );
}

#[test]
fn setuid_binaries_give_no_privilege() {
    let f = fixture();
    // /bin/probe-suid is setuid root (root of the sandbox). no_new_privs ignores the bit.
    let out = run(f
        .sandbox()
        .user(User::Spec("builder".into()))
        .command(["/bin/probe-suid", "ids"]));
    assert_eq!(
        text(&out.stdout),
        "1000 1000 1000 1000\n",
        "{}",
        text(&out.stderr)
    );
    let mode = std::fs::metadata(f.rootfs.join("bin/probe-suid")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o4000,
        0o4000
    );
}

#[test]
fn proc_sys_and_sys_are_read_only() {
    let f = fixture();
    let before = std::fs::read_to_string("/proc/sys/kernel/panic_on_oops").unwrap();
    assert_eq!(
        probe_default(&f, &["write", "/proc/sys/kernel/panic_on_oops", "1"]),
        "err EROFS"
    );
    if std::path::Path::new("/proc/sysrq-trigger").exists() {
        assert_eq!(
            probe_default(&f, &["write", "/proc/sysrq-trigger", "h"]),
            "err EROFS"
        );
    }
    assert_eq!(
        probe_default(
            &f,
            &[
                "write",
                "/sys/kernel/mm/transparent_hugepage/enabled",
                "never"
            ]
        ),
        "err EROFS"
    );
    let host_net = probe(
        f.sandbox().network(NetworkMode::Host),
        &[
            "write",
            "/sys/kernel/mm/transparent_hugepage/enabled",
            "never",
        ],
    );
    assert_eq!(host_net, "err EROFS");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/panic_on_oops").unwrap(),
        before
    );
}

#[test]
fn the_hosts_hostname_cannot_be_changed() {
    let f = fixture();
    let before = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(probe_default(&f, &["sethostname", "evil"]), "err EPERM");
    let out = f.sh("hostname evil 2>&1; hostname");
    assert!(
        text(&out.stdout).ends_with("mistry\n"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        before
    );
}

#[test]
fn nothing_outlives_the_sandbox_even_a_setsid_daemon() {
    let f = fixture();
    let marker = support::unique_marker();
    let out = f.sh(&format!(
        "setsid sh -c 'setsid sleep {marker} & sleep {marker}' & exit 0"
    ));
    assert_eq!(out.status, ExitStatus::Exited(0));
    assert_eq!(support::host_processes_with(&marker), Vec::<i32>::new());
}
