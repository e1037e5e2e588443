//! Set-id bits out of a tree a job made: a job's `data/` is served (HTTP, rsync and scp of
//! `build_path`, replication) and becomes the next build's, so nothing in it may keep a
//! set-uid or set-gid bit, nor file capabilities (`security.capability`, which a job with
//! `CAP_SETFCAP` can set and which are as good as set-uid root for a root daemon's jobs).
//! Outside the sandbox, whoever can reach such a file could run it as its owner: the daemon's
//! user (host root for a root daemon) or a subordinate id.
//!
//! The walk is [`crate::walk`]'s: by fd, iterative, a bounded number of open descriptors
//! however deep the tree, never following a link. Sticky bits stay: on a directory it only
//! takes rights away (others may not remove what is not theirs), on a file Linux ignores it.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};

use crate::walk::{dir_flags, Order, Walk};

/// The bits removed.
pub const SET_ID: u32 = 0o6000;

/// File capabilities.
const CAPS: &str = "security.capability";

/// What a walk changed, and what it could not.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stripped {
    /// Files and directories whose set-uid or set-gid bit went.
    pub modes: usize,
    /// Files whose capabilities went.
    pub caps: usize,
    /// What this process may not change or read (`EPERM`, `EACCES`): the caller does it again
    /// where it may (in the user namespace).
    pub denied: usize,
}

fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

fn is_denied(e: rustix::io::Errno) -> bool {
    matches!(e, rustix::io::Errno::PERM | rustix::io::Errno::ACCESS)
}

/// Remove set-uid and set-gid bits from every file and directory under `root` (an open
/// directory; the root itself included), and capabilities from every regular file, as this
/// process's user.
pub(crate) fn strip_setid(root: BorrowedFd<'_>) -> io::Result<Stripped> {
    let mut out = Stripped::default();
    let st = rfs::fstat(root).map_err(errno)?;
    if st.st_mode & SET_ID != 0 {
        match chmod_fd(root, st.st_mode) {
            Ok(()) => out.modes += 1,
            Err(e) if is_denied(e) => out.denied += 1,
            Err(e) => return Err(errno(e)),
        }
    }
    let top = rfs::openat(root, ".", dir_flags(), Mode::empty()).map_err(errno)?;
    let mut w = Walk::new(top, Order::Any, Path::new("data"))?;
    loop {
        let Some(e) = w.next_entry()? else {
            if w.depth() == 0 {
                return Ok(out);
            }
            w.leave()?;
            continue;
        };
        if let Some(fd) = visit(w.dir()?, &e.name, &mut out)? {
            w.enter_fd(fd, &e.name)?;
        }
    }
}

/// Strip entry `name` of `dir`; a directory whose entries this process may read comes back
/// open, to be walked.
fn visit(dir: BorrowedFd<'_>, name: &OsStr, out: &mut Stripped) -> io::Result<Option<OwnedFd>> {
    let st = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) if is_denied(e) => {
            out.denied += 1;
            return Ok(None);
        }
        Err(e) => return Err(errno(e)),
    };
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind != FileType::Directory && kind != FileType::RegularFile {
        return Ok(None);
    }
    if st.st_mode & SET_ID != 0 {
        match chmod_at(dir, name, kind) {
            Ok(true) => out.modes += 1,
            Ok(false) => {}
            Err(e) if is_denied(e) => out.denied += 1,
            Err(e) => return Err(errno(e)),
        }
    }
    if kind == FileType::RegularFile {
        // Through the directory's descriptor: the final component is not followed.
        let mut path = OsString::from(format!("/proc/self/fd/{}/", dir.as_raw_fd()));
        path.push(name);
        match rfs::lgetxattr_query(&path, CAPS) {
            Ok(_) => match rfs::lremovexattr(&path, CAPS) {
                Ok(()) => out.caps += 1,
                Err(rustix::io::Errno::NODATA) => {}
                Err(e) if is_denied(e) => out.denied += 1,
                Err(e) => return Err(errno(e)),
            },
            Err(
                rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP | rustix::io::Errno::NOENT,
            ) => {}
            Err(e) if is_denied(e) => out.denied += 1,
            Err(e) => return Err(errno(e)),
        }
        return Ok(None);
    }
    match rfs::openat(dir, name, dir_flags(), Mode::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) if is_denied(e) => {
            out.denied += 1;
            Ok(None)
        }
        Err(e) => Err(errno(e)),
    }
}

/// Remove the set-id bits of entry `name` of `dir` when it is still a `kind`, by a descriptor
/// of its own (`O_PATH`, not following a link; changed through `/proc/self/fd`, which needs no
/// read permission). `Ok(false)` when it is no longer one.
fn chmod_at(dir: BorrowedFd<'_>, name: &OsStr, kind: FileType) -> rustix::io::Result<bool> {
    let fd = rfs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rfs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != kind {
        return Ok(false);
    }
    chmod_fd(fd.as_fd(), st.st_mode)?;
    Ok(true)
}

fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> rustix::io::Result<()> {
    rfs::chmod(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        Mode::from_raw_mode(mode & 0o7777 & !SET_ID),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::path::Path;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn set_id_bits_go_everywhere_links_are_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, "x").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o4755)).unwrap();
        let r = d.path().join("root");
        const LEVELS: usize = crate::walk::WINDOW * crate::walk::STRIDE + 20;
        // Deeper than the walk keeps open, with set-id entries at every level and a link out.
        let mut deep = r.clone();
        for i in 0..LEVELS {
            deep.push(format!("d{i}"));
            fs::create_dir_all(&deep).unwrap();
            fs::write(deep.join("f"), "f").unwrap();
            fs::set_permissions(deep.join("f"), fs::Permissions::from_mode(0o4711)).unwrap();
            fs::create_dir(deep.join(format!("side{i}"))).unwrap();
            fs::set_permissions(
                deep.join(format!("side{i}")),
                fs::Permissions::from_mode(0o3775),
            )
            .unwrap();
            symlink(&victim, deep.join("out")).unwrap();
        }
        fs::write(r.join("plain"), "p").unwrap();
        fs::set_permissions(r.join("plain"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::set_permissions(&r, fs::Permissions::from_mode(0o2755)).unwrap();
        let root = rfs::open(&r, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let s = strip_setid(root.as_fd()).unwrap();
        assert_eq!(
            s,
            Stripped {
                modes: 1 + LEVELS * 2,
                caps: 0,
                denied: 0
            }
        );
        assert_eq!(mode(&r), 0o755);
        assert_eq!(mode(&r.join("plain")), 0o640);
        let mut deep = r.clone();
        for i in 0..LEVELS {
            deep.push(format!("d{i}"));
            assert_eq!(mode(&deep.join("f")), 0o711, "{}", deep.display());
            assert_eq!(mode(&deep.join(format!("side{i}"))), 0o1775);
        }
        assert_eq!(mode(&victim), 0o4755, "the link's target is not touched");
        // Nothing left: a second walk changes nothing.
        assert_eq!(strip_setid(root.as_fd()).unwrap(), Stripped::default());
    }
}
