//! Iterative walks of directory trees by file descriptor: how every tree that a job, a RUN step
//! or a project may have made is removed, copied, chowned, measured, hashed or packed.
//!
//! Such a tree can be as deep as its maker likes (a loop of `mkdir d && cd d` makes 100,000
//! levels in seconds). A [`Walk`] keeps one small record per level on the heap (the directory's
//! name, device and inode, where its reading stopped), never a stack frame per level, and a
//! bounded number of directory descriptors: the top's, the current level's and those of the
//! [`WINDOW`] levels above it, and "anchors" further up — every [`STRIDE`]th level within
//! `WINDOW × STRIDE` levels, every `STRIDE²`th within `WINDOW × STRIDE²`, and so on: at most
//! [`max_open`] (46 at 100,000 levels, 82 for the deepest tree a filesystem can hold). Coming
//! back up into a level whose descriptor was closed, the walk opens it again by name from the
//! nearest open level above it (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`: never
//! through a link, never out of that level), together with the levels between that it keeps,
//! and checks that each is still the directory it left (device and inode): a tree moved
//! meanwhile is an error, never a walk outside it. The way back up costs a few lookups per
//! level. (Not through `..`: inside a bind mount of a subdirectory, as in the tool sandboxes,
//! the kernel checks every `..` against the mount's root by walking the whole path up, which
//! makes the way back up quadratic in the depth.) A directory is entered with `O_NOFOLLOW` and
//! everything else is handled relative to its parent's descriptor: no symlink is ever
//! followed, and no host path string of anything below the top is ever built.
//!
//! Entries are streamed (`getdents`) in the order the filesystem gives them ([`Order::Any`]:
//! a directory of millions of entries costs no more memory than one of ten), or sorted by name
//! ([`Order::Sorted`], for hashes and tar streams that must not depend on the filesystem): a
//! sorted walk holds the names still to visit of each directory on its current path, i.e. at
//! most the names of those directories, never anything per level of depth alone.
//!
//! Names of entries are built only where a consumer needs them (tar streams, hashes, hard links
//! of a copy), and never longer than [`MAX_PATH`] bytes: a deeper entry is an error naming it,
//! so that no stream grows with the square of a tree's depth.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, Dir, FileType, Mode, OFlags, SeekFrom};
use rustix::io::Errno;

/// The levels above the current one that a walk keeps open.
pub const WINDOW: usize = 8;

/// The spacing of the anchors a walk keeps open further up: every `STRIDE`th level within
/// `WINDOW × STRIDE` levels of the current one, every `STRIDE²`th within `WINDOW × STRIDE²`,
/// and so on.
pub const STRIDE: usize = 16;

/// The most directory descriptors a walk at `depth` holds open (a copy holds two walks): the
/// top, the window, and `WINDOW` anchors for each tier whose range the depth reaches.
pub fn max_open(depth: usize) -> usize {
    let mut n = 1 + WINDOW + 1;
    let mut span = WINDOW * STRIDE;
    loop {
        n += WINDOW + 1;
        if span > depth {
            return n;
        }
        span = span.saturating_mul(STRIDE);
    }
}

/// Whether a walk at `depth` keeps level `p` open: the top, the window, the anchors.
fn keeps(p: usize, depth: usize) -> bool {
    if p == 0 || p + WINDOW >= depth {
        return true;
    }
    let mut stride = STRIDE;
    loop {
        let span = WINDOW.saturating_mul(stride);
        if p % stride == 0 && p + span >= depth {
            return true;
        }
        if span > depth || stride > p {
            return false;
        }
        stride = stride.saturating_mul(STRIDE);
    }
}

/// The longest name (relative to the top, in bytes) a walk builds for an entry: Linux's
/// `PATH_MAX`. Entries deeper than that cannot be named in a tar stream or a hash.
pub const MAX_PATH: usize = 4096;

/// Levels shown at each end of a deep path in an error (the middle is elided).
const SHOWN_LEVELS: usize = 8;

/// Attempts to remove a directory that keeps getting entries (a process still writing there).
const REMOVE_ATTEMPTS: usize = 8;

/// In which order a walk gives a directory's entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The filesystem's, streamed.
    Any,
    /// By name (bytes), each directory's names read at once.
    Sorted,
}

/// One entry of a directory (never `.` or `..`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry's name in its directory (one component, not a path).
    pub name: OsString,
    /// What it is (from `getdents`, or `lstat` where the filesystem does not say).
    pub kind: FileType,
}

#[derive(Debug)]
struct Level {
    /// Where this level's name ends in [`Walk::names`] (it starts where its parent's ends).
    name_end: usize,
    dev: u64,
    ino: u64,
    /// Streamed walks: the seek cookie of the next entry (0: from the start).
    cookie: i64,
    /// Sorted walks: the entries still to visit, last first (None: not read yet).
    sorted: Option<Vec<Entry>>,
    /// Its stream, while the walk keeps it open (see [`keeps`]).
    dir: Option<Box<Dir>>,
}

/// A depth-first walk below one directory (see the module's documentation). The walk is at one
/// directory at a time: [`Walk::next_entry`] gives its entries, [`Walk::enter`] goes into one
/// of its subdirectories, [`Walk::leave`] back up.
#[derive(Debug)]
pub struct Walk {
    levels: Vec<Level>,
    /// The names of the levels below the top, one after the other.
    names: Vec<u8>,
    /// How many levels hold an open stream.
    open: usize,
    order: Order,
    /// A directory opened again starts from its beginning instead of where its reading
    /// stopped (removal: what was read is gone).
    restart: bool,
    /// How the top is shown in errors.
    shown: PathBuf,
}

/// How a walk opens a directory: for reading, never through a symlink.
pub fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY
}

fn errno(e: Errno) -> io::Error {
    e.into()
}

impl Walk {
    /// A walk below `top` (a directory opened for reading), shown as `shown` in errors.
    pub fn new(top: OwnedFd, order: Order, shown: &Path) -> io::Result<Walk> {
        let st = rfs::fstat(&top).map_err(errno)?;
        let dir = Dir::new(top).map_err(errno)?;
        Ok(Walk {
            levels: vec![Level {
                name_end: 0,
                dev: st.st_dev,
                ino: st.st_ino,
                cookie: 0,
                sorted: None,
                dir: Some(Box::new(dir)),
            }],
            names: Vec::new(),
            open: 1,
            order,
            restart: false,
            shown: shown.to_path_buf(),
        })
    }

