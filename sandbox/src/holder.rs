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
//! Holders are used only where enabled ([`crate::set_held_user_namespaces`]) and only for maps
//! that need the setuid helpers; a root caller writes maps directly. There are two kinds:
//!
//! - **Private** (the default; the daemon's): a holder lives as long as the process that made
//!   it: it waits for EOF on a pipe whose write end only this process (and sandboxes it starts,
//!   while they live) has. A holder found dead is replaced at the next start.
//! - **Shared** ([`crate::set_shared_user_namespaces`]; the one-shot commands `mistryd sandbox
//!   run`, `exec`, `image build`): the holder outlives the command that made it and the next
//!   command of the same user finds it, so a one-shot start pays no setuid helper either. It is
//!   registered in a directory of the caller's own, mode 0700 — `$XDG_RUNTIME_DIR/mistry` when
//!   that is a directory owned by the caller, else `/tmp/mistry-<euid>` — one file per mapping
//!   (named from a SHA-256 of its map lines) holding the holder's pid, its start time and its
//!   user namespace's device and inode, written atomically. A
//!   directory owned by someone else or open to group or others is refused (a private holder
//!   then). A registered pid is used only when its process is the registered one (its start
//!   time), holds the registered namespace (its device and inode), that namespace is owned by the
//!   caller's euid, is a child of the caller's own user namespace, and shows exactly the
//!   expected maps (setgroups allowed), the process still being the one whose pidfd was taken:
//!   a stale or planted file is ignored and replaced by a new holder. The holder is detached
//!   (its own session, `/` as its directory, no descriptor but the registry directory's, no
//!   parent-death signal, its command line renamed `mistryd: held user namespace` and its copy
//!   of the caller's environment strings zeroed); every user
//!   touches the registry file each time it starts a sandbox through it, and the holder, waking
//!   every 15 s, exits when the file is gone, names another pid, or went untouched for 10
//!   minutes. Sandboxes already started through it keep running (their namespaces are nested
//!   in its namespace, which lives as long as they do). A holder that exits idle removes its
//!   entry; the entry of one that died otherwise stays until the next start replaces it.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::idmap::Mapping;
use crate::sys;

static ENABLED: AtomicBool = AtomicBool::new(false);
static SHARED: AtomicBool = AtomicBool::new(false);

/// How often a shared holder looks at its registry file.
const WAKE_SECS: u32 = 15;
/// How long a shared holder stays without a sandbox started through it.
const IDLE_SECS: libc::time_t = 600;
/// The command line a shared holder shows (`ps`), and its thread name (15 bytes at most).
const TITLE: &[u8] = b"mistryd: held user namespace";
const COMM: &CStr = c"mistryd-holder";

/// Use held user namespaces for sandboxes of this process (see the module doc).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

/// Whether sandboxes of this process use held user namespaces (default: no; set with
/// [`set_enabled`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Make the holders of this process shared: found in the caller's registry directory, or
/// started detached and registered there, so that they outlive this process and serve the
/// next one (see the module doc). Off by default (private holders, which die with this
/// process); it matters only while holding is on ([`set_enabled`]).
pub fn set_shared(on: bool) {
    SHARED.store(on, Ordering::SeqCst);
}

/// Whether this process's holders are shared ([`set_shared`]).
pub fn shared() -> bool {
    SHARED.load(Ordering::SeqCst)
}

/// What keeps a holder, and what ends it.
enum Kind {
    /// Ours alone: the write end of its life pipe; killed when dropped.
    Private { _life: OwnedFd },
    /// Registered for every process of this user: it outlives us and ends on its own.
    Shared(Registry),
}

/// A live holder: its process, a descriptor of its user namespace, what keeps it.
struct Holder {
    mapping: Mapping,
    pid: libc::pid_t,
    pidfd: OwnedFd,
    userns: Arc<OwnedFd>,
    kind: Kind,
}

