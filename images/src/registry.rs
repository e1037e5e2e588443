//! Base images from OCI/Docker registries through the distribution API (`oci-client`).
//!
//! - Anonymous, basic and bearer-token auth (the client follows a registry's
//!   `WWW-Authenticate: Bearer` challenge with the configured credentials).
//! - Credentials from a docker-style `config.json` (`auths.<registry>.auth` = base64 of
//!   `user:password`, or `username`/`password`), and from the configuration.
//! - Image indexes / manifest lists: the host's platform is chosen.
//! - Every blob's digest is verified while it downloads; a blob is put into the store only when
//!   it matched, so a corrupt download leaves nothing behind.
//! - Layers are cached by digest, and a reference's resolution (manifest, config, layers) is
//!   remembered, so a second build from the same base does no network I/O. A rebuild
//!   (`refresh`) asks the registry again.
//! - Plain-http registries only when listed as insecure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};

use crate::config::ImageConfig;
use crate::oci::Platform;
use crate::source::{onbuild_of, BaseSource, FetchedBase};
use crate::store::Store;
use oci_client::manifest::ImageIndexEntry;

/// Registry settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegistryConfig {
    /// Registries (`host[:port]`) reached over plain http.
    #[serde(default)]
    pub insecure: Vec<String>,
    /// A docker-style `config.json` with credentials; default `$DOCKER_CONFIG/config.json`
    /// or `~/.docker/config.json` when present.
    #[serde(default)]
    pub auth_file: Option<PathBuf>,
    /// Credentials by registry, besides the auth file.
    #[serde(default)]
    pub credentials: BTreeMap<String, Credentials>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// A pulled reference, remembered in the store.
#[derive(Debug, Serialize, Deserialize)]
struct Pulled {
    manifest_digest: String,
    config: String,
    layers: Vec<String>,
}

pub struct Registries {
    pub config: RegistryConfig,
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

fn default_auth_file() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Credentials for `registry` from a docker-style config file.
pub fn credentials_from_file(path: &Path, registry: &str) -> Result<Option<Credentials>, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let cfg: DockerConfig =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let wanted = [
        registry.to_string(),
        format!("https://{registry}"),
        format!("http://{registry}"),
        if registry == "index.docker.io" || registry == "docker.io" {
            "https://index.docker.io/v1/".to_string()
        } else {
            String::new()
        },
    ];
    let Some(entry) = wanted
        .iter()
        .filter(|w| !w.is_empty())
        .find_map(|w| cfg.auths.get(w))
    else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        }));
    }
    let Some(auth) = &entry.auth else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|e| format!("{}: auth of {registry}: {e}", path.display()))?;
    let decoded = String::from_utf8_lossy(&decoded).into_owned();
    let (u, p) = decoded.split_once(':').ok_or_else(|| {
        format!(
            "{}: auth of {registry} is not user:password",
            path.display()
        )
    })?;
    Ok(Some(Credentials {
        username: u.to_string(),
        password: p.to_string(),
    }))
}

impl Registries {
    fn auth(&self, registry: &str) -> Result<RegistryAuth, String> {
        if let Some(c) = self.config.credentials.get(registry) {
            return Ok(RegistryAuth::Basic(c.username.clone(), c.password.clone()));
        }
        let file = self.config.auth_file.clone().or_else(default_auth_file);
        if let Some(file) = file {
            if let Some(c) = credentials_from_file(&file, registry)? {
                return Ok(RegistryAuth::Basic(c.username, c.password));
            }
        }
        Ok(RegistryAuth::Anonymous)
    }

    fn remembered(store: &Store, reference: &str) -> PathBuf {
        store
            .root
            .join("pulled")
            .join(format!("{}.json", hex::encode(reference)))
    }

    fn fetched(store: &Store, pulled: Pulled, origin: String) -> Result<FetchedBase, String> {
        let oci: oci_spec::image::ImageConfiguration =
            serde_json::from_str(&pulled.config).map_err(|e| format!("image config: {e}"))?;
        let mut layers = Vec::new();
        for d in &pulled.layers {
            layers.push((d.clone(), store.blob_path(d).map_err(|e| e.to_string())?));
        }
        Ok(FetchedBase {
            manifest_digest: pulled.manifest_digest,
            config: ImageConfig::from_oci(&oci),
            onbuild: onbuild_of(pulled.config.as_bytes()),
            layers,
            origin,
        })
    }

