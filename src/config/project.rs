//! A project's settings: the operator's entry for it in the server configuration, tightened by
//! the project's own `.mistry.json` (whose author is not trusted), and how its image is built.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use images::BuildOptions;
use sandbox::NetworkMode;
use serde::Deserialize;

use super::{parse_limit, parse_network, Config};
use crate::security::{self, RawLimits, Security};

/// A project's settings as written: the operator's entry in the configuration's `projects`
/// (which sets anything), or the project's own `.mistry.json` (which can only tighten).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProjectSettings {
    /// `network`: `none`, `isolated` or `host`; `None`: the server-wide `network`.
    pub network: Option<String>,
    /// `time_limit`: a Go duration; `None`: the server-wide `time_limit`.
    pub time_limit: Option<String>,
    /// `build_args`: name → value for the image's `ARG`s (the operator's win over the
    /// project's; both come after `uid`, the daemon's uid, so a `uid` here replaces it).
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// `seccomp`: `default`, `unconfined` or a profile path (relative to the configuration
    /// file); `None`: the server-wide one. Only the operator's entry is read.
    pub seccomp: Option<String>,
    /// `nested_user_namespaces`; `None`: the server-wide value. Only the operator's entry is
    /// read.
    pub nested_user_namespaces: Option<bool>,
    /// `limits`, over the server-wide ones (the project's own file can only lower them).
    #[serde(default)]
    pub limits: RawLimits,
}

/// Settings in effect for one project.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    /// The network of its jobs and RUN steps.
    pub network: NetworkMode,
    /// The time limit of each job; `None`: none.
    pub time_limit: Option<Duration>,
    /// Its build args, by name (the operator's entry wins over the project's file).
    pub build_args: Vec<(String, String)>,
    /// Seccomp, nested user namespaces and limits of its jobs and RUN steps.
    pub security: Security,
}

