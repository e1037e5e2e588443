//! Rootless Linux sandboxes: start a process in fresh namespaces on a given root filesystem.
//!
//! Every image build step and every job of mistry runs in one of these instead of a Docker
//! container. A sandbox always gets new user, mount, PID, UTS, IPC and cgroup namespaces, and a
//! new network namespace unless the network mode is [`NetworkMode::Host`].
//!
//! ```no_run
//! use sandbox::{Bind, NetworkMode, Sandbox, User};
//! use std::time::Duration;
//!
//! let out = Sandbox::new("/var/lib/mistry/rootfs")
//!     .command(["/bin/sh", "-c", "echo hello > /data/greeting"])
//!     .bind(Bind::new("/tmp/build", "/data"))
//!     .user(User::Spec("builder".into()))
//!     .network(NetworkMode::None)
//!     .timeout(Duration::from_secs(30))
//!     .output()?;
//! assert_eq!(out.status.code(), Some(0));
//! # Ok::<(), sandbox::Error>(())
//! ```
//!
//! How it works, in order:
//!
//! 1. The parent prepares everything the child needs (paths as C strings, the ordered mount plan
//!    of [`plan`], argv/envp arrays, capability masks, rlimits, and the seccomp filter compiled
//!    to BPF: the default one once per process) and then clones. The child allocates nothing,
//!    so a multi-threaded caller (the daemon's `spawn_blocking` thread) is safe. Its first act
//!    is to close every descriptor but its own: what other threads had open at the clone is
//!    not held while the sandbox is set up. Clones never overlap a [`write_executable`] (a
//!    file written to be exec'd, which a copied descriptor would make "Text file busy").
//! 2. The parent writes the id maps ([`idmap`]): sandbox root is the caller; with a subordinate
//!    range, 65536 more ids; with [`IdMapping::Subordinate`] (or [`set_default_id_mapping`]) root and
//!    every other id come from the subordinate range, even for a root caller. It moves the child
//!    into cgroups when the host lets it (v2 when delegated, else the v1 `pids`/`memory`
//!    controllers when writable), then lets the child go.
//! 3. The child, PID 1 of the new namespaces, sets the hostname, runs the mount plan (overlay
//!    layers staged at short names so mountinfo does not show store paths; `/proc` with the
//!    sandbox's own sysctls written: `user.max_user_namespaces` 0 unless nested user namespaces
//!    are allowed, `kernel.pid_max` for the process limit on Linux ≥ 6.14; runc's masked paths;
//!    `pivot_root` into the rootfs with the old root detached), joins a fresh anonymous session
//!    keyring, forks the job, and stays as a tiny init that forwards signals to the job and
//!    reaps orphans. Before any of it, init unmaps its copy of the caller's memory but the
//!    pages of its `Prepared` (and its stack), and once the job has exec'd, those too
//!    (`release.rs`): a caller that forks many sandboxes does not copy each page it writes
//!    while they are set up and run.
//! 4. The job process sets its rlimits (the policy's `RLIMIT_NPROC` and `RLIMIT_NOFILE`, then
//!    the caller's), drops the capability bounding set to [`DEFAULT_CAPABILITIES`] (Docker's
//!    default set), switches to the requested user, sets `no_new_privs`, installs the seccomp
//!    filter ([`Seccomp`]) and execs.
//! 5. [`Child::wait`] polls the pidfd; while the job runs it also counts the sandbox's tasks and
//!    memory every 200 ms (first after 200 ms) and kills it when a [`Limits`] value is reached
//!    ([`ExitStatus::LimitExceeded`]). When the job exits, init writes its raw wait status to the
//!    parent and exits, which makes the kernel kill every other process of the PID namespace. On
//!    timeout, or when the caller dies (`PR_SET_PDEATHSIG`), init is killed, with the same
//!    effect.
//!
//! Limits of the design: the caller's thread that called [`Sandbox::spawn`] must outlive the
//! sandbox (the parent-death signal follows the thread); call `spawn` and `wait` from the same
//! blocking thread.

#![deny(clippy::undocumented_unsafe_blocks)]

mod cgroup;
mod child;
mod config;
mod disk;
pub mod egress;
mod holder;
mod idmap;
mod limits;
mod net;
pub mod paths;
mod plan;
mod release;
mod seccomp;
mod sys;
mod user;

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use caps::Capability;
pub use config::{
    Bind, CgroupLimits, Counted, IdMapping, Limits, NetworkMode, Overlay, OverlayMount, ParseError,
    Policy, Rlimit, RlimitResource, Sandbox, Seccomp, Stdio, Tmpfs, User, DEFAULT_CAPABILITIES,
    DEFAULT_TMPFS_SIZE,
};
pub use disk::{tree_usage as disk_usage, UsageError as DiskUsageError};
pub use egress::{egress_policy, set_egress_policy, EgressPolicy};
pub use holder::{
    enabled as held_user_namespaces, holder_pid as held_user_namespace_pid,
    set_enabled as set_held_user_namespaces, set_shared as set_shared_user_namespaces,
    shared as shared_user_namespaces,
};
pub use idmap::{
    choose as choose_id_map, default_mode as default_id_mapping,
    find_range as find_subordinate_range, set_default as set_default_id_mapping,
    try_choose as try_choose_id_map, Mapping as IdMap, Range as IdRange, SUBORDINATE_IDS,
};
pub use limits::Limit;
pub use net::{
    check as check_isolated_network, configure as configure_isolated_networks,
    ready_count as isolated_networks_ready, remove_files as remove_isolated_network_files,
    slirp4netns_path, stop as stop_isolated_networks,
};
pub use seccomp::SeccompError;
pub use user::{
    read_user_file, resolve as resolve_user, resolve_with as resolve_user_with,
    Resolved as ResolvedUser, UserFileError, MAX_USER_FILE,
};

