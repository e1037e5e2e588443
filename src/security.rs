//! The operator's security settings: the seccomp filter, nested user namespaces, resource
//! limits of every job and RUN step, and how sandbox ids map onto the host.
//!
//! ```json
//! {
//!   "seccomp": "default",                 // default | unconfined | /path/to/profile.json
//!   "nested_user_namespaces": false,      // may jobs create user namespaces of their own
//!   "limits": {"processes": 1024, "memory": "8GiB", "open_files": 65536, "disk": "20GiB",
//!              "log": "64MiB", "tmpfs": "64MiB"},
//!   "sandbox_ids": "auto"                 // auto | subordinate
//! }
//! ```
//!
//! The same keys (but `sandbox_ids`) may stand in a project's entry of the server configuration's
//! `projects`, which replaces the server-wide value for that project. A project's own
//! `.mistry.json` is written by the project's author, who is not trusted: there, `limits` can only
//! lower the operator's values, and `seccomp` and `nested_user_namespaces` are ignored.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sandbox::{Limits, Policy, Seccomp};
use serde::Deserialize;

/// `limits` as written: numbers, sizes such as `"4GiB"`, or `"unlimited"`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct RawLimits {
    /// `processes`: a count or `"unlimited"`; absent: unchanged.
    pub processes: Option<serde_json::Value>,
    /// `memory`: bytes or a size (`"4GiB"`), or `"unlimited"`; absent: unchanged.
    pub memory: Option<serde_json::Value>,
    /// `open_files`: a count or `"unlimited"`; absent: unchanged.
    pub open_files: Option<serde_json::Value>,
    /// `disk`: bytes or a size, or `"unlimited"`; absent: unchanged.
    pub disk: Option<serde_json::Value>,
    /// `log`: bytes or a size per log file, or `"unlimited"`; absent: unchanged.
    pub log: Option<serde_json::Value>,
    /// `tmpfs`: bytes or a size per tmpfs, or `"unlimited"`; absent: unchanged.
    pub tmpfs: Option<serde_json::Value>,
}

/// A limit: `None` is unlimited.
type Limit = Option<u64>;

/// Every limit of a job, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Processes and threads of the sandbox at once.
    pub processes: Limit,
    /// Memory of the sandbox as a whole, in bytes.
    pub memory: Limit,
    /// Open files per process: the hard limit (the soft one is at most 1024).
    pub open_files: Limit,
    /// Bytes a job (or a RUN step) may write to disk while it runs: its `data/` (cache
    /// included) and what it writes to its root filesystem; also the largest file it may write.
    /// `data/` is measured again when the job ends.
    pub disk: Limit,
    /// Bytes each of a job's logs (`out.log`, `stderr.log`) may hold; what the job writes past
    /// it is dropped after a `[log truncated at …]` line.
    pub log: Limit,
    /// The size of every tmpfs of a job or RUN step (`/dev/shm`, `RUN --mount=type=tmpfs`...).
    pub tmpfs: Limit,
    /// Whether `memory` was set in a configuration (enforced with a cgroup where one can be
    /// had) rather than the default (enforced by the sandbox's watchdog alone, which adds no
    /// latency to a job's start).
    pub memory_configured: bool,
}

impl JobLimits {
    /// The defaults: 1024 processes, half the host's memory, 65536 open files, 10 GiB of disk
    /// ([`default_disk`] lowers it to the free space where that is short), 64 MiB per log and
    /// per tmpfs.
    pub fn defaults() -> JobLimits {
        JobLimits {
            processes: Some(1024),
            memory: host_memory().map(|m| m / 2),
            open_files: Some(65536),
            disk: Some(DEFAULT_DISK),
            log: Some(DEFAULT_LOG),
            tmpfs: Some(sandbox::DEFAULT_TMPFS_SIZE),
            memory_configured: false,
        }
    }

