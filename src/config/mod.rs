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
//!   "filesystem": "overlay",                       // plain | btrfs | overlay; default: detected
//!   "network": "isolated",                         // isolated (default) | none | host
//!   "network_deny": ["10.0.0.0/8"],                // isolated: more networks jobs may not reach
//!   "time_limit": "30m",                           // per job, Go syntax; default: none
//!   "registries": {"insecure": [], "auth_file": null, "credentials": {}},
//!   "projects": {"NAME": {"network": "none", "time_limit": "5m"}},
//!   "seccomp": "default", "nested_user_namespaces": false, "sandbox_ids": "auto",
//!   "secrets": {"npm_token": "/etc/mistry/npm_token"},   // RUN --mount=type=secret
//!   "limits": {"processes": 1024, "memory": "8GiB", "open_files": 65536, "disk": "20GiB",
//!              "log": "64MiB", "tmpfs": "64MiB"},
//!   "retention": {"keep": 10, "max_age": "14d", "min_free": "10%", "interval": "10m"},
//!   "cache_layers": 8,                             // overlay: squash a group's cache deeper than this
//!   "database_url": "postgres://mistry@127.0.0.1/mistry",  // several agents (src/cluster)
//!   "agent_name": "build1",                        // default: the host name
//!   "advertise_url": "http://build1:8462",         // default: http://<listen address>
//!   "agent_timeout": "30s", "heartbeat": "5s",     // an agent is dead after agent_timeout
//!   "log_retention": "30d",                        // several agents: default keep (below)
//!   "tokens": [], "tokens_file": "tokens.json",    // access control (crate::access,
//!   "allow": [], "cluster_token_file": "ct"        //   docs/access.md); off by default
//! }
//! ```
//!
//! `log_retention` (a Go duration or whole days, `30d`; several agents only): the central logs
//! (table `job_logs`) and the records (table `jobs`) of jobs that ended longer ago than this are
//! deleted, checked every half of it (at least every 10 minutes); a job queued or running keeps
//! its log. Without it they are kept. Builds on disk follow `retention`, not this.
//!
//! `database_url` may also come from the environment variable `MISTRY_DATABASE_URL`, which wins
//! over the file when set and not empty ([`Config::load`]): the database password can stay out
//! of the configuration file, and one file serves agents pointed at different databases.
//! Without either, mistryd is a single node and no database code runs.
//!
//! `network` (server-wide, or per project in `projects`): what jobs and RUN steps reach.
//! `isolated` (the default): a network namespace of their own with outbound access through
//! slirp4netns, where the host's loopback and every address of the host (the daemon's API, the
//! cluster's database, any service bound to `0.0.0.0`), link-local addresses (cloud metadata),
//! the cluster's database host and other agents, and the networks of `network_deny` (CIDRs) are
//! unreachable; `ADD <url>` refuses the same destinations. `none`: loopback only. `host`: the
//! host's network, everything the host reaches (mistry's own behaviour, and this daemon's
//! default before `isolated` existed: a configuration that says `"network": "host"` keeps it —
//! it is the operator's explicit choice —, one that says nothing now gets `isolated`).
//!
//! A project may also carry its own settings in `<project>/.mistry.json`
//! (`{"network": ..., "time_limit": ..., "build_args": {...}, "limits": {...}}`). Its author is
//! not trusted, so it can only tighten what the operator allows: a narrower network
//! (none < isolated < host), a shorter time limit, lower limits (see [`crate::security`]). The
//! server configuration's `projects` entry sets anything for its project (`"network": "host"`
//! for the one project that must reach the host). Unknown keys are ignored, as mistry does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::security::{self, RawLimits, SandboxIds, Security};
use anyhow::{bail, Context, Result};
use images::{BackendKind, RegistryConfig};
use project::project_security;
use sandbox::NetworkMode;
use serde::Deserialize;

pub mod cluster;
mod project;
mod retention;
mod secrets;
mod strict;

