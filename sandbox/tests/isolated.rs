//! Isolated networks ([`NetworkMode::Isolated`]): outbound access through slirp4netns, but
//! nothing of the host: its loopback, its addresses (where a daemon listens on `0.0.0.0`), its
//! abstract Unix sockets, link-local addresses. Each refusal has a control showing the same probe
//! succeeds with the host's network. Without a pool: as root the namespace is made when the
//! sandbox starts, rootless (no held user namespace here) slirp4netns is attached to the
//! sandbox's own (`isolated_pool.rs` covers the pool and held namespaces).
//!
//! Needs slirp4netns and a usable `/dev/net/tun` (scripts/setup.sh); without them the tests are
//! skipped, failing under `CI`.

mod support;

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sandbox::{ExitStatus, NetworkMode};
use support::{fixture, is_root, run, text, Fixture};

/// slirp4netns and the TUN device are there; otherwise skip (fail under CI).
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

/// The probe's one-line answer ("ok" or "err ENAME") in `sb`.
fn probe(sb: sandbox::Sandbox, args: &[&str]) -> String {
    let mut argv = vec!["/bin/probe"];
    argv.extend_from_slice(args);
    let out = run(sb.command(argv));
    assert!(
        matches!(out.status, ExitStatus::Exited(0 | 1)),
        "probe {args:?}: {:?} {}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout).trim().to_string()
}

fn isolated(f: &Fixture) -> sandbox::Sandbox {
    f.sandbox().network(NetworkMode::Isolated)
}

/// The IPv4 addresses of the host's interfaces but loopback.
fn host_addresses() -> Vec<Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter_map(|a| {
            a.address?
                .as_sockaddr_in()
                .map(nix::sys::socket::SockaddrIn::ip)
        })
        .filter(|ip| !ip.is_loopback())
        .collect()
}

/// Held by the tests that read the host's addresses and by the one that adds a veth pair to
/// the host (whose address, added meanwhile, would be a host address the egress policy has not
/// read yet: it reads them at most once a second).
static HOST_ADDRESSES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A listener that has had no connection (non-blocking accept finds none).
fn untouched(l: &TcpListener) -> bool {
    l.set_nonblocking(true).unwrap();
    l.accept().is_err()
}

#[test]
fn the_hosts_loopback_addresses_and_metadata_are_unreachable() {
    if !prerequisites() {
        return;
    }
    let _addresses = HOST_ADDRESSES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let f = fixture();
    // A service on the host's loopback (PostgreSQL, say) and one on every address (mistryd's
    // default 0.0.0.0:8462).
    let lo = TcpListener::bind("127.0.0.1:0").unwrap();
    let any = TcpListener::bind("0.0.0.0:0").unwrap();
    let (lo_port, any_port) = (
        lo.local_addr().unwrap().port().to_string(),
        any.local_addr().unwrap().port().to_string(),
    );
    let addrs = host_addresses();
    assert!(!addrs.is_empty(), "the host has no non-loopback address");
    let mut script = vec![
        format!("/bin/probe connect 127.0.0.1 {lo_port}"),
        format!("/bin/probe connect 127.0.0.1 {any_port}"),
        // slirp4netns' gateway, which would be the host's 127.0.0.1 without
        // --disable-host-loopback.
        format!("/bin/probe connect 10.0.2.2 {lo_port}"),
        format!("/bin/probe connect 10.0.2.2 {any_port}"),
        // Cloud metadata (link-local): refused by the supervisor before anything is sent.
        "/bin/probe connect 169.254.169.254 80".to_string(),
    ];
    for a in &addrs {
        script.push(format!("/bin/probe connect {a} {any_port}"));
    }
    let out = run(isolated(&f).command(["/bin/sh", "-c", &script.join("; ")]));
    let answers = text(&out.stdout);
    let answers: Vec<&str> = answers.lines().collect();
    assert_eq!(
        answers.len(),
        script.len(),
        "{answers:?} {}",
        text(&out.stderr)
    );
    for (cmd, answer) in script.iter().zip(&answers) {
        assert!(answer.starts_with("err "), "{cmd}: {answer}");
    }
    // The job's own loopback has nothing; the gateway refuses the host's loopback; the
    // supervisor refuses the host's addresses and link-local ones.
    assert_eq!(answers[0], "err ECONNREFUSED");
    for (cmd, answer) in script.iter().zip(&answers).skip(4) {
        assert_eq!(*answer, "err ECONNREFUSED", "{cmd}");
    }
    assert!(
        untouched(&lo) && untouched(&any),
        "a host service was reached"
    );
    // Control: the host's network reaches both.
    let host = f.sandbox().network(NetworkMode::Host);
    assert_eq!(probe(host, &["connect", "127.0.0.1", &lo_port]), "ok");
    let host = f.sandbox().network(NetworkMode::Host);
    assert_eq!(
        probe(host, &["connect", &addrs[0].to_string(), &any_port]),
        "ok"
    );
}

#[test]
fn the_hosts_abstract_unix_sockets_are_unreachable() {
    use std::os::linux::net::SocketAddrExt;
    if !prerequisites() {
        return;
    }
    let f = fixture();
    let name = format!("mistry-isolated-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    assert_eq!(
        probe(isolated(&f), &["connect-abstract", &name]),
        "err ECONNREFUSED"
    );
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "the host's socket was reached");
    // Control: in the host's network namespace it is there.
    let host = f.sandbox().network(NetworkMode::Host);
    assert_eq!(probe(host, &["connect-abstract", &name]), "ok");
}

