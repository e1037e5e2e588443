//! Building a Dockerfile into a cached chain of snapshots.
//!
//! Every step has a cache key, like BuildKit's: the parent's key, the instruction after variable
//! substitution, the build args in scope for RUN, and the content digest of COPY/ADD sources.
//! Steps that change the filesystem (RUN, COPY, ADD, WORKDIR creating a directory, base layers)
//! produce a snapshot of their parent; the others only change the image config. A step whose key
//! is cached is not executed again. Builds of one project are serialized; different projects
//! build in parallel and share identical steps.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sandbox::{NetworkMode, Sandbox, Stdio, User};
use sha2::{Digest as _, Sha256};

use crate::config::ImageConfig;
use crate::context::{self, Ignore};
use crate::dockerfile::{self, Command, Instruction, Step};
use crate::lex::Lexer;
use crate::oci::{self, Layout};
use crate::store::{ProjectRef, StepRecord, Store, StoreError};
use crate::tools::CopySpec;

/// Why a build failed. The message is meant for the build log and the job's `ErrBuild`.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("Dockerfile {0}")]
    Dockerfile(#[from] dockerfile::ParseError),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("step {step} (line {line}): {message}")]
    Step {
        step: String,
        line: usize,
        message: String,
    },
    /// A RUN step exited non-zero: `The command '/bin/sh -c false' returned a non-zero code: 1`.
    #[error("The command '{command}' returned a non-zero code: {code}")]
    Run {
        command: String,
        code: i32,
        status: sandbox::ExitStatus,
    },
    #[error("base image {image}: {message}")]
    Base { image: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tool(#[from] crate::tools::ToolError),
    #[error("writing the build log: {0}")]
    Log(std::io::Error),
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Serializes builds of the same project.
    pub project: String,
    /// The build context (the project directory).
    pub context: PathBuf,
    /// The Dockerfile; default `<context>/Dockerfile`.
    pub dockerfile: Option<PathBuf>,
    pub build_args: Vec<(String, String)>,
    /// Network of RUN steps.
    pub network: NetworkMode,
    /// Ignore the step cache (and re-read base images).
    pub no_cache: bool,
    /// Wall-clock limit of each RUN step.
    pub run_timeout: Option<Duration>,
    /// Limits of `ADD <url>` (size, redirects, the daemon's own addresses). Under
    /// `network: none`, `ADD <url>` is refused whatever this says.
    pub download: crate::download::DownloadPolicy,
    /// Seccomp, nested user namespaces and resource limits of RUN steps.
    pub policy: sandbox::Policy,
}

impl BuildOptions {
    pub fn new(project: impl Into<String>, context: impl Into<PathBuf>) -> Self {
        BuildOptions {
            project: project.into(),
            context: context.into(),
            dockerfile: None,
            build_args: Vec::new(),
            network: NetworkMode::Host,
            no_cache: false,
            run_timeout: None,
            download: crate::download::DownloadPolicy::default(),
            policy: sandbox::Policy::default(),
        }
    }
}

/// A built image: its final key, snapshot and config.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub key: String,
    /// None for an image with an empty filesystem (`FROM scratch` and nothing else).
    pub snapshot: Option<String>,
    pub config: ImageConfig,
}

/// Counters of one build, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BuildStats {
    pub steps: usize,
    pub cached: usize,
    pub executed_runs: usize,
}

/// Where base images come from, in order: `scratch`, local OCI layouts, registries.
pub trait BaseSource: Send + Sync {
    /// Resolve `reference` to a manifest, config and the path of each layer blob (pulled into
    /// the store if needed). `refresh`: do not trust what was fetched before.
    fn fetch(
        &self,
        reference: &str,
        store: &Store,
        refresh: bool,
        platform: &oci::Platform,
    ) -> Result<Option<FetchedBase>, String>;
}

/// A base image ready to unpack.
pub struct FetchedBase {
    pub manifest_digest: String,
    pub config: ImageConfig,
    /// OnBuild triggers of the base (Docker's config extension).
    pub onbuild: Vec<String>,
    /// (digest, blob path) of each layer, bottom first.
    pub layers: Vec<(String, PathBuf)>,
    /// Where it came from, for the log.
    pub origin: String,
}

