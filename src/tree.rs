//! Trees of a ready job as tar streams, read by file descriptor: its `data/artifacts`
//! (`GET /artifacts`, `mistry exec`) and a whole build (`GET /api/build`, replication between
//! agents). No symlink is followed (links inside are sent as links), so a job cannot make the
//! server send host files; no entry carries a set-uid or set-gid bit.

use std::os::fd::OwnedFd;

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// Open a job's `data/artifacts` without following a symlink anywhere below the job directory:
/// a job that replaced it (or `data/`) with a link gets an error, never the link's target.
pub(crate) fn open_artifacts(job_dir: &std::path::Path) -> std::io::Result<OwnedFd> {
    let dir = rustix::fs::open(
        job_dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    open_beneath(&dir, std::path::Path::new("data/artifacts"), true)
}

/// Open `rel` under `root` (a directory fd) without following any symlink and without leaving
/// `root`: `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or, on kernels without openat2,
/// `openat(O_NOFOLLOW)` component by component.
pub(crate) fn open_beneath(
    root: &OwnedFd,
    rel: &std::path::Path,
    dir: bool,
) -> std::io::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        rel
    };
    let mut flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
    flags |= if dir {
        OFlags::DIRECTORY
    } else {
        // A FIFO must not block the walk.
        OFlags::NONBLOCK
    };
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match rustix::fs::openat2(root, rel, flags, Mode::empty(), resolve) {
        Err(rustix::io::Errno::NOSYS) => {}
        r => return r.map_err(std::io::Error::from),
    }
    let mut cur = rustix::io::dup(root)?;
    let parts: Vec<_> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        let name = match part {
            std::path::Component::Normal(n) => *n,
            std::path::Component::CurDir => continue,
            _ => return Err(std::io::Error::from_raw_os_error(libc::EXDEV)),
        };
        let last = i + 1 == parts.len();
        let f = if last {
            flags
        } else {
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
        };
        cur = rustix::fs::openat(&cur, name, f, Mode::empty())?;
    }
    Ok(cur)
}

/// Append the directory entry of `dir` alone (its mode, owner and time) to `b` as `name`.
pub(crate) fn append_dir<W: std::io::Write>(
    b: &mut tar::Builder<W>,
    dir: &OwnedFd,
    name: &std::path::Path,
) -> std::io::Result<()> {
    let st = rustix::fs::fstat(dir)?;
    let mut h = images::walk::tar_header(
        &st,
        tar::EntryType::Directory,
        0,
        images::walk::Sent::JobTree,
    );
    b.append_data(&mut h, name, std::io::empty())
}

/// Whether opening a path below a root failed because it is not there (missing, or a symlink
/// or a non-directory on the way, which [`open_beneath`] refuses to follow).
pub(crate) fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR)
    )
}

/// Write the tree under `root` (an open directory: a job's artifacts) as a tar stream. Every
/// entry is opened by fd below `root`, never through a symlink: links are sent as links (their
/// targets are not read), FIFOs, sockets and devices are skipped.
pub(crate) fn write_tree<W: std::io::Write>(root: &OwnedFd, out: W) -> std::io::Result<W> {
    let mut b = tar::Builder::new(out);
    append_tree(&mut b, root, std::path::Path::new(""))?;
    b.into_inner()
}

