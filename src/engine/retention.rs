//! Retention: which ready builds go (the last N of each project and group, a maximum age, a
//! free-disk low-water mark), and their safe removal, by the daemon and by `mistryd purge`
//! beside it.
//!
//! Never removed: the targets of `latest` and `groups/<group>`, pending builds (only `ready/`
//! is looked at), a build whose job is in flight again, the base a running incremental build
//! starts from, and the cache layers a running build sits on. A build whose cache layer a
//! linked build's next build would sit on goes after that build's cache is squashed ([`unpin`]). A build goes in two steps: an atomic rename out of `ready/` into
//! `<build_path>/.mistry-trash/` (from then on no request finds it: the result cache is the
//! `ready/` directory, so the same request runs again), then the removal of the tree through
//! [`Store::remove_tree`], which removes what only a subordinate id may remove inside the user
//! namespace.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use images::Store;

use super::layout::{Layout, Stage};
use super::state::JobKey;
use super::Engine;
use crate::config::{MinFree, Retention};

/// The trash directory's name in `build_path` (hidden: never a project).
pub const TRASH: &str = ".mistry-trash";

/// A ready build as retention sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Build {
    /// Its project.
    pub project: String,
    /// Its job ID (its directory under `<project>/ready/`).
    pub id: String,
    /// Its BuildInfo's `Group`; `""` for none (or when its BuildInfo cannot be read).
    pub group: String,
    /// Its `StartedAt` (else the directory's modification time).
    pub started: SystemTime,
    /// `<build_path>/<project>/ready/<id>`.
    pub path: PathBuf,
    /// The target of `latest` or `groups/<group>`: it stays.
    pub linked: bool,
    /// A linked or running build sits on its cache layer (see `layers.rs`): it goes only once
    /// the linked ones are squashed ([`unpin`]; a running build's layers stay).
    pub layer: bool,
}

impl Build {
    /// How long before `now` it started (zero for a start in the future).
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.started).unwrap_or_default()
    }
}

/// Why a build goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    /// Not among the last `keep` builds of its project and group.
    Surplus {
        /// The `keep` rule in force.
        keep: usize,
    },
    /// Started longer than `max_age` ago.
    Age {
        /// The `max_age` rule in force.
        max_age: Duration,
    },
    /// The free space of `build_path` was below the mark.
    LowWater {
        /// The mark, in bytes free.
        mark: u64,
    },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Surplus { keep } => {
                write!(f, "not among the last {keep} builds of its group")
            }
            Reason::Age { max_age } => write!(f, "older than {}", fmt_age(*max_age)),
            Reason::LowWater { mark } => write!(
                f,
                "free space of build_path below {}",
                crate::config::human_bytes(*mark)
            ),
        }
    }
}

/// `7d`, `36h`, `90m`, `45s`.
pub fn fmt_age(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86_400 && (s % 86_400 == 0 || s >= 7 * 86_400) {
        format!("{}d", s / 86_400)
    } else if s >= 3600 && s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s >= 60 && s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// The rules `keep` and `max_age` (the low-water mark is applied apart: it depends on what
/// removals free).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rules {
    /// Keep at most this many builds per project and group (newest first); `None`: no limit.
    pub keep: Option<usize>,
    /// Remove builds started longer ago than this; `None`: no limit.
    pub max_age: Option<Duration>,
}

impl From<&Retention> for Rules {
    fn from(r: &Retention) -> Rules {
        Rules {
            keep: r.keep,
            max_age: r.max_age,
        }
    }
}

/// The canonical targets of `project`'s `latest` and `groups/*` links.
fn link_targets(layout: &Layout, project: &str) -> HashSet<PathBuf> {
    let mut links = vec![layout.link(project, "")];
    if let Ok(entries) = std::fs::read_dir(layout.project_dir(project).join("groups")) {
        links.extend(entries.flatten().map(|e| e.path()));
    }
    links
        .iter()
        .filter_map(|l| std::fs::canonicalize(l).ok())
        .collect()
}

/// Remove every group link of `project` that points at `target` (a build that goes for good:
/// the cluster's stale copies, `Engine::discard_ready`); under the project's link lock.
pub(super) fn unlink_build(layout: &Layout, project: &str, target: &Path) {
    let Ok(target) = std::fs::canonicalize(target) else {
        return;
    };
    let mut links = vec![layout.link(project, "")];
    if let Ok(entries) = std::fs::read_dir(layout.project_dir(project).join("groups")) {
        links.extend(entries.flatten().map(|e| e.path()));
    }
    for link in links {
        if std::fs::canonicalize(&link).is_ok_and(|t| t == target) {
            if let Err(e) = std::fs::remove_file(&link) {
                tracing::warn!(link = %link.display(), error = %e, "could not remove the link of a stale build");
            }
        }
    }
}

