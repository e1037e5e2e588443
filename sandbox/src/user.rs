//! Resolving a Dockerfile `USER` value against the rootfs' `/etc/passwd` and `/etc/group`.
//!
//! The files are opened with `RESOLVE_IN_ROOT`, so a hostile image whose `/etc/passwd` is a
//! symlink to `/etc/shadow` reads its own files, never the host's. They must be regular files
//! (a link, a FIFO or a device is refused without being opened for reading, so nothing can make
//! the caller's thread wait) of at most [`MAX_USER_FILE`] bytes.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use crate::config::User;
use crate::Error;

/// The most of an image's `/etc/passwd` or `/etc/group` that is read (4 MiB: tens of
/// thousands of users).
pub const MAX_USER_FILE: u64 = 4 << 20;

/// Why an image's user database file (`/etc/passwd`, `/etc/group`) could not be read; `what`
/// names the file.
#[derive(Debug, thiserror::Error)]
pub enum UserFileError {
    /// The file could not be opened or stat-ed in the rootfs.
    #[error("the image's {what}: {source}")]
    Metadata {
        /// Which file, e.g. `/etc/passwd`.
        what: String,
        /// The error from opening or stat-ing it.
        #[source]
        source: std::io::Error,
    },
    /// The file is a directory, device, FIFO... (read as-is it could block or never end).
    #[error("the image's {what} is not a regular file")]
    NotRegular {
        /// Which file, e.g. `/etc/passwd`.
        what: String,
    },
    /// The file is larger than [`MAX_USER_FILE`].
    #[error("the image's {what} is larger than {} MiB", MAX_USER_FILE >> 20)]
    TooLarge {
        /// Which file, e.g. `/etc/group`.
        what: String,
    },
    /// Reading the file's contents failed.
    #[error("reading the image's {what}: {source}")]
    Read {
        /// Which file, e.g. `/etc/passwd`.
        what: String,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
}

/// A resolved user: ids, supplementary groups and home directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The uid inside the sandbox.
    pub uid: u32,
    /// The primary gid inside the sandbox.
    pub gid: u32,
    /// The supplementary gids, the primary one included.
    pub groups: Vec<u32>,
    /// The home directory from `/etc/passwd`; `/` when the user has no entry.
    pub home: String,
}

impl Resolved {
    /// `uid[:gid]` in numbers (for images without /etc/passwd); gid defaults to uid.
    pub fn from_numeric(spec: &str) -> Option<Resolved> {
        let (u, g) = match spec.split_once(':') {
            Some((u, g)) => (u.parse().ok()?, g.parse().ok()?),
            None => {
                let u = spec.parse().ok()?;
                (u, u)
            }
        };
        Some(Resolved {
            uid: u,
            gid: g,
            groups: vec![g],
            home: "/".into(),
        })
    }
}

/// Read an image's user database file `what` (e.g. `/etc/passwd`) from `file`, opened without
/// blocking (`O_NONBLOCK`): it must be a regular file of at most [`MAX_USER_FILE`] bytes.
pub fn read_user_file(file: File, what: &str) -> Result<String, UserFileError> {
    let what = || what.to_string();
    let meta = file.metadata().map_err(|source| UserFileError::Metadata {
        what: what(),
        source,
    })?;
    if !meta.is_file() {
        return Err(UserFileError::NotRegular { what: what() });
    }
    let too_large = || UserFileError::TooLarge { what: what() };
    if meta.len() > MAX_USER_FILE {
        return Err(too_large());
    }
    let mut text = Vec::new();
    file.take(MAX_USER_FILE + 1)
        .read_to_end(&mut text)
        .map_err(|source| UserFileError::Read {
            what: what(),
            source,
        })?;
    if text.len() as u64 > MAX_USER_FILE {
        return Err(too_large());
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// A file of a rootfs or a layer.
#[derive(Debug, PartialEq, Eq)]
enum InRoot {
    Missing,
    /// An overlay whiteout: removed in this layer (lower layers do not count).
    Removed,
    Text(String),
}

/// Read a small file of the rootfs, confined to it (see [`read_user_file`]).
fn read_in_root(rootfs: &Path, path: &str) -> Result<InRoot, UserFileError> {
    let io = |source: std::io::Error| UserFileError::Read {
        what: path.to_string(),
        source,
    };
    let root: OwnedFd = File::open(rootfs).map_err(io)?.into();
    // O_PATH first: the file's type is known before it is opened for reading (a FIFO would
    // block, a device would be opened). Links are followed inside the root (as Docker reads an
    // image's user database), never out of it; what they lead to must be a regular file.
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .mode(Mode::empty())
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match nix::fcntl::openat2(root.as_raw_fd(), path.trim_start_matches('/'), how) {
        Ok(fd) => fd_to_owned(fd),
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => return Ok(InRoot::Missing),
        Err(e) => return Err(io(e.into())),
    };
    let meta = File::from(fd.try_clone().map_err(io)?)
        .metadata()
        .map_err(io)?;
    if meta.file_type().is_char_device() && meta.rdev() == 0 {
        return Ok(InRoot::Removed);
    }
    if !meta.is_file() {
        return Err(UserFileError::NotRegular {
            what: path.to_string(),
        });
    }
    // The same inode, now for reading (never blocking).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(io)?;
    read_user_file(file, path).map(InRoot::Text)
}

fn fd_to_owned(fd: std::os::fd::RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was just returned by openat2 and is owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// How a user is written in errors.
fn spec_of(user: &User) -> String {
    match user {
        User::Root => "0".to_string(),
        User::Id { uid, gid } => format!("{uid}:{gid}"),
        User::Spec(s) => s.clone(),
    }
}

struct Entry<'a> {
    name: &'a str,
    id: u32,
    gid: u32,
    home: &'a str,
    members: Vec<&'a str>,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = Entry<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        Some(Entry {
            name: f[0],
            id: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
            members: Vec::new(),
        })
    })
}

