//! What a sandbox is asked to run: the builder callers fill in.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use caps::Capability;

/// Network of the sandbox, from the narrowest to the widest (the order `Ord` follows: a
/// project's own settings may only choose a smaller one than the operator's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum NetworkMode {
    /// A new network namespace with only the loopback interface, brought up.
    #[default]
    None,
    /// A network namespace of its own with outbound access through `slirp4netns`, as rootless
    /// Podman gives containers, under an egress policy ([`crate::egress`]): the host's loopback
    /// and addresses (so the daemon's API and every service of the host), link-local addresses
    /// and the operator's denied networks are unreachable. DNS goes through slirp4netns'
    /// forwarder (`/etc/resolv.conf` and `/etc/hosts` are generated). Namespaces are made ahead
    /// in a pool (see [`crate::configure_isolated_networks`]).
    Isolated,
    /// The host's network (no network namespace); `/etc/resolv.conf` and `/etc/hosts` come from
    /// the host. Everything the host reaches, the sandbox reaches.
    Host,
}

/// Why a sandbox setting given as text (a command-line flag, a configuration value) does not
/// parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A network mode other than `none`, `isolated` or `host`; names the text given.
    #[error("unknown network mode {0:?} (expected none, isolated or host)")]
    NetworkMode(String),
    /// A bind that is not `SRC:DST`, `SRC:DST:ro` or `SRC:DST:rw`; names the bind given.
    #[error("invalid bind {0:?} (expected SRC:DST[:ro|rw])")]
    BindSyntax(String),
    /// A bind whose source or destination is empty; names the bind given.
    #[error("invalid bind {0:?}: empty path")]
    BindEmptyPath(String),
    /// The user setting is empty (root is `0`, not an empty text).
    #[error("empty user")]
    EmptyUser,
    /// An id mapping other than `auto`, `single` or `subordinate`; names the text given.
    #[error("unknown id mapping {0:?} (expected auto, single or subordinate)")]
    IdMapping(String),
    /// An rlimit that is not `NAME=SOFT[:HARD]`; names the text given.
    #[error("invalid rlimit {0:?} (expected NAME=SOFT[:HARD])")]
    RlimitSyntax(String),
    /// An rlimit name that is not one this crate knows; names it.
    #[error("unknown rlimit {0:?}")]
    RlimitName(String),
    /// A soft or hard rlimit value that is neither a number nor `unlimited`.
    #[error("invalid rlimit value {value:?} in {spec:?}")]
    RlimitValue {
        /// The value that does not parse.
        value: String,
        /// The whole `NAME=SOFT[:HARD]` text it came from.
        spec: String,
    },
    /// The seccomp setting is empty (neither a profile path nor a built-in name).
    #[error("empty seccomp profile")]
    EmptySeccomp,
}

impl std::str::FromStr for NetworkMode {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "isolated" => Ok(Self::Isolated),
            "host" => Ok(Self::Host),
            other => Err(ParseError::NetworkMode(other.to_string())),
        }
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Isolated => "isolated",
            Self::Host => "host",
        })
    }
}

/// A fresh tmpfs mounted inside the sandbox (see [`Sandbox::tmpfs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tmpfs {
    /// Absolute path inside the sandbox.
    pub target: PathBuf,
    /// Size limit in bytes (else the policy's [`Limits::tmpfs`]; lowered to that too).
    pub size: Option<u64>,
}

/// A bind mount from the host into the sandbox.
#[derive(Debug, Clone)]
pub struct Bind {
    /// Host path of the file or directory to bind; canonicalized when the sandbox starts (unless
    /// [`Bind::fd`] is set, then looked up as given and checked against the descriptor).
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub destination: PathBuf,
    /// Mount it read-only inside the sandbox. Default `false` (set with [`Bind::read_only`] or a
    /// `:ro` suffix).
    pub read_only: bool,
    /// What `source` must still be when the sandbox binds it (see [`Bind::from_fd`]).
    pub fd: Option<Arc<OwnedFd>>,
}