/// The IDs of `project`'s builds whose cache layers a linked or running build sits on.
fn layer_builds(layout: &Layout, project: &str, linked: &HashSet<PathBuf>) -> HashSet<String> {
    let linked: Vec<&Path> = linked.iter().map(PathBuf::as_path).collect();
    super::layers::needed_builds(layout, project, &linked)
}

/// Before `build` goes: when a linked build's next build would sit on its cache layer, squash
/// that build's cache (slow: a copy of the merged cache, at the lowest priority).
pub fn unpin(layout: &Layout, store: &Store, build: &Build) {
    if build.layer {
        let linked = link_targets(layout, &build.project);
        let linked: Vec<&Path> = linked.iter().map(PathBuf::as_path).collect();
        super::layers::unpin(store, &build.id, &linked);
    }
}

/// [`unpin`] for ready build `id` of `project`, whatever the rules say of it.
pub fn unpin_id(layout: &Layout, store: &Store, project: &str, id: &str) {
    let linked = link_targets(layout, project);
    let linked: Vec<&Path> = linked.iter().map(PathBuf::as_path).collect();
    super::layers::unpin(store, id, &linked);
}

/// The ready builds of `project`.
pub fn builds(layout: &Layout, project: &str) -> Vec<Build> {
    let linked = link_targets(layout, project);
    let layers = layer_builds(layout, project, &linked);
    layout
        .jobs(project, Stage::Ready)
        .into_iter()
        .filter(|j| !j.id().starts_with('.'))
        .filter_map(|j| {
            let meta = std::fs::symlink_metadata(j.path()).ok()?;
            if !meta.is_dir() {
                return None;
            }
            let info = j.read_info();
            let started = info
                .as_ref()
                .and_then(|i| chrono::DateTime::parse_from_rfc3339(&i.started_at).ok())
                .map(SystemTime::from)
                .or_else(|| meta.modified().ok())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let canonical = std::fs::canonicalize(j.path()).unwrap_or(j.path().to_path_buf());
            Some(Build {
                project: project.to_string(),
                id: j.id().to_string(),
                group: info.map(|i| i.group).unwrap_or_default(),
                started,
                linked: linked.contains(&canonical),
                layer: layers.contains(j.id()),
                path: j.path().to_path_buf(),
            })
        })
        .collect()
}

/// Which of `builds` (of one or more projects) go by `rules`, oldest first. Linked builds stay.
pub fn select(builds: &[Build], rules: &Rules, now: SystemTime) -> Vec<(Build, Reason)> {
    let mut groups: HashMap<(&str, &str), Vec<&Build>> = HashMap::new();
    for b in builds {
        groups
            .entry((b.project.as_str(), b.group.as_str()))
            .or_default()
            .push(b);
    }
    let mut out = Vec::new();
    for (_, mut members) in groups {
        // Newest first; the ID breaks ties so that the choice is stable.
        members.sort_by(|a, b| b.started.cmp(&a.started).then(b.id.cmp(&a.id)));
        for (i, b) in members.into_iter().enumerate() {
            if b.linked {
                continue;
            }
            let reason = match (rules.keep, rules.max_age) {
                (Some(keep), _) if i >= keep => Reason::Surplus { keep },
                (_, Some(max_age)) if b.age(now) > max_age => Reason::Age { max_age },
                _ => continue,
            };
            out.push((b.clone(), reason));
        }
    }
    out.sort_by(|a, b| a.0.started.cmp(&b.0.started).then(a.0.id.cmp(&b.0.id)));
    out
}

/// The order in which the low-water mark removes builds: unlinked ones, oldest first.
pub fn low_water_order(mut builds: Vec<Build>) -> Vec<Build> {
    builds.retain(|b| !b.linked);
    builds.sort_by(|a, b| a.started.cmp(&b.started).then(a.id.cmp(&b.id)));
    builds
}

/// Free and total bytes of the filesystem holding `path` (free: what an unprivileged user may
/// use).
pub fn free_space(path: &Path) -> io::Result<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    let frsize = s.fragment_size() as u64;
    Ok((
        (s.blocks_available() as u64).saturating_mul(frsize),
        (s.blocks() as u64).saturating_mul(frsize),
    ))
}

