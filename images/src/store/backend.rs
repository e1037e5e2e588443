//! Snapshot backends: plain directories, btrfs subvolumes, overlay layers.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use super::{io_err, StoreError};
use crate::tools::Tools;

/// Which snapshot backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Each snapshot a full copy of its parent (reflinks where the filesystem has them).
    Plain,
    /// Each snapshot a btrfs subvolume snapshot of its parent (the store on btrfs).
    Btrfs,
    /// Each snapshot holds only its own changes (an overlayfs upper directory) over its
    /// parent's; trees are seen through rootless overlay mounts.
    Overlay,
}

/// A storage backend's name that is none of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown storage backend {0:?} (expected plain, btrfs or overlay)")]
pub struct UnknownBackend(pub String);

impl std::str::FromStr for BackendKind {
    type Err = UnknownBackend;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "plain" => Ok(Self::Plain),
            "btrfs" => Ok(Self::Btrfs),
            "overlay" => Ok(Self::Overlay),
            other => Err(UnknownBackend(other.to_string())),
        }
    }
}

/// Why rootless overlayfs does not work where it was probed.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The test hook `MISTRY_TEST_NO_OVERLAY` is set: overlay counts as refused.
    #[error("{} is set (a test hook)", NO_OVERLAY_ENV)]
    TestHook,
    /// The refusal recorded by an earlier probe (the store's `overlay-probe`).
    #[error("{0}")]
    Recorded(String),
    /// A directory or file of the probe (`.overlay-probe-<pid>` under the store) could not be
    /// created.
    #[error("creating {}: {source}", path.display())]
    Create {
        /// The directory that failed.
        path: std::path::PathBuf,
        /// The error from creating it or writing into it.
        #[source]
        source: std::io::Error,
    },
    /// The probe's sandbox could not start.
    #[error("{0}")]
    Sandbox(#[source] sandbox::Error),
    /// The probe's script (read a lower file, delete one, write one) failed inside the overlay.
    #[error("the probe in an overlay failed ({status}): {stderr}")]
    Probe {
        /// How the script exited.
        status: sandbox::ExitStatus,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// The probe ran, but the file it wrote is not in the upper directory afterwards.
    #[error("a file written in the overlay did not reach its upper directory")]
    NoUpper,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain => "plain",
            Self::Btrfs => "btrfs",
            Self::Overlay => "overlay",
        })
    }
}

/// How snapshots are made. Paths are host paths inside the store.
pub(crate) trait Backend: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> BackendKind;
    /// A new, empty tree at `dst`.
    fn create(&self, dst: &Path) -> Result<(), StoreError>;
    /// A writable copy of `src` at `dst`.
    fn snapshot(&self, src: &Path, dst: &Path) -> Result<(), StoreError>;
    /// Remove a tree made by `create` or `snapshot`.
    fn remove(&self, path: &Path) -> Result<(), StoreError>;
}

/// Plain directories and full copies.
#[derive(Debug)]
pub(crate) struct Plain {
    tools: Tools,
}

impl Backend for Plain {
    fn kind(&self) -> BackendKind {
        BackendKind::Plain
    }
    fn create(&self, dst: &Path) -> Result<(), StoreError> {
        fs::create_dir(dst)
            .and_then(|()| crate::tools::hand_over(dst))
            .map_err(io_err(format!("creating {}", dst.display())))
    }
    fn snapshot(&self, src: &Path, dst: &Path) -> Result<(), StoreError> {
        Ok(self.tools.copy_tree(src, dst)?)
    }
    fn remove(&self, path: &Path) -> Result<(), StoreError> {
        Ok(self.tools.remove_tree(path)?)
    }
}

/// btrfs subvolumes and snapshots (through btrfs-progs).
#[derive(Debug)]
pub(crate) struct Btrfs {
    tools: Tools,
}

/// `btrfs subvolume create DST`.
pub(crate) fn btrfs_subvolume_create(dst: &Path) -> Result<(), StoreError> {
    btrfs(&["subvolume".as_ref(), "create".as_ref(), dst.as_os_str()])
}

