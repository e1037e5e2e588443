//! RUN: a command in a sandbox on the step's new snapshot, its output streamed into the log,
//! with BuildKit's `--mount` (cache, bind, tmpfs, secret) and `--network` flags (`mounts.rs`
//! parses them).
//!
//! - The step key holds the parent's key, the command (and a heredoc script's text), the build
//!   args in scope, the network, the mounts' specs and what they bring in: a context bind's
//!   content digest, a stage bind's or a cache seed's stage key. A step that can see more than
//!   that — a cache mount's contents (kept per project), a context bind (the whole directory:
//!   owners, times, files `.dockerignore` leaves out of the digest), a secret — is **private
//!   to its project**: its key holds the project's name, so it is never taken from another
//!   project's cache, nor is any step after it (their parent key is private too). Steps that
//!   depend only on their key (plain RUN, tmpfs and stage binds, COPY) stay shared between
//!   projects.
//! - A secret enters the key as its id and, when the build has it, a keyed digest of its value
//!   (HMAC-SHA256 with the store's own key, `store/mac.rs`), else `absent`: a rotated secret
//!   rebuilds the steps that use it (BuildKit does not; we do), a project given a secret later
//!   rebuilds too, and the key tells nothing of the value. The value is read once per step,
//!   for the key and the mount alike.
//! - Cache directories live in the store (`store/cache.rs`), locked while a step uses them.
//! - Sources inside the context or a stage are resolved there by the kernel (`openat2` with
//!   `RESOLVE_IN_ROOT`: links and `..` stay inside), never as a host path string; the sandbox
//!   then binds the path that resolution reached (checked to be inside the root).
//! - A writable bind (`rw`) is an overlay over its source, with a scratch upper thrown away
//!   after the step (a scratch copy when the kernel refuses the overlay).
//! - Secrets are copied (mode, owner) into a private directory on `/dev/shm` (else the store's
//!   `tmp/`), bound read-only and removed after the step.
//! - Mount points the step had to create in the image (`/run/secrets/x`) are removed again
//!   when they are still empty, as BuildKit does.

use std::ffi::OsString;
use std::io::{Read, Write as _};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, OFlags};
use sandbox::{Bind, Counted, NetworkMode, Stdio, User};

use super::mounts::{self, Mount, Sharing};
use super::{step_err, BuildError, Run, State};
use crate::config::ImageConfig;
use crate::dockerfile::{Flags, Step};
use crate::inroot::Root;
use crate::oci;
use crate::store::{CacheDir, CacheInit, CacheSharing};
use crate::view::{Target, View};

/// A secret's value, kept out of `Debug` output.
#[derive(Clone)]
struct SecretValue(Vec<u8>);

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretValue({} bytes)", self.0.len())
    }
}

/// RUN's flags, ready for the step: see [`Run::run_flags`].
#[derive(Debug, Clone)]
pub(super) struct RunMounts {
    mounts: Vec<Mount>,
    network: NetworkMode,
    /// The mounts' part of the step key (None without mounts: keys of plain RUNs unchanged).
    key: Option<String>,
    /// The values of the secrets the build has, by id, as read for the key.
    secrets: Vec<(String, SecretValue)>,
}

impl RunMounts {
    /// The step's network: `--network`, else the build's.
    pub(super) fn network(&self) -> NetworkMode {
        self.network
    }

    pub(super) fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

/// A writable directory bind: an overlay over `lowers` (top first), or a copy of them.
struct RwDir {
    lowers: Vec<PathBuf>,
    /// The lowers as a complete tree for the copy: a host path, or the layers.
    view: View,
    target: PathBuf,
}

/// Everything a step's mounts hold while it runs; released (and scratch removed) on drop.
#[derive(Default)]
struct Prepared {
    binds: Vec<Bind>,
    /// Read-only overlays of layers (stages of an overlay store): lowers, target.
    layers: Vec<(Vec<PathBuf>, PathBuf)>,
    rw: Vec<RwDir>,
    tmpfs: Vec<(PathBuf, Option<u64>)>,
    env: Vec<(String, OsString)>,
    caches: Vec<CacheDir>,
    /// Trees under the store's `tmp/` to remove afterwards (scratch uppers, copies).
    scratch: Vec<PathBuf>,
    /// Private secret directories to remove afterwards.
    secret_dirs: Vec<PathBuf>,
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// A private directory for one step's secrets: on `/dev/shm` (memory) when possible.
fn secret_dir(fallback: PathBuf) -> std::io::Result<PathBuf> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = format!(
        "mistry-secret-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mk = |p: &Path| {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(p)
            .map(|()| p.to_path_buf())
    };
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(p) = mk(&shm.join(&name)) {
            return Ok(p);
        }
    }
    mk(&fallback)
}

