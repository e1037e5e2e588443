//! Thin wrappers over the raw system calls the sandbox needs and that `nix`/`libc` do not wrap
//! (clone3, the new mount API, pivot_root, close_range, capset, pidfd).
//!
//! Every function here is async-signal-safe and allocation-free, so it may run in the child
//! between `clone` and `execve` even when the caller was a multi-threaded process. Each returns
//! `Err(errno)` on failure.

use std::ffi::{CStr, CString};
use std::os::fd::RawFd;

use libc::{c_int, c_long, c_uint};

/// The errno of the last failed call.
fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(ret: c_long) -> Result<c_long, i32> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

fn check_int(ret: c_int) -> Result<c_int, i32> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

/// `struct clone_args` of clone3(2), version 0 (64 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// Result of [`fork_with`] in the process that called it.
pub(crate) enum Forked {
    /// We are the new process.
    Child,
    /// We are the caller; the child has this pid and, when asked for, this pidfd.
    Parent { pid: libc::pid_t, pidfd: RawFd },
}

/// Fork-like clone: the child continues on a copy-on-write copy of the caller's stack, with the
/// given namespace flags. When `want_pidfd` is set the parent gets a pidfd of the child (-1
/// otherwise). Falls back to the legacy clone(2) where clone3 is filtered out (ENOSYS), as some
/// container runtimes' seccomp profiles do.
pub(crate) fn fork_with(ns_flags: u64, want_pidfd: bool) -> Result<Forked, i32> {
    let mut pidfd: c_int = -1;
    let mut args = CloneArgs {
        flags: ns_flags
            | if want_pidfd {
                libc::CLONE_PIDFD as u64
            } else {
                0
            },
        pidfd: &mut pidfd as *mut c_int as u64,
        // With CLONE_PARENT the child inherits the caller's exit signal; clone3 refuses another.
        exit_signal: if ns_flags & libc::CLONE_PARENT as u64 != 0 {
            0
        } else {
            libc::SIGCHLD as u64
        },
        ..CloneArgs::default()
    };
    // SAFETY: clone3 with a zero stack behaves like fork(2): the child resumes here on a private
    // copy of the address space. `args` and `pidfd` are valid for the duration of the call. The
    // child only runs allocation-free code afterwards (see child.rs).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    let ret = match check(ret) {
        Ok(r) => r,
        Err(libc::ENOSYS) => return legacy_fork_with(ns_flags, want_pidfd),
        Err(e) => return Err(e),
    };
    if ret == 0 {
        Ok(Forked::Child)
    } else {
        Ok(Forked::Parent {
            pid: ret as libc::pid_t,
            pidfd,
        })
    }
}

fn legacy_fork_with(ns_flags: u64, want_pidfd: bool) -> Result<Forked, i32> {
    // SAFETY: clone(2) with a null stack is fork(2) with namespace flags; the remaining pointer
    // arguments are null, which clone accepts when the matching flags are not set.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (ns_flags as c_long) | c_long::from(libc::SIGCHLD),
            0 as c_long,
            0 as c_long,
            0 as c_long,
            0 as c_long,
        )
    };
    let pid = check(ret)? as libc::pid_t;
    if pid == 0 {
        return Ok(Forked::Child);
    }
    let pidfd = if want_pidfd {
        // SAFETY: pidfd_open takes a pid and flags, no pointers.
        check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })? as RawFd
    } else {
        -1
    };
    Ok(Forked::Parent { pid, pidfd })
}

/// A stack for [`vfork_on`]: a private anonymous mapping, zero pages the kernel supplies as
/// they are first touched, with an inaccessible guard page below it. Mapped rather than
/// allocated: a zeroed heap buffer was written whole by the daemon at every sandbox start —
/// pages that, shared copy-on-write with the sandboxes running meanwhile, each cost a page
/// copy and a TLB-flush interrupt to the other CPUs.
pub(crate) struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is owned by the Stack alone; nothing refers to it from a thread.
unsafe impl Send for Stack {}

impl Stack {
    const GUARD: usize = 4096;