    /// A walk below the directory at host path `path` (trusted; a symlink as its last component
    /// is not followed: `ELOOP`).
    pub fn open(path: &Path, order: Order) -> io::Result<Walk> {
        let fd = rfs::open(path, dir_flags(), Mode::empty())
            .map_err(|e| io::Error::new(errno(e).kind(), format!("{}: {e}", path.display())))?;
        Walk::new(fd, order, path)
    }

    /// How many levels below the top the walk is (0: at the top).
    pub fn depth(&self) -> usize {
        self.levels.len() - 1
    }

    /// The current directory's descriptor.
    pub fn dir(&self) -> io::Result<BorrowedFd<'_>> {
        match self.levels.last().and_then(|l| l.dir.as_deref()) {
            Some(d) => d.fd().map_err(errno),
            None => Err(io::Error::other("a walk without an open directory")),
        }
    }

    /// How many directory descriptors the walk holds open.
    pub fn open_count(&self) -> usize {
        self.open
    }

    fn level_name(&self, i: usize) -> &OsStr {
        let start = if i == 0 {
            0
        } else {
            self.levels[i - 1].name_end
        };
        OsStr::from_bytes(&self.names[start..self.levels[i].name_end])
    }

    /// The next entry of the current directory, `None` at its end.
    pub fn next_entry(&mut self) -> io::Result<Option<Entry>> {
        let depth = self.depth();
        if self.order == Order::Sorted {
            if self.levels[depth].sorted.is_none() {
                let mut all = Vec::new();
                while let Some(e) = self.read_one()? {
                    all.push(e);
                }
                all.sort_unstable_by(|a, b| b.name.cmp(&a.name));
                self.levels[depth].sorted = Some(all);
            }
            return Ok(self.levels[depth].sorted.as_mut().and_then(Vec::pop));
        }
        self.read_one()
    }

    /// The next entry of the current directory's stream.
    fn read_one(&mut self) -> io::Result<Option<Entry>> {
        let depth = self.depth();
        loop {
            let Some(dir) = self.levels[depth].dir.as_deref_mut() else {
                return Ok(None);
            };
            let e = match dir.read() {
                None => return Ok(None),
                Some(Err(e)) => return Err(self.error_at(None, errno(e))),
                Some(Ok(e)) => e,
            };
            self.levels[depth].cookie = e.offset();
            let name = e.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = OsStr::from_bytes(name).to_os_string();
            let mut kind = e.file_type();
            if kind == FileType::Unknown {
                match rfs::statat(self.dir()?, &name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => kind = FileType::from_raw_mode(st.st_mode),
                    // Gone meanwhile.
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(self.error_at(Some(&name), errno(e))),
                }
            }
            return Ok(Some(Entry { name, kind }));
        }
    }

    /// Go into subdirectory `name` of the current directory (never through a symlink).
    pub fn enter(&mut self, name: &OsStr) -> io::Result<()> {
        let fd = rfs::openat(self.dir()?, name, dir_flags(), Mode::empty())
            .map_err(|e| self.error_at(Some(name), errno(e)))?;
        self.enter_fd(fd, name)
    }

    /// Go into subdirectory `name` of the current directory, which the caller opened as `fd`
    /// (for reading, relative to [`Walk::dir`], with `O_NOFOLLOW`).
    pub fn enter_fd(&mut self, fd: OwnedFd, name: &OsStr) -> io::Result<()> {
        let st = rfs::fstat(&fd).map_err(|e| self.error_at(Some(name), errno(e)))?;
        let dir = Dir::new(fd).map_err(errno)?;
        self.names.extend_from_slice(name.as_bytes());
        self.levels.push(Level {
            name_end: self.names.len(),
            dev: st.st_dev,
            ino: st.st_ino,
            cookie: 0,
            sorted: None,
            dir: Some(Box::new(dir)),
        });
        self.open += 1;
        // The levels that just left a tier's range close, unless another tier keeps them
        // (their place in the walk stays in their records).
        let depth = self.depth();
        let mut span = WINDOW;
        loop {
            if let Some(q) = depth.checked_sub(span + 1).filter(|q| *q > 0) {
                if !keeps(q, depth) && self.levels[q].dir.take().is_some() {
                    self.open -= 1;
                }
            }
            if span > depth {
                return Ok(());
            }
            span = span.saturating_mul(STRIDE);
        }
    }

    /// Go back up to the parent directory; returns the name of the directory left.
    pub fn leave(&mut self) -> io::Result<OsString> {
        let depth = self.depth();
        if depth == 0 {
            return Err(io::Error::other("a walk cannot leave its top directory"));
        }
        let parent = depth - 1;
        if self.levels[parent].dir.is_none() {
            self.reopen(parent)?;
        }
        if let Some(l) = self.levels.pop() {
            if l.dir.is_some() {
                self.open -= 1;
            }
        }
        let start = self.levels.last().map_or(0, |l| l.name_end);
        Ok(OsString::from_vec(self.names.split_off(start)))
    }

    /// Open level `p` (closed) again, by name from the nearest open level above it, with the
    /// levels between that the walk at `p` keeps (see [`keeps`]). Each is opened from the one
    /// kept above it by `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` (the levels in
    /// between resolved by the kernel in the same call, never through a link or out of the
    /// anchor) and checked to be the directory it was (device and inode).
    fn reopen(&mut self, p: usize) -> io::Result<()> {
        let Some(anchor) = (0..p).rev().find(|q| self.levels[*q].dir.is_some()) else {
            return Err(io::Error::other("a walk without an open directory above"));
        };
        let mut from = anchor;
        for q in (anchor + 1..=p).filter(|q| keeps(*q, p)) {
            let fd = self.open_below(from, q).map_err(|e| {
                let shown = self.display_level(q);
                io::Error::new(e.kind(), format!("{shown}: opening it again: {e}"))
            })?;
            let st = rfs::fstat(&fd).map_err(errno)?;
            let level = &self.levels[q];
            if (st.st_dev, st.st_ino) != (level.dev, level.ino) {
                return Err(io::Error::other(format!(
                    "{}: the tree was moved or replaced while it was walked",
                    self.display_level(q)
                )));
            }
            let seek = (self.order == Order::Any && !self.restart && level.cookie != 0)
                .then_some(level.cookie);
            let mut dir = Dir::new(fd).map_err(errno)?;
            if let Some(cookie) = seek {
                dir.seek(cookie).map_err(errno)?;
            }
            self.levels[q].dir = Some(Box::new(dir));
            self.open += 1;
            from = q;
        }
        Ok(())
    }

    /// Open level `q` from level `from` above it (which is open): the names of the levels
    /// between, in as few `openat2` calls as `PATH_MAX` allows (component by component with
    /// `O_NOFOLLOW` on a kernel without it).
    fn open_below(&self, from: usize, q: usize) -> io::Result<OwnedFd> {
        let Some(top) = self.levels[from].dir.as_deref() else {
            return Err(io::Error::other("a walk lost an open directory"));
        };
        let top = top.fd().map_err(errno)?;
        let resolve = rfs::ResolveFlags::BENEATH
            | rfs::ResolveFlags::NO_SYMLINKS
            | rfs::ResolveFlags::NO_MAGICLINKS;
        let mut cur: Option<OwnedFd> = None;
        let mut i = from + 1;
        while i <= q {
            // As many names as fit in one path.
            let mut path = Vec::new();
            while i <= q {
                let name = self.level_name(i).as_bytes();
                if !path.is_empty() && path.len() + 1 + name.len() >= MAX_PATH {
                    break;
                }
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(name);
                i += 1;
            }
            let at = cur.as_ref().map_or(top, |fd| fd.as_fd());
            let path = OsStr::from_bytes(&path);
            let fd = match rfs::openat2(at, path, dir_flags(), Mode::empty(), resolve) {
                Err(Errno::NOSYS) => {
                    let mut step =
                        rfs::openat(at, ".", dir_flags(), Mode::empty()).map_err(errno)?;
                    for name in path.as_bytes().split(|b| *b == b'/') {
                        step =
                            rfs::openat(&step, OsStr::from_bytes(name), dir_flags(), Mode::empty())
                                .map_err(errno)?;
                    }
                    step
                }
                r => r.map_err(errno)?,
            };
            cur = Some(fd);
        }
        cur.ok_or_else(|| io::Error::other("no level to open"))
    }

    /// The name of `name` in the current directory relative to the top, `None` when it would
    /// be longer than `max` bytes.
    pub fn rel_path(&self, name: &OsStr, max: usize) -> Option<PathBuf> {
        let len = self.names.len() + self.depth() + name.len();
        if len > max {
            return None;
        }
        let mut p = PathBuf::new();
        for i in 1..self.levels.len() {
            p.push(self.level_name(i));
        }
        p.push(name);
        Some(p)
    }

    /// How `name` in the current directory (or the directory itself) is shown in errors: the
    /// top, then the levels down to it, the middle of a deep path elided.
    pub fn display(&self, name: Option<&OsStr>) -> String {
        let dir = self.display_level(self.depth());
        match name {
            Some(n) => Path::new(&dir).join(n).display().to_string(),
            None => dir,
        }
    }

    /// How level `q` (at or above the current one) is shown in errors.
    fn display_level(&self, q: usize) -> String {
        let mut p = self.shown.clone();
        for i in 1..=q {
            if q > 2 * SHOWN_LEVELS && i == SHOWN_LEVELS + 1 {
                p.push(format!("…({} more levels)…", q - 2 * SHOWN_LEVELS));
            }
            if q <= 2 * SHOWN_LEVELS || i <= SHOWN_LEVELS || i > q - SHOWN_LEVELS {
                p.push(self.level_name(i));
            }
        }
        p.display().to_string()
    }

    /// `e` with the path of `name` (or of the current directory) in front.
    pub fn error_at(&self, name: Option<&OsStr>, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("{}: {e}", self.display(name)))
    }
}

