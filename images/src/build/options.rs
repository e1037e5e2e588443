//! What to build ([`BuildOptions`]), what comes out ([`Image`], [`BuildStats`]) and why a build
//! failed ([`BuildError`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use sandbox::NetworkMode;

use crate::config::ImageConfig;
use crate::dockerfile;
use crate::store::StoreError;

/// Why a build failed. The message is meant for the build log and the job's `ErrBuild`.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile does not parse.
    #[error("Dockerfile {0}")]
    Dockerfile(#[from] dockerfile::ParseError),
    /// A file of the build (the Dockerfile, the context, an export's input) cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The host path.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A step failed for another reason than its command's exit code (a bad argument, a
    /// missing source, a RUN killed by a signal or a limit).
    #[error("step {step} (line {line}): {message}")]
    Step {
        /// The step's text, at most 80 characters.
        step: String,
        /// Its 1-based line in the Dockerfile.
        line: usize,
        /// What went wrong.
        message: String,
    },
    /// A RUN step exited non-zero: `The command '/bin/sh -c false' returned a non-zero code: 1`.
    #[error("The command '{command}' returned a non-zero code: {code}")]
    Run {
        /// The command's argv joined by spaces.
        command: String,
        /// Its exit code.
        code: i32,
        /// The sandbox's status (always `Exited(code)`).
        status: sandbox::ExitStatus,
    },
    /// A base image could not be found, fetched or unpacked.
    #[error("base image {image}: {message}")]
    Base {
        /// The base image's reference as written in `FROM`.
        image: String,
        /// Why, e.g. `not found in the local images directory or any configured registry`.
        message: String,
    },
    /// A base source (local layouts, a registry) failed to fetch `image`.
    #[error("base image {image}: {source}")]
    Fetch {
        /// The base image's reference as written in `FROM`.
        image: String,
        /// The source's error.
        #[source]
        source: Box<crate::source::SourceError>,
    },
    /// The snapshot store failed (a snapshot, a layer, the cache record).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A tool sandbox (copy, chown, removal) failed.
    #[error(transparent)]
    Tool(#[from] crate::tools::ToolError),
    /// The build log could not be written.
    #[error("writing the build log: {0}")]
    Log(std::io::Error),
    /// The build's deadline passed (a job's time limit, counted from the job's start).
    #[error("the time limit passed while the image was being built")]
    Deadline,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Serializes builds of the same project, and keys its private steps (those with a cache
    /// mount, a context bind or a secret): they are never shared with another project.
    pub project: String,
    /// The build context (the project directory).
    pub context: PathBuf,
    /// The Dockerfile; default `<context>/Dockerfile`.
    pub dockerfile: Option<PathBuf>,
    /// Build arguments (name, value) for `ARG`s; the last of a name wins. Default none.
    pub build_args: Vec<(String, String)>,
    /// Network of RUN steps.
    pub network: NetworkMode,
    /// Ignore the step cache (and re-read base images).
    pub no_cache: bool,
    /// Wall-clock limit of each RUN step.
    pub run_timeout: Option<Duration>,
    /// When the whole build must be done (a job's time limit counts from the job's start): no
    /// step starts after it, and no RUN step runs past it.
    pub deadline: Option<Instant>,
    /// Limits of `ADD <url>` (size, redirects, the daemon's own addresses). Under
    /// `network: none`, `ADD <url>` is refused whatever this says.
    pub download: crate::download::DownloadPolicy,
    /// Seccomp, nested user namespaces and resource limits of RUN steps.
    pub policy: sandbox::Policy,
    /// Secrets `RUN --mount=type=secret,id=ID` can use: id → file on the host, read when a step
    /// using it is keyed. Never part of a layer, a step record or the log; a step key holds
    /// only a keyed digest of the value (and the project: see `build/run.rs`).
    pub secrets: Vec<(String, PathBuf)>,
}

impl BuildOptions {
    /// Options for `project` with context directory `context`: the host network, the step
    /// cache used, no time limit, the default download policy and sandbox policy, no build
    /// argument or secret.
    pub fn new(project: impl Into<String>, context: impl Into<PathBuf>) -> Self {
        BuildOptions {
            project: project.into(),
            context: context.into(),
            dockerfile: None,
            build_args: Vec::new(),
            network: NetworkMode::Host,
            no_cache: false,
            run_timeout: None,
            deadline: None,
            download: crate::download::DownloadPolicy::default(),
            policy: sandbox::Policy::default(),
            secrets: Vec::new(),
        }
    }
}

impl BuildOptions {
    /// The wall-clock limit of a RUN step starting now: the step's own, and what is left
    /// before the deadline.
    pub fn step_timeout(&self) -> Option<Duration> {
        let left = self
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        match (self.run_timeout, left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the deadline passed.
    pub fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// A built image: its final key, snapshot and config.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// The step key of the last step (hex SHA-256): loads it again with
    /// [`crate::Builder::image`].
    pub key: String,
    /// None for an image with an empty filesystem (`FROM scratch` and nothing else).
    pub snapshot: Option<String>,
    /// The image config (entrypoint, cmd, env, user, ...).
    pub config: ImageConfig,
}

/// Counters of one build, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BuildStats {
    /// Instructions processed, in every stage.
    pub steps: usize,
    /// Filesystem steps (RUN, COPY, ADD, WORKDIR creating a directory) answered from the step
    /// cache.
    pub cached: usize,
    /// Filesystem steps carried out (not in the step cache, or `no_cache`). An unchanged
    /// rebuild has none: `cached` is then every filesystem step, and the other steps (FROM,
    /// ENV, ARG, …) only change the image config.
    pub built: usize,
    /// Stages copied out of their layers (overlay store) for a step that ran: a `RUN --mount`
    /// of part of a stage. Never for a step answered from the cache, nor for `COPY --from`,
    /// which reads its sources from a read-only mount of the stage's layers.
    pub stage_copies: usize,
    /// RUN steps whose command actually ran.
    pub executed_runs: usize,
}

impl BuildStats {
    /// One line for the build log: `8 steps: 5 filesystem steps, 5 from the cache, 0 built`
    /// (an unchanged rebuild builds none; the other steps only change the image config).
    pub fn summary(&self) -> String {
        format!(
            "{} steps: {} filesystem steps, {} from the cache, {} built",
            self.steps,
            self.cached + self.built,
            self.cached,
            self.built
        )
    }
}
