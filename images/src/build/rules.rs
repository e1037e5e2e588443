//! Each instruction's rules: what it does to the stage's config and cache key, and which ones
//! change the filesystem (WORKDIR creating a directory, RUN, COPY/ADD).

use std::path::Path;

use super::{expand, key_of, step_err, BuildError, Run};
use crate::config::ImageConfig;
use crate::dockerfile::{Command, Instruction, Step};

pub(super) fn command_argv(cmd: &Command, config: &ImageConfig) -> Vec<String> {
    match cmd {
        Command::Exec(v) => v.clone(),
        Command::Shell(s) => {
            let mut argv = config.shell();
            argv.push(s.clone());
            argv
        }
    }
}

impl Run<'_> {
    pub(super) fn apply(&mut self, step: &Step) -> Result<(), BuildError> {
        let vars = Self::vars(self.state());
        let lexer = self.lexer.clone();
        let budget = self.expanded.clone();
        let word = |s: &str| expand(&lexer, s, &vars, step, &budget);
        match &step.instruction {
            Instruction::From { .. } => Err(step_err(step, "FROM inside a stage")),
            Instruction::Env(pairs) => {
                let mut expanded = Vec::new();
                for (k, v) in pairs {
                    expanded.push((k.clone(), word(v)?));
                }
                let text = format!("ENV {expanded:?}");
                self.meta(&text, |s| {
                    for (k, v) in &expanded {
                        s.config.set_env(k, v);
                    }
                });
                Ok(())
            }
            Instruction::Arg(args) => {
                let mut values = Vec::new();
                for (name, default) in args {
                    let value = match self.opts.build_args.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => Some(v.clone()),
                        None => match default {
                            Some(d) => Some(word(d)?),
                            // `ARG NAME` inside a stage takes the global value, if any.
                            None => self
                                .global_args
                                .iter()
                                .rev()
                                .find(|(k, _)| k == name)
                                .map(|(_, v)| v.clone()),
                        },
                    };
                    if let Some(v) = value {
                        values.push((name.clone(), v));
                    }
                }
                let text = format!("ARG {values:?}");
                self.meta(&text, |s| s.args.extend(values));
                Ok(())
            }
            Instruction::Label(pairs) => {
                let mut expanded = Vec::new();
                for (k, v) in pairs {
                    expanded.push((word(k)?, word(v)?));
                }
                let text = format!("LABEL {expanded:?}");
                self.meta(&text, |s| s.config.labels.extend(expanded));
                Ok(())
            }
            Instruction::Maintainer(m) => {
                let m = m.clone();
                self.meta(&format!("MAINTAINER {m}"), |s| {
                    s.config.labels.insert("maintainer".into(), m);
                });
                Ok(())
            }
            Instruction::Expose(ports) => {
                let mut out = Vec::new();
                for p in ports {
                    let p = word(p)?;
                    out.push(if p.contains('/') {
                        p
                    } else {
                        format!("{p}/tcp")
                    });
                }
                self.meta(&format!("EXPOSE {out:?}"), |s| {
                    for p in out {
                        if !s.config.exposed_ports.contains(&p) {
                            s.config.exposed_ports.push(p);
                        }
                    }
                });
                Ok(())
            }
            Instruction::Volume(vols) => {
                let mut out = Vec::new();
                for v in vols {
                    out.push(word(v)?);
                }
                self.meta(&format!("VOLUME {out:?}"), |s| {
                    for v in out {
                        if !s.config.volumes.contains(&v) {
                            s.config.volumes.push(v);
                        }
                    }
                });
                Ok(())
            }
            Instruction::StopSignal(sig) => {
                let sig = word(sig)?;
                self.meta(&format!("STOPSIGNAL {sig}"), |s| {
                    s.config.stop_signal = Some(sig)
                });
                Ok(())
            }
            Instruction::User(u) => {
                let u = word(u)?;
                self.meta(&format!("USER {u}"), |s| s.config.user = u);
                Ok(())
            }
            Instruction::Shell(argv) => {
                let argv = argv.clone();
                self.meta(&format!("SHELL {argv:?}"), |s| s.config.shell = argv);
                Ok(())
            }
            Instruction::Onbuild(t) => {
                let t = t.clone();
                self.meta(&format!("ONBUILD {t}"), |s| s.config.onbuild.push(t));
                Ok(())
            }
            Instruction::Healthcheck(h) => {
                let value = match &h.test {
                    None => serde_json::json!({"Test": ["NONE"]}),
                    Some(cmd) => {
                        let test: Vec<String> = match cmd {
                            Command::Exec(v) => std::iter::once("CMD".to_string())
                                .chain(v.iter().cloned())
                                .collect(),
                            Command::Shell(s) => vec!["CMD-SHELL".into(), s.clone()],
                        };
                        let mut obj = serde_json::json!({ "Test": test });
                        for (k, v) in &h.flags.0 {
                            obj[k] = serde_json::Value::String(v.clone().unwrap_or_default());
                        }
                        obj
                    }
                };
                self.meta(&format!("HEALTHCHECK {value}"), |s| {
                    s.config.healthcheck = Some(value)
                });
                Ok(())
            }
            Instruction::Entrypoint(cmd) => {
                let argv = command_argv(cmd, &self.state().config);
                self.meta(&format!("ENTRYPOINT {argv:?}"), |s| {
                    s.config.entrypoint = Some(argv);
                    // An inherited CMD does not apply to a new ENTRYPOINT (as Docker does).
                    if !s.cmd_from_this_stage {
                        s.config.cmd = None;
                    }
                });
                Ok(())
            }
            Instruction::Cmd(cmd) => {
                let argv = command_argv(cmd, &self.state().config);
                self.meta(&format!("CMD {argv:?}"), |s| {
                    s.config.cmd = Some(argv);
                    s.cmd_from_this_stage = true;
                });
                Ok(())
            }
            Instruction::Workdir(dir) => {
                let dir = word(dir)?;
                let cur = self.state().config.workdir.clone();
                let base = if cur.is_empty() { "/".to_string() } else { cur };
                let full = sandbox::paths::normalize_inside(&Path::new(&base).join(&dir));
                let full_s = full.display().to_string();
                let exists = self
                    .builder
                    .view_of(self.state())
                    .is_some_and(|v| v.is_dir(&full));
                if exists {
                    self.meta(&format!("WORKDIR {full_s}"), |s| s.config.workdir = full_s);
                    return Ok(());
                }
                let key = key_of(&[&self.state().key, &format!("WORKDIR {full_s}")]);
                self.state().config.workdir = full_s;
                self.fs_step(key, |run, tmp| {
                    run.builder
                        .store
                        .tools()
                        .mkdirs(&run.builder.store.target(tmp), &full, 0, 0)
                        .map_err(|e| step_err(step, e.to_string()))
                })
            }
            Instruction::Run { command, .. } => {
                let state = self.state().clone();
                let argv = command_argv(command, &state.config);
                let mut env: Vec<(String, String)> = state.args.clone();
                for (k, v) in state.config.env_pairs() {
                    env.retain(|(ek, _)| *ek != k);
                    env.push((k, v));
                }
                let key = key_of(&[
                    &state.key,
                    "RUN",
                    &serde_json::to_string(&argv).unwrap_or_default(),
                    &format!("{:?}", state.args),
                    &self.opts.network.to_string(),
                ]);
                self.fs_step(key, |run, tmp| {
                    run.run(step, tmp, &argv, &env, &state.config)
                })
            }
            Instruction::Copy {
                add,
                sources,
                dest,
                flags,
            } => self.copy(step, *add, sources, dest, flags, &vars),
        }
    }
}
