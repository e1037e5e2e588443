//! The layer store: content-addressed blobs, rootfs snapshots and the step cache, under one
//! directory.
//!
//! ```text
//! <root>/blobs/sha256/<hex>      layer, config and manifest blobs (verified on the way in)
//! <root>/snapshots/<key>/        one rootfs per filesystem-changing step (or base layer)
//! <root>/steps/<key>.json        step cache: which snapshot and image config a key stands for
//! <root>/refs/<project>.json     the keys a project's current image uses (kept by GC)
//! <root>/tmp/                    work in progress; renamed into place when complete
//! ```
//!
//! Snapshots come from a [`Backend`]: `btrfs` (subvolumes and snapshots; chosen automatically
//! when the store is on btrfs), or `plain` (full copies, reflinked where possible; always works).
//! A snapshot is built under `tmp/` and renamed into `snapshots/` only when complete, so a crash
//! or a failed step never leaves a half-made snapshot that a later build would trust.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use std::os::fd::{AsFd, AsRawFd};

use rustix::fs::OFlags;

use crate::config::ImageConfig;
use crate::inroot::Root;
use crate::tools::{ToolError, Tools};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("{0}")]
    Backend(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

/// Snapshots hold files owned by the host ids the sandbox's ids map to: a store made while
/// sandbox root was one host id cannot serve sandboxes whose root is another (e.g. after
/// switching `--sandbox-ids`). `root/ids` records the mapping the store was made with.
fn check_ids(root: &Path) -> Result<(), StoreError> {
    let (mapping, _) = sandbox::try_choose_id_map(sandbox::IdMapping::Auto)
        .map_err(|e| StoreError::Backend(format!("sandbox ids: {e}")))?;
    let (uid, gid) = mapping.root_ids();
    let ours = format!("sandbox root {uid}:{gid}\n");
    let marker = root.join("ids");
    match fs::read_to_string(&marker) {
        Ok(theirs) if theirs == ours => Ok(()),
        Ok(theirs) => Err(StoreError::Backend(format!(
            "the layer store {} was made with {} on the host, and this process maps {} \
             (--sandbox-ids): use another store_path, or remove this one",
            root.display(),
            theirs.trim(),
            ours.trim()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::write(&marker, ours).map_err(io_err(format!("writing {}", marker.display())))
        }
        Err(e) => Err(io_err(format!("reading {}", marker.display()))(e)),
    }
}

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

/// How to see a snapshot's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// A complete tree.
    Dir(PathBuf),
    /// Overlay layers, top first (never empty).
    Layers(Vec<PathBuf>),
}

/// Where a step being built writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A complete tree (plain, btrfs, or a first overlay layer).
    Dir(PathBuf),
    /// An overlay: `lowers` (top first) read-only, changes into `upper`.
    Overlay {
        lowers: Vec<PathBuf>,
        upper: PathBuf,
        work: PathBuf,
    },
}

impl Target {
    /// A sandbox whose root is this target.
    pub fn sandbox(&self) -> sandbox::Sandbox {
        match self {
            Target::Dir(d) => sandbox::Sandbox::new(d),
            Target::Overlay {
                lowers,
                upper,
                work,
            } => sandbox::Sandbox::new_overlay(lowers.clone(), upper, work),
        }
    }
}

fn is_whiteout(m: &fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    m.file_type().is_char_device() && m.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    matches!(xattr::get(dir, "user.overlay.opaque"), Ok(Some(v)) if v == b"y")
}

impl View {
    /// The host path of `inside` (absolute in the image) as the image sees it, if it exists
    /// (a final symlink is not followed). A complete tree is resolved inside its root by the
    /// kernel (see [`crate::inroot`]); through layers, the topmost layer that has it wins, a
    /// whiteout, an opaque directory or a non-directory on the way hides lower layers, and
    /// symlinks are not followed (so the returned path never goes through one).
    pub fn lookup(&self, inside: &Path) -> Option<PathBuf> {
        match self {
            View::Dir(root) => {
                let r = Root::open(root).ok()?;
                if crate::inroot::components(inside).is_empty() {
                    return Some(root.clone());
                }
                let (dir, name) = r.parent(inside).ok()?;
                crate::inroot::kind_at(dir.as_fd(), &name).ok()??;
                let at = fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).ok()?;
                Some(at.join(name))
            }
            View::Layers(layers) => {
                let rel = sandbox::paths::normalize_inside(inside);
                let rel = rel.strip_prefix("/").unwrap_or(&rel).to_path_buf();
                let parts: Vec<_> = rel.components().collect();
                for layer in layers {
                    let mut acc = layer.clone();
                    let mut hidden = false;
                    for (i, c) in parts.iter().enumerate() {
                        acc.push(c);
                        let last = i + 1 == parts.len();
                        match fs::symlink_metadata(&acc) {
                            Ok(m) if is_whiteout(&m) => return None,
                            Ok(_) if last => return Some(acc),
                            Ok(m) if m.is_dir() => {
                                if is_opaque(&acc) {
                                    hidden = true;
                                }
                            }
                            // A file or symlink on the way hides lower layers' directories.
                            Ok(_) => return None,
                            Err(_) => break,
                        }
                    }
                    if parts.is_empty() {
                        return Some(layer.clone());
                    }
                    if hidden {
                        return None;
                    }
                }
                None
            }
        }
    }

    /// Through layers: the host path of `inside` with symlinks on the way (and the final one
    /// when `follow`) resolved in the image as the union of the layers sees them, at most
    /// [`crate::inroot::MAX_LINKS`] of them; None when missing or past the limit.
    fn resolve_layers(&self, inside: &Path, follow: bool) -> Option<PathBuf> {
        use std::ffi::OsString;
        let abs = |parts: &[OsString]| {
            let mut p = PathBuf::from("/");
            for c in parts {
                p.push(c);
            }
            p
        };
        let mut parts = crate::inroot::components(inside);
        let mut done: Vec<OsString> = Vec::new();
        let mut hops = 0;
        let mut i = 0;
        while i < parts.len() {
            if parts[i] == ".." {
                done.pop();
                i += 1;
                continue;
            }
            let mut cand = done.clone();
            cand.push(parts[i].clone());
            let p = self.lookup(&abs(&cand))?;
            let m = fs::symlink_metadata(&p).ok()?;
            if m.file_type().is_symlink() && (i + 1 < parts.len() || follow) {
                hops += 1;
                if hops > crate::inroot::MAX_LINKS {
                    return None;
                }
                let target = fs::read_link(&p).ok()?;
                let mut next = if target.is_absolute() {
                    Vec::new()
                } else {
                    done.clone()
                };
                next.extend(crate::inroot::components(&target));
                next.extend(parts[i + 1..].iter().cloned());
                parts = next;
                done.clear();
                i = 0;
                continue;
            }
            done = cand;
            i += 1;
        }
        self.lookup(&abs(&done))
    }

    /// Whether `inside` is a directory in the image, following symlinks inside the image (as
    /// Docker's check of a COPY destination does).
    pub fn is_dir(&self, inside: &Path) -> bool {
        match self {
            View::Dir(root) => Root::open(root)
                .and_then(|r| r.open_in(inside, OFlags::PATH | OFlags::DIRECTORY))
                .is_ok(),
            View::Layers(_) => self
                .resolve_layers(inside, true)
                .is_some_and(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())),
        }
    }

    /// Resolve a `USER` value against the image's `/etc/passwd` and `/etc/group` (a complete
    /// tree is read by fd inside its root, `openat2(RESOLVE_IN_ROOT)`; layers through
    /// [`View::read_small`]).
    pub fn resolve_user(
        &self,
        user: &sandbox::User,
    ) -> Result<sandbox::ResolvedUser, sandbox::Error> {
        match self {
            View::Dir(root) => sandbox::resolve_user(root, user),
            View::Layers(_) => sandbox::resolve_user_with(
                user,
                &self.read_small(Path::new("/etc/passwd")),
                &self.read_small(Path::new("/etc/group")),
            ),
        }
    }

    /// A small regular file of the image (at most 16 MiB; the final component not through a
    /// symlink); empty when missing.
    pub fn read_small(&self, inside: &Path) -> String {
        const MAX: u64 = 16 << 20;
        let file = match self {
            View::Dir(root) => Root::open(root)
                .and_then(|r| {
                    r.open_in(inside, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK)
                })
                .map(fs::File::from)
                .ok(),
            View::Layers(_) => match self.resolve_layers(inside, false) {
                Some(p) if fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) => {
                    fs::File::open(p).ok()
                }
                _ => None,
            },
        };
        let Some(file) = file else {
            return String::new();
        };
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            return String::new();
        }
        let mut text = String::new();
        match io::Read::read_to_string(&mut io::Read::take(file, MAX), &mut text) {
            Ok(_) => text,
            Err(_) => String::new(),
        }
    }
}

