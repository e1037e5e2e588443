//! Getting a ready job's artifacts into the target directory: scp and rsync as mistry, or a
//! tar stream from mistryd itself (`http`).

use std::io::{IsTerminal, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use clap::ValueEnum;

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

/// Empty a directory, keeping it: by fd and iteratively, whatever its depth (no stack frame
/// and at most two open descriptors per walk, going back up through `..` after checking it is
/// the directory it came from), never following a link, and giving the user's own read-only
/// directories (artifacts keep their modes) owner rwx first.
fn clear_dir(dir: &Path) -> Result<()> {
    use nix::dir::{Dir, Type};
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::{fchmod, fstat, fstatat, Mode, SFlag};
    use nix::unistd::{unlinkat, UnlinkatFlags};
    use std::os::fd::AsRawFd;

    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let me = nix::unistd::geteuid().as_raw();
    // Owner rwx for a directory of ours that lacks it.
    let writable = |d: &Dir| -> nix::Result<(u64, u64)> {
        let st = fstat(d.as_raw_fd())?;
        if st.st_uid == me && st.st_mode & 0o700 != 0o700 {
            fchmod(
                d.as_raw_fd(),
                Mode::from_bits_truncate((st.st_mode & 0o7777) | 0o700),
            )?;
        }
        Ok((st.st_dev, st.st_ino))
    };
    // The names (and device, inode) of the directories from `dir` down to the current one.
    let mut path: Vec<(std::ffi::OsString, (u64, u64))> = Vec::new();
    let shown = |path: &[(std::ffi::OsString, (u64, u64))], name: &std::ffi::OsStr| {
        let mut p = dir.to_path_buf();
        let n = path.len();
        for (i, (d, _)) in path.iter().enumerate() {
            if n > 16 && i == 8 {
                p.push(format!("…({} more levels)…", n - 16));
            }
            if n <= 16 || !(8..n - 8).contains(&i) {
                p.push(d);
            }
        }
        p.join(name).display().to_string()
    };
    let mut cur = Dir::open(dir, flags, Mode::empty())
        .with_context(|| format!("reading {}", dir.display()))?;
    let mut here = writable(&cur).with_context(|| format!("reading {}", dir.display()))?;
    loop {
        // Remove what is not a directory; stop at the first directory, to go into it.
        let fd = cur.as_raw_fd();
        let mut sub = None;
        for e in cur.iter() {
            let e = e.with_context(|| format!("reading {}", shown(&path, "".as_ref())))?;
            let name = std::ffi::OsStr::from_bytes(e.file_name().to_bytes()).to_os_string();
            if name == "." || name == ".." {
                continue;
            }
            let is_dir = match e.file_type() {
                Some(t) => t == Type::Directory,
                None => fstatat(Some(fd), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| {
                        SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
                    }),
            };
            if is_dir {
                sub = Some(name);
                break;
            }
            unlinkat(Some(fd), name.as_os_str(), UnlinkatFlags::NoRemoveDir)
                .with_context(|| format!("removing {}", shown(&path, &name)))?;
        }
        if let Some(name) = sub {
            let next = Dir::openat(Some(fd), name.as_os_str(), flags, Mode::empty())
                .with_context(|| format!("reading {}", shown(&path, &name)))?;
            let id = writable(&next).with_context(|| format!("reading {}", shown(&path, &name)))?;
            path.push((name, here));
            here = id;
            cur = next;
            continue;
        }
        // Empty: back up, then remove it.
        let Some((name, parent)) = path.pop() else {
            return Ok(());
        };
        let up = Dir::openat(Some(fd), "..", flags & !OFlag::O_NOFOLLOW, Mode::empty())
            .with_context(|| format!("reading {}", shown(&path, "".as_ref())))?;
        let st = fstat(up.as_raw_fd())?;
        if (st.st_dev, st.st_ino) != parent {
            bail!(
                "{} was moved while it was being emptied",
                shown(&path, &name)
            );
        }
        cur = up;
        here = parent;
        unlinkat(
            Some(cur.as_raw_fd()),
            name.as_os_str(),
            UnlinkatFlags::RemoveDir,
        )
        .with_context(|| format!("removing {}", shown(&path, &name)))?;
    }
}

fn run(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Where a ready job's artifacts go and how (`mistry build`'s options).
pub(crate) struct Fetch<'a> {
    pub transport: Transport,
    /// For scp and rsync (default: the current user).
    pub user: Option<&'a str>,
    /// Of the SSH server (scp) or rsync daemon (rsync).
    pub port: Option<u16>,
    /// An ssh_config file for scp.
    pub ssh_config: Option<&'a Path>,
    pub host: &'a str,
    pub project: &'a str,
    pub target: &'a Path,
    pub clear_target: bool,
}