    /// A stack of `size` bytes (a multiple of the page size) plus its guard page.
    pub(crate) fn new(size: usize) -> Result<Stack, i32> {
        let len = size + Self::GUARD;
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses; no pointer of
        // ours is passed.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(errno());
        }
        let stack = Stack { base, len };
        // SAFETY: the first page of the mapping made above, which only this Stack refers to.
        check_int(unsafe { libc::mprotect(base, Self::GUARD, libc::PROT_NONE) })?;
        Ok(stack)
    }

    /// An address inside the stack's usable part (its last byte: with pages larger than the
    /// guard, the page right over the guard is still the guard's).
    pub(crate) fn inside(&self) -> usize {
        self.top() - 1
    }

    /// The stack's top, 16-byte aligned (stacks grow down on every architecture we build for).
    fn top(&self) -> usize {
        (self.base as usize + self.len) & !15
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are the mapping made in `new`, unmapped once, here; whoever ran
        // on it (a vforked child) has exec'd or exited before its Prepared is dropped.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// vfork-like start of `f(arg)` on `stack`, sharing our memory: the caller is suspended until
/// the child execs or exits, so nothing it owns is touched concurrently, and no address space is
/// copied (cheaper than a fork of a large caller). Returns the child's pid.
///
/// # Safety
///
/// `stack` must stay alive and untouched until the child has exec'd or exited, and `f` must be
/// safe to run on it with `arg`, sharing this process's memory (no allocation, no locks).
pub(crate) unsafe fn vfork_on(
    stack: &Stack,
    f: extern "C" fn(*mut libc::c_void) -> c_int,
    arg: *mut libc::c_void,
) -> Result<libc::pid_t, i32> {
    let top = stack.top();
    // SAFETY: `top` is the aligned end of a live, writable mapping the caller keeps until the
    // child has exec'd or exited (CLONE_VFORK blocks us until then); `f` and `arg` are valid
    // per this function's contract.
    let pid = unsafe {
        libc::clone(
            f,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            arg,
        )
    };
    check_int(pid)
}

/// Send a signal through a pidfd (no pid-reuse race).
pub(crate) fn pidfd_send_signal(pidfd: RawFd, sig: c_int) -> Result<(), i32> {
    // SAFETY: pidfd_send_signal with a null siginfo and no flags has no memory arguments.
    check(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })
    .map(drop)
}

/// open_tree(2) with OPEN_TREE_CLONE (and AT_RECURSIVE): a detached copy of the mount at `path`.
pub(crate) fn open_tree_clone(path: &CStr, recursive: bool) -> Result<RawFd, i32> {
    const OPEN_TREE_CLONE: c_uint = 1;
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as c_uint;
    }
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    check(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) })
        .map(|fd| fd as RawFd)
}

/// The device and inode of the file `fd` refers to (`fstat`).
pub(crate) fn dev_ino(fd: RawFd) -> Result<(u64, u64), i32> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is writable memory of the size of a `struct stat`, which fstat fills.
    check_int(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so `st` is initialised (it was zeroed before anyway).
    let st = unsafe { st.assume_init() };
    Ok((st.st_dev, st.st_ino))
}

/// Mount attribute bits of fsmount(2) and mount_setattr(2).
pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x4;
pub(crate) const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// A new, detached filesystem instance (fsopen + fsconfig + fsmount): `proc` of the caller's PID
/// namespace, `sysfs` of its network namespace. Created before pivot_root, because the kernel
/// only allows them in a user namespace while a fully visible instance exists in the mount
/// namespace.
pub(crate) fn fresh_mount(
    fstype: &CStr,
    options: &[(CString, Option<CString>)],
    attrs: u64,
) -> Result<RawFd, i32> {
    const FSOPEN_CLOEXEC: c_uint = 1;
    const FSCONFIG_SET_FLAG: c_uint = 0;
    const FSCONFIG_SET_STRING: c_uint = 1;
    const FSCONFIG_CMD_CREATE: c_uint = 6;
    const FSMOUNT_CLOEXEC: c_uint = 1;
    // SAFETY: `fstype` is a valid NUL-terminated string.
    let fsfd = check(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) })?
        as RawFd;
    let result = (|| {
        for (key, value) in options {
            let (cmd, value) = match value {
                Some(v) => (FSCONFIG_SET_STRING, v.as_ptr()),
                None => (FSCONFIG_SET_FLAG, std::ptr::null()),
            };
            // SAFETY: key is a valid NUL-terminated string, value one or null (a flag); fsfd is
            // ours.
            check(unsafe { libc::syscall(libc::SYS_fsconfig, fsfd, cmd, key.as_ptr(), value, 0) })?;
        }
        // SAFETY: FSCONFIG_CMD_CREATE takes no key or value.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fsfd,
                FSCONFIG_CMD_CREATE,
                std::ptr::null::<libc::c_char>(),
                std::ptr::null::<libc::c_void>(),
                0,
            )
        })?;
        // SAFETY: fsmount takes the configured fs context and integer flags.
        check(unsafe { libc::syscall(libc::SYS_fsmount, fsfd, FSMOUNT_CLOEXEC, attrs) })
            .map(|fd| fd as RawFd)
    })();
    // SAFETY: `fsfd` was opened above by fsopen and is not used after this.
    unsafe { close(fsfd) };
    result
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Make a mount (given as an fd from open_tree, or a path) read-only, recursively if asked.
pub(crate) fn set_readonly(dirfd: RawFd, path: &CStr, recursive: bool) -> Result<(), i32> {
    let mut flags = libc::AT_EMPTY_PATH as c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as c_uint;
    }
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is NUL-terminated and `attr` is a valid mount_attr whose size is passed.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// move_mount(2) of a detached tree (fd from open_tree) onto `target`.
pub(crate) fn move_mount_fd(fd: RawFd, target: &CStr) -> Result<(), i32> {
    const MOVE_MOUNT_F_EMPTY_PATH: c_uint = 0x4;
    // SAFETY: both strings are valid and NUL-terminated ("" for the empty from-path).
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd,
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// mount(2) with optional source, fstype and data.
pub(crate) fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> Result<(), i32> {
    let p = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is either null or a valid NUL-terminated string.
    check_int(unsafe { libc::mount(p(source), target.as_ptr(), p(fstype), flags, p(data).cast()) })
        .map(drop)
}

pub(crate) fn umount_detach(target: &CStr) -> Result<(), i32> {
    // SAFETY: `target` is a valid NUL-terminated string.
    check_int(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) }).map(drop)
}

