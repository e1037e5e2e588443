//! COPY and ADD: sources from the context, another stage or an image (resolved inside their
//! root), heredocs (`COPY <<EOF /etc/app.conf`), `ADD <url>` downloads under the build's
//! network policy (with `--checksum`), `ADD` of local archives.
//!
//! Flags: `--from`, `--chown`, `--chmod`, `--parents` (COPY: sources keep their path),
//! `--link` (accepted; the copy is the same as without it: every step is its own snapshot
//! already), `--checksum` (ADD of a URL). Git sources are refused. Files from another stage or
//! image keep their owner unless `--chown` is given, as Docker does; from the context and
//! heredocs they are root's.

use std::io::Read;
use std::path::{Path, PathBuf};

use sandbox::{NetworkMode, User};

use super::words::expand_heredoc;
use super::{expand, key_of, step_err, BuildError, Run};
use crate::context::{self, Ignore};
use crate::dockerfile::{self, Heredoc, Step};
use crate::oci;
use crate::tools::{CopyItem, CopySpec};
use crate::view::View;

/// Whether an ADD source is a git repository, as BuildKit tells them: `git://`, `ssh://`,
/// scp-like `user@host:path`, or an http(s) URL whose path ends in `.git`.
pub(crate) fn is_git_source(s: &str) -> bool {
    if s.starts_with("git://") || s.starts_with("ssh://") {
        return true;
    }
    if let Some(rest) = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
    {
        let path = rest.split(['?', '#']).next().unwrap_or("");
        return path.contains('/') && path.ends_with(".git");
    }
    // user@host:path (no scheme).
    if let Some((user, after)) = s.split_once('@') {
        let user_ok = !user.is_empty()
            && user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        let host_ok = after
            .split_once(':')
            .is_some_and(|(host, _)| !host.is_empty() && !host.contains('/'));
        return user_ok && host_ok;
    }
    false
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// A `--checksum` value that is not `ALGO:HEX` of a known algorithm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid --checksum {0:?}: expected sha256:HEX (or sha384:, sha512:) with the \
     digest in hexadecimal"
)]
struct BadChecksum(String);

/// An expected digest `ALGO:HEX` (`--checksum`): sha256, sha384 or sha512.
struct Checksum {
    algo: String,
    hex: String,
}

impl Checksum {
    fn parse(s: &str) -> Result<Checksum, BadChecksum> {
        let bad = || BadChecksum(s.to_string());
        let (algo, hex) = s.split_once(':').ok_or_else(bad)?;
        let len = match algo {
            "sha256" => 64,
            "sha384" => 96,
            "sha512" => 128,
            _ => return Err(bad()),
        };
        if hex.len() != len || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(Checksum {
            algo: algo.into(),
            hex: hex.to_ascii_lowercase(),
        })
    }

    /// The digest of `file` with this checksum's algorithm, as `ALGO:HEX`.
    fn digest_of(&self, file: &Path) -> std::io::Result<String> {
        fn hash<D: sha2::Digest>(mut f: std::fs::File) -> std::io::Result<String> {
            let mut h = D::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            Ok(hex::encode(h.finalize()))
        }
        let f = std::fs::File::open(file)?;
        let hex = match self.algo.as_str() {
            "sha384" => hash::<sha2::Sha384>(f)?,
            "sha512" => hash::<sha2::Sha512>(f)?,
            _ => hash::<sha2::Sha256>(f)?,
        };
        Ok(format!("{}:{hex}", self.algo))
    }

    fn text(&self) -> String {
        format!("{}:{}", self.algo, self.hex)
    }
}

