//! Build Dockerfiles into layered root filesystem snapshots, without Docker.
//!
//! Not implemented yet: this crate will parse Dockerfiles, pull base images from registries and
//! OCI layouts, unpack layers into a snapshot store (btrfs, overlay or plain copies) and run `RUN`
//! steps through the [`sandbox`] crate, caching every step.
//!
//! The folder `images/recipes/` beside this crate holds the recipes of the offline base images
//! (built from Debian packages) that examples and tests use.

pub use sandbox;
