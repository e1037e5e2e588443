//! `mistry build`: schedule a job on a mistry server and fetch its artifacts — a drop-in for
//! mistry's Go client (same flags, defaults, messages and exit codes), plus a native `http`
//! transport that needs no SSH and no rsync daemon.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

/// How artifacts get from the server to the target directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// `scp -r USER@HOST:<Path>/* TARGET` (mistry's default).
    Scp,
    /// `rsync -rtlp USER@HOST::mistry/<path> TARGET`, from an rsync daemon module `mistry`
    /// rooted at the server's build_path.
    Rsync,
    /// A tar stream from mistryd itself (`GET /artifacts/{project}/{id}`): no SSH, no rsync.
    Http,
}

/// Options of `mistry build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Server host.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Server port.
    #[arg(long, short = 'p', default_value_t = 8462)]
    pub port: u16,
    /// The project to build.
    #[arg(long)]
    pub project: String,
    /// Group (builds of a group start from the group's last successful build).
    #[arg(long, short = 'g', default_value = "")]
    pub group: String,
    /// Print the request, the server's answer and the logs.
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// Print the BuildInfo JSON on stdout (turns verbose off).
    #[arg(long)]
    pub json_result: bool,
    /// Rebuild the project's image, ignoring its cache.
    #[arg(long)]
    pub rebuild: bool,
    /// How long to wait for the result (Go syntax: 1s, 90m, 1h30m).
    #[arg(long, default_value = "60m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Schedule the job and exit; fetch nothing.
    #[arg(long)]
    pub no_wait: bool,
    /// How to fetch the artifacts.
    #[arg(long, value_enum, default_value = "http")]
    pub transport: Transport,
    /// User for scp and rsync (default: the current user).
    #[arg(long)]
    pub transport_user: Option<String>,
    /// Port of the SSH server (scp) or rsync daemon (rsync), when not the standard one.
    #[arg(long)]
    pub transport_port: Option<u16>,
    /// An ssh_config file for scp (`scp -F`).
    #[arg(long)]
    pub ssh_config: Option<PathBuf>,
    /// Where the artifacts go; created if missing.
    #[arg(long, short = 't', default_value = ".")]
    pub target: PathBuf,
    /// Empty the target before fetching.
    #[arg(long)]
    pub clear_target: bool,
    /// Job params: `--name=value` or `--name value`; `@file` reads the value from a file.
    #[arg(last = true, value_name = "PARAMS")]
    pub params: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse(s)
}

/// `--a=1 --b 2 --c=@file` → params.
pub fn parse_params(args: &[String]) -> Result<BTreeMap<String, String>> {
    let mut params = BTreeMap::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(body) = arg.strip_prefix("--") else {
            bail!("invalid job param {arg:?}: expected --name=value or --name value");
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => (
                body.to_string(),
                it.next()
                    .ok_or_else(|| anyhow!("job param --{body} has no value"))?
                    .clone(),
            ),
        };
        if name.is_empty() {
            bail!("invalid job param {arg:?}: empty name");
        }
        let value = match value.strip_prefix('@') {
            Some(file) => std::fs::read_to_string(file)
                .with_context(|| format!("reading the value of --{name} from {file}"))?,
            None => value,
        };
        params.insert(name, value);
    }
    Ok(params)
}

fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "root".into())
}

/// Empty a directory, keeping it.
fn clear_dir(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let r = match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
            _ => std::fs::remove_file(&p),
        };
        r.with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

/// Run `mistry build`; returns the process exit code.
pub fn build(args: BuildArgs) -> Result<i32> {
    let params = parse_params(&args.params)?;
    if args.target.is_file() {
        bail!("target {} is a file", args.target.display());
    }
    if !args.no_wait {
        std::fs::create_dir_all(&args.target)
            .with_context(|| format!("creating the target {}", args.target.display()))?;
    }
    let verbose = args.verbose && !args.json_result;
    let base = format!("http://{}:{}", args.host, args.port);
    let url = format!("{base}/jobs{}", if args.no_wait { "?async" } else { "" });
    let body = serde_json::json!({
        "project": args.project,
        "group": args.group,
        "params": params,
        "rebuild": args.rebuild,
    })
    .to_string();
    if verbose {
        println!("Sending request to {url}: {body}");
    }
    let agent = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .timeout_global(Some(args.timeout))
            .build(),
    );
    let mut resp = match agent
        .post(&url)
        .header("Content-Type", "application/json")
        .send(body.as_str())
    {
        Ok(r) => r,
        Err(ureq::Error::Timeout(_)) => {
            bail!(
                "The build did not finish after {}",
                crate::duration::format_go(args.timeout)
            )
        }
        Err(e) => bail!("cannot reach the mistry server at {base}: {e}"),
    };
    let status = resp.status().as_u16();
    let text = match resp
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_string()
    {
        Ok(t) => t,
        Err(ureq::Error::Timeout(_)) => {
            bail!(
                "The build did not finish after {}",
                crate::duration::format_go(args.timeout)
            )
        }
        Err(e) => bail!("reading the server's answer: {e}"),
    };
    match status {
        201 => {}
        503 => bail!("Server is overloaded; try again later"),
        _ => bail!("{}", text.trim()),
    }
    if args.no_wait {
        return Ok(0);
    }
    let info: Value =
        serde_json::from_str(&text).with_context(|| format!("unexpected answer: {text}"))?;
    let field = |k: &str| {
        info.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let exit_code = info.get("ExitCode").and_then(Value::as_i64).unwrap_or(-1);
    if args.json_result {
        println!("{text}");
    } else {
        println!("Logs can be found at {base}/{}", field("URL"));
    }
    if verbose {
        println!(
            "Result: exit code {exit_code}, cached {}, coalesced {}, incremental {}, path {}",
            info["Cached"],
            info["Coalesced"],
            info["Incremental"],
            field("Path")
        );
        if !field("ErrBuild").is_empty() {
            println!("Error: {}", field("ErrBuild"));
        }
        println!("Logs:\n{}", field("ContainerStdouterr"));
    }
    if exit_code != 0 {
        eprintln!("Container error logs:");
        let stderr = field("ContainerStderr");
        if stderr.is_empty() {
            eprintln!("There are no container error logs.");
        } else {
            eprint!("{stderr}");
            if !stderr.ends_with('\n') {
                eprintln!();
            }
        }
        bail!("Build failed with exit code {exit_code}");
    }
    // The job exited 0 but the build failed (e.g. it replaced /data/artifacts with a link).
    let err_build = field("ErrBuild");
    if !err_build.is_empty() {
        bail!("Build failed: {err_build}");
    }
    fetch(&args, &base, &agent, &field("Path"), &field("URL"))?;
    Ok(0)
}

