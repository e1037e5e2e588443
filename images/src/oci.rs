//! OCI image layouts on disk: finding an image by name and tag, reading its manifest and config
//! (choosing the host's platform in an index), verifying blobs by digest, and writing layouts.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os,
};
use sha2::{Digest as _, Sha256};

/// Errors reading or writing OCI content.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// A file of the layout (`index.json`, a blob) could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file's path.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A document (index, manifest, config) that does not parse or is not of the expected
    /// kind.
    #[error("{what}: {reason}")]
    Invalid {
        /// What it is, e.g. a blob's path or `manifest of <name>`.
        what: String,
        /// Why it is refused.
        reason: String,
    },
    /// A blob's content does not hash to its digest (found when it is read to the end).
    #[error("blob {digest}: digest mismatch (got sha256:{got}); the content is corrupt")]
    DigestMismatch {
        /// The expected digest, `sha256:<hex>`.
        digest: String,
        /// The hex SHA-256 of what was read.
        got: String,
    },
    /// The image's index has no manifest for the platform asked for.
    #[error("image {name}: no manifest for {platform} in its index")]
    NoPlatform {
        /// The image's name.
        name: String,
        /// The platform, `os/arch[/variant]`.
        platform: String,
    },
    /// The layout's `index.json` has several manifests and none is annotated with the tag.
    #[error("image {name}: tag {tag:?} not found in {path}")]
    NoTag {
        /// The image's name.
        name: String,
        /// The tag asked for.
        tag: String,
        /// The layout's directory.
        path: String,
    },
    /// A platform text that is not `os/arch[/variant]`; names the text.
    #[error("invalid platform {0:?} (expected os/arch[/variant])")]
    Platform(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub(crate) fn invalid(what: impl Into<String>, reason: impl std::fmt::Display) -> OciError {
    OciError::Invalid {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Hex part of a `sha256:` digest; anything else is refused (it would be used as a file name).
pub(crate) fn digest_hex(digest: &str) -> Result<&str, OciError> {
    match digest.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok(h)
        }
        _ => Err(invalid(
            format!("digest {digest:?}"),
            "only sha256 digests are supported",
        )),
    }
}

/// A reader that hashes what passes through and checks the digest at the end.
pub(crate) struct Verify<R> {
    inner: R,
    hasher: Sha256,
    expected: String,
}

impl<R: Read> Verify<R> {
    pub(crate) fn new(inner: R, expected: &str) -> Self {
        Verify {
            inner,
            hasher: Sha256::new(),
            expected: expected.to_string(),
        }
    }
}

impl<R: Read> Read for Verify<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            let got = hex::encode(self.hasher.clone().finalize());
            if Some(got.as_str()) != self.expected.strip_prefix("sha256:") {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    OciError::DigestMismatch {
                        digest: self.expected.clone(),
                        got,
                    },
                ));
            }
        } else {
            self.hasher.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// The host platform as OCI names it.
pub fn host_platform() -> (Os, Arch) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => Arch::Amd64,
        "aarch64" => Arch::ARM64,
        "arm" => Arch::ARM,
        "x86" => Arch::i386,
        "powerpc64" => Arch::PowerPC64le,
        "s390x" => Arch::s390x,
        "riscv64" => Arch::RISCV64,
        other => Arch::Other(other.to_string()),
    };
    (Os::Linux, arch)
}

/// A local OCI layout directory.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub path: PathBuf,
}

/// A resolved image: manifest, its digest, and its config.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedImage {
    pub manifest_digest: String,
    pub manifest: ImageManifest,
    pub config: ImageConfiguration,
}

impl Layout {
    pub(crate) fn open(path: &Path) -> Result<Layout, OciError> {
        let marker = path.join("oci-layout");
        if !marker.is_file() || !path.join("index.json").is_file() {
            return Err(invalid(
                path.display().to_string(),
                "not an OCI image layout (no oci-layout/index.json)",
            ));
        }
        Ok(Layout {
            path: path.to_path_buf(),
        })
    }

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, OciError> {
        Ok(self.path.join("blobs/sha256").join(digest_hex(digest)?))
    }

    /// Read a whole (small) blob and verify it.
    pub(crate) fn read_blob(&self, digest: &str) -> Result<Vec<u8>, OciError> {
        let p = self.blob_path(digest)?;
        let mut data = Vec::new();
        Verify::new(fs::File::open(&p).map_err(io_err(&p))?, digest)
            .read_to_end(&mut data)
            .map_err(|e| match e.into_inner().map(<dyn std::error::Error + std::marker::Send + std::marker::Sync + 'static>::downcast::<OciError>) {
                Some(Ok(oci)) => *oci,
                _ => invalid(p.display().to_string(), "unreadable blob"),
            })?;
        Ok(data)
    }