impl Config {
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
        // ... which the project's own file can only tighten (none < isolated < host).
        let origin = file.display();
        if let Some(n) = &own.network {
            network = network.min(parse_network(n, &format!("{origin}: network"))?);
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

    /// The time limit the operator gives `project` (its entry in `projects`, else the
    /// server's): the most its jobs may get, as the project's own file can only lower it.
    pub fn operator_time_limit(&self, project: &str) -> Option<Duration> {
        match self
            .projects
            .get(project)
            .and_then(|p| p.time_limit.as_deref())
        {
            // Checked when the configuration was read.
            Some(t) => parse_limit(t, "time_limit").ok(),
            None => self.time_limit,
        }
    }

    /// How `project`'s image is built, by jobs and by `mistryd rebuild`: see
    /// [`Config::build_options_with`].
    pub fn build_options(&self, project: &str) -> Result<BuildOptions> {
        Ok(self.build_options_with(project, &self.effective(project)?))
    }

    /// How `project`'s image is built under `settings` (its [`Config::effective`] settings):
    /// build arg `uid` is this process's uid (as mistry passes it), then the project's build
    /// args; its network, policy and time limit (of each RUN step and each `ADD <url>`); and
    /// `ADD <url>` never connects to where the daemon listens, nor, with an isolated network,
    /// anywhere the egress policy refuses.
    pub fn build_options_with(&self, project: &str, settings: &Effective) -> BuildOptions {
        let mut opts = BuildOptions::new(project, self.projects_path.join(project));
        opts.build_args = vec![("uid".into(), nix::unistd::geteuid().as_raw().to_string())];
        opts.build_args.extend(settings.build_args.iter().cloned());
        opts.network = settings.network;
        opts.run_timeout = settings.time_limit;
        opts.policy = settings.security.policy();
        opts.download.deny_connect = self.listen.clone();
        opts.download.egress = settings.network == NetworkMode::Isolated;
        opts.secrets = super::secrets::for_project(&self.secrets, project);
        if let Some(t) = settings.time_limit {
            opts.download.timeout = opts.download.timeout.min(t);
        }
        opts
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
pub(super) fn project_security(
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
    fn build_options_carry_the_uid_and_the_projects_settings() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = (dir.path().join("projects"), dir.path().join("builds"));
        std::fs::create_dir_all(p.join("web")).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let text = format!(
            r#"{{"projects_path": "{}", "build_path": "{}", "time_limit": "10m",
                "projects": {{"web": {{"network": "none", "build_args": {{"A": "1"}}}}}}}}"#,
            p.display(),
            b.display()
        );
        let mut c = Config::parse(&text, Path::new("config.json")).unwrap();
        c.listen = vec!["127.0.0.1:8462".parse().unwrap()];
        std::fs::write(p.join("web/.mistry.json"), r#"{"build_args": {"B": "2"}}"#).unwrap();
        let o = c.build_options("web").unwrap();
        let uid = nix::unistd::geteuid().as_raw().to_string();
        assert_eq!(
            o.build_args,
            [
                ("uid".into(), uid),
                ("A".into(), "1".into()),
                ("B".into(), "2".into())
            ]
        );
        assert_eq!(
            (o.project.as_str(), o.context.clone()),
            ("web", p.canonicalize().unwrap().join("web"))
        );
        assert_eq!(o.network, NetworkMode::None);
        assert_eq!(o.run_timeout, Some(Duration::from_secs(600)));
        assert!(o.download.timeout <= Duration::from_secs(600));
        assert_eq!(o.download.deny_connect, c.listen);
        assert_eq!(o.policy, c.effective("web").unwrap().security.policy());
        assert!(!o.no_cache);
    }

    #[test]
    fn a_project_file_only_narrows_the_network() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = (dir.path().join("projects"), dir.path().join("builds"));
        for name in ["plain", "wide", "narrowed", "none"] {
            std::fs::create_dir_all(p.join(name)).unwrap();
        }
        std::fs::create_dir_all(&b).unwrap();
        let text = format!(
            r#"{{"projects_path": "{}", "build_path": "{}",
                "projects": {{"wide": {{"network": "host"}}, "narrowed": {{"network": "host"}}}}}}"#,
            p.display(),
            b.display()
        );
        let c = Config::parse(&text, Path::new("config.json")).unwrap();
        let own = |name: &str, net: &str| {
            std::fs::write(
                p.join(name).join(".mistry.json"),
                format!(r#"{{"network": "{net}"}}"#),
            )
            .unwrap();
        };
        // The default is isolated; a project asking for the host's network stays isolated.
        own("plain", "host");
        assert_eq!(c.effective("plain").unwrap().network, NetworkMode::Isolated);
        // The operator's entry gives the host's network; the project may keep it or narrow it.
        own("wide", "host");
        assert_eq!(c.effective("wide").unwrap().network, NetworkMode::Host);
        own("narrowed", "isolated");
        assert_eq!(
            c.effective("narrowed").unwrap().network,
            NetworkMode::Isolated
        );
        own("none", "none");
        assert_eq!(c.effective("none").unwrap().network, NetworkMode::None);
        // ADD <url> follows the egress policy where the network is isolated.
        assert!(c.build_options("plain").unwrap().download.egress);
        assert!(!c.build_options("wide").unwrap().download.egress);
        own("plain", "bridge");
        let e = c.effective("plain").unwrap_err();
        assert!(
            e.to_string().ends_with(
                "network: unknown network mode \"bridge\" (expected none, isolated or host)"
            ),
            "{e}"
        );
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
                "time_limit": "10m",
                "limits": {{"processes": 200, "memory": "1GiB", "disk": "4GiB"}}}}"#,
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

    /// A configuration with projects `web` (its own entry: `entry`) and `other` (none).
    fn two_projects(dir: &Path, server: &str, entry: &str) -> (Config, std::path::PathBuf) {
        let (p, b) = (dir.join("projects"), dir.join("builds"));
        for d in [p.join("web"), p.join("other"), b.clone()] {
            std::fs::create_dir_all(d).unwrap();
        }
        let text = format!(
            r#"{{"projects_path": "{}", "build_path": "{}", {server}
                "projects": {{"web": {{{entry}}}}}}}"#,
            p.display(),
            b.display()
        );
        (Config::parse(&text, Path::new("config.json")).unwrap(), p)
    }

    #[test]
    fn the_operators_time_limit_is_the_projects_entry_else_the_servers() {
        let dir = tempfile::tempdir().unwrap();
        let (c, p) = two_projects(
            dir.path(),
            r#""time_limit": "10m","#,
            r#""time_limit": "2m""#,
        );
        // The project's own file does not change what the operator gives.
        std::fs::write(p.join("web/.mistry.json"), r#"{"time_limit": "1m"}"#).unwrap();
        assert_eq!(c.operator_time_limit("web"), Some(Duration::from_secs(120)));
        assert_eq!(
            c.effective("web").unwrap().time_limit,
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            c.operator_time_limit("other"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            c.operator_time_limit("unknown"),
            Some(Duration::from_secs(600))
        );
        let dir = tempfile::tempdir().unwrap();
        let (c, p) = two_projects(dir.path(), "", r#""network": "host""#);
        assert_eq!(c.operator_time_limit("web"), None);
        assert_eq!(c.effective("other").unwrap().time_limit, None);
        // Without an operator's limit the project's own one applies, also to ADD <url>.
        std::fs::write(p.join("other/.mistry.json"), r#"{"time_limit": "30s"}"#).unwrap();
        let o = c.build_options("other").unwrap();
        assert_eq!(o.run_timeout, Some(Duration::from_secs(30)));
        assert_eq!(o.download.timeout, Duration::from_secs(30));
        assert_eq!(c.operator_time_limit("other"), None);
    }

    #[test]
    fn a_project_file_of_64_kib_is_read_and_one_byte_more_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (c, p) = two_projects(dir.path(), "", "");
        let file = p.join("web/.mistry.json");
        let json = br#"{"time_limit": "7s"}"#;
        let mut text = json.to_vec();
        text.resize(64 << 10, b' ');
        std::fs::write(&file, &text).unwrap();
        assert_eq!(
            c.effective("web").unwrap().time_limit,
            Some(Duration::from_secs(7))
        );
        text.push(b' ');
        std::fs::write(&file, &text).unwrap();
        assert_eq!(
            format!("{:#}", c.effective("web").unwrap_err()),
            format!("{} is larger than 64 KiB", file.display())
        );
        // Absent, empty, or not JSON.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(c.effective("web").unwrap().time_limit, None);
        std::fs::write(&file, "").unwrap();
        let e = format!("{:#}", c.effective("web").unwrap_err());
        assert!(
            e.starts_with(&format!("parsing {}: ", file.display())),
            "{e}"
        );
        // A link is not followed, even to a valid file.
        std::fs::write(p.join("web/real.json"), json).unwrap();
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink("real.json", &file).unwrap();
        let e = format!("{:#}", c.effective("web").unwrap_err());
        assert!(
            e.starts_with(&format!("opening {}: ", file.display())),
            "{e}"
        );
        // A directory where the file should be.
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        assert_eq!(
            format!("{:#}", c.effective("web").unwrap_err()),
            format!("{} is not a regular file", file.display())
        );
    }
}
