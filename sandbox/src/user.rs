//! Resolving a Dockerfile `USER` value against the rootfs' `/etc/passwd` and `/etc/group`.
//!
//! The files are opened with `RESOLVE_IN_ROOT`, so a hostile image whose `/etc/passwd` is a
//! symlink to `/etc/shadow` reads its own files, never the host's.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use crate::config::User;
use crate::Error;

/// A resolved user: ids, supplementary groups and home directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
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

/// Read a small file of the rootfs, confined to it; a missing file reads as empty.
pub fn read_in_root(rootfs: &Path, path: &str) -> Result<String, Error> {
    let io = |e: std::io::Error| Error::Rootfs {
        path: rootfs.to_path_buf(),
        reason: format!("reading {path}: {e}"),
    };
    let root: OwnedFd = std::fs::File::open(rootfs).map_err(io)?.into();
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .mode(Mode::empty())
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match nix::fcntl::openat2(root.as_raw_fd(), path.trim_start_matches('/'), how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) | Err(nix::errno::Errno::ENOTDIR) => {
            return Ok(String::new())
        }
        Err(e) => return Err(io(e.into())),
    };
    let file = std::fs::File::from(fd_to_owned(fd));
    let mut text = String::new();
    file.take(16 << 20).read_to_string(&mut text).map_err(io)?;
    Ok(text)
}

fn fd_to_owned(fd: std::os::fd::RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was just returned by openat2 and is owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd) }
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
/// that has it.
pub fn resolve_layers(layers: &[std::path::PathBuf], user: &User) -> Result<Resolved, Error> {
    let find = |path: &str| -> Result<String, Error> {
        for layer in layers {
            if layer.join(path.trim_start_matches('/')).exists() {
                return read_in_root(layer, path);
            }
        }
        Ok(String::new())
    };
    resolve_with(user, &find("/etc/passwd")?, &find("/etc/group")?)
}

/// Resolve `user` against the files of `rootfs`.
pub fn resolve(rootfs: &Path, user: &User) -> Result<Resolved, Error> {
    let passwd = read_in_root(rootfs, "/etc/passwd")?;
    let group = if matches!(user, User::Spec(_)) {
        read_in_root(rootfs, "/etc/group")?
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
