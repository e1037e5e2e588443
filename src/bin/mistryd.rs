//! mistryd: the mistry build server.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mistry::config::Config;
use mistry::engine::Engine;
use mistry::image_cli::{self, ImageCommand};
use mistry::sandbox_cli::{self, RunArgs};
use mistry::security::SandboxIds;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "mistryd",
    version,
    about = "A rootless, Docker-free build server compatible with mistry"
)]
struct Cli {
    /// Configuration file (default: config.json). `exec`: none unless given (then the run
    /// takes the file's settings, as the daemon applies them to a job).
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, short = 'a', default_value = "0.0.0.0:8462")]
    addr: String,
    /// Storage backend of the layer store (default: the config's, else detected).
    #[arg(long, value_name = "plain|btrfs|overlay", global = true)]
    filesystem: Option<images::BackendKind>,
    /// How sandbox ids map onto the host: `auto` (sandbox root is this daemon's user) or
    /// `subordinate` (every sandbox id, root included, is one of its subordinate ids; the safe
    /// choice for a daemon running as root). Default: the config's `sandbox_ids`, else auto.
    /// Give it before a subcommand (`mistryd --sandbox-ids subordinate rebuild`).
    #[arg(long, value_name = "auto|subordinate")]
    sandbox_ids: Option<mistry::security::SandboxIds>,
    /// How long running jobs may go on after SIGTERM before they are killed.
    #[arg(long, default_value = "30s", value_parser = mistry::duration::parse)]
    shutdown_grace: Duration,
    /// Connections served at once (at the cap, the oldest one that is not busy with a request
    /// — idle, or still sending a request — is closed to make room).
    #[arg(long, default_value_t = mistry::server::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Time a client has to send a request's headers; also how long a kept-alive connection
    /// may stay idle.
    #[arg(long, default_value = "10s", value_parser = mistry::duration::parse)]
    header_timeout: Duration,
    /// Time a client has to send a request's whole body once its headers are in (then 408,
    /// and the connection is closed).
    #[arg(long, default_value = "60s", value_parser = mistry::duration::parse)]
    body_timeout: Duration,
    /// How long a client may accept no byte of an answer being sent before its connection is
    /// closed.
    #[arg(long, default_value = "60s", value_parser = mistry::duration::parse)]
    send_timeout: Duration,
    #[command(subcommand)]
    command: Option<Command>,
}