    fn index(&self) -> Result<ImageIndex, OciError> {
        let p = self.path.join("index.json");
        let text = fs::read(&p).map_err(io_err(&p))?;
        serde_json::from_slice(&text).map_err(|e| invalid(p.display().to_string(), e))
    }

    /// Resolve `tag` (matched against `org.opencontainers.image.ref.name`; a layout with one
    /// untagged manifest answers to any tag) for the host platform.
    pub(crate) fn resolve(
        &self,
        name: &str,
        tag: &str,
        platform: &Platform,
    ) -> Result<ResolvedImage, OciError> {
        let index = self.index()?;
        let tagged = |d: &&Descriptor| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get("org.opencontainers.image.ref.name"))
                .is_some_and(|r| r == tag || r.rsplit(':').next() == Some(tag))
        };
        let desc = match index.manifests().iter().find(tagged) {
            Some(d) => d.clone(),
            None if index.manifests().len() == 1 => index.manifests()[0].clone(),
            None => {
                return Err(OciError::NoTag {
                    name: name.to_string(),
                    tag: tag.to_string(),
                    path: self.path.display().to_string(),
                })
            }
        };
        self.resolve_descriptor(name, &desc, platform)
    }

    fn resolve_descriptor(
        &self,
        name: &str,
        desc: &Descriptor,
        platform: &Platform,
    ) -> Result<ResolvedImage, OciError> {
        let data = self.read_blob(desc.digest().as_ref())?;
        match desc.media_type() {
            MediaType::ImageIndex => {
                let index: ImageIndex = serde_json::from_slice(&data)
                    .map_err(|e| invalid(format!("index of {name}"), e))?;
                let chosen = choose_platform(name, index.manifests(), platform)?;
                self.resolve_descriptor(name, &chosen, platform)
            }
            _ => {
                let manifest: ImageManifest = serde_json::from_slice(&data)
                    .map_err(|e| invalid(format!("manifest of {name}"), e))?;
                let config_data = self.read_blob(manifest.config().digest().as_ref())?;
                let config: ImageConfiguration = serde_json::from_slice(&config_data)
                    .map_err(|e| invalid(format!("config of {name}"), e))?;
                Ok(ResolvedImage {
                    manifest_digest: desc.digest().to_string(),
                    manifest,
                    config,
                })
            }
        }
    }
}

/// A platform as `FROM --platform` names it: `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn host() -> Platform {
        let (os, arch) = host_platform();
        Platform {
            os: os.to_string(),
            arch: arch.to_string(),
            variant: None,
        }
    }

    pub fn parse(s: &str) -> Result<Platform, OciError> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(OciError::Platform(s.to_string())),
        }
    }

    /// Whether an index entry of `os`/`arch`/`variant` serves this platform.
    pub fn matches(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        os == self.os
            && arch == self.arch
            && (self.variant.is_none() || self.variant.as_deref() == variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Pick `want` from an index's manifests (an entry without a platform serves any).
pub(crate) fn choose_platform(
    name: &str,
    manifests: &[Descriptor],
    want: &Platform,
) -> Result<Descriptor, OciError> {
    manifests
        .iter()
        .find(|d| {
            d.platform().as_ref().is_some_and(|p| {
                want.matches(
                    &p.os().to_string(),
                    &p.architecture().to_string(),
                    p.variant().as_deref(),
                )
            })
        })
        .or_else(|| manifests.iter().find(|d| d.platform().is_none()))
        .cloned()
        .ok_or_else(|| OciError::NoPlatform {
            name: name.to_string(),
            platform: want.to_string(),
        })
}

/// Write a blob into a layout's `blobs/sha256`, returning its digest and size.
pub(crate) fn write_blob(layout: &Path, data: &[u8]) -> Result<(String, u64), OciError> {
    let digest = sha256_digest(data);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let p = dir.join(digest_hex(&digest)?);
    let mut f = fs::File::create(&p).map_err(io_err(&p))?;
    f.write_all(data).map_err(io_err(&p))?;
    Ok((digest, data.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked() {
        assert!(digest_hex("sha256:../../etc").is_err());
        assert!(digest_hex("md5:abc").is_err());
        let d = sha256_digest(b"hello");
        assert_eq!(
            d,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let mut out = Vec::new();
        Verify::new(&b"hello"[..], &d)
            .read_to_end(&mut out)
            .unwrap();
        let e = Verify::new(&b"hellO"[..], &d)
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(e.to_string().contains("digest mismatch"), "{e}");
    }
}