// ---- removal ----

/// Give directory `name` in `dir` owner rwx, when this process's user owns it: through an
/// `O_PATH|O_NOFOLLOW` descriptor (so never a symlink's target) and its `/proc/self/fd` entry,
/// as `fchmod` needs a descriptor opened for reading, which a mode-000 directory refuses.
fn make_owner_rwx(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let fd = rfs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno)?;
    let st = rfs::fstat(&fd).map_err(errno)?;
    if st.st_uid != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::from_raw_os_error(libc::EACCES));
    }
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    rfs::chmod(
        path.as_str(),
        Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700),
    )
    .map_err(errno)
}

/// A directory of this process's user that it may not list or change: owner rwx first.
fn make_writable(dir: BorrowedFd<'_>) -> io::Result<()> {
    let st = rfs::fstat(dir).map_err(errno)?;
    if st.st_mode & 0o300 != 0o300 && st.st_uid == nix::unistd::geteuid().as_raw() {
        rfs::fchmod(dir, Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700)).map_err(errno)?;
    }
    Ok(())
}

/// Open subdirectory `name` of `dir` to empty it (with `owner`, one of this process's user
/// that refuses it is given owner rwx first); `None` when it is gone.
fn open_to_remove(dir: BorrowedFd<'_>, name: &OsStr, owner: bool) -> io::Result<Option<OwnedFd>> {
    match rfs::openat(dir, name, dir_flags(), Mode::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) => Ok(None),
        Err(Errno::ACCESS) if owner => {
            make_owner_rwx(dir, name)?;
            rfs::openat(dir, name, dir_flags(), Mode::empty())
                .map(Some)
                .map_err(errno)
        }
        Err(e) => Err(errno(e)),
    }
}

/// Remove everything below the walk's top directory.
fn clear_walk(w: &mut Walk, owner: bool) -> io::Result<()> {
    w.restart = true;
    if owner {
        make_writable(w.dir()?).map_err(|e| w.error_at(None, e))?;
    }
    let mut attempts = 0;
    loop {
        match w.next_entry()? {
            Some(e) if e.kind == FileType::Directory => {
                let fd = open_to_remove(w.dir()?, &e.name, owner)
                    .map_err(|err| w.error_at(Some(&e.name), err))?;
                if let Some(fd) = fd {
                    w.enter_fd(fd, &e.name)?;
                    if owner {
                        make_writable(w.dir()?).map_err(|err| w.error_at(None, err))?;
                    }
                }
            }
            Some(e) => match rfs::unlinkat(w.dir()?, &e.name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(err) => return Err(w.error_at(Some(&e.name), errno(err))),
            },
            None => {
                if w.depth() == 0 {
                    return Ok(());
                }
                let name = w.leave()?;
                match rfs::unlinkat(w.dir()?, &name, AtFlags::REMOVEDIR) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    // Something was added meanwhile: empty it again.
                    Err(Errno::NOTEMPTY) if attempts < REMOVE_ATTEMPTS => {
                        attempts += 1;
                        w.enter(&name)?;
                    }
                    Err(err) => return Err(w.error_at(Some(&name), errno(err))),
                }
            }
        }
    }
}

/// Remove everything inside directory `dir` (an fd opened for reading), shown as `shown` in
/// errors, never following a link. With `owner`, directories of this process's user that it
/// may not read, search or write (e.g. the mode-000 `work/work` that overlayfs leaves) are first
/// given owner rwx.
pub fn clear(dir: OwnedFd, shown: &Path, owner: bool) -> io::Result<()> {
    let mut w = Walk::new(dir, Order::Any, shown)?;
    clear_walk(&mut w, owner)
}

