//! `mistryd image build|gc`: build a project's Dockerfile into the layer store (debugging,
//! benchmarks), and `mistryd internal`: the helper image-tree operations run through (see
//! `images::helper_main`).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use images::{BackendKind, BaseSources, BuildOptions, Builder, RegistryConfig, Store};
use sandbox::NetworkMode;

/// `mistryd image`: the layer store without a daemon.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build a Dockerfile into the layer store.
    Build(BuildArgs),
    /// Remove snapshots, step records and blobs no project's current image uses, and the
    /// cache-mount directories of projects without an image.
    Gc(StoreArgs),
}

/// The options naming the layer store (`--store`, `--filesystem`).
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The layer store directory.
    #[arg(long, value_name = "DIR")]
    pub store: PathBuf,
    /// Snapshot backend; default: the store's own, else btrfs on btrfs, overlay where
    /// overlayfs works in a user namespace, else plain.
    #[arg(long, value_name = "plain|btrfs|overlay")]
    pub filesystem: Option<BackendKind>,
}

/// Options of `mistryd image build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// `--store` and `--filesystem`.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Directory of local base images (OCI layouts, `FROM name` = DIR/name).
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// A registry (`host[:port]`) reached over plain http.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure: Vec<String>,
    /// A docker-style config.json with registry credentials (default: ~/.docker/config.json).
    #[arg(long = "registry-auth", value_name = "FILE")]
    pub auth_file: Option<PathBuf>,
    /// Build argument (`uid` defaults to this process's uid, as mistryd passes it).
    #[arg(long = "build-arg", value_name = "K=V", value_parser = parse_kv)]
    pub build_args: Vec<(String, String)>,
    /// A secret for `RUN --mount=type=secret,id=ID`: `id=ID,src=FILE` (as `docker build
    /// --secret`); read when a step uses it, never stored.
    #[arg(long = "secret", value_name = "id=ID,src=FILE", value_parser = parse_secret)]
    pub secrets: Vec<(String, PathBuf)>,
    /// Ignore the step cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Network of RUN steps: `host`, `isolated` or `none`.
    #[arg(long = "net", default_value = "host")]
    pub network: NetworkMode,
    /// Project name (builds of one project are serialized; GC keeps each project's image).
    #[arg(long)]
    pub project: Option<String>,
    /// Also export the image as an OCI layout: DIR[:TAG].
    #[arg(long, value_name = "DIR[:TAG]")]
    pub export: Option<String>,
    /// The build context (with its Dockerfile).
    pub context: PathBuf,
}

/// A value of `mistryd image build`'s options that does not parse (clap reports it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// A `--build-arg` without `=`; names the value.
    #[error("expected K=V, got {0:?}")]
    KeyValue(String),
    /// A `--secret` field other than `id=`, `src=`, `source=` or `type=file`; names the field.
    #[error("unknown field {0:?} in --secret (expected id=ID,src=FILE)")]
    SecretField(String),
    /// A `--secret` without a non-empty `id=` or without `src=`; names the value.
    #[error("--secret {0:?}: expected id=ID,src=FILE")]
    Secret(String),
}

fn parse_kv(s: &str) -> Result<(String, String), ArgError> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| ArgError::KeyValue(s.to_string()))
}

/// `id=ID,src=FILE` (also `source=`, and `type=file`), as `docker build --secret`.
fn parse_secret(s: &str) -> Result<(String, PathBuf), ArgError> {
    let (mut id, mut src) = (None, None);
    for field in s.split(',') {
        match field.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("src" | "source", v)) => src = Some(PathBuf::from(v)),
            Some(("type", "file")) => {}
            _ => return Err(ArgError::SecretField(field.to_string())),
        }
    }
    match (id, src) {
        (Some(id), Some(src)) if !id.is_empty() => Ok((id, src)),
        _ => Err(ArgError::Secret(s.to_string())),
    }
}

/// The helper command of this binary.
pub fn helper_command() -> Result<Vec<OsString>> {
    let exe = std::env::current_exe().context("locating the mistryd binary")?;
    Ok(vec![exe.into_os_string(), "internal".into()])
}

fn open_store(args: &StoreArgs) -> Result<Store> {
    Store::open(&args.store, args.filesystem, helper_command()?)
        .with_context(|| format!("opening the layer store {}", args.store.display()))
}

/// Run `mistryd image ...`; returns the process exit code (a failed build prints its error
/// and gives 1).
pub fn run(cmd: ImageCommand) -> Result<i32> {
    match cmd {
        ImageCommand::Build(args) => {
            let store = open_store(&args.store)?;
            let builder = Builder::with_sources(
                store,
                BaseSources {
                    images_dir: args.images.clone(),
                    registries: RegistryConfig {
                        insecure: args.insecure.clone(),
                        auth_file: args.auth_file.clone(),
                        ..Default::default()
                    },
                },
            );
            let project = args.project.clone().unwrap_or_else(|| {
                args.context
                    .file_name()
                    .map_or_else(|| "default".into(), |n| n.to_string_lossy().into_owned())
            });
            let mut opts = BuildOptions::new(project, &args.context);
            // Build arg `uid` is this process's uid, as the daemon passes it (see
            // `Config::build_options_with`); a `--build-arg uid=...` given here wins.
            opts.build_args = vec![("uid".into(), nix::unistd::geteuid().as_raw().to_string())];
            opts.build_args.extend(args.build_args.iter().cloned());
            opts.no_cache = args.no_cache;
            opts.network = args.network;
            opts.secrets = args.secrets.clone();
            let mut out = std::io::stdout().lock();
            match builder.build(&opts, &mut out) {
                Ok((image, stats)) => {
                    eprintln!(
                        "image {} ({}; {} RUN executed)",
                        image.key,
                        stats.summary(),
                        stats.executed_runs
                    );
                    if let Some(spec) = &args.export {
                        let (dir, tag) = spec.rsplit_once(':').unwrap_or((spec.as_str(), "latest"));
                        let digest = builder
                            .export(&image, PathBuf::from(dir).as_path(), tag)
                            .with_context(|| format!("exporting to {dir}"))?;
                        eprintln!("exported {dir}:{tag} ({digest})");
                    }
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("mistryd: build of {} failed: {e}", args.context.display());
                    Ok(1)
                }
            }
        }
        ImageCommand::Gc(args) => {
            let store = open_store(&args)?;
            let done = store.collect_garbage().context("collecting garbage")?;
            println!(
                "Removed snapshots: {}, step records: {}, blobs: {}, cache mounts: {}",
                done.snapshots, done.steps, done.blobs, done.caches
            );
            Ok(0)
        }
    }
}
