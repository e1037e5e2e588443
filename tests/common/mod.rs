//! Shared by the end-to-end tests of the `mistry` package.
//!
//! `MISTRY_HELPER_BIN` names the mistryd binary, `MISTRY_CLIENT_BIN` the client and
//! `MISTRY_TEST_IMAGES` the base images when the tests run as another user (scripts/test.sh's
//! unprivileged run).
#![allow(dead_code)]

pub(crate) mod browser;
pub(crate) mod build_env;
pub(crate) mod pipelines;
pub(crate) mod registry;
pub(crate) mod server;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// `tool` (skopeo, buildah) with auth and runtime paths of its own under `dir`, never the
/// machine's: without them it reads `/run/containers/<uid>/auth.json`, and a buildah run as root
/// leaves `/run/containers` mode 0700, unreadable by every other user (the tests as mistry-test
/// then fail on another tool's state).
pub(crate) fn containers_tool(tool: &str, dir: &std::path::Path) -> Command {
    use std::os::unix::fs::PermissionsExt;
    let run = dir.join("containers-run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut cmd = Command::new(tool);
    cmd.env("REGISTRY_AUTH_FILE", dir.join("containers-auth.json"))
        .env("XDG_RUNTIME_DIR", &run);
    cmd
}

/// The mistryd binary.
pub(crate) fn mistryd_bin() -> OsString {
    std::env::var_os("MISTRY_HELPER_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_mistryd").into())
}

/// The client binary `mistry`: `MISTRY_CLIENT_BIN`, else the `mistry` beside mistryd in the
/// target directory. It belongs to another package (`mistry-client`), so cargo builds it for
/// `cargo test --workspace` but not for `cargo test -p mistry --test server` alone: then build it
/// first with `cargo build -p mistry-client`.
pub(crate) fn mistry_client_bin() -> OsString {
    if let Some(bin) = std::env::var_os("MISTRY_CLIENT_BIN") {
        return bin;
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_mistryd")).with_file_name("mistry");
    assert!(
        bin.is_file(),
        "the client binary {} does not exist: `cargo test --workspace` builds it; with \
         `cargo test -p mistry` run `cargo build -p mistry-client` first, or set MISTRY_CLIENT_BIN",
        bin.display()
    );
    bin.into()
}

/// The image helper command (`mistryd internal`).
pub(crate) fn helper() -> Vec<OsString> {
    vec![mistryd_bin(), "internal".into()]
}

/// The directory of local base images (with `busybox`, from images/recipes/busybox.sh).
pub(crate) fn images_dir() -> PathBuf {
    let dir = std::env::var_os("MISTRY_TEST_IMAGES").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/images"),
        PathBuf::from,
    );
    assert!(
        dir.join("busybox/index.json").is_file(),
        "no busybox image in {}: run scripts/setup.sh",
        dir.display()
    );
    dir
}

/// The snapshot backends a test runs on: plain and overlay, and btrfs on the directory of
/// `MISTRY_TEST_BTRFS` (see [`btrfs_dir_or_skip`]), with that directory to make stores in.
pub(crate) fn backends() -> Vec<(images::BackendKind, Option<PathBuf>)> {
    let mut v = vec![
        (images::BackendKind::Plain, None),
        (images::BackendKind::Overlay, None),
    ];
    if let Some(dir) = btrfs_dir_or_skip() {
        assert!(
            images::is_btrfs(&dir),
            "MISTRY_TEST_BTRFS={} is not on btrfs",
            dir.display()
        );
        v.push((images::BackendKind::Btrfs, Some(dir)));
    }
    v
}

/// A temporary directory named `prefix…`, in `parent` (e.g. a btrfs directory) or in /tmp.
pub(crate) fn tempdir_in(prefix: &str, parent: Option<&std::path::Path>) -> tempfile::TempDir {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    match parent {
        Some(p) => b.tempdir_in(p),
        None => b.tempdir(),
    }
    .unwrap()
}

/// The btrfs directory of `MISTRY_TEST_BTRFS` (scripts/setup.sh loop-mounts one and
/// scripts/test.sh sets it). Unset, the btrfs part of a test is skipped — but fails under `CI`,
/// so a CI run cannot pass without it.
pub(crate) fn btrfs_dir_or_skip() -> Option<PathBuf> {
    match std::env::var_os("MISTRY_TEST_BTRFS") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "MISTRY_TEST_BTRFS is not set: CI must run the btrfs tests (scripts/test.sh sets it)"
            );
            eprintln!(
                "MISTRY_TEST_BTRFS not set: the btrfs part is skipped (scripts/test.sh runs it)"
            );
            None
        }
    }
}

/// A loopback port nothing listens on: a TCP socket bound to it but not listening, held while
/// the returned fd lives, so no other process can take the port meanwhile and a connection to it
/// is refused.
pub(crate) fn closed_port() -> (OwnedFd, u16) {
    use nix::sys::socket::{
        bind, getsockname, socket, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
    let addr: SockaddrIn = getsockname(fd.as_raw_fd()).unwrap();
    (fd, addr.port())
}

/// Poll `cond` every 20 ms for up to 10 s.
pub(crate) fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    wait_for(what, Duration::from_secs(10), cond);
}

/// Poll `cond` every 20 ms for up to `timeout`.
pub(crate) fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The lines of a child's output, read on a thread of their own until the end (so the child
/// never blocks on a full pipe, also after the receiver is dropped).
pub(crate) fn lines_of(output: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    rx
}

/// Wait up to `timeout` for the first line for which `found` gives a value. `Err` with the lines
/// seen when the output ends first (the process exited) or the time is up.
pub(crate) fn wait_for_line<T>(
    lines: &Receiver<String>,
    timeout: Duration,
    mut found: impl FnMut(&str) -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    let mut seen = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(v) = found(&line) {
                    return Ok(v);
                }
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(RecvTimeoutError::Disconnected) => return Err(seen),
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!("{seen}(no answer after {timeout:?})"))
            }
        }
    }
}

/// A server the test starts per connection, inetd style, on a listener of its own bound to
/// `127.0.0.1:0`: for servers that cannot bind port 0 and say which port they got (sshd -i,
/// rsync --daemon), so no port is picked, released and raced for. Each accepted connection runs
/// `command()` with the connection as its stdin and stdout. Dropping it stops accepting.
pub(crate) struct Inetd {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Inetd {
    pub(crate) fn start(what: &str, command: impl Fn() -> Command + Send + 'static) -> Inetd {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let what = what.to_string();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let conn = conn.unwrap_or_else(|e| panic!("{what}: accepting: {e}"));
                let mut child = command()
                    .stdin(OwnedFd::from(conn.try_clone().unwrap()))
                    .stdout(OwnedFd::from(conn))
                    .spawn()
                    .unwrap_or_else(|e| panic!("starting {what}: {e}"));
                // Reaped when the connection ends.
                std::thread::spawn(move || child.wait());
            }
        });
        Inetd {
            port,
            stop,
            accept: Some(accept),
        }
    }
}

impl Drop for Inetd {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// A suffix unique enough for names made by one test run (process id and nanoseconds).
pub(crate) fn rand_suffix() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

/// Serve `body` over HTTP on 127.0.0.1 (one answer per connection, a few connections), in the
/// background; the URL.
pub(crate) fn serve(body: &'static [u8]) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(8) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(body);
        }
    });
    format!("http://{addr}")
}