/// Append regular file `rel` below `dir` (opened by fd, no symlink followed) to `b` as `name`;
/// `false` when it is missing or not a regular file (nothing appended).
pub(crate) fn append_file<W: std::io::Write>(
    b: &mut tar::Builder<W>,
    dir: &OwnedFd,
    rel: &std::path::Path,
    name: &std::path::Path,
) -> std::io::Result<bool> {
    let fd = match open_beneath(dir, rel, false) {
        Ok(fd) => fd,
        Err(e) if is_gone(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    let st = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Ok(false);
    }
    let size = u64::try_from(st.st_size).unwrap_or(0);
    let mut h = images::walk::tar_header(
        &st,
        tar::EntryType::Regular,
        size,
        images::walk::Sent::JobTree,
    );
    let file = std::io::Read::take(std::fs::File::from(fd), size);
    b.append_data(&mut h, name, file)?;
    Ok(true)
}

/// [`write_tree`] into a tar builder, every name under `prefix` (when not empty, `prefix`
/// itself is sent first as the tree's root directory): the iterative walk of
/// [`images::walk::append_tree`] (a bounded number of open descriptors however deep the tree,
/// names in order, an error naming the entry past [`images::walk::MAX_PATH`] bytes).
pub(crate) fn append_tree<W: std::io::Write>(
    b: &mut tar::Builder<W>,
    root: &OwnedFd,
    prefix: &std::path::Path,
) -> std::io::Result<()> {
    let root = rustix::io::fcntl_dupfd_cloexec(root, 0)?;
    images::walk::append_tree(b, root, prefix, images::walk::Sent::JobTree)
}

/// One entry of a job's artifacts as the web view lists it ([`list_tree`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Listed {
    /// Its path below the artifacts directory (`/`-separated; lossy UTF-8 for display).
    pub(crate) path: String,
    /// `file`, `dir`, `link` or `other` (FIFOs, sockets, devices).
    pub(crate) kind: &'static str,
    /// A file's size in bytes (0 for the others).
    pub(crate) size: u64,
}

/// The entries below `root` (an open directory: a job's artifacts), sorted by path; at most
/// `max` of them (`true` with them when there were more): the iterative walk of
/// [`images::walk::Walk`], by fd, no symlink followed (a link is listed as a link).
pub(crate) fn list_tree(root: &OwnedFd, max: usize) -> std::io::Result<(Vec<Listed>, bool)> {
    use images::walk::{Order, Walk};
    use rustix::fs::{AtFlags, FileType};
    // Opened again, not duplicated: a duplicate would share `root`'s position in the directory.
    let top = rustix::fs::openat(
        root,
        ".",
        images::walk::dir_flags(),
        rustix::fs::Mode::empty(),
    )?;
    // In the filesystem's order, streamed, and sorted once the first `max` are found: a sorted
    // walk reads each directory's names whole first (a job can leave millions).
    let mut w = Walk::new(top, Order::Any, std::path::Path::new("artifacts"))?;
    let mut out: Vec<Listed> = Vec::new();
    loop {
        let Some(e) = w.next_entry()? else {
            if w.depth() == 0 {
                out.sort_by(|a, b| a.path.cmp(&b.path));
                return Ok((out, false));
            }
            w.leave()?;
            continue;
        };
        if out.len() == max {
            out.sort_by(|a, b| a.path.cmp(&b.path));
            return Ok((out, true));
        }
        let st = match rustix::fs::statat(w.dir()?, &e.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(err) => return Err(w.error_at(Some(&e.name), err.into())),
        };
        let Some(rel) = w.rel_path(&e.name, images::walk::MAX_PATH) else {
            continue;
        };
        let ft = FileType::from_raw_mode(st.st_mode);
        let kind = match ft {
            FileType::RegularFile => "file",
            FileType::Directory => "dir",
            FileType::Symlink => "link",
            _ => "other",
        };
        out.push(Listed {
            path: rel.to_string_lossy().into_owned(),
            kind,
            size: if ft == FileType::RegularFile {
                u64::try_from(st.st_size).unwrap_or(0)
            } else {
                0
            },
        });
        if ft == FileType::Directory {
            w.enter(&e.name)?;
        }
    }
}

