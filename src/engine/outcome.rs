//! How a job ended ([`JobOutcome`]), the errors that stop one ([`RunError`]), and the one
//! conversion of both into the job's BuildInfo ([`Report::into_info`]).

use std::time::Duration;

use images::StoreError;
use sandbox::ExitStatus;

use crate::jobs::{BuildInfo, NEVER_RAN};

/// What stopped the daemon from running a job to its end (not the job's own failure).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A file operation of the daemon on the job's directory failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the path.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The layer store failed (e.g. preparing the job's directory).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The layer store failed at a named step (the job's root, giving `/data` to the sandbox).
    #[error("{what}: {source}")]
    StoreStep {
        /// The step, e.g. `preparing the job's root filesystem`.
        what: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The project's settings (its `.mistry.json` or the server's entry) are invalid.
    #[error("{0}")]
    Settings(String),
    /// The job's sandbox could not be started.
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    /// The job's thread panicked.
    #[error("{0}")]
    Panicked(String),
}

impl RunError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
        let what = what.into();
        move |source| RunError::Io { what, source }
    }

    pub(crate) fn store(what: impl Into<String>) -> impl FnOnce(StoreError) -> RunError {
        let what = what.into();
        move |source| RunError::StoreStep { what, source }
    }

    /// The kernel refused an overlay mount: the job may be run again on a copy of its image.
    pub fn overlay_refused(&self) -> bool {
        matches!(
            self,
            RunError::Sandbox(sandbox::Error::Overlay(_))
                | RunError::Store(StoreError::OverlayUnsupported { .. })
                | RunError::StoreStep {
                    source: StoreError::OverlayUnsupported { .. },
                    ..
                }
        )
    }
}

/// How a job ended.
#[derive(Debug)]
pub enum JobOutcome {
    /// The job exited with this code.
    Exited(i32),
    /// The job was killed by this signal.
    Signalled(i32),
    /// The job ran past its time limit and was killed.
    TimedOut(Duration),
    /// The job's time limit (counted from its start) passed before its sandbox started, while
    /// the second field happened (e.g. "its image was built").
    TimedOutPreparing(Duration, &'static str),
    /// The job reached a resource limit and was killed.
    LimitExceeded(sandbox::Limit),
    /// The job was killed from outside (the server shutting down).
    Killed,
    /// The project's image did not build.
    ImageBuildFailed(String),
    /// The job could not be run on its image (its `USER` does not resolve, it has no command).
    CouldNotRun(String),
    /// The sandbox did not start (e.g. its command cannot be executed): exit code 127, as
    /// `docker run`.
    CouldNotStart(String),
    /// The daemon failed.
    Internal(RunError),
}

impl From<ExitStatus> for JobOutcome {
    fn from(s: ExitStatus) -> JobOutcome {
        match s {
            ExitStatus::Exited(c) => JobOutcome::Exited(c),
            ExitStatus::Signaled(s) => JobOutcome::Signalled(s),
            ExitStatus::TimedOut(t) => JobOutcome::TimedOut(t),
            ExitStatus::LimitExceeded(l) => JobOutcome::LimitExceeded(l),
            ExitStatus::Killed => JobOutcome::Killed,
        }
    }
}

impl JobOutcome {
    /// `ExitCode` and `ErrBuild` of this outcome (`project` names an internal failure).
    pub fn exit_code_and_error(&self, project: &str) -> (i32, String) {
        match self {
            JobOutcome::Exited(c) => (*c, String::new()),
            JobOutcome::Signalled(s) => (128 + s, String::new()),
            JobOutcome::TimedOut(t) => (
                -1,
                format!("the job exceeded its time limit of {t:?} and was killed"),
            ),
            JobOutcome::TimedOutPreparing(t, what) => (
                -1,
                format!(
                    "the job exceeded its time limit of {t:?} before it started (while {what}) and was stopped"
                ),
            ),
            JobOutcome::LimitExceeded(l) => (-1, format!("the job {l} and was killed")),
            JobOutcome::Killed => (
                -1,
                "the job was killed (the server is shutting down)".into(),
            ),
            JobOutcome::ImageBuildFailed(e) => {
                (NEVER_RAN, format!("could not build docker image: {e}"))
            }
            JobOutcome::CouldNotRun(e) => (NEVER_RAN, format!("could not run the job: {e}")),
            JobOutcome::CouldNotStart(_) => (127, String::new()),
            JobOutcome::Internal(e) => (NEVER_RAN, format!("Error building {project}: work: {e}")),
        }
    }

