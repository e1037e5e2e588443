//! A job's two trees, both made by the store: its directory (whose `data/` may start from the
//! group's last job: a btrfs snapshot or a copy) and its root filesystem (an overlay over, a
//! snapshot of, or a copy of its image), thrown away in the background when the job is done.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::backend::{btrfs_subvolume_create, btrfs_subvolume_snapshot, is_btrfs};
use super::{io_err, Backend, BackendKind, Store, StoreError};
use crate::view::Target;

/// A job's root filesystem under the store's `tmp/`. Dropping it removes it in a background
/// thread (a copy of a large image takes a while to delete; the job's answer need not wait).
#[derive(Debug)]
pub struct JobRoot {
    target: Target,
    scratch: PathBuf,
    backend: Arc<dyn Backend>,
}

impl JobRoot {
    /// A sandbox whose root is this job root.
    pub fn sandbox(&self) -> sandbox::Sandbox {
        self.target.sandbox()
    }

    /// What the root is: a directory, or an overlay to be mounted by the sandbox.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Whether the sandbox mounts an overlay for this root (so a refused overlay mount,
    /// `sandbox::Error::Overlay`, may be retried with [`Store::job_root`]`(.., false)`).
    pub fn is_overlay(&self) -> bool {
        matches!(self.target, Target::Overlay { .. })
    }
}

impl Drop for JobRoot {
    fn drop(&mut self) {
        let remove = |backend: &dyn Backend, scratch: &Path| {
            if let Err(e) = backend.remove(scratch) {
                tracing::warn!(path = %scratch.display(), error = %e, "could not remove a job's root filesystem");
            }
        };
        let (scratch, backend) = (self.scratch.clone(), Arc::clone(&self.backend));
        let spawned = std::thread::Builder::new()
            .name("job-root-rm".into())
            .spawn(move || remove(&*backend, &scratch));
        // Without a thread to spare, remove it here.
        if spawned.is_err() {
            remove(&*self.backend, &self.scratch);
        }
    }
}

impl Store {
    /// Make `dir` a fresh job directory (replacing what is there), and return whether its
    /// `data/` starts from `previous` (the group's last job directory, used when it has a
    /// `data/` directory). On the btrfs backend with `dir` on btrfs, `dir` is a subvolume (so a
    /// later job can snapshot it) and starts as a snapshot of `previous` with everything but
    /// `data/` removed; otherwise `data/` is a copy of `previous/data`. `data/params` is removed
    /// (the caller writes the new ones), and a `data/` that belonged to the last job's image
    /// user is given back to sandbox root. Without `previous` only `dir` is made.
    pub fn prepare_job_dir(&self, dir: &Path, previous: Option<&Path>) -> Result<bool, StoreError> {
        if dir.exists() {
            self.tools.remove_tree(dir)?;
        }
        let parent = dir.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(parent).map_err(io_err(format!("creating {}", dir.display())))?;
        let data = dir.join("data");
        let previous = previous.filter(|p| p.join("data").is_dir());
        let btrfs = self.backend.kind() == BackendKind::Btrfs && is_btrfs(parent);
        let snapshotted = match previous {
            Some(prev) if btrfs => btrfs_subvolume_snapshot(prev, dir).is_ok(),
            _ => false,
        };
        if snapshotted {
            // Keep data/ (cache/, artifacts/); the previous job's own files go.
            let entries =
                fs::read_dir(dir).map_err(io_err(format!("reading {}", dir.display())))?;
            for entry in entries.flatten() {
                if entry.file_name() != "data" {
                    let p = entry.path();
                    if fs::remove_file(&p).is_err() {
                        let _ = self.tools.remove_tree(&p);
                    }
                }
            }
            let _ = self.tools.remove_tree(&data.join("params"));
        } else {
            let made = btrfs && btrfs_subvolume_create(dir).is_ok();
            if !made {
                fs::create_dir(dir).map_err(io_err(format!("creating {}", dir.display())))?;
            }
            if let Some(prev) = previous {
                self.tools
                    .copy_tree(&prev.join("data"), &data)
                    .map_err(|e| {
                        StoreError::Backend(format!("cloning the group's last build: {e}"))
                    })?;
                let _ = self.tools.remove_tree(&data.join("params"));
            }
        }
        let incremental = previous.is_some();
        // A previous build's data/ may belong to its image's user: give it back to sandbox root
        // (the daemon's user, or with --sandbox-ids subordinate a subordinate id the root daemon
        // can write to anyway) before the caller writes the new params.
        let ours = nix::unistd::geteuid().as_raw();
        if incremental && fs::metadata(&data).is_ok_and(|m| m.uid() != ours) {
            self.tools.chown_tree(&data, 0, 0).map_err(|e| {
                StoreError::Backend(format!("taking back the group's last data/: {e}"))
            })?;
        }
        Ok(incremental)
    }

    /// Give a whole tree to sandbox ids `uid:gid` from inside the user namespace (`chown -R -h`),
    /// e.g. a job's `data/` for its image's non-root user.
    pub fn chown_tree(&self, path: &Path, uid: u32, gid: u32) -> Result<(), StoreError> {
        Ok(self.tools.chown_tree(path, uid, gid)?)
    }

    /// Give a tree this process wrote to sandbox ids `uid:gid` when sandbox root is a
    /// subordinate id (`--sandbox-ids subordinate`); a no-op otherwise. No link is followed.
    pub fn hand_over_tree(&self, path: &Path, uid: u32, gid: u32) -> Result<(), StoreError> {
        crate::tools::hand_over_tree(path, uid, gid).map_err(|source: io::Error| StoreError::Io {
            what: format!("giving {} to sandbox ids {uid}:{gid}", path.display()),
            source,
        })
    }

    /// Resolve a `USER` value in the image whose filesystem is `snapshot` (its `/etc/passwd`
    /// and `/etc/group`, read inside the image); an empty image (`None`) knows numeric ids only.
    pub fn resolve_user(
        &self,
        snapshot: Option<&str>,
        user: &sandbox::User,
    ) -> Result<sandbox::ResolvedUser, sandbox::Error> {
        match snapshot {
            Some(snap) => self.view(snap).resolve_user(user),
            None => sandbox::resolve_user_with(user, "", ""),
        }
    }

    /// A writable root for a job on `snapshot` (None: an empty image), under a fresh path in
    /// `tmp/`: an overlay over the image on the overlay backend and, when `overlay`, on the
    /// plain one (no copy); a snapshot on btrfs, a copy otherwise. Removed when dropped.
    pub fn job_root(&self, snapshot: Option<&str>, overlay: bool) -> Result<JobRoot, StoreError> {
        let scratch = self.tmp_path("job");
        match self.job_target(snapshot, &scratch, overlay) {
            Ok(target) => Ok(JobRoot {
                target,
                scratch,
                backend: Arc::clone(&self.backend),
            }),
            Err(e) => {
                let _ = self.backend.remove(&scratch);
                Err(e)
            }
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
}
