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
pub(crate) struct Cgroup {
    path: PathBuf,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Why a sandbox gets no cgroup limits (logged by the caller, never fatal).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CgroupError {
    #[error("the process is in no cgroup v2 hierarchy (cgroup v1 only)")]
    NoV2,
    #[error("no cgroup2 filesystem is mounted")]
    NoCgroup2Mount,
    #[error("the {controller} controller is not available in {} (hybrid layout: it is bound to a v1 hierarchy, or not delegated)", parent.display())]
    ControllerUnavailable {
        controller: &'static str,
        parent: PathBuf,
    },
    #[error("cannot enable the {controller} controller in {}: {source}", file.display())]
    Enable {
        controller: &'static str,
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create cgroup {}: {source}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {value} to {}: {source}", file.display())]
    Write {
        value: String,
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot move {pid} into {}: {source}", procs.display())]
    Move {
        pid: i32,
        procs: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Find the caller's cgroup v2 directory from the texts of `/proc/self/cgroup` and
/// `/proc/self/mountinfo`.
pub(crate) fn locate(proc_cgroup: &str, mountinfo: &str) -> Result<PathBuf, CgroupError> {
    let rel = proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CgroupError::NoV2)?;
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
        .ok_or(CgroupError::NoCgroup2Mount)?;
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
pub(crate) fn create_in(parent: &Path, limits: &CgroupLimits) -> Result<Cgroup, CgroupError> {
    let read = |name: &str| std::fs::read_to_string(parent.join(name)).unwrap_or_default();
    let available = read("cgroup.controllers");
    let enabled = read("cgroup.subtree_control");
    for c in needed(limits) {
        if !available.split_whitespace().any(|x| x == c) {
            return Err(CgroupError::ControllerUnavailable {
                controller: c,
                parent: parent.to_path_buf(),
            });
        }
        if !enabled.split_whitespace().any(|x| x == c) {
            let file = parent.join("cgroup.subtree_control");
            std::fs::write(&file, format!("+{c}")).map_err(|source| CgroupError::Enable {
                controller: c,
                file,
                source,
            })?;
        }
    }
    let name = format!(
        "mistry-sandbox-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let path = parent.join(name);
    if let Err(source) = std::fs::create_dir(&path) {
        return Err(CgroupError::Create { path, source });
    }
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
        if let Err(source) = std::fs::write(&target, &value) {
            return Err(CgroupError::Write {
                value,
                file: target,
                source,
            });
        }
    }
    Ok(cgroup)
}

/// A cgroup with `limits` for a new sandbox: `Ok(None)` when no limit is asked for, `Err(reason)`
/// when the host does not let us apply them.
pub(crate) fn prepare(limits: &CgroupLimits) -> Result<Option<Cgroup>, CgroupError> {
    if limits.is_empty() {
        return Ok(None);
    }
    let read = |path: &'static str| {
        std::fs::read_to_string(path).map_err(|source| CgroupError::Read { path, source })
    };
    let parent = locate(&read("/proc/self/cgroup")?, &read("/proc/self/mountinfo")?)?;
    create_in(&parent, limits).map(Some)
}

impl Cgroup {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the kernel's OOM killer killed a process of the cgroup (`memory.events`).
    pub(crate) fn oom_killed(&self) -> bool {
        counter(&self.path.join("memory.events"), "oom_kill") > 0
    }

    /// Whether a fork was refused for the process limit (`pids.events`).
    pub(crate) fn pids_refused(&self) -> bool {
        counter(&self.path.join("pids.events"), "max") > 0
    }

    /// Move process `pid` (and so all it will fork) into the cgroup.
    pub(crate) fn add(&self, pid: i32) -> Result<(), CgroupError> {
        move_into(&self.path, pid)
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
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Err(_) => return,
            }
        }
    }
}

/// Move process `pid` into the group at `dir` (v1 or v2).
fn move_into(dir: &Path, pid: i32) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    match std::fs::write(&procs, pid.to_string()) {
        Ok(()) => Ok(()),
        Err(source) => Err(CgroupError::Move { pid, procs, source }),
    }
}

/// A `key value` counter of a cgroup file (0 when absent).
fn counter(file: &Path, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or(0)
}

/// cgroup v1 groups (one per controller) for one sandbox, for hosts whose `pids` and `memory`
/// controllers are bound to v1 hierarchies (hybrid layouts). Needs write access to the
/// controller's hierarchy, which in practice means a root caller. Removed on drop.
#[derive(Debug, Default)]
pub(crate) struct V1Group {
    dirs: Vec<PathBuf>,
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
}

/// The caller's path in the v1 hierarchy of `controller`, from `/proc/self/cgroup`.
pub(crate) fn v1_path(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, controllers, path) = (it.next()?, it.next()?, it.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    })
}

