//! A job's `data/`, by file descriptor.
//!
//! Everything below `data/` is the job's: it is bound at `/data`, and what a job leaves there is
//! carried into its group's next build (a copy, a btrfs snapshot, cache layers), so the next
//! build's `data/input`, `data/cache`, `data/artifacts` and `data/params` may be whatever the
//! last job made of them — a symlink to a host directory, a FIFO, a file. `data/` itself is not
//! (a mount point in the job; the daemon makes it). So the daemon never uses a host path string
//! below `data/`: it opens `data/` with `O_NOFOLLOW | O_DIRECTORY` from the job directory, and
//! every entry relative to that (`openat`/`mkdirat`/`unlinkat`, `O_NOFOLLOW`, `O_EXCL`).
//!
//! What the daemon needs to be a directory (its own mount points and directories: `cache`,
//! `artifacts`, `params`, `input`, `input/<job>`) and finds to be something else is removed —
//! the entry itself, never what a link points to — and replaced by an empty directory. Not
//! refused: the group's next build starts from its last one, so a refusal would fail every later
//! build of the group because of one job; replacing makes that entry start clean, and the job's
//! log says so.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use images::Store;

/// How an entry in the way is named in messages.
fn kind_name(t: FileType) -> &'static str {
    if t == FileType::Symlink {
        "a symlink"
    } else {
        "something that is not a directory"
    }
}

/// A job's `data/`, open.
pub(crate) struct Data {
    /// `data/` (`O_PATH | O_DIRECTORY`, opened without following a link).
    fd: OwnedFd,
    /// Its host path, for messages and for the store's tools (which run in the user namespace).
    path: PathBuf,
}

/// What was in the way of a directory the daemon needs, and was replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Replaced {
    /// Relative to `data/`, e.g. `input/up`.
    pub rel: PathBuf,
    /// `a symlink`, or `something that is not a directory` (a FIFO, a file...).
    pub what: &'static str,
}

impl Replaced {
    /// `/data/input/up`.
    pub(super) fn shown(&self) -> String {
        Path::new("/data").join(&self.rel).display().to_string()
    }
}

/// Directory `name` in `dir` as an `O_PATH` descriptor to resolve names in (`O_NOFOLLOW`: a
/// symlink there is `ENOTDIR`, never followed).
fn open_dir_at(dir: impl AsFd, name: &OsStr) -> io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

/// The type of `name` in `dir`, not following a link; `None` when missing.
fn kind_at(dir: impl AsFd, name: &OsStr) -> io::Result<Option<FileType>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The names of `rel`, which must be plain (`input/up`; no `..`, `/` or empty path).
fn plain_names(rel: &Path) -> io::Result<Vec<&OsStr>> {
    let mut names = Vec::new();
    for c in rel.components() {
        match c {
            std::path::Component::Normal(n) => names.push(n),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not a plain relative path", rel.display()),
                ))
            }
        }
    }
    if names.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "an empty path"));
    }
    Ok(names)
}

/// The `O_PATH` descriptor of directory `rel` below `root`, no symlink followed on the way and
/// nothing outside `root` (`openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or component by
/// component with `O_NOFOLLOW` where the kernel has no openat2): what a bind of it checks.
pub(crate) fn open_dir_beneath(root: &Path, rel: &Path) -> io::Result<OwnedFd> {
    let root = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match rustix::fs::openat2(&root, rel, flags, Mode::empty(), resolve) {
        Err(rustix::io::Errno::NOSYS) => {}
        r => return r.map_err(io::Error::from),
    }
    let mut cur = root;
    for name in plain_names(rel)? {
        cur = rustix::fs::openat(&cur, name, flags, Mode::empty())?;
    }
    Ok(cur)
}

impl Data {
    /// Open `<job_dir>/data` (the job directory is the daemon's; `data` must be a real
    /// directory). An `O_PATH` descriptor: it needs no permission on `data/` itself, which may
    /// belong to the image's user.
    pub(super) fn open(job_dir: &Path) -> io::Result<Data> {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let job = rustix::fs::open(job_dir, flags, Mode::empty())?;
        let fd = open_dir_at(&job, OsStr::new("data"))?;
        Ok(Data {
            fd,
            path: job_dir.join("data"),
        })
    }

    /// An `O_PATH` descriptor of `data/` itself, to bind it (`sandbox::Bind::from_fd`).
    pub(super) fn bind_fd(&self) -> io::Result<OwnedFd> {
        rustix::fs::openat(
            &self.fd,
            ".",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)
    }

