//! `mistryd unshare [-- CMD...]`: run a command in a user namespace with the id mapping the
//! daemon's sandboxes use (root = the caller, or its first subordinate id with
//! `--sandbox-ids subordinate`; 1..65536 = its subordinate ids), like `podman unshare`. The host's
//! filesystem is visible (the sandbox's root is a copy of the host's `/`, with every mount under
//! it), so an operator can inspect or delete files jobs made as subordinate ids.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, Result};
use sandbox::{NetworkMode, Sandbox, Stdio};

/// The command run when none is given: `$SHELL`, else `/bin/sh`.
pub fn default_command() -> Vec<OsString> {
    vec![std::env::var_os("SHELL")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/bin/sh".into())]
}

/// The sandbox `mistryd unshare` runs `argv` in: the host's `/` (writable where the host's
/// mounts are, for the ids the namespace maps), the host's network, the caller's environment and
/// working directory, standard streams inherited.
pub fn sandbox(argv: Vec<OsString>) -> Sandbox {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "mistry-unshare".into());
    let mut sb = Sandbox::new("/")
        .command(argv)
        .cwd(cwd)
        .hostname(hostname)
        .network(NetworkMode::Host)
        .stdin(Stdio::Inherit)
        .stdout(Stdio::Inherit)
        .stderr(Stdio::Inherit);
    for (k, v) in std::env::vars_os() {
        sb = sb.env(k, v);
    }
    sb
}

/// Run `argv` (or [`default_command`]) and return its exit code as a shell reports it.
pub fn run(argv: Vec<OsString>) -> Result<i32> {
    let argv = if argv.is_empty() {
        default_command()
    } else {
        argv
    };
    let shown = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let status = sandbox(argv)
        .status()
        .with_context(|| format!("running {shown} in the sandboxes' user namespace"))?;
    Ok(status.shell_code())
}
