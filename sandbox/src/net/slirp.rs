//! One `slirp4netns` process: the user-mode network stack between an isolated network namespace
//! and the host's network, under a seccomp filter of ours, and the supervisor thread that
//! answers the filter's notifications with the egress policy ([`crate::egress`]).
//!
//! slirp4netns makes every outbound connection of the namespace from the host's own network
//! stack: a TCP connection of the job becomes a `connect` of slirp4netns, a UDP datagram a
//! `sendto`. The filter ([`crate::seccomp::slirp_program`]) stops each `connect`, each
//! `sendto` with a destination and each `sendmsg`/`sendmmsg`; the supervisor reads the
//! destination from slirp4netns' memory (`process_vm_readv`), checks it and lets the call run
//! (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`) or fails it (`ECONNREFUSED` for `connect`: the job sees
//! a refused connection; `EACCES` for datagrams). The filter also refuses threads and shared
//! address spaces, so nothing can change the arguments between the check and the call, and
//! `io_uring`, whose operations seccomp does not see.
//!
//! Until the network is ready (slirp4netns wrote its ready descriptor) nothing of a job is in the
//! namespace and every notification is let through: slirp4netns' own start-up child, which joins
//! the namespace and sends the TAP device back with `sendmsg`, is not readable by us once it
//! joined a user namespace. From then on ([`Slirp::arm`]) only slirp4netns itself may make the
//! calls, and only to allowed destinations.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::egress::{EgressPolicy, Refusal};
use crate::{errno_text, sys, Error};

/// The namespace slirp4netns serves.
pub(crate) enum Target {
    /// A network namespace we hold, and for a rootless daemon the user namespace that owns it.
    Netns { netns: RawFd, userns: Option<RawFd> },
    /// The network (and user) namespace of process `pid`.
    Pid(libc::pid_t),
}

/// The MTU of the namespace's TAP device (slirp4netns' maximum; Podman's default).
const MTU: u32 = 65520;

/// How long slirp4netns may take to get ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of slirp4netns' standard error kept for error messages.
const STDERR_KEPT: usize = 4096;

/// What the supervisor thread and the owner of a [`Slirp`] share.
#[derive(Debug, Default)]
struct Shared {
    /// Past start-up: notifications are checked (see the module documentation).
    armed: AtomicBool,
    /// The last bytes slirp4netns wrote on its standard error.
    stderr: Mutex<Vec<u8>>,
    /// Destinations refused, and the first refusal's text.
    refused: AtomicU64,
    first_refusal: Mutex<Option<String>>,
    /// Set once slirp4netns has exited (and been reaped).
    exited: AtomicBool,
}

/// A running slirp4netns. Dropping it kills it; its supervisor thread reaps it and ends.
#[derive(Debug)]
pub(crate) struct Slirp {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    /// Closing this (the write end of slirp4netns' exit descriptor) also stops it; it is closed
    /// by the kernel when this process dies.
    _exit: OwnedFd,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where the parent tells the child what failed before exec: [stage, errno].
const STAGE_FDS: u8 = 1;
const STAGE_NO_NEW_PRIVS: u8 = 2;
const STAGE_FILTER: u8 = 3;
const STAGE_SEND: u8 = 4;
const STAGE_EXEC: u8 = 5;
const STAGE_PARENT: u8 = 6;

fn stage_text(stage: u8) -> &'static str {
    match stage {
        STAGE_FDS => "arranging its descriptors",
        STAGE_NO_NEW_PRIVS => "setting no_new_privs",
        STAGE_FILTER => "installing its seccomp filter",
        STAGE_SEND => "handing over the filter's listener",
        STAGE_EXEC => "exec",
        STAGE_PARENT => "the daemon's thread ended",
        _ => "starting",
    }
}

/// Everything the forked child needs, prepared before the fork (it allocates nothing).
struct ChildPlan<'a> {
    binary: &'a CStr,
    argv: Vec<*const libc::c_char>,
    envp: [*const libc::c_char; 1],
    /// (source descriptor, number it gets in slirp4netns).
    fds: Vec<(RawFd, RawFd)>,
    sock: RawFd,
    parent: libc::pid_t,
    filters: Vec<libc::sock_fprog>,
}

