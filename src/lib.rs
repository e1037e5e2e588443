//! mistry: a rootless, Docker-free build server compatible with mistry's API.
//!
//! This package holds the two binaries, `mistryd` (the jobs server: [`config`], [`jobs`],
//! [`engine`], [`server`], [`metrics`]; and its `sandbox`, `image` and `rebuild` commands) and
//! `mistry` (the client), and the code they share.

#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod duration;
pub mod engine;
pub mod image_cli;
pub mod jobs;
pub mod metrics;
pub mod sandbox_cli;
pub mod security;
pub mod server;
pub mod stream_json;
