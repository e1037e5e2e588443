//! Choosing and writing the user namespace's uid/gid maps.
//!
//! Sandbox root is always the caller's own uid/gid. When the caller owns a subordinate range in
//! `/etc/subuid` and `/etc/subgid`, ids 1..=65536 of the sandbox map onto it, so images whose
//! packages own files as several users work (apt's `_apt`, `nobody`). Without a range the sandbox
//! has just the one id, and the reason is reported.
//!
//! With [`IdMapping::Subordinate`] the caller's own ids are not mapped at all: sandbox ids
//! 0..=65535 are the subordinate range, also for a root caller, so that a root daemon's jobs are
//! not host root. [`set_default`] makes a mapping the default of every sandbox that asks for
//! [`IdMapping::Auto`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::config::IdMapping;
use crate::Error;

/// How many subordinate ids at most the sandbox maps after its root (ids 1..=65536).
pub const SUBORDINATE_IDS: u32 = 65536;

/// A subordinate range: first host id and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// The first host id of the range (from `/etc/subuid` or `/etc/subgid`).
    pub start: u32,
    /// How many ids it holds (only the first [`SUBORDINATE_IDS`] are mapped).
    pub count: u32,
}

/// The maps a sandbox gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapping {
    /// Sandbox 0 = the caller's uid/gid, nothing else.
    Single {
        /// The caller's host uid.
        uid: u32,
        /// The caller's host gid.
        gid: u32,
    },
    /// Sandbox 0 = the caller, 1.. = the subordinate ranges.
    Full {
        /// The caller's host uid, sandbox uid 0.
        uid: u32,
        /// The caller's host gid, sandbox gid 0.
        gid: u32,
        /// The host uids of sandbox uids 1 and up.
        subuid: Range,
        /// The host gids of sandbox gids 1 and up.
        subgid: Range,
        /// Written through the setuid helpers `newuidmap`/`newgidmap` (unprivileged caller)
        /// rather than directly (root).
        helpers: Option<(PathBuf, PathBuf)>,
    },
    /// Sandbox 0.. = the subordinate ranges; the caller's own ids are not mapped.
    Subordinate {
        /// The host uids of sandbox uids 0 and up.
        subuid: Range,
        /// The host gids of sandbox gids 0 and up.
        subgid: Range,
        /// The paths of `newuidmap` and `newgidmap` when the caller is not root (written
        /// directly when `None`).
        helpers: Option<(PathBuf, PathBuf)>,
    },
}

impl Mapping {
    /// Whether the sandbox may call setgroups(2) (it may not with an unprivileged single map).
    pub fn setgroups_allowed(&self) -> bool {
        match self {
            Mapping::Full { .. } | Mapping::Subordinate { .. } => true,
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
            Mapping::Subordinate { subuid, subgid, .. } => {
                subuid.count.min(subgid.count).min(SUBORDINATE_IDS) - 1
            }
        }
    }

    /// Whether writing this map needs the setuid helpers (an unprivileged caller's full or
    /// subordinate map).
    pub fn needs_helpers(&self) -> bool {
        matches!(
            self,
            Mapping::Full {
                helpers: Some(_),
                ..
            } | Mapping::Subordinate {
                helpers: Some(_),
                ..
            }
        )
    }

    /// The maps of a user namespace nested in a held one with this mapping: the identity over
    /// every id the held namespace maps (uid_map, gid_map), extent by extent (the kernel wants
    /// each nested extent inside one extent of the parent's map).
    pub fn nested_texts(&self) -> (String, String) {
        let n = |r: &Range| r.count.min(SUBORDINATE_IDS);
        match self {
            Mapping::Single { .. } => ("0 0 1\n".into(), "0 0 1\n".into()),
            Mapping::Full { subuid, subgid, .. } => (
                format!("0 0 1\n1 1 {}\n", n(subuid)),
                format!("0 0 1\n1 1 {}\n", n(subgid)),
            ),
            Mapping::Subordinate { subuid, subgid, .. } => (
                format!("0 0 {}\n", n(subuid)),
                format!("0 0 {}\n", n(subgid)),
            ),
        }
    }