fn group_entries(text: &str) -> impl Iterator<Item = Entry<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 {
            return None;
        }
        Some(Entry {
            name: f[0],
            id: f[2].parse().ok()?,
            gid: 0,
            home: "",
            members: f[3].split(',').filter(|m| !m.is_empty()).collect(),
        })
    })
}

/// Resolve `user` with the contents of the rootfs' passwd and group files.
pub fn resolve_with(user: &User, passwd: &str, group: &str) -> Result<Resolved, Error> {
    let spec = match user {
        User::Root => "0".to_string(),
        User::Id { uid, gid } => {
            let home = passwd_entries(passwd)
                .find(|e| e.id == *uid)
                .map_or("/".to_string(), |e| e.home.to_string());
            return Ok(Resolved {
                uid: *uid,
                gid: *gid,
                groups: vec![*gid],
                home,
            });
        }
        User::Spec(s) => s.clone(),
    };
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec.as_str(), None),
    };
    let unknown = |what: &str, name: &str| Error::User {
        spec: spec.clone(),
        reason: format!(
            "no {what} {name:?} in the image's /etc/{what_file}",
            what_file = if what == "user" { "passwd" } else { "group" }
        ),
    };
    let entry =
        passwd_entries(passwd).find(|e| e.name == user_part || e.id.to_string() == user_part);
    let (uid, mut gid, name, home) = match (entry, user_part.parse::<u32>()) {
        (Some(e), _) => (e.id, e.gid, Some(e.name.to_string()), e.home.to_string()),
        (None, Ok(uid)) => (uid, 0, None, "/".to_string()),
        (None, Err(_)) => return Err(unknown("user", user_part)),
    };
    let mut groups = Vec::new();
    if let Some(g) = group_part {
        gid = match group_entries(group).find(|e| e.name == g || e.id.to_string() == g) {
            Some(e) => e.id,
            None => g.parse().map_err(|_| unknown("group", g))?,
        };
    } else if let Some(name) = &name {
        groups.extend(
            group_entries(group)
                .filter(|e| e.members.contains(&name.as_str()))
                .map(|e| e.id),
        );
    }
    groups.insert(0, gid);
    groups.dedup();
    Ok(Resolved {
        uid,
        gid,
        groups,
        home: if home.is_empty() { "/".into() } else { home },
    })
}

/// Resolve `user` against overlay layers (top first): each file comes from the topmost layer
/// that has it (a whiteout hides it from the layers below).
pub(crate) fn resolve_layers(
    layers: &[std::path::PathBuf],
    user: &User,
) -> Result<Resolved, Error> {
    let find = |path: &str| -> Result<String, UserFileError> {
        for layer in layers {
            match read_in_root(layer, path)? {
                InRoot::Missing => continue,
                InRoot::Removed => break,
                InRoot::Text(t) => return Ok(t),
            }
        }
        Ok(String::new())
    };
    let read = || Ok::<_, UserFileError>((find("/etc/passwd")?, find("/etc/group")?));
    let (passwd, group) = read().map_err(|source| Error::UserFile {
        spec: spec_of(user),
        source,
    })?;
    resolve_with(user, &passwd, &group)
}

