//! The sandbox set-up as an ordered list of operations, computed before `clone` so that the
//! child only walks a slice and makes system calls (no allocation after clone).
//!
//! Order: detach the tree from the host (`MakePrivate`), take detached copies of everything that
//! comes from the host (`Grab`: device nodes, `/sys`, resolv.conf, user binds), enter the rootfs
//! (`Pivot`: the old root is detached and gone), then build `/proc`, `/sys`, `/dev`, `/tmp`, the
//! user binds in the caller's order, and last make the root read-only when asked. Paths after
//! `Pivot` resolve inside the new root, so a symlink in the image can never lead a mount out of it.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::config::{NetworkMode, Overlay, OverlayMount, Tmpfs};
use crate::paths::try_resolve_in_root;
use crate::sys::{MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};

/// One step of the set-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// Make every mount of our new namespace private, so nothing propagates to the host.
    MakePrivate,
    /// Before pivot: detached copy of host `source` (recursive), read-only if asked, into a slot.
    Grab {
        source: CString,
        slot: usize,
        read_only: bool,
    },
    /// [`Op::Grab`], refused ([`NOT_AS_CHECKED`]) unless the root of the copy is the file
    /// `dev`/`ino` (what the caller checked; see `Bind::from_fd`).
    GrabChecked {
        source: CString,
        dev: u64,
        ino: u64,
        slot: usize,
        read_only: bool,
    },
    /// Before pivot: a new detached `proc` or `sysfs` (see [`crate::sys::fresh_mount`]) into a
    /// slot.
    Fresh {
        fstype: CString,
        /// fsconfig options: a value, or a flag.
        options: Vec<(CString, Option<CString>)>,
        /// Options to try when `options` are refused (older kernels), if not empty.
        fallback: Vec<(CString, Option<CString>)>,
        attrs: u64,
        slot: usize,
    },
    /// Bind the rootfs onto itself, pivot into it and detach the old root.
    Pivot {
        rootfs: CString,
    },
    /// Pivot into the tree of `slot` (a clone of the host's `/`, for a rootfs of `/`): attach it
    /// on `staging` (an existing directory), pivot there and detach the old root.
    PivotTree {
        slot: usize,
        staging: CString,
    },
    /// Create each directory of the list (parents first), ignoring existing ones.
    Mkdirs {
        dirs: Vec<CString>,
    },
    /// Create an empty file to mount a file onto.
    Touch {
        path: CString,
    },
    /// A new filesystem.
    Mount {
        fstype: CString,
        target: CString,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// Attach the tree of `slot` at `target`.
    Attach {
        slot: usize,
        target: CString,
    },
    /// Bind a path of the new root onto itself read-only (e.g. `/proc/sys`); missing is fine.
    ReadOnlySelf {
        path: CString,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    /// Write a sysctl of the sandbox's own namespaces (`/proc/sys/...`), before `/proc/sys` is
    /// made read-only.
    WriteFile {
        path: CString,
        data: CString,
    },
    /// Bind `/dev/null` over a file of `/proc` that leaks host information; missing is fine.
    MaskFile {
        path: CString,
    },
    /// An empty read-only tmpfs over a directory that leaks host information; missing is fine.
    MaskDir {
        path: CString,
    },
    /// Detach a staging mount (and everything on it).
    Unstage {
        target: CString,
    },
    /// Make the root mount read-only.
    ReadOnlyRoot,
    /// Bring up `lo` in the new network namespace.
    LoopbackUp,
}

impl Op {
    /// Pass the address of every heap buffer of the operation (its strings, its non-empty
    /// lists) to `at` (child::Prepared::each_buffer: what init keeps mapped).
    /// Every field is named (no `..`): a string added to an operation must be passed here.
    pub(crate) fn buffers(&self, at: &mut dyn FnMut(usize)) {
        let mut s = |c: &CString| at(c.as_ptr() as usize);
        match self {
            Op::MakePrivate | Op::ReadOnlyRoot | Op::LoopbackUp => {}
            Op::Grab {
                source,
                slot: _,
                read_only: _,
            }
            | Op::GrabChecked {
                source,
                dev: _,
                ino: _,
                slot: _,
                read_only: _,
            } => s(source),
            Op::Fresh {
                fstype,
                options,
                fallback,
                attrs: _,
                slot: _,
            } => {
                s(fstype);
                for (key, value) in options.iter().chain(fallback) {
                    s(key);
                    if let Some(v) = value {
                        s(v);
                    }
                }
                for set in [options, fallback] {
                    if !set.is_empty() {
                        at(set.as_ptr() as usize);
                    }
                }
            }
            Op::Pivot { rootfs } => s(rootfs),
            Op::PivotTree { staging, slot: _ } => s(staging),
            Op::Mkdirs { dirs } => {
                dirs.iter().for_each(&mut s);
                if !dirs.is_empty() {
                    at(dirs.as_ptr() as usize);
                }
            }
            Op::Touch { path }
            | Op::ReadOnlySelf { path }
            | Op::MaskFile { path }
            | Op::MaskDir { path } => s(path),
            Op::Mount {
                fstype,
                target,
                data,
                flags: _,
            } => {
                s(fstype);
                s(target);
                if let Some(d) = data {
                    s(d);
                }
            }
            Op::Attach { target, slot: _ } | Op::Unstage { target } => s(target),
            Op::Symlink { target, link } => {
                s(target);
                s(link);
            }
            Op::WriteFile { path, data } => {
                s(path);
                s(data);
            }
        }
    }

    /// What the step does, for error messages (`mount proc on /proc`).
    /// Whether this operation mounts an overlay (whose refusal callers may work around).
    pub(crate) fn is_overlay(&self) -> bool {
        matches!(self, Op::Fresh { fstype, .. } if fstype.as_bytes() == b"overlay")
    }

    pub(crate) fn describe(&self) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Op::MakePrivate => "making mounts private".into(),
            Op::Grab { source, .. } | Op::GrabChecked { source, .. } => {
                format!("opening {} to bind it", s(source))
            }
            Op::Fresh { fstype, .. } => format!("creating a new {}", s(fstype)),
            Op::Pivot { rootfs } => format!("pivot_root into {}", s(rootfs)),
            Op::PivotTree { .. } => "pivot_root into a copy of /".into(),
            Op::Mkdirs { dirs } => format!(
                "creating directory {}",
                dirs.last().map(s).unwrap_or_default()
            ),
            Op::Touch { path } => format!("creating mount point {}", s(path)),
            Op::Mount { fstype, target, .. } => format!("mount {} on {}", s(fstype), s(target)),
            Op::Attach { target, .. } => format!("bind mount on {}", s(target)),
            Op::ReadOnlySelf { path } => format!("making {} read-only", s(path)),
            Op::Symlink { link, target } => format!("symlink {} -> {}", s(link), s(target)),
            Op::WriteFile { path, data } => format!("writing {} to {}", s(data), s(path)),
            Op::MaskFile { path } | Op::MaskDir { path } => format!("masking {}", s(path)),
            Op::Unstage { target } => format!("detaching {}", s(target)),
            Op::ReadOnlyRoot => "making the root read-only".into(),
            Op::LoopbackUp => "bringing up the loopback interface".into(),
        }
    }
}

