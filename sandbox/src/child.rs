//! The code that runs after `clone`: the sandbox's init (PID 1) and the job process it forks.
//!
//! Nothing here allocates or takes a lock: the caller may have been multi-threaded, and only
//! async-signal-safe system calls are allowed until `execve`. All inputs were prepared by the
//! parent in [`Prepared`]. A failure is written to the report pipe as a fixed-size [`Report`]
//! (stage, errno, index) that the parent turns into a message.

use std::ffi::CString;
use std::os::fd::RawFd;

use crate::plan::Op;
use crate::release::Keep;
use crate::sys;

/// Where in the set-up a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Stage {
    Hostname = 1,
    /// `index` is the failing operation of the plan.
    Op = 2,
    Fork = 3,
    Setsid = 4,
    Stdio = 5,
    /// `index` is the rlimit.
    Rlimit = 6,
    CapBound = 7,
    Groups = 8,
    Gid = 9,
    Uid = 10,
    CapSet = 11,
    NoNewPrivs = 12,
    Chdir = 13,
    /// `index` is the exec candidate; `u32::MAX` when PATH had no such program.
    Exec = 14,
    Keyring = 15,
    /// `index` is the filter.
    Seccomp = 16,
}

impl Stage {
    pub(crate) fn from_raw(v: u32) -> Option<Stage> {
        use Stage::*;
        [
            Hostname, Op, Fork, Setsid, Stdio, Rlimit, CapBound, Groups, Gid, Uid, CapSet,
            NoNewPrivs, Chdir, Exec, Keyring, Seccomp,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }
}

/// A failure record on the report pipe.
pub(crate) struct Report {
    pub stage: Stage,
    pub errno: i32,
    pub index: u32,
}

pub(crate) const REPORT_LEN: usize = 12;

impl Report {
    pub(crate) fn decode(buf: &[u8; REPORT_LEN]) -> Option<Report> {
        let word = |i: usize| [buf[i], buf[i + 1], buf[i + 2], buf[i + 3]];
        Some(Report {
            stage: Stage::from_raw(u32::from_ne_bytes(word(0)))?,
            errno: i32::from_ne_bytes(word(4)),
            index: u32::from_ne_bytes(word(8)),
        })
    }
}

/// Everything the child needs, built by the parent before clone.
pub(crate) struct Prepared {
    pub ops: Vec<Op>,
    /// Descriptors of grabbed trees, filled in by the child (preallocated, never grown).
    pub slots: Vec<RawFd>,
    pub hostname: CString,
    pub argv: Vec<CString>,
    pub argv_ptrs: Vec<*const libc::c_char>,
    pub envp: Vec<CString>,
    pub envp_ptrs: Vec<*const libc::c_char>,
    pub exec_candidates: Vec<CString>,
    pub cwd: CString,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub setgroups_allowed: bool,
    /// init switches to uid/gid 0 of the namespace first (the caller's ids are not mapped).
    pub become_root: bool,
    /// Capabilities kept (bit n = capability n).
    pub cap_mask: u64,
    pub last_cap: u32,
    pub rlimits: Vec<(libc::c_int, u64, u64)>,
    /// Descriptors that become the job's 0, 1 and 2.
    pub stdio: [RawFd; 3],
    /// The parent writes one byte here once the id maps are written.
    pub sync_read: RawFd,
    /// Failure reports; closed (by exec or exit) once the job runs.
    pub report_write: RawFd,
    /// init writes the job's raw wait status here.
    pub status_write: RawFd,
    /// Stack of the job process between its vfork-like start and exec.
    pub job_stack: crate::sys::Stack,
    /// Seccomp filters the job installs last, in order; they point into `seccomp_program`.
    pub seccomp: Vec<libc::sock_fprog>,
    pub seccomp_program: Option<std::sync::Arc<crate::seccomp::Program>>,
    /// Where the heap buffers above are (filled by [`Prepared::finish_pointers`]): init (or a
    /// held start's intermediate) unmaps every other region of its copy of the caller's
    /// memory first thing (release.rs).
    pub keep: Keep,
    /// Whether this copy of the caller's memory was already given back (by the intermediate,
    /// before it forked init).
    pub released: bool,
}

/// What the intermediate process of a start in a held user namespace needs (holder.rs).
pub(crate) struct Held {
    /// The held user namespace.
    pub userns: RawFd,
    /// An isolated network namespace (owned by the held user namespace) to start init in, or -1.
    pub netns: RawFd,
    pub uid_map: Vec<u8>,
    pub gid_map: Vec<u8>,
    /// Switch to uid/gid 0 of the held namespace first (the caller's ids are not mapped there).
    pub become_root: bool,
    /// Namespaces of init (a new user namespace among them).
    pub flags: u64,
    /// Where the intermediate reports: [0, init's pid] or [stage, errno].
    pub report: RawFd,
}

/// Stages of [`intermediate_main`] that can fail, as reported.
pub(crate) const HELD_SETNS: i32 = 1;
pub(crate) const HELD_IDS: i32 = 2;
pub(crate) const HELD_CLONE: i32 = 3;
pub(crate) const HELD_MAP: i32 = 4;
pub(crate) const HELD_NETNS: i32 = 5;

/// The intermediate of a held start: join the held user namespace (and an isolated network
/// namespace it owns), start init in a nested one (as a child of our parent, CLONE_PARENT), write init's maps, report its pid, exit.
/// Allocation-free, like init.
pub(crate) fn intermediate_main(p: &mut Prepared, h: &Held) -> ! {
    let say = |a: i32, b: i32| {
        let mut rec = [0u8; 8];
        rec[..4].copy_from_slice(&a.to_ne_bytes());
        rec[4..].copy_from_slice(&b.to_ne_bytes());
        let _ = sys::write_all(h.report, &rec);
    };
    let fail = |stage: i32, e: i32| -> ! {
        say(stage, e);
        sys::exit(1)
    };
    p.close_inherited(&[h.userns, h.netns, h.report]);
    // Our copy of the caller's memory goes first, but for what we and init read; init,
    // forked from us below, has nothing more to give back. The caller's signal handlers go
    // before it (they follow pointers into that memory; init resets its own again).
    sys::default_handlers();
    let here = 0u8;
    let maps = [h.uid_map.as_ptr() as usize, h.gid_map.as_ptr() as usize];
    p.released = crate::release::release_early(&p.keep, &maps, std::ptr::addr_of!(here) as usize);
    if let Err(e) = sys::setns(h.userns, libc::CLONE_NEWUSER) {
        fail(HELD_SETNS, e);
    }
    if h.become_root {
        if let Err(e) = sys::setresgid(0).and_then(|_| sys::setresuid(0)) {
            fail(HELD_IDS, e);
        }
        // Changing ids made us non-dumpable, and so would be the sandbox's init forked below:
        // its /proc files would belong to host root, and we could not write its maps.
        if let Err(e) = sys::prctl(libc::PR_SET_DUMPABLE, 1) {
            fail(HELD_IDS, e);
        }
    }
    if h.netns >= 0 {
        if let Err(e) = sys::setns(h.netns, libc::CLONE_NEWNET) {
            fail(HELD_NETNS, e);
        }
    }
    let pid = match sys::fork_with(h.flags | libc::CLONE_PARENT as u64, false) {
        Ok(sys::Forked::Child) => init_main(p),
        Ok(sys::Forked::Parent { pid, .. }) => pid,
        Err(e) => fail(HELD_CLONE, e),
    };
    // "/proc/<pid>/uid_map\0", built on the stack.
    let mut digits = [0u8; 10];
    let num = sys::format_u32(pid as u32, &mut digits);
    for (name, map) in [
        (&b"/uid_map\0"[..], &h.uid_map),
        (&b"/gid_map\0"[..], &h.gid_map),
    ] {
        let mut path = [0u8; 40];
        let mut n = 0;
        for part in [&b"/proc/"[..], num, name] {
            path[n..n + part.len()].copy_from_slice(part);
            n += part.len();
        }
        let written = std::ffi::CStr::from_bytes_with_nul(&path[..n])
            .map_err(|_| libc::EINVAL)
            .and_then(|c| sys::write_file(c, map));
        if let Err(e) = written {
            let _ = sys::kill(pid, libc::SIGKILL);
            fail(HELD_MAP, e);
        }
    }
    say(0, pid);
    sys::exit(0)
}

impl Prepared {
    /// Close every descriptor but the ones this start uses (and `extra`), first thing after
    /// the clone: what the caller's other threads had open at that moment (the parent's ends
    /// of our pipes, a file being written that a job is about to exec — which would fail with
    /// ETXTBSY while we hold it) is not kept until the job execs. Allocation-free.
    fn close_inherited(&self, extra: &[RawFd]) {
        let mut keep = [-1; 16];
        let mut n = 0;
        let ours = [self.sync_read, self.report_write, self.status_write];
        let given = self.slots.iter().filter(|&&fd| fd >= 0);
        for &fd in self.stdio.iter().chain(&ours).chain(given).chain(extra) {
            if fd < 0 || keep[..n].contains(&fd) {
                continue;
            }
            if n == keep.len() {
                // More than a start ever has (at most 10 today): keep everything rather than
                // close one in use.
                debug_assert!(false, "more descriptors to keep than close_inherited holds");
                return;
            }
            keep[n] = fd;
            n += 1;
        }
        keep[..n].sort_unstable();
        sys::close_all_but(&keep[..n]);
    }