pub use project::{Effective, ProjectSettings};
pub use retention::{human_bytes, parse_age, parse_min_free, MinFree, Retention};
pub use secrets::Secret;

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
    #[serde(default)]
    network_deny: Vec<String>,
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
    #[serde(default)]
    secrets: BTreeMap<String, secrets::RawSecret>,
    #[serde(default)]
    retention: retention::RawRetention,
    cache_layers: Option<usize>,
    // The cluster's (`cluster::RawSettings`) and access control's (`access::RawAccess`) keys
    // are read from the same text by their own structs: with no `flatten` here, the keys of
    // each are known to serde (strict.rs).
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `projects_path` (required, must exist), canonicalized: one directory per project.
    pub projects_path: PathBuf,
    /// `build_path` (required, must exist and be writable), canonicalized: every build result.
    pub build_path: PathBuf,
    /// `mounts`: (host path, path inside) bound into every job.
    pub mounts: Vec<(PathBuf, PathBuf)>,
    /// `job_concurrency`: jobs running at once; default the number of logical CPUs, at least 1.
    pub job_concurrency: usize,
    /// `job_backlog`: queued jobs beyond which requests get 503; default 2 × `job_concurrency`.
    pub job_backlog: usize,
    /// `images_path`: a directory of OCI layouts `FROM` finds before any registry; `None`:
    /// registries only.
    pub images_path: Option<PathBuf>,
    /// `store_path`: the layer store; default `<build_path>/.mistry`.
    pub store_path: PathBuf,
    /// `filesystem` (`plain`, `btrfs`, `overlay`): the store's backend; `None`: the one the
    /// store was made with, or the best that works (see `images::Store::open`).
    pub filesystem: Option<BackendKind>,
    /// `network`: the server-wide network of jobs and RUN steps; default `isolated`.
    pub network: NetworkMode,
    /// More networks isolated jobs, RUN steps and `ADD <url>` may not reach (`network_deny`).
    pub network_deny: Vec<sandbox::egress::IpNet>,
    /// `time_limit`: a Go duration each job (image build included) must end within; `None`:
    /// no limit.
    pub time_limit: Option<Duration>,
    /// `registries`: insecure registries and credentials for base images.
    pub registries: RegistryConfig,
    /// `projects`: the operator's settings per project name (they may loosen what the
    /// project's own `.mistry.json` can only tighten).
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
    /// What `RUN --mount=type=secret` may read: id → file, and which projects may (`secrets`).
    pub secrets: BTreeMap<String, Secret>,
    /// What the daemon keeps of its build results (`retention`).
    pub retention: Retention,
    /// Where overlays work on `build_path`: how many cache layers a group's build may sit on
    /// before its cache is squashed into one (`cache_layers`, default 8; 0: copy the cache).
    pub cache_layers: usize,
    /// Several agents around one database (`database_url`, `agent_name`, `advertise_url`,
    /// `agent_timeout`, `heartbeat`).
    pub cluster: cluster::Settings,
    /// Who may read, build and administer which project (`tokens`, `tokens_file`, `allow`,
    /// `cluster_token_file`; [`crate::access`]); off by default.
    pub access: std::sync::Arc<crate::access::Policy>,
    /// The raw access settings (`mistryd token` edits the tokens file they name).
    pub raw_access: crate::access::RawAccess,
}

/// The default of `cache_layers`.
pub const DEFAULT_CACHE_LAYERS: usize = 8;