impl Holder {
    /// Whether the holder process still runs (a dead child of ours is reaped here).
    fn alive(&self) -> bool {
        if running(&self.pidfd) {
            return true;
        }
        let _ = sys::waitpid(self.pid, libc::WNOHANG);
        false
    }

    /// Whether the holder is still the one to use: a shared one must still be the registered
    /// holder of its mapping, and is touched (one more use) when it is.
    fn still_ours(&self) -> bool {
        match &self.kind {
            Kind::Private { .. } => true,
            Kind::Shared(registry) => registry.touch(self.pid),
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if matches!(self.kind, Kind::Private { .. }) {
            let _ = sys::pidfd_send_signal(self.pidfd.as_raw_fd(), libc::SIGKILL);
            let _ = sys::waitpid(self.pid, 0);
        }
    }
}

/// Whether the process of `pidfd` has not exited (a pidfd polls readable once it has).
fn running(pidfd: &OwnedFd) -> bool {
    let mut pfd = [libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    matches!(sys::poll(&mut pfd, 0), Ok(0))
}

static HOLDERS: Mutex<Vec<Holder>> = Mutex::new(Vec::new());

/// The held user namespace for `mapping` (found, started, or restarted when found dead), or
/// `None` when holders are off, the map needs no helper, or a holder cannot be started (the
/// caller then maps as before).
pub(crate) fn userns_for(mapping: &Mapping) -> Option<Arc<OwnedFd>> {
    if !enabled() || !mapping.needs_helpers() {
        return None;
    }
    let mut holders = HOLDERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    holders.retain(Holder::alive);
    if let Some(i) = holders.iter().position(|h| &h.mapping == mapping) {
        if holders[i].still_ours() {
            return Some(Arc::clone(&holders[i].userns));
        }
        // Another process registered another holder (or the file went): use that one.
        holders.swap_remove(i);
    }
    let found = if shared() {
        shared_holder(mapping)
    } else {
        None
    };
    let made = match found {
        Some(h) => Ok(h),
        None => start_private(mapping),
    };
    match made {
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

/// Forget the holder of `mapping` (e.g. joining it failed); the next start makes a new one. A
/// shared holder is also dropped from the registry when the file still names it.
pub(crate) fn discard(mapping: &Mapping) {
    let mut holders = HOLDERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    holders.retain(|h| {
        if &h.mapping != mapping {
            return true;
        }
        if let Kind::Shared(registry) = &h.kind {
            registry.unregister(h.pid);
        }
        false
    });
}

/// The pid of the holder of `mapping`, if one runs for this process (for tests and
/// diagnostics).
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

fn ns_err(what: &str, e: i32) -> crate::Error {
    crate::Error::IdMap {
        what: format!("held user namespace: {what}"),
        reason: crate::errno_text(e),
    }
}

fn start_private(mapping: &Mapping) -> Result<Holder, crate::Error> {
    let (life_r, life_w) = sys::pipe().map_err(|e| ns_err("pipe", e))?;
    // SAFETY: pipe() returned these two descriptors to us; nothing else owns them.
    let (life_r, life_w) = unsafe { (OwnedFd::from_raw_fd(life_r), OwnedFd::from_raw_fd(life_w)) };
    let keep = life_r.as_raw_fd();
    match crate::clone_alone(libc::CLONE_NEWUSER as u64, true) {
        Ok(sys::Forked::Child) => hold(keep),
        Ok(sys::Forked::Parent { pid, pidfd }) => {
            // SAFETY: clone returned this pidfd to us; nothing else owns it.
            let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
            drop(life_r);
            let userns = map_and_open(mapping, pid, &pidfd)?;
            tracing::debug!(pid, "held user namespace started");
            Ok(Holder {
                mapping: mapping.clone(),
                pid,
                pidfd,
                userns: Arc::new(userns),
                kind: Kind::Private { _life: life_w },
            })
        }
        Err(e) => Err(ns_err("clone", e)),
    }
}

/// Write the maps of the new holder `pid` and open its user namespace; the holder is killed
/// when either fails.
fn map_and_open(
    mapping: &Mapping,
    pid: libc::pid_t,
    pidfd: &OwnedFd,
) -> Result<OwnedFd, crate::Error> {
    let kill = || {
        let _ = sys::pidfd_send_signal(pidfd.as_raw_fd(), libc::SIGKILL);
        let _ = sys::waitpid(pid, 0);
    };
    if let Err(e) = mapping.write(pid) {
        kill();
        return Err(e);
    }
    match std::fs::File::open(format!("/proc/{pid}/ns/user")) {
        Ok(f) => Ok(OwnedFd::from(f)),
        Err(e) => {
            kill();
            Err(ns_err(
                "opening its namespace",
                e.raw_os_error().unwrap_or(0),
            ))
        }
    }
}

/// The private holder process: keep nothing but the life pipe, and wait for its EOF.
/// Allocation-free (the caller may be multi-threaded).
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

/// The registry directory of this user's shared holders, and the file of one mapping in it.
struct Registry {
    dir: OwnedFd,
    name: CString,
}

/// The registry file's name for `mapping`: a digest of its map lines.
fn registry_name(mapping: &Mapping) -> String {
    let (uid_map, gid_map) = mapping.map_texts();
    let mut h = Sha256::new();
    h.update(b"uid_map\n");
    h.update(normalise(&uid_map).as_bytes());
    h.update(b"gid_map\n");
    h.update(normalise(&gid_map).as_bytes());
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("userns-{hex}")
}

/// Map text with each line's fields separated by one space, empty lines dropped.
fn normalise(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if !fields.is_empty() {
            out.push_str(&fields.join(" "));
            out.push('\n');
        }
    }
    out
}

/// Where the registry lives: `$XDG_RUNTIME_DIR/mistry` when that variable names a directory
/// owned by `euid`, else `/tmp/mistry-<euid>`.
fn registry_dir(euid: u32) -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        let xdg = PathBuf::from(xdg);
        if std::fs::metadata(&xdg).is_ok_and(|m| m.is_dir() && m.uid() == euid) {
            return xdg.join("mistry");
        }
    }
    PathBuf::from(format!("/tmp/mistry-{euid}"))
}

/// A registry entry: the holder's pid, its start time (clock ticks after boot, `/proc/<pid>/stat`
/// field 22) and its user namespace's device and inode — what names that one process and that
/// one namespace, whatever reuses the pid later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    pid: libc::pid_t,
    start: u64,
    ns: (u64, u64),
}

