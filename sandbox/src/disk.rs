//! The disk watch: how many bytes the trees a sandbox writes hold, measured while it runs, and
//! the sandbox killed when they pass [`crate::Limits::disk`].
//!
//! The trees are host directories: the root's writable part (an overlay's upper directory, or a
//! root directory, counted by what it grew) and the trees given with
//! [`crate::Sandbox::count_disk`]. A watch thread measures them ([`usage`]): allocated blocks of
//! every inode, hard links once, no symlink followed, iteratively with at most [`MAX_HELD`] + 2
//! directories open however deep the tree is. Where this process may not read a directory (an
//! unprivileged caller, a directory of another sandbox id with mode 0700, or one made mode 000),
//! the tree is measured by `du` in a sandbox of its own, whose root has the capabilities over
//! the sandbox's ids that this process lacks. The first measurement is after 50 ms, then the
//! interval adapts to what a measurement costs (at most about a tenth of one core: 200 ms to
//! 2 s), and shortens when the trees grow toward the limit fast or are close to it (down to
//! 20 ms).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

use crate::config::Counted;

/// Directories [`usage`] keeps open at most (besides the one it reads and its parent).
pub(crate) const MAX_HELD: usize = 16;
/// The first measurement (cheap: a job's writable trees are nearly empty then).
pub(crate) const FIRST_SCAN: Duration = Duration::from_millis(50);
/// The shortest interval far from the limit.
pub(crate) const SCAN_INTERVAL: Duration = Duration::from_millis(200);
/// The longest interval (unless one measurement costs more than half of it).
const MAX_INTERVAL: Duration = Duration::from_secs(2);
/// The shortest interval close to the limit (at least twice what a measurement costs).
const CLOSE_INTERVAL: Duration = Duration::from_millis(20);

/// When to measure again: after `cost` (what this measurement took; the walk takes at most
/// about a tenth of a core), sooner when what was written (`now`, `before` at the last
/// measurement, `since` ago) grows toward `limit` fast enough to reach it before then (at half
/// the time it would take at that pace).
fn next_interval(cost: Duration, limit: u64, now: u64, before: u64, since: Duration) -> Duration {
    let shortest = (cost * 2).max(CLOSE_INTERVAL);
    let usual = (cost * 10).clamp(SCAN_INTERVAL, MAX_INTERVAL.max(cost * 2));
    let close = now / 4 * 5 >= limit;
    let by_pace = match now.checked_sub(before) {
        Some(grown) if grown > 0 => {
            let left = limit.saturating_sub(now) as f64;
            since.mul_f64((left / grown as f64 / 2.0).min(1e6))
        }
        _ => Duration::MAX,
    };
    if close {
        shortest
    } else {
        usual.min(by_pace).max(shortest)
    }
}

/// Why a tree could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// The measurement was called off ([`usage`]'s `cancel`).
    #[error("cancelled")]
    Cancelled,
    /// Opening or stat-ing a directory or file of the tree failed (other than a permission
    /// refusal, which is reported as unreadable instead).
    #[error("{}: {source}", path.display())]
    Io {
        /// The host path that failed.
        path: PathBuf,
        /// The error from the system call.
        #[source]
        source: std::io::Error,
    },
    /// The `du` sandbox could not run.
    #[error("du: {0}")]
    Du(#[source] Box<crate::Error>),
    /// `du` ran but did not report every tree.
    #[error("du ({status}): {stderr}")]
    DuOutput {
        /// How `du` exited.
        status: crate::ExitStatus,
        /// `du`'s stderr, trimmed.
        stderr: String,
    },
}

/// What [`usage`] found: the bytes it could count, and the directories this process may not
/// read (not counted; the `du` fallback can).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub bytes: u64,
    pub unreadable: Vec<PathBuf>,
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by open(2)/openat(2) and belongs to no one else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn open_dir_at(dir: Option<RawFd>, name: &OsStr, follow: bool) -> nix::Result<OwnedFd> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    if !follow {
        flags |= OFlag::O_NOFOLLOW;
    }
    nix::fcntl::openat(dir, name, flags, Mode::empty()).map(owned)
}

