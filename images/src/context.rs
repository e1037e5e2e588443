//! The build context: `.dockerignore`, resolving COPY/ADD sources (wildcards, a directory copies
//! its contents), and the content digest that goes into a step's cache key.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use globset::GlobMatcher;
use sha2::{Digest as _, Sha256};

use crate::tools::CopyItem;

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ContextError {
    let what = what.into();
    move |source| ContextError::Io { what, source }
}

/// `.dockerignore` rules: later rules win, `!` re-includes, a matched directory excludes
/// everything under it.
#[derive(Debug, Default)]
pub struct Ignore {
    rules: Vec<(GlobMatcher, bool)>,
}

/// Clean a relative path: no leading `/` or `./`, `..` resolved (never above the start).
pub fn clean_rel(p: &str) -> Option<PathBuf> {
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
    pub fn parse(text: &str) -> Result<Ignore, ContextError> {
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

    /// Read `<context>/.dockerignore` (none: nothing ignored).
    pub fn load(context: &Path) -> Result<Ignore, ContextError> {
        match fs::read_to_string(context.join(".dockerignore")) {
            Ok(t) => Ignore::parse(&t),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Ignore::default()),
            Err(e) => Err(io_err(".dockerignore")(e)),
        }
    }

    /// Whether `rel` (relative to the context) is excluded.
    pub fn excluded(&self, rel: &Path) -> bool {
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

/// Every path under `dir` (relative to `base`), parents before children, not following links.
fn walk(
    base: &Path,
    dir: &Path,
    ignore: &Ignore,
    out: &mut Vec<PathBuf>,
) -> Result<(), ContextError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io_err(format!("reading {}", dir.display())))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path.strip_prefix(base).unwrap_or(&path).to_path_buf();
        if ignore.excluded(&rel) {
            continue;
        }
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        out.push(rel);
        if is_dir {
            walk(base, &path, ignore, out)?;
        }
    }
    Ok(())
}

/// The sources of one COPY/ADD resolved to items to copy.
#[derive(Debug, Default)]
pub struct Resolved {
    pub items: Vec<CopyItem>,
    /// Directories to create before the items (the destination directory).
    pub dirs: Vec<PathBuf>,
    /// sha256 over every item's destination, type, mode and content.
    pub digest: String,
}

/// Resolve `sources` (already expanded words) against `root` to a destination.
///
/// `dest` is absolute inside the image. `dest_is_dir` says whether it names a directory (it
/// ends with `/`, there are several sources or a wildcard, or it is a directory in the image).
pub fn resolve(
    root: &Path,
    sources: &[String],
    dest: &Path,
    dest_is_dir: bool,
    ignore: &Ignore,
) -> Result<Resolved, ContextError> {
    let mut matched: Vec<PathBuf> = Vec::new();
    let mut wildcard = false;
    for src in sources {
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
            walk(root, root, ignore, &mut all)?;
            let before = matched.len();
            matched.extend(all.into_iter().filter(|p| m.is_match(p)));
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
            if fs::symlink_metadata(root.join(&rel)).is_err() {
                return Err(ContextError::Invalid(format!(
                    "COPY source {src:?}: not found in the build context"
                )));
            }
            matched.push(rel);
        }
    }
    let into_dir = dest_is_dir || matched.len() > 1 || wildcard;
    let mut out = Resolved::default();
    if into_dir {
        out.dirs.push(dest.to_path_buf());
    }
    for rel in matched {
        let host = root.join(&rel);
        let meta =
            fs::symlink_metadata(&host).map_err(io_err(format!("reading {}", rel.display())))?;
        if meta.is_dir() {
            // A directory copies its contents.
            out.dirs.push(dest.to_path_buf());
            let mut inner = Vec::new();
            walk(root, &host, ignore, &mut inner)?;
            for p in inner {
                let within = p.strip_prefix(&rel).unwrap_or(&p).to_path_buf();
                out.items.push(CopyItem {
                    src: root.join(&p),
                    dest: dest.join(within),
                });
            }
        } else {
            let target = if into_dir {
                dest.join(rel.file_name().unwrap_or_default())
            } else {
                dest.to_path_buf()
            };
            out.items.push(CopyItem {
                src: host,
                dest: target,
            });
        }
    }
    out.dirs.dedup();
    out.digest = digest_items(&out.items)?;
    Ok(out)
}

/// Digest of what a COPY would write.
pub fn digest_items(items: &[CopyItem]) -> Result<String, ContextError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    for it in items {
        let meta = fs::symlink_metadata(&it.src)
            .map_err(io_err(format!("reading {}", it.src.display())))?;
        h.update(it.dest.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(format!("{:o}", meta.mode()).as_bytes());
        h.update([0]);
        if meta.file_type().is_symlink() {
            h.update(
                fs::read_link(&it.src)
                    .map_err(io_err("reading a link"))?
                    .as_os_str()
                    .as_encoded_bytes(),
            );
        } else if meta.is_file() {
            let mut f =
                fs::File::open(&it.src).map_err(io_err(format!("reading {}", it.src.display())))?;
            loop {
                let n = f
                    .read(&mut buf)
                    .map_err(io_err(format!("reading {}", it.src.display())))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
        h.update([0xff]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
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