/// `--older-than`: anyhow's error (one line) as the error clap reports.
fn parse_age(s: &str) -> Result<Duration, Box<dyn std::error::Error + Send + Sync>> {
    mistry::config::parse_age(s).map_err(Into::into)
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Rebuild the images of all projects (or the named ones) ignoring every cache, then prune
    /// what is no longer used.
    Rebuild {
        #[arg(long, short = 'p')]
        project: Vec<String>,
        #[arg(long)]
        fail_fast: bool,
        #[arg(long, short = 'v')]
        verbose: bool,
    },
    /// Run commands in the rootless sandbox jobs use (debugging, benchmarks).
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Build images into a layer store, collect garbage (debugging, benchmarks).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Remove ready builds: the last N of each project and group are kept (--keep), or those
    /// younger than --older-than; without either, the configuration's `retention`. Link targets
    /// (`latest`, `groups/<g>`) and pending builds stay. Safe beside a running daemon.
    Purge {
        /// Only this project (repeatable).
        #[arg(long, short = 'p')]
        project: Vec<String>,
        /// Remove builds that started longer ago than this (`7d`, `36h`, `90m`).
        #[arg(long, value_name = "AGE", value_parser = parse_age)]
        older_than: Option<Duration>,
        /// Keep the last N builds of each project and group.
        #[arg(long, value_name = "N")]
        keep: Option<usize>,
        /// List what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Run a command (default: $SHELL) in a user namespace with the sandboxes' id mapping, the
    /// host's filesystem visible, like `podman unshare`: to inspect or delete files jobs made.
    Unshare {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<std::ffi::OsString>,
    },
    /// Build a project's image and run its job on this machine, no server: the engine of the
    /// daemon, a local state directory (`mistry exec` runs this).
    Exec(mistry_client::ExecArgs),
    /// Access tokens: create (printed once), list, revoke, generate (docs/access.md).
    #[command(subcommand)]
    Token(mistry::operator::token::TokenCommand),
    /// Check what this host needs to run jobs, and say how to fix what is missing; exits 1 when
    /// something blocks jobs.
    Doctor,
    /// Image-tree operations run inside the sandbox's user namespace (used by mistryd itself).
    #[command(hide = true)]
    Internal {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, Subcommand)]
enum SandboxCommand {
    /// Run one command in a fresh sandbox on a root filesystem directory.
    Run(RunArgs),
}

/// The daemon's configuration file: `--config`, else `config.json`.
fn config_path(cli: &Cli) -> PathBuf {
    cli.config
        .clone()
        .unwrap_or_else(|| PathBuf::from("config.json"))
}

fn load(cli: &Cli) -> Result<Config> {
    let mut cfg = Config::load(&config_path(cli))?;
    set_up(cli, &mut cfg)?;
    Ok(cfg)
}

/// The command line's overrides of a configuration, and the id mapping every sandbox uses.
fn set_up(cli: &Cli, cfg: &mut Config) -> Result<()> {
    if let Some(f) = cli.filesystem {
        cfg.filesystem = Some(f);
    }
    if let Some(ids) = cli.sandbox_ids {
        cfg.sandbox_ids = ids;
    }
    // Image tools, RUN steps and jobs must all map ids the same way.
    sandbox::set_default_id_mapping(match cfg.sandbox_ids {
        SandboxIds::Auto => sandbox::IdMapping::Auto,
        SandboxIds::Subordinate => sandbox::IdMapping::Subordinate,
    });
    if cfg.sandbox_ids == SandboxIds::Subordinate {
        if !nix::unistd::geteuid().is_root() {
            anyhow::bail!(
                "--sandbox-ids subordinate is for a daemon running as root: an unprivileged \
                 daemon's jobs are already not root on the host (their root is its own user)"
            );
        }
        sandbox::try_choose_id_map(sandbox::IdMapping::Subordinate)
            .context("--sandbox-ids subordinate")?;
    }
    Ok(())
}

/// File descriptors kept for everything but client connections (jobs' logs and pipes, the
/// store, the image helper).
const FD_RESERVE: u64 = 256;

/// Raise the soft limit of open files to the hard one, and fit the connection cap under it.
fn connection_cap(wanted: usize) -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let soft = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, "could not raise the open files limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => return wanted,
    };
    let fit = usize::try_from(soft.saturating_sub(FD_RESERVE).max(16)).unwrap_or(usize::MAX);
    if wanted > fit {
        tracing::warn!(
            wanted,
            open_files_limit = soft,
            cap = fit,
            "the connection cap is lowered to fit the open files limit"
        );
        return fit;
    }
    wanted
}

