//! Operations on image trees, run inside the sandbox's user namespace.
//!
//! Image trees hold files owned by the sandbox's mapped ids (root = the daemon's user, 1..65536 =
//! its subordinate range). Only a process inside that user namespace can create, copy, chown or
//! delete them correctly, also when the daemon is not root. So every such operation runs as a
//! short-lived sandbox whose root is the host's `/`, read-only, with only the tree being written
//! (the target snapshot, or the one file a tool writes) bound read-write at its own path; its
//! sources (blobs, the build context, other stages) stay read-only. It executes
//! our helper command (`mistryd internal ...`), whose entry point is [`helper_main`]: its copies,
//! owner changes and removals walk trees by fd and iteratively ([`crate::walk`]), however deep.
//!
//! The helper opens everything inside an image, a context or a stage through
//! [`crate::inroot`]: parents resolved by the kernel inside the root (`RESOLVE_IN_ROOT`, ELOOP
//! past 40 links), the final component handled relative to its parent's fd, never followed.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};

use sandbox::{Bind, NetworkMode, Sandbox};
use serde::{Deserialize, Serialize};

use crate::inroot::{self, Root};
use crate::unpack::{self, Owners};
use crate::view::{Target, View};
use crate::walk;

/// An overlay to mount in a tool sandbox: lowers, optional (upper, work), mount point.
type Mount = (Vec<PathBuf>, Option<(PathBuf, PathBuf)>, PathBuf);

/// The path to operate on for `target`, the overlay to mount there if it is layered, and the
/// one directory the tool may write to (the snapshot being built).
fn mount_for(target: &Target) -> Result<(PathBuf, Option<Mount>, PathBuf), ToolError> {
    match target {
        Target::Dir(p) => Ok((p.clone(), None, p.clone())),
        Target::Overlay {
            lowers,
            upper,
            work,
        } => {
            let snapshot = upper.parent().unwrap_or(Path::new("/")).to_path_buf();
            let merged = snapshot.join("merged");
            fs::create_dir_all(&merged)
                .and_then(|()| hand_over(&merged))
                .map_err(|e| ToolError::Failed {
                    what: format!("creating {}", merged.display()),
                    message: e.to_string(),
                })?;
            let mount = (
                lowers.clone(),
                Some((upper.clone(), work.clone())),
                merged.clone(),
            );
            Ok((merged, Some(mount), snapshot))
        }
    }
}

/// The host ids that sandbox ids `uid:gid` map to, when sandbox root is not this process's own
/// user (`--sandbox-ids subordinate`, i.e. [`sandbox::IdMapping::Subordinate`] as the process
/// default); `None` when it is (what this process creates is then sandbox root's already).
fn subordinate_host_ids(uid: u32, gid: u32) -> io::Result<Option<(u32, u32)>> {
    if sandbox::default_id_mapping() != sandbox::IdMapping::Subordinate {
        return Ok(None);
    }
    let (mapping, _) = sandbox::try_choose_id_map(sandbox::IdMapping::Subordinate)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let (root_uid, root_gid) = mapping.root_ids();
    let max = mapping.max_id();
    if uid > max || gid > max {
        return Err(io::Error::other(format!(
            "{uid}:{gid} is not mapped (ids 0..={max} are)"
        )));
    }
    match (root_uid.checked_add(uid), root_gid.checked_add(gid)) {
        (Some(u), Some(g)) => Ok(Some((u, g))),
        _ => Err(io::Error::other(format!("{uid}:{gid} is out of range"))),
    }
}

/// The host ids of sandbox root when they are not this process's own (`--sandbox-ids
/// subordinate`); `None` when they are.
pub(crate) fn sandbox_root_ids() -> io::Result<Option<(u32, u32)>> {
    subordinate_host_ids(0, 0)
}

/// Give `path` (made by this process) to sandbox root, when that is not this process's own
/// user: with `--sandbox-ids subordinate`, sandbox root is a subordinate id, and a directory of
/// host root's is not even mapped in the sandbox. A no-op otherwise.
pub(crate) fn hand_over(path: &Path) -> io::Result<()> {
    match subordinate_host_ids(0, 0)? {
        Some((uid, gid)) => std::os::unix::fs::lchown(path, Some(uid), Some(gid)),
        None => Ok(()),
    }
}

