//! What a FROM starts with: an earlier stage, `scratch`, or a base image from the configured
//! sources (local OCI layouts, then registries, see [`BaseSources`]), whose layers are unpacked
//! into snapshots (one per layer, shared by every image on them).

use std::path::PathBuf;

use super::{key_of, total_message, BuildError, Run, State, MAX_EXPANDED_TOTAL};
use crate::config::ImageConfig;
use crate::oci;
use crate::source::{BaseSource, LocalImages};

/// Where `FROM` finds base images, in order: `scratch`, the OCI layouts in `images_dir`
/// (`FROM name[:tag]` is `<images_dir>/name`), then registries.
#[derive(Debug, Clone, Default)]
pub struct BaseSources {
    /// A directory of OCI layouts asked before any registry; `None`: registries only.
    pub images_dir: Option<PathBuf>,
    /// Registry settings (insecure hosts, credentials).
    pub registries: crate::registry::RegistryConfig,
}

impl BaseSources {
    /// The sources, in the order they are asked.
    pub(super) fn into_list(self) -> Vec<Box<dyn BaseSource>> {
        let mut list: Vec<Box<dyn BaseSource>> = Vec::new();
        if let Some(dir) = self.images_dir {
            list.push(Box::new(LocalImages { dir }));
        }
        list.push(Box::new(crate::registry::Registries {
            config: self.registries,
        }));
        list
    }
}

impl Run<'_> {
    /// The state a FROM starts with: an earlier stage, scratch, or a base image.
    pub(super) fn base(
        &mut self,
        reference: &str,
        platform: &oci::Platform,
    ) -> Result<State, BuildError> {
        let lower = reference.to_ascii_lowercase();
        let earlier = self
            .stages
            .iter()
            .rev()
            .find(|(n, _)| n.as_deref() == Some(lower.as_str()))
            .map(|(_, s)| s.clone());
        if let Some(s) = earlier {
            self.say(format!(" ---> stage {reference}"))?;
            // A stage built on another copies its config: count what it carries against the
            // substitution budget, so chains of stages cannot multiply a large ENV or LABEL.
            let carried = s.config.env.iter().map(String::len).sum::<usize>()
                + s.config
                    .labels
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
                + s.args.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
            let total = self.expanded.get().saturating_add(carried);
            self.expanded.set(total);
            if total > MAX_EXPANDED_TOTAL {
                return Err(BuildError::Base {
                    image: reference.to_string(),
                    message: total_message(),
                });
            }
            return Ok(s);
        }
        if lower == "scratch" {
            return Ok(State {
                key: key_of(&["scratch"]),
                snapshot: None,
                config: ImageConfig::default(),
                args: Vec::new(),
                cmd_from_this_stage: false,
            });
        }
        let store = &self.builder.store;
        let mut fetched = None;
        for source in &self.builder.sources {
            match source.fetch(reference, store, self.opts.no_cache, platform) {
                Ok(Some(f)) => {
                    fetched = Some(f);
                    break;
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(BuildError::Fetch {
                        image: reference.to_string(),
                        source: Box::new(source),
                    })
                }
            }
        }
        let Some(base) = fetched else {
            return Err(BuildError::Base {
                image: reference.to_string(),
                message: "not found in the local images directory or any configured registry"
                    .into(),
            });
        };
        self.say(format!(" ---> {} ({})", base.origin, base.manifest_digest))?;
        // One snapshot per layer, keyed by the chain of layer digests (shared by every image
        // with the same lower layers).
        let mut key = key_of(&["base"]);
        let mut snapshot: Option<String> = None;
        for (digest, blob) in &base.layers {
            key = key_of(&["layer", &key, digest]);
            self.used.blobs.push(digest.clone());
            if !store.has_snapshot(&key) {
                let tmp = store.begin(snapshot.as_deref())?;
                match store.tools().apply_layer(blob, digest, &store.target(&tmp)) {
                    Ok(applied) => {
                        if applied.skipped_devices > 0 {
                            self.say(format!(
                                " ---> layer {digest}: {} device nodes skipped",
                                applied.skipped_devices
                            ))?;
                        }
                    }
                    Err(e) => {
                        store.abort(&tmp);
                        return Err(BuildError::Base {
                            image: reference.to_string(),
                            message: e.to_string(),
                        });
                    }
                }
                store.commit(&tmp, &key)?;
            }
            self.used.snapshots.push(key.clone());
            snapshot = Some(key.clone());
        }
        let mut config = base.config;
        config.onbuild = base.onbuild;
        let key = key_of(&["image", &key, &base.manifest_digest]);
        Ok(State {
            key,
            snapshot,
            config,
            args: Vec::new(),
            cmd_from_this_stage: false,
        })
    }
}