impl PartialEq for Bind {
    fn eq(&self, other: &Self) -> bool {
        let fd = |b: &Bind| b.fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        self.source == other.source
            && self.destination == other.destination
            && self.read_only == other.read_only
            && fd(self) == fd(other)
    }
}

impl Eq for Bind {}

impl Bind {
    /// A writable bind of host path `source` at `destination` (an absolute path inside the
    /// sandbox; [`crate::Sandbox::spawn`] refuses a relative one).
    pub fn new(source: impl Into<PathBuf>, destination: impl Into<PathBuf>) -> Self {
        Self {
            source: source.into(),
            destination: destination.into(),
            read_only: false,
            fd: None,
        }
    }

    /// Bind `source` only if it is still what `fd` refers to (e.g. an `O_PATH` descriptor of a
    /// directory the caller opened without following a link and checked): the sandbox looks
    /// `source` up in its own mount namespace (a descriptor of the caller's namespace cannot be
    /// cloned there) and refuses to start when the mount it gets is not that file (same device
    /// and inode), e.g. because the directory was swapped for a symlink meanwhile.
    pub fn from_fd(
        fd: OwnedFd,
        source: impl Into<PathBuf>,
        destination: impl Into<PathBuf>,
    ) -> Self {
        Self {
            fd: Some(Arc::new(fd)),
            ..Self::new(source, destination)
        }
    }

    /// Make the bind read-only inside the sandbox.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }
}

impl std::str::FromStr for Bind {
    type Err = ParseError;
    /// `SRC:DST` or `SRC:DST:ro` (or `:rw`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let (src, dst, ro) = match parts.as_slice() {
            [src, dst] => (*src, *dst, false),
            [src, dst, "ro"] => (*src, *dst, true),
            [src, dst, "rw"] => (*src, *dst, false),
            _ => return Err(ParseError::BindSyntax(s.to_string())),
        };
        if src.is_empty() || dst.is_empty() {
            return Err(ParseError::BindEmptyPath(s.to_string()));
        }
        let bind = Bind::new(src, dst);
        Ok(if ro { bind.read_only() } else { bind })
    }
}

/// Who the process runs as inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum User {
    /// uid 0 / gid 0 of the sandbox (the caller's own ids on the host).
    #[default]
    Root,
    /// Numeric ids.
    Id {
        /// The uid inside the sandbox.
        uid: u32,
        /// The gid inside the sandbox (also the only supplementary group).
        gid: u32,
    },
    /// A Dockerfile `USER` value (`name`, `uid`, `name:group`, `uid:gid`), resolved against the
    /// rootfs' `/etc/passwd` and `/etc/group`.
    Spec(String),
}

impl std::str::FromStr for User {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ParseError::EmptyUser);
        }
        Ok(User::Spec(s.to_owned()))
    }
}

/// Where a standard stream of the sandboxed process goes.
#[derive(Debug, Default)]
pub enum Stdio {
    /// The caller's own stream.
    #[default]
    Inherit,
    /// `/dev/null`.
    Null,
    /// A new pipe; the caller gets the other end on [`crate::Child`].
    Piped,
    /// A descriptor the caller owns (a file, one end of its own pipe, a socket).
    Fd(OwnedFd),
}

/// How the sandbox's ids are mapped to the caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdMapping {
    /// A 65536-id range from `/etc/subuid` and `/etc/subgid` when the caller has one (and, when
    /// the caller is not root, `newuidmap`/`newgidmap` are installed); the single-id map otherwise.
    ///
    /// A process-wide default set with [`crate::set_default_id_mapping`] replaces `Auto`.
    #[default]
    Auto,
    /// Only the caller's own uid/gid, mapped to 0.
    Single,
    /// Sandbox root and ids 1..=65535 mapped onto the caller's subordinate range, even when the
    /// caller is root: the sandbox's root is then not the caller (a root daemon's jobs are not
    /// host root). Files sandbox root writes to binds belong to the first subordinate id. Fails
    /// when the caller has no range.
    Subordinate,
}