pub(crate) fn pivot_root(new_root: &CStr, put_old: &CStr) -> Result<(), i32> {
    // SAFETY: both arguments are valid NUL-terminated strings.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) })
        .map(drop)
}

pub(crate) fn chdir(path: &CStr) -> Result<(), i32> {
    // SAFETY: `path` is a valid NUL-terminated string.
    check_int(unsafe { libc::chdir(path.as_ptr()) }).map(drop)
}

pub(crate) fn mkdir(path: &CStr, mode: libc::mode_t) -> Result<(), i32> {
    // SAFETY: `path` is a valid NUL-terminated string.
    match check_int(unsafe { libc::mkdir(path.as_ptr(), mode) }) {
        Ok(_) | Err(libc::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Create an empty file to bind a file onto, unless something exists there already.
pub(crate) fn touch(path: &CStr) -> Result<(), i32> {
    // SAFETY: `path` is a valid NUL-terminated string; the fd is closed right away.
    let fd = check_int(unsafe {
        libc::open(
            path.as_ptr(),
            // Non-blocking: a FIFO the image put at a mount point would block init here, and the
            // sandbox's start with it, for ever.
            libc::O_RDONLY
                | libc::O_CREAT
                | libc::O_CLOEXEC
                | libc::O_NOFOLLOW
                | libc::O_NONBLOCK
                | libc::O_NOCTTY,
            0o644 as c_uint,
        )
    });
    match fd {
        Ok(fd) => {
            // SAFETY: `fd` was just opened and is not used after this.
            unsafe { close(fd) };
            Ok(())
        }
        // O_NOFOLLOW on an existing symlink: something is there; the bind will follow it.
        Err(libc::ELOOP | libc::EISDIR) => Ok(()),
        Err(e) => Err(e),
    }
}

pub(crate) fn symlink(target: &CStr, link: &CStr) -> Result<(), i32> {
    // SAFETY: both are valid NUL-terminated strings.
    match check_int(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) }) {
        Ok(_) | Err(libc::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

pub(crate) fn sethostname(name: &CStr) -> Result<(), i32> {
    let bytes = name.to_bytes();
    // SAFETY: the pointer and length describe `name`'s bytes.
    check_int(unsafe { libc::sethostname(bytes.as_ptr().cast(), bytes.len()) }).map(drop)
}

/// Close a raw descriptor.
///
/// # Safety
///
/// `fd` must be owned by the caller and not used (nor owned by an `OwnedFd`) afterwards.
pub(crate) unsafe fn close(fd: RawFd) {
    // SAFETY: the caller owns `fd` and gives it up; errors are irrelevant here.
    unsafe { libc::close(fd) };
}

/// Close every descriptor but `keep` (errors are irrelevant: nothing else may stay open).
pub(crate) fn close_all_except(keep: RawFd) {
    close_all_but(&[keep]);
}

/// Close every descriptor but those in `keep` (ascending, no duplicates, none negative).
pub(crate) fn close_all_but(keep: &[RawFd]) {
    let mut first: c_uint = 0;
    for &k in keep {
        let k = k as c_uint;
        if k > first {
            let _ = close_range(first, k - 1, false);
        }
        first = k + 1;
    }
    let _ = close_range(first, c_uint::MAX, false);
}

/// close_range(2); with `cloexec` the descriptors are only marked close-on-exec.
pub(crate) fn close_range(first: c_uint, last: c_uint, cloexec: bool) -> Result<(), i32> {
    const CLOSE_RANGE_CLOEXEC: c_uint = 1 << 2;
    let flags = if cloexec { CLOSE_RANGE_CLOEXEC } else { 0 };
    // SAFETY: close_range takes plain integers.
    check(unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) }).map(drop)
}

pub(crate) fn dup2(old: RawFd, new: RawFd) -> Result<(), i32> {
    if old == new {
        // dup2 to itself keeps FD_CLOEXEC; clear it so the descriptor survives exec.
        // SAFETY: fcntl on a descriptor we own.
        return check_int(unsafe { libc::fcntl(old, libc::F_SETFD, 0) }).map(drop);
    }
    // SAFETY: dup2 takes plain integers.
    check_int(unsafe { libc::dup2(old, new) }).map(drop)
}

pub(crate) fn write_all(fd: RawFd, mut buf: &[u8]) -> Result<(), i32> {
    while !buf.is_empty() {
        // SAFETY: the pointer and length describe `buf`.
        match check(unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) } as c_long) {
            Ok(n) => buf = &buf[n as usize..],
            Err(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Read into `buf` until it is full or EOF; returns the number of bytes read.
pub(crate) fn read_full(fd: RawFd, buf: &mut [u8]) -> Result<usize, i32> {
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        // SAFETY: the pointer and length describe `rest`.
        match check(unsafe { libc::read(fd, rest.as_mut_ptr().cast(), rest.len()) } as c_long) {
            Ok(0) => break,
            Ok(n) => got += n as usize,
            Err(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The size of a page (4096 when the system does not say).
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf takes an integer and reads no memory of ours.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n)
        .ok()
        .filter(|n| n.is_power_of_two())
        .unwrap_or(4096)
}

/// The calling thread's control block (glibc's `struct pthread`, where its thread pointer
/// points: errno and the stack protector's canary are addressed from it).
pub(crate) fn thread_pointer() -> usize {
    // SAFETY: pthread_self only reads the thread pointer register.
    unsafe { libc::pthread_self() as usize }
}

/// Unmap `len` bytes at `start` of this process (release.rs: init dropping its copy of the
/// caller's memory). Whatever was mapped there must not be used afterwards.
pub(crate) fn unmap(start: usize, len: usize) {
    // SAFETY: munmap only changes this process's mappings; the caller (init, after its job
    // exec'd) touches nothing in the range afterwards, and keeps its stack out of it.
    unsafe { libc::munmap(start as *mut libc::c_void, len) };
}

pub(crate) fn prctl(option: c_int, arg: libc::c_ulong) -> Result<(), i32> {
    // SAFETY: the prctl options used here take integer arguments only.
    check_int(unsafe { libc::prctl(option, arg, 0, 0, 0) }).map(drop)
}

pub(crate) fn setresuid(uid: libc::uid_t) -> Result<(), i32> {
    // SAFETY: plain integers. Raw syscall: glibc's wrapper would broadcast to other threads.
    check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }).map(drop)
}

pub(crate) fn setresgid(gid: libc::gid_t) -> Result<(), i32> {
    // SAFETY: plain integers. Raw syscall for the same reason as setresuid.
    check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) }).map(drop)
}