    /// The maps of a user namespace made with this mapping (uid_map, gid_map), as its
    /// `/proc/<pid>/uid_map` and `gid_map` show them to the caller, one extent a line: what a
    /// held namespace must show to be used (holder.rs), and what names its registry file.
    pub(crate) fn map_texts(&self) -> (String, String) {
        match self {
            Mapping::Single { uid, gid } => {
                (Self::map_text(*uid, None), Self::map_text(*gid, None))
            }
            Mapping::Full {
                uid,
                gid,
                subuid,
                subgid,
                ..
            } => (
                Self::map_text(*uid, Some(*subuid)),
                Self::map_text(*gid, Some(*subgid)),
            ),
            Mapping::Subordinate { subuid, subgid, .. } => (
                Self::subordinate_text(*subuid),
                Self::subordinate_text(*subgid),
            ),
        }
    }

    /// The host uid and gid of sandbox root (what files it creates on binds belong to).
    pub fn root_ids(&self) -> (u32, u32) {
        match self {
            Mapping::Single { uid, gid } | Mapping::Full { uid, gid, .. } => (*uid, *gid),
            Mapping::Subordinate { subuid, subgid, .. } => (subuid.start, subgid.start),
        }
    }

    fn subordinate_text(r: Range) -> String {
        format!("0 {} {}\n", r.start, r.count.min(SUBORDINATE_IDS))
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
                let own = |id| Range {
                    start: id,
                    count: 1,
                };
                run_map_helpers(
                    (newuidmap, &[(0, own(*uid)), (1, *subuid)]),
                    (newgidmap, &[(0, own(*gid)), (1, *subgid)]),
                    pid,
                )
            }
            Mapping::Subordinate {
                subuid,
                subgid,
                helpers: None,
            } => {
                write("uid_map", &Self::subordinate_text(*subuid))?;
                write("gid_map", &Self::subordinate_text(*subgid))
            }
            Mapping::Subordinate {
                subuid,
                subgid,
                helpers: Some((newuidmap, newgidmap)),
            } => run_map_helpers(
                (newuidmap, &[(0, *subuid)]),
                (newgidmap, &[(0, *subgid)]),
                pid,
            ),
        }
    }
}

type HelperRun<'a> = (&'a Path, &'a [(u32, Range)]);

/// Run `newuidmap` and `newgidmap` for `pid` at once: each is a setuid program whose start
/// (exec, dynamic linking, PAM-free checks of /etc/subuid) takes a millisecond or more, and
/// neither waits for the other.
fn run_map_helpers(uid: HelperRun<'_>, gid: HelperRun<'_>, pid: i32) -> Result<(), Error> {
    // Like every clone of ours, not while a `write_executable` file is open (`spawn` returns
    // once the helper has exec'd, its copies of our descriptors closed).
    let alone = crate::no_executable_writes();
    let started = [uid, gid].map(|(helper, ranges)| {
        let mut args = vec![pid.to_string()];
        for (inside, r) in ranges {
            args.push(inside.to_string());
            args.push(r.start.to_string());
            args.push(r.count.min(SUBORDINATE_IDS).to_string());
        }
        let child = Command::new(helper)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn();
        (helper, args, child)
    });
    drop(alone);
    let mut result = Ok(());
    for (helper, args, child) in started {
        let done = child
            .and_then(std::process::Child::wait_with_output)
            .map_err(|e| Error::IdMap {
                what: format!("running {}", helper.display()),
                reason: e.to_string(),
            });
        let failed = match done {
            Ok(out) if out.status.success() => continue,
            Ok(out) => Error::IdMap {
                what: format!("{} {}", helper.display(), args.join(" ")),
                reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            },
            Err(e) => e,
        };
        // Both are waited for (no zombie left behind); the first failure is reported.
        if result.is_ok() {
            result = Err(failed);
        }
    }
    result
}

/// Whether this process runs with `no_new_privs` (set-uid programs then gain nothing).
fn no_new_privs() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"]))
    })
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

static DEFAULT: AtomicU8 = AtomicU8::new(0);

