//! Build Dockerfiles into layered root filesystem snapshots, without Docker.
//!
//! [`dockerfile`] parses Dockerfiles (directives, continuations, every instruction) and [`lex`]
//! does Docker's word processing (quotes, `$VAR`, `${VAR:-x}`...), both with size caps;
//! [`build`] runs them over base images from registries and OCI layouts ([`registry`],
//! [`oci`]), the layer unpacker ([`unpack`]), the snapshot store and step cache ([`store`]),
//! with `RUN` steps run through [`sandbox`] and file operations through [`tools`].
//!
//! Everything inside an image, a build context or a stage is opened by fd through [`inroot`]
//! (`openat2(RESOLVE_IN_ROOT)`), never through a host path string; [`download`] fetches `ADD`
//! URLs under the build's network policy.
//!
//! The folder `images/recipes/` beside this crate holds the recipes of the offline base images
//! (built from Debian packages) that examples and tests use.

#![forbid(unsafe_code)]

pub mod build;
pub mod config;
pub mod context;
pub mod dockerfile;
pub mod download;
pub mod inroot;
pub mod lex;
pub mod oci;
pub mod registry;
pub mod store;
pub mod tools;
pub mod unpack;

pub use sandbox;
