//! Files inside a root directory (an image tree, a build context, a stage), opened by fd.
//!
//! A [`Root`] is a directory fd. Every path inside it is resolved by the kernel with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: an absolute symlink or a `..` stays inside
//! the root (as it does for a process chrooted there), and more than 40 symlinks on the way is an
//! `ELOOP` error naming the path, never a lookup that gives up and carries on literally. Only
//! parent directories are resolved that way; the final component is then created, opened,
//! changed or removed relative to its parent's fd and, unless the caller asks for it, never
//! followed (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`). No host path string of anything inside the
//! root is ever built.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// The kernel's limit on symlinks followed in one lookup (`MAXSYMLINKS`).
pub const MAX_LINKS: usize = 40;

/// A directory that paths are resolved inside of.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
}

fn errno(e: rustix::io::Errno) -> io::Error {
    e.into()
}

/// The components of an in-root path: `/` and `.` dropped, `..` kept (the kernel resolves it,
/// never above the root).
pub fn components(inside: &Path) -> Vec<OsString> {
    inside
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

fn join(parts: &[OsString]) -> PathBuf {
    let mut p = PathBuf::new();
    for c in parts {
        p.push(c);
    }
    p
}

/// An error naming the in-root path it happened at (ELOOP gets an explicit message).
pub fn path_error(inside: &Path, e: io::Error) -> io::Error {
    let shown = Path::new("/").join(inside);
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::new(
            e.kind(),
            format!(
                "{}: too many levels of symbolic links (ELOOP: more than {MAX_LINKS} links, \
                 or a loop, while resolving it inside the image)",
                shown.display()
            ),
        )
    } else {
        io::Error::new(e.kind(), format!("{}: {e}", shown.display()))
    }
}

fn how() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

impl Root {
    /// Open the directory at host path `path` as a root (the path itself is trusted).
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = rfs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(Root { fd })
    }

    /// A root from an open directory fd.
    pub fn from_fd(fd: OwnedFd) -> Root {
        Root { fd }
    }

    /// The root directory's descriptor, to open paths below it with `RESOLVE_IN_ROOT`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Open `inside` with `flags`, resolving every symlink on the way (the final one too,
    /// unless `flags` has `O_NOFOLLOW`) inside the root. Errors are the raw errno.
    fn open_raw(&self, inside: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        let parts = components(inside);
        let rel = if parts.is_empty() {
            PathBuf::from(".")
        } else {
            join(&parts)
        };
        // The kernel answers EAGAIN when a concurrent rename could make `..` unsafe: retry.
        let mut tries = 0;
        loop {
            match rfs::openat2(
                &self.fd,
                &rel,
                flags | OFlags::CLOEXEC,
                Mode::empty(),
                how(),
            ) {
                Err(rustix::io::Errno::AGAIN) if tries < 16 => tries += 1,
                r => return r.map_err(errno),
            }
        }
    }

    /// Open `inside` (symlinks followed inside the root), e.g. `O_RDONLY | O_DIRECTORY`.
    pub fn open_in(&self, inside: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        self.open_raw(inside, flags)
            .map_err(|e| path_error(inside, e))
    }

    /// The directory holding `inside` (resolved inside the root; it must exist) and the final
    /// name, which is never `.`/`..` nor empty.
    pub fn parent(&self, inside: &Path) -> io::Result<(OwnedFd, OsString)> {
        let mut parts = components(inside);
        let name = match parts.pop() {
            Some(n) if n != ".." => n,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not a path to an entry", inside.display()),
                ))
            }
        };
        let dir = self
            .open_raw(&join(&parts), OFlags::PATH | OFlags::DIRECTORY)
            .map_err(|e| path_error(&join(&parts), e))?;
        Ok((dir, name))
    }

    /// Like [`Root::parent`], creating missing parent directories first (see
    /// [`Root::mkdir_all`]).
    pub fn parent_create(
        &self,
        inside: &Path,
        owner: Option<(u32, u32)>,
    ) -> io::Result<(OwnedFd, OsString)> {
        let mut parts = components(inside);
        let name = match parts.pop() {
            Some(n) if n != ".." => n,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not a path to an entry", inside.display()),
                ))
            }
        };
        let dir = self.mkdir_all(&join(&parts), owner, 0o755)?;
        Ok((dir, name))
    }

    /// `mkdir -p` inside the root: symlinks on the way are followed inside the root (a dangling
    /// one has its target created, as Docker does), created directories get `mode` (less the
    /// umask) and, when given, the owner. Returns an `O_PATH` fd of the directory.
    pub fn mkdir_all(
        &self,
        inside: &Path,
        owner: Option<(u32, u32)>,
        mode: u32,
    ) -> io::Result<OwnedFd> {
        let mut parts = components(inside);
        let mut hops = 0;
        'restart: loop {
            let mut cur = self
                .open_raw(Path::new("."), OFlags::PATH | OFlags::DIRECTORY)
                .map_err(|e| path_error(inside, e))?;
            let mut prefix: Vec<OsString> = Vec::new();
            for (i, c) in parts.iter().enumerate() {
                prefix.push(c.clone());
                let here = join(&prefix);
                match self.open_raw(&here, OFlags::PATH | OFlags::DIRECTORY) {
                    Ok(fd) => {
                        cur = fd;
                        continue;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(path_error(&here, e)),
                }
                match rfs::mkdirat(&cur, c.as_os_str(), Mode::from_raw_mode(mode)) {
                    Ok(()) => {
                        if let Some((uid, gid)) = owner {
                            chown_at(cur.as_fd(), c, uid, gid).map_err(|e| path_error(&here, e))?;
                        }
                        cur = rfs::openat(
                            &cur,
                            c.as_os_str(),
                            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                            Mode::empty(),
                        )
                        .map_err(errno)
                        .map_err(|e| path_error(&here, e))?;
                    }
                    Err(rustix::io::Errno::EXIST) => {
                        // A dangling symlink (or a chain ending nowhere): create its target.
                        let target =
                            rfs::readlinkat(&cur, c.as_os_str(), Vec::new()).map_err(|_| {
                                path_error(&here, io::Error::from_raw_os_error(libc::ENOTDIR))
                            })?;
                        hops += 1;
                        if hops > MAX_LINKS {
                            return Err(path_error(
                                inside,
                                io::Error::from_raw_os_error(libc::ELOOP),
                            ));
                        }
                        let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                        let mut next: Vec<OsString> = if target.is_absolute() {
                            Vec::new()
                        } else {
                            prefix[..prefix.len() - 1].to_vec()
                        };
                        next.extend(components(&target));
                        next.extend(parts[i + 1..].iter().cloned());
                        parts = next;
                        continue 'restart;
                    }
                    Err(e) => return Err(path_error(&here, errno(e))),
                }
            }
            return Ok(cur);
        }
    }
}

