//! The layer store: content-addressed blobs, rootfs snapshots and the step cache, under one
//! directory.
//!
//! ```text
//! <root>/blobs/sha256/<hex>      layer, config and manifest blobs (verified on the way in)
//! <root>/snapshots/<key>/        one rootfs per filesystem-changing step (or base layer)
//! <root>/steps/<key>.json        step cache: which snapshot and image config a key stands for
//! <root>/refs/<project>.json     the keys a project's current image uses (kept by GC)
//! <root>/tmp/                    work in progress; renamed into place when complete
//! <root>/cache/<project>/        `RUN --mount=type=cache` directories (`cache.rs`)
//! <root>/step-key                the key of secrets' digests in step keys (0600, `mac.rs`)
//! ```
//!
//! Snapshots come from a [`Backend`] (`backend.rs`): `btrfs` (subvolumes and snapshots; chosen
//! automatically when the store is on btrfs), `overlay` (each snapshot an overlayfs upper
//! directory over its parent's; chosen automatically elsewhere when rootless overlayfs works)
//! or `plain` (full copies, reflinked where possible; always works). `<root>/backend` records
//! the one a store was made with; `<root>/overlay-probe` caches the overlay probe's verdict.
//! A snapshot is built under `tmp/` and renamed into `snapshots/` only when complete, so a crash
//! or a failed step never leaves a half-made snapshot that a later build would trust.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::ImageConfig;
use crate::tools::{ToolError, Tools};

mod backend;
mod cache;
mod job;
mod mac;

pub(crate) use crate::view::{Target, View};
pub(crate) use backend::Backend;
pub use backend::{is_btrfs, BackendKind};
pub use backend::{overlay_works_in, OverlayError, UnknownBackend};
pub(crate) use cache::{CacheDir, CacheInit, CacheSharing};
pub use job::{
    cache_depth, layer_build, layer_path, next_chain_builds, read_cache_layers, CacheMode, JobRoot,
    Workspace, CACHE_FLAT, CACHE_LAYERS, CACHE_TOKEN, CACHE_WORK,
};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation on the store failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the path.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A tool sandbox (copy, chown, removal inside a snapshot) failed.
    #[error(transparent)]
    Tool(ToolError),
    /// The kernel refused an overlay mount (e.g. overlayfs in a user namespace on an old
    /// kernel, or a filesystem under the layers it does not support): the caller may fall back
    /// to a copy ([`Store::job_root`] with `overlay: false`).
    #[error("{what}: {source}")]
    OverlayUnsupported {
        /// What was being mounted.
        what: String,
        /// The sandbox's error ([`sandbox::Error::Overlay`]).
        #[source]
        source: sandbox::Error,
    },
    /// Anything else: a backend operation (btrfs, overlay), a record that does not
    /// (de)serialize, the secrets' key, a cache directory.
    #[error("{0}")]
    Backend(String),
}

impl From<ToolError> for StoreError {
    fn from(e: ToolError) -> Self {
        match e {
            ToolError::Sandbox {
                what,
                source: source @ sandbox::Error::Overlay(_),
            } => StoreError::OverlayUnsupported { what, source },
            e => StoreError::Tool(e),
        }
    }
}

impl StoreError {
    /// Whether the kernel refused an overlay mount (see [`StoreError::OverlayUnsupported`]).
    pub fn is_overlay_unsupported(&self) -> bool {
        matches!(self, StoreError::OverlayUnsupported { .. })
    }
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

/// A cached step: the snapshot holding its filesystem (None for an empty `scratch` tree) and
/// the image config after it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct StepRecord {
    pub snapshot: Option<String>,
    pub config: ImageConfig,
}

/// The keys and snapshots a project's current image needs (what GC keeps).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ProjectRef {
    pub keys: Vec<String>,
    pub snapshots: Vec<String>,
    pub blobs: Vec<String>,
}