async fn serve(cli: Cli) -> Result<()> {
    let cfg = load(&cli)?;
    if nix::unistd::geteuid().is_root() && cfg.sandbox_ids == SandboxIds::Auto {
        tracing::warn!(
            "mistryd runs as root with --sandbox-ids auto: a job's root is the host's root \
             (uid 0, with reduced capabilities and seccomp). Run mistryd as an unprivileged user \
             (contrib/systemd/mistryd.service) or pass --sandbox-ids subordinate; see SECURITY.md"
        );
    }
    let mut cfg = cfg;
    // Isolated networks: the egress policy, and namespaces made ahead from now on.
    cfg.set_up_networks(true);
    let helper = image_cli::helper_command()?;
    // Bound first, so that image builds know the real address (also the port the kernel
    // chose for `--addr HOST:0`) and never download from the daemon itself. Nothing is
    // accepted before the engine has cleaned up what a crash left: a client that connects
    // early waits in the backlog and finds it clean.
    let listener = tokio::net::TcpListener::bind(&cli.addr)
        .await
        .with_context(|| format!("listening on {}", cli.addr))?;
    let bound = listener
        .local_addr()
        .with_context(|| format!("listening on {}", cli.addr))?;
    cfg.listen = vec![bound];
    if !cfg.access.enabled() && !bound.ip().is_loopback() {
        tracing::warn!(
            addr = %bound,
            "no tokens and no allow rules: anyone who reaches {bound} may read every project, \
             download every build and schedule jobs (docs/access.md)"
        );
    }
    if let Some(p) = &cfg.raw_access.cluster_token_file {
        mistry::access::set_cluster_token(mistry::access::read_cluster_token(
            &cfg.base_dir.join(p),
        )?);
    }
    // Several agents (`database_url`): connect and migrate before anything else (an unreachable
    // database stops the start here), register once the engine is ready; a single node stays in
    // memory.
    let cluster = Arc::new(mistry::cluster::Cluster::connect(&cfg).await?);
    cluster.start_egress(cfg.cluster.database_url.clone()).await;
    let engine = Arc::new(tokio::task::spawn_blocking(move || Engine::new(cfg, helper)).await??);
    {
        let engine = Arc::clone(&engine);
        cluster.start(move || engine.running()).await?;
    }
    cluster.start_jobs(Arc::clone(&engine));
    // SIGTERM is handled from before the line below: a client that stops mistryd as soon as
    // it reported its address gets a graceful shutdown.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tracing::info!(addr = %bound, store = %engine.cfg.store_path.display(), "mistryd ready");
    // The one line mistryd writes on stdout (docs/operators.md): the address it listens on, the port
    // chosen by the kernel for `--addr HOST:0`. Not being able to write it is no reason to stop.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "mistryd: listening on {bound}").and_then(|()| out.flush());
    }
    // Retention (`retention` in the configuration): a pass every interval, besides the one
    // after each job.
    engine.start_retention();
    // The jobs' back end: the cluster's records with a database, else this agent's engine.
    let jobs: Arc<dyn mistry::service::Jobs> = if cluster.db().is_some() {
        Arc::new(mistry::cluster::ClusterJobs::new(
            Arc::clone(&cluster),
            Arc::clone(&engine),
        ))
    } else {
        Arc::new(mistry::service::LocalJobs::new(Arc::clone(&engine)))
    };
    // SIGHUP: the tokens read again (the tokens file); a file in error keeps those in force.
    {
        let policy = Arc::clone(&jobs.config().access);
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let p = Arc::clone(&policy);
                let _ = tokio::task::spawn_blocking(move || p.reload_logged()).await;
            }
        });
    }
    let app = mistry::server::router(jobs);
    let limits = mistry::server::Limits {
        max_connections: connection_cap(cli.max_connections),
        header_timeout: cli.header_timeout,
        body_timeout: cli.body_timeout,
        send_timeout: cli.send_timeout,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(mistry::server::serve(listener, app, limits, stop_rx));
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: no new jobs; waiting for running ones");
    engine.shutdown(cli.shutdown_grace).await;
    tokio::task::spawn_blocking(mistry::security::stop_networks)
        .await
        .ok();
    cluster.stop().await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    tracing::info!("stopped");
    Ok(())
}

