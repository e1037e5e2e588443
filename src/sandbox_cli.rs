//! `mistryd sandbox run`: run one command in a sandbox, for debugging and benchmarks.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use sandbox::{Bind, CgroupLimits, IdMapping, NetworkMode, Rlimit, Sandbox, Stdio, User};

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
    /// Network: `none` (own namespace, loopback only) or `host`.
    #[arg(long = "net", default_value = "none", value_name = "MODE")]
    pub network: NetworkMode,
    /// Wall-clock limit, Go syntax (30s, 5m, 1h30m); the whole sandbox is killed after it.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
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
    /// cgroup v2 memory limit in bytes (skipped with a warning where not delegated).
    #[arg(long, value_name = "BYTES")]
    pub memory: Option<u64>,
    /// cgroup v2 limit on the number of processes.
    #[arg(long, value_name = "N")]
    pub pids: Option<u64>,
    /// cgroup v2 CPU limit, in CPUs (e.g. 1.5).
    #[arg(long, value_name = "CPUS")]
    pub cpus: Option<f64>,
    /// Force the single-id user namespace map even when a subordinate range exists.
    #[arg(long)]
    pub single_id_map: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("invalid environment variable {s:?} (expected K=V)"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse(s)
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
                memory_max: self.memory,
                pids_max: self.pids,
                cpus: self.cpus,
            });
        if self.single_id_map {
            sb = sb.id_mapping(IdMapping::Single);
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

/// Run the sandbox; returns the exit code the CLI should exit with: the job's own code, 128 + N
/// for death by signal N, 124 on timeout; 127 when the program could not be executed and 125 for
/// any other failure to start (as `docker run` does).
pub fn run(args: RunArgs) -> i32 {
    match args.sandbox().status() {
        Ok(status) => {
            if status.code().is_none() {
                eprintln!("mistryd: sandbox: {status}");
            }
            status.shell_code()
        }
        Err(e @ sandbox::Error::Exec(_)) => {
            eprintln!("mistryd: {e}");
            127
        }
        Err(e) => {
            eprintln!("mistryd: {e}");
            125
        }
    }
}
