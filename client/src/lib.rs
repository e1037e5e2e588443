//! The client of the mistry build server (the `mistry` binary): `mistry build` schedules a job
//! on a mistry server and fetches its artifacts — a drop-in for mistry's Go client (same flags,
//! defaults, messages and exit codes), plus a native `http` transport that needs no SSH and no
//! rsync daemon.
//!
//! `mistry pipeline run|list` runs the server's pipelines; `mistry exec` runs a job on this
//! machine through `mistryd exec` (the engine lives there).
//!
//! This crate depends only on what the client uses (a blocking HTTP client, tar, clap): no
//! async runtime, no HTTP server, no image builder or sandbox. [`duration`] (Go's duration
//! syntax) is shared with the server, which re-exports it as `mistry::duration`.

#![forbid(unsafe_code)]

mod build;
pub mod duration;
mod exec;
mod http;
mod pipeline;
mod transport;

pub use build::{build, parse_params, BuildArgs};
pub use exec::{exec, find_mistryd, ExecArgs, ExecCommand};
pub use pipeline::{
    job_line, list_line, pipeline, ArtifactsOf, PipelineCommand, PipelineRunArgs, ServerArgs,
};
pub use transport::{unpack, Transport};