/// A 5-byte record on the child's socket: `L` and the listener's number, or `E`, the stage
/// and the errno of a failure. Written with write(2): sendmsg is notified once the filter is in.
fn record(kind: u8, value: i32) -> [u8; 5] {
    let mut rec = [0u8; 5];
    rec[0] = kind;
    rec[1..].copy_from_slice(&value.to_ne_bytes());
    rec
}

fn fail_child(sock: RawFd, stage: u8, errno: i32) -> ! {
    let _ = sys::write_all(
        sock,
        &record(b'E', i32::from(stage) << 24 | (errno & 0xff_ffff)),
    );
    sys::exit(127)
}

/// The forked child: descriptors in place, the filters, the listener to the parent, exec.
fn child_main(p: &ChildPlan<'_>) -> ! {
    let _ = sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
    if sys::getppid() != p.parent {
        fail_child(p.sock, STAGE_PARENT, libc::ESRCH);
    }
    // Not in the daemon's process group: a Ctrl-C to a daemon in a terminal is not for us.
    let _ = sys::setsid();
    sys::reset_signals();
    // Every descriptor to a high temporary number first, so any order of targets works; the
    // socket stays above them all (close-on-exec: its EOF tells the parent exec succeeded).
    let sock = match sys::dup_above(p.sock, 64) {
        Ok(fd) => fd,
        Err(e) => fail_child(p.sock, STAGE_FDS, e),
    };
    let mut temps = [-1; 8];
    for (i, (src, _)) in p.fds.iter().enumerate().take(temps.len()) {
        match sys::dup_above(*src, 32) {
            Ok(fd) => temps[i] = fd,
            Err(e) => fail_child(sock, STAGE_FDS, e),
        }
    }
    for (i, (_, dst)) in p.fds.iter().enumerate().take(temps.len()) {
        if let Err(e) = sys::dup2(temps[i], *dst) {
            fail_child(sock, STAGE_FDS, e);
        }
    }
    let top = p.fds.iter().map(|(_, d)| *d).max().unwrap_or(2) as libc::c_uint;
    let _ = sys::close_range(top + 1, sock as libc::c_uint - 1, false);
    let _ = sys::close_range(sock as libc::c_uint + 1, libc::c_uint::MAX, false);
    if let Err(e) = sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1) {
        fail_child(sock, STAGE_NO_NEW_PRIVS, e);
    }
    let Some((notify, restrict)) = p.filters.split_last() else {
        fail_child(sock, STAGE_FILTER, libc::EINVAL)
    };
    for prog in restrict {
        if let Err(e) = sys::seccomp_install(prog) {
            fail_child(sock, STAGE_FILTER, e);
        }
    }
    let listener = match sys::seccomp_install_listener(notify) {
        Ok(fd) => fd,
        Err(e) => fail_child(sock, STAGE_FILTER, e),
    };
    // The parent takes the listener with pidfd_getfd, then says so.
    if let Err(e) = sys::write_all(sock, &record(b'L', listener)) {
        fail_child(sock, STAGE_SEND, e);
    }
    let mut ack = [0u8; 1];
    if !matches!(sys::read_full(sock, &mut ack), Ok(1)) {
        sys::exit(127);
    }
    // SAFETY: the listener was created above and handed over; this copy is not used again.
    unsafe { sys::close(listener) };
    // SAFETY: argv and envp are NUL-terminated arrays of pointers into CStrings the parent keeps
    // alive (the child has a copy of its memory).
    let e = unsafe { sys::execve(p.binary, p.argv.as_ptr(), p.envp.as_ptr()) };
    fail_child(sock, STAGE_EXEC, e)
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: every caller passes a descriptor a system call just returned to us.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn net_err(what: impl std::fmt::Display) -> Error {
    Error::Network(format!("isolated network: {what}"))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    let (r, w) = sys::pipe().map_err(|e| net_err(format!("pipe: {}", errno_text(e))))?;
    Ok((owned(r), owned(w)))
}