    /// What the job's `out.log` says about this outcome, if anything.
    pub fn log_line(&self) -> Option<String> {
        match self {
            JobOutcome::Exited(_) | JobOutcome::Internal(_) => None,
            JobOutcome::Signalled(s) => {
                Some(format!("mistry: the job was {}", ExitStatus::Signaled(*s)))
            }
            JobOutcome::TimedOut(_)
            | JobOutcome::TimedOutPreparing(..)
            | JobOutcome::LimitExceeded(_)
            | JobOutcome::Killed => Some(format!("mistry: {}", self.exit_code_and_error("").1)),
            JobOutcome::ImageBuildFailed(e) | JobOutcome::CouldNotStart(e) => Some(e.clone()),
            JobOutcome::CouldNotRun(_) => Some(self.exit_code_and_error("").1),
        }
    }

    /// Whether the job's sandbox was started (or tried to start), so that what it left in
    /// `data/` is measured.
    pub fn sandbox_ran(&self) -> bool {
        !matches!(
            self,
            JobOutcome::ImageBuildFailed(_)
                | JobOutcome::CouldNotRun(_)
                | JobOutcome::Internal(_)
                | JobOutcome::TimedOutPreparing(..)
        )
    }
}

/// Everything a run found out about a job.
#[derive(Debug)]
pub struct Report {
    /// How the job ended.
    pub outcome: JobOutcome,
    /// `data/` started from the group's last successful build.
    pub incremental: bool,
    /// Failures found after the job ended (what it left in `data/`), appended to `ErrBuild`.
    pub problems: Vec<String>,
}

impl Report {
    /// The job's BuildInfo: `blank` (what was known before it ran) with this report's outcome.
    pub fn into_info(self, blank: BuildInfo, project: &str) -> BuildInfo {
        let (exit_code, mut err_build) = self.outcome.exit_code_and_error(project);
        for p in self.problems {
            err_build = if err_build.is_empty() {
                p
            } else {
                format!("{err_build}; {p}")
            };
        }
        BuildInfo {
            exit_code,
            err_build,
            incremental: self.incremental,
            ..blank
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blank() -> BuildInfo {
        serde_json::from_value(serde_json::json!({
            "Params": {"a": "1"}, "Group": "g", "Path": "p", "Cached": false, "Coalesced": false,
            "Incremental": false, "ExitCode": NEVER_RAN, "ErrBuild": "", "TransportMethod": "rsync",
            "StartedAt": "t", "Duration": -1_000_000_000i64, "URL": "job/p/id"
        }))
        .unwrap()
    }

    fn info(outcome: JobOutcome, problems: &[&str]) -> (i32, String) {
        let i = Report {
            outcome,
            incremental: true,
            problems: problems
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
        }
        .into_info(blank(), "proj");
        assert!(i.incremental);
        assert_eq!(i.group, "g");
        (i.exit_code, i.err_build)
    }

    #[test]
    fn outcomes_become_mistrys_exit_codes_and_errors() {
        assert_eq!(info(JobOutcome::Exited(35), &[]), (35, String::new()));
        assert_eq!(info(JobOutcome::Signalled(9), &[]), (137, String::new()));
        assert_eq!(
            info(JobOutcome::TimedOut(Duration::from_secs(1)), &[]),
            (
                -1,
                "the job exceeded its time limit of 1s and was killed".into()
            )
        );
        assert_eq!(
            info(
                JobOutcome::LimitExceeded(sandbox::Limit::Processes(64)),
                &[]
            ),
            (
                -1,
                "the job exceeded its process limit of 64 and was killed".into()
            )
        );
        assert_eq!(
            info(
                JobOutcome::LimitExceeded(sandbox::Limit::Disk(1 << 20)),
                &[]
            ),
            (
                -1,
                "the job exceeded its disk limit of 1048576 bytes and was killed".into()
            )
        );
        assert_eq!(
            info(
                JobOutcome::TimedOutPreparing(Duration::from_secs(3), "its image was built"),
                &[]
            ),
            (
                -1,
                "the job exceeded its time limit of 3s before it started (while its image was \
                 built) and was stopped"
                    .into()
            )
        );
        assert_eq!(
            info(JobOutcome::ImageBuildFailed("step 2: boom".into()), &[]),
            (
                NEVER_RAN,
                "could not build docker image: step 2: boom".into()
            )
        );
        assert_eq!(
            info(
                JobOutcome::CouldNotStart("exec /x: no such file".into()),
                &[]
            ),
            (127, String::new())
        );
        assert_eq!(
            info(JobOutcome::Internal(RunError::Settings("bad".into())), &[]),
            (NEVER_RAN, "Error building proj: work: bad".into())
        );
        assert_eq!(info(JobOutcome::Exited(0), &["a", "b"]), (0, "a; b".into()));
        assert_eq!(
            info(JobOutcome::TimedOut(Duration::from_secs(2)), &["x"]),
            (
                -1,
                "the job exceeded its time limit of 2s and was killed; x".into()
            )
        );
        assert_eq!(
            JobOutcome::CouldNotRun("the image has no ENTRYPOINT or CMD".into()).log_line(),
            Some("could not run the job: the image has no ENTRYPOINT or CMD".into())
        );
        assert_eq!(JobOutcome::Exited(1).log_line(), None);
        assert!(RunError::Sandbox(sandbox::Error::Overlay("mount".into())).overlay_refused());
        assert!(!RunError::Sandbox(sandbox::Error::Setup("mount".into())).overlay_refused());
    }

    #[test]
    fn sandbox_statuses_become_outcomes() {
        let code = |s: ExitStatus| JobOutcome::from(s).exit_code_and_error("proj");
        assert_eq!(code(ExitStatus::Exited(3)), (3, String::new()));
        assert_eq!(code(ExitStatus::Signaled(15)), (143, String::new()));
        assert_eq!(
            code(ExitStatus::TimedOut(Duration::from_secs(5))),
            (
                -1,
                "the job exceeded its time limit of 5s and was killed".into()
            )
        );
        assert_eq!(
            code(ExitStatus::LimitExceeded(sandbox::Limit::Memory(4096))),
            (
                -1,
                "the job exceeded its memory limit of 4096 bytes and was killed".into()
            )
        );
        assert_eq!(
            code(ExitStatus::Killed),
            (
                -1,
                "the job was killed (the server is shutting down)".into()
            )
        );
        assert_eq!(
            JobOutcome::CouldNotRun("no CMD".into()).exit_code_and_error("proj"),
            (NEVER_RAN, "could not run the job: no CMD".into())
        );
    }

    #[test]
    fn outcomes_log_lines() {
        assert_eq!(
            JobOutcome::Signalled(9).log_line().as_deref(),
            Some("mistry: the job was killed by signal 9 (SIGKILL)")
        );
        assert_eq!(
            JobOutcome::TimedOut(Duration::from_secs(1))
                .log_line()
                .as_deref(),
            Some("mistry: the job exceeded its time limit of 1s and was killed")
        );
        assert_eq!(
            JobOutcome::Killed.log_line().as_deref(),
            Some("mistry: the job was killed (the server is shutting down)")
        );
        assert_eq!(
            JobOutcome::ImageBuildFailed("step 1: boom".into())
                .log_line()
                .as_deref(),
            Some("step 1: boom")
        );
        assert_eq!(
            JobOutcome::CouldNotStart("exec /x: ENOENT".into())
                .log_line()
                .as_deref(),
            Some("exec /x: ENOENT")
        );
        assert_eq!(
            JobOutcome::Internal(RunError::Settings("bad".into())).log_line(),
            None
        );
    }

    #[test]
    fn only_outcomes_of_a_started_sandbox_measure_data() {
        let t = Duration::from_secs(1);
        for ran in [
            JobOutcome::Exited(0),
            JobOutcome::Signalled(9),
            JobOutcome::TimedOut(t),
            JobOutcome::LimitExceeded(sandbox::Limit::Disk(1)),
            JobOutcome::Killed,
            JobOutcome::CouldNotStart("x".into()),
        ] {
            assert!(ran.sandbox_ran(), "{ran:?}");
        }
        for not in [
            JobOutcome::TimedOutPreparing(t, "its image was built"),
            JobOutcome::ImageBuildFailed("x".into()),
            JobOutcome::CouldNotRun("x".into()),
            JobOutcome::Internal(RunError::Settings("x".into())),
        ] {
            assert!(!not.sandbox_ran(), "{not:?}");
        }
    }

    #[test]
    fn a_refused_overlay_is_seen_through_the_store() {
        let refused = || StoreError::OverlayUnsupported {
            what: "job root".into(),
            source: sandbox::Error::Overlay("mount".into()),
        };
        assert!(RunError::Store(refused()).overlay_refused());
        assert!(RunError::store("step 2")(refused()).overlay_refused());
        assert!(!RunError::Store(StoreError::Backend("x".into())).overlay_refused());
        assert!(!RunError::store("step 2")(StoreError::Backend("x".into())).overlay_refused());
        assert!(!RunError::Settings("x".into()).overlay_refused());
    }
}