    /// Apply `raw` over these limits: replacing them, or (`only_lower`) only where lower.
    pub fn apply(&self, raw: &RawLimits, what: &str, only_lower: bool) -> Result<JobLimits> {
        let pick = |cur: Limit, v: &Option<serde_json::Value>, key: &str, size: bool| {
            let Some(v) = v else { return Ok(cur) };
            let new = parse_limit_value(v, size).with_context(|| format!("{what}.{key}"))?;
            Ok::<Limit, anyhow::Error>(if only_lower {
                match (cur, new) {
                    (Some(c), Some(n)) => Some(c.min(n)),
                    (None, n) => n,
                    (c, None) => c,
                }
            } else {
                new
            })
        };
        Ok(JobLimits {
            processes: pick(self.processes, &raw.processes, "processes", false)?,
            memory: pick(self.memory, &raw.memory, "memory", true)?,
            open_files: pick(self.open_files, &raw.open_files, "open_files", false)?,
            disk: pick(self.disk, &raw.disk, "disk", true)?,
            log: pick(self.log, &raw.log, "log", true)?,
            tmpfs: pick(self.tmpfs, &raw.tmpfs, "tmpfs", true)?,
            memory_configured: self.memory_configured || raw.memory.is_some(),
        })
    }

    /// The sandbox's share of these limits (the logs are the engine's).
    pub fn sandbox_limits(&self) -> Limits {
        Limits {
            pids: self.processes,
            memory: self.memory,
            nofile: self.open_files.map(|n| (n.min(1024), n)),
            memory_cgroup: self.memory_configured,
            disk: self.disk,
            tmpfs: self.tmpfs,
        }
    }
}

/// The default disk limit of a job: 10 GiB (see [`default_disk`]).
pub const DEFAULT_DISK: u64 = 10 << 30;
/// The default size of each of a job's logs.
pub const DEFAULT_LOG: u64 = 64 << 20;

/// The default disk limit of a job on a server whose jobs write below `build_path`:
/// [`DEFAULT_DISK`], or half the space free on that filesystem at start when that is less (at
/// least 64 MiB), so that one job cannot fill a disk that is short already.
pub fn default_disk(build_path: &Path) -> u64 {
    let free = nix::sys::statvfs::statvfs(build_path).map_or(u64::MAX, |s| {
        s.blocks_available().saturating_mul(s.fragment_size())
    });
    default_disk_with(free)
}

/// [`default_disk`] with `free` bytes free.
fn default_disk_with(free: u64) -> u64 {
    DEFAULT_DISK.min((free / 2).max(64 << 20))
}

/// How sandbox ids map onto the host (`--sandbox-ids`, `sandbox_ids`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SandboxIds {
    /// Sandbox root is the daemon's own user; 1–65536 map onto its subordinate range when it has
    /// one.
    #[default]
    Auto,
    /// Sandbox root and every other id map onto the daemon's subordinate range, also when the
    /// daemon runs as root: a job's root is never the daemon's user.
    Subordinate,
}

/// A `sandbox_ids` value that is none of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown sandbox ids {0:?} (expected auto or subordinate)")]
pub struct UnknownSandboxIds(pub String);

impl std::str::FromStr for SandboxIds {
    type Err = UnknownSandboxIds;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "subordinate" => Ok(Self::Subordinate),
            other => Err(UnknownSandboxIds(other.to_string())),
        }
    }
}

impl std::fmt::Display for SandboxIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Subordinate => "subordinate",
        })
    }
}

/// Security settings in force for one project (or the server's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Security {
    /// The seccomp filter (`seccomp`); default mistry's own.
    pub seccomp: Seccomp,
    /// Whether jobs may create user namespaces of their own (`nested_user_namespaces`);
    /// default no.
    pub nested_user_namespaces: bool,
    /// Resource limits (`limits`); default [`JobLimits::defaults`].
    pub limits: JobLimits,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            seccomp: Seccomp::Default,
            nested_user_namespaces: false,
            limits: JobLimits::defaults(),
        }
    }
}