impl Slirp {
    /// Start slirp4netns (`binary`) for `target` and wait until its network is configured. The
    /// calling thread must outlive it (it dies with that thread, `PR_SET_PDEATHSIG`).
    pub(crate) fn start(
        binary: &Path,
        target: Target,
        policy: Arc<EgressPolicy>,
    ) -> Result<Slirp, Error> {
        let program = crate::seccomp::slirp_program()?;
        let sizes = sys::seccomp_notif_sizes()
            .map_err(|e| net_err(format!("seccomp notifications: {}", errno_text(e))))?;
        let (ready_r, ready_w) = pipe()?;
        let (exit_r, exit_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let null = sys::open_rdwr(c"/dev/null")
            .map(owned)
            .map_err(|e| net_err(format!("/dev/null: {}", errno_text(e))))?;
        let (sock_parent, sock_child) = sys::socketpair()
            .map(|(a, b)| (owned(a), owned(b)))
            .map_err(|e| net_err(format!("socketpair: {}", errno_text(e))))?;

        // slirp4netns' descriptors: 0/1 /dev/null, 2 our pipe, 3 ready, 4 exit, 5 netns, 6 userns.
        let mut fds = vec![
            (null.as_raw_fd(), 0),
            (null.as_raw_fd(), 1),
            (err_w.as_raw_fd(), 2),
            (ready_w.as_raw_fd(), 3),
            (exit_r.as_raw_fd(), 4),
        ];
        let root = nix::unistd::geteuid().is_root();
        let mut args: Vec<String> = vec![
            "slirp4netns".into(),
            "--configure".into(),
            format!("--mtu={MTU}"),
            "--disable-host-loopback".into(),
            "--ready-fd=3".into(),
            "--exit-fd=4".into(),
        ];
        if root {
            // As root, slirp4netns pivots into an empty root and drops every capability.
            args.push("--enable-sandbox".into());
        }
        match target {
            Target::Netns { netns, userns } => {
                fds.push((netns, 5));
                args.push("--netns-type=path".into());
                if let Some(u) = userns {
                    fds.push((u, 6));
                    args.push("--userns-path=/proc/self/fd/6".into());
                }
                args.push("/proc/self/fd/5".into());
            }
            Target::Pid(pid) => args.push(pid.to_string()),
        }
        args.push("tap0".into());
        let args: Vec<CString> = args
            .iter()
            .map(|a| CString::new(a.as_str()).unwrap_or_default())
            .collect();
        let binary_c = CString::new(binary.as_os_str().as_bytes())
            .map_err(|_| net_err(format!("{}: invalid path", binary.display())))?;
        let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let plan = ChildPlan {
            binary: &binary_c,
            argv,
            envp: [std::ptr::null()],
            fds,
            sock: sock_child.as_raw_fd(),
            parent: std::process::id() as libc::pid_t,
            filters: program
                .filters()
                .iter()
                .map(|f| libc::sock_fprog {
                    len: f.len().min(u16::MAX as usize) as u16,
                    filter: f.as_ptr() as *mut libc::sock_filter,
                })
                .collect(),
        };
        let (pid, pidfd) = match crate::clone_alone(0, true) {
            Ok(sys::Forked::Child) => child_main(&plan),
            Ok(sys::Forked::Parent { pid, pidfd }) => (pid, owned(pidfd)),
            Err(e) => return Err(net_err(format!("fork: {}", errno_text(e)))),
        };
        drop((sock_child, ready_w, exit_r, err_w, null));
        let kill = || {
            let _ = sys::pidfd_send_signal(pidfd.as_raw_fd(), libc::SIGKILL);
            let _ = sys::waitpid(pid, 0);
        };
        let start_err = |stage: u8, errno: i32| {
            net_err(format!(
                "starting {}: {}: {}",
                binary.display(),
                stage_text(stage),
                errno_text(errno)
            ))
        };
        let sock = sock_parent.as_raw_fd();
        let mut rec = [0u8; 5];
        let failed = |rec: &[u8; 5], n: usize| {
            let v = i32::from_ne_bytes([rec[1], rec[2], rec[3], rec[4]]);
            if n == rec.len() && rec[0] == b'E' {
                start_err((v >> 24) as u8, v & 0xff_ffff)
            } else {
                start_err(0, libc::EIO)
            }
        };
        let n = sys::read_full(sock, &mut rec).unwrap_or(0);
        if n != rec.len() || rec[0] != b'L' {
            kill();
            return Err(failed(&rec, n));
        }
        let number = i32::from_ne_bytes([rec[1], rec[2], rec[3], rec[4]]);
        let listener = match sys::pidfd_getfd(pidfd.as_raw_fd(), number) {
            Ok(fd) => owned(fd),
            Err(e) => {
                kill();
                return Err(net_err(format!(
                    "taking slirp4netns' seccomp listener (pidfd_getfd, which needs ptrace \
                     access to our own child): {}",
                    errno_text(e)
                )));
            }
        };
        if let Err(e) = sys::write_all(sock, b"A") {
            kill();
            return Err(start_err(STAGE_SEND, e));
        }
        // EOF: exec succeeded (the child's end was close-on-exec); a record: it failed.
        let n = sys::read_full(sock, &mut rec).unwrap_or(0);
        if n != 0 {
            kill();
            return Err(failed(&rec, n));
        }
        drop(sock_parent);

        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            let pidfd = pidfd
                .try_clone()
                .map_err(|e| net_err(format!("pidfd: {e}")))?;
            let size = sizes.seccomp_notif as usize;
            std::thread::Builder::new()
                .name("mistry-slirp".into())
                .stack_size(128 << 10)
                .spawn(move || supervise(pid, pidfd, listener, err_r, size, &policy, &shared))
                .map_err(|e| {
                    kill();
                    net_err(format!("starting the supervisor thread: {e}"))
                })?
        };
        let slirp = Slirp {
            pid,
            pidfd,
            _exit: exit_w,
            shared,
            thread: Some(thread),
        };
        slirp.wait_ready(ready_r, binary)?;
        Ok(slirp)
    }

