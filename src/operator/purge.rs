//! `mistryd purge [--project P] [--older-than 7d] [--keep N] [--dry-run]`: remove ready builds
//! by the same rules as the daemon's retention (`crate::engine::retention`), beside a running
//! daemon or without one. Without `--older-than` and `--keep`, the configuration's `retention`
//! applies (with its low-water mark).
//!
//! Each build is moved out of `ready/` into `<build_path>/.mistry-trash/` at once (an atomic
//! rename: the daemon's result cache no longer finds it, so the same request runs again), then
//! removed through the layer store's tree removal, which removes files of subordinate ids inside
//! the sandboxes' user namespace. Link targets (`latest`, `groups/<g>`) and pending builds are
//! never removed.

use std::io::Write;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Result};

use crate::config::{human_bytes, Config, MinFree};
use crate::engine::retention::{self, Build, Reason, Rules, Trash};
use crate::engine::Layout;

/// What to purge.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only these projects (all when empty).
    pub projects: Vec<String>,
    /// `--older-than`: remove builds started longer ago. When neither this nor `keep` is
    /// given, the configuration's `retention` rules apply instead (an error without any).
    pub older_than: Option<Duration>,
    /// `--keep N`: keep only the last N builds of each project and group.
    pub keep: Option<usize>,
    /// `--dry-run`: print what would go, remove nothing.
    pub dry_run: bool,
}

/// What [`plan`] chose: the builds the rules remove (oldest first), and the low-water mark to
/// apply after them (from the configuration when no rule was given on the command line).
pub type Plan = (Vec<(Build, Reason)>, Option<MinFree>);

/// The builds `opts` removes (see [`Plan`]).
pub fn plan(cfg: &Config, opts: &Options) -> Result<Plan> {
    let layout = Layout::new(&cfg.build_path);
    let from_flags = opts.older_than.is_some() || opts.keep.is_some();
    let (rules, min_free) = if from_flags {
        (
            Rules {
                keep: opts.keep,
                max_age: opts.older_than,
            },
            None,
        )
    } else if cfg.retention.is_enabled() {
        (Rules::from(&cfg.retention), cfg.retention.min_free)
    } else {
        bail!(
            "nothing to purge by: give --keep N or --older-than AGE, or set \"retention\" in the \
             configuration"
        );
    };
    let projects = projects(&layout, opts)?;
    let all: Vec<Build> = projects
        .iter()
        .flat_map(|p| retention::builds(&layout, p))
        .collect();
    Ok((retention::select(&all, &rules, SystemTime::now()), min_free))
}

fn projects(layout: &Layout, opts: &Options) -> Result<Vec<String>> {
    if opts.projects.is_empty() {
        return Ok(layout.projects());
    }
    for p in &opts.projects {
        crate::jobs::check_name("project", p).map_err(anyhow::Error::msg)?;
    }
    Ok(opts.projects.clone())
}

fn line(build: &Build, reason: &Reason, now: SystemTime) -> String {
    let group = if build.group.is_empty() {
        String::new()
    } else {
        format!(" group {}", build.group)
    };
    format!(
        "{}/{} ({} old{group}): {reason}",
        build.project,
        build.id,
        retention::fmt_age(build.age(now))
    )
}

/// Carry out `opts`: one line per build on `out` (`would remove P/ID (...)` with `--dry-run`,
/// else `removed P/ID (...)`), then a summary. Returns the exit code: 1 when a removal failed.
pub fn run(cfg: &Config, opts: &Options, out: &mut dyn Write) -> Result<i32> {
    let (selected, min_free) = plan(cfg, opts)?;
    let layout = Layout::new(&cfg.build_path);
    let now = SystemTime::now();
    let store = if opts.dry_run {
        None
    } else {
        // Beside a running daemon: its work in progress stays untouched.
        Some(
            images::Store::attach(
                &cfg.store_path,
                cfg.filesystem,
                crate::image_cli::helper_command()?,
            )
            .map_err(|e| {
                anyhow::anyhow!("opening the layer store {}: {e}", cfg.store_path.display())
            })?,
        )
    };
    let trash = Trash::new(&cfg.build_path);
    if let Some(store) = &store {
        trash.clean_leftovers(store);
    }
    let (mut removed, mut failed) = (0usize, 0usize);
    let mut remove = |build: &Build, reason: &Reason, out: &mut dyn Write| -> Result<()> {
        match &store {
            None => {
                writeln!(out, "would remove {}", line(build, reason, now))?;
                removed += 1;
            }
            Some(store) => match trash.discard(&layout, store, build) {
                Ok(true) => {
                    writeln!(out, "removed {}", line(build, reason, now))?;
                    removed += 1;
                }
                Ok(false) => {}
                Err(e) => {
                    writeln!(out, "FAILED {}: {e}", line(build, reason, now))?;
                    failed += 1;
                }
            },
        }
        Ok(())
    };
    for (build, reason) in &selected {
        remove(build, reason, out)?;
    }
    if let Some(min_free) = min_free {
        let (free, total) = retention::free_space(&cfg.build_path)?;
        let mark = min_free.bytes(total);
        if free < mark {
            let gone: std::collections::HashSet<_> =
                selected.iter().map(|(b, _)| b.path.clone()).collect();
            let rest: Vec<Build> = projects(&layout, opts)?
                .iter()
                .flat_map(|p| retention::builds(&layout, p))
                .filter(|b| !gone.contains(&b.path))
                .collect();
            // A dry run counts what each build holds; a real one measures the disk again.
            let mut freed = 0u64;
            for build in retention::low_water_order(rest) {
                if opts.dry_run {
                    if free.saturating_add(freed) >= mark {
                        break;
                    }
                    freed = freed.saturating_add(
                        crate::security::disk_usage(&build.path, u64::MAX).unwrap_or(0),
                    );
                } else if retention::free_space(&cfg.build_path)?.0 >= mark {
                    break;
                }
                remove(&build, &Reason::LowWater { mark }, out)?;
            }
        }
        let (free, _) = retention::free_space(&cfg.build_path)?;
        writeln!(
            out,
            "free space of {}: {} (low-water mark {})",
            cfg.build_path.display(),
            human_bytes(free),
            human_bytes(mark)
        )?;
    }
    if opts.dry_run {
        writeln!(out, "Would purge: {removed}")?;
    } else {
        writeln!(out, "Purged: {removed}, Failed: {failed}")?;
    }
    Ok(if failed > 0 { 1 } else { 0 })
}
