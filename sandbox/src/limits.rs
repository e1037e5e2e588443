//! Enforcing [`Limits`] on a sandbox, with whatever the host offers, in layers:
//!
//! * processes: cgroup v2 `pids.max` when a delegated cgroup exists, else the cgroup v1 `pids`
//!   controller when it is writable (a root caller), both only where pid_max (below) cannot
//!   hold the limit, as moving a process into a cgroup costs milliseconds (an RCU grace
//!   period); always `RLIMIT_NPROC` on the job (counted
//!   per user namespace and uid since Linux 5.14; host uid 0 is exempt, so it does not hold for
//!   a root caller's sandbox root unless [`crate::IdMapping::Subordinate`] maps it elsewhere);
//!   on Linux ≥ 6.14 the sandbox's own PID namespace gets `kernel.pid_max` = limit + 1 (when that
//!   is at least 301, the kernel's minimum), which holds for every uid of the sandbox; and a
//!   watchdog in [`crate::Child::wait`] that counts the sandbox's tasks and kills it when the
//!   limit is reached.
//! * memory: cgroup v2 `memory.max`, else cgroup v1 `memory.limit_in_bytes` when writable, else
//!   the watchdog summing the resident memory of the sandbox's processes (best effort: shared
//!   pages count once per process, tmpfs and kernel memory not at all).
//! * open files: `RLIMIT_NOFILE` on the job.
//! * disk: `RLIMIT_FSIZE` for any one file, and the disk watch (`disk.rs`) for what the root's
//!   writable part and the caller's trees hold together.
//! * tmpfs: every tmpfs of the sandbox gets `size=` (`plan.rs`).
//!
//! The watchdog scans only while the job runs: first after [`SCAN_INTERVAL`], then every
//! interval, walking `/proc/<pid>/task/<tid>/children` from the sandbox's init.

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use crate::config::Limits;

/// How often the watchdog counts the sandbox's processes.
pub(crate) const SCAN_INTERVAL: Duration = Duration::from_millis(200);

/// Which limit ended a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The number of processes and threads at once.
    Processes(u64),
    /// Memory, bytes.
    Memory(u64),
    /// Disk, bytes (see [`crate::Limits::disk`]).
    Disk(u64),
    /// Disk, bytes: what the sandbox wrote could no longer be measured.
    DiskUnmeasurable(u64),
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Processes(n) => write!(f, "exceeded its process limit of {n}"),
            Limit::Memory(n) => write!(f, "exceeded its memory limit of {n} bytes"),
            Limit::Disk(n) => write!(f, "exceeded its disk limit of {n} bytes"),
            Limit::DiskUnmeasurable(n) => write!(
                f,
                "made its disk use unmeasurable (its disk limit is {n} bytes)"
            ),
        }
    }
}

/// What the watchdog checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Watch {
    pub pids: Option<u64>,
    pub memory: Option<u64>,
}

impl Watch {
    pub(crate) fn active(&self) -> bool {
        self.pids.is_some() || self.memory.is_some()
    }

    /// Count the sandbox of `init`: which limit it reached, if any, else how soon to look
    /// again (sooner when it is close to the process limit: a fork bomb whose processes die
    /// when refused hovers just below it). `refused`: a cgroup reports a refused fork.
    pub(crate) fn check(&self, init: i32, refused: bool) -> Result<Duration, Limit> {
        if let (Some(max), true) = (self.pids, refused) {
            return Err(Limit::Processes(max));
        }
        let Some(usage) = scan(init, self.memory.is_some()) else {
            return Ok(SCAN_INTERVAL);
        };
        if let Some(max) = self.pids {
            if usage.tasks >= max {
                return Err(Limit::Processes(max));
            }
        }
        if let Some(max) = self.memory {
            if usage.rss > max {
                return Err(Limit::Memory(max));
            }
        }
        let close = self.pids.is_some_and(|max| usage.tasks * 4 >= max * 3)
            || self.memory.is_some_and(|max| usage.rss / 4 * 5 >= max);
        Ok(if close { CLOSE_INTERVAL } else { SCAN_INTERVAL })
    }
}

/// How often the watchdog looks while the sandbox is close to a limit.
pub(crate) const CLOSE_INTERVAL: Duration = Duration::from_millis(10);

/// What the sandbox of one init uses right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Processes and threads, init included.
    pub tasks: u64,
    /// Resident memory, bytes (0 unless asked for).
    pub rss: u64,
}

/// Fields of `/proc/<pid>/stat` after the command name: (threads, rss pages).
pub(crate) fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let (_, rest) = stat.rsplit_once(") ")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): num_threads is field 20, rss field 24.
    Some((f.get(17)?.parse().ok()?, f.get(21)?.parse().ok()?))
}

