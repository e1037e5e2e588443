//! Each instruction's rules: what it does to the stage's config and cache key, and which ones
//! change the filesystem (WORKDIR creating a directory, RUN, COPY/ADD).

use std::path::Path;

use super::{expand, key_of, step_err, BuildError, Run};
use crate::config::ImageConfig;
use crate::dockerfile::{heredoc_word, Command, Heredoc, Instruction, Step};
use crate::lex::Lexer;
use sandbox::NetworkMode;

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

/// A RUN heredoc run as a file by its `#!` interpreter.
struct Script {
    /// The file's name under `/dev/pipes/` (the delimiter, or `script`).
    name: String,
    text: String,
}

/// Where a heredoc script is seen by the RUN step, as BuildKit puts it.
const SCRIPT_DIR: &str = "/dev/pipes";

/// RUN's argv, heredocs applied as BuildKit's Dockerfile frontend does:
/// - `RUN <<EOF` alone: the body is the script, given to the shell (`sh -c BODY`); a body
///   starting with `#!` is written to a file run by its interpreter (`sh -c /dev/pipes/EOF`);
/// - anything else (`RUN cat <<EOF > f`, several heredocs): the line and the bodies with their
///   delimiters go to the shell as one script, which processes the heredocs itself.
fn run_argv(
    cmd: &Command,
    heredocs: &[Heredoc],
    config: &ImageConfig,
) -> (Vec<String>, Option<Script>) {
    let (Command::Shell(line), Some(first)) = (cmd, heredocs.first()) else {
        return (command_argv(cmd, config), None);
    };
    let alone = heredocs.len() == 1
        && Lexer::new('\\')
            .split_raw(line)
            .is_ok_and(|w| w.len() == 1 && heredoc_word(&w[0]).is_some());
    let mut argv = config.shell();
    if !alone {
        let mut full = line.clone();
        for h in heredocs {
            full.push('\n');
            full.push_str(&h.content);
            full.push_str(&h.name);
        }
        argv.push(full);
        return (argv, None);
    }
    let body = first.body();
    if !body.starts_with("#!") {
        argv.push(body);
        return (argv, None);
    }
    let plain = !first.name.is_empty()
        && first.name != "."
        && first.name != ".."
        && !first.name.contains('/')
        && !first.name.contains('\0');
    let name = if plain {
        first.name.clone()
    } else {
        "script".into()
    };
    argv.push(format!("{SCRIPT_DIR}/{name}"));
    (argv, Some(Script { name, text: body }))
}

/// Write `script` to `file` (0755) and say how the step sees it: read-only at
/// `/dev/pipes/NAME` (a tmpfs of the sandbox: nothing lands in the layer).
fn write_script(file: &Path, script: &Script) -> std::io::Result<sandbox::Bind> {
    sandbox::write_executable(file, script.text.as_bytes())?;
    Ok(sandbox::Bind::new(file, Path::new(SCRIPT_DIR).join(&script.name)).read_only())
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
                    s.config.stop_signal = Some(sig);
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
                    s.config.healthcheck = Some(value);
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
            Instruction::Run {
                command,
                heredocs,
                flags,
            } => {
                let mounts = self.run_flags(step, flags, &vars)?;
                let state = self.state().clone();
                let (argv, script) = run_argv(command, heredocs, &state.config);
                let mut env: Vec<(String, String)> = state.args.clone();
                for (k, v) in state.config.env_pairs() {
                    env.retain(|(ek, _)| *ek != k);
                    env.push((k, v));
                }
                let argv_json = serde_json::to_string(&argv).unwrap_or_default();
                let args = format!("{:?}", state.args);
                // Whether the step had a network, not which: a step cached under `host` stays
                // valid under `isolated` (the default since; no rebuild of every image).
                let network = match mounts.network() {
                    NetworkMode::Isolated => NetworkMode::Host,
                    n => n,
                }
                .to_string();
                let mut parts: Vec<&str> = vec![&state.key, "RUN", &argv_json, &args, &network];
                // A script run from a file is not in the argv: its text goes into the key.
                let script_key = script
                    .as_ref()
                    .map(|s| format!("script {} {}", s.name, s.text));
                if let Some(k) = &script_key {
                    parts.push(k);
                }
                if let Some(k) = mounts.key() {
                    parts.push(k);
                }
                let key = key_of(&parts);
                self.fs_step(key, |run, tmp| {
                    let Some(script) = &script else {
                        return run.run(step, tmp, &argv, &env, &state.config, &[], &mounts);
                    };
                    let file = run.builder.store.tmp_path("heredoc");
                    let bind = write_script(&file, script)
                        .map_err(|e| step_err(step, format!("writing the heredoc script: {e}")));
                    let r = bind.and_then(|b| {
                        run.run(step, tmp, &argv, &env, &state.config, &[b], &mounts)
                    });
                    let _ = std::fs::remove_file(&file);
                    r
                })
            }
            Instruction::Copy {
                add,
                sources,
                dest,
                flags,
                heredocs,
            } => self.copy(step, *add, sources, heredocs, dest, flags, &vars),
        }
    }
}
