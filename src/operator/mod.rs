//! The operator's tools: `mistryd purge` (retention on demand), `mistryd unshare` (a shell in
//! the daemon's id mapping) and `mistryd doctor` (what a host needs, and how to fix it),
//! `mistryd token` (access tokens).

pub mod doctor;
pub mod purge;
pub mod token;
pub mod unshare;