use child::{Prepared, Report, Stage, REPORT_LEN};
use plan::{cpath, cstr, PlannedBind};

/// Why a sandbox could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The argv is empty ([`Sandbox::command`] was not called or given nothing).
    #[error("no command given")]
    NoCommand,
    /// The root filesystem directory is missing or not a directory.
    #[error("rootfs {}: {reason}", path.display())]
    Rootfs {
        /// The rootfs path as given.
        path: PathBuf,
        /// Why (an errno text).
        reason: String,
    },
    /// A bind's source cannot be examined or resolved.
    #[error("bind {}: {reason}", path.display())]
    Bind {
        /// The bind's host source, as given.
        path: PathBuf,
        /// Why (an errno text).
        reason: String,
    },
    /// The working directory or a bind destination, which must be absolute paths inside the
    /// sandbox, is relative.
    #[error("{what} must be an absolute path: {}", path.display())]
    NotAbsolute {
        /// Which path it is, e.g. `bind destination`.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
    },
    /// A [`User::Spec`] cannot be resolved in the rootfs' `/etc/passwd` and `/etc/group`.
    /// Also returned when the resolved uid or gid is beyond the ids mapped in the sandbox.
    #[error("user {spec:?}: {reason}")]
    User {
        /// The user as given (`name`, `uid`, `user:group`...).
        spec: String,
        /// What is missing, e.g. `no user "app" in the image's /etc/passwd`.
        reason: String,
    },
    /// The image's user database could not be read to resolve `spec`.
    #[error("user {spec:?}: {source}")]
    UserFile {
        /// The user as given.
        spec: String,
        /// Which file failed and how.
        #[source]
        source: user::UserFileError,
    },
    /// Writing the user namespace's uid/gid maps (directly or through `newuidmap`/`newgidmap`)
    /// failed.
    #[error("user namespace id map: {what}: {reason}")]
    IdMap {
        /// The step that failed, e.g. `newuidmap 1234 0 100000 65536`.
        what: String,
        /// The error text, or the helper's stderr.
        reason: String,
    },
    /// clone(2) of the namespaces failed (e.g. unprivileged user namespaces disabled).
    #[error("cannot create namespaces: {0}")]
    Namespaces(String),
    /// The set-up inside the sandbox failed (a mount, the hostname, a capability...).
    #[error("{0}")]
    Setup(String),
    /// The kernel refused to mount an overlay (the root or an overlay mount), e.g. overlayfs
    /// in a user namespace on an old kernel or an unsupported filesystem under the layers: the
    /// caller may fall back to a copy.
    #[error("{0}")]
    Overlay(String),
    /// The program could not be executed: `exec /usr/bin/foo: no such file or directory`.
    #[error("{0}")]
    Exec(String),
    /// The seccomp filter could not be built (an unreadable or unsupported profile).
    #[error("{0}")]
    Seccomp(#[from] seccomp::SeccompError),
    /// The trees the disk watch counts could not be measured before the start.
    #[error("measuring the sandbox's disk use: {0}")]
    DiskPlan(#[source] disk::UsageError),
    /// The isolated network could not be set up (slirp4netns missing or failing, ...).
    #[error("{0}")]
    Network(String),
    /// An I/O error on the caller's side (a pipe, the pidfd, reaping the sandbox).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn errno_text(errno: i32) -> String {
    let desc = nix::errno::Errno::from_raw(errno).desc();
    let mut chars = desc.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => format!("errno {errno}"),
    }
}

/// How the job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
    /// The wall-clock limit passed; every process of the sandbox was killed.
    TimedOut(Duration),
    /// The sandbox was killed from outside (by [`Child::kill`] or another process).
    Killed,
    /// A resource limit of its [`Policy`] was reached; every process of the sandbox was killed.
    LimitExceeded(Limit),
}

impl ExitStatus {
    /// True only for [`ExitStatus::Exited`] with code 0.
    pub fn success(&self) -> bool {
        *self == ExitStatus::Exited(0)
    }

    /// The exit code, when the job exited normally.
    pub fn code(&self) -> Option<i32> {
        match self {
            ExitStatus::Exited(c) => Some(*c),
            _ => None,
        }
    }

    /// The signal number, when the job was killed by a signal (not by a limit or the timeout).
    pub fn signal(&self) -> Option<i32> {
        match self {
            ExitStatus::Signaled(s) => Some(*s),
            _ => None,
        }
    }

    /// The code a shell would report: the exit code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match self {
            ExitStatus::Exited(c) => *c,
            ExitStatus::Signaled(s) => 128 + s,
            ExitStatus::TimedOut(_) => 124,
            ExitStatus::Killed | ExitStatus::LimitExceeded(_) => 137,
        }
    }

    fn from_raw(status: i32) -> ExitStatus {
        if libc::WIFEXITED(status) {
            ExitStatus::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            ExitStatus::Signaled(libc::WTERMSIG(status))
        } else {
            ExitStatus::Killed
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(c) => write!(f, "exit code {c}"),
            ExitStatus::Signaled(s) => {
                let name = nix::sys::signal::Signal::try_from(*s)
                    .map_or("unknown", nix::sys::signal::Signal::as_str);
                write!(f, "killed by signal {s} ({name})")
            }
            ExitStatus::TimedOut(t) => write!(f, "timed out after {t:?}"),
            ExitStatus::Killed => write!(f, "killed"),
            ExitStatus::LimitExceeded(l) => write!(f, "{l}"),
        }
    }
}

