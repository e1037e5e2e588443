//! Where base images come from: the [`BaseSource`] trait, what a source hands over
//! ([`FetchedBase`]), and the local OCI layouts source ([`LocalImages`]); registries are in
//! [`crate::registry`].

use std::path::PathBuf;

use crate::config::ImageConfig;
use crate::oci::{self, Layout};
use crate::store::Store;

/// Why a base source could not fetch an image it should have.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A local image name with an empty or `..` component (it would leave the images
    /// directory); names the name.
    #[error("invalid image name {0:?}")]
    InvalidName(String),
    /// A local OCI layout that cannot be read or does not hold the image.
    #[error("{0}")]
    Oci(#[from] oci::OciError),
    /// A pull from a registry failed.
    #[error("{0}")]
    Registry(#[from] RegistryError),
}

/// Why a base image could not be pulled from its registry (or its credentials read).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A docker-style auth file that cannot be read or is not JSON.
    #[error("{}: {source}", path.display())]
    AuthFile {
        /// The auth file's path.
        path: std::path::PathBuf,
        /// The read or JSON error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A registry's `auth` entry in the auth file is not base64.
    #[error("{}: auth of {registry}: {source}", path.display())]
    AuthBase64 {
        /// The auth file's path.
        path: std::path::PathBuf,
        /// The registry whose entry it is.
        registry: String,
        /// The decoding error.
        #[source]
        source: base64::DecodeError,
    },
    /// A registry's `auth` entry decodes to text without a `:` between user and password.
    #[error("{}: auth of {registry} is not user:password", path.display())]
    AuthNotUserPassword {
        /// The auth file's path.
        path: std::path::PathBuf,
        /// The registry whose entry it is.
        registry: String,
    },
    /// The image reference does not parse as `[registry/]repository[:tag][@digest]`.
    #[error("invalid image reference {reference:?}: {source}")]
    Reference {
        /// The reference as given.
        reference: String,
        /// The parser's reason.
        #[source]
        source: oci_client::ParseError,
    },
    /// What the registry answered, explained (what was sent, what to change).
    #[error("{message}")]
    Pull {
        /// The explanation (names the registry and the repository there).
        message: String,
        /// The registry client's error.
        #[source]
        source: Box<oci_client::errors::OciDistributionError>,
    },
    /// The pulled image's config blob is not a valid OCI image config.
    #[error("image config: {0}")]
    ImageConfig(#[source] serde_json::Error),
    /// A pulled blob that does not verify, or an OCI document that does not parse.
    #[error("{0}")]
    Oci(#[from] oci::OciError),
    /// A file of the store (a blob, the record of a pull).
    #[error("{}: {source}", path.display())]
    File {
        /// The file's path.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The runtime the registry client runs on could not be started.
    #[error("starting the registry client: {0}")]
    Runtime(#[source] std::io::Error),
    /// The thread running the registry client panicked.
    #[error("the registry client panicked")]
    Panicked,
    /// The record of a pull kept in the store could not be written as JSON.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

/// Where base images come from, in order: `scratch`, local OCI layouts, registries.
pub trait BaseSource: Send + Sync {
    /// Resolve `reference` to a manifest, config and the path of each layer blob (pulled into
    /// the store if needed). `refresh`: do not trust what was fetched before.
    fn fetch(
        &self,
        reference: &str,
        store: &Store,
        refresh: bool,
        platform: &oci::Platform,
    ) -> Result<Option<FetchedBase>, SourceError>;
}

/// A base image ready to unpack.
pub struct FetchedBase {
    /// The digest of the image's manifest (`sha256:...`), recorded in the step key of `FROM`.
    pub manifest_digest: String,
    /// The image config (entrypoint, cmd, env, ...).
    pub config: ImageConfig,
    /// OnBuild triggers of the base (Docker's config extension).
    pub onbuild: Vec<String>,
    /// (digest, blob path) of each layer, bottom first.
    pub layers: Vec<(String, PathBuf)>,
    /// Where it came from, for the log.
    pub origin: String,
}

/// Base images from OCI layouts in a directory: `FROM name[:tag]` is `<dir>/<name>/`.
pub struct LocalImages {
    /// The directory holding one OCI layout per image name.
    pub dir: PathBuf,
}

impl BaseSource for LocalImages {
    fn fetch(
        &self,
        reference: &str,
        _store: &Store,
        _refresh: bool,
        platform: &oci::Platform,
    ) -> Result<Option<FetchedBase>, SourceError> {
        let (name, tag) = split_reference(reference);
        if name.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(SourceError::InvalidName(name.to_string()));
        }
        let path = self.dir.join(name);
        if !path.join("index.json").is_file() {
            return Ok(None);
        }
        let layout = Layout::open(&path)?;
        let resolved = layout.resolve(name, tag, platform)?;
        let raw_config = layout.read_blob(resolved.manifest.config().digest().as_ref())?;
        let mut layers = Vec::new();
        for l in resolved.manifest.layers() {
            let digest = l.digest().to_string();
            layers.push((digest.clone(), layout.blob_path(&digest)?));
        }
        Ok(Some(FetchedBase {
            manifest_digest: resolved.manifest_digest.clone(),
            config: ImageConfig::from_oci(&resolved.config),
            onbuild: onbuild_of(&raw_config),
            layers,
            origin: format!("local image {}", path.display()),
        }))
    }
}

/// `OnBuild` triggers from a raw image config (a Docker extension oci-spec does not model).
pub(crate) fn onbuild_of(raw_config: &[u8]) -> Vec<String> {
    serde_json::from_slice::<serde_json::Value>(raw_config)
        .ok()
        .and_then(|v| v.get("config")?.get("OnBuild")?.as_array().cloned())
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `name[:tag][@digest]` → (name, tag or digest); the tag defaults to `latest`.
pub(crate) fn split_reference(reference: &str) -> (&str, &str) {
    if let Some((name, digest)) = reference.split_once('@') {
        return (name, digest);
    }
    match reference.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (reference, "latest"),
    }
}
