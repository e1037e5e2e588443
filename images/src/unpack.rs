//! Applying one image layer (a tar stream, plain, gzip or zstd) onto a root filesystem tree.
//!
//! - Whiteouts (`.wh.NAME`) delete `NAME` from lower layers; an opaque marker (`.wh..wh..opq`)
//!   hides everything lower layers put in its directory.
//! - Entries are placed with Docker's rule: parent directories are resolved *inside* the tree
//!   (an absolute symlink in a lower layer points into the image, never the host), by the
//!   kernel through [`crate::inroot`] (`openat2(RESOLVE_IN_ROOT)`: more than 40 links is ELOOP);
//!   the entry itself is created relative to its parent's fd, never through a final symlink. A
//!   `..` that would climb out of the tree, or a hard link to outside it, is refused with an
//!   error that names the layer.
//! - Owners, modes, timestamps and extended attributes are kept where the kernel lets us.
//!   Ownership is set with the ids of the layer: run this inside the sandbox's user namespace
//!   (see [`crate::tools`]) and they land on the host as the sandbox's mapped ids.
//! - Device nodes are skipped (the sandbox provides `/dev`).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};

use crate::inroot::{self, Root};
use crate::walk;

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry the layer may not hold (a path out of the root, through a link, a hard link
    /// to a directory or outside the layer, ...): the layer is refused.
    #[error("layer {layer}: entry {entry:?} {reason}")]
    Hostile {
        /// The layer's name as given to [`apply_layer`] (its digest).
        layer: String,
        /// The entry's path in the tar.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading the layer or writing the tree failed.
    #[error("layer {layer}: {what}: {source}")]
    Io {
        /// The layer's name as given to [`apply_layer`].
        layer: String,
        /// What was being done, naming the entry.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// What to do with owners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owners {
    /// Set each entry's uid/gid (inside a user namespace that maps them).
    Keep,
    /// Leave files owned by whoever unpacks (tests, and trees without a user namespace).
    Ignore,
}

/// Statistics of one applied layer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Entries created (files, directories, links, FIFOs).
    pub entries: usize,
    /// Whiteouts applied (opaque directories included).
    pub whiteouts: usize,
    /// Character and block devices left out (a sandbox cannot create them).
    pub skipped_devices: usize,
}

/// Wrap `input` in the right decompressor, sniffing gzip and zstd magic numbers.
pub(crate) fn decompress<'a>(input: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut buf = BufReader::with_capacity(1 << 16, input);
    let head = buf.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(buf)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(buf)?))
    } else {
        Ok(Box::new(buf))
    }
}

/// A tar path made relative and clean; `None` when it climbs out with `..`.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

struct Ctx<'a> {
    root: &'a Root,
    layer: &'a str,
    owners: Owners,
    /// Paths (relative) this layer created, so an opaque marker only hides lower layers.
    created: HashSet<PathBuf>,
    /// Directory times are set last (writing into a directory changes its mtime).
    dir_times: Vec<(PathBuf, filetime::FileTime)>,
}

impl Ctx<'_> {
    fn io(&self, what: impl Into<String>) -> impl FnOnce(io::Error) -> UnpackError + '_ {
        let what = what.into();
        move |source| UnpackError::Io {
            layer: self.layer.to_string(),
            what,
            source,
        }
    }

    fn hostile(&self, entry: &Path, reason: &str) -> UnpackError {
        UnpackError::Hostile {
            layer: self.layer.to_string(),
            entry: entry.display().to_string(),
            reason: reason.to_string(),
        }
    }

    /// `rel`'s parent directory (resolved inside the root, created if missing) and final name.
    fn place(&self, rel: &Path) -> Result<(OwnedFd, OsString), UnpackError> {
        self.root
            .parent_create(rel, None)
            .map_err(self.io(format!("placing {}", rel.display())))
    }
}