/// Whether the low-water mark `min_free` is reached on `path`: the mark in bytes, and whether
/// free space is below it.
pub fn below_mark(path: &Path, min_free: MinFree) -> io::Result<(u64, bool)> {
    let (free, total) = free_space(path)?;
    let mark = min_free.bytes(total);
    Ok((mark, free < mark))
}

static TRASH_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Why a build could not be moved to the trash or removed from it.
#[derive(Debug, thiserror::Error)]
pub enum TrashError {
    /// The build's path could not be resolved (canonicalized) for another reason than its
    /// absence.
    #[error("{}: {source}", path.display())]
    Resolve {
        /// The build's directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The trash directory could not be created.
    #[error("creating {}: {source}", path.display())]
    Create {
        /// The trash directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The build could not be renamed into the trash.
    #[error("moving {} to {}: {source}", from.display(), to.display())]
    Move {
        /// The build's directory.
        from: PathBuf,
        /// Its name in the trash.
        to: PathBuf,
        /// The rename error.
        #[source]
        source: io::Error,
    },
    /// The build's tree in the trash could not be removed.
    #[error("removing {}: {source}", path.display())]
    Remove {
        /// The tree in the trash.
        path: PathBuf,
        /// The store's error.
        #[source]
        source: images::StoreError,
    },
}

/// Remove the tree at `path` (a build moved to the trash).
pub(super) fn remove_taken(store: &Store, path: PathBuf) -> Result<(), TrashError> {
    match store.remove_tree(&path) {
        Ok(()) => Ok(()),
        Err(source) => Err(TrashError::Remove { path, source }),
    }
}

/// `<build_path>/.mistry-trash`: where builds go before their removal. Entries are named
/// `<pid>-<n>-<project>-<id>` after the process removing them, so that a leftover (a process
/// killed midway) is cleaned by the next one, and never one another live process is removing.
#[derive(Debug, Clone)]
pub struct Trash {
    dir: PathBuf,
}

impl Trash {
    /// The trash of `build_path`: `<build_path>/.mistry-trash` ([`TRASH`]).
    pub fn new(build_path: &Path) -> Trash {
        Trash {
            dir: build_path.join(TRASH),
        }
    }

    /// The trash directory's path (it may not exist yet).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Remove `build`: re-check its links (another process may have moved one meanwhile), move
    /// it out of `ready/` at once, then remove its tree. `Ok(false)`: it was linked or already
    /// gone.
    pub fn discard(
        &self,
        layout: &Layout,
        store: &Store,
        build: &Build,
    ) -> Result<bool, TrashError> {
        unpin(layout, store, build);
        let Some(path) = self.take(layout, build)? else {
            return Ok(false);
        };
        remove_taken(store, path)?;
        Ok(true)
    }

    /// The first step of [`Trash::discard`]: the build's path in the trash, `None` when it was
    /// linked or already gone.
    pub fn take(&self, layout: &Layout, build: &Build) -> Result<Option<PathBuf>, TrashError> {
        let canonical = match std::fs::canonicalize(&build.path) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(TrashError::Resolve {
                    path: build.path.clone(),
                    source,
                })
            }
        };
        let linked = link_targets(layout, &build.project);
        if linked.contains(&canonical)
            || layer_builds(layout, &build.project, &linked).contains(&build.id)
        {
            return Ok(None);
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| TrashError::Create {
            path: self.dir.clone(),
            source,
        })?;
        let dst = self.dir.join(format!(
            "{}-{}-{}-{}",
            std::process::id(),
            TRASH_COUNTER.fetch_add(1, Ordering::Relaxed),
            build.project,
            build.id
        ));
        match std::fs::rename(&build.path, &dst) {
            Ok(()) => Ok(Some(dst)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // Another filesystem (ready/ is a mount of its own): removed in place; requests
            // meanwhile find a half-removed build without its BuildInfo, which is no cache hit.
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let info = build.path.join("build_info.json");
                let _ = std::fs::remove_file(info);
                Ok(Some(build.path.clone()))
            }
            Err(source) => Err(TrashError::Move {
                from: build.path.clone(),
                to: dst,
                source,
            }),
        }
    }

    /// Remove what processes that are gone left in the trash.
    pub fn clean_leftovers(&self, store: &Store) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let alive = name
                .split('-')
                .next()
                .and_then(|p| p.parse::<i32>().ok())
                .is_some_and(|pid| {
                    pid as u32 == std::process::id()
                        || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                            != Err(nix::errno::Errno::ESRCH)
                });
            if !alive {
                if let Err(err) = store.remove_tree(&e.path()) {
                    tracing::warn!(path = %e.path().display(), error = %err, "could not empty the trash");
                }
            }
        }
    }
}

