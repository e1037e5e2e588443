//! `mistry build`: its options, the job params, the request and the server's answer.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::Value;

use crate::transport::Transport;

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
    #[arg(long, default_value = "60m", value_parser = crate::duration::parse)]
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
    /// The server's token (access control); default: the environment's `MISTRY_TOKEN`.
    /// Prefer the environment: a command line is visible to the host's other users.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Job params: `--name=value` or `--name value`; `@file` reads the value from a file.
    #[arg(last = true, value_name = "PARAMS")]
    pub params: Vec<String>,
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
    let agent = crate::http::agent(args.timeout, crate::http::token(args.token.as_deref()));
    let (status, text) =
        crate::http::request(&agent, &base, &url, Some(&body), "The build", args.timeout)?;
    if status != 201 {
        return Err(crate::http::refused(status, &text));
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
    let to = crate::transport::Fetch {
        transport: args.transport,
        user: args.transport_user.as_deref(),
        port: args.transport_port,
        ssh_config: args.ssh_config.as_deref(),
        host: &args.host,
        project: &args.project,
        target: &args.target,
        clear_target: args.clear_target,
    };
    crate::transport::fetch(&to, &base, &agent, &field("Path"), &field("URL"))?;
    Ok(0)
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
        .map(std::string::ToString::to_string)
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
}
