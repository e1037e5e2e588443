//! Applying one image layer (a tar stream, plain, gzip or zstd) onto a root filesystem tree.
//!
//! - Whiteouts (`.wh.NAME`) delete `NAME` from lower layers; an opaque marker (`.wh..wh..opq`)
//!   hides everything lower layers put in its directory.
//! - Entries are placed with Docker's rule: parent directories are resolved *inside* the tree
//!   (an absolute symlink in a lower layer points into the image, never the host); a `..` that
//!   would climb out of the tree, or a hard link to outside it, is refused with an error that
//!   names the layer.
//! - Owners, modes, timestamps and extended attributes are kept where the kernel lets us.
//!   Ownership is set with the ids of the layer: run this inside the sandbox's user namespace
//!   (see [`crate::tools`]) and they land on the host as the sandbox's mapped ids.
//! - Device nodes are skipped (the sandbox provides `/dev`).

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer {layer}: entry {entry:?} {reason}")]
    Hostile {
        layer: String,
        entry: String,
        reason: String,
    },
    #[error("layer {layer}: {what}: {source}")]
    Io {
        layer: String,
        what: String,
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
    pub entries: usize,
    pub whiteouts: usize,
    pub skipped_devices: usize,
}

/// Wrap `input` in the right decompressor, sniffing gzip and zstd magic numbers.
pub fn decompress<'a>(input: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
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
    root: &'a Path,
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

    /// Host path of `rel`'s parent resolved inside the root, plus the final name.
    fn place(&self, rel: &Path) -> PathBuf {
        let parent = rel.parent().unwrap_or(Path::new(""));
        let resolved = sandbox::plan::resolve_in_root(self.root, &Path::new("/").join(parent));
        let mut p = self
            .root
            .join(resolved.strip_prefix("/").unwrap_or(&resolved));
        if let Some(name) = rel.file_name() {
            p.push(name);
        }
        p
    }

    fn ensure_parent(&self, host: &Path, rel: &Path) -> Result<(), UnpackError> {
        if let Some(parent) = host.parent() {
            fs::create_dir_all(parent)
                .map_err(self.io(format!("creating the parent of {}", rel.display())))?;
        }
        Ok(())
    }
}

/// Remove whatever is at `p` (file, symlink or whole directory); missing is fine.
fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Apply the layer read from `input` (compressed or not) onto `root`. `layer` names it in errors.
pub fn apply_layer(
    input: impl Read,
    root: &Path,
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
            let dir = ctx.place(&rel);
            let dir = dir.parent().map(Path::to_path_buf).unwrap_or_default();
            let dir_rel = rel.parent().map(Path::to_path_buf).unwrap_or_default();
            if let Ok(children) = fs::read_dir(&dir) {
                for child in children.flatten() {
                    let child_rel = dir_rel.join(child.file_name());
                    if !ctx.created.contains(&child_rel) {
                        remove_any(&child.path())
                            .map_err(ctx.io(format!("applying opaque {}", rel.display())))?;
                    }
                }
            }
            stats.whiteouts += 1;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let target = ctx.place(&rel.with_file_name(hidden));
            remove_any(&target).map_err(ctx.io(format!("applying whiteout {}", rel.display())))?;
            stats.whiteouts += 1;
            continue;
        }
        let host = ctx.place(&rel);
        let kind = entry.header().entry_type();
        let header = entry.header().clone();
        let mode = header.mode().map_err(ctx.io("reading a mode"))? & 0o7777;
        // Blank numeric fields (some writers leave them empty) mean 0.
        let (uid, gid) = (
            header.uid().unwrap_or(0) as u32,
            header.gid().unwrap_or(0) as u32,
        );
        let mtime = filetime::FileTime::from_unix_time(header.mtime().unwrap_or(0) as i64, 0);
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&host) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&host).map_err(ctx.io(format!("replacing {}", rel.display())))?
                    }
                    Err(_) => {}
                }
                ctx.ensure_parent(&host, &rel)?;
                if !host.is_dir() {
                    fs::create_dir(&host)
                        .map_err(ctx.io(format!("creating directory {}", rel.display())))?;
                }
                ctx.dir_times.push((host.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_any(&host).map_err(ctx.io(format!("replacing {}", rel.display())))?;
                ctx.ensure_parent(&host, &rel)?;
                let mut f = fs::File::create(&host)
                    .map_err(ctx.io(format!("creating {}", rel.display())))?;
                io::copy(&mut entry, &mut f)
                    .map_err(ctx.io(format!("writing {}", rel.display())))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(ctx.io("reading a link target"))?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                remove_any(&host).map_err(ctx.io(format!("replacing {}", rel.display())))?;
                ctx.ensure_parent(&host, &rel)?;
                symlink(&target, &host)
                    .map_err(ctx.io(format!("creating symlink {}", rel.display())))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(ctx.io("reading a link target"))?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let Some(target_rel) = clean(&target) else {
                    return Err(ctx.hostile(&raw, "is a hard link that escapes the image root"));
                };
                let source = ctx.place(&target_rel);
                match fs::symlink_metadata(&source) {
                    Ok(m) if !m.is_dir() => {}
                    _ => {
                        return Err(ctx.hostile(
                            &raw,
                            &format!("is a hard link to a missing or invalid target {target:?}"),
                        ))
                    }
                }
                remove_any(&host).map_err(ctx.io(format!("replacing {}", rel.display())))?;
                ctx.ensure_parent(&host, &rel)?;
                fs::hard_link(&source, &host)
                    .map_err(ctx.io(format!("creating hard link {}", rel.display())))?;
                ctx.created.insert(rel);
                stats.entries += 1;
                continue; // a hard link shares the target's owner, mode and times
            }
            tar::EntryType::Fifo => {
                remove_any(&host).map_err(ctx.io(format!("replacing {}", rel.display())))?;
                ctx.ensure_parent(&host, &rel)?;
                nix::unistd::mkfifo(&host, nix::sys::stat::Mode::from_bits_truncate(mode))
                    .map_err(|e| (ctx.io(format!("creating fifo {}", rel.display())))(e.into()))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                stats.skipped_devices += 1;
                continue;
            }
            // PAX/GNU headers are consumed by the tar crate; anything else is ignored.
            _ => continue,
        }
        if ctx.owners == Owners::Keep {
            nix::unistd::fchownat(
                None,
                &host,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| match e {
                nix::errno::Errno::EINVAL => ctx.hostile(
                    &raw,
                    &format!("is owned by {uid}:{gid}, outside the sandbox's 65536 mapped ids"),
                ),
                other => (ctx.io(format!("setting the owner of {}", rel.display())))(other.into()),
            })?;
        }
        if kind != tar::EntryType::Symlink {
            fs::set_permissions(&host, fs::Permissions::from_mode(mode))
                .map_err(ctx.io(format!("setting the mode of {}", rel.display())))?;
        }
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                if let (Ok(key), value) = (ext.key(), ext.value_bytes()) {
                    if let Some(attr) = key.strip_prefix("SCHILY.xattr.") {
                        // Where possible: some namespaces (trusted.*) need host privilege.
                        if let Err(e) = xattr::set(&host, attr, value) {
                            tracing::debug!(layer, entry = %rel.display(), attr, error = %e, "xattr not kept");
                        }
                    }
                }
            }
        }
        if kind != tar::EntryType::Directory {
            let _ = filetime::set_symlink_file_times(&host, mtime, mtime);
        }
        ctx.created.insert(rel);
        stats.entries += 1;
    }
    for (dir, t) in ctx.dir_times.iter().rev() {
        let _ = filetime::set_symlink_file_times(dir, *t, *t);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

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
