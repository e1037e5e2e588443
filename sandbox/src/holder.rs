//! Held user namespaces: the subordinate id map is set up once, not at every sandbox start.
//!
//! An unprivileged caller can only map its subordinate ids through the setuid helpers
//! `newuidmap` and `newgidmap`, a millisecond or more per sandbox. With a holder (as rootless
//! podman keeps its pause process), one small process owns a user namespace with the full map,
//! written once; each sandbox then starts from a short-lived intermediate process that joins it
//! (`setns`) and creates the sandbox's own user namespace *inside* it, whose identity map the
//! intermediate may write itself (it has `CAP_SETUID` in the held namespace). Every sandbox
//! still has a user namespace of its own, so sandboxes are as separate from each other as
//! before; inside, `/proc/self/uid_map` shows the map onto the held namespace's ids.
//!
//! A holder lives as long as the process that made it: it waits for EOF on a pipe whose write
//! end only this process (and sandboxes it starts, while they live) has. A holder found dead is
//! replaced at the next start. Holders are used only where enabled
//! ([`crate::set_held_user_namespaces`]) and only for maps that need the setuid helpers; a root
//! caller writes maps directly.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::idmap::Mapping;
use crate::sys;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Use held user namespaces for sandboxes of this process (see the module doc).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

/// Whether sandboxes of this process use held user namespaces (default: no; set with
/// [`set_enabled`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// A live holder: its process, a descriptor of its user namespace, the pipe that keeps it.
struct Holder {
    mapping: Mapping,
    pid: libc::pid_t,
    pidfd: OwnedFd,
    userns: Arc<OwnedFd>,
    _life: OwnedFd,
}

impl Holder {
    /// Whether the holder process still runs (a dead one is reaped here).
    fn alive(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call; a zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n == 0 {
            return true;
        }
        let _ = sys::waitpid(self.pid, libc::WNOHANG);
        false
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = sys::pidfd_send_signal(self.pidfd.as_raw_fd(), libc::SIGKILL);
        let _ = sys::waitpid(self.pid, 0);
    }
}

static HOLDERS: Mutex<Vec<Holder>> = Mutex::new(Vec::new());

/// The held user namespace for `mapping` (started, or restarted when found dead), or `None`
/// when holders are off, the map needs no helper, or a holder cannot be started (the caller
/// then maps as before).
pub(crate) fn userns_for(mapping: &Mapping) -> Option<Arc<OwnedFd>> {
    if !enabled() || !mapping.needs_helpers() {
        return None;
    }
    let mut holders = HOLDERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    holders.retain(Holder::alive);
    if let Some(h) = holders.iter().find(|h| &h.mapping == mapping) {
        return Some(Arc::clone(&h.userns));
    }
    match start(mapping) {
        Ok(h) => {
            let ns = Arc::clone(&h.userns);
            holders.push(h);
            Some(ns)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no held user namespace: sandboxes map their ids one by one");
            None
        }
    }
}

/// Forget the holder of `mapping` (e.g. joining it failed); the next start makes a new one.
pub(crate) fn discard(mapping: &Mapping) {
    let mut holders = HOLDERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    holders.retain(|h| &h.mapping != mapping);
}

/// The pid of the holder of `mapping`, if one runs (for tests and diagnostics).
pub fn holder_pid(mapping: &Mapping) -> Option<libc::pid_t> {
    let mut holders = HOLDERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    holders.retain(Holder::alive);
    holders
        .iter()
        .find(|h| &h.mapping == mapping)
        .map(|h| h.pid)
}

fn start(mapping: &Mapping) -> Result<Holder, crate::Error> {
    let ns_err = |what: &str, e: i32| crate::Error::IdMap {
        what: format!("held user namespace: {what}"),
        reason: crate::errno_text(e),
    };
    let (life_r, life_w) = sys::pipe().map_err(|e| ns_err("pipe", e))?;
    // SAFETY: pipe() returned these two descriptors to us; nothing else owns them.
    let (life_r, life_w) = unsafe { (OwnedFd::from_raw_fd(life_r), OwnedFd::from_raw_fd(life_w)) };
    let keep = life_r.as_raw_fd();
    match sys::fork_with(libc::CLONE_NEWUSER as u64, true) {
        Ok(sys::Forked::Child) => hold(keep),
        Ok(sys::Forked::Parent { pid, pidfd }) => {
            // SAFETY: clone returned this pidfd to us; nothing else owns it.
            let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
            drop(life_r);
            let kill = || {
                let _ = sys::pidfd_send_signal(pidfd.as_raw_fd(), libc::SIGKILL);
                let _ = sys::waitpid(pid, 0);
            };
            if let Err(e) = mapping.write(pid) {
                kill();
                return Err(e);
            }
            let userns = match std::fs::File::open(format!("/proc/{pid}/ns/user")) {
                Ok(f) => OwnedFd::from(f),
                Err(e) => {
                    kill();
                    return Err(ns_err(
                        "opening its namespace",
                        e.raw_os_error().unwrap_or(0),
                    ));
                }
            };
            tracing::debug!(pid, "held user namespace started");
            Ok(Holder {
                mapping: mapping.clone(),
                pid,
                pidfd,
                userns: Arc::new(userns),
                _life: life_w,
            })
        }
        Err(e) => Err(ns_err("clone", e)),
    }
}

/// The holder process: keep nothing but the life pipe, and wait for its EOF. Allocation-free
/// (the caller may be multi-threaded).
fn hold(life: RawFd) -> ! {
    sys::close_all_except(life);
    let mut buf = [0u8; 1];
    loop {
        match sys::read_full(life, &mut buf) {
            Ok(0) | Err(_) => sys::exit(0),
            Ok(_) => {}
        }
    }
}
