//! Operations on image trees, run inside the sandbox's user namespace.
//!
//! Image trees hold files owned by the sandbox's mapped ids (root = the daemon's user, 1..65536 =
//! its subordinate range). Only a process inside that user namespace can create, copy, chown or
//! delete them correctly, also when the daemon is not root. So every such operation runs as a
//! short-lived sandbox whose root is the host's `/`, read-only, with the store directory bound
//! read-write at its own path, executing either a host tool (`cp`, `rm`) or our helper command
//! (`mistryd internal ...`, or `mistry-image-helper` in this crate's tests), whose entry point is
//! [`helper_main`].

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sandbox::{Bind, NetworkMode, Sandbox};
use serde::{Deserialize, Serialize};

use crate::store::{Target, View};
use crate::unpack::{self, Owners};

/// An overlay to mount in a tool sandbox: lowers, optional (upper, work), mount point.
type Mount = (Vec<PathBuf>, Option<(PathBuf, PathBuf)>, PathBuf);

/// The path to operate on for `target`, and the overlay to mount there if it is layered.
fn mount_for(target: &Target) -> Result<(PathBuf, Option<Mount>), ToolError> {
    match target {
        Target::Dir(p) => Ok((p.clone(), None)),
        Target::Overlay {
            lowers,
            upper,
            work,
        } => {
            let merged = upper.parent().unwrap_or(Path::new("/")).join("merged");
            fs::create_dir_all(&merged).map_err(|e| ToolError::Failed {
                what: format!("creating {}", merged.display()),
                message: e.to_string(),
            })?;
            let mount = (
                lowers.clone(),
                Some((upper.clone(), work.clone())),
                merged.clone(),
            );
            Ok((merged, Some(mount)))
        }
    }
}

/// A tool run failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{what}: {source}")]
    Sandbox {
        what: String,
        #[source]
        source: sandbox::Error,
    },
    #[error("{what}: {message}")]
    Failed { what: String, message: String },
}

/// How to run operations on image trees.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The helper command prefix, e.g. `["/usr/bin/mistryd", "internal"]`.
    helper: Vec<OsString>,
    /// Whether ids other than root are mapped (a subordinate range exists).
    owners: bool,
    /// Directories bound read-write into every tool sandbox.
    writable: Vec<PathBuf>,
}

/// One thing COPY puts into an image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CopyItem {
    /// Host path of the source (file, directory or symlink).
    pub src: PathBuf,
    /// Absolute destination inside the image.
    pub dest: PathBuf,
}

/// What the helper's `copy-in` does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopySpec {
    pub root: PathBuf,
    pub items: Vec<CopyItem>,
    pub uid: u32,
    pub gid: u32,
    /// Mode for every copied file and directory (`--chmod`); else the source's.
    pub chmod: Option<u32>,
    pub owners: bool,
    /// Directories to create first (the destination of a COPY), owned like the items.
    pub dirs: Vec<PathBuf>,
}

impl Tools {
    pub fn new(helper: Vec<OsString>, writable: Vec<PathBuf>) -> Tools {
        let (mapping, _) = sandbox::idmap::choose(sandbox::IdMapping::Auto);
        Tools {
            helper,
            owners: mapping.max_id() > 0,
            writable,
        }
    }

    /// Whether file owners other than root can be kept (else they become root, with a log line).
    pub fn keeps_owners(&self) -> bool {
        self.owners
    }

    fn sandbox(&self, extra: &[&Path], mount: Option<Mount>) -> Sandbox {
        let mut sb = Sandbox::new("/")
            .read_only_root(true)
            .network(NetworkMode::None)
            .hostname("mistry-tools");
        for w in self
            .writable
            .iter()
            .map(PathBuf::as_path)
            .chain(extra.iter().copied())
        {
            sb = sb.bind(Bind::new(w, w));
        }
        if let Some((lowers, rw, at)) = mount {
            sb = sb.overlay_mount(lowers, rw, at);
        }
        sb
    }

    /// Run with `extra` directories writable besides the store.
    fn run_with(
        &self,
        what: &str,
        argv: Vec<OsString>,
        extra: &[&Path],
        mount: Option<Mount>,
    ) -> Result<String, ToolError> {
        let out = self
            .sandbox(extra, mount)
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
        mount: Option<Mount>,
    ) -> Result<String, ToolError> {
        let mut argv = self.helper.clone();
        argv.extend(args);
        self.run_with(what, argv, &[], mount)
    }

