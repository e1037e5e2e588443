//! The server's configuration file: mistry's keys plus ours.
//!
//! ```json
//! {
//!   "projects_path": "/var/lib/mistry/projects",   // required, must exist
//!   "build_path": "/var/lib/mistry/data",          // required, must exist and be writable
//!   "mounts": {"/host/path": "/path/in/job"},      // bind-mounted into every job
//!   "job_concurrency": 2,                          // default: logical CPUs
//!   "job_backlog": 4,                              // default: 2 × concurrency
//!   "images_path": "/var/lib/mistry/images",       // local base images (OCI layouts)
//!   "store_path": "/var/lib/mistry/data/.mistry",  // layer store; default <build_path>/.mistry
//!   "filesystem": "btrfs",                         // plain | btrfs; default: detected
//!   "network": "host",                             // host (default, as mistry) | none
//!   "time_limit": "30m",                           // per job, Go syntax; default: none
//!   "registries": {"insecure": [], "auth_file": null, "credentials": {}},
//!   "projects": {"NAME": {"network": "none", "time_limit": "5m"}},
//!   "seccomp": "default", "nested_user_namespaces": false, "sandbox_ids": "auto",
//!   "limits": {"processes": 1024, "memory": "8GiB", "open_files": 65536, "disk": "20GiB"}
//! }
//! ```
//!
//! A project may also carry its own settings in `<project>/.mistry.json`
//! (`{"network": ..., "time_limit": ..., "build_args": {...}, "limits": {...}}`). Its author is
//! not trusted, so it can only tighten what the operator allows: `network: "none"`, a shorter
//! time limit, lower limits (see [`crate::security`]). The server configuration's `projects`
//! entry sets anything for its project. Unknown keys are ignored, as mistry does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::security::{self, RawLimits, SandboxIds, Security};
use anyhow::{bail, Context, Result};
use images::registry::RegistryConfig;
use images::store::BackendKind;
use sandbox::NetworkMode;
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProjectSettings {
    pub network: Option<String>,
    pub time_limit: Option<String>,
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    pub seccomp: Option<String>,
    pub nested_user_namespaces: Option<bool>,
    #[serde(default)]
    pub limits: RawLimits,
}

#[derive(Debug, Clone, Deserialize)]
struct Raw {
    projects_path: Option<PathBuf>,
    build_path: Option<PathBuf>,
    #[serde(default)]
    mounts: BTreeMap<PathBuf, PathBuf>,
    job_concurrency: Option<usize>,
    job_backlog: Option<usize>,
    images_path: Option<PathBuf>,
    store_path: Option<PathBuf>,
    filesystem: Option<String>,
    network: Option<String>,
    time_limit: Option<String>,
    #[serde(default)]
    registries: RegistryConfig,
    #[serde(default)]
    projects: BTreeMap<String, ProjectSettings>,
    seccomp: Option<String>,
    nested_user_namespaces: Option<bool>,
    #[serde(default)]
    limits: RawLimits,
    sandbox_ids: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub projects_path: PathBuf,
    pub build_path: PathBuf,
    pub mounts: Vec<(PathBuf, PathBuf)>,
    pub job_concurrency: usize,
    pub job_backlog: usize,
    pub images_path: Option<PathBuf>,
    pub store_path: PathBuf,
    pub filesystem: Option<BackendKind>,
    pub network: NetworkMode,
    pub time_limit: Option<Duration>,
    pub registries: RegistryConfig,
    pub projects: BTreeMap<String, ProjectSettings>,
    /// Seccomp, nested user namespaces and limits of every job and RUN step (server-wide).
    pub security: Security,
    /// How sandbox ids map onto the host (`--sandbox-ids` overrides).
    pub sandbox_ids: SandboxIds,
    /// The configuration file's directory (relative seccomp profiles are found there).
    pub base_dir: PathBuf,
    /// Where the daemon listens (set at start, not from the file): `ADD <url>` never connects
    /// there.
    pub listen: Vec<std::net::SocketAddr>,
}

/// Settings in effect for one project.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    pub network: NetworkMode,
    pub time_limit: Option<Duration>,
    pub build_args: Vec<(String, String)>,
    pub security: Security,
}