    /// Wait for the ready byte; a slirp4netns that exits first fails with what it said.
    fn wait_ready(&self, ready: OwnedFd, binary: &Path) -> Result<(), Error> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(net_err(format!(
                    "{} was not ready after {READY_TIMEOUT:?}{}",
                    binary.display(),
                    self.said()
                )));
            }
            let mut fds = [
                libc::pollfd {
                    fd: ready.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            sys::poll(&mut fds, left.as_millis().min(i32::MAX as u128) as i32 + 1)
                .map_err(|e| net_err(format!("waiting for slirp4netns: {}", errno_text(e))))?;
            if fds[0].revents & libc::POLLIN != 0 {
                let mut b = [0u8; 1];
                if matches!(sys::read_full(ready.as_raw_fd(), &mut b), Ok(1)) {
                    return Ok(());
                }
            }
            if fds[1].revents != 0 || fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                // Let the supervisor collect the last of its standard error.
                let until = Instant::now() + Duration::from_millis(500);
                while !self.shared.exited.load(Ordering::SeqCst) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(2));
                }
                return Err(net_err(format!(
                    "{} exited before the network was ready{}",
                    binary.display(),
                    self.said()
                )));
            }
        }
    }

    /// `: <what slirp4netns said on its standard error>`, or nothing.
    fn said(&self) -> String {
        let err = self
            .shared
            .stderr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let text = String::from_utf8_lossy(&err);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| {
                !l.is_empty() && !l.starts_with("sent tapfd") && !l.starts_with("received tapfd")
            })
            .collect();
        if lines.is_empty() {
            String::new()
        } else {
            format!(": {}", lines.join("; "))
        }
    }

    /// Check every notification from now on: a job may use the namespace.
    pub(crate) fn arm(&self) {
        self.shared.armed.store(true, Ordering::SeqCst);
    }

    /// Whether slirp4netns still runs.
    pub(crate) fn alive(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        matches!(sys::poll(&mut fds, 0), Ok(0)) && !self.shared.exited.load(Ordering::SeqCst)
    }

    /// What happened on this network, for the caller's notes: refusals, an early exit.
    pub(crate) fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let refused = self.shared.refused.load(Ordering::SeqCst);
        if refused > 0 {
            let first = self
                .shared
                .first_refusal
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
                .unwrap_or_default();
            notes.push(format!(
                "isolated network: {refused} connection(s) refused, the first: {first}"
            ));
        }
        if !self.alive() {
            notes.push(format!(
                "isolated network: slirp4netns exited{}",
                self.said()
            ));
        }
        notes
    }

    /// Stop slirp4netns and wait for its supervisor (shutdown).
    pub(crate) fn stop_and_join(mut self) {
        let _ = sys::pidfd_send_signal(self.pidfd.as_raw_fd(), libc::SIGKILL);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }
}