/// Files hidden behind `/dev/null` and directories behind an empty read-only tmpfs, as runc and
/// Docker mask them: they show host hardware, kernel memory, timers and the keyring.
pub(crate) const MASKED_FILES: &[&str] = &[
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
];
pub(crate) const MASKED_DIRS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Where overlay layers are staged before pivot_root (see [`build`]).
const STAGING: &str = "/dev";

/// Device nodes bound from the host into the sandbox's `/dev`.
pub(crate) const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// A user bind, with its source's kind known.
#[derive(Debug, Clone)]
pub(crate) struct PlannedBind {
    pub source: PathBuf,
    pub destination: PathBuf,
    pub read_only: bool,
    pub source_is_dir: bool,
    /// The device and inode the source must have when it is grabbed (see `Bind::from_fd`).
    pub expect: Option<(u64, u64)>,
}

/// The errno a [`Op::GrabChecked`] fails with when its source is not what was checked.
pub(crate) const NOT_AS_CHECKED: i32 = libc::ESTALE;

type FsOptions = Vec<(CString, Option<CString>)>;

/// Overlay options: one `lowerdir+` per layer (Linux ≥ 6.8; fsconfig values are limited to 256
/// bytes, too short for a joined list of several store paths), and as a fallback for older
/// kernels the joined `lowerdir`.
fn overlay_options(lowers: &[PathBuf], rw: Option<(&Path, &Path)>) -> (FsOptions, FsOptions) {
    let tail = |mut v: FsOptions| {
        if let Some((upper, work)) = rw {
            v.push((c("upperdir"), Some(cpath(upper))));
            v.push((c("workdir"), Some(cpath(work))));
        }
        v.push((c("userxattr"), None));
        v
    };
    let each = lowers
        .iter()
        .map(|l| (c("lowerdir+"), Some(cpath(l))))
        .collect();
    let joined: Vec<&[u8]> = lowers.iter().map(|l| l.as_os_str().as_bytes()).collect();
    let joined = vec![(c("lowerdir"), Some(cstr(&joined.join(&b':'))))];
    (tail(each), tail(joined))
}