/// Whether `path` is on a btrfs filesystem.
pub fn is_btrfs(path: &Path) -> bool {
    const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BTRFS_SUPER_MAGIC)
        .unwrap_or(false)
}

/// A cached step: the snapshot holding its filesystem (None for an empty `scratch` tree) and
/// the image config after it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub snapshot: Option<String>,
    pub config: ImageConfig,
}

/// The keys and snapshots a project's current image needs (what GC keeps).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProjectRef {
    pub keys: Vec<String>,
    pub snapshots: Vec<String>,
    pub blobs: Vec<String>,
}

/// What a garbage collection removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    pub snapshots: usize,
    pub steps: usize,
    pub blobs: usize,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    pub root: PathBuf,
    backend: Box<dyn Backend>,
    tools: Tools,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Open (creating it if needed) the store at `root`. `kind: None` picks btrfs when `root`
    /// is on btrfs, plain otherwise. `helper` is the helper command (see [`crate::tools`]).
    pub fn open(
        root: &Path,
        kind: Option<BackendKind>,
        helper: Vec<std::ffi::OsString>,
    ) -> Result<Store, StoreError> {
        let store = Self::attach(root, kind, helper)?;
        store.clean_tmp();
        Ok(store)
    }

    /// Open the store without cleaning `tmp/`: for a process working beside the daemon that
    /// owns it (e.g. `mistryd rebuild`), whose work in progress must not be touched.
    pub fn attach(
        root: &Path,
        kind: Option<BackendKind>,
        helper: Vec<std::ffi::OsString>,
    ) -> Result<Store, StoreError> {
        for d in ["blobs/sha256", "snapshots", "steps", "refs", "tmp"] {
            fs::create_dir_all(root.join(d))
                .map_err(io_err(format!("creating {}", root.join(d).display())))?;
        }
        let root = root
            .canonicalize()
            .map_err(io_err(format!("opening {}", root.display())))?;
        check_ids(&root)?;
        let tools = Tools::new(helper);
        let kind = match kind {
            Some(k) => k,
            None if is_btrfs(&root) => BackendKind::Btrfs,
            None => BackendKind::Plain,
        };
        if kind == BackendKind::Btrfs && !is_btrfs(&root) {
            return Err(StoreError::Backend(format!(
                "storage backend btrfs: {} is not on a btrfs filesystem",
                root.display()
            )));
        }
        let backend: Box<dyn Backend> = match kind {
            BackendKind::Plain => Box::new(Plain {
                tools: tools.clone(),
            }),
            BackendKind::Btrfs => Box::new(Btrfs {
                tools: tools.clone(),
            }),
            BackendKind::Overlay => Box::new(OverlayBackend {
                tools: tools.clone(),
            }),
        };
        Ok(Store {
            root,
            backend,
            tools,
        })
    }

    pub fn backend(&self) -> BackendKind {
        self.backend.kind()
    }

    pub fn tools(&self) -> &Tools {
        &self.tools
    }

    /// Remove leftovers of interrupted work.
    fn clean_tmp(&self) {
        if let Ok(entries) = fs::read_dir(self.root.join("tmp")) {
            for e in entries.flatten() {
                let _ = self.backend.remove(&e.path());
                let _ = fs::remove_file(e.path());
            }
        }
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, crate::oci::OciError> {
        Ok(self
            .root
            .join("blobs/sha256")
            .join(crate::oci::digest_hex(digest)?))
    }

    pub fn snapshot_path(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(id)
    }

    pub fn has_snapshot(&self, id: &str) -> bool {
        self.snapshot_path(id).is_dir()
    }

    /// The upper directories of `id` and its parents, top first (overlay backend).
    fn layers(&self, mut id: String) -> Vec<PathBuf> {
        let mut out = Vec::new();
        // A chain longer than overlayfs' limit (500) cannot be mounted anyway.
        for _ in 0..500 {
            let dir = self.snapshot_path(&id);
            out.push(dir.join("upper"));
            match fs::read_to_string(dir.join("lower")) {
                Ok(parent) if !parent.trim().is_empty() => id = parent.trim().to_string(),
                _ => break,
            }
        }
        out
    }

    /// How to see snapshot `id`.
    pub fn view(&self, id: &str) -> View {
        match self.backend.kind() {
            BackendKind::Overlay => View::Layers(self.layers(id.to_string())),
            _ => View::Dir(self.snapshot_path(id)),
        }
    }

    /// Where a snapshot begun at `tmp` (by [`Store::begin`]) is written.
    pub fn target(&self, tmp: &Path) -> Target {
        if self.backend.kind() != BackendKind::Overlay {
            return Target::Dir(tmp.to_path_buf());
        }
        match fs::read_to_string(tmp.join("lower")) {
            Ok(parent) if !parent.trim().is_empty() => Target::Overlay {
                lowers: self.layers(parent.trim().to_string()),
                upper: tmp.join("upper"),
                work: tmp.join("work"),
            },
            _ => Target::Dir(tmp.join("upper")),
        }
    }

    /// A fresh path under `tmp/`.
    pub fn tmp_path(&self, what: &str) -> PathBuf {
        self.root.join("tmp").join(format!(
            "{what}-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Start a new snapshot: a copy of `parent` (or an empty tree), under `tmp/`.
    pub fn begin(&self, parent: Option<&str>) -> Result<PathBuf, StoreError> {
        let tmp = self.tmp_path("snap");
        match parent {
            Some(p) => self.backend.snapshot(&self.snapshot_path(p), &tmp)?,
            None => self.backend.create(&tmp)?,
        }
        Ok(tmp)
    }

    /// Put a finished snapshot in place as `id`. If another build made the same one meanwhile,
    /// ours is dropped.
    pub fn commit(&self, tmp: &Path, id: &str) -> Result<(), StoreError> {
        let dst = self.snapshot_path(id);
        match fs::rename(tmp, &dst) {
            Ok(()) => Ok(()),
            Err(_) if dst.is_dir() => self.backend.remove(tmp),
            Err(e) => Err(io_err(format!(
                "renaming {} to {}",
                tmp.display(),
                dst.display()
            ))(e)),
        }
    }

    /// Throw away an unfinished snapshot.
    pub fn abort(&self, tmp: &Path) {
        if let Err(e) = self.backend.remove(tmp) {
            tracing::warn!(path = %tmp.display(), error = %e, "could not remove an unfinished snapshot");
        }
    }

    /// A writable root for a job on snapshot `id`, under `scratch` (which must not exist): an
    /// overlay over the image on the overlay backend and, when `overlay_ok`, on the plain one
    /// (no copy); a snapshot on btrfs or a copy otherwise. Remove `scratch` with
    /// [`Store::remove_tree`] afterwards.
    pub fn job_target(
        &self,
        id: Option<&str>,
        scratch: &Path,
        overlay_ok: bool,
    ) -> Result<Target, StoreError> {
        let kind = self.backend.kind();
        if let Some(id) = id {
            let lowers = match kind {
                BackendKind::Overlay => Some(self.layers(id.to_string())),
                BackendKind::Plain if overlay_ok => Some(vec![self.snapshot_path(id)]),
                _ => None,
            };
            if let Some(lowers) = lowers {
                for d in ["upper", "work"] {
                    fs::create_dir_all(scratch.join(d))
                        .and_then(|()| crate::tools::hand_over(&scratch.join(d)))
                        .map_err(io_err(format!("creating {}", scratch.display())))?;
                }
                return Ok(Target::Overlay {
                    lowers,
                    upper: scratch.join("upper"),
                    work: scratch.join("work"),
                });
            }
            if kind != BackendKind::Overlay {
                self.backend.snapshot(&self.snapshot_path(id), scratch)?;
                return Ok(Target::Dir(scratch.to_path_buf()));
            }
        }
        fs::create_dir_all(scratch)
            .and_then(|()| crate::tools::hand_over(scratch))
            .map_err(io_err(format!("creating {}", scratch.display())))?;
        Ok(Target::Dir(scratch.to_path_buf()))
    }

    /// Remove a tree made by [`Store::job_target`].
    pub fn remove_tree(&self, path: &Path) -> Result<(), StoreError> {
        self.backend.remove(path)
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), StoreError> {
        let tmp = self.tmp_path("json");
        fs::write(&tmp, data).map_err(io_err(format!("writing {}", tmp.display())))?;
        fs::rename(&tmp, path).map_err(io_err(format!("writing {}", path.display())))
    }

    pub fn step(&self, key: &str) -> Option<StepRecord> {
        let text = fs::read(self.root.join("steps").join(format!("{key}.json"))).ok()?;
        let rec: StepRecord = serde_json::from_slice(&text).ok()?;
        // A record whose snapshot is gone (GC, manual cleanup) is no cache hit.
        match &rec.snapshot {
            Some(s) if !self.has_snapshot(s) => None,
            _ => Some(rec),
        }
    }

    pub fn put_step(&self, key: &str, rec: &StepRecord) -> Result<(), StoreError> {
        let data = serde_json::to_vec(rec).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.write_atomic(&self.root.join("steps").join(format!("{key}.json")), &data)
    }

    fn ref_path(&self, project: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(format!("{}.json", hex::encode(project)))
    }

    pub fn put_ref(&self, project: &str, r: &ProjectRef) -> Result<(), StoreError> {
        let data = serde_json::to_vec(r).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.write_atomic(&self.ref_path(project), &data)
    }

    /// Remove every snapshot, step record and blob that no project's current image uses.
    pub fn collect_garbage(&self) -> Result<Collected, StoreError> {
        let mut keys = std::collections::HashSet::new();
        let mut snaps = std::collections::HashSet::new();
        let mut blobs = std::collections::HashSet::new();
        for e in fs::read_dir(self.root.join("refs"))
            .map_err(io_err("reading refs"))?
            .flatten()
        {
            if let Ok(r) = fs::read(e.path())
                .map_err(drop)
                .and_then(|t| serde_json::from_slice::<ProjectRef>(&t).map_err(drop))
            {
                keys.extend(r.keys);
                snaps.extend(r.snapshots);
                blobs.extend(
                    r.blobs
                        .iter()
                        .filter_map(|d| d.strip_prefix("sha256:").map(str::to_string)),
                );
            }
        }
        let mut done = Collected::default();
        for e in fs::read_dir(self.root.join("snapshots"))
            .map_err(io_err("reading snapshots"))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !snaps.contains(&name) {
                self.backend.remove(&e.path())?;
                done.snapshots += 1;
            }
        }
        for e in fs::read_dir(self.root.join("steps"))
            .map_err(io_err("reading steps"))?
            .flatten()
        {
            let name = e
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".json")
                .to_string();
            if !keys.contains(&name) {
                let _ = fs::remove_file(e.path());
                done.steps += 1;
            }
        }
        for e in fs::read_dir(self.root.join("blobs/sha256"))
            .map_err(io_err("reading blobs"))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !blobs.contains(&name) {
                let _ = fs::remove_file(e.path());
                done.blobs += 1;
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn views_resolve_symlinks_inside_the_image() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let (lower, upper) = (d.path().join("lower"), d.path().join("upper"));
        fs::create_dir_all(lower.join("real/sub")).unwrap();
        fs::write(lower.join("real/passwd"), "p").unwrap();
        fs::create_dir_all(&upper).unwrap();
        symlink("real", upper.join("rel")).unwrap();
        symlink("/real", upper.join("abs")).unwrap();
        symlink(outside.path(), upper.join("host")).unwrap();
        for i in 1..45 {
            symlink(format!("c{}", i + 1), upper.join(format!("c{i}"))).unwrap();
        }
        symlink("real", upper.join("c45")).unwrap();
        let layers = View::Layers(vec![upper.clone(), lower.clone()]);
        assert!(layers.is_dir(Path::new("/rel")));
        assert!(layers.is_dir(Path::new("/abs/sub")));
        assert!(!layers.is_dir(Path::new("/host")), "a host directory");
        assert!(!layers.is_dir(Path::new("/c1")), "past 40 links");
        assert_eq!(layers.read_small(Path::new("/abs/passwd")), "p");
        assert_eq!(layers.read_small(Path::new("/c1/passwd")), "");

        // The same as one tree.
        let tree = d.path().join("tree");
        fs::create_dir_all(tree.join("real/sub")).unwrap();
        fs::write(tree.join("real/passwd"), "p").unwrap();
        symlink("/real", tree.join("abs")).unwrap();
        symlink(outside.path(), tree.join("host")).unwrap();
        for i in 1..45 {
            symlink(format!("c{}", i + 1), tree.join(format!("c{i}"))).unwrap();
        }
        symlink("real", tree.join("c45")).unwrap();
        let dir = View::Dir(tree.clone());
        assert!(dir.is_dir(Path::new("/abs/sub")));
        assert!(!dir.is_dir(Path::new("/host")));
        assert!(!dir.is_dir(Path::new("/c1")));
        assert_eq!(dir.read_small(Path::new("/abs/passwd")), "p");
        assert_eq!(dir.read_small(Path::new("/c1/passwd")), "");
        assert_eq!(
            dir.lookup(Path::new("/abs/passwd")),
            Some(tree.canonicalize().unwrap().join("real/passwd"))
        );
    }
}