fn blocks(st: &FileStat) -> u64 {
    (st.st_blocks.max(0) as u64).saturating_mul(512)
}

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// One directory on the way down: its identity, its name in its parent, the subdirectories
/// still to visit, and its descriptor while held.
struct Frame {
    id: (u64, u64),
    name: OsString,
    subdirs: Vec<OsString>,
    fd: Option<OwnedFd>,
}

struct Walk<'a> {
    total: u64,
    /// Inodes with several links, counted once.
    linked: HashSet<(u64, u64)>,
    cancel: &'a AtomicBool,
    entries: u64,
    unreadable: Vec<PathBuf>,
}

/// Why a directory could not be listed.
enum ListError {
    /// This process may not read it (or look up its entries).
    Denied,
    Other(UsageError),
}

impl Walk<'_> {
    /// Count the entries of `dir` (its own blocks are counted by its parent); its
    /// subdirectories' names. Nothing is counted for a directory this process may not read.
    fn list(
        &mut self,
        dir: &OwnedFd,
        path: impl Fn() -> PathBuf,
    ) -> Result<Vec<OsString>, ListError> {
        let io = |e: Errno| match e {
            Errno::EACCES | Errno::EPERM => ListError::Denied,
            e => ListError::Other(UsageError::Io {
                path: path(),
                source: e.into(),
            }),
        };
        // Listing through a duplicate: nix's Dir owns (and closes) its descriptor.
        let dup = nix::unistd::dup(dir.as_raw_fd()).map_err(io)?;
        let mut d = nix::dir::Dir::from_fd(dup).map_err(io)?;
        let mut subdirs = Vec::new();
        let mut bytes = 0u64;
        let mut linked = Vec::new();
        for entry in d.iter() {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            self.entries += 1;
            if self.entries % 1024 == 0 && self.cancel.load(Ordering::Relaxed) {
                return Err(ListError::Other(UsageError::Cancelled));
            }
            let st = match nix::sys::stat::fstatat(
                Some(dir.as_raw_fd()),
                entry.file_name(),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(st) => st,
                // Removed meanwhile.
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(io(e)),
            };
            if is_dir(&st) {
                subdirs.push(OsStr::from_bytes(name).to_os_string());
            } else if st.st_nlink > 1 {
                let id = (st.st_dev, st.st_ino);
                if self.linked.contains(&id) || linked.contains(&id) {
                    continue;
                }
                linked.push(id);
            }
            bytes = bytes.saturating_add(blocks(&st));
        }
        self.total = self.total.saturating_add(bytes);
        self.linked.extend(linked);
        Ok(subdirs)
    }

    /// List `dir` (at `path`): its subdirectories, none when it may not be read (then it is
    /// left to the fallback).
    fn enter(
        &mut self,
        dir: &OwnedFd,
        path: impl Fn() -> PathBuf,
    ) -> Result<Vec<OsString>, UsageError> {
        match self.list(dir, &path) {
            Ok(subdirs) => Ok(subdirs),
            Err(ListError::Denied) => {
                self.unreadable.push(path());
                Ok(Vec::new())
            }
            Err(ListError::Other(e)) => Err(e),
        }
    }

    /// Open again the directory of `frames[i]` (whose descriptor was let go): from the nearest
    /// held directory above it, name by name, checking that each is still what was seen.
    fn reopen(&self, frames: &[Frame], i: usize) -> Option<OwnedFd> {
        let held = (0..i).rev().find(|&j| frames[j].fd.is_some())?;
        let mut cur = open_dir_at(
            frames[held]
                .fd
                .as_ref()
                .map(std::os::fd::AsRawFd::as_raw_fd),
            OsStr::new("."),
            false,
        )
        .ok()?;
        for f in &frames[held + 1..=i] {
            let next = open_dir_at(Some(cur.as_raw_fd()), &f.name, false).ok()?;
            let st = nix::sys::stat::fstat(next.as_raw_fd()).ok()?;
            if (st.st_dev, st.st_ino) != f.id {
                return None;
            }
            cur = next;
        }
        Some(cur)
    }
}

