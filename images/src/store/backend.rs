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
    Plain,
    Btrfs,
    /// Each snapshot holds only its own changes (an overlayfs upper directory) over its
    /// parent's; trees are seen through rootless overlay mounts.
    Overlay,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "plain" => Ok(Self::Plain),
            "btrfs" => Ok(Self::Btrfs),
            "overlay" => Ok(Self::Overlay),
            other => Err(format!(
                "unknown storage backend {other:?} (expected plain, btrfs or overlay)"
            )),
        }
    }
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
pub trait Backend: Send + Sync + std::fmt::Debug {
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
pub struct Plain {
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
pub struct Btrfs {
    tools: Tools,
}

/// `btrfs subvolume create DST`.
pub fn btrfs_subvolume_create(dst: &Path) -> Result<(), StoreError> {
    btrfs(&["subvolume".as_ref(), "create".as_ref(), dst.as_os_str()])
}

/// `btrfs subvolume snapshot SRC DST` (SRC must be a subvolume).
pub fn btrfs_subvolume_snapshot(src: &Path, dst: &Path) -> Result<(), StoreError> {
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
pub struct OverlayBackend {
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

/// Whether `path` is on a btrfs filesystem.
pub fn is_btrfs(path: &Path) -> bool {
    const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BTRFS_SUPER_MAGIC)
        .unwrap_or(false)
}

/// The backend of `kind`, running its tree operations through `tools`.
pub(super) fn new(kind: BackendKind, tools: Tools) -> Arc<dyn Backend> {
    match kind {
        BackendKind::Plain => Arc::new(Plain { tools }),
        BackendKind::Btrfs => Arc::new(Btrfs { tools }),
        BackendKind::Overlay => Arc::new(OverlayBackend { tools }),
    }
}