impl Security {
    /// What the sandbox of a job or RUN step enforces.
    pub fn policy(&self) -> Policy {
        Policy {
            seccomp: self.seccomp.clone(),
            nested_user_namespaces: self.nested_user_namespaces,
            limits: self.limits.sandbox_limits(),
        }
    }
}

/// Parse a `seccomp` value; a profile path must be absolute (relative ones are taken from
/// `base`, the configuration file's directory) and readable.
pub fn parse_seccomp(s: &str, base: &Path, what: &str) -> Result<Seccomp> {
    match s {
        "default" => Ok(Seccomp::Default),
        "unconfined" => Ok(Seccomp::Unconfined),
        "" => bail!("{what}: empty (expected default, unconfined or the path of a profile)"),
        path => {
            let p = if Path::new(path).is_absolute() {
                PathBuf::from(path)
            } else {
                base.join(path)
            };
            std::fs::metadata(&p)
                .with_context(|| format!("{what}: seccomp profile {}", p.display()))?;
            Ok(Seccomp::Profile(p))
        }
    }
}

/// A limit value: a number, a size with a unit (`"512MiB"`, `"4G"`, `"100k"`) when `size`, or
/// `"unlimited"`.
pub fn parse_limit_value(v: &serde_json::Value, size: bool) -> Result<Limit> {
    match v {
        serde_json::Value::Number(n) => match n.as_u64() {
            Some(0) | None => bail!("{n} is not a positive whole number"),
            Some(n) => Ok(Some(n)),
        },
        serde_json::Value::String(s) if s == "unlimited" => Ok(None),
        serde_json::Value::String(s) if size => parse_size(s).map(Some),
        serde_json::Value::String(s) => match s.parse::<u64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => bail!("{s:?} is not a positive whole number or \"unlimited\""),
        },
        other => bail!("{other} is not a number or a string"),
    }
}

/// `"4GiB"`, `"4G"`, `"512MB"`, `"100k"`, `"1048576"`: binary units (K = KiB, as Docker's
/// `--memory`).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid size {s:?} (examples: 512MiB, 4GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => bail!("invalid size {s:?} (examples: 512MiB, 4GiB)"),
    };
    match n.checked_mul(mult) {
        Some(0) => bail!("size {s:?} must be positive"),
        Some(v) => Ok(v),
        None => bail!("size {s:?} is too large"),
    }
}

/// Total memory of the host, from `/proc/meminfo`.
fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes `dir` holds on disk (allocated blocks, hard links once), without following symlinks,
/// by descriptor; stops counting once past `stop_after`. A tree the daemon may not read (a
/// directory of another sandbox id) is measured inside the user namespace
/// ([`sandbox::disk_usage`]).
pub fn disk_usage(dir: &Path, stop_after: u64) -> std::io::Result<u64> {
    sandbox::disk_usage(dir, stop_after).map_err(std::io::Error::other)
}

/// How many isolated network namespaces a daemon keeps ready: two per job that may run at once
/// (a job and the RUN steps of its image build take from the same pool, and jobs that follow
/// each other closely must not wait for the next one to be made), at least 4, at most 32.
pub fn network_pool_size(job_concurrency: usize) -> usize {
    (2 * job_concurrency).clamp(4, 32)
}