/// A new overlay (pre-pivot) into `slot`.
fn overlay_op(slot: usize, lowers: &[PathBuf], rw: Option<(&Path, &Path)>) -> Op {
    let (options, fallback) = overlay_options(lowers, rw);
    Op::Fresh {
        fstype: c("overlay"),
        options,
        fallback,
        attrs: 0,
        slot,
    }
}

/// The inputs of [`build`].
pub(crate) struct Spec<'a> {
    pub rootfs: &'a Path,
    pub overlay: Option<&'a Overlay>,
    pub overlay_mounts: &'a [OverlayMount],
    pub network: NetworkMode,
    /// An isolated network namespace made ahead and joined (the sandbox's user namespace does
    /// not own it: it cannot make a sysfs of it, `lo` is up already).
    pub joined_netns: bool,
    /// A detached sysfs of that namespace, made with it, is given (its descriptor goes into the
    /// slot [`build`] returns); without it the host's `/sys` is bound.
    pub given_sysfs: bool,
    /// An isolated network's generated `/etc/resolv.conf` and `/etc/hosts`.
    pub generated_etc: Option<(&'a Path, &'a Path)>,
    pub binds: &'a [PlannedBind],
    /// Fresh tmpfs mounts, after the binds and overlay mounts.
    pub tmpfs_mounts: &'a [Tmpfs],
    pub tmpfs_tmp: bool,
    /// The size of every tmpfs mounted for the job, in bytes ([`crate::Limits::tmpfs`]).
    pub tmpfs_size: Option<u64>,
    pub read_only_root: bool,
    /// Sysctls of the sandbox's own namespaces to write once `/proc` is mounted (path, value).
    pub sysctls: &'a [(&'static str, String)],
}

pub(crate) fn cstr(bytes: &[u8]) -> CString {
    // Paths handed to us come from OsStr/Path, which cannot contain NUL on Unix except when a
    // caller builds one on purpose; such a byte is replaced rather than panicking.
    CString::new(
        bytes
            .iter()
            .map(|&b| if b == 0 { b'?' } else { b })
            .collect::<Vec<u8>>(),
    )
    .unwrap_or_default()
}

pub(crate) fn cpath(p: &Path) -> CString {
    cstr(p.as_os_str().as_bytes())
}

/// `/a/b/c` → [`/a`, `/a/b`, `/a/b/c`].
fn prefixes(p: &Path) -> Vec<CString> {
    let mut acc = PathBuf::from("/");
    let mut out = Vec::new();
    for c in p.components() {
        if let Component::Normal(n) = c {
            acc.push(n);
            out.push(cpath(&acc));
        }
    }
    out
}

fn mkdirs(p: &str) -> Op {
    Op::Mkdirs {
        dirs: prefixes(Path::new(p)),
    }
}

fn c(s: &str) -> CString {
    cstr(s.as_bytes())
}

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

fn mount(fstype: &str, target: &str, flags: libc::c_ulong, data: Option<&str>) -> Op {
    Op::Mount {
        fstype: c(fstype),
        target: c(target),
        flags,
        data: data.map(c),
    }
}

