//! Build Dockerfiles into layered root filesystem snapshots, without Docker, and prepare the
//! trees a job runs on.
//!
//! A [`Builder`] runs a project's Dockerfile ([`BuildOptions`]) step by step over a [`Store`]:
//! base images come from [`BaseSources`] (local OCI layouts, then registries, with
//! [`RegistryConfig`]'s credentials); every filesystem-changing step is a snapshot in the store
//! (btrfs subvolumes, overlay layers, or plain copies: [`BackendKind`]), cached by a BuildKit-like
//! key; `RUN` steps run in a [`sandbox`] under the project's policy; the result is an [`Image`]
//! (a snapshot and its [`ImageConfig`]), which [`Builder::export`] can write as an OCI layout.
//!
//! For the jobs that run on images, the store makes a job's directory
//! ([`Store::prepare_job_dir`]: `data/` starting from the group's last job, snapshotted or
//! copied) and its root filesystem ([`Store::job_root`] → [`JobRoot`]: an overlay over, a
//! snapshot of, or a copy of the image).
//!
//! Trees holding the sandbox's mapped ids are edited only from inside the user namespace, by
//! short-lived tool sandboxes running this crate's helper ([`helper_main`], behind
//! `mistryd internal`), which can write only the tree they build. Everything inside an image, a
//! build context or a stage is opened by fd (`openat2(RESOLVE_IN_ROOT)`), never through a host
//! path string; `ADD <url>` downloads follow the build's network policy ([`DownloadPolicy`]).
//!
//! Public modules, each for a reason: [`dockerfile`] (the parser and its syntax tree, usable
//! on their own, e.g. by property tests), [`inroot`] (fd-based file access inside a root,
//! which the server uses to serve artifacts) and [`walk`] (iterative, fd-bounded tree walks:
//! removal, copies, owners, sizes, tar streams, which the daemon uses for the trees of jobs). The folder `images/recipes/` beside this crate
//! holds the recipes of the offline base images (built from Debian packages).

#![forbid(unsafe_code)]

mod build;
mod config;
mod context;
pub mod dockerfile;
mod download;
pub mod inroot;
mod lex;
mod oci;
mod registry;
mod setid;
mod source;
mod store;
mod tools;
mod unpack;
mod view;
pub mod walk;

pub use sandbox;

pub use build::{BaseSources, BuildError, BuildOptions, BuildStats, Builder, Image};
pub use config::ImageConfig;
pub use download::DownloadPolicy;
pub use oci::{host_platform, sha256_digest, OciError};
pub use registry::{Credentials, Registries, RegistryConfig};
pub use setid::{Stripped, SET_ID};
pub use source::{BaseSource, FetchedBase, LocalImages, RegistryError, SourceError};
pub use store::{
    cache_depth, is_btrfs, layer_build, layer_path, next_chain_builds, overlay_works_in,
    read_cache_layers, BackendKind, CacheMode, Collected, JobRoot, OverlayError, Store, StoreError,
    UnknownBackend, Workspace, CACHE_FLAT, CACHE_LAYERS, CACHE_TOKEN, CACHE_WORK,
};
pub use tools::{helper_main, ToolError};
pub use unpack::{apply_layer, Applied, Owners, UnpackError};
pub use view::{Target, View};