pub(crate) fn fetch(
    args: &Fetch<'_>,
    base: &str,
    agent: &ureq::Agent,
    path: &str,
    url: &str,
) -> Result<()> {
    let user = args.user.map_or_else(current_user, str::to_string);
    match args.transport {
        Transport::Scp => {
            if args.clear_target {
                clear_dir(args.target)?;
            }
            let mut cmd = Command::new("scp");
            cmd.arg("-r").arg("-q");
            if let Some(p) = args.port {
                cmd.arg("-P").arg(p.to_string());
            }
            if let Some(cfg) = args.ssh_config {
                cmd.arg("-F").arg(cfg);
            }
            cmd.arg(format!("{user}@{}:{path}/*", args.host))
                .arg(args.target);
            run(cmd, "scp")
        }
        Transport::Rsync => {
            // The module `mistry` is rooted at build_path: keep the Path from the project on.
            let marker = format!("/{}/ready/", args.project);
            let rel = path
                .find(&marker)
                .map(|i| &path[i + 1..])
                .ok_or_else(|| anyhow!("unexpected artifacts path {path}"))?;
            let source = match args.port {
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
            cmd.arg(source).arg(args.target);
            run(cmd, "rsync")
        }
        Transport::Http => fetch_http(agent, base, url, args.target, args.clear_target),
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

/// Linux's `PATH_MAX` (with its NUL): [`unpack`] creates entries by path name, and mistryd
/// sends no name longer than that (a deeper tree is refused there).
const PATH_MAX: usize = 4096;

/// The most directory levels an entry's name may have: the tar crate's safe unpack resolves
/// every parent of an entry again (its cost grows with the square of the depth), and no
/// artifact tree needs more (COPY in a Dockerfile takes no deeper trees either).
pub(crate) const MAX_DEPTH: usize = 256;

/// Unpack a tar stream into `target`; no entry may land outside it, none keeps a set-uid or
/// set-gid bit (modes are kept otherwise), and none may be named by a path longer than the
/// kernel takes or of more than [`MAX_DEPTH`] levels (refused with its name, before anything of
/// it is written: a tree too deep to unpack).
pub fn unpack(reader: impl Read, target: &Path) -> Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_mask(SET_ID);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    // The name joined to target with a `/`, and the NUL.
    let room = PATH_MAX.saturating_sub(target.as_os_str().len() + 2);
    for entry in archive.entries().context("reading the artifacts")? {
        let mut entry = entry.context("reading the artifacts")?;
        let name_len = entry.path_bytes().len();
        if name_len > room {
            let bytes = entry.path_bytes();
            let head = String::from_utf8_lossy(bytes.get(..32).unwrap_or(&bytes)).into_owned();
            bail!(
                "refusing artifact {head}…: its name is {name_len} bytes long, and a path in \
                 {} has room for {room} (a tree too deep to unpack)",
                target.display()
            );
        }
        let depth = entry
            .path_bytes()
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty())
            .count();
        if depth > MAX_DEPTH {
            let bytes = entry.path_bytes();
            let head = String::from_utf8_lossy(bytes.get(..32).unwrap_or(&bytes)).into_owned();
            bail!(
                "refusing artifact {head}…: it is {depth} directory levels deep, more than \
                 {MAX_DEPTH} (a tree too deep to unpack)"
            );
        }
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

    /// A temporary directory on tmpfs where there is one (removing 100,000 directories on an
    /// ext4 mounted with `discard` takes minutes), else in TMPDIR.
    fn fast_tempdir() -> tempfile::TempDir {
        let shm = Path::new("/dev/shm");
        match tempfile::Builder::new()
            .prefix("mistry-client")
            .tempdir_in(shm)
        {
            Ok(d) => d,
            Err(_) => tempfile::tempdir().unwrap(),
        }
    }

    /// A chain of `depth` directories `d` in `top`, made by fd, with read-only levels and a file
    /// at the bottom.
    fn chain(top: &Path, depth: usize) {
        use nix::dir::Dir;
        use nix::fcntl::OFlag;
        use nix::sys::stat::{mkdirat, Mode};
        use std::os::fd::AsRawFd;
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut cur = Dir::open(top, flags, Mode::empty()).unwrap();
        for _ in 0..depth {
            mkdirat(Some(cur.as_raw_fd()), "d", Mode::from_bits_truncate(0o755)).unwrap();
            cur = Dir::openat(Some(cur.as_raw_fd()), "d", flags, Mode::empty()).unwrap();
        }
        let f = nix::fcntl::openat(
            Some(cur.as_raw_fd()),
            "f",
            OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        nix::unistd::close(f).unwrap();
    }

    #[test]
    fn clearing_the_target_walks_deep_trees_without_recursion() {
        use std::os::unix::fs::PermissionsExt;
        let d = fast_tempdir();
        let target = d.path().join("target");
        std::fs::create_dir_all(target.join("deep")).unwrap();
        chain(&target.join("deep"), 100_000);
        std::fs::create_dir_all(target.join("ro/sub")).unwrap();
        std::fs::write(target.join("ro/sub/f"), "f").unwrap();
        std::fs::set_permissions(
            target.join("ro/sub"),
            std::fs::Permissions::from_mode(0o555),
        )
        .unwrap();
        std::fs::set_permissions(target.join("ro"), std::fs::Permissions::from_mode(0o500))
            .unwrap();
        std::os::unix::fs::symlink(d.path(), target.join("link")).unwrap();
        std::fs::write(target.join("file"), "x").unwrap();
        // On a thread with a small stack: one frame per level would overflow it.
        let t = target.clone();
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || clear_dir(&t).unwrap())
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "the link is not followed"
        );
    }

    /// A tar of a chain of `depth` directories `d`, each sent as its own entry.
    fn deep_tar(depth: usize) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut name = String::from("d");
        for _ in 0..depth {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, &name, std::io::empty()).unwrap();
            name.push_str("/d");
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn unpack_refuses_trees_too_deep_to_unpack() {
        let d = fast_tempdir();
        let target = d.path().join("t");
        std::fs::create_dir(&target).unwrap();
        // 256 levels unpack.
        unpack(&deep_tar(MAX_DEPTH)[..], &target).unwrap();
        let deepest: std::path::PathBuf = std::iter::repeat_n("d", MAX_DEPTH).collect();
        assert!(target.join(&deepest).is_dir());
        clear_dir(&target).unwrap();
        // One more is refused, and not created.
        let e = unpack(&deep_tar(MAX_DEPTH + 1)[..], &target)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "refusing artifact d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/…: it is 257 directory levels \
             deep, more than 256 (a tree too deep to unpack)"
        );
        assert!(!target.join(&deepest).join("d").exists());
        clear_dir(&target).unwrap();
        // A name longer than a path in target can be (a long target, few levels).
        let long = d.path().join("x".repeat(200)).join("y".repeat(200));
        std::fs::create_dir_all(&long).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        let name = format!("{}/{}/", "a".repeat(250), "b".repeat(250)).repeat(8) + "f";
        b.append_data(&mut h, &name, std::io::empty()).unwrap();
        let e = unpack(&b.into_inner().unwrap()[..], &long)
            .unwrap_err()
            .to_string();
        let room = 4096 - long.as_os_str().len() - 2;
        assert_eq!(
            e,
            format!(
                "refusing artifact {}…: its name is {} bytes long, and a path in {} has \
                 room for {room} (a tree too deep to unpack)",
                "a".repeat(32),
                name.len(),
                long.display()
            )
        );
        clear_dir(&target).unwrap();
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
