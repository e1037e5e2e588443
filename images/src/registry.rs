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
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};

use crate::config::ImageConfig;
use crate::oci::Platform;
use crate::source::{onbuild_of, BaseSource, FetchedBase, RegistryError};
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

/// A user name and password for one registry (basic auth, or exchanged for a bearer token).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password (or an access token).
    pub password: String,
}

/// A pulled reference, remembered in the store.
#[derive(Debug, Serialize, Deserialize)]
struct Pulled {
    manifest_digest: String,
    config: String,
    layers: Vec<String>,
}

/// The registries as a base source: the registry is the reference's host (Docker Hub when it
/// names none).
pub struct Registries {
    /// Insecure hosts and credentials.
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

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::File {
        path: path.to_path_buf(),
        source,
    }
}

fn default_auth_file() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Credentials for `registry` from a docker-style config file.
pub(crate) fn credentials_from_file(
    path: &Path,
    registry: &str,
) -> Result<Option<Credentials>, RegistryError> {
    let auth_file = |source: Box<dyn std::error::Error + Send + Sync>| RegistryError::AuthFile {
        path: path.to_path_buf(),
        source,
    };
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(auth_file(Box::new(e))),
    };
    let cfg: DockerConfig = serde_json::from_slice(&text).map_err(|e| auth_file(Box::new(e)))?;
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
        .map_err(|source| RegistryError::AuthBase64 {
            path: path.to_path_buf(),
            registry: registry.to_string(),
            source,
        })?;
    let decoded = String::from_utf8_lossy(&decoded).into_owned();
    let (u, p) = decoded
        .split_once(':')
        .ok_or_else(|| RegistryError::AuthNotUserPassword {
            path: path.to_path_buf(),
            registry: registry.to_string(),
        })?;
    Ok(Some(Credentials {
        username: u.to_string(),
        password: p.to_string(),
    }))
}

/// The credentials sent to a registry, and where they came from (for error messages).
struct Auth {
    auth: RegistryAuth,
    /// `credentials for HOST from FILE`, `no credentials (FILE has none for HOST)`, ...
    consulted: String,
}

impl Registries {
    fn auth(&self, registry: &str) -> Result<Auth, RegistryError> {
        if let Some(c) = self.config.credentials.get(registry) {
            return Ok(Auth {
                auth: RegistryAuth::Basic(c.username.clone(), c.password.clone()),
                consulted: format!(
                    "credentials for {registry} from the configuration (registries.credentials)"
                ),
            });
        }
        let Some(file) = self.config.auth_file.clone().or_else(default_auth_file) else {
            return Ok(Auth {
                auth: RegistryAuth::Anonymous,
                consulted: "no credentials (no auth file: registries.auth_file is unset, and \
                            neither DOCKER_CONFIG nor HOME is)"
                    .into(),
            });
        };
        let consulted = match credentials_from_file(&file, registry)? {
            Some(c) => {
                return Ok(Auth {
                    auth: RegistryAuth::Basic(c.username, c.password),
                    consulted: format!("credentials for {registry} from {}", file.display()),
                })
            }
            None if file.exists() => format!(
                "no credentials (the auth file {} has none for {registry})",
                file.display()
            ),
            None => format!(
                "no credentials (the auth file {} does not exist)",
                file.display()
            ),
        };
        Ok(Auth {
            auth: RegistryAuth::Anonymous,
            consulted,
        })
    }

    /// A registry error a user can act on: what `registry` answered for `image` (its
    /// repository and tag or digest there) while `doing` (`pulling the manifest`), and what to
    /// change. The caller names the reference as written in the Dockerfile.
    fn explain(
        &self,
        e: OciDistributionError,
        doing: &str,
        registry: &str,
        image: &str,
        auth: &Auth,
        platform: &Platform,
    ) -> RegistryError {
        let message = self.explanation(&e, doing, registry, image, auth, platform);
        RegistryError::Pull {
            message,
            source: Box::new(e),
        }
    }

    fn explanation(
        &self,
        e: &OciDistributionError,
        doing: &str,
        registry: &str,
        image: &str,
        auth: &Auth,
        platform: &Platform,
    ) -> String {
        use oci_client::errors::OciErrorCode;
        let insecure = self.config.insecure.iter().any(|h| h == registry);
        let status = match e {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => Some(401),
            OciDistributionError::ServerError { code, .. } => Some(*code),
            OciDistributionError::RegistryError { envelope, .. } => {
                envelope.errors.iter().find_map(|err| match err.code {
                    OciErrorCode::Unauthorized => Some(401),
                    OciErrorCode::Denied => Some(403),
                    OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound
                    | OciErrorCode::BlobUnknown => Some(404),
                    _ => None,
                })
            }
            _ => None,
        };
        let sent = &auth.consulted;
        match status {
            Some(401) => {
                let hint = match auth.auth {
                    RegistryAuth::Anonymous => format!(
                        "give credentials for {registry} in registries.auth_file \
                         (--registry-auth: a docker-style config.json) or \
                         registries.credentials"
                    ),
                    _ => "check them".to_string(),
                };
                format!(
                    "{doing}: Not authorized (401): {registry} refused {image}; sent {sent}: \
                     {hint}"
                )
            }
            Some(403) => {
                format!("{doing}: Forbidden (403): {registry} refused {image}; sent {sent}")
            }
            Some(404) => format!(
                "{doing}: Not found (404): {registry} has no {image} (no such repository, tag \
                 or digest, or not visible to these credentials); sent {sent}"
            ),
            _ => match e {
                OciDistributionError::RequestError(_)
                    if !insecure && speaks_plain_http(registry) =>
                {
                    format!(
                        "{registry} answers plain http, not https: to pull {image} over plain \
                         http, list {registry} in registries.insecure in the configuration \
                         (--insecure-registry {registry} for mistryd image build)"
                    )
                }
                OciDistributionError::RequestError(_) => format!(
                    "{doing}: cannot reach {registry} over {} for {image}: {}",
                    if insecure { "plain http" } else { "https" },
                    error_chain(e)
                ),
                OciDistributionError::ImageManifestNotFoundError(m)
                    if m.starts_with("no entry found") =>
                {
                    format!(
                        "{doing}: {image} on {registry} is an image index without an image for \
                         the platform {platform}"
                    )
                }
                _ => format!("{doing}: {registry}, {image}: {}", error_chain(e)),
            },
        }
    }