impl Drop for Slirp {
    fn drop(&mut self) {
        // The supervisor reaps it (tearing a TAP device down takes the kernel milliseconds).
        let _ = sys::pidfd_send_signal(self.pidfd.as_raw_fd(), libc::SIGKILL);
    }
}

/// The supervisor thread of one slirp4netns: notifications, its standard error, its end.
fn supervise(
    pid: libc::pid_t,
    pidfd: OwnedFd,
    listener: OwnedFd,
    stderr: OwnedFd,
    notif_size: usize,
    policy: &EgressPolicy,
    shared: &Shared,
) {
    let mut buf = vec![
        0u64;
        notif_size
            .max(std::mem::size_of::<libc::seccomp_notif>())
            .div_ceil(8)
    ];
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stderr.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        for f in &mut fds {
            f.revents = 0;
        }
        if sys::poll(&mut fds, -1).is_err() {
            break;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            answer_one(pid, listener.as_raw_fd(), &mut buf, policy, shared);
        } else if fds[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            // Every process under the filter has exited.
            fds[0].fd = -1;
        }
        if fds[1].revents != 0 && !read_stderr(stderr.as_raw_fd(), shared) {
            fds[1].fd = -1;
        }
        if fds[2].revents != 0 {
            let _ = sys::waitpid(pid, 0);
            // What is left in the pipe (another fork may still hold its write end: no waiting).
            let mut last = [libc::pollfd {
                fd: stderr.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            while fds[1].fd >= 0
                && matches!(sys::poll(&mut last, 0), Ok(1))
                && read_stderr(stderr.as_raw_fd(), shared)
            {}
            break;
        }
    }
    shared.exited.store(true, Ordering::SeqCst);
}

/// Read what slirp4netns wrote on its standard error; false at EOF.
fn read_stderr(fd: RawFd, shared: &Shared) -> bool {
    let mut chunk = [0u8; 1024];
    let got = match sys::read_some(fd, &mut chunk) {
        Ok(0) | Err(_) => return false,
        Ok(n) => &chunk[..n],
    };
    let mut kept = shared
        .stderr
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    kept.extend_from_slice(got);
    if kept.len() > STDERR_KEPT {
        let cut = kept.len() - STDERR_KEPT;
        kept.drain(..cut);
    }
    tracing::trace!(pid = ?std::thread::current().name(), text = %String::from_utf8_lossy(got), "slirp4netns");
    true
}

/// A destination read from slirp4netns' memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    Inet(std::net::SocketAddr),
    /// `AF_UNSPEC`: `connect` dissolves a datagram socket's association.
    Unspec,
    Family(u16),
    /// Shorter than its family's address.
    Short,
}

/// Parse a `struct sockaddr` of `len` bytes.
fn parse_sockaddr(b: &[u8]) -> Dest {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    if b.len() < 2 {
        return Dest::Short;
    }
    let family = u16::from_ne_bytes([b[0], b[1]]);
    match libc::c_int::from(family) {
        libc::AF_UNSPEC => Dest::Unspec,
        libc::AF_INET if b.len() >= 8 => {
            let port = u16::from_be_bytes([b[2], b[3]]);
            let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            Dest::Inet(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        libc::AF_INET6 if b.len() >= 24 => {
            let port = u16::from_be_bytes([b[2], b[3]]);
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[8..24]);
            Dest::Inet(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(octets),
                port,
                0,
                0,
            )))
        }
        libc::AF_INET | libc::AF_INET6 => Dest::Short,
        _ => Dest::Family(family),
    }
}