#[test]
fn the_namespace_has_its_own_interfaces_resolver_and_host_names() {
    if !prerequisites() {
        return;
    }
    let f = fixture();
    let out = run(isolated(&f).hostname("builder-3").command([
        "/bin/sh",
        "-c",
        "ip -o -4 addr show | awk '{print $2, $4}'; ip route | grep ^default; echo $(ls /sys/class/net); \
         cat /etc/resolv.conf /etc/hosts; cat /proc/sys/net/ipv4/ip_unprivileged_port_start; \
         echo x > /etc/resolv.conf 2>/dev/null || echo read-only; \
         ip link set tap0 down 2>/dev/null || echo no-admin",
    ]));
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status,
        ExitStatus::Exited(0),
        "{stdout} {}",
        text(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "lo 127.0.0.1/8");
    assert_eq!(lines[1], "tap0 10.0.2.100/24");
    assert!(
        lines[2].starts_with("default via 10.0.2.2 dev tap0"),
        "{stdout}"
    );
    // Its own sysfs: its interfaces, not the host's.
    assert_eq!(lines[3], "lo tap0");
    assert_eq!(lines[4], "nameserver 10.0.2.3");
    assert!(stdout.contains("127.0.0.1\tlocalhost\n"), "{stdout}");
    assert!(stdout.contains("10.0.2.100\tbuilder-3\n"), "{stdout}");
    assert!(stdout.ends_with("0\nread-only\nno-admin\n"), "{stdout}");
}

#[test]
fn names_resolve_through_the_forwarder() {
    if !prerequisites() {
        return;
    }
    use std::net::ToSocketAddrs;
    // The host itself must resolve names (CI's does: it reaches the package registries).
    if ("deb.debian.org", 80).to_socket_addrs().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the host cannot resolve deb.debian.org"
        );
        eprintln!("skipped: the host cannot resolve names");
        return;
    }
    let f = fixture();
    let out = run(isolated(&f).command([
        "/bin/sh",
        "-c",
        "nslookup deb.debian.org 10.0.2.3 | sed -n '/^Name:/,$p'",
    ]));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("Name:\tdeb.debian.org") && stdout.contains("Address: "),
        "{stdout} {}",
        text(&out.stderr)
    );
}

/// A network namespace of the test's own joined to the host by a veth pair
/// (198.51.100.0/24, documentation addresses), with `HELLO` served on port 8080: a destination
/// that is not the host. Root only.
struct Peer {
    holder: Child,
    host_if: String,
    addr: Ipv4Addr,
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Peer {
    fn start() -> Peer {
        let pid = std::process::id();
        let net = 4 * (pid % 60) as u8;
        let (host_ip, addr) = (
            Ipv4Addr::new(198, 51, 100, net + 1),
            Ipv4Addr::new(198, 51, 100, net + 2),
        );
        let busybox = support::template().join("bin/busybox");
        let holder = Command::new("unshare")
            .args(["-n", "--"])
            .arg(&busybox)
            .args([
                "sh",
                "-c",
                &format!(
                    "read go; while true; do echo HELLO | {} nc -l -p 8080; done",
                    busybox.display()
                ),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let inner = holder.id();
        let (host_if, peer_if) = (format!("mnh{pid}"), format!("mnp{pid}"));
        let peer = Peer {
            holder,
            host_if: host_if.clone(),
            addr,
        };
        sh(&format!(
            "ip link add {host_if} type veth peer name {peer_if} && \
             ip link set {peer_if} netns {inner} && \
             ip addr add {host_ip}/30 dev {host_if} && ip link set {host_if} up && \
             nsenter -t {inner} -n sh -c 'ip addr add {addr}/30 dev {peer_if} && \
             ip link set {peer_if} up && ip link set lo up'"
        ));
        // Never a packet to the real network: the route must be our veth.
        let route = Command::new("ip")
            .args(["-o", "route", "get", &addr.to_string()])
            .output()
            .unwrap();
        let route = String::from_utf8_lossy(&route.stdout);
        assert!(route.contains(&format!("dev {host_if}")), "{route}");
        peer
    }

    fn go(&mut self) {
        let stdin = self.holder.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        // The listener is up once nc listens; give it a moment.
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

#[test]
fn a_destination_that_is_not_the_host_is_reachable() {
    if !prerequisites() {
        return;
    }
    if !is_root() {
        // Making a veth pair in the host's network namespace takes root; rootless outbound
        // access is shown by names_resolve_through_the_forwarder (UDP to the host's name
        // server) and by tests/realworld.rs (apt-get, pip, npm in jobs and RUN steps).
        eprintln!("a_destination_that_is_not_the_host_is_reachable: the veth part needs root");
        return;
    }
    let _addresses = HOST_ADDRESSES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let f = fixture();
    let mut peer = Peer::start();
    peer.go();
    let out = run(isolated(&f).command([
        "/bin/sh",
        "-c",
        &format!("nc -w 5 {} 8080 </dev/null", peer.addr),
    ]));
    assert_eq!(
        text(&out.stdout),
        "HELLO\n",
        "{:?} {}",
        out.status,
        text(&out.stderr)
    );
    // The same destination in the operator's denied networks: refused.
    let deny = format!("{}/32", peer.addr).parse().unwrap();
    sandbox::set_egress_policy(std::sync::Arc::new(sandbox::EgressPolicy::new(vec![deny])));
    let answer = probe(isolated(&f), &["connect", &peer.addr.to_string(), "8080"]);
    sandbox::set_egress_policy(std::sync::Arc::new(sandbox::EgressPolicy::default()));
    assert_eq!(answer, "err ECONNREFUSED");
}