/// Remove, once per process and parent, empty groups left by sandboxes of processes that are
/// gone (a daemon killed with SIGKILL cannot clean up after itself).
fn sweep_once(parent: &Path) {
    static SWEPT: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut swept = SWEPT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if swept.iter().any(|p| p == parent) {
        return;
    }
    swept.push(parent.to_path_buf());
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("mistry-sandbox-"))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            // Fails harmlessly (EBUSY) when something still runs in it.
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// Create v1 groups for a process limit and/or a memory limit, where the hierarchies are
/// mounted at `/sys/fs/cgroup/<controller>` and writable. Returns the group (possibly empty)
/// and which of the two limits it holds.
pub(crate) fn prepare_v1(pids: Option<u64>, memory: Option<u64>) -> (V1Group, bool, bool) {
    let mut group = V1Group::default();
    let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let name = format!(
        "mistry-sandbox-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut make = |controller: &str, files: &[(&str, String)]| -> bool {
        let root = Path::new("/sys/fs/cgroup").join(controller);
        let Some(rel) = v1_path(&proc_cgroup, controller) else {
            return false;
        };
        let parent = root.join(rel.trim_start_matches('/'));
        if !crate::limits::writable(&parent) {
            return false;
        }
        let dir = parent.join(&name);
        if std::fs::create_dir(&dir).is_err() {
            return false;
        }
        for (file, value) in files {
            let target = dir.join(file);
            if *file == "memory.memsw.limit_in_bytes" && !target.exists() {
                continue;
            }
            if std::fs::write(&target, value).is_err() {
                let _ = std::fs::remove_dir(&dir);
                return false;
            }
        }
        sweep_once(&parent);
        match controller {
            "memory" => group.memory = Some(dir.clone()),
            "pids" => group.pids = Some(dir.clone()),
            _ => {}
        }
        group.dirs.push(dir);
        true
    };
    let has_pids = pids.is_some_and(|n| make("pids", &[("pids.max", n.to_string())]));
    let has_memory = memory.is_some_and(|m| {
        make(
            "memory",
            &[
                ("memory.limit_in_bytes", m.to_string()),
                ("memory.memsw.limit_in_bytes", m.to_string()),
            ],
        )
    });
    (group, has_pids, has_memory)
}

impl V1Group {
    pub(crate) fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// Move process `pid` into every group.
    pub(crate) fn add(&self, pid: i32) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            move_into(dir, pid)?;
        }
        Ok(())
    }

    /// Whether a fork was refused for the process limit (`pids.events`).
    pub(crate) fn pids_refused(&self) -> bool {
        self.pids
            .as_ref()
            .is_some_and(|d| counter(&d.join("pids.events"), "max") > 0)
    }

    /// Whether the OOM killer killed a process of the memory group.
    pub(crate) fn oom_killed(&self) -> bool {
        self.memory
            .as_ref()
            .is_some_and(|d| counter(&d.join("memory.oom_control"), "oom_kill") > 0)
    }
}

impl Drop for V1Group {
    fn drop(&mut self) {
        for dir in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    Err(_) => break,
                }
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
        assert!(err.to_string().contains("cgroup v1 only"), "{err}");
        let err = locate("0::/\n", "35 31 0:32 / /m rw - cgroup cgroup rw,memory\n").unwrap_err();
        assert_eq!(err.to_string(), "no cgroup2 filesystem is mounted");
    }

    #[test]
    fn v1_paths() {
        let text =
            "9:name=systemd:/\n8:pids:/a/b\n4:memory:/process_api/x\n2:cpu,cpuacct:/\n0::/\n";
        assert_eq!(v1_path(text, "pids").as_deref(), Some("/a/b"));
        assert_eq!(v1_path(text, "memory").as_deref(), Some("/process_api/x"));
        assert_eq!(v1_path(text, "cpuacct").as_deref(), Some("/"));
        assert_eq!(v1_path(text, "blkio"), None);
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
            why.to_string()
                .starts_with("the memory controller is not available in"),
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