/// `btrfs subvolume snapshot SRC DST` (SRC must be a subvolume).
pub(crate) fn btrfs_subvolume_snapshot(src: &Path, dst: &Path) -> Result<(), StoreError> {
    btrfs(&[
        "subvolume".as_ref(),
        "snapshot".as_ref(),
        src.as_os_str(),
        dst.as_os_str(),
    ])
}

fn btrfs(args: &[&std::ffi::OsStr]) -> Result<(), StoreError> {
    let out = Command::new("btrfs")
        .args(args)
        .output()
        .map_err(io_err("running btrfs (apt-get install btrfs-progs)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(StoreError::Backend(format!(
            "btrfs {}: {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Backend for Btrfs {
    fn kind(&self) -> BackendKind {
        BackendKind::Btrfs
    }
    fn create(&self, dst: &Path) -> Result<(), StoreError> {
        btrfs(&["subvolume".as_ref(), "create".as_ref(), dst.as_os_str()])?;
        crate::tools::hand_over(dst).map_err(io_err(format!("creating {}", dst.display())))
    }
    fn snapshot(&self, src: &Path, dst: &Path) -> Result<(), StoreError> {
        btrfs(&[
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            src.as_os_str(),
            dst.as_os_str(),
        ])
    }
    fn remove(&self, path: &Path) -> Result<(), StoreError> {
        if fs::symlink_metadata(path).is_err() {
            return Ok(());
        }
        // Deleting a subvolume needs root or user_subvol_rm_allowed; otherwise empty it from
        // inside the user namespace and rmdir it (allowed for an empty subvolume's owner).
        if btrfs(&["subvolume".as_ref(), "delete".as_ref(), path.as_os_str()]).is_ok() {
            return Ok(());
        }
        Ok(self.tools.remove_tree(path)?)
    }
}

/// Overlay layers: a snapshot directory holds `upper/` (its changes), `work/` (overlayfs'
/// scratch) and `lower` (the id of its parent snapshot, absent for a first layer).
#[derive(Debug)]
pub(crate) struct OverlayBackend {
    tools: Tools,
}

impl Backend for OverlayBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Overlay
    }
    fn create(&self, dst: &Path) -> Result<(), StoreError> {
        for d in ["upper", "work"] {
            fs::create_dir_all(dst.join(d))
                .and_then(|()| crate::tools::hand_over(&dst.join(d)))
                .map_err(io_err(format!("creating {}", dst.display())))?;
        }
        Ok(())
    }
    fn snapshot(&self, src: &Path, dst: &Path) -> Result<(), StoreError> {
        self.create(dst)?;
        let parent = src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        fs::write(dst.join("lower"), parent)
            .map_err(io_err(format!("writing {}/lower", dst.display())))
    }
    fn remove(&self, path: &Path) -> Result<(), StoreError> {
        Ok(self.tools.remove_tree(path)?)
    }
}

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;

/// Whether `path` is on a btrfs filesystem.
pub fn is_btrfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BTRFS_SUPER_MAGIC)
}

/// The backend of `kind`, running its tree operations through `tools`.
pub(super) fn new(kind: BackendKind, tools: Tools) -> Arc<dyn Backend> {
    match kind {
        BackendKind::Plain => Arc::new(Plain { tools }),
        BackendKind::Btrfs => Arc::new(Btrfs { tools }),
        BackendKind::Overlay => Arc::new(OverlayBackend { tools }),
    }
}

/// The store's backend and why it is the one (for the log and `mistryd image build`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BackendChoice {
    pub kind: BackendKind,
    pub reason: String,
}

/// `<store>/backend`: the backend the store's snapshots were made with (their layout differs:
/// a plain tree, a btrfs subvolume, an overlay upper directory), so that no other reads them.
const RECORD: &str = "backend";
/// `<store>/overlay-probe`: the verdict of the last overlay probe, with the kernel and user it
/// was made for (a new kernel probes again).
const PROBE: &str = "overlay-probe";
/// Test hook (documented as test-only): the overlay probe fails, as on a kernel without
/// rootless overlayfs.
pub(crate) const NO_OVERLAY_ENV: &str = "MISTRY_TEST_NO_OVERLAY";

