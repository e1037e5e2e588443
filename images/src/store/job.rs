//! A job's two trees, both made by the store: its directory (whose `data/` may start from the
//! group's last job: a btrfs snapshot or a copy) and its root filesystem (an overlay over, a
//! snapshot of, or a copy of its image), thrown away in the background when the job is done.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::backend::{btrfs_subvolume_create, btrfs_subvolume_snapshot, is_btrfs};
use super::{io_err, Backend, BackendKind, Store, StoreError};
use crate::setid::Stripped;
use crate::view::Target;

/// Whether `path` is a directory itself (its last component not a symlink).
fn is_real_dir(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// `entries` (relative to `project_dir`, with their tokens) as absolute paths.
fn abs(project_dir: &Path, entries: &[String]) -> Vec<PathBuf> {
    entries
        .iter()
        .map(|l| project_dir.join(layer_path(l)))
        .collect()
}

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

/// A job directory's list of the cache layers its `data/cache` (an overlay upper directory)
/// sits on, top first, one per line: the path relative to the project directory
/// (`ready/<id>/data/cache` or `ready/<id>/cache-flat`), a space, and that build's token.
pub const CACHE_LAYERS: &str = "cache-layers";
/// A job directory's token: unique per build, so that a layer entry never names another
/// build that replaced it under the same ID (a rebuild).
pub const CACHE_TOKEN: &str = "cache-token";
/// A ready build's squashed cache: its `data/cache` merged with every layer below it.
pub const CACHE_FLAT: &str = "cache-flat";
/// The overlay work directory of a running job's `/data/cache` (same filesystem as the upper).
pub const CACHE_WORK: &str = "cache-work";

/// How a job's directory starts: see [`Store::prepare_job_dir`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workspace {
    /// `data/` starts from the group's last build.
    pub incremental: bool,
    /// The read-only layers (top first) under `data/cache`, to be mounted as an overlay at
    /// `/data/cache` with `data/cache` as its upper and `<dir>/cache-work` as its work
    /// directory. Empty: `data/cache` is a complete tree.
    pub cache_lowers: Vec<PathBuf>,
}

/// How a group's next build gets the last build's `data/cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// A copy (reflinks where the filesystem has them), or a btrfs snapshot.
    Copy,
    /// An overlay over the last builds' cache layers (nothing copied). Chains deeper than
    /// `hard_limit` (squashing fell behind) are flattened into a copy first.
    Layered {
        /// The most layers a chain may have before a job flattens it.
        hard_limit: usize,
    },
}

/// The cache layers (top first, relative to the project directory) the next build of a group
/// sits on when `build` (`<project>/ready/<id>`) is its last one: its squashed cache when it
/// has one, else its own `data/cache` on its recorded layers.
fn next_chain(build: &Path) -> Vec<String> {
    let Some(id) = build.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let token = token_of(build);
    if is_real_dir(&build.join(CACHE_FLAT)) {
        return vec![format!("ready/{id}/{CACHE_FLAT} {token}")];
    }
    let mut chain = vec![format!("ready/{id}/data/cache {token}")];
    chain.extend(read_cache_layers(build));
    chain
}

/// A build's token (empty for builds made before tokens, or without the layered cache).
fn token_of(build: &Path) -> String {
    fs::read_to_string(build.join(CACHE_TOKEN))
        .map(|t| t.trim().to_string())
        .unwrap_or_default()
}

/// A new build's token: process, time and a counter.
fn new_token() -> String {
    static TOKENS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{nanos:x}-{:x}-{:x}",
        std::process::id(),
        TOKENS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// The layers recorded in `dir/cache-layers` (checked: `ready/<id>/data/cache` or
/// `ready/<id>/cache-flat`, then the token); none when there is no record.
pub fn read_cache_layers(dir: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(dir.join(CACHE_LAYERS)) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| layer_build(l).is_some())
        .map(str::to_string)
        .collect()
}

/// The path of a layer entry, relative to the project directory.
pub fn layer_path(entry: &str) -> &str {
    entry.split_once(' ').map_or(entry, |(path, _)| path)
}

/// The ID of the build a layer entry belongs to (`ready/<id>/...`), if the entry is well formed.
pub fn layer_build(entry: &str) -> Option<&str> {
    let rest = layer_path(entry).strip_prefix("ready/")?;
    let (id, tail) = rest.split_once('/')?;
    let ok_id = !id.is_empty() && !id.starts_with('.') && !id.contains('\0');
    (ok_id && (tail == "data/cache" || tail == CACHE_FLAT)).then_some(id)
}