pub(crate) fn setgroups(groups: &[libc::gid_t]) -> Result<(), i32> {
    // SAFETY: the pointer and length describe `groups`. Raw syscall, not glibc's broadcast.
    check(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) }).map(drop)
}

pub(crate) fn setrlimit(resource: c_int, soft: u64, hard: u64) -> Result<(), i32> {
    let lim = libc::rlimit64 {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: prlimit64 on ourselves (pid 0) with a valid new limit and no old-limit output.
    check(unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            0,
            resource,
            &lim as *const libc::rlimit64,
            std::ptr::null_mut::<libc::rlimit64>(),
        )
    })
    .map(drop)
}

/// Set the effective, permitted and inheritable capability sets to `mask` (64 bits).
pub(crate) fn capset(mask: u64) -> Result<(), i32> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let lo = mask as u32;
    let hi = (mask >> 32) as u32;
    let data = [
        Data {
            effective: lo,
            permitted: lo,
            inheritable: lo,
        },
        Data {
            effective: hi,
            permitted: hi,
            inheritable: hi,
        },
    ];
    // SAFETY: header and the two data structs are the layout capset(2) version 3 expects.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) })
        .map(drop)
}

/// Reset every catchable signal to its default action and unblock all signals.
pub(crate) fn reset_signals() {
    default_actions();
    set_sigmask(&empty_sigset());
}

/// Every catchable signal's action set to its default.
fn default_actions() {
    for sig in 1..libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: resetting a signal to SIG_DFL; failures (invalid signal numbers) are harmless.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}

/// Every signal's default action, the mask kept, and no alternate signal stack: what init
/// has before it unmaps its copy of the caller's memory (release.rs) — a handler inherited from
/// the caller (Rust's for SIGSEGV runs on an alternate stack of the caller's heap) would run on
/// memory that is gone.
pub(crate) fn default_handlers() {
    default_actions();
    let off = libc::stack_t {
        ss_sp: std::ptr::null_mut(),
        ss_flags: libc::SS_DISABLE,
        ss_size: 0,
    };
    // SAFETY: `off` is a valid stack_t asking for no alternate stack; the old one is not read.
    unsafe { libc::sigaltstack(&off, std::ptr::null_mut()) };
}

