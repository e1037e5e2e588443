//! Seccomp filters of the sandboxed processes, compiled to classic BPF with `seccompiler` in the
//! parent (before clone) and installed by the job process right before `execve`.
//!
//! The default filter ([`crate::Seccomp::Default`]) is a deny-list modelled on what Docker's and
//! Podman's default profiles refuse to a container without extra capabilities: the kernel keyring,
//! kexec, module loading, BPF, perf events, userfaultfd, file handles, clock setting, accounting,
//! swap, reboot, the mount API, quotas, I/O privilege, `vm86`, obsolete calls, `io_uring`,
//! `syslog`, personality changes other than the few Docker allows, `AF_VSOCK` sockets, and the
//! `TIOCSTI`/`TIOCLINUX` ioctls (terminal input injection). Those fail with `EPERM`, as in Docker. Unless nested user
//! namespaces are allowed, `unshare`/`clone` with namespace flags, `setns` and the mount family
//! fail with `EPERM` too, and `clone3` (whose flags a filter cannot see) with `ENOSYS`, so that
//! glibc falls back to `clone`. On x86-64, x32 system calls fail with `ENOSYS`; a system call of a
//! foreign architecture (`int 0x80`) kills the process.
//!
//! A [`crate::Seccomp::Profile`] is a Docker/OCI JSON profile (`defaultAction`, `defaultErrnoRet`,
//! `syscalls[{names, action, errnoRet, args[{index, value, valueTwo, op}], includes, excludes}]`).
//! It is compiled into stacked filters, one per action: the kernel applies the most restrictive
//! result of all of them, so a system call matched by rules of two actions gets the stricter one.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use crate::Error;

type BackendError = seccompiler::BackendError;