impl std::str::FromStr for IdMapping {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "single" => Ok(Self::Single),
            "subordinate" => Ok(Self::Subordinate),
            other => Err(ParseError::IdMapping(other.to_string())),
        }
    }
}

/// A resource limit applied with setrlimit(2) before exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// Which limit.
    pub resource: RlimitResource,
    /// The soft limit (in the resource's unit, see [`RlimitResource`]); `libc::RLIM_INFINITY` for
    /// unlimited.
    pub soft: u64,
    /// The hard limit, same unit; the soft one may be raised up to it.
    pub hard: u64,
}

/// The resources [`Rlimit`] can set (`RLIMIT_*` of setrlimit(2)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RlimitResource {
    /// Open files.
    NoFile,
    /// Processes of the (host) user.
    NProc,
    /// Core dump size, bytes.
    Core,
    /// Largest file written, bytes.
    FSize,
    /// Address space, bytes.
    As,
    /// CPU time, seconds.
    Cpu,
    /// Stack size, bytes.
    Stack,
}

impl RlimitResource {
    pub(crate) fn raw(self) -> libc::c_int {
        (match self {
            Self::NoFile => libc::RLIMIT_NOFILE,
            Self::NProc => libc::RLIMIT_NPROC,
            Self::Core => libc::RLIMIT_CORE,
            Self::FSize => libc::RLIMIT_FSIZE,
            Self::As => libc::RLIMIT_AS,
            Self::Cpu => libc::RLIMIT_CPU,
            Self::Stack => libc::RLIMIT_STACK,
        }) as libc::c_int
    }

    /// The name used in `NAME=SOFT[:HARD]` (`nofile`, `nproc`, `core`, `fsize`, `as`, `cpu`,
    /// `stack`), as parsed by `Rlimit`'s `FromStr`.
    pub fn name(self) -> &'static str {
        match self {
            Self::NoFile => "nofile",
            Self::NProc => "nproc",
            Self::Core => "core",
            Self::FSize => "fsize",
            Self::As => "as",
            Self::Cpu => "cpu",
            Self::Stack => "stack",
        }
    }
}

impl std::str::FromStr for Rlimit {
    type Err = ParseError;
    /// `NAME=SOFT[:HARD]`, e.g. `nofile=1024:4096`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| ParseError::RlimitSyntax(s.to_string()))?;
        let resource = match name {
            "nofile" => RlimitResource::NoFile,
            "nproc" => RlimitResource::NProc,
            "core" => RlimitResource::Core,
            "fsize" => RlimitResource::FSize,
            "as" => RlimitResource::As,
            "cpu" => RlimitResource::Cpu,
            "stack" => RlimitResource::Stack,
            other => return Err(ParseError::RlimitName(other.to_string())),
        };
        let num = |v: &str| -> Result<u64, ParseError> {
            if v == "unlimited" {
                Ok(libc::RLIM_INFINITY)
            } else {
                v.parse().map_err(|_| ParseError::RlimitValue {
                    value: v.to_string(),
                    spec: s.to_string(),
                })
            }
        };
        let (soft, hard) = match value.split_once(':') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(value)?, num(value)?),
        };
        Ok(Rlimit {
            resource,
            soft,
            hard,
        })
    }
}

/// cgroup v2 limits, applied when the host delegates a writable cgroup (skipped otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CgroupLimits {
    /// `memory.max`, bytes.
    pub memory_max: Option<u64>,
    /// `pids.max`.
    pub pids_max: Option<u64>,
    /// CPUs as a fraction (1.5 = one and a half cores), written to `cpu.max`.
    pub cpus: Option<f64>,
}

impl CgroupLimits {
    /// True when no limit is set: the sandbox then needs no cgroup of its own.
    pub fn is_empty(&self) -> bool {
        self.memory_max.is_none() && self.pids_max.is_none() && self.cpus.is_none()
    }
}

