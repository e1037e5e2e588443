//! Paths inside a sandbox's root, as the sandbox will see them: normalised without climbing
//! above `/`, and resolved through the root's symbolic links without leaving it.

use std::path::{Component, Path, PathBuf};

/// Normalise an absolute in-sandbox path: `..` cannot climb above `/`, `.` and `//` vanish.
pub fn normalize_inside(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// How many symbolic links one resolution follows at most (the kernel's limit).
pub const MAX_LINKS: usize = 40;

/// Resolve `path` as the sandbox will see it: symlinks of the image are followed *inside*
/// `rootfs` (an absolute link target restarts at the sandbox's root, `..` stops at it), like
/// runc's securejoin. Missing components are kept as they are. The result is an absolute
/// in-sandbox path without symlinks in its existing part, so the directories to create for a
/// mount point are known before the sandbox starts. (The mounts themselves happen after
/// pivot_root, so even a rootfs changed in between cannot lead them out of the sandbox.)
///
/// More than [`MAX_LINKS`] links fail with `ELOOP`, as the kernel's own resolution does.
pub fn try_resolve_in_root(rootfs: &Path, path: &Path) -> Result<PathBuf, std::io::Error> {
    let mut done = PathBuf::from("/");
    let mut todo: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            done.pop();
            continue;
        }
        let candidate = done.join(&part);
        let on_host = rootfs.join(candidate.strip_prefix("/").unwrap_or(&candidate));
        match std::fs::symlink_metadata(&on_host) {
            Ok(m) if m.file_type().is_symlink() => {
                if links >= MAX_LINKS {
                    return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
                }
                links += 1;
                let Ok(target) = std::fs::read_link(&on_host) else {
                    done = candidate;
                    continue;
                };
                if target.is_absolute() {
                    done = PathBuf::from("/");
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => todo.push(n.to_os_string()),
                        Component::ParentDir => todo.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => done = candidate,
        }
    }
    Ok(done)
}