    async fn pull(
        &self,
        reference: &Reference,
        store: &Store,
        platform: &Platform,
    ) -> Result<Pulled, String> {
        let registry = reference.resolve_registry().to_string();
        let want = platform.clone();
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.config.insecure.clone()),
            platform_resolver: Some(Box::new(move |entries: &[ImageIndexEntry]| {
                entries
                    .iter()
                    .find(|e| {
                        e.platform.as_ref().is_some_and(|p| {
                            want.matches(
                                &p.os.to_string(),
                                &p.architecture.to_string(),
                                p.variant.as_deref(),
                            )
                        })
                    })
                    .map(|e| e.digest.clone())
            })),
            ..ClientConfig::default()
        });
        let auth = self.auth(&registry)?;
        let (manifest, digest, config) = client
            .pull_manifest_and_config(reference, &auth)
            .await
            .map_err(|e| format!("pulling the manifest: {e}"))?;
        let mut layers = Vec::new();
        for layer in &manifest.layers {
            let dst = store.blob_path(&layer.digest).map_err(|e| e.to_string())?;
            if !dst.is_file() {
                let tmp = store.tmp_path("blob");
                let file = tokio::fs::File::create(&tmp)
                    .await
                    .map_err(|e| format!("{}: {e}", tmp.display()))?;
                let result = client.pull_blob(reference, layer, file).await;
                if let Err(e) = result {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(format!("pulling layer {}: {e}", layer.digest));
                }
                std::fs::rename(&tmp, &dst).map_err(|e| format!("{}: {e}", dst.display()))?;
            }
            layers.push(layer.digest.clone());
        }
        Ok(Pulled {
            manifest_digest: digest,
            config,
            layers,
        })
    }
}

impl BaseSource for Registries {
    fn fetch(
        &self,
        reference: &str,
        store: &Store,
        refresh: bool,
        platform: &crate::oci::Platform,
    ) -> Result<Option<FetchedBase>, String> {
        let parsed: Reference = reference
            .parse()
            .map_err(|e| format!("invalid image reference {reference:?}: {e}"))?;
        let whole = parsed.whole();
        let memo = Self::remembered(store, &format!("{whole} {platform}"));
        if !refresh {
            if let Ok(text) = std::fs::read(&memo) {
                if let Ok(pulled) = serde_json::from_slice::<Pulled>(&text) {
                    let complete = pulled
                        .layers
                        .iter()
                        .all(|d| store.blob_path(d).is_ok_and(|p| p.is_file()));
                    if complete {
                        return Self::fetched(store, pulled, format!("{whole} (pulled before)"))
                            .map(Some);
                    }
                }
            }
        }
        // oci-client is async: run it on a runtime of its own, on a thread of its own, so this
        // works from any caller (including a tokio blocking thread).
        let pulled = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("starting the registry client: {e}"))?;
                rt.block_on(self.pull(&parsed, store, platform))
            })
            .join()
            .unwrap_or_else(|_| Err("the registry client panicked".into()))
        })
        .map_err(|e| format!("{whole}: {e}"))?;
        if let Some(parent) = memo.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let data = serde_json::to_vec(&pulled).map_err(|e| e.to_string())?;
        let tmp = store.tmp_path("pulled");
        std::fs::write(&tmp, data)
            .and_then(|_| std::fs::rename(&tmp, &memo))
            .map_err(|e| format!("{}: {e}", memo.display()))?;
        Self::fetched(store, pulled, format!("{whole} from its registry")).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.json");
        std::fs::write(
            &f,
            r#"{"auths": {"127.0.0.1:5000": {"auth": "dXNlcjpwYSpzcw=="},
                          "https://other.example": {"username": "u2", "password": "p2"}}}"#,
        )
        .unwrap();
        assert_eq!(
            credentials_from_file(&f, "127.0.0.1:5000").unwrap(),
            Some(Credentials {
                username: "user".into(),
                password: "pa*ss".into()
            })
        );
        assert_eq!(
            credentials_from_file(&f, "other.example")
                .unwrap()
                .unwrap()
                .username,
            "u2"
        );
        assert_eq!(credentials_from_file(&f, "nope.example").unwrap(), None);
        assert_eq!(
            credentials_from_file(&dir.path().join("missing"), "x").unwrap(),
            None
        );
    }
}