fn parse_network(s: &str, what: &str) -> Result<NetworkMode> {
    s.parse::<NetworkMode>()
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

fn parse_limit(s: &str, what: &str) -> Result<Duration> {
    crate::duration::parse(s).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

impl Config {
    /// Parse and validate the configuration text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &Path) -> Result<Config> {
        let raw: Raw =
            serde_json::from_str(text).with_context(|| format!("parsing {}", origin.display()))?;
        let projects_path = raw
            .projects_path
            .with_context(|| format!("{}: projects_path is required", origin.display()))?;
        let build_path = raw
            .build_path
            .with_context(|| format!("{}: build_path is required", origin.display()))?;
        if !projects_path.is_dir() {
            bail!(
                "projects_path {} does not exist or is not a directory",
                projects_path.display()
            );
        }
        if !build_path.is_dir() {
            bail!(
                "build_path {} does not exist or is not a directory",
                build_path.display()
            );
        }
        let probe = build_path.join(format!(".mistry-write-test-{}", std::process::id()));
        std::fs::write(&probe, b"")
            .with_context(|| format!("build_path {} is not writable", build_path.display()))?;
        let _ = std::fs::remove_file(&probe);
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let job_concurrency = raw.job_concurrency.unwrap_or(cpus);
        if job_concurrency == 0 {
            bail!("job_concurrency must be at least 1");
        }
        let build_path = build_path
            .canonicalize()
            .with_context(|| format!("build_path {}", build_path.display()))?;
        let store_path = raw.store_path.unwrap_or_else(|| build_path.join(".mistry"));
        let filesystem = match raw.filesystem.as_deref() {
            None => None,
            Some(f) => Some(
                f.parse::<BackendKind>()
                    .map_err(|e| anyhow::anyhow!("filesystem: {e}"))?,
            ),
        };
        let base_dir = origin
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let defaults = Security::default();
        let security = Security {
            seccomp: match raw.seccomp.as_deref() {
                Some(s) => security::parse_seccomp(s, &base_dir, "seccomp")?,
                None => defaults.seccomp,
            },
            nested_user_namespaces: raw
                .nested_user_namespaces
                .unwrap_or(defaults.nested_user_namespaces),
            limits: defaults.limits.apply(&raw.limits, "limits", false)?,
        };
        for (name, p) in &raw.projects {
            if let Some(n) = &p.network {
                parse_network(n, &format!("projects.{name}.network"))?;
            }
            if let Some(t) = &p.time_limit {
                parse_limit(t, &format!("projects.{name}.time_limit"))?;
            }
            project_security(&security, p, &base_dir, &format!("projects.{name}"))?;
        }
        let sandbox_ids = match raw.sandbox_ids.as_deref() {
            Some(s) => s
                .parse::<SandboxIds>()
                .map_err(|e| anyhow::anyhow!("sandbox_ids: {e}"))?,
            None => SandboxIds::Auto,
        };
        Ok(Config {
            projects_path: projects_path
                .canonicalize()
                .with_context(|| format!("projects_path {}", projects_path.display()))?,
            build_path,
            mounts: raw.mounts.into_iter().collect(),
            job_concurrency,
            job_backlog: raw.job_backlog.unwrap_or(2 * job_concurrency),
            images_path: raw.images_path,
            store_path,
            filesystem,
            network: match raw.network.as_deref() {
                Some(n) => parse_network(n, "network")?,
                None => NetworkMode::Host,
            },
            time_limit: match raw.time_limit.as_deref() {
                Some(t) => Some(parse_limit(t, "time_limit")?),
                None => None,
            },
            registries: raw.registries,
            projects: raw.projects,
            security,
            sandbox_ids,
            base_dir,
            listen: Vec::new(),
        })
    }

    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Config::parse(&text, path)
    }

    /// The settings of `project`: the project's `.mistry.json`, then the server configuration.
    pub fn effective(&self, project: &str) -> Result<Effective> {
        let file = self.projects_path.join(project).join(".mistry.json");
        let own: ProjectSettings = match read_project_file(&file)? {
            Some(t) => {
                serde_json::from_slice(&t).with_context(|| format!("parsing {}", file.display()))?
            }
            None => ProjectSettings::default(),
        };
        let server = self.projects.get(project).cloned().unwrap_or_default();
        // The operator's word (the server's entry for the project, else the server-wide value)...
        let mut network = match &server.network {
            Some(n) => parse_network(n, &format!("network of project {project}"))?,
            None => self.network,
        };
        let mut time_limit = match &server.time_limit {
            Some(t) => Some(parse_limit(t, &format!("time_limit of project {project}"))?),
            None => self.time_limit,
        };
        let mut security = project_security(
            &self.security,
            &server,
            &self.base_dir,
            &format!("projects.{project}"),
        )?;
        // ... which the project's own file can only tighten.
        let origin = file.display();
        if let Some(n) = &own.network {
            if parse_network(n, &format!("{origin}: network"))? == NetworkMode::None {
                network = NetworkMode::None;
            }
        }
        if let Some(t) = &own.time_limit {
            let t = parse_limit(t, &format!("{origin}: time_limit"))?;
            time_limit = Some(time_limit.map_or(t, |cur| cur.min(t)));
        }
        security.limits = security
            .limits
            .apply(&own.limits, &format!("{origin}: limits"), true)?;
        let mut build_args: BTreeMap<String, String> = own.build_args;
        build_args.extend(server.build_args);
        Ok(Effective {
            network,
            time_limit,
            build_args: build_args.into_iter().collect(),
            security,
        })
    }
}