/// A decimal number of at most 20 digits, no sign. Allocation-free.
fn parse_num(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// Parse a registry file's content, `PID START DEV INO\n` in decimal. Allocation-free (the
/// shared holder reads its file with it).
fn parse_entry(bytes: &[u8]) -> Option<Entry> {
    let line = bytes.strip_suffix(b"\n")?;
    let mut fields = line.split(|&b| b == b' ');
    let pid = fields.next().filter(|d| d.len() <= 9).and_then(parse_num)?;
    let start = fields.next().and_then(parse_num)?;
    let dev = fields.next().and_then(parse_num)?;
    let ino = fields.next().and_then(parse_num)?;
    if fields.next().is_some() {
        return None;
    }
    let pid = libc::pid_t::try_from(pid).ok().filter(|p| *p > 0)?;
    Some(Entry {
        pid,
        start,
        ns: (dev, ino),
    })
}

/// The start time of process `pid` (`/proc/<pid>/stat` field 22, clock ticks after boot).
fn start_time(pid: libc::pid_t) -> Result<u64, String> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("stat: {e}"))?;
    let rest = &stat[stat.rfind(')').ok_or("stat: no command")? + 1..];
    // Field 3 is the first after the command; field 22 is the 20th.
    rest.split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| "stat: no start time".to_string())
}