/// The largest socket address read (`struct sockaddr_storage`).
const MAX_ADDR: usize = 128;

/// Read the socket address at `addr` (`len` bytes) of process `pid`.
fn read_dest(pid: libc::pid_t, addr: u64, len: u64) -> Result<Dest, i32> {
    let len = (len as usize).min(MAX_ADDR);
    let mut b = [0u8; MAX_ADDR];
    sys::read_process_memory(pid, addr, &mut b[..len])?;
    Ok(parse_sockaddr(&b[..len]))
}

/// `struct msghdr` on 64-bit Linux: msg_name at 0, msg_namelen (u32) at 8; 56 bytes.
const MSGHDR: usize = 56;
/// `struct mmsghdr`: a msghdr and msg_len, 64 bytes.
const MMSGHDR: usize = 64;
/// sendmmsg(2) sends at most UIO_MAXIOV messages.
const MAX_MMSG: u64 = 1024;

/// The destination of a message header at `at`, if it names one.
fn msghdr_dest(pid: libc::pid_t, at: u64) -> Result<Option<Dest>, i32> {
    let mut h = [0u8; MSGHDR];
    sys::read_process_memory(pid, at, &mut h)?;
    let name = u64::from_ne_bytes(h[0..8].try_into().unwrap_or_default());
    let len = u32::from_ne_bytes(h[8..12].try_into().unwrap_or_default());
    if name == 0 || len == 0 {
        return Ok(None);
    }
    read_dest(pid, name, u64::from(len)).map(Some)
}

/// The destinations of one notified system call (empty: none named).
fn destinations(pid: libc::pid_t, n: &libc::seccomp_notif) -> Result<Vec<Dest>, i32> {
    let nr = libc::c_long::from(n.data.nr);
    let a = n.data.args;
    if nr == libc::SYS_connect {
        Ok(vec![read_dest(pid, a[1], a[2])?])
    } else if nr == libc::SYS_sendto {
        if a[4] == 0 {
            Ok(Vec::new())
        } else {
            Ok(vec![read_dest(pid, a[4], a[5])?])
        }
    } else if nr == libc::SYS_sendmsg {
        Ok(msghdr_dest(pid, a[1])?.into_iter().collect())
    } else if nr == libc::SYS_sendmmsg {
        let mut out = Vec::new();
        for i in 0..a[2].min(MAX_MMSG) {
            out.extend(msghdr_dest(pid, a[1] + i * MMSGHDR as u64)?);
        }
        Ok(out)
    } else {
        Err(libc::ENOSYS)
    }
}

/// Why the supervisor refused one of slirp4netns' system calls (the first one is in the notes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Refused {
    #[error("{addr}: {refusal}")]
    Address {
        addr: std::net::SocketAddr,
        #[source]
        refusal: Refusal,
    },
    #[error("an unspecified address")]
    Unspecified,
    #[error("{0}")]
    Family(#[source] Refusal),
    #[error("a truncated socket address")]
    Short,
    #[error("a call of process {0} (not slirp4netns)")]
    OtherProcess(u32),
    #[error("its destination could not be read: {}", errno_text(*.0))]
    Unreadable(i32),
}

/// Whether the destinations may be reached: the first refusal otherwise.
fn judge(dests: &[Dest], connect: bool, policy: &EgressPolicy) -> Result<(), Refused> {
    for d in dests {
        match d {
            Dest::Inet(addr) => policy
                .check_slirp(*addr)
                .map_err(|refusal| Refused::Address {
                    addr: *addr,
                    refusal,
                })?,
            Dest::Unspec if connect => {}
            Dest::Unspec => return Err(Refused::Unspecified),
            Dest::Family(f) => return Err(Refused::Family(Refusal::Family(*f))),
            Dest::Short => return Err(Refused::Short),
        }
    }
    Ok(())
}