/// Make `mode` what [`IdMapping::Auto`] means for every sandbox of this process from now on (a
/// daemon sets it once at start, so that its image tools, build steps and jobs all use the same
/// mapping). `set_default(IdMapping::Auto)` restores the built-in behaviour.
pub fn set_default(mode: IdMapping) {
    let v = match mode {
        IdMapping::Auto => 0,
        IdMapping::Single => 1,
        IdMapping::Subordinate => 2,
    };
    DEFAULT.store(v, Ordering::SeqCst);
}

/// The mapping [`IdMapping::Auto`] stands for (see [`set_default`]).
pub fn default_mode() -> IdMapping {
    match DEFAULT.load(Ordering::SeqCst) {
        1 => IdMapping::Single,
        2 => IdMapping::Subordinate,
        _ => IdMapping::Auto,
    }
}

/// Decide the mapping for the calling user. Returns the mapping and, when it is the single-id
/// map although a full one was allowed, why. An [`IdMapping::Subordinate`] that cannot be had
/// also falls back to the single map here, with the reason; [`try_choose`] refuses instead.
pub fn choose(mode: IdMapping) -> (Mapping, Option<String>) {
    match try_choose(mode) {
        Ok(r) => r,
        Err(e) => {
            let uid = nix::unistd::geteuid().as_raw();
            let gid = nix::unistd::getegid().as_raw();
            (Mapping::Single { uid, gid }, Some(e.to_string()))
        }
    }
}

/// Like [`choose`], but a subordinate mapping that was asked for (directly or as the process
/// default) and cannot be had is an error rather than a silent fallback to the caller's ids.
pub fn try_choose(mode: IdMapping) -> Result<(Mapping, Option<String>), Error> {
    let mode = match mode {
        IdMapping::Auto => default_mode(),
        other => other,
    };
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    let single = Mapping::Single { uid, gid };
    if mode == IdMapping::Single {
        return Ok((single, None));
    }
    let strict = mode == IdMapping::Subordinate;
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name);
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let who = name.clone().unwrap_or_else(|| uid.to_string());
    let fallback = |why: String| {
        if strict {
            Err(Error::IdMap {
                what: "subordinate ids".into(),
                reason: why,
            })
        } else {
            Ok((single.clone(), Some(why)))
        }
    };
    let Some(subuid) = find_range(&read("/etc/subuid"), name.as_deref(), uid) else {
        return fallback(format!("no range for {who} in /etc/subuid"));
    };
    let Some(subgid) = find_range(&read("/etc/subgid"), name.as_deref(), uid) else {
        return fallback(format!("no range for {who} in /etc/subgid"));
    };
    let helpers = if uid == 0 {
        None
    } else {
        match (find_program("newuidmap"), find_program("newgidmap")) {
            _ if no_new_privs() => {
                return fallback(
                    "no_new_privs is set (e.g. systemd's NoNewPrivileges=yes): the set-uid \
                     newuidmap/newgidmap cannot map subordinate ids"
                        .into(),
                )
            }
            (Some(u), Some(g)) => Some((u, g)),
            _ => {
                return fallback("newuidmap/newgidmap not installed (Debian package uidmap)".into())
            }
        }
    };
    if strict {
        return Ok((
            Mapping::Subordinate {
                subuid,
                subgid,
                helpers,
            },
            None,
        ));
    }
    Ok((
        Mapping::Full {
            uid,
            gid,
            subuid,
            subgid,
            helpers,
        },
        None,
    ))
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
    fn subordinate_text_maps_root_onto_the_range() {
        let r = Range {
            start: 100000,
            count: 65536,
        };
        assert_eq!(Mapping::subordinate_text(r), "0 100000 65536\n");
        let m = Mapping::Subordinate {
            subuid: r,
            subgid: r,
            helpers: None,
        };
        assert_eq!(m.max_id(), 65535);
        assert_eq!(m.root_ids(), (100000, 100000));
    }

    #[test]
    fn single_mode_is_single() {
        let (m, why) = choose(IdMapping::Single);
        assert!(matches!(m, Mapping::Single { .. }));
        assert_eq!(m.max_id(), 0);
        assert!(why.is_none());
    }
}