/// Which seccomp filter the sandboxed processes run under.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Seccomp {
    /// mistry's default filter, modelled on Docker's and Podman's default profiles.
    #[default]
    Default,
    /// No filter at all.
    Unconfined,
    /// A Docker/OCI-style JSON seccomp profile read from this file.
    Profile(PathBuf),
}

impl std::str::FromStr for Seccomp {
    type Err = ParseError;
    /// `default`, `unconfined`, or the path of a profile.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "default" => Ok(Self::Default),
            "unconfined" => Ok(Self::Unconfined),
            "" => Err(ParseError::EmptySeccomp),
            path => Ok(Self::Profile(PathBuf::from(path))),
        }
    }
}

/// Resource limits of one sandbox as a whole (all its processes together where the mechanism
/// allows). `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Processes (and threads) at once. Default 1024.
    pub pids: Option<u64>,
    /// Memory in bytes. Default none.
    pub memory: Option<u64>,
    /// Open files per process (`RLIMIT_NOFILE`, soft and hard). Default 1024 soft, 65536 hard.
    pub nofile: Option<(u64, u64)>,
    /// Enforce `memory` with a cgroup where one can be had (default). `false`: with the
    /// watchdog only, which costs nothing at start, whereas moving a process into a cgroup costs
    /// milliseconds (an RCU grace period) — for generous default limits on busy servers.
    pub memory_cgroup: bool,
    /// Bytes the sandbox may write to disk while it runs: what its root's writable part holds
    /// (an overlay's upper directory; what a root directory grew by), plus the trees given with
    /// [`Sandbox::count_disk`]; also the largest file it may write (`RLIMIT_FSIZE`). Measured by
    /// a watchdog while it runs ([`crate::Limit::Disk`]). Default none.
    pub disk: Option<u64>,
    /// The size of every tmpfs the sandbox mounts (`/dev`, `/dev/shm`, `/tmp`, the mounts of
    /// [`Sandbox::tmpfs`]; a larger size asked for is lowered to it). Default 64 MiB; `None`:
    /// the kernel's default (half the host's memory) where no size is asked for.
    pub tmpfs: Option<u64>,
}

/// The default size of every tmpfs a sandbox mounts ([`Limits::tmpfs`]), as Docker's
/// `/dev/shm`.
pub const DEFAULT_TMPFS_SIZE: u64 = 64 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            pids: Some(1024),
            memory: None,
            nofile: Some((1024, 65536)),
            memory_cgroup: true,
            disk: None,
            tmpfs: Some(DEFAULT_TMPFS_SIZE),
        }
    }
}

/// How a tree given with [`Sandbox::count_disk`] counts against [`Limits::disk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Everything it holds (e.g. a job's `data/`).
    All,
    /// What it grows by while the sandbox runs (e.g. a cache directory shared by builds).
    Growth,
}

/// What confines a sandbox beyond its namespaces: the seccomp filter, whether nested user
/// namespaces may be created inside, and resource limits. [`Policy::default`] is what every
/// sandbox gets unless told otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// Which filter; default [`Seccomp::Default`].
    pub seccomp: Seccomp,
    /// Allow processes of the sandbox to create user namespaces of their own. Default: no.
    pub nested_user_namespaces: bool,
    /// Resource limits of the sandbox as a whole; default [`Limits::default`].
    pub limits: Limits,
}

/// The capabilities a sandboxed root process keeps by default: Docker's default set.
/// Everything else (notably `CAP_SYS_ADMIN`, `CAP_SYS_PTRACE`, `CAP_NET_ADMIN`) is dropped from
/// the bounding set, so no process of the job can ever regain it.
pub const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

