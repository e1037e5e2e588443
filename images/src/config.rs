//! The image configuration a build produces and jobs run with: environment, working directory,
//! user, entrypoint and command, and the metadata Docker keeps (labels, ports, volumes, stop
//! signal, healthcheck, ONBUILD triggers, shell).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The default SHELL of RUN and of shell-form CMD/ENTRYPOINT.
pub(crate) fn default_shell() -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into()]
}

/// An image's config: what the Dockerfile's metadata instructions (or a base image's OCI
/// config) set, stored with each step record as JSON (these field names).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageConfig {
    /// `K=V` entries, in order.
    pub env: Vec<String>,
    /// The working directory of RUN steps and the job (absolute); empty: `/`.
    pub workdir: String,
    /// The `USER` value (`name`, `uid`, `name:group`, `uid:gid`); empty: root.
    pub user: String,
    /// ENTRYPOINT as argv (a shell-form one is `SHELL` + the text); `None` when never set.
    pub entrypoint: Option<Vec<String>>,
    /// CMD as argv; `None` when never set (a later ENTRYPOINT clears one from the base).
    pub cmd: Option<Vec<String>>,
    /// LABELs (and MAINTAINER's `maintainer`); a later value of a key replaces it.
    pub labels: BTreeMap<String, String>,
    /// EXPOSEd ports as `port/proto` (`80/tcp`), without duplicates.
    pub exposed_ports: Vec<String>,
    /// VOLUME paths, without duplicates (recorded only: mistry mounts nothing there).
    pub volumes: Vec<String>,
    /// STOPSIGNAL's value; `None` when never set.
    pub stop_signal: Option<String>,
    /// HEALTHCHECK as Docker's JSON (`{"Test": ["CMD", ...], "interval": ...}`; `Test` is
    /// `["NONE"]` for `HEALTHCHECK NONE`); recorded only.
    pub healthcheck: Option<serde_json::Value>,
    /// ONBUILD triggers, as written; run by a build `FROM` this image.
    pub onbuild: Vec<String>,
    /// The SHELL for shell-form commands; empty: `/bin/sh -c` (see [`ImageConfig::shell()`]).
    pub shell: Vec<String>,
}

impl ImageConfig {
    /// The environment as pairs.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.clone(), String::new()),
            })
            .collect()
    }

    /// Set (or replace) one variable, keeping the order of first definition.
    pub fn set_env(&mut self, key: &str, value: &str) {
        let entry = format!("{key}={value}");
        match self
            .env
            .iter_mut()
            .find(|kv| kv.split_once('=').map(|(k, _)| k) == Some(key) || *kv == key)
        {
            Some(slot) => *slot = entry,
            None => self.env.push(entry),
        }
    }

    /// The shell for shell-form commands: the `shell` field, or `/bin/sh -c` when it is empty.
    pub fn shell(&self) -> Vec<String> {
        if self.shell.is_empty() {
            default_shell()
        } else {
            self.shell.clone()
        }
    }

    /// The job's command line: ENTRYPOINT followed by CMD, as Docker composes them.
    pub fn command(&self) -> Vec<String> {
        let mut argv = self.entrypoint.clone().unwrap_or_default();
        argv.extend(self.cmd.clone().unwrap_or_default());
        argv
    }

    /// From an OCI image configuration (a base image).
    pub fn from_oci(c: &oci_spec::image::ImageConfiguration) -> ImageConfig {
        let mut out = ImageConfig::default();
        if let Some(cfg) = c.config() {
            out.env = cfg.env().clone().unwrap_or_default();
            out.workdir = cfg.working_dir().clone().unwrap_or_default();
            out.user = cfg.user().clone().unwrap_or_default();
            out.entrypoint = cfg.entrypoint().clone();
            out.cmd = cfg.cmd().clone();
            out.labels = cfg
                .labels()
                .clone()
                .map(|l| l.into_iter().collect())
                .unwrap_or_default();
            out.exposed_ports = cfg.exposed_ports().clone().unwrap_or_default();
            out.volumes = cfg.volumes().clone().unwrap_or_default();
            out.stop_signal = cfg.stop_signal().clone();
        }
        out
    }

    /// To an OCI image configuration's `config` section.
    pub fn to_oci(&self) -> oci_spec::image::Config {
        let mut c = oci_spec::image::Config::default();
        c.set_env(Some(self.env.clone()));
        c.set_working_dir((!self.workdir.is_empty()).then(|| self.workdir.clone()));
        c.set_user((!self.user.is_empty()).then(|| self.user.clone()));
        c.set_entrypoint(self.entrypoint.clone());
        c.set_cmd(self.cmd.clone());
        c.set_labels((!self.labels.is_empty()).then(|| self.labels.clone().into_iter().collect()));
        c.set_exposed_ports((!self.exposed_ports.is_empty()).then(|| self.exposed_ports.clone()));
        c.set_volumes((!self.volumes.is_empty()).then(|| self.volumes.clone()));
        c.set_stop_signal(self.stop_signal.clone());
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_replaces_in_place_and_command_composes() {
        let mut c = ImageConfig::default();
        c.set_env("A", "1");
        c.set_env("B", "2");
        c.set_env("A", "3");
        assert_eq!(c.env, ["A=3", "B=2"]);
        c.entrypoint = Some(vec!["/bin/app".into()]);
        c.cmd = Some(vec!["--serve".into()]);
        assert_eq!(c.command(), ["/bin/app", "--serve"]);
        assert_eq!(c.shell(), ["/bin/sh", "-c"]);
    }
}
