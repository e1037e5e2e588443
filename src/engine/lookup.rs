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
    pub fn list(&self) -> impl Iterator<Item = Found> + '_ {
        let mut all = Vec::new();
        for project in self.layout.projects() {
            for stage in [Stage::Pending, Stage::Ready] {
                for job in self.layout.jobs(&project, stage) {
                    if let Some(started) = job.read_started_at() {
                        all.push((started, job));
                    }
                }
            }
        }
        all.sort_by(|a, b| b.0.cmp(&a.0));
        all.into_iter().filter_map(|(_, dir)| {
            let stages: &[Stage] = match dir.stage() {
                Stage::Pending => &[Stage::Pending, Stage::Ready],
                Stage::Ready => &[Stage::Ready],
            };
            stages.iter().find_map(|&s| read(dir.in_stage(s)))
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
