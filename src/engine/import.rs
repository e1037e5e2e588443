//! Builds made elsewhere (another agent's, fetched by `cluster::copies`) enter this agent's
//! `build_path` only through here, so that the engine stays the one owner of `ready/` and of
//! the `latest` / `groups/<g>` links: the fetch fills a scratch directory the engine gives
//! ([`Importer::scratch`], in `<project>/pending/`, removed at start as every pending build),
//! then [`Importer::place`] renames it to `ready/<id>` and, when asked, makes it its group's
//! last build — both under the project's link lock, the lock the engine's own builds and
//! retention take, so retention never sees a placed build before its link.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{JobDir, Layout, Stage};
use crate::jobs::BuildInfo;

/// The projects' link locks: a build goes to `ready/` and its link is updated under its
/// project's, and retention takes it to choose what goes.
#[derive(Default)]
pub(crate) struct LinkLocks(Mutex<HashMap<String, Arc<Mutex<()>>>>);

impl LinkLocks {
    /// The lock of `project`.
    pub(crate) fn of(&self, project: &str) -> Arc<Mutex<()>> {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(project.to_string()).or_default().clone()
    }
}

/// Where an imported build went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// It is `ready/<id>` now.
    New,
    /// A build was in `ready/<id>` already (before, or meanwhile): it stays, the import went.
    Existing,
}

/// The engine's door for builds made elsewhere ([`super::Engine::importer`]).
#[derive(Clone)]
pub struct Importer {
    layout: Layout,
    locks: Arc<LinkLocks>,
}

impl Importer {
    pub(crate) fn new(layout: Layout, locks: Arc<LinkLocks>) -> Importer {
        Importer { layout, locks }
    }

    /// An importer into `layout` for a process without an engine (a test, a tool): with its own
    /// link locks, so no daemon may use the same `build_path` meanwhile.
    pub fn detached(layout: Layout) -> Importer {
        Importer::new(layout, Arc::default())
    }

    /// The layout builds are imported into.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// A new, empty scratch directory (0755) for a build of `project/id` to fill:
    /// `<project>/pending/.fetch-<id>-<pid>-<n>`.
    pub fn scratch(&self, project: &str, id: &str) -> std::io::Result<JobDir> {
        static FETCHES: AtomicU64 = AtomicU64::new(0);
        self.layout.create_stage(project, Stage::Pending)?;
        let name = format!(
            ".fetch-{id}-{}-{}",
            std::process::id(),
            FETCHES.fetch_add(1, Ordering::Relaxed)
        );
        let scratch = self.layout.job(project, &name, Stage::Pending);
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(scratch.path())?;
        Ok(scratch)
    }

    /// Remove a scratch directory (also when the fetch made some of its directories read-only:
    /// by fd and iteratively).
    pub fn discard(&self, scratch: &JobDir) {
        if let Err(e) = images::walk::remove_path(scratch.path()) {
            tracing::warn!(path = %scratch.path().display(), error = %e, "could not remove a fetch's scratch directory");
        }
    }

    /// Place the filled `scratch` as `ready/<id>` of `project` (its BuildInfo `info` written
    /// in it already), never over a build there; `adopt`: a successful build becomes its
    /// group's last build here (`groups/<group>`, or `latest`) unless this agent has a newer
    /// successful one. Under the project's link lock.
    pub fn place(
        &self,
        scratch: &JobDir,
        project: &str,
        id: &str,
        info: &BuildInfo,
        adopt: bool,
    ) -> std::io::Result<Placed> {
        let ready = self.layout.job(project, id, Stage::Ready);
        let lock = self.locks.of(project);
        let _guard = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.layout.create_stage(project, Stage::Ready)?;
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            scratch.path(),
            rustix::fs::CWD,
            ready.path(),
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST | rustix::io::Errno::NOTEMPTY) => {
                return Ok(Placed::Existing)
            }
            Err(e) => return Err(e.into()),
        }
        if adopt && info.succeeded() {
            self.adopt(&ready, info);
        }
        Ok(Placed::New)
    }

    /// Move ready build `project/id` aside (to `pending/<id>.uncached`, so that a fetch of the
    /// same build can be placed), under the link lock; `None` when there is none (or it could
    /// not be moved).
    pub fn set_aside(&self, project: &str, id: &str) -> Option<Aside> {
        let ready = self.layout.job(project, id, Stage::Ready);
        let aside = self
            .layout
            .job(project, id, Stage::Pending)
            .path()
            .with_extension("uncached");
        let lock = self.locks.of(project);
        let _guard = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let moved = ready.exists()
            && self.layout.create_stage(project, Stage::Pending).is_ok()
            && std::fs::rename(ready.path(), &aside).is_ok();
        moved.then(|| Aside {
            importer: self.clone(),
            ready,
            aside,
        })
    }

    /// Point `project`'s link of `group` (`groups/<group>`, or `latest`) at `base`, or remove
    /// it (`None`: the group's next build starts clean), under the link lock.
    pub fn link_group(
        &self,
        project: &str,
        group: &str,
        base: Option<&JobDir>,
    ) -> std::io::Result<()> {
        let link = self.layout.link(project, group);
        let lock = self.locks.of(project);
        let _guard = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match base {
            Some(dir) => dir.link_from(&link),
            None => match std::fs::remove_file(&link) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            },
        }
    }

    /// Make `build` its group's last build here, unless a newer successful one is.
    fn adopt(&self, build: &JobDir, info: &BuildInfo) {
        let link = self.layout.link(build.project(), &info.group);
        let started = |s: &str| chrono::DateTime::parse_from_rfc3339(s).ok();
        let current = std::fs::canonicalize(&link).ok().and_then(|p| {
            let id = p.file_name()?.to_str()?.to_string();
            self.layout
                .job(build.project(), &id, Stage::Ready)
                .read_info()
        });
        if let Some(cur) = current {
            if cur.succeeded() && started(&cur.started_at) >= started(&info.started_at) {
                return;
            }
        }
        match build.link_from(&link) {
            Ok(()) => tracing::info!(
                project = build.project(),
                id = build.id(),
                group = %info.group,
                "the fetched build is the group's last build here: its next build continues from its data/"
            ),
            Err(e) => tracing::warn!(
                project = build.project(),
                id = build.id(),
                error = %e,
                "could not update {}",
                link.display()
            ),
        }
    }
}

/// A ready build moved aside ([`Importer::set_aside`]): put back ([`Aside::restore`]) or
/// removed ([`Aside::remove`]).
pub struct Aside {
    importer: Importer,
    ready: JobDir,
    aside: std::path::PathBuf,
}

impl Aside {
    /// Put the build back in `ready/` (unless another one is there now), under the link lock.
    pub fn restore(self) {
        let lock = self.importer.locks.of(self.ready.project());
        let _guard = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = rustix::fs::renameat_with(
            rustix::fs::CWD,
            &self.aside,
            rustix::fs::CWD,
            self.ready.path(),
            rustix::fs::RenameFlags::NOREPLACE,
        );
    }

    /// Remove the build set aside.
    pub fn remove(self) {
        if let Err(e) = images::walk::remove_path(&self.aside) {
            tracing::warn!(path = %self.aside.display(), error = %e, "could not remove a copy set aside");
        }
    }
}