/// `fchownat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn chown_at(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    rfs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(errno)
}

/// The type of `name` in `dir` (not following a symlink), None when missing.
pub fn kind_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<FileType>> {
    match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(errno(e)),
    }
}

/// Open `name` in `dir` for reading if it is a regular file: never through a symlink, never
/// blocking (something swapped for a FIFO meanwhile cannot hang the reader), never becoming a
/// controlling terminal. `None` when it is something else; its `fstat` comes with it.
pub fn open_file_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<(OwnedFd, rfs::Stat)>> {
    let fd = rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno)?;
    let st = rfs::fstat(&fd).map_err(errno)?;
    Ok((FileType::from_raw_mode(st.st_mode) == FileType::RegularFile).then_some((fd, st)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn absolute_links_and_dotdot_stay_inside() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = d.path().join("root");
        fs::create_dir(&r).unwrap();
        symlink(outside.path(), r.join("abs")).unwrap();
        symlink("../../../..", r.join("up")).unwrap();
        let root = Root::open(&r).unwrap();
        let (p, n) = root.parent_create(Path::new("/abs/x/f"), None).unwrap();
        rfs::openat(
            &p,
            n.as_os_str(),
            OFlags::CREATE | OFlags::WRONLY,
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        let (p, n) = root.parent_create(Path::new("up/g"), None).unwrap();
        rfs::openat(
            &p,
            n.as_os_str(),
            OFlags::CREATE | OFlags::WRONLY,
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        let inner = r.join(outside.path().strip_prefix("/").unwrap());
        assert!(inner.join("x/f").is_file());
        assert!(r.join("g").is_file());
    }

    #[test]
    fn long_chains_fail_with_eloop() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = d.path();
        for i in 1..45 {
            symlink(format!("/l{}", i + 1), r.join(format!("l{i}"))).unwrap();
        }
        symlink(outside.path(), r.join("l45")).unwrap();
        let root = Root::open(r).unwrap();
        let e = root.parent_create(Path::new("/l1/x"), None).unwrap_err();
        assert_eq!(e.raw_os_error(), None);
        assert!(e.to_string().contains("ELOOP"), "{e}");
        assert!(e.to_string().starts_with("/l1: too many levels"), "{e}");
        let e = root
            .mkdir_all(Path::new("/l1/x/y"), None, 0o755)
            .unwrap_err();
        assert!(e.to_string().contains("ELOOP"), "{e}");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn dangling_links_get_their_target_created() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        symlink("/real/dir", r.join("link")).unwrap();
        let root = Root::open(r).unwrap();
        root.mkdir_all(Path::new("/link/sub"), None, 0o755).unwrap();
        assert!(r.join("real/dir/sub").is_dir());
        // A self-loop is ELOOP, not a hang.
        symlink("loop", r.join("loop")).unwrap();
        let e = root
            .mkdir_all(Path::new("/loop/x"), None, 0o755)
            .unwrap_err();
        assert!(e.to_string().contains("ELOOP"), "{e}");
    }
}
