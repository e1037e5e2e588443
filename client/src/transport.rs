//! Getting a ready job's artifacts into the target directory: scp and rsync as mistry, or a
//! tar stream from mistryd itself (`http`).

use std::io::{IsTerminal, Read};
use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use clap::ValueEnum;

use crate::build::BuildArgs;

/// How artifacts get from the server to the target directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// `scp -r USER@HOST:<Path>/* TARGET` (mistry's default; without `-p`, so OpenSSH's scp
    /// keeps no set-uid or set-gid bit).
    Scp,
    /// `rsync -rtlp --chmod=ug-s USER@HOST::mistry/<path> TARGET`, from an rsync daemon module
    /// `mistry` rooted at the server's build_path.
    Rsync,
    /// A tar stream from mistryd itself (`GET /artifacts/{project}/{id}`): no SSH, no rsync.
    Http,
}

/// The set-uid and set-gid bits, which no fetched artifact keeps: run by the caller (root, for
/// instance), a set-uid file a job made would run as whoever owns it.
const SET_ID: u32 = 0o6000;

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

fn run(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

pub(crate) fn fetch(
    args: &BuildArgs,
    base: &str,
    agent: &ureq::Agent,
    path: &str,
    url: &str,
) -> Result<()> {
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
            // Modes as mistry keeps them (-p), but never a set-uid or set-gid bit, whatever
            // the server has: a set-uid file a job made must not become the caller's.
            cmd.arg("-rtlp").arg("--chmod=ug-s");
            if args.clear_target {
                cmd.arg("--delete");
            }
            cmd.arg(source).arg(&args.target);
            run(cmd, "rsync")
        }
        Transport::Http => fetch_http(agent, base, url, &args.target, args.clear_target),
    }
}

/// The http transport: the artifacts of the job at `url` (`job/<project>/<id>`) as a tar stream
/// from the server at `base`, unpacked into `target` (emptied first when `clear`).
pub(crate) fn fetch_http(
    agent: &ureq::Agent,
    base: &str,
    url: &str,
    target: &Path,
    clear: bool,
) -> Result<()> {
    if clear {
        clear_dir(target)?;
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
            indicatif::ProgressStyle::with_template("{spinner} {bytes} ({bytes_per_sec}) {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b.set_message("artifacts");
        b
    });
    let reader: Box<dyn Read> = match &bar {
        Some(b) => Box::new(b.wrap_read(reader)),
        None => Box::new(reader),
    };
    unpack(reader, target)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(())
}

/// Unpack a tar stream into `target`; no entry may land outside it, none keeps a set-uid or
/// set-gid bit (modes are kept otherwise).
pub fn unpack(reader: impl Read, target: &Path) -> Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_mask(SET_ID);
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
