//! The pool of isolated network namespaces (`sandbox::configure_isolated_networks`), as the
//! daemon runs it: namespaces made ahead (rootless: in the held user namespace), each joined by
//! exactly one sandbox and then discarded, a dead slirp4netns skipped, and nothing left behind
//! when the pool stops. Process-wide state: a test binary of its own, one test.

mod support;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use sandbox::{ExitStatus, NetworkMode};
use support::{fixture, run, text};

fn prerequisites() -> bool {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun");
    let why = match (sandbox::slirp4netns_path(), tun) {
        (None, _) => "slirp4netns is not installed".to_string(),
        (_, Err(e)) => format!("/dev/net/tun: {e} (scripts/setup.sh makes it 0666)"),
        _ => return true,
    };
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("skipped: {why}");
    false
}

/// Our slirp4netns children: pid → the network namespace it serves (its descriptor 5).
fn our_slirps() -> Vec<(i32, String)> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((comm, rest)) = stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(") "))
        else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1).unwrap_or("");
        if comm == "slirp4netns" && ppid == me {
            let ns = std::fs::read_link(entry.path().join("fd/5"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            found.push((pid, ns));
        }
    }
    found
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pooled_namespaces_serve_one_sandbox_each_and_go_with_the_pool() {
    if !prerequisites() {
        return;
    }
    // As the daemon: held user namespaces (rootless, the pool's namespaces belong to it).
    sandbox::set_held_user_namespaces(true);
    if !support::full_map_or_skip() {
        return;
    }
    let f = fixture();
    let any = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = any.local_addr().unwrap().port();
    let host = nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter_map(|a| {
            a.address?
                .as_sockaddr_in()
                .map(nix::sys::socket::SockaddrIn::ip)
        })
        .find(|ip| !ip.is_loopback())
        .expect("a non-loopback address");

    sandbox::configure_isolated_networks(2);
    wait_for("two namespaces made ahead", || {
        sandbox::isolated_networks_ready() == 2
    });
    let pooled: BTreeSet<String> = our_slirps().into_iter().map(|(_, ns)| ns).collect();
    assert_eq!(pooled.len(), 2, "{pooled:?}");
    let run_one = || {
        let out = run(f.sandbox().network(NetworkMode::Isolated).command([
            "/bin/sh",
            "-c",
            &format!(
                "readlink /proc/self/ns/net; /bin/probe connect {host} {port}; \
                 echo $(ls /sys/class/net); ip link set tap0 down 2>/dev/null || echo no-admin"
            ),
        ]));
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status,
            ExitStatus::Exited(0),
            "{stdout} {}",
            text(&out.stderr)
        );
        let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
        assert_eq!(
            lines[1..],
            ["err ECONNREFUSED", "lo tap0", "no-admin"],
            "{stdout} {}",
            text(&out.stderr)
        );
        lines[0].clone()
    };
    // The first sandbox joins a namespace the pool made.
    let first = run_one();
    assert!(pooled.contains(&first), "{first} not in {pooled:?}");
    // Its slirp4netns goes with it.
    wait_for("the used namespace's slirp4netns to go", || {
        !our_slirps().iter().any(|(_, ns)| *ns == first)
    });

    // A pooled slirp4netns that died is skipped: every sandbox still gets a working network.
    wait_for("the pool refilled", || {
        sandbox::isolated_networks_ready() == 2
    });
    let killed: Vec<i32> = our_slirps().into_iter().map(|(pid, _)| pid).collect();
    for pid in &killed {
        // One that is going already (a used namespace's) may be gone: ESRCH.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    wait_for("the killed slirp4netns to be reaped", || {
        !our_slirps().iter().any(|(pid, _)| killed.contains(pid))
    });
    for _ in 0..3 {
        run_one();
    }
    // Sandboxes running at once have namespaces of their own.
    let spawn = || {
        f.sandbox()
            .network(NetworkMode::Isolated)
            .command(["/bin/sh", "-c", "readlink /proc/self/ns/net; sleep 1"])
            .stdout(sandbox::Stdio::Piped)
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn(), spawn());
    let first_line = |c: &mut sandbox::Child| {
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(c.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        line
    };
    let (na, nb) = (first_line(&mut a), first_line(&mut b));
    assert_ne!(na, nb);
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    any.set_nonblocking(true).unwrap();
    assert!(any.accept().is_err(), "the host was reached");

    // Stopping the pool leaves no slirp4netns behind.
    sandbox::stop_isolated_networks();
    assert_eq!(sandbox::isolated_networks_ready(), 0);
    wait_for("every slirp4netns to go", || our_slirps().is_empty());
    // Without a pool a sandbox makes its own.
    run_one();
    wait_for("its slirp4netns to go", || our_slirps().is_empty());
}