/// Base images from OCI layouts in a directory: `FROM name[:tag]` is `<dir>/<name>/`.
pub struct LocalImages {
    pub dir: PathBuf,
}

impl BaseSource for LocalImages {
    fn fetch(
        &self,
        reference: &str,
        _store: &Store,
        _refresh: bool,
        platform: &oci::Platform,
    ) -> Result<Option<FetchedBase>, String> {
        let (name, tag) = split_reference(reference);
        if name.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(format!("invalid image name {name:?}"));
        }
        let path = self.dir.join(name);
        if !path.join("index.json").is_file() {
            return Ok(None);
        }
        let layout = Layout::open(&path).map_err(|e| e.to_string())?;
        let resolved = layout
            .resolve(name, tag, platform)
            .map_err(|e| e.to_string())?;
        let raw_config = layout
            .read_blob(resolved.manifest.config().digest().as_ref())
            .map_err(|e| e.to_string())?;
        let mut layers = Vec::new();
        for l in resolved.manifest.layers() {
            let digest = l.digest().to_string();
            layers.push((
                digest.clone(),
                layout.blob_path(&digest).map_err(|e| e.to_string())?,
            ));
        }
        Ok(Some(FetchedBase {
            manifest_digest: resolved.manifest_digest.clone(),
            config: ImageConfig::from_oci(&resolved.config),
            onbuild: onbuild_of(&raw_config),
            layers,
            origin: format!("local image {}", path.display()),
        }))
    }
}

/// `OnBuild` triggers from a raw image config (a Docker extension oci-spec does not model).
pub fn onbuild_of(raw_config: &[u8]) -> Vec<String> {
    serde_json::from_slice::<serde_json::Value>(raw_config)
        .ok()
        .and_then(|v| v.get("config")?.get("OnBuild")?.as_array().cloned())
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `name[:tag][@digest]` → (name, tag or digest); the tag defaults to `latest`.
pub fn split_reference(reference: &str) -> (&str, &str) {
    if let Some((name, digest)) = reference.split_once('@') {
        return (name, digest);
    }
    match reference.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (reference, "latest"),
    }
}

