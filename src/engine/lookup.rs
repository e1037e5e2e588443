//! Jobs on disk and in flight, as the server shows them: listing, finding one, following one's
//! log.

use std::sync::Arc;

use futures_util::Stream;

use super::layout::{JobDir, Stage};
use super::state::JobKey;
use super::{follow, Engine};
use crate::jobs::{self, BuildInfo};

/// A job found on disk: its state and BuildInfo, and its directory.
pub struct Found {
    /// `pending/` (running, or left by a crash) or `ready/`.
    pub stage: Stage,
    /// Its stored BuildInfo (while pending, the provisional one: `ExitCode` -999, `Duration`
    /// unknown).
    pub info: BuildInfo,
    /// Its directory.
    pub dir: JobDir,
}

impl Engine {
    /// Every job on disk, newest first, read one at a time as the caller goes (blocking): only
    /// each job's start time is kept while sorting, so memory does not grow with the jobs'
    /// params. A pending job that became ready meanwhile is found there, with its new state.
    ///
    /// A ready build's BuildInfo is read once and kept ([`Listed`]): it is written once, and
    /// replaced only whole (renamed into place), so its file's inode, size and times say whether
    /// what was read still holds. A listing then reads each ready build's `build_info.json`
    /// metadata only (10,000 builds: a few stats each, not two reads and parses).
    pub fn list(&self) -> impl Iterator<Item = Found> + '_ {
        let mut all = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for project in self.layout.projects() {
            for stage in [Stage::Pending, Stage::Ready] {
                for job in self.layout.jobs(&project, stage) {
                    let known = match stage {
                        Stage::Ready => self.listed.get(&job),
                        Stage::Pending => None,
                    };
                    let started = match &known {
                        Some(info) => Some(info.started_at.clone()),
                        None => job.read_started_at(),
                    };
                    if let Some(started) = started {
                        if stage == Stage::Ready {
                            seen.insert(job.path().to_path_buf());
                        }
                        all.push((started, job, known));
                    }
                }
            }
        }
        self.listed.keep_only(&seen);
        all.sort_by(|a, b| b.0.cmp(&a.0));
        all.into_iter().filter_map(|(_, dir, known)| {
            if let Some(info) = known {
                return Some(Found {
                    stage: Stage::Ready,
                    info: BuildInfo::clone(&info),
                    dir,
                });
            }
            let stages: &[Stage] = match dir.stage() {
                Stage::Pending => &[Stage::Pending, Stage::Ready],
                Stage::Ready => &[Stage::Ready],
            };
            stages.iter().find_map(|&s| {
                let dir = dir.in_stage(s);
                let before = match s {
                    Stage::Ready => file_key(&dir),
                    Stage::Pending => None,
                };
                let found = read(dir)?;
                if let Some(before) = before {
                    self.listed.put(&found.dir, before, &found.info);
                }
                Some(found)
            })
        })
    }

    /// One job on disk (blocking): pending, else ready.
    pub fn job(&self, project: &str, id: &str) -> Option<Found> {
        if jobs::check_name("project", project).is_err() || jobs::check_name("job", id).is_err() {
            return None;
        }
        [Stage::Pending, Stage::Ready]
            .into_iter()
            .find_map(|s| read(self.layout.job(project, id, s)))
    }

    /// One job on disk, read off the async runtime's threads.
    pub async fn find_job(self: &Arc<Self>, project: &str, id: &str) -> Option<Found> {
        let (engine, p, i) = (Arc::clone(self), project.to_string(), id.to_string());
        tokio::task::spawn_blocking(move || engine.job(&p, &i))
            .await
            .ok()
            .flatten()
    }

    /// A job in flight's log, line by line, until it is ready; `None` when the job is not in
    /// flight.
    pub fn follow(&self, project: &str, id: &str) -> Option<impl Stream<Item = String>> {
        if jobs::check_name("project", project).is_err() || jobs::check_name("job", id).is_err() {
            return None;
        }
        let state = self.jobs.watch(&JobKey::new(project, id))?;
        let dir = self.layout.job(project, id, Stage::Pending);
        Some(follow::lines(state, dir))
    }
}

fn read(dir: JobDir) -> Option<Found> {
    let info = dir.read_info()?;
    Some(Found {
        stage: dir.stage(),
        info,
        dir,
    })
}