fn rebuild(cli: &Cli, projects: &[String], fail_fast: bool, verbose: bool) -> Result<i32> {
    let mut cfg = load(cli)?;
    cfg.set_up_networks(false);
    // The daemon (whose address --addr names) may be running beside us: ADD <url> does not
    // connect there.
    cfg.listen = cli.addr.parse().into_iter().collect();
    // Beside a running daemon: no clean-up of its pending jobs or work in progress.
    let builder = mistry::engine::builder_for(&cfg, image_cli::helper_command()?, false)?;
    let mut names: Vec<String> = if projects.is_empty() {
        std::fs::read_dir(&cfg.projects_path)
            .with_context(|| format!("reading {}", cfg.projects_path.display()))?
            .flatten()
            .filter(|e| e.path().join("Dockerfile").is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    } else {
        projects.to_vec()
    };
    names.sort();
    let (mut rebuilt, mut failed) = (0, Vec::new());
    for name in &names {
        let mut opts = cfg.build_options(name)?;
        opts.no_cache = true;
        let mut log: Box<dyn std::io::Write> = if verbose {
            Box::new(std::io::stdout())
        } else {
            Box::new(std::io::sink())
        };
        match builder.build(&opts, &mut log) {
            Ok(_) => rebuilt += 1,
            Err(e) => {
                eprintln!("{name}: {e}");
                failed.push(name.clone());
                if fail_fast {
                    break;
                }
            }
        }
    }
    mistry::security::stop_networks();
    let pruned = builder.store.collect_garbage()?;
    println!(
        "Finished. Rebuilt: {rebuilt}, Pruned images: {}, Pruned blobs: {}, Failed: {}",
        pruned.snapshots,
        pruned.blobs,
        failed.len()
    );
    if failed.is_empty() {
        Ok(0)
    } else {
        eprintln!("Failed projects: {}", failed.join(", "));
        Ok(1)
    }
}

/// ANSI colours in the logs only when stderr is a terminal and `NO_COLOR` is unset or empty
/// (<https://no-color.org>): journald, files and pipes get plain text.
fn log_colours() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// `mistryd unshare`: the id mapping of the configuration (when its file exists) or of
/// `--sandbox-ids`.
fn unshare(cli: &Cli, command: Vec<std::ffi::OsString>) -> Result<i32> {
    if config_path(cli).exists() {
        load(cli)?;
    } else if let Some(ids) = cli.sandbox_ids {
        sandbox::set_default_id_mapping(match ids {
            SandboxIds::Auto => sandbox::IdMapping::Auto,
            SandboxIds::Subordinate => sandbox::IdMapping::Subordinate,
        });
    }
    mistry::operator::unshare::run(command)
}

fn main() {
    let default = match std::env::args().nth(1).as_deref() {
        // `mistryd image build` says which storage backend the store uses, and why.
        Some("image") => "warn,images::store=info",
        Some("sandbox" | "internal" | "unshare" | "doctor" | "exec") => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("MISTRY_LOG").unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_ansi(log_colours())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // The subordinate id map is set up once and held (rootless: no setuid helper per sandbox).
    // The daemon and rebuilds keep private holders, which end with them; the one-shot commands
    // (`sandbox run`, `exec`, `image build`) share one that outlives them, found by the next
    // one (sandbox/src/holder.rs). MISTRY_NO_HELD_USERNS=1 turns holding off.
    match &cli.command {
        _ if sandbox_cli::holding_off() => {}
        Some(Command::Internal { .. }) => {}
        Some(
            Command::Sandbox(SandboxCommand::Run(_))
            | Command::Exec(_)
            | Command::Image(ImageCommand::Build(_)),
        ) => sandbox_cli::hold_shared(),
        _ => sandbox::set_held_user_namespaces(true),
    }
    let code = match &cli.command {
        Some(Command::Sandbox(SandboxCommand::Run(_))) => {
            let Some(Command::Sandbox(SandboxCommand::Run(args))) = cli.command else {
                unreachable!()
            };
            sandbox_cli::run(args)
        }
        Some(Command::Image(_)) => {
            let Some(Command::Image(cmd)) = cli.command else {
                unreachable!()
            };
            match image_cli::run(cmd) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("mistryd: {e:#}");
                    1
                }
            }
        }
        Some(Command::Internal { args }) => images::helper_main(args),
        Some(Command::Purge {
            project,
            older_than,
            keep,
            dry_run,
        }) => {
            let opts = mistry::operator::purge::Options {
                projects: project.clone(),
                older_than: *older_than,
                keep: *keep,
                dry_run: *dry_run,
            };
            match load(&cli).and_then(|cfg| {
                mistry::operator::purge::run(&cfg, &opts, &mut std::io::stdout().lock())
            }) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("mistryd: {e:#}");
                    1
                }
            }
        }
        Some(Command::Unshare { command }) => match unshare(&cli, command.clone()) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("mistryd: {e:#}");
                1
            }
        },
        Some(Command::Token(cmd)) => {
            match mistry::operator::token::run(
                &config_path(&cli),
                cmd,
                &mut std::io::stdout().lock(),
            ) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("mistryd: {e:#}");
                    1
                }
            }
        }
        Some(Command::Exec(args)) => {
            mistry::exec::main(args, cli.config.as_deref(), |cfg| set_up(&cli, cfg))
        }
        Some(Command::Doctor) => {
            match mistry::operator::doctor::run(
                &config_path(&cli),
                cli.sandbox_ids,
                &mut std::io::stdout().lock(),
            ) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("mistryd: {e}");
                    1
                }
            }
        }
        Some(Command::Rebuild {
            project,
            fail_fast,
            verbose,
        }) => match rebuild(&cli, project, *fail_fast, *verbose) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("mistryd: {e:#}");
                1
            }
        },
        None => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("mistryd: starting the runtime: {e}");
                    std::process::exit(1);
                }
            };
            match rt.block_on(serve(cli)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("mistryd: {e:#}");
                    1
                }
            }
        }
    };
    std::process::exit(code);
}