/// Choose the backend of the store at `root` (which exists, with `snapshots/` and `tmp/`):
/// `explicit` (the `filesystem` setting or `--filesystem`) wins, but never over what the store
/// was made with; else what the store records; else the best that works here: btrfs when the
/// store is on btrfs, overlay when rootless overlayfs works for this process (probed for real,
/// verdict cached per kernel), plain (reflinked copies where the filesystem has them)
/// otherwise. The choice is recorded in `<root>/backend`.
pub(super) fn choose(
    root: &Path,
    explicit: Option<BackendKind>,
) -> Result<BackendChoice, StoreError> {
    let record = root.join(RECORD);
    let (recorded, legacy) = match fs::read_to_string(&record) {
        Ok(text) => (
            Some(
                text.trim()
                    .parse::<BackendKind>()
                    .map_err(|e| StoreError::Backend(format!("{}: {e}", record.display())))?,
            ),
            false,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (infer_legacy(root), true),
        Err(e) => return Err(io_err(format!("reading {}", record.display()))(e)),
    };
    let choice = match (explicit, recorded) {
        (Some(kind), Some(made)) if kind != made => {
            return Err(StoreError::Backend(format!(
                "the layer store {} was made with the {made} backend{}, and its snapshots cannot \
                 be used as {kind} (the filesystem setting or --filesystem): set filesystem to \
                 {made}, use another store_path, or remove this store",
                root.display(),
                if legacy {
                    " (found in its snapshots)"
                } else {
                    ""
                },
            )))
        }
        (Some(kind), _) => BackendChoice {
            kind,
            reason: "set by the filesystem setting (or --filesystem)".into(),
        },
        (None, Some(made)) => {
            if made == BackendKind::Overlay {
                if let Err(why) = overlay_works(root) {
                    return Err(StoreError::Backend(format!(
                        "the layer store {} was made with the overlay backend, and overlayfs \
                         does not work here now: {why}; use another store_path (or remove \
                         this store) to start over with another backend",
                        root.display()
                    )));
                }
            }
            BackendChoice {
                kind: made,
                reason: if legacy {
                    "the store's snapshots were made with it".into()
                } else {
                    format!("the store was made with it ({})", record.display())
                },
            }
        }
        (None, None) => detect(root),
    };
    if choice.kind == BackendKind::Btrfs && !is_btrfs(root) {
        return Err(StoreError::Backend(format!(
            "storage backend btrfs: {} is not on a btrfs filesystem",
            root.display()
        )));
    }
    if recorded.is_none() || legacy {
        write_record(&record, choice.kind)?;
    }
    Ok(choice)
}

/// Record `kind`; when another process recorded one meanwhile, it must be the same.
fn write_record(record: &Path, kind: BackendKind) -> Result<(), StoreError> {
    use std::io::Write;
    let tmp = record.with_extension(format!("tmp-{}", std::process::id()));
    fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(format!("{kind}\n").as_bytes()))
        .map_err(io_err(format!("writing {}", tmp.display())))?;
    // A hard link fails if the record exists: the first process to choose wins.
    let linked = fs::hard_link(&tmp, record);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let theirs = fs::read_to_string(record)
                .map_err(io_err(format!("reading {}", record.display())))?;
            if theirs.trim() == kind.to_string() {
                Ok(())
            } else {
                Err(StoreError::Backend(format!(
                    "{} records the {} backend, chosen by another process meanwhile; open the \
                     store again",
                    record.display(),
                    theirs.trim()
                )))
            }
        }
        Err(e) => Err(io_err(format!("writing {}", record.display()))(e)),
    }
}