/// Read the entry in the registry file open as `fd` (a regular file of a few bytes).
/// Allocation-free.
fn read_entry(fd: RawFd) -> Option<Entry> {
    let st = sys::fstat(fd).ok()?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return None;
    }
    let mut buf = [0u8; 96];
    let mut got = 0;
    while got < buf.len() {
        match sys::read_some(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => return None,
        }
    }
    parse_entry(&buf[..got])
}

/// A descriptor closed when dropped (a raw one from sys.rs).
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: every caller passes a descriptor a system call just returned to it, which
    // nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

const FILE_FLAGS: i32 = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;

impl Registry {
    /// This user's registry directory, made if missing, with the file of `mapping`; `None`
    /// (logged) when the directory cannot be had or is not safely ours.
    fn open(mapping: &Mapping) -> Option<Registry> {
        let euid = nix::unistd::geteuid().as_raw();
        let path = registry_dir(euid);
        let refuse = |why: &str| {
            tracing::debug!(dir = %path.display(), why, "no shared held user namespace: a private one");
            None
        };
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return refuse(&format!("cannot make it: {e}")),
        }
        let dir = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(d) => d,
            Err(e) => return refuse(&format!("cannot open it: {e}")),
        };
        let meta = match dir.metadata() {
            Ok(m) => m,
            Err(e) => return refuse(&format!("cannot read its status: {e}")),
        };
        if meta.uid() != euid {
            // Another user made it first (no XDG_RUNTIME_DIR, a shared /tmp): said once.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(dir = %path.display(), owner = meta.uid(), "the shared held user namespace's directory belongs to another user: one-shot commands map their ids themselves (set XDG_RUNTIME_DIR to a directory of your own)");
            });
            return refuse("owned by another user");
        }
        if meta.mode() & 0o077 != 0 {
            return refuse("open to its group or others (mode is not 0700)");
        }
        let name = CString::new(registry_name(mapping)).ok()?;
        Some(Registry {
            dir: OwnedFd::from(dir),
            name,
        })
    }

    /// Open the registry file (never through a symlink, never blocking on a FIFO).
    fn open_file(&self) -> Option<OwnedFd> {
        sys::openat(self.dir.as_raw_fd(), &self.name, FILE_FLAGS, 0)
            .ok()
            .map(owned)
    }

    /// The entry of the file, if it is there and well-formed.
    fn entry(&self) -> Option<Entry> {
        read_entry(self.open_file()?.as_raw_fd())
    }

    /// The pid the file names, if it is there and well-formed.
    fn pid(&self) -> Option<libc::pid_t> {
        self.entry().map(|e| e.pid)
    }

    /// One more use of holder `pid`: touch the file, if it still names `pid`.
    fn touch(&self, pid: libc::pid_t) -> bool {
        let Some(fd) = self.open_file() else {
            return false;
        };
        if read_entry(fd.as_raw_fd()).map(|e| e.pid) != Some(pid) {
            return false;
        }
        let _ = sys::futimens_now(fd.as_raw_fd());
        true
    }

    /// Name holder `entry` in the file: a temporary file renamed over it.
    fn register(&self, entry: Entry) -> Result<(), i32> {
        let tmp = CString::new(format!(
            ".{}.{}.tmp",
            self.name.to_string_lossy(),
            std::process::id()
        ))
        .map_err(|_| libc::EINVAL)?;
        let dir = self.dir.as_raw_fd();
        let _ = sys::unlinkat(dir, &tmp);
        let fd = owned(sys::openat(
            dir,
            &tmp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        )?);
        let Entry {
            pid,
            start,
            ns: (dev, ino),
        } = entry;
        let written = sys::write_all(
            fd.as_raw_fd(),
            format!("{pid} {start} {dev} {ino}\n").as_bytes(),
        );
        drop(fd);
        match written.and_then(|()| sys::renameat(dir, &tmp, &self.name)) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = sys::unlinkat(dir, &tmp);
                Err(e)
            }
        }
    }

    /// Remove the file if it still names `pid`.
    fn unregister(&self, pid: libc::pid_t) {
        if self.pid() == Some(pid) {
            let _ = sys::unlinkat(self.dir.as_raw_fd(), &self.name);
        }
    }
}