/// What [`Sandbox::output`] collects.
#[derive(Debug)]
pub struct Output {
    /// How the job ended.
    pub status: ExitStatus,
    /// All of its stdout, when piped (else empty).
    pub stdout: Vec<u8>,
    /// All of its stderr, when piped (else empty).
    pub stderr: Vec<u8>,
}

/// A running sandbox. Dropping it kills and reaps the sandbox if it still runs.
#[derive(Debug)]
pub struct Child {
    pid: i32,
    pidfd: OwnedFd,
    status: OwnedFd,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
    result: Option<ExitStatus>,
    _cgroup: Option<cgroup::Cgroup>,
    v1: Option<cgroup::V1Group>,
    watch: limits::Watch,
    /// The disk watch, when the policy has a disk limit (a thread of its own).
    disk: Option<disk::Watch>,
    /// The memory limit a cgroup holds (to tell an OOM kill from another SIGKILL).
    cgroup_memory: Option<u64>,
    notes: Vec<String>,
    /// The slirp4netns of an isolated network, killed when the sandbox ends.
    net: Option<net::Slirp>,
    /// The job's stdin, when [`Stdio::Piped`].
    pub stdin: Option<File>,
    /// The job's stdout, when [`Stdio::Piped`].
    pub stdout: Option<File>,
    /// The job's stderr, when [`Stdio::Piped`].
    pub stderr: Option<File>,
}

fn set_cloexec_pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    let (r, w) = sys::pipe().map_err(|e| Error::Io {
        what: "creating a pipe".into(),
        source: std::io::Error::from_raw_os_error(e),
    })?;
    // SAFETY: pipe2 just returned these two descriptors; nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(r), OwnedFd::from_raw_fd(w)) })
}

/// The child's end of a standard stream, and the parent's end when piped.
fn stdio_ends(stdio: Stdio, fd: RawFd, input: bool) -> Result<(OwnedFd, Option<File>), Error> {
    match stdio {
        Stdio::Inherit => {
            let dup = nix::unistd::dup(fd).map_err(|e| Error::Io {
                what: format!("duplicating descriptor {fd}"),
                source: e.into(),
            })?;
            // SAFETY: dup returned a fresh descriptor that we own.
            Ok((unsafe { OwnedFd::from_raw_fd(dup) }, None))
        }
        Stdio::Null => {
            let f = std::fs::OpenOptions::new()
                .read(input)
                .write(!input)
                .open("/dev/null")
                .map_err(io_err("opening /dev/null"))?;
            Ok((f.into(), None))
        }
        Stdio::Piped => {
            let (r, w) = set_cloexec_pipe()?;
            if input {
                Ok((r, Some(File::from(w))))
            } else {
                Ok((w, Some(File::from(r))))
            }
        }
        Stdio::Fd(fd) => Ok((fd, None)),
    }
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
        .min(63)
}

/// Explain a failed clone: which sysctl disables user namespaces, if one does.
fn namespaces_error(errno: i32) -> Error {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .ok()
    };
    let reason = if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        "user namespaces are disabled: sysctl user.max_user_namespaces is 0 (set it to e.g. 15000)"
            .to_string()
    } else if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        "unprivileged user namespaces are disabled: sysctl kernel.unprivileged_userns_clone is 0 (set it to 1)".to_string()
    } else if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1")
    {
        "unprivileged user namespaces are restricted by AppArmor: sysctl kernel.apparmor_restrict_unprivileged_userns is 1".to_string()
    } else {
        format!("clone: {}", errno_text(errno))
    };
    Error::Namespaces(reason)
}

impl Sandbox {
    /// Collect stdout and stderr separately and wait for the end.
    pub fn output(mut self) -> Result<Output, Error> {
        self.stdout = Stdio::Piped;
        self.stderr = Stdio::Piped;
        self.spawn()?.wait_with_output()
    }

    /// Run the command and wait for it, with the configured streams.
    pub fn status(self) -> Result<ExitStatus, Error> {
        self.spawn()?.wait()
    }

    /// Build the environment: the given variables plus PATH and HOME when missing.
    fn environment(&self, home: &str) -> Vec<(OsString, OsString)> {
        let mut env = self.env.clone();
        for (key, value) in [
            ("PATH", plan::DEFAULT_PATH),
            ("HOME", home),
            ("HOSTNAME", self.hostname.as_str()),
        ] {
            if !env.iter().any(|(k, _)| k == key) {
                env.push((key.into(), value.into()));
            }
        }
        env
    }

