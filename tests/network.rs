//! Jobs and RUN steps under the default network (`isolated`) reach nothing of the host: not the
//! daemon's API (listening on every address, `0.0.0.0`), not a service on the host's loopback
//! (PostgreSQL, say) or on its addresses, not its abstract Unix sockets, not the cloud metadata
//! address; `ADD <url>` refuses the same destinations; a project's `.mistry.json` cannot widen
//! its network, the operator's `projects` entry can. Every probe has a control in the same job
//! (a listener of the job's own), so a broken probe cannot pass for a refusal.
//!
//! Needs slirp4netns and a usable `/dev/net/tun` (scripts/setup.sh): without them the tests are
//! skipped, failing under `CI`.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::server::{artifacts, read, Server};
use serde_json::{json, Value};

fn prerequisites() -> bool {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let slirp = std::env::split_paths(&path)
        .chain([std::path::PathBuf::from("/usr/bin")])
        .find(|d| d.join("slirp4netns").is_file());
    let why = match (slirp, tun) {
        (None, _) => "slirp4netns is not installed".to_string(),
        (_, Err(e)) => format!("/dev/net/tun: {e} (scripts/setup.sh makes it 0666)"),
        _ => return true,
    };
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("skipped: {why}");
    false
}

/// A TCP service of the host that answers `HELLO` (or, with `http`, an HTTP 200 with body `x`)
/// and counts its connections.
struct Service {
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl Service {
    fn start(addr: &str, http: bool) -> Service {
        let listener = TcpListener::bind(addr).unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&hits);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                counted.fetch_add(1, Ordering::SeqCst);
                if http {
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf);
                    let _ = conn.write_all(
                        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
                    );
                } else {
                    let _ = conn.write_all(b"HELLO\n");
                }
            }
        });
        Service { port, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A Unix socket of the host in the abstract namespace (D-Bus and X11 have such).
struct AbstractSocket {
    name: String,
    _listener: std::os::unix::net::UnixListener,
}

impl AbstractSocket {
    fn bind(tag: &str) -> AbstractSocket {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("mistry-network-test-{tag}-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        AbstractSocket {
            name,
            _listener: listener,
        }
    }
}

/// The first IPv4 address of the host's interfaces but loopback.
fn host_address() -> Ipv4Addr {
    nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter_map(|a| {
            a.address?
                .as_sockaddr_in()
                .map(nix::sys::socket::SockaddrIn::ip)
        })
        .find(|ip| !ip.is_loopback())
        .expect("the host has no non-loopback IPv4 address")
}

/// The probe: for each line `NAME HOST PORT` of the targets file (`$1`), what `nc` gets from
/// HOST:PORT goes to `$2/NAME`; `$2/abstract` says whether the host's abstract socket (`$3`) is
/// in this network namespace's table; `self` is a listener of the probe's own (the control).
const PROBE_SH: &str = r#"#!/bin/sh
targets=$1 out=$2 name=$3
mkdir -p "$out"
(echo HELLO | nc -l -p 9999 >/dev/null &)
sleep 0.3
# The request's stream stays open until the answer came (an HTTP server may drop a request
# whose client closed its side first).
probe() {
    fifo=/tmp/probe-fifo-$1
    mkfifo "$fifo"
    nc -w 10 "$2" "$3" < "$fifo" > "$out/$1" 2>&1 &
    reader=$!
    { printf 'GET /index/ HTTP/1.0\r\n\r\n'; sleep 10; } > "$fifo" &
    writer=$!
    wait "$reader"
    kill "$writer" 2>/dev/null
    rm -f "$fifo"
}
echo "self 127.0.0.1 9999" | cat - "$targets" | while read -r what host port; do
    [ -n "$what" ] || continue
    probe "$what" "$host" "$port"
done
if grep -q "@$name" /proc/net/unix; then echo seen; else echo unseen; fi > "$out/abstract"
"#;

/// The host's services a probe tries, and what it must not get from them.
struct Host {
    daemon_port: u16,
    ip: Ipv4Addr,
    lo: Service,
    any: Service,
    socket: AbstractSocket,
}

impl Host {
    fn new(s: &Server, tag: &str) -> Host {
        Host {
            daemon_port: s.addr.rsplit(':').next().unwrap().parse().unwrap(),
            ip: host_address(),
            lo: Service::start("127.0.0.1:0", false),
            any: Service::start("0.0.0.0:0", false),
            socket: AbstractSocket::bind(tag),
        }
    }

    /// `NAME HOST PORT` lines: the daemon's API, a loopback service (PostgreSQL's stand-in),
    /// a service on every address, through each path a job could take, and cloud metadata.
    fn targets(&self) -> String {
        let (d, lo, any, ip) = (self.daemon_port, self.lo.port, self.any.port, self.ip);
        format!(
            "api-lo 127.0.0.1 {d}\napi-host {ip} {d}\napi-gateway 10.0.2.2 {d}\n\
             pg-lo 127.0.0.1 {lo}\npg-gateway 10.0.2.2 {lo}\nany-host {ip} {any}\n\
             any-gateway 10.0.2.2 {any}\nmetadata 169.254.169.254 80\n"
        )
    }

    /// Nothing of the host was reached, and the probe itself worked.
    fn assert_unreached(&self, results: &std::path::Path) {
        let got = |name: &str| read(results.join(name));
        assert_eq!(got("self"), "HELLO\n", "the probe's control failed");
        for line in self.targets().lines() {
            let name = line.split(' ').next().unwrap();
            let answer = got(name);
            assert!(
                !answer.contains("HTTP/1.") && !answer.contains("HELLO"),
                "{line}: {answer}"
            );
        }
        // Refused at once by the supervisor (not a timeout, not a route elsewhere).
        assert!(
            got("metadata").contains("Connection refused"),
            "{}",
            got("metadata")
        );
        assert!(
            got("any-host").contains("Connection refused"),
            "{}",
            got("any-host")
        );
        assert_eq!(got("abstract"), "unseen\n");
        assert_eq!(
            (self.lo.hits(), self.any.hits()),
            (0, 0),
            "a host service was reached"
        );
    }
}

/// Write project `name` into `s`'s projects directory.
fn project(s: &Server, name: &str, files: &[(&str, &str)]) {
    let dir = s.dir.path().join("projects").join(name);
    for (path, content) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
}

/// A project whose job runs the probe against `host`.
fn probe_project(s: &Server, name: &str, host: &Host) {
    project(
        s,
        name,
        &[
            (
                "Dockerfile",
                "FROM busybox\nCOPY probe.sh targets /\n\
                 CMD [\"/bin/sh\", \"-c\", \"sh /probe.sh /targets /data/artifacts $(cat /data/params/socket)\"]\n",
            ),
            ("probe.sh", PROBE_SH),
            ("targets", &host.targets()),
        ],
    );
}

fn run_job(s: &Server, project: &str, host: &Host) -> Value {
    s.job(json!({"project": project, "params": {"socket": host.socket.name}}))
}

#[test]
fn jobs_cannot_reach_the_daemon_host_services_or_metadata() {
    if !prerequisites() {
        return;
    }
    // No "network" in the configuration: the default. mistryd on every address.
    let s = Server::start_on("0.0.0.0:0", json!({}), &[]);
    let host = Host::new(&s, "job");
    probe_project(&s, "probe", &host);
    let info = run_job(&s, "probe", &host);
    assert_eq!(info["ExitCode"], 0, "{info}");
    host.assert_unreached(&artifacts(&info));
}

#[test]
fn run_steps_cannot_reach_the_daemon_host_services_or_metadata() {
    if !prerequisites() {
        return;
    }
    let s = Server::start_on("0.0.0.0:0", json!({}), &[]);
    let host = Host::new(&s, "run");
    let dockerfile = format!(
        "FROM busybox\nCOPY probe.sh targets /\nRUN sh /probe.sh /targets /results {}\n\
         CMD [\"/bin/sh\", \"-c\", \"cp /results/* /data/artifacts/\"]\n",
        host.socket.name
    );
    project(
        &s,
        "runprobe",
        &[
            ("Dockerfile", &dockerfile),
            ("probe.sh", PROBE_SH),
            ("targets", &host.targets()),
        ],
    );
    let info = s.job(json!({"project": "runprobe"}));
    assert_eq!(info["ExitCode"], 0, "{info}");
    host.assert_unreached(&artifacts(&info));
}

#[test]
fn add_url_refuses_the_hosts_loopback_and_addresses() {
    if !prerequisites() {
        return;
    }
    let s = Server::start_on("0.0.0.0:0", json!({}), &[]);
    let lo = Service::start("127.0.0.1:0", true);
    let any = Service::start("0.0.0.0:0", true);
    let ip = host_address();
    for (name, url) in [
        ("addlo", format!("http://127.0.0.1:{}/x", lo.port)),
        ("addhost", format!("http://{ip}:{}/x", any.port)),
        (
            "addmeta",
            "http://169.254.169.254/latest/meta-data/".to_string(),
        ),
    ] {
        project(
            &s,
            name,
            &[(
                "Dockerfile",
                &format!("FROM busybox\nADD {url} /x\nCMD [\"true\"]\n"),
            )],
        );
        let info = s.job(json!({"project": name}));
        let err = info["ErrBuild"].as_str().unwrap();
        assert!(
            err.contains(&format!("ADD {url}")) || err.contains(&format!("downloading {url}")),
            "{name}: {info}"
        );
        assert!(err.contains("is refused ("), "{name}: {err}");
    }
    assert_eq!(
        (lo.hits(), any.hits()),
        (0, 0),
        "a host service was reached"
    );
    // Control: the same download under the host's network (the operator's word) works.
    let s = Server::start(json!({"projects": {"addok": {"network": "host"}}}));
    project(
        &s,
        "addok",
        &[(
            "Dockerfile",
            &format!(
                "FROM busybox\nADD http://127.0.0.1:{}/x /x\nCMD [\"cp\", \"/x\", \"/data/artifacts/x\"]\n",
                lo.port
            ),
        )],
    );
    let info = s.job(json!({"project": "addok"}));
    assert_eq!(info["ExitCode"], 0, "{info}");
    assert_eq!(read(artifacts(&info).join("x")), "x");
}

#[test]
fn a_project_cannot_widen_its_network_the_operator_can() {
    if !prerequisites() {
        return;
    }
    let s = Server::start_on(
        "0.0.0.0:0",
        json!({"projects": {"widened": {"network": "host"}}}),
        &[],
    );
    let host = Host::new(&s, "widen");
    // The project's own file asks for the host's network: ignored.
    probe_project(&s, "narrow", &host);
    project(&s, "narrow", &[(".mistry.json", r#"{"network": "host"}"#)]);
    let info = run_job(&s, "narrow", &host);
    assert_eq!(info["ExitCode"], 0, "{info}");
    host.assert_unreached(&artifacts(&info));
    // Nor can a Dockerfile: RUN --network=host is refused.
    project(
        &s,
        "runhost",
        &[(
            "Dockerfile",
            "FROM busybox\nRUN --network=host true\nCMD [\"true\"]\n",
        )],
    );
    let info = s.job(json!({"project": "runhost"}));
    assert!(
        info["ErrBuild"].as_str().unwrap().contains(
            "--network=host: this build's network is \"isolated\" (the server's setting for the \
             project), and a Dockerfile cannot widen it"
        ),
        "{info}"
    );
    // The operator's entry for a project gives it the host's network.
    probe_project(&s, "widened", &host);
    let info = run_job(&s, "widened", &host);
    assert_eq!(info["ExitCode"], 0, "{info}");
    let got = |name: &str| read(artifacts(&info).join(name));
    assert_eq!(got("pg-lo"), "HELLO\n");
    assert!(
        got("api-host").starts_with("HTTP/1.0 200 OK"),
        "{}",
        got("api-host")
    );
    assert_eq!(got("abstract"), "seen\n");
    // A project may narrow its network to none: not even slirp4netns' gateway.
    project(&s, "widened", &[(".mistry.json", r#"{"network": "none"}"#)]);
    let info =
        s.job(json!({"project": "widened", "params": {"socket": host.socket.name, "n": "2"}}));
    let results = artifacts(&info);
    assert_eq!(read(results.join("self")), "HELLO\n");
    let gateway = read(results.join("pg-gateway"));
    assert!(gateway.contains("Network is unreachable"), "{gateway}");
}

#[test]
fn a_failing_slirp4netns_fails_only_its_job_with_a_clear_error() {
    if !prerequisites() {
        return;
    }
    let s = Server::start_on(
        "127.0.0.1:0",
        json!({"projects": {"offline": {"network": "none"}}}),
        &[("MISTRY_SLIRP4NETNS", "/bin/false")],
    );
    project(
        &s,
        "online",
        &[("Dockerfile", "FROM busybox\nCMD [\"true\"]\n")],
    );
    // As a job that cannot start: exit code 127, the reason on its standard error.
    let info = s.job(json!({"project": "online"}));
    assert_eq!(info["ExitCode"], 127, "{info}");
    assert_eq!(
        info["ContainerStderr"],
        "isolated network: /bin/false exited before the network was ready\n"
    );
    project(
        &s,
        "offline",
        &[("Dockerfile", "FROM busybox\nCMD [\"true\"]\n")],
    );
    let info = s.job(json!({"project": "offline"}));
    assert_eq!(
        (info["ExitCode"].as_i64(), info["ErrBuild"].as_str()),
        (Some(0), Some(""))
    );
}