/// The registered shared holder of `mapping`, checked, or a new one started and registered;
/// `None` when the registry cannot be used or no shared holder can be started (a private one
/// then).
fn shared_holder(mapping: &Mapping) -> Option<Holder> {
    let registry = Registry::open(mapping)?;
    if let Some(entry) = registry.entry() {
        let pid = entry.pid;
        match check(entry, mapping) {
            Ok((pidfd, userns)) if registry.touch(pid) => {
                tracing::debug!(pid, "shared held user namespace found");
                return Some(Holder {
                    mapping: mapping.clone(),
                    pid,
                    pidfd,
                    userns: Arc::new(userns),
                    kind: Kind::Shared(registry),
                });
            }
            Ok(_) => {}
            Err(why) => tracing::debug!(pid, why, "registered holder ignored"),
        }
    }
    match start_shared(mapping, registry) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::debug!(error = %e, "no shared held user namespace: a private one");
            None
        }
    }
}

/// Whether registry entry `entry` names a holder this caller may use for `mapping`: the process
/// its pid has now is the one registered (its start time) and holds the namespace registered
/// (its device and inode) — a process of ours that came to reuse the pid is never taken for it
/// — owned by our euid, a child of our own user namespace, with exactly the expected maps, and
/// the pid still that process when we are done (no pid reuse meanwhile). Returns its pidfd and
/// namespace.
fn check(entry: Entry, mapping: &Mapping) -> Result<(OwnedFd, OwnedFd), String> {
    let pid = entry.pid;
    let errno = |what: &str, e: i32| format!("{what}: {}", crate::errno_text(e));
    let pidfd = owned(sys::pidfd_open(pid).map_err(|e| errno("pidfd_open", e))?);
    if start_time(pid)? != entry.start {
        return Err("another process has its pid now".into());
    }
    let path = CString::new(format!("/proc/{pid}/ns/user")).map_err(|e| e.to_string())?;
    let userns = owned(sys::open_read(&path).map_err(|e| errno("its user namespace", e))?);
    if sys::dev_ino(userns.as_raw_fd()) != Ok(entry.ns) {
        return Err("its user namespace is not the one registered".into());
    }
    let owner = sys::ns_owner_uid(userns.as_raw_fd()).map_err(|e| errno("NS_GET_OWNER_UID", e))?;
    if owner != nix::unistd::geteuid().as_raw() {
        return Err(format!("its user namespace belongs to uid {owner}"));
    }
    let parent = owned(sys::ns_parent(userns.as_raw_fd()).map_err(|e| errno("NS_GET_PARENT", e))?);
    let ours = std::fs::metadata("/proc/self/ns/user").map_err(|e| e.to_string())?;
    if sys::dev_ino(parent.as_raw_fd()) != Ok((ours.dev(), ours.ino())) {
        return Err("its user namespace is not a child of ours".into());
    }
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{name}")).map_err(|e| format!("{name}: {e}"))
    };
    let (uid_map, gid_map) = mapping.map_texts();
    if normalise(&read("uid_map")?) != normalise(&uid_map)
        || normalise(&read("gid_map")?) != normalise(&gid_map)
    {
        return Err("its maps are not the expected ones".into());
    }
    if read("setgroups")?.trim() != "allow" {
        return Err("setgroups is denied in its namespace".into());
    }
    if !running(&pidfd) {
        return Err("it exited".into());
    }
    Ok((pidfd, userns))
}