    fn remembered(store: &Store, reference: &str) -> PathBuf {
        store
            .root
            .join("pulled")
            .join(format!("{}.json", hex::encode(reference)))
    }

    fn fetched(
        store: &Store,
        pulled: Pulled,
        origin: String,
    ) -> Result<FetchedBase, RegistryError> {
        let oci: oci_spec::image::ImageConfiguration =
            serde_json::from_str(&pulled.config).map_err(RegistryError::ImageConfig)?;
        let mut layers = Vec::new();
        for d in &pulled.layers {
            layers.push((d.clone(), store.blob_path(d)?));
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
    ) -> Result<Pulled, RegistryError> {
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
        let image = match (reference.tag(), reference.digest()) {
            (_, Some(d)) => format!("{}@{d}", reference.repository()),
            (Some(t), None) => format!("{}:{t}", reference.repository()),
            (None, None) => reference.repository().to_string(),
        };
        let (manifest, digest, config) = client
            .pull_manifest_and_config(reference, &auth.auth)
            .await
            .map_err(|e| {
                self.explain(
                    e,
                    "pulling the manifest",
                    &registry,
                    &image,
                    &auth,
                    platform,
                )
            })?;
        let mut layers = Vec::new();
        for layer in &manifest.layers {
            let dst = store.blob_path(&layer.digest)?;
            if !dst.is_file() {
                let tmp = store.tmp_path("blob");
                let file = tokio::fs::File::create(&tmp)
                    .await
                    .map_err(file_err(&tmp))?;
                let result = client.pull_blob(reference, layer, file).await;
                if let Err(e) = result {
                    let _ = std::fs::remove_file(&tmp);
                    let doing = format!("pulling layer {}", layer.digest);
                    return Err(self.explain(e, &doing, &registry, &image, &auth, platform));
                }
                std::fs::rename(&tmp, &dst).map_err(file_err(&dst))?;
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
    ) -> Result<Option<FetchedBase>, crate::source::SourceError> {
        let parsed: Reference = reference
            .parse()
            .map_err(|source| RegistryError::Reference {
                reference: reference.to_string(),
                source,
            })?;
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
                        return Ok(Some(Self::fetched(
                            store,
                            pulled,
                            format!("{whole} (pulled before)"),
                        )?));
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
                    .map_err(RegistryError::Runtime)?;
                rt.block_on(self.pull(&parsed, store, platform))
            })
            .join()
            .unwrap_or(Err(RegistryError::Panicked))
        })
        // The caller names the reference (`base image REF: ...`); the message names the
        // registry and the repository there.
        ?;
        if let Some(parent) = memo.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let data = serde_json::to_vec(&pulled).map_err(RegistryError::Json)?;
        let tmp = store.tmp_path("pulled");
        std::fs::write(&tmp, data)
            .and_then(|_| std::fs::rename(&tmp, &memo))
            .map_err(file_err(&memo))?;
        Ok(Some(Self::fetched(
            store,
            pulled,
            format!("{whole} from its registry"),
        )?))
    }
}

/// An error and its causes (`reqwest`'s own message hides them: `error sending request for
/// url (...)`), each once.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = c.source();
    }
    parts.join(": ")
}

/// Whether `registry` (`host[:port]`, port 443 when none) answers a plain http request: an
/// https connection to it failed, and this says why in words a user can act on.
fn speaks_plain_http(registry: &str) -> bool {
    use std::io::{Read, Write};
    use std::net::{TcpStream, ToSocketAddrs};
    use std::time::Duration;
    let has_port = registry
        .rsplit_once(':')
        .is_some_and(|(host, port)| port.parse::<u16>().is_ok() && !host.ends_with(':'));
    let addr = if has_port {
        registry.to_string()
    } else {
        format!("{registry}:443")
    };
    let Some(sock) = addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return false;
    };
    let timeout = Duration::from_secs(3);
    let Ok(mut conn) = TcpStream::connect_timeout(&sock, timeout) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(timeout));
    let _ = conn.set_write_timeout(Some(timeout));
    let request = format!("GET /v2/ HTTP/1.0\r\nHost: {registry}\r\n\r\n");
    let mut head = [0u8; 5];
    conn.write_all(request.as_bytes()).is_ok()
        && conn.read_exact(&mut head).is_ok()
        && &head == b"HTTP/"
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