/// Everything a sandbox run needs. Build one with [`Sandbox::new`] and the builder methods, then
/// call [`Sandbox::spawn`] or [`Sandbox::output`].
#[derive(Debug)]
pub struct Sandbox {
    pub(crate) rootfs: PathBuf,
    pub(crate) overlay: Option<Overlay>,
    pub(crate) overlay_mounts: Vec<OverlayMount>,
    pub(crate) argv: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) cwd: PathBuf,
    pub(crate) user: User,
    pub(crate) hostname: String,
    pub(crate) network: NetworkMode,
    pub(crate) binds: Vec<Bind>,
    pub(crate) tmpfs_mounts: Vec<Tmpfs>,
    pub(crate) tmpfs_tmp: bool,
    pub(crate) disk_trees: Vec<(PathBuf, Counted)>,
    pub(crate) read_only_root: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) rlimits: Vec<Rlimit>,
    pub(crate) cgroup: CgroupLimits,
    pub(crate) capabilities: Vec<Capability>,
    pub(crate) id_mapping: IdMapping,
    pub(crate) policy: Policy,
    pub(crate) stdin: Stdio,
    pub(crate) stdout: Stdio,
    pub(crate) stderr: Stdio,
}

impl Sandbox {
    /// A sandbox on the root filesystem in directory `rootfs`, running nothing yet.
    pub fn new(rootfs: impl AsRef<Path>) -> Self {
        Self {
            rootfs: rootfs.as_ref().to_path_buf(),
            overlay: None,
            overlay_mounts: Vec::new(),
            argv: Vec::new(),
            env: Vec::new(),
            cwd: PathBuf::from("/"),
            user: User::Root,
            hostname: "mistry".into(),
            network: NetworkMode::None,
            binds: Vec::new(),
            tmpfs_mounts: Vec::new(),
            tmpfs_tmp: false,
            disk_trees: Vec::new(),
            read_only_root: false,
            timeout: None,
            rlimits: Vec::new(),
            cgroup: CgroupLimits::default(),
            capabilities: DEFAULT_CAPABILITIES.to_vec(),
            id_mapping: IdMapping::Auto,
            policy: Policy::default(),
            stdin: Stdio::Null,
            stdout: Stdio::Inherit,
            stderr: Stdio::Inherit,
        }
    }

    /// A sandbox whose root is an overlay: `lowers` (top first) stay untouched, every change goes
    /// to `upper` (`work` is overlayfs' scratch directory on the same filesystem). Users are
    /// resolved in the top lower layer.
    pub fn new_overlay(
        lowers: Vec<PathBuf>,
        upper: impl Into<PathBuf>,
        work: impl Into<PathBuf>,
    ) -> Self {
        let top = lowers.first().cloned().unwrap_or_default();
        let mut sb = Sandbox::new(top);
        sb.overlay = Some(Overlay {
            lowers,
            upper: upper.into(),
            work: work.into(),
        });
        sb
    }

