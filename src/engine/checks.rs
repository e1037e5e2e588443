//! What a job left in its `data/`, checked after it ended.

use std::fs;
use std::path::Path;

use images::Store;

use super::data::Data;
use super::layout::{JobDir, DATA_DIRS};

/// `data/artifacts` (what HTTP, rsync and scp serve), `data/cache`, `data/params` and
/// `data/input` (which the daemon creates and writes into on the next build of the group) must
/// be real directories. A job that replaced one with a symlink (or anything else) gets it
/// removed (and an empty directory in its place), by fd below `data/` and never followed, so
/// that no transport and no later build follows it out of the job. Returns the problem to add
/// to ErrBuild (for artifacts: the build fails, so it is neither linked nor cached) and the
/// lines for the job's log.
pub(super) fn data_dirs(store: &Store, dir: &JobDir) -> (Option<String>, Vec<String>) {
    let (mut problem, mut lines) = (None, Vec::new());
    let data = match Data::open(dir.path()) {
        Ok(d) => d,
        // No data/ (the job never got one): nothing to serve, nothing to follow.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return (problem, lines),
        Err(e) => {
            tracing::error!(project = dir.project(), id = dir.id(), error = %e, "could not open the job's data/");
            let msg = format!("the job's /data could not be checked: {e}");
            lines.push(format!("mistry: {msg}"));
            return (Some(msg), lines);
        }
    };
    for name in DATA_DIRS.iter().chain(&["input"]) {
        let what = match data.not_a_dir(name) {
            // Missing (removed by the job), or a directory: nothing to serve, nothing to follow.
            Ok(None) => continue,
            Ok(Some(what)) => what,
            Err(e) => {
                tracing::error!(project = dir.project(), id = dir.id(), name, error = %e, "could not check the job's data/");
                continue;
            }
        };
        if let Err(e) = data.replace_with_dir(store, name) {
            tracing::error!(project = dir.project(), id = dir.id(), name, error = %e, "could not remove what the job left instead of a directory");
        }
        let msg = format!(
            "the job replaced /data/{name} with {what}; {}",
            if *name == "artifacts" {
                "its artifacts are not served"
            } else {
                "it was removed"
            }
        );
        tracing::warn!(project = dir.project(), id = dir.id(), "{msg}");
        lines.push(format!("mistry: {msg}"));
        if *name == "artifacts" {
            problem = Some(msg);
        }
    }
    (problem, lines)
}

/// Nothing the job left in `data/` keeps a set-uid or set-gid bit or file capabilities: its
/// artifacts are served (HTTP, rsync and scp of `build_path`, other agents) and its `data/`
/// becomes the group's next one. Whatever cannot be stripped is not kept: `data/` goes and the
/// build fails. Returns the problem for ErrBuild and the lines for the job's log.
pub(super) fn set_id(store: &Store, dir: &JobDir) -> (Option<String>, Vec<String>) {
    let data = dir.data();
    if !fs::symlink_metadata(&data).is_ok_and(|m| m.is_dir()) {
        return (None, Vec::new());
    }
    match store.strip_setid(&data) {
        Ok(s) => {
            let mut lines = Vec::new();
            if s.modes > 0 {
                lines.push(format!(
                    "mistry: removed the set-uid/set-gid bits of {} files and directories in /data",
                    s.modes
                ));
            }
            if s.caps > 0 {
                lines.push(format!(
                    "mistry: removed the file capabilities of {} files in /data",
                    s.caps
                ));
            }
            (None, lines)
        }
        Err(e) => {
            tracing::error!(project = dir.project(), id = dir.id(), error = %e, "could not remove set-id bits from a job's data; removing its data");
            if let Err(e) = store.remove_tree(&data) {
                tracing::error!(project = dir.project(), id = dir.id(), error = %e, "could not remove a job's data");
            }
            let msg = format!(
                "the set-uid/set-gid bits in /data could not be removed ({e}); its data was removed"
            );
            (Some(msg.clone()), vec![format!("mistry: {msg}")])
        }
    }
}

/// `data/` may hold at most `limit` bytes: a job that left more fails (its result is neither
/// linked nor cached, and the next build of its group does not start from it).
pub(super) fn disk(data: &Path, limit: u64) -> Option<String> {
    match crate::security::disk_usage(data, limit) {
        Ok(used) if used <= limit => None,
        Ok(_) => Some(format!(
            "the job's /data holds more than its disk limit of {limit} bytes"
        )),
        // A tree the daemon cannot read (e.g. a directory the job made mode 000) cannot be
        // shown to be within the limit: it fails.
        Err(e) => Some(format!(
            "the job's /data could not be measured against its disk limit: {e}"
        )),
    }
}
