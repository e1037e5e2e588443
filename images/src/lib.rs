//! Build Dockerfiles into layered root filesystem snapshots, without Docker.
//!
//! Done so far: [`dockerfile`] parses Dockerfiles (directives, continuations, every
//! instruction) and [`lex`] does Docker's word processing (quotes, `$VAR`, `${VAR:-x}`...).
//! To come: base images from registries and OCI layouts, layer unpacking, the snapshot store
//! (btrfs, overlay, plain) and the step cache, with `RUN` steps run through [`sandbox`].
//!
//! The folder `images/recipes/` beside this crate holds the recipes of the offline base images
//! (built from Debian packages) that examples and tests use.

pub mod build;
pub mod config;
pub mod context;
pub mod dockerfile;
pub mod lex;
pub mod oci;
pub mod registry;
pub mod store;
pub mod tools;
pub mod unpack;

pub use sandbox;
