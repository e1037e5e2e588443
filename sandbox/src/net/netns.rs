//! Making an isolated network namespace ahead of its sandbox. A root daemon's thread unshares
//! one for itself, sets it up and returns to its own ([`make_here`]: no process to fork); for a
//! rootless daemon, a forked child in the held user namespace (so that the namespace belongs to
//! it and sandboxes nested in it can join) unshares a network namespace, brings `lo` up, sets its sysctls and hands its
//! descriptor back over a socket, with a detached read-only sysfs of the namespace (made in a
//! mount namespace of its own: a sandbox that joins the namespace owns no capability over it and
//! could not make one, so its `/sys/class/net` shows its own interfaces, not the host's). The
//! sandboxes that join it later own no capability over it: a job cannot reconfigure it.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::{errno_text, sys, Error};

const STAGE_USERNS: u8 = 1;
const STAGE_UNSHARE: u8 = 2;
const STAGE_LOOPBACK: u8 = 3;
const STAGE_OPEN: u8 = 4;

/// The child: allocation-free (the daemon is multi-threaded).
fn maker_main(sock: RawFd, userns: Option<RawFd>, ping_range: &CString) -> ! {
    // Only our own descriptors (another start's pipe ends would see no end of file meanwhile).
    match userns {
        Some(u) => sys::close_all_but(&[sock.min(u), sock.max(u)]),
        None => sys::close_all_except(sock),
    }
    let fail = |stage: u8, errno: i32| -> ! {
        let mut rec = [0u8; 6];
        rec[0] = b'E';
        rec[1] = stage;
        rec[2..].copy_from_slice(&errno.to_ne_bytes());
        let _ = sys::send_with_fd(sock, &rec, -1);
        sys::exit(1)
    };
    if let Some(u) = userns {
        if let Err(e) = sys::setns(u, libc::CLONE_NEWUSER) {
            fail(STAGE_USERNS, e);
        }
    }
    if let Err(e) = sys::unshare(libc::CLONE_NEWNET) {
        fail(STAGE_UNSHARE, e);
    }
    if let Err(e) = sys::loopback_up() {
        fail(STAGE_LOOPBACK, e);
    }
    // As Docker and Podman: any user of the job may bind low ports and use ping sockets.
    let _ = sys::write_file(c"/proc/sys/net/ipv4/ip_unprivileged_port_start", b"0");
    let _ = sys::write_file(
        c"/proc/sys/net/ipv4/ping_group_range",
        ping_range.as_bytes(),
    );
    let fd = match sys::open_read(c"/proc/self/ns/net") {
        Ok(fd) => fd,
        Err(e) => fail(STAGE_OPEN, e),
    };
    if sys::send_with_fd(sock, b"N", fd).is_err() {
        sys::exit(1);
    }
    // The namespace's sysfs, if it can be made (else the sandbox binds the host's /sys).
    let attrs = sys::MOUNT_ATTR_RDONLY
        | sys::MOUNT_ATTR_NOSUID
        | sys::MOUNT_ATTR_NODEV
        | sys::MOUNT_ATTR_NOEXEC;
    let sysfs = sys::unshare(libc::CLONE_NEWNS)
        .and_then(|()| sys::fresh_mount(c"sysfs", &[], attrs))
        .unwrap_or(-1);
    let _ = sys::send_with_fd(sock, if sysfs >= 0 { b"S" } else { b"s" }, sysfs);
    sys::exit(0)
}

fn err(what: &str, e: i32) -> Error {
    Error::Network(format!(
        "isolated network: making a network namespace: {what}: {}",
        errno_text(e)
    ))
}

