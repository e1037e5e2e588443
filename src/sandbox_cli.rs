//! `mistryd sandbox run`: run one command in a sandbox, for debugging and benchmarks.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use sandbox::{
    Bind, CgroupLimits, IdMapping, Limits, NetworkMode, Policy, Rlimit, Sandbox, Seccomp, Stdio,
    User,
};

/// Options of `mistryd sandbox run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Root filesystem directory of the sandbox.
    #[arg(long, value_name = "DIR")]
    pub rootfs: PathBuf,
    /// Bind mount SRC (host) at DST (sandbox), read-write or read-only; applied in order.
    #[arg(long = "bind", value_name = "SRC:DST[:ro]")]
    pub binds: Vec<Bind>,
    /// Environment variable of the job (the host's environment is not passed).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    #[arg(long, default_value = "/", value_name = "DIR")]
    pub cwd: PathBuf,
    /// User to run as: a name or uid of the image, optionally with :group or :gid.
    #[arg(long, short = 'u', value_name = "USER[:GROUP]")]
    pub user: Option<User>,
    /// Network: `none` (own namespace, loopback only), `isolated` (own namespace, outbound
    /// through slirp4netns under the egress policy) or `host`.
    #[arg(long = "net", default_value = "none", value_name = "MODE")]
    pub network: NetworkMode,
    /// Wall-clock limit, Go syntax (30s, 5m, 1h30m); the whole sandbox is killed after it.
    #[arg(long, value_parser = crate::duration::parse, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// Hostname inside the sandbox.
    #[arg(long, default_value = "mistry")]
    pub hostname: String,
    /// Mount a fresh tmpfs on /tmp.
    #[arg(long)]
    pub tmpfs_tmp: bool,
    /// Make the root filesystem read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Resource limit, e.g. nofile=1024:4096 (nofile, nproc, core, fsize, as, cpu, stack).
    #[arg(long = "rlimit", value_name = "NAME=SOFT[:HARD]")]
    pub rlimits: Vec<Rlimit>,
    /// Memory limit of the whole sandbox, bytes: cgroup v2 or v1 where writable, else a
    /// watchdog (best effort). Default: none.
    #[arg(long, value_name = "BYTES")]
    pub memory: Option<u64>,
    /// Process (and thread) limit of the whole sandbox [default: 1024]; 0 for none.
    #[arg(long, value_name = "N")]
    pub pids: Option<u64>,
    /// Open files per process, SOFT[:HARD] [default: 1024:65536]; 0 for the caller's own.
    #[arg(long, value_name = "SOFT[:HARD]", value_parser = parse_nofile)]
    pub nofile: Option<(u64, u64)>,
    /// cgroup v2 CPU limit, in CPUs (e.g. 1.5); skipped with a warning where not delegated.
    #[arg(long, value_name = "CPUS")]
    pub cpus: Option<f64>,
    /// Seccomp filter: `default` (Docker-like), `unconfined`, or the path of a Docker/OCI JSON
    /// profile.
    #[arg(
        long,
        default_value = "default",
        value_name = "default|unconfined|PATH"
    )]
    pub seccomp: Seccomp,
    /// Let processes of the sandbox create user namespaces of their own (off by default).
    #[arg(long)]
    pub allow_nested_userns: bool,
    /// Id mapping: `auto` (the caller as root, plus its subordinate range if any), `single`
    /// (only the caller) or `subordinate` (root and all ids on the subordinate range, even for
    /// a root caller).
    #[arg(long, value_name = "auto|single|subordinate")]
    pub sandbox_ids: Option<IdMapping>,
    /// Force the single-id user namespace map (same as --sandbox-ids single).
    #[arg(long, conflicts_with = "sandbox_ids")]
    pub single_id_map: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// A value of `mistryd sandbox run`'s options that does not parse (clap reports it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// An `--env` value without `=`; names the value.
    #[error("invalid environment variable {0:?} (expected K=V)")]
    Env(String),
    /// A `--nofile` value that is not `SOFT[:HARD]` in numbers; names the value.
    #[error("invalid open file limit {0:?} (expected SOFT[:HARD])")]
    Nofile(String),
    /// A `--nofile` value whose soft limit is above its hard one; names the value.
    #[error("open file limit {0:?}: soft above hard")]
    NofileOrder(String),
}