/// The start and end of this process's argument strings and of its environment strings
/// (`/proc/self/stat` fields 48 and 49, 50 and 51).
fn argv_area() -> Option<Areas> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(45);
    let mut next = || -> Option<usize> { fields.next()?.parse().ok() };
    let (start, end) = (next()?, next()?);
    let (env_start, env_end) = (next()?, next()?);
    (start < end).then_some(Areas {
        argv: (start, end),
        env: (env_start < env_end).then_some((env_start, env_end)),
    })
}

/// Where a process's argument and environment strings are (see [`argv_area`]).
#[derive(Debug, Clone, Copy)]
struct Areas {
    argv: (usize, usize),
    env: Option<(usize, usize)>,
}

/// Start a detached holder of `mapping` and register it.
fn start_shared(mapping: &Mapping, registry: Registry) -> Result<Holder, crate::Error> {
    // Everything the child needs is ready before the fork (the caller may be multi-threaded).
    let area = argv_area();
    let dir = registry.dir.as_raw_fd();
    let (pid, pidfd) = match crate::clone_alone(libc::CLONE_NEWUSER as u64, true) {
        Ok(sys::Forked::Child) => hold_detached(dir, &registry.name, area),
        // SAFETY: clone returned this pidfd to us; nothing else owns it.
        Ok(sys::Forked::Parent { pid, pidfd }) => (pid, unsafe { OwnedFd::from_raw_fd(pidfd) }),
        Err(e) => return Err(ns_err("clone", e)),
    };
    let userns = map_and_open(mapping, pid, &pidfd)?;
    let entry = match (start_time(pid), sys::dev_ino(userns.as_raw_fd())) {
        (Ok(start), Ok(ns)) => Ok(Entry { pid, start, ns }),
        (Err(_), _) => Err(libc::ESRCH),
        (_, Err(e)) => Err(e),
    };
    if let Err(e) = entry.and_then(|entry| registry.register(entry)) {
        let _ = sys::pidfd_send_signal(pidfd.as_raw_fd(), libc::SIGKILL);
        let _ = sys::waitpid(pid, 0);
        return Err(ns_err("registering it", e));
    }
    tracing::debug!(pid, "shared held user namespace started");
    Ok(Holder {
        mapping: mapping.clone(),
        pid,
        pidfd,
        userns: Arc::new(userns),
        kind: Kind::Shared(registry),
    })
}

/// The shared holder process: detached from its caller (own session, `/`, no descriptor but
/// the registry directory `dir`, default signal actions, a command line of its own), it wakes
/// every [`WAKE_SECS`] and exits once its registry file `name` is gone, names another process,
/// or was not touched for [`IDLE_SECS`]. Allocation-free (the caller may be multi-threaded).
fn hold_detached(dir: RawFd, name: &CStr, area: Option<Areas>) -> ! {
    let _ = sys::setsid();
    let _ = sys::chdir(c"/");
    sys::close_all_except(dir);
    sys::reset_signals();
    retitle(area);
    let me = sys::getpid();
    loop {
        sys::sleep_secs(WAKE_SECS);
        match still_registered(dir, name, me) {
            Registered::Yes => {}
            Registered::No => sys::exit(0),
            Registered::Idle => {
                // Its own entry goes with it (a pid left registered is one another process may
                // come to have).
                let _ = sys::unlinkat(dir, name);
                sys::exit(0);
            }
        }
    }
}

/// What a shared holder finds in its registry file.
enum Registered {
    /// Its entry, touched within [`IDLE_SECS`].
    Yes,
    /// Its entry, untouched for [`IDLE_SECS`].
    Idle,
    /// No entry of it.
    No,
}

