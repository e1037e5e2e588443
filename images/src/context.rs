//! The build context: `.dockerignore`, resolving COPY/ADD sources (wildcards, a directory copies
//! its contents), and the content digest that goes into a step's cache key.

use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, OFlags};

use globset::GlobMatcher;
use sha2::{Digest as _, Sha256};

use crate::inroot::{self, Root};
use crate::walk::{Order, Walk};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ContextError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A [`ResolveRequest`] or its answer that is not the JSON expected.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ContextError {
    let what = what.into();
    move |source| ContextError::Io { what, source }
}

/// `.dockerignore` rules: later rules win, `!` re-includes, a matched directory excludes
/// everything under it.
#[derive(Debug, Default)]
pub(crate) struct Ignore {
    rules: Vec<(GlobMatcher, bool)>,
}

/// Clean a relative path: no leading `/` or `./`, `..` resolved (never above the start).
pub(crate) fn clean_rel(p: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => out.pop().then_some(())?,
            _ => {}
        }
    }
    Some(out)
}

fn glob_path(pattern: &str) -> Result<GlobMatcher, ContextError> {
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| ContextError::Invalid(format!("bad pattern {pattern:?}: {e}")))
}

impl Ignore {
    /// Parse `.dockerignore` text.
    pub(crate) fn parse(text: &str) -> Result<Ignore, ContextError> {
        let mut rules = Vec::new();
        for line in text.lines() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let (include, pat) = match t.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, t),
            };
            let Some(clean) = clean_rel(pat) else {
                continue;
            };
            let clean = clean.to_string_lossy().into_owned();
            if clean.is_empty() {
                continue;
            }
            // `*` must not cross `/`, as with Go's filepath.Match.
            rules.push((glob_path(&clean)?, include));
        }
        Ok(Ignore { rules })
    }

    /// Read `<context>/.dockerignore` (none: nothing ignored), resolved inside the context (a
    /// symlink cannot make it a host file), at most 1 MiB.
    pub(crate) fn load(context: &Path) -> Result<Ignore, ContextError> {
        let opened = Root::open(context).and_then(|r| {
            r.open_in(
                Path::new(".dockerignore"),
                OFlags::RDONLY | OFlags::NONBLOCK,
            )
        });
        let file = match opened {
            Ok(fd) => fs::File::from(fd),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Ignore::default()),
            Err(e) => return Err(io_err(".dockerignore")(e)),
        };
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            return Err(ContextError::Invalid(
                ".dockerignore is not a regular file".into(),
            ));
        }
        let mut text = String::new();
        file.take(1 << 20)
            .read_to_string(&mut text)
            .map_err(io_err(".dockerignore"))?;
        Ignore::parse(&text)
    }

    /// Whether `rel` (relative to the context) is excluded.
    pub(crate) fn excluded(&self, rel: &Path) -> bool {
        let mut excluded = false;
        for (m, include) in &self.rules {
            // A rule matches the path itself or any of its parent directories.
            let hit = rel
                .ancestors()
                .filter(|a| !a.as_os_str().is_empty())
                .any(|a| m.is_match(a));
            if hit {
                excluded = !include;
            }
        }
        excluded
    }
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Directory levels a copied tree may have: deeper ones are an error, not a stack overflow.
pub(crate) const MAX_DEPTH: usize = 256;

/// Every path under the directory `dir` (an fd opened for reading; `rel` is its path relative
/// to the source root), parents before children, in name order, not following links: an
/// iterative walk ([`crate::walk`]), which holds the names of the directories on its path.
fn walk(
    dir: OwnedFd,
    rel: &Path,
    ignore: &Ignore,
    out: &mut Vec<PathBuf>,
) -> Result<(), ContextError> {
    let too_deep = |p: &Path| {
        ContextError::Invalid(format!(
            "{}: more than {MAX_DEPTH} directory levels",
            Path::new("/").join(p).display()
        ))
    };
    if rel.components().count() > MAX_DEPTH {
        return Err(too_deep(rel));
    }
    let reading = || io_err("reading the source");
    let mut w = Walk::new(dir, Order::Sorted, &Path::new("/").join(rel)).map_err(reading())?;
    let mut cur = rel.to_path_buf();
    loop {
        let Some(e) = w.next_entry().map_err(reading())? else {
            if w.depth() == 0 {
                return Ok(());
            }
            w.leave().map_err(reading())?;
            cur.pop();
            continue;
        };
        let child = cur.join(&e.name);
        if ignore.excluded(&child) {
            continue;
        }
        out.push(child.clone());
        if e.kind == FileType::Directory {
            if child.components().count() > MAX_DEPTH {
                return Err(too_deep(&child));
            }
            w.enter(&e.name).map_err(reading())?;
            cur = child;
        }
    }
}