fn parse_env(s: &str) -> Result<(String, String), ArgError> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| ArgError::Env(s.to_string()))
}

/// `SOFT[:HARD]` (`0` for no limit of our own).
fn parse_nofile(s: &str) -> Result<(u64, u64), ArgError> {
    let num = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| ArgError::Nofile(s.to_string()))
    };
    let (soft, hard) = match s.split_once(':') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(s)?, num(s)?),
    };
    if soft > hard {
        return Err(ArgError::NofileOrder(s.to_string()));
    }
    Ok((soft, hard))
}

impl RunArgs {
    /// The sandbox these options describe, with the caller's stdin, stdout and stderr.
    pub fn sandbox(self) -> Sandbox {
        let mut sb = Sandbox::new(&self.rootfs)
            .command(self.command)
            .cwd(self.cwd)
            .network(self.network)
            .hostname(self.hostname)
            .tmpfs_tmp(self.tmpfs_tmp)
            .read_only_root(self.read_only)
            .stdin(Stdio::Inherit)
            .cgroup_limits(CgroupLimits {
                cpus: self.cpus,
                ..CgroupLimits::default()
            });
        let defaults = Limits::default();
        sb = sb.policy(Policy {
            seccomp: self.seccomp,
            nested_user_namespaces: self.allow_nested_userns,
            limits: Limits {
                pids: match self.pids {
                    Some(0) => None,
                    Some(n) => Some(n),
                    None => defaults.pids,
                },
                memory: self.memory,
                nofile: match self.nofile {
                    Some((_, 0)) => None,
                    Some(n) => Some(n),
                    None => defaults.nofile,
                },
                memory_cgroup: true,
                disk: None,
                tmpfs: defaults.tmpfs,
            },
        });
        if self.single_id_map {
            sb = sb.id_mapping(IdMapping::Single);
        } else if let Some(ids) = self.sandbox_ids {
            sb = sb.id_mapping(ids);
        }
        if let Some(user) = self.user {
            sb = sb.user(user);
        }
        if let Some(t) = self.timeout {
            sb = sb.timeout(t);
        }
        for (k, v) in self.env {
            sb = sb.env(k, v);
        }
        for b in self.binds {
            sb = sb.bind(b);
        }
        for r in self.rlimits {
            sb = sb.rlimit(r);
        }
        sb
    }
}

/// Whether `MISTRY_NO_HELD_USERNS` (set, not `0`) turns held user namespaces off.
pub fn holding_off() -> bool {
    matches!(std::env::var("MISTRY_NO_HELD_USERNS").as_deref(), Ok(v) if !v.is_empty() && v != "0")
}

/// A one-shot command's sandboxes start through the shared holder of their subordinate id map
/// (started by the first, found by the next: sandbox/src/holder.rs), unless [`holding_off`].
pub fn hold_shared() {
    if !holding_off() {
        sandbox::set_held_user_namespaces(true);
        sandbox::set_shared_user_namespaces(true);
    }
}

/// Run the sandbox; returns the exit code the CLI should exit with: the job's own code, 128 + N
/// for death by signal N, 124 on timeout, 137 when a limit ended it; 127 when the program could
/// not be executed and 125 for any other failure to start (as `docker run` does).
pub fn run(args: RunArgs) -> i32 {
    run_as("mistryd", args)
}

/// [`run`], its messages prefixed with program name `prog` (`mistry-sandbox`'s own).
pub fn run_as(prog: &str, args: RunArgs) -> i32 {
    match args.sandbox().status() {
        Ok(status) => {
            if status.code().is_none() {
                eprintln!("{prog}: sandbox: {status}");
            }
            status.shell_code()
        }
        Err(e @ sandbox::Error::Exec(_)) => {
            eprintln!("{prog}: {e}");
            127
        }
        Err(e) => {
            eprintln!("{prog}: {e}");
            125
        }
    }
}