/// What a retention pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Purged {
    /// Builds removed.
    pub removed: usize,
    /// Builds that were to go but could not be moved or removed (logged).
    pub failed: usize,
}

/// The daemon's retention state: one pass at a time, the trash, and the builds running
/// incremental builds start from.
#[derive(Debug)]
pub struct Retainer {
    pass: Mutex<()>,
    trash: Trash,
    in_use: Mutex<HashMap<PathBuf, usize>>,
}

impl Retainer {
    /// The retention state of the daemon on `build_path`: nothing held yet.
    pub fn new(build_path: &Path) -> Retainer {
        Retainer {
            pass: Mutex::new(()),
            trash: Trash::new(build_path),
            in_use: Mutex::new(HashMap::new()),
        }
    }

    /// The trash (for the clean-up at start).
    pub fn trash(&self) -> &Trash {
        &self.trash
    }

    /// Keep the build at `path` while the returned guard lives (counted: several holds of one
    /// build are fine); `None` when `path` is `None` or cannot be resolved.
    pub fn hold(self: &Arc<Self>, path: Option<&Path>) -> Option<Hold> {
        let path = std::fs::canonicalize(path?).ok()?;
        *self
            .in_use
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(path.clone())
            .or_default() += 1;
        Some(Hold {
            retainer: Arc::clone(self),
            path,
        })
    }

    fn is_in_use(&self, path: &Path) -> bool {
        let used = self
            .in_use
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::fs::canonicalize(path).is_ok_and(|p| used.contains_key(&p))
    }
}

/// See [`Retainer::hold`].
pub struct Hold {
    retainer: Arc<Retainer>,
    path: PathBuf,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut used = self
            .retainer
            .in_use
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = used.get_mut(&self.path) {
            *n -= 1;
            if *n == 0 {
                used.remove(&self.path);
            }
        }
    }
}

impl Engine {
    /// After a job of `project` and `group` ended: the rules on that group (cheap: one
    /// directory listing), and the low-water mark (one statvfs) when configured.
    pub fn retain_after_job(&self, project: &str, group: &str) -> Purged {
        if !self.cfg.retention.is_enabled() {
            return Purged::default();
        }
        let _pass = self
            .retainer
            .pass
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut done = self.apply_rules(project, Some(group));
        self.apply_low_water(&mut done);
        self.finish_pass(&done);
        done
    }

    /// A whole pass: the rules on every project, then the low-water mark.
    pub fn retain_all(&self) -> Purged {
        if !self.cfg.retention.is_enabled() {
            return Purged::default();
        }
        let _pass = self
            .retainer
            .pass
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.retainer.trash.clean_leftovers(self.store());
        let mut done = Purged::default();
        for project in self.layout.projects() {
            let d = self.apply_rules(&project, None);
            done.removed += d.removed;
            done.failed += d.failed;
        }
        self.apply_low_water(&mut done);
        self.finish_pass(&done);
        done
    }