fn ts(t: filetime::FileTime) -> rustix::fs::Timestamps {
    let spec = rustix::fs::Timespec {
        tv_sec: t.unix_seconds(),
        tv_nsec: t.nanoseconds().into(),
    };
    rustix::fs::Timestamps {
        last_access: spec,
        last_modification: spec,
    }
}

fn open_flags() -> OFlags {
    OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Apply the layer read from `input` (compressed or not) onto the tree at host path `root`.
/// `layer` names it in errors.
pub fn apply_layer(
    input: impl Read,
    root: &Path,
    layer: &str,
    owners: Owners,
) -> Result<Applied, UnpackError> {
    let root = Root::open(root).map_err(|source| UnpackError::Io {
        layer: layer.to_string(),
        what: "opening the root".into(),
        source,
    })?;
    apply_layer_in(input, &root, layer, owners)
}

/// Apply a layer onto an open [`Root`]: every entry lands inside it, whatever the layer and
/// the tree already there contain.
pub(crate) fn apply_layer_in(
    input: impl Read,
    root: &Root,
    layer: &str,
    owners: Owners,
) -> Result<Applied, UnpackError> {
    let mut ctx = Ctx {
        root,
        layer,
        owners,
        created: HashSet::new(),
        dir_times: Vec::new(),
    };
    let reader = decompress(input).map_err(ctx.io("reading"))?;
    let mut archive = tar::Archive::new(reader);
    let mut stats = Applied::default();
    let entries = archive.entries().map_err(ctx.io("reading the archive"))?;
    for entry in entries {
        let mut entry = entry.map_err(ctx.io("reading an entry"))?;
        let raw = entry
            .path()
            .map_err(ctx.io("reading an entry path"))?
            .into_owned();
        let Some(rel) = clean(&raw) else {
            return Err(ctx.hostile(&raw, "escapes the image root with .."));
        };
        if rel.as_os_str().is_empty() {
            continue; // "./" itself
        }
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == ".wh..wh..opq" {
            let dir_rel = rel.parent().map(Path::to_path_buf).unwrap_or_default();
            let dir = match root.open_in(&dir_rel, OFlags::RDONLY | OFlags::DIRECTORY) {
                Ok(d) => Some(d),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err((ctx.io(format!("applying opaque {}", rel.display())))(e)),
            };
            if let Some(dir) = dir {
                // Streamed: a lower directory of millions of entries costs no more memory.
                let opaque = ctx.io(format!("applying opaque {}", rel.display()));
                let hide = |dir| -> io::Result<()> {
                    let mut w = crate::walk::Walk::new(dir, crate::walk::Order::Any, &dir_rel)?;
                    while let Some(child) = w.next_entry()? {
                        if !ctx.created.contains(&dir_rel.join(&child.name)) {
                            walk::remove_at(w.dir()?, &child.name, false)
                                .map_err(|e| w.error_at(None, e))?;
                        }
                    }
                    Ok(())
                };
                hide(dir).map_err(opaque)?;
            }
            stats.whiteouts += 1;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(ctx.hostile(&raw, "is a whiteout of an invalid name"));
            }
            let parent_rel = rel.parent().map(Path::to_path_buf).unwrap_or_default();
            match root.open_in(&parent_rel, OFlags::PATH | OFlags::DIRECTORY) {
                Ok(dir) => walk::remove_at(dir.as_fd(), OsStr::new(hidden), false)
                    .map_err(ctx.io(format!("applying whiteout {}", rel.display())))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err((ctx.io(format!("applying whiteout {}", rel.display())))(e)),
            }
            stats.whiteouts += 1;
            continue;
        }
        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            stats.skipped_devices += 1;
            continue;
        }
        if !matches!(
            kind,
            tar::EntryType::Directory
                | tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::Symlink
                | tar::EntryType::Link
                | tar::EntryType::Fifo
        ) {
            // PAX/GNU headers are consumed by the tar crate; anything else is ignored.
            continue;
        }
        let (dir, fname) = ctx.place(&rel)?;
        let dir = dir.as_fd();
        let fname = fname.as_os_str();
        let header = entry.header().clone();
        let mode = header.mode().map_err(ctx.io("reading a mode"))? & 0o7777;
        // Blank numeric fields (some writers leave them empty) mean 0.
        let (uid, gid) = (
            header.uid().unwrap_or(0) as u32,
            header.gid().unwrap_or(0) as u32,
        );
        let mtime = filetime::FileTime::from_unix_time(header.mtime().unwrap_or(0) as i64, 0);
        let replace = |ctx: &Ctx| {
            walk::remove_at(dir, fname, false)
                .map_err(ctx.io(format!("replacing {}", rel.display())))
        };
        // The entry's own fd, for owner, mode, xattrs and times (None for links and fifos).
        let fd: Option<OwnedFd> = match kind {
            tar::EntryType::Directory => {
                match inroot::kind_at(dir, fname)
                    .map_err(ctx.io(format!("reading {}", rel.display())))?
                {
                    Some(FileType::Directory) => {}
                    Some(_) => {
                        replace(&ctx)?;
                        rfs::mkdirat(dir, fname, Mode::from_raw_mode(0o700)).map_err(|e| {
                            (ctx.io(format!("creating directory {}", rel.display())))(e.into())
                        })?;
                    }
                    None => {
                        rfs::mkdirat(dir, fname, Mode::from_raw_mode(0o700)).map_err(|e| {
                            (ctx.io(format!("creating directory {}", rel.display())))(e.into())
                        })?;
                    }
                }
                ctx.dir_times.push((rel.clone(), mtime));
                Some(
                    rfs::openat(
                        dir,
                        fname,
                        OFlags::RDONLY | OFlags::DIRECTORY | open_flags(),
                        Mode::empty(),
                    )
                    .map_err(|e| (ctx.io(format!("opening {}", rel.display())))(e.into()))?,
                )
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                replace(&ctx)?;
                let fd = rfs::openat(
                    dir,
                    fname,
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | open_flags(),
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| (ctx.io(format!("creating {}", rel.display())))(e.into()))?;
                let mut f = std::fs::File::from(fd);
                io::copy(&mut entry, &mut f)
                    .map_err(ctx.io(format!("writing {}", rel.display())))?;
                Some(f.into())
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(ctx.io("reading a link target"))?
                    .map(std::borrow::Cow::into_owned)
                    .unwrap_or_default();
                replace(&ctx)?;
                rfs::symlinkat(&target, dir, fname).map_err(|e| {
                    (ctx.io(format!("creating symlink {}", rel.display())))(e.into())
                })?;
                None
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(ctx.io("reading a link target"))?
                    .map(std::borrow::Cow::into_owned)
                    .unwrap_or_default();
                let Some(target_rel) = clean(&target) else {
                    return Err(ctx.hostile(&raw, "is a hard link that escapes the image root"));
                };
                let invalid = || {
                    ctx.hostile(
                        &raw,
                        &format!("is a hard link to a missing or invalid target {target:?}"),
                    )
                };
                if target_rel.as_os_str().is_empty() {
                    return Err(invalid());
                }
                let (sdir, sname) = match root.parent(&target_rel) {
                    Ok(p) => p,
                    Err(e) if e.raw_os_error().is_none() => {
                        // ELOOP and friends keep their message.
                        return Err((ctx.io(format!("creating hard link {}", rel.display())))(e));
                    }
                    Err(_) => return Err(invalid()),
                };
                match inroot::kind_at(sdir.as_fd(), &sname) {
                    Ok(Some(t)) if t != FileType::Directory => {}
                    _ => return Err(invalid()),
                }
                if target_rel == rel {
                    // A link to itself: nothing to do.
                    ctx.created.insert(rel);
                    stats.entries += 1;
                    continue;
                }
                replace(&ctx)?;
                rfs::linkat(&sdir, &sname, dir, fname, AtFlags::empty()).map_err(|e| {
                    (ctx.io(format!("creating hard link {}", rel.display())))(e.into())
                })?;
                ctx.created.insert(rel);
                stats.entries += 1;
                continue; // a hard link shares the target's owner, mode and times
            }
            tar::EntryType::Fifo => {
                replace(&ctx)?;
                rfs::mknodat(
                    dir,
                    fname,
                    FileType::Fifo,
                    Mode::from_raw_mode(mode & 0o777),
                    0,
                )
                .map_err(|e| (ctx.io(format!("creating fifo {}", rel.display())))(e.into()))?;
                None
            }
            _ => continue,
        };
        if ctx.owners == Owners::Keep {
            let r = match &fd {
                Some(fd) => rfs::fchown(
                    fd,
                    Some(rfs::Uid::from_raw(uid)),
                    Some(rfs::Gid::from_raw(gid)),
                )
                .map_err(io::Error::from),
                None => inroot::chown_at(dir, fname, uid, gid),
            };
            r.map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => ctx.hostile(
                    &raw,
                    &format!("is owned by {uid}:{gid}, outside the sandbox's 65536 mapped ids"),
                ),
                _ => (ctx.io(format!("setting the owner of {}", rel.display())))(e),
            })?;
        }
        match &fd {
            Some(fd) => rfs::fchmod(fd, Mode::from_raw_mode(mode)),
            // A fifo we just made (not a symlink: following is safe).
            None if kind == tar::EntryType::Fifo => {
                rfs::chmodat(dir, fname, Mode::from_raw_mode(mode), AtFlags::empty())
            }
            None => Ok(()),
        }
        .map_err(|e| (ctx.io(format!("setting the mode of {}", rel.display())))(e.into()))?;
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                if let (Ok(key), value) = (ext.key(), ext.value_bytes()) {
                    if let Some(attr) = key.strip_prefix("SCHILY.xattr.") {
                        // Where possible: some namespaces (trusted.*) need host privilege.
                        let r = match &fd {
                            Some(fd) => rfs::fsetxattr(fd, attr, value, rfs::XattrFlags::empty()),
                            None => Ok(()),
                        };
                        if let Err(e) = r {
                            tracing::debug!(layer, entry = %rel.display(), attr, error = %e, "xattr not kept");
                        }
                    }
                }
            }
        }
        if kind != tar::EntryType::Directory {
            let _ = match &fd {
                Some(fd) => rfs::futimens(fd, &ts(mtime)),
                None => rfs::utimensat(dir, fname, &ts(mtime), AtFlags::SYMLINK_NOFOLLOW),
            };
        }
        ctx.created.insert(rel);
        stats.entries += 1;
    }
    for (rel, t) in ctx.dir_times.iter().rev() {
        if let Ok((dir, name)) = root.parent(rel) {
            let _ = rfs::utimensat(&dir, &name, &ts(*t), AtFlags::SYMLINK_NOFOLLOW);
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Build a tar in memory from (path, kind, data/target).
    fn tar_of(entries: &[(&str, char, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mode(0o644);
            h.set_mtime(1_600_000_000);
            match kind {
                'd' => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, path, io::empty()).unwrap();
                }
                'f' => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, data.as_bytes()).unwrap();
                }
                'l' => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, path, data).unwrap();
                }
                'h' => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, path, data).unwrap();
                }
                'c' => {
                    h.set_entry_type(tar::EntryType::Char);
                    h.set_size(0);
                    b.append_data(&mut h, path, io::empty()).unwrap();
                }
                _ => unreachable!(),
            }
        }
        b.into_inner().unwrap()
    }

    /// A raw tar entry with an arbitrary (unchecked) name, as a hostile layer would carry.
    fn raw_entry(name: &str, data: &str) -> Vec<u8> {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(data.as_bytes());
        out.resize(512 + data.len().div_ceil(512) * 512, 0);
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    fn apply(root: &Path, tar: &[u8]) -> Result<Applied, UnpackError> {
        apply_layer(tar, root, "sha256:test", Owners::Ignore)
    }

    #[test]
    fn files_dirs_links_and_whiteouts() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        apply(
            r,
            &tar_of(&[
                ("etc/", 'd', ""),
                ("etc/a", 'f', "A"),
                ("etc/b", 'f', "B"),
                ("opt/keep/x", 'f', "x"),
                ("opt/keep/y", 'f', "y"),
                ("bin", 'l', "usr/bin"),
                ("usr/bin/tool", 'f', "tool"),
                ("etc/a-hard", 'h', "etc/a"),
                ("dev/null", 'c', ""),
            ]),
        )
        .unwrap();
        assert_eq!(fs::read_to_string(r.join("etc/a-hard")).unwrap(), "A");
        assert_eq!(fs::read_to_string(r.join("bin/tool")).unwrap(), "tool");
        assert!(!r.join("dev/null").exists());
        let stats = apply(
            r,
            &tar_of(&[
                ("etc/.wh.a", 'f', ""),
                ("opt/keep/.wh..wh..opq", 'f', ""),
                ("opt/keep/new", 'f', "n"),
                // A layer adding to a directory through a symlink of a lower layer.
                ("bin/other", 'f', "o"),
            ]),
        )
        .unwrap();
        assert_eq!(stats.whiteouts, 2);
        assert!(!r.join("etc/a").exists());
        assert_eq!(fs::read_to_string(r.join("etc/b")).unwrap(), "B");
        let mut kept: Vec<String> = fs::read_dir(r.join("opt/keep"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        kept.sort();
        assert_eq!(kept, ["new"]);
        assert_eq!(fs::read_to_string(r.join("usr/bin/other")).unwrap(), "o");
    }

    #[test]
    fn opaque_marker_after_new_entries_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        apply(r, &tar_of(&[("d/old", 'f', "o")])).unwrap();
        apply(
            r,
            &tar_of(&[("d/new", 'f', "n"), ("d/.wh..wh..opq", 'f', "")]),
        )
        .unwrap();
        assert!(!r.join("d/old").exists());
        assert!(r.join("d/new").exists());
    }

    #[test]
    fn absolute_symlinks_resolve_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = dir.path();
        // A lower layer points a directory at a host path; the next layer writes through it.
        apply(
            r,
            &tar_of(&[("escape", 'l', outside.path().to_str().unwrap())]),
        )
        .unwrap();
        apply(r, &tar_of(&[("escape/file", 'f', "data")])).unwrap();
        assert_eq!(
            fs::read_dir(outside.path()).unwrap().count(),
            0,
            "wrote outside the root"
        );
        let inside = r
            .join(outside.path().strip_prefix("/").unwrap())
            .join("file");
        assert_eq!(fs::read_to_string(inside).unwrap(), "data");
    }

    #[test]
    fn hostile_paths_are_refused_naming_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let e = apply(dir.path(), &raw_entry("../../etc/evil", "x")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "layer sha256:test: entry \"../../etc/evil\" escapes the image root with .."
        );
        let e = apply(dir.path(), &tar_of(&[("x", 'h', "../../etc/passwd")])).unwrap_err();
        assert!(
            e.to_string()
                .contains("hard link that escapes the image root"),
            "{e}"
        );
        assert!(!dir.path().join("x").exists());
    }

    #[test]
    fn gzip_and_zstd_layers() {
        let plain = tar_of(&[("f", 'f', "compressed")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &plain).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&plain[..], 1).unwrap();
        for data in [gz, zst] {
            let dir = tempfile::tempdir().unwrap();
            apply(dir.path(), &data).unwrap();
            assert_eq!(
                fs::read_to_string(dir.path().join("f")).unwrap(),
                "compressed"
            );
        }
    }
}