/// The backend of a store made before stores recorded theirs, from one of its snapshots: an
/// overlay snapshot holds `upper/` (and `work/`, `lower`), a btrfs one is a subvolume (inode
/// 256), anything else is a plain tree. None for a store without snapshots.
fn infer_legacy(root: &Path) -> Option<BackendKind> {
    use std::os::unix::fs::MetadataExt;
    let snap = fs::read_dir(root.join("snapshots"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())?;
    let names: Vec<String> = fs::read_dir(&snap)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let overlay_names = ["upper", "work", "lower", "merged"];
    if names.iter().any(|n| n == "upper")
        && names.iter().all(|n| overlay_names.contains(&n.as_str()))
    {
        Some(BackendKind::Overlay)
    } else if is_btrfs(&snap) && fs::metadata(&snap).is_ok_and(|m| m.ino() == 256) {
        Some(BackendKind::Btrfs)
    } else {
        Some(BackendKind::Plain)
    }
}

/// The best backend that works for a new store at `root`, and why.
fn detect(root: &Path) -> BackendChoice {
    let fs_name = filesystem_name(root);
    let mut not_btrfs = format!("the store is on {fs_name}, not btrfs");
    if is_btrfs(root) {
        match Command::new("btrfs").arg("--version").output() {
            Ok(out) if out.status.success() => {
                let rm = if nix::unistd::geteuid().is_root() {
                    "snapshots are deleted as subvolumes"
                } else if mount_options(root)
                    .iter()
                    .any(|o| o == "user_subvol_rm_allowed")
                {
                    "mounted with user_subvol_rm_allowed: snapshots are deleted as subvolumes"
                } else {
                    "mounted without user_subvol_rm_allowed: a snapshot is deleted by emptying \
                     it (mount with user_subvol_rm_allowed to delete subvolumes at once)"
                };
                return BackendChoice {
                    kind: BackendKind::Btrfs,
                    reason: format!("the store is on btrfs ({rm})"),
                };
            }
            _ => {
                not_btrfs = "the store is on btrfs, but the btrfs command is missing \
                             (apt-get install btrfs-progs)"
                    .into();
            }
        }
    }
    match overlay_works(root) {
        Ok(()) => BackendChoice {
            kind: BackendKind::Overlay,
            reason: format!("{not_btrfs}, and overlayfs works in this process's user namespace"),
        },
        Err(why) => {
            let copies = if reflinks_work(root) {
                "copies are reflinked (the filesystem shares their blocks)"
            } else {
                "this filesystem has no reflinks: every step copies its whole tree"
            };
            BackendChoice {
                kind: BackendKind::Plain,
                reason: format!("{not_btrfs}, overlayfs does not work here ({why}); {copies}"),
            }
        }
    }
}

/// The filesystem type of `path`, by name where we know it.
fn filesystem_name(path: &Path) -> String {
    let Ok(s) = nix::sys::statfs::statfs(path) else {
        return "an unknown filesystem".into();
    };
    match s.filesystem_type().0 {
        0xef53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794c_7630 => "overlayfs".into(),
        0x6573_5546 => "a FUSE filesystem".into(),
        0x6969 => "NFS".into(),
        0x2fc1_2fc1 => "zfs".into(),
        BTRFS_SUPER_MAGIC => "btrfs".into(),
        other => format!("a filesystem of type {other:#x}"),
    }
}

/// The superblock options of the mount holding `path` (from `/proc/self/mountinfo`).
fn mount_options(path: &Path) -> Vec<String> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut best: Option<(usize, Vec<String>)> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(point), Some(opts)) = (fields.get(4), fields.get(sep + 3)) else {
            continue;
        };
        let point = point.replace("\\040", " ");
        if path.starts_with(&point) && best.as_ref().is_none_or(|(len, _)| point.len() >= *len) {
            best = Some((point.len(), opts.split(',').map(str::to_string).collect()));
        }
    }
    best.map(|(_, o)| o).unwrap_or_default()
}