/// Whether the registry file `name` still names `me`, and was touched within [`IDLE_SECS`].
/// Allocation-free.
fn still_registered(dir: RawFd, name: &CStr, me: libc::pid_t) -> Registered {
    let fd = match sys::openat(dir, name, FILE_FLAGS, 0) {
        Ok(fd) => owned(fd),
        // Gone, or replaced by what is not a file of ours.
        Err(libc::ENOENT | libc::ELOOP | libc::EACCES | libc::ENOTDIR) => return Registered::No,
        // Short of descriptors or memory for a moment: look again at the next wake.
        Err(_) => return Registered::Yes,
    };
    let Ok(st) = sys::fstat(fd.as_raw_fd()) else {
        return Registered::Yes;
    };
    if read_entry(fd.as_raw_fd()).map(|e| e.pid) != Some(me) {
        return Registered::No;
    }
    if sys::realtime_secs() - st.st_mtime < IDLE_SECS {
        Registered::Yes
    } else {
        Registered::Idle
    }
}

/// Name this process in `ps`: its thread name, and its argument strings overwritten (they are
/// the caller's command line, which would name a command that has long ended); its environment
/// strings zeroed (the caller's, `/proc/<pid>/environ`, which may hold its secrets, while the
/// holder outlives it). Allocation-free.
fn retitle(area: Option<Areas>) {
    let _ = sys::prctl(libc::PR_SET_NAME, COMM.as_ptr() as libc::c_ulong);
    let Some(Areas {
        argv: (start, end),
        env,
    }) = area
    else {
        return;
    };
    if let Some((env_start, env_end)) = env {
        zero_own(env_start, env_end);
    }
    if !zero_own(start, end) {
        return;
    }
    let len = TITLE.len().min(end - start - 1);
    let _ = sys::write_own_memory(start, &TITLE[..len]);
}

/// Zero this process's memory from `start` to `end`; whether all of it was. Allocation-free.
fn zero_own(start: usize, end: usize) -> bool {
    let zeros = [0u8; 256];
    let mut at = start;
    while at < end {
        let n = (end - at).min(zeros.len());
        if sys::write_own_memory(at, &zeros[..n]).is_err() {
            return false;
        }
        at += n;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idmap::Range;

    fn full(start: u32) -> Mapping {
        let r = Range {
            start,
            count: 65536,
        };
        Mapping::Full {
            uid: 1000,
            gid: 1000,
            subuid: r,
            subgid: r,
            helpers: Some(("/usr/bin/newuidmap".into(), "/usr/bin/newgidmap".into())),
        }
    }

    #[test]
    fn registry_names_follow_the_map_lines_only() {
        let a = registry_name(&full(100_000));
        assert_eq!(a.len(), "userns-".len() + 64);
        assert!(a.starts_with("userns-"));
        // The same maps, other helper paths: the same holder.
        let mut b = full(100_000);
        if let Mapping::Full { helpers, .. } = &mut b {
            *helpers = Some(("/bin/newuidmap".into(), "/bin/newgidmap".into()));
        }
        assert_eq!(registry_name(&b), a);
        assert_ne!(registry_name(&full(200_000)), a);
    }

    #[test]
    fn maps_compare_whitespace_normalised() {
        assert_eq!(
            normalise("         0       1000          1\n         1     100000      65536\n"),
            "0 1000 1\n1 100000 65536\n"
        );
        assert_eq!(
            normalise(&full(100_000).map_texts().0),
            "0 1000 1\n1 100000 65536\n"
        );
    }

    #[test]
    fn entries_are_four_plain_decimals() {
        assert_eq!(
            parse_entry(b"1234 567 8 90\n"),
            Some(Entry {
                pid: 1234,
                start: 567,
                ns: (8, 90)
            })
        );
        for bad in [
            &b""[..],
            b"\n",
            b"1234\n",
            b"1234 567 8 90",
            b"0 1 2 3\n",
            b"-1 1 2 3\n",
            b"12 34 5\n",
            b"12 34 5 6 7\n",
            b"12  34 5 6\n",
            b"1234 567 8 90\n\n",
            b"9999999999 1 2 3\n",
            b"1 99999999999999999999999 2 3\n",
        ] {
            assert_eq!(parse_entry(bad), None, "{bad:?}");
        }
    }
}