/// The BuildInfo of each ready build as a listing last read it, by its directory, with what
/// identifies the `build_info.json` it came from (device, inode, size, modification and change
/// times): a file replaced or rewritten is read again. Entries of builds no longer listed go at
/// the next listing. Only small files are kept (at most [`Listed::MAX_FILE`] bytes, and
/// [`Listed::MAX_BYTES`] in all): builds with large params are read each time, so memory stays
/// flat whatever the params (`/index/` streams them one at a time).
#[derive(Default)]
pub(crate) struct Listed {
    known: std::sync::Mutex<Known>,
}

/// [`Listed`]'s entries and the sum of their files' sizes.
#[derive(Default)]
struct Known {
    infos: std::collections::HashMap<std::path::PathBuf, (FileKey, Arc<BuildInfo>)>,
    bytes: u64,
}

/// What identifies one version of a file.
type FileKey = (u64, u64, u64, i64, i64, i64, i64);

fn file_key(dir: &JobDir) -> Option<FileKey> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(dir.path().join("build_info.json")).ok()?;
    m.is_file().then(|| {
        (
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        )
    })
}

impl Listed {
    /// The largest `build_info.json` kept.
    const MAX_FILE: u64 = 16 << 10;
    /// The most bytes of files kept in all (beyond it, listings read the others each time).
    const MAX_BYTES: u64 = 64 << 20;

    /// The BuildInfo kept for `dir`, if its file is still the one it was read from.
    fn get(&self, dir: &JobDir) -> Option<Arc<BuildInfo>> {
        let key = file_key(dir)?;
        let known = self.known.lock().ok()?;
        match known.infos.get(dir.path()) {
            Some((k, info)) if *k == key => Some(Arc::clone(info)),
            _ => None,
        }
    }

    /// Keep `info`, read from `dir`'s file whose key was `before` the read: only if the file
    /// is still that one after it (a file replaced meanwhile is read again next time).
    fn put(&self, dir: &JobDir, before: FileKey, info: &BuildInfo) {
        if file_key(dir) != Some(before) {
            return;
        }
        let size = before.2;
        let Ok(mut known) = self.known.lock() else {
            return;
        };
        if size > Self::MAX_FILE || known.bytes + size > Self::MAX_BYTES {
            return;
        }
        if let Some((old, _)) = known
            .infos
            .insert(dir.path().to_path_buf(), (before, Arc::new(info.clone())))
        {
            known.bytes -= old.2;
        }
        known.bytes += size;
    }

    /// Forget the builds not in `seen` (removed, or pending again).
    fn keep_only(&self, seen: &std::collections::HashSet<std::path::PathBuf>) {
        if let Ok(mut known) = self.known.lock() {
            known.infos.retain(|path, _| seen.contains(path));
            known.bytes = known.infos.values().map(|(k, _)| k.2).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Layout;

    /// A ready build's BuildInfo is kept while its file is the one it was read from: rewritten
    /// (a new file renamed into place), it is read again; a build no longer listed is forgotten.
    #[test]
    fn listed_infos_are_kept_until_their_file_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let l = Layout::new(tmp.path());
        let dir = l.job("p", "id", Stage::Ready);
        std::fs::create_dir_all(dir.path()).unwrap();
        let mut info = crate::engine::blank_info(&Default::default(), "g", "p", "id");
        info.exit_code = 3;
        dir.write_info(&info).unwrap();
        let listed = Listed::default();
        assert!(listed.get(&dir).is_none());
        let before = file_key(&dir).unwrap();
        listed.put(&dir, before, &info);
        assert_eq!(listed.get(&dir).unwrap().exit_code, 3);

        // A key taken before a file replaced meanwhile keeps nothing.
        info.exit_code = 4;
        dir.write_info(&info).unwrap();
        assert!(listed.get(&dir).is_none(), "a rewritten file is read again");
        listed.put(&dir, before, &info);
        assert!(
            listed.get(&dir).is_none(),
            "kept with the key of another file"
        );
        listed.put(&dir, file_key(&dir).unwrap(), &info);
        assert_eq!(listed.get(&dir).unwrap().exit_code, 4);

        listed.keep_only(&std::collections::HashSet::new());
        assert!(listed.get(&dir).is_none(), "forgotten once not listed");

        // Large params are never held: memory stays flat whatever the builds' params.
        info.params.insert("big".into(), "x".repeat(20 << 10));
        dir.write_info(&info).unwrap();
        listed.put(&dir, file_key(&dir).unwrap(), &info);
        assert!(
            listed.get(&dir).is_none(),
            "a build_info.json over 16 KiB is kept"
        );
    }
}