/// The most a project's `.mistry.json` may hold.
const MAX_PROJECT_FILE: u64 = 64 << 10;

/// Read a project's own settings file (written by its untrusted author): a regular file, not a
/// link, of at most 64 KiB; opened without blocking (a FIFO cannot hang the job). `None` when
/// there is none.
fn read_project_file(file: &Path) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(file)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", file.display())),
    };
    let meta = f
        .metadata()
        .with_context(|| format!("opening {}", file.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", file.display());
    }
    let mut text = Vec::new();
    f.take(MAX_PROJECT_FILE + 1)
        .read_to_end(&mut text)
        .with_context(|| format!("reading {}", file.display()))?;
    if text.len() as u64 > MAX_PROJECT_FILE {
        bail!(
            "{} is larger than {} KiB",
            file.display(),
            MAX_PROJECT_FILE >> 10
        );
    }
    Ok(Some(text))
}

/// The security settings of a project's entry in the server configuration over the server's.
fn project_security(
    server: &Security,
    p: &ProjectSettings,
    base: &Path,
    what: &str,
) -> Result<Security> {
    Ok(Security {
        seccomp: match &p.seccomp {
            Some(s) => security::parse_seccomp(s, base, &format!("{what}.seccomp"))?,
            None => server.seccomp.clone(),
        },
        nested_user_namespaces: p
            .nested_user_namespaces
            .unwrap_or(server.nested_user_namespaces),
        limits: server
            .limits
            .apply(&p.limits, &format!("{what}.limits"), false)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_configuration_parses() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = (dir.path().join("p"), dir.path().join("b"));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.sample.json"))
                .unwrap()
                .replace("/var/lib/mistry/projects", p.to_str().unwrap())
                .replace("\"/var/lib/mistry/data\"", &format!("\"{}\"", b.display()));
        let c = Config::parse(&text, Path::new("config.sample.json")).unwrap();
        assert_eq!(c.filesystem, Some(BackendKind::Btrfs));
        assert_eq!(c.time_limit, Some(Duration::from_secs(1800)));
        assert_eq!(c.registries.insecure, ["127.0.0.1:5000"]);
        assert_eq!(
            c.registries.credentials["registry.example.com"].username,
            "mistry"
        );
        let e = c.effective("yarn").unwrap();
        assert_eq!(
            (e.time_limit, e.build_args.len()),
            (Some(Duration::from_secs(900)), 1)
        );
        assert_eq!(c.sandbox_ids, SandboxIds::Auto);
        assert_eq!(c.security.seccomp, sandbox::Seccomp::Default);
        assert_eq!(
            e.security.limits,
            crate::security::JobLimits {
                processes: Some(1024),
                memory: Some(8 << 30),
                open_files: Some(65536),
                disk: Some(20 << 30),
                memory_configured: true,
            }
        );
        let e = c.effective("rootless-podman").unwrap();
        assert!(e.security.nested_user_namespaces);
        assert_eq!(e.security.limits.processes, Some(4096));
        assert_eq!(e.security.limits.memory, Some(8 << 30));
    }

    #[test]
    fn a_project_file_only_tightens_the_operators_settings() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("projects");
        let b = dir.path().join("builds");
        std::fs::create_dir_all(p.join("web")).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let text = format!(
            r#"{{"projects_path": "{}", "build_path": "{}", "network": "none",
                "time_limit": "10m", "limits": {{"processes": 200, "memory": "1GiB"}}}}"#,
            p.display(),
            b.display()
        );
        let c = Config::parse(&text, Path::new("config.json")).unwrap();
        std::fs::write(
            p.join("web/.mistry.json"),
            r#"{"network": "host", "time_limit": "5h", "seccomp": "unconfined",
                "nested_user_namespaces": true,
                "limits": {"processes": 100000, "memory": "unlimited", "disk": "1GiB"}}"#,
        )
        .unwrap();
        let e = c.effective("web").unwrap();
        assert_eq!(e.network, NetworkMode::None);
        assert_eq!(e.time_limit, Some(Duration::from_secs(600)));
        assert_eq!(e.security.seccomp, sandbox::Seccomp::Default);
        assert!(!e.security.nested_user_namespaces);
        assert_eq!(
            (
                e.security.limits.processes,
                e.security.limits.memory,
                e.security.limits.disk
            ),
            (Some(200), Some(1 << 30), Some(1 << 30))
        );
        std::fs::write(
            p.join("web/.mistry.json"),
            r#"{"time_limit": "1m", "limits": {"processes": 50}}"#,
        )
        .unwrap();
        let e = c.effective("web").unwrap();
        assert_eq!(e.time_limit, Some(Duration::from_secs(60)));
        assert_eq!(e.security.limits.processes, Some(50));

        // The file is the project author's: no link, no FIFO, no endless file.
        let file = p.join("web/.mistry.json");
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &file).unwrap();
        let e = c.effective("web").unwrap_err();
        assert!(
            format!("{e:#}").starts_with(&format!("opening {}: ", file.display())),
            "{e:#}"
        );
        std::fs::remove_file(&file).unwrap();
        nix::unistd::mkfifo(&file, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let e = c.effective("web").unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!("{} is not a regular file", file.display())
        );
        std::fs::remove_file(&file).unwrap();
        std::fs::write(&file, vec![b' '; 70_000]).unwrap();
        let e = c.effective("web").unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!("{} is larger than 64 KiB", file.display())
        );

        let bad = format!(
            r#"{{"projects_path": "{}", "build_path": "{}", "sandbox_ids": "host"}}"#,
            p.display(),
            b.display()
        );
        let e = Config::parse(&bad, Path::new("c.json")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sandbox_ids: unknown sandbox ids \"host\" (expected auto or subordinate)"
        );
    }

    #[test]
    fn defaults_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("projects");
        let b = dir.path().join("builds");
        std::fs::create_dir_all(p.join("web")).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let text = format!(
            r#"{{"projects_path": "{}", "build_path": "{}", "job_concurrency": 3, "unknown": 1,
                "projects": {{"web": {{"network": "none", "time_limit": "90s"}}}}}}"#,
            p.display(),
            b.display()
        );
        let c = Config::parse(&text, Path::new("config.json")).unwrap();
        assert_eq!((c.job_concurrency, c.job_backlog), (3, 6));
        assert_eq!(c.network, NetworkMode::Host);
        assert_eq!(c.store_path, b.canonicalize().unwrap().join(".mistry"));
        let e = c.effective("web").unwrap();
        assert_eq!(
            (e.network, e.time_limit),
            (NetworkMode::None, Some(Duration::from_secs(90)))
        );
        std::fs::write(
            p.join("web/.mistry.json"),
            r#"{"network": "host", "build_args": {"A": "1"}}"#,
        )
        .unwrap();
        let e = c.effective("web").unwrap();
        assert_eq!(e.network, NetworkMode::None, "the server's config wins");
        assert_eq!(e.build_args, vec![("A".to_string(), "1".to_string())]);

        let missing = format!(r#"{{"build_path": "{}"}}"#, b.display());
        let e = Config::parse(&missing, Path::new("c.json")).unwrap_err();
        assert_eq!(e.to_string(), "c.json: projects_path is required");
        let bad = format!(
            r#"{{"projects_path": "{}", "build_path": "/nonexistent"}}"#,
            p.display()
        );
        let e = Config::parse(&bad, Path::new("c.json")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "build_path /nonexistent does not exist or is not a directory"
        );
        let bad = format!(
            r#"{{"projects_path": "{}", "build_path": "{}", "time_limit": "soon"}}"#,
            p.display(),
            b.display()
        );
        let e = Config::parse(&bad, Path::new("c.json")).unwrap_err();
        assert!(
            e.to_string().starts_with("time_limit: invalid duration"),
            "{e}"
        );
    }
}
