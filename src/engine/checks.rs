//! What a job left in its `data/`, checked after it ended.

use std::fs;
use std::path::Path;

use images::Store;

use super::layout::{JobDir, DATA_DIRS};

/// `data/artifacts` (what HTTP, rsync and scp serve), `data/cache` and `data/params` (which the
/// daemon writes into on the next build of the group) must be real directories. A job that
/// replaced one with a symlink (or anything else) gets it removed (and an empty directory in its
/// place), so that no transport follows it out of the job. Returns the problem to add to
/// ErrBuild (for artifacts: the build fails, so it is neither linked nor cached) and the lines
/// for the job's log.
pub fn data_dirs(store: &Store, dir: &JobDir) -> (Option<String>, Vec<String>) {
    let data = dir.data();
    let (mut problem, mut lines) = (None, Vec::new());
    if !fs::symlink_metadata(&data).is_ok_and(|m| m.is_dir()) {
        return (problem, lines);
    }
    for name in DATA_DIRS {
        let path = data.join(name);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            // Removed by the job: nothing to serve, nothing to follow.
            continue;
        };
        if meta.is_dir() {
            continue;
        }
        let what = if meta.file_type().is_symlink() {
            "a symlink"
        } else {
            "something that is not a directory"
        };
        // data/ may belong to the image's user: fall back to the store (the user namespace).
        let removed = fs::remove_file(&path).or_else(|_| {
            store
                .remove_tree(&path)
                .map_err(|e| std::io::Error::other(e.to_string()))
        });
        if let Err(e) = &removed {
            tracing::error!(project = dir.project(), id = dir.id(), path = %path.display(), error = %e, "could not remove what the job left instead of a directory");
        }
        let _ = fs::create_dir(&path);
        let msg = format!(
            "the job replaced /data/{name} with {what}; {}",
            if name == "artifacts" {
                "its artifacts are not served"
            } else {
                "it was removed"
            }
        );
        tracing::warn!(project = dir.project(), id = dir.id(), "{msg}");
        lines.push(format!("mistry: {msg}"));
        if name == "artifacts" {
            problem = Some(msg);
        }
    }
    (problem, lines)
}

/// Nothing the job left in `data/` keeps a set-uid or set-gid bit or file capabilities: its
/// artifacts are served (HTTP, rsync and scp of `build_path`, other agents) and its `data/`
/// becomes the group's next one. Whatever cannot be stripped is not kept: `data/` goes and the
/// build fails. Returns the problem for ErrBuild and the lines for the job's log.
pub fn set_id(store: &Store, dir: &JobDir) -> (Option<String>, Vec<String>) {
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
pub fn disk(data: &Path, limit: u64) -> Option<String> {
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