/// Write each heredoc's body (expanded already) to `dir/<index>` (mode 0644, as BuildKit
/// makes them) and say where each goes: `dest/<delimiter>` into a directory, else `dest`.
fn write_heredocs(
    dir: &Path,
    bodies: &[(String, String)],
    dest: &Path,
    into_dir: bool,
) -> std::io::Result<Vec<CopyItem>> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir(dir)?;
    let mut items = Vec::new();
    for (i, (name, body)) in bodies.iter().enumerate() {
        let file = PathBuf::from(format!("{i}"));
        let path = dir.join(&file);
        std::fs::write(&path, body)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        let target = if into_dir {
            let plain = Path::new(name)
                .file_name()
                .map_or_else(|| PathBuf::from(format!("heredoc-{i}")), PathBuf::from);
            dest.join(plain)
        } else {
            dest.to_path_buf()
        };
        items.push(CopyItem {
            src: file,
            dest: target,
        });
    }
    Ok(items)
}

impl Run<'_> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn copy(
        &mut self,
        step: &Step,
        add: bool,
        sources: &[String],
        heredocs: &[Heredoc],
        dest: &str,
        flags: &dockerfile::Flags,
        vars: &[(String, String)],
    ) -> Result<(), BuildError> {
        let name = if add { "ADD" } else { "COPY" };
        let vars = vars.to_vec();
        let lexer = self.lexer.clone();
        let budget = self.expanded.clone();
        let word = |s: &str| expand(&lexer, s, &vars, step, &budget);
        let mut srcs = Vec::new();
        for s in sources {
            srcs.push(word(s)?);
        }
        let mut bodies = Vec::new();
        for h in heredocs {
            bodies.push((h.name.clone(), expand_heredoc(h, &vars, step, &budget)?));
        }
        let dest_raw = word(dest)?;
        let from = match flags.get("from") {
            Some(f) => Some(word(f)?),
            None => None,
        };
        let parents = flags.enabled("parents");
        let checksum = match flags.get("checksum") {
            Some(c) => Some(Checksum::parse(&word(c)?).map_err(|e| step_err(step, e.to_string()))?),
            None => None,
        };
        if add {
            if let Some(g) = srcs.iter().find(|s| is_git_source(s)) {
                return Err(step_err(
                    step,
                    format!(
                        "ADD {g}: git sources are not supported; clone the repository into the \
                         build context (or RUN git clone) instead"
                    ),
                ));
            }
        }
        if checksum.is_some() && (srcs.len() != 1 || !is_url(&srcs[0]) || !bodies.is_empty()) {
            return Err(step_err(
                step,
                "ADD --checksum needs exactly one source, an http(s) URL",
            ));
        }
        let state = self.state().clone();
        let workdir = if state.config.workdir.is_empty() {
            "/".to_string()
        } else {
            state.config.workdir.clone()
        };
        let dest_path = sandbox::paths::normalize_inside(&Path::new(&workdir).join(&dest_raw));
        let parent_view = self.builder.view_of(&state);
        let dest_exists = parent_view.as_ref().is_some_and(|v| v.is_dir(&dest_path));
        let dest_is_dir = dest_raw.ends_with('/') || dest_raw == "." || dest_exists;
        let into_dir = dest_is_dir || parents || srcs.len() + bodies.len() > 1;

        // Where the sources come from: the context, another stage, or an image. A stage seen
        // through layers (overlay store) is resolved and keyed in a read-only mount of them;
        // it is copied out whole only if the step runs (an unchanged rebuild copies nothing).
        let mut from_layers: Option<View> = None;
        let (src_root, ignore, from_key) = match &from {
            Some(from) => {
                let from_state = match from.parse::<usize>() {
                    Ok(i) => self.stages.get(i).map(|(_, s)| s.clone()),
                    Err(_) => self
                        .stages
                        .iter()
                        .find(|(n, _)| n.as_deref() == Some(from.to_ascii_lowercase().as_str()))
                        .map(|(_, s)| s.clone()),
                };
                let from_state = match from_state {
                    Some(s) => s,
                    None => self.base(from, &oci::Platform::host())?,
                };
                let view = self.builder.view_of(&from_state).ok_or_else(|| {
                    step_err(step, format!("stage {from} has an empty filesystem"))
                })?;
                let root = match view {
                    View::Dir(root) => root,
                    layers => {
                        from_layers = Some(layers);
                        self.builder.store.tmp_path("view")
                    }
                };
                // The stage's key names its content (owners included).
                (root, Ignore::default(), format!("from {}", from_state.key))
            }
            None => (
                self.opts.context.clone(),
                std::mem::take(&mut self.ignore),
                String::new(),
            ),
        };
        let cleanup_from = |_: &Self| {
            if from_layers.is_some() {
                // The (empty) mount point of the layers, if it was made.
                let _ = std::fs::remove_dir(&src_root);
            }
        };

        // ADD: URLs are downloaded, local tar archives extracted; the rest is a COPY.
        let mut downloads = Vec::new();
        let mut archives = Vec::new();
        let mut plain = Vec::new();
        for s in &srcs {
            if add && is_url(s) {
                downloads.push(s.clone());
            } else if add
                && from.is_none()
                && context::clean_rel(s).is_some_and(|rel| context::is_archive(&src_root, &rel))
            {
                archives.push(s.clone());
            } else {
                plain.push(s.clone());
            }
        }
        if !downloads.is_empty() && self.opts.network == NetworkMode::None {
            cleanup_from(self);
            return Err(step_err(
                step,
                format!(
                    "ADD {}: downloading is not allowed with network \"none\" (the project has \
                     no network)",
                    downloads[0]
                ),
            ));
        }
        let resolve_all = || -> Result<_, BuildError> {
            let mut resolved = context::Resolved::default();
            let mut digest_parts = Vec::new();
            if !plain.is_empty() {
                let how = context::How {
                    dest_is_dir: into_dir,
                    parents,
                    // From a stage to a new path, the directory itself comes along (owner, mode).
                    dir_itself: from.is_some() && !dest_exists,
                };
                resolved = if from.is_some() {
                    // Inside the tool sandbox: the stage's files are the image's ids'.
                    let request = context::ResolveRequest {
                        root: src_root.clone(),
                        sources: plain.clone(),
                        dest: dest_path.clone(),
                        how,
                    };
                    let store = &self.builder.store;
                    let file = store.tmp_path("resolve");
                    match &from_layers {
                        Some(layers) => store
                            .tools()
                            .resolve_in_view(layers, &src_root, &request, &file),
                        None => store.tools().resolve(&request, &file),
                    }
                    .map_err(|e| step_err(step, e.to_string()))?
                } else {
                    context::resolve_with(&src_root, &plain, &dest_path, &how, &ignore)
                        .map_err(|e| step_err(step, e.to_string()))?
                };
                digest_parts.push(resolved.digest.clone());
            }
            // Each archive resolved inside the context like any source (its real path there).
            let mut archive_paths = Vec::new();
            for a in &archives {
                let r = context::resolve(
                    &src_root,
                    std::slice::from_ref(a),
                    &dest_path,
                    false,
                    &ignore,
                )
                .map_err(|e| step_err(step, e.to_string()))?;
                digest_parts.push(r.digest);
                if let Some(item) = r.items.into_iter().next() {
                    archive_paths.push(item.src);
                }
            }
            Ok((resolved, digest_parts, archive_paths))
        };
        let (resolved, mut digest_parts, archive_paths) = match resolve_all() {
            Ok(r) => r,
            Err(e) => {
                if from.is_none() {
                    self.ignore = ignore;
                }
                cleanup_from(self);
                return Err(e);
            }
        };
        if from.is_none() {
            self.ignore = ignore;
        }

        // Heredocs and downloads go to directories of their own under tmp/, copied from there.
        let heredoc_dir = (!bodies.is_empty()).then(|| self.builder.store.tmp_path("heredoc"));
        let download_dir = (!downloads.is_empty()).then(|| self.builder.store.tmp_path("download"));
        let mut heredoc_items = Vec::new();
        let mut fetched = Vec::new();
        let mut prepare = || -> Result<(), BuildError> {
            if let Some(dir) = &heredoc_dir {
                heredoc_items = write_heredocs(dir, &bodies, &dest_path, into_dir)
                    .map_err(|e| step_err(step, format!("writing the heredocs: {e}")))?;
                digest_parts.push(
                    context::digest_items(dir, &heredoc_items)
                        .map_err(|e| step_err(step, e.to_string()))?,
                );
            }
            let Some(dir) = &download_dir else {
                return Ok(());
            };
            std::fs::create_dir(dir)
                .map_err(|e| step_err(step, format!("{}: {e}", dir.display())))?;
            for (i, url) in downloads.iter().enumerate() {
                let file = PathBuf::from(format!("{i}"));
                crate::download::download(url, &dir.join(&file), &self.opts.download)
                    .map_err(|e| step_err(step, e.to_string()))?;
                if let Some(want) = &checksum {
                    let got = want
                        .digest_of(&dir.join(&file))
                        .map_err(|e| step_err(step, format!("ADD {url}: {e}")))?;
                    if got != want.text() {
                        return Err(step_err(
                            step,
                            format!(
                                "ADD {url}: checksum mismatch: expected {}, got {got}",
                                want.text()
                            ),
                        ));
                    }
                }
                let item = CopyItem {
                    src: file.clone(),
                    dest: PathBuf::from(url),
                };
                let data_digest = context::digest_items(dir, &[item])
                    .map_err(|e| step_err(step, e.to_string()))?;
                digest_parts.push(data_digest);
                let name = url
                    .split(['?', '#'])
                    .next()
                    .unwrap_or(url)
                    .rsplit('/')
                    .next()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("index.html");
                let target = if into_dir {
                    dest_path.join(name)
                } else {
                    dest_path.clone()
                };
                fetched.push(CopyItem {
                    src: file,
                    dest: target,
                });
            }
            Ok(())
        };
        let prepared = prepare();
        let cleanup = |run: &Self| {
            for dir in [&heredoc_dir, &download_dir].into_iter().flatten() {
                let _ = crate::walk::remove_path(dir);
            }
            cleanup_from(run);
        };
        if let Err(e) = prepared {
            cleanup(self);
            return Err(e);
        }

        let owner = || -> Result<(Option<String>, u32, u32, Option<u32>), BuildError> {
            let chown = match flags.get("chown") {
                Some(c) => Some(word(c)?),
                None => None,
            };
            let (uid, gid) = match &chown {
                None => (0, 0),
                Some(spec) => {
                    let resolved_user = match &parent_view {
                        Some(v) => v.resolve_user(&User::Spec(spec.clone())),
                        None => sandbox::ResolvedUser::from_numeric(spec).ok_or_else(|| {
                            sandbox::Error::User {
                                spec: spec.clone(),
                                reason: "only numeric ids work in an empty image".into(),
                            }
                        }),
                    }
                    .map_err(|e| step_err(step, format!("--chown: {e}")))?;
                    (resolved_user.uid, resolved_user.gid)
                }
            };
            let chmod = match flags.get("chmod") {
                Some(m) => Some(
                    u32::from_str_radix(&word(m)?, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| {
                            step_err(
                                step,
                                format!("invalid --chmod {m:?}: expected an octal mode"),
                            )
                        })?,
                ),
                None => None,
            };
            Ok((chown, uid, gid, chmod))
        };
        let (chown, uid, gid, chmod) = match owner() {
            Ok(o) => o,
            Err(e) => {
                cleanup(self);
                return Err(e);
            }
        };
        // From another stage or image, files keep their owners unless --chown says otherwise.
        let source_owners = from.is_some() && chown.is_none();
        let key = key_of(&[
            &state.key,
            name,
            &dest_path.display().to_string(),
            &format!("{into_dir}"),
            &format!("{uid}:{gid}"),
            &format!("{chmod:?}"),
            &from_key,
            &digest_parts.join(","),
            if parents { "parents" } else { "" },
            if source_owners { "source owners" } else { "" },
        ]);
        let result = self.fs_step(key, |run, tmp| {
            // A stage seen through layers is read from a read-only mount of them, beside the
            // target (the step missed): only the sources are copied, never the whole stage.
            let view_mount = from_layers
                .as_ref()
                .map(|layers| (layers, run.builder.store.tmp_path("view")));
            let src_root = match &view_mount {
                Some((_, mountpoint)) => mountpoint.clone(),
                None => src_root.clone(),
            };
            let r = (|| {
                let tools = run.builder.store.tools();
                let target = run.builder.store.target(tmp);
                let copy_in = |spec: &CopySpec| {
                    let spec_file = run.builder.store.tmp_path("copy-spec");
                    let r = tools.copy_in(spec, &spec_file, &target);
                    let _ = std::fs::remove_file(&spec_file);
                    r.map_err(|e| step_err(step, e.to_string()))
                };
                let copy_from_stage = |spec: &CopySpec| match &view_mount {
                    Some((layers, mountpoint)) => {
                        let spec_file = run.builder.store.tmp_path("copy-spec");
                        let r =
                            tools.copy_in_from_view(spec, &spec_file, &target, layers, mountpoint);
                        let _ = std::fs::remove_file(&spec_file);
                        r.map_err(|e| step_err(step, e.to_string()))
                    }
                    None => copy_in(spec),
                };
                let mut dirs = resolved.dirs.clone();
                if into_dir && dirs.is_empty() {
                    dirs.push(dest_path.clone());
                }
                let spec = CopySpec {
                    root: tmp.to_path_buf(),
                    src_root: src_root.clone(),
                    items: resolved.items.clone(),
                    uid,
                    gid,
                    chmod,
                    owners: tools.keeps_owners(),
                    dirs,
                    source_owners,
                };
                copy_from_stage(&spec)?;
                if let Some(dir) = &heredoc_dir {
                    copy_in(&CopySpec {
                        src_root: dir.clone(),
                        items: heredoc_items.clone(),
                        dirs: Vec::new(),
                        source_owners: false,
                        ..spec.clone()
                    })?;
                }
                if let Some(dir) = &download_dir {
                    copy_in(&CopySpec {
                        src_root: dir.clone(),
                        items: fetched.clone(),
                        chmod: chmod.or(Some(0o600)),
                        dirs: Vec::new(),
                        source_owners: false,
                        ..spec.clone()
                    })?;
                }
                for a in &archive_paths {
                    tools
                        .extract(&src_root, a, &target, &dest_path)
                        .map_err(|e| step_err(step, e.to_string()))?;
                }
                Ok(())
            })();
            if let Some((_, mountpoint)) = &view_mount {
                // The (empty) mount point goes, whatever happened.
                let _ = std::fs::remove_dir(mountpoint);
            }
            r
        });
        cleanup(self);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_sources() {
        for g in [
            "https://github.com/x/y.git",
            "https://github.com/x/y.git#main",
            "http://example.com/r.git?x=1",
            "git://example.com/r",
            "ssh://git@example.com/r",
            "git@github.com:x/y.git",
            "user@host:path",
        ] {
            assert!(is_git_source(g), "{g}");
        }
        for n in [
            "https://example.com/a.tar.gz",
            "https://example.com/.git/x",
            "https://example.com",
            "src/a.git",
            "file@2x.png",
            "a:b",
            "github.com/x/y",
        ] {
            assert!(!is_git_source(n), "{n}");
        }
    }

    #[test]
    fn checksums() {
        let hex = "a".repeat(64);
        let c = Checksum::parse(&format!("sha256:{}", hex.to_uppercase())).unwrap();
        assert_eq!(c.text(), format!("sha256:{hex}"));
        assert!(Checksum::parse("sha256:abc").is_err());
        assert!(Checksum::parse(&format!("md5:{hex}")).is_err());
        assert!(Checksum::parse(&hex).is_err());
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), "hello\n").unwrap();
        assert_eq!(
            c.digest_of(&d.path().join("f")).unwrap(),
            "sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
    }
}