pub(crate) fn empty_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        set
    }
}

pub(crate) fn sigset_of(signals: &[c_int]) -> libc::sigset_t {
    let mut set = empty_sigset();
    for &s in signals {
        // SAFETY: `set` is an initialised sigset_t.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

pub(crate) fn set_sigmask(set: &libc::sigset_t) {
    // SAFETY: `set` is an initialised sigset_t; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, set, std::ptr::null_mut()) };
}

/// Wait for one of the signals in `set` (which must be blocked).
pub(crate) fn sigwaitinfo(set: &libc::sigset_t) -> Result<libc::siginfo_t, i32> {
    // SAFETY: siginfo_t is plain data filled in by the kernel; `set` is initialised.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        check_int(libc::sigwaitinfo(set, &mut info)).map(|_| info)
    }
}

pub(crate) fn kill(pid: libc::pid_t, sig: c_int) -> Result<(), i32> {
    // SAFETY: kill takes plain integers.
    check_int(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// waitpid(2); returns (pid, raw status).
pub(crate) fn waitpid(pid: libc::pid_t, flags: c_int) -> Result<(libc::pid_t, c_int), i32> {
    let mut status: c_int = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        match check_int(unsafe { libc::waitpid(pid, &mut status, flags) }) {
            Ok(p) => return Ok((p, status)),
            Err(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// execve(2); returns the errno when it fails.
///
/// # Safety
///
/// `argv` and `envp` must be NUL-terminated arrays of pointers to NUL-terminated strings, alive
/// for the call.
pub(crate) unsafe fn execve(
    path: &CStr,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> i32 {
    // SAFETY: argv and envp are valid per this function's contract; execve only returns on
    // failure.
    unsafe { libc::execve(path.as_ptr(), argv, envp) };
    errno()
}

/// Bring the loopback interface of the current network namespace up.
pub(crate) fn loopback_up() -> Result<(), i32> {
    // SAFETY: a plain datagram socket used only for the interface ioctls below, then closed.
    let sock = check_int(unsafe {
        libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
    })?;
    // SAFETY: ifreq is plain data; the name "lo" fits in IFNAMSIZ with its NUL.
    let result = unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        check_int(libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req)).and_then(|_| {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            check_int(libc::ioctl(sock, libc::SIOCSIFFLAGS, &req))
        })
    };
    // SAFETY: `sock` was opened above and is not used after this.
    unsafe { close(sock) };
    result.map(drop)
}

pub(crate) fn exit(code: c_int) -> ! {
    // SAFETY: _exit never returns and runs no atexit handlers or destructors, which is what a
    // forked child of a possibly multi-threaded process must do.
    unsafe { libc::_exit(code) }
}

/// A pipe whose both ends are close-on-exec; returns (read, write).
pub(crate) fn pipe() -> Result<(RawFd, RawFd), i32> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors.
    check_int(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((fds[0], fds[1]))
}

/// Join a new anonymous session keyring (`KEYCTL_JOIN_SESSION_KEYRING` with no name), so that
/// nothing of the caller's session keyring is reachable and nothing added reaches it.
pub(crate) fn join_new_session_keyring() -> Result<(), i32> {
    const KEYCTL_JOIN_SESSION_KEYRING: c_long = 1;
    // SAFETY: a null name asks for a new anonymous keyring; no other pointer is passed.
    check(unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    })
    .map(drop)
}

/// Install a seccomp filter on the calling thread (no_new_privs must be set already).
pub(crate) fn seccomp_install(prog: &libc::sock_fprog) -> Result<(), i32> {
    // SAFETY: `prog` points to a valid program the caller keeps alive for the duration of the
    // call; the kernel copies it.
    check(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as c_uint,
            prog as *const libc::sock_fprog,
        )
    })
    .map(drop)
}

/// Write `data` to the existing file `path` (a sysctl of the sandbox's own namespaces).
pub(crate) fn write_file(path: &CStr, data: &[u8]) -> Result<(), i32> {
    // SAFETY: `path` is a valid NUL-terminated string; the fd is closed below.
    let fd = check_int(unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) })?;
    let r = write_all(fd, data);
    // SAFETY: `fd` was opened above and is not used after this.
    unsafe { close(fd) };
    r
}

/// setns(2): join the namespace `fd` refers to (`nstype` one CLONE_NEW* flag, or 0).
pub(crate) fn setns(fd: RawFd, nstype: c_int) -> Result<(), i32> {
    // SAFETY: plain integers.
    check_int(unsafe { libc::setns(fd, nstype) }).map(drop)
}

/// pidfd_open(2): a pidfd for `pid`, close-on-exec.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> Result<RawFd, i32> {
    // SAFETY: plain integers; the kernel returns a new descriptor or an error.
    check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) }).map(|fd| fd as RawFd)
}