/// [`hand_over`] of a whole tree, to sandbox ids `uid:gid` (e.g. a job's `data/` for its
/// image's user). Done by this process itself, not in the user namespace: what it wrote belongs
/// to host root, which is not mapped there. No link is followed; the walk is iterative
/// ([`crate::walk`]). `path` may also be a file or a link.
pub(crate) fn hand_over_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let Some((host_uid, host_gid)) = subordinate_host_ids(uid, gid)? else {
        return Ok(());
    };
    let giving = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("giving {} to {host_uid}:{host_gid}: {e}", path.display()),
        )
    };
    match rfs::open(path, walk::dir_flags(), Mode::empty()) {
        Ok(top) => walk::chown_tree(top, path, host_uid, host_gid).map_err(giving),
        // A file or a link: itself alone.
        Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
            std::os::unix::fs::lchown(path, Some(host_uid), Some(host_gid)).map_err(giving)
        }
        Err(e) => Err(giving(e.into())),
    }
}

/// A tool run failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The tool sandbox could not be started.
    #[error("{what}: {source}")]
    Sandbox {
        /// The operation, e.g. `copying <path>`.
        what: String,
        /// Why the sandbox failed.
        #[source]
        source: sandbox::Error,
    },
    /// The tool ran and failed.
    #[error("{what}: {message}")]
    Failed {
        /// The operation.
        what: String,
        /// The tool's stderr, or its exit status when it wrote nothing.
        message: String,
    },
}

/// How to run operations on image trees.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    /// The helper command prefix, e.g. `["/usr/bin/mistryd", "internal"]`.
    helper: Vec<OsString>,
    /// Whether ids other than root are mapped (a subordinate range exists).
    owners: bool,
}

/// One thing COPY puts into an image (defined with the build context, which resolves them).
pub(crate) use crate::context::CopyItem;

/// What the helper's `copy-in` does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CopySpec {
    /// The image tree written to (set by [`Tools::copy_in`]).
    pub root: PathBuf,
    /// Where the items' sources are resolved: the build context, a stage's root, a download.
    pub src_root: PathBuf,
    pub items: Vec<CopyItem>,
    pub uid: u32,
    pub gid: u32,
    /// Mode for every copied file and directory (`--chmod`); else the source's.
    pub chmod: Option<u32>,
    pub owners: bool,
    /// Directories to create first (the destination of a COPY), owned like the items.
    pub dirs: Vec<PathBuf>,
    /// Items keep their source's owner (`COPY --from` without `--chown`, as Docker does) instead
    /// of `uid`:`gid`; ids as the tool sandbox sees them, i.e. inside the image.
    #[serde(default)]
    pub source_owners: bool,
}

impl Tools {
    pub(crate) fn new(helper: Vec<OsString>) -> Tools {
        let (mapping, _) = sandbox::choose_id_map(sandbox::IdMapping::Auto);
        Tools {
            helper,
            owners: mapping.max_id() > 0,
        }
    }

    /// Whether file owners other than root can be kept (else they become root, with a log line).
    pub(crate) fn keeps_owners(&self) -> bool {
        self.owners
    }

    /// A tool sandbox: the host read-only, only `writable` (the target tree, or a file the tool
    /// writes) bound read-write.
    fn sandbox(&self, writable: &[&Path], mounts: Vec<Mount>) -> Sandbox {
        let mut sb = Sandbox::new("/")
            .read_only_root(true)
            .network(NetworkMode::None)
            .hostname("mistry-tools");
        for w in writable {
            sb = sb.bind(Bind::new(w, w));
        }
        for (lowers, rw, at) in mounts {
            sb = sb.overlay_mount(lowers, rw, at);
        }
        sb
    }

    /// Run with only `writable` (directories or files) writable.
    fn run_with(
        &self,
        what: &str,
        argv: Vec<OsString>,
        writable: &[&Path],
        mount: Option<Mount>,
    ) -> Result<String, ToolError> {
        self.run_with_mounts(what, argv, writable, mount.into_iter().collect())
    }