/// Whether overlayfs works for this process where the store is: the verdict cached in
/// `<root>/overlay-probe` for this kernel and user, else a real probe.
fn overlay_works(root: &Path) -> Result<(), OverlayError> {
    if std::env::var_os(NO_OVERLAY_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
        return Err(OverlayError::TestHook);
    }
    let kernel = |f: &str| {
        fs::read_to_string(format!("/proc/sys/kernel/{f}"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let key = format!(
        "kernel {} {} uid {}",
        kernel("osrelease"),
        kernel("version"),
        nix::unistd::geteuid()
    );
    let cache = root.join(PROBE);
    if let Ok(text) = fs::read_to_string(&cache) {
        if let Some((k, verdict)) = text.trim_end().split_once('\n') {
            if k == key {
                return match verdict.strip_prefix("refused: ") {
                    Some(why) => Err(OverlayError::Recorded(why.to_string())),
                    None => Ok(()),
                };
            }
        }
    }
    let verdict = probe_overlay(&root.join("tmp"));
    let line = match &verdict {
        Ok(()) => "ok".to_string(),
        Err(why) => format!("refused: {}", why.to_string().replace('\n', " ")),
    };
    // Only a cache: a store we cannot write to fails later with a clearer error.
    let _ = fs::write(&cache, format!("{key}\n{line}\n"));
    verdict
}

/// Mount a tiny overlay (two lowers, an upper) in a sandbox user namespace, as the overlay
/// backend's tools and RUN steps do, and change it: read a lower file, delete one (a
/// whiteout), write one.
fn probe_overlay(parent: &Path) -> Result<(), OverlayError> {
    let dir = parent.join(format!(".overlay-probe-{}", std::process::id()));
    let result = (|| {
        let _ = remove_probe_dir(&dir);
        for d in ["l1", "l2", "upper", "work", "merged"] {
            fs::create_dir_all(dir.join(d))
                .and_then(|()| crate::tools::hand_over(&dir.join(d)))
                .map_err(|source| OverlayError::Create {
                    path: dir.join(d),
                    source,
                })?;
        }
        for (f, layer) in [("a", "l1"), ("b", "l2")] {
            fs::write(dir.join(layer).join(f), f).map_err(|source| OverlayError::Create {
                path: dir.join(layer),
                source,
            })?;
        }
        let merged = dir.join("merged");
        let script = format!(
            "cd '{}' && test -f a && test -f b && rm a && echo c > c && test ! -e a",
            merged.display()
        );
        let out = sandbox::Sandbox::new("/")
            .read_only_root(true)
            .network(sandbox::NetworkMode::None)
            .hostname("mistry-probe")
            .bind(sandbox::Bind::new(&dir, &dir))
            .overlay_mount(
                vec![dir.join("l1"), dir.join("l2")],
                Some((dir.join("upper"), dir.join("work"))),
                &merged,
            )
            .timeout(std::time::Duration::from_secs(30))
            .command(["/bin/sh", "-c", &script])
            .output()
            .map_err(OverlayError::Sandbox)?;
        if !out.status.success() {
            return Err(OverlayError::Probe {
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        if fs::read_to_string(dir.join("upper/c")).ok().as_deref() != Some("c\n") {
            return Err(OverlayError::NoUpper);
        }
        Ok(())
    })();
    let _ = remove_probe_dir(&dir);
    result
}

/// Whether rootless overlayfs works on the filesystem of `dir` (a real probe in a scratch
/// directory made there and removed): e.g. for overlays whose upper directories live in a job's
/// directory rather than in the store.
pub fn overlay_works_in(dir: &Path) -> Result<(), OverlayError> {
    if std::env::var_os(NO_OVERLAY_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
        return Err(OverlayError::TestHook);
    }
    probe_overlay(dir)
}

/// Remove the probe's directory: what the sandbox made (the whiteout, overlayfs' mode-000
/// `work/work`) belongs to sandbox root, i.e. to this process (given owner rwx where needed) or
/// (`--sandbox-ids subordinate`, as root) to an id root may remove anyway.
fn remove_probe_dir(dir: &Path) -> std::io::Result<()> {
    crate::walk::remove_path(dir)
}

/// Whether the filesystem of `root` clones files (`FICLONE`, what `cp --reflink=auto` uses).
fn reflinks_work(root: &Path) -> bool {
    let dir = root.join("tmp");
    let a = dir.join(format!("reflink-probe-{}-a", std::process::id()));
    let b = dir.join(format!("reflink-probe-{}-b", std::process::id()));
    let ok = (|| -> std::io::Result<bool> {
        fs::write(&a, b"reflink probe")?;
        let src = fs::File::open(&a)?;
        let dst = fs::File::create(&b)?;
        Ok(rustix::fs::ioctl_ficlone(&dst, &src).is_ok())
    })()
    .unwrap_or(false);
    let _ = fs::remove_file(&a);
    let _ = fs::remove_file(&b);
    ok
}