/// Write the decimal form of `n` into `buf`, returning the digits written (no allocation).
pub(crate) fn format_u32(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// unshare(2) of the calling thread.
pub(crate) fn unshare(flags: c_int) -> Result<(), i32> {
    // SAFETY: plain integers.
    check_int(unsafe { libc::unshare(flags) }).map(drop)
}

/// A pair of connected Unix stream sockets, close-on-exec.
pub(crate) fn socketpair() -> Result<(RawFd, RawFd), i32> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors.
    check_int(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    Ok((fds[0], fds[1]))
}

/// Send `data` over the Unix socket `sock`, with descriptor `fd` attached when it is not -1
/// (SCM_RIGHTS). Allocation-free: the control message lives on the stack.
pub(crate) fn send_with_fd(sock: RawFd, data: &[u8], fd: RawFd) -> Result<(), i32> {
    #[repr(C)]
    union Control {
        buf: [u8; 64],
        _align: libc::cmsghdr,
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = Control { buf: [0; 64] };
    // SAFETY: msghdr is plain data; the fields set below point into `iov` and `control`, which
    // outlive the call; the control buffer is aligned for cmsghdr and large enough for one
    // descriptor (CMSG_SPACE(4) ≤ 24).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if fd >= 0 {
            let space = libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) as usize;
            msg.msg_control = control.buf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<c_int>() as u32) as _;
            std::ptr::copy_nonoverlapping(
                (&fd as *const c_int).cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                std::mem::size_of::<c_int>(),
            );
        }
        loop {
            match check(libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) as c_long) {
                Err(libc::EINTR) => continue,
                other => return other.map(drop),
            }
        }
    }
}

/// Receive up to `buf.len()` bytes from the Unix socket `sock` and the descriptor sent with
/// them, if any (made close-on-exec). Returns (bytes, descriptor or -1).
pub(crate) fn recv_with_fd(sock: RawFd, buf: &mut [u8]) -> Result<(usize, RawFd), i32> {
    #[repr(C)]
    union Control {
        buf: [u8; 64],
        _align: libc::cmsghdr,
    }
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = Control { buf: [0; 64] };
    // SAFETY: as in send_with_fd; the kernel fills in at most msg_controllen bytes of control
    // data, and a descriptor is read only from a SCM_RIGHTS message it wrote.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.buf.as_mut_ptr().cast();
        msg.msg_controllen = 64;
        let n = loop {
            match check(libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) as c_long) {
                Err(libc::EINTR) => continue,
                other => break other?,
            }
        };
        let mut fd = -1;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if !cmsg.is_null()
            && (*cmsg).cmsg_level == libc::SOL_SOCKET
            && (*cmsg).cmsg_type == libc::SCM_RIGHTS
        {
            std::ptr::copy_nonoverlapping(
                libc::CMSG_DATA(cmsg),
                (&mut fd as *mut c_int).cast::<u8>(),
                std::mem::size_of::<c_int>(),
            );
        }
        Ok((n as usize, fd))
    }
}

/// Install a seccomp filter on the calling thread with a user-notification listener, whose
/// descriptor is returned (no_new_privs must be set already, or the caller privileged).
pub(crate) fn seccomp_install_listener(prog: &libc::sock_fprog) -> Result<RawFd, i32> {
    // SAFETY: `prog` points to a valid program the caller keeps alive for the duration of the
    // call; the kernel copies it.
    check(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER as c_uint,
            prog as *const libc::sock_fprog,
        )
    })
    .map(|fd| fd as RawFd)
}

/// The sizes of the seccomp notification structures this kernel uses.
pub(crate) fn seccomp_notif_sizes() -> Result<libc::seccomp_notif_sizes, i32> {
    // SAFETY: seccomp_notif_sizes is plain data the kernel fills in.
    unsafe {
        let mut sizes: libc::seccomp_notif_sizes = std::mem::zeroed();
        check(libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_NOTIF_SIZES,
            0 as c_uint,
            &mut sizes as *mut libc::seccomp_notif_sizes,
        ))?;
        Ok(sizes)
    }
}

/// Receive one notification on a seccomp listener into `buf` (at least as large as the kernel's
/// `seccomp_notif`, see [`seccomp_notif_sizes`], and 8-byte aligned: it is a `u64` slice).
pub(crate) fn seccomp_notif_recv(
    listener: RawFd,
    buf: &mut [u64],
) -> Result<libc::seccomp_notif, i32> {
    if std::mem::size_of_val(buf) < std::mem::size_of::<libc::seccomp_notif>() {
        return Err(libc::EINVAL);
    }
    buf.fill(0);
    loop {
        // SAFETY: `buf` is zeroed (the kernel requires it), aligned and large enough for the
        // kernel's seccomp_notif (checked by the caller with the kernel's sizes).
        let r = unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_RECV, buf.as_mut_ptr()) };
        match check_int(r) {
            Err(libc::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(_) => break,
        }
    }
    // SAFETY: the kernel wrote a seccomp_notif at the start of `buf`, which is aligned for it.
    Ok(unsafe { std::ptr::read(buf.as_ptr().cast::<libc::seccomp_notif>()) })
}