/// Root: a new network namespace made on the calling thread, which returns to its own network
/// namespace before this returns (see [`super::ThreadNetns`]); its sysfs is made while the
/// thread is in it (root may mount in the host's mount namespace).
fn make_here() -> Result<(OwnedFd, Option<OwnedFd>), Error> {
    let own = sys::open_read(c"/proc/thread-self/ns/net").map_err(|e| err("opening ours", e))?;
    // SAFETY: open returned this descriptor to us; nothing else owns it.
    let own = unsafe { OwnedFd::from_raw_fd(own) };
    sys::unshare(libc::CLONE_NEWNET).map_err(|e| err("unshare", e))?;
    let back = super::ThreadNetns::returning_to(own);
    sys::loopback_up().map_err(|e| err("bringing up lo", e))?;
    let _ = sys::write_file(c"/proc/sys/net/ipv4/ip_unprivileged_port_start", b"0");
    let _ = sys::write_file(c"/proc/sys/net/ipv4/ping_group_range", b"0 2147483647");
    let netns = sys::open_read(c"/proc/thread-self/ns/net").map_err(|e| err("opening it", e))?;
    // SAFETY: open returned this descriptor to us; nothing else owns it.
    let netns = unsafe { OwnedFd::from_raw_fd(netns) };
    let attrs = sys::MOUNT_ATTR_RDONLY
        | sys::MOUNT_ATTR_NOSUID
        | sys::MOUNT_ATTR_NODEV
        | sys::MOUNT_ATTR_NOEXEC;
    let sysfs = sys::fresh_mount(c"sysfs", &[], attrs)
        .ok()
        // SAFETY: fsmount returned this descriptor to us; nothing else owns it.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    drop(back);
    Ok((netns, sysfs))
}

/// A new network namespace with `lo` up, owned by `userns` (a held user namespace whose ids
/// `0..=max_id` are mapped) or, without one, by the caller's (root's) user namespace; and a
/// detached sysfs of it, when one could be made.
pub(crate) fn make(
    userns: Option<RawFd>,
    max_id: u32,
) -> Result<(OwnedFd, Option<OwnedFd>), Error> {
    if userns.is_none() && nix::unistd::geteuid().is_root() {
        return make_here();
    }
    let ping_range = CString::new(format!("0 {max_id}")).unwrap_or_default();
    let (parent, child) = sys::socketpair().map_err(|e| err("socketpair", e))?;
    // SAFETY: socketpair returned these two descriptors to us; nothing else owns them.
    let (parent, child) = unsafe { (OwnedFd::from_raw_fd(parent), OwnedFd::from_raw_fd(child)) };
    let pid = match crate::clone_alone(0, false) {
        Ok(sys::Forked::Child) => maker_main(child.as_raw_fd(), userns, &ping_range),
        Ok(sys::Forked::Parent { pid, .. }) => pid,
        Err(e) => return Err(err("fork", e)),
    };
    drop(child);
    let mut buf = [0u8; 8];
    // One byte per message that carries a descriptor (a failure record has 6).
    let got = sys::recv_with_fd(parent.as_raw_fd(), &mut buf[..1]).and_then(|(n, fd)| {
        if n == 1 && buf[0] == b'E' {
            let more = sys::read_full(parent.as_raw_fd(), &mut buf[1..6])?;
            Ok((1 + more, fd))
        } else {
            Ok((n, fd))
        }
    });
    let result = match got {
        Ok((1, fd)) if buf[0] == b'N' && fd >= 0 => {
            // SAFETY: recvmsg just installed this descriptor for us.
            let netns = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut tag = [0u8; 1];
            let sysfs = match sys::recv_with_fd(parent.as_raw_fd(), &mut tag) {
                Ok((1, fd)) if tag[0] == b'S' && fd >= 0 => {
                    // SAFETY: recvmsg just installed this descriptor for us.
                    Some(unsafe { OwnedFd::from_raw_fd(fd) })
                }
                _ => None,
            };
            Ok((netns, sysfs))
        }
        Ok((n, fd)) => {
            if fd >= 0 {
                // SAFETY: recvmsg just installed this descriptor for us; it is dropped here.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            let (stage, errno) = if n >= 6 && buf[0] == b'E' {
                (buf[1], i32::from_ne_bytes([buf[2], buf[3], buf[4], buf[5]]))
            } else {
                (0, libc::EIO)
            };
            let what = match stage {
                STAGE_USERNS => "joining the held user namespace",
                STAGE_UNSHARE => "unshare",
                STAGE_LOOPBACK => "bringing up lo",
                STAGE_OPEN => "opening it",
                _ => "the helper process died",
            };
            Err(err(what, errno))
        }
        Err(e) => Err(err("receiving it", e)),
    };
    let _ = sys::waitpid(pid, 0);
    result
}
