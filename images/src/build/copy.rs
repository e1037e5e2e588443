//! COPY and ADD: sources from the context, another stage or an image (resolved inside their
//! root), `ADD <url>` downloads under the build's network policy, `ADD` of local archives.

use std::path::{Path, PathBuf};

use sandbox::{NetworkMode, User};

use super::{expand, key_of, step_err, BuildError, Run};
use crate::context::{self, Ignore};
use crate::dockerfile::{self, Step};
use crate::oci;
use crate::tools::CopySpec;
use crate::view::View;

impl Run<'_> {
    pub(super) fn copy(
        &mut self,
        step: &Step,
        add: bool,
        sources: &[String],
        dest: &str,
        flags: &dockerfile::Flags,
        vars: &[(String, String)],
    ) -> Result<(), BuildError> {
        let vars = vars.to_vec();
        let lexer = self.lexer.clone();
        let budget = self.expanded.clone();
        let word = |s: &str| expand(&lexer, s, &vars, step, &budget);
        let mut srcs = Vec::new();
        for s in sources {
            srcs.push(word(s)?);
        }
        let dest_raw = word(dest)?;
        let state = self.state().clone();
        let workdir = if state.config.workdir.is_empty() {
            "/".to_string()
        } else {
            state.config.workdir.clone()
        };
        let dest_path = sandbox::paths::normalize_inside(&Path::new(&workdir).join(&dest_raw));
        let parent_view = self.builder.view_of(&state);
        let dest_is_dir = dest_raw.ends_with('/')
            || dest_raw == "."
            || parent_view.as_ref().is_some_and(|v| v.is_dir(&dest_path));

        // Where the sources come from: the context, another stage, or an image.
        let mut materialized: Option<PathBuf> = None;
        let (src_root, ignore) = match flags.get("from") {
            Some(from) => {
                let from = word(from)?;
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
                    None => self.base(&from, &oci::Platform::host())?,
                };
                let view = self.builder.view_of(&from_state).ok_or_else(|| {
                    step_err(step, format!("stage {from} has an empty filesystem"))
                })?;
                let root = match view {
                    View::Dir(root) => root,
                    layers => {
                        // Layers are copied out whole for the sources to be resolved in them.
                        let store = &self.builder.store;
                        let copy = store.tmp_path("from");
                        store
                            .tools()
                            .materialize(&layers, &store.tmp_path("view"), &copy)
                            .map_err(|e| step_err(step, e.to_string()))?;
                        materialized = Some(copy.clone());
                        copy
                    }
                };
                (root, Ignore::default())
            }
            None => (self.opts.context.clone(), std::mem::take(&mut self.ignore)),
        };

        // ADD: URLs are downloaded, local tar archives extracted; the rest is a COPY.
        let mut downloads = Vec::new();
        let mut archives = Vec::new();
        let mut plain = Vec::new();
        for s in &srcs {
            if add && (s.starts_with("http://") || s.starts_with("https://")) {
                downloads.push(s.clone());
            } else if add
                && flags.get("from").is_none()
                && context::clean_rel(s).is_some_and(|rel| context::is_archive(&src_root, &rel))
            {
                archives.push(s.clone());
            } else {
                plain.push(s.clone());
            }
        }
        if !downloads.is_empty() && self.opts.network == NetworkMode::None {
            return Err(step_err(
                step,
                format!(
                    "ADD {}: downloading is not allowed with network \"none\" (the project has \
                     no network)",
                    downloads[0]
                ),
            ));
        }
        let mut resolved = context::Resolved::default();
        let mut digest_parts = Vec::new();
        if !plain.is_empty() {
            resolved = context::resolve(
                &src_root,
                &plain,
                &dest_path,
                dest_is_dir || srcs.len() > 1,
                &ignore,
            )
            .map_err(|e| step_err(step, e.to_string()))?;
            digest_parts.push(resolved.digest.clone());
        }
        // Each archive resolved inside the context like any source (its real path in there).
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
        if flags.get("from").is_none() {
            self.ignore = ignore;
        }
        // Downloads go to a directory of their own under tmp/, copied in from there.
        let download_dir = if downloads.is_empty() {
            None
        } else {
            let dir = self.builder.store.tmp_path("download");
            std::fs::create_dir(&dir)
                .map_err(|e| step_err(step, format!("{}: {e}", dir.display())))?;
            Some(dir)
        };
        let mut fetched = Vec::new();
        let mut fetch_all = || -> Result<(), BuildError> {
            let Some(dir) = &download_dir else {
                return Ok(());
            };
            for (i, url) in downloads.iter().enumerate() {
                let file = PathBuf::from(format!("{i}"));
                crate::download::download(url, &dir.join(&file), &self.opts.download)
                    .map_err(|e| step_err(step, e))?;
                let item = crate::tools::CopyItem {
                    src: file.clone(),
                    dest: PathBuf::from(url),
                };
                let data_digest = context::digest_items(dir, &[item])
                    .map_err(|e| step_err(step, e.to_string()))?;
                digest_parts.push(data_digest);
                let name = url
                    .rsplit('/')
                    .next()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("index.html");
                let target = if dest_is_dir {
                    dest_path.join(name)
                } else {
                    dest_path.clone()
                };
                fetched.push(crate::tools::CopyItem {
                    src: file,
                    dest: target,
                });
            }
            Ok(())
        };
        if let Err(e) = fetch_all() {
            if let Some(dir) = &download_dir {
                let _ = std::fs::remove_dir_all(dir);
            }
            if let Some(copy) = &materialized {
                self.builder.store.abort(copy);
            }
            return Err(e);
        }

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
        let from_key = match flags.get("from") {
            Some(_) => format!("{}", src_root.display()),
            None => String::new(),
        };
        let key = key_of(&[
            &state.key,
            if add { "ADD" } else { "COPY" },
            &dest_path.display().to_string(),
            &format!("{dest_is_dir}"),
            &format!("{uid}:{gid}"),
            &format!("{chmod:?}"),
            &from_key,
            &digest_parts.join(","),
        ]);
        let result = self.fs_step(key, |run, tmp| {
            let tools = run.builder.store.tools();
            let target = run.builder.store.target(tmp);
            let mut dirs = resolved.dirs.clone();
            if dest_is_dir && dirs.is_empty() {
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
            };
            let spec_file = run.builder.store.tmp_path("copy-spec");
            let r = tools.copy_in(&spec, &spec_file, &target);
            let _ = std::fs::remove_file(&spec_file);
            r.map_err(|e| step_err(step, e.to_string()))?;
            if let Some(dir) = &download_dir {
                let spec = CopySpec {
                    src_root: dir.clone(),
                    items: fetched.clone(),
                    chmod: chmod.or(Some(0o600)),
                    dirs: Vec::new(),
                    ..spec
                };
                let spec_file = run.builder.store.tmp_path("copy-spec");
                let r = tools.copy_in(&spec, &spec_file, &target);
                let _ = std::fs::remove_file(&spec_file);
                r.map_err(|e| step_err(step, e.to_string()))?;
            }
            for a in &archive_paths {
                tools
                    .extract(&src_root, a, &target, &dest_path)
                    .map_err(|e| step_err(step, e.to_string()))?;
            }
            Ok(())
        });
        if let Some(dir) = download_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some(copy) = materialized {
            self.builder.store.abort(&copy);
        }
        result
    }
}