/// Receive one notification and answer it.
fn answer_one(
    pid: libc::pid_t,
    listener: RawFd,
    buf: &mut [u64],
    policy: &EgressPolicy,
    shared: &Shared,
) {
    // The caller died meanwhile (ENOENT), or nothing was pending.
    let Ok(n) = sys::seccomp_notif_recv(listener, buf) else {
        return;
    };
    let connect = libc::c_long::from(n.data.nr) == libc::SYS_connect;
    let answer = if !shared.armed.load(Ordering::SeqCst) {
        Ok(())
    } else if n.pid as libc::pid_t != pid {
        // Once ready, slirp4netns forks nothing: no other process may connect.
        Err(Refused::OtherProcess(n.pid))
    } else {
        match destinations(pid, &n) {
            Err(e) => Err(Refused::Unreadable(e)),
            // The memory read must have been the process's that is still waiting (no pid reuse).
            Ok(_) if !sys::seccomp_notif_id_valid(listener, n.id) => return,
            Ok(dests) => judge(&dests, connect, policy),
        }
    };
    let reply = match &answer {
        Ok(()) => Ok(()),
        Err(why) => {
            tracing::debug!(slirp = pid, refused = %why, "isolated network");
            if shared.refused.fetch_add(1, Ordering::SeqCst) == 0 {
                *shared
                    .first_refusal
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why.to_string());
            }
            Err(if connect {
                libc::ECONNREFUSED
            } else {
                libc::EACCES
            })
        }
    };
    // ENOENT: the caller is gone; nothing to answer.
    let _ = sys::seccomp_notif_respond(listener, n.id, reply);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&port.to_be_bytes());
        b[4..8].copy_from_slice(&ip);
        b
    }

    #[test]
    fn socket_addresses_parse() {
        assert_eq!(
            parse_sockaddr(&v4([127, 0, 0, 1], 8462)),
            Dest::Inet("127.0.0.1:8462".parse().unwrap())
        );
        let mut b = vec![0u8; 28];
        b[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&443u16.to_be_bytes());
        b[8..24].copy_from_slice(
            &"::ffff:10.0.0.1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        assert_eq!(
            parse_sockaddr(&b),
            Dest::Inet("[::ffff:10.0.0.1]:443".parse().unwrap())
        );
        assert_eq!(parse_sockaddr(&b[..20]), Dest::Short);
        assert_eq!(parse_sockaddr(&v4([1, 2, 3, 4], 1)[..6]), Dest::Short);
        assert_eq!(parse_sockaddr(&[0]), Dest::Short);
        let mut unix = vec![0u8; 110];
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(parse_sockaddr(&unix), Dest::Family(libc::AF_UNIX as u16));
        assert_eq!(parse_sockaddr(&[0, 0]), Dest::Unspec);
    }

    #[test]
    fn judgements() {
        let p = EgressPolicy::new(vec!["203.0.113.0/24".parse().unwrap()]);
        let d = |s: &str| Dest::Inet(s.parse().unwrap());
        assert_eq!(judge(&[], true, &p), Ok(()));
        assert_eq!(judge(&[Dest::Unspec], true, &p), Ok(()));
        assert!(judge(&[Dest::Unspec], false, &p).is_err());
        let refused = |dests: &[Dest], connect| judge(dests, connect, &p).unwrap_err().to_string();
        assert_eq!(
            refused(&[d("127.0.0.1:8462")], true),
            "127.0.0.1:8462: 127.0.0.1 is a loopback address"
        );
        assert_eq!(
            refused(&[d("198.51.100.1:80"), d("203.0.113.5:80")], false),
            "203.0.113.5:80: 203.0.113.5 is in the denied network 203.0.113.0/24"
        );
        assert_eq!(judge(&[d("198.51.100.1:80")], true, &p), Ok(()));
        assert_eq!(
            refused(&[Dest::Family(1)], true),
            "address family 1 is not allowed"
        );
        assert!(judge(&[Dest::Short], true, &p).is_err());
    }
}