/// What a garbage collection removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    /// Snapshots removed.
    pub snapshots: usize,
    /// Step records removed.
    pub steps: usize,
    /// Blobs (base images' layers, configs, manifests) removed.
    pub blobs: usize,
    /// Cache-mount directories (of projects without an image in the store).
    pub caches: usize,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    /// The store's directory (`store_path`): `blobs/ snapshots/ steps/ refs/ cache/ tmp/`.
    pub root: PathBuf,
    backend: Arc<dyn Backend>,
    tools: Tools,
    backend_reason: String,
    /// The key of secrets' digests in step keys, read (or made) when a step first needs it.
    mac_key: std::sync::OnceLock<mac::MacKey>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Open (creating it if needed) the store at `root`. `kind` (the `filesystem` setting) wins
    /// but never over the backend the store was made with (recorded in `<root>/backend`: an
    /// error); `None` keeps that one, or for a new store picks the best that works here —
    /// btrfs when `root` is on btrfs, overlay when rootless overlayfs works (probed), plain
    /// otherwise — and logs the choice and why ([`Store::backend_reason`]). `helper` is the
    /// helper command (see [`crate::tools`]).
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
        let choice = backend::choose(&root, kind)?;
        tracing::info!(
            store = %root.display(),
            "storage backend {}: {}",
            choice.kind,
            choice.reason
        );
        let backend = backend::new(choice.kind, tools.clone());
        Ok(Store {
            root,
            backend,
            tools,
            backend_reason: choice.reason,
            mac_key: std::sync::OnceLock::new(),
        })
    }

    /// How snapshots are made (chosen when the store was made, recorded in it).
    pub fn backend(&self) -> BackendKind {
        self.backend.kind()
    }

    /// Why the store uses its backend (also logged when it is opened): the setting, what the
    /// store was made with, or what was detected (`the store is on ext4, not btrfs, and
    /// overlayfs works in this process's user namespace`).
    pub fn backend_reason(&self) -> &str {
        &self.backend_reason
    }

    pub(crate) fn tools(&self) -> &Tools {
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

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, crate::oci::OciError> {
        Ok(self
            .root
            .join("blobs/sha256")
            .join(crate::oci::digest_hex(digest)?))
    }

    pub(crate) fn snapshot_path(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(id)
    }

    /// Whether snapshot `id` exists (`snapshots/<id>` is a directory).
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
    pub(crate) fn target(&self, tmp: &Path) -> Target {
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
    pub(crate) fn tmp_path(&self, what: &str) -> PathBuf {
        self.root.join("tmp").join(format!(
            "{what}-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Start a new snapshot: a copy of `parent` (or an empty tree), under `tmp/`.
    pub(crate) fn begin(&self, parent: Option<&str>) -> Result<PathBuf, StoreError> {
        let tmp = self.tmp_path("snap");
        match parent {
            Some(p) => self.backend.snapshot(&self.snapshot_path(p), &tmp)?,
            None => self.backend.create(&tmp)?,
        }
        Ok(tmp)
    }

    /// Put a finished snapshot in place as `id`. If another build made the same one meanwhile,
    /// ours is dropped.
    pub(crate) fn commit(&self, tmp: &Path, id: &str) -> Result<(), StoreError> {
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
    pub(crate) fn abort(&self, tmp: &Path) {
        if let Err(e) = self.backend.remove(tmp) {
            tracing::warn!(path = %tmp.display(), error = %e, "could not remove an unfinished snapshot");
        }
    }

    /// Remove a tree made by the store (a snapshot, a job's root, a job directory made by
    /// [`Store::prepare_job_dir`]) or any tree sandbox root may own: btrfs subvolumes are
    /// deleted as such, anything else emptied inside the user namespace.
    pub fn remove_tree(&self, path: &Path) -> Result<(), StoreError> {
        self.backend.remove(path)
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), StoreError> {
        // An unchanged build of a cached image records the same step and ref again: reading a
        // small file is much cheaper than writing and renaming one (a journal commit).
        if fs::read(path).is_ok_and(|old| old == data) {
            return Ok(());
        }
        let tmp = self.tmp_path("json");
        fs::write(&tmp, data).map_err(io_err(format!("writing {}", tmp.display())))?;
        fs::rename(&tmp, path).map_err(io_err(format!("writing {}", path.display())))
    }

    pub(crate) fn step(&self, key: &str) -> Option<StepRecord> {
        let text = fs::read(self.root.join("steps").join(format!("{key}.json"))).ok()?;
        let rec: StepRecord = serde_json::from_slice(&text).ok()?;
        // A record whose snapshot is gone (GC, manual cleanup) is no cache hit.
        match &rec.snapshot {
            Some(s) if !self.has_snapshot(s) => None,
            _ => Some(rec),
        }
    }

    pub(crate) fn put_step(&self, key: &str, rec: &StepRecord) -> Result<(), StoreError> {
        let data = serde_json::to_vec(rec).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.write_atomic(&self.root.join("steps").join(format!("{key}.json")), &data)
    }

    fn ref_path(&self, project: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(format!("{}.json", hex::encode(project)))
    }

    pub(crate) fn put_ref(&self, project: &str, r: &ProjectRef) -> Result<(), StoreError> {
        let data = serde_json::to_vec(r).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.write_atomic(&self.ref_path(project), &data)
    }

    /// Remove every snapshot, step record and blob that no project's current image uses, and
    /// the cache-mount directories of projects without an image (unless in use).
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
        done.caches = self.collect_caches()?;
        Ok(done)
    }
}