    /// The command and its arguments. A program without a `/` is searched in the `PATH` of the
    /// sandbox's environment, inside the rootfs.
    pub fn command<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.argv = argv.into_iter().map(Into::into).collect();
        self
    }

    /// Append one argument to the command.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.argv.push(arg.into());
        self
    }

    /// Set one environment variable (the environment starts empty, not the caller's).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
        self
    }

    /// The working directory inside the sandbox (default `/`).
    pub fn cwd(mut self, cwd: impl Into<PathBuf>) -> Self {
        self.cwd = cwd.into();
        self
    }

    /// Who the command runs as (default [`User::Root`]).
    pub fn user(mut self, user: User) -> Self {
        self.user = user;
        self
    }

    /// The sandbox's hostname, in its own UTS namespace (default `mistry`).
    pub fn hostname(mut self, hostname: impl Into<String>) -> Self {
        self.hostname = hostname.into();
        self
    }

    /// The network the sandbox sees (default [`NetworkMode::None`]: loopback only).
    pub fn network(mut self, network: NetworkMode) -> Self {
        self.network = network;
        self
    }

    /// Mount an overlay of `lowers` (top first) at `target` (an absolute path inside), writable
    /// into `rw = (upper, work)` or read-only; applied after the binds.
    pub fn overlay_mount(
        mut self,
        lowers: Vec<PathBuf>,
        rw: Option<(PathBuf, PathBuf)>,
        target: impl Into<PathBuf>,
    ) -> Self {
        self.overlay_mounts.push(OverlayMount {
            lowers,
            rw,
            target: target.into(),
        });
        self
    }

    /// Add a bind mount; binds are applied in the order they are added.
    pub fn bind(mut self, bind: Bind) -> Self {
        self.binds.push(bind);
        self
    }

    /// Mount a fresh tmpfs (mode 1777, at most `size` bytes if given, and never more than the
    /// policy's [`Limits::tmpfs`]) at `target`, an absolute path inside; applied after the binds
    /// and overlay mounts, in the order added.
    pub fn tmpfs(mut self, target: impl Into<PathBuf>, size: Option<u64>) -> Self {
        self.tmpfs_mounts.push(Tmpfs {
            target: target.into(),
            size,
        });
        self
    }

    /// Count the host tree `path` (e.g. the source of a writable bind) against the policy's
    /// disk limit while the sandbox runs, besides its root ([`Limits::disk`]). No link is
    /// followed. Trees must not contain one another.
    pub fn count_disk(mut self, path: impl Into<PathBuf>, how: Counted) -> Self {
        self.disk_trees.push((path.into(), how));
        self
    }

    /// Mount a fresh tmpfs on `/tmp`.
    pub fn tmpfs_tmp(mut self, yes: bool) -> Self {
        self.tmpfs_tmp = yes;
        self
    }

    /// Make the root filesystem read-only (binds, `/dev`, `/tmp` keep their own modes).
    pub fn read_only_root(mut self, yes: bool) -> Self {
        self.read_only_root = yes;
        self
    }

    /// Wall-clock limit: when it passes, every process of the sandbox is killed.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Add one setrlimit(2) limit; it replaces the policy's limit for the same resource.
    pub fn rlimit(mut self, rlimit: Rlimit) -> Self {
        self.rlimits.push(rlimit);
        self
    }

    /// cgroup v2 limits (default none); skipped when the host delegates no writable cgroup.
    pub fn cgroup_limits(mut self, limits: CgroupLimits) -> Self {
        self.cgroup = limits;
        self
    }

    /// Replace the capability set a root process keeps (default: [`DEFAULT_CAPABILITIES`]).
    pub fn capabilities(mut self, caps: Vec<Capability>) -> Self {
        self.capabilities = caps;
        self
    }

    /// How sandbox ids map to the caller's (default [`IdMapping::Auto`]).
    pub fn id_mapping(mut self, mapping: IdMapping) -> Self {
        self.id_mapping = mapping;
        self
    }

    /// Seccomp, nested user namespaces and resource limits (default: [`Policy::default`]).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Where the command's stdin comes from (default [`Stdio::Null`]).
    pub fn stdin(mut self, stdio: Stdio) -> Self {
        self.stdin = stdio;
        self
    }

    /// Where the command's stdout goes (default [`Stdio::Inherit`]).
    pub fn stdout(mut self, stdio: Stdio) -> Self {
        self.stdout = stdio;
        self
    }

    /// Where the command's stderr goes (default [`Stdio::Inherit`]).
    pub fn stderr(mut self, stdio: Stdio) -> Self {
        self.stderr = stdio;
        self
    }
}

/// An overlay root filesystem: `lowers` (top first) read-only, changes in `upper`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// The read-only lower directories, top first.
    pub lowers: Vec<PathBuf>,
    /// The directory that receives every change.
    pub upper: PathBuf,
    /// overlayfs' scratch directory, on the same filesystem as `upper`.
    pub work: PathBuf,
}

/// An overlay mounted at `target` inside the sandbox: `lowers` (top first), and `upper`/`work`
/// for a writable one (else read-only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayMount {
    /// The read-only lower directories, top first.
    pub lowers: Vec<PathBuf>,
    /// `(upper, work)` for a writable overlay; `None`: read-only.
    pub rw: Option<(PathBuf, PathBuf)>,
    /// Absolute path inside the sandbox.
    pub target: PathBuf,
}
