//! How to see a snapshot's files ([`View`]) and where a step or a job writes ([`Target`]).
//!
//! Shared by the store (which makes them) and the tools (which mount and write them).

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;

use crate::inroot::Root;

/// How to see a snapshot's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// A complete tree.
    Dir(PathBuf),
    /// Overlay layers, top first (never empty).
    Layers(Vec<PathBuf>),
}

/// Where a step being built writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A complete tree (plain, btrfs, or a first overlay layer).
    Dir(PathBuf),
    /// An overlay: `lowers` (top first) read-only, changes into `upper`.
    Overlay {
        /// The parents' layers, top first.
        lowers: Vec<PathBuf>,
        /// The snapshot's own directory, which receives the changes.
        upper: PathBuf,
        /// overlayfs' scratch directory, on the same filesystem as `upper`.
        work: PathBuf,
    },
}

impl Target {
    /// A sandbox whose root is this target.
    pub fn sandbox(&self) -> sandbox::Sandbox {
        match self {
            Target::Dir(d) => sandbox::Sandbox::new(d),
            Target::Overlay {
                lowers,
                upper,
                work,
            } => sandbox::Sandbox::new_overlay(lowers.clone(), upper, work),
        }
    }
}

fn is_whiteout(m: &fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    m.file_type().is_char_device() && m.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    matches!(xattr::get(dir, "user.overlay.opaque"), Ok(Some(v)) if v == b"y")
}

