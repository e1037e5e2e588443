//! Building a Dockerfile into a cached chain of snapshots.
//!
//! Every step has a cache key, like BuildKit's: the parent's key, the instruction after variable
//! substitution, the build args in scope for RUN, and the content digest of COPY/ADD sources.
//! Steps that change the filesystem (RUN, COPY, ADD, WORKDIR creating a directory, base layers)
//! produce a snapshot of their parent; the others only change the image config. A step whose key
//! is cached is not executed again. Builds of one project are serialized; different projects
//! build in parallel and share identical steps, except those that can see more than their key
//! says (a cache mount, a context bind, a secret: keyed by project too, see `run.rs`) and the
//! steps after them.
//!
//! The step loop is here; the rest by concern: base images (`base.rs`), each instruction's
//! rules (`rules.rs`), RUN (`run.rs`), COPY/ADD with downloads (`copy.rs`), the Dockerfile's text
//! and substitution budget (`words.rs`), OCI export (`export.rs`); what to build, what comes out
//! and why a build failed (`options.rs`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use crate::config::ImageConfig;
use crate::context::Ignore;
use crate::dockerfile::{self, Instruction, Step};
use crate::lex::Lexer;
use crate::oci;
use crate::store::{ProjectRef, StepRecord, Store};
use crate::view::View;

mod base;
mod copy;
mod export;
mod mounts;
mod options;
mod rules;
mod run;
mod words;

pub(crate) use crate::source::BaseSource;
pub use base::BaseSources;
pub use options::{BuildError, BuildOptions, BuildStats, Image};
pub(crate) use words::MAX_EXPANDED_TOTAL;
use words::{expand, read_dockerfile, total_message, Budget};

/// The builder: a store, where base images come from, and per-project locks.
pub struct Builder {
    /// The layer store the builder reads and writes (blobs, snapshots, step cache).
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

fn short(key: &str) -> &str {
    &key[..12.min(key.len())]
}

impl Builder {
    /// A builder on `store` taking base images from `sources`.
    pub fn with_sources(store: Store, sources: BaseSources) -> Builder {
        Self::new(store, sources.into_list())
    }

    /// A builder on `store` asking `sources` for base images, in order (`FROM scratch` needs
    /// none).
    pub fn new(store: Store, sources: Vec<Box<dyn BaseSource>>) -> Builder {
        Builder {
            store,
            sources,
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self, project: &str) -> Arc<Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
        let _guard = match opts.deadline {
            None => lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            // Another build of the project may hold it past this build's deadline.
            Some(_) => loop {
                match lock.try_lock() {
                    Ok(g) => break g,
                    Err(std::sync::TryLockError::Poisoned(e)) => break e.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) if opts.past_deadline() => {
                        return Err(BuildError::Deadline)
                    }
                    Err(std::sync::TryLockError::WouldBlock) => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                }
            },
        };
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
        let (global_args, expanded_total) = words::global_args(&df, opts, &lexer)?;
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
        let stats = &run.stats;
        writeln!(run.log, "{}", stats.summary()).map_err(BuildError::Log)?;
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
            View::Dir(p) => Some(p),
            View::Layers(_) => None,
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
        if self.opts.past_deadline() {
            return Err(BuildError::Deadline);
        }
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
                    p => oci::Platform::parse(&p).map_err(|e| step_err(step, e.to_string()))?,
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
        self.stats.built += 1;
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
                .map_or(0, |d| d.as_nanos());
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
}

impl Builder {
    fn view_of(&self, state: &State) -> Option<View> {
        state.snapshot.as_ref().map(|s| self.store.view(s))
    }

    /// Export `image` as an OCI layout at `out` with tag `tag` (one flattened layer); returns
    /// the manifest's digest.
    pub fn export(&self, image: &Image, out: &Path, tag: &str) -> Result<String, BuildError> {
        export::export(self, image, out, tag)
    }

    /// How to see an image's files (None for an empty one).
    pub fn view(&self, image: &Image) -> Option<View> {
        image.snapshot.as_ref().map(|s| self.store.view(s))
    }
}
