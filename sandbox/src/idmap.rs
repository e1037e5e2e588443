//! Choosing and writing the user namespace's uid/gid maps.
//!
//! Sandbox root is always the caller's own uid/gid. When the caller owns a subordinate range in
//! `/etc/subuid` and `/etc/subgid`, ids 1..=65536 of the sandbox map onto it, so images whose
//! packages own files as several users work (apt's `_apt`, `nobody`). Without a range the sandbox
//! has just the one id, and the reason is reported.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::IdMapping;
use crate::Error;

/// How many subordinate ids at most the sandbox maps after its root (ids 1..=65536).
pub const SUBORDINATE_IDS: u32 = 65536;

/// A subordinate range: first host id and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u32,
    pub count: u32,
}

/// The maps a sandbox gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapping {
    /// Sandbox 0 = the caller's uid/gid, nothing else.
    Single { uid: u32, gid: u32 },
    /// Sandbox 0 = the caller, 1.. = the subordinate ranges.
    Full {
        uid: u32,
        gid: u32,
        subuid: Range,
        subgid: Range,
        /// Written through the setuid helpers `newuidmap`/`newgidmap` (unprivileged caller)
        /// rather than directly (root).
        helpers: Option<(PathBuf, PathBuf)>,
    },
}

impl Mapping {
    /// Whether the sandbox may call setgroups(2) (it may not with an unprivileged single map).
    pub fn setgroups_allowed(&self) -> bool {
        match self {
            Mapping::Full { .. } => true,
            Mapping::Single { .. } => nix::unistd::geteuid().is_root(),
        }
    }

    /// The highest sandbox uid that exists.
    pub fn max_id(&self) -> u32 {
        match self {
            Mapping::Single { .. } => 0,
            Mapping::Full { subuid, subgid, .. } => {
                subuid.count.min(subgid.count).min(SUBORDINATE_IDS)
            }
        }
    }

    fn map_text(own: u32, sub: Option<Range>) -> String {
        let mut text = format!("0 {own} 1\n");
        if let Some(r) = sub {
            text.push_str(&format!("1 {} {}\n", r.start, r.count.min(SUBORDINATE_IDS)));
        }
        text
    }

    /// Write the maps of process `pid` (which must be in a fresh user namespace).
    pub fn write(&self, pid: i32) -> Result<(), Error> {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let write = |name: &str, text: &str| {
            std::fs::write(proc.join(name), text).map_err(|e| Error::IdMap {
                what: format!("writing {name} {:?}", text.trim_end()),
                reason: e.to_string(),
            })
        };
        match self {
            Mapping::Single { uid, gid } => {
                if !nix::unistd::geteuid().is_root() {
                    write("setgroups", "deny")?;
                }
                write("uid_map", &Self::map_text(*uid, None))?;
                write("gid_map", &Self::map_text(*gid, None))
            }
            Mapping::Full {
                uid,
                gid,
                subuid,
                subgid,
                helpers: None,
            } => {
                write("uid_map", &Self::map_text(*uid, Some(*subuid)))?;
                write("gid_map", &Self::map_text(*gid, Some(*subgid)))
            }
            Mapping::Full {
                uid,
                gid,
                subuid,
                subgid,
                helpers: Some((newuidmap, newgidmap)),
            } => {
                run_helper(newuidmap, pid, *uid, *subuid)?;
                run_helper(newgidmap, pid, *gid, *subgid)
            }
        }
    }
}

fn run_helper(helper: &Path, pid: i32, own: u32, sub: Range) -> Result<(), Error> {
    let count = sub.count.min(SUBORDINATE_IDS);
    let args = [
        pid.to_string(),
        "0".into(),
        own.to_string(),
        "1".into(),
        "1".into(),
        sub.start.to_string(),
        count.to_string(),
    ];
    let out = Command::new(helper)
        .args(&args)
        .output()
        .map_err(|e| Error::IdMap {
            what: format!("running {}", helper.display()),
            reason: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::IdMap {
            what: format!("{} {}", helper.display(), args.join(" ")),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Parse `/etc/subuid`-style text and return the first range of `name` or `id`.
pub fn find_range(text: &str, name: Option<&str>, id: u32) -> Option<Range> {
    let id = id.to_string();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut it = l.split(':');
            let (owner, start, count) = (it.next()?, it.next()?, it.next()?);
            let range = Range {
                start: start.trim().parse().ok()?,
                count: count.trim().parse().ok()?,
            };
            let owned = owner == id || Some(owner) == name;
            (owned && range.count > 0).then_some(range)
        })
        .next()
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/bin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Decide the mapping for the calling user. Returns the mapping and, when it is the single-id
/// map although a full one was allowed, why.
pub fn choose(mode: IdMapping) -> (Mapping, Option<String>) {
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    let single = Mapping::Single { uid, gid };
    if mode == IdMapping::Single {
        return (single, None);
    }
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name);
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let who = name.clone().unwrap_or_else(|| uid.to_string());
    let Some(subuid) = find_range(&read("/etc/subuid"), name.as_deref(), uid) else {
        return (single, Some(format!("no range for {who} in /etc/subuid")));
    };
    let Some(subgid) = find_range(&read("/etc/subgid"), name.as_deref(), uid) else {
        return (single, Some(format!("no range for {who} in /etc/subgid")));
    };
    let helpers = if uid == 0 {
        None
    } else {
        match (find_program("newuidmap"), find_program("newgidmap")) {
            (Some(u), Some(g)) => Some((u, g)),
            _ => {
                return (
                    single,
                    Some("newuidmap/newgidmap not installed (Debian package uidmap)".into()),
                )
            }
        }
    };
    (
        Mapping::Full {
            uid,
            gid,
            subuid,
            subgid,
            helpers,
        },
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_range_by_name_or_uid() {
        let text = "# comment\nalice:100000:65536\n1001:200000:1000\nbob:300000:0\n";
        assert_eq!(
            find_range(text, Some("alice"), 1000),
            Some(Range {
                start: 100000,
                count: 65536
            })
        );
        assert_eq!(
            find_range(text, Some("carol"), 1001),
            Some(Range {
                start: 200000,
                count: 1000
            })
        );
        // A zero-length range is no range.
        assert_eq!(find_range(text, Some("bob"), 1002), None);
        assert_eq!(find_range("garbage\n::\n", Some("alice"), 1), None);
    }

    #[test]
    fn map_text_caps_the_range() {
        assert_eq!(Mapping::map_text(1000, None), "0 1000 1\n");
        assert_eq!(
            Mapping::map_text(
                1000,
                Some(Range {
                    start: 100000,
                    count: 1_000_000
                })
            ),
            "0 1000 1\n1 100000 65536\n"
        );
    }

    #[test]
    fn single_mode_is_single() {
        let (m, why) = choose(IdMapping::Single);
        assert!(matches!(m, Mapping::Single { .. }));
        assert_eq!(m.max_id(), 0);
        assert!(why.is_none());
    }
}
