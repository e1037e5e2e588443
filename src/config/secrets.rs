//! The `secrets` key: what `RUN --mount=type=secret,id=ID` may read.
//!
//! ```json
//! "secrets": {
//!   "npm_token": "/etc/mistry/secrets/npm_token",
//!   "deploy_key": {"src": "secrets/deploy_key", "projects": ["site"]}
//! }
//! ```
//!
//! An id maps to a file on the host, read by the daemon when a step uses it (a relative path is
//! relative to the configuration file's directory); `projects` limits which projects' Dockerfiles
//! may use it (default: all). Only the operator's configuration names secrets: a project's
//! `.mistry.json` cannot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum RawSecret {
    Path(PathBuf),
    Full(FullSecret),
}

/// A secret written as an object: `{"src": FILE, "projects": [...]}`.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct FullSecret {
    src: PathBuf,
    #[serde(default)]
    projects: Option<Vec<String>>,
}

/// One configured secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// The file holding it.
    pub src: PathBuf,
    /// The projects that may use it; None: every project.
    pub projects: Option<Vec<String>>,
}

/// Validate the `secrets` key.
pub(super) fn parse(
    raw: &BTreeMap<String, RawSecret>,
    base_dir: &Path,
) -> Result<BTreeMap<String, Secret>> {
    let mut out = BTreeMap::new();
    for (id, s) in raw {
        if id.is_empty() || id.contains('/') || id == "." || id == ".." {
            bail!("secrets: invalid id {id:?}");
        }
        let (src, projects) = match s {
            RawSecret::Path(p) => (p.clone(), None),
            RawSecret::Full(FullSecret { src, projects }) => (src.clone(), projects.clone()),
        };
        if src.as_os_str().is_empty() {
            bail!("secrets.{id}: empty path");
        }
        out.insert(
            id.clone(),
            Secret {
                src: base_dir.join(src),
                projects,
            },
        );
    }
    Ok(out)
}

/// The secrets `project` may use: (id, file).
pub(super) fn for_project(all: &BTreeMap<String, Secret>, project: &str) -> Vec<(String, PathBuf)> {
    all.iter()
        .filter(|(_, s)| {
            s.projects
                .as_ref()
                .is_none_or(|p| p.iter().any(|n| n == project))
        })
        .map(|(id, s)| (id.clone(), s.src.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_project_lists() {
        let raw: BTreeMap<String, RawSecret> =
            serde_json::from_str(r#"{"a": "/s/a", "b": {"src": "rel/b", "projects": ["p"]}}"#)
                .unwrap();
        let all = parse(&raw, Path::new("/etc/mistry")).unwrap();
        assert_eq!(
            for_project(&all, "p"),
            vec![
                ("a".to_string(), PathBuf::from("/s/a")),
                ("b".to_string(), PathBuf::from("/etc/mistry/rel/b"))
            ]
        );
        assert_eq!(
            for_project(&all, "q"),
            vec![("a".to_string(), PathBuf::from("/s/a"))]
        );
        let bad: BTreeMap<String, RawSecret> = serde_json::from_str(r#"{"a/b": "/x"}"#).unwrap();
        assert_eq!(
            parse(&bad, Path::new("/")).unwrap_err().to_string(),
            "secrets: invalid id \"a/b\""
        );
    }
}