fn run(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn fetch(args: &BuildArgs, base: &str, agent: &ureq::Agent, path: &str, url: &str) -> Result<()> {
    let user = args.transport_user.clone().unwrap_or_else(current_user);
    match args.transport {
        Transport::Scp => {
            if args.clear_target {
                clear_dir(&args.target)?;
            }
            let mut cmd = Command::new("scp");
            cmd.arg("-r").arg("-q");
            if let Some(p) = args.transport_port {
                cmd.arg("-P").arg(p.to_string());
            }
            if let Some(cfg) = &args.ssh_config {
                cmd.arg("-F").arg(cfg);
            }
            cmd.arg(format!("{user}@{}:{path}/*", args.host))
                .arg(&args.target);
            run(cmd, "scp")
        }
        Transport::Rsync => {
            // The module `mistry` is rooted at build_path: keep the Path from the project on.
            let marker = format!("/{}/ready/", args.project);
            let rel = path
                .find(&marker)
                .map(|i| &path[i + 1..])
                .ok_or_else(|| anyhow!("unexpected artifacts path {path}"))?;
            let source = match args.transport_port {
                Some(p) => format!("rsync://{user}@{}:{p}/mistry/{rel}/", args.host),
                None => format!("{user}@{}::mistry/{rel}/", args.host),
            };
            let mut cmd = Command::new("rsync");
            cmd.arg("-rtlp");
            if args.clear_target {
                cmd.arg("--delete");
            }
            cmd.arg(source).arg(&args.target);
            run(cmd, "rsync")
        }
        Transport::Http => {
            if args.clear_target {
                clear_dir(&args.target)?;
            }
            let id_path = url
                .strip_prefix("job/")
                .ok_or_else(|| anyhow!("unexpected job URL {url}"))?;
            let mut resp = agent
                .get(&format!("{base}/artifacts/{id_path}"))
                .call()
                .with_context(|| format!("fetching the artifacts from {base}"))?;
            if resp.status().as_u16() != 200 {
                let text = resp.body_mut().read_to_string().unwrap_or_default();
                bail!("fetching the artifacts: {}", text.trim());
            }
            let reader = resp.body_mut().with_config().limit(u64::MAX).reader();
            let bar = std::io::stderr().is_terminal().then(|| {
                let b = indicatif::ProgressBar::new_spinner();
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} {bytes} ({bytes_per_sec}) {msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                b.set_message("artifacts");
                b
            });
            let reader: Box<dyn Read> = match &bar {
                Some(b) => Box::new(b.wrap_read(reader)),
                None => Box::new(reader),
            };
            unpack(reader, &args.target)?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            Ok(())
        }
    }
}

/// Unpack a tar stream into `target`; no entry may land outside it.
pub fn unpack(reader: impl Read, target: &Path) -> Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    for entry in archive.entries().context("reading the artifacts")? {
        let mut entry = entry.context("reading the artifacts")?;
        let path = entry.path().context("reading the artifacts")?.into_owned();
        // unpack_in refuses `..`, absolute paths and writes through symlinks that leave target.
        if !entry
            .unpack_in(target)
            .with_context(|| format!("unpacking {}", path.display()))?
        {
            bail!(
                "refusing artifact {}: it would land outside {}",
                path.display(),
                target.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_forms() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("lock");
        std::fs::write(&f, "content\n").unwrap();
        let args: Vec<String> = [
            "--a=1",
            "--b",
            "two words",
            "--lock",
            &format!("@{}", f.display()),
            "--e=",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = parse_params(&args).unwrap();
        assert_eq!(p["a"], "1");
        assert_eq!(p["b"], "two words");
        assert_eq!(p["lock"], "content\n");
        assert_eq!(p["e"], "");
        assert!(parse_params(&["x".to_string()]).is_err());
        assert!(parse_params(&["--dangling".to_string()]).is_err());
        let e = parse_params(&["--f=@/nonexistent".to_string()]).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("reading the value of --f from /nonexistent"),
            "{e:#}"
        );
    }

    #[test]
    fn unpack_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = tar::Header::new_old();
        let name = b"../escaped";
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut data = h.as_bytes().to_vec();
        data.extend_from_slice(&[0u8; 1024]);
        let target = dir.path().join("t");
        std::fs::create_dir(&target).unwrap();
        assert!(unpack(&data[..], &target).is_err());
        assert!(!dir.path().join("escaped").exists());
    }
}
