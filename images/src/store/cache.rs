//! The directories of `RUN --mount=type=cache`, kept outside the layers:
//!
//! ```text
//! <root>/cache/<hex(project)>/<name>         one cache (name: the id in hex, or its sha256)
//! <root>/cache/<hex(project)>/<name>~<n>     more of them for `sharing=private` when in use
//! <root>/cache/<hex(project)>/<name>.lock    flock(2): shared by `shared` users, exclusive
//!                                            for `locked` and `private` ones
//! <root>/cache/<hex(project)>/.new-*         a cache being made (renamed into place)
//! ```
//!
//! A cache is per project (as BuildKit's are per builder), never part of an image or a step key.
//! Garbage collection removes the caches of projects the store has no image of (no ref), unless
//! a step is using them.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use sha2::{Digest as _, Sha256};

use super::{io_err, Store, StoreError};

/// How a step holds a cache (`sharing=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSharing {
    /// With every other `shared` user.
    Shared,
    /// Alone, or in a directory of its own when the cache is in use.
    Private,
    /// Alone, waiting for the others.
    Locked,
}

/// A cache directory in use: locked until dropped.
#[derive(Debug)]
pub struct CacheDir {
    pub path: PathBuf,
    /// Whether this use created it (seeded, given its mode and owner).
    pub created: bool,
    lock: fs::File,
}

impl Drop for CacheDir {
    /// Unlock explicitly: closing our descriptor is not enough. A flock belongs to the open file
    /// description, which every process cloned from this one while the cache was held shares
    /// — a sandbox's init keeps the descriptors it inherited until it forks its job — so the
    /// cache would stay "in use" for garbage collection, and a `locked` user would wait, until
    /// an unrelated sandbox got that far.
    fn drop(&mut self) {
        let _ = rustix::fs::flock(&self.lock, FlockOperation::Unlock);
    }
}

/// How a new cache directory starts.
#[derive(Debug, Clone, Default)]
pub struct CacheInit<'a> {
    /// A tree whose contents it starts with (`from=`), else empty.
    pub seed: Option<&'a Path>,
    pub mode: u32,
    /// Owner in sandbox ids.
    pub uid: u32,
    pub gid: u32,
}

/// Most `sharing=private` instances of one id.
const MAX_PRIVATE: usize = 64;

fn name_of(id: &str) -> String {
    if id.len() <= 64 {
        hex::encode(id)
    } else {
        format!("sha256-{}", hex::encode(Sha256::digest(id.as_bytes())))
    }
}

fn lock_file(path: &Path) -> Result<fs::File, StoreError> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(format!("opening {}", path.display())))
}

/// flock(2); `Ok(false)` when `try_only` and someone else holds it.
fn flock(file: &fs::File, op: FlockOperation, path: &Path) -> Result<bool, StoreError> {
    loop {
        match rustix::fs::flock(file, op) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(false),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                return Err(io_err(format!("locking {}", path.display()))(
                    io::Error::from(e),
                ))
            }
        }
    }
}

impl Store {
    fn caches_of(&self, project: &str) -> PathBuf {
        self.root.join("cache").join(hex::encode(project))
    }

    /// Take cache `id` of `project` for one step, creating it as `init` says when it is new.
    /// `Locked` waits for the other users; `Private` takes the first instance nobody uses.
    pub fn cache_dir(
        &self,
        project: &str,
        id: &str,
        sharing: CacheSharing,
        init: &CacheInit<'_>,
    ) -> Result<CacheDir, StoreError> {
        let dir = self.caches_of(project);
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let base = name_of(id);
        let (name, lock) = match sharing {
            CacheSharing::Shared | CacheSharing::Locked => {
                let lp = dir.join(format!("{base}.lock"));
                let f = lock_file(&lp)?;
                let op = if sharing == CacheSharing::Shared {
                    FlockOperation::LockShared
                } else {
                    FlockOperation::LockExclusive
                };
                flock(&f, op, &lp)?;
                (base, f)
            }
            CacheSharing::Private => {
                let mut found = None;
                for n in 0..MAX_PRIVATE {
                    let name = if n == 0 {
                        base.clone()
                    } else {
                        format!("{base}~{n}")
                    };
                    let lp = dir.join(format!("{name}.lock"));
                    let f = lock_file(&lp)?;
                    if flock(&f, FlockOperation::NonBlockingLockExclusive, &lp)? {
                        found = Some((name, f));
                        break;
                    }
                }
                found.ok_or_else(|| {
                    StoreError::Backend(format!(
                        "cache {id:?}: {MAX_PRIVATE} private copies are in use"
                    ))
                })?
            }
        };
        let path = dir.join(&name);
        let created = if path.is_dir() {
            false
        } else {
            self.make_cache(&path, init)?;
            true
        };
        Ok(CacheDir {
            path,
            created,
            lock,
        })
    }