/// One thing COPY puts into an image.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub(crate) struct CopyItem {
    /// The source (file, directory or symlink, copied as what it is), relative to the source
    /// root (the tool's `CopySpec::src_root`) and resolved inside it.
    pub src: PathBuf,
    /// Absolute destination inside the image.
    pub dest: PathBuf,
}

/// The sources of one COPY/ADD resolved to items to copy.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Resolved {
    /// Sources relative to the source root, symlinks on the way resolved inside it.
    pub items: Vec<CopyItem>,
    /// Directories to create before the items (the destination directory).
    pub dirs: Vec<PathBuf>,
    /// sha256 over every item's destination, type, mode and content.
    pub digest: String,
}

/// The path of an open file relative to `root_real` (the canonical host path of the root it
/// was resolved in), through `/proc/self/fd`.
fn rel_of(fd: BorrowedFd<'_>, root_real: &Path) -> Result<PathBuf, ContextError> {
    let at = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(io_err("reading /proc/self/fd"))?;
    at.strip_prefix(root_real)
        .map(Path::to_path_buf)
        .map_err(|_| ContextError::Invalid(format!("{} is outside the source", at.display())))
}

fn root_of(root: &Path) -> Result<(Root, PathBuf), ContextError> {
    let real = root
        .canonicalize()
        .map_err(io_err(format!("opening {}", root.display())))?;
    let r = Root::open(&real).map_err(io_err(format!("opening {}", root.display())))?;
    Ok((r, real))
}

/// Resolve `sources` (already expanded words) against `root` (the build context or a stage's
/// root) to a destination.
///
/// As Docker does, a source is resolved *inside* `root`: a symlink on the way (the source
/// itself included) is followed as if `root` were `/`, so `rootlink -> /` means the root
/// itself, never the host's; `..` cannot climb out. What a directory source contains is copied
/// as it is: symlinks inside stay symlinks.
///
/// `dest` is absolute inside the image. `dest_is_dir` says whether it names a directory (it
/// ends with `/`, there are several sources or a wildcard, or it is a directory in the image).
pub(crate) fn resolve(
    root: &Path,
    sources: &[String],
    dest: &Path,
    dest_is_dir: bool,
    ignore: &Ignore,
) -> Result<Resolved, ContextError> {
    let how = How {
        dest_is_dir,
        ..How::default()
    };
    resolve_with(root, sources, dest, &how, ignore)
}

/// How [`resolve_with`] places what it finds.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct How {
    /// The destination names a directory (see [`resolve`]).
    pub dest_is_dir: bool,
    /// `COPY --parents`: each source keeps its path relative to the source root (or to a
    /// `/./` in the source, as rsync's `--relative`) under the destination, which is a
    /// directory.
    pub parents: bool,
    /// A single directory source also copies the directory itself onto the destination (its
    /// mode and owner), not only its contents: `COPY --from` to a path not yet in the image.
    pub dir_itself: bool,
}

/// Where `--parents` starts keeping a source's path: after a `/./` in it (rsync's rule), else
/// from the source root.
fn parents_base(src: &str) -> PathBuf {
    match src.split_once("/./") {
        Some((before, _)) => clean_rel(before).unwrap_or_default(),
        None => PathBuf::new(),
    }
}