/// Bytes the tree `root` holds on disk: the allocated blocks of every inode below it, itself
/// included, an inode with several links once; no symlink followed. Stops counting once past
/// `stop_after`. Entries removed meanwhile are skipped; a directory moved while it is measured
/// may be missed or counted twice. Directories this process may not read are listed in
/// [`Usage::unreadable`], what they hold not counted.
pub(crate) fn usage(
    root: &Path,
    stop_after: u64,
    cancel: &AtomicBool,
) -> Result<Usage, UsageError> {
    let top = match nix::fcntl::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => owned(fd),
        Err(Errno::EACCES | Errno::EPERM) => {
            return Ok(Usage {
                bytes: 0,
                unreadable: vec![root.to_path_buf()],
            })
        }
        Err(e) => {
            return Err(UsageError::Io {
                path: root.to_path_buf(),
                source: e.into(),
            })
        }
    };
    let st = nix::sys::stat::fstat(top.as_raw_fd()).map_err(|e| UsageError::Io {
        path: root.to_path_buf(),
        source: e.into(),
    })?;
    let mut walk = Walk {
        total: blocks(&st),
        linked: HashSet::new(),
        cancel,
        entries: 0,
        unreadable: Vec::new(),
    };
    let subdirs = walk.enter(&top, || root.to_path_buf())?;
    if !walk.unreadable.is_empty() {
        // The root itself is left to the fallback, which measures it whole.
        walk.total = 0;
    }
    let mut frames = vec![Frame {
        id: (st.st_dev, st.st_ino),
        name: OsString::new(),
        subdirs,
        fd: Some(top),
    }];
    while let Some(last) = frames.len().checked_sub(1) {
        if walk.total > stop_after {
            break;
        }
        let Some(name) = frames[last].subdirs.pop() else {
            // Done with this directory: back to its parent, opened again if it was let go.
            let done = frames.pop();
            let Some(parent) = frames.len().checked_sub(1) else {
                break;
            };
            if frames[parent].fd.is_none() {
                let up = done
                    .and_then(|d| d.fd)
                    .and_then(|fd| open_dir_at(Some(fd.as_raw_fd()), OsStr::new(".."), true).ok())
                    .filter(|fd| {
                        nix::sys::stat::fstat(fd.as_raw_fd())
                            .is_ok_and(|st| (st.st_dev, st.st_ino) == frames[parent].id)
                    });
                frames[parent].fd = up.or_else(|| walk.reopen(&frames, parent));
                if frames[parent].fd.is_none() {
                    // Moved away meanwhile: what is left of it is not counted here.
                    frames[parent].subdirs.clear();
                }
            }
            continue;
        };
        let Some(parent_fd) = frames[last]
            .fd
            .as_ref()
            .map(std::os::fd::AsRawFd::as_raw_fd)
        else {
            frames[last].subdirs.clear();
            continue;
        };
        let fd = match open_dir_at(Some(parent_fd), &name, false) {
            Ok(fd) => fd,
            // Gone, or replaced by something that is not a directory (a link) meanwhile.
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => continue,
            Err(Errno::EACCES | Errno::EPERM) => {
                walk.unreadable.push(walk_path(root, &frames, &name));
                continue;
            }
            Err(e) => {
                return Err(UsageError::Io {
                    path: walk_path(root, &frames, &name),
                    source: e.into(),
                })
            }
        };
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| UsageError::Io {
            path: walk_path(root, &frames, &name),
            source: e.into(),
        })?;
        let subdirs = walk.enter(&fd, || walk_path(root, &frames, &name))?;
        frames.push(Frame {
            id: (st.st_dev, st.st_ino),
            name,
            subdirs,
            fd: Some(fd),
        });
        // Keep at most MAX_HELD descriptors: let go of the highest held one.
        if frames.len() > MAX_HELD + 1 {
            let drop_at = frames.len() - MAX_HELD - 2;
            if drop_at > 0 {
                frames[drop_at].fd = None;
            }
        }
    }
    Ok(Usage {
        bytes: walk.total,
        unreadable: walk.unreadable,
    })
}

