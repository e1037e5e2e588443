//! cgroup v2 limits (memory, pids, cpu) for one sandbox, when the host delegates them.
//!
//! The caller's own cgroup v2 directory is found from `/proc/self/cgroup` and
//! `/proc/self/mountinfo`. A sub-cgroup is created there when the controllers the limits need are
//! available and enabled (or can be enabled) for children. Anything else — a v1-only or hybrid
//! layout where the controllers belong to v1 hierarchies, a read-only cgroupfs, no delegation — is
//! not an error: [`prepare`] says why, the caller logs it, and the sandbox runs without limits.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::CgroupLimits;

/// A sub-cgroup created for one sandbox; removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Find the caller's cgroup v2 directory from the texts of `/proc/self/cgroup` and
/// `/proc/self/mountinfo`.
pub fn locate(proc_cgroup: &str, mountinfo: &str) -> Result<PathBuf, String> {
    let rel = proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("the process is in no cgroup v2 hierarchy (cgroup v1 only)")?;
    // mountinfo: id parent major:minor root mountpoint options... - fstype source superopts
    let (root, mountpoint) = mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let f: Vec<&str> = left.split_whitespace().collect();
            Some((f.get(3)?.to_string(), f.get(4)?.to_string()))
        })
        .ok_or("no cgroup2 filesystem is mounted")?;
    let rel = rel.strip_prefix(root.trim_end_matches('/')).unwrap_or(rel);
    Ok(Path::new(&mountpoint).join(rel.trim_start_matches('/')))
}

fn needed(limits: &CgroupLimits) -> Vec<&'static str> {
    let mut v = Vec::new();
    if limits.memory_max.is_some() {
        v.push("memory");
    }
    if limits.pids_max.is_some() {
        v.push("pids");
    }
    if limits.cpus.is_some() {
        v.push("cpu");
    }
    v
}

/// Create a sub-cgroup with `limits` under `parent`, or say why not.
pub fn create_in(parent: &Path, limits: &CgroupLimits) -> Result<Cgroup, String> {
    let read = |name: &str| std::fs::read_to_string(parent.join(name)).unwrap_or_default();
    let available = read("cgroup.controllers");
    let enabled = read("cgroup.subtree_control");
    for c in needed(limits) {
        if !available.split_whitespace().any(|x| x == c) {
            return Err(format!(
                "the {c} controller is not available in {} (hybrid layout: it is bound to a v1 hierarchy, or not delegated)",
                parent.display()
            ));
        }
        if !enabled.split_whitespace().any(|x| x == c) {
            std::fs::write(parent.join("cgroup.subtree_control"), format!("+{c}")).map_err(
                |e| {
                    format!(
                        "cannot enable the {c} controller in {}: {e}",
                        parent.join("cgroup.subtree_control").display()
                    )
                },
            )?;
        }
    }
    let name = format!(
        "mistry-sandbox-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let path = parent.join(name);
    std::fs::create_dir(&path)
        .map_err(|e| format!("cannot create cgroup {}: {e}", path.display()))?;
    let cgroup = Cgroup { path };
    let mut writes = Vec::new();
    if let Some(m) = limits.memory_max {
        writes.push(("memory.max", m.to_string()));
        writes.push(("memory.swap.max", "0".to_string()));
    }
    if let Some(p) = limits.pids_max {
        writes.push(("pids.max", p.to_string()));
    }
    if let Some(c) = limits.cpus {
        let period = 100_000u64;
        writes.push((
            "cpu.max",
            format!("{} {period}", (c * period as f64).max(1000.0) as u64),
        ));
    }
    for (file, value) in writes {
        let target = cgroup.path.join(file);
        // memory.swap.max is absent without swap accounting; that limit is best effort.
        if file == "memory.swap.max" && !target.exists() {
            continue;
        }
        std::fs::write(&target, &value)
            .map_err(|e| format!("cannot write {value} to {}: {e}", target.display()))?;
    }
    Ok(cgroup)
}

/// A cgroup with `limits` for a new sandbox: `Ok(None)` when no limit is asked for, `Err(reason)`
/// when the host does not let us apply them.
pub fn prepare(limits: &CgroupLimits) -> Result<Option<Cgroup>, String> {
    if limits.is_empty() {
        return Ok(None);
    }
    let read = |p: &str| std::fs::read_to_string(p).map_err(|e| format!("reading {p}: {e}"));
    let parent = locate(&read("/proc/self/cgroup")?, &read("/proc/self/mountinfo")?)?;
    create_in(&parent, limits).map(Some)
}

impl Cgroup {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Move process `pid` (and so all it will fork) into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), String> {
        let procs = self.path.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .map_err(|e| format!("cannot move {pid} into {}: {e}", procs.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Everything in it is dead by now (the PID namespace is gone); cgroup.kill makes sure.
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..50 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(2))
                }
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_HYBRID: &str = "\
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn locates_the_unified_hierarchy() {
        let got = locate("4:memory:/x\n0::/user.slice/job\n", MOUNTINFO_HYBRID).unwrap();
        assert_eq!(got, PathBuf::from("/sys/fs/cgroup/unified/user.slice/job"));
        let err = locate("4:memory:/x\n", MOUNTINFO_HYBRID).unwrap_err();
        assert!(err.contains("cgroup v1 only"), "{err}");
        let err = locate("0::/\n", "35 31 0:32 / /m rw - cgroup cgroup rw,memory\n").unwrap_err();
        assert_eq!(err, "no cgroup2 filesystem is mounted");
    }

    #[test]
    fn missing_controller_is_a_reason_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu pids\n").unwrap();
        std::fs::write(dir.path().join("cgroup.subtree_control"), "cpu pids\n").unwrap();
        let limits = CgroupLimits {
            memory_max: Some(1 << 20),
            ..Default::default()
        };
        let why = create_in(dir.path(), &limits).unwrap_err();
        assert!(
            why.starts_with("the memory controller is not available in"),
            "{why}"
        );
    }

    #[test]
    fn writes_limits_into_a_new_child() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::write(
            dir.path().join("cgroup.subtree_control"),
            "cpu memory pids\n",
        )
        .unwrap();
        let limits = CgroupLimits {
            memory_max: Some(64 << 20),
            pids_max: Some(100),
            cpus: Some(1.5),
        };
        let cg = create_in(dir.path(), &limits).unwrap();
        let read = |f: &str| std::fs::read_to_string(cg.path().join(f)).unwrap();
        assert_eq!(read("memory.max"), "67108864");
        assert_eq!(read("pids.max"), "100");
        assert_eq!(read("cpu.max"), "150000 100000");
    }
}