/// The builder: a store, where base images come from, and per-project locks.
pub struct Builder {
    pub store: Store,
    sources: Vec<Box<dyn BaseSource>>,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

fn key_of(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// The state of a stage after some steps.
#[derive(Debug, Clone)]
struct State {
    key: String,
    snapshot: Option<String>,
    config: ImageConfig,
    /// ARGs declared in this stage with their values.
    args: Vec<(String, String)>,
    cmd_from_this_stage: bool,
}

struct Run<'a> {
    builder: &'a Builder,
    opts: &'a BuildOptions,
    lexer: Lexer,
    log: &'a mut dyn Write,
    stats: BuildStats,
    ignore: Ignore,
    global_args: Vec<(String, String)>,
    /// Bytes produced by variable substitution so far (bounded by [`MAX_EXPANDED_TOTAL`]).
    expanded: Budget,
    stages: Vec<(Option<String>, State)>,
    used: ProjectRef,
    total: usize,
    index: usize,
}

fn step_err(step: &Step, message: impl Into<String>) -> BuildError {
    BuildError::Step {
        step: step.text.chars().take(80).collect(),
        line: step.line,
        message: message.into(),
    }
}

/// The most bytes variable substitution may produce over a whole build (every expanded word
/// of every instruction together): 16 MiB. Each word is capped at
/// [`crate::lex::MAX_EXPANDED`] as it grows; this bounds what many of them can pile up.
pub const MAX_EXPANDED_TOTAL: usize = 16 << 20;

fn total_message() -> String {
    format!(
        "variable substitution produced more than {} MiB in this Dockerfile",
        MAX_EXPANDED_TOTAL >> 20
    )
}

/// Bytes produced by variable substitution so far in one build.
type Budget = std::rc::Rc<std::cell::Cell<usize>>;

/// Quote removal and substitution of one word of `step`, counted against `budget`.
fn expand(
    lexer: &Lexer,
    word: &str,
    vars: &[(String, String)],
    step: &Step,
    budget: &Budget,
) -> Result<String, BuildError> {
    let out = lexer
        .process_word(word, vars)
        .map_err(|e| step_err(step, e.0))?;
    let total = budget.get().saturating_add(out.len());
    budget.set(total);
    if total > MAX_EXPANDED_TOTAL {
        return Err(step_err(step, total_message()));
    }
    Ok(out)
}

/// Read a Dockerfile, refusing one larger than [`dockerfile::MAX_DOCKERFILE`] without reading
/// more than that. One inside the context (the default `<context>/Dockerfile`) is resolved
/// inside it: a symlink there cannot make the build read a host file.
fn read_dockerfile(context: &Path, path: &Path) -> Result<String, BuildError> {
    let read_err = |source| BuildError::Read {
        path: path.display().to_string(),
        source,
    };
    let file = match path.strip_prefix(context) {
        Ok(rel) => crate::inroot::Root::open(context)
            .and_then(|r| {
                r.open_in(
                    rel,
                    rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK,
                )
            })
            .map(std::fs::File::from),
        Err(_) => std::fs::File::open(path),
    }
    .map_err(read_err)?;
    if !file.metadata().map_err(read_err)?.is_file() {
        return Err(read_err(std::io::Error::other("not a regular file")));
    }
    let mut text = String::new();
    file.take(dockerfile::MAX_DOCKERFILE as u64 + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() > dockerfile::MAX_DOCKERFILE {
        return Err(BuildError::Dockerfile(dockerfile::ParseError {
            line: 1,
            message: format!(
                "the Dockerfile is larger than the limit of {} MiB",
                dockerfile::MAX_DOCKERFILE >> 20
            ),
        }));
    }
    Ok(text)
}

fn command_argv(cmd: &Command, config: &ImageConfig) -> Vec<String> {
    match cmd {
        Command::Exec(v) => v.clone(),
        Command::Shell(s) => {
            let mut argv = config.shell();
            argv.push(s.clone());
            argv
        }
    }
}

fn short(key: &str) -> &str {
    &key[..12.min(key.len())]
}

impl Builder {
    pub fn new(store: Store, sources: Vec<Box<dyn BaseSource>>) -> Builder {
        Builder {
            store,
            sources,
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self, project: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(project.to_string()).or_default().clone()
    }

    /// Build `opts.context`'s Dockerfile, writing the build log to `log`.
    pub fn build(
        &self,
        opts: &BuildOptions,
        log: &mut dyn Write,
    ) -> Result<(Image, BuildStats), BuildError> {
        let mut opts = opts.clone();
        opts.context = opts
            .context
            .canonicalize()
            .map_err(|source| BuildError::Read {
                path: opts.context.display().to_string(),
                source,
            })?;
        let opts = &opts;
        let lock = self.lock(&opts.project);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = opts
            .dockerfile
            .clone()
            .unwrap_or_else(|| opts.context.join("Dockerfile"));
        let text = read_dockerfile(&opts.context, &path)?;
        let df = dockerfile::parse(&text)?;
        let ignore = Ignore::load(&opts.context).map_err(|e| BuildError::Step {
            step: ".dockerignore".into(),
            line: 0,
            message: e.to_string(),
        })?;
        let lexer = df.lexer();
        // BuildKit's automatic platform ARGs (the build and target platform are the host's).
        let host = oci::Platform::host();
        let mut global_args: Vec<(String, String)> = vec![
            ("BUILDPLATFORM".into(), host.to_string()),
            ("BUILDOS".into(), host.os.clone()),
            ("BUILDARCH".into(), host.arch.clone()),
            ("TARGETPLATFORM".into(), host.to_string()),
            ("TARGETOS".into(), host.os.clone()),
            ("TARGETARCH".into(), host.arch.clone()),
        ];
        let mut expanded_total = 0usize;
        for (i, (name, default)) in df.global_args.iter().enumerate() {
            let line = df.global_arg_lines.get(i).copied().unwrap_or(0);
            let value = match opts.build_args.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => Some(v.clone()),
                None => match default {
                    Some(d) => Some(
                        lexer
                            .process_word(d, &global_args)
                            .map_err(|e| e.0)
                            .and_then(|v| {
                                expanded_total += v.len();
                                if expanded_total > MAX_EXPANDED_TOTAL {
                                    Err(total_message())
                                } else {
                                    Ok(v)
                                }
                            })
                            .map_err(|message| BuildError::Step {
                                step: format!("ARG {name}"),
                                line,
                                message,
                            })?,
                    ),
                    None => None,
                },
            };
            if let Some(v) = value {
                global_args.push((name.clone(), v));
            }
        }
        let mut run = Run {
            builder: self,
            opts,
            lexer,
            log,
            stats: BuildStats::default(),
            ignore,
            global_args,
            expanded: std::rc::Rc::new(std::cell::Cell::new(expanded_total)),
            stages: Vec::new(),
            used: ProjectRef::default(),
            total: df.steps.len(),
            index: 0,
        };
        for step in &df.steps {
            run.step(step)?;
        }
        let (_, last) = run.stages.last().cloned().ok_or_else(|| BuildError::Step {
            step: "FROM".into(),
            line: 0,
            message: "no stage".into(),
        })?;
        let image = Image {
            key: last.key.clone(),
            snapshot: last.snapshot.clone(),
            config: last.config.clone(),
        };
        self.store.put_step(
            &image.key,
            &StepRecord {
                snapshot: image.snapshot.clone(),
                config: image.config.clone(),
            },
        )?;
        run.used.keys.push(image.key.clone());
        self.store.put_ref(&opts.project, &run.used)?;
        writeln!(run.log, "Successfully built {}", short(&image.key)).map_err(BuildError::Log)?;
        Ok((image, run.stats))
    }

    /// Load a built image by its key (as returned by [`Builder::build`]).
    pub fn image(&self, key: &str) -> Option<Image> {
        self.store.step(key).map(|r| Image {
            key: key.to_string(),
            snapshot: r.snapshot,
            config: r.config,
        })
    }

    /// Host path of an image's complete root filesystem: None for an empty image, and with the
    /// overlay backend (see [`Builder::view`]).
    pub fn rootfs(&self, image: &Image) -> Option<PathBuf> {
        match self.view(image)? {
            crate::store::View::Dir(p) => Some(p),
            crate::store::View::Layers(_) => None,
        }
    }
}

impl Run<'_> {
    fn say(&mut self, text: impl std::fmt::Display) -> Result<(), BuildError> {
        writeln!(self.log, "{text}").map_err(BuildError::Log)
    }

    /// Variables for substitution: the stage's ARGs and the image's ENV (ENV wins).
    fn vars(state: &State) -> Vec<(String, String)> {
        let mut v = state.args.clone();
        v.extend(state.config.env_pairs());
        v
    }

    fn state(&mut self) -> &mut State {
        // There is always a stage after FROM (the parser guarantees FROM comes first).
        &mut self.stages.last_mut().expect("a stage exists after FROM").1
    }

    fn step(&mut self, step: &Step) -> Result<(), BuildError> {
        self.index += 1;
        self.stats.steps += 1;
        self.say(format!(
            "Step {}/{} : {}",
            self.index, self.total, step.text
        ))?;
        if let Instruction::From {
            image,
            alias,
            platform,
        } = &step.instruction
        {
            let reference = expand(&self.lexer, image, &self.global_args, step, &self.expanded)?;
            let platform = match platform {
                Some(p) => match expand(&self.lexer, p, &self.global_args, step, &self.expanded)? {
                    p if p.is_empty() => oci::Platform::host(),
                    p => oci::Platform::parse(&p).map_err(|e| step_err(step, e))?,
                },
                None => oci::Platform::host(),
            };
            let mut state = self.base(&reference, &platform)?;
            state.args.clear();
            state.cmd_from_this_stage = false;
            let triggers = std::mem::take(&mut state.config.onbuild);
            self.stages.push((alias.clone(), state));
            for t in triggers {
                self.say(format!(" ---> Running ONBUILD trigger: {t}"))?;
                let (kw, rest) = t.split_once(char::is_whitespace).unwrap_or((&t, ""));
                let parsed = dockerfile::parse(&format!("FROM scratch\n{kw} {rest}\n"))?;
                let trigger = Step {
                    line: step.line,
                    text: t.clone(),
                    instruction: parsed.steps[1].instruction.clone(),
                };
                self.apply(&trigger)?;
            }
            let key = self.state().key.clone();
            self.say(format!(" ---> {}", short(&key)))?;
            return Ok(());
        }
        self.apply(step)?;
        let key = self.state().key.clone();
        self.say(format!(" ---> {}", short(&key)))
    }

    /// The state a FROM starts with: an earlier stage, scratch, or a base image.
    fn base(&mut self, reference: &str, platform: &oci::Platform) -> Result<State, BuildError> {
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
                Err(message) => {
                    return Err(BuildError::Base {
                        image: reference.to_string(),
                        message,
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

    /// Record a config-only change.
    fn meta(&mut self, text: &str, f: impl FnOnce(&mut State)) {
        let s = self.state();
        s.key = key_of(&[&s.key, text]);
        f(s);
    }

    /// Run `f` on a new snapshot of the current state (unless cached) and make it current.
    fn fs_step(
        &mut self,
        key: String,
        f: impl FnOnce(&mut Self, &Path) -> Result<(), BuildError>,
    ) -> Result<(), BuildError> {
        let store = &self.builder.store;
        if !self.opts.no_cache {
            if let Some(rec) = store.step(&key) {
                self.say(" ---> Using cache")?;
                self.stats.cached += 1;
                let s = self.state();
                s.key = key.clone();
                s.snapshot = rec.snapshot.clone();
                if let Some(snap) = rec.snapshot {
                    self.used.snapshots.push(snap);
                }
                self.used.keys.push(key);
                return Ok(());
            }
        }
        let parent = self.state().snapshot.clone();
        let tmp = store.begin(parent.as_deref())?;
        if let Err(e) = f(self, &tmp) {
            self.builder.store.abort(&tmp);
            return Err(e);
        }
        let store = &self.builder.store;
        // A rebuild's result gets a snapshot of its own: jobs may still run on the old one,
        // which stays until garbage collection. The step record then points at the new one.
        let snap_id = if store.has_snapshot(&key) {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("{key}-{nanos}")
        } else {
            key.clone()
        };
        store.commit(&tmp, &snap_id)?;
        let s = self.state();
        s.key = key.clone();
        s.snapshot = Some(snap_id.clone());
        let rec = StepRecord {
            snapshot: Some(snap_id.clone()),
            config: s.config.clone(),
        };
        self.builder.store.put_step(&key, &rec)?;
        self.used.snapshots.push(snap_id);
        self.used.keys.push(key);
        Ok(())
    }

    fn apply(&mut self, step: &Step) -> Result<(), BuildError> {
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

    fn run(
        &mut self,
        step: &Step,
        rootfs: &Path,
        argv: &[String],
        env: &[(String, String)],
        config: &ImageConfig,
    ) -> Result<(), BuildError> {
        self.say(" ---> Running in a sandbox")?;
        self.stats.executed_runs += 1;
        let (r, w) = nix::unistd::pipe().map_err(|e| step_err(step, format!("pipe: {e}")))?;
        let w2: OwnedFd = w
            .try_clone()
            .map_err(|e| step_err(step, format!("pipe: {e}")))?;
        let sb = match self.builder.store.target(rootfs) {
            crate::store::Target::Dir(d) => Sandbox::new(d),
            crate::store::Target::Overlay {
                lowers,
                upper,
                work,
            } => Sandbox::new_overlay(lowers, upper, work),
        };
        let mut sb = sb
            .command(argv)
            .policy(self.opts.policy.clone())
            .network(self.opts.network)
            .cwd(if config.workdir.is_empty() {
                "/"
            } else {
                &config.workdir
            })
            .stdout(Stdio::Fd(w))
            .stderr(Stdio::Fd(w2));
        if !config.user.is_empty() {
            sb = sb.user(User::Spec(config.user.clone()));
        }
        for (k, v) in env {
            sb = sb.env(k, v);
        }
        if let Some(t) = self.opts.run_timeout {
            sb = sb.timeout(t);
        }
        let mut child = sb.spawn().map_err(|e| step_err(step, e.to_string()))?;
        // Both streams share one pipe: stream it into the log as it comes.
        let mut reader = std::fs::File::from(r);
        let mut buf = [0u8; 8192];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.log.write_all(&buf[..n]).map_err(BuildError::Log)?,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(step_err(step, format!("reading the output: {e}"))),
            }
        }
        let status = child.wait().map_err(|e| step_err(step, e.to_string()))?;
        if status.success() {
            return Ok(());
        }
        let command = argv.join(" ");
        match status {
            sandbox::ExitStatus::Exited(code) => Err(BuildError::Run {
                command,
                code,
                status,
            }),
            other => Err(BuildError::Step {
                step: step.text.chars().take(80).collect(),
                line: step.line,
                message: format!("The command '{command}' {other}"),
            }),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn copy(
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
                    crate::store::View::Dir(root) => root,
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

impl Builder {
    fn view_of(&self, state: &State) -> Option<crate::store::View> {
        state.snapshot.as_ref().map(|s| self.store.view(s))
    }

    /// How to see an image's files (None for an empty one).
    pub fn view(&self, image: &Image) -> Option<crate::store::View> {
        image.snapshot.as_ref().map(|s| self.store.view(s))
    }
}

/// Export an image as an OCI layout at `out` with tag `tag` (one flattened layer).
pub fn export(
    builder: &Builder,
    image: &Image,
    out: &Path,
    tag: &str,
) -> Result<String, BuildError> {
    let store = &builder.store;
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| BuildError::Read {
            path: what.clone(),
            source: e,
        }
    };
    std::fs::create_dir_all(out.join("blobs/sha256")).map_err(io(&out.display().to_string()))?;
    let tar_path = store.tmp_path("export.tar");
    match &image.snapshot {
        Some(s) => store
            .tools()
            .pack(&store.view(s), &store.tmp_path("view"), &tar_path)?,
        None => {
            let b = tar::Builder::new(std::fs::File::create(&tar_path).map_err(io("export tar"))?);
            b.into_inner().map_err(io("export tar"))?;
        }
    }
    let tar_bytes = std::fs::read(&tar_path).map_err(io("export tar"))?;
    let _ = std::fs::remove_file(&tar_path);
    let diff_id = oci::sha256_digest(&tar_bytes);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar_bytes).map_err(io("compressing"))?;
    let gz = gz.finish().map_err(io("compressing"))?;
    let err = |e: oci::OciError| BuildError::Base {
        image: "export".into(),
        message: e.to_string(),
    };
    let (layer_digest, layer_size) = oci::write_blob(out, &gz).map_err(err)?;
    let (os, arch) = oci::host_platform();
    let config = serde_json::json!({
        "architecture": arch.to_string(),
        "os": os.to_string(),
        "config": serde_json::to_value(image.config.to_oci()).unwrap_or_default(),
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "mistry"}],
    });
    let config_bytes = serde_json::to_vec(&config).unwrap_or_default();
    let (config_digest, config_size) = oci::write_blob(out, &config_bytes).map_err(err)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}],
    });
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap_or_default();
    let (manifest_digest, manifest_size) = oci::write_blob(out, &manifest_bytes).map_err(err)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(
        out.join("index.json"),
        serde_json::to_vec(&index).unwrap_or_default(),
    )
    .map_err(io("index.json"))?;
    std::fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(io("oci-layout"))?;
    Ok(manifest_digest)
}