/// Whether notification `id` is still pending (its process has not died or been interrupted).
pub(crate) fn seccomp_notif_id_valid(listener: RawFd, id: u64) -> bool {
    // SAFETY: the ioctl reads one u64 from the pointer.
    unsafe {
        libc::ioctl(
            listener,
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
            &id as *const u64,
        ) == 0
    }
}

/// Answer notification `id`: let the system call run (`Ok`) or fail it with an errno.
pub(crate) fn seccomp_notif_respond(
    listener: RawFd,
    id: u64,
    answer: Result<(), i32>,
) -> Result<(), i32> {
    let mut resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error: 0,
        flags: 0,
    };
    match answer {
        Ok(()) => resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        Err(e) => resp.error = -e,
    }
    // SAFETY: `resp` is a valid seccomp_notif_resp for the duration of the call.
    check_int(unsafe {
        libc::ioctl(
            listener,
            libc::SECCOMP_IOCTL_NOTIF_SEND,
            &mut resp as *mut libc::seccomp_notif_resp,
        )
    })
    .map(drop)
}

/// Read `buf.len()` bytes at address `addr` of process `pid` (process_vm_readv). Fails unless
/// every byte could be read.
pub(crate) fn read_process_memory(pid: libc::pid_t, addr: u64, buf: &mut [u8]) -> Result<(), i32> {
    if buf.is_empty() {
        return Ok(());
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes our own writable buffer; `remote` is only an address in the
    // other process, which the kernel checks.
    let n = check(unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) } as c_long)?;
    if n as usize == buf.len() {
        Ok(())
    } else {
        Err(libc::EFAULT)
    }
}

/// poll(2) on `fds` with a timeout in milliseconds (-1: none); EINTR is retried.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: c_int) -> Result<usize, i32> {
    loop {
        // SAFETY: the pointer and length describe `fds`.
        match check_int(unsafe {
            libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms)
        }) {
            Err(libc::EINTR) => continue,
            other => return other.map(|n| n as usize),
        }
    }
}

/// Open `path` (a namespace file, `/dev/null`...) read-only and close-on-exec.
pub(crate) fn open_read(path: &CStr) -> Result<RawFd, i32> {
    // SAFETY: `path` is a valid NUL-terminated string.
    check_int(unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) })
}

/// Open `path` for reading and writing, close-on-exec.
pub(crate) fn open_rdwr(path: &CStr) -> Result<RawFd, i32> {
    // SAFETY: `path` is a valid NUL-terminated string.
    check_int(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })
}

/// Duplicate `fd` to a descriptor ≥ `min`, close-on-exec.
pub(crate) fn dup_above(fd: RawFd, min: RawFd) -> Result<RawFd, i32> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we hold.
    check_int(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) })
}

/// The parent's pid (to notice a parent that died before PR_SET_PDEATHSIG took effect).
pub(crate) fn getppid() -> libc::pid_t {
    // SAFETY: getppid takes no arguments and cannot fail.
    unsafe { libc::getppid() }
}

/// setsid(2): a new session and process group.
pub(crate) fn setsid() -> Result<(), i32> {
    // SAFETY: setsid takes no arguments.
    check_int(unsafe { libc::setsid() }).map(drop)
}

/// One read(2) into `buf`; EINTR is retried. Returns the bytes read (0: EOF).
pub(crate) fn read_some(fd: RawFd, buf: &mut [u8]) -> Result<usize, i32> {
    loop {
        // SAFETY: the pointer and length describe `buf`.
        match check(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } as c_long) {
            Err(libc::EINTR) => continue,
            other => return other.map(|n| n as usize),
        }
    }
}

/// pidfd_getfd(2): a copy (close-on-exec) of descriptor `fd` of the process `pidfd` refers to.
pub(crate) fn pidfd_getfd(pidfd: RawFd, fd: RawFd) -> Result<RawFd, i32> {
    // SAFETY: plain integers; the kernel returns a new descriptor or an error.
    check(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) }).map(|fd| fd as RawFd)
}

/// openat(2) of `name` relative to the directory `dir`, with `flags` (close-on-exec added) and
/// `mode` for a file it creates.
pub(crate) fn openat(
    dir: RawFd,
    name: &CStr,
    flags: c_int,
    mode: libc::mode_t,
) -> Result<RawFd, i32> {
    loop {
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
        match check_int(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })
        {
            Err(libc::EINTR) => continue,
            other => return other,
        }
    }
}