/// The daemon's end: the pool's namespaces go (their slirp4netns killed and reaped), and the
/// generated files.
pub fn stop_networks() {
    sandbox::stop_isolated_networks();
    sandbox::remove_isolated_network_files();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_and_limits() {
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("100k").unwrap(), 100 << 10);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_limit_value(&json!("unlimited"), true).unwrap(), None);
        assert_eq!(parse_limit_value(&json!(64), false).unwrap(), Some(64));
        assert!(parse_limit_value(&json!(0), false).is_err());
        assert!(parse_limit_value(&json!("4GiB"), false).is_err());
        assert!(parse_limit_value(&json!(-1), false).is_err());
    }

    #[test]
    fn a_project_can_only_lower_limits_it_writes_itself() {
        let base = JobLimits {
            processes: Some(1024),
            memory: Some(8 << 30),
            open_files: Some(65536),
            disk: None,
            log: Some(64 << 20),
            tmpfs: Some(64 << 20),
            memory_configured: false,
        };
        let raw = RawLimits {
            processes: Some(json!(100_000)),
            memory: Some(json!("1GiB")),
            open_files: Some(json!("unlimited")),
            disk: Some(json!("10GiB")),
            log: Some(json!("unlimited")),
            tmpfs: Some(json!("1MiB")),
        };
        let lowered = base.apply(&raw, ".mistry.json limits", true).unwrap();
        assert_eq!(
            lowered,
            JobLimits {
                processes: Some(1024),
                memory: Some(1 << 30),
                open_files: Some(65536),
                disk: Some(10 << 30),
                log: Some(64 << 20),
                tmpfs: Some(1 << 20),
                memory_configured: true,
            }
        );
        let replaced = base.apply(&raw, "limits", false).unwrap();
        assert_eq!(replaced.processes, Some(100_000));
        assert_eq!(replaced.open_files, None);
        assert_eq!(replaced.log, None);
        let e = base
            .apply(
                &RawLimits {
                    processes: Some(json!("many")),
                    ..RawLimits::default()
                },
                "projects.web.limits",
                false,
            )
            .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "projects.web.limits.processes: \"many\" is not a positive whole number or \"unlimited\""
        );
    }

    #[test]
    fn policies_follow_the_settings() {
        let s = Security::default();
        let p = s.policy();
        assert_eq!(p.seccomp, Seccomp::Default);
        assert!(!p.nested_user_namespaces);
        assert_eq!(p.limits.pids, Some(1024));
        assert_eq!(p.limits.nofile, Some((1024, 65536)));
        assert_eq!(p.limits.disk, Some(10 << 30));
        assert_eq!(p.limits.tmpfs, Some(64 << 20));
        assert_eq!(s.limits.log, Some(64 << 20));
        let dir = tempfile::tempdir().unwrap();
        assert!((64 << 20..=10 << 30).contains(&default_disk(dir.path())));
        assert_eq!(default_disk_with(u64::MAX), 10 << 30);
        assert_eq!(default_disk_with(30 << 30), 10 << 30);
        assert_eq!(default_disk_with(8 << 30), 4 << 30);
        assert_eq!(default_disk_with(100 << 20), 64 << 20);
        assert_eq!(default_disk_with(0), 64 << 20);
        // The default memory limit is the watchdog's (no cgroup migration at each start).
        assert!(!p.limits.memory_cgroup);
        assert_eq!(
            parse_seccomp("unconfined", dir.path(), "seccomp").unwrap(),
            Seccomp::Unconfined
        );
        std::fs::write(dir.path().join("p.json"), "{}").unwrap();
        assert_eq!(
            parse_seccomp("p.json", dir.path(), "seccomp").unwrap(),
            Seccomp::Profile(dir.path().join("p.json"))
        );
        let e = parse_seccomp("/nonexistent.json", dir.path(), "seccomp").unwrap_err();
        assert!(
            format!("{e:#}").starts_with("seccomp: seccomp profile /nonexistent.json: "),
            "{e:#}"
        );
    }

    #[test]
    fn disk_usage_counts_blocks_and_stops_early() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f"), vec![1u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink("/usr", dir.path().join("link")).unwrap();
        let used = disk_usage(dir.path(), u64::MAX).unwrap();
        assert!((1 << 20..(1 << 20) + (1 << 16)).contains(&used), "{used}");
        assert!(disk_usage(dir.path(), 4096).unwrap() > 4096);
    }
}