/// Remove `name` from `dir` whatever it is (a directory with everything in it; a symlink is
/// removed, never followed); missing is fine. See [`clear`] for `owner`. Errors name the path
/// from `name` on.
pub fn remove_at(dir: BorrowedFd<'_>, name: &OsStr, owner: bool) -> io::Result<()> {
    let shown = Path::new(name);
    let named = |e: Errno| {
        let e = errno(e);
        io::Error::new(e.kind(), format!("{}: {e}", shown.display()))
    };
    for _ in 0..REMOVE_ATTEMPTS {
        let kind = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => FileType::from_raw_mode(st.st_mode),
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(named(e)),
        };
        if kind != FileType::Directory {
            return match rfs::unlinkat(dir, name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(named(e)),
            };
        }
        let fd = open_to_remove(dir, name, owner)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", shown.display())))?;
        let Some(fd) = fd else {
            return Ok(());
        };
        clear(fd, shown, owner)?;
        match rfs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => return Ok(()),
            Err(Errno::NOTEMPTY) => continue,
            Err(e) => return Err(named(e)),
        }
    }
    Err(io::Error::other(format!(
        "{}: still not empty after {REMOVE_ATTEMPTS} attempts (something keeps writing there)",
        shown.display()
    )))
}

/// Remove the tree (or file, or link) at host path `path` (trusted up to its last component; a
/// link there is removed, not followed) as this process's user, giving its own directories
/// owner rwx where needed (see [`clear`]); missing is fine. Errors name the path.
pub fn remove_path(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a path to remove", path.display()),
        ));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let dir = match rfs::open(
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(d) => d,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => {
            let e = errno(e);
            return Err(io::Error::new(
                e.kind(),
                format!("{}: {e}", parent.display()),
            ));
        }
    };
    remove_at(dir.as_fd(), name, true)
        .map_err(|e| io::Error::new(e.kind(), format!("{}/{e}", parent.display())))
}

// ---- owners, sizes ----

/// Give the tree at `top` (an open directory) and everything in it to `uid:gid`, never
/// following a link (`chown -R -h`).
pub fn chown_tree(top: OwnedFd, shown: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let (u, g) = (Some(rfs::Uid::from_raw(uid)), Some(rfs::Gid::from_raw(gid)));
    rfs::fchown(&top, u, g)
        .map_err(|e| io::Error::new(errno(e).kind(), format!("{}: {e}", shown.display())))?;
    let mut w = Walk::new(top, Order::Any, shown)?;
    loop {
        match w.next_entry()? {
            Some(e) => {
                rfs::chownat(w.dir()?, &e.name, u, g, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|err| w.error_at(Some(&e.name), errno(err)))?;
                if e.kind == FileType::Directory {
                    w.enter(&e.name)?;
                }
            }
            None if w.depth() == 0 => return Ok(()),
            None => {
                w.leave()?;
            }
        }
    }
}

/// Bytes the tree at `top` (an open directory) holds on disk (allocated blocks, the top's own
/// not counted), without following links; stops counting once past `stop_after`.
pub fn disk_usage(top: OwnedFd, shown: &Path, stop_after: u64) -> io::Result<u64> {
    let mut total = 0u64;
    let mut w = Walk::new(top, Order::Any, shown)?;
    loop {
        match w.next_entry()? {
            Some(e) => {
                let st = match rfs::statat(w.dir()?, &e.name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => st,
                    Err(Errno::NOENT) => continue,
                    Err(err) => return Err(w.error_at(Some(&e.name), errno(err))),
                };
                let blocks = u64::try_from(st.st_blocks).unwrap_or(0);
                total = total.saturating_add(blocks.saturating_mul(512));
                if total > stop_after {
                    return Ok(total);
                }
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                    w.enter(&e.name)?;
                }
            }
            None if w.depth() == 0 => return Ok(total),
            None => {
                w.leave()?;
            }
        }
    }
}

// ---- copies ----

fn times(st: &rfs::Stat) -> rfs::Timestamps {
    rfs::Timestamps {
        last_access: rfs::Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: rfs::Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

fn ids(st: &rfs::Stat) -> (Option<rfs::Uid>, Option<rfs::Gid>) {
    (
        Some(rfs::Uid::from_raw(st.st_uid)),
        Some(rfs::Gid::from_raw(st.st_gid)),
    )
}

/// Copy the extended attributes of `src` to `dst` where the kernel lets us (as `cp -a` does,
/// a refused one is skipped silently: `trusted.*` needs host privilege).
fn copy_xattrs(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) {
    let Ok(size) = rfs::flistxattr_query(src) else {
        return;
    };
    if size == 0 {
        return;
    }
    let mut list = vec![0u8; size];
    let Ok(n) = rfs::flistxattr(src, &mut list[..]) else {
        return;
    };
    for name in list[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = OsStr::from_bytes(name);
        let Ok(len) = rfs::fgetxattr_query(src, name) else {
            continue;
        };
        let mut value = vec![0u8; len];
        if let Ok(got) = rfs::fgetxattr(src, name, &mut value[..]) {
            let _ = rfs::fsetxattr(dst, name, &value[..got], rfs::XattrFlags::empty());
        }
    }
}

/// Owner, extended attributes, mode and times of `st` onto `dst` (in that order: a chown drops
/// set-uid bits and file capabilities).
fn set_meta(dst: BorrowedFd<'_>, src: BorrowedFd<'_>, st: &rfs::Stat) -> io::Result<()> {
    let (u, g) = ids(st);
    rfs::fchown(dst, u, g).map_err(errno)?;
    copy_xattrs(src, dst);
    rfs::fchmod(dst, Mode::from_raw_mode(st.st_mode & 0o7777)).map_err(errno)?;
    rfs::futimens(dst, &times(st)).map_err(errno)
}

/// Copy `size` bytes of `src` into the empty `dst`: a reflink where the filesystem shares
/// blocks (`FICLONE`), else the data extents only (holes stay holes), by `copy_file_range`
/// (which reflinks too on some filesystems) or, across filesystems that refuse it, read and
/// write.
fn copy_data(src: &File, dst: &File, size: u64) -> io::Result<()> {
    if size == 0 || rfs::ioctl_ficlone(dst, src).is_ok() {
        return Ok(());
    }
    let mut off = 0u64;
    while off < size {
        let start = match rfs::seek(src, SeekFrom::Data(off)) {
            Ok(s) => s,
            Err(Errno::NXIO) => break,
            // No SEEK_DATA here: everything is data.
            Err(Errno::INVAL | Errno::OPNOTSUPP) => off,
            Err(e) => return Err(errno(e)),
        };
        let end = match rfs::seek(src, SeekFrom::Hole(start)) {
            Ok(e) => e.min(size),
            Err(Errno::INVAL | Errno::OPNOTSUPP) => size,
            Err(e) => return Err(errno(e)),
        };
        if end <= start {
            break;
        }
        copy_range(src, dst, start, end)?;
        off = end;
    }
    rfs::ftruncate(dst, size).map_err(errno)
}

/// Bytes `start..end` of `src` to the same place in `dst`.
fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let (mut from, mut to) = (start, start);
    while from < end {
        let len = usize::try_from(end - from)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rfs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), len) {
            Ok(0) => return Ok(()), // shorter than it was: the rest is a hole
            Ok(_) => {}
            Err(Errno::INTR) => {}
            Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP | Errno::PERM) => {
                return read_write(src, dst, from, end)
            }
            Err(e) => return Err(errno(e)),
        }
    }
    Ok(())
}