/// fstat(2): the status of the file `fd` refers to.
pub(crate) fn fstat(fd: RawFd) -> Result<libc::stat, i32> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is writable memory of the size of a `struct stat`, which fstat fills.
    check_int(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so `st` is initialised (it was zeroed before anyway).
    Ok(unsafe { st.assume_init() })
}

/// renameat(2) within one directory: `from` replaces `to` atomically.
pub(crate) fn renameat(dir: RawFd, from: &CStr, to: &CStr) -> Result<(), i32> {
    // SAFETY: both names are valid NUL-terminated strings for the duration of the call.
    check_int(unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) }).map(drop)
}

/// unlinkat(2) of the file (not directory) `name` in `dir`.
pub(crate) fn unlinkat(dir: RawFd, name: &CStr) -> Result<(), i32> {
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    check_int(unsafe { libc::unlinkat(dir, name.as_ptr(), 0) }).map(drop)
}

/// futimens(2) with null times: the file's access and modification times become now.
pub(crate) fn futimens_now(fd: RawFd) -> Result<(), i32> {
    // SAFETY: a null times pointer means "now" for both; no other memory is passed.
    check_int(unsafe { libc::futimens(fd, std::ptr::null()) }).map(drop)
}

/// `NS_GET_OWNER_UID` (ioctl_ns(2)): the uid (in the caller's user namespace) that owns the
/// user namespace `fd` refers to.
pub(crate) fn ns_owner_uid(fd: RawFd) -> Result<libc::uid_t, i32> {
    const NS_GET_OWNER_UID: libc::Ioctl = 0xb704; // _IO(0xb7, 0x4)
    let mut uid: libc::uid_t = 0;
    // SAFETY: the ioctl writes one uid_t to the pointer, which points to `uid`.
    check_int(unsafe { libc::ioctl(fd, NS_GET_OWNER_UID, &mut uid as *mut libc::uid_t) })?;
    Ok(uid)
}

/// `NS_GET_PARENT` (ioctl_ns(2)): a new close-on-exec descriptor of the parent of the user
/// namespace `fd` refers to (EPERM when that parent is outside the caller's reach).
pub(crate) fn ns_parent(fd: RawFd) -> Result<RawFd, i32> {
    const NS_GET_PARENT: libc::Ioctl = 0xb702; // _IO(0xb7, 0x2)
                                               // SAFETY: NS_GET_PARENT takes no argument and returns a new descriptor.
    check_int(unsafe { libc::ioctl(fd, NS_GET_PARENT) })
}

/// Sleep for `secs` seconds (nanosleep; a signal may end it early).
pub(crate) fn sleep_secs(secs: u32) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::from(secs),
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec; no remainder is asked for.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

/// The wall clock (CLOCK_REALTIME), whole seconds since the epoch.
pub(crate) fn realtime_secs() -> libc::time_t {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec
}

/// getpid(2), as a system call (no cached value from before a raw clone).
pub(crate) fn getpid() -> libc::pid_t {
    // SAFETY: getpid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_getpid) as libc::pid_t }
}

/// Copy `data` to address `addr` of this very process through the kernel (process_vm_writev):
/// an address that is not mapped writable fails with EFAULT instead of faulting. For memory no
/// Rust value lives in (the argument strings the kernel put above the initial stack).
pub(crate) fn write_own_memory(addr: usize, data: &[u8]) -> Result<(), i32> {
    let local = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: `local` describes our own readable buffer; `remote` is an address the kernel
    // checks (mapped and writable) before it writes there.
    let n =
        check(unsafe { libc::process_vm_writev(getpid(), &local, 1, &remote, 1, 0) } as c_long)?;
    if n as usize == data.len() {
        Ok(())
    } else {
        Err(libc::EFAULT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vforked child runs on a mapped stack: its writes there are seen by the caller (the
    /// memory is shared until exec or exit), and the stack's top is aligned.
    #[test]
    fn a_vforked_child_runs_on_a_mapped_stack() {
        extern "C" fn child(arg: *mut libc::c_void) -> c_int {
            // SAFETY: `arg` is the `u64` the test passed; the test is suspended until we exit.
            unsafe { *(arg as *mut u64) = 42 };
            // SAFETY: _exit ends this child at once, touching nothing of the caller's.
            unsafe { libc::_exit(7) }
        }
        let stack = match Stack::new(64 * 1024) {
            Ok(s) => s,
            Err(e) => panic!("mapping a stack: {}", crate::errno_text(e)),
        };
        assert_eq!(stack.top() % 16, 0);
        let mut seen = 0u64;
        // SAFETY: `stack` outlives the child (vfork suspends us until it exits); `child` only
        // writes the u64 it is given and exits.
        let pid = unsafe { vfork_on(&stack, child, &mut seen as *mut u64 as *mut libc::c_void) }
            .expect("vfork");
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer for the child's wait status.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 7);
        assert_eq!(seen, 42);
    }
}