    /// Apply a layer blob onto `root`; `name` (its digest) appears in errors.
    pub fn apply_layer(
        &self,
        blob: &Path,
        digest: &str,
        target: &Target,
    ) -> Result<unpack::Applied, ToolError> {
        let owners = if self.owners { "keep" } else { "ignore" };
        let (root, mount) = mount_for(target)?;
        let out = self.helper(
            &format!("applying layer {digest}"),
            vec![
                os("apply-layer"),
                os(blob),
                os(digest),
                os(&root),
                os(owners),
            ],
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

    /// Extract a local tar archive (ADD) into `dest` inside `root`.
    pub fn extract(&self, archive: &Path, target: &Target, dest: &Path) -> Result<(), ToolError> {
        let owners = if self.owners { "keep" } else { "ignore" };
        let (root, mount) = mount_for(target)?;
        self.helper(
            &format!("extracting {}", archive.display()),
            vec![os("extract"), os(archive), os(&root), os(dest), os(owners)],
            mount,
        )
        .map(drop)
    }

    /// COPY into `target`: write the spec to `spec_file` and have the helper carry it out.
    pub fn copy_in(
        &self,
        spec: &CopySpec,
        spec_file: &Path,
        target: &Target,
    ) -> Result<(), ToolError> {
        let (root, mount) = mount_for(target)?;
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
        self.helper(
            "copying files into the image",
            vec![os("copy-in"), os(spec_file)],
            mount,
        )
        .map(drop)
    }

    /// `mkdir -p` of `path` inside `root`, owned by uid:gid.
    pub fn mkdirs(
        &self,
        target: &Target,
        path: &Path,
        uid: u32,
        gid: u32,
    ) -> Result<(), ToolError> {
        let ids = format!("{uid}:{gid}");
        let (root, mount) = mount_for(target)?;
        self.helper(
            &format!("creating {}", path.display()),
            vec![os("mkdirs"), os(&root), os(path), os(ids)],
            mount,
        )
        .map(drop)
    }

    /// Give a whole tree to `uid:gid` (sandbox ids), e.g. a job's `/data` for a non-root user.
    pub fn chown_tree(&self, path: &Path, uid: u32, gid: u32) -> Result<(), ToolError> {
        let argv: Vec<OsString> = vec![
            "chown".into(),
            "-R".into(),
            "-h".into(),
            format!("{uid}:{gid}").into(),
            path.into(),
        ];
        self.run_with(
            &format!("giving {} to {uid}:{gid}", path.display()),
            argv,
            &[path],
            None,
        )
        .map(drop)
    }

    /// A full copy of a tree (reflinks where the filesystem has them).
    pub fn copy_tree(&self, src: &Path, dst: &Path) -> Result<(), ToolError> {
        let argv: Vec<OsString> = vec![
            "cp".into(),
            "-a".into(),
            "--reflink=auto".into(),
            src.into(),
            dst.into(),
        ];
        let parent = dst.parent().unwrap_or(Path::new("/"));
        self.run_with(&format!("copying {}", src.display()), argv, &[parent], None)
            .map(drop)
    }

    /// `rm -rf` of a tree.
    pub fn remove_tree(&self, path: &Path) -> Result<(), ToolError> {
        if fs::symlink_metadata(path).is_err() {
            return Ok(());
        }
        let argv: Vec<OsString> = vec![
            "rm".into(),
            "-rf".into(),
            "--one-file-system".into(),
            path.into(),
        ];
        let parent = path.parent().unwrap_or(Path::new("/"));
        self.run_with(
            &format!("removing {}", path.display()),
            argv,
            &[parent],
            None,
        )
        .map(drop)
    }

    /// The path to read `view` at, and the read-only overlay to mount there (at `mountpoint`).
    fn read_mount(view: &View, mountpoint: &Path) -> Result<(PathBuf, Option<Mount>), ToolError> {
        match view {
            View::Dir(p) => Ok((p.clone(), None)),
            View::Layers(layers) => {
                fs::create_dir_all(mountpoint).map_err(|e| ToolError::Failed {
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
    pub fn pack(&self, view: &View, mountpoint: &Path, out: &Path) -> Result<(), ToolError> {
        let (root, mount) = Self::read_mount(view, mountpoint)?;
        let what = format!("packing {}", root.display());
        self.helper(&what, vec![os("pack"), os(&root), os(out)], mount)
            .map(drop)
    }

    /// A complete copy of `view` at `dst` (a layered view is mounted at `mountpoint` meanwhile).
    pub fn materialize(&self, view: &View, mountpoint: &Path, dst: &Path) -> Result<(), ToolError> {
        let (root, mount) = Self::read_mount(view, mountpoint)?;
        let argv: Vec<OsString> = vec![
            "cp".into(),
            "-a".into(),
            "--reflink=auto".into(),
            root.into(),
            dst.into(),
        ];
        let parent = dst.parent().unwrap_or(Path::new("/"));
        self.run_with(
            &format!("copying {}", dst.display()),
            argv,
            &[parent],
            mount,
        )
        .map(drop)
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

/// Resolve an in-image path to the host path under `root` (parents resolved inside the root).
pub fn host_path(root: &Path, inside: &Path) -> PathBuf {
    let resolved = sandbox::plan::resolve_in_root(root, &Path::new("/").join(inside));
    root.join(resolved.strip_prefix("/").unwrap_or(&resolved))
}

fn chown(p: &Path, uid: u32, gid: u32, owners: bool) -> io::Result<()> {
    if !owners {
        return Ok(());
    }
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
}

fn copy_one(item: &CopyItem, spec: &CopySpec) -> io::Result<()> {
    let meta = fs::symlink_metadata(&item.src)?;
    let dest = host_path(&spec.root, &item.dest);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    if meta.is_dir() {
        match fs::symlink_metadata(&dest) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&dest)?;
                fs::create_dir(&dest)?;
            }
            Err(_) => fs::create_dir(&dest)?,
        }
    } else {
        match fs::symlink_metadata(&dest) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&dest)?,
            Ok(_) => fs::remove_file(&dest)?,
            Err(_) => {}
        }
        if meta.file_type().is_symlink() {
            symlink(fs::read_link(&item.src)?, &dest)?;
        } else {
            fs::copy(&item.src, &dest)?;
        }
    }
    chown(&dest, spec.uid, spec.gid, spec.owners)?;
    if !meta.file_type().is_symlink() {
        let mode = spec.chmod.unwrap_or(meta.mode() & 0o7777);
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
        let mtime = filetime::FileTime::from_last_modification_time(&meta);
        filetime::set_file_mtime(&dest, mtime)?;
    }
    Ok(())
}

/// Entry point of the helper: `apply-layer BLOB DIGEST ROOT keep|ignore`,
/// `extract ARCHIVE ROOT DEST keep|ignore`, `copy-in SPEC`, `mkdirs ROOT PATH UID:GID`,
/// `pack ROOT OUT`. Returns the process exit code; errors go to stderr.
pub fn helper_main(args: &[OsString]) -> i32 {
    match helper(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn helper(args: &[OsString]) -> Result<(), String> {
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
            let blob = fs::File::open(p(1)).map_err(|e| format!("{}: {e}", p(1).display()))?;
            let verified = crate::oci::Verify::new(blob, digest);
            let applied = unpack::apply_layer(verified, &p(3), digest, owners(mode))
                .map_err(|e| e.to_string())?;
            println!(
                "{}",
                serde_json::to_string(&AppliedJson {
                    entries: applied.entries,
                    whiteouts: applied.whiteouts,
                    skipped_devices: applied.skipped_devices,
                })
                .map_err(|e| e.to_string())?
            );
            Ok(())
        }
        ["extract", _, _, dest, mode] => {
            let archive = fs::File::open(p(1)).map_err(|e| format!("{}: {e}", p(1).display()))?;
            let target = host_path(&p(2), Path::new(dest));
            fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
            unpack::apply_layer(archive, &target, &s[1], owners(mode))
                .map(drop)
                .map_err(|e| e.to_string())
        }
        ["copy-in", _] => {
            let text = fs::read(p(1)).map_err(|e| format!("{}: {e}", p(1).display()))?;
            let spec: CopySpec = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
            for d in &spec.dirs {
                let host = host_path(&spec.root, d);
                if !host.is_dir() {
                    fs::create_dir_all(&host)
                        .map_err(|e| format!("creating {}: {e}", d.display()))?;
                    chown(&host, spec.uid, spec.gid, spec.owners)
                        .map_err(|e| format!("chown {}: {e}", d.display()))?;
                }
            }
            for item in &spec.items {
                copy_one(item, &spec).map_err(|e| {
                    format!(
                        "copying {} to {}: {e}",
                        item.src.display(),
                        item.dest.display()
                    )
                })?;
            }
            Ok(())
        }
        ["mkdirs", _, path, ids] => {
            let (uid, gid) = ids
                .split_once(':')
                .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
                .ok_or_else(|| format!("bad ids {ids:?}"))?;
            let mut cur = PathBuf::from("/");
            for c in Path::new(path).components() {
                if let std::path::Component::Normal(n) = c {
                    cur.push(n);
                    let host = host_path(&p(1), &cur);
                    if !host.is_dir() {
                        fs::create_dir(&host)
                            .map_err(|e| format!("creating {}: {e}", cur.display()))?;
                        chown(&host, uid, gid, true)
                            .map_err(|e| format!("chown {}: {e}", cur.display()))?;
                    }
                }
            }
            Ok(())
        }
        ["pack", _, _] => {
            let out = fs::File::create(p(2)).map_err(|e| format!("{}: {e}", p(2).display()))?;
            let mut b = tar::Builder::new(io::BufWriter::new(out));
            b.follow_symlinks(false);
            b.mode(tar::HeaderMode::Complete);
            b.append_dir_all(".", p(1))
                .map_err(|e| format!("packing {}: {e}", p(1).display()))?;
            b.into_inner()
                .and_then(|mut w| io::Write::flush(&mut w))
                .map_err(|e| format!("writing {}: {e}", p(2).display()))
        }
        _ => Err(format!("mistry image helper: unknown arguments {s:?}")),
    }
}