/// Resolve `user` against the files of `rootfs`.
pub fn resolve(rootfs: &Path, user: &User) -> Result<Resolved, Error> {
    let read = |path: &str| match read_in_root(rootfs, path) {
        Ok(InRoot::Text(t)) => Ok(t),
        Ok(_) => Ok(String::new()),
        Err(source) => Err(Error::UserFile {
            spec: spec_of(user),
            source,
        }),
    };
    let passwd = read("/etc/passwd")?;
    let group = if matches!(user, User::Spec(_)) {
        read("/etc/group")?
    } else {
        String::new()
    };
    resolve_with(user, &passwd, &group)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000::/home/builder:/bin/sh\n_apt:x:42:65534::/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nbuilder:x:1000:\nstaff:x:50:builder,other\nusers:x:100:\n";

    fn spec(s: &str) -> User {
        User::Spec(s.into())
    }

    #[test]
    fn resolves_names_ids_and_groups() {
        let r = resolve_with(&spec("builder"), PASSWD, GROUP).unwrap();
        assert_eq!(
            r,
            Resolved {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 50],
                home: "/home/builder".into()
            }
        );
        let r = resolve_with(&spec("1000:users"), PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid, r.groups), (1000, 100, vec![100]));
        let r = resolve_with(&spec("_apt"), PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid), (42, 65534));
        // An unknown numeric user is allowed, with gid 0 (as Docker does).
        let r = resolve_with(&spec("4242"), PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid, r.home.as_str()), (4242, 0, "/"));
        let r = resolve_with(&spec("4242:7"), PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid), (4242, 7));
        let r = resolve_with(&User::Root, PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid, r.home.as_str()), (0, 0, "/root"));
    }

    #[test]
    fn user_files_must_be_small_regular_files() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let user = spec("builder");
        let err = |root: &Path| resolve(root, &user).unwrap_err().to_string();
        // A FIFO (which would block a reader forever), a link to one (followed inside the
        // root), a directory.
        nix::unistd::mkfifo(&root.join("etc/passwd"), Mode::from_bits_truncate(0o644)).unwrap();
        assert_eq!(
            err(root),
            "user \"builder\": the image's /etc/passwd is not a regular file"
        );
        std::fs::remove_file(root.join("etc/passwd")).unwrap();
        nix::unistd::mkfifo(&root.join("etc/pipe"), Mode::from_bits_truncate(0o644)).unwrap();
        std::os::unix::fs::symlink("/etc/pipe", root.join("etc/passwd")).unwrap();
        assert_eq!(
            err(root),
            "user \"builder\": the image's /etc/passwd is not a regular file"
        );
        std::fs::remove_file(root.join("etc/passwd")).unwrap();
        std::fs::write(root.join("etc/passwd"), PASSWD).unwrap();
        std::fs::create_dir(root.join("etc/group")).unwrap();
        assert_eq!(
            err(root),
            "user \"builder\": the image's /etc/group is not a regular file"
        );
        std::fs::remove_dir(root.join("etc/group")).unwrap();
        // A huge (sparse) file is refused without being read.
        let f = File::create(root.join("etc/group")).unwrap();
        f.set_len(1 << 30).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(
            err(root),
            "user \"builder\": the image's /etc/group is larger than 4 MiB"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        std::fs::write(root.join("etc/group"), GROUP).unwrap();
        assert_eq!(resolve(root, &user).unwrap().uid, 1000);
        // Through layers: the top one's whiteout hides a lower passwd; a FIFO in a layer is
        // refused as well.
        let top = d.path().join("top");
        std::fs::create_dir_all(top.join("etc")).unwrap();
        assert_eq!(
            resolve_layers(&[top.clone(), root.to_path_buf()], &user)
                .unwrap()
                .uid,
            1000
        );
        nix::unistd::mkfifo(&top.join("etc/passwd"), Mode::from_bits_truncate(0o644)).unwrap();
        assert_eq!(
            resolve_layers(&[top.clone(), root.to_path_buf()], &user)
                .unwrap_err()
                .to_string(),
            "user \"builder\": the image's /etc/passwd is not a regular file"
        );
    }

    #[test]
    fn unknown_names_are_errors() {
        let e = resolve_with(&spec("nobody"), PASSWD, GROUP).unwrap_err();
        assert!(
            e.to_string()
                .contains("no user \"nobody\" in the image's /etc/passwd"),
            "{e}"
        );
        let e = resolve_with(&spec("builder:wheel"), PASSWD, GROUP).unwrap_err();
        assert!(
            e.to_string()
                .contains("no group \"wheel\" in the image's /etc/group"),
            "{e}"
        );
    }
}
