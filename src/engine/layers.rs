//! A group's cache as layers (where overlays work on `build_path`): each build keeps only its
//! own changes to `data/cache`, on top of the layers of the builds before it (recorded in its
//! `cache-layers`), so that an incremental build copies nothing but `data/artifacts`. A build
//! whose cache is deeper than `cache_layers` is squashed after it ended, in the background,
//! into `cache-flat` (one layer for the group's next build). Layers stay while a kept or
//! running build needs them (retention asks [`needed_builds`]).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use images::{CacheMode, Store};

use super::layout::{Layout, Stage};
use super::state::JobKey;
use super::Engine;
use crate::config::Config;

/// How the daemon's jobs get their group's last cache: layers when `cache_layers` is not 0, the
/// store uses the overlay backend and a rootless overlay works on `build_path` (probed once);
/// else copies (btrfs: snapshots).
pub(super) fn cache_mode(cfg: &Config, store: &Store) -> CacheMode {
    if cfg.cache_layers == 0 || store.backend() != images::BackendKind::Overlay {
        return CacheMode::Copy;
    }
    match images::overlay_works_in(&cfg.build_path) {
        Ok(()) => CacheMode::Layered {
            // Squashing runs behind the jobs; past four times the limit, a job merges the
            // layers itself rather than mount ever more.
            hard_limit: cfg.cache_layers.saturating_mul(4).max(4),
        },
        Err(why) => {
            tracing::warn!(build_path = %cfg.build_path.display(), %why, "overlays do not work on build_path: incremental builds copy the group's cache");
            CacheMode::Copy
        }
    }
}

/// The ready builds of `project` that a kept build's or a running build's cache sits on:
/// the layers recorded by its pending builds, and those the next build of a linked build
/// (one that is some group's last) would mount.
pub(super) fn needed_builds(layout: &Layout, project: &str, linked: &[&Path]) -> HashSet<String> {
    let mut needed = HashSet::new();
    for pending in layout.jobs(project, Stage::Pending) {
        needed.extend(
            images::read_cache_layers(pending.path())
                .iter()
                .filter_map(|l| images::layer_build(l).map(str::to_string)),
        );
    }
    for build in linked {
        needed.extend(images::next_chain_builds(build));
    }
    needed
}

/// Why a build's cache layers could not be squashed.
#[derive(Debug, thiserror::Error)]
pub(super) enum SquashError {
    #[error("{0}")]
    Store(#[from] images::StoreError),
    #[error("the squash panicked")]
    Panicked,
}

/// Squash `build`'s cache at the lowest priority (in a thread of its own, waited for).
pub(super) fn squash_now(store: &Store, build: &Path) -> Result<bool, SquashError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let _ = rustix::process::setpriority_process(None, 19);
                Ok(store.squash_cache(build)?)
            })
            .join()
            .unwrap_or(Err(SquashError::Panicked))
    })
}

/// Let ready build `id` of a project go although builds in `linked` (its link targets) would
/// start their next build on its cache layer: squash those builds' caches first (then their
/// next builds sit on their squashed layer alone). Pending builds that sit on it keep it.
pub(super) fn unpin(store: &Store, id: &str, linked: &[&Path]) {
    for build in linked {
        let own = build.file_name().is_some_and(|n| n == id);
        if !own && images::next_chain_builds(build).iter().any(|b| b == id) {
            match squash_now(store, build) {
                Ok(_) => {
                    tracing::info!(build = %build.display(), "squashed a build's cache layers so that older builds can go");
                }
                Err(e) => {
                    tracing::warn!(build = %build.display(), error = %e, "could not squash a build's cache layers (the builds below stay)");
                }
            }
        }
    }
}

impl Engine {
    /// When the ready build of `key` (a job of `group` that just ended) succeeded and its cache
    /// is deeper than `cache_layers`, squash it in a thread of its own at the lowest priority, then apply the
    /// group's retention again (the layers below are free then). One squash per build at a time.
    pub(super) fn squash_if_deep(self: &Arc<Self>, key: &JobKey, group: &str) {
        let build = self.layout.job(&key.project, &key.id, Stage::Ready);
        let limit = self.cfg.cache_layers;
        if !matches!(self.cache_mode, CacheMode::Layered { .. })
            || images::cache_depth(build.path()) <= limit
            || !build.read_info().is_some_and(|i| i.succeeded())
        {
            return;
        }
        let path = build.path().to_path_buf();
        if !self
            .squashing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(path.clone())
        {
            return;
        }
        let engine = Arc::clone(self);
        let group = group.to_string();
        let (project, id) = (key.project.clone(), key.id.clone());
        let hold = self.retainer.hold(Some(&path));
        let entry = path.clone();
        let spawned = std::thread::Builder::new()
            .name("cache-squash".into())
            .spawn(move || {
                // Behind the jobs: the squash (and the copy it runs) at the lowest CPU
                // priority (and, with it, I/O priority where the I/O scheduler has them).
                let _ = rustix::process::setpriority_process(None, 19);
                let started = std::time::Instant::now();
                match engine.store().squash_cache(&path) {
                    Ok(true) => tracing::info!(%project, %id, ms = started.elapsed().as_millis() as u64, "squashed a build's cache layers"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(%project, %id, error = %e, "could not squash a build's cache layers (the next builds mount them all)"),
                }
                drop(hold);
                engine
                    .squashing
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&path);
                engine.retain_after_job(&project, &group);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start a cache squash");
            self.squashing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&entry);
        }
    }
}