/// The ordered operations, how many grab slots they use, and the slot of the given sysfs
/// ([`Spec::given_sysfs`]), which the caller fills. Fails when a bind's destination cannot be
/// resolved inside the root (a symlink loop).
pub(crate) fn build(spec: &Spec<'_>) -> Result<(Vec<Op>, usize, Option<usize>), crate::Error> {
    let resolve = |dest: &Path| {
        try_resolve_in_root(spec.rootfs, dest).map_err(|e| crate::Error::Bind {
            path: dest.to_path_buf(),
            reason: format!(
                "cannot resolve the destination inside the root: {}",
                crate::errno_text(e.raw_os_error().unwrap_or(libc::EIO))
            ),
        })
    };
    let mut ops = vec![Op::MakePrivate];
    let mut slots = 0;
    let next = |n: &mut usize| {
        *n += 1;
        *n - 1
    };
    let grab = |ops: &mut Vec<Op>, slots: &mut usize, source: &Path, read_only: bool| {
        let slot = next(slots);
        ops.push(Op::Grab {
            source: cpath(source),
            slot,
            read_only,
        });
        slot
    };
    let fresh = |ops: &mut Vec<Op>, slots: &mut usize, fstype: &str, attrs: u64| {
        let slot = next(slots);
        ops.push(Op::Fresh {
            fstype: c(fstype),
            options: Vec::new(),
            fallback: Vec::new(),
            attrs,
            slot,
        });
        slot
    };

    // Everything that comes from the host is grabbed while the host is still visible.
    let devices: Vec<(usize, &str)> = DEVICES
        .iter()
        .map(|d| {
            (
                grab(&mut ops, &mut slots, &Path::new("/dev").join(d), false),
                *d,
            )
        })
        .collect();
    let proc = fresh(
        &mut ops,
        &mut slots,
        "proc",
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
    );
    // Our own sysfs needs our own network namespace; with the host's (or one made ahead, which
    // the sandbox's user namespace does not own), bind the host's /sys. (Decided here, not by
    // trying: dropping an unused detached tree costs an RCU grace period.)
    let own_netns = match spec.network {
        NetworkMode::None => true,
        NetworkMode::Isolated => !spec.joined_netns,
        NetworkMode::Host => false,
    };
    let mut given_sysfs = None;
    let sys = if own_netns {
        fresh(
            &mut ops,
            &mut slots,
            "sysfs",
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        )
    } else if spec.network == NetworkMode::Isolated && spec.given_sysfs {
        let slot = next(&mut slots);
        given_sysfs = Some(slot);
        slot
    } else {
        grab(&mut ops, &mut slots, Path::new("/sys"), true)
    };
    let host_files: Vec<(usize, &str)> = match (spec.network, spec.generated_etc) {
        (NetworkMode::Host, _) => ["/etc/resolv.conf", "/etc/hosts"]
            .iter()
            .filter(|f| Path::new(f).exists())
            .map(|f| (grab(&mut ops, &mut slots, Path::new(f), true), *f))
            .collect(),
        (NetworkMode::Isolated, Some((resolv, hosts))) => vec![
            (grab(&mut ops, &mut slots, resolv, true), "/etc/resolv.conf"),
            (grab(&mut ops, &mut slots, hosts, true), "/etc/hosts"),
        ],
        _ => Vec::new(),
    };
    let binds: Vec<(usize, &PlannedBind)> = spec
        .binds
        .iter()
        .map(|b| match b.expect {
            Some((dev, ino)) => {
                let slot = next(&mut slots);
                ops.push(Op::GrabChecked {
                    source: cpath(&b.source),
                    dev,
                    ino,
                    slot,
                    read_only: b.read_only,
                });
                (slot, b)
            }
            None => (grab(&mut ops, &mut slots, &b.source, b.read_only), b),
        })
        .collect();

    // Overlay layers are bound at short names on a staging tmpfs of our own mount namespace
    // (over /dev, whose devices were grabbed above) and the overlays made from those, so that
    // their options in /proc/self/mountinfo do not show the host's store paths. The staging
    // tmpfs is detached again once the overlays exist (they keep private clones of the layers).
    // Every layer is grabbed before the staging tmpfs hides /dev: a store under /dev/shm.
    let mut grabs_at = ops.len();
    let needs_overlay = spec.overlay.is_some()
        || spec
            .overlay_mounts
            .iter()
            .any(|m| m.rw.is_some() || m.lowers.len() != 1);
    if needs_overlay {
        ops.push(Op::Mount {
            fstype: c("tmpfs"),
            target: c(STAGING),
            flags: NOSUID | NODEV | NOEXEC,
            data: Some(c("mode=700")),
        });
    }
    let mut staged = 0usize;
    // A grab of a layer: at `grabs_at`, before the staging tmpfs.
    fn grab_early(ops: &mut Vec<Op>, grabs_at: &mut usize, op: Op) {
        ops.insert(*grabs_at, op);
        *grabs_at += 1;
    }
    fn stage(
        ops: &mut Vec<Op>,
        (slots, staged, grabs_at): (&mut usize, &mut usize, &mut usize),
        source: &Path,
    ) -> PathBuf {
        let name = PathBuf::from(format!("{STAGING}/{staged}"));
        *staged += 1;
        let slot = *slots;
        *slots += 1;
        grab_early(
            ops,
            grabs_at,
            Op::Grab {
                source: cpath(source),
                slot,
                read_only: false,
            },
        );
        ops.push(Op::Mkdirs {
            dirs: vec![cpath(&name)],
        });
        ops.push(Op::Attach {
            slot,
            target: cpath(&name),
        });
        name
    }
    // upperdir and workdir must be on one mount: stage their nearest common directory.
    fn stage_rw(
        ops: &mut Vec<Op>,
        counts: (&mut usize, &mut usize, &mut usize),
        upper: &Path,
        work: &Path,
    ) -> (PathBuf, PathBuf) {
        let common: PathBuf = upper
            .components()
            .zip(work.components())
            .take_while(|(a, b)| a == b)
            .map(|(a, _)| a.as_os_str())
            .collect();
        let base = stage(ops, counts, &common);
        let rel = |p: &Path| base.join(p.strip_prefix(&common).unwrap_or(p));
        (rel(upper), rel(work))
    }

    let extra: Vec<(usize, &OverlayMount)> = spec
        .overlay_mounts
        .iter()
        .map(|m| {
            if m.rw.is_none() && m.lowers.len() == 1 {
                // One read-only layer needs no overlay: bind it.
                let slot = next(&mut slots);
                grab_early(
                    &mut ops,
                    &mut grabs_at,
                    Op::Grab {
                        source: cpath(&m.lowers[0]),
                        slot,
                        read_only: true,
                    },
                );
                (slot, m)
            } else {
                let lowers: Vec<PathBuf> = m
                    .lowers
                    .iter()
                    .map(|l| stage(&mut ops, (&mut slots, &mut staged, &mut grabs_at), l))
                    .collect();
                let rw = m.rw.as_ref().map(|(u, w)| {
                    stage_rw(&mut ops, (&mut slots, &mut staged, &mut grabs_at), u, w)
                });
                let slot = next(&mut slots);
                let rw = rw.as_ref().map(|(u, w)| (u.as_path(), w.as_path()));
                ops.push(overlay_op(slot, &lowers, rw));
                (slot, m)
            }
        })
        .collect();

    let root_overlay = spec.overlay.map(|ov| {
        // An overlay root: the lower layers read-only, writes go to `upper`.
        let lowers: Vec<PathBuf> = ov
            .lowers
            .iter()
            .map(|l| stage(&mut ops, (&mut slots, &mut staged, &mut grabs_at), l))
            .collect();
        let (upper, work) = stage_rw(
            &mut ops,
            (&mut slots, &mut staged, &mut grabs_at),
            &ov.upper,
            &ov.work,
        );
        let slot = next(&mut slots);
        ops.push(overlay_op(slot, &lowers, Some((&upper, &work))));
        slot
    });
    if needs_overlay {
        ops.push(Op::Unstage { target: c(STAGING) });
    }

    if let Some(slot) = root_overlay {
        ops.push(Op::PivotTree {
            slot,
            staging: c("/dev"),
        });
    } else if spec.rootfs == Path::new("/") {
        // The bind of / onto itself cannot be reached by path: pivot through a staging point.
        let slot = grab(&mut ops, &mut slots, Path::new("/"), false);
        ops.push(Op::PivotTree {
            slot,
            staging: c("/dev"),
        });
    } else {
        ops.push(Op::Pivot {
            rootfs: cpath(spec.rootfs),
        });
    }

    // /proc, with the kernel knobs read-only (as Docker does).
    ops.push(mkdirs("/proc"));
    ops.push(Op::Attach {
        slot: proc,
        target: c("/proc"),
    });
    for (path, value) in spec.sysctls {
        ops.push(Op::WriteFile {
            path: c(path),
            data: c(value),
        });
    }
    for p in [
        "/proc/sys",
        "/proc/sysrq-trigger",
        "/proc/irq",
        "/proc/bus",
        "/proc/fs",
    ] {
        ops.push(Op::ReadOnlySelf { path: c(p) });
    }

    // /sys: our own sysfs when we own the network namespace, else the host's, read-only.
    ops.push(mkdirs("/sys"));
    ops.push(Op::Attach {
        slot: sys,
        target: c("/sys"),
    });

    // A minimal /dev.
    ops.push(mkdirs("/dev"));
    // Every tmpfs the job can write to is bounded by the policy's size (its memory is not
    // counted by the memory watchdog); /dev holds only nodes and links: 64 MiB at most.
    let sized = |mode: &str, own: Option<u64>| match (own, spec.tmpfs_size) {
        (Some(a), Some(b)) => format!("mode={mode},size={}", a.min(b)),
        (Some(n), None) | (None, Some(n)) => format!("mode={mode},size={n}"),
        (None, None) => format!("mode={mode}"),
    };
    ops.push(mount(
        "tmpfs",
        "/dev",
        NOSUID | NOEXEC,
        Some(&sized("755", Some(64 << 20))),
    ));
    for (slot, name) in devices {
        let path = format!("/dev/{name}");
        ops.push(Op::Touch { path: c(&path) });
        ops.push(Op::Attach {
            slot,
            target: c(&path),
        });
    }
    ops.push(mkdirs("/dev/pts"));
    ops.push(mount(
        "devpts",
        "/dev/pts",
        NOSUID | NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    ));
    ops.push(Op::Symlink {
        target: c("pts/ptmx"),
        link: c("/dev/ptmx"),
    });
    ops.push(mkdirs("/dev/shm"));
    ops.push(mount(
        "tmpfs",
        "/dev/shm",
        NOSUID | NODEV | NOEXEC,
        Some(&sized("1777", None)),
    ));
    for (target, link) in [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        ops.push(Op::Symlink {
            target: c(target),
            link: c(link),
        });
    }

    // What runc and Docker mask (needs /dev/null of the sandbox, so after /dev).
    for p in MASKED_FILES {
        ops.push(Op::MaskFile { path: c(p) });
    }
    for p in MASKED_DIRS {
        ops.push(Op::MaskDir { path: c(p) });
    }

    if spec.tmpfs_tmp {
        ops.push(mkdirs("/tmp"));
        ops.push(mount(
            "tmpfs",
            "/tmp",
            NOSUID | NODEV,
            Some(&sized("1777", None)),
        ));
    }

    for (slot, file) in host_files {
        ops.push(mkdirs("/etc"));
        ops.push(Op::Touch { path: c(file) });
        ops.push(Op::Attach {
            slot,
            target: c(file),
        });
    }

    for (slot, b) in binds {
        let dest = resolve(&b.destination)?;
        if b.source_is_dir {
            ops.push(Op::Mkdirs {
                dirs: prefixes(&dest),
            });
        } else {
            if let Some(parent) = dest.parent() {
                ops.push(Op::Mkdirs {
                    dirs: prefixes(parent),
                });
            }
            ops.push(Op::Touch { path: cpath(&dest) });
        }
        ops.push(Op::Attach {
            slot,
            target: cpath(&dest),
        });
    }

    for (slot, m) in extra {
        let dest = resolve(&m.target)?;
        ops.push(Op::Mkdirs {
            dirs: prefixes(&dest),
        });
        ops.push(Op::Attach {
            slot,
            target: cpath(&dest),
        });
    }

    for t in spec.tmpfs_mounts {
        let dest = resolve(&t.target)?;
        ops.push(Op::Mkdirs {
            dirs: prefixes(&dest),
        });
        ops.push(Op::Mount {
            fstype: c("tmpfs"),
            target: cpath(&dest),
            flags: NOSUID | NODEV,
            data: Some(c(&sized("1777", t.size))),
        });
    }

    if spec.read_only_root {
        ops.push(Op::ReadOnlyRoot);
    }
    if own_netns {
        ops.push(Op::LoopbackUp);
    }
    Ok((ops, slots, given_sysfs))
}