/// Walk the process tree under `init` through the `children` files of every thread.
pub(crate) fn scan(init: i32, with_rss: bool) -> Option<Usage> {
    let mut usage = Usage::default();
    let mut seen = HashSet::new();
    let mut todo = vec![init];
    let mut first = true;
    while let Some(pid) = todo.pop() {
        if !seen.insert(pid) || seen.len() > 1_000_000 {
            continue;
        }
        let base = format!("/proc/{pid}");
        let threads = match std::fs::read_dir(format!("{base}/task")) {
            Ok(d) => d,
            // init gone: nothing to count; a child gone meanwhile: skip it.
            Err(_) if first => return None,
            Err(_) => continue,
        };
        first = false;
        let mut n = 0;
        for t in threads.flatten() {
            n += 1;
            let path = t.path().join("children");
            if let Ok(text) = std::fs::read_to_string(&path) {
                todo.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
        usage.tasks += n.max(1);
        if with_rss {
            if let Some((_, rss)) = std::fs::read_to_string(format!("{base}/stat"))
                .ok()
                .as_deref()
                .and_then(parse_stat)
            {
                usage.rss += rss * crate::sys::page_size() as u64;
            }
        }
    }
    Some(usage)
}

/// Major and minor version of the running kernel.
pub(crate) fn kernel_version() -> (u32, u32) {
    static V: OnceLock<(u32, u32)> = OnceLock::new();
    *V.get_or_init(|| {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut it = release
            .trim()
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    })
}

/// The kernel's smallest accepted `pid_max`.
const PID_MAX_MIN: u64 = 301;

/// `kernel.pid_max` for the sandbox's PID namespace: limit + 1 (pids 1..=limit), when the kernel
/// has per-namespace pid_max (6.14) and the value is within its bounds. Never on older kernels:
/// there the sysctl is global, and a root caller's sandbox could change the host's.
pub(crate) fn pid_max_for(limit: u64) -> Option<u64> {
    if kernel_version() < (6, 14) {
        return None;
    }
    let value = limit.checked_add(1)?;
    let current: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (PID_MAX_MIN..current).contains(&value).then_some(value)
}

/// The caller's own hard limit of `resource`.
fn hard_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut r = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit64 writes one rlimit64 into `r`.
    if unsafe { libc::getrlimit64(resource, &mut r) } == 0 {
        r.rlim_max
    } else {
        libc::RLIM64_INFINITY
    }
}

/// The rlimits the job gets for `limits` (resource, soft, hard), clamped to the caller's own
/// hard limits (raising them needs privilege on the host). `explicit` are resources the caller
/// set with [`crate::Sandbox::rlimit`]; those win.
pub(crate) fn rlimits(limits: &Limits, explicit: &[libc::c_int]) -> Vec<(libc::c_int, u64, u64)> {
    let mut out = Vec::new();
    let mut push = |resource: libc::__rlimit_resource_t, soft: u64, hard: u64| {
        if explicit.contains(&(resource as libc::c_int)) {
            return;
        }
        let max = hard_limit(resource);
        let hard = hard.min(max);
        out.push((resource as libc::c_int, soft.min(hard), hard));
    };
    if let Some(n) = limits.pids {
        push(libc::RLIMIT_NPROC, n, n);
    }
    if let Some((soft, hard)) = limits.nofile {
        push(libc::RLIMIT_NOFILE, soft, hard);
    }
    if let Some(n) = limits.disk {
        // No single file larger than everything the sandbox may write.
        push(libc::RLIMIT_FSIZE, n, n);
    }
    out
}

/// Whether `path` is a directory this process may create cgroups in.
pub(crate) fn writable(path: &Path) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        let stat = "42 (a (weird) name) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 \
                    1000 12345678 512 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((3, 512)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn scan_counts_a_process_tree() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 5 & sleep 5 & wait"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let mut usage = Usage::default();
        for _ in 0..100 {
            usage = scan(pid, true).unwrap();
            if usage.tasks == 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(usage.tasks, 3);
        assert!(usage.rss > 0);
        child.kill().unwrap();
        let _ = child.wait();
        assert_eq!(scan(-5, false), None);
    }

    #[test]
    fn limits_display() {
        assert_eq!(
            Limit::Processes(64).to_string(),
            "exceeded its process limit of 64"
        );
        assert_eq!(
            Limit::Memory(1 << 20).to_string(),
            "exceeded its memory limit of 1048576 bytes"
        );
    }

    #[test]
    fn pid_max_is_never_below_the_kernel_minimum() {
        assert_eq!(pid_max_for(64), None);
        if kernel_version() >= (6, 14) {
            assert_eq!(pid_max_for(1024), Some(1025));
        } else {
            assert_eq!(pid_max_for(1024), None);
        }
    }
}