fn walk_path(root: &Path, frames: &[Frame], name: &OsStr) -> PathBuf {
    let mut p = root.to_path_buf();
    for f in frames.iter().skip(1) {
        p.push(&f.name);
    }
    p.push(name);
    p
}

/// Bytes each of `trees` holds, measured by `du` in a sandbox whose root has the capabilities
/// over the sandbox's ids (for trees this process may not read).
fn usage_by_du(trees: &[&Path]) -> Result<Vec<u64>, UsageError> {
    // `-0`: records end with NUL, so a name with a newline (a job chooses its names) cannot
    // pass for another record.
    let mut argv: Vec<OsString> = vec!["du".into(), "-s".into(), "-k".into(), "-0".into()];
    argv.extend(trees.iter().map(|t| t.as_os_str().to_os_string()));
    let out = crate::Sandbox::new("/")
        .read_only_root(true)
        .network(crate::NetworkMode::None)
        .hostname("mistry-du")
        .timeout(Duration::from_secs(300))
        .command(argv)
        .output()
        .map_err(|e| UsageError::Du(Box::new(e)))?;
    // du also reports files that vanished meanwhile (exit code 1): its totals still stand.
    du_sizes(&out.stdout, trees, |t| {
        matches!(std::fs::symlink_metadata(t), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
    })
    .ok_or_else(|| UsageError::DuOutput {
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// The sizes `du -s -k -0` printed (`<KiB>\t<path>\0` per tree it could measure), in bytes,
/// for each of `trees`: a tree du did not report counts 0 if it is `gone` (removed between the
/// walk that found it unreadable and du, as the short-lived private directories of `apt-get`
/// are), else there is no answer (`None`).
fn du_sizes(stdout: &[u8], trees: &[&Path], gone: impl Fn(&Path) -> bool) -> Option<Vec<u64>> {
    let mut reported: std::collections::HashMap<&[u8], u64> = std::collections::HashMap::new();
    for record in stdout.split(|&b| b == 0).filter(|r| !r.is_empty()) {
        let tab = record.iter().position(|&b| b == b'\t')?;
        let kib: u64 = std::str::from_utf8(&record[..tab]).ok()?.parse().ok()?;
        reported.insert(&record[tab + 1..], kib.saturating_mul(1024));
    }
    trees
        .iter()
        .map(|t| match reported.get(t.as_os_str().as_bytes()) {
            Some(&n) => Some(n),
            None => gone(t).then_some(0),
        })
        .collect()
}

/// Bytes each tree holds (0 for a tree that is gone), by [`usage`]; what it holds in
/// directories this process may not read is measured by `du` in a sandbox (one for all of
/// them). Stops early (the sum past `stop_after`).
pub(crate) fn measure(
    trees: &[PathBuf],
    stop_after: u64,
    cancel: &AtomicBool,
) -> Result<Vec<u64>, UsageError> {
    let mut sizes = vec![0u64; trees.len()];
    let mut unreadable: Vec<(usize, PathBuf)> = Vec::new();
    let mut sum = 0u64;
    for (i, tree) in trees.iter().enumerate() {
        match usage(tree, stop_after.saturating_sub(sum), cancel) {
            Ok(u) => {
                sizes[i] = u.bytes;
                unreadable.extend(u.unreadable.into_iter().map(|p| (i, p)));
            }
            Err(UsageError::Io { source, .. })
                if matches!(source.raw_os_error(), Some(libc::ENOENT)) => {}
            Err(e) => return Err(e),
        }
        sum = sum.saturating_add(sizes[i]);
        if sum > stop_after {
            return Ok(sizes);
        }
    }
    if !unreadable.is_empty() {
        let paths: Vec<&Path> = unreadable.iter().map(|(_, p)| p.as_path()).collect();
        for ((i, _), n) in unreadable.iter().zip(usage_by_du(&paths)?) {
            sizes[*i] = sizes[*i].saturating_add(n);
        }
    }
    Ok(sizes)
}

/// Bytes the tree `path` holds on disk (see [`usage`]), stopping past `stop_after`; a tree this
/// process may not read entirely is measured by `du` in a sandbox.
pub fn tree_usage(path: &Path, stop_after: u64) -> Result<u64, UsageError> {
    let sizes = measure(&[path.to_path_buf()], stop_after, &AtomicBool::new(false))?;
    Ok(sizes.first().copied().unwrap_or(0))
}

/// What the watch found.
const RUNNING: u8 = 0;
const OVER: u8 = 1;
const UNMEASURABLE: u8 = 2;

/// The trees of one sandbox and their sizes when it started.
#[derive(Debug)]
pub(crate) struct Plan {
    pub limit: u64,
    trees: Vec<PathBuf>,
    baselines: Vec<u64>,
}

impl Plan {
    /// Measure the trees counted by growth now, before the sandbox starts.
    pub(crate) fn new(limit: u64, trees: Vec<(PathBuf, Counted)>) -> Result<Plan, UsageError> {
        let grown: Vec<PathBuf> = trees
            .iter()
            .filter(|(_, c)| *c == Counted::Growth)
            .map(|(p, _)| p.clone())
            .collect();
        let mut at_start = measure(&grown, u64::MAX, &AtomicBool::new(false))?.into_iter();
        let baselines = trees
            .iter()
            .map(|(_, c)| match c {
                Counted::All => 0,
                Counted::Growth => at_start.next().unwrap_or(0),
            })
            .collect();
        Ok(Plan {
            limit,
            trees: trees.into_iter().map(|(p, _)| p).collect(),
            baselines,
        })
    }

    /// What the sandbox wrote: every tree's size over its baseline, summed.
    fn written(&self, cancel: &AtomicBool) -> Result<u64, UsageError> {
        let stop = self.limit.saturating_add(
            self.baselines
                .iter()
                .fold(0u64, |a, b| a.saturating_add(*b)),
        );
        let sizes = measure(&self.trees, stop, cancel)?;
        Ok(sizes
            .iter()
            .zip(&self.baselines)
            .fold(0u64, |a, (n, b)| a.saturating_add(n.saturating_sub(*b))))
    }
}

/// The running watch of one sandbox.
#[derive(Debug)]
pub(crate) struct Watch {
    stop: Arc<AtomicBool>,
    verdict: Arc<AtomicU8>,
    thread: std::thread::Thread,
    pub limit: u64,
}

impl Watch {
    /// Start watching: the sandbox's init (by its pidfd `pidfd`, which the watch owns) is killed
    /// when the trees of `plan` pass its limit, or can no longer be measured.
    pub(crate) fn start(plan: Plan, pidfd: OwnedFd) -> std::io::Result<Watch> {
        let stop = Arc::new(AtomicBool::new(false));
        let verdict = Arc::new(AtomicU8::new(RUNNING));
        let (s, v) = (Arc::clone(&stop), Arc::clone(&verdict));
        let limit = plan.limit;
        let handle = std::thread::Builder::new()
            .name("sandbox-disk".into())
            .spawn(move || watch(plan, pidfd, &s, &v))?;
        Ok(Watch {
            stop,
            verdict,
            thread: handle.thread().clone(),
            limit,
        })
    }

    /// Stop watching (the thread ends on its own, soon); what it found.
    pub(crate) fn finish(&self) -> Option<crate::Limit> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
        match self.verdict.load(Ordering::SeqCst) {
            OVER => Some(crate::Limit::Disk(self.limit)),
            UNMEASURABLE => Some(crate::Limit::DiskUnmeasurable(self.limit)),
            _ => None,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}

fn watch(plan: Plan, pidfd: OwnedFd, stop: &AtomicBool, verdict: &AtomicU8) {
    let mut interval = FIRST_SCAN;
    let (mut before, mut last) = (0u64, Instant::now());
    loop {
        let until = Instant::now() + interval;
        while !stop.load(Ordering::SeqCst) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::park_timeout(left);
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let started = Instant::now();
        let found = match plan.written(stop) {
            Ok(n) if n > plan.limit => Some(OVER),
            Ok(n) => {
                interval = next_interval(started.elapsed(), plan.limit, n, before, started - last);
                (before, last) = (n, started);
                None
            }
            Err(_) if stop.load(Ordering::SeqCst) => return,
            Err(e) => {
                tracing::warn!(error = %e, "a sandbox's disk use cannot be measured: killing it");
                Some(UNMEASURABLE)
            }
        };
        if let Some(v) = found {
            // The verdict first: the caller reads it once the sandbox is gone.
            verdict.store(v, Ordering::SeqCst);
            let _ = crate::sys::pidfd_send_signal(pidfd.as_raw_fd(), libc::SIGKILL);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn du_sizes_match_records_to_trees_and_count_a_vanished_tree_as_0() {
        let (a, b, odd) = (
            Path::new("/b/a"),
            Path::new("/b/gone"),
            Path::new("/b/x\n8\t/b/gone"),
        );
        // Both reported, in any order; KiB to bytes.
        let out = b"4\t/b/gone\x0012\t/b/a\x00";
        assert_eq!(
            du_sizes(out, &[a, b], |_| false),
            Some(vec![12 * 1024, 4 * 1024])
        );
        // One missing from du's answer: 0 if it is gone, no answer if it is still there.
        let out = b"12\t/b/a\x00";
        assert_eq!(du_sizes(out, &[a, b], |t| t == b), Some(vec![12 * 1024, 0]));
        assert_eq!(du_sizes(out, &[a, b], |_| false), None);
        // A name with a newline and a tab is one record, not two.
        let out = b"16\t/b/x\n8\t/b/gone\x00";
        assert_eq!(
            du_sizes(out, &[odd, b], |t| t == b),
            Some(vec![16 * 1024, 0])
        );
        // Not du's output: no answer.
        assert_eq!(du_sizes(b"total\x00", &[a], |_| true), None);
        assert_eq!(du_sizes(b"", &[], |_| false), Some(vec![]));
    }

    #[test]
    fn du_counts_what_it_can_and_a_missing_tree_as_0() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), vec![1u8; 64 * 1024]).unwrap();
        let missing = d.path().join("missing");
        match usage_by_du(&[d.path(), &missing]) {
            Ok(sizes) => {
                assert!(sizes[0] >= 64 * 1024, "{sizes:?}");
                assert_eq!(sizes[1], 0);
            }
            // Where no sandbox can start (no user namespaces), du is not the question here.
            Err(UsageError::Du(e)) if std::env::var_os("CI").is_none() => {
                eprintln!("skipped: {e}");
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_watch_looks_sooner_when_the_limit_comes_fast() {
        let ms = Duration::from_millis;
        const MIB: u64 = 1 << 20;
        // Nothing written: the usual pace, at most a tenth of the time on the walk.
        assert_eq!(next_interval(ms(1), 100 * MIB, 0, 0, ms(50)), ms(200));
        assert_eq!(next_interval(ms(100), 100 * MIB, 0, 0, ms(50)), ms(1000));
        assert_eq!(next_interval(ms(500), 100 * MIB, 0, 0, ms(50)), ms(2000));
        assert_eq!(next_interval(ms(3000), 100 * MIB, 0, 0, ms(50)), ms(6000));
        // 10 MiB in 50 ms with 90 MiB left: reached in 450 ms at that pace; looks in 225 ms.
        // 40 MiB left: in 100 ms.
        assert_eq!(
            next_interval(ms(1), 100 * MIB, 10 * MIB, 0, ms(50)),
            ms(200)
        );
        assert_eq!(next_interval(ms(1), 50 * MIB, 10 * MIB, 0, ms(50)), ms(100));
        // Close to the limit: as often as the walk allows.
        assert_eq!(
            next_interval(ms(1), 100 * MIB, 81 * MIB, 81 * MIB, ms(50)),
            ms(20)
        );
        assert_eq!(
            next_interval(ms(30), 100 * MIB, 81 * MIB, 81 * MIB, ms(50)),
            ms(60)
        );
    }

    #[test]
    fn usage_counts_blocks_once_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/f"), vec![1u8; 1 << 20]).unwrap();
        std::fs::hard_link(d.join("a/b/f"), d.join("a/g")).unwrap();
        std::os::unix::fs::symlink("/usr", d.join("link")).unwrap();
        let no = AtomicBool::new(false);
        let used = usage(d, u64::MAX, &no).unwrap();
        assert!(
            (1 << 20..(1 << 20) + (1 << 16)).contains(&used.bytes),
            "{used:?}"
        );
        assert!(used.unreadable.is_empty());
        assert!(usage(d, 4096, &no).unwrap().bytes > 4096);
        assert!(matches!(
            usage(&d.join("link"), u64::MAX, &no),
            Err(UsageError::Io { .. })
        ));
        // A directory this process may not read (unless it is root) is left to the fallback.
        std::fs::create_dir(d.join("closed")).unwrap();
        std::fs::write(d.join("closed/f"), vec![1u8; 1 << 20]).unwrap();
        std::fs::set_permissions(d.join("closed"), std::fs::Permissions::from_mode(0o000)).unwrap();
        let used = usage(d, u64::MAX, &no).unwrap();
        if nix::unistd::geteuid().is_root() {
            assert!(used.bytes >= 2 << 20, "{used:?}");
        } else {
            assert!(used.bytes < 2 << 20, "{used:?}");
            assert_eq!(used.unreadable, [d.join("closed")]);
        }
        std::fs::set_permissions(d.join("closed"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn usage_walks_trees_deeper_than_the_descriptors_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        // 300 levels: far more than MAX_HELD, and paths longer than PATH_MAX (4096), made by
        // descriptor.
        let name = OsStr::new("dddddddddddddddddddd");
        let mut cur = open_dir_at(None, dir.path().as_os_str(), true).unwrap();
        for i in 0..300 {
            nix::sys::stat::mkdirat(Some(cur.as_raw_fd()), name, Mode::from_bits_truncate(0o755))
                .unwrap();
            cur = open_dir_at(Some(cur.as_raw_fd()), name, false).unwrap();
            if i % 50 == 0 {
                let f = nix::fcntl::openat(
                    Some(cur.as_raw_fd()),
                    "f",
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o644),
                )
                .unwrap();
                let mut f = std::fs::File::from(owned(f));
                std::io::Write::write_all(&mut f, &[1u8; 100_000]).unwrap();
            }
        }
        drop(cur);
        let before = std::fs::read_dir("/proc/self/fd").unwrap().count();
        let no = AtomicBool::new(false);
        // Six files of 100 000 bytes.
        let used = usage(dir.path(), u64::MAX, &no).unwrap().bytes;
        assert!(used >= 600_000, "{used}");
        // Nothing left open (other tests of this process open files meanwhile: a leak of one
        // descriptor per level would show as hundreds).
        let after = std::fs::read_dir("/proc/self/fd").unwrap().count();
        assert!(after < before + 8, "{before} → {after}");
        // Cancelled: an error, at once.
        let yes = AtomicBool::new(true);
        for i in 0..2000 {
            std::fs::write(dir.path().join(format!("n{i}")), "").unwrap();
        }
        assert!(matches!(
            usage(dir.path(), u64::MAX, &yes),
            Err(UsageError::Cancelled)
        ));
        // The tempdir cannot remove a tree deeper than PATH_MAX by path: the test's own leftover
        // is removed by descriptor.
        remove_deep(dir.path(), name);
    }

    fn remove_deep(root: &Path, name: &OsStr) {
        let mut chain = vec![open_dir_at(None, root.as_os_str(), true).unwrap()];
        while let Ok(fd) = open_dir_at(Some(chain.last().unwrap().as_raw_fd()), name, false) {
            chain.push(fd);
        }
        while let Some(fd) = chain.pop() {
            let _ = nix::unistd::unlinkat(
                Some(fd.as_raw_fd()),
                "f",
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
            if let Some(parent) = chain.last() {
                nix::unistd::unlinkat(
                    Some(parent.as_raw_fd()),
                    name,
                    nix::unistd::UnlinkatFlags::RemoveDir,
                )
                .unwrap();
            }
        }
    }
}