/// [`resolve`] with the `--parents` and directory-itself options.
pub(crate) fn resolve_with(
    root: &Path,
    sources: &[String],
    dest: &Path,
    how: &How,
    ignore: &Ignore,
) -> Result<Resolved, ContextError> {
    let (r, real) = root_of(root)?;
    // (name it is copied under, path in the root, the part of the name --parents drops)
    let mut matched: Vec<(PathBuf, PathBuf, PathBuf)> = Vec::new();
    let mut wildcard = false;
    for src in sources {
        let base = parents_base(src);
        let Some(rel) = clean_rel(src) else {
            return Err(ContextError::Invalid(format!(
                "COPY source {src:?} is outside the build context"
            )));
        };
        let rel_s = rel.to_string_lossy().into_owned();
        if has_wildcard(&rel_s) {
            wildcard = true;
            let m = glob_path(&rel_s)?;
            let mut all = Vec::new();
            let top = r
                .open_in(Path::new(""), OFlags::RDONLY | OFlags::DIRECTORY)
                .map_err(io_err("reading the source root"))?;
            walk(top, Path::new(""), ignore, &mut all)?;
            let before = matched.len();
            for p in all.into_iter().filter(|p| m.is_match(p)) {
                // A matched symlink is followed inside the root, as BuildKit does (a dangling
                // one is copied as the link it is).
                let target = match r.open_in(&p, OFlags::PATH) {
                    Ok(fd) => rel_of(fd.as_fd(), &real)?,
                    Err(_) => p.clone(),
                };
                if target != p && !target.as_os_str().is_empty() && ignore.excluded(&target) {
                    continue;
                }
                matched.push((p, target, base.clone()));
            }
            if matched.len() == before {
                return Err(ContextError::Invalid(format!(
                    "no source files were specified: {src:?} matches nothing"
                )));
            }
        } else {
            if !rel.as_os_str().is_empty() && ignore.excluded(&rel) {
                return Err(ContextError::Invalid(format!(
                    "COPY source {src:?} is excluded by .dockerignore"
                )));
            }
            let fd = match r.open_in(&rel, OFlags::PATH) {
                Ok(fd) => fd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(ContextError::Invalid(format!(
                        "COPY source {src:?}: not found in the build context"
                    )))
                }
                Err(e) => return Err(ContextError::Invalid(format!("COPY source {src:?}: {e}"))),
            };
            let resolved = rel_of(fd.as_fd(), &real)?;
            if resolved != rel && !resolved.as_os_str().is_empty() && ignore.excluded(&resolved) {
                return Err(ContextError::Invalid(format!(
                    "COPY source {src:?} leads to {}, which is excluded by .dockerignore",
                    resolved.display()
                )));
            }
            matched.push((rel, resolved, base));
        }
    }
    let into_dir = how.dest_is_dir || how.parents || matched.len() > 1 || wildcard;
    let dir_itself = how.dir_itself && matched.len() == 1 && !how.parents;
    let mut out = Resolved::default();
    if into_dir {
        out.dirs.push(dest.to_path_buf());
    }
    for (name, rel, base) in matched {
        // --parents: the destination of this source keeps its path (from `base` on).
        let dest_buf;
        let dest = if how.parents {
            let kept = name.strip_prefix(&base).unwrap_or(&name);
            dest_buf = dest.join(kept);
            if let Some(parent) = dest_buf.parent() {
                out.dirs.push(parent.to_path_buf());
            }
            if kept.as_os_str().is_empty() {
                // The source root itself: its contents go to the destination.
                dest_buf.clone()
            } else {
                let fd = r
                    .open_in(&rel, OFlags::PATH | OFlags::NOFOLLOW)
                    .map_err(io_err(format!("reading {}", name.display())))?;
                let st = rfs::fstat(&fd)
                    .map_err(|e| io_err(format!("reading {}", name.display()))(e.into()))?;
                if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                    out.items.push(CopyItem {
                        src: rel,
                        dest: dest_buf,
                    });
                    continue;
                }
                // A directory: itself, then its contents under it.
                out.items.push(CopyItem {
                    src: rel.clone(),
                    dest: dest_buf.clone(),
                });
                dest_buf.clone()
            }
        } else {
            dest.to_path_buf()
        };
        let dest = dest.as_path();
        let fd = r
            .open_in(&rel, OFlags::PATH | OFlags::NOFOLLOW)
            .map_err(io_err(format!("reading {}", name.display())))?;
        let kind = FileType::from_raw_mode(
            rfs::fstat(&fd)
                .map_err(|e| io_err(format!("reading {}", name.display()))(e.into()))?
                .st_mode,
        );
        if kind == FileType::Directory {
            // A directory copies its contents.
            out.dirs.push(dest.to_path_buf());
            if dir_itself {
                out.items.push(CopyItem {
                    src: rel.clone(),
                    dest: dest.to_path_buf(),
                });
            }
            let dir = r
                .open_in(&rel, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW)
                .map_err(io_err(format!("reading {}", name.display())))?;
            let mut inner = Vec::new();
            walk(dir, &rel, ignore, &mut inner)?;
            for p in inner {
                let within = p.strip_prefix(&rel).unwrap_or(&p).to_path_buf();
                out.items.push(CopyItem {
                    src: p,
                    dest: dest.join(within),
                });
            }
        } else {
            let target = if into_dir {
                dest.join(name.file_name().unwrap_or_default())
            } else {
                dest.to_path_buf()
            };
            out.items.push(CopyItem {
                src: rel,
                dest: target,
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.dirs.retain(|d| seen.insert(d.clone()));
    out.digest = digest_items(root, &out.items)?;
    Ok(out)
}

/// A [`resolve_with`] (no `.dockerignore`) that the image helper carries out in the tool
/// sandbox: a stage's tree belongs to the image's ids, which the daemon's user may not be
/// allowed to read (a 0700 home directory of uid 1000) but sandbox root is.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct ResolveRequest {
    pub root: PathBuf,
    pub sources: Vec<String>,
    pub dest: PathBuf,
    pub how: How,
}

/// The helper's side of a [`ResolveRequest`] read from `file`: the [`Resolved`] as JSON.
pub(crate) fn resolve_request(file: &Path) -> Result<String, ContextError> {
    let text = fs::read(file).map_err(io_err(file.display().to_string()))?;
    let req: ResolveRequest = serde_json::from_slice(&text)?;
    let resolved = resolve_with(
        &req.root,
        &req.sources,
        &req.dest,
        &req.how,
        &Ignore::default(),
    )?;
    Ok(serde_json::to_string(&resolved)?)
}

/// Digest of what a COPY would write; the items' sources are read inside `root`.
pub(crate) fn digest_items(root: &Path, items: &[CopyItem]) -> Result<String, ContextError> {
    let (r, _) = root_of(root)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    for it in items {
        let shown = Path::new("/").join(&it.src);
        let what = || format!("reading {}", shown.display());
        let (dir, name) = r.parent(&it.src).map_err(io_err(what()))?;
        let st = rfs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err(what())(e.into()))?;
        h.update(it.dest.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(format!("{:o}", st.st_mode).as_bytes());
        h.update([0]);
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => {
                let target = rfs::readlinkat(&dir, &name, Vec::new())
                    .map_err(|e| io_err("reading a link")(e.into()))?;
                h.update(target.as_bytes());
            }
            FileType::RegularFile => {
                // Swapped for something else since the stat: nothing to read.
                if let Some((fd, _)) =
                    inroot::open_file_at(dir.as_fd(), &name).map_err(io_err(what()))?
                {
                    let mut f = std::fs::File::from(fd);
                    loop {
                        let n = f.read(&mut buf).map_err(io_err(what()))?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                    }
                }
            }
            _ => {}
        }
        h.update([0xff]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Whether `rel` inside `root` (resolved inside it) is a tar archive (plain, gzip or zstd), by
/// its first bytes.
pub(crate) fn is_archive(root: &Path, rel: &Path) -> bool {
    let Ok((r, _)) = root_of(root) else {
        return false;
    };
    let Ok(fd) = r.open_in(rel, OFlags::RDONLY | OFlags::NONBLOCK) else {
        return false;
    };
    let mut f = std::fs::File::from(fd);
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return false;
    }
    let mut head = [0u8; 512];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    head.starts_with(&[0x1f, 0x8b])
        || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || (got >= 262 && &head[257..262] == b"ustar")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore_rules() {
        let ig = Ignore::parse("# comment\nnode_modules\n*.log\n!keep.log\n/tmp/**\ndocs/*.md\n")
            .unwrap();
        let ex = |p: &str| ig.excluded(Path::new(p));
        assert!(ex("node_modules"));
        assert!(ex("node_modules/a/b.js"));
        assert!(ex("debug.log"));
        assert!(!ex("keep.log"));
        assert!(!ex("sub/debug.log"), "* does not cross /");
        assert!(ex("tmp/x/y"));
        assert!(ex("docs/a.md"));
        assert!(!ex("docs/sub/a.md"));
        assert!(!ex("src/main.rs"));
    }

    #[test]
    fn sources_wildcards_and_directories() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("src/sub")).unwrap();
        fs::write(r.join("src/a.txt"), "a").unwrap();
        fs::write(r.join("src/sub/b.txt"), "b").unwrap();
        fs::write(r.join("one.sh"), "1").unwrap();
        fs::write(r.join("two.sh"), "2").unwrap();
        fs::write(r.join("skip.log"), "x").unwrap();
        let ig = Ignore::parse("*.log\n").unwrap();
        let dests = |res: &Resolved| {
            res.items
                .iter()
                .map(|i| i.dest.display().to_string())
                .collect::<Vec<_>>()
        };

        let res = resolve(r, &["src".into()], Path::new("/app"), false, &ig).unwrap();
        assert_eq!(dests(&res), ["/app/a.txt", "/app/sub", "/app/sub/b.txt"]);
        let res = resolve(r, &["*.sh".into()], Path::new("/bin"), false, &ig).unwrap();
        assert_eq!(dests(&res), ["/bin/one.sh", "/bin/two.sh"]);
        let res = resolve(
            r,
            &["one.sh".into()],
            Path::new("/usr/local/bin/run"),
            false,
            &ig,
        )
        .unwrap();
        assert_eq!(dests(&res), ["/usr/local/bin/run"]);
        let res = resolve(r, &["one.sh".into()], Path::new("/opt"), true, &ig).unwrap();
        assert_eq!(dests(&res), ["/opt/one.sh"]);
        // The whole context, without the ignored file.
        let res = resolve(r, &[".".into()], Path::new("/ctx"), true, &ig).unwrap();
        assert!(!dests(&res).contains(&"/ctx/skip.log".to_string()));
        assert!(dests(&res).contains(&"/ctx/src/sub/b.txt".to_string()));

        let e = resolve(r, &["../etc/passwd".into()], Path::new("/x"), false, &ig).unwrap_err();
        assert_eq!(
            e.to_string(),
            "COPY source \"../etc/passwd\" is outside the build context"
        );
        let e = resolve(r, &["nope".into()], Path::new("/x"), false, &ig).unwrap_err();
        assert_eq!(
            e.to_string(),
            "COPY source \"nope\": not found in the build context"
        );
        let e = resolve(r, &["skip.log".into()], Path::new("/x"), false, &ig).unwrap_err();
        assert_eq!(
            e.to_string(),
            "COPY source \"skip.log\" is excluded by .dockerignore"
        );
        let e = resolve(r, &["*.py".into()], Path::new("/x"), false, &ig).unwrap_err();
        assert!(e.to_string().contains("matches nothing"), "{e}");
    }

    #[test]
    fn sources_resolve_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("etc/hostname"), "ctx").unwrap();
        fs::create_dir_all(r.join("dir")).unwrap();
        std::os::unix::fs::symlink("/", r.join("rootlink")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", r.join("dir/abs")).unwrap();
        std::os::unix::fs::symlink("etc/hostname", r.join("match.txt")).unwrap();
        let ig = Ignore::default();
        let src = |res: &Resolved| {
            res.items
                .iter()
                .map(|i| format!("{} {}", i.src.display(), i.dest.display()))
                .collect::<Vec<_>>()
        };
        // A link to / is the root; the final link is followed inside the root.
        let res = resolve(
            r,
            &["rootlink/etc/hostname".into()],
            Path::new("/x"),
            false,
            &ig,
        )
        .unwrap();
        assert_eq!(src(&res), ["etc/hostname /x"]);
        let res = resolve(r, &["dir/abs".into()], Path::new("/x"), false, &ig).unwrap();
        assert_eq!(src(&res), ["etc/hostname /x"]);
        // Inside a copied directory, links stay links.
        let res = resolve(r, &["dir".into()], Path::new("/d"), false, &ig).unwrap();
        assert_eq!(src(&res), ["dir/abs /d/abs"]);
        // A wildcard match that is a link is followed, named as matched.
        let res = resolve(r, &["*.txt".into()], Path::new("/w/"), true, &ig).unwrap();
        assert_eq!(src(&res), ["etc/hostname /w/match.txt"]);
        // Where the link leads must not be excluded.
        let ig = Ignore::parse("etc\n").unwrap();
        let e = resolve(r, &["dir/abs".into()], Path::new("/x"), false, &ig).unwrap_err();
        assert!(e.to_string().contains("excluded by .dockerignore"), "{e}");
        // Past 40 links: an error, not a lookup that gives up.
        for i in 1..45 {
            std::os::unix::fs::symlink(format!("c{}", i + 1), r.join(format!("c{i}"))).unwrap();
        }
        std::os::unix::fs::symlink("etc", r.join("c45")).unwrap();
        let e = resolve(
            r,
            &["c1/hostname".into()],
            Path::new("/x"),
            false,
            &Ignore::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("ELOOP"), "{e}");
    }

    #[test]
    fn parents_keep_the_source_path() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for f in ["x/a.txt", "y/a.txt", "x/sub/b.txt", "src/lib/u.c"] {
            fs::create_dir_all(r.join(f).parent().unwrap()).unwrap();
            fs::write(r.join(f), f).unwrap();
        }
        let how = How {
            parents: true,
            ..How::default()
        };
        let ig = Ignore::default();
        let items = |srcs: &[&str]| {
            let srcs: Vec<String> = srcs.iter().map(std::string::ToString::to_string).collect();
            let res = resolve_with(r, &srcs, Path::new("/p"), &how, &ig).unwrap();
            res.items
                .iter()
                .map(|i| format!("{} {}", i.src.display(), i.dest.display()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            items(&["./x/a.txt", "y/a.txt"]),
            ["x/a.txt /p/x/a.txt", "y/a.txt /p/y/a.txt"]
        );
        assert_eq!(items(&["x/./sub/*.txt"]), ["x/sub/b.txt /p/sub/b.txt"]);
        assert_eq!(
            items(&["src"]),
            [
                "src /p/src",
                "src/lib /p/src/lib",
                "src/lib/u.c /p/src/lib/u.c"
            ]
        );
        // Without --parents a single directory source copies its contents, and with
        // `dir_itself` the directory too (its mode and owner).
        let how = How {
            dir_itself: true,
            ..How::default()
        };
        let res = resolve_with(r, &["src".into()], Path::new("/d"), &how, &ig).unwrap();
        let got: Vec<String> = res
            .items
            .iter()
            .map(|i| format!("{} {}", i.src.display(), i.dest.display()))
            .collect();
        assert_eq!(got, ["src /d", "src/lib /d/lib", "src/lib/u.c /d/lib/u.c"]);
        // The helper's side: a request in a file, the answer as JSON.
        let req = ResolveRequest {
            root: r.to_path_buf(),
            sources: vec!["x/a.txt".into()],
            dest: "/one".into(),
            how: How::default(),
        };
        let file = r.join("req.json");
        fs::write(&file, serde_json::to_vec(&req).unwrap()).unwrap();
        let back: Resolved = serde_json::from_str(&resolve_request(&file).unwrap()).unwrap();
        assert_eq!(back.items[0].dest, Path::new("/one"));
        assert!(back.digest.starts_with("sha256:"));
    }

    #[test]
    fn digest_changes_with_content() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("f"), "1").unwrap();
        let ig = Ignore::default();
        let a = resolve(d.path(), &["f".into()], Path::new("/f"), false, &ig)
            .unwrap()
            .digest;
        let b = resolve(d.path(), &["f".into()], Path::new("/f"), false, &ig)
            .unwrap()
            .digest;
        assert_eq!(a, b);
        fs::write(d.path().join("f"), "2").unwrap();
        let c = resolve(d.path(), &["f".into()], Path::new("/f"), false, &ig)
            .unwrap()
            .digest;
        assert_ne!(a, c);
    }
}