pub(crate) fn parse_network(s: &str, what: &str) -> Result<NetworkMode> {
    s.parse::<NetworkMode>()
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

/// A `network_deny` entry: a CIDR (`10.0.0.0/8`, `fd00::/8`) or one address.
pub(crate) fn parse_net(s: &str, what: &str) -> Result<sandbox::egress::IpNet> {
    let s = s.trim();
    if let Ok(net) = s.parse::<sandbox::egress::IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<std::net::IpAddr>()
        .map(sandbox::egress::IpNet::from)
        .map_err(|_| anyhow::anyhow!("{what}: {s:?} is not a network (10.0.0.0/8) or an address"))
}

pub(crate) fn parse_limit(s: &str, what: &str) -> Result<Duration> {
    crate::duration::parse(s).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

impl Config {
    /// Isolated networks of this process (`security::stop_networks` ends them): the egress policy (the operator's `network_deny`; the
    /// cluster adds its addresses, `Cluster::start_egress`) and, for the daemon (`pool`), namespaces
    /// made ahead when the server-wide network or a project's entry is `isolated` (else each
    /// isolated sandbox makes its own, ~10 ms).
    pub fn set_up_networks(&self, pool: bool) {
        sandbox::set_egress_policy(std::sync::Arc::new(sandbox::EgressPolicy::new(
            self.network_deny.clone(),
        )));
        let isolated = self.network == sandbox::NetworkMode::Isolated
            || self
                .projects
                .values()
                .any(|p| p.network.as_deref() == Some("isolated"));
        if pool && isolated {
            sandbox::configure_isolated_networks(security::network_pool_size(self.job_concurrency));
        }
    }

    /// Parse and validate the configuration text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &Path) -> Result<Config> {
        let raw: Raw =
            serde_json::from_str(text).with_context(|| format!("parsing {}", origin.display()))?;
        let raw_cluster: cluster::RawSettings =
            serde_json::from_str(text).with_context(|| format!("parsing {}", origin.display()))?;
        let raw_access: crate::access::RawAccess =
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
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
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
        let mut defaults = Security::default();
        defaults.limits.disk = Some(security::default_disk(&build_path));
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
        let retention = Retention::parse(&raw.retention)?;
        let secret_map = secrets::parse(&raw.secrets, &base_dir)?;
        let cluster = cluster::Settings::parse(&raw_cluster)?;
        let access = crate::access::Access::parse(&raw_access, &base_dir)?;
        let access = std::sync::Arc::new(crate::access::Policy::new(
            access,
            raw_access.clone(),
            base_dir.clone(),
        ));
        Ok(Config {
            projects_path: projects_path
                .canonicalize()
                .with_context(|| format!("projects_path {}", projects_path.display()))?,
            build_path,
            mounts: raw.mounts.into_iter().collect(),
            job_concurrency,
            job_backlog: raw.job_backlog.unwrap_or(2 * job_concurrency),
            cache_layers: raw.cache_layers.unwrap_or(DEFAULT_CACHE_LAYERS),
            images_path: raw.images_path,
            store_path,
            filesystem,
            network: match raw.network.as_deref() {
                Some(n) => parse_network(n, "network")?,
                None => NetworkMode::Isolated,
            },
            network_deny: raw
                .network_deny
                .iter()
                .map(|n| parse_net(n, "network_deny"))
                .collect::<Result<_>>()?,
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
            secrets: secret_map,
            retention,
            cluster,
            access,
            raw_access,
        })
    }

    /// The daemon's configuration file at `path` for a run on this machine (`mistry exec
    /// --config`): the daemon's own parser and checks, and `local` (the run's projects
    /// directory, state directory...) set over the file's keys before they are checked. Unlike
    /// the daemon, keys that nothing reads are refused, so that a misspelt setting cannot make
    /// the local run differ from the server's. Every error names the file.
    pub fn load_for_local_run(path: &Path, local: &serde_json::Value) -> Result<Config> {
        let what = || format!("--config {}", path.display());
        let text = std::fs::read_to_string(path).with_context(what)?;
        let mut v: serde_json::Value = serde_json::from_str(&text).with_context(what)?;
        let Some(obj) = v.as_object_mut() else {
            bail!("{}: not a JSON object", what());
        };
        let unknown = strict::unknown_keys(&serde_json::Value::Object(obj.clone()));
        if !unknown.is_empty() {
            bail!(
                "{}: unknown setting{} {} (the daemon ignores what it does not know; a local run \
                 refuses it)",
                what(),
                if unknown.len() == 1 { "" } else { "s" },
                unknown.join(", ")
            );
        }
        if let Some(local) = local.as_object() {
            for (k, val) in local {
                if val.is_null() {
                    obj.remove(k);
                } else {
                    obj.insert(k.clone(), val.clone());
                }
            }
        }
        Config::parse(&v.to_string(), path).with_context(what)
    }

    /// Read, parse and validate the configuration file at `path`, then apply the environment
    /// (`MISTRY_DATABASE_URL`). Errors name the file or the key.
    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut cfg = Config::parse(&text, path)?;
        cfg.cluster.apply_env();
        if cfg.access.enabled()
            && cfg.cluster.database_url.is_some()
            && !cfg.access.has_cluster_token()
        {
            bail!(
                "{}: tokens or allow rules with a database_url need cluster_token_file: agents \
                 fetch builds from each other with it (docs/access.md)",
                path.display()
            );
        }
        cfg.check_allow_rules(&sandbox::egress::HostFacts::read().addrs)
            .with_context(|| path.display().to_string())?;
        Ok(cfg)
    }

    /// An `allow` rule that covers loopback or one of this host's addresses (`host_addrs`)
    /// grants its scopes to every local user, and to every job with `network: host`: refused
    /// when the configuration lets any project's jobs use the host's network (a project's code
    /// would get the rule's scopes on every project it covers), else a warning at start.
    pub fn check_allow_rules(&self, host_addrs: &[std::net::IpAddr]) -> Result<()> {
        let covering = self.access.rules_covering_host(host_addrs);
        if covering.is_empty() {
            return Ok(());
        }
        let host_network = self.network == NetworkMode::Host
            || self
                .projects
                .values()
                .any(|p| p.network.as_deref() == Some("host"));
        for (rule, ip) in &covering {
            if host_network {
                bail!(
                    "{rule} covers {ip}, an address of this host, and jobs may use the host's \
                     network (network: host): their code would get the rule's scopes; narrow \
                     the rule, or give those projects network isolated (docs/access.md)"
                );
            }
            tracing::warn!(target: "audit", %rule, %ip, "an allow rule covers an address of this host: every local user gets its scopes (docs/access.md)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding 5: an allow rule covering this host is refused when jobs may use the
    /// host's network (their code sends from the host's addresses), else only warned about.
    #[test]
    fn allow_rules_covering_the_host_are_refused_with_host_networks() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = (dir.path().join("p"), dir.path().join("b"));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let cfg = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"projects_path": p, "build_path": b,
                "allow": [{"from": "10.0.0.0/8", "scopes": ["build"], "projects": ["*"]}]});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            Config::parse(&v.to_string(), Path::new("config.json")).unwrap()
        };
        let host: Vec<std::net::IpAddr> = vec!["10.1.2.3".parse().unwrap()];
        let other: Vec<std::net::IpAddr> = vec!["192.168.7.7".parse().unwrap()];
        let refusal = "allow[0] (10.0.0.0/8) covers 10.1.2.3, an address of this host, and jobs \
                       may use the host's network (network: host): their code would get the \
                       rule's scopes; narrow the rule, or give those projects network isolated \
                       (docs/access.md)";
        let c = cfg(serde_json::json!({"network": "host"}));
        assert_eq!(c.check_allow_rules(&host).unwrap_err().to_string(), refusal);
        assert!(c.check_allow_rules(&other).is_ok());
        let c = cfg(serde_json::json!({"projects": {"x": {"network": "host"}}}));
        assert_eq!(c.check_allow_rules(&host).unwrap_err().to_string(), refusal);
        // No job on the host's network: a warning (every local user gets the scopes).
        assert!(cfg(serde_json::json!({})).check_allow_rules(&host).is_ok());
    }

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
        assert_eq!(
            c.filesystem, None,
            "the sample leaves the backend to detection"
        );
        assert_eq!(c.time_limit, Some(Duration::from_secs(1800)));
        assert_eq!(c.cache_layers, DEFAULT_CACHE_LAYERS);
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
        assert_eq!(c.network, NetworkMode::Isolated);
        assert_eq!(c.network_deny, ["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(c.effective("yarn").unwrap().network, NetworkMode::Host);
        assert_eq!(c.security.seccomp, sandbox::Seccomp::Default);
        assert_eq!(
            e.security.limits,
            crate::security::JobLimits {
                processes: Some(1024),
                memory: Some(8 << 30),
                open_files: Some(65536),
                disk: Some(20 << 30),
                log: Some(64 << 20),
                tmpfs: Some(64 << 20),
                memory_configured: true,
            }
        );
        let e = c.effective("rootless-podman").unwrap();
        assert!(e.security.nested_user_namespaces);
        assert_eq!(e.security.limits.processes, Some(4096));
        assert_eq!(e.security.limits.memory, Some(8 << 30));
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
        // Every place a job writes is bounded by default.
        let l = c.security.limits;
        // 10 GiB, or half the free space of build_path (which other processes change meanwhile:
        // the exact figures are security.rs' unit test).
        assert!(
            l.disk.is_some_and(|d| (64 << 20..=10 << 30).contains(&d)),
            "{:?}",
            l.disk
        );
        assert_eq!((l.log, l.tmpfs), (Some(64 << 20), Some(64 << 20)));
        assert_eq!(c.network, NetworkMode::Isolated);
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

        assert!(c.network_deny.is_empty());
        let text = format!(
            r#"{{"projects_path": "{}", "build_path": "{}", "network": "host",
                "network_deny": ["10.0.0.0/8", "192.168.1.7", "fd00::1/8", "10.9.9.9/16"]}}"#,
            p.display(),
            b.display()
        );
        let c = Config::parse(&text, Path::new("config.json")).unwrap();
        assert_eq!(c.network, NetworkMode::Host, "an explicit host is kept");
        assert_eq!(
            c.network_deny
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8", "10.9.0.0/16"]
        );
        let bad = format!(
            r#"{{"projects_path": "{}", "build_path": "{}", "network_deny": ["10.0.0.0/33"]}}"#,
            p.display(),
            b.display()
        );
        let e = Config::parse(&bad, Path::new("c.json")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "network_deny: \"10.0.0.0/33\" is not a network (10.0.0.0/8) or an address"
        );

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