    fn check_paths(&self) -> Result<(PathBuf, Vec<PlannedBind>), Error> {
        let meta = std::fs::metadata(&self.rootfs).map_err(|e| Error::Rootfs {
            path: self.rootfs.clone(),
            reason: errno_text(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        if !meta.is_dir() {
            return Err(Error::Rootfs {
                path: self.rootfs.clone(),
                reason: "not a directory".into(),
            });
        }
        let rootfs = self.rootfs.canonicalize().map_err(|e| Error::Rootfs {
            path: self.rootfs.clone(),
            reason: e.to_string(),
        })?;
        if !self.cwd.is_absolute() {
            return Err(Error::NotAbsolute {
                what: "working directory",
                path: self.cwd.clone(),
            });
        }
        let mut binds = Vec::new();
        for b in &self.binds {
            if !b.destination.is_absolute() {
                return Err(Error::NotAbsolute {
                    what: "bind destination",
                    path: b.destination.clone(),
                });
            }
            if let Some(fd) = &b.fd {
                // Opened and checked by the caller: its kind and identity from the descriptor;
                // the child binds the path only if it still leads there.
                let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| Error::Bind {
                    path: b.source.clone(),
                    reason: errno_text(e as i32),
                })?;
                binds.push(PlannedBind {
                    source: b.source.clone(),
                    destination: b.destination.clone(),
                    read_only: b.read_only,
                    source_is_dir: st.st_mode & libc::S_IFMT == libc::S_IFDIR,
                    expect: Some((st.st_dev, st.st_ino)),
                });
                continue;
            }
            let meta = std::fs::metadata(&b.source).map_err(|e| Error::Bind {
                path: b.source.clone(),
                reason: errno_text(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
            binds.push(PlannedBind {
                source: b.source.canonicalize().map_err(|e| Error::Bind {
                    path: b.source.clone(),
                    reason: e.to_string(),
                })?,
                destination: b.destination.clone(),
                read_only: b.read_only,
                source_is_dir: meta.is_dir(),
                expect: None,
            });
        }
        Ok((rootfs, binds))
    }

    /// Start the sandbox. Returns once the job's program is executing, or with the reason it
    /// could not start (a missing rootfs or executable, a failed mount, disabled namespaces).
    pub fn spawn(self) -> Result<Child, Error> {
        if self.argv.is_empty() {
            return Err(Error::NoCommand);
        }
        let (rootfs, binds) = self.check_paths()?;
        let resolved = match &self.overlay {
            Some(ov) => user::resolve_layers(&ov.lowers, &self.user)?,
            None => user::resolve(&rootfs, &self.user)?,
        };
        let (mapping, fallback) = idmap::try_choose(self.id_mapping)?;
        let mut notes = Vec::new();
        if let Some(why) = &fallback {
            tracing::info!(reason = %why, "sandbox uses a single-id user namespace map");
            notes.push(format!("single-id user namespace map: {why}"));
        }
        let max = mapping.max_id();
        if resolved.uid > max || resolved.gid > max {
            let spec = match &self.user {
                User::Root => "0".to_string(),
                User::Id { uid, gid } => format!("{uid}:{gid}"),
                User::Spec(s) => s.clone(),
            };
            return Err(Error::User {
                spec,
                reason: format!(
                    "uid {} / gid {} is not mapped in the sandbox (ids 0..={max} are){}",
                    resolved.uid,
                    resolved.gid,
                    fallback
                        .as_ref()
                        .map(|w| format!(": {w}"))
                        .unwrap_or_default()
                ),
            });
        }

        let env = self.environment(&resolved.home);
        let path_var = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_os_str());
        let exec_candidates = plan::exec_candidates(&self.argv[0], path_var);
        if exec_candidates.is_empty() {
            return Err(Error::Exec("exec: empty program name".into()));
        }
        let overlay = match &self.overlay {
            Some(ov) => Some(Overlay {
                lowers: ov
                    .lowers
                    .iter()
                    .map(|l| {
                        l.canonicalize().map_err(|e| Error::Rootfs {
                            path: l.clone(),
                            reason: e.to_string(),
                        })
                    })
                    .collect::<Result<_, _>>()?,
                upper: ov.upper.canonicalize().map_err(|e| Error::Rootfs {
                    path: ov.upper.clone(),
                    reason: e.to_string(),
                })?,
                work: ov.work.canonicalize().map_err(|e| Error::Rootfs {
                    path: ov.work.clone(),
                    reason: e.to_string(),
                })?,
            }),
            None => None,
        };
        let policy = &self.policy;
        let seccomp_program = match &policy.seccomp {
            Seccomp::Default => Some(seccomp::default_program(policy.nested_user_namespaces)?),
            Seccomp::Unconfined => None,
            Seccomp::Profile(path) => Some(seccomp::load_profile(path, &self.capabilities)?),
        };
        let limits = policy.limits;
        let mut sysctls: Vec<(&'static str, String)> = Vec::new();
        if !policy.nested_user_namespaces {
            // Per user namespace: no user namespace can be created inside the sandbox's.
            sysctls.push(("/proc/sys/user/max_user_namespaces", "0".into()));
        }
        let pid_max = limits.pids.and_then(limits::pid_max_for);
        if let Some(pid_max) = pid_max {
            sysctls.push(("/proc/sys/kernel/pid_max", pid_max.to_string()));
        }
        // The disk limit: the root's writable part and the caller's trees, those counted by
        // growth measured now.
        let disk_plan = match limits.disk {
            Some(limit) => {
                let mut trees = self.disk_trees.clone();
                match &overlay {
                    Some(ov) => trees.insert(0, (ov.upper.clone(), Counted::All)),
                    None if !self.read_only_root => {
                        trees.insert(0, (rootfs.clone(), Counted::Growth));
                    }
                    None => {}
                }
                Some(disk::Plan::new(limit, trees).map_err(Error::DiskPlan)?)
            }
            None => None,
        };
        // The held user namespace (rootless) is needed now: an isolated network is made for it.
        let held = holder::userns_for(&mapping);
        let net = match self.network {
            NetworkMode::Isolated => Some(net::acquire(held.as_ref(), mapping.max_id())?),
            _ => None,
        };
        let joined = matches!(net, Some(net::Net::Joined(_)));
        let etc_files = match self.network {
            NetworkMode::Isolated => Some(net::etc_files(&self.hostname)?),
            _ => None,
        };
        if matches!(net, Some(net::Net::Attach)) {
            // The sandbox owns this namespace: init sets what the pool's maker sets otherwise.
            sysctls.push(("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0".into()));
            sysctls.push((
                "/proc/sys/net/ipv4/ping_group_range",
                format!("0 {}", mapping.max_id()),
            ));
        }
        let given_sysfs = match &net {
            Some(net::Net::Joined(lease)) => {
                lease.sysfs.as_ref().map(std::os::fd::AsRawFd::as_raw_fd)
            }
            _ => None,
        };
        let (ops, nslots, sysfs_slot) = plan::build(&plan::Spec {
            overlay: overlay.as_ref(),
            overlay_mounts: &self.overlay_mounts,
            rootfs: &rootfs,
            network: self.network,
            joined_netns: joined,
            given_sysfs: given_sysfs.is_some(),
            generated_etc: etc_files.as_ref().map(|(r, h)| (r.as_path(), h.as_path())),
            binds: &binds,
            tmpfs_mounts: &self.tmpfs_mounts,
            tmpfs_tmp: self.tmpfs_tmp,
            tmpfs_size: policy.limits.tmpfs,
            read_only_root: self.read_only_root,
            sysctls: &sysctls,
        })?;

        // The policy's process and memory limits join the explicit cgroup limits (the smaller
        // wins); cgroup v2 when delegated, else v1 where writable, else rlimits and the watchdog.
        let min = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, None) | (None, x) => x,
        };
        let wanted = CgroupLimits {
            memory_max: min(self.cgroup.memory_max, limits.memory),
            pids_max: min(self.cgroup.pids_max, limits.pids),
            cpus: self.cgroup.cpus,
        };
        // Moving a process into a cgroup costs an RCU grace period (milliseconds): where the
        // PID namespace's pid_max already holds the policy's process limit, a cgroup is made
        // only for what else was asked (memory, CPU, an explicit cgroup limit).
        let for_cgroup = CgroupLimits {
            pids_max: match pid_max {
                Some(_) => self.cgroup.pids_max,
                None => wanted.pids_max,
            },
            memory_max: if limits.memory_cgroup {
                wanted.memory_max
            } else {
                self.cgroup.memory_max
            },
            ..wanted
        };
        let cgroup = match cgroup::prepare(&for_cgroup) {
            Ok(cg) => cg,
            Err(why) => {
                if !self.cgroup.is_empty() {
                    tracing::warn!(reason = %why, "sandbox runs without cgroup v2 limits");
                    notes.push(format!("cgroup limits skipped: {why}"));
                }
                None
            }
        };
        let mut cgroup_memory = cgroup.as_ref().and(wanted.memory_max);
        let v1 = if cgroup.is_none()
            && (for_cgroup.pids_max.is_some() || for_cgroup.memory_max.is_some())
        {
            let (group, _pids, memory) =
                cgroup::prepare_v1(for_cgroup.pids_max, for_cgroup.memory_max);
            if memory {
                cgroup_memory = wanted.memory_max;
            }
            (!group.is_empty()).then_some(group)
        } else {
            None
        };
        let watch = limits::Watch {
            pids: wanted.pids_max,
            memory: if cgroup_memory.is_none() {
                wanted.memory_max
            } else {
                None
            },
        };
        if watch.memory.is_some() {
            notes.push(
                "memory limit enforced by a watchdog (best effort: no writable memory cgroup)"
                    .into(),
            );
        }

        let (stdin_child, stdin) = stdio_ends(self.stdin, 0, true)?;
        let (stdout_child, stdout) = stdio_ends(self.stdout, 1, false)?;
        let (stderr_child, stderr) = stdio_ends(self.stderr, 2, false)?;
        let (sync_r, sync_w) = set_cloexec_pipe()?;
        let (report_r, report_w) = set_cloexec_pipe()?;
        let (status_r, status_w) = set_cloexec_pipe()?;

        let cap_mask = self
            .capabilities
            .iter()
            .fold(0u64, |m, c| m | (1u64 << c.index()));
        let mut prepared = Prepared {
            ops,
            slots: {
                let mut slots = vec![-1; nslots];
                // The sandbox inherits the descriptor; init attaches it and closes its copy.
                if let (Some(slot), Some(fd)) = (sysfs_slot, given_sysfs) {
                    slots[slot] = fd;
                }
                slots
            },
            hostname: cstr(self.hostname.as_bytes()),
            argv: self.argv.iter().map(|a| cstr(a.as_bytes())).collect(),
            argv_ptrs: Vec::new(),
            envp: env
                .iter()
                .map(|(k, v)| {
                    let mut kv = k.as_bytes().to_vec();
                    kv.push(b'=');
                    kv.extend_from_slice(v.as_bytes());
                    cstr(&kv)
                })
                .collect(),
            envp_ptrs: Vec::new(),
            exec_candidates,
            cwd: cpath(&paths::normalize_inside(&self.cwd)),
            uid: resolved.uid,
            gid: resolved.gid,
            groups: resolved.groups.clone(),
            setgroups_allowed: mapping.setgroups_allowed(),
            become_root: matches!(mapping, idmap::Mapping::Subordinate { .. }),
            cap_mask,
            last_cap: last_cap(),
            rlimits: {
                let explicit: Vec<libc::c_int> =
                    self.rlimits.iter().map(|r| r.resource.raw()).collect();
                self.rlimits
                    .iter()
                    .map(|r| (r.resource.raw(), r.soft, r.hard))
                    .chain(limits::rlimits(&limits, &explicit))
                    .collect()
            },
            stdio: [
                stdin_child.as_raw_fd(),
                stdout_child.as_raw_fd(),
                stderr_child.as_raw_fd(),
            ],
            sync_read: sync_r.as_raw_fd(),
            report_write: report_w.as_raw_fd(),
            status_write: status_w.as_raw_fd(),
            job_stack: sys::Stack::new(256 * 1024).map_err(|e| {
                Error::Setup(format!("mapping the job's start stack: {}", errno_text(e)))
            })?,
            seccomp: Vec::new(),
            seccomp_program,
            keep: release::Keep::default(),
            released: false,
        };
        prepared.finish_pointers();

        let mut flags = (libc::CLONE_NEWUSER
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWCGROUP) as u64;
        if self.network == NetworkMode::None || matches!(net, Some(net::Net::Attach)) {
            flags |= libc::CLONE_NEWNET as u64;
        }
        // A pooled isolated network: its namespace to start in, and its slirp4netns to keep.
        let (netns, slirp, sysfs) = match net {
            Some(net::Net::Joined(lease)) => (Some(lease.netns), Some(lease.slirp), lease.sysfs),
            _ => (None, None, None),
        };
        let netns_fd = netns.as_ref().map_or(-1, std::os::fd::AsRawFd::as_raw_fd);
        let (pid, pidfd) = match &held {
            Some(userns) => {
                start_held(&mut prepared, &mapping, userns.as_raw_fd(), netns_fd, flags)?
            }
            None => {
                // Root: this thread enters the namespace for the clone, then returns.
                let _inside = match &netns {
                    Some(n) => Some(net::ThreadNetns::enter(n.as_raw_fd())?),
                    None => None,
                };

                match clone_alone(flags, true) {
                    Ok(sys::Forked::Child) => child::init_main(&mut prepared),
                    Ok(sys::Forked::Parent { pid, pidfd }) => {
                        // SAFETY: clone returned this pidfd to us; nothing else owns it.
                        (pid, unsafe { OwnedFd::from_raw_fd(pidfd) })
                    }
                    Err(e) => return Err(namespaces_error(e)),
                }
            }
        };
        // The sandbox keeps its namespace (and has its sysfs) from now on.
        drop((netns, sysfs));
        drop((
            stdin_child,
            stdout_child,
            stderr_child,
            sync_r,
            report_w,
            status_w,
        ));

        let mut child = Child {
            pid,
            pidfd,
            status: status_r,
            timeout: self.timeout,
            deadline: None,
            result: None,
            _cgroup: None,
            v1: None,
            watch,
            disk: None,
            cgroup_memory,
            notes,
            net: slirp,
            stdin,
            stdout,
            stderr,
        };
        if held.is_none() {
            if let Err(e) = mapping.write(pid) {
                let _ = child.kill();
                return Err(e);
            }
        }
        if child.net.is_none() && self.network == NetworkMode::Isolated {
            // Its own namespace: slirp4netns configures it before init goes on.
            match net::attach(pid) {
                Ok(s) => child.net = Some(s),
                Err(e) => {
                    let _ = child.kill();
                    return Err(e);
                }
            }
        }
        if let Some(cg) = cgroup {
            match cg.add(pid) {
                Ok(()) => {
                    tracing::debug!(path = %cg.path().display(), "sandbox cgroup");
                    child._cgroup = Some(cg);
                }
                Err(why) => {
                    tracing::warn!(reason = %why, "sandbox runs without cgroup limits");
                    child.notes.push(format!("cgroup limits skipped: {why}"));
                }
            }
        }
        if let Some(group) = v1 {
            match group.add(pid) {
                Ok(()) => child.v1 = Some(group),
                Err(why) => {
                    tracing::warn!(reason = %why, "sandbox runs without cgroup v1 limits");
                    child.cgroup_memory = None;
                    child.watch.memory = limits.memory;
                }
            }
        }
        child.deadline = self.timeout.map(|t| Instant::now() + t);
        let mut sync = File::from(sync_w);
        if let Err(e) = std::io::Write::write_all(&mut sync, b"x") {
            let _ = child.kill();
            return Err(io_err("starting the sandbox")(e));
        }
        drop(sync);

        // EOF on the report pipe: the job's exec succeeded. A record: it failed, and where.
        let mut buf = [0u8; REPORT_LEN];
        let mut report_file = File::from(report_r);
        let got = read_up_to(&mut report_file, &mut buf);
        if got == REPORT_LEN {
            let _ = child.wait();
            if let Some(r) = Report::decode(&buf) {
                return Err(describe_report(&r, &prepared));
            }
            return Err(Error::Setup(
                "the sandbox reported an unknown failure".into(),
            ));
        }
        if let Some(plan) = disk_plan {
            let started = child
                .pidfd
                .try_clone()
                .and_then(|fd| disk::Watch::start(plan, fd));
            match started {
                Ok(w) => child.disk = Some(w),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(io_err("starting the sandbox's disk watch")(e));
                }
            }
        }
        Ok(child)
    }
}

/// Start init through an intermediate that joins the held user namespace `userns` (see
/// holder.rs): init is our child, in a user namespace nested in the held one, its maps written.
fn start_held(
    prepared: &mut Prepared,
    mapping: &idmap::Mapping,
    userns: RawFd,
    netns: RawFd,
    flags: u64,
) -> Result<(libc::pid_t, OwnedFd), Error> {
    let (report_r, report_w) = sys::pipe().map_err(namespaces_error)?;
    // SAFETY: pipe() returned these two descriptors to us; nothing else owns them.
    let (report_r, report_w) = unsafe {
        (
            OwnedFd::from_raw_fd(report_r),
            OwnedFd::from_raw_fd(report_w),
        )
    };
    let (uid_map, gid_map) = mapping.nested_texts();
    let held = child::Held {
        userns,
        netns,
        uid_map: uid_map.into_bytes(),
        gid_map: gid_map.into_bytes(),
        become_root: matches!(mapping, idmap::Mapping::Subordinate { .. }),
        flags,
        report: report_w.as_raw_fd(),
    };
    let middle = match clone_alone(0, false) {
        Ok(sys::Forked::Child) => child::intermediate_main(prepared, &held),
        Ok(sys::Forked::Parent { pid, .. }) => pid,
        Err(e) => return Err(namespaces_error(e)),
    };
    drop(report_w);
    let mut rec = [0u8; 8];
    let got = read_up_to(&mut File::from(report_r), &mut rec);
    let _ = sys::waitpid(middle, 0);
    let word = |i: usize| i32::from_ne_bytes([rec[i], rec[i + 1], rec[i + 2], rec[i + 3]]);
    let (stage, value) = (word(0), word(4));
    if got != rec.len() || stage != 0 {
        // A namespace that cannot be joined, or in which no namespace can be made (a user
        // namespace of ours with the same map but not a holder, e.g. a sandbox's, which allows
        // none), is not used again.
        if stage == child::HELD_SETNS || stage == child::HELD_CLONE || got != rec.len() {
            holder::discard(mapping);
        }
        let what = match stage {
            child::HELD_SETNS => "joining the held user namespace",
            child::HELD_IDS => "becoming root of the held user namespace",
            child::HELD_CLONE => return Err(namespaces_error(value)),
            child::HELD_MAP => "writing the nested id maps",
            child::HELD_NETNS => "joining the isolated network namespace",
            _ => "starting through the held user namespace",
        };
        return Err(Error::IdMap {
            what: what.into(),
            reason: if got == rec.len() {
                errno_text(value)
            } else {
                "the intermediate process died".into()
            },
        });
    }
    let pidfd = sys::pidfd_open(value).map_err(|e| Error::IdMap {
        what: "opening the sandbox's pidfd".into(),
        reason: errno_text(e),
    })?;
    // SAFETY: pidfd_open returned this descriptor to us; nothing else owns it.
    Ok((value, unsafe { OwnedFd::from_raw_fd(pidfd) }))
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    got
}

fn describe_report(r: &Report, p: &Prepared) -> Error {
    let err = errno_text(r.errno);
    let s = |c: &CString| c.to_string_lossy().into_owned();
    match r.stage {
        Stage::Exec => {
            let argv0 = p.argv.first().map(s).unwrap_or_default();
            match p.exec_candidates.get(r.index as usize) {
                Some(path) if p.exec_candidates.len() == 1 => {
                    Error::Exec(format!("exec {}: {err}", s(path)))
                }
                Some(path) => Error::Exec(format!("exec {argv0:?} ({}): {err}", s(path))),
                None => Error::Exec(format!(
                    "exec: {argv0:?}: executable file not found in $PATH"
                )),
            }
        }
        Stage::Chdir => Error::Setup(format!("chdir {}: {err}", s(&p.cwd))),
        Stage::Op => {
            let op = p.ops.get(r.index as usize);
            if let Some(plan::Op::GrabChecked { source, .. }) = op {
                if r.errno == plan::NOT_AS_CHECKED {
                    return Error::Bind {
                        path: std::path::PathBuf::from(s(source)),
                        reason: "it is not the directory that was checked (replaced meanwhile, \
                                 e.g. by a symlink): not bound"
                            .into(),
                    };
                }
            }
            let text = format!(
                "{}: {err}",
                op.map_or_else(|| "sandbox set-up".into(), plan::Op::describe)
            );
            if op.is_some_and(plan::Op::is_overlay) {
                Error::Overlay(text)
            } else {
                Error::Setup(text)
            }
        }
        Stage::Uid => Error::Setup(format!("setuid {}: {err}", r.index)),
        Stage::Gid => Error::Setup(format!("setgid {}: {err}", r.index)),
        Stage::Rlimit => Error::Setup(format!("setrlimit #{}: {err}", r.index)),
        Stage::CapBound => Error::Setup(format!("dropping capability {}: {err}", r.index)),
        Stage::Keyring => Error::Setup(format!("joining a new session keyring: {err}")),
        Stage::Seccomp => Error::Setup(format!("installing seccomp filter #{}: {err}", r.index)),
        other => Error::Setup(format!("{other:?}: {err}")),
    }
}

impl Child {
    /// Whether the sandbox's cgroup (v2 or v1) refused a fork at its process limit.
    fn pids_refused(&self) -> bool {
        self._cgroup
            .as_ref()
            .is_some_and(cgroup::Cgroup::pids_refused)
            || self.v1.as_ref().is_some_and(cgroup::V1Group::pids_refused)
    }

    /// Whether the kernel's OOM killer killed a process of the sandbox's cgroup (v2 or v1).
    fn oom_killed(&self) -> bool {
        self._cgroup
            .as_ref()
            .is_some_and(cgroup::Cgroup::oom_killed)
            || self.v1.as_ref().is_some_and(cgroup::V1Group::oom_killed)
    }

    /// The host pid of the sandbox's init.
    pub fn id(&self) -> i32 {
        self.pid
    }

    /// Things the caller may want to log: why the single-id map or no cgroup was used.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Send `signal` to the job (init forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1/2...).
    pub fn signal(&self, signal: i32) -> Result<(), Error> {
        if self.result.is_some() {
            return Ok(());
        }
        sys::pidfd_send_signal(self.pidfd.as_raw_fd(), signal).map_err(|e| Error::Io {
            what: format!("signalling sandbox {}", self.pid),
            source: std::io::Error::from_raw_os_error(e),
        })
    }

    /// Kill every process of the sandbox.
    pub fn kill(&mut self) -> Result<(), Error> {
        self.signal(libc::SIGKILL)
    }

    /// Wait for the job to end (killing the sandbox when its timeout passes).
    pub fn wait(&mut self) -> Result<ExitStatus, Error> {
        if let Some(r) = self.result {
            return Ok(r);
        }
        // Set once the sandbox is being killed by us: a timeout or a limit.
        let mut forced: Option<ExitStatus> = None;
        let mut next_scan = self
            .watch
            .active()
            .then(|| Instant::now() + limits::SCAN_INTERVAL);
        loop {
            let wake = if forced.is_some() {
                None
            } else {
                match (self.deadline, next_scan) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            let wait_ms = match wake {
                None => -1,
                Some(w) => {
                    let left = w.saturating_duration_since(Instant::now());
                    left.as_millis().min(i32::MAX as u128) as i32 + i32::from(!left.is_zero())
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err("waiting for the sandbox")(e));
            }
            if n > 0 {
                break;
            }
            let now = Instant::now();
            if self.deadline.is_some_and(|d| now >= d) {
                forced = Some(ExitStatus::TimedOut(self.timeout.unwrap_or_default()));
            } else if next_scan.is_some_and(|s| now >= s) {
                match self.watch.check(self.pid, self.pids_refused()) {
                    Err(limit) => forced = Some(ExitStatus::LimitExceeded(limit)),
                    Ok(after) => next_scan = Some(Instant::now() + after),
                }
            }
            if forced.is_some() {
                let _ = sys::pidfd_send_signal(self.pidfd.as_raw_fd(), libc::SIGKILL);
            }
        }
        sys::waitpid(self.pid, 0).map_err(|e| Error::Io {
            what: "reaping the sandbox".into(),
            source: std::io::Error::from_raw_os_error(e),
        })?;
        let mut buf = [0u8; 4];
        let mut status = File::from(self.status.try_clone().map_err(io_err("status pipe"))?);
        let got = read_up_to(&mut status, &mut buf);
        let mut result = match forced {
            Some(r) => r,
            None if got == 4 => ExitStatus::from_raw(i32::from_ne_bytes(buf)),
            None => ExitStatus::Killed,
        };
        // The disk watch killed it (its verdict is stored before it kills).
        if let Some(limit) = self.disk.take().and_then(|w| w.finish()) {
            if forced.is_none() {
                result = ExitStatus::LimitExceeded(limit);
            }
        }
        // A job that failed after a cgroup refused a fork for the process limit (a shell dies of
        // it at once, before the watchdog looks).
        if let (Some(max), false, None) = (self.watch.pids, result.success(), forced) {
            if self.pids_refused() {
                result = ExitStatus::LimitExceeded(Limit::Processes(max));
            }
        }
        // A job the kernel's OOM killer ended in a memory-limited cgroup.
        if let (Some(max), ExitStatus::Signaled(libc::SIGKILL) | ExitStatus::Killed) =
            (self.cgroup_memory, result)
        {
            if self.oom_killed() {
                result = ExitStatus::LimitExceeded(Limit::Memory(max));
            }
        }
        self.result = Some(result);
        self._cgroup = None;
        self.v1 = None;
        if let Some(slirp) = self.net.take() {
            for note in slirp.notes() {
                tracing::info!(pid = self.pid, "{note}");
                self.notes.push(note);
            }
        }
        Ok(result)
    }

    /// Read stdout and stderr (when piped) to the end while waiting.
    pub fn wait_with_output(mut self) -> Result<Output, Error> {
        drop(self.stdin.take());
        let reader = |f: Option<File>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut f) = f {
                    let _ = f.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = reader(self.stdout.take());
        let err = reader(self.stderr.take());
        let status = self.wait()?;
        Ok(Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }

    /// The pidfd of the sandbox's init: readable once it has exited (for async callers).
    pub fn pidfd(&self) -> RawFd {
        self.pidfd.as_raw_fd()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.result.is_none() {
            let _ = self.kill();
            let _ = sys::waitpid(self.pid, 0);
        }
    }
}

/// Held shared while a file a sandbox may exec is open for writing ([`write_executable`]),
/// exclusively while a sandbox's first process is cloned: no clone copies such a descriptor.
/// (A clone's child also closes what it does not use first thing: `Prepared::close_inherited`.)
static CLONES: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// [`CLONES`], exclusively: held while this process makes a child that gets a copy of its
/// descriptors (a clone of ours, a `Command` until its exec).
pub(crate) fn no_executable_writes() -> std::sync::RwLockWriteGuard<'static, ()> {
    CLONES
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Clone under [`no_executable_writes`]: every clone of this crate in the caller goes through
/// here.
pub(crate) fn clone_alone(flags: u64, pidfd: bool) -> Result<sys::Forked, i32> {
    let _alone = no_executable_writes();
    sys::fork_with(flags, pidfd)
}

/// Write a new file at `path` (refused if it exists) with mode 0755, for a sandbox to exec
/// right after (a heredoc's script). A file written with a descriptor of one's own can fail to
/// exec with "Text file busy" (ETXTBSY) while a sandbox started by another thread meanwhile
/// still holds a copy of that descriptor; no sandbox starts while this one is open.
pub fn write_executable(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let _no_clone = CLONES
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(path)?;
    f.write_all(bytes)?;
    // The mode asked for at open is masked by the umask: set it on the descriptor.
    f.set_permissions(std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A file for a sandbox to exec is not opened while a clone is under way.
    #[test]
    fn an_executable_is_not_written_during_a_clone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("script");
        let cloning = super::no_executable_writes();
        let writer = {
            let file = file.clone();
            std::thread::spawn(move || super::write_executable(&file, b"#!/bin/sh\n"))
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!file.exists(), "written while a clone held the lock");
        drop(cloning);
        writer.join().expect("the writer").expect("the write");
        let meta = std::fs::metadata(&file).expect("the script");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777,
            0o755
        );
        assert_eq!(
            super::write_executable(&file, b"again").map_err(|e| e.kind()),
            Err(std::io::ErrorKind::AlreadyExists)
        );
    }
}
