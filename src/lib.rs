//! mistry: a rootless, Docker-free build server compatible with mistry's API.
//!
//! This package holds the binary `mistryd` (the jobs server: [`config`], [`jobs`], [`engine`],
//! [`server`], [`metrics`]; and its `sandbox`, `image` and `rebuild` commands) and its code. The
//! client `mistry` is its own crate, `mistry-client` (`client/`), which links none of this.

#![forbid(unsafe_code)]

pub mod access;
pub(crate) mod body;
pub mod cluster;
pub mod config;
/// Go's duration syntax, shared with the client (`mistry_client::duration`).
pub use mistry_client::duration;
pub mod engine;
pub mod exec;
pub mod image_cli;
pub mod jobs;
pub(crate) mod metrics;
pub mod operator;
pub(crate) mod pipeline;
pub mod sandbox_cli;
pub mod security;
pub mod server;
pub mod service;
pub(crate) mod stream_json;
pub(crate) mod streams;
pub(crate) mod tree;
pub(crate) mod trends;