/// Open regular file `rel` below `root` (a job's artifacts) for reading: by fd, never through a
/// symlink nor out of `root` (`..`, absolute paths: refused by [`open_beneath`]); `NotFound`
/// for anything that is not a regular file there. Its size with it.
pub(crate) fn open_artifact_file(
    root: &OwnedFd,
    rel: &std::path::Path,
) -> std::io::Result<(std::fs::File, u64)> {
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(std::io::ErrorKind::NotFound.into());
    }
    let fd = match open_beneath(root, rel, false) {
        Ok(fd) => fd,
        Err(e) if is_gone(&e) || e.raw_os_error() == Some(libc::EXDEV) => {
            return Err(std::io::ErrorKind::NotFound.into())
        }
        Err(e) => return Err(e),
    };
    let st = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(std::io::ErrorKind::NotFound.into());
    }
    // Opened O_NONBLOCK (a FIFO must not block): a regular file reads the same either way.
    Ok((
        std::fs::File::from(fd),
        u64::try_from(st.st_size).unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(tar: &[u8]) -> Vec<(String, tar::EntryType, Option<String>)> {
        let mut a = tar::Archive::new(tar);
        let mut v: Vec<_> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                    e.link_name().unwrap().map(|l| l.display().to_string()),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn artifacts_are_read_by_fd_and_links_are_not_followed() {
        let job = tempfile::tempdir().unwrap();
        let art = job.path().join("data/artifacts");
        std::fs::create_dir_all(art.join("sub")).unwrap();
        std::fs::write(art.join("file"), "content").unwrap();
        std::fs::write(art.join("sub/x"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", art.join("etc")).unwrap();
        nix::unistd::mkfifo(&art.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let root = open_artifacts(job.path()).unwrap();
        let tar = write_tree(&root, Vec::new()).unwrap();
        use tar::EntryType::{Directory, Regular, Symlink};
        assert_eq!(
            entries(&tar),
            vec![
                ("etc".into(), Symlink, Some("/etc".into())),
                ("file".into(), Regular, None),
                ("sub".into(), Directory, None),
                ("sub/x".into(), Regular, None),
            ]
        );

        // data/artifacts, or data/, replaced by a link: refused, whatever the link says.
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(other.path().join("artifacts")).unwrap();
        std::fs::remove_dir_all(&art).unwrap();
        for target in [other.path().join("artifacts"), "../../..".into()] {
            std::os::unix::fs::symlink(&target, &art).unwrap();
            let e = open_artifacts(job.path()).unwrap_err();
            assert!(
                matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
                "{target:?}: {e}"
            );
            std::fs::remove_file(&art).unwrap();
        }
        std::fs::remove_dir_all(job.path().join("data")).unwrap();
        std::os::unix::fs::symlink(other.path(), job.path().join("data")).unwrap();
        let e = open_artifacts(job.path()).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
            "{e}"
        );
    }

    #[test]
    fn artifacts_are_listed_and_opened_one_by_one_without_following_links() {
        let job = tempfile::tempdir().unwrap();
        let art = job.path().join("data/artifacts");
        std::fs::create_dir_all(art.join("d/e")).unwrap();
        std::fs::write(art.join("d/e/f.txt"), "deep").unwrap();
        std::fs::write(job.path().join("secret"), "outside").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", art.join("passwd")).unwrap();
        std::os::unix::fs::symlink("../../secret", art.join("up")).unwrap();
        std::os::unix::fs::symlink("d", art.join("dlink")).unwrap();
        nix::unistd::mkfifo(&art.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let root = open_artifacts(job.path()).unwrap();
        let (all, more) = list_tree(&root, 100).unwrap();
        let got: Vec<(&str, &str, u64)> = all
            .iter()
            .map(|l| (l.path.as_str(), l.kind, l.size))
            .collect();
        assert_eq!(
            got,
            vec![
                ("d", "dir", 0),
                ("d/e", "dir", 0),
                ("d/e/f.txt", "file", 4),
                ("dlink", "link", 0),
                ("fifo", "other", 0),
                ("passwd", "link", 0),
                ("up", "link", 0),
            ]
        );
        assert!(!more);
        let (first, more) = list_tree(&root, 2).unwrap();
        assert_eq!((first.len(), more), (2, true));

        let (mut f, size) = open_artifact_file(&root, std::path::Path::new("d/e/f.txt")).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut f, &mut text).unwrap();
        assert_eq!((text.as_str(), size), ("deep", 4));
        for refused in [
            "passwd",
            "up",
            "dlink/e/f.txt",
            "fifo",
            "d",
            "../../secret",
            "d/../../../secret",
            "/etc/passwd",
            "missing",
        ] {
            let e = open_artifact_file(&root, std::path::Path::new(refused)).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{refused}: {e}");
        }
    }
}