/// Whether a layer entry still names what it named: a real directory in the build whose token
/// it carries (a build replaced under the same ID has another one).
fn layer_holds(project_dir: &Path, entry: &str) -> bool {
    let Some(id) = layer_build(entry) else {
        return false;
    };
    let token = entry.split_once(' ').map_or("", |(_, t)| t);
    is_real_dir(&project_dir.join(layer_path(entry)))
        && token_of(&project_dir.join("ready").join(id)) == token
}

/// The IDs of the builds whose layers a build's next job would mount (see [`next_chain`]).
pub fn next_chain_builds(build: &Path) -> Vec<String> {
    next_chain(build)
        .iter()
        .filter_map(|l| layer_build(l).map(str::to_string))
        .collect()
}

/// The number of layers a build's `/data/cache` is made of (1: a complete tree).
pub fn cache_depth(build: &Path) -> usize {
    1 + read_cache_layers(build).len()
}

impl Store {
    /// Make `dir` (`<project>/pending/<id>`) a fresh job directory (replacing what is there),
    /// and say how its `data/` starts from `previous` (the group's last job directory, used when
    /// it has a `data/` directory):
    /// - on the btrfs backend with `dir` on btrfs, `dir` is a subvolume (so a later job can
    ///   snapshot it) and starts as a snapshot of `previous` with everything but `data/` removed;
    /// - with [`CacheMode::Layered`], `data/artifacts` is a copy of the last one, and
    ///   `data/cache` an empty upper directory over the last build's cache layers, recorded in
    ///   `dir/cache-layers` (nothing of the cache is copied);
    /// - otherwise `data/` is a copy of `previous/data` (its layered cache merged into one tree).
    ///
    /// `data/params` is removed (the caller writes the new ones), and a `data/` that belonged to
    /// the last job's image user is given back to sandbox root. Without `previous` only `dir` is
    /// made.
    pub fn prepare_job_dir(
        &self,
        dir: &Path,
        previous: Option<&Path>,
        mode: CacheMode,
    ) -> Result<Workspace, StoreError> {
        if dir.exists() {
            self.tools.remove_tree(dir)?;
        }
        let parent = dir.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(parent).map_err(io_err(format!("creating {}", dir.display())))?;
        let project_dir = parent.parent().unwrap_or(Path::new("/"));
        let data = dir.join("data");
        // The last build's data/ is the daemon's (a mount point in its job): a real directory,
        // or there is nothing to start from.
        let previous = previous.filter(|p| is_real_dir(&p.join("data")));
        let holds = |l: &String| layer_holds(project_dir, l);
        let mut chain: Vec<String> = previous.map(next_chain).unwrap_or_default();
        // A last build without a cache (its job removed it) has nothing to lend.
        if chain.len() == 1 && !holds(&chain[0]) {
            chain.clear();
        }
        let missing = chain.iter().find(|l| !holds(l));
        if let Some(layer) = missing {
            tracing::warn!(layer = %project_dir.join(layer_path(layer)).display(), "a cache layer of the group's last build is gone or was rebuilt: the build starts clean");
            fs::create_dir(dir).map_err(io_err(format!("creating {}", dir.display())))?;
            self.write_token(dir, mode)?;
            return Ok(Workspace::default());
        }
        let layered = chain.len() > 1
            || chain
                .first()
                .is_some_and(|l| layer_path(l).ends_with(CACHE_FLAT));
        let btrfs = self.backend.kind() == BackendKind::Btrfs && is_btrfs(parent);
        if let (Some(prev), CacheMode::Layered { hard_limit }) = (previous, mode) {
            if !btrfs {
                return self.layered_job_dir(dir, prev, project_dir, chain, hard_limit);
            }
        }
        let snapshotted = match previous {
            Some(prev) if btrfs && !layered => btrfs_subvolume_snapshot(prev, dir).is_ok(),
            _ => false,
        };
        if snapshotted {
            // Keep data/ (cache/, artifacts/); the previous job's own files go, all of them:
            // the new job's logs and BuildInfo are created next to data/, never on top of (or
            // through) what the last one left.
            let entries =
                fs::read_dir(dir).map_err(io_err(format!("reading {}", dir.display())))?;
            for entry in entries {
                let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
                if entry.file_name() != "data" {
                    let p = entry.path();
                    if fs::remove_file(&p).is_err() {
                        self.tools.remove_tree(&p)?;
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
                let clone_err =
                    |e| StoreError::Backend(format!("cloning the group's last build: {e}"));
                if layered {
                    // The last build's cache is a stack of layers: merge them into one tree.
                    fs::create_dir(&data)
                        .map_err(io_err(format!("creating {}", data.display())))?;
                    self.copy_if_dir(&prev.join("data/artifacts"), &data.join("artifacts"))
                        .map_err(clone_err)?;
                    self.flatten(&abs(project_dir, &chain), &data.join("cache"))
                        .map_err(clone_err)?;
                } else {
                    self.tools
                        .copy_tree(&prev.join("data"), &data)
                        .map_err(clone_err)?;
                }
                let _ = self.tools.remove_tree(&data.join("params"));
            }
        }
        let incremental = previous.is_some();
        // A previous build's data/ may belong to its image's user: give it back to sandbox root
        // (the daemon's user, or with --sandbox-ids subordinate a subordinate id the root daemon
        // can write to anyway) before the caller writes the new params.
        let ours = nix::unistd::geteuid().as_raw();
        if incremental && fs::symlink_metadata(&data).is_ok_and(|m| m.uid() != ours) {
            self.tools.chown_tree(&data, 0, 0).map_err(|e| {
                StoreError::Backend(format!("taking back the group's last data/: {e}"))
            })?;
        }
        self.write_token(dir, mode)?;
        Ok(Workspace {
            incremental,
            cache_lowers: Vec::new(),
        })
    }

    /// With the layered cache, every build gets a token (see [`CACHE_TOKEN`]).
    fn write_token(&self, dir: &Path, mode: CacheMode) -> Result<(), StoreError> {
        if matches!(mode, CacheMode::Layered { .. }) {
            fs::write(dir.join(CACHE_TOKEN), new_token() + "\n").map_err(io_err(format!(
                "writing {}",
                dir.join(CACHE_TOKEN).display()
            )))?;
        }
        Ok(())
    }

    /// [`Store::prepare_job_dir`] with a layered cache: `data/artifacts` copied, `data/cache`
    /// empty over `chain` (flattened first when deeper than `hard_limit`).
    fn layered_job_dir(
        &self,
        dir: &Path,
        prev: &Path,
        project_dir: &Path,
        chain: Vec<String>,
        hard_limit: usize,
    ) -> Result<Workspace, StoreError> {
        let data = dir.join("data");
        fs::create_dir(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        self.write_token(dir, CacheMode::Layered { hard_limit })?;
        // The record first: retention keeps what a pending build's record names. A rebuild of
        // a build in its own chain (the same ID) merges the layers: the build it replaces goes.
        let own_id = dir.file_name().and_then(|n| n.to_str());
        let own = chain.iter().any(|l| layer_build(l) == own_id);
        let flatten = own || chain.len() > hard_limit.max(1);
        let record = if flatten {
            String::new()
        } else {
            chain.join("\n") + "\n"
        };
        fs::write(dir.join(CACHE_LAYERS), record).map_err(io_err(format!(
            "writing {}",
            dir.join(CACHE_LAYERS).display()
        )))?;
        fs::create_dir(&data).map_err(io_err(format!("creating {}", data.display())))?;
        let clone_err = |e| StoreError::Backend(format!("cloning the group's last build: {e}"));
        self.copy_if_dir(&prev.join("data/artifacts"), &data.join("artifacts"))
            .map_err(clone_err)?;
        let lowers = abs(project_dir, &chain);
        if flatten {
            tracing::warn!(depth = chain.len(), own, "merging a group's cache layers on the request path (not squashed in time, or a rebuild of a build in the chain)");
            self.flatten(&lowers, &data.join("cache"))
                .map_err(clone_err)?;
            return Ok(Workspace {
                incremental: true,
                cache_lowers: Vec::new(),
            });
        }
        for d in [data.join("cache"), dir.join(CACHE_WORK)] {
            fs::create_dir(&d)
                .and_then(|()| crate::tools::hand_over(&d))
                .map_err(io_err(format!("creating {}", d.display())))?;
        }
        Ok(Workspace {
            incremental: true,
            cache_lowers: lowers,
        })
    }

    /// A copy of `src` at `dst` when `src` is a directory (the helper's `copy-tree`).
    fn copy_if_dir(&self, src: &Path, dst: &Path) -> Result<(), crate::ToolError> {
        if is_real_dir(src) {
            self.tools.copy_tree(src, dst)?;
        }
        Ok(())
    }

    /// A complete copy at `dst` (which must not exist) of the overlay of `lowers` (top first).
    /// Each lower is a build's `data/cache` or `cache-flat`, which its job may have replaced
    /// with a link: one that is not a real directory is refused, never copied through.
    fn flatten(&self, lowers: &[PathBuf], dst: &Path) -> Result<(), crate::ToolError> {
        if let Some(bad) = lowers.iter().find(|l| !is_real_dir(l)) {
            return Err(crate::ToolError::Failed {
                what: format!("merging the cache layers into {}", dst.display()),
                message: format!("{} is not a directory", bad.display()),
            });
        }
        if let [only] = lowers {
            return self.tools.copy_tree(only, dst);
        }
        let mountpoint = self.tmp_path("cache-merged");
        let r = self
            .tools
            .materialize(&crate::View::Layers(lowers.to_vec()), &mountpoint, dst);
        let _ = fs::remove_dir(&mountpoint);
        r
    }

    /// Squash the cache of ready build `build` (`<project>/ready/<id>`): its `data/cache` merged
    /// with the layers below it, copied into `build/cache-flat` (built aside, then renamed into
    /// place), so that the group's next build sits on one layer. A no-op for a build already
    /// squashed or whose cache is one layer. Its own `data/cache` stays as it is.
    pub fn squash_cache(&self, build: &Path) -> Result<bool, StoreError> {
        let flat = build.join(CACHE_FLAT);
        let layers = read_cache_layers(build);
        if layers.is_empty() || flat.exists() {
            return Ok(false);
        }
        let project_dir = build
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("/"));
        let mut lowers = vec![build.join("data/cache")];
        lowers.extend(abs(project_dir, &layers));
        // A name of its own: the daemon and `mistryd purge` may squash the same build at once.
        static SQUASHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = build.join(format!(
            "{CACHE_FLAT}.tmp-{}-{}",
            std::process::id(),
            SQUASHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let squashed = self.flatten(&lowers, &tmp).and_then(|()| {
            match fs::rename(&tmp, &flat) {
                Ok(()) => Ok(()),
                // Another squash of the same build got there first: same content.
                Err(_) if flat.is_dir() => self.tools.remove_tree(&tmp),
                Err(e) => Err(crate::ToolError::Failed {
                    what: format!("renaming {} into place", tmp.display()),
                    message: e.to_string(),
                }),
            }
        });
        if let Err(e) = squashed {
            let _ = self.tools.remove_tree(&tmp);
            return Err(StoreError::Backend(format!(
                "squashing the cache layers of {}: {e}",
                build.display()
            )));
        }
        Ok(true)
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

    /// Remove set-uid and set-gid bits from everything under `path` (a job's `data/`), and
    /// file capabilities from its files, by fd without following a link (see `setid.rs`):
    /// as this process where it may, the rest (what only another id may change, or a directory
    /// this process may not read) in the user namespace.
    pub fn strip_setid(&self, path: &Path) -> Result<Stripped, StoreError> {
        let here = rustix::fs::open(
            path,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        );
        let here = match here {
            Ok(fd) => crate::setid::strip_setid(std::os::fd::AsFd::as_fd(&fd)).map_err(io_err(
                format!("removing set-id bits in {}", path.display()),
            ))?,
            Err(rustix::io::Errno::ACCESS) => Stripped {
                denied: 1,
                ..Stripped::default()
            },
            Err(e) => {
                return Err(io_err(format!("opening {}", path.display()))(
                    io::Error::from(e),
                ))
            }
        };
        if here.denied == 0 {
            return Ok(here);
        }
        let there = self.tools.strip_setid(path)?;
        Ok(Stripped {
            modes: here.modes + there.modes,
            caps: here.caps + there.caps,
            denied: 0,
        })
    }

    /// While its job runs, a build's directory (`pending/<id>`) is the daemon's and the
    /// sandbox's alone (0700; with `--sandbox-ids subordinate` 0710 with sandbox root's group,
    /// which must pass through it): what the job makes in `data/` — a set-uid file — cannot be
    /// reached by other local users before [`Store::strip_setid`] went over it.
    pub fn hide_job_dir(&self, dir: &Path) -> Result<(), StoreError> {
        let what = || format!("making {} private", dir.display());
        let mode = match crate::tools::sandbox_root_ids().map_err(io_err(what()))? {
            Some((_, gid)) => {
                std::os::unix::fs::lchown(dir, None, Some(gid)).map_err(io_err(what()))?;
                0o710
            }
            None => 0o700,
        };
        fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(io_err(what()))
    }

    /// A finished build's directory readable again (0755, the daemon's group), as mistry's
    /// layout is: rsync and scp of `build_path` read it as other users.
    pub fn show_job_dir(&self, dir: &Path) -> Result<(), StoreError> {
        let what = || format!("making {} readable", dir.display());
        if crate::tools::sandbox_root_ids()
            .map_err(io_err(what()))?
            .is_some()
        {
            let gid = nix::unistd::getegid().as_raw();
            std::os::unix::fs::lchown(dir, None, Some(gid)).map_err(io_err(what()))?;
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_err(what()))
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