    /// [`Tools::run_with`] with several overlays mounted.
    fn run_with_mounts(
        &self,
        what: &str,
        argv: Vec<OsString>,
        writable: &[&Path],
        mounts: Vec<Mount>,
    ) -> Result<String, ToolError> {
        let out = self
            .sandbox(writable, mounts)
            .command(argv)
            .output()
            .map_err(|source| ToolError::Sandbox {
                what: what.to_string(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            Err(ToolError::Failed {
                what: what.to_string(),
                message: if stderr.is_empty() {
                    out.status.to_string()
                } else {
                    stderr
                },
            })
        }
    }

    fn helper(
        &self,
        what: &str,
        args: Vec<OsString>,
        writable: &Path,
        mount: Option<Mount>,
    ) -> Result<String, ToolError> {
        let mut argv = self.helper.clone();
        argv.extend(args);
        self.run_with(what, argv, &[writable], mount)
    }

    /// Apply a layer blob onto `root`; `name` (its digest) appears in errors.
    pub(crate) fn apply_layer(
        &self,
        blob: &Path,
        digest: &str,
        target: &Target,
    ) -> Result<unpack::Applied, ToolError> {
        let owners = if self.owners { "keep" } else { "ignore" };
        let (root, mount, writable) = mount_for(target)?;
        let out = self.helper(
            &format!("applying layer {digest}"),
            vec![
                os("apply-layer"),
                os(blob),
                os(digest),
                os(&root),
                os(owners),
            ],
            &writable,
            mount,
        )?;
        serde_json::from_str::<AppliedJson>(out.trim())
            .map(|a| unpack::Applied {
                entries: a.entries,
                whiteouts: a.whiteouts,
                skipped_devices: a.skipped_devices,
            })
            .map_err(|e| ToolError::Failed {
                what: format!("applying layer {digest}"),
                message: format!("unexpected helper output {out:?}: {e}"),
            })
    }

    /// Extract a tar archive (ADD), `archive` resolved inside `src_root`, into `dest` inside
    /// the image (confined to `dest`, as Docker's chrooted untar).
    pub(crate) fn extract(
        &self,
        src_root: &Path,
        archive: &Path,
        target: &Target,
        dest: &Path,
    ) -> Result<(), ToolError> {
        let owners = if self.owners { "keep" } else { "ignore" };
        let (root, mount, writable) = mount_for(target)?;
        self.helper(
            &format!("extracting {}", archive.display()),
            vec![
                os("extract"),
                os(src_root),
                os(archive),
                os(&root),
                os(dest),
                os(owners),
            ],
            &writable,
            mount,
        )
        .map(drop)
    }

    /// COPY into `target`: write the spec to `spec_file` and have the helper carry it out.
    pub(crate) fn copy_in(
        &self,
        spec: &CopySpec,
        spec_file: &Path,
        target: &Target,
    ) -> Result<(), ToolError> {
        self.copy_in_with(spec, spec_file, target, None)
    }

    /// [`Tools::copy_in`] from a stage seen through its layers (`COPY --from` on the overlay
    /// store): they are mounted read-only at `mountpoint`, which the spec's `src_root` must
    /// be, beside the target. Only the sources are read; the stage is never copied out whole.
    pub(crate) fn copy_in_from_view(
        &self,
        spec: &CopySpec,
        spec_file: &Path,
        target: &Target,
        view: &View,
        mountpoint: &Path,
    ) -> Result<(), ToolError> {
        let (root, mount) = Self::read_mount(view, mountpoint)?;
        let spec = CopySpec {
            src_root: root,
            ..spec.clone()
        };
        self.copy_in_with(&spec, spec_file, target, mount)
    }

    fn copy_in_with(
        &self,
        spec: &CopySpec,
        spec_file: &Path,
        target: &Target,
        source: Option<Mount>,
    ) -> Result<(), ToolError> {
        let (root, mount, writable) = mount_for(target)?;
        let spec = CopySpec {
            root,
            ..spec.clone()
        };
        let text = serde_json::to_vec(&spec).map_err(|e| ToolError::Failed {
            what: "writing the copy spec".into(),
            message: e.to_string(),
        })?;
        fs::write(spec_file, text).map_err(|e| ToolError::Failed {
            what: format!("writing {}", spec_file.display()),
            message: e.to_string(),
        })?;
        let mut argv = self.helper.clone();
        argv.extend([os("copy-in"), os(spec_file)]);
        self.run_with_mounts(
            "copying files into the image",
            argv,
            &[&writable],
            mount.into_iter().chain(source).collect(),
        )
        .map(drop)
    }

    /// Resolve `COPY --from` sources inside the tool sandbox (read-only), where every file of
    /// a stage is readable whatever its owner: the request is written to `request_file`.
    pub(crate) fn resolve(
        &self,
        request: &crate::context::ResolveRequest,
        request_file: &Path,
    ) -> Result<crate::context::Resolved, ToolError> {
        self.resolve_with_mount(request, request_file, None)
    }

    /// [`Tools::resolve`] in a stage seen through its layers: they are mounted read-only at
    /// `mountpoint` (the request's root) for the helper, nothing is copied. An unchanged
    /// rebuild keys its `COPY --from` steps this way; only a step that misses copies the stage
    /// out ([`Tools::materialize`]).
    pub(crate) fn resolve_in_view(
        &self,
        view: &View,
        mountpoint: &Path,
        request: &crate::context::ResolveRequest,
        request_file: &Path,
    ) -> Result<crate::context::Resolved, ToolError> {
        let (root, mount) = Self::read_mount(view, mountpoint)?;
        let request = crate::context::ResolveRequest {
            root,
            ..request.clone()
        };
        self.resolve_with_mount(&request, request_file, mount)
    }

    fn resolve_with_mount(
        &self,
        request: &crate::context::ResolveRequest,
        request_file: &Path,
        mount: Option<Mount>,
    ) -> Result<crate::context::Resolved, ToolError> {
        let failed = |message: String| ToolError::Failed {
            what: "resolving the sources".into(),
            message,
        };
        let text = serde_json::to_vec(request).map_err(|e| failed(e.to_string()))?;
        fs::write(request_file, text)
            .map_err(|e| failed(format!("{}: {e}", request_file.display())))?;
        let mut argv = self.helper.clone();
        argv.extend([os("resolve"), os(request_file)]);
        let out = self.run_with("resolving the sources", argv, &[], mount);
        let _ = fs::remove_file(request_file);
        serde_json::from_str(out?.trim()).map_err(|e| failed(e.to_string()))
    }

    /// `mkdir -p` of `path` inside `root`, owned by uid:gid.
    pub(crate) fn mkdirs(
        &self,
        target: &Target,
        path: &Path,
        uid: u32,
        gid: u32,
    ) -> Result<(), ToolError> {
        let ids = format!("{uid}:{gid}");
        let (root, mount, writable) = mount_for(target)?;
        self.helper(
            &format!("creating {}", path.display()),
            vec![os("mkdirs"), os(&root), os(path), os(ids)],
            &writable,
            mount,
        )
        .map(drop)
    }

    /// Give a whole tree to `uid:gid` (sandbox ids), e.g. a job's `/data` for a non-root user:
    /// the helper's `chown-tree` (`chown -R -h`, by fd and iterative, however deep the tree).
    pub(crate) fn chown_tree(&self, path: &Path, uid: u32, gid: u32) -> Result<(), ToolError> {
        let mut argv = self.helper.clone();
        argv.extend([os("chown-tree"), os(path), os(format!("{uid}:{gid}"))]);
        self.run_with(
            &format!("giving {} to {uid}:{gid}", path.display()),
            argv,
            &[path],
            None,
        )
        .map(drop)
    }

    /// A full copy of a tree at `dst` (which must not exist; reflinks where the filesystem has
    /// them). Only `dst` is writable meanwhile.
    pub(crate) fn copy_tree(&self, src: &Path, dst: &Path) -> Result<(), ToolError> {
        self.copy_into(src, dst, None)
    }

    /// `cp -a SRC/. DST/` with `dst` created first (by us) and the only thing bound writable:
    /// the helper's `copy-tree` (by fd and iterative: GNU `cp` works by path names and fails
    /// past `PATH_MAX`).
    fn copy_into(&self, src: &Path, dst: &Path, mount: Option<Mount>) -> Result<(), ToolError> {
        let what = format!("copying {} to {}", src.display(), dst.display());
        fs::create_dir(dst)
            .and_then(|()| hand_over(dst))
            .map_err(|e| ToolError::Failed {
                what: what.clone(),
                message: e.to_string(),
            })?;
        let mut argv = self.helper.clone();
        argv.extend([os("copy-tree"), os(src), os(dst)]);
        self.run_with(&what, argv, &[dst], mount).map(drop)
    }

    /// [`crate::setid::strip_setid`] on the tree at `path`, inside the user namespace with only
    /// the tree writable; every entry must be changed there.
    pub(crate) fn strip_setid(&self, path: &Path) -> Result<crate::setid::Stripped, ToolError> {
        let what = format!("removing set-id bits in {}", path.display());
        let mut argv = self.helper.clone();
        argv.extend([os("strip-setid"), os(path)]);
        let out = self.run_with(&what, argv, &[path], None)?;
        let mut n = out.split_whitespace().map(str::parse::<usize>);
        match (n.next(), n.next()) {
            (Some(Ok(modes)), Some(Ok(caps))) => Ok(crate::setid::Stripped {
                modes,
                caps,
                denied: 0,
            }),
            _ => Err(ToolError::Failed {
                what,
                message: format!("unexpected helper output {out:?}"),
            }),
        }
    }

    /// Remove a tree (or a file). Its contents are removed inside the user namespace by the
    /// helper (by fd, never following a symlink), with only the tree itself writable; the
    /// emptied directory is then removed here.
    pub(crate) fn remove_tree(&self, path: &Path) -> Result<(), ToolError> {
        let what = format!("removing {}", path.display());
        let failed = |e: io::Error| ToolError::Failed {
            what: what.clone(),
            message: e.to_string(),
        };
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(failed(e)),
        };
        // A job's root and directory hold mostly what sandbox root made, i.e. this process's
        // user: removed here, by fd, without the milliseconds of CPU of a tool sandbox; what
        // only another id may remove is removed in the user namespace.
        if meta.is_dir() && !Self::clear_here(path) {
            let mut argv = self.helper.clone();
            argv.extend([os("clear"), os(path)]);
            self.run_with(&what, argv, &[path], None)?;
        }
        let r = if meta.is_dir() {
            fs::remove_dir(path)
        } else {
            fs::remove_file(path)
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            // The parent belongs to a sandbox id (e.g. a job's data/ handed to its user): only
            // the user namespace may remove the entry from it, with the parent writable.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                    return Err(failed(e));
                };
                let mut argv = self.helper.clone();
                argv.extend([os("remove"), os(parent), os(name)]);
                self.run_with(&what, argv, &[parent], None).map(drop)
            }
            Err(e) => Err(failed(e)),
        }
    }

    /// Try to empty directory `path` as this process (see [`walk::clear`] with `owner`).
    fn clear_here(path: &Path) -> bool {
        rfs::open(path, walk::dir_flags(), Mode::empty())
            .map_err(io::Error::from)
            .and_then(|d| walk::clear(d, path, true))
            .is_ok()
    }

    /// The path to read `view` at, and the read-only overlay to mount there (at `mountpoint`).
    fn read_mount(view: &View, mountpoint: &Path) -> Result<(PathBuf, Option<Mount>), ToolError> {
        match view {
            View::Dir(p) => Ok((p.clone(), None)),
            View::Layers(layers) => {
                fs::create_dir_all(mountpoint)
                    .and_then(|()| hand_over(mountpoint))
                    .map_err(|e| ToolError::Failed {
                        what: format!("creating {}", mountpoint.display()),
                        message: e.to_string(),
                    })?;
                let mount = (layers.clone(), None, mountpoint.to_path_buf());
                Ok((mountpoint.to_path_buf(), Some(mount)))
            }
        }
    }

    /// Write an uncompressed tar of `view` (numeric owners as the image sees them) to `out`;
    /// a layered view is mounted at `mountpoint` meanwhile.
    pub(crate) fn pack(&self, view: &View, mountpoint: &Path, out: &Path) -> Result<(), ToolError> {
        let (root, mount) = Self::read_mount(view, mountpoint)?;
        let what = format!("packing {}", root.display());
        // Only the output file is writable: made here, bound into the sandbox.
        fs::File::create(out)
            .and_then(|_| hand_over(out))
            .map_err(|e| ToolError::Failed {
                what: what.clone(),
                message: format!("{}: {e}", out.display()),
            })?;
        self.helper(&what, vec![os("pack"), os(&root), os(out)], out, mount)
            .map(drop)
    }

    /// A complete copy of `view` at `dst` (a layered view is mounted at `mountpoint` meanwhile).
    pub(crate) fn materialize(
        &self,
        view: &View,
        mountpoint: &Path,
        dst: &Path,
    ) -> Result<(), ToolError> {
        let (root, mount) = Self::read_mount(view, mountpoint)?;
        self.copy_into(&root, dst, mount)
    }
}