/// The magic link of an open descriptor, to open the same inode again.
fn fd_path(fd: &std::os::fd::OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

impl View {
    /// The host path of `inside` (absolute in the image) as the image sees it, if it exists
    /// (a final symlink is not followed). A complete tree is resolved inside its root by the
    /// kernel (see [`crate::inroot`]); through layers, the topmost layer that has it wins, a
    /// whiteout, an opaque directory or a non-directory on the way hides lower layers, and
    /// symlinks are not followed (so the returned path never goes through one).
    pub fn lookup(&self, inside: &Path) -> Option<PathBuf> {
        match self {
            View::Dir(root) => {
                let r = Root::open(root).ok()?;
                if crate::inroot::components(inside).is_empty() {
                    return Some(root.clone());
                }
                let (dir, name) = r.parent(inside).ok()?;
                crate::inroot::kind_at(dir.as_fd(), &name).ok()??;
                let at = fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).ok()?;
                Some(at.join(name))
            }
            View::Layers(layers) => {
                let rel = sandbox::paths::normalize_inside(inside);
                let rel = rel.strip_prefix("/").unwrap_or(&rel).to_path_buf();
                let parts: Vec<_> = rel.components().collect();
                for layer in layers {
                    let mut acc = layer.clone();
                    let mut hidden = false;
                    for (i, c) in parts.iter().enumerate() {
                        acc.push(c);
                        let last = i + 1 == parts.len();
                        match fs::symlink_metadata(&acc) {
                            Ok(m) if is_whiteout(&m) => return None,
                            Ok(_) if last => return Some(acc),
                            Ok(m) if m.is_dir() => {
                                if is_opaque(&acc) {
                                    hidden = true;
                                }
                            }
                            // A file or symlink on the way hides lower layers' directories.
                            Ok(_) => return None,
                            Err(_) => break,
                        }
                    }
                    if parts.is_empty() {
                        return Some(layer.clone());
                    }
                    if hidden {
                        return None;
                    }
                }
                None
            }
        }
    }

    /// Through layers: the host path of `inside` with symlinks on the way (and the final one
    /// when `follow`) resolved in the image as the union of the layers sees them, at most
    /// [`crate::inroot::MAX_LINKS`] of them; None when missing or past the limit.
    fn resolve_layers(&self, inside: &Path, follow: bool) -> Option<PathBuf> {
        use std::ffi::OsString;
        let abs = |parts: &[OsString]| {
            let mut p = PathBuf::from("/");
            for c in parts {
                p.push(c);
            }
            p
        };
        let mut parts = crate::inroot::components(inside);
        let mut done: Vec<OsString> = Vec::new();
        let mut hops = 0;
        let mut i = 0;
        while i < parts.len() {
            if parts[i] == ".." {
                done.pop();
                i += 1;
                continue;
            }
            let mut cand = done.clone();
            cand.push(parts[i].clone());
            let p = self.lookup(&abs(&cand))?;
            let m = fs::symlink_metadata(&p).ok()?;
            if m.file_type().is_symlink() && (i + 1 < parts.len() || follow) {
                hops += 1;
                if hops > crate::inroot::MAX_LINKS {
                    return None;
                }
                let target = fs::read_link(&p).ok()?;
                let mut next = if target.is_absolute() {
                    Vec::new()
                } else {
                    done.clone()
                };
                next.extend(crate::inroot::components(&target));
                next.extend(parts[i + 1..].iter().cloned());
                parts = next;
                done.clear();
                i = 0;
                continue;
            }
            done = cand;
            i += 1;
        }
        self.lookup(&abs(&done))
    }

    /// Whether `inside` is a directory in the image, following symlinks inside the image (as
    /// Docker's check of a COPY destination does).
    pub fn is_dir(&self, inside: &Path) -> bool {
        match self {
            View::Dir(root) => Root::open(root)
                .and_then(|r| r.open_in(inside, OFlags::PATH | OFlags::DIRECTORY))
                .is_ok(),
            View::Layers(_) => self
                .resolve_layers(inside, true)
                .is_some_and(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())),
        }
    }

    /// Resolve a `USER` value against the image's `/etc/passwd` and `/etc/group` (a complete
    /// tree is read by fd inside its root, `openat2(RESOLVE_IN_ROOT)`; layers through
    /// [`View::read_small`]). Files that are not regular, or larger than
    /// [`sandbox::MAX_USER_FILE`], are errors.
    pub fn resolve_user(
        &self,
        user: &sandbox::User,
    ) -> Result<sandbox::ResolvedUser, sandbox::Error> {
        match self {
            View::Dir(root) => sandbox::resolve_user(root, user),
            View::Layers(_) => {
                let read = || {
                    Ok::<_, sandbox::UserFileError>((
                        self.read_small(Path::new("/etc/passwd"))?,
                        self.read_small(Path::new("/etc/group"))?,
                    ))
                };
                let (passwd, group) = read().map_err(|source| sandbox::Error::UserFile {
                    spec: match user {
                        sandbox::User::Root => "0".into(),
                        sandbox::User::Id { uid, gid } => format!("{uid}:{gid}"),
                        sandbox::User::Spec(s) => s.clone(),
                    },
                    source,
                })?;
                sandbox::resolve_user_with(user, &passwd, &group)
            }
        }
    }

    /// A small regular file of the image (at most [`sandbox::MAX_USER_FILE`] bytes; links are
    /// followed inside the image, never out of it), opened without blocking; empty when
    /// missing. Anything but a regular file is an error (a FIFO is never read).
    pub fn read_small(&self, inside: &Path) -> Result<String, sandbox::UserFileError> {
        let what = inside.display().to_string();
        let not_regular = || sandbox::UserFileError::NotRegular { what: what.clone() };
        let failed = |source: io::Error| sandbox::UserFileError::Read {
            what: what.clone(),
            source,
        };
        // The file's type is known before it is opened for reading (O_PATH, or lstat through
        // layers): a FIFO would block.
        let path = match self {
            View::Dir(root) => {
                let flags = OFlags::PATH | OFlags::CLOEXEC;
                match Root::open(root).and_then(|r| r.open_in(inside, flags)) {
                    Ok(fd)
                        if fs::File::from(fd.try_clone().map_err(failed)?)
                            .metadata()
                            .is_ok_and(|m| m.is_file()) =>
                    {
                        (fd_path(&fd), Some(fd))
                    }
                    Ok(_) => return Err(not_regular()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(String::new()),
                    Err(e) => return Err(failed(e)),
                }
            }
            View::Layers(_) => match self.resolve_layers(inside, true) {
                None => return Ok(String::new()),
                Some(p) if fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) => (p, None),
                Some(_) => return Err(not_regular()),
            },
        };
        use std::os::unix::fs::OpenOptionsExt;
        // A layer's file by its host path, which must still be that file (not a link); a
        // complete tree's by its descriptor's magic link.
        let nofollow = if path.1.is_none() {
            libc::O_NOFOLLOW
        } else {
            0
        };
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | nofollow)
            .open(&path.0)
            .map_err(failed)?;
        drop(path.1);
        sandbox::read_user_file(file, &what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn views_resolve_symlinks_inside_the_image() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let (lower, upper) = (d.path().join("lower"), d.path().join("upper"));
        fs::create_dir_all(lower.join("real/sub")).unwrap();
        fs::write(lower.join("real/passwd"), "p").unwrap();
        fs::create_dir_all(&upper).unwrap();
        symlink("real", upper.join("rel")).unwrap();
        symlink("/real", upper.join("abs")).unwrap();
        symlink(outside.path(), upper.join("host")).unwrap();
        for i in 1..45 {
            symlink(format!("c{}", i + 1), upper.join(format!("c{i}"))).unwrap();
        }
        symlink("real", upper.join("c45")).unwrap();
        let layers = View::Layers(vec![upper.clone(), lower.clone()]);
        assert!(layers.is_dir(Path::new("/rel")));
        assert!(layers.is_dir(Path::new("/abs/sub")));
        assert!(!layers.is_dir(Path::new("/host")), "a host directory");
        assert!(!layers.is_dir(Path::new("/c1")), "past 40 links");
        assert_eq!(layers.read_small(Path::new("/abs/passwd")).unwrap(), "p");
        assert_eq!(layers.read_small(Path::new("/c1/passwd")).unwrap(), "");

        // The same as one tree.
        let tree = d.path().join("tree");
        fs::create_dir_all(tree.join("real/sub")).unwrap();
        fs::write(tree.join("real/passwd"), "p").unwrap();
        symlink("/real", tree.join("abs")).unwrap();
        symlink(outside.path(), tree.join("host")).unwrap();
        for i in 1..45 {
            symlink(format!("c{}", i + 1), tree.join(format!("c{i}"))).unwrap();
        }
        symlink("real", tree.join("c45")).unwrap();
        let dir = View::Dir(tree.clone());
        assert!(dir.is_dir(Path::new("/abs/sub")));
        assert!(!dir.is_dir(Path::new("/host")));
        assert!(!dir.is_dir(Path::new("/c1")));
        assert_eq!(dir.read_small(Path::new("/abs/passwd")).unwrap(), "p");
        assert!(dir
            .read_small(Path::new("/c1/passwd"))
            .unwrap_err()
            .to_string()
            .starts_with("reading the image's /c1/passwd: "));
        // Not a regular file: a FIFO (never opened to be read), a link to one, a directory.
        nix::unistd::mkfifo(
            &tree.join("real/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        symlink("fifo", tree.join("real/link")).unwrap();
        nix::unistd::mkfifo(
            &lower.join("real/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        symlink("fifo", lower.join("real/link")).unwrap();
        for view in [&dir, &layers] {
            for f in ["fifo", "link", "sub"] {
                let inside = format!("/real/{f}");
                assert_eq!(
                    view.read_small(Path::new(&inside)).unwrap_err().to_string(),
                    format!("the image's {inside} is not a regular file")
                );
            }
        }
        assert_eq!(
            dir.lookup(Path::new("/abs/passwd")),
            Some(tree.canonicalize().unwrap().join("real/passwd"))
        );
    }
}
