//! Held user namespaces (`sandbox::set_held_user_namespaces`): the subordinate map is written
//! once, into a holder's namespace, and every sandbox nests its own user namespace inside it.
//! A process-wide switch, so a test binary of its own. Holders serve unprivileged callers (root
//! writes its maps directly): as root these tests check that no holder is made.

mod support;

use std::os::unix::fs::MetadataExt;

use sandbox::{Bind, ExitStatus, IdMapping, Sandbox};
use support::{fixture, is_root, run, text};

fn auto_map() -> sandbox::IdMap {
    sandbox::try_choose_id_map(IdMapping::Auto).unwrap().0
}

/// The tests look at and kill the one holder: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Subordinate ids are needed (rootless holders map them); without them the test is skipped,
/// failing under CI.
fn prerequisites() -> bool {
    sandbox::set_held_user_namespaces(true);
    support::full_map_or_skip()
}

#[test]
fn sandboxes_nest_in_one_held_namespace_with_the_full_range_of_ids() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !prerequisites() {
        return;
    }
    let f = fixture();
    let data = f.host_dir("data");
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = run(f.sandbox().bind(Bind::new(&data, "/data")).command([
        "/bin/sh",
        "-c",
        "cat /proc/self/uid_map; id -u; touch /data/by-root; \
         chown 65536:65536 /data/by-root; touch /data/mid && chown 1000:1000 /data/mid",
    ]));
    assert_eq!(out.status, ExitStatus::Exited(0), "{}", text(&out.stderr));
    let (subuid_start, uid) = match auto_map() {
        sandbox::IdMap::Full { subuid, uid, .. } => (subuid.start, uid),
        other => panic!("expected a full map, got {other:?}"),
    };
    let lines: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    if is_root() {
        // Root maps directly: the sandbox's map is onto host ids, and no holder runs.
        assert_eq!(lines[0], format!("0 {uid} 1"));
        assert_eq!(sandbox::held_user_namespace_pid(&auto_map()), None);
    } else {
        // Nested: the identity over the held namespace's ids, extent by extent.
        assert_eq!(lines[..2], ["0 0 1", "1 1 65536"], "{lines:?}");
        assert!(sandbox::held_user_namespace_pid(&auto_map()).is_some());
    }
    assert_eq!(lines[2], "0");
    // On the host, the ids land where the held map sends them: root is the caller, n > 0 is
    // subordinate id n - 1.
    let meta = std::fs::metadata(data.join("by-root")).unwrap();
    assert_eq!(meta.uid(), subuid_start + 65535);
    assert_eq!(
        std::fs::metadata(data.join("mid")).unwrap().uid(),
        subuid_start + 999
    );
}

#[test]
fn many_concurrent_sandboxes_share_one_holder() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !prerequisites() || is_root() {
        return;
    }
    let f = fixture();
    // One start makes the holder.
    let out = f.sh("true");
    assert_eq!(out.status, ExitStatus::Exited(0), "{}", text(&out.stderr));
    let holder = sandbox::held_user_namespace_pid(&auto_map()).expect("a holder");
    let rootfs = f.rootfs.clone();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let rootfs = rootfs.clone();
            std::thread::spawn(move || {
                let out = run(Sandbox::new(&rootfs).command([
                    "/bin/sh",
                    "-c",
                    &format!("echo {i}; id -u"),
                ]));
                assert_eq!(out.status, ExitStatus::Exited(0), "{}", text(&out.stderr));
                assert_eq!(text(&out.stdout), format!("{i}\n0\n"));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        sandbox::held_user_namespace_pid(&auto_map()),
        Some(holder),
        "one holder for all"
    );
}

#[test]
fn a_sandbox_after_the_holder_was_killed_still_runs() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !prerequisites() || is_root() {
        return;
    }
    let f = fixture();
    let out = f.sh("true");
    assert_eq!(out.status, ExitStatus::Exited(0), "{}", text(&out.stderr));
    let holder = sandbox::held_user_namespace_pid(&auto_map()).expect("a holder");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(holder),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Wait until it is gone (it is our child: the next start reaps it).
    let proc = format!("/proc/{holder}/status");
    for _ in 0..200 {
        let zombie_or_gone =
            std::fs::read_to_string(&proc).map_or(true, |s| s.contains("State:\tZ"));
        if zombie_or_gone {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = f.sh("id -u");
    assert_eq!(out.status, ExitStatus::Exited(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "0\n");
    let new = sandbox::held_user_namespace_pid(&auto_map()).expect("a new holder");
    assert_ne!(new, holder);
}

#[test]
fn a_subordinate_map_nests_in_its_held_namespace_too() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !prerequisites() {
        return;
    }
    let f = fixture();
    let out = run(f.sandbox().id_mapping(IdMapping::Subordinate).command([
        "/bin/sh",
        "-c",
        "cat /proc/self/uid_map; id -u",
    ]));
    assert_eq!(out.status, ExitStatus::Exited(0), "{}", text(&out.stderr));
    let subuid = match sandbox::try_choose_id_map(IdMapping::Subordinate)
        .unwrap()
        .0
    {
        sandbox::IdMap::Subordinate { subuid, .. } => subuid,
        other => panic!("expected a subordinate map, got {other:?}"),
    };
    let lines: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let n = subuid.count.min(sandbox::SUBORDINATE_IDS);
    if is_root() {
        assert_eq!(lines[0], format!("0 {} {n}", subuid.start));
    } else {
        // Nested in the holder's namespace, whose map is the subordinate one.
        assert_eq!(lines[0], format!("0 0 {n}"));
    }
    assert_eq!(lines[1], "0");
}