    /// Remove `name` from `dir` (`dir_rel` below `data/`) whatever it is, never following a
    /// link: by fd as this process, else (what belongs to another sandbox id) with the store's
    /// tools in the user namespace, which remove without following either.
    fn remove(&self, store: &Store, dir: &OwnedFd, dir_rel: &Path, name: &OsStr) -> io::Result<()> {
        match images::walk::remove_at(dir.as_fd(), name, false) {
            Ok(()) => Ok(()),
            // By kind: the walker names the entry in its errors (no raw errno left).
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::PermissionDenied | io::ErrorKind::DirectoryNotEmpty
                ) =>
            {
                let path = self.path.join(dir_rel).join(name);
                store
                    .remove_tree(&path)
                    .map_err(|e| io::Error::other(e.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    /// Make `rel` (plain names below `data/`, e.g. `input/up`) a real directory, each of its
    /// components: a directory there stays as it is; anything else (a symlink, a FIFO, a file)
    /// is removed and replaced by an empty directory. Returns what was replaced.
    pub(super) fn ensure_dir(&self, store: &Store, rel: &Path) -> io::Result<Vec<Replaced>> {
        let mut replaced = Vec::new();
        let mut cur = rustix::io::dup(&self.fd)?;
        let mut at = PathBuf::new();
        for name in plain_names(rel)? {
            let here = at.join(name);
            let err =
                |e: io::Error| io::Error::new(e.kind(), format!("data/{}: {e}", here.display()));
            match kind_at(&cur, name).map_err(err)? {
                Some(FileType::Directory) => {}
                other => {
                    if let Some(kind) = other {
                        self.remove(store, &cur, &at, name).map_err(err)?;
                        replaced.push(Replaced {
                            rel: here.clone(),
                            what: kind_name(kind),
                        });
                    }
                    match rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(err(e.into())),
                    }
                }
            }
            cur = open_dir_at(&cur, name).map_err(err)?;
            at = here;
        }
        Ok(replaced)
    }

    /// Make `name` (one plain name below `data/`) a new empty directory, whatever was there
    /// (removed without following a link).
    pub(super) fn fresh_dir(&self, store: &Store, name: &str) -> io::Result<OwnedFd> {
        let name = OsStr::new(name);
        let err = |e: io::Error| {
            io::Error::new(e.kind(), format!("data/{}: {e}", Path::new(name).display()))
        };
        if kind_at(&self.fd, name).map_err(err)?.is_some() {
            self.remove(store, &self.fd, Path::new(""), name)
                .map_err(err)?;
        }
        rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o755))
            .map_err(|e| err(e.into()))?;
        open_dir_at(&self.fd, name).map_err(err)
    }

    /// How `name` in `data/` is named when it is there and not a directory (`a symlink`...).
    pub(super) fn not_a_dir(&self, name: &str) -> io::Result<Option<&'static str>> {
        Ok(kind_at(&self.fd, OsStr::new(name))?
            .filter(|k| *k != FileType::Directory)
            .map(kind_name))
    }

    /// Remove `name` from `data/` (see [`Data::ensure_dir`]) and make it an empty directory
    /// again if this process may (it may not when `data/` belongs to the image's user).
    pub(super) fn replace_with_dir(&self, store: &Store, name: &str) -> io::Result<()> {
        let name = OsStr::new(name);
        self.remove(store, &self.fd, Path::new(""), name)?;
        let _ = rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o755));
        Ok(())
    }

    /// `data/<dir>/<name>` as a new file holding `contents` (`O_CREAT | O_EXCL | O_NOFOLLOW`:
    /// never through a link, never into something that was there).
    pub(super) fn create_file(dir: &OwnedFd, name: &str, contents: &[u8]) -> io::Result<()> {
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )?;
        io::Write::write_all(&mut std::fs::File::from(fd), contents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn store(dir: &Path) -> Store {
        Store::open(
            &dir.join("store"),
            Some(images::BackendKind::Plain),
            vec!["/nonexistent-helper".into()],
        )
        .unwrap()
    }

    #[test]
    fn what_is_in_the_way_is_replaced_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let job = d.path().join("job");
        let data = job.join("data");
        std::fs::create_dir_all(&data).unwrap();
        symlink(outside.path(), data.join("input")).unwrap();
        nix::unistd::mkfifo(&data.join("cache"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::create_dir(data.join("params")).unwrap();
        symlink(outside.path().join("passwd"), data.join("params/name")).unwrap();
        let st = store(d.path());
        let data_fd = Data::open(&job).unwrap();
        let replaced = data_fd.ensure_dir(&st, Path::new("input/up")).unwrap();
        assert_eq!(
            replaced,
            [Replaced {
                rel: "input".into(),
                what: "a symlink"
            }]
        );
        assert_eq!(replaced[0].shown(), "/data/input");
        assert!(std::fs::symlink_metadata(data.join("input/up"))
            .unwrap()
            .is_dir());
        let replaced = data_fd.ensure_dir(&st, Path::new("cache")).unwrap();
        assert_eq!(replaced[0].what, "something that is not a directory");
        // Already directories: kept, nothing reported.
        let replaced = data_fd.ensure_dir(&st, Path::new("input/up")).unwrap();
        assert!(replaced.is_empty());
        let params = data_fd.fresh_dir(&st, "params").unwrap();
        Data::create_file(&params, "name", b"v").unwrap();
        assert_eq!(
            std::fs::read_to_string(data.join("params/name")).unwrap(),
            "v"
        );
        // A file that is there already (or a link) is never written through.
        symlink(outside.path().join("x"), data.join("params/other")).unwrap();
        assert_eq!(
            Data::create_file(&params, "other", b"v")
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EEXIST)
        );
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // data/ itself must be a directory.
        std::fs::remove_dir_all(&data).unwrap();
        symlink(outside.path(), &data).unwrap();
        assert!(matches!(
            Data::open(&job).err().and_then(|e| e.raw_os_error()),
            Some(libc::ELOOP | libc::ENOTDIR)
        ));
        // A bind source is opened beneath its root without a link on the way.
        std::fs::create_dir_all(job.join("real/artifacts")).unwrap();
        assert!(open_dir_beneath(&job, Path::new("real/artifacts")).is_ok());
        let e = open_dir_beneath(&job, Path::new("data/artifacts")).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
            "{e}"
        );
    }
}