fn read_write(src: &File, dst: &File, mut at: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 17];
    while at < end {
        let want = usize::try_from(end - at)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = src.read_at(&mut buf[..want], at)?;
        if n == 0 {
            return Ok(());
        }
        dst.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Hard links of a copy: the first copy of a file with several links, by (device, inode) of
/// the source, as its name relative to the copy's top.
type Links = HashMap<(u64, u64), PathBuf>;

/// Copy one non-directory entry of `from`'s current directory into `to`'s.
fn copy_entry(
    from: &Walk,
    to: &Walk,
    e: &Entry,
    to_top: &OwnedFd,
    links: &mut Links,
) -> io::Result<()> {
    let (sdir, ddir) = (from.dir()?, to.dir()?);
    let name = e.name.as_os_str();
    match e.kind {
        FileType::RegularFile => {
            let (fd, st) = match crate::inroot::open_file_at(sdir, name) {
                Ok(Some(file)) => file,
                Ok(None) => return Err(io::Error::other("changed while it was copied")),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            let key = (st.st_dev, st.st_ino);
            if st.st_nlink > 1 {
                if let Some(first) = links.get(&key) {
                    // Else (too many links, too long a name): a copy of its own.
                    if rfs::linkat(to_top, first, ddir, name, AtFlags::empty()).is_ok() {
                        return Ok(());
                    }
                }
            }
            let out = rfs::openat(
                ddir,
                name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(errno)?;
            let (input, output) = (File::from(fd), File::from(out));
            copy_data(&input, &output, u64::try_from(st.st_size).unwrap_or(0))?;
            set_meta(output.as_fd(), input.as_fd(), &st)?;
            if st.st_nlink > 1 {
                if let Some(rel) = to.rel_path(name, MAX_PATH) {
                    links.insert(key, rel);
                }
            }
            Ok(())
        }
        FileType::Symlink => {
            let st = rfs::statat(sdir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
            let target = rfs::readlinkat(sdir, name, Vec::new()).map_err(errno)?;
            rfs::symlinkat(target.as_c_str(), ddir, name).map_err(errno)?;
            let (u, g) = ids(&st);
            rfs::chownat(ddir, name, u, g, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
            rfs::utimensat(ddir, name, &times(&st), AtFlags::SYMLINK_NOFOLLOW).map_err(errno)
        }
        _ => {
            // FIFOs, sockets, and the devices a user namespace may make (overlayfs whiteouts).
            let st = rfs::statat(sdir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
            let kind = FileType::from_raw_mode(st.st_mode);
            rfs::mknodat(ddir, name, kind, Mode::from_raw_mode(0o600), st.st_rdev)
                .map_err(errno)?;
            let (u, g) = ids(&st);
            rfs::chownat(ddir, name, u, g, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
            // Just made, not a link: following is safe.
            rfs::chmodat(
                ddir,
                name,
                Mode::from_raw_mode(st.st_mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(errno)?;
            rfs::utimensat(ddir, name, &times(&st), AtFlags::SYMLINK_NOFOLLOW).map_err(errno)
        }
    }
}

/// Copy everything in directory `src` into directory `dst` (which the caller made), then give
/// `dst` the owner, extended attributes, mode and times of `src`: `cp -a SRC/. DST` with
/// reflinks where the filesystem has them. Links are copied as links, hard links within the
/// tree stay hard links, holes stay holes; owners are kept (run it where they are mapped).
pub fn copy_tree(src: OwnedFd, dst: OwnedFd, shown: &Path) -> io::Result<()> {
    let to_top = rustix::io::fcntl_dupfd_cloexec(&dst, 0).map_err(errno)?;
    let mut from = Walk::new(src, Order::Any, shown)?;
    let mut to = Walk::new(dst, Order::Any, shown)?;
    let mut links = Links::new();
    loop {
        let Some(e) = from.next_entry()? else {
            let st = rfs::fstat(from.dir()?).map_err(errno)?;
            set_meta(to.dir()?, from.dir()?, &st).map_err(|err| from.error_at(None, err))?;
            if from.depth() == 0 {
                return Ok(());
            }
            from.leave()?;
            to.leave()?;
            continue;
        };
        if e.kind == FileType::Directory {
            match rfs::mkdirat(to.dir()?, &e.name, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(err) => return Err(from.error_at(Some(&e.name), errno(err))),
            }
            from.enter(&e.name)?;
            to.enter(&e.name)?;
            continue;
        }
        copy_entry(&from, &to, &e, &to_top, &mut links)
            .map_err(|err| from.error_at(Some(&e.name), err))?;
    }
}

// ---- tar streams ----

/// A tar header of the kind `kind` carrying the mode, owner and time of `st` (a job's tree:
/// without set-uid and set-gid bits, see [`Sent`]).
pub fn tar_header(st: &rfs::Stat, kind: tar::EntryType, size: u64, sent: Sent) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    let mode = match sent {
        Sent::JobTree => st.st_mode & 0o7777 & !crate::SET_ID,
        Sent::ImageTree => st.st_mode & 0o7777,
    };
    h.set_mode(mode);
    h.set_uid(st.st_uid.into());
    h.set_gid(st.st_gid.into());
    h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    h.set_size(size);
    h
}

/// What kind of tree [`append_tree`] sends, which says what it sends besides directories,
/// regular files and symlinks, and with which modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// A job's tree (artifacts, builds): FIFOs, sockets and devices are left out, and no entry
    /// carries a set-uid or set-gid bit, whoever unpacks it.
    JobTree,
    /// An image's tree: FIFOs and devices are sent, modes as they are (an image's `su` stays
    /// set-uid); sockets are left out (tar has none).
    ImageTree,
}

/// Append the tree below `root` (an open directory) to `b` in name order, every name under
/// `prefix` (when not empty, `prefix` itself is sent first as the tree's root directory). Every
/// entry is read by fd below `root`, never through a symlink: links are sent as links (their
/// targets are not read). A name longer than [`MAX_PATH`] is an error naming it.
pub fn append_tree<W: Write>(
    b: &mut tar::Builder<W>,
    root: OwnedFd,
    prefix: &Path,
    sent: Sent,
) -> io::Result<()> {
    let named = |rel: &Path| {
        if prefix.as_os_str().is_empty() {
            rel.to_path_buf()
        } else {
            prefix.join(rel)
        }
    };
    if !prefix.as_os_str().is_empty() {
        let st = rfs::fstat(&root).map_err(errno)?;
        let mut h = tar_header(&st, tar::EntryType::Directory, 0, sent);
        b.append_data(&mut h, prefix, io::empty())?;
    }
    let mut w = Walk::new(root, Order::Sorted, prefix)?;
    loop {
        let Some(e) = w.next_entry()? else {
            if w.depth() == 0 {
                return Ok(());
            }
            w.leave()?;
            continue;
        };
        let name = e.name.as_os_str();
        let Some(rel) = w.rel_path(name, MAX_PATH) else {
            return Err(w.error_at(
                Some(name),
                io::Error::other(format!(
                    "its name is longer than {MAX_PATH} bytes (the tree is too deep to send)"
                )),
            ));
        };
        let r = append_entry(b, &mut w, &e, &named(&rel), sent);
        r.map_err(|err| w.error_at(Some(name), err))?;
    }
}

fn append_entry<W: Write>(
    b: &mut tar::Builder<W>,
    w: &mut Walk,
    e: &Entry,
    named: &Path,
    sent: Sent,
) -> io::Result<()> {
    let dir = w.dir()?;
    let name = e.name.as_os_str();
    let st = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(err) => return Err(errno(err)),
    };
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => {
            w.enter(name)?;
            let st = rfs::fstat(w.dir()?).map_err(errno)?;
            let mut h = tar_header(&st, tar::EntryType::Directory, 0, sent);
            b.append_data(&mut h, named, io::empty())
        }
        FileType::RegularFile => {
            let (fd, st) = match crate::inroot::open_file_at(dir, name) {
                Ok(Some(file)) => file,
                // Swapped for something else since the stat, or gone: skipped.
                Ok(None) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            let size = u64::try_from(st.st_size).unwrap_or(0);
            let mut h = tar_header(&st, tar::EntryType::Regular, size, sent);
            b.append_data(&mut h, named, File::from(fd).take(size))
        }
        FileType::Symlink => {
            let target = rfs::readlinkat(dir, name, Vec::new()).map_err(errno)?;
            let mut h = tar_header(&st, tar::EntryType::Symlink, 0, sent);
            b.append_link(&mut h, named, OsStr::from_bytes(target.as_bytes()))
        }
        kind @ (FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice)
            if sent == Sent::ImageTree =>
        {
            let entry = match kind {
                FileType::Fifo => tar::EntryType::Fifo,
                FileType::CharacterDevice => tar::EntryType::Char,
                _ => tar::EntryType::Block,
            };
            let mut h = tar_header(&st, entry, 0, sent);
            if kind != FileType::Fifo {
                h.set_device_major(rfs::major(st.st_rdev))?;
                h.set_device_minor(rfs::minor(st.st_rdev))?;
            }
            b.append_data(&mut h, named, io::empty())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn clearing_as_owner_opens_locked_dirs_and_never_follows_links() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep"), "x").unwrap();
        fs::set_permissions(outside.path(), fs::Permissions::from_mode(0o751)).unwrap();
        let r = d.path().join("root");
        // What overlayfs leaves (work/work, mode 000) and what a job may leave: a read-only
        // directory with files, links out of the tree.
        fs::create_dir_all(r.join("work/work/deep")).unwrap();
        fs::write(r.join("work/work/deep/f"), "f").unwrap();
        fs::create_dir_all(r.join("upper/ro")).unwrap();
        fs::write(r.join("upper/ro/f"), "f").unwrap();
        symlink(outside.path(), r.join("upper/out")).unwrap();
        symlink(outside.path().join("keep"), r.join("upper/ro/keep")).unwrap();
        fs::set_permissions(r.join("upper/ro"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::set_permissions(r.join("work/work"), fs::Permissions::from_mode(0o000)).unwrap();
        let dir = rfs::open(&r, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        clear(dir, &r, true).unwrap();
        assert_eq!(fs::read_dir(&r).unwrap().count(), 0);
        assert_eq!(
            fs::read_to_string(outside.path().join("keep")).unwrap(),
            "x"
        );
        assert_eq!(
            fs::metadata(outside.path()).unwrap().permissions().mode() & 0o777,
            0o751,
            "the link's target keeps its mode"
        );
    }

    #[test]
    fn remove_never_follows_links() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep"), "k").unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("d/e")).unwrap();
        symlink(outside.path(), r.join("d/e/out")).unwrap();
        let root = crate::inroot::Root::open(r).unwrap();
        let (p, n) = root.parent(Path::new("d")).unwrap();
        remove_at(p.as_fd(), &n, false).unwrap();
        assert!(!r.join("d").exists());
        assert!(outside.path().join("keep").is_file());
    }

    /// A chain of `depth` directories `d` below `top` (made by fd, as a job would), with a file
    /// `f` at the bottom.
    pub(crate) fn chain(top: &Path, depth: usize) {
        let mut cur = rfs::open(top, dir_flags(), Mode::empty()).unwrap();
        for _ in 0..depth {
            rfs::mkdirat(&cur, "d", Mode::from_raw_mode(0o755)).unwrap();
            cur = rfs::openat(&cur, "d", dir_flags(), Mode::empty()).unwrap();
        }
        let f = rfs::openat(
            &cur,
            "f",
            OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        rustix::io::write(&f, b"bottom\n").unwrap();
    }

    /// The depth of the chain below `top` and the content of its bottom file.
    fn chain_depth(top: &Path) -> (usize, String) {
        let mut cur = rfs::open(top, dir_flags(), Mode::empty()).unwrap();
        let mut depth = 0;
        while let Ok(next) = rfs::openat(&cur, "d", dir_flags(), Mode::empty()) {
            cur = next;
            depth += 1;
        }
        let f = rfs::openat(&cur, "f", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).unwrap();
        let mut s = String::new();
        File::from(f).read_to_string(&mut s).unwrap();
        (depth, s)
    }

    /// Descriptors of this process open on something below `dir`.
    fn fds_below(dir: &Path) -> usize {
        fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t.starts_with(dir)))
            .count()
    }

    const DEEP: usize = 100_000;

    /// A temporary directory, emptied by [`clear`] when dropped (tempfile's own removal is
    /// std's, one stack frame per level: a failed test would overflow the stack there).
    pub(crate) struct Scratch(Option<tempfile::TempDir>);

    impl Scratch {
        pub(crate) fn path(&self) -> &Path {
            self.0
                .as_ref()
                .map_or(Path::new("/nonexistent"), |d| d.path())
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            if let Some(d) = self.0.take() {
                if let Ok(fd) = rfs::open(d.path(), dir_flags(), Mode::empty()) {
                    let _ = clear(fd, d.path(), true);
                }
            }
        }
    }

    /// A [`Scratch`] on tmpfs where there is one (removing 100,000 directories on an ext4
    /// mounted with `discard` takes minutes), else in TMPDIR.
    pub(crate) fn fast_tempdir() -> Scratch {
        Scratch(Some(
            match tempfile::Builder::new()
                .prefix("mistry-walk")
                .tempdir_in("/dev/shm")
            {
                Ok(d) => d,
                Err(_) => tempfile::tempdir().unwrap(),
            },
        ))
    }

    /// Every entry below `top` as (path, kind, size, content), by a sorted walk.
    fn listing(top: &Path) -> Vec<(PathBuf, FileType, String)> {
        let mut w = Walk::open(top, Order::Sorted).unwrap();
        let mut out = Vec::new();
        loop {
            let Some(e) = w.next_entry().unwrap() else {
                if w.depth() == 0 {
                    return out;
                }
                w.leave().unwrap();
                continue;
            };
            let rel = w.rel_path(&e.name, MAX_PATH).unwrap();
            let content = if e.kind == FileType::RegularFile {
                fs::read_to_string(top.join(&rel)).unwrap()
            } else {
                String::new()
            };
            out.push((rel, e.kind, content));
            if e.kind == FileType::Directory {
                w.enter(&e.name).unwrap();
            }
        }
    }

    #[test]
    fn wide_and_deep_trees_resume_where_they_were_left() {
        // On TMPDIR's filesystem (ext4 hashes directory positions): 40 levels (more than
        // the window), each with files and subdirectories besides the one going deeper.
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let mut p = src.clone();
        for level in 0..40 {
            for f in ["a", "b", "c", "zz"] {
                fs::create_dir_all(p.join(format!("{f}-dir"))).unwrap();
                fs::write(p.join(f), format!("{level}{f}")).unwrap();
                fs::write(p.join(format!("{f}-dir/in")), f).unwrap();
            }
            p.push("x");
        }
        fs::create_dir_all(&p).unwrap();
        let before = listing(&src);
        assert_eq!(before.len(), 40 * 13);
        let dst = d.path().join("dst");
        fs::create_dir(&dst).unwrap();
        let a = rfs::open(&src, dir_flags(), Mode::empty()).unwrap();
        let b = rfs::open(&dst, dir_flags(), Mode::empty()).unwrap();
        copy_tree(a, b, &dst).unwrap();
        assert_eq!(listing(&dst), before);
        let top = rfs::open(&src, dir_flags(), Mode::empty()).unwrap();
        let n: usize = {
            let mut w = Walk::new(top, Order::Any, &src).unwrap();
            let mut n = 0;
            loop {
                match w.next_entry().unwrap() {
                    Some(e) => {
                        n += 1;
                        if e.kind == FileType::Directory {
                            w.enter(&e.name).unwrap();
                        }
                    }
                    None if w.depth() == 0 => break n,
                    None => {
                        w.leave().unwrap();
                    }
                }
            }
        };
        assert_eq!(n, before.len(), "a streamed walk sees every entry once");
        remove_path(&src).unwrap();
        remove_path(&dst).unwrap();
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn deep_chains_are_walked_with_few_descriptors_and_no_recursion() {
        let d = fast_tempdir();
        let src = d.path().join("src");
        fs::create_dir(&src).unwrap();
        chain(&src, DEEP);

        // Going down 1000 levels holds a few descriptors; coming back up opens the levels
        // again from the anchors, checking them.
        let mut w = Walk::open(&src, Order::Any).unwrap();
        for _ in 0..1000 {
            assert_eq!(w.next_entry().unwrap().unwrap().name, "d");
            w.enter(OsStr::new("d")).unwrap();
            assert!(w.open_count() <= max_open(w.depth()));
        }
        assert_eq!(fds_below(&src), w.open_count());
        assert_eq!(w.depth(), 1000);
        assert!(w.open_count() <= max_open(1000), "{}", w.open_count());
        assert_eq!(w.next_entry().unwrap().unwrap().name, "d");
        for _ in 0..1000 {
            // Each directory, opened again, continues after the entry it was left at.
            assert_eq!(w.next_entry().unwrap(), None);
            assert_eq!(w.leave().unwrap(), "d");
            assert!(w.open_count() <= max_open(1000), "{}", w.open_count());
        }
        assert_eq!(w.depth(), 0);
        assert_eq!(w.next_entry().unwrap(), None);
        drop(w);

        // Measured, copied (on a thread with a small stack: no recursion), removed.
        let top = rfs::open(&src, dir_flags(), Mode::empty()).unwrap();
        // The bottom file is counted (tmpfs gives directories no blocks).
        let used = disk_usage(top, &src, u64::MAX).unwrap();
        assert!(used >= 4096, "{used}");
        let dst = d.path().join("dst");
        fs::create_dir(&dst).unwrap();
        let (s, t) = (src.clone(), dst.clone());
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let a = rfs::open(&s, dir_flags(), Mode::empty()).unwrap();
                let b = rfs::open(&t, dir_flags(), Mode::empty()).unwrap();
                copy_tree(a, b, &t).unwrap();
                let top = rfs::open(&t, dir_flags(), Mode::empty()).unwrap();
                let me = nix::unistd::geteuid().as_raw();
                let gid = nix::unistd::getegid().as_raw();
                chown_tree(top, &t, me, gid).unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(chain_depth(&dst), (DEEP, "bottom\n".into()));
        for p in [&src, &dst] {
            let p = p.clone();
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || remove_path(&p).unwrap())
                .unwrap()
                .join()
                .unwrap();
        }
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn the_descriptors_a_walk_keeps_are_bounded() {
        assert_eq!(max_open(100_000), 46);
        assert_eq!(max_open(u32::MAX as usize), 82);
        // At every depth, the kept levels (anchors, window, top) are at most that many, and
        // the way back up from any level to the nearest kept one is short.
        for depth in [0, 5, 100, 1000, 20_000, 100_000] {
            let kept: Vec<usize> = (0..=depth).filter(|p| keeps(*p, depth)).collect();
            assert!(kept.len() <= max_open(depth), "{depth}: {}", kept.len());
            assert!(kept.contains(&0) && kept.contains(&depth));
        }
    }

    #[test]
    fn a_tar_of_a_tree_too_deep_to_name_is_refused_with_its_path() {
        let d = fast_tempdir();
        chain(d.path(), 3000);
        let mut b = tar::Builder::new(Vec::new());
        let top = rfs::open(d.path(), dir_flags(), Mode::empty()).unwrap();
        let e = append_tree(&mut b, top, Path::new("art"), Sent::JobTree).unwrap_err();
        let msg = e.to_string();
        // "art/d/…(2032 more levels)…/d: its name is longer than 4096 bytes …"
        assert!(msg.starts_with("art/d/d/d/d/d/d/d/d/…(2032 more levels)…/d/d/d/d/d/d/d/d/d: its name is longer than 4096 bytes"), "{msg}");
        // What was sent before is a valid stream of the names that fit.
        let data = b.into_inner().unwrap();
        let mut a = tar::Archive::new(&data[..]);
        let longest = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().as_os_str().len())
            .max()
            .unwrap();
        assert_eq!(longest, "art/".len() + 2 * 2047 + 1);
    }

    #[test]
    fn copies_keep_what_cp_a_keeps() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("sub/ro")).unwrap();
        fs::write(src.join("sub/file"), "content").unwrap();
        fs::hard_link(src.join("sub/file"), src.join("hard")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("link")).unwrap();
        nix::unistd::mkfifo(
            &src.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )
        .unwrap();
        // A sparse file: 1 MiB of hole, then data.
        let sparse = File::create(src.join("sparse")).unwrap();
        sparse.write_all_at(b"end", 1 << 20).unwrap();
        fs::set_permissions(src.join("sub/file"), fs::Permissions::from_mode(0o4751)).unwrap();
        fs::set_permissions(src.join("sub/ro"), fs::Permissions::from_mode(0o555)).unwrap();
        let _ = xattr::set(src.join("sub/file"), "user.mistry", b"kept");
        let mtime = filetime::FileTime::from_unix_time(1_500_000_000, 0);
        filetime::set_file_mtime(src.join("sub"), mtime).unwrap();
        filetime::set_file_mtime(&src, mtime).unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o750)).unwrap();
        let dst = d.path().join("dst");
        fs::create_dir(&dst).unwrap();
        let a = rfs::open(&src, dir_flags(), Mode::empty()).unwrap();
        let b = rfs::open(&dst, dir_flags(), Mode::empty()).unwrap();
        copy_tree(a, b, &dst).unwrap();
        let m = |p: &str| fs::symlink_metadata(dst.join(p)).unwrap();
        assert_eq!(fs::read_to_string(dst.join("hard")).unwrap(), "content");
        assert_eq!(
            m("hard").ino(),
            m("sub/file").ino(),
            "hard links stay links"
        );
        assert_eq!(m("sub/file").mode() & 0o7777, 0o4751);
        assert_eq!(m("sub/ro").mode() & 0o7777, 0o555);
        assert_eq!(
            m("").mode() & 0o7777,
            0o750,
            "the top gets the source's mode"
        );
        assert_eq!(m("sub").mtime(), 1_500_000_000);
        assert_eq!(m("").mtime(), 1_500_000_000);
        assert_eq!(
            fs::read_link(dst.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert!(m("fifo").file_type().is_fifo() && m("fifo").mode() & 0o777 == 0o640);
        assert_eq!(m("sparse").len(), (1 << 20) + 3);
        assert!(
            m("sparse").blocks() * 512 < 1 << 20,
            "the hole stays a hole"
        );
        if xattr::get(src.join("sub/file"), "user.mistry").is_ok_and(|v| v.is_some()) {
            assert_eq!(
                xattr::get(dst.join("sub/file"), "user.mistry").unwrap(),
                Some(b"kept".to_vec())
            );
        }
    }

    #[test]
    fn huge_flat_directories_are_streamed() {
        let d = fast_tempdir();
        let src = d.path().join("src");
        fs::create_dir(&src).unwrap();
        let dir = rfs::open(&src, dir_flags(), Mode::empty()).unwrap();
        // 200,000 entries: files, and every 1000th a directory (one with an entry inside).
        const N: usize = 200_000;
        for i in 0..N {
            let name = format!("{i:06}");
            if i % 1000 == 7 {
                rfs::mkdirat(&dir, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
            } else {
                let flags = OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC;
                rfs::openat(&dir, name.as_str(), flags, Mode::from_raw_mode(0o644)).unwrap();
            }
        }
        rfs::mkdirat(&dir, "000007/sub", Mode::from_raw_mode(0o755)).unwrap();
        let dst = d.path().join("dst");
        fs::create_dir(&dst).unwrap();
        let a = rfs::open(&src, dir_flags(), Mode::empty()).unwrap();
        let b = rfs::open(&dst, dir_flags(), Mode::empty()).unwrap();
        copy_tree(a, b, &dst).unwrap();
        assert_eq!(fs::read_dir(&dst).unwrap().count(), N);
        assert!(dst.join("000007/sub").is_dir());
        let mut b = tar::Builder::new(Vec::new());
        let top = rfs::open(&src, dir_flags(), Mode::empty()).unwrap();
        append_tree(&mut b, top, Path::new(""), Sent::JobTree).unwrap();
        let data = b.into_inner().unwrap();
        let names: Vec<String> = tar::Archive::new(&data[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names.len(), N + 1);
        assert_eq!(names[..3], ["000000", "000001", "000002"]);
        assert_eq!(names[7..9], ["000007", "000007/sub"]);
        for p in [&src, &dst] {
            remove_path(p).unwrap();
        }
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn removal_as_owner_opens_locked_dirs_and_never_follows_links() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep"), "x").unwrap();
        let r = d.path().join("root");
        fs::create_dir_all(r.join("x")).unwrap();
        chain(&r.join("x"), 50);
        fs::create_dir_all(r.join("work/work/deep")).unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("out")).unwrap();
        fs::set_permissions(r.join("work/work"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::set_permissions(r.join("work"), fs::Permissions::from_mode(0o500)).unwrap();
        remove_path(&r).unwrap();
        assert!(!r.exists());
        assert_eq!(
            fs::read_to_string(outside.path().join("keep")).unwrap(),
            "x"
        );
    }
}