    /// Make a new cache directory at `path`: made beside it (`.new-*`; a directory given to
    /// another id can only be renamed within its parent), then renamed into place.
    fn make_cache(&self, path: &Path, init: &CacheInit<'_>) -> Result<(), StoreError> {
        let tmp_name = self.tmp_path("new");
        let tmp = path.with_file_name(format!(
            ".{}",
            tmp_name.file_name().unwrap_or_default().to_string_lossy()
        ));
        let made = (|| -> Result<(), StoreError> {
            match init.seed {
                Some(seed) => self.tools.copy_tree(seed, &tmp)?,
                None => {
                    fs::create_dir(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
                    fs::set_permissions(&tmp, fs::Permissions::from_mode(init.mode))
                        .map_err(io_err(format!("setting the mode of {}", tmp.display())))?;
                    crate::tools::hand_over_tree(&tmp, init.uid, init.gid)
                        .map_err(io_err(format!("giving {} away", tmp.display())))?;
                    let subordinate =
                        sandbox::default_id_mapping() == sandbox::IdMapping::Subordinate;
                    if !subordinate && (init.uid, init.gid) != (0, 0) && self.tools.keeps_owners() {
                        self.tools.chown_tree(&tmp, init.uid, init.gid)?;
                    }
                }
            }
            fs::rename(&tmp, path).map_err(io_err(format!(
                "renaming {} to {}",
                tmp.display(),
                path.display()
            )))
        })();
        if made.is_err() {
            let _ = self.tools.remove_tree(&tmp);
        }
        made
    }

    /// Remove the caches of projects without a ref (no image in the store), except those in
    /// use. Returns how many cache directories went.
    pub(super) fn collect_caches(&self) -> Result<usize, StoreError> {
        let root = self.root.join("cache");
        let entries = match fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err(format!("reading {}", root.display()))(e)),
        };
        let mut removed = 0;
        for project in entries.flatten() {
            let name = project.file_name().to_string_lossy().into_owned();
            if self.root.join("refs").join(format!("{name}.json")).exists() {
                continue;
            }
            let dir = project.path();
            // Hold every lock of the project's caches while removing them: none may be in use.
            let mut held = Vec::new();
            let mut busy = false;
            for e in fs::read_dir(&dir)
                .map_err(io_err(format!("reading {}", dir.display())))?
                .flatten()
            {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "lock") {
                    let f = lock_file(&p)?;
                    if !flock(&f, FlockOperation::NonBlockingLockExclusive, &p)? {
                        busy = true;
                        break;
                    }
                    held.push(f);
                }
            }
            if busy {
                continue;
            }
            for e in fs::read_dir(&dir)
                .map_err(io_err(format!("reading {}", dir.display())))?
                .flatten()
            {
                let p = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    self.tools.remove_tree(&p)?;
                    removed += 1;
                }
            }
            // The lock files last (held until here), then the project's directory.
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let _ = fs::remove_file(e.path());
            }
            drop(held);
            let _ = fs::remove_dir(&dir);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BackendKind;

    /// A copy of a cache's lock descriptor held elsewhere (what a sandbox cloned from this
    /// process while the step ran keeps for a while) does not keep the cache in use once the
    /// step let it go: garbage collection removes it, whatever else runs beside it.
    #[test]
    fn a_released_cache_is_free_whoever_holds_a_copy_of_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Some(BackendKind::Plain), Vec::new()).unwrap();
        let init = CacheInit {
            mode: 0o755,
            ..CacheInit::default()
        };
        let held = store
            .cache_dir("gone", "c", CacheSharing::Locked, &init)
            .unwrap();
        let copy = held.lock.try_clone().unwrap();
        assert_eq!(store.collect_caches().unwrap(), 0, "in use");
        assert!(held.path.is_dir());
        drop(held);
        assert_eq!(store.collect_caches().unwrap(), 1);
        assert!(!dir.path().join("cache").join(hex::encode("gone")).exists());
        drop(copy);
    }
}