/// Why a seccomp filter could not be built: the default ones, slirp4netns' or an operator's
/// Docker/OCI profile. Cloned out of the per-process caches of the compiled default filters.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler has no target for this build's architecture (`std::env::consts::ARCH`).
    #[error("seccomp: unsupported architecture {0}")]
    UnsupportedArch(&'static str),
    /// seccompiler refused a rule of a built-in filter.
    #[error("seccomp rule: {0}")]
    Rule(#[source] Arc<BackendError>),
    /// seccompiler refused to build or compile a filter to BPF.
    #[error("seccomp: {0}")]
    Filter(#[source] Arc<BackendError>),
    /// The network-notifying filter cannot be built: `sendto` has no number on this
    /// architecture.
    #[error("seccomp: no sendto system call")]
    NoSendto,
    /// The compiled network-notifying filter has no return to turn into a user notification
    /// (seccompiler's output changed shape).
    #[error("seccomp: the notifying filter has no notifying action")]
    NoNotifyingAction,
    /// A profile that is not JSON of the expected shape.
    #[error("{0}")]
    Json(#[source] Arc<serde_json::Error>),
    /// A profile's action other than the `SCMP_ACT_*` ones supported; names it.
    #[error("unsupported action {0:?}")]
    UnsupportedAction(String),
    /// A profile's `includes`/`excludes` capability name that is not a Linux capability.
    #[error("unknown capability {0:?}")]
    UnknownCapability(String),
    /// A profile's argument operator other than the `SCMP_CMP_*` ones supported; names it.
    #[error("unsupported argument operator {0:?}")]
    UnsupportedOperator(String),
    /// A profile's argument condition that seccompiler refused (e.g. an index above 5).
    #[error("argument index {index}: {source}")]
    ArgIndex {
        /// The argument's `index` as given.
        index: u8,
        /// seccompiler's reason.
        #[source]
        source: Arc<BackendError>,
    },
    /// The profile's `defaultAction` is not supported.
    #[error("defaultAction: {0}")]
    DefaultAction(#[source] Box<SeccompError>),
    /// The profile's `syscalls[index]`.
    #[error("syscalls[{index}]: {source}")]
    Syscall {
        /// The position in `syscalls`, from 0.
        index: usize,
        /// What is wrong with that entry.
        #[source]
        source: Box<SeccompError>,
    },
    /// seccompiler refused the conditional rule of `syscalls[index]` for one call name.
    #[error("syscalls[{index}] ({name}): {source}")]
    SyscallRule {
        /// The position in `syscalls`, from 0.
        index: usize,
        /// The system call's name.
        name: String,
        /// seccompiler's reason.
        #[source]
        source: Arc<BackendError>,
    },
    /// A profile's filter that seccompiler refused.
    #[error("{0}")]
    ProfileFilter(#[source] Arc<BackendError>),
    /// The profile file could not be read.
    #[error("seccomp profile {}: {source}", path.display())]
    ReadProfile {
        /// The profile's path.
        path: std::path::PathBuf,
        /// The read error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The profile file was read but does not compile.
    #[error("seccomp profile {}: {source}", path.display())]
    Profile {
        /// The profile's path.
        path: std::path::PathBuf,
        /// Why it does not compile.
        #[source]
        source: Box<SeccompError>,
    },
}

fn filter_err(e: BackendError) -> SeccompError {
    SeccompError::Filter(Arc::new(e))
}

/// The compiled filters, in the order they are installed.
#[derive(Debug)]
pub(crate) struct Program {
    filters: Vec<Vec<libc::sock_filter>>,
}

impl Program {
    pub(crate) fn filters(&self) -> &[Vec<libc::sock_filter>] {
        &self.filters
    }
}

fn target() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::UnsupportedArch(std::env::consts::ARCH))
}

/// A system call number by name; new calls the `syscalls` crate does not know yet are added here
/// (numbers from 424 on are the same on every architecture).
fn sysno(name: &str) -> Option<i64> {
    if let Ok(s) = syscalls::Sysno::from_str(name) {
        return Some(i64::from(s.id()));
    }
    match name {
        "open_tree_attr" => Some(467),
        _ => None,
    }
}

/// Denied with EPERM by the default filter, always.
const DENIED: &[&str] = &[
    // The kernel keyring is not namespaced.
    "keyctl",
    "add_key",
    "request_key",
    // Kernel replacement, modules, BPF, perf.
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "lookup_dcookie",
    // File handles (the "shocker" escape).
    "open_by_handle_at",
    "name_to_handle_at",
    // Clocks.
    "clock_settime",
    "clock_adjtime",
    "settimeofday",
    "adjtimex",
    "stime",
    // System administration.
    "acct",
    "swapon",
    "swapoff",
    "reboot",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "nfsservctl",
    "sysfs",
    "_sysctl",
    "ustat",
    "uselib",
    "fanotify_init",
    // I/O privilege and real mode.
    "iopl",
    "ioperm",
    "vm86",
    "vm86old",
    // io_uring bypasses seccomp for the operations it performs (Docker blocks it too).
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
];

/// Denied with EPERM unless nested user namespaces are allowed: they only work with
/// `CAP_SYS_ADMIN`, which a sandbox has only inside a user namespace of its own.
const NAMESPACE_CALLS: &[&str] = &[
    "setns",
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "open_tree",
    "open_tree_attr",
    "move_mount",
    "mount_setattr",
];

/// The namespace flags of clone(2) and unshare(2).
const NS_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];
/// CLONE_NEWTIME: unshare(2) only (in clone(2) the bit belongs to the exit signal).
const CLONE_NEWTIME: u64 = 0x80;

/// Personalities Docker allows: PER_LINUX, PER_LINUX32, UNAME26, both, and the query.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

const TIOCSTI: u64 = 0x5412;
const TIOCLINUX: u64 = 0x541c;

fn cond(index: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Only fails for an argument index above 5; ours are constants below that.
    SeccompCondition::new(index.min(5), len, op, value).unwrap_or_else(|_| unreachable!())
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(|e| SeccompError::Rule(Arc::new(e)))
}

fn compile(filter: SeccompFilter) -> Result<Vec<libc::sock_filter>, SeccompError> {
    let program: seccompiler::BpfProgram = filter.try_into().map_err(filter_err)?;
    Ok(program
        .into_iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect())
}

/// On x86-64, refuse the x32 ABI (same audit arch, system call numbers with bit 30 set) with
/// ENOSYS before anything else: the deny-list is of x86-64 numbers only.
fn with_x32_guard(mut program: Vec<libc::sock_filter>) -> Vec<libc::sock_filter> {
    if std::env::consts::ARCH != "x86_64" {
        return program;
    }
    const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let guard = [
        // seccomp_data.nr is at offset 0.
        libc::sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: BPF_JGE_K,
            jt: 0,
            jf: 1,
            k: 0x4000_0000,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
    ];
    program.splice(0..0, guard);
    program
}

/// Build the default filter (see the module documentation).
fn build_default(nested_user_namespaces: bool) -> Result<Program, SeccompError> {
    let arch = target()?;
    let mut eperm: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut names: Vec<&str> = DENIED.to_vec();
    if !nested_user_namespaces {
        names.extend_from_slice(NAMESPACE_CALLS);
    }
    for name in names {
        if let Some(nr) = sysno(name) {
            eperm.insert(nr, Vec::new());
        }
    }
    let dword = SeccompCmpArgLen::Dword;
    let qword = SeccompCmpArgLen::Qword;
    if let Some(nr) = sysno("personality") {
        let conditions = PERSONALITIES
            .iter()
            .map(|p| cond(0, dword.clone(), SeccompCmpOp::Ne, *p))
            .collect();
        eperm.insert(nr, vec![rule(conditions)?]);
    }
    if let Some(nr) = sysno("ioctl") {
        eperm.insert(
            nr,
            vec![
                rule(vec![cond(1, dword.clone(), SeccompCmpOp::Eq, TIOCSTI)])?,
                rule(vec![cond(1, dword.clone(), SeccompCmpOp::Eq, TIOCLINUX)])?,
            ],
        );
    }
    // AF_VSOCK sockets reach the hypervisor's host side (Docker refuses them too).
    if let Some(nr) = sysno("socket") {
        eperm.insert(
            nr,
            vec![rule(vec![cond(
                0,
                dword.clone(),
                SeccompCmpOp::Eq,
                libc::AF_VSOCK as u64,
            )])?],
        );
    }
    let mut enosys: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    if !nested_user_namespaces {
        let flag_rules = |flags: &[u64]| -> Result<Vec<SeccompRule>, SeccompError> {
            flags
                .iter()
                .map(|f| rule(vec![cond(0, qword.clone(), SeccompCmpOp::MaskedEq(*f), *f)]))
                .collect()
        };
        if let Some(nr) = sysno("clone") {
            eperm.insert(nr, flag_rules(NS_FLAGS)?);
        }
        if let Some(nr) = sysno("unshare") {
            let mut flags = NS_FLAGS.to_vec();
            flags.push(CLONE_NEWTIME);
            eperm.insert(nr, flag_rules(&flags)?);
        }
        if let Some(nr) = sysno("clone3") {
            enosys.insert(nr, Vec::new());
        }
    }
    let mut filters = Vec::new();
    let main = SeccompFilter::new(
        eperm,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(filter_err)?;
    filters.push(with_x32_guard(compile(main)?));
    if !enosys.is_empty() {
        let f = SeccompFilter::new(
            enosys,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(filter_err)?;
        filters.push(compile(f)?);
    }
    Ok(Program { filters })
}

/// The default filter, compiled once per process (two variants: with and without nested user
/// namespaces).
pub(crate) fn default_program(nested_user_namespaces: bool) -> Result<Arc<Program>, Error> {
    static WITHOUT: OnceLock<Result<Arc<Program>, SeccompError>> = OnceLock::new();
    static WITH: OnceLock<Result<Arc<Program>, SeccompError>> = OnceLock::new();
    let cell = if nested_user_namespaces {
        &WITH
    } else {
        &WITHOUT
    };
    cell.get_or_init(|| build_default(nested_user_namespaces).map(Arc::new))
        .clone()
        .map_err(Error::Seccomp)
}

// ---- The filters of an isolated network's slirp4netns (net/slirp.rs) ----

/// Placeholder of the notifying action while seccompiler (which has no user-notification action)
/// compiles the filter; replaced by `SECCOMP_RET_USER_NOTIF` afterwards.
const NOTIFY_MARK: u32 = 0x5d1f;

/// The filters slirp4netns runs under, in the order they are installed: first the restrictions
/// (no threads and no shared address spaces — so that nothing can change a system call's
/// arguments while the supervisor reads them —, no `io_uring`, whose operations seccomp does not
/// see; `clone3`, whose flags a filter cannot read, fails with `ENOSYS` so that glibc uses
/// `clone`), then the one that notifies the supervisor: every `connect`, `sendmsg` and
/// `sendmmsg`, and `sendto` with a destination address. That last filter is installed with a
/// listener ([`crate::sys::seccomp_install_listener`]).
pub(crate) fn slirp_program() -> Result<Arc<Program>, Error> {
    static PROGRAM: OnceLock<Result<Arc<Program>, SeccompError>> = OnceLock::new();
    PROGRAM
        .get_or_init(|| build_slirp().map(Arc::new))
        .clone()
        .map_err(Error::Seccomp)
}

fn build_slirp() -> Result<Program, SeccompError> {
    let arch = target()?;
    let qword = SeccompCmpArgLen::Qword;
    let mut eperm: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for name in [
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "process_vm_writev",
        "ptrace",
    ] {
        if let Some(nr) = sysno(name) {
            eperm.insert(nr, Vec::new());
        }
    }
    if let Some(nr) = sysno("clone") {
        let shared = [libc::CLONE_THREAD as u64, libc::CLONE_VM as u64];
        eperm.insert(
            nr,
            shared
                .iter()
                .map(|f| rule(vec![cond(0, qword.clone(), SeccompCmpOp::MaskedEq(*f), *f)]))
                .collect::<Result<_, _>>()?,
        );
    }
    let restrict = SeccompFilter::new(
        eperm,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(filter_err)?;
    let mut enosys: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    if let Some(nr) = sysno("clone3") {
        enosys.insert(nr, Vec::new());
    }
    let no_clone3 = SeccompFilter::new(
        enosys,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(filter_err)?;

    let mut notify: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for name in ["connect", "sendmsg", "sendmmsg"] {
        if let Some(nr) = sysno(name) {
            notify.insert(nr, Vec::new());
        }
    }
    let sendto = sysno("sendto").ok_or(SeccompError::NoSendto)?;
    notify.insert(
        sendto,
        vec![rule(vec![cond(4, qword, SeccompCmpOp::Ne, 0)])?],
    );
    let notify = SeccompFilter::new(
        notify,
        SeccompAction::Allow,
        SeccompAction::Trace(NOTIFY_MARK),
        arch,
    )
    .map_err(filter_err)?;
    let mut notify = with_x32_guard(compile(notify)?);
    const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let mark = libc::SECCOMP_RET_TRACE | NOTIFY_MARK;
    let mut marked = 0;
    for i in &mut notify {
        if i.code == BPF_RET_K && i.k == mark {
            i.k = libc::SECCOMP_RET_USER_NOTIF;
            marked += 1;
        }
    }
    if marked == 0 {
        return Err(SeccompError::NoNotifyingAction);
    }
    Ok(Program {
        filters: vec![
            with_x32_guard(compile(restrict)?),
            compile(no_clone3)?,
            notify,
        ],
    })
}

// ---- Docker/OCI profiles ----

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Profile {
    default_action: String,
    default_errno_ret: Option<u32>,
    #[serde(default)]
    syscalls: Vec<ProfileRule>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProfileRule {
    #[serde(default)]
    names: Vec<String>,
    /// The old single-name form.
    name: Option<String>,
    action: String,
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<ProfileArg>,
    #[serde(default)]
    includes: Option<Condition>,
    #[serde(default)]
    excludes: Option<Condition>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProfileArg {
    index: u8,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: String,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Condition {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    min_kernel: Option<String>,
}

fn action(name: &str, errno: Option<u32>) -> Result<SeccompAction, SeccompError> {
    Ok(match name {
        "SCMP_ACT_ALLOW" => SeccompAction::Allow,
        "SCMP_ACT_ERRNO" => SeccompAction::Errno(errno.unwrap_or(libc::EPERM as u32)),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => SeccompAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => SeccompAction::KillProcess,
        "SCMP_ACT_TRAP" => SeccompAction::Trap,
        "SCMP_ACT_LOG" => SeccompAction::Log,
        "SCMP_ACT_TRACE" => SeccompAction::Trace(errno.unwrap_or(0)),
        other => return Err(SeccompError::UnsupportedAction(other.to_string())),
    })
}

/// Seccomp actions ordered by how restrictive the kernel considers them (lower wins).
fn severity(a: &SeccompAction) -> u8 {
    match a {
        SeccompAction::KillProcess => 0,
        SeccompAction::KillThread => 1,
        SeccompAction::Trap => 2,
        SeccompAction::Errno(_) => 3,
        SeccompAction::Trace(_) => 4,
        SeccompAction::Log => 5,
        SeccompAction::Allow => 6,
    }
}

fn arch_names() -> &'static [&'static str] {
    match std::env::consts::ARCH {
        "x86_64" => &["amd64", "x86_64", "SCMP_ARCH_X86_64"],
        "aarch64" => &["arm64", "aarch64", "SCMP_ARCH_AARCH64"],
        "riscv64" => &["riscv64", "SCMP_ARCH_RISCV64"],
        _ => &[],
    }
}

fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    parse_version(&release)
}

fn parse_version(s: &str) -> (u32, u32) {
    let mut it = s
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Whether a rule applies to this sandbox: Docker's `includes` (all listed capabilities held,
/// architecture listed, kernel at least) and `excludes` (none of the capabilities held, the
/// architecture not listed, kernel below).
fn applies(r: &ProfileRule, caps: &[caps::Capability]) -> Result<bool, SeccompError> {
    let has = |name: &str| -> Result<bool, SeccompError> {
        let cap = caps::Capability::from_str(name)
            .map_err(|_| SeccompError::UnknownCapability(name.to_string()))?;
        Ok(caps.contains(&cap))
    };
    let kernel = kernel_version();
    if let Some(inc) = &r.includes {
        for c in &inc.caps {
            if !has(c)? {
                return Ok(false);
            }
        }
        if !inc.arches.is_empty()
            && !inc
                .arches
                .iter()
                .any(|a| arch_names().contains(&a.as_str()))
        {
            return Ok(false);
        }
        if let Some(k) = &inc.min_kernel {
            if kernel < parse_version(k) {
                return Ok(false);
            }
        }
    }
    if let Some(exc) = &r.excludes {
        for c in &exc.caps {
            if has(c)? {
                return Ok(false);
            }
        }
        if exc
            .arches
            .iter()
            .any(|a| arch_names().contains(&a.as_str()))
        {
            return Ok(false);
        }
        if let Some(k) = &exc.min_kernel {
            if kernel >= parse_version(k) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

fn arg_condition(a: &ProfileArg) -> Result<SeccompCondition, SeccompError> {
    let (op, value) = match a.op.as_str() {
        "SCMP_CMP_EQ" => (SeccompCmpOp::Eq, a.value),
        "SCMP_CMP_NE" => (SeccompCmpOp::Ne, a.value),
        "SCMP_CMP_LT" => (SeccompCmpOp::Lt, a.value),
        "SCMP_CMP_LE" => (SeccompCmpOp::Le, a.value),
        "SCMP_CMP_GT" => (SeccompCmpOp::Gt, a.value),
        "SCMP_CMP_GE" => (SeccompCmpOp::Ge, a.value),
        // libseccomp: (arg & value) == valueTwo.
        "SCMP_CMP_MASKED_EQ" => (SeccompCmpOp::MaskedEq(a.value), a.value_two),
        other => return Err(SeccompError::UnsupportedOperator(other.to_string())),
    };
    SeccompCondition::new(a.index, SeccompCmpArgLen::Qword, op, value).map_err(|e| {
        SeccompError::ArgIndex {
            index: a.index,
            source: Arc::new(e),
        }
    })
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn add_rules(map: &mut Rules, nr: i64, rule: Option<SeccompRule>) {
    let entry = map.entry(nr).or_default();
    match rule {
        // An empty list is seccompiler's "unconditional": it replaces any conditional rules.
        None => entry.clear(),
        Some(r) => entry.push(r),
    }
}

/// Compile a Docker/OCI JSON profile for a sandbox holding `caps`.
pub(crate) fn compile_profile(
    text: &str,
    caps: &[caps::Capability],
) -> Result<Program, SeccompError> {
    let profile: Profile =
        serde_json::from_str(text).map_err(|e| SeccompError::Json(Arc::new(e)))?;
    let arch = target()?;
    let default = action(&profile.default_action, profile.default_errno_ret)
        .map_err(|e| SeccompError::DefaultAction(Box::new(e)))?;
    let at = |index: usize| {
        move |e: SeccompError| SeccompError::Syscall {
            index,
            source: Box::new(e),
        }
    };
    // Per action: system call -> rules, and the calls matched unconditionally.
    let mut by_action: Vec<(SeccompAction, Rules, std::collections::BTreeSet<i64>)> = Vec::new();
    for (i, r) in profile.syscalls.iter().enumerate() {
        let act = action(&r.action, r.errno_ret).map_err(at(i))?;
        if !applies(r, caps).map_err(at(i))? || act == default {
            continue;
        }
        let conditions = r
            .args
            .iter()
            .map(arg_condition)
            .collect::<Result<Vec<_>, _>>()
            .map_err(at(i))?;
        let idx = match by_action.iter().position(|(a, _, _)| *a == act) {
            Some(p) => p,
            None => {
                by_action.push((act.clone(), Rules::new(), Default::default()));
                by_action.len() - 1
            }
        };
        let (_, rules, unconditional) = &mut by_action[idx];
        for name in r.names.iter().chain(r.name.iter()) {
            // Names of other architectures (or newer kernels) are skipped, as Docker does.
            let Some(nr) = sysno(name) else { continue };
            if conditions.is_empty() {
                unconditional.insert(nr);
                add_rules(rules, nr, None);
            } else if !unconditional.contains(&nr) {
                let rule = SeccompRule::new(conditions.clone()).map_err(|e| {
                    SeccompError::SyscallRule {
                        index: i,
                        name: name.clone(),
                        source: Arc::new(e),
                    }
                })?;
                add_rules(rules, nr, Some(rule));
            }
        }
    }
    let mut filters = Vec::new();
    if default != SeccompAction::Allow {
        // Everything any rule names passes this one; the rules' own actions come from the
        // filters below (the kernel takes the most restrictive result).
        let mut pass = Rules::new();
        let mut unconditional = std::collections::BTreeSet::new();
        for (_, rules, unc) in &by_action {
            for (nr, list) in rules {
                if unc.contains(nr) || unconditional.contains(nr) {
                    unconditional.insert(*nr);
                    pass.insert(*nr, Vec::new());
                } else {
                    pass.entry(*nr).or_default().extend(list.iter().cloned());
                }
            }
        }
        let f = SeccompFilter::new(pass, default.clone(), SeccompAction::Allow, arch)
            .map_err(|e| SeccompError::ProfileFilter(Arc::new(e)))?;
        filters.push(compile(f)?);
    }
    // Most permissive first: on equal precedence the filter installed last wins.
    by_action.sort_by_key(|(a, _, _)| std::cmp::Reverse(severity(a)));
    for (act, rules, _) in by_action {
        if act == SeccompAction::Allow || rules.is_empty() {
            continue;
        }
        let f = SeccompFilter::new(rules, SeccompAction::Allow, act, arch)
            .map_err(|e| SeccompError::ProfileFilter(Arc::new(e)))?;
        filters.push(compile(f)?);
    }
    if filters.is_empty() {
        // An all-allowing profile: nothing to install but the x32 guard.
        let f = SeccompFilter::new(
            Rules::new(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(|e| SeccompError::ProfileFilter(Arc::new(e)))?;
        filters.push(compile(f)?);
    }
    if let Some(first) = filters.first_mut() {
        *first = with_x32_guard(std::mem::take(first));
    }
    Ok(Program { filters })
}

/// Read and compile the profile at `path`; errors name the file.
pub(crate) fn load_profile(path: &Path, caps: &[caps::Capability]) -> Result<Arc<Program>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| SeccompError::ReadProfile {
        path: path.to_path_buf(),
        source: Arc::new(e),
    })?;
    compile_profile(&text, caps).map(Arc::new).map_err(|e| {
        Error::Seccomp(SeccompError::Profile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_filters_compile_and_are_cached() {
        for nested in [false, true] {
            let a = default_program(nested).unwrap();
            let b = default_program(nested).unwrap();
            assert!(Arc::ptr_eq(&a, &b));
            assert_eq!(a.filters().len(), if nested { 1 } else { 2 });
            assert!(a.filters().iter().all(|f| !f.is_empty() && f.len() < 4096));
        }
    }

    #[test]
    fn profiles_compile_per_action() {
        let text = r#"{
            "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [
                {"names": ["read", "write", "no_such_call"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                {"names": ["bpf"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"caps": ["CAP_SYS_ADMIN"]}}
            ]}"#;
        let p = compile_profile(text, crate::DEFAULT_CAPABILITIES).unwrap();
        // The default-action filter and the EPERM one.
        assert_eq!(p.filters().len(), 2);
        let err = compile_profile(
            r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#,
            crate::DEFAULT_CAPABILITIES,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "defaultAction: unsupported action \"SCMP_ACT_NOTIFY\""
        );
        let err = compile_profile(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"],
                "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_XX"}]}]}"#,
            crate::DEFAULT_CAPABILITIES,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "syscalls[0]: unsupported argument operator \"SCMP_CMP_XX\""
        );
        assert!(compile_profile("{", crate::DEFAULT_CAPABILITIES).is_err());
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_version("6.18.44-fc-v769\n"), (6, 18));
        assert_eq!(parse_version("4.8"), (4, 8));
        assert_eq!(parse_version(""), (0, 0));
    }
}