    /// Build the NULL-terminated pointer arrays for argv and envp, and the seccomp programs.
    pub(crate) fn finish_pointers(&mut self) {
        self.seccomp = self
            .seccomp_program
            .iter()
            .flat_map(|p| p.filters())
            .map(|f| libc::sock_fprog {
                len: f.len().min(u16::MAX as usize) as u16,
                filter: f.as_ptr() as *mut libc::sock_filter,
            })
            .collect();
        self.argv_ptrs = self.argv.iter().map(|a| a.as_ptr()).collect();
        self.argv_ptrs.push(std::ptr::null());
        self.envp_ptrs = self.envp.iter().map(|a| a.as_ptr()).collect();
        self.envp_ptrs.push(std::ptr::null());
        self.keep = Keep::of(self.heap_addresses());
    }

    /// The addresses of [`Prepared::each_buffer`].
    pub(crate) fn heap_addresses(&self) -> Vec<usize> {
        let mut at = Vec::new();
        self.each_buffer(&mut |a| at.push(a));
        at
    }

    /// Pass an address inside each heap buffer that init, the job before its exec, or a held
    /// start's intermediate reads to `at` (one address per buffer: a buffer never spans two
    /// mappings; empty lists have none). A field added to Prepared that points into the heap
    /// must be named here, or init faults on it (`tests::every_buffer_of_a_prepared_start_is_kept`
    /// reads each one after the release). Allocation-free.
    pub(crate) fn each_buffer(&self, at: &mut dyn FnMut(usize)) {
        fn list<T>(at: &mut dyn FnMut(usize), v: &[T]) {
            if !v.is_empty() {
                at(v.as_ptr() as usize);
            }
        }
        // Every field named (no `..`): a field added to Prepared must be sorted out here.
        let Prepared {
            ops,
            slots,
            hostname,
            argv,
            argv_ptrs,
            envp,
            envp_ptrs,
            exec_candidates,
            cwd,
            uid: _,
            gid: _,
            groups,
            setgroups_allowed: _,
            become_root: _,
            cap_mask: _,
            last_cap: _,
            rlimits,
            stdio: _,
            sync_read: _,
            report_write: _,
            status_write: _,
            job_stack,
            seccomp,
            // What `seccomp` points into (named below, filter by filter).
            seccomp_program: _,
            // Inline in the Prepared, which lives on init's stack.
            keep: _,
            released: _,
        } = self;
        list(at, ops);
        for op in ops {
            op.buffers(at);
        }
        list(at, slots);
        at(hostname.as_ptr() as usize);
        for strings in [argv, envp, exec_candidates] {
            list(at, strings);
            for s in strings {
                at(s.as_ptr() as usize);
            }
        }
        list(at, argv_ptrs);
        list(at, envp_ptrs);
        at(cwd.as_ptr() as usize);
        list(at, groups);
        list(at, rlimits);
        at(job_stack.inside());
        list(at, seccomp);
        for f in seccomp {
            if f.len > 0 {
                at(f.filter as usize);
            }
        }
    }
}

fn report(fd: RawFd, stage: Stage, errno: i32, index: u32) {
    let mut buf = [0u8; REPORT_LEN];
    buf[0..4].copy_from_slice(&(stage as u32).to_ne_bytes());
    buf[4..8].copy_from_slice(&errno.to_ne_bytes());
    buf[8..12].copy_from_slice(&index.to_ne_bytes());
    let _ = sys::write_all(fd, &buf);
}

/// Signals init passes on to the job.
const FORWARDED: &[libc::c_int] = &[
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGALRM,
    libc::SIGCONT,
];

/// Entry point of the cloned child: PID 1 of the new namespaces. Never returns.
pub(crate) fn init_main(p: &mut Prepared) -> ! {
    // Our own descriptors only, before anything else (a held start's intermediate did it too;
    // what it kept for itself goes here).
    p.close_inherited(&[]);
    // Die with the caller. If it is already gone, the sync read below sees EOF.
    let _ = sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
    // Block what init forwards or reaps (until the job runs, a signal to pass on waits), and
    // drop the caller's handlers: none may run once init has given back the caller's memory
    // (right below; a handler follows pointers into the caller's heap). Now, before the job
    // exists: a default action that ignores (SIGCHLD's) discards what is pending, and the
    // job's SIGCHLD must not be.
    let set = add_signal(sys::sigset_of(FORWARDED), libc::SIGCHLD);
    sys::set_sigmask(&set);
    sys::default_handlers();
    if !p.released {
        let here = 0u8;
        crate::release::release_early(&p.keep, &[], std::ptr::addr_of!(here) as usize);
    }
    let mut byte = [0u8; 1];
    if !matches!(sys::read_full(p.sync_read, &mut byte), Ok(1)) {
        sys::exit(1);
    }
    // SAFETY: the sync pipe's read end is ours and not used after this.
    unsafe { sys::close(p.sync_read) };

    if p.become_root {
        // The caller's ids are not mapped (subordinate mapping): become the sandbox's root, so
        // that what init creates (mount points) has an owner in the namespace.
        if let Err(e) = sys::setresgid(0) {
            report(p.report_write, Stage::Gid, e, 0);
            sys::exit(1);
        }
    }
    if p.setgroups_allowed {
        // Drop the host's supplementary groups (they would show as nogroup).
        let _ = sys::setgroups(&[0]);
    }
    if p.become_root {
        if let Err(e) = sys::setresuid(0) {
            report(p.report_write, Stage::Uid, e, 0);
            sys::exit(1);
        }
    }
    if let Err(e) = sys::sethostname(&p.hostname) {
        report(p.report_write, Stage::Hostname, e, 0);
        sys::exit(1);
    }
    for (i, op) in p.ops.iter().enumerate() {
        if let Err(e) = run_op(op, &mut p.slots) {
            report(p.report_write, Stage::Op, e, i as u32);
            sys::exit(1);
        }
    }

    // A fresh anonymous session keyring: the caller's keys are out of reach, and keys the job
    // adds stay in the sandbox. (ENOSYS: a kernel without keys has nothing to share.)
    match sys::join_new_session_keyring() {
        Ok(()) | Err(libc::ENOSYS) => {}
        Err(e) => {
            report(p.report_write, Stage::Keyring, e, 0);
            sys::exit(1);
        }
    }

    // From here on init only waits (its signals blocked above): fork the job.
    // The maps of init, read once the job runs (release.rs); opened now, while the sandbox's
    // `/proc` is init's own (the job could mount over it later). Close-on-exec: not the job's.
    let maps = sys::open_read(c"/proc/self/maps").unwrap_or(-1);
    let arg = p as *mut Prepared as *mut libc::c_void;
    // SAFETY: `p.job_stack` lives until the job has exec'd or exited (vfork suspends us until
    // then; `p` outlives init), and `job_entry` only reads `p` and makes raw syscalls,
    // allocating nothing.
    let job = match unsafe { sys::vfork_on(&p.job_stack, job_entry, arg) } {
        Ok(pid) => pid,
        Err(e) => {
            report(p.report_write, Stage::Fork, e, 0);
            sys::exit(1);
        }
    };
    // Keep only the status pipe (and the maps, a moment): the job's stdio and the report pipe
    // must see EOF when the job (not init) closes them — the caller's start waits for the
    // report pipe's, not for what follows.
    let status_fd = p.status_write;
    if maps < 0 {
        sys::close_all_except(status_fd);
    } else {
        let mut keep = [status_fd, maps];
        keep.sort_unstable();
        sys::close_all_but(&keep);
        // The job runs (or failed to): init gives back its copy of the caller's memory, `p`
        // included — from here on only the stack (`status_fd`, `set`, `job`) is used.
        let here = 0u8;
        crate::release::release(maps, std::ptr::addr_of!(here) as usize);
        // SAFETY: the maps descriptor is init's own, not used after this.
        unsafe { sys::close(maps) };
    }

    loop {
        // Reap everything that has exited: the job, and orphans re-parented to us (first
        // without waiting: the job may be gone already).
        while let Ok((pid, raw)) = sys::waitpid(-1, libc::WNOHANG) {
            if pid <= 0 {
                break;
            }
            if pid == job {
                let _ = sys::write_all(status_fd, &raw.to_ne_bytes());
                // Exiting kills every other process of the PID namespace.
                sys::exit(0);
            }
        }
        // Then wait for a child's end, or a signal to pass on.
        loop {
            match sys::sigwaitinfo(&set) {
                Ok(info) if info.si_signo == libc::SIGCHLD => break,
                Ok(info) => {
                    let _ = sys::kill(job, info.si_signo);
                }
                Err(_) => {}
            }
        }
    }
}

fn add_signal(mut set: libc::sigset_t, sig: libc::c_int) -> libc::sigset_t {
    // SAFETY: `set` is an initialised sigset_t.
    unsafe { libc::sigaddset(&mut set, sig) };
    set
}

fn run_op(op: &Op, slots: &mut [RawFd]) -> Result<(), i32> {
    match op {
        Op::MakePrivate => sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None),
        Op::Grab {
            source,
            slot,
            read_only,
        } => {
            let fd = sys::open_tree_clone(source, true)?;
            if let Some(s) = slots.get_mut(*slot) {
                *s = fd;
            }
            if *read_only {
                sys::set_readonly(fd, c"", true)?;
            }
            Ok(())
        }
        Op::GrabChecked {
            source,
            dev,
            ino,
            slot,
            read_only,
        } => {
            let fd = sys::open_tree_clone(source, true)?;
            if let Some(s) = slots.get_mut(*slot) {
                *s = fd;
            }
            if sys::dev_ino(fd)? != (*dev, *ino) {
                return Err(crate::plan::NOT_AS_CHECKED);
            }
            if *read_only {
                sys::set_readonly(fd, c"", true)?;
            }
            Ok(())
        }
        Op::Fresh {
            fstype,
            options,
            fallback,
            attrs,
            slot,
        } => {
            let fd = match sys::fresh_mount(fstype, options, *attrs) {
                Ok(fd) => fd,
                Err(_) if !fallback.is_empty() => sys::fresh_mount(fstype, fallback, *attrs)?,
                Err(e) => return Err(e),
            };
            if let Some(s) = slots.get_mut(*slot) {
                *s = fd;
            }
            Ok(())
        }
        Op::Pivot { rootfs } => {
            sys::mount(
                Some(rootfs),
                rootfs,
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            )?;
            sys::chdir(rootfs)?;
            sys::pivot_root(c".", c".")?;
            sys::umount_detach(c".")?;
            sys::chdir(c"/")
        }
        Op::PivotTree { slot, staging } => {
            let fd = slots.get(*slot).copied().unwrap_or(-1);
            sys::move_mount_fd(fd, staging)?;
            // SAFETY: the slot's descriptor is ours and used only once, here.
            unsafe { sys::close(fd) };
            sys::chdir(staging)?;
            sys::pivot_root(c".", c".")?;
            sys::umount_detach(c".")?;
            sys::chdir(c"/")
        }
        Op::Mkdirs { dirs } => {
            for d in dirs {
                sys::mkdir(d, 0o755)?;
            }
            Ok(())
        }
        Op::Touch { path } => sys::touch(path),
        Op::Mount {
            fstype,
            target,
            flags,
            data,
        } => sys::mount(Some(fstype), target, Some(fstype), *flags, data.as_deref()),
        Op::Attach { slot, target } => {
            let fd = slots.get(*slot).copied().unwrap_or(-1);
            let r = sys::move_mount_fd(fd, target);
            // SAFETY: the slot's descriptor is ours and used only once, here.
            unsafe { sys::close(fd) };
            r
        }
        Op::ReadOnlySelf { path } => match sys::open_tree_clone(path, false) {
            Err(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
            Ok(fd) => {
                let r =
                    sys::set_readonly(fd, c"", false).and_then(|_| sys::move_mount_fd(fd, path));
                // SAFETY: `fd` was opened just above and is not used after this.
                unsafe { sys::close(fd) };
                r
            }
        },
        Op::Symlink { target, link } => sys::symlink(target, link),
        Op::WriteFile { path, data } => sys::write_file(path, data.as_bytes()),
        Op::MaskFile { path } => {
            let fd = sys::open_tree_clone(c"/dev/null", false)?;
            let r = sys::move_mount_fd(fd, path);
            // SAFETY: `fd` was opened just above and is not used after this.
            unsafe { sys::close(fd) };
            match r {
                Err(libc::ENOENT) => Ok(()),
                other => other,
            }
        }
        Op::MaskDir { path } => match sys::mount(
            Some(c"tmpfs"),
            path,
            Some(c"tmpfs"),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some(c"size=0,mode=555"),
        ) {
            Err(libc::ENOENT) => Ok(()),
            other => other,
        },
        Op::Unstage { target } => sys::umount_detach(target),
        Op::ReadOnlyRoot => sys::set_readonly(libc::AT_FDCWD, c"/", false),
        Op::LoopbackUp => sys::loopback_up(),
    }
}

extern "C" fn job_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Prepared` init passed to vfork_on; init is suspended until we exec
    // or exit, so nothing changes it meanwhile, and we only read it.
    let p = unsafe { &*(arg as *const Prepared) };
    job_main(p)
}

/// The job process: drop to the requested identity and capabilities, then exec.
fn job_main(p: &Prepared) -> ! {
    let fail = |stage: Stage, errno: i32, index: u32| -> ! {
        report(p.report_write, stage, errno, index);
        sys::exit(127);
    };
    // SAFETY: setsid takes no arguments; the job gets its own session without a terminal.
    if unsafe { libc::setsid() } < 0 {
        fail(
            Stage::Setsid,
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            0,
        );
    }
    // Move the stdio descriptors out of the way first so that any permutation of 0/1/2 works.
    let mut high = [-1; 3];
    for (i, fd) in p.stdio.iter().enumerate() {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we hold.
        let dup = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            fail(
                Stage::Stdio,
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
                i as u32,
            );
        }
        high[i] = dup;
    }
    for (i, fd) in high.iter().enumerate() {
        if let Err(e) = sys::dup2(*fd, i as RawFd) {
            fail(Stage::Stdio, e, i as u32);
        }
    }
    for (i, (res, soft, hard)) in p.rlimits.iter().enumerate() {
        if let Err(e) = sys::setrlimit(*res, *soft, *hard) {
            fail(Stage::Rlimit, e, i as u32);
        }
    }
    // The bounding set first: dropping needs CAP_SETPCAP, which setuid below may take away.
    for cap in 0..=p.last_cap {
        if p.cap_mask & (1u64 << cap) == 0 {
            if let Err(e) = sys::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap)) {
                if e != libc::EINVAL {
                    fail(Stage::CapBound, e, cap);
                }
            }
        }
    }
    if p.setgroups_allowed {
        if let Err(e) = sys::setgroups(&p.groups) {
            fail(Stage::Groups, e, 0);
        }
    }
    if let Err(e) = sys::setresgid(p.gid) {
        fail(Stage::Gid, e, p.gid);
    }
    if let Err(e) = sys::setresuid(p.uid) {
        fail(Stage::Uid, e, p.uid);
    }
    if p.uid == 0 {
        if let Err(e) = sys::capset(p.cap_mask) {
            fail(Stage::CapSet, e, 0);
        }
    }
    if let Err(e) = sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1) {
        fail(Stage::NoNewPrivs, e, 0);
    }
    if let Err(e) = sys::chdir(&p.cwd) {
        fail(Stage::Chdir, e, 0);
    }
    sys::reset_signals();
    let _ = sys::close_range(3, libc::c_uint::MAX, true);
    // Last: the seccomp filters (no_new_privs is set), so that nothing above is filtered.
    for (i, prog) in p.seccomp.iter().enumerate() {
        if let Err(e) = sys::seccomp_install(prog) {
            fail(Stage::Seccomp, e, i as u32);
        }
    }

    // Like execvp: try each candidate; ENOENT/EACCES/ENOTDIR move on to the next one.
    let mut last = (libc::ENOENT, u32::MAX);
    for (i, path) in p.exec_candidates.iter().enumerate() {
        // SAFETY: `argv_ptrs` and `envp_ptrs` are NUL-terminated arrays of pointers into
        // `p`'s CStrings, prepared before the clone and alive until exec.
        let e = unsafe { sys::execve(path, p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr()) };
        match e {
            libc::ENOENT | libc::ENOTDIR if p.exec_candidates.len() > 1 => {}
            libc::EACCES if p.exec_candidates.len() > 1 => last = (e, i as u32),
            _ => fail(Stage::Exec, e, i as u32),
        }
    }
    fail(Stage::Exec, last.0, last.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> CString {
        CString::new(s).expect("no NUL")
    }

    /// A Prepared with one operation of every kind and every list filled.
    fn every_kind() -> Prepared {
        let pair = |k: &str, v: Option<&str>| (c(k), v.map(c));
        let ops = vec![
            Op::MakePrivate,
            Op::Grab {
                source: c("/grab"),
                slot: 0,
                read_only: true,
            },
            Op::GrabChecked {
                source: c("/checked"),
                dev: 1,
                ino: 2,
                slot: 1,
                read_only: false,
            },
            Op::Fresh {
                fstype: c("proc"),
                options: vec![pair("subset", Some("pid")), pair("ro", None)],
                fallback: vec![pair("hidepid", Some("2"))],
                attrs: 0,
                slot: 2,
            },
            Op::Pivot { rootfs: c("/root") },
            Op::PivotTree {
                slot: 0,
                staging: c("/staging"),
            },
            Op::Mkdirs {
                dirs: vec![c("/a"), c("/a/b")],
            },
            Op::Touch {
                path: c(&format!("/{}", "t".repeat(200 << 10))),
            },
            Op::Mount {
                fstype: c("tmpfs"),
                target: c("/tmp"),
                flags: 0,
                data: Some(c("size=1m")),
            },
            Op::Attach {
                slot: 1,
                target: c("/attach"),
            },
            Op::ReadOnlySelf {
                path: c("/proc/sys"),
            },
            Op::Symlink {
                target: c("/proc/self/fd"),
                link: c("/dev/fd"),
            },
            Op::WriteFile {
                path: c("/proc/sys/kernel/x"),
                data: c("0"),
            },
            Op::MaskFile { path: c("/mask") },
            Op::MaskDir {
                path: c("/maskdir"),
            },
            Op::Unstage { target: c("/old") },
            Op::ReadOnlyRoot,
            Op::LoopbackUp,
        ];
        let mut p = Prepared {
            ops,
            slots: vec![-1; 3],
            hostname: c("mistry"),
            argv: vec![c("/bin/sh"), c("-c"), c("true")],
            argv_ptrs: Vec::new(),
            // Large enough for a mapping of its own (glibc maps 128 KiB and more apart).
            envp: vec![c("PATH=/bin"), c(&format!("BIG={}", "x".repeat(300 << 10)))],
            envp_ptrs: Vec::new(),
            exec_candidates: vec![c("/bin/sh")],
            cwd: c("/"),
            uid: 0,
            gid: 0,
            groups: vec![0, 1],
            setgroups_allowed: true,
            become_root: false,
            cap_mask: 0,
            last_cap: 40,
            rlimits: vec![(libc::RLIMIT_NOFILE as libc::c_int, 1024, 1024)],
            stdio: [0, 1, 2],
            sync_read: -1,
            report_write: -1,
            status_write: -1,
            job_stack: sys::Stack::new(64 * 1024).expect("a stack"),
            seccomp: Vec::new(),
            seccomp_program: Some(crate::seccomp::default_program(false).expect("seccomp")),
            keep: Keep::default(),
            released: false,
        };
        p.finish_pointers();
        p
    }

    /// What init keeps of its caller's memory before the sandbox is set up: every buffer of its
    /// Prepared is still there (each one is read after the release; a missing one would fault),
    /// and the caller's other memory is gone (a 64 MiB buffer the caller wrote is not).
    #[test]
    fn every_buffer_of_a_prepared_start_is_kept() {
        let p = every_kind();
        assert!(p.keep.pages().is_some(), "every buffer is named");
        let ballast = vec![1u8; 64 << 20];
        let (ready_r, ready_w) = sys::pipe().expect("pipe");
        let (go_r, go_w) = sys::pipe().expect("pipe");
        let pid = match sys::fork_with(0, false).expect("fork") {
            sys::Forked::Child => {
                // Allocation-free from here: the test harness is multi-threaded.
                let here = 0u8;
                let released =
                    crate::release::release_early(&p.keep, &[], std::ptr::addr_of!(here) as usize);
                let mut sum = 0u64;
                p.each_buffer(&mut |a| {
                    // SAFETY: `a` is inside a live buffer of `p` (each_buffer's contract).
                    sum += u64::from(unsafe { std::ptr::read_volatile(a as *const u8) });
                });
                let _ = sys::write_all(ready_w, &[u8::from(released), u8::from(sum > 0)]);
                let mut byte = [0u8; 1];
                let _ = sys::read_full(go_r, &mut byte);
                sys::exit(0)
            }
            sys::Forked::Parent { pid, .. } => pid,
        };
        // SAFETY: the child's ends, which this process does not use (a child that died shows
        // as an end of file, not a wait).
        unsafe {
            sys::close(ready_w);
            sys::close(go_r);
        }
        let mut said = [0u8; 2];
        let got = sys::read_full(ready_r, &mut said);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let _ = sys::write_all(go_w, b"x");
        let (_, raw) = sys::waitpid(pid, 0).expect("waitpid");
        // SAFETY: our ends, not used after this.
        unsafe {
            sys::close(ready_r);
            sys::close(go_w);
        }
        assert_eq!(
            raw, 0,
            "the child read every buffer and exited 0 (raw status {raw:#x})"
        );
        assert_eq!((got, said), (Ok(2), [1, 1]), "released early, buffers read");
        let anon_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("RssAnon");
        assert!(
            anon_kib < 16 << 10,
            "the child still maps {anon_kib} KiB of anonymous memory (its caller wrote {} KiB)",
            ballast.len() >> 10
        );
        assert_eq!(std::hint::black_box(&ballast)[ballast.len() - 1], 1);
    }

    /// After `close_inherited`, a start's process has exactly its own descriptors: its stdio,
    /// pipes, a slot filled before the clone and the extras; every other one (another thread's
    /// file, the parent's end of a pipe) is closed.
    #[test]
    fn a_started_process_keeps_only_its_own_descriptors() {
        let open = |what: &std::ffi::CStr| sys::open_read(what).expect("open");
        let mut p = every_kind();
        p.stdio = [open(c"/dev/null"), open(c"/dev/null"), open(c"/dev/null")];
        let (report_r, report_w) = sys::pipe().expect("pipe");
        p.report_write = report_w;
        let (given, extra, foreign) = (open(c"/dev/null"), open(c"/dev/null"), open(c"/dev/null"));
        p.slots[0] = given;
        let ours = [p.stdio[0], p.stdio[1], p.stdio[2], report_w, given, extra];
        let checked = [
            ours[0], ours[1], ours[2], ours[3], ours[4], ours[5], foreign, report_r,
        ];
        let pid = match sys::fork_with(0, false).expect("fork") {
            sys::Forked::Child => {
                // Allocation-free from here: the test harness is multi-threaded.
                p.close_inherited(&[extra]);
                let mut said = [0u8; 9];
                for (i, fd) in checked.iter().enumerate() {
                    // SAFETY: fcntl(F_GETFD) only asks whether the descriptor is open.
                    said[i] = u8::from(unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0);
                }
                let mut total = 0u8;
                for fd in 0..4096 {
                    // SAFETY: as above.
                    if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
                        total = total.saturating_add(1);
                    }
                }
                said[8] = total;
                let _ = sys::write_all(report_w, &said);
                sys::exit(0)
            }
            sys::Forked::Parent { pid, .. } => pid,
        };
        // SAFETY: our copies, not used after this (the child has its own).
        unsafe {
            for fd in ours.iter().chain(&[foreign]) {
                sys::close(*fd);
            }
        }
        let mut said = [0u8; 9];
        let got = sys::read_full(report_r, &mut said);
        let _ = sys::waitpid(pid, 0);
        // SAFETY: our end, not used after this.
        unsafe { sys::close(report_r) };
        assert_eq!(got, Ok(9));
        assert_eq!(
            said,
            [1, 1, 1, 1, 1, 1, 0, 0, 6],
            "open in the child: stdio ×3, report pipe, given slot, extra; then the foreign \
             file, the parent's end; then how many descriptors are open in all"
        );
    }
}