/// Candidate paths for the program `argv0`: itself when it contains a `/`, else each directory
/// of `path_var` joined with it (as execvp does, but with the sandbox's PATH).
pub(crate) fn exec_candidates(argv0: &OsStr, path_var: Option<&OsStr>) -> Vec<CString> {
    let bytes = argv0.as_bytes();
    if bytes.contains(&b'/') {
        return vec![cstr(bytes)];
    }
    if bytes.is_empty() {
        return Vec::new();
    }
    let path = path_var.map_or(DEFAULT_PATH.as_bytes(), OsStr::as_bytes);
    path.split(|&b| b == b':')
        .map(|dir| {
            let dir = if dir.is_empty() { b"." as &[u8] } else { dir };
            let mut full = dir.to_vec();
            full.push(b'/');
            full.extend_from_slice(bytes);
            cstr(&full)
        })
        .collect()
}

/// The PATH a sandbox gets when its environment sets none (Docker's default).
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::normalize_inside;

    fn names(ops: &[Op]) -> Vec<String> {
        ops.iter().map(Op::describe).collect()
    }

    #[test]
    fn order_is_host_grabs_pivot_then_inside_mounts() {
        let binds = vec![
            PlannedBind {
                source: "/src/a".into(),
                destination: "/data".into(),
                read_only: false,
                source_is_dir: true,
                expect: None,
            },
            PlannedBind {
                source: "/src/f".into(),
                destination: "/data/../etc/../conf/file".into(),
                read_only: true,
                source_is_dir: false,
                expect: Some((7, 8)),
            },
        ];
        let (ops, slots, _) = build(&Spec {
            overlay: None,
            overlay_mounts: &[],
            rootfs: Path::new("/r"),
            network: NetworkMode::None,
            joined_netns: false,
            given_sysfs: false,
            generated_etc: None,
            binds: &binds,
            tmpfs_mounts: &[],
            tmpfs_tmp: true,
            tmpfs_size: Some(64 << 20),
            read_only_root: true,
            sysctls: &[],
        })
        .unwrap();
        assert_eq!(slots, DEVICES.len() + 2 + 2);
        let pivot = ops
            .iter()
            .position(|o| matches!(o, Op::Pivot { .. } | Op::PivotTree { .. }))
            .unwrap();
        // Every grab happens before pivot, every mount after.
        let before = |o: &Op| {
            matches!(
                o,
                Op::Grab { .. } | Op::GrabChecked { .. } | Op::Fresh { .. } | Op::MakePrivate
            )
        };
        assert!(ops[..pivot].iter().all(before));
        assert!(!ops[pivot..].iter().any(before));
        let n = names(&ops);
        let pos = |s: &str| {
            n.iter()
                .position(|x| x == s)
                .unwrap_or_else(|| panic!("{s} in {n:?}"))
        };
        assert!(pos("bind mount on /proc") < pos("making /proc/sys read-only"));
        assert!(pos("making /proc/sys read-only") < pos("mount tmpfs on /dev"));
        assert!(pos("mount tmpfs on /tmp") < pos("bind mount on /data"));
        // Binds in the caller's order; `..` cannot climb out and is normalised.
        assert!(pos("bind mount on /data") < pos("bind mount on /conf/file"));
        assert!(n.contains(&"creating mount point /conf/file".to_string()));
        // Read-only root after every mount, loopback for network none, no resolv.conf.
        assert_eq!(ops[ops.len() - 2], Op::ReadOnlyRoot);
        assert_eq!(ops[ops.len() - 1], Op::LoopbackUp);
        assert!(!n.iter().any(|x| x.contains("resolv.conf")));
        // The read-only flag of the second bind reaches its grab, which checks what it gets.
        assert!(ops.iter().any(|o| matches!(o, Op::GrabChecked { dev: 7, ino: 8, source, read_only: true, .. } if source.as_bytes() == b"/src/f")));
        assert!(!ops
            .iter()
            .any(|o| matches!(o, Op::Grab { source, .. } if source.as_bytes() == b"/src/f")));
    }

    #[test]
    fn host_network_gets_resolv_conf_and_no_loopback() {
        let (ops, _, _) = build(&Spec {
            overlay: None,
            overlay_mounts: &[],
            rootfs: Path::new("/r"),
            network: NetworkMode::Host,
            joined_netns: false,
            given_sysfs: false,
            generated_etc: None,
            binds: &[],
            tmpfs_mounts: &[],
            tmpfs_tmp: false,
            tmpfs_size: Some(64 << 20),
            read_only_root: false,
            sysctls: &[],
        })
        .unwrap();
        let n = names(&ops);
        if Path::new("/etc/resolv.conf").exists() {
            assert!(
                n.contains(&"bind mount on /etc/resolv.conf".to_string()),
                "{n:?}"
            );
        }
        assert!(!ops.contains(&Op::LoopbackUp));
        assert!(!ops.contains(&Op::ReadOnlyRoot));
        assert!(!n.iter().any(|x| x == "mount tmpfs on /tmp"));
    }

    #[test]
    fn isolated_networks_get_generated_files_and_their_own_sysfs() {
        let (resolv, hosts) = (Path::new("/run/x/resolv"), Path::new("/run/x/hosts"));
        let spec = |joined, given_sysfs| Spec {
            overlay: None,
            overlay_mounts: &[],
            rootfs: Path::new("/r"),
            network: NetworkMode::Isolated,
            joined_netns: joined,
            given_sysfs,
            generated_etc: Some((resolv, hosts)),
            binds: &[],
            tmpfs_mounts: &[],
            tmpfs_tmp: false,
            tmpfs_size: Some(64 << 20),
            read_only_root: false,
            sysctls: &[],
        };
        let grabbed = |ops: &[Op], what: &str| {
            ops.iter()
                .any(|o| matches!(o, Op::Grab { source, read_only: true, .. } if source.as_bytes() == what.as_bytes()))
        };
        // Its own namespace (made at clone): a fresh sysfs, lo brought up.
        let (ops, _, given) = build(&spec(false, false)).unwrap();
        let n = names(&ops);
        assert!(n.contains(&"creating a new sysfs".to_string()), "{n:?}");
        assert_eq!(ops.last(), Some(&Op::LoopbackUp));
        assert_eq!(given, None);
        // A namespace made ahead: the sysfs made with it, in the slot returned; lo is up.
        let (ops, slots, given) = build(&spec(true, true)).unwrap();
        let n = names(&ops);
        let slot = given.unwrap();
        assert!(slot < slots);
        assert!(!n.contains(&"creating a new sysfs".to_string()), "{n:?}");
        assert!(!grabbed(&ops, "/sys"));
        assert!(ops.contains(&Op::Attach {
            slot,
            target: c("/sys")
        }));
        assert!(!ops.contains(&Op::LoopbackUp));
        // Without one, the host's /sys, read-only.
        let (ops, _, given) = build(&spec(true, false)).unwrap();
        assert!(grabbed(&ops, "/sys") && given.is_none());
        // The generated files, read-only, at /etc/resolv.conf and /etc/hosts.
        assert!(grabbed(&ops, "/run/x/resolv") && grabbed(&ops, "/run/x/hosts"));
        let n = names(&ops);
        assert!(
            n.contains(&"bind mount on /etc/resolv.conf".to_string()),
            "{n:?}"
        );
        assert!(n.contains(&"bind mount on /etc/hosts".to_string()), "{n:?}");
    }

    #[test]
    fn resolve_in_root_follows_links_inside() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("real/dir")).unwrap();
        std::os::unix::fs::symlink("/real", r.join("abs")).unwrap();
        std::os::unix::fs::symlink("real/dir", r.join("rel")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", r.join("real/up")).unwrap();
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        let res = |p: &str| try_resolve_in_root(r, Path::new(p)).unwrap();
        assert_eq!(res("/abs/dir/x"), PathBuf::from("/real/dir/x"));
        assert_eq!(res("/rel/y"), PathBuf::from("/real/dir/y"));
        assert_eq!(res("/real/up/passwd"), PathBuf::from("/etc/passwd"));
        assert_eq!(res("/../../abs"), PathBuf::from("/real"));
        assert_eq!(res("/missing/a/b"), PathBuf::from("/missing/a/b"));
        let err = try_resolve_in_root(r, Path::new("/loop/x")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        assert_eq!(
            try_resolve_in_root(r, Path::new("/abs/dir/x")).unwrap(),
            PathBuf::from("/real/dir/x")
        );
    }

    #[test]
    fn a_chain_of_more_than_40_links_is_eloop_not_a_literal_path() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        // l0 -> l1 -> ... -> l40 -> /etc: 41 links, the last one absolute.
        for i in 0..41 {
            let target = if i == 40 {
                "/etc".to_string()
            } else {
                format!("l{}", i + 1)
            };
            std::os::unix::fs::symlink(target, r.join(format!("l{i}"))).unwrap();
        }
        let err = try_resolve_in_root(r, Path::new("/l0/passwd")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        // 40 links still resolve.
        assert_eq!(
            try_resolve_in_root(r, Path::new("/l1/passwd")).unwrap(),
            PathBuf::from("/etc/passwd")
        );
        // A bind onto such a destination is refused with the destination named.
        let binds = vec![PlannedBind {
            source: "/src".into(),
            destination: "/l0/x".into(),
            read_only: false,
            source_is_dir: true,
            expect: None,
        }];
        let err = build(&Spec {
            overlay: None,
            overlay_mounts: &[],
            rootfs: r,
            network: NetworkMode::None,
            joined_netns: false,
            given_sysfs: false,
            generated_etc: None,
            binds: &binds,
            tmpfs_mounts: &[],
            tmpfs_tmp: false,
            tmpfs_size: Some(64 << 20),
            read_only_root: false,
            sysctls: &[],
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "bind /l0/x: cannot resolve the destination inside the root: too many symbolic links encountered"
        );
    }

    #[test]
    fn normalize_never_leaves_root() {
        assert_eq!(
            normalize_inside(Path::new("/../../etc/x")),
            PathBuf::from("/etc/x")
        );
        assert_eq!(
            normalize_inside(Path::new("/a/./b/../c")),
            PathBuf::from("/a/c")
        );
        assert_eq!(normalize_inside(Path::new("/")), PathBuf::from("/"));
    }

    #[test]
    fn exec_candidates_follow_path() {
        let got = exec_candidates(OsStr::new("sh"), Some(OsStr::new("/a:/b")));
        assert_eq!(got, vec![c("/a/sh"), c("/b/sh")]);
        assert_eq!(exec_candidates(OsStr::new("./x"), None), vec![c("./x")]);
        assert_eq!(exec_candidates(OsStr::new("ls"), None).len(), 6);
        assert!(exec_candidates(OsStr::new(""), None).is_empty());
    }
}
