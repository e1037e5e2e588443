//! mistry: a rootless, Docker-free build server compatible with mistry's API.
//!
//! This package holds the two binaries, `mistryd` (the server; for now its `sandbox run`
//! debugging entry point) and `mistry` (the client), and the code they share.

pub mod duration;
pub mod image_cli;
pub mod sandbox_cli;