impl Run<'_> {
    /// A stage (name or index) or an image, as `--from` names it.
    fn stage_state(&mut self, from: &str) -> Result<State, BuildError> {
        let found = match from.parse::<usize>() {
            Ok(i) => self.stages.get(i).map(|(_, s)| s.clone()),
            Err(_) => {
                let lower = from.to_ascii_lowercase();
                self.stages
                    .iter()
                    .find(|(n, _)| n.as_deref() == Some(lower.as_str()))
                    .map(|(_, s)| s.clone())
            }
        };
        match found {
            Some(s) => Ok(s),
            None => self.base(from, &oci::Platform::host()),
        }
    }

    /// RUN's flags: `--mount`s parsed (after substitution), `--network` checked against the
    /// build's, and what the mounts bring in for the step key.
    pub(super) fn run_flags(
        &mut self,
        step: &Step,
        flags: &Flags,
        vars: &[(String, String)],
    ) -> Result<RunMounts, BuildError> {
        let workdir = self.state().config.workdir.clone();
        let mut expanded = Vec::new();
        for (k, v) in &flags.0 {
            let v = match v {
                Some(v) => Some(super::expand(&self.lexer, v, vars, step, &self.expanded)?),
                None => None,
            };
            expanded.push((k.clone(), v));
        }
        let parsed =
            mounts::parse_flags(&expanded, &workdir).map_err(|e| step_err(step, e.to_string()))?;
        // `--network=host` only where the project may use the host's network; `none` always.
        let network = match parsed.network {
            None => self.opts.network,
            Some(n) if n > self.opts.network => {
                return Err(step_err(
                    step,
                    format!(
                        "--network={n}: this build's network is \"{}\" (the server's setting \
                         for the project), and a Dockerfile cannot widen it",
                        self.opts.network
                    ),
                ))
            }
            Some(n) => n,
        };
        // What the mounts bring in, for the key; whether the step may see more than its key
        // says (then it is private to the project).
        let mut mount_keys = Vec::new();
        let mut private = false;
        let mut secrets: Vec<(String, SecretValue)> = Vec::new();
        for m in &parsed.mounts {
            let input = match m {
                Mount::Bind {
                    source, from: None, ..
                } => {
                    private = true;
                    let src = if source.is_empty() { "." } else { source };
                    let r = crate::context::resolve(
                        &self.opts.context,
                        &[src.to_string()],
                        Path::new("/"),
                        true,
                        &self.ignore,
                    )
                    .map_err(|e| step_err(step, format!("--mount source: {e}")))?;
                    r.digest
                }
                Mount::Bind { from: Some(f), .. } => self.stage_state(f)?.key,
                Mount::Cache { from, .. } => {
                    private = true;
                    match from {
                        Some(f) => self.stage_state(f)?.key,
                        None => String::new(),
                    }
                }
                Mount::Secret { id, required, .. } => {
                    private = true;
                    self.secret_input(step, id, *required, &mut secrets)?
                }
                Mount::Tmpfs { .. } => String::new(),
            };
            mount_keys.push(format!("{m:?} {input}"));
        }
        let key = (!parsed.mounts.is_empty()).then(|| {
            let mut k = format!("mounts {}", mount_keys.join("\n"));
            if private {
                k.push_str(&format!("\nproject {:?}", self.opts.project));
            }
            k
        });
        Ok(RunMounts {
            mounts: parsed.mounts,
            network,
            key,
            secrets,
        })
    }

    /// Secret `id` for the step key: `hmac-sha256:<keyed digest of the value>` when the build
    /// has it (its value read once, into `secrets`), `absent` when not; a missing `required`
    /// one fails the step.
    fn secret_input(
        &self,
        step: &Step,
        id: &str,
        required: bool,
        secrets: &mut Vec<(String, SecretValue)>,
    ) -> Result<String, BuildError> {
        let err = |e: String| step_err(step, e);
        let value = match secrets.iter().find(|(k, _)| k == id) {
            Some((_, v)) => v.clone(),
            None => {
                let Some((_, src)) = self.opts.secrets.iter().rev().find(|(k, _)| k == id) else {
                    if required {
                        return Err(err(format!(
                            "secret {id:?} is required but was not provided (the server's \
                             `secrets` setting, or `mistryd image build --secret \
                             id={id},src=FILE`)"
                        )));
                    }
                    return Ok("absent".into());
                };
                let data = std::fs::read(src)
                    .map_err(|e| err(format!("secret {id:?}: reading {}: {e}", src.display())))?;
                let v = SecretValue(data);
                secrets.push((id.to_string(), v.clone()));
                v
            }
        };
        let digest = self
            .builder
            .store
            .secret_digest(id, &value.0)
            .map_err(|e| err(format!("secret {id:?}: {e}")))?;
        Ok(format!("hmac-sha256:{digest}"))
    }

    /// Make every mount ready: cache directories taken, sources opened, secrets written.
    fn prepare(
        &mut self,
        step: &Step,
        mounts: &RunMounts,
        p: &mut Prepared,
    ) -> Result<(), BuildError> {
        let store = &self.builder.store;
        let err = |e: String| step_err(step, e);
        for m in &mounts.mounts {
            match m {
                Mount::Cache {
                    target,
                    id,
                    sharing,
                    from,
                    source,
                    mode,
                    uid,
                    gid,
                    read_only,
                } => {
                    let sharing = match sharing {
                        Sharing::Shared => CacheSharing::Shared,
                        Sharing::Private => CacheSharing::Private,
                        Sharing::Locked => CacheSharing::Locked,
                    };
                    // `from`: a new cache starts as a copy of that stage's `source`.
                    let seed = match from {
                        Some(f) => Some(self.source_tree(step, f, source, p)?),
                        None => None,
                    };
                    let store = &self.builder.store;
                    let init = CacheInit {
                        seed: seed.as_deref(),
                        mode: *mode,
                        uid: *uid,
                        gid: *gid,
                    };
                    let cache = store
                        .cache_dir(&self.opts.project, id, sharing, &init)
                        .map_err(|e| err(format!("cache {id:?}: {e}")))?;
                    let bind = Bind::new(&cache.path, target);
                    p.binds
                        .push(if *read_only { bind.read_only() } else { bind });
                    p.caches.push(cache);
                }
                Mount::Bind {
                    target,
                    source,
                    from,
                    rw,
                } => self.prepare_bind(step, target, source, from.as_deref(), *rw, p)?,
                Mount::Tmpfs { target, size } => p.tmpfs.push((target.clone(), *size)),
                Mount::Secret {
                    id,
                    target,
                    env,
                    mode,
                    uid,
                    gid,
                    ..
                } => {
                    // Read for the step key (a required one the build lacks failed there).
                    let Some((_, SecretValue(data))) = mounts.secrets.iter().find(|(k, _)| k == id)
                    else {
                        continue;
                    };
                    if let Some(name) = env {
                        p.env.push((name.clone(), OsString::from_vec(data.clone())));
                    }
                    let Some(target) = target else { continue };
                    let dir = secret_dir(store.tmp_path("secret"))
                        .map_err(|e| err(format!("secret {id:?}: {e}")))?;
                    p.secret_dirs.push(dir.clone());
                    let file = dir.join("secret");
                    let write = || -> std::io::Result<()> {
                        let mut f = std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o600)
                            .open(&file)?;
                        f.write_all(data)?;
                        f.set_permissions(std::fs::Permissions::from_mode(*mode))?;
                        crate::tools::hand_over_tree(&file, *uid, *gid)
                    };
                    write().map_err(|e| err(format!("secret {id:?}: {e}")))?;
                    let subordinate =
                        sandbox::default_id_mapping() == sandbox::IdMapping::Subordinate;
                    if !subordinate && (*uid, *gid) != (0, 0) {
                        store
                            .tools()
                            .chown_tree(&file, *uid, *gid)
                            .map_err(|e| err(format!("secret {id:?}: {e}")))?;
                    }
                    p.binds.push(Bind::new(&file, target).read_only());
                }
            }
        }
        Ok(())
    }

    /// A host path holding `source` of stage or image `from` as a complete tree, for reading
    /// only (a cache's seed): resolved inside the stage.
    fn source_tree(
        &mut self,
        step: &Step,
        from: &str,
        source: &str,
        p: &mut Prepared,
    ) -> Result<PathBuf, BuildError> {
        let state = self.stage_state(from)?;
        let store = &self.builder.store;
        let root = match self.builder.view_of(&state) {
            None => {
                return Err(step_err(
                    step,
                    format!("stage {from} has an empty filesystem"),
                ))
            }
            Some(View::Dir(root)) => root,
            Some(layers) => {
                let copy = store.tmp_path("from");
                p.scratch.push(copy.clone());
                store
                    .tools()
                    .materialize(&layers, &Self::view_point(store, &mut p.scratch), &copy)
                    .map_err(|e| step_err(step, e.to_string()))?;
                self.stats.stage_copies += 1;
                copy
            }
        };
        let fd = Root::open(&root)
            .and_then(|r| r.open_in(Path::new(source), OFlags::PATH | OFlags::DIRECTORY))
            .map_err(|e| step_err(step, format!("--mount from={from} source={source}: {e}")))?;
        // The stage is immutable; the copy tool needs a path.
        std::fs::read_link(fd_path(&fd))
            .map_err(|e| step_err(step, format!("--mount from={from}: {e}")))
    }

    fn prepare_bind(
        &mut self,
        step: &Step,
        target: &Path,
        source: &str,
        from: Option<&str>,
        rw: bool,
        p: &mut Prepared,
    ) -> Result<(), BuildError> {
        let shown = if source.is_empty() { "." } else { source };
        let (root, what) = match from {
            None => (self.opts.context.clone(), "the build context".to_string()),
            Some(f) => {
                let state = self.stage_state(f)?;
                match self.builder.view_of(&state) {
                    None => {
                        return Err(step_err(step, format!("stage {f} has an empty filesystem")))
                    }
                    Some(View::Dir(root)) => (root, format!("stage {f}")),
                    Some(View::Layers(layers)) => {
                        if sandbox::paths::normalize_inside(&Path::new("/").join(source))
                            == Path::new("/")
                        {
                            // The whole stage: its layers as an overlay.
                            if rw {
                                p.rw.push(RwDir {
                                    lowers: layers.clone(),
                                    view: View::Layers(layers),
                                    target: target.to_path_buf(),
                                });
                            } else {
                                p.layers.push((layers, target.to_path_buf()));
                            }
                            return Ok(());
                        }
                        let store = &self.builder.store;
                        let copy = store.tmp_path("from");
                        p.scratch.push(copy.clone());
                        store
                            .tools()
                            .materialize(
                                &View::Layers(layers),
                                &Self::view_point(store, &mut p.scratch),
                                &copy,
                            )
                            .map_err(|e| step_err(step, e.to_string()))?;
                        self.stats.stage_copies += 1;
                        (copy, format!("stage {f}"))
                    }
                }
            }
        };
        let fd = Root::open(&root)
            .and_then(|r| r.open_in(Path::new(source), OFlags::PATH))
            .map_err(|e| step_err(step, format!("--mount source {shown} in {what}: {e}")))?;
        let is_dir = rustix::fs::fstat(&fd)
            .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
            .map_err(|e| step_err(step, format!("--mount source {shown}: {e}")))?;
        // Resolved inside the root by the kernel; the sandbox binds the path that resolution
        // reached (a descriptor cannot be bound from the sandbox's own mount namespace).
        let path = std::fs::read_link(fd_path(&fd))
            .map_err(|e| step_err(step, format!("--mount source {shown}: {e}")))?;
        let real_root = root
            .canonicalize()
            .map_err(|e| step_err(step, format!("{what}: {e}")))?;
        if !path.starts_with(&real_root) {
            return Err(step_err(
                step,
                format!("--mount source {shown} is outside {what}"),
            ));
        }
        if !rw {
            p.binds.push(Bind::new(&path, target).read_only());
        } else if is_dir {
            p.rw.push(RwDir {
                lowers: vec![path.clone()],
                view: View::Dir(path),
                target: target.to_path_buf(),
            });
        } else {
            // One file: a scratch copy of it, bound writable.
            let store = &self.builder.store;
            let dir = store.tmp_path("rw");
            p.scratch.push(dir.clone());
            let copy = dir.join("file");
            std::fs::create_dir(&dir)
                .and_then(|()| {
                    let src = Root::open(&root)?.open_in(Path::new(source), OFlags::RDONLY)?;
                    let mut src = std::fs::File::from(src);
                    let mut dst = std::fs::File::create(&copy)?;
                    std::io::copy(&mut src, &mut dst)?;
                    let mode = src.metadata()?.permissions().mode();
                    dst.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
                    crate::tools::hand_over(&dir)?;
                    crate::tools::hand_over(&copy)
                })
                .map_err(|e| step_err(step, format!("--mount source {shown}: {e}")))?;
            p.binds.push(Bind::new(&copy, target));
        }
        Ok(())
    }

    /// A mount point under `tmp/` for reading layers, removed with the step's scratch.
    fn view_point(store: &crate::store::Store, scratch: &mut Vec<PathBuf>) -> PathBuf {
        let at = store.tmp_path("view");
        scratch.push(at.clone());
        at
    }

    /// Drop what the mounts held: caches unlocked, scratch trees and secrets removed.
    fn release(&mut self, p: Prepared) {
        drop(p.caches);
        for d in p.secret_dirs {
            let _ = std::fs::remove_file(d.join("secret"));
            if std::fs::remove_dir(&d).is_err() {
                let _ = self.builder.store.remove_tree(&d);
            }
        }
        for s in p.scratch {
            if let Err(e) = self.builder.store.remove_tree(&s) {
                tracing::warn!(path = %s.display(), error = %e, "could not remove a scratch tree");
            }
        }
    }

    /// Mount points the step will create: for each target, the chain of missing paths.
    fn stubs(target: &Target, list: &[Mount]) -> Vec<PathBuf> {
        let view = match target {
            Target::Dir(d) => View::Dir(d.clone()),
            Target::Overlay { lowers, upper, .. } => {
                let mut l = vec![upper.clone()];
                l.extend(lowers.iter().cloned());
                View::Layers(l)
            }
        };
        let mut out = Vec::new();
        for t in list.iter().filter_map(Mount::target) {
            let t = sandbox::paths::normalize_inside(t);
            let mut acc = PathBuf::from("/");
            let mut missing = false;
            for c in t.components().skip(1) {
                acc.push(c);
                if missing || view.lookup(&acc).is_none() {
                    missing = true;
                    if !out.contains(&acc) {
                        out.push(acc.clone());
                    }
                }
            }
        }
        out
    }

    /// Remove the mount points the step created, deepest first, when still empty.
    fn remove_stubs(&mut self, target: &Target, stubs: &[PathBuf]) -> Result<(), BuildError> {
        let root = match target {
            Target::Dir(d) => d,
            Target::Overlay { upper, .. } => upper,
        };
        let Ok(r) = Root::open(root) else {
            return Ok(());
        };
        let mut left = Vec::new();
        for s in stubs.iter().rev() {
            let Ok((dir, name)) = r.parent(s) else {
                continue;
            };
            let Ok(st) = rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            let res = match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => rustix::fs::unlinkat(&dir, &name, AtFlags::REMOVEDIR),
                FileType::RegularFile if st.st_size == 0 => {
                    rustix::fs::unlinkat(&dir, &name, AtFlags::empty())
                }
                _ => continue,
            };
            match res {
                Ok(()) | Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::NOENT) => {}
                Err(_) => left.push(s.display().to_string()),
            }
        }
        if !left.is_empty() {
            self.say(format!(
                " ---> Mount points left in the image: {}",
                left.join(", ")
            ))?;
        }
        Ok(())
    }

    /// Run `argv` on the snapshot begun at `rootfs`, with `binds` (read-only files, e.g. a
    /// heredoc script) and the step's mounts.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        &mut self,
        step: &Step,
        rootfs: &Path,
        argv: &[String],
        env: &[(String, String)],
        config: &ImageConfig,
        binds: &[Bind],
        mounts: &RunMounts,
    ) -> Result<(), BuildError> {
        self.say(" ---> Running in a sandbox")?;
        self.stats.executed_runs += 1;
        let mut p = Prepared::default();
        p.binds.extend(binds.iter().cloned());
        let result = self.prepare(step, mounts, &mut p).and_then(|()| {
            let target = self.builder.store.target(rootfs);
            let stubs = Self::stubs(&target, &mounts.mounts);
            let result = self.run_in(step, &target, argv, env, config, mounts.network, &mut p);
            let cleaned = self.remove_stubs(&target, &stubs);
            result.and(cleaned)
        });
        self.release(p);
        result
    }

    /// Scratch upper/work directories for a writable overlay.
    fn scratch_rw(&self, p: &mut Prepared) -> std::io::Result<(PathBuf, PathBuf)> {
        let dir = self.builder.store.tmp_path("rw");
        p.scratch.push(dir.clone());
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        for d in [&dir, &upper, &work] {
            std::fs::create_dir(d)?;
            crate::tools::hand_over(d)?;
        }
        Ok((upper, work))
    }

    #[allow(clippy::too_many_arguments)]
    fn run_in(
        &mut self,
        step: &Step,
        target: &Target,
        argv: &[String],
        env: &[(String, String)],
        config: &ImageConfig,
        network: NetworkMode,
        p: &mut Prepared,
    ) -> Result<(), BuildError> {
        // Writable binds as overlays first; as copies if the kernel refuses the overlay.
        let mut copies = false;
        let mut child = loop {
            let (r, w) = nix::unistd::pipe().map_err(|e| step_err(step, format!("pipe: {e}")))?;
            let w2: OwnedFd = w
                .try_clone()
                .map_err(|e| step_err(step, format!("pipe: {e}")))?;
            let mut sb = target
                .sandbox()
                .command(argv)
                .policy(self.opts.policy.clone())
                .network(network)
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
            for (k, v) in &p.env {
                sb = sb.env(k, v);
            }
            if let Some(t) = self.opts.step_timeout() {
                sb = sb.timeout(t);
            }
            for b in &p.binds {
                sb = sb.bind(b.clone());
            }
            // What the step writes besides its root counts against the disk limit too: its
            // cache directories (what they grow by) and writable binds.
            for c in &p.caches {
                sb = sb.count_disk(&c.path, Counted::Growth);
            }
            for (lowers, at) in &p.layers {
                sb = sb.overlay_mount(lowers.clone(), None, at);
            }
            let rw: Vec<(Vec<PathBuf>, View, PathBuf)> =
                p.rw.iter()
                    .map(|d| (d.lowers.clone(), d.view.clone(), d.target.clone()))
                    .collect();
            for (lowers, view, at) in rw {
                if copies {
                    let store = &self.builder.store;
                    let copy = store.tmp_path("rw");
                    p.scratch.push(copy.clone());
                    store
                        .tools()
                        .materialize(&view, &Self::view_point(store, &mut p.scratch), &copy)
                        .map_err(|e| step_err(step, e.to_string()))?;
                    sb = sb
                        .bind(Bind::new(&copy, at))
                        .count_disk(copy, Counted::Growth);
                } else {
                    let (upper, work) = self
                        .scratch_rw(p)
                        .map_err(|e| step_err(step, format!("a writable mount: {e}")))?;
                    sb = sb.count_disk(&upper, Counted::All).overlay_mount(
                        lowers,
                        Some((upper, work)),
                        at,
                    );
                }
            }
            for (at, size) in &p.tmpfs {
                sb = sb.tmpfs(at, *size);
            }
            match sb.spawn() {
                Ok(c) => break (c, r),
                Err(sandbox::Error::Overlay(_)) if !copies && !p.rw.is_empty() => copies = true,
                Err(e) => return Err(step_err(step, e.to_string())),
            }
        };
        let (ref mut child, r) = child;
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
        if matches!(status, sandbox::ExitStatus::TimedOut(_)) && self.opts.past_deadline() {
            return Err(BuildError::Deadline);
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
}