fn os(s: impl AsRef<std::ffi::OsStr>) -> OsString {
    s.as_ref().to_owned()
}

#[derive(Serialize, Deserialize)]
struct AppliedJson {
    entries: usize,
    whiteouts: usize,
    skipped_devices: usize,
}

fn chown_at(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32, owners: bool) -> io::Result<()> {
    if !owners {
        return Ok(());
    }
    inroot::chown_at(dir, name, uid, gid)
}

fn ts(t: filetime::FileTime) -> rfs::Timestamps {
    let spec = rfs::Timespec {
        tv_sec: t.unix_seconds(),
        tv_nsec: t.nanoseconds().into(),
    };
    rfs::Timestamps {
        last_access: spec,
        last_modification: spec,
    }
}

/// Copy one item from the source root into the image root. Parents are resolved inside each
/// root; the source's final component is copied as what it is (a symlink stays a symlink), and
/// the destination's final component is replaced, never written through.
fn copy_one(item: &CopyItem, spec: &CopySpec, src: &Root, dst: &Root) -> io::Result<()> {
    let (sdir, sname) = src.parent(&item.src)?;
    let st = rfs::statat(&sdir, &sname, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from)?;
    let kind = FileType::from_raw_mode(st.st_mode);
    let (ddir, dname) = dst.parent_create(&item.dest, None)?;
    let (ddir, dname) = (ddir.as_fd(), dname.as_os_str());
    let existing = inroot::kind_at(ddir, dname)?;
    let mut fd: Option<OwnedFd> = None;
    match kind {
        FileType::Directory => {
            if existing != Some(FileType::Directory) {
                walk::remove_at(ddir, dname, false)?;
                rfs::mkdirat(ddir, dname, Mode::from_raw_mode(0o700)).map_err(io::Error::from)?;
            }
            fd = Some(
                rfs::openat(
                    ddir,
                    dname,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io::Error::from)?,
            );
        }
        FileType::Symlink => {
            walk::remove_at(ddir, dname, false)?;
            let target = rfs::readlinkat(&sdir, &sname, Vec::new()).map_err(io::Error::from)?;
            rfs::symlinkat(target.as_c_str(), ddir, dname).map_err(io::Error::from)?;
        }
        FileType::RegularFile => {
            let Some((input, _)) = inroot::open_file_at(sdir.as_fd(), &sname)? else {
                return Err(io::Error::other("not a regular file"));
            };
            walk::remove_at(ddir, dname, false)?;
            let out = rfs::openat(
                ddir,
                dname,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(io::Error::from)?;
            let mut input = fs::File::from(input);
            let mut out = fs::File::from(out);
            io::copy(&mut input, &mut out)?;
            fd = Some(out.into());
        }
        FileType::Fifo => {
            walk::remove_at(ddir, dname, false)?;
            rfs::mknodat(ddir, dname, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
                .map_err(io::Error::from)?;
        }
        other => {
            return Err(io::Error::other(format!(
                "cannot copy a {other:?} (only files, directories, symlinks and fifos)"
            )))
        }
    }
    let (uid, gid) = if spec.source_owners {
        (st.st_uid, st.st_gid)
    } else {
        (spec.uid, spec.gid)
    };
    match &fd {
        Some(fd) if spec.owners => rfs::fchown(
            fd,
            Some(rfs::Uid::from_raw(uid)),
            Some(rfs::Gid::from_raw(gid)),
        )
        .map_err(io::Error::from)?,
        Some(_) => {}
        None => chown_at(ddir, dname, uid, gid, spec.owners)?,
    }
    if kind != FileType::Symlink {
        let mode = spec.chmod.unwrap_or(st.st_mode & 0o7777);
        let mtime = filetime::FileTime::from_unix_time(st.st_mtime, st.st_mtime_nsec as u32);
        match &fd {
            Some(fd) => {
                rfs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(io::Error::from)?;
                rfs::futimens(fd, &ts(mtime)).map_err(io::Error::from)?;
            }
            None => {
                // A fifo just made here (not a symlink: following is safe).
                rfs::chmodat(ddir, dname, Mode::from_raw_mode(mode), AtFlags::empty())
                    .map_err(io::Error::from)?;
                rfs::utimensat(ddir, dname, &ts(mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io::Error::from)?;
            }
        }
    }
    Ok(())
}

/// Why the image helper failed (printed on its stderr, which the daemon reports).
#[derive(Debug, thiserror::Error)]
enum HelperError {
    /// `what` names the file or the operation.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// An error of a tree walk, which names its path itself.
    #[error("{0}")]
    Walk(#[source] io::Error),
    #[error("{}/{source}", dir.display())]
    Remove {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Unpack(#[from] unpack::UnpackError),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Context(#[from] crate::context::ContextError),
    #[error("bad ids {0:?}")]
    Ids(String),
    #[error("{}: {denied} entries whose set-id bits or capabilities could not be removed", path.display())]
    SetId { path: PathBuf, denied: usize },
    #[error("mistry image helper: unknown arguments {0:?}")]
    Arguments(Vec<String>),
}

fn at(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> HelperError {
    let what = what.to_string();
    move |source| HelperError::Io { what, source }
}

/// `UID:GID`.
fn parse_ids(ids: &str) -> Result<(u32, u32), HelperError> {
    ids.split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
        .ok_or_else(|| HelperError::Ids(ids.to_string()))
}

fn open_root(p: &Path) -> Result<Root, HelperError> {
    Root::open(p).map_err(HelperError::Walk)
}

/// Entry point of the helper: `apply-layer BLOB DIGEST ROOT keep|ignore`,
/// `extract SRC_ROOT ARCHIVE ROOT DEST keep|ignore`, `copy-in SPEC`, `mkdirs ROOT PATH UID:GID`,
/// `pack ROOT OUT`, `clear DIR` (empty a directory), `remove DIR NAME` (remove one entry of a
/// directory, whatever it is, without following a symlink), `strip-setid DIR` (set-id bits and
/// file capabilities out of a tree; prints how many of each went), `copy-tree SRC DST` (`cp -a
/// SRC/. DST`), `chown-tree PATH UID:GID` (`chown -R -h`). Every tree is walked by fd and
/// iteratively ([`crate::walk`]). Returns the process exit code; errors go to stderr.
pub fn helper_main(args: &[OsString]) -> i32 {
    match helper(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn helper(args: &[OsString]) -> Result<(), HelperError> {
    let s: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let p = |i: usize| PathBuf::from(&args[i]);
    let owners = |v: &str| {
        if v == "keep" {
            Owners::Keep
        } else {
            Owners::Ignore
        }
    };
    match s.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["apply-layer", _, digest, _, mode] => {
            let blob = fs::File::open(p(1)).map_err(at(p(1).display()))?;
            let verified = crate::oci::Verify::new(blob, digest);
            let applied = unpack::apply_layer(verified, &p(3), digest, owners(mode))?;
            println!(
                "{}",
                serde_json::to_string(&AppliedJson {
                    entries: applied.entries,
                    whiteouts: applied.whiteouts,
                    skipped_devices: applied.skipped_devices,
                })?
            );
            Ok(())
        }
        ["extract", _, archive, _, dest, mode] => {
            let src = open_root(&p(1))?;
            let archive_fd = src
                .open_in(Path::new(archive), OFlags::RDONLY | OFlags::NONBLOCK)
                .map_err(at("opening the archive"))?;
            let image = open_root(&p(3))?;
            let dest_fd = image
                .mkdir_all(Path::new(dest), None, 0o755)
                .map_err(at(format!("creating {dest}")))?;
            unpack::apply_layer_in(
                fs::File::from(archive_fd),
                &Root::from_fd(dest_fd),
                archive,
                owners(mode),
            )
            .map(drop)
            .map_err(HelperError::from)
        }
        ["copy-in", _] => {
            let text = fs::read(p(1)).map_err(at(p(1).display()))?;
            let spec: CopySpec = serde_json::from_slice(&text)?;
            let image = open_root(&spec.root)?;
            let src = open_root(&spec.src_root)?;
            let owner = spec.owners.then_some((spec.uid, spec.gid));
            for d in &spec.dirs {
                image
                    .mkdir_all(d, owner, 0o755)
                    .map_err(at(format!("creating {}", d.display())))?;
            }
            for item in &spec.items {
                copy_one(item, &spec, &src, &image).map_err(at(format!(
                    "copying {} to {}",
                    Path::new("/").join(&item.src).display(),
                    item.dest.display()
                )))?;
            }
            Ok(())
        }
        ["resolve", _] => {
            println!("{}", crate::context::resolve_request(&p(1))?);
            Ok(())
        }
        ["mkdirs", _, path, ids] => {
            let (uid, gid) = parse_ids(ids)?;
            open_root(&p(1))?
                .mkdir_all(Path::new(path), Some((uid, gid)), 0o755)
                .map(drop)
                .map_err(at(format!("creating {path}")))
        }
        ["remove", _, name] => {
            let dir = rfs::open(
                p(1).as_path(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| at(p(1).display())(e.into()))?;
            walk::remove_at(dir.as_fd(), OsStr::new(name), false)
                .map_err(|source| HelperError::Remove { dir: p(1), source })
        }
        ["strip-setid", _] => {
            let dir = rfs::open(
                p(1).as_path(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| at(p(1).display())(e.into()))?;
            let s = crate::setid::strip_setid(dir.as_fd()).map_err(at(p(1).display()))?;
            if s.denied > 0 {
                return Err(HelperError::SetId {
                    path: p(1),
                    denied: s.denied,
                });
            }
            println!("{} {}", s.modes, s.caps);
            Ok(())
        }
        ["clear", _] => {
            let dir = rfs::open(p(1).as_path(), walk::dir_flags(), Mode::empty())
                .map_err(|e| at(p(1).display())(e.into()))?;
            walk::clear(dir, &p(1), false).map_err(HelperError::Walk)
        }
        ["copy-tree", _, _] => {
            let open = |p: &Path| {
                rfs::open(p, walk::dir_flags(), Mode::empty())
                    .map_err(|e| at(p.display())(e.into()))
            };
            walk::copy_tree(open(&p(1))?, open(&p(2))?, &p(1)).map_err(HelperError::Walk)
        }
        ["chown-tree", _, ids] => {
            let (uid, gid) = parse_ids(ids)?;
            match rfs::open(p(1).as_path(), walk::dir_flags(), Mode::empty()) {
                Ok(top) => walk::chown_tree(top, &p(1), uid, gid).map_err(HelperError::Walk),
                // A file or a link: itself alone.
                Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
                    std::os::unix::fs::lchown(p(1), Some(uid), Some(gid))
                        .map_err(at(p(1).display()))
                }
                Err(e) => Err(at(p(1).display())(e.into())),
            }
        }
        ["pack", _, _] => {
            let out = fs::File::create(p(2)).map_err(at(p(2).display()))?;
            let root = rfs::open(p(1).as_path(), walk::dir_flags(), Mode::empty())
                .map_err(|e| at(p(1).display())(e.into()))?;
            let mut b = tar::Builder::new(io::BufWriter::new(out));
            walk::append_tree(&mut b, root, Path::new("."), walk::Sent::ImageTree)
                .map_err(at(format!("packing {}", p(1).display())))?;
            b.into_inner()
                .and_then(|mut w| io::Write::flush(&mut w))
                .map_err(at(format!("writing {}", p(2).display())))
        }
        _ => Err(HelperError::Arguments(s.clone())),
    }
}