    /// Apply retention every `retention.interval` (when configured), on the blocking pool.
    pub fn start_retention(self: &Arc<Self>) {
        if !self.cfg.retention.is_enabled() {
            return;
        }
        let engine = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(engine.cfg.retention.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if engine
                    .shutting_down
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
                    break;
                }
                let e = Arc::clone(&engine);
                let _ = tokio::task::spawn_blocking(move || e.retain_all()).await;
            }
        });
    }

    /// Keep the builds whose cache layers a job starting from `previous` may mount, while it
    /// runs (read before the job reads them, so a squash meanwhile frees nothing it uses).
    pub(super) fn hold_layers(&self, previous: Option<&Path>) -> Vec<Hold> {
        let Some(previous) = previous else {
            return Vec::new();
        };
        let Some(project_dir) = previous.parent().and_then(Path::parent) else {
            return Vec::new();
        };
        images::read_cache_layers(previous)
            .iter()
            .filter_map(|l| images::layer_build(l))
            .filter_map(|id| {
                self.retainer
                    .hold(Some(&project_dir.join("ready").join(id)))
            })
            .collect()
    }

    /// Whether retention must leave `build` alone now: its job is in flight again, or a running
    /// build starts from it.
    fn busy(&self, build: &Build) -> bool {
        self.jobs
            .watch(&JobKey::new(&build.project, &build.id))
            .is_some()
            || self.retainer.is_in_use(&build.path)
    }

    /// Move `build` to the trash under its project's link lock (so that no link moves onto it
    /// meanwhile) when it is not busy and `still()` holds under the lock: its path in the
    /// trash, `None` when it stays.
    pub(super) fn take_unbusy(
        &self,
        build: &Build,
        still: impl Fn() -> bool,
    ) -> Result<Option<PathBuf>, TrashError> {
        if self.busy(build) {
            return Ok(None);
        }
        unpin(&self.layout, self.store(), build);
        let lock = self.link_lock(&build.project);
        let _guard = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.busy(build) || !still() {
            return Ok(None);
        }
        self.retainer.trash.take(&self.layout, build)
    }

    /// Move `build` to the trash (see [`Engine::take_unbusy`]), then remove it.
    fn discard(&self, build: &Build, reason: Reason, done: &mut Purged) {
        match self.take_unbusy(build, || true) {
            Ok(None) => {}
            Ok(Some(path)) => {
                tracing::info!(project = %build.project, id = %build.id, group = %build.group, %reason, "retention: removing a build");
                match self.store().remove_tree(&path) {
                    Ok(()) => done.removed += 1,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "retention: could not remove a build");
                        done.failed += 1;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(project = %build.project, id = %build.id, error = %e, "retention: could not remove a build");
                done.failed += 1;
            }
        }
    }

    fn apply_rules(&self, project: &str, group: Option<&str>) -> Purged {
        let mut done = Purged::default();
        let rules = Rules::from(&self.cfg.retention);
        if rules == Rules::default() {
            return done;
        }
        let mut all = builds(&self.layout, project);
        if let Some(g) = group {
            all.retain(|b| b.group == g);
        }
        for (build, reason) in select(&all, &rules, SystemTime::now()) {
            self.discard(&build, reason, &mut done);
        }
        done
    }

    fn apply_low_water(&self, done: &mut Purged) {
        let Some(min_free) = self.cfg.retention.min_free else {
            return;
        };
        let root = &self.cfg.build_path;
        let below = || below_mark(root, min_free).ok().filter(|(_, below)| *below);
        let Some((mark, _)) = below() else {
            return;
        };
        let all: Vec<Build> = self
            .layout
            .projects()
            .iter()
            .flat_map(|p| builds(&self.layout, p))
            .collect();
        for build in low_water_order(all) {
            self.discard(&build, Reason::LowWater { mark }, done);
            if below().is_none() {
                return;
            }
        }
        tracing::warn!(
            build_path = %root.display(),
            mark = %crate::config::human_bytes(mark),
            "retention: free space is still below the low-water mark (only linked and running builds are left)"
        );
    }

    fn finish_pass(&self, done: &Purged) {
        if done.removed > 0 || done.failed > 0 {
            self.count_hosted();
            tracing::info!(
                removed = done.removed,
                failed = done.failed,
                "retention pass"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(project: &str, id: &str, group: &str, age_s: u64, linked: bool) -> Build {
        Build {
            project: project.into(),
            id: id.into(),
            group: group.into(),
            started: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_s),
            path: PathBuf::from(format!("/b/{project}/ready/{id}")),
            linked,
            layer: false,
        }
    }

    #[test]
    fn keeps_the_last_n_of_each_group_and_links() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let all = vec![
            b("p", "a1", "a", 10, false),
            b("p", "a2", "a", 20, false),
            b("p", "a3", "a", 30, true),
            b("p", "a4", "a", 40, false),
            b("p", "g1", "", 5, false),
            b("q", "q1", "a", 50, false),
        ];
        let rules = Rules {
            keep: Some(1),
            max_age: None,
        };
        let ids: Vec<_> = select(&all, &rules, now)
            .into_iter()
            .map(|(b, r)| (b.id, r))
            .collect();
        assert_eq!(
            ids,
            [
                ("a4".to_string(), Reason::Surplus { keep: 1 }),
                ("a2".to_string(), Reason::Surplus { keep: 1 }),
            ]
        );
        let rules = Rules {
            keep: None,
            max_age: Some(Duration::from_secs(25)),
        };
        let ids: Vec<_> = select(&all, &rules, now)
            .into_iter()
            .map(|(b, _)| b.id)
            .collect();
        assert_eq!(ids, ["q1", "a4"]);
        let order: Vec<_> = low_water_order(all).into_iter().map(|b| b.id).collect();
        assert_eq!(order, ["q1", "a4", "a2", "a1", "g1"]);
        assert_eq!(fmt_age(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(fmt_age(Duration::from_secs(90 * 60)), "90m");
        assert_eq!(fmt_age(Duration::from_secs(90)), "90s");
    }
}
